"""The srcu flavor of the rcutorture pipeline (``--kind srcu``): rcutorture's ``srcu_ops``.

Domain :class:`ipc.rcu.SrcuDomain` (the same mechanism in its own domain, field prefix ``srcu``,
like page track's ``track_srcu``); polled grace-period API as for rcu; a reader holding an element
for a long delay sleeps, which only sleepable RCU allows (rcutorture's ``srcu_read_delay``).
"""

from __future__ import annotations

import time

from ipc.rcu import SrcuDomain
from ipc.torture.rcutorture import RcuTortureOps, has_polled_api


def sleep_ns(ns: int) -> None:
    """An SRCU reader's long hold: sleep inside the read-side critical section."""
    time.sleep(ns * 1e-9)


srcu_ops = RcuTortureOps(
    name="srcu",
    domain=SrcuDomain,
    polled=has_polled_api(SrcuDomain),
    long_delay=sleep_ns,
)
