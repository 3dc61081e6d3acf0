"""Notifier registration variants of the nested AVIC wing (``cfg.registration``), on the one shared
page-track notifier node of mutex-hash / rcu-list (per-table-notifier's per-node variants are in
vm/avic/per_table.py):
- ``refcount``: AVIC counts users, registers on 0->1, unregisters on 1->0;
- ``bool``: an idempotent "registered" flag (X registers, Y registers, X unregisters: kaboom);
- ``naive``: every user calls register/unregister (page track WARNs on the redundant one);
- ``split``: registered once at VM creation, apart from enabling write tracking (on first use).
A mixin of :class:`vm.avic.base.AvicDesign`."""

from __future__ import annotations

from vm import notifier
from vm.avic.table import (
    CS_NOTIFIER,
    H_NODE,
    H_REGISTERED,
    H_UNTRACKED_REG,
    H_USERS,
)
from vm.page_track import (
    kvm_page_track_write_tracking_enabled,
)


class Registration:
    """Register / unregister the AVIC notifier node(s) the way ``cfg.registration`` says."""

    def _register(self, node: int, what: str) -> bool:
        kvm = self.kvm
        if not kvm_page_track_write_tracking_enabled(kvm):
            self.amem.fetch_add(self.hdr0 + H_UNTRACKED_REG, 1)
            kvm.warn("untracked_notifier",
                     f"page-track notifier node {node} ({what}) registered while write tracking is "
                     f"disabled: nothing it watches is write-protected, writes to it are not emulated",
                     node=node)
        self._stat("register")
        return notifier.kvm_page_track_register_notifier(kvm, node)

    def _unregister(self, node: int) -> bool:
        self._stat("unregister")
        return notifier.kvm_page_track_unregister_notifier(self.kvm, node)

    def _notifier_get(self) -> None:
        """A new table becomes a user of the shared node (called with no AVIC lock held except
        the notifier lock taken here: unregister waits synchronize_srcu, and a track_write walker
        may be waiting for tables_lock)."""
        m, h = self.amem, self.hdr0
        reg = self.registration
        lk = self.notifier_lock
        lk.lock()
        self._cs_in(CS_NOTIFIER)
        try:
            users = m.fetch_add(h + H_USERS, 1) + 1
            node = m.load(h + H_NODE) - 1
            if reg == "refcount":
                if users == 1:
                    self._register(node, "nested AVIC shared node, first user")
            elif reg == "bool":
                if not m.load(h + H_REGISTERED):
                    self._register(node, "nested AVIC shared node")
                    m.store(h + H_REGISTERED, 1)
            elif reg == "naive":
                self._register(node, "nested AVIC shared node")
        finally:
            self._cs_out(CS_NOTIFIER)
            lk.unlock()

    def _notifier_put(self) -> None:
        m, h = self.amem, self.hdr0
        reg = self.registration
        lk = self.notifier_lock
        lk.lock()
        self._cs_in(CS_NOTIFIER)
        try:
            users = m.fetch_add(h + H_USERS, -1) - 1
            node = m.load(h + H_NODE) - 1
            if reg == "refcount":
                if users == 0:
                    self._unregister(node)
            elif reg == "bool":
                if m.load(h + H_REGISTERED):
                    self._unregister(node)
                    m.store(h + H_REGISTERED, 0)
            elif reg == "naive":
                self._unregister(node)
        finally:
            self._cs_out(CS_NOTIFIER)
            lk.unlock()
