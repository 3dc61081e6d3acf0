"""``rcu-list`` (Sean): an RCU-protected list of shadow tables and one shared notifier node. A vCPU
that already holds a reference on its L2's table takes no lock at all on VMRUN; a new reference is
taken with an ``inc_not_zero`` under ``rcu_read_lock``; only the first user of a table (create) and
the last (free) take the ``avic_tables_spin`` spinlock and wait ``synchronize_rcu``.
``track_write`` walks the list under ``rcu_read_lock`` and takes no VM-wide lock: the entries of a
table are guarded by that table's own spinlock (``avic_table_lock``)."""

from __future__ import annotations

from ipc import _prims, fuzz
from ipc.locks import LOCKDEP, LockdepError, always_held, lockdep_assert_held
from vm.avic import oracle
from vm.avic.base import AvicDesign
from vm.avic.table import (
    CS_SPIN,
    H_LIST,
    POISON_REF,
    T_GEN,
    T_GFN,
    T_NEXT,
    T_REF,
    TW,
)
from vm.nested import design
from vm.page_track import (
    PAGE_SHIFT,
)


@design("rcu-list")
class RcuListDesign(AvicDesign):
    """Sean: RCU-protected list; lock-free VMRUN for a vCPU that keeps its table; spinlock +
    synchronize_rcu only for the first user (add) and the last (remove). A table's entries have a
    spinlock of their own: a tracked write takes no VM-wide lock ("would avoid having to take any
    'real' locks in the page track notifier")."""

    per_table_lock = True

    def __init__(self, kvm, cfg):
        super().__init__(kvm, cfg)
        self._rcu_nesting = kvm.rcu.reader.nesting if LOCKDEP else always_held  # rcu_read_lock_held(): one C call

    def _lookup(self, gfn: int) -> int:
        """RCU read side (or avic_tables_spin held): the live table of ``gfn``, or -1. Asserted, as
        ``list_for_each_entry_rcu(t, &avic_tables, link, lockdep_is_held(&avic_tables_spin))``
        does (``RCU_LOCKDEP_WARN(!rcu_read_lock_held() && !cond)``)."""
        if not self._rcu_nesting() and not self.tables_spin.is_held():
            raise LockdepError("lockdep: RCU list avic_tables traversed in non-reader section "
                               "(neither rcu_read_lock nor avic_tables_spin held)")
        return self._chain_find(self.hdr0 + H_LIST, gfn, "RCU list")

    def _check_structure(self, bad: list[str]) -> None:
        seen: dict[int, str] = {}
        oracle.check_chain(self, bad, "RCU table list", self.hdr0 + H_LIST, seen)
        oracle.check_linked(self, bad, seen, "RCU table list")

    def _list_add(self, t: int) -> None:
        lockdep_assert_held(self.tables_spin, "avic_tables_spin")
        m = self.amem
        m.store(self.tw0 + t * TW + T_NEXT, m.load(self.hdr0 + H_LIST))
        if fuzz.ACTIVE:
            fuzz.point("avic.rcu_list.init_to_publish")
        m.store(self.hdr0 + H_LIST, t + 1)  # release: the table is complete before it is visible

    def _list_del(self, t: int) -> None:
        lockdep_assert_held(self.tables_spin, "avic_tables_spin")
        self._chain_unlink(self.hdr0 + H_LIST, t, "RCU list", "avic_list_corrupt")

    def _inc_not_zero(self, t: int) -> bool:
        m = self.amem
        w = self.tw0 + t * TW + T_REF
        r = m.load(w)
        while r > 0:
            f = m.cmpxchg(w, r, r + 1)
            if f == r:
                return True
            r = f
            self._stat("rcu_retry")
        if r == POISON_REF:
            self.kvm.poisoned(f"avic_physid_table slot {t} refcount (freed under an RCU reader)", table=t)
        return False

    def _get_ref(self, gfn: int, l2: int) -> int:
        m = self.amem
        rcu = self.kvm.rcu
        rcu.read_lock()
        try:
            t = self._lookup(gfn)
            if t >= 0:
                b = self.tw0 + t * TW
                gen = m.load(b + T_GEN)
                if self.reader_delay:
                    _prims.spin_ns(self.reader_delay)
                if fuzz.ACTIVE:
                    fuzz.point("avic.rcu.lookup_to_get")  # inside the read-side section
                if self._inc_not_zero(t):
                    if m.load(b + T_GEN) == gen and m.load(b + T_GFN) == gfn:
                        self._stat("get_fast")
                        return t
                    self.kvm.poisoned(f"avic_physid_table slot {t}: freed and reused between lookup and "
                                      f"get (gfn {gfn:#x})", table=t)
                    m.fetch_add(b + T_REF, -1)
        finally:
            rcu.read_unlock()
        # slow path: under the spinlock; the first user of the table creates it
        self._stat("get_slow")
        spin = self.tables_spin
        created = spare_user = False
        spin.lock()
        held = True  # false only while dropped around _notifier_get (a failed re-lock: not ours)
        self._cs_in(CS_SPIN)
        try:
            t = self._lookup(gfn)
            if t < 0:
                # the new table's user reference on the shared node, taken without the spinlock
                # (registering takes mmu_lock, unregistering sleeps in synchronize_srcu)
                self._cs_out(CS_SPIN)
                spin.unlock()
                held = False
                try:
                    self._notifier_get()
                finally:
                    spin.lock()
                    held = True
                    self._cs_in(CS_SPIN)
                t = self._lookup(gfn)
                spare_user = t >= 0
            if t >= 0:
                m.fetch_add(self.tw0 + t * TW + T_REF, 1)  # linked tables have refcount >= 1
            else:
                t = self._create_table(gfn, l2)
                self._list_add(t)
                created = True
        finally:
            if held:
                self._cs_out(CS_SPIN)
                spin.unlock()
        if spare_user:
            self._notifier_put()
        if created and "no-synchronize-rcu" not in self.hooks:
            self.kvm.rcu.synchronize()  # walkers that missed the new table are done
            self._stat("synchronize_rcu_add")
        return t

    def _vmrun_get(self, v: int, gfn: int, l2: int) -> int:
        cur = self._cur(v)
        if cur >= 0 and self.amem.load(self.tw0 + cur * TW + T_GFN) != gfn:
            self._put(v, cur)  # switching L2 drops the old reference
            cur = -1
        if cur >= 0:
            t = cur  # our reference keeps it alive: no lock, no RCU
            self._stat("get_fast")
        else:
            t = self._get_ref(gfn, l2)
            self._set_cur(v, t)
        self._enter_guest(v, t)
        return t if self._make_ready(v, t) else -1

    def _put(self, v: int, t: int) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        self._set_cur(v, -1)
        w = b + T_REF
        r = m.load(w)
        while r > 1:  # refcount_dec_and_lock: only the last reference takes the lock
            f = m.cmpxchg(w, r, r - 1)
            if f == r:
                return
            r = f
        spin = self.tables_spin
        spin.lock()
        self._cs_in(CS_SPIN)
        try:
            r = m.fetch_add(w, -1) - 1
            if r != 0:
                if r < 0:
                    self.kvm.warn("avic_refcount_underflow", f"avic_physid_table slot {t}: refcount underflow")
                return
            self._list_del(t)
            self._tlock(t)
            try:
                self._retire(t)
            finally:
                self._tunlock(t)
        finally:
            self._cs_out(CS_SPIN)
            spin.unlock()
        self._untrack(t)
        self._notifier_put()
        if "no-synchronize-rcu" not in self.hooks:
            self.kvm.rcu.synchronize()  # no reader still sees the table
            self._stat("synchronize_rcu_del")
        self._poison_table(t)

    def track_write(self, gpa: int, nbytes: int, node: int, new: bytes | None = None) -> None:
        m = self.amem
        rcu = self.kvm.rcu
        rcu.read_lock()
        try:
            t = self._lookup(gpa >> PAGE_SHIFT)
            if t < 0:
                self._stat("track_write_miss")
                return
            b = self.tw0 + t * TW
            gen = m.load(b + T_GEN)
            if self.reader_delay:
                _prims.spin_ns(self.reader_delay)
            if fuzz.ACTIVE:
                fuzz.point("avic.rcu.track_write_lookup_to_write")
            if self._table_write(t, gpa, nbytes, gen, new) and m.load(b + T_GEN) != gen:
                self.kvm.poisoned(f"avic_physid_table slot {t} freed under an RCU reader (track_write gpa "
                                  f"{gpa:#x})", table=t, gpa=gpa)
        finally:
            rcu.read_unlock()
