"""Tests of the cluster manager (flyfs.cluster.mgmtd) and its client, in process,
on the memory:// KV engine."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from flyfs.cluster.chain_state import LocalState, PublicState, head, readable_targets, tail
from flyfs.cluster.mgmtd import K_LEASE, NOT_PRIMARY, Mgmtd, MgmtdError, main
from flyfs.cluster.mgmtd_client import (NODE_CLIENT, NODE_META, NODE_STORAGE, MgmtdClient,
                                        MgmtdUnavailable, RoutingInfo)
from flyfs.proto import common_pb2, mgmtd_pb2

S, L, Y, W, O = (PublicState.SERVING, PublicState.LASTSRV, PublicState.SYNCING,
                 PublicState.WAITING, PublicState.OFFLINE)
UP, ON, OFF = LocalState.UPTODATE, LocalState.ONLINE, LocalState.OFFLINE
TIMEOUT = 3.0


class FakeClock:
    """Heartbeat clock the test moves by hand (the lease still runs on real time)."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


def kv_name():
    return f"memory://mgmtd-test-{uuid.uuid4().hex}"


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
async def mgmtd(clock):
    # No background ticks: tests call tick() after moving the clock.
    m = Mgmtd(kv_name(), "127.0.0.1:0", heartbeat_timeout=TIMEOUT, lease_s=30.0, tick_s=3600, clock=clock)
    await m.start()
    assert m.is_primary
    yield m
    await m.stop()


@pytest.fixture
async def client(mgmtd):
    c = MgmtdClient(mgmtd.address, cluster_id="flyfs", retry_timeout=10.0)
    yield c
    await c.close()


def hdr(**kw):
    return common_pb2.RequestHeader(**{"cluster_id": "flyfs", **kw})


class Cluster:
    """Three storage nodes x two targets registered through the client, chains of 3."""

    def __init__(self, client, mgmtd, clock):
        self.c, self.m, self.clock = client, mgmtd, clock
        self.nodes = {}  # node id -> [target ids]

    async def setup(self, nodes=3, per_node=2, replication=3):
        for i in range(nodes):
            r = await self.c.register_node(NODE_STORAGE, f"127.0.0.1:{9100 + i}",
                                           targets=[(0, f"/data/n{i}/t{j}") for j in range(per_node)])
            assert r.status.code == common_pb2.OK and len(r.target_ids) == per_node
            self.nodes[r.node_id] = list(r.target_ids)
        self.created = await self.c.create_chains(replication, table_id=1)
        return self

    def node_of(self, target):
        return next(n for n, ts in self.nodes.items() if target in ts)

    async def beat(self, node, state=UP, info=None, states=None, chain_version=None):
        """Heartbeat `node` reporting `state` (or per-target `states`) at each chain's current version."""
        info = info or await self.c.get_routing_info(force=True)
        reports = []
        for t in self.nodes[node]:
            cid = info.targets[t].chain_id
            v = info.chains[cid].version if cid else 0
            reports.append((t, (states or {}).get(t, state), v if chain_version is None else chain_version,
                            1000 * t, 10 ** 9))
        return await self.c.heartbeat(node, reports)

    async def beat_all(self, except_nodes=(), state=UP):
        info = await self.c.get_routing_info(force=True)
        for n in self.nodes:
            if n not in except_nodes:
                await self.beat(n, state, info)


@pytest.fixture
async def cluster(client, mgmtd, clock):
    return await Cluster(client, mgmtd, clock).setup()


# ---- registration, chains, routing info ---------------------------------------------------------

