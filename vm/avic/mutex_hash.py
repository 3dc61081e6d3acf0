"""``mutex-hash`` (Maxim, RFC v3): a VM-wide ``tables_lock`` futex mutex, a 256-bucket gfn hash and
ONE shared page-track notifier node. A nested VMRUN takes the mutex only when the vCPU has no table
yet, its L2's physid gfn changed, or its table needs a sync (RFC v3 13/19
``nested_vmcb02_prepare_avic``): get(gfn) under the mutex (lookup, create + write-protect + sync if
missing); otherwise it only does ``atomic_inc(&t->usecount)`` (``--avic-vmrun-lock every``: the
mutex on every VMRUN, this model before issue 18). put() under the mutex; ``track_write`` takes the
mutex and looks the gfn up in the hash, for every emulated write that walks the notifiers.
``MutexTables`` (get/put under the mutex, the hash) is shared with per-table-notifier."""

from __future__ import annotations

from ipc import fuzz
from ipc.locks import lockdep_assert_held
from vm.avic import oracle
from vm.avic.base import AvicDesign
from vm.avic.table import (
    CS_TABLES,
    HASH_BUCKETS,
    LIVE,
    T_GFN,
    T_NEXT,
    T_REF,
    T_STATE,
    TW,
    VALID,
)
from vm.nested import design
from vm.page_track import (
    PAGE_SHIFT,
)


class MutexTables(AvicDesign):
    """get/put under the VM-wide ``tables_lock`` mutex, tables found by a 256-bucket gfn hash."""

    def __init__(self, kvm, cfg):
        super().__init__(kvm, cfg)
        self.vmrun_lock_on_change = cfg.avic_vmrun_lock == "change"

    @staticmethod
    def _bucket(gfn: int) -> int:
        return ((gfn * 0x61C88647) & 0xFFFFFFFF) >> 24  # hash_32(gfn, 8)

    def _hash_lookup(self, gfn: int) -> int:
        lockdep_assert_held(self.tables_lock, "tables_lock")
        return self._chain_find(self.hash0 + self._bucket(gfn), gfn, "gfn hash chain")

    def _hash_add(self, t: int) -> None:
        lockdep_assert_held(self.tables_lock, "tables_lock")
        m = self.amem
        head = self.hash0 + self._bucket(m.load(self.tw0 + t * TW + T_GFN))
        m.store(self.tw0 + t * TW + T_NEXT, m.load(head))
        m.store(head, t + 1)

    def _hash_del(self, t: int) -> None:
        lockdep_assert_held(self.tables_lock, "tables_lock")
        head = self.hash0 + self._bucket(self.amem.load(self.tw0 + t * TW + T_GFN))
        self._chain_unlink(head, t, "hash chain", "avic_hash_corrupt")

    def _check_structure(self, bad: list[str]) -> None:
        seen: dict[int, str] = {}
        for bkt in range(HASH_BUCKETS):
            before = set(seen)
            oracle.check_chain(self, bad, f"gfn hash bucket {bkt}", self.hash0 + bkt, seen)
            for t in set(seen) - before:
                gfn = self.amem.load(self.tw0 + t * TW + T_GFN)
                if self.amem.load(self.tw0 + t * TW + T_STATE) in LIVE and self._bucket(gfn) != bkt:
                    bad.append(f"slot {t} (gfn {gfn:#x}) on hash bucket {bkt}, belongs on {self._bucket(gfn)}")
        oracle.check_linked(self, bad, seen, "gfn hash")

    # registration hooks (tables_lock held)
    def _on_create(self, t: int) -> None:
        pass

    def _on_ref(self, v: int, t: int) -> None:
        pass

    def _on_unref(self, v: int, t: int) -> None:
        pass

    def _on_free(self, t: int) -> None:
        pass

    def _vmrun_get(self, v: int, gfn: int, l2: int) -> int:
        m = self.amem
        cur = self._cur(v)
        if cur >= 0 and m.load(self.tw0 + cur * TW + T_GFN) != gfn:
            self._put(v, cur)  # switching L2 drops the old reference
            cur = -1
        if cur >= 0 and self.vmrun_lock_on_change:
            # RFC v3 nested_vmcb02_prepare_avic: same gfn, table held: atomic_inc(&t->usecount); a
            # sync (t->nentries < physid_nentries: new, or erased) is the only reason for the mutex
            self._enter_guest(v, cur)
            if m.load(self.tw0 + cur * TW + T_STATE) == VALID:
                self._stat("get_fast")
                self._stat("vmrun_nolock")
                return cur
        lk = self.tables_lock
        spare_user = False
        lk.lock()
        held = True  # false only while dropped around _notifier_get (a failed re-lock: not ours)
        self._cs_in(CS_TABLES)
        try:
            t = self._hash_lookup(gfn)
            created = False
            if t < 0:
                if self.shared_node:
                    # the new table's user reference on the shared node, taken without tables_lock
                    self._cs_out(CS_TABLES)
                    lk.unlock()
                    held = False
                    try:
                        self._notifier_get()
                    finally:
                        lk.lock()
                        held = True
                        self._cs_in(CS_TABLES)
                    t = self._hash_lookup(gfn)
                    spare_user = t >= 0
                if t < 0:
                    t = self._create_table(gfn, l2)
                    self._hash_add(t)
                    self._on_create(t)
                    created = True
                self._stat("get_slow")
            if t != cur:
                if cur >= 0:
                    self.kvm.warn("avic_cur_mismatch", f"vCPU {v} holds slot {cur} but gfn {gfn:#x} is slot {t}")
                if not created:
                    m.fetch_add(self.tw0 + t * TW + T_REF, 1)
                self._set_cur(v, t)
                self._on_ref(v, t)
            else:
                self._stat("get_fast")
            self._enter_guest(v, t)
            ready = self._make_ready(v, t)
        finally:
            if held:
                self._cs_out(CS_TABLES)
                lk.unlock()
        if fuzz.ACTIVE:
            fuzz.point("avic.tables_lock.after_unlock")
        if spare_user:
            self._notifier_put()
        return t if ready else -1

    def _put(self, v: int, t: int) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        lk = self.tables_lock
        freed = False
        lk.lock()
        self._cs_in(CS_TABLES)
        try:
            self._set_cur(v, -1)
            self._on_unref(v, t)
            r = m.fetch_add(b + T_REF, -1) - 1
            if r < 0:
                self.kvm.warn("avic_refcount_underflow", f"avic_physid_table slot {t}: refcount underflow")
            elif r == 0:
                self._hash_del(t)
                self._tlock(t)
                try:
                    self._retire(t)
                finally:
                    self._tunlock(t)
                self._on_free(t)
                self._untrack(t)
                self._poison_table(t)  # every reader holds tables_lock or avic_physid_lock
                freed = True
        finally:
            self._cs_out(CS_TABLES)
            lk.unlock()
        if freed and self.shared_node:
            self._notifier_put()


@design("mutex-hash")
class MutexHashDesign(MutexTables):
    """Maxim v3: VM mutex + gfn hash + one shared notifier node."""

    def track_write(self, gpa: int, nbytes: int, node: int, new: bytes | None = None) -> None:
        lk = self.tables_lock
        lk.lock()
        self._cs_in(CS_TABLES)
        try:
            t = self._hash_lookup(gpa >> PAGE_SHIFT)
            if t >= 0:
                self._table_write(t, gpa, nbytes, -1, new)
            else:
                self._stat("track_write_miss")
        finally:
            self._cs_out(CS_TABLES)
            lk.unlock()
