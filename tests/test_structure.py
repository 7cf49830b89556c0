"""The shape of the package, enforced (docs/architecture.md, "Rules the tests keep"): which package may import which,
no import cycles, imports at the head of each module but the few kept inside functions on purpose (LAZY_IMPORTS,
CLI_LAZY), no module over ~500 lines, no function over ~120. Read from the source with ast; nothing is imported,
except by the test that runs `import kdcode.cli` in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kdcode

ROOT = Path(kdcode.__file__).parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 120
MAX_CLI_MODULE_LINES = 250

# The only imports that may stand inside a function (docs/architecture.md, "Lazy imports", says the same):
# heavy or optional third-party packages that only some commands need. A submodule of one counts as it.
LAZY_IMPORTS = {
    "datasets": "hub datasets only; heavy (pyarrow, pandas)",
    "gguf": "optional extra [gguf]: GGUF teachers and export",
    "llama_cpp": "optional extra [llamacpp]: the llama.cpp backend",
    "onnx": "optional extra [onnx]: ONNX export",
    "onnxruntime": "optional extra [onnx]: the ONNX Runtime backend, int8 ONNX export",
    "matplotlib": "optional extra [plots]: pareto.png",
    "fastapi": "optional extra [serve]: kdcode serve",
    "uvicorn": "optional extra [serve]: kdcode serve",
    "torch.utils.tensorboard": "needs the tensorboard package, which kdcode does not install (--tensorboard)",
    "resource": "standard library on Unix only",
}
# The CLI's commands import the library inside their functions, so that `kdcode --help` (and a typo's error) imports
# neither torch nor transformers: ~0.3 s instead of ~4 s on one CPU thread. A module the CLI imports at start anyway
# is imported at the head of the file.
CLI_LAZY = "kdcode.cli"
# Function-level imports of kdcode's own that must stay where they are, with the reason.
LAZY_SHIMS = {
    ("kdcode.models", "kdcode.models.load"): "kdcode.models.load_model, the import model cards and manifests name, "
                                             "resolved on first use so that kdcode.models.* does not import the loader",
}
# `import kdcode.cli` must not import these (tested in a fresh interpreter).
NOT_AT_CLI_START = ("torch", "transformers", "datasets")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, with whether it runs inside a function (False: when the module is
    imported; imports under ``if TYPE_CHECKING:`` are left out, they never run)."""
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def _targets(name: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The modules an import statement names: kdcode modules resolved (``from kdcode.pkg import sub`` is the
    submodule when there is one), anything else as written."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            pkg = name.split(".") if is_pkg else name.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([node.module] if node.module else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    resolved = []
    for t in targets:
        if t.split(".")[0] == "kdcode":
            while t and t not in modules:  # `import kdcode.train.loop` -> that module
                t = t.rpartition(".")[0]
        resolved.append(t)
    return resolved


def import_table() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, inside a function, line) for every import statement of every kdcode module."""
    modules = _modules()
    rows = []
    for name, path in modules.items():
        for node, lazy in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for t in _targets(name, path.name == "__init__.py", node, modules):
                rows.append((name, t, lazy, node.lineno))
    return rows


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    """kdcode module -> the kdcode modules it imports (``lazy``: function-level imports included)."""
    graph: dict[str, set[str]] = {name: set() for name in _modules()}
    for name, target, inside, _ in import_table():
        if target in graph and target not in (name, "kdcode") and (lazy or not inside):
            graph[name].add(target)
    return graph


def import_time_graph() -> dict[str, set[str]]:
    """What runs when a module is imported: its module-level imports and, for each, the packages above it (their
    ``__init__`` runs first), the importer's own packages left out (they are already being imported)."""
    graph = import_graph(lazy=False)
    return {
        name: {".".join(t.split(".")[:i]) for t in edges for i in range(2, t.count(".") + 2)
               if ".".join(t.split(".")[:i]) in graph and not name.startswith(".".join(t.split(".")[:i]) + ".")
               and ".".join(t.split(".")[:i]) != name}
        for name, edges in graph.items()
    }


