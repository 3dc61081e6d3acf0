"""Scheduling strategies of the controlled scheduler (``ipc.sched``): who runs next at each step.

A strategy's ``pick(enabled, step, last, locs)`` chooses among the enabled clients; ``locs`` tells,
per client, the shared location it is about to touch and how (``loc << 2 | kind``, ipc/sched/
points.py). :class:`Replay` is driven by ``Scheduler.run`` from a recorded list of (client, point)
choices.

Partial-order reduction (POS-style, Yuan et al., CAV 2018, with PCT's priorities on top):

- a :class:`Footprint`, kept across the schedules of one exploration, knows which clients read and
  wrote each location so far, and, from each step on, the access every enabled client is about
  to make (a parked client's pending write makes the running client's read there racy at once);
- a *decision* is a step at which the client that ran last could go on (it is enabled) and another
  could run instead (two or more are enabled), and its next access races with an access another
  live client may still make (one of them writes the location the other touches; "What the others
  may still touch" below; a point that is not an access -- a lock, an RCU domain, an op, a named
  preemption point -- always races). At every other step where it could
  go on, it goes on (``run_ahead``: the scheduler need not even be asked, ipc/sched). PCT's change
  points are drawn over decisions only: a step that touches what nobody else touches, a step
  nobody else can take, and a blocked retry (its client is not enabled after it) never consume
  one, and ``k`` is the number of decisions of a schedule;
- a :class:`History` (a prefix tree of the schedules run, by the hash of their choice prefixes)
  tells, before a schedule runs, whether the strategy would repeat one already run: the strategy is
  simulated over the recorded states (enabled clients, locations) until it leaves the tree (new) or
  reaches the end of a recorded schedule (a duplicate: skipped, counted).

What the others may still touch. A client's *phase* is the number of op points (the ``op ...``
point that begins each op of its program, lab/schedrun.py ``op_locations``) it has passed in the
schedule; ops run in program order, so a phase is the same place in every schedule. After each
schedule, ``Footprint.learn`` records, for each step, under (client, phase, the point it was at),
every location that client read or wrote from that step to its end (``after``: bit sets). A client
``j`` parked at point X in phase p *may still* write (read) a location when one of the schedules
that reached (j, p, X) saw it write (read) it from there on; at a (j, p, X) no schedule has reached
yet, when it wrote (read) it in phase p or later in any schedule (the last phase per location and
client); a client that ended its program (its slot's kind is ``K_DONE``) touches nothing more.

Why no ordering of two conflicting accesses is lost (relative to what the footprint learnt): take
accesses a (client i) and b (client j) to one location, one a write, with a just before i's next
step in the schedule run, and b later. At a's step, j has not yet made b, so b lies in j's
remaining program from the point it is parked at: if that path was learnt, b's location is in
(j, p, X)'s ``after`` (or, only while no schedule has reached (j, p, X), in what j touched in
phase p or later), so a is a decision and PCT may run j first (and j's
steps up to b, each of them a decision of its own where it races). If j may *not* still touch
the location, every access of j that conflicts with a was made before a: their order is fixed
whatever runs now, and running j first only reorders a with steps independent of it -- the same
interleaving up to commuting independent steps (Mazurkiewicz trace). The same argument, per other
client, holds for three or more. The run-ahead keeps the same rule: the scheduler writes the
running client's bitmaps at each grant (``Footprint.bitmap``: a superset of ``racy`` for every
step of that run-ahead, as the others are parked and their phases and points do not change).

What this does not see (the limits of the reduction and of PCT's bound):

- the remaining footprint is learnt: a path of another client from its present (phase, point)
  that no schedule has taken yet is not known to touch what it will touch (once a schedule reached
  that (phase, point), what it saw from there alone decides: a data-dependent branch not taken yet
  is invisible): the step
  that races with it runs ahead (as a location met for the first time does, below); each schedule
  run adds what it saw;

- only accesses through ``SharedPoints`` (ipc/sched/points.py) are in the footprint: guest memory,
  ``gfn_track`` and the ``_smem`` probes of vm/avic/guest.py bypass it, so they never make a step
  racing; a race between two such accesses is found only where a point that is no access (a lock,
  a named preemption point) happens to lie between them;
- the sampling checker is no client and not in the footprint: it runs only at hand-offs, so a
  transient state that lives inside one run-ahead is never sampled;
- a replay (and shrink, which replays) hands out every step and so checks between every two:
  it may report a checker finding the explore run that found the schedule never saw;
- PCT's printed bound (1/(n*k^(d-1)) per schedule, lab/explore.py's ``bound_scope``) holds only
  for bugs whose conflicting accesses are wrapped shared words where the other vCPU's access was
  already seen after its present (phase, point): the first schedules that meet one unlearnt run
  ahead past it;
- the argument is for ``sc``: under the memory model tso a parked client's buffered store becomes
  visible at its next point, which its learnt suffix does not show, so under tso the reduction
  falls back to "touched by any other client in any schedule so far" (``Footprint.phased``).
"""

