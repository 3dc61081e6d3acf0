"""The seed's "X registers, Y registers, X unregisters, kaboom", as scripted steps: the steps
(``kaboom_steps``, also sent over ZeroMQ by ``launch.py scenario kaboom``), one step on a design
(``apply_step``) and the whole scenario in one process (``run_kaboom``)."""

from __future__ import annotations

import msgspec

from ipc.errors import UsageError
from vm.avic.base import AvicDesign
from vm.avic.l1 import guest_write
from vm.avic.table import (
    AVIC_DESIGNS,
    REGISTRATIONS,
)
from vm.nested import DESIGNS, table_gfn


def kaboom_steps(registration: str, design_name: str = "mutex-hash") -> list[tuple[int, str, dict]]:
    """The seed's sequence as (vcpu, op, args): X registers, Y registers, X unregisters, L1 (vCPU
    Y) writes Y's table, Y VMRUNs. With one shared node X and Y use different L2s (X's table going
    away is what unregisters); with per-table nodes they share one L2's table."""
    if registration not in REGISTRATIONS:
        raise UsageError(f"registration must be one of {', '.join(REGISTRATIONS)}")
    x, y = 0, 1
    lx, ly = (0, 0) if design_name == "per-table-notifier" else (0, 1)
    return [
        (x, "vmrun", {"l2": lx}),                                  # X registers
        (y, "vmrun", {"l2": ly}),                                  # Y registers
        (y, "vmexit", {"l2": ly, "leaving": False}),
        (x, "vmexit", {"l2": lx, "leaving": True}),                # X unregisters
        (y, "write_entry", {"l2": ly, "entry": y, "apic": x, "running": True}),  # L1 writes Y's table
        (y, "vmrun", {"l2": ly}),                                  # Y VMRUNs: must see the write
        (y, "vmexit", {"l2": ly, "leaving": False}),
    ]


def apply_step(d: AvicDesign, step: tuple[int, str, dict]) -> str:
    """Run one scripted step on design ``d``; returns a one-line log entry."""
    v, op, a = step
    if op == "vmrun":
        d.nested_vmrun(v, a["l2"])
        return f"vCPU {v}: nested VMRUN L2 {a['l2']}"
    if op == "vmexit":
        d.nested_vmexit(v, a["l2"], a.get("leaving", False))
        return f"vCPU {v}: nested VMEXIT L2 {a['l2']}{' (leaving: drops its table)' if a.get('leaving') else ''}"
    if op == "write_entry":
        kvm, cfg = d.kvm, d.cfg
        gfn = table_gfn(cfg, a["l2"])
        gpa, data = d.entry_write(a["l2"], a["entry"], a["apic"], bool(a.get("running")))
        new = int.from_bytes(data, "little")
        emulated = guest_write(kvm, gpa, data)
        return (f"vCPU {v} (L1): write gpa {gpa:#x} (table gfn {gfn:#x} entry {a['entry']}) = {new:#018x}"
                f" [{'emulated' if emulated else 'NOT emulated: gfn not write-tracked'}]")
    if op == "load":
        d.vcpu_load(v)
        return f"vCPU {v}: load"
    if op == "put":
        d.vcpu_put(v)
        return f"vCPU {v}: put"
    raise UsageError(f"unknown kaboom step op {op!r}")


def run_kaboom(kvm, cfg, registration: str, design_name: str | None = None) -> tuple[str, list[str]]:
    """Run the seed's kaboom in this process (vCPU 0 = X, vCPU 1 = Y) on a fresh VM ``kvm`` (made
    by ``Kvm.create`` with ``cfg``, vcpus >= 2). Returns ("SUCCESS" | "FAILURE", messages): the
    step log, every WARN raised, and the oracle's findings. Expected: refcount -> SUCCESS, bool ->
    FAILURE (stale entry naming the lost write), naive -> FAILURE (redundant registration WARN),
    split -> FAILURE (WARN naming the untracked notifier)."""
    name = design_name or (cfg.design if cfg.design in AVIC_DESIGNS else "mutex-hash")
    if name not in AVIC_DESIGNS:
        raise UsageError(f"kaboom: design must be one of {', '.join(AVIC_DESIGNS)}")
    if cfg.vcpus < 2:
        raise UsageError("kaboom needs vcpus >= 2 (X and Y)")
    cfg2 = msgspec.structs.replace(cfg, design=name, registration=registration)
    steps = kaboom_steps(registration, name)
    ev0, w0 = len(kvm.events), kvm.warns
    d = DESIGNS[name](kvm, cfg2)
    log = [f"kaboom: design {name}, registration {registration}"]
    try:
        d.setup()
        for v in (0, 1):
            d.vcpu_init(v)
            d.vcpu_load(v)
        for step in steps:
            log.append(apply_step(d, step))
        for v in (0, 1):
            d.vcpu_put(v)
        found = d.oracle()
    finally:
        try:
            d.teardown()
        finally:
            d.close()
    warns = [msg for _, msg, _ in kvm.events[ev0:]]
    failed = bool(found or warns or kvm.warns != w0)
    verdict = "FAILURE" if failed else "SUCCESS"
    return verdict, log + warns + [f"oracle: {f}" for f in found] + [f"kaboom: {verdict}"]
