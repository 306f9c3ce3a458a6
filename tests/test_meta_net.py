"""The metadata RPCs over flyfs/net framing (flyfs/metaserver/netserver.py): the
gRPC suite's round trips through MetaClient("tcp://..."), errors as OSError,
bad frames answered without harming the server, and discovery through mgmtd
(NodeInfo.data_address) with `flyfs meta` as a real process."""
import asyncio
import contextlib
import os
import errno
import re
import signal
import stat
import subprocess
import sys
import uuid

import pytest

from flyfs import net
from flyfs.client.meta_client import MetaClient, pick_meta_target
from flyfs.cluster.mgmtd import Mgmtd
from flyfs.cluster.mgmtd_client import NODE_META, NODE_STORAGE, MgmtdClient, MgmtdError
from flyfs.kv import open_engine
from flyfs.metaserver.netserver import (BATCHABLE, METHOD_IDS, METHODS, UnknownMethod, make_handler,
                                        start_net_server)
from flyfs.metaserver.server import MetaServicer
from flyfs.metaserver.wire import header
from flyfs.proto import meta_pb2
from meta_fixtures import ALICE, BOB, ROOT, ROOT_INO, make_service
# The gRPC suite's scenarios, run here over flyfs/net (names without test_ so
# pytest does not collect them twice).
from test_meta_grpc import errno_scenario
from test_meta_grpc import test_batch as batch_scenario
from test_meta_grpc import test_round_trip as round_trip_scenario

# The wire contract: ids are positions in meta.proto's Meta service. Methods
# may be appended; these must never move.
WIRE_IDS = ["Lookup", "GetAttr", "SetAttr", "Create", "Mkdir", "Mknod", "Symlink", "Link", "Unlink",
            "Rmdir", "Rename", "Readlink", "Readdir", "Statfs", "GetXattr", "SetXattr", "ListXattr",
            "RemoveXattr", "Open", "Close", "Sync", "Access", "Resolve", "ResolveParent", "SetLayout",
            "Batch"]


@pytest.fixture
async def served():
    engine = open_engine("memory://")
    svc = make_service(engine)
    await svc.format(root_mode=0o1777)
    server = await start_net_server(svc, "127.0.0.1", 0)
    client = MetaClient(server.address, user=ALICE)
    try:
        yield svc, client, server
    finally:
        await client.close_channel()
        await server.close()
        await svc.stop()
        await engine.close()


def test_method_ids_come_from_the_proto():
    service = meta_pb2.DESCRIPTOR.services_by_name["Meta"]
    assert [m.name for m in METHODS] == [m.name for m in service.methods]
    assert [m.id for m in METHODS] == list(range(len(service.methods)))
    assert [m.name for m in METHODS][:len(WIRE_IDS)] == WIRE_IDS
    for m in METHODS:
        d = service.methods_by_name[m.name]
        assert m.request.DESCRIPTOR is d.input_type and m.reply.DESCRIPTOR is d.output_type
        assert callable(getattr(MetaServicer, m.name)), m.name
    assert METHOD_IDS["Lookup"] == 0 and METHOD_IDS["Batch"] == WIRE_IDS.index("Batch")
    # What the client coalesces is exactly what the server's Batch runs.
    assert {field: name for name, field in BATCHABLE.items()} == MetaServicer._BATCHED


async def test_round_trip(served):
    svc, c, server = served
    assert c.target.startswith("tcp://127.0.0.1:")
    await round_trip_scenario((svc, c, None))
    assert server.connection_count == 1        # every call on one pipelined connection


async def test_batch(served):
    await batch_scenario(served)


async def test_concurrent_calls_share_a_connection(served):
    svc, c, server = served
    d = await c.mkdir(ROOT_INO, "d", 0o777)
    made = await asyncio.gather(*[c.create(d.ino, f"f{i:03d}", 0o644) for i in range(100)])
    assert len({f.ino for f, _ in made}) == 100
    await asyncio.gather(*[c.close(f.ino, s, length=i) for i, (f, s) in enumerate(made)])
    sizes = await asyncio.gather(*[c.lookup(d.ino, f"f{i:03d}") for i in range(100)])
    assert [n.size for n in sizes] == list(range(100))
    assert server.connection_count == 1


