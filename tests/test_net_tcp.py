"""TCP data-plane tests: real loopback sockets, under the default loop and uvloop.

The same-host Unix sockets are off here (every test speaks TCP) except in the
tests named `local_socket`, which turn them on."""
import asyncio
import contextvars
import hashlib
import logging
import socket
import sys
import types

import numpy as np
import pytest
import uvloop

from flyfs import net
from flyfs.net.frame import FLAG_RESPONSE, HEADER_SIZE, pack_header, unpack_header
from flyfs.net.pool import parse_address
from flyfs.net.rdma import rdma_available

ECHO, BLOB, SLOW, FAIL, HASH = 1, 2, 3, 4, 5


@pytest.fixture(autouse=True)
def tcp_only(monkeypatch):
    monkeypatch.setenv("FLYFS_LOCAL_SOCKETS", "0")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run an async test body on a fresh loop of the given kind; fail on leaked tasks."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def _run(body, timeout=60):
        async def wrapper():
            async with asyncio.timeout(timeout):
                await body()
            await asyncio.sleep(0)
            leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert not leaked, f"leaked tasks: {leaked}"
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(wrapper())
    return _run


def pattern(n, seed=0):
    return (bytes((i * 7 + seed) % 251 for i in range(251)) * (n // 251 + 1))[:n]


class Service:
    """A test handler: echo, fixed blobs, a gate to hold requests, failures, hashing."""

    def __init__(self):
        self.gates = {}             # key -> asyncio.Event releasing SLOW requests
        self.arrived = asyncio.Event()
        self.slow_waiting = 0
        self.cancelled = 0
        self.log = []

    async def __call__(self, req):
        if req.method == ECHO:
            assert isinstance(req.payload, memoryview)
            return net.Response(b"echo:" + req.header, [req.payload])
        if req.method == BLOB:
            n = int(req.header)
            return net.Response(b"blob", [pattern(n)])
        if req.method == SLOW:
            key = req.header
            gate = self.gates.setdefault(key, asyncio.Event())
            self.slow_waiting += 1
            self.arrived.set()
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            self.log.append(key)
            size = int(key.split(b":")[1]) if b":" in key else 0
            return net.Response(key, [b"\xab" * size])
        if req.method == FAIL:
            raise ValueError("boom " + req.header.decode())
        if req.method == HASH:
            return net.Response(hashlib.sha256(req.payload).digest(), [req.payload])
        return net.Response(b"unknown")

    async def wait_slow(self, count):
        while self.slow_waiting < count:
            self.arrived.clear()
            await self.arrived.wait()


# ---------------------------------------------------------------- basics

def test_parse_address():
    assert parse_address("tcp://127.0.0.1:8000") == ("tcp", "127.0.0.1", 8000)
    assert parse_address("127.0.0.1:9") == ("tcp", "127.0.0.1", 9)
    assert parse_address("tcp://[::1]:7000") == ("tcp", "::1", 7000)
    for bad in ("tcp://127.0.0.1", "tcp://:80", "tcp://h:0", "tcp://h:99999", "tcp://h:x"):
        with pytest.raises(ValueError, match="bad data-plane address"):
            parse_address(bad)
    with pytest.raises(ValueError, match="unsupported data-plane transport 'shm'"):
        parse_address("shm://host:1")


def test_round_trip(run):
    async def body():
        svc = Service()
        server = await net.serve(svc)
        assert server.address == f"tcp://127.0.0.1:{server.port}" and server.port > 0
        pool = net.ConnectionPool(connect_timeout=5.0)
        try:
            reply = await pool.call(server.address, ECHO, b"no-payload")
            assert reply.header == b"echo:no-payload" and reply.payload_len == 0
            assert bytes(reply.payload) == b""

            arr = np.arange(8, dtype=np.uint16)
            parts = [b"abc", bytearray(b"def"), memoryview(b"ghij")[1:], arr]
            expected = b"abcdefhij" + arr.tobytes()
            reply = await pool.call(server.address, ECHO, b"h", parts)
            assert reply.header == b"echo:h"
            assert reply.payload_len == len(expected)
            assert isinstance(reply.payload, memoryview) and bytes(reply.payload) == expected

            into = bytearray(b"\x55" * 100)
            reply = await pool.call(server.address, ECHO, b"", [b"0123456789"], into=into)
            assert reply.payload_len == 10 and bytes(reply.payload) == b"0123456789"
            assert into[:10] == b"0123456789" and into[10:] == b"\x55" * 90
            assert pool.addresses == [server.address] and server.connection_count == 1
        finally:
            await pool.close()
            await server.close()
    run(body)


def test_request_sees_peer_and_id(run):
    async def body():
        seen = []

        async def handler(req):
            seen.append(req)
            return net.Response(b"")
        async with await net.serve(handler) as server:
            async with net.ConnectionPool() as pool:
                await pool.call(server.address, 9, b"x", b"payload")
                await pool.call(server.address, 9, b"y")
        assert [r.method for r in seen] == [9, 9]
        assert seen[0].peer.startswith("127.0.0.1:") and seen[0].peer == seen[1].peer
        assert bytes(seen[0].payload) == b"payload" and seen[1].payload.nbytes == 0
        assert seen[0].request_id != seen[1].request_id
    run(body)


def test_local_socket_same_frames_and_tcp_fallback(run, monkeypatch):
    """With local sockets on, a client on the server's host talks over its abstract Unix
    socket (same frames, same results); a server without one is reached over TCP."""
    from flyfs.net.blocking import BlockingConnection
    from flyfs.net.tcp import local_name

    async def body():
        seen = []

        async def handler(req):
            seen.append(req.peer)
            return net.Response(b"ok:" + req.header, [bytes(req.payload)])
        monkeypatch.setenv("FLYFS_LOCAL_SOCKETS", "1")
        async with await net.serve(handler) as server:
            assert server.local
            async with net.ConnectionPool() as pool:
                into = bytearray(300_000)
                reply = await pool.call(server.address, 9, b"a", [pattern(300_000)], into=into)
                assert reply.header == b"ok:a" and into == pattern(300_000)
                conn = await pool.connection(server.address)
                assert conn._transport.get_extra_info("socket").family == socket.AF_UNIX
            bc = await asyncio.to_thread(BlockingConnection, server.address)
            assert bc._sock.family == socket.AF_UNIX
            assert (await asyncio.to_thread(bc.call, 9, b"b", [b"xy"], bytearray(4)))[0] == b"ok:b"
            bc.close()
            assert seen == ["local", "local"]
            name = local_name(server.host, server.port)
        probe = socket.socket(socket.AF_UNIX)
        with pytest.raises(OSError):       # closed with the server
            probe.connect(name)
        probe.close()
        # a server without a local socket (turned off there): the client falls back to TCP
        monkeypatch.setenv("FLYFS_LOCAL_SOCKETS", "0")
        async with await net.serve(handler) as server:
            assert not server.local
            monkeypatch.setenv("FLYFS_LOCAL_SOCKETS", "1")
            async with net.ConnectionPool() as pool:
                assert (await pool.call(server.address, 9, b"c")).header == b"ok:c"
                conn = await pool.connection(server.address)
                assert conn._transport.get_extra_info("socket").family == socket.AF_INET
            bc = await asyncio.to_thread(BlockingConnection, server.address)
            assert bc._sock.family == socket.AF_INET
            bc.close()
        assert seen[2].startswith("127.0.0.1:")
    run(body)


def test_scatter_into(run):
    async def body():
        async with await net.serve(Service()) as server, net.ConnectionPool() as pool:
            a, b, c = bytearray(3000), bytearray(5000), np.zeros(1000, dtype=np.float32)  # 4000 B
            into = [a, bytearray(0), memoryview(b), c]
            reply = await pool.call(server.address, BLOB, b"10240", into=into)
            data = pattern(10240)
            assert reply.header == b"blob" and reply.payload_len == 10240
            assert [len(v) for v in reply.payload] == [3000, 0, 5000, 2240]
            assert b"".join(bytes(v) for v in reply.payload) == data
            assert bytes(a) == data[:3000] and bytes(b) == data[3000:8000]
            assert c.tobytes()[:2240] == data[8000:] and not c.tobytes()[2240:].strip(b"\0")
    run(body)


def test_many_concurrent_requests_out_of_order(run):
    async def body():
        svc = Service()
        async with await net.serve(svc) as server, net.ConnectionPool() as pool:
            n = 40
            calls = [asyncio.ensure_future(pool.call(server.address, SLOW, b"k%d:%d" % (i, i * 100)))
                     for i in range(n)]
            await svc.wait_slow(n)
            # A fast request is not stuck behind the slow ones on the same connection.
            fast = await pool.call(server.address, ECHO, b"fast", [b"f"])
            assert fast.header == b"echo:fast" and not any(c.done() for c in calls)
            for i in reversed(range(n)):
                svc.gates[b"k%d:%d" % (i, i * 100)].set()
                await asyncio.sleep(0)
            replies = await asyncio.gather(*calls)
            for i, reply in enumerate(replies):
                assert reply.header == b"k%d:%d" % (i, i * 100)
                assert bytes(reply.payload) == b"\xab" * (i * 100)
            assert svc.log[0] == b"k%d:%d" % (n - 1, (n - 1) * 100)    # answered in reverse
            assert server.connection_count == 1
    run(body)


def test_large_payload_byte_exact(run):
    async def body():
        size = 32 << 20
        data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
        async with await net.serve(Service()) as server, net.ConnectionPool() as pool:
            into = bytearray(size)
            reply = await pool.call(server.address, HASH, b"", [data], into=into, timeout=60)
            assert reply.header == hashlib.sha256(data).digest()
            assert reply.payload_len == size and into == data.tobytes()
            reply = await pool.call(server.address, BLOB, str(size).encode(), timeout=60)
            assert reply.payload_len == size and reply.payload == pattern(size)
    run(body)


# ---------------------------------------------------------------- errors

def test_handler_exception_becomes_remote_error(run, caplog):
    async def body():
        async with await net.serve(Service()) as server, net.ConnectionPool() as pool:
            conn = await pool.connection(server.address)
            with pytest.raises(net.RemoteError, match="ValueError: boom now"):
                await pool.call(server.address, FAIL, b"now", into=bytearray(10))
            reply = await pool.call(server.address, ECHO, b"again")
            assert reply.header == b"echo:again"
            assert await pool.connection(server.address) is conn and conn.is_open
    with caplog.at_level(logging.WARNING, logger="flyfs.net"):
        run(body)
    assert any("raised ValueError" in r.getMessage() for r in caplog.records)


def test_non_response_and_too_large_response_are_remote_errors(run):
    async def body():
        async def handler(req):
            if req.method == 1:
                return b"not a Response"
            if req.method == 3:     # a CancelledError from the handler's own awaits
                fut = asyncio.get_running_loop().create_future()
                fut.cancel()
                await fut
            return net.Response(b"", [bytes(2048)])
        async with await net.serve(handler, max_payload=1024) as server, \
                net.ConnectionPool() as pool:
            with pytest.raises(net.RemoteError, match="expected net.Response"):
                await pool.call(server.address, 1, b"")
            with pytest.raises(net.RemoteError, match="response too large"):
                await pool.call(server.address, 2, b"")
            with pytest.raises(net.RemoteError, match="CancelledError"):
                await pool.call(server.address, 3, b"")
    run(body)


def test_timeout_then_next_request_ok_and_buffer_untouched(run):
    async def body():
        svc = Service()
        async with await net.serve(svc) as server, net.ConnectionPool() as pool:
            into = bytearray(200_000)
            with pytest.raises(net.RequestTimeout, match="timed out"):
                await pool.call(server.address, SLOW, b"late:150000", into=into, timeout=0.2)
            assert svc.slow_waiting == 1
            svc.gates[b"late:150000"].set()
            # The late reply is sent before the next one on this connection, so
            # once the next reply is in, the late one has been read and discarded.
            reply = await pool.call(server.address, ECHO, b"next", [b"ok"])
            assert reply.header == b"echo:next" and bytes(reply.payload) == b"ok"
            assert svc.log == [b"late:150000"]
            assert into == bytes(200_000), "late reply was written into the caller's buffer"
            assert len(pool.addresses) == 1
    run(body)


def test_cancelled_call_forgets_request(run):
    async def body():
        svc = Service()
        async with await net.serve(svc) as server, net.ConnectionPool() as pool:
            into = bytearray(1000)
            task = asyncio.ensure_future(pool.call(server.address, SLOW, b"c:500", into=into))
            await svc.wait_slow(1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            conn = await pool.connection(server.address)
            assert conn.inflight == 0
            svc.gates[b"c:500"].set()
            assert (await pool.call(server.address, ECHO, b"x")).header == b"echo:x"
            assert into == bytes(1000)
    run(body)


def test_aborted_call_forgets_request_and_the_connection_goes_on(run):
    async def body():
        svc = Service()
        async with await net.serve(svc) as server, net.ConnectionPool() as pool:
            loop = asyncio.get_running_loop()
            moved = loop.create_future()
            into = bytearray(1000)
            task = asyncio.ensure_future(pool.call(server.address, SLOW, b"a:500", into=into, timeout=30,
                                                   abort=moved))
            await svc.wait_slow(1)
            started = loop.time()
            moved.set_result("target 7 left chain 3")
            with pytest.raises(net.RequestAborted, match="abandoned: target 7 left chain 3"):
                await task
            assert loop.time() - started < 1
            conn = await pool.connection(server.address)
            assert conn.inflight == 0
            with pytest.raises(net.RequestAborted):     # an abort that already happened: at once
                await pool.call(server.address, SLOW, b"b:1", timeout=30, abort=moved)
            svc.gates[b"a:500"].set()
            svc.gates.setdefault(b"b:1", asyncio.Event()).set()
            assert (await pool.call(server.address, ECHO, b"x", abort=loop.create_future())).header == b"echo:x"
            assert into == bytes(1000)
    run(body)


def test_silence_counts_only_while_requests_wait_and_nothing_comes(run):
    async def body():
        svc = Service()
        async with await net.serve(svc) as server, net.ConnectionPool() as pool:
            await pool.call(server.address, ECHO, b"x")
            await asyncio.sleep(0.3)
            assert pool.silence(server.address) == 0               # idle: nothing waits
            task = asyncio.ensure_future(pool.call(server.address, SLOW, b"s:1", timeout=30))
            await svc.wait_slow(1)
            await asyncio.sleep(0.3)
            assert 0.25 < pool.silence(server.address) < 2         # counted from the request, not the idle time
            await pool.call(server.address, ECHO, b"y")             # the peer speaks: silence starts over
            assert pool.silence(server.address) < 0.1
            svc.gates[b"s:1"].set()
            await task
            assert pool.silence(server.address) == 0
            assert pool.silence("127.0.0.1:1") == 0                 # no connection
    run(body)


def test_timeout_mid_payload_never_writes_after_timeout(run, monkeypatch):
    """A reply whose payload is half received when the request times out (through the
    socket: the fake server speaks no shared memory)."""
    monkeypatch.setenv("FLYFS_SHM", "0")
    async def body():
        size = 400_000
        release = asyncio.Event()
        got_second = asyncio.Event()
        finished = asyncio.Event()

        async def fake_server(reader, writer):
            first = await reader.readexactly(HEADER_SIZE)
            fh = unpack_header(first)
            await reader.readexactly(fh.header_len + fh.payload_len)
            writer.write(pack_header(FLAG_RESPONSE, fh.method, fh.request_id, 0, size))
            writer.write(b"\x11" * (size // 2))
            await writer.drain()
            await release.wait()
            writer.write(b"\x22" * (size - size // 2))
            second = unpack_header(await reader.readexactly(HEADER_SIZE))
            await reader.readexactly(second.header_len + second.payload_len)
            writer.write(pack_header(FLAG_RESPONSE, second.method, second.request_id, 2, 0) + b"ok")
            await writer.drain()
            got_second.set()
            await reader.read()     # until the client closes
            writer.close()
            finished.set()

        srv = await asyncio.start_server(fake_server, "127.0.0.1", 0)
        address = f"tcp://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        into = bytearray(size)
        async with net.ConnectionPool() as pool:
            with pytest.raises(net.RequestTimeout):
                await pool.call(address, 1, b"", into=into, timeout=0.5)
            release.set()
            reply = await pool.call(address, 2, b"")
            assert reply.header == b"ok"
            written = len(into) - len(into.lstrip(b"\x11"))
            assert 0 < written <= size // 2
            assert into[written:] == bytes(size - written), "bytes written after the timeout"
            assert b"\x22" not in into
        await got_second.wait()
        await finished.wait()
        srv.close()
        await srv.wait_closed()
    run(body)


def test_timeout_with_payload_still_queued_drops_connection(run, monkeypatch):
    """The transport must not keep sending a buffer the caller got back on timeout."""
    monkeypatch.setenv("FLYFS_SHM", "0")
    async def body():
        accepted = []

        async def silent_server(reader, writer):
            accepted.append(writer)     # never reads: the client's send backs up

        srv = await asyncio.start_server(silent_server, "127.0.0.1", 0)
        address = f"tcp://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        async with net.ConnectionPool(max_payload=64 << 20) as pool:
            conn = await pool.connection(address)
            with pytest.raises(net.RequestTimeout):
                await pool.call(address, ECHO, b"", [bytes(48 << 20)], timeout=0.3)
            await asyncio.wait_for(conn.wait_closed(), 10)
            assert conn.closed and pool.addresses == []
        for w in accepted:
            w.close()
        srv.close()
        await srv.wait_closed()
    run(body)


def test_into_too_small_is_protocol_error_and_never_overflows(run):
    async def body():
        svc = Service()
        async with await net.serve(svc) as server, net.ConnectionPool() as pool:
            other = asyncio.ensure_future(pool.call(server.address, SLOW, b"other"))
            await svc.wait_slow(1)
            backing = bytearray(b"\xcc" * 120)
            with pytest.raises(net.ProtocolError, match="exceeds the 100-byte into buffer"):
                await pool.call(server.address, BLOB, b"101", into=memoryview(backing)[10:110])
            assert backing == b"\xcc" * 120
            with pytest.raises(net.TransportError):   # same connection was dropped
                await other
            reply = await pool.call(server.address, BLOB, b"100", into=memoryview(backing)[10:110])
            assert reply.payload_len == 100 and backing[10:110] == pattern(100)
            assert backing[:10] == backing[110:] == b"\xcc" * 10
    run(body)


def test_request_over_client_limits(run):
    async def body():
        async with await net.serve(Service()) as server, \
                net.ConnectionPool(max_header=64, max_payload=1000) as pool:
            with pytest.raises(net.ProtocolError, match="request header of 65 bytes"):
                await pool.call(server.address, ECHO, b"h" * 65)
            with pytest.raises(net.ProtocolError, match="request payload of 1001 bytes"):
                await pool.call(server.address, ECHO, b"", [bytes(1001)])
            with pytest.raises(net.ProtocolError, match="frame payload of 2000 bytes exceeds the 1000-byte limit"):
                await pool.call(server.address, BLOB, b"2000")
            assert (await pool.call(server.address, ECHO, b"ok")).header == b"echo:ok"
    run(body)


@pytest.mark.parametrize("bad", ["garbage", "oversized_payload", "oversized_header", "response_flag"])
def test_bad_frame_drops_only_that_connection(run, caplog, bad):
    async def body():
        async with await net.serve(Service(), max_payload=1 << 20, max_header=4096) as server, \
                net.ConnectionPool() as pool:
            assert (await pool.call(server.address, ECHO, b"1")).header == b"echo:1"
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            if bad == "garbage":
                data = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n"
            elif bad == "oversized_payload":
                data = pack_header(0, ECHO, 1, 0, (1 << 20) + 1)
            elif bad == "oversized_header":
                data = pack_header(0, ECHO, 1, 4097, 0)
            else:
                data = pack_header(FLAG_RESPONSE, ECHO, 1, 0, 0)
            writer.write(data)
            await writer.drain()
            assert await reader.read() == b""      # the server closed this connection
            writer.close()
            await writer.wait_closed()
            reply = await pool.call(server.address, ECHO, b"2", [b"still"])
            assert reply.header == b"echo:2" and bytes(reply.payload) == b"still"
            async with net.ConnectionPool() as second:
                assert (await second.call(server.address, ECHO, b"3")).header == b"echo:3"
    with caplog.at_level(logging.WARNING, logger="flyfs.net"):
        run(body)
    drops = [r for r in caplog.records if "dropping connection" in r.getMessage()]
    assert len(drops) == 1 and "\n" not in drops[0].getMessage()


async def close_fails_a_held_call(svc: Service, server, pool) -> None:
    """A SLOW call held in its handler when the server closes: the caller gets
    TransportError and the handler is cancelled."""
    held = asyncio.ensure_future(pool.call(server.address, SLOW, b"held"))
    await svc.wait_slow(svc.slow_waiting + 1)
    await server.close()
    with pytest.raises(net.TransportError):
        await held
    assert svc.cancelled == 1


def test_server_close_fails_calls_with_transport_error(run):
    async def body():
        svc = Service()
        server = await net.serve(svc)
        async with net.ConnectionPool(connect_timeout=2.0) as pool:
            await close_fails_a_held_call(svc, server, pool)
            with pytest.raises(net.TransportError):
                await pool.call(server.address, ECHO, b"after")
    run(body)


def test_eager_start_finishes_at_once_or_hands_over_to_a_task(run):
    from flyfs.net import eager

    async def body():
        loop = asyncio.get_running_loop()
        steps = []

        async def work(wait, fail=False):
            steps.append(("first", asyncio.current_task()))
            if wait:
                await asyncio.sleep(0.01)
                steps.append(("after", asyncio.current_task()))
            if fail:
                raise KeyError("x")
            return wait

        me = asyncio.current_task()     # the first steps run right here, in the caller
        assert eager.start(loop, work(False)) == (True, False)
        assert steps == [("first", me)]
        done, task = eager.start(loop, work(True))
        assert not done and steps[-1] == ("first", me) and task is not me and await task is True
        assert steps[-1] == ("after", task)
        with pytest.raises(KeyError):
            eager.start(loop, work(False, fail=True))
        done, task = eager.start(loop, work(True, fail=True))
        with pytest.raises(KeyError):
            await task
        coro = work(True)     # a continuation can also be awaited as a coroutine
        assert await eager._Resumed(coro, coro.send(None)) is True
    run(body)


def test_eager_handlers_answer_without_a_task_and_go_on_in_one_when_they_wait(run):
    """serve(eager=True): a handler that never waits answers from the read callback
    (no task); one that waits goes on in a task (out of order, cancellable, its
    errors answered); each runs in a context of its own."""
    var = contextvars.ContextVar("v", default=None)

    async def body():
        svc = Service()
        tasks_seen, leaks = [], []

        async def handler(req):
            if var.get() is not None:
                leaks.append(var.get())
            var.set(req.header)
            if req.method == FAIL and req.header == b"later":
                await asyncio.sleep(0)
            reply = await svc(req)
            tasks_seen.append(asyncio.current_task())     # (at the end: after any wait)
            return reply

        server = await net.serve(handler, eager=True)
        async with net.ConnectionPool() as pool:
            assert (await pool.call(server.address, ECHO, b"a", [b"xy"])).header == b"echo:a"
            assert tasks_seen == [None], "a handler that never waits ran in a task"
            slow = asyncio.ensure_future(pool.call(server.address, SLOW, b"s:3"))
            await svc.wait_slow(1)
            # answered while the first request waits in its task
            assert (await pool.call(server.address, ECHO, b"b")).header == b"echo:b"
            svc.gates[b"s:3"].set()
            reply = await slow
            assert reply.header == b"s:3" and bytes(reply.payload) == b"\xab" * 3
            assert tasks_seen[1] is None and tasks_seen[2] is not None   # b, then s:3 in its task
            for when in (b"now", b"later"):
                with pytest.raises(net.RemoteError, match="ValueError: boom " + when.decode()):
                    await pool.call(server.address, FAIL, when)
            await close_fails_a_held_call(svc, server, pool)
        assert leaks == [], "a handler saw another request's context"
    run(body)


def test_connect_refused(run):
    async def body():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        async with net.ConnectionPool() as pool:
            with pytest.raises(net.TransportError, match="connect to .* failed") as info:
                await pool.call(f"tcp://127.0.0.1:{port}", ECHO, b"")
            assert not isinstance(info.value, net.RequestTimeout)
    run(body)


def test_pool_reconnects_after_server_restart(run):
    async def body():
        svc = Service()
        server = await net.serve(svc)
        port, address = server.port, server.address
        async with net.ConnectionPool() as pool:
            assert (await pool.call(address, ECHO, b"a")).header == b"echo:a"
            await server.close()
            with pytest.raises(net.TransportError):
                await pool.call(address, ECHO, b"b")
            server = await net.serve(svc, port=port)
            try:
                assert server.address == address
                assert (await pool.call(address, ECHO, b"c")).header == b"echo:c"
            finally:
                await server.close()
    run(body)


def test_concurrent_first_calls_share_one_connection(run):
    async def body():
        async with await net.serve(Service()) as server, net.ConnectionPool() as pool:
            replies = await asyncio.gather(
                *(pool.call(server.address, ECHO, b"%d" % i) for i in range(20)))
            assert [r.header for r in replies] == [b"echo:%d" % i for i in range(20)]
            assert server.connection_count == 1
    run(body)


def test_read_pause_with_small_inflight_limit(run):
    async def body():
        async def handler(req):
            await asyncio.sleep(0.001)
            return net.Response(req.header)
        async with await net.serve(handler, max_inflight=2) as server, \
                net.ConnectionPool() as pool:
            replies = await asyncio.gather(
                *(pool.call(server.address, 1, b"%d" % i) for i in range(200)))
            assert [r.header for r in replies] == [b"%d" % i for i in range(200)]
    run(body)


def test_closed_pool_refuses_calls(run):
    async def body():
        async with await net.serve(Service()) as server:
            pool = net.ConnectionPool()
            await pool.call(server.address, ECHO, b"")
            await pool.close()
            with pytest.raises(net.TransportError, match="pool is closed"):
                await pool.call(server.address, ECHO, b"")
    run(body)


# ---------------------------------------------------------------- rdma probe

def test_rdma_available_reasons(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    assert rdma_available() == (False, "rdma: pyverbs not installed")

    pkg = types.ModuleType("pyverbs")
    device = types.ModuleType("pyverbs.device")
    pkg.device = device
    monkeypatch.setitem(sys.modules, "pyverbs", pkg)
    monkeypatch.setitem(sys.modules, "pyverbs.device", device)
    device.get_device_list = lambda: []
    assert rdma_available() == (False, "rdma: no RDMA device found")
    device.get_device_list = lambda: [types.SimpleNamespace(name=b"mlx5_0")]
    assert rdma_available() == (True, "rdma: 1 device(s): mlx5_0")


# ---------------------------------------------------------------- benchmark

@pytest.mark.slow
@pytest.mark.parametrize("block", [1 << 20, 4 << 20])
def test_transport_throughput_vs_raw_socket(block):
    """Prints figures only: benchmarks never fail for being slow."""
    from flyfs.net.bench import compare_with_raw

    for kind in ("uvloop", "asyncio"):
        for inflight in (1, 4):
            bps, raw, ratio = compare_with_raw(1 << 30, block, inflight, kind, repeat=3)
            print(f"\n{kind} block={block >> 20}MiB inflight={inflight}: "
                  f"{bps / 1e9:.2f} GB/s, raw {raw / 1e9:.2f} GB/s ({ratio:.0%})")
            assert bps > 0 and raw > 0
