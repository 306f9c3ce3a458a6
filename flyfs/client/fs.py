"""The flyfs file system client: `AsyncFileSystem` (the core, asyncio) and
`FileSystem` (the same API, blocking, thread-safe, fork-safe, picklable).

    import flyfs
    fs = flyfs.connect("127.0.0.1:8000")            # mgmtd's address ("flyfs://HOST:PORT" works too)
    fs.makedirs("/data/a", exist_ok=True)
    with fs.open("/data/a/x.bin", "wb") as f:
        f.write(payload)
    n = fs.pread("/data/a/x.bin", buf, 4096)

How it works:

- Metadata goes to a metadata server (found in mgmtd's routing info, nodes
  of type META, or given as ``meta=``); every request carries the caller's
  uid and groups (`as_user` makes a view acting for someone else, as FUSE
  does per request).
- File data goes straight to the storage chains: a range is cut into chunk
  pieces (flyfs/client/io.py) issued concurrently; writes go to each chain's
  head, reads to a SERVING replica with failover (storage client).
- File length: a writer knows how far it wrote; it reports that to the
  metadata server on fsync, on close, and every `length_report_interval`
  seconds while it keeps writing (which also renews its write session).
  Within one client, every handle and stat sees the furthest write at once.
- Consistency across clients is close-to-open, as NFS: open/stat see what
  other clients closed or fsynced. Directory path lookups are cached for
  `dir_cache_ttl` seconds (like FUSE's entry timeout): a name in a cached
  directory is resolved from that directory's inode (one name walked on the
  server, not every component of its path).
- Metadata calls use the server's flyfs/net address when it has one (asyncio
  sockets on the runtime's loop, like the data plane). gRPC calls (mgmtd,
  and a metadata server that serves only gRPC) run as blocking calls in a
  thread pool: gRPC's asyncio flavour cannot be used in a forked child at
  all, its blocking flavour can (see runtime.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import random
import stat as stat_mod
import threading
import time
import uuid as uuidlib
import weakref
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Iterable, Sequence

import grpc

from ..cluster.mgmtd_client import MgmtdClient, RoutingInfo
from ..metaserver.attrs import NOW
from ..metaserver.perm import Caller
from ..metaserver.schema import ROOT_INO, DirEntry, Inode, StatFs
from ..metaserver.service import MetaService
from . import io as chunk_io
from .meta_client import NET_SCHEME, MetaClient, pick_meta_target
from .runtime import Runtime, get_runtime, on_exit, on_fork_child, rpc_gate

log = logging.getLogger("flyfs.client")

__all__ = ["FileSystem", "AsyncFileSystem", "ClientConfig", "Handle", "connect", "parse_address", "NOW",
           "RENAME_NOREPLACE", "RENAME_EXCHANGE"]

RENAME_NOREPLACE = 1  # rename flags, as renameat2
RENAME_EXCHANGE = 2


# ---- configuration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientConfig:
    """Tunables of a client (seconds unless noted)."""

    rpc_timeout: float = 30.0            # one metadata RPC
    connect_timeout: float = 15.0        # how long connect() keeps trying to reach mgmtd
    op_timeout: float | None = 600.0     # a whole blocking call (FileSystem); None: no limit
    dir_cache_ttl: float = 1.0           # path -> inode caches (directories; names just stat'ed) (0: off)
    size_revalidate: float = 1.0         # a read past the known end asks for the size if it is older
    length_report_interval: float = 5.0  # report the length of files being written this often
    session_renew_interval: float = 60.0  # renew write sessions (the server's TTL is minutes)
    max_inflight: int = chunk_io.MAX_INFLIGHT  # chunk requests in flight per operation
    control_threads: int = 32            # threads running blocking control-plane RPCs
    buffer_size: int = 1 << 20           # io buffer of FileSystem.open (bytes)
    write_buffer: int = 4 << 20          # write-behind: coalesce contiguous writes up to this (bytes)
    write_window: int = 16 << 20         # write-behind: bytes in flight per file
    readahead: int = 16 << 20            # FUSE: bytes fetched ahead of sequential reads per open file (0: off)
    readahead_block: int = 4 << 20       # FUSE: size of one read-ahead fetch (bytes)
    readdir_page: int = 0                # entries per readdir RPC (0: the server's page)


def parse_address(address: str) -> str:
    """'flyfs://HOST:PORT[,HOST:PORT...][/]' or 'HOST:PORT' -> 'HOST:PORT[,...]' (ValueError if bad)."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"flyfs: bad cluster address {address!r} (expected HOST:PORT or flyfs://HOST:PORT)")
    a = address.strip()
    if "://" in a:
        scheme, _, a = a.partition("://")
        if scheme != "flyfs":
            raise ValueError(f"flyfs: unsupported address scheme {scheme!r} in {address!r} (use flyfs://)")
        a = a.split("/", 1)[0]
    parts = [p.strip() for p in a.split(",") if p.strip()]
    for p in parts:
        host, sep, port = p.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"flyfs: bad cluster address {address!r} (expected HOST:PORT or flyfs://HOST:PORT)")
    if not parts:
        raise ValueError(f"flyfs: bad cluster address {address!r}")
    return ",".join(parts)


def _process_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def default_user(client_id: str = "") -> Caller:
    gids = [os.getgid()] + [g for g in os.getgroups() if g != os.getgid()]
    return Caller(os.getuid(), tuple(gids), client_id)


def _new_client_id() -> str:
    return f"{os.uname().nodename}:{os.getpid()}:{uuidlib.uuid4().hex[:8]}"


# ---- paths --------------------------------------------------------------------------------------------

def fspath(path) -> bytes:
    """A flyfs path as absolute bytes: str/bytes/PathLike; a 'flyfs://host:port' prefix is dropped."""
    if hasattr(path, "__fspath__"):
        path = path.__fspath__()
    if isinstance(path, str):
        if path.startswith("flyfs://"):
            rest = path[len("flyfs://"):]
            path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        path = os.fsencode(path)
    elif isinstance(path, (bytes, bytearray, memoryview)):
        path = bytes(path)
    else:
        raise TypeError(f"flyfs: a path must be str, bytes or os.PathLike, not {type(path).__name__}")
    if not path:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "")
    if not path.startswith(b"/"):
        path = b"/" + path
    return path


def _dirkey(path: bytes) -> bytes:
    """A canonical spelling of a directory path for the cache (no '//' and no trailing '/')."""
    while b"//" in path:
        path = path.replace(b"//", b"/")
    return path.rstrip(b"/") or b"/"


def _show(path) -> str:
    if isinstance(path, bytes):
        return os.fsdecode(path)
    return str(path)


def _with_path(e: OSError, path, path2=None) -> OSError:
    """The same error with the standard message and the path(s) the user gave."""
    code = e.errno or errno.EIO
    err = OSError(code, os.strerror(code), _show(path), None, None if path2 is None else _show(path2))
    detail = e.strerror if isinstance(e.strerror, str) else str(e)
    if detail and detail != os.strerror(code):
        err.add_note(f"flyfs: {detail}")
    return err


# ---- stat results ---------------------------------------------------------------------------------------

def _type_bits(t: int) -> int:
    return t << 12 if 0 < t < 16 else stat_mod.S_IFMT(t)


