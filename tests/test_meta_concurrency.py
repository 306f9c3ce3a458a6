"""Concurrency: a hot directory, racing renames and directory moves, two servers on one namespace."""
import asyncio
import errno
import os
import random
import stat
import time

import pytest

from flyfs.kv import open_engine
from flyfs.metaserver import RENAME_EXCHANGE, RENAME_NOREPLACE, Caller
from meta_fixtures import ROOT, ROOT_INO, make_service, names

CLIENTS = 8


def interleave(engine):
    """Make the memory engine yield before every read, so concurrent transactions really
    interleave (its reads never suspend otherwise; rocksdb and etcd suspend on their own)."""
    get = engine._get

    async def yielding_get(*args, **kw):
        await asyncio.sleep(0)
        return await get(*args, **kw)

    engine._get = yielding_get
    return engine


def client(i: int) -> Caller:
    return Caller(1000 + i, (1000 + i, 50), f"client-{i}")


async def hot_directory(services, per_client: int) -> tuple[float, int]:
    """CLIENTS clients (spread over `services`) create `per_client` files each in one directory."""
    svc0 = services[0]
    d = await svc0.mkdir(ROOT, ROOT_INO, "hot", 0o777)

    async def run(i):
        svc = services[i % len(services)]
        who = client(i)
        for j in range(per_client):
            f, session = await svc.create(who, d.ino, f"c{i}-{j:05d}", 0o644, os.O_WRONLY | os.O_EXCL)
            await svc.close(who, f.ino, session, length=0)
        return i

    t0 = time.monotonic()
    assert sorted(await asyncio.gather(*[run(i) for i in range(CLIENTS)])) == list(range(CLIENTS))
    elapsed = time.monotonic() - t0
    listing = [e async for e in svc0.readdir_all(ROOT, d.ino, page=1000)]
    assert len(listing) == CLIENTS * per_client
    assert len({e.name for e in listing}) == len(listing) and len({e.ino for e in listing}) == len(listing)
    assert [e.name for e in listing] == sorted(f"c{i}-{j:05d}".encode()
                                               for i in range(CLIENTS) for j in range(per_client))
    assert (await svc0.getattr(ROOT, d.ino)).mtime >= d.mtime
    return elapsed, d.ino


@pytest.mark.parametrize("engine_url", ["memory", "rocksdb", "etcd"], indirect=True)
async def test_hot_directory_8x500(engine):
    svc = make_service(engine)
    await svc.format()
    c0 = engine.stats.conflicts
    elapsed, _ = await hot_directory([svc], 500)
    # Creates in one directory do not conflict with each other by design (blind MT stamp).
    assert engine.stats.conflicts - c0 == 0 and engine.stats.failed == 0
    print(f"\n8x500 creates+closes in one directory: {elapsed:.2f} s")


@pytest.mark.parametrize("engine_url", ["etcd"], indirect=True)
async def test_hot_directory_two_servers_etcd(engine_url):
    engines = [open_engine(engine_url), open_engine(engine_url)]
    try:
        services = [make_service(e) for e in engines]
        await services[0].format()
        await services[1].format()
        elapsed, d = await hot_directory(services, 100)
        assert sorted(await names(services[1], ROOT, d)) == sorted(await names(services[0], ROOT, d))
    finally:
        for e in engines:
            await e.close()


async def test_concurrent_renames_never_lose_or_duplicate(engine):
    svc = make_service(interleave(engine))
    await svc.format(root_mode=0o777)
    n_dirs, n_files = 4, 24
    dirs = [(await svc.mkdir(ROOT, ROOT_INO, f"d{i}", 0o777)).ino for i in range(n_dirs)]
    files = set()
    for i in range(n_files):
        files.add((await svc.mknod(ROOT, dirs[i % n_dirs], f"f{i}", stat.S_IFREG | 0o644)).ino)
    rounds = 25 if "etcd" in type(engine).__name__.lower() else 60
    outcomes = {"ok": 0, "expected": 0}

    async def worker(w):
        rng = random.Random(w)
        who = client(w)
        for _ in range(rounds):
            src = rng.choice(dirs)
            listing, _ = await svc.readdir(who, src)
            if not listing:
                continue
            name = rng.choice(listing).name
            dst = rng.choice(dirs)
            try:
                if rng.random() < 0.3:
                    other, _ = await svc.readdir(who, dst)
                    if not other:
                        continue
                    await svc.rename(who, src, name, dst, rng.choice(other).name, RENAME_EXCHANGE)
                else:
                    await svc.rename(who, src, name, dst, f"f{rng.randrange(3 * n_files)}", RENAME_NOREPLACE)
                outcomes["ok"] += 1
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.EEXIST), e  # lost races, never anything else
                outcomes["expected"] += 1

    await asyncio.gather(*[worker(w) for w in range(CLIENTS)])
    print(f"\nrenames: {outcomes}, conflicts retried: {engine.stats.conflicts}")
    seen = []
    for d in dirs:
        seen += [e.ino async for e in svc.readdir_all(ROOT, d)]
    assert sorted(seen) == sorted(files), "an entry was lost or duplicated"
    for ino in files:
        assert (await svc.getattr(ROOT, ino)).nlink == 1
    assert outcomes["ok"] > rounds
    assert await svc.gc_queue() == []


