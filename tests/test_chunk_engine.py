"""Chunk engine: versions, checksums, crash safety (real SIGKILLed processes), async facade.

Run as a script (``python tests/test_chunk_engine.py child ...``) it is the crash
test's child process.
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time

import crc32c
import pytest

from flyfs.storage import (ChainVersionMismatch, ChecksumMismatch, ChunkCorrupted, ChunkEngine,
                           ChunkMeta, ChunkNotCommitted, ChunkNotFound, ChunkSizeExceeded,
                           EngineClosed, InvalidArgument, StaleUpdate, SyncChunkEngine, TargetLocked,
                           VersionMismatch)
from flyfs.storage.chunk_engine import (_INLINE, _KEY_DATA, APPEND, BASE, COPY, DATA, SHARE, ZERO,
                                        CrcMath, _data_key, plan_update)

BS = 4096
MAXC = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cid(inode: int, index: int) -> bytes:
    return inode.to_bytes(8, "big") + index.to_bytes(8, "big")


def rnd(n: int, rng=random) -> bytes:
    return rng.randbytes(n)


def chunk_files(eng: SyncChunkEngine) -> list[str]:
    """The chunk data files (not the emptied ones kept for reuse)."""
    out = []
    for d in sorted(os.listdir(eng._chunks_dir)):
        if d == "spare":
            continue
        out += [os.path.join(eng._chunks_dir, d, f) for f in os.listdir(os.path.join(eng._chunks_dir, d))]
    return sorted(out)


def inline_keys(eng: SyncChunkEngine) -> list[bytes]:
    """The metadata-store keys holding inline chunk bytes."""
    out = []
    it = eng._db.iter()
    it.seek(_KEY_DATA)
    while it.valid() and it.key().startswith(_KEY_DATA):
        out.append(it.key())
        it.next()
    return out


def committed_file(eng: SyncChunkEngine, chunk_id: bytes) -> str:
    c, _ = eng._load(chunk_id)
    return eng._file(chunk_id, c.seq)


def apply_write(model: bytearray, off: int, data: bytes) -> bytearray:
    m = bytearray(model)
    if off > len(m):
        m += bytes(off - len(m))
    m[off:off + len(data)] = data
    return m


def apply_truncate(model: bytearray, length: int) -> bytearray:
    m = bytearray(model[:length])
    m += bytes(length - len(m))
    return m


@pytest.fixture
def eng(tmp_path):
    e = SyncChunkEngine(str(tmp_path / "t"), block_size=BS, max_chunk_size=MAXC)
    yield e
    e.close()


def reopen(e: SyncChunkEngine, **kw) -> SyncChunkEngine:
    e.close()
    return SyncChunkEngine(e.path, **{"block_size": BS, "max_chunk_size": MAXC, **kw})


# ------------------------------------------------------------------ pure parts

def test_crc_math_matches_direct_crc():
    rng = random.Random(1)
    for bs in (4096, 65536):
        m = CrcMath(bs)
        for _ in range(50):
            a, b = rnd(rng.randrange(0, 3 * bs), rng), rnd(rng.randrange(0, 3 * bs), rng)
            assert m.combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)
            assert m.zeros(len(b), crc32c.crc32c(a)) == crc32c.crc32c(a + bytes(len(b)))
            assert m.fold(m.block_crcs(memoryview(a)), len(a)) == crc32c.crc32c(a)


def test_plan_modes():
    # append at the end of all live data: in place
    p = plan_update(BS, 10000, 10000, write=(10000, 5000))
    assert p.mode == APPEND and p.new_len == 15000
    assert p.segments == ((0, 10000, BASE), (10000, 15000, DATA))
    assert list(p.changed) == [2, 3]
    # a gap before the data reads as zeros
    p = plan_update(BS, 100, 100, write=(9000, 10))
    assert p.mode == APPEND and p.segments == ((0, 100, BASE), (100, 9000, ZERO), (9000, 9010, DATA))
    assert list(p.changed) == [0, 1, 2]
    # overwrite inside live data: copy; only touched blocks change
    p = plan_update(BS, 20000, 20000, write=(5000, 100))
    assert p.mode == COPY and list(p.changed) == [1]
    assert p.segments == ((0, 5000, BASE), (5000, 5100, DATA), (5100, 20000, BASE))
    # the base is shorter than other live data in its file (a shrink pending): copy
    assert plan_update(BS, 1000, 8000, write=(1000, 10)).mode == COPY
    assert plan_update(BS, 1000, 8000, truncate=5000).mode == COPY
    # shrinking shares the file; only a now-partial last block changes
    p = plan_update(BS, 20000, 20000, truncate=5000)
    assert p.mode == SHARE and list(p.changed) == [1]
    assert list(plan_update(BS, 20000, 20000, truncate=8192).changed) == []
    # extending in place writes zeros
    p = plan_update(BS, 100, 100, truncate=9000)
    assert p.mode == APPEND and p.segments == ((0, 100, BASE), (100, 9000, ZERO))
    # no base file: always a new file
    assert plan_update(BS, 0, None, write=(0, 10)).mode == COPY
    assert plan_update(BS, 0, None, truncate=0).mode == COPY


# ------------------------------------------------------------------ basic behaviour

def test_roundtrip_overwrite_append_gap(eng):
    c = cid(1, 0)
    rng = random.Random(2)
    model = bytearray()
    ver = 0
    steps = [(0, 10000), (3000, 2000), (4090, 20), (10000, 7000), (17000, 1), (30000, 500),
             (0, 40000), (12345, 999)]
    for off, n in steps:
        data = rnd(n, rng)
        ver += 1
        meta = eng.prepare_write(c, off, memoryview(data), ver, 1)
        model = apply_write(model, off, data)
        assert meta.pending_length == len(model) and meta.pending_crc == crc32c.crc32c(model)
        meta = eng.commit(c, ver)
        assert (meta.commit_ver, meta.update_ver, meta.length) == (ver, ver, len(model))
        assert meta.crc == crc32c.crc32c(model) and not meta.has_pending
        data_back, m2 = eng.read(c, 0, MAXC)
        assert data_back == model and m2 == meta
        for _ in range(20):  # unaligned partial reads into caller buffers
            o = rng.randrange(0, len(model) + 10)
            ln = rng.randrange(0, 3 * BS)
            buf = bytearray(ln + 7)
            n_read, _ = eng.read(c, o, ln, memoryview(buf))
            want = model[o:o + ln]
            assert n_read == len(want) and buf[:n_read] == want
    # one file per chunk once everything is committed, and used bytes are the content
    assert len(chunk_files(eng)) == 1
    assert eng.used_bytes() == len(model)
    assert eng.verify(c).crc == crc32c.crc32c(model)


def test_append_reuses_committed_file_and_overwrite_copies(eng):
    c = cid(1, 1)
    eng.prepare_write(c, 0, b"a" * 5000, 1, 1)
    eng.commit(c, 1)
    first = committed_file(eng, c)
    eng.prepare_write(c, 5000, b"b" * 5000, 2, 1)
    assert committed_file(eng, c) == first and eng._load(c)[1].seq == eng._load(c)[0].seq
    eng.commit(c, 2)
    assert committed_file(eng, c) == first
    eng.prepare_write(c, 100, b"c", 3, 1)  # inside committed data: a new file
    assert chunk_files(eng) == sorted([first, eng._file(c, eng._load(c)[1].seq)])
    eng.commit(c, 3)
    assert chunk_files(eng) == [committed_file(eng, c)] != [first]
    assert eng.read(c, 0, 10001)[0] == b"a" * 100 + b"c" + b"a" * 4899 + b"b" * 5000


def test_randomized_against_model(eng):
    rng = random.Random(3)
    ids = [cid(7, i) for i in range(4)]
    models = {i: bytearray() for i in ids}
    pend: dict[bytes, bytearray] = {}
    vers = {i: 0 for i in ids}
    for _ in range(300):
        c = rng.choice(ids)
        base = pend.get(c, models[c])
        r = rng.random()
        if r < 0.5:
            off = rng.choice([len(base), rng.randrange(0, len(base) + 1), len(base) + rng.randrange(1, 9000)])
            n = rng.randrange(0, 3 * BS)
            off = min(off, MAXC - n)
            data = rnd(n, rng)
            m = eng.prepare_write(c, off, data, vers[c] + 1, 1)
            new = apply_write(base, off, data) if n else bytearray(base)
        elif r < 0.65:
            length = rng.randrange(0, 40000)
            m = eng.truncate(c, length, vers[c] + 1, 1)
            new = apply_truncate(base, length)
        elif r < 0.72 and c in pend:
            eng.abort(c)
            del pend[c]
            continue
        else:
            if c in pend:
                vers[c] += 1
                models[c] = pend.pop(c)
                m = eng.commit(c, vers[c])
                assert m.crc == crc32c.crc32c(models[c])
            continue
        assert m.pending_length == len(new) and m.pending_crc == crc32c.crc32c(new)
        pend[c] = new
        # readers keep seeing the committed version
        if vers[c]:
            assert eng.read(c, 0, MAXC)[0] == models[c]
        else:
            with pytest.raises(ChunkNotCommitted):
                eng.read(c, 0, 1)
    for c in ids:
        if c in pend:
            vers[c] += 1
            models[c] = pend.pop(c)
            eng.commit(c, vers[c])
        assert eng.read(c, 0, MAXC)[0] == models[c]
        assert eng.verify(c).crc == crc32c.crc32c(models[c])
    assert len(chunk_files(eng)) == len(ids)
    assert eng.used_bytes() == sum(len(m) for m in models.values())
    eng = reopen(eng)
    try:
        assert eng.recovery["garbage_files"] == 0
        for c in ids:
            assert eng.read(c, 0, MAXC)[0] == models[c]
    finally:
        eng.close()


def test_reads_never_see_pending(eng):
    c = cid(2, 0)
    v1 = rnd(3 * BS + 100)
    eng.prepare_write(c, 0, v1, 1, 1)
    eng.commit(c, 1)
    eng.prepare_write(c, 10, b"X" * 5000, 2, 1)        # overwrite (copy)
    eng.prepare_write(c, 20000, b"Y" * 100, 3, 1)      # stacked, extends
    data, meta = eng.read(c, 0, MAXC)
    assert data == v1
    assert (meta.commit_ver, meta.update_ver, meta.length, meta.pending_length) == (1, 3, len(v1), 20100)
    assert eng.read(c, 5, 20)[0] == v1[5:25]
    assert eng.commit(c, 3).length == 20100
    want = apply_write(apply_write(bytearray(v1), 10, b"X" * 5000), 20000, b"Y" * 100)
    assert eng.read(c, 0, MAXC)[0] == want


def test_not_committed_and_not_found(eng):
    c = cid(3, 0)
    with pytest.raises(ChunkNotFound):
        eng.read(c, 0, 10)
    assert eng.get_meta(c) is None
    eng.prepare_write(c, 0, b"abc", 1, 1)
    with pytest.raises(ChunkNotCommitted):
        eng.read(c, 0, 10)
    meta = eng.get_meta(c)
    assert (meta.committed, meta.has_pending, meta.pending_length) == (False, True, 3)
    assert eng.abort(c) is None and eng.get_meta(c) is None and chunk_files(eng) == []
    with pytest.raises(ChunkNotFound):
        eng.commit(c, 1)


def test_version_rules(eng):
    c = cid(4, 0)
    eng.prepare_write(c, 0, b"aaaa", 1, 5)
    eng.commit(c, 1)
    with pytest.raises(StaleUpdate):
        eng.prepare_write(c, 0, b"x", 1, 5)
    with pytest.raises(ChainVersionMismatch):
        eng.prepare_write(c, 0, b"x", 2, 4)
    with pytest.raises(VersionMismatch):
        eng.commit(c, 2)                              # nothing pending
    eng.prepare_write(c, 4, b"bb", 3, 5)
    with pytest.raises(StaleUpdate):
        eng.prepare_write(c, 0, b"x", 2, 5)           # older than pending
    eng.prepare_write(c, 4, b"bb", 3, 5)              # retry of the same update: idempotent
    assert eng.get_meta(c).pending_length == 6
    with pytest.raises(VersionMismatch):
        eng.commit(c, 2)
    with pytest.raises(ChainVersionMismatch):
        eng.commit(c, 3, chain_ver=4)
    meta = eng.commit(c, 3, chain_ver=6)
    assert (meta.commit_ver, meta.chain_ver) == (3, 6)
    assert eng.commit(c, 3) == meta == eng.commit(c, 1)  # retried commits are harmless
    assert eng.read(c, 0, 10)[0] == b"aaaabb"
    eng.truncate(c, 2, 4, 6)
    assert eng.abort(c) == meta and eng.read(c, 0, 10)[0] == b"aaaabb"


def test_truncate_shrink_and_extend(eng):
    c = cid(5, 0)
    content = rnd(5 * BS + 123)
    eng.prepare_write(c, 0, content, 1, 1)
    eng.commit(c, 1)
    f = committed_file(eng, c)
    eng.truncate(c, 2 * BS + 7, 2, 1)                 # shrink: shares the file
    assert chunk_files(eng) == [f]
    assert eng.read(c, 0, MAXC)[0] == content         # still the committed one
    eng.commit(c, 2)
    assert eng.read(c, 0, MAXC)[0] == content[:2 * BS + 7] and chunk_files(eng) == [f]
    assert eng.used_bytes() == 2 * BS + 7
    eng.truncate(c, 4 * BS, 3, 1)                     # extend with zeros, in place
    eng.commit(c, 3)
    assert eng.read(c, 0, MAXC)[0] == content[:2 * BS + 7] + bytes(2 * BS - 7)
    assert chunk_files(eng) == [f] and os.path.getsize(f) == 4 * BS
    eng.truncate(c, 0, 4, 1)
    eng.commit(c, 4)
    assert eng.read(c, 0, MAXC)[0] == b"" and eng.get_meta(c).crc == 0
    # pending shrink, then an extend stacked on it must not touch committed bytes
    eng.prepare_write(c, 0, content, 5, 1)
    eng.commit(c, 5)
    eng.truncate(c, 100, 6, 1)
    eng.truncate(c, 9000, 7, 1)
    assert eng.read(c, 0, MAXC)[0] == content
    eng.commit(c, 7)
    assert eng.read(c, 0, MAXC)[0] == content[:100] + bytes(8900)
    eng.truncate(c, 7, 8, 1)                          # extend of a brand-new chunk
    eng.truncate(cid(5, 1), 10000, 1, 1)
    eng.commit(cid(5, 1), 1)
    assert eng.read(cid(5, 1), 0, MAXC)[0] == bytes(10000)


def test_remove(eng):
    a, b, p = cid(6, 0), cid(6, 1), cid(6, 2)
    for x in (a, b):
        eng.prepare_write(x, 0, b"data" * 1000, 1, 1)
        eng.commit(x, 1)
    eng.prepare_write(p, 0, b"pending", 1, 1)
    assert eng.remove([a, p, cid(6, 9), a]) == 2
    for x in (a, p):
        with pytest.raises(ChunkNotFound):
            eng.read(x, 0, 1)
    assert eng.read(b, 0, 4)[0] == b"data"
    assert chunk_files(eng) == [committed_file(eng, b)]
    assert eng.used_bytes() == 4000
    assert eng.remove([]) == 0


def test_query_last_chunk(eng):
    def put(c, n):
        eng.prepare_write(c, 0, b"z" * n, 1, 1)
        eng.commit(c, 1)

    assert eng.query_last_chunk(cid(8, 0)[:8]) is None
    put(cid(8, 0), 10)
    put(cid(8, 1), 20)
    put(cid(8, 256), 30)
    put(cid(9, 0), 40)                                  # another inode, greater ids
    put(cid(7, 5), 50)
    eng.prepare_write(cid(8, 300), 0, b"p", 1, 1)       # pending only: not part of the file yet
    assert eng.query_last_chunk(cid(8, 0)[:8]) == (cid(8, 256), 30)
    assert eng.query_last_chunk(cid(9, 0)[:8]) == (cid(9, 0), 40)
    assert eng.query_last_chunk(cid(10, 0)[:8]) is None
    ff = b"\xff" * 8
    put(ff + b"\x00" * 8, 1)
    put(ff + b"\xff" * 8, 2)
    assert eng.query_last_chunk(ff) == (ff + b"\xff" * 8, 2)
    assert eng.query_last_chunk(b"") == (ff + b"\xff" * 8, 2)


def test_list_metas(eng):
    ids = [cid(11, i) for i in range(7)] + [cid(12, 0)]
    for i, c in enumerate(ids):
        eng.prepare_write(c, 0, b"x" * (i + 1), 1, 3)
        if i != 3:
            eng.commit(c, 1)
    metas = list(eng.list_metas(cid(11, 0)[:8], page=2))
    assert [m.chunk_id for m in metas] == ids[:7]
    assert [m.length for m in metas] == [1, 2, 3, 0, 5, 6, 7]
    assert metas[3].pending_length == 4 and not metas[3].committed
    assert all(m.chain_ver == 3 for m in metas)
    assert [m.chunk_id for m in eng.list_metas()] == ids
    assert metas[5] == eng.get_meta(ids[5])


def test_install(eng, tmp_path):
    src = SyncChunkEngine(str(tmp_path / "peer"), block_size=BS, max_chunk_size=MAXC)
    try:
        c = cid(13, 0)
        content = rnd(3 * BS + 5)
        src.prepare_write(c, 0, content, 1, 2)
        src.prepare_write(c, 100, b"Q" * 50, 2, 2)
        src.commit(c, 2)
        data, meta = src.read(c, 0, MAXC)
    finally:
        src.close()
    eng.prepare_write(c, 0, b"local pending", 9, 1)     # whatever is here gets replaced
    bad = ChunkMeta(c, meta.commit_ver, meta.update_ver, meta.chain_ver, meta.length, meta.crc ^ 1)
    with pytest.raises(ChecksumMismatch):
        eng.install(c, data, bad)
    assert eng.get_meta(c).pending_length == 13
    got = eng.install(c, memoryview(data), meta)
    assert (got.commit_ver, got.chain_ver, got.length, got.crc, got.has_pending) == (
        2, 2, len(data), meta.crc, False)
    assert eng.read(c, 0, MAXC)[0] == data and len(chunk_files(eng)) == 1
    eng.prepare_write(c, 0, b"after", 3, 2)               # normal updates continue from it
    eng.commit(c, 3)
    assert eng.read(c, 0, 5)[0] == b"after"


def test_reopen_keeps_everything_and_collects_garbage(eng):
    rng = random.Random(5)
    want = {}
    for i in range(5):
        c = cid(14, i)
        want[c] = rnd(rng.randrange(1, 6 * BS), rng)
        eng.prepare_write(c, 0, want[c], 1, 1)
        eng.commit(c, 1)
    pc = cid(14, 9)
    eng.prepare_write(pc, 0, b"pending", 1, 1)
    used = eng.used_bytes()
    stray = os.path.join(eng._dir_of(cid(14, 0)), cid(14, 0).hex() + ".ff")
    open(stray, "wb").write(b"junk left by a crash")
    eng = reopen(eng, block_size=65536)                  # the target keeps its own block size
    try:
        assert eng.block_size == BS
        assert eng.recovery["garbage_files"] == 1 and not os.path.exists(stray)
        for c, data in want.items():
            assert eng.read(c, 0, MAXC)[0] == data
        assert eng.get_meta(pc).pending_length == 7
        assert eng.used_bytes() == used
        eng.commit(pc, 1)
        assert eng.read(pc, 0, 100)[0] == b"pending"
        # new files never reuse a sequence number seen on disk
        assert eng._next_seq > 0xFF
    finally:
        eng.close()


def spare_files(eng: SyncChunkEngine) -> list[str]:
    d = os.path.join(eng._chunks_dir, "spare")
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def test_new_chunk_files_are_spare_files_made_ahead(eng, monkeypatch):
    rng = random.Random(21)
    created = []
    real_open = os.open

    def counting_open(path, flags, *a, **kw):
        if flags & os.O_CREAT and "/chunks/" in str(path):
            created.append(path)
        return real_open(path, flags, *a, **kw)

    assert eng.make_spares(4) == 4 and eng.make_spares(4) == 0
    assert [os.path.getsize(f) for f in spare_files(eng)] == [0] * 4
    monkeypatch.setattr(os, "open", counting_open)
    new = {cid(17, i): rnd(BS + 100, rng) for i in range(4)}
    for c, data in new.items():
        eng.prepare_write(c, 2 * BS, data, 1, 1)   # a hole before the data: reads as zeros
        eng.commit(c, 1)
    assert created == [] and eng.spare_files == 0 and spare_files(eng) == []   # four renames
    for c, data in new.items():
        assert eng.read(c, 0, MAXC)[0] == bytes(2 * BS) + data
    c = cid(17, 0)
    eng.prepare_write(c, 10, b"overwrite inside live data", 2, 1)   # a copy: no spare left
    eng.commit(c, 2)
    assert len(created) == 1
    assert eng.read(c, 0, 100)[0] == bytes(10) + b"overwrite inside live data" + bytes(64)


def test_spare_files_are_capped_and_survive_reopen_empty(eng, monkeypatch):
    import flyfs.storage.chunk_engine as ce
    monkeypatch.setattr(ce, "_SPARE_MAX", 2)
    assert eng.make_spares(10) == 2 and eng.spare_files == 2
    with open(spare_files(eng)[0], "wb") as f:   # never happens; opening still copes
        f.write(b"junk" * 3000)
    eng = reopen(eng)
    try:
        assert eng.spare_files == 2 and [os.path.getsize(f) for f in spare_files(eng)] == [0, 0]
        for i in range(3):
            c = cid(19, i)
            eng.prepare_write(c, BS, b"data", 1, 1)
            eng.commit(c, 1)
            assert eng.read(c, 0, MAXC)[0] == bytes(BS) + b"data"
        assert eng.spare_files == 0
    finally:
        eng.close()


def test_corruption_is_an_error_not_data(eng):
    c = cid(15, 0)
    content = rnd(4 * BS)
    eng.prepare_write(c, 0, content, 1, 1)
    eng.commit(c, 1)
    f = committed_file(eng, c)
    with open(f, "r+b") as fh:
        fh.seek(BS + 10)
        b = fh.read(1)
        fh.seek(BS + 10)
        fh.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(ChecksumMismatch, match="block 1"):
        eng.read(c, 0, MAXC)
    with pytest.raises(ChecksumMismatch):
        eng.read(c, BS + 100, 5)                         # any read touching block 1
    buf = bytearray(BS)
    assert eng.read(c, 2 * BS, BS, buf)[0] == BS and buf == content[2 * BS:3 * BS]
    with pytest.raises(ChecksumMismatch):
        eng.verify(c)
    # a partial update of the damaged block must not bless it with a fresh crc
    files = chunk_files(eng)
    with pytest.raises(ChecksumMismatch):
        eng.prepare_write(c, BS + 50, b"x", 2, 1)
    assert chunk_files(eng) == files and not eng.get_meta(c).has_pending
    # a write replacing the whole chunk needs no old bytes
    eng.prepare_write(c, 0, content, 2, 1)
    eng.commit(c, 2)
    assert eng.verify(c).crc == crc32c.crc32c(content)
    # a short or missing file is corruption too
    os.truncate(committed_file(eng, c), 3 * BS)
    with pytest.raises(ChunkCorrupted, match="shorter"):
        eng.read(c, 3 * BS, 10)
    os.unlink(committed_file(eng, c))
    with pytest.raises(ChunkCorrupted, match="missing"):
        eng.read(c, 0, 10)


def test_appends_extend_the_recorded_crc_without_reading_back(eng, monkeypatch):
    """An append to a partial last block takes that block's recorded crc and extends it
    (no read of the old bytes); damage to those bytes is still caught when read."""
    c = cid(18, 0)
    first, second, third = rnd(BS + 100), rnd(3000), rnd(2 * BS + 7)
    eng.prepare_write(c, 0, first, 1, 1)
    eng.commit(c, 1)

    def no_reads(*a):
        raise AssertionError("the base block was read back")
    monkeypatch.setattr(eng, "_read_base_block", no_reads)
    eng.prepare_write(c, len(first), second, 2, 1)                 # append right at the end
    eng.commit(c, 2)
    eng.prepare_write(c, len(first) + len(second) + 50, third, 3, 1)  # append after a gap
    eng.commit(c, 3)
    monkeypatch.undo()
    want = first + second + bytes(50) + third
    data, meta = eng.read(c, 0, MAXC)
    assert data == want and meta.crc == crc32c.crc32c(want)
    eng.verify(c)
    # damage inside the kept prefix of block 1, then append again: still detected
    with open(committed_file(eng, c), "r+b") as fh:
        fh.seek(BS + 20)
        b = fh.read(1)
        fh.seek(BS + 20)
        fh.write(bytes([b[0] ^ 1]))
    with pytest.raises(ChecksumMismatch, match="block 1"):
        eng.read(c, BS, 100)


def test_bad_input_writes_nothing(eng):
    c = cid(16, 0)
    cases = [
        (lambda: eng.prepare_write(c, -1, b"x", 1, 1), InvalidArgument),
        (lambda: eng.prepare_write(c, MAXC, b"x", 1, 1), ChunkSizeExceeded),
        (lambda: eng.prepare_write(c, 0, bytes(MAXC + 1), 1, 1), ChunkSizeExceeded),
        (lambda: eng.prepare_write(c, 100, b"x" * 100, 1, 1, chunk_size=150), ChunkSizeExceeded),
        (lambda: eng.prepare_write(c, 0, b"x", 1, 1, chunk_size=2 * MAXC), ChunkSizeExceeded),
        (lambda: eng.prepare_write(c, 0, b"x", 0, 1), InvalidArgument),
        (lambda: eng.prepare_write(c, 0, b"x", 1, -1), InvalidArgument),
        (lambda: eng.prepare_write(b"", 0, b"x", 1, 1), InvalidArgument),
        (lambda: eng.prepare_write(b"x" * 65, 0, b"x", 1, 1), InvalidArgument),
        (lambda: eng.prepare_write("abc", 0, b"x", 1, 1), InvalidArgument),
        (lambda: eng.truncate(c, -5, 1, 1), InvalidArgument),
        (lambda: eng.truncate(c, MAXC + 1, 1, 1), ChunkSizeExceeded),
        (lambda: eng.read(c, -1, 10), InvalidArgument),
        (lambda: eng.read(c, 0, -1), InvalidArgument),
        (lambda: eng.read(c, MAXC, 1), InvalidArgument),
        (lambda: eng.read(c, 0, 10, bytearray(5)), InvalidArgument),
        (lambda: eng.read(c, 0, 10, b"readonly buffer"), InvalidArgument),
        (lambda: eng.install(c, b"abc", ChunkMeta(c, 1, 1, 1, 4, 0)), InvalidArgument),
        (lambda: eng.install(c, b"abc", ChunkMeta(c, 0, 0, 1, 3, crc32c.crc32c(b"abc"))), InvalidArgument),
    ]
    for fn, exc in cases:
        with pytest.raises(exc) as ei:
            fn()
        assert "\n" not in str(ei.value)
    assert eng.get_meta(c) is None and chunk_files(eng) == [] and eng.used_bytes() == 0


def test_second_opener_is_refused(eng):
    with pytest.raises(TargetLocked, match=f"pid {os.getpid()}"):
        SyncChunkEngine(eng.path)
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from flyfs.storage import SyncChunkEngine\n"
                        "try: SyncChunkEngine(sys.argv[1])\n"
                        "except Exception as e: print(type(e).__name__, e)", eng.path],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"TargetLocked target {eng.path} is in use by pid {os.getpid()}"
    path = eng.path
    eng.close()
    SyncChunkEngine(path).close()                       # free again once closed


# ------------------------------------------------------------------ async facade

async def test_async_facade_roundtrip(tmp_path):
    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, max_chunk_size=MAXC) as e:
        c = cid(20, 0)
        data = rnd(3 * BS)
        await e.prepare_write(c, 0, memoryview(data), 1, 1)
        with pytest.raises(ChunkNotCommitted):
            await e.read(c, 0, 10)
        await e.commit(c, 1)
        buf = bytearray(len(data))
        n, meta = await e.read(c, 0, len(data), memoryview(buf))
        assert n == len(data) and buf == data and meta.crc == crc32c.crc32c(data)
        await e.truncate(c, 10, 2, 1)
        await e.commit(c, 2)
        assert (await e.read(c, 0, 100))[0] == data[:10]
        await e.install(cid(20, 1), data, ChunkMeta(cid(20, 1), 4, 4, 1, len(data), crc32c.crc32c(data)))
        assert [m.chunk_id async for m in e.list_metas(cid(20, 0)[:8], page=1)] == [c, cid(20, 1)]
        assert await e.query_last_chunk(c[:8]) == (cid(20, 1), len(data))
        assert (await e.get_meta(c)).length == 10 and e.used_bytes() == 10 + len(data)
        assert (await e.verify(cid(20, 1))).commit_ver == 4
        assert await e.remove([c, cid(20, 1)]) == 2
    with pytest.raises(EngineClosed, match="closed"):
        await e.read(c, 0, 1)


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_nowait_reads_only_from_memory(eng):
    """read(nowait=True) serves bytes in the page cache and raises WouldBlock, touching
    nothing but the buffer, for bytes that are not (then they are read on a thread)."""
    from flyfs.storage.chunk_engine import WouldBlock
    c = cid(21, 0)
    data = rnd(5 * BS)
    eng.prepare_write(c, 0, memoryview(data), 1, 1)
    eng.commit(c, 1)
    buf = bytearray(BS)
    n, meta = eng.read(c, BS + 100, BS, buf, nowait=True)       # just written: cached
    assert n == BS and buf == data[BS + 100:2 * BS + 100] and meta.commit_ver == 1
    _evict(committed_file(eng, c))
    with pytest.raises(WouldBlock):
        eng.read(c, 3 * BS, BS, bytearray(BS), nowait=True)
    assert eng.read(c, 3 * BS, BS, buf)[0] == BS and buf == data[3 * BS:4 * BS]
    assert eng.read(c, 3 * BS, BS, buf, nowait=True)[0] == BS    # cached by the read before
    with pytest.raises(ChunkNotFound):
        eng.read(cid(21, 1), 0, 1, buf, nowait=True)


async def test_async_small_reads_try_memory_first_then_an_engine_thread(tmp_path, monkeypatch):
    from flyfs.storage.chunk_engine import WouldBlock
    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, max_chunk_size=MAXC) as e:
        c = cid(22, 0)
        data = rnd(4 * BS)
        await e.prepare_write(c, 0, memoryview(data), 1, 1)
        await e.commit(c, 1)
        ran, real_run = [], e._pool.run
        monkeypatch.setattr(e._pool, "run", lambda fn: ran.append(fn) or real_run(fn))
        buf = bytearray(BS)
        assert (await e.read(c, BS, BS, buf))[0] == BS and buf == data[BS:2 * BS]
        assert not ran                                  # cached: read on the loop
        assert (await e.read(c, 0, 10))[0] == data[:10]  # no buffer given: an engine thread
        assert len(ran) == 1

        def blocked(*a, **kw):
            raise WouldBlock()
        monkeypatch.setattr(e, "read_now", blocked)
        buf2 = bytearray(BS)
        assert (await e.read(c, 2 * BS, BS, buf2))[0] == BS and buf2 == data[2 * BS:3 * BS]
        assert len(ran) == 2


@pytest.mark.parametrize("sync_writes", [False, True])
async def test_async_commit_updates_the_record_on_the_loop(tmp_path, monkeypatch, sync_writes):
    """Without sync_writes a commit is a metadata put done on the loop, and a replaced
    version's file is removed on an engine thread after it; with sync_writes (the
    commit waits on the disk) it all runs on an engine thread."""
    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, max_chunk_size=MAXC,
                                      sync_writes=sync_writes) as e:
        c = cid(23, 0)
        await e.prepare_write(c, 0, memoryview(rnd(3 * BS)), 1, 1)
        ran, real_run = [], e._pool.run
        monkeypatch.setattr(e._pool, "run", lambda fn: ran.append(fn) or real_run(fn))
        m = await e.commit(c, 1)
        assert m.commit_ver == 1 and len(ran) == (1 if sync_writes else 0)
        first = committed_file(e.sync, c)
        new = rnd(BS)
        await e.prepare_write(c, BS, memoryview(new), 2, 1)        # an overwrite: a new file
        ran.clear()
        m = await e.commit(c, 2)
        assert m.commit_ver == 2 and committed_file(e.sync, c) != first
        assert len(ran) == 1                                        # the removal (or the commit)
        await asyncio.gather(*list(e._inflight))
        assert not os.path.exists(first)
        assert (await e.read(c, BS, BS))[0] == new
        assert (await e.commit(c, 2)).commit_ver == 2                 # again: the same answer
        with pytest.raises(VersionMismatch):
            await e.commit(c, 5)


async def test_async_engine_keeps_empty_files_ready_in_the_background(tmp_path):
    import flyfs.storage.chunk_engine as ce
    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, max_chunk_size=MAXC) as e:
        deadline = time.monotonic() + 10
        while e.sync.spare_files < ce._SPARE_LOW:
            assert time.monotonic() < deadline, f"only {e.sync.spare_files} spare files after 10 s"
            await asyncio.sleep(0.05)
        assert len(spare_files(e.sync)) == ce._SPARE_LOW
        await e.prepare_write(cid(20, 5), 0, b"abc", 1, 1)
        await e.commit(cid(20, 5), 1)
        assert e.sync.spare_files == ce._SPARE_LOW - 1 or e.sync.spare_files == ce._SPARE_LOW  # refilled
        assert (await e.read(cid(20, 5), 0, 10))[0] == b"abc"
    assert not e._spare_maker.is_alive()


async def test_async_updates_of_one_chunk_serialize(tmp_path):
    """Stacked updates launched together must each see the previous one (FIFO, no lost writes)."""
    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, max_chunk_size=MAXC) as e:
        c = cid(21, 0)
        n = 40
        pieces = [bytes([i + 1]) * 1000 for i in range(n)]
        # every other piece lands inside existing data (copy path), the rest append
        offs = [(i * 1000) if i % 2 == 0 else (i - 1) * 1000 + 500 for i in range(n)]
        await asyncio.gather(*(e.prepare_write(c, offs[i], pieces[i], i + 1, 1) for i in range(n)))
        await e.commit(c, n)
        model = bytearray()
        for i in range(n):
            model = apply_write(model, offs[i], pieces[i])
        assert (await e.read(c, 0, MAXC))[0] == model


async def test_async_call_runs_several_steps_under_the_chunk_lock(tmp_path):
    """`call` runs a function of the sync core in one trip, serialized with the other
    updates of the same chunk (FIFO), so look-up-then-write sequences never interleave."""
    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, max_chunk_size=MAXC) as e:
        c = cid(22, 0)

        def bump(core):
            m = core.get_meta(c)
            v = (m.commit_ver if m else 0) + 1
            core.prepare_write(c, 0, v.to_bytes(4, "big"), v, 1)
            return core.commit(c, v).commit_ver

        got = await asyncio.gather(*(e.call([c], bump) for _ in range(20)))
        assert sorted(got) == list(range(1, 21))
        assert (await e.read(c, 0, 4))[0] == (20).to_bytes(4, "big")
        with pytest.raises(InvalidArgument):
            await e.call([b""], bump)


async def test_async_different_chunks_run_in_parallel(tmp_path):
    gate = threading.Event()
    entered = threading.Event()

    def hook(point):
        if point == "prepare.synced" and threading.current_thread().name.startswith("chunk-engine") \
                and not gate.is_set() and getattr(hook, "armed", True):
            hook.armed = False
            entered.set()
            assert gate.wait(30)

    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, fault_hook=hook) as e:
        slow = asyncio.create_task(e.prepare_write(cid(22, 0), 0, b"slow", 1, 1))
        assert await asyncio.to_thread(entered.wait, 30)
        # another chunk completes while the first update is stuck in the middle
        meta = await asyncio.wait_for(e.prepare_write(cid(22, 1), 0, b"fast", 1, 1), 30)
        await e.commit(cid(22, 1), 1)
        assert meta.pending_length == 4 and not slow.done()
        # ... and the same chunk waits for it
        same = asyncio.create_task(e.commit(cid(22, 0), 1))
        await asyncio.sleep(0.05)
        assert not same.done()
        gate.set()
        await slow
        assert (await same).commit_ver == 1
        assert (await e.read(cid(22, 0), 0, 10))[0] == b"slow"


def test_unsynced_writes_wait_for_sync_dirty(tmp_path, monkeypatch):
    """sync_writes=False: no fdatasync or WAL sync per update; sync_dirty() syncs
    exactly the files written since the last one, then nothing is dirty."""
    import flyfs.storage.chunk_engine as ce
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd):
        synced.append(fd)
        real(fd)
    monkeypatch.setattr(ce.os, "fdatasync", counting)
    e = SyncChunkEngine(str(tmp_path / "u"), block_size=BS, max_chunk_size=MAXC, sync_writes=False)
    try:
        assert not e.dirty
        for i in range(3):
            e.prepare_write(cid(40, i), 0, b"x" * 5000, 1, 1)
            e.commit(cid(40, i), 1)
        e.prepare_write(cid(40, 0), 5000, b"y" * 100, 2, 1)   # append: same file again
        e.commit(cid(40, 0), 2)
        assert synced == [] and e.dirty
        assert e.sync_dirty() == 3
        assert len(synced) == 3 and not e.dirty
        assert e.sync_dirty() == 0 and len(synced) == 3
        e.remove([cid(40, 1)])
        assert e.dirty                                     # the removal awaits a WAL sync
        e.sync_dirty()
        assert not e.dirty
        assert e.read(cid(40, 0), 0, MAXC)[0] == b"x" * 5000 + b"y" * 100
    finally:
        e.close()
    e = SyncChunkEngine(str(tmp_path / "u"), block_size=BS, max_chunk_size=MAXC)
    try:
        assert e.get_meta(cid(40, 1)) is None and e.read(cid(40, 2), 0, MAXC)[0] == b"x" * 5000
    finally:
        e.close()


@pytest.mark.parametrize("aligned_buffer", [True, False], ids=["aligned", "bounced"])
def test_large_writes_go_direct_and_read_back(tmp_path, monkeypatch, aligned_buffer):
    """Runs of whole aligned blocks >= 64 KiB are written with O_DIRECT (from the buffer
    itself when it is aligned, else through a bounce buffer), the partial blocks at the
    ends through the page cache; appends, overwrites (copy) and reopen all read back."""
    import mmap
    import flyfs.storage.chunk_engine as ce
    probe = str(tmp_path / "probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as e:
        pytest.skip(f"the file system under {tmp_path} has no O_DIRECT ({e.strerror})")
    direct_opens = []
    real_open = os.open

    def spy(path, flags, *a):
        if flags & os.O_DIRECT:
            direct_opens.append(path)
        return real_open(path, flags, *a)
    monkeypatch.setattr(ce.os, "open", spy)
    maxc = 4 << 20
    e = SyncChunkEngine(str(tmp_path / "d"), block_size=BS, max_chunk_size=maxc, sync_writes=False)
    rng = random.Random(7)

    def payload(n):
        data = rng.randbytes(n)
        if not aligned_buffer:
            return memoryview(data)
        m = mmap.mmap(-1, max(n, 1))
        m[:n] = data
        return memoryview(m)[:n]
    model = bytearray()
    c = cid(50, 0)
    try:
        steps = [(0, 300_000), (300_000, 1_000_000), (1_300_000, 5), (123_457, 200_000), (0, 4096 * 20)]
        for v, (off, n) in enumerate(steps, 1):
            mv = payload(n)
            e.prepare_write(c, off, mv, v, 1)
            e.commit(c, v)
            model = apply_write(model, off, bytes(mv))
            data, meta = e.read(c, 0, maxc)
            assert data == model and meta.crc == crc32c.crc32c(model)
        assert len(direct_opens) >= 3, "large aligned runs were not written with O_DIRECT"
        e.verify(c)
        # whole aligned blocks into an aligned buffer are read with O_DIRECT too
        before = len(direct_opens)
        out = memoryview(mmap.mmap(-1, 1 << 20))
        for off, n in [(0, 1 << 20), (65536, 300_000), (1 << 20, 1_300_005 - (1 << 20))]:
            got, _ = e.read(c, off, n, out)
            assert got == n and out[:n] == model[off:off + n]
        assert len(direct_opens) == before + 2          # the last read ends mid-block: buffered
    finally:
        e.close()
    e = SyncChunkEngine(str(tmp_path / "d"), block_size=BS, max_chunk_size=maxc)
    try:
        assert e.read(c, 0, maxc)[0] == model
    finally:
        e.close()


def test_no_o_direct_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """A file system without O_DIRECT (tmpfs answers EINVAL) is written through the page cache."""
    import flyfs.storage.chunk_engine as ce
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(ce.os, "open", no_direct)
    e = SyncChunkEngine(str(tmp_path / "n"), block_size=BS, max_chunk_size=MAXC)
    try:
        data = os.urandom(512 * 1024)
        e.prepare_write(cid(51, 0), 0, data, 1, 1)
        e.commit(cid(51, 0), 1)
        assert e.read(cid(51, 0), 0, MAXC)[0] == data
        assert not e._direct.enabled
    finally:
        e.close()


def test_close_syncs_what_is_dirty(tmp_path):
    e = SyncChunkEngine(str(tmp_path / "c"), block_size=BS, max_chunk_size=MAXC, sync_writes=False)
    e.prepare_write(cid(41, 0), 0, b"z" * 100, 1, 1)
    e.commit(cid(41, 0), 1)
    assert e.dirty
    e.close()
    assert not e.dirty


# ------------------------------------------------------------------ crash safety with real processes

CRASH_IDS = [cid(30, i) for i in range(6)]
CRASH_MAXC = 256 * 1024


INLINE_BS = 16 * 1024   # the crash tests with inline chunks: 16 KiB blocks, versions up to 16 KiB inline


def child_main(path: str, seed: int, point: str, hits: int, sync_writes: bool = True,
               inline: bool = False) -> None:
    """Write and commit in a loop, reporting intents (P, r) and acknowledgements (A, R).
    With ``inline``, chunks stay around the inline limit, crossing it both ways."""
    count = [0]

    def hook(p):
        if p == point:
            count[0] += 1
            if count[0] >= hits:
                os.kill(os.getpid(), signal.SIGKILL)

    rng = random.Random(seed)
    small = 8 if inline else 1
    eng = SyncChunkEngine(path, block_size=INLINE_BS if inline else BS, max_chunk_size=CRASH_MAXC,
                          fault_hook=hook if point else None, sync_writes=sync_writes,
                          inline_max=INLINE_BS if inline else 0)
    models, vers = {}, {}
    for i, c in enumerate(CRASH_IDS):
        meta = eng.get_meta(c)
        if meta is not None and meta.has_pending:
            meta = eng.abort(c)
        models[i] = eng.read(c, 0, CRASH_MAXC)[0] if meta is not None else bytearray()
        vers[i] = meta.commit_ver if meta is not None else 0
    out = sys.stdout

    def say(line):
        out.write(line + "\n")
        out.flush()

    say("READY")
    while True:
        i = rng.randrange(len(CRASH_IDS))
        c, m, v = CRASH_IDS[i], models[i], vers[i] + 1
        r = rng.random()
        if r < 0.05 and m:
            say(f"r {i}")
            eng.remove([c])
            say(f"R {i}")
            models[i], vers[i] = bytearray(), 0
            continue
        if r < 0.1:
            data = rng.randbytes(rng.randrange(0, 40000 // small))
            crc = crc32c.crc32c(data)
            say(f"P {i} {v} {crc} {len(data)}")
            eng.install(c, data, ChunkMeta(c, v, v, 1, len(data), crc))
            say(f"A {i} {v} {crc} {len(data)}")
            models[i], vers[i] = bytearray(data), v
            continue
        new = m
        for _ in range(1 if r < 0.9 else 2):            # sometimes two stacked updates
            kind = rng.random()
            if kind < 0.15:
                length = rng.randrange(0, CRASH_MAXC // 2 // small)
                eng.truncate(c, length, v, 1)
                new = apply_truncate(new, length)
            else:
                n = rng.randrange(1, 40000 // small)
                off = (len(new) if kind < 0.55 else rng.randrange(0, len(new) + 1) if kind < 0.9
                       else len(new) + rng.randrange(1, 10000 // small))
                off = min(off, CRASH_MAXC - n)
                data = rng.randbytes(n)
                meta = eng.prepare_write(c, off, data, v, 1)
                new = apply_write(new, off, data)
                assert meta.pending_crc == crc32c.crc32c(new), "pending crc differs from the model"
            v += 1
        v -= 1
        crc = crc32c.crc32c(new)
        say(f"P {i} {v} {crc} {len(new)}")
        eng.commit(c, v)
        say(f"A {i} {v} {crc} {len(new)}")
        models[i], vers[i] = new, v


ABSENT = ("absent",)


def run_child(path: str, seed: int, *, point: str = "", hits: int = 0, kill_after: float | None = None,
              sync_writes: bool = True, inline: bool = False):
    """Run one child until it dies by SIGKILL; returns its complete output lines."""
    argv = [sys.executable, os.path.abspath(__file__), "child", path, str(seed), point, str(hits),
            "1" if sync_writes else "0", "1" if inline else "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        buf = b""
        while True:
            b = proc.stdout.read1(65536)
            if not b:
                break
            buf += b
            *done, buf = buf.split(b"\n")
            for ln in done:
                lines.append(ln.decode(errors="replace"))
                if ln == b"READY":
                    ready.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        assert ready.wait(60), f"child never got ready: {lines}"
        if kill_after is not None:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        t.join(10)
        proc.stdout.close()
    assert rc == -signal.SIGKILL, f"child exited with {rc}: {lines[-20:]}"
    return lines


def check_after_crash(path: str, lines: list[str], state: dict[int, tuple]) -> None:
    """Every acknowledged commit is there (or the one in flight), and reads back exactly."""
    maybe: dict[int, tuple] = {}
    for ln in lines:
        f = ln.split()
        if not f or f[0] not in ("P", "A", "r", "R"):
            continue
        i = int(f[1])
        st = (int(f[2]), int(f[3]), int(f[4])) if f[0] in ("P", "A") else ABSENT
        if f[0] in ("P", "r"):
            maybe[i] = st
        else:
            state[i] = st
            maybe.pop(i, None)
    eng = SyncChunkEngine(path, block_size=BS, max_chunk_size=CRASH_MAXC, inline_max=INLINE_BS)
    try:
        referenced = set()
        referenced_keys = set()

        def note(c, rec):
            if rec.seq & _INLINE:
                referenced_keys.add(_data_key(c, rec.seq))
            else:
                referenced.add(eng._file(c, rec.seq))
        for i, c in enumerate(CRASH_IDS):
            meta = eng.get_meta(c)
            if meta is None or not meta.committed:
                got = ABSENT
            else:
                data, m = eng.read(c, 0, CRASH_MAXC)
                assert m.crc == crc32c.crc32c(data) and m.length == len(data)
                eng.verify(c)
                got = (m.commit_ver, crc32c.crc32c(data), len(data))
                note(c, eng._load(c)[0])
            if meta is not None and meta.has_pending:
                note(c, eng._load(c)[1])
            allowed = {state.get(i, ABSENT), maybe.get(i, state.get(i, ABSENT))}
            assert got in allowed, f"chunk {i}: found {got}, acknowledged {allowed}"
            state[i] = got
        assert set(chunk_files(eng)) == referenced     # crash leftovers were collected
        assert set(inline_keys(eng)) == referenced_keys
    finally:
        eng.close()


@pytest.mark.parametrize("sync_writes,inline", [(True, False), (False, False), (False, True)],
                         ids=["synced", "unsynced", "unsynced-inline"])
def test_crash_random_sigkill(tmp_path, sync_writes, inline):
    """Without per-update syncs too: a killed process leaves its writes in the kernel.
    And with small chunks kept inline in the metadata store."""
    path = str(tmp_path / "crash")
    rng = random.Random(os.getpid())
    state: dict[int, tuple] = {}
    acked = 0
    for run in range(5):
        lines = run_child(path, rng.randrange(1 << 30), kill_after=rng.uniform(0.05, 0.8),
                          sync_writes=sync_writes, inline=inline)
        acked += sum(ln.startswith("A ") for ln in lines)
        check_after_crash(path, lines, state)
    assert acked >= 5, "the children made too little progress to test anything"


@pytest.mark.parametrize("point", ["prepare.written", "prepare.synced", "prepare.stored",
                                   "commit.before", "commit.synced", "install.before", "remove.synced"])
@pytest.mark.parametrize("sync_writes,inline", [(True, False), (False, False), (False, True)],
                         ids=["synced", "unsynced", "unsynced-inline"])
def test_crash_at_each_step(tmp_path, point, sync_writes, inline):
    path = str(tmp_path / "crash")
    state: dict[int, tuple] = {}
    rng = random.Random(point)
    for run in range(2):
        lines = run_child(path, rng.randrange(1 << 30), point=point, hits=rng.randrange(1, 15),
                          sync_writes=sync_writes, inline=inline)
        check_after_crash(path, lines, state)


# ------------------------------------------------------------------ small chunks inline

@pytest.fixture
def ieng(tmp_path):
    e = SyncChunkEngine(str(tmp_path / "inline"), block_size=BS, max_chunk_size=MAXC, inline_max=BS,
                        sync_writes=False)
    yield e
    e.close()


def test_small_chunks_live_in_the_metadata_store(ieng):
    """Versions up to inline_max bytes: no file; bytes next to the record; a commit drops
    the version it replaced; growing past the limit moves the chunk to a file with its
    bytes, shrinking back brings it inline again; reads, verify and removal as for files."""
    eng, c = ieng, cid(50, 0)
    a = rnd(1000)
    m = eng.prepare_write(c, 0, a, 1, 1)
    assert m.pending_length == 1000 and m.pending_crc == crc32c.crc32c(a)
    with pytest.raises(ChunkNotCommitted):
        eng.read(c, 0, 10)
    eng.commit(c, 1)
    assert chunk_files(eng) == [] and len(inline_keys(eng)) == 1
    assert eng.read(c, 0, 4096)[0] == a and eng.read(c, 10, 20)[0] == a[10:30]
    model = apply_write(a, 500, b"x" * 3000)                 # 3500 bytes: still inline
    eng.prepare_write(c, 500, b"x" * 3000, 2, 1)
    assert len(inline_keys(eng)) == 2                        # committed and pending
    assert eng.read(c, 0, 4096)[0] == a                      # readers see the committed one
    eng.commit(c, 2)
    assert len(inline_keys(eng)) == 1 and eng.read(c, 0, 4096)[0] == model
    model = apply_write(model, 3000, rnd(3 * BS))            # past inline_max: a file
    eng.prepare_write(c, 3000, model[3000:], 3, 1)
    eng.commit(c, 3)
    assert len(chunk_files(eng)) == 1 and inline_keys(eng) == []
    assert eng.read(c, 0, MAXC)[0] == model and eng.verify(c).length == len(model)
    model = apply_truncate(model, 100)                       # a shrink of a file shares it
    eng.truncate(c, 100, 4, 1)
    eng.commit(c, 4)
    assert eng.read(c, 0, MAXC)[0] == model
    model = apply_write(model, 100, b"tail")                 # then the next update is inline
    eng.prepare_write(c, 100, b"tail", 5, 1)
    eng.commit(c, 5)
    assert chunk_files(eng) == [] and len(inline_keys(eng)) == 1
    assert eng.read(c, 0, MAXC)[0] == model
    model = apply_truncate(model, 3000)                      # an extending truncate, inline
    eng.truncate(c, 3000, 6, 1)
    eng.commit(c, 6)
    assert eng.read(c, 0, MAXC)[0] == model and eng.verify(c).crc == crc32c.crc32c(model)
    assert eng.used_bytes() == 3000
    eng.prepare_write(c, 0, b"dropped", 7, 1)
    assert eng.abort(c).commit_ver == 6 and len(inline_keys(eng)) == 1
    assert eng.remove([c]) == 1 and inline_keys(eng) == [] and eng.used_bytes() == 0


def test_inline_max_zero_keeps_every_chunk_in_a_file(eng):
    for i, (off, data) in enumerate([(0, b""), (0, b"x"), (5, b"yz")]):
        c = cid(55, i)
        eng.prepare_write(c, off, data, 1, 1)
        eng.commit(c, 1)
    eng.truncate(cid(55, 3), 0, 1, 1)
    eng.commit(cid(55, 3), 1)
    assert inline_keys(eng) == [] and len(chunk_files(eng)) == 4


def test_a_damaged_inline_chunk_is_an_error_never_data(ieng):
    eng, c = ieng, cid(51, 0)
    eng.prepare_write(c, 0, b"precious bytes", 1, 1)
    eng.commit(c, 1)
    key, = inline_keys(eng)
    eng._db.put(key, b"precious bytez")
    with pytest.raises(ChecksumMismatch):
        eng.read(c, 0, 100)
    with pytest.raises(ChecksumMismatch):                    # nor laundered into an update
        eng.prepare_write(c, 0, b"P", 2, 1)
    eng._db.delete(key)
    with pytest.raises(ChunkCorrupted):
        eng.read(c, 0, 100)


def test_install_and_recovery_with_inline_chunks(tmp_path):
    """A resync install of a small chunk is inline; at open, inline bytes no record names
    are removed and a pending version whose bytes are gone is dropped."""
    path = str(tmp_path / "t")
    eng = SyncChunkEngine(path, block_size=BS, max_chunk_size=MAXC, inline_max=BS, sync_writes=False)
    a, b = cid(52, 0), cid(52, 1)
    data = rnd(2000)
    eng.install(a, data, ChunkMeta(a, 3, 3, 1, len(data), crc32c.crc32c(data)))
    assert chunk_files(eng) == [] and eng.read(a, 0, MAXC)[0] == data
    eng.prepare_write(b, 0, b"one", 1, 1)
    eng.commit(b, 1)
    eng.prepare_write(b, 0, b"two", 2, 1)
    orphan = _data_key(b, 999 | _INLINE)
    eng._db.put(orphan, b"left by a crash")
    pending_key = _data_key(b, eng._load(b)[1].seq)
    eng._db.delete(pending_key)
    eng.close()
    eng = SyncChunkEngine(path, block_size=BS, max_chunk_size=MAXC, inline_max=BS)
    try:
        assert eng.recovery["garbage_files"] == 1 and eng.recovery["dropped_pending"] == 1
        assert orphan not in inline_keys(eng)
        m = eng.get_meta(b)
        assert m.commit_ver == 1 and not m.has_pending and eng.read(b, 0, 10)[0] == b"one"
        assert eng.read(a, 0, MAXC)[0] == data and eng.get_meta(a).commit_ver == 3
        assert eng._next_seq > 999          # sequence numbers of inline versions count too
    finally:
        eng.close()


def test_run_now_stages_small_updates_without_files_and_refuses_the_rest(ieng):
    """run_now (the loop's way in): an inline update completes; one that needs a file
    raises WouldBlock having changed nothing; a file a record stopped naming is handed
    back for removal elsewhere."""
    from flyfs.storage.chunk_engine import WouldBlock
    eng, c = ieng, cid(53, 0)
    meta, deferred = eng.run_now(eng.prepare_write, c, 0, b"small", 1, 1)
    assert meta.pending_length == 5 and deferred == []
    (meta, deferred) = eng.run_now(eng.commit, c, 1)
    assert meta.commit_ver == 1 and eng.read(c, 0, 10)[0] == b"small"
    big = rnd(2 * BS)
    with pytest.raises(WouldBlock):
        eng.run_now(eng.prepare_write, c, 0, big, 2, 1)
    assert eng.get_meta(c).update_ver == 1 and chunk_files(eng) == []
    eng.prepare_write(c, 0, big, 2, 1)                       # on a thread: a file
    eng.commit(c, 2)
    file_, = chunk_files(eng)
    with pytest.raises(WouldBlock):                          # a write into the file's bytes
        eng.run_now(eng.prepare_write, c, 10, b"x", 3, 1)
    with pytest.raises(WouldBlock):                          # a cut inside a block reads it
        eng.run_now(eng.truncate, c, 100, 3, 1)
    meta, deferred = eng.run_now(eng.truncate, c, BS, 3, 1)   # at a block boundary: no read
    assert meta.pending_length == BS and deferred == []
    eng.commit(c, 3)
    whole = rnd(BS)
    meta, deferred = eng.run_now(eng.prepare_write, c, 0, whole, 4, 1)  # all of it: inline again
    assert deferred == []
    meta, deferred = eng.run_now(eng.commit, c, 4)
    assert deferred and os.path.exists(file_)                # the file is left to the caller
    eng.unlink_later(deferred)
    assert chunk_files(eng) == [] and eng.read(c, 0, MAXC)[0] == whole
    eng.prepare_write(c, 0, b"?", 5, 1)
    with pytest.raises(WouldBlock):
        eng.run_now(eng.abort, c)
    assert eng.get_meta(c).has_pending
    sync = SyncChunkEngine(eng.path + "-synced", block_size=BS, inline_max=BS)
    try:
        with pytest.raises(WouldBlock):                      # every update waits on a sync
            sync.run_now(sync.prepare_write, c, 0, b"x", 1, 1)
    finally:
        sync.close()


async def test_async_small_updates_skip_the_engine_threads(tmp_path, monkeypatch):
    async with await ChunkEngine.open(str(tmp_path / "a"), block_size=BS, max_chunk_size=MAXC,
                                      sync_writes=False, inline_max=BS) as e:
        ran, real_run = [], e._pool.run
        monkeypatch.setattr(e._pool, "run", lambda fn: ran.append(fn) or real_run(fn))
        c = cid(54, 0)
        await e.prepare_write(c, 0, b"hello", 1, 1)
        await e.commit(c, 1)
        assert (await e.read(c, 0, 5, bytearray(5)))[0] == 5
        assert ran == []
        data = rnd(3 * BS)
        await e.prepare_write(c, 0, data, 2, 1)                  # a file: on an engine thread
        assert len(ran) == 1
        await e.commit(c, 2)
        assert (await e.read(c, 0, MAXC))[0] == data


# ------------------------------------------------------------------ benchmark (prints, never asserts speed)

def _rate(nbytes, secs):
    return f"{nbytes / secs / 1e6:8.1f} MB/s"


def _drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.slow
def test_benchmark_engine_vs_raw_files(tmp_path):
    """Raw and engine runs alternate chunk by chunk so both see the same machine load."""
    total = 256 << 20
    chunk = 4 << 20
    nchunks = total // chunk
    src = memoryview(os.urandom(chunk))
    print(f"\nchunk engine vs raw files, {total >> 20} MiB in {chunk >> 20} MiB chunks, block crc 64 KiB")
    rows = []
    for piece in (1 << 20, 4 << 20):
        raw_dir = tmp_path / f"raw{piece}"
        raw_dir.mkdir()
        eng = SyncChunkEngine(str(tmp_path / f"eng{piece}"), max_chunk_size=64 << 20)
        t_raw = t_eng = 0.0
        for k in range(nchunks):
            t0 = time.perf_counter()
            fd = os.open(raw_dir / f"f{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for off in range(0, chunk, piece):
                os.pwrite(fd, src[off:off + piece], off)
                os.fdatasync(fd)
            os.close(fd)
            t1 = time.perf_counter()
            for v, off in enumerate(range(0, chunk, piece), 1):
                eng.prepare_write(cid(1, k), off, src[off:off + piece], v, 1)
                eng.commit(cid(1, k), v)
            t2 = time.perf_counter()
            t_raw += t1 - t0
            t_eng += t2 - t1
        rows.append((f"write+commit {piece >> 20} MiB", t_eng, t_raw))
        buf = memoryview(bytearray(piece))
        for cold in (False, True):
            t_raw = t_eng = 0.0
            for k in range(nchunks):
                if cold:
                    _drop_cache(str(raw_dir / f"f{k}"))
                    _drop_cache(committed_file(eng, cid(1, k)))
                t0 = time.perf_counter()
                fd = os.open(raw_dir / f"f{k}", os.O_RDONLY)
                for off in range(0, chunk, piece):
                    os.preadv(fd, [buf], off)
                os.close(fd)
                t1 = time.perf_counter()
                for off in range(0, chunk, piece):
                    eng.read(cid(1, k), off, piece, buf)
                t2 = time.perf_counter()
                t_raw += t1 - t0
                t_eng += t2 - t1
            rows.append((f"read {piece >> 20} MiB {'cold' if cold else 'hot'}", t_eng, t_raw))
        eng.close()
    print(f"{'operation':<24}{'engine':>14}{'raw file':>16}{'engine/raw':>12}")
    for name, e, r in rows:
        print(f"{name:<24}{_rate(total, e):>14}{_rate(total, r):>16}{r / e:>11.2f}x")

    # small random reads: per-block crcs vs verifying the whole chunk (block = chunk)
    print("random 4 KiB reads from 4 MiB chunks (hot cache):")
    for bs in (16 << 10, 64 << 10, 4 << 20):
        eng = SyncChunkEngine(str(tmp_path / f"blk{bs}"), block_size=bs)
        for k in range(8):
            eng.prepare_write(cid(2, k), 0, src, 1, 1)
            eng.commit(cid(2, k), 1)
        rng = random.Random(0)
        buf = memoryview(bytearray(4096))
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            eng.read(cid(2, rng.randrange(8)), rng.randrange(0, chunk - 4096), 4096, buf)
        dt = time.perf_counter() - t0
        print(f"  block {bs >> 10:>5} KiB: {dt / n * 1e6:8.1f} us/read")
        eng.close()

    # partial overwrite: copy-on-write cost vs append
    print("4 KiB update + commit of a full chunk:")
    for size in (4 << 20, 64 << 20):
        eng = SyncChunkEngine(str(tmp_path / f"cow{size}"), max_chunk_size=64 << 20)
        big = memoryview(os.urandom(size))
        c = cid(3, 0)
        eng.prepare_write(c, 0, big[:size - (1 << 20)], 1, 1)  # leave room for the appends
        eng.commit(c, 1)
        v = 1
        for label, off_fn in (("overwrite (copy)", lambda: size // 2), ("append (in place)", None)):
            t0 = time.perf_counter()
            reps = 10
            for _ in range(reps):
                v += 1
                off = off_fn() if off_fn else eng.get_meta(c).length
                eng.prepare_write(c, off, big[:4096], v, 1)
                eng.commit(c, v)
            dt = time.perf_counter() - t0
            print(f"  {size >> 20:>3} MiB chunk, {label:<18}: {dt / reps * 1e3:8.2f} ms")
        eng.close()


@pytest.mark.slow
async def test_benchmark_async_parallel_writes(tmp_path):
    chunk = 4 << 20
    src = memoryview(os.urandom(chunk))
    nchunks = 64
    async with await ChunkEngine.open(str(tmp_path / "a"), max_chunk_size=64 << 20) as e:
        for conc in (1, 4, 8):
            t0 = time.perf_counter()
            sem = asyncio.Semaphore(conc)

            async def one(k):
                async with sem:
                    c = cid(conc, k)
                    await e.prepare_write(c, 0, src, 1, 1)
                    await e.commit(c, 1)

            await asyncio.gather(*(one(k) for k in range(nchunks)))
            dt = time.perf_counter() - t0
            print(f"\nasync write+commit 4 MiB chunks, {conc} in flight: {_rate(nchunks * chunk, dt)}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "child":
        child_main(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "",
                   int(sys.argv[5]) if len(sys.argv) > 5 else 0,
                   sys.argv[6] != "0" if len(sys.argv) > 6 else True,
                   len(sys.argv) > 7 and sys.argv[7] == "1")
