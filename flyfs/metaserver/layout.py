"""File layout: chunk size and stripe width per directory, chains per file.

A directory's layout (chunk size, stripe) is inherited by everything created
in it. A new file takes `stripe` consecutive chains of the current chain
table starting at a random offset (so files spread over all chains) and a
random seed; chunk i of the file lives on ``chains[(seed + i) % stripe]``.
The chain table comes from an injected provider: a callable (sync or async)
returning a ChainTable or a plain list of chain ids.
"""
from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Sequence

from .common import Ctx, load_full, maybe_await, put_dir
from .errors import check_ino, fail
from .perm import Caller, check_owner
from .schema import Inode, Layout

MIN_CHUNK = 4096
MAX_CHUNK = 1 << 30
MAX_STRIPE = 1024


@dataclass(frozen=True)
class ChainTable:
    version: int
    chains: tuple[int, ...]


def static_chain_table(chains: Sequence[int], version: int = 1):
    """A provider that always returns the same table (tests, single-node setups)."""
    table = ChainTable(version, tuple(chains))
    return lambda: table


def check_layout(chunk_size, stripe) -> None:
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
            or not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1)):
        raise fail(errno.EINVAL, f"invalid chunk size {chunk_size!r}: must be a power of two "
                                 f"from {MIN_CHUNK} to {MAX_CHUNK}")
    if not isinstance(stripe, int) or isinstance(stripe, bool) or not 1 <= stripe <= MAX_STRIPE:
        raise fail(errno.EINVAL, f"invalid stripe {stripe!r}: must be 1..{MAX_STRIPE}")


async def current_table(ctx: Ctx) -> ChainTable:
    if ctx.chain_table is None:
        raise fail(errno.ENOSPC, "no chain table: this metadata server has no storage chains "
                                 "(give MetaService a chain_table provider, or run with --mgmtd)")
    t = await maybe_await(ctx.chain_table())
    if not isinstance(t, ChainTable):
        t = ChainTable(1, tuple(t))
    if not t.chains:
        raise fail(errno.ENOSPC, "the chain table is empty: no storage chains to place chunks on")
    return t


def file_layout(dir_layout: Layout, table: ChainTable, rng: random.Random = random) -> Layout:
    """The layout of a new file in a directory with `dir_layout`."""
    n = len(table.chains)
    stripe = max(1, min(dir_layout.stripe, n))
    offset = rng.randrange(n)
    chains = tuple(table.chains[(offset + k) % n] for k in range(stripe))
    return Layout(dir_layout.chunk_size, stripe, table.version, rng.randrange(stripe), chains)


async def set_layout(ctx: Ctx, who: Caller, ino: int, chunk_size: int, stripe: int) -> Inode:
    """Set a directory's chunk size and stripe for files created in it from now on
    (and inherited by new subdirectories). Owner or root only."""
    check_ino(ino)
    check_layout(chunk_size, stripe)

    async def fn(txn):
        node = await load_full(txn, ino)
        if not node.is_dir:
            raise fail(errno.ENOTDIR, f"inode {ino} is not a directory: layouts are set on directories")
        check_owner(node, who, "set the layout")
        node = node.with_(layout=Layout(chunk_size, stripe), ctime=ctx.now())
        put_dir(txn, node)
        return node

    return await ctx.transact(fn)

