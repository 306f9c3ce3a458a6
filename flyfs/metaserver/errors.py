"""POSIX errors of the metadata service and the input checks that raise them.

Every failure is an ``OSError`` carrying the errno a local file system would
return (Python maps it to FileNotFoundError, FileExistsError, ...) and a
one-line message naming what was wrong. Raising inside a transaction function
aborts the attempt, so a failed operation never writes anything.
"""
from __future__ import annotations

import errno
import os
import stat

from .schema import INT64_MAX, INT64_MIN, MAX_UUID_LEN, NS

NAME_MAX = 255
PATH_MAX = 4096  # counts the terminating NUL, as Linux does
SYMLINK_MAX = PATH_MAX - 1
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
U32_MAX = 0xFFFFFFFF
FILE_SIZE_MAX = (1 << 63) - 1


def fail(code: int, message: str) -> OSError:
    """An OSError with `code` (errno) and a one-line message; `raise fail(...)`."""
    return OSError(code, message)


def as_name(name) -> bytes:
    if isinstance(name, str):
        return os.fsencode(name)
    if isinstance(name, (bytes, bytearray, memoryview)):
        return bytes(name)
    raise fail(errno.EINVAL, f"a name must be str or bytes, got {type(name).__name__}")


def check_name(name, *, dots: int | None = None) -> bytes:
    """Validate one directory entry name and return it as bytes.

    `dots` is the errno for "." and ".." (which no operation may create or
    remove as an entry), e.g. EEXIST for mkdir, EISDIR for unlink.
    """
    b = as_name(name)
    if not b:
        raise fail(errno.EINVAL, "empty name")
    if len(b) > NAME_MAX:
        raise fail(errno.ENAMETOOLONG, f"name of {len(b)} bytes is longer than {NAME_MAX}")
    if b"/" in b:
        raise fail(errno.EINVAL, f"name {b!r} contains '/'")
    if b"\0" in b:
        raise fail(errno.EINVAL, f"name {b!r} contains NUL")
    if b in (b".", b".."):
        raise fail(dots if dots is not None else errno.EINVAL, f"{b.decode()!r} is not allowed here")
    return b


def check_lookup_name(name) -> bytes:
    """Names valid for lookup: like check_name, but "." and ".." are allowed."""
    b = as_name(name)
    if b in (b".", b".."):
        return b
    return check_name(b)


def check_ino(ino) -> int:
    if not isinstance(ino, int) or isinstance(ino, bool) or not 0 < ino < (1 << 64):
        raise fail(errno.EINVAL, f"invalid inode number {ino!r}")
    return ino


def check_id(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < U32_MAX:
        raise fail(errno.EINVAL, f"invalid {what} {value!r}: must be 0..{U32_MAX - 1}")
    return value


def check_perm_bits(mode, what: str = "mode") -> int:
    if not isinstance(mode, int) or isinstance(mode, bool) or mode < 0:
        raise fail(errno.EINVAL, f"invalid {what} {mode!r}")
    return mode


def check_umask(umask) -> int:
    if not isinstance(umask, int) or isinstance(umask, bool) or not 0 <= umask <= 0o777:
        raise fail(errno.EINVAL, f"invalid umask {umask!r}: must be 0..0o777")
    return umask


def check_time(t, what: str) -> int:
    """A time in nanoseconds; its seconds must fit a signed 64-bit integer."""
    if not isinstance(t, int) or isinstance(t, bool):
        raise fail(errno.EINVAL, f"invalid {what} {t!r}: expected nanoseconds as int")
    sec = t // NS
    if not INT64_MIN <= sec <= INT64_MAX:
        raise fail(errno.EINVAL, f"{what} of {sec} s does not fit 64 bits")
    return t


def check_size(size, what: str = "size") -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise fail(errno.EINVAL, f"invalid {what} {size!r}")
    if size > FILE_SIZE_MAX:
        raise fail(errno.EFBIG, f"{what} {size} exceeds the maximum file size")
    return size


def check_uuid(uuid) -> bytes:
    if not uuid:
        return b""
    if not isinstance(uuid, (bytes, bytearray)) or len(uuid) > MAX_UUID_LEN:
        raise fail(errno.EINVAL, f"request uuid must be at most {MAX_UUID_LEN} bytes")
    return bytes(uuid)


def check_symlink_target(target) -> bytes:
    b = as_name(target)
    if not b:
        raise fail(errno.ENOENT, "empty symlink target")
    if b"\0" in b:
        raise fail(errno.EINVAL, "symlink target contains NUL")
    if len(b) > SYMLINK_MAX:
        raise fail(errno.ENAMETOOLONG, f"symlink target of {len(b)} bytes is longer than {SYMLINK_MAX}")
    return b


def type_name(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
            stat.S_IFBLK: "block device"}.get(stat.S_IFMT(mode), "inode")
