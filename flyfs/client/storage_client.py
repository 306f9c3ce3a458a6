"""Async client of the storage daemons: chunk updates through chain heads, batch reads.

    mgmtd = MgmtdClient("127.0.0.1:8000")
    sc = StorageClient(mgmtd)
    await sc.write(chain_id, inode, index, offset, data, chunk_size=4 << 20)
    n = await sc.read(chain_id, inode, index, offset, length, into=buf)
    counts = await sc.batch_read([ReadPiece(chain_id, inode, index, offset, length, buf), ...])
    await sc.close()

Routing comes from the MgmtdClient's cache, refreshed when a daemon answers
"stale routing" or a chain has moved.

Updates (write, truncate, remove) go to the chain head with the chain version
of the cached routing and a per-client sequence number; they are retried on
transport errors, timeouts, stale routing, a head change or a node without
lease until `retry_timeout`. The daemons deduplicate by (client id,
sequence), so a retry never applies twice.

Reads go to one SERVING replica per piece (spread by chunk), many pieces per
request and many requests in flight, each piece's bytes received straight
into the caller's buffer. A piece that fails is retried elsewhere: "not
committed" at the chain's last SERVING target, a checksum mismatch or any
other error at another replica; a piece fails only when every replica
reported a checksum mismatch, the input is invalid, or `retry_timeout`
passes. A chunk that does not exist reads as 0 bytes (a hole).

A target that hangs (stopped, cut off) answers nothing and refuses nothing:
while a request has been in flight for WATCH_AFTER seconds the client asks
mgmtd for the routing every WATCH_INTERVAL, and requests to a target whose
chain changed (mgmtd took the silent node out after its heartbeat timeout)
are abandoned and retried on the new chain instead of waiting out `timeout`.
Requests to a target whose connection has sent nothing for HANG_AFTER
seconds while they waited are abandoned too: a read goes to another replica
then, without waiting for mgmtd (an update goes to the head again).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from crc32c import crc32c
from google.protobuf.message import DecodeError

from flyfs import net
from flyfs.cluster.chain_state import Chain, PublicState, head, readable_targets
from flyfs.cluster.mgmtd_client import MgmtdClient, MgmtdError, RoutingInfo
from flyfs.proto import common_pb2 as SC
from flyfs.proto import storage_pb2 as S
from flyfs.storage import craq

__all__ = ["StorageClient", "ReadPiece", "UpdateResult", "StorageClientError", "LastChunk"]

log = logging.getLogger("flyfs.client.storage")

_RETRY_UPDATE = {SC.STALE_ROUTING, SC.NOT_HEAD, SC.NOT_SERVING, SC.BUSY, SC.INTERNAL}
_MAX_PIECES = 1024


# Replicas that hold acknowledged writes: a flush reaches each of them.
_HOLDS_WRITES = (PublicState.SERVING, PublicState.LASTSRV, PublicState.SYNCING)
FLUSH_TIMEOUT = 120.0  # syncing a node's unsynced writes can take a while on a slow disk


class StorageClientError(Exception):
    """A storage request failed for good; `code` is a flyfs.StatusCode."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return SC.StatusCode.Name(self.code) if self.code in SC.StatusCode.values() else str(self.code)


@dataclass(frozen=True)
class UpdateResult:
    commit_version: int   # the chunk's version after the update (0 after a remove)
    length: int           # the chunk's length after the update


@dataclass(frozen=True)
class LastChunk:
    index: int
    length: int


@dataclass
class ReadPiece:
    """[offset, offset + length) of chunk `index` of `inode`, read into `buffer`
    (a writable buffer of at least `length` bytes)."""

    chain_id: int
    inode: int
    index: int
    offset: int
    length: int
    buffer: Any = None


class _Retry(Exception):
    def __init__(self, why: str, refresh: bool = False):
        super().__init__(why)
        self.why = why
        self.refresh = refresh


WATCH_AFTER = 1.0       # a request in flight this long makes the client watch the routing
WATCH_INTERVAL = 0.5    # how often it asks mgmtd while it watches
DIRECT_READ_TIMEOUT = 2.0   # a blocking read from a caller's thread then falls back to batch_read
HANG_AFTER = 3.0        # a connection silent this long while requests wait on it: they are abandoned
SUSPECT_FOR = 10.0      # and reads keep away from that node this long (if another replica serves)


