"""rcutorture- and locktorture-style stress tests of the shared-memory primitives.

``python launch.py torture {rcu,srcu,spinlock,mutex} --procs N --duration S [--inject ...]``;
from code: ``torture.run_torture(kind, procs, duration, ...)`` or ``torture.main(args)``.

Layout (like the kernel: kernel/torture.c + rcutorture.c with its ``rcu_ops``/``srcu_ops`` tables +
locktorture.c with its ``lock_torture_ops``):

- ``core``        the harness, flavor-blind: parameter checks, the shared segment, forkserver
                  workers, start barrier, stats loop, verdict, JSON, ``run_torture``, ``main``.
- ``base``        what every kind shares: control block words, start barrier, seeded delays, the
                  ``TortureType`` interface the harness drives.
- ``kinds``       the table of kinds (``TORTURE_TYPES``; ``KINDS``, ``INJECTS``): each RCU flavor's
                  ops on the rcutorture pipeline, each lock's ops on locktorture.
- ``rcutorture``  the rcutorture pipeline (writer, fake writers, readers, Reader Pipe / Batch,
                  Free-Block Circulation = the writer's pipe), flavor-blind: takes an
                  ``RcuTortureOps``. Pipe rule as the kernel: removal sets the pipe count to 1,
                  each grace period adds 1, a read at >= 2 fails.
- ``readdelay``   the readers' delays, rcutorture's ``rcu_read_delay`` / ``srcu_read_delay``
                  (seeded per reader).
- ``gpbugs``      grace periods with one bug each (``--inject gp-single-flip``,
                  ``gp-skip-alternate``, ``gp-share-early``): subclasses of the flavor's domain.
- ``rcu``, ``srcu`` the RCU flavors: ``rcu_ops``, ``srcu_ops``.
- ``locktorture`` the lock writers and their report; ``spin_lock_ops``, ``mutex_lock_ops``.

Imports point one way, toward ``base``: core -> kinds -> {rcu, srcu} -> rcutorture -> {base,
readdelay, gpbugs} and kinds -> locktorture -> base; only this file imports core.
"""

from ipc.torture.core import MAX_PROCS, SCHEMA, main, run_torture
from ipc.torture.kinds import INJECTS, KINDS, LOCK_KINDS, RCU_KINDS, TORTURE_TYPES
from ipc.torture.locktorture import LockTortureOps, mutex_lock_ops, spin_lock_ops
from ipc.torture.rcu import rcu_ops
from ipc.torture.rcutorture import NFAKEWRITERS, NPOOL, PIPE_LEN, PIPE_SLOTS, RcuTortureOps
from ipc.torture.srcu import srcu_ops

__all__ = [
    "INJECTS", "KINDS", "LOCK_KINDS", "MAX_PROCS", "NFAKEWRITERS", "NPOOL", "PIPE_LEN", "PIPE_SLOTS",
    "RCU_KINDS", "SCHEMA", "TORTURE_TYPES", "LockTortureOps", "RcuTortureOps", "main",
    "mutex_lock_ops", "rcu_ops", "run_torture", "spin_lock_ops", "srcu_ops",
]
