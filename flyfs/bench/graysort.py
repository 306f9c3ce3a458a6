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
import time
from collections.abc import Callable, Iterator
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
    (calling the instance returns itself)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def __call__(self) -> "LocalFS":
        return self

    def __repr__(self) -> str:
        return f"LocalFS({self.root!r})"

    def _p(self, path: str) -> str:
        rel = posixpath.normpath("/" + path).lstrip("/")
        return os.path.join(self.root, rel)

    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        os.makedirs(self._p(path), exist_ok=exist_ok)

    def open(self, path: str, mode: str = "rb") -> BinaryIO:
        if "b" not in mode:
            raise ValueError(f"LocalFS opens binary files only, got mode {mode!r}")
        return open(self._p(path), mode)

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


def _fs() -> Any:
    if _worker_fs is None:
        raise RuntimeError("graysort worker has no file system (initializer not run)")
    return _worker_fs


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


def _read_chunks(f: BinaryIO, chunk_records: int) -> Iterator[np.ndarray]:
    buf = np.empty((chunk_records, RECORD_SIZE), np.uint8)
    mv = memoryview(buf).cast("B")
    while True:
        got = _read_full(f, mv)
        if got % RECORD_SIZE:
            raise ValueError(f"partial record at end of input ({got % RECORD_SIZE} bytes)")
        if got:
            yield buf[:got // RECORD_SIZE]
        if got < len(mv):
            return


def _gen_task(path: str, start: int, count: int, chunk: int) -> tuple[int, int, float]:
    """Write records [start, start+count) to path; return (count, checksum, seconds)."""
    t0 = time.perf_counter()
    fs = _fs()
    total = 0
    buf = np.empty((min(chunk, max(count, 1)), RECORD_SIZE), np.uint8)
    with fs.open(path, "wb") as f:
        for s in range(0, count, chunk):
            n = min(chunk, count - s)
            recs = gensort.generate_into(buf[:n], start + s)
            total += valsort.checksum(recs)
            _write_all(f, recs)
    return count, total, time.perf_counter() - t0


def _partition_task(in_path: str, tmp_fmt: str, partitions: int, chunk: int) -> tuple[int, float]:
    """Split one input file into per-partition pieces; return (records, seconds)."""
    t0 = time.perf_counter()
    fs = _fs()
    outs: list[BinaryIO] = []
    n = 0
    try:
        # Create every piece, even empty ones: phase 2 then reads a fixed set.
        for p in range(partitions):
            outs.append(fs.open(tmp_fmt % p, "wb"))
        with fs.open(in_path, "rb") as f:
            for recs in _read_chunks(f, chunk):
                grouped, off = split_by_partition(recs, partitions)
                for p in np.flatnonzero(off[1:] > off[:-1]):
                    _write_all(outs[p], grouped[off[p]:off[p + 1]])
                n += recs.shape[0]
    finally:
        for o in outs:
            o.close()
    return n, time.perf_counter() - t0


def _sort_task(pieces: list[str], out_path: str) -> tuple[int, float]:
    """Read a partition's pieces, sort, write; return (records, seconds)."""
    t0 = time.perf_counter()
    fs = _fs()
    sizes = [fs.size(p) for p in pieces]
    total = sum(sizes)
    if total % RECORD_SIZE:
        raise ValueError(f"partition pieces for {out_path} hold a partial record")
    recs = np.empty((total // RECORD_SIZE, RECORD_SIZE), np.uint8)
    mv = memoryview(recs.reshape(-1))
    pos = 0
    for path, size in zip(pieces, sizes):
        if size:
            with fs.open(path, "rb") as f:
                got = _read_full(f, mv[pos:pos + size])
            if got != size:
                raise OSError(f"short read on {path}: {got} of {size} bytes")
        pos += size
    out = sort_records(recs)
    del recs, mv
    with fs.open(out_path, "wb") as f:
        _write_all(f, out)
    return out.shape[0], time.perf_counter() - t0


def _validate_task(out_path: str, sum_path: str, chunk: int) -> tuple[bytes, float]:
    """valsort -o: summarize one output file and write its summary."""
    t0 = time.perf_counter()
    fs = _fs()
    with fs.open(out_path, "rb") as f:
        s = valsort.summarize_file(f, chunk)
    data = s.to_bytes()
    with fs.open(sum_path, "wb") as f:
        f.write(data)
    return data, time.perf_counter() - t0


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
            input_checksum = sum(c for _, c, _ in gen) & _MASK128

            t = time.perf_counter()
            _run_phase(pool, "phase1", tasks._partition_task,
                       [(in_path % w, posixpath.join(tmp_dir, f"w{w:03d}-p%05d"), partitions,
                         chunk_records) for w in range(inputs)], progress)
            times["phase1"] = time.perf_counter() - t

            t = time.perf_counter()
            _run_phase(pool, "phase2", tasks._sort_task,
                       [([tmp_path % (w, p) for w in range(inputs)], out_path % p)
                        for p in range(partitions)], progress)
            times["phase2"] = time.perf_counter() - t

            t = time.perf_counter()
            _run_phase(pool, "validate", tasks._validate_task,
                       [(out_path % p, sum_path % p, chunk_records) for p in range(partitions)],
                       progress)
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
    return Result(records, partitions, workers, input_checksum, total, times, errors)


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


def build_parser(prog: str = "python -m flyfs.bench.graysort") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="GraySort benchmark: generate gensort records, sort them in two phases "
                    "with worker processes, validate like valsort.",
        epilog="example: %(prog)s --records 10M --partitions 8 --workers 2 --local /tmp/gs")
    p.add_argument("--records", type=_count, required=True, help="records to sort (100 bytes each)")
    p.add_argument("--partitions", type=_count, default=8, help="output partitions (default 8)")
    p.add_argument("--workers", type=_count, default=os.cpu_count() or 1,
                   help="worker processes (default: CPU count)")
    p.add_argument("--local", metavar="DIR", required=True, help="run on this local directory")
    p.add_argument("--dir", default="/graysort", help="benchmark directory inside the file system")
    p.add_argument("--keep", action="store_true", help="keep input and intermediate files")
    p.add_argument("--start-method", default="spawn", choices=["spawn", "forkserver", "fork"],
                   help="multiprocessing start method (default spawn)")
    return p


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
    args = build_parser().parse_args(argv)
    try:
        os.makedirs(args.local, exist_ok=True)
        return run_cli(args, LocalFS(args.local), f"local directory {os.path.abspath(args.local)}")
    except ValueError as e:
        print(f"graysort: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
