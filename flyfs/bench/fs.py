"""`flyfs bench fs`: file system throughput through the FUSE mount and the Python API,
beside the same workloads on a local directory in the same run.

    flyfs bench fs --cluster 127.0.0.1:8000 --mount /mnt/flyfs [--quick] [--size 1GiB]
    flyfs bench fs --quick          # a temporary cluster, mounted in a temporary directory

Without --cluster a temporary cluster is started (flyfs.bench.suite); without
--mount the cluster is mounted in a temporary directory when this process may
mount (root and /dev/fuse), else only the Python API rows are measured.

Workloads (each on flyfs and on a local directory):
- sequential write then read of one file in 1 MiB blocks (the page cache is
  dropped for the file before reading: POSIX_FADV_DONTNEED);
- random 4 KiB reads of that file (readahead off: POSIX_FADV_RANDOM), through
  the mount and through the Python API (pread, and batch_read of all at once);
- small files: N x 4 KiB create+write, read, stat, unlink.
Prints parameters, progress, then a table with flyfs / local ratios. A
benchmark never fails for being slow.
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

MiB = 1 << 20
BLOCK = MiB


def _size(text: str) -> int:
    t = text.strip().lower().replace("ib", "").replace("b", "")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- workloads on a directory (mount or local) ----------------------------------------------------------

def seq_write(path: str, size: int, progress: report.Progress | None = None) -> float:
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < size:
            n = min(BLOCK, size - done)
            os.write(fd, block[:n] if n < BLOCK else block)
            done += n
            if progress:
                progress.update(n)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def seq_read(path: str, size: int) -> float:
    _drop_cache(path)
    buf = bytearray(BLOCK)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        total = 0
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    elapsed = time.perf_counter() - t0
    if total != size:
        raise RuntimeError(f"read {total} bytes of {path}, expected {size}")
    return elapsed


def random_reads(path: str, offsets: list[int]) -> float:
    _drop_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _timed(names: list[str], phases: dict) -> dict[str, float]:
    """Seconds each phase (name -> fn(path)) takes over every path, in order."""
    out = {}
    for phase, fn in phases.items():
        t0 = time.perf_counter()
        for p in names:
            fn(p)
        out[phase] = time.perf_counter() - t0
    return out


def small_files(d: str, n: int) -> dict[str, float]:
    os.makedirs(d, exist_ok=True)
    data = os.urandom(4096)

    def create_write(p):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)

    def read(p):
        fd = os.open(p, os.O_RDONLY)
        os.read(fd, 8192)
        os.close(fd)

    return _timed([os.path.join(d, f"f{i:06d}") for i in range(n)],
                  {"create+write": create_write, "read": read, "stat": os.stat, "unlink": os.unlink})


# ---- the same through the Python API ----------------------------------------------------------------------

def api_seq(fs, path: str, size: int) -> tuple[float, float]:
    block = os.urandom(BLOCK)
    t0 = time.perf_counter()
    with fs.open(path, "wb", buffering=0) as f:
        done = 0
        while done < size:
            n = min(BLOCK, size - done)
            f.write(block[:n] if n < BLOCK else block)
            done += n
    w = time.perf_counter() - t0
    buf = bytearray(BLOCK)
    t0 = time.perf_counter()
    with fs.open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return w, time.perf_counter() - t0


def api_random(fs, path: str, offsets: list[int]) -> tuple[float, float]:
    buf = bytearray(4096)
    with fs.open(path, "rb", buffering=0) as f:
        t0 = time.perf_counter()
        for off in offsets:
            fs.pread(f, buf, off)
        one = time.perf_counter() - t0
        bufs = [bytearray(4096) for _ in offsets]
        t0 = time.perf_counter()
        fs.batch_read([(f, off, 4096, b) for off, b in zip(offsets, bufs)])
        batch = time.perf_counter() - t0
    return one, batch


def api_small(fs, d: str, n: int) -> dict[str, float]:
    fs.makedirs(d, exist_ok=True)
    data = os.urandom(4096)
    return _timed([f"{d}/f{i:06d}" for i in range(n)],
                  {"create+write": lambda p: fs.write_bytes(p, data), "read": fs.read_bytes,
                   "stat": fs.stat, "unlink": fs.remove})


# ---- the run ---------------------------------------------------------------------------------------------------

def _rate(nbytes: float, seconds: float) -> str:
    return report.fmt_rate(nbytes / max(seconds, 1e-9) / MiB, " MiB/s")


def _ops(n: float, seconds: float) -> str:
    return report.fmt_rate(n / max(seconds, 1e-9), " op/s")


def _row(item: str, flyfs_s: float, local_s: float | None, fmt, amount, via: str) -> dict:
    ratio = "" if local_s is None else f"{local_s / max(flyfs_s, 1e-9):.3g}x"
    return {"item": item, "via": via, "flyfs": fmt(amount, flyfs_s),
            "local": "" if local_s is None else fmt(amount, local_s), "flyfs/local": ratio}


def _parse(argv):
    p = argparse.ArgumentParser(prog="flyfs bench fs", description=__doc__.split("\n\n")[0],
                                epilog="example: flyfs bench fs --cluster 127.0.0.1:8000 --mount /mnt/flyfs --quick")
    suite.add_cluster_args(p)
    p.add_argument("--meta", default=None, help="metadata server HOST:PORT (default: from mgmtd)")
    p.add_argument("--mount", default=None, help="where this cluster is mounted (default: mount it in a "
                   "temporary directory if possible)")
    p.add_argument("--local", default=None, help="local directory for the baseline (default: a temp dir)")
    p.add_argument("--size", type=_size, default=None, help="sequential file size (default 1GiB, --quick 64MiB)")
    p.add_argument("--files", type=int, default=None, help="small files (default 10000, --quick 1000)")
    p.add_argument("--reads", type=int, default=None, help="random 4 KiB reads (default 5000, --quick 1000)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.mount and not os.path.isdir(args.mount):
        print(f"flyfs bench fs: mount point {args.mount!r} is not a directory", file=sys.stderr)
        return 2
    with suite.cluster(args.cluster, data_dir=args.data_dir) as c:
        mount, own = args.mount, None
        if mount is None and os.geteuid() == 0 and os.path.exists("/dev/fuse"):
            from ..fuse.mount import main as mount_main, unmount
            own = tempfile.mkdtemp(prefix="flyfs-bench-mnt-")
            cmd = ["--cluster", c.address, own] + (["--meta", args.meta] if args.meta else [])
            if mount_main(cmd) == 0:
                mount = own
            else:
                print("flyfs bench fs: could not mount the cluster; measuring the Python API only",
                      file=sys.stderr)
        try:
            return _run(args, c.address, mount)
        finally:
            if own is not None:
                if mount == own:
                    ok, msg = unmount(own)
                    if not ok:
                        print(f"flyfs bench fs: unmounting {own}: {msg}", file=sys.stderr)
                        return 1
                os.rmdir(own)


def _run(args, address: str, mount: str | None) -> int:
    size = args.size or (64 * MiB if args.quick else 1 << 30)
    nfiles = args.files or (1000 if args.quick else 10_000)
    nreads = args.reads or (1000 if args.quick else 5000)
    from ..client import connect
    try:
        fs = connect(address, meta=args.meta)
    except Exception as e:
        print(f"flyfs bench fs: cannot reach the cluster at {address}: {e}", file=sys.stderr)
        return 1
    local_root = tempfile.mkdtemp(prefix="flyfs-bench-", dir=args.local)
    name = "bench-" + uuid.uuid4().hex[:8]
    api_dir = "/" + name
    fs.mkdir(api_dir)
    mnt_dir = os.path.join(mount, name) if mount else None
    report.params("flyfs bench fs", cluster=address, mount=mount or "(none: API only)",
                  local=local_root, size=f"{size / MiB:g} MiB", block="1 MiB", random_reads=nreads,
                  small_files=f"{nfiles} x 4 KiB")
    rng = random.Random(1)
    offsets = [rng.randrange(0, max(size - 4096, 1)) // 4096 * 4096 for _ in range(nreads)]
    rows = []
    try:
        local_big = os.path.join(local_root, "big")
        prog = report.Progress("local seq write", size)
        lw = seq_write(local_big, size, prog)
        prog.close()
        lr = seq_read(local_big, size)
        lrand = random_reads(local_big, offsets)
        if mnt_dir:
            prog = report.Progress("mount seq write", size)
            mw = seq_write(os.path.join(mnt_dir, "big"), size, prog)
            prog.close()
            mr = seq_read(os.path.join(mnt_dir, "big"), size)
            mrand = random_reads(os.path.join(mnt_dir, "big"), offsets)
            rows += [_row("seq write 1 MiB", mw, lw, _rate, size, "mount"),
                     _row("seq read 1 MiB", mr, lr, _rate, size, "mount"),
                     _row("random read 4 KiB", mrand, lrand, _ops, nreads, "mount")]
        print("api sequential ...", file=sys.stderr)
        aw, ar = api_seq(fs, f"{api_dir}/big-api", size)
        arand, abatch = api_random(fs, f"{api_dir}/big-api", offsets)
        rows += [_row("seq write 1 MiB", aw, lw, _rate, size, "api"),
                 _row("seq read 1 MiB", ar, lr, _rate, size, "api"),
                 _row("random read 4 KiB", arand, lrand, _ops, nreads, "api pread"),
                 _row("random read 4 KiB", abatch, lrand, _ops, nreads, "api batch_read")]
        print("small files ...", file=sys.stderr)
        local_small = small_files(os.path.join(local_root, "small"), nfiles)
        if mnt_dir:
            mount_small = small_files(os.path.join(mnt_dir, "small"), nfiles)
            rows += [_row(f"small files: {k}", mount_small[k], local_small[k], _ops, nfiles, "mount")
                     for k in mount_small]
        api_sm = api_small(fs, f"{api_dir}/small", nfiles)
        rows += [_row(f"small files: {k}", api_sm[k], local_small[k], _ops, nfiles, "api") for k in api_sm]
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
        try:
            _rmtree(fs, api_dir)
        except OSError as e:
            print(f"flyfs bench fs: cleaning {api_dir}: {e}", file=sys.stderr)
        fs.close()
    print()
    report.table(rows, ["item", "via", "flyfs", "local", "flyfs/local"])
    print("flyfs/local: flyfs throughput as a fraction of the local directory's (1.00x = as fast)")
    return 0


def _rmtree(fs, path: str) -> None:
    for e in fs.scandir(path):
        if e.is_dir(follow_symlinks=False):
            _rmtree(fs, e.path)
        else:
            fs.remove(e.path)
    fs.rmdir(path)


if __name__ == "__main__":
    sys.exit(main())
