"""Guest-mode entry and exit of the nested AVIC wing: nested VMRUN / VMEXIT, which table a vCPU
holds (``V_CUR``) and runs on (``V_INGUEST``, the table's ``usecount``), reload requests, bringing a
table to VALID before the hardware uses it, and the IsRunning flips of vcpu_load / vcpu_put.
A mixin of :class:`vm.avic.base.AvicDesign`."""

from __future__ import annotations

from ipc import _prims, fuzz, vtime
from ipc.proc import pid_alive, proc_starttime
from vm.avic import oracle
from vm.avic.table import (
    AVIC_APIC_ID_MASK,
    AVIC_IS_RUNNING,
    AVIC_VALID,
    DROPPED,
    INVALID,
    STATE_NAMES,
    T_FLOOD,
    T_STATE,
    T_SYNCS,
    T_TRACKER,
    T_USE,
    TRACKING,
    TW,
    UNTRACKED,
    V_CUR,
    V_GSEEN,
    V_GT,
    V_INGUEST,
    V_INL2,
    V_L2SEQ,
    V_LOADED,
    V_PROC,
    V_RELOAD,
    VALID,
    VW,
    s64,
)
from vm.nested import table_gfn

RELOAD_WAIT_NS = 10_000_000_000  # KVM_REQUEST_WAIT: a vCPU still in L2 after this is WARNed about


class ReloadTargets(list):
    """The vCPUs a reload request kicked, as (vCPU, its L2 seqcount), and the request's number
    (``seq``): ``oracle.check_reloaded`` also looks at the vCPUs it did not kick."""

    seq = 0


