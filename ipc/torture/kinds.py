"""The table of torture kinds (rcutorture's ``torture_ops[]``, locktorture's ``torture_ops[]``).

One entry per ``--kind``, in the order the CLI lists them: the rcutorture pipeline on each RCU
flavor's ops, locktorture on each lock's ops. Adding a flavor = an ops module + a line here; the
harness (``core``) only ever reads this table.
"""

from __future__ import annotations

from ipc.torture.base import TortureType
from ipc.torture.locktorture import LockTorture, mutex_lock_ops, spin_lock_ops
from ipc.torture.rcu import rcu_ops
from ipc.torture.rcureport import RcuTorture
from ipc.torture.srcu import srcu_ops

RCU_TYPES = (RcuTorture(rcu_ops), RcuTorture(srcu_ops))
LOCK_TYPES = (LockTorture(spin_lock_ops), LockTorture(mutex_lock_ops))
TORTURE_TYPES: dict[str, TortureType] = {t.name: t for t in (*RCU_TYPES, *LOCK_TYPES)}

KINDS = tuple(TORTURE_TYPES)
RCU_KINDS = tuple(t.name for t in RCU_TYPES)
LOCK_KINDS = {t.name: t.ops.lock for t in LOCK_TYPES}
# --inject fault -> the kinds it applies to
INJECTS: dict[str, tuple[str, ...]] = {}
for _t in TORTURE_TYPES.values():
    for _i in _t.injects:
        INJECTS[_i] = (*INJECTS.get(_i, ()), _t.name)
del _t, _i
