"""lab.report (``launch.py report``): comparison rows, markdown table, PNG plots, bad input.

The documents are one real short run (``launch.py run --json``) and synthetic variants of it."""

from __future__ import annotations

import copy
import json
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import launch_in_process

from ipc.errors import UsageError
from lab import plots, report

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("real") / "real.json"
    p = launch_in_process("run", "--design", "mirror", "--vcpus", "1", "--duration", "0.3", "--quiet", "--json", str(path))
    assert p.returncode == 0, p.stdout + p.stderr
    return path, json.loads(path.read_text())


def variant(base: dict, *, design="mirror", vcpus=1, switch_rate=0.1, vmrun=1000.0, writes=2000.0, p99=500,
            elapsed=2.0, waits=None, gp=None, verdict="SUCCESS", seed=1, run_id=None) -> dict:
    r = copy.deepcopy(base)
    r["config"].update(design=design, vcpus=vcpus, switch_rate=switch_rate, seed=seed)
    r["seed"] = seed
    r["elapsed_s"] = elapsed
    r["ops"]["nested_vmrun"].update(per_s=vmrun, p99_ns=p99)
    r["ops"]["emulated_write"]["per_s"] = writes
    if waits is not None:
        r["locks"] = {name: {**_lock0(), "wait_ns_total": w} for name, w in waits.items()}
    if gp is not None:
        r["gp"] = gp
    r["verdict"] = verdict
    r["reasons"] = [] if verdict == "SUCCESS" else ["oracle: 1 violation(s); first: lost write"]
    if run_id:
        r["run_id"] = run_id
    return r


def _lock0() -> dict:
    return dict.fromkeys(("acquisitions", "contentions", "wait_ns_total", "wait_ns_max", "wait_ns_min",
                          "wait_ns_avg", "hold_ns_total", "hold_ns_max", "hold_ns_min", "hold_ns_avg"), 0)


def _is_png(p: Path) -> bool:
    data = p.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000 and data[-8:-4] == b"IEND"


def test_real_document_passes_the_shape_check(real):
    path, doc = real
    assert report.load(path) == [doc]
    (row,) = report.summarize([doc])
    assert row["design"] == "mirror" and row["vcpus"] == 1 and row["verdict"] == "SUCCESS"
    assert row["vmrun_per_s"] == doc["ops"]["nested_vmrun"]["per_s"] > 0
    assert row["vmrun_p99_ns"] == doc["ops"]["nested_vmrun"]["p99_ns"]
    assert row["gp_per_s"] == pytest.approx(sum(doc["gp"].values()) / doc["elapsed_s"])


def test_summarize_numbers(real):
    _, base = real
    a = variant(base, vcpus=4, elapsed=2.0, waits={"mmu_lock": 1_000_000_000, "tables_lock": 3_000_000_000},
                gp={"rcu": 10, "track_srcu": 30}, vmrun=12345.6, writes=54321.0, p99=2500, run_id="ra")
    b = variant(base, design="rcu-list", vcpus=2, switch_rate=0.5, elapsed=0.5, waits={"mmu_lock": 5_000_000},
                gp={"rcu": 0}, p99=None, verdict="FAILURE", run_id="rb")
    rows = report.summarize([a, b])
    assert rows[0] == {
        "run": "–", "design": "mirror", "registration": base["config"]["registration"], "vcpus": 4,
        "switch_rate": 0.1, "seed": 1, "vmrun_per_s": 12345.6, "writes_per_s": 54321.0, "vmrun_p99_ns": 2500,
        "lock_wait_share": pytest.approx(4e9 / (2e9 * 4)), "gp_per_s": pytest.approx(20.0), "verdict": "SUCCESS",
    }
    assert rows[1]["lock_wait_share"] == pytest.approx(5e6 / (0.5e9 * 2))  # 0.5 %
    assert rows[1]["vmrun_p99_ns"] is None and rows[1]["gp_per_s"] == 0
    assert rows[1]["design"] == "rcu-list" and rows[1]["switch_rate"] == 0.5 and rows[1]["verdict"] == "FAILURE"

    md = report.markdown_table(rows).splitlines()
    assert len(md) == 4 and md[0].startswith("| run | design |") and set(md[1]) <= set("|-:")
    cells = [c.strip() for c in md[2].strip("|").split("|")]
    assert cells == ["–", "mirror", base["config"]["registration"], "4", "0.1", "12,346", "54,321", "2.5µs",
                     "50.0%", "20.0", "SUCCESS"]
    cells = [c.strip() for c in md[3].strip("|").split("|")]
    assert cells[7] == "–" and cells[8] == "0.500%" and cells[-1] == "FAILURE"


