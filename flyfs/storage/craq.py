"""CRAQ replication decisions, kept apart from I/O so they are tested without sockets.

How an update travels (see also DESIGN.md, "Storage"):

* A client sends every update of a chunk (write, truncate, remove) to the
  chain head. The head takes the chunk's lock, assigns the next update
  version, stages it as a *pending* version on its own disk, forwards it to
  its successor and waits; each target does the same; the tail commits first
  and the commit travels back, each target committing once its successor
  answered. The head answers the client after its own commit. The lock is
  held until then, so one chunk has at most one update in flight per chain.
* A forwarded write carries the delta (offset + bytes) and the *base
  version* it applies on top of. A successor applies a delta only when its
  committed version is exactly that base and nothing is pending; otherwise
  (it missed updates, holds a stuck pending version, or is a resyncing
  target) it answers ``need_full_chunk`` and the predecessor resends the
  whole chunk content at the same update version. So a replica never applies
  a delta to the wrong content, whatever happened to it before.
* Remove travels the other way round: each target forwards first and
  removes its own copy after its successor answered, so at any moment the
  targets still holding a chunk are a prefix of the chain and a later write
  rebuilds the missing copies through ``need_full_chunk``.
* A head that finds a pending version no update of this process is working
  on (its forward gave up, or the daemon restarted) drops it and burns its
  version number: the next update gets a higher version, and successors that
  did commit the dropped version see a base mismatch and take the full chunk.
  The dropped update was never acknowledged, so losing it is allowed.
* Retried client updates carry (client id, sequence); every target on the
  path records them, so a retry after a timeout, even at a new head after a
  failover, answers the first result instead of applying twice
  (``DedupTable``).
* Reads: a SERVING target whose copy of a chunk has a pending version answers
  "not committed" unless it is the last SERVING target (whose committed
  version is the chain's truth); the client then asks that target.

Chunk ids are the inode as a big-endian u64 followed by the chunk index as a
big-endian u32, so one inode's chunks are contiguous and sorted by index.
"""
from __future__ import annotations

import enum
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from flyfs.cluster.chain_state import Chain, LocalState, PublicState, readable_targets, write_targets
from flyfs.proto import storage_pb2

__all__ = [
    "chunk_id", "parse_chunk_id", "inode_prefix", "meta_to_proto", "CHUNK_ID_LEN", "MAX_INDEX",
    "ChainCheck", "check_chain_version", "Role", "role_of",
    "HeadPlan", "head_plan", "ForwardAction", "forward_action",
    "apply_delta", "DedupTable", "DedupHit", "Lease",
    "SyncOp", "needs_sync", "sync_step", "sync_plan", "local_state",
    "slot_offsets", "read_order",
]

_ID = struct.Struct(">QI")
CHUNK_ID_LEN = _ID.size          # 12
MAX_INDEX = (1 << 32) - 1
_U64 = (1 << 64) - 1


# --------------------------------------------------------------------------- chunk ids

def chunk_id(inode: int, index: int) -> bytes:
    """The 12-byte key of chunk `index` of `inode`; ValueError when out of range."""
    if not 0 <= inode <= _U64:
        raise ValueError(f"inode {inode} out of range 0..2**64-1")
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"chunk index {index} out of range 0..2**32-1")
    return _ID.pack(inode, index)


def parse_chunk_id(cid: bytes) -> tuple[int, int]:
    """(inode, index) of a chunk key; ValueError if it is not 12 bytes."""
    if len(cid) != CHUNK_ID_LEN:
        raise ValueError(f"chunk id must be {CHUNK_ID_LEN} bytes, got {len(cid)}")
    return _ID.unpack(cid)


def meta_to_proto(m) -> storage_pb2.ChunkMeta:
    """An engine ChunkMeta as a storage_pb2.ChunkMeta."""
    inode, index = parse_chunk_id(m.chunk_id)
    return storage_pb2.ChunkMeta(chunk=storage_pb2.ChunkId(inode=inode, index=index),
                                 commit_version=m.commit_ver, update_version=m.update_ver,
                                 chain_version=m.chain_ver, length=m.length, crc32c=m.crc)


def inode_prefix(inode: int) -> bytes:
    """Key prefix shared by every chunk of `inode`."""
    if not 0 <= inode <= _U64:
        raise ValueError(f"inode {inode} out of range 0..2**64-1")
    return struct.pack(">Q", inode)


# --------------------------------------------------------------------------- routing checks

class ChainCheck(enum.Enum):
    OK = "ok"
    STALE = "stale"      # the request's chain version is older than ours: caller refreshes
    BEHIND = "behind"    # ours is older: refresh our routing, then check again


def check_chain_version(request_version: int, local_version: int) -> ChainCheck:
    if request_version == local_version:
        return ChainCheck.OK
    return ChainCheck.STALE if request_version < local_version else ChainCheck.BEHIND


