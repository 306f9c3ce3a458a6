"""flyfs data plane: chunk bytes travel here, never through gRPC.

Server::

    async def handler(req: net.Request) -> net.Response: ...
    server = await net.serve(handler, host="127.0.0.1", port=0)   # server.address
    await server.close()

Client::

    pool = net.ConnectionPool(connect_timeout=5.0)
    reply = await pool.call(address, method, header, payload=(), into=None, timeout=10.0)
    await pool.close()

Blocking, from the caller's thread (small reads without a hop to an event loop)::

    bp = net.BlockingPool()
    header, n = bp.call(address, method, header, into=buf, timeout=10.0)

Transports: tcp (here), shm and rdma later behind the same interface.
Errors: TransportError and its subclasses RequestTimeout, RequestAborted, ProtocolError,
RemoteError.
"""
from .blocking import BlockingPool
from .buffers import BufferPool
from .frame import (MAX_HEADER, MAX_PAYLOAD, ProtocolError, RemoteError, Reply, Request,
                    RequestAborted, RequestTimeout, Response, TransportError)
from .pool import ConnectionPool, parse_address
from .rdma import rdma_available
from .tcp import Server, serve

__all__ = [
    "serve", "Server", "ConnectionPool", "BlockingPool", "BufferPool", "Request", "Response", "Reply",
    "TransportError", "RequestTimeout", "RequestAborted", "ProtocolError", "RemoteError",
    "MAX_HEADER", "MAX_PAYLOAD", "parse_address", "rdma_available",
]
