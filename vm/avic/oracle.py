"""The oracle of the nested AVIC wing, every check in one place.

Invariants checked continuously, while the vCPUs run (a violation is a WARN, which fails the run):
- (I1) a vCPU in L2 on table t => t is VALID and its gfn write-tracked, or a reload request for
  that vCPU is pending (honoured at its next nested VMRUN, before it uses an entry again):
  ``check_vmrun`` (after the table is made ready), ``check_vmexit`` (before the request is
  consumed) and ``sample`` (the coordinator's sampling checker, every vCPU in L2);
- (I2) every L1 write to a table page that completed before a vCPU's nested VMRUN began is in every
  shadow entry the hardware may read on that VMRUN: ``check_vmrun`` (the vCPU's own entry at every
  VMRUN, every entry at one VMRUN in ``ALL_ENTRIES_EVERY``; a store still in flight — its writer has
  not reached its own next VMRUN — is left out);
- (I3) no freed table or node is ever read, by any reader, at any time (``kvm.poisoned``, at the
  reads themselves);
- (I4) mutual exclusion of every lock the AVIC code takes (locktorture-style held flags).

Checked by ``final`` at the end (coordinator, vCPUs stopped), besides the counts of the above:
- (F-shadow) every VALID shadow table equals the translation of its guest table, entry by entry,
  with the cached guest entry and valid bitmap in step ("lost write");
- (F-ref) refcount = vCPUs holding the table, usecount = vCPUs in guest mode on it;
- (F-index) the design's index (gfn hash chains, RCU list) links exactly the live tables, each once,
  in the right bucket (``check_chain``, ``check_linked``, the designs' ``_check_structure``);
- (F-one) at most one live table per gfn, and gfn_write_track of each table page = the live tables
  that write-protect it, never wrapped;
- (F-notifier) a live table's writes are seen: its notifier node (shared or its own) is registered,
  the shared node's user count = live tables, and (refcount) unregistered once none is live;
- (F-warn) no redundant registration, no registration while write tracking is disabled;
- (F-lock) no lock still held after the run.
"""

from __future__ import annotations

from ipc import _prims
from vm import layout as L
from vm import notifier
from vm.avic.table import (
    ALL_ENTRIES_EVERY,
    ALLOC,
    AVIC_APIC_ID_MASK,
    AVIC_VALID,
    CS,
    CS_FAILS,
    H_BUSY,
    H_I1,
    H_I2,
    H_NODE,
    H_RELOAD_BAD,
    H_SEQ,
    H_UNTRACKED_REG,
    H_USERS,
    IF_COUNT,
    IF_STARTS,
    LIVE,
    MASK64,
    POISON,
    RETIRING,
    STATE_NAMES,
    T_EPOCH,
    T_GFN,
    T_L2,
    T_NEXT,
    T_NODE,
    T_REF,
    T_REQSEQ,
    T_STATE,
    T_TRACKED,
    T_USE,
    TRACKING,
    TW,
    V_CUR,
    V_GSEEN,
    V_GT,
    V_INGUEST,
    V_INL2,
    V_L2SEQ,
    V_RELOAD,
    VALID,
    VW,
    describe,
    u64,
)
from vm.nested import table_gfn
from vm.page_track import (
    PAGE_SHIFT,
)


