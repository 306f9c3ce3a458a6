"""Small files' data held by the metadata service (flyfs/metaserver/inline.py), on every
KV engine (memory, rocksdb, etcd) through the `engine` fixture: writes, reads, truncation,
the move to chunks (spill) and what it must never leave behind, unlink and GC."""
import asyncio
import errno
import os

import pytest

from flyfs.metaserver import inline as inline_mod
from flyfs.metaserver import schema as s
from meta_fixtures import ALICE, BOB, ROOT_INO, make_service

MAX = 4096


@pytest.fixture
async def svc(engine):
    svc = make_service(engine, inline_max=MAX)
    await svc.format(root_mode=0o1777)
    yield svc
    await svc.stop()


async def _new(svc, name="f", who=ALICE):
    node, session, data = await svc.create(who, ROOT_INO, name, 0o644, os.O_RDWR, with_inline=True)
    return node, session, data


async def _key(svc, ino):
    async def fn(txn):
        return await txn.get(s.inline_key(ino))
    return await svc.engine.transact(fn)


async def test_a_new_file_is_inline_and_writes_go_to_the_kv(svc):
    node, session, data = await _new(svc)
    assert data == b"" and node.size == 0
    n, data = await svc.write_inline(ALICE, node.ino, session, [(0, b"hello"), (10, b"world")])
    assert data == b"hello\0\0\0\0\0world" and n.size == 15 and n.mtime >= node.mtime
    got, data2 = await svc.read_inline(BOB, node.ino)
    assert data2 == data and got.size == 15
    # open returns the bytes with the attributes; storage never saw the file
    _, _, data3 = await svc.open(BOB, node.ino, os.O_RDONLY, with_inline=True)
    assert data3 == data and svc.ctx.storage.chunk_count(node.ino) == 0
    # the write stamped mtime and the size: a close with no report leaves them
    n2 = await svc.close(ALICE, node.ino, session)
    assert n2.size == 15 and n2.mtime == n.mtime


async def test_inline_off_and_old_files_are_chunked(engine):
    svc = make_service(engine, inline_max=0)
    await svc.format(root_mode=0o1777)
    try:
        node, session, data = await _new(svc)
        assert data is None
        n, data = await svc.write_inline(ALICE, node.ino, session, [(0, b"x")])
        assert data is None and n.size == 0          # nothing written: the caller writes chunks
    finally:
        await svc.stop()


async def test_a_write_beyond_inline_max_moves_the_data_to_chunk_0(svc):
    node, session, _ = await _new(svc)
    await svc.write_inline(ALICE, node.ino, session, [(0, b"abc" * 100)])
    n, data = await svc.write_inline(ALICE, node.ino, session, [(MAX - 2, b"xyz")])
    assert data is None and n.size == 300               # spilled, the write itself not applied
    storage = svc.ctx.storage
    assert storage.read(node.ino, node.layout, 0, 300) == b"abc" * 100
    assert await _key(svc, node.ino) is None
    _, _, data = await svc.open(ALICE, node.ino, os.O_RDONLY, with_inline=True)
    assert data is None
    # for good: a small write is not taken inline again
    n, data = await svc.write_inline(ALICE, node.ino, session, [(0, b"A")])
    assert data is None
    assert (await svc.spill(ALICE, node.ino)).size == 300   # spilling a chunked file: nothing to do


async def test_a_file_never_written_spills_with_no_storage_call(svc):
    node, session, _ = await _new(svc)
    await svc.spill(ALICE, node.ino)
    assert await _key(svc, node.ino) is None and svc.ctx.storage.calls == []


async def test_truncate_trims_the_data_and_never_calls_storage(svc):
    node, session, _ = await _new(svc)
    await svc.write_inline(ALICE, node.ino, session, [(0, b"0123456789")])
    n = await svc.truncate(ALICE, node.ino, 4, session=session)
    assert n.size == 4 and (await svc.read_inline(ALICE, node.ino))[1] == b"0123"
    n = await svc.truncate(ALICE, node.ino, 1 << 30, session=session)     # extension: zeros follow
    got, data = await svc.read_inline(ALICE, node.ino)
    assert got.size == 1 << 30 and data == b"0123"
    await svc.truncate(ALICE, node.ino, 2, session=session)
    assert (await svc.read_inline(ALICE, node.ino))[1] == b"01"
    assert svc.ctx.storage.calls == []
    # O_TRUNC empties it
    _, _, data = await svc.open(ALICE, node.ino, os.O_WRONLY | os.O_TRUNC, with_inline=True)
    assert data == b"" and (await svc.getattr(ALICE, node.ino)).size == 0


