"""Exhaustive tests of the pure chain/target state machine (flyfs.cluster.chain_state)."""
import itertools

import pytest

from flyfs.cluster.chain_state import (Chain, LocalState, PublicState, head, next_chain,
                                       readable_targets, state_of, successor, tail, writable,
                                       write_targets)

S, L, Y, W, O = (PublicState.SERVING, PublicState.LASTSRV, PublicState.SYNCING,
                 PublicState.WAITING, PublicState.OFFLINE)
UP, ON, OFF = LocalState.UPTODATE, LocalState.ONLINE, LocalState.OFFLINE
ORDER = [S, L, Y, W, O]
LENGTHS = (1, 2, 3)


def chain(*states, version=7, ids=None):
    ids = ids or [101 + i for i in range(len(states))]
    return Chain(chain_id=9, version=version, targets=tuple(zip(ids, states)))


def all_inputs(n):
    """Every chain of n targets (every public-state assignment, every order of
    target ids) paired with every local-state assignment."""
    ids = [101 + i for i in range(n)]
    for perm in itertools.permutations(ids):
        for states in itertools.product(ORDER, repeat=n):
            c = Chain(9, 7, tuple(zip(perm, states)))
            for locs in itertools.product([UP, ON, OFF], repeat=n):
                yield c, dict(zip(perm, locs))


# ---- structural invariants over every input ----------------------------------------------------

@pytest.mark.parametrize("n", LENGTHS)
def test_invariants_over_every_input(n):
    count = 0
    for old, locs in all_inputs(n):
        new = next_chain(old, locs)
        count += 1
        states = [ps for _, ps in new.targets]
        # Same targets, same chain.
        assert new.chain_id == old.chain_id
        assert sorted(new.target_ids) == sorted(old.target_ids)
        # Order: SERVING, LASTSRV, SYNCING, WAITING, OFFLINE ...
        assert states == sorted(states, key=ORDER.index), (old, locs, new)
        # ... stable within a class.
        for cls in ORDER:
            before = [t for t in old.target_ids if new.states()[t] is cls]
            after = [t for t, ps in new.targets if ps is cls]
            assert after == before, (old, locs, new)
        # Version bumps iff the chain changed, by exactly one.
        changed = new.targets != old.targets
        assert new.version == old.version + (1 if changed else 0)
        if not changed:
            assert new is old
        # At most one SYNCING / LASTSRV; LASTSRV and SERVING never together;
        # a SYNCING target always has a SERVING target to sync from.
        assert states.count(Y) <= 1, (old, locs, new)
        assert states.count(L) <= 1, (old, locs, new)
        assert not (L in states and S in states), (old, locs, new)
        if Y in states:
            assert S in states
        # Per-target transitions allowed by the table.
        old_states = old.states()
        had_serving = S in old_states.values()
        for t, ps in new.targets:
            was, loc = old_states[t], locs[t]
            if loc is OFF:
                assert ps in (L, O), (t, was, loc, ps)
            else:
                assert ps in (S, Y, W), (t, was, loc, ps)
            if ps is S:
                # Only a serving target, the last one to serve, or a finished resync serves.
                assert (was is S) or (was is L and not had_serving) or (was is Y and loc is UP), \
                    (t, was, loc, old, new)
            if ps is L:
                assert was in (S, L)
                assert was is S or not had_serving
            if ps is Y:
                assert was in (Y, W) and loc is ON
    assert count == 5 ** n * 3 ** n * len(list(itertools.permutations(range(n))))


def test_missing_local_state_means_offline():
    c = chain(S, S, S)
    assert next_chain(c, {101: ON, 102: ON}) == next_chain(c, {101: ON, 102: ON, 103: OFF})
    # Local states of other chains' targets are ignored.
    assert next_chain(c, {101: ON, 102: ON, 103: ON, 999: OFF}) is c


def test_bad_input():
    with pytest.raises(ValueError, match="twice"):
        Chain(1, 1, ((1, S), (1, S)))
    with pytest.raises(ValueError):
        Chain(1, 1, ((1, 99),))
    with pytest.raises(ValueError, match="negative"):
        Chain(1, -1, ((1, S),))
    with pytest.raises(ValueError):
        next_chain(chain(S), {101: 42})


# ---- the transition table, row by row -----------------------------------------------------------

