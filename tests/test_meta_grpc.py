"""The gRPC service end to end: grpc.aio server on 127.0.0.1:0 in-process (memory engine),
calls through flyfs.client.meta_client, errors arriving as OSError with the right errno;
and `flyfs meta` as a real process."""
import asyncio
import errno
import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from flyfs.client.meta_client import MetaClient
from flyfs.kv import open_engine
from flyfs.metaserver import NOW, RENAME_NOREPLACE, XATTR_CREATE
from flyfs.metaserver.schema import NS
from flyfs.metaserver.server import start_server
from flyfs.metaserver.wire import header
from flyfs.proto import meta_pb2
from meta_fixtures import ALICE, BOB, ROOT, ROOT_INO, make_service


@pytest.fixture
async def served():
    engine = open_engine("memory://")
    svc = make_service(engine)
    await svc.format(root_mode=0o1777)
    server, port = await start_server(svc, "127.0.0.1:0")
    client = MetaClient(f"127.0.0.1:{port}", user=ALICE)
    try:
        yield svc, client, port
    finally:
        await client.close_channel()
        await server.stop(None)
        await svc.stop()
        await engine.close()


async def test_round_trip(served):
    svc, c, _ = served
    d = await c.mkdir(ROOT_INO, "d", 0o755)
    assert d.is_dir and d.uid == ALICE.uid and d.perm == 0o755
    f, session = await c.create(d.ino, "f", 0o644, os.O_WRONLY | os.O_EXCL)
    assert session and f.layout.chains and f.layout.chunk_size == d.layout.chunk_size
    closed = await c.close(f.ino, session, length=1234, wrote=True)
    assert closed.size == 1234
    assert await c.lookup(d.ino, "f") == await svc.getattr(ROOT, f.ino)
    big = (1 << 62) * NS + 5
    n = await c.setattr(f.ino, atime=big, mtime=NOW, mode=0o600)
    assert n.atime == big and n.perm == 0o600 and n.mtime <= n.ctime
    assert (await c.getattr(f.ino)).atime == big
    for i in range(30):
        await c.mknod(d.ino, f"p{i:02d}", stat.S_IFIFO | 0o644)
    names = [e.name async for e in c.readdir_all(d.ino, page=7, plus=True)]
    assert names == [b"f"] + [f"p{i:02d}".encode() for i in range(30)]
    entries, cursor = await c.readdir(d.ino, b"", 5, plus=True)
    assert len(entries) == 5 and cursor == b"p03" and entries[0].attr.size == 1234
    ln = await c.symlink(d.ino, "ln", "f")
    assert await c.readlink(ln.ino) == b"f"
    assert (await c.resolve("/d/ln")).ino == f.ino
    parent, last = await c.resolve_parent("/d/new")
    assert parent.ino == d.ino and last == b"new"
    await c.link(f.ino, ROOT_INO, "hard")
    await c.rename(d.ino, "f", ROOT_INO, "moved")
    await c.setxattr(f.ino, "user.k", b"v", XATTR_CREATE)
    assert await c.getxattr(f.ino, "user.k") == b"v" and await c.listxattr(f.ino) == [b"user.k"]
    await c.removexattr(f.ino, "user.k")
    opened, s2 = await c.open(f.ino, os.O_RDWR | os.O_TRUNC)
    assert opened.size == 0 and s2
    assert (await c.sync(f.ino, s2, length=10)).size == 10
    await c.close(f.ino, s2)
    await c.access(f.ino, os.R_OK)
    st = await c.statfs()
    assert st.blocks == (1 << 40) // 4096 and st.namemax == 255
    lay = await c.set_layout(d.ino, 1 << 16, 2)
    assert (lay.layout.chunk_size, lay.layout.stripe) == (1 << 16, 2)
    await c.unlink(ROOT_INO, "moved")
    await c.unlink(ROOT_INO, "hard")
    assert await svc.gc_queue() == [f.ino]


