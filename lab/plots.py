"""The PNG plots of runs (``report``, ``compare`` and ``sweep`` write them through
:func:`lab.report.write_report`), each answering one question:

* :func:`plot_vmrun_rate` — does nested VMRUN throughput scale with vCPUs? One figure per switch rate,
  colour = design (lab/palette.py, the same everywhere), one other varying setting as line style, any
  further as facets; the median over seeds with [min–max] bars. No figure when every series has one x.
* :func:`plot_lock_wait` — where is lock wait time spent? One panel per design, a bar per lock class.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from lab.labels import differing_keys, run_name, unique_labels

_SERIES_EXCLUDE = {"vcpus", "switch_rate", "seed", "design", "progress", "duration"}


def _varying(results: list[dict]) -> list[str]:
    """Config keys (other than the plot axes, seed, duration) whose value differs between runs, one of
    any pair that vary together (lab/labels.py), sorted by name."""
    return sorted(differing_keys(results, skip=tuple(_SERIES_EXCLUDE)))


def series_label(r: dict, varying: list[str]) -> str:
    cfg = r["config"]
    return ", ".join([str(cfg["design"])] + [f"{k}={cfg.get(k)}" for k in varying])


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    """The figure as PNG to ``path``, atomically (a full disk leaves no half-written image)."""
    save_png(fig, path)
    return path


def save_png(fig, path: Path) -> None:
    import io

    from lab.outputs import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue(), what=f"the plot {path.name}")


def is_virtual(results: list[dict]) -> bool:
    """Every run on the virtual clock: rates are per virtual second, times virtual (ipc/vtime.py)."""
    return bool(results) and all(r.get("config", {}).get("clock") == "virtual" for r in results)


LEGEND_MAX = 8  # vmrun plot: legend entries (designs + line styles); more combinations -> facets


def _design_order(designs) -> list[str]:
    """Known designs in palette order, then the others alphabetically: the same order in every plot."""
    from lab.palette import DESIGN_COLOURS

    known = [d for d in DESIGN_COLOURS if d in designs]
    return known + sorted(set(designs) - set(known))


def _value_sort(v: str):
    x = json.loads(v)
    return (0, float(x), "") if isinstance(x, int | float) and not isinstance(x, bool) else (1, 0.0, v)


_SHORT_KEYS = {"table_writes_per_vmrun": "table writes/VMRUN", "registration": "reg"}


def _fmt_value(k: str, v: str) -> str:
    """A config key's value (JSON text) as a legend entry / panel title: ``reg=bool``,
    ``undilated`` / ``dilated ×3``, ``clock=virtual``."""
    x = json.loads(v)
    if k == "dilate" and isinstance(x, int | float):
        return "undilated" if float(x) == 1.0 else f"dilated ×{float(x):g}"
    k = _SHORT_KEYS.get(k, k)
    return f"{k}={x:g}" if isinstance(x, float) else f"{k}={x}"


def plot_vmrun_rate(results: list[dict], path: str | Path, *, figures: list | None = None) -> list[Path]:
    """Nested VMRUN/s vs vCPUs, one figure per switch rate, written as ``<stem>_sw<rate><suffix>``
    next to ``path`` (e.g. ``vmrun_rate_sw0.1.png``). Colour = design (:mod:`lab.palette`); each
    point is the median over repeats (seeds), error bars min..max. Another config key that varies
    (registration, dilate, ...) is a line style + marker when the legend stays within ``LEGEND_MAX``
    entries, else (and every further key) a facet: a grid of small panels sharing the y axis, each
    titled ``key=value``. A switch rate whose every series has a single vCPU count is not drawn (no
    line to show; :func:`vmrun_plot_note` says so). Returns the written paths; ``figures``, when
    given, receives the :class:`~matplotlib.figure.Figure` objects (tests inspect them)."""
    import statistics

    from matplotlib.lines import Line2D

    from lab import palette

    path = Path(path)
    varying = _varying(results)
    values = {k: sorted({json.dumps(r["config"].get(k), sort_keys=True) for r in results}, key=_value_sort)
              for k in varying}  # the same value keeps its line style in every file
    designs = _design_order({str(r["config"]["design"]) for r in results})
    unit = "nested VMRUN / virtual s" if is_virtual(results) else "nested VMRUN / s"
    by_rate: dict[float, list[dict]] = defaultdict(list)
    for r in results:
        by_rate[float(r["config"]["switch_rate"])].append(r)
    out = []
    for rate in sorted(by_rate):
        runs = by_rate[rate]
        vary = [k for k in varying if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]
        rate_designs = [d for d in designs if any(str(r["config"]["design"]) == d for r in runs)]
        fits = [k for k in vary if len(values[k]) <= len(palette.LINESTYLES)
                and len(rate_designs) + len(values[k]) <= LEGEND_MAX]
        style_key = min(fits, key=lambda k: (len(values[k]), k)) if fits else None
        facet_keys = [k for k in vary if k != style_key]
        # facet -> (design, style value) -> vcpus -> rates
        cells: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in runs:
            cfg = r["config"]
            facet = tuple(json.dumps(cfg.get(k), sort_keys=True) for k in facet_keys)
            sv = json.dumps(cfg.get(style_key), sort_keys=True) if style_key else None
            cells[facet][(str(cfg["design"]), sv)][int(cfg["vcpus"])].append(
                float(r["ops"]["nested_vmrun"]["per_s"]))
        if all(len(pts) < 2 for series in cells.values() for pts in series.values()):
            continue  # every series is one point: a "line plot" would have no line
        facets = sorted(cells, key=lambda f: [_value_sort(v) for v in f])
        ncols = min(len(facets), 3)
        nrows = math.ceil(len(facets) / ncols)
        if len(facets) == 1:
            fig = _figure(8.0, 4.5)
        else:
            fig = _figure(min(14.0, 2.2 + 3.6 * ncols), min(24.0, 1.2 + 2.8 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True, sharex=True)
        xs_all = sorted({int(r["config"]["vcpus"]) for r in runs})
        dodge = 0.012 * max(1, xs_all[-1] - xs_all[0])  # designs side by side: equal values stay visible
        spread = False
        for n, facet in enumerate(facets):
            ax = axes[n // ncols][n % ncols]
            for (design, sv), pts in sorted(cells[facet].items(),
                                            key=lambda kv: (designs.index(kv[0][0]), _value_sort(kv[0][1] or "0"))):
                xs = sorted(pts)
                med = [statistics.median(pts[x]) for x in xs]
                lo = [m - min(pts[x]) for m, x in zip(med, xs, strict=True)]
                hi = [max(pts[x]) - m for m, x in zip(med, xs, strict=True)]
                spread = spread or any(len(pts[x]) > 1 for x in xs)
                st = palette.style(values[style_key].index(sv)) if style_key else {"linestyle": "-", "marker": "o"}
                shift = dodge * (rate_designs.index(design) - (len(rate_designs) - 1) / 2)
                eb = ax.errorbar([x + shift for x in xs], med, yerr=[lo, hi] if any(lo) or any(hi) else None, capsize=3,
                                 color=palette.colour(design), markersize=5, linewidth=1.6,
                                 label=", ".join([design] + ([_fmt_value(style_key, sv)] if style_key else [])),
                                 **st)
                eb.lines[0].set_gid(design)  # the data line: tests check its colour
            ax.set_xticks(xs_all)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if facet_keys:
                title = ", ".join(_fmt_value(k, v) for k, v in zip(facet_keys, facet, strict=True))
                ax.set_title(title if len(title) <= 36 else title.replace(", ", "\n", 1), fontsize=9)
        for n in range(len(facets), nrows * ncols):
            axes[n // ncols][n % ncols].set_axis_off()
            if n >= ncols:  # the panel above an empty slot is the last of its column: its ticks show
                axes[n // ncols - 1][n % ncols].xaxis.set_tick_params(labelbottom=True)
        ylabel = unit + ("\n(median over seeds; bars: min–max)" if spread else "")
        if len(facets) == 1:
            axes[0][0].set_xlabel("vCPUs")
            axes[0][0].set_ylabel(ylabel)
        else:
            fig.supxlabel("vCPUs", fontsize=10)
            fig.supylabel(ylabel, fontsize=10)
        handles = [Line2D([], [], color=palette.colour(d), linewidth=2.5, label=d) for d in rate_designs]
        if style_key:
            handles += [Line2D([], [], color="0.35", label=_fmt_value(style_key, v), **palette.style(i))
                        for i, v in enumerate(values[style_key])
                        if any(sv == v for series in cells.values() for (_, sv) in series)]
        fig.legend(handles=handles, loc="outside right center", fontsize="small",
                   title="colour: design" + (" · line: " + style_key if style_key else ""),
                   title_fontsize="small")
        fig.suptitle(f"Does nested VMRUN throughput scale with vCPUs? (switch rate {rate:g})")
        if figures is not None:
            figures.append(fig)
        out.append(_save(fig, path.with_name(f"{path.stem}_sw{rate:g}{path.suffix or '.png'}")))
    return out


def vmrun_plot_note(results: list[dict], pngs: list[Path]) -> str:
    """report.md's sentence on the switch rates :func:`plot_vmrun_rate` drew no figure for ("" if none)."""
    rates = sorted({float(r["config"]["switch_rate"]) for r in results})
    drawn = {p.stem.rsplit("_sw", 1)[-1] for p in pngs}
    skipped = [f"{x:g}" for x in rates if f"{x:g}" not in drawn]
    if not skipped:
        return ""
    if len(skipped) == len(rates):
        vcpus = sorted({int(r["config"]["vcpus"]) for r in results})
        return ("No nested-VMRUN-rate plot: it draws VMRUN/s over vCPUs, and "
                + (f"every run here has {vcpus[0]} vCPU(s)" if len(vcpus) == 1 else
                   "every series here (design and settings) ran at a single vCPU count")
                + ", so each design's line would be a single point; the table above has the numbers.")
    return (f"No nested-VMRUN-rate plot for switch rate {', '.join(skipped)}: there every series ran at a "
            "single vCPU count, so each line would be a single point; the table above has the numbers.")


