"""In-memory fakes for testing the metadata service and the layers above it."""
from __future__ import annotations

from .schema import Layout


class FakeStorageOps:
    """StorageOps over a dict of chunks: {(ino, chunk_index): bytearray}.

    ``write`` plays the part of a client writing file data through the layout,
    so tests can check truncate, length recovery and GC against real bytes.
    ``fail`` makes the next N calls raise (to test retries).
    """

    def __init__(self):
        self.chunks: dict[tuple[int, int], bytearray] = {}
        self.chain_of: dict[tuple[int, int], int] = {}
        self.calls: list[tuple[str, int]] = []
        self.fail = 0

    def _maybe_fail(self, what: str, ino: int) -> None:
        self.calls.append((what, ino))
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError(f"fake storage: injected failure in {what}")

    def write(self, ino: int, layout: Layout, offset: int, data: bytes) -> None:
        cs = layout.chunk_size
        pos = 0
        while pos < len(data):
            idx, off = divmod(offset + pos, cs)
            n = min(cs - off, len(data) - pos)
            chunk = self.chunks.setdefault((ino, idx), bytearray())
            if len(chunk) < off:
                chunk.extend(b"\0" * (off - len(chunk)))
            chunk[off:off + n] = data[pos:pos + n]
            self.chain_of[(ino, idx)] = layout.chain_of(idx)
            pos += n

    def read(self, ino: int, layout: Layout, offset: int, length: int) -> bytes:
        out = bytearray()
        cs = layout.chunk_size
        while length > 0:
            idx, off = divmod(offset, cs)
            n = min(cs - off, length)
            chunk = self.chunks.get((ino, idx), b"")
            piece = bytes(chunk[off:off + n])
            out += piece + b"\0" * (n - len(piece))
            offset += n
            length -= n
        return bytes(out)

    def chunk_count(self, ino: int | None = None) -> int:
        return sum(1 for k in self.chunks if ino is None or k[0] == ino)

    async def query_last_chunk(self, inode: int, layout: Layout) -> int:
        self._maybe_fail("query_last_chunk", inode)
        ends = [idx * layout.chunk_size + len(c) for (i, idx), c in self.chunks.items() if i == inode]
        return max(ends, default=0)

    async def truncate(self, inode: int, layout: Layout, length: int) -> None:
        self._maybe_fail("truncate", inode)
        cs = layout.chunk_size
        for (i, idx) in [k for k in self.chunks if k[0] == inode]:
            start = idx * cs
            if start >= length:
                del self.chunks[(i, idx)]
                self.chain_of.pop((i, idx), None)
            elif start + len(self.chunks[(i, idx)]) > length:
                del self.chunks[(i, idx)][length - start:]

    async def write_data(self, inode: int, layout: Layout, offset: int, data: bytes) -> None:
        self._maybe_fail("write_data", inode)
        self.write(inode, layout, offset, data)

    async def remove_chunks(self, inode: int, layout: Layout) -> int:
        self._maybe_fail("remove_chunks", inode)
        keys = [k for k in self.chunks if k[0] == inode]
        for k in keys:
            del self.chunks[k]
            self.chain_of.pop(k, None)
        return len(keys)
