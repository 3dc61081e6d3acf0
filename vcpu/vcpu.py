"""A vCPU: the seeded free-running workload and the scripted commands, on shared memory.

Free-running loop (one iteration):
1. L1 runs (inside the ``guest_mode`` read-side section, which is what a remote TLB flush waits
   for): ``writes_per_exit`` guest stores — to ordinary memory (fast path: a direct store, unless
   the gfn is write-tracked), to the design's tracked pages (fault → emulate → notifier walk) or
   to MMIO (emulate → notifier walk). An emulated write leaves guest mode first, like a VM exit.
2. nested VMRUN into the current L2 (the design's AVIC get/attach), the L2 runs for
   ``guest_time_us`` (busy), VMEXIT; with the selection policy L1 may switch to another L2.
3. now and then L1's vCPU is preempted (``vcpu_put`` / ``vcpu_load``).
Counters are kept in Python ints and flushed to this vCPU's shm block at every tick; nothing is
sent over ZeroMQ per operation.
"""

from __future__ import annotations

import random

from ipc import _prims, fuzz, trace, vtime
from vcpu.script import L2_OPS, ScriptedCommands  # noqa: F401  (L2_OPS: re-exported)
from vm import layout as L
from vm import mmu, notifier
from vm.mirror import MIRROR_KIND
from vm.nested import untracked_range
from vm.page_track import (
    PAGE_SHIFT,
    write_path,
)

MMIO_BASE = 0xFEE00000  # the local APIC page: outside every memslot
LOOP_COUNTERS = ("vmrun", "vmexit", "l2_switch", "write_tracked", "write_mmio", "write_untracked",
                 "iterations", "kick_reentry")
KICK_POLL_NS = 5_000  # an L2 run looks for a reload request's kick this often (the IPI's latency)


def vcpu_seed(seed: int, vcpu: int) -> int:
    """Each vCPU's workload stream derives from the one run seed."""
    return (seed * 0x9E3779B97F4A7C15 + vcpu * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)


