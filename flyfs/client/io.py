"""Chunk math of the client (pure, no I/O) and parallel issue of chunk pieces.

A file's bytes live in chunks of `layout.chunk_size`; chunk i of the file is
on chain ``layout.chains[(layout.seed + i) % layout.stripe]``. A read or write
of (offset, length) is cut into one `Piece` per chunk it touches; the pieces
of different chunks are independent and are issued concurrently, across all
the chains of the file at once.
"""
from __future__ import annotations

import asyncio
import errno
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Iterable, Sequence, TypeVar

__all__ = ["Piece", "chain_of", "split", "by_chain", "chunk_span", "gather_limited", "DataPlane",
           "storage_error", "ReadAhead",
           "MAX_INFLIGHT"]

T = TypeVar("T")

MAX_INFLIGHT = 64  # chunk requests in flight per operation
DIRECT_READ_MAX = 1 << 20  # reads up to this size may go from the caller's thread (read_direct)


@dataclass(frozen=True, slots=True)
class Piece:
    """The part of one chunk touched by a file range."""

    index: int         # chunk index within the file
    chain: int         # chain id holding the chunk
    chunk_offset: int  # where the piece starts inside the chunk
    length: int
    buf_offset: int    # where the piece starts in the caller's buffer


def _check_layout(layout) -> None:
    if layout.chunk_size <= 0 or layout.stripe <= 0 or len(layout.chains) < layout.stripe:
        raise ValueError(f"unusable file layout: chunk size {layout.chunk_size}, stripe {layout.stripe}, "
                         f"{len(layout.chains)} chains")


def chain_of(layout, index: int) -> int:
    """The chain holding chunk `index` of a file with `layout`."""
    return layout.chains[(layout.seed + index) % layout.stripe]