ROWS = [
    # (row, old states, local states, expected (id, state) in order)
    (1, [S, S], [UP, ON], [(101, S), (102, S)]),
    (2, [S, S], [ON, OFF], [(101, S), (102, O)]),
    (3, [S, S], [OFF, OFF], [(101, L), (102, O)]),
    (4, [S, S, S], [OFF, OFF, OFF], [(101, L), (102, O), (103, O)]),
    (5, [L, O], [ON, OFF], [(101, S), (102, O)]),
    (5, [L, O], [UP, OFF], [(101, S), (102, O)]),
    (6, [S, L], [ON, ON], [(101, S), (102, W)]),
    (7, [L, O], [OFF, ON], [(101, L), (102, W)]),
    (8, [S, L], [ON, OFF], [(101, S), (102, O)]),
    (9, [S, Y], [ON, UP], [(101, S), (102, S)]),
    (9, [S, Y], [OFF, UP], [(102, S), (101, O)]),
    (10, [S, Y, W], [ON, ON, ON], [(101, S), (102, Y), (103, W)]),
    (11, [S, Y], [OFF, ON], [(101, L), (102, W)]),
    (12, [S, Y], [ON, OFF], [(101, S), (102, O)]),
    (13, [S, W], [ON, ON], [(101, S), (102, Y)]),
    (14, [S, W], [ON, UP], [(101, S), (102, W)]),
    (14, [L, W], [OFF, ON], [(101, L), (102, W)]),
    (15, [S, W], [ON, OFF], [(101, S), (102, O)]),
    (16, [S, O], [ON, ON], [(101, S), (102, W)]),
    (16, [S, O], [ON, UP], [(101, S), (102, W)]),
    (17, [S, O], [ON, OFF], [(101, S), (102, O)]),
]


@pytest.mark.parametrize("row,old,locs,expected", ROWS, ids=[f"row{r[0]}-{i}" for i, r in enumerate(ROWS)])
def test_table_row(row, old, locs, expected):
    c = chain(*old)
    new = next_chain(c, dict(zip(c.target_ids, locs)))
    assert list(new.targets) == expected
    assert new.version == c.version + (1 if new.targets != c.targets else 0)


def test_sync_in_progress_keeps_its_place():
    # The SYNCING target keeps syncing; the WAITING one behind it waits.
    c = chain(S, Y, W)
    assert next_chain(c, {101: ON, 102: ON, 103: ON}) is c
    # When the syncing one finishes, the waiting one starts next step.
    c2 = next_chain(c, {101: ON, 102: UP, 103: ON})
    assert c2.targets == ((101, S), (102, S), (103, Y))


def test_only_one_waiting_target_starts_syncing():
    c = chain(S, W, W)
    new = next_chain(c, {101: ON, 102: ON, 103: ON})
    assert new.targets == ((101, S), (102, Y), (103, W))


def test_a_second_syncing_target_in_a_bad_input_is_demoted():
    c = chain(S, Y, Y)
    new = next_chain(c, {101: ON, 102: ON, 103: ON})
    assert new.targets == ((101, S), (102, Y), (103, W))


# ---- reachable states: no data loss, liveness ------------------------------------------------------

def _step_model(old, fresh, locs):
    """One step of the chain plus the worst case for data: a write lands after
    every step the chain is writable. `fresh` = targets holding every
    acknowledged write. A target whose resync finished holds everything its
    source (a fresh SERVING target) had."""
    new = next_chain(old, locs)
    old_states = old.states()
    fresh = set(fresh)
    source_fresh = any(old_states[t] is S and t in fresh for t in old_states)
    for t, ps in new.targets:
        if ps is S and old_states[t] is Y:
            assert locs[t] is UP
            assert source_fresh, (old, locs, new)  # synced from someone who had everything
            fresh.add(t)
    if writable(new):
        fresh &= set(write_targets(new))
    return new, frozenset(fresh)


def reachable(n):
    """Every (chain, fresh set) reachable from a new chain of n targets under any
    sequence of local-state reports, with the transitions that led there."""
    start = (Chain.new(1, range(101, 101 + n)), frozenset(range(101, 101 + n)))
    seen = {start}
    frontier = [start]
    edges = []
    while frontier:
        nxt = []
        for c, fresh in frontier:
            for locs in itertools.product([UP, ON, OFF], repeat=n):
                loc_map = dict(zip(c.target_ids, locs))
                new, nf = _step_model(c, fresh, loc_map)
                edges.append((c, loc_map, new))
                # Versions grow without bound; compare states without them.
                key = (Chain(1, 0, new.targets), nf)
                if key not in seen:
                    seen.add(key)
                    nxt.append((new, nf))
        frontier = nxt
    return seen, edges


