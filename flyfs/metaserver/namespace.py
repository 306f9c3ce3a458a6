"""Names: lookup, create, mkdir, mknod, symlink, link, unlink, rmdir, rename, readlink,
and the path resolver. Each operation is one serializable transaction.

Entry changes read the parent inode (existence, permissions) and write the
parent's MT stamp blindly, so many clients can create in one directory without
conflicting; only link-count changes (subdirectories come and go) write the
parent inode itself.
"""
from __future__ import annotations

import errno
import os
import stat

from . import schema as s
from .common import (OP_RENAME, OP_RMDIR, OP_UNLINK, Ctx, decode, decode_dir, get_unless_done,
                     drop_link, has_entries, load, load_full, load_many_full, put, put_dir,
                     record_done, remove_inode, touch_dir)
from .errors import (PATH_MAX, U32_MAX, as_name, check_ino, check_lookup_name, check_name,
                     check_perm_bits, check_symlink_target, check_umask, fail)
from .layout import current_table, file_layout
from .perm import (W_OK, Caller, allowed, check_access, check_dir_write, check_search,
                   check_sticky, new_owner)
from .schema import ROOT_INO, Inode, Layout

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
MAX_SYMLINKS = 40
MAX_DEPTH = PATH_MAX  # a directory chain cannot be deeper than the longest path


# ---- lookup --------------------------------------------------------------------

async def lookup(ctx: Ctx, who: Caller, parent: int, name) -> Inode:
    """The inode named `name` in directory `parent` (search permission on `parent`)."""
    check_ino(parent)
    name = check_lookup_name(name)

    async def fn(txn):
        return await _lookup(txn, who, parent, name)

    return await ctx.transact(fn)


async def _lookup(txn, who: Caller, parent: int, name: bytes) -> Inode:
    if name == b".":
        p = await load_full(txn, parent)
        check_search(p, who)
        return p
    if name == b"..":
        p = await load(txn, parent)
        check_search(p, who)
        return await load_full(txn, p.parent or ROOT_INO)
    p_raw, d_raw = await txn.get_many([s.inode_key(parent), s.dentry_key(parent, name)])
    p = decode(parent, p_raw)
    check_search(p, who)
    if d_raw is None:
        raise fail(errno.ENOENT, f"no entry {name!r} in directory {parent}")
    ino, _ = s.decode_dentry(d_raw)
    return await load_full(txn, ino)


# ---- creating entries -------------------------------------------------------------

async def _parent_and_entry(txn, who: Caller, parent: int, name: bytes) -> tuple[Inode, bytes | None]:
    """The parent directory (checked for write+search) and the raw entry `name`, if any."""
    p_raw, d_raw = await txn.get_many([s.inode_key(parent), s.dentry_key(parent, name)])
    p = decode_dir(parent, p_raw)
    check_search(p, who)
    if d_raw is not None:
        raise fail(errno.EEXIST, f"{name!r} already exists in directory {parent}")
    check_dir_write(p, who)
    return p, d_raw


def new_node(ino: int, parent: Inode, who: Caller, mode: int, now: int, *, layout: Layout,
              nlink: int = 1, rdev: int = 0, target: bytes = b"", size: int = 0,
              dir_parent: int = 0) -> Inode:
    uid, gid, mode = new_owner(parent, who, mode)
    return Inode(ino, mode, uid, gid, nlink, size, now, now, now, rdev, dir_parent, layout, target)


async def make_node(ctx: Ctx, who: Caller, parent: int, name: bytes, mode: int, *, rdev: int = 0,
                    target: bytes = b"", with_dir: bool = False):
    """Create a non-directory entry (regular, fifo, socket, device, symlink); with `with_dir`,
    (its attributes, the directory's right after)."""
    ftype = stat.S_IFMT(mode)
    table = await current_table(ctx) if ftype == stat.S_IFREG else None
    ino = await ctx.alloc.allocate()

    async def fn(txn):
        p, _ = await _parent_and_entry(txn, who, parent, name)
        now = ctx.now()
        layout = file_layout(p.layout, table) if table else Layout(0, 0)
        node = new_node(ino, p, who, mode, now, layout=layout, rdev=rdev, target=target,
                         size=len(target))
        put(txn, node)
        txn.set(s.dentry_key(parent, name), s.encode_dentry(ino, ftype))
        touch_dir(txn, parent, now)
        return node, p.with_(mtime=now, ctime=now)

    node, dir_after = await ctx.transact(fn)
    return (node, dir_after) if with_dir else node


