"""`flyfs meta`: the gRPC face of MetaService.

The servicer only translates: request message -> MetaService call -> reply
message; an OSError becomes Status(code=errno, message). Anything else
(the KV unreachable, a bug) becomes EIO with a one-line message and a log
entry, never a transport error.

The process serves the same RPCs twice: gRPC on --listen (tools,
compatibility) and the flyfs/net framing on --net-listen (netserver.py; the
fast path clients take), and registers both addresses with mgmtd
(NodeInfo.address, NodeInfo.data_address).

    flyfs meta --kv rocksdb:///var/lib/flyfs/meta --listen 127.0.0.1:8001 --chains 1,2,3,4
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
import time

import grpc

from ..kv import KVError, open_engine
from ..net import eager
from ..proto import common_pb2, meta_pb2, meta_pb2_grpc
from . import inline, wire
from .attrs import disk_space
from .common import MetaConfig
from .layout import ChainTable, static_chain_table
from .netserver import start_net_server
from .service import MetaService
from .storage_ops import NoStorage

log = logging.getLogger("flyfs.meta")

Status = common_pb2.Status
MAX_BATCH = 1024
INLINE_MAX_DEFAULT = 4096   # a page: as CephFS's client_max_inline_size


def _error(e: BaseException) -> Status:
    if isinstance(e, OSError) and e.errno:
        return Status(code=e.errno, message=str(e.strerror or e))
    if isinstance(e, KVError):
        log.warning("KV error: %s", e)
        return Status(code=errno.EIO, message=f"metadata store error: {e}")
    log.exception("internal error in the metadata service")
    return Status(code=errno.EIO, message=f"internal error: {type(e).__name__}: {e}")


def _dir(node) -> meta_pb2.Attr | None:
    """AttrReply.dir / EmptyReply.dir, new_dir: a directory's attributes, absent when not known."""
    return None if node is None else wire.attr_msg(node)


