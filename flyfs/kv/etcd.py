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
- While etcd cannot be reached (restarting), a call waits for it up to the
  timeout (10 s) and is sent once connected, then EngineUnavailable.
- Reads are `serializable` (served by the member without a quorum round):
  a stale read can only make the commit's compares fail and the transaction
  retry, never commit on stale data. (A read-only transaction commits nothing:
  on a multi-member cluster it sees a consistent snapshot that may lag.)

Read cache (on by default; `?cache=0` turns it off). Each etcd round trip
costs a metadata server ~0.3–0.5 ms of CPU, and a stat read three keys in two
of them, a create and its close read and wrote in four. The engine keeps the
keys of its prefix it has seen in memory, kept current by one etcd Watch of
the prefix; the watermark W is the revision up to which every change has
arrived. A transaction starts at R = W and reads from the cache while it can:
an entry serves R when it took its value at or before R (an entry changed
after R, or one not cached, does not).

Nothing read from the cache is trusted: a transaction that commits proves
every read with its compares, as above; one that commits nothing (a stat, a
failed lookup) proves them with a Txn of compares alone; and the first read
the cache cannot serve goes out in one Txn that proves the reads so far and
runs the read at the current revision, after which the transaction reads
from etcd at that revision as without the cache. A proof that fails (the
cache lagged) reruns the transaction without the cache. After a commit the
engine waits (briefly) for the watch to bring the commit into the cache, so
the caller's next transaction finds its own writes there.

