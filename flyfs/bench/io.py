"""`flyfs bench io`: the client's batch read path, beside the same reads of a local file.

    flyfs bench io [--cluster HOST:PORT] [--size 256MiB] [--budget 64MiB] [--quick]

One file of `--size` random bytes is written to flyfs and to a local
directory. Then, for pieces of 4 KiB, 64 KiB and 1 MiB at random aligned
offsets (up to `--budget` bytes and `--max-pieces` pieces per size):

- flyfs batch_read: all pieces in one `FileSystem.batch_read` call (every
  piece in flight together, spread over the chains and replicas);
- flyfs pread: the same pieces one `pread` at a time (the latency-bound path);
- local: one `os.preadv` per piece on the local file.

And a KV-cache-like lookup: `--keys` values of `--value-size` bytes, one file
per key, fetched all at once with `batch_read` by path (each open is a
metadata lookup), against open + preadv + close per key locally.

Every byte read from flyfs is compared with the local copy. Both sides read
data written just before, so the local file and the storage daemons' chunk
files are both in the page cache: the ratio is the cost of flyfs's software
path (client, network, daemons, checksums) over a local read of cached data,
not of different disks. Without --cluster a temporary cluster is started.
Never fails for being slow.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import uuid

from . import report, suite
from .flyfs_fs import rmtree

KiB, MiB = 1 << 10, 1 << 20
PIECES = (4 * KiB, 64 * KiB, MiB)
COLUMNS = ["workload", "via", "pieces", "flyfs", "local", "flyfs/local"]


def _size(text: str) -> int:
    from flyfs.cluster.launcher import parse_size
    return parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flyfs bench io", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog="example: flyfs bench io --quick")
    suite.add_cluster_args(p)
    p.add_argument("--size", type=_size, default=None, help="file size (default 256MiB, --quick 32MiB)")
    p.add_argument("--budget", type=_size, default=None,
                   help="bytes read per piece size (default 64MiB, --quick 16MiB)")
    p.add_argument("--max-pieces", type=int, default=None,
                   help="pieces per piece size at most (default 4096, --quick 512)")
    p.add_argument("--preads", type=int, default=None,
                   help="one-at-a-time preads per piece size at most (default 1000, --quick 200)")
    p.add_argument("--keys", type=int, default=None, help="KV-cache-like keys (default 512, --quick 64)")
    p.add_argument("--value-size", type=_size, default=128 * KiB, help="bytes per key (default 128KiB)")
    p.add_argument("--local", metavar="DIR", default=None,
                   help="parent of the local baseline directory (default: the system temp dir)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    return p


def _defaults(a: argparse.Namespace) -> argparse.Namespace:
    q = a.quick
    for k, full, quick in (("size", 256 * MiB, 32 * MiB), ("budget", 64 * MiB, 16 * MiB),
                           ("max_pieces", 4096, 512), ("preads", 1000, 200), ("keys", 512, 64)):
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    if a.size < max(PIECES):
        raise ValueError(f"--size must be at least {max(PIECES)} bytes")
    return a


def _rate(nbytes: int, n: int, seconds: float) -> str:
    s = max(seconds, 1e-9)
    return f"{nbytes / s / MiB:,.1f} MiB/s, {n / s:,.0f} op/s"


def _row(workload: str, via: str, n: int, nbytes: int, fly_s: float, local_s: float) -> dict:
    # A rate ratio: flyfs throughput as a fraction of local (same bytes both sides).
    return {"workload": workload, "via": via, "pieces": n, "flyfs": _rate(nbytes, n, fly_s),
            "local": _rate(nbytes, n, local_s), "flyfs/local": report.fmt_ratio(local_s, fly_s)}


def _write_file(fs, path: str, local_path: str, size: int, rng: random.Random) -> None:
    block = rng.randbytes(4 * MiB)
    with fs.open(path, "wb") as f, open(local_path, "wb") as lf:
        done = 0
        while done < size:
            n = min(len(block), size - done)
            f.write(block[:n])
            lf.write(block[:n])
            done += n
            block = block[1:] + block[:1]  # different bytes in every block, cheaply


def local_reads(path: str, plan: list[tuple[int, memoryview]]) -> float:
    """One preadv per (offset, buffer); seconds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off, mv in plan:
            if os.preadv(fd, [mv], off) != len(mv):
                raise OSError(f"short local read at {off}")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def flyfs_batch(fs, f, plan: list[tuple[int, memoryview]]) -> float:
    t0 = time.perf_counter()
    counts = fs.batch_read([(f, off, len(mv), mv) for off, mv in plan])
    dt = time.perf_counter() - t0
    short = [i for i, ((_, mv), n) in enumerate(zip(plan, counts)) if n != len(mv)]
    if short:
        raise OSError(f"batch_read returned short pieces: {short[:5]}")
    return dt


