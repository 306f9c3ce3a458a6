"""Chain layout: group storage targets into chains (pure, no I/O).

`plan_chains` takes the free targets (target id -> node id) and a replication
factor and returns chains as tuples of target ids, head first, such that:

- no two targets of a chain are on one node;
- as many chains as possible are built (greedy on the nodes with the most free
  targets left, which is optimal for this packing), and when some targets
  cannot be used, the ones left are on the nodes that had the most;
- load is spread: each node's targets are spread over chains with different
  partners (so a failed node's read traffic lands on many nodes, the aim of
  3FS's balanced chain tables), and each node is head, middle and tail about
  equally often (the head takes the writes).

The result is deterministic for a given input.
"""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Mapping

__all__ = ["LayoutError", "plan_chains", "max_chains"]


class LayoutError(ValueError):
    """The targets cannot form chains of the requested replication."""


def max_chains(nodes_free: Mapping[int, int], replication: int) -> int:
    """How many chains of `replication` distinct nodes the free counts allow."""
    total = sum(nodes_free.values())
    best = 0
    lo, hi = 0, total // replication if replication else 0
    # Feasible iff sum(min(count, k)) >= replication * k; monotone in k.
    while lo <= hi:
        k = (lo + hi) // 2
        if sum(min(c, k) for c in nodes_free.values()) >= replication * k:
            best, lo = k, k + 1
        else:
            hi = k - 1
    return best


def _completes(free: dict[int, int], partial: list[int], replication: int, left: int) -> bool:
    """Can `partial` be completed to a chain (with the most-free nodes) and still
    leave enough free targets for `left` more chains?"""
    rest = sorted((n for n in free if free[n] > 0 and n not in partial), key=lambda n: (-free[n], n))
    need = replication - len(partial)
    if len(rest) < need:
        return False
    after = dict(free)
    for n in partial + rest[:need]:
        after[n] -= 1
    return max_chains(after, replication) >= left


def _spread_pairs(members: list[list[int]], budget: int = 200_000) -> None:
    """Even out how often node pairs share a chain by swapping nodes between two
    chains (per-node counts unchanged); hill-climbs sum(pair count ** 2) within
    `budget` evaluations, in place."""
    pairs: Counter = Counter()
    for m in members:
        for i, a in enumerate(m):
            for b in m[i + 1:]:
                pairs[frozenset((a, b))] += 1

    def moves(x, y, a_rest, b_rest):
        # x leaves chain A for B, y leaves B for A.
        return ([(frozenset((x, a)), -1) for a in a_rest] + [(frozenset((y, a)), +1) for a in a_rest]
                + [(frozenset((y, b)), -1) for b in b_rest] + [(frozenset((x, b)), +1) for b in b_rest])

    evals = 0
    improved = True
    while improved and evals < budget:
        improved = False
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                a_chain, b_chain = members[i], members[j]
                done = False
                for x in a_chain:
                    if x in b_chain:
                        continue
                    for y in b_chain:
                        if y in a_chain:
                            continue
                        evals += 1
                        a_rest = [a for a in a_chain if a != x]
                        b_rest = [b for b in b_chain if b != y]
                        changed = Counter()
                        for k, d in moves(x, y, a_rest, b_rest):
                            changed[k] += d
                        delta = sum((pairs[k] + d) ** 2 - pairs[k] ** 2 for k, d in changed.items())
                        if delta < 0:
                            for k, d in changed.items():
                                pairs[k] += d
                            a_chain[a_chain.index(x)] = y
                            b_chain[b_chain.index(y)] = x
                            improved = done = True
                            break
                    if done or evals >= budget:
                        break
                if evals >= budget:
                    return


def _balance_positions(members: list[list[int]]) -> None:
    """Reorder chains (in place) so that each node is at every position (head,
    ..., tail) equally often, give or take one.

    Positions are colours of the edges of the bipartite chain-node graph; an
    equitable colouring always exists (de Werra). While some node holds
    position a at least twice more often than b, walk from it alternately
    along an a-edge (node -> chain) and that chain's b-edge (chain -> node)
    until stuck, and swap a and b in the chains walked: inner vertices keep
    their counts, the start node's gap shrinks by two, the end node's gap
    cannot grow past one. Each swap lowers sum(count ** 2), so it ends.
    """
    if not members:
        return
    r = len(members[0])
    count: Counter = Counter()  # (node, position) -> chains
    for chain in members:
        for p, n in enumerate(chain):
            count[(n, p)] += 1
    nodes = sorted({n for chain in members for n in chain})
    while True:
        found = None
        for v in nodes:
            for a, b in itertools.permutations(range(r), 2):
                if count[(v, a)] - count[(v, b)] >= 2:
                    found = (v, a, b)
                    break
            if found:
                break
        if found is None:
            return
        v, a, b = found
        walked, seen, cur = [], set(), v
        while True:
            nxt = next((i for i, chain in enumerate(members) if i not in seen and chain[a] == cur), None)
            if nxt is None:
                break
            seen.add(nxt)
            walked.append(nxt)
            cur = members[nxt][b]
        for i in walked:
            chain = members[i]
            count[(chain[a], a)] -= 1
            count[(chain[b], b)] -= 1
            chain[a], chain[b] = chain[b], chain[a]
            count[(chain[a], a)] += 1
            count[(chain[b], b)] += 1


def plan_chains(targets: Mapping[int, int], replication: int) -> list[tuple[int, ...]]:
    """Chains of `replication` targets each from `targets` (target id -> node id).

    Raises LayoutError when replication is not positive, there are no targets,
    or fewer distinct nodes than `replication`.
    """
    if not isinstance(replication, int) or replication < 1:
        raise LayoutError(f"replication factor must be a positive integer, got {replication!r}")
    if not targets:
        raise LayoutError("no free storage targets to build chains from")
    by_node: dict[int, list[int]] = defaultdict(list)
    for t, n in sorted(targets.items()):
        by_node[n].append(t)
    if len(by_node) < replication:
        raise LayoutError(
            f"replication factor {replication} needs free targets on at least {replication} "
            f"storage nodes, have {len(by_node)}")
    free = {n: len(ts) for n, ts in by_node.items()}
    count = max_chains(free, replication)

    pairs: Counter = Counter()  # how often two nodes already share a chain
    members: list[list[int]] = []
    for built in range(count):
        left = count - built - 1  # chains still to build after this one
        chosen: list[int] = []
        for _ in range(replication):
            # Prefer nodes that have shared few chains with those chosen, then
            # nodes with many free targets; take the first that keeps the
            # remaining chains buildable (the plain most-free choice always does).
            cands = sorted((n for n in free if free[n] > 0 and n not in chosen),
                           key=lambda n: (sum(pairs[frozenset((n, m))] for m in chosen), -free[n], n))
            pick = next(n for n in cands if _completes(free, chosen + [n], replication, left))
            chosen.append(pick)
        for n in chosen:
            free[n] -= 1
        for i, a in enumerate(chosen):
            for b in chosen[i + 1:]:
                pairs[frozenset((a, b))] += 1
        members.append(chosen)
    _spread_pairs(members)

    _balance_positions(members)
    next_target = {n: 0 for n in by_node}
    chains = []
    for ordered in members:
        tids = []
        for n in ordered:
            tids.append(by_node[n][next_target[n]])
            next_target[n] += 1
        chains.append(tuple(tids))
    return chains
