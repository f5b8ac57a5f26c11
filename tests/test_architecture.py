"""The package's shape: imports run one way (no cycle between modules, nor between its folders
and top-level files), no file over ~400 lines, no function over ~60 but the ones named here."""

import ast
import subprocess
import sys
from pathlib import Path

import bonetumor

PACKAGE = Path(bonetumor.__file__).parent
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer, and why.
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, at the top or inside functions."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def _room(module: str) -> str:
    """The folder (or top-level file) a module lives in: ``bonetumor.data.readers`` -> ``data``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_imports_itself_through_others():
    assert _cycle(_graph()) is None


def test_no_folder_or_top_level_file_imports_itself_through_others():
    rooms: dict[str, set[str]] = {}
    for module, imported in _graph().items():
        rooms.setdefault(_room(module), set()).update(_room(m) for m in imported if _room(m) != _room(module))
    assert _cycle(rooms) is None


def test_a_cycle_is_found_where_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_file_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_function_is_over_60_lines_but_the_named_ones():
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}:{node.name}"] = n
    assert set(long) == set(LONG_FUNCTIONS), long


def test_importing_the_package_leaves_plotting_and_the_audit_to_the_commands_that_use_them():
    """Every command imports the package and the CLI; matplotlib (about 30 MB), scikit-learn's
    neighbours and YAML load only in the functions that draw, audit or read and write YAML."""
    code = ("import sys, bonetumor, bonetumor.cli, bonetumor.predict; "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('matplotlib', 'sklearn.neighbors', 'yaml'))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_api_names_are_the_functions_whatever_was_imported_first():
    import subprocess
    import sys

    code = ("import bonetumor.evaluate.metrics, bonetumor.predict, inspect\n"
            "from bonetumor import evaluate, predict, fit, TrainConfig\n"
            "print(all(inspect.isfunction(f) for f in (evaluate, predict, fit)), inspect.isclass(TrainConfig))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["True", "True"], r.stderr[-500:]