def final(d) -> list[str]:
    """Coordinator, vCPUs stopped: every violation, in words (empty = good)."""
    kvm = d.kvm
    if d.region is None or d.region.closed:
        return ["nested AVIC: no avic region (setup() not run)"]
    kvm.flush_counts()  # this process' count() tallies (in-process scenarios)
    m = d.amem
    bad: list[str] = []
    cur = [m.load(d.vw0 + v * VW + V_CUR) - 1 for v in range(d.nvcpus)]
    inguest = [m.load(d.vw0 + v * VW + V_INGUEST) - 1 for v in range(d.nvcpus)]
    live_by_gfn: dict[int, list[int]] = {}
    tracked_by_gfn: dict[int, int] = {}
    nlive = 0
    for t in range(d.nt):
        b = d.tw0 + t * TW
        st = m.load(b + T_STATE)
        if st in (ALLOC, TRACKING, RETIRING):
            bad.append(f"avic_physid_table slot {t} stuck in state {STATE_NAMES[st]} after the run")
        if st not in LIVE:
            continue
        nlive += 1
        gfn, l2 = m.load(b + T_GFN), m.load(b + T_L2)
        name = f"shadow physid table gfn {gfn:#x} (L2 {l2}, slot {t})"
        if not 0 <= gfn < d.mem_pages:  # a live state on a freed (scribbled) slot
            bad.append(f"{name}: live (state {STATE_NAMES[st]}) but its gfn is not a guest page: freed "
                       f"memory reused as a live table")
            continue
        live_by_gfn.setdefault(gfn, []).append(t)
        if m.load(b + T_TRACKED):
            tracked_by_gfn[gfn] = tracked_by_gfn.get(gfn, 0) + 1
        ref, use = m.load(b + T_REF), m.load(b + T_USE)
        holders = [v for v in range(d.nvcpus) if cur[v] == t]
        if ref != len(holders):
            bad.append(f"{name}: refcount {ref} but {len(holders)} vCPUs hold it {holders}")
        elif ref == 0:  # the last put frees a table: a live one nobody holds leaked
            bad.append(f"{name}: live with refcount 0, no vCPU holds it: its last put did not free it (leak)")
        users = [v for v in range(d.nvcpus) if inguest[v] == t]
        if use != len(users):
            bad.append(f"{name}: usecount {use} but {len(users)} vCPUs in guest mode on it")
        if not d.shared_node:
            node = m.load(b + T_NODE) - 1
            if node < 0 or notifier.node_state(kvm, node) != L.NODE_LIVE:
                bad.append(f"{name} is live but its notifier node {node} is not registered: writes "
                           f"to it are not seen")
            elif d.registration == "node-refcount":  # one registration per vCPU holding the table
                _node_refs(kvm, bad, node, ref, f"{name}'s refcount")
        if st == VALID:
            gbase = gfn << 9
            cb, sb = d.cache0 + t * d.ne, d.shadow0 + t * d.ne
            for e in range(d.ne):
                g = u64(d.gmem.load(gbase + e))
                c, sh = u64(m.load(cb + e)), u64(m.load(sb + e))
                exp = d._translate(g)
                if sh != exp:
                    bad.append(f"lost write: {name} entry {e}: shadow {sh:#018x} != translation "
                               f"{exp:#018x} of guest entry {describe(g)} (cached {c:#018x})")
                elif c != g:
                    bad.append(f"lost write: {name} entry {e}: cached guest entry {describe(c)} != "
                               f"guest entry {describe(g)}")
                vb = (u64(m.load(d.valid0 + t * 4 + (e >> 6))) >> (e & 63)) & 1
                if vb != (c >> 63):
                    bad.append(f"{name} entry {e}: valid bitmap {vb} != cached Valid {c >> 63}")
    d._check_structure(bad)
    _check_vref(d, bad)
    for gfn, ts in live_by_gfn.items():
        if len(ts) > 1:
            bad.append(f"gfn {gfn:#x} has {len(ts)} live shadow tables (slots {ts})")
    # page-track counts of the table pages: exactly one per tracking table, never wrapped
    for l2 in range(d.cfg.l2s):
        gfn = table_gfn(d.cfg, l2)
        have, want = int(kvm.gfn_track[gfn]), tracked_by_gfn.get(gfn, 0)
        if have != want:
            wrapped = " (wrapped)" if have > 0x8000 else ""
            bad.append(f"gfn_write_track[{gfn:#x}] = {have}{wrapped}, but {want} live tables "
                       f"write-protect it")
    if d.shared_node:
        node = d._h(H_NODE) - 1
        live = node >= 0 and notifier.node_state(kvm, node) == L.NODE_LIVE
        if nlive and not live:
            bad.append(f"nested AVIC notifier node {node} is not registered while {nlive} shadow "
                       f"tables are live: writes to them are lost")
        users = d._h(H_USERS)
        if users != nlive:
            bad.append(f"shared notifier node: {users} users counted, {nlive} live tables")
        if d.registration in ("refcount", "node-refcount") and not nlive and live:
            bad.append(f"nested AVIC notifier node {node} still registered with no table live")
        if d.registration == "node-refcount" and node >= 0:  # one registration per user (table)
            _node_refs(kvm, bad, node, users, "users counted (H_USERS)")
    redundant = kvm.mem.load(kvm.notifier_w + L.NH_REDUNDANT)
    if redundant:
        bad.append(f"{redundant} redundant registration(s) of a live page-track notifier node (WARN)")
    untracked = d._h(H_UNTRACKED_REG)
    if untracked:
        bad.append(f"{untracked} page-track notifier registration(s) while write tracking was "
                   f"disabled (WARN: untracked notifier)")
    counters = kvm.vm.v["counters"]
    stale = int(counters[:, L.C["stale_entries"]].sum())
    if stale:
        bad.append(f"{stale} nested VMRUN(s) ran on a stale shadow physid entry")
    rb = d._h(H_RELOAD_BAD)
    if rb:
        bad.append(f"{rb} time(s) a vCPU was still in L2 on an erased shadow table after the reload "
                   f"request returned (KVM_REQUEST_WAIT not honoured)")
    i1 = d._h(H_I1)
    if i1:
        bad.append(f"(I1) {i1} time(s) a vCPU was in L2 on a shadow table that was no longer shadowed, "
                   f"with no reload request pending")
    del counters
    if kvm.poison_reads:
        bad.append(f"{kvm.poison_reads} read(s) of poisoned (freed) memory")
    for i, lname in enumerate(CS):
        fails = m.load(d.cs0 + i * 8 + CS_FAILS)
        if fails:
            bad.append(f"lock {lname}: mutual exclusion violated {fails} times")
    tfails = sum(m.load(d.tcs0 + t * 8 + CS_FAILS) for t in range(d.nt))
    if tfails:
        bad.append(f"lock avic_table_lock: mutual exclusion violated {tfails} times")
    for lname in ("tables_lock", "avic_physid_lock", "avic_tables_spin", "mmu_lock"):
        owner = kvm.locks[lname].owner()
        if owner:
            bad.append(f"lock {lname} still held (owner tag {owner}) after the run")
    return bad


