"""Shared-memory payloads for peers on one host (DESIGN.md: "shm when client and
daemon share a host").

A process that sends large payloads owns one *arena*: a file in /dev/shm
(``flyfs-shm-PID-TOKEN``, mode 0600) mapped into its memory. Instead of
streaming a payload through the socket, the sender copies it into a slice of
its arena (or, when the payload already lies in an arena this process has
mapped, uses it where it is) and sends a frame with ``FLAG_SHM`` whose payload
is only a reference: arena name, offset, length. The receiver maps the arena
once and hands the handler a memoryview straight into it. A storage daemon
forwarding a client's write down the chain sends the same reference on, so a
chain of three stores the client's bytes with O_DIRECT writes from the client's
own arena: no socket copies anywhere (loopback TCP costs a kernel copy on each
side, ~0.3-0.5 ms of CPU per MiB each on this machine).

Safety: a connection uses references only after the peer answered a hello
naming the arena (``SHM_HELLO``: the peer maps it, so it is on this host and
the arena belongs to the peer's own user), and
a slice is reused only after the request that carried it got a successful
reply; after an error or a timeout it is held back for ``QUARANTINE`` seconds
(a daemon may still be retrying a forward of it). Arena names are checked
against one pattern, so a peer can only ever open flyfs arenas. Arenas of dead
processes are removed by the next arena created on the host, mappings of them
are dropped once nothing references them.
"""
from __future__ import annotations

import atexit
import logging
import mmap
import os
import re
import secrets
import struct
import threading

import numpy as np

__all__ = ["SHM_DIR", "SHM_MIN", "SHM_HELLO", "QUARANTINE", "Arena", "ShmError", "local_arena",
           "enabled", "pack_ref", "unpack_ref", "resolve", "locate", "address", "map_arena"]

log = logging.getLogger("flyfs.net.shm")

SHM_DIR = "/dev/shm"
SHM_MIN = 64 << 10             # smaller payloads go through the socket (a reference saves nothing)
SHM_HELLO = 0xFFFF             # reserved method: "can you map arena NAME?"
QUARANTINE = 300.0             # seconds a slice of a failed request stays unused
ARENA_SIZE = int(os.environ.get("FLYFS_SHM_ARENA", str(128 << 20)))
_MIN_ARENA = 16 << 20          # less room than this in /dev/shm: no shared memory at all
_MIN_SLICE = 64 << 10
_NAME = re.compile(r"^flyfs-shm-(\d+)-[0-9a-f]{12}$")
_REF = struct.Struct("<QQH")   # offset, length, name length; then the name
MAX_REF = _REF.size + 64


class ShmError(Exception):
    """A shared-memory reference could not be used (one line saying why)."""


def enabled() -> bool:
    """Whether this process may use shared-memory payloads (FLYFS_SHM=0 turns them off)."""
    return os.environ.get("FLYFS_SHM", "1") not in ("0", "no", "false") and os.path.isdir(SHM_DIR)


def pack_ref(name: str, offset: int, length: int) -> bytes:
    raw = name.encode()
    return _REF.pack(offset, length, len(raw)) + raw


def unpack_ref(buf) -> tuple[str, int, int]:
    if len(buf) < _REF.size or len(buf) > MAX_REF:
        raise ShmError(f"bad shared-memory reference of {len(buf)} bytes")
    offset, length, n = _REF.unpack_from(buf)
    if _REF.size + n != len(buf):
        raise ShmError("bad shared-memory reference: name length does not match")
    return bytes(buf[_REF.size:]).decode("ascii", "replace"), offset, length


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- mappings of this process

class _Mapping:
    __slots__ = ("name", "mm", "view", "start", "end", "pid")

    def __init__(self, name: str, mm: mmap.mmap, pid: int):
        self.name = name
        self.mm = mm
        self.view = memoryview(mm)
        self.start = np.frombuffer(mm, np.uint8).ctypes.data
        self.end = self.start + len(mm)
        self.pid = pid


_maps: dict[str, _Mapping] = {}
_maps_mu = threading.Lock()


