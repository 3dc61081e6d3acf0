"""Which paths of the code under test a scenario reaches (``launch.py explore --coverage``).

Two measures, both summed over every schedule of an explore:
- **functions**: every function and method defined in vm/ and vm/avic/ (``path:qualname``, nested
  functions included, lambdas and comprehensions not) that ran at least once, in a vCPU process or
  in the scheduler's process (the design's setup, the sampling checker, the oracle). Measured with
  a global ``sys.settrace`` function that only records each new frame's code object and returns
  None (no line events: one call of a tiny Python function per Python call; sys.monitoring is
  3.12+). Only with ``--coverage``.
- **named paths**: the paths issue 22 names, from the AVIC wing's own statistics (vm/avic/table.py
  ``STATS``: sync, update, invalidate, flood drop, reload, register / unregister), the grace
  periods each vCPU process ran or shared (``RcuDomain.gps`` / ``shared_gps`` per domain, with
  how many processes ran ``synchronize`` on that domain in one schedule), and, with
  ``--coverage``, functions (memslot removal, the page-track list's register / unregister).
  Always on (they cost one read of counters per schedule).
"""

from __future__ import annotations

import os
import sys
import types

VM_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vm")
_SKIP = ("<lambda>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<module>")

# named path -> (kind, what): "stat" (an AVIC STATS counter > 0), "fn" (a function ran), "gp" (a
# domain's grace periods: "<domain>" ran, "<domain>:shared" one shared, "<domain>:3" three processes
# in one schedule: two updaters and a reader of that domain)
NAMED = {
    "table create": ("stat", "table_create"),
    "table sync": ("stat", "sync"),
    "table resync": ("stat", "resync"),
    "entry update": ("stat", "entry_update"),
    "table invalidate": ("stat", "invalidate"),
    "flood drop": ("stat", "flood_drop"),
    "reload request (every vCPU)": ("stat", "reload_all"),
    "reload request waiting for a vCPU in L2": ("stat", "reload_request"),
    "kick out of L2": ("stat", "kick_exit"),
    "table free": ("stat", "table_free"),
    "write-protect (track gfn)": ("stat", "track_gfn"),
    "track_write on a table": ("stat", "track_write"),
    "AVIC notifier register": ("stat", "register"),
    "AVIC notifier unregister": ("stat", "unregister"),
    "memslot removal": ("fn", "vm/avic/erase.py:TableErase.remove_region"),
    "page-track register_notifier": ("fn", "vm/notifier.py:kvm_page_track_register_notifier"),
    "page-track unregister_notifier": ("fn", "vm/notifier.py:kvm_page_track_unregister_notifier"),
    "synchronize_rcu": ("gp", "rcu"),
    "synchronize_srcu": ("gp", "track_srcu"),
    "TLB flush (guest_mode grace period)": ("gp", "guest_mode"),
    "grace period shared by two callers": ("gp", "*:shared"),
    "grace periods of two updaters in one schedule": ("gp", "*:2"),
}


class Tracer:
    """Records the code objects of the Python frames begun while started (this thread)."""

    def __init__(self) -> None:
        self.codes: set[types.CodeType] = set()
        self._old = None

    def _call(self, frame, event, arg):
        self.codes.add(frame.f_code)

    def start(self) -> None:
        self._old = sys.gettrace()
        sys.settrace(self._call)

    def stop(self) -> None:
        sys.settrace(self._old)

    def names(self) -> list[str]:
        """``vm/…/file.py:qualname`` of the recorded functions of vm/."""
        out = set()
        for c in self.codes:
            f = c.co_filename
            if f.startswith(VM_DIR) and c.co_name not in _SKIP:
                out.add(f"vm{f[len(VM_DIR):]}:{c.co_qualname}")
        return sorted(out)


def all_functions() -> list[str]:
    """Every function of vm/ and vm/avic/ (``vm/…:qualname``), from the sources."""
    out = []
    for sub in ("", "avic"):
        d = os.path.join(VM_DIR, sub)
        for fn in sorted(os.listdir(d)):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(d, fn)
            with open(path, encoding="utf-8") as f:
                code = compile(f.read(), path, "exec", dont_inherit=True)
            rel = os.path.relpath(path, os.path.dirname(VM_DIR))
            stack = [code]
            while stack:
                c = stack.pop()
                if c is not code and c.co_name not in _SKIP:
                    out.append(f"{rel}:{c.co_qualname}")
                stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return sorted(set(out))


class Coverage:
    """Named paths and functions reached over the schedules of one explore."""

    def __init__(self, functions: bool) -> None:
        self.functions = functions
        self.fns: set[str] = set()
        self.stats: dict[str, int] = {}
        self.gp: dict[str, int] = {}

    def add_schedule(self, stats: dict, reports: list[dict], parent_fns: list[str]) -> None:
        for k, v in stats.items():
            if isinstance(v, int | float):
                self.stats[k] = self.stats.get(k, 0) + int(v)
        self.fns.update(parent_fns)
        callers: dict[str, int] = {}
        for rep in reports:
            self.fns.update(rep.get("fns", ()))
            for dom, (gps, shared) in rep.get("gp", {}).items():
                self.gp[dom] = self.gp.get(dom, 0) + gps + shared
                if shared:
                    self.gp["*:shared"] = self.gp.get("*:shared", 0) + shared
                if gps + shared:
                    callers[dom] = callers.get(dom, 0) + 1
        if any(n >= 2 for n in callers.values()):
            self.gp["*:2"] = self.gp.get("*:2", 0) + 1

    def named(self) -> dict[str, int]:
        out = {}
        for name, (kind, what) in NAMED.items():
            if kind == "stat":
                out[name] = self.stats.get(what, 0)
            elif kind == "gp":
                out[name] = self.gp.get(what, 0)
            elif self.functions:
                out[name] = int(what in self.fns)
        return out

    def summary(self) -> dict:
        named = self.named()
        res = {"named": named, "named_reached": sum(1 for v in named.values() if v),
               "named_total": len(named), "method": "AVIC statistics + grace-period counters per process"}
        if self.functions:
            allf = all_functions()
            reached = sorted(self.fns & set(allf))
            res.update(functions_reached=len(reached), functions_total=len(allf), functions=reached,
                       functions_missed=sorted(set(allf) - self.fns),
                       method=res["method"] + "; functions: sys.settrace call events in every process")
        return res


def format_summary(name: str, cov: dict) -> list[str]:
    lines = [f"coverage of {name}: {cov['named_reached']}/{cov['named_total']} named paths"
             + (f", {cov['functions_reached']}/{cov['functions_total']} functions of vm/ and vm/avic/"
                if "functions_total" in cov else "")]
    for k, v in cov["named"].items():
        lines.append(f"  {'x' if v else ' '} {k}" + (f" ({v:,})" if v > 1 else ""))
    return lines
