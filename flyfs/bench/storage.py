"""`flyfs bench storage`: chunk write and read throughput through CRAQ chains.

Starts mgmtd and three storage daemons as child processes (each node has two
targets: one in a chain of 3, one in a chain of 1), then for a chain of
length 1 and of length 3 and each request size (1 MiB, 4 MiB) writes
`--size` bytes sequentially (consecutive chunks, `--depth` requests in
flight) and reads them back the same way, checking every byte. Beside it, in
the same run, the raw-socket baseline: plain blocking sockets of the kind the
cluster's clients use (a Unix socket between same-host peers, else TCP over
loopback; both are shown: flyfs/bench/netbase.py). Prints each figure and its
ratio to the baseline.
Goals: reads >= 70% of the raw socket, writes on a chain of 3 >= 25%.
Never fails for being slow.

Reads and writes are also compared with what the disk under the data
directory allows: the same request pattern written once and three times
(every replica of a chain of 3 on this one disk) with O_DIRECT, as the chunk
engine writes large aligned runs, from `--depth` writers per replica, then
read back with O_DIRECT (the "disk" rows; ratio "vs disk" beside each
figure; the data plane's reads come from disk too, as the engine reads whole
aligned blocks with O_DIRECT). The "cpu/MiB" column is CPU seconds per MiB moved, per process
(client = this process; storage daemons summed), read from /proc.
`--profile DIR` makes the daemons write their per-phase wall times there
(FLYFS_STORAGE_PROFILE, see flyfs/storage/server.py).

    flyfs bench storage [--size 256MiB] [--depth 4] [--chunk-size 4MiB] [--quick] [--data-dir DIR]
                        [--profile DIR] [--no-disk]
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time

from flyfs.bench import report
from flyfs.bench.netbase import raw_socket_throughput
from flyfs.net.tcp import local_sockets

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
    p.add_argument("--profile", help="directory where the daemons write per-phase times at exit")
    p.add_argument("--no-disk", action="store_true", help="skip the fdatasync disk-limit runs")
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

    def storage_cpu(self) -> float:
        """CPU seconds used so far by the storage daemons (summed)."""
        return sum(_proc_cpu(d.pid) for d in self.daemons[1:] if d.pid)


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_limit(root: str, total: int, req: int, chunk: int, depth: int, replicas: int) -> tuple[float, float]:
    """(write, read) bytes/s of the disk under `root` for the daemons' I/O pattern:
    `total` bytes written `replicas` times as `req`-sized O_DIRECT pwrites from an
    aligned buffer into `chunk`-sized files (what the chunk engine does with a
    large aligned write), `depth` writers per replica; then one replica's files
    read back the same way. Where O_DIRECT is refused, buffered writes each
    followed by fdatasync. The ceiling for the chain's writes and reads on one disk."""
    d = tempfile.mkdtemp(prefix="disk-limit-", dir=root)
    buf = mmap.mmap(-1, req)
    buf.write(os.urandom(req))
    per_chunk = chunk // req
    n = total // req
    fds: dict[tuple[int, int], int] = {}
    direct = True
    try:
        for r in range(replicas):
            for c in range(-(-n // per_chunk)):
                path = os.path.join(d, f"{r}.{c}")
                flags = os.O_RDWR | os.O_CREAT
                try:
                    fds[r, c] = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o644)
                except OSError:
                    direct = False
                    fds[r, c] = os.open(path, flags, 0o644)

        def write(r: int, i: int) -> None:
            fd = fds[r, i // per_chunk]
            os.pwrite(fd, buf, (i % per_chunk) * req)
            if not direct:
                os.fdatasync(fd)

        def read(r: int, i: int) -> None:
            os.preadv(fds[r, i // per_chunk], [rbufs[threading.get_ident()]], (i % per_chunk) * req)

        rbufs: dict[int, mmap.mmap] = {}

        def run(fn, copies: int) -> float:
            def worker(r: int, k: int) -> None:
                rbufs[threading.get_ident()] = mmap.mmap(-1, req)
                for i in range(k, n, depth):
                    fn(r, i)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(copies * depth) as ex:
                for f in [ex.submit(worker, r, k) for r in range(copies) for k in range(depth)]:
                    f.result()
            return total / (time.perf_counter() - t0)  # bytes of data per second, every copy made

        w = run(write, replicas)
        if not direct:
            for (r, c), fd in fds.items():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return w, run(read, 1)
    finally:
        for fd in fds.values():
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


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
                  pattern: bytes, between=lambda: None) -> tuple[float, float]:
    """Write then read `total` bytes in `req`-sized requests; returns (write B/s, read B/s).
    `between` is called after the writes and after the reads (before checking them)."""
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
    between()

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
    between()
    bad = short + [i for i in range(n) if view[i * req:(i + 1) * req] != data]
    view.release()
    if bad:
        raise RuntimeError(f"{len(bad)} reads returned wrong data (first: request {bad[0]})")
    return n * req / wt, n * req / rt


async def _bench(args, cluster: "_Cluster", root: str) -> list[dict]:
    mgmtd_addr = cluster.mgmtd
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
            # The baseline is the kind of socket the cluster's clients use: a Unix socket
            # where same-host peers use theirs (flyfs/net/tcp.py), else loopback TCP.
            raw_tcp = await asyncio.to_thread(raw_socket_throughput, args.size, req)
            raw = raw_tcp
            if local_sockets():
                raw = await asyncio.to_thread(raw_socket_throughput, args.size, req, unix=True)
                rows.append({"item": f"raw unix socket, {req // MiB} MiB blocks (the baseline)",
                             "value": report.fmt_rate(raw, "B/s"), "baseline": "-", "ratio": "1.00",
                             "goal": ""})
            rows.append({"item": f"raw tcp socket, {req // MiB} MiB blocks"
                         + ("" if local_sockets() else " (the baseline)"),
                         "value": report.fmt_rate(raw_tcp, "B/s"), "baseline": "-",
                         "ratio": f"{raw_tcp / raw:.2f}", "goal": ""})
            disk, disk_read = {}, None
            if not args.no_disk:
                for k in (1, 3):
                    disk[k], rd = await asyncio.to_thread(disk_limit, root, args.size, req, args.chunk_size,
                                                          args.depth, k)
                    disk_read = rd if disk_read is None else max(disk_read, rd)
                    rows.append({"item": f"disk: {k} x {req // MiB} MiB writes",
                                 "value": report.fmt_rate(disk[k], "B/s"), "baseline": "-", "ratio": "",
                                 "goal": ""})
                rows.append({"item": f"disk: {req // MiB} MiB reads", "value": report.fmt_rate(disk_read, "B/s"),
                             "baseline": "-", "ratio": "", "goal": ""})
            mib = args.size / MiB
            for name, chain in (("chain of 1", c1), ("chain of 3", c3)):
                cpu0 = (time.process_time(), cluster.storage_cpu())
                cpu = []
                w, r = await _run_io(sc, chain, inode, args.size, req, args.chunk_size, args.depth, pattern,
                                     lambda: cpu.append((time.process_time(), cluster.storage_cpu())))
                cpu_w = f"{(cpu[0][0] - cpu0[0]) / mib * 1e3:.2f} / {(cpu[0][1] - cpu0[1]) / mib * 1e3:.2f}"
                cpu_r = f"{(cpu[1][0] - cpu[0][0]) / mib * 1e3:.2f} / {(cpu[1][1] - cpu[0][1]) / mib * 1e3:.2f}"
                inode += 1
                replicas = 3 if name == "chain of 3" else 1
                goal_w = GOALS["write-3"] if name == "chain of 3" else None
                rows.append({"item": f"write, {name}, {req // MiB} MiB", "value": report.fmt_rate(w, "B/s"),
                             "baseline": report.fmt_rate(raw, "B/s"), "ratio": f"{w / raw:.2f}",
                             "vs disk": f"{w / disk[replicas]:.2f}" if disk else "",
                             "cpu ms/MiB client / storage": cpu_w,
                             "goal": f">= {goal_w:.2f} {'ok' if w / raw >= goal_w else 'MISSED'}"
                             if goal_w else ""})
                rows.append({"item": f"read, {name}, {req // MiB} MiB", "value": report.fmt_rate(r, "B/s"),
                             "baseline": report.fmt_rate(raw, "B/s"), "ratio": f"{r / raw:.2f}",
                             "vs disk": f"{r / disk_read:.2f}" if disk_read else "",
                             "cpu ms/MiB client / storage": cpu_r,
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
    if args.profile:
        os.environ["FLYFS_STORAGE_PROFILE"] = os.path.abspath(args.profile)
    cluster = _Cluster(root)
    try:
        cluster.start()
        try:
            import uvloop
            rows = uvloop.run(_bench(args, cluster, root))
        except ImportError:
            rows = asyncio.run(_bench(args, cluster, root))
    finally:
        cluster.stop()
        if not args.keep and not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    report.table(rows, ["item", "value", "baseline", "ratio", "vs disk", "cpu ms/MiB client / storage", "goal"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
