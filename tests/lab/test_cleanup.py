"""lab.cleanup (``launch.py clean``): dead runs' segments and run directories go, live ones stay.

The machine is shared with other runs and tests, so the real removals are done through the API
restricted to this test's run ids (``run_ids=``) and a private run-dir base; the CLI is exercised
with ``--dry-run`` (which removes nothing anywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ipc.rundir import OWNER_FILE, make_run_dir
from ipc.shm import SHM_DIR
from lab import cleanup

ROOT = Path(__file__).resolve().parents[2]
_seq = iter(range(10_000))
# The fake runs' segments (some made old on purpose) are unmapped and have no run directory in the
# default places: a bare `launch.py clean` (tests/vm/test_faults.py) on another pytest-xdist worker
# would rightly remove them mid-test. Same group = same worker, one at a time (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("bare_clean")


@pytest.fixture
def fake(tmp_path):
    """Factory of fake runs: segments in /dev/shm and run dirs under tmp_path; all removed after."""
    made_segs: list[str] = []
    ids: set[str] = set()

    def run_id() -> str:
        rid = f"tc{os.getpid():x}x{next(_seq)}"
        ids.add(rid)
        return rid

    def segment(rid: str, region: str = "vm", size: int = 8192, age_s: float = 0.0) -> str:
        name = f"pts_{rid}_{region}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        made_segs.append(path)
        if age_s:
            t = time.time() - age_s
            os.utime(path, (t, t))
        return path

    def run_dir(rid: str, owner: tuple[int, int] | None = None) -> Path:
        d = make_run_dir(rid, base=tmp_path)  # owner = this (live) process
        if owner is not None:
            (d / OWNER_FILE).write_text(f"{owner[0]}\n{owner[1]}\n")
        return d

    yield SimpleNamespace(run_id=run_id, segment=segment, run_dir=run_dir, ids=ids, base=tmp_path)
    for p in made_segs:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _scan(fake, **kw):
    return cleanup.scan(run_base=fake.base, run_ids=fake.ids, **kw)


def _by_name(rep):
    return {i.name: i for i in rep.items}


def test_dead_run_is_removed_live_run_is_kept(fake):
    dead, live = fake.run_id(), fake.run_id()
    dseg = fake.segment(dead)
    dseg2 = fake.segment(dead, "guest")
    ddir = fake.run_dir(dead, owner=(_dead_pid(), 12345))
    lseg = fake.segment(live)
    ldir = fake.run_dir(live)  # owner: the test process

    rep = cleanup.clean(run_base=fake.base, run_ids=fake.ids)
    items = _by_name(rep)
    assert items[os.path.basename(dseg)].removed and "dead" in items[os.path.basename(dseg)].why
    assert items[str(ddir)].removed and "is gone" in items[str(ddir)].why
    assert not os.path.exists(dseg) and not os.path.exists(dseg2) and not ddir.exists()
    assert not items[os.path.basename(lseg)].remove and "live" in items[os.path.basename(lseg)].why
    assert not items[str(ldir)].remove
    assert os.path.exists(lseg) and ldir.exists()
    assert not rep.errors


def test_reused_pid_with_other_start_time_is_dead(fake):
    rid = fake.run_id()
    seg = fake.segment(rid)
    d = fake.run_dir(rid, owner=(os.getpid(), 1))  # our pid, but not our start time
    rep = cleanup.clean(run_base=fake.base, run_ids=fake.ids)
    assert not os.path.exists(seg) and not d.exists()
    assert len([i for i in rep.items if i.removed]) == 2


_MAPPER = textwrap.dedent("""
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 0)
    os.close(fd)          # only the mapping keeps it: /proc/<pid>/maps is what clean must read
    print("mapped", flush=True)
    sys.stdin.read()      # until the test closes our stdin