async def test_register_create_and_routing_info(client, mgmtd, cluster):
    info = await client.get_routing_info()
    assert len(info.nodes) == 3 and all(n.alive for n in info.nodes.values())
    assert all(n.type == NODE_STORAGE for n in info.nodes.values())
    assert sorted(info.targets) == sorted(t for ts in cluster.nodes.values() for t in ts)
    assert len(info.chains) == 2
    for chain in info.chains.values():
        assert chain.version == 1
        assert [ps for _, ps in chain.targets] == [S, S, S]
        nodes = [info.targets[t].node_id for t in chain.target_ids]
        assert len(set(nodes)) == 3, "two replicas of a chain on one node"
        for t in chain.target_ids:
            assert info.targets[t].chain_id == chain.chain_id
            assert info.targets[t].public_state == mgmtd_pb2.PUBLIC_SERVING
    # Every target used once; heads on different nodes.
    used = [t for c in info.chains.values() for t in c.target_ids]
    assert sorted(used) == sorted(info.targets)
    assert len({info.targets[head(c)].node_id for c in info.chains.values()}) == 2
    assert info.table(1) == tuple(sorted(info.chains)) and info.table_version(1) == 1
    assert info.address_of(used[0]) == info.nodes[info.targets[used[0]].node_id].address
    # The reply of CreateChains matches the routing info.
    assert [c.chain_id for c in cluster.created.chains] == list(info.table(1))
    assert cluster.created.table.table_id == 1 and not cluster.created.unused_target_ids

    # Versioned: asking with the current version is answered "unchanged", empty.
    r = await mgmtd.get_routing_info(mgmtd_pb2.GetRoutingInfoRequest(header=hdr(), known_version=info.version))
    assert r.status.code == common_pb2.OK and r.unchanged and not r.info.chains
    r = await mgmtd.get_routing_info(mgmtd_pb2.GetRoutingInfoRequest(header=hdr(), known_version=info.version - 1))
    assert not r.unchanged and r.info.version == info.version and len(r.info.chains) == 2

    # The list and table RPCs agree.
    nodes = await client.list_nodes()
    assert sorted(n.node_id for n in nodes) == sorted(cluster.nodes)
    lc = await client.list_chains(table_id=1)
    assert [c.chain_id for c in lc.chains] == list(info.table(1)) and len(lc.targets) == 6
    table = await client.get_chain_table(1)
    assert list(table.chain_ids) == list(info.table(1)) and table.version == 1


async def test_routing_version_moves_on_every_change(client, mgmtd):
    versions = [(await client.get_routing_info(force=True)).version]
    ids = []
    for i in range(3):
        r = await client.register_node(NODE_STORAGE, f"127.0.0.1:{9200 + i}", targets=[(0, "/d")])
        ids += list(r.target_ids)
        versions.append((await client.get_routing_info(force=True)).version)
    created = await client.create_chains(3)
    versions.append((await client.get_routing_info(force=True)).version)
    await client.set_chain_table(5, [created.chains[0].chain_id])
    versions.append((await client.get_routing_info(force=True)).version)
    assert versions == sorted(set(versions)), versions
    # Setting the same table again changes nothing.
    t = await client.set_chain_table(5, [created.chains[0].chain_id])
    assert t.version == 1 and (await client.get_routing_info(force=True)).version == versions[-1]


async def test_meta_and_client_nodes(client, mgmtd):
    meta = await client.register_node(NODE_META, "127.0.0.1:9300")
    cl = await client.register_node(NODE_CLIENT, "127.0.0.1:9301")
    info = await client.get_routing_info(force=True)
    assert [n.node_id for n in info.meta_nodes()] == [meta.node_id]
    assert cl.node_id not in info.nodes  # clients are not routing info
    assert {n.node_id for n in await client.list_nodes(NODE_CLIENT)} == {cl.node_id}
    hb = await client.heartbeat(meta.node_id)
    assert hb.lease_ms == int(TIMEOUT * 1000) and hb.lease_expiry_ms > time.time() * 1000


# ---- heartbeats, timeouts, recovery -----------------------------------------------------------------

