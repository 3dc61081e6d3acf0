"""Nothing is deleted through a symbolic link, only what the tool made (issue 21 items 2 and 8):
``ipc.safe_delete`` (the rule ``clean``, ``chaos`` and ``sweep`` delete by), ``clean --dumps`` with
planted links, and the temp-dir leftovers ``clean`` removes when their owner is dead.

Every link planted here points at a "victim" directory inside the test's own tmp_path holding a
canary file; leftovers are looked for in a tmp dir of the test (``tmp_base=``), never in the real
temp dir, and ``run_ids=set()`` keeps every real segment and run directory out of the scan."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipc import safe_delete
from lab import cleanup

ROOT = Path(__file__).resolve().parents[2]


def _victim(base: Path) -> Path:
    v = base / "victim"
    (v / "important").mkdir(parents=True)
    (v / "important" / "canary").write_text("keep me\n")
    (v / "canary").write_text("keep me\n")
    return v


def _intact(v: Path) -> bool:
    return (v / "canary").read_text() == "keep me\n" and (v / "important" / "canary").read_text() == "keep me\n"


def _dump(root: Path, name: str) -> Path:
    """A FAILURE dump as ``vm.tracepoints.save_failure`` leaves it without --json."""
    d = root / name
    d.mkdir(parents=True)
    (d / "failure-trace.json").write_text('{"traceEvents": []}\n')
    (d / "failure-trace.txt").write_text("# tracer: nop\n")
    return d


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _old(*paths: Path) -> None:
    t = time.time() - 3600
    for p in paths:
        os.utime(p, (t, t), follow_symlinks=False)


# -- the helper --------------------------------------------------------------------------------------


def test_root_that_is_a_link_is_refused(tmp_path):
    v = _victim(tmp_path)
    (tmp_path / "root").symlink_to(v)
    with pytest.raises(safe_delete.Refused, match="symbolic link"):
        safe_delete.remove_path(tmp_path / "root" / "important")
    assert _intact(v)


def test_entry_that_is_a_link_is_neither_followed_nor_removed(tmp_path):
    v = _victim(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to(v)
    with pytest.raises(safe_delete.Refused, match="symbolic link"):
        safe_delete.remove_path(root / "evil")
    assert _intact(v) and (root / "evil").is_symlink()
    assert safe_delete.remove_quietly(root / "evil") is not None  # the quiet form says why, never raises


def test_links_inside_a_removed_tree_are_not_followed(tmp_path):
    v = _victim(tmp_path)
    d = safe_delete.make_owned_dir("pagetrack-sweep-dask-", dir=str(tmp_path))
    os.symlink(v, os.path.join(d, "to-victim"))
    os.symlink(v / "canary", os.path.join(d, "to-canary"))
    assert safe_delete.remove_path(d, marker=True)
    assert not os.path.lexists(d) and _intact(v)


def test_marker_is_required_and_names_its_owner(tmp_path):
    d = safe_delete.make_owned_dir("pagetrack-chaos-dask-", dir=str(tmp_path))
    with open(os.path.join(d, safe_delete.MARKER)) as f:
        pid, start = map(int, f.read().split())
    assert pid == os.getpid() and start > 0
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(safe_delete.Refused, match="marker"):
        safe_delete.remove_path(plain, marker=True)
    assert plain.is_dir()
    (plain / safe_delete.MARKER).write_text(f"{_dead_pid()} 1\n")  # someone else's
    with pytest.raises(safe_delete.Refused, match="not this process"):
        safe_delete.remove_path(plain, marker=True)
    assert plain.is_dir()
    assert safe_delete.remove_path(d, marker=True) and not os.path.exists(d)
    assert not safe_delete.remove_path(d, marker=True)  # already gone: no error


def test_marker_that_is_a_link_does_not_count(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    real = tmp_path / "real-marker"
    real.write_text(f"{os.getpid()} 0\n")
    (d / safe_delete.MARKER).symlink_to(real)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert safe_delete.read_marker(fd) is None
    finally:
        os.close(fd)


def test_scratch_swapped_for_a_link_is_not_removed(tmp_path):
    """What sweep and chaos do with their Dask scratch: if the path became a link meanwhile, the
    link's target survives."""
    v = _victim(tmp_path)
    d = safe_delete.make_owned_dir("pagetrack-sweep-dask-", dir=str(tmp_path))
    os.rename(d, tmp_path / "moved")
    os.symlink(v, d)
    why = safe_delete.remove_quietly(d, marker=True, shared_root=True)
    assert why and "symbolic link" in why and _intact(v)


def test_root_not_owned_by_us_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "root"
    _dump(root, "r1")
    monkeypatch.setattr(safe_delete.os, "geteuid", lambda: os.stat(root).st_uid + 4242)
    with pytest.raises(safe_delete.Refused, match="not by you"):
        safe_delete.open_root(root)
    with pytest.raises(safe_delete.Refused, match="not by you"):
        safe_delete.open_root(root, shared_ok=True)  # shared: only a sticky dir owned by root


