"""Chunk engine of a storage target: chunk data in files, chunk metadata in rocksdict.

A target is one directory::

    DIR/LOCK              fcntl lock held by the owning process (holds its pid)
    DIR/meta/             rocksdict: one key per chunk, b"c" + chunk id; the bytes of
                          small (inline) versions at b"d" + chunk id + seq
    DIR/chunks/XX/ID.SEQ  chunk data; XX = crc32c(id) & 0xff (fan-out), ID = hex id,
                          SEQ = hex per-target file sequence number (never reused)

Versions (as in 3FS/CRAQ). A chunk has at most one *committed* and one *pending*
version. ``prepare_write``/``truncate`` stage a pending version without
disturbing the committed one; ``commit`` makes it the committed one in a single
metadata write; readers only ever see committed data. Version rules:

* an update whose version is <= the commit version is refused (``StaleUpdate``),
  so is one older than the pending version;
* an update with the pending version (a retry) or a newer one applies on top
  of the pending content (writes and truncates are idempotent, so a retried
  update yields the same content; a newer one stacks as it did upstream);
* ``commit(v)`` commits the pending version v; committing a version that is
  already committed returns the current meta (retried commits are harmless);
* ``abort`` drops the pending version.

Copy-on-write, and when it is skipped. The bytes a live version (committed or
pending) refers to are never modified in place, so a crash at any moment leaves
every recorded version intact. A new pending version is therefore stored:

* *shared*: when nothing changes on disk (shrinking truncate, empty write) the
  new version points at the base version's file with a new length;
* *appended in place*: when every changed byte lies at or past the end of all
  live data in the base file (sequential writes, appends, extending truncate),
  the bytes are written past that end into the same file (first cutting off any
  junk a crashed or superseded update left there). Readers never read past the
  committed length, so the committed version is untouched;
* *copied* otherwise (an overwrite inside live data): a new file receives the
  untouched base ranges through ``copy_file_range`` (in-kernel, no user-space
  copy, a reflink where the file system can) and the new bytes. The cost is a
  copy of the rest of the chunk; a write covering the whole chunk copies
  nothing. Measured cost is in the benchmark test; the 3FS workload (sequential
  writes of whole chunks) takes the first two paths.

Durability has two modes. With ``sync_writes=True`` data is written with
``pwrite``/``copy_file_range`` and made durable with ``fdatasync`` (plus an
fsync of the directory for a new file) *before* the metadata names it; commit,
install and remove are one metadata write made durable before they return;
superseded files are unlinked only after. With ``sync_writes=False`` (how 3FS
runs: replication across nodes is the durability, disks are synced in the
background and on demand) the same writes happen in the same order but nobody
waits for the disk: every step is in the kernel when the call returns, so a
``kill -9`` of the daemon loses nothing, and ``sync_dirty()`` makes everything
written so far durable against power loss (the daemon calls it periodically and
when a client fsyncs a file). Should a power loss keep metadata whose data did
not reach the disk, the block checksums catch it on read (an error, never
data) and the chain's other replicas serve and resync it. Files that no metadata names (left by a crash) are removed at open, and
a pending version whose file is gone is dropped. A metadata write is a plain
rocksdict ``put``/``write`` followed by ``flush_wal(sync=True)``: a synced put
holds the GIL during its fsync (it would stall the event loop), flush_wal
releases it, and concurrent commits share one WAL sync.

Small chunks in the metadata store (``inline_max``, 0 = off). A version of
at most ``inline_max`` bytes (at most one block) keeps its bytes under its own
key next to the chunk's record (``b"d" + id + seq``, seq with the top bit set)
instead of in a file, written in the same atomic batch as the record: no file
to create, open, sync and unlink per small chunk, and an update that needs no
file (every small write) can run without the hop to an engine thread
(``ChunkEngine`` does it on the loop, see ``run_now``). Versions that grow past
``inline_max`` move to a file by the copy path; reads, commits, removal,
resync and recovery treat both kinds alike.

Checksums: every chunk version records the crc32c of each ``block_size`` block
(64 KiB by default) and of the whole content (the whole crc is folded from the
block crcs, so updating it never rereads the chunk). Reads widen the range to
whole blocks, read straight into the caller's buffer (``preadv``; only the
widened head and tail go to scratch buffers) and check every block touched: a
mismatch raises ``ChecksumMismatch``, never returns data. Updates that keep part
of a block check that block of the base first, so corruption is never laundered
into a fresh checksum. ``verify`` checks a whole chunk.

The sync core (``SyncChunkEngine``) is thread-safe: per-chunk locks serialize
updates of one chunk, reads take no lock (a read that races with a commit
retries against the new metadata). ``ChunkEngine`` is the asyncio facade that
runs the core in a dedicated thread pool.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import queue
import struct
import sys
import threading
from array import array
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Iterator

import crc32c as _crc32c_mod
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from flyfs.net.shm import address
from flyfs.storage.errors import (ChainVersionMismatch, ChecksumMismatch, ChunkCorrupted,
                                  ChunkNotCommitted, ChunkNotFound, ChunkSizeExceeded,
                                  EngineClosed, InvalidArgument, StaleUpdate, StorageError,
                                  TargetLocked, VersionMismatch)

__all__ = ["ChunkMeta", "SyncChunkEngine", "ChunkEngine", "CrcMath", "plan_update",
           "DEFAULT_MAX_CHUNK_SIZE", "DEFAULT_BLOCK_SIZE", "MAX_CHUNK_ID_LEN"]

log = logging.getLogger(__name__)
crc32c = _crc32c_mod.crc32c

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_MAX_CHUNK_SIZE = 64 * MiB
DEFAULT_BLOCK_SIZE = 64 * KiB
MAX_CHUNK_ID_LEN = 64
FORMAT = 1

_KEY_CONFIG = b"#config"
_KEY_CHUNK = b"c"
_KEY_DATA = b"d"            # + chunk id + 8-byte seq: the bytes of an inline version
_INLINE = 1 << 63           # the seq bit of a version whose bytes are inline
_FANOUT = 256
_SPARE_DIR = "spare"
_SPARE_MAX = 4096   # empty files made ahead per target, at most (see SyncChunkEngine._new_file)
_SPARE_LOW = 256    # ChunkEngine makes them in the background while fewer are ready
_NO_SYNC = WriteOptions()
_NO_SYNC.sync = False
_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else None


def _hex(chunk_id: bytes) -> str:
    return chunk_id.hex()


def _data_key(chunk_id: bytes, seq: int) -> bytes:
    return _KEY_DATA + chunk_id + seq.to_bytes(8, "big")


# --------------------------------------------------------------------------- crc math (pure)

class CrcMath:
    """crc32c arithmetic for one block size: combine, zero runs, folding block crcs.

    With P_n the linear map "append n bytes" on finalized crcs,
    crc(A+B) = P_n(crc(A)) ^ crc(B) for n = len(B), and
    P_n(c) = crc32c(zeros(n), c) ^ crc32c(zeros(n), 0). P_block_size is
    tabulated (4 x 256 entries) so folding a 64 MiB chunk's 1024 block crcs is
    cheap; other lengths (the last partial block) use the zero-run identity.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._zeros = memoryview(bytes(block_size))
        self._zero_block_crc = crc32c(self._zeros)
        z0 = self._zero_block_crc
        basis = [crc32c(self._zeros, 1 << bit) ^ z0 for bit in range(32)]
        self._tables = []
        for k in range(4):
            t = [0] * 256
            for b in range(1, 256):
                low = b & -b
                t[b] = t[b ^ low] ^ basis[8 * k + low.bit_length() - 1]
            self._tables.append(t)

    def shift_block(self, c: int) -> int:
        t0, t1, t2, t3 = self._tables
        return t0[c & 0xFF] ^ t1[(c >> 8) & 0xFF] ^ t2[(c >> 16) & 0xFF] ^ t3[c >> 24]

    def shift(self, c: int, n: int) -> int:
        """P_n(c): the crc of (content with crc c) followed by n bytes, minus those bytes' crc."""
        while n > self.block_size:
            c = self.shift_block(c)
            n -= self.block_size
        if n == self.block_size:
            return self.shift_block(c)
        z = self._zeros[:n]
        return crc32c(z, c) ^ crc32c(z)

    def combine(self, crc_a: int, crc_b: int, len_b: int) -> int:
        """crc32c(A + B) from crc32c(A), crc32c(B) and len(B)."""
        return self.shift(crc_a, len_b) ^ crc_b

    def zeros(self, n: int, c: int = 0) -> int:
        """crc32c of n zero bytes appended to content whose crc is c."""
        if c == 0 and n == self.block_size:
            return self._zero_block_crc
        while n > self.block_size:
            c = crc32c(self._zeros, c)
            n -= self.block_size
        return crc32c(self._zeros[:n], c)

    def fold(self, block_crcs: array | list, length: int) -> int:
        """crc32c of a whole chunk from its per-block crcs (all blocks full but the last)."""
        nb = len(block_crcs)
        if nb == 0:
            return 0
        c = block_crcs[0]
        shift_block = self.shift_block
        for i in range(1, nb - 1):
            c = shift_block(c) ^ block_crcs[i]
        if nb > 1:
            c = self.shift(c, length - (nb - 1) * self.block_size) ^ block_crcs[nb - 1]
        return c

    def block_crcs(self, data: memoryview) -> array:
        bs = self.block_size
        return array("I", (crc32c(data[i:i + bs]) for i in range(0, len(data), bs)))