async def test_heartbeat_timeout_and_resync(client, mgmtd, cluster, clock):
    await cluster.beat_all()
    info0 = await client.get_routing_info(force=True)
    dead = list(cluster.nodes)[2]
    # Node `dead` stops; the others keep beating.
    for _ in range(4):
        clock.advance(1.0)
        await cluster.beat_all(except_nodes=[dead])
        await mgmtd.tick()
    info = await client.get_routing_info(force=True)
    assert info.version > info0.version
    assert not info.nodes[dead].alive and all(info.nodes[n].alive for n in cluster.nodes if n != dead)
    for cid, chain in info.chains.items():
        assert chain.version == info0.chains[cid].version + 1
        states = chain.states()
        for t in cluster.nodes[dead]:
            if t in states:
                assert states[t] is O and chain.target_ids[-1] == t
                assert tail(chain) != t and t not in readable_targets(chain)
        assert [ps for _, ps in chain.targets] == [S, S, O]

    # It comes back (ONLINE): WAITING, then SYNCING on the next tick, at the tail.
    await cluster.beat(dead, ON)
    info = await client.get_routing_info(force=True)
    assert all(c.targets[-1][1] is W for c in info.chains.values())
    await mgmtd.tick()
    info = await client.get_routing_info(force=True)
    for chain in info.chains.values():
        assert chain.targets[-1][1] is Y and tail(chain) == chain.target_ids[-1]
    # A stale "resync done" (chain version from before SYNCING) does not count.
    await cluster.beat(dead, UP, info, chain_version=1)
    await mgmtd.tick()
    assert (await client.get_routing_info(force=True)).chains == info.chains
    # Resync done at the current version: SERVING.
    await cluster.beat(dead, UP, info)
    info2 = await client.get_routing_info(force=True)
    for cid, chain in info2.chains.items():
        assert [ps for _, ps in chain.targets] == [S, S, S]
        assert chain.version == info.chains[cid].version + 1


async def test_cached_client_refreshes_when_the_version_moves(client, mgmtd, cluster, clock):
    await cluster.beat_all()
    watcher = MgmtdClient(mgmtd.address)
    try:
        cached = await watcher.get_routing_info()
        assert await watcher.get_routing_info() is cached  # served from the cache
        for _ in range(4):
            clock.advance(1.0)
            await cluster.beat_all(except_nodes=[list(cluster.nodes)[0]])
            await mgmtd.tick()
        # Still cached: nothing told this client the version moved.
        assert await watcher.get_routing_info() is cached
        # A heartbeat reply carries the routing version; the cache goes stale.
        other = list(cluster.nodes)[1]
        await watcher.heartbeat(other, [(t, UP, 0) for t in cluster.nodes[other]])
        fresh = await watcher.get_routing_info()
        assert fresh.version > cached.version
        assert any(ps is O for c in fresh.chains.values() for _, ps in c.targets)
        # Revalidating an unchanged version keeps the same object.
        assert await watcher.get_routing_info(force=True) is fresh
    finally:
        await watcher.close()


async def test_background_task_applies_timeouts():
    """The real background task (real clock) moves a silent node's targets OFFLINE."""
    m = Mgmtd(kv_name(), "127.0.0.1:0", heartbeat_timeout=1.0, lease_s=30.0, tick_s=0.1)
    await m.start()
    c = MgmtdClient(m.address)
    beating = None
    try:
        nodes = {}
        for i in range(3):
            r = await c.register_node(NODE_STORAGE, f"127.0.0.1:{9400 + i}", targets=[(0, "/t")])
            nodes[r.node_id] = r.target_ids[0]
        await c.create_chains(3)
        silent = list(nodes)[0]

        async def beat():
            while True:
                for n, t in nodes.items():
                    if n != silent:
                        await c.heartbeat(n, [(t, UP, 1)])
                await asyncio.sleep(0.2)

        beating = asyncio.create_task(beat())
        deadline = time.monotonic() + 20
        while True:
            info = await c.get_routing_info(force=True)
            chain = next(iter(info.chains.values()))
            if chain.states()[nodes[silent]] is O:
                break
            assert time.monotonic() < deadline, f"no timeout applied: {chain}"
            await asyncio.sleep(0.1)
        assert chain.version == 2 and [ps for _, ps in chain.targets] == [S, S, O]
        assert not info.nodes[silent].alive
    finally:
        if beating:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
        await c.close()
        await m.stop()


