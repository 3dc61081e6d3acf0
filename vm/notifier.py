"""Page-track notifier registry: a fixed pool of nodes in shm on an SRCU-protected singly linked list.

Mirrors ``kvm_page_track_notifier_head`` (an SRCU domain, ``track_srcu``, plus an hlist):
- writers of the list hold ``mmu_lock``; readers walk it under ``srcu_read_lock(track_srcu)``;
- register = ``hlist_add_head_rcu`` (the node's next is set before the head is published with a
  release store); redundant registration of a live node WARNs and is refused (the check the seed
  asks for: the AVIC code must refcount), or with ``cfg.redundant_registration = "mainline"`` is
  linked again as the kernel does (a cycle: vm/faults.py ``notifier_cycle`` names it); a node made
  with ``refcounted=True`` counts registrations instead (``N_REFS``, node-refcount);
- unregister = ``hlist_del_rcu`` under mmu_lock, then ``synchronize_srcu`` so no reader still
  holds the node when the caller frees it; ``free_node`` poisons the slot (WARN if it is still
  listed or counted), and a reader that meets a poisoned node reports it (use after free); an
  owner's teardown uses ``release_node``: every registration the node still holds goes (one unlink),
  then the free. ``N_REFS`` is -1 in every slot no owner made counted (never allocated, freed, or
  allocated uncounted): such a node is a mainline node, without Maxim's count.
- bookkeeping of the simulation (no kernel counterpart), for the exact call accounting of
  ``vm.mirror``: a seqcount ``NH_SEQ`` (odd while register / unregister change the list) and per
  node the seqcount of the registration that made it live (``N_REGSEQ``). A node's state is LIVE
  only while it is on the list (set after linking, cleared before unlinking), so a node seen LIVE
  with the same ``N_REGSEQ`` at two instants was on the list in between.

Each node has a kind: the id of a Python handler class registered with ``@notifier_kind``; every
process instantiates its own handler for a node (``handler(kvm, node)``) with the callbacks
``track_write(gpa, new, nbytes, node)`` and ``track_remove_region(gfn, nr_pages, node)``.
"""

from __future__ import annotations

from ipc import fuzz
from ipc.locks import LOCKDEP, LockdepError, lockdep_assert_held
from vm import layout as L
from vm.faults import notifier_cycle

POISON_NEXT = -0x6B6B6B6B  # like POISON_FREE: a freed node's next pointer
UNINIT_NEXT = -0x5A5A5A5A  # an allocated node's next pointer until it is linked (not yet written)
KINDS: dict[int, type] = {}


def notifier_kind(kind_id: int):
    """Class decorator: make ``cls`` the handler of nodes of ``kind_id`` in every process."""

    def deco(cls):
        if kind_id in KINDS and KINDS[kind_id] is not cls:
            raise ValueError(f"notifier kind {kind_id} already used by {KINDS[kind_id].__name__}")
        KINDS[kind_id] = cls
        cls.kind_id = kind_id
        return cls

    return deco


class NotifierNode:
    """Base handler: the per-process object behind a node. ``owner`` is kind-specific."""

    kind_id = 0

    def __init__(self, kvm, node: int, owner: int):
        self.kvm = kvm
        self.node = node
        self.owner = owner

    def track_write(self, gpa: int, new: bytes, nbytes: int, node: int) -> None:
        pass

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        pass


def _w(kvm, node: int, word: int) -> int:
    return kvm.nodes_w + node * 8 + word


def node_state(kvm, node: int) -> int:
    return kvm.mem.load(_w(kvm, node, L.N_STATE))