def reachable(graph: dict[str, set[str]], starts: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        for w in graph.get(stack.pop(), ()):
            if w not in seen:
                seen.add(w)
                stack.append(w)
    return seen


def package(name: str) -> list[str]:
    """The modules of a package (or the one module of that name)."""
    return [m for m in _modules() if m == name or m.startswith(name + ".")]


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


# ------------------------------------------------------------------------------------------ the checker itself
def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports_and_parent_packages():
    graph = import_graph()
    assert "kdcode.train.distil" in graph["kdcode.cli.train"]  # inside a command's function only
    assert "kdcode.train.distil" not in import_graph(lazy=False)["kdcode.cli.train"]
    assert "kdcode.evaluation.perplexity" in graph["kdcode.train.loop"]
    # importing kdcode.models.artifacts runs kdcode/models/__init__.py first
    assert "kdcode.models" in import_time_graph()["kdcode.train.distil"]
    assert "kdcode.models" not in import_graph()["kdcode.train.distil"]
    lazy = {(a, b) for a, b, inside, _ in import_table() if inside}
    assert ("kdcode.export.gguf_file", "gguf") in lazy and ("kdcode.models", "kdcode.models.load") in lazy


# ------------------------------------------------------------------------------------------ cycles
def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycles_when_modules_are_imported():
    cycles = find_cycles(import_time_graph())
    assert not cycles, "cycles through a package's __init__: " + "; ".join(" <-> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------------ layers
def _reaching(pkg: str, forbidden: tuple[str, ...]) -> list[str]:
    """The forbidden modules ``pkg`` reaches, directly or through what it imports (lazy imports included)."""
    return sorted(m for m in reachable(import_graph(), package(pkg)) if m.startswith(forbidden))


def test_inference_never_imports_evaluation_training_or_the_study():
    bad = _reaching("kdcode.inference", ("kdcode.evaluation", "kdcode.train", "kdcode.study", "kdcode.cli"))
    assert not bad, f"kdcode.inference reaches {bad}"


def test_strategies_import_no_data_models_disk_or_cli():
    allowed = ("kdcode.strategies", "kdcode.errors", "kdcode.registry", "kdcode.inits.base")
    bad = [m for m in reachable(import_graph(), package("kdcode.strategies")) if not m.startswith(allowed)]
    assert not bad, f"kdcode.strategies reaches {sorted(bad)}"
    disk_modules = {"os", "pathlib", "shutil", "tempfile", "io", "glob", "json", "pickle", "safetensors"}
    disk_calls = {"open", "save", "load", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink"}
    for name in package("kdcode.strategies"):
        tree = ast.parse(_modules()[name].read_text(encoding="utf-8"))
        imported = {t.split(".")[0] for node, _ in _imports(tree) for t in _targets(name, False, node, _modules())}
        assert not imported & disk_modules, f"{name} imports {imported & disk_modules}"
        calls = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
                 for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert not calls & disk_calls, f"{name} calls {calls & disk_calls}"


def test_the_study_and_the_cli_are_imported_only_from_above():
    for name, edges in import_graph().items():
        if not name.startswith(("kdcode.study", "kdcode.cli", "kdcode.__main__")):
            assert not {e for e in edges if e.startswith(("kdcode.study", "kdcode.cli"))}, name
        if not name.startswith(("kdcode.cli", "kdcode.__main__")):
            assert not {e for e in edges if e.startswith("kdcode.cli")}, name


def test_py150_is_a_pure_string_module():
    assert import_graph()["kdcode.data.py150"] <= {"kdcode.errors"}


# ------------------------------------------------------------------------------------------ imports at the head
def _lazy_allowed(importer: str, target: str, cli_start: set[str]) -> bool:
    if any(target == name or target.startswith(name + ".") for name in LAZY_IMPORTS):
        return True
    if (importer, target) in LAZY_SHIMS:
        return True
    in_cli = importer == CLI_LAZY or importer.startswith(CLI_LAZY + ".")
    return in_cli and target.split(".")[0] == "kdcode" and target not in cli_start


def test_imports_stand_at_the_head_of_each_module_but_the_listed_ones():
    cli_start = reachable(import_time_graph(), package(CLI_LAZY)) | set(package(CLI_LAZY))
    bad = [f"{importer}:{line} imports {target} inside a function"
           for importer, target, inside, line in import_table()
           if inside and not _lazy_allowed(importer, target, cli_start)]
    assert not bad, "move these to the top of the module, or list them in LAZY_IMPORTS with the reason:\n" + "\n".join(
        bad)


def test_every_listed_lazy_import_is_used():
    lazy = {target for _, target, inside, _ in import_table() if inside}
    unused = [name for name in LAZY_IMPORTS if not any(t == name or t.startswith(name + ".") for t in lazy)]
    assert not unused, f"LAZY_IMPORTS lists what no function imports: {unused}"


def test_the_cli_starts_without_torch():
    code = f"import sys, kdcode.cli; print(sorted(set({NOT_AT_CLI_START!r}) & set(sys.modules)))"
    env_path = str(ROOT.parent)
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); {code}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import kdcode.cli imports {r.stdout.strip()}"


# ------------------------------------------------------------------------------------------ sizes
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
        assert len(path.read_text().splitlines()) <= MAX_CLI_MODULE_LINES, path.name
