"""Extended attributes, kept in the KV under MX<ino><name>.

As Linux: ``user.*`` on regular files and directories with read/write
permission (sticky directories: owner only); ``trusted.*`` for root only
(others get EPERM writing, ENODATA reading, and do not see them listed);
``security.*``, ``system.*`` (ACLs) and unknown namespaces are not supported
(EOPNOTSUPP).
"""
from __future__ import annotations

import errno
import stat

from . import schema as s
from .common import Ctx, load_full, put, put_dir
from .errors import XATTR_NAME_MAX, XATTR_SIZE_MAX, as_name, check_ino, fail
from .perm import R_OK, W_OK, Caller, check_access, is_owner
from .schema import Inode

XATTR_CREATE = 1
XATTR_REPLACE = 2
_SUPPORTED = (b"user.", b"trusted.")


def check_xattr_name(name) -> bytes:
    b = as_name(name)
    if not b:
        raise fail(errno.ERANGE, "empty extended attribute name")
    if len(b) > XATTR_NAME_MAX:
        raise fail(errno.ERANGE, f"extended attribute name of {len(b)} bytes is longer than {XATTR_NAME_MAX}")
    if b"\0" in b:
        raise fail(errno.EINVAL, "extended attribute name contains NUL")
    ns = next((p for p in _SUPPORTED if b.startswith(p)), None)
    if ns is None:
        raise fail(errno.EOPNOTSUPP, f"extended attribute namespace of {b!r} is not supported "
                                     "(only user. and trusted.)")
    if len(b) == len(ns):
        raise fail(errno.EINVAL, f"extended attribute name {b!r} is empty after its namespace")
    return b


def _permit(node: Inode, who: Caller, name: bytes, write: bool) -> None:
    if name.startswith(b"trusted."):
        if not who.is_root:
            if write:
                raise fail(errno.EPERM, "only root may set trusted.* attributes")
            raise fail(errno.ENODATA, f"no attribute {name!r}")
        return
    if not (node.is_reg or node.is_dir):
        if write:
            raise fail(errno.EPERM, "user.* attributes exist only on regular files and directories")
        raise fail(errno.ENODATA, f"no attribute {name!r}")
    if write and node.is_dir and node.mode & stat.S_ISVTX and not is_owner(node, who):
        raise fail(errno.EPERM, f"directory {node.ino} is sticky: only its owner may set user.* attributes")
    check_access(node, who, W_OK if write else R_OK, "extended attributes")


async def getxattr(ctx: Ctx, who: Caller, ino: int, name) -> bytes:
    check_ino(ino)
    name = check_xattr_name(name)

    async def fn(txn):
        raw, value = await txn.get_many([s.inode_key(ino), s.xattr_key(ino, name)])
        if raw is None:
            raise fail(errno.ENOENT, f"no inode {ino}")
        _permit(s.decode_inode(ino, raw), who, name, write=False)
        if value is None:
            raise fail(errno.ENODATA, f"no attribute {name!r} on inode {ino}")
        return value

    return await ctx.transact(fn)


async def listxattr(ctx: Ctx, who: Caller, ino: int) -> list[bytes]:
    check_ino(ino)

    async def fn(txn):
        if await txn.get(s.inode_key(ino)) is None:
            raise fail(errno.ENOENT, f"no inode {ino}")
        b, e = s.xattr_range(ino)
        names = [bytes(k[len(b):]) async for k, _ in txn.snapshot_get_range(b, e)]
        return [n for n in names if who.is_root or not n.startswith(b"trusted.")]

    return await ctx.transact(fn)


async def _change(ctx: Ctx, who: Caller, ino: int, name: bytes, value: bytes | None, flags: int) -> None:
    async def fn(txn):
        node = await load_full(txn, ino)
        _permit(node, who, name, write=True)
        key = s.xattr_key(ino, name)
        exists = await txn.get(key) is not None
        if value is None:
            if not exists:
                raise fail(errno.ENODATA, f"no attribute {name!r} on inode {ino}")
            txn.clear(key)
        else:
            if flags & XATTR_CREATE and exists:
                raise fail(errno.EEXIST, f"attribute {name!r} already exists on inode {ino}")
            if flags & XATTR_REPLACE and not exists:
                raise fail(errno.ENODATA, f"no attribute {name!r} on inode {ino} to replace")
            txn.set(key, value)
        (put_dir if node.is_dir else put)(txn, node.with_(ctime=ctx.now()))

    await ctx.transact(fn)


async def setxattr(ctx: Ctx, who: Caller, ino: int, name, value: bytes, flags: int = 0) -> None:
    check_ino(ino)
    name = check_xattr_name(name)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise fail(errno.EINVAL, f"attribute value must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) > XATTR_SIZE_MAX:
        raise fail(errno.E2BIG, f"attribute value of {len(value)} bytes exceeds {XATTR_SIZE_MAX}")
    if not isinstance(flags, int) or flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == 3:
        raise fail(errno.EINVAL, f"invalid setxattr flags {flags!r}")
    await _change(ctx, who, ino, name, value, flags)


async def removexattr(ctx: Ctx, who: Caller, ino: int, name) -> None:
    check_ino(ino)
    name = check_xattr_name(name)
    await _change(ctx, who, ino, name, None, 0)
