"""The import graph of the corruptcheck package has no cycles (data flows one way: cases ->
engines -> differ -> localize -> results -> reports; golden is storage).

Static (ast): module-level imports must form no cycle at all; imports inside functions (lazy
imports) count as dependencies too, and every cycle they close is listed in ALLOWED_LAZY_CYCLES
with its reason. A new cycle of either kind fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import corruptcheck
import corruptcheck.reference

ROOT = Path(corruptcheck.__file__).resolve().parent
# the package and the subpackage kept outside it (pyproject's package-dir)
PACKAGES = {"corruptcheck": ROOT, "corruptcheck.reference": Path(corruptcheck.reference.__file__).resolve().parent}

# cycles closed only through a function-level import: (sorted modules of the cycle) -> reason
ALLOWED_LAZY_CYCLES: dict[tuple, str] = {}


def _module_name(path: Path, root: Path, package: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(target: str, modules: set) -> str | None:
    """The package module an imported name lives in (longest known prefix)."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def import_graph(packages: dict) -> tuple[dict, dict]:
    """({module: modules it imports at module level}, {module: modules it imports in functions})
    over {package name: its directory}."""
    files = {_module_name(p, root, package): p for package, root in packages.items() for p in root.rglob("*.py")}
    modules = set(files)
    top: dict = {m: set() for m in modules}
    lazy: dict = {m: set() for m in modules}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _imports(tree):
            for target in _targets(node, base):
                dep = _resolve(target, modules)
                if dep and dep != mod and not mod.startswith(dep + "."):  # a package's own __init__ is not a cycle
                    (lazy if in_function else top)[mod].add(dep)
    return top, lazy


def _imports(tree):
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)
    yield from walk(tree, False)


def _targets(node, base: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
        prefix = f"{anchor}.{node.module}" if node.module else anchor
    else:
        prefix = node.module or ""
    # `from pkg import sub` imports the submodule pkg.sub when there is one
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def cycles(graph: dict) -> list[tuple]:
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _union(a: dict, b: dict) -> dict:
    return {m: a.get(m, set()) | b.get(m, set()) for m in set(a) | set(b)}


def test_no_module_level_cycle():
    top, _ = import_graph(PACKAGES)
    assert cycles(top) == []


def test_function_level_cycles_are_the_allowed_ones():
    top, lazy = import_graph(PACKAGES)
    assert {c: ALLOWED_LAZY_CYCLES.get(c, "NOT ALLOWED") for c in cycles(_union(top, lazy))} == ALLOWED_LAZY_CYCLES


# the floors of the house (docs/design.md §2): a module imports only from its own floor or below
FLOORS = [
    ("ground", {"errors", "finite", "points", "verdicts", "schedule", "weights", "cases", "reference", "policies"}),
    ("storage", {"storage"}),
    ("engines", {"engines", "faults"}),
    ("judging", {"judge"}),
    ("reports", {"reports", "history"}),
    ("compare", {"compare"}),
    ("doors", {"api", "gate", "release", "selftest"}),
    ("front", {"pytest_plugin", "cli", "__main__"}),
]


def floor_of(module: str) -> int:
    """The floor of a package module: by its wing (the first name under corruptcheck)."""
    parts = module.split(".")
    wing = parts[1] if len(parts) > 1 else ""
    for i, (_, wings) in enumerate(FLOORS):
        if wing in wings:
            return i
    raise AssertionError(f"{module} is on no floor: add its wing to FLOORS and to docs/design.md §2")


def upward_imports(top: dict, lazy: dict) -> list[tuple]:
    return sorted((m, d) for m, deps in _union(top, lazy).items() for d in deps
                  if m != "corruptcheck" and floor_of(d) > floor_of(m))


def test_every_module_is_on_a_floor():
    top, _ = import_graph(PACKAGES)
    for module in top:
        if module != "corruptcheck":
            floor_of(module)


def test_no_import_climbs_a_floor():
    top, lazy = import_graph(PACKAGES)
    assert upward_imports(top, lazy) == []


def test_a_planted_upward_import_is_found():
    top = {"corruptcheck.judge.differ": {"corruptcheck.compare"}, "corruptcheck.compare": set()}
    assert upward_imports(top, {}) == [("corruptcheck.judge.differ", "corruptcheck.compare")]


def test_top_level_listing_is_the_design():
    """`ls corruptcheck/` shows the floors: the ground floor's modules, the wings, the doors."""
    listed = {p.stem for p in ROOT.iterdir() if (p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__"))}
    expected = set().union(*(w for _, w in FLOORS)) - {"reference"} | {"__init__"}
    assert listed == expected


def test_graph_sees_the_package():
    top, lazy = import_graph(PACKAGES)
    assert "corruptcheck.judge.differ" in top["corruptcheck.compare"]
    assert "corruptcheck.reference" in top["corruptcheck.compare"] or any(
        m.startswith("corruptcheck.reference") for m in top["corruptcheck.compare"])


def _package(tmp_path: Path, files: dict) -> Path:
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / f"{name}.py").write_text(text)
    return root


def test_planted_module_level_cycle_is_found(tmp_path):
    root = _package(tmp_path, {"a": "from pkg.b import x\n", "b": "from . import c\nx = 1\n",
                               "c": "import pkg.a\n", "d": "from pkg import a\n"})
    top, lazy = import_graph({"pkg": root})
    assert cycles(top) == [("pkg.a", "pkg.b", "pkg.c")]
    assert cycles(_union(top, lazy)) == [("pkg.a", "pkg.b", "pkg.c")]


def test_planted_lazy_cycle_is_found_separately(tmp_path):
    root = _package(tmp_path, {"a": "import pkg.b\n",
                               "b": "def f():\n    from pkg.a import y\n    return y\n"})
    top, lazy = import_graph({"pkg": root})
    assert cycles(top) == []
    assert cycles(_union(top, lazy)) == [("pkg.a", "pkg.b")]