# --------------------------------------------------------------------------- metadata (pure)

@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """Metadata of one chunk as the engine reports it.

    ``length``/``crc`` describe the committed content (0/0 when never
    committed: ``commit_ver`` 0). ``update_ver`` equals ``commit_ver`` unless a
    pending version exists, whose length/crc are ``pending_length``/``pending_crc``.
    ``chain_ver`` is the chain version of the latest version (pending if any).
    """

    chunk_id: bytes
    commit_ver: int
    update_ver: int
    chain_ver: int
    length: int
    crc: int
    pending_length: int | None = None
    pending_crc: int | None = None

    @property
    def committed(self) -> bool:
        return self.commit_ver > 0

    @property
    def has_pending(self) -> bool:
        return self.pending_length is not None


class _Rec:
    """One stored version: where its bytes live and their checksums."""

    __slots__ = ("ver", "chain_ver", "length", "seq", "crc", "crcs")
    _HDR = struct.Struct("<QQQQII")

    def __init__(self, ver: int, chain_ver: int, length: int, seq: int, crc: int, crcs: array):
        self.ver, self.chain_ver, self.length, self.seq, self.crc, self.crcs = (
            ver, chain_ver, length, seq, crc, crcs)

    def replace(self, **kw) -> "_Rec":
        vals = {s: getattr(self, s) for s in self.__slots__}
        vals.update(kw)
        return _Rec(**vals)

    def same(self, other: "_Rec | None") -> bool:
        return (other is not None and self.ver == other.ver and self.seq == other.seq
                and self.length == other.length and self.crc == other.crc)


_VAL_HDR = struct.Struct("<BB")
_BIG_ENDIAN = sys.byteorder == "big"


def _encode(c: _Rec | None, p: _Rec | None) -> bytes:
    parts = [_VAL_HDR.pack(FORMAT, (1 if c else 0) | (2 if p else 0))]
    for r in (c, p):
        if r is not None:
            parts.append(_Rec._HDR.pack(r.ver, r.chain_ver, r.length, r.seq, r.crc, len(r.crcs)))
            crcs = r.crcs
            if _BIG_ENDIAN:
                crcs = array("I", crcs)
                crcs.byteswap()
            parts.append(crcs.tobytes())
    return b"".join(parts)


def _decode(value: bytes) -> tuple[_Rec | None, _Rec | None]:
    fmt, flags = _VAL_HDR.unpack_from(value, 0)
    if fmt != FORMAT:
        raise StorageError(f"chunk metadata format {fmt} is not supported (expected {FORMAT})")
    pos = _VAL_HDR.size
    out: list[_Rec | None] = []
    for bit in (1, 2):
        if not flags & bit:
            out.append(None)
            continue
        ver, chain_ver, length, seq, crc, nb = _Rec._HDR.unpack_from(value, pos)
        pos += _Rec._HDR.size
        crcs = array("I")
        crcs.frombytes(value[pos:pos + 4 * nb])
        if _BIG_ENDIAN:
            crcs.byteswap()
        pos += 4 * nb
        out.append(_Rec(ver, chain_ver, length, seq, crc, crcs))
    return out[0], out[1]


def _meta(chunk_id: bytes, c: _Rec | None, p: _Rec | None) -> ChunkMeta:
    cv = c.ver if c else 0
    return ChunkMeta(chunk_id=chunk_id, commit_ver=cv, update_ver=p.ver if p else cv,
                     chain_ver=(p or c).chain_ver if (p or c) else 0,
                     length=c.length if c else 0, crc=c.crc if c else 0,
                     pending_length=p.length if p else None, pending_crc=p.crc if p else None)


def _usage(c: _Rec | None, p: _Rec | None) -> int:
    """Bytes of chunk data these versions keep alive (a shared file counts once)."""
    if c is None or p is None:
        return (c or p).length if (c or p) else 0
    if c.seq == p.seq:
        return max(c.length, p.length)
    return c.length + p.length


def _live_len(seq: int, c: _Rec | None, p: _Rec | None) -> int:
    return max([r.length for r in (c, p) if r is not None and r.seq == seq], default=0)


# --------------------------------------------------------------------------- update planning (pure)

BASE, ZERO, DATA = 0, 1, 2
SHARE, APPEND, COPY = "share", "append", "copy"


@dataclass(frozen=True, slots=True)
class Plan:
    """How a new version is laid out and stored.

    ``segments``: (start, end, kind) covering [0, new_len) in order, kind BASE
    (bytes of the base version at the same offsets), ZERO or DATA (the
    caller's bytes at start - data_offset). ``mode``: SHARE (no bytes change,
    reuse the base file), APPEND (write past all live data of the base file),
    COPY (new file). ``changed``: block indexes whose crc must be recomputed.
    """

    new_len: int
    segments: tuple[tuple[int, int, int], ...]
    mode: str
    changed: range
    data_offset: int = 0