async def test_all_nodes_die_and_the_last_serving_returns(client, mgmtd, cluster, clock):
    await cluster.beat_all()
    clock.advance(TIMEOUT + 1)
    await mgmtd.tick()
    info = await client.get_routing_info(force=True)
    keepers = {}
    for chain in info.chains.values():
        assert [ps for _, ps in chain.targets] == [L, O, O]
        assert head(chain) is None
        keepers[chain.chain_id] = chain.target_ids[0]
    # Everyone but the keepers' nodes returns: nothing may serve.
    keeper_nodes = {cluster.node_of(t) for t in keepers.values()}
    for n in cluster.nodes:
        if n not in keeper_nodes:
            await cluster.beat(n, ON)
    await mgmtd.tick()
    info = await client.get_routing_info(force=True)
    for chain in info.chains.values():
        assert chain.targets[0] == (keepers[chain.chain_id], L)
    # The keepers return: they serve again and the rest resync from them.
    for _ in range(6):
        info = await client.get_routing_info(force=True)
        for n in cluster.nodes:
            states = {t: (UP if info.chains[info.targets[t].chain_id].states()[t] is Y else ON)
                      for t in cluster.nodes[n]}
            await cluster.beat(n, info=info, states=states)
        await mgmtd.tick()
    info = await client.get_routing_info(force=True)
    for chain in info.chains.values():
        assert chain.target_ids[0] == keepers[chain.chain_id]
        assert [ps for _, ps in chain.targets] == [S, S, S]


async def test_reregistered_node_resyncs(client, mgmtd, cluster, clock):
    await cluster.beat_all()
    node = list(cluster.nodes)[1]
    old = await client.get_routing_info(force=True)
    # The process restarts and registers again with its ids.
    await client.register_node(NODE_STORAGE, "127.0.0.1:9101", node_id=node,
                               targets=[(t, f"/data/n1/t{j}") for j, t in enumerate(cluster.nodes[node])])
    info = await client.get_routing_info(force=True)
    for cid, chain in info.chains.items():
        states = chain.states()
        for t in cluster.nodes[node]:
            if t in states:
                assert states[t] is O and chain.version == old.chains[cid].version + 1
    await cluster.beat(node, ON)
    await mgmtd.tick()
    info = await client.get_routing_info(force=True)
    await cluster.beat(node, UP, info)
    info = await client.get_routing_info(force=True)
    assert all([ps for _, ps in c.targets] == [S, S, S] for c in info.chains.values())


async def test_offline_target(client, mgmtd, cluster, clock):
    await cluster.beat_all()
    info = await client.get_routing_info(force=True)
    chain = next(iter(info.chains.values()))
    victim = chain.target_ids[0]
    after = await client.offline_target(victim)
    assert after.states()[victim] is O and after.version == chain.version + 1
    assert head(after) == chain.target_ids[1]
    # Its node's heartbeats do not bring it back ...
    node = cluster.node_of(victim)
    for _ in range(3):
        await cluster.beat(node, ON)
        await mgmtd.tick()
    info = await client.get_routing_info(force=True)
    assert info.chains[chain.chain_id].states()[victim] is O and info.targets[victim].admin_offline
    # ... until the node registers again (e.g. after a disk swap).
    await client.register_node(NODE_STORAGE, info.nodes[node].address, node_id=node,
                               targets=[(t, info.targets[t].data_path) for t in cluster.nodes[node]])
    await cluster.beat(node, ON)
    info = await client.get_routing_info(force=True)
    assert info.chains[chain.chain_id].states()[victim] is W


async def test_usage_is_reported_without_moving_the_version(client, mgmtd, cluster):
    await cluster.beat_all()
    v = (await client.get_routing_info(force=True)).version
    await cluster.beat_all()
    info = await client.get_routing_info(force=True)
    assert info.version == v
    # A cached client keeps the usage it fetched; ListChains (and a full fetch) are current.
    listed = (await client.list_chains()).targets
    full = RoutingInfo.from_proto(mgmtd.routing_info())
    assert len(listed) == 6 and full.version == v
    for ti in list(listed) + list(full.targets.values()):
        assert ti.used_bytes == 1000 * ti.target_id and ti.total_bytes == 10 ** 9
        assert ti.local_state == mgmtd_pb2.LOCAL_UPTODATE


