"""TCP transport: an asyncio server and client connections speaking flyfs frames.

Both ends are asyncio BufferedProtocols driven by `frame.FrameReader`, so a
payload is received with recv_into straight into its destination (the
caller's `into` buffer on a client, one fresh buffer per request on a server)
and sent as a list of buffers (writelines, no join) under uvloop and
Python >= 3.12. On the 3.11 default loop, whose writelines joins, each large
buffer is written on its own instead.

Requests on one connection are pipelined: each carries a request id, a server
runs every request as its own task and replies in completion order.

Same-host peers: a server also listens on an abstract Unix socket named after
its TCP address (`local_name`), and clients try that first. Same frames; the
kernel's TCP/IP loopback path is skipped (a 4 KiB request/reply round trip:
~36 us instead of ~66 us here, ~10 us less CPU per message on each side).
Abstract names are per network namespace, so only a process that shares the
server's network stack, and thus its TCP address, finds it.
FLYFS_LOCAL_SOCKETS=0 turns this off (TCP only).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import struct
import sys
from typing import Awaitable, Callable

from .buffers import BufferPool
from . import eager, shm
from .frame import (FLAG_ERROR, FLAG_RESPONSE, FLAG_SHM, FLAG_SHM_REPLY, HEADER, MAGIC, MAX_HEADER, MAX_PAYLOAD,
                    VERSION, FrameHeader, FrameReader, ProtocolError, RemoteError, Reply,
                    Request, RequestAborted, RequestTimeout, Response, TransportError, payload_views,
                    writable_views)

__all__ = ["Server", "serve", "ClientConnection", "connect", "format_address", "local_sockets",
           "local_name", "connect_local"]

log = logging.getLogger("flyfs.net")

Handler = Callable[[Request], Awaitable[Response]]
InlineHandler = Callable[[Request], "Response | None"]

_EMPTY = memoryview(b"")
_JOIN_LIMIT = 64 << 10          # below this a frame is joined and written in one call
_MAX_ERROR_TEXT = 4096
_DEFAULT_MAX_INFLIGHT = 1024
_WRITE_HIGH_WATER = 8 << 20
_HELLO_TIMEOUT = 10.0


def format_address(host: str, port: int) -> str:
    """'tcp://host:port' (IPv6 hosts in brackets)."""
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def local_sockets() -> bool:
    """Whether servers listen, and clients look, for same-host Unix sockets."""
    return (sys.platform.startswith("linux")
            and os.environ.get("FLYFS_LOCAL_SOCKETS", "1").lower() not in ("0", "no", "false", "off"))


def local_name(host: str, port: int) -> str:
    """The abstract Unix socket a server at TCP host:port also listens on."""
    return f"\0flyfs-net:{host}:{port}"


def connect_local(host: str, port: int) -> socket.socket | None:
    """A blocking Unix socket connected to the same-host server at host:port, or None."""
    if not local_sockets():
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(local_name(host, port))
    except OSError:
        s.close()
        return None
    return s


def _peer_name(transport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return "local"
    return str(peer)


class _DeadReader:
    """Stands in for the FrameReader once a connection is being dropped."""

    _scratch = memoryview(bytearray(64 << 10))

    def get_buffer(self, sizehint=-1):
        return self._scratch

    def buffer_updated(self, nbytes):
        pass

    def discard_payload(self, request_id):
        return False


class _Connection(asyncio.BufferedProtocol):
    """State shared by both ends: framing, zero-copy writes, flow control, closing."""

    def __init__(self, max_header: int, max_payload: int):
        self._loop = asyncio.get_running_loop()
        self._reader = FrameReader(self._on_header, self._on_frame,
                                   max_header=max_header, max_payload=max_payload)
        self._max_header = max_header
        self._max_payload = max_payload
        self._transport = None
        self._peer = ""
        self._error: TransportError | None = None   # set once the connection is going away
        self._closed = self._loop.create_future()   # resolved by connection_lost
        self._paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._written = 0           # bytes handed to the transport since connect
        self._writelines = False

    # -- asyncio.BufferedProtocol

    def connection_made(self, transport):
        self._transport = transport
        self._peer = _peer_name(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        # uvloop and 3.12+ selector transports send a list of buffers with
        # writev/sendmsg without joining them; the 3.11 default joins.
        self._writelines = (type(transport).__module__.startswith("uvloop")
                            or sys.version_info >= (3, 12))
        # Payloads are megabytes: a 64 KiB high-water mark would pause on every reply.
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)

    def get_buffer(self, sizehint):
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        try:
            self._reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            log.warning("net: dropping connection %s: %s", self._describe(), exc)
            self._drop(exc)
        except Exception as exc:  # a bug in a callback: never leave the stream half-parsed
            log.exception("net: dropping connection %s after an internal error", self._describe())
            self._drop(TransportError(f"internal error: {exc!r}"))

    def eof_received(self):
        return False

    def pause_writing(self):
        self._paused = True

    def resume_writing(self):
        self._paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def connection_lost(self, exc):
        if self._error is None:
            reason = f": {exc}" if exc else ""
            self._error = TransportError(f"connection {self._describe()} lost{reason}")
        self._reader = _DeadReader()
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(_copy_error(self._error))
        try:
            self._lost()
        finally:
            if not self._closed.done():
                self._closed.set_result(None)

    # -- for subclasses

    def _describe(self) -> str:
        return self._peer

    def _on_header(self, fh: FrameHeader, header: bytes):
        raise NotImplementedError

    def _on_frame(self, fh: FrameHeader, header: bytes) -> None:
        raise NotImplementedError

    def _lost(self) -> None:
        pass

    # -- helpers

    @property
    def is_open(self) -> bool:
        return self._error is None and self._transport is not None

    def _drop(self, exc: TransportError) -> None:
        """Abort the connection; pending work fails with a copy of exc."""
        if self._error is None:
            self._error = exc
        self._reader = _DeadReader()
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await self._closed

    def _send(self, flags: int, method: int, rid: int, header: bytes,
              payload: list, payload_len: int) -> None:
        prefix = HEADER.pack(MAGIC, VERSION, flags, method, rid, len(header), payload_len)
        t = self._transport
        if self._writelines:
            if header:
                t.writelines([prefix, header, *payload])
            else:
                t.writelines([prefix, *payload])
        elif payload_len <= _JOIN_LIMIT:
            t.write(b"".join([prefix, header, *payload]))
        else:
            # Separate writes: each goes straight to send() while the socket
            # has room, where writelines would first copy everything.
            t.write(prefix + header)
            for buf in payload:
                t.write(buf)
        self._written += len(prefix) + len(header) + payload_len

    def _flushed(self, upto: int) -> bool:
        """True once the first `upto` bytes written are out of the transport's buffer."""
        t = self._transport
        if t is None or self._error is not None:
            return True         # aborted or lost: nothing more is sent from our buffers
        return self._written - t.get_write_buffer_size() >= upto

    async def _drain(self) -> None:
        if self._paused and self._error is None:
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w


