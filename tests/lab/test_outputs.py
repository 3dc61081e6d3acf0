"""Output locations are input (issue 20): ``--json``, ``--trace``, ``--out`` are checked before anything
starts (exit 2, one line, no process, no shared memory); a write that fails late (disk full) leaves no
``.tmp`` behind and keeps what was measured (rescued to ``$PTS_RESCUE_DIR``, the error names both); an
unreachable ``--scheduler`` fails fast and leaves ``--out`` empty; ``-h`` and ``--version``.

The CLI runs in a subprocess through ``GUARD``: a wrapper that runs launch.py as ``__main__`` but ends
the process with exit code 99 if anything creates a shared-memory segment or starts a process, so
"nothing started" is checked exactly (a /dev/shm listing would also see other test runs' segments).
The same wrapper can make ``os.fsync`` (and the trace's ``json.dump``) fail with ENOSPC under one
directory: a full disk, late, after the run has measured everything.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from ipc import outputs
from ipc.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0

GUARD = r"""
import errno, json, os, runpy, subprocess, sys
from multiprocessing import process

def _stop(what):
    sys.stderr.write(f"GUARD: {what} before the outputs were checked\n")
    sys.stderr.flush()
    os._exit(99)

if os.environ.get("GUARD_NOTHING_STARTS"):
    from ipc import shm
    shm.Region.create = classmethod(lambda cls, run_id, layout: _stop(f"shared memory {layout.name} created"))
    process.BaseProcess.start = lambda self: _stop("a process started")
    _popen = subprocess.Popen.__init__
    subprocess.Popen.__init__ = lambda self, *a, **k: _stop(f"subprocess {a[:1]} started")