@pytest.mark.parametrize("n", LENGTHS)
def test_no_data_loss_in_reachable_states(n):
    states, edges = reachable(n)
    assert len(states) > n  # the exploration really went somewhere
    for c, fresh in states:
        st = [ps for _, ps in c.targets]
        # Someone always holds the newest data, and it is the one that may serve.
        assert fresh, c
        assert S in st or L in st, c
        assert set(readable_targets(c)) <= fresh, (c, fresh)
        lastsrv = [t for t, ps in c.targets if ps is L]
        assert set(lastsrv) <= fresh, (c, fresh)
        # CRAQ write path: head is SERVING, tail is the syncing target if any.
        if writable(c):
            assert state_of(c, head(c)) is S
            assert state_of(c, tail(c)) in (S, Y)
    for old, locs, new in edges:
        olds = old.states()
        for t, ps in new.targets:
            # A WAITING/OFFLINE target never serves without first syncing.
            if olds[t] in (W, O):
                assert ps is not S, (old, locs, new)
            if olds[t] is Y and ps is S:
                assert locs[t] is UP


@pytest.mark.parametrize("n", LENGTHS)
def test_reachable_states_recover_when_the_keeper_returns(n):
    """From every reachable state: once every target is up again (and syncing
    targets finish), the chain returns to all SERVING in a bounded number of steps."""
    states, _ = reachable(n)
    for c, _fresh in states:
        cur = c
        for _ in range(3 * n + 2):
            cur = next_chain(cur, {t: (UP if ps is Y else ON) for t, ps in cur.targets})
        assert [ps for _, ps in cur.targets] == [S] * n, (c, cur)


@pytest.mark.parametrize("n", LENGTHS)
def test_fixed_reports_reach_a_fixpoint(n):
    states, _ = reachable(n)
    for c, _fresh in states:
        for locs in itertools.product([UP, ON, OFF], repeat=n):
            loc_map = dict(zip(c.target_ids, locs))
            cur = c
            for _ in range(n + 2):
                cur = next_chain(cur, loc_map)
            assert next_chain(cur, loc_map) is cur, (c, loc_map)


def test_without_the_keeper_the_chain_stays_unwritable():
    # Everyone but the LASTSRV target comes back: nobody may serve.
    c = chain(L, O, O)
    for _ in range(5):
        c = next_chain(c, {101: OFF, 102: ON, 103: UP})
    assert c.targets == ((101, L), (102, W), (103, W))
    assert not writable(c) and head(c) is None and readable_targets(c) == ()


# ---- helpers ---------------------------------------------------------------------------------------

def test_helpers():
    c = chain(S, S, Y, W, O)
    assert writable(c)
    assert head(c) == 101 and tail(c) == 103
    assert readable_targets(c) == (101, 102)
    assert write_targets(c) == (101, 102, 103)
    assert successor(c, 101) == 102 and successor(c, 102) == 103 and successor(c, 103) is None
    assert successor(c, 104) is None and successor(c, 105) is None
    with pytest.raises(ValueError, match="not in chain"):
        successor(c, 999)
    c2 = chain(L, W, O)
    assert not writable(c2) and head(c2) is None and tail(c2) is None
    assert readable_targets(c2) == () and successor(c2, 101) is None
    c3 = chain(S)
    assert head(c3) == tail(c3) == 101 and successor(c3, 101) is None


# ---- named scenarios --------------------------------------------------------------------------------

class Sim:
    """Drive one chain A, B, C through heartbeats like mgmtd does."""

    def __init__(self, n=3):
        self.c = Chain.new(1, range(1, n + 1))
        self.local = {t: UP for t in self.c.target_ids}

    def down(self, *ts):
        for t in ts:
            self.local[t] = OFF
        return self.step()

    def up(self, *ts):
        for t in ts:
            self.local[t] = ON
        return self.step()

    def synced(self, t):
        assert state_of(self.c, t) is Y
        self.local[t] = UP
        return self.step()

    def step(self):
        before = self.c
        self.c = next_chain(self.c, self.local)
        assert self.c.version == before.version + (self.c.targets != before.targets)
        return self.c

    def settle(self):
        """Run steps until nothing changes, finishing each resync as it starts."""
        for _ in range(20):
            before = self.c
            for t, ps in self.c.targets:
                if ps is Y:
                    self.local[t] = UP
            self.step()
            if self.c is before:
                return self.c
        raise AssertionError(f"chain does not settle: {self.c}")

    @property
    def order(self):
        return [(t, ps.name) for t, ps in self.c.targets]


def test_tail_dies_and_returns():
    s = Sim()
    v0 = s.c.version
    s.down(3)
    assert s.order == [(1, "SERVING"), (2, "SERVING"), (3, "OFFLINE")]
    assert s.c.version == v0 + 1 and tail(s.c) == 2 and successor(s.c, 2) is None
    s.up(3)
    assert s.order[-1] == (3, "WAITING") and tail(s.c) == 2
    s.step()
    assert s.order[-1] == (3, "SYNCING") and tail(s.c) == 3 and successor(s.c, 2) == 3
    assert readable_targets(s.c) == (1, 2)  # a syncing target answers no reads
    s.synced(3)
    assert s.order == [(1, "SERVING"), (2, "SERVING"), (3, "SERVING")]
    assert s.c.version == v0 + 4


