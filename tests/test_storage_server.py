"""The storage daemon and its client, in process: replication, reads from every
replica, dedup, routing checks, bad input, corruption, lease, resync."""
import asyncio
import glob
import os
import random
import socket

import pytest

from cluster_fixtures import StorageCluster, assert_replicas_equal
from crc32c import crc32c

from flyfs import net
from flyfs.client.storage_client import LastChunk, ReadPiece, StorageClientError
from flyfs.cluster.chain_state import head, readable_targets
from flyfs.metaserver.schema import Layout
from flyfs.proto import common_pb2 as SC
from flyfs.proto import storage_pb2 as S
from flyfs.storage import craq
from flyfs.storage.meta_ops import ChunkStorageOps

MiB = 1 << 20
CS = 1 * MiB


@pytest.fixture
async def cluster(tmp_path):
    """3 nodes x 2 targets, 2 chains of 3."""
    async with StorageCluster(tmp_path, nodes=3, targets_per_node=2, replication=3) as c:
        yield c


async def call(addr, method, msg, payload=(), reply_cls=S.StorageReplyStatus, pool=None):
    own = pool is None
    pool = pool or net.ConnectionPool()
    try:
        rep = await pool.call(addr, method, msg.SerializeToString() if hasattr(msg, "SerializeToString")
                              else msg, payload, timeout=20)
        return reply_cls.FromString(rep.header), rep
    finally:
        if own:
            await pool.close()


def update(chain, inode, index, data=b"", offset=0, *, utype=S.UPDATE_WRITE, seq=0, client="t",
           chunk_size=CS, version=None, length=None):
    return S.UpdateRequest(header=SC.RequestHeader(client_id=client), chain_id=chain.chain_id,
                           chain_version=chain.version if version is None else version,
                           chunk=S.ChunkId(inode=inode, index=index), type=utype, offset=offset,
                           length=len(data) if length is None else length, chunk_size=chunk_size,
                           crc32c=crc32c(data), seq=seq)


# --------------------------------------------------------------------------- replication

async def test_replication_64mib_every_replica_identical(cluster):
    sc = cluster.client()
    info = await cluster.routing()
    chains = [info.chains[c] for c in info.table(1)]
    assert len(chains) == 2 and all(len(c.targets) == 3 for c in chains)
    rng = random.Random(1)
    blob = os.urandom(64 * MiB)
    written = {}   # (chain, inode, index) -> bytes
    jobs = []
    for k in range(64):
        chain = chains[k % 2]
        size = CS if k % 5 else rng.randrange(1, CS)     # some short chunks
        data = memoryview(blob)[k * MiB:k * MiB + size]
        written[(chain.chain_id, 42, k)] = data
        jobs.append(sc.write(chain.chain_id, 42, k, 0, data, chunk_size=CS))
    sem = asyncio.Semaphore(8)

    async def limited(j):
        async with sem:
            return await j

    results = await asyncio.gather(*(limited(j) for j in jobs))
    assert all(r.commit_version == 1 for r in results)
    # Every chunk from the head, the middle and the tail separately.
    for chain in chains:
        for t in chain.target_ids:
            for (cid, inode, index), data in written.items():
                if cid != chain.chain_id:
                    continue
                r, got = await sc.read_target(t, ReadPiece(cid, inode, index, 0, CS))
                assert r.status.code == SC.OK, (t, index, r.status.message)
                assert r.length == len(data) and got == data, f"target {t} chunk {index} differs"
        await assert_replicas_equal(sc, chain)
    # And through the client's batch read, many pieces in one call.
    bufs = {k: bytearray(CS) for k in written}
    counts = await sc.batch_read([ReadPiece(c, i, x, 0, CS, bufs[(c, i, x)]) for (c, i, x) in written])
    for (k, data), n in zip(written.items(), counts):
        assert n == len(data) and bufs[k][:n] == data and not any(bufs[k][n:])


