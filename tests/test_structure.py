"""The shape the code keeps (README, style guide): short files and functions, and scripts that are not libraries.

Read with ``ast``, so a file is measured as written: a function's length runs from its ``def`` line to its last
line (docstring included, decorators not), and an import counts wherever it stands (function-local too).
"""
import ast

from conftest import REPO

MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
LIBRARIES = ("nanotorl",)   # nanotorl/kernels and nanotorl/sandbox included
SCRIPTS = ("train.py", "eval.py")
NOT_LIBRARIES = {"train", "eval", "bench"}   # the two scripts and the benchmarks


def checked_files():
    return [p for d in LIBRARIES for p in sorted((REPO / d).rglob("*.py"))] + [REPO / s for s in SCRIPTS]


def imported_packages(path) -> set[str]:
    """The top-level names of every absolute import in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_files_and_functions_stay_short():
    long = []
    for path in checked_files():
        text = path.read_text()
        where = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_FILE_LINES:
            long.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{where}:{node.lineno} {node.name}(): {lines} lines")
    assert not long, (f"over {MAX_FILE_LINES} lines per file or {MAX_FUNCTION_LINES} per function: {long}; split "
                      f"them along their ideas")


def test_no_script_or_benchmark_is_imported_as_a_library():
    found = []
    for path in checked_files():
        own = {path.stem} if path.name in SCRIPTS else set()
        bad = (imported_packages(path) & NOT_LIBRARIES) - own
        found += [f"{path.relative_to(REPO)} imports {name}" for name in sorted(bad)]
    assert not found, (f"{found}: library code and the scripts must not import train, eval or bench; move what they "
                       f"share into nanotorl/")


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, modules: set[str]) -> set[str]:
    """The project's modules that ``path`` imports, wherever the import stands: ``from a.b import c`` is ``a.b.c``
    when that is a module, else ``a.b``; ``import a.b`` is ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found & modules


def test_no_import_cycles():
    files = {module_name(p): p for p in checked_files()}
    graph = {m: imported_modules(p, set(files)) - {m} for m, p in files.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}; move what both sides need into a module of its own"
