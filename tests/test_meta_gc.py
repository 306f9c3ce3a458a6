"""Garbage collection, write sessions and file length recovery, against every engine."""
import asyncio
import os

import pytest

from flyfs.metaserver import FakeStorageOps
from flyfs.metaserver.schema import NS
from meta_fixtures import ALICE, ROOT, ROOT_INO, dump, make_service, meta  # noqa: F401


async def write_file(svc, who, parent, name, nbytes: int):
    """Create a file, write `nbytes` through FakeStorageOps as a client would, close it."""
    f, session = await svc.create(who, parent, name, 0o644, os.O_WRONLY | os.O_EXCL)
    svc.ctx.storage.write(f.ino, f.layout, 0, os.urandom(nbytes))
    return await svc.close(who, f.ino, session, length=nbytes, wrote=True)


async def test_deleted_files_chunks_return_to_zero(engine):
    svc = make_service(engine, default_chunk_size=1 << 16, gc_batch=16)
    await svc.format(root_mode=0o777)
    storage = svc.ctx.storage
    d = await svc.mkdir(ALICE, ROOT_INO, "d")
    files = [await write_file(svc, ALICE, d.ino, f"f{i}", (1 << 16) * 2 + 1 + i * 100) for i in range(20)]
    assert storage.chunk_count() == 60
    for f in files:  # each chunk went to the chain its layout names
        assert all(storage.chain_of[(f.ino, i)] == f.layout.chain_of(i) for i in range(3))
    for i in range(20):
        await svc.unlink(ALICE, d.ino, f"f{i}")
    assert sorted(await svc.gc_queue()) == sorted(f.ino for f in files)
    assert storage.chunk_count() == 60       # nothing removed before GC runs
    total = 0
    while await svc.gc_queue():
        report = await svc.run_gc_once()
        assert report.errors == 0
        total += report.chunks
    assert total == 60 and storage.chunk_count() == 0
    for f in files:
        with pytest.raises(FileNotFoundError):
            await svc.getattr(ALICE, f.ino)
    await svc.rmdir(ALICE, ROOT_INO, "d")
    left = [k for k in await dump(engine) if k[:2] in (b"MI", b"MD", b"MT", b"MS", b"MG", b"MX")]
    assert left == [b"MI" + ROOT_INO.to_bytes(8, "little")]   # only the root is left


async def test_background_gc_drains_a_mass_deletion_at_once(engine):
    """Passes follow one another while the queue is full: 100 deleted files (batches of
    16) are collected within seconds even with an hour between idle passes; a file
    whose chunks storage cannot remove stays queued for a later pass."""
    svc = make_service(engine, default_chunk_size=1 << 16, gc_batch=16)
    await svc.format(root_mode=0o777)
    storage = svc.ctx.storage
    d = await svc.mkdir(ALICE, ROOT_INO, "d")
    files = [await write_file(svc, ALICE, d.ino, f"f{i}", 1000) for i in range(100)]
    stuck = files[7].ino
    real_remove = storage.remove_chunks

    async def failing_remove(ino, layout):
        if ino == stuck:
            raise ConnectionError("storage unreachable")
        return await real_remove(ino, layout)

    storage.remove_chunks = failing_remove
    for i in range(100):
        await svc.unlink(ALICE, d.ino, f"f{i}")
    svc.start_gc(interval=3600)
    try:
        for _ in range(200):
            if await svc.gc_queue() == [stuck]:
                break
            await asyncio.sleep(0.05)
        assert await svc.gc_queue() == [stuck] and storage.chunk_count() == 1
    finally:
        await svc.stop()
    storage.remove_chunks = real_remove
    report = await svc.run_gc_once()
    assert report.inodes == 1 and storage.chunk_count() == 0 and await svc.gc_queue() == []


async def test_open_file_survives_unlink_until_close(meta):
    storage = meta.ctx.storage
    f, session = await meta.create(ALICE, ROOT_INO, "f", 0o644, os.O_RDWR)
    storage.write(f.ino, f.layout, 0, b"x" * 5000)
    await meta.unlink(ALICE, ROOT_INO, "f")
    await meta.run_gc_once()
    n = await meta.getattr(ALICE, f.ino)       # fstat on the open descriptor still works
    assert n.nlink == 0 and storage.chunk_count(f.ino) == 1
    n = await meta.sync(ALICE, f.ino, session, length=5000, wrote=True)
    assert n.size == 5000
    with pytest.raises(FileNotFoundError):
        await meta.open(ALICE, f.ino, os.O_RDONLY)   # no new opens of a removed file
    await meta.close(ALICE, f.ino, session, length=5000)
    assert await meta.gc_queue() == [f.ino]
    report = await meta.run_gc_once()
    assert report.inodes == 1 and report.chunks == 1 and storage.chunk_count() == 0


