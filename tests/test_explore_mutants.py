"""bench.explore_mutants: the targets of a mutant are read from its patch (the functions it changes)
and from the correct code's function coverage per scenario, mechanically."""

from __future__ import annotations

import textwrap

from bench import explore_mutants as E
from bench.mutants_catalogue import CATALOGUE, Edit, Mutant

SRC = textwrap.dedent('''\
    class Pool:
        def sync(self, t):
            a = 1
            b = 2
            return a + b

        def put(self, t):
            def inner():
                return 3
            return inner()


    def top():
        return 0
''')


def _mutant(*edits: Edit) -> Mutant:
    return Mutant("m", "test", "vm/x.py", tuple(edits), (("run", "--design", "rcu-list"),), "a test")


def _root(tmp_path):
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "x.py").write_text(SRC)
    return tmp_path


def test_changed_functions_are_the_innermost_around_the_changed_lines(tmp_path):
    root = _root(tmp_path)
    # a replacement with context lines around it: the method, not the class or the module
    m = _mutant(Edit("        a = 1\n        b = 2\n", "        a = 1\n        b = 3\n"))
    assert E.changed_functions(m, root) == ["vm/x.py:Pool.sync"]
    # a nested function, as co_qualname names it
    m = _mutant(Edit("            return 3\n", "            return 4\n"))
    assert E.changed_functions(m, root) == ["vm/x.py:Pool.put.<locals>.inner"]
    # an insertion before unchanged lines: the function it goes into; two edits, two functions
    m = _mutant(Edit("        b = 2\n", "        pass\n        b = 2\n"), Edit("    return 0\n", "    return 1\n"))
    assert E.changed_functions(m, root) == ["vm/x.py:Pool.sync", "vm/x.py:top"]


def test_every_vm_mutant_names_a_function_of_its_file():
    for m in E.selected():
        fns = E.changed_functions(m)
        assert fns and all(f.startswith(m.file + ":") and not f.endswith("<module>") for f in fns), m.name


def test_targets_are_the_candidates_that_run_a_changed_function(monkeypatch):
    m = next(x for x in CATALOGUE if x.name == "rcu-list-get-without-inc-not-zero")
    fn = E.changed_functions(m)[0]
    runs = {("share", "rcu-list", None), ("flood-drop", "rcu-list", None)}
    monkeypatch.setattr(E, "covered", lambda t: frozenset({fn} if t in runs else {"vm/other.py:f"}))
    assert set(E.targets(m)) == runs
    assert E.candidates(m) == [(s, "rcu-list", None) for s in E.SCENARIOS]
    # nobody runs it: every candidate is kept
    monkeypatch.setattr(E, "covered", lambda t: frozenset())
    assert E.targets(m) == E.candidates(m)