def flyfs_preads(fs, f, plan: list[tuple[int, memoryview]]) -> float:
    t0 = time.perf_counter()
    for off, mv in plan:
        if fs.pread(f, mv, off) != len(mv):
            raise OSError(f"short flyfs pread at {off}")
    return time.perf_counter() - t0


def _check(a: bytearray, b: bytearray, what: str) -> None:
    if a != b:
        raise AssertionError(f"flyfs bench io: {what}: flyfs returned different bytes than the local file")


def run(fs, args: argparse.Namespace, local_root: str, fs_root: str) -> list[dict]:
    rng = random.Random(args.seed)
    path, lpath = f"{fs_root}/data", os.path.join(local_root, "data")
    steps = 1 + 3 * len(PIECES) + 1
    prog = report.Progress("io", steps)
    _write_file(fs, path, lpath, args.size, rng)
    prog.update()
    rows = []
    with fs.open(path, "rb", buffering=0) as f:
        for piece in PIECES:
            n = max(1, min(args.budget // piece, args.max_pieces))
            offs = [rng.randrange(args.size // piece) * piece for _ in range(n)]
            fly_buf, loc_buf = bytearray(n * piece), bytearray(n * piece)
            fmv, lmv = memoryview(fly_buf), memoryview(loc_buf)
            fplan = [(o, fmv[i * piece:(i + 1) * piece]) for i, o in enumerate(offs)]
            lplan = [(o, lmv[i * piece:(i + 1) * piece]) for i, o in enumerate(offs)]
            lt = local_reads(lpath, lplan)
            prog.update()
            bt = flyfs_batch(fs, f, fplan)
            _check(fly_buf, loc_buf, f"batch_read of {piece} B pieces")
            prog.update()
            m = min(n, args.preads)
            fly_buf[:] = bytes(len(fly_buf))
            pt = flyfs_preads(fs, f, fplan[:m])
            _check(fly_buf[:m * piece], loc_buf[:m * piece], f"pread of {piece} B pieces")
            lt_m = local_reads(lpath, lplan[:m])
            prog.update()
            label = f"random read {piece // KiB} KiB"
            rows.append(_row(label, "batch_read", n, n * piece, bt, lt))
            rows.append(_row(label, "pread", m, m * piece, pt, lt_m))
    rows += kv_lookup(fs, args, local_root, fs_root, rng)
    prog.update()
    prog.close()
    return rows


def kv_lookup(fs, args: argparse.Namespace, local_root: str, fs_root: str,
              rng: random.Random) -> list[dict]:
    """Batch get of every key (one file per key) by path, vs open/preadv/close each
    locally; then the same reads on files already open (the data path alone)."""
    vs, k = args.value_size, args.keys
    kdir, ldir = f"{fs_root}/kv", os.path.join(local_root, "kv")
    fs.makedirs(kdir, exist_ok=True)
    os.makedirs(ldir, exist_ok=True)
    value = rng.randbytes(vs)
    names = [f"key-{i:06d}" for i in range(k)]
    for i, name in enumerate(names):
        v = value[i % vs:] + value[:i % vs]
        fs.write_bytes(f"{kdir}/{name}", v)
        with open(os.path.join(ldir, name), "wb") as lf:
            lf.write(v)
    order = names[:]
    rng.shuffle(order)
    fly_buf, loc_buf = bytearray(k * vs), bytearray(k * vs)
    fmv, lmv = memoryview(fly_buf), memoryview(loc_buf)
    t0 = time.perf_counter()
    counts = fs.batch_read([(f"{kdir}/{name}", 0, vs, fmv[i * vs:(i + 1) * vs])
                            for i, name in enumerate(order)])
    fly_s = time.perf_counter() - t0
    if any(c != vs for c in counts):
        raise OSError("kv lookup: batch_read returned short values")
    t0 = time.perf_counter()
    for i, name in enumerate(order):
        fd = os.open(os.path.join(ldir, name), os.O_RDONLY)
        try:
            os.preadv(fd, [lmv[i * vs:(i + 1) * vs]], 0)
        finally:
            os.close(fd)
    loc_s = time.perf_counter() - t0
    _check(fly_buf, loc_buf, "kv lookup")
    label = f"kv-cache-like get, {vs // KiB} KiB values"
    rows = [_row(label, "batch_read by path", k, k * vs, fly_s, loc_s)]

    files = [fs.open(f"{kdir}/{name}", "rb", buffering=0) for name in order]
    fds = [os.open(os.path.join(ldir, name), os.O_RDONLY) for name in order]
    try:
        fly_buf[:] = bytes(len(fly_buf))
        t0 = time.perf_counter()
        fs.batch_read([(f, 0, vs, fmv[i * vs:(i + 1) * vs]) for i, f in enumerate(files)])
        fly_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, fd in enumerate(fds):
            os.preadv(fd, [lmv[i * vs:(i + 1) * vs]], 0)
        loc_s = time.perf_counter() - t0
    finally:
        for f in files:
            f.close()
        for fd in fds:
            os.close(fd)
    _check(fly_buf, loc_buf, "kv lookup on open files")
    rows.append(_row(label, "batch_read, files open", k, k * vs, fly_s, loc_s))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        args = _defaults(p.parse_args(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        p.error(str(e))
    from ..client import connect
    local_root = tempfile.mkdtemp(prefix="flyfs-bench-io-", dir=args.local)
    fs_root = "/bench-io-" + uuid.uuid4().hex[:8]
    try:
        with suite.cluster(args.cluster, data_dir=args.data_dir) as c:
            report.params("flyfs bench io", cluster=c.describe(), local=local_root,
                          file_size=f"{args.size / MiB:g} MiB",
                          pieces=", ".join(f"{x // KiB} KiB" for x in PIECES),
                          budget_per_size=f"{args.budget / MiB:g} MiB (at most {args.max_pieces} pieces; "
                                          f"at most {args.preads} one-at-a-time preads)",
                          kv_lookup=f"{args.keys} keys x {args.value_size // KiB} KiB, one file per key")
            try:
                fs = connect(c.address)
                fs.exists("/")
            except Exception as e:
                print(f"flyfs bench io: cannot reach the cluster at {c.address}: {e}", file=sys.stderr)
                return 1
            try:
                fs.makedirs(fs_root, exist_ok=True)
                rows = run(fs, args, local_root, fs_root)
            finally:
                try:
                    rmtree(fs, fs_root)
                except OSError as e:
                    print(f"flyfs bench io: cleaning {fs_root}: {e}", file=sys.stderr)
                fs.close()
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    print()
    report.table(rows, COLUMNS)
    print("flyfs/local: flyfs throughput as a fraction of the local file's (1.00x = as fast); "
          "both read cached data, every flyfs byte checked against the local copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
