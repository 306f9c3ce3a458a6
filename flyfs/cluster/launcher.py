"""`flyfs up`: a whole replicated cluster and a FUSE mount on this machine, in one command.

    flyfs up [--data-dir DIR] [--storage-nodes 3] [--targets-per-node 2] [--replicas 3]
             [--chunk-size 4MiB] [--kv rocksdb|etcd://HOST:PORT] [--mount DIR | --no-mount]
             [--host 127.0.0.1]

Starts a manager, a metadata server and the storage daemons as child
processes, builds the chains on first start, mounts, and once everything
serves prints exactly one line on stdout:

    flyfs up: mgmtd=HOST:PORT mount=PATH        (mount=- with --no-mount)

It runs until SIGINT/SIGTERM, then unmounts and stops every child. Children
die with it even on `kill -9` (PR_SET_PDEATHSIG), and a stale mount left by
such a death is cleared on the next start. Restarting with the same
--data-dir brings back every file: identities, ports and data live there.

Layout of the data dir: cluster.json (ports), mgmtd/kv and meta/kv (RocksDB,
each owned by its process), storage-N/target-M (one target each), logs/.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc

from ..proto import common_pb2, mgmtd_pb2, mgmtd_pb2_grpc
from .procs import Daemon, free_port, wait_port

SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
              "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'4MiB' -> 4194304; plain numbers are bytes."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):].strip()
    if not num or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4MiB, 512KiB, 1048576)")
    return int(float(num) * SIZE_UNITS[unit])


def is_stale_mount(path: str) -> bool:
    try:
        os.stat(path)
        return False
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == real for line in f if len(line.split()) > 1)
    except OSError:
        return os.path.ismount(path)


def force_unmount(path: str) -> None:
    for cmd in (["fusermount3", "-u", "-z", path], ["fusermount", "-u", "-z", path], ["umount", "-l", path]):
        if shutil.which(cmd[0]):
            if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                return


class LocalCluster:
    """The processes of one single-machine cluster, started and stopped together."""

    def __init__(self, data_dir: str, storage_nodes: int = 3, targets_per_node: int = 2,
                 replicas: int = 3, chunk_size: int = 4 << 20, kv: str = "rocksdb",
                 mount: str | None = None, host: str = "127.0.0.1", heartbeat_timeout: float | None = None,
                 sync_writes: bool = False, inline_max: int | None = None):
        if replicas > storage_nodes:
            raise ValueError(f"--replicas {replicas} needs at least {replicas} storage nodes, got {storage_nodes}")
        from ..metaserver.layout import MAX_CHUNK, MIN_CHUNK
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1):
            raise ValueError(f"--chunk-size {chunk_size} must be a power of two from {MIN_CHUNK} to {MAX_CHUNK}")
        if storage_nodes < 1 or targets_per_node < 1 or replicas < 1:
            raise ValueError("--storage-nodes, --targets-per-node and --replicas must be at least 1")
        self.data_dir = os.path.abspath(data_dir)
        self.storage_nodes = storage_nodes
        self.targets_per_node = targets_per_node
        self.replicas = replicas
        self.chunk_size = chunk_size
        self.kv = kv
        self.mount = os.path.abspath(mount) if mount else None
        self.host = host
        self.heartbeat_timeout = heartbeat_timeout
        self.sync_writes = sync_writes
        if inline_max is not None:
            from ..metaserver.inline import check_inline_max
            check_inline_max(inline_max)
        self.inline_max = inline_max   # None: the metadata server's default
        self.daemons: dict[str, Daemon] = {}
        self.ports: dict[str, int] = {}

    # ---- configuration ---------------------------------------------------------
    def _kv_url(self, role: str) -> str:
        if self.kv == "rocksdb":
            return f"rocksdb://{self.data_dir}/{role}/kv"
        if self.kv.startswith("etcd://"):
            return self.kv.rstrip("/") + f"/flyfs-{role}"
        if self.kv.startswith("memory"):
            raise ValueError("--kv memory would lose everything on restart; use rocksdb or etcd://HOST:PORT")
        raise ValueError(f"--kv must be 'rocksdb' or etcd://HOST:PORT, got {self.kv!r}")

    def _load_ports(self) -> None:
        path = os.path.join(self.data_dir, "cluster.json")
        saved = {}
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f).get("ports", {})
        names = ["mgmtd", "meta"] + [f"storage-{i}" for i in range(self.storage_nodes)]
        for name in names:
            port = saved.get(name)
            if not port or not _port_free(self.host, port):
                port = free_port(self.host)
            self.ports[name] = port
        with open(path + ".tmp", "w") as f:
            json.dump({"ports": self.ports, "storage_nodes": self.storage_nodes,
                       "targets_per_node": self.targets_per_node, "replicas": self.replicas}, f, indent=1)
        os.replace(path + ".tmp", path)

    @property
    def mgmtd_address(self) -> str:
        return f"{self.host}:{self.ports['mgmtd']}"

    def _daemon(self, name: str, args: list[str]) -> Daemon:
        d = Daemon(name, args, os.path.join(self.data_dir, "logs", f"{name}.log"))
        self.daemons[name] = d
        return d.start()

    # ---- lifecycle ------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        self._load_ports()
        deadline = time.monotonic() + timeout
        hb = ["--heartbeat-timeout", str(self.heartbeat_timeout)] if self.heartbeat_timeout else []
        m = self._daemon("mgmtd", ["mgmtd", "--kv", self._kv_url("mgmtd"), "--id", "mgmtd-0",
                                   "--listen", self.mgmtd_address, *hb])
        wait_port(self.host, self.ports["mgmtd"], _left(deadline), m)
        for i in range(self.storage_nodes):
            dirs = [os.path.join(self.data_dir, f"storage-{i}", f"target-{j}") for j in range(self.targets_per_node)]
            for d in dirs:
                os.makedirs(d, exist_ok=True)
            name = f"storage-{i}"
            s = self._daemon(name, ["storage", "--mgmtd", self.mgmtd_address, "--data", ",".join(dirs),
                                    "--listen", f"{self.host}:{self.ports[name]}"]
                              + (["--sync-writes"] if self.sync_writes else []))
            wait_port(self.host, self.ports[name], _left(deadline), s)
        self._ensure_chains(deadline)
        meta = self._daemon("meta", ["meta", "--kv", self._kv_url("meta"), "--mgmtd", self.mgmtd_address,
                                     "--listen", f"{self.host}:{self.ports['meta']}",
                                     "--chunk-size", str(self.chunk_size)]
                            + (["--sync-commits"] if self.sync_writes else [])
                            + (["--inline-max", str(self.inline_max)] if self.inline_max is not None else []))
        wait_port(self.host, self.ports["meta"], _left(deadline), meta)
        # Clients find the metadata server in the routing info: wait for its registration.
        while not any(n.type == mgmtd_pb2.NODE_META and n.alive for n in self.routing().nodes):
            self._check_children()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the metadata server did not register with mgmtd; see {meta.log_path}")
            time.sleep(0.1)
        if self.mount:
            self._mount(deadline)

    def _stub(self):
        channel = grpc.insecure_channel(self.mgmtd_address)
        return channel, mgmtd_pb2_grpc.MgmtdStub(channel)

    def routing(self) -> mgmtd_pb2.RoutingInfo:
        channel, stub = self._stub()
        with channel:
            reply = stub.GetRoutingInfo(mgmtd_pb2.GetRoutingInfoRequest(header=common_pb2.RequestHeader()),
                                        timeout=5)
        return reply.info

    def _ensure_chains(self, deadline: float) -> None:
        want = self.storage_nodes * self.targets_per_node
        while True:
            info = self.routing()
            if len(info.targets) >= want:
                break
            self._check_children()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(info.targets)} of {want} targets registered; see {self.data_dir}/logs")
            time.sleep(0.2)
        if not info.chains:
            channel, stub = self._stub()
            with channel:
                reply = stub.CreateChains(mgmtd_pb2.CreateChainsRequest(
                    header=common_pb2.RequestHeader(), replication=self.replicas, table_id=1), timeout=10)
            if reply.status.code:
                raise RuntimeError(f"creating chains failed: {reply.status.message}")
        while True:
            info = self.routing()
            if info.chains and all(t.public_state == mgmtd_pb2.PUBLIC_SERVING
                                   for c in info.chains for t in c.targets):
                return
            self._check_children()
            if time.monotonic() > deadline:
                raise TimeoutError(f"chains did not all reach SERVING; see {self.data_dir}/logs")
            time.sleep(0.2)

    def _mount(self, deadline: float) -> None:
        if is_stale_mount(self.mount) or is_mounted(self.mount):
            force_unmount(self.mount)
        os.makedirs(self.mount, exist_ok=True)
        d = self._daemon("mount", ["mount", "--cluster", self.mgmtd_address, self.mount, "-f"])
        while not is_mounted(self.mount):
            if not d.alive:
                raise RuntimeError(f"mount exited with {d.returncode}: {d.log_tail(5)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.mount} not mounted; see {d.log_path}")
            time.sleep(0.1)

    def _check_children(self) -> None:
        for d in self.daemons.values():
            if not d.alive:
                raise RuntimeError(f"{d.name} exited with {d.returncode}:\n{d.log_tail(10)}")

    def stop(self) -> None:
        if self.mount and is_mounted(self.mount):
            force_unmount(self.mount)
        order = ["mount", "meta"] + [n for n in self.daemons if n.startswith("storage-")] + ["mgmtd"]
        for name in order:
            if name in self.daemons:
                self.daemons[name].stop()

    def supervise(self, stop_flag) -> None:
        """Restart any daemon that dies (crash or kill) until stop_flag() is true."""
        while not stop_flag():
            for name, d in list(self.daemons.items()):
                if not d.alive and not stop_flag():
                    print(f"flyfs up: {name} exited with {d.returncode}; restarting (log: {d.log_path})",
                          file=sys.stderr)
                    if name == "mount" and self.mount:
                        force_unmount(self.mount)
                    d.start()
            time.sleep(0.5)


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())


def _port_free(host: str, port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flyfs up", description="Start a whole replicated flyfs cluster "
                                 "(manager, metadata server, storage daemons) and a FUSE mount on this machine.",
                                 epilog="example: flyfs up --data-dir .flyfs --mount ./mnt")
    ap.add_argument("--data-dir", default=".flyfs", help="where all state lives (default .flyfs)")
    ap.add_argument("--storage-nodes", type=int, default=3)
    ap.add_argument("--targets-per-node", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--chunk-size", type=parse_size, default=4 << 20, help="default chunk size (e.g. 4MiB)")
    ap.add_argument("--kv", default="rocksdb", help="rocksdb (default) or etcd://HOST:PORT")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--mount", default=None, help="mount point (default: DATA_DIR/../mnt)")
    g.add_argument("--no-mount", action="store_true")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--sync-writes", action="store_true",
                    help="storage fdatasyncs every update and the metadata server syncs every "
                         "commit before acknowledging it (default: replicas hold updates in memory, "
                         "disks are synced every 5 s and on fsync, as 3FS does; metadata commits "
                         "are synced within 0.1 s and on fsync)")
    ap.add_argument("--inline-max", type=parse_size, default=None,
                    help="new files keep up to this many bytes in the metadata store instead of chunks "
                         "(default 4KiB; 0: off)")
    ap.add_argument("--heartbeat-timeout", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mount = None if args.no_mount else (args.mount or os.path.join(os.path.dirname(
        os.path.abspath(args.data_dir)), "mnt"))
    try:
        cluster = LocalCluster(args.data_dir, args.storage_nodes, args.targets_per_node, args.replicas,
                               args.chunk_size, args.kv, mount, args.host, args.heartbeat_timeout,
                               sync_writes=args.sync_writes, inline_max=args.inline_max)
    except ValueError as e:
        print(f"flyfs up: {e}", file=sys.stderr)
        return 2
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        print(f"flyfs up: mgmtd={cluster.mgmtd_address} mount={cluster.mount or '-'}", flush=True)
        cluster.supervise(lambda: stopping)
    except (RuntimeError, TimeoutError, OSError, grpc.RpcError) as e:
        print(f"flyfs up: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0
