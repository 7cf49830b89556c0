"""The shape of the package, enforced: no import cycles (lazy imports inside functions included), no module
over ~500 lines and no function over ~120 (docs/architecture.md). Read from the source with ast; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import kdcode

ROOT = Path(kdcode.__file__).parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 120


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """kdcode module -> the kdcode modules it imports, wherever the import statement stands."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                # `from kdcode.pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `import kdcode.train.loop` -> that module
                    t = t.rpartition(".")[0]
                if t.startswith("kdcode") and t in modules and t != name and t != "kdcode":
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    # kdcode.train.distil imports kdcode.train.teacher_cache inside run_distil only
    assert "kdcode.train.teacher_cache" in graph["kdcode.train.distil"]
    assert "kdcode.evaluation.perplexity" in graph["kdcode.train.loop"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_study_is_never_imported_by_what_it_drives():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith(("kdcode.train", "kdcode.evaluation")):
            assert not edges & {"kdcode.study.sweep", "kdcode.study.report"}, name


def test_py150_is_a_pure_string_module():
    assert import_graph()["kdcode.data.py150"] <= {"kdcode.errors"}


def _long_functions() -> list[str]:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    return long


def test_no_module_over_500_lines_and_no_function_over_120():
    big = [f"{n} ({len(p.read_text().splitlines())} lines)" for n, p in _modules().items()
           if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
    assert not _long_functions(), f"functions over {MAX_FUNCTION_LINES} lines: {_long_functions()}"


def test_cli_modules_stay_small():
    for path in (ROOT / "cli").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 250, path.name
