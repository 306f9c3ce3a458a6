"""Sequential read-ahead (io.ReadAhead) and the write-behind fast path (write_buffered)
that the FUSE mount uses: the pure logic with a fake fetch, then both on a real cluster."""
from __future__ import annotations

import concurrent.futures
import os
import threading
import uuid

import pytest

from flyfs.client.io import ReadAhead
from test_client_cluster import CHUNK, fly, fs  # noqa: F401 (fixtures)

B = 1000


class FakeFile:
    """Bytes behind a fetch function that records what was asked for."""

    def __init__(self, data: bytes, fail_at: int | None = None):
        self.data = bytearray(data)
        self.gen = 0
        self.calls: list[tuple[int, int]] = []
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def fetch(self, off: int, n: int) -> concurrent.futures.Future:
        with self.lock:
            self.calls.append((off, n))
        f = concurrent.futures.Future()
        if self.fail_at is not None and off <= self.fail_at < off + n:
            f.set_exception(OSError(5, "injected"))
        else:
            f.set_result(bytes(self.data[off:off + n]))
        return f

    def ra(self, depth: int = 3) -> ReadAhead:
        return ReadAhead(self.fetch, lambda: len(self.data), lambda: self.gen, block=B, depth=depth)


def test_sequential_reads_are_served_from_blocks_fetched_ahead():
    f = FakeFile(os.urandom(10 * B + 123))
    ra = f.ra()
    assert ra.read(0, 300) is None          # the first read is not known to be sequential
    assert f.calls == []
    got, off = [], 300
    while off < len(f.data):
        n = min(300, len(f.data) - off)
        piece = ra.read(off, n)
        if piece is None:                   # only the short tail of the file is left to the caller
            assert off + n > 10 * B
            piece = bytes(f.data[off:off + n])
        got.append(piece)
        off += n
    assert b"".join(got) == bytes(f.data[300:])
    assert ra.hits > 30
    starts = [c[0] for c in f.calls]
    assert starts == sorted(set(starts)), "each block fetched once, in order"
    assert all(s < len(f.data) for s in starts) and f.calls[-1] == (10 * B, 123)


def test_random_reads_fetch_nothing():
    f = FakeFile(os.urandom(50 * B))
    ra = f.ra()
    for off in (7 * B, 31 * B + 5, 2 * B, 40 * B):
        assert ra.read(off, 100) is None
    assert f.calls == [] and ra.hits == 0


def test_a_read_spanning_blocks_joins_them():
    f = FakeFile(os.urandom(8 * B))
    ra = f.ra(depth=4)
    ra.read(0, 10)
    assert ra.read(10, 2 * B + 50) == bytes(f.data[10:2 * B + 60])


def test_a_change_of_generation_drops_fetched_blocks():
    f = FakeFile(b"a" * (6 * B))
    ra = f.ra()
    ra.read(0, 100)
    assert ra.read(100, 100) == b"a" * 100
    f.data[:] = b"b" * (6 * B)
    f.gen += 1                               # the bytes changed through this client
    assert ra.read(200, 100) == b"b" * 100   # refetched, never the old block


def test_a_failed_fetch_is_left_to_the_direct_read():
    f = FakeFile(os.urandom(6 * B), fail_at=B + 1)
    ra = f.ra()
    ra.read(0, 100)
    assert ra.read(100, 100) == bytes(f.data[100:200])
    assert ra.read(B, 100) is None           # block 1 failed: the caller reads (and sees the error)


def test_nothing_is_fetched_beyond_the_known_end():
    f = FakeFile(os.urandom(2 * B + 500))
    ra = f.ra(depth=8)
    for off in range(0, 2 * B + 400, 100):
        ra.read(off, 100)
    assert f.calls == [(0, B), (B, B), (2 * B, 500)]
    assert ra.read(2 * B + 400, 200) is None  # past the end: the direct read asks for the length


def test_the_window_grows_with_the_sequential_run():
    f = FakeFile(os.urandom(64 * B))
    ra = f.ra(depth=8)
    ra.read(0, 100)
    ra.read(100, 100)
    assert len(f.calls) <= 2                 # a short reader pulls little
    off = 200
    while off < 20 * B:
        assert ra.read(off, 100) == bytes(f.data[off:off + 100])
        off += 100
    ahead = max(c[0] for c in f.calls) // B - (off - 100) // B
    assert 4 <= ahead <= 8                   # then up to `depth` blocks ahead


