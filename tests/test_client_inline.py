"""Small files held by the metadata service, through the client library: what a
small file costs (no chunk write), growing past inline_max, truncation, two clients,
and a randomized run against a local shadow file around the threshold."""
import os
import random
import time

import pytest

from flyfs.metaserver import schema as s
from test_client_cluster import fly, fs  # noqa: F401 (fixtures)


def _inline_key(fly, ino):
    svc = fly._meta[2]

    async def fn(txn):
        return await txn.get(s.inline_key(ino))
    return fly.run(svc.engine.transact(fn))


def _spy(fs, name):
    """Count calls of the client's storage data plane method `name`."""
    plane = fs._core()._s.data
    real = getattr(plane, name)
    calls = []

    async def spy(*a, **kw):
        calls.append(a)
        return await real(*a, **kw)
    setattr(plane, name, spy)
    return calls, lambda: setattr(plane, name, real)


def test_a_small_file_costs_no_chunk_write_and_reads_back(fly, fs):
    writes, undo = _spy(fs, "write")
    try:
        fs.write_bytes("/small.bin", b"s" * 3000)
        with fs.open("/small2.bin", "wb") as f:      # write-behind through a file object
            f.write(b"t" * 1000)
            f.write(b"u" * 1000)
    finally:
        undo()
    assert writes == []
    assert fs.read_bytes("/small.bin") == b"s" * 3000
    assert fs.read_bytes("/small2.bin") == b"t" * 1000 + b"u" * 1000
    assert fs.stat("/small2.bin").st_size == 2000
    assert _inline_key(fly, fs.stat("/small.bin").st_ino) is not None
    buf = bytearray(10)
    with fs.open("/small.bin", "rb") as f:
        assert fs.pread(f, buf, 2995) == 5 and bytes(buf[:5]) == b"sssss"
        b = bytearray(4)
        assert fs.batch_read([(f, 2998, 4, b), ("/small2.bin", 999, 2, None)]) == [2, b"tu"]
        assert bytes(b[:2]) == b"ss"


def test_growing_past_inline_max_moves_the_file_to_chunks(fly, fs):
    head = os.urandom(fly.inline_max - 10)
    fs.write_bytes("/grows.bin", head)
    ino = fs.stat("/grows.bin").st_ino
    more = os.urandom(100_000)
    with fs.open("/grows.bin", "ab") as f:
        f.write(more)
    assert _inline_key(fly, ino) is None
    assert fs.read_bytes("/grows.bin") == head + more
    with fs.open("/grows.bin", "r+b") as f:   # now an ordinary file: small writes go to chunks
        f.seek(5)
        f.write(b"XY")
    assert fs.read_bytes("/grows.bin") == head[:5] + b"XY" + head[7:] + more


def test_truncate_and_sparse_writes_of_an_inline_file(fly, fs):
    fs.write_bytes("/t.bin", b"0123456789")
    fs.truncate("/t.bin", 4)
    assert fs.read_bytes("/t.bin") == b"0123"
    fs.truncate("/t.bin", 3000)
    assert fs.read_bytes("/t.bin") == b"0123" + bytes(2996)
    with fs.open("/t.bin", "r+b") as f:
        f.seek(2000)
        f.write(b"mid")
        f.truncate(2002)
        f.seek(0)
        assert f.read() == b"0123" + bytes(1996) + b"mi"
    assert _inline_key(fly, fs.stat("/t.bin").st_ino) is not None
    fs.truncate("/t.bin", 1 << 20)   # far past inline_max, still no data beyond: zeros
    assert fs.read_bytes("/t.bin") == b"0123" + bytes(1996) + b"mi" + bytes((1 << 20) - 2002)


