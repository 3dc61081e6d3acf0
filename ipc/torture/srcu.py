"""The srcu flavor of the rcutorture pipeline (``--kind srcu``): rcutorture's ``srcu_ops``.

Domain :class:`ipc.rcu.SrcuDomain` (the same mechanism in its own domain, field prefix ``srcu``,
like page track's ``track_srcu``); polled grace-period API as for rcu; readers delay as
``srcu_read_delay``: now and then they sleep inside the read-side critical section, which only
sleepable RCU allows, otherwise as ``rcu_read_delay``.
"""

from __future__ import annotations

from ipc.rcu import SrcuDomain
from ipc.torture.rcutorture import RcuTortureOps, has_polled_api
from ipc.torture.readdelay import srcu_read_delay_probs

srcu_ops = RcuTortureOps(
    name="srcu",
    domain=SrcuDomain,
    polled=has_polled_api(SrcuDomain),
    read_delay=srcu_read_delay_probs,
)