async def test_a_spill_that_died_leaves_no_stale_bytes_after_a_shorter_retry(svc):
    """A spill writes the data, then cuts chunk 0 to its length: when an earlier spill
    wrote more (it died before deleting the key) and the file was cut meanwhile, the
    chunk holds nothing past the new length (an extension later reads zeros)."""
    node, session, _ = await _new(svc)
    await svc.write_inline(ALICE, node.ino, session, [(0, b"x" * 3000)])
    storage = svc.ctx.storage
    real = storage.truncate

    async def dies(*a):
        raise ConnectionError("storage went away after the write")
    storage.truncate = dies
    with pytest.raises(OSError) as e:
        await svc.spill(ALICE, node.ino)
    assert e.value.errno == errno.EIO
    storage.truncate = real
    assert storage.read(node.ino, node.layout, 0, 3000) == b"x" * 3000   # the dead spill's bytes
    spill, data = s.decode_inline(await _key(svc, node.ino))
    assert spill == 1 and data == b"x" * 3000          # still inline; the lease freed at once
    await svc.truncate(ALICE, node.ino, 100, session=session)
    await svc.spill(ALICE, node.ino)
    await svc.truncate(ALICE, node.ino, 3000, session=session)   # now a chunked file's extension
    assert storage.read(node.ino, node.layout, 0, 3000) == b"x" * 100 + bytes(2900)


async def test_writes_during_a_spill_are_not_lost(svc):
    """Writes may land between a spill's copy and its end: the spill goes round again."""
    node, session, _ = await _new(svc)
    await svc.write_inline(ALICE, node.ino, session, [(0, b"a" * 100)])
    storage = svc.ctx.storage
    real = storage.write_data
    rounds = []

    async def slow_write(ino, layout, offset, data):
        rounds.append(bytes(data))
        if len(rounds) == 1:   # another writer gets in while the first copy is on its way
            n, d = await svc.write_inline(BOB, node.ino, session, [(50, b"B" * 10)])
            assert d is not None
        await real(ino, layout, offset, data)
    storage.write_data = slow_write
    await svc.spill(ALICE, node.ino)
    want = b"a" * 50 + b"B" * 10 + b"a" * 40
    assert len(rounds) == 2 and rounds[1] == want
    assert storage.read(node.ino, node.layout, 0, 100) == want and await _key(svc, node.ino) is None


async def test_a_spill_waits_for_another_servers_lease(svc):
    node, session, _ = await _new(svc)
    await svc.write_inline(ALICE, node.ino, session, [(0, b"q" * 10)])

    async def held(txn):   # as if another metadata server were moving it right now
        txn.set(s.inline_key(node.ino), s.encode_inline(svc.ctx.now() + 10 * 10**9, b"q" * 10))
    await svc.engine.transact(held)
    task = asyncio.ensure_future(svc.spill(ALICE, node.ino))
    await asyncio.sleep(0.2)
    assert not task.done() and svc.ctx.storage.chunk_count(node.ino) == 0

    async def finished(txn):  # ... which then finishes it
        txn.clear(s.inline_key(node.ino))
    await svc.engine.transact(finished)
    await asyncio.wait_for(task, 5)
    assert svc.ctx.storage.chunk_count(node.ino) == 0    # nothing left for this one to do


async def test_concurrent_inline_writes_all_land(svc):
    node, session, _ = await _new(svc)
    await asyncio.gather(*(svc.write_inline(ALICE, node.ino, session, [(i * 100, bytes([65 + i]) * 100)])
                           for i in range(20)))
    got, data = await svc.read_inline(ALICE, node.ino)
    assert got.size == 2000 and data == b"".join(bytes([65 + i]) * 100 for i in range(20))


async def test_an_unlinked_inline_file_is_collected_with_no_storage_call(svc):
    node, session, _ = await _new(svc)
    await svc.write_inline(ALICE, node.ino, session, [(0, b"data")])
    await svc.close(ALICE, node.ino, session)
    await svc.unlink(ALICE, ROOT_INO, "f")
    # still readable by whoever has it open, until GC
    assert (await svc.read_inline(ALICE, node.ino))[1] == b"data"
    assert await svc.gc_queue() == [node.ino]
    await svc.run_gc_once()
    assert await svc.gc_queue() == [] and await _key(svc, node.ino) is None
    with pytest.raises(FileNotFoundError):
        await svc.getattr(ALICE, node.ino)
    # open while unlinked: freed by the last close, through GC (no storage call for it)
    node, session, _ = await _new(svc, "g")
    await svc.write_inline(ALICE, node.ino, session, [(0, b"data")])
    await svc.unlink(ALICE, ROOT_INO, "g")
    await svc.close(ALICE, node.ino, session)
    assert await svc.gc_queue() == [node.ino]
    await svc.run_gc_once()
    assert await svc.gc_queue() == [] and await _key(svc, node.ino) is None
    assert ("remove_chunks", node.ino) not in svc.ctx.storage.calls


