"""``launch.py compare --map --out DIR``: where does the VM-wide mutex hurt?

A grid over **table writes per nested VMRUN** (log scale, default 0.002, 0.02, 0.2, 2) × **switch
rate** (default 0, 0.01, 0.1, 0.5) at each vCPU count (default 2, 4), every design, at the workload
point's other values (vm/workloads.py), each point undilated and dilated (``--dilate auto|N|off``,
lab/dilation.py), ``--repeats`` seeds per cell (default 3). The points run as a ``launch.py sweep``
does (lab/sweep.py): each a full run in its own process on Dask distributed — a loopback LocalCluster by default, ``--scheduler`` for a cluster —
and resumable (a finished point in ``DIR/points`` is not run again).

Outputs in DIR, besides the sweep's own (``points/``, ``sweep.json``, ``status.json``, ``report.md``):

- ``map.json`` — axes, per cell the ratio mutex-hash ÷ rcu-list nested-VMRUN throughput, the slowest
  design ÷ the best and every design's rate, each ``{median, lo, hi, n}`` over the seeds (lo / hi: min /
  max); the same ratios as a list ``cells``; the verdict per map (structured), the dilation, wall time;
- ``map.png`` — one heat map of that ratio per (dilation, vCPU count), the 0.8 contour drawn, the
  workload's own point starred;
- ``map.md`` — a table per panel (each cell median [min–max]) and the verdict in words: where the mutex
  costs >= 20 % (ratio <= 0.8) on every seed, where "any solution is fine" holds (every design within
  80 % of the best) on every seed, which cells are not resolved (the seeds straddle the threshold), the
  crossover table-write rate per switch rate with its interval, and which numbers the verdict rests on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from ipc.errors import UsageError
from lab import sweep
from lab.compare import FINE, SLOWER, designs_arg
from lab.outputs import write_atomic
from lab.plots import save_png
from lab.uncertainty import REPEATS, spread, verdict

TABLE_WRITES = [0.002, 0.02, 0.2, 2.0]
SWITCH_RATES = [0.0, 0.01, 0.1, 0.5]
VCPUS = [2, 4]
DURATION = 1.0  # real clock
DURATION_VIRTUAL = 0.05  # virtual seconds: ~2,500 nested VMRUNs per vCPU per run
HURTS = SLOWER  # mutex-hash / rcu-list <= this: the mutex costs >= 20 %


def grid_doc(designs, vcpus, rates, writes, duration, seed, base: dict, dilations, repeats: int = 1) -> dict:
    """The sweep grid (lab/sweep.py format) of the map: the designs of one cell (and seed) run one after
    the other, so that they meet about the same load on a shared machine."""
    fixed = {k: v for k, v in base.items() if k not in ("switch_rate", "table_writes_per_vmrun", "tracked_fraction")}
    fixed.update({"duration": float(duration), "registration": "refcount", "fuzz": "off"})
    fixed["writes_per_exit"] = max(int(fixed.get("writes_per_exit", 8)), math.ceil(max(writes)))
    grid = {"dilate": [float(x) for x in dilations], "vcpus": list(vcpus), "switch_rate": [float(r) for r in rates],
            "table_writes_per_vmrun": [float(w) for w in writes]}
    if repeats > 1:
        grid["seed"] = [seed + k for k in range(repeats)]
    else:
        fixed["seed"] = seed
    grid["design"] = list(designs)
    return {"grid": grid, "fixed": fixed}


def _rate(r: dict) -> float:
    return float(r["ops"]["nested_vmrun"]["per_s"])


def label_of(x: float, clock: str = "real") -> str:
    return "virtual" if clock == "virtual" else "undilated" if x == 1.0 else "dilated"


def build(results: list[dict], designs, vcpus, rates, writes, dilations, clock: str = "real") -> dict:
    """``{label: {"factor": x, str(vcpus): {"ratio": [[sw][tw]], "slowest": [[...]], "rates": {design:
    [[...]]}, "fine": [[bool]], "failed": [...], "cells": [...]}}}``. Every grid entry is an object
    ``{median, lo, hi, n}`` over the cell's seeds (lo / hi: min / max) or None (no run): ``ratio`` is
    mutex-hash ÷ rcu-list paired per seed, ``slowest`` the slowest design ÷ the best per seed, ``rates``
    every design's nested VMRUN/s; ``fine`` is True where every design is within ``FINE`` of the best on
    every seed. label: "undilated" or "dilated" (clock real), "virtual"."""
    idx: dict = {}
    for r in results:
        c = r["config"]
        key = (float(c.get("dilate", 1.0)), int(c["vcpus"]), float(c["switch_rate"]),
               float(c.get("table_writes_per_vmrun") or 0.0), c["design"])
        idx.setdefault(key, {})[c.get("seed")] = r
    maps: dict = {}
    for x in dilations:
        label = label_of(x, clock)
        per_v = maps.setdefault(label, {"factor": float(x)})
        for v in vcpus:
            rates_d: dict = {d: [[None] * len(writes) for _ in rates] for d in designs}
            ratio: list = [[None] * len(writes) for _ in rates]
            slowest: list = [[None] * len(writes) for _ in rates]
            fine: list = [[None] * len(writes) for _ in rates]
            failed, cells = [], []
            for i, sw in enumerate(rates):
                for j, tw in enumerate(writes):
                    runs = {}
                    for d in designs:
                        by_seed = idx.get((float(x), v, float(sw), float(tw), d), {})
                        runs[d] = {s: _rate(r) for s, r in by_seed.items()}
                        failed += [r.get("point_id") for r in by_seed.values() if r.get("verdict") != "SUCCESS"]
                        if runs[d]:
                            rates_d[d][i][j] = spread(list(runs[d].values()))
                    pairs = [m / runs["rcu-list"][s] for s, m in runs.get("mutex-hash", {}).items()
                             if runs.get("rcu-list", {}).get(s)]
                    if pairs:
                        ratio[i][j] = spread(pairs)
                        cells.append({"vcpus": v, "dilate": float(x), "clock": clock, "switch_rate": float(sw),
                                      "table_writes": float(tw), "ratio": ratio[i][j]})
                    seeds = set.intersection(*(set(runs[d]) for d in designs)) if designs else set()
                    shares = [min(runs[d][s] for d in designs) / max(runs[d][s] for d in designs) for s in seeds
                              if max(runs[d][s] for d in designs) > 0]
                    if shares:
                        slowest[i][j] = spread(shares)
                        fine[i][j] = min(shares) >= FINE
            per_v[str(v)] = {"ratio": ratio, "slowest": slowest, "rates": rates_d, "fine": fine, "failed": failed,
                             "cells": cells}
    return maps


def crossover(writes: list[float], row: list[float | None]) -> dict:
    """Along one switch rate: the table-write rate where the ratio first falls to <= HURTS,
    interpolated on log(table writes). {"at": x or None, "kind": "within" | "below" | "above" | "none"}."""
    pts = [(w, r) for w, r in zip(writes, row, strict=True) if r is not None]
    if not pts:
        return {"at": None, "kind": "none"}
    if pts[0][1] <= HURTS:
        return {"at": pts[0][0], "kind": "below"}  # already at the smallest rate measured
    for (w0, r0), (w1, r1) in zip(pts, pts[1:], strict=False):
        if r1 <= HURTS < r0:
            f = (r0 - HURTS) / (r0 - r1)
            lw = math.log(max(w0, 1e-12)) + f * (math.log(max(w1, 1e-12)) - math.log(max(w0, 1e-12)))
            return {"at": math.exp(lw), "kind": "within"}
    return {"at": None, "kind": "above"}


def crossover_interval(writes: list[float], row: list[dict | None]) -> dict:
    """The crossover of the medians, with the crossovers of the seeds' lows (the earliest: the mutex
    at its worst) and highs (the latest) as its interval: ``{"at", "kind", "lo": {...}, "hi": {...}}``."""
    c = crossover(writes, [None if x is None else x["median"] for x in row])
    c["lo"] = crossover(writes, [None if x is None else x["lo"] for x in row])
    c["hi"] = crossover(writes, [None if x is None else x["hi"] for x in row])
    return c


def judge(m: dict, rates, writes) -> dict:
    """The verdict of one map (one dilation, one vCPU count), structured: ``hurts`` (cells where the
    mutex costs >= 20 % on every seed), ``hurts_unresolved`` (the seeds straddle 0.8), ``fine`` /
    ``fine_unresolved`` likewise for "any design within 80 % of the best", the crossover with its
    interval per switch rate."""
    cells = [(i, j) for i in range(len(rates)) for j in range(len(writes))]
    r, s = m["ratio"], m["slowest"]

    def where(grid, test):
        return [[writes[j], rates[i]] for i, j in cells if grid[i][j] is not None and test(grid[i][j])]

    return {"hurts": where(r, lambda c: verdict(c, holds_if_below=HURTS + 1e-12) == "holds"),
            "hurts_unresolved": where(r, lambda c: verdict(c, holds_if_below=HURTS + 1e-12) == "not resolved"),
            "fine": where(s, lambda c: verdict(c, holds_if_at_least=FINE) == "holds"),
            "fine_unresolved": where(s, lambda c: verdict(c, holds_if_at_least=FINE) == "not resolved"),
            "crossover": {f"{sw:g}": crossover_interval(writes, r[i]) for i, sw in enumerate(rates)},
            "cells": sum(1 for row in r for c in row if c is not None)}


def _fmt_end(c: dict, writes) -> str:
    return {"within": f"{c['at']:.2g}" if c["at"] is not None else "", "below": f"≤{writes[0]:g}",
            "above": f">{writes[-1]:g}", "none": "?"}[c["kind"]]


def _fmt_cross(c: dict, writes) -> str:
    if c["kind"] == "within":
        text = f"≈{c['at']:.2g}"
    elif c["kind"] == "below":
        text = f"≤{writes[0]:g} (already at the smallest rate)"
    elif c["kind"] == "above":
        text = f"none up to {writes[-1]:g}"
    else:
        return "not measured"
    if "lo" in c and (c["lo"] != {k: c[k] for k in ("at", "kind")} or c["hi"] != {k: c[k] for k in ("at", "kind")}):
        text += f" [{_fmt_end(c['lo'], writes)} – {_fmt_end(c['hi'], writes)} over the seeds]"
    return text


def _region(cells: list[list[float]], rates) -> str:
    """Cells as "switch s: table writes a, b" phrases."""
    if not cells:
        return "nowhere on this grid"
    by = {}
    for tw, sw in cells:
        by.setdefault(sw, []).append(tw)
    return "; ".join(f"switch {sw:g}: table writes {', '.join(f'{w:g}' for w in sorted(ws))}"
                     for sw, ws in sorted(by.items()))


def _cell(c: dict | None) -> str:
    if c is None:
        return "–"
    return f"{c['median']:.2f}" + (f" [{c['lo']:.2f}–{c['hi']:.2f}]" if c["n"] > 1 else "")


def table_md(m: dict, rates, writes) -> list[str]:
    """One panel's ratios as a markdown table: a row per switch rate, a column per table-write rate,
    each cell median [min–max] over the seeds; a cell where the mutex costs >= 20 % on every seed in
    bold, one the seeds straddle in italics."""
    lines = ["| switch rate ╲ table writes per VMRUN | " + " | ".join(f"{w:g}" for w in writes) + " |",
             "|---:|" + "---:|" * len(writes)]
    for i, sw in enumerate(rates):
        row = []
        for j in range(len(writes)):
            c = m["ratio"][i][j]
            v = None if c is None else verdict(c, holds_if_below=HURTS + 1e-12)
            row.append(f"**{_cell(c)}**" if v == "holds" else f"*{_cell(c)}*" if v == "not resolved" else _cell(c))
        lines.append(f"| {sw:g} | " + " | ".join(row) + " |")
    return lines


def verdict_md(maps: dict, rates, writes, vcpus, point: dict, dil_doc: dict | None) -> tuple[str, dict]:
    """(markdown, structured verdict per label and vCPU count)."""
    out: dict = {}
    n_seeds = max((c["ratio"]["n"] for m in maps.values() for k, per in m.items() if k != "factor"
                   for c in per["cells"]), default=1)
    lines = ["# Where does the VM-wide mutex hurt? (compare --map)", "",
             f"Ratio = mutex-hash ÷ rcu-list nested VMRUN/s. The mutex **costs ≥ 20 %** where the ratio is "
             f"≤ {HURTS:g}; **\"any solution is fine\"** where every design reaches ≥ {FINE:.0%} of the best "
             "design's rate. Axes: table writes per nested VMRUN × switch rate (L1 switching L2 at a VMEXIT).",
             f"The workload's own point: {point['table_writes_per_vmrun']:g} table writes per VMRUN, switch rate "
             f"{point['switch_rate']:g} (vm/workloads.py says where these rates come from).", "",
             (f"Each cell: the median over {n_seeds} seeds (one run per design and seed; the ratio paired per seed) "
              "and [min–max] over those seeds. A finding must hold on every seed: a cell whose range straddles "
              "the threshold is **not resolved** (run more --repeats). In the tables, **bold**: the mutex costs "
              "≥ 20 % on every seed; *italics*: not resolved." if n_seeds > 1 else
              "Each cell is **one run per design** (--repeats 1): no spread, so no cell is a resolved finding; "
              "run --repeats 3 or more."), ""]
    labels = [x for x in ("virtual", "dilated", "undilated") if x in maps]
    if "load" in point and "virtual" not in maps:
        lines += [f"Machine: {point['load']['cpus']} CPUs, load average {point['load']['start']:.1f} when the map "
                  f"started and {point['load']['end']:.1f} when it ended (all work on the host, not only the map's).",
                  ""]
    if "virtual" in maps:
        lines += ["**The verdict rests on virtual-time numbers** (--clock virtual, docs/virtual-time.md): every vCPU "
                  "has its own CPU and clock and the code is priced at kernel C costs, so a cell's numbers depend "
                  "on its seed only, not on the host or its load; the spread below is the seeds'.", ""]
    elif "dilated" in maps:
        f = maps["dilated"]["factor"]
        how = (f"measured, range {dil_doc['low']:g}-{dil_doc['high']:g}; {dil_doc['method']}"
               if dil_doc and "low" in dil_doc else "given with --dilate")
        lines += [f"**The verdict rests on the dilated numbers** (guest time and delays ×{f:g}, {how}): they keep "
                  "the kernel's ratio of time in the code under study to guest time. The undilated map (the Python "
                  "model as it runs, every lock-wait share inflated) follows for reference.", ""]
    else:
        lines += ["**The verdict rests on undilated numbers** (no --dilate): the Python model as it runs, where the "
                  "code under study is slow relative to guest time, so the mutex looks worse than in a kernel.", ""]
    for label in labels:
        f = maps[label]["factor"]
        lines += [f"## {label}" + (f" (×{f:g})" if f != 1 else ""), ""]
        for v in vcpus:
            m = maps[label].get(str(v))
            if m is None:
                continue
            j = judge(m, rates, writes)
            out.setdefault(label, {})[str(v)] = j
            pt = _at_point(m, rates, writes, point)
            every = "every seed" if n_seeds > 1 else "one seed: indicative only"
            lines += [f"### {v} vCPUs", "", *table_md(m, rates, writes), "",
                      f"- mutex costs ≥ 20 % ({every}): {_region(j['hurts'], rates)}.",
                      f"- any solution is fine ({every}): {_region(j['fine'], rates)}."]
            if j["hurts_unresolved"] or j["fine_unresolved"]:
                lines.append(f"- not resolved (the seeds straddle the threshold): the mutex's cost at "
                             f"{_region(j['hurts_unresolved'], rates)}; \"any solution is fine\" at "
                             f"{_region(j['fine_unresolved'], rates)}.")
            lines.append("- crossover (table writes per VMRUN where the ratio falls to 0.8): " + "; ".join(
                f"switch {sw}: {_fmt_cross(c, writes)}" for sw, c in j["crossover"].items()) + ".")
            if pt is not None:
                lines.append(f"- at the workload's point: ratio {_cell(pt[0])}, "
                             + ("any solution is fine there." if pt[1] else "not every design is within 80 % there "
                                "on every seed."))
            if m["failed"]:
                lines.append(f"- **{len(m['failed'])} point(s) ended in FAILURE**: {', '.join(map(str, m['failed'][:4]))}.")
            lines.append("")
    if "virtual" not in maps:
        lines += ["On the real clock the ratio of two runs moves with the machine's load (other work on a shared "
                  "host steals the vCPUs' CPUs at random moments): read the ranges above, and prefer "
                  "`--clock virtual` (the map's default), which takes the host out of the numbers.", ""]
    return "\n".join(lines), out


def _at_point(m: dict, rates, writes, point: dict):
    try:
        i = [float(r) for r in rates].index(float(point["switch_rate"]))
        j = [float(w) for w in writes].index(float(point["table_writes_per_vmrun"]))
    except ValueError:
        return None
    r = m["ratio"][i][j]
    return None if r is None else (r, bool(m["fine"][i][j]))


def plot(maps: dict, rates, writes, vcpus, point: dict, path: Path, *, figures: list | None = None) -> Path:
    """map.png: one heat map of the ratio mutex-hash ÷ rcu-list per (dilation, vCPU count), the number in
    each cell, the 0.8 contour where the data crosses it (NaN cells masked, not invented), the workload's
    point as a small star in its cell's corner (or, off the grid, said in the title); a grid entry is a number
    or ``{median, lo, hi, n}`` over the seeds (the median coloured, lo–hi under it). The colour scale is
    diverging at 1.0 (RdYlBu, colour-blind safe) with limits covering the data, so that 1.44 and 2.10 get
    different colours. ``figures``, when given, receives the Figure."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    def num(c, key="median"):  # a grid entry: a number, or {median, lo, hi, n} over the seeds, or None
        if c is None:
            return np.nan
        return float(c.get(key, np.nan) if isinstance(c, dict) else c)

    labels = [x for x in ("virtual", "undilated", "dilated") if x in maps]
    cells = {(label, v): maps[label][str(v)]["ratio"] for label in labels for v in vcpus
             if maps[label].get(str(v)) is not None}
    grids = {k: np.array([[num(c) for c in row] for row in g], dtype=float).reshape(len(rates), len(writes))
             for k, g in cells.items()}
    finite = np.concatenate([z[np.isfinite(z)] for z in grids.values()] + [np.array([])])
    lo = min(0.4, float(finite.min())) if finite.size else 0.4
    hi = max(1.2, float(finite.max())) if finite.size else 1.2
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.99), vmax=max(hi, 1.01))
    cmap = colormaps["RdYlBu"].with_extremes(bad="0.85")  # a missing cell: grey, not a colour of the scale
    try:
        pj = [float(w) for w in writes].index(float(point["table_writes_per_vmrun"]))
        pi = [float(r) for r in rates].index(float(point["switch_rate"]))
    except (ValueError, KeyError, TypeError):
        pj = pi = None
    nrows, ncols = max(1, len(labels)), max(1, len(vcpus))
    fig = Figure(figsize=(min(16.0, 1.6 + 0.75 * len(writes) * ncols + 1.2 * ncols),
                          min(16.0, 1.4 + (0.45 * len(rates) + 1.6) * nrows)), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    ranges = False
    for a, label in enumerate(labels):
        for b, v in enumerate(vcpus):
            ax = axes[a][b]
            f = maps[label]["factor"]
            ax.set_title(f"{v} vCPUs, {label}" + (f" ×{f:g}" if f != 1 else ""), fontsize=10)
            z = grids.get((label, v))
            if z is None:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            zm = np.ma.masked_invalid(z)
            im = ax.imshow(zm, origin="lower", cmap=cmap, norm=norm, aspect="auto")
            for i in range(len(rates)):
                for j in range(len(writes)):
                    if np.isfinite(z[i, j]):
                        r, g, b_, _ = im.cmap(norm(z[i, j]))
                        ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b_ < 0.5 else "black"
                        c = cells[(label, v)][i][j]
                        lo_, hi_ = num(c, "lo"), num(c, "hi")
                        ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=9, color=ink, zorder=4,
                                bbox={"boxstyle": "round,pad=0.15", "fc": (r, g, b_), "ec": "none"})  # over the contour
                        if np.isfinite(lo_) and np.isfinite(hi_) and lo_ != hi_:  # the seeds' min..max
                            ranges = True
                            ax.text(j, i - 0.28, f"{lo_:.2f}–{hi_:.2f}", ha="center", va="center", fontsize=6.5,
                                    color=ink)
                    else:
                        ax.text(j, i, "no data", ha="center", va="center", fontsize=8, color="0.3")
            fin = z[np.isfinite(z)]
            if fin.size and fin.min() <= HURTS <= fin.max() and fin.min() < fin.max():
                if len(rates) > 1 and len(writes) > 1:
                    ax.contour(np.arange(len(writes)), np.arange(len(rates)), zm, levels=[HURTS],
                               colors="black", linewidths=2.0)
                else:  # one row or column: no contour to interpolate; mark the edge between cells instead
                    for i in range(len(rates)):
                        for j in range(len(writes)):
                            for di, dj in ((0, 1), (1, 0)):
                                if i + di < len(rates) and j + dj < len(writes) and np.isfinite(z[i + di, j + dj]) \
                                        and np.isfinite(z[i, j]) and (z[i, j] <= HURTS) != (z[i + di, j + dj] <= HURTS):
                                    if dj:
                                        ax.plot([j + 0.5] * 2, [i - 0.5, i + 0.5], color="black", linewidth=2.0)
                                    else:
                                        ax.plot([j - 0.5, j + 0.5], [i + 0.5] * 2, color="black", linewidth=2.0)
            if pi is not None:
                ax.plot([pj + 0.34], [pi + 0.3], marker="*", markersize=10, color="black",
                        markeredgecolor="white", markeredgewidth=0.8, linestyle="none", gid="workload-point")
            ax.set_xticks(range(len(writes)), [f"{w:g}" for w in writes])
            ax.set_yticks(range(len(rates)), [f"{r:g}" for r in rates])
            ax.set_xlabel("table writes per nested VMRUN (log)")
            ax.set_ylabel("switch rate")
    star = ("★ (cell corner): the workload's point" if pi is not None else
            f"the workload's point (tw={float(point['table_writes_per_vmrun']):g}, "
            f"sw={float(point['switch_rate']):g}) is off this grid")
    fig.suptitle("Where does the VM-wide mutex cost ≥ 20 %? mutex-hash ÷ rcu-list nested VMRUN/s\n"
                 f"black line: ratio = {HURTS:g} (ratio ≤ {HURTS:g}: the mutex costs ≥ 20 %)\n{star}"
                 + ("; small numbers: min–max over the seeds" if ranges else ""), fontsize=10)
    if im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.85, label="mutex-hash ÷ rcu-list (1 = equal)")
        up = 0.1 if norm.vmax <= 1.5 else 0.5 if norm.vmax <= 3.5 else math.ceil((norm.vmax - 1) / 4)
        ticks = [*np.arange(math.ceil(norm.vmin / 0.2 - 1e-9) * 0.2, 1.0 + 1e-9, 0.2),
                 *np.arange(1.0 + up, norm.vmax + 1e-9, up)]  # both halves of the diverging scale ticked
        cb.set_ticks([round(float(t), 2) for t in ticks])
        cb.ax.axhline(HURTS, color="black", linewidth=2.0)
    if figures is not None:
        figures.append(fig)
    save_png(fig, path)
    return path


