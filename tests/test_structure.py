"""The shape the code keeps (README, style guide): short files and functions, and scripts that are not libraries.

Read with ``ast``, so a file is measured as written: a function's length runs from its ``def`` line to its last
line (docstring included, decorators not), and an import counts wherever it stands (function-local too).
"""
import ast

from conftest import REPO

MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
LIBRARIES = ("nanotorl", "kernels", "sandbox")
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