def alloc_node(kvm, kind: int, owner: int, refcounted: bool = False) -> int:
    """Take a free (or poisoned, i.e. freed) slot of the pool; returns its index. ``refcounted``:
    the node carries Maxim's count (``--registration node-refcount``, ``N_REFS``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown notifier kind {kind}")
    mem = kvm.mem
    with kvm.mmu_lock:
        for i in range(kvm.nodes.shape[0]):
            if mem.load(_w(kvm, i, L.N_STATE)) in (L.NODE_FREE, L.NODE_POISON):
                _init_node(kvm, i, kind, owner, refcounted)
                return i
    kvm.warn("nodes_exhausted", f"notifier node pool ({kvm.nodes.shape[0]}) exhausted")
    raise RuntimeError(f"notifier node pool ({kvm.nodes.shape[0]}) exhausted")


def _init_node(kvm, i: int, kind: int, owner: int, refcounted: bool) -> None:
    """Claim free pool slot ``i`` for a new node. The pool, like the list, is ``mmu_lock``'s
    (asserted): two allocators must not take one slot."""
    lockdep_assert_held(kvm.mmu_lock, "mmu_lock")
    mem = kvm.mem
    mem.store(_w(kvm, i, L.N_KIND), kind)
    mem.store(_w(kvm, i, L.N_OWNER), owner)
    mem.store(_w(kvm, i, L.N_NEXT), UNINIT_NEXT)
    mem.store(_w(kvm, i, L.N_HITS), 0)
    mem.store(_w(kvm, i, L.N_REFS), 0 if refcounted else -1)
    mem.store(_w(kvm, i, L.N_GEN), (mem.load(_w(kvm, i, L.N_GEN)) | 1) + 1)  # the next even one
    mem.store(_w(kvm, i, L.N_STATE), L.NODE_ALLOCATED)


def _list_seq_begin(kvm) -> int:
    """``NH_SEQ`` += 1, odd while the list changes; the new value. Like the kernel's seqcount tied to
    a lock (``seqcount_rwlock_t``, whose ``write_seqcount_begin`` asserts it), its writer holds
    ``mmu_lock`` (asserted): every list change (register, unregister) begins here."""
    lockdep_assert_held(kvm.mmu_lock, "mmu_lock")
    return kvm.mem.fetch_add(kvm.notifier_w + L.NH_SEQ, 1) + 1


def free_node(kvm, node: int) -> None:
    """Return a node to the pool, poisoned. The caller guarantees no reader can still see it
    (it was unregistered, which waited for an SRCU grace period); a node still on the list, or
    still holding counted registrations (node-refcount), is freed all the same after a WARN (the
    model keeps the bug's consequence: walkers meet the poison)."""
    mem = kvm.mem
    st = mem.load(_w(kvm, node, L.N_STATE))
    refs = mem.load(_w(kvm, node, L.N_REFS))
    if st == L.NODE_LIVE or refs > 0:
        held = f" ({refs} registration{'s' if refs != 1 else ''} held)" if refs > 0 else ""
        kvm.warn("free_live_node", f"freeing notifier node {node} that is still registered{held}", node=node,
                 refs=refs)
    # first an odd generation: the poison and the end of every walker's cached view of the node
    # (vm/write_path.py) in one store; a second free stores the same odd value
    mem.store(_w(kvm, node, L.N_GEN), mem.load(_w(kvm, node, L.N_GEN)) | 1)
    mem.store(_w(kvm, node, L.N_NEXT), POISON_NEXT)
    mem.store(_w(kvm, node, L.N_REFS), -1)
    mem.store(_w(kvm, node, L.N_STATE), L.NODE_POISON)


def release_node(kvm, node: int) -> None:
    """Teardown of a node's owner (VM destruction, the design's teardown): drop every registration
    the node still holds — all of a counted node's (node-refcount: one unregister would only
    decrement) — with one unlink and its grace period, then free it."""
    if node_state(kvm, node) == L.NODE_LIVE:
        _unregister(kvm, node, every=True)
    free_node(kvm, node)


def kvm_page_track_register_notifier(kvm, node: int) -> bool:
    """hlist_add_head_rcu under mmu_lock (arch/x86/kvm/mmu/page_track.c). A node already on the list:
    - counted (node-refcount, Maxim's "refcount in struct kvm_page_track_notifier_node"): one more
      registration held, the list is unchanged;
    - ``cfg.redundant_registration == "warn"``: WARN and refuse (the check Sean asks for);
    - ``"mainline"``: what v6.0 and v6.6 do (no check) — a second hlist_add_head_rcu: ``n->next``
      becomes the old head (itself if it was the head), the head becomes ``n``: the list is a cycle
      and every walk from now on never ends (``notifier_cycle`` diagnoses it). Which registration
      did it is recorded (``NH_CYCLE``, ``NH_CYCLE_BY``: simulation bookkeeping, no WARN here).
    A node still RETIRING (its unregister waits for the SRCU grace period) is refused with a WARN:
    linking it again would leave a listed node that its unregister then marks unregistered."""
    mem = kvm.mem
    h = kvm.notifier_w
    with kvm.mmu_lock:
        lockdep_assert_held(kvm.mmu_lock, "mmu_lock")  # every path below, the count-only ones too
        st = mem.load(_w(kvm, node, L.N_STATE))
        refs = mem.load(_w(kvm, node, L.N_REFS))
        relink = False
        if st == L.NODE_LIVE and refs > 0:  # node-refcount: only the count changes
            mem.store(_w(kvm, node, L.N_REFS), refs + 1)
            kvm.count("register")
            return True
        if st == L.NODE_LIVE:
            if kvm.cfg.redundant_registration != "mainline":
                mem.fetch_add(h + L.NH_REDUNDANT, 1)
                kvm.warn("redundant_registration",
                         f"redundant registration of live notifier node {node} "
                         f"(kind {mem.load(_w(kvm, node, L.N_KIND))}, owner {mem.load(_w(kvm, node, L.N_OWNER))})",
                         node=node)
                return False
            relink = True
        if st == L.NODE_RETIRING:
            kvm.warn("register_retiring",
                     f"registration of notifier node {node} while its unregister waits for the SRCU grace "
                     f"period (refused: the node would stay listed after that unregister returns)", node=node)
            return False
        if st == L.NODE_POISON:
            kvm.poisoned("notifier node (register)", node=node)
            return False
        seq = _list_seq_begin(kvm)  # odd: the list is changing
        if relink:  # mainline: the node is on the list already; this add closes a cycle
            if not mem.load(h + L.NH_CYCLE):
                mem.store(h + L.NH_CYCLE_BY, kvm.tag << 32 | mem.load(h + L.NH_REGISTERED) + 1)
                mem.store(h + L.NH_CYCLE, node + 1)
        else:
            mem.store(_w(kvm, node, L.N_REGSEQ), seq)  # this registration's identity, before LIVE
        mem.store(_w(kvm, node, L.N_NEXT), mem.load(h + L.NH_HEAD))
        if fuzz.ACTIVE:
            fuzz.point("notifier.init_to_publish")
        mem.store(h + L.NH_HEAD, node + 1)  # release: the node is complete before it is visible
        if not relink:
            mem.store(_w(kvm, node, L.N_STATE), L.NODE_LIVE)  # after linking: LIVE => on the list
            mem.fetch_add(h + L.NH_LIVE, 1)
            if refs == 0:
                mem.store(_w(kvm, node, L.N_REFS), 1)
        mem.fetch_add(h + L.NH_REGISTERED, 1)
        mem.fetch_add(h + L.NH_SEQ, 1)
    kvm.count("register")
    return True


def kvm_page_track_unregister_notifier(kvm, node: int) -> bool:
    """hlist_del_rcu under mmu_lock, then synchronize_srcu(track_srcu). False (with a WARN) if
    the node was not registered. A counted node (node-refcount) drops one registration and is
    unlinked only when it was the last."""
    return _unregister(kvm, node, every=False)


def _unregister(kvm, node: int, every: bool) -> bool:
    """``every``: drop all of a counted node's registrations at once (``release_node``)."""
    mem = kvm.mem
    h = kvm.notifier_w
    with kvm.mmu_lock:
        lockdep_assert_held(kvm.mmu_lock, "mmu_lock")  # every path below, the count-only ones too
        if mem.load(_w(kvm, node, L.N_STATE)) != L.NODE_LIVE:
            kvm.warn("unregister_unregistered", f"unregister of notifier node {node} that is not registered",
                     node=node)
            return False
        refs = mem.load(_w(kvm, node, L.N_REFS))
        if refs > 1 and not every:  # node-refcount: other registrations still hold it; the list is unchanged
            mem.store(_w(kvm, node, L.N_REFS), refs - 1)
            kvm.count("unregister")
            return True
        nxt = mem.load(_w(kvm, node, L.N_NEXT))
        link = h + L.NH_HEAD
        nmax = kvm.nodes.shape[0]
        for _ in range(nmax + 1):  # bounded: a corrupt (cyclic) list must not spin under mmu_lock
            cur = mem.load(link)
            if cur == 0 or not 0 < cur <= nmax:  # not on the list, or a bad pointer: registry corrupt
                kvm.warn("list_corrupt", f"notifier node {node} live but not on the list (link {cur})",
                         node=node)
                return False
            if cur == node + 1:
                break
            link = _w(kvm, cur - 1, L.N_NEXT)
        else:
            kvm.warn("list_corrupt", f"notifier list loops: node {node} not found in {nmax} steps", node=node)
            return False
        _list_seq_begin(kvm)  # odd: the list is changing
        mem.store(_w(kvm, node, L.N_STATE), L.NODE_RETIRING)  # before unlinking: LIVE => on the list
        if refs >= 1:
            mem.store(_w(kvm, node, L.N_REFS), 0)
        mem.store(link, nxt)
        mem.fetch_add(h + L.NH_LIVE, -1)
        mem.fetch_add(h + L.NH_UNREGISTERED, 1)
        mem.fetch_add(h + L.NH_SEQ, 1)
    if fuzz.ACTIVE:
        fuzz.point("notifier.unlink_to_synchronize_srcu")  # walkers may still stand on the node
    if "no-synchronize-srcu" not in kvm.hooks:
        kvm.track_srcu.synchronize()
    mem.store(_w(kvm, node, L.N_STATE), L.NODE_ALLOCATED)
    kvm.count("unregister")
    return True


def handler(kvm, node: int):
    """This process' handler object for ``node`` (re-created when the slot was reused)."""
    return handler_entry(kvm, node, kvm.mem.load(kvm.nodes_w + node * 8 + L.N_GEN))[1]


def handler_entry(kvm, node: int, gen: int) -> tuple:
    """Cached ``(gen, handler, bound track_write)`` for ``node`` at generation ``gen``."""
    cached = kvm.handlers.get(node)
    if cached is not None and cached[0] == gen:
        return cached
    mem = kvm.mem
    kind = mem.load(_w(kvm, node, L.N_KIND))
    cls = KINDS.get(kind)
    if cls is None:
        raise RuntimeError(f"notifier node {node} has unknown kind {kind}")
    obj = cls(kvm, node, mem.load(_w(kvm, node, L.N_OWNER)))
    entry = (gen, obj, obj.track_write)
    kvm.handlers[node] = entry
    return entry


def srcu_lockdep_warn(kvm) -> None:
    """A walk found itself outside a ``track_srcu`` read-side section: the kernel's
    ``RCU_LOCKDEP_WARN`` in ``hlist_for_each_entry_srcu`` (a splat: LockdepError, the run's FAILURE).
    Both walks raise it: this one and the write path's (vm/write_path.py)."""
    raise LockdepError("lockdep: page-track notifier list (track_srcu) traversed outside an SRCU read-side "
                       "critical section (srcu_read_lock_held() is false)")


def walk(kvm, fn) -> int:
    """Call ``fn(handler, node)`` for every node on the list, under the SRCU read lock.
    Returns the number of nodes visited; stops at a poisoned node (reported)."""
    mem = kvm.mem
    srcu = kvm.track_srcu
    nmax = kvm.nodes.shape[0]
    calls = 0
    srcu.read_lock()
    try:
        if LOCKDEP and not srcu.reader.nesting():  # hlist_for_each_entry_srcu(..., srcu_read_lock_held())
            srcu_lockdep_warn(kvm)
        n = mem.load(kvm.notifier_w + L.NH_HEAD)
        while n:
            if not 0 < n <= nmax:
                kvm.poisoned("notifier list pointer", pointer=n)
                break
            if calls >= nmax:  # longer than the pool: a cycle
                notifier_cycle(kvm)
                break
            i = n - 1
            base = kvm.nodes_w + i * 8
            if mem.load(base + L.N_STATE) == L.NODE_POISON:
                kvm.poisoned("notifier node (walk)", node=i)
                break
            fn(handler(kvm, i), i)
            calls += 1
            n = mem.load(base + L.N_NEXT)
    finally:
        srcu.read_unlock()
    return calls


def registered_at_destroy(kvm) -> list[str]:
    """VM destruction, after every owner's teardown: nodes still registered. Since v6.6 each
    registration holds a VM reference (``kvm_get_kvm`` in ``kvm_page_track_register_notifier``,
    put by unregister): one left means the VM is never freed (what kmemleak reports). v6.0 takes
    no reference, and has nothing to report here (``page_track`` picks the era). A pool scan, not
    a walk: a list made a cycle by a redundant registration must not hang teardown."""
    if kvm.cfg.page_track != "v6.6":
        return []
    mem = kvm.mem
    left = [i for i in range(kvm.nodes.shape[0])
            if mem.load(_w(kvm, i, L.N_STATE)) in (L.NODE_LIVE, L.NODE_RETIRING)]
    if not left:
        return []
    return [f"{len(left)} notifier node(s) still registered at VM destruction (node {left[0]}): each "
            "registration holds a VM reference (kvm_get_kvm), the VM is never freed"]


def live_nodes(kvm) -> list[int]:
    """Nodes on the list, head first (diagnostics; takes the SRCU read lock)."""
    out: list[int] = []
    walk(kvm, lambda h, i: out.append(i))
    return out
