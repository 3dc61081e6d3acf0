"""How sure a measured number is: each ratio or rate over its seeds as ``{median, lo, hi, n}`` (lo /
hi: min / max over the seeds — with three seeds a bootstrap interval would say no more), a verdict
that is **holds**, **does not hold** or **not resolved** (the seeds straddle the threshold), and the
runs whose own numbers show the host disturbing them (``interference``), flagged rather than averaged.
Used by ``compare``, ``compare --map`` and ``sweep``."""

from __future__ import annotations

from lab.labels import run_labels
from vm.results import interference as run_interference

REPEATS = 3  # seeds per point by default (compare, the map): a verdict needs a spread; 3x the runs of one seed


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def spread(xs: list[float]) -> dict:
    """``{median, lo, hi, n}`` of per-seed values (lo / hi: min / max over the seeds)."""
    return {"median": round(median(xs), 4), "lo": round(min(xs), 4), "hi": round(max(xs), 4), "n": len(xs)}


def verdict(s: dict, holds_if_below: float | None = None, holds_if_at_least: float | None = None) -> str:
    """"holds", "does not hold" or "not resolved" (the seeds' range straddles the threshold)."""
    if holds_if_below is not None:
        return "holds" if s["hi"] < holds_if_below else "does not hold" if s["lo"] >= holds_if_below else "not resolved"
    return "holds" if s["lo"] >= holds_if_at_least else "does not hold" if s["hi"] < holds_if_at_least else "not resolved"


REPEAT_SPREAD = 2.0  # one point's VMRUN rate differing more than this between seeds: the host, not the seed


def interference(results: list[dict]) -> list[dict]:
    """Runs whose own numbers show the host's hand (real clock only; vm.results.interference): a
    single lock wait that long, or one point's nested VMRUN rate differing by more than ``REPEAT_SPREAD``×
    between its seeds. ``[{"run" or "point", "kind", "detail"}]``: flagged, never silently averaged."""
    out: list[dict] = []
    labels = run_labels(results)
    groups: dict[str, list[float]] = {}
    for r, label in zip(results, run_labels(results, skip=("seed",), number=False), strict=True):
        if r["config"].get("clock") != "virtual":
            groups.setdefault(label, []).append(float(r["ops"]["nested_vmrun"]["per_s"]))
    for r, label in zip(results, labels, strict=True):
        out += [{"run": label, "kind": "lock_wait", "detail": why}
                for why in r.get("interference", run_interference(r))]
    for label, xs in groups.items():
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > REPEAT_SPREAD:
            out.append({"point": label, "kind": "repeat_spread",
                        "detail": f"nested VMRUN/s {min(xs):,.0f}–{max(xs):,.0f} between seeds "
                                  f"({max(xs) / min(xs):.1f}×, more than {REPEAT_SPREAD:g}×)"})
    return out


def interference_md(flags: list[dict]) -> str:
    """The paragraph naming every flagged run / point ("" when none)."""
    if not flags:
        return ""
    lines = [f"## Host interference: {len(flags)} flag(s)", "",
             "These runs' own numbers show the host disturbing them (a lock wait of many scheduler slices, or "
             "one point's rate differing by more than 2× between seeds). Their numbers are kept and counted "
             "above, but a verdict resting on them is weaker; rerun on a quiet host or with --clock virtual.", ""]
    lines += [f"- {f.get('run') or f.get('point')}: {f['detail']}" for f in flags]
    return "\n".join(lines + [""])


def seed_table(results: list[dict]) -> str:
    """With several seeds per point: a markdown table of each point's nested VMRUN/s over its seeds,
    median [min–max] (n); "" when every point ran once."""
    groups: dict[str, list[float]] = {}
    for r, label in zip(results, run_labels(results, skip=("seed",), number=False), strict=True):
        groups.setdefault(label, []).append(float(r["ops"]["nested_vmrun"]["per_s"]))
    if all(len(xs) == 1 for xs in groups.values()):
        return ""
    lines = ["## Each point over its seeds", "", "nested VMRUN/s: the median over the seeds, [min–max], n seeds.", "",
             "| point | nested VMRUN/s | [min–max] | n | max ÷ min |", "|:---|---:|---:|---:|---:|"]
    for label, xs in groups.items():
        sp = spread(xs)
        lines.append(f"| {label} | {sp['median']:,.0f} | [{sp['lo']:,.0f}–{sp['hi']:,.0f}] | {sp['n']} | "
                     + (f"{sp['hi'] / sp['lo']:.2f} |" if sp["lo"] > 0 else "– |"))
    return "\n".join(lines + [""])