class MetaServicer(meta_pb2_grpc.MetaServicer):
    """Thin forwarder from gRPC to a MetaService."""

    def __init__(self, svc: MetaService):
        self.svc = svc

    async def _attr(self, coro) -> meta_pb2.AttrReply:
        try:
            node = await coro
        except Exception as e:
            return meta_pb2.AttrReply(status=_error(e))
        return meta_pb2.AttrReply(attr=wire.attr_msg(node))

    async def _opened(self, coro) -> meta_pb2.AttrReply:
        try:
            node, session, data = await coro
        except Exception as e:
            return meta_pb2.AttrReply(status=_error(e))
        return meta_pb2.AttrReply(attr=wire.attr_msg(node), session=session or b"", inline=data,
                                  inline_max=self.svc.config.inline_max)

    async def _empty(self, coro) -> meta_pb2.EmptyReply:
        try:
            await coro
        except Exception as e:
            return meta_pb2.EmptyReply(status=_error(e))
        return meta_pb2.EmptyReply()

    # ---- forwarders ------------------------------------------------------------
    async def Lookup(self, r, context=None):
        return await self._attr(self.svc.lookup(wire.caller_of(r.header), r.parent, r.name))

    async def GetAttr(self, r, context=None):
        return await self._attr(self.svc.getattr(wire.caller_of(r.header), r.ino))

    async def SetAttr(self, r, context=None):
        return await self._attr(self.svc.setattr(
            wire.caller_of(r.header), r.ino,
            mode=r.mode if r.HasField("mode") else None, uid=r.uid if r.HasField("uid") else None,
            gid=r.gid if r.HasField("gid") else None, size=r.size if r.HasField("size") else None,
            atime=wire.timeset_of(r.atime), mtime=wire.timeset_of(r.mtime), session=r.session or None))

    async def _made(self, coro) -> meta_pb2.AttrReply:
        """A new entry's reply: its attributes and its directory's right after (AttrReply.dir)."""
        try:
            node, dir_after = await coro
        except Exception as e:
            return meta_pb2.AttrReply(status=_error(e))
        return meta_pb2.AttrReply(attr=wire.attr_msg(node), dir=_dir(dir_after))

    async def _removed(self, coro) -> meta_pb2.EmptyReply:
        try:
            dir_after = await coro
        except Exception as e:
            return meta_pb2.EmptyReply(status=_error(e))
        return meta_pb2.EmptyReply(dir=_dir(dir_after))

    async def Create(self, r, context=None):
        try:
            node, session, dir_after, data = await self.svc.create(
                wire.caller_of(r.header), r.parent, r.name, r.mode, r.flags, r.umask, with_dir=True,
                with_inline=True)
        except Exception as e:
            return meta_pb2.AttrReply(status=_error(e))
        return meta_pb2.AttrReply(attr=wire.attr_msg(node), session=session or b"", dir=_dir(dir_after),
                                  inline=data, inline_max=self.svc.config.inline_max)

    async def Mkdir(self, r, context=None):
        return await self._made(self.svc.mkdir(wire.caller_of(r.header), r.parent, r.name, r.mode, r.umask,
                                               with_dir=True))

    async def Mknod(self, r, context=None):
        return await self._made(self.svc.mknod(wire.caller_of(r.header), r.parent, r.name, r.mode,
                                               r.rdev, r.umask, with_dir=True))

    async def Symlink(self, r, context=None):
        return await self._made(self.svc.symlink(wire.caller_of(r.header), r.parent, r.name, r.target,
                                                 with_dir=True))

    async def Link(self, r, context=None):
        return await self._attr(self.svc.link(wire.caller_of(r.header), r.ino, r.new_parent, r.new_name))

    async def Unlink(self, r, context=None):
        return await self._removed(self.svc.unlink(wire.caller_of(r.header), r.parent, r.name))

    async def Rmdir(self, r, context=None):
        return await self._removed(self.svc.rmdir(wire.caller_of(r.header), r.parent, r.name))

    async def Rename(self, r, context=None):
        try:
            dir_after, new_dir_after = await self.svc.rename(wire.caller_of(r.header), r.old_parent,
                                                             r.old_name, r.new_parent, r.new_name, r.flags)
        except Exception as e:
            return meta_pb2.EmptyReply(status=_error(e))
        return meta_pb2.EmptyReply(dir=_dir(dir_after), new_dir=_dir(new_dir_after))

    async def Readlink(self, r, context=None):
        try:
            target = await self.svc.readlink(wire.caller_of(r.header), r.ino)
        except Exception as e:
            return meta_pb2.ReadlinkReply(status=_error(e))
        return meta_pb2.ReadlinkReply(target=target)

    async def Readdir(self, r, context=None):
        try:
            entries, cursor = await self.svc.readdir(wire.caller_of(r.header), r.ino, r.cursor,
                                                     r.limit, r.plus)
        except Exception as e:
            return meta_pb2.ReaddirReply(status=_error(e))
        return meta_pb2.ReaddirReply(entries=[wire.entry_msg(e) for e in entries],
                                     next_cursor=cursor or b"", more=cursor is not None)

    async def Statfs(self, r, context=None):
        try:
            st = await self.svc.statfs(wire.caller_of(r.header))
        except Exception as e:
            return meta_pb2.StatfsReply(status=_error(e))
        return meta_pb2.StatfsReply(bsize=st.bsize, frsize=st.frsize, blocks=st.blocks, bfree=st.bfree,
                                    bavail=st.bavail, files=st.files, ffree=st.ffree, namemax=st.namemax)

    async def GetXattr(self, r, context=None):
        try:
            value = await self.svc.getxattr(wire.caller_of(r.header), r.ino, r.name)
        except Exception as e:
            return meta_pb2.XattrReply(status=_error(e))
        return meta_pb2.XattrReply(value=value)

    async def SetXattr(self, r, context=None):
        return await self._empty(self.svc.setxattr(wire.caller_of(r.header), r.ino, r.name, r.value, r.flags))

    async def ListXattr(self, r, context=None):
        try:
            names = await self.svc.listxattr(wire.caller_of(r.header), r.ino)
        except Exception as e:
            return meta_pb2.ListXattrReply(status=_error(e))
        return meta_pb2.ListXattrReply(names=names)

    async def RemoveXattr(self, r, context=None):
        return await self._empty(self.svc.removexattr(wire.caller_of(r.header), r.ino, r.name))

    async def Open(self, r, context=None):
        if r.HasField("path"):
            return await self._opened(self.svc.open_path(wire.caller_of(r.header), r.path, r.flags,
                                                         r.base or 1, r.follow, with_inline=True))
        return await self._opened(self.svc.open(wire.caller_of(r.header), r.ino, r.flags, with_inline=True))

    async def Inline(self, r, context=None):
        who = wire.caller_of(r.header)
        try:
            if r.op == meta_pb2.InlineReq.READ:
                node, data = await self.svc.read_inline(who, r.ino)
            elif r.op == meta_pb2.InlineReq.WRITE:
                node, data = await self.svc.write_inline(who, r.ino, r.session,
                                                         [(w.offset, w.data) for w in r.writes],
                                                         durable=r.durable)
            elif r.op == meta_pb2.InlineReq.SPILL:
                node, data = await self.svc.spill(who, r.ino), None
            else:
                raise OSError(errno.EINVAL, f"unknown inline operation {r.op}")
        except Exception as e:
            return meta_pb2.AttrReply(status=_error(e))
        return meta_pb2.AttrReply(attr=wire.attr_msg(node), inline=data, inline_max=self.svc.config.inline_max)

    async def Close(self, r, context=None):
        return await self._attr(self.svc.close(wire.caller_of(r.header), r.ino, r.session or None,
                                               r.length if r.HasField("length") else None, r.wrote))

    async def Sync(self, r, context=None):
        return await self._attr(self.svc.sync(wire.caller_of(r.header), r.ino, r.session or None,
                                              r.length if r.HasField("length") else None, r.wrote,
                                              r.durable))

    async def Access(self, r, context=None):
        return await self._empty(self.svc.access(wire.caller_of(r.header), r.ino, r.mask))

    async def Resolve(self, r, context=None):
        return await self._attr(self.svc.resolve(wire.caller_of(r.header), r.path, r.follow, r.base or 1))

    async def ResolveParent(self, r, context=None):
        try:
            node, name = await self.svc.resolve_parent(wire.caller_of(r.header), r.path, r.base or 1)
        except Exception as e:
            return meta_pb2.ResolveParentReply(status=_error(e))
        return meta_pb2.ResolveParentReply(attr=wire.attr_msg(node), name=name)

    async def SetLayout(self, r, context=None):
        return await self._attr(self.svc.set_layout(wire.caller_of(r.header), r.ino, r.chunk_size, r.stripe))

    _BATCHED = {"lookup": "Lookup", "getattr": "GetAttr", "create": "Create", "mkdir": "Mkdir",
                "unlink": "Unlink", "rmdir": "Rmdir", "rename": "Rename", "setattr": "SetAttr",
                "close": "Close"}

    async def Batch(self, r, context=None):
        """Run every op concurrently (each its own transaction; no order among them)."""
        async def one(op):
            kind = op.WhichOneof("op")
            if kind is None:
                return meta_pb2.MetaResult(empty=meta_pb2.EmptyReply(
                    status=Status(code=errno.EINVAL, message="empty batch entry")))
            reply = await getattr(self, self._BATCHED[kind])(getattr(op, kind))
            if isinstance(reply, meta_pb2.AttrReply):
                return meta_pb2.MetaResult(attr=reply)
            return meta_pb2.MetaResult(empty=reply)

        if len(r.ops) > MAX_BATCH:
            bad = meta_pb2.EmptyReply(status=Status(code=errno.EINVAL,
                                                    message=f"a batch holds at most {MAX_BATCH} operations"))
            return meta_pb2.BatchReply(results=[meta_pb2.MetaResult(empty=bad)] * len(r.ops))
        # Each op runs at once up to its first wait (net.eager): those that never wait (reads
        # from a local KV) need no task; the others go on concurrently.
        loop = asyncio.get_running_loop()
        results, waiting = [], []
        for op in r.ops:
            done, value = eager.start(loop, one(op))
            if not done:
                waiting.append((len(results), value))
                value = None
            results.append(value)
        if waiting:
            for (i, _), result in zip(waiting, await asyncio.gather(*[t for _, t in waiting])):
                results[i] = result
        return meta_pb2.BatchReply(results=results)