class CountingServicer(MetaServicer):
    """The real servicer, recording the operations of every Batch call it runs."""

    def __init__(self, svc):
        super().__init__(svc)
        self.batches = []

    async def Batch(self, r, context=None):
        self.batches.append([op.WhichOneof("op") for op in r.ops])
        return await super().Batch(r, context)


@pytest.fixture
async def counted(served):
    svc, _, _ = served
    servicer = CountingServicer(svc)
    server = await start_net_server(servicer, "127.0.0.1", 0)
    client = MetaClient(server.address, user=ALICE)
    client.coalesce = True      # (off by default)
    try:
        yield svc, client, servicer
    finally:
        await client.close_channel()
        await server.close()


async def test_concurrent_calls_are_coalesced_into_batches(counted):
    svc, c, servicer = counted
    d = await c.mkdir(ROOT_INO, "d", 0o700)
    # The first goes at once (nothing was in flight), the 19 issued meanwhile in one Batch.
    files = [f for f, _ in await asyncio.gather(*[c.create(d.ino, f"f{i}", 0o644) for i in range(20)])]
    assert [sorted(set(b)) for b in servicer.batches] == [["create"]] and len(servicer.batches[0]) == 19
    servicer.batches.clear()
    # Sequential calls go alone.
    for i in range(3):
        await c.lookup(d.ino, f"f{i}")
    assert servicer.batches == []
    # One batch, mixed operations and users: each caller gets its own answer or errno.
    results = await asyncio.gather(
        c.getattr(d.ino), *[c.lookup(d.ino, f"f{i}") for i in range(20)], c.lookup(d.ino, "missing"),
        c.lookup(d.ino, "f0", user=BOB), c.getattr(d.ino), c.unlink(d.ino, "f19"),
        c.rename(d.ino, "f18", ROOT_INO, "moved"), return_exceptions=True)
    assert results[0].ino == d.ino          # the one sent alone
    results = results[1:]
    assert [r.ino for r in results[:20]] == [f.ino for f in files]
    assert isinstance(results[20], FileNotFoundError) and isinstance(results[21], PermissionError)
    assert results[22].ino == d.ino
    assert results[23].ino == d.ino and results[23].mtime > d.mtime   # unlink: the directory after
    assert [n.ino for n in results[24]] == [d.ino, ROOT_INO]           # rename: both directories after
    assert len(servicer.batches) == 1 and len(servicer.batches[0]) == 25
    assert (await c.lookup(ROOT_INO, "moved")).ino == files[18].ino
    # Not batchable (statfs) or coalescing off: plain calls.
    servicer.batches.clear()
    await asyncio.gather(c.statfs(), c.statfs())
    c.coalesce = False
    await asyncio.gather(*[c.lookup(d.ino, f"f{i}") for i in range(5)])
    assert servicer.batches == []


async def test_close_later_ends_sessions_in_batches(counted):
    """Closes of unwritten files are queued and go out together; flush_closes() waits for
    them; sessions of different users go in separate Batch calls; a stale one is logged."""
    svc, c, servicer = counted
    d = await c.mkdir(ROOT_INO, "later", 0o777)
    made = [await c.create(d.ino, f"f{i}", 0o644, os.O_WRONLY) for i in range(40)]
    bob_file, bob_session = await c.create(d.ino, "bob", 0o644, os.O_WRONLY, user=BOB)
    assert len(await svc.list_sessions()) == 41
    servicer.batches.clear()
    for f, session in made:
        assert c.close_later(f.ino, session) is None          # returns at once
    c.close_later(bob_file.ino, bob_session, user=BOB)
    c.close_later(made[0][0].ino, b"no-such-session")
    assert len(await svc.list_sessions()) == 41               # nothing sent yet
    await c.flush_closes()
    assert await svc.list_sessions() == []
    assert sorted(len(b) for b in servicer.batches) == [1, 41]
    assert all(set(b) == {"close"} for b in servicer.batches)
    # Without flush_closes() they go within CLOSE_DELAY.
    f, session = await c.create(d.ino, "timed", 0o644, os.O_WRONLY)
    c.close_later(f.ino, session)
    await asyncio.sleep(c.CLOSE_DELAY * 20)
    assert await svc.list_sessions() == []


