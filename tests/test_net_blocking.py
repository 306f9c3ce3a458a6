"""Blocking data-plane calls (flyfs/net/blocking.py) against a real net.serve server
running on a loop in another thread, as a FUSE or API thread would call it."""
import asyncio
import os
import threading
import time

import pytest

from flyfs import net
from flyfs.net.blocking import BlockingConnection, BlockingPool

ECHO, BLOB, SLOW, FAIL, BIGHEAD, INLINE = 1, 2, 3, 4, 5, 6


def pattern(n, seed=0):
    return (bytes((i * 7 + seed) % 251 for i in range(251)) * (n // 251 + 1))[:n]


class LoopServer:
    """net.serve on a loop thread; `inline` answers INLINE requests without a task."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.inline_calls = 0
        self.handled = 0
        self.server = self.run(net.serve(self.handler, inline=self.inline))
        self.address = self.server.address

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def inline(self, req):
        if req.method != INLINE:
            return None
        self.inline_calls += 1
        if req.header == b"raise":
            raise ValueError("inline handler failed")
        if req.header == b"decline":
            return None
        return net.Response(b"inline:" + req.header, [bytes(req.payload)])

    async def handler(self, req):
        self.handled += 1
        if req.method in (ECHO, INLINE):
            return net.Response(b"echo:" + req.header, [bytes(req.payload)])
        if req.method == BLOB:
            return net.Response(b"blob", [pattern(int(req.header))])
        if req.method == SLOW:
            await asyncio.sleep(float(req.header))
            return net.Response(b"slow", [b"late bytes"])
        if req.method == BIGHEAD:
            return net.Response(b"h" * int(req.header), [pattern(1000)])
        raise RuntimeError("handler failed on purpose")

    def close(self):
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(params=["local", "tcp"])
def srv(request, monkeypatch):
    """The server, reached over its same-host Unix socket or over TCP."""
    monkeypatch.setenv("FLYFS_LOCAL_SOCKETS", "1" if request.param == "local" else "0")
    s = LoopServer()
    assert s.server.local == (request.param == "local")
    yield s
    s.close()


def test_round_trip_into_buffer(srv):
    conn = BlockingConnection(srv.address)
    buf = bytearray(100)
    header, n = conn.call(ECHO, b"hi", [b"abc", memoryview(b"defg")], into=buf)
    assert (header, n) == (b"echo:hi", 7)
    assert bytes(buf[:7]) == b"abcdefg" and buf[7:] == bytearray(93)
    header, n = conn.call(ECHO, b"", into=None)     # no payload either way
    assert (header, n) == (b"echo:", 0)
    conn.close()
    assert conn.closed


@pytest.mark.parametrize("size", [1, 4096, 64 << 10, (64 << 10) + 1, 3 << 20])
def test_payload_sizes_byte_exact(srv, size):
    """Small replies arrive with their header; large ones straight into the buffer."""
    conn = BlockingConnection(srv.address)
    buf = bytearray(size + 10)
    header, n = conn.call(BLOB, str(size).encode(), into=buf)
    assert header == b"blob" and n == size
    assert bytes(buf[:size]) == pattern(size)
    conn.close()


def test_scatter_into_list_of_buffers(srv):
    conn = BlockingConnection(srv.address)
    parts = [bytearray(3), bytearray(70_000), bytearray(10)]
    _, n = conn.call(BLOB, b"70013", into=parts)
    assert n == 70_013
    assert b"".join(bytes(p) for p in parts) == pattern(70_013)
    conn.close()


def test_reply_header_larger_than_scratch(srv):
    conn = BlockingConnection(srv.address)
    buf = bytearray(1000)
    header, n = conn.call(BIGHEAD, b"100000", into=buf)
    assert header == b"h" * 100_000 and n == 1000 and bytes(buf) == pattern(1000)
    assert conn.call(ECHO, b"again", into=buf)[0] == b"echo:again"   # the stream is still in step
    conn.close()


def test_handler_error_is_remote_error_and_closes(srv):
    conn = BlockingConnection(srv.address)
    with pytest.raises(net.RemoteError, match="failed on purpose"):
        conn.call(FAIL, b"", into=bytearray(10))
    assert conn.closed
    with pytest.raises(net.TransportError, match="closed"):
        conn.call(ECHO, b"", into=bytearray(10))


def test_reply_larger_than_buffer_is_protocol_error(srv):
    conn = BlockingConnection(srv.address)
    buf = bytearray(10)
    with pytest.raises(net.ProtocolError, match="exceeds the 10-byte"):
        conn.call(BLOB, b"11", into=buf)
    assert conn.closed and buf == bytearray(10)


def test_timeout_closes_connection_and_pool_reconnects(srv):
    pool = BlockingPool()
    buf = bytearray(64)
    t0 = time.monotonic()
    with pytest.raises(net.RequestTimeout, match="timed out"):
        pool.call(srv.address, SLOW, b"1.0", into=buf, timeout=0.2)
    assert time.monotonic() - t0 < 0.9
    assert buf == bytearray(64)         # the late reply never lands anywhere
    header, n = pool.call(srv.address, ECHO, b"x", [b"ok"], into=buf, timeout=5)
    assert (header, bytes(buf[:n])) == (b"echo:x", b"ok")
    time.sleep(1.0)                     # the late reply went to the closed socket
    assert pool.call(srv.address, ECHO, b"y", [b"ok2"], into=buf)[0] == b"echo:y"
    pool.close()


def test_connect_refused_is_transport_error():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(net.TransportError, match="connect to"):
        BlockingConnection(f"127.0.0.1:{port}", connect_timeout=2)


def test_server_closing_fails_the_call(srv):
    conn = BlockingConnection(srv.address)
    assert conn.call(ECHO, b"", into=None)[0] == b"echo:"
    srv.run(srv.server.close())
    with pytest.raises(net.TransportError):
        conn.call(ECHO, b"", [b"z"], into=bytearray(4), timeout=5)
    assert conn.closed


def test_pool_reuses_idle_connections_across_threads(srv):
    """Threads take turns on one connection (FUSE threads get a fresh Python thread
    state per request: thread-local sockets would be reopened every time)."""
    pool = BlockingPool()
    buf = bytearray(16)
    for i in range(5):
        t = threading.Thread(target=pool.call, args=(srv.address, ECHO, b"", [b"%d" % i], buf))
        t.start()
        t.join()
    assert srv.server.connection_count == 1
    # concurrent callers each get their own connection, all kept idle afterwards
    barrier = threading.Barrier(4)
    out = {}

    def worker(k):
        b = bytearray(8)
        barrier.wait()
        for _ in range(50):
            _, n = pool.call(srv.address, ECHO, b"", [b"w%d" % k], into=b)
            assert bytes(b[:n]) == b"w%d" % k
        out[k] = True

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4
    assert 1 <= srv.server.connection_count <= 4
    assert sum(len(v) for v in pool._idle.values()) == srv.server.connection_count
    pool.close()
    with pytest.raises(net.TransportError, match="closed"):
        pool.call(srv.address, ECHO, b"", into=buf)


def test_pool_idle_limit(srv):
    pool = BlockingPool(max_idle=1)
    barrier = threading.Barrier(3)

    def worker():
        barrier.wait()
        pool.call(srv.address, SLOW, b"0.2", into=bytearray(16))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pool._idle[srv.address]) == 1
    pool.close()


def test_pool_in_forked_child_never_uses_parent_sockets(srv):
    pool = BlockingPool()
    buf = bytearray(16)
    pool.call(srv.address, ECHO, b"", [b"p"], into=buf)
    (parent_conn,) = pool._idle[srv.address]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: a fresh connection of its own
        code = 1
        try:
            _, n = pool.call(srv.address, ECHO, b"", [b"child"], into=buf)
            fresh = parent_conn not in pool._idle.get(srv.address, [])
            code = 0 if bytes(buf[:n]) == b"child" and fresh else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"\0"
    os.waitpid(pid, 0)
    os.close(r)
    assert pool.call(srv.address, ECHO, b"", [b"again"], into=buf)[1] == 5
    assert pool._idle[srv.address] == [parent_conn]
    pool.close()


def test_inline_handler_answers_without_a_task(srv):
    conn = BlockingConnection(srv.address)
    buf = bytearray(16)
    header, n = conn.call(INLINE, b"a", [b"payload"], into=buf)
    assert (header, bytes(buf[:n])) == (b"inline:a", b"payload")
    assert srv.inline_calls == 1 and srv.handled == 0
    header, n = conn.call(INLINE, b"decline", [b"p2"], into=buf)   # None: the handler runs
    assert header == b"echo:decline" and srv.handled == 1
    with pytest.raises(net.RemoteError, match="inline handler failed"):
        conn.call(INLINE, b"raise", into=buf)
    conn = BlockingConnection(srv.address)
    assert conn.call(ECHO, b"e", into=buf)[0] == b"echo:e"          # other methods: the handler
    assert srv.inline_calls == 3 and srv.handled == 2
    conn.close()
