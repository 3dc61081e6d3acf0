"""The nested AVIC wing: shadow physical-APIC-ID tables kept in sync through page-track write
notifiers, in the three designs of the seed's debate, with the notifier-registration variants, the
oracle and the scripted "kaboom".

Where things are:
- ``table.py``        entry format, translation helpers, the ``avic`` shm region layout, constants
- ``base.py``         ``AvicDesign``: what every design shares (region, locks, setup, stats, teardown)
- ``pool.py``         the table pool: create / free, write-protect, sync / update / invalidate / drop
- ``guest.py``        nested VMRUN / VMEXIT, usecount, reload requests, IsRunning flips
- ``l1.py``           L1's stores to its tables (the workload's tracked writes, ``guest_write``)
- ``registration.py`` the registration variants of the shared notifier node
- ``notifiers.py``    the page-track notifier nodes (shared, per-table) and their dispatch
- ``oracle.py``       every check, as a list of invariants
- ``mutex_hash.py``   Maxim's design (RFC v3): VM mutex + gfn hash + one shared node
- ``rcu_list.py``     Sean's design: RCU list, spinlock + synchronize_rcu on first / last use only
- ``per_table.py``    one notifier node per table
- ``kaboom.py``       "X registers, Y registers, X unregisters, kaboom", scripted
- ``stress.py``       a multiprocess stress of one design (tests, benchmarks)

Designs register themselves in ``vm.nested.DESIGNS`` when this package is imported; the composition
roots (launch.py, the vCPU worker, tests, benchmarks) import it. Nothing in vm/ outside this package
imports it (tests/test_architecture.py): the wing hands the ``avic`` region's size to the VM through
``AvicDesign.region_layouts`` (the run's shm budget, ``Config.check_budget``).

Shadow entries are written only under the per-VM ``avic_physid_lock`` spinlock (which vCPU
load/put also take to flip IsRunning) with atomic 64-bit stores, so the "hardware" (the vCPU
running L2, the stale-entry check) reads whole entries without a lock. A ``track_write`` that
touches only the apic id / IsRunning bits of one valid entry updates that entry (re-reading the
guest entry, never trusting callback order); anything else invalidates the table and vCPUs in
guest mode on it get a reload request. More than nentries*1000 writes while unused (usecount 0)
drop the table (invalidated and un-write-protected until its next use).

Locks (outer to inner; asserted with ``lockdep_assert_held`` where a function needs one):
``tables_lock`` (mutex) -> ``avic_physid_lock`` (spin) -> ``mmu_lock`` (spin), and
``avic_tables_spin`` -> ``avic_physid_lock``. ``avic_notifier_lock`` (the wing's own mutex, in the
avic region) serializes the shared node's register/unregister; it is never taken under
``tables_lock`` / ``avic_tables_spin`` because unregister sleeps in ``synchronize_srcu`` while a
mutex-hash ``track_write`` walker may wait for ``tables_lock``. ``kvm_flush_remote_tlbs`` (a
``guest_mode`` grace period) is waited under ``tables_lock`` (mutex-hash, per-table-notifier), so
emulated writes must happen outside the guest-mode section (a VM exit); a notifier call that
arrives inside it is WARNed (``emulation_in_guest_mode``) and run outside. ``synchronize_rcu``
is never waited with a lock held.

Test hooks (``kvm.hooks``; launch.py ``HOOKS``). Bugs (a run with one should end in FAILURE):
``no-synchronize-rcu`` (rcu-list frees without a grace period); vm/notifier.py's
``no-synchronize-srcu`` makes per-table-notifier free a table under a walker; ``busted-lock``
(vm/kvm.py: locks that do not lock) trips the held-flag checks; ``flood-drop-race`` (erase.py: a
flood drop that does not kick the vCPUs in L2 on the table); vm/page_track.py's ``no-tlb-flush``
(write-protect without waiting for vCPUs in guest mode). Widenings, not bugs (a correct design still
ends in SUCCESS under them): ``avic-reader-delay`` (100 us inside rcu-list read-side sections) and
``avic-flood-often`` (flood drops after 2 unused writes, steered onto a vCPU entering L2).
"""

from vm.avic.base import AvicDesign
from vm.avic.kaboom import apply_step, kaboom_steps, run_kaboom
from vm.avic.l1 import MMIO_APIC_GPA, guest_write
from vm.avic.mutex_hash import MutexHashDesign
from vm.avic.notifiers import AVIC_SHARED_KIND, AVIC_TABLE_KIND
from vm.avic.per_table import PerTableNotifierDesign
from vm.avic.rcu_list import RcuListDesign
from vm.avic.table import AVIC_DESIGNS, REGISTRATIONS

__all__ = [
    "AVIC_DESIGNS", "REGISTRATIONS", "AVIC_SHARED_KIND", "AVIC_TABLE_KIND", "MMIO_APIC_GPA", "AvicDesign",
    "MutexHashDesign", "RcuListDesign", "PerTableNotifierDesign", "kaboom_steps", "apply_step",
    "run_kaboom", "guest_write",
]
