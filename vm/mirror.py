"""The simple notifier kind of the VM issue: a mirror that copies every tracked write into a
shadow copy of guest memory (the ``mirror`` region), and its two oracles.

- Final image: for every tracked gfn the mirror page equals the guest page — a write to a tracked
  page that escaped the notifier shows as a difference, unless a later write rewrote the address.
- Exact call accounting of emulated writes (``WriteAccounting``): every emulated RAM write calls
  ``track_write`` exactly once on each mirror node that was on the list for its whole walk, and no
  node more than once. Each mirror ``track_write`` counts itself per node in this process
  (``calls[node]``, beside the ``notifier_calls`` total). The write path (vm/page_track.py) counts
  emulated RAM writes down from ``PERIOD``; the one that reaches 0 goes through ``checkpoint``,
  which judges the ``PERIOD - 1`` writes since the last checkpoint in aggregate (each node on the
  list throughout: exactly one call per write; the total: nothing else called), then walks and
  judges its own write alone. The live set is a snapshot of the registry, exact for one value of
  its seqcount ``NH_SEQ``; when the seqcount moved, each node is judged from its own registry words
  (``N_STATE``, ``N_REGSEQ``: see vm/notifier.py) — on the list throughout, or joined / left
  meanwhile (then at most one call per write; a shortfall is counted ``track_indeterminate``).
  A violation is a WARN naming the write (or the checkpoint the aggregate preceded) and the node;
  after one, every write is judged alone. Costs: a countdown per write, a list increment per call
  (~420 CPU instructions, ~25 ns) and a checkpoint of ~0.5 µs every ``PERIOD`` = 32 writes: +3.6%
  instructions per tracked write with 1 notifier, +7% with 3 (callgrind; CPU time +5..9%).
  Limits: in aggregate, a missing and a repeated call of one node within one period cancel; the
  < ``PERIOD`` writes after a vCPU's last checkpoint are not judged (``track_checked`` counts the
  judged ones). Stricter than "writes to a gfn tracked for the whole write": in KVM the walk does
  not depend on the gfn's track count, so every successful emulated RAM write is judged.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from vm import layout as L
from vm import notifier
from vm.layout import C
from vm.page_track import PAGE_SHIFT, PAGE_SIZE, track_gfn

MIRROR_KIND = 1
COUNTED_KINDS = (MIRROR_KIND,)  # node kinds whose track_write counts itself in WriteAccounting.calls
PERIOD = 32  # one emulated RAM write in PERIOD is judged alone, the others in aggregate
_UNACCOUNTED: defaultdict[int, int] = defaultdict(int)  # calls of mirrors in a process without accounting


@notifier.notifier_kind(MIRROR_KIND)
class MirrorNotifier(notifier.NotifierNode):
    def __init__(self, kvm, node: int, owner: int):
        super().__init__(kvm, node, owner)
        acct = getattr(kvm, "write_acct", None)
        calls = acct.calls if acct is not None else _UNACCOUNTED
        self.track_write = _bind_track_write(kvm.memory_pages << PAGE_SHIFT, calls, kvm.counts, C["notifier_calls"],
                                             kvm.mirror.mem.write)

    def track_remove_region(self, gfn: int, nr_pages: int, node: int) -> None:
        pass


def _bind_track_write(ram_end: int, calls, counts: list, c_calls: int, write):
    """The mirror's ``track_write``, a closure over its bound state (no attribute loads per call):
    counts the call for its node (``calls``, WriteAccounting) and in ``notifier_calls``, then
    copies the write into the mirror; an MMIO write has nothing to mirror."""
    def track_write(gpa: int, new: bytes, nbytes: int, node: int) -> None:
        if gpa >= ram_end:  # MMIO: nothing to mirror
            return
        calls[node] += 1
        counts[c_calls] += 1
        write(gpa, new)
    return track_write


class WriteAccounting:
    """This process' exact accounting of ``track_write`` calls (module doc).

    ``calls[node]``: calls since the last reset (every checkpoint resets them); ``base_total``: the
    ``notifier_calls`` count then. ``live`` = the counted nodes seen LIVE by the last registry scan
    (each was on the list then) with their ``N_REGSEQ``; ``v``: the seqcount value the scan is
    exact for (-1: the registry was changing, every node is then judged from its own words);
    ``base_v``: ``v`` when the current interval began."""

    def __init__(self, kvm, period: int = PERIOD):
        self.kvm = kvm
        self.load = kvm.mem.load
        self.seq_w = kvm.notifier_w + L.NH_SEQ
        self.counts = kvm.counts
        self.c_total, self.c_checked = C["notifier_calls"], C["track_checked"]
        self.period = period
        self.calls = [0] * kvm.nodes.shape[0]
        self.live: dict[int, int] = {}
        self.nodes: tuple[int, ...] = ()
        self.v = -1
        self.refresh()
        self.base_total, self.base_v = self.counts[self.c_total], self.v

    def refresh(self) -> None:
        """Scan the registry (``N_REGSEQ`` before ``N_STATE``: a LIVE state never pairs with the
        identity of an older registration); retried while a register / unregister is under way."""
        nodes, load = self.kvm.nodes, self.load
        for _ in range(3):
            v1 = load(self.seq_w)
            regseq = nodes[:, L.N_REGSEQ].copy()
            state = nodes[:, L.N_STATE].copy()
            counted = np.isin(nodes[:, L.N_KIND], COUNTED_KINDS)
            v2 = load(self.seq_w)
            if v1 == v2 and not v1 & 1:
                break
            os.sched_yield()
        self.live = {int(i): int(regseq[i]) for i in np.flatnonzero(counted & (state == L.NODE_LIVE))}
        self.nodes = tuple(self.live)
        self.v = v2 if v1 == v2 and not v1 & 1 else -1

    def _reset(self) -> None:
        self.calls[:] = [0] * len(self.calls)
        self.base_total = self.counts[self.c_total]

    def judge(self, v_then: int, walks: int, gpa: int) -> int:
        """The calls counted since the last reset, over ``walks`` walks that all began after the
        scan in ``live`` (exact for ``v_then``): WARN for each node called other than the rules
        allow. ``gpa``: the write judged alone, or the checkpoint the ``walks`` preceded."""
        kvm = self.kvm
        called = {n: c for n, c in enumerate(self.calls) if c}
        live = self.live
        if v_then >= 0 and self.load(self.seq_w) == v_then:  # the list did not change meanwhile
            whole, exact = set(live), True
        else:  # N_STATE before N_REGSEQ: LIVE now with the identity seen then => on the list throughout
            state = kvm.nodes[:, L.N_STATE].copy()
            regseq = kvm.nodes[:, L.N_REGSEQ].copy()
            counted = np.isin(kvm.nodes[:, L.N_KIND], COUNTED_KINDS)
            whole = {n for n, r in live.items() if state[n] == L.NODE_LIVE and regseq[n] == r}
            live_now = {int(n) for n in np.flatnonzero(counted & (state == L.NODE_LIVE))}
            around = (set(live) | live_now) - whole  # joined or left the list meanwhile
            self.counts[C["track_indeterminate"]] += sum(1 for n in around if called.get(n, 0) < walks)
            exact = False
        what = (f"emulated write gpa {gpa:#x}" if walks == 1 else
                f"the {walks} emulated writes before the one to gpa {gpa:#x}")
        bad = 0
        for n in sorted(whole | set(called)):
            c = called.get(n, 0)
            if n in whole and c != walks:
                why = "on the list throughout"
            elif n not in whole and c > walks:
                why = "more calls than walks"
            elif n not in whole and c and exact:
                why = "not on the list, which did not change"
            else:
                continue
            bad += 1
            kvm.warn("track_write_accounting",
                     f"{what}: notifier node {n} ({why}) got {c} track_write call(s) for {walks} "
                     f"walk(s), expected {'exactly' if n in whole else 'at most'} {walks}",
                     gpa=gpa, node=n, calls=c, walks=walks)
        if bad:
            self.counts[C["track_violations"]] += bad
            self.period = 1  # from now on every write alone: the next WARN names its write
        return bad

    def checkpoint(self, gpa: int, new: bytes, page_track_write) -> int:
        """The emulated write to ``gpa`` that closes the interval: judge the interval's writes in
        aggregate, then walk and judge this one alone."""
        writes = self.period - 1
        self._settle(self.base_v, writes, gpa)
        calls_ret = page_track_write(gpa, new)
        self._settle(self.v, 1, gpa)
        self.base_v = self.v
        self.counts[self.c_checked] += writes + 1
        return calls_ret

    def _settle(self, base_v: int, walks: int, gpa: int) -> None:
        """Judge the ``walks`` emulated writes since the last settle, made while the list was at
        version ``base_v``. Common case (the list did not change, each live node got one call per
        walk, nothing else was called): compares only, then starts the next count; anything else
        goes to ``judge`` and the accounting starts over."""
        calls, nodes = self.calls, self.nodes
        total = self.counts[self.c_total]
        if (base_v >= 0 and self.v == base_v and self.load(self.seq_w) == base_v
                and total - self.base_total == walks * len(nodes)):
            for n in nodes:
                if calls[n] != walks:
                    break
            else:  # each got its calls: the next count starts
                for n in nodes:
                    calls[n] = 0
                self.base_total = total
                return
        self.judge(base_v, walks, gpa)
        self._reset()
        self.refresh()

    def walk_outside_write(self, page_track_write, gpa: int, new: bytes) -> int:
        """A walk that is no emulated write (``kvm_page_track_write`` called directly): its calls
        are taken out of the interval."""
        calls, total = list(self.calls), self.counts[self.c_total]
        n = page_track_write(gpa, new)
        self.calls[:] = calls
        self.base_total += self.counts[self.c_total] - total
        return n


def enable_write_accounting(kvm, period: int = PERIOD) -> WriteAccounting:
    """Check every emulated write of this process (call before the write path is bound: a bound
    path is re-bound, cached mirror handlers are re-created)."""
    acct = getattr(kvm, "write_acct", None)
    if acct is None:
        acct = kvm.write_acct = WriteAccounting(kvm, period)
        kvm.write_path = None
        kvm.handlers.clear()
        kvm.walk_cache.clear()
    return acct


def accounting_totals(kvm) -> dict[str, int]:
    """The accounting counters of every process (as published by their last counter flush)."""
    c = kvm.vm.v["counters"].sum(axis=0)
    return {"checked_writes": int(c[C["track_checked"]]), "violations": int(c[C["track_violations"]]),
            "indeterminate": int(c[C["track_indeterminate"]])}


def mirror_track(kvm, gfn: int) -> bool:
    """Start tracking ``gfn`` for the mirror: add + flush, then copy the current page (writes
    racing with the copy are emulated and mirrored, so the result is consistent)."""
    if not track_gfn(kvm, gfn):
        return False
    lo = gfn << PAGE_SHIFT
    kvm.mirror_bytes[lo:lo + PAGE_SIZE] = kvm.guest_bytes[lo:lo + PAGE_SIZE]
    return True


def oracle(kvm) -> list[str]:
    """Differences between guest and mirror on every tracked gfn (empty = consistent)."""
    bad = []
    track = kvm.gfn_track
    for gfn in np.flatnonzero(track):
        lo = int(gfn) << PAGE_SHIFT
        g = kvm.guest_bytes[lo:lo + PAGE_SIZE]
        m = kvm.mirror_bytes[lo:lo + PAGE_SIZE]
        if not np.array_equal(g, m):
            off = int(np.flatnonzero(g != m)[0])
            bad.append(f"lost write: tracked gfn {int(gfn):#x} offset {off:#x}: guest {int(g[off]):#04x} "
                       f"!= mirror {int(m[off]):#04x}")
    return bad


def accounting_oracle(kvm) -> list[str]:
    """The accounting's verdict over the run: its total of violations (each was also a WARN)."""
    t = accounting_totals(kvm)
    if t["violations"]:
        return [f"write accounting: {t['violations']} missing or repeated track_write call(s) in "
                f"{t['checked_writes']} checked emulated write(s)"]
    return []
