"""GraySort-style two-phase sort over a minimal file-system interface.

The same code runs on a local directory (:class:`LocalFS`) and on flyfs (which
supplies its own :class:`FS`). Layout under ``dir`` (default ``/graysort``)::

    input/in-%05d         gensort records, one file per worker slice
    tmp/w%03d-p%05d       phase 1: records of input file w falling in partition p
    output/part-%05d      phase 2: partition p sorted by its 10-byte key
    output/part-%05d.sum  valsort-style summary of that output file (JSON)

Phases, each a set of tasks run by ``workers`` separate processes:

* gen: each input file gets a contiguous slice of record numbers
  ``[w*N//W, (w+1)*N//W)``, so the input depends only on N and W; the sum of
  record CRCs is computed while generating (the expected checksum);
* phase 1: each input file is read in chunks and every record is routed to
  partition ``(key[0:4] as big-endian uint32) * P >> 32``: monotone in the
  key, so concatenating the sorted partitions in order is the sorted whole,
  and balanced because gensort keys are uniform;
* phase 2: each partition's pieces are read, sorted by full key (argsort of
  the first 8 key bytes as a uint64, with a lexsort fallback only if two keys
  share those 8 bytes), and written;
* validate: every output file is read back and summarized as ``valsort -o``
  does; the summaries are combined as ``valsort -s`` does and checked against
  N and the input checksum.

The sort time (phases 1 and 2) gives the reported bytes/min and records/s.
Each task also reports where its time went (:class:`Costs`: metadata calls,
reads, writes, compute, and its process's CPU), summed per phase in
``Result.costs``. Tasks overlap their I/O with their compute (double
buffering, all pieces of a chunk written at once), on every file system alike.

Command line (``flyfs bench graysort``)::

    --quick                          temporary cluster, 200k records, + local baseline
    --cluster HOST:PORT [--local D]  on that cluster, then the same run on a local dir
    --temp-cluster [--local D]       the same on a temporary cluster (LocalCluster,
                                     no mount; --replicas, --chunk-size)
    --local D                        alone: only on the local directory D

With flyfs in the run, the output is the parameters, a progress bar per phase,
a table of flyfs / local / ratio (time per phase, total, bytes/min and TiB/min,
records/s, validation) and a profile per phase (see ``profile_rows``). The
input, and so the checksum, depends only on the record count N.

Each run starts on a quiet machine (``wait_quiet``: page cache written back,
disk and CPUs idle), and the local run only once flyfs has removed the flyfs
run's input and intermediate files (``settle``): neither run pays for work the
other left behind.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import multiprocessing
import multiprocessing.util
import os
import posixpath
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np

from flyfs.bench import gensort, valsort
from flyfs.bench.valsort import RECORD_SIZE, Summary

__all__ = [
    "FS",
    "LocalFS",
    "Result",
    "run_graysort",
    "partition_of",
    "sort_records",
    "main",
]

_MASK128 = (1 << 128) - 1
CHUNK_RECORDS = 1 << 19  # records per read/generate step (52 MB)

Progress = Callable[[str, int, int], None]


@runtime_checkable
class FS(Protocol):
    """The file-system operations the benchmark needs. Paths are absolute
    POSIX-style strings ("/graysort/input/in-00000"); operations on a missing
    path raise FileNotFoundError. An optional ``close()`` is called when a
    process is done with its instance."""

    def makedirs(self, path: str, exist_ok: bool = True) -> None: ...

    def open(self, path: str, mode: str = "rb") -> BinaryIO:
        """A binary file object: read/readinto/write/close, usable with ``with``."""

    def listdir(self, path: str) -> list[str]: ...

    def size(self, path: str) -> int: ...

    def remove(self, path: str) -> None: ...

    def rmtree(self, path: str) -> None: ...


class LocalFS:
    """:class:`FS` on a local directory; picklable, so it is its own factory
    (calling the instance returns itself). With ``fsync``, files opened for
    writing are fsynced when closed (durable, as flyfs's chunks are)."""

    def __init__(self, root: str, fsync: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.fsync = fsync

    def __call__(self) -> "LocalFS":
        return self

    def __repr__(self) -> str:
        return f"LocalFS({self.root!r}{', fsync=True' if self.fsync else ''})"

    def _p(self, path: str) -> str:
        rel = posixpath.normpath("/" + path).lstrip("/")
        return os.path.join(self.root, rel)

    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        os.makedirs(self._p(path), exist_ok=exist_ok)

    def open(self, path: str, mode: str = "rb") -> BinaryIO:
        if "b" not in mode:
            raise ValueError(f"LocalFS opens binary files only, got mode {mode!r}")
        f = open(self._p(path), mode)
        if self.fsync and any(c in mode for c in "wax+"):
            return _FsyncOnClose(f)
        return f

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    def size(self, path: str) -> int:
        return os.path.getsize(self._p(path))

    def remove(self, path: str) -> None:
        os.remove(self._p(path))

    def rmtree(self, path: str) -> None:
        shutil.rmtree(self._p(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(self._p(path))


class _FsyncOnClose:
    """A local file that is flushed and fsynced before it closes."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            finally:
                self._f.close()

    def __enter__(self) -> "_FsyncOnClose":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


# ---------------------------------------------------------------- pure parts


def slices(records: int, parts: int) -> list[tuple[int, int]]:
    """(start, count) of ``parts`` contiguous, near-equal slices of [0, records)."""
    bounds = [records * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


def partition_of(records: np.ndarray, partitions: int) -> np.ndarray:
    """Partition index of each record: its top 32 key bits scaled to [0, P)."""
    recs = valsort.as_records(records)
    top = recs[:, :4].copy().view(">u4").reshape(-1).astype(np.uint64)
    return ((top * np.uint64(partitions)) >> np.uint64(32)).astype(
        np.uint16 if partitions <= 1 << 16 else np.uint32)


def split_by_partition(records: np.ndarray, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Records grouped by partition (stable) and the start offset of each group.

    Returns (grouped (n, 100) array, offsets of length P+1).
    """
    recs = valsort.as_records(records)
    pid = partition_of(recs, partitions)
    order = np.argsort(pid, kind="stable")  # radix sort for 16-bit ids
    counts = np.bincount(pid, minlength=partitions)
    offsets = np.zeros(partitions + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    grouped = _take_rows(recs, order)
    return grouped, offsets


def _take_rows(recs: np.ndarray, order: np.ndarray) -> np.ndarray:
    # Gathering 100-byte void items is ~4x faster than fancy-indexing rows.
    rows = np.ascontiguousarray(recs).reshape(-1).view("V100").take(order)
    return rows.view(np.uint8).reshape(-1, RECORD_SIZE)


def sort_records(records: np.ndarray) -> np.ndarray:
    """Records sorted by their 10-byte key (unsigned bytewise), as a new array."""
    recs = valsort.as_records(records)
    if recs.shape[0] < 2:
        return recs.copy()
    hi, lo = valsort.key_parts(recs)
    order = np.argsort(hi)
    hs = hi[order]
    if np.any(hs[1:] == hs[:-1]):
        # Two keys share their first 8 bytes (rare for random keys, normal for
        # duplicates): order by the full key.
        order = np.lexsort((lo, hi))
    return _take_rows(recs, order)


# ------------------------------------------------------------- worker tasks

_worker_fs: Any = None


def _init_worker(fs_factory: Callable[[], Any]) -> None:
    global _worker_fs
    _worker_fs = fs_factory()
    close = getattr(_worker_fs, "close", None)
    if callable(close):
        multiprocessing.util.Finalize(_worker_fs, close, exitpriority=10)


def _fs(costs: "Costs | None" = None) -> Any:
    if _worker_fs is None:
        raise RuntimeError("graysort worker has no file system (initializer not run)")
    return _worker_fs if costs is None else _TimedFS(_worker_fs, costs)


class Costs:
    """Where one task's time went: seconds in metadata calls (open, close, size,
    ...), in read and write calls, the rest (compute: generate, partition, sort,
    summarize), and the CPU time of the whole worker process meanwhile (its
    client's I/O threads included)."""

    IO = ("meta", "read", "write")

    def __init__(self) -> None:
        self.t = dict.fromkeys(self.IO, 0.0)
        self._lock = threading.Lock()
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def add(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.t[kind] += seconds

    def done(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        out = dict(self.t)
        out["compute"] = max(wall - sum(self.t.values()), 0.0)
        out["wall"] = wall
        out["cpu"] = time.process_time() - self._cpu
        return out


class _TimedFile:
    """A file object charging its reads, writes and close to a Costs."""

    def __init__(self, f: BinaryIO, costs: Costs) -> None:
        self._f, self._c = f, costs

    def readinto(self, b) -> int:
        t = time.perf_counter()
        try:
            return self._f.readinto(b)
        finally:
            self._c.add("read", time.perf_counter() - t)

    def read(self, n: int = -1) -> bytes:
        t = time.perf_counter()
        try:
            return self._f.read(n)
        finally:
            self._c.add("read", time.perf_counter() - t)

    def write(self, b) -> int:
        t = time.perf_counter()
        try:
            return self._f.write(b)
        finally:
            self._c.add("write", time.perf_counter() - t)

    def close(self) -> None:
        t = time.perf_counter()
        try:
            self._f.close()
        finally:
            self._c.add("meta", time.perf_counter() - t)

    def __enter__(self) -> "_TimedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _TimedFS:
    """An FS charging metadata calls to a Costs and handing out timed files."""

    def __init__(self, fs: Any, costs: Costs) -> None:
        self._fs, self._c = fs, costs

    def _meta(self, name: str, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return getattr(self._fs, name)(*args)
        finally:
            self._c.add("meta", time.perf_counter() - t)

    def open(self, path: str, mode: str = "rb") -> _TimedFile:
        return _TimedFile(self._meta("open", path, mode), self._c)

    def size(self, path: str) -> int:
        return self._meta("size", path)


def _write_all(f: BinaryIO, arr: np.ndarray) -> None:
    if arr.size == 0:
        return
    mv = memoryview(np.ascontiguousarray(arr)).cast("B")
    while mv:
        n = f.write(mv)
        if n is None:  # non-blocking raw file with nothing written; never for ours
            raise OSError("short write")
        mv = mv[n:]


def _read_full(f: BinaryIO, mv: memoryview) -> int:
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            break
        got += n
    return got


def _read_records(f: BinaryIO, buf: np.ndarray) -> np.ndarray:
    """Fill buf with whole records from f; the filled part (short at end of file)."""
    got = _read_full(f, memoryview(buf).cast("B"))
    if got % RECORD_SIZE:
        raise ValueError(f"partial record at end of input ({got % RECORD_SIZE} bytes)")
    return buf[:got // RECORD_SIZE]


class _Overlap:
    """I/O handed to helper threads so that it overlaps the task's compute (and
    several writes are in flight at once); the time the task then spends
    waiting for it is charged to `kind` in its Costs. Calls on one file are
    never in flight together: a task waits for a batch before the next
    touches the same files."""

    def __init__(self, costs: Costs, threads: int) -> None:
        self.costs = costs
        self.pool = cf.ThreadPoolExecutor(max_workers=max(1, threads),
                                          thread_name_prefix="graysort-io")
        self.pending: list[cf.Future] = []

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        fut = self.pool.submit(fn, *args)
        self.pending.append(fut)
        return fut

    def wait(self, kind: str) -> list[Any]:
        pending, self.pending = self.pending, []
        if not pending:
            return []
        t = time.perf_counter()
        try:
            cf.wait(pending)  # all of them, so a failure leaves nothing running
            return [fut.result() for fut in pending]
        finally:
            self.costs.add(kind, time.perf_counter() - t)

    def __enter__(self) -> "_Overlap":
        return self

    def __exit__(self, *exc: Any) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True)


def _raw(f: Any) -> BinaryIO:
    """The untimed file behind a _TimedFile (for I/O done in helper threads,
    which _Overlap charges as waiting time instead)."""
    return f._f if isinstance(f, _TimedFile) else f


def _gen_task(path: str, start: int, count: int, chunk: int) -> tuple[int, int, dict]:
    """Write records [start, start+count) to path; return (count, checksum, costs).

    Chunk k is written while chunk k+1 is generated (two buffers)."""
    costs = Costs()
    fs = _fs(costs)
    total = 0
    rows = min(chunk, max(count, 1))
    bufs = [np.empty((rows, RECORD_SIZE), np.uint8) for _ in range(2 if count > chunk else 1)]
    with fs.open(path, "wb") as f, _Overlap(costs, 1) as io:
        raw = _raw(f)
        for k, s in enumerate(range(0, count, chunk)):
            n = min(chunk, count - s)
            recs = gensort.generate_into(bufs[k % len(bufs)][:n], start + s)
            total += valsort.checksum(recs)
            io.wait("write")  # chunk k-1 written: its buffer is free for k+1
            io.submit(_write_all, raw, recs)
        io.wait("write")
    return count, total, costs.done()


def _partition_task(in_path: str, tmp_fmt: str, partitions: int, chunk: int) -> tuple[int, dict]:
    """Split one input file into per-partition pieces; return (records, costs).

    Chunk k+1 is read while chunk k is partitioned (two buffers), and the
    pieces of chunk k are written, all at once, while chunk k+1 is
    partitioned."""
    costs = Costs()
    fs = _fs(costs)
    outs: list[BinaryIO] = []
    n = 0
    bufs = [np.empty((chunk, RECORD_SIZE), np.uint8) for _ in range(2)]
    try:
        # Create every piece, even empty ones: phase 2 then reads a fixed set.
        for p in range(partitions):
            outs.append(fs.open(tmp_fmt % p, "wb"))
        with fs.open(in_path, "rb") as f, _Overlap(costs, min(partitions, 8)) as io, \
                _Overlap(costs, 1) as rio:
            raw = _raw(f)
            rio.submit(_read_records, raw, bufs[0])
            k = 0
            while True:
                (recs,) = rio.wait("read")
                if recs.shape[0] == chunk:
                    k += 1
                    rio.submit(_read_records, raw, bufs[k % 2])
                if recs.shape[0]:
                    grouped, off = split_by_partition(recs, partitions)  # a copy: recs' buffer is free
                    io.wait("write")  # chunk k-1's pieces are out before chunk k's go
                    for p in np.flatnonzero(off[1:] > off[:-1]):
                        io.submit(_write_all, _raw(outs[p]), grouped[off[p]:off[p + 1]])
                    n += recs.shape[0]
                if recs.shape[0] < chunk:
                    break
            rio.wait("read")
            io.wait("write")
    finally:
        for o in outs:
            o.close()
    return n, costs.done()


def _read_piece(fs: Any, path: str, mv: memoryview) -> None:
    with fs.open(path, "rb") as f:
        got = _read_full(f, mv)
    if got != len(mv):
        raise OSError(f"short read on {path}: {got} of {len(mv)} bytes")


def _sort_task(pieces: list[str], out_path: str) -> tuple[int, dict]:
    """Read a partition's pieces (all at once), sort, write; return (records, costs)."""
    costs = Costs()
    fs = _fs(costs)
    sizes = [fs.size(p) for p in pieces]
    total = sum(sizes)
    if total % RECORD_SIZE:
        raise ValueError(f"partition pieces for {out_path} hold a partial record")
    recs = np.empty((total // RECORD_SIZE, RECORD_SIZE), np.uint8)
    mv = memoryview(recs.reshape(-1))
    with _Overlap(costs, min(len(pieces), 8)) as io:
        pos = 0
        for path, size in zip(pieces, sizes):
            if size:
                io.submit(_read_piece, _worker_fs, path, mv[pos:pos + size])
            pos += size
        io.wait("read")
    out = sort_records(recs)
    del recs, mv
    with fs.open(out_path, "wb") as f:
        _write_all(f, out)
    return out.shape[0], costs.done()


def _validate_task(out_path: str, sum_path: str, chunk: int) -> tuple[bytes, dict]:
    """valsort -o: summarize one output file and write its summary.

    Chunk k+1 is read while chunk k is checked (two buffers)."""
    costs = Costs()
    fs = _fs(costs)
    v = valsort.Validator()
    bufs = [np.empty((chunk, RECORD_SIZE), np.uint8) for _ in range(2)]
    with fs.open(out_path, "rb") as f, _Overlap(costs, 1) as io:
        raw = _raw(f)
        io.submit(_read_records, raw, bufs[0])
        k = 0
        while True:
            (recs,) = io.wait("read")
            if recs.shape[0] == chunk:
                k += 1
                io.submit(_read_records, raw, bufs[k % 2])
            if recs.shape[0]:
                v.update(recs)
            if recs.shape[0] < chunk:
                break
        io.wait("read")
    data = v.summary.to_bytes()
    with fs.open(sum_path, "wb") as f:
        f.write(data)
    return data, costs.done()


# ------------------------------------------------------------------- driver


@dataclasses.dataclass
class Result:
    """Outcome of one run; seconds per phase in ``times``."""

    records: int
    partitions: int
    workers: int
    input_checksum: int
    summary: Summary
    times: dict[str, float]
    errors: list[str]
    costs: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """Per phase, the tasks' Costs summed (worker-seconds; see Costs)."""

    @property
    def bytes(self) -> int:
        return self.records * RECORD_SIZE

    @property
    def sort_seconds(self) -> float:
        return self.times["phase1"] + self.times["phase2"]

    @property
    def bytes_per_min(self) -> float:
        return self.bytes / self.sort_seconds * 60 if self.sort_seconds else 0.0

    @property
    def records_per_s(self) -> float:
        return self.records / self.sort_seconds if self.sort_seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def table(self) -> list[tuple[str, str]]:
        """(item, value) rows for printing."""
        rows = [
            ("records", f"{self.records:,}"),
            ("bytes", _human(self.bytes)),
            ("partitions", str(self.partitions)),
            ("workers", str(self.workers)),
        ]
        for phase in ("startup", "gen", "phase1", "phase2", "validate", "cleanup"):
            if phase in self.times:
                rows.append((f"{phase} time", f"{self.times[phase]:.2f} s"))
        rows += [
            ("sort time (phase 1 + 2)", f"{self.sort_seconds:.2f} s"),
            ("sort throughput", f"{_human(self.bytes_per_min)}/min"),
            ("sort records/s", f"{self.records_per_s:,.0f}"),
            ("input checksum", format(self.input_checksum, "x")),
            ("output checksum", self.summary.checksum_hex),
            ("output records", f"{self.summary.records:,}"),
            ("duplicate keys", str(self.summary.duplicates)),
            ("unordered records", str(self.summary.unordered)),
            ("validation", "OK" if self.ok else "FAILED: " + "; ".join(self.errors)),
        ]
        return rows


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError  # unreachable


def _run_phase(pool: cf.Executor, name: str, fn: Callable, args_list: list[tuple],
               progress: Progress | None) -> list[Any]:
    futures = {pool.submit(fn, *args): i for i, args in enumerate(args_list)}
    results: list[Any] = [None] * len(futures)
    done = 0
    if progress:
        progress(name, 0, len(futures))
    try:
        for fut in cf.as_completed(futures):
            results[futures[fut]] = fut.result()
            done += 1
            if progress:
                progress(name, done, len(futures))
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    return results


def _clear(fs: Any, path: str) -> None:
    try:
        fs.rmtree(path)
    except FileNotFoundError:
        pass


def run_graysort(fs_factory: Callable[[], Any], records: int, partitions: int, workers: int,
                 dir: str = "/graysort", keep: bool = False,
                 progress: Progress | None = None, *, start_method: str = "spawn",
                 chunk_records: int = CHUNK_RECORDS) -> Result:
    """Generate ``records`` gensort records under ``dir``, sort them into
    ``partitions`` output files with ``workers`` processes, and validate.

    ``fs_factory`` is a picklable zero-argument callable returning an
    :class:`FS`; each worker process calls it once. ``progress(phase, done,
    total)`` is called as tasks finish. Without ``keep``, input and
    intermediate files are removed after validation (the output and its
    summaries stay). Any earlier input/, tmp/ and output/ under ``dir`` are
    removed first.
    """
    if records < 1:
        raise ValueError(f"records must be at least 1, got {records}")
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if records > gensort.MAX_RECORD:
        raise ValueError("records must be below 2**128")
    if chunk_records < 1:
        raise ValueError(f"chunk_records must be at least 1, got {chunk_records}")
    base = posixpath.normpath("/" + dir)
    in_dir, tmp_dir, out_dir = (posixpath.join(base, d) for d in ("input", "tmp", "output"))
    inputs = workers
    in_path = posixpath.join(in_dir, "in-%05d")
    tmp_path = posixpath.join(tmp_dir, "w%03d-p%05d")
    out_path = posixpath.join(out_dir, "part-%05d")
    sum_path = out_path + ".sum"

    fs = fs_factory()
    times: dict[str, float] = {}
    costs: dict[str, dict[str, float]] = {}
    try:
        for d in (in_dir, tmp_dir, out_dir):
            _clear(fs, d)
            fs.makedirs(d, exist_ok=True)

        import flyfs.bench.graysort as tasks  # stable module name for pickling under -m

        t = time.perf_counter()
        ctx = multiprocessing.get_context(start_method)
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                    initializer=tasks._init_worker,
                                    initargs=(fs_factory,)) as pool:
            # Start every worker (import numpy, connect) before timing phases.
            list(pool.map(time.sleep, [0.05] * workers))
            times["startup"] = time.perf_counter() - t

            t = time.perf_counter()
            gen = _run_phase(pool, "gen", tasks._gen_task,
                             [(in_path % w, s, n, chunk_records)
                              for w, (s, n) in enumerate(slices(records, inputs))], progress)
            times["gen"] = time.perf_counter() - t
            costs["gen"] = _sum_costs(r[-1] for r in gen)
            input_checksum = sum(c for _, c, _ in gen) & _MASK128

            t = time.perf_counter()
            done = _run_phase(pool, "phase1", tasks._partition_task,
                              [(in_path % w, posixpath.join(tmp_dir, f"w{w:03d}-p%05d"), partitions,
                                chunk_records) for w in range(inputs)], progress)
            times["phase1"] = time.perf_counter() - t
            costs["phase1"] = _sum_costs(r[-1] for r in done)

            t = time.perf_counter()
            done = _run_phase(pool, "phase2", tasks._sort_task,
                              [([tmp_path % (w, p) for w in range(inputs)], out_path % p)
                               for p in range(partitions)], progress)
            times["phase2"] = time.perf_counter() - t
            costs["phase2"] = _sum_costs(r[-1] for r in done)

            t = time.perf_counter()
            done = _run_phase(pool, "validate", tasks._validate_task,
                              [(out_path % p, sum_path % p, chunk_records) for p in range(partitions)],
                              progress)
            costs["validate"] = _sum_costs(r[-1] for r in done)
            summaries = []
            for p in range(partitions):  # valsort -s over the summary files, in order
                with fs.open(sum_path % p, "rb") as f:
                    summaries.append(Summary.from_bytes(f.read()))
            total = valsort.combine(summaries)
            times["validate"] = time.perf_counter() - t

        errors = []
        if total.records != records:
            errors.append(f"record count {total.records} != {records}")
        if total.checksum != input_checksum:
            errors.append(f"checksum {total.checksum_hex} != input {input_checksum:x}")
        if total.unordered:
            errors.append(f"{total.unordered} unordered records, first at {total.first_unordered}")

        if not keep:
            t = time.perf_counter()
            _clear(fs, in_dir)
            _clear(fs, tmp_dir)
            times["cleanup"] = time.perf_counter() - t
    finally:
        close = getattr(fs, "close", None)
        if callable(close):
            close()
    return Result(records, partitions, workers, input_checksum, total, times, errors, costs)


def _sum_costs(items) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in items:
        for k, v in c.items():
            out[k] = out.get(k, 0.0) + v
    return out


# ---------------------------------------------------------------------- CLI


def _count(text: str) -> int:
    """An integer, allowing 1_000_000, 1e7 and k/M/G suffixes (powers of 1000)."""
    s = text.strip().replace("_", "")
    mult = {"k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        if "e" in s.lower():
            return int(float(s))
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None


QUICK = dict(records=200_000, partitions=4, workers=2)
DEFAULT_RECORDS = 10_000_000  # 1 GB, the size of the issue-6 goal
GOAL_RATIO = 1.3  # flyfs time / local time for the whole run (gen, sort, validate)


def _size(text: str) -> int:
    from flyfs.cluster.launcher import parse_size
    return parse_size(text)


def build_parser(prog: str = "flyfs bench graysort") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="GraySort benchmark: generate gensort records, sort them in two phases with\n"
                    "worker processes, validate like valsort; on flyfs, beside the same run on a\n"
                    "local directory.",
        epilog="examples: %(prog)s --quick   (temporary cluster, small run)\n"
               "          %(prog)s --cluster 127.0.0.1:8000 --records 10M --partitions 8 "
               "--workers 2 --local /tmp/gslocal\n"
               "          %(prog)s --records 10M --local /tmp/gs   (local directory only)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=_count, default=None,
                   help=f"records to sort, 100 bytes each (default {DEFAULT_RECORDS:,}; "
                        f"--quick {QUICK['records']:,})")
    p.add_argument("--partitions", type=_count, default=None, help="output partitions (default 8)")
    p.add_argument("--workers", type=_count, default=None,
                   help="worker processes (default: CPU count)")
    p.add_argument("--cluster", metavar="HOST:PORT", default=None,
                   help="run on the flyfs cluster whose mgmtd is at HOST:PORT")
    p.add_argument("--temp-cluster", action="store_true",
                   help="run on a temporary cluster started for this run (the default when "
                        "neither --cluster nor --local is given, and with --quick)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="parent directory of the temporary cluster and local baseline "
                        "(default: the system temp dir)")
    p.add_argument("--meta", metavar="HOST:PORT", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local", metavar="DIR", default=None,
                   help="the local directory for the baseline run; alone (no --cluster, "
                        "--temp-cluster or --quick): run only there")
    p.add_argument("--no-local", action="store_true",
                   help="skip the local baseline run when running on flyfs")
    p.add_argument("--local-fsync", action="store_true",
                   help="fsync every local file written, at close (a durable baseline: flyfs "
                        "makes every chunk durable on each replica before acknowledging it)")
    p.add_argument("--replicas", type=int, default=3,
                   help="replicas per chain of the temporary cluster (default 3)")
    p.add_argument("--chunk-size", type=_size, default=4 << 20,
                   help="chunk size of the temporary cluster (default 4MiB)")
    p.add_argument("--dir", default="/graysort", help="benchmark directory inside the file system")
    p.add_argument("--keep", action="store_true", help="keep input and intermediate files")
    p.add_argument("--quick", action="store_true",
                   help=f"a small run ({QUICK['records']:,} records, {QUICK['partitions']} "
                        f"partitions, {QUICK['workers']} workers) for a smoke test")
    p.add_argument("--start-method", default="spawn", choices=["spawn", "forkserver", "fork"],
                   help="multiprocessing start method (default spawn)")
    return p


def _fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    base = QUICK if args.quick else dict(records=DEFAULT_RECORDS, partitions=8,
                                         workers=os.cpu_count() or 1)
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def print_result(result: Result, out=None) -> None:
    out = out or sys.stdout
    rows = result.table()
    w = max(len(k) for k, _ in rows)
    print(f"{'item':<{w}}  value", file=out)
    print(f"{'-' * w}  {'-' * 20}", file=out)
    for k, v in rows:
        print(f"{k:<{w}}  {v}", file=out)


def console_progress(out=None) -> Progress:
    """A progress callback printing one line per finished task."""
    out = out or sys.stdout
    start: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:
            start[phase] = now
            print(f"[{phase}] {total} tasks", file=out, flush=True)
        else:
            print(f"[{phase}] {done}/{total} done, {now - start.get(phase, now):.1f} s",
                  file=out, flush=True)

    return progress


def run_cli(args: argparse.Namespace, fs_factory: Callable[[], Any], where: str) -> int:
    """Print parameters, run with progress, print the result table; exit status."""
    print(f"graysort on {where}: records={args.records:,} ({_human(args.records * RECORD_SIZE)}) "
          f"partitions={args.partitions} workers={args.workers} dir={args.dir} keep={args.keep}",
          flush=True)
    result = run_graysort(fs_factory, args.records, args.partitions, args.workers, dir=args.dir,
                          keep=args.keep, progress=console_progress(),
                          start_method=args.start_method)
    print()
    print_result(result)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _fill_defaults(build_parser().parse_args(argv))
    on_flyfs = bool(args.cluster or args.temp_cluster or args.quick or not args.local)
    try:
        if not on_flyfs:
            os.makedirs(args.local, exist_ok=True)
            return run_cli(args, LocalFS(args.local, fsync=args.local_fsync),
                           f"local directory {os.path.abspath(args.local)}")
        return run_compare(args)
    except ValueError as e:
        print(f"graysort: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, TimeoutError) as e:
        print(f"graysort: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from flyfs.cluster.mgmtd_client import MgmtdError
        if isinstance(e, MgmtdError):  # e.g. no mgmtd at --cluster
            print(f"graysort: {e}", file=sys.stderr)
            return 1
        raise


# ------------------------------------------------------------ flyfs vs local


class _Watch:
    """Progress bars per phase, plus each phase's wall time and the CPU seconds
    the cluster's daemons spent in it (clusters started here only)."""

    def __init__(self, label: str, cluster: Any = None) -> None:
        from flyfs.bench import report
        self.label = label
        self.cluster = cluster
        self.daemon_cpu: dict[str, dict[str, float]] = {}
        self._before: dict[str, float] = {}
        self._bars = report.PhaseBars(f"{label} ", on_phase=self._phase_done)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if done == 0 and self.cluster is not None:
            self._before = self.cluster.cpu()
        if done >= total and self.cluster is not None:
            from flyfs.bench.suite import cpu_delta
            self.daemon_cpu[phase] = cpu_delta(self._before, self.cluster.cpu())
        self._bars(phase, done, total)

    def _phase_done(self, phase: str, seconds: float) -> None:
        print(f"  {self.label}: {phase} done in {seconds:.2f} s", flush=True)


def _used_bytes(address: str) -> tuple[int, int, float]:
    """(bytes the cluster's targets hold, the longest chain's length, the age in seconds
    of the oldest storage heartbeat those bytes come from), from mgmtd."""
    from flyfs.cluster import status
    info = status.fetch(address)
    ages = [n["last_heartbeat_ms"] / 1000 for n in info["nodes"] if n["type"] == "storage"]
    return (sum(t["used_bytes"] for t in info["targets"]),
            max((len(c["targets"]) for c in info["chains"]), default=1),
            max(ages, default=0.0) if all(a >= 0 for a in ages) else float("inf"))


def settle(address: str, before: int, keep_bytes: int, timeout: float = 60.0,
           still: float = 6.0) -> float:
    """Wait until the cluster at `address` holds at most `before` + `keep_bytes` x its
    replicas (what the run leaves behind) and what its storage daemons report has not
    changed for `still` seconds (longer than the metadata server's GC interval, 5 s):
    flyfs has removed the run's input and intermediate files in the background, and
    whatever else was queued for removal. Returns the seconds waited."""
    t0 = time.monotonic()
    last, since = None, t0
    while True:
        used, replicas, age = _used_bytes(address)
        now = time.monotonic()
        if used != last:
            last, since = used, now
        # only figures every storage daemon reported after the run count
        if (age < now - t0 and now - since >= still
                and used <= before + keep_bytes * replicas * 1.01 + (1 << 20)):
            break
        if now - t0 > timeout:
            print(f"flyfs: still {used - before:,} bytes above the start after {timeout:.0f} s",
                  flush=True)
            break
        time.sleep(0.5)
    return time.monotonic() - t0


def wait_quiet(path: str, timeout: float = 30.0, busy: float = 0.2) -> float:
    """Write the page cache back, then wait until the disk under `path` and the CPUs
    are quiet: no sector written or discarded and nothing in flight on the disk, and
    the CPUs busy less than `busy` of the time, over two half-second samples in a
    row. Each run then starts without paying for work an earlier one left behind
    (writeback, a cluster's background removals, discards of freed blocks,
    compactions). Returns the seconds waited (up to `timeout`)."""
    t0 = time.monotonic()
    os.sync()
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"

    def sample() -> tuple[tuple[int, int] | None, int, int, int]:
        disk, inflight = None, 0
        try:
            with open(dev) as f:
                v = [int(x) for x in f.read().split()]
            disk, inflight = (v[6], v[13] if len(v) > 13 else 0), v[8]  # sectors written, discarded
        except (OSError, ValueError, IndexError):
            pass  # no block device behind path (e.g. overlayfs): the CPUs alone decide
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        return disk, inflight, sum(cpu), cpu[3] + cpu[4]  # all, idle + iowait

    quiet = 0
    prev = sample()
    while quiet < 2 and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        cur = sample()
        total, idle = cur[2] - prev[2], cur[3] - prev[3]
        calm = cur[0] == prev[0] and cur[1] == 0 and total > 0 and (total - idle) / total < busy
        quiet = quiet + 1 if calm else 0
        prev = cur
    return time.monotonic() - t0


def _run_one(args: argparse.Namespace, fs_factory: Callable[[], Any], label: str,
             cluster: Any = None) -> tuple[Result, dict]:
    watch = _Watch(label, cluster)
    print(f"{label}: running", flush=True)
    res = run_graysort(fs_factory, args.records, args.partitions, args.workers, dir=args.dir,
                       keep=args.keep, progress=watch, start_method=args.start_method)
    print(f"{label}: validation {'OK' if res.ok else 'FAILED: ' + '; '.join(res.errors)}", flush=True)
    return res, watch.daemon_cpu


PHASES = ("gen", "phase1", "phase2", "validate")


def _total_seconds(r: Result) -> float:
    return sum(r.times.get(p, 0.0) for p in PHASES)


def compare_rows(fly: Result, local: Result | None) -> list[dict]:
    """The results table: item, flyfs, local, ratio (flyfs / local)."""
    from flyfs.bench import report
    rows = []

    def row(item: str, f: float | str, l: float | str | None, fmt=None) -> None:
        ratio = report.fmt_ratio(f, l) if isinstance(f, float) and isinstance(l, float) else ""
        show = fmt or str
        rows.append({"item": item, "flyfs": show(f),
                     "local": "" if l is None else show(l), "ratio": ratio})

    for ph in PHASES:
        row(f"{ph} time", fly.times[ph], local.times[ph] if local else None, report.fmt_seconds)
    row("sort time (phase 1 + 2)", fly.sort_seconds, local.sort_seconds if local else None,
        report.fmt_seconds)
    row("total time (gen to validate)", _total_seconds(fly), _total_seconds(local) if local else None,
        report.fmt_seconds)
    row("sort throughput", fly.bytes_per_min, local.bytes_per_min if local else None,
        lambda v: report.fmt_bytes(v) + "/min")
    row("sort throughput (TiB/min)", fly.bytes_per_min / (1 << 40),
        local.bytes_per_min / (1 << 40) if local else None, lambda v: f"{v:.6f}")
    row("sort records/s", fly.records_per_s, local.records_per_s if local else None,
        lambda v: f"{v:,.0f}")
    row("output checksum", fly.summary.checksum_hex, local.summary.checksum_hex if local else None)
    row("validation", "OK" if fly.ok else "FAILED", ("OK" if local.ok else "FAILED") if local else None)
    return rows


def profile_rows(label: str, r: Result, daemon_cpu: dict[str, dict[str, float]]) -> list[dict]:
    """Where each phase's time went: worker-seconds in metadata calls, reads,
    writes and compute (summed over the tasks), the workers' CPU, and the
    daemons' CPU."""
    ncpu = os.cpu_count() or 1
    rows = []
    for ph in PHASES:
        c = r.costs.get(ph, {})
        d = daemon_cpu.get(ph, {})
        storage = sum(v for k, v in d.items() if k.startswith("storage"))
        other = sum(v for k, v in d.items() if not k.startswith("storage"))
        wall = r.times.get(ph, 0.0)
        busy = (c.get("cpu", 0.0) + storage + other) / (ncpu * wall) if wall else 0.0
        rows.append({"run": label, "phase": ph, "wall s": f"{wall:.2f}",
                     **{f"{k} s": f"{c.get(k, 0.0):.2f}" for k in ("meta", "read", "write", "compute")},
                     "worker cpu s": f"{c.get('cpu', 0.0):.2f}",
                     "storage cpu s": f"{storage:.2f}" if d else "-",
                     "meta+mgmtd cpu s": f"{other:.2f}" if d else "-",
                     "cpu busy": f"{busy * 100:.0f}%"})
    return rows


PROFILE_COLUMNS = ["run", "phase", "wall s", "meta s", "read s", "write s", "compute s",
                   "worker cpu s", "storage cpu s", "meta+mgmtd cpu s", "cpu busy"]


def run_compare(args: argparse.Namespace) -> int:
    """GraySort on flyfs (a given or temporary cluster), then, unless --no-local,
    the same run on a local directory; print both, their ratio and a profile."""
    import tempfile

    from flyfs.bench import report, suite
    from flyfs.bench.flyfs_fs import FlyfsFS

    local_dir = args.local
    temp_local = None
    if not args.no_local and not local_dir:
        if args.data_dir:
            os.makedirs(args.data_dir, exist_ok=True)
        local_dir = temp_local = tempfile.mkdtemp(prefix="flyfs-graysort-local-", dir=args.data_dir)
    try:
        with suite.cluster(args.cluster, data_dir=args.data_dir, replicas=args.replicas,
                           storage_nodes=max(3, args.replicas), chunk_size=args.chunk_size) as c:
            report.params(
                "flyfs bench graysort",
                records=f"{args.records:,} ({_human(args.records * RECORD_SIZE)})",
                partitions=args.partitions, workers=args.workers, dir=args.dir, keep=args.keep,
                cluster=c.describe(),
                local="(skipped)" if args.no_local else
                      f"{os.path.abspath(local_dir)}{' (temporary)' if temp_local else ''}"
                      f"{', fsync at close' if args.local_fsync else ''}",
                cpus=os.cpu_count(), start_method=args.start_method)
            # Each run starts on a quiet machine: nothing left to write back or remove.
            disk_path = local_dir or tempfile.gettempdir()
            print(f"waiting for a quiet machine: {wait_quiet(disk_path):.1f} s", flush=True)
            used_before = _used_bytes(c.address)[0]
            fly, fly_cpu = _run_one(args, FlyfsFS(c.address, args.meta), "flyfs", c)
            local = None
            if not args.no_local:
                # what the run leaves: its output; with --keep its input and intermediates too
                kept = args.records * RECORD_SIZE * (3 if args.keep else 1)
                waited = settle(c.address, used_before, kept)
                waited += wait_quiet(disk_path)
                print(f"flyfs's background removals done and a quiet machine again: {waited:.1f} s",
                      flush=True)
                os.makedirs(local_dir, exist_ok=True)
                local, _ = _run_one(args, LocalFS(local_dir, fsync=args.local_fsync), "local")
                if temp_local:
                    shutil.rmtree(temp_local, ignore_errors=True)
    finally:
        if temp_local:
            shutil.rmtree(temp_local, ignore_errors=True)
    print()
    if local:
        report.table(compare_rows(fly, local), ["item", "flyfs", "local", "ratio"])
        print("ratio = flyfs / local (times: above 1 means flyfs took longer; rates: below 1 "
              "means flyfs was slower)")
    else:
        report.table(compare_rows(fly, None), ["item", "flyfs"])
    print()
    prof = profile_rows("flyfs", fly, fly_cpu) + (profile_rows("local", local, {}) if local else [])
    report.table(prof, PROFILE_COLUMNS)
    print("meta/read/write/compute: worker-seconds inside metadata calls (open, stat, close, "
          "which flushes and, with --local-fsync, fsyncs), waiting for reads, waiting for writes, "
          "and the rest, summed over tasks; cpu busy: CPU used by the workers and daemons / "
          f"({os.cpu_count()} CPUs x wall)")
    if local:
        ratio = _total_seconds(fly) / max(_total_seconds(local), 1e-9)
        verdict = "met" if ratio <= GOAL_RATIO else "not met"
        print(f"\nflyfs / local total time: {ratio:.2f}x (goal <= {GOAL_RATIO}x: {verdict})")
    return 0 if fly.ok and (local is None or local.ok) else 1


if __name__ == "__main__":
    sys.exit(main())
