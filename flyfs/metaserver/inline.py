"""Small files' data held in the KV (MF keys) instead of in chunks.

A regular file created while ``MetaConfig.inline_max`` is set starts inline
(an empty MF value, see schema.py "INLINE"). Its bytes are then the stored
data followed by zeros up to the inode's size: a create, a write of up to
``inline_max`` bytes and a close are three metadata calls and no chunk write
(the chain write is most of a small file's cost), and an open returns the
bytes with the attributes. As Lustre's data-on-MDT and CephFS's inline data.

- ``write``: writes that end within ``inline_max`` are applied to the data in
  the transaction that stamps mtime/ctime and the size (and renews the write
  session), so a writer needs no separate length report.
- ``spill``: before any chunk write (a write that ends beyond ``inline_max``,
  or a file that was never inline) the data moves to chunk 0. The metadata
  server does it: it takes the spill lease in the MF value, writes the data
  and cuts chunk 0 to its length (a spill that died earlier may have written
  more), then deletes the key if the data is unchanged (writes and truncates
  may go on meanwhile; then it goes round again). Once the key is gone the
  file is an ordinary chunked file for good.
- ``read``: the data and the attributes in one transaction (a client whose
  known size grew re-reads them).
- truncation trims the data (attrs.setattr); nothing on storage to cut.

Reading and writing the data is not permission-checked here, as chunk reads
and writes are not: a client proves its right at open (the write session
for writes). Nothing of this reaches storage unless a file spills.
"""
from __future__ import annotations

import asyncio
import errno
import logging

from . import schema as s
from .common import Ctx, decode, put
from .errors import check_ino, check_size, fail
from .perm import Caller, kill_suid
from .schema import SESSION_ID_LEN, Inode

log = logging.getLogger("flyfs.meta")

SPILL_LEASE = 30.0          # seconds a metadata server may take to move a file's data to chunk 0
SPILL_WAIT = 0.02           # poll interval while another server holds the lease
INLINE_MAX_LIMIT = 64 << 10  # the most `inline_max` may be (it must fit in any chunk)


