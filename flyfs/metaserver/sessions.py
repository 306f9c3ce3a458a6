"""open/close with write sessions, and file length.

Opening a regular file for writing records a session (MS key: the writer's
client id and a deadline). The writer reports the file's length on
fsync/close and periodically (`sync`, which also renews the session). A
session past its deadline belongs to a dead writer: `expire_sessions` asks
storage for the length (StorageOps.query_last_chunk) and drops the session.
While any session holds an unlinked file (nlink 0) it stays out of the GC
queue; the last close or expiry queues it.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from . import attrs, inline, namespace
from . import schema as s
from .common import Ctx, decode, decode_dir, has_sessions, load_full, put, touch_dir
from .errors import check_ino, check_name, check_size, fail
from .layout import current_table, file_layout
from .namespace import check_create_mode, new_node
from .perm import R_OK, W_OK, Caller, check_access, check_dir_write, check_search, kill_suid
from .schema import ROOT_INO, SESSION_ID_LEN, Inode, Session

log = logging.getLogger("flyfs.meta")

O_LARGEFILE_KERNEL = 0o100000  # what the kernel (and FUSE) passes; Python's os.O_LARGEFILE is 0
FMODE_EXEC = 0o40             # FUSE passes it for execve opens
O_TMPFILE_BIT = 0o20000000
KNOWN_FLAGS = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND
               | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_ASYNC | os.O_DIRECT | os.O_DIRECTORY
               | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC | O_LARGEFILE_KERNEL | FMODE_EXEC)


@dataclass(frozen=True)
class OpenFlags:
    mask: int     # access needed: R_OK|W_OK
    write: bool   # opened for writing (a session is recorded for regular files)
    trunc: bool
    excl: bool
    directory: bool


def parse_flags(flags) -> OpenFlags:
    if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0:
        raise fail(errno.EINVAL, f"invalid open flags {flags!r}")
    if flags & O_TMPFILE_BIT:
        raise fail(errno.EOPNOTSUPP, "O_TMPFILE is not supported")
    if flags & ~KNOWN_FLAGS:
        raise fail(errno.EINVAL, f"unknown open flags {flags & ~KNOWN_FLAGS:#o}")
    acc = flags & os.O_ACCMODE
    if acc == os.O_ACCMODE:
        raise fail(errno.EINVAL, "invalid access mode O_WRONLY|O_RDWR")
    mask = {os.O_RDONLY: R_OK, os.O_WRONLY: W_OK, os.O_RDWR: R_OK | W_OK}[acc]
    trunc = bool(flags & os.O_TRUNC)
    if trunc:
        mask |= W_OK  # as Linux: O_TRUNC needs write permission even with O_RDONLY
    return OpenFlags(mask, acc != os.O_RDONLY, trunc, bool(flags & os.O_EXCL),
                     bool(flags & os.O_DIRECTORY))


def open_node(ctx: Ctx, txn, who: Caller, node: Inode, f: OpenFlags, now: int) -> bytes | None:
    """Checks of opening `node` with flags `f`; records a write session (returned) if needed."""
    if node.is_symlink:
        raise fail(errno.ELOOP, f"inode {node.ino} is a symlink")
    if f.directory and not node.is_dir:
        raise fail(errno.ENOTDIR, f"inode {node.ino} is not a directory")
    if node.is_dir and (f.write or f.trunc):
        raise fail(errno.EISDIR, f"inode {node.ino} is a directory")
    if node.nlink == 0:
        raise fail(errno.ENOENT, f"inode {node.ino} has been removed")
    check_access(node, who, f.mask, "open")
    if not (f.write and node.is_reg):
        return None
    return _new_session(ctx, txn, who, node.ino, now)


def _new_session(ctx: Ctx, txn, who: Caller, ino: int, now: int) -> bytes:
    session = os.urandom(SESSION_ID_LEN)
    deadline = now + int(ctx.config.session_ttl * 1e9)
    txn.set(s.session_key(ino, session), s.encode_session(now, deadline, who.client_id))
    return session


async def open(ctx: Ctx, who: Caller, ino: int, flags: int, path=None, base: int = ROOT_INO,
               follow: bool = True, with_inline: bool = False) -> tuple:
    """Open inode `ino`, or with `path` what the path names from directory `base` (resolved
    in the same transaction, so what is opened is what the name means now): (attributes,
    write session or None), and with `with_inline` a third item: the file's data while it
    is inline (inline.py), else None. O_TRUNC truncates to 0. A last symlink not followed: ELOOP."""
    if path is None:
        check_ino(ino)
    f = parse_flags(flags)
    if f.excl and flags & os.O_CREAT:
        raise fail(errno.EINVAL, "O_CREAT|O_EXCL on open: use create")

    async def fn(txn):
        if path is None:
            node = await load_full(txn, ino)
        else:
            node = await namespace.walk(txn, who, path, follow, base)
            if node.is_symlink:
                raise fail(errno.ELOOP, f"{path!r} is a symbolic link (not followed)")
        session = open_node(ctx, txn, who, node, f, ctx.now())
        data = await inline.load(txn, node.ino) if with_inline and node.is_reg else None
        return node, session, data

    node, session, data = await ctx.transact(fn)
    if f.trunc and node.is_reg:
        node, data = await _truncate_opened(ctx, who, node, session, data)
    return (node, session, inline.view(data, node.size)) if with_inline else (node, session)


async def _truncate_opened(ctx: Ctx, who: Caller, node: Inode, session, data):
    """O_TRUNC of an existing regular file just opened: (its attributes, its inline data) after."""
    node = await attrs.truncate(ctx, who, node.ino, 0, session=session)
    return node, (None if data is None else b"")


async def create(ctx: Ctx, who: Caller, parent: int, name, mode: int = 0o666, flags: int = os.O_RDWR,
                 umask: int = 0, with_dir: bool = False, with_inline: bool = False) -> tuple:
    """Create and open a regular file (O_CREAT; EEXIST with O_EXCL, else open the existing one):
    (attributes, write session or None), and with `with_dir` a third item: the directory's
    attributes right after a new file went in (None when the file existed); with
    `with_inline` a last item: the file's data while it is inline (inline.py), else None."""
    check_ino(parent)
    name = check_name(name, dots=errno.EEXIST)
    _, perm = check_create_mode(mode, umask, (0, stat.S_IFREG), "create")
    f = parse_flags(flags | os.O_CREAT)
    if f.directory:
        raise fail(errno.EINVAL, "O_DIRECTORY with O_CREAT")
    table = await current_table(ctx)
    ino = await ctx.alloc.allocate()

    async def fn(txn):
        p_raw, d_raw = await txn.get_many([s.inode_key(parent), s.dentry_key(parent, name)])
        p = decode_dir(parent, p_raw)
        check_search(p, who)
        now = ctx.now()
        if d_raw is not None:
            if f.excl:
                raise fail(errno.EEXIST, f"{name!r} already exists in directory {parent}")
            node = await load_full(txn, s.decode_dentry(d_raw)[0])
            if node.is_dir:
                raise fail(errno.EISDIR, f"{name!r} is a directory")
            session = open_node(ctx, txn, who, node, f, now)
            data = await inline.load(txn, node.ino) if with_inline and node.is_reg else None
            return node, session, None, data
        check_dir_write(p, who)
        node = new_node(ino, p, who, stat.S_IFREG | perm, now, layout=file_layout(p.layout, table))
        put(txn, node)
        txn.set(s.dentry_key(parent, name), s.encode_dentry(ino, stat.S_IFREG))
        touch_dir(txn, parent, now)
        data = inline.start(txn, ino) if ctx.config.inline_max else None
        # A new file: no access check on its own mode (creat(path, 0) may still write).
        return (node, _new_session(ctx, txn, who, ino, now) if f.write else None, p.with_(mtime=now, ctime=now),
                data)

    node, session, dir_after, data = await ctx.transact(fn)
    if dir_after is None and f.trunc and node.is_reg:
        node, data = await _truncate_opened(ctx, who, node, session, data)
    out = (node, session, dir_after) if with_dir else (node, session)
    return out + (inline.view(data, node.size),) if with_inline else out