def test_labels_are_unique():
    assert report.unique_labels(["r", "r", "x", "r"]) == ["r", "r#2", "x", "r#3"]


def test_plots_are_png(real, tmp_path):
    _, base = real
    runs = [variant(base, design=d, vcpus=v, switch_rate=s, vmrun=1000.0 * v + (d == "mirror") * 500, seed=seed,
                    waits={"mmu_lock": 10**6 * v, "tables_lock": 2 * 10**6})
            for d in ("mirror", "rcu-list") for v in (1, 2, 4) for s in (0.0, 0.5) for seed in (1, 2)]
    pngs = report.plot_vmrun_rate(runs, tmp_path / "vmrun_rate.png")
    assert sorted(p.name for p in pngs) == ["vmrun_rate_sw0.5.png", "vmrun_rate_sw0.png"]
    assert all(_is_png(p) for p in pngs)
    many = report.plot_lock_wait(runs, tmp_path / "lock_wait.png")  # 24 runs: grouped by series
    few = report.plot_lock_wait(runs[:3], tmp_path / "lock_wait_few.png")
    assert _is_png(many) and _is_png(few)
    nolocks = [variant(base, waits={})]
    assert _is_png(report.plot_lock_wait(nolocks, tmp_path / "none.png"))


def test_series_label_names_other_varying_keys(real):
    _, base = real
    a, b = variant(base), variant(base)
    b["config"]["registration"] = "bool"
    varying = plots._varying([a, b])
    assert varying == ["registration"]
    assert plots.series_label(b, varying) == "mirror, registration=bool"


def test_cli_single_file_renders_the_run(real):
    path, _ = real
    p = launch_in_process("report", str(path))
    assert p.returncode == 0, p.stderr
    assert "nested_vmrun" in p.stdout and "lock_stat" in p.stdout and "SUCCESS" in p.stdout


def test_main_several_files_with_out(real, tmp_path, capsys):
    path, base = real
    other = tmp_path / "other.json"
    other.write_text(json.dumps(variant(base, vcpus=2, verdict="FAILURE")))
    sweep = tmp_path / "sweep.json"  # a list document, as sweep writes it
    sweep.write_text(json.dumps([{**variant(base, vcpus=4), "point_id": "abc123"}]))
    out = tmp_path / "out" / "nested"
    assert report.main(Namespace(results=[str(path), str(other), str(sweep)], out=str(out))) == 0
    printed = capsys.readouterr().out
    assert "3 runs" in printed and "abc123" not in printed and "FAILURE" in printed  # a run is never named by a hash
    md = (out / "report.md").read_text()
    assert "| real | mirror |" in md and "| other | mirror |" in md and "| sweep | mirror |" in md
    assert "## FAILURE reasons" in md and "lost write" in md
    assert "![vmrun_rate_sw0.1](vmrun_rate_sw0.1.png)" in md and "![lock_wait](lock_wait.png)" in md
    assert _is_png(out / "vmrun_rate_sw0.1.png") and _is_png(out / "lock_wait.png")


def _bad_docs(tmp_path: Path, base: dict) -> dict[str, tuple[Path, str]]:
    d = tmp_path
    cases = {}

    def put(name, content, expect):
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        cases[name] = (p, expect)

    put("notjson.json", "{not json", "not valid JSON")
    put("binary.json", b"\xff\xfe\x00garbage", "not valid JSON")
    put("array_of_numbers.json", "[1, 2]", "[0]: not a results document")
    put("empty_list.json", "[]", "empty list")
    put("string.json", '"hello"', "not a results document")
    noops = copy.deepcopy(base)
    del noops["ops"]["nested_vmrun"]
    put("noops.json", json.dumps(noops), "ops.nested_vmrun: missing")
    badtype = copy.deepcopy(base)
    badtype["ops"]["nested_vmrun"]["per_s"] = "fast"
    put("badtype.json", json.dumps(badtype), "ops.nested_vmrun.per_s: expected `float`, got `str`")
    badverdict = {**base, "verdict": "MAYBE"}
    put("badverdict.json", json.dumps(badverdict), "verdict: invalid enum value 'MAYBE'")
    nocfg = {k: v for k, v in base.items() if k != "config"}
    put("nocfg.json", json.dumps(nocfg), "missing required field `config`")
    zero = {**base, "elapsed_s": 0}
    put("zero.json", json.dumps(zero), "elapsed_s: must be > 0")
    cases["missing.json"] = (d / "missing.json", "no such file")
    cases["dir"] = (d, "is a directory")
    return cases


