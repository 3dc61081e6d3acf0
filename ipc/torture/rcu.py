"""The rcu flavor of the rcutorture pipeline (``--kind rcu``): rcutorture's ``rcu_ops``.

Domain :class:`ipc.rcu.RcuDomain` (liburcu-memb-like, field prefix ``rcu``); the polled
grace-period API is there, so the writer also retires through get_state + cond_synchronize /
poll_state; readers delay as ``rcu_read_delay`` (busy waits and preemption: an RCU reader may not
sleep).
"""

from __future__ import annotations

from ipc.rcu import RcuDomain
from ipc.torture.rcutorture import RcuTortureOps, has_polled_api
from ipc.torture.readdelay import rcu_read_delay_probs

rcu_ops = RcuTortureOps(
    name="rcu",
    domain=RcuDomain,
    polled=has_polled_api(RcuDomain),
    read_delay=rcu_read_delay_probs,
)
