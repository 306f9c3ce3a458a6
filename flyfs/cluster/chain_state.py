"""The chain/target state machine: a pure function, no I/O.

A chain is an ordered list of storage targets that replicate the same chunks
(CRAQ). Each target has a *public* state, decided here by mgmtd and published
in the routing info, and a *local* state, reported by its storage node in
heartbeats (a missed heartbeat counts as local OFFLINE). `next_chain` takes a
chain and the latest local states and returns the chain after one step.

Public states (what readers and writers of the chain may do):

    SERVING  alive, holds every acknowledged write; takes reads and writes
    LASTSRV  down, but was the last target serving; the chain's newest data is
             there, so the chain takes no writes until it (or a fully synced
             replica) serves again
    SYNCING  alive, being resynced from its predecessor; takes forwarded writes,
             no reads
    WAITING  alive, waiting for its turn to sync (or for a target to sync from)
    OFFLINE  down, or its medium failed

Local states: UPTODATE (serving, or resync finished), ONLINE (alive, data may
be stale), OFFLINE (down; also what a heartbeat timeout means).

Transition table. "alive" = local UPTODATE or ONLINE. "someone serves" = some
target of the chain is SERVING *after* this step (rows 1, 5, 9). The rows are
evaluated in that order: first who serves, then who is LASTSRV, then who syncs.

    #   public   local     condition                                       next
    1   SERVING  alive     -                                               SERVING
    2   SERVING  OFFLINE   someone serves                                  OFFLINE
    3   SERVING  OFFLINE   nobody serves; first such target in chain order LASTSRV
    4   SERVING  OFFLINE   nobody serves; not the first                    OFFLINE
    5   LASTSRV  alive     chain had no SERVING target; first LASTSRV      SERVING
    6   LASTSRV  alive     otherwise (a stale LASTSRV)                     WAITING
    7   LASTSRV  OFFLINE   nobody serves; chain had no SERVING; first one  LASTSRV
    8   LASTSRV  OFFLINE   otherwise                                       OFFLINE
    9   SYNCING  UPTODATE  - (resync finished)                             SERVING
    10  SYNCING  ONLINE    someone serves; first sync candidate            SYNCING
    11  SYNCING  ONLINE    otherwise                                       WAITING
    12  SYNCING  OFFLINE   -                                               OFFLINE
    13  WAITING  ONLINE    someone serves; first sync candidate            SYNCING
    14  WAITING  alive     otherwise                                       WAITING
    15  WAITING  OFFLINE   -                                               OFFLINE
    16  OFFLINE  alive     -                                               WAITING
    17  OFFLINE  OFFLINE   -                                               OFFLINE

Sync candidates (rows 10, 13) are the SYNCING and WAITING targets reporting
ONLINE, in chain order; since SYNCING sorts before WAITING, a sync in progress
keeps its place and at most one target of a chain syncs at a time.

Decisions (and where they differ from 3FS's generateNewChain):

- A returning target always passes through WAITING (row 16) before SYNCING,
  so it has seen its chain's new version before it is asked to take writes.
- A WAITING target reporting UPTODATE stays WAITING (row 14): the claim
  cannot be from a sync it has not started, and promoting it could let a stale
  UPTODATE turn it SERVING without a resync. Storage reports ONLINE for a
  target until its resync finishes.
- When several SERVING targets go down in one step, only the first in chain
  order becomes LASTSRV (every SERVING target held every acknowledged write,
  so any one will do; picking one keeps "who may serve next" unambiguous).
- A LASTSRV next to a SERVING target (impossible from reachable states) is
  stale: the SERVING target served more recently, so the LASTSRV must resync.

After every step the chain is ordered SERVING, LASTSRV, SYNCING, WAITING,
OFFLINE, stable within a class, and the version is bumped exactly when the
ordered list of (target, public state) changed.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

__all__ = ["PublicState", "LocalState", "Chain", "next_chain", "head", "tail", "writable",
           "readable_targets", "write_targets", "successor", "state_of", "ALIVE"]


class PublicState(enum.IntEnum):
    """Target state published in routing info (values match mgmtd.proto)."""

    SERVING = 1
    LASTSRV = 2
    SYNCING = 3
    WAITING = 4
    OFFLINE = 5


class LocalState(enum.IntEnum):
    """Target state reported by its storage node (values match mgmtd.proto)."""

    UPTODATE = 1
    ONLINE = 2
    OFFLINE = 3


ALIVE = frozenset({LocalState.UPTODATE, LocalState.ONLINE})

# Chain order after every change; IntEnum values already sort this way, but
# say it explicitly so renumbering the proto cannot silently reorder chains.
_RANK = {PublicState.SERVING: 0, PublicState.LASTSRV: 1, PublicState.SYNCING: 2,
         PublicState.WAITING: 3, PublicState.OFFLINE: 4}


@dataclass(frozen=True)
class Chain:
    """A chain: id, version (bumped on every change) and ordered (target_id, state)."""

    chain_id: int
    version: int
    targets: tuple[tuple[int, PublicState], ...]

    def __post_init__(self):
        targets = tuple((int(t), PublicState(s)) for t, s in self.targets)
        ids = [t for t, _ in targets]
        if len(set(ids)) != len(ids):
            raise ValueError(f"chain {self.chain_id} lists a target twice: {ids}")
        if self.version < 0:
            raise ValueError(f"chain {self.chain_id} has a negative version {self.version}")
        object.__setattr__(self, "targets", targets)

    @classmethod
    def new(cls, chain_id: int, target_ids: Iterable[int], version: int = 1) -> "Chain":
        """A fresh chain whose targets all serve (empty targets are trivially in sync)."""
        return cls(chain_id, version, tuple((t, PublicState.SERVING) for t in target_ids))

    @property
    def target_ids(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.targets)

    def states(self) -> dict[int, PublicState]:
        return dict(self.targets)


def next_chain(chain: Chain, local_states: Mapping[int, LocalState]) -> Chain:
    """Apply one step of the transition table (module docstring) to `chain`.

    `local_states` maps target id to its latest local state; a target of the
    chain missing from it counts as OFFLINE, targets of other chains are
    ignored. Returns `chain` itself when nothing changes.
    """
    old = chain.targets
    local = [LocalState(local_states.get(t, LocalState.OFFLINE)) for t, _ in old]
    alive = [ls in ALIVE for ls in local]
    new: list[PublicState | None] = [None] * len(old)
    had_serving = any(ps is PublicState.SERVING for _, ps in old)
    first_lastsrv = next((i for i, (_, ps) in enumerate(old) if ps is PublicState.LASTSRV), None)

    # Who serves after this step (rows 1, 5, 9).
    for i, (_, ps) in enumerate(old):
        if ps is PublicState.SERVING and alive[i]:
            new[i] = PublicState.SERVING
        elif ps is PublicState.SYNCING and local[i] is LocalState.UPTODATE:
            new[i] = PublicState.SERVING
        elif ps is PublicState.LASTSRV and alive[i] and not had_serving and i == first_lastsrv:
            new[i] = PublicState.SERVING
    someone_serves = PublicState.SERVING in new

    # Who holds the newest data while nobody serves (rows 3, 7).
    if not someone_serves:
        if had_serving:
            keeper = next(i for i, (_, ps) in enumerate(old) if ps is PublicState.SERVING)
        else:
            keeper = first_lastsrv  # dead, else row 5 would have made it SERVING
        if keeper is not None:
            new[keeper] = PublicState.LASTSRV

    # Who syncs (rows 10, 13): the first ONLINE SYNCING/WAITING target, in chain order.
    syncing_taken = not someone_serves
    for i, (_, ps) in enumerate(old):
        if new[i] is not None:
            continue
        if ps in (PublicState.SYNCING, PublicState.WAITING) and local[i] is LocalState.ONLINE \
                and not syncing_taken:
            new[i] = PublicState.SYNCING
            syncing_taken = True
        else:
            # Everything left: alive -> WAITING (rows 6, 11, 14, 16), down -> OFFLINE.
            new[i] = PublicState.WAITING if alive[i] else PublicState.OFFLINE

    order = sorted(range(len(old)), key=lambda i: (_RANK[new[i]], i))
    targets = tuple((old[i][0], new[i]) for i in order)
    if targets == old:
        return chain
    return replace(chain, version=chain.version + 1, targets=targets)


def state_of(chain: Chain, target_id: int) -> PublicState:
    """Public state of `target_id` in `chain`; ValueError if it is not there."""
    for t, ps in chain.targets:
        if t == target_id:
            return ps
    raise ValueError(f"target {target_id} is not in chain {chain.chain_id}")


def writable(chain: Chain) -> bool:
    """True when the chain takes writes (some target is SERVING)."""
    return any(ps is PublicState.SERVING for _, ps in chain.targets)


def readable_targets(chain: Chain) -> tuple[int, ...]:
    """Targets that may answer reads: the SERVING ones, head first."""
    return tuple(t for t, ps in chain.targets if ps is PublicState.SERVING)


def write_targets(chain: Chain) -> tuple[int, ...]:
    """The write path, head to tail: SERVING targets then the SYNCING one; () if not writable."""
    if not writable(chain):
        return ()
    return tuple(t for t, ps in chain.targets if ps in (PublicState.SERVING, PublicState.SYNCING))


def head(chain: Chain) -> int | None:
    """The target clients write to (first SERVING), or None if the chain takes no writes."""
    path = write_targets(chain)
    return path[0] if path else None


def tail(chain: Chain) -> int | None:
    """The last target of the write path (it commits first; SYNCING if one syncs), or None."""
    path = write_targets(chain)
    return path[-1] if path else None


def successor(chain: Chain, target_id: int) -> int | None:
    """Where `target_id` forwards writes: the next target of the write path, or None
    if it is the tail or not on the write path. ValueError if not in the chain."""
    state_of(chain, target_id)
    path = write_targets(chain)
    if target_id not in path:
        return None
    i = path.index(target_id)
    return path[i + 1] if i + 1 < len(path) else None