def _copy_error(exc: TransportError) -> TransportError:
    return type(exc)(*exc.args)


def _error_text(exc: BaseException) -> bytes:
    text = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
    return text[:_MAX_ERROR_TEXT]


# ---------------------------------------------------------------- server

class _ServerConnection(_Connection):
    def __init__(self, server: "Server"):
        super().__init__(server.max_header, server.max_payload)
        self._server = server
        self._tasks: set[asyncio.Task] = set()
        self._payload: bytearray | None = None
        self._reading = True

    def connection_made(self, transport):
        super().connection_made(transport)
        if self._server._closing:
            transport.abort()
            return
        self._server._conns.add(self)

    def _describe(self) -> str:
        return f"from {self._peer}"

    def _on_header(self, fh: FrameHeader, header: bytes):
        if fh.flags & ~(FLAG_SHM | FLAG_SHM_REPLY) or fh.flags == FLAG_SHM | FLAG_SHM_REPLY:
            raise ProtocolError(f"request frame with flags {fh.flags:#04x}")
        if fh.flags:
            if fh.payload_len > shm.MAX_REF:
                raise ProtocolError(f"shared-memory reference of {fh.payload_len} bytes")
            self._payload = bytearray(fh.payload_len)
            return [memoryview(self._payload)]
        if fh.payload_len:
            buffers = self._server.buffers
            self._payload = bytearray(fh.payload_len) if buffers is None else buffers.get(fh.payload_len)
            return [memoryview(self._payload)]
        return None

    def _on_frame(self, fh: FrameHeader, header: bytes) -> None:
        if fh.payload_len:
            payload = memoryview(self._payload)
            self._payload = None
        else:
            payload = _EMPTY
        reply_buffer = None
        if fh.method == shm.SHM_HELLO or fh.flags:
            try:
                if fh.method == shm.SHM_HELLO:
                    shm.map_arena(header.decode("ascii", "replace"))
                    self._send(FLAG_RESPONSE, fh.method, fh.request_id, b"", [], 0)
                    return
                if fh.flags & FLAG_SHM_REPLY:
                    reply_buffer, payload = shm.resolve(payload), _EMPTY
                else:
                    payload = shm.resolve(payload)
                if len(payload) > self._server.max_payload:
                    raise shm.ShmError(f"shared-memory payload of {len(payload)} bytes exceeds the "
                                       f"{self._server.max_payload}-byte limit")
            except shm.ShmError as exc:
                self._send(FLAG_RESPONSE | FLAG_ERROR, fh.method, fh.request_id, _error_text(exc), [], 0)
                return
        req = Request(fh.method, header, payload, self._peer, fh.request_id, reply_buffer)
        inline = self._server.inline
        if inline is not None and not self._paused:
            try:
                resp = inline(req)
            except Exception as exc:
                self._fail(req, exc)
                return
            if resp is not None:
                self._respond(req, resp)
                return
        if self._server.eager:
            done, task = eager.start(self._loop, self._run(req))
            if done:
                return
        else:
            task = self._loop.create_task(self._run(req))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if self._reading and len(self._tasks) >= self._server.max_inflight:
            self._reading = False
            self._transport.pause_reading()

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if (not self._reading and self.is_open
                and len(self._tasks) <= self._server.max_inflight // 2):
            self._reading = True
            self._transport.resume_reading()

    async def _run(self, req: Request) -> None:
        try:
            resp = await self._server.handler(req)
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()   # (None while an eager handler runs its first steps)
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise   # this task is being cancelled: connection lost or server closing
            self._fail(req, exc)
            return
        self._respond(req, resp)
        if self._paused and self.is_open:
            await self._drain()

    def _fail(self, req: Request, exc: BaseException) -> None:
        log.warning("net: handler for method %d from %s raised %r", req.method, req.peer,
                    exc, exc_info=log.isEnabledFor(logging.DEBUG))
        if self.is_open:
            self._send(FLAG_RESPONSE | FLAG_ERROR, req.method, req.request_id, _error_text(exc), [], 0)

    def _respond(self, req: Request, resp) -> None:
        server = self._server
        try:
            if not isinstance(resp, Response):
                raise TypeError(f"handler returned {type(resp).__name__}, expected net.Response")
            header = resp.header if type(resp.header) is bytes else bytes(resp.header)
            payload, total = payload_views(resp.payload)
            if len(header) > server.max_header or total > server.max_payload:
                raise ProtocolError(
                    f"response too large: header {len(header)} bytes, payload {total} bytes "
                    f"(limits {server.max_header}, {server.max_payload})")
        except Exception as exc:
            self._fail(req, exc)
            return
        if self.is_open:
            rb = req.reply_buffer
            if rb is not None and total <= len(rb):
                _place(rb, payload)
                self._send(FLAG_RESPONSE | FLAG_SHM, req.method, req.request_id, header,
                           [_U64.pack(total)], _U64.size)
                return
            self._send(FLAG_RESPONSE, req.method, req.request_id, header, payload, total)

    def _lost(self) -> None:
        self._server._conns.discard(self)
        for task in self._tasks:
            task.cancel()


class Server:
    """A listening data-plane server; `address` is 'tcp://host:port'."""

    def __init__(self, handler: Handler, *, max_header: int = MAX_HEADER,
                 max_payload: int = MAX_PAYLOAD, max_inflight: int = _DEFAULT_MAX_INFLIGHT,
                 buffers: BufferPool | None = None, inline: InlineHandler | None = None,
                 eager: bool = False):
        self.handler = handler
        self.inline = inline    # tried first, on the loop: a Response, or None to run `handler`
        self.eager = eager      # run `handler` up to its first suspension before making a task
        self.buffers = buffers  # request payloads come from here (default: a fresh bytearray each)
        self.max_header = max_header
        self.max_payload = max_payload
        self.max_inflight = max_inflight
        self.host = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._local: asyncio.AbstractServer | None = None   # the same-host Unix socket
        self._conns: set[_ServerConnection] = set()
        self._closing = False

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    async def close(self) -> None:
        """Stop listening, drop every connection and cancel running handlers."""
        if self._closing:
            return
        self._closing = True
        for srv in (self._server, self._local):
            if srv is not None:
                srv.close()
        conns = list(self._conns)
        tasks = [t for c in conns for t in c._tasks]
        for c in conns:
            c._drop(TransportError("server closing"))
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if conns:
            await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
        for srv in (self._server, self._local):
            if srv is not None:
                await srv.wait_closed()

    @property
    def local(self) -> bool:
        """Whether same-host clients can reach this server over its Unix socket."""
        return self._local is not None

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self):
        return f"<net.Server {self.address} connections={len(self._conns)}>"


