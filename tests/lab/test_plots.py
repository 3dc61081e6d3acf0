"""Issue 20, plots a reader can read: one fixed colour per design in every panel and file
(lab/palette.py), bounded legends, no line plot without a line, map.png's colour bar covering the
data and the workload's point starred or said to be off the grid.

Synthetic results only (no run): 3 designs × 2 vCPU counts × 2 dilations × 2 registrations × 3 seeds."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from lab import map as cmap
from lab import palette, plots, report

DESIGNS = ("mutex-hash", "rcu-list", "per-table-notifier")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOCKS = ("mmu_lock", "tables_lock", "avic_physid_lock")


def fake_result(design: str, vcpus: int, dilate: float, registration: str, seed: int, switch_rate: float = 0.5,
                clock: str = "virtual") -> dict:
    rate = 40_000.0 * vcpus / dilate * (0.7 if design == "mutex-hash" else 1.0) + 100 * seed
    return {
        "run_id": f"{design}-{vcpus}-{dilate:g}-{registration}-{seed}",
        "config": {"design": design, "vcpus": vcpus, "switch_rate": switch_rate, "seed": seed, "dilate": dilate,
                   "registration": registration, "clock": clock, "duration": 0.02},
        "seed": seed, "elapsed_s": 0.02, "gp": {"rcu": 3},
        "ops": {"nested_vmrun": {"count": int(rate * 0.02), "per_s": rate, "p99_ns": 900},
                "emulated_write": {"count": int(rate * 0.01), "per_s": rate / 2}},
        "locks": {c: {"wait_ns_total": (k + 1) * 20_000 * vcpus * seed * (3 if design == "mutex-hash" else 1)}
                  for k, c in enumerate(LOCKS)},
        "verdict": "SUCCESS",
    }


@pytest.fixture
def runs() -> list[dict]:
    return [fake_result(d, v, x, reg, s) for d, v, x, reg, s in
            itertools.product(DESIGNS, (1, 2), (1.0, 3.0), ("refcount", "bool"), (1, 2, 3))]


def _png(p: Path) -> bool:
    data = p.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000


def _legend_entries(fig) -> int:
    return sum(len(lg.get_texts()) for lg in fig.legends) + sum(
        len(ax.get_legend().get_texts()) for ax in fig.axes if ax.get_legend() is not None)


def test_palette_is_fixed_and_the_fallback_avoids_design_colours():
    assert palette.colour("mutex-hash") == "#D55E00" and palette.colour("rcu-list") == "#0072B2"
    assert palette.colour("per-table-notifier") == "#009E73"
    assert len(set(palette.DESIGN_COLOURS.values())) == len(palette.DESIGN_COLOURS)
    for name in ("x", "new-design", "zzz", "mirror2"):
        c = palette.colour(name)
        assert c == palette.colour(name) and c not in palette.DESIGN_COLOURS.values()
        assert c in palette.OKABE_ITO.values()


def test_vmrun_rate_colour_is_the_design_in_every_panel_and_file(runs, tmp_path):
    other_rate = [fake_result(d, v, x, reg, s, switch_rate=0.0) for d, v, x, reg, s in
                  itertools.product(DESIGNS, (1, 2), (1.0, 3.0), ("refcount", "bool"), (1, 2, 3))]
    figs: list = []
    pngs = plots.plot_vmrun_rate(runs + other_rate, tmp_path / "vmrun_rate.png", figures=figs)
    assert sorted(p.name for p in pngs) == ["vmrun_rate_sw0.5.png", "vmrun_rate_sw0.png"]
    assert all(_png(p) for p in pngs) and len(figs) == 2
    for fig in figs:
        seen = set()
        for ax in fig.axes:
            for line in ax.lines:
                if line.get_gid() in DESIGNS:
                    assert to_hex(line.get_color()) == palette.colour(line.get_gid()).lower()
                    seen.add(line.get_gid())
        assert seen == set(DESIGNS)
        # 3 designs + the 2 values of the styled key (registration and dilation: one styled, one faceted)
        assert _legend_entries(fig) <= 8
        legend = fig.legends[0]
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True):
            if text.get_text() in DESIGNS:
                assert to_hex(handle.get_color()) == palette.colour(text.get_text()).lower()
        assert "Does nested VMRUN throughput scale with vCPUs?" in fig._suptitle.get_text()
        panels = [ax for ax in fig.axes if ax.lines]
        assert len(panels) == 2  # faceted by the key that is not a line style
        assert "median" in (fig._supylabel.get_text() if fig._supylabel else panels[0].get_ylabel())


def test_vmrun_rate_legend_stays_bounded_on_a_big_sweep(runs, tmp_path):
    big = [dict(r, config={**r["config"], "table_writes_per_vmrun": tw, "clock": clk})
           for r in runs for tw in (0.02, 0.2) for clk in ("virtual", "real")]
    figs: list = []
    (png,) = plots.plot_vmrun_rate(big, tmp_path / "big.png", figures=figs)
    assert _png(png) and _legend_entries(figs[0]) <= 8
    panels = [ax for ax in figs[0].axes if ax.lines]
    assert len(panels) == 8 and all("=" in ax.get_title() or "dilated" in ax.get_title() for ax in panels)


def test_one_vcpu_count_writes_no_line_plot_and_the_report_says_why(runs, tmp_path):
    one = [r for r in runs if r["config"]["vcpus"] == 2]
    assert plots.plot_vmrun_rate(one, tmp_path / "vmrun_rate.png") == []
    assert not list(tmp_path.glob("vmrun_rate*.png"))
    written = report.write_report(one, tmp_path / "out")
    names = [p.name for p in written]
    assert names[0] == "report.md" and "lock_wait.png" in names and not any("vmrun" in n for n in names)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No nested-VMRUN-rate plot: it draws VMRUN/s over vCPUs, and every run here has 2 vCPU(s)" in md


def test_lock_wait_one_panel_per_design_in_its_colour(runs, tmp_path):
    figs: list = []
    png = plots.plot_lock_wait(runs, tmp_path / "lock_wait.png", figures=figs)
    assert png.name == "lock_wait.png" and _png(png)
    (fig,) = figs
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == len(DESIGNS)
    for ax in panels:
        (design,) = {p.get_gid() for p in ax.patches}
        assert all(to_hex(p.get_facecolor()) == palette.colour(design).lower() for p in ax.patches)
        assert design in ax.get_title() and len(ax.patches) == len(LOCKS)
    assert _legend_entries(fig) <= 8
    ylabel = panels[0].get_ylabel()
    title = fig._suptitle.get_text()
    assert ylabel.startswith("mean total lock wait per run") and "virtual ms" in ylabel
    assert "Mean total lock wait per run, per lock class" in title and "virtual ms" in title
    w, h = fig.get_size_inches()
    assert w <= 14 and h <= 14
    # one run per design: plain totals, and the same colours in another file
    figs2: list = []
    plots.plot_lock_wait([r for r in runs if r["config"]["seed"] == 1 and r["config"]["vcpus"] == 1
                           and r["config"]["dilate"] == 1.0 and r["config"]["registration"] == "bool"],
                          tmp_path / "few.png", figures=figs2)
    panels2 = [ax for ax in figs2[0].axes if ax.patches]
    assert [ax.patches[0].get_gid() for ax in panels2] == [ax.patches[0].get_gid() for ax in panels]
    assert all(to_hex(ax.patches[0].get_facecolor()) == palette.colour(ax.patches[0].get_gid()).lower()
               for ax in panels2)
    assert panels2[0].get_ylabel().startswith("total lock wait (virtual")


RATES, WRITES, VCPUS = [0.0, 0.5], [0.002, 0.02, 0.2], [2, 4]


def _maps() -> dict:
    # 1.44 and 2.10 must not share a colour; one cell missing; a cell as {median, lo, hi, n} over seeds
    ratio = [[1.44, 0.95, {"median": 0.6, "lo": 0.52, "hi": 0.71, "n": 3}], [2.10, None, 0.3]]
    return {"virtual": {"factor": 1.0, **{str(v): {"ratio": ratio} for v in VCPUS}}}


def test_map_colour_bar_covers_the_data_and_the_star_is_small(tmp_path):
    figs: list = []
    path = cmap.plot(_maps(), RATES, WRITES, VCPUS, {"table_writes_per_vmrun": 0.02, "switch_rate": 0.5},
                     tmp_path / "map.png", figures=figs)
    assert _png(path)
    (fig,) = figs
    heat = [ax for ax in fig.axes if ax.images]
    assert len(heat) == len(VCPUS)
    for ax in heat:
        norm = ax.images[0].norm
        assert norm.vmin <= 0.3 and norm.vmax >= 2.10
        cm = ax.images[0].cmap
        assert cm(norm(1.44)) != cm(norm(2.10))
        stars = [ln for ln in ax.lines if ln.get_gid() == "workload-point"]
        assert len(stars) == 1 and stars[0].get_markersize() <= 10
        x, y = stars[0].get_xdata()[0], stars[0].get_ydata()[0]
        assert (round(x), round(y)) == (1, 1) and (x, y) != (1, 1)  # in the cell's corner, not on its number
        assert ax.collections  # the 0.8 contour
        assert "vCPUs, virtual" in ax.get_title()
        texts = [t.get_text() for t in ax.texts]
        assert "0.60" in texts and "0.52–0.71" in texts and "1.44" in texts and "no data" in texts
    assert "Where does the VM-wide mutex cost ≥ 20 %?" in fig._suptitle.get_text()
    assert "off this grid" not in fig._suptitle.get_text()
    (cb,) = [ax.images[0].colorbar for ax in heat if ax.images[0].colorbar is not None]  # one, shared
    assert cb.vmin <= 0.3 and cb.vmax >= 2.10 and "mutex-hash ÷ rcu-list" in cb.ax.get_ylabel()


def test_map_says_when_the_workload_point_is_off_the_grid(tmp_path):
    figs: list = []
    cmap.plot(_maps(), RATES, WRITES, VCPUS, {"table_writes_per_vmrun": 0.05, "switch_rate": 0.1},
              tmp_path / "map.png", figures=figs)
    text = figs[0]._suptitle.get_text()
    assert "the workload's point (tw=0.05, sw=0.1) is off this grid" in text
    assert not [ln for ax in figs[0].axes for ln in ax.lines if ln.get_gid() == "workload-point"]
