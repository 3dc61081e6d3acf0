"""Virtual time (``--clock virtual``): each vCPU process keeps a clock in ns in shared memory, and
the process with the lowest clock is the one that runs.

What advances a process' clock (docs/virtual-time.md has the argument and the sources):
- every call it makes into the C primitives (``ipc/prims/``), at the price of that primitive in
  :data:`PRICES` (one table: ``lab/dilation.py``'s C estimate uses the same prices), plus the
  ``call`` price (the interpreted code between two primitives: 0 by default, see the docs);
- a **cache-line transfer** (``line``) when it touches a 64-byte line of shared memory whose last
  writer was another process and of which it holds no copy (MESI, simplified: a read takes a shared
  copy, a write takes the line exclusive, invalidating the copies) — what makes a contended lock or
  counter expensive on real hardware;
- guest time (L2 run time, modelled delays: ``_prims.spin_ns``) added directly, without sleeping;
- waiting: a process that finds a lock held (or a grace period that must wait for readers) blocks;
  the release sets its clock to max(own, release time) + the hand-off price (``wake_spin`` for a
  spinlock or rwlock waiter, which polled the line; ``wake_sleep`` for a mutex waiter, woken by
  futex). A spin-wait loop (``sched_yield`` in the code under test) costs ``spin_poll`` per poll.

Scheduling (one process runs at a time): the running process goes on while its (clock, seeded
priority) is the lowest of every runnable process; at a scheduling point (every lock operation, RCU
read section boundary, grace-period wait, atomic RMW of the code under test, named fuzz point, guest
time) where that stops being true it hands the turn to the lowest one over a futex in this segment.
Nothing depends on the host's timing: the same config and seed give the same results.

Layout (``layout(n, nlines)``, segment ``pts_<run>_vtime``; the coordinator creates it):
- ``hdr`` 8 words: [0] joined, [1] blocked (processes in BLOCKED), [2] abort (1 = every process
  raises :class:`VirtualTimeAborted` at its next turn), [3] n, [4] hand-offs, [5] deadlock (1 + the
  process index that found it), rest reserved
- ``slots`` (n, 16): [0] clock (ns), [1] state, [2] go (futex word: 1 = your turn), [3] key of what
  it is blocked on, [4] sleep_from (clock where its guest time began), [5] priority (seeded tie
  break), [6] pid, [7] hand-offs it made, [8] parked (asleep on go: the turn needs a futex wake;
  a process polls go for ~50 µs first), rest reserved
- ``lines`` (nlines, 2): the line table of the transfer price (tag, writer / version), C-owned
"""

from __future__ import annotations

import os
import random
import tomllib
import zlib

from ipc import _prims, fuzz, sched
from ipc.shm import Layout, Region

NOTYET, READY, RUN, BLOCKED, SLEEP, DONE = 0, 1, 2, 3, 4, 5
H_JOINED, H_BLOCKED, H_ABORT, H_N, H_HANDOFFS, H_DEADLOCK = 0, 1, 2, 3, 4, 5
S_CLOCK, S_STATE, S_GO, S_KEY, S_FROM, S_PRIO, S_PID, S_HANDOFFS, S_PARKED = range(9)
SLOT_WORDS = 16
NLINES = 1 << 16
_WAIT_NS = 200_000_000  # a parked process looks up this often (abort, coordinator gone?)

# ns per operation. The first block is the C extension's table, in its enum order (VP_*); the
# second is the turnstile's own. Sources (docs/virtual-time.md): uncontended x86 costs of the
# same operation inlined in kernel C (Agner Fog's instruction tables, Intel's optimization
# manual: a LOCK-prefixed RMW ~20 cycles, MFENCE ~30), futex syscalls ~0.5 µs, the line transfer
# is a core-to-core (LLC-to-core) cache-line move on one socket, 40-100 ns on current x86 parts.
C_PRICES = {
    "load": 1, "store": 1, "write": 2, "rmw": 6, "fence": 10, "futex_wait": 500, "futex_wake": 500,
    "clock": 20, "lock": 8, "unlock": 2, "rcu_read": 2, "hist": 5, "relax": 5, "gp_scan": 30,
    "line": 80, "call": 0,
    # not a price: a scheduling point hands the turn over only once this process' clock is past the
    # lowest other runnable clock + quantum (0: the exact order; > 0 reorders events closer than
    # quantum ns, for speed at many vCPUs)
    "quantum": 0,
}
SCHED_PRICES = {
    "wake_spin": 80,  # a spinning waiter sees the release: one line transfer
    "wake_sleep": 3000,  # a mutex waiter asleep on its futex: wake-up and context switch
    "spin_poll": 100,  # one poll of a spin-wait loop (cpu_relax, reload the line)
    "ipi": 1500,  # a kick (reload request) reaches a vCPU in L2: IPI, VM exit
    "grace_period": 0,  # extra latency of a grace period beyond its readers (see the docs)
}
PRICES = {**C_PRICES, **SCHED_PRICES}

