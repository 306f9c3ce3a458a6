"""`etcd://host:port[/prefix][?max_txn_ops=N&max_request_bytes=B]` — the distributed engine.

Optimistic transactions on etcd's multi-version store, spoken with etcd's own
gRPC protos (as packaged by aetcd, which works with current grpcio/protobuf):

- The first read of a transaction fixes its read revision R; every later read
  is served at R, so `fn` sees one consistent snapshot.
- Commit is one etcd Txn whose compares prove nothing read has changed:
  every key read must still have the mod_revision it had at R (0 if it was
  absent); every range read must contain no key modified after R (a phantom
  insert fails the compare) and every key the range returned must still have
  its mod_revision (a delete inside the range fails it too).
- A transaction that needs more compares+operations than the server's
  --max-txn-ops (default 128) or a bigger request than --max-request-bytes
  (default 1.5 MiB) raises TransactionTooLarge before anything is sent: it is
  never committed in parts.
- Reads are `serializable` (served by the member without a quorum round):
  a stale read can only make the commit's compares fail and the transaction
  retry, never commit on stale data. (A read-only transaction commits nothing:
  on a multi-member cluster it sees a consistent snapshot that may lag.)
"""
from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import grpc
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc

from .base import SCAN_BATCH, Engine, Transaction
from .errors import EngineUnavailable, KVError, TransactionConflict, TransactionTooLarge

DEFAULT_MAX_TXN_OPS = 128
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024


def _prefix_end(prefix: bytes) -> bytes:
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return b"\x00"
    b[-1] += 1
    return bytes(b)


class _State:
    __slots__ = ("rev", "keys", "ranges", "range_keys")

    def __init__(self):
        self.rev = 0  # 0 until the first read fixes it
        self.keys: dict[bytes, int] = {}        # key read -> mod_revision (0 = absent)
        self.ranges: list[list[bytes]] = []     # [begin, end) read
        self.range_keys: dict[bytes, int] = {}  # keys returned by range reads


