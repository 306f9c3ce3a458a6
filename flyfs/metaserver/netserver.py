"""The metadata RPCs over flyfs/net framing: meta.proto's messages, a lighter transport.

Python gRPC costs ~0.85 ms of CPU per call; the flyfs/net TCP framing a small
fraction of that. The schema stays meta.proto's, nothing is declared twice:

- method id = the method's index in meta.proto's ``Meta`` service (taken from
  its descriptor; methods are only ever appended there),
- request frame header = the serialized request message, reply frame header =
  the serialized reply message, no payload either way,
- errors are replies (a Status with an errno), as over gRPC, answered by the
  same MetaServicer the gRPC server uses.

Bad input fails that one request and the server keeps serving: an unknown
method id answers an error frame (RemoteError "unknown metadata method id
N ..." at the caller); a header that is not the method's request message
answers the method's reply with Status EBADMSG. A frame carrying a payload is
a protocol error and drops that connection alone.

Measured (`flyfs bench meta`, BENCHMARKS.md "Metadata"): ~3-4x less server
CPU per call than gRPC. MetaClient can also coalesce concurrent calls into
Batch calls over this transport (MetaClient.coalesce; off by default, as
slower since requests are handled eagerly).

    server = await start_net_server(svc, "127.0.0.1", 0)    # server.address: tcp://127.0.0.1:PORT
    async with MetaClient(server.address) as c: ...
    await server.close()
"""
from __future__ import annotations

import errno
from typing import Awaitable, Callable, NamedTuple

from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from .. import net
from ..proto import common_pb2, meta_pb2

__all__ = ["MetaMethod", "METHODS", "METHOD_IDS", "BATCHABLE", "MAX_MESSAGE", "UnknownMethod", "meta_methods",
           "batchable", "make_handler", "start_net_server"]

MAX_MESSAGE = 16 << 20      # as the gRPC server's message limit


class MetaMethod(NamedTuple):
    id: int
    name: str           # as in meta.proto, e.g. "Lookup" (MetaServicer's method name)
    request: type       # message classes
    reply: type


def meta_methods(service=meta_pb2.DESCRIPTOR.services_by_name["Meta"]) -> tuple[MetaMethod, ...]:
    """The service's methods, id = index in the service (stable while methods are only appended)."""
    return tuple(MetaMethod(m.index, m.name, message_factory.GetMessageClass(m.input_type),
                            message_factory.GetMessageClass(m.output_type)) for m in service.methods)


def batchable(methods: tuple[MetaMethod, ...], op=meta_pb2.MetaOp.DESCRIPTOR) -> dict[str, str]:
    """Methods a Batch call can carry: method name -> MetaOp field (the field named as the
    method, lower-cased, holding its request type; e.g. "GetAttr" -> "getattr")."""
    by_name = {m.name.lower(): m for m in methods}
    out = {}
    for f in op.oneofs_by_name["op"].fields:
        m = by_name.get(f.name)
        if m is None or m.request.DESCRIPTOR is not f.message_type:
            raise ValueError(f"MetaOp.{f.name} ({f.message_type.name}) matches no Meta method of that name and request")
        out[m.name] = f.name
    return out


METHODS = meta_methods()
METHOD_IDS = {m.name: m.id for m in METHODS}
BATCHABLE = batchable(METHODS)


class UnknownMethod(ValueError):
    """A frame named a method id that meta.proto's Meta service does not have."""


def make_handler(servicer) -> Callable[[net.Request], Awaitable[net.Response]]:
    """A flyfs/net handler dispatching each method id to `servicer` (a MetaServicer:
    ``await servicer.Name(request)`` returns the reply message)."""
    table = [(m, m.request.FromString, getattr(servicer, m.name)) for m in METHODS]
    count = len(table)

    async def handle(req: net.Request) -> net.Response:
        if req.method >= count:
            raise UnknownMethod(f"unknown metadata method id {req.method} (this server knows 0..{count - 1}; "
                                f"is the client newer than the server?)")
        m, parse, call = table[req.method]
        try:
            request = parse(req.header)
        except DecodeError as e:
            reply = m.reply(status=common_pb2.Status(
                code=errno.EBADMSG, message=f"malformed {m.request.__name__} for {m.name}: {e}"))
        else:
            reply = await call(request)
        return net.Response(reply.SerializeToString())

    return handle


async def start_net_server(svc_or_servicer, host: str = "127.0.0.1", port: int = 0) -> net.Server:
    """Serve a MetaService (or a MetaServicer) over flyfs/net on host:port (0: any free
    port); the returned server's `address` is 'tcp://HOST:PORT'. Close it with `await server.close()`."""
    from .server import MetaServicer    # server.py imports this module
    from .service import MetaService
    servicer = MetaServicer(svc_or_servicer) if isinstance(svc_or_servicer, MetaService) else svc_or_servicer
    try:
        return await net.serve(make_handler(servicer), host, port, max_header=MAX_MESSAGE, max_payload=0,
                               eager=True)
    except OSError as e:
        raise OSError(e.errno or errno.EADDRINUSE, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
