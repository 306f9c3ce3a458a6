"""A storage cluster for tests: one mgmtd and N storage daemons.

    async with StorageCluster(tmp_path, nodes=3, replication=3) as c:      # in-process
        sc = c.client()
        ...
    async with StorageCluster(tmp_path, nodes=3, processes=True) as c:     # real processes
        c.kill(1); ...; c.restart(1); await c.wait_all_serving()

In-process mode runs mgmtd and every StorageServer on the test's own event
loop (fast). Process mode runs mgmtd and each storage daemon as a child
process (`python -m flyfs.cli mgmtd|storage ...`, dying with the test run)
so they can be killed with SIGKILL and restarted on the same data dirs and
ports. Teardown fails the test when a child process or an asyncio task the
cluster started is left behind.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

from flyfs.cluster.chain_state import PublicState
from flyfs.cluster.mgmtd import Mgmtd
from flyfs.cluster.mgmtd_client import MgmtdClient, RoutingInfo
from flyfs.cluster.procs import Daemon, free_port, wait_port
from flyfs.client.storage_client import StorageClient
from flyfs.storage.server import StorageConfig, StorageServer

__all__ = ["StorageCluster", "Node", "Proc"]

# Set the parent-death signal after exec, in a tiny wrapper, instead of with
# procs.Daemon sets the parent-death signal after exec (see its docstring).
Proc = Daemon


@dataclass
class Node:
    """One storage node: its data dirs, port, and the server or process running it."""

    index: int
    dirs: list[str]
    port: int
    server: StorageServer | None = None
    proc: Daemon | None = None
    history: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.server is not None or (self.proc is not None and self.proc.alive)


class StorageCluster:
    """mgmtd + `nodes` storage nodes with `targets_per_node` targets each; chains of
    `replication` in chain table 1 once every node registered."""

    def __init__(self, tmp_path, *, nodes: int = 3, targets_per_node: int = 1, replication: int = 3,
                 processes: bool = False, heartbeat_timeout: float = 1.5,
                 config: StorageConfig | None = None, max_chunk_size: int | None = None):
        self.root = str(tmp_path)
        self.n_nodes = nodes
        self.targets_per_node = targets_per_node
        self.replication = replication
        self.processes = processes
        self.heartbeat_timeout = heartbeat_timeout
        self.config = config or StorageConfig(update_retry=15.0, forward_timeout=20.0,
                                              max_chunk_size=max_chunk_size)
        self.max_chunk_size = max_chunk_size
        self.mgmtd: Mgmtd | None = None
        self.mgmtd_proc: Daemon | None = None
        self.mgmtd_port = free_port()
        self.nodes: list[Node] = []
        self._clients: list[StorageClient] = []
        self._mgmtd_clients: list[MgmtdClient] = []
        self._tasks_before: set[asyncio.Task] = set()

    @property
    def mgmtd_address(self) -> str:
        return f"127.0.0.1:{self.mgmtd_port}"

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> "StorageCluster":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close(check=exc[0] is None)

    async def start(self, timeout: float = 60.0) -> None:
        self._tasks_before = set(asyncio.all_tasks())
        try:
            if self.processes:
                self.mgmtd_proc = Proc("mgmtd", [
                    "mgmtd", "--kv", f"memory://storage-test-{uuid.uuid4().hex}",
                    "--listen", self.mgmtd_address, "--heartbeat-timeout", str(self.heartbeat_timeout),
                    "--log-level", "WARNING"], os.path.join(self.root, "logs", "mgmtd.log")).start()
                await asyncio.to_thread(wait_port, "127.0.0.1", self.mgmtd_port, timeout, self.mgmtd_proc)
            else:
                self.mgmtd = Mgmtd(f"memory://storage-test-{uuid.uuid4().hex}", self.mgmtd_address,
                                   heartbeat_timeout=self.heartbeat_timeout, lease_s=30.0)
                await self.mgmtd.start()
            for i in range(self.n_nodes):
                dirs = [os.path.join(self.root, f"node{i}", f"t{j}") for j in range(self.targets_per_node)]
                for d in dirs:
                    os.makedirs(d, exist_ok=True)
                self.nodes.append(Node(i, dirs, free_port()))
            await asyncio.gather(*(self._start_node(n, timeout) for n in self.nodes))
            mc = self.mgmtd_client()
            deadline = time.monotonic() + timeout
            want = self.n_nodes * self.targets_per_node
            while len((await mc.get_routing_info(force=True)).targets) < want:
                if time.monotonic() > deadline:
                    raise TimeoutError("storage targets did not all register")
                await asyncio.sleep(0.05)
            reply = await mc.create_chains(self.replication, table_id=1)
            assert reply.chains, "no chains created"
            await self.wait_all_serving(timeout)
        except BaseException:
            await self.close(check=False)
            raise

    async def _start_node(self, node: Node, timeout: float = 60.0) -> None:
        if self.processes:
            args = ["storage", "--mgmtd", self.mgmtd_address, "--data", ",".join(node.dirs),
                    "--listen", node.address, "--log-level", "INFO"]
            if self.max_chunk_size:
                args += ["--max-chunk-size", str(self.max_chunk_size)]
            node.proc = Proc(f"storage-{node.index}", args,
                               os.path.join(self.root, "logs", f"storage-{node.index}.log")).start()
            await asyncio.to_thread(wait_port, "127.0.0.1", node.port, timeout, node.proc)
        else:
            node.server = StorageServer(self.mgmtd_address, node.dirs, node.address, config=self.config)
            await node.server.start()
        node.history.append("start")

    async def close(self, check: bool = True) -> None:
        """Stop everything; with `check`, fail on leaked processes or tasks."""
        problems = []
        for c in self._clients:
            await c.close()
        self._clients = []
        for m in self._mgmtd_clients:
            await m.close()
        self._mgmtd_clients = []
        for n in self.nodes:
            if n.server is not None:
                await n.server.stop()
                n.server = None
            if n.proc is not None:
                n.proc.stop(timeout=10)
                if n.proc.alive:
                    problems.append(f"storage-{n.index} (pid {n.proc.pid}) did not exit")
                    n.proc.kill()
        if self.mgmtd is not None:
            await self.mgmtd.stop()
            self.mgmtd = None
        if self.mgmtd_proc is not None:
            self.mgmtd_proc.stop(timeout=10)
            if self.mgmtd_proc.alive:
                problems.append(f"mgmtd (pid {self.mgmtd_proc.pid}) did not exit")
                self.mgmtd_proc.kill()
        if check:
            leaked = []
            for _ in range(50):
                leaked = [t for t in asyncio.all_tasks() - self._tasks_before
                          if t is not asyncio.current_task() and not t.done()]
                if not leaked:
                    break
                await asyncio.sleep(0.02)
            if leaked:
                problems.append(f"leaked asyncio tasks: {[t.get_name() for t in leaked]} "
                                f"{[repr(t.get_coro()) for t in leaked][:5]}")
            if problems:
                raise AssertionError("storage cluster teardown: " + "; ".join(problems))

    # ----------------------------------------------------------------- control

    def kill(self, i: int) -> None:
        """SIGKILL storage node i (process mode)."""
        node = self.nodes[i]
        assert node.proc is not None, "kill() needs processes=True"
        node.proc.kill()
        node.history.append("kill")

    async def stop_node(self, i: int) -> None:
        """Stop storage node i (in-process: the server; process mode: SIGTERM)."""
        node = self.nodes[i]
        if node.server is not None:
            await node.server.stop()
            node.server = None
        if node.proc is not None:
            await asyncio.to_thread(node.proc.stop)
        node.history.append("stop")

    async def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start storage node i again on the same data dirs and port."""
        node = self.nodes[i]
        assert not node.running, f"storage node {i} is still running"
        await self._start_node(node, timeout)

    # ----------------------------------------------------------------- clients and state

    def mgmtd_client(self) -> MgmtdClient:
        c = MgmtdClient(self.mgmtd_address, retry_timeout=20.0)
        self._mgmtd_clients.append(c)
        return c

    def client(self, **kw) -> StorageClient:
        kw.setdefault("retry_timeout", 30.0)
        kw.setdefault("timeout", 20.0)
        c = StorageClient(self.mgmtd_client(), **kw)
        self._clients.append(c)
        return c

    async def routing(self) -> RoutingInfo:
        if not self._mgmtd_clients:
            self.mgmtd_client()
        return await self._mgmtd_clients[0].get_routing_info(force=True)

    async def chains(self) -> list:
        info = await self.routing()
        return [info.chains[c] for c in info.table(1)]

    async def wait_until(self, pred, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            info = await self.routing()
            if pred(info):
                return info
            if time.monotonic() > deadline:
                states = {c: [(t, s.name) for t, s in ch.targets] for c, ch in info.chains.items()}
                raise TimeoutError(f"{what} not reached in {timeout}s; chains: {states}")
            for n in self.nodes:
                if n.proc is not None and n.proc.returncode not in (None, -signal.SIGKILL) \
                        and "kill" not in n.history[-1:] and "stop" not in n.history[-1:]:
                    raise RuntimeError(f"storage-{n.index} exited with {n.proc.returncode}:\n"
                                       f"{n.proc.log_tail(30)}")
            await asyncio.sleep(0.1)

    async def wait_all_serving(self, timeout: float = 60.0) -> RoutingInfo:
        return await self.wait_until(
            lambda info: info.chains and all(s is PublicState.SERVING for c in info.chains.values()
                                             for _, s in c.targets),
            timeout, "every target SERVING")

    def targets_of(self, i: int, info: RoutingInfo) -> list[int]:
        """Target ids of storage node i."""
        addr = self.nodes[i].address
        return [t for t, ti in info.targets.items() if info.nodes[ti.node_id].address == addr]

    def node_of_target(self, target_id: int, info: RoutingInfo) -> int:
        addr = info.address_of(target_id)
        return next(n.index for n in self.nodes if n.address == addr)


async def replica_metas(sc: StorageClient, chain) -> dict[int, dict]:
    """Chunk metadata of every target of `chain`: {target: {(inode, index): (commit, length, crc)}}."""
    out = {}
    for t in chain.target_ids:
        out[t] = {(m.chunk.inode, m.chunk.index): (m.commit_version, m.length, m.crc32c)
                  for m in await sc.dump_chunk_meta(t) if m.update_version == m.commit_version}
        pending = [m for m in await sc.dump_chunk_meta(t) if m.update_version != m.commit_version]
        assert not pending, f"target {t} holds pending versions: {pending[:3]}"
    return out


async def assert_replicas_equal(sc: StorageClient, chain) -> dict:
    """Every replica of every chunk of `chain` has the same version, length and checksum."""
    metas = await replica_metas(sc, chain)
    first, *rest = chain.target_ids
    for t in rest:
        a, b = metas[first], metas[t]
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert not diff, f"chain {chain.chain_id}: targets {first} and {t} differ on {len(diff)} chunks, " \
                         f"e.g. {sorted(diff.items())[:3]}"
    return metas[first]
