"""What the metadata service needs from storage, as an interface.

The metadata service reads and writes no file data except a small inline file's
when it moves to chunks (inline.py); it asks storage for four things (the
storage engineers implement this over the storage daemon RPCs; tests use
``flyfs.metaserver.fakes.FakeStorageOps``):

- the length of a file whose writer died (from its last chunk),
- truncation of a file's chunks (remove chunks past the new length, trim the
  last one; for an extension nothing past the new length exists and the gap
  reads as zeros),
- removal of all chunks of a deleted file (garbage collection),
- a write of bytes into a file's chunks (an inline file's data moving to chunk 0).

Every method must be idempotent: GC and truncate are retried after failures
and may run on two metadata servers at once.
"""
from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from .schema import Layout

log = logging.getLogger("flyfs.meta")


@runtime_checkable
class StorageOps(Protocol):
    async def query_last_chunk(self, inode: int, layout: Layout) -> int:
        """The file's length as storage sees it: end of the last chunk that holds data."""
        ...

    async def truncate(self, inode: int, layout: Layout, length: int) -> None:
        """Drop every byte at offset >= `length` (chunks past it removed, the last one trimmed)."""
        ...

    async def remove_chunks(self, inode: int, layout: Layout) -> int:
        """Remove every chunk of the file; return how many were removed (0 when none are left)."""
        ...

    async def write_data(self, inode: int, layout: Layout, offset: int, data: bytes) -> None:
        """Write `data` at file offset `offset` through the layout (within one chunk)."""
        ...


class NoStorage:
    """StorageOps for a metadata server with no storage attached (yet): there are
    no chunks anywhere, so lengths are 0 and there is nothing to remove."""

    warned = False

    def _warn(self) -> None:
        if not NoStorage.warned:
            NoStorage.warned = True
            log.warning("no storage attached: file lengths come only from clients and GC "
                        "removes metadata only")

    async def query_last_chunk(self, inode: int, layout: Layout) -> int:
        self._warn()
        return 0

    async def truncate(self, inode: int, layout: Layout, length: int) -> None:
        self._warn()

    async def remove_chunks(self, inode: int, layout: Layout) -> int:
        self._warn()
        return 0

    async def write_data(self, inode: int, layout: Layout, offset: int, data: bytes) -> None:
        raise OSError(5, f"inode {inode}: no storage attached to write its data to")