""")


@pytest.fixture
def mapper():
    procs = []

    def start(path: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", _MAPPER, path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "mapped"
        return p

    yield start
    for p in procs:
        p.stdin.close()
        p.wait(timeout=10)


def test_orphan_segment_mapped_by_live_process_is_kept(fake, mapper):
    rid = fake.run_id()
    seg = fake.segment(rid, age_s=3600)  # old: only the mapping protects it
    child = mapper(seg)
    rep = cleanup.clean(run_base=fake.base, run_ids=fake.ids)
    it = _by_name(rep)[os.path.basename(seg)]
    assert not it.remove and f"in use by pid {child.pid}" in it.why
    assert os.path.exists(seg)
    child.stdin.close()
    child.wait(timeout=10)
    rep = cleanup.clean(run_base=fake.base, run_ids=fake.ids)
    assert _by_name(rep)[os.path.basename(seg)].removed and not os.path.exists(seg)


def test_segment_held_open_without_mapping_is_kept(fake):
    seg = fake.segment(fake.run_id(), age_s=3600)
    fd = os.open(seg, os.O_RDONLY)
    try:
        it = _by_name(_scan(fake))[os.path.basename(seg)]
        assert not it.remove and str(os.getpid()) in it.why
    finally:
        os.close(fd)
    assert _by_name(_scan(fake))[os.path.basename(seg)].remove


def test_dead_owner_but_segment_in_use_keeps_both(fake, mapper):
    """Coordinator gone, a worker still attached: nothing of that run is removed yet."""
    rid = fake.run_id()
    seg = fake.segment(rid)
    d = fake.run_dir(rid, owner=(_dead_pid(), 1))
    child = mapper(seg)
    items = _by_name(cleanup.clean(run_base=fake.base, run_ids=fake.ids))
    assert not items[os.path.basename(seg)].remove
    assert not items[str(d)].remove and f"in use by pid {child.pid}" in items[str(d)].why
    assert os.path.exists(seg) and d.exists()


def test_young_orphan_segment_gets_a_grace_period(fake):
    young = fake.segment(fake.run_id())
    old = fake.segment(fake.run_id(), age_s=3600)
    items = _by_name(cleanup.clean(run_base=fake.base, run_ids=fake.ids))
    assert not items[os.path.basename(young)].remove and "grace" in items[os.path.basename(young)].why
    assert items[os.path.basename(old)].removed
    assert os.path.exists(young) and not os.path.exists(old)


def test_run_dir_without_owner_file(fake):
    rid = fake.run_id()
    d = fake.run_dir(rid)
    (d / OWNER_FILE).unlink()
    assert not _by_name(_scan(fake))[str(d)].remove  # young: may be being created
    t = time.time() - 3600
    os.utime(d, (t, t))
    it = _by_name(cleanup.clean(run_base=fake.base, run_ids=fake.ids))[str(d)]
    assert it.removed and "owner.pid" in it.why and not d.exists()


def test_dry_run_removes_nothing(fake, capsys):
    rid = fake.run_id()
    seg = fake.segment(rid)
    d = fake.run_dir(rid, owner=(_dead_pid(), 1))
    rep = cleanup.clean(dry_run=True, run_base=fake.base, run_ids=fake.ids)
    assert [i.remove for i in rep.items] == [True, True] and not any(i.removed for i in rep.items)
    assert os.path.exists(seg) and d.exists()
    cleanup.print_report(rep)
    out = capsys.readouterr().out
    assert f"would remove segment pts_{rid}_vm" in out and f"would remove run dir {d}" in out
    assert out.strip().splitlines()[-1].startswith("clean (dry run): would remove 1 segment(s)")


def test_cli_dry_run(fake):
    """``launch.py clean --dry-run`` lists our dead run (run dirs looked up under TMPDIR) and
    removes nothing; exit 0, summary line last."""
    rid = fake.run_id()
    seg = fake.segment(rid)
    d = fake.run_dir(rid, owner=(_dead_pid(), 1))
    live = fake.run_id()
    lseg = fake.segment(live)
    fake.run_dir(live)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(fake.base)
    p = subprocess.run([sys.executable, "launch.py", "clean", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"would remove segment pts_{rid}_vm" in p.stdout
    assert f"would remove run dir {d}" in p.stdout
    assert f"kept segment pts_{live}_vm" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("clean (dry run): would remove ")
    assert os.path.exists(seg) and d.exists() and os.path.exists(lseg)


def test_segment_run_id():
    assert cleanup.segment_run_id("pts_r0a1b2c3d4e_vm") == "r0a1b2c3d4e"
    assert cleanup.segment_run_id("pts_abc_guest_mem") == "abc"
    assert cleanup.segment_run_id("pts_noregion") is None
    assert cleanup.segment_run_id("pts_bad-id_vm") is None
    assert cleanup.segment_run_id("other_x_y") is None
