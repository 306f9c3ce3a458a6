"""The etcd engine's read cache (flyfs/kv/etcd.py): fewer round trips, never a stale answer."""
import asyncio
import collections
import contextlib

import pytest

from flyfs.kv import KVError, open_engine
from flyfs.kv.etcd import EtcdEngine


@pytest.fixture
def url(etcd_server, request):
    return etcd_server.url(f"cache-{request.node.name}")


@contextlib.asynccontextmanager
async def _two(url):
    """Two engines on one prefix (two metadata servers), their caches serving."""
    a, b = open_engine(url), open_engine(url)
    try:
        await _live(a, b)
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _live(*engines):
    """Start each engine's watch and wait until its cache serves."""
    for e in engines:
        await e.transact(lambda t: t.get(b"probe"))
    for _ in range(200):
        if all(e._wm for e in engines):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the read cache never came up")


def _count_calls(engine):
    counts = collections.Counter()
    real = engine._call

    async def counted(method, request):
        counts[method] += 1
        return await real(method, request)
    engine._call = counted
    return counts


async def test_cached_reads_cost_one_proof_and_a_commit_no_reads(url):
    e = open_engine(url)
    try:
        await _live(e)
        await e.transact(lambda t: [t.set(b"k%d" % i, b"v%d" % i) for i in range(10)])
        counts = _count_calls(e)
        assert await e.transact(lambda t: t.get_many([b"k1", b"k2", b"nope"])) == [b"v1", b"v2", None]
        assert counts == {"Txn": 1}                 # read-only: the proof alone

        async def bump(t):
            v = await t.get(b"k3")
            t.set(b"k3", v + b"+")
        await e.transact(bump)
        assert counts == {"Txn": 2}                 # read-write: the commit alone
        assert await e.transact(lambda t: t.get(b"k3")) == b"v3+"   # its own write, from the cache
        assert counts == {"Txn": 3} and e.cache_stats["hits"] >= 5
    finally:
        await e.close()


async def test_another_engines_write_is_seen_at_once(url):
    """Two engines on one prefix (two metadata servers): whatever A committed, B's next
    transaction sees, whether or not B's watch has brought it yet."""
    async with _two(url) as (a, b):
        for i in range(100):
            w, r = (a, b) if i % 2 else (b, a)
            await w.transact(lambda t, i=i: t.set(b"x", b"%d" % i))
            assert await r.transact(lambda t: t.get(b"x")) == b"%d" % i
            await w.transact(lambda t, i=i: t.clear(b"x") if i % 3 == 0 else None)
            expect = None if i % 3 == 0 else b"%d" % i
            assert await r.transact(lambda t: t.get(b"x")) == expect


async def test_a_lagging_cache_never_answers_and_never_loses_an_update(url):
    """B's watch stops delivering (a lagging cache): its reads and read-modify-writes
    still see A's commits: the proofs fail and the transactions run again from etcd."""
    async with _two(url) as (a, b):
        await a.transact(lambda t: t.set(b"n", b"0"))
        assert await b.transact(lambda t: t.get(b"n")) == b"0"     # b has it cached
        b._apply = lambda events: None                              # b's cache freezes here

        async def incr(t):
            t.set(b"n", b"%d" % (int(await t.get(b"n")) + 1))

        async def need(t):
            v = await t.get(b"only-in-a")
            if v is None:           # an answer from a stale "absent" must not escape
                raise FileNotFoundError("only-in-a")
            return v

        for i in range(20):
            await (a if i % 2 else b).transact(incr)
        await a.transact(lambda t: t.set(b"only-in-a", b"here"))
        assert await b.transact(need) == b"here"
        assert await b.transact(lambda t: t.get(b"n")) == b"20"
        assert b.cache_stats["stale"] >= 2


async def test_concurrent_increments_from_two_caching_engines_all_count(url):
    async with _two(url) as (a, b):

        async def incr(t):
            v = await t.get(b"c")
            t.set(b"c", b"%d" % (int(v or b"0") + 1))

        await asyncio.gather(*[(a if i % 2 else b).transact(incr) for i in range(200)])
        assert await a.transact(lambda t: t.get(b"c")) == b"200"
        assert await b.transact(lambda t: t.get(b"c")) == b"200"


