"""Async client of the metadata service (flyfs meta), over gRPC or flyfs/net.

Methods mirror MetaService; each takes an optional ``user`` (a Caller: uid,
gids) for callers that act for many users (FUSE), defaulting to the
client's own. A failed operation raises OSError with the server's errno
(FileNotFoundError, FileExistsError, PermissionError, ...).

    async with MetaClient("127.0.0.1:8001") as meta:
        d = await meta.mkdir(ROOT_INO, "data", 0o755)
        f, session = await meta.create(d.ino, "a", 0o644, os.O_WRONLY)
        await meta.close(f.ino, session, length=0)

Transports, chosen by the target: ``HOST:PORT`` is gRPC; ``tcp://HOST:PORT``
is the same meta.proto messages over the flyfs/net framing (the server's
NodeInfo.data_address; see flyfs/metaserver/netserver.py), several times
cheaper per call. `pick_meta_target(node_info)` chooses from mgmtd's routing
info. Same methods, errors and retries either way; over flyfs/net each event
loop (and each process, after fork) gets its own connection pool, and with
`MetaClient.coalesce` calls issued concurrently (in one loop iteration) go
out as one Batch call (off by default: slower here; flyfs/bench/meta.py, mode
netauto against net).

Retries: a call that cannot reach the server (UNAVAILABLE; over flyfs/net a
refused, reset or lost connection) is retried with the same request uuid,
which makes remove and rename exactly-once; a mkdir/create retried after a
lost answer may report EEXIST, as over NFS. Timeouts and protocol errors are
not retried; they raise OSError(EIO).

Failover: metadata servers keep no state of their own (it is all in the KV),
so when the server stays unreachable through those retries, a client given
``failover`` (an async callable: the targets tried so far -> another target
or None; flyfs.connect() asks mgmtd's routing info) moves to another server
and sends the call again there, with the same uuid. A call that times out
fails over too when ``liveness`` (async: target -> bool) says the server is
no longer alive (mgmtd stopped hearing from it: a hung or cut-off server);
while it is alive a timeout stays an EIO (the call may still run there).
Over flyfs/net a call need not wait for its timeout: once calls have waited
HANG_AFTER seconds on a connection that has sent nothing meanwhile, the
client asks ``liveness`` (every HANG_CHECK seconds) and abandons them as
soon as the server is known to be gone, then fails over; a server that is
only slow keeps answering other calls or stays alive in mgmtd, and its calls
wait as before. (A call the hung server still runs later is harmless: the
retry carries the same uuid, and the KV's transactions make the two one.)
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import uuid as uuidlib
from typing import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from .. import net
from ..metaserver import wire
from ..metaserver.netserver import BATCHABLE, MAX_MESSAGE, METHOD_IDS, METHODS
from ..metaserver.perm import Caller
from ..metaserver.schema import ROOT_INO, DirEntry, Inode, StatFs
from ..proto import common_pb2
from ..proto import meta_pb2 as pb
from ..proto import meta_pb2_grpc

_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)
NET_SCHEME = "tcp://"
log = logging.getLogger("flyfs.client.meta")
MAX_COALESCE = 256      # calls in one coalesced Batch (the server takes up to 1024)
CONNECT_TIMEOUT = 5.0   # at most, for a connection (a server cut off answers nothing)
HANG_AFTER = 3.0        # calls waiting this long on a silent connection: ask whether the server is alive
HANG_CHECK = 1.0        # how often, while that lasts
_ALONE = object()       # a coalescable call with no company: sent as a plain call


class MetaUnreachable(OSError):
    """The metadata server could not be reached through all retries (errno EIO)."""


class _NetLink:
    """One event loop's flyfs/net connections to the server, and the calls
    waiting for the end of the loop iteration to go out together."""

    __slots__ = ("loop", "pool", "pending", "tasks", "inflight", "waiting", "aborts", "watcher")

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: net.ConnectionPool):
        self.loop = loop
        self.pool = pool
        self.pending: list = []             # (MetaOp field, request, future)
        self.tasks: set[asyncio.Task] = set()
        self.inflight = 0                   # calls sent and not yet answered
        # with `liveness`: calls in flight (token -> (sent at, target)), one abort future
        # per target that ends all of them, and the task that watches for a hung server
        self.waiting: dict[object, tuple[float, str]] = {}
        self.aborts: dict[str, asyncio.Future] = {}
        self.watcher: asyncio.Task | None = None


def pick_meta_target(node_info) -> str:
    """The target to give MetaClient for a NODE_META NodeInfo from mgmtd's routing
    info: its flyfs/net address (tcp://HOST:PORT) when it serves one, else its gRPC address."""
    data = getattr(node_info, "data_address", "")
    if data:
        return data if "://" in data else NET_SCHEME + data
    return node_info.address


def default_caller(client_id: str = "") -> Caller:
    gids = [os.getgid()] + [g for g in os.getgroups() if g != os.getgid()]
    return Caller(os.getuid(), tuple(gids), client_id)


def raise_for(status) -> None:
    if status.code:
        raise OSError(status.code, status.message or os.strerror(status.code))


class _Later:
    """close_later()'s queue on one event loop."""

    __slots__ = ("queued", "timer", "sending")

    def __init__(self):
        self.queued: list = []
        self.timer: asyncio.TimerHandle | None = None
        self.sending: set[asyncio.Task] = set()


def _dir_of(reply) -> Inode | None:
    """AttrReply.dir / EmptyReply.dir: a directory's attributes right after a change in it."""
    return wire.inode_of(reply.dir) if reply.HasField("dir") else None


class MetaClient:
    """Client of one metadata server: gRPC at HOST:PORT, or flyfs/net at tcp://HOST:PORT."""

    #: close_later(): how long a queued close waits for company (seconds)
    CLOSE_DELAY = 0.005

    #: flyfs/net only: calls issued in the same event-loop iteration (concurrent
    #: callers) that a Batch can carry go out as one Batch call. Each is still its
    #: own transaction with its own uuid, user and reply; concurrent calls had no
    #: order among them anyway. Off by default: since requests are handled eagerly
    #: (flyfs.net.eager), 8 concurrent callers in one process do 1.1-2.5x more
    #: operations per second sent alone (`flyfs bench meta`, modes net and netauto).
    coalesce = False
    inline_max = 0     # the server's (from its last create/open/inline reply): see read_inline

    def __init__(self, target: str, *, user: Caller | None = None, client_id: str | None = None,
                 timeout: float = 30.0, retries: int = 5, cluster_id: str = "", failover=None,
                 liveness=None):
        self.target = target
        self.failover = failover    # async (targets tried) -> another target or None
        self.liveness = liveness    # async (target) -> whether mgmtd still hears from it
        self.client_id = client_id or f"{os.uname().nodename}:{os.getpid()}:{uuidlib.uuid4().hex[:8]}"
        self.user = user or default_caller(self.client_id)
        if not self.user.client_id:
            self.user = Caller(self.user.uid, self.user.gids, self.client_id)
        self.timeout = timeout
        self.retries = retries
        self.cluster_id = cluster_id
        self._channel: grpc.aio.Channel | None = None
        self._stub: meta_pb2_grpc.MetaStub | None = None
        self._net = target.startswith(NET_SCHEME)
        if self._net:
            net.parse_address(target)   # ValueError now, not at the first call
        self._links: dict[asyncio.AbstractEventLoop, _NetLink] = {}
        self._links_pid = os.getpid()
        # close_later(): per event loop, the closes waiting to go out and the sends in flight
        self._later: dict[asyncio.AbstractEventLoop, _Later] = {}
        self._later_pid = os.getpid()
        # call_now(): blocking connections for callers on their own threads (flyfs/net only)
        self._blocking = net.BlockingPool(connect_timeout=min(timeout, CONNECT_TIMEOUT), max_header=MAX_MESSAGE,
                                          max_payload=0) if self._net else None

    async def __aenter__(self) -> "MetaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close_channel()

    def _stub_now(self) -> meta_pb2_grpc.MetaStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=[
                ("grpc.max_receive_message_length", 16 << 20)])
            self._stub = meta_pb2_grpc.MetaStub(self._channel)
        return self._stub

    def _link(self) -> _NetLink:
        """This event loop's connections (a loop's connections cannot serve another loop)."""
        loop = asyncio.get_running_loop()
        if self._links_pid != os.getpid():   # a forked child: the parent's connections are not ours
            self._links, self._links_pid = {}, os.getpid()
        link = self._links.get(loop)
        if link is None:
            for old in [lp for lp in self._links if lp.is_closed()]:
                del self._links[old]
            link = self._links[loop] = _NetLink(loop, net.ConnectionPool(
                connect_timeout=min(self.timeout, CONNECT_TIMEOUT), max_header=MAX_MESSAGE, max_payload=0))
        return link

    async def close_channel(self) -> None:
        """Close the connections (gRPC channel or flyfs/net pools); the next call reopens them.
        Closes queued by close_later() go out first."""
        try:
            await self.flush_closes()
        except RuntimeError:  # no running loop of ours here: nothing queued on it
            pass
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
        if self._blocking is not None:
            self._blocking.close()
            self._blocking = net.BlockingPool(connect_timeout=min(self.timeout, CONNECT_TIMEOUT),
                                              max_header=MAX_MESSAGE,
                                              max_payload=0)
        links, self._links = self._links, {}
        if self._links_pid != os.getpid():
            return
        here = asyncio.get_running_loop()
        for loop, link in links.items():
            if loop is here:
                await link.pool.close()
                if link.watcher is not None:
                    link.watcher.cancel()
                    await asyncio.gather(link.watcher, return_exceptions=True)
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(link.pool.close(), loop)

    def _header(self, user: Caller | None, uuid: bytes):
        who = user or self.user
        if not who.client_id:
            who = Caller(who.uid, who.gids, self.client_id)
        return wire.header(who, uuid, self.cluster_id)

    async def _call(self, method: str, build, user: Caller | None):
        """Send `build(header)`, retrying unreachable-server failures with the same uuid,
        then at another server when `failover` names one."""
        uuid = uuidlib.uuid4().bytes
        request = build(self._header(user, uuid))
        tried = [self.target]
        while True:
            try:
                if self._net:
                    return await self._call_net(method, request)
                return await self._call_grpc(method, request)
            except MetaUnreachable as e:
                if not await self._fail_over(tried, e):
                    raise

    async def _fail_over(self, tried: list[str], error: OSError) -> bool:
        """Move to another metadata server after `error`; False when there is none to try."""
        if self.target not in tried:    # another caller moved meanwhile: try where it went
            tried.append(self.target)
            return True
        if self.failover is None:
            return False
        try:
            new = await self.failover(tuple(tried))
        except Exception as e:  # mgmtd unreachable too: report the original failure
            log.warning("metadata failover: no other server (%s)", e)
            return False
        if not new or new in tried or new.startswith(NET_SCHEME) != self._net:
            return False
        log.warning("metadata server %s unreachable (%s); moving to %s", self.target, error.strerror, new)
        self._switch(new)
        tried.append(new)
        return True

    async def _gone(self, target: str) -> bool:
        """Whether `target` is known to be down (liveness says so), for a timed-out call."""
        if self.liveness is None or self.failover is None:
            return False
        try:
            return not await self.liveness(target)
        except Exception as e:  # mgmtd unreachable: nothing known, the timeout stays an EIO
            log.warning("metadata liveness of %s unknown: %s", target, e)
            return False

    def _switch(self, target: str) -> None:
        """Use `target` (same transport) from now on; connections to it open on first use."""
        self.target = target
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            asyncio.ensure_future(channel.close())

    async def _call_grpc(self, method: str, request):
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                reply = await getattr(self._stub_now(), method)(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() in _RETRY_CODES and attempt < self.retries:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                kind = OSError
                if e.code() in _RETRY_CODES or (e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                                                and await self._gone(self.target)):
                    kind = MetaUnreachable
                raise kind(errno.EIO, f"metadata server {self.target}: {e.code().name}: {e.details()}") from None
            if hasattr(reply, "status"):
                raise_for(reply.status)
            return reply
        raise AssertionError("unreachable")

    async def _call_net(self, method: str, request):
        """`_call` over flyfs/net. A batchable call issued while others are in flight
        waits for the end of this loop iteration and goes out in one Batch call with
        the others issued meanwhile; one issued alone goes at once (a lone caller
        waits for nothing)."""
        link = self._link()
        field = BATCHABLE.get(method) if self.coalesce and (link.inflight or link.pending) else None
        reply = _ALONE
        if field is not None:
            fut = link.loop.create_future()
            link.pending.append((field, request, fut))
            if len(link.pending) == 1:
                link.loop.call_soon(self._flush, link)
            reply = await fut
        if reply is _ALONE:
            reply = await self._send_net(method, request)
        if hasattr(reply, "status"):
            raise_for(reply.status)
        return reply

    def _flush(self, link: _NetLink) -> None:
        waiting = [p for p in link.pending if not p[2].done()]     # callers cancelled meanwhile drop out
        link.pending = []
        for i in range(0, len(waiting), MAX_COALESCE):
            part = waiting[i:i + MAX_COALESCE]
            if len(part) == 1:
                part[0][2].set_result(_ALONE)   # alone: its caller sends it as a plain call
                continue
            task = link.loop.create_task(self._send_batch(part))
            link.tasks.add(task)
            task.add_done_callback(link.tasks.discard)

    async def _send_batch(self, part: list) -> None:
        """One Batch call for coalesced calls; each caller gets its own reply (or error)."""
        req = pb.BatchReq(ops=[pb.MetaOp(**{field: request}) for field, request, _ in part])
        try:
            results = (await self._send_net("Batch", req)).results
        except OSError as e:
            for _, _, fut in part:
                if not fut.done():
                    fut.set_exception(type(e)(e.errno, e.strerror))
            return
        except asyncio.CancelledError:
            for _, _, fut in part:
                fut.cancel()
            raise
        for i, (_, _, fut) in enumerate(part):
            if fut.done():
                continue
            if i < len(results):
                r = results[i]
                fut.set_result(r.attr if r.WhichOneof("result") == "attr" else r.empty)
            else:
                fut.set_exception(OSError(errno.EIO, f"metadata server {self.target}: a Batch reply held "
                                                     f"{len(results)} results for {len(part)} operations"))

    async def _send_net(self, method: str, request):
        """One call over flyfs/net with `_call`'s retries (connection failures only, same uuid);
        returns the reply message without looking at its status."""
        mid = METHOD_IDS[method]
        data = request.SerializeToString()
        delay = 0.05
        link = self._link()
        for attempt in range(self.retries + 1):
            link.inflight += 1
            target, token, abort = self.target, object(), None
            if self.liveness is not None:
                abort = link.aborts.get(target)
                if abort is None or abort.done():
                    abort = link.aborts[target] = link.loop.create_future()
                link.waiting[token] = (link.loop.time(), target)
                if link.watcher is None:
                    link.watcher = link.loop.create_task(self._watch_hung(link))
            try:
                raw = await link.pool.call(target, mid, data, timeout=self.timeout, abort=abort)
            except net.RequestAborted as e:
                raise MetaUnreachable(errno.EIO, f"metadata server {target}: {e}") from None
            except net.RequestTimeout as e:
                target = self.target
                if await self._gone(target):
                    raise MetaUnreachable(errno.EIO, f"metadata server {target}: no answer in {self.timeout:g} s "
                                                     f"and no longer alive in mgmtd") from None
                raise OSError(errno.EIO, f"metadata server {target}: RequestTimeout: {e}") from None
            except (net.ProtocolError, net.RemoteError) as e:
                raise OSError(errno.EIO, f"metadata server {self.target}: {type(e).__name__}: {e}") from None
            except net.TransportError as e:
                if attempt < self.retries:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise MetaUnreachable(errno.EIO, f"metadata server {self.target}: UNAVAILABLE: {e}") from None
            finally:
                link.inflight -= 1
                link.waiting.pop(token, None)
            try:
                return METHODS[mid].reply.FromString(raw.header)
            except Exception as e:
                raise OSError(errno.EIO, f"metadata server {self.target}: malformed {method} reply: {e}") from None
        raise AssertionError("unreachable")

    async def _watch_hung(self, link: _NetLink) -> None:
        """While calls are in flight on `link`: abandon those to a server that has sent
        nothing for HANG_AFTER seconds and that mgmtd no longer hears from."""
        try:
            while link.waiting:
                await asyncio.sleep(HANG_CHECK)
                now = link.loop.time()
                silent = {t for start, t in link.waiting.values()
                          if now - start >= HANG_AFTER and link.pool.silence(t) >= HANG_AFTER}
                for target in silent:
                    try:
                        gone = not await self.liveness(target)
                    except Exception as e:  # mgmtd unreachable: nothing known, keep waiting
                        log.debug("metadata liveness of %s unknown: %s", target, e)
                        continue
                    abort = link.aborts.get(target)
                    if gone and abort is not None and not abort.done():   # (the next call makes a new one)
                        log.warning("metadata server %s sent nothing for %g s and mgmtd no longer hears "
                                    "from it: its calls go elsewhere", target, HANG_AFTER)
                        abort.set_result(f"sent nothing for {HANG_AFTER:g} s and no longer alive in mgmtd")
        finally:
            link.watcher = None

    def call_now(self, method: str, build, user: Caller | None = None):
        """`_call` from the calling thread over a blocking connection, with no event loop
        (thread-safe; flyfs/net targets only): the reply, or OSError with the server's
        errno for a failed operation. None where the call could not be made or
        answered (gRPC target, transport error, timeout): then use the async method,
        which retries. For read-only calls: one that did not answer may have run."""
        pool = self._blocking
        if pool is None:
            return None
        mid = METHOD_IDS[method]
        request = build(self._header(user, uuidlib.uuid4().bytes))
        try:
            # (capped: a call left unanswered is taken over by the async path, which fails over)
            header, _ = pool.call(self.target, mid, request.SerializeToString(),
                                  timeout=min(self.timeout, CONNECT_TIMEOUT))
            reply = METHODS[mid].reply.FromString(header)
        except (net.TransportError, DecodeError) as e:
            log.debug("blocking %s to %s failed: %s", method, self.target, e)
            return None
        if hasattr(reply, "status"):
            raise_for(reply.status)
        return reply

    def resolve_now(self, path, follow: bool = True, base: int = ROOT_INO, *,
                    user: Caller | None = None) -> Inode | None:
        """`resolve` by call_now: the inode, OSError, or None (use `resolve`)."""
        r = self.call_now("Resolve", lambda h: pb.ResolveReq(header=h, path=_b(path), follow=follow,
                                                             base=base), user)
        return None if r is None else wire.inode_of(r.attr)

    async def _attr(self, method: str, build, user) -> Inode:
        return wire.inode_of((await self._call(method, build, user)).attr)

    def _inline_of(self, r) -> bytes | None:
        """AttrReply.inline (None: the data is in chunks); notes the server's inline_max."""
        self.inline_max = r.inline_max
        return r.inline if r.HasField("inline") else None

    async def _opened(self, method: str, build, user, with_inline: bool = False) -> tuple:
        r = await self._call(method, build, user)
        out = wire.inode_of(r.attr), r.session or None
        return out + (self._inline_of(r),) if with_inline else out

    # ---- names -------------------------------------------------------------------
    async def lookup(self, parent: int, name, *, user: Caller | None = None) -> Inode:
        return await self._attr("Lookup", lambda h: pb.LookupReq(header=h, parent=parent, name=_b(name)), user)

    async def create(self, parent: int, name, mode: int = 0o666, flags: int = os.O_RDWR, umask: int = 0,
                     *, with_dir: bool = False, with_inline: bool = False, user: Caller | None = None) -> tuple:
        """(attributes, write session or None); with `with_dir` also the directory's attributes
        right after a new file went in (None: the file existed, or the server does not say);
        with `with_inline` last the file's data while the server holds it (else None)."""
        r = await self._call("Create", lambda h: pb.CreateReq(
            header=h, parent=parent, name=_b(name), mode=mode, flags=flags, umask=umask), user)
        out = wire.inode_of(r.attr), r.session or None
        if with_dir:
            out += (_dir_of(r),)
        return out + (self._inline_of(r),) if with_inline else out

    async def _made(self, method: str, build, user, with_dir: bool):
        """The new entry's attributes; with `with_dir`, (them, the directory's right after or None)."""
        r = await self._call(method, build, user)
        node = wire.inode_of(r.attr)
        return (node, _dir_of(r)) if with_dir else node

    # with_dir (mkdir, mknod, symlink): (the new inode, its directory's attributes right after)
    async def mkdir(self, parent: int, name, mode: int = 0o777, umask: int = 0, *, with_dir: bool = False,
                    user: Caller | None = None):
        return await self._made("Mkdir", lambda h: pb.MkdirReq(header=h, parent=parent, name=_b(name),
                                                               mode=mode, umask=umask), user, with_dir)

    async def mknod(self, parent: int, name, mode: int, rdev: int = 0, umask: int = 0, *,
                    with_dir: bool = False, user: Caller | None = None):
        return await self._made("Mknod", lambda h: pb.MknodReq(header=h, parent=parent, name=_b(name),
                                                               mode=mode, rdev=rdev, umask=umask),
                                user, with_dir)

    async def symlink(self, parent: int, name, target, *, with_dir: bool = False,
                      user: Caller | None = None):
        return await self._made("Symlink", lambda h: pb.SymlinkReq(header=h, parent=parent, name=_b(name),
                                                                   target=_b(target)), user, with_dir)

    async def readlink(self, ino: int, *, user: Caller | None = None) -> bytes:
        return (await self._call("Readlink", lambda h: pb.InodeReq(header=h, ino=ino), user)).target

    async def link(self, ino: int, new_parent: int, new_name, *, user: Caller | None = None) -> Inode:
        return await self._attr("Link", lambda h: pb.LinkReq(header=h, ino=ino, new_parent=new_parent,
                                                             new_name=_b(new_name)), user)

    # unlink, rmdir: the directory's attributes right after (None: a retry the server had done, or
    # a server that does not say)
    async def unlink(self, parent: int, name, *, user: Caller | None = None) -> Inode | None:
        return _dir_of(await self._call("Unlink", lambda h: pb.RemoveReq(header=h, parent=parent,
                                                                         name=_b(name)), user))

    async def rmdir(self, parent: int, name, *, user: Caller | None = None) -> Inode | None:
        return _dir_of(await self._call("Rmdir", lambda h: pb.RemoveReq(header=h, parent=parent,
                                                                        name=_b(name)), user))

    async def rename(self, old_parent: int, old_name, new_parent: int, new_name, flags: int = 0, *,
                     user: Caller | None = None) -> tuple[Inode | None, Inode | None]:
        """The source and (across directories) destination directories' attributes right after
        (None where the server did not say: a retry it had done, nothing changed, an older server)."""
        r = await self._call("Rename", lambda h: pb.RenameReq(
            header=h, old_parent=old_parent, old_name=_b(old_name), new_parent=new_parent,
            new_name=_b(new_name), flags=flags), user)
        return _dir_of(r), wire.inode_of(r.new_dir) if r.HasField("new_dir") else None

    async def resolve(self, path, follow: bool = True, base: int = ROOT_INO, *,
                      user: Caller | None = None) -> Inode:
        return await self._attr("Resolve", lambda h: pb.ResolveReq(header=h, path=_b(path), follow=follow,
                                                                   base=base), user)

    async def resolve_parent(self, path, base: int = ROOT_INO, *,
                             user: Caller | None = None) -> tuple[Inode, bytes]:
        r = await self._call("ResolveParent", lambda h: pb.ResolveReq(header=h, path=_b(path), base=base), user)
        return wire.inode_of(r.attr), r.name

    # ---- attributes ------------------------------------------------------------------
    async def getattr(self, ino: int, *, user: Caller | None = None) -> Inode:
        return await self._attr("GetAttr", lambda h: pb.InodeReq(header=h, ino=ino), user)

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime=None, mtime=None,
                      session: bytes | None = None, user: Caller | None = None) -> Inode:
        def build(h):
            r = pb.SetAttrReq(header=h, ino=ino, atime=wire.timeset_msg(atime), mtime=wire.timeset_msg(mtime),
                              session=session or b"")
            for field, value in (("mode", mode), ("uid", uid), ("gid", gid), ("size", size)):
                if value is not None:
                    setattr(r, field, value)
            return r
        return await self._attr("SetAttr", build, user)

    async def truncate(self, ino: int, length: int, session: bytes | None = None, *,
                       user: Caller | None = None) -> Inode:
        return await self.setattr(ino, size=length, session=session, user=user)

    async def access(self, ino: int, mask: int, *, user: Caller | None = None) -> None:
        await self._call("Access", lambda h: pb.AccessReq(header=h, ino=ino, mask=mask), user)

    async def statfs(self, *, user: Caller | None = None) -> StatFs:
        r = await self._call("Statfs", lambda h: pb.StatfsReq(header=h), user)
        return StatFs(r.bsize, r.frsize, r.blocks, r.bfree, r.bavail, r.files, r.ffree, r.namemax)

    async def set_layout(self, ino: int, chunk_size: int, stripe: int, *, user: Caller | None = None) -> Inode:
        return await self._attr("SetLayout", lambda h: pb.SetLayoutReq(header=h, ino=ino, chunk_size=chunk_size,
                                                                       stripe=stripe), user)

    # ---- directories --------------------------------------------------------------------
    async def readdir(self, ino: int, cursor=b"", limit: int = 0, plus: bool = False, *,
                      user: Caller | None = None) -> tuple[list[DirEntry], bytes | None]:
        r = await self._call("Readdir", lambda h: pb.ReaddirReq(header=h, ino=ino, cursor=_b(cursor),
                                                                limit=limit, plus=plus), user)
        return [wire.entry_of(e) for e in r.entries], (r.next_cursor if r.more else None)

    async def readdir_all(self, ino: int, page: int = 0, plus: bool = False, *,
                          user: Caller | None = None) -> AsyncIterator[DirEntry]:
        cursor = b""
        while True:
            entries, cursor = await self.readdir(ino, cursor, page, plus, user=user)
            for e in entries:
                yield e
            if cursor is None:
                return

    # ---- extended attributes --------------------------------------------------------------
    async def getxattr(self, ino: int, name, *, user: Caller | None = None) -> bytes:
        return (await self._call("GetXattr", lambda h: pb.XattrReq(header=h, ino=ino, name=_b(name)), user)).value

    async def setxattr(self, ino: int, name, value: bytes, flags: int = 0, *, user: Caller | None = None) -> None:
        await self._call("SetXattr", lambda h: pb.XattrReq(header=h, ino=ino, name=_b(name), value=bytes(value),
                                                           flags=flags), user)

    async def listxattr(self, ino: int, *, user: Caller | None = None) -> list[bytes]:
        return list((await self._call("ListXattr", lambda h: pb.InodeReq(header=h, ino=ino), user)).names)

    async def removexattr(self, ino: int, name, *, user: Caller | None = None) -> None:
        await self._call("RemoveXattr", lambda h: pb.XattrReq(header=h, ino=ino, name=_b(name)), user)

    # ---- files -------------------------------------------------------------------------------
    # with_inline (open, open_path): a third item, the file's data while the server holds it, else None
    async def open(self, ino: int, flags: int, *, with_inline: bool = False, user: Caller | None = None) -> tuple:
        return await self._opened("Open", lambda h: pb.OpenReq(header=h, ino=ino, flags=flags), user,
                                  with_inline)

    async def open_path(self, path, flags: int, base: int = ROOT_INO, follow: bool = True, *,
                        with_inline: bool = False, user: Caller | None = None) -> tuple:
        """Open what `path` names (from directory `base`), resolved and opened in one call."""
        return await self._opened("Open", lambda h: pb.OpenReq(header=h, path=_b(path), flags=flags,
                                                               base=base, follow=follow), user, with_inline)

    # ---- small files' data held by the metadata service (flyfs/metaserver/inline.py) --------------
    async def read_inline(self, ino: int, *, user: Caller | None = None) -> tuple[Inode, bytes | None]:
        """(attributes, the file's data while the server holds it, else None)."""
        r = await self._call("Inline", lambda h: pb.InlineReq(header=h, ino=ino, op=pb.InlineReq.READ), user)
        return wire.inode_of(r.attr), self._inline_of(r)

    async def write_inline(self, ino: int, session: bytes, writes, *, durable: bool = False,
                           user: Caller | None = None) -> tuple[Inode, bytes | None]:
        """Apply (offset, bytes) writes to a file whose data the server holds: (attributes,
        the data after), or data None: it does not (any more), nothing was written."""
        r = await self._call("Inline", _inline_write(ino, session, writes, durable), user)
        return wire.inode_of(r.attr), self._inline_of(r)

    def write_inline_now(self, ino: int, session: bytes, writes, *, user: Caller | None = None):
        """`write_inline` by call_now (the calling thread, no event loop): (attributes, data
        or None), OSError, or None where the call could not be made (use write_inline).
        Applying the same bytes again is harmless, so an unanswered call may be retried."""
        r = self.call_now("Inline", _inline_write(ino, session, writes), user)
        return None if r is None else (wire.inode_of(r.attr), self._inline_of(r))

    async def spill(self, ino: int, *, user: Caller | None = None) -> Inode:
        """Have the server move a file's data to chunks (before writing chunks)."""
        r = await self._call("Inline", lambda h: pb.InlineReq(header=h, ino=ino, op=pb.InlineReq.SPILL), user)
        self._inline_of(r)
        return wire.inode_of(r.attr)

    def _close_req(self, h, ino, session, length, wrote, durable=False):
        r = pb.CloseReq(header=h, ino=ino, session=session or b"", wrote=wrote, durable=durable)
        if length is not None:
            r.length = length
        return r

    async def close(self, ino: int, session: bytes | None = None, length: int | None = None,
                    wrote: bool = False, *, user: Caller | None = None) -> Inode:
        return await self._attr("Close", lambda h: self._close_req(h, ino, session, length, wrote), user)

    def close_later(self, ino: int, session: bytes, *, user: Caller | None = None) -> None:
        """End a write session that wrote nothing, without waiting: such a close changes
        no attribute, only ends the session, so it is queued and sent with others in one
        Batch call within CLOSE_DELAY seconds (at once when MAX_COALESCE are queued).
        Like FUSE's release, which the kernel sends after close(2) has returned. A
        failure is logged; a close that never arrives is ended by session expiry.
        Call from a running event loop; flush_closes() waits for everything queued."""
        loop = asyncio.get_running_loop()
        if self._later_pid != os.getpid():   # a forked child: the parent's queue is the parent's
            self._later, self._later_pid = {}, os.getpid()
        q = self._later.get(loop)
        if q is None:
            q = self._later[loop] = _Later()
        q.queued.append((ino, session, user))
        if len(q.queued) >= MAX_COALESCE:
            self._send_later(loop, q)
        elif q.timer is None:
            q.timer = loop.call_later(self.CLOSE_DELAY, self._send_later, loop, q)

    def _send_later(self, loop: asyncio.AbstractEventLoop, q: "_Later") -> None:
        if q.timer is not None:
            q.timer.cancel()
            q.timer = None
        queued, q.queued = q.queued, []
        if queued:
            task = loop.create_task(self._close_batch(queued))
            q.sending.add(task)
            task.add_done_callback(q.sending.discard)

    async def _close_batch(self, queued: list) -> None:
        by_user: dict = {}
        for ino, session, user in queued:
            key = None if user is None else (user.uid, tuple(user.gids), user.client_id)
            by_user.setdefault(key, (user, []))[1].append(("close", {"ino": ino, "session": session}))
        for user, ops in by_user.values():
            try:
                results = await self.batch(ops, user=user)
            except OSError as e:
                log.warning("ending %d write sessions failed (they expire later): %s", len(ops), e)
                continue
            for (_, kw), r in zip(ops, results):
                if isinstance(r, OSError) and r.errno != errno.ENOENT:
                    log.warning("ending the write session of inode %d: %s", kw["ino"], r)

    async def flush_closes(self) -> None:
        """Send what close_later() queued on this loop and wait until it is acknowledged."""
        q = self._later.get(asyncio.get_running_loop()) if self._later_pid == os.getpid() else None
        if q is None:
            return
        self._send_later(asyncio.get_running_loop(), q)
        if q.sending:
            await asyncio.gather(*list(q.sending), return_exceptions=True)

    async def sync(self, ino: int, session: bytes | None = None, length: int | None = None,
                   wrote: bool = False, durable: bool = False, *, user: Caller | None = None) -> Inode:
        """Report the length on an open write session; `durable`: answered once on disk."""
        return await self._attr("Sync", lambda h: self._close_req(h, ino, session, length, wrote, durable),
                                user)

    # ---- batches ---------------------------------------------------------------------------------
    async def batch(self, ops: list[tuple[str, dict]], *, user: Caller | None = None) -> list:
        """Several independent operations in one RPC, run concurrently by the server.

        `ops` are (name, kwargs) with name in lookup, getattr, create, mkdir,
        unlink, rmdir, rename, close (kwargs as the request message's fields). Returns one result per op: an Inode (or
        (Inode, session) for create), None for removals, or the OSError it
        failed with (not raised, so one failure does not hide the others).
        """
        uuid_base = uuidlib.uuid4().bytes[:12]

        def build(h):
            req = pb.BatchReq()
            for i, (name, kw) in enumerate(ops):
                hh = common_pb2.RequestHeader()
                hh.CopyFrom(h)
                hh.request_uuid = uuid_base + i.to_bytes(4, "little")
                req.ops.append(_batch_op(name, hh, kw))
            return req

        reply = await self._call("Batch", build, user)
        out = []
        for (name, _), res in zip(ops, reply.results):
            r = res.attr if res.WhichOneof("result") == "attr" else res.empty
            if r.status.code:
                out.append(OSError(r.status.code, r.status.message))
            elif name == "create":
                out.append((wire.inode_of(r.attr), r.session or None))
            elif name in ("unlink", "rmdir", "rename"):
                out.append(None)
            else:
                out.append(wire.inode_of(r.attr))
        return out


