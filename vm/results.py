"""The results document of a run (the one source tables, plots and ``compare`` read) and its
rendering: throughput per op kind, latency percentiles, a lock_stat table, WARNs, the verdict.

JSON shape (documented in docs/results.md):
``{"config", "seed", "versions", "elapsed_s", "ops": {kind: {count, per_s, p50_ns, p99_ns, p999_ns,
max_ns}}, "latency_sampling": {sampled_ops, every, method, other_ops}, "counters", "locks": {class:
{acquisitions, contentions, wait_ns_total, wait_ns_max, wait_ns_min, wait_ns_avg, hold_ns_total, hold_ns_max, hold_ns_min, hold_ns_avg}}, "gp": {domain:
grace periods}, "warnings": [{kind, message, data}], "warn_count", "oracle": [violations],
"verdict": "SUCCESS"|"FAILURE", "reasons": [...]}``
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import numpy as np

from ipc import hist, procstat
from ipc.locks import merge_lockstat
from vm import layout as L

# op kinds measured by histograms (latency) and by counters only (count, rate)
HIST_OPS = L.HISTS
COUNT_OPS = {"untracked_write": "write_untracked", "tracked_write": "write_tracked",
             "mmio_write": "write_mmio", "l2_switch": "l2_switch"}
REQUIRED_OPS = ("nested_vmrun", "emulated_write", "notifier_walk", "synchronize_srcu")


def fidelity_line(cfg: dict) -> str:
    """The fidelity options a run had (docs/fidelity.md), in one line: what its numbers assume."""
    if "page_track" not in cfg:  # written before the page-track options existed: not recorded
        return "page track: unknown (older results)"
    line = (f"page track: {cfg['page_track']}, MMIO writes "
            f"{'walk the notifiers (--mmio-walk)' if cfg.get('mmio_walk') else 'do not walk (as x86.c)'}, "
            f"redundant registration {cfg.get('redundant_registration', 'warn')}")
    if "avic_vmrun_lock" not in cfg:  # before issue 18
        return line
    return (line + f"; nested VMRUN takes tables_lock "
            f"{'on a table change (RFC v3)' if cfg['avic_vmrun_lock'] == 'change' else 'on every VMRUN'}, "
            f"KVM's write handler takes mmu_lock "
            f"{'once L2 has run' if cfg['indirect_shadow_pages'] == 'auto' else 'never (no indirect shadow pages)'}, "
            f"entry update {'re-reads guest memory' if cfg['entry_update'] == 'reread' else 'from the cached gentry (RFC v3)'}, "
            f"{cfg['table_invalidate_fraction']:.2%} of table writes erase")


def versions() -> dict[str, str]:
    import msgspec
    import zmq

    return {"python": platform.python_version(), "numpy": np.__version__, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "msgspec": msgspec.__version__, "pagetrack_sim": "0.1.0",
            "machine": platform.machine(), "cpus": str(os.cpu_count())}


def collect(kvm, cfg, elapsed_s: float, warnings: list[dict], oracle: list[str],
            extra_reasons: list[str] | None = None, design_stats: dict | None = None,
            scripted: bool = False) -> dict[str, Any]:
    """The results document. An op that has a counter (``hist_counters``) takes its count from the
    counter: the histogram may hold fewer (no stats; a scripted ``vmrun`` is not timed), and its
    percentiles are then from the operations it did time (None if it timed none). ``scripted``: the
    elapsed time of a script (commands sent one batch at a time) is not a rate-bearing duration, so
    no rate is computed: ``per_s`` is 0.0 and ``rate_meaningful`` false (render shows "–")."""
    v = kvm.vm.v
    elapsed = max(elapsed_s, 1e-9)

    def rate(n: int) -> float:
        return 0.0 if scripted else round(n / elapsed, 1)

    counters = {name: int(x) for name, x in zip(L.COUNTERS, v["counters"].sum(axis=0), strict=True)}
    # histogram ops that also have a counter (counted on every path, the scripted one too)
    hist_counters = {"nested_vmrun": "vmrun", "tlb_flush": "tlb_flush"}
    ops: dict[str, dict] = {}
    for i, name in enumerate(HIST_OPS):
        h = hist.merge(v["hist"][:, i, :])
        s = hist.summary(h)
        count = counters[hist_counters[name]] if name in hist_counters else s["count"]
        if count == 0 and name not in REQUIRED_OPS:
            continue
        timed = int(h[hist.HIST_HDR:hist.HIST_HDR + hist.HIST_BUCKETS].sum()) > 0  # samples to report
        ops[name] = {"count": count, "per_s": rate(count),
                     **{k: (s[k] if timed else None) for k in ("p50_ns", "p99_ns", "p999_ns", "max_ns", "mean_ns")}}
    for name, cname in COUNT_OPS.items():
        ops[name] = {"count": counters[cname], "per_s": rate(counters[cname])}
    locks = merge_lockstat(v["lockstat"], list(L.LOCK_CLASSES))
    gp = {prefix: int(v[f"{prefix}_hdr"][1]) for prefix, _ in L.DOMAINS}
    reasons = failure_reasons(extra_reasons, oracle, kvm.poison_reads, counters["stale_entries"], warnings,
                              kvm.warns)
    ncpu = procstat.cpus()
    return {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "host": {"cpus": ncpu, "vcpus_per_cpu": round(cfg.vcpus / ncpu, 3)},
        "elapsed_s": round(elapsed_s, 4),
        "rate_meaningful": not scripted,
        "ops": ops,
        "latency_sampling": latency_sampling(cfg),
        "counters": counters,
        "locks": locks,
        "gp": gp,
        "design": design_stats or {},
        "warnings": warnings[:200],
        "warn_count": max(len(warnings), kvm.warns),
        "oracle": oracle[:100],
        "verdict": "FAILURE" if reasons else "SUCCESS",
        "reasons": reasons,
    }




def failure_reasons(extra: list[str] | None, oracle: list[str], poison: int, stale: int, warnings: list[dict],
                    warns_counted: int) -> list[str]:
    """Why a run is a FAILURE (empty: SUCCESS): the coordinator's own reasons, oracle violations,
    poisoned reads, stale physid entries, WARNs — received, or only counted in shared memory (a WARN
    whose message was dropped as a bad frame or lost is still a kernel bug report)."""
    reasons = list(extra or [])
    if oracle:
        reasons.append(f"oracle: {len(oracle)} violation(s); first: {oracle[0]}")
    if poison:
        reasons.append(f"{poison} read(s) of poisoned memory")
    if stale:
        reasons.append(f"{stale} VMRUN(s) used a stale physid entry")
    if warnings:  # a WARN is a kernel bug report (an RCU stall too, as in rcutorture)
        reasons.append(f"{len(warnings)} WARN(s); first: {warnings[0]['message']}")
    elif warns_counted:
        reasons.append(f"{warns_counted} WARN(s) counted in shared memory, none received over the channel")
    return reasons


def latency_sampling(cfg) -> dict[str, Any]:
    """How the latency percentiles of ``ops`` were sampled (counts are exact either way)."""
    every = cfg.latency_sample
    if not cfg.stats:
        return {"sampled_ops": [], "every": every, "method": "no latency histograms (stats off)"}
    return {"sampled_ops": list(L.SAMPLED_HISTS), "every": every,
            "method": ("every operation timed" if every == 1 else
                       f"1 operation in {every} on average timed (random interval, uniform in 1..{2 * every - 1}), "
                       "weighted by its interval; count exact, percentiles, mean, min and max from the samples"),
            "other_ops": "every operation timed"}


def _json_default(o):
    """A value JSON has no type for: bytes as hex, numpy scalars and arrays as Python values, sets
    and tuples as lists, anything else as its repr (a str)."""
    if isinstance(o, bytes | bytearray | memoryview):
        return bytes(o).hex()
    if hasattr(o, "tolist"):  # numpy scalar (-> int / float / bool) or array (-> list)
        try:
            return o.tolist()
        except Exception:  # noqa: BLE001 - fall back to the repr
            pass
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    return repr(o)


_JSON_DEPTH = 64  # deeper than any results document: a cycle or a runaway nesting becomes a repr
_INF = float("inf")  # -_INF < x < _INF: x is finite (False for NaN)


def _json_key(k) -> str:
    if type(k) is str:
        return k
    if k is None or type(k) is bool or type(k) is int:
        return json.dumps(k)  # what json.dumps itself makes of these keys
    v = _jsonable(k, _JSON_DEPTH - 1)
    return v if type(v) is str else json.dumps(v)


def _jsonable(o, depth: int = 0, path: set[int] | None = None):
    """``o`` as plain JSON data that ``json.dumps(..., allow_nan=False)`` cannot refuse: str / int /
    bool / None as they are, a NaN or infinite float as None (JSON has neither), dict keys as str
    (bytes as hex, a tuple as its JSON text), lists for tuples and sets, ``_json_default`` for the
    rest (a numpy value, bytes, an unknown object's repr); a container inside itself (``path``:
    the ids of those being converted) or nested ``_JSON_DEPTH`` deep is written as a short repr."""
    t = type(o)
    if t is str or t is int or t is bool or o is None:
        return o
    if t is float:
        return o if -_INF < o < _INF else None
    if isinstance(o, dict | list | tuple | set | frozenset):
        path = set() if path is None else path
        if depth >= _JSON_DEPTH or id(o) in path:
            return f"<{type(o).__name__} nested too deep or inside itself>"
        path.add(id(o))
        try:
            if isinstance(o, dict):
                return {_json_key(k): _jsonable(v, depth + 1, path) for k, v in o.items()}
            return [_jsonable(v, depth + 1, path) for v in o]
        finally:
            path.discard(id(o))
    if depth >= _JSON_DEPTH:
        return repr(o)[:1000]
    if isinstance(o, int):  # a subclass (IntEnum; numpy.bool_ is not one: _json_default)
        return int(o)
    if isinstance(o, float):  # numpy.float64 is one
        return float(o) if -_INF < o < _INF else None
    if isinstance(o, str):
        return str(o)
    return _jsonable(_json_default(o), depth + 1, path)


def write_json(path: str, result: dict, flag: str | None = "--json") -> None:
    """Atomic write (ipc.outputs.write_atomic: tmp + fsync + rename) so a crash never leaves half a
    document; a failed write (disk full) keeps the document in the rescue directory and raises an
    ``OutputError`` (a UsageError: one line, exit 2) naming both paths. The content cannot make it
    fail: everything is made plain JSON first (``_jsonable``: a NaN is null, a key is a str), and
    the text is strict JSON (``allow_nan=False``)."""
    from ipc.outputs import write_atomic

    text = json.dumps(_jsonable(result), indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n"
    what = f"the results document of run {result.get('run_id', '?')} (verdict {result.get('verdict', '?')})"
    write_atomic(path, text, what=what, flag=flag)


def fmt_ns(x: float | None) -> str:
    """A duration in ns, human-sized (–  for none)."""
    if x is None:
        return "–"
    if x >= 1e9:
        return f"{x / 1e9:.2f}s"
    if x >= 1e6:
        return f"{x / 1e6:.2f}ms"
    if x >= 1e3:
        return f"{x / 1e3:.1f}µs"
    return f"{x:.0f}ns"





OVERSUBSCRIBED = 4  # vCPU processes per CPU above which the summary warns


def host_note(vcpus: int, cpus: int) -> str | None:
    """A warning line when the host is oversubscribed by more than ``OVERSUBSCRIBED``x."""
    if vcpus <= OVERSUBSCRIBED * cpus:
        return None
    return (f"host oversubscribed: {vcpus} vCPU processes on {cpus} CPU(s) ({vcpus / cpus:.3g} per CPU, "
            f"> {OVERSUBSCRIBED}x): lock holders and RCU readers are preempted for whole time slices, so "
            f"lock waits are inflated and an RCU stall marked 'preempted' is the host's doing as much as "
            f"the code's (it still fails the run, as in rcutorture)")


def render(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ipc.messages import printable

    def shown(s) -> str:  # text from a vCPU (or a results file): no escape sequence, no markup
        return escape(printable(str(s)))

    con = console or Console(file=sys.stdout, width=None if sys.stdout.isatty() else 150)
    cfg = result["config"]
    virtual = cfg.get("clock") == "virtual"
    rated = result.get("rate_meaningful", True)  # False: a scripted run (R.collect), no rates
    dur = (f"scripted, {len(result.get('steps', []))} step(s) in {result['elapsed_s'] * 1e3:.3g} ms wall"
           if not rated else
           f"virtual {result['elapsed_s'] * 1e3:.3g} ms ({result.get('wall_s', 0):.1f} s wall)" if virtual
           else f"{result['elapsed_s']:.2f}s")
    con.print(f"[bold]pagetrack-sim run[/]: design={cfg['design']} registration={cfg['registration']} "
              f"vcpus={cfg['vcpus']} l2s={cfg['l2s']} switch_rate={cfg['switch_rate']} seed={result['seed']} "
              f"duration={dur}")
    con.print(fidelity_line(cfg))
    vt = " (virtual ns: --clock virtual)" if virtual else ""
    if virtual and "vtime" in result:
        v = result["vtime"]
        con.print(f"virtual time: rates per virtual second, latencies and lock times in virtual ns (ipc/vtime.py "
                  f"prices); {v['handoffs']:,} hand-offs, {v['line_transfers']:,} cache-line transfers")
    t = Table(title="operations" + vt, show_edge=False)
    for col in ("op", "count", "per s", "p50", "p99", "p99.9", "max"):
        t.add_column(col, justify="right" if col != "op" else "left")
    for name, o in result["ops"].items():
        per_s = f"{o['per_s']:,.0f}" if rated else "–"
        if "p50_ns" in o:
            t.add_row(name, f"{o['count']:,}", per_s, fmt_ns(o["p50_ns"]), fmt_ns(o["p99_ns"]),
                      fmt_ns(o["p999_ns"]), fmt_ns(o["max_ns"]))
        else:
            t.add_row(name, f"{o['count']:,}", per_s, "", "", "", "")
    con.print(t)
    if not rated:
        con.print("per s: – (a scripted run: its elapsed time is the commands' round trips, not a "
                  "duration to rate over); counts are exact", highlight=False)
    if any(o["count"] and "p50_ns" in o and o["p50_ns"] is None for o in result["ops"].values()):
        con.print("latency –: counted, none timed (a sampled op times about 1 in "
                  f"{cfg.get('latency_sample', 1)}, a scripted VMRUN none, --no-stats none)", highlight=False)
    if result["locks"]:
        # two narrow tables (fit an 80-column terminal): contention and wait, then hold times
        wt = Table(title="lock_stat: acquisitions and waits" + vt, show_edge=False)
        ht = Table(title="lock_stat: hold times" + vt, show_edge=False)
        for col in ("class", "acq", "contended", "wait min", "wait avg", "wait max", "wait total"):
            wt.add_column(col, justify="right" if col != "class" else "left")
        for col in ("class", "hold min", "hold avg", "hold max", "hold total"):
            ht.add_column(col, justify="right" if col != "class" else "left")
        for name, s in result["locks"].items():
            wt.add_row(name, f"{s['acquisitions']:,}", f"{s['contentions']:,}",
                       *(fmt_ns(s[f"wait_ns_{k}"]) for k in ("min", "avg", "max", "total")))
            ht.add_row(name, *(fmt_ns(s[f"hold_ns_{k}"]) for k in ("min", "avg", "max", "total")))
        con.print(wt)
        con.print(ht)
    gp = ", ".join(f"{k}={v}" for k, v in result["gp"].items())
    con.print(f"grace periods: {gp}")
    note = None if virtual else host_note(cfg["vcpus"], result.get("host", {}).get("cpus", procstat.cpus()))
    if note:
        con.print(f"[yellow]{note}[/]", highlight=False)
    for why in result.get("interference", []):
        con.print(f"[yellow]host interference:[/] {why} — the rates above were disturbed by the host; do not "
                  "average them with undisturbed runs (--clock virtual takes the host out)", highlight=False)
    if result["warnings"]:
        con.print(f"[yellow]WARNs ({result['warn_count']}):[/]")
        seen: dict[str, int] = {}
        for w in result["warnings"]:
            seen[w["kind"]] = seen.get(w["kind"], 0) + 1
            if seen[w["kind"]] <= 3:
                con.print(f"  {printable(str(w['message']))}", markup=False, highlight=False)
        for k, n in seen.items():
            if n > 3:
                con.print(f"  ... {n - 3} more {shown(k)}", highlight=False)
    for o in result["oracle"][:5]:
        con.print(f"[red]oracle:[/] {shown(o)}", highlight=False)
    if result["verdict"] == "SUCCESS":
        con.print("[bold green]SUCCESS[/]: oracle clean, no WARN, no poisoned read")
    else:
        con.print("[bold red]FAILURE[/]: " + "; ".join(shown(r) for r in result["reasons"]), highlight=False)


INTERFERENCE_WAIT_NS = 50_000_000  # one lock wait this long: ~10 scheduler slices, the host's doing


def interference(result: dict) -> list[str]:
    """What the run's own numbers say about the host disturbing it (real clock only; a virtual-time
    run cannot be disturbed): a single lock wait of ``INTERFERENCE_WAIT_NS`` or more — the model's
    critical sections last microseconds, so such a wait means the holder (or the queue ahead) was off
    its CPU for many time slices. Empty: nothing seen. The run's verdict is unchanged; its rates are
    not to be averaged with other runs' as if undisturbed."""
    if result.get("config", {}).get("clock") == "virtual":
        return []
    out = []
    for name, s in result.get("locks", {}).items():
        w = int(s.get("wait_ns_max", 0))
        if w >= INTERFERENCE_WAIT_NS:
            out.append(f"{name}: one wait of {fmt_ns(w)} (longest hold {fmt_ns(int(s.get('hold_ns_max', 0)))}): "
                       "the lock's holder or the waiters ahead were off their CPUs")
    return out
