"""A whole flyfs cluster for client and FUSE tests, and tests of the client
against storage failures on it.

`FlyCluster` runs mgmtd, storage daemons and a metadata server (registered
with mgmtd, so clients find it in the routing info) on a background event
loop thread of its own, so that blocking client calls (and FUSE syscalls)
made by a test never block the servers. With `processes=True` every daemon
is a child process instead (fork tests must not fork a process that runs
gRPC servers).

Other test modules use the fixtures with::

    from test_client_cluster import FlyCluster, fly, fs  # noqa: F401 (fixtures)
"""
from __future__ import annotations

import errno
import os
import time
import uuid

import pytest

from cluster_fixtures import StorageCluster
from flyfs.client import ClientConfig, FileSystem
from flyfs.client.runtime import Runtime
from flyfs.cluster.procs import Daemon, free_port, wait_port
from flyfs.kv import open_engine
from flyfs.metaserver import MetaConfig, MetaService
from flyfs.metaserver.netserver import start_net_server
from flyfs.metaserver.server import ClusterLink, start_server

CHUNK = 64 * 1024  # small chunks: test files cross many chunk boundaries
STRIPE = 3


class FlyCluster:
    """mgmtd + storage nodes + one metadata server (64 KiB chunks, stripe 3; files of up to
    `inline_max` bytes held by the metadata server, as `flyfs meta` does by default)."""

    def __init__(self, root, *, nodes: int = 3, targets_per_node: int = 2, replication: int = 2,
                 processes: bool = False, chunk_size: int = CHUNK, stripe: int = STRIPE, kv: str | None = None,
                 inline_max: int = 4096):
        self.root = str(root)
        self.inline_max = inline_max
        self.kv = kv or f"memory://meta-{uuid.uuid4().hex}"
        self.processes = processes
        self.chunk_size = chunk_size
        self.stripe = stripe
        self.storage = StorageCluster(root, nodes=nodes, targets_per_node=targets_per_node,
                                      replication=replication, processes=processes)
        self.rt = Runtime(f"test-cluster-{uuid.uuid4().hex[:6]}")
        self.meta_port = free_port()
        self._meta = None  # (server, service, engine, cluster link) in-process
        self._more_metas: list = []   # further in-process metadata servers on the same KV
        self._engines: list = []      # the KV engines those opened themselves
        self._stopped: set[str] = set()
        self.meta_proc: Daemon | None = None

    @property
    def mgmtd_address(self) -> str:
        return self.storage.mgmtd_address

    @property
    def meta_address(self) -> str:
        return f"127.0.0.1:{self.meta_port}"

    def start(self) -> "FlyCluster":
        try:
            self.rt.run(self._start(), 120)
        except BaseException:
            self.stop()
            raise
        return self

    async def _start(self) -> None:
        await self.storage.start()
        if self.processes:
            self.meta_proc = Daemon("meta", [
                "meta", "--kv", self.kv, "--listen", self.meta_address,
                "--mgmtd", self.mgmtd_address, "--chunk-size", str(self.chunk_size), "--stripe",
                str(self.stripe), "--root-mode", "1777", "--inline-max", str(self.inline_max),
                "--log-level", "WARNING"],
                os.path.join(self.root, "logs", "meta.log")).start()
            import asyncio
            await asyncio.to_thread(wait_port, "127.0.0.1", self.meta_port, 60, self.meta_proc)
            return
        # The metadata server as `flyfs meta --mgmtd` runs it, in this process.
        link = ClusterLink(self.mgmtd_address)
        engine = open_engine(self.kv)
        svc = MetaService(engine, storage=link.storage_ops, chain_table=link.chain_table, space=link.space,
                          config=MetaConfig(default_chunk_size=self.chunk_size, default_stripe=self.stripe,
                                            inline_max=self.inline_max))
        await svc.format(root_mode=0o1777)
        server, _ = await start_server(svc, self.meta_address)
        net_server = await start_net_server(svc, "127.0.0.1", 0)
        self._meta = (server, net_server, svc, engine, link)
        await link.register(self.meta_address, net_server.address)

    async def add_meta_server(self, own_engine: bool = False) -> str:
        """Another metadata server on the same KV, registered with mgmtd like the first;
        returns its flyfs/net address. `own_engine`: it opens the KV itself, as another
        process would (its own connections and, on etcd, its own read cache)."""
        _, _, svc, engine, _ = self._meta
        if own_engine:
            engine = open_engine(self.kv)
            self._engines.append(engine)
        link = ClusterLink(self.mgmtd_address)
        svc2 = MetaService(engine, storage=link.storage_ops, chain_table=link.chain_table, space=link.space,
                           config=svc.config)
        port = free_port()
        server, _ = await start_server(svc2, f"127.0.0.1:{port}")
        net_server = await start_net_server(svc2, "127.0.0.1", 0)
        await link.register(f"127.0.0.1:{port}", net_server.address)
        self._more_metas.append((server, net_server, svc2, None, link))
        return net_server.address

    async def stop_meta_server(self, net_address: str) -> None:
        """Stop the in-process metadata server serving `net_address` (as if killed: its
        sockets close and its heartbeats to mgmtd stop)."""
        for entry in [self._meta, *self._more_metas]:
            if entry is not None and entry[1].address == net_address:
                await self._stop_meta(entry)
                return
        raise KeyError(net_address)

    async def _stop_meta(self, entry) -> None:
        server, net_server, svc, _, link = entry
        if net_server.address in self._stopped:
            return
        self._stopped.add(net_server.address)
        await net_server.close()
        await server.stop(None)
        await svc.stop()
        await link.close()

    def stop(self) -> None:
        try:
            self.rt.run(self._stop(), 120)
        finally:
            if self.meta_proc is not None:
                self.meta_proc.stop()
            self.rt.stop()

    async def _stop(self) -> None:
        more, self._more_metas = self._more_metas, []
        for entry in more:
            await self._stop_meta(entry)
        if self._meta is not None:
            entry, self._meta = self._meta, None
            await self._stop_meta(entry)
            await entry[3].close()      # the engine
        for engine in self._engines:
            await engine.close()
        await self.storage.close(check=False)

    def connect(self, **config) -> FileSystem:
        """A client that finds the metadata server in mgmtd's routing info (its flyfs/net
        address); `meta_address` is its gRPC address."""
        return FileSystem(self.mgmtd_address, config=ClientConfig(**config))

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the cluster's loop (its storage cluster, mgmtd clients, ...)."""
        return self.rt.run(coro, timeout)


