"""bench.mutants --operators: the generated synchronization mutants (bench/mutants_operators.py) apply
to the tree one site each, keep their ids under unrelated edits, leave instrumentation alone, the
equivalents list cannot go stale silently, and a deadly operator mutant is killed."""

from __future__ import annotations

import difflib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bench import mutants as M
from bench import mutants_operators as ops
from bench import mutants_opsrun as run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def generated():
    return ops.generate(ROOT)


def test_at_least_150_mutants_of_every_operator(generated):
    assert len(generated) >= 150
    assert len({m.name for m in generated}) == len(generated)
    assert {m.mechanism for m in generated} == set(ops.OPERATORS)
    assert {m.file.split("/")[0] for m in generated} == set(ops.SCAN_DIRS)


def test_every_patch_applies_and_changes_one_site(generated):
    ops.check_patches(generated, ROOT)  # exactly once, compiles, the declared line count
    for m in generated:
        (e,) = m.edits
        text = (ROOT / m.file).read_text()
        after = M.patch_text(m, text)
        start = text[:text.index(e.old)].count("\n")
        span = range(start, start + e.old.count("\n") + 1)
        sm = difflib.SequenceMatcher(None, text.splitlines(), after.splitlines(), autojunk=False)
        hunks = [op for op in sm.get_opcodes() if op[0] != "equal"]
        assert hunks and all(i1 in span and i2 - 1 <= span[-1] for _, i1, i2, _, _ in hunks), m.name
        assert hunks[-1][2] - hunks[0][1] <= 1 + m.lines + e.old.count("\n"), m.name  # one contiguous site


def test_ids_are_stable_under_an_unrelated_edit_above_the_site():
    rel = "vm/avic/rcu_list.py"
    text = (ROOT / rel).read_text()
    before = {m.name: m for m in ops.file_mutants(rel, text)}
    i = text.index("\n\n@design")  # a new function and statements above every site
    edited = text[:i] + "\n\n\ndef _unrelated(x):\n    y = x + 1\n    return y\n" + text[i:]
    after = {m.name: m for m in ops.file_mutants(rel, edited)}
    assert before.keys() == after.keys() and len(before) >= 10
    for k in before:
        assert M.patch_text(after[k], edited) != edited


def test_excluded_modules_and_instrumentation_produce_no_mutant(generated):
    files = {m.file for m in generated}
    assert not any(ops.excluded(f) for f in files)
    assert not any(f":{c}." in m.name for m in generated for c in ops.EXCLUDED_CLASSES)  # vm/mirror.py's oracle
    assert not any(f.startswith(("ipc/torture/", "ipc/trace")) or f == "vm/avic/oracle.py" for f in ops.scan_files(ROOT))
    # the rule matters: the torture self-tests do hold sites
    assert ops.file_mutants("ipc/torture/gpbugs.py", (ROOT / "ipc/torture/gpbugs.py").read_text())
    text = ("def f(self, m, b, lk):\n"
            "    lk.lock()\n"
            "    self._stat('track_write')\n"
            "    m.fetch_add(b + T_WRITES, 1)\n"
            "    self._cs_out(CS_TABLES)\n"
            "    lk.unlock()\n"
            "    if self._emit:\n"
            "        m.fetch_add(b + T_REF, 1)\n")
    got = ops.file_mutants("vm/x.py", text)
    assert [m.mechanism for m in got] == ["drop-lock-pair"]


def test_every_operator_on_a_small_function():
    text = ("def f(self, m, w, lk, rcu, r, seq):\n"
            "    lk.lock()\n"
            "    m.store(w, 1)\n"
            "    m.store(w + T_STATE, 2)  # release\n"
            "    lk.unlock()\n"
            "    rcu.read_lock()\n"
            "    x = m.fetch_add(w, 1)\n"
            "    rcu.read_unlock()\n"
            "    _prims.smp_mb()\n"
            "    self.kvm.rcu.synchronize()\n"
            "    while r > 0:\n"
            "        r = m.cmpxchg(w, r, r + 1)\n"
            "    return x < seq\n")
    kinds = sorted({m.mechanism for m in ops.file_mutants("vm/y.py", text)})
    assert kinds == ["cas-to-store", "drop-barrier", "drop-gp-wait", "drop-lock-pair", "drop-read-lock-pair", "off-by-one",
                     "split-rmw", "swap-sync", "unlock-earlier", "weaken-inc-not-zero"]


def test_a_stale_equivalent_entry_fails_check(tmp_path, monkeypatch, generated, capsys):
    good = tmp_path / "equivalent.toml"
    good.write_text(f'[[equivalent]]\nid = "{generated[0].name}"\nwhy = "a test"\n')
    monkeypatch.setattr(run, "EQUIVALENT_TOML", good)
    assert M.main(["--operators", "--check"]) == M.EXIT_OK
    good.write_text(good.read_text() + '\n[[equivalent]]\nid = "drop-barrier@vm/nowhere.py:f:x()"\nwhy = "gone"\n')
    assert M.main(["--operators", "--check"]) == M.EXIT_BAD
    assert "stale" in capsys.readouterr().err


def test_the_shipped_equivalents_are_not_stale(generated):
    eq = run.load_equivalents()
    assert not run.stale_equivalents(generated, eq)
    assert all(len(why) > 20 for why in eq.values())


