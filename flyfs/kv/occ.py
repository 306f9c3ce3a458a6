"""Optimistic concurrency control for engines without native transactions.

Shared by the memory and RocksDB engines, which are owned by one process: every
commit goes through this process, so a version map of recently modified keys
(and cleared ranges) is enough to validate reads — no versions on disk.

A transaction starts at `applied` (the newest version whose writes are visible
to reads). A read of key k is valid iff k was not modified by a version newer
than the start; a read of a range is valid iff no key in it (nor a cleared
range overlapping it) was. Reads are validated when they happen, so `fn`
always sees a consistent snapshot, and again at commit for what happened in
between. Entries older than the oldest running transaction are pruned.
"""
from __future__ import annotations

from collections import Counter, deque

from sortedcontainers import SortedDict

from .errors import TransactionConflict


class ReadSet:
    """What one transaction read: keys and [begin, end) ranges, plus its start version."""

    __slots__ = ("start", "keys", "ranges")

    def __init__(self, start: int):
        self.start = start
        self.keys: set[bytes] = set()
        self.ranges: list[list[bytes]] = []  # [begin, end) — end grows while a scan streams


class ConflictTracker:
    """Version map of recently modified keys and cleared ranges."""

    def __init__(self):
        self.applied = 0   # writes up to here are visible to reads
        self.assigned = 0  # last version handed to a validated commit
        self._mods = SortedDict()  # key -> version of its last modification
        self._cleared: list[tuple[bytes, bytes, int]] = []
        self._log: deque[tuple[int, list[bytes]]] = deque()
        self._active: Counter[int] = Counter()

    def begin(self) -> ReadSet:
        self._active[self.applied] += 1
        return ReadSet(self.applied)

    def end(self, rs: ReadSet) -> None:
        self._active[rs.start] -= 1
        if self._active[rs.start] <= 0:
            del self._active[rs.start]
        self._prune()

    def key_conflict(self, key: bytes, start: int) -> bool:
        if self._mods.get(key, 0) > start:
            return True
        return any(v > start and b <= key < e for b, e, v in self._cleared)

    def range_conflicts(self, begin: bytes, end: bytes, start: int) -> list[bytes]:
        out = [k for k in self._mods.irange(begin, end, inclusive=(True, False))
               if self._mods[k] > start]
        out += [b for b, e, v in self._cleared if v > start and b < end and begin < e]
        return out

    def check_read(self, key: bytes, rs: ReadSet) -> None:
        if self.key_conflict(key, rs.start):
            raise TransactionConflict([key])

    def check_scan(self, begin: bytes, end: bytes, rs: ReadSet) -> None:
        bad = self.range_conflicts(begin, end, rs.start)
        if bad:
            raise TransactionConflict(bad)

    def validate(self, rs: ReadSet) -> None:
        """Raise TransactionConflict if anything `rs` read changed since it started."""
        bad = [k for k in rs.keys if self.key_conflict(k, rs.start)]
        for b, e in rs.ranges:
            bad += self.range_conflicts(b, e, rs.start)
        if bad:
            raise TransactionConflict(bad)

    def record(self, mutations: list[tuple]) -> int:
        """Assign the next version to a validated commit and mark what it modifies."""
        self.assigned += 1
        v = self.assigned
        keys = []
        for op in mutations:
            if op[0] == "clear_range":
                self._cleared.append((op[1], op[2], v))
            else:
                self._mods[op[1]] = v
                keys.append(op[1])
        self._log.append((v, keys))
        return v

    def alone(self, rs: ReadSet) -> bool:
        """Whether `rs`'s transaction is the only one running: a commit of it that is applied
        before any other can begin needs no record (nobody started before it; the version
        map entries would be pruned at its end)."""
        return len(self._active) == 1 and self._active.get(rs.start) == 1

    def applied_alone(self) -> int:
        """A commit of the only running transaction, applied at once (see `alone`): the next
        version, marked applied, with nothing recorded."""
        self.assigned += 1
        self.applied = self.assigned
        return self.assigned

    def mark_applied(self, version: int) -> None:
        self.applied = max(self.applied, version)
        self._prune()

    def _prune(self) -> None:
        horizon = min(self._active) if self._active else self.applied
        while self._log and self._log[0][0] <= horizon:
            v, keys = self._log.popleft()
            for k in keys:
                if self._mods.get(k) == v:
                    del self._mods[k]
        if self._cleared and self._cleared[0][2] <= horizon:
            self._cleared = [c for c in self._cleared if c[2] > horizon]