@pytest.fixture(scope="module")
def fly(tmp_path_factory):
    c = FlyCluster(tmp_path_factory.mktemp("fly")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fs(fly):
    f = fly.connect()
    yield f
    f.close()


# ---- the client when storage fails -------------------------------------------------------------------------

def test_reads_fail_over_when_a_storage_node_stops(tmp_path):
    """A replica gone: reads go to the other SERVING replica of each chain."""
    c = FlyCluster(tmp_path, nodes=3, targets_per_node=1, replication=3).start()
    try:
        f = c.connect()
        try:
            data = os.urandom(6 * CHUNK + 5)
            f.write_bytes("/survivor", data)
            with f.open("/survivor", "rb", buffering=0) as fh:
                c.run(c.storage.stop_node(0))
                # reads from the caller's thread (read_direct) to a replica that is gone
                # fall back to the loop's batch reads, which fail over
                buf = bytearray(4096)
                for i in range(6):
                    assert f.pread(fh, buf, i * CHUNK + 7) == 4096
                    assert buf == data[i * CHUNK + 7:i * CHUNK + 7 + 4096]
            assert f.read_bytes("/survivor") == data
            buf = bytearray(CHUNK)
            assert f.pread("/survivor", buf, 2 * CHUNK) == CHUNK and buf == data[2 * CHUNK:3 * CHUNK]
        finally:
            f.close()
    finally:
        c.stop()


def test_metadata_calls_fail_over_to_another_server(tmp_path):
    """Two metadata servers on one KV: when the one a client uses goes away, its calls
    (and close_later's batches) go to the other, and nothing the client did is lost."""
    c = FlyCluster(tmp_path, nodes=3, targets_per_node=1, replication=2).start()
    try:
        second = c.run(c.add_meta_server())
        first = c._meta[1].address
        f = c.connect()
        try:
            data = os.urandom(3 * CHUNK + 11)
            f.makedirs("/d")
            f.write_bytes("/d/a", data)
            used = f.meta_target
            assert used in (first, second)
            c.run(c.stop_meta_server(used))
            # the next calls find the server gone, retry, then move to the other one
            assert f.read_bytes("/d/a") == data
            assert f.meta_target == (second if used == first else first)
            f.write_bytes("/d/b", b"after")
            with f.open("/d/empty", "wb"):      # an unwritten file: its close goes by close_later
                pass
            f.rename("/d/b", "/d/c")
            assert sorted(f.listdir("/d")) == ["a", "c", "empty"]
            assert f.stat("/d/a").st_size == len(data) and f.read_bytes("/d/c") == b"after"
            f.remove("/d/a")
            assert sorted(f.listdir("/d")) == ["c", "empty"]
        finally:
            f.close()
        # with both gone, a call fails with EIO after its retries instead of hanging
        c.run(c.stop_meta_server(second if used == first else first))
        f = c.connect()
        try:
            with pytest.raises(OSError) as e:
                f.stat("/d/c")
            assert e.value.errno == errno.EIO
        finally:
            f.close()
    finally:
        c.stop()


@pytest.mark.parametrize("kv", ["memory", "etcd"])
def test_two_clients_on_two_metadata_servers_see_each_others_closed_files(tmp_path, request, kv):
    """Randomized close-to-open across servers: two clients, each on its own metadata
    server (on etcd each with its own read cache), write, remove and rename files in one
    directory; after every step the other client reads and stats a random name and must
    find exactly what a local model says, and every 50 steps lists the directory."""
    import random
    url = None
    if kv == "etcd":
        url = request.getfixturevalue("etcd_server").url(f"xsrv-{uuid.uuid4().hex[:8]}")
    c = FlyCluster(tmp_path, nodes=3, targets_per_node=1, replication=2, kv=url).start()
    try:
        first = c._meta[1].address
        second = c.run(c.add_meta_server(own_engine=True))
        a = FileSystem(c.mgmtd_address, meta=first)
        b = FileSystem(c.mgmtd_address, meta=second)
        try:
            rng = random.Random(613)
            a.makedirs("/x")
            names = [f"/x/f{i}" for i in range(12)]
            model: dict[str, bytes] = {}
            for step in range(400):
                w, r = (a, b) if rng.random() < 0.5 else (b, a)
                p, op = rng.choice(names), rng.random()
                if op < 0.45:
                    model[p] = os.urandom(rng.randint(0, 2000))
                    w.write_bytes(p, model[p])
                elif op < 0.6 and p in model:
                    w.remove(p)
                    del model[p]
                elif op < 0.8 and p in model:
                    q = rng.choice(names)
                    if q != p:
                        w.rename(p, q)
                        model[q] = model.pop(p)
                q = rng.choice(names)
                if q in model:
                    assert r.read_bytes(q) == model[q] and r.stat(q).st_size == len(model[q]), (step, q)
                else:
                    with pytest.raises(FileNotFoundError):
                        r.read_bytes(q)
                if step % 50 == 0:
                    assert sorted(r.listdir("/x")) == sorted(n[3:] for n in model), step
        finally:
            a.close()
            b.close()
    finally:
        c.stop()


def test_a_hung_metadata_server_process_is_left_within_seconds(tmp_path, etcd_server):
    """Two metadata servers on one etcd, one of them a `flyfs meta` process the client
    uses; the process is stopped (SIGSTOP: it keeps its sockets and answers nothing).
    The client's calls move to the other server once mgmtd stops hearing from the
    stopped one (heartbeat timeout 1.5 s here), well before the 30 s RPC timeout, and
    nothing it wrote is lost."""
    import signal
    c = FlyCluster(tmp_path, nodes=3, targets_per_node=1, replication=2,
                   kv=etcd_server.url(f"hung-{uuid.uuid4().hex[:8]}")).start()
    port = free_port()
    proc = Daemon("meta2", ["meta", "--kv", c.kv, "--mgmtd", c.mgmtd_address, "--listen", f"127.0.0.1:{port}",
                            "--chunk-size", str(CHUNK), "--stripe", str(STRIPE), "--log-level", "WARNING"],
                  os.path.join(str(tmp_path), "logs", "meta2.log")).start()
    f = None
    try:
        wait_port("127.0.0.1", port, 60, proc)
        in_process = c._meta[1].address
        deadline = time.monotonic() + 30
        while True:     # a client that picked the process (clients pick a server at random)
            f = c.connect()
            if f.meta_target != in_process:
                break
            f.close()
            assert time.monotonic() < deadline, "no client ever picked the second metadata server"
            time.sleep(0.2)
        f.makedirs("/h")
        for i in range(5):
            f.write_bytes(f"/h/before{i}", b"b%d" % i)
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            worst = 0.0
            for i in range(5):
                t = time.monotonic()
                f.write_bytes(f"/h/after{i}", b"a%d" % i)
                assert f.read_bytes(f"/h/before{i}") == b"b%d" % i
                worst = max(worst, time.monotonic() - t)
            assert f.meta_target == in_process
            assert worst < 15, f"an operation waited {worst:.1f} s for the stopped server"
            assert sorted(f.listdir("/h")) == sorted([f"before{i}" for i in range(5)] + [f"after{i}" for i in range(5)])
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
    finally:
        if f is not None:
            f.close()
        proc.stop()
        c.stop()


# ---- reads from the caller's thread -------------------------------------------------------------------------

def test_small_reads_go_from_the_callers_thread(fly, fs):
    """pread/readinto within one chunk of an open file: one blocking request from the
    calling thread (FileSystem._pread -> pread_direct), no coroutine on the client loop;
    reads across chunks, of a file with our writes pending, go through the loop."""
    import random
    from flyfs.client.file import handle_of
    core = fs._core()
    data = os.urandom(5 * CHUNK + 100)
    fs.write_bytes("/direct.bin", data)
    blocking = core._s.data.storage.blocking
    calls = {"direct": 0, "loop": 0}
    real_call, real_pread_into = blocking.call, core.pread_into

    def direct(*a, **kw):
        calls["direct"] += 1
        return real_call(*a, **kw)

    async def loop(*a, **kw):
        calls["loop"] += 1
        return await real_pread_into(*a, **kw)
    blocking.call, core.pread_into = direct, loop
    try:
        rng = random.Random(5)
        with fs.open("/direct.bin", "rb", buffering=0) as f:
            buf = bytearray(4096)
            for _ in range(30):
                off = rng.randrange(len(data))
                off -= max(0, off % CHUNK + 4096 - CHUNK)     # within one chunk
                n = fs.pread(f, buf, off)
                assert bytes(buf[:n]) == data[off:off + 4096]
            assert calls == {"direct": 30, "loop": 0}
            tail = bytearray(b"\xff" * 4096)                    # short read at the end of the file
            assert fs.pread(f, tail, len(data) - 100) == 100 and tail[:100] == data[-100:]
            assert fs.pread(f, tail, len(data) + 5) == 0
            f.seek(CHUNK - 10)
            assert f.read(10) == data[CHUNK - 10:CHUNK]          # readinto, one chunk
            assert calls == {"direct": 32, "loop": 0}
            across = bytearray(100)
            assert fs.pread(f, across, CHUNK - 50) == 100 and across == data[CHUNK - 50:CHUNK + 50]
            assert calls["loop"] == 1
        with fs.open("/direct.bin", "r+b", buffering=0) as f:
            f.seek(10)
            f.write(b"NEW")                                   # buffered in the client
            got = bytearray(16)
            h = handle_of(f)          # (a file object would be flushed first)
            assert h.state.buffered
            assert fs.pread(h, got, 8) == 16 and bytes(got) == data[8:10] + b"NEW" + data[13:24]
            assert calls["loop"] == 2
        # a hole reads as zeros through the direct path too
        fs.truncate("/direct.bin", 20 * CHUNK)
        with fs.open("/direct.bin", "rb", buffering=0) as f:
            hole = bytearray(b"\xff" * 4096)
            before = calls["direct"]
            assert fs.pread(f, hole, 15 * CHUNK) == 4096 and hole == bytes(4096)
            assert calls["direct"] == before + 1 and calls["loop"] == 2
    finally:
        blocking.call, core.pread_into = real_call, real_pread_into


def test_stat_is_answered_from_the_callers_thread(fly, fs):
    """FileSystem.stat/lstat of a path is one blocking metadata call from the calling
    thread (getattr_now over flyfs/net), with the client's own unreported size."""
    import errno
    core = fs._core()
    loop_stats = []
    real = core.stat

    async def spy(*a, **kw):
        loop_stats.append(a)
        return await real(*a, **kw)
    core.stat = spy
    try:
        fs.write_bytes("/stat-now.bin", b"x" * 1000)
        assert fs.stat("/stat-now.bin").st_size == 1000
        assert fs.lstat("/stat-now.bin").st_size == 1000
        with pytest.raises(FileNotFoundError) as e:
            fs.stat("/stat-now-missing")
        assert e.value.errno == errno.ENOENT and "stat-now-missing" in str(e.value)
        with fs.open("/stat-now.bin", "ab", buffering=0) as f:
            f.write(b"y" * 10)                           # buffered, not yet reported
            assert fs.stat("/stat-now.bin").st_size == 1010
        assert loop_stats == []
    finally:
        core.stat = real


def test_small_file_writes_need_no_hop_to_the_loop(fly, fs):
    """The first write of a file starts its write buffer in the caller's thread, as the
    writes that continue it do (write_buffered); close() sends it to the chains."""
    core = fs._core()
    hops = []
    real = core.write_behind

    async def spy(*a, **kw):
        hops.append(a[2])
        return await real(*a, **kw)
    core.write_behind = spy
    try:
        with fs.open("/small-nohop.bin", "wb", buffering=0) as f:
            f.write(b"a" * 4096)
            f.write(b"b" * 100)
            f.seek(10)
            f.write(b"c")                   # not contiguous: the loop issues the buffer
        assert hops == [10]
    finally:
        core.write_behind = real
    assert fs.read_bytes("/small-nohop.bin") == b"a" * 10 + b"c" + b"a" * 4085 + b"b" * 100


# ---- fsync -----------------------------------------------------------------------------------------------

def test_fsync_makes_the_file_durable_on_every_replica(fly, fs):
    """Storage acknowledges writes from memory; fsync() flushes the file's chains on every
    replica before it returns (the background flush runs only every few seconds), and
    its length report asks the metadata server to answer only once it is on disk."""
    core = fs._core()
    flushed: list[tuple] = []
    reports: list[bool] = []
    real, real_sync = core._s.data.storage.flush, core._s.meta.sync

    async def spy(chain_ids):
        flushed.append(tuple(chain_ids))
        return await real(chain_ids)

    async def sync_spy(*a, durable=False, **kw):
        reports.append(durable)
        return await real_sync(*a, durable=durable, **kw)
    core._s.data.storage.flush, core._s.meta.sync = spy, sync_spy
    data = os.urandom(3 * CHUNK)
    try:
        with fs.open("/fsync-me.bin", "wb", buffering=0) as f:
            f.write(data)
            chains = set(f.handle.layout.chains)
            assert flushed == []                     # writes alone flush nothing
            f.flush()
            assert reports == [False]                # close(2)/flush: a report, not synced
            f.fsync()
            assert reports == [False, True]
    finally:
        core._s.data.storage.flush, core._s.meta.sync = real, real_sync
    assert len(flushed) == 1 and set(flushed[0]) == chains and len(chains) == STRIPE
    info = fly.run(fly.storage.routing())
    tids = {t for c in chains for t, _ in info.chains[c].targets}
    dirty = [tid for n in fly.storage.nodes for tid, t in n.server.targets.items()
             if tid in tids and t.engine.sync.dirty]
    assert dirty == [], f"targets still unsynced after fsync: {dirty}"
    assert fs.read_bytes("/fsync-me.bin") == data


def test_closing_an_unwritten_file_does_not_wait_for_the_server(fly, fs):
    """creat() + close() of an empty file: the session ends through close_later() (batched,
    like FUSE's release), a written file's close waits for its length report, made by the
    call that ends its session (no separate flush report); a file small enough to be
    inline needs no report at all (its write stamped the length)."""
    core = fs._core()
    waited: list = []
    meta = core._s.meta
    real_close, real_sync = meta.close, meta.sync

    def spying(real, name):
        async def spy(*a, **kw):
            waited.append((name, a[0]))
            return await real(*a, **kw)
        return spy
    meta.close, meta.sync = spying(real_close, "close"), spying(real_sync, "sync")
    try:
        with fs.open("/later-empty.bin", "wb"):
            pass
        with fs.open("/later-written.bin", "wb") as f:
            f.write(b"x" * (fly.inline_max + 1))
        with fs.open("/later-inline.bin", "wb") as f:
            f.write(b"y")
    finally:
        meta.close, meta.sync = real_close, real_sync
    empty, written = fs.stat("/later-empty.bin"), fs.stat("/later-written.bin")
    small = fs.stat("/later-inline.bin")
    # the written file's close(): one metadata call, reporting the length as it ends the session
    assert waited == [("close", written.st_ino)] and written.st_size == fly.inline_max + 1
    assert empty.st_size == 0 and small.st_size == 1 and fs.read_bytes("/later-inline.bin") == b"y"
    svc = fly._meta[2]
    deadline = time.monotonic() + 10
    while fly.run(svc.list_sessions(empty.st_ino)):
        assert time.monotonic() < deadline, "the empty file's session never ended"
        time.sleep(0.01)


def test_api_file_writes_are_write_behind_and_flush_waits_for_them(fly, fs):
    """write() on an API file returns once the bytes are copied (the buffer may be reused
    at once); flush() returns once they are on the chains; a write that fails after
    write() returned is raised by close(); a write of write_buffer bytes or more is
    done before write() returns."""
    import asyncio
    import errno
    core = fs._core()
    data_plane = core._s.data
    real_write = data_plane.write
    gate = asyncio.Event()
    started: list = []

    async def held(*a, **kw):
        started.append(a[2])
        await gate.wait()
        return await real_write(*a, **kw)
    data_plane.write = held
    try:
        f = fs.open("/behind.bin", "wb", buffering=0)
        buf = bytearray(b"a" * (1 << 20))
        assert f.write(buf) == len(buf)
        buf[:] = b"b" * len(buf)                  # reused at once: what was written is kept
        f.write(buf)
        for _ in range(5):                        # past the write buffer: a write starts
            f.write(bytes(1 << 20))
        deadline = time.monotonic() + 10
        while not started:
            assert time.monotonic() < deadline, "no write started"
            time.sleep(0.01)
        assert not gate.is_set()                  # write() returned with a data write held
        fs._rt.loop.call_soon_threadsafe(gate.set)
        f.flush()
        assert fs.stat("/behind.bin").st_size == 7 << 20
        f.close()
    finally:
        data_plane.write = real_write
    got = fs.read_bytes("/behind.bin")
    assert got[:1 << 20] == b"a" * (1 << 20) and got[1 << 20:2 << 20] == b"b" * (1 << 20)
    assert got[2 << 20:] == bytes(5 << 20)

    async def failing(*a, **kw):
        raise OSError(errno.EIO, "storage refused")
    data_plane.write = failing
    try:
        f = fs.open("/behind-fails.bin", "wb", buffering=0)
        f.write(b"x" * (fly.inline_max + 1000))   # buffered: no error yet (and too big to be inline)
        with pytest.raises(OSError) as e:
            f.close()
        assert e.value.errno == errno.EIO
        with fs.open("/direct-fails.bin", "wb", buffering=0) as f:
            with pytest.raises(OSError) as e:
                f.write(bytes(fs._config.write_buffer))   # large: written (and failed) at once
            assert e.value.errno == errno.EIO
    finally:
        data_plane.write = real_write