async def test_flush_syncs_every_replica_of_the_chains(tmp_path):
    """Updates are acknowledged unsynced; a flush (a file's fsync) syncs them on every
    replica of the chains named, and only those."""
    from flyfs.storage.server import StorageConfig
    cfg = StorageConfig(update_retry=15.0, forward_timeout=20.0, flush_interval=0)
    async with StorageCluster(tmp_path, nodes=3, targets_per_node=2, replication=3, config=cfg) as c:
        sc = c.client()
        info = await c.routing()
        chains = [info.chains[x] for x in info.table(1)]
        assert len(chains) == 2
        for i in range(4):
            await sc.write(chains[0].chain_id, 77, i, 0, os.urandom(100_000), chunk_size=CS)
        await sc.write(chains[1].chain_id, 78, 0, 0, b"other chain", chunk_size=CS)

        def dirty_targets(chain):
            tids = {t for t, _ in chain.targets}
            return [t for n in c.nodes for tid, t in n.server.targets.items()
                    if tid in tids and t.engine.sync.dirty]

        assert len(dirty_targets(chains[0])) == 3 and len(dirty_targets(chains[1])) == 3
        assert await sc.flush([chains[0].chain_id]) == 3 * 4     # 4 chunk files on each of 3 replicas
        assert dirty_targets(chains[0]) == [] and len(dirty_targets(chains[1])) == 3
        assert await sc.flush([chains[0].chain_id]) == 0
        reply, _ = await call(c.nodes[0].address, S.STORAGE_FLUSH, S.FlushRequest(), reply_cls=S.FlushReply)
        # empty list: every target; "other chain" is an inline chunk (no file: its bytes
        # are synced with the target's metadata log), yet the target was dirty and is not now
        assert reply.status.code == SC.OK and reply.files_synced == 0 and reply.targets_flushed == 1
        assert len(dirty_targets(chains[1])) == 2
        assert await sc.flush([chains[1].chain_id]) == 0
        assert dirty_targets(chains[1]) == []