def _check_session(session) -> bytes:
    if not isinstance(session, bytes) or len(session) != SESSION_ID_LEN:
        raise fail(errno.EINVAL, "invalid session id")
    return session


async def _report(ctx: Ctx, who: Caller, ino: int, session: bytes | None, length: int | None,
                  wrote: bool, closing: bool, durable: bool = False) -> Inode:
    check_ino(ino)
    if session is not None:
        _check_session(session)
    if length is not None:
        check_size(length, "length")

    async def fn(txn):
        key = s.session_key(ino, session) if session is not None else None
        vals = await txn.get_many([s.inode_key(ino)] + ([key] if key else []))
        raw_node, raw = vals[0], (vals[1] if key else None)
        node = decode(ino, raw_node)
        now = ctx.now()
        n = node
        if session is not None:
            if closing:
                if raw is not None:
                    txn.clear(key)
            elif n.nlink > 0 or raw is not None:
                # Renew; re-create a session that expired while its writer still lives.
                opened = s.decode_session(key, raw).opened if raw else now
                txn.set(key, s.encode_session(opened, now + int(ctx.config.session_ttl * 1e9),
                                              who.client_id))
        if length is not None and length > n.size:
            n = n.with_(size=length)
        if wrote:
            n = n.with_(mtime=now, ctime=now, mode=n.mode if who.is_root else kill_suid(n.mode))
        if n != node:
            put(txn, n)
        if (closing and session is not None and n.nlink == 0 and n.is_reg
                and not await has_sessions(txn, ino)):
            txn.set(s.gc_key(ino), s.encode_i64(now))
        elif closing and session is not None and n.mode == node.mode:
            # Ending a session of a linked file needs no sync of its own: if a crash
            # loses it, the session is still there, expires, and the length comes from
            # storage as for any writer that died (fsync's report stays durable).
            txn.durable = False
        if durable:
            txn.durable = True
        return n

    return await ctx.transact(fn)


