"""Mutation operators of ``python -m bench.mutants --operators``: synchronization edits generated over
the code under test, beside the hand-written catalogue.

Every Python file under ``ipc/``, ``vm/`` and ``vcpu/`` (walked afresh on each call: files that move
are found where they are) is parsed with :mod:`ast`; each operator below finds its sites and turns
each into ONE exact-text :class:`~bench.mutants_catalogue.Edit` over the site's source lines (made
unique in the file by widening it with neighbouring lines), so the catalogue's patch machinery
(``patch_text``: applies exactly once, compiles, counts the changed lines) applies it. A mutant's
name is its stable id ``OPERATOR@FILE:FUNCTION:SITE`` (``SITE``: the text of the statement(s) it
edits, ``#2``... when a function holds the same text twice): no line numbers, so an id survives
edits elsewhere in the file, and ``bench/equivalent.toml`` can name it.

**Out of scope** (instrumentation, statistics, tracing, reporting, and the detectors themselves),
by three declared rules, printed by ``--operators --list``:

1. ``EXCLUDED_MODULES``: whole files (glob patterns) — tracing, histograms, process statistics,
   output and run directories, the torture / fuzz / scheduler / virtual-clock test machinery, the
   AVIC oracle and the results checker;
2. ``INSTRUMENTATION_CALLS`` / ``INSTRUMENTATION_RECEIVERS`` / ``INSTRUMENTATION_GUARDS``: a
   statement that calls a counter, trace, WARN / poison report, lockdep assert, mutual-exclusion
   checker (``_cs_in``/``_cs_out``, the checker's own memory ``_smem``) or fuzz point, or that lies
   in a block run only for tracing / fuzzing (``if emit:``, ``if fuzz.ACTIVE:``), is never a site
   and never the partner of a swap; ``EXCLUDED_FUNCTIONS``: diagnostic functions (name pattern);
   ``EXCLUDED_CLASSES``: oracles that live beside the code they judge (vm/mirror.py's
   ``WriteAccounting``) and hook widenings (``StaleStoreSteer``, ``_steer*``: they steer an
   interleaving for a ``--hook`` / ``--fuzz`` self-test);
3. ``STATS_WORDS``: a statement whose shared-memory word is a statistics counter (``T_WRITES``,
   ``H_LIVE``, ``NH_REGISTERED``, ``HDR_GP_SEQ``, ...; the oracle's own words ``H_SEQ``/``H_BUSY``)
   is instrumentation too.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.mutants_catalogue import (
    RUN_AVIC,
    RUN_MIRROR,
    RUN_MUTEX_HASH,
    RUN_PER_TABLE,
    RUN_RCU_LIST,
    TORTURE,
    Edit,
    Mutant,
    PatchError,
    changed_lines,
    patch_text,
)

SCAN_DIRS = ("ipc", "vm", "vcpu")
EXCLUDED_MODULES = (
    "ipc/trace.py", "ipc/trace/*", "ipc/chrome_trace.py", "ipc/hist.py", "ipc/procstat.py",  # tracing, stats
    "ipc/outputs.py", "ipc/rundir.py", "vm/results.py", "vm/tracepoints.py",  # reporting
    "ipc/torture/*", "ipc/fuzz.py", "ipc/sched.py", "ipc/sched/*", "ipc/schedpool.py",  # test machinery
    "ipc/vtime.py", "vm/avic/oracle.py",  # the virtual clock; the AVIC invariant checker (a detector)
    "vm/faults.py",  # fault injection (--inject kill-vcpu / stall-vcpu) for the self-tests
    "vm/avic/stress.py",  # the multiprocess stress harness of tests/vm/avic (a test driver, not KVM code)
)
INSTRUMENTATION_CALLS = frozenset({
    "_stat", "count", "emit", "_emit", "record_since", "print", "name_object",  # counters, trace
    "warn", "poisoned", "notifier_cycle", "_refuse",  # detector reports
    "lockdep_assert_held", "lockdep_assert_held_read", "_tlock_held", "_reg_lock_held",  # lockdep asserts
    "check_write_done",  # the AVIC oracle's KVM_REQUEST_WAIT check at a notifier callback's return
    "srcu_read_lock_held",  # RCU lockdep: a walk asserts its SRCU read-side section
    "_list_seq_begin",  # vm/notifier.py: the registry seqcount (mirror bookkeeping) + its mmu_lock assert
    "_cs_in", "_cs_out", "_seq_begin", "_seq_end", "_store_begin", "_store_end",  # oracle bookkeeping
    "store_begin", "_inflight_done",
    "point", "hit", "chance", "spin_ns", "sample_emul", "sample_walk", "stats_clock",  # fuzz, sampling
})
INSTRUMENTATION_RECEIVERS = ("fuzz", "fz", "tr", "trace", "self._smem", "_smem", "self.hist", "kvm.hist")
INSTRUMENTATION_GUARDS = re.compile(r"^(not )?(emit|self\._emit|fuzz\.ACTIVE|fz|tr|te|tw|self\.reader_delay|"
                                    r"self\.broken)\b")  # self.broken: ipc/rcu.py's injected broken grace period
EXCLUDED_CLASSES = frozenset({"WriteAccounting",  # vm/mirror.py's call-accounting oracle (a detector)
                              "StaleStoreSteer"})  # vm/avic/l1.py: the no-tlb-flush hook's widening
EXCLUDED_FUNCTIONS = re.compile(r"^(_?check|_?report|describe|dump|_?stats?$|summary|snapshot|readers_inside|"
                                r"blocking_readers|live_nodes|__repr__|__str__|fault$|_steer)")  # injected faults; hook / fuzz widenings
STATS_WORDS = frozenset({
    "T_WRITES", "T_SYNCS", "H_LIVE", "H_MAXLIVE", "H_BUSY", "H_SEQ", "H_I1", "H_I2", "H_RELOAD_BAD",
    "N_HITS", "NH_LIVE", "NH_REGISTERED", "NH_UNREGISTERED", "NH_REDUNDANT", "HDR_GP_SEQ",
    "HDR_DEAD_TAG", "HDR_DEAD_PID", "F_WARNS", "F_POISON_READS", "IF_STARTS", "IF_COUNT",
    "CS_HOLDER", "CS_FAILS", "CS_ENTRIES",
    "NH_SEQ", "N_REGSEQ",  # the registry seqcount and registration identities: read only by vm/mirror.py's oracle
})

LOCKS = {"lock": "unlock", "_tlock": "_tunlock", "_physid_lock": "_physid_unlock"}
READ_LOCKS = {"read_lock": "read_unlock", "srcu_lock": "srcu_unlock", "gm_lock": "gm_unlock"}
UNLOCKS = frozenset(LOCKS.values()) | frozenset(READ_LOCKS.values())
GP_WAITS = frozenset({"synchronize", "synchronize_rcu", "synchronize_srcu", "cond_synchronize", "_synchronize",
                      "_wait_readers", "wait_for_readers", "srcu_synchronize"})
BARRIERS = frozenset({"smp_mb", "smp_wmb", "smp_rmb", "mb"})
RMW = frozenset({"fetch_add", "cmpxchg", "xchg"})
REF_CALLS = frozenset({"_notifier_get", "_notifier_put", "_vref", "release_node"})
REF_WORDS = re.compile(r"\b(T_REF|N_REFS|H_USERS)\b")
MEMORY_CALLS = RMW | {"store", "load"} | set(LOCKS) | set(LOCKS.values()) | set(READ_LOCKS) | UNLOCKS \
    | GP_WAITS | BARRIERS | REF_CALLS | {"kvm_flush_remote_tlbs", "_reload_wait", "_request_reload_all"}
WRITES = MEMORY_CALLS - {"load"}
SEQ_NAMES = re.compile(r"(seq|gen|cookie|target|epoch|snap|ticket|done|\bstart\b|gp_state)", re.I)
SEQ_FUNCS = re.compile(r"state|seq|snap|cookie")  # a `+ c` on any name in these functions is a sequence step
#: a plain store is a synchronization step when its word publishes something (a state, a link, a flag)
PUBLISH_WORDS = re.compile(r"\b(T_STATE|T_NEXT|H_LIST|H_NODE|NH_HEAD|N_STATE|N_NEXT|V_\w+|HDR_GP_STATE|head|link|hdr)\b|"
                           r"#.*\b(release|publish)")

#: what each operator does (``--operators --list`` prints it)
OPERATORS = {
    "drop-lock-pair": "a lock and its unlock removed (`with lock:` -> `if True:`)",
    "drop-read-lock-pair": "an rcu / srcu / guest-mode read_lock and its read_unlock removed",
    "swap-sync": "two adjacent synchronization steps swapped (a publish and the store it guards, a lock "
                 "and the statement after it, a store and a barrier ...)",
    "unlock-earlier": "an unlock moved one statement earlier (the statement now runs unlocked)",
    "drop-barrier": "a memory barrier (smp_mb) removed",
    "split-rmw": "an atomic read-modify-write (fetch_add / cmpxchg / xchg) split into a load and a store",
    "weaken-inc-not-zero": "a conditional cmpxchg loop (inc_not_zero, dec-unless-last) made unconditional",
    "cas-to-store": "a compare-and-swap made a plain store that reports success (a claim without the check)",
    "drop-gp-wait": "a grace-period wait (synchronize*, _wait_readers) removed",
    "off-by-one": "a sequence / cookie / generation comparison off by one (< <-> <=, == x -> == x + 1, + c -> + c-1)",
    "drop-ref": "a reference get or put removed (_notifier_get/_put, _vref, T_REF / N_REFS / H_USERS +-1)",
    "drop-tlb-flush": "kvm_flush_remote_tlbs after write protection removed",
    "drop-reload": "a reload request (kvm_make_all_cpus_request) or its wait removed",
}


#: schedules per ``explore`` command of a mutant (on seeds 1-3 each race was found within 120, one in 298)
EXPLORE_SCHEDULES = 150
FIRST_USERS = "bench/scenario-first-users.toml"  # two vCPUs take a new table at once, then both leave it
TRACK_STORE = "bench/scenario-track-store.toml"  # the mirror: a page tracked while an L1 stores to it


def _explore(scenario: str, *extra: str) -> tuple[str, ...]:
    return ("explore", scenario, "--schedules", str(EXPLORE_SCHEDULES), *extra)


#: after the runs, the ``explore`` scenarios that reach a file's narrow paths (a user debugging that
#: code runs them): memslot removal (remove_region), erases of a table in use (_invalidate), L2
#: switches sharing tables (get / put), two first and last users of one table, L1 stores racing a
#: page-track user's write-protect (the scripted store, track_gfn and its remote TLB flush)
EXPLORES = {
    "vm/avic/erase.py": (_explore("memslot"), _explore("invalidate")),
    "vm/avic/pool.py": (_explore("invalidate"),),
    "vm/avic/rcu_list.py": (_explore("share", "--design", "rcu-list"), _explore(FIRST_USERS, "--design", "rcu-list")),
    "vm/avic/mutex_hash.py": (_explore(FIRST_USERS),),
    "vm/avic/guest.py": (_explore(FIRST_USERS, "--design", "rcu-list"),),
    "vcpu/script.py": (_explore(TRACK_STORE),),
    "vm/page_track.py": (_explore(TRACK_STORE),),
    "vm/notifier.py": (_explore("memslot"),),  # walk(): a memslot's track_remove_region, never in a run
}
#: under the memory model tso (docs/explore.md "Memory model"): a FIFO store buffer per vCPU process,
#: the only way to see a store -> load barrier dropped (Dekker: _set_running's V_LOADED before the
#: vref counts against _vref's locked increment; a VMRUN's entry against a reload request; the
#: caller's unlink before get_state's snapshot: run in `notifier`, where the model's own locked
#: NH_LIVE / NH_SEQ counts after the unlink drain the buffer, so that window stays closed; see
#: docs/success.md)
FLIPS = "bench/scenario-flips.toml"  # `running` with four rounds of flips against syncs
TSO_EXPLORES = {
    "vm/avic/guest.py": (_explore("running", "--design", "rcu-list", "--memory-model", "tso"),
                         _explore("invalidate", "--memory-model", "tso"),
                         _explore(FLIPS, "--design", "rcu-list", "--memory-model", "tso")),
    "vm/avic/pool.py": (_explore("running", "--design", "rcu-list", "--memory-model", "tso"),
                        _explore(FLIPS, "--design", "rcu-list", "--memory-model", "tso")),
    "ipc/rcu.py": (_explore("notifier", "--memory-model", "tso"),),
}
for _rel, _cmds in TSO_EXPLORES.items():
    EXPLORES[_rel] = EXPLORES.get(_rel, ()) + _cmds
#: three vCPUs enter one new table and stay its users (usecount in and out, the UNTRACKED claim, three
#: references); a random walk: PCT starves the vCPU write-protecting it (the scenario file says why)
THREE_USERS = "bench/scenario-three-users.toml"
EXPLORES["vm/avic/guest.py"] += (_explore(THREE_USERS, "--strategy", "random"),)
#: a node freed while a table's counted node (node-refcount) is allocated, maybe in its slot
FREE_ALLOC = "bench/scenario-free-alloc.toml"
EXPLORES["vm/notifier.py"] += (_explore(FREE_ALLOC, "--depth", "2"),)
#: rcu-list: a late get of a table (lock-free inc_not_zero) while its last put or another get runs
LATE_GET = "bench/scenario-late-get.toml"
EXPLORES["vm/avic/rcu_list.py"] += (_explore(LATE_GET, "--strategy", "random"),)


#: a design's teardown releases its registrations: under page_track v6.6 one left behind holds a VM
#: reference (kvm_get_kvm) and fails the run at VM destruction (notifier.registered_at_destroy)
V66_RUNS = {
    "vm/avic/base.py": (("run", "--design", "rcu-list", "--page-track", "v6.6"),  # the shared node
                        ("run", "--design", "per-table-notifier", "--page-track", "v6.6")),  # per-table ones
    "vm/nested.py": (("run", "--design", "mirror", "--page-track", "v6.6"),),
}


def commands_for(rel: str) -> tuple[tuple[str, ...], ...]:
    """The commands a user would run for the file a mutant touches (the catalogue's rule): the runs,
    then the file's ``EXPLORES`` and ``V66_RUNS``."""
    return _runs_for(rel) + EXPLORES.get(rel, ()) + V66_RUNS.get(rel, ())


def _runs_for(rel: str) -> tuple[tuple[str, ...], ...]:
    kaboom = (("scenario", "kaboom"),)
    if rel in ("ipc/rcu.py",):
        return TORTURE
    if rel == "ipc/locks.py":
        return (("torture", "spinlock"), ("torture", "mutex")) + RUN_MUTEX_HASH
    if rel.startswith("vm/avic/") or rel == "vm/nested.py":
        return RUN_AVIC + kaboom
    if rel in ("vm/notifier.py", "vm/write_path.py"):
        return RUN_MIRROR + RUN_PER_TABLE + RUN_RCU_LIST
    if rel.startswith("vcpu/") or rel in ("vm/page_track.py", "vm/mmu.py", "vm/kvm.py"):
        return RUN_MIRROR + RUN_RCU_LIST + RUN_MUTEX_HASH + RUN_PER_TABLE
    return RUN_MIRROR + RUN_AVIC + kaboom


# -- the files --------------------------------------------------------------------------------------------
def excluded(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) for pat in EXCLUDED_MODULES)