class EtcdEngine(Engine):
    """Engine on an etcd v3 cluster."""

    def __init__(self, target: str, prefix: bytes = b"", max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, timeout: float = 10.0):
        super().__init__()
        self.target = target
        self.prefix = prefix
        self.max_txn_ops = max_txn_ops
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.KVStub | None = None
        self._loop = None

    @classmethod
    def from_url(cls, url: str) -> "EtcdEngine":
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise KVError(f"etcd URL needs host and port: etcd://HOST:PORT[/PREFIX], got {url!r}")
        q = parse_qs(parts.query)
        prefix = parts.path.strip("/").encode()
        return cls(f"{parts.hostname}:{parts.port}", prefix + b"/" if prefix else b"",
                   int(q.get("max_txn_ops", [DEFAULT_MAX_TXN_OPS])[0]),
                   int(q.get("max_request_bytes", [DEFAULT_MAX_REQUEST_BYTES])[0]))

    # ---- connection ---------------------------------------------------------
    def _kv(self) -> pb_grpc.KVStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(self.target, options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
            self._stub = pb_grpc.KVStub(self._channel)
            self._loop = loop
        return self._stub

    async def _call(self, method: str, request):
        try:
            return await getattr(self._kv(), method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            details = e.details() or ""
            if "compacted" in details:
                raise TransactionConflict((), "etcd: read revision was compacted; retrying") from None
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise EngineUnavailable(f"etcd at {self.target} unavailable: {details}") from None
            if "too many operations" in details or "too large" in details:
                raise TransactionTooLarge(f"etcd refused the transaction: {details} (nothing was committed)") from None
            raise KVError(f"etcd {method} failed: {e.code().name}: {details}") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    # ---- verbs ----------------------------------------------------------------
    def _begin(self):
        return _State()

    async def _get(self, st: _State, keys, snapshot):
        p = self.prefix
        if len(keys) == 1:
            resp = await self._call("Range", pb.RangeRequest(key=p + keys[0], revision=st.rev,
                                                              serializable=True))
            if not st.rev:
                st.rev = resp.header.revision
            kvs = [resp.kvs]
        else:
            # One read-only Txn per max_txn_ops keys: etcd refuses bigger ones.
            kvs = []
            for i in range(0, len(keys), self.max_txn_ops):
                ops = [pb.RequestOp(request_range=pb.RangeRequest(key=p + k, revision=st.rev,
                                                                   serializable=True))
                       for k in keys[i:i + self.max_txn_ops]]
                resp = await self._call("Txn", pb.TxnRequest(success=ops))
                if not st.rev:
                    st.rev = resp.header.revision
                kvs += [r.response_range.kvs for r in resp.responses]
        out = []
        for k, found in zip(keys, kvs):
            if found:
                out.append(found[0].value)
                mod = found[0].mod_revision
            else:
                out.append(None)
                mod = 0
            if not snapshot:
                st.keys[k] = mod
        return out

    async def _scan(self, st: _State, begin, end, reverse, snapshot):
        p, n = self.prefix, len(self.prefix)
        rng = None
        if not snapshot:
            rng = [end, end] if reverse else [begin, begin]
            st.ranges.append(rng)
        lo, hi = begin, end
        while True:
            req = pb.RangeRequest(key=p + lo, range_end=p + hi, limit=SCAN_BATCH, revision=st.rev,
                                  serializable=True)
            if reverse:
                req.sort_order = pb.RangeRequest.DESCEND
                req.sort_target = pb.RangeRequest.KEY
            resp = await self._call("Range", req)
            if not st.rev:
                st.rev = resp.header.revision
            kvs = resp.kvs
            if not kvs:
                if rng is not None:
                    rng[0], rng[1] = begin, end
                return
            last = kvs[-1].key[n:]
            if rng is not None:
                if reverse:
                    rng[0] = last
                else:
                    rng[1] = last + b"\x00"
                for kv in kvs:
                    st.range_keys[kv.key[n:]] = kv.mod_revision
            for kv in kvs:
                yield kv.key[n:], kv.value
            if not resp.more:
                if rng is not None:
                    rng[0], rng[1] = begin, end
                return
            if reverse:
                hi = last
            else:
                lo = last + b"\x00"

    async def _commit(self, st: _State, txn: Transaction):
        p = self.prefix
        M, EQ, LT = pb.Compare.MOD, pb.Compare.EQUAL, pb.Compare.LESS
        compares = []
        seen = dict(st.range_keys)
        seen.update(st.keys)
        for k, mod in seen.items():
            compares.append(pb.Compare(key=p + k, target=M, result=EQ, mod_revision=mod))
        for b, e in st.ranges:
            if b < e:
                compares.append(pb.Compare(key=p + b, range_end=p + e, target=M, result=LT,
                                           mod_revision=st.rev + 1))
        ops = []
        muts = txn.mutations()
        written = sorted(op[1] for op in muts if op[0] != "clear_range")
        for b, e in _carve([(op[1], op[2]) for op in muts if op[0] == "clear_range"], written):
            ops.append(pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(
                key=p + b, range_end=p + e)))
        for op in muts:
            if op[0] == "set":
                ops.append(pb.RequestOp(request_put=pb.PutRequest(key=p + op[1], value=op[2])))
            elif op[0] == "clear":
                ops.append(pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=p + op[1])))
        # On failure, ask for the current mod_revision of the point reads to name the culprits.
        probe = list(st.keys)[: max(0, self.max_txn_ops - len(ops))]
        failure = [pb.RequestOp(request_range=pb.RangeRequest(key=p + k, keys_only=True)) for k in probe]
        if len(compares) > self.max_txn_ops or len(ops) > self.max_txn_ops:
            raise TransactionTooLarge(
                f"transaction needs {len(compares)} compares and {len(ops)} writes; etcd allows "
                f"{self.max_txn_ops} per Txn (nothing was committed)")
        req = pb.TxnRequest(compare=compares, success=ops, failure=failure)
        if req.ByteSize() > self.max_request_bytes:
            raise TransactionTooLarge(
                f"transaction of {req.ByteSize()} bytes exceeds etcd's {self.max_request_bytes}-byte "
                f"request limit (nothing was committed)")
        resp = await self._call("Txn", req)
        if not resp.succeeded:
            culprits = []
            for k, r in zip(probe, resp.responses):
                now = r.response_range.kvs[0].mod_revision if r.response_range.kvs else 0
                if now != st.keys[k]:
                    culprits.append(k)
            raise TransactionConflict(culprits or [b for b, _ in st.ranges] or list(seen))


def _carve(ranges: list[tuple[bytes, bytes]], keys: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Merge cleared ranges and cut out the keys the transaction also writes:
    etcd refuses a Txn whose put falls inside one of its delete ranges."""
    merged: list[list[bytes]] = []
    for b, e in sorted(ranges):
        if merged and b <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([b, e])
    out = []
    for b, e in merged:
        for k in keys:
            if b <= k < e:
                if b < k:
                    out.append((b, k))
                b = k + b"\x00"
        if b < e:
            out.append((b, e))
    return out