async def close(ctx: Ctx, who: Caller, ino: int, session: bytes | None = None,
                length: int | None = None, wrote: bool = False) -> Inode:
    """End a write session, recording the length the writer reached (the size only grows
    here; truncation is setattr) and, if it wrote, mtime/ctime and the loss of setuid."""
    return await _report(ctx, who, ino, session, length, wrote, closing=True)


async def sync(ctx: Ctx, who: Caller, ino: int, session: bytes | None = None,
               length: int | None = None, wrote: bool = False, durable: bool = False) -> Inode:
    """fsync / periodic report: like close, but the session stays open (and is renewed).
    `durable` (fsync): answer only once the report is on disk, whatever the engine's
    default (MetaConfig.sync_commits)."""
    return await _report(ctx, who, ino, session, length, wrote, closing=False, durable=durable)


async def list_sessions(ctx: Ctx, ino: int | None = None) -> list[Session]:
    async def fn(txn):
        return [s.decode_session(k, v) async for k, v in txn.snapshot_get_range(*s.session_range(ino))]

    return await ctx.transact(fn)


async def expire_sessions(ctx: Ctx, limit: int = 64) -> int:
    """Drop sessions past their deadline (dead writers); take the length from storage.
    Returns how many were dropped."""
    now = ctx.now()

    async def scan(txn):
        out = []
        async for k, v in txn.snapshot_get_range(*s.session_range()):
            sess = s.decode_session(k, v)
            if sess.deadline < now:
                out.append(sess)
                if len(out) >= limit:
                    break
        return out

    dropped = 0
    for sess in await ctx.transact(scan):
        try:
            node = await attrs.getattr(ctx, None, sess.ino)
        except FileNotFoundError:
            node = None
        length = 0
        if node is not None and node.is_reg and ctx.storage is not None \
                and await ctx.transact(lambda txn, ino=sess.ino: inline.load(txn, ino)) is None:
            # (an inline file's size is always its writers' last word: nothing to ask storage)
            try:
                length = await ctx.storage.query_last_chunk(sess.ino, node.layout)
            except Exception as e:  # storage down: try again on the next pass
                log.warning("cannot query the length of inode %d for an expired session: %s", sess.ino, e)
                continue

        async def fn(txn, sess=sess, length=length):
            key = s.session_key(sess.ino, sess.session)
            raw = await txn.get(key)
            if raw is None or s.decode_session(key, raw).deadline >= now:
                return False  # closed or renewed meanwhile
            txn.clear(key)
            raw = await txn.get(s.inode_key(sess.ino))
            if raw is None:
                return True
            n = s.decode_inode(sess.ino, raw)
            if length > n.size:
                put(txn, n.with_(size=length))
            if n.nlink == 0 and n.is_reg and not await has_sessions(txn, sess.ino):
                txn.set(s.gc_key(sess.ino), s.encode_i64(now))
            return True

        if await ctx.transact(fn):
            dropped += 1
            log.info("expired write session of client %r on inode %d", sess.client_id, sess.ino)
    return dropped
