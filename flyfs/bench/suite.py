"""Shared plumbing of the benchmarks that need a running cluster.

Every such bench takes ``--cluster HOST:PORT`` (use that cluster) and runs
standalone without it: `cluster()` then starts a temporary single-machine
cluster (flyfs.cluster.launcher.LocalCluster, no FUSE mount) in a temporary
directory and removes it afterwards.

    p = argparse.ArgumentParser(...)
    suite.add_cluster_args(p)
    args = p.parse_args(argv)
    with suite.cluster(args.cluster, data_dir=args.data_dir) as c:
        fs = flyfs.connect(c.address)
        before = c.cpu()               # CPU seconds of each daemon (clusters started here)
        ...

`Cluster.cpu()` reads each daemon's CPU time from /proc (for a cluster started
here, or a given one whose daemons run on this machine), so a bench can say
how much server CPU a workload cost.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

__all__ = ["Cluster", "cluster", "add_cluster_args", "process_cpu", "cpu_delta", "find_daemons"]


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """--cluster HOST:PORT and --data-dir DIR (where a temporary cluster lives)."""
    p.add_argument("--cluster", metavar="HOST:PORT", default=None,
                   help="mgmtd address of a running cluster (default: start a temporary one)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="parent directory of the temporary cluster (default: the system temp dir)")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def find_daemons(address: str) -> dict[str, int]:
    """`flyfs mgmtd|meta|storage` processes on this machine serving the cluster whose
    mgmtd is at `address` (mgmtd listening there, the others pointed at it):
    {"mgmtd-PID" / "meta-PID" / "storage-PID": pid}. Empty if none (or no /proc)."""
    found: dict[str, int] = {}
    addrs = set(address.split(","))
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "flyfs.cli" not in argv:
            continue
        rest = argv[argv.index("flyfs.cli") + 1:]
        if not rest or rest[0] not in ("mgmtd", "meta", "storage"):
            continue
        opts = dict(zip(rest[1:], rest[2:]))
        key = "--listen" if rest[0] == "mgmtd" else "--mgmtd"
        if addrs & set(opts.get(key, "").split(",")):
            found[f"{rest[0]}-{entry}"] = int(entry)
    return found


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


class Cluster:
    """A cluster a bench runs against: `address` (mgmtd HOST:PORT) and, when it
    was started here, `local` (the LocalCluster) and `data_dir`."""

    def __init__(self, address: str, local=None, data_dir: str | None = None):
        self.address = address
        self.local = local
        self.data_dir = data_dir
        self._found: dict[str, int] | None = None

    @property
    def started_here(self) -> bool:
        return self.local is not None

    def pids(self) -> dict[str, int]:
        """Daemon name -> pid: the daemons of a cluster started here, or for a given
        cluster on this machine the `flyfs mgmtd/meta/storage` processes whose
        command line names its address (as `flyfs up` starts them)."""
        if self.local is not None:
            return {n: d.pid for n, d in self.local.daemons.items() if d.alive}
        if self._found is None:
            self._found = find_daemons(self.address)
        return {n: p for n, p in self._found.items() if _exists(p)}

    def cpu(self) -> dict[str, float]:
        """Daemon name -> CPU seconds so far (empty when no daemon was found)."""
        return {n: process_cpu(p) for n, p in self.pids().items()}

    def describe(self) -> str:
        if self.local is None:
            return f"{self.address} (given)"
        lc = self.local
        return (f"{self.address} (temporary: {lc.storage_nodes} storage nodes x {lc.targets_per_node} "
                f"targets, {lc.replicas} replicas, chunk {lc.chunk_size >> 20} MiB, in {self.data_dir})")


def _wait_meta_registered(lc, timeout: float) -> None:
    """Wait until mgmtd lists a live metadata server: the meta daemon's port opens
    (all LocalCluster.start waits for) before it has registered, and a client
    connecting in between finds no metadata server."""
    from flyfs.proto import mgmtd_pb2
    deadline = time.monotonic() + timeout
    while True:
        info = lc.routing()
        if any(n.type == mgmtd_pb2.NODE_META and n.alive for n in info.nodes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no metadata server registered with mgmtd within {timeout:g} s; "
                               f"see {lc.data_dir}/logs")
        time.sleep(0.05)


@contextlib.contextmanager
def cluster(address: str | None = None, *, data_dir: str | None = None, keep: bool = False,
            quiet: bool = False, **cluster_options) -> Iterator[Cluster]:
    """Yield a Cluster: the one at `address`, or a temporary LocalCluster (no mount)
    started in a fresh directory under `data_dir` and stopped and removed on exit
    (kept with `keep`). `cluster_options` go to LocalCluster (storage_nodes,
    replicas, chunk_size, ...)."""
    if address:
        from flyfs.client.fs import parse_address
        yield Cluster(parse_address(address))
        return
    from flyfs.cluster.launcher import LocalCluster
    if data_dir:
        os.makedirs(data_dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="flyfs-bench-cluster-", dir=data_dir)
    lc = LocalCluster(root, mount=None, **cluster_options)
    t0 = time.monotonic()
    try:
        if not quiet:
            print(f"starting a temporary cluster in {root} ...", file=sys.stderr, flush=True)
        lc.start()
        _wait_meta_registered(lc, 60.0)
        if not quiet:
            print(f"cluster up at {lc.mgmtd_address} in {time.monotonic() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        yield Cluster(lc.mgmtd_address, lc, root)
    finally:
        lc.stop()
        if keep:
            print(f"kept the temporary cluster's data in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