from __future__ import annotations

import random

import numpy as np

from ipc.sched.points import K_DONE, K_LOAD, K_NONE, K_STORE, RACY_T, RACY_W, RACY_WORDS, racy_pos

STRATEGIES = ("pct", "random")


class Footprint:
    """Per location, the bit masks of the clients that read / wrote it (over every schedule so
    far), and, per client, the last *phase* in which it read / wrote it: a client's phase is the
    number of op points (``ops``: the locations of the points that begin each op of its program,
    lab/schedrun.py) it has passed in the schedule, so ``last >= phase`` means "it may still touch
    the location" (module doc, "What the others may still touch"). An :meth:`overlay` learns on top
    of it without changing it (a simulation)."""

    def __init__(self, base: Footprint | None = None, ops=(), phased: bool = True):
        # phased False (the memory model tso): "may still touch" is "touched at all, by any other
        # client" (the module doc's last limit): a buffered store of a parked client is written at
        # its next point, so what it may still write is not only what it does from that point on
        self.phased: bool = base.phased if base is not None else phased
        self.r: dict[int, int] = {}
        self.w: dict[int, int] = {}
        self.last_r: dict[int, dict[int, int]] = {}  # loc -> {client: the last phase it read loc in}
        self.last_w: dict[int, dict[int, int]] = {}  # loc -> {client: the last phase it wrote loc in}
        self.base = base
        self.ops: frozenset[int] = base.ops if base is not None else frozenset(ops)
        self.version: dict[int, int] = {}  # per client: bumped when its last phases grow (bitmap cache)
        self._bits: dict[tuple, tuple] = {}
        # (client, phase, pending point's code) -> (read, written) bit sets (by ``index``) of the
        # locations it touched from that point to its end, over the schedules that reached it
        # (:meth:`learn`); shared with the overlays, learnt on the root only
        self.after: dict[tuple[int, int, int], tuple[int, int]] = base.after if base is not None else {}
        self.index: dict[int, int] = base.index if base is not None else {}

    def masks(self, loc: int) -> tuple[int, int]:
        r, w = self.r.get(loc, 0), self.w.get(loc, 0)
        if self.base is not None:
            br, bw = self.base.masks(loc)
            r, w = r | br, w | bw
        return r, w

    def last(self, loc: int, j: int, write: bool) -> int:
        """The last phase in which client ``j`` wrote (``write``) / read ``loc``; -1: never."""
        got = (self.last_w if write else self.last_r).get(loc)
        p = -1 if got is None else got.get(j, -1)
        return p if self.base is None else max(p, self.base.last(loc, j, write))

    def add(self, code: int, i: int, phase: int = 0) -> None:
        loc, kind = code >> 2, code & 3
        d = self.r if kind == K_LOAD else self.w
        d[loc] = d.get(loc, 0) | 1 << i
        if kind in (K_LOAD, K_STORE):
            per = (self.last_r if kind == K_LOAD else self.last_w).setdefault(loc, {})
            if per.get(i, -1) < phase:
                per[i] = phase
                self.version[i] = self.version.get(i, 0) + 1

    def racy(self, code: int, i: int, phase=None, live=None, locs=None) -> bool:
        """Does client ``i``'s access ``code`` race with an access of another client? A point that
        is no access (a lock, RCU, an op, a named preemption point of ipc/fuzz.py: put where a
        preemption matters, often before an access the accessors do not see, such as guest memory
        or the write-track counts) always does. Without ``phase``: with any access seen so far;
        with ``phase`` (each client's phase now), ``live`` (whether it has not ended) and ``locs``
        (the point each is at): with one a live other client may still make (:meth:`may_touch`)."""
        kind = code & 3
        if kind == K_NONE:
            return True
        loc = code >> 2
        if phase is None or not self.phased:
            r, w = self.masks(loc)
            return bool((w if kind == K_LOAD else r | w) & ~(1 << i))
        return any(j != i and (live is None or live[j]) and self.may_touch(j, p, locs, loc, kind != K_LOAD)
                   for j, p in enumerate(phase))

    def may_touch(self, j: int, p: int, locs, loc: int, any_access: bool) -> bool:
        """May client ``j`` (in phase ``p``, at the point ``locs[j]``) still write ``loc`` (or
        read it, ``any_access``)? By what it did after this very point in the schedules that
        reached it (:meth:`learn`); at a point no schedule has reached yet, by every location it
        touched in phase ``p`` or later (each ``last`` phase)."""
        got = self.after.get((j, p, locs[j])) if locs is not None else None
        if got is None:
            return self.last(loc, j, True) >= p or (any_access and self.last(loc, j, False) >= p)
        b = self.index.get(loc)
        return b is not None and bool((got[1] | (got[0] if any_access else 0)) >> b & 1)

    def learn(self, trail, choices) -> None:
        """After a schedule (its ``trail`` of states and ``choices``, ``_Recording``): for each
        step, what its client touched from there to its end goes into ``after`` under the step's
        (client, phase, point)."""
        phase: dict[int, int] = {}
        steps = []
        for node, c in zip(trail or (), choices, strict=True):
            if node[1] is None:
                return
            code, p = node[1][c], phase.get(c, 0)
            steps.append((c, (c, p, code), code))
            if code & 3 == K_NONE and code >> 2 in self.ops:
                phase[c] = p + 1
        cur: dict[int, tuple[int, int]] = {}
        after, index = self.after, self.index
        for c, key, code in reversed(steps):
            r, w = cur.get(c, (0, 0))
            kind = code & 3
            if kind in (K_LOAD, K_STORE):
                b = index.setdefault(code >> 2, len(index))
                r, w = (r | 1 << b, w) if kind == K_LOAD else (r, w | 1 << b)
                cur[c] = (r, w)
            old = after.get(key)
            if old is None or old[0] | r != old[0] or old[1] | w != old[1]:
                after[key] = (r, w) if old is None else (old[0] | r, old[1] | w)

    def bitmap(self, i: int, phase, live, locs=None) -> np.ndarray:
        """Client ``i``'s run-ahead bitmaps (ipc/sched's ``racy`` planes, by ``points.racy_pos``):
        plane RACY_W the locations a live other client may still write, plane RACY_T those it may
        still read or write (from its phase on) -- a superset of what :meth:`racy` says for
        ``i`` in that state (a hash may put two locations on one bit: a run-ahead stops early)."""
        out = np.zeros((2, RACY_WORDS), dtype=np.int64)
        if not self.phased:  # every location another client ever touched (``racy``'s masks)
            for j in range(len(phase)):
                if j != i:
                    out |= self._suffix_bits(j, 0)
            return out
        for j, p in enumerate(phase):
            if j != i and (live is None or live[j]):
                got = self.after.get((j, p, locs[j])) if locs is not None else None
                out |= self._suffix_bits(j, p) if got is None else self._after_bits((j, p, locs[j]), got)
        return out

    def _after_bits(self, key, got: tuple[int, int]) -> np.ndarray:
        cached = self._bits.get(key)
        if cached is not None and cached[0] == got:
            return cached[1]
        if not hasattr(self, "_locs_by_index") or len(self._locs_by_index) != len(self.index):
            self._locs_by_index = sorted(self.index, key=self.index.__getitem__)
        bits = np.zeros((2, RACY_WORDS), dtype=np.int64)
        for planes, mask in (((RACY_W, RACY_T), got[1]), ((RACY_T,), got[0])):
            b = 0
            while mask:
                if mask & 1:
                    w, bit = racy_pos(self._locs_by_index[b])
                    for plane in planes:
                        bits[plane, w] |= bit
                mask >>= 1
                b += 1
        self._bits[key] = (got, bits)
        return bits

    def _suffix_bits(self, j: int, p: int) -> np.ndarray:
        v = self.version.get(j, 0)
        got = self._bits.get((j, p))
        if got is not None and got[0] == v:
            return got[1]
        bits = np.zeros((2, RACY_WORDS), dtype=np.int64)
        for planes, table in (((RACY_W, RACY_T), self.last_w), ((RACY_T,), self.last_r)):
            for loc, per in table.items():
                if per.get(j, -1) >= p:
                    w, bit = racy_pos(loc)
                    for plane in planes:
                        bits[plane, w] |= bit
        self._bits[(j, p)] = (v, bits)
        return bits

    def overlay(self) -> Footprint:
        return Footprint(self)

    def __len__(self) -> int:
        return len(self.r.keys() | self.w.keys())