async def test_a_full_disk_refuses_writes_at_once_and_removals_free_it(tmp_path):
    """Below the reserve a target refuses writes with NO_SPACE (ENOSPC to a file's
    writer), at once rather than after retries; reads, truncates and removals go on;
    an ENOSPC from the disk itself is reported the same way."""
    import errno
    import time

    from flyfs.client.io import storage_error
    from flyfs.storage.server import StorageConfig
    cfg = StorageConfig(update_retry=15.0, forward_timeout=20.0)
    async with StorageCluster(tmp_path, nodes=3, targets_per_node=1, replication=3, config=cfg) as c:
        sc = c.client()
        chain = (await c.chains())[0]
        await sc.write(chain.chain_id, 90, 0, 0, b"kept" * 1000, chunk_size=CS)
        await sc.write(chain.chain_id, 90, 1, 0, b"more" * 1000, chunk_size=CS)
        free = os.statvfs(str(tmp_path)).f_bavail * os.statvfs(str(tmp_path)).f_frsize
        for n in c.nodes:
            n.server.config.reserve_bytes = free + (1 << 40)      # as if the disks were full
        started = time.monotonic()
        with pytest.raises(StorageClientError) as ei:
            await sc.write(chain.chain_id, 90, 2, 0, b"x" * 5000, chunk_size=CS)
        assert ei.value.code == SC.NO_SPACE and "no space left" in str(ei.value)
        assert time.monotonic() - started < 5
        err = storage_error(ei.value, "write of /f")
        assert err.errno == errno.ENOSPC
        assert bytes((await sc.read(chain.chain_id, 90, 0, 0, 4000))) == b"kept" * 1000
        await sc.truncate_chunk(chain.chain_id, 90, 1, 8, chunk_size=CS)   # shrinking still works
        assert await sc.remove_chunks(chain.chain_id, 90) == 2             # and so do removals
        for n in c.nodes:
            n.server.config.reserve_bytes = 0
        await sc.write(chain.chain_id, 91, 0, 0, b"room again", chunk_size=CS)

        # The disk itself full: the engine's ENOSPC becomes NO_SPACE, not an internal error.
        head_t = head((await c.routing()).chains[chain.chain_id])
        target = next(t for n in c.nodes for tid, t in n.server.targets.items() if tid == head_t)

        async def full(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")
        target.engine.call = full
        try:
            with pytest.raises(StorageClientError) as ei:
                await sc.write(chain.chain_id, 92, 0, 0, b"y" * 100, chunk_size=CS)
            assert ei.value.code == SC.NO_SPACE
        finally:
            del target.engine.call


async def test_overwrites_truncate_remove_and_query(cluster):
    sc = cluster.client()
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    c = chain.chain_id
    model = bytearray()
    rng = random.Random(3)
    for i in range(40):
        if i % 7 == 6:
            n = rng.randrange(0, 20000)
            r = await sc.truncate_chunk(c, 9, 0, n, chunk_size=CS)
            craq.apply_delta(model, "truncate", 0, n)
        else:
            off = rng.randrange(0, 30000)
            data = os.urandom(rng.randrange(1, 5000))
            r = await sc.write(c, 9, 0, off, data, chunk_size=CS)
            craq.apply_delta(model, "write", off, len(data), data)
        assert r.length == len(model) and r.commit_version == i + 1
    assert await sc.read(c, 9, 0, 0, CS) == bytes(model)
    # Pieces: inside, across the end, beyond the end.
    buf = bytearray(b"\xff" * 300)
    n = await sc.read(c, 9, 0, len(model) - 100, 300, into=buf)
    assert n == 100 and buf[:100] == model[-100:] and buf[100:] == bytes(200)
    for idx in (1, 2, 5):
        await sc.write(c, 9, idx, 0, b"x" * (idx * 10), chunk_size=CS)
    assert await sc.query_last_chunk(c, 9) == LastChunk(5, 50)
    assert await sc.query_last_chunk(c, 12345) is None
    # A missing chunk reads as a hole; truncating one creates nothing.
    assert await sc.read(c, 9, 3, 0, 10) == b""
    r = await sc.truncate_chunk(c, 9, 3, 100, chunk_size=CS)
    assert r.commit_version == 0 and await sc.read(c, 9, 3, 0, 10) == b""
    assert await sc.remove_chunks(c, 9, begin=2) == 2
    assert (await sc.query_last_chunk(c, 9)).index == 1
    assert await sc.remove_chunks(c, 9) == 2
    assert await sc.remove_chunks(c, 9) == 0
    assert await sc.query_last_chunk(c, 9) is None
    # A removed chunk starts over at version 1, on every replica.
    r = await sc.write(c, 9, 0, 0, b"again", chunk_size=CS)
    assert r.commit_version == 1 and await sc.read(c, 9, 0, 0, 10) == b"again"
    metas = await assert_replicas_equal(sc, chain)
    assert metas == {(9, 0): (1, 5, crc32c(b"again"))}


async def test_concurrent_writes_to_one_chunk(cluster):
    sc = cluster.client()
    info = await cluster.routing()
    chain = info.chains[info.table(1)[1]]
    parts = [os.urandom(4096) for _ in range(32)]
    res = await asyncio.gather(*(sc.write(chain.chain_id, 5, 0, i * 4096, p, chunk_size=CS)
                                 for i, p in enumerate(parts)))
    assert sorted(r.commit_version for r in res) == list(range(1, 33))
    assert await sc.read(chain.chain_id, 5, 0, 0, CS) == b"".join(parts)
    await assert_replicas_equal(sc, chain)


async def test_meta_ops_over_real_storage(cluster):
    sc = cluster.client()
    info = await cluster.routing()
    chains = tuple(info.table(1))
    layout = Layout(chunk_size=64 * 1024, stripe=2, chain_table_version=1, seed=1, chains=chains)
    ops = ChunkStorageOps(sc)
    data = os.urandom(5 * 64 * 1024 + 1000)          # chunks 0..5, the last one short
    cs = layout.chunk_size
    for i in range(0, len(data), cs):
        await sc.write(layout.chain_of(i // cs), 77, i // cs, 0, data[i:i + cs], chunk_size=cs)
    assert await ops.query_last_chunk(77, layout) == len(data)
    await ops.truncate(77, layout, 2 * cs + 10)
    assert await ops.query_last_chunk(77, layout) == 2 * cs + 10
    assert await sc.read(layout.chain_of(2), 77, 2, 0, cs) == data[2 * cs:2 * cs + 10]
    for index in (3, 4, 5):
        assert await sc.read(layout.chain_of(index), 77, index, 0, cs) == b""
    await ops.truncate(77, layout, 2 * cs + 10)      # idempotent
    await ops.truncate(77, layout, cs)               # exactly at a chunk boundary: chunk 1 goes
    assert await ops.query_last_chunk(77, layout) == cs
    assert await ops.remove_chunks(77, layout) == 1
    assert await ops.remove_chunks(77, layout) == 0
    assert await ops.query_last_chunk(77, layout) == 0


# --------------------------------------------------------------------------- CRAQ rules

async def test_only_the_head_takes_client_writes(cluster):
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    for t in chain.target_ids[1:]:
        reply, _ = await call(info.address_of(t), S.STORAGE_UPDATE, update(chain, 1, 0, b"abc"),
                              (b"abc",), S.UpdateReply)
        assert reply.status.code == SC.NOT_HEAD and reply.head_target == chain.target_ids[0]
        assert "not the head" in reply.status.message
    reply, _ = await call(info.address_of(chain.target_ids[0]), S.STORAGE_UPDATE,
                          update(chain, 1, 0, b"abc"), (b"abc",), S.UpdateReply)
    assert reply.status.code == SC.OK and reply.commit_version == 1


async def test_retried_write_applies_once(cluster):
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    addr = info.address_of(head(chain))
    a = update(chain, 2, 0, b"A" * 100, seq=1, client="retry-client")
    b = update(chain, 2, 0, b"B" * 50, seq=2, client="retry-client")
    r1, _ = await call(addr, S.STORAGE_UPDATE, a, (b"A" * 100,), S.UpdateReply)
    r2, _ = await call(addr, S.STORAGE_UPDATE, b, (b"B" * 50,), S.UpdateReply)
    # The retry of the first write (after "a timeout") answers its first result and changes nothing.
    r3, _ = await call(addr, S.STORAGE_UPDATE, a, (b"A" * 100,), S.UpdateReply)
    assert (r1.commit_version, r2.commit_version, r3.commit_version) == (1, 2, 1)
    sc = cluster.client()
    assert await sc.read(chain.chain_id, 2, 0, 0, 200) == b"B" * 50 + b"A" * 50
    # Concurrent duplicates while the first is in flight: one application.
    c = update(chain, 2, 1, b"C" * 10, seq=3, client="retry-client")
    pool = net.ConnectionPool()
    try:
        rs = await asyncio.gather(*(call(addr, S.STORAGE_UPDATE, c, (b"C" * 10,), S.UpdateReply, pool)
                                    for _ in range(5)))
    finally:
        await pool.close()
    assert {r.commit_version for r, _ in rs} == {1}
    metas = await assert_replicas_equal(sc, chain)
    assert metas[(2, 1)][0] == 1 and metas[(2, 0)][0] == 2
    # The dedup record is on every replica, so a new head after a failover knows it too.
    for t in chain.target_ids:
        node = cluster.nodes[cluster.node_of_target(t, info)].server
        assert node.targets[t].dedup.get(("retry-client", 1)).result == (1, 100)


async def test_stale_and_future_chain_versions(cluster):
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    addr = info.address_of(head(chain))
    for v in (chain.version - 1, 0, chain.version + 5):
        reply, _ = await call(addr, S.STORAGE_UPDATE, update(chain, 3, 0, b"x", version=v), (b"x",),
                              S.UpdateReply)
        assert reply.status.code == SC.STALE_ROUTING, v
        req = S.BatchReadRequest(pieces=[S.ReadPiece(chain_id=chain.chain_id, chain_version=v,
                                                     chunk=S.ChunkId(inode=3, index=0), length=10)])
        reply, rep = await call(addr, S.STORAGE_BATCH_READ, req, (), S.BatchReadReply)
        assert reply.results[0].status.code == SC.STALE_ROUTING and rep.payload_len == 10
    # The client refreshes and goes on.
    sc = cluster.client()
    assert (await sc.write(chain.chain_id, 3, 0, 0, b"ok", chunk_size=CS)).commit_version == 1


async def test_bad_input_on_every_rpc_gets_a_clear_error(cluster):
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    h = head(chain)
    addr = info.address_of(h)
    big = 64 * MiB   # the engine's default chunk size limit
    cases = [
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"abc", offset=CS - 1), (b"abc",), S.UpdateReply,
         SC.INVALID_ARGUMENT, "beyond the chunk size"),
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"abc", length=5), (b"abc",), S.UpdateReply,
         SC.INVALID_ARGUMENT, "payload"),
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"abc", chunk_size=big * 2), (b"abc",), S.UpdateReply,
         SC.INVALID_ARGUMENT, "chunk size"),
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"abc", chunk_size=0), (b"abc",), S.UpdateReply,
         SC.INVALID_ARGUMENT, "chunk size"),
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"abc"), (b"abd",), S.UpdateReply,
         SC.CHECKSUM_MISMATCH, "crc32c"),
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"", utype=S.UPDATE_TRUNCATE, length=CS + 1), (),
         S.UpdateReply, SC.INVALID_ARGUMENT, "truncate"),
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"", utype=99), (), S.UpdateReply,
         SC.INVALID_ARGUMENT, "update type"),
        (S.STORAGE_UPDATE, S.UpdateRequest(chain_id=chain.chain_id, chain_version=chain.version,
                                           type=S.UPDATE_WRITE), (), S.UpdateReply,
         SC.INVALID_ARGUMENT, "chunk id"),
        (S.STORAGE_UPDATE, update(chain, 1, 0, b"", utype=S.UPDATE_REMOVE), (b"junk",), S.UpdateReply,
         SC.INVALID_ARGUMENT, "payload"),
        (S.STORAGE_UPDATE, S.UpdateRequest(chain_id=987654, chain_version=1, type=S.UPDATE_WRITE,
                                           chunk=S.ChunkId(inode=1)), (), S.UpdateReply,
         SC.STALE_ROUTING, "chain 987654"),
        (S.STORAGE_FORWARD, update(chain, 1, 0, b"abc"), (b"abc",), S.UpdateReply,
         SC.STALE_ROUTING, ""),
        (S.STORAGE_BATCH_READ, S.BatchReadRequest(pieces=[S.ReadPiece(chain_id=chain.chain_id,
                                                  chain_version=chain.version) for _ in range(5000)]),
         (), S.BatchReadReply, SC.INVALID_ARGUMENT, "pieces"),
        (S.STORAGE_BATCH_READ, S.BatchReadRequest(pieces=[S.ReadPiece(chain_id=chain.chain_id,
                                                  chain_version=chain.version, length=40 * MiB)
                                                  for _ in range(2)]),
         (), S.BatchReadReply, SC.INVALID_ARGUMENT, "reply limit"),
        (S.STORAGE_REMOVE_CHUNKS, S.RemoveChunksRequest(chain_id=chain.chain_id, chain_version=chain.version,
                                                        inode=1), (b"x",), S.RemoveChunksReply,
         SC.INVALID_ARGUMENT, "payload"),
        (S.STORAGE_QUERY_LAST_CHUNK, S.QueryLastChunkRequest(chain_id=chain.chain_id,
                                                             chain_version=chain.version - 1, inode=1),
         (), S.QueryLastChunkReply, SC.STALE_ROUTING, "stale"),
        (S.STORAGE_DUMP_CHUNK_META, S.DumpChunkMetaRequest(target_id=424242), (), S.DumpChunkMetaReply,
         SC.NOT_FOUND, "424242"),
        (S.STORAGE_SYNC_INSTALL, S.SyncInstallRequest(chain_id=chain.chain_id, chain_version=chain.version,
                                                      target_id=h), (), S.SyncInstallReply,
         SC.STALE_ROUTING, "not SYNCING"),
        (S.STORAGE_SYNC_REMOVE, S.SyncRemoveRequest(chain_id=chain.chain_id, chain_version=chain.version,
                                                    target_id=h), (), S.SyncRemoveReply,
         SC.STALE_ROUTING, "not SYNCING"),
        (S.STORAGE_SYNC_DONE, S.SyncDoneRequest(chain_id=chain.chain_id, chain_version=chain.version,
                                                target_id=h), (), S.SyncDoneReply,
         SC.STALE_ROUTING, "not SYNCING"),
        (777, b"", (), S.StorageReplyStatus, SC.INVALID_ARGUMENT, "unknown storage method"),
        (S.STORAGE_UPDATE, b"\xff\xff\xff\xff garbage", (), S.UpdateReply, SC.INVALID_ARGUMENT,
         "malformed"),
        (S.STORAGE_BATCH_READ, b"\x0a\x05\x08", (), S.BatchReadReply, SC.INVALID_ARGUMENT, "malformed"),
    ]
    pool = net.ConnectionPool()
    try:
        for method, msg, payload, cls, code, text in cases:
            reply, _ = await call(addr, method, msg, payload, cls, pool)
            assert reply.status.code == code, (method, reply.status.message)
            assert text in reply.status.message, (text, reply.status.message)
            assert "\n" not in reply.status.message
        # Per-piece errors in a batch: one bad piece does not spoil the others.
        sc = cluster.client()
        await sc.write(chain.chain_id, 1, 0, 0, b"hello", chunk_size=CS)
        req = S.BatchReadRequest(pieces=[
            S.ReadPiece(chain_id=chain.chain_id, chain_version=chain.version, chunk=S.ChunkId(inode=1),
                        length=5),
            S.ReadPiece(chain_id=chain.chain_id, chain_version=chain.version, chunk=S.ChunkId(inode=1),
                        offset=big, length=5),
            S.ReadPiece(chain_id=chain.chain_id, chain_version=chain.version,
                        chunk=S.ChunkId(inode=1, index=7), length=5),
            S.ReadPiece(chain_id=chain.chain_id, chain_version=chain.version, chunk=S.ChunkId(inode=1),
                        offset=3, length=5)])
        reply, rep = await call(addr, S.STORAGE_BATCH_READ, req, (), S.BatchReadReply, pool)
        codes = [r.status.code for r in reply.results]
        assert codes == [SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.OK]
        assert bytes(rep.payload) == b"hello" + bytes(10) + b"lo\0\0\0"
        with pytest.raises(StorageClientError) as e:
            await sc.read(chain.chain_id, 1, 0, big, 5)
        assert e.value.code == SC.INVALID_ARGUMENT
    finally:
        await pool.close()
    await _garbage_frames(addr)
    # Still serving, on a fresh connection too.
    sc = cluster.client()
    assert await sc.read(chain.chain_id, 1, 0, 0, 5) == b"hello"


