"""Named workload points (Config keys), and where their rates come from.

``realistic`` — the default of ``launch.py compare`` and of a bare ``launch.py run``. What L1 (a KVM
running nested AVIC guests) does between two nested VMRUNs of one vCPU:

- **table writes per nested VMRUN: 0.02.** L1 writes an entry of its physical APIC ID table when its
  own vCPU scheduling changes it: ``avic_vcpu_load`` / ``avic_vcpu_put`` (arch/x86/kvm/svm/avic.c) set
  and clear IsRunning + the host APIC id when L1 schedules the L2 vCPU thread in / out, and
  ``avic_vcpu_blocking`` / ``unblocking`` do the same around a halt; APIC ID changes (L2 writing its
  APIC ID) happen at boot. That is about two writes per L1 context switch of an L2 vCPU, and an L1
  vCPU runs many nested VMRUNs per context switch (KVM_RUN loops on VMRUN until a userspace exit,
  a signal or a reschedule). We take one L1 context switch per ~100 nested VMRUNs: 0.02. An L2 that
  halts at every exit (an idle IPI ping-pong) reaches ~2 — the top of the map's axis, and the
  ``heavy`` point.
- **table writes that erase the table: 0.1 % (``table_invalidate_fraction``, both points).** RFC v3
  erases a table only when a write changes more than apic id / IsRunning (15/19: the guest "does
  something suspicious"). In L1's KVM the backing page and Valid bit of an entry are written by
  ``avic_init_backing_page`` when a vCPU is created and cleared when it goes away; every other write
  is ``avic_vcpu_load`` / ``put`` / ``blocking`` flipping IsRunning and the host APIC id. So in a
  steady state the share is 0; 0.1 % (an L2 vCPU created or destroyed per ~1,000 L1 context switches
  of L2 vCPUs) is a generous upper estimate that keeps the erase path exercised. (Before issue 18 it
  was 20 %.)
- **switch rate: 0.01.** L1 switches vmcs12 (and so avic_physical_id) on a vCPU when its scheduler
  moves to another L2's vCPU thread: the same L1 context switches, ~1 per 100 exits.
- **MMIO writes: none.** In x86.c an MMIO write never walks the page-track notifiers (issue 11,
  item 1); it costs every design alike and is left out so the map isolates table writes.
- guest time 20 µs per VMRUN (an exit-heavy L2; an idle one exits less, which only lowers every
  rate here), 8 L1 stores per exit, L1 preempted by L0 at 1 % of exits — the Config defaults.

These are estimates from the code paths named above, not measurements of a real L1; the map
(``compare --map``) shows how the verdict moves when they are off by 100× either way.

``heavy`` — the point ``compare`` judged before: 8 L1 writes per exit, a quarter of them to the
tables (2 table writes per nested VMRUN), 10 % MMIO. It equals the Config defaults.
"""

from __future__ import annotations

from typing import Any

WORKLOADS: dict[str, dict[str, Any]] = {
    "realistic": {"table_writes_per_vmrun": 0.02, "switch_rate": 0.01, "mmio_fraction": 0.0,
                  "writes_per_exit": 8, "guest_time_us": 20.0},
    "heavy": {"tracked_fraction": 0.25, "switch_rate": 0.1, "mmio_fraction": 0.1, "writes_per_exit": 8,
              "guest_time_us": 20.0},
}
NAMES = tuple(WORKLOADS)
#: what a bare ``launch.py run`` shows a newcomer: a nested AVIC design with lock traffic
NEWCOMER = {"design": "mutex-hash", "vcpus": 2, "duration": 2.0}


def workload(name: str) -> dict[str, Any]:
    return dict(WORKLOADS[name])
