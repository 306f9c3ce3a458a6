"""Errors raised by the storage target (chunk engine).

Each carries ``code``, the ``flyfs.StatusCode`` value a storage service puts in
its reply, so the daemon maps exceptions to statuses without a lookup table.
Messages are one line and name the chunk (hex id) they concern.
"""
from __future__ import annotations

from flyfs.proto import common_pb2

_SC = common_pb2.StatusCode


class StorageError(Exception):
    """Base class of every chunk engine error."""

    code: int = _SC.INTERNAL


class InvalidArgument(StorageError, ValueError):
    """Bad input (negative or out-of-range offset/length, bad chunk id, ...); nothing was written."""

    code = _SC.INVALID_ARGUMENT


class ChunkSizeExceeded(InvalidArgument):
    """The request would make a chunk larger than the chunk size limit; nothing was written."""


class ChunkNotFound(StorageError, LookupError):
    """The target holds no version of this chunk."""

    code = _SC.NOT_FOUND


class ChunkNotCommitted(StorageError):
    """The chunk exists only as a pending (uncommitted) version."""

    code = _SC.NOT_COMMITTED


class ChunkCorrupted(StorageError):
    """The committed data on disk is damaged (file missing or short, checksum mismatch)."""

    code = _SC.CHECKSUM_MISMATCH


class ChecksumMismatch(ChunkCorrupted):
    """Bytes on disk (or supplied for install) do not match the recorded crc32c."""


class VersionError(StorageError):
    """Base of update/commit version conflicts (the daemon decides how to recover)."""

    code = _SC.INVALID_ARGUMENT


class StaleUpdate(VersionError):
    """An update carries a version that is already committed or older than the pending one."""


class VersionMismatch(VersionError):
    """A commit names a version that is not the pending one."""


class ChainVersionMismatch(VersionError):
    """A request carries a chain version older than the one recorded on the chunk."""

    code = _SC.STALE_ROUTING


class TargetLocked(StorageError):
    """Another process owns the target directory."""


class EngineClosed(StorageError):
    """The engine was closed."""