async def test_a_spilled_file_is_collected_with_its_chunks(svc):
    node, session, _ = await _new(svc)
    await svc.write_inline(ALICE, node.ino, session, [(0, b"data")])
    await svc.spill(ALICE, node.ino)
    await svc.close(ALICE, node.ino, session)
    await svc.unlink(ALICE, ROOT_INO, "f")
    await svc.run_gc_once()
    assert svc.ctx.storage.chunk_count(node.ino) == 0 and await svc.gc_queue() == []


async def test_a_dead_writers_inline_file_keeps_its_size(engine):
    """Session expiry asks storage for a dead writer's length; an inline file's is known."""
    svc = make_service(engine, inline_max=MAX, session_ttl=0.05)
    await svc.format(root_mode=0o1777)
    try:
        node, session, _ = await _new(svc)
        await svc.write_inline(ALICE, node.ino, session, [(0, b"z" * 700)])
        await asyncio.sleep(0.1)
        from flyfs.metaserver.sessions import expire_sessions
        assert await expire_sessions(svc.ctx) == 1
        assert (await svc.getattr(ALICE, node.ino)).size == 700
        assert ("query_last_chunk", node.ino) not in svc.ctx.storage.calls
    finally:
        await svc.stop()


async def test_bad_inline_requests(svc):
    node, session, _ = await _new(svc)
    with pytest.raises(OSError) as e:
        await svc.write_inline(ALICE, node.ino, b"short", [(0, b"x")])
    assert e.value.errno == errno.EBADF
    for bad in ([(-1, b"x")], [(0, "text")], [("0", b"x")], [(0,)]):
        with pytest.raises(OSError) as e:
            await svc.write_inline(ALICE, node.ino, session, bad)
        assert e.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError) as e:
        await svc.read_inline(ALICE, 0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        await svc.read_inline(ALICE, 999999)
    assert (await svc.read_inline(ALICE, node.ino))[1] == b""   # nothing written by any of them
    with pytest.raises(ValueError):
        make_service(svc.engine, inline_max=inline_mod.INLINE_MAX_LIMIT + 1)


async def test_no_storage_attached_cannot_spill_data(engine):
    from flyfs.metaserver import MetaConfig, MetaService, static_chain_table
    svc = MetaService(engine, chain_table=static_chain_table([1]), config=MetaConfig(inline_max=MAX))
    await svc.format(root_mode=0o1777)
    try:
        node, session, _ = await _new(svc)
        await svc.write_inline(ALICE, node.ino, session, [(0, b"x")])
        with pytest.raises(OSError) as e:
            await svc.spill(ALICE, node.ino)
        assert e.value.errno == errno.EIO
        assert (await svc.read_inline(ALICE, node.ino))[1] == b"x"   # still there, still inline
    finally:
        await svc.stop()



async def test_removing_an_inode_deletes_a_range_only_for_its_xattrs(engine, monkeypatch):
    """RocksDB keeps range tombstones in the way of every later read (gets ~20x slower
    after thousands of unlinks): an inode without xattrs goes with point deletes only."""
    from flyfs.kv.base import Transaction
    svc = make_service(engine)
    await svc.format(root_mode=0o1777)
    ranges = []
    real = Transaction.clear_range

    def spy(self, b, e):
        ranges.append((b, e))
        return real(self, b, e)
    monkeypatch.setattr(Transaction, "clear_range", spy)
    try:
        plain = await svc.mknod(ALICE, ROOT_INO, "plain", 0o100644)
        tagged = await svc.mknod(ALICE, ROOT_INO, "tagged", 0o100644)
        await svc.setxattr(ALICE, tagged.ino, "user.k", b"v")
        await svc.unlink(ALICE, ROOT_INO, "plain")
        await svc.run_gc_once()
        assert ranges == []
        await svc.unlink(ALICE, ROOT_INO, "tagged")
        await svc.run_gc_once()
        assert ranges == [s.xattr_range(tagged.ino)]

        async def left(txn):
            return [k async for k, _ in txn.snapshot_get_range(b"M", b"N")
                    if k.endswith(s.u64(plain.ino)) or s.u64(tagged.ino) in k]
        assert await svc.engine.transact(left) == []
    finally:
        await svc.stop()