def plan_update(block_size: int, base_len: int, live_len: int | None, *,
                write: tuple[int, int] | None = None, truncate: int | None = None) -> Plan:
    """Plan an update of a version of length ``base_len`` whose file holds live
    data up to ``live_len`` (None: there is no base file): ``write=(offset, n)``
    or ``truncate=length``."""
    bs = block_size
    segs: list[tuple[int, int, int]] = []
    if write is not None:
        off, n = write
        if n == 0:
            return Plan(base_len, ((0, base_len, BASE),) if base_len else (),
                        SHARE if live_len is not None else COPY, range(0))
        new_len = max(base_len, off + n)
        if off > 0 and min(off, base_len) > 0:
            segs.append((0, min(off, base_len), BASE))
        if off > base_len:
            segs.append((base_len, off, ZERO))
        segs.append((off, off + n, DATA))
        if off + n < base_len:
            segs.append((off + n, base_len, BASE))
        lo = min(off, base_len)
        changed = range(lo // bs, (off + n - 1) // bs + 1)
    else:
        new_len = truncate
        if new_len <= base_len:
            segs = [(0, new_len, BASE)] if new_len else []
            part = new_len % bs != 0 and new_len < base_len
            changed = range(new_len // bs, new_len // bs + 1) if part else range(0)
            return Plan(new_len, tuple(segs), SHARE if live_len is not None else COPY, changed)
        if base_len:
            segs.append((0, base_len, BASE))
        segs.append((base_len, new_len, ZERO))
        lo = base_len
        changed = range(lo // bs, (new_len - 1) // bs + 1)
    mode = APPEND if live_len is not None and lo >= live_len else COPY
    return Plan(new_len, tuple(segs), mode, changed, write[0] if write else 0)


# --------------------------------------------------------------------------- small I/O helpers

def _pwrite_full(fd: int, mv: memoryview, offset: int) -> None:
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


DIRECT_ALIGN = 4096          # O_DIRECT offsets, lengths and buffer addresses are multiples of this
DIRECT_MIN = 64 * KiB        # smaller aligned runs go through the page cache (lower latency)
_BOUNCE = 1 * MiB


class _DirectIO:
    """Writes data runs of a chunk file with O_DIRECT where they cover whole aligned
    blocks, the rest through the page cache.

    On this kind of machine a buffered write costs ~1-2.5 ms of CPU per MiB (the
    page-cache copy into freshly faulted pages, measured), an O_DIRECT write
    ~0.1 ms: the disk reads our buffer by DMA. Reads of whole aligned blocks into
    an aligned buffer go direct too (a cold buffered read costs ~0.7 ms/MiB). A run whose buffer is not aligned
    the way its file offset is goes through a per-thread aligned bounce buffer
    (a memcpy, ~0.07 ms per MiB). 3FS's chunk files do the same (direct fd when
    aligned). The partial blocks at either end are written buffered; the kernel
    keeps page cache and direct writes of one file coherent."""

    def __init__(self):
        self.enabled = True
        self._local = threading.local()

    def _bounce(self) -> memoryview:
        b = getattr(self._local, "buf", None)
        if b is None:
            b = self._local.buf = memoryview(mmap.mmap(-1, _BOUNCE))
        return b

    def write(self, path: str, fd: int, mv: memoryview, offset: int) -> None:
        n = len(mv)
        head = min(n, -offset % DIRECT_ALIGN)
        mid = (n - head) - (n - head) % DIRECT_ALIGN
        if not self.enabled or mid < DIRECT_MIN:
            _pwrite_full(fd, mv, offset)
            return
        if head:
            _pwrite_full(fd, mv[:head], offset)
        dfd = self._open(path, os.O_WRONLY)
        if dfd is None:
            _pwrite_full(fd, mv[head:], offset + head)
            return
        try:
            run = mv[head:head + mid]
            pos = offset + head
            addr = address(run)
            try:
                if addr is not None and addr % DIRECT_ALIGN == 0:
                    _pwrite_full(dfd, run, pos)
                else:
                    bounce = self._bounce()
                    for i in range(0, mid, _BOUNCE):
                        piece = run[i:i + _BOUNCE]
                        bounce[:len(piece)] = piece
                        _pwrite_full(dfd, bounce[:len(piece)], pos + i)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._give_up(path, e)
                _pwrite_full(fd, run, pos)
        finally:
            os.close(dfd)
        if head + mid < n:
            _pwrite_full(fd, mv[head + mid:], offset + head + mid)

    def read(self, path: str, fd: int, dst: memoryview, offset: int) -> int:
        """Fill ``dst`` from ``offset`` (fewer bytes only at end of file): O_DIRECT for the
        whole aligned blocks when ``dst`` and ``offset`` are aligned, the page cache for
        the rest. Returns the bytes read."""
        n = len(dst)
        d = n - n % DIRECT_ALIGN
        if (not self.enabled or d < DIRECT_MIN or offset % DIRECT_ALIGN
                or (address(dst) or 1) % DIRECT_ALIGN):
            return _preadv_full(fd, [dst], offset)
        dfd = self._open(path, os.O_RDONLY)
        if dfd is None:
            return _preadv_full(fd, [dst], offset)
        try:
            got = _preadv_full(dfd, [dst[:d]], offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._give_up(path, e)
            return _preadv_full(fd, [dst], offset)
        finally:
            os.close(dfd)
        if got < d or d == n:
            return got
        return got + _preadv_full(fd, [dst[d:]], offset + d)

    def _open(self, path: str, flags: int) -> int | None:
        """`path` opened with O_DIRECT, or None where the file system refuses it (tmpfs)."""
        try:
            return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._give_up(path, e)
            return None

    def _give_up(self, path: str, e: OSError) -> None:
        if self.enabled:
            self.enabled = False
            log.info("%s: no O_DIRECT writes here (%s); writing through the page cache", path, e)


def _preadv_full(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
    """Fill bufs from offset; returns bytes read (less only at end of file). With
    ``flags=RWF_NOWAIT`` raises WouldBlock where the bytes are not in the page cache."""
    total = 0
    bufs = [b for b in bufs if len(b)]
    while bufs:
        try:
            n = os.preadv(fd, bufs, offset, flags) if flags else os.preadv(fd, bufs, offset)
        except BlockingIOError:
            raise WouldBlock() from None
        if n == 0:
            break
        total += n
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]
    return total


class WouldBlock(Exception):
    """A no-wait read found bytes that are not in memory: run it on an engine thread."""


_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
NOWAIT_MAX = 64 * KiB        # reads up to this size are tried on the caller's thread first


_COPY_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy [offset, offset+count) from src to the same offsets in dst, in the kernel when possible."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, offset + done, offset + done)
            if n == 0:
                break  # source shorter than recorded: the copied blocks keep their old crcs and fail on read
            done += n
        return
    except OSError as e:
        if e.errno not in _COPY_FALLBACK_ERRNOS:
            raise
    buf = bytearray(min(count - done, 4 * MiB))
    while done < count:
        n = os.preadv(src, [memoryview(buf)[:min(len(buf), count - done)]], offset + done)
        if n == 0:
            break
        _pwrite_full(dst, memoryview(buf)[:n], offset + done)
        done += n


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_view(data) -> memoryview:
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def _check_int(name: str, value, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidArgument(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_id(chunk_id) -> bytes:
    if not isinstance(chunk_id, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"chunk id must be bytes, got {type(chunk_id).__name__}")
    cid = bytes(chunk_id)
    if not 0 < len(cid) <= MAX_CHUNK_ID_LEN:
        raise InvalidArgument(f"chunk id must be 1..{MAX_CHUNK_ID_LEN} bytes, got {len(cid)}")
    return cid


class _LockTable:
    """Per-key mutexes created on demand and dropped when unused."""

    def __init__(self):
        self._mu = threading.Lock()
        self._locks: dict[bytes, list] = {}

    @contextlib.contextmanager
    def hold(self, key: bytes):
        with self._mu:
            ent = self._locks.get(key)
            if ent is None:
                ent = self._locks[key] = [threading.Lock(), 0]
            ent[1] += 1
        ent[0].acquire()
        try:
            yield
        finally:
            ent[0].release()
            with self._mu:
                ent[1] -= 1
                if ent[1] == 0:
                    del self._locks[key]


def _take_lock(path: str) -> int:
    lock_path = os.path.join(path, "LOCK")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise TargetLocked(f"target {path} is in use by pid {owner}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# --------------------------------------------------------------------------- sync core

class SyncChunkEngine:
    """Blocking chunk engine of one target directory (see the module docstring).

    ``fault_hook`` (tests only) is called with a point name at each step of an
    update where a crash matters, e.g. "prepare.synced", "commit.synced".
    """

    def __init__(self, path: str, *, max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 fault_hook: Callable[[str], None] | None = None, sync_writes: bool = True,
                 direct_io: bool = True, inline_max: int = 0):
        _check_int("max_chunk_size", max_chunk_size, 1)
        _check_int("inline_max", inline_max)
        if block_size & (block_size - 1) or not 4 * KiB <= block_size <= 64 * MiB:
            raise InvalidArgument(f"block_size must be a power of two in 4 KiB..64 MiB, got {block_size}")
        self.path = os.path.abspath(path)
        self.max_chunk_size = max_chunk_size
        self.sync_writes = bool(sync_writes)
        self._direct = _DirectIO()
        self._local = threading.local()
        self._direct.enabled = bool(direct_io)
        self._fault = fault_hook
        # sync_writes=False: files and directories written since the last sync_dirty()
        self._dirty_files: set[str] = set()
        self._dirty_dirs: set[str] = set()
        self._dirty_meta = False
        self._sync_mu = threading.Lock()  # one sync_dirty() at a time
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd: int | None = _take_lock(self.path)
        self._db: Rdict | None = None
        try:
            self._db = Rdict(os.path.join(self.path, "meta"), Options(raw_mode=True))
            raw = self._db.get(_KEY_CONFIG)
            if raw is None:
                self.block_size = block_size
                self._db.put(_KEY_CONFIG, json.dumps({"format": FORMAT, "block_size": block_size}).encode(),
                             _NO_SYNC)
                self._db.flush_wal(True)
            else:
                cfg = json.loads(raw)
                if cfg.get("format") != FORMAT:
                    raise StorageError(f"target {self.path} has format {cfg.get('format')}, "
                                       f"expected {FORMAT}")
                self.block_size = cfg["block_size"]
                if self.block_size != block_size:
                    log.info("target %s keeps its block size %d (asked %d)", self.path,
                             self.block_size, block_size)
            self._crc = CrcMath(self.block_size)
            self.inline_max = min(inline_max, self.block_size)   # an inline version is one block
            self._chunks_dir = os.path.join(self.path, "chunks")
            fresh = not os.path.isdir(self._chunks_dir)
            for i in range(_FANOUT):
                os.makedirs(os.path.join(self._chunks_dir, f"{i:02x}"), exist_ok=True)
            self._spare_dir = os.path.join(self._chunks_dir, _SPARE_DIR)
            os.makedirs(self._spare_dir, exist_ok=True)
            if fresh:
                _fsync_dir(self._chunks_dir)
                _fsync_dir(self.path)
            self._locks = _LockTable()
            self._mu = threading.Lock()
            self._used = 0
            self._next_seq = 1
            self._spares: list[str] = []
            self._spare_next = 1
            self.recovery: dict[str, int] = {}
            self._recover()
            self._load_spares()
        except BaseException:
            self._release()
            raise

    # ----------------------------------------------------------------- plumbing

    def _release(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def close(self) -> None:
        """Close the metadata store and release the directory lock (idempotent).
        No other thread may be inside the engine (the async facade waits for them).
        Whatever awaits ``sync_dirty()`` is synced first."""
        if self._db is not None and self.dirty:
            try:
                self.sync_dirty()
            except OSError as e:
                log.error("target %s: syncing before close failed: %s", self.path, e)
        self._release()

    @property
    def closed(self) -> bool:
        return self._db is None

    def _check_open(self) -> Rdict:
        db = self._db
        if db is None:
            raise EngineClosed(f"chunk engine {self.path} is closed")
        return db

    def _fp(self, point: str) -> None:
        if self._fault is not None:
            self._fault(point)

    def _dir_of(self, chunk_id: bytes) -> str:
        return os.path.join(self._chunks_dir, f"{crc32c(chunk_id) & (_FANOUT - 1):02x}")

    def _file(self, chunk_id: bytes, seq: int) -> str:
        return os.path.join(self._dir_of(chunk_id), f"{_hex(chunk_id)}.{seq:x}")

    def would_block(self) -> None:
        """Raise WouldBlock under ``run_now``: for steps that always touch files."""
        if getattr(self._local, "nowait", False):
            raise WouldBlock()

    def run_now(self, fn, *args, **kwargs):
        """``fn(*args)`` on this thread with no file I/O (for an event loop): every step
        that would touch a file raises WouldBlock before changing anything, except
        removing a file no record names any more, which is deferred. Returns
        ``(result, deferred)``: run ``unlink_later(deferred)`` on a thread that may block.
        On WouldBlock the caller runs ``fn`` again on such a thread."""
        if self.sync_writes:
            raise WouldBlock()          # every update waits on a disk sync
        loc = self._local
        loc.nowait, loc.deferred = True, []
        try:
            return fn(*args, **kwargs), loc.deferred
        except BaseException as e:
            if loc.deferred:
                e.deferred_unlinks = loc.deferred
            raise
        finally:
            loc.nowait = False

    def unlink_later(self, deferred: list[tuple[bytes, int]]) -> None:
        for cid, seq in deferred:
            self._unlink(cid, seq)

    def _new_seq(self) -> int:
        with self._mu:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    def _add_used(self, delta: int) -> None:
        if delta:
            with self._mu:
                self._used += delta

    def _load(self, chunk_id: bytes) -> tuple[_Rec | None, _Rec | None]:
        raw = self._check_open().get(_KEY_CHUNK + chunk_id)
        return (None, None) if raw is None else _decode(raw)

    def _store(self, chunk_id: bytes, c: _Rec | None, p: _Rec | None, *, sync: bool,
               data: bytes | None = None) -> None:
        """Write the chunk's record (and, with ``data``, the bytes of the inline version
        it names, in the same atomic batch)."""
        db = self._check_open()
        key = _KEY_CHUNK + chunk_id
        if data is not None:
            wb = WriteBatch(raw_mode=True)
            wb.put(_data_key(chunk_id, (p or c).seq), data)
            wb.put(key, _encode(c, p))
            db.write(wb, _NO_SYNC)
        elif c is None and p is None:
            db.delete(key, _NO_SYNC)
        else:
            db.put(key, _encode(c, p), _NO_SYNC)
        if sync:
            self._sync_meta(db)

    def _sync_meta(self, db: Rdict) -> None:
        if self.sync_writes:
            db.flush_wal(True)  # releases the GIL, unlike a put with sync=True
        else:
            self._dirty_meta = True

    def _data_written(self, fd: int, path: str, new_file: bool) -> None:
        """Written data of ``path`` (open as ``fd``): durable now, or remembered for sync_dirty()."""
        if self.sync_writes:
            os.fdatasync(fd)
            if new_file:
                _fsync_dir(os.path.dirname(path))
            return
        with self._mu:
            self._dirty_files.add(path)
            if new_file:
                self._dirty_dirs.add(os.path.dirname(path))

    def sync_dirty(self) -> int:
        """Make every update made so far durable (fdatasync the chunk files written,
        fsync their directories, sync the metadata WAL); returns how many files were
        synced. A no-op with ``sync_writes=True``, where every update is durable on return."""
        with self._sync_mu:
            with self._mu:
                files, self._dirty_files = self._dirty_files, set()
                dirs, self._dirty_dirs = self._dirty_dirs, set()
                meta, self._dirty_meta = self._dirty_meta, False
            n = 0
            try:
                for path in sorted(files):
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue  # superseded or removed since: nothing of it to keep
                    try:
                        os.fdatasync(fd)
                        n += 1
                    finally:
                        os.close(fd)
                for d in sorted(dirs):
                    _fsync_dir(d)
                if meta or files:
                    self._check_open().flush_wal(True)
            except BaseException:
                with self._mu:  # not synced: try again next time
                    self._dirty_files |= files
                    self._dirty_dirs |= dirs
                    self._dirty_meta = self._dirty_meta or meta
                raise
            return n

    @property
    def dirty(self) -> bool:
        """Whether anything awaits sync_dirty()."""
        return bool(self._dirty_files or self._dirty_dirs or self._dirty_meta)

    def _unlink(self, chunk_id: bytes, seq: int) -> None:
        if seq & _INLINE:
            self._check_open().delete(_data_key(chunk_id, seq), _NO_SYNC)
            return
        if getattr(self._local, "nowait", False):
            self._local.deferred.append((chunk_id, seq))
            return
        # Not kept for reuse: emptying a file just written costs ~70 us here (its
        # delayed allocations are undone) and ext4 then flushes the file again when
        # it is reused and closed (auto_da_alloc), more than a create (measured).
        try:
            os.unlink(self._file(chunk_id, seq))
        except FileNotFoundError:
            pass

    def _new_file(self, path: str) -> int:
        """Create the empty file ``path`` and open it for writing.

        A spare empty file made ahead (make_spares) is renamed into place when
        there is one: creating a file on this ext4 costs ~20 us when quiet but up
        to ~450 us of CPU after many deletions (the inode allocator skips inodes
        freed in the last minutes, ``recently_deleted``: measured with perf), a
        rename ~20 us, and every new chunk, and every overwrite inside live data,
        makes a new file. ``path`` never exists already: its sequence number is new."""
        with self._mu:
            name = self._spares.pop() if self._spares else None
        if name is not None:
            try:
                os.rename(os.path.join(self._spare_dir, name), path)
                return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def _load_spares(self) -> None:
        """Take stock of the spare files (never written; any non-empty one is emptied)."""
        top = 0
        spares = []
        with os.scandir(self._spare_dir) as entries:
            for ent in entries:
                try:
                    n = int(ent.name, 16)
                except ValueError:
                    log.warning("target %s: ignoring unexpected file %s", self.path, ent.path)
                    continue
                if not ent.is_file(follow_symlinks=False):
                    continue
                if ent.stat(follow_symlinks=False).st_size:
                    os.truncate(ent.path, 0)
                spares.append(ent.name)
                top = max(top, n)
        self._spares = spares[-_SPARE_MAX:]
        for name in spares[:-_SPARE_MAX]:
            os.unlink(os.path.join(self._spare_dir, name))
        self._spare_next = top + 1

    def make_spares(self, want: int, most: int = 64) -> int:
        """Create spare empty files until ``want`` are ready, at most ``most`` now;
        returns how many were made."""
        made = 0
        while made < most and not self.closed:
            with self._mu:
                if len(self._spares) >= min(want, _SPARE_MAX):
                    break
                name = f"{self._spare_next:x}"
                self._spare_next += 1
            fd = os.open(os.path.join(self._spare_dir, name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.close(fd)
            with self._mu:
                self._spares.append(name)
            made += 1
        return made

    @property
    def spare_files(self) -> int:
        """How many spare empty files are ready."""
        return len(self._spares)

    def _limit(self, chunk_size: int | None) -> int:
        if chunk_size is None:
            return self.max_chunk_size
        _check_int("chunk_size", chunk_size, 1)
        if chunk_size > self.max_chunk_size:
            raise ChunkSizeExceeded(
                f"chunk size {chunk_size} exceeds the target's limit {self.max_chunk_size}")
        return chunk_size

    # ----------------------------------------------------------------- recovery

    def _recover(self) -> None:
        db = self._check_open()
        chunks = dropped = missing = garbage = 0
        used = 0
        max_seq = 0
        fixes: list[tuple[bytes, _Rec | None]] = []
        it = db.iter()
        it.seek(_KEY_CHUNK)
        while it.valid():
            key = it.key()
            if not key.startswith(_KEY_CHUNK):
                break
            cid = key[len(_KEY_CHUNK):]
            c, p = _decode(it.value())
            chunks += 1
            if c is not None:
                max_seq = max(max_seq, c.seq & ~_INLINE)
                if not self._exists(cid, c.seq):
                    missing += 1
                    log.error("target %s: chunk %s commit version %d: data file is missing",
                              self.path, _hex(cid), c.ver)
            if p is not None:
                max_seq = max(max_seq, p.seq & ~_INLINE)
                if not self._exists(cid, p.seq):
                    dropped += 1
                    fixes.append((cid, c))
                    p = None
            used += _usage(c, p)
            it.next()
        del it
        for cid, c in fixes:
            self._store(cid, c, None, sync=False)
        # Inline bytes no record names (a crash between a commit and the removal of
        # the version it replaced) go, as garbage files do below.
        it = db.iter()
        it.seek(_KEY_DATA)
        orphans = []
        while it.valid():
            key = it.key()
            if not key.startswith(_KEY_DATA):
                break
            cid, seq = key[len(_KEY_DATA):-8], int.from_bytes(key[-8:], "big")
            max_seq = max(max_seq, seq & ~_INLINE)
            c, p = self._load(cid)
            if not any(r is not None and r.seq == seq for r in (c, p)):
                orphans.append(key)
            it.next()
        del it
        for key in orphans:
            db.delete(key, _NO_SYNC)
        garbage += len(orphans)
        if fixes or orphans:
            db.flush_wal(True)
        for i in range(_FANOUT):
            d = os.path.join(self._chunks_dir, f"{i:02x}")
            with os.scandir(d) as entries:
                for ent in entries:
                    hex_id, dot, seq_hex = ent.name.partition(".")
                    try:
                        cid, seq = bytes.fromhex(hex_id), int(seq_hex, 16)
                    except ValueError:
                        log.warning("target %s: ignoring unexpected file %s", self.path, ent.path)
                        continue
                    max_seq = max(max_seq, seq)
                    c, p = self._load(cid)
                    if not any(r is not None and r.seq == seq for r in (c, p)):
                        os.unlink(ent.path)
                        garbage += 1
        self._used = used
        self._next_seq = max_seq + 1
        self.recovery = {"chunks": chunks, "garbage_files": garbage, "dropped_pending": dropped,
                         "missing_committed": missing}
        if garbage or dropped or missing:
            log.info("target %s recovered: %s", self.path, self.recovery)

    # ----------------------------------------------------------------- updates

    def prepare_write(self, chunk_id: bytes, offset: int, data, update_ver: int, chain_ver: int, *,
                      chunk_size: int | None = None) -> ChunkMeta:
        """Stage ``data`` at ``offset`` as pending version ``update_ver``; the committed
        version is untouched. Returns the meta (``pending_length``/``pending_crc`` set)."""
        cid = _check_id(chunk_id)
        mv = _as_view(data)
        _check_int("offset", offset)
        _check_int("update_ver", update_ver, 1)
        _check_int("chain_ver", chain_ver)
        limit = self._limit(chunk_size)
        if offset + len(mv) > limit:
            raise ChunkSizeExceeded(f"chunk {_hex(cid)}: write [{offset}, {offset + len(mv)}) "
                                    f"exceeds chunk size {limit}")
        with self._locks.hold(cid):
            return self._update(cid, update_ver, chain_ver, write=(offset, mv))

    def truncate(self, chunk_id: bytes, length: int, update_ver: int, chain_ver: int, *,
                 chunk_size: int | None = None) -> ChunkMeta:
        """Stage a pending version of length ``length`` (cut, or zero-extended)."""
        cid = _check_id(chunk_id)
        _check_int("length", length)
        _check_int("update_ver", update_ver, 1)
        _check_int("chain_ver", chain_ver)
        limit = self._limit(chunk_size)
        if length > limit:
            raise ChunkSizeExceeded(f"chunk {_hex(cid)}: length {length} exceeds chunk size {limit}")
        with self._locks.hold(cid):
            return self._update(cid, update_ver, chain_ver, truncate=length)

    def _check_update(self, cid: bytes, c: _Rec | None, p: _Rec | None, update_ver: int,
                      chain_ver: int) -> None:
        cv = c.ver if c else 0
        if update_ver <= cv:
            raise StaleUpdate(f"chunk {_hex(cid)}: update version {update_ver} is already committed "
                              f"(commit version {cv})")
        if p is not None and update_ver < p.ver:
            raise StaleUpdate(f"chunk {_hex(cid)}: update version {update_ver} is older than the "
                              f"pending version {p.ver}")
        latest = p or c
        if latest is not None and chain_ver < latest.chain_ver:
            raise ChainVersionMismatch(f"chunk {_hex(cid)}: chain version {chain_ver} is older than "
                                       f"the chunk's {latest.chain_ver}")

    def _update(self, cid: bytes, update_ver: int, chain_ver: int, *,
                write: tuple[int, memoryview] | None = None, truncate: int | None = None) -> ChunkMeta:
        c, p = self._load(cid)
        self._check_update(cid, c, p, update_ver, chain_ver)
        base = p or c
        bl = base.length if base else 0
        inline_base = base is not None and bool(base.seq & _INLINE)
        # An inline base has no file to share or append to: every update copies it.
        live = _live_len(base.seq, c, p) if base and not inline_base else None
        mv = None
        if write is not None:
            off, mv = write
            plan = plan_update(self.block_size, bl, live, write=(off, len(mv)))
        else:
            plan = plan_update(self.block_size, bl, live, truncate=truncate)
        if self.inline_max and plan.mode != SHARE and plan.new_len <= self.inline_max:
            return self._update_inline(cid, c, p, base, plan, mv, update_ver, chain_ver)
        if plan.mode != SHARE or len(plan.changed):
            self.would_block()      # this update writes or reads a file (a share reads none)

        base_fd = base_data = None
        try:
            if inline_base:
                base_data = self._inline_bytes(cid, base)
            elif base is not None and (plan.mode == COPY or len(plan.changed)):
                base_fd = self._open_rec(cid, base, os.O_RDONLY)
            new_crcs = self._updated_crcs(cid, plan, base, base_fd, mv, base_data)
            if plan.mode == SHARE:
                seq = base.seq
            elif plan.mode == APPEND:
                seq = base.seq
                self._write_append(cid, base, live, plan, mv)
            else:
                seq = self._new_seq()
                self._write_copy(cid, seq, base_fd, plan, mv, base_data)
        finally:
            if base_fd is not None:
                os.close(base_fd)
        self._fp("prepare.synced")
        new = _Rec(update_ver, chain_ver, plan.new_len, seq,
                   self._crc.fold(new_crcs, plan.new_len), new_crcs)
        try:
            self._store(cid, c, new, sync=False)
        except BaseException:
            if plan.mode == COPY:
                self._unlink(cid, seq)
            raise
        self._fp("prepare.stored")
        if p is not None and p.seq != new.seq and (c is None or p.seq != c.seq):
            self._unlink(cid, p.seq)
        self._add_used(_usage(c, new) - _usage(c, p))
        return _meta(cid, c, new)

    def _update_inline(self, cid: bytes, c: _Rec | None, p: _Rec | None, base: _Rec | None, plan: Plan,
                       mv: memoryview | None, update_ver: int, chain_ver: int) -> ChunkMeta:
        """Stage a version of at most inline_max bytes: its bytes and the record in one batch."""
        need = max([e for _, e, kind in plan.segments if kind == BASE], default=0)
        if need and not base.seq & _INLINE:
            self.would_block()      # the kept bytes are in the base's file
        buf = bytearray(plan.new_len)
        if need:
            if base.seq & _INLINE:
                kept = self._inline_bytes(cid, base)
            else:
                fd = self._open_rec(cid, base, os.O_RDONLY)
                try:
                    kept = self._read_base_block(cid, base, fd, 0)
                finally:
                    os.close(fd)
            for s, e, kind in plan.segments:
                if kind == BASE:
                    buf[s:e] = kept[s:e]
        for s, e, kind in plan.segments:
            if kind == DATA:
                buf[s:e] = mv[s - plan.data_offset:e - plan.data_offset]
        crcs = self._crc.block_crcs(memoryview(buf))
        seq = self._new_seq() | _INLINE
        new = _Rec(update_ver, chain_ver, plan.new_len, seq, self._crc.fold(crcs, plan.new_len), crcs)
        self._fp("prepare.synced")
        self._store(cid, c, new, sync=False, data=bytes(buf))
        self._fp("prepare.stored")
        if p is not None and (c is None or p.seq != c.seq):
            self._unlink(cid, p.seq)
        self._add_used(_usage(c, new) - _usage(c, p))
        return _meta(cid, c, new)

    def _inline_bytes(self, cid: bytes, rec: _Rec) -> memoryview:
        """The bytes of inline version ``rec``, checked against its recorded crc."""
        raw = self._check_open().get(_data_key(cid, rec.seq))
        if raw is None or len(raw) < rec.length:
            raise ChunkCorrupted(f"chunk {_hex(cid)}: the bytes of version {rec.ver} are "
                                 f"{'missing' if raw is None else 'short'}")
        mv = memoryview(raw)[:rec.length]
        got = crc32c(mv)
        want = rec.crcs[0] if len(rec.crcs) else 0
        if got != want:
            raise ChecksumMismatch(f"chunk {_hex(cid)}: checksum mismatch in block 0 of version "
                                   f"{rec.ver} (recorded {want:08x}, stored {got:08x})")
        return mv

    def _exists(self, cid: bytes, seq: int) -> bool:
        if seq & _INLINE:
            return self._check_open().get(_data_key(cid, seq)) is not None
        return os.path.exists(self._file(cid, seq))

    def _open_rec(self, cid: bytes, rec: _Rec, flags: int) -> int:
        try:
            return os.open(self._file(cid, rec.seq), flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ChunkCorrupted(f"chunk {_hex(cid)}: data file of version {rec.ver} is missing") from None

    def _read_base_block(self, cid: bytes, base: _Rec, fd: int | None, i: int,
                         base_data: memoryview | None = None) -> memoryview:
        """Block i of the base version, checked against its recorded crc (from
        ``base_data`` for an inline base, already checked)."""
        bs = self.block_size
        if base_data is not None:
            return base_data[i * bs:(i + 1) * bs]
        start = i * bs
        n = min(bs, base.length - start)
        buf = memoryview(bytearray(n))
        if _preadv_full(fd, [buf], start) != n:
            raise ChunkCorrupted(f"chunk {_hex(cid)}: data file of version {base.ver} is shorter "
                                 f"than its length {base.length}")
        got = crc32c(buf)
        if got != base.crcs[i]:
            raise ChecksumMismatch(f"chunk {_hex(cid)}: checksum mismatch in block {i} of version "
                                   f"{base.ver} (recorded {base.crcs[i]:08x}, on disk {got:08x})")
        return buf

    def _updated_crcs(self, cid: bytes, plan: Plan, base: _Rec | None, base_fd: int | None,
                      mv: memoryview | None, base_data: memoryview | None = None) -> array:
        bs = self.block_size
        nb = -(-plan.new_len // bs)
        crcs = array("I", base.crcs[:min(nb, plan.changed.start if len(plan.changed) else nb)]) \
            if base is not None else array("I")
        for i in plan.changed:
            b0, b1 = i * bs, min((i + 1) * bs, plan.new_len)
            c = 0
            base_block = None
            for s, e, kind in plan.segments:
                a, b = max(s, b0), min(e, b1)
                if a >= b:
                    continue
                if kind == DATA:
                    c = crc32c(mv[a - plan.data_offset:b - plan.data_offset], c)
                elif kind == ZERO:
                    c = self._crc.zeros(b - a, c)
                elif a == b0 and b == min(b1, base.length) and i < len(base.crcs) \
                        and b == min((i + 1) * bs, base.length):
                    # The block keeps all of its base bytes (an append to a partial last
                    # block): extend their recorded crc instead of reading them back. Nothing
                    # is blessed: if those bytes are damaged on disk, the new crc, derived
                    # from the record, still disagrees with them when the block is read.
                    c = base.crcs[i]
                else:
                    if base_block is None:
                        base_block = self._read_base_block(cid, base, base_fd, i, base_data)
                    c = crc32c(base_block[a - b0:b - b0], c)
            crcs.append(c)
        if len(crcs) < nb:
            crcs.extend(base.crcs[len(crcs):nb])
        return crcs

    def _write_append(self, cid: bytes, base: _Rec, live: int, plan: Plan, mv: memoryview | None) -> None:
        fd = self._open_rec(cid, base, os.O_RDWR)
        path = self._file(cid, base.seq)
        try:
            if os.fstat(fd).st_size > live:
                os.ftruncate(fd, live)  # junk from a crashed or superseded update
            for s, e, kind in plan.segments:
                if kind == DATA:
                    self._direct.write(path, fd, mv[s - plan.data_offset:e - plan.data_offset], s)
            if os.fstat(fd).st_size < plan.new_len:
                os.ftruncate(fd, plan.new_len)
            self._fp("prepare.written")
            self._data_written(fd, path, new_file=False)
        finally:
            os.close(fd)

    def _write_copy(self, cid: bytes, seq: int, base_fd: int | None, plan: Plan,
                    mv: memoryview | None, base_data: memoryview | None = None) -> None:
        path = self._file(cid, seq)
        fd = self._new_file(path)
        try:
            for s, e, kind in plan.segments:
                if kind == DATA:
                    self._direct.write(path, fd, mv[s - plan.data_offset:e - plan.data_offset], s)
                elif kind == BASE and base_data is not None:
                    _pwrite_full(fd, base_data[s:e], s)
                elif kind == BASE:
                    _copy_range(base_fd, fd, s, e - s)
            os.ftruncate(fd, plan.new_len)
            self._fp("prepare.written")
            self._data_written(fd, path, new_file=True)
        except BaseException:
            os.close(fd)
            fd = -1
            self._unlink(cid, seq)
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def commit(self, chunk_id: bytes, update_ver: int, chain_ver: int | None = None) -> ChunkMeta:
        """Make pending version ``update_ver`` the committed one (durable on return with
        ``sync_writes``; in the kernel otherwise).

        Committing an already committed version returns the current meta.
        ``chain_ver``, when given, becomes the chunk's chain version."""
        meta, stale = self.commit_record(chunk_id, update_ver, chain_ver)
        if stale is not None:
            self._unlink(_check_id(chunk_id), stale)
        return meta

    def commit_record(self, chunk_id: bytes, update_ver: int, chain_ver: int | None = None
                      ) -> tuple[ChunkMeta, int | None]:
        """`commit` up to the chunk's metadata record: returns the meta and the sequence
        number of a replaced version's data file, which the caller removes
        (``_unlink``) or leaves to the garbage collection at the next open."""
        cid = _check_id(chunk_id)
        _check_int("update_ver", update_ver, 1)
        if chain_ver is not None:
            _check_int("chain_ver", chain_ver)
        with self._locks.hold(cid):
            c, p = self._load(cid)
            if c is None and p is None:
                raise ChunkNotFound(f"chunk {_hex(cid)} not found")
            cv = c.ver if c else 0
            if p is None or update_ver != p.ver:
                if update_ver <= cv:
                    return _meta(cid, c, p), None
                if p is None:
                    raise VersionMismatch(f"chunk {_hex(cid)}: nothing pending to commit at version "
                                          f"{update_ver} (commit version {cv})")
                raise VersionMismatch(f"chunk {_hex(cid)}: commit version {update_ver} is not the "
                                      f"pending version {p.ver}")
            new = p
            if chain_ver is not None:
                if chain_ver < p.chain_ver:
                    raise ChainVersionMismatch(f"chunk {_hex(cid)}: chain version {chain_ver} is "
                                               f"older than the chunk's {p.chain_ver}")
                new = p.replace(chain_ver=chain_ver)
            self._fp("commit.before")
            self._store(cid, new, None, sync=True)
            self._fp("commit.synced")
            self._add_used(_usage(new, None) - _usage(c, p))
            return _meta(cid, new, None), (c.seq if c is not None and c.seq != new.seq else None)

    def abort(self, chunk_id: bytes) -> ChunkMeta | None:
        """Drop the pending version; returns the remaining meta (None if nothing remains)."""
        cid = _check_id(chunk_id)
        self.would_block()      # rare (a stuck update): never on the loop
        with self._locks.hold(cid):
            c, p = self._load(cid)
            if p is None:
                return _meta(cid, c, None) if c else None
            self._store(cid, c, None, sync=False)
            if c is None or c.seq != p.seq:
                self._unlink(cid, p.seq)
            self._add_used(_usage(c, None) - _usage(c, p))
            return _meta(cid, c, None) if c else None

    def install(self, chunk_id: bytes, data, meta: ChunkMeta) -> ChunkMeta:
        """Resync: replace whatever this target holds for the chunk by ``data`` as the
        committed version ``meta.commit_ver`` (chain version, length and crc from
        ``meta``, which is checked against ``data``). Durable on return with ``sync_writes``."""
        cid = _check_id(chunk_id)
        mv = _as_view(data)
        if not isinstance(meta, ChunkMeta):
            raise InvalidArgument(f"install needs a ChunkMeta, got {type(meta).__name__}")
        _check_int("commit_ver", meta.commit_ver, 1)
        _check_int("chain_ver", meta.chain_ver)
        if len(mv) != meta.length:
            raise InvalidArgument(f"chunk {_hex(cid)}: install data is {len(mv)} bytes, "
                                  f"meta says {meta.length}")
        if len(mv) > self.max_chunk_size:
            raise ChunkSizeExceeded(f"chunk {_hex(cid)}: length {len(mv)} exceeds chunk size "
                                    f"{self.max_chunk_size}")
        crcs = self._crc.block_crcs(mv)
        whole = self._crc.fold(crcs, len(mv))
        if whole != meta.crc:
            raise ChecksumMismatch(f"chunk {_hex(cid)}: install data has crc {whole:08x}, "
                                   f"meta says {meta.crc:08x}")
        self.would_block()
        with self._locks.hold(cid):
            c, p = self._load(cid)
            inline = 0 < len(mv) <= self.inline_max
            seq = self._new_seq() | (_INLINE if inline else 0)
            if not inline:
                plan = Plan(len(mv), ((0, len(mv), DATA),) if len(mv) else (), COPY, range(0))
                self._write_copy(cid, seq, None, plan, mv)
            new = _Rec(meta.commit_ver, meta.chain_ver, len(mv), seq, whole, crcs)
            self._fp("install.before")
            try:
                self._store(cid, new, None, sync=True, data=bytes(mv) if inline else None)
            except BaseException:
                self._unlink(cid, seq)
                raise
            for r in {r.seq for r in (c, p) if r is not None}:
                self._unlink(cid, r)
            self._add_used(_usage(new, None) - _usage(c, p))
            return _meta(cid, new, None)

    def remove(self, chunk_ids: Iterable[bytes]) -> int:
        """Remove chunks (all versions); returns how many existed."""
        cids = sorted({_check_id(x) for x in chunk_ids})
        with contextlib.ExitStack() as stack:
            for cid in cids:
                stack.enter_context(self._locks.hold(cid))
            found = []
            batch = WriteBatch(raw_mode=True)
            for cid in cids:
                c, p = self._load(cid)
                if c is not None or p is not None:
                    found.append((cid, c, p))
                    batch.delete(_KEY_CHUNK + cid)
            if not found:
                return 0
            db = self._check_open()
            db.write(batch, _NO_SYNC)
            self._sync_meta(db)
            self._fp("remove.synced")
            for cid, c, p in found:
                for seq in {r.seq for r in (c, p) if r is not None}:
                    self._unlink(cid, seq)
                self._add_used(-_usage(c, p))
            return len(found)

    # ----------------------------------------------------------------- reads

    def read(self, chunk_id: bytes, offset: int, length: int, into=None, *, nowait: bool = False):
        """Read committed bytes [offset, offset+length) (short at the end of the chunk).

        With ``into`` (a writable buffer of at least ``length`` bytes) returns
        ``(n, meta)``; without, returns ``(data, meta)`` with data a bytearray.
        Raises ChunkNotFound, ChunkNotCommitted, ChecksumMismatch/ChunkCorrupted.
        ``nowait``: read only from the page cache (RWF_NOWAIT), else raise WouldBlock
        having changed nothing but ``into``; for callers that must not wait on a disk."""
        cid = _check_id(chunk_id)
        _check_int("offset", offset)
        _check_int("length", length)
        if offset + length > self.max_chunk_size:
            raise InvalidArgument(f"chunk {_hex(cid)}: read [{offset}, {offset + length}) is beyond "
                                  f"the chunk size limit {self.max_chunk_size}")
        if into is None:
            out = bytearray(length)
            dst = memoryview(out)
        else:
            dst = _as_view(into)
            if dst.readonly:
                raise InvalidArgument("read buffer is read-only")
            if len(dst) < length:
                raise InvalidArgument(f"read buffer holds {len(dst)} bytes, {length} asked")
        err: StorageError | None = None
        for _ in range(4):
            c, p = self._load(cid)
            if c is None:
                if p is not None:
                    raise ChunkNotCommitted(f"chunk {_hex(cid)} has only a pending version "
                                            f"({p.ver})")
                raise ChunkNotFound(f"chunk {_hex(cid)} not found")
            n = max(0, min(length, c.length - offset))
            try:
                if n:
                    self._read_committed(cid, c, offset, dst[:n], nowait)
                break
            except ChunkCorrupted as e:
                err = e
                c2, _ = self._load(cid)
                if c.same(c2):
                    raise
                # a commit replaced the version under us: read the new one
        else:
            raise err
        meta = _meta(cid, c, p)
        if into is None:
            dst.release()
            del out[n:]
            return out, meta
        return n, meta

    def _read_committed(self, cid: bytes, c: _Rec, offset: int, dst: memoryview, nowait: bool = False) -> None:
        bs = self.block_size
        n = len(dst)
        if c.seq & _INLINE:
            dst[:] = self._inline_bytes(cid, c)[offset:offset + n]
            return
        first, last = offset // bs, (offset + n - 1) // bs
        start, end = first * bs, min((last + 1) * bs, c.length)
        # The rest of the first and last blocks (for their checksums) lands in this
        # thread's scratch: no allocation and zeroing of up to two blocks per read.
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or len(scratch) < 2 * bs:
            scratch = self._local.scratch = memoryview(bytearray(2 * bs))
        head = scratch[:offset - start]
        tail = scratch[bs:bs + end - offset - n]
        fd = self._open_rec(cid, c, os.O_RDONLY)
        try:
            if nowait:
                if not _NOWAIT:
                    raise WouldBlock()
                got = _preadv_full(fd, [head, dst, tail], start, _NOWAIT)
            elif len(head) or len(tail):
                got = _preadv_full(fd, [head, dst, tail], start)
            else:  # whole blocks straight into the caller's buffer (O_DIRECT when aligned)
                # reopened through fd, not the path: the path may be dropped meanwhile
                where = f"{_FD_DIR}/{fd}" if _FD_DIR else self._file(cid, c.seq)
                got = self._direct.read(where, fd, dst, start)
        finally:
            os.close(fd)
        if got != end - start:
            raise ChunkCorrupted(f"chunk {_hex(cid)}: data file of version {c.ver} is shorter "
                                 f"than its length {c.length}")
        pieces = ((start, head), (offset, dst), (offset + n, tail))
        for i in range(first, last + 1):
            b0, b1 = i * bs, min((i + 1) * bs, c.length)
            crc = 0
            for ps, buf in pieces:
                a, b = max(ps, b0), min(ps + len(buf), b1)
                if a < b:
                    crc = crc32c(buf[a - ps:b - ps], crc)
            if crc != c.crcs[i]:
                raise ChecksumMismatch(f"chunk {_hex(cid)}: checksum mismatch in block {i} of "
                                       f"version {c.ver} (recorded {c.crcs[i]:08x}, on disk {crc:08x})")

    def verify(self, chunk_id: bytes) -> ChunkMeta:
        """Check every block and the whole-chunk crc of the committed version."""
        cid = _check_id(chunk_id)
        c, p = self._load(cid)
        if c is None:
            raise (ChunkNotCommitted if p else ChunkNotFound)(f"chunk {_hex(cid)} has no committed version")
        step = max(self.block_size, 4 * MiB)
        buf = memoryview(bytearray(min(step, c.length)))
        for off in range(0, c.length, step):
            self.read(cid, off, min(step, c.length - off), buf)
        c, p = self._load(cid)
        if self._crc.fold(c.crcs, c.length) != c.crc:
            raise ChecksumMismatch(f"chunk {_hex(cid)}: block crcs do not fold to the chunk crc")
        return _meta(cid, c, p)

    def get_meta(self, chunk_id: bytes) -> ChunkMeta | None:
        cid = _check_id(chunk_id)
        c, p = self._load(cid)
        return None if c is None and p is None else _meta(cid, c, p)

    def list_metas(self, prefix: bytes = b"", *, page: int = 1024) -> Iterator[ChunkMeta]:
        """Metadata of every chunk whose id starts with ``prefix``, in id order."""
        after = None
        while True:
            metas = self.list_page(prefix, after, page)
            yield from metas
            if len(metas) < page:
                return
            after = metas[-1].chunk_id

    def list_page(self, prefix: bytes, after: bytes | None, limit: int) -> list[ChunkMeta]:
        """Up to ``limit`` metas with ids starting with ``prefix`` and greater than ``after``."""
        kp = _KEY_CHUNK + bytes(prefix)
        it = self._check_open().iter()
        it.seek(kp if after is None else _KEY_CHUNK + after + b"\x00")
        out = []
        while it.valid() and len(out) < limit:
            key = it.key()
            if not key.startswith(kp):
                break
            c, p = _decode(it.value())
            out.append(_meta(key[len(_KEY_CHUNK):], c, p))
            it.next()
        return out

    def query_last_chunk(self, prefix: bytes) -> tuple[bytes, int] | None:
        """(id, committed length) of the greatest committed chunk id starting with ``prefix``
        (byte order: encode chunk indexes big-endian), or None."""
        kp = _KEY_CHUNK + bytes(prefix)
        upper = bytearray(kp)
        while upper[-1] == 0xFF:
            upper.pop()
        upper[-1] += 1
        upper = bytes(upper)
        it = self._check_open().iter()
        it.seek_for_prev(upper)
        if it.valid() and it.key() >= upper:
            it.prev()
        while it.valid():
            key = it.key()
            if not key.startswith(kp):
                return None
            c, _ = _decode(it.value())
            if c is not None:
                return key[len(_KEY_CHUNK):], c.length
            it.prev()
        return None

    def used_bytes(self) -> int:
        """Bytes of chunk data held by live versions (committed and pending)."""
        return self._used


# --------------------------------------------------------------------------- async facade

class _AsyncLocks:
    def __init__(self):
        self._locks: dict[bytes, list] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: list[bytes]):
        ents = []
        for k in keys:
            ent = self._locks.get(k)
            if ent is None:
                ent = self._locks[k] = [asyncio.Lock(), 0]
            ent[1] += 1
            ents.append((k, ent))
        acquired = []
        try:
            for _, ent in ents:
                await ent[0].acquire()
                acquired.append(ent)
            yield
        finally:
            for ent in acquired:
                ent[0].release()
            for k, ent in ents:
                ent[1] -= 1
                if ent[1] == 0:
                    del self._locks[k]


class _EnginePool:
    """The engine's threads, fed through one queue; each result comes back to the
    caller's loop with call_soon_threadsafe. A round trip costs ~40 us here against
    ~72 us through loop.run_in_executor (its concurrent Future and the chaining
    to an asyncio one), and every storage request makes one to five of them."""

    def __init__(self, workers: int, name: str = "chunk-engine"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            loop, fut, fn = item
            try:
                result, error = fn(), None
            except BaseException as e:  # handed to the caller, whatever it is
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    def run(self, fn) -> asyncio.Future:
        """Run fn() on an engine thread; its result (or exception) as an asyncio future."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((loop, fut, fn))
        return fut

    def shutdown(self) -> None:
        """Let queued work finish, then stop and join the threads (blocking)."""
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()


def _unlinked(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        # left behind: the next open's garbage collection removes it
        log.warning("removing a replaced chunk file failed: %s", fut.exception())


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.done():  # the waiter was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class ChunkEngine:
    """Asyncio facade of ``SyncChunkEngine``: every disk access runs on the engine's
    own threads; updates of one chunk queue on an asyncio lock (FIFO) instead of
    occupying threads. Open with ``await ChunkEngine.open(path, ...)``."""

    def __init__(self, core: SyncChunkEngine, executor: _EnginePool):
        self.sync = core
        self._pool = executor
        self._locks = _AsyncLocks()
        self._closing = False
        self._inflight: set[asyncio.Future] = set()
        self._stop_spares = threading.Event()
        self._spare_maker = threading.Thread(target=self._make_spares, name="chunk-spares", daemon=True)
        self._spare_maker.start()

    def _make_spares(self) -> None:
        """Keep _SPARE_LOW empty files ready, so new chunk files are renames, not
        creates, on the request path (SyncChunkEngine._new_file). At the lowest CPU
        priority: it only uses time nobody else wants."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        while not self._stop_spares.wait(0.2):
            try:
                while self.sync.make_spares(_SPARE_LOW, 32) and not self._stop_spares.is_set():
                    pass
            except (OSError, StorageError) as e:
                if self._stop_spares.is_set():
                    return
                log.warning("target %s: making spare files: %s", self.sync.path, e)
                self._stop_spares.wait(5)

    @classmethod
    async def open(cls, path: str, *, workers: int = 8, **kwargs) -> "ChunkEngine":
        pool = _EnginePool(workers)
        try:
            core = await pool.run(lambda: SyncChunkEngine(path, **kwargs))
        except BaseException:
            await asyncio.to_thread(pool.shutdown)
            raise
        return cls(core, pool)

    @property
    def path(self) -> str:
        return self.sync.path

    @property
    def block_size(self) -> int:
        return self.sync.block_size

    @property
    def max_chunk_size(self) -> int:
        return self.sync.max_chunk_size

    async def _run(self, fn, *args, **kwargs):
        if self._closing:
            raise EngineClosed(f"chunk engine {self.sync.path} is closed")
        fut = self._pool.run(lambda: fn(*args, **kwargs))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return await fut

    async def _locked(self, chunk_ids: list[bytes], fn, *args, now: bool = False, **kwargs):
        """``fn(*args)`` holding the update locks of ``chunk_ids``: in the pool, or with
        ``now`` first on the loop when it needs no file (see ``_now``)."""
        async with self._locks.hold(chunk_ids):
            if now and self.sync.inline_max and not self._closing:
                try:
                    return self._now(fn, *args, **kwargs)
                except WouldBlock:
                    pass
            return await self._run(fn, *args, **kwargs)

    def _now(self, fn, *args, **kwargs):
        # Updates of inline chunks are RocksDB reads and one unsynced batch write (the
        # WAL in the page cache, the memtable), cheaper here than the trip to an engine
        # thread and back, as commits are (see ``commit``); files a record stopped
        # naming are removed on an engine thread afterwards.
        try:
            result, deferred = self.sync.run_now(fn, *args, **kwargs)
        except BaseException as e:
            self._unlink_later(getattr(e, "deferred_unlinks", None))
            raise
        self._unlink_later(deferred)
        return result

    def _unlink_later(self, deferred) -> None:
        if deferred:
            fut = self._pool.run(lambda: self.sync.unlink_later(deferred))
            self._inflight.add(fut)
            fut.add_done_callback(self._inflight.discard)
            fut.add_done_callback(_unlinked)

    async def call(self, chunk_ids: list[bytes], fn: Callable[["SyncChunkEngine"], object]):
        """Run ``fn(core)`` holding the update locks of ``chunk_ids``: several steps of one
        request (look up, decide, stage) for one thread hop, or none: ``fn`` runs on the
        loop first when the engine keeps small chunks inline, and again in the pool if
        a step raised WouldBlock (``SyncChunkEngine.run_now``), so it must change
        nothing before a step that may raise it."""
        return await self._locked(sorted({_check_id(c) for c in chunk_ids}), fn, self.sync, now=True)

    async def prepare_write(self, chunk_id: bytes, offset: int, data, update_ver: int, chain_ver: int,
                            *, chunk_size: int | None = None) -> ChunkMeta:
        return await self._locked([_check_id(chunk_id)], self.sync.prepare_write, chunk_id, offset, data,
                                  update_ver, chain_ver, chunk_size=chunk_size, now=True)

    async def truncate(self, chunk_id: bytes, length: int, update_ver: int, chain_ver: int, *,
                       chunk_size: int | None = None) -> ChunkMeta:
        return await self._locked([_check_id(chunk_id)], self.sync.truncate, chunk_id, length,
                                  update_ver, chain_ver, chunk_size=chunk_size, now=True)

    async def commit(self, chunk_id: bytes, update_ver: int, chain_ver: int | None = None) -> ChunkMeta:
        cid = _check_id(chunk_id)
        if self.sync.sync_writes or self._closing:
            return await self._locked([cid], self.sync.commit, cid, update_ver, chain_ver)
        # Without sync_writes a commit only rewrites the chunk's metadata record (a RocksDB
        # put: its WAL in the page cache, the memtable), which costs less done here than
        # the trip to an engine thread and back (~0.2 ms under load, measured per chain
        # hop); a replaced version's file is removed on an engine thread afterwards.
        async with self._locks.hold([cid]):
            meta, stale = self.sync.commit_record(cid, update_ver, chain_ver)
        if stale is not None:
            fut = self._pool.run(lambda: self.sync._unlink(cid, stale))
            self._inflight.add(fut)
            fut.add_done_callback(self._inflight.discard)
            fut.add_done_callback(_unlinked)
        return meta

    async def abort(self, chunk_id: bytes) -> ChunkMeta | None:
        return await self._locked([_check_id(chunk_id)], self.sync.abort, chunk_id)

    async def install(self, chunk_id: bytes, data, meta: ChunkMeta) -> ChunkMeta:
        return await self._locked([_check_id(chunk_id)], self.sync.install, chunk_id, data, meta)

    async def remove(self, chunk_ids: Iterable[bytes]) -> int:
        cids = sorted({_check_id(x) for x in chunk_ids})
        return await self._locked(cids, self.sync.remove, cids)

    async def read(self, chunk_id: bytes, offset: int, length: int, into=None):
        if length <= NOWAIT_MAX and into is not None:
            try:
                return self.read_now(chunk_id, offset, length, into)
            except WouldBlock:
                pass
        return await self._run(self.sync.read, chunk_id, offset, length, into)

    def read_now(self, chunk_id: bytes, offset: int, length: int, into):
        """`read` on the caller's thread (the loop) when it cannot wait on a disk: the
        bytes from the page cache (RWF_NOWAIT), else WouldBlock. For small reads this
        costs less than the hop to an engine thread and back (~40 us, two context
        switches). What it does touch synchronously is the chunk's metadata record
        (RocksDB's memtable or block cache) and an open() of the chunk file."""
        if self._closing:
            raise EngineClosed(f"chunk engine {self.sync.path} is closed")
        if not _NOWAIT:
            raise WouldBlock()
        return self.sync.read(chunk_id, offset, length, into, nowait=True)

    async def verify(self, chunk_id: bytes) -> ChunkMeta:
        return await self._run(self.sync.verify, chunk_id)

    async def get_meta(self, chunk_id: bytes) -> ChunkMeta | None:
        return await self._run(self.sync.get_meta, chunk_id)

    async def query_last_chunk(self, prefix: bytes) -> tuple[bytes, int] | None:
        return await self._run(self.sync.query_last_chunk, prefix)

    async def list_page(self, prefix: bytes, after: bytes | None, limit: int) -> list[ChunkMeta]:
        """Up to `limit` metas with `prefix`, in chunk id order, after chunk id `after`."""
        return await self._run(self.sync.list_page, prefix, after, limit)

    async def list_metas(self, prefix: bytes = b"", *, page: int = 1024) -> AsyncIterator[ChunkMeta]:
        after = None
        while True:
            metas = await self.list_page(prefix, after, page)
            for m in metas:
                yield m
            if len(metas) < page:
                return
            after = metas[-1].chunk_id

    def used_bytes(self) -> int:
        return self.sync.used_bytes()

    async def sync_dirty(self) -> int:
        """See ``SyncChunkEngine.sync_dirty`` (runs in the engine's pool)."""
        return await self._run(self.sync.sync_dirty)

    async def close(self) -> None:
        """Wait for running operations, then close the target (idempotent)."""
        if self._closing:
            return
        self._closing = True
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        # Joining the threads also waits for work whose caller was cancelled meanwhile,
        # so the core is closed with nobody inside it.
        self._stop_spares.set()
        await asyncio.to_thread(self._spare_maker.join)
        await asyncio.to_thread(self._pool.shutdown)
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> "ChunkEngine":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