def _inline_write(ino: int, session: bytes, writes, durable: bool = False):
    """The builder (header -> InlineReq) of an Inline WRITE."""
    writes = [pb.InlineWrite(offset=off, data=bytes(d)) for off, d in writes]
    return lambda h: pb.InlineReq(header=h, ino=ino, op=pb.InlineReq.WRITE, session=session,
                                  durable=durable, writes=writes)


def _batch_op(name: str, h, kw: dict) -> pb.MetaOp:
    kw = {k: (_b(v) if k in ("name", "old_name", "new_name") else v) for k, v in kw.items()}
    builders = {
        "lookup": lambda: pb.MetaOp(lookup=pb.LookupReq(header=h, **kw)),
        "getattr": lambda: pb.MetaOp(getattr=pb.InodeReq(header=h, **kw)),
        "create": lambda: pb.MetaOp(create=pb.CreateReq(header=h, **{"mode": 0o666, "flags": os.O_RDWR, **kw})),
        "mkdir": lambda: pb.MetaOp(mkdir=pb.MkdirReq(header=h, **{"mode": 0o777, **kw})),
        "unlink": lambda: pb.MetaOp(unlink=pb.RemoveReq(header=h, **kw)),
        "rmdir": lambda: pb.MetaOp(rmdir=pb.RemoveReq(header=h, **kw)),
        "rename": lambda: pb.MetaOp(rename=pb.RenameReq(header=h, **kw)),
        "close": lambda: pb.MetaOp(close=pb.CloseReq(header=h, **kw)),
    }
    if name not in builders:
        raise ValueError(f"operation {name!r} cannot be batched; choose from {', '.join(builders)}")
    return builders[name]()


def _b(x) -> bytes:
    if isinstance(x, str):
        return os.fsencode(x)
    return bytes(x)