class _Recording:
    """What every generating strategy shares: the decisions counted, the footprint learnt, and
    (for :class:`History`) the states and choices of the schedule it drove."""

    def _setup(self, footprint: Footprint | None, record: bool = True) -> None:
        self.fp = footprint
        self.decisions = 0  # decisions (see the module doc) so far in this schedule
        self.trail: list[tuple[tuple[int, ...], tuple[int, ...] | None]] | None = [] if record else None
        self.choices: list[int] = []
        self.turns = 0  # steps chosen by pick (handed out as a turn); the others ran ahead
        self.phase: list[int] = []  # per client: the op points it passed in this schedule (Footprint)
        self.live: list[bool] | None = None  # per client: not ended, as the last state shown said
        self._locs: tuple[int, ...] | None = None  # the points the clients were at in that state

    @property
    def run_ahead(self) -> bool:
        """The client that ran last may go on without a turn at steps that are no decision (ipc/
        sched): only with a footprint (without one every step with two clients enabled is one)."""
        return self.fp is not None

    def _goes_on(self, enabled: list[int], last: int, locs: tuple[int, ...] | None) -> bool | None:
        """None: ``last`` cannot go on (blocked, ended, the first step): the strategy chooses; True:
        a decision (module doc); False: ``last`` goes on (no other client could run, or none races
        with its access: running another first would be the same interleaving up to commuting
        independent steps)."""
        self._learn(enabled, locs)
        if last < 0 or last not in enabled:
            return None
        if len(enabled) < 2:
            return False
        return self.fp is None or locs is None or self.fp.racy(locs[last], last, self.phase, self.live, locs)

    def _learn(self, enabled, locs: tuple[int, ...] | None) -> None:
        """Every enabled client's pending access goes into the footprint before the step is
        decided: the running client's next access races with what a parked one is about to do
        even on a path the footprint has not learnt."""
        if self.fp is not None and locs is not None:
            self._grow(locs)
            self.live = [c & 3 != K_DONE for c in locs]
            self._locs = locs
            for j in enabled:
                if locs[j] & 3 != K_NONE:
                    self.fp.add(locs[j], j, self.phase[j])

    def ran(self, i: int, enabled: tuple[int, ...], locs: tuple[int, ...], approx: bool = False) -> None:
        """Client ``i`` took a run-ahead step (ipc/sched) in the state (``enabled``, ``locs``): it
        went on, counted as a decision if it was one (never a change point: ``decision_grant``).
        ``approx``: ``enabled`` is the grant-time guess and may miss an idle client woken meanwhile
        (by a kick): the :class:`History` node is marked so, and never proves a repeat."""
        d = self._goes_on(list(enabled), i, locs)
        if d:
            self.decisions += 1
            if self.decisions in getattr(self, "change", ()):
                raise AssertionError(f"a run-ahead step passed change point {self.decisions}")
        self._chose(enabled, locs, i, approx)

    def pick(self, enabled: list[int], step: int, last: int, locs: tuple[int, ...] | None = None) -> int:
        """The next client: ``last`` goes on where the step is no choice (``_goes_on`` False);
        otherwise the strategy's ``_choice``, after ``_decided`` at a decision."""
        self.turns += 1
        d = self._goes_on(enabled, last, locs)
        if d is False:
            return self._chose(enabled, locs, last)
        if d:
            self.decisions += 1
            self._decided(last)
        return self._chose(enabled, locs, self._choice(enabled))

    def _decided(self, last: int) -> None:
        """Decision number ``self.decisions`` was just reached with ``last`` running (PCT: a change point?)."""

    def _choice(self, enabled: list[int]) -> int:
        raise NotImplementedError

    def decision_grant(self, i: int, enabled: list[int]) -> int:
        """How many decisions client ``i`` may pass in its run-ahead (the strategy would let it go
        on at each): none for a random choice."""
        return 0

    def _chose(self, enabled, locs, i: int, approx: bool = False) -> int:
        if self.trail is not None:
            self.trail.append((tuple(enabled), locs, True) if approx else (tuple(enabled), locs))
            self.choices.append(i)
        if self.fp is not None and locs is not None:
            self._grow(locs)
            if locs[i] & 3 == K_NONE and locs[i] >> 2 in self.fp.ops:
                self.phase[i] += 1  # an op begins: what it touches is in its next phase
            self.fp.add(locs[i], i, self.phase[i])
        return i

    def _grow(self, locs: tuple[int, ...]) -> None:
        if len(self.phase) < len(locs):
            self.phase += [0] * (len(locs) - len(self.phase))

    def racy_bitmap(self, i: int) -> np.ndarray:
        """Client ``i``'s run-ahead bitmaps in the state the last pick saw (ipc/sched writes them
        at its grant): what the other live clients may still touch (:meth:`Footprint.bitmap`)."""
        return self.fp.bitmap(i, self.phase, self.live, self._locs)

    def _clone_base(self, other: _Recording) -> None:
        other._setup(self.fp.overlay() if self.fp is not None else None, record=False)
        other.decisions = self.decisions
        other.phase, other.live, other._locs = list(self.phase), self.live, self._locs


