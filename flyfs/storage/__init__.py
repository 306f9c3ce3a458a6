"""Storage target: chunk engine (chunk files + rocksdict metadata); the daemon builds CRAQ on it."""
from flyfs.storage.chunk_engine import ChunkEngine, ChunkMeta, SyncChunkEngine
from flyfs.storage.errors import (ChainVersionMismatch, ChecksumMismatch, ChunkCorrupted,
                                  ChunkNotCommitted, ChunkNotFound, ChunkSizeExceeded, EngineClosed,
                                  InvalidArgument, StaleUpdate, StorageError, TargetLocked,
                                  VersionError, VersionMismatch)

__all__ = ["ChunkEngine", "ChunkMeta", "SyncChunkEngine", "ChainVersionMismatch", "ChecksumMismatch",
           "ChunkCorrupted", "ChunkNotCommitted", "ChunkNotFound", "ChunkSizeExceeded", "EngineClosed",
           "InvalidArgument", "StaleUpdate", "StorageError", "TargetLocked", "VersionError",
           "VersionMismatch"]
