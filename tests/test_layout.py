"""Tests of the pure chain layout (flyfs.cluster.layout)."""
import functools
import itertools
import random
from collections import Counter

import pytest

from flyfs.cluster.layout import LayoutError, max_chains, plan_chains


def grid(nodes, per_node):
    """target id -> node id for `nodes` nodes with `per_node` targets each (or a list of counts)."""
    counts = per_node if isinstance(per_node, list) else [per_node] * nodes
    return {n * 100 + i: n for n in range(nodes) for i in range(counts[n])}


def brute_force_max(counts, r):
    """Most chains of r distinct nodes, by exhaustive search."""
    @functools.lru_cache(None)
    def best(cs):
        out = 0
        live = [i for i, c in enumerate(cs) if c > 0]
        for combo in itertools.combinations(live, r):
            nxt = list(cs)
            for i in combo:
                nxt[i] -= 1
            out = max(out, 1 + best(tuple(sorted(nxt))))
        return out
    return best(tuple(sorted(counts)))


def check_valid(targets, r, chains):
    used = [t for c in chains for t in c]
    assert len(used) == len(set(used)), "a target is in two chains"
    assert set(used) <= set(targets)
    for c in chains:
        assert len(c) == r
        assert len({targets[t] for t in c}) == r, f"two replicas of {c} on one node"


def test_three_nodes_two_targets_replication_three():
    t = grid(3, 2)
    chains = plan_chains(t, 3)
    check_valid(t, 3, chains)
    assert len(chains) == 2
    assert sorted(x for c in chains for x in c) == sorted(t)
    heads = [t[c[0]] for c in chains]
    assert len(set(heads)) == 2  # two chains, two different head nodes


@pytest.mark.parametrize("nodes,per_node,r", [
    (3, 1, 3), (3, 4, 3), (4, 3, 2), (5, 4, 3), (6, 5, 3), (7, 2, 3), (10, 8, 3), (8, 4, 3),
    (2, 3, 1), (4, 4, 4), (12, 6, 3), (9, 3, 2)])
def test_uniform_clusters_are_fully_used_and_balanced(nodes, per_node, r):
    t = grid(nodes, per_node)
    chains = plan_chains(t, r)
    check_valid(t, r, chains)
    assert len(chains) == nodes * per_node // r
    per_node_used = Counter(t[x] for c in chains for x in c)
    assert max(per_node_used.values()) - min(per_node_used.values()) <= 1
    # Each node is at each position (head, ..., tail) about equally often.
    for pos in range(r):
        at = Counter(t[c[pos]] for c in chains)
        counts = [at.get(n, 0) for n in range(nodes)]
        assert max(counts) - min(counts) <= 1, (pos, counts)


def test_pairs_are_spread_like_the_3fs_table():
    # 6 nodes x 5 targets, replication 3: 10 chains, 30 pair slots over 15 node
    # pairs; a balanced layout puts every pair together exactly twice, so a failed
    # node's reads spread over all the others.
    t = grid(6, 5)
    chains = plan_chains(t, 3)
    pairs = Counter(frozenset((t[a], t[b])) for c in chains for a, b in itertools.combinations(c, 2))
    assert len(pairs) == 15 and set(pairs.values()) == {2}


def test_pair_spread_is_never_worse_than_greedy_bound():
    t = grid(10, 8)
    chains = plan_chains(t, 3)
    pairs = Counter(frozenset((t[a], t[b])) for c in chains for a, b in itertools.combinations(c, 2))
    # 26 chains * 3 pairs = 78 over 45 pairs: ideal is 1 or 2 each.
    assert max(pairs.values()) <= 2 and len(pairs) == 45


def test_random_clusters_match_brute_force_optimum():
    rng = random.Random(1234)
    for _ in range(150):
        nodes = rng.randint(1, 5)
        counts = [rng.randint(0, 4) for _ in range(nodes)]
        r = rng.randint(1, 3)
        t = grid(nodes, counts)
        live_nodes = sum(1 for c in counts if c)
        if not t or live_nodes < r:
            with pytest.raises(LayoutError):
                plan_chains(t, r)
            continue
        chains = plan_chains(t, r)
        check_valid(t, r, chains)
        assert len(chains) == brute_force_max(counts, r) == max_chains(Counter(t.values()), r), (counts, r)


def test_uneven_nodes_leave_the_surplus_unused():
    t = grid(3, [10, 1, 1])
    chains = plan_chains(t, 2)
    check_valid(t, 2, chains)
    assert len(chains) == 2  # node 0 can pair only with nodes 1 and 2, once each


def test_deterministic_and_independent_of_input_order():
    t = grid(5, 4)
    items = list(t.items())
    random.Random(7).shuffle(items)
    assert plan_chains(t, 3) == plan_chains(dict(items), 3)


def test_replication_one():
    t = grid(2, 3)
    chains = plan_chains(t, 1)
    assert sorted(c[0] for c in chains) == sorted(t)


@pytest.mark.parametrize("targets,r,msg", [
    (grid(3, 2), 0, "positive integer"),
    (grid(3, 2), -1, "positive integer"),
    (grid(3, 2), 2.5, "positive integer"),
    ({}, 3, "no free storage targets"),
    (grid(2, 5), 3, "at least 3 storage nodes, have 2"),
])
def test_errors(targets, r, msg):
    with pytest.raises(LayoutError, match=msg):
        plan_chains(targets, r)
