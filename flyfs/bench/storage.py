"""`flyfs bench storage`: chunk write and read throughput through CRAQ chains.

Starts mgmtd and three storage daemons as child processes (each node has two
targets: one in a chain of 3, one in a chain of 1), then for a chain of
length 1 and of length 3 and each request size (1 MiB, 4 MiB) writes
`--size` bytes sequentially (consecutive chunks, `--depth` requests in
flight) and reads them back the same way, checking every byte. Beside it, in
the same run, the raw-socket baseline: plain blocking TCP over loopback
(flyfs/bench/netbase.py). Prints each figure and its ratio to the baseline.
Goals: reads >= 70% of the raw socket, writes on a chain of 3 >= 25%.
Never fails for being slow.

    flyfs bench storage [--size 256MiB] [--depth 4] [--chunk-size 4MiB] [--quick] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

from flyfs.bench import report
from flyfs.bench.netbase import raw_socket_throughput

MiB = 1 << 20
GOALS = {"read": 0.70, "write-3": 0.25}


def _size(text: str) -> int:
    from flyfs.cluster.launcher import parse_size
    return parse_size(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flyfs bench storage",
                                description="Sequential chunk write/read throughput through chains of "
                                            "1 and 3 storage daemons, against a raw socket baseline.",
                                epilog="example: flyfs bench storage --size 256MiB --depth 4")
    p.add_argument("--size", type=_size, default=256 * MiB, help="bytes per run (default 256MiB)")
    p.add_argument("--depth", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--chunk-size", type=_size, default=4 * MiB, help="chunk size (default 4MiB)")
    p.add_argument("--quick", action="store_true", help="64 MiB per run")
    p.add_argument("--data-dir", help="where the targets live (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    return p


class _Cluster:
    """mgmtd + 3 storage daemons (2 targets each) as child processes."""

    def __init__(self, root: str):
        from flyfs.cluster.procs import free_port
        self.root = root
        self.mgmtd_port = free_port()
        self.daemons = []

    @property
    def mgmtd(self) -> str:
        return f"127.0.0.1:{self.mgmtd_port}"

    def start(self) -> None:
        import uuid
        from flyfs.cluster.procs import Daemon, free_port, wait_port
        logs = os.path.join(self.root, "logs")
        m = Daemon("mgmtd", ["mgmtd", "--kv", f"memory://bench-{uuid.uuid4().hex}", "--listen", self.mgmtd,
                             "--log-level", "WARNING"], os.path.join(logs, "mgmtd.log")).start()
        self.daemons.append(m)
        wait_port("127.0.0.1", self.mgmtd_port, 60, m)
        for i in range(3):
            port = free_port()
            dirs = [os.path.join(self.root, f"node{i}", f"t{j}") for j in range(2)]
            for d in dirs:
                os.makedirs(d, exist_ok=True)
            d = Daemon(f"storage-{i}", ["storage", "--mgmtd", self.mgmtd, "--data", ",".join(dirs),
                                        "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"],
                       os.path.join(logs, f"storage-{i}.log")).start()
            self.daemons.append(d)
            wait_port("127.0.0.1", port, 60, d)

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


async def _setup_chains(mgmtd) -> tuple[int, int]:
    """(a chain of 3, a chain of 1): first targets of each node in one, a second target alone."""
    deadline = time.monotonic() + 60
    while True:
        info = await mgmtd.get_routing_info(force=True)
        if len(info.targets) >= 6:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("storage targets did not register")
        await asyncio.sleep(0.1)
    by_node: dict[int, list[int]] = {}
    for tid, t in sorted(info.targets.items()):
        by_node.setdefault(t.node_id, []).append(tid)
    firsts = [ts[0] for ts in by_node.values()]
    r3 = await mgmtd.create_chains(3, target_ids=firsts, table_id=1)
    r1 = await mgmtd.create_chains(1, target_ids=[list(by_node.values())[0][1]], table_id=2)
    c3, c1 = r3.chains[0].chain_id, r1.chains[0].chain_id
    while True:
        info = await mgmtd.get_routing_info(force=True)
        if all(s.name == "SERVING" for c in (c1, c3) for _, s in info.chains[c].targets):
            return c3, c1
        if time.monotonic() > deadline:
            raise RuntimeError("chains did not reach SERVING")
        await asyncio.sleep(0.1)


async def _run_io(sc, chain: int, inode: int, total: int, req: int, chunk: int, depth: int,
                  pattern: bytes) -> tuple[float, float]:
    """Write then read `total` bytes in `req`-sized requests; returns (write B/s, read B/s)."""
    from flyfs.client.storage_client import ReadPiece
    n = total // req
    per_chunk = chunk // req

    def where(i: int) -> tuple[int, int]:
        return i // per_chunk, (i % per_chunk) * req

    data = memoryview(pattern)[:req]
    sem = asyncio.Semaphore(depth)

    async def write(i: int) -> None:
        async with sem:
            idx, off = where(i)
            await sc.write(chain, inode, idx, off, data, chunk_size=chunk)

    t0 = time.perf_counter()
    await asyncio.gather(*(write(i) for i in range(n)))
    wt = time.perf_counter() - t0

    out = bytearray(n * req)    # touched before timing: no page faults while reading
    view = memoryview(out)
    short = []

    async def read(i: int) -> None:
        async with sem:
            idx, off = where(i)
            (got,) = await sc.batch_read([ReadPiece(chain, inode, idx, off, req, view[i * req:(i + 1) * req])])
            if got != req:
                short.append(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(read(i) for i in range(n)))
    rt = time.perf_counter() - t0
    bad = short + [i for i in range(n) if view[i * req:(i + 1) * req] != data]
    view.release()
    if bad:
        raise RuntimeError(f"{len(bad)} reads returned wrong data (first: request {bad[0]})")
    return n * req / wt, n * req / rt


async def _bench(args, mgmtd_addr: str) -> list[dict]:
    from flyfs.client.storage_client import StorageClient
    from flyfs.cluster.mgmtd_client import MgmtdClient
    mgmtd = MgmtdClient(mgmtd_addr)
    sc = StorageClient(mgmtd, max_request_bytes=8 * MiB)
    rows = []
    try:
        c3, c1 = await _setup_chains(mgmtd)
        pattern = os.urandom(4 * MiB)
        inode = 1
        for req in (1 * MiB, 4 * MiB):
            raw = await asyncio.to_thread(raw_socket_throughput, args.size, req)
            rows.append({"item": f"raw socket, {req // MiB} MiB blocks", "value": report.fmt_rate(raw, "B/s"),
                         "baseline": "-", "ratio": "1.00", "goal": ""})
            for name, chain in (("chain of 1", c1), ("chain of 3", c3)):
                w, r = await _run_io(sc, chain, inode, args.size, req, args.chunk_size, args.depth, pattern)
                inode += 1
                goal_w = GOALS["write-3"] if name == "chain of 3" else None
                rows.append({"item": f"write, {name}, {req // MiB} MiB", "value": report.fmt_rate(w, "B/s"),
                             "baseline": report.fmt_rate(raw, "B/s"), "ratio": f"{w / raw:.2f}",
                             "goal": f">= {goal_w:.2f} {'ok' if w / raw >= goal_w else 'MISSED'}"
                             if goal_w else ""})
                rows.append({"item": f"read, {name}, {req // MiB} MiB", "value": report.fmt_rate(r, "B/s"),
                             "baseline": report.fmt_rate(raw, "B/s"), "ratio": f"{r / raw:.2f}",
                             "goal": f">= {GOALS['read']:.2f} {'ok' if r / raw >= GOALS['read'] else 'MISSED'}"})
                print(f"   {name}, {req // MiB} MiB requests: write {report.fmt_rate(w, 'B/s')}, "
                      f"read {report.fmt_rate(r, 'B/s')}", flush=True)
    finally:
        await sc.close()
        await mgmtd.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv or [])
    if args.quick:
        args.size = 64 * MiB
    if args.size < 4 * MiB or args.chunk_size % MiB or args.chunk_size < 4 * MiB:
        print("flyfs bench storage: --size must be >= 4MiB and --chunk-size a multiple of 4MiB",
              file=sys.stderr)
        return 2
    args.size -= args.size % (4 * MiB)
    root = args.data_dir or tempfile.mkdtemp(prefix="flyfs-bench-storage-")
    report.params("storage: sequential chunk I/O through CRAQ chains", size=f"{args.size // MiB} MiB per run",
                  depth=args.depth, chunk_size=f"{args.chunk_size // MiB} MiB", data_dir=root,
                  cpus=os.cpu_count())
    cluster = _Cluster(root)
    try:
        cluster.start()
        try:
            import uvloop
            rows = uvloop.run(_bench(args, cluster.mgmtd))
        except ImportError:
            rows = asyncio.run(_bench(args, cluster.mgmtd))
    finally:
        cluster.stop()
        if not args.keep and not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    report.table(rows, ["item", "value", "baseline", "ratio", "goal"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
