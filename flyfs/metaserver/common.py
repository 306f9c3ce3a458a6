"""What every operation module shares: configuration, the context object, inode id
allocation, and the small reads and writes done inside transactions."""
from __future__ import annotations

import asyncio
import errno
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..kv import Engine, Transaction
from . import schema as s
from .errors import check_uuid, fail
from .perm import Caller
from .schema import Inode

# Operation codes of idempotency records.
OP_UNLINK, OP_RMDIR, OP_RENAME = 1, 2, 3
OP_NAMES = {OP_UNLINK: "unlink", OP_RMDIR: "rmdir", OP_RENAME: "rename"}


@dataclass
class MetaConfig:
    """Tunables of a metadata server (defaults suit `flyfs up`)."""

    default_chunk_size: int = 1 << 20
    default_stripe: int = 4
    link_max: int = 65000            # hard links per file (EMLINK beyond)
    session_ttl: float = 300.0       # a write session not renewed for this long is dead
    idempotency_ttl: float = 600.0   # how long a remove/rename answer is kept for retries
    id_block: int = 1024             # inode ids reserved per counter transaction
    readdir_limit: int = 1024        # most entries in one readdir page
    gc_batch: int = 64               # GC queue entries handled per pass
    gc_interval: float = 5.0         # seconds between background GC passes
    # Every commit synced to disk before its answer (True), or answered once the OS has
    # it and synced within sync_interval seconds, an fsync's length report at once
    # (False; where the engine allows: RocksDB; etcd always syncs).
    sync_commits: bool = False
    sync_interval: float = 0.1
    # New regular files keep up to this many bytes in the KV instead of chunks (inline.py);
    # 0: every file's data goes to chunks. `flyfs meta` defaults to 4096.
    inline_max: int = 0


async def maybe_await(x: Any) -> Any:
    if inspect.isawaitable(x):
        return await x
    return x


class InodeAllocator:
    """Hands out inode ids from blocks reserved in the MCnext_ino counter.

    Each server reserves `block` ids per counter transaction, so creates do
    not all touch one key; ids are never reused (a block lost in a crash is
    simply skipped).
    """

    def __init__(self, engine: Engine, block: int):
        self.engine = engine
        self.block = max(1, block)
        self._next = 0
        self._end = 0
        self._lock = asyncio.Lock()

    async def allocate(self) -> int:
        while self._next >= self._end:
            async with self._lock:
                if self._next < self._end:
                    break
                block = self.block

                async def reserve(txn: Transaction):
                    raw = await txn.get(s.K_NEXT_INO)
                    first = s.read_u64(raw) if raw else s.ROOT_INO + 1
                    txn.set(s.K_NEXT_INO, s.u64(first + block))
                    return first

                first = await self.engine.transact(reserve)
                self._next, self._end = first, first + block
        ino = self._next
        self._next += 1
        return ino


class Ctx:
    """Everything an operation needs: the engine, config, clock and the injected providers."""

    def __init__(self, engine: Engine, config: MetaConfig, storage, chain_table: Callable | None,
                 space: Callable | None, clock: Callable[[], int] = time.time_ns):
        self.engine = engine
        self.config = config
        self.storage = storage
        self.chain_table = chain_table
        self.space = space
        self.clock = clock
        self.alloc = InodeAllocator(engine, config.id_block)

    def now(self) -> int:
        return self.clock()

    async def transact(self, fn):
        return await self.engine.transact(fn)


# ---- reads inside a transaction -------------------------------------------------

def decode(ino: int, raw: bytes | None, stamp: bytes | None = None) -> Inode:
    if raw is None:
        raise fail(errno.ENOENT, f"no inode {ino}")
    node = s.decode_inode(ino, raw)
    return s.apply_stamp(node, stamp) if stamp is not None else node


async def load(txn: Transaction, ino: int) -> Inode:
    """The inode as stored (a directory's MT stamp not applied)."""
    return decode(ino, await txn.get(s.inode_key(ino)))


async def load_full(txn: Transaction, ino: int) -> Inode:
    """The inode with its effective times (MT stamp applied)."""
    raw, stamp = await txn.get_many([s.inode_key(ino), s.stamp_key(ino)])
    return decode(ino, raw, stamp)


GET_MANY_CHUNK = 64  # keys per get_many: etcd serves a multi-get as one Txn, limited to 128 ops