def check_create_mode(mode, umask, allowed_types: tuple[int, ...], what: str) -> tuple[int, int]:
    check_perm_bits(mode)
    check_umask(umask)
    ftype = stat.S_IFMT(mode)
    if mode & ~(stat.S_IFMT(mode) | 0o7777):
        raise fail(errno.EINVAL, f"invalid mode {mode:#o} for {what}")
    if ftype not in allowed_types:
        raise fail(errno.EINVAL, f"invalid file type in mode {mode:#o} for {what}")
    return ftype, mode & 0o7777 & ~umask


async def mkdir(ctx: Ctx, who: Caller, parent: int, name, mode: int = 0o777, umask: int = 0,
                with_dir: bool = False):
    """Create a directory; it inherits the parent's layout (and group, if the parent is setgid).
    With `with_dir`: (its attributes, the parent's right after)."""
    check_ino(parent)
    name = check_name(name, dots=errno.EEXIST)
    _, perm = check_create_mode(mode, umask, (0, stat.S_IFDIR), "mkdir")
    perm &= 0o1777  # setuid/setgid of mkdir's mode are ignored; setgid comes from the parent
    ino = await ctx.alloc.allocate()

    async def fn(txn):
        p, _ = await _parent_and_entry(txn, who, parent, name)
        if p.nlink >= U32_MAX - 1:
            raise fail(errno.EMLINK, f"directory {parent} has too many subdirectories")
        now = ctx.now()
        node = new_node(ino, p, who, stat.S_IFDIR | perm, now,
                         layout=Layout(p.layout.chunk_size, p.layout.stripe), nlink=2, dir_parent=parent)
        put(txn, node)
        txn.set(s.dentry_key(parent, name), s.encode_dentry(ino, stat.S_IFDIR))
        p = p.with_(nlink=p.nlink + 1, mtime=now, ctime=now)
        put_dir(txn, p)
        return node, p

    node, dir_after = await ctx.transact(fn)
    return (node, dir_after) if with_dir else node


async def mknod(ctx: Ctx, who: Caller, parent: int, name, mode: int, rdev: int = 0,
                umask: int = 0, with_dir: bool = False):
    """Create a regular file, FIFO, socket or device node (devices: root only)."""
    check_ino(parent)
    name = check_name(name, dots=errno.EEXIST)
    check_perm_bits(mode)
    ftype = stat.S_IFMT(mode)
    if ftype == stat.S_IFDIR:
        raise fail(errno.EPERM, "mknod cannot create directories: use mkdir")
    ftype, perm = check_create_mode(mode, umask, (0, stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK,
                                                   stat.S_IFCHR, stat.S_IFBLK), "mknod")
    ftype = ftype or stat.S_IFREG
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        if not who.is_root:
            raise fail(errno.EPERM, "only root may create device nodes")
        if not isinstance(rdev, int) or isinstance(rdev, bool) or not 0 <= rdev < (1 << 64):
            raise fail(errno.EINVAL, f"invalid device number {rdev!r}")
    else:
        rdev = 0
    return await make_node(ctx, who, parent, name, ftype | perm, rdev=rdev, with_dir=with_dir)


async def symlink(ctx: Ctx, who: Caller, parent: int, name, target, with_dir: bool = False):
    check_ino(parent)
    name = check_name(name, dots=errno.EEXIST)
    target = check_symlink_target(target)
    return await make_node(ctx, who, parent, name, stat.S_IFLNK | 0o777, target=target, with_dir=with_dir)


