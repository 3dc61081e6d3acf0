"""The seed's "X registers, Y registers, X unregisters, kaboom", as scripted steps: the steps
(``kaboom_steps``: sent over ZeroMQ by ``launch.py scenario kaboom``, and ``explore kaboom``'s
per-vCPU programs, both executed by the vCPUs' scripted commands, vcpu/script.py), one step on a
design in this process (``apply_step``) and the whole scenario in one process (``run_kaboom``, for
``scenario kaboom --table``: no vCPU processes, so not the vCPU executor; vm/ cannot import vcpu/)."""

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
    away is what unregisters); with per-table nodes they share one L2's table. ``split`` registers at
    VM creation; its sequence is the ordering the split API permits: Y's nested VMRUN makes and uses a
    table before X (vCPU 0, the activation path) enables write tracking."""
    if registration not in REGISTRATIONS:
        raise UsageError(f"registration must be one of {', '.join(REGISTRATIONS)}")
    x, y = 0, 1
    lx, ly = (0, 0) if design_name == "per-table-notifier" else (0, 1)
    if registration == "split":  # registered at VM creation; Y uses a table before X activates tracking
        return [
            (y, "vmrun", {"l2": ly}),                              # Y: table in use, not write-protected
            (x, "vmrun", {"l2": lx}),                              # X: activation (tracking enabled)
            (y, "vmexit", {"l2": ly, "leaving": False}),
            (x, "vmexit", {"l2": lx, "leaving": True}),
            (y, "write_entry", {"l2": ly, "entry": y, "apic": x, "running": True}),  # L1 writes Y's table
            (y, "vmrun", {"l2": ly}),                              # Y VMRUNs: must see the write
            (y, "vmexit", {"l2": ly, "leaving": False}),
        ]
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
    if op not in ("vmrun", "vmexit"):
        d.leave_l2(v)  # L1 work: the vCPU is not in guest mode while it runs it
    if op == "vmrun":
        d.nested_vmrun(v, a["l2"])
        return f"vCPU {v}: nested VMRUN L2 {a['l2']}"
    if op == "vmexit":
        d.nested_vmexit(v, a["l2"], a.get("leaving", False))
        return f"vCPU {v}: nested VMEXIT L2 {a['l2']}{' (leaving: drops its table)' if a.get('leaving') else ''}"
    if op == "write_entry":
        kvm, cfg = d.kvm, d.cfg
        gfn = table_gfn(cfg, a["l2"])
        gpa, data = d.entry_write(a["l2"], a["entry"], a["apic"], bool(a.get("running")), v)
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
    step log, every WARN raised, and the oracle's findings. Expected: refcount, node-refcount ->
    SUCCESS; bool -> FAILURE (stale entry naming the lost write); naive -> FAILURE (redundant
    registration WARN; with ``redundant_registration = "mainline"`` the named notifier-list cycle);
    split -> FAILURE (the lost write the oracle sees; plus the untracked-notifier WARN with
    ``split_warn = "on"``)."""
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


# the table's rows: (registration, redundant_registration, split_warn); warn/mainline only where it matters
TABLE_ROWS = (("refcount", "warn", "on"), ("node-refcount", "warn", "on"), ("bool", "warn", "on"),
              ("naive", "warn", "on"), ("naive", "mainline", "on"), ("split", "warn", "on"),
              ("split", "warn", "off"))


def why(verdict: str, msgs: list[str]) -> str:
    """The kaboom's outcome in a few words: what made it fail, in the order of the checks below."""
    if verdict == "SUCCESS":
        return "SUCCESS"
    text = "\n".join(msgs)
    found = [words for needle, words in (
        ("notifier list cycle at node", "notifier list cycle (soft lockup)"),
        ("redundant registration of live", "redundant-registration WARN"),
        ("oracle: lost write", "lost write (oracle)"),
        ("KVM_BUG_ON: write tracking not enabled", "KVM_BUG_ON: write tracking not enabled, VM killed"),
        ("registered while write tracking is disabled", "untracked-notifier WARN")) if needle in text]
    return "FAILURE: " + " + ".join(found) if found else "FAILURE"


def verdict_table(seed: int = 1, fidelity: dict | None = None) -> str:
    """Every registration variant x design (x warn/mainline, x split WARN on/off) through
    ``run_kaboom`` in this process, on fresh VMs: a Markdown table (``scenario kaboom --table``)."""
    import os

    from vm.config import Config
    from vm.kvm import Kvm

    base = {k: v for k, v in (fidelity or {}).items() if k not in ("redundant_registration", "split_warn")}
    lines = ["| registration | " + " | ".join(AVIC_DESIGNS) + " |", "|---" * (len(AVIC_DESIGNS) + 1) + "|"]
    n = 0
    for reg, rr, sw in TABLE_ROWS:
        label = reg + (f" ({rr})" if reg == "naive" else f" (WARN {sw})" if reg == "split" else "")
        cells = []
        for design in AVIC_DESIGNS:
            n += 1
            cfg = Config(vcpus=2, design=design, registration=reg, redundant_registration=rr, split_warn=sw,
                         seed=seed, fuzz="off", **base)
            kvm = Kvm.create(cfg, f"kt{n}x{os.getpid()}")
            try:
                cells.append(why(*run_kaboom(kvm, cfg, reg)))
            finally:
                kvm.close()
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    pt = base.get("page_track", "v6.0")
    return "\n".join(lines) + f"\n\n(page_track {pt}; `python launch.py scenario kaboom --table`)"