# lab/dilation.py names the primitives as Python sees them: the same prices (one or several entries)
PRIM_PRICE: dict[str, tuple[str, ...]] = {
    "Mem.load": ("load",), "Mem.store": ("store",), "Mem.write": ("write",), "Mem.fetch_add": ("rmw",),
    "Mem.xchg": ("rmw",), "Mem.cmpxchg": ("rmw",), "Mem.futex_wait": ("futex_wait",),
    "Mem.futex_wake": ("futex_wake",), "now_ns": ("clock",), "stats_clock": ("clock",), "smp_mb": ("fence",),
    "cpu_relax": ("relax",), "rcu_wait_readers": ("gp_scan",), "Histogram.record": ("hist",),
    "Histogram.record_since": ("clock", "hist"), "Histogram.sample": ("hist",),
    "RcuReader.lock": ("rcu_read",), "RcuReader.unlock": ("rcu_read",), "RcuReader.__enter__": ("rcu_read",),
    "RcuReader.__exit__": ("rcu_read",), "sched_yield": ("spin_poll",),
}
for _k in ("SpinLock", "Mutex", "RwLock"):
    _unlock = ("lock",) if _k == "Mutex" else ("unlock",)  # mutex_unlock: an xchg; spin_unlock: a store
    PRIM_PRICE.update({f"{_k}.lock": ("lock",), f"{_k}.trylock": ("lock",), f"{_k}.__enter__": ("lock",),
                       f"{_k}.unlock": _unlock, f"{_k}.__exit__": _unlock, f"{_k}.read_lock": ("lock",),
                       f"{_k}.read_trylock": ("lock",), f"{_k}.read_unlock": ("lock",)})
for _k in list(PRIM_PRICE):  # the traced types (trace ring on) cost the same
    if "." in _k and not _k.startswith(("Mem.", "Histogram.")):
        PRIM_PRICE["Traced" + _k] = PRIM_PRICE[_k]

ACTIVE: VClock | None = None


class VirtualTimeAborted(BaseException):  # noqa: N818  (not an error of the code under test)
    """The virtual-time run ended under this process (a deadlock found by another, a stop)."""


class VirtualDeadlock(RuntimeError):
    """Every unfinished process is blocked: nobody can release what they wait for."""


def load_prices(path: str) -> dict[str, int]:
    """The overrides of :data:`PRICES` in the ``[prices]`` table (or the top level) of the TOML file
    ``path``. Raises ValueError (one line) on an unknown name or a negative / non-number price."""
    out: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"prices file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"prices file {path}: {e}") from None
    table = doc.get("prices", doc)
    if not isinstance(table, dict):
        raise ValueError(f"prices file {path}: [prices] must be a table")
    for k, v in table.items():
        if k not in PRICES:
            raise ValueError(f"prices file {path}: unknown price {k!r} (known: {', '.join(PRICES)})")
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f"prices file {path}: {k} must be a number of ns >= 0, got {v!r}")
        out[k] = int(round(v))
    return out


def prim_ns(name: str, prices: dict[str, int] | None = None) -> float:
    """The price of a primitive called ``name`` the way lab/dilation.py counts calls (a load when
    the primitive is not in the table: is_held, owner, nesting...), without line transfers."""
    p = prices or PRICES
    return float(sum(p[k] for k in PRIM_PRICE.get(name, ("load",))) + p["call"])