def stat_result(n: Inode, size: int | None = None, dev: int = 0) -> os.stat_result:
    """An os.stat_result (nanosecond times, blocks, rdev) for an inode."""
    size = n.size if size is None else size
    return os.stat_result(
        (n.mode, n.ino, dev, n.nlink, n.uid, n.gid, size, n.atime // 10**9, n.mtime // 10**9, n.ctime // 10**9),
        {"st_atime": n.atime / 1e9, "st_mtime": n.mtime / 1e9, "st_ctime": n.ctime / 1e9,
         "st_atime_ns": n.atime, "st_mtime_ns": n.mtime, "st_ctime_ns": n.ctime,
         "st_blksize": min(max(n.layout.chunk_size, 4096), 1 << 20) if n.layout.chunk_size else 4096,
         "st_blocks": (size + 511) // 512, "st_rdev": n.rdev})


def statvfs_result(st: StatFs) -> os.statvfs_result:
    return os.statvfs_result((st.bsize, st.frsize, st.blocks, st.bfree, st.bavail, st.files, st.ffree,
                              st.ffree, 0, st.namemax))


class DirEntryInfo:
    """An entry of `scandir`, like os.DirEntry (attributes fetched with the listing)."""

    __slots__ = ("name", "path", "_ino", "_type", "_attr", "_fs")

    def __init__(self, name: str, path: str, ino: int, type_bits: int, attr: Inode | None, fs):
        self.name, self.path, self._ino, self._type, self._attr, self._fs = name, path, ino, type_bits, attr, fs

    def inode(self) -> int:
        return self._ino

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        if follow_symlinks and self.is_symlink():
            return self._follow(stat_mod.S_ISDIR)
        return stat_mod.S_ISDIR(self._type)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        if follow_symlinks and self.is_symlink():
            return self._follow(stat_mod.S_ISREG)
        return stat_mod.S_ISREG(self._type)

    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self._type)

    def _follow(self, test) -> bool:
        if self._fs is None:
            raise RuntimeError("following a symlink needs a lookup: use await fs.stat(entry.path)")
        try:
            return test(self._fs.stat(self.path).st_mode)
        except OSError:
            return False

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if self._attr is not None and not (follow_symlinks and self.is_symlink()):
            return stat_result(self._attr)
        if self._fs is None:
            raise RuntimeError("this entry needs a lookup: use await fs.stat(entry.path)")
        return self._fs.stat(self.path, follow_symlinks=follow_symlinks)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<flyfs.DirEntry {self.name!r}>"


# ---- control plane: blocking gRPC in threads --------------------------------------------------------

class _ThreadedStub:
    """A gRPC stub whose methods are awaitables running the blocking call in a
    thread pool (through the fork gate), raising grpc.aio.AioRpcError like the
    asyncio stubs so the shared clients handle errors unchanged."""

    def __init__(self, channel: grpc.Channel, stub_cls, executor: concurrent.futures.Executor):
        self._stub = stub_cls(channel)
        self._executor = executor

    def __getattr__(self, method: str):
        fn = getattr(self._stub, method)
        executor = self._executor

        async def call(request, timeout=None, **kw):
            return await asyncio.get_running_loop().run_in_executor(executor, _blocking_call, fn, request, timeout)

        return call


def _blocking_call(fn, request, timeout):
    with rpc_gate:
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details) from None


class _SyncMetaClient(MetaClient):
    """MetaClient over a blocking gRPC channel (fork-safe; see module doc), for a
    metadata server that serves only gRPC."""

    def __init__(self, target: str, *, executor, **kw):
        super().__init__(target, **kw)
        self._executor = executor
        self._sync_channel: grpc.Channel | None = None
        self._tstub: _ThreadedStub | None = None

    def _stub_now(self):
        if self._tstub is None:
            from ..proto import meta_pb2_grpc
            self._sync_channel = grpc.insecure_channel(self.target, options=[
                ("grpc.max_receive_message_length", 16 << 20)])
            self._tstub = _ThreadedStub(self._sync_channel, meta_pb2_grpc.MetaStub, self._executor)
        return self._tstub

    async def close_channel(self) -> None:
        ch, self._sync_channel, self._tstub = self._sync_channel, None, None
        if ch is not None:
            ch.close()

    def _switch(self, target: str) -> None:
        super()._switch(target)
        ch, self._sync_channel, self._tstub = self._sync_channel, None, None
        if ch is not None:
            ch.close()


class _SyncMgmtdClient(MgmtdClient):
    """MgmtdClient over blocking gRPC channels (fork-safe; see module doc)."""

    def __init__(self, address, executor, **kw):
        super().__init__(address, **kw)
        self._executor = executor
        self._sync: dict[str, tuple[grpc.Channel, _ThreadedStub]] = {}

    def _stub(self, addr: str):
        if addr not in self._sync:
            from ..proto import mgmtd_pb2_grpc
            ch = grpc.insecure_channel(addr)
            self._sync[addr] = (ch, _ThreadedStub(ch, mgmtd_pb2_grpc.MgmtdStub, self._executor))
        return self._sync[addr][1]

    async def close(self) -> None:
        chans, self._sync = self._sync, {}
        for ch, _ in chans.values():
            ch.close()
        await super().close()


class _LocalMeta:
    """An in-process MetaService seen through MetaClient's signatures
    (``op(args..., user=who)`` instead of ``op(who, args...)``)."""

    def __init__(self, svc, user: Caller):
        self._svc = svc
        self.user = user
        self.inline_max = svc.config.inline_max

    def __getattr__(self, name: str):
        fn = getattr(self._svc, name)

        async def call(*args, user: Caller | None = None, **kw):
            return await fn(user or self.user, *args, **kw)

        return call

    async def close_channel(self) -> None:
        pass


# ---- open files -------------------------------------------------------------------------------------------

class _InodeState:
    """What this client knows about a file it has open."""

    __slots__ = ("ino", "size", "unreported", "handles", "reported_at", "buffered", "inflight",
                 "inflight_bytes", "error", "lock", "gen", "tlock", "inline", "inline_size", "inline_max")

    def __init__(self, ino: int, size: int, inline: bytes | None = None, inline_max: int = 0):
        self.ino = ino
        self.size = size          # the length as far as this client knows (meta size, own writes, truncates)
        # While the metadata service holds the file's data (flyfs/metaserver/inline.py): the bytes
        # as of the open or our last inline write (zeros follow up to size), read from here;
        # writes ending within inline_max go to the metadata service. None: the data is in chunks
        # (for good: it only ever goes from bytes to None, never back). inline_size: the file
        # size those bytes go with (another client's change of the size means new bytes too).
        self.inline = inline
        self.inline_size = size
        self.inline_max = inline_max
        self.unreported = False   # size grew by writes not yet reported to the metadata service
        self.handles = 0
        self.reported_at = time.monotonic()
        # write-behind (write_behind): handles holding buffered bytes, writes in flight
        # (task -> (start, end)), and the first failure of a write nobody waited for.
        self.buffered: set[Handle] = set()
        self.inflight: dict[asyncio.Task, tuple[int, int]] = {}
        self.inflight_bytes = 0
        self.error: OSError | None = None
        # Orders the metadata updates that touch mtime (length reports of writers, explicit
        # utimes): a close that says "I wrote" must not land after a later explicit mtime.
        self.lock = asyncio.Lock()
        # Bumped whenever the bytes change through this client (read-ahead drops older blocks).
        self.gen = 0
        # Guards write-behind buffers against the blocking fast path (write_buffered),
        # which appends from the caller's thread without a hop to the loop.
        self.tlock = threading.RLock()


class Handle:
    """An open file of the core: inode, layout, write session, flags, caller."""

    __slots__ = ("ino", "layout", "flags", "session", "who", "path", "state", "closed", "wrote",
                 "renewed_at", "mode", "pid", "wbuf", "woff", "node", "node_at", "dir_after")

    def __init__(self, node: Inode, flags: int, session: bytes | None, who: Caller, path, state: _InodeState):
        self.ino = node.ino
        self.layout = node.layout
        self.mode = node.mode
        self.flags = flags
        self.session = session
        self.who = who
        self.path = path
        self.state = state
        self.closed = False
        self.wrote = False
        self.renewed_at = time.monotonic()
        self.pid = os.getpid()
        self.wbuf: bytearray | None = None  # write-behind buffer (contiguous bytes from woff)
        self.woff = 0
        self.node = node                    # attributes as of node_at (fgetattr max_age)
        self.node_at = time.monotonic()
        self.dir_after: Inode | None = None     # open_handle: the directory after it created the file

    @property
    def readable(self) -> bool:
        return self.flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)

    @property
    def size(self) -> int:
        return self.state.size

    def __repr__(self) -> str:
        return f"<flyfs.Handle ino={self.ino} flags={self.flags:#o} path={_show(self.path)!r}>"


# ---- the async core -------------------------------------------------------------------------------------

class _Shared:
    """State shared by an AsyncFileSystem and its as_user views."""

    def __init__(self, meta, data, config: ClientConfig, mgmtd=None, executor=None, umask: int = 0o022):
        self.meta = meta
        self.data = data
        self.mgmtd = mgmtd
        self.config = config
        self.executor = executor
        self.umask = umask
        self.dircache: dict[tuple, tuple[int, float]] = {}
        self.files: dict[int, _InodeState] = {}
        self.versions: dict[int, tuple[int, int, int]] = {}  # ino -> (mtime, ctime, size) last seen
        self.handles: set[Handle] = set()
        self.reporter: asyncio.Task | None = None
        self.closed = False


