"""Shared-memory payloads between processes on one host (flyfs/net/shm.py): large
request payloads travel as references into the sender's arena, a forwarding
server passes the same reference on, bad references are refused one request at
a time, and slices of failed requests are held back."""
import asyncio
import hashlib
import os
import struct

import pytest

from flyfs import net
from flyfs.net import shm
from flyfs.net.frame import FLAG_ERROR, FLAG_SHM, HEADER, pack_header

pytestmark = pytest.mark.skipif(not shm.enabled() or shm.local_arena() is None,
                                reason="no usable /dev/shm here (missing or too small for an arena)")

HASH, FORWARD, FAIL = 1, 2, 3


class Recorder:
    """Handler: hashes the payload and records where it lives; FORWARD sends it on."""

    def __init__(self, next_address: str | None = None):
        self.seen: list = []
        self.next = next_address
        self.pool = net.ConnectionPool()

    async def __call__(self, req):
        self.seen.append(shm.locate(req.payload))
        if req.method == FORWARD and self.next:
            rep = await self.pool.call(self.next, HASH, b"", [req.payload])
            return net.Response(rep.header)
        if req.method == FAIL:
            raise ValueError("refused")
        return net.Response(hashlib.sha256(req.payload).digest())


async def test_large_payloads_travel_by_reference():
    rec = Recorder()
    async with await net.serve(rec) as server, net.ConnectionPool() as pool:
        big = os.urandom(3 << 20)
        small = os.urandom(1000)
        for data in (big, small, big):
            rep = await pool.call(server.address, HASH, b"", [data])
            assert rep.header == hashlib.sha256(data).digest()
    arena = shm.local_arena()
    assert rec.seen[0] is not None and rec.seen[0][0] == arena.name
    assert rec.seen[1] is None                      # small: through the socket
    assert rec.seen[2] == rec.seen[0]               # the slice was freed and reused
    await rec.pool.close()


async def test_a_forwarded_payload_keeps_its_reference():
    last = Recorder()
    async with await net.serve(last) as b:
        first = Recorder(b.address)
        async with await net.serve(first) as a, net.ConnectionPool() as pool:
            data = os.urandom(1 << 20)
            rep = await pool.call(a.address, FORWARD, b"", [memoryview(data)])
            assert rep.header == hashlib.sha256(data).digest()
        await first.pool.close()
    assert first.seen[0] is not None and last.seen[0] == first.seen[0]


async def test_turned_off_payloads_go_through_the_socket(monkeypatch):
    monkeypatch.setenv("FLYFS_SHM", "0")
    rec = Recorder()
    async with await net.serve(rec) as server, net.ConnectionPool() as pool:
        data = os.urandom(1 << 20)
        assert (await pool.call(server.address, HASH, b"", [data])).header == hashlib.sha256(data).digest()
    assert rec.seen == [None]


async def test_bad_references_are_refused_and_the_connection_survives():
    rec = Recorder()
    arena = shm.local_arena()
    async with await net.serve(rec) as server:
        _, host, port = net.parse_address(server.address)
        reader, writer = await asyncio.open_connection(host, port)

        async def ask(rid, flags, payload, method=HASH, header=b""):
            writer.write(pack_header(flags, method, rid, len(header), len(payload)) + header + payload)
            raw = await reader.readexactly(HEADER.size)
            _, _, rflags, _, rrid, hlen, plen = HEADER.unpack(raw)
            body = await reader.readexactly(hlen + plen)
            assert rrid == rid
            return rflags, body[:hlen]

        bad = [
            shm.pack_ref("not-an-arena", 0, 10),                        # not a flyfs arena name
            shm.pack_ref("flyfs-shm-1-000000000000", 0, 10),            # no such arena
            shm.pack_ref(arena.name, arena.size - 10, 100),             # outside the arena
            struct.pack("<QQH", 0, 10, 40) + b"short",                  # malformed
        ]
        for i, ref in enumerate(bad, 1):
            flags, text = await ask(i, FLAG_SHM, ref)
            assert flags & FLAG_ERROR, text
        flags, text = await ask(50, 0, b"", method=shm.SHM_HELLO, header=b"../../etc/passwd")
        assert flags & FLAG_ERROR and b"not a flyfs" in text
        flags, digest = await ask(99, 0, b"still fine")
        assert not flags & FLAG_ERROR and digest == hashlib.sha256(b"still fine").digest()
        writer.close()
        await writer.wait_closed()
    assert rec.seen == [None]                      # only the last request reached the handler


