"""flyfs metadata service: stateless servers over the transactional KV.

`MetaService` (service.py) is the operator with one async method per POSIX
operation; `server.py` exposes it over gRPC (`flyfs meta`); the key schema is
written down in schema.py.
"""
from .attrs import NOW
from .common import MetaConfig
from .fakes import FakeStorageOps
from .gc import GcReport
from .layout import ChainTable, static_chain_table
from .namespace import RENAME_EXCHANGE, RENAME_NOREPLACE
from .perm import ROOT, Caller
from .schema import ROOT_INO, DirEntry, Inode, Layout, Session, StatFs
from .service import MetaService
from .storage_ops import NoStorage, StorageOps
from .xattr import XATTR_CREATE, XATTR_REPLACE

__all__ = ["MetaService", "MetaConfig", "Caller", "ROOT", "ROOT_INO", "Inode", "Layout", "DirEntry",
           "StatFs", "Session", "ChainTable", "static_chain_table", "StorageOps", "NoStorage",
           "FakeStorageOps", "GcReport", "NOW", "RENAME_NOREPLACE", "RENAME_EXCHANGE",
           "XATTR_CREATE", "XATTR_REPLACE"]