def test_two_clients_see_each_others_small_files_close_to_open(fly, fs):
    other = fly.connect()
    try:
        fs.write_bytes("/shared.bin", b"first")
        with other.open("/shared.bin", "rb", buffering=0) as r:
            assert r.read(2) == b"fi"
            fs.write_bytes("/shared.bin", b"second version")
            # the new size comes with the new bytes (as from chunks), never the old bytes
            # padded with zeros to it
            r.seek(0)
            assert r.read() == b"second version"
        assert other.read_bytes("/shared.bin") == b"second version"
        with other.open("/shared.bin", "ab") as a:    # the other client grows it past the limit
            a.write(b"!" * fly.inline_max)
        assert fs.read_bytes("/shared.bin") == b"second version" + b"!" * fly.inline_max
        with fs.open("/shared.bin", "rb") as r:
            assert len(r.read()) == 14 + fly.inline_max
    finally:
        other.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_randomized_against_a_local_file(fly, fs, tmp_path, seed):
    """Writes, appends, truncates and reads around inline_max, by two clients taking turns
    (each closes before the other opens: close-to-open), compared with a local file."""
    rnd = random.Random(seed)
    clients = [fs, fly.connect()]
    local = tmp_path / "shadow"
    local.write_bytes(b"")
    path = f"/rand-{seed}.bin"
    clients[0].write_bytes(path, b"")
    limit = fly.inline_max
    try:
        for step in range(150):
            c = clients[rnd.randrange(2)]
            op = rnd.choice(["write", "write", "write", "append", "truncate", "read"])
            size = os.path.getsize(local)
            if op == "write":
                off = rnd.choice([0, rnd.randrange(max(1, size + 1)), rnd.randrange(limit + 200)])
                data = os.urandom(rnd.choice([1, 10, 500, rnd.randrange(1, limit + 300)]))
                with c.open(path, "r+b") as f, open(local, "r+b") as g:
                    f.seek(off)
                    f.write(data)
                    g.seek(off)
                    g.write(data)
            elif op == "append":
                data = os.urandom(rnd.randrange(1, 2000))
                with c.open(path, "ab") as f, open(local, "ab") as g:
                    f.write(data)
                    g.write(data)
            elif op == "truncate":
                n = rnd.choice([0, rnd.randrange(limit + 100), size // 2, size + 100])
                c.truncate(path, n)
                os.truncate(local, n)
            want = local.read_bytes()
            got = c.read_bytes(path)
            assert got == want, f"step {step} ({op}): {len(got)} bytes, want {len(want)}"
            if size > limit * 2:   # start over small, to cross the limit again
                c.remove(path)
                c.write_bytes(path, b"")
                local.write_bytes(b"")
    finally:
        clients[1].close()


def test_the_mounts_flush_of_a_small_file_needs_no_hop_to_the_loop(fly, fs):
    """FUSE's flush of an inline file's one write buffer: a blocking metadata call from
    the kernel's thread; what it does not cover (a buffer past inline_max) is left to flush."""
    core = fs._core()
    h = fs._run_core("open_handle", "/direct.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert core.write_buffered(h, b"abc", 0) and core.write_buffered(h, b"def", 3)
        assert core.flush_needed(h) and core.flush_direct(h)
        assert not core.flush_needed(h)              # nothing buffered, the length reported
        with fly.connect() as other:
            assert other.read_bytes("/direct.bin") == b"abcdef"
        assert core.write_buffered(h, b"x" * 100, fly.inline_max)   # ends past the limit
        assert not core.flush_direct(h) and core.flush_needed(h)
        fs._run_core("flush", h)
        assert not core.flush_needed(h)
    finally:
        fs._run_core("close_handle", h)
    assert fs.read_bytes("/direct.bin") == b"abcdef" + bytes(fly.inline_max - 6) + b"x" * 100
    assert _inline_key(fly, fs.stat("/direct.bin").st_ino) is None


def test_a_release_with_nothing_to_do_is_not_waited_for(fly, fs):
    """close_needs_nothing: FUSE's release of a handle whose bytes and length are out."""
    core = fs._core()
    h = fs._run_core("open_handle", "/released.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    assert core.close_needs_nothing(h)
    assert core.write_buffered(h, b"abc", 0)
    assert not core.close_needs_nothing(h)           # buffered bytes: close must write them
    assert core.flush_direct(h) and core.close_needs_nothing(h)
    fs._close_soon(h)
    deadline = time.monotonic() + 10
    while h in core._s.handles:
        assert time.monotonic() < deadline, "the close never ran"
        time.sleep(0.01)
    assert h.closed and fs.read_bytes("/released.bin") == b"abc"