def check_inline_max(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= INLINE_MAX_LIMIT:
        raise ValueError(f"inline_max must be between 0 and {INLINE_MAX_LIMIT} bytes, got {n!r}")
    return n


def start(txn, ino: int) -> bytes:
    """A new regular file starts inline and empty; returns its data (b"")."""
    txn.set(s.inline_key(ino), s.encode_inline(0, b""))
    return b""


async def load(txn, ino: int) -> bytes | None:
    """The file's data while it is inline, else None."""
    raw = await txn.get(s.inline_key(ino))
    return None if raw is None else s.decode_inline(raw)[1]


def view(data: bytes | None, size: int) -> bytes | None:
    """What a client may be handed: the data, never longer than the size."""
    return None if data is None else data[:size]


async def trim(txn, ino: int, size: int) -> bool:
    """Truncation of an inline file (inside setattr's transaction): the data cut to
    `size`; True if the file is inline (nothing on storage to cut), else False."""
    raw = await txn.get(s.inline_key(ino))
    if raw is None:
        return False
    spill, data = s.decode_inline(raw)
    if len(data) > size:
        txn.set(s.inline_key(ino), s.encode_inline(spill, data[:size]))
    return True


async def read(ctx: Ctx, who: Caller, ino: int) -> tuple[Inode, bytes | None]:
    """(attributes, data while inline else None), read together."""
    check_ino(ino)

    async def fn(txn):
        raw_node, raw = await txn.get_many([s.inode_key(ino), s.inline_key(ino)])
        node = decode(ino, raw_node)
        return node, None if raw is None else view(s.decode_inline(raw)[1], node.size)

    return await ctx.transact(fn)


def _check_writes(writes) -> list[tuple[int, bytes]]:
    out = []
    for item in writes:
        try:
            off, data = item
        except (TypeError, ValueError):
            raise fail(errno.EINVAL, f"an inline write is (offset, bytes), got {item!r}") from None
        check_size(off, "offset")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise fail(errno.EINVAL, f"inline write data must be bytes, got {type(data).__name__}")
        out.append((off, bytes(data)))
    return out


def _session_ok(session) -> bytes:
    if not isinstance(session, bytes) or len(session) != SESSION_ID_LEN:
        raise fail(errno.EBADF, "an inline write needs the file's write session")
    return session


async def write(ctx: Ctx, who: Caller, ino: int, session: bytes, writes, *,
                durable: bool = False) -> tuple[Inode, bytes | None]:
    """Apply (offset, bytes) writes to an inline file; returns (attributes, data).

    Data None: the file is not inline (any more) and nothing was written: the
    caller writes to chunks. Writes ending beyond inline_max spill the file
    first (and return None likewise)."""
    check_ino(ino)
    session = _session_ok(session)
    writes = _check_writes(writes)
    end = max((off + len(d) for off, d in writes), default=0)
    if end > ctx.config.inline_max:
        return await spill(ctx, who, ino), None

    async def fn(txn):
        key, skey = s.inline_key(ino), s.session_key(ino, session)
        raw_node, raw, raw_session = await txn.get_many([s.inode_key(ino), key, skey])
        node = decode(ino, raw_node)
        if raw is None:
            return node, None
        if not node.is_reg:
            raise fail(errno.EINVAL, f"inode {ino} is not a regular file")
        spill_until, data = s.decode_inline(raw)
        buf = bytearray(data[:node.size])
        for off, d in writes:
            if off > len(buf):
                buf += bytes(off - len(buf))
            buf[off:off + len(d)] = d
        now = ctx.now()
        n = node.with_(size=max(node.size, end), mtime=now, ctime=now,
                       mode=node.mode if who.is_root else kill_suid(node.mode))
        put(txn, n)
        txn.set(key, s.encode_inline(spill_until, bytes(buf)))
        if raw_session is not None or n.nlink > 0:
            # Renewed (or re-created, for a writer that outlived its session), as a length report does.
            opened = s.decode_session(skey, raw_session).opened if raw_session else now
            txn.set(skey, s.encode_session(opened, now + int(ctx.config.session_ttl * 1e9), who.client_id))
        if durable:
            txn.durable = True
        return n, bytes(buf)

    return await ctx.transact(fn)


async def spill(ctx: Ctx, who: Caller | None, ino: int) -> Inode:
    """Move an inline file's data to chunk 0 and make it an ordinary chunked file
    (nothing to do when it is not inline); returns its attributes."""
    check_ino(ino)
    deadline = asyncio.get_running_loop().time() + 2 * SPILL_LEASE
    while True:
        lease = ctx.now() + int(SPILL_LEASE * 1e9)

        async def begin(txn):
            key = s.inline_key(ino)
            raw_node, raw = await txn.get_many([s.inode_key(ino), key])
            node = decode(ino, raw_node)
            if raw is None:
                return node, None, False
            until, data = s.decode_inline(raw)
            if until > ctx.now():
                return node, None, True          # another server is spilling it
            data = data[:node.size]
            if until == 0 and not data:
                txn.clear(key)                   # never written: no chunk can exist
                return node, None, False
            txn.set(key, s.encode_inline(lease, data))
            return node, data, False

        node, data, busy = await ctx.transact(begin)
        if busy:
            if asyncio.get_running_loop().time() > deadline:
                raise fail(errno.EAGAIN, f"inode {ino}: another metadata server has been moving its data "
                                         f"to chunks for too long")
            await asyncio.sleep(SPILL_WAIT)
            continue
        if data is None:
            return node
        try:
            if data:
                await ctx.storage.write_data(ino, node.layout, 0, data)
            # An earlier spill that died (or this one's earlier round) may have written more.
            await ctx.storage.truncate(ino, node.layout, len(data))
        except Exception as e:
            async def release(txn):
                raw = await txn.get(s.inline_key(ino))
                if raw is not None and s.decode_inline(raw)[0] == lease:
                    txn.set(s.inline_key(ino), s.encode_inline(1, s.decode_inline(raw)[1]))
            await ctx.transact(release)
            if isinstance(e, OSError) and e.errno:
                raise
            raise fail(errno.EIO, f"inode {ino}: moving its data to chunks failed: {e}") from None

        async def finish(txn, data=data):
            key = s.inline_key(ino)
            raw_node, raw = await txn.get_many([s.inode_key(ino), key])
            node = decode(ino, raw_node)
            if raw is None:
                return node, True
            until, now_data = s.decode_inline(raw)
            if until == lease and now_data[:node.size] == data:
                txn.clear(key)
                return node, True
            if until == lease:
                # Written or cut meanwhile: free the lease at once and go round again.
                txn.set(key, s.encode_inline(1, now_data))
            return node, False

        node, done = await ctx.transact(finish)
        if done:
            return node