def test_middle_dies_and_returns_at_the_tail():
    s = Sim()
    s.down(2)
    assert s.order == [(1, "SERVING"), (3, "SERVING"), (2, "OFFLINE")]
    assert successor(s.c, 1) == 3
    s.up(2)
    s.step()
    s.synced(2)
    assert s.order == [(1, "SERVING"), (3, "SERVING"), (2, "SERVING")]


def test_head_dies():
    s = Sim()
    s.down(1)
    assert head(s.c) == 2 and s.order == [(2, "SERVING"), (3, "SERVING"), (1, "OFFLINE")]
    s.up(1)
    assert s.settle().target_ids == (2, 3, 1)
    assert [ps for _, ps in s.c.targets] == [S, S, S]


def test_two_die_together_and_resync_one_at_a_time():
    s = Sim()
    s.down(1, 3)
    assert s.order == [(2, "SERVING"), (1, "OFFLINE"), (3, "OFFLINE")]
    s.up(1, 3)
    assert s.order == [(2, "SERVING"), (1, "WAITING"), (3, "WAITING")]
    s.step()
    assert s.order == [(2, "SERVING"), (1, "SYNCING"), (3, "WAITING")]
    s.synced(1)
    assert s.order == [(2, "SERVING"), (1, "SERVING"), (3, "SYNCING")]
    s.synced(3)
    assert s.order == [(2, "SERVING"), (1, "SERVING"), (3, "SERVING")]


def test_all_die_one_by_one_last_one_back_first():
    s = Sim()
    s.down(3)
    s.down(1)
    s.down(2)  # the last one serving keeps the newest data
    assert s.order == [(2, "LASTSRV"), (1, "OFFLINE"), (3, "OFFLINE")]
    assert not writable(s.c)
    s.up(2)
    assert s.order == [(2, "SERVING"), (1, "OFFLINE"), (3, "OFFLINE")]
    s.up(1, 3)
    s.settle()
    assert [ps for _, ps in s.c.targets] == [S, S, S] and head(s.c) == 2


def test_all_die_one_by_one_others_back_first():
    s = Sim()
    s.down(1)
    s.down(2)
    s.down(3)
    # Stable within a class: 2 was ahead of 1 in the chain before this change.
    assert s.order == [(3, "LASTSRV"), (2, "OFFLINE"), (1, "OFFLINE")]
    s.up(1, 2)
    s.settle()
    # Targets with stale data may not serve; they wait for the keeper.
    assert s.order == [(3, "LASTSRV"), (2, "WAITING"), (1, "WAITING")]
    assert not writable(s.c)
    s.up(3)
    assert s.order == [(3, "SERVING"), (2, "SYNCING"), (1, "WAITING")]
    s.settle()
    assert s.order == [(3, "SERVING"), (2, "SERVING"), (1, "SERVING")]


def test_all_die_at_once_and_come_back_in_reverse_order():
    s = Sim()
    s.down(1, 2, 3)
    assert s.order == [(1, "LASTSRV"), (2, "OFFLINE"), (3, "OFFLINE")]
    s.up(3)
    s.up(2)
    # The first one back is first in line to sync.
    assert s.order == [(1, "LASTSRV"), (3, "WAITING"), (2, "WAITING")]
    s.up(1)
    assert s.order == [(1, "SERVING"), (3, "SYNCING"), (2, "WAITING")]
    s.settle()
    assert s.order == [(1, "SERVING"), (3, "SERVING"), (2, "SERVING")]


def test_keeper_flaps_while_others_sync():
    s = Sim()
    s.down(2, 3)
    s.up(2, 3)
    s.step()
    assert s.order == [(1, "SERVING"), (2, "SYNCING"), (3, "WAITING")]
    s.down(1)  # the only source dies mid-sync: the syncing target must not serve
    assert s.order == [(1, "LASTSRV"), (2, "WAITING"), (3, "WAITING")]
    s.up(1)
    s.settle()
    assert s.order == [(1, "SERVING"), (2, "SERVING"), (3, "SERVING")]


def test_sync_finishes_as_the_source_dies():
    s = Sim(2)
    s.down(2)
    s.up(2)
    s.step()
    assert s.order == [(1, "SERVING"), (2, "SYNCING")]
    s.local[1] = OFF
    s.local[2] = UP
    s.step()
    # The resync completed, so target 2 holds everything: it serves, 1 need not be LASTSRV.
    assert s.order == [(2, "SERVING"), (1, "OFFLINE")]


def test_single_target_chain():
    s = Sim(1)
    s.down(1)
    assert s.order == [(1, "LASTSRV")]
    s.up(1)
    assert s.order == [(1, "SERVING")]