async def serve(handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD,
                max_inflight: int = _DEFAULT_MAX_INFLIGHT, backlog: int = 1024,
                buffers: BufferPool | None = None, inline: InlineHandler | None = None,
                eager: bool = False) -> Server:
    """Listen on host:port (0 picks a free port) and serve `handler` for every request.

    Requests on a connection run concurrently (at most max_inflight at once,
    then reading pauses); a handler exception becomes a RemoteError at the
    caller. A connection sending a bad or oversized frame is dropped alone.
    With `buffers`, request payloads are taken from that pool (a handler's
    payload memoryview stays valid for as long as anything references it).
    `inline(req)`, when given, runs first for every request, synchronously on the
    loop, and answers with a Response or None (then `handler` runs as a task):
    for requests cheap enough that a task of their own would cost more than
    their work (small reads from memory). It must never block.
    With `eager`, each request's handler runs at once, synchronously on the loop,
    up to its first suspension: one that never waits (a metadata read from a
    local KV) answers with no task and no loop iteration of its own (~25 us of
    CPU less per request here); one that waits goes on in a task from there.
    It runs in a context of its own, as a task's would, but with no current task.
    """
    loop = asyncio.get_running_loop()
    server = Server(handler, max_header=max_header, max_payload=max_payload,
                    max_inflight=max_inflight, buffers=buffers, inline=inline, eager=eager)
    server._server = await loop.create_server(
        lambda: _ServerConnection(server), host, port, backlog=backlog, reuse_address=True)
    sockname = server._server.sockets[0].getsockname()
    server.host, server.port = sockname[0], sockname[1]
    if local_sockets():
        usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            usock.bind(local_name(server.host, server.port))
            usock.listen(backlog)
            usock.setblocking(False)
            server._local = await loop.create_unix_server(lambda: _ServerConnection(server), sock=usock)
        except OSError as e:   # only an optimization: TCP still serves everyone
            usock.close()
            log.info("net: no same-host socket for %s: %s", server.address, e)
    return server