class Vcpu(ScriptedCommands):
    def __init__(self, kvm, design, vcpu: int):
        self.kvm = kvm
        self.design = design
        self.id = vcpu
        self.cfg = cfg = kvm.cfg
        self.rng = random.Random(vcpu_seed(cfg.seed, vcpu))
        self.l2 = vcpu % cfg.l2s
        self.in_l2 = False
        self.l2_entered = False  # its nested NPT shadow pages exist (kvm_mmu_account_nested)
        self.loaded = False
        self.n = dict.fromkeys(LOOP_COUNTERS, 0)
        self.lane = (vcpu % 512) * 8
        self.raw_store = kvm.guest_mem.write  # a store through the guest's writable mapping
        # emulator_write_phys, and a guest store by L1 outside guest mode bookkeeping (MMIO or
        # write-protected: fault, emulate, returns the notifier calls; else a plain store, -1),
        # bound to this process' VM (vm/page_track.py)
        self.emulate, _, self.l1_store = write_path(kvm)

    def first_l2_entry(self) -> None:
        """The vCPU's first nested VMRUN builds its nested NPT: indirect shadow pages (vm/mmu.py)."""
        if not self.l2_entered:
            self.l2_entered = True
            mmu.kvm_mmu_account_nested(self.kvm)

    def load(self) -> None:
        if not self.loaded:
            self.design.vcpu_load(self.id)
            self.loaded = True

    def put(self) -> None:
        if self.loaded:
            self.design.vcpu_put(self.id)
            self.loaded = False

    # -- free-running --------------------------------------------------------------------------
    def run(self, deadline_ns: int, tick, tick_ns: int) -> None:
        """Run until the coordinator sets RUN_STOP or ``deadline_ns``; ``tick()`` every ``tick_ns``."""
        kvm, cfg, d, vid = self.kvm, self.cfg, self.design, self.id
        rng = self.rng
        rnd, bits = rng.random, rng.getrandbits
        gm = kvm.guest_mode
        gm_lock, gm_unlock = gm.read_lock, gm.read_unlock
        emulate = self.emulate
        track_mv = kvm.gfn_track_mv
        gstore = kvm.guest_mem.store
        load = kvm.mem.load
        state_w = kvm.flags_w + L.F_RUN_STATE
        now, spin, clock = _prims.now_ns, _prims.spin_ns, _prims.stats_clock
        h_vmrun = kvm.hist["nested_vmrun"]  # sampled latency: 1 VMRUN in ~cfg.latency_sample timed
        v_left = h_vmrun.start() if h_vmrun is not None else 0  # VMRUNs to go, the last one timed
        sample_vmrun = h_vmrun.sample if h_vmrun is not None else None
        p_tr = cfg.tracked_fraction
        p_mmio = p_tr + cfg.mmio_fraction
        ulo, uhi = untracked_range(cfg)
        span = max(0, uhi - ulo)
        lane_w = self.lane >> 3
        writes = cfg.writes_per_exit
        guest_ns = cfg.guest_ns  # dilated (vm/config.py)
        policy, K, p_switch, p_preempt = cfg.policy, cfg.l2s, cfg.switch_rate, cfg.preempt_rate
        p_churn = cfg.churn_rate
        n = self.n
        fz = fuzz.ACTIVE  # race widening (ipc/fuzz.py), configured when this process' Kvm was made
        tr = trace.ACTIVE  # trace ring (vm/tracepoints.py), likewise; None = no emission
        emit = tr.emit if tr else None
        (R_B, R_E), (G_B, G_E), (X_B, X_E) = ((tr.pair("nested_vmrun"), tr.pair("L2"), tr.pair("nested_vmexit"))
                                              if tr else ((0, 0),) * 3)
        PF = tr.instant("page_fault") if tr else 0
        n_unt = n_tr = n_mmio = n_run = n_sw = iters = n_kick = 0
        take_kick = getattr(d, "take_kick", None)  # nested AVIC: reload requests kick L2
        # real time polls for the kick; virtual time runs L2 at once, a kick (IPI) ends it (ipc/vtime.py)
        kick_poll, l2_run = (KICK_POLL_NS, spin) if vtime.ACTIVE is None else (guest_ns, vtime.ACTIVE.l2_time)
        l2 = self.l2
        next_tick = now() + tick_ns
        self.load()
        self.first_l2_entry()
        dead_w = kvm.flags_w + L.F_VM_BUGGED
        try:
            while True:
                if load(dead_w):  # KVM_BUG_ON: the VM is dead, no vCPU enters the guest again
                    break
                # 1. L1 runs: guest stores
                gm_lock()
                for _ in range(writes):
                    r = rnd()
                    if r >= p_mmio:
                        if not span:
                            continue
                        gfn = ulo + int(rnd() * span)
                        if track_mv[gfn]:
                            gm_unlock()
                            if emit:
                                emit(PF, gfn << PAGE_SHIFT)
                            emulate((gfn << PAGE_SHIFT) + self.lane, bits(64).to_bytes(8, "little"))
                            gm_lock()
                        else:
                            if fz:
                                fz.hit("vcpu.track_check_to_store")
                            gstore((gfn << 9) + lane_w, bits(63))
                        n_unt += 1
                    elif r < p_tr:
                        gpa, data = d.tracked_write(vid, rng)
                        if track_mv[gpa >> PAGE_SHIFT]:
                            gm_unlock()
                            if emit:
                                emit(PF, gpa)
                            emulate(gpa, data)
                            gm_lock()
                        else:  # not (yet / any more) tracked: a plain store, still in guest mode,
                            # so a concurrent track + TLB flush waits for it
                            if fz:
                                fz.hit("vcpu.track_check_to_store")
                            self.raw_store(gpa, data)
                        n_tr += 1
                    else:
                        gm_unlock()
                        emulate(MMIO_BASE + self.lane, bits(32).to_bytes(4, "little"))
                        gm_lock()
                        n_mmio += 1
                gm_unlock()
                # 2. nested VMRUN / L2 runs / VMEXIT
                t0 = 0
                if v_left:
                    if v_left == 1:
                        t0 = clock()
                    else:
                        v_left -= 1
                if emit:
                    emit(R_B, l2, vid)
                d.nested_vmrun(vid, l2)
                if t0:
                    v_left = sample_vmrun(t0)
                if emit:
                    emit(R_E)
                    emit(G_B, l2)
                n_run += 1
                if guest_ns:
                    if take_kick is None:
                        spin(guest_ns)
                    else:  # L2 runs; a reload request's kick (an IPI) makes it exit, and KVM serves
                        end = now() + guest_ns  # the request and re-enters
                        while True:
                            if take_kick(vid, l2):
                                n_kick += 1
                            left = end - now()
                            if left <= 0:
                                break
                            l2_run(left if left < kick_poll else kick_poll)
                if emit:
                    emit(G_E)
                if policy == "round-robin":
                    nxt = (l2 + 1) % K
                elif policy == "random" and K > 1 and rnd() < p_switch:
                    nxt = (l2 + 1 + int(rnd() * (K - 1))) % K
                else:
                    nxt = l2
                if emit:
                    emit(X_B, l2, nxt != l2)
                # the table stays referenced: the next nested VMRUN sees the new L2's physid gfn and
                # switches there (RFC v3 13/19 nested_vmcb02_prepare_avic: put, then get)
                d.nested_vmexit(vid, l2, False)
                if emit:
                    emit(X_E)
                if nxt != l2:
                    n_sw += 1
                    l2 = nxt
                # notifier churn: another page-track user comes and goes
                if p_churn and rnd() < p_churn:
                    self.churn()
                # 3. L1 preempted now and then
                if p_preempt and rnd() < p_preempt:
                    self.put()
                    self.load()
                iters += 1
                t = now()
                if t >= next_tick or t >= deadline_ns or load(state_w) == L.RUN_STOP:
                    n["write_untracked"], n["write_tracked"], n["write_mmio"] = n_unt, n_tr, n_mmio
                    n["vmrun"] = n["vmexit"] = n_run
                    n["l2_switch"], n["iterations"], n["kick_reentry"] = n_sw, iters, n_kick
                    if h_vmrun is not None:
                        h_vmrun.settle(v_left)  # the VMRUNs since the last sample: counted
                    self.flush()
                    if t >= deadline_ns or load(state_w) == L.RUN_STOP:
                        break
                    tick()
                    next_tick = now() + tick_ns
        finally:
            if h_vmrun is not None:
                h_vmrun.settle(v_left)
            self.l2 = l2
            self.put()
            self.flush()

    def churn(self) -> None:
        """Register a mirror notifier, then unregister (synchronize_srcu) and free it: readers walking
        the list meanwhile must never meet the freed, poisoned node."""
        kvm = self.kvm
        try:
            node = notifier.alloc_node(kvm, MIRROR_KIND, self.id)
        except RuntimeError:
            return
        notifier.kvm_page_track_register_notifier(kvm, node)
        notifier.kvm_page_track_unregister_notifier(kvm, node)
        notifier.free_node(kvm, node)
        self.n["churn"] = self.n.get("churn", 0) + 1

    def flush(self) -> None:
        """Publish the loop counters into this vCPU's shm block."""
        c = self.kvm.counters
        for name in LOOP_COUNTERS:
            c[L.C[name]] = self.n[name]
        self.kvm.flush_counts()

    def ops(self) -> int:
        n = self.n
        return n["vmrun"] + n["write_untracked"] + n["write_tracked"] + n["write_mmio"]