A prefix of at most CACHE_COMPLETE keys is loaded whole when the watch
starts. While the cache holds every key, a key it lacks is absent (proven
like any read): the names a create or rename looks up and the request ids
of idempotent calls, absent by nature, cost no round trip. Range reads are
then served from memory too (a sorted index of the keys), proven like range
reads from etcd (no key in the range changed after R, every key returned
unchanged) as long as the proof fits one Txn (half of --max-txn-ops
compares), the rest from etcd: a remove's check for write sessions, an
rmdir's for entries and a short listing cost nothing. So a stat is one round
trip instead of two, a create + close two instead of four, a rename one
instead of three, a remove one instead of four. Past CACHE_MAX keys the
cache forgets deleted keys, then its oldest entries, and stops assuming.
The watch restarting (etcd restarted, compaction) empties the cache; until
it is back, reads go to etcd.
"""
from __future__ import annotations

import asyncio
import logging
from itertools import islice
from urllib.parse import parse_qs, urlsplit

import grpc
from aetcd.rpc import kv_pb2
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from sortedcontainers import SortedList

from .base import SCAN_BATCH, Engine, Transaction
from .errors import EngineUnavailable, KVError, TransactionConflict, TransactionTooLarge

DEFAULT_MAX_TXN_OPS = 128
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
CACHE_MAX = 1 << 18     # keys the read cache holds (the oldest entries go first)
CACHE_COMPLETE = CACHE_MAX // 2     # a prefix of at most this many keys is loaded whole
COMMIT_WAIT = 0.2       # at most, for the watch to bring a commit into the cache
log = logging.getLogger("flyfs.kv.etcd")


def _prefix_end(prefix: bytes) -> bytes:
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return b"\x00"
    b[-1] += 1
    return bytes(b)


class _State:
    __slots__ = ("rev", "keys", "ranges", "range_keys", "cached", "nocache", "snap")

    def __init__(self):
        self.rev = 0  # 0 until the first read fixes it
        self.keys: dict[bytes, int] = {}        # key read -> mod_revision (0 = absent)
        self.ranges: list[list[bytes]] = []     # [begin, end) read
        self.range_keys: dict[bytes, int] = {}  # keys returned by range reads
        self.cached = False     # every read so far came from the cache at `rev` (not yet proven)
        self.nocache = False    # a retry after a conflict: read from etcd only
        self.snap: dict[bytes, int] = {}        # snapshot reads from the cache (proven with the rest)


class EtcdEngine(Engine):
    """Engine on an etcd v3 cluster."""

    reads_checked = True

    def __init__(self, target: str, prefix: bytes = b"", max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, timeout: float = 10.0,
                 cache: bool = True):
        super().__init__()
        self.target = target
        self.prefix = prefix
        self.max_txn_ops = max_txn_ops
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self.cache = cache
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.KVStub | None = None
        self._loop = None
        # the read cache: key -> (value or None, mod_revision or 0, valid from, known at)
        self._cache: dict[bytes, tuple] = {}
        self._wm = 0                # watermark: every change up to it is in the cache (0: no cache)
        self._complete = False      # the cache holds every key of the prefix (a miss is an absent key)
        self._sorted: SortedList | None = None  # while complete: the cached keys in order (for ranges)
        self._watcher: asyncio.Task | None = None
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._closed = False
        self.cache_stats = {"hits": 0, "misses": 0, "proofs": 0, "stale": 0}

    @classmethod
    def from_url(cls, url: str) -> "EtcdEngine":
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise KVError(f"etcd URL needs host and port: etcd://HOST:PORT[/PREFIX], got {url!r}")
        q = parse_qs(parts.query)
        prefix = parts.path.strip("/").encode()
        cache = q.get("cache", ["1"])[0].lower()
        if cache not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
            raise KVError(f"etcd URL: cache must be 0 or 1, got {cache!r}")
        return cls(f"{parts.hostname}:{parts.port}", prefix + b"/" if prefix else b"",
                   int(q.get("max_txn_ops", [DEFAULT_MAX_TXN_OPS])[0]),
                   int(q.get("max_request_bytes", [DEFAULT_MAX_REQUEST_BYTES])[0]),
                   cache=cache in ("1", "true", "yes", "on"))

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
            # wait_for_ready: while etcd is unreachable (restarting), a call waits for the
            # connection, up to the timeout, instead of failing at once; it is sent only once
            # connected, so waiting never risks a commit applied twice.
            return await getattr(self._kv(), method)(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            details = e.details() or ""
            if "compacted" in details:
                raise TransactionConflict((), "etcd: read revision was compacted; retrying") from None
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise EngineUnavailable(f"etcd at {self.target} did not answer within {self.timeout:g} s "
                                        f"(not running there, unreachable, or overloaded)") from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise EngineUnavailable(f"etcd at {self.target} unavailable: {details}") from None
            if "too many operations" in details or "too large" in details:
                raise TransactionTooLarge(f"etcd refused the transaction: {details} (nothing was committed)") from None
            raise KVError(f"etcd {method} failed: {e.code().name}: {details}") from None

    async def close(self) -> None:
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            if watcher.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(watcher, return_exceptions=True)
        self._drop_cache()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    # ---- the read cache ---------------------------------------------------------
    def _drop_cache(self) -> None:
        self._wm = 0
        self._complete = False
        self._sorted = None
        self._cache.clear()
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _ensure_watch(self) -> None:
        loop = asyncio.get_running_loop()
        w = self._watcher
        if w is not None and w.get_loop() is loop and not w.done():
            return
        if w is not None and not w.done():
            try:
                w.get_loop().call_soon_threadsafe(w.cancel)
            except RuntimeError:    # that loop is closed: its task went with it
                pass
        self._drop_cache()
        self._watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Keep the cache current: one Watch of the prefix from the revision the cache starts at."""
        p = self.prefix
        lo, hi = (p, _prefix_end(p)) if p else (b"\x00", b"\x00")
        delay = 0.1
        while not self._closed:
            call = None
            try:
                self._kv()
                head = await self._call("Range", pb.RangeRequest(key=lo, range_end=hi, count_only=True,
                                                                  serializable=True))
                start = head.header.revision
                call = pb_grpc.WatchStub(self._channel).Watch()
                await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
                    key=lo, range_end=hi, start_revision=start + 1)))
                while True:
                    wr = await call.read()
                    if wr is grpc.aio.EOF:
                        raise ConnectionError("etcd ended the watch stream")
                    if wr.created:
                        self._cache.clear()
                        # A prefix small enough is loaded whole (as of `start`; the watch holds
                        # what follows): then a key the cache lacks is a key etcd lacks.
                        if head.count <= CACHE_COMPLETE:
                            await self._load(lo, hi, start)
                        self._wm, delay = start, 0.1
                    if wr.canceled or wr.compact_revision:
                        raise ConnectionError(f"etcd cancelled the watch: {wr.cancel_reason or 'compacted'}")
                    if wr.events:
                        self._apply(wr.events)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("etcd %s: watch of the read cache down (%s); reading from etcd until it is back",
                         self.target, e)
            finally:
                self._drop_cache()
                if call is not None:
                    call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _load(self, lo: bytes, hi: bytes, rev: int) -> None:
        cache, n = self._cache, len(self.prefix)
        while True:
            resp = await self._call("Range", pb.RangeRequest(key=lo, range_end=hi, revision=rev, limit=1000,
                                                              serializable=True))
            for kv in resp.kvs:
                cache[kv.key[n:]] = (kv.value, kv.mod_revision, kv.mod_revision, rev)
            if not resp.more or not resp.kvs:
                break
            lo = resp.kvs[-1].key + b"\x00"
        self._complete = True
        self._sorted = SortedList(cache)

    def _put(self, k: bytes, entry: tuple) -> None:
        if self._sorted is not None and k not in self._cache:
            self._sorted.add(k)
        self._cache[k] = entry

    def _apply(self, events) -> None:
        cache, n, top = self._cache, len(self.prefix), self._wm
        for ev in events:
            kv = ev.kv
            rev = kv.mod_revision
            k = kv.key[n:]
            e = cache.get(k)
            if e is not None and e[3] >= rev:
                continue
            self._put(k, (None, 0, rev, rev) if ev.type == kv_pb2.Event.DELETE else (kv.value, rev, rev, rev))
            if rev > top:
                top = rev
        if len(cache) > CACHE_MAX:
            # Deleted keys go first (an absent key reads the same either way), then the
            # oldest entries; with those the cache stops knowing which keys etcd lacks.
            for k in [k for k, e in cache.items() if e[0] is None]:
                del cache[k]
            if self._sorted is not None:
                self._sorted = SortedList(cache)
            if len(cache) > CACHE_MAX:
                self._complete, self._sorted = False, None
                while len(cache) > CACHE_MAX:
                    del cache[next(iter(cache))]
        if top > self._wm:
            self._wm = top
            if self._waiters:
                keep = []
                for rev, fut in self._waiters:
                    if rev <= top:
                        if not fut.done():
                            fut.set_result(None)
                    else:
                        keep.append((rev, fut))
                self._waiters = keep

    def _remember(self, k: bytes, kvs, rev: int) -> None:
        """Cache a read made at the current revision `rev` (the cache is at or behind it)."""
        if not self._wm or rev < self._wm:
            return
        e = self._cache.get(k)
        if e is not None and e[3] >= rev:
            return
        if kvs:
            self._put(k, (kvs[0].value, kvs[0].mod_revision, kvs[0].mod_revision, rev))
        else:
            self._put(k, (None, 0, rev, rev))    # absent at rev; since when is not known

    def _compares(self, st: _State, snapshots: bool) -> list:
        p = self.prefix
        M, EQ, LT = pb.Compare.MOD, pb.Compare.EQUAL, pb.Compare.LESS
        seen = dict(st.range_keys)
        if snapshots:
            seen.update(st.snap)
        seen.update(st.keys)
        out = [pb.Compare(key=p + k, target=M, result=EQ, mod_revision=mod) for k, mod in seen.items()]
        for b, e in st.ranges:
            if b < e:
                out.append(pb.Compare(key=p + b, range_end=p + e, target=M, result=LT, mod_revision=st.rev + 1))
        return out

    async def _prove(self, st: _State, ops: list):
        """One Txn that proves every read so far (from the cache at st.rev) still current and
        runs `ops` (reads) at the current revision; from then on the transaction reads from
        etcd at that revision. TransactionConflict when a read was out of date."""
        compares = self._compares(st, snapshots=True)
        if len(compares) + len(ops) > self.max_txn_ops:
            raise TransactionConflict(list(st.keys), "too many cached reads to prove in one etcd Txn")
        self.cache_stats["proofs"] += 1
        resp = await self._call("Txn", pb.TxnRequest(compare=compares, success=ops))
        if not resp.succeeded:
            self.cache_stats["stale"] += 1
            raise TransactionConflict(list(st.keys) or list(st.snap), "a read from the cache was out of date")
        st.rev, st.cached, st.snap = resp.header.revision, False, {}
        return resp

    async def _finish(self, st: _State, failed: bool) -> None:
        if st.cached and (st.keys or st.snap or st.ranges):
            await self._prove(st, [])

    def _retrying(self, st: _State) -> None:
        st.nocache = True

    # ---- verbs ----------------------------------------------------------------
    def _begin(self):
        if self.cache:
            self._ensure_watch()
        return _State()

    async def _get(self, st: _State, keys, snapshot):
        p = self.prefix
        if not st.rev and self._wm and not st.nocache:
            st.rev, st.cached = self._wm, True
        if st.cached:
            cache, rev, out, miss = self._cache, st.rev, [], []
            reads = st.snap if snapshot else st.keys
            complete = self._complete
            for i, k in enumerate(keys):
                e = cache.get(k)
                if e is not None and e[2] <= rev:
                    out.append(e[0])
                    reads[k] = e[1]
                else:
                    out.append(None)
                    if complete and e is None:
                        reads[k] = 0    # (proven absent with the rest)
                    else:
                        miss.append(i)
            if not miss:
                self.cache_stats["hits"] += len(keys)
                return out
            self.cache_stats["hits"] += len(keys) - len(miss)
            self.cache_stats["misses"] += len(miss)
            resp = await self._prove(st, [pb.RequestOp(request_range=pb.RangeRequest(key=p + keys[i],
                                                                                     serializable=True))
                                          for i in miss])
            for i, r in zip(miss, resp.responses):
                found = r.response_range.kvs
                out[i] = found[0].value if found else None
                if not snapshot:
                    st.keys[keys[i]] = found[0].mod_revision if found else 0
                self._remember(keys[i], found, st.rev)
            return out
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
            if self._wm:
                self._remember(k, found, st.rev)
        return out

    def _cached_range(self, st: _State, lo: bytes, hi: bytes, reverse: bool, rng: list):
        """The next keys of [lo, hi) from the complete cache at st.rev: (last key examined
        or None, [(key, value)...], whether the range ended), what they prove recorded in
        `st` and `rng`; None where the cache cannot serve them (no complete cache, a key
        changed after st.rev, or the transaction's proof would no longer fit one Txn)."""
        if self._sorted is None:
            return None
        limit = min(SCAN_BATCH, self.max_txn_ops // 2 - len(st.keys) - len(st.snap) - len(st.range_keys)
                    - len(st.ranges))
        if limit <= 0:
            return None
        cache, rev = self._cache, st.rev
        keys = list(islice(self._sorted.irange(lo, hi, inclusive=(True, False), reverse=reverse), limit))
        entries = [cache.get(k) for k in keys]
        if any(e is not None and e[2] > rev for e in entries):
            return None         # changed after st.rev: etcd serves the rest
        out = []
        for k, e in zip(keys, entries):
            if e is not None and e[0] is not None:     # (None: deleted)
                st.range_keys[k] = e[1]
                out.append((k, e[0]))
        if keys:
            if reverse:
                rng[0] = keys[-1]
            else:
                rng[1] = keys[-1] + b"\x00"
        return (keys[-1] if keys else None), out, len(keys) < limit

    async def _scan(self, st: _State, begin, end, reverse, snapshot):
        p, n = self.prefix, len(self.prefix)
        rng = None
        if not snapshot:
            rng = [end, end] if reverse else [begin, begin]
            st.ranges.append(rng)
        lo, hi = begin, end
        if not snapshot and not st.nocache and self._sorted is not None:
            # A range the complete cache can serve costs no round trip; it is proven with
            # the transaction's other reads (a key made, changed or removed in it after
            # st.rev fails the range compare or its key's compare).
            if not st.rev and self._wm:
                st.rev, st.cached = self._wm, True
            while st.cached:
                got = self._cached_range(st, lo, hi, reverse, rng)
                if got is None:
                    break
                last, out, ended = got
                self.cache_stats["hits"] += len(out)
                if ended:
                    rng[0], rng[1] = begin, end
                for kv in out:
                    yield kv
                if ended:
                    return
                if reverse:
                    hi = last
                else:
                    lo = last + b"\x00"
        while True:
            req = pb.RangeRequest(key=p + lo, range_end=p + hi, limit=SCAN_BATCH, serializable=True)
            if reverse:
                req.sort_order = pb.RangeRequest.DESCEND
                req.sort_target = pb.RangeRequest.KEY
            if st.cached:   # ranges are not cached: prove the reads so far, read this at the current revision
                resp = (await self._prove(st, [pb.RequestOp(request_range=req)])).responses[0].response_range
            else:
                req.revision = st.rev
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
        compares = self._compares(st, snapshots=False)
        seen = dict(st.range_keys)
        seen.update(st.keys)
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
            if st.cached:
                self.cache_stats["stale"] += 1
            culprits = []
            for k, r in zip(probe, resp.responses):
                now = r.response_range.kvs[0].mod_revision if r.response_range.kvs else 0
                if now != st.keys[k]:
                    culprits.append(k)
            raise TransactionConflict(culprits or [b for b, _ in st.ranges] or list(seen))
        done = resp.header.revision
        if self._wm and self._wm < done:
            # the caller's next transaction should find this one's writes in the cache
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((done, fut))
            await asyncio.wait((fut,), timeout=COMMIT_WAIT)
            if not fut.done():
                fut.cancel()
                self._waiters = [w for w in self._waiters if w[1] is not fut]


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
