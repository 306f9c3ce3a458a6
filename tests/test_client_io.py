"""Pure parts of the client, no cluster: chunk math, parallel issue, open modes,
addresses and paths, error shapes, the runtime thread and its fork handling."""
from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time

import pytest

from flyfs.client import fs as fsmod
from flyfs.client.file import parse_mode
from flyfs.client.io import Piece, by_chain, chain_of, chunk_span, gather_limited, split
from flyfs.client.runtime import RpcGate, Runtime
from flyfs.fuse.mount import XattrNoiseFilter, fuse_options
from flyfs.metaserver.schema import Inode, Layout


def L(chunk=16, stripe=3, seed=1, chains=(11, 22, 33)):
    return Layout(chunk, stripe, 1, seed, tuple(chains))


# ---- chunk math ------------------------------------------------------------------------------------------

def test_chain_of_rotates_from_the_seed():
    lay = L(seed=2)
    assert [chain_of(lay, i) for i in range(6)] == [33, 11, 22, 33, 11, 22]


def test_split_matches_a_byte_by_byte_mapping():
    rng = random.Random(7)
    for _ in range(300):
        lay = L(chunk=rng.choice([4, 8, 16]), stripe=rng.randint(1, 3), seed=rng.randint(0, 5))
        offset, length = rng.randint(0, 100), rng.randint(0, 80)
        pieces = split(lay, offset, length)
        covered = []
        for p in pieces:
            assert 0 < p.length <= lay.chunk_size - p.chunk_offset
            assert p.chain == chain_of(lay, p.index)
            for k in range(p.length):
                covered.append((p.buf_offset + k, p.index * lay.chunk_size + p.chunk_offset + k))
        # every byte of the range exactly once, in order, at the right file offset
        assert covered == [(i, offset + i) for i in range(length)]


def test_split_edges():
    lay = L(chunk=16)
    assert split(lay, 5, 0) == []
    assert split(lay, 16, 16) == [Piece(1, chain_of(lay, 1), 0, 16, 0)]
    assert [p.length for p in split(lay, 15, 18)] == [1, 16, 1]
    with pytest.raises(ValueError):
        split(lay, -1, 4)
    with pytest.raises(ValueError, match="unusable file layout"):
        split(Layout(16, 2, 0, 0, (1,)), 0, 4)


def test_by_chain_and_chunk_span():
    lay = L(chunk=8, seed=0)
    groups = by_chain(split(lay, 0, 8 * 7))
    assert sorted(groups) == [11, 22, 33]
    assert [p.index for p in groups[11]] == [0, 3, 6]
    assert [chunk_span(lay, n) for n in (0, 1, 8, 9, 16)] == [0, 1, 1, 2, 2]


async def test_gather_limited_bounds_concurrency_and_keeps_order():
    running = peak = 0

    async def job(i):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (i % 3))
        running -= 1
        return i * i

    out = await gather_limited([job(i) for i in range(50)], limit=4)
    assert out == [i * i for i in range(50)]
    assert peak == 4


async def test_gather_limited_cancels_the_rest_on_failure():
    started, cancelled = [], []

    async def job(i):
        started.append(i)
        try:
            if i == 1:
                raise OSError(errno.EIO, "boom")
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    with pytest.raises(OSError, match="boom"):
        await gather_limited([job(i) for i in range(5)], limit=8)
    assert sorted(cancelled) == [0, 2, 3, 4]


# ---- modes, addresses, paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,flags,binary,r,w", [
    ("r", os.O_RDONLY, False, True, False),
    ("rb", os.O_RDONLY, True, True, False),
    ("r+b", os.O_RDWR, True, True, True),
    ("w", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, False, False, True),
    ("wb+", os.O_RDWR | os.O_CREAT | os.O_TRUNC, True, True, True),
    ("a", os.O_WRONLY | os.O_CREAT | os.O_APPEND, False, False, True),
    ("ab+", os.O_RDWR | os.O_CREAT | os.O_APPEND, True, True, True),
    ("xb", os.O_WRONLY | os.O_CREAT | os.O_EXCL, True, False, True),
    ("xt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, False, False, True),
])
def test_parse_mode(mode, flags, binary, r, w):
    assert parse_mode(mode) == (flags, binary, r, w)


@pytest.mark.parametrize("bad", ["", "rw", "rr", "bt", "rbt", "q", "r++", "b"])
def test_parse_mode_rejects(bad):
    with pytest.raises(ValueError):
        parse_mode(bad)


