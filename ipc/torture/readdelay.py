"""Delays inside the readers' critical sections: rcutorture's ``rcu_read_delay`` / ``srcu_read_delay``.

The kernel (kernel/rcu/rcutorture.c) draws, on every read, between the ``rtort_mbtest`` check and
the read of ``rtort_pipe_count``:

- ``rcu_read_delay`` -- with probability ``1 / (nrealreaders * 2000 * longdelay_ms)`` a long busy
  wait ``mdelay(longdelay_ms)`` (300 ms; "to trigger force_quiescent_state"); with probability
  ``1 / (nrealreaders * 2 * shortdelay_us)`` a short busy wait ``udelay(shortdelay_us)`` (200 us;
  "to make a reader delay the grace period"); with probability ``1 / (nrealreaders * 500)`` a
  preemption inside the reader (``torture_preempt_schedule``).
- ``srcu_read_delay`` -- with probability ``1 / (nrealreaders * 2 * longdelay * uspertick)`` the
  reader sleeps ``longdelay`` jiffies (10 jiffies, HZ = 1000: 10 ms; only sleepable RCU allows
  it), otherwise it does ``rcu_read_delay``.

Dividing by ``nrealreaders`` keeps the rate of delayed reads of the whole test independent of the
number of readers. Here the same constants and probabilities apply per read; a busy wait is
``_prims.spin_ns``, a preemption ``sched_yield`` and a sleep ``time.sleep``. The kernel draws a
random number per read and per kind; :class:`ReadDelay` draws instead, per kind, the geometric
gaps between two delayed reads (the same distribution), so that the reader's hot loop costs one
integer comparison per read (``n == rd.next``). Every stream is seeded by (run seed, reader index,
kind) and indexed by the reader's read count: a run's delay plan is reproducible and does not
depend on timing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from ipc import _prims

SHORTDELAY_US = 200  # rcu_read_delay: udelay(shortdelay_us)
LONGDELAY_MS = 300  # rcu_read_delay: mdelay(longdelay_ms)
PREEMPT_DIV = 500  # rcu_read_delay: torture_preempt_schedule() once in nrealreaders * 500 reads
SRCU_LONGDELAY = 10  # srcu_read_delay: schedule_timeout_interruptible(longdelay) jiffies
HZ = 1000
USPERTICK = 1_000_000 // HZ

# delay kinds (also the order of the per-reader counters)
D_SHORT, D_LONG, D_PREEMPT, D_SLEEP = range(4)
D_NAMES = ("short", "long", "preempt", "sleep")
_CHUNK = 1024
_NEVER = 1 << 62


def rcu_read_delay_probs(nreaders: int) -> dict[int, float]:
    """Per-read probability of each delay of ``rcu_read_delay``."""
    return {
        D_LONG: 1.0 / (nreaders * 2000 * LONGDELAY_MS),
        D_SHORT: 1.0 / (nreaders * 2 * SHORTDELAY_US),
        D_PREEMPT: 1.0 / (nreaders * PREEMPT_DIV),
    }


def srcu_read_delay_probs(nreaders: int) -> dict[int, float]:
    """Per-read probability of each delay of ``srcu_read_delay`` (a sleep, or else rcu_read_delay)."""
    return {D_SLEEP: 1.0 / (nreaders * 2 * SRCU_LONGDELAY * USPERTICK), **rcu_read_delay_probs(nreaders)}


class ReadDelay:
    """One reader's seeded delay plan. ``next`` is the read count of the next delayed read; the
    reader calls ``run(n)`` when its read count ``n`` reaches it (inside the critical section),
    which delays and returns the new ``next``. ``counts[k]`` counts the delays of kind ``k``."""

    def __init__(self, probs: dict[int, float], seed: int, reader: int,
                 spin: Callable[[int], None] = _prims.spin_ns,
                 sleep: Callable[[float], None] = time.sleep,
                 preempt: Callable[[], None] = os.sched_yield):
        self._rngs = {k: np.random.default_rng([seed, 1, reader, k]) for k in probs}
        self._probs = probs
        self._gaps: dict[int, list[int]] = {k: [] for k in probs}
        self._at = {k: self._gap(k) - 1 for k in probs}  # read count of each kind's next delay
        self.counts = [0] * len(D_NAMES)
        self._spin, self._sleep, self._preempt = spin, sleep, preempt
        self.next = min(self._at.values(), default=_NEVER)

    def _gap(self, k: int) -> int:
        g = self._gaps[k]
        if not g:
            g.extend(self._rngs[k].geometric(self._probs[k], _CHUNK)[::-1].tolist())
        return g.pop()

    def due(self, n: int) -> list[int]:
        """The kinds of delay of read ``n`` (advances the plan; no delay happens)."""
        kinds = [k for k, at in self._at.items() if at == n]
        for k in kinds:
            self._at[k] = n + self._gap(k)
        self.next = min(self._at.values())
        return kinds

    def run(self, n: int) -> int:
        kinds = self.due(n)
        if D_SLEEP in kinds:  # srcu_read_delay: the sleep replaces rcu_read_delay for this read
            kinds = [D_SLEEP]
        for k in kinds:
            self.counts[k] += 1
            if k == D_LONG:
                self._spin(LONGDELAY_MS * 1_000_000)
            elif k == D_SHORT:
                self._spin(SHORTDELAY_US * 1_000)
            elif k == D_PREEMPT:
                self._preempt()
            else:
                self._sleep(SRCU_LONGDELAY * USPERTICK * 1e-6)
        return self.next
