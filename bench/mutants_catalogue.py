"""The mutation catalogue of ``python -m bench.mutants``: one-line synchronization bugs, as source
patches.

Each :class:`Mutant` names the mechanism it breaks, the file, and one or more :class:`Edit`\\ s: an
exact original text (with enough context to occur **exactly once** in the file) and its
replacement. The bug itself is one changed line; where one line cannot express it (a lock and its
unlock are a pair; moving a store is a deletion plus an insertion) the mutant says so in ``multi``
and declares how many lines change (``lines``: the harness counts the changed lines and refuses a
patch whose count differs). ``commands`` are what a user would run for that mechanism, at default
parameters (the harness appends ``--seed N``): ``run`` (default design ``mirror``), ``run --design
D``, ``scenario kaboom``, ``torture rcu|srcu``. ``fast`` marks the CI subset (one per mechanism,
each dying in its first command).

Nothing here is known to the code under test: the product ships no flag for any of these bugs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

TORTURE = (("torture", "rcu"), ("torture", "srcu"))
RUN_MIRROR = (("run", "--design", "mirror"),)  # a bare `run` is mutex-hash (the newcomer's tour)
RUN_RCU_LIST = (("run", "--design", "rcu-list"),)
RUN_MUTEX_HASH = (("run", "--design", "mutex-hash"),)
RUN_PER_TABLE = (("run", "--design", "per-table-notifier"),)
RUN_AVIC = RUN_RCU_LIST + RUN_MUTEX_HASH + RUN_PER_TABLE


@dataclass(frozen=True)
class Edit:
    old: str  # must occur exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    mechanism: str
    file: str
    edits: tuple[Edit, ...]
    commands: tuple[tuple[str, ...], ...]
    bug: str  # the bug, in words
    lines: int = 1  # changed lines (the harness checks)
    multi: str = ""  # why one line is not enough (required when lines > 1)
    fast: bool = False


class PatchError(Exception):
    """A mutant's patch does not apply (the catalogue no longer matches the source)."""


def changed_lines(before: str, after: str) -> int:
    """Lines changed between two texts: per diff hunk, max(lines removed, lines added)."""
    sm = difflib.SequenceMatcher(None, before.splitlines(), after.splitlines(), autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in sm.get_opcodes() if tag != "equal")


def patch_text(m: Mutant, text: str) -> str:
    """``text`` (the content of ``m.file``) with the mutant's edits applied; PatchError if an
    original text does not occur exactly once or the number of changed lines is not the declared one."""
    out = text
    for i, e in enumerate(m.edits):
        n = out.count(e.old)
        if n != 1:
            first = e.old.strip().splitlines()[0] if e.old.strip() else e.old
            raise PatchError(f"mutant {m.name}: patch does not apply to {m.file}: edit {i + 1} original text "
                             f"found {n} times (must be exactly once): {first!r}")
        out = out.replace(e.old, e.new)
    try:
        compile(out, m.file, "exec")
    except SyntaxError as e:
        raise PatchError(f"mutant {m.name}: patched {m.file} does not compile: {e}") from None
    got = changed_lines(text, out)
    if got != m.lines:
        raise PatchError(f"mutant {m.name}: patch of {m.file} changes {got} line(s), the catalogue says "
                         f"{m.lines}")
    if m.lines > 1 and not m.multi:
        raise PatchError(f"mutant {m.name}: {m.lines} lines changed without a reason (multi)")
    return out


def _drop(before: str, line: str, after: str = "") -> Edit:
    """Delete ``line`` (a full line, with its newline) found between ``before`` and ``after``."""
    return Edit(before + line + after, before + after)


def _blank(before: str, line: str, after: str = "") -> Edit:
    """Replace ``line`` by ``pass`` (same indentation): for the only statement of a block."""
    indent = line[:len(line) - len(line.lstrip())]
    return Edit(before + line + after, before + indent + "pass\n" + after)