def scan_files(root: Path, rev: str | None = None) -> list[str]:
    """The Python files under SCAN_DIRS (the working tree, or ``rev``), excluded modules left out."""
    if rev is None:
        files = [str(p.relative_to(root)) for d in SCAN_DIRS for p in (root / d).rglob("*.py")]
    else:
        out = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "--name-only", rev, *SCAN_DIRS],
                             capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if f.endswith(".py")]
    return sorted(f for f in files if not excluded(f))


# -- statements -------------------------------------------------------------------------------------------
def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _recv(call: ast.Call) -> str:
    return ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""


def _calls(node: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)]


def _expr_call(stmt: ast.stmt) -> ast.Call | None:
    """The call of a statement that is only a call (``x.lock()``)."""
    return stmt.value if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) else None


def instrumentation(node: ast.AST) -> bool:
    """Declared out of scope: a counter / trace / report / check call, or a stats word (module doc)."""
    for c in _calls(node):
        recv = _recv(c)
        if _name(c) in INSTRUMENTATION_CALLS or any(recv == r or recv.startswith(r + ".")
                                                    for r in INSTRUMENTATION_RECEIVERS):
            return True
    return any(isinstance(n, ast.Name) and n.id in STATS_WORDS or isinstance(n, ast.Attribute) and n.attr in STATS_WORDS
               for n in ast.walk(node))