def layout(n: int, nlines: int = NLINES) -> Layout:
    return Layout("vtime", [("hdr", "i8", (8,)), ("slots", "i8", (n, SLOT_WORDS)), ("lines", "i8", (nlines, 2))])


def create(run_id: str, n: int, seed: int) -> Region:
    """The coordinator's segment for ``n`` processes: clocks 0, a priority permutation from ``seed``."""
    r = Region.create(run_id, layout(n))
    r.v["hdr"][:] = 0
    r.v["hdr"][H_N] = n
    s = r.v["slots"]
    s[:] = 0
    prio = list(range(n))
    random.Random(seed).shuffle(prio)
    s[:, S_PRIO] = prio
    r.v["lines"][:] = 0
    return r


def key_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class VClock:
    """This process' side: installed as ``sched.ACTIVE`` / ``fuzz.ACTIVE`` (so that locks, RCU
    domains and atomics made afterwards are wrapped, as under ``explore``), and ``_prims.spin_ns`` /
    ``_prims.sched_yield`` become guest time / a priced poll. The turnstile itself is C
    (``_prims.vt_*``, one call per scheduling point; they raise :class:`VirtualDeadlock` /
    :class:`VirtualTimeAborted`); the clock runs from :meth:`join` to :meth:`done`."""

    controlled = True  # no timed widening, no timeouts in the code under test

    def __init__(self, region: Region, index: int, prices: dict[str, int]):
        self.region = region
        self.mem = region.mem
        self.mem.vkey = -1  # the turnstile's own words are not the model's
        self.hdr = region.v["hdr"]
        self.slots = region.v["slots"]
        self.n = int(self.hdr[H_N])
        self.me = index
        self.prices = prices
        self._keys: dict[str, int] = {}
        self._wake = (prices["wake_spin"], prices["wake_sleep"])
        self.slots[index, S_PID] = os.getpid()
        # a scheduling point is one C call (a no-op until join): SchedLock, AtomicPoints and fuzz
        # points bind it when their objects are made
        self.hit = self.point = _prims.vt_hit

    @property
    def joined(self) -> bool:
        """Is this process' clock running (joined, not done, not aborted)?"""
        return _prims.vt_now() is not None

    def _key(self, name: str) -> int:
        k = self._keys.get(name)
        if k is None:
            k = self._keys[name] = key_of(name)
        return k

    # -- the rest of the sched.Client interface (SchedLock, wrap_domain, fuzz) -------------------
    def chance(self, name: str, scale: float = 1.0) -> bool:
        return False

    def block(self, name: str, holder: int = 0, key: str | None = None) -> None:
        """Cannot go on until ``key`` (a lock's or domain's name) is released by another process."""
        if not self.joined:  # before the run (vcpu_init...) or after it: real waiting
            os.sched_yield()
            return
        _prims.vt_block(self._key(key or name))

    def released(self, key: str, sleeper: bool = False) -> None:
        """``key`` was released: its waiters become runnable at max(own, now + wake price)."""
        if self.joined:
            _prims.vt_released(self._key(key), self._wake[sleeper])

    # -- guest time, spin waits, kicks -----------------------------------------------------------
    def guest(self, ns: int) -> None:
        """``_prims.spin_ns``: ``ns`` of a modelled delay (reader delay, widening), without sleeping."""
        if not self.joined:
            _real_spin(ns)
            return
        _prims.vt_sleep(int(ns), 0)

    def l2_time(self, ns: int) -> None:
        """``ns`` of L2 run time: a kick (:meth:`kick`, a reload request's IPI) may end it early."""
        if not self.joined:
            _real_spin(ns)
            return
        _prims.vt_sleep(int(ns), 1)

    def spin_wait(self) -> None:
        """``_prims.sched_yield`` in a spin-wait loop of the code under test: one priced poll."""
        if not self.joined:
            os.sched_yield()
            return
        _prims.vt_spin(self.prices["spin_poll"])

    def kick(self, vcpu: int) -> None:
        """A kick (IPI) to process ``vcpu``: if it is in guest time, that time ends at the kick's
        arrival (now + ``ipi``), not before its guest time began."""
        if self.joined:
            _prims.vt_kick(vcpu, self.prices["ipi"])

    def grace_period_waited(self, domain: str) -> None:
        """A grace period's wait for its readers ended (twice per grace period: before and after
        the phase flip): half its own latency beyond them each time. Not for ``guest_mode``: its
        "grace period" is a remote TLB flush waiting for vCPUs to leave guest mode (IPIs), which
        the waits model already, not an RCU grace period."""
        if self.joined and self.prices["grace_period"] and domain != "guest_mode":
            _prims.vt_advance(self.prices["grace_period"] // 2)

    # -- the turnstile -------------------------------------------------------------------------
    def now(self) -> int:
        return _prims.vt_now() or 0

    def join(self) -> None:
        """Start this process' clock and wait for every process to join; the last one starts the
        lowest."""
        r = self.region
        _prims.vt_exceptions(VirtualTimeAborted, VirtualDeadlock)
        _prims.vt_attach(r.mem, r.word("hdr"), r.word("slots"), r.word("lines"), r.layout["lines"].shape[0],
                         self.me, [self.prices[k] for k in C_PRICES])
        _prims.vt_join()

    def done(self) -> None:
        """This process has finished: hand the turn on for good; detach."""
        if self.joined:
            _prims.vt_done()


class VFuzz:
    """``--fuzz light|heavy`` on virtual time (``fuzz.ACTIVE``): at a named preemption point, with the
    level's probability, a seeded delay of virtual time (what a preemption there would cost: a spin of
    up to 50 µs, now and then up to 1 ms), then the point itself; ``chance`` widens heuristics as
    ``ipc.fuzz.Fuzz`` does. Seeded per vCPU from the run's seed and started when the clock starts, so
    a run stays deterministic; ``--fuzz off`` (what compare and the map use) leaves plain points."""

    controlled = True

    def __init__(self, vc: VClock, level: str, seed: int, proc: int):
        self.vc = vc
        self.p, self.spin_max, self.p_sleep = fuzz._PARAMS[level]
        self.seed = (seed * 0x9E3779B97F4A7C15 + proc * 0x632BE59BD9B4E019 + 7) % (1 << 64)
        self.rng: random.Random | None = None
        self.counts: dict[str, int] = {}
        self.delays = 0

    def _rng(self) -> random.Random | None:
        if self.rng is None and self.vc.joined:  # not before: set-up ran on the host's clock
            self.rng = random.Random(self.seed)
        return self.rng

    def hit(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        rng = self._rng()
        if rng is not None:
            r = rng.random()
            if r < self.p:
                self.delays += 1
                long = r / self.p < self.p_sleep
                _prims.vt_sleep(int(rng.random() * (fuzz.SLEEP_MAX_S * 1e9 if long else self.spin_max)), 0)
        _prims.vt_hit(name)

    point = hit

    def chance(self, name: str, scale: float = 1.0) -> bool:
        self.counts[name] = self.counts.get(name, 0) + 1
        rng = self._rng()
        return rng is not None and rng.random() < self.p * scale


def abort(region: Region) -> None:
    """Every parked process wakes and raises :class:`VirtualTimeAborted`."""
    _prims.vt_abort(region.mem, region.word("hdr"), region.word("slots"))


_real_spin = _prims.spin_ns


def install(region: Region, index: int, prices: dict[str, int], fuzz_level: str = "off",
            seed: int = 0) -> VClock:
    """Make this (dedicated vCPU) process run on virtual time; call before its VM is attached, so
    that its locks and RCU domains are made wrapped. :meth:`VClock.join` starts the clock."""
    global ACTIVE
    vc = VClock(region, index, prices)
    ACTIVE = vc
    sched.ACTIVE = vc
    fuzz.ACTIVE = vc if fuzz_level == "off" else VFuzz(vc, fuzz_level, seed, index + 1)
    _prims.spin_ns = vc.guest
    _prims.sched_yield = vc.spin_wait
    return vc


def stats(region: Region) -> dict:
    """What the results record about the turnstile: hand-offs, clocks (virtual ns) per process."""
    s = region.v["slots"]
    return {"handoffs": int(region.v["hdr"][H_HANDOFFS]), "clocks_ns": [int(c) for c in s[:, S_CLOCK]]}