def split(layout, offset: int, length: int) -> list[Piece]:
    """Cut the file range [offset, offset + length) into per-chunk pieces, in file order."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative file range: offset {offset}, length {length}")
    if length == 0:
        return []
    _check_layout(layout)
    cs = layout.chunk_size
    pieces = []
    pos, end = offset, offset + length
    while pos < end:
        index, inner = divmod(pos, cs)
        n = min(cs - inner, end - pos)
        pieces.append(Piece(index, chain_of(layout, index), inner, n, pos - offset))
        pos += n
    return pieces


def by_chain(pieces: Iterable[Piece]) -> dict[int, list[Piece]]:
    """Group pieces by chain, keeping their order."""
    out: dict[int, list[Piece]] = {}
    for p in pieces:
        out.setdefault(p.chain, []).append(p)
    return out


def chunk_span(layout, length: int) -> int:
    """How many chunks a file of `length` bytes spans."""
    return -(-length // layout.chunk_size) if length > 0 else 0


async def gather_limited(aws: Sequence[Awaitable[T]], limit: int = MAX_INFLIGHT) -> list[T]:
    """Await all of `aws` with at most `limit` running at once; results in order.

    The first failure cancels the ones not finished and is raised.
    """
    if len(aws) <= limit:
        if len(aws) == 1:
            return [await aws[0]]
        return await _gather_or_cancel([asyncio.ensure_future(a) for a in aws])
    sem = asyncio.Semaphore(limit)

    async def one(a):
        async with sem:
            return await a

    return await _gather_or_cancel([asyncio.ensure_future(one(a)) for a in aws])


async def _gather_or_cancel(tasks: list[asyncio.Future]) -> list:
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# ---- data plane: file ranges over the storage client ----------------------------------------------------

def storage_error(e: Exception, what: str) -> OSError:
    """A StorageClientError (or transport failure) as an OSError: EINVAL for bad input
    (e.g. beyond the largest chunk index), ENOSPC for a full disk, EIO for everything
    else (every replica failed its checksum, or retrying gave up)."""
    from ..proto import common_pb2
    code = getattr(e, "code", None)
    if code == common_pb2.NO_SPACE:
        err = errno.ENOSPC
    elif code == common_pb2.INVALID_ARGUMENT or isinstance(e, ValueError):
        err = errno.EINVAL
    else:
        err = errno.EIO
    return OSError(err, f"{what}: {getattr(e, 'message', None) or e}")


class DataPlane:
    """File ranges read and written through a StorageClient: cut into chunk
    pieces, writes issued to every chain at once, reads as batch reads."""

    def __init__(self, storage, *, max_inflight: int = MAX_INFLIGHT, own: bool = True):
        self.storage = storage
        self.max_inflight = max_inflight
        self._own = own

    async def close(self) -> None:
        if self._own:
            await self.storage.close()

    async def write(self, ino: int, layout, offset: int, data: memoryview) -> None:
        """Write all of `data` at file offset `offset`."""
        pieces = split(layout, offset, len(data))
        cs = layout.chunk_size
        st = self.storage
        try:
            await gather_limited([st.write(p.chain, ino, p.index, p.chunk_offset,
                                           data[p.buf_offset:p.buf_offset + p.length], chunk_size=cs)
                                  for p in pieces], self.max_inflight)
        except (OSError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise storage_error(e, f"write of inode {ino} at {offset}") from None

    async def flush(self, ino: int, layout) -> None:
        """Make every acknowledged write of the file durable on its replicas' disks."""
        try:
            await self.storage.flush(layout.chains[:layout.stripe])
        except (OSError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise storage_error(e, f"fsync of inode {ino}") from None

    async def read(self, ino: int, layout, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the file's bytes from `offset` (holes and gaps read as zeros)."""
        await self.read_many([(ino, layout, offset, buf)])

    def read_direct(self, ino: int, layout, offset: int, buf: memoryview) -> bool:
        """`read`, in the calling thread without the event loop, for a range within one
        chunk of at most DIRECT_READ_MAX bytes; False (try `read`) where it did not apply
        or did not work. Thread-safe."""
        direct = getattr(self.storage, "read_direct", None)
        if direct is None or not 0 < len(buf) <= DIRECT_READ_MAX:
            return False
        pieces = split(layout, offset, len(buf))
        if len(pieces) != 1:
            return False
        from .storage_client import ReadPiece
        p = pieces[0]
        return direct(ReadPiece(p.chain, ino, p.index, p.chunk_offset, p.length, buf)) is not None

    async def read_many(self, plan: Sequence[tuple[int, object, int, memoryview]]) -> None:
        """Several (inode, layout, offset, buffer) reads as one batch: all pieces in flight together."""
        from .storage_client import ReadPiece
        pieces = []
        for ino, layout, offset, buf in plan:
            for p in split(layout, offset, len(buf)):
                pieces.append(ReadPiece(p.chain, ino, p.index, p.chunk_offset, p.length,
                                        buf[p.buf_offset:p.buf_offset + p.length]))
        if not pieces:
            return
        try:
            await self.storage.batch_read(pieces)
        except (OSError, asyncio.CancelledError):
            raise
        except Exception as e:
            first = plan[0]
            raise storage_error(e, f"read of inode {first[0]} at {first[2]}") from None


# ---- sequential read-ahead for blocking callers (the FUSE mount) -------------------------------------------

class ReadAhead:
    """Sequential read-ahead of one open file, for blocking callers (FUSE threads).

    FUSE hands reads over in 128 KiB requests; each sent to storage alone costs
    a thread hop and a chain round trip. Once reads run sequentially, the next
    blocks of `block` bytes are fetched in the background (one block ahead at
    first, doubling with every block the reader enters, up to `depth`: a
    reader of a few pages does not pull megabytes), and a read that falls
    inside blocks already fetched is served from them in the caller's thread
    (no hop, no round trip).

    `fetch(offset, length)` starts a read and returns a concurrent.futures.Future
    of its bytes (short at end of file). `limit()` is the file length as known
    now: nothing at or beyond it is fetched ahead. `gen()` changes whenever the
    file's bytes change through this client (writes, truncates): blocks fetched
    under another generation are never served. Thread-safe. `read` returns None
    when it cannot serve the request (not sequential yet, not covered, a fetch
    failed): the caller then reads directly, which also reports any error.
    """

    def __init__(self, fetch, limit, gen, *, block: int = 1 << 20, depth: int = 4, max_age: float = 1.0,
                 timeout: float | None = None):
        if block <= 0 or depth <= 0:
            raise ValueError(f"read-ahead needs a positive block and depth, not {block} and {depth}")
        self._fetch, self._limit, self._gen = fetch, limit, gen
        self.block, self.depth, self.max_age, self.timeout = block, depth, max_age, timeout
        self._lock = threading.Lock()
        self._blocks: dict[int, tuple[int, float, object]] = {}  # index -> (gen, fetched at, future)
        self._last_end = -1
        self._ramp = 0      # blocks entered by the current sequential run (window 2**ramp)
        self._first = -1    # the block the last read started in
        self.hits = 0

    def read(self, offset: int, size: int) -> bytes | None:
        """The bytes of [offset, offset + size) from read-ahead blocks, or None."""
        if size <= 0 or offset < 0:
            return None
        B = self.block
        first, last = offset // B, (offset + size - 1) // B
        gen, now = self._gen(), time.monotonic()
        with self._lock:
            blocks = self._blocks
            sequential = offset == self._last_end or first in blocks
            self._last_end = offset + size
            if not sequential:
                self._ramp = 0
                self._first = first
                return None
            if first != self._first:
                self._first = first
                self._ramp = min(self._ramp + 1, 16)
            window = min(self.depth, 1 << self._ramp)
            for k in [k for k, (g, at, _) in blocks.items() if k < first or g != gen or now - at > self.max_age]:
                del blocks[k]
            limit = self._limit()
            for k in range(first, first + max(window, last - first + 1)):
                start = k * B
                if start >= limit:
                    break
                if k not in blocks:
                    blocks[k] = (gen, now, self._fetch(start, min(B, limit - start)))
            wanted = [blocks.get(k) for k in range(first, last + 1)]
        if any(w is None for w in wanted):
            return None  # beyond the known end: the caller's read asks for the length
        parts = []
        for k, (_, _, fut) in zip(range(first, last + 1), wanted):
            try:
                data = fut.result(self.timeout)
            except Exception:  # (TimeoutError included: the direct read waits, or fails, itself)
                return None
            lo = max(offset, k * B) - k * B
            hi = min(offset + size, (k + 1) * B) - k * B
            if len(data) < hi:
                return None  # short block (end of file then): the direct read decides
            parts.append(memoryview(data)[lo:hi])
        if self._gen() != gen:
            return None
        self.hits += 1
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def clear(self) -> None:
        """Drop every block (e.g. at close); fetches in flight finish unobserved."""
        with self._lock:
            self._blocks.clear()
            self._last_end = -1
            self._ramp = 0