async def _garbage_frames(addr):
    """Raw garbage, an oversized frame and a truncated frame: each connection is dropped alone."""
    host, port = addr.rsplit(":", 1)

    def send(data: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    from flyfs.net.frame import HEADER, MAGIC, VERSION
    assert await asyncio.to_thread(send, os.urandom(4096)) == b""
    huge = HEADER.pack(MAGIC, VERSION, 0, S.STORAGE_UPDATE, 1, 10, 1 << 40)
    assert await asyncio.to_thread(send, huge + b"0123456789") == b""
    truncated = HEADER.pack(MAGIC, VERSION, 0, S.STORAGE_UPDATE, 1, 100, 0) + b"short"
    assert await asyncio.to_thread(send, truncated) == b""


# --------------------------------------------------------------------------- corruption

def _chunk_files(target_dir, inode, index):
    cid = craq.chunk_id(inode, index).hex()
    return glob.glob(os.path.join(target_dir, "chunks", "*", f"{cid}.*"))


def _flip_byte(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))


async def _written_chunk(cluster, inode, index, size=300_000):
    """A client, the routing, chain table 1's first chain, and the random bytes written
    to chunk (inode, index) on it."""
    sc = cluster.client()
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    data = os.urandom(size)
    await sc.write(chain.chain_id, inode, index, 0, data, chunk_size=CS)
    return sc, info, chain, data


