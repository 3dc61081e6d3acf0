"""The oracle of the nested AVIC wing, every check in one place.

Invariants (each names the check that enforces it):
- (I-stale) a vCPU entering L2 never runs on a stale shadow entry of its own: at every nested VMRUN
  its entry equals the translation of the guest entry (``check_stale``; ``stale_entry`` WARN);
- (I-shadow) every VALID shadow table equals the translation of its guest table, entry by entry,
  with the cached guest entry and valid bitmap in step (``final``: "lost write");
- (I-ref) refcount = vCPUs holding the table, usecount = vCPUs in guest mode on it (``final``);
- (I-index) the design's index (gfn hash chains, RCU list) links exactly the live tables, each once,
  in the right bucket (``check_chain``, ``check_linked``, the designs' ``_check_structure``);
- (I-one) at most one live table per gfn, and gfn_write_track of each table page = the live tables
  that write-protect it, never wrapped (``final``);
- (I-notifier) a live table's writes are seen: its notifier node (shared or its own) is registered,
  the shared node's user count = live tables, and (refcount) unregistered once none is live;
- (I-warn) no redundant registration, no registration while write tracking is disabled;
- (I-poison) no read of freed (poisoned) memory, by any reader, at any time (``kvm.poisoned``);
- (I-lock) mutual exclusion of every lock the AVIC code takes (locktorture-style held flags), and
  no lock still held after the run.
"""

from __future__ import annotations

from ipc import _prims
from vm import layout as L
from vm import notifier
from vm.avic.table import (
    ALLOC,
    CS,
    CS_FAILS,
    H_NODE,
    H_SEQ,
    H_UNTRACKED_REG,
    H_USERS,
    LIVE,
    RETIRING,
    STATE_NAMES,
    T_GFN,
    T_L2,
    T_NEXT,
    T_NODE,
    T_REF,
    T_STATE,
    T_TRACKED,
    T_USE,
    TRACKING,
    TW,
    V_CUR,
    V_INGUEST,
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
        live_by_gfn.setdefault(gfn, []).append(t)
        if m.load(b + T_TRACKED):
            tracked_by_gfn[gfn] = tracked_by_gfn.get(gfn, 0) + 1
        ref, use = m.load(b + T_REF), m.load(b + T_USE)
        holders = [v for v in range(d.nvcpus) if cur[v] == t]
        if ref != len(holders):
            bad.append(f"{name}: refcount {ref} but {len(holders)} vCPUs hold it {holders}")
        users = [v for v in range(d.nvcpus) if inguest[v] == t]
        if use != len(users):
            bad.append(f"{name}: usecount {use} but {len(users)} vCPUs in guest mode on it")
        if not d.shared_node:
            node = m.load(b + T_NODE) - 1
            if node < 0 or notifier.node_state(kvm, node) != L.NODE_LIVE:
                bad.append(f"{name} is live but its notifier node {node} is not registered: writes "
                           f"to it are not seen")
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
        if d.registration == "refcount" and not nlive and live:
            bad.append(f"nested AVIC notifier node {node} still registered with no table live")
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
    del counters
    if kvm.poison_reads:
        bad.append(f"{kvm.poison_reads} read(s) of poisoned (freed) memory")
    for i, lname in enumerate(CS):
        fails = m.load(d.cs0 + i * 8 + CS_FAILS)
        if fails:
            bad.append(f"lock {lname}: mutual exclusion violated {fails} times")
    for lname in ("tables_lock", "avic_physid_lock", "avic_tables_spin", "mmu_lock"):
        owner = kvm.locks[lname].owner()
        if owner:
            bad.append(f"lock {lname} still held (owner tag {owner}) after the run")
    return bad


def check_stale(d, v: int, t: int, l2: int, gfn: int) -> None:
    """The hardware is about to use the vCPU's own entry: it must be the translation of the
    guest entry (the vCPU's own writes to it have all completed)."""
    m = d.amem
    b = d.tw0 + t * TW
    e = v % d.ne
    seq_w = d.hdr0 + H_SEQ
    for _ in range(16):
        s1 = m.load(seq_w)
        if s1 & 1:
            _prims.sched_yield()
            continue
        if m.load(b + T_STATE) != VALID:
            d._stat("stale_check_skipped")  # invalidated meanwhile: a reload is pending
            return
        sh = m.load(d.shadow0 + t * d.ne + e) & 0xFFFFFFFFFFFFFFFF
        g = d.gmem.load((gfn << 9) + e) & 0xFFFFFFFFFFFFFFFF
        exp = d._translate(g)
        if m.load(seq_w) == s1:
            break
    else:
        d._stat("stale_check_skipped")
        return
    d._stat("stale_check")
    if sh != exp:
        d.kvm.count("stale_entries")
        gpa = (gfn << PAGE_SHIFT) + e * 8
        d.kvm.warn("stale_entry",
                      f"vCPU {v} nested VMRUN into L2 {l2} on a stale shadow physid entry: table gfn "
                      f"{gfn:#x} entry {e}: shadow {sh:#018x} != translation {exp:#018x} of guest entry "
                      f"{describe(g)} (lost write to gpa {gpa:#x})",
                      vcpu=v, l2=l2, gfn=gfn, entry=e, shadow=sh, expected=exp)


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
