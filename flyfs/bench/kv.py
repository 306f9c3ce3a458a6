"""`flyfs bench kv`: transactions/s of the KV engines.

Workloads: a read-modify-write of one hot key, and a create-like transaction
(2 reads, 3 writes on fresh keys, as a metadata create does), each with 1 and
16 concurrent clients. Reports txn/s and the conflict-retry rate, beside a
baseline measured in the same run: the raw write rate of the engine's
substrate without transactions (see `baseline`).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time

from ..kv import open_engine
from . import report


async def _run(engine, workload: str, clients: int, seconds: float) -> tuple[int, int, float]:
    stop = time.monotonic() + seconds
    done = 0
    seq = 0

    async def rmw(txn):
        v = int(await txn.get(b"bench/hot") or b"0")
        txn.set(b"bench/hot", b"%d" % (v + 1))

    def create(i):
        async def fn(txn):
            parent = b"bench/inode/%08d" % (i % 64)
            await txn.get_many([parent, b"bench/dentry/%08d" % i])
            txn.set(b"bench/dentry/%08d" % i, b"d" * 32)
            txn.set(b"bench/inode/new%08d" % i, b"i" * 96)
            txn.set(b"bench/mtime/%08d" % (i % 64), b"t" * 16)
        return fn

    async def client():
        nonlocal done, seq
        while time.monotonic() < stop:
            if workload == "rmw":
                await engine.transact(rmw, max_retries=100_000)
            else:
                seq += 1
                await engine.transact(create(seq), max_retries=100_000)
            done += 1

    c0 = engine.stats.conflicts
    t0 = time.monotonic()
    await asyncio.gather(*[client() for _ in range(clients)])
    return done, engine.stats.conflicts - c0, time.monotonic() - t0


async def baseline(url: str, seconds: float, clients: int) -> float:
    """Raw writes/s of the engine's substrate, no transactions: what one commit costs underneath.

    memory: dict set; rocksdb: one synced single-put WriteBatch at a time (what an
    fdatasync-per-commit design would get); etcd: plain Put RPCs with `clients` in flight.
    """
    scheme = url.split("://")[0]
    stop = time.monotonic() + seconds
    n = 0
    if scheme == "memory":
        d = {}
        t0 = time.monotonic()
        while time.monotonic() < stop:
            for i in range(1000):
                d[b"k%d" % i] = b"v"
            n += 1000
        return n / (time.monotonic() - t0)
    if scheme == "rocksdb":
        from rocksdict import Options, Rdict, WriteBatch, WriteOptions
        path = tempfile.mkdtemp(prefix="flyfs-kvbase-")
        db = Rdict(path, Options(raw_mode=True))
        wo = WriteOptions()
        wo.sync = True
        t0 = time.monotonic()
        while time.monotonic() < stop:
            wb = WriteBatch(raw_mode=True)
            wb.put(b"k%d" % n, b"v" * 64)
            db.write(wb, wo)
            n += 1
        dt = time.monotonic() - t0
        db.close()
        shutil.rmtree(path, ignore_errors=True)
        return n / dt
    engine = open_engine(url)
    from aetcd.rpc import rpc_pb2 as pb
    stub = engine._kv()

    async def client(c):
        nonlocal n
        while time.monotonic() < stop:
            await stub.Put(pb.PutRequest(key=engine.prefix + b"base/%d" % c, value=b"v" * 64))
            n += 1
    t0 = time.monotonic()
    await asyncio.gather(*[client(c) for c in range(clients)])
    dt = time.monotonic() - t0
    await engine.close()
    return n / dt


async def bench_engine(url: str, seconds: float, progress: report.Progress) -> list[dict]:
    engine = open_engine(url)
    rows = []
    kind = url.split("://")[0]
    try:
        for clients in (1, 16):
            base = await baseline(url, seconds, clients)
            progress.update()
            for workload in ("rmw", "create"):
                n, conflicts, dt = await _run(engine, workload, clients, seconds)
                progress.update()
                rows.append({"engine": kind, "workload": workload, "clients": clients,
                             "txn/s": f"{n / dt:,.0f}", "baseline writes/s": f"{base:,.0f}",
                             "ratio": f"{n / dt / base:.2f}",
                             "retry rate": f"{conflicts / max(n, 1):.2f}"})
    finally:
        await engine.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flyfs bench kv", description=__doc__.splitlines()[0],
                                 epilog="example: flyfs bench kv --engine rocksdb:///tmp/kvbench")
    ap.add_argument("--engine", action="append",
                    help="engine URL (repeatable); default: memory, rocksdb in a temp dir, "
                         "and etcd on a local etcd server started for the run")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    ap.add_argument("--quick", action="store_true", help="1 s per measurement")
    args = ap.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    tmp = tempfile.mkdtemp(prefix="flyfs-kvbench-")
    etcd = None
    urls = args.engine
    if not urls:
        urls = ["memory://", f"rocksdb://{tmp}/rocks"]
        if shutil.which("etcd"):
            from ..kv.etcd_server import EtcdServer
            etcd = EtcdServer(os.path.join(tmp, "etcd")).start()
            urls.append(etcd.url("bench"))
    report.params("flyfs bench kv", engines=", ".join(urls), seconds_per_run=seconds,
                  workloads="rmw = read-modify-write of one key; create = 2 reads + 3 writes")
    try:
        rows = []
        progress = report.Progress("kv", 6 * len(urls))
        for url in urls:
            rows += asyncio.run(bench_engine(url, seconds, progress))
        progress.close()
        rows.sort(key=lambda r: (urls.index(next(u for u in urls if u.startswith(r["engine"]))),
                                 r["workload"] != "rmw", r["clients"]))
        report.table(rows, ["engine", "workload", "clients", "txn/s", "baseline writes/s", "ratio",
                            "retry rate"])
    finally:
        if etcd:
            etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