async def test_the_cache_comes_back_after_its_watch_dies(url):
    e = open_engine(url)
    try:
        await _live(e)
        await e.transact(lambda t: t.set(b"k", b"1"))
        e._watcher.cancel()
        await asyncio.sleep(0.05)
        assert not e._wm                                           # no cache: reads go to etcd
        assert await e.transact(lambda t: t.get(b"k")) == b"1"     # (and restart the watch)
        await _live(e)
        hits = e.cache_stats["hits"]
        assert await e.transact(lambda t: t.get(b"k")) == b"1"
        assert e.cache_stats["hits"] == hits + 1
    finally:
        await e.close()


async def test_a_prefix_too_big_to_load_still_caches_what_it_reads(url, monkeypatch):
    import flyfs.kv.etcd as etcd
    monkeypatch.setattr(etcd, "CACHE_COMPLETE", 3)
    w = open_engine(url + "?cache=0")
    await w.transact(lambda t: [t.set(b"p%d" % i, b"v") for i in range(5)])
    await w.close()
    e = open_engine(url)
    try:
        await _live(e)
        assert not e._complete
        counts = _count_calls(e)
        assert await e.transact(lambda t: t.get(b"p1")) == b"v"      # a miss: proof + read in one Txn
        assert await e.transact(lambda t: t.get(b"never")) is None  # absent is not assumed
        assert counts == {"Txn": 2}
        assert await e.transact(lambda t: t.get(b"p1")) == b"v"      # now a hit: the proof only
        assert await e.transact(lambda t: t.get(b"never")) is None
        assert counts == {"Txn": 4} and e.cache_stats["misses"] == 2
    finally:
        await e.close()


def test_cache_option_in_the_url(etcd_server):
    assert EtcdEngine.from_url(etcd_server.url("x")).cache is True
    assert EtcdEngine.from_url(etcd_server.url("x") + "?cache=0").cache is False
    with pytest.raises(KVError, match="cache must be 0 or 1"):
        EtcdEngine.from_url(etcd_server.url("x") + "?cache=maybe")


async def test_without_the_cache_no_watch_runs(etcd_server):
    e = open_engine(etcd_server.url("nocache") + "?cache=0")
    try:
        await e.transact(lambda t: t.set(b"k", b"1"))
        assert await e.transact(lambda t: t.get(b"k")) == b"1"
        assert e._watcher is None and e.cache_stats["hits"] == 0
    finally:
        await e.close()


async def test_transactions_wait_for_a_restarting_etcd(tmp_path):
    """etcd killed and back a second later: a transaction issued meanwhile waits for it
    (the call is sent once connected, so it applies once) instead of failing."""
    import time
    from flyfs.kv.etcd_server import EtcdServer
    srv = EtcdServer(str(tmp_path / "etcd")).start()
    e = open_engine(srv.url("r"))
    try:
        await _live(e)
        await e.transact(lambda t: t.set(b"k", b"1"))
        srv.proc.kill()
        srv.proc.wait()

        def restart():
            time.sleep(1.0)
            srv.start()
        back = asyncio.get_running_loop().run_in_executor(None, restart)

        async def incr(t):
            t.set(b"k", b"%d" % (int(await t.get(b"k")) + 1))
        await e.transact(incr)
        await back
        assert await e.transact(lambda t: t.get(b"k")) == b"2"
        await _live(e)                  # and the cache is back
    finally:
        await e.close()
        srv.stop()


