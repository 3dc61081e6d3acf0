"""The rcu flavor of the rcutorture pipeline (``--kind rcu``): rcutorture's ``rcu_ops``.

Domain :class:`ipc.rcu.RcuDomain` (liburcu-memb-like, field prefix ``rcu``); the polled
grace-period API is there, so the writer also retires through get_state + cond_synchronize /
poll_state; a reader holding an element for a long delay spins (an RCU reader may not sleep).
"""

from __future__ import annotations

from ipc import _prims
from ipc.rcu import RcuDomain
from ipc.torture.rcutorture import RcuTortureOps, has_polled_api

rcu_ops = RcuTortureOps(
    name="rcu",
    domain=RcuDomain,
    polled=has_polled_api(RcuDomain),
    long_delay=_prims.spin_ns,
)