def _check_vref(d, bad: list[str]) -> None:
    """(F-vref) each L1 vCPU's count of references in each table (``vref``) = the valid cached
    entries of that table that name it (a count off by one skips or re-visits a table at
    vcpu_load / put: a missed IsRunning flip)."""
    m = d.amem
    for t in range(d.nt):
        want = [0] * d.nvcpus
        if m.load(d.tw0 + t * TW + T_STATE) != POISON:
            for e in range(d.ne):
                c = u64(m.load(d.cache0 + t * d.ne + e))
                if c & AVIC_VALID and (c & AVIC_APIC_ID_MASK) < d.nvcpus:
                    want[c & AVIC_APIC_ID_MASK] += 1
        for v in range(d.nvcpus):
            have = m.load(d.vref0 + v * d.nt + t)
            if have != want[v]:
                bad.append(f"avic_physid_table slot {t}: vCPU {v}'s reference count {have} != {want[v]} "
                           f"cached entries naming it (physid_ref_entries)")


def _node_refs(kvm, bad: list[str], node: int, want: int, what: str) -> None:
    """node-refcount: the count in notifier node ``node`` (``N_REFS``) must be ``want``; one short
    unlinks the node while a user still needs it, one over never unlinks it."""
    refs = max(kvm.mem.load(kvm.nodes_w + node * 8 + L.N_REFS), 0)
    if refs != want:
        bad.append(f"notifier node {node} holds {refs} registration(s) (N_REFS), but {want} {what}")