async def readlink(ctx: Ctx, who: Caller, ino: int) -> bytes:
    check_ino(ino)

    async def fn(txn):
        node = await load(txn, ino)
        if not node.is_symlink:
            raise fail(errno.EINVAL, f"inode {ino} is not a symlink")
        return node.target

    return await ctx.transact(fn)


async def link(ctx: Ctx, who: Caller, ino: int, new_parent: int, new_name) -> Inode:
    """A new hard link to a non-directory."""
    check_ino(ino)
    check_ino(new_parent)
    new_name = check_name(new_name, dots=errno.EEXIST)

    async def fn(txn):
        raw, p_raw, d_raw = await txn.get_many([s.inode_key(ino), s.inode_key(new_parent),
                                                s.dentry_key(new_parent, new_name)])
        node = decode(ino, raw)
        p = decode_dir(new_parent, p_raw)
        check_search(p, who)
        if d_raw is not None:
            raise fail(errno.EEXIST, f"{new_name!r} already exists in directory {new_parent}")
        check_dir_write(p, who)
        if node.is_dir:
            raise fail(errno.EPERM, f"inode {ino} is a directory: no hard links to directories")
        if node.nlink == 0:
            raise fail(errno.ENOENT, f"inode {ino} has been removed")
        if node.nlink >= ctx.config.link_max:
            raise fail(errno.EMLINK, f"inode {ino} already has {node.nlink} links (the maximum)")
        now = ctx.now()
        node = node.with_(nlink=node.nlink + 1, ctime=now)
        put(txn, node)
        txn.set(s.dentry_key(new_parent, new_name), s.encode_dentry(ino, node.type))
        touch_dir(txn, new_parent, now)
        return node

    return await ctx.transact(fn)


# ---- removing entries -------------------------------------------------------------

async def unlink(ctx: Ctx, who: Caller, parent: int, name) -> Inode | None:
    """Remove a non-directory entry; the last link of a file sends it to GC. Returns the
    directory's attributes right after (None for a retry of a request already done)."""
    check_ino(parent)
    name = check_name(name, dots=errno.EISDIR)

    async def fn(txn):
        got = await get_unless_done(txn, who, OP_UNLINK, [s.inode_key(parent), s.dentry_key(parent, name)])
        if got is None:
            return
        p_raw, d_raw = got
        p = decode_dir(parent, p_raw)
        check_search(p, who)
        if d_raw is None:
            raise fail(errno.ENOENT, f"no entry {name!r} in directory {parent}")
        check_dir_write(p, who)
        ino, ftype = s.decode_dentry(d_raw)
        if ftype == stat.S_IFDIR:
            raise fail(errno.EISDIR, f"{name!r} is a directory: use rmdir")
        node = await load(txn, ino)
        check_sticky(p, node, who)
        now = ctx.now()
        txn.clear(s.dentry_key(parent, name))
        touch_dir(txn, parent, now)
        await drop_link(txn, node, now)
        record_done(txn, who, OP_UNLINK, now)
        return p.with_(mtime=now, ctime=now)

    return await ctx.transact(fn)


async def rmdir(ctx: Ctx, who: Caller, parent: int, name) -> Inode | None:
    """Remove an empty directory. Returns the parent's attributes right after (None for a
    retry of a request already done)."""
    check_ino(parent)
    b = as_name(name)
    if b == b".":
        raise fail(errno.EINVAL, "cannot remove '.'")
    if b == b"..":
        raise fail(errno.ENOTEMPTY, "cannot remove '..'")
    b = check_name(b)

    async def fn(txn):
        got = await get_unless_done(txn, who, OP_RMDIR, [s.inode_key(parent), s.dentry_key(parent, b)])
        if got is None:
            return
        p_raw, d_raw = got
        p = decode_dir(parent, p_raw)
        check_search(p, who)
        if d_raw is None:
            raise fail(errno.ENOENT, f"no entry {b!r} in directory {parent}")
        check_dir_write(p, who)
        ino, ftype = s.decode_dentry(d_raw)
        if ftype != stat.S_IFDIR:
            raise fail(errno.ENOTDIR, f"{b!r} is not a directory")
        node = await load(txn, ino)
        check_sticky(p, node, who)
        if await has_entries(txn, ino):
            raise fail(errno.ENOTEMPTY, f"directory {b!r} is not empty")
        now = ctx.now()
        txn.clear(s.dentry_key(parent, b))
        await remove_inode(txn, ino)
        p = p.with_(nlink=max(p.nlink - 1, 2), mtime=now, ctime=now)
        put_dir(txn, p)
        record_done(txn, who, OP_RMDIR, now)
        return p

    return await ctx.transact(fn)