async def test_corrupted_replica_is_detected_and_read_around(cluster):
    sc, info, chain, data = await _written_chunk(cluster, 11, 4)
    c = chain.chain_id
    readers = readable_targets(chain)
    first = craq.read_order(readers, 11 * 7919 + 4)[0]      # the replica the client tries first

    def target_dir(t):
        node = cluster.nodes[cluster.node_of_target(t, info)].server
        return node.targets[t].path

    def flip(t, pos):
        (path,) = _chunk_files(target_dir(t), 11, 4)
        _flip_byte(path, pos)

    flip(first, 123_456)
    r, _ = await sc.read_target(first, ReadPiece(c, 11, 4, 0, len(data)))
    assert r.status.code == SC.CHECKSUM_MISMATCH and "checksum" in r.status.message
    # A read not touching the damaged block is still served by that replica.
    r, got = await sc.read_target(first, ReadPiece(c, 11, 4, 0, 1000))
    assert r.status.code == SC.OK and got == data[:1000]
    # The client gets the right bytes from another replica.
    assert await sc.read(c, 11, 4, 0, len(data)) == data
    # Every replica damaged: a clear error, never wrong data.
    for t in chain.target_ids:
        if t != first:
            flip(t, 200_000)
    with pytest.raises(StorageClientError) as e:
        await sc.read(c, 11, 4, 0, len(data))
    assert e.value.code == SC.CHECKSUM_MISMATCH and "every replica" in e.value.message
    # A write over the whole chunk replaces the damaged data everywhere.
    await sc.write(c, 11, 4, 0, data, chunk_size=CS)
    await sc.truncate_chunk(c, 11, 4, len(data), chunk_size=CS)
    for t in chain.target_ids:
        r, got = await sc.read_target(t, ReadPiece(c, 11, 4, 0, len(data)))
        assert r.status.code == SC.OK and got == data