async def test_concurrent_heartbeats_and_ticks(client, mgmtd, cluster, clock):
    """Many heartbeats, ticks and reads at once over gRPC: consistent, nothing stuck."""
    await cluster.beat_all()
    info = await client.get_routing_info(force=True)
    dead = list(cluster.nodes)[0]

    async def beats(node, n):
        for _ in range(n):
            await cluster.beat(node, UP, info)

    for _ in range(2):  # in steps shorter than the timeout, so only `dead` goes silent
        clock.advance(TIMEOUT * 0.6)
        for n in cluster.nodes:
            if n != dead:
                await cluster.beat(n, UP, info)
    await asyncio.wait_for(asyncio.gather(
        *(beats(n, 10) for n in cluster.nodes if n != dead),
        *(mgmtd.tick() for _ in range(10)),
        *(client.get_routing_info(force=True) for _ in range(10))), 60)
    after = await client.get_routing_info(force=True)
    for cid, chain in after.chains.items():
        # One step per change: exactly one bump for the dead node's targets.
        assert chain.version == info.chains[cid].version + 1
        assert [ps for _, ps in chain.targets] == [S, S, O]


async def test_retried_requests_are_idempotent(mgmtd):
    req = mgmtd_pb2.RegisterNodeRequest(header=hdr(request_uuid=b"u1" * 8), type=NODE_STORAGE,
                                        address="127.0.0.1:9500", targets=[mgmtd_pb2.TargetSpec(data_path="/a")])
    a = await mgmtd.register_node(req)
    b = await mgmtd.register_node(req)
    assert a.status.code == b.status.code == common_pb2.OK
    assert (a.node_id, list(a.target_ids)) == (b.node_id, list(b.target_ids))
    for i in range(2):
        await mgmtd.register_node(mgmtd_pb2.RegisterNodeRequest(
            header=hdr(), type=NODE_STORAGE, address=f"127.0.0.1:{9501 + i}",
            targets=[mgmtd_pb2.TargetSpec(data_path="/a")]))
    creq = mgmtd_pb2.CreateChainsRequest(header=hdr(request_uuid=b"u2" * 8), replication=3)
    c1 = await mgmtd.create_chains(creq)
    c2 = await mgmtd.create_chains(creq)
    assert c1.status.code == c2.status.code == common_pb2.OK and c1.chains == c2.chains
    assert len(mgmtd.routing_info().chains) == 1


# ---- bad input ----------------------------------------------------------------------------------------

async def expect_error(coro, code, text):
    reply = await coro
    assert reply.status.code == code, (reply.status, text)
    assert text in reply.status.message, (reply.status.message, text)
    assert "\n" not in reply.status.message