async def test_the_slice_of_a_failed_request_is_held_back():
    rec = Recorder()
    arena = shm.local_arena()
    async with await net.serve(rec) as server, net.ConnectionPool() as pool:
        data = os.urandom(1 << 20)
        await pool.call(server.address, HASH, b"", [data])
        free_before = sum(len(v) for v in arena._free.values())
        with pytest.raises(net.RemoteError, match="refused"):
            await pool.call(server.address, FAIL, b"", [data])
        assert sum(len(v) for v in arena._free.values()) == free_before - 1   # taken, not returned
        await pool.call(server.address, HASH, b"", [data])
        assert rec.seen[2] != rec.seen[1]           # a different slice
    await rec.pool.close()


async def test_replies_land_in_the_callers_slice():
    """A request with an `into` buffer offers an arena slice for the reply: the handler's
    payload is placed there (or built there: no copy) and the caller gets it in `into`."""
    BLOB, BUILD = 10, 11
    offered = []

    async def handler(req):
        n = int(req.header)
        offered.append(None if req.reply_buffer is None else len(req.reply_buffer))
        if req.method == BUILD and req.reply_buffer is not None:
            req.reply_buffer[:n] = bytes([7]) * n          # built in place
            return net.Response(b"built", [req.reply_buffer[:n]])
        return net.Response(b"blob", [bytes([n % 251]) * n])

    async with await net.serve(handler) as server, net.ConnectionPool() as pool:
        into = bytearray(1 << 20)
        rep = await pool.call(server.address, BLOB, b"300000", into=into)
        assert rep.payload_len == 300000 and bytes(rep.payload) == bytes([300000 % 251]) * 300000
        rep = await pool.call(server.address, BUILD, b"500000", into=[memoryview(into)[:100], into])
        assert rep.payload_len == 500000 and rep.header == b"built"
        assert [len(v) for v in rep.payload] == [100, 499900] and into[:499900] == bytes([7]) * 499900
        small = bytearray(1000)
        rep = await pool.call(server.address, BLOB, b"1000", into=small)
        assert bytes(small) == bytes([1000 % 251]) * 1000
        with pytest.raises(net.ProtocolError):
            await pool.call(server.address, BLOB, str(2 << 20).encode(), into=into)
    assert offered == [1 << 20, 100 + (1 << 20), None, 1 << 20]


def test_no_arena_when_dev_shm_is_nearly_full(monkeypatch):
    """A small or full /dev/shm (Docker gives 64 MiB) gets no arena: payloads then go
    through the socket instead of risking SIGBUS on a tmpfs that ran out."""
    class Tiny:
        f_bavail, f_frsize = 1000, 4096
    monkeypatch.setattr(shm.os, "statvfs", lambda path: Tiny)
    with pytest.raises(OSError, match="free in"):
        shm.Arena()


def test_arenas_of_another_user_are_refused(monkeypatch):
    """A process maps only arenas owned by its own user (a daemon running as root is never
    talked into another user's memory); the hello fails and the socket carries the bytes."""
    arena = shm.local_arena()
    real_uid = os.getuid()
    mapped = shm._maps.pop(arena.name)              # as if this process had not mapped it
    try:
        monkeypatch.setattr(shm.os, "getuid", lambda: real_uid + 1)
        with pytest.raises(shm.ShmError, match="belongs to uid"):
            shm.map_arena(arena.name)
        assert arena.name not in shm._maps
    finally:
        shm._maps[arena.name] = mapped