# ---- rename ----------------------------------------------------------------------

async def _is_within(txn, ancestor: int, ino: int) -> bool:
    """Whether directory `ino` is `ancestor` or lies below it.

    Only directory moves across parents change ancestry, and every such move
    reads and bumps MCdirmove, so they are serialized against each other and
    the walk up the parent pointers may use snapshot reads (no conflict on
    every ancestor, and no etcd compare for each).
    """
    cur = ino
    for _ in range(MAX_DEPTH):
        if cur == ancestor:
            return True
        if cur == ROOT_INO:
            return False
        raw = await txn.snapshot_get(s.inode_key(cur))
        if raw is None:
            return False
        cur = s.decode_inode(cur, raw).parent or ROOT_INO
    raise fail(errno.ELOOP, f"directory {ino} is deeper than {MAX_DEPTH} levels")


async def _serialize_dir_moves(txn) -> None:
    raw = await txn.get(s.K_DIRMOVE)
    txn.set(s.K_DIRMOVE, s.u64((s.read_u64(raw) if raw else 0) + 1))


async def rename(ctx: Ctx, who: Caller, old_parent: int, old_name, new_parent: int, new_name,
                 flags: int = 0) -> tuple[Inode | None, Inode | None]:
    """rename(2)/renameat2: replace a file or an empty directory, across directories,
    RENAME_NOREPLACE and RENAME_EXCHANGE; never a directory into itself. Returns the
    attributes of the source directory and (across directories) of the destination
    directory right after ((None, None) when nothing changed, or for a retry of a request
    already done)."""
    check_ino(old_parent)
    check_ino(new_parent)
    old_name = check_name(old_name, dots=errno.EBUSY)
    new_name = check_name(new_name, dots=errno.EBUSY)
    if not isinstance(flags, int) or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
        raise fail(errno.EINVAL, f"invalid rename flags {flags!r}")
    if flags & RENAME_WHITEOUT:
        raise fail(errno.EINVAL, "RENAME_WHITEOUT is not supported")
    if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
        raise fail(errno.EINVAL, "RENAME_NOREPLACE and RENAME_EXCHANGE exclude each other")
    exchange = bool(flags & RENAME_EXCHANGE)
    cross = old_parent != new_parent

    async def fn(txn):
        raws = await get_unless_done(txn, who, OP_RENAME, [
            s.inode_key(old_parent), s.inode_key(new_parent),
            s.dentry_key(old_parent, old_name), s.dentry_key(new_parent, new_name)])
        if raws is None:
            return None, None
        op = decode_dir(old_parent, raws[0])
        np = decode_dir(new_parent, raws[1]) if cross else op
        check_search(op, who)
        check_search(np, who)
        if raws[2] is None:
            raise fail(errno.ENOENT, f"no entry {old_name!r} in directory {old_parent}")
        if exchange and raws[3] is None:
            raise fail(errno.ENOENT, f"no entry {new_name!r} in directory {new_parent} to exchange with")
        check_dir_write(op, who)
        check_dir_write(np, who)
        src_ino, src_type = s.decode_dentry(raws[2])
        dst = s.decode_dentry(raws[3]) if raws[3] is not None else None
        if dst is not None and flags & RENAME_NOREPLACE:
            raise fail(errno.EEXIST, f"{new_name!r} already exists in directory {new_parent}")
        now = ctx.now()
        if dst is not None and dst[0] == src_ino:
            record_done(txn, who, OP_RENAME, now)  # same inode: POSIX says do nothing
            return None, None
        inos = [src_ino] + ([dst[0]] if dst else [])
        nodes = await load_many_full(txn, inos)
        src = nodes[0]
        dst_node = nodes[1] if dst else None
        if src is None or (dst and dst_node is None):
            raise fail(errno.ENOENT, "entry points at a missing inode")
        check_sticky(op, src, who)
        if dst_node is not None:
            check_sticky(np, dst_node, who)
        src_dir = src.is_dir
        dst_dir = dst_node is not None and dst_node.is_dir
        if dst_node is not None and not exchange:
            if src_dir and not dst_dir:
                raise fail(errno.ENOTDIR, f"cannot replace non-directory {new_name!r} with a directory")
            if not src_dir and dst_dir:
                raise fail(errno.EISDIR, f"cannot replace directory {new_name!r} with a non-directory")
            if dst_dir and await has_entries(txn, dst_node.ino):
                raise fail(errno.ENOTEMPTY, f"directory {new_name!r} is not empty")
        moves_src = src_dir and cross
        moves_dst = exchange and dst_dir and cross
        if moves_src and not allowed(src, who, W_OK):
            check_access(src, who, W_OK, "move a directory to another parent")
        if moves_dst and not allowed(dst_node, who, W_OK):
            check_access(dst_node, who, W_OK, "move a directory to another parent")
        if moves_src or moves_dst:
            await _serialize_dir_moves(txn)
            if moves_src and await _is_within(txn, src_ino, new_parent):
                raise fail(errno.EINVAL, f"cannot move directory {src_ino} into itself or a descendant")
            if moves_dst and await _is_within(txn, dst_node.ino, old_parent):
                raise fail(errno.EINVAL, f"cannot move directory {dst_node.ino} into itself or a descendant")

        parents = {old_parent: op, new_parent: np}
        nlink_delta = {old_parent: 0, new_parent: 0}
        if exchange:
            txn.set(s.dentry_key(old_parent, old_name), s.encode_dentry(dst_node.ino, dst_node.type))
            txn.set(s.dentry_key(new_parent, new_name), s.encode_dentry(src_ino, src.type))
            if moves_src:
                src = src.with_(parent=new_parent)
                nlink_delta[old_parent] -= 1
                nlink_delta[new_parent] += 1
            if moves_dst:
                dst_node = dst_node.with_(parent=old_parent)
                nlink_delta[new_parent] -= 1
                nlink_delta[old_parent] += 1
            _put_any(txn, dst_node.with_(ctime=now))
        else:
            if dst_node is not None:
                if dst_dir:
                    await remove_inode(txn, dst_node.ino)
                    nlink_delta[new_parent] -= 1
                else:
                    await drop_link(txn, dst_node, now)
            txn.clear(s.dentry_key(old_parent, old_name))
            txn.set(s.dentry_key(new_parent, new_name), s.encode_dentry(src_ino, src.type))
            if moves_src:
                src = src.with_(parent=new_parent)
                nlink_delta[old_parent] -= 1
                nlink_delta[new_parent] += 1
        _put_any(txn, src.with_(ctime=now))
        after = {}
        for ino, node in parents.items():
            if nlink_delta[ino]:
                after[ino] = node.with_(nlink=max(node.nlink + nlink_delta[ino], 2), mtime=now, ctime=now)
                put_dir(txn, after[ino])
            else:
                after[ino] = node.with_(mtime=now, ctime=now)
                touch_dir(txn, ino, now)
        record_done(txn, who, OP_RENAME, now)
        return after[old_parent], after[new_parent] if cross else None

    return await ctx.transact(fn)


