"""One VM's write path in this process, as one Python frame per call: an L1 store's fault check
(``page_fault_handle_page_track``), ``emulator_write_phys`` and ``kvm_page_track_write`` (the
concepts and their documentation are in vm/page_track.py; this module is their bound hot path).

``_write`` is the whole path; each entry point is ``_write`` with another default ``how``, and the
steps fall through like the kernel's call chain: FAULT (a RAM gfn that is not write-tracked is
stored through the guest's writable mapping: -1; anything else faults) -> EMULATE (guest memory,
then the walk for RAM; MMIO walks only with ``cfg.mmio_walk``) -> WALK (the SRCU walk alone).

Why a namespace and not a closure: a closure copies every cell it reads into each new frame
(``COPY_FREE_VARS``: a reference taken per cell at the call, dropped at the return). The write path
reads 27 names; as closure cells they cost more than the whole rest of a trivial call (callgrind,
per call: 1,314 instructions with 27 cells, 810 with 1, 730 with 27 globals). So ``bind`` gives
``_write`` one VM's namespace as its globals: a copy of this module's namespace in which the names
declared below hold that VM's values. The counters it updates (``left``, ``e_left``, ``w_left``)
are globals of that namespace, shared by the three entry points.

Sampled latency (ipc/hist.py): the emulated write and the walk each count down to the one
operation in about ``cfg.latency_sample`` they time (``*_left``: operations to go, the last one
timed, which keeps it at 1 until it is sampled, so that if it raises the next one is timed; with
no stats it starts at 0 and never reaches 0 again); ``sample`` records the timed one
weighted by its interval and returns the next; ``settle`` counts the operations run since (at each
counter flush), so the histogram counts stay exact.

Exact call accounting (vm.mirror.WriteAccounting), when this process has it: each emulated RAM
write counts ``left`` down; the one that reaches 0 walks through ``checkpoint``, which judges it
alone and the others in aggregate.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from ipc import _prims, fuzz, trace
from ipc.locks import LOCKDEP, always_held
from vm import layout as L
from vm import mmu, notifier
from vm.faults import notifier_cycle
from vm.notifier import POISON_NEXT, srcu_lockdep_warn  # (srcu_lockdep_warn: a global of the bound namespace)

FAULT, EMULATE, WALK = 0, 1, 2  # where a call of the write path begins (module doc)
PAGE_SHIFT = L.PAGE_SHIFT
stats_clock = _prims.stats_clock  # spans in stats-clock readings (the TSC: no vDSO page, often cold)

# -- one VM's names: placeholders here; ``bind`` fills them in the VM's namespace -------------------
_UNBOUND: Any = None
kvm: Any = _UNBOUND
load: Callable[[int], int] = _UNBOUND  # kvm.mem.load
head_w: int = _UNBOUND  # the list head word
nodes_w: int = _UNBOUND  # word of node 0
nmax: int = _UNBOUND  # the node pool's size: a longer walk is a cycle
guest_write: Callable[[int, bytes], None] = _UNBOUND  # a store to guest memory
track_mv: memoryview = _UNBOUND  # gfn_write_track counts
ram_end: int = _UNBOUND  # first gpa after the memslots (contiguous from 0)
mmio_walk: bool = _UNBOUND
srcu_lock: Callable[[], None] = _UNBOUND
srcu_unlock: Callable[[], None] = _UNBOUND
srcu_read_lock_held: Callable[[], int] = _UNBOUND  # this process' track_srcu read-side nesting
cache: dict[int, tuple] = _UNBOUND  # kvm.walk_cache: list pointer -> (gen word, gen, track_write, index, next word)
fz: Any = _UNBOUND  # this process' preemption points (ipc/fuzz.py), None = off
emit: Callable | None = _UNBOUND  # this process' trace ring (vm/tracepoints.py), None = no emission
W_B: int = _UNBOUND  # trace codes: emulated_write begin / end, track_write begin / end
W_E: int = _UNBOUND
T_B: int = _UNBOUND
T_E: int = _UNBOUND
sample_emul: Callable[[int], int] = _UNBOUND
sample_walk: Callable[[int], int] = _UNBOUND
acct: Any = _UNBOUND  # the accounting (its checkpoint and period) or _Unaccounted
node_entry: Callable[[int], tuple | None] = _UNBOUND
page_track_write: Callable[[int, bytes], int] = _UNBOUND  # the WALK entry point
# v6.6: kvm_mmu_track_write after the walk (vm/mmu.py), inlined up to its early return: the word of
# indirect_shadow_pages (never word 0), else 0 (v6.0: the handler is a node on the list); its count
# (counts[C_MMU], ``mmu_pte_write``) and the locked part
isp_w: int = _UNBOUND
counts: list = _UNBOUND
C_MMU: int = _UNBOUND
mmu_locked: Callable[[], None] = _UNBOUND


def _template():
    """``_write`` and the cells of the counters it updates (each VM gets cells of its own: ``bind``)."""
    left = e_left = w_left = 0

    def _write(gpa: int, new: bytes, how: int = EMULATE) -> int:
        nonlocal left, e_left, w_left
        if how == FAULT and gpa < ram_end and not track_mv[gpa >> PAGE_SHIFT]:
            guest_write(gpa, new)  # not write-protected: the guest's writable mapping
            return -1
        te = 0
        try:
            if how != WALK:
                # emulator_write_phys
                if emit:
                    emit(W_B, gpa, len(new))
                e_left -= 1
                if not e_left:  # this one is timed; 1 until it is sampled (if it raises, the next is)
                    e_left = 1
                    te = stats_clock()
                if gpa < ram_end:
                    guest_write(gpa, new)
                    left -= 1
                    if not left:
                        calls = acct.checkpoint(gpa, new, page_track_write)
                        left = acct.period  # (after: a violation makes it 1)
                        if te:
                            e_left = sample_emul(te)
                        return calls
                elif not mmio_walk:  # MMIO: read_write_mmio, no notifier (vm/page_track.py)
                    if te:
                        e_left = sample_emul(te)
                    return 0
            # kvm_page_track_write
            if not load(head_w):  # empty list: return at once
                if isp_w:  # v6.6: KVM's own handler is called whatever the list holds
                    counts[C_MMU] += 1
                    if load(isp_w):
                        mmu_locked()
                if te:
                    e_left = sample_emul(te)
                return 0
            tw = 0
            w_left -= 1
            if not w_left:
                w_left = 1
                tw = stats_clock()
            nbytes = len(new)
            calls = 0
            srcu_lock()
            try:
                if not srcu_read_lock_held():  # hlist_for_each_entry_srcu(..., srcu_read_lock_held())
                    srcu_lockdep_warn(kvm)
                n = load(head_w)
                while n:
                    try:
                        gen_w, gen, track_write, i, next_w = cache[n]
                        if load(gen_w) != gen:
                            raise KeyError(n)
                    except KeyError:
                        e = node_entry(n)
                        if e is None:
                            break
                        gen_w, gen, track_write, i, next_w = e
                    if calls >= nmax:  # longer than the pool: a cycle (the kernel's walk never ends)
                        notifier_cycle(kvm)
                        break
                    if emit:
                        emit(T_B, i, gpa)
                        try:  # no cost unless it raises; then the slice still ends
                            track_write(gpa, new, nbytes, i)
                        finally:
                            emit(T_E)
                    else:
                        track_write(gpa, new, nbytes, i)
                    calls += 1
                    if fz:
                        fz.hit("page_track.walk.call_to_next")  # still standing on the node
                    n = load(next_w)
            finally:
                srcu_unlock()
            if isp_w:  # v6.6: kvm_mmu_track_write
                counts[C_MMU] += 1
                if load(isp_w):
                    mmu_locked()
            if tw:
                w_left = sample_walk(tw)
            if te:
                e_left = sample_emul(te)
            return calls
        finally:  # no cost unless it raises; then the slice still ends
            if emit and how != WALK:
                emit(W_E)
    return _write


_WRITE = _template()  # (its code and default; bind makes the functions)


def _node_entry(n: int) -> tuple | None:
    """The walk met list pointer ``n`` with no valid cached view: check it (a poisoned pointer or
    node is reported, None = stop the walk), cache and return its view, valid while the node's
    N_GEN word holds that (even) generation: free_node's first store makes it odd, so a cached
    view fails exactly where a check of the node's poison would."""
    if not 0 < n <= nmax:
        kvm.poisoned("notifier list pointer", pointer=n, poison=n == POISON_NEXT)
        return None
    i = n - 1
    base = nodes_w + i * 8
    gen = load(base + L.N_GEN)
    if gen & 1 or load(base + L.N_STATE) == L.NODE_POISON:  # freed (vm/layout.py N_GEN)
        kvm.poisoned("notifier node (walk)", node=i)
        return None
    track_write = notifier.handler_entry(kvm, i, gen)[2]  # (looked up now: tests patch it)
    if kvm.trace_nodes is not None:  # page_track.record_walks(): this view records its calls
        track_write = _recording(track_write, kvm.trace_nodes)
    e = cache[n] = (base + L.N_GEN, gen, track_write, i, base + L.N_NEXT)
    return e