async def test_bad_input_on_every_rpc(client, mgmtd, cluster):
    m = mgmtd
    R = mgmtd_pb2
    n1, n2 = list(cluster.nodes)[:2]
    t_other = cluster.nodes[n2][0]
    chain_id = cluster.created.chains[0].chain_id
    IA, NF = common_pb2.INVALID_ARGUMENT, common_pb2.NOT_FOUND
    reg = lambda **kw: m.register_node(R.RegisterNodeRequest(header=kw.pop("header", hdr()), **kw))
    await expect_error(reg(type=0, address="127.0.0.1:1"), IA, "not STORAGE, META or CLIENT")
    await expect_error(reg(type=NODE_STORAGE, address=""), IA, "is not HOST:PORT")
    await expect_error(reg(type=NODE_STORAGE, address="localhost"), IA, "is not HOST:PORT")
    await expect_error(reg(type=NODE_STORAGE, address="127.0.0.1:99999"), IA, "is not HOST:PORT")
    await expect_error(reg(type=NODE_META, address="127.0.0.1:1", targets=[R.TargetSpec(data_path="/x")]),
                       IA, "only storage nodes have targets")
    await expect_error(reg(type=NODE_STORAGE, address="127.0.0.1:1", targets=[R.TargetSpec()]),
                       IA, "needs a data path")
    await expect_error(reg(type=NODE_STORAGE, address="127.0.0.1:1",
                           targets=[R.TargetSpec(data_path="/x"), R.TargetSpec(data_path="/x")]), IA, "listed twice")
    await expect_error(reg(type=NODE_STORAGE, address="127.0.0.1:1",
                           targets=[R.TargetSpec(target_id=77, data_path="/x"),
                                    R.TargetSpec(target_id=77, data_path="/y")]), IA, "listed twice")
    await expect_error(reg(type=NODE_STORAGE, address="127.0.0.1:9100", node_id=n1,
                           targets=[R.TargetSpec(target_id=t_other, data_path="/x")]),
                       IA, f"target {t_other} belongs to node {n2}")
    await expect_error(reg(type=NODE_META, address="127.0.0.1:9100", node_id=n1), IA, "is registered as NODE_STORAGE")
    await expect_error(reg(type=NODE_STORAGE, address="127.0.0.1:9101"), IA, "in use by live node")
    await expect_error(reg(type=NODE_STORAGE, address="127.0.0.1:1", header=hdr(cluster_id="other")),
                       IA, "reached the mgmtd of cluster 'flyfs'")

    hb = lambda node, *targets: m.heartbeat(R.HeartbeatRequest(header=hdr(), node_id=node, targets=list(targets)))
    await expect_error(hb(4242), NF, "node 4242 is not registered")
    await expect_error(hb(n1, R.TargetHeartbeat(target_id=999, local_state=1)), NF, "target 999 is not registered to")
    await expect_error(hb(n1, R.TargetHeartbeat(target_id=t_other, local_state=1)), NF,
                       f"target {t_other} is not registered to node {n1}")
    await expect_error(hb(n1, R.TargetHeartbeat(target_id=cluster.nodes[n1][0], local_state=0)), IA,
                       "is not UPTODATE, ONLINE or OFFLINE")
    mine = cluster.nodes[n1][0]
    await expect_error(hb(n1, R.TargetHeartbeat(target_id=mine, local_state=1),
                          R.TargetHeartbeat(target_id=mine, local_state=1)), IA, "reported twice")

    await expect_error(m.get_routing_info(R.GetRoutingInfoRequest(header=hdr(cluster_id="x"))), IA, "cluster")

    cc = lambda **kw: m.create_chains(R.CreateChainsRequest(header=hdr(), **kw))
    await expect_error(cc(replication=0), IA, "at least 1")
    await expect_error(cc(replication=3), IA, "no free storage targets")
    await expect_error(cc(replication=2, target_ids=[999]), NF, "target 999 is not registered")
    await expect_error(cc(replication=2, target_ids=[mine]), IA, f"target {mine} is already in chain")
    # Replication larger than the nodes holding free targets.
    for i in range(2):
        await client.register_node(NODE_STORAGE, f"127.0.0.1:{9600 + i}", targets=[(0, "/a"), (0, "/b")])
    await expect_error(cc(replication=3), IA, "needs free targets on at least 3 storage nodes, have 2")
    await expect_error(cc(replication=9), IA, "at least 9 storage nodes")
    free = [t for t, ti in m._targets.items() if not ti.chain_id]
    await expect_error(cc(replication=2, target_ids=[free[0], free[0]]), IA, "listed twice")

    st = lambda **kw: m.set_chain_table(R.SetChainTableRequest(header=hdr(), **kw))
    await expect_error(st(table_id=0, chain_ids=[chain_id]), IA, "at least 1")
    await expect_error(st(table_id=2, chain_ids=[]), IA, "at least one chain")
    await expect_error(st(table_id=2, chain_ids=[12345]), NF, "chain 12345 does not exist")
    await expect_error(st(table_id=2, chain_ids=[chain_id, chain_id]), IA, "listed twice")

    gt = lambda **kw: m.get_chain_table(R.GetChainTableRequest(header=hdr(), **kw))
    await expect_error(gt(table_id=7), NF, "chain table 7 does not exist")
    await expect_error(gt(table_id=1, version=9), NF, "has no version 9 (latest is 1)")

    await expect_error(m.offline_target(R.OfflineTargetRequest(header=hdr(), target_id=999)), NF,
                       "target 999 is not registered")
    await expect_error(m.list_chains(R.ListChainsRequest(header=hdr(), table_id=7)), NF, "chain table 7")
    await expect_error(m.list_nodes(R.ListNodesRequest(header=hdr(), type=42)), IA, "node type 42")
    await expect_error(m.list_nodes(R.ListNodesRequest(header=hdr(cluster_id="x"))), IA, "cluster")

    # Through gRPC and the client: a clear exception, and the server keeps serving.
    with pytest.raises(MgmtdError, match="node 4242 is not registered") as e:
        await client.heartbeat(4242)
    assert e.value.code == NF
    with pytest.raises(MgmtdError, match="replication factor must be at least 1"):
        await client.create_chains(0)
    info = await client.get_routing_info(force=True)
    assert len(info.chains) == 2 and len(info.nodes) == 5
    assert (await client.get_chain_table(1)).version == 1