async def errno_scenario(c):
    """Each error reaches the client as the right OSError subclass with the server's errno
    (shared by the gRPC and flyfs/net transports)."""
    d = await c.mkdir(ROOT_INO, "d", 0o755)
    await c.mknod(d.ino, "f", stat.S_IFREG | 0o644)
    cases = [
        (errno.ENOENT, FileNotFoundError, c.lookup(d.ino, "missing")),
        (errno.EEXIST, FileExistsError, c.mkdir(ROOT_INO, "d")),
        (errno.ENOTEMPTY, OSError, c.rmdir(ROOT_INO, "d")),
        (errno.ENOTDIR, NotADirectoryError, c.readdir((await c.lookup(d.ino, "f")).ino)),
        (errno.EISDIR, IsADirectoryError, c.unlink(ROOT_INO, "d")),
        (errno.EINVAL, OSError, c.mkdir(ROOT_INO, "a/b")),
        (errno.ENAMETOOLONG, OSError, c.create(ROOT_INO, "x" * 256)),
        (errno.EACCES, PermissionError, c.create(d.ino, "x", user=BOB)),
        (errno.EPERM, PermissionError, c.setattr(d.ino, mode=0o777, user=BOB)),
        (errno.EEXIST, FileExistsError, c.rename(d.ino, "f", ROOT_INO, "d", RENAME_NOREPLACE)),
        (errno.ENODATA, OSError, c.getxattr(d.ino, "user.none")),
        (errno.EOPNOTSUPP, OSError, c.setxattr(d.ino, "security.x", b"")),
    ]
    for code, cls, call in cases:
        with pytest.raises(cls) as e:
            await call
        assert e.value.errno == code and e.value.strerror, (code, e.value)
    return d


async def test_errors_arrive_as_oserror(served):
    svc, c, port = served
    await errno_scenario(c)
    unreachable = MetaClient("127.0.0.1:1", user=ALICE, retries=0, timeout=5)
    try:
        with pytest.raises(OSError) as e:
            await unreachable.getattr(ROOT_INO)
        assert e.value.errno == errno.EIO and "127.0.0.1:1" in e.value.strerror
    finally:
        await unreachable.close_channel()


async def test_retried_remove_returns_first_answer(served):
    svc, c, _ = served
    await c.mknod(ROOT_INO, "f", stat.S_IFREG | 0o644)
    stub = c._stub_now()
    req = meta_pb2.RemoveReq(header=header(ALICE, b"retry-uuid-00001"), parent=ROOT_INO, name=b"f")
    first = await stub.Unlink(req)
    again = await stub.Unlink(req)          # the answer to `first` was "lost"; the client resends
    assert first.status.code == 0 and again.status.code == 0
    fresh = await stub.Unlink(meta_pb2.RemoveReq(header=header(ALICE, b"another-uuid-002"),
                                                 parent=ROOT_INO, name=b"f"))
    assert fresh.status.code == errno.ENOENT


async def test_batch(served):
    svc, c, _ = served
    d = await c.mkdir(ROOT_INO, "d", 0o777)
    await c.mknod(d.ino, "exists", stat.S_IFREG | 0o644)
    ops = [("create", {"parent": d.ino, "name": f"b{i}", "flags": os.O_RDONLY | os.O_EXCL}) for i in range(20)]
    ops.append(("create", {"parent": d.ino, "name": "exists", "flags": os.O_RDONLY | os.O_EXCL}))
    ops.append(("lookup", {"parent": d.ino, "name": "exists"}))
    results = await c.batch(ops)
    assert all(isinstance(r, tuple) and r[0].is_reg for r in results[:20])
    assert isinstance(results[20], FileExistsError) and results[21].is_reg
    results = await c.batch([("unlink", {"parent": d.ino, "name": f"b{i}"}) for i in range(20)])
    assert results == [None] * 20
    assert [e.name async for e in c.readdir_all(d.ino)] == [b"exists"]


async def run_meta(tmp_path, check) -> None:
    """Run `flyfs meta` on a RocksDB dir, call `check(client)`, stop it with SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from flyfs.metaserver.server import main; sys.exit(main())",
        "--kv", f"rocksdb://{tmp_path}/meta", "--listen", "127.0.0.1:0", "--chains", "1,2,3",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1))
        async with MetaClient(f"127.0.0.1:{port}", user=ROOT) as c:
            await check(c)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_meta_command_serves_and_stops(tmp_path):
    async def first(c):
        d = await c.mkdir(ROOT_INO, "d", 0o755)
        f, _ = await c.create(d.ino, "f")
        assert f.layout.chains and set(f.layout.chains) <= {1, 2, 3}
        assert (await c.getattr(ROOT_INO)).perm == 0o755

    async def second(c):  # a restarted server finds the namespace in its RocksDB directory
        assert [e.name async for e in c.readdir_all((await c.resolve("/d")).ino)] == [b"f"]

    await run_meta(tmp_path, first)
    await run_meta(tmp_path, second)
    bad = subprocess.run([sys.executable, "-c", "import sys; from flyfs.metaserver.server import main; "
                          "sys.exit(main())", "--kv", "nosuch://x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unknown KV engine URL" in bad.stderr and len(bad.stderr.splitlines()) == 1