async def test_a_cancelled_caller_leaves_its_batch(counted):
    svc, c, servicer = counted
    # The first goes at once; the other three are queued behind it.
    calls = [asyncio.ensure_future(c.lookup(ROOT_INO, name)) for name in ("first", "a", "b", "c")]
    await asyncio.sleep(0)          # queued, not yet sent
    calls[2].cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, FileNotFoundError) for r in (done[0], done[1], done[3]))
    assert isinstance(done[2], asyncio.CancelledError)
    assert servicer.batches == [["lookup", "lookup"]]


async def test_errors_arrive_as_oserror(served):
    svc, c, server = served
    d = await errno_scenario(c)
    results = await c.batch([("lookup", {"parent": d.ino, "name": "nope"}), ("lookup", {"parent": d.ino, "name": "f"})])
    assert isinstance(results[0], FileNotFoundError) and results[1].is_reg

    unreachable = MetaClient("tcp://127.0.0.1:1", user=ALICE, retries=1, timeout=5)
    try:
        with pytest.raises(OSError) as e:
            await unreachable.getattr(ROOT_INO)
        assert e.value.errno == errno.EIO and "tcp://127.0.0.1:1" in e.value.strerror
    finally:
        await unreachable.close_channel()
    with pytest.raises(ValueError, match="bad data-plane address"):
        MetaClient("tcp://nowhere", user=ALICE)


async def test_server_side_failure_is_eio(served):
    svc, c, _ = served

    class Broken(MetaServicer):
        async def GetAttr(self, r, context=None):
            raise RuntimeError("servicer bug")

    server = await start_net_server(Broken(svc), "127.0.0.1", 0)
    broken = MetaClient(server.address, user=ALICE, timeout=10)
    try:
        with pytest.raises(OSError) as e:
            await broken.getattr(ROOT_INO)
        assert e.value.errno == errno.EIO and "servicer bug" in e.value.strerror
        assert (await broken.statfs()).namemax == 255       # the connection survived
    finally:
        await broken.close_channel()
        await server.close()


async def test_bad_frames_get_clear_errors_and_the_server_keeps_serving(served):
    svc, c, server = served
    good = meta_pb2.InodeReq(header=header(ALICE, uuid.uuid4().bytes), ino=ROOT_INO).SerializeToString()
    async with net.ConnectionPool() as pool:
        with pytest.raises(net.RemoteError, match="unknown metadata method id 999"):
            await pool.call(server.address, 999, good, timeout=10)
        bad = await pool.call(server.address, METHOD_IDS["Lookup"], b"\xff\xff\xff\xff", timeout=10)
        reply = meta_pb2.AttrReply.FromString(bad.header)
        assert reply.status.code == errno.EBADMSG and "malformed LookupReq" in reply.status.message
        ok = meta_pb2.AttrReply.FromString((await pool.call(server.address, METHOD_IDS["GetAttr"], good,
                                                            timeout=10)).header)
        assert ok.status.code == 0 and ok.attr.ino == ROOT_INO
        assert len(pool.addresses) == 1         # all on the one connection
        # A payload is a protocol violation: that connection alone is dropped.
        with pytest.raises(net.TransportError):
            await pool.call(server.address, METHOD_IDS["GetAttr"], good, payload=b"x", timeout=10)
    assert (await c.getattr(ROOT_INO)).ino == ROOT_INO


async def test_handler_without_sockets(served):
    svc, _, _ = served
    handle = make_handler(MetaServicer(svc))
    req = meta_pb2.LookupReq(header=header(ROOT, uuid.uuid4().bytes), parent=ROOT_INO, name=b"none")
    reply = meta_pb2.AttrReply.FromString((await handle(net.Request(0, req.SerializeToString()))).header)
    assert reply.status.code == errno.ENOENT
    with pytest.raises(UnknownMethod):
        await handle(net.Request(len(METHODS), b""))


async def test_retried_remove_returns_first_answer(served):
    svc, c, server = served
    await c.mknod(ROOT_INO, "f", stat.S_IFREG | 0o644)
    req = meta_pb2.RemoveReq(header=header(ALICE, b"retry-uuid-00001"), parent=ROOT_INO, name=b"f")
    async with net.ConnectionPool() as pool:
        async def unlink(r):
            rep = await pool.call(server.address, METHOD_IDS["Unlink"], r.SerializeToString(), timeout=10)
            return meta_pb2.EmptyReply.FromString(rep.header).status.code
        assert await unlink(req) == 0
        assert await unlink(req) == 0          # the first answer was "lost"; the client resends
        fresh = meta_pb2.RemoveReq(header=header(ALICE, b"another-uuid-002"), parent=ROOT_INO, name=b"f")
        assert await unlink(fresh) == errno.ENOENT