async def test_replaced_file_is_collected(meta):
    storage = meta.ctx.storage
    old = await write_file(meta, ALICE, ROOT_INO, "target", 3000)
    await write_file(meta, ALICE, ROOT_INO, "tmp", 10)
    await meta.rename(ALICE, ROOT_INO, "tmp", ROOT_INO, "target")   # atomic publish by rename
    assert (await meta.run_gc_once()).inodes == 1
    assert storage.chunk_count(old.ino) == 0 and storage.chunk_count() == 1


async def test_storage_failure_leaves_entry_queued(meta):
    storage = meta.ctx.storage
    f = await write_file(meta, ALICE, ROOT_INO, "f", 100)
    await meta.unlink(ALICE, ROOT_INO, "f")
    storage.fail = 1
    report = await meta.run_gc_once()
    assert report.errors == 1 and report.inodes == 0 and await meta.gc_queue() == [f.ino]
    assert (await meta.getattr(ROOT, f.ino)).nlink == 0
    report = await meta.run_gc_once()
    assert report.inodes == 1 and storage.chunk_count() == 0 and await meta.gc_queue() == []


async def test_dead_writer_length_comes_from_storage(engine):
    now = [1_700_000_000 * NS]
    svc = make_service(engine, session_ttl=30)
    svc.ctx.clock = lambda: now[0]
    await svc.format(root_mode=0o777)
    storage = svc.ctx.storage
    f, session = await svc.create(ALICE, ROOT_INO, "f", 0o644, os.O_WRONLY)
    g, gs = await svc.create(ALICE, ROOT_INO, "g", 0o644, os.O_WRONLY)
    storage.write(f.ino, f.layout, 0, b"a" * 10)
    await svc.sync(ALICE, f.ino, session, length=10)
    storage.write(f.ino, f.layout, 10, b"b" * (f.layout.chunk_size + 7))   # unreported writes
    storage.write(g.ino, g.layout, 0, b"g" * 123)
    await svc.unlink(ALICE, ROOT_INO, "g")     # removed while its writer is alive
    now[0] += 20 * NS
    await svc.sync(ALICE, g.ino, gs)             # g's writer renews; f's writer has died
    assert (await svc.run_gc_once()).sessions == 0
    now[0] += 15 * NS                            # f: 35 s without renewal; g: 15 s
    report = await svc.run_gc_once()
    assert report.sessions == 1 and report.inodes == 0
    n = await svc.getattr(ALICE, f.ino)
    assert n.size == 10 + f.layout.chunk_size + 7 and await svc.list_sessions(f.ino) == []
    now[0] += 31 * NS                            # now g's writer is gone too: its file is collected
    report = await svc.run_gc_once()
    assert report.sessions == 1 and report.inodes == 1 and storage.chunk_count(g.ino) == 0
    with pytest.raises(FileNotFoundError):
        await svc.getattr(ALICE, g.ino)


async def test_background_gc_loop(engine):
    svc = make_service(engine)
    await svc.format(root_mode=0o777)
    for i in range(5):
        await write_file(svc, ALICE, ROOT_INO, f"f{i}", 10)
        await svc.unlink(ALICE, ROOT_INO, f"f{i}")
    task = svc.start_gc(interval=0.02)
    try:
        for _ in range(500):
            if not await svc.gc_queue():
                break
            await asyncio.sleep(0.02)
        assert await svc.gc_queue() == [] and svc.ctx.storage.chunk_count() == 0
    finally:
        await svc.stop()
    assert task.done()


async def test_no_storage_chunks_for_non_files(meta):
    storage = FakeStorageOps()
    meta.ctx.storage = storage
    await meta.symlink(ALICE, ROOT_INO, "ln", "x")
    await meta.mkdir(ALICE, ROOT_INO, "d")
    await meta.unlink(ALICE, ROOT_INO, "ln")
    await meta.rmdir(ALICE, ROOT_INO, "d")
    assert await meta.gc_queue() == []
    await meta.run_gc_once()
    assert storage.calls == []