@dataclass(frozen=True)
class Role:
    """What one target may do in its chain at one chain version."""

    target_id: int
    chain_id: int
    chain_version: int
    state: PublicState | None        # None: not in the chain
    is_head: bool                    # takes client updates
    on_write_path: bool              # takes forwarded updates
    successor: int | None            # where updates go next (None: the write path's tail)
    predecessor: int | None
    readable: bool                   # SERVING: may answer reads
    is_read_tail: bool               # last SERVING target: its committed data is the truth
    head: int | None                 # the chain's head, for NOT_HEAD replies


def role_of(chain: Chain, target_id: int) -> Role:
    """The role of `target_id` in `chain` (state None when it is not a member)."""
    states = chain.states()
    path = write_targets(chain)
    readers = readable_targets(chain)
    on_path = target_id in path
    i = path.index(target_id) if on_path else -1
    return Role(
        target_id=target_id, chain_id=chain.chain_id, chain_version=chain.version,
        state=states.get(target_id),
        is_head=bool(path) and path[0] == target_id,
        on_write_path=on_path,
        successor=path[i + 1] if on_path and i + 1 < len(path) else None,
        predecessor=path[i - 1] if on_path and i > 0 else None,
        readable=target_id in readers,
        is_read_tail=bool(readers) and readers[-1] == target_id,
        head=path[0] if path else None)


# --------------------------------------------------------------------------- update versions

@dataclass(frozen=True)
class HeadPlan:
    """What the head does before staging a new update of a chunk."""

    abort_pending: bool     # drop a stuck pending version first
    version: int            # the update version to assign
    base_version: int       # the committed version the update applies on top of


def head_plan(commit_ver: int, update_ver: int, has_pending: bool) -> HeadPlan:
    """Version assignment at the head (it holds the chunk's lock, so any pending
    version it finds is stuck: see the module docstring)."""
    if has_pending:
        return HeadPlan(True, max(commit_ver, update_ver) + 1, commit_ver)
    return HeadPlan(False, commit_ver + 1, commit_ver)


class ForwardAction(enum.Enum):
    APPLY_DELTA = "apply-delta"      # stage the delta at the update version
    APPLY_FULL = "apply-full"        # replace the content with the full chunk at the update version
    DUPLICATE = "duplicate"          # already committed this very update: answer OK
    NEED_FULL = "need-full"          # ask the predecessor for the full chunk
    REMOVE = "remove"                # forward, then remove


def forward_action(*, exists: bool, commit_ver: int, has_pending: bool, commit_chain_ver: int,
                   update_type: str, update_ver: int, update_chain_ver: int, base_ver: int,
                   full: bool) -> ForwardAction:
    """What a successor does with a forwarded update, given its own copy of the chunk.

    update_type is "write", "truncate" or "remove". `commit_chain_ver` is the
    chain version recorded with the committed version (a committed version
    with the same number and chain version is the same update: versions are
    assigned once per chain version by the one head).
    """
    if update_type == "remove":
        return ForwardAction.REMOVE
    if full:
        return ForwardAction.APPLY_FULL
    if exists and not has_pending and commit_ver == update_ver and commit_chain_ver == update_chain_ver:
        return ForwardAction.DUPLICATE
    current = commit_ver if exists else 0
    if not has_pending and current == base_ver:
        return ForwardAction.APPLY_DELTA
    return ForwardAction.NEED_FULL


def apply_delta(content: bytearray, update_type: str, offset: int, length: int,
                data: Any = b"") -> bytearray:
    """Apply a write (data at offset) or truncate (to length) to `content` in place."""
    if update_type == "write":
        end = offset + len(data)
        if end > len(content):
            content.extend(bytes(end - len(content)))
        content[offset:end] = data
    elif update_type == "truncate":
        if length < len(content):
            del content[length:]
        else:
            content.extend(bytes(length - len(content)))
    else:
        raise ValueError(f"cannot apply a {update_type!r} update to chunk content")
    return content


# --------------------------------------------------------------------------- dedup

@dataclass
class DedupHit:
    """A known (client id, sequence): `result` when finished, else `waiter` to await."""

    result: Any = None
    waiter: Any = None


class DedupTable:
    """Results of recent client updates by (client id, sequence number).

    `begin` returns None for a new key (then `finish` or `fail` it), or the
    hit for a key seen before: the result, or the pending entry's waiter (any
    object the caller chose, e.g. an asyncio future). Finished entries are
    kept for `ttl` seconds, at most `capacity` of them (oldest go first).
    Failed keys are forgotten so a retry runs again. Pure: time comes from
    `clock`.
    """

    def __init__(self, capacity: int = 200_000, ttl: float = 900.0,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._done: OrderedDict[tuple[str, int], tuple[float, Any]] = OrderedDict()
        self._pending: dict[tuple[str, int], Any] = {}

    def __len__(self) -> int:
        return len(self._done) + len(self._pending)

    def get(self, key: tuple[str, int]) -> DedupHit | None:
        self._expire()
        if key in self._pending:
            return DedupHit(waiter=self._pending[key])
        ent = self._done.get(key)
        return DedupHit(result=ent[1]) if ent is not None else None

    def begin(self, key: tuple[str, int], waiter: Any = None) -> DedupHit | None:
        hit = self.get(key)
        if hit is None:
            self._pending[key] = waiter
        return hit

    def finish(self, key: tuple[str, int], result: Any) -> None:
        self._pending.pop(key, None)
        self.record(key, result)

    def record(self, key: tuple[str, int], result: Any) -> None:
        """Remember a finished update (also on targets that only forwarded it)."""
        self._done[key] = (self._clock(), result)
        self._done.move_to_end(key)
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)

    def fail(self, key: tuple[str, int]) -> None:
        self._pending.pop(key, None)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        while self._done:
            key, (at, _) = next(iter(self._done.items()))
            if at >= cutoff:
                break
            self._done.popitem(last=False)


