"""Guest-mode entry and exit of the nested AVIC wing: nested VMRUN / VMEXIT, which table a vCPU
holds (``V_CUR``) and runs on (``V_INGUEST``, the table's ``usecount``), reload requests, bringing a
table to VALID before the hardware uses it, and the IsRunning flips of vcpu_load / vcpu_put.
A mixin of :class:`vm.avic.base.AvicDesign`."""

from __future__ import annotations

from ipc import _prims, fuzz
from ipc.proc import pid_alive, proc_starttime
from vm.avic import oracle
from vm.avic.table import (
    AVIC_APIC_ID_MASK,
    AVIC_IS_RUNNING,
    AVIC_VALID,
    DROPPED,
    H_SEQ,
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
    V_INGUEST,
    V_INL2,
    V_L1SEQ,
    V_L2SEQ,
    V_LOADED,
    V_RELOAD,
    VALID,
    VW,
    s64,
)
from vm.nested import table_gfn


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
        if self.amem.load(w):
            self.amem.store(w, 0)
            self.kvm.count("reloads")

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
                        self._track(t)
                    except BaseException:  # e.g. the TLB flush met a dead vCPU: let others retry
                        m.cmpxchg(b + T_STATE, TRACKING, st)
                        raise
                    m.store(b + T_STATE, INVALID)
            elif st == TRACKING:
                _prims.sched_yield()  # another user is write-protecting it
                waits += 1
                if not waits % 1024:
                    self._check_tracker(t, b)
            elif st == INVALID:
                self._physid_lock()
                try:
                    if m.load(b + T_STATE) == INVALID:
                        self._stat("sync" if m.load(b + T_SYNCS) == 0 else "resync")
                        self._sync(t)
                finally:
                    self._physid_unlock()
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
        if self.region is None:
            self._attach()
        m = self.amem
        vw = self.vw0 + vcpu * VW
        if m.load(vw + V_L1SEQ) & 1:  # this vCPU's L1 stores to table pages have all completed
            m.fetch_add(vw + V_L1SEQ, 1)
        gfn = table_gfn(self.cfg, l2)
        self._reload_check(vcpu)
        if self.registration == "split":
            self._activate(vcpu)  # write tracking enabled by its own path (vm/avic/registration.py)
        t = self._vmrun_get(vcpu, gfn, l2)
        if t >= 0:  # -1: the table turned out to be freed memory (reported)
            if m.load(vw + V_INL2) == 0:  # (scripted mode may VMRUN again without a VMEXIT)
                m.fetch_add(vw + V_L2SEQ, 1)  # odd: in L2
            m.store(vw + V_INL2, t + 1)  # from here the hardware uses the table's entries
            oracle.check_vmrun(self, vcpu, t, l2, gfn)

    def nested_vmexit(self, vcpu: int, l2: int, leaving: bool) -> None:
        if self.region is None:
            self._attach()
        m = self.amem
        vw = self.vw0 + vcpu * VW
        inl2 = m.load(vw + V_INL2) - 1
        if inl2 >= 0:
            oracle.check_vmexit(self, vcpu, inl2)  # before the reload request is consumed
            m.fetch_add(vw + V_L2SEQ, 1)
            m.store(vw + V_INL2, 0)
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
        """Flip IsRunning in every shadow entry that maps L1 vCPU ``v`` (per-VM spinlock)."""
        if self.region is None:
            self._attach()
        m = self.amem
        seq_w = self.hdr0 + H_SEQ
        self._physid_lock()
        try:
            m.fetch_add(seq_w, 1)
            m.store(self.vw0 + v * VW + V_LOADED, 1 if running else 0)
            flips = 0
            for t in range(self.nt):
                if m.load(self.tw0 + t * TW + T_STATE) != VALID:
                    continue
                cb, sb = self.cache0 + t * self.ne, self.shadow0 + t * self.ne
                for e in range(self.ne):
                    c = m.load(cb + e) & 0xFFFFFFFFFFFFFFFF
                    if c & AVIC_VALID and c & AVIC_IS_RUNNING and (c & AVIC_APIC_ID_MASK) == v:
                        s = m.load(sb + e) & 0xFFFFFFFFFFFFFFFF
                        ns = s | AVIC_IS_RUNNING if running else s & ~AVIC_IS_RUNNING
                        if ns != s:
                            m.store(sb + e, s64(ns))
                            flips += 1
            m.fetch_add(seq_w, 1)
        finally:
            self._physid_unlock()
        if flips:
            self._stat("isrunning_flip", flips)