async def test_reconnects_and_retries_while_the_server_restarts(served):
    svc, c, server = served
    port = server.port
    client = MetaClient(server.address, user=ALICE, retries=8, timeout=10)
    client.coalesce = True
    restarted = None
    try:
        assert (await client.getattr(ROOT_INO)).ino == ROOT_INO
        await server.close()                      # the fixture's close() is then a no-op
        alone = asyncio.ensure_future(client.getattr(ROOT_INO))
        await asyncio.sleep(0)
        together = asyncio.gather(client.getattr(ROOT_INO), client.lookup(ROOT_INO, "nothing"),
                                  return_exceptions=True)           # one coalesced Batch
        await asyncio.sleep(0.3)                  # the calls are retrying with backoff now
        assert not alone.done() and not together.done()
        restarted = await start_net_server(svc, "127.0.0.1", port)
        assert (await asyncio.wait_for(alone, 30)).ino == ROOT_INO
        ino, missing = await asyncio.wait_for(together, 30)
        assert ino.ino == ROOT_INO and isinstance(missing, FileNotFoundError)
    finally:
        await client.close_channel()
        if restarted is not None:
            await restarted.close()


async def test_one_pool_per_event_loop(served):
    svc, c, server = served
    assert (await c.getattr(ROOT_INO)).ino == ROOT_INO

    async def elsewhere():
        ino = (await c.getattr(ROOT_INO)).ino
        await c.close_channel()                   # closes this loop's pool, and the test loop's
        return ino

    assert await asyncio.to_thread(asyncio.run, elsewhere()) == ROOT_INO
    assert (await c.getattr(ROOT_INO)).ino == ROOT_INO   # a fresh pool on this loop
    assert len(c._links) == 1


# ---- discovery through mgmtd -------------------------------------------------------------------------------

@pytest.fixture
async def mgmtd():
    kv = f"memory://meta-net-{uuid.uuid4().hex}"
    m = Mgmtd(kv, "127.0.0.1:0", heartbeat_timeout=30.0, lease_s=30.0, tick_s=3600)
    await m.start()
    client = MgmtdClient(m.address, cluster_id=m.cluster_id, retry_timeout=10.0)
    try:
        yield m, client, kv
    finally:
        await client.close()
        await m.stop()


async def test_registration_carries_the_data_address(mgmtd):
    m, client, kv = mgmtd
    a = await client.register_node(NODE_META, "127.0.0.1:9310", data_address="tcp://127.0.0.1:9311")
    b = await client.register_node(NODE_META, "127.0.0.1:9320")
    s = await client.register_node(NODE_STORAGE, "127.0.0.1:9330", targets=[(0, "/t")])
    info = await client.get_routing_info(force=True)
    nodes = {n.node_id: n for n in info.meta_nodes()}
    assert nodes[a.node_id].data_address == "tcp://127.0.0.1:9311"
    assert pick_meta_target(nodes[a.node_id]) == "tcp://127.0.0.1:9311"
    assert nodes[b.node_id].data_address == "" and pick_meta_target(nodes[b.node_id]) == "127.0.0.1:9320"
    assert info.nodes[s.node_id].data_address == ""
    with pytest.raises(MgmtdError, match="node data address 'nowhere' is not HOST:PORT"):
        await client.register_node(NODE_META, "127.0.0.1:9340", data_address="tcp://nowhere")
    # Kept in the KV: a manager taking over (here: restarted on the same store) returns it.
    await m.stop()
    m2 = Mgmtd(kv, "127.0.0.1:0", heartbeat_timeout=30.0, lease_s=30.0, tick_s=3600)
    await m2.start()
    c2 = MgmtdClient(m2.address, cluster_id=m2.cluster_id, retry_timeout=10.0)
    try:
        info = await c2.get_routing_info(force=True)
        assert info.nodes[a.node_id].data_address == "tcp://127.0.0.1:9311"
    finally:
        await c2.close()
        await m2.stop()