# ---- leases: several mgmtd on one KV --------------------------------------------------------------

async def wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("engine_url", ["memory", "etcd"], indirect=True)
async def test_lease_takeover(engine_url):
    kv = engine_url
    ms = {name: Mgmtd(kv, "127.0.0.1:0", heartbeat_timeout=TIMEOUT, lease_s=0.8, mgmtd_id=name)
          for name in "abc"}
    started = []
    client = None
    try:
        for m in ms.values():
            await m.start()
            started.append(m)
        a = ms["a"]
        assert a.is_primary and not ms["b"].is_primary and not ms["c"].is_primary
        # A standby answers NOT_PRIMARY with the primary's address.
        r = await ms["b"].list_nodes(mgmtd_pb2.ListNodesRequest(header=hdr()))
        assert r.status.code == NOT_PRIMARY and r.primary_address == a.address
        # A client that knows only the standbys follows them to the primary.
        client = MgmtdClient([ms["b"].address, ms["c"].address], retry_timeout=20.0)
        ids = {}
        for i in range(3):
            r = await client.register_node(NODE_STORAGE, f"127.0.0.1:{9700 + i}", targets=[(0, "/t")])
            ids[r.node_id] = r.target_ids[0]
        assert client.address == a.address
        await client.create_chains(3, table_id=1)
        before = await client.get_routing_info(force=True)

        # The primary dies without handing back its lease: a standby takes over once it expires.
        await a.stop(release=False)
        started.remove(a)
        await wait_for(lambda: ms["b"].is_primary or ms["c"].is_primary, what="a standby to take over")
        new = ms["b"] if ms["b"].is_primary else ms["c"]
        last = ms["c"] if new is ms["b"] else ms["b"]
        info = await client.get_routing_info(force=True)  # the client fails over
        assert client.address == new.address
        assert info.version > before.version
        assert info.chains == before.chains and info.tables == before.tables
        assert sorted(info.nodes) == sorted(ids)
        # Nodes get a full heartbeat timeout of grace from the new primary.
        assert all(n.alive for n in info.nodes.values())
        node, target = next(iter(ids.items()))
        hb = await client.heartbeat(node, [(target, UP, 1)])
        assert hb.routing_version == info.version

        # A graceful stop hands the lease over without waiting for it to expire.
        t0 = time.monotonic()
        await new.stop()
        started.remove(new)
        await wait_for(lambda: last.is_primary, what="the last standby to take over")
        assert time.monotonic() - t0 < 5.0
        listed = await client.list_chains(table_id=1)
        assert client.address == last.address
        assert [c.chain_id for c in listed.chains] == list(info.table(1))
        assert sorted(n.node_id for n in await client.list_nodes()) == sorted(ids)
    finally:
        if client:
            await client.close()
        for m in started:
            await m.stop()