def _table_snapshot(d, v: int, t: int, gfn: int, entries=()) -> tuple | None:
    """(state, tracked, reload pending for vCPU ``v``, epoch, [(entry, shadow, guest, translation)]) of
    table ``t`` (on ``gfn``), taken while no drop / invalidation / IsRunning flip was half-done
    (``H_SEQ``), with the entries whose writer had a store to this page in flight left out; None if
    no consistent snapshot could be taken (counted as skipped)."""
    m = d.amem
    load = m.load
    b = d.tw0 + t * TW
    seq_w = d.hdr0 + H_SEQ
    busy_w = d.hdr0 + H_BUSY
    for _ in range(16):
        s1 = load(seq_w)
        if s1 & 1 or load(busy_w):
            _prims.sched_yield()
            continue
        st, tracked, epoch = load(b + T_STATE), load(b + T_TRACKED), load(b + T_EPOCH)
        reload = _excused(d, v, t)
        seen = []
        if st == VALID:  # tracked or not (split: VALID before write tracking was enabled)
            row = d.if0 + load(b + T_L2) * d.ne * 2
            for e in entries:
                iw = row + e * 2  # L1 stores to entry e: begun, and still in flight
                starts = load(iw + IF_STARTS)
                if load(iw + IF_COUNT):
                    continue  # a store to it has not completed yet
                sh = load(d.shadow0 + t * d.ne + e) & MASK64
                g = d.gmem.load((gfn << 9) + e) & MASK64
                exp = d._translate(g)
                if load(iw + IF_STARTS) != starts or load(iw + IF_COUNT):
                    continue  # one began meanwhile
                seen.append((e, sh, g, exp))
        if load(seq_w) == s1:
            return st, tracked, reload, epoch, seen
    return None


def _excused(d, v: int, t: int) -> bool:
    """A reload request is pending for vCPU ``v`` that is at least as new as table ``t``'s latest
    erase (an older one, for another table, does not tell it about this one)."""
    r = d.amem.load(d.vw0 + v * VW + V_RELOAD)
    return r != 0 and r >= d.amem.load(d.tw0 + t * TW + T_REQSEQ)


def _unshadowed(d, v: int, t: int, st: int, tracked: int, where: str) -> None:
    """(I1) violated: report it (a WARN fails the run) and count it for the final oracle."""
    d.amem.fetch_add(d.hdr0 + H_I1, 1)
    gfn = d.amem.load(d.tw0 + t * TW + T_GFN)
    what = STATE_NAMES[st] if 0 <= st < len(STATE_NAMES) else str(st)
    d.kvm.warn("l2_on_unshadowed_table",
               f"(I1) vCPU {v} {where} in L2 on shadow physid table slot {t} (gfn {gfn:#x}) that is {what}"
               f"{'' if tracked else ', not write-protected'}, with no reload request pending: L1's writes "
               f"to it are not seen, the hardware may use stale entries", vcpu=v, table=t, gfn=gfn, state=st)


def check_vmrun(d, v: int, t: int, l2: int, gfn: int) -> None:
    """At nested VMRUN, the table ready: (I1) it is VALID and write-protected, or a reload request
    for this vCPU is pending; (I2) every entry the hardware may read equals the translation of its
    guest entry, unless that entry's store is still in flight (the vCPU's own entry at every VMRUN,
    all entries at one VMRUN in ``ALL_ENTRIES_EVERY``)."""
    d.vmruns_checked += 1
    tg = d.amem.load(d.tw0 + t * TW + T_GFN)
    if tg != gfn:
        d.kvm.count("stale_entries")
        d.kvm.warn("wrong_table", f"vCPU {v} nested VMRUN into L2 {l2} (physid table gfn {gfn:#x}) on shadow "
                                  f"table slot {t} of gfn {tg:#x}", vcpu=v, l2=l2, table=t)
        return
    every = d.vmruns_checked >= ALL_ENTRIES_EVERY
    if every:
        d.vmruns_checked = 0
    else:  # the common case first, inline: table VALID and tracked, own entry up to date
        m = d.amem
        load, seq_w, b = m.load, d.hdr0 + H_SEQ, d.tw0 + t * TW
        e = v % d.ne
        s1 = load(seq_w)
        if not s1 & 1 and not load(d.hdr0 + H_BUSY) and load(b + T_STATE) == VALID and load(b + T_TRACKED):
            epoch = load(b + T_EPOCH)
            sh = load(d.shadow0 + t * d.ne + e) & MASK64
            if sh == d._translate(d.gmem.load((gfn << 9) + e) & MASK64) and load(seq_w) == s1:
                d.entered_epoch[v] = epoch  # what check_vmexit compares with
                return
    snap = _table_snapshot(d, v, t, gfn, range(d.ne) if every else (v % d.ne,))
    if snap is None:
        d._stat("invariant_skipped")
        d.entered_epoch.pop(v, None)
        return
    st, tracked, reload, epoch, seen = snap
    d.entered_epoch[v] = epoch
    if st != VALID or not tracked:
        if reload:
            d._stat("stale_check_skipped")  # changed meanwhile, and this vCPU was told to reload
            return
        _unshadowed(d, v, t, st, tracked, f"entering L2 {l2}")
        if st != VALID:
            return
        # VALID but never write-protected (split: made before tracking was enabled): its entries are
        # what the hardware reads, so L1 writes that missed it are lost writes, checked below (I2)
    if every:
        d._stat("entries_checked", len(seen))
    for e, sh, g, exp in seen:
        if sh != exp:
            d.kvm.count("stale_entries")
            d.amem.fetch_add(d.hdr0 + H_I2, 1)
            gpa = (gfn << PAGE_SHIFT) + e * 8
            d.kvm.warn("stale_entry",
                       f"vCPU {v} nested VMRUN into L2 {l2} on a stale shadow physid entry: table gfn "
                       f"{gfn:#x} entry {e}: shadow {sh:#018x} != translation {exp:#018x} of guest entry "
                       f"{describe(g)} (lost write to gpa {gpa:#x})",
                       vcpu=v, l2=l2, gfn=gfn, entry=e, shadow=sh, expected=exp)