# --------------------------------------------------------------------------- lease, failover, resync

async def test_isolated_head_stops_taking_writes_and_the_chain_moves_on(cluster):
    sc = cluster.client(retry_timeout=30)
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    c = chain.chain_id
    await sc.write(c, 21, 0, 0, b"before", chunk_size=CS)
    h = head(chain)
    node = cluster.nodes[cluster.node_of_target(h, info)].server

    async def no_heartbeat(*a, **kw):
        raise ConnectionError("cut off from mgmtd (test)")

    node.mgmtd.heartbeat = no_heartbeat
    lease_s = node.lease.lease_s
    await asyncio.sleep(lease_s / 2 + 0.2)
    assert not node.lease.valid()
    # The isolated node refuses writes even for a client with its old routing.
    reply, _ = await call(node.address, S.STORAGE_UPDATE, update(chain, 21, 0, b"x"), (b"x",), S.UpdateReply)
    assert reply.status.code in (SC.NOT_SERVING, SC.STALE_ROUTING), reply.status.message
    # mgmtd declares it dead, a new head takes the writes.
    after = await cluster.wait_until(lambda i: head(i.chains[c]) not in (None, h), 30, "a new head")
    assert h not in readable_targets(after.chains[c])
    r = await sc.write(c, 21, 0, 0, b"after!", chunk_size=CS)
    assert r.commit_version == 2
    assert await sc.read(c, 21, 0, 0, 10) == b"after!"


