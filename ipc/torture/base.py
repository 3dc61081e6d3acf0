"""What every torture type shares, and the interface the harness (``core``) drives.

The run's one segment ``pts_<run>_torture`` always starts with the control block ``ctl`` (8 words:
``CTL_GO``, ``CTL_STOP``, ``CTL_READY``, ``CTL_START``); a torture type declares the fields after
it. Every worker counts itself in at ``CTL_READY`` and sleeps on ``CTL_GO`` (:func:`wait_for_go`),
then runs until ``CTL_STOP``. Delay patterns are precomputed per process from the run seed
(:func:`rng`, ``DELAY_TABLE`` entries, cycled), so a run is reproducible.

:class:`TortureType` is the table entry of one ``--kind`` (like rcutorture's ``torture_ops[]`` and
locktorture's ``lock_torture_ops``): ``rcureport.RcuTorture(ops)`` for rcu/srcu,
``locktorture.LockTorture(ops)`` for spinlock/mutex. The harness knows nothing else about a kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROW = 16  # words per histogram row (two cache lines)
DELAY_TABLE = 8192  # per-process precomputed (seeded) delay pattern, cycled
STALL_NS = 1_000_000_000
FLUSH_NS = 2_000_000  # writers publish their counters at least this often

# control block words
CTL_GO, CTL_STOP, CTL_READY, CTL_START = 0, 1, 2, 3


def rng(seed: int, role: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, role, index])


def wait_for_go(mem, ctl_w: int) -> None:
    mem.fetch_add(ctl_w + CTL_READY, 1)
    while not mem.load(ctl_w + CTL_GO):
        mem.futex_wait(ctl_w + CTL_GO, 0, 20_000_000)


def lock_stat_line(tag: str, cls: str, st: dict) -> str:
    return (f"{tag}: lock_stat {cls}: acquisitions={st['acquisitions']} contentions={st['contentions']} "
            f"wait avg/max={st['wait_ns_avg']}/{st['wait_ns_max']} ns "
            f"hold avg/max={st['hold_ns_avg']}/{st['hold_ns_max']} ns")


class TortureType:
    """One ``--kind`` of torture test. ``name`` is the kind (``torture_type=``), ``injects`` the
    ``--inject`` faults it supports; subclasses fill in the hooks below."""

    name: str
    injects: tuple[str, ...]

    def check_inject(self, procs: int, inject: str) -> None:
        """Extra parameter checks once ``inject`` is known to apply (raise ``UsageError``)."""

    def params(self, procs: int, nfakewriters: int) -> dict[str, Any]:
        """The kind's own entries of the run's cfg (echoed in the JSON ``params``)."""
        raise NotImplementedError

    def who(self, cfg: dict) -> str:
        """Who takes part, for the start / end lines (``nreaders=… nfakewriters=…``)."""
        raise NotImplementedError

    def fields(self, cfg: dict) -> list:
        """Segment fields after the control block ``ctl``."""
        raise NotImplementedError

    def init(self, region, cfg: dict) -> None:
        """Owner-side initialisation of a fresh (zeroed) segment."""

    def workers(self, cfg: dict) -> list[tuple[str, str, int]]:
        """(name, role, index) of every process of the run."""
        raise NotImplementedError

    def run(self, role: str, region, cfg: dict, index: int) -> None:
        """The body of one worker process (in the forkserver child, segment attached)."""
        raise NotImplementedError

    def interval(self, region, cfg: dict, tag: str, emit, warnings: list[str], t_s: float,
                 intervals: list[dict]) -> dict:
        """Print the periodic stats; return this interval's JSON entry (``intervals`` = the
        earlier ones)."""
        raise NotImplementedError

    def report(self, region, cfg: dict, started: bool, elapsed: float, reasons: list[str],
               warnings: list[str], tag: str, emit) -> dict:
        """Final stats lines; append FAILURE ``reasons`` / ``warnings``; return the JSON entries
        counts, rates, histograms, per_process, lock_stat."""
        raise NotImplementedError