# -- clean --dumps -----------------------------------------------------------------------------------


def _dumps(monkeypatch, tmp_path, root: Path, remove: bool) -> tuple[int, str]:
    monkeypatch.setenv("PTS_FAILURE_DIR", str(root))
    out = tmp_path / "clean.txt"
    with open(out, "w") as f:
        bad = cleanup.failure_dumps(remove, f)
    return bad, out.read_text()


def test_dumps_root_that_is_a_link_is_refused(tmp_path, monkeypatch):
    v = _victim(tmp_path)
    _dump(v, "r1")  # even a dump-looking directory behind the link stays
    (tmp_path / "dumps").symlink_to(v)
    bad, out = _dumps(monkeypatch, tmp_path, tmp_path / "dumps", remove=True)
    assert bad == 1 and "failure dumps: refused" in out and "symbolic link" in out
    assert _intact(v) and (v / "r1" / "failure-trace.json").exists()
    bad, out = _dumps(monkeypatch, tmp_path, tmp_path / "dumps", remove=False)
    assert bad == 0 and "refused" in out  # reporting only: a warning, exit unaffected


def test_dumps_link_in_root_is_skipped_and_said(tmp_path, monkeypatch):
    v = _victim(tmp_path)
    root = tmp_path / "dumps"
    d = _dump(root, "r1")
    (root / "r2").symlink_to(v)
    bad, out = _dumps(monkeypatch, tmp_path, root, remove=True)
    assert bad == 0, out
    assert f"skipped {root / 'r2'}: a symbolic link" in out
    assert "removed 1 from" in out and not d.exists()
    assert _intact(v) and (root / "r2").is_symlink()


def test_dumps_root_pointing_at_a_home_deletes_nothing(tmp_path, monkeypatch):
    """PTS_FAILURE_DIR set to a directory of the user's own: nothing there is a dump."""
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.tex").write_text("x")
    (home / ".bashrc").write_text("x")
    looks = home / "r2"  # a dump's name and file, plus something a dump never holds
    looks.mkdir()
    (looks / "failure-trace.json").write_text("{}")
    (looks / "notes.txt").write_text("x")
    spaced = home / "not a run id"
    spaced.mkdir()
    (spaced / "failure-trace.json").write_text("{}")
    (home / "empty").mkdir()
    sub = home / "r3"
    sub.mkdir()
    (sub / "failure-trace.json").mkdir()  # not a regular file
    before = sorted(str(p) for p in home.rglob("*"))
    bad, out = _dumps(monkeypatch, tmp_path, home, remove=True)
    assert bad == 0 and "failure dumps: none in" in out and "left 6 other entries" in out, out
    assert sorted(str(p) for p in home.rglob("*")) == before


def test_dumps_made_by_the_tool_are_removed(tmp_path, monkeypatch):
    root = tmp_path / "dumps"
    a, b = _dump(root, "r0a1b2c3"), _dump(root, "my-run_2")
    (b / ".failure-trace.txt.123.0badf00d.tmp").write_text("half")  # write_atomic's leftover
    bad, out = _dumps(monkeypatch, tmp_path, root, remove=False)
    assert bad == 0 and "failure dumps: 2 in" in out and a.exists() and b.exists()
    bad, out = _dumps(monkeypatch, tmp_path, root, remove=True)
    assert bad == 0 and "removed 2 from" in out and list(root.iterdir()) == []


