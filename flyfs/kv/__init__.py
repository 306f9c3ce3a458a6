"""Transactional key-value store: one interface, several engines chosen by URL.

    engine = open_engine("memory://")                 # in-process, for tests
    engine = open_engine("rocksdb:///var/lib/flyfs/meta")  # embedded, one process owns the dir
    engine = open_engine("etcd://127.0.0.1:2379/flyfs")    # distributed

    async def fn(txn):
        n = int(await txn.get(b"counter") or b"0")
        txn.set(b"counter", b"%d" % (n + 1))
        return n
    await engine.transact(fn)

Every transaction is serializable (optimistic concurrency control); the one
runner in `base.Engine.transact` owns retries, jittered backoff and conflict
counters. Reads inside a transaction: `get`, `get_many`, `get_range` (async
iterator, streaming), and `snapshot_get` / `snapshot_get_range` that add no
read conflicts. Writes are buffered (`set`, `clear`, `clear_range`) and seen
by later reads of the same transaction.
"""
from urllib.parse import urlsplit

from .base import Engine, Transaction, MAX_KEY_SIZE, MAX_VALUE_SIZE, MAX_TXN_BYTES
from .errors import (EngineUnavailable, InvalidKey, InvalidValue, KVError,
                     TransactionConflict, TransactionTooLarge)

__all__ = ["open_engine", "Engine", "Transaction", "KVError", "InvalidKey", "InvalidValue",
           "TransactionConflict", "TransactionTooLarge", "EngineUnavailable",
           "MAX_KEY_SIZE", "MAX_VALUE_SIZE", "MAX_TXN_BYTES"]


def open_engine(url: str) -> Engine:
    """Open the engine named by `url` (memory://, rocksdb:///dir, etcd://host:port[/prefix])."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryEngine
        return MemoryEngine.from_url(url)
    if scheme == "rocksdb":
        from .rocksdb import RocksDBEngine
        return RocksDBEngine.from_url(url)
    if scheme == "etcd":
        from .etcd import EtcdEngine
        return EtcdEngine.from_url(url)
    raise KVError(f"unknown KV engine URL {url!r}: expected memory://, rocksdb:///DIR or etcd://HOST:PORT[/PREFIX]")
