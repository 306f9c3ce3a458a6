"""Async client of mgmtd with a routing-info cache.

    async with MgmtdClient("127.0.0.1:8000") as mgmtd:
        reply = await mgmtd.register_node(NODE_STORAGE, "127.0.0.1:9000", targets=[(0, "/data/t0")])
        hb = await mgmtd.heartbeat(reply.node_id, [(tid, LocalState.ONLINE, chain_version, used, total)])
        info = await mgmtd.get_routing_info()        # cached; refetched when a version moved
        chain = info.chains[info.table(1)[0]]

The client follows NOT_PRIMARY replies to the primary and, when the primary
is unreachable, tries the other addresses it knows until `retry_timeout`.
A routing version seen in any reply (heartbeats) newer than the cached one
marks the cache stale; `get_routing_info()` then asks with the cached version
and gets either "unchanged" (cheap) or the new info.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import grpc

from flyfs.proto import common_pb2, mgmtd_pb2, mgmtd_pb2_grpc

from .chain_state import Chain, LocalState, PublicState
from .mgmtd import NOT_PRIMARY, MgmtdError, chain_from_proto

__all__ = ["MgmtdClient", "RoutingInfo", "MgmtdError", "MgmtdUnavailable", "LocalState", "PublicState",
           "NODE_STORAGE", "NODE_META", "NODE_CLIENT"]

NODE_STORAGE = mgmtd_pb2.NODE_STORAGE
NODE_META = mgmtd_pb2.NODE_META
NODE_CLIENT = mgmtd_pb2.NODE_CLIENT


class MgmtdUnavailable(MgmtdError):
    """No primary mgmtd answered within the retry timeout."""

    def __init__(self, message: str):
        super().__init__(common_pb2.BUSY, message)


@dataclass(frozen=True)
class RoutingInfo:
    """A parsed, immutable snapshot of mgmtd's routing info."""

    version: int
    nodes: dict[int, mgmtd_pb2.NodeInfo] = field(default_factory=dict)
    targets: dict[int, mgmtd_pb2.TargetInfo] = field(default_factory=dict)
    chains: dict[int, Chain] = field(default_factory=dict)
    tables: dict[int, dict[int, tuple[int, ...]]] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, m: mgmtd_pb2.RoutingInfo) -> "RoutingInfo":
        tables: dict[int, dict[int, tuple[int, ...]]] = {}
        for t in m.chain_tables:
            tables.setdefault(t.table_id, {})[t.version] = tuple(t.chain_ids)
        return cls(version=m.version,
                   nodes={n.node_id: n for n in m.nodes},
                   targets={t.target_id: t for t in m.targets},
                   chains={c.chain_id: chain_from_proto(c) for c in m.chains},
                   tables=tables)

    def table(self, table_id: int, version: int = 0) -> tuple[int, ...]:
        """Chain ids of a chain table version (0: latest)."""
        versions = self.tables.get(table_id)
        if not versions:
            raise KeyError(f"chain table {table_id} does not exist")
        v = version or max(versions)
        if v not in versions:
            raise KeyError(f"chain table {table_id} has no version {v}")
        return versions[v]

    def table_version(self, table_id: int) -> int:
        """Latest version of a chain table."""
        self.table(table_id)
        return max(self.tables[table_id])

    def chain(self, chain_id: int) -> Chain:
        try:
            return self.chains[chain_id]
        except KeyError:
            raise KeyError(f"chain {chain_id} does not exist") from None

    def node_of(self, target_id: int) -> mgmtd_pb2.NodeInfo:
        """The node holding a target."""
        t = self.targets.get(target_id)
        if t is None:
            raise KeyError(f"target {target_id} does not exist")
        return self.nodes[t.node_id]

    def address_of(self, target_id: int) -> str:
        return self.node_of(target_id).address

    def meta_nodes(self, alive_only: bool = True) -> list[mgmtd_pb2.NodeInfo]:
        return [n for n in self.nodes.values() if n.type == NODE_META and (n.alive or not alive_only)]