def map_arena(name: str) -> _Mapping:
    """The mapping of arena `name` in this process (mapped on first use); ShmError if it
    cannot be (not a flyfs arena name, not on this host, gone)."""
    m = _maps.get(name)
    if m is not None:
        return m
    match = _NAME.match(name)
    if match is None:
        raise ShmError(f"{name!r} is not a flyfs shared-memory arena")
    with _maps_mu:
        m = _maps.get(name)
        if m is not None:
            return m
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise ShmError(f"cannot open shared-memory arena {name}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                # Only arenas of this process's own user: a daemon running as root must not
                # be talked into reading or writing another user's memory.
                raise ShmError(f"shared-memory arena {name} belongs to uid {st.st_uid}, not {os.getuid()}")
            size = st.st_size
            if size <= 0:
                raise ShmError(f"shared-memory arena {name} is empty")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        m = _maps[name] = _Mapping(name, mm, int(match.group(1)))
        _sweep_maps_locked()
        return m


def _sweep_maps_locked() -> None:
    """Drop mappings of arenas whose owner died, once nothing references them."""
    for name, m in list(_maps.items()):
        if m.pid == os.getpid() or _pid_alive(m.pid):
            continue
        try:
            m.view.release()
            m.mm.close()
        except BufferError:
            m.view = memoryview(m.mm)   # still referenced: try again next time
            continue
        del _maps[name]


def resolve(ref) -> memoryview:
    """The bytes a reference names, as a memoryview into the mapped arena."""
    name, offset, length = unpack_ref(ref)
    m = map_arena(name)
    if offset + length > len(m.mm):
        raise ShmError(f"reference [{offset}, {offset + length}) is outside arena {name} "
                       f"of {len(m.mm)} bytes")
    return m.view[offset:offset + length]


def address(buf) -> int | None:
    """The address of a contiguous buffer's first byte (None for an empty or odd one)."""
    try:
        a = np.frombuffer(buf, np.uint8)
    except (ValueError, TypeError, BufferError):
        return None
    return a.ctypes.data if a.size else None


def locate(buf) -> tuple[str, int] | None:
    """(arena name, offset) when `buf` lies wholly inside an arena mapped here."""
    start = address(buf)
    if start is None:
        return None
    end = start + memoryview(buf).nbytes
    for m in list(_maps.values()):
        if m.start <= start and end <= m.end:
            return m.name, start - m.start
    return None


# ---------------------------------------------------------------- the arena of this process

class Arena:
    """This process's arena: slices of power-of-two sizes (>= 64 KiB, page aligned)
    carved from the file and recycled through free lists."""

    def __init__(self, size: int = ARENA_SIZE):
        _remove_stale_arenas()
        st = os.statvfs(SHM_DIR)
        size = min(size, st.f_bavail * st.f_frsize // 4) // mmap.PAGESIZE * mmap.PAGESIZE
        if size < _MIN_ARENA:
            raise OSError(f"only {st.f_bavail * st.f_frsize >> 20} MiB free in {SHM_DIR}")
        self.pid = os.getpid()
        self.name = f"flyfs-shm-{self.pid}-{secrets.token_hex(6)}"
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Reserve the pages now: a tmpfs that fills up later must not turn a
            # write into the arena into SIGBUS (Docker's /dev/shm is 64 MiB).
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self.size = size
        self._mu = threading.Lock()
        self._top = 0
        self._free: dict[int, list[int]] = {}
        with _maps_mu:
            _maps[self.name] = _Mapping(self.name, mm, self.pid)
        self._view = _maps[self.name].view
        atexit.register(self.unlink)

    def alloc(self, n: int) -> tuple[int, memoryview] | None:
        """(offset, writable view of n bytes), or None when the arena is full."""
        size = max(_MIN_SLICE, 1 << max(n - 1, 1).bit_length())
        with self._mu:
            free = self._free.get(size)
            if free:
                off = free.pop()
            elif self._top + size <= self.size:
                off = self._top
                self._top += size
            else:
                return None
        return off, self._view[off:off + n]

    def free(self, offset: int, n: int) -> None:
        size = max(_MIN_SLICE, 1 << max(n - 1, 1).bit_length())
        with self._mu:
            self._free.setdefault(size, []).append(offset)

    def unlink(self) -> None:
        """Remove the file (mappings stay valid until unmapped)."""
        if os.getpid() != self.pid:
            return
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass


_arena: Arena | None = None
_arena_mu = threading.Lock()
_arena_failed = False


def local_arena() -> Arena | None:
    """This process's arena, created on first use (None where /dev/shm is unusable).
    A forked child gets its own: the parent's slices are the parent's."""
    global _arena, _arena_failed
    a = _arena
    if a is not None and a.pid == os.getpid():
        return a
    if _arena_failed or not enabled():
        return None
    with _arena_mu:
        if _arena is None or _arena.pid != os.getpid():
            try:
                _arena = Arena()
            except OSError as e:
                _arena_failed = True
                log.info("no shared-memory payloads: cannot create an arena in %s: %s", SHM_DIR, e)
                return None
        return _arena


def _remove_stale_arenas() -> None:
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        m = _NAME.match(name)
        if m is not None and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