async def test_a_primary_that_lost_its_lease_stops_writing(mgmtd):
    # Someone else grabs the lease (e.g. we were paused longer than it lasts).
    async def steal(txn):
        txn.set(K_LEASE, json.dumps({"holder": "thief", "address": "127.0.0.1:1",
                                     "expires_ms": int(time.time() * 1000) + 60_000}).encode())
    await mgmtd._engine.transact(steal)
    r = await mgmtd.register_node(mgmtd_pb2.RegisterNodeRequest(header=hdr(), type=NODE_STORAGE,
                                                                address="127.0.0.1:9800"))
    assert r.status.code == NOT_PRIMARY and "lost the primary lease" in r.status.message
    assert r.primary_address == "127.0.0.1:1"
    assert not mgmtd.is_primary
    r = await mgmtd.list_nodes(mgmtd_pb2.ListNodesRequest(header=hdr()))
    assert r.status.code == NOT_PRIMARY


async def test_client_without_a_reachable_primary_gives_up_clearly():
    c = MgmtdClient("127.0.0.1:1", timeout=0.5, retry_timeout=1.0)
    try:
        with pytest.raises(MgmtdUnavailable, match="no primary mgmtd answered ListNodes"):
            await c.list_nodes()
    finally:
        await c.close()


async def test_a_taken_port_is_a_clear_error():
    a = Mgmtd(kv_name(), "127.0.0.1:0")
    await a.start()
    try:
        b = Mgmtd(kv_name(), a.address)
        with pytest.raises(OSError, match=f"cannot listen on {a.address}"):
            await b.start()
        assert b._engine is None  # nothing left open
    finally:
        await a.stop()


async def test_client_nodes_need_no_address(client):
    r = await client.register_node(NODE_CLIENT, "")
    assert r.node_id >= 1
    assert [n.node_id for n in await client.list_nodes(NODE_CLIENT)] == [r.node_id]


async def test_restart_on_rocksdb_keeps_the_cluster(tmp_path):
    """A restarted mgmtd (same id, persistent KV) serves at once with the same chains."""
    url = f"rocksdb://{tmp_path}/mgmtd"
    m = Mgmtd(url, "127.0.0.1:0", mgmtd_id="m0", lease_s=30.0)
    await m.start()
    try:
        async with MgmtdClient(m.address) as c:
            for i in range(3):
                await c.register_node(NODE_STORAGE, f"127.0.0.1:{9950 + i}", targets=[(0, "/a"), (0, "/b")])
            await c.create_chains(3, table_id=1)
            before = await c.get_routing_info()
    finally:
        await m.stop(release=False)  # as after a crash: the lease is still in the KV
    m = Mgmtd(url, "127.0.0.1:0", mgmtd_id="m0", lease_s=30.0)
    await m.start()
    try:
        assert m.is_primary  # its own lease: no waiting for it to expire
        async with MgmtdClient(m.address) as c:
            after = await c.get_routing_info()
            assert after.chains == before.chains and after.tables == before.tables
            assert after.version > before.version and sorted(after.nodes) == sorted(before.nodes)
            r = await c.register_node(NODE_META, "127.0.0.1:9960")
            assert r.node_id == max(before.nodes) + 1  # id counters survived too
    finally:
        await m.stop()


async def test_cluster_id_is_checked_at_start():
    kv = kv_name()
    a = Mgmtd(kv, "127.0.0.1:0", cluster_id="one")
    await a.start()
    await a.stop()
    b = Mgmtd(kv, "127.0.0.1:0", cluster_id="two")
    with pytest.raises(MgmtdError, match="the KV holds cluster 'one', not 'two'"):
        await b.start()


# ---- command line -------------------------------------------------------------------------------------

def test_main_rejects_a_bad_listen_address(capsys):
    assert main(["--kv", "memory://", "--listen", "nowhere"]) == 2
    assert "--listen 'nowhere' is not HOST:PORT" in capsys.readouterr().err


async def test_main_serves_until_sigterm(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from flyfs.cluster.mgmtd import main; sys.exit(main(sys.argv[1:]))",
        "--kv", "memory://", "--listen", "127.0.0.1:0", "--log-level", "WARNING",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.getcwd())
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"mgmtd listening on 127.0.0.1:"), line
        address = line.split()[-1].decode()
        async with MgmtdClient(address) as c:
            r = await c.register_node(NODE_META, "127.0.0.1:9900")
            assert r.node_id >= 1 and r.cluster_id == "flyfs"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
