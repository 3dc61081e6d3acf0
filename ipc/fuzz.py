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
"""

from __future__ import annotations

import random
import time

from ipc import _prims

LEVELS = ("off", "light", "heavy")
# level -> (probability of a delay at a point, longest spin ns, share of sleeps among delays)
_PARAMS = {"light": (1 / 50, 50_000, 0.02), "heavy": (1 / 8, 50_000, 0.05)}
SLEEP_MAX_S = 0.001

ACTIVE: Fuzz | None = None


class Fuzz:
    controlled = False  # ipc/sched.py's Client, which takes this role under control, is True

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
        return  # a scheduled process (ipc/sched.py): its points belong to the scheduler
    ACTIVE = None if level == "off" else Fuzz(level, seed, proc, dilate)


def point(name: str) -> None:
    """A named preemption point (call it as ``if fuzz.ACTIVE: fuzz.point(name)``)."""
    f = ACTIVE
    if f is not None:
        f.hit(name)


def hits() -> dict[str, int]:
    """How often each point was reached in this process since ``configure`` (empty when off)."""
    return dict(ACTIVE.counts) if ACTIVE is not None else {}