class AsyncFileSystem:
    """The flyfs client for asyncio code; FileSystem wraps it for blocking use.

    Build one with `await AsyncFileSystem.connect(address)` (mgmtd address), or
    from parts: a meta client (or an in-process MetaService) and a data plane.
    Every method raises OSError with an errno and the path.
    """

    def __init__(self, shared: _Shared, who: Caller):
        self._s = shared
        self.who = who

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    async def connect(cls, address: str, *, meta: str | Any | None = None, user: Caller | None = None,
                      config: ClientConfig | None = None, client_id: str | None = None,
                      cluster_id: str = "") -> "AsyncFileSystem":
        """Connect to the cluster whose mgmtd is at `address`.

        meta: the metadata server's HOST:PORT when mgmtd does not list one (or
        to pick one), or an in-process MetaService running on this loop.
        """
        config = config or ClientConfig()
        client_id = client_id or _new_client_id()
        user = user or default_user(client_id)
        if not user.client_id:
            user = Caller(user.uid, user.gids, client_id)
        executor = concurrent.futures.ThreadPoolExecutor(config.control_threads, thread_name_prefix="flyfs-rpc")
        mgmtd = _SyncMgmtdClient(parse_address(address), executor, cluster_id=cluster_id, client_id=client_id,
                                 timeout=config.rpc_timeout, retry_timeout=config.connect_timeout)
        try:
            routing = await mgmtd.get_routing_info()
            if meta is None or isinstance(meta, str):
                target = meta or _pick_meta(routing, address)
                # flyfs/net (tcp://): asyncio sockets on this loop, fork-safe by construction;
                # gRPC: blocking calls in threads (see the module doc).
                cls_ = MetaClient if target.startswith(NET_SCHEME) else _SyncMetaClient
                extra = {} if cls_ is MetaClient else {"executor": executor}

                async def failover(tried, net=target.startswith(NET_SCHEME)):
                    # Another registered metadata server of the same transport (any server
                    # serves any client: their state is all in the KV).
                    routing = await mgmtd.get_routing_info(force=True)
                    return _pick_meta(routing, address, exclude=tried, net=net)

                async def liveness(t):
                    routing = await mgmtd.get_routing_info(force=True)
                    return t in {pick_meta_target(m) for m in routing.meta_nodes(alive_only=True)}

                meta_client = cls_(target, user=user, client_id=client_id, timeout=config.rpc_timeout,
                                   cluster_id=cluster_id, failover=None if meta else failover,
                                   liveness=liveness, **extra)
            elif isinstance(meta, MetaService):
                meta_client = _LocalMeta(meta, user)
            else:
                meta_client = meta  # a MetaClient-like object
            data = await _make_data_plane(mgmtd, client_id, config)
        except BaseException:
            await mgmtd.close()
            executor.shutdown(wait=False)
            raise
        shared = _Shared(meta_client, data, config, mgmtd=mgmtd, executor=executor, umask=_process_umask())
        return cls(shared, user)

    @classmethod
    def from_parts(cls, meta, data, *, user: Caller | None = None, config: ClientConfig | None = None,
                   mgmtd=None) -> "AsyncFileSystem":
        """A client over given parts: `meta` a MetaClient-like object or a MetaService,
        `data` a data plane (see `DataPlane`)."""
        user = user or default_user(_new_client_id())
        if isinstance(meta, MetaService):
            meta = _LocalMeta(meta, user)
        return cls(_Shared(meta, data, config or ClientConfig(), mgmtd=mgmtd, umask=_process_umask()), user)

    def as_user(self, uid: int, gids: Sequence[int] = ()) -> "AsyncFileSystem":
        """A view of this client acting as uid (gids[0] the primary group)."""
        return AsyncFileSystem(self._s, Caller(int(uid), tuple(int(g) for g in gids), self.who.client_id))

    @property
    def config(self) -> ClientConfig:
        return self._s.config

    @property
    def meta_target(self) -> str:
        """The metadata server in use: tcp://HOST:PORT (flyfs/net), HOST:PORT (gRPC) or "in-process"."""
        return getattr(self._s.meta, "target", "in-process")

    async def close(self) -> None:
        """Close every open handle (reporting lengths) and the connections."""
        s = self._s
        if s.closed:
            return
        s.closed = True
        for h in list(s.handles):
            try:
                await self.close_handle(h)
            except OSError as e:
                log.warning("closing %s: %s", h, e)
        if s.reporter is not None:
            s.reporter.cancel()
            await asyncio.gather(s.reporter, return_exceptions=True)
        await _maybe_await(getattr(s.meta, "close_channel", None))
        if s.data is not None:
            await s.data.close()
        if s.mgmtd is not None:
            await s.mgmtd.close()
        if s.executor is not None:
            s.executor.shutdown(wait=False)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ---- path resolution -------------------------------------------------------------------------------
    def _cache_get(self, key: bytes) -> int | None:
        ttl = self._s.config.dir_cache_ttl
        if ttl <= 0:
            return None
        hit = self._s.dircache.get((self.who.uid, self.who.gids, key))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def _cache_put(self, key: bytes, ino: int) -> None:
        ttl = self._s.config.dir_cache_ttl
        if ttl > 0:
            cache = self._s.dircache
            if len(cache) > 65536:
                cache.clear()
            cache[(self.who.uid, self.who.gids, key)] = (ino, time.monotonic() + ttl)

    def invalidate_cache(self) -> None:
        """Forget cached path lookups (after a name moved or went away, or permissions changed)."""
        self._s.dircache.clear()

    def _cached_dir(self, p: bytes) -> tuple[bytes, bytes, int | None]:
        """(directory key, last name, directory inode if cached) of a path; the inode is
        None also where the last name is '.', '..' or empty (walk the whole path then).
        Search permission above a cached directory was checked when it was resolved,
        within dir_cache_ttl."""
        head, _, name = p.rpartition(b"/")
        key = _dirkey(head or b"/")
        if name in (b"", b".", b".."):
            return key, name, None
        return key, name, ROOT_INO if key == b"/" else self._cache_get(key)

    def _relative(self, p: bytes) -> tuple[bytes, int]:
        """(path, base) to resolve `p` from: its last name from its directory's inode where
        that is cached (the server then walks one name, not every component), else the
        whole path from the root."""
        _, name, ino = self._cached_dir(p)
        return (p, ROOT_INO) if ino is None else (name, ino)

    def _resolved(self, p: bytes, n: Inode) -> None:
        if n.is_dir:
            self._cache_put(_dirkey(p), n.ino)

    async def _node(self, path, follow: bool = True) -> Inode:
        p = fspath(path)
        meta = self._s.meta
        try:
            n = await self._from_dir(p, lambda rel, base: meta.resolve(rel, follow, base, user=self.who))
        except OSError as e:
            raise _with_path(e, path) from None
        self._resolved(p, n)
        return n

    async def _parent(self, path, fresh: bool = False) -> tuple[int, bytes, bool]:
        """(directory inode, last name, whether the inode came from the directory cache) of
        a path to create or remove; `fresh`: not from the cache."""
        p = fspath(path).rstrip(b"/") or b"/"
        key, last, ino = self._cached_dir(p)
        if fresh:
            self._forget_dir(p)
        elif ino is not None:
            return ino, last, key != b"/"
        try:
            d, name = await self._s.meta.resolve_parent(p, user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None
        if last not in (b"", b".", b".."):   # else `key` is not the directory the server named
            self._cache_put(key, d.ino)
        return d.ino, name, False

    async def _from_dir(self, p: bytes, call):
        """`await call(rel, base)`: `p` as a name in its cached directory where there is one
        (see _relative); when the server answers that the directory is gone (ESTALE:
        another client removed it), the whole path from the root, afresh."""
        rel, base = self._relative(p)
        try:
            return await call(rel, base)
        except OSError as e:
            if e.errno != errno.ESTALE or base == ROOT_INO:
                raise
        self._forget_dir(p)
        return await call(p, ROOT_INO)

    def _forget_dir(self, p: bytes) -> None:
        key = self._cached_dir(p.rstrip(b"/") or b"/")[0]
        self._s.dircache.pop((self.who.uid, self.who.gids, key), None)

    async def _in_parents(self, paths, call):
        """`await call(parent, name, ...)` with the (directory inode, last name) of each of
        `paths`. A directory inode from the cache may be stale (another client removed or
        replaced the directory within dir_cache_ttl): when the call then fails with ENOENT
        or ENOTDIR, the directories are resolved afresh and the call is made once more
        (a failed call changed nothing), so such a change costs a retry, not a false error."""
        found = [await self._parent(p) for p in paths]
        try:
            return await call(*[x for ino, name, _ in found for x in (ino, name)])
        except (FileNotFoundError, NotADirectoryError):
            if not any(cached for _, _, cached in found):
                raise
        found = [await self._parent(p, fresh=True) for p in paths]
        return await call(*[x for ino, name, _ in found for x in (ino, name)])

    def _saw(self, n: Inode) -> None:
        """Remember a regular file's version as this client last saw it, its own changes included."""
        if n.is_reg:
            versions = self._s.versions
            if len(versions) > 65536:
                versions.clear()  # forgetting only costs a re-read
            versions[n.ino] = (n.mtime, n.ctime, n.size)

    def unchanged_since_seen(self, h: Handle) -> bool:
        """Whether the file just opened as `h` is as this client last saw it: the same mtime,
        ctime and size to the nanosecond (any write, truncate or utime by another client
        changes its ctime). A FUSE mount keeps the kernel's cached pages of the file only
        then (close-to-open: a file another client changed is read afresh)."""
        n = h.node
        before = self._s.versions.get(n.ino)
        self._saw(n)
        return before == (n.mtime, n.ctime, n.size)

    def _overlay(self, n: Inode) -> Inode:
        st = self._s.files.get(n.ino)
        if st is not None and st.size != n.size and n.is_reg:
            return n.with_(size=st.size)
        return n

    # ---- attributes ----------------------------------------------------------------------------------------
    async def getattr(self, path, follow_symlinks: bool = True) -> Inode:
        """The inode at `path` (this client's unreported writes included in the size)."""
        return self._overlay(await self._node(path, follow_symlinks))

    def getattr_now(self, path, follow_symlinks: bool = True) -> Inode | None:
        """getattr in the calling thread with no hop to the event loop (thread-safe),
        where the metadata client can (flyfs/net: MetaClient.resolve_now); raises
        OSError as getattr does. None: use getattr."""
        meta = self._s.meta
        if getattr(type(meta), "resolve_now", None) is None:
            return None
        p = fspath(path)
        rel, base = self._relative(p)
        try:
            try:
                n = meta.resolve_now(rel, follow_symlinks, base, user=self.who)
            except OSError as e:
                if e.errno != errno.ESTALE or base == ROOT_INO:
                    raise
                self._forget_dir(p)     # as in _from_dir (this thread has no loop to await on)
                n = meta.resolve_now(p, follow_symlinks, ROOT_INO, user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None
        if n is None:
            return None
        self._resolved(p, n)
        return self._overlay(n)

    async def stat(self, path, *, follow_symlinks: bool = True) -> os.stat_result:
        if isinstance(path, Handle):
            return stat_result(await self.fgetattr(path))
        return stat_result(await self.getattr(path, follow_symlinks))

    async def lstat(self, path) -> os.stat_result:
        return await self.stat(path, follow_symlinks=False)

    async def exists(self, path) -> bool:
        try:
            await self._node(path)
            return True
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False

    async def isdir(self, path) -> bool:
        try:
            return (await self._node(path)).is_dir
        except (FileNotFoundError, NotADirectoryError):
            return False

    async def isfile(self, path) -> bool:
        try:
            return (await self._node(path)).is_reg
        except (FileNotFoundError, NotADirectoryError):
            return False

    async def _setattr(self, path, follow: bool = True, ino: int | None = None, **kw) -> Inode:
        if isinstance(path, Handle):
            node_ino, shown = path.ino, path.path
        else:
            node_ino, shown = ino if ino is not None else (await self._node(path, follow)).ino, path
        st = self._s.files.get(node_ino) if kw.get("mtime") is not None else None
        if st is None:
            try:
                n = await self._s.meta.setattr(node_ino, user=self.who, **kw)
            except OSError as e:
                raise _with_path(e, shown) from None
        else:
            await self._drain(st, shown)
            async with st.lock:
                try:
                    n = await self._s.meta.setattr(node_ino, user=self.who, **kw)
                except OSError as e:
                    raise _with_path(e, shown) from None
                for h in self._s.handles:
                    if h.ino == node_ino:
                        # Its writes came before this explicit mtime (tar, cp -p, rsync set it
                        # after writing): closing it must not stamp "now" over it.
                        h.wrote = False
        if n.is_dir and ("mode" in kw or "uid" in kw or "gid" in kw):
            self.invalidate_cache()
        self._saw(n)
        return self._overlay(n)

    async def chmod(self, path, mode: int, *, follow_symlinks: bool = True) -> None:
        await self._setattr(path, follow_symlinks, mode=mode & 0o7777)

    async def chown(self, path, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """uid or gid -1 leaves it unchanged, as os.chown."""
        await self._setattr(path, follow_symlinks, uid=None if uid == -1 else uid,
                            gid=None if gid == -1 else gid)

    async def utime(self, path, times: tuple[float, float] | None = None, *,
                    ns: tuple[int, int] | None = None, follow_symlinks: bool = True) -> None:
        """Set atime/mtime: `ns` in nanoseconds, `times` in seconds, neither: now (os.utime)."""
        if times is not None and ns is not None:
            raise ValueError("utime: give times or ns, not both")
        if ns is not None:
            atime, mtime = int(ns[0]), int(ns[1])
        elif times is not None:
            atime, mtime = int(times[0] * 1e9), int(times[1] * 1e9)
        else:
            atime = mtime = NOW
        await self._setattr(path, follow_symlinks, atime=atime, mtime=mtime)

    async def setattr(self, path, *, follow_symlinks: bool = True, ino: int | None = None, **kw) -> Inode:
        """Change attributes (mode, uid, gid, size, atime, mtime: ns ints or NOW); returns the inode.
        `ino`: the inode `path` names as the caller just saw it, so it is not resolved again
        (the mount: from the kernel's lookup for this very call)."""
        if "size" in kw and kw["size"] is not None:
            return await self.truncate(path, kw.pop("size"), ino=ino, **kw)
        return await self._setattr(path, follow_symlinks, ino=ino, **kw)

    async def truncate(self, path, length: int, *, ino: int | None = None, **kw) -> Inode:
        """Set the length of a file (path or Handle); the gap of an extension reads as zeros.
        `ino`: as for setattr."""
        if length < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), _show(getattr(path, "path", path)))
        if isinstance(path, Handle):
            h = path
            self._check_open(h)
            if not h.writable:
                raise OSError(errno.EINVAL, "file not open for writing", _show(h.path))
            ino, shown, session = h.ino, h.path, h.session
        elif ino is not None:     # (the metadata service refuses a directory itself: EISDIR)
            shown, session = path, None
        else:
            node = await self._node(path)
            if node.is_dir:
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), _show(path))
            ino, shown, session = node.ino, path, None
        for other in [x for x in self._s.handles if x.ino == ino][:1]:
            await self.drain(other)  # buffered writes land before the cut, not after it
        st = self._s.files.get(ino)
        if st is not None:
            st.gen += 1
        try:
            n = await self._s.meta.setattr(ino, size=length, session=session, user=self.who, **kw)
        except OSError as e:
            raise _with_path(e, shown) from None
        st = self._s.files.get(ino)
        if st is not None:
            st.gen += 1
            # The truncation is reported; what this client wrote beyond it is gone.
            st.size = length
            st.unreported = False
            if st.inline is not None:
                st.inline, st.inline_size = st.inline[:length], length   # as the metadata service cut it
        self._saw(n)
        return n

    async def check_access(self, path, mode: int) -> None:
        """access(2): raises PermissionError (or ENOENT, ...) unless the caller may."""
        n = await self._node(path)
        try:
            await self._s.meta.access(n.ino, mode, user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None

    async def access(self, path, mode: int) -> bool:
        """os.access: True when the caller may (R_OK|W_OK|X_OK, or F_OK)."""
        try:
            n = await self._node(path)
            await self._s.meta.access(n.ino, mode, user=self.who)
            return True
        except OSError:
            return False

    async def statvfs(self, path="/") -> os.statvfs_result:
        try:
            st = await self._s.meta.statfs(user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None
        return statvfs_result(st)

    async def statfs(self) -> StatFs:
        return await self._s.meta.statfs(user=self.who)

    # ---- names ---------------------------------------------------------------------------------------------
    # with_dir (mkdir, mknod, symlink, unlink, rmdir): also return the directory's attributes
    # right after the change, or None where the metadata service did not say (FUSE answers the
    # kernel's re-read of the directory from them)
    async def mkdir(self, path, mode: int = 0o777, *, umask: int | None = None, with_dir: bool = False):
        meta, um = self._s.meta, self._umask(umask)
        try:
            n, dir_after = await self._in_parents([path], lambda parent, name: meta.mkdir(
                parent, name, mode, um, with_dir=True, user=self.who))
        except OSError as e:
            raise _with_path(e, path) from None
        self._resolved(fspath(path), n)  # what is made next goes in it (tar x, cp -a)
        return (n, dir_after) if with_dir else n

    async def makedirs(self, path, mode: int = 0o777, exist_ok: bool = False) -> None:
        p = _dirkey(fspath(path))
        try:
            await self.mkdir(p, mode)
            return
        except FileExistsError:
            if exist_ok and await self.isdir(p):
                return
            raise
        except FileNotFoundError:
            pass
        head = p.rpartition(b"/")[0] or b"/"
        if head != p:
            await self.makedirs(head, mode, exist_ok=True)
        try:
            await self.mkdir(p, mode)
        except FileExistsError:
            if not (exist_ok and await self.isdir(p)):
                raise

    async def mknod(self, path, mode: int = 0o600 | stat_mod.S_IFREG, device: int = 0, *,
                    umask: int | None = None, with_dir: bool = False):
        meta, um = self._s.meta, self._umask(umask)
        try:
            return await self._in_parents([path], lambda parent, name: meta.mknod(
                parent, name, mode, device, um, with_dir=with_dir, user=self.who))
        except OSError as e:
            raise _with_path(e, path) from None

    async def mkfifo(self, path, mode: int = 0o666) -> Inode:
        return await self.mknod(path, stat_mod.S_IFIFO | (mode & 0o7777))

    async def symlink(self, target, path, *, with_dir: bool = False):
        """Create a symlink at `path` pointing to `target` (os.symlink order)."""
        t = os.fsencode(target) if isinstance(target, str) else bytes(target)
        meta = self._s.meta
        try:
            return await self._in_parents([path], lambda parent, name: meta.symlink(
                parent, name, t, with_dir=with_dir, user=self.who))
        except OSError as e:
            raise _with_path(e, target, path) from None

    async def readlink(self, path) -> str:
        n = await self._node(path, follow=False)
        if not n.is_symlink:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), _show(path))
        target = n.target
        if not target:
            try:
                target = await self._s.meta.readlink(n.ino, user=self.who)
            except OSError as e:
                raise _with_path(e, path) from None
        return os.fsdecode(target) if not isinstance(path, bytes) else target

    async def link(self, src, dst, *, follow_symlinks: bool = False) -> Inode:
        """Hard link `dst` to the file at `src` (os.link order)."""
        n = await self._node(src, follow_symlinks)
        meta = self._s.meta
        try:
            return await self._in_parents([dst], lambda parent, name: meta.link(n.ino, parent, name,
                                                                                user=self.who))
        except OSError as e:
            raise _with_path(e, src, dst) from None

    async def unlink(self, path, *, with_dir: bool = False) -> Inode | None:
        meta = self._s.meta
        try:
            dir_after = await self._in_parents([path], lambda parent, name: meta.unlink(parent, name,
                                                                                        user=self.who))
        except OSError as e:
            raise _with_path(e, path) from None
        return dir_after if with_dir else None

    remove = unlink

    async def rmdir(self, path, *, with_dir: bool = False) -> Inode | None:
        meta = self._s.meta
        try:
            dir_after = await self._in_parents([path], lambda parent, name: meta.rmdir(parent, name,
                                                                                       user=self.who))
        except OSError as e:
            raise _with_path(e, path) from None
        finally:
            self.invalidate_cache()
        return dir_after if with_dir else None

    async def rename(self, src, dst, flags: int = 0, *, with_dir: bool = False):
        """rename(2) (replaces a file or empty directory at dst); flags RENAME_NOREPLACE / RENAME_EXCHANGE.
        With `with_dir`: (source directory's, destination directory's attributes right after;
        the destination's None when it is the same directory, both None when not known)."""
        meta = self._s.meta
        try:
            dirs = await self._in_parents([src, dst], lambda sp, sn, dp, dn: meta.rename(sp, sn, dp, dn, flags,
                                                                                         user=self.who))
        except OSError as e:
            raise _with_path(e, src, dst) from None
        finally:
            self.invalidate_cache()
        return dirs if with_dir else None

    replace = rename

    async def set_layout(self, path, chunk_size: int, stripe: int) -> Inode:
        """Chunk size and stripe width for files created in directory `path` from now on."""
        n = await self._node(path)
        try:
            return await self._s.meta.set_layout(n.ino, chunk_size, stripe, user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None

    def _umask(self, umask: int | None) -> int:
        return self._s.umask if umask is None else umask

    # ---- directories ----------------------------------------------------------------------------------------
    async def readdir_page(self, ino: int, cursor: bytes = b"", limit: int = 0, plus: bool = False,
                           path=None) -> tuple[list[DirEntry], bytes | None]:
        """One page of a directory listing: (entries, next cursor or None at the end)."""
        try:
            return await self._s.meta.readdir(ino, cursor, limit or self._s.config.readdir_page, plus,
                                              user=self.who)
        except OSError as e:
            raise _with_path(e, path if path is not None else f"<inode {ino}>") from None

    async def iterdir(self, path, plus: bool = False) -> AsyncIterator[DirEntry]:
        """Every entry of a directory, one page (RPC) at a time: bounded memory."""
        n = await self._node(path)
        if not n.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), _show(path))
        cursor = b""
        while True:
            entries, cursor = await self.readdir_page(n.ino, cursor, 0, plus, path)
            for e in entries:
                yield e
            if cursor is None:
                return

    async def listdir(self, path="/") -> list:
        """Names in a directory (str, or bytes for a bytes path), without '.' and '..'."""
        as_bytes = isinstance(path, bytes)
        return [e.name if as_bytes else os.fsdecode(e.name) async for e in self.iterdir(path)]

    async def scandir(self, path="/") -> list[DirEntryInfo]:
        """Entries with their attributes (one readdirplus pass)."""
        base = _show(fspath(path)).rstrip("/")
        out = []
        async for e in self.iterdir(path, plus=True):
            name = os.fsdecode(e.name)
            out.append(DirEntryInfo(name, f"{base}/{name}", e.ino, _type_bits(e.type),
                                    self._overlay(e.attr) if e.attr is not None else None, None))
        return out

    # ---- extended attributes ---------------------------------------------------------------------------------
    async def getxattr(self, path, name, *, follow_symlinks: bool = True) -> bytes:
        n = await self._node(path, follow_symlinks)
        try:
            return await self._s.meta.getxattr(n.ino, name, user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None

    async def setxattr(self, path, name, value: bytes, flags: int = 0, *, follow_symlinks: bool = True) -> None:
        n = await self._node(path, follow_symlinks)
        try:
            await self._s.meta.setxattr(n.ino, name, bytes(value), flags, user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None

    async def listxattr(self, path, *, follow_symlinks: bool = True) -> list[str]:
        n = await self._node(path, follow_symlinks)
        try:
            return [os.fsdecode(x) for x in await self._s.meta.listxattr(n.ino, user=self.who)]
        except OSError as e:
            raise _with_path(e, path) from None

    async def removexattr(self, path, name, *, follow_symlinks: bool = True) -> None:
        n = await self._node(path, follow_symlinks)
        try:
            await self._s.meta.removexattr(n.ino, name, user=self.who)
        except OSError as e:
            raise _with_path(e, path) from None

    # ---- open / close ------------------------------------------------------------------------------------
    async def open_handle(self, path, flags: int = os.O_RDONLY, mode: int = 0o666, *,
                          umask: int | None = None) -> Handle:
        """open(2): a Handle holding the write session (O_CREAT/O_EXCL/O_TRUNC/O_APPEND honoured);
        its `dir_after` holds the directory's attributes right after a file it created went in."""
        meta = self._s.meta
        flags &= ~getattr(os, "O_CLOEXEC", 0)
        dir_after = None
        try:
            if flags & os.O_CREAT:
                um = self._umask(umask)
                try:
                    node, session, dir_after, data = await self._in_parents([path], lambda parent, name: meta.create(
                        parent, name, mode, flags, um, with_dir=True, with_inline=True, user=self.who))
                except OSError as e:
                    if e.errno == errno.ELOOP and not flags & (os.O_EXCL | os.O_NOFOLLOW):
                        # An existing symlink: open what it points to (creating through it is not supported).
                        node = await self._node(path, True)
                        node, session, data = await meta.open(node.ino, flags & ~(os.O_CREAT | os.O_EXCL),
                                                              with_inline=True, user=self.who)
                    else:
                        raise
            else:
                # The name resolved and the file opened in one call, so what opens is what
                # the name means now (close-to-open: another client may have renamed or
                # replaced it since we last looked).
                follow = not flags & os.O_NOFOLLOW
                node, session, data = await self._from_dir(fspath(path), lambda rel, base: meta.open_path(
                    rel, flags, base, follow, with_inline=True, user=self.who))
        except OSError as e:
            if e.filename is not None:
                raise
            raise _with_path(e, path) from None
        h = self._register(node, flags, session, path, data)
        h.dir_after = dir_after
        return h

    def _register(self, node: Inode, flags: int, session: bytes | None, path, inline: bytes | None = None) -> Handle:
        st = self._s.files.get(node.ino)
        if st is None:
            st = self._s.files[node.ino] = _InodeState(node.ino, node.size, inline,
                                                        getattr(self._s.meta, "inline_max", 0))
        else:
            if not st.unreported:
                st.size = node.size
            if inline is None or not (st.buffered or st.inflight or st.unreported):
                self._set_inline(st, inline, node.size)
        if flags & os.O_TRUNC:
            st.size = 0
            st.unreported = False
            st.gen += 1
        st.handles += 1
        h = Handle(node, flags, session, self.who, path, st)
        self._s.handles.add(h)
        if session is not None:
            self._start_reporter()
        return h

    @staticmethod
    def _set_inline(st: _InodeState, data: bytes | None, size: int) -> None:
        """Newer inline bytes (and the size they go with), or None once the data is in chunks
        (never back to bytes: an answer older than a spill must not bring back what the
        chunks replaced)."""
        if st.inline is not None:
            st.inline, st.inline_size = data, size

    async def _fresh_inline(self, h: Handle) -> None:
        """The inline bytes again, with the size, when the size known no longer matches them
        (another client changed the file since we got them)."""
        st = h.state
        try:
            n, data = await self._s.meta.read_inline(h.ino, user=self.who)
        except OSError as e:
            raise _with_path(e, h.path) from None
        h.node, h.node_at = n, time.monotonic()
        if not (st.buffered or st.inflight or st.unreported):
            self._set_inline(st, data, n.size)
            st.size = n.size

    @staticmethod
    def _read_inline(data: bytes, offset: int, mv: memoryview) -> None:
        """Fill `mv` with the inline bytes from `offset` (zeros past them, up to the size)."""
        part = memoryview(data)[offset:offset + len(mv)]
        mv[:len(part)] = part
        if len(part) < len(mv):
            mv[len(part):] = bytes(len(mv) - len(part))   # zeros up to the size

    async def _write_data(self, h: Handle, offset: int, mv: memoryview) -> bool:
        """Write bytes of the file: through the metadata service while it holds the file's
        data and the write ends within its inline_max (True: that write also stamped mtime
        and the length), else to the chunks (False), moving the data there first."""
        st = h.state
        if st.inline is not None:
            meta = self._s.meta
            if offset + len(mv) <= st.inline_max and h.session is not None:
                node, data = await meta.write_inline(h.ino, h.session, [(offset, bytes(mv))], user=h.who)
                if data is not None:
                    self._set_inline(st, data, node.size)
                    self._saw(node)
                    return True
            else:
                await meta.spill(h.ino, user=h.who)
            st.inline = None
        await self._s.data.write(h.ino, h.layout, offset, mv)
        return False

    def _check_open(self, h: Handle) -> None:
        if h.closed:
            raise ValueError("I/O operation on a closed flyfs handle")

    async def close_handle(self, h: Handle) -> None:
        """Close: buffered writes out, the length reached reported, the write session ended.
        A write that failed after its call returned (write-behind) is raised here."""
        if h.closed:
            return
        failure = None
        st = h.state
        try:
            await self.drain(h)
            with st.tlock:
                h.closed = True  # no write_buffered after this
            if h.wbuf is not None:
                await self.drain(h)
        except OSError as e:
            failure = e
        h.closed = True
        try:
            if h.session is None:
                pass
            elif h.pid != os.getpid():
                # Inherited across fork: the session is the parent's to end; report what we wrote.
                if st.unreported:
                    await self._s.meta.sync(h.ino, h.session, st.size, True, user=h.who)
            elif (not h.wrote and not st.unreported and st.handles <= 1
                  and (later := getattr(self._s.meta, "close_later", None)) is not None):
                later(h.ino, h.session, user=h.who)  # nothing to report: don't wait for it
            else:
                async with st.lock:
                    length = st.size if (h.wrote or st.unreported) else None
                    n = await self._s.meta.close(h.ino, h.session, length, h.wrote, user=h.who)
                    self._saw(n)
                    if st.handles > 1:
                        if length is not None:
                            st.unreported = False
                            st.reported_at = time.monotonic()
                        if not st.unreported:
                            st.size = max(st.size, n.size)
        except OSError as e:
            raise _with_path(e, h.path) from None
        finally:
            self._s.handles.discard(h)
            st.handles -= 1
            if st.handles <= 0 and self._s.files.get(h.ino) is st:
                del self._s.files[h.ino]
        if failure is not None:
            raise failure

    def close_needs_nothing(self, h: Handle) -> bool:
        """Whether close_handle(h) has nothing to write, report or raise (callable from any
        thread): then nobody need wait for it (FUSE's release, sent after close(2) returned)."""
        st = h.state
        return (not h.closed and not h.wrote and not st.unreported and not st.buffered and not st.inflight
                and st.error is None and h.pid == os.getpid())

    async def fsync(self, h: Handle, datasync: bool = False) -> None:
        """Write out what is buffered, make the file's data durable on the disks of
        every replica, and report its length."""
        self._check_open(h)
        if h.session is not None:
            await self.drain(h)
        try:  # also for a read-only handle: fsync(2) syncs the file, whoever wrote it
            if h.state.inline is None:   # (inline: the length report below syncs the data too)
                await self._s.data.flush(h.ino, h.layout)
        except OSError as e:
            raise _with_path(e, h.path) from None
        if h.session is not None:
            await self._report(h, renew_only=False, durable=True)

    async def _report(self, h: Handle, renew_only: bool, background: bool = False,
                      durable: bool = False) -> None:
        """Report the length (and that we wrote) on the handle's write session, or only
        renew the session; only bytes already on the chains are reported."""
        st = h.state
        if not renew_only:
            if not background:
                await self.drain(h)
            else:
                with st.tlock:
                    buffered = list(st.buffered)
                for other in buffered:
                    self._issue(other)
                while st.inflight:
                    await asyncio.wait(list(st.inflight))
                if st.error is not None:
                    return  # left for the next write, flush, fsync or close of the file to raise
        async with st.lock:
            length = None if renew_only else st.size
            wrote = h.wrote and not renew_only
            try:
                self._saw(await self._s.meta.sync(h.ino, h.session, length, wrote, durable=durable,
                                                  user=h.who))
            except OSError as e:
                raise _with_path(e, h.path) from None
            if wrote:
                h.wrote = False  # mtime is stamped; later writes stamp it again
        h.renewed_at = time.monotonic()
        if length is not None and length == st.size:
            st.unreported = False
            st.reported_at = time.monotonic()

    def fgetattr_cached(self, h: Handle, max_age: float) -> Inode | None:
        """fgetattr's answer when the attributes known are at most `max_age` seconds old,
        else None; callable from any thread (no hop to the loop)."""
        if h.closed or max_age <= 0 or time.monotonic() - h.node_at > max_age:
            return None
        return self._overlay(h.node)

    async def fgetattr(self, h: Handle, max_age: float = 0.0) -> Inode:
        """The open file's attributes; with max_age, those known from at most that many
        seconds ago (open, create, the last fgetattr) are good enough (FUSE)."""
        self._check_open(h)
        if max_age > 0 and time.monotonic() - h.node_at <= max_age:
            return self._overlay(h.node)
        try:
            n = await self._s.meta.getattr(h.ino, user=self.who)
        except OSError as e:
            raise _with_path(e, h.path) from None
        h.node, h.node_at = n, time.monotonic()
        if not h.state.unreported:
            h.state.size = n.size
        return self._overlay(n)

    def _start_reporter(self) -> None:
        s = self._s
        if s.reporter is None or s.reporter.done():
            s.reporter = asyncio.get_running_loop().create_task(self._reporter(), name="flyfs-length-reporter")

    async def _reporter(self) -> None:
        """Report lengths of files being written and renew write sessions, while any are open."""
        cfg = self._s.config
        tick = max(0.05, min(cfg.length_report_interval, cfg.session_renew_interval) / 2)
        while any(h.session is not None for h in self._s.handles):
            await asyncio.sleep(tick)
            now = time.monotonic()
            done_inodes = set()
            for h in list(self._s.handles):
                if h.session is None or h.closed:
                    continue
                st = h.state
                due_len = st.unreported and now - st.reported_at >= cfg.length_report_interval \
                    and h.ino not in done_inodes
                due_renew = now - h.renewed_at >= cfg.session_renew_interval
                if not (due_len or due_renew):
                    continue
                try:
                    await self._report(h, renew_only=not due_len, background=True)
                    done_inodes.add(h.ino)
                except (OSError, ValueError) as e:
                    log.warning("reporting the length of %s: %s", _show(h.path), e)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # never let the reporter die silently
                    log.warning("reporting the length of %s: %r", _show(h.path), e)

    # ---- data ------------------------------------------------------------------------------------------------
    async def _known_size(self, h: Handle, want_end: int, fresh: bool = False) -> int:
        """The file length for reading up to want_end. A read past what we know asks the
        metadata service again when our attributes are older than `size_revalidate`
        (another client may have grown the file since); `fresh` always asks."""
        st = h.state
        if want_end > st.size and not st.unreported and \
                (fresh or time.monotonic() - h.node_at > self._s.config.size_revalidate):
            if st.inline is not None:
                await self._fresh_inline(h)    # the bytes come with the new size
                return st.size
            try:
                n = await self._s.meta.getattr(h.ino, user=self.who)
            except OSError as e:
                raise _with_path(e, h.path) from None
            h.node, h.node_at = n, time.monotonic()
            if not st.unreported:
                st.size = n.size
        return st.size

    async def pread_into(self, h: Handle, buf, offset: int) -> int:
        """Read into `buf` from `offset`; returns bytes read (short at end of file)."""
        self._check_open(h)
        if not h.readable:
            raise OSError(errno.EBADF, "file not open for reading", _show(h.path))
        if h.node.is_dir:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), _show(h.path))
        if offset < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), _show(h.path))
        mv = memoryview(buf).cast("B")
        if h.state.buffered or h.state.inflight:
            await self.drain(h)
        size = await self._known_size(h, offset + len(mv))
        if h.state.inline is not None and h.state.inline_size != size:
            await self._fresh_inline(h)
            size = h.state.size
        n = max(0, min(len(mv), size - offset))
        if n:
            data = h.state.inline
            if data is not None:
                self._read_inline(data, offset, mv[:n])
                return n
            try:
                await self._s.data.read(h.ino, h.layout, offset, mv[:n])
            except OSError as e:
                raise _with_path(e, h.path) from None
        return n

    def pread_direct(self, h: Handle, buf, offset: int) -> int | None:
        """pread_into in the calling thread, with no hop to the event loop (thread-safe),
        for a read within one chunk of a file with none of our writes pending and
        its length known. None where that does not apply or did not work: then
        call pread_into, which also retries and fails over."""
        st = h.state
        if (h.closed or not h.readable or offset < 0 or st.buffered or st.inflight or st.error is not None
                or h.node.is_dir):
            return None
        mv = memoryview(buf).cast("B")
        size = st.size
        if offset + len(mv) > size and not st.unreported and \
                time.monotonic() - h.node_at > self._s.config.size_revalidate:
            return None   # may have grown: _known_size asks the metadata service
        n = max(0, min(len(mv), size - offset))
        if not n:
            return 0
        data = st.inline
        if data is not None:
            if st.inline_size != size:
                return None    # another client's change: pread_into gets the bytes again
            self._read_inline(data, offset, mv[:n])
            return n
        direct = getattr(self._s.data, "read_direct", None)
        if direct is None or not direct(h.ino, h.layout, offset, mv[:n]):
            return None
        return n

    async def pread(self, h: Handle, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        n = await self.pread_into(h, buf, offset)
        # (not `del buf[n:]`: a view of buf taken by the storage client may still be alive)
        return bytes(buf) if n == length else bytes(memoryview(buf)[:n])

    async def read_block(self, h: Handle, length: int, offset: int) -> memoryview:
        """pread without the copy to bytes: a read-only view of the bytes read (read-ahead)."""
        buf = bytearray(length)
        n = await self.pread_into(h, buf, offset)
        return memoryview(buf).toreadonly()[:n]

    async def pwrite(self, h: Handle, data, offset: int | None) -> int:
        """Write all of `data` at `offset` (None or O_APPEND: at the end); returns len(data)."""
        self._check_open(h)
        if not h.writable:
            raise OSError(errno.EBADF, "file not open for writing", _show(h.path))
        mv = memoryview(data).cast("B")
        st = h.state
        if st.buffered or st.inflight or st.error:
            await self.drain(h)
        if offset is None or h.append:
            offset = await self._known_size(h, 1 << 62, fresh=True) if not st.unreported else st.size
        if offset < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), _show(h.path))
        if not len(mv):
            return 0
        st.gen += 1
        try:
            reported = await self._write_data(h, offset, mv)
        except OSError as e:
            raise _with_path(e, h.path) from None
        finally:
            st.gen += 1  # a read-ahead that raced the write is not served
        end = offset + len(mv)
        if reported:   # the inline write stamped mtime and the length itself
            st.size = max(st.size, end)
            return len(mv)
        h.wrote = True
        if end > st.size:
            st.size = end
            if not st.unreported:
                st.unreported = True
                st.reported_at = time.monotonic()
        return len(mv)

    # ---- write-behind (the FUSE mount) ---------------------------------------------------------------
    async def write_behind(self, h: Handle, data, offset: int) -> int:
        """pwrite that may return before the bytes are on the chains (as a kernel page
        cache does): contiguous writes are coalesced up to `write_buffer` bytes, up to
        `write_window` bytes per file are in flight, and a failure is raised by the next
        write, flush, fsync or close of the file. Reads through this client wait for
        the writes they might overlap."""
        self._check_open(h)
        if not h.writable:
            raise OSError(errno.EBADF, "file not open for writing", _show(h.path))
        if offset < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), _show(h.path))
        st = h.state
        self._raise_deferred(st, h.path)
        n = len(data)
        if not n:
            return 0
        cfg = self._s.config
        with st.tlock:
            wb = h.wbuf
            if wb is not None and offset == h.woff + len(wb) and len(wb) + n <= cfg.write_buffer:
                wb += data
            else:
                if wb is not None:
                    self._issue(h)
                h.wbuf = bytearray(data)
                h.woff = offset
                st.buffered.add(h)
            self._grew(h, offset + n)
            if len(h.wbuf) >= cfg.write_buffer:
                self._issue(h)
        while st.inflight_bytes > cfg.write_window and st.inflight:
            await asyncio.wait(list(st.inflight), return_when=asyncio.FIRST_COMPLETED)
        self._raise_deferred(st, h.path)
        return n

    def write_buffered(self, h: Handle, data, offset: int) -> bool:
        """write_behind's common cases, done in the caller's thread with no hop to the
        loop (thread-safe): `data` starts the handle's write buffer (the first write
        of a small file) or continues it, and leaves it below `write_buffer` (7 of
        the 8 FUSE writes of each 1 MiB written in order). Returns False, having done
        nothing, in every other case (then call write_behind, which also issues
        buffers and applies the window)."""
        st = h.state
        n = len(data)
        limit = self._s.config.write_buffer
        with st.tlock:
            wb = h.wbuf
            if h.closed or not h.writable or st.error is not None or not n or n >= limit:
                return False
            if wb is None:
                h.wbuf = bytearray(data)
                h.woff = offset
                st.buffered.add(h)
            elif offset != h.woff + len(wb) or len(wb) + n >= limit:
                return False
            else:
                wb += data
            self._grew(h, offset + n)
        return True

    @staticmethod
    def _grew(h: Handle, end: int) -> None:
        st = h.state
        st.gen += 1
        h.wrote = True
        if end > st.size:
            st.size = end
            if not st.unreported:
                st.unreported = True
                st.reported_at = time.monotonic()

    def _issue(self, h: Handle) -> None:
        """Start writing a handle's buffer (after any in-flight write it overlaps)."""
        st = h.state
        with st.tlock:
            wb, off = h.wbuf, h.woff
            h.wbuf = None
            st.buffered.discard(h)
        if not wb:
            return
        end = off + len(wb)
        deps = [t for t, (a, b) in st.inflight.items() if a < end and off < b]
        task = asyncio.get_running_loop().create_task(self._write_after(deps, h, off, wb))
        st.inflight[task] = (off, end)
        st.inflight_bytes += len(wb)
        size = len(wb)

        def done(t: asyncio.Task) -> None:
            st.inflight.pop(t, None)
            st.inflight_bytes -= size
            if t.cancelled():
                return
            e = t.exception()
            if e is not None and st.error is None:
                st.error = e if isinstance(e, OSError) else OSError(errno.EIO, f"write failed: {e!r}")

        task.add_done_callback(done)

    async def _write_after(self, deps, h: Handle, off: int, wb: bytearray) -> None:
        if deps:
            await asyncio.wait(deps)
        if await self._write_data(h, off, memoryview(wb)):
            # That write stamped mtime and the length: unless more writes of the file are
            # pending here, nothing is left to report.
            st, me = h.state, asyncio.current_task()
            with st.tlock:
                if not st.buffered and all(t is me for t in st.inflight) and st.error is None:
                    h.wrote = False
                    st.unreported = False

    async def drain(self, h: Handle) -> None:
        """Wait until every buffered or in-flight write of the handle's file is on the
        chains; raises the first failure since the last check."""
        await self._drain(h.state, h.path)

    async def _drain(self, st: _InodeState, path) -> None:
        if st.buffered or st.inflight:
            with st.tlock:
                buffered = list(st.buffered)
            for other in buffered:
                self._issue(other)
            while st.inflight:
                await asyncio.wait(list(st.inflight))
        self._raise_deferred(st, path)

    @staticmethod
    def _raise_deferred(st: _InodeState, path) -> None:
        if st.error is not None:
            e, st.error = st.error, None
            raise _with_path(e, path)

    def flush_needed(self, h: Handle) -> bool:
        """Whether flush(h) has anything to do (callable from any thread): False lets a
        blocking caller skip the hop to the loop (e.g. close(2) of a file only read)."""
        st = h.state
        return h.closed or bool(st.buffered or st.inflight) or st.error is not None or \
            (h.session is not None and st.unreported)

    def flush_direct(self, h: Handle) -> bool:
        """flush() of an inline file whose only pending bytes are this handle's write buffer,
        from the calling thread (a blocking metadata call, no hop to the loop): True when
        done, False where that does not apply or did not work (then call flush, which
        retries; writing the same bytes again is harmless)."""
        st = h.state
        call = getattr(self._s.meta, "write_inline_now", None)
        if call is None or h.closed or h.session is None:
            return False
        with st.tlock:
            wb = h.wbuf
            if (st.inline is None or wb is None or st.inflight or st.error is not None
                    or st.buffered != {h} or h.woff + len(wb) > st.inline_max):
                return False
            data, off = bytes(wb), h.woff
        try:
            r = call(h.ino, h.session, [(off, data)], user=h.who)
        except OSError:
            return False
        if r is None or r[1] is None:
            return False
        node, inline = r
        with st.tlock:
            if h.wbuf is wb:   # (else the loop took the buffer meanwhile: it writes the same bytes)
                if len(wb) == len(data):
                    h.wbuf = None
                    st.buffered.discard(h)
                else:          # appended to meanwhile: the rest stays buffered
                    h.wbuf, h.woff = bytearray(wb[len(data):]), off + len(data)
            self._set_inline(st, inline, node.size)
            if not st.buffered and not st.inflight:
                h.wrote = False
                st.unreported = False
        self._saw(node)
        return True

    async def flush(self, h: Handle) -> None:
        """close(2) of a descriptor (FUSE flush): buffered writes out, the length reported."""
        self._check_open(h)
        await self.drain(h)
        if h.session is not None and h.state.unreported:
            await self._report(h, renew_only=False)

    async def read_many(self, reqs: Sequence[tuple[Handle, int, Any]]) -> list[int]:
        """(handle, offset, buffer) triples read at once; returns bytes read per triple."""
        plan = []
        lengths = []
        for h, offset, buf in reqs:
            self._check_open(h)
            if h.state.buffered or h.state.inflight:
                await self.drain(h)
            mv = memoryview(buf).cast("B")
            size = await self._known_size(h, offset + len(mv))
            if h.state.inline is not None and h.state.inline_size != size:
                await self._fresh_inline(h)
                size = h.state.size
            n = max(0, min(len(mv), size - offset))
            lengths.append(n)
            data = h.state.inline
            if n and data is not None:
                self._read_inline(data, offset, mv[:n])
            elif n:
                plan.append((h.ino, h.layout, offset, mv[:n]))
        if plan:
            await self._s.data.read_many(plan)
        return lengths

    # ---- whole files / convenience ---------------------------------------------------------------------
    async def read_bytes(self, path) -> bytes:
        h = await self.open_handle(path, os.O_RDONLY)
        try:
            size = await self._known_size(h, 0)
            buf = bytearray(size)
            n = await self.pread_into(h, buf, 0)
            if n < len(buf):  # (slices, never resizing buf: a view of it may still be alive)
                return bytes(memoryview(buf)[:n])
            parts: list = [buf]
            while True:  # grew meanwhile
                more = bytearray(max(size, 1 << 20))
                m = await self.pread_into(h, more, n)
                if not m:
                    break
                parts.append(memoryview(more)[:m])
                n += m
            return bytes(buf) if len(parts) == 1 else b"".join(parts)
        finally:
            await self.close_handle(h)

    async def write_bytes(self, path, data, mode: int = 0o666) -> int:
        h = await self.open_handle(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            return await self.pwrite(h, data, 0)
        finally:
            await self.close_handle(h)


async def _maybe_await(fn) -> None:
    if fn is None:
        return
    r = fn()
    if asyncio.iscoroutine(r):
        await r


def _pick_meta(routing: RoutingInfo, address: str, exclude=(), net: bool | None = None) -> str | None:
    """A metadata server from the routing info (alive ones first): its flyfs/net address
    (tcp://HOST:PORT) when it serves one, else its gRPC HOST:PORT. For a failover
    (`exclude`: targets tried; `net`: the transport in use), None when no other is left."""
    def candidates(alive_only):
        targets = [pick_meta_target(m) for m in routing.meta_nodes(alive_only=alive_only)]
        return [t for t in targets if t not in exclude and (net is None or t.startswith(NET_SCHEME) == net)]

    targets = candidates(True) or candidates(False)
    if targets:
        return random.choice(targets)
    if exclude:
        return None
    raise ConnectionError(f"flyfs: no metadata server is registered with mgmtd at {address}; "
                          f"start one with --mgmtd {address}, or pass meta='HOST:PORT' to connect()")


async def _make_data_plane(mgmtd, client_id: str, config: ClientConfig) -> chunk_io.DataPlane:
    from .storage_client import StorageClient
    storage = StorageClient(mgmtd, client_id=client_id, max_inflight=config.max_inflight)
    return chunk_io.DataPlane(storage, max_inflight=config.max_inflight)


# ---- the blocking API --------------------------------------------------------------------------------------

class FileSystem:
    """The flyfs client for ordinary (blocking) code: thread-safe, fork-safe, picklable.

    Every method runs the AsyncFileSystem operation of the same name on the
    process's client event loop (runtime.py). A forked child (DataLoader
    worker) that uses an inherited FileSystem reconnects on its first call;
    a pickled one reconnects from its address.
    """

    def __init__(self, address: str, *, meta: str | None = None, user: Caller | None = None,
                 config: ClientConfig | None = None, cluster_id: str = "", connect_now: bool = True):
        self.address = parse_address(address)
        if meta is not None and not isinstance(meta, str):
            raise TypeError("FileSystem(meta=...) takes a HOST:PORT string; use AsyncFileSystem.from_parts "
                            "for an in-process MetaService")
        self._meta = meta
        self._user = user
        self._config = config or ClientConfig()
        self._cluster_id = cluster_id
        self._rt: Runtime = get_runtime()
        self._lock = threading.Lock()
        self._base: AsyncFileSystem | None = None
        self._pid = 0
        self._root: FileSystem = self
        self._who: tuple[int, tuple[int, ...]] | None = None
        self._view: tuple[int, AsyncFileSystem] | None = None
        _LIVE.add(self)
        if connect_now:
            self._core()

    # ---- plumbing ------------------------------------------------------------------------------------
    def _core(self) -> AsyncFileSystem:
        root = self._root
        pid = os.getpid()
        base = root._base
        if base is None or root._pid != pid:
            with root._lock:
                if root._base is None or root._pid != pid:
                    root._base = root._rt.run(AsyncFileSystem.connect(
                        root.address, meta=root._meta, user=root._user, config=root._config,
                        cluster_id=root._cluster_id), root._config.op_timeout)
                    root._pid = pid
                base = root._base
        if self._who is None:
            return base
        view = self._view
        if view is None or view[0] != id(base):
            uid, gids = self._who
            view = self._view = (id(base), base.as_user(uid, gids))
        return view[1]

    def _run_core(self, name: str, *args, **kw):
        core = self._core()
        return self._rt.run(getattr(core, name)(*args, **kw), self._config.op_timeout)

    def _close_soon(self, h: Handle) -> None:
        """close_handle(h) on the loop without waiting for it (see close_needs_nothing)."""
        def done(f: concurrent.futures.Future) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.warning("closing %s: %s", _show(h.path), f.exception())
        self._rt.submit(self._core().close_handle(h)).add_done_callback(done)

    def _pread(self, h: Handle, buf, offset: int) -> int:
        """pread_into from this thread when it can (pread_direct), else on the loop."""
        core = self._core()
        n = core.pread_direct(h, buf, offset)
        return n if n is not None else self._rt.run(core.pread_into(h, buf, offset), self._config.op_timeout)

    def _run(self, coro_fn, *args):
        """Run `coro_fn(core, *args)` on the loop (several core calls in one hop)."""
        core = self._core()
        return self._rt.run(coro_fn(core, *args), self._config.op_timeout)

    def readahead(self, h: Handle) -> "chunk_io.ReadAhead | None":
        """A sequential read-ahead for an open Handle (io.ReadAhead), or None when the
        configuration turns it off. Its blocks are fetched on the client loop."""
        cfg = self._config
        if cfg.readahead <= 0 or cfg.readahead_block <= 0 or not h.readable:
            return None
        core, rt, st = self._core(), self._rt, h.state
        return chunk_io.ReadAhead(lambda off, n: rt.submit(core.read_block(h, n, off)), lambda: st.size,
                                  lambda: st.gen, block=cfg.readahead_block,
                                  depth=max(1, cfg.readahead // cfg.readahead_block),
                                  max_age=cfg.size_revalidate, timeout=cfg.op_timeout)

    def as_user(self, uid: int, gids: Sequence[int] = ()) -> "FileSystem":
        """A view of this client acting as uid/gids (gids[0] the primary group); shares connections."""
        view = object.__new__(FileSystem)
        view.__dict__.update(self.__dict__)
        view._root = self._root
        view._who = (int(uid), tuple(int(g) for g in gids))
        view._view = None
        return view

    @property
    def user(self) -> tuple[int, tuple[int, ...]]:
        who = self._core().who
        return who.uid, who.gids

    @property
    def config(self) -> ClientConfig:
        return self._config

    @property
    def meta_target(self) -> str:
        """The metadata server in use (tcp://HOST:PORT for flyfs/net, HOST:PORT for gRPC)."""
        return self._core().meta_target

    @property
    def core(self) -> AsyncFileSystem:
        """The AsyncFileSystem behind this object (run its coroutines on `loop`)."""
        return self._core()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._rt.loop

    def close(self) -> None:
        """Close open files and connections (views: nothing to do)."""
        root = self._root
        if self is not root:
            return
        with root._lock:
            base, root._base = root._base, None
            if base is not None and root._pid == os.getpid():
                try:
                    root._rt.run(base.close(), 30.0)
                except Exception as e:
                    log.warning("closing the flyfs client: %s", e)
        _LIVE.discard(root)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        who = self._who
        return (_rebuild, (self.address, self._meta, self._user, self._config, self._cluster_id, who))

    def __repr__(self) -> str:
        who = f" as uid {self._who[0]}" if self._who else ""
        return f"<flyfs.FileSystem {self.address}{who}>"

    # ---- files ---------------------------------------------------------------------------------------
    def open(self, path, mode: str = "r", buffering: int = -1, encoding: str | None = None,
             errors: str | None = None, newline: str | None = None, *, perm: int = 0o666):
        """Like the built-in open(): a BufferedReader/Writer/Random (binary) or TextIOWrapper."""
        from .file import open_file, parse_mode
        flags, binary, _, _ = parse_mode(mode)
        if binary and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        if not binary and buffering == 0:
            raise ValueError("can't have unbuffered text I/O")
        if not binary and encoding is None:
            encoding = "utf-8"

        async def go(core: AsyncFileSystem):
            h = await core.open_handle(path, flags, perm)
            if stat_mod.S_ISDIR(h.mode):
                await core.close_handle(h)
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), _show(path))
            return h

        h = self._run(go)
        buf = min(max(h.layout.chunk_size or 0, 64 << 10), self._config.buffer_size)
        return open_file(self, h, _show(path), mode, buffering, encoding, errors, newline, binary, buf)

    def read_bytes(self, path) -> bytes:
        return self._run_core("read_bytes", path)

    def write_bytes(self, path, data) -> int:
        return self._run_core("write_bytes", path, data)

    def read_text(self, path, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes(path).decode(encoding, errors)

    def write_text(self, path, text: str, encoding: str = "utf-8", errors: str = "strict") -> int:
        return self.write_bytes(path, text.encode(encoding, errors))

    @staticmethod
    def _handle(path_or_file) -> Handle | None:
        """The Handle of an open flyfs file object (its io buffer flushed first), or None for a path."""
        from .file import handle_of
        if isinstance(path_or_file, Handle):
            return path_or_file
        h = handle_of(path_or_file)
        if h is not None and h.writable and hasattr(path_or_file, "flush"):
            path_or_file.flush()  # buffered bytes first, so positions agree
        return h

    def pread(self, path_or_file, buffer, offset: int) -> int:
        """Read into `buffer` at file `offset` (a path or an open flyfs file); returns bytes read."""
        return self._on_file(path_or_file, os.O_RDONLY, "pread_into", buffer, offset)

    def pwrite(self, path_or_file, buffer, offset: int) -> int:
        """Write `buffer` at file `offset` (a path, which must exist, or an open flyfs file)."""
        return self._on_file(path_or_file, os.O_WRONLY, "pwrite", buffer, offset)

    def _on_file(self, path_or_file, flags: int, op: str, *args):
        """Run core `op`(handle, *args) on an open flyfs file, or on a path opened
        with `flags` for the call and closed after it."""
        h = self._handle(path_or_file)
        if h is not None:
            if op == "pread_into":
                return self._pread(h, *args)
            return self._run_core(op, h, *args)

        async def go(core: AsyncFileSystem):
            hh = await core.open_handle(path_or_file, flags)
            try:
                return await getattr(core, op)(hh, *args)
            finally:
                await core.close_handle(hh)

        return self._run(go)

    def batch_read(self, requests: Iterable[tuple[Any, int, int, Any]]) -> list[int]:
        """Read many (path_or_file, offset, length, buffer) at once, all pieces in flight
        together; returns bytes read per request (short at end of file). `buffer` may be
        None: then a bytearray is allocated and returned in place of the count."""
        reqs = list(requests)
        handles = [self._handle(target) for target, _, _, _ in reqs]

        async def go(core: AsyncFileSystem):
            paths = list(dict.fromkeys(fspath(t) for (t, _, _, _), h in zip(reqs, handles) if h is None))
            results = await asyncio.gather(*(core.open_handle(p, os.O_RDONLY) for p in paths),
                                           return_exceptions=True)
            opened = {p: r for p, r in zip(paths, results) if isinstance(r, Handle)}
            try:
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
                plan = []
                for (target, offset, length, buf), h in zip(reqs, handles):
                    if h is None:
                        h = opened[fspath(target)]
                    if buf is None:
                        buf = bytearray(length)
                    elif len(memoryview(buf).cast("B")) < length:
                        raise ValueError(f"batch_read: buffer of {len(memoryview(buf).cast('B'))} bytes for "
                                         f"a read of {length}")
                    plan.append((h, offset, memoryview(buf).cast("B")[:length]))
                counts = await core.read_many(plan)
            finally:
                await asyncio.gather(*(core.close_handle(h) for h in opened.values()), return_exceptions=True)
            out = []
            for (target, offset, length, buf), (_, _, mv), n in zip(reqs, plan, counts):
                out.append(n if buf is not None else bytes(mv[:n]))
            return out

        return self._run(go)

    # ---- names and attributes --------------------------------------------------------------------------
    def stat(self, path, *, follow_symlinks: bool = True) -> os.stat_result:
        from .file import handle_of
        h = handle_of(path)
        if h is not None:
            return self._run_core("stat", h)
        n = self._core().getattr_now(path, follow_symlinks)     # from this thread when it can
        if n is not None:
            return stat_result(n)
        return self._run_core("stat", path, follow_symlinks=follow_symlinks)

    def lstat(self, path) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def exists(self, path) -> bool:
        return self._run_core("exists", path)

    def isdir(self, path) -> bool:
        return self._run_core("isdir", path)

    def isfile(self, path) -> bool:
        return self._run_core("isfile", path)

    def listdir(self, path="/") -> list:
        return self._run_core("listdir", path)

    def scandir(self, path="/") -> "Iterable[DirEntryInfo]":
        entries = self._run_core("scandir", path)
        for e in entries:
            e._fs = self
        return iter(entries)

    def walk(self, top="/", topdown: bool = True):
        """Like os.walk (no error callback; symlinks to directories are not followed)."""
        top = _show(top)
        dirs, files = [], []
        for e in self.scandir(top):
            (dirs if e.is_dir(follow_symlinks=False) else files).append(e.name)
        if topdown:
            yield top, dirs, files
        for d in dirs:
            yield from self.walk(f"{top.rstrip('/')}/{d}", topdown)
        if not topdown:
            yield top, dirs, files

    def mkdir(self, path, mode: int = 0o777) -> None:
        self._run_core("mkdir", path, mode)

    def makedirs(self, path, mode: int = 0o777, exist_ok: bool = False) -> None:
        self._run_core("makedirs", path, mode, exist_ok)

    def mknod(self, path, mode: int = 0o600 | stat_mod.S_IFREG, device: int = 0) -> None:
        self._run_core("mknod", path, mode, device)

    def mkfifo(self, path, mode: int = 0o666) -> None:
        self._run_core("mkfifo", path, mode)

    def rmdir(self, path) -> None:
        self._run_core("rmdir", path)

    def remove(self, path) -> None:
        self._run_core("unlink", path)

    unlink = remove

    def rename(self, src, dst, flags: int = 0) -> None:
        self._run_core("rename", src, dst, flags)

    replace = rename

    def symlink(self, target, path) -> None:
        self._run_core("symlink", target, path)

    def readlink(self, path):
        return self._run_core("readlink", path)

    def link(self, src, dst) -> None:
        self._run_core("link", src, dst)

    def chmod(self, path, mode: int, *, follow_symlinks: bool = True) -> None:
        self._run_core("chmod", path, mode, follow_symlinks=follow_symlinks)

    def chown(self, path, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        self._run_core("chown", path, uid, gid, follow_symlinks=follow_symlinks)

    def utime(self, path, times=None, *, ns=None, follow_symlinks: bool = True) -> None:
        self._run_core("utime", path, times, ns=ns, follow_symlinks=follow_symlinks)

    def truncate(self, path, length: int) -> None:
        from .file import handle_of
        h = handle_of(path)
        if h is not None:
            if hasattr(path, "flush"):
                path.flush()
            self._run_core("truncate", h, length)
        else:
            self._run_core("truncate", path, length)

    def access(self, path, mode: int) -> bool:
        return self._run_core("access", path, mode)

    def statvfs(self, path="/") -> os.statvfs_result:
        return self._run_core("statvfs", path)

    def getxattr(self, path, name, *, follow_symlinks: bool = True) -> bytes:
        return self._run_core("getxattr", path, name, follow_symlinks=follow_symlinks)

    def setxattr(self, path, name, value: bytes, flags: int = 0, *, follow_symlinks: bool = True) -> None:
        self._run_core("setxattr", path, name, value, flags, follow_symlinks=follow_symlinks)

    def listxattr(self, path, *, follow_symlinks: bool = True) -> list[str]:
        return self._run_core("listxattr", path, follow_symlinks=follow_symlinks)

    def removexattr(self, path, name, *, follow_symlinks: bool = True) -> None:
        self._run_core("removexattr", path, name, follow_symlinks=follow_symlinks)

    def set_layout(self, path, chunk_size: int, stripe: int) -> None:
        """Chunk size and stripe for files created in directory `path` from now on."""
        self._run_core("set_layout", path, chunk_size, stripe)

    def invalidate_cache(self) -> None:
        self._core().invalidate_cache()


def _rebuild(address, meta, user, config, cluster_id, who):
    fs = FileSystem(address, meta=meta, user=user, config=config, cluster_id=cluster_id, connect_now=False)
    return fs.as_user(*who) if who else fs


def connect(address: str, *, meta: str | None = None, user: Caller | None = None,
            config: ClientConfig | None = None, **options) -> FileSystem:
    """Connect to a flyfs cluster: `address` is mgmtd's HOST:PORT (or flyfs://HOST:PORT).

    meta: a metadata server HOST:PORT, when mgmtd does not list one.
    options: ClientConfig fields (e.g. dir_cache_ttl=0).
    """
    if options:
        config = replace(config or ClientConfig(), **options)
    return FileSystem(address, meta=meta, user=user, config=config)


_LIVE: "weakref.WeakSet[FileSystem]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for fs in list(_LIVE):
        if fs._pid == os.getpid() and fs._base is not None:
            try:
                fs._rt.run(fs._base.close(), 10.0)
            except Exception as e:
                log.debug("closing %r at exit: %s", fs, e)


def _reset_locks_in_child() -> None:
    # A lock held by another parent thread at fork time stays held forever in the child.
    for fs in list(_LIVE):
        fs._lock = threading.Lock()


on_exit(_close_all_at_exit)
on_fork_child(_reset_locks_in_child)
