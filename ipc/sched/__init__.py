"""Controlled scheduling across processes: one process runs at a time, between scheduling points,
and ONE scheduler decides who runs next.

Every participating process (a "client", index 0..n-1) stops at each scheduling point — every shm
lock acquire / release (rw locks: read acquire / release too), RCU / SRCU read lock / unlock, grace-period wait, and the named preemption
points of ``ipc/fuzz.py`` (the client takes the role of ``fuzz.ACTIVE``) — hands the turn to the
scheduler process through a turnstile in shared memory (futex wait / wake) and sleeps until it is
chosen again. An interleaving is thus the sequence of (client, point) choices of the scheduler: a
seeded strategy (PCT, random walk) or a recorded list (replay). Nothing depends on timing.

Blocking is modelled, not deadlocked: a client that would spin or sleep on a lock held by another,
or wait for a grace period while readers are inside, calls ``block()``: it is not chosen again until
some other client has made progress (ended a step that was not itself a blocked retry); when every
unfinished client is blocked that way the scheduler reports a deadlock.

A client whose program has ended but which others may still wait on (a vCPU left running L2: a
reload request's kick must make it exit, as the IPI does) calls ``idle()`` instead of ending: it is
chosen again only when the scheduler's ``wake(i)`` says something is pending for it (the kick), or
once every client has ended or idles too (then it ends). It never makes a deadlock by itself, and
it adds no steps while nothing is pending for it.

Layout of the turnstile region (``layout(n)``, one segment ``pts_<run>_sched``):
- ``hdr``   8 words: [0] wake (futex word of the scheduler: 1 = a client yielded), [1] progress
  (productive steps so far), [2] abort (1 = every client raises :class:`ScheduleAborted` when it
  resumes), [3] job (futex word: a pool's clients start schedule number ``job``; ipc/pool.py),
  [4] quit (the pool's clients exit), rest reserved
- ``slots`` (n, 8) words, one cache line per client: [0] go (futex word: 1 = your turn), [1] state
  (RUN, POINT, BLOCKED, DONE, IDLE), [2] point id (crc32 of the point's name), [3] progress value seen
  when it blocked, [4] pid of the holder of the lock it blocked on (0: not a lock), [5] its pid,
  [6] the location it is about to touch (``points.location`` of a shared word, or its point's name:
  a lock, an RCU domain, an op), [7] how (``points.K_LOAD``, ``K_STORE``, ``K_NONE``: not an access,
  ``K_DONE``: its program ended),
  [8] run-ahead grant (steps it may still take without a turn), [9] run-ahead steps in its ring,
  [10] racing accesses it may still pass in its run-ahead (0: it stops at the first)
- ``racy`` (n, 2, RACY_WORDS) per client, bitmaps of the locations another live client may still
  write (plane 0) / touch (plane 1), by ``points.racy_pos``; written by the scheduler only, at each
  grant, from the strategy's footprint (``racy_bitmap``)
- ``ring`` (n, RING, 3) per client, the (point id, location, kind) of its run-ahead steps

Run-ahead (partial-order reduction, ipc/sched/strategies.py): a strategy with ``run_ahead`` lets the
client that ran last go on at every access no other client races with (its step is no decision),
so the scheduler grants the chosen client up to RING such steps: at an access whose location is not
set in its bitmap it records the step in its ring and goes on without a turn (and at a racing one
too while its racing-access grant lasts: the strategy's ``decision_grant``, PCT's decisions before
its next change point when the client has the highest priority of those that could run, so that PCT
would choose it at each of them; not while another client idles); the scheduler puts
those steps into the log (and the strategy's trail) when the client next stops (a racing access, a
point that is no access, a block, the end). The interleaving is the one the strategy would have
chosen step by step (a replay hands out every step, and repeats it); the sampling checker just does
not run between two such steps.

Which accesses are points: ``shared_points`` wraps a region's ``Mem`` (ipc/sched/points.py, mode
``POINTS``); under the memory model ``tso`` (ipc/sched/tso.py) each client has a store buffer.
"""

from __future__ import annotations

import os
import zlib

