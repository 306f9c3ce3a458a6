"""The metadata service's StorageOps (flyfs/metaserver/storage_ops.py) over real storage.

    ops = ChunkStorageOps(StorageClient(mgmtd_client))
    MetaService(engine, storage=ops, ...)

A file's chunk i is chunk (inode, i) on chain ``layout.chain_of(i)``; the
operations fan out to every distinct chain of the layout at once.
All of them are idempotent (truncate and removal may be retried, or run by
two metadata servers at once).
"""
from __future__ import annotations

import asyncio

from flyfs.client.storage_client import StorageClient

__all__ = ["ChunkStorageOps"]


def _chains(layout) -> list[int]:
    if not layout.chains:
        return []
    return sorted(set(layout.chains))


def _check(layout) -> None:
    if layout.chunk_size <= 0:
        raise ValueError(f"layout has an unusable chunk size {layout.chunk_size}")


class ChunkStorageOps:
    """StorageOps backed by a StorageClient (see module docstring)."""

    def __init__(self, client: StorageClient):
        self.client = client

    async def query_last_chunk(self, inode: int, layout) -> int:
        """The file's length as storage sees it: the end of its last chunk that holds data."""
        _check(layout)
        found = await asyncio.gather(*(self.client.query_last_chunk(c, inode) for c in _chains(layout)))
        ends = [f.index * layout.chunk_size + f.length for f in found if f is not None]
        return max(ends, default=0)

    async def truncate(self, inode: int, layout, length: int) -> None:
        """Drop every byte at offset >= `length`: chunks past it removed, the last one cut."""
        if length < 0:
            raise ValueError(f"negative truncate length {length}")
        _check(layout)
        cs = layout.chunk_size
        keep = -(-length // cs)   # chunks [0, keep) may hold bytes below `length`
        chains = _chains(layout)
        if not chains:
            return
        await asyncio.gather(*(self.client.remove_chunks(c, inode, begin=keep) for c in chains))
        index, rest = divmod(length, cs)
        if rest:
            # Cuts the chunk if it is longer; a missing chunk (a hole) stays missing.
            await self.client.truncate_chunk(layout.chain_of(index), inode, index, rest, chunk_size=cs)

    async def write_data(self, inode: int, layout, offset: int, data: bytes) -> None:
        """Write `data` at file offset `offset` (within one chunk): an inline file moving to chunks."""
        _check(layout)
        index, at = divmod(offset, layout.chunk_size)
        if at + len(data) > layout.chunk_size:
            raise ValueError(f"write [{offset}, {offset + len(data)}) crosses a chunk boundary")
        await self.client.write(layout.chain_of(index), inode, index, at, data, chunk_size=layout.chunk_size)

    async def remove_chunks(self, inode: int, layout) -> int:
        """Remove every chunk of the file; returns how many were removed."""
        counts = await asyncio.gather(*(self.client.remove_chunks(c, inode) for c in _chains(layout)))
        return sum(counts)
