"""Pure CRAQ decisions (flyfs/storage/craq.py), without sockets or disks."""
import struct
from dataclasses import dataclass

import pytest

from flyfs.cluster.chain_state import Chain, LocalState, PublicState
from flyfs.proto import storage_pb2
from flyfs.storage import craq
from flyfs.storage.craq import ForwardAction as FA

S, L, Y, W, O = (PublicState.SERVING, PublicState.LASTSRV, PublicState.SYNCING,
                 PublicState.WAITING, PublicState.OFFLINE)


# --------------------------------------------------------------------------- chunk ids

def test_chunk_id_layout_and_order():
    cid = craq.chunk_id(0x0102030405060708, 0x0A0B0C0D)
    assert cid == bytes.fromhex("0102030405060708") + bytes.fromhex("0A0B0C0D")
    assert craq.parse_chunk_id(cid) == (0x0102030405060708, 0x0A0B0C0D)
    assert cid.startswith(craq.inode_prefix(0x0102030405060708))
    # Byte order = (inode, index) order, so the last chunk of an inode is a reverse seek.
    ids = [(i, j) for i in (1, 2, 255, 256, 2**64 - 1) for j in (0, 1, 255, 256, 2**32 - 1)]
    keys = [craq.chunk_id(i, j) for i, j in ids]
    assert sorted(keys) == keys
    assert len(set(keys)) == len(keys)
    with pytest.raises(ValueError):
        craq.chunk_id(-1, 0)
    with pytest.raises(ValueError):
        craq.chunk_id(1, 2**32)
    with pytest.raises(ValueError):
        craq.parse_chunk_id(b"short")


# --------------------------------------------------------------------------- roles

def test_roles_along_a_chain_with_a_syncing_tail():
    chain = Chain(7, 5, ((1, S), (2, S), (3, Y), (4, O)))
    r1, r2, r3, r4 = (craq.role_of(chain, t) for t in (1, 2, 3, 4))
    assert r1.is_head and r1.successor == 2 and r1.predecessor is None and r1.readable
    assert not r1.is_read_tail and r1.head == 1
    assert not r2.is_head and r2.successor == 3 and r2.predecessor == 1 and r2.is_read_tail
    assert r3.on_write_path and r3.successor is None and r3.predecessor == 2
    assert not r3.readable and not r3.is_head and r3.state is Y
    assert not r4.on_write_path and r4.successor is None and not r4.readable
    assert craq.role_of(chain, 99).state is None
    assert all(r.chain_version == 5 and r.chain_id == 7 for r in (r1, r2, r3, r4))


def test_roles_when_the_chain_takes_no_writes():
    chain = Chain(1, 9, ((1, L), (2, O), (3, W)))
    for t in (1, 2, 3):
        r = craq.role_of(chain, t)
        assert not r.is_head and not r.on_write_path and not r.readable and r.head is None


def test_chain_version_check():
    assert craq.check_chain_version(3, 3) is craq.ChainCheck.OK
    assert craq.check_chain_version(2, 3) is craq.ChainCheck.STALE
    assert craq.check_chain_version(4, 3) is craq.ChainCheck.BEHIND


# --------------------------------------------------------------------------- versions

def test_head_plan():
    assert craq.head_plan(0, 0, False) == craq.HeadPlan(False, 1, 0)
    assert craq.head_plan(4, 4, False) == craq.HeadPlan(False, 5, 4)
    # A stuck pending version is dropped and its number burned.
    assert craq.head_plan(4, 5, True) == craq.HeadPlan(True, 6, 4)
    assert craq.head_plan(0, 1, True) == craq.HeadPlan(True, 2, 0)


def fa(exists=True, commit=4, pending=False, cchain=2, utype="write", ver=5, uchain=2, base=4, full=False):
    return craq.forward_action(exists=exists, commit_ver=commit, has_pending=pending, commit_chain_ver=cchain,
                               update_type=utype, update_ver=ver, update_chain_ver=uchain, base_ver=base,
                               full=full)


@pytest.mark.parametrize("kw, expected", [
    ({}, FA.APPLY_DELTA),                                          # in step with the predecessor
    ({"exists": False, "commit": 0, "ver": 1, "base": 0}, FA.APPLY_DELTA),   # a new chunk
    ({"exists": False, "commit": 0, "ver": 3, "base": 0}, FA.APPLY_DELTA),   # new chunk, burned versions
    ({"exists": False, "commit": 0}, FA.NEED_FULL),                # missed the chunk's creation
    ({"commit": 3}, FA.NEED_FULL),                                 # missed an update
    ({"commit": 6, "cchain": 1}, FA.NEED_FULL),                    # ahead: a stale copy from an old life
    ({"pending": True}, FA.NEED_FULL),                             # a stuck pending version
    ({"commit": 5, "cchain": 2}, FA.DUPLICATE),                    # retried forward, already committed
    ({"commit": 5, "cchain": 1}, FA.NEED_FULL),                    # same number, other chain version
    ({"commit": 5, "pending": True}, FA.NEED_FULL),
    ({"commit": 3, "full": True}, FA.APPLY_FULL),
    ({"pending": True, "full": True}, FA.APPLY_FULL),
    ({"exists": False, "commit": 0, "full": True}, FA.APPLY_FULL),
    ({"utype": "remove"}, FA.REMOVE),
    ({"utype": "remove", "exists": False}, FA.REMOVE),
    ({"utype": "truncate"}, FA.APPLY_DELTA),
    ({"utype": "truncate", "commit": 2}, FA.NEED_FULL),
])
def test_forward_action(kw, expected):
    assert fa(**kw) is expected


