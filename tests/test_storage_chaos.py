"""Failover and recovery with real storage daemon processes killed with SIGKILL.

A stream of writes runs while daemons die; every acknowledged write is kept in
a ledger and read back from every replica at the end; every replica of every
chunk must end with the same version, length and checksum.
"""
import asyncio
import os
import random
import signal
import time

import pytest

from cluster_fixtures import StorageCluster, assert_replicas_equal

from flyfs.client.storage_client import ReadPiece
from flyfs.cluster.chain_state import PublicState, readable_targets
from flyfs.proto import common_pb2 as SC

HB = 1.5          # mgmtd heartbeat timeout in these tests
CS = 256 << 10
SLOT = 4096


async def acked_at_least(ledger, writer: asyncio.Task, count: int) -> None:
    """Wait until `count` writes are acknowledged; fail if the writers stopped."""
    while ledger.acked < count:
        assert not writer.done(), ledger.errors
        await asyncio.sleep(0.05)


async def acked_more(ledger, writer: asyncio.Task, n: int) -> None:
    """Wait for `n` more acknowledged writes."""
    await acked_at_least(ledger, writer, ledger.acked + n)


class Ledger:
    """Acknowledged writes: chunk -> slot -> bytes. Each writer owns its chunks, so
    the last acknowledged write of a slot is what every replica must hold."""

    def __init__(self):
        self.slots: dict[tuple[int, int], dict[int, bytes]] = {}
        self.acked = 0
        self.max_latency = 0.0
        self.errors: list[BaseException] = []

    def expected(self, key) -> bytes:
        slots = self.slots[key]
        out = bytearray((max(slots) + 1) * SLOT)
        for s, data in slots.items():
            out[s * SLOT:s * SLOT + len(data)] = data
        return bytes(out)


