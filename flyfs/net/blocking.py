"""Blocking data-plane calls from the caller's own thread (no event loop).

A synchronous reader (a FUSE thread, code calling ``FileSystem.pread``) that
hands each small read to the client's event loop pays for two thread switches
and the loop's own work per request: on these 2-core machines that is most of
the client's CPU for a 4 KiB read. `BlockingPool` keeps one plain blocking
socket per (thread, peer) and does the whole exchange in the calling thread:
one ``sendmsg`` of the frame, ``recv_into`` of the reply straight into the
caller's buffer. Same frames as flyfs/net/tcp.py, one request in flight per
connection. After ``fork`` a child never uses its parent's sockets.
"""
from __future__ import annotations

import os
import socket
import struct
import threading

from .frame import (FLAG_ERROR, FLAG_RESPONSE, HEADER_SIZE, MAX_HEADER, MAX_PAYLOAD, ProtocolError,
                    RemoteError, RequestTimeout, TransportError, pack_header, payload_views,
                    unpack_header, writable_views)
from .pool import parse_address
from .tcp import connect_local

__all__ = ["BlockingConnection", "BlockingPool"]


_SCRATCH = 64 << 10   # a reply's first bytes land here: frame header, proto header, small payloads


class BlockingConnection:
    """One blocking socket to a data-plane server; one request at a time.

    Timeouts are the kernel's (SO_RCVTIMEO/SO_SNDTIMEO), not Python's socket
    timeout, which polls before every send and receive. A small reply arrives in
    one receive (into a scratch buffer, its payload copied out); a larger
    payload's remainder is received straight into the caller's buffer."""

    def __init__(self, address: str, *, connect_timeout: float = 5.0,
                 max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD):
        _, host, port = parse_address(address)
        self.address = address
        self.max_header = max_header
        self.max_payload = max_payload
        sock = connect_local(host, port)      # a same-host server's Unix socket, when there is one
        if sock is None:
            try:
                sock = socket.create_connection((host, port), timeout=connect_timeout)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as e:
                raise TransportError(f"connect to {address} failed: {e}") from None
        self._sock: socket.socket | None = sock
        self._timeout: float | None = None
        self._next_id = 1
        self._scratch = memoryview(bytearray(_SCRATCH))

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            s.close()

    def call(self, method: int, header: bytes, payload=(), into=None,
             timeout: float | None = 10.0) -> tuple[bytes, int]:
        """Send one request and receive its reply; returns (reply header, payload length).

        The reply payload lands in ``into`` (a writable buffer or list of them),
        which must hold it. Any failure closes the connection (its stream
        position is unknown) and raises TransportError or a subclass."""
        if self._sock is None:
            raise TransportError(f"connection to {self.address} is closed")
        try:
            return self._call(method, header, payload, into, timeout)
        except BlockingIOError:    # SO_RCVTIMEO / SO_SNDTIMEO ran out
            self.close()
            raise RequestTimeout(f"request (method {method}) to {self.address} timed out after "
                                 f"{timeout:g}s") from None
        except OSError as e:
            self.close()
            raise TransportError(f"connection to {self.address} failed: {e}") from None
        except BaseException:
            self.close()
            raise

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout == self._timeout:
            return
        t = 0.0 if timeout is None else max(timeout, 0.001)   # 0: wait for ever
        tv = struct.pack("ll", int(t), int((t % 1) * 1e6))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._timeout = timeout

    def _call(self, method, header, payload, into, timeout):
        sock = self._sock
        self._set_timeout(timeout)
        bufs, plen = payload_views(payload)
        if len(header) > self.max_header or plen > self.max_payload:
            raise ProtocolError(f"request of {len(header)} + {plen} bytes exceeds the limits")
        rid = self._next_id
        self._next_id += 1
        out = [pack_header(0, method, rid, len(header), plen), header, *bufs]
        while out:
            sent = sock.sendmsg(out)
            while out and sent >= len(out[0]):
                sent -= len(out[0])
                out.pop(0)
            if out and sent:
                out[0] = memoryview(out[0])[sent:]
        scratch = self._scratch
        have = 0
        while have < HEADER_SIZE:
            have += self._recv(scratch[have:])
        fh = unpack_header(scratch, max_header=self.max_header, max_payload=self.max_payload)
        if not fh.flags & FLAG_RESPONSE or fh.flags & ~(FLAG_RESPONSE | FLAG_ERROR):
            raise ProtocolError(f"unexpected reply frame flags {fh.flags:#04x} from {self.address}")
        if fh.request_id != rid or fh.method != method:
            raise ProtocolError(f"reply for request {fh.request_id} (method {fh.method}) from "
                                f"{self.address}, expected {rid} (method {method})")
        hend = HEADER_SIZE + fh.header_len
        if hend > len(scratch):      # a header larger than the scratch buffer: rare, copied once
            big = memoryview(bytearray(hend))
            big[:have] = scratch[:have]
            scratch = big
        while have < hend:
            have += self._recv(scratch[have:hend])
        n = fh.payload_len
        if have > hend + n:
            raise ProtocolError(f"{self.address} sent more than one reply")
        reply_header = scratch[HEADER_SIZE:hend].tobytes()
        if fh.flags & FLAG_ERROR:
            if n:
                raise ProtocolError(f"error reply with a payload from {self.address}")
            raise RemoteError(reply_header.decode("utf-8", "replace"))
        if n:
            views, capacity = writable_views(into) if into is not None else ([], 0)
            if n > capacity:
                raise ProtocolError(f"reply payload of {n} bytes exceeds the {capacity}-byte "
                                    f"buffer for it")
            early = scratch[hend:have]     # payload bytes that came with the header
            left = n
            for v in views:
                if not left:
                    break
                v = v[:min(len(v), left)]
                k = min(len(early), len(v))
                if k:
                    v[:k] = early[:k]
                    early = early[k:]
                got = k
                while got < len(v):
                    got += self._recv(v[got:])
                left -= len(v)
        return reply_header, n

    def _recv(self, view: memoryview) -> int:
        k = self._sock.recv_into(view)
        if not k:
            raise TransportError(f"connection to {self.address} closed by the peer")
        return k


