"""Helpers for the metadata tests: a formatted MetaService on any engine, users, a KV dump."""
from __future__ import annotations

import stat

import pytest

from flyfs.metaserver import (Caller, FakeStorageOps, MetaConfig, MetaService, ROOT_INO,
                              static_chain_table)

ROOT = Caller(0, (0,), "root-client")
ALICE = Caller(1000, (1000, 50), "alice-client")
BOB = Caller(1001, (1001, 50), "bob-client")
CAROL = Caller(1002, (1002,), "carol-client")
CHAINS = [101, 102, 103, 104, 105]


def make_service(engine, storage=None, **config) -> MetaService:
    return MetaService(engine, storage=storage if storage is not None else FakeStorageOps(),
                       chain_table=static_chain_table(CHAINS, version=7),
                       space=lambda: (1 << 40, 1 << 39), config=MetaConfig(**config))


@pytest.fixture
async def meta(engine):
    """A formatted MetaService; the root directory is world-writable and sticky (like /tmp)
    so tests can act as ordinary users."""
    svc = make_service(engine)
    await svc.format(root_mode=0o1777)
    yield svc
    await svc.stop()


async def dump(engine) -> dict[bytes, bytes]:
    """Every key in the store (tests use small stores)."""
    async def fn(txn):
        return {k: v async for k, v in txn.snapshot_get_range(b"\x00", b"\xff")}
    return await engine.transact(fn)


async def touch(svc: MetaService, who: Caller, parent: int, name, mode: int = 0o644):
    """A regular file that is not open (create() would leave a write session)."""
    return await svc.mknod(who, parent, name, stat.S_IFREG | mode)


async def names(svc: MetaService, who: Caller, ino: int) -> list[bytes]:
    return [e.name async for e in svc.readdir_all(who, ino)]


__all__ = ["ROOT", "ALICE", "BOB", "CAROL", "CHAINS", "ROOT_INO", "make_service", "meta", "dump",
           "names", "touch"]