async def writers(sc, chain_id, ledger: Ledger, stop: asyncio.Event, n: int = 4, chunks_each: int = 8,
                  inode: int = 100):
    async def one(w: int):
        rng = random.Random(w)
        k = 0
        while not stop.is_set():
            index = w * chunks_each + k % chunks_each
            slot = rng.randrange(CS // SLOT)
            data = rng.randbytes(SLOT)
            t = time.monotonic()
            try:
                await sc.write(chain_id, inode, index, slot * SLOT, data, chunk_size=CS)
            except Exception as e:   # an unacknowledged write: the test fails below
                ledger.errors.append(e)
                return
            ledger.max_latency = max(ledger.max_latency, time.monotonic() - t)
            ledger.slots.setdefault((inode, index), {})[slot] = data
            ledger.acked += 1
            k += 1

    await asyncio.gather(*(one(w) for w in range(n)))


async def check_ledger(sc, chain, ledger: Ledger):
    assert not ledger.errors, f"writes failed: {ledger.errors[:3]}"
    assert ledger.acked > 0
    for (inode, index) in ledger.slots:
        want = ledger.expected((inode, index))
        for t in chain.target_ids:
            r, got = await sc.read_target(t, ReadPiece(chain.chain_id, inode, index, 0, CS))
            assert r.status.code == SC.OK, (t, index, r.status.message)
            assert got[:len(want)] == want, f"target {t}: chunk {index} lost acknowledged writes"
    await assert_replicas_equal(sc, chain)


def resynced_in_log(cluster, node: int) -> bool:
    with open(cluster.nodes[node].proc.log_path) as f:
        return "resynced at chain" in f.read()


async def kill_and_recover(cluster, sc, chain_id, role: str, ledger: Ledger):
    """SIGKILL the node holding the chain's `role` target while writes run, check writes go on,
    restart it, and wait until its target resynced and serves."""
    info = await cluster.routing()
    serving = readable_targets(info.chains[chain_id])
    victim_t = {"head": serving[0], "middle": serving[len(serving) // 2], "tail": serving[-1]}[role]
    victim = cluster.node_of_target(victim_t, info)
    before = ledger.acked
    cluster.kill(victim)
    killed_at = time.monotonic()
    # Writes resume: acknowledged writes keep coming within the heartbeat timeout plus a few seconds.
    while ledger.acked < before + 20:
        assert not ledger.errors, ledger.errors[:3]
        assert time.monotonic() - killed_at < HB + 10, "writes did not resume after the kill"
        await asyncio.sleep(0.05)
    await cluster.wait_until(lambda i: victim_t not in readable_targets(i.chains[chain_id]), 30,
                             f"{role} target {victim_t} out of the chain")
    await asyncio.sleep(0.5)
    await cluster.restart(victim)
    info = await cluster.wait_all_serving(60)
    assert victim_t in readable_targets(info.chains[chain_id])
    assert resynced_in_log(cluster, victim), "the restarted target served without a resync"
    return victim


@pytest.fixture
async def procs(tmp_path):
    async with StorageCluster(tmp_path, nodes=3, replication=3, processes=True, heartbeat_timeout=HB,
                              max_chunk_size=CS) as c:
        yield c


async def test_head_killed_during_writes_then_recovers(procs):
    sc = procs.client(retry_timeout=30)
    chain_id = (await procs.chains())[0].chain_id
    ledger, stop = Ledger(), asyncio.Event()
    w = asyncio.create_task(writers(sc, chain_id, ledger, stop))
    try:
        await acked_at_least(ledger, w, 50)
        await kill_and_recover(procs, sc, chain_id, "head", ledger)
        await acked_more(ledger, w, 30)  # writes also flow to the recovered chain
    finally:
        stop.set()
        await w
    assert ledger.max_latency < HB + 10
    chain = (await procs.routing()).chains[chain_id]
    assert all(s is PublicState.SERVING for _, s in chain.targets)
    await check_ledger(sc, chain, ledger)


async def test_hung_tail_middle_head_are_routed_around(procs):
    """A daemon that stops answering (SIGSTOP: a hang, a cut-off host) refuses nothing:
    requests to it are abandoned once mgmtd takes it out of the chain, so writes wait
    about the heartbeat timeout, not the request timeouts (20 s here); the daemon comes
    back (SIGCONT), resyncs, and every replica ends identical."""
    sc = procs.client(retry_timeout=60)
    chain_id = (await procs.chains())[0].chain_id
    ledger, stop = Ledger(), asyncio.Event()
    w = asyncio.create_task(writers(sc, chain_id, ledger, stop))
    try:
        for role in ("tail", "middle", "head"):
            await acked_more(ledger, w, 30)
            info = await procs.wait_all_serving(60)
            serving = readable_targets(info.chains[chain_id])
            victim_t = {"head": serving[0], "middle": serving[1], "tail": serving[-1]}[role]
            node = procs.nodes[procs.node_of_target(victim_t, info)]
            before = ledger.acked
            os.kill(node.proc.pid, signal.SIGSTOP)
            try:
                stopped_at = time.monotonic()
                while ledger.acked < before + 20:
                    assert not ledger.errors, ledger.errors[:3]
                    assert time.monotonic() - stopped_at < HB + 8, f"writes stalled behind the hung {role}"
                    await asyncio.sleep(0.05)
            finally:
                os.kill(node.proc.pid, signal.SIGCONT)
        await procs.wait_all_serving(60)
        await acked_more(ledger, w, 30)
    finally:
        stop.set()
        await w
    assert ledger.max_latency < HB + 6, ledger.max_latency
    chain = (await procs.routing()).chains[chain_id]
    await check_ledger(sc, chain, ledger)


async def test_reads_leave_a_hung_replica_before_mgmtd_does(tmp_path):
    """With a heartbeat timeout of 30 s, reads do not wait for mgmtd: a replica whose
    connection stays silent while reads wait on it is left for another one."""
    from flyfs.client import storage_client
    async with StorageCluster(tmp_path, nodes=3, replication=3, processes=True, heartbeat_timeout=30,
                              max_chunk_size=CS) as c:
        sc = c.client(retry_timeout=60)
        chain = (await c.chains())[0]
        for i in range(30):
            await sc.write(chain.chain_id, 7, i, 0, bytes([i]) * 5000, chunk_size=CS)
        victim = c.nodes[c.node_of_target(chain.target_ids[1], await c.routing())]
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            bufs = [bytearray(5000) for _ in range(30)]
            got = await sc.batch_read([ReadPiece(chain.chain_id, 7, i, 0, 5000, bufs[i]) for i in range(30)])
            took = time.monotonic() - started
            started = time.monotonic()                # the node is avoided from now on
            again = await sc.batch_read([ReadPiece(chain.chain_id, 7, i, 0, 5000, bytearray(5000))
                                         for i in range(30)])
            took_again = time.monotonic() - started
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        assert got == [5000] * 30 and all(b == bytes([i]) * 5000 for i, b in enumerate(bufs))
        assert took < storage_client.HANG_AFTER + 5 < 20, took    # 20 s: the request timeout here
        assert again == [5000] * 30 and took_again < 1, took_again


@pytest.mark.slow
async def test_tail_middle_head_killed_in_turn(procs):
    sc = procs.client(retry_timeout=60)
    chain_id = (await procs.chains())[0].chain_id
    ledger, stop = Ledger(), asyncio.Event()
    w = asyncio.create_task(writers(sc, chain_id, ledger, stop, n=8))
    try:
        for role in ("tail", "middle", "head"):
            await acked_more(ledger, w, 100)
            await kill_and_recover(procs, sc, chain_id, role, ledger)
    finally:
        stop.set()
        await w
    chain = (await procs.routing()).chains[chain_id]
    await check_ledger(sc, chain, ledger)


@pytest.mark.slow
async def test_two_nodes_down_then_back(procs):
    """Middle and tail die one after the other; the head alone keeps taking writes;
    both come back, resync one at a time, and every replica ends identical."""
    sc = procs.client(retry_timeout=60)
    chain_id = (await procs.chains())[0].chain_id
    ledger, stop = Ledger(), asyncio.Event()
    w = asyncio.create_task(writers(sc, chain_id, ledger, stop, n=6))
    try:
        info = await procs.routing()
        serving = readable_targets(info.chains[chain_id])
        victims = [procs.node_of_target(t, info) for t in serving[1:]]
        for v in victims:
            await acked_more(ledger, w, 50)
            procs.kill(v)
            await asyncio.sleep(HB)
        await acked_more(ledger, w, 100)
        for v in victims:
            await procs.restart(v)
        await procs.wait_all_serving(90)
        await acked_more(ledger, w, 50)
    finally:
        stop.set()
        await w
    chain = (await procs.routing()).chains[chain_id]
    await check_ledger(sc, chain, ledger)
    for v in victims:
        assert resynced_in_log(procs, v)


@pytest.mark.slow
async def test_whole_chain_killed_and_restarted(procs):
    """Every daemon dies at once (kill -9); after restart the last serving target serves
    again (LASTSRV), the others resync from it, and no acknowledged write is lost."""
    sc = procs.client(retry_timeout=90)
    chain_id = (await procs.chains())[0].chain_id
    ledger, stop = Ledger(), asyncio.Event()
    w = asyncio.create_task(writers(sc, chain_id, ledger, stop))
    try:
        await acked_at_least(ledger, w, 100)
        for n in range(3):
            procs.kill(n)
        await asyncio.sleep(HB + 1)
        for n in range(3):
            await procs.restart(n)
        await procs.wait_all_serving(90)
        await acked_more(ledger, w, 50)
    finally:
        stop.set()
        await w
    chain = (await procs.routing()).chains[chain_id]
    await check_ledger(sc, chain, ledger)
