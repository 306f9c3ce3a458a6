"""The flyfs native client: `connect()` returns a FileSystem.

    import flyfs
    fs = flyfs.connect("127.0.0.1:8000")     # mgmtd's address, or "flyfs://HOST:PORT"
    with fs.open("/data/x.bin", "wb") as f:
        f.write(b"...")

Modules: fs (FileSystem, AsyncFileSystem), file (io objects), io (chunk math,
data plane), runtime (background event loop, fork safety), meta_client and
storage_client (the service clients).
"""
import os as _os
import sys as _sys

# gRPC can only be used in a forked child (DataLoader workers) when its fork
# handlers are on, and it reads this once, when it is first imported.
if "grpc" in _sys.modules and "GRPC_ENABLE_FORK_SUPPORT" not in _os.environ:
    import warnings as _warnings
    _warnings.warn("flyfs: gRPC was imported before flyfs without GRPC_ENABLE_FORK_SUPPORT=1: a forked "
                   "child (e.g. a DataLoader worker) may hang using a flyfs client; import flyfs first "
                   "or set the variable", RuntimeWarning, stacklevel=2)
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "1")

from .fs import AsyncFileSystem, ClientConfig, FileSystem, Handle, connect  # noqa: E402

__all__ = ["connect", "FileSystem", "AsyncFileSystem", "ClientConfig", "Handle"]