async def test_restarted_node_resyncs_and_serves(cluster):
    sc = cluster.client()
    info = await cluster.routing()
    chains = [info.chains[c] for c in info.table(1)]
    victim = 1
    vt = cluster.targets_of(victim, info)
    # Data before: some to be overwritten, truncated, removed while the node is away.
    for ch in chains:
        for i in range(6):
            await sc.write(ch.chain_id, 30, i, 0, os.urandom(20_000), chunk_size=CS)
    await cluster.stop_node(victim)
    gone = await cluster.wait_until(
        lambda i: all(t not in readable_targets(i.chains[ch.chain_id]) for ch in chains for t in vt),
        30, "victim out of its chains")
    for ch in chains:
        c = ch.chain_id
        await sc.write(c, 30, 0, 100, b"overwritten", chunk_size=CS)
        await sc.truncate_chunk(c, 30, 1, 77, chunk_size=CS)
        await sc.remove_chunks(c, 30, begin=2, end=4)
        await sc.write(c, 31, 0, 0, b"new chunk while away", chunk_size=CS)
    await cluster.restart(victim)
    # Writes go on during the resync.
    writer_done = asyncio.Event()

    async def writer():
        k = 0
        while not writer_done.is_set():
            for ch in chains:
                await sc.write(ch.chain_id, 32, k % 8, 0, os.urandom(5000), chunk_size=CS)
            k += 1

    wt = asyncio.create_task(writer())
    try:
        info = await cluster.wait_all_serving(60)
    finally:
        writer_done.set()
        await wt
    for ch in chains:
        chain = info.chains[ch.chain_id]
        assert set(chain.target_ids) == set(ch.target_ids)
        metas = await assert_replicas_equal(sc, chain)
        assert (30, 2) not in metas and (30, 3) not in metas and metas[(30, 1)][1] == 77
        assert (31, 0) in metas
        for (inode, index) in metas:
            want = await sc.read(ch.chain_id, inode, index, 0, CS)
            for t in chain.target_ids:
                r, got = await sc.read_target(t, ReadPiece(ch.chain_id, inode, index, 0, CS))
                assert r.status.code == SC.OK and got == want
    assert gone is not None
    # The predecessors did resync the victim's targets (as SYNCING tails) before they served.
    synced = {key[1] for n in cluster.nodes if n.server for key in n.server._resync_done.values()}
    assert set(vt) <= synced


async def test_middle_failing_to_stage_commits_nothing_and_the_retry_converges(cluster):
    """A middle whose own write fails (in the one engine trip that looks up, decides and
    stages) commits nothing and forwards nothing; the head retries and the chain converges."""
    sc = cluster.client()
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    c = chain.chain_id
    h, mid, tail = chain.target_ids
    core = cluster.nodes[cluster.node_of_target(mid, info)].server.targets[mid].engine.sync
    first = b"A" * 5000
    await sc.write(c, 41, 0, 0, first, chunk_size=CS)
    failed = []

    def fail_once(point):
        if point == "prepare.synced" and not failed:
            failed.append(point)
            raise OSError(5, "injected write error")

    core._fault = fail_once
    try:
        r = await sc.write(c, 41, 0, 100, b"B" * 200, chunk_size=CS)
    finally:
        core._fault = None
    assert failed, "the fault never fired"
    model = bytearray(first)
    craq.apply_delta(model, "write", 100, 200, b"B" * 200)
    assert r.commit_version == 2 and r.length == len(model)
    metas = await assert_replicas_equal(sc, chain)
    assert metas[(41, 0)] == (2, len(model), crc32c(model))
    for t in chain.target_ids:
        got = await sc.read_target(t, ReadPiece(c, 41, 0, 0, CS))
        assert got[0].status.code == SC.OK and got[1] == model


