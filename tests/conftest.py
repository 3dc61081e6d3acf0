"""Shared test fixtures.

Every test is checked, after it ran (pass or fail), for leaks: no ``/dev/shm/pts_*`` segment created
during the test may remain, and no process started by the test may still be alive (children get a
short grace period, then they are killed and the test fails). The multiprocessing helpers of this
process (the forkserver and the resource tracker) are long-lived by design and exempt; the worker
processes they fork are not.

Other test runs may share this machine (and /dev/shm), so a new segment counts as this run's only if
this process tree created it: its name carries a run id from the ``run_id`` fixture, or it was
created through ``multiprocessing.shared_memory`` (what ``Region.create`` uses) in this process or a
forkserver child (this module is preloaded in the server and logs every create to a file of this
session; under pytest-xdist, of this worker: other workers' segments are not this one's).

``python -m pytest`` from the checkout root puts the root on ``sys.path``, so ``ipc``, ``vm``,
``vcpu`` and ``bench`` import without installing; this file also makes sure of it for a plain
``pytest``.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ipc.proc import forkserver_context  # noqa: E402

# -- shm create log (this process and its forkserver children) -------------------------------------
# One log per process that runs tests: a plain session, or each pytest-xdist worker (gw0, gw1, ...). A
# worker inherits the controller's environment, so the log is tied to the worker id it was made for
# (PTS_TEST_SHM_LOG_WORKER): a worker makes its own, its forkserver children (same worker id) log into
# it. A shared log would make one worker's live segments "ours" for another, whose leak check would
# then report and unlink them.
_LOG_ENV = "PTS_TEST_SHM_LOG"
_LOG_WORKER_ENV = "PTS_TEST_SHM_LOG_WORKER"
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _LOG_ENV not in os.environ or os.environ.get(_LOG_WORKER_ENV, "") != _WORKER:
    os.environ[_LOG_ENV] = f"/tmp/pts_test_shm_{os.getpid()}{'_' + _WORKER if _WORKER else ''}.log"
    os.environ[_LOG_WORKER_ENV] = _WORKER
    _LOG_OWNER = True
else:
    _LOG_OWNER = False
SHM_LOG = os.environ[_LOG_ENV]

# -- FAILURE trace dumps of runs without --json go to a directory of this session, removed at its end
if "PTS_FAILURE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PTS_FAILURE_DIR"] = tempfile.mkdtemp(prefix="pts_test_failures_")
    _dumps_owner = os.getpid()
    atexit.register(lambda: os.getpid() == _dumps_owner and shutil.rmtree(os.environ["PTS_FAILURE_DIR"],
                                                                          ignore_errors=True))


def _install_shm_create_log() -> None:
    """Log every segment this process creates (ipc.shm.Region.create: the one place that makes them)."""
    from ipc import shm

    orig = shm.Region.create.__func__
    if getattr(orig, "_pts_logged", False):
        return

    def create(cls, run_id, layout):
        region = orig(cls, run_id, layout)
        fd = os.open(SHM_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{shm.segment_name(run_id, layout.name)}\n".encode())
        finally:
            os.close(fd)
        return region

    create._pts_logged = True
    shm.Region.create = classmethod(create)


_install_shm_create_log()


def _logged_creates() -> set[str]:
    try:
        with open(SHM_LOG) as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


def pytest_sessionfinish(session, exitstatus):
    if _LOG_OWNER:
        try:
            os.unlink(SHM_LOG)
        except FileNotFoundError:
            pass


# -- the longest tests start first -----------------------------------------------------------------
# Under pytest-xdist (pyproject's addopts: -n auto --dist loadgroup) a worker takes the next test when
# it is done; a minute-long test collected last would run alone at the end while the other workers
# idle. These (the slowest of `pytest --durations=60`, 2026-12-07, prefixes of node ids) go first, in
# this order; everything else keeps its collection order behind them.
SLOW_FIRST = (
    "tests/test_mutants.py::test_fast_subset_is_killed",
    "tests/lab/test_chaos.py::test_ten_chaos_runs_end_well",
    "tests/lab/test_map.py::test_tiny_real_map",
    "tests/lab/test_map.py::test_the_maps_default_clock",
    "tests/ipc/test_rcu_faults.py::test_signal_never_leaks_gp_lock_without_holder",
    "tests/lab/test_explore.py::test_cli_explore_free_seeds_its_op_streams",
    "tests/lab/test_dask_security.py",
    "tests/lab/test_explore.py::test_a_hang_or_crash_is_saved_as_not_replayable",
    "tests/lab/test_explore.py::test_flood_drop_correct_code_300_schedules_no_deadlock",
    "tests/lab/test_compare.py::test_compare_command_writes_table_plots_and_verdict",
    "tests/lab/test_outputs.py::test_a_bad_output_location_stops_the_command_before_it_starts",
    "tests/lab/test_explore.py::test_cli_explore_replay_and_a_stale_schedule",
    "tests/lab/test_explore.py::test_explore_finds_the_race_and_replay_repeats_it_10_of_10",
)


# Module-scoped fixtures that cost seconds (a run, an explore, a mutant catalogue): pytest-xdist makes a
# module fixture once on every worker that runs one of its tests, so the tests using one share an
# xdist_group (one worker) and it is made once.
SHARED_MODULE_FIXTURES = {"coverage", "generated", "real", "full_disk_run", "saved"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        return next((i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the same order on every worker, as pytest-xdist requires
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.items() if info is not None else ()
        if any(name in SHARED_MODULE_FIXTURES and d.scope == "module" for name, ds in defs for d in ds):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


SHM_DIR = "/dev/shm"
SHM_PREFIX = "pts_"
CHILD_GRACE_S = 2.0
# modules every forkserver child needs: imported once in the server (pytest because each child
# re-imports the __main__ module, which is pytest's under ``python -m pytest``)
PRELOAD = ["numpy", "pytest", "ipc.shm", "ipc.locks", "ipc.rcu", "ipc.hist", "ipc.proc", "conftest"]
_HELPER_MARKERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker",
                   "multiprocessing.semaphore_tracker")

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is installed in CI
    psutil = None


# -- helpers ---------------------------------------------------------------------------------------
def shm_segments() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_helper(pid: int) -> bool:
    cmd = _cmdline(pid)
    return any(m in cmd for m in _HELPER_MARKERS)


def _proc_children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (fallback when psutil is missing)."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rindex(b")") + 2:st.rindex(b")") + 3] not in (b"Z", b"X")
    except (OSError, ValueError):
        return False


def live_descendants() -> list[int]:
    """Live (non-zombie) descendants of this process, excluding the multiprocessing helper
    processes themselves (their children count)."""
    me = os.getpid()
    if psutil is not None:
        pids = []
        try:
            kids = psutil.Process(me).children(recursive=True)
        except psutil.Error:
            kids = []
        for p in kids:
            try:
                if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    continue
            except psutil.Error:
                continue
            pids.append(p.pid)
    else:
        pids, todo = [], [me]
        while todo:
            for c in _proc_children(todo.pop()):
                todo.append(c)
                if _alive(c):
                    pids.append(c)
    return [p for p in pids if not _is_helper(p)]


# -- autouse leak check ----------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_leaks(request):
    before = shm_segments()
    yield
    problems = []
    deadline = time.monotonic() + CHILD_GRACE_S
    kids = live_descendants()
    while kids and time.monotonic() < deadline:
        time.sleep(0.02)
        kids = live_descendants()
    if kids:
        problems.append("processes still alive after the test: " +
                        ", ".join(f"{p} ({_cmdline(p)[:80]!r})" for p in kids))
        for p in kids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    ours = _logged_creates()
    leaked = {n for n in shm_segments() - before if n in ours or any(r in n for r in _handed_out)}
    if leaked:
        problems.append(f"shared-memory segments left in {SHM_DIR}: {sorted(leaked)}")
        for n in leaked:  # clean up so that later tests are judged on their own
            try:
                os.unlink(os.path.join(SHM_DIR, n))
            except FileNotFoundError:
                pass
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)


# -- shared fixtures -------------------------------------------------------------------------------
_run_ids = itertools.count()
_handed_out: list[str] = []


@pytest.fixture
def run_id() -> str:
    """A run id no other test or process uses (segment names carry it)."""
    rid = f"t{os.getpid():x}n{next(_run_ids)}"
    _handed_out.append(f"{SHM_PREFIX}{rid}_")
    return rid


@pytest.fixture(scope="session")
def ctx():
    """The forkserver multiprocessing context, modules preloaded once for the session."""
    return forkserver_context(PRELOAD)


@pytest.fixture
def region_factory(run_id):
    """``make(layout)`` creates a region owned by the test; every one is closed (and unlinked) at
    the end even if the test fails."""
    from ipc.shm import Region

    made = []

    def make(layout, rid: str | None = None):
        r = Region.create(rid or run_id, layout)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def launch_in_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python launch.py ARGS`` called in this process (``launch.main``), its stdout / stderr
    captured: for tests of what the CLI says about its input (a one-line error, exit 2) or of a
    command whose work runs in-process anyway. A subprocess costs an interpreter and the numpy /
    zmq / msgspec imports (~0.8 s of CPU) each time; tests about the CLI process itself (its exit on
    a signal, what it starts, its program name) keep ``subprocess``."""
    import contextlib
    import io

    import launch

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = launch.main([str(a) for a in args])
            except SystemExit as e:  # argparse's -h / --version
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["launch.py", *args], rc, out.getvalue(), err.getvalue())


def wait_until(pred, timeout: float = 10.0, interval: float = 0.001, what: str = "condition"):
    """Poll ``pred`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def procs():
    """A list to put started processes in: all are joined / terminated / killed at the end."""
    from ipc.proc import reap

    started: list = []
    yield started
    reap(started, timeout=5.0)