def _put_any(txn, node: Inode) -> None:
    (put_dir if node.is_dir else put)(txn, node)


# ---- path resolution ------------------------------------------------------------

def _split(path: bytes) -> list[bytes]:
    return [c for c in path.split(b"/") if c]


async def resolve(ctx: Ctx, who: Caller, path, follow: bool = True, base: int = ROOT_INO) -> Inode:
    """The inode at `path` (absolute, or relative to directory `base`), with search
    permission checked on every directory walked; symlinks in the middle are
    always followed, the last one only with `follow`; ELOOP after 40 symlinks."""
    path = _check_path(path)
    check_ino(base)

    async def fn(txn):
        return await _walk(txn, who, path, follow, base)

    return await ctx.transact(fn)


async def walk(txn, who: Caller, path, follow: bool = True, base: int = ROOT_INO) -> Inode:
    """`resolve` inside a transaction of the caller's (checks the path and base first)."""
    path = _check_path(path)
    check_ino(base)
    return await _walk(txn, who, path, follow, base)


async def resolve_parent(ctx: Ctx, who: Caller, path, base: int = ROOT_INO) -> tuple[Inode, bytes]:
    """(directory, last name) for creating or removing `path`: every component but the
    last is resolved (symlinks followed); the last is returned unchecked."""
    path = _check_path(path)
    check_ino(base)
    parts = _split(path)
    if not parts:
        raise fail(errno.EBUSY if path.startswith(b"/") else errno.ENOENT, f"{path!r} has no last component")
    head = b"/".join(parts[:-1])
    if path.startswith(b"/"):
        head = b"/" + head

    async def fn(txn):
        d = await _walk(txn, who, head or b".", True, base)
        if not d.is_dir:
            raise fail(errno.ENOTDIR, f"{head!r} is not a directory")
        return d, parts[-1]

    return await ctx.transact(fn)


