"""The package's shape: no import circles (function-level imports included), every module imports
on its own, the maths modules need no Ray, the pipeline reads as a short sequence of stages and
no function runs past a screenful."""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "elrea_ray"
MATHS = ("projection", "clustering", "routing", "stacked", "merging")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str) -> set[str]:
    """The elrea_ray modules `module` imports anywhere in its body (module or function level)."""
    path = MODULES[module]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import elrea_ray.x.y` -> the deepest module that exists
                name = name.rpartition(".")[0]
            if name and name != module and name != "elrea_ray":
                out.add(name)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path a -> ... -> a (one per strongly connected component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One concrete circle through the component's first module (breadth-first, so the shortest)."""
    start = min(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & comp):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return sorted(comp)


def test_cycle_finder_names_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = {m: imports_of(m) for m in MODULES}
    cycles = find_cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def _import_alone(module: str) -> tuple[str, str | None, bool]:
    code = f"import sys, {module}; print('ray' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return module, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}", False
    return module, None, p.stdout.strip().endswith("True")


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, tuple[str | None, bool]]:
    """{module: (error or None, whether importing it loaded ray)}, each in a fresh interpreter."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {m: (err, ray) for m, err, ray in pool.map(_import_alone, sorted(MODULES))}


def test_every_module_imports_on_its_own(imported_alone):
    failed = {m: err for m, (err, _) in imported_alone.items() if err}
    assert not failed, failed


def test_maths_modules_import_no_ray(imported_alone):
    for name in MATHS:
        assert "import ray" not in (PACKAGE / f"{name}.py").read_text(), name
    loaded = [m for m in MATHS if imported_alone[f"elrea_ray.{m}"][1]]
    assert not loaded, f"importing {loaded} loads ray"


def test_pipeline_reads_as_a_short_sequence_of_stages():
    assert len((PACKAGE / "pipeline.py").read_text().splitlines()) <= 200
    stage_modules = {m for m in MODULES if m.startswith("elrea_ray.stages.")} - {"elrea_ray.stages.common"}
    for m in stage_modules:
        tree = ast.parse(MODULES[m].read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), f"{m} has no run(ctx)"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over %d lines: %s" % (MAX_FUNCTION_LINES, ", ".join(long))


def test_public_stage_functions_are_typed():
    """Every public function of a stage module names the types of its arguments and result."""
    untyped = []
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                args = [a.arg for a in node.args.args + node.args.kwonlyargs if a.annotation is None]
                if args or node.returns is None:
                    untyped.append(f"{path.name}:{node.name} (untyped: {args or 'result'})")
    assert not untyped, ", ".join(untyped)