def check_vmexit(d, v: int, t: int) -> None:
    """At nested VMEXIT (before the reload request is consumed): (I1) the table the vCPU ran L2 on
    is still VALID and write-protected and was neither dropped nor invalidated meanwhile (its epoch
    is the one seen at VMRUN: a drop undone by another vCPU's re-sync is caught too), or the vCPU was
    told to reload."""
    m = d.amem
    if _excused(d, v, t):
        return  # told to reload since the table's latest erase: whatever its state, I1 holds
    entered = d.entered_epoch.pop(v, None)
    seq_w, b = d.hdr0 + H_SEQ, d.tw0 + t * TW
    s1 = m.load(seq_w)
    if (not s1 & 1 and not m.load(d.hdr0 + H_BUSY) and m.load(b + T_STATE) == VALID and m.load(b + T_TRACKED)
            and (entered is None or m.load(b + T_EPOCH) == entered) and m.load(seq_w) == s1):
        return  # the common case, in five loads
    snap = _table_snapshot(d, v, t, -1)
    if snap is None:
        d._stat("invariant_skipped")
        return
    st, tracked, reload, epoch, _ = snap
    if reload:
        return
    if st != VALID or not tracked:
        _unshadowed(d, v, t, st, tracked, "ran")
    elif entered is not None and epoch != entered:
        _unshadowed(d, v, t, st, tracked, f"ran (the table was dropped or invalidated {epoch - entered} "
                                          f"time(s) meanwhile, and shadowed again by another vCPU)")


def sample(d) -> None:
    """The sampling checker (coordinator, while the vCPUs run): (I1) for every vCPU in L2 now."""
    m = d.amem
    for v in range(d.nvcpus):
        vw = d.vw0 + v * VW
        s1 = m.load(vw + V_L2SEQ)
        if not s1 & 1:
            continue
        t = m.load(vw + V_INL2) - 1
        snap = _table_snapshot(d, v, t, -1) if 0 <= t < d.nt else None
        if snap is None or m.load(vw + V_L2SEQ) != s1:
            continue
        d._stat("invariant_check")
        st, tracked, reload, _, _ = snap
        if (st != VALID or not tracked) and not reload:
            _unshadowed(d, v, t, st, tracked, "is (sampling checker)")