from ipc import _prims, fuzz
from ipc.sched import tso
from ipc.sched.points import (
    K_DONE,
    K_LOAD,
    K_NONE,
    MODES,
    RACY_T,
    RACY_W,
    RACY_WORDS,
    PricedPoints,
    SharedPoints,
    name_location,
    racy_pos,
)
from ipc.sched.strategies import Replay
from ipc.shm import Layout, Region

HDR_WORDS, SLOT_WORDS = 8, 16
RING = 512  # run-ahead steps a client may take between two turns
H_WAKE, H_PROGRESS, H_ABORT, H_JOB, H_QUIT = 0, 1, 2, 3, 4
S_GO, S_STATE, S_POINT, S_SINCE, S_HOLDER, S_PID, S_LOC, S_KIND, S_GRANT, S_RING, S_DGRANT = range(11)
RUN, POINT, BLOCKED, DONE, IDLE = 0, 1, 2, 3, 4
_WAIT_NS = 200_000_000  # futex waits look up this often (parent or children gone?)

ACTIVE: Client | None = None
POINTS = "access"  # which shared accesses are points (points.MODES); forked clients inherit it


class ScheduleAborted(BaseException):  # noqa: N818  (not an error of the code under test)
    """The scheduler ended this schedule (step bound, deadlock, mismatch): unwind and exit."""


def layout(n: int) -> Layout:
    return Layout("sched", [("hdr", "i8", (HDR_WORDS,)), ("slots", "i8", (n, SLOT_WORDS)),
                            ("racy", "i8", (n, 2, RACY_WORDS)), ("ring", "i8", (n, RING, 3))])


