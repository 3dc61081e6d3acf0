"""The shape of the tree (shared/DESIGN.md "Layers"): one-way imports, no circle, small files.

Arrows go launch -> lab -> vm, vcpu -> ipc, and vcpu -> vm; never back. Checked on every import
statement of the package, module level and function level alike (a lazy import is still an arrow):
- no import circle between modules;
- nothing imports launch.py; ipc/ imports none of vm/, vcpu/, lab/; vm/ imports neither vcpu/ nor
  lab/; vcpu/ does not import lab/;
- the nested AVIC wing (vm/avic/) is imported by the composition roots only: nothing else in vm/
  imports it (the wing hands its region's size to the VM through ``region_layouts``);
- no .py file over 600 lines, no class over 300 lines (the C extension is exempt);
- every package of the tree is shipped (pyproject.toml ``packages``), so ``pip install .`` has it.

The checkers are plain functions over a {module: {imported modules}} graph, so the self-tests at the
bottom feed them a broken graph and see them complain.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ipc", "vm", "vcpu", "lab", "bench")
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 300

# (importer layer, imported layer) pairs that must never occur
FORBIDDEN = {
    ("ipc", "vm"), ("ipc", "vcpu"), ("ipc", "lab"),
    ("vm", "vcpu"), ("vm", "lab"),
    ("vcpu", "lab"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    files = [ROOT / "launch.py"]
    for pkg in PACKAGES:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return files


@functools.cache
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    """One parse per file version for the whole session (four checks walk the same tree)."""
    return ast.parse(path.read_text(), str(path))


def parse(path: Path) -> ast.Module:
    return _parse(path, path.stat().st_mtime_ns)


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """{module: modules of this project it imports}; ``from X import Y`` counts as an import of the
    module X.Y when that is a module of ours, else of X."""
    mods = {_module_name(f): f for f in files}
    ours = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(parse(path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    targets.append(sub if sub in ours else base)
            for t in targets:
                # the longest prefix of t that is one of our modules
                parts = t.split(".")
                while parts and ".".join(parts) not in ours:
                    parts.pop()
                if parts and ".".join(parts) != mod:
                    graph[mod].add(".".join(parts))
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(mod: str) -> str:
    return mod.split(".")[0]


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, dsts in sorted(graph.items()):
        for dst in sorted(dsts):
            if dst == "launch":
                bad.append(f"{src} imports launch.py (nothing may)")
            elif (layer(src), layer(dst)) in FORBIDDEN:
                bad.append(f"{src} imports {dst} ({layer(src)}/ -> {layer(dst)}/ is backwards)")
    return bad


WING = "vm.avic"


def wing_edges(graph: dict[str, set[str]]) -> list[str]:
    """Modules of vm/ outside the wing that import it (the wing registers itself; vm/ never reaches in)."""
    inside = lambda m: m == WING or m.startswith(WING + ".")  # noqa: E731
    return [f"{src} imports {dst} (only the composition roots import the wing)"
            for src, dsts in sorted(graph.items()) if layer(src) == "vm" and not inside(src)
            for dst in sorted(dsts) if inside(dst)]


def unshipped(root: Path, shipped: list[str]) -> list[str]:
    """Package directories (with an __init__.py) of PACKAGES that pyproject.toml does not ship."""
    have = {".".join(d.relative_to(root).parts) for pkg in PACKAGES for d in [root / pkg, *(root / pkg).rglob("*")]
            if d.is_dir() and (d / "__init__.py").exists()}
    return sorted(have - set(shipped) - {"bench"})  # bench/ runs from a checkout, never installed


@functools.cache
def project_graph() -> dict[str, set[str]]:
    """The tree's graph, built once per session (the checks below only read it)."""
    return import_graph(source_files())


def oversized(files: list[Path]) -> list[str]:
    bad = []
    for f in files:
        text = f.read_text()
        n = text.count("\n")
        if n > MAX_FILE_LINES:
            bad.append(f"{f.relative_to(ROOT)}: {n} lines > {MAX_FILE_LINES}")
        for node in ast.walk(parse(f)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    bad.append(f"{f.relative_to(ROOT)}: class {node.name} is {size} lines > {MAX_CLASS_LINES}")
    return bad


# -- the tree ---------------------------------------------------------------------------------------

def test_graph_sees_the_packages():
    g = project_graph()
    # a graph that missed the imports would pass every rule below: make sure it sees real arrows
    assert "vm.avic.base" in g and "vm.nested" in g["vm.avic.base"]
    assert "ipc.rcu" in g["vm.layout"]
    assert "lab.compare" in g and "ipc.torture" in g


def test_no_import_circle():
    assert find_cycles(project_graph()) == []


def test_arrows_point_one_way():
    assert forbidden_edges(project_graph()) == []


def test_nothing_in_vm_reaches_into_the_wing():
    assert wing_edges(project_graph()) == []


def _shipped() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_is_shipped():
    assert unshipped(ROOT, _shipped()) == []


def test_files_and_classes_are_small():
    files = source_files() + sorted((ROOT / "tests").rglob("*.py"))
    assert oversized(files) == []


# -- the checkers can fail ---------------------------------------------------------------------------

def test_cycle_checker_finds_a_circle():
    g = {"vm.avic": {"vm.nested"}, "vm.nested": {"vm.layout", "vm.avic"}, "vm.layout": set()}
    assert find_cycles(g) == [["vm.avic", "vm.nested"]]


def test_layer_checker_finds_backward_arrows():
    g = {"ipc.rcu": {"vm.layout"}, "vm.coordinator": {"lab.report", "vcpu.worker"}, "lab.compare": {"launch"},
         "vm.kvm": {"ipc.shm"}}
    bad = forbidden_edges(g)
    assert len(bad) == 4 and not any("vm.kvm" in b for b in bad)


def test_wing_checker_finds_vm_reaching_in_and_allows_the_roots():
    g = {"vm.config": {"vm.avic.table"}, "vm.avic.base": {"vm.avic.table", "vm.nested"},
         "vcpu.worker": {"vm.avic"}, "lab.schedrun": {"vm.avic"}, "vm.avic": {"vm.avic.base"}}
    assert wing_edges(g) == ["vm.config imports vm.avic.table (only the composition roots import the wing)"]


def test_shipping_checker_finds_a_missing_subpackage():
    assert unshipped(ROOT, [p for p in _shipped() if p != "ipc.sched"]) == ["ipc.sched"]


def test_import_graph_reads_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "vm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from vm import b\n")
    (pkg / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    g = import_graph(sorted(pkg.glob("*.py")))
    assert g["vm.a"] == {"vm.b"} and g["vm.b"] == {"vm.a"}
    assert find_cycles(g) == [["vm.a", "vm.b"]]


def test_size_checker_finds_big_files_and_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    f = tmp_path / "big.py"
    f.write_text("class A:\n" + "    x = 1\n" * 400 + "y = 2\n" * 300)
    bad = oversized([f])
    assert len(bad) == 2 and "class A" in bad[1]