def _target_heartbeat(t) -> mgmtd_pb2.TargetHeartbeat:
    if isinstance(t, mgmtd_pb2.TargetHeartbeat):
        return t
    target_id, state, *rest = t
    chain_version, used, total, device = (list(rest) + [0, 0, 0, ""][len(rest):])[:4]
    return mgmtd_pb2.TargetHeartbeat(target_id=target_id, local_state=int(state), chain_version=chain_version,
                                     used_bytes=used, total_bytes=total, device=device)


class MgmtdClient:
    """Client of the mgmtd service; `address` is HOST:PORT, a comma-separated list, or a sequence."""

    def __init__(self, address: str | Sequence[str], *, cluster_id: str = "", client_id: str | None = None,
                 timeout: float = 5.0, retry_timeout: float = 15.0, max_age: float | None = None):
        addrs = [a.strip() for a in (address.split(",") if isinstance(address, str) else address) if a.strip()]
        if not addrs:
            raise ValueError("MgmtdClient needs at least one mgmtd address")
        self._addresses = list(dict.fromkeys(addrs))
        self._current = self._addresses[0]
        self.cluster_id = cluster_id
        self.client_id = client_id or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.max_age = max_age
        self._channels: dict[str, tuple[grpc.aio.Channel, mgmtd_pb2_grpc.MgmtdStub]] = {}
        self._routing: RoutingInfo | None = None
        self._routing_at = 0.0
        self._stale = False
        self._newest_seen = 0
        self._refresh_lock: asyncio.Lock | None = None

    @property
    def address(self) -> str:
        """The mgmtd this client talks to now (the primary, once found)."""
        return self._current

    @property
    def cached_routing(self) -> RoutingInfo | None:
        return self._routing

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch, _ in channels.values():
            await ch.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _stub(self, addr: str) -> mgmtd_pb2_grpc.MgmtdStub:
        if addr not in self._channels:
            ch = grpc.aio.insecure_channel(addr)
            self._channels[addr] = (ch, mgmtd_pb2_grpc.MgmtdStub(ch))
        return self._channels[addr][1]

    def _header(self) -> common_pb2.RequestHeader:
        return common_pb2.RequestHeader(cluster_id=self.cluster_id, client_id=self.client_id,
                                        request_uuid=uuid.uuid4().bytes)

    async def _call(self, method: str, request):
        """Call `method` on the primary; the same request (and uuid) is resent on retries."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        last = "no attempt"
        tried_since_progress = 0
        while True:
            addr = self._current
            try:
                reply = await getattr(self._stub(addr), method)(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.CANCELLED):
                    raise MgmtdError(common_pb2.INTERNAL, f"mgmtd {addr}: {e.code().name}: {e.details()}") from None
                last = f"{addr}: {e.code().name}"
                self._next_address(addr)
                tried_since_progress += 1
            else:
                code = reply.status.code
                if code == common_pb2.OK:
                    self._note_version_in(reply)
                    return reply
                if code != NOT_PRIMARY:
                    raise MgmtdError(code, reply.status.message)
                last = reply.status.message
                primary = reply.primary_address
                if primary and primary != addr:
                    if primary not in self._addresses:
                        self._addresses.append(primary)
                    self._current = primary
                    continue  # follow the redirect at once
                self._next_address(addr)
                tried_since_progress += 1
            if time.monotonic() >= deadline:
                raise MgmtdUnavailable(f"no primary mgmtd answered {method} within {self.retry_timeout:g} s "
                                       f"(tried {', '.join(self._addresses)}; last: {last})")
            if tried_since_progress >= len(self._addresses):
                tried_since_progress = 0
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 1.0)

    def _next_address(self, failed: str) -> None:
        i = self._addresses.index(failed) if failed in self._addresses else -1
        self._current = self._addresses[(i + 1) % len(self._addresses)]

    def _note_version_in(self, reply) -> None:
        v = getattr(reply, "routing_version", 0)
        if v:
            self.note_routing_version(v)

    def note_routing_version(self, version: int) -> None:
        """Record a routing version seen elsewhere; a newer one makes the cache stale."""
        self._newest_seen = max(self._newest_seen, version)

    def invalidate(self) -> None:
        """Make the next get_routing_info() ask mgmtd (e.g. after a "stale routing" reply)."""
        self._stale = True

    # ---- RPCs -------------------------------------------------------------------------------------------

    async def get_routing_info(self, force: bool = False) -> RoutingInfo:
        """The routing info: from the cache unless `force`, a newer version was
        seen, or the cache is older than `max_age`; revalidation is cheap when
        nothing changed."""
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            r = self._routing
            if r is not None and not force and not self._stale and r.version >= self._newest_seen and \
                    (self.max_age is None or time.monotonic() - self._routing_at <= self.max_age):
                return r
            req = mgmtd_pb2.GetRoutingInfoRequest(header=self._header(), known_version=r.version if r else 0)
            reply = await self._call("GetRoutingInfo", req)
            if not reply.unchanged:
                self._routing = RoutingInfo.from_proto(reply.info)
                self.note_routing_version(self._routing.version)
            self._routing_at = time.monotonic()
            self._stale = False
            return self._routing

    async def register_node(self, node_type: int, address: str, *, targets: Iterable = (), node_id: int = 0,
                            pid: int | None = None, hostname: str | None = None,
                            data_address: str = "") -> mgmtd_pb2.RegisterNodeReply:
        """Register this process; `targets` are (target_id or 0, data_path). Once per process start.
        `data_address`: where the node also serves flyfs/net (tcp://HOST:PORT), if it does."""
        specs = [t if isinstance(t, mgmtd_pb2.TargetSpec) else mgmtd_pb2.TargetSpec(target_id=t[0], data_path=t[1])
                 for t in targets]
        req = mgmtd_pb2.RegisterNodeRequest(
            header=self._header(), node_id=node_id, type=node_type, address=address,
            pid=os.getpid() if pid is None else pid, hostname=os.uname().nodename if hostname is None else hostname,
            targets=specs, data_address=data_address)
        return await self._call("RegisterNode", req)

    async def heartbeat(self, node_id: int, targets: Iterable = (), *,
                        routing_version: int | None = None) -> mgmtd_pb2.HeartbeatReply:
        """Report liveness; `targets` are TargetHeartbeat messages or tuples
        (target_id, LocalState, chain_version=0, used_bytes=0, total_bytes=0)."""
        if routing_version is None:
            routing_version = self._routing.version if self._routing else 0
        req = mgmtd_pb2.HeartbeatRequest(header=self._header(), node_id=node_id,
                                         targets=[_target_heartbeat(t) for t in targets],
                                         routing_version=routing_version)
        return await self._call("Heartbeat", req)

    async def create_chains(self, replication: int, *, target_ids: Iterable[int] = (),
                            table_id: int = 0) -> mgmtd_pb2.CreateChainsReply:
        req = mgmtd_pb2.CreateChainsRequest(header=self._header(), replication=replication,
                                            target_ids=list(target_ids), table_id=table_id)
        reply = await self._call("CreateChains", req)
        self.invalidate()
        return reply

    async def set_chain_table(self, table_id: int, chain_ids: Iterable[int]) -> mgmtd_pb2.ChainTableInfo:
        req = mgmtd_pb2.SetChainTableRequest(header=self._header(), table_id=table_id, chain_ids=list(chain_ids))
        reply = await self._call("SetChainTable", req)
        self.invalidate()
        return reply.table

    async def get_chain_table(self, table_id: int, version: int = 0) -> mgmtd_pb2.ChainTableInfo:
        req = mgmtd_pb2.GetChainTableRequest(header=self._header(), table_id=table_id, version=version)
        return (await self._call("GetChainTable", req)).table

    async def offline_target(self, target_id: int) -> Chain | None:
        """Hold a target OFFLINE until its node registers again; returns its chain after the change."""
        reply = await self._call("OfflineTarget", mgmtd_pb2.OfflineTargetRequest(header=self._header(),
                                                                               target_id=target_id))
        self.invalidate()
        return chain_from_proto(reply.chain) if reply.HasField("chain") else None

    async def list_nodes(self, node_type: int = 0) -> list[mgmtd_pb2.NodeInfo]:
        reply = await self._call("ListNodes", mgmtd_pb2.ListNodesRequest(header=self._header(), type=node_type))
        return list(reply.nodes)

    async def list_chains(self, table_id: int = 0) -> mgmtd_pb2.ListChainsReply:
        return await self._call("ListChains", mgmtd_pb2.ListChainsRequest(header=self._header(), table_id=table_id))