def test_shard_and_sample_select_a_stable_subset(generated):
    class A:
        only, shard, sample = None, "2/4", None
    assert [m.name for m in run.select(generated, A)] == [m.name for m in generated[1::4]]
    A.shard, A.sample = None, 10
    a, b = run.select(generated, A), run.select(generated, A)
    assert len(a) == 10 and [m.name for m in a] == [m.name for m in b]


@pytest.mark.timeout(120)
def test_a_deadly_operator_mutant_is_killed(tmp_path, generated):
    """A grace period that does not wait at all: rcutorture sees it in its first 1-second run (about 2.5 s
    of wall time on an idle machine; the bound leaves room for a loaded one)."""
    m = next(x for x in generated if x.name == "drop-gp-wait@ipc/rcu.py:RcuDomain.synchronize:self._synchronize(None)")
    base = M.make_copy(ROOT, dest=tmp_path / "copy")
    res = M.run_mutant(replace(m, commands=(("torture", "rcu", "--duration", "1"),)), base, 60.0, on_seed=1)
    shutil.rmtree(base)
    assert res.killed and len(res.runs) == 1 and res.ttf_s < 20, res


def test_each_seed_has_time_for_every_command(generated):
    m = next(x for x in generated if len(x.commands) == 4)
    ctl = {" ".join(c): 10.0 for c in m.commands}
    assert run.budget(m, 30.0, ctl) == 60.0 and run.budget(m, 30.0, {}) == 30.0


@pytest.mark.timeout(300)
def test_an_explore_command_kills_what_the_runs_miss(tmp_path, generated):
    """rcu-list's slow-path get that drops the spare notifier user it took (two vCPUs creating one
    table at once: the runs rarely meet there) is found by the file's explore of L2 switches that
    share tables; the unmutated copy explores bench/scenario-first-users.toml to SUCCESS."""
    m = next(x for x in generated if x.name == "drop-ref@vm/avic/rcu_list.py:RcuListDesign._get_ref:self._notifier_put()")
    share = ops._explore("share", "--design", "rcu-list")
    assert share in m.commands and m.commands[-len(ops.EXPLORES[m.file]):] == ops.EXPLORES[m.file]
    base = M.make_copy(ROOT, dest=tmp_path / "copy")
    ok, _ = M.run_command(base, ("explore", ops.FIRST_USERS, "--schedules", "40", "--design", "rcu-list"), 1, 120)
    assert ok.outcome == "SUCCESS", ok
    res = M.run_mutant(replace(m, commands=(share,)), base, 150.0, on_seed=2)
    shutil.rmtree(base)
    assert res.killed, res


@pytest.mark.timeout(300)
def test_a_write_protect_without_its_tlb_flush_is_found_by_the_track_store_scenario(tmp_path, generated):
    """track_gfn without kvm_flush_remote_tlbs: nothing in a run tracks a page while vCPUs store to it
    (the mirror tracks at setup), the scripted scenario does, and the mirror oracle sees the store
    that landed after the page was copied; the unmutated copy explores it to SUCCESS."""
    m = next(x for x in generated if x.name == "drop-tlb-flush@vm/page_track.py:track_gfn:kvm_flush_remote_tlbs(kvm)")
    cmd = ops._explore(ops.TRACK_STORE)
    assert cmd in m.commands
    base = M.make_copy(ROOT, dest=tmp_path / "copy")
    ok, _ = M.run_command(base, ("explore", ops.TRACK_STORE, "--schedules", "60"), 1, 120)
    assert ok.outcome == "SUCCESS", ok
    res = M.run_mutant(replace(m, commands=(cmd,)), base, 120.0, on_seed=1)
    shutil.rmtree(base)
    assert res.killed and "lost write" in res.runs[0].reason, res


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, scenario, extra", [
    # two vCPUs entering one table: the usecount's lost increment (the final oracle: usecount -1)
    ("split-rmw@vm/avic/guest.py:GuestEntry._enter_guest:m.fetch_add(b+T_USE;1)", ops.THREE_USERS,
     ("--strategy", "random")),
    # free_node publishes POISON before its N_REFS store: a node-refcount node allocated in the slot
    # meanwhile loses its count (the final oracle: N_REFS against the table's refcount)
    ("swap-sync@vm/notifier.py:free_node:mem.store(_w(kvm;node;L.N_REFS);-1)<>mem.store(_w(kvm;node;L.N_STATE);L.NODE_POI",
     ops.FREE_ALLOC, ("--depth", "2")),
])
def test_the_scenarios_for_races_no_run_reaches(tmp_path, generated, name, scenario, extra):
    """Each scenario file reaches a lost update the runs and the older explores did not; the
    unmutated copy explores it to SUCCESS."""
    m = next(x for x in generated if x.name == name)
    cmd = ops._explore(scenario, *extra)
    assert cmd in m.commands
    base = M.make_copy(ROOT, dest=tmp_path / "copy")
    ok, _ = M.run_command(base, ("explore", scenario, "--schedules", "40", *extra), 1, 150)
    assert ok.outcome == "SUCCESS", ok
    res = M.run_mutant(replace(m, commands=(cmd,)), base, 200.0, on_seed=1)
    shutil.rmtree(base)
    assert res.killed and "oracle" in res.runs[0].reason, res