def test_cli_reports_a_refused_dumps_root(tmp_path):
    """``launch.py clean --dry-run --dumps`` (removes nothing anywhere) names the refused root."""
    victim = _victim(tmp_path)
    _dump(victim, "r1")
    (tmp_path / "dumps").symlink_to(victim)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env.update(TMPDIR=str(tmp_path), PTS_FAILURE_DIR=str(tmp_path / "dumps"))
    p = subprocess.run([sys.executable, "launch.py", "clean", "--dry-run", "--dumps"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"failure dumps: refused {tmp_path / 'dumps'}" in p.stdout and _intact(victim)


# -- leftovers in the temp dir -----------------------------------------------------------------------


@pytest.fixture
def tmpbase(tmp_path_factory):
    """A short temp dir (a unix socket path must stay under 108 bytes)."""
    return tmp_path_factory.mktemp("lo")


def _pymp(base: Path, tag: str, *, bound: bool) -> tuple[Path, socket.socket | None]:
    d = base / f"pymp-{tag}"
    d.mkdir(mode=0o700)
    path = d / f"listener-{tag}"
    assert len(str(path)) < 108
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    if not bound:
        s.close()  # the file stays, nothing is bound to it any more: a SIGKILLed fork server's
        return d, None
    return d, s


def _scratch(base: Path, kind: str, owner: tuple[int, int] | None) -> Path:
    d = Path(safe_delete.make_owned_dir(f"pagetrack-{kind}-dask-", dir=str(base)))
    (d / "dask-scratch-space" / "worker-x").mkdir(parents=True)
    if owner is None:
        (d / safe_delete.MARKER).unlink()
    else:
        (d / safe_delete.MARKER).write_text(f"{owner[0]} {owner[1]}\n")
    return d


def _clean(base: Path, dry_run: bool = False, grace: float = 0.0):
    rep = cleanup.clean(dry_run=dry_run, run_ids=set(), tmp_base=base, leftover_grace_s=grace)
    return rep, {i.name: i for i in rep.items}


def test_dead_sweep_scratch_goes_live_one_stays(tmpbase):
    dead = _scratch(tmpbase, "sweep", (_dead_pid(), 1))
    reused = _scratch(tmpbase, "chaos", (os.getpid(), 1))  # our pid, not our start time: dead
    live = Path(safe_delete.make_owned_dir("pagetrack-sweep-dask-", dir=str(tmpbase)))  # this process
    unmarked = _scratch(tmpbase, "sweep", None)
    rep, items = _clean(tmpbase)
    assert items[str(dead)].removed and "is gone" in items[str(dead)].why and not dead.exists()
    assert items[str(reused)].removed and not reused.exists()
    assert not items[str(live)].remove and f"owner pid {os.getpid()} is live" in items[str(live)].why
    assert not items[str(unmarked)].remove and "marker" in items[str(unmarked)].why
    assert live.exists() and unmarked.exists() and not rep.errors


def test_dead_scratch_in_use_by_a_live_process_stays(tmpbase):
    d = _scratch(tmpbase, "sweep", (_dead_pid(), 1))
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], cwd=d,
                             stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)
        _, items = _clean(tmpbase)
        assert not items[str(d)].remove and f"pid {child.pid} has its cwd" in items[str(d)].why
        assert d.exists()
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    _, items = _clean(tmpbase)
    assert items[str(d)].removed and not d.exists()


def test_pymp_with_a_stale_listener_goes_a_bound_one_stays(tmpbase):
    stale, _ = _pymp(tmpbase, "stale001", bound=False)
    held, sock = _pymp(tmpbase, "held0001", bound=True)
    other = tmpbase / "pymp-other001"  # another program's: something besides listener sockets
    other.mkdir()
    (other / "data").write_text("x")
    empty = tmpbase / "pymp-empty001"  # may be being set up
    empty.mkdir()
    try:
        _old(stale / "listener-stale001", stale, held / "listener-held0001", held)
        rep, items = _clean(tmpbase, grace=60.0)
        assert items[str(stale)].removed and "stale listener" in items[str(stale)].why
        assert not stale.exists()
        assert not items[str(held)].remove and "bound by a live process" in items[str(held)].why
        assert held.exists() and (held / "listener-held0001").exists()
        assert str(other) not in items and str(empty) not in items and other.exists() and empty.exists()
    finally:
        sock.close()


def test_young_stale_pymp_gets_a_grace_period(tmpbase):
    young, _ = _pymp(tmpbase, "young001", bound=False)
    _, items = _clean(tmpbase, grace=60.0)
    assert not items[str(young)].remove and "grace" in items[str(young)].why and young.exists()


def test_leftover_names_that_are_links_are_never_followed(tmpbase, tmp_path):
    v = _victim(tmp_path)
    (v / "listener-abcdefgh").write_text("")  # whatever it holds
    (tmpbase / "pymp-linked01").symlink_to(v)
    (tmpbase / "pagetrack-sweep-dask-linked01").symlink_to(v)
    rep, items = _clean(tmpbase)
    for name in ("pymp-linked01", "pagetrack-sweep-dask-linked01"):
        it = items[str(tmpbase / name)]
        assert not it.remove and "symbolic link" in it.why and (tmpbase / name).is_symlink()
    assert _intact(v) and not rep.errors


def test_dry_run_lists_leftovers_and_summary_counts_them(tmpbase, capsys):
    d = _scratch(tmpbase, "sweep", (_dead_pid(), 1))
    rep, items = _clean(tmpbase, dry_run=True)
    assert items[str(d)].remove and not items[str(d)].removed and d.exists()
    cleanup.print_report(rep)
    out = capsys.readouterr().out
    assert f"would remove leftover {d}: " in out
    assert out.strip().splitlines()[-1].endswith("would remove 1 leftover temp dir(s), kept 0")


def test_cli_dry_run_lists_a_stale_pymp(tmpbase):
    stale, _ = _pymp(tmpbase, "clidry01", bound=False)
    _old(stale / "listener-clidry01", stale)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmpbase)
    p = subprocess.run([sys.executable, "launch.py", "clean", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"would remove leftover {stale}: " in p.stdout and stale.exists()