async def test_lagging_stuck_and_ahead_replicas_are_repaired_by_full_chunks(cluster):
    """Replicas out of step (a missed update, a stuck pending version, a stale copy with a
    higher version) never take a delta on the wrong base: they get the full chunk."""
    from flyfs.storage.chunk_engine import ChunkMeta
    sc = cluster.client()
    info = await cluster.routing()
    chain = info.chains[info.table(1)[0]]
    c = chain.chain_id
    h, mid, tail = chain.target_ids

    def engine(t):
        return cluster.nodes[cluster.node_of_target(t, info)].server.targets[t].engine

    cid = craq.chunk_id(40, 0)
    model = bytearray(b"A" * 1000)
    await sc.write(c, 40, 0, 0, bytes(model), chunk_size=CS)
    # 1. The tail missed an update (its copy is gone).
    await engine(tail).remove([cid])
    await sc.write(c, 40, 0, 500, b"B" * 100, chunk_size=CS)
    craq.apply_delta(model, "write", 500, 100, b"B" * 100)
    metas = await assert_replicas_equal(sc, chain)
    assert metas[(40, 0)] == (2, 1000, crc32c(model))
    # 2. A pending version stuck on the head (a forward that gave up): dropped, number burned.
    await engine(h).prepare_write(cid, 0, b"junk", 3, chain.version)
    await sc.write(c, 40, 0, 0, b"C" * 10, chunk_size=CS)
    craq.apply_delta(model, "write", 0, 10, b"C" * 10)
    metas = await assert_replicas_equal(sc, chain)
    assert metas[(40, 0)] == (4, 1000, crc32c(model))
    # 3. A pending version on the middle: it answers "not committed", the client reads the tail.
    await engine(mid).prepare_write(cid, 0, b"pending!", 5, chain.version)
    r, _ = await sc.read_target(mid, ReadPiece(c, 40, 0, 0, 1000))
    assert r.status.code == SC.NOT_COMMITTED
    await engine(tail).prepare_write(cid, 0, b"pending!", 5, chain.version)
    r, got = await sc.read_target(tail, ReadPiece(c, 40, 0, 0, 1000))     # the tail's committed is the truth
    assert r.status.code == SC.OK and got == model
    assert await sc.read(c, 40, 0, 0, 1000) == model
    await sc.write(c, 40, 0, 990, b"D" * 20, chunk_size=CS)
    craq.apply_delta(model, "write", 990, 20, b"D" * 20)
    metas = await assert_replicas_equal(sc, chain)
    assert metas[(40, 0)] == (5, 1010, crc32c(model))
    # 4. A stale copy with a higher version on the tail: replaced by the chain's content.
    z = b"Z" * 50
    await engine(tail).install(cid, z, ChunkMeta(chunk_id=cid, commit_ver=9, update_ver=9, chain_ver=1,
                                                 length=50, crc=crc32c(z)))
    await sc.truncate_chunk(c, 40, 0, 700, chunk_size=CS)
    craq.apply_delta(model, "truncate", 0, 700)
    metas = await assert_replicas_equal(sc, chain)
    assert metas[(40, 0)] == (6, 700, crc32c(model))
    for t in chain.target_ids:
        r, got = await sc.read_target(t, ReadPiece(c, 40, 0, 0, 2000))
        assert r.status.code == SC.OK and got == model


async def test_small_cached_reads_are_answered_inline(cluster):
    """A batch read of one small piece whose bytes are in the page cache is answered on
    the daemon's loop with no task (StorageServer._inline, ChunkEngine.read_now); bytes
    not in memory go to the engine threads. Same answers either way: data, holes,
    checksum mismatches."""
    sc, info, chain, data = await _written_chunk(cluster, 12, 0)
    c = chain.chain_id
    first = craq.read_order(readable_targets(chain), 12 * 7919)[0]
    server = cluster.nodes[cluster.node_of_target(first, info)].server
    target = server.targets[first]
    answered, declined, pool_runs = [], [], []     # pool_runs: work on the engine threads
    real_inline, real_run = server._server.inline, target.engine._pool.run

    def inline(req):
        resp = real_inline(req)
        (declined if resp is None else answered).append(req.method)
        return resp

    def run(fn):
        pool_runs.append(fn)
        return real_run(fn)
    server._server.inline, target.engine._pool.run = inline, run
    try:
        # Written with O_DIRECT, so not in the page cache: the first read of a block is
        # declined inline (its no-wait attempt starts the disk read) and done by the
        # handler, which leaves the block cached; the next is answered inline.
        for _ in range(2):
            r, got = await sc.read_target(first, ReadPiece(c, 12, 0, 70_000, 4096))
            assert r.status.code == SC.OK and got == data[70_000:74_096]
        assert declined == [S.STORAGE_BATCH_READ] and answered == [S.STORAGE_BATCH_READ]
        answered.clear(), declined.clear(), pool_runs.clear()
        r, got = await sc.read_target(first, ReadPiece(c, 12, 0, 66_000, 4096))
        assert r.status.code == SC.OK and got == data[66_000:70_096]
        assert answered == [S.STORAGE_BATCH_READ] and not pool_runs
        r, got = await sc.read_target(first, ReadPiece(c, 12, 5, 0, 4096))   # no such chunk
        assert r.status.code == SC.NOT_FOUND and len(answered) == 2
        # evicted from the page cache: the engine threads read it
        os.sync()
        for path in _chunk_files(target.path, 12, 0):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        r, got = await sc.read_target(first, ReadPiece(c, 12, 0, 200_000, 4096))
        assert r.status.code == SC.OK and got == data[200_000:204_096]
        assert declined == [S.STORAGE_BATCH_READ]
        # a flipped byte: the inline answer is a checksum mismatch, and the client reads around it
        (path,) = _chunk_files(target.path, 12, 0)
        _flip_byte(path, 10)
        for _ in range(2):     # (the first may find part of the block on disk)
            r, _ = await sc.read_target(first, ReadPiece(c, 12, 0, 0, 4096))
            assert r.status.code == SC.CHECKSUM_MISMATCH
        assert answered[-1] == S.STORAGE_BATCH_READ and len(answered) >= 3
        assert await sc.read(c, 12, 0, 0, 4096) == data[:4096]
    finally:
        server._server.inline, target.engine._pool.run = real_inline, real_run
