"""The engine-independent half of the KV layer: the transaction runner and the
write buffer every engine shares.

An engine implements a handful of verbs on an engine-specific transaction
state (`_begin`, `_get`, `_scan`, `_commit`, `_end`); everything else —
input checks, read-your-writes, merging buffered writes into range scans,
recording conflict ranges, retries with jittered backoff, conflict counters —
lives here, once.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

from .errors import InvalidKey, InvalidValue, KVError, TransactionConflict, TransactionTooLarge

log = logging.getLogger("flyfs.kv")

MAX_KEY_SIZE = 8 * 1024
MAX_VALUE_SIZE = 1024 * 1024
MAX_TXN_BYTES = 8 * 1024 * 1024
SCAN_BATCH = 256


def check_key(key: Any) -> bytes:
    if not isinstance(key, bytes):
        raise InvalidKey(f"KV keys must be bytes, got {type(key).__name__}")
    if not key:
        raise InvalidKey("KV keys must not be empty")
    if len(key) > MAX_KEY_SIZE:
        raise InvalidKey(f"KV key of {len(key)} bytes exceeds the {MAX_KEY_SIZE}-byte limit")
    return key


def check_value(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidValue(f"KV values must be bytes, got {type(value).__name__}")
    if len(value) > MAX_VALUE_SIZE:
        raise InvalidValue(f"KV value of {len(value)} bytes exceeds the {MAX_VALUE_SIZE}-byte limit")
    return value


def check_range(begin: Any, end: Any) -> None:
    check_key(begin)
    check_key(end)


@dataclass
class Stats:
    """Counters kept by the transaction runner."""

    committed: int = 0
    conflicts: int = 0
    failed: int = 0
    conflict_keys: dict = field(default_factory=dict)


class Transaction:
    """One attempt of a transaction: buffered writes plus the engine's read state.

    Reads add read conflicts (the transaction retries if what it read changes
    before it commits); `snapshot_*` reads do not.
    """

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self._state = engine._begin()
        self._writes: dict[bytes, bytes | None] = {}
        self._cleared: list[tuple[bytes, bytes]] = []  # ranges cleared by this txn, in order
        self._bytes = 0
        self.read_only = True
        # False: the commit may be acknowledged before it is on disk. A crash of the
        # machine can then lose it (a crash of the process cannot: it is in the OS),
        # but never reorder it: any later durable commit makes it durable too (one
        # write-ahead log). Engines without such a choice (etcd) stay durable. The
        # default is the engine's (Engine.sync_commits); set True to insist.
        self.durable = engine.sync_commits

    # ---- reads -------------------------------------------------------------
    def _local(self, key: bytes):
        """(True, value) when this transaction's own writes decide the key."""
        if key in self._writes:
            return True, self._writes[key]
        for b, e in self._cleared:
            if b <= key < e:
                return True, None
        return False, None

    async def get(self, key: bytes) -> bytes | None:
        """Value of `key`, or None; adds a read conflict on `key`."""
        check_key(key)
        hit, value = self._local(key)
        if hit:
            return value
        return (await self._engine._get(self._state, [key], snapshot=False))[0]

    async def snapshot_get(self, key: bytes) -> bytes | None:
        """Value of `key` without a read conflict."""
        check_key(key)
        hit, value = self._local(key)
        if hit:
            return value
        return (await self._engine._get(self._state, [key], snapshot=True))[0]

    async def get_many(self, keys: Iterable[bytes], snapshot: bool = False) -> list[bytes | None]:
        """Values of many keys in one round trip where the engine allows."""
        keys = [check_key(k) for k in keys]
        out: list[bytes | None] = [None] * len(keys)
        missing = []
        for i, k in enumerate(keys):
            hit, value = self._local(k)
            if hit:
                out[i] = value
            else:
                missing.append(i)
        if missing:
            values = await self._engine._get(self._state, [keys[i] for i in missing], snapshot=snapshot)
            for i, v in zip(missing, values):
                out[i] = v
        return out

    def get_range(self, begin: bytes, end: bytes, limit: int = 0, reverse: bool = False,
                  snapshot: bool = False) -> AsyncIterator[tuple[bytes, bytes]]:
        """Stream (key, value) for begin <= key < end in key order (or reverse).

        Memory stays bounded: the engine is read in batches. Without `snapshot`,
        the part of the range actually read becomes a read conflict, so an
        insert into it by another transaction makes this one retry.
        """
        check_range(begin, end)
        if not isinstance(limit, int) or limit < 0:
            raise KVError(f"limit must be a non-negative int, got {limit!r}")
        return self._range(begin, end, limit, reverse, snapshot)

    async def any_in_range(self, begin: bytes, end: bytes, snapshot: bool = False) -> bool:
        """Whether some key lies in begin <= key < end (reads at most one; a read
        conflict on what it read, as `get_range`)."""
        it = self.get_range(begin, end, limit=1, snapshot=snapshot)
        try:
            async for _ in it:
                return True
            return False
        finally:
            # Closed here, not left to the loop's async-generator finalizer: that
            # costs a wake-up of the loop and a task per call.
            await it.aclose()

    def snapshot_get_range(self, begin: bytes, end: bytes, limit: int = 0,
                           reverse: bool = False) -> AsyncIterator[tuple[bytes, bytes]]:
        """`get_range` without read conflicts."""
        return self.get_range(begin, end, limit, reverse, snapshot=True)

    async def _range(self, begin, end, limit, reverse, snapshot):
        if begin >= end:
            return
        local = sorted(k for k in self._writes if begin <= k < end)
        if reverse:
            local.reverse()
        li = 0
        produced = 0
        engine_iter = self._engine._scan(self._state, begin, end, reverse, snapshot)
        pending = None  # next (k, v) from the engine not yet merged
        exhausted = False
        try:
            while True:
                if pending is None and not exhausted:
                    try:
                        pending = await engine_iter.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                nxt_local = local[li] if li < len(local) else None
                if pending is None and nxt_local is None:
                    return
                take_local = pending is None or (nxt_local is not None and (
                    nxt_local >= pending[0] if reverse else nxt_local <= pending[0]))
                if take_local:
                    if pending is not None and pending[0] == nxt_local:
                        pending = None  # overwritten locally
                    li += 1
                    key, value = nxt_local, self._writes[nxt_local]
                else:
                    key, value = pending
                    pending = None
                    if self._local(key)[0]:
                        continue  # cleared by this transaction
                if value is None:
                    continue
                yield key, value
                produced += 1
                if limit and produced >= limit:
                    return
        finally:
            await engine_iter.aclose()

    # ---- writes ------------------------------------------------------------
    def _account(self, n: int) -> None:
        self._bytes += n
        if self._bytes > MAX_TXN_BYTES:
            raise TransactionTooLarge(
                f"transaction writes more than {MAX_TXN_BYTES} bytes; split it (nothing was committed)")

    def set(self, key: bytes, value: bytes) -> None:
        """Buffer a write of `value` at `key`."""
        check_key(key)
        check_value(value)
        self._account(len(key) + len(value))
        self._writes[key] = value
        self.read_only = False

    def clear(self, key: bytes) -> None:
        """Buffer the removal of `key`."""
        check_key(key)
        self._account(len(key))
        self._writes[key] = None
        self.read_only = False

    def clear_range(self, begin: bytes, end: bytes) -> None:
        """Buffer the removal of every key in [begin, end)."""
        check_range(begin, end)
        if begin >= end:
            return
        self._account(len(begin) + len(end))
        for k in [k for k in self._writes if begin <= k < end]:
            del self._writes[k]
        self._cleared.append((begin, end))
        self.read_only = False

    def mutations(self) -> list[tuple]:
        """The buffered writes in apply order: ('clear_range', b, e) first, then
        ('set', k, v) / ('clear', k). Keys written after a clear_range were
        removed from the range's effect when written, so order is safe."""
        ops: list[tuple] = [("clear_range", b, e) for b, e in self._cleared]
        for k, v in self._writes.items():
            ops.append(("set", k, v) if v is not None else ("clear", k))
        return ops