# ---------------------------------------------------------------- client

class _Pending:
    __slots__ = ("fut", "method", "views", "capacity", "into", "buf", "reply_slice")

    def __init__(self, fut, method, views, capacity, into, reply_slice=None):
        self.fut = fut
        self.method = method
        self.views = views          # list of byte views, or None to allocate on arrival
        self.capacity = capacity
        self.into = into
        self.buf = None
        self.reply_slice = reply_slice  # memoryview of the arena slice offered for the reply


class ClientConnection(_Connection):
    """One client connection; many requests in flight, matched by request id."""

    def __init__(self, address: str, max_header: int = MAX_HEADER,
                 max_payload: int = MAX_PAYLOAD, on_close: Callable | None = None):
        super().__init__(max_header, max_payload)
        self.address = address
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._on_close = on_close
        # arena name -> whether the peer maps it (a Future while asking); None: no shm here
        self._shm_peer: dict[str, object] | None = {} if shm.enabled() else None
        self._heard = self._busy_since = self._loop.time()

    def buffer_updated(self, nbytes):
        self._heard = self._loop.time()
        super().buffer_updated(nbytes)

    def silence(self) -> float:
        """Seconds the peer has sent nothing while requests waited for it (0 when none
        wait): a peer that hangs stays silent, one that is only busy keeps answering."""
        if not self._pending:
            return 0.0
        return self._loop.time() - max(self._heard, self._busy_since)

    async def _peer_maps(self, name: str, timeout: float | None) -> bool:
        """Whether the peer can map arena `name` (asked once per connection; a peer
        too slow to answer within `timeout` is asked again next time)."""
        st = self._shm_peer.get(name)
        if st is True or st is False:
            return st
        if st is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(st), timeout)
            except (asyncio.TimeoutError, TransportError):
                return False
        fut = self._loop.create_future()
        self._shm_peer[name] = fut
        ok = False
        try:
            await self.call(shm.SHM_HELLO, name.encode(),
                            timeout=_HELLO_TIMEOUT if timeout is None else min(timeout, _HELLO_TIMEOUT))
            ok = True
        except RemoteError as exc:
            log.info("net: %s cannot map shared memory (%s): payloads go through the socket",
                     self._describe(), exc)
            self._shm_peer[name] = False
        except TransportError:
            del self._shm_peer[name]    # timed out or lost: no answer either way
        finally:
            if ok:
                self._shm_peer[name] = True
            elif self._shm_peer.get(name) is fut:
                del self._shm_peer[name]
            fut.set_result(ok)
        return ok

    async def _shm_payload(self, bufs: list, plen: int, timeout: float | None):
        """(reference bytes, slice to release or None) to send `bufs` by shared memory,
        or None to send them through the socket."""
        if len(bufs) == 1:
            loc = shm.locate(bufs[0])
            if loc is not None:     # already in an arena (a daemon forwarding a client's write)
                name, off = loc
                ok = await self._peer_maps(name, timeout)
                return (shm.pack_ref(name, off, plen), None) if ok else None
        arena = shm.local_arena()
        if arena is None or not await self._peer_maps(arena.name, timeout):
            return None
        got = arena.alloc(plen)
        if got is None:
            return None             # arena full: this one goes through the socket
        off, view = got
        pos = 0
        for b in bufs:
            n = len(b)
            view[pos:pos + n] = b
            pos += n
        return shm.pack_ref(arena.name, off, plen), (arena, off, plen)

    def _describe(self) -> str:
        return f"to {self.address}"

    @property
    def closed(self) -> bool:
        return not self.is_open

    @property
    def inflight(self) -> int:
        return len(self._pending)

    async def call(self, method: int, header: bytes, payload=(), into=None,
                   timeout: float | None = 10.0, abort: asyncio.Future | None = None) -> Reply:
        """Send one request and wait for its reply (see ConnectionPool.call)."""
        if self._error is not None or self._transport is None:
            raise _copy_error(self._error) if self._error else TransportError(
                f"connection {self._describe()} is not open")
        if type(header) is not bytes:
            header = bytes(header)
        if len(header) > self._max_header:
            raise ProtocolError(f"request header of {len(header)} bytes exceeds the "
                                f"{self._max_header}-byte limit")
        if not 0 <= method <= 0xFFFF:
            raise ValueError(f"method {method} out of range 0..65535")
        bufs, plen = payload_views(payload)
        if plen > self._max_payload:
            raise ProtocolError(f"request payload of {plen} bytes exceeds the "
                                f"{self._max_payload}-byte limit")
        flags, slice_ = 0, None
        if plen >= shm.SHM_MIN and self._shm_peer is not None:
            t0 = self._loop.time()
            by_ref = await self._shm_payload(bufs, plen, timeout)
            if timeout is not None:
                timeout = max(timeout - (self._loop.time() - t0), 0.0)
            if by_ref is not None:
                ref, slice_ = by_ref
                flags, bufs, plen = FLAG_SHM, [ref], len(ref)
        if into is None:
            views, capacity = None, 0
        else:
            views, capacity = writable_views(into)
        reply_view = None
        if (not plen and capacity >= shm.SHM_MIN and self._shm_peer is not None
                and (arena := shm.local_arena()) is not None):
            t0 = self._loop.time()
            ok = await self._peer_maps(arena.name, timeout)
            if timeout is not None:
                timeout = max(timeout - (self._loop.time() - t0), 0.0)
            got = arena.alloc(capacity) if ok else None
            if got is not None:
                off, reply_view = got
                slice_ = (arena, off, capacity)
                flags, bufs = FLAG_SHM_REPLY, [shm.pack_ref(arena.name, off, capacity)]
                plen = len(bufs[0])
        if self._error is not None or self._transport is None:
            _release(slice_, ok=True)   # lost while asking the peer: nothing was sent
            raise _copy_error(self._error) if self._error else TransportError(
                f"connection {self._describe()} is not open")
        rid = self._next_id
        self._next_id = rid + 1
        fut = self._loop.create_future()
        if not self._pending:
            self._busy_since = self._loop.time()
        self._pending[rid] = _Pending(fut, method, views, capacity, into, reply_view)
        try:
            self._send(flags, method, rid, header, bufs, plen)
        except BaseException:
            del self._pending[rid]
            _release(slice_, ok=False)
            raise
        end = self._written
        timer = (self._loop.call_later(timeout, self._expire, rid, timeout)
                 if timeout is not None else None)
        aborted = None
        if abort is not None:
            aborted = functools.partial(self._abort, rid)
            abort.add_done_callback(aborted)
        try:
            reply = await fut
            _release(slice_, ok=True)
            return reply
        except BaseException:
            _release(slice_, ok=False)
            if self._pending.pop(rid, None) is not None:       # cancelled by our caller
                self._reader.discard_payload(rid)
            if plen and not self._flushed(end):
                # The transport still references the caller's payload buffers,
                # which the caller may now reuse: never let them go out later.
                self._drop(TransportError(
                    f"connection {self._describe()} dropped: request {rid} abandoned "
                    f"while its payload was still queued"))
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if aborted is not None:
                abort.remove_done_callback(aborted)

    def _abort(self, rid: int, abort: asyncio.Future) -> None:
        p = self._pending.get(rid)
        if p is not None and not p.fut.done():
            why = abort.result() if not abort.cancelled() and abort.exception() is None else "aborted"
            p.fut.set_exception(RequestAborted(
                f"request {rid} (method {p.method}) {self._describe()} abandoned: {why}"))

    def _expire(self, rid: int, timeout: float) -> None:
        p = self._pending.pop(rid, None)
        if p is None:
            return
        self._reader.discard_payload(rid)
        if not p.fut.done():
            p.fut.set_exception(RequestTimeout(
                f"request {rid} (method {p.method}) {self._describe()} timed out after {timeout:g}s"))

    def _on_header(self, fh: FrameHeader, header: bytes):
        if not fh.flags & FLAG_RESPONSE or fh.flags & FLAG_SHM_REPLY:
            raise ProtocolError(f"server sent a request frame (flags {fh.flags:#04x})")
        n = fh.payload_len
        p = self._pending.get(fh.request_id)
        if fh.flags & FLAG_SHM:
            if n != _U64.size or (p is not None and p.reply_slice is None):
                raise ProtocolError("unexpected shared-memory reply")
            if p is None:
                return None
            p.buf = bytearray(n)
            return [memoryview(p.buf)]
        if p is None or not n or fh.flags & FLAG_ERROR:
            return None         # a late reply to a forgotten request: discard
        if p.views is None:
            p.buf = bytearray(n)
            return [memoryview(p.buf)]
        if n > p.capacity:
            raise ProtocolError(f"response payload of {n} bytes exceeds the {p.capacity}-byte "
                                f"into buffer of request {fh.request_id}")
        return p.views

    def _on_frame(self, fh: FrameHeader, header: bytes) -> None:
        p = self._pending.pop(fh.request_id, None)
        if p is None or p.fut.done():
            return
        if fh.flags & FLAG_ERROR:
            p.fut.set_exception(RemoteError(header.decode("utf-8", "replace")))
            return
        n = fh.payload_len
        if fh.flags & FLAG_SHM:     # the reply payload is in our arena slice
            (n,) = _U64.unpack(p.buf)
            if n > p.capacity:
                p.fut.set_exception(ProtocolError(f"shared-memory reply of {n} bytes exceeds the "
                                                  f"{p.capacity}-byte into buffer"))
                return
            src, pos = p.reply_slice, 0
            for v in p.views:
                k = min(len(v), n - pos)
                if k <= 0:
                    break
                v[:k] = src[pos:pos + k]
                pos += k
        if p.views is None:
            payload = memoryview(p.buf) if n else _EMPTY
        elif isinstance(p.into, (list, tuple)):
            payload = _filled(p.into, n)
        else:
            payload = p.views[0][:n] if n else _EMPTY
        p.fut.set_result(Reply(header, payload, n))

    def _lost(self) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.fut.done():
                p.fut.set_exception(_copy_error(self._error))
        if self._on_close is not None:
            self._on_close(self)

    async def close(self) -> None:
        """Drop the connection; requests in flight fail with TransportError."""
        self._drop(TransportError(f"connection {self._describe()} closed"))
        if self._transport is not None:
            await self._closed


