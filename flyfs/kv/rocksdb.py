"""`rocksdb:///path/to/dir` — the embedded engine (rocksdict), default for one machine.

RocksDB (as rocksdict exposes it) has no transactions, so this engine adds
serializable optimistic ones (see occ.py): reads are validated against a
version map of recent commits, and validated commits are written by a single
writer task as one synced WriteBatch per group — many transactions share one
fdatasync (group commit), which is what lets ~400 synced batches/s carry
thousands of transactions/s. A commit is acknowledged only after its group is
durable, unless the transaction set `txn.durable = False` (then its group is
written without a sync when no durable transaction shares it).

`relax_commits(interval)` makes `durable = False` the default (the metadata
server's, as ext4 journals or a MooseFS master's changelog): a group is
acknowledged once RocksDB has written it to its WAL, that is to the OS, so a
killed process loses nothing, and a background task syncs the WAL within
`interval` seconds; only a crash of the machine can lose that window.

Only one process may own a directory: an fcntl lock on DIR/flyfs.owner that
records the owner's pid and command line; a second opener gets a one-line
error naming the owner. Point reads and short scans run on the event loop
(memtable/block-cache hits cost microseconds; a thread hop costs more than
the read), and so do unsynced group writes (a WAL append to the page cache);
a synced write — the part that waits on the disk — runs on a dedicated
thread, as does the background WAL sync.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urlsplit

from rocksdict import Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from .base import SCAN_BATCH, Engine, Transaction
from .errors import EngineUnavailable, KVError
from .occ import ConflictTracker

OWNER_FILE = "flyfs.owner"
log = logging.getLogger("flyfs.kv.rocksdb")


def _acquire_owner(path: str) -> int:
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise EngineUnavailable(
            f"rocksdb://{path} is owned by {owner}; only one process may own a RocksDB "
            f"directory (use etcd:// to share a namespace)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode(), 0)
    return fd


class RocksDBEngine(Engine):
    """Embedded RocksDB with optimistic transactions and group commit."""

    def __init__(self, path: str):
        super().__init__()
        if not path:
            raise KVError("rocksdb:// URL needs a directory: rocksdb:///path/to/dir")
        self.path = os.path.abspath(path)
        self._owner_fd = _acquire_owner(self.path)
        try:
            opts = Options(raw_mode=True)
            opts.create_if_missing(True)
            opts.increase_parallelism(2)
            self._db = Rdict(os.path.join(self.path, "db"), opts)
        except Exception as e:
            os.close(self._owner_fd)
            raise EngineUnavailable(f"cannot open rocksdb://{self.path}: {e}") from None
        self._wopts = WriteOptions()
        self._wopts.sync = True
        self._wopts_nosync = WriteOptions()
        self._wopts_nosync.sync = False
        self._tracker = ConflictTracker()
        self._queue: list[tuple[int, list, asyncio.Future, bool]] = []
        self._writer: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flyfs-kv-commit")
        self._closed = False
        self.sync_interval: float | None = None   # set by relax_commits
        self._unsynced = False                     # groups written since the last WAL sync
        self._syncer: asyncio.Task | None = None
        self.wal_syncs = 0                         # syncs done (group commits and background)

    def relax_commits(self, interval: float) -> bool:
        if interval <= 0:
            raise ValueError(f"sync interval must be positive, got {interval}")
        self.sync_interval = interval
        self.sync_commits = False
        return True

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self.sync_interval)
            if self._unsynced and not self._closed:
                await self.sync_wal(loop)

    async def sync_wal(self, loop=None) -> None:
        """Make every commit so far durable (on the commit thread: after queued writes)."""
        self._unsynced = False
        loop = loop or asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._db.flush_wal, True)
            self.wal_syncs += 1
        except Exception:
            self._unsynced = True     # tried again next time; a durable commit also covers it
            raise

    @classmethod
    def from_url(cls, url: str) -> "RocksDBEngine":
        parts = urlsplit(url)
        return cls(unquote(parts.netloc + parts.path))

    def _check_open(self):
        if self._closed:
            raise KVError(f"rocksdb://{self.path} is closed")

    def _begin(self):
        self._check_open()
        return self._tracker.begin()

    def _end(self, rs):
        self._tracker.end(rs)

    async def _get(self, rs, keys, snapshot):
        db = self._db
        out = [db.get(k) for k in keys]
        if not snapshot:
            for k in keys:
                self._tracker.check_read(k, rs)
                rs.keys.add(k)
        return out

    async def _scan(self, rs, begin, end, reverse, snapshot):
        tracker = self._tracker
        rng = None
        if not snapshot:
            rng = [end, end] if reverse else [begin, begin]
            rs.ranges.append(rng)
        lo, hi = begin, end
        while True:
            batch = self._read_batch(lo, hi, reverse)
            if not batch:
                if rng is not None:
                    rng[0], rng[1] = begin, end
                    tracker.check_scan(begin, end, rs)
                return
            last = batch[-1][0]
            if rng is not None:
                if reverse:
                    rng[0] = last
                    tracker.check_scan(last, hi, rs)
                else:
                    rng[1] = last + b"\x00"
                    tracker.check_scan(lo, last + b"\x00", rs)
            for kv in batch:
                yield kv
            if reverse:
                hi = last
            else:
                lo = last + b"\x00"
            await asyncio.sleep(0)  # long scans share the loop

    def _read_batch(self, lo: bytes, hi: bytes, reverse: bool) -> list[tuple[bytes, bytes]]:
        # Bound forward scans: without it, a scan that ends before `hi` keeps stepping
        # over deleted keys (tombstones) beyond the range looking for a live one.
        # (rocksdict's lower bound misbehaves with seek_for_prev; reverse scans, which
        # flyfs rarely does, stay unbounded.)
        ro = None
        if not reverse:
            ro = ReadOptions()
            ro.set_iterate_upper_bound(hi)
        it = self._db.iter(ro)
        out = []
        if reverse:
            it.seek_for_prev(hi)
            if it.valid() and it.key() >= hi:
                it.prev()
            while it.valid() and len(out) < SCAN_BATCH:
                k = it.key()
                if k < lo:
                    break
                out.append((k, it.value()))
                it.prev()
        else:
            it.seek(lo)
            while it.valid() and len(out) < SCAN_BATCH:
                k = it.key()
                if k >= hi:
                    break
                out.append((k, it.value()))
                it.next()
        del it
        return out

    async def _commit(self, rs, txn: Transaction):
        self._check_open()
        tracker = self._tracker
        tracker.validate(rs)
        muts = txn.mutations()
        if self.sync_interval is not None and (self._syncer is None or self._syncer.done()):
            self._syncer = asyncio.ensure_future(self._sync_loop())
        if not txn.durable and not self._queue and (self._writer is None or self._writer.done()):
            # Unsynced with nothing queued ahead of it: written now, in WAL order, with
            # no writer task and no loop iteration between the commit and its answer
            # (so no other transaction can begin before it is applied: when none is
            # running either, there is nobody its writes could conflict with).
            version = tracker.applied_alone() if tracker.alone(rs) else tracker.record(muts)
            error = self._write(self._batch([muts]), False)
            tracker.mark_applied(version)
            if error:
                raise error
            return
        version = tracker.record(muts)
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((version, muts, fut, txn.durable))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_groups())
        await asyncio.shield(fut)

    @staticmethod
    def _batch(mutation_lists) -> WriteBatch:
        wb = WriteBatch(raw_mode=True)
        for muts in mutation_lists:
            for op in muts:
                if op[0] == "set":
                    wb.put(op[1], op[2])
                elif op[0] == "clear":
                    wb.delete(op[1])
                else:
                    wb.delete_range(op[1], op[2])
        return wb

    def _write(self, wb: WriteBatch, durable: bool) -> KVError | None:
        """Write a batch unsynced (on the loop), or synced on the commit thread; the error, if any.
        (No unsynced write runs while a synced one does: the writer task waits for it.)"""
        try:
            self._db.write(wb, self._wopts if durable else self._wopts_nosync)
        except Exception as e:  # disk full, I/O error: fail the commit loudly
            return KVError(f"rocksdb://{self.path}: commit failed: {e}")
        if durable:
            self.wal_syncs += 1
            self._unsynced = False
        else:
            self._unsynced = True
        return None

    async def _write_groups(self):
        loop = asyncio.get_running_loop()
        while self._queue:
            group, self._queue = self._queue, []
            wb = self._batch(g[1] for g in group)
            # The group is synced if any of its transactions must be durable; the
            # WAL keeps order, so a sync also covers the unsynced groups before it.
            if any(g[3] for g in group):
                error = await loop.run_in_executor(self._pool, self._write, wb, True)
            else:
                # Unsynced: a WAL append to the page cache and a memtable insert, cheaper
                # here than the trip to the commit thread and back (~70 us of CPU per
                # commit, measured). Groups still go one after another, in WAL order.
                error = self._write(wb, False)
            # Mark applied even on failure: the writes never happened, so readers
            # that start now correctly see the old values.
            self._tracker.mark_applied(group[-1][0])
            for _, _, fut, _ in group:
                if not fut.done():
                    fut.set_exception(error) if error else fut.set_result(None)

    async def close(self) -> None:
        if self._closed:
            return
        while self._writer is not None and not self._writer.done():
            await self._writer
        if self._unsynced:
            try:
                await self.sync_wal()
            except Exception as e:   # closing anyway: RocksDB's own close flushes what it can
                log.warning("rocksdb://%s: WAL sync at close failed: %s", self.path, e)
        self._closed = True
        if self._syncer is not None:
            self._syncer.cancel()
        self._db.close()
        self._pool.shutdown(wait=True)
        os.close(self._owner_fd)