class GuestEntry:
    """What a vCPU does around nested VMRUN / VMEXIT and vCPU load / put."""

    def _cur(self, v: int) -> int:
        return self.amem.load(self.vw0 + v * VW + V_CUR) - 1

    def _set_cur(self, v: int, t: int) -> None:
        self.amem.store(self.vw0 + v * VW + V_CUR, t + 1)

    def _enter_guest(self, v: int, t: int) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        w = self.vw0 + v * VW + V_INGUEST
        old = m.load(w) - 1
        if old == t:
            return  # VMRUN without a VMEXIT in between: already counted
        if old >= 0:
            self._leave_guest(v, old)
        m.store(w, t + 1)
        if fuzz.ACTIVE:
            fuzz.point("avic.inguest_to_usecount")
        if m.fetch_add(b + T_USE, 1) == 0:  # full barrier: in_guest is visible before the state read
            m.store(b + T_FLOOD, 0)

    def _leave_guest(self, v: int, t: int) -> None:
        m = self.amem
        w = self.vw0 + v * VW + V_INGUEST
        if m.load(w) == t + 1:
            m.store(w, 0)
            m.fetch_add(self.tw0 + t * TW + T_USE, -1)

    def _reload_check(self, v: int) -> None:
        w = self.vw0 + v * VW + V_RELOAD
        # consumed with an atomic exchange (kvm_check_request: clear_bit + smp_mb__after_atomic): a
        # plain store of 0 could drain after a new request's store and wipe it (review F2)
        r = self.amem.load(w) and self.amem.xchg(w, 0)
        if r:
            self.kvm.count("reloads")
            g = self.vw0 + v * VW + V_GSEEN  # (oracle: the requests served, for check_reloaded)
            self._smem.store(g, max(r, self._smem.load(g)))

    def _make_ready(self, v: int, t: int) -> bool:
        """Bring the table the vCPU holds a reference on to VALID: write-protect it if it is not
        (new or dropped), resync it if it was invalidated."""
        m = self.amem
        b = self.tw0 + t * TW
        waits = 0
        while True:
            st = m.load(b + T_STATE)
            if st == VALID:
                if fuzz.ACTIVE:
                    fuzz.point("avic.ready_to_run")  # VALID seen; L2 about to use the entries
                return True
            if st in (UNTRACKED, DROPPED):
                if m.cmpxchg(b + T_STATE, st, TRACKING) == st:
                    m.store(b + T_TRACKER, self.identity)
                    try:
                        ok = self._track(t)
                    except BaseException:  # e.g. the TLB flush met a dead vCPU: let others retry
                        m.cmpxchg(b + T_STATE, TRACKING, st)
                        raise
                    if not ok and self.kvm.vm_dead:  # KVM_BUG_ON (v6.6): nothing enters the guest
                        m.store(b + T_STATE, st)
                        return False
                    m.store(b + T_STATE, INVALID)
            elif st == TRACKING:
                _prims.sched_yield()  # another user is write-protecting it
                waits += 1
                if not waits % 1024:
                    self._check_tracker(t, b)
            elif st == INVALID:
                self._tlock(t)
                try:
                    if m.load(b + T_STATE) == INVALID:
                        self._stat("sync" if m.load(b + T_SYNCS) == 0 else "resync")
                        self._sync(t)
                finally:
                    self._tunlock(t)
            else:
                self.kvm.poisoned(f"avic_physid_table slot {t} (state {STATE_NAMES[st] if 0 <= st < 9 else st})"
                                  f" at nested VMRUN of vCPU {v}", table=t, vcpu=v)
                return False

    def _check_tracker(self, t: int, b: int) -> None:
        """A table stuck in TRACKING: is the process write-protecting it still alive?"""
        w = self.amem.load(b + T_TRACKER)
        pid, start = w >> 32, w & 0xFFFFFFFF
        if pid and not (pid_alive(pid) and (not start or (proc_starttime(pid) or 0) & 0xFFFFFFFF == start)):
            raise RuntimeError(f"avic_physid_table slot {t}: process {pid} died write-protecting it "
                               f"(table left in state tracking)")

    def nested_vmrun(self, vcpu: int, l2: int) -> None:
        """Nested VMRUN: get the L2's table and make it ready, then enter L2 the way
        ``vcpu_enter_guest`` does: mark the vCPU in L2 (a full barrier), then look at its requests;
        a reload request that came meanwhile cancels the entry, and it starts again (a requester
        either saw the vCPU in L2 and waits for it to leave, or the vCPU sees the request)."""
        if self.region is None:
            self._attach()
        m = self.amem
        vw = self.vw0 + vcpu * VW
        self._store_end(vcpu)  # this vCPU's L1 stores to table pages have all completed
        m.store(vw + V_PROC, self.tag)
        if m.load(vw + V_INL2):  # (scripted: VMRUN again without a VMEXIT) the L2 run ends first: a
            self.leave_l2(vcpu)  # VMRUN is emulated outside guest mode, and may wait for locks
        gfn = table_gfn(self.cfg, l2)
        while True:
            self._reload_check(vcpu)
            if self.registration == "split":
                self._activate(vcpu)  # write tracking enabled by its own path (vm/avic/registration.py)
            t = self._vmrun_get(vcpu, gfn, l2)
            if t < 0:  # the table turned out to be freed memory (reported)
                return
            m.fetch_add(vw + V_L2SEQ, 1)  # odd: in L2 (full barrier before the request check)
            m.store(vw + V_INL2, t + 1)  # from here the hardware uses the table's entries
            if not m.load(vw + V_RELOAD):
                break
            m.fetch_add(vw + V_L2SEQ, 1)  # a request came: cancel the entry, serve it, try again
            m.store(vw + V_INL2, 0)
        self._smem.store(vw + V_GT, t + 1)  # (oracle: committed to this L2 run, for check_reloaded)
        oracle.check_vmrun(self, vcpu, t, l2, gfn)

    def kick_exit(self, vcpu: int) -> bool:
        """The vCPU takes the kick of a reload request (an IPI: a VM exit from L2 to L0); its caller
        then serves the request and re-enters (``nested_vmrun`` of the same L2). False if the vCPU
        was not in L2."""
        if not self.leave_l2(vcpu):
            return False
        self._stat("kick_exit")
        return True

    def leave_l2(self, vcpu: int) -> bool:
        """The hardware stops running L2 for this vCPU (a VM exit to L0: kick, emulation, scripted
        L1 work); its table reference and guest-mode count stay. False if it was not in L2."""
        m = self.amem
        vw = self.vw0 + vcpu * VW
        t = m.load(vw + V_INL2) - 1
        if t < 0:
            return False
        oracle.check_vmexit(self, vcpu, t)
        self._smem.store(vw + V_GT, 0)  # (oracle: before the seqcount says it left)
        m.fetch_add(vw + V_L2SEQ, 1)
        m.store(vw + V_INL2, 0)
        return True

    def in_l2(self, vcpu: int) -> bool:
        """The hardware runs L2 for this vCPU now (between its entry and the next VM exit)."""
        return self._smem.load(self.vw0 + vcpu * VW + V_INL2) != 0

    def kick_pending(self, vcpu: int) -> bool:
        """A reload request is pending for this vCPU while it runs L2: its kick (an IPI) is on the way
        and :meth:`take_kick` would serve it. Plain loads (no scheduling point): the controlled
        scheduler asks it, between two steps, of a vCPU whose program ended in L2."""
        w = self.vw0 + vcpu * VW
        return self._smem.load(w + V_RELOAD) != 0 and self._smem.load(w + V_INL2) != 0

    def take_kick(self, vcpu: int, l2: int) -> bool:
        """What a vCPU in L2 does when a reload request's kick reaches it (polled by the L2 loop, or
        by a scripted vCPU idle between commands): exit, serve the request, re-enter ``l2``. False if
        no request is pending or the vCPU was not in L2."""
        if not self._smem.load(self.vw0 + vcpu * VW + V_RELOAD) or not self.kick_exit(vcpu):
            return False
        self.nested_vmrun(vcpu, l2)
        return True

    def _request_reload_all(self, seq: int) -> list[tuple[int, int]]:
        """``kvm_make_all_cpus_request(kvm, KVM_REQ_APIC_PAGE_RELOAD)``, its first half: request
        number ``seq`` for every vCPU (a pending one keeps the newest number), a full barrier, then
        the vCPUs in L2 now, each as (vCPU, its L2 seqcount): they are kicked, and ``_reload_wait``
        waits for each to leave that L2 run."""
        m = self.amem
        for v in range(self.nvcpus):
            w = self.vw0 + v * VW + V_RELOAD
            cur = m.load(w)
            while cur < seq:  # atomic max: two erases at once (per-table locks) store in any order
                found = m.cmpxchg(w, cur, seq)
                if found == cur:
                    break
                cur = found
        _prims.smp_mb()  # pairs with the barrier between a vCPU's entry into L2 and its request check
        targets = ReloadTargets()
        targets.seq = seq
        for v in range(self.nvcpus):
            s = m.load(self.vw0 + v * VW + V_L2SEQ)
            if s & 1:
                targets.append((v, s))
        self._stat("reload_all")
        if targets:
            self._stat("reload_request", len(targets))  # kicked
            if vtime.ACTIVE is not None:  # the IPI ends their guest time (ipc/vtime.py)
                for v, _ in targets:
                    vtime.ACTIVE.kick(v)
        return targets

    def _reload_wait(self, t: int, targets: list[tuple[int, int]]) -> None:
        """``KVM_REQUEST_WAIT``: wait until every kicked vCPU has left the L2 run it was in (the
        caller holds no spinlock). A vCPU run by this very process (one process, several vCPUs) takes
        its kick here. Bounded: a vCPU that does not leave in ``RELOAD_WAIT_NS`` is WARNed about."""
        m = self.amem
        controlled = getattr(fuzz.ACTIVE, "controlled", False)
        end = 0 if controlled else _prims.now_ns() + RELOAD_WAIT_NS
        for v, s in targets:
            w = self.vw0 + v * VW + V_L2SEQ
            if m.load(w) == s and m.load(self.vw0 + v * VW + V_PROC) == self.tag:
                self.kick_exit(v)
            while m.load(w) == s:
                if end and _prims.now_ns() > end:
                    self.kvm.warn("reload_wait_timeout",
                                  f"kvm_make_all_cpus_request(KVM_REQ_APIC_PAGE_RELOAD): vCPU {v} did not "
                                  f"leave L2 in {RELOAD_WAIT_NS // 1_000_000_000} s", vcpu=v)
                    break
                _prims.sched_yield()
        oracle.check_reloaded(self, t, targets)
        # judged here: the write-completion check (oracle.check_write_done) keeps only the waits
        # that never ran (one report per missed wait, not two after a timeout)
        self.reload_owed = [o for o in self.reload_owed if o[1] is not targets]

    def nested_vmexit(self, vcpu: int, l2: int, leaving: bool) -> None:
        if self.region is None:
            self._attach()
        self.leave_l2(vcpu)  # (its I1 check comes before the reload request is consumed)
        t = self._cur(vcpu)
        if t >= 0:
            self._leave_guest(vcpu, t)
        self._reload_check(vcpu)
        if leaving and t >= 0:
            self._put(vcpu, t)

    def vcpu_load(self, vcpu: int) -> None:
        self._set_running(vcpu, True)

    def vcpu_put(self, vcpu: int) -> None:
        self._set_running(vcpu, False)

    def _set_running(self, v: int, running: bool) -> None:
        """Flip IsRunning in every shadow entry that maps L1 vCPU ``v``, visiting only the tables
        whose entries name it (``vref``): under the VM-wide ``avic_physid_lock`` (RFC v3's
        ``table_entries_lock``), or table by table under each table's own lock (``per_table_lock``;
        the state is read under that lock, or a sync that read the old V_LOADED could end VALID
        after a skip here)."""
        if self.region is None:
            self._attach()
        m = self.amem
        flips = 0
        row = self.vref0 + v * self.nt  # the tables whose entries name v (RFC v3 physid_ref_entries)
        if self.per_table_lock:
            self._seq_begin()
            m.store(self.vw0 + v * VW + V_LOADED, 1 if running else 0)
            _prims.smp_mb()  # V_LOADED before the counts: pairs with _vref's barrier (vm/avic/pool.py)
            for t in range(self.nt):
                if m.load(row + t) <= 0:
                    continue
                self._tlock(t)
                try:
                    flips += self._flip_running(t, v, running)
                finally:
                    self._tunlock(t)
            self._seq_end()
        else:
            self._physid_lock()
            try:
                self._seq_begin()
                m.store(self.vw0 + v * VW + V_LOADED, 1 if running else 0)
                for t in range(self.nt):
                    if m.load(row + t) > 0:
                        flips += self._flip_running(t, v, running)
                self._seq_end()
            finally:
                self._physid_unlock()
        if flips:
            self._stat("isrunning_flip", flips)

    def _flip_running(self, t: int, v: int, running: bool) -> int:
        """IsRunning of L1 vCPU ``v`` in table ``t``'s shadow entries, if it is VALID (its entries
        lock held); returns how many entries changed."""
        self._tlock_held(t)
        m = self.amem
        if m.load(self.tw0 + t * TW + T_STATE) != VALID:
            return 0
        flips = 0
        cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
        for e in range(self.ne):
            c = m.load(cb + e) & 0xFFFFFFFFFFFFFFFF
            if c & AVIC_VALID and c & AVIC_IS_RUNNING and (c & AVIC_APIC_ID_MASK) == v:
                sh = m.load(sb + e) & 0xFFFFFFFFFFFFFFFF
                ns = sh | AVIC_IS_RUNNING if running else sh & ~AVIC_IS_RUNNING
                if ns != sh:
                    m.store(sb + e, s64(ns))
                    flips += 1
        return flips