def serve_kick(v: Vcpu) -> bool:
    """Scripted mode, idle between commands while in L2: take a reload request's kick (exit, serve
    the request, re-enter the same L2), as the hardware would while L2 runs."""
    take_kick = getattr(v.design, "take_kick", None)
    if not v.in_l2 or take_kick is None or not take_kick(v.id, v.l2):
        return False
    v.n["kick_reentry"] += 1
    return True


def op_stream(cfg, vcpu: int, iterations: int) -> list[tuple[str, dict]]:
    """A short seeded program of scripted steps with the choices of :meth:`Vcpu.run` (same seed
    derivation, L2 policy, switch rate, tracked-write share of the guest stores; untracked and MMIO
    stores, which walk no notifier, are left out): per iteration the L1's tracked writes (its own
    physid entry of a random L2's table, IsRunning flipped at random, as ``tracked_write``), nested
    VMRUN, VMEXIT (leaving when it switches L2). Steps of vm/avic/kaboom.apply_step, for
    controlled scheduling (lab/explore.py)."""
    rng = random.Random(vcpu_seed(cfg.seed, vcpu))
    K, l2, out = cfg.l2s, vcpu % cfg.l2s, []
    for _ in range(iterations):
        out += [("write_entry", {"l2": int(rng.random() * K), "entry": vcpu, "apic": vcpu,
                                 "running": rng.random() < 0.5})
                for _ in range(cfg.writes_per_exit) if rng.random() < cfg.tracked_fraction]
        if cfg.policy == "round-robin":
            nxt = (l2 + 1) % K
        elif cfg.policy == "random" and K > 1 and rng.random() < cfg.switch_rate:
            nxt = (l2 + 1 + int(rng.random() * (K - 1))) % K
        else:
            nxt = l2
        out += [("vmrun", {"l2": l2}), ("vmexit", {"l2": l2, "leaving": nxt != l2})]
        l2 = nxt
    return out
