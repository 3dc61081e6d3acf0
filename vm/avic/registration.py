"""Notifier registration variants of the nested AVIC wing (``cfg.registration``), on the one shared
page-track notifier node of mutex-hash / rcu-list (per-table-notifier's per-node variants are in
vm/avic/per_table.py):
- ``refcount``: AVIC counts users, registers on 0->1, unregisters on 1->0 (Sean's choice);
- ``bool``: an idempotent "registered" flag (X registers, Y registers, X unregisters: kaboom);
- ``naive``: every user calls register/unregister (page track WARNs on the redundant one, or with
  ``--redundant-registration mainline`` links it twice: a cycle);
- ``node-refcount``: every user calls register/unregister, and the count lives in the notifier node
  (Maxim's "adding a refcount to struct kvm_page_track_notifier_node"): vm/notifier.py changes the
  list only on 0<->1;
- ``split``: registration and activation of write tracking are two calls made by different paths
  (Maxim's "leave registration and activation of the write tracking as two separate things"): the
  node is registered at VM creation (``setup``), tracking is enabled (``kvm_page_track_write_
  tracking_enable``) by the activation path — L1's boot vCPU (vCPU 0) turning nested AVIC on at its
  first nested VMRUN — and nothing orders another vCPU's first nested VMRUN after it. A table made
  before activation is not write-protected (``kvm_write_track_add_gfn`` WARNs and refuses while
  tracking is disabled, as v6.0's ``kvm_slot_page_track_add_page`` does) and L1's writes to it are
  lost; ``--split-warn on`` adds the registration-time WARN Sean's objection asks for.
A mixin of :class:`vm.avic.base.AvicDesign`."""

from __future__ import annotations

from ipc import fuzz
from ipc.locks import lockdep_assert_held
from vm import notifier
from vm.avic.table import (
    CS_NOTIFIER,
    H_NODE,
    H_REGISTERED,
    H_UNTRACKED_REG,
    H_USERS,
)
from vm.page_track import (
    kvm_page_track_write_tracking_enable,
    kvm_page_track_write_tracking_enabled,
)


class Registration:
    """Register / unregister the AVIC notifier node(s) the way ``cfg.registration`` says."""

    def _activate(self, v: int) -> None:
        """split: the activation path (module doc), on vCPU 0's nested VMRUN until tracking is on."""
        kvm = self.kvm
        if v == 0 and not kvm_page_track_write_tracking_enabled(kvm):
            if fuzz.ACTIVE:
                fuzz.point("avic.split.activate")  # other vCPUs may make and use tables meanwhile
            kvm_page_track_write_tracking_enable(kvm)

    def _reg_lock_held(self) -> None:
        """lockdep: what serializes (un)registration of this design's node(s) is held: the wing's
        ``avic_notifier_lock`` for the shared node, ``tables_lock`` for per-table-notifier's nodes
        (registered and unregistered under get / put)."""
        if self.shared_node:
            lockdep_assert_held(self.notifier_lock, "avic_notifier_lock")
        else:
            lockdep_assert_held(self.tables_lock, "tables_lock")

    def _notifier_users(self, n: int) -> int:
        """The shared node's user count (``H_USERS``, one per live table) += ``n``; the new count.
        Changed only under ``avic_notifier_lock`` (asserted), with the registration it decides."""
        lockdep_assert_held(self.notifier_lock, "avic_notifier_lock")
        return self.amem.fetch_add(self.hdr0 + H_USERS, n) + n

    def _register(self, node: int, what: str) -> bool:
        self._reg_lock_held()
        kvm = self.kvm
        if self.cfg.split_warn == "on" and not kvm_page_track_write_tracking_enabled(kvm):
            self.amem.fetch_add(self.hdr0 + H_UNTRACKED_REG, 1)
            kvm.warn("untracked_notifier",
                     f"page-track notifier node {node} ({what}) registered while write tracking is "
                     f"disabled: nothing it watches is write-protected, writes to it are not emulated",
                     node=node)
        self._stat("register")
        return notifier.kvm_page_track_register_notifier(kvm, node)

    def _unregister(self, node: int) -> bool:
        self._reg_lock_held()
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
            users = self._notifier_users(1)
            node = m.load(h + H_NODE) - 1
            if reg == "refcount":
                if users == 1:
                    self._register(node, "nested AVIC shared node, first user")
            elif reg == "bool":
                if not m.load(h + H_REGISTERED):
                    self._register(node, "nested AVIC shared node")
                    m.store(h + H_REGISTERED, 1)
            elif reg in ("naive", "node-refcount"):
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
            users = self._notifier_users(-1)
            node = m.load(h + H_NODE) - 1
            if reg == "refcount":
                if users == 0:
                    self._unregister(node)
            elif reg == "bool":
                if m.load(h + H_REGISTERED):
                    self._unregister(node)
                    m.store(h + H_REGISTERED, 0)
            elif reg in ("naive", "node-refcount"):
                self._unregister(node)
        finally:
            self._cs_out(CS_NOTIFIER)
            lk.unlock()