def moved_targets(old: RoutingInfo, new: RoutingInfo) -> set[int]:
    """Targets whose place changed from routing `old` to `new`: every target of a chain
    whose version changed (or that is gone), and targets whose node's address changed."""
    out: set[int] = set()
    for cid, chain in old.chains.items():
        now = new.chains.get(cid)
        if now is None or now.version != chain.version:
            out.update(chain.target_ids)
    for tid in old.targets:
        try:
            before = old.address_of(tid)
        except KeyError:
            continue
        try:
            after = new.address_of(tid)
        except KeyError:
            after = None
        if after != before:
            out.add(tid)
    return out


def _status_name(code: int) -> str:
    return SC.StatusCode.Name(code) if code in SC.StatusCode.values() else str(code)


class StorageClient:
    """Client of the storage daemons of one cluster.

    `mgmtd`: a MgmtdClient (shared, not closed here) or an mgmtd address (a
    client is made and closed here). `timeout`: one request; `retry_timeout`:
    how long an operation keeps retrying; `max_request_bytes`: bytes read per
    batch request; `max_inflight`: requests in flight per batch read.
    """

    def __init__(self, mgmtd: MgmtdClient | str, *, pool: net.ConnectionPool | None = None,
                 client_id: str | None = None, timeout: float = 30.0, retry_timeout: float = 60.0,
                 max_request_bytes: int = 8 << 20, max_inflight: int = 32):
        self._own_mgmtd = isinstance(mgmtd, str)
        self.mgmtd = MgmtdClient(mgmtd) if isinstance(mgmtd, str) else mgmtd
        self._own_pool = pool is None
        self.pool = pool or net.ConnectionPool()
        self.client_id = client_id or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.max_request_bytes = max_request_bytes
        self.max_inflight = max_inflight
        self._seq = itertools.count(1)
        self._refreshing: asyncio.Task | None = None
        self.blocking = net.BlockingPool(connect_timeout=self.pool.connect_timeout)
        self._moved: dict[int, asyncio.Future] = {}   # target -> completed when its chain changes
        self._inflight: dict[int, tuple[float, int, str]] = {}   # token -> (start, target, address)
        self._tokens = itertools.count()
        self._watcher: asyncio.Task | None = None
        self._suspect: dict[str, float] = {}          # node address -> until (time.monotonic) reads avoid it

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        self.blocking.close()
        if self._own_pool:
            await self.pool.close()
        if self._own_mgmtd:
            await self.mgmtd.close()

    async def __aenter__(self) -> "StorageClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ----------------------------------------------------------------- routing

    def _header(self) -> SC.RequestHeader:
        return SC.RequestHeader(cluster_id=self.mgmtd.cluster_id, client_id=self.client_id)

    async def routing(self) -> RoutingInfo:
        return await self.mgmtd.get_routing_info()

    async def _refresh(self, seen: RoutingInfo | None) -> RoutingInfo:
        """Fresh routing, unless a newer version than `seen` is already cached."""
        cur = self.mgmtd.cached_routing
        if cur is not None and seen is not None and cur.version > seen.version:
            return cur
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.get_running_loop().create_task(
                self.mgmtd.get_routing_info(force=True))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return await asyncio.shield(task)
        except MgmtdError as e:
            # mgmtd unreachable for now: go on with what we have; the caller retries.
            log.debug("routing refresh failed: %s", e)
            if cur is None:
                raise StorageClientError(SC.BUSY, f"no routing info: {e}") from None
            return cur

    @staticmethod
    def _target_address(routing: RoutingInfo, target_id: int) -> str:
        try:
            return routing.address_of(target_id)
        except KeyError:
            raise StorageClientError(SC.NOT_FOUND, f"target {target_id} is not in routing version "
                                     f"{routing.version}") from None

    @staticmethod
    def _address(routing: RoutingInfo, target_id: int) -> str:
        try:
            return routing.address_of(target_id)
        except KeyError:
            raise _Retry(f"target {target_id} has no node in routing version {routing.version}",
                         refresh=True) from None

    @staticmethod
    def _chain(routing: RoutingInfo, chain_id: int) -> Chain:
        chain = routing.chains.get(chain_id)
        if chain is None:
            raise _Retry(f"chain {chain_id} is not in routing version {routing.version}", refresh=True)
        return chain

    async def _call(self, routing: RoutingInfo, address: str, target_id: int, method: int, header: bytes,
                    payload=(), into=None, timeout: float | None = None):
        """pool.call to a target at `address`, abandoned (RequestAborted) if the target's
        chain changes while it waits (see the module docstring)."""
        loop = asyncio.get_running_loop()
        moved = self._moved.get(target_id)
        if moved is None:
            moved = self._moved[target_id] = loop.create_future()
        token = next(self._tokens)
        self._inflight[token] = (loop.time(), target_id, address)
        if self._watcher is None:
            self._watcher = loop.create_task(self._watch(routing))
        try:
            return await self.pool.call(address, method, header, payload, into,
                                        self.timeout if timeout is None else timeout, abort=moved)
        finally:
            del self._inflight[token]

    async def _watch(self, seen: RoutingInfo) -> None:
        """While requests are in flight, follow the routing once one is slow; abandon the
        requests to targets that moved."""
        loop = asyncio.get_running_loop()
        try:
            while self._inflight:
                await asyncio.sleep(WATCH_INTERVAL)
                now = loop.time()
                if not self._inflight or now - min(v[0] for v in self._inflight.values()) < WATCH_AFTER:
                    continue
                for start, tid, address in list(self._inflight.values()):
                    if now - start >= HANG_AFTER and self.pool.silence(address) >= HANG_AFTER:
                        self._suspect[address] = time.monotonic() + SUSPECT_FOR
                        f = self._moved.pop(tid, None)
                        if f is not None and not f.done():
                            f.set_result(f"target {tid} at {address} sent nothing for {HANG_AFTER:g} s")
                try:
                    new = await self.mgmtd.get_routing_info(force=True)
                except MgmtdError as e:
                    log.debug("routing watch: %s", e)
                    continue
                if new.version <= seen.version:
                    continue
                for tid in moved_targets(seen, new):
                    f = self._moved.pop(tid, None)
                    if f is not None and not f.done():
                        f.set_result(f"target {tid} moved in routing v{new.version}")
                seen = new
        finally:
            self._watcher = None

    def _suspects(self, routing: RoutingInfo) -> set[int]:
        """Targets reads keep away from for now: those of a node whose connection went silent."""
        if not self._suspect:
            return set()
        now = time.monotonic()
        for address, until in list(self._suspect.items()):   # (also changed by callers' threads)
            if until <= now:
                self._suspect.pop(address, None)
        out = set()
        for tid in routing.targets:
            try:
                if routing.address_of(tid) in self._suspect:
                    out.add(tid)
            except KeyError:
                pass
        return out

    async def _retrying(self, what: str, attempt):
        """Run `attempt(routing)` until it returns, raising _Retry to go again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout
        delay = 0.02
        routing = await self.routing()
        while True:
            try:
                return await attempt(routing)
            except _Retry as r:
                why, refresh = r.why, r.refresh
            except net.RequestTimeout as e:
                why, refresh = f"timeout: {e}", True
            except net.TransportError as e:
                why, refresh = f"transport error: {e}", True
            if loop.time() + delay >= deadline:
                raise StorageClientError(SC.BUSY, f"{what}: gave up after {self.retry_timeout:g}s: {why}")
            log.debug("%s: retrying: %s", what, why)
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 0.5)
            routing = await self._refresh(routing) if refresh else await self.routing()

    # ----------------------------------------------------------------- updates

    async def _update(self, req: S.UpdateRequest, payload=()) -> UpdateResult:
        what = (f"{S.UpdateType.Name(req.type).lower().replace('update_', '')} of chunk "
                f"{req.chunk.inode:#x}:{req.chunk.index} on chain {req.chain_id}")
        async def attempt(routing: RoutingInfo) -> UpdateResult:
            chain = self._chain(routing, req.chain_id)
            h = head(chain)
            if h is None:
                raise _Retry(f"chain {req.chain_id} v{chain.version} takes no writes (no SERVING "
                             f"target)", refresh=True)
            req.chain_version = chain.version
            rep = await self._call(routing, self._address(routing, h), h, S.STORAGE_UPDATE,
                                   req.SerializeToString(), payload)
            reply = S.UpdateReply.FromString(rep.header)
            code = reply.status.code
            if code == SC.OK:
                return UpdateResult(reply.commit_version, reply.length)
            if code in _RETRY_UPDATE:
                raise _Retry(f"{_status_name(code)}: {reply.status.message}", refresh=True)
            raise StorageClientError(code, f"{what}: {reply.status.message}")

        return await self._retrying(what, attempt)

    def _update_request(self, chain_id: int, inode: int, index: int, utype: int, **kw) -> S.UpdateRequest:
        craq.chunk_id(inode, index)  # range check
        return S.UpdateRequest(header=self._header(), chain_id=chain_id, type=utype,
                               chunk=S.ChunkId(inode=inode, index=index), seq=next(self._seq), **kw)

    async def write(self, chain_id: int, inode: int, index: int, offset: int, data, *,
                    chunk_size: int) -> UpdateResult:
        """Write `data` at `offset` of a chunk (offset + len(data) <= chunk_size).
        `data` must not change until this returns."""
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        if offset < 0 or offset + len(mv) > chunk_size:
            raise StorageClientError(SC.INVALID_ARGUMENT, f"write [{offset}, {offset + len(mv)}) is "
                                     f"outside the chunk size {chunk_size}")
        req = self._update_request(chain_id, inode, index, S.UPDATE_WRITE, offset=offset,
                                   length=len(mv), chunk_size=chunk_size, crc32c=crc32c(mv))
        return await self._update(req, (mv,) if len(mv) else ())

    async def truncate_chunk(self, chain_id: int, inode: int, index: int, length: int, *,
                             chunk_size: int) -> UpdateResult:
        """Set a chunk's length (cut, or extend with zeros); a missing chunk stays missing."""
        req = self._update_request(chain_id, inode, index, S.UPDATE_TRUNCATE, length=length,
                                   chunk_size=chunk_size)
        return await self._update(req)

    async def remove_chunk(self, chain_id: int, inode: int, index: int) -> UpdateResult:
        req = self._update_request(chain_id, inode, index, S.UPDATE_REMOVE)
        return await self._update(req)

    async def remove_chunks(self, chain_id: int, inode: int, begin: int = 0, end: int = 0, *,
                            page: int = 1024) -> int:
        """Remove the chunks of `inode` with index in [begin, end) (end 0: all) on one chain;
        returns how many were removed."""
        total = 0
        while True:
            seq = next(self._seq)

            async def attempt(routing: RoutingInfo):
                chain = self._chain(routing, chain_id)
                h = head(chain)
                if h is None:
                    raise _Retry(f"chain {chain_id} takes no writes", refresh=True)
                req = S.RemoveChunksRequest(header=self._header(), chain_id=chain_id,
                                            chain_version=chain.version, inode=inode, begin_index=begin,
                                            end_index=end, max_chunks=page, seq=seq)
                rep = await self._call(routing, self._address(routing, h), h, S.STORAGE_REMOVE_CHUNKS,
                                       req.SerializeToString())
                reply = S.RemoveChunksReply.FromString(rep.header)
                code = reply.status.code
                if code == SC.OK:
                    return reply
                if code in _RETRY_UPDATE:
                    raise _Retry(f"{_status_name(code)}: {reply.status.message}", refresh=True)
                raise StorageClientError(code, f"remove chunks of {inode:#x} on chain {chain_id}: "
                                         f"{reply.status.message}")

            reply = await self._retrying(f"remove chunks of inode {inode:#x}", attempt)
            total += reply.removed
            if not reply.more:
                return total

    async def flush(self, chain_ids) -> int:
        """Make every update acknowledged on these chains durable on the disks of every
        replica holding it (a file's fsync). Returns how many chunk files were synced."""
        want = sorted(set(chain_ids))
        if not want:
            return 0

        async def attempt(routing: RoutingInfo) -> int:
            by_node: dict[str, list[int]] = {}
            for cid in want:
                for tid, state in self._chain(routing, cid).targets:
                    if state in _HOLDS_WRITES:
                        by_node.setdefault(self._address(routing, tid), []).append(cid)

            async def one(addr: str, chains: list[int]) -> int:
                req = S.FlushRequest(header=self._header(), chain_ids=chains)
                rep = await self.pool.call(addr, S.STORAGE_FLUSH, req.SerializeToString(),
                                           timeout=max(self.timeout, FLUSH_TIMEOUT))
                reply = S.FlushReply.FromString(rep.header)
                if reply.status.code != SC.OK:
                    raise StorageClientError(reply.status.code, f"flush of chains {chains} on {addr}: "
                                             f"{reply.status.message}")
                return reply.files_synced

            return sum(await asyncio.gather(*(one(a, c) for a, c in by_node.items())))

        return await self._retrying(f"flush of chains {want}", attempt)

    # ----------------------------------------------------------------- queries

    async def query_last_chunk(self, chain_id: int, inode: int) -> LastChunk | None:
        """The committed chunk of `inode` with the highest index on `chain_id`, or None."""

        async def attempt(routing: RoutingInfo):
            chain = self._chain(routing, chain_id)
            readers = readable_targets(chain)
            if not readers:
                raise _Retry(f"chain {chain_id} has no SERVING target", refresh=True)
            req = S.QueryLastChunkRequest(header=self._header(), chain_id=chain_id,
                                          chain_version=chain.version, inode=inode)
            rep = await self.pool.call(self._address(routing, readers[-1]), S.STORAGE_QUERY_LAST_CHUNK,
                                       req.SerializeToString(), timeout=self.timeout)
            reply = S.QueryLastChunkReply.FromString(rep.header)
            code = reply.status.code
            if code == SC.OK:
                return LastChunk(reply.index, reply.length) if reply.found else None
            if code in _RETRY_UPDATE | {SC.NOT_COMMITTED, SC.CHECKSUM_MISMATCH}:
                raise _Retry(f"{_status_name(code)}: {reply.status.message}", refresh=True)
            raise StorageClientError(code, f"query last chunk of {inode:#x}: {reply.status.message}")

        return await self._retrying(f"query last chunk of inode {inode:#x}", attempt)

    async def dump_chunk_meta(self, target_id: int, inode: int | None = None) -> list[S.ChunkMeta]:
        """Every chunk's metadata on one target (in chunk id order), for checks and tools."""
        routing = await self.routing()
        if target_id not in routing.targets:
            routing = await self._refresh(routing)
        addr = self._target_address(routing, target_id)
        out: list[S.ChunkMeta] = []
        after = None
        while True:
            req = S.DumpChunkMetaRequest(header=self._header(), target_id=target_id, limit=4096)
            if inode is not None:
                req.inode = inode
                req.has_inode = True
            if after is not None:
                req.start_after.CopyFrom(after)
                req.has_start = True
            rep = await self.pool.call(addr, S.STORAGE_DUMP_CHUNK_META, req.SerializeToString(),
                                       timeout=self.timeout)
            reply = S.DumpChunkMetaReply.FromString(rep.header)
            if reply.status.code != SC.OK:
                raise StorageClientError(reply.status.code, f"dump chunk meta of target {target_id}: "
                                         f"{reply.status.message}")
            out.extend(reply.metas)
            if not reply.more or not reply.metas:
                return out
            after = reply.metas[-1].chunk

    async def read_target(self, target_id: int, piece: ReadPiece, *,
                          any_state: bool = False) -> tuple[S.ReadResult, bytes]:
        """Read one piece from one given replica (checks and tests): its result and bytes.
        With `any_state`, a non-SERVING target answers too and no chain version is checked.
        Stale routing is refreshed and retried; other errors are returned as they are."""
        routing = await self.routing()
        for attempt in range(10):
            chain = routing.chains.get(piece.chain_id)
            if chain is None:
                raise StorageClientError(SC.NOT_FOUND, f"chain {piece.chain_id} is not in routing "
                                         f"version {routing.version}")
            req = self._read_request(routing, [piece], any_state)
            rep = await self.pool.call(self._target_address(routing, target_id), S.STORAGE_BATCH_READ,
                                       req.SerializeToString(), timeout=self.timeout)
            reply = S.BatchReadReply.FromString(rep.header)
            if reply.status.code != SC.OK:
                raise StorageClientError(reply.status.code, reply.status.message)
            r = reply.results[0]
            if r.status.code != SC.STALE_ROUTING:
                break
            await asyncio.sleep(0.05 * attempt)
            routing = await self._refresh(routing)
        return r, bytes(rep.payload[:r.length])

    # ----------------------------------------------------------------- reads

    async def read(self, chain_id: int, inode: int, index: int, offset: int, length: int,
                   into=None):
        """Read from one chunk. With `into`, fill it (bytes past the chunk's end become zeros)
        and return the number of chunk bytes; without, return those bytes."""
        buf = into if into is not None else bytearray(length)
        (n,) = await self.batch_read([ReadPiece(chain_id, inode, index, offset, length, buf)])
        if into is not None:
            return n
        return bytes(buf[:n])

    def read_direct(self, piece: ReadPiece) -> int | None:
        """Read one piece in the calling thread over a blocking connection (no event
        loop; thread-safe), from the SERVING replica batch_read would ask first.
        Returns the chunk bytes read (the rest of the piece is zeros), or None where
        that did not work: no routing cached yet, a transport error, any answer but
        data or "no such chunk". Then use batch_read, which retries and fails over."""
        routing = self.mgmtd.cached_routing
        if routing is None:
            return None
        chain = routing.chains.get(piece.chain_id)
        readers = readable_targets(chain) if chain is not None else ()
        if not readers:
            return None
        order = craq.read_order(readers, piece.inode * 7919 + piece.index, self._suspects(routing))
        if not order:
            return None
        target = order[0]
        try:
            address = routing.address_of(target)
        except KeyError:
            return None
        req = self._read_request(routing, [piece])
        try:
            header, n = self.blocking.call(address, S.STORAGE_BATCH_READ, req.SerializeToString(),
                                           into=piece.buffer, timeout=min(self.timeout, DIRECT_READ_TIMEOUT))
            reply = S.BatchReadReply.FromString(header)
        except (net.TransportError, DecodeError) as e:
            log.debug("direct read from target %d failed: %s", target, e)
            if isinstance(e, net.RequestTimeout):   # silent for DIRECT_READ_TIMEOUT: read elsewhere
                self._suspect[address] = time.monotonic() + SUSPECT_FOR
            return None
        if reply.status.code != SC.OK or len(reply.results) != 1 or n != piece.length:
            return None
        r = reply.results[0]
        if r.status.code == SC.OK:
            return r.length
        return 0 if r.status.code == SC.NOT_FOUND else None

    async def batch_read(self, pieces: Sequence[ReadPiece]) -> list[int]:
        """Read every piece into its buffer; returns, per piece, how many bytes came from
        the chunk (the rest of its `length` bytes are zeros: beyond the chunk's end, or a
        missing chunk). Raises StorageClientError when a piece cannot be read."""
        n = len(pieces)
        results: list[int | None] = [None] * n
        views: list[memoryview] = []
        for p in pieces:
            craq.chunk_id(p.inode, p.index)
            if p.offset < 0 or p.length < 0:
                raise StorageClientError(SC.INVALID_ARGUMENT, f"bad read piece {p}")
            v = memoryview(p.buffer).cast("B") if p.buffer is not None else None
            if v is None or v.readonly or len(v) < p.length:
                raise StorageClientError(SC.INVALID_ARGUMENT, f"read piece of {p.length} bytes needs "
                                         f"a writable buffer of at least that size")
            views.append(v[:p.length])
        bad: list[set[int]] = [set() for _ in range(n)]        # checksum mismatch on these targets
        routing = await self.routing()
        suspects = self._suspects(routing)
        avoid: list[set[int]] = [set(suspects) for _ in range(n)]   # failed for other reasons (transient)
        to_tail: set[int] = set()
        errors: dict[int, str] = {}
        todo = list(range(n))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout
        delay = 0.02
        sem = asyncio.Semaphore(self.max_inflight)
        rounds = 0
        while todo:
            refresh = False
            groups: dict[int, list[int]] = {}
            for i in todo:
                p = pieces[i]
                chain = routing.chains.get(p.chain_id)
                readers = readable_targets(chain) if chain is not None else ()
                if not readers:
                    errors[i] = f"chain {p.chain_id} has no SERVING target"
                    refresh = True
                    continue
                if readers and all(t in bad[i] for t in readers):
                    raise StorageClientError(SC.CHECKSUM_MISMATCH, f"chunk {p.inode:#x}:{p.index}: every "
                                             f"replica failed its checksum ({errors.get(i)})")
                if i in to_tail and readers[-1] not in bad[i] | avoid[i]:
                    target = readers[-1]
                else:
                    order = craq.read_order(readers, p.inode * 7919 + p.index, bad[i] | avoid[i])
                    if not order:
                        avoid[i].clear()
                        order = craq.read_order(readers, p.inode * 7919 + p.index, bad[i])
                    target = order[0]
                groups.setdefault(target, []).append(i)
            batches = []
            for target, idx in groups.items():
                cur, size = [], 0
                for i in idx:
                    ln = pieces[i].length
                    if cur and (size + ln > self.max_request_bytes or len(cur) >= _MAX_PIECES):
                        batches.append((target, cur))
                        cur, size = [], 0
                    cur.append(i)
                    size += ln
                if cur:
                    batches.append((target, cur))

            async def run(target: int, idx: list[int]) -> None:
                nonlocal refresh
                async with sem:
                    try:
                        outcome = await self._read_batch(routing, target, [pieces[i] for i in idx],
                                                         [views[i] for i in idx])
                    except (net.TransportError, KeyError) as e:
                        for i in idx:
                            avoid[i].add(target)
                            errors[i] = f"target {target}: {e}"
                        refresh = True
                        return
                for i, (code, length, msg) in zip(idx, outcome):
                    if code == SC.OK:
                        results[i] = length
                    elif code == SC.NOT_FOUND:
                        results[i] = 0
                    elif code == SC.NOT_COMMITTED:
                        to_tail.add(i)
                        errors[i] = msg
                    elif code == SC.CHECKSUM_MISMATCH:
                        bad[i].add(target)
                        errors[i] = f"target {target}: {msg}"
                    elif code == SC.INVALID_ARGUMENT:
                        errors[i] = msg
                        results[i] = -1
                    else:
                        avoid[i].add(target)
                        errors[i] = f"target {target}: {_status_name(code)}: {msg}"
                        if code in (SC.STALE_ROUTING, SC.NOT_SERVING):
                            refresh = True

            if len(batches) == 1:
                await run(*batches[0])
            else:
                await asyncio.gather(*(run(t, idx) for t, idx in batches))
            for i in todo:
                if results[i] == -1:
                    p = pieces[i]
                    raise StorageClientError(SC.INVALID_ARGUMENT, f"read of chunk {p.inode:#x}:{p.index} "
                                             f"[{p.offset}, {p.offset + p.length}): {errors[i]}")
            todo = [i for i in todo if results[i] is None]
            if not todo:
                break
            if loop.time() >= deadline:
                i = todo[0]
                raise StorageClientError(SC.BUSY, f"read of chunk {pieces[i].inode:#x}:{pieces[i].index} "
                                         f"gave up after {self.retry_timeout:g}s: {errors.get(i)}")
            rounds += 1
            # The first retry (another replica, the tail) goes at once; later ones back off.
            if refresh or rounds > 1:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 0.5)
            routing = await self._refresh(routing) if refresh else await self.routing()
        return results  # type: ignore[return-value]

    def _read_request(self, routing: RoutingInfo, pieces: Sequence[ReadPiece],
                      any_state: bool = False) -> S.BatchReadRequest:
        """A batch read of `pieces`, each with its chain's version in `routing`."""
        req = S.BatchReadRequest(header=self._header(), allow_any_state=any_state)
        for p in pieces:
            req.pieces.add(chain_id=p.chain_id, chain_version=routing.chains[p.chain_id].version,
                           chunk=S.ChunkId(inode=p.inode, index=p.index), offset=p.offset,
                           length=p.length)
        return req

    async def _read_batch(self, routing: RoutingInfo, target: int, pieces: list[ReadPiece],
                          views: list[memoryview]) -> list[tuple[int, int, str]]:
        req = self._read_request(routing, pieces)
        into = [v for v in views if len(v)]
        rep = await self._call(routing, routing.address_of(target), target, S.STORAGE_BATCH_READ,
                               req.SerializeToString(), into=into or None)
        reply = S.BatchReadReply.FromString(rep.header)
        if reply.status.code != SC.OK:
            return [(reply.status.code, 0, reply.status.message)] * len(pieces)
        if len(reply.results) != len(pieces):
            raise net.ProtocolError(f"batch read reply has {len(reply.results)} results for "
                                    f"{len(pieces)} pieces")
        return [(r.status.code, r.length, r.status.message) for r in reply.results]