def _names(node: ast.AST, ctx) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


def _key_text(node: ast.AST | str) -> str:
    s = node if isinstance(node, str) else ast.unparse(node).splitlines()[0]
    return re.sub(r"[^\w.()\[\];=<>!+\-*&|~:]", "", s.replace(",", ";"))[:80]


@dataclass
class Site:
    operator: str
    func: str  # qualified name of the enclosing function ('' at module level)
    key: str  # content key (the edited statement's text)
    first: int  # 1-based first line of the edited region
    last: int  # 1-based last line (inclusive)
    new: list[str]  # replacement lines for first..last
    bug: str


class _Finder(ast.NodeVisitor):
    """Walks one module, keeps the function qualname and the statement blocks, yields Sites."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.stack: list[str] = []
        self.sites: list[Site] = []

    # -- walking ---------------------------------------------------------------------------------------
    def visit_ClassDef(self, node):
        if node.name in EXCLUDED_CLASSES:
            return
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def visit_FunctionDef(self, node):
        if EXCLUDED_FUNCTIONS.match(node.name):
            return
        self.stack.append(node.name)
        self._block(node.body)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def _block(self, body: list[ast.stmt]) -> None:
        for i, s in enumerate(body):
            if isinstance(s, ast.If) and INSTRUMENTATION_GUARDS.match(ast.unparse(s.test)):
                self._block(s.orelse)  # the guarded body is out of scope, its else is not
                continue
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.visit(s)
                continue
            self._statement(body, i, s)
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(s, field, None)
                if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                    self._block(sub)
            for h in getattr(s, "handlers", []):
                self._block(h.body)

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def func(self) -> str:
        return ".".join(self.stack)

    def indent(self, node: ast.stmt) -> str:
        line = self.lines[node.lineno - 1]
        return line[:len(line) - len(line.lstrip())]

    def text(self, node: ast.stmt) -> list[str]:
        return self.lines[node.lineno - 1:node.end_lineno]

    def add(self, op: str, key, first: int, last: int, new: list[str], bug: str) -> None:
        self.sites.append(Site(op, self.func, _key_text(key), first, last, new, bug))

    def _without(self, body: list[ast.stmt], node: ast.stmt) -> list[str]:
        """Replacement of ``node``'s line: nothing, or ``pass`` when it is its block's only statement."""
        return [self.indent(node) + "pass\n"] if len(body) == 1 else []

    def _single(self, s: ast.stmt) -> bool:
        return s.lineno == s.end_lineno

    # -- the operators ---------------------------------------------------------------------------------
    def _statement(self, body: list[ast.stmt], i: int, s: ast.stmt) -> None:
        if instrumentation(s) if not isinstance(s, (ast.If, ast.While, ast.For, ast.Try, ast.With)) else False:
            return
        call = _expr_call(s)
        name = _name(call) if call else ""
        if call is not None and self._single(s):
            self._pairs(body, i, s, call, name)
            self._drops(body, s, call, name)
        if isinstance(s, ast.With) and len(s.items) == 1 and s.items[0].optional_vars is None:
            ctx = ast.unparse(s.items[0].context_expr)
            if re.search(r"lock$|reader$", ctx):
                op = "drop-read-lock-pair" if ctx.endswith("reader") else "drop-lock-pair"
                self.add(op, f"with {ctx}", s.lineno, s.lineno, [self.indent(s) + "if True:\n"],
                         f"`with {ctx}:` body runs without the lock")
        if i + 1 < len(body):
            self._swap(body, i, s, body[i + 1])
        if name in UNLOCKS and self._single(s):
            self._unlock_earlier(body, i, s)
        self._header_ops(s)
        if not isinstance(s, (ast.If, ast.While, ast.For, ast.Try, ast.With)):
            self._expr_ops(s, s)

    def _drops(self, body, s, call, name) -> None:
        src = ast.unparse(call)
        kinds = (("drop-barrier", BARRIERS, "barrier removed"), ("drop-gp-wait", GP_WAITS, "grace-period wait removed"),
                 ("drop-tlb-flush", {"kvm_flush_remote_tlbs"}, "TLB flush after write protection removed"),
                 ("drop-reload", {"_reload_wait"}, "the wait for kicked vCPUs to leave L2 removed"),
                 ("drop-ref", REF_CALLS, "reference get / put removed"))
        for op, names, bug in kinds:
            if name in names:
                self.add(op, s, s.lineno, s.lineno, self._without(body, s), f"{src}: {bug}")
        if name in RMW and REF_WORDS.search(src):
            self.add("drop-ref", s, s.lineno, s.lineno, self._without(body, s), f"{src}: reference count change removed")

    def _pairs(self, body, i, s, call, name) -> None:
        for op, table in (("drop-lock-pair", LOCKS), ("drop-read-lock-pair", READ_LOCKS)):
            if name not in table or (op == "drop-lock-pair" and "read" in _recv(call)):
                continue
            want = ast.unparse(call).replace(name + "(", table[name] + "(", 1)
            if name == "lock":  # x.lock() -> x.unlock()
                want = ast.unparse(call)[:-len("lock()")] + "unlock()"
            partner = _find_partner(body[i + 1:], want, ast.unparse(call))
            if partner is None:
                continue
            pbody, p = partner
            if not self._single(p):
                return
            new = self.lines[s.lineno - 1:p.end_lineno]
            keep_s, keep_p = self._without(body, s), self._without(pbody, p)
            k = p.lineno - s.lineno
            new = keep_s + new[1:k] + keep_p + new[k + 1:]
            self.add(op, s, s.lineno, p.end_lineno, new, f"{ast.unparse(call)} ... {want} removed")

    def _swap(self, body, i, a: ast.stmt, b: ast.stmt) -> None:
        if not (self._single(a) and self._single(b)) or instrumentation(a) or instrumentation(b):
            return
        ca, cb = {_name(c) for c in _calls(a)}, {_name(c) for c in _calls(b)}
        if not (ca & MEMORY_CALLS and cb & MEMORY_CALLS and (ca | cb) & WRITES) or cb & UNLOCKS:
            return  # both steps touch shared memory / synchronize, one writes; unlock-earlier moves unlocks
        if (_names(a, ast.Store) & (_names(b, ast.Load) | _names(b, ast.Store))) or _names(b, ast.Store) & _names(a, ast.Load):
            return  # a data dependence: not a reorder the hardware or a compiler could make
        la, lb = self.lines[a.lineno - 1], self.lines[b.lineno - 1]
        if not ((ca | cb) & (WRITES - {"store"}) or PUBLISH_WORDS.search(la) or PUBLISH_WORDS.search(lb)):
            return  # two plain stores to words that publish nothing (initialising or scribbling an object)
        if la.strip() == lb.strip():
            return
        self.add("swap-sync", f"{_key_text(a)} <> {_key_text(b)}", a.lineno, b.lineno,
                 [self.indent(a) + lb.lstrip(), self.indent(b) + la.lstrip()],
                 f"`{la.strip()}` and `{lb.strip()}` swapped")

    def _unlock_earlier(self, body, i, s) -> None:
        k = i - 1
        while k >= 0 and instrumentation(body[k]) and not isinstance(body[k], (ast.If, ast.Try, ast.For, ast.While)):
            k -= 1
        if k < 0 or _expr_call(body[k]) is not None and _name(_expr_call(body[k])) in set(LOCKS) | set(READ_LOCKS):
            return
        p = body[k]
        if any(isinstance(n, (ast.Return, ast.Raise, ast.Break, ast.Continue)) for n in ast.walk(p)):
            return  # not a statement an unlock could simply move above
        first = p.lineno if not getattr(p, "decorator_list", None) else p.decorator_list[0].lineno
        region = self.lines[first - 1:s.end_lineno]
        moved = self.lines[s.lineno - 1]
        new = [self.indent(p) + moved.lstrip()] + region[:s.lineno - first]
        self.add("unlock-earlier", s, first, s.end_lineno, new,
                 f"`{moved.strip()}` moved before `{self.lines[p.lineno - 1].strip()}`")

    def _header_ops(self, s: ast.stmt) -> None:
        """Loop / if headers: weaken-inc-not-zero, and off-by-one in their test."""
        if isinstance(s, ast.While) and isinstance(s.test, ast.Compare) and s.lineno == s.test.end_lineno:
            var = s.test.left
            cas = [c for c in _calls(ast.Module(body=s.body, type_ignores=[])) if _name(c) == "cmpxchg"]
            if isinstance(var, ast.Name) and any(len(c.args) == 3 and ast.unparse(c.args[1]) == var.id for c in cas):
                self.add("weaken-inc-not-zero", f"while {ast.unparse(s.test)}", s.lineno, s.lineno,
                         [self.indent(s) + "while True:\n"],
                         f"`while {ast.unparse(s.test)}:` cmpxchg loop made unconditional")
        if isinstance(s, (ast.If, ast.While)) and not instrumentation(s.test):
            self._expr_ops(s.test, s)

    def _expr_ops(self, node: ast.AST, stmt: ast.stmt) -> None:
        """Expression-level operators inside one line: split-rmw, off-by-one."""
        for n in ast.walk(node):
            if n.lineno != n.end_lineno if hasattr(n, "lineno") else True:
                continue
            if isinstance(n, ast.Call) and _name(n) in RMW and isinstance(n.func, ast.Attribute) and _pure(n.args):
                self._replace(stmt, n, _split(n), "split-rmw", f"{ast.unparse(n)} split into a load and a store")
                if _name(n) == "cmpxchg" and len(n.args) == 3:
                    m, a = ast.unparse(n.func.value), [ast.unparse(x) for x in n.args]
                    self._replace(stmt, n, f"({m}.store({a[0]}, {a[2]}), {a[1]})[1]", "cas-to-store",
                                  f"{ast.unparse(n)} made a blind store that always succeeds")
            elif (isinstance(n, ast.Compare) and len(n.ops) == 1 and SEQ_NAMES.search(ast.unparse(n))
                  and not any(isinstance(x, ast.Constant) and isinstance(x.value, str) for x in (n.left, *n.comparators))):
                flips = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">"}
                op = type(n.ops[0])
                left, right = self.src(n.left), self.src(n.comparators[0])
                if op in flips:
                    new = f"{left} {flips[op]} {right}"
                elif op in (ast.Eq, ast.NotEq) and re.search(r"seq|gen|cookie|epoch|snap", ast.unparse(n), re.I):
                    new = f"{left} {'==' if op is ast.Eq else '!='} ({right}) + 1"
                else:
                    continue
                self._replace(stmt, n, new, "off-by-one", f"`{ast.unparse(n)}` -> `{new}`")
            elif (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add) and isinstance(n.right, ast.Constant)
                  and type(n.right.value) is int
                  and (SEQ_NAMES.search(ast.unparse(n.left)) or SEQ_FUNCS.search(self.stack[-1] if self.stack else ""))):
                c, left = n.right.value, self.src(n.left)
                left = f"({left})" if isinstance(n.left, (ast.BinOp, ast.BoolOp, ast.IfExp, ast.Compare)) else left
                new = f"{left} + {c - 1 if c > 1 else c + 1}"
                self._replace(stmt, n, new, "off-by-one", f"`{ast.unparse(n)}` -> `{new}`")

    def src(self, n: ast.expr) -> str:
        """The source text of a one-line expression (parentheses kept, unlike ast.unparse)."""
        return self.lines[n.lineno - 1].encode()[n.col_offset:n.end_col_offset].decode()

    def _replace(self, stmt: ast.stmt, n: ast.expr, new_src: str, op: str, bug: str) -> None:
        line = self.lines[n.lineno - 1]
        b = line.encode()
        new_line = (b[:n.col_offset].decode() + new_src + b[n.end_col_offset:].decode())
        if new_line != line:
            self.add(op, ast.unparse(n), n.lineno, n.lineno, [new_line], bug)


def _find_partner(rest: list[ast.stmt], want: str, same: str):
    """The unlock ``want`` that ends the section a lock opened: later in the same block, or in the
    ``finally`` (possibly under an ``if``) of a ``try`` that follows it; None at a re-lock first."""
    for s in rest:
        c = _expr_call(s)
        if c is not None:
            src = ast.unparse(c)
            if src == want:
                return rest, s
            if src == same:
                return None
        if isinstance(s, ast.Try) and s.finalbody:
            found = _in_finally(s.finalbody, want)
            if found:
                return found
    return None


def _in_finally(body: list[ast.stmt], want: str):
    for s in body:
        c = _expr_call(s)
        if c is not None and ast.unparse(c) == want:
            return body, s
        if isinstance(s, ast.If) and not s.orelse:
            found = _in_finally(s.body, want)
            if found:
                return found
    return None


def _pure(args: list[ast.expr]) -> bool:
    """Arguments that may be evaluated twice: names, attributes, constants, arithmetic, ``_w(...)``."""
    for a in args:
        for n in ast.walk(a):
            if isinstance(n, ast.Call) and _name(n) not in ("_w", "s64", "int"):
                return False
            if isinstance(n, (ast.NamedExpr, ast.Await, ast.Yield, ast.Lambda)):
                return False
    return True


def _split(n: ast.Call) -> str:
    """The RMW call ``n`` as a load then a store (not atomic); its value is the old one, as the RMW's."""
    m, a = ast.unparse(n.func.value), [ast.unparse(x) for x in n.args]
    name = n.func.attr
    if name == "fetch_add":
        return f"(lambda _o: ({m}.store({a[0]}, _o + ({a[1]})), _o)[1])({m}.load({a[0]}))"
    if name == "xchg":
        return f"(lambda _o: ({m}.store({a[0]}, {a[1]}), _o)[1])({m}.load({a[0]}))"
    return f"(lambda _o: ({m}.store({a[0]}, {a[2]}) if _o == ({a[1]}) else None, _o)[1])({m}.load({a[0]}))"