def plot_lock_wait(results: list[dict], path: str | Path, labels: list[str] | None = None, *,
                   figures: list | None = None) -> Path:
    """Where is lock wait time spent? One small panel per design (colour = design, :mod:`lab.palette`),
    one bar per lock class: the total wait of the run, or with several runs of a design the mean per
    run with min..max whiskers. Units ms (µs when every wait is below 0.1 ms), virtual when every run
    is on the virtual clock. A design with a single run is titled with its label (``labels`` / point
    id / run id). ``figures``, when given, receives the Figure. Returns ``path``."""
    from lab import palette

    path = Path(path)
    labels = labels or unique_labels([run_name(r, i) for i, r in enumerate(results)])
    by_design: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_design[str(r["config"]["design"])].append(i)
    designs = _design_order(by_design)
    classes = {d: sorted({c for i in by_design[d] for c in results[i].get("locks", {})}) for d in designs}
    waits = {d: {c: [float(results[i].get("locks", {}).get(c, {}).get("wait_ns_total", 0) or 0)
                     for i in by_design[d]] for c in classes[d]} for d in designs}
    peak = max([w for d in designs for ws in waits[d].values() for w in ws], default=0.0)
    scale, unit = (1e6, "ms") if peak >= 1e5 else (1e3, "µs")
    unit = ("virtual " if is_virtual(results) else "") + unit
    several = any(len(ix) > 1 for ix in by_design.values())
    what = "mean total lock wait per run" if several else "total lock wait"
    if not any(classes.values()):
        fig = _figure()
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no lock_stat data (run with stats on)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        fig.suptitle("Where is lock wait time spent?")
        if figures is not None:
            figures.append(fig)
        return _save(fig, path)
    ncols = min(len(designs), 3)
    nrows = math.ceil(len(designs) / ncols)
    n_cls = max(len(c) for c in classes.values())
    fig = _figure(min(14.0, 1.0 + ncols * min(4.8, max(2.8, 1.0 + 0.45 * n_cls))), min(14.0, 1.3 + 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for n, d in enumerate(designs):
        ax = axes[n // ncols][n % ncols]
        ix = by_design[d]
        ax.set_title(f"{d} ({len(ix)} runs)" if len(ix) > 1 else f"{d} ({labels[ix[0]]})", fontsize=9,
                     color=palette.colour(d))
        if not classes[d]:
            ax.text(0.5, 0.5, "no lock_stat data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        ws = [[w / scale for w in waits[d][c]] for c in classes[d]]
        mean = [sum(w) / len(w) for w in ws]
        err = ([[m - min(w) for m, w in zip(mean, ws, strict=True)],
                [max(w) - m for m, w in zip(mean, ws, strict=True)]] if len(ix) > 1 else None)
        ax.bar(range(len(ws)), mean, 0.65, color=palette.colour(d), yerr=err, capsize=3, ecolor="0.25",
               gid=d, label=d)
        ax.set_xticks(range(len(ws)), classes[d], rotation=30, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        if not any(w for c in ws for w in c):
            ax.text(0.5, 0.5, "no lock wait in these runs", ha="center", va="center", transform=ax.transAxes,
                    color="0.35")
        if n % ncols == 0:
            ax.set_ylabel(f"{what} ({unit})")
    for n in range(len(designs), nrows * ncols):
        axes[n // ncols][n % ncols].set_axis_off()
    axes[0][0].set_ylim(bottom=0, top=None if peak > 0 else 1.0)
    fig.suptitle(f"Where is lock wait time spent? {what[0].upper() + what[1:]}, per lock class ({unit})"
                 + ("\n(bar: mean over the design's runs; whiskers: min–max)" if several else ""), fontsize=11)
    if figures is not None:
        figures.append(fig)
    return _save(fig, path)