# --------------------------------------------------------------------------- node lease

class Lease:
    """The node's right to take writes: until half the lease after the send time
    of the last successful heartbeat (measured on our own monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.valid_until = float("-inf")
        self.lease_s = 0.0

    def renewed(self, sent_at: float, lease_ms: int) -> None:
        self.lease_s = lease_ms / 1000.0
        self.valid_until = max(self.valid_until, sent_at + self.lease_s / 2)

    def valid(self) -> bool:
        return self._clock() < self.valid_until

    def remaining(self) -> float:
        return self.valid_until - self._clock()


def local_state(public: PublicState | None, synced_version: int | None,
                chain_version: int) -> LocalState:
    """What a live target reports: UPTODATE while SERVING, or once resynced at the
    chain's current version; ONLINE otherwise (after a restart, while waiting
    or syncing)."""
    if public is PublicState.SERVING:
        return LocalState.UPTODATE
    if public is PublicState.SYNCING and synced_version == chain_version:
        return LocalState.UPTODATE
    return LocalState.ONLINE


# --------------------------------------------------------------------------- resync

class SyncOp(enum.Enum):
    SEND = "send"        # install the predecessor's committed copy on the syncing target
    REMOVE = "remove"    # the syncing target holds a chunk the predecessor has not


def needs_sync(local, remote) -> bool:
    """Whether the syncing target's copy (`remote`, a storage_pb2.ChunkMeta or None)
    differs from the predecessor's committed copy (`local`, an engine ChunkMeta)."""
    if remote is None:
        return local.commit_ver > 0
    if remote.update_version != remote.commit_version:
        return True   # a pending version: stale or stuck, replace it
    return (remote.commit_version != local.commit_ver or remote.chain_version != local.chain_ver
            or remote.length != local.length or remote.crc32c != local.crc)


def sync_step(lm, rm) -> tuple[SyncOp | None, bool, bool]:
    """One step of merging the two listings of a resync.

    `lm`: the predecessor's next engine ChunkMeta (None when exhausted), `rm`:
    the syncing target's next (chunk id, storage_pb2.ChunkMeta) (None when
    exhausted). Returns (operation or None, advance local, advance remote).
    A chunk with a pending version on the predecessor is always sent: the
    sender takes the chunk's lock first, so an update that was in flight
    before the predecessor learned of the syncing target has committed (or
    is gone) by then, and what is sent is what the predecessor holds after it.
    """
    if rm is None or (lm is not None and lm.chunk_id < rm[0]):
        send = lm.commit_ver > 0 or lm.has_pending
        return (SyncOp.SEND if send else None), True, False
    if lm is None or rm[0] < lm.chunk_id:
        return SyncOp.REMOVE, False, True
    send = lm.has_pending or needs_sync(lm, rm[1])
    return (SyncOp.SEND if send else None), True, True


def sync_plan(local: Iterable, remote: Iterable) -> Iterator[tuple[SyncOp, bytes]]:
    """The resync work list from two chunk-id-ordered listings (see `sync_step`)."""
    li, ri = iter(local), iter(remote)
    lm = next(li, None)
    rm = next(ri, None)
    while lm is not None or rm is not None:
        op, adv_l, adv_r = sync_step(lm, rm)
        if op is SyncOp.SEND:
            yield op, lm.chunk_id
        elif op is SyncOp.REMOVE:
            yield op, rm[0]
        if adv_l:
            lm = next(li, None)
        if adv_r:
            rm = next(ri, None)


# --------------------------------------------------------------------------- reads

def slot_offsets(lengths: Sequence[int]) -> list[int]:
    """Where each piece's slot starts in a batch read payload."""
    out = []
    pos = 0
    for n in lengths:
        out.append(pos)
        pos += n
    return out


def read_order(readable: Sequence[int], key: int, exclude: Iterable[int] = ()) -> list[int]:
    """Replicas to try for one read, best first: a spread-out first choice (by
    `key`, e.g. the chunk index), then the rest, the last SERVING target last
    but one fallback (it answers even while others hold pending versions)."""
    skip = set(exclude)
    cands = [t for t in readable if t not in skip]
    if not cands:
        return []
    first = cands[key % len(cands)]
    rest = [t for t in cands if t != first]
    return [first, *rest]
