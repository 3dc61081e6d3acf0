"""Race widening: named preemption points where a seeded choice may delay this process.

A race between processes is found by luck when its window is a few instructions wide. The code under
test calls ``point(name)`` at the places where an unlucky preemption matters — between a check and
the store it guards, inside read-side critical sections, between a lookup and the reference it takes,
around a grace period's phase flip, in register / unregister, between write-protecting a page and the
remote TLB flush, after an unlock — and, when fuzzing is on, a seeded random choice makes the process
do nothing (most of the time), spin 0-50 µs, ``sched_yield``, or (rarely) sleep up to 1 ms there. The
windows get wider and the interleavings more varied, the same seed gives the same choices.

Levels (``--fuzz``): ``off`` (nothing; what ``compare`` and bench/ use), ``light`` (the default of
``run``, ``scenario`` and ``torture``: a delay at about 1 point in 50) and ``heavy`` (1 in 8, longer
spins). ``configure()`` is called once per process (the VM's ``Kvm``, a torture worker); until then,
and with ``off``, ``point()`` returns at once (the cost is one global load and a branch at a call site
written ``if fuzz.ACTIVE: fuzz.point("...")``).

Counts per point name are kept per process (``hits()``) so that a test can check that a point is
reached.

**Points inside the C primitives** (``_prims.preempt_points()``: ``rcu.read_lock.after_ctr_load``
between loading the grace-period counter and publishing the reader slot, and the lock slow paths
between the failed try and the wait: ``spin.slow.after_trylock``, ``mutex.slow.after_trylock``,
``mutex.slow.before_sleep``, ``rw.read.slow.after_backoff``, ``rw.write.slow.after_trylock``,
``rw.write.slow.after_claim``; ipc/prims/ states each one's consistency on an exception) call
the hook set with ``_prims.set_preempt_hook``, off by default (a load and a not-taken branch in
the C code). :func:`c_points` sets it; it is on

- under ``--fuzz light`` / ``heavy``: ``configure`` routes it to ``Fuzz.hit`` (the same seeded
  widening as every Python point; counted in ``hits()``),
- under ``explore``, when ``EXPLORE_C_POINTS`` is true (off for now: the extra scheduling points
  move PCT's schedule space, and the seeds that tests/lab/test_explore.py found races with must be
  found again first): ``configure`` in a process scheduled by ipc/sched routes it to the
  ``Client``'s ``hit`` (a scheduling point inside the primitive: the scheduler may run another
  process, a grace period for instance, between the counter load and the slot store),
- in torture readers (their read delays reach inside the primitive): :func:`torture_points`
  installs a :class:`PointDelay`.

Under virtual time (ipc/vtime.py) the points stay off.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

from ipc import _prims

LEVELS = ("off", "light", "heavy")
# level -> (probability of a delay at a point, longest spin ns, share of sleeps among delays)
_PARAMS = {"light": (1 / 50, 50_000, 0.02), "heavy": (1 / 8, 50_000, 0.05)}
SLEEP_MAX_S = 0.001

ACTIVE: Fuzz | None = None
EXPLORE_C_POINTS = False  # route the C points of a process scheduled by ipc/sched to its Client


class Fuzz:
    controlled = False  # ipc/sched's Client, which takes this role under control, is True

    def __init__(self, level: str, seed: int, proc: int, dilate: float = 1.0):
        self.level = level
        self.p, spin_max, self.p_sleep = _PARAMS[level]
        self.spin_max = int(spin_max * dilate)  # delays are modelled time: dilated like guest time
        self.sleep_max_s = SLEEP_MAX_S * dilate
        self.rng = random.Random((seed * 0x9E3779B97F4A7C15 + proc * 0x632BE59BD9B4E019 + 7) % (1 << 64))
        self.counts: dict[str, int] = {}
        self.delays = 0

    def hit(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        r = self.rng.random()
        if r >= self.p:
            return
        self.delays += 1
        r /= self.p  # uniform again in [0, 1)
        if r < self.p_sleep:
            time.sleep(self.rng.random() * self.sleep_max_s)
        elif r < 0.5:
            _prims.spin_ns(int(self.rng.random() * self.spin_max))
        else:
            _prims.sched_yield()


    def chance(self, name: str, scale: float = 1.0) -> bool:
        """A seeded yes (with ``scale`` times the level's delay probability) at a named decision
        point: for widening a heuristic's choice (e.g. drop a table early), not a delay."""
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.rng.random() < self.p * scale


def configure(level: str, seed: int, proc: int, dilate: float = 1.0) -> None:
    """Turn fuzzing on (``light``/``heavy``) or off for this process; ``dilate`` scales its delays."""
    global ACTIVE
    if level not in LEVELS:
        raise ValueError(f"fuzz level must be one of {', '.join(LEVELS)}, got {level!r}")
    if getattr(ACTIVE, "controlled", False):
        # a scheduled process (ipc/sched): its points belong to the scheduler, the C ones too
        # (under virtual time, ipc/vtime.py, they stay off)
        routed = EXPLORE_C_POINTS and getattr(ACTIVE, "takes_c_points", False)  # sched.Client, not VClock
        c_points(ACTIVE.hit if routed else None)  # (None: not a hook inherited from a parent)
        return
    ACTIVE = None if level == "off" else Fuzz(level, seed, proc, dilate)
    c_points(ACTIVE.hit if ACTIVE is not None else None)


def point(name: str) -> None:
    """A named preemption point (call it as ``if fuzz.ACTIVE: fuzz.point(name)``)."""
    f = ACTIVE
    if f is not None:
        f.hit(name)


def hits() -> dict[str, int]:
    """How often each point was reached in this process since ``configure`` (empty when off)."""
    return dict(ACTIVE.counts) if ACTIVE is not None else {}


def c_points(hit: Callable[[str], None] | None) -> None:
    """Route the named preemption points inside the C primitives to ``hit(name)`` (None: off)."""
    _prims.set_preempt_hook(hit)


class PointDelay:
    """A seeded delay at the C preemption points of a process without ``--fuzz`` (a torture reader:
    rcutorture's read delays, ipc/torture/readdelay.py, reach into the read-side entry this way).

    Every point has probability ``p`` of a delay: half of them a ``sched_yield`` (the other
    processes may run a grace period meanwhile), half a busy wait of up to ``spin_max_ns`` (a
    preemption that ends while the grace period is still flipping). The gaps between delayed hits
    are drawn geometric (the same distribution as one draw per hit) so that a hit without a delay
    costs one decrement. ``counts``: hits per point name; ``delays``: delays made."""

    def __init__(self, seed: int, proc: int, p: float = 1 / 64, spin_max_ns: int = 200_000):
        self.rng = random.Random((seed * 0x9E3779B97F4A7C15 + proc * 0x632BE59BD9B4E019 + 11) % (1 << 64))
        self.p, self.spin_max_ns = p, spin_max_ns
        self.counts: dict[str, int] = {}
        self.delays = 0
        self.left = self._gap()

    def _gap(self) -> int:
        u = 1.0 - self.rng.random()  # in (0, 1]
        return 1 + int(math.log(u) / math.log1p(-self.p)) if self.p < 1 else 1

    def __call__(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        self.left -= 1
        if self.left:
            return
        self.left = self._gap()
        self.delays += 1
        if self.rng.random() < 0.5:
            _prims.sched_yield()
        else:
            _prims.spin_ns(int(self.rng.random() * self.spin_max_ns))


def torture_points(seed: int, proc: int, **kw) -> PointDelay:
    """Install a :class:`PointDelay` as this process' C preemption-point hook (torture workers)."""
    d = PointDelay(seed, proc, **kw)
    c_points(d)
    return d