class Engine:
    """Base of every engine: owns the transaction runner."""

    max_retries = 64
    backoff_base = 0.0005
    backoff_cap = 0.05
    sync_commits = True     # transactions' default `durable` (see relax_commits)
    reads_checked = False   # True: _finish checks an attempt that commits nothing

    def __init__(self):
        self.stats = Stats()

    def relax_commits(self, interval: float) -> bool:
        """Acknowledge commits once the OS has them and sync them within `interval`
        seconds (a transaction setting `durable = True` still waits for its sync).
        Returns False, changing nothing, where the engine cannot (etcd: always synced)."""
        return False

    # ---- verbs an engine implements -----------------------------------------
    def _begin(self):  # pragma: no cover - abstract
        raise NotImplementedError

    async def _get(self, state, keys: list[bytes], snapshot: bool) -> list[bytes | None]:
        raise NotImplementedError

    def _scan(self, state, begin: bytes, end: bytes, reverse: bool, snapshot: bool) -> AsyncIterator:
        raise NotImplementedError

    async def _commit(self, state, txn: Transaction) -> None:
        """Validate reads and apply `txn.mutations()` atomically, or raise TransactionConflict."""
        raise NotImplementedError

    def _end(self, state) -> None:
        pass

    async def _finish(self, state, failed: bool) -> None:
        """After `fn` of an attempt that commits nothing returned (or raised, `failed`):
        raise TransactionConflict when what it read may be out of date, to run it again.
        Engines whose reads are always current have nothing to check."""

    def _retrying(self, state) -> None:
        """The attempt with `state` follows a conflict (engines with a read cache read around it)."""

    async def close(self) -> None:
        pass

    # ---- the runner ----------------------------------------------------------
    async def transact(self, fn: Callable[[Transaction], Awaitable[Any] | Any], *,
                       max_retries: int | None = None) -> Any:
        """Run `fn(txn)` as one serializable transaction and return its result.

        Retries on conflict with jittered exponential backoff; after
        `max_retries` conflicts raises TransactionConflict naming the keys.
        An exception raised by `fn` aborts the attempt: nothing is committed.
        """
        tries = max_retries or self.max_retries
        delay = self.backoff_base
        started = time.monotonic()
        last: TransactionConflict | None = None
        for attempt in range(1, tries + 1):
            txn = Transaction(self)
            if attempt > 1:
                self._retrying(txn._state)
            try:
                try:
                    result = fn(txn)
                    if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                        result = await result
                except (TransactionConflict, asyncio.CancelledError):
                    raise
                except Exception:
                    # An answer computed from reads that may be out of date (an engine's
                    # read cache) is checked before it is given: ENOENT from a stale entry retries.
                    if self.reads_checked:
                        await self._finish(txn._state, True)
                    raise
                if not txn.read_only:
                    await self._commit(txn._state, txn)
                elif self.reads_checked:
                    await self._finish(txn._state, False)
                self.stats.committed += 1
                if attempt > 32:
                    log.warning("transaction needed %d tries (%.3f s)", attempt, time.monotonic() - started)
                return result
            except TransactionConflict as e:
                last = e
                self.stats.conflicts += 1
                for k in e.keys[:4]:
                    self.stats.conflict_keys[k] = self.stats.conflict_keys.get(k, 0) + 1
                    if len(self.stats.conflict_keys) > 1024:
                        self.stats.conflict_keys.clear()
            finally:
                self._end(txn._state)
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, self.backoff_cap)
        self.stats.failed += 1
        raise TransactionConflict(
            last.keys if last else (),
            f"transaction gave up after {tries} conflicts; last conflicting keys: "
            f"{', '.join(repr(k) for k in (last.keys if last else ())[:5]) or 'unknown'}")


__all__ = ["Engine", "Transaction", "Stats", "check_key", "check_value", "check_range",
           "MAX_KEY_SIZE", "MAX_VALUE_SIZE", "MAX_TXN_BYTES", "SCAN_BATCH"]