def test_bad_files_are_usage_errors_naming_the_file(real, tmp_path):
    path, base = real
    for name, (p, expect) in _bad_docs(tmp_path, base).items():
        with pytest.raises(UsageError) as ei:
            report.main(Namespace(results=[str(path), str(p)], out=None))
        msg = str(ei.value)
        assert str(p) in msg and expect in msg, (name, msg)
        assert "\n" not in msg


def test_cli_bad_file_exit_2_one_line(real, tmp_path):
    path, base = real
    bad = tmp_path / "bad.json"
    bad.write_text('{"config": 1}')
    out = tmp_path / "out"
    p = launch_in_process("report", str(path), str(bad), "--out", str(out))
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and str(bad) in p.stderr and p.stderr.startswith("error: ")
    assert p.stdout == "" and not out.exists()  # nothing printed or written before every file checked


def test_out_must_be_a_directory(real, tmp_path):
    path, _ = real
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="--out"):
        report.main(Namespace(results=[str(path)], out=str(f)))


def test_runs_are_named_by_what_tells_them_apart(real):
    _, base = real
    runs = [variant(base, design=d, vcpus=4, seed=sd, run_id=f"pts_{sd}{d}") for sd in (1, 2)
            for d in ("per-table-notifier", "rcu-list")]
    for r, x in zip(runs, (1.0, 3.2, 3.2, 1.0), strict=True):
        r["config"]["dilate"] = x
    assert report.run_labels(runs) == ["per-table-notifier, ×1, seed 1", "rcu-list, ×3.2, seed 1",
                                       "per-table-notifier, ×3.2, seed 2", "rcu-list, ×1, seed 2"]
    # the table's run column: only what the design / registration / vCPUs / switch rate columns do not show
    assert [r["run"] for r in report.summarize(runs)] == ["×1, seed 1", "×3.2, seed 1", "×3.2, seed 2", "×1, seed 2"]
    # a long name is folded, never cut short, in a narrow terminal
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    Console(file=buf, width=100).print(report.rich_table(report.summarize(runs)))
    text = buf.getvalue()
    assert "per-table-notifier" in text and "per-table-noti…" not in text
    assert "×1, seed 1" in text and "×3.2, seed 2" in text and "×3.2, seed 1" in text


def test_report_rerenders_compare_json(real, tmp_path):
    _, base = real
    runs = [variant(base, design=d, vcpus=2, seed=sd) for sd in (1, 2) for d in ("mutex-hash", "rcu-list")]
    doc = {"points": runs, "assessment": "## Verdict on the seed's claims\n\n**Holds on these numbers**",
           "verdicts": {}, "ratios": []}
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(doc))
    p = launch_in_process("report", str(path), "--out", str(tmp_path / "re"))
    assert p.returncode == 0, p.stderr
    assert "compare: 4 runs" in p.stdout and "Holds on these numbers" in p.stdout
    md = (tmp_path / "re" / "report.md").read_text()
    assert "Verdict on the seed's claims" in md and "| seed 2 | rcu-list |" in md
    # a compare.json is rendered alone
    p = launch_in_process("report", str(path), str(path))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "alone" in p.stderr


def test_a_key_that_only_follows_another_is_not_named_twice(real):
    _, base = real
    runs = [variant(base, design=d) for d in ("mutex-hash", "rcu-list") for _ in range(2)]
    for r, (tw, tf) in zip(runs, [(0.02, 0.0025), (2.0, 0.25)] * 2, strict=True):
        r["config"].update(table_writes_per_vmrun=tw, tracked_fraction=tf)
    from lab.labels import differing_keys

    assert differing_keys(runs) == ["design", "table_writes_per_vmrun"]  # tracked_fraction follows it
    assert report.run_labels(runs)[1] == "mutex-hash, 2 table writes"
    assert plots._varying(runs) == ["table_writes_per_vmrun"]