def test_parse_address():
    assert fsmod.parse_address("127.0.0.1:8000") == "127.0.0.1:8000"
    assert fsmod.parse_address("flyfs://127.0.0.1:8000/") == "127.0.0.1:8000"
    assert fsmod.parse_address("flyfs://a:1,b:2") == "a:1,b:2"
    for bad in ("", "host", "http://h:1", "h:0", "h:99999", "flyfs://"):
        with pytest.raises(ValueError, match="flyfs"):
            fsmod.parse_address(bad)


def test_fspath():
    assert fsmod.fspath("a/b") == b"/a/b"
    assert fsmod.fspath(b"/x") == b"/x"
    assert fsmod.fspath("flyfs://h:1/d/e") == b"/d/e"
    assert fsmod.fspath("flyfs://h:1") == b"/"
    import pathlib
    assert fsmod.fspath(pathlib.PurePosixPath("/p/q")) == b"/p/q"
    with pytest.raises(TypeError):
        fsmod.fspath(3)


def test_errors_carry_errno_standard_message_and_path():
    e = fsmod._with_path(OSError(errno.ENOENT, "no inode 7"), "/a/b")
    assert isinstance(e, FileNotFoundError)
    assert (e.errno, e.filename, e.strerror) == (errno.ENOENT, "/a/b", os.strerror(errno.ENOENT))
    assert "no inode 7" in " ".join(e.__notes__)
    e2 = fsmod._with_path(OSError(errno.EXDEV, "x"), b"/s", "/d")
    assert (e2.filename, e2.filename2) == ("/s", "/d")


def test_stat_result_keeps_nanoseconds():
    n = Inode(9, 0o100640, 5, 6, 2, 1000, 1_700_000_000_123_456_789, 1_700_000_001_000_000_001,
              1_700_000_002_999_999_999, layout=Layout(65536, 1, 1, 0, (1,)))
    st = fsmod.stat_result(n)
    assert (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size) == (9, 0o100640, 5, 6, 2, 1000)
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == (n.atime, n.mtime, n.ctime)
    assert abs(st.st_mtime - n.mtime / 1e9) < 1e-6 and st[8] == n.mtime // 10**9
    assert st.st_blocks == 2 and st.st_blksize == 65536


def test_fuse_options_defaults_and_overrides():
    o = fuse_options(None, "h:1").split(",")
    for want in ("default_permissions", "allow_other", "use_ino", "big_writes", "max_write=131072",
                 "attr_timeout=1", "entry_timeout=1", "negative_timeout=0", "fsname=flyfs#h:1"):
        assert want in o
    assert "auto_cache" not in o            # flyfs decides keep_cache per open
    o = fuse_options(["attr_timeout=5,ro", "nouse_ino"], "h:1").split(",")
    assert "attr_timeout=5" in o and "attr_timeout=1" not in o
    assert "ro" in o and "use_ino" not in o


def test_xattr_noise_filter_logs_a_refused_binary_value_once(caplog):
    import io
    out = io.StringIO()
    f = XattrNoiseFilter(out)
    for _ in range(3):   # as PyErr_Print writes it: in pieces
        for piece in ("UnicodeDecodeError", ": ", "'utf-8' codec can't decode byte 0xff in position 8", "\n"):
            f.write(piece)
    f.write("Traceback: something ")
    f.write("else\nand a partial line")
    assert out.getvalue() == "Traceback: something else\n"
    f.flush()
    assert out.getvalue() == "Traceback: something else\nand a partial line"
    assert [r.levelname for r in caplog.records if "not UTF-8" in r.getMessage()] == ["WARNING"]


# ---- runtime ---------------------------------------------------------------------------------------------

def test_runtime_runs_coroutines_from_many_threads():
    rt = Runtime("t-rt")
    try:
        loop_threads = set()

        async def work(i):
            loop_threads.add(threading.current_thread().name)
            await asyncio.sleep(0.001)
            return i + 1

        results = [None] * 40

        def caller(k):
            for i in range(k, 40, 8):
                results[i] = rt.run(work(i))

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == list(range(1, 41))
        assert loop_threads == {"t-rt"}

        async def fail():
            raise FileNotFoundError(errno.ENOENT, "x", "/p")

        with pytest.raises(FileNotFoundError) as ei:
            rt.run(fail())
        assert ei.value.filename == "/p"

        async def at_once(i):
            return i * 2, asyncio.current_task()

        assert rt.run(at_once(21)) == (42, None)    # finished in its first step: no task

        async def fail_at_once():
            raise PermissionError(errno.EACCES, "y", "/q")

        with pytest.raises(PermissionError) as ei:
            rt.run(fail_at_once())
        assert ei.value.filename == "/q"

        cancelled = threading.Event()

        async def slow():
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            rt.run(slow(), timeout=0.1)
        assert time.monotonic() - t0 < 3
        assert cancelled.wait(3), "the operation the caller gave up on was left running"

        async def reenter():
            return rt.run(work(1))

        with pytest.raises(RuntimeError, match="event loop thread"):
            rt.run(reenter())
    finally:
        rt.stop()
    assert not rt.started


