#!/usr/bin/env python3
"""Where a small file's time goes: create + write + close, N times, with per-phase timers.

    scripts/small_files.py --cluster HOST:PORT [-n 1000] [--size 4096]   # the Python API
    scripts/small_files.py --dir /mnt/flyfs/x [-n 1000]                  # a mount (or any directory)

Prints files/s, the mean time of open / write / close, this process's CPU per
file and, with --cluster, the CPU per file of every flyfs daemon on this host
and of a `flyfs mount` (read from /proc), so a change can be measured where it lands. A diagnostic
for BENCHMARKS.md; `flyfs bench fs` is the benchmark.
"""
import argparse
import os
import subprocess
import sys
import time


def _cpu(pid: int) -> float:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def _daemons() -> dict[int, str]:
    out = subprocess.run(["pgrep", "-af", r"flyfs\.cli (storage|meta|mgmtd|mount)"], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line.split("flyfs.cli ")[1].split()[0] for line in out.splitlines() if line}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cluster", help="mgmtd HOST:PORT: go through the Python API")
    where.add_argument("--dir", help="a directory (e.g. in a flyfs mount): go through the kernel")
    p.add_argument("-n", type=int, default=1000, help="files (default %(default)s)")
    p.add_argument("--size", type=int, default=4096, help="bytes per file (default %(default)s)")
    args = p.parse_args()
    data = os.urandom(args.size)
    if args.cluster:
        import flyfs
        fs = flyfs.connect(args.cluster)
        d = f"/small-files-{os.getpid()}"
        fs.makedirs(d, exist_ok=True)

        def open_(i):
            return fs.open(f"{d}/f{i}", "wb", buffering=0)
    else:
        d = os.path.join(args.dir, f"small-files-{os.getpid()}")
        os.makedirs(d, exist_ok=True)

        def open_(i):
            return open(os.path.join(d, f"f{i}"), "xb", buffering=0)
    daemons = _daemons()
    before = {pid: _cpu(pid) for pid in daemons}
    phases = {"open": 0.0, "write": 0.0, "close": 0.0}
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(args.n):
        a = time.perf_counter()
        f = open_(i)
        b = time.perf_counter()
        f.write(data)
        c = time.perf_counter()
        f.close()
        e = time.perf_counter()
        phases["open"] += b - a
        phases["write"] += c - b
        phases["close"] += e - c
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = args.n
    print(f"{n / dt:,.0f} files/s; per file: " + ", ".join(f"{k} {v / n * 1e6:.0f} us" for k, v in phases.items())
          + f"; this process {cpu / n * 1e6:.0f} us CPU")
    if daemons:
        print("daemon CPU per file: " + ", ".join(
            f"{daemons[pid]}[{pid}] {(_cpu(pid) - before[pid]) / n * 1e6:.0f} us" for pid in sorted(daemons)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