def _check_path(path) -> bytes:
    if isinstance(path, str):
        path = os.fsencode(path)
    if not isinstance(path, (bytes, bytearray)):
        raise fail(errno.EINVAL, f"a path must be str or bytes, got {type(path).__name__}")
    path = bytes(path)
    if not path:
        raise fail(errno.ENOENT, "empty path")
    if b"\0" in path:
        raise fail(errno.EINVAL, "path contains NUL")
    if len(path) >= PATH_MAX:
        raise fail(errno.ENAMETOOLONG, f"path of {len(path)} bytes is too long (PATH_MAX {PATH_MAX})")
    for c in _split(path):
        if len(c) > 255:
            raise fail(errno.ENAMETOOLONG, f"path component of {len(c)} bytes is longer than 255")
    return path


async def _walk(txn, who: Caller, path: bytes, follow: bool, base: int) -> Inode:
    start = ROOT_INO if path.startswith(b"/") else base
    try:
        cur = await load_full(txn, start)
    except OSError as e:
        if e.errno == errno.ENOENT and start != ROOT_INO:
            # A base directory that no longer exists is a stale handle (a client's cached
            # directory another client removed), not a missing name: the client resolves afresh.
            raise fail(errno.ESTALE, f"base directory {start} no longer exists") from None
        raise
    todo = list(reversed(_split(path)))  # a stack: symlink targets are pushed in front
    must_be_dir = path.endswith(b"/")
    links = 0
    while todo:
        comp = todo.pop()
        last = not todo
        check_search(cur, who)
        if comp == b".":
            continue
        if comp == b"..":
            cur = await load_full(txn, cur.parent or ROOT_INO)
            continue
        raw = await txn.get(s.dentry_key(cur.ino, comp))
        if raw is None:
            raise fail(errno.ENOENT, f"no entry {comp!r} in directory {cur.ino}")
        child = await load_full(txn, s.decode_dentry(raw)[0])
        if child.is_symlink and (not last or follow or must_be_dir):
            links += 1
            if links > MAX_SYMLINKS:
                raise fail(errno.ELOOP, f"too many levels of symbolic links resolving {path!r}")
            target = child.target
            todo.extend(reversed(_split(target)))
            if target.startswith(b"/"):
                cur = await load_full(txn, ROOT_INO)
            continue  # relative targets resolve from the directory holding the link
        cur = child
    if must_be_dir and not cur.is_dir:
        raise fail(errno.ENOTDIR, f"{path!r} is not a directory")
    return cur
