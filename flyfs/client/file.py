"""Standard io objects over flyfs files: `FileSystem.open` returns them.

`RawFile` is an io.RawIOBase (readinto, write, seek, tell, truncate, flush,
fsync); `open_file` wraps it like the built-in open(): BufferedReader,
BufferedWriter or BufferedRandom for binary modes, TextIOWrapper for text.
Modes r/w/a/x with + and b/t, as open(). Writes are write-behind, as the
FUSE mount's (AsyncFileSystem.write_behind): write() copies the bytes into the
file's write buffer and returns, contiguous writes are coalesced and several
are in flight at once; flush(), fsync() and close() return once everything
written is on the storage chains and its length reported to the metadata
service, and raise a write that failed meanwhile (as close(2) on NFS does).
Reads through the same client wait for the writes they overlap. A write of
at least `write_buffer` bytes, and an O_APPEND write (it needs the file's
length), is done before write() returns, from the caller's buffer.
"""
from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fs import FileSystem, Handle

__all__ = ["RawFile", "open_file", "parse_mode", "handle_of"]


def parse_mode(mode: str) -> tuple[int, bool, bool, bool]:
    """open() mode -> (open flags, binary, readable, writable); ValueError if invalid."""
    if not isinstance(mode, str):
        raise TypeError(f"open() mode must be str, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or chars - set("rwaxbt+") or sum(c in chars for c in "rwax") != 1:
        raise ValueError(f"invalid mode: {mode!r}")
    if "b" in chars and "t" in chars:
        raise ValueError("can't have text and binary mode at once")
    plus = "+" in chars
    if "r" in chars:
        flags = os.O_RDWR if plus else os.O_RDONLY
    elif "w" in chars:
        flags = (os.O_RDWR if plus else os.O_WRONLY) | os.O_CREAT | os.O_TRUNC
    elif "a" in chars:
        flags = (os.O_RDWR if plus else os.O_WRONLY) | os.O_CREAT | os.O_APPEND
    else:
        flags = (os.O_RDWR if plus else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
    readable = "r" in chars or plus
    writable = not ("r" in chars) or plus
    return flags, "b" in chars, readable, writable


class RawFile(io.RawIOBase):
    """An open flyfs file as an unbuffered binary stream (one RPC per call)."""

    def __init__(self, fs: "FileSystem", handle: "Handle", mode: str, name: str):
        super().__init__()
        self._fs = fs
        self._h = handle
        self.mode = mode
        self.name = name
        self._pos = handle.size if handle.append else 0

    # ---- io.RawIOBase ------------------------------------------------------------------------------
    @property
    def handle(self) -> "Handle":
        return self._h

    def readable(self) -> bool:
        self._checkClosed()
        return self._h.readable

    def writable(self) -> bool:
        self._checkClosed()
        return self._h.writable

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("flyfs files have no OS file descriptor (use the FUSE mount for one)")

    def isatty(self) -> bool:
        return False

    def readinto(self, b) -> int:
        self._checkClosed()
        if not self._h.readable:
            raise io.UnsupportedOperation("File not open for reading")
        n = self._fs._pread(self._h, b, self._pos)
        self._pos += n
        return n

    def readall(self) -> bytes:
        self._checkClosed()
        if not self._h.readable:
            raise io.UnsupportedOperation("File not open for reading")
        size = self._fs._run_core("fgetattr", self._h).size
        chunks = []
        want = max(size - self._pos, 0)
        while True:
            buf = bytearray(max(want, 1 << 16))
            n = self._fs._run_core("pread_into", self._h, buf, self._pos)
            if not n:
                break
            self._pos += n
            chunks.append(bytes(buf) if n == len(buf) else bytes(memoryview(buf)[:n]))
            want = 1 << 20  # it grew while we read: keep going until EOF
        return b"".join(chunks)

    def write(self, b) -> int:
        self._checkClosed()
        if not self._h.writable:
            raise io.UnsupportedOperation("File not open for writing")
        mv = memoryview(b).cast("B")
        if self._h.append:
            n = self._fs._run_core("pwrite", self._h, mv, None)
            self._pos = self._h.size
            return n
        if len(mv) >= self._fs._config.write_buffer:
            # Large: written from the caller's buffer (no copy), its chunk pieces in parallel
            n = self._fs._run_core("pwrite", self._h, mv, self._pos)
        # write_buffered: appending to the write buffer needs no hop to the client loop
        elif self._fs.core.write_buffered(self._h, mv, self._pos):
            n = len(mv)
        else:
            n = self._fs._run_core("write_behind", self._h, mv, self._pos)
        self._pos += n
        return n

    def flush(self) -> None:
        """Everything written is on the chains and its length reported (or the error)."""
        if self.closed or self._h.closed:
            return
        if self._h.writable and self._fs.core.flush_needed(self._h):
            self._fs._run_core("flush", self._h)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._fs._run_core("fgetattr", self._h).size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(22, "Invalid argument", self.name)
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        self._checkClosed()
        if not self._h.writable:
            raise io.UnsupportedOperation("File not open for writing")
        size = self._pos if size is None else size
        self._fs._run_core("truncate", self._h, size)
        return size

    def fsync(self) -> None:
        """Everything written on the chains and durable on their disks, the length reported."""
        self._checkClosed()
        self._fs._run_core("fsync", self._h)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._h.closed:
                # One trip: close_handle writes out what is buffered, then reports the
                # length and ends the session in one metadata call (io's close would
                # flush first: a trip and a length report of its own).
                self._fs._run_core("close_handle", self._h)
        finally:
            try:
                super().close()     # flush(): nothing left once the handle is closed
            finally:
                if not self._h.closed:
                    self._fs._run_core("close_handle", self._h)

    def __repr__(self) -> str:
        return f"<flyfs.RawFile name={self.name!r} mode={self.mode!r}>"


class _FlushesRaw:
    """flush() also flushes the raw file. The built-in buffered classes only hand their
    buffer to the raw file, which for a local file puts the bytes in the kernel, where
    they outlive the process; a flyfs file's bytes outlive it once they are on the
    chains, which is what RawFile.flush waits for (and it reports the length). On
    close the raw file's own close does that, once."""

    _closing = False

    def flush(self) -> None:
        super().flush()
        if not self._closing and not self.raw.closed:
            self.raw.flush()

    def close(self) -> None:
        self._closing = True
        super().close()


class BufferedWriter(_FlushesRaw, io.BufferedWriter):
    """io.BufferedWriter whose flush() reaches the chains."""


class BufferedRandom(_FlushesRaw, io.BufferedRandom):
    """io.BufferedRandom whose flush() reaches the chains."""


class TextIOWrapper(io.TextIOWrapper):
    """io.TextIOWrapper that closes its buffer without an extra flush to the chains
    (the raw file's close reports once)."""

    def close(self) -> None:
        if isinstance(self.buffer, _FlushesRaw):
            self.buffer._closing = True
        super().close()


def open_file(fs: "FileSystem", handle: "Handle", path: str, mode: str, buffering: int,
              encoding: str | None, errors: str | None, newline: str | None, binary: bool,
              default_buffer: int) -> io.IOBase:
    """Wrap a Handle like the built-in open() wraps a descriptor."""
    raw = RawFile(fs, handle, mode.replace("t", ""), path)
    try:
        if buffering == 0:
            return raw
        size = default_buffer if buffering in (-1, 1) else buffering
        if handle.readable and handle.writable:
            buffered = BufferedRandom(raw, size)
        elif handle.writable:
            buffered = BufferedWriter(raw, size)
        else:
            buffered = io.BufferedReader(raw, size)
        if binary:
            return buffered
        text = TextIOWrapper(buffered, encoding, errors, newline, line_buffering=buffering == 1)
        text.mode = mode
        return text
    except BaseException:
        raw.close()
        raise


def handle_of(obj) -> "Handle | None":
    """The Handle behind a flyfs file object (raw, buffered or text), or None."""
    seen = 0
    while obj is not None and seen < 4:
        if isinstance(obj, RawFile):
            return obj.handle
        obj = getattr(obj, "buffer", None) or getattr(obj, "raw", None)
        seen += 1
    return None