class BlockingPool:
    """Blocking connections per peer address, each used by one thread at a time.

    A call takes an idle connection to its address (or opens one) and puts it
    back after; idle ones are kept, up to `max_idle` per address. Not
    thread-local on purpose: FUSE's worker threads get a fresh Python thread
    state on every request (fuse-python), so thread-local sockets would be
    reopened each time. Fork-safe: a child never uses its parent's sockets."""

    def __init__(self, connect_timeout: float = 5.0, *, max_idle: int = 16,
                 max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD):
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.max_header = max_header
        self.max_payload = max_payload
        self._idle: dict[str, list[BlockingConnection]] = {}
        self._busy: set[BlockingConnection] = set()
        self._mu = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    def _take(self, address: str) -> BlockingConnection | None:
        with self._mu:
            if self._pid != os.getpid():
                # A forked child: the parent's sockets carry the parent's streams; leave them be.
                self._idle, self._busy, self._pid = {}, set(), os.getpid()
                self._mu = threading.Lock()
            idle = self._idle.get(address)
            conn = idle.pop() if idle else None
            if conn is not None:
                self._busy.add(conn)
            return conn

    def call(self, address: str, method: int, header: bytes, payload=(), into=None,
             timeout: float | None = 10.0) -> tuple[bytes, int]:
        """BlockingConnection.call on an idle connection to `address` (opened on demand)."""
        if self._closed:
            raise TransportError("blocking connection pool is closed")
        conn = self._take(address)
        if conn is None:
            conn = BlockingConnection(address, connect_timeout=self.connect_timeout,
                                      max_header=self.max_header, max_payload=self.max_payload)
            with self._mu:
                self._busy.add(conn)
        try:
            return conn.call(method, header, payload, into, timeout)
        finally:
            with self._mu:
                self._busy.discard(conn)
                idle = self._idle.setdefault(address, [])
                keep = not conn.closed and not self._closed and len(idle) < self.max_idle
                if keep:
                    idle.append(conn)
            if not keep:
                conn.close()

    def close(self) -> None:
        """Close every connection (a thread inside a call sees its socket fail)."""
        self._closed = True
        if self._pid != os.getpid():
            return
        with self._mu:
            idle = [c for cs in self._idle.values() for c in cs]
            busy, self._idle = list(self._busy), {}
        for c in idle:
            c.close()
        for c in busy:   # their threads close them when their calls end
            sock = c._sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