def write_outputs(out: Path, results: list[dict], *, designs, vcpus, rates, writes, dilations, point: dict,
                  dil_doc: dict | None, extra: dict | None = None, clock: str = "real") -> tuple[dict, str]:
    """map.json, map.png, map.md from sweep results; returns (map document, verdict markdown)."""
    maps = build(results, designs, vcpus, rates, writes, dilations, clock)
    text, verdicts = verdict_md(maps, rates, writes, vcpus, point, dil_doc)
    doc = {"axes": {"table_writes_per_vmrun": list(writes), "switch_rate": list(rates)}, "vcpus": list(vcpus),
           "designs": list(designs), "point": point, "hurts_below": HURTS, "fine_at": FINE,
           "dilation": dil_doc or {"factor": 1.0}, "clock": clock, "maps": maps,
           "cells": [c for m in maps.values() for k, per in m.items() if k != "factor" for c in per["cells"]],
           "verdict": verdicts, "verdict_md": text,
           **(extra or {})}
    sweep._write_json(out / "map.json", doc)
    plot(maps, rates, writes, vcpus, point, out / "map.png")
    write_atomic(out / "map.md", text, what="the map's verdict (map.md)")
    return doc, text


def rerender(doc: dict, source: str, out: Path | None) -> int:
    """``launch.py report map.json [--out DIR]``: the verdict again from the map's saved cells (printed),
    and with ``out`` map.md and map.png rewritten there. A map.json of another shape -> UsageError."""
    try:
        rates, writes = list(doc["axes"]["switch_rate"]), list(doc["axes"]["table_writes_per_vmrun"])
        vcpus, maps, point = list(doc["vcpus"]), doc["maps"], doc["point"]
        if any(not isinstance(c, dict) for m in maps.values() for k, per in m.items() if k != "factor"
               for row in per["ratio"] for c in row if c is not None):
            raise TypeError("ratio cells are not {median, lo, hi, n} objects (a map.json of an older version)")
        text, _ = verdict_md(maps, rates, writes, vcpus, point, doc.get("dilation"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{source}: not a map.json this version can read ({type(e).__name__}: {e})") from None
    print(text)
    if out is not None:
        write_atomic(out / "map.md", text, what="the map's verdict (map.md)")
        plot(maps, rates, writes, vcpus, point, out / "map.png")
        print(f"wrote {out / 'map.md'}, {out / 'map.png'}", file=sys.stderr)
    return 0


def main(args) -> int:
    from rich.console import Console

    from lab import dilation
    from lab.outputs import check_out_dir
    from lab.scheduler import CONNECT_TIMEOUT_S, resolve
    from vm.config import DILATE_VIRTUAL, clock_values
    from vm.workloads import workload

    check_out_dir(args.out, "--out", create=False)  # a directory (or creatable), writable, with room; nothing made yet
    designs = designs_arg(args.designs)
    base = workload(args.workload)
    cv = clock_values(args.clock or "virtual", args.prices)  # the map measures on virtual time by default
    base.update(cv)
    clock = cv["clock"]
    if clock == "virtual" and args.dilate not in (None, "off"):
        raise UsageError(DILATE_VIRTUAL)
    dilate = args.dilate if args.dilate is not None else ("off" if clock == "virtual" else "auto")

    if not {"mutex-hash", "rcu-list"} <= set(designs):
        raise UsageError("--map: the map is mutex-hash ÷ rcu-list; --designs must include both")
    vcpus = args.vcpus or VCPUS
    rates = args.switch_rates or SWITCH_RATES
    writes = sorted(args.table_writes or TABLE_WRITES)
    duration = args.duration or (DURATION_VIRTUAL if clock == "virtual" else DURATION)
    scheduler, security = resolve(args)  # tcp:// only with --insecure; the --security files checked
    repeats = args.repeats if args.repeats is not None else REPEATS
    probe = grid_doc(designs, vcpus, rates, writes, duration, args.seed, base, [1.0], repeats)
    sweep.parse_grid(probe, "compare --map")  # every point valid before anything runs or is measured
    out = sweep._out_dir(args.out)
    lock = sweep._Lock(out)
    try:
        t0 = time.monotonic()
        load0 = os.getloadavg()[0]
        factor, dil_doc = _dilation(out, dilate, base, designs, dilation)
        dilations = [1.0, factor] if factor != 1.0 else [1.0]
        points = sweep.parse_grid(grid_doc(designs, vcpus, rates, writes, duration, args.seed, base, dilations,
                                           repeats), "compare --map")
        console = Console(stderr=True, soft_wrap=True)
        rc = sweep._sweep(points, out, scheduler, int(args.workers or 1), console, "compare --map",
                          float(args.connect_timeout or CONNECT_TIMEOUT_S), security)
        results = json.loads((out / "sweep.json").read_text())
        point = {"table_writes_per_vmrun": base.get("table_writes_per_vmrun",
                                                    base.get("writes_per_exit", 8) * base.get("tracked_fraction", 0.25)),
                 "switch_rate": base.get("switch_rate", 0.1),
                 "load": {"cpus": os.cpu_count(), "start": load0, "end": os.getloadavg()[0]}}
        _, text = write_outputs(out, results, designs=designs, vcpus=vcpus, rates=rates, writes=writes,
                                dilations=dilations, point=point, dil_doc=dil_doc,
                                extra={"wall_s": round(time.monotonic() - t0, 1), "points": len(points),
                                       "workload": args.workload, "duration": duration, "repeats": repeats},
                                clock=clock)
    finally:
        lock.release()
    print(text)
    print(f"wrote {out / 'map.json'}, {out / 'map.png'}, {out / 'map.md'} "
          f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return rc


def _dilation(out: Path, dilate, base: dict, designs, dilation) -> tuple[float, dict | None]:
    """The factor of this map; ``auto`` is measured once per DIR (kept in dilation.json), so that a
    resumed map runs the same dilated points."""
    saved = out / "dilation.json"
    if dilate == "auto" and saved.is_file():
        try:
            doc = json.loads(saved.read_text())
            print(f"dilate auto: factor {doc['factor']:g}, as measured for this map before ({saved})", file=sys.stderr)
            return float(doc["factor"]), doc
        except (OSError, ValueError, KeyError, TypeError):
            pass
    factor, doc = dilation.resolve(dilate, base, designs)
    if dilate == "auto" and doc is not None:
        sweep._write_json(saved, doc)
    return factor, doc
