"""readdir: paged by name, streaming, in bounded memory.

A page holds at most `limit` entries (capped by config.readdir_limit) with
names greater than the cursor; the next cursor is the last name returned.
Entries come in byte order of their names, so a directory of millions of
entries lists page by page without the server or client ever holding it
whole. "." and ".." are not listed (the FUSE layer adds them).
"""
from __future__ import annotations

import errno
from typing import AsyncIterator

from . import schema as s
from .common import Ctx, load_full, load_many_full
from .errors import NAME_MAX, as_name, check_ino, fail
from .perm import R_OK, Caller, check_access
from .schema import DirEntry


async def readdir(ctx: Ctx, who: Caller, ino: int, cursor=b"", limit: int = 0,
                  plus: bool = False) -> tuple[list[DirEntry], bytes | None]:
    """One page: (entries after `cursor`, the cursor of the next page or None at the end).
    With `plus`, each entry carries its attributes (readdirplus)."""
    check_ino(ino)
    cursor = as_name(cursor)
    if len(cursor) > NAME_MAX:
        raise fail(errno.EINVAL, f"invalid readdir cursor of {len(cursor)} bytes")
    cap = ctx.config.readdir_limit
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise fail(errno.EINVAL, f"invalid readdir limit {limit!r}")
    limit = min(limit or cap, cap)

    async def fn(txn):
        node = await load_full(txn, ino)
        if not node.is_dir:
            raise fail(errno.ENOTDIR, f"inode {ino} is not a directory")
        check_access(node, who, R_OK, "list directory")
        begin, end = s.dentry_range(ino)
        if cursor:
            begin = s.dentry_key(ino, cursor) + b"\x00"
        plen = len(s.P_DENTRY) + 8
        entries = []
        more = False
        async for k, v in txn.snapshot_get_range(begin, end, limit=limit + 1):
            if len(entries) == limit:
                more = True
                break
            child, ftype = s.decode_dentry(v)
            entries.append(DirEntry(bytes(k[plen:]), child, ftype))
        if plus and entries:
            nodes = await load_many_full(txn, [e.ino for e in entries], snapshot=True)
            entries = [DirEntry(e.name, e.ino, e.type, n) for e, n in zip(entries, nodes)]
        return entries, (entries[-1].name if more else None)

    return await ctx.transact(fn)


async def readdir_all(ctx: Ctx, who: Caller, ino: int, page: int = 0,
                      plus: bool = False) -> AsyncIterator[DirEntry]:
    """Every entry, one page at a time (each page its own transaction)."""
    cursor = b""
    while True:
        entries, cursor = await readdir(ctx, who, ino, cursor, page, plus)
        for e in entries:
            yield e
        if cursor is None:
            return
