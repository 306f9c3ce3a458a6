"""Attributes: getattr, setattr (chmod, chown, truncate, utimes), access, statfs.

Truncation changes data, so it runs in three steps: a transaction that checks
everything (nothing written), StorageOps.truncate (idempotent), then the
transaction that records the new size. Data past the new length is gone
before the size says so, so an extension never exposes stale bytes.
"""
from __future__ import annotations

import errno
import stat

from . import inline
from . import schema as s
from .common import Ctx, load_full, maybe_await, put, put_dir
from .errors import (NAME_MAX, check_id, check_ino, check_perm_bits, check_size, check_time,
                     fail)
from .perm import (R_OK, W_OK, X_OK, Caller, allowed, check_access, check_owner, is_owner,
                   kill_suid)
from .schema import SESSION_ID_LEN, Inode, StatFs

NOW = "now"  # setattr(atime=NOW / mtime=NOW): the server's current time (UTIME_NOW)
BLOCK_SIZE = 4096


async def getattr(ctx: Ctx, who: Caller, ino: int) -> Inode:
    check_ino(ino)

    async def fn(txn):
        return await load_full(txn, ino)

    return await ctx.transact(fn)


async def access(ctx: Ctx, who: Caller, ino: int, mask: int) -> None:
    """access(2) on an inode: F_OK (0) or any of R_OK/W_OK/X_OK; EACCES if denied."""
    check_ino(ino)
    if not isinstance(mask, int) or mask & ~(R_OK | W_OK | X_OK):
        raise fail(errno.EINVAL, f"invalid access mask {mask!r}")

    async def fn(txn):
        node = await load_full(txn, ino)
        if mask:
            check_access(node, who, mask)

    await ctx.transact(fn)


def _check_times(t, what: str):
    if t is None or t == NOW:
        return t
    return check_time(t, what)


async def setattr(ctx: Ctx, who: Caller, ino: int, *, mode: int | None = None,
                  uid: int | None = None, gid: int | None = None, size: int | None = None,
                  atime=None, mtime=None, session: bytes | None = None) -> Inode:
    """Change attributes; None leaves one alone. Times are ns ints or NOW.

    `session` (a write session of this file, as ftruncate through an open
    descriptor) lets a size change skip the write-permission check.
    """
    check_ino(ino)
    if mode is not None:
        check_perm_bits(mode)
        if mode & ~(stat.S_IFMT(mode) | 0o7777):
            raise fail(errno.EINVAL, f"invalid mode {mode:#o}")
    if uid is not None:
        check_id(uid, "uid")
    if gid is not None:
        check_id(gid, "gid")
    if size is not None:
        check_size(size)
    atime = _check_times(atime, "atime")
    mtime = _check_times(mtime, "mtime")
    if session is not None and (not isinstance(session, bytes) or len(session) != SESSION_ID_LEN):
        raise fail(errno.EINVAL, "invalid session id")

    async def compute(txn) -> tuple[Inode, Inode]:
        node = await load_full(txn, ino)
        now = ctx.now()
        n = node
        touched = False
        if uid is not None or gid is not None:
            if not who.is_root:
                if uid is not None and (uid != n.uid or who.uid != n.uid):
                    raise fail(errno.EPERM, f"operation not permitted: only root may change the owner of inode {ino}")
                if gid is not None and (who.uid != n.uid or (gid != n.gid and not who.in_group(gid))):
                    raise fail(errno.EPERM, f"operation not permitted: uid {who.uid} may not give inode {ino} "
                                            f"to group {gid}")
            n = n.with_(uid=n.uid if uid is None else uid, gid=n.gid if gid is None else gid,
                        mode=kill_suid(n.mode))
            touched = True
        if mode is not None:
            check_owner(n, who, "change the mode")
            if stat.S_IFMT(mode) and stat.S_IFMT(mode) != n.type:
                raise fail(errno.EINVAL, f"mode {mode:#o} does not match the file type of inode {ino}")
            new = n.type | (mode & 0o7777)
            if not who.is_root and not who.in_group(n.gid):
                new &= ~stat.S_ISGID
            n = n.with_(mode=new)
            touched = True
        if size is not None:
            if n.is_dir:
                raise fail(errno.EISDIR, f"inode {ino} is a directory")
            if not n.is_reg:
                raise fail(errno.EINVAL, f"inode {ino} is not a regular file")
            if not (session and await txn.get(s.session_key(ino, session)) is not None):
                check_access(n, who, W_OK, "truncate")
            n = n.with_(size=size, mtime=now, mode=n.mode if who.is_root else kill_suid(n.mode))
            touched = True
        if atime is not None or mtime is not None:
            explicit = any(t is not None and t != NOW for t in (atime, mtime))
            if not is_owner(n, who):
                if explicit:
                    raise fail(errno.EPERM, f"operation not permitted: only the owner or root may set "
                                            f"times of inode {ino} other than now")
                if not allowed(n, who, W_OK):
                    check_access(n, who, W_OK, "set times to now")
            if atime is not None:
                n = n.with_(atime=now if atime == NOW else atime)
            if mtime is not None:
                n = n.with_(mtime=now if mtime == NOW else mtime)
            touched = True
        if touched:
            n = n.with_(ctime=now)
        return node, n

    in_kv = False   # an inline file (inline.py): its data is cut in the transaction itself
    if size is not None:
        async def dry_run(txn):  # every check, nothing written
            old, _ = await compute(txn)
            return old, old.is_reg and await inline.load(txn, ino) is not None

        old, in_kv = await ctx.transact(dry_run)
        if ctx.storage is not None and old.is_reg and not in_kv:
            await ctx.storage.truncate(ino, old.layout, size)

    async def fn(txn):
        old, new = await compute(txn)
        if size is not None and new.is_reg and await inline.trim(txn, ino, size) != in_kv:
            return None   # its data moved to chunks since the dry run: cut them first
        if new != old:
            (put_dir if new.is_dir else put)(txn, new)
        return new

    while (new := await ctx.transact(fn)) is None:
        in_kv = False
        if ctx.storage is not None:
            await ctx.storage.truncate(ino, old.layout, size)
    return new