def point_id(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# -- client side (one per scheduled process) -----------------------------------------------------
class Client:
    """This process' side of the turnstile; installed as ``fuzz.ACTIVE`` by :func:`install`."""

    controlled = True  # fuzz.configure() leaves a controlled ACTIVE alone; timed widening is off
    takes_c_points = True  # fuzz.configure(): with EXPLORE_C_POINTS, the C primitives' points are ours

    def __init__(self, region: Region, index: int):
        self.region = region
        self.mem = region.mem
        self.hdr = region.word("hdr")
        self.slot = region.word("slots", index)
        self.racy_w, self.racy_t = region.word("racy", index, RACY_W), region.word("racy", index, RACY_T)
        self.ring = region.word("ring", index)
        self.index = index
        self.turns = 0  # scheduling points passed (turns given up) in this job
        self.retrying = False  # the step now running began at a block(): a blocked retry
        self.counts: dict[str, int] = {}
        self.names: dict[int, str] = {}
        self._ids: dict[str, int] = {}
        self._name_locs: dict[str, int] = {}
        self.parent = os.getppid()
        self.mem.store(self.slot + S_PID, os.getpid())

    def name_id(self, name: str) -> int:
        """The point id of ``name`` (known to the scheduler's log by this name)."""
        i = self._ids.get(name)
        if i is None:
            i = self._ids[name] = point_id(name)
            self.names[i] = name
        return i

    def hit(self, name: str) -> None:
        """A scheduling point; the step that ended here was productive."""
        self.counts[name] = self.counts.get(name, 0) + 1
        loc = self._name_locs.get(name)
        if loc is None:
            loc = self._name_locs[name] = name_location(name)
        self.access(self.name_id(name), loc, K_NONE)

    def access(self, pid: int, loc: int, kind: int) -> None:
        """A scheduling point before an access (``kind``) of shared location ``loc`` (a point id
        from :meth:`name_id`; ipc/sched/points.py); the step that ended here was productive."""
        m, s = self.mem, self.slot
        m.fetch_add(self.hdr + H_PROGRESS, 1)
        g = m.load(s + S_GRANT)
        if g > 0:  # run ahead unless another client races with this access (module doc)
            if m.load(self.hdr + H_ABORT):  # the scheduler ended the schedule (a hang, a crash)
                raise ScheduleAborted("schedule ended by the scheduler")
            w, bit = racy_pos(loc)
            go = True
            if kind == K_NONE or m.load((self.racy_w if kind == K_LOAD else self.racy_t) + w) & bit:
                dg = m.load(s + S_DGRANT)
                go = dg > 0
                if go:
                    m.store(s + S_DGRANT, dg - 1)
            if go:
                r = m.load(s + S_RING)
                e = self.ring + 3 * r
                m.store(e, pid)
                m.store(e + 1, loc)
                m.store(e + 2, kind)
                m.store(s + S_RING, r + 1)
                m.store(s + S_GRANT, g - 1)
                self.turns += 1
                self.retrying = False
                return
        self._turn(pid, POINT, loc, kind)

    point = hit

    def block(self, name: str, holder: int = 0, key: str | None = None) -> None:
        """Cannot go on until another client makes progress (a lock is held, readers are inside).
        The step that ends here counts as progress unless it was itself a blocked retry (it may
        have released a lock: SchedLock.unlock releases after its point); a real deadlock is still
        seen one round later, when every blocked client's retry made no progress."""
        self.counts[name] = self.counts.get(name, 0) + 1
        if not self.retrying:
            self.mem.fetch_add(self.hdr + H_PROGRESS, 1)
        self.mem.store(self.slot + S_HOLDER, holder)  # named in a deadlock report
        self._yield(name, BLOCKED)

    def idle(self, name: str) -> None:
        """This client's program has ended, but it still runs (a vCPU in L2) and another client
        may wait for it to react (a reload request's kick). Chosen again only when the scheduler's
        ``wake(index)`` is true, or when every client has ended or idles (:meth:`finishing`: then
        end). The step that ends here counts as progress."""
        self.counts[name] = self.counts.get(name, 0) + 1
        self.mem.fetch_add(self.hdr + H_PROGRESS, 1)
        self._yield(name, IDLE)

    def finishing(self) -> bool:
        """Every other client has ended or idles: nothing can be pending for an idle one any more."""
        m, slot0 = self.mem, self.slot - self.index * SLOT_WORDS
        return all(m.load(slot0 + j * SLOT_WORDS + S_STATE) in (DONE, IDLE)
                   for j in range(self.region.v["slots"].shape[0]) if j != self.index)

    def chance(self, name: str, scale: float = 1.0) -> bool:
        """Timed / random widening is off under control: the scheduler makes the interleavings."""
        self.counts[name] = self.counts.get(name, 0) + 1
        return False

    def released(self, key: str, sleeper: bool = False) -> None:
        """``key`` (a lock, a domain's readers) was released: here every blocked client retries
        after any progress anyway (ipc/vtime.py wakes only the waiters of ``key``)."""

    def _yield(self, name: str, state: int) -> None:
        pid = self.name_id(name)
        self._turn(pid, state, name_location(name), K_NONE)

    def _turn(self, pid: int, state: int, loc: int, kind: int) -> None:
        m, s = self.mem, self.slot
        if m.load(self.hdr + H_ABORT):  # unwinding after an abort: no more turns
            raise ScheduleAborted("schedule ended by the scheduler")
        self.turns += 1
        self.retrying = state == BLOCKED
        m.store(s + S_POINT, pid)
        m.store(s + S_LOC, loc)
        m.store(s + S_KIND, kind)
        m.store(s + S_SINCE, m.load(self.hdr + H_PROGRESS))
        m.store(s + S_GO, 0)
        m.store(s + S_STATE, state)
        m.store(self.hdr + H_WAKE, 1)
        m.futex_wake(self.hdr + H_WAKE)
        while not m.load(s + S_GO):
            if m.futex_wait(s + S_GO, 0, _WAIT_NS) and os.getppid() != self.parent:
                raise ScheduleAborted("scheduler gone")
        if m.load(self.hdr + H_ABORT):
            raise ScheduleAborted("schedule ended by the scheduler")

    def done(self) -> None:
        m = self.mem
        self.retrying = False  # the next job begins with a fresh step
        m.store(self.slot + S_KIND, K_DONE)  # it touches nothing any more (strategies.py: live clients)
        m.fetch_add(self.hdr + H_PROGRESS, 1)  # its last step was productive too
        m.store(self.slot + S_STATE, DONE)
        m.store(self.hdr + H_WAKE, 1)
        m.futex_wake(self.hdr + H_WAKE)


class SchedLock:
    """A lock (``ipc.locks`` SpinLock / Mutex) whose acquire and release are scheduling points and
    whose waiting is a modelled block (try-lock, then yield the turn). An acquisition whose first
    try-lock fails counts one contention in the lock's lock_stat block (``stats_word`` >= 0), as
    the C slow path does."""

    def __init__(self, inner, client: Client, name: str, mem=None, stats_word: int = -1):
        self.inner = inner
        self.c = client
        self.name = name
        self.mem, self.stats_word = mem, stats_word
        self.sleeper = "Mutex" in type(inner).__name__  # its waiters sleep (a wake-up), others spin
        for attr in ("trylock", "is_held", "owner", "holder", "recover"):
            setattr(self, attr, getattr(inner, attr))

    def lock(self, *a) -> None:
        self.c.hit(f"{self.name}: lock")
        if self.inner.trylock():
            return
        self._wait(self.inner.trylock, f"{self.name}: wait")

    def _wait(self, trylock, point: str) -> None:
        """The contended acquisition: block until the holder releases, retry; lock_stat's
        contention (and, on a clock that the scheduler keeps, the wait) in the lock's stats block."""
        now = getattr(self.c, "now", None)  # ipc/vtime.py: the virtual clock
        t0 = now() if now is not None else 0
        self.c.block(point, self.inner.holder()[0], key=self.name)
        while not trylock():
            self.c.block(point, self.inner.holder()[0], key=self.name)
        if self.stats_word >= 0:  # only one process runs: plain adds (not priced: lock_stat's own)
            was = _prims.vt_enable(False)
            m, w = self.mem, self.stats_word
            m.store(w + 1, m.load(w + 1) + 1)  # ST_CON
            if now is not None:
                d = now() - t0
                m.store(w + 2, m.load(w + 2) + d)  # ST_WTOT
                m.store(w + 3, max(m.load(w + 3), d))  # ST_WMAX
                m.store(w + 4, min(m.load(w + 4), d))  # ST_WMIN
            _prims.vt_enable(was)

    def unlock(self) -> None:
        self.c.hit(f"{self.name}: unlock")
        self.inner.unlock()
        self.c.released(self.name, self.sleeper)

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()


class SchedRwLock(SchedLock):
    """An ``ipc.locks`` RwLock under the scheduler: the write side is :class:`SchedLock`'s, and
    ``read_lock`` / ``read_unlock`` are scheduling points the same way (``<name>: read_lock``,
    ``<name>: read_unlock``); a reader that cannot get in blocks (read try-lock, then yield the turn,
    ``<name>: read wait``, naming the writer's pid). As for writes, an acquisition whose first
    read try-lock fails counts one contention in the lock's lock_stat block. Under control the lock
    is not writer-preferring: a blocked writer's try-lock gives its claim back between turns."""

    def __init__(self, inner, client: Client, name: str, mem=None, stats_word: int = -1):
        super().__init__(inner, client, name, mem, stats_word)
        for attr in ("read_trylock", "read_held", "readers"):
            setattr(self, attr, getattr(inner, attr))

    def read_lock(self, *a) -> None:
        self.c.hit(f"{self.name}: read_lock")
        if self.inner.read_trylock():
            return
        self._wait(self.inner.read_trylock, f"{self.name}: read wait")

    def read_unlock(self) -> None:
        self.c.hit(f"{self.name}: read_unlock")
        self.inner.read_unlock()
        self.c.released(self.name)


def shared_points(region, what: str, statistics: dict):
    """``region.mem`` itself, or (this process is scheduled) its :class:`points.SharedPoints` in
    mode ``POINTS``: decide once, when the object that keeps it is made, so that the free-running
    path is the plain ``Mem``. ``statistics``: the layout's declared statistics words (no points)."""
    if ACTIVE is None:
        return region.mem
    if not hasattr(ACTIVE, "access"):  # the virtual clock (ipc/vtime.py): priced points, not scheduled ones
        return PricedPoints(region.mem, ACTIVE.hit, what)
    return (tso.TsoPoints if getattr(ACTIVE, "tso", None) else SharedPoints)(region, ACTIVE, what, statistics, POINTS)


def set_points(mode: str) -> str:
    """Set ``POINTS`` (for processes forked from now on); returns the previous mode."""
    global POINTS
    if mode not in MODES:
        raise ValueError(f"unknown scheduling-point mode {mode!r} ({', '.join(MODES)})")
    old, POINTS = POINTS, mode
    return old


def wrap_domain(domain, client: Client) -> None:
    """RCU / SRCU domain (``ipc.rcu``): read lock / unlock are points; the gp lock is a SchedLock;
    a grace-period wait blocks while readers of the old phase are inside."""
    name = domain.name
    gp_key = f"{name}: grace period"
    if domain.reader is not None:
        lock, unlock = tso.fenced(domain.reader.lock, client), tso.fenced(domain.reader.unlock, client)

        def read_lock() -> None:
            client.hit(f"{name}: read_lock")
            lock()

        def read_unlock() -> None:
            client.hit(f"{name}: read_unlock")
            unlock()
            client.released(gp_key)

        domain.read_lock, domain.read_unlock = read_lock, read_unlock
    if not isinstance(domain.gp_lock, SchedLock):  # ipc.locks.new_lock wraps it already
        domain.gp_lock = SchedLock(domain.gp_lock, client, f"{name}.gp_lock")

    def wait_readers(t0: int, warned: set[int]) -> None:
        # one scan of the reader slots per try (it begins with a full barrier); blocked until a
        # reader leaves (the wrapped read_unlock releases gp_key)
        scan = (domain.mem, domain.hdr_w, domain.slot0_w, domain.nslots, 0)
        while _prims.rcu_wait_readers(*scan) >= 0:
            client.block(f"{name}: grace period waits for readers", key=gp_key)
        waited = getattr(client, "grace_period_waited", None)
        if waited is not None:
            waited(name)

    domain._wait_readers = wait_readers


def install(client: Client) -> None:
    """Make this process scheduled: fuzz points, new locks and RCU domains go through ``client``,
    and ``_prims.sched_yield`` (spin-wait loops in the code under test) blocks instead. Call it
    before the VM is attached; it is for the whole life of this (dedicated) process."""
    global ACTIVE
    ACTIVE = client
    fuzz.ACTIVE = client
    _prims.sched_yield = lambda: client.block("sched_yield (spin wait)")
    tso.install(client)  # under the memory model tso: its store buffer and drains


def wrap_lock(lock, name: str | None, mem=None, stats_word: int = -1):
    """Used by ``ipc.locks.new_lock`` / ``ipc.rcu``: the lock itself, or its scheduled wrapper
    (:class:`SchedRwLock` for a lock with a read side)."""
    c = ACTIVE
    if c is None:
        return lock
    cls = SchedRwLock if hasattr(lock, "read_lock") else SchedLock
    return tso.fence_lock(cls(lock, c, name or f"lock@{id(lock):x}", mem, stats_word), c)


# -- scheduler side --------------------------------------------------------------------------
class Scheduler:
    """Drives one schedule: waits until no client runs, picks the next, hands it the turn.
    ``strategy.pick(enabled, step, last, locs)`` chooses (``locs``: per client, the location it is
    about to touch << 2 | how, ipc/sched/points.py); ``log`` holds (client, point id, blocked-retry?) per step; ``outcome`` is "done", "deadlock",
    "step-bound", "mismatch", "crash" or "hang". ``wake(i)`` (called while nobody runs) tells whether
    something is pending for client ``i`` while it idles (:meth:`Client.idle`); without it an idle
    client runs again only when every client has ended or idles."""

    def __init__(self, region: Region, n: int, strategy, max_steps: int, alive=None,
                 hang_s: float = 10.0, check=None, wake=None):
        self.mem = region.mem
        self.hdr = region.word("hdr")
        self.slot0 = region.word("slots")
        self.n = n
        self.strategy = strategy
        self.max_steps = max_steps
        self.alive = alive  # callable(i) -> bool: is client i's process still there?
        self.hang_ns = int(hang_s * 1e9)
        self.check = check  # check(step) between two steps, nobody running; step: the next one's index in log
        self.wake = wake  # callable(i) -> bool: is something pending for idle client i (a kick)?
        self.log: list[tuple[int, int, bool]] = []
        self.outcome = ""
        self.detail = ""
        self.ring0 = region.word("ring")
        self.ahead = bool(getattr(strategy, "run_ahead", False))
        self.handoffs = 0  # turns handed out (the log's other steps were run-ahead steps)
        self.racy_v = region.v["racy"]

    def _grant(self, i: int, base: int, states: list[int], enabled: list[int], locs: tuple[int, ...],
               ending: frozenset[int] = frozenset()) -> None:
        """Client ``i`` (chosen) may run ahead. At each run-ahead step the enabled clients would be
        the ones enabled now, ``i``, and the blocked ones (``i``'s first step is progress): the
        strategy is shown that state for its trail, and grants the racing accesses (decisions) it
        would let ``i`` pass there. While another client idles, no run-ahead at all: a kick ``i``
        stores may wake it, and a step-by-step state is exact (the History can prove a repeat; in
        flood-drop 23 % of the schedules run were repeats it could not tell). ``ending``: the idle clients
        enabled only because every client ended or idles; once ``i`` runs they are not."""
        m = self.mem
        ahead = (set(enabled) - ending) | {j for j, s in enumerate(states) if s == BLOCKED} | {i}
        idle = any(s == IDLE and j not in ahead for j, s in enumerate(states))
        self.grant = (en := tuple(sorted(ahead)), locs, idle)  # idle: the trail's state is approximate
        m.store(base + S_DGRANT, 0 if idle else self.strategy.decision_grant(i, list(en)))
        if not idle:  # what the other live clients may still touch (ipc/sched/strategies.py)
            self.racy_v[i] = self.strategy.racy_bitmap(i)
        m.store(base + S_GRANT, 0 if idle else min(RING, self.max_steps - len(self.log)))

    def _drain(self, i: int) -> None:
        """Client ``i``'s run-ahead steps into the log and the strategy's trail."""
        m, s = self.mem, self.slot0 + i * SLOT_WORDS
        r = m.load(s + S_RING)
        if not r:
            return
        ran, (enabled, locs, approx) = self.strategy.ran, self.grant
        for e in range(self.ring0 + i * RING * 3, self.ring0 + (i * RING + r) * 3, 3):
            pid, loc, kind = m.load(e), m.load(e + 1), m.load(e + 2)
            self.log.append((i, pid, False))
            code = loc << 2 | kind
            ran(i, enabled, locs[:i] + (code,) + locs[i + 1:], approx)
        m.store(s + S_RING, 0)

    def _s(self, i: int, f: int) -> int:
        return self.mem.load(self.slot0 + i * SLOT_WORDS + f)

    def _wait_quiet(self) -> bool:
        """Until no client is running; False if one died or hung."""
        m, w = self.mem, self.hdr + H_WAKE
        t0, prog = _prims.now_ns(), m.load(self.hdr + H_PROGRESS)
        while any(self._s(i, S_STATE) == RUN for i in range(self.n)):
            if m.futex_wait(w, 0, _WAIT_NS // 4):
                p = m.load(self.hdr + H_PROGRESS)
                if p != prog:  # a run-ahead step was taken: hang_s is per step, not per run-ahead
                    t0, prog = _prims.now_ns(), p
                dead = [i for i in range(self.n) if self.alive is not None and not self.alive(i)
                        and self._s(i, S_STATE) != DONE]
                if dead:
                    self.outcome, self.detail = "crash", f"process {dead[0]} died while running"
                    return False
                if _prims.now_ns() - t0 > self.hang_ns:
                    self.outcome, self.detail = "hang", "a process ran without reaching a scheduling point"
                    return False
            m.xchg(w, 0)  # a full barrier: the state loads below cannot pass it and miss a WAKE=1
        return True

    def run(self) -> str:
        try:
            return self._run()
        except BaseException:  # wake / check / the strategy raised: no client stays parked mid-job
            self._abort()
            raise

    def _run(self) -> str:
        m = self.mem
        idle_turn: dict[int, int] = {}  # progress when an idle client was last given a turn (woken)
        progress_w = self.hdr + H_PROGRESS
        last = -1
        replay = self.strategy if isinstance(self.strategy, Replay) else None
        while True:
            if not self._wait_quiet():  # crash / hang: the steps it ran ahead are in the log too
                self._abort()
                if self.ahead and last >= 0:
                    self._drain(last)
                return self.outcome
            if self.ahead and last >= 0:
                self._drain(last)
            if self.check is not None:
                self.check(len(self.log))
            states = [self._s(i, S_STATE) for i in range(self.n)]
            if all(s == DONE for s in states):
                self.outcome = "done"
                return self.outcome
            prog = m.load(progress_w)
            ending = all(s in (DONE, IDLE) for s in states)  # idle clients end: nothing can wake them
            # an idle client woken by a kick is not run again if its last turn was idle to idle with the
            # kick still pending and nobody else moved: a kick its turn does not clear is a deadlock,
            # not a loop of idle turns to the step bound
            woken = {i for i, s in enumerate(states) if s == IDLE and self.wake is not None and self.wake(i)}
            enabled = [i for i, s in enumerate(states)
                       if s == POINT or (s == BLOCKED and self._s(i, S_SINCE) != prog)
                       or (s == IDLE and (ending or (i in woken and idle_turn.get(i, -2) + 1 != prog)))]
            step = len(self.log)
            if not enabled:
                self.outcome = "deadlock"
                self.detail = "every unfinished process is blocked: " + ", ".join(
                    f"process {i} at @{self._s(i, S_POINT)}{self._held_by(i, states)}"
                    for i, s in enumerate(states) if s == BLOCKED) + "".join(
                    f", process {i} idle at @{self._s(i, S_POINT)} "
                    + ("(woken, but its last turn did not clear what is pending for it)" if i in woken
                       else "(nothing pending for it)")
                    for i, s in enumerate(states) if s == IDLE)
                return self._abort()
            if step >= self.max_steps:
                self.outcome, self.detail = "step-bound", f"{self.max_steps} steps without the end"
                return self._abort()
            if replay is not None:
                if step >= len(replay.choices):
                    self.outcome, self.detail = "mismatch", f"the schedule ends at step {step}, the run goes on"
                    return self._abort()
                i, pid = replay.choices[step]
                if i not in enabled or self._s(i, S_POINT) != pid:
                    self.outcome = "mismatch"
                    self.detail = (f"step {step}: process {i} is "
                                   + ("not runnable" if i not in enabled else f"at @{self._s(i, S_POINT)}")
                                   + f", the schedule expects it at @{pid}")
                    return self._abort()
            else:  # the strategy sees where each client is about to touch shared state (POR)
                locs = tuple(self._s(j, S_LOC) << 2 | self._s(j, S_KIND) for j in range(self.n))
                i = self.strategy.pick(enabled, step, last, locs)
            if states[i] == IDLE:  # its turn ends at its next idle (+1): only that = it changed nothing
                idle_turn[i] = prog
            self.log.append((i, self._s(i, S_POINT), states[i] == BLOCKED))
            last = i
            self.handoffs += 1
            base = self.slot0 + i * SLOT_WORDS
            if self.ahead:
                self._grant(i, base, states, enabled, locs, frozenset(
                    j for j in enabled if states[j] == IDLE and not (j in woken and idle_turn.get(j, -2) + 1 != prog)))
            m.store(base + S_STATE, RUN)
            m.store(base + S_GO, 1)
            m.futex_wake(base + S_GO)

    def _held_by(self, i: int, states: list[int]) -> str:
        h = self._s(i, S_HOLDER)
        if not h:
            return ""
        for j in range(self.n):
            if self._s(j, S_PID) == h:
                return f" (lock held by process {j}" + (", which has finished)" if states[j] == DONE else ")")
        return f" (lock held by pid {h})"

    def _abort(self) -> str:
        abort(self.mem, self.hdr, self.slot0, self.n)
        return self.outcome


def abort(mem, hdr: int, slot0: int, n: int) -> None:
    """End the schedule: every client raises :class:`ScheduleAborted` when it resumes, and each one
    parked on its turn word is given the turn (woken) so that it resumes now."""
    mem.store(hdr + H_ABORT, 1)
    for i in range(n):
        base = slot0 + i * SLOT_WORDS
        mem.store(base + S_GO, 1)
        mem.futex_wake(base + S_GO)

