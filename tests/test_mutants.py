"""bench.mutants: the mutation catalogue applies to the source, the harness fails loudly on a stale
patch, runs the copy's code (not an installed package), bounds a hang, and the fast subset is killed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import mutants as M
from bench.mutants_catalogue import CATALOGUE, Edit, Mutant

ROOT = Path(__file__).resolve().parent.parent
MECHANISMS = {"grace period", "SRCU unregister", "notifier walk", "TLB flush", "write-path lock", "refcount",
              "publish order", "unlink lock", "registration"}


def _mutant(file: str, *edits: Edit, lines: int = 1, multi: str = "") -> Mutant:
    return Mutant("test-mutant", "test", file, tuple(edits), (("run",),), "a test", lines=lines, multi=multi)


# -- the catalogue ------------------------------------------------------------------------------------------
def test_catalogue_covers_every_mechanism_with_at_least_15_mutants():
    assert len(CATALOGUE) >= 15
    assert MECHANISMS <= {m.mechanism for m in CATALOGUE}
    assert len({m.name for m in CATALOGUE}) == len(CATALOGUE)
    assert {"gp-no-wait", "gp-single-flip", "gp-skip-alternate", "gp-share-early"} <= {m.name for m in CATALOGUE}
    fast = [m for m in CATALOGUE if m.fast]
    assert len({m.mechanism for m in fast}) == len(fast)  # one per mechanism


def test_every_patch_applies_to_the_working_tree():
    M.check_all(CATALOGUE, ROOT)  # raises PatchError naming the mutant and the file


def test_every_patch_leaves_the_checkout_alone(tmp_path):
    base = M.make_copy(ROOT, dest=tmp_path / "copy")
    before = {m.file: (ROOT / m.file).read_text() for m in CATALOGUE}
    for m in CATALOGUE:
        orig = (base / m.file).read_text()
        M.apply_mutant(base, m)
        assert (base / m.file).read_text() != orig
        (base / m.file).write_text(orig)
    assert before == {m.file: (ROOT / m.file).read_text() for m in CATALOGUE}


# -- patches that do not apply fail loudly -------------------------------------------------------------------
def test_a_patch_whose_original_text_is_missing_fails_loudly():
    m = _mutant("ipc/rcu.py", Edit("this text is not in the file\n", "x = 1\n"))
    with pytest.raises(M.PatchError, match=r"mutant test-mutant: patch does not apply to ipc/rcu.py.*found 0 times"):
        M.check_all([m], ROOT)


def test_a_patch_whose_original_text_is_not_unique_fails_loudly():
    text = "a = 1\nb = 2\na = 1\n"
    with pytest.raises(M.PatchError, match="found 2 times"):
        M.patch_text(_mutant("f.py", Edit("a = 1\n", "a = 2\n")), text)


def test_a_missing_file_fails_loudly(tmp_path):
    with pytest.raises(M.PatchError, match="patch does not apply to nowhere.py: no such file"):
        M.apply_mutant(tmp_path, _mutant("nowhere.py", Edit("a", "b")))


def test_the_declared_line_count_and_compilation_are_checked():
    text = "def f():\n    a = 1\n    b = 2\n    return a + b\n"
    assert M.patch_text(_mutant("f.py", Edit("    a = 1\n", "    a = 3\n")), text).count("a = 3") == 1
    with pytest.raises(M.PatchError, match="changes 2 line"):
        M.patch_text(_mutant("f.py", Edit("    a = 1\n    b = 2\n", "    a = 3\n    b = 4\n")), text)
    with pytest.raises(M.PatchError, match="without a reason"):
        M.patch_text(_mutant("f.py", Edit("    a = 1\n    b = 2\n", "    a = 3\n    b = 4\n"), lines=2), text)
    with pytest.raises(M.PatchError, match="does not compile"):
        M.patch_text(_mutant("f.py", Edit("    a = 1\n", "    a = (\n")), text)


def test_changed_lines_counts_replacements_moves_and_deletions():
    a = "1\n2\n3\n4\n"
    assert M.changed_lines(a, a) == 0
    assert M.changed_lines(a, "1\nX\n3\n4\n") == 1
    assert M.changed_lines(a, "1\n3\n4\n") == 1
    assert M.changed_lines(a, "1\n3\n2\n4\n") == 2


# -- running ----------------------------------------------------------------------------------------------------
def test_schedule_cycles_through_the_commands_then_the_seeds():
    m = Mutant("x", "test", "f.py", (), (("a",), ("b",)), "")
    it = M.schedule(m)
    assert [next(it) for _ in range(5)] == [(("a",), 1), (("b",), 1), (("a",), 2), (("b",), 2), (("a",), 3)]


@pytest.mark.parametrize("rc,out,want", [
    (0, "SUCCESS: oracle clean", "SUCCESS"),
    (1, "FAILURE: oracle: 3 violation(s); first: lost write", "FAILURE"),
    (1, "rcu-torture:--- End of test: FAILURE (17 reads saw Reader Pipe index >= 2", "FAILURE"),
    (1, "FAILURE: vCPU 0 failed: LockdepError('lockdep: tables_lock not held')", "FAILURE"),
    (1, "FAILURE: vCPU 0 failed: NameError(\"name 'x' is not defined\")", "crashed"),
    (1, "WARNs (1):\n  vCPU 1 crashed: AttributeError('x')\nFAILURE: ...", "crashed"),
    # a detector fired first; the vCPU then died on the corrupted state: the verdict stands
    (1, "WARNs (2):\n  WARN vCPU 1: read of poisoned avic_physid_table slot 0\n  vCPU 0 crashed: "
        "IndexError('word index -512')\nFAILURE: vCPU 0 failed: IndexError('word index -512')", "FAILURE"),
    (1, "Traceback (most recent call last):\n  File \"launch.py\"\nIndentationError: x", "crashed"),
    (1, "FAILURE: vCPU 0 failed: ShmError('segment pts_r1_vm does not exist (run gone?)')", "env-error"),
    (2, "error: launch.py: unrecognized arguments", "crashed"),
    (-9, "", "crashed"),
])
def test_outcomes_are_classified(rc, out, want):
    assert M.classify(rc, out) == want


def test_a_crash_is_named_by_its_innermost_frame():
    tb = ("progress\nTraceback (most recent call last):\n  File \"launch.py\", line 3, in <module>\n    main()\n"
          "  File \"vm/avic/oracle.py\", line 121, in final\n    g = u64(x)\n"
          "IndexError: word index -512 out of range\n")
    assert M.crash_reason(tb) == ('IndexError: word index -512 out of range at File "vm/avic/oracle.py", '
                                  'line 121, in final')
    assert M.crash_reason("WARNs\n  vCPU 0 crashed: NameError('x')\nmore") == "crashed: NameError('x')"


def test_a_hang_is_cut_at_the_limit_and_its_process_group_ended(tmp_path):
    # a launch.py that hangs with a child (like a coordinator with its fork server), ignoring SIGTERM
    (tmp_path / "launch.py").write_text(textwrap.dedent("""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open("child.pid", "w").write(str(child.pid))
        time.sleep(600)
    """))
    t0 = time.monotonic()
    r, _ = M.run_command(tmp_path, ("run",), 1, 1.5)
    assert r.outcome == "cut" and r.rc is None
    assert time.monotonic() - t0 < 1.5 + M.TERM_GRACE_S + 6
    child = int((tmp_path / "child.pid").read_text())
    assert not os.path.exists(f"/proc/{child}") or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[-1][:3]


def test_the_copy_runs_its_own_code_not_the_installed_package(tmp_path):
    """The canary: the copy's package __init__ files log the path they were imported from, in the
    launcher and in its fork server (which the vCPUs are forked from)."""
    base = M.make_copy(ROOT, dest=tmp_path / "copy")
    info = M.canary(base)
    assert info["outcome"] == "SUCCESS" and not info["foreign"]
    assert sorted(info["files"]) == ["ipc/__init__.py", "vm/__init__.py"]
    assert info["processes"] >= 2
    # and a mutant in the copy is what that copy runs: the registration bug is found
    m = next(x for x in CATALOGUE if x.name == "refcount-unregister-early")
    M.apply_mutant(base, m)
    r, _ = M.run_command(base, ("scenario", "kaboom"), 1, 60)
    assert r.outcome == "FAILURE", r
    shutil.rmtree(base)


# -- the CI subset ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_fast_subset_is_killed(tmp_path):
    out = tmp_path / "mutants.json"
    r = subprocess.run([sys.executable, "-m", "bench.mutants", "--fast", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=290)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    print(r.stdout[-3000:])
    fast = [m.name for m in CATALOGUE if m.fast]
    assert [x["name"] for x in doc["results"]] == fast
    assert doc["killed"] == doc["mutants"] == len(fast), (doc["survivors"], doc["crashed_mutants"])
    assert r.returncode == 0
    assert all(x["ttf_s"] <= doc["limit_s"] for x in doc["results"])
    assert doc["canary"]["processes"] >= 2 and all(c["outcome"] == "SUCCESS" for c in doc["control"])


# -- PTS_LOCKDEP=0: the oracles behind the lockdep-style asserts ------------------------------------------------
@pytest.mark.timeout(200)
def test_with_lockdep_off_the_poison_oracle_still_catches_what_the_assert_catches_first(tmp_path):
    """rcu-list's track_write without rcu_read_lock: the list walk's RCU_LOCKDEP_WARN fails it at the
    first write; with the asserts switched off (``PTS_LOCKDEP=0``) the poison-on-free oracle does."""
    base = M.make_copy(ROOT, dest=tmp_path / "copy")
    M.apply_mutant(base, next(x for x in CATALOGUE if x.name == "rcu-list-write-without-rcu-read-lock"))
    argv = ("run", "--design", "rcu-list")
    on, _ = M.run_command(base, argv, 1, 60)
    assert on.outcome == "FAILURE" and "LockdepError" in on.reason, on
    off, _ = M.run_command(base, argv, 1, 60, env={"PTS_LOCKDEP": "0"})
    assert off.outcome == "FAILURE" and "poisoned" in off.reason and "Lockdep" not in off.reason, off
    shutil.rmtree(base)
