"""`flyfs bench meta`: metadata operations per second, mdtest-style.

Phases (all clients in ONE shared directory, the hard case): create
(create + close, as creat(2) then close(2) through the client: over RPC the
close of the unwritten file goes through MetaClient.close_later(), batched
like FUSE's release, and the phase's clock stops only once every close is
acknowledged), stat (lookup),
rename (within the directory), remove (unlink). Each with 1 and 8 clients,
on rocksdb and etcd, several ways:

- direct:   MetaService called in-process (the cost of the service and the KV),
- grpc:     a `flyfs meta` process, one gRPC call per operation,
- batch:    the same process, operations sent 32 to a gRPC Batch call,
- net:      the same process, one call per operation over flyfs/net framing
            (the same meta.proto messages; MetaClient("tcp://...") as it is by
            default, coalesce off),
- netauto:  flyfs/net with MetaClient.coalesce on: calls issued in the same
            loop iteration (here by the concurrent clients) coalesced into one
            Batch call,
- netbatch: Batch calls of 32 over flyfs/net,

so the gap between direct and grpc is the RPC cost, and batch/net show how
much of it spreading calls or a lighter framing recovers. The `flyfs meta`
process runs with its defaults (--inline-max 4096: each create also writes
the new file's empty inline-data key); direct uses MetaConfig's (inline off). The server
process's CPU per operation is reported from /proc. Anchor measured on this
machine with MooseFS: ~3,400 creates/s, 8,200 stats/s, 4,200 removes/s.

    flyfs bench meta [--quick] [--ops N] [--engines rocksdb,etcd]
                     [--modes direct,grpc,batch,net,netauto,netbatch]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from . import report

ANCHOR = {"create": 3400, "stat": 8200, "rename": None, "remove": 4200}
PHASES = ("create", "stat", "rename", "remove")
BATCH = 32
MODES = ("direct", "grpc", "batch", "net", "netauto", "netbatch")


class _Direct:
    """The operations against an in-process MetaService."""

    def __init__(self, svc, who):
        self.svc, self.who = svc, who

    async def mkdir(self, name):
        return (await self.svc.mkdir(self.who, 1, name, 0o777)).ino

    async def run(self, phase, d, names, batch):
        svc, who = self.svc, self.who
        for name in names:
            if phase == "create":
                f, session = await svc.create(who, d, name, 0o644, os.O_WRONLY | os.O_EXCL)
                await svc.close(who, f.ino, session, length=0)
            elif phase == "stat":
                await svc.lookup(who, d, name)
            elif phase == "rename":
                await svc.rename(who, d, name, d, name + "r")
            else:
                await svc.unlink(who, d, name + "r")


class _Remote:
    """The operations through MetaClient: one RPC each, or Batch RPCs of BATCH ops."""

    def __init__(self, client):
        self.c = client

    async def mkdir(self, name):
        return (await self.c.mkdir(1, name, 0o777)).ino

    async def run(self, phase, d, names, batch):
        c = self.c
        if not batch:
            for name in names:
                if phase == "create":
                    # As the client library ends an unwritten file's session (creat + close):
                    # queued and sent in Batch calls; the phase waits for all of them.
                    f, session = await c.create(d, name, 0o644, os.O_WRONLY | os.O_EXCL)
                    c.close_later(f.ino, session)
                elif phase == "stat":
                    await c.lookup(d, name)
                elif phase == "rename":
                    await c.rename(d, name, d, name + "r")
                else:
                    await c.unlink(d, name + "r")
            if phase == "create":
                await c.flush_closes()
            return
        for i in range(0, len(names), BATCH):
            group = names[i:i + BATCH]
            if phase == "create":
                made = await c.batch([("create", {"parent": d, "name": n, "flags": os.O_WRONLY | os.O_EXCL})
                                      for n in group])
                _raise_any(made)
                _raise_any(await c.batch([("close", {"ino": f.ino, "session": s, "length": 0}) for f, s in made]))
            elif phase == "stat":
                _raise_any(await c.batch([("lookup", {"parent": d, "name": n}) for n in group]))
            elif phase == "rename":
                _raise_any(await c.batch([("rename", {"old_parent": d, "old_name": n, "new_parent": d,
                                                      "new_name": n + "r"}) for n in group]))
            else:
                _raise_any(await c.batch([("unlink", {"parent": d, "name": n + "r"}) for n in group]))


def _raise_any(results):
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


async def _measure(ops, clients: int, total: int, tag: str, server_pid: int | None) -> dict:
    per = max(1, total // clients)
    d = await ops.mkdir(f"bench-{tag}-{clients}-{time.monotonic_ns()}")
    names = [[f"c{i}-{j:06d}" for j in range(per)] for i in range(clients)]
    row = {}
    batch = tag.endswith("batch")
    for phase in PHASES:
        cpu0 = _cpu_seconds(server_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*[ops.run(phase, d, names[i], batch) for i in range(clients)])
        dt = time.perf_counter() - t0
        n = per * clients
        row[phase] = n / dt
        if server_pid is not None:
            row[phase + "_cpu"] = (_cpu_seconds(server_pid) - cpu0) / n * 1e3
    return row


async def _start_server(url: str):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from flyfs.metaserver.server import main; sys.exit(main())",
        "--kv", url, "--listen", "127.0.0.1:0", "--chains", "1,2,3,4", "--log-level", "WARNING", "--root-mode", "1777",
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    m = re.search(r"listening on [\d.]+:(\d+).*, net (tcp://\S+)", line)
    if not m:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"flyfs meta did not start: {line.strip()!r}")
    return proc, int(m.group(1)), m.group(2)


async def _bench(engines, modes, total, tmp) -> list[dict]:
    from ..client.meta_client import MetaClient
    from ..kv import open_engine
    from ..metaserver import Caller, MetaService, static_chain_table

    rows = []
    etcd = None
    try:
        for engine in engines:
            if engine == "etcd":
                from ..kv.etcd_server import EtcdServer
                try:
                    etcd = EtcdServer(os.path.join(tmp, "etcd")).start()
                except Exception as e:
                    print(f"etcd: skipped ({e})")
                    continue
            for mode in modes:
                url = (etcd.url(f"bench-{mode}") if engine == "etcd"
                       else f"rocksdb://{os.path.join(tmp, 'rocks-' + mode)}")
                progress = report.Progress(f"{engine}/{mode}", 2)
                if mode == "direct":
                    kv = open_engine(url)
                    svc = MetaService(kv, chain_table=static_chain_table([1, 2, 3, 4]))
                    await svc.format(root_mode=0o777)
                    try:
                        for clients in (1, 8):
                            row = await _measure(_Direct(svc, Caller(1000, (1000,), "bench")), clients,
                                                 total, mode, None)
                            rows.append({"engine": engine, "mode": mode, "clients": clients, **row})
                            progress.update()
                    finally:
                        await kv.close()
                else:
                    proc, port, net_address = await _start_server(url)
                    target = net_address if mode.startswith("net") else f"127.0.0.1:{port}"
                    try:
                        async with MetaClient(target, user=Caller(1000, (1000,))) as c:
                            c.coalesce = mode == "netauto"
                            for clients in (1, 8):
                                row = await _measure(_Remote(c), clients, total, mode, proc.pid)
                                rows.append({"engine": engine, "mode": mode, "clients": clients, **row})
                                progress.update()
                    finally:
                        proc.terminate()
                        await proc.wait()
                progress.close()
            if etcd is not None:
                etcd.stop()
                etcd = None
    finally:
        if etcd is not None:
            etcd.stop()
    return rows


def _fmt(row: dict, phase: str) -> str:
    v = row.get(phase)
    if v is None:
        return "-"
    cpu = row.get(phase + "_cpu")
    return f"{v:,.0f}" + (f" ({cpu:.2f} ms)" if cpu is not None else "")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flyfs bench meta", description=__doc__.split("\n\n")[0],
                                epilog="example: flyfs bench meta --quick --engines rocksdb")
    p.add_argument("--quick", action="store_true", help="few operations per phase (a smoke run)")
    p.add_argument("--ops", type=int, default=0, help="operations per phase (default 2000, quick 400)")
    p.add_argument("--engines", default="rocksdb,etcd")
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args(argv)
    total = args.ops or (400 if args.quick else 2000)
    engines = [e for e in args.engines.split(",") if e]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
    report.params("flyfs bench meta", engines=", ".join(engines), modes=", ".join(modes),
                  ops_per_phase=total, clients="1, 8", directory="one shared directory",
                  batch_size=BATCH)
    tmp = tempfile.mkdtemp(prefix="flyfs-bench-meta-")
    try:
        rows = asyncio.run(_bench(engines, modes, total, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = [{"engine": r["engine"], "mode": r["mode"], "clients": r["clients"],
              **{f"{ph}/s": _fmt(r, ph) for ph in PHASES}} for r in rows]
    table.append({"engine": "MooseFS", "mode": "anchor", "clients": "-",
                  **{f"{ph}/s": f"{v:,}" if v else "-" for ph, v in ANCHOR.items()}})
    print()
    report.table(table, ["engine", "mode", "clients", *[f"{ph}/s" for ph in PHASES]])
    print("(ms) = server CPU per operation; a create is create + close (the close of the empty file "
          "batched, as the client does)")
    best = {ph: max((r[ph] for r in rows if r["mode"] != "direct"), default=0) for ph in PHASES}
    for ph, anchor in ANCHOR.items():
        if anchor and best[ph]:
            print(f"best over RPC vs MooseFS, {ph}: {best[ph] / anchor:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
