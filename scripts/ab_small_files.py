#!/usr/bin/env python3
"""Alternated A/B of small-file creates (and unlinks) between two targets, for a VM whose
speed drifts by 2x within minutes: batches go to A and B in turn, and what is
reported is the median of the per-round B/A ratios (each round's two batches ran
back to back, so drift cancels), beside each side's medians.

    scripts/ab_small_files.py --dirs MNT_A/x MNT_B/x          # two mounts (or any directories)
    scripts/ab_small_files.py --clusters HOST:PORT HOST:PORT  # two clusters, through the Python API
        [--rounds 8] [--batch 200] [--size 4096] [--cpu PATTERN]

A batch creates `--batch` files of `--size` bytes (open, write, close) in a fresh
directory, then unlinks them. `--cpu PATTERN` adds the CPU per file of the
processes whose command line matches PATTERN (pgrep -f; e.g. "flyfs.cli meta"),
read from /proc around each batch. Used for BENCHMARKS.md ("Eighth session").
"""
import argparse
import os
import statistics
import subprocess
import sys
import time


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def _cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


class _Local:
    """A directory through the kernel (a mount)."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def mkdir(self, p):
        os.mkdir(os.path.join(self.root, p))

    def create(self, p, data):
        with open(os.path.join(self.root, p), "wb") as f:
            f.write(data)

    def unlink(self, p):
        os.unlink(os.path.join(self.root, p))


class _Api:
    """A cluster through the Python API."""

    def __init__(self, address: str):
        import flyfs
        self.fs = flyfs.connect(address)
        self.root = f"/ab-{os.getpid()}"
        self.fs.makedirs(self.root, exist_ok=True)

    def mkdir(self, p):
        self.fs.mkdir(f"{self.root}/{p}")

    def create(self, p, data):
        with self.fs.open(f"{self.root}/{p}", "wb") as f:
            f.write(data)

    def unlink(self, p):
        self.fs.remove(f"{self.root}/{p}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--dirs", nargs=2, metavar=("A", "B"), help="two directories (e.g. in two mounts)")
    where.add_argument("--clusters", nargs=2, metavar=("A", "B"), help="two mgmtd addresses (Python API)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=200, help="files per batch (default %(default)s)")
    ap.add_argument("--size", type=int, default=4096, help="bytes per file (default %(default)s)")
    ap.add_argument("--cpu", help="pgrep -f pattern of processes whose CPU per file to report")
    args = ap.parse_args()
    if args.rounds < 1 or args.batch < 1 or args.size < 0:
        ap.error("--rounds and --batch must be at least 1, --size at least 0")
    sides = {"A": None, "B": None}
    for name, spec in zip("AB", args.dirs or args.clusters):
        sides[name] = _Local(spec) if args.dirs else _Api(spec)
    pids = _pids(args.cpu) if args.cpu else []
    data = os.urandom(args.size)
    res: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
    for rnd in range(args.rounds):
        for name in ("AB" if rnd % 2 == 0 else "BA"):
            side = sides[name]
            d = f"r{rnd}-{name}-{os.getpid()}"
            side.mkdir(d)
            names = [f"{d}/f{i}" for i in range(args.batch)]
            c0, t0 = _cpu(pids), time.perf_counter()
            for p in names:
                side.create(p, data)
            c1, t1 = _cpu(pids), time.perf_counter()
            for p in names:
                side.unlink(p)
            c2, t2 = _cpu(pids), time.perf_counter()
            n = args.batch
            res[name].append((n / (t1 - t0), (c1 - c0) / n * 1e6, n / (t2 - t1), (c2 - c1) / n * 1e6))
    for i, what in ((0, "creates"), (2, "unlinks")):
        for name in "AB":
            vals = [r[i] for r in res[name]]
            cpu = f"; CPU per op (--cpu) median {statistics.median(r[i + 1] for r in res[name]):.0f} us" \
                if pids else ""
            print(f"{what} {name}: median {statistics.median(vals):,.0f}/s "
                  f"(rounds {', '.join(f'{v:.0f}' for v in vals)}){cpu}")
        ratios = [b[i] / a[i] for a, b in zip(res["A"], res["B"])]
        print(f"{what} B/A per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
