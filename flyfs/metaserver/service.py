"""MetaService: the metadata operator — plain async methods, one per operation.

The gRPC servicer (server.py) is a thin forwarder to this class; tests and
in-process users call it directly. Every method takes the caller (uid, gids,
client id, request uuid) first and raises OSError with a POSIX errno. The
service keeps no state of its own beyond a block of reserved inode ids, so
any number of them may serve one KV namespace.

    svc = MetaService(open_engine("memory://x"), storage=FakeStorageOps(),
                      chain_table=static_chain_table([1, 2, 3]))
    await svc.format()
    d = await svc.mkdir(who, ROOT_INO, "data", 0o755)
    f, session = await svc.create(who, d.ino, "a.bin", 0o644, os.O_RDWR)
    await svc.close(who, f.ino, session, length=4096, wrote=True)
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from typing import AsyncIterator, Callable

from ..kv import Engine
from . import attrs, dirs, gc, inline, layout, namespace, sessions, xattr
from . import schema as s
from .common import Ctx, MetaConfig, put
from .errors import check_id, fail
from .perm import Caller
from .schema import ROOT_INO, DirEntry, Inode, Layout, Session, StatFs
from .storage_ops import NoStorage, StorageOps

log = logging.getLogger("flyfs.meta")


class MetaService:
    """The metadata operations of flyfs over one transactional KV engine.

    storage: StorageOps (chunk length/truncate/removal); chain_table: callable
    returning the current ChainTable (or list of chain ids); space: callable
    returning (total_bytes, free_bytes[, avail_bytes]) for statfs. Callables
    may be sync or async.
    """

    def __init__(self, engine: Engine, *, storage: StorageOps | None = None,
                 chain_table: Callable | None = None, space: Callable | None = None,
                 config: MetaConfig | None = None, clock: Callable[[], int] = time.time_ns):
        self.engine = engine
        self.config = config or MetaConfig()
        inline.check_inline_max(self.config.inline_max)
        if not self.config.sync_commits:
            # Commits acknowledged once in the OS, synced within sync_interval (or at
            # once for an fsync): as a local file system's journal does.
            engine.relax_commits(self.config.sync_interval)
        self.ctx = Ctx(engine, self.config, storage or NoStorage(), chain_table, space, clock)
        self._gc_task: asyncio.Task | None = None

    # ---- setup ---------------------------------------------------------------
    async def format(self, root_mode: int = 0o755, root_uid: int = 0, root_gid: int = 0) -> bool:
        """Create the root directory (inode 1) if missing; True if this call created it.
        Idempotent: formatting an existing namespace changes nothing."""
        if not isinstance(root_mode, int) or root_mode & ~0o7777:
            raise fail(errno.EINVAL, f"invalid root mode {root_mode!r}")
        check_id(root_uid, "uid")
        check_id(root_gid, "gid")
        cfg = self.config
        layout.check_layout(cfg.default_chunk_size, cfg.default_stripe)

        async def fn(txn):
            fmt, root, nxt = await txn.get_many([s.K_FORMAT, s.inode_key(ROOT_INO), s.K_NEXT_INO])
            if fmt is not None and s.decode_u32(fmt) != s.FORMAT_VERSION:
                raise fail(errno.EINVAL, f"this namespace has metadata format {s.decode_u32(fmt)}; "
                                         f"this server speaks {s.FORMAT_VERSION}")
            if root is not None:
                return False
            now = self.ctx.now()
            put(txn, Inode(ROOT_INO, stat.S_IFDIR | root_mode, root_uid, root_gid, 2, 0, now, now, now,
                           0, ROOT_INO, Layout(cfg.default_chunk_size, cfg.default_stripe)))
            txn.set(s.K_FORMAT, s.encode_u32(s.FORMAT_VERSION))
            if nxt is None:
                txn.set(s.K_NEXT_INO, s.u64(ROOT_INO + 1))
            return True

        created = await self.engine.transact(fn)
        if created:
            log.info("formatted a new metadata namespace (root mode %o, owner %d:%d)",
                     root_mode, root_uid, root_gid)
        return created

    ensure_root = format

    # ---- names -----------------------------------------------------------------
    async def lookup(self, who: Caller, parent: int, name) -> Inode:
        return await namespace.lookup(self.ctx, who, parent, name)

    async def create(self, who: Caller, parent: int, name, mode: int = 0o666, flags: int = os.O_RDWR,
                     umask: int = 0, with_dir: bool = False, with_inline: bool = False) -> tuple:
        """Create (and open) a regular file; returns (attributes, write session or None), and
        with `with_dir` the directory's attributes after a new file went in (else None), with
        `with_inline` last the file's data while it is inline (else None)."""
        return await sessions.create(self.ctx, who, parent, name, mode, flags, umask, with_dir, with_inline)

    # with_dir (mkdir, mknod, symlink): (the new inode, its directory's attributes right after)
    async def mkdir(self, who: Caller, parent: int, name, mode: int = 0o777, umask: int = 0,
                    with_dir: bool = False):
        return await namespace.mkdir(self.ctx, who, parent, name, mode, umask, with_dir)

    async def mknod(self, who: Caller, parent: int, name, mode: int, rdev: int = 0,
                    umask: int = 0, with_dir: bool = False):
        return await namespace.mknod(self.ctx, who, parent, name, mode, rdev, umask, with_dir)

    async def symlink(self, who: Caller, parent: int, name, target, with_dir: bool = False):
        return await namespace.symlink(self.ctx, who, parent, name, target, with_dir)

    async def readlink(self, who: Caller, ino: int) -> bytes:
        return await namespace.readlink(self.ctx, who, ino)

    async def link(self, who: Caller, ino: int, new_parent: int, new_name) -> Inode:
        return await namespace.link(self.ctx, who, ino, new_parent, new_name)

    async def unlink(self, who: Caller, parent: int, name) -> Inode | None:
        """Remove a non-directory; idempotent for a retried request uuid. Returns the
        directory's attributes right after (None for such a retry)."""
        return await namespace.unlink(self.ctx, who, parent, name)

    async def rmdir(self, who: Caller, parent: int, name) -> Inode | None:
        """Remove an empty directory; idempotent for a retried request uuid. Returns the
        parent's attributes right after (None for such a retry)."""
        return await namespace.rmdir(self.ctx, who, parent, name)

    async def rename(self, who: Caller, old_parent: int, old_name, new_parent: int, new_name,
                     flags: int = 0) -> tuple[Inode | None, Inode | None]:
        """renameat2 (flags RENAME_NOREPLACE=1, RENAME_EXCHANGE=2); idempotent for a retried uuid.
        Returns the source and (across directories) destination directories' attributes right
        after ((None, None) for a retry, or when nothing changed)."""
        return await namespace.rename(self.ctx, who, old_parent, old_name, new_parent, new_name, flags)

    async def resolve(self, who: Caller, path, follow: bool = True, base: int = ROOT_INO) -> Inode:
        return await namespace.resolve(self.ctx, who, path, follow, base)

    async def resolve_parent(self, who: Caller, path, base: int = ROOT_INO) -> tuple[Inode, bytes]:
        return await namespace.resolve_parent(self.ctx, who, path, base)

    # ---- attributes ---------------------------------------------------------------
    async def getattr(self, who: Caller, ino: int) -> Inode:
        return await attrs.getattr(self.ctx, who, ino)

    async def setattr(self, who: Caller, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime=None, mtime=None,
                      session: bytes | None = None) -> Inode:
        """chmod/chown/truncate/utimens in one call; times are ns ints or attrs.NOW."""
        return await attrs.setattr(self.ctx, who, ino, mode=mode, uid=uid, gid=gid, size=size,
                                   atime=atime, mtime=mtime, session=session)

    async def truncate(self, who: Caller, ino: int, length: int, session: bytes | None = None) -> Inode:
        return await attrs.truncate(self.ctx, who, ino, length, session)

    async def access(self, who: Caller, ino: int, mask: int) -> None:
        return await attrs.access(self.ctx, who, ino, mask)

    async def statfs(self, who: Caller) -> StatFs:
        return await attrs.statfs(self.ctx, who)

    async def set_layout(self, who: Caller, ino: int, chunk_size: int, stripe: int) -> Inode:
        return await layout.set_layout(self.ctx, who, ino, chunk_size, stripe)

    # ---- directories ------------------------------------------------------------------
    async def readdir(self, who: Caller, ino: int, cursor=b"", limit: int = 0,
                      plus: bool = False) -> tuple[list[DirEntry], bytes | None]:
        return await dirs.readdir(self.ctx, who, ino, cursor, limit, plus)

    def readdir_all(self, who: Caller, ino: int, page: int = 0, plus: bool = False) -> AsyncIterator[DirEntry]:
        return dirs.readdir_all(self.ctx, who, ino, page, plus)

    # ---- extended attributes ------------------------------------------------------------
    async def getxattr(self, who: Caller, ino: int, name) -> bytes:
        return await xattr.getxattr(self.ctx, who, ino, name)

    async def setxattr(self, who: Caller, ino: int, name, value: bytes, flags: int = 0) -> None:
        return await xattr.setxattr(self.ctx, who, ino, name, value, flags)

    async def listxattr(self, who: Caller, ino: int) -> list[bytes]:
        return await xattr.listxattr(self.ctx, who, ino)

    async def removexattr(self, who: Caller, ino: int, name) -> None:
        return await xattr.removexattr(self.ctx, who, ino, name)

    # ---- files: open/close, sessions, length -------------------------------------------------
    # with_inline (open, open_path): a third item, the file's data while it is inline, else None
    async def open(self, who: Caller, ino: int, flags: int, with_inline: bool = False) -> tuple:
        return await sessions.open(self.ctx, who, ino, flags, with_inline=with_inline)

    async def open_path(self, who: Caller, path, flags: int, base: int = ROOT_INO,
                        follow: bool = True, with_inline: bool = False) -> tuple:
        """open() of what `path` names now: resolved and opened in one transaction."""
        return await sessions.open(self.ctx, who, 0, flags, path=path, base=base, follow=follow,
                                   with_inline=with_inline)

    # ---- small files' data in the KV (inline.py) --------------------------------------------
    async def read_inline(self, who: Caller, ino: int) -> tuple[Inode, bytes | None]:
        """(attributes, the file's data while it is inline, else None)."""
        return await inline.read(self.ctx, who, ino)

    async def write_inline(self, who: Caller, ino: int, session: bytes, writes, *,
                           durable: bool = False) -> tuple[Inode, bytes | None]:
        """Apply (offset, bytes) writes to an inline file: (attributes, its data), or data
        None: not inline (any more), nothing written, write to chunks."""
        return await inline.write(self.ctx, who, ino, session, writes, durable=durable)

    async def spill(self, who: Caller, ino: int) -> Inode:
        """Move an inline file's data to chunks (before chunk writes); its attributes."""
        return await inline.spill(self.ctx, who, ino)

    async def close(self, who: Caller, ino: int, session: bytes | None = None,
                    length: int | None = None, wrote: bool = False) -> Inode:
        return await sessions.close(self.ctx, who, ino, session, length, wrote)

    async def sync(self, who: Caller, ino: int, session: bytes | None = None,
                   length: int | None = None, wrote: bool = False, durable: bool = False) -> Inode:
        return await sessions.sync(self.ctx, who, ino, session, length, wrote, durable)

    async def list_sessions(self, ino: int | None = None) -> list[Session]:
        return await sessions.list_sessions(self.ctx, ino)

    # ---- garbage collection ----------------------------------------------------------------
    async def run_gc_once(self, after: bytes | None = None) -> gc.GcReport:
        return await gc.run_gc_once(self.ctx, after)

    async def gc_queue(self) -> list[int]:
        async def fn(txn):
            return [s.ino_of(k) async for k, _ in txn.snapshot_get_range(s.P_GC, s.prefix_end(s.P_GC))]
        return await self.engine.transact(fn)

    def start_gc(self, interval: float | None = None) -> asyncio.Task:
        """Run GC passes in the background every `interval` seconds (config.gc_interval)."""
        if self._gc_task is None or self._gc_task.done():
            self._gc_task = asyncio.ensure_future(self._gc_loop(interval or self.config.gc_interval))
        return self._gc_task

    async def _gc_loop(self, interval: float) -> None:
        resume = None
        while True:
            try:
                report = await self.run_gc_once(resume)
                if not report.idle:
                    log.info("GC: %s", report)
                # More is queued past this batch: go on at once (past entries that
                # failed, retried next round) until the queue is through, then rest.
                resume = report.resume
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("GC pass failed; retrying in %.1f s", interval)
                resume = None
            await asyncio.sleep(interval if resume is None else 0)

    async def stop(self) -> None:
        """Stop background work (the engine stays open: its owner closes it)."""
        task, self._gc_task = self._gc_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