def test_rpc_gate_drains_before_fork_and_blocks_new_calls():
    gate = RpcGate(drain_timeout=5)
    entered = threading.Event()
    release = threading.Event()
    order = []

    def inflight():
        with gate:
            entered.set()
            release.wait()
            order.append("first call done")

    t = threading.Thread(target=inflight)
    t.start()
    entered.wait()
    threading.Timer(0.2, release.set).start()
    assert gate.close_and_drain()  # waits for the call in flight
    order.append("drained")
    late = threading.Thread(target=lambda: (gate.__enter__(), order.append("late call"), gate.__exit__()))
    late.start()
    time.sleep(0.1)
    assert order == ["first call done", "drained"]  # the late call waits while closed
    gate.reopen()
    late.join(5)
    t.join(5)
    assert order[-1] == "late call"


def test_runtime_in_a_forked_child_starts_a_fresh_loop():
    rt = Runtime("t-fork")

    async def pid():
        await asyncio.sleep(0)
        return os.getpid(), threading.current_thread().ident

    parent_pid, parent_tid = rt.run(pid())
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            import signal
            signal.alarm(20)  # a hang fails the test instead of blocking it
            p, _ = rt.run(pid(), timeout=10)
            code = 0 if p == os.getpid() != parent_pid else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        assert time.monotonic() < deadline, "forked child hung"
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0
    assert rt.run(pid()) == (parent_pid, parent_tid)  # the parent's loop is untouched
    rt.stop()


def test_moved_targets_between_routing_versions():
    from dataclasses import replace

    from flyfs.client.storage_client import moved_targets
    from flyfs.cluster.chain_state import Chain
    from flyfs.cluster.mgmtd_client import RoutingInfo
    from flyfs.proto import mgmtd_pb2

    nodes = {n: mgmtd_pb2.NodeInfo(node_id=n, address=f"s:{n}") for n in (1, 2, 3)}
    targets = {t: mgmtd_pb2.TargetInfo(target_id=t, node_id=(t - 1) % 3 + 1) for t in range(1, 7)}
    old = RoutingInfo(1, nodes=nodes, targets=targets,
                      chains={1: Chain.new(1, [1, 2, 3]), 2: Chain.new(2, [4, 5, 6])})
    assert moved_targets(old, replace(old, version=2)) == set()
    new = replace(old, version=2, chains={1: Chain.new(1, [1, 3], version=2), 2: old.chains[2]})
    assert moved_targets(old, new) == {1, 2, 3}                    # every target of a changed chain
    moved_node = dict(nodes)
    moved_node[2] = mgmtd_pb2.NodeInfo(node_id=2, address="s:22")
    assert moved_targets(old, replace(old, version=3, nodes=moved_node)) == {2, 5}   # a node's new address
    assert moved_targets(old, replace(old, version=3, chains={2: old.chains[2]})) == {1, 2, 3}  # chain gone


def test_metadata_server_comes_from_routing_info():
    from flyfs.cluster.mgmtd_client import RoutingInfo
    from flyfs.proto import mgmtd_pb2

    def node(i, t, alive, addr, data=""):
        return mgmtd_pb2.NodeInfo(node_id=i, type=t, alive=alive, address=addr, data_address=data)

    info = RoutingInfo(1, nodes={1: node(1, mgmtd_pb2.NODE_STORAGE, True, "s:1"),
                                 2: node(2, mgmtd_pb2.NODE_META, False, "dead:1"),
                                 3: node(3, mgmtd_pb2.NODE_META, True, "m:1")})
    assert {fsmod._pick_meta(info, "x:1") for _ in range(20)} == {"m:1"}     # alive ones first
    info = RoutingInfo(1, nodes={3: node(3, mgmtd_pb2.NODE_META, True, "m:1", "tcp://m:2")})
    assert fsmod._pick_meta(info, "x:1") == "tcp://m:2"                       # flyfs/net when served
    info = RoutingInfo(1, nodes={2: node(2, mgmtd_pb2.NODE_META, False, "dead:1")})
    assert fsmod._pick_meta(info, "x:1") == "dead:1"                          # else any registered
    with pytest.raises(ConnectionError, match="meta="):
        fsmod._pick_meta(RoutingInfo(1), "x:1")