def check_reloaded(d, t: int, targets: list[tuple[int, int]], m=None) -> None:
    """After ``kvm_make_all_cpus_request(KVM_REQ_APIC_PAGE_RELOAD)`` with ``KVM_REQUEST_WAIT``
    returned for erased table ``t``: no vCPU that was in L2 when the request was made is still in
    that same L2 run on ``t`` (its entries zeroed, its pages about to be unpinned). ``m``: the
    memory view to read (default ``d.amem``; the checker's ``d._smem`` adds no scheduling point)."""
    m = d.amem if m is None else m
    for v, s in targets:
        vw = d.vw0 + v * VW
        if m.load(vw + V_L2SEQ) == s and m.load(vw + V_INL2) == t + 1:
            m.fetch_add(d.hdr0 + H_RELOAD_BAD, 1)
            gfn = m.load(d.tw0 + t * TW + T_GFN)
            d.kvm.warn("l2_on_erased_table",
                       f"vCPU {v} still in L2 on erased shadow physid table slot {t} (gfn {gfn:#x}) after "
                       f"kvm_make_all_cpus_request(KVM_REQ_APIC_PAGE_RELOAD) returned: the request did not "
                       f"wait for it to leave, its pages are unpinned under the hardware", vcpu=v, table=t)
    check_missed(d, t, targets)


def check_missed(d, t: int, targets) -> None:
    """The vCPUs the request did not kick: none may be in an L2 run on erased table ``t`` that it
    committed to (its request check found nothing) without having served this request. The entry's
    full barrier (the L2 seqcount's locked increment before the request check) and the request's
    (before the scan of the seqcounts) make one of the two see the other: a vCPU that missed the
    request was seen in L2 and kicked. Read from the vCPU's own record (``V_GT``, ``V_GSEEN``,
    written without a scheduling point at the moment it committed / served): a store buffer that
    still hides its seqcount from the scan does not hide this (docs/explore.md, memory model tso)."""
    seq = getattr(targets, "seq", 0)
    if not seq:
        return
    kicked = {v for v, _ in targets}
    sm = d._smem
    for v in range(d.nvcpus):
        vw = d.vw0 + v * VW
        if v not in kicked and sm.load(vw + V_GT) == t + 1 and sm.load(vw + V_GSEEN) < seq:
            sm.fetch_add(d.hdr0 + H_RELOAD_BAD, 1)
            d.kvm.warn("l2_on_erased_table",
                       f"vCPU {v} in L2 on erased shadow physid table slot {t} since before reload request "
                       f"{seq} (its request check did not see it) and not kicked by it: the request's scan "
                       f"did not see it enter L2 (entry and request not ordered store -> load)", vcpu=v, table=t)


def check_write_done(d) -> None:
    """A notifier callback of this process (an emulated write's ``track_write``, a memslot removal's
    ``track_remove_region``) returned: the write it handled is complete, so every reload request its
    erases made must have been waited for (``KVM_REQUEST_WAIT``): no vCPU kicked then is still in
    that same L2 run on the erased table (``check_reloaded``). Run whether or not the wait ran:
    after a correct wait it finds nothing (a vCPU in L2 again is in another run: its L2 seqcount
    moved)."""
    owed, d.reload_owed = d.reload_owed, []
    for t, targets in owed:
        check_reloaded(d, t, targets, d._smem)  # (the checker's view: no scheduling point)


def check_chain(d, bad: list[str], what: str, head_w: int, seen: dict[int, str]) -> None:
    m = d.amem
    n, steps = m.load(head_w), 0
    while n:
        if not 0 < n <= d.nt or steps > d.nt:
            bad.append(f"{what}: corrupt link {n} after {steps} tables")
            return
        t = n - 1
        st = m.load(d.tw0 + t * TW + T_STATE)
        if st not in LIVE:
            bad.append(f"{what}: links slot {t} in state {STATE_NAMES[st] if 0 <= st < 9 else st}")
        if t in seen:
            bad.append(f"{what}: slot {t} linked twice (also on {seen[t]})")
            return
        seen[t] = what
        n = m.load(d.tw0 + t * TW + T_NEXT)
        steps += 1


def check_linked(d, bad: list[str], seen: dict[int, str], what: str) -> None:
    for t in range(d.nt):
        if d.amem.load(d.tw0 + t * TW + T_STATE) in LIVE and t not in seen:
            bad.append(f"live avic_physid_table slot {t} is not on the {what}: lookups miss it")