class RandomWalk(_Recording):
    name = "random"

    def __init__(self, seed: int, footprint: Footprint | None = None):
        self.rng = random.Random(seed)
        self._setup(footprint)

    def _choice(self, enabled: list[int]) -> int:
        return enabled[int(self.rng.random() * len(enabled))]

    def clone(self) -> RandomWalk:
        c = RandomWalk.__new__(RandomWalk)
        c.rng = random.Random()
        c.rng.setstate(self.rng.getstate())
        self._clone_base(c)
        return c


class Pct(_Recording):
    """PCT (Burckhardt et al., ASPLOS 2010): random distinct priorities, d-1 change points among
    the first ``k`` decisions (module doc; every step when no footprint is given) at which the
    running client's priority drops below every other; always run the highest-priority enabled
    client."""

    name = "pct"

    def __init__(self, seed: int, n: int, depth: int, k: int, footprint: Footprint | None = None):
        rng = random.Random(seed)
        prios = list(range(depth, depth + n))
        rng.shuffle(prios)
        self.prio = prios
        self.k = max(k, depth)
        self.change = {s: depth - 1 - i for i, s in enumerate(sorted(rng.sample(range(1, self.k + 1),
                                                                                depth - 1)))}
        self._setup(footprint)

    def _decided(self, last: int) -> None:
        low = self.change.get(self.decisions)
        if low is not None:
            self.prio[last] = low

    def _choice(self, enabled: list[int]) -> int:
        return max(enabled, key=self.prio.__getitem__)

    def decision_grant(self, i: int, enabled: list[int]) -> int:
        """``i`` has the highest priority of the enabled clients (the others wait at points, ipc/
        sched): PCT chooses it at every decision before the next change point."""
        if any(self.prio[j] > self.prio[i] for j in enabled):
            return 0
        nxt = min((c for c in self.change if c > self.decisions), default=None)
        return 1 << 30 if nxt is None else nxt - self.decisions - 1

    def clone(self) -> Pct:
        c = Pct.__new__(Pct)
        c.prio, c.k, c.change = list(self.prio), self.k, self.change
        self._clone_base(c)
        return c


