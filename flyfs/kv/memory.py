"""`memory://` — an in-process engine with optimistic commit; the fast engine for tests.

Engines opened with the same name (`memory://NAME`) share one store inside the
process, so several servers in one test can use one namespace; plain
`memory://` is private to the engine object.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from sortedcontainers import SortedDict

from .base import SCAN_BATCH, Engine, Transaction
from .occ import ConflictTracker

_SHARED: dict[str, "_Store"] = {}


class _Store:
    def __init__(self):
        self.data = SortedDict()
        self.tracker = ConflictTracker()


class MemoryEngine(Engine):
    """In-memory engine; commits apply synchronously under the event loop."""

    def __init__(self, name: str = ""):
        super().__init__()
        if name:
            self._store = _SHARED.setdefault(name, _Store())
        else:
            self._store = _Store()

    @classmethod
    def from_url(cls, url: str) -> "MemoryEngine":
        parts = urlsplit(url)
        return cls((parts.netloc + parts.path).strip("/"))

    def _begin(self):
        return self._store.tracker.begin()

    def _end(self, rs):
        self._store.tracker.end(rs)

    async def _get(self, rs, keys, snapshot):
        data, tracker = self._store.data, self._store.tracker
        out = [data.get(k) for k in keys]
        if not snapshot:
            for k in keys:
                tracker.check_read(k, rs)
                rs.keys.add(k)
        return out

    async def _scan(self, rs, begin, end, reverse, snapshot):
        data, tracker = self._store.data, self._store.tracker
        rng = None
        if not snapshot:
            rng = [end, end] if reverse else [begin, begin]
            rs.ranges.append(rng)
        lo, hi = begin, end
        while True:
            # Re-seek per batch: the store may change between batches (we
            # yield to the loop), and a held iterator would break.
            if reverse:
                keys = list(_take(data.irange(lo, hi, inclusive=(True, False), reverse=True), SCAN_BATCH))
            else:
                keys = list(_take(data.irange(lo, hi, inclusive=(True, False)), SCAN_BATCH))
            if not keys:
                if rng is not None:
                    rng[0], rng[1] = begin, end
                    tracker.check_scan(begin, end, rs)
                return
            if rng is not None:
                if reverse:
                    rng[0] = keys[-1]
                    tracker.check_scan(keys[-1], hi, rs)
                else:
                    rng[1] = keys[-1] + b"\x00"
                    tracker.check_scan(lo, keys[-1] + b"\x00", rs)
            for k in keys:
                yield k, data[k]
            if reverse:
                hi = keys[-1]
            else:
                lo = keys[-1] + b"\x00"

    async def _commit(self, rs, txn: Transaction):
        tracker, data = self._store.tracker, self._store.data
        tracker.validate(rs)
        muts = txn.mutations()
        v = tracker.record(muts)
        for op in muts:
            if op[0] == "clear_range":
                for k in list(data.irange(op[1], op[2], inclusive=(True, False))):
                    del data[k]
            elif op[0] == "set":
                data[op[1]] = op[2]
            else:
                data.pop(op[1], None)
        tracker.mark_applied(v)


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x