def test_delta_replay_matches_full_content():
    """A successor applying deltas and one taking the full chunk end up identical."""
    import random
    rng = random.Random(5)
    content = bytearray()
    replica = bytearray()
    for _ in range(200):
        if rng.random() < 0.8:
            off = rng.randrange(0, 3000)
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
            craq.apply_delta(content, "write", off, len(data), data)
            craq.apply_delta(replica, "write", off, len(data), data)
        else:
            n = rng.randrange(0, 3500)
            craq.apply_delta(content, "truncate", 0, n)
            craq.apply_delta(replica, "truncate", 0, n)
        assert replica == content
    # Reference semantics, spelled out.
    b = bytearray(b"abc")
    assert craq.apply_delta(b, "write", 5, 2, b"xy") == bytearray(b"abc\0\0xy")
    assert craq.apply_delta(b, "truncate", 0, 2) == bytearray(b"ab")
    assert craq.apply_delta(b, "truncate", 0, 4) == bytearray(b"ab\0\0")
    with pytest.raises(ValueError):
        craq.apply_delta(b, "remove", 0, 0)


# --------------------------------------------------------------------------- dedup

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_dedup_table_lifecycle():
    clock = Clock()
    d = craq.DedupTable(capacity=3, ttl=10, clock=clock)
    assert d.begin(("c", 1), waiter="w1") is None
    hit = d.begin(("c", 1), waiter="other")
    assert hit.waiter == "w1" and hit.result is None          # in flight: wait for it
    d.finish(("c", 1), (7, 100))
    assert d.get(("c", 1)).result == (7, 100)
    assert d.begin(("c", 1)).result == (7, 100)               # a retry answers the first result
    # Failed updates are forgotten, so a retry runs again.
    assert d.begin(("c", 2)) is None
    d.fail(("c", 2))
    assert d.get(("c", 2)) is None
    # Capacity: the oldest finished entries go first.
    for s in (3, 4, 5):
        d.record(("c", s), (s, s))
    assert d.get(("c", 1)) is None and d.get(("c", 5)).result == (5, 5)
    # TTL.
    clock.t = 11
    assert d.get(("c", 5)) is None and len(d) == 0
    # Different clients never collide.
    d.record(("a", 1), (1, 1))
    assert d.get(("b", 1)) is None


# --------------------------------------------------------------------------- lease and local state

def test_lease_half_of_the_lease_from_the_send_time():
    clock = Clock()
    lease = craq.Lease(clock)
    assert not lease.valid()                     # no heartbeat yet: no writes
    clock.t = 99.2
    lease.renewed(sent_at=99.0, lease_ms=2000)   # valid until 99 + 2 / 2
    assert lease.valid() and lease.remaining() == pytest.approx(0.8)
    clock.t = 99.99
    assert lease.valid()
    clock.t = 100.01
    assert not lease.valid()
    # An older heartbeat answered late never shortens the lease.
    lease.renewed(sent_at=100.0, lease_ms=2000)
    lease.renewed(sent_at=98.0, lease_ms=2000)
    assert lease.valid() and lease.valid_until == pytest.approx(101.0)


def test_local_state():
    U, N = LocalState.UPTODATE, LocalState.ONLINE
    assert craq.local_state(S, None, 3) is U
    assert craq.local_state(Y, None, 3) is N
    assert craq.local_state(Y, 3, 3) is U
    assert craq.local_state(Y, 2, 3) is N        # synced at an older chain version: not yet
    for ps in (W, O, L, None):
        assert craq.local_state(ps, 3, 3) is N


# --------------------------------------------------------------------------- resync

@dataclass
class M:
    """An engine ChunkMeta stand-in."""
    chunk_id: bytes
    commit_ver: int
    chain_ver: int = 1
    length: int = 10
    crc: int = 0xAB
    has_pending: bool = False


def remote(cid, commit, chain=1, length=10, crc=0xAB, update=None):
    inode, index = craq.parse_chunk_id(cid)
    return cid, storage_pb2.ChunkMeta(chunk=storage_pb2.ChunkId(inode=inode, index=index),
                                      commit_version=commit, update_version=commit if update is None else update,
                                      chain_version=chain, length=length, crc32c=crc)