_END = ()  # History: a recorded schedule ended here


class History:
    """The schedules run so far, as a prefix tree keyed by the hash of each choice prefix: the
    state at each node (enabled clients, locations) is what a strategy is simulated on. A node of
    an approximate state (``_Recording.ran``'s ``approx``) ends a simulation as new."""

    def __init__(self):
        self.nodes: dict[int, tuple] = {}
        self._intern: dict[tuple, tuple] = {}
        self.runs = 0

    def add(self, strategy: _Recording) -> None:
        """Record the schedule ``strategy`` just drove (its trail and choices)."""
        h, nodes, intern = 0, self.nodes, self._intern
        for node, c in zip(strategy.trail or (), strategy.choices, strict=True):
            if h not in nodes:
                nodes[h] = intern.setdefault(node, node)
            h = hash((h, c))
        nodes[h] = _END
        self.runs += 1

    def seen(self, strategy) -> bool:
        """Would ``strategy`` (not yet run) drive a schedule already recorded? Simulated on a clone."""
        nodes = self.nodes
        node = nodes.get(0)
        if node is None:
            return False
        sim = strategy.clone()
        h, last, step = 0, -1, 0
        while True:
            if node is _END:
                return True
            if len(node) == 3:  # approximate (an idle client may have been woken): not provably a repeat
                return False
            enabled, locs = node
            c = sim.pick(list(enabled), step, last, locs)
            h, last, step = hash((h, c)), c, step + 1
            node = nodes.get(h)
            if node is None:
                return False

    def __len__(self) -> int:
        return self.runs


class Replay:
    name = "replay"

    def __init__(self, choices: list[tuple[int, int]]):
        self.choices = choices
        self.mismatch: str | None = None

    def pick(self, enabled: list[int], step: int, last: int, locs=None) -> int:
        raise AssertionError("Replay is driven by Scheduler.run")


def guarantee(n: int, k: int, depth: int) -> float:
    """PCT's per-run lower bound for finding a bug of depth ``depth``: 1 / (n * k^(d-1))."""
    return 1.0 / (n * max(k, 1) ** (depth - 1))