async def truncate(ctx: Ctx, who: Caller, ino: int, length: int, session: bytes | None = None) -> Inode:
    return await setattr(ctx, who, ino, size=length, session=session)


def disk_space(targets) -> tuple[int, int]:
    """(used, free) bytes of storage targets (mgmtd TargetInfo: used_bytes, total_bytes,
    device, node_id): used summed; free counted once per disk. A node splits a disk's
    free space among its targets on it, and nodes that share a disk (one machine) each
    report all of it; a target without a device counts on its own."""
    used = 0
    per_node: dict[tuple, int] = {}
    for t in targets:
        used += t.used_bytes
        key = (t.device or f"target {t.target_id}", t.node_id)
        per_node[key] = per_node.get(key, 0) + max(0, t.total_bytes - t.used_bytes)
    per_disk: dict[str, int] = {}
    for (device, _), free in per_node.items():
        per_disk[device] = max(per_disk.get(device, 0), free)
    return used, sum(per_disk.values())


async def statfs(ctx: Ctx, who: Caller) -> StatFs:
    """Space from the injected `space` callable ((total, free[, avail]) bytes), inode
    counts from the id counter."""
    total = free = avail = 0
    if ctx.space is not None:
        got = tuple(await maybe_await(ctx.space()))
        total, free = int(got[0]), int(got[1])
        avail = int(got[2]) if len(got) > 2 else free

    async def fn(txn):
        raw = await txn.snapshot_get(s.K_NEXT_INO)
        return s.read_u64(raw) - 1 if raw else 1

    files = await ctx.transact(fn)
    return StatFs(bsize=BLOCK_SIZE, frsize=BLOCK_SIZE, blocks=total // BLOCK_SIZE,
                  bfree=free // BLOCK_SIZE, bavail=avail // BLOCK_SIZE, files=files,
                  ffree=(1 << 63) - files, namemax=NAME_MAX)