def test_bad_arguments():
    with pytest.raises(ValueError):
        ReadAhead(lambda o, n: None, lambda: 0, lambda: 0, block=0)


# ---- on a cluster ------------------------------------------------------------------------------------------

def test_write_buffered_then_read_ahead_through_a_handle(fs):
    """What a FlyFile does: 128 KiB-style writes mostly through the fast path, then
    sequential reads mostly from read-ahead, and a pwrite in between is seen."""
    d = "/ra-" + uuid.uuid4().hex[:8]
    fs.mkdir(d)
    p = f"{d}/f"
    payload = os.urandom(3 * (1 << 20) + 4321)
    core = fs.core
    h = fs._run_core("open_handle", p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fast = 0
        step = 32 * 1024
        for off in range(0, len(payload), step):
            piece = payload[off:off + step]
            if core.write_buffered(h, piece, off):
                fast += 1
            else:
                assert fs._run_core("write_behind", h, piece, off) == len(piece)
        assert fast > len(payload) // step // 2
        assert h.size == len(payload)
        fs._run_core("flush", h)
        assert fs.stat(p).st_size == len(payload)

        ra = fs.readahead(h)
        assert ra is not None
        out = bytearray()
        step = 128 * 1024
        for off in range(0, len(payload), step):
            n = min(step, len(payload) - off)
            if off == 2 * (1 << 20):          # rewrite ahead of the reader, through the same client
                fs._run_core("pwrite", h, b"Z" * 1000, off + 10)
                payload = payload[:off + 10] + b"Z" * 1000 + payload[off + 1010:]
            piece = ra.read(off, n)
            if piece is None:
                piece = fs._run_core("pread", h, n, off)
            out += piece
        assert bytes(out) == payload
        assert ra.hits > 10
        ra.clear()
    finally:
        fs._run_core("close_handle", h)
    assert fs.read_bytes(p) == payload


def test_write_buffered_refuses_what_it_cannot_do(fs):
    d = "/rb-" + uuid.uuid4().hex[:8]
    fs.mkdir(d)
    core = fs.core
    h = fs._run_core("open_handle", f"{d}/f", os.O_WRONLY | os.O_CREAT, 0o644)
    r = fs._run_core("open_handle", f"{d}/f", os.O_RDONLY)
    try:
        assert core.write_buffered(h, b"x" * 10, 0)             # starts a buffer
        assert core.write_buffered(h, b"x" * 2, 10)             # extends it
        assert fs._run_core("pread", r, 100, 0) == b"x" * 12    # a read waits for it
        assert core.write_buffered(h, b"y" * 3, 12)             # drained by the read: a new one
        assert not core.write_buffered(h, b"y" * 10, 100)       # not contiguous with it
        assert core.write_buffered(h, b"y" * 5, 15)             # contiguous
        full = core._s.config.write_buffer
        assert not core.write_buffered(h, b"z" * full, 20)      # would fill the buffer
        assert not core.write_buffered(r, b"z", 20)             # not open for writing
    finally:
        fs._run_core("close_handle", h)
        fs._run_core("close_handle", r)
    assert not core.write_buffered(h, b"w", 20)                  # closed
    assert fs.read_bytes(f"{d}/f") == b"x" * 12 + b"y" * 8


def test_flush_needed_and_cached_attributes(fs):
    """The FUSE flush and fgetattr skip the hop to the loop only when that changes nothing."""
    d = "/fn-" + uuid.uuid4().hex[:8]
    fs.mkdir(d)
    core = fs.core
    h = fs._run_core("open_handle", f"{d}/f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert not core.flush_needed(h)
        assert core.fgetattr_cached(h, 0.0) is None
        n = core.fgetattr_cached(h, 60.0)
        assert n is not None and n.size == 0 and n.ino == h.ino
        assert fs._run_core("write_behind", h, b"abc", 0) == 3
        assert core.flush_needed(h)                          # buffered bytes
        assert core.fgetattr_cached(h, 60.0).size == 3       # this client's writes included
        fs._run_core("flush", h)
        assert not core.flush_needed(h)
        r = fs._run_core("open_handle", f"{d}/f", os.O_RDONLY)
        assert fs.stat(f"{d}/f").st_size == 3 and not core.flush_needed(r)
        fs._run_core("close_handle", r)
        assert core.flush_needed(r)                          # closed: flush reports EBADF
        assert core.fgetattr_cached(r, 60.0) is None
    finally:
        fs._run_core("close_handle", h)