async def load_many_full(txn: Transaction, inos: list[int], snapshot: bool = False) -> list[Inode | None]:
    keys = []
    for ino in inos:
        keys += [s.inode_key(ino), s.stamp_key(ino)]
    raws = []
    for i in range(0, len(keys), GET_MANY_CHUNK):
        raws += await txn.get_many(keys[i:i + GET_MANY_CHUNK], snapshot=snapshot)
    return [None if raws[2 * i] is None else decode(ino, raws[2 * i], raws[2 * i + 1])
            for i, ino in enumerate(inos)]


def decode_dir(ino: int, raw: bytes | None) -> Inode:
    node = decode(ino, raw)
    if not node.is_dir:
        raise fail(errno.ENOTDIR, f"inode {ino} is not a directory")
    return node


async def has_entries(txn: Transaction, dir_ino: int) -> bool:
    """Whether a directory has any entry (one short range read, a read conflict on it)."""
    return await txn.any_in_range(*s.dentry_range(dir_ino))


async def has_sessions(txn: Transaction, ino: int) -> bool:
    return await txn.any_in_range(*s.session_range(ino))


# ---- writes inside a transaction -------------------------------------------------

def put(txn: Transaction, node: Inode) -> None:
    txn.set(s.inode_key(node.ino), s.encode_inode(node))


def put_dir(txn: Transaction, node: Inode) -> None:
    """Write a directory inode with its times folded in (clears its MT stamp)."""
    txn.set(s.inode_key(node.ino), s.encode_inode(node))
    txn.clear(s.stamp_key(node.ino))


def touch_dir(txn: Transaction, ino: int, now: int) -> None:
    """Set a directory's mtime/ctime without reading it: a blind write, no conflict."""
    txn.set(s.stamp_key(ino), s.encode_stamp(now, now))


async def remove_inode(txn: Transaction, ino: int) -> None:
    """Delete an inode and everything keyed by it (times, xattrs, inline data)."""
    txn.clear(s.inode_key(ino))
    txn.clear(s.stamp_key(ino))
    txn.clear(s.inline_key(ino))
    # A range delete only where there is something in the range: RocksDB keeps every range
    # tombstone in the way of later reads (gets ~20x slower after thousands of them, measured).
    b, e = s.xattr_range(ino)
    if await txn.any_in_range(b, e):
        txn.clear_range(b, e)


async def drop_link(txn: Transaction, node: Inode, now: int) -> None:
    """One link of a non-directory is gone: decrement nlink; free the inode with the last.

    A regular file still open for writing stays (nlink 0) until its last
    session closes or expires; otherwise it goes to the GC queue, which
    removes its chunks before the inode. Other inodes have no chunks and go now.
    """
    nlink = max(node.nlink - 1, 0)
    if nlink > 0:
        put(txn, node.with_(nlink=nlink, ctime=now))
        return
    if node.is_reg:
        # (an inline file too: it stays readable by those who have it open until GC frees it,
        # with no call to storage when its data never went to chunks)
        put(txn, node.with_(nlink=0, ctime=now))
        if not await has_sessions(txn, node.ino):
            txn.set(s.gc_key(node.ino), s.encode_i64(now))
    else:
        await remove_inode(txn, node.ino)


# ---- idempotent retries --------------------------------------------------------

async def get_unless_done(txn: Transaction, who: Caller, op: int, keys: list[bytes]) -> list | None:
    """Read `keys`, or return None when this request uuid already completed `op` (a retry
    after a lost answer: the caller answers as the first time). One round trip."""
    uuid = check_uuid(who.request_uuid)
    if not uuid:
        return await txn.get_many(keys)
    values = await txn.get_many([s.idem_key(uuid), *keys])
    if values[0] is None:
        return values[1:]
    _, done_op, _ = s.decode_idem(values[0])
    if done_op != op:
        raise fail(errno.EINVAL, f"request uuid {uuid.hex()} was already used for "
                                 f"{OP_NAMES.get(done_op, done_op)}, not {OP_NAMES[op]}")
    return None


def record_done(txn: Transaction, who: Caller, op: int, now: int) -> None:
    uuid = who.request_uuid
    if uuid:
        txn.set(s.idem_key(uuid), s.encode_idem(now, op))
        txn.set(s.idem_expiry_key(now, uuid), b"")