_U64 = struct.Struct("<Q")


def _place(dst: memoryview, bufs: list) -> None:
    """Copy bufs into dst back to back, skipping a buffer that already sits where it goes."""
    base = shm.address(dst)
    pos = 0
    for b in bufs:
        n = len(b)
        if base is None or shm.address(b) != base + pos:
            dst[pos:pos + n] = b
        pos += n


def _release(slice_, ok: bool) -> None:
    """Give an arena slice back: now after a successful reply; after an error or a
    timeout only once nobody can still be reading it (a daemon retrying a forward)."""
    if slice_ is None:
        return
    arena, off, n = slice_
    if ok:
        arena.free(off, n)
    else:
        asyncio.get_running_loop().call_later(shm.QUARANTINE, arena.free, off, n)


def _filled(into, n: int) -> list[memoryview]:
    """The filled part of each buffer of a scatter `into` list, one view per buffer."""
    out = []
    for buf in into:
        v = memoryview(buf).cast("B")
        k = min(len(v), n)
        out.append(v[:k])
        n -= k
    return out


async def connect(host: str, port: int, *, max_header: int = MAX_HEADER,
                  max_payload: int = MAX_PAYLOAD, on_close: Callable | None = None
                  ) -> ClientConnection:
    """Open one client connection (no timeout here: the caller bounds it)."""
    loop = asyncio.get_running_loop()
    address = format_address(host, port)
    factory = lambda: ClientConnection(address, max_header, max_payload, on_close)  # noqa: E731
    if local_sockets():
        usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        usock.setblocking(False)
        try:
            await loop.sock_connect(usock, local_name(host, port))
        except OSError:
            usock.close()       # no such server on this host: TCP
        else:
            _, conn = await loop.create_unix_connection(factory, sock=usock)
            return conn
    _, conn = await loop.create_connection(factory, host, port)
    return conn