async def start_server(svc: MetaService, listen: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `svc` on `listen`; returns (server, bound port)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20),
                                      ("grpc.max_send_message_length", 16 << 20),
                                      ("grpc.so_reuseport", 0)])
    meta_pb2_grpc.add_MetaServicer_to_server(MetaServicer(svc), server)
    port = server.add_insecure_port(listen)
    if not port:
        raise OSError(errno.EADDRINUSE, f"cannot listen on {listen}")
    await server.start()
    return server, port


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="flyfs meta", description="Run a metadata server (stateless; all state in the KV).",
        epilog="example: flyfs meta --kv rocksdb:///var/lib/flyfs/meta --listen 127.0.0.1:8001 --chains 1,2,3,4")
    env = os.environ.get
    p.add_argument("--kv", default=env("FLYFS_META_KV"), required=not env("FLYFS_META_KV"),
                   help="KV engine URL: rocksdb:///DIR, etcd://HOST:PORT/PREFIX, memory://NAME [FLYFS_META_KV]")
    p.add_argument("--listen", default=env("FLYFS_META_LISTEN", "127.0.0.1:8001"),
                   help="HOST:PORT to serve gRPC on (default %(default)s) [FLYFS_META_LISTEN]")
    p.add_argument("--net-listen", default=env("FLYFS_META_NET_LISTEN", ""),
                   help="HOST:PORT to serve the same RPCs over flyfs/net framing (default: the --listen "
                        "host, port 0 = any free port; 'off' disables) [FLYFS_META_NET_LISTEN]")
    p.add_argument("--mgmtd", default=env("FLYFS_MGMTD"), help="cluster manager address (optional) [FLYFS_MGMTD]")
    p.add_argument("--chains", default=env("FLYFS_META_CHAINS", ""),
                   help="static chain table (comma-separated chain ids) until mgmtd provides one [FLYFS_META_CHAINS]")
    p.add_argument("--gc-interval", type=float, default=MetaConfig.gc_interval, help="seconds between GC rounds (a round goes on at once while deleted files are queued)")
    p.add_argument("--sync-commits", action="store_true",
                   help="sync every metadata commit to disk before answering (default: answer once "
                        "the OS has it, sync within --sync-interval, fsync's report at once)")
    p.add_argument("--sync-interval", type=float, default=MetaConfig.sync_interval,
                   help="seconds within which an answered commit is synced to disk")
    p.add_argument("--inline-max", type=int, default=int(env("FLYFS_META_INLINE_MAX", INLINE_MAX_DEFAULT)),
                   help="new files keep up to this many bytes in the KV instead of chunks (a small file "
                        "costs no chunk write; 0: off; at most 65536; default %(default)s) [FLYFS_META_INLINE_MAX]")
    p.add_argument("--chunk-size", type=int, default=MetaConfig.default_chunk_size, help="root directory chunk size")
    p.add_argument("--stripe", type=int, default=MetaConfig.default_stripe, help="root directory stripe width")
    p.add_argument("--root-mode", type=lambda x: int(x, 8), default=0o755, help="mode of a new root directory (octal)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    try:
        args.chains = [int(c) for c in args.chains.split(",") if c.strip()]
    except ValueError:
        p.error(f"--chains must be comma-separated chain ids, got {args.chains!r}")
    if args.net_listen not in ("", "off"):
        host, sep, port = args.net_listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            p.error(f"--net-listen must be HOST:PORT or 'off', got {args.net_listen!r}")
    return args


async def serve(args: argparse.Namespace) -> int:
    chains = args.chains
    if args.sync_interval <= 0:
        raise ValueError(f"--sync-interval must be > 0, got {args.sync_interval}")
    config = MetaConfig(default_chunk_size=args.chunk_size, default_stripe=args.stripe,
                        gc_interval=args.gc_interval, sync_commits=args.sync_commits,
                        sync_interval=args.sync_interval,
                        inline_max=inline.check_inline_max(args.inline_max))
    engine = open_engine(args.kv)
    cluster = ClusterLink(args.mgmtd) if args.mgmtd else None
    if chains:
        table = static_chain_table(chains)
    elif cluster:
        table = cluster.chain_table
    else:
        table = None
    svc = MetaService(engine, storage=cluster.storage_ops if cluster else NoStorage(), config=config,
                      chain_table=table, space=cluster.space if cluster else None)
    server = net_server = None
    try:
        await svc.format(root_mode=args.root_mode)
        server, port = await start_server(svc, args.listen)
        host = args.listen.rsplit(":", 1)[0]
        if args.net_listen != "off":
            net_host, _, net_port = (args.net_listen or f"{host}:0").rpartition(":")
            net_server = await start_net_server(svc, net_host.strip("[]"), int(net_port))
        data_address = net_server.address if net_server else ""
        if cluster:
            await cluster.register(f"{host}:{port}", data_address)
        svc.start_gc()
        print(f"flyfs meta listening on {host}:{port} (kv {args.kv})"
              + (f", net {data_address}" if data_address else ""), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        if net_server is not None:
            await net_server.close()
        if server is not None:
            await server.stop(grace=2)
        await svc.stop()
        if cluster:
            await cluster.close()
        await engine.close()


class ClusterLink:
    """What a metadata server takes from the cluster: the chain table and free
    space from mgmtd's routing info, chunk operations through the storage
    client, and its registration (NODE_META) kept alive by heartbeats so
    clients find it in the routing info."""

    TABLE_ID = 1

    def __init__(self, mgmtd_address: str):
        from ..client.storage_client import StorageClient
        from ..cluster.mgmtd_client import MgmtdClient
        from ..storage.meta_ops import ChunkStorageOps
        self.mgmtd = MgmtdClient(mgmtd_address, retry_timeout=30.0)
        self.storage = StorageClient(self.mgmtd)
        self.storage_ops = ChunkStorageOps(self.storage)
        self.node_id = 0
        self._heartbeat: asyncio.Task | None = None
        self._space: tuple[int, int] | None = None
        self._space_at = 0.0

    async def chain_table(self) -> ChainTable:
        routing = await self.mgmtd.get_routing_info()
        try:
            return ChainTable(routing.table_version(self.TABLE_ID), routing.table(self.TABLE_ID))
        except KeyError:
            return ChainTable(0, ())

    async def space(self) -> tuple[int, int]:
        # ListChains is always current (used bytes do not move the routing version);
        # statfs is frequent, so ask at most every few seconds.
        now = time.monotonic()
        if self._space is None or now - self._space_at > 3.0:
            reply = await self.mgmtd.list_chains()
            used, free = disk_space(reply.targets)
            # Every byte is stored `replicas` times: report what a user can write.
            chains = list(reply.chains)
            replicas = max(1, round(sum(len(c.targets) for c in chains) / len(chains))) if chains else 1
            self._space = ((used + free) // replicas, free // replicas)
            self._space_at = now
        return self._space

    async def register(self, address: str, data_address: str = "") -> None:
        from ..proto import mgmtd_pb2
        reply = await self.mgmtd.register_node(mgmtd_pb2.NODE_META, address, data_address=data_address)
        self.node_id = reply.node_id
        interval = max(0.2, reply.lease_ms / 1000 / 4) if reply.lease_ms else 1.0
        self._heartbeat = asyncio.ensure_future(self._beat(interval))
        log.info("registered with mgmtd as meta node %d at %s (net %s)", self.node_id, address,
                 data_address or "off")

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.mgmtd.heartbeat(self.node_id)
            except Exception as e:  # mgmtd restarting: keep trying
                log.warning("heartbeat to mgmtd failed: %s", e)

    async def close(self) -> None:
        if self._heartbeat:
            self._heartbeat.cancel()
        await self.storage.close()
        await self.mgmtd.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
        return uvloop.run(serve(args))
    except KVError as e:
        print(f"flyfs meta: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"flyfs meta: {e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:   # a bad setting (--inline-max, --sync-interval, ...): one line
        print(f"flyfs meta: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
