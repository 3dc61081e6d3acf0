"""A vCPU's scripted commands (``run --scenario`` / ``scenario`` batches, ``explore`` programs):
``Vcpu.execute`` and its L1 store, a mixin of :class:`vcpu.vcpu.Vcpu` (its state: ``kvm``,
``design``, ``id``, ``l2``, ``in_l2``, load / put, the write path's ``l1_store``)."""

from __future__ import annotations

from ipc import _prims, fuzz, trace
from vm import layout as L
from vm import notifier
from vm.mirror import mirror_track
from vm.page_track import (
    PAGE_SHIFT,
    kvm_page_track_delete_slot,
    kvm_page_track_write_tracking_enable,
    record_walks,
    track_gfn,
    untrack_gfn,
)

L2_OPS = ("vmrun", "vmexit", "sleep", "read", "counters")  # scripted ops that leave L2 running


class ScriptedCommands:
    def store(self, gpa: int, data: bytes) -> int:
        """One scripted L1 store, as the free-running loop (:meth:`run`) makes it: inside the
        guest-mode section (which a remote TLB flush waits for), the fault check; a RAM gfn that is
        not write-tracked is stored through the writable mapping (-1), with the run's preemption
        point ``vcpu.track_check_to_store`` between the check and the store; any other store leaves
        guest mode (the fault is a VM exit) and goes down the write path's ``l1_store`` (fault,
        emulate, notifier walk: the calls)."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        if gfn < kvm.memory_pages:
            gm = kvm.guest_mode
            gm.read_lock()
            try:
                if not kvm.gfn_track_mv[gfn]:
                    fz = fuzz.ACTIVE
                    if fz:
                        fz.hit("vcpu.track_check_to_store")
                    self.raw_store(gpa, data)
                    return -1
            finally:
                gm.read_unlock()
        return self.l1_store(gpa, data)

    def execute(self, op: str, args: dict):
        """One scripted command; returns a msgpack-able value. Raises ValueError on bad args."""
        kvm, d = self.kvm, self.design
        if op not in L2_OPS and self.in_l2 and hasattr(d, "leave_l2"):
            d.leave_l2(self.id)  # L1 / host work: the vCPU is not in guest mode while it runs it
        if op == "vmrun":
            l2 = _int(args, "l2", 0, self.cfg.l2s - 1)
            self.load()
            if kvm.vm_dead:
                return {"l2": l2, "vm_dead": True}  # KVM_BUG_ON fired: the ioctl fails (-EIO)
            self.first_l2_entry()
            d.nested_vmrun(self.id, l2)
            self.l2, self.in_l2 = l2, True
            if trace.ACTIVE:  # L2 time spans the commands until the VMEXIT
                trace.ACTIVE.emit(trace.ACTIVE.pair("L2")[0], l2)
            self.n["vmrun"] += 1
            return {"l2": l2}
        if op == "vmexit":
            l2 = _int(args, "l2", 0, self.cfg.l2s - 1, default=self.l2)
            d.nested_vmexit(self.id, l2, bool(args.get("leaving", False)))
            if trace.ACTIVE and self.in_l2:
                trace.ACTIVE.emit(trace.ACTIVE.pair("L2")[1])
            self.in_l2 = False
            self.n["vmexit"] += 1
            return {"l2": l2}
        if op == "write":
            gpa = _int(args, "gpa", 0, (1 << 52) - 1)
            data = args.get("data")
            if isinstance(data, int):
                data = (data & ((1 << 64) - 1)).to_bytes(8, "little")
            if not isinstance(data, bytes | bytearray) or not 1 <= len(data) <= 4096:
                raise ValueError("write: data must be 1..4096 bytes or an int")
            if (gpa >> PAGE_SHIFT) < kvm.memory_pages and (gpa & 0xFFF) + len(data) > 4096:
                raise ValueError("write: data crosses a page boundary")
            if hasattr(d, "store_begin"):  # nested AVIC: a store to table entries is in flight
                d.store_begin(self.id, gpa, len(data))  # until this vCPU's next store or VMRUN (I2)
            with record_walks(kvm) as nodes:
                calls = self.store(gpa, bytes(data))
            return {"emulated": calls >= 0, "calls": max(calls, 0), "nodes": nodes}
        if op == "l1_write":  # the design's own tracked write (e.g. a physid entry)
            gpa, data = d.tracked_write(self.id, self.rng)
            calls = self.store(gpa, data)
            return {"gpa": gpa, "emulated": calls >= 0, "calls": max(calls, 0)}
        if op == "write_entry":  # L1 rewrites apic id / IsRunning of a physid entry (AVIC designs)
            if not hasattr(d, "entry_write"):
                raise ValueError(f"write_entry: design {self.cfg.design} has no physid tables")
            gpa, data = d.entry_write(_int(args, "l2", 0, self.cfg.l2s - 1), _int(args, "entry", 0, 511),
                                      _int(args, "apic", 0, 255), bool(args.get("running", False)), self.id)
            calls = self.store(gpa, data)
            return {"gpa": gpa, "emulated": calls >= 0, "calls": max(calls, 0)}
        if op == "read":
            gpa = _int(args, "gpa", 0, kvm.memory_pages * 4096 - 8)
            return kvm.guest_mem.load(gpa >> 3) if not gpa & 7 else None
        if op == "register":
            node = notifier.alloc_node(kvm, _int(args, "kind", 1, 1 << 16, default=1), _int(args, "owner", 0, 1 << 30, default=0))
            return {"node": node, "registered": notifier.kvm_page_track_register_notifier(kvm, node)}
        if op == "reregister":
            return notifier.kvm_page_track_register_notifier(kvm, _int(args, "node", 0, self.cfg.max_nodes - 1))
        if op == "unregister":
            node = _int(args, "node", 0, self.cfg.max_nodes - 1)
            ok = notifier.kvm_page_track_unregister_notifier(kvm, node)
            if args.get("free", True):
                notifier.free_node(kvm, node)
            return ok
        if op == "track":  # a tracking user starts tracking a page: the mirror's also copies it (as at setup)
            track = mirror_track if self.cfg.design == "mirror" else track_gfn
            return track(kvm, _int(args, "gfn", 0, kvm.memory_pages - 1))
        if op == "untrack":
            return untrack_gfn(kvm, _int(args, "gfn", 0, kvm.memory_pages - 1))
        if op == "churn":  # the free-running loop's notifier churn: register, unregister, free
            self.churn()
            return True
        if op == "delete_slot":  # a memslot goes away: every notifier's track_remove_region
            kvm_page_track_delete_slot(kvm, _int(args, "slot", 0, self.cfg.memslots - 1))
            return True
        if op == "enable_tracking":
            kvm_page_track_write_tracking_enable(kvm)
            return True
        if op == "load":
            self.load()
            return True
        if op == "put":
            self.put()
            return True
        if op == "sleep":
            _prims.spin_ns(self.cfg.dilated_ns(_int(args, "us", 0, 10_000_000) * 1000))
            return True
        if op == "counters":
            self.flush()
            return {name: int(v) for name, v in zip(L.COUNTERS, kvm.counters, strict=True)}
        raise ValueError(f"unknown command {op!r}")



def _int(args: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key}: expected an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{key}: {v} outside {lo}..{hi}")
    return v

