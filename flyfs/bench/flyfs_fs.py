"""The GraySort file-system interface (flyfs.bench.graysort.FS) over the flyfs client.

    fs_factory = FlyfsFS("127.0.0.1:8000")         # picklable; holds only the address
    run_graysort(fs_factory, 1_000_000, 8, 2)      # each worker process connects once

An instance connects lazily, on its first call, so it can be built in one
process and used in another (spawned GraySort workers). Calling an instance
returns a fresh, unconnected one with the same settings: every worker gets
its own client. Pickling drops the connection.
"""
from __future__ import annotations

import posixpath
from typing import Any, BinaryIO

__all__ = ["FlyfsFS", "rmtree"]


class FlyfsFS:
    """graysort's FS on a flyfs cluster: `address` is mgmtd's HOST:PORT;
    `meta` a metadata server HOST:PORT when mgmtd lists none; `options` are
    flyfs.client.ClientConfig fields."""

    def __init__(self, address: str, meta: str | None = None, **options: Any) -> None:
        from flyfs.client.fs import parse_address
        self.address = parse_address(address)
        self.meta = meta
        self.options = dict(options)
        self._client = None

    def __call__(self) -> "FlyfsFS":
        return FlyfsFS(self.address, self.meta, **self.options)

    def __getstate__(self) -> dict:
        return {"address": self.address, "meta": self.meta, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._client = None

    def __repr__(self) -> str:
        return f"FlyfsFS({self.address!r})"

    @property
    def client(self):
        """The flyfs.FileSystem behind this adapter (connected on first use)."""
        if self._client is None:
            from flyfs.client import connect
            self._client = connect(self.address, meta=self.meta, **self.options)
        return self._client

    def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            c.close()

    # ---- graysort.FS ----------------------------------------------------------------------------
    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        self.client.makedirs(_norm(path), exist_ok=exist_ok)

    def open(self, path: str, mode: str = "rb") -> BinaryIO:
        if "b" not in mode:
            raise ValueError(f"FlyfsFS opens binary files only, got mode {mode!r}")
        return self.client.open(_norm(path), mode)

    def listdir(self, path: str) -> list[str]:
        return sorted(self.client.listdir(_norm(path)))

    def size(self, path: str) -> int:
        return self.client.stat(_norm(path)).st_size

    def remove(self, path: str) -> None:
        self.client.remove(_norm(path))

    def rmtree(self, path: str) -> None:
        """Remove a directory and everything under it (FileNotFoundError if missing)."""
        rmtree(self.client, path)

    def exists(self, path: str) -> bool:
        return self.client.exists(_norm(path))


def rmtree(client, path: str) -> None:
    """Remove a directory and everything under it through a flyfs.FileSystem."""
    top = _norm(path)
    for e in list(client.scandir(top)):
        if e.is_dir(follow_symlinks=False):
            rmtree(client, posixpath.join(top, e.name))
        else:
            client.remove(posixpath.join(top, e.name))
    client.rmdir(top)


def _norm(path: str) -> str:
    return posixpath.normpath("/" + path)