async def test_concurrent_directory_moves_never_make_loops(engine):
    svc = make_service(interleave(engine))
    await svc.format(root_mode=0o777)
    n = 6
    inos = [(await svc.mkdir(ROOT, ROOT_INO, f"d{i}", 0o777)).ino for i in range(n)]
    rounds = 12 if "etcd" in type(engine).__name__.lower() else 40
    moved = 0

    async def worker(w):
        nonlocal moved
        rng = random.Random(100 + w)
        for _ in range(rounds):
            x, y = rng.sample(range(n), 2)
            target = rng.choice([inos[y], ROOT_INO])
            try:
                parent = (await svc.getattr(ROOT, inos[x])).parent
                await svc.rename(ROOT, parent, f"d{x}", target, f"d{x}")
                moved += 1
            except OSError as e:
                assert e.errno in (errno.EINVAL, errno.ENOENT), e

    await asyncio.gather(*[worker(w) for w in range(CLIENTS)])
    print(f"\ndirectory moves: {moved}, conflicts retried: {engine.stats.conflicts}")
    assert moved > 0
    # Every directory hangs off the root through a finite chain of parents ...
    for ino in inos:
        cur, steps = ino, 0
        while cur != ROOT_INO:
            cur = (await svc.getattr(ROOT, cur)).parent
            steps += 1
            assert steps <= n, "a directory cycle"
    # ... the tree reached from the root holds each exactly once, with the right link counts.
    found = []

    async def walk(d):
        subdirs = [e async for e in svc.readdir_all(ROOT, d) if e.type == stat.S_IFDIR]
        assert (await svc.getattr(ROOT, d)).nlink == 2 + len(subdirs)
        for e in subdirs:
            assert (await svc.getattr(ROOT, e.ino)).parent == d
            found.append(e.ino)
            await walk(e.ino)

    await walk(ROOT_INO)
    assert sorted(found) == sorted(inos)


@pytest.mark.parametrize("engine_url", ["memory", "etcd"], indirect=True)
async def test_two_servers_share_one_namespace(engine_url):
    """Two MetaService instances (two servers) on one namespace, serving the same tree at once."""
    engines = [open_engine(engine_url), open_engine(engine_url)]
    try:
        s1, s2 = [make_service(e) for e in engines]
        assert [await s1.format(root_mode=0o777), await s2.format(root_mode=0o777)] == [True, False]
        a = await s1.mkdir(ROOT, ROOT_INO, "a", 0o777)
        b = await s2.mkdir(ROOT, ROOT_INO, "b", 0o777)
        per = 15
        removed = set()

        async def worker(w):
            svc = (s1, s2)[w % 2]
            who = client(w)
            mine = []
            for j in range(per):
                f = await svc.mknod(who, a.ino, f"w{w}-{j}", stat.S_IFREG | 0o644)
                mine.append(f)
            for j, f in enumerate(mine):
                other = (s2, s1)[w % 2]  # act on what the other server created through this one
                if j % 3 == 0:
                    await other.rename(who, a.ino, f"w{w}-{j}", b.ino, f"w{w}-{j}")
                elif j % 3 == 1:
                    await other.unlink(who.with_uuid(os.urandom(16)), a.ino, f"w{w}-{j}")
                    removed.add(f.ino)
            return [f.ino for f in mine]

        created = sum(await asyncio.gather(*[worker(w) for w in range(CLIENTS)]), [])
        assert len(set(created)) == len(created) == CLIENTS * per  # ids never handed out twice
        for d in (a.ino, b.ino):
            l1 = [(e.name, e.ino) async for e in s1.readdir_all(ROOT, d)]
            l2 = [(e.name, e.ino) async for e in s2.readdir_all(ROOT, d)]
            assert l1 == l2
        in_a = {e.ino async for e in s1.readdir_all(ROOT, a.ino)}
        in_b = {e.ino async for e in s1.readdir_all(ROOT, b.ino)}
        assert len(in_b) == CLIENTS * len(range(0, per, 3))
        assert in_a | in_b | removed == set(created) and not (in_a | in_b) & removed
        assert sorted(await s2.gc_queue()) == sorted(removed)
        r1, r2 = await asyncio.gather(s1.run_gc_once(), s2.run_gc_once())
        assert r1.inodes + r2.inodes == len(removed)
        assert await s1.gc_queue() == []
    finally:
        for e in engines:
            await e.close()


async def test_crossing_directory_moves_cannot_form_a_cycle(engine):
    """/a/x/z and /b/yp/y: moving x into y while yp moves into z would close a cycle
    x -> y -> yp -> z -> x that neither move sees alone (they read and write disjoint
    inodes); one must fail with EINVAL."""
    svc = make_service(interleave(engine))
    await svc.format(root_mode=0o777)
    for rep in range(3):
        a = await svc.mkdir(ROOT, ROOT_INO, f"a{rep}")
        b = await svc.mkdir(ROOT, ROOT_INO, f"b{rep}")
        x = await svc.mkdir(ROOT, a.ino, "x")
        z = await svc.mkdir(ROOT, x.ino, "z")
        yp = await svc.mkdir(ROOT, b.ino, "yp")
        y = await svc.mkdir(ROOT, yp.ino, "y")
        results = await asyncio.gather(svc.rename(ROOT, a.ino, "x", y.ino, "x"),
                                       svc.rename(ROOT, b.ino, "yp", z.ino, "yp"),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and errors[0].errno == errno.EINVAL, results
        for ino in (x.ino, z.ino, yp.ino, y.ino):
            cur, steps = ino, 0
            while cur != ROOT_INO:
                cur = (await svc.getattr(ROOT, cur)).parent
                steps += 1
                assert steps <= 6, "a directory cycle"
