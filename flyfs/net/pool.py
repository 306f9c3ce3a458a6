"""Client side of the data plane: one pipelined connection per peer address."""
from __future__ import annotations

import asyncio
import functools

from .frame import MAX_HEADER, MAX_PAYLOAD, Reply, RequestTimeout, TransportError
from .tcp import ClientConnection, connect

__all__ = ["ConnectionPool", "parse_address"]


def parse_address(address: str) -> tuple[str, str, int]:
    """'tcp://host:port' (or bare 'host:port') -> ('tcp', host, port); ValueError if bad."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme != "tcp":
        raise ValueError(f"unsupported data-plane transport {scheme!r} in address {address!r}")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad data-plane address {address!r} (expected tcp://host:port)")
    return scheme, host, int(port)


class ConnectionPool:
    """Connections to data-plane servers, opened lazily and kept per address.

    Many requests share one connection at once (pipelined by request id). A
    broken connection fails the requests on it with TransportError and is
    replaced by a fresh one on the next call; callers decide about retrying.
    """

    def __init__(self, connect_timeout: float = 5.0, *, max_header: int = MAX_HEADER,
                 max_payload: int = MAX_PAYLOAD):
        self.connect_timeout = connect_timeout
        self.max_header = max_header
        self.max_payload = max_payload
        self._conns: dict[str, ClientConnection] = {}
        self._connecting: dict[str, asyncio.Task] = {}
        self._closed = False

    async def call(self, address: str, method: int, header: bytes, payload=(),
                   into=None, timeout: float | None = 10.0, abort: asyncio.Future | None = None) -> Reply:
        """Send a request to `address` and return its Reply.

        payload: buffers sent as they are (scatter/gather); they must not be
        modified until this call returns or raises. into: None, a writable
        buffer, or a list of writable buffers filled in order straight from the
        socket; a response payload larger than `into` raises ProtocolError and
        drops the connection. timeout covers connecting, sending and the reply;
        RequestTimeout forgets the request, and a late reply never touches `into`.
        abort: a future whose completion ends the wait for the reply with
        RequestAborted (the request is forgotten as a timed-out one is).
        Raises TransportError (and subclasses ProtocolError, RemoteError,
        RequestTimeout, RequestAborted).
        """
        conn = self._conns.get(address)
        if conn is not None and conn.is_open:
            return await conn.call(method, header, payload, into, timeout, abort)
        loop = asyncio.get_running_loop()
        start = loop.time()
        conn = await self._connection(address, timeout)
        if timeout is not None:
            timeout = max(timeout - (loop.time() - start), 0.0)
        return await conn.call(method, header, payload, into, timeout, abort)

    def silence(self, address: str) -> float:
        """How long the connection to `address` has heard nothing while requests waited
        on it (ClientConnection.silence); 0 without one."""
        conn = self._conns.get(address)
        return conn.silence() if conn is not None and conn.is_open else 0.0

    async def connection(self, address: str, timeout: float | None = None) -> ClientConnection:
        """The open connection to `address`, connecting if there is none."""
        conn = self._conns.get(address)
        if conn is not None and conn.is_open:
            return conn
        return await self._connection(address, timeout)

    async def _connection(self, address: str, timeout: float | None) -> ClientConnection:
        if self._closed:
            raise TransportError("connection pool is closed")
        task = self._connecting.get(address)
        if task is None:
            parse_address(address)      # ValueError before any task exists
            task = asyncio.get_running_loop().create_task(self._open(address))
            self._connecting[address] = task
            task.add_done_callback(functools.partial(self._connect_done, address))
        try:
            # shield: one caller giving up must not abort the connect others wait on
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no connection to {address} within {timeout:g}s") from None
        except asyncio.CancelledError:
            current = asyncio.current_task()    # (None in an eager first step: flyfs.net.eager)
            if task.cancelled() and (current is None or not current.cancelling()):
                raise TransportError("connection pool is closed") from None
            raise

    async def _open(self, address: str) -> ClientConnection:
        _, host, port = parse_address(address)
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await connect(host, port, max_header=self.max_header,
                                     max_payload=self.max_payload, on_close=self._forget)
        except TimeoutError:
            raise TransportError(f"connect to {address} timed out after "
                                 f"{self.connect_timeout:g}s") from None
        except OSError as exc:
            raise TransportError(f"connect to {address} failed: {exc.strerror or exc}") from exc
        if self._closed:
            await conn.close()
            raise TransportError("connection pool is closed")
        conn.address = address
        self._conns[address] = conn
        return conn

    def _connect_done(self, address: str, task: asyncio.Task) -> None:
        if self._connecting.get(address) is task:
            del self._connecting[address]
        if not task.cancelled():
            task.exception()    # retrieved here; the waiters re-raise it

    def _forget(self, conn: ClientConnection) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]

    @property
    def addresses(self) -> list[str]:
        """Addresses with an open connection."""
        return [a for a, c in self._conns.items() if c.is_open]

    async def close(self) -> None:
        """Close every connection; calls in flight fail with TransportError."""
        self._closed = True
        tasks = list(self._connecting.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        conns = list(self._conns.values())
        self._conns.clear()
        if conns:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    async def __aenter__(self) -> "ConnectionPool":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