GP = "grace period"
CATALOGUE: tuple[Mutant, ...] = (
    # -- grace periods (ipc/rcu.py): every RCU / SRCU domain -------------------------------------
    Mutant("gp-no-wait", GP, "ipc/rcu.py",
           (Edit("        if self.broken:  # fault injection: a grace period that does not wait\n",
                 "        if True:  # fault injection: a grace period that does not wait\n"),),
           TORTURE, "synchronize counts a grace period and returns without waiting for any reader"),
    Mutant("gp-single-flip", GP, "ipc/rcu.py",
           (Edit("                    self._wait_readers(t0, warned)\n"
                 "                    mem.fetch_add(hdr + HDR_GP_SEQ, 1)\n",
                 "                    pass\n"
                 "                    mem.fetch_add(hdr + HDR_GP_SEQ, 1)\n"),),
           TORTURE, "after the phase flip, no wait for the readers of the phase current at the call "
                    "(liburcu single-flip)", fast=True),
    Mutant("gp-skip-alternate", GP, "ipc/rcu.py",
           (Edit("        if self.broken:  # fault injection: a grace period that does not wait\n",
                 "        if self.broken or mem.load(hdr + HDR_GP_SEQ) & 1:  # fault injection: a grace "
                 "period that does not wait\n"),),
           TORTURE, "every other grace period (odd gp_seq) is counted without waiting"),
    Mutant("gp-share-early", GP, "ipc/rcu.py",
           (Edit("        return (s + 3) & ~1\n", "        return (s + 2) & ~1\n"),),
           TORTURE, "a caller shares a grace period that was already running at its call "
                    "(rcu_seq_snap rounds down)"),
    Mutant("rcu-list-free-without-gp", GP, "vm/avic/rcu_list.py",
           (Edit("            self.kvm.rcu.synchronize()  # no reader still sees the table\n",
                 "            pass\n"),),
           RUN_RCU_LIST, "rcu-list frees (poisons) an unlinked table without synchronize_rcu"),
    # -- SRCU notifier registry (vm/notifier.py) -------------------------------------------------
    Mutant("srcu-unregister-no-synchronize", "SRCU unregister", "vm/notifier.py",
           (Edit("        kvm.track_srcu.synchronize()\n", "        pass\n"),),
           RUN_PER_TABLE, "unregister returns without synchronize_srcu; the caller frees the node "
                          "under walkers", fast=True),
    Mutant("walk-without-srcu-read-lock", "notifier walk", "vm/write_path.py",
           (_drop("", "            srcu_lock()\n", "            try:\n                if not srcu_read_lock_held():"),
            _blank("            finally:\n", "                srcu_unlock()\n")),
           RUN_PER_TABLE, "kvm_page_track_write walks the notifier list outside srcu_read_lock",
           lines=2, multi="srcu_read_lock and srcu_read_unlock are a pair"),
    Mutant("walk-skipped-one-in-64", "notifier walk", "vm/write_path.py",
           (Edit("            if not load(head_w):  # empty list: return at once\n",
                 "            if not load(head_w) or _prims.now_ns() % 64 == 0:  # empty list: return at once\n"),),
           RUN_MIRROR, "about one emulated write in 64 returns before the notifier walk", fast=True),
    # -- write protection -------------------------------------------------------------------------
    Mutant("l1-store-ignores-write-protection", "write protection", "vm/write_path.py",
           (Edit("        if how == FAULT and gpa < ram_end and not track_mv[gpa >> PAGE_SHIFT]:\n",
                 "        if how == FAULT and gpa < ram_end:\n"),),
           (("scenario", "kaboom"),),
           "a scripted L1 store goes through the writable mapping even to a write-tracked gfn: no fault, "
           "no emulation, no notifier"),
    Mutant("track-without-tlb-flush", "TLB flush", "vm/avic/pool.py",
           (Edit("            kvm_flush_remote_tlbs(kvm)\n", "            pass\n"),),
           RUN_AVIC, "a table page is write-protected without kvm_flush_remote_tlbs: a vCPU that "
                     "checked the gfn before may still store to it", fast=True),
    # -- each design's write path without its lock -------------------------------------------------
    Mutant("mutex-hash-write-without-lock", "write-path lock", "vm/avic/mutex_hash.py",
           (_drop("", "        lk.lock()\n",
                  "        self._cs_in(CS_TABLES)\n        try:\n            t = self._hash_lookup(gpa"),
            _drop('self._stat("track_write_miss")\n        finally:\n            self._cs_out(CS_TABLES)\n',
                  "            lk.unlock()\n")),
           RUN_MUTEX_HASH, "mutex-hash track_write looks up and writes tables without tables_lock",
           lines=2, multi="lock and unlock are a pair", fast=True),
    Mutant("rcu-list-write-without-rcu-read-lock", "write-path lock", "vm/avic/rcu_list.py",
           (_drop("", "        rcu.read_lock()\n", "        try:\n            t = self._lookup(gpa >> PAGE_SHIFT)\n"),
            _blank("table=t, gpa=gpa)\n        finally:\n", "            rcu.read_unlock()\n")),
           RUN_RCU_LIST, "rcu-list track_write walks the table list outside rcu_read_lock",
           lines=2, multi="rcu_read_lock and rcu_read_unlock are a pair"),
    Mutant("per-table-write-without-physid-lock", "write-path lock", "vm/avic/pool.py",
           (_drop("        targets = None\n", "        self._tlock(t)\n", "        try:\n            if gen >= 0"),
            _blank("            return True\n        finally:\n", "            self._tunlock(t)\n")),
           RUN_PER_TABLE, "a table write (per-table-notifier: its only lock) without avic_physid_lock",
           lines=2, multi="lock and unlock are a pair"),
    Mutant("vref-counted-after-translate", "write-path lock", "vm/avic/pool.py",
           (Edit("            ref(t, g, 1)  # (a full barrier) before _translate reads V_LOADED: see _vref\n", ""),
            Edit("            m.store(sb + e, s64(self._translate(g)))\n            ref(t, old, -1)\n",
                 "            m.store(sb + e, s64(self._translate(g)))\n            ref(t, g, 1)\n"
                 "            ref(t, old, -1)\n")),
           # the runs kill it by luck of timing (a vcpu_put of that very vCPU inside a few statements;
           # they survived 2 of 2 at load 3-9): explore finds it at schedule 41 of seed 3 (67 of seed
           # 2; seed 1 misses in 300), the same every time, so it goes first
           (("explore", "tlb-flush", "--design", "rcu-list", "--seed", "3", "--schedules", "300"),)
           + RUN_RCU_LIST + (("run", "--design", "rcu-list", "--vcpus", "4", "--preempt-rate", "0.3"),),
           "a sync counts an entry's reference to an L1 vCPU after it translated the entry: a vcpu_put "
           "that stored V_LOADED in between reads no reference and skips the table (rcu-list: per-table locks)",
           lines=2, multi="moving a statement is a deletion plus an insertion"),
    Mutant("entry-update-keeps-old-reference", "refcount", "vm/avic/pool.py",
           (Edit("        self._vref(t, c, -1)\n        self._stat(\"entry_update\")\n",
                 "        self._stat(\"entry_update\")\n"),),
           RUN_AVIC, "an entry update counts the new L1 vCPU's reference but never drops the old one "
                     "(physid_ref_entries leaks: vcpu_load / put visit tables for nothing)"),
    Mutant("isrunning-flip-skips-unlocked", "write-path lock", "vm/avic/guest.py",
           (Edit("                self._tlock(t)\n                try:\n                    flips += self._flip_running(",
                 "                if m.load(self.tw0 + t * TW + T_STATE) != VALID: continue  # noqa: E701\n"
                 "                self._tlock(t)\n                try:\n                    flips += self._flip_running("),),
           RUN_RCU_LIST + (("run", "--design", "rcu-list", "--vcpus", "4", "--preempt-rate", "0.3"),),
           "rcu-list's vcpu_load / put reads a table's state before taking the table's lock: a "
                         "sync that read the old IsRunning ends VALID after the skip"),
    # -- refcount ---------------------------------------------------------------------------------------
    Mutant("rcu-list-get-without-inc-not-zero", "refcount", "vm/avic/rcu_list.py",
           (Edit("        while r > 0:\n", "        while r >= 0:\n"),),
           RUN_RCU_LIST, "the RCU lookup takes a reference with a plain increment: a table whose "
                         "count reached 0 (being freed) is resurrected"),
    Mutant("mutex-hash-get-without-ref", "refcount", "vm/avic/mutex_hash.py",
           (Edit("                if not created:\n                    m.fetch_add(self.tw0 + t * TW + T_REF, 1)\n",
                 "                if not created:\n                    pass\n"),),
           RUN_MUTEX_HASH + RUN_PER_TABLE, "a vCPU that finds its L2's table in the hash holds it without "
                                           "taking a reference: the last put of another user frees it",
           fast=True),
    # -- publish before init (store order) -------------------------------------------------------------
    Mutant("rcu-list-publish-before-init", "publish order", "vm/avic/rcu_list.py",
           (Edit("        m.store(self.tw0 + t * TW + T_NEXT, m.load(self.hdr0 + H_LIST))\n"
                 "        if fuzz.ACTIVE:\n"
                 "            fuzz.point(\"avic.rcu_list.init_to_publish\")\n"
                 "        m.store(self.hdr0 + H_LIST, t + 1)  # release: the table is complete before it "
                 "is visible\n",
                 "        head = m.load(self.hdr0 + H_LIST)\n"
                 "        m.store(self.hdr0 + H_LIST, t + 1)\n"
                 "        if fuzz.ACTIVE:\n"
                 "            fuzz.point(\"avic.rcu_list.init_to_publish\")\n"
                 "        m.store(self.tw0 + t * TW + T_NEXT, head)\n"),),
           RUN_RCU_LIST, "list_add publishes the table as the list head before its next pointer is set",
           lines=3, multi="a reorder of two stores (publish, then init) around the point between them"),
    Mutant("notifier-publish-before-init", "publish order", "vm/notifier.py",
           (Edit("        mem.store(_w(kvm, node, L.N_NEXT), mem.load(h + L.NH_HEAD))\n"
                 "        if fuzz.ACTIVE:\n"
                 "            fuzz.point(\"notifier.init_to_publish\")\n"
                 "        mem.store(h + L.NH_HEAD, node + 1)  # release: the node is complete before it is "
                 "visible\n",
                 "        head = mem.load(h + L.NH_HEAD)\n"
                 "        mem.store(h + L.NH_HEAD, node + 1)\n"
                 "        if fuzz.ACTIVE:\n"
                 "            fuzz.point(\"notifier.init_to_publish\")\n"
                 "        mem.store(_w(kvm, node, L.N_NEXT), head)\n"),),
           RUN_PER_TABLE, "hlist_add_head_rcu publishes the node before its next pointer is set",
           lines=3, multi="a reorder of two stores (publish, then init) around the point between them"),
    Mutant("sync-publishes-valid-before-entries", "publish order", "vm/avic/pool.py",
           (Edit("        bits = [0, 0, 0, 0]\n",
                 "        m.store(b + T_STATE, VALID)\n        bits = [0, 0, 0, 0]\n"),
            _drop("        m.fetch_add(b + T_SYNCS, 1)\n", "        m.store(b + T_STATE, VALID)\n")),
           RUN_RCU_LIST, "a resync marks the table VALID before it writes the entries (rcu-list: the only "
                         "design whose VMRUN reads the state without a lock)",
           lines=2, multi="moving a store is a deletion plus an insertion"),
    # -- list / hash unlink without its lock ----------------------------------------------------------
    Mutant("rcu-list-unlink-without-lock", "unlink lock", "vm/avic/rcu_list.py",
           (_drop("", "        spin.lock()\n",
                  "        self._cs_in(CS_SPIN)\n        try:\n            r = m.fetch_add(w, -1) - 1\n"),
            _drop("            self._cs_out(CS_SPIN)\n", "            spin.unlock()\n",
                  "        self._untrack(t)\n")),
           RUN_RCU_LIST, "the last put unlinks the table from the RCU list without avic_tables_spin",
           lines=2, multi="lock and unlock are a pair", fast=True),
    Mutant("mutex-hash-unlink-without-lock", "unlink lock", "vm/avic/mutex_hash.py",
           (_drop("        freed = False\n", "        lk.lock()\n"),
            _drop("                freed = True\n        finally:\n            self._cs_out(CS_TABLES)\n",
                  "            lk.unlock()\n")),
           RUN_MUTEX_HASH, "put drops the reference and unlinks from the gfn hash without tables_lock",
           lines=2, multi="lock and unlock are a pair"),
    # -- registration bookkeeping ------------------------------------------------------------------------
    Mutant("refcount-unregister-early", "registration", "vm/avic/registration.py",
           (Edit("                if users == 0:\n", "                if users <= 1:\n"),),
           (("scenario", "kaboom"),) + RUN_MUTEX_HASH,
           "the refcount variant unregisters when the last-but-one user leaves", fast=True),
    Mutant("refcount-users-never-decremented", "registration", "vm/avic/registration.py",
           (Edit("            users = self._notifier_users(-1)\n",
                 "            users = m.load(h + H_USERS) - 1\n"),),
           (("scenario", "kaboom"),) + RUN_RCU_LIST,
           "put reads the user count instead of decrementing it: the node is never unregistered"),
    Mutant("node-refcount-unlinks-early", "registration", "vm/notifier.py",
           (Edit("        if refs > 1 and not every:  # node-refcount: other registrations still hold it; the list is "
                 "unchanged\n",
                 "        if refs > 2 and not every:  # node-refcount: other registrations still hold it; the list is "
                 "unchanged\n"),),
           (("scenario", "kaboom", "--registration", "node-refcount"),
            ("run", "--design", "mutex-hash", "--registration", "node-refcount")),
           "the count in the notifier node unlinks it when the last-but-one registration goes (a free run "
           "kills it too: the oracle's N_REFS != users check, and stale entries)"),
    Mutant("per-table-free-without-unregister", "registration", "vm/avic/per_table.py",
           (Edit("            self._unregister(node)  # waits synchronize_srcu: no walker still has the node\n",
                 "            pass\n"),),
           RUN_PER_TABLE + (("scenario", "kaboom", "--design", "per-table-notifier"),),
           "a table's own notifier node is freed while still registered"),
    # -- reload requests (kicks) -------------------------------------------------------------------------
    Mutant("invalidate-without-reload-request", "reload request", "vm/avic/erase.py",
           (Edit('        targets = None if (self.flood_race and why == "flood_drop") else self._request_reload_all(seq)\n',
                 "        targets = None\n"),),
           RUN_AVIC, "an erased table requests no reload (kvm_make_all_cpus_request dropped): vCPUs in L2 "
                     "on it keep running on zeroed, unpinned entries", fast=True),
    Mutant("flood-drop-without-kick", "reload request", "vm/avic/erase.py",
           (Edit('        targets = None if (self.flood_race and why == "flood_drop") else self._request_reload_all(seq)\n',
                 '        targets = None if why == "flood_drop" else self._request_reload_all(seq)\n'),),
           RUN_RCU_LIST + RUN_PER_TABLE + RUN_MUTEX_HASH,
           "a flood's erase (write protection removed) requests no reload (mutex-hash is no longer immune: "
           "its VMRUN takes tables_lock only on a table change)"),
    Mutant("vmrun-fast-path-without-gfn-check", "refcount", "vm/avic/mutex_hash.py",
           (Edit("        if cur >= 0 and m.load(self.tw0 + cur * TW + T_GFN) != gfn:\n",
                 "        if cur >= 0 and m.load(self.tw0 + cur * TW + T_GFN) < 0:\n"),),
           RUN_MUTEX_HASH, "nested VMRUN keeps the table it holds (atomic_inc usecount, no tables_lock) without "
                           "checking that it is the new L2's physid table"),
    Mutant("reload-request-without-wait", "reload request", "vm/avic/guest.py",
           (Edit("            while m.load(w) == s:\n", "            while False:\n"),),
           RUN_AVIC, "kvm_make_all_cpus_request without KVM_REQUEST_WAIT: the eraser goes on (unpins) while "
                     "kicked vCPUs are still in L2 on the table"),
)

#: Not a mutant: appended to package ``__init__`` files of a copy, it records which file each process
#: imported (``PTS_MUTANT_CANARY`` names the log): the check that the copy's code is what runs.
CANARY_FILES = ("ipc/__init__.py", "vm/__init__.py")
CANARY_CODE = ('\nimport os as _pts_os\n'
               'if _pts_os.environ.get("PTS_MUTANT_CANARY"):\n'
               '    with open(_pts_os.environ["PTS_MUTANT_CANARY"], "a") as _pts_f:\n'
               '        _pts_f.write(f"{_pts_os.getpid()} {__file__}\\n")\n')
CANARY_COMMAND = ("scenario", "kaboom")
