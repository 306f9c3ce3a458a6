"""Resync: the predecessor of a SYNCING target brings it up to date.

mgmtd puts a returning target at the end of its chain as SYNCING (at most one
per chain). From then on the predecessor forwards every new update to it as
well (it is the write path's tail), and this module, run by the predecessor,
repairs what it missed:

1. list the syncing target's chunk metadata (STORAGE_DUMP_CHUNK_META, paged)
   and the predecessor's own, both in chunk id order, and merge them
   (`craq.sync_step`);
2. for each chunk that differs (missing, other commit or chain version,
   length or checksum, or a pending version on either side): take the
   chunk's replication lock, read the committed copy and install it on the
   syncing target (STORAGE_SYNC_INSTALL); the lock keeps updates of that
   chunk out until the install is done, so an install never overwrites a
   newer forwarded update;
3. remove chunks the syncing target holds and the predecessor does not
   (STORAGE_SYNC_REMOVE, under the locks of those chunks, checked again);
4. tell the target it is in sync at this chain version (STORAGE_SYNC_DONE);
   it then reports LOCAL_UPTODATE and mgmtd makes it SERVING.

A change of the chain version cancels the run (the daemon starts a new one
for the new version); failures are retried with backoff.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from flyfs import net
from flyfs.proto import common_pb2, storage_pb2 as S
from flyfs.storage import craq

__all__ = ["resync_loop", "resync_once", "ResyncStats", "ResyncError"]

log = logging.getLogger("flyfs.storage.resync")

REMOVE_BATCH = 256
PAGE = 1024


class ResyncError(Exception):
    """The syncing target refused or failed a resync request."""


@dataclass
class ResyncStats:
    sent: int = 0
    removed: int = 0
    compared: int = 0
    bytes_sent: int = 0


async def resync_loop(server, target, key: tuple[int, int, int]) -> ResyncStats:
    """Resync `key` = (chain id, syncing target id, chain version) until it succeeds
    (the daemon cancels it when the chain moves on)."""
    chain_id, succ, version = key
    delay = 0.2
    attempt = 0
    while True:
        attempt += 1
        try:
            stats = await resync_once(server, target, chain_id, succ, version)
            log.info("resync of target %d from target %d (chain %d v%d) done: %d compared, "
                     "%d sent (%d bytes), %d removed", succ, target.target_id, chain_id, version,
                     stats.compared, stats.sent, stats.bytes_sent, stats.removed)
            return stats
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("resync of target %d (chain %d v%d), attempt %d failed: %s", succ, chain_id,
                        version, attempt, e)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _check(reply, what: str) -> None:
    code = reply.status.code
    if code != common_pb2.OK:
        name = common_pb2.StatusCode.Name(code) if code in common_pb2.StatusCode.values() else str(code)
        raise ResyncError(f"{what}: {name}: {reply.status.message}")


async def resync_once(server, target, chain_id: int, succ: int, version: int) -> ResyncStats:
    """One full comparison and repair of target `succ` from `target` (see module doc)."""
    cfg = server.config
    engine = target.engine
    addr = server.address_of(succ)
    pool: net.ConnectionPool = server.pool
    header = common_pb2.RequestHeader(client_id=f"storage-node-{server.node_id}")
    stats = ResyncStats()

    async def call(method: int, msg, reply_cls, what: str, payload=()):
        rep = await pool.call(addr, method, msg.SerializeToString(), payload, timeout=cfg.sync_timeout)
        reply = reply_cls.FromString(rep.header)
        _check(reply, what)
        return reply

    async def remote_listing():
        after = None
        while True:
            req = S.DumpChunkMetaRequest(header=header, target_id=succ, limit=PAGE)
            if after is not None:
                req.start_after.CopyFrom(after)
                req.has_start = True
            reply = await call(S.STORAGE_DUMP_CHUNK_META, req, S.DumpChunkMetaReply,
                               f"listing target {succ}")
            for m in reply.metas:
                yield craq.chunk_id(m.chunk.inode, m.chunk.index), m
            if not reply.more or not reply.metas:
                return
            after = reply.metas[-1].chunk

    async def local_listing():
        async for m in engine.list_metas(b"", page=PAGE):
            if len(m.chunk_id) == craq.CHUNK_ID_LEN:
                yield m

    async def remove_remote(cids: list[bytes]) -> int:
        if not cids:
            return 0
        req = S.SyncRemoveRequest(header=header, chain_id=chain_id, chain_version=version,
                                  target_id=succ)
        for cid in cids:
            inode, index = craq.parse_chunk_id(cid)
            req.chunks.add(inode=inode, index=index)
        reply = await call(S.STORAGE_SYNC_REMOVE, req, S.SyncRemoveReply, f"removing on target {succ}")
        return reply.removed

    async def send(cid: bytes) -> None:
        async with server.chunk_lock(target, cid):
            meta = await engine.get_meta(cid)
            if meta is None or meta.commit_ver == 0:
                # Gone or only a stuck pending version here: the target must not keep a copy.
                stats.removed += await remove_remote([cid])
                return
            data, m = await engine.read(cid, 0, meta.length)
            req = S.SyncInstallRequest(header=header, chain_id=chain_id, chain_version=version,
                                       target_id=succ, meta=craq.meta_to_proto(m))
            await call(S.STORAGE_SYNC_INSTALL, req, S.SyncInstallReply,
                       f"installing chunk on target {succ}", (data,) if len(data) else ())
            stats.sent += 1
            stats.bytes_sent += len(data)

    async def flush_removes(cids: list[bytes]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for cid in sorted(cids):
                await stack.enter_async_context(server.chunk_lock(target, cid))
            gone = [cid for cid in cids if await engine.get_meta(cid) is None]
            stats.removed += await remove_remote(gone)

    sem = asyncio.Semaphore(max(1, cfg.sync_concurrency))
    running: set[asyncio.Task] = set()
    errors: list[BaseException] = []

    def done(task: asyncio.Task) -> None:
        running.discard(task)
        sem.release()
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())

    removes: list[bytes] = []
    try:
        li, ri = local_listing(), remote_listing()
        lm = await anext(li, None)
        rm = await anext(ri, None)
        while lm is not None or rm is not None:
            if errors:
                raise errors[0]
            op, adv_l, adv_r = craq.sync_step(lm, rm)
            stats.compared += 1
            if op is craq.SyncOp.SEND:
                await sem.acquire()
                task = asyncio.get_running_loop().create_task(send(lm.chunk_id))
                running.add(task)
                task.add_done_callback(done)
            elif op is craq.SyncOp.REMOVE:
                removes.append(rm[0])
                if len(removes) >= REMOVE_BATCH:
                    await flush_removes(removes)
                    removes = []
            if adv_l:
                lm = await anext(li, None)
            if adv_r:
                rm = await anext(ri, None)
        await flush_removes(removes)
        if running:
            await asyncio.gather(*list(running), return_exceptions=True)
        if errors:
            raise errors[0]
    finally:
        for t in list(running):
            t.cancel()
        if running:
            await asyncio.gather(*list(running), return_exceptions=True)
    await call(S.STORAGE_SYNC_DONE, S.SyncDoneRequest(
        header=header, chain_id=chain_id, chain_version=version, target_id=succ,
        chunks_sent=stats.sent, chunks_removed=stats.removed), S.SyncDoneReply, f"finishing target {succ}")
    return stats