async def test_meta_command_serves_both_and_registers(tmp_path, mgmtd):
    m, client, _ = mgmtd
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from flyfs.metaserver.server import main; sys.exit(main())",
        "--kv", f"rocksdb://{tmp_path}/meta", "--listen", "127.0.0.1:0", "--chains", "1,2,3",
        "--mgmtd", m.address, "--log-level", "WARNING",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        found = re.search(r"listening on (127\.0\.0\.1:\d+) .*, net (tcp://127\.0\.0\.1:\d+)", line)
        assert found, line
        grpc_address, net_address = found.groups()
        node = next(n for n in (await client.get_routing_info(force=True)).meta_nodes()
                    if n.address == grpc_address)
        assert node.data_address == net_address and pick_meta_target(node) == net_address
        async with MetaClient(pick_meta_target(node), user=ROOT) as fast, \
                MetaClient(node.address, user=ROOT) as slow:
            d = await fast.mkdir(ROOT_INO, "d", 0o755)
            assert (await slow.lookup(ROOT_INO, "d")).ino == d.ino      # one service, two transports
            f, _ = await slow.create(d.ino, "f")
            assert [e.name async for e in fast.readdir_all(d.ino)] == [b"f"]
            assert set(f.layout.chains) <= {1, 2, 3}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    bad = subprocess.run([sys.executable, "-c", "import sys; from flyfs.metaserver.server import main; "
                          "sys.exit(main())", "--kv", "memory://x", "--net-listen", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--net-listen must be HOST:PORT or 'off'" in bad.stderr


async def test_blocking_calls_from_another_thread(served):
    """call_now / resolve_now: the same answers from a thread with no event loop,
    errors as OSError, None where the call could not be made (then the async API)."""
    svc, client, server = served
    d = await client.mkdir(ROOT_INO, "now", 0o755)
    f, session = await client.create(d.ino, "f", 0o644, os.O_WRONLY)
    await client.close(f.ino, session, length=0)

    def in_thread():
        n = client.resolve_now("/now/f")
        assert n.ino == f.ino and stat.S_ISREG(n.mode)
        assert client.resolve_now("/now", follow=False).ino == d.ino
        with pytest.raises(FileNotFoundError):
            client.resolve_now("/now/missing")
        with pytest.raises(NotADirectoryError):
            client.resolve_now("/now/f/x")
        r = client.call_now("GetAttr", lambda h: meta_pb2.InodeReq(header=h, ino=d.ino))
        assert r.attr.ino == d.ino
    await asyncio.to_thread(in_thread)
    assert await asyncio.to_thread(MetaClient("127.0.0.1:1").resolve_now, "/") is None   # gRPC target
    port = server.port
    await server.close()
    gone = MetaClient(f"tcp://127.0.0.1:{port}", timeout=2)
    assert await asyncio.to_thread(gone.resolve_now, "/now/f") is None     # unreachable: None


@pytest.mark.parametrize("transport", ["net", "grpc"])
async def test_an_unreachable_server_fails_over_to_another(transport):
    """Two servers on one KV. When the client's server goes away, the call is retried,
    then sent to the server `failover` names; without one, it fails with EIO."""
    from flyfs.client.meta_client import MetaUnreachable
    from flyfs.metaserver.server import start_server
    engine = open_engine("memory://")
    svcs = [make_service(engine), make_service(engine)]
    await svcs[0].format(root_mode=0o1777)
    if transport == "net":
        servers = [await start_net_server(s, "127.0.0.1", 0) for s in svcs]
        targets = [s.address for s in servers]
    else:
        started = [await start_server(s, "127.0.0.1:0") for s in svcs]
        servers = [srv for srv, _ in started]
        targets = [f"127.0.0.1:{port}" for _, port in started]
    asked = []

    async def failover(tried):
        asked.append(tried)
        return next((t for t in targets if t not in tried), None)

    c = MetaClient(targets[0], user=ALICE, retries=2, failover=failover)
    alone = MetaClient(targets[0], user=ALICE, retries=1)
    try:
        d = await c.mkdir(ROOT_INO, "d", 0o755)
        await c.create(d.ino, "f", 0o644)
        if transport == "net":
            await servers[0].close()
        else:
            await servers[0].stop(None)
        assert (await c.lookup(d.ino, "f")).is_reg
        assert c.target == targets[1] and asked == [(targets[0],)]
        await c.unlink(d.ino, "f")
        with pytest.raises(FileNotFoundError):
            await c.lookup(d.ino, "f")
        with pytest.raises(MetaUnreachable) as e:
            await alone.getattr(ROOT_INO)
        assert e.value.errno == errno.EIO and isinstance(e.value, OSError)
    finally:
        await c.close_channel()
        await alone.close_channel()
        for srv in servers:
            await (srv.close() if transport == "net" else srv.stop(None))
        for s in svcs:
            await s.stop()
        await engine.close()


@contextlib.asynccontextmanager
async def _hung_and_good_server():
    """(hung target, good server, alive): a server that accepts connections and reads
    everything but never answers, a real one, and the liveness map the test sets."""
    hung_conns = []

    async def swallow(reader, writer):
        hung_conns.append(writer)
        await reader.read(-1)       # reads everything, answers nothing

    hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
    hung_target = f"tcp://127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    engine = open_engine("memory://")
    svc = make_service(engine)
    await svc.format(root_mode=0o1777)
    server = await start_net_server(svc, "127.0.0.1", 0)
    try:
        yield hung_target, server, {hung_target: True, server.address: True}
    finally:
        await server.close()
        hung.close()
        for w in hung_conns:
            w.close()
        await hung.wait_closed()
        await svc.stop()
        await engine.close()


async def test_calls_to_a_silent_server_go_elsewhere_once_it_is_down_without_waiting_for_the_timeout(monkeypatch):
    """A hung server and a 30 s call timeout: while mgmtd still hears from it the calls
    wait; once `liveness` says it is gone they are abandoned and run at the server
    `failover` names (a create and a remove too, exactly once), long before the timeout."""
    import flyfs.client.meta_client as mc
    monkeypatch.setattr(mc, "HANG_AFTER", 0.3)
    monkeypatch.setattr(mc, "HANG_CHECK", 0.1)
    async with _hung_and_good_server() as (hung_target, server, alive):
        asked = []

        async def liveness(t):
            asked.append(t)
            return alive[t]

        async def failover(tried):
            return server.address if server.address not in tried else None

        c = MetaClient(hung_target, user=ALICE, timeout=30, retries=1, failover=failover, liveness=liveness)
        loop = asyncio.get_running_loop()
        try:
            t0 = loop.time()
            calls = asyncio.gather(c.getattr(ROOT_INO), c.mkdir(ROOT_INO, "d"), c.lookup(ROOT_INO, "nope"),
                                   return_exceptions=True)
            await asyncio.sleep(1.0)
            assert not calls.done() and asked and set(asked) == {hung_target}   # alive: they wait
            alive[hung_target] = False                                          # mgmtd stopped hearing from it
            root, d, missing = await asyncio.wait_for(calls, 5)
            assert loop.time() - t0 < 5 and c.target == server.address
            assert root.ino == ROOT_INO and (await c.lookup(ROOT_INO, "d")).ino == d.ino
            assert isinstance(missing, FileNotFoundError)
            f, session = await c.create(d.ino, "f")
            await c.close(f.ino, session, length=0)
            await c.unlink(d.ino, "f")
            assert (await c.readdir(d.ino))[0] == []
        finally:
            await c.close_channel()


async def test_a_server_that_stops_answering_is_failed_over_once_it_is_down():
    """A server that accepts connections and never answers: a call times out; while
    `liveness` says the server is alive that is an EIO (the call may still run there),
    once it says it is gone the call goes to the server `failover` names."""
    async with _hung_and_good_server() as (hung_target, server, alive):
        async def liveness(t):
            return alive[t]

        async def failover(tried):
            return server.address if server.address not in tried else None

        c = MetaClient(hung_target, user=ALICE, timeout=0.3, retries=1, failover=failover, liveness=liveness)
        try:
            with pytest.raises(OSError) as e:
                await c.getattr(ROOT_INO)
            assert e.value.errno == errno.EIO and c.target == hung_target
            alive[hung_target] = False          # mgmtd stopped hearing from it
            assert (await c.getattr(ROOT_INO)).ino == ROOT_INO
            assert c.target == server.address
        finally:
            await c.close_channel()