def _recording(track_write, visited: list):
    def recorded(gpa: int, new: bytes, nbytes: int, node: int) -> None:
        track_write(gpa, new, nbytes, node)
        visited.append(node)
    return recorded


class _Unaccounted:
    """The write path of a process without call accounting: its countdown (a small int: a larger
    one would be re-allocated at every decrement) wraps every 2**30 - 1 writes through a plain walk."""

    period = (1 << 30) - 1

    @staticmethod
    def checkpoint(gpa: int, new: bytes, page_track_write) -> int:
        return page_track_write(gpa, new)


def bind(kvm_):
    """``(emulator_write_phys, kvm_page_track_write, l1_store)`` of ``kvm_`` in this process."""
    ns = dict(globals())
    h_walk, h_emul = kvm_.h_notifier_walk, kvm_.h_emulated_write
    settle_old = kvm_.settle_samples.get("write_path")
    if settle_old is not None:  # re-bound: the old entry points' operations are counted first
        settle_old()
    tr = trace.ACTIVE
    acct_ = getattr(kvm_, "write_acct", None) or _Unaccounted
    (w_b, w_e), (t_b, t_e) = (tr.pair("emulated_write"), tr.pair("track_write")) if tr else ((0, 0), (0, 0))
    ns.update(
        kvm=kvm_, load=kvm_.mem.load, head_w=kvm_.notifier_w + L.NH_HEAD, nodes_w=kvm_.nodes_w,
        nmax=kvm_.cfg.max_nodes, guest_write=kvm_.guest_mem.write, track_mv=kvm_.gfn_track_mv,
        ram_end=kvm_.memory_pages << PAGE_SHIFT, mmio_walk=kvm_.cfg.mmio_walk,
        srcu_lock=kvm_.track_srcu.read_lock, srcu_unlock=kvm_.track_srcu.read_unlock,
        srcu_read_lock_held=kvm_.track_srcu.reader.nesting if LOCKDEP else always_held,
        cache=kvm_.walk_cache, fz=fuzz.ACTIVE, emit=tr.emit if tr else None,
        W_B=w_b, W_E=w_e, T_B=t_b, T_E=t_e,
        sample_emul=h_emul.sample if h_emul is not None else None,
        sample_walk=h_walk.sample if h_walk is not None else None,
        acct=acct_,
        isp_w=kvm_.flags_w + L.F_INDIRECT_SP if kvm_.cfg.page_track == "v6.6" else 0,
        counts=kvm_.counts, C_MMU=L.C["mmu_pte_write"], mmu_locked=mmu.bind_locked(kvm_))
    cells = {"left": types.CellType(acct_.period),
             "e_left": types.CellType(h_emul.start() if h_emul is not None else 0),
             "w_left": types.CellType(h_walk.start() if h_walk is not None else 0)}
    ns["node_entry"] = types.FunctionType(_node_entry.__code__, ns, "node_entry")
    # a code object of its own: the specialized global loads cache where in ``ns`` each name is,
    # and would thrash between the VMs of one process (tests, benchmarks) sharing one
    code = _WRITE.__code__.replace()
    closure = tuple(cells[name] for name in code.co_freevars)
    emulate_write, page_track_write, l1_store = (
        types.FunctionType(code, ns, name, (how,), closure)
        for name, how in (("emulator_write_phys", EMULATE), ("kvm_page_track_write", WALK), ("l1_store", FAULT)))
    ns["page_track_write"] = page_track_write

    def settle() -> None:
        if h_walk is not None:
            h_walk.settle(cells["w_left"].cell_contents)
        if h_emul is not None:
            h_emul.settle(cells["e_left"].cell_contents)

    kvm_.settle_samples["write_path"] = settle
    if acct_ is _Unaccounted:
        return emulate_write, page_track_write, l1_store
    walk_outside_write = acct_.walk_outside_write

    def page_track_write_accounted(gpa: int, new: bytes) -> int:
        return walk_outside_write(page_track_write, gpa, new)

    return emulate_write, page_track_write_accounted, l1_store
