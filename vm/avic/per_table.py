"""``per-table-notifier``: each shadow table registers its own page-track notifier node
(``vm.notifier`` pool), so the walk is linear over all nodes and ``track_write`` goes straight to
its table (no hash, no mutex); get/put, register and unregister (``synchronize_srcu``) run under
``tables_lock`` (vm/avic/mutex_hash.py's ``MutexTables``). Registration variants act on the
table's own node: refcount/split register at create and unregister at free, bool/naive/node-refcount
per user."""

from __future__ import annotations

from vm import layout as L
from vm import notifier
from vm.avic.mutex_hash import MutexTables
from vm.avic.notifiers import AVIC_TABLE_KIND
from vm.avic.table import (
    POISON,
    T_GFN,
    T_NODE,
    T_REGISTERED,
    T_STATE,
    TW,
)
from vm.nested import design
from vm.page_track import (
    PAGE_SHIFT,
)


@design("per-table-notifier")
class PerTableNotifierDesign(MutexTables):
    """Each table registers its own page-track notifier node; track_write needs no lookup and
    no mutex (the SRCU walk keeps the node and its table alive: free waits synchronize_srcu)."""

    shared_node = False

    def _node(self, t: int) -> int:
        return self.amem.load(self.tw0 + t * TW + T_NODE) - 1

    def _on_create(self, t: int) -> None:
        node = notifier.alloc_node(self.kvm, AVIC_TABLE_KIND, t,
                                   refcounted=self.registration == "node-refcount")
        self.amem.store(self.tw0 + t * TW + T_NODE, node + 1)
        if self.registration in ("refcount", "split"):
            gfn = self.amem.load(self.tw0 + t * TW + T_GFN)
            self._register(node, f"shadow physid table gfn {gfn:#x}")

    def _on_ref(self, v: int, t: int) -> None:
        reg = self.registration
        if reg == "bool":
            w = self.tw0 + t * TW + T_REGISTERED
            if not self.amem.load(w):
                self._register(self._node(t), f"shadow physid table slot {t}, vCPU {v}")
                self.amem.store(w, 1)
        elif reg in ("naive", "node-refcount"):
            self._register(self._node(t), f"shadow physid table slot {t}, vCPU {v}")

    def _on_unref(self, v: int, t: int) -> None:
        reg = self.registration
        if reg == "bool":
            w = self.tw0 + t * TW + T_REGISTERED
            if self.amem.load(w):
                self._unregister(self._node(t))
                self.amem.store(w, 0)
        elif reg in ("naive", "node-refcount"):
            self._unregister(self._node(t))

    def _on_free(self, t: int) -> None:
        node = self._node(t)
        if node < 0:
            return
        if self.registration in ("refcount", "split"):
            self._unregister(node)  # waits synchronize_srcu: no walker still has the node
        elif notifier.node_state(self.kvm, node) == L.NODE_LIVE:
            self._unregister(node)
        notifier.free_node(self.kvm, node)

    def table_track_write(self, t: int, gpa: int, nbytes: int, node: int, new: bytes | None = None) -> None:
        m = self.amem
        b = self.tw0 + t * TW
        st = m.load(b + T_STATE)
        if st == POISON:
            self.kvm.poisoned(f"avic_physid_table slot {t} through its notifier node {node} (gpa {gpa:#x})",
                              table=t, node=node)
            return
        if m.load(b + T_GFN) != gpa >> PAGE_SHIFT or m.load(b + T_NODE) != node + 1:
            return  # not this node's page: the linear walk asks every node
        self._table_write(t, gpa, nbytes, -1, new)