# -- sites -> mutants ------------------------------------------------------------------------------------
def _edit(text: str, lines: list[str], site: Site) -> Edit:
    """The site as one exact-text Edit, widened by whole lines around it until it occurs once."""
    a, b = site.first - 1, site.last
    while True:
        old = "".join(lines[a:b])
        if text.count(old) == 1 or (a == 0 and b == len(lines)):
            return Edit(old, "".join(lines[a:site.first - 1]) + "".join(site.new) + "".join(lines[site.last:b]))
        a, b = max(0, a - 1), min(len(lines), b + 1)


def file_mutants(rel: str, text: str) -> list[Mutant]:
    """Every operator mutant of one file (``rel``: its path in the tree, ``text``: its content)."""
    lines = text.splitlines(keepends=True)
    finder = _Finder(lines)
    finder.visit(ast.parse(text, rel))
    out: list[Mutant] = []
    seen: dict[str, int] = {}
    commands = commands_for(rel)
    for site in finder.sites:
        base = f"{site.operator}@{rel}:{site.func or '<module>'}:{site.key}"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}#{seen[base]}"
        edit = _edit(text, lines, site)
        try:
            after = text.replace(edit.old, edit.new)
            compile(after, rel, "exec")
        except SyntaxError:
            continue  # an operator that cannot apply here (e.g. a deleted lone statement of an `else:`)
        n = changed_lines(text, after)
        if n == 0:
            continue
        out.append(Mutant(name, site.operator, rel, (edit,), commands, site.bug, lines=n,
                          multi=OPERATORS[site.operator] if n > 1 else ""))
    return out


def generate(root: Path, rev: str | None = None, read=None) -> list[Mutant]:
    """Every operator mutant of the tree at ``root`` (or of ``rev``; ``read(root, rel, rev)`` reads a
    file), sorted by id."""
    if read is None:
        def read(r, rel, _rev):
            return (r / rel).read_text()
    out: list[Mutant] = []
    for rel in scan_files(root, rev):
        out += file_mutants(rel, read(root, rel, rev))
    return sorted(out, key=lambda m: m.name)


def check_patches(mutants: list[Mutant], root: Path, rev: str | None = None, read=None) -> None:
    """Every mutant applies to its file and changes exactly one site (PatchError otherwise)."""
    if read is None:
        def read(r, rel, _rev):
            return (r / rel).read_text()
    texts: dict[str, str] = {}
    for m in mutants:
        if len(m.edits) != 1:
            raise PatchError(f"mutant {m.name}: {len(m.edits)} edits (an operator mutant is one)")
        text = texts.setdefault(m.file, read(root, m.file, rev))
        patch_text(m, text)