full = os.environ.get("GUARD_FULL_DIR")
if full:
    full = os.path.realpath(full)
    def _under(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(full + os.sep)
        except OSError:
            return False
    _fsync = os.fsync
    def _full_fsync(fd):
        if _under(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _fsync(fd)
    os.fsync = _full_fsync
    _dump = json.dump
    def _full_dump(obj, fp, *a, **k):
        if _under(fp.fileno()):
            fp.write("{\"traceEvents\": [")
            fp.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _dump(obj, fp, *a, **k)
    json.dump = _full_dump

sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def cli(*args: str, nothing_starts: bool = True, env: dict | None = None, timeout: float = 120):
    """``launch.py ARGS`` through GUARD; ``nothing_starts``: a process or a segment ends it (exit 99)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("GUARD_")} | (env or {})
    if nothing_starts:
        e["GUARD_NOTHING_STARTS"] = "1"
    return subprocess.run([sys.executable, "-c", GUARD, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


def test_the_guard_has_teeth(tmp_path):
    """A valid run through GUARD stops at its first segment: the "nothing started" checks can fail."""
    p = cli("run", "--vcpus", "1", "--duration", "0.05", "--quiet", "--json", str(tmp_path / "r.json"))
    assert p.returncode == 99 and "GUARD: shared memory" in p.stderr, (p.returncode, p.stderr[-500:])


def assert_one_line_usage_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    assert "Traceback" not in p.stderr and "GUARD" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def leftovers(d: Path) -> list[str]:
    return sorted(str(f.relative_to(d)) for f in d.rglob("*")) if d.exists() else []


# -- ipc.outputs -------------------------------------------------------------------------------------


def test_check_out_dir_creates_and_refuses(tmp_path, monkeypatch):
    made = outputs.check_out_dir(tmp_path / "a" / "b", "--out")
    assert made.is_dir()
    assert outputs.check_out_dir(tmp_path / "c", "--out", create=False) == tmp_path / "c"
    assert not (tmp_path / "c").exists()  # only checked
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match=r"--out: .*/file exists and is not a directory"):
        outputs.check_out_dir(f, "--out")
    with pytest.raises(UsageError, match=r"--out: .*/file/d: .*/file is not a directory"):
        outputs.check_out_dir(f / "d", "--out", create=False)
    monkeypatch.setattr(outputs, "MIN_FREE_BYTES", 1 << 62)  # no file system has that much room
    with pytest.raises(UsageError, match=r"--out: .*MiB free on the file system of .*at least"):
        outputs.check_out_dir(tmp_path / "a", "--out")


def test_check_out_file_refuses(tmp_path):
    assert outputs.check_out_file(tmp_path / "r.json", "--json") == tmp_path / "r.json"
    with pytest.raises(UsageError, match="--json: .* is a directory"):
        outputs.check_out_file(tmp_path, "--json")
    with pytest.raises(UsageError, match=r"--trace: .*/no/t.json: directory .*/no does not exist"):
        outputs.check_out_file(tmp_path / "no" / "t.json", "--trace")
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match=r"--json: .*/f/r.json: .*/f is not a directory"):
        outputs.check_out_file(tmp_path / "f" / "r.json", "--json")


@pytest.mark.skipif(IS_ROOT, reason="root writes into a mode 0500 directory")
def test_unwritable_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="is not writable"):
            outputs.check_out_file(ro / "r.json", "--json")
        with pytest.raises(UsageError, match="is not writable"):
            outputs.check_out_dir(ro / "d", "--out")
        with pytest.raises(UsageError, match="is not writable"):
            outputs.check_out_dir(ro, "--out")
    finally:
        ro.chmod(0o700)


def _disk_full_under(monkeypatch, d: Path) -> None:
    """os.fsync of any file under ``d`` fails with ENOSPC (as a full file system would)."""
    real = os.fsync
    d = d.resolve()

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{d}{os.sep}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_write_atomic_writes_and_a_full_disk_rescues(tmp_path, monkeypatch):
    out, rescue = tmp_path / "out", tmp_path / "rescued"
    out.mkdir()
    monkeypatch.setenv(outputs.RESCUE_ENV, str(rescue))
    outputs.write_atomic(out / "a.json", '{"x": 1}\n')
    assert (out / "a.json").read_text() == '{"x": 1}\n' and leftovers(out) == ["a.json"]
    _disk_full_under(monkeypatch, out)
    with pytest.raises(outputs.OutputError) as ei:
        outputs.write_atomic(out / "a.json", b'{"x": 2}\n', what="the numbers", flag="--json")
    msg = str(ei.value)
    assert leftovers(out) == ["a.json"] and (out / "a.json").read_text() == '{"x": 1}\n'  # no .tmp, old intact
    (saved,) = rescue.iterdir()
    assert saved.read_bytes() == b'{"x": 2}\n' and saved.name.startswith("a-") and saved.suffix == ".json"
    assert msg == (f"--json {out / 'a.json'}: not written (No space left on device); the numbers saved to "
                   f"{saved} instead")
    _disk_full_under(monkeypatch, tmp_path)  # the rescue directory is full too
    with pytest.raises(outputs.OutputError, match=r"not written \(No space left on device\), nor to .*: "
                                                  r"the numbers is lost"):
        outputs.write_atomic(out / "b.json", "{}", what="the numbers")
    assert leftovers(out) == ["a.json"] and len(list(rescue.iterdir())) == 1


def test_results_write_json_rescues_the_run(tmp_path, monkeypatch):
    from vm import results

    monkeypatch.setenv(outputs.RESCUE_ENV, str(tmp_path / "rescued"))
    _disk_full_under(monkeypatch, tmp_path / "out")
    (tmp_path / "out").mkdir()
    doc = {"run_id": "r0123456789", "verdict": "SUCCESS", "ops": {}}
    with pytest.raises(outputs.OutputError, match=r"--json .*/out/r.json: not written \(No space left on device\);"
                                                  r" the results document of run r0123456789 \(verdict SUCCESS\)"
                                                  r" saved to .*/rescued/r-.*\.json instead"):
        results.write_json(str(tmp_path / "out" / "r.json"), doc)
    assert leftovers(tmp_path / "out") == []
    (saved,) = (tmp_path / "rescued").iterdir()
    assert json.loads(saved.read_text()) == doc


# -- every command checks its outputs before it starts anything -----------------------------------------


def _bad_places(tmp_path: Path, kind: str) -> dict[str, Path]:
    """Output locations that cannot work, even for root (and a read-only directory when not root)."""
    f = tmp_path / "regular-file"
    f.write_text("")
    places = {"parent is a file": f / ("x.json" if kind == "file" else "x")}
    if kind == "file":
        places |= {"missing directory": tmp_path / "missing" / "x.json", "a directory": tmp_path}
    else:
        places |= {"a file": f}  # a missing directory is fine: it is created (with its parents)
    if not IS_ROOT:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500, exist_ok=True)
        places["read-only directory"] = ro / ("x.json" if kind == "file" else "x")
    return places


COMMANDS = [  # (argv before the output flag, the flag, what the flag names)
    (["run", "--vcpus", "1", "--duration", "0.2", "--quiet"], "--json", "file"),
    (["run", "--vcpus", "1", "--duration", "0.2", "--quiet"], "--trace", "file"),
    (["scenario", "kaboom", "--quiet"], "--json", "file"),
    (["scenario", "kaboom", "--quiet"], "--trace", "file"),
    (["compare", "--vcpus", "1", "--switch-rates", "0", "--duration", "0.2"], "--out", "dir"),
    (["compare", "--map", "--vcpus", "2", "--duration", "0.05"], "--out", "dir"),
    (["sweep", "GRID"], "--out", "dir"),
    (["report", "RESULTS"], "--out", "dir"),
    (["chaos", "--runs", "1"], "--out", "dir"),
    (["chaos", "--runs", "1", "--out", "OUT"], "--json", "file"),
    (["explore", "kaboom", "--schedules", "2"], "--out", "dir"),
    (["explore", "kaboom", "--schedules", "2"], "--json", "file"),
    (["explore", "kaboom", "--schedules", "2"], "--trace", "file"),
    (["replay", "FAILING"], "--trace", "file"),
    (["torture", "rcu", "--duration", "0.2"], "--json", "file"),
]


@pytest.mark.parametrize("argv,flag,kind", COMMANDS, ids=[f"{c[0][0]}{'-map' if '--map' in c[0] else ''}{c[1]}"
                                                          for c in COMMANDS])
def test_a_bad_output_location_stops_the_command_before_it_starts(tmp_path, argv, flag, kind):
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nvcpus = [1]\n[fixed]\ndesign = "mirror"\nduration = 0.1\n')
    failing = tmp_path / "failing-schedule.toml"
    failing.write_text("# not read: the trace location is checked first\n")
    subst = {"GRID": str(grid), "RESULTS": str(tmp_path / "results.json"),
             "FAILING": str(failing), "OUT": str(tmp_path / "chaos-out")}
    argv = [subst.get(a, a) for a in argv]
    for why, place in _bad_places(tmp_path, kind).items():
        p = cli(*argv, flag, str(place), timeout=60)
        line = assert_one_line_usage_error(p, f"error: {flag}: {place}")
        assert p.stdout == "", (why, p.stdout)
        assert not (tmp_path / "chaos-out").exists() and not (tmp_path / "missing").exists(), (why, line)


# -- a full disk after the run: nothing lost, nothing half-written ----------------------------------------


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory):
    """``run --json D/r.json --trace D/t.json`` with D's file system full once the run has measured."""
    d = tmp_path_factory.mktemp("full")
    out, rescue = d / "out", d / "rescued"
    out.mkdir()
    p = cli("run", "--design", "mirror", "--vcpus", "1", "--duration", "0.3", "--quiet", "--json",
            str(out / "r.json"), "--trace", str(out / "t.json"),
            nothing_starts=False, env={"GUARD_FULL_DIR": str(out), outputs.RESCUE_ENV: str(rescue)})
    return p, out, rescue


def test_run_on_a_full_disk_rescues_its_results_and_names_them(full_disk_run):
    p, out, rescue = full_disk_run
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "SUCCESS" in p.stdout  # the summary was printed
    err = p.stderr.strip().splitlines()
    trace_line = [ln for ln in err if ln.startswith(f"trace: not written: --trace {out / 't.json'}: ")]
    assert trace_line and "No space left on device" in trace_line[0], err
    (saved,) = rescue.glob("r-*.json")  # the results; the trace was rescued beside them (t-*.json)
    assert "saved to" in trace_line[0] and len(list(rescue.glob("t-*.json"))) == 1
    assert err[-1] == (f"error: --json {out / 'r.json'}: not written (No space left on device); the results "
                       f"document of run {json.loads(saved.read_text())['run_id']} (verdict SUCCESS) saved to "
                       f"{saved} instead")
    doc = json.loads(saved.read_text())
    assert doc["verdict"] == "SUCCESS" and "No space left" in doc["trace_error"]
    assert leftovers(out) == []  # neither the results nor the trace left a .tmp


def _real_doc(full_disk_run) -> dict:
    _, _, rescue = full_disk_run
    (saved,) = rescue.glob("r-*.json")
    return json.loads(saved.read_text())


def test_compare_json_on_a_full_disk_is_rescued(full_disk_run, tmp_path, monkeypatch):
    from lab import compare

    base = _real_doc(full_disk_run)

    def run_one(cfg):
        r = copy.deepcopy(base)
        r["config"].update(cfg)
        return r

    out = tmp_path / "cmp"
    monkeypatch.setenv(outputs.RESCUE_ENV, str(tmp_path / "rescued"))
    _disk_full_under(monkeypatch, out)
    args = Namespace(out=str(out), designs=None, workload="realistic", clock=None, prices=None, dilate="off",
                     repeats=1, vcpus=[1], switch_rates=[0.0], duration=0.2, seed=1)
    with pytest.raises(outputs.OutputError) as ei:
        compare.main(args, run_one)
    (saved,) = (tmp_path / "rescued").iterdir()
    assert str(ei.value) == (f"--out {out / 'compare.json'}: not written (No space left on device); the results "
                             f"of 3 compare run(s) saved to {saved} instead")
    assert len(json.loads(saved.read_text())["points"]) == 3
    assert leftovers(out) == []


def test_sweep_json_on_a_full_disk_is_rescued(full_disk_run, tmp_path, monkeypatch):
    """Every point already has its result (resumed: no Dask); writing sweep.json and status.json fails."""
    from lab import sweep

    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nvcpus = [1]\n[fixed]\ndesign = "mirror"\nduration = 0.3\n')
    (pt,) = sweep.load_grid(str(grid))
    out = tmp_path / "sw"
    (out / "points").mkdir(parents=True)
    doc = {**_real_doc(full_disk_run), "config": pt.config}
    (out / "points" / f"{pt.point_id}.json").write_text(json.dumps(doc))
    monkeypatch.setenv(outputs.RESCUE_ENV, str(tmp_path / "rescued"))
    _disk_full_under(monkeypatch, out)
    with pytest.raises(outputs.OutputError) as ei:
        sweep.main(Namespace(grid=str(grid), out=str(out), scheduler=None, workers=1))
    msg = str(ei.value)
    rescued = sorted((tmp_path / "rescued").iterdir())
    assert len(rescued) == 2 and all(str(r) in msg for r in rescued), msg
    assert "merged results of 1 point(s)" in msg and msg.endswith("report.md not written") and "\n" not in msg
    assert leftovers(out) == [".sweep.lock", "points", f"points/{pt.point_id}.json"]


# -- --scheduler ---------------------------------------------------------------------------------------


def _refusing_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound, never listened: connecting is refused
    return port


def test_unreachable_scheduler_fails_fast_and_leaves_out_empty(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nvcpus = [1]\n[fixed]\ndesign = "mirror"\nduration = 0.1\n')
    out = tmp_path / "out"
    addr = f"tcp://127.0.0.1:{_refusing_port()}"
    t0 = time.monotonic()
    p = cli("sweep", str(grid), "--scheduler", addr, "--insecure", "--out", str(out), timeout=60)
    assert time.monotonic() - t0 < 15
    assert_one_line_usage_error(p, f"--scheduler: cannot connect to {addr}")
    assert leftovers(out) == []


def test_a_silent_scheduler_fails_within_connect_timeout(tmp_path):
    """Something listens but never speaks Dask: --connect-timeout bounds the wait; --out stays empty."""
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nvcpus = [1]\n[fixed]\ndesign = "mirror"\nduration = 0.1\n')
    out = tmp_path / "out"
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        addr = f"tcp://127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        p = cli("sweep", str(grid), "--scheduler", addr, "--insecure", "--connect-timeout", "1", "--out", str(out),
                timeout=60)
        took = time.monotonic() - t0
        q = cli("compare", "--map", "--scheduler", addr, "--insecure", "--connect-timeout", "1", "--out", str(out),
                timeout=60)
    assert_one_line_usage_error(p, f"--scheduler: cannot connect to {addr}: no answer within 1 s")
    assert_one_line_usage_error(q, f"--scheduler: cannot connect to {addr}: no answer within 1 s")
    assert took < 12 and leftovers(out) == []


# -- -h, --version -----------------------------------------------------------------------------------


def test_help_names_the_program_and_every_command():
    import launch

    commands = set(launch.build_parser()._subparsers._group_actions[0].choices)
    assert commands >= {"torture", "run", "compare", "scenario", "explore", "replay", "clean", "report", "chaos",
                        "sweep"}
    p = subprocess.run([sys.executable, "launch.py", "-h"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("usage: launch.py ")
    for c in commands:
        assert f"\n    {c} " in p.stdout, c
    # as the console script (pyproject [project.scripts] pagetrack-sim = "launch:main")
    code = "import sys; sys.argv = ['/usr/bin/pagetrack-sim', '-h']; import launch; launch.main()"
    q = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert q.returncode == 0 and q.stdout.startswith("usage: pagetrack-sim ")
    assert all(f"\n    {c} " in q.stdout for c in commands)


def test_version():
    import tomllib

    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    p = subprocess.run([sys.executable, "launch.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout == f"pagetrack-sim {want}\n" and p.stderr == ""