async def test_transfers_between_two_caching_engines_keep_every_snapshot_consistent(url):
    """A bank on two engines (two metadata servers) with their caches: concurrent
    transfers between random accounts, and read-only audits of all accounts through
    either engine, one key at a time. Money is never created or lost, and every audit
    sees a total that was true at some instant (a stale cached read must not make an
    audit see half a transfer)."""
    import random
    a, b = open_engine(url), open_engine(url)
    n, start = 12, 100
    try:
        await a.transact(lambda t: [t.set(b"acct%02d" % i, b"%d" % start) for i in range(n)])
        await _live(a, b)
        rng = random.Random(7)

        async def transfer(engine, src, dst, amount):
            async def fn(t):
                s, d = int(await t.get(b"acct%02d" % src)), int(await t.get(b"acct%02d" % dst))
                t.set(b"acct%02d" % src, b"%d" % (s - amount))
                t.set(b"acct%02d" % dst, b"%d" % (d + amount))
            await engine.transact(fn)

        async def audit(engine):
            async def fn(t):
                total = 0
                for i in range(n):
                    total += int(await t.get(b"acct%02d" % i))
                    await asyncio.sleep(0)      # let transfers interleave between the reads
                return total
            return await engine.transact(fn)

        async def transfers(engine, k):
            for _ in range(k):
                src, dst = rng.sample(range(n), 2)
                await transfer(engine, src, dst, rng.randint(1, 9))

        async def audits(engine, k):
            return [await audit(engine) for _ in range(k)]

        results = await asyncio.gather(transfers(a, 60), transfers(b, 60), transfers(a, 60),
                                       audits(a, 30), audits(b, 30))
        totals = results[3] + results[4]
        assert set(totals) == {n * start}, sorted(set(totals))
        assert await audit(a) == await audit(b) == n * start
        assert a.cache_stats["hits"] > 0 and b.cache_stats["hits"] > 0
    finally:
        await a.close()
        await b.close()


async def test_ranges_from_the_complete_cache(url):
    """A short range is read from the complete cache (the proof is the only round trip);
    a long one, forward, reversed or limited, is read partly from the cache and the rest
    from etcd, and comes out the same as without the cache."""
    e, plain = open_engine(url), open_engine(url + "?cache=0")
    try:
        await _live(e)
        for j in range(0, 700, 100):
            await e.transact(lambda t, j=j: [t.set(b"s/%04d" % i, b"%d" % i) for i in range(j, j + 100)])
        await e.transact(lambda t: [t.set(b"q/%d" % i, b"x") for i in range(3)])
        await e.transact(lambda t: t.clear(b"q/1"))
        assert e._sorted is not None
        counts = _count_calls(e)

        async def short(t):
            return [k async for k, _ in t.get_range(b"q/", b"q0")]
        assert await e.transact(short) == [b"q/0", b"q/2"]
        assert counts == {"Txn": 1}

        for reverse in (False, True):
            for limit in (0, 5, 300):
                async def rng(t, reverse=reverse, limit=limit):
                    return [kv async for kv in t.get_range(b"s/", b"s0", limit=limit, reverse=reverse)]
                assert await e.transact(rng) == await plain.transact(rng), (reverse, limit)
    finally:
        await e.close()
        await plain.close()


async def test_a_listing_from_a_lagging_cache_never_shows_a_removed_or_misses_a_new_key(url):
    async with _two(url) as (a, b):
        await a.transact(lambda t: [t.set(b"d/%d" % i, b"v") for i in range(5)])
        await _live(b)
        for _ in range(100):
            if b._wm >= a._wm:
                break
            await asyncio.sleep(0.01)

        async def listing(t):
            return [k async for k, _ in t.get_range(b"d/", b"d0")]
        assert await b.transact(listing) == [b"d/%d" % i for i in range(5)]
        b._apply = lambda events: None                  # b's cache freezes here
        await a.transact(lambda t: t.clear(b"d/1"))
        assert await b.transact(listing) == [b"d/0", b"d/2", b"d/3", b"d/4"]
        await a.transact(lambda t: t.set(b"d/7", b"new"))
        assert await b.transact(listing) == [b"d/0", b"d/2", b"d/3", b"d/4", b"d/7"]

        async def count_into(t):           # read-write: the commit's compares catch it too
            n = len([k async for k, _ in t.get_range(b"d/", b"d0")])
            t.set(b"count", b"%d" % n)
        await b.transact(count_into)
        assert await a.transact(lambda t: t.get(b"count")) == b"5"
        assert b.cache_stats["stale"] >= 3