def test_sync_plan_merge():
    c = [craq.chunk_id(1, i) for i in range(10)]
    local = [M(c[0], 3), M(c[1], 2), M(c[2], 4, chain_ver=2), M(c[3], 1, crc=1), M(c[5], 1),
             M(c[6], 0, has_pending=True), M(c[7], 5, has_pending=True), M(c[9], 1)]
    rem = [remote(c[0], 3),                # same: nothing
           remote(c[1], 1),                # older commit: send
           remote(c[2], 4, chain=1),       # other chain version: send
           remote(c[3], 1, crc=2),         # other checksum: send
           remote(c[4], 1),                # not on the predecessor: remove
           # c[5] missing on the target: send
           remote(c[7], 5),                # predecessor has a pending version: send (decided under lock)
           remote(c[8], 2, update=3),      # not local: remove
           remote(c[9], 1, update=2)]      # pending on the target: send
    plan = list(craq.sync_plan(local, rem))
    assert plan == [(craq.SyncOp.SEND, c[1]), (craq.SyncOp.SEND, c[2]), (craq.SyncOp.SEND, c[3]),
                    (craq.SyncOp.REMOVE, c[4]), (craq.SyncOp.SEND, c[5]), (craq.SyncOp.SEND, c[6]),
                    (craq.SyncOp.SEND, c[7]), (craq.SyncOp.REMOVE, c[8]), (craq.SyncOp.SEND, c[9])]
    assert list(craq.sync_plan([], [])) == []
    assert list(craq.sync_plan(local[:1], [])) == [(craq.SyncOp.SEND, c[0])]
    assert list(craq.sync_plan([], rem[:2])) == [(craq.SyncOp.REMOVE, c[0]), (craq.SyncOp.REMOVE, c[1])]


def test_sync_plan_against_a_model():
    """Random listings: after applying the plan the target equals the predecessor."""
    import random
    rng = random.Random(11)
    for _ in range(200):
        ids = sorted(rng.sample(range(50), rng.randrange(0, 30)))
        local = {}
        for i in ids:
            local[craq.chunk_id(2, i)] = M(craq.chunk_id(2, i), rng.randrange(1, 4), rng.randrange(1, 3),
                                           rng.randrange(0, 3), rng.randrange(0, 2))
        target = {}
        for i in sorted(rng.sample(range(50), rng.randrange(0, 30))):
            cid = craq.chunk_id(2, i)
            if cid in local and rng.random() < 0.5:
                m = local[cid]
                target[cid] = remote(cid, m.commit_ver, m.chain_ver, m.length, m.crc)[1]
            else:
                target[cid] = remote(cid, rng.randrange(1, 4), rng.randrange(1, 3), rng.randrange(0, 3),
                                     rng.randrange(0, 2))[1]
        plan = list(craq.sync_plan([local[k] for k in sorted(local)], sorted(target.items())))
        sent = [cid for op, cid in plan if op is craq.SyncOp.SEND]
        for op, cid in plan:
            if op is craq.SyncOp.SEND:
                m = local[cid]
                target[cid] = remote(cid, m.commit_ver, m.chain_ver, m.length, m.crc)[1]
            else:
                del target[cid]
        assert sorted(target) == sorted(local)
        assert all(not craq.needs_sync(local[k], target[k]) for k in local)
        assert len(sent) == len(set(sent))


# --------------------------------------------------------------------------- reads

def test_slot_offsets_and_read_order():
    assert craq.slot_offsets([3, 0, 5, 1]) == [0, 3, 3, 8]
    assert craq.slot_offsets([]) == []
    # Spread by key, never an excluded replica, every candidate listed once.
    readers = (10, 20, 30)
    firsts = {craq.read_order(readers, k)[0] for k in range(6)}
    assert firsts == {10, 20, 30}
    for k in range(6):
        order = craq.read_order(readers, k, exclude={20})
        assert sorted(order) == [10, 30]
    assert craq.read_order(readers, 0, exclude=readers) == []
    assert craq.read_order((), 3) == []


def test_meta_to_proto():
    from flyfs.storage.chunk_engine import ChunkMeta
    m = ChunkMeta(chunk_id=craq.chunk_id(9, 4), commit_ver=3, update_ver=4, chain_ver=2, length=77, crc=5,
                  pending_length=80, pending_crc=6)
    p = craq.meta_to_proto(m)
    assert (p.chunk.inode, p.chunk.index, p.commit_version, p.update_version, p.chain_version, p.length,
            p.crc32c) == (9, 4, 3, 4, 2, 77, 5)
    assert struct.unpack(">QI", craq.chunk_id(p.chunk.inode, p.chunk.index)) == (9, 4)
