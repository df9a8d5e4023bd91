"""The package layout of docs/architecture.md holds: imports point down the layers only, models/ never sees Hydra,
and nothing edits sys.path. Read from the source (every import statement, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO

ALLOWED = {
    "core": {"core"},
    "configs": {"configs", "core"},
    "models": {"models", "core"},
    "data": {"data", "core"},
    "interop": {"interop", "models", "data", "core"},
    "training": {"training", "models", "data", "configs", "core"},
    "inference": {"inference", "interop", "models", "data", "configs", "core"},
    # The three folders on top never import each other: users' tools, evaluation reports and benchmarks.
    "scripts": {"scripts", "inference", "training", "interop", "models", "data", "configs", "core"},
    "evaluation": {"evaluation", "inference", "training", "interop", "models", "data", "configs", "core"},
    "benchmarks": {"benchmarks", "inference", "training", "interop", "models", "data", "configs", "core"},
}
"""Which of our packages each package may import (docs/architecture.md, "Packages"). The entry points train.py and
stylize.py sit on top and may import any package but the three top folders."""
OURS = {*ALLOWED, "train", "stylize"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_only(package: str) -> None:
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in _sources(package)
        for name in _imports(path) & OURS - ALLOWED[package]
    }
    assert not wrong, sorted(wrong)


def test_models_never_import_hydra() -> None:
    wrong = [str(path.relative_to(REPO)) for path in _sources("models") if _imports(path) & {"hydra", "omegaconf"}]
    assert not wrong, f"models/ takes plain arguments, never a config: {wrong}"


def test_no_code_edits_sys_path() -> None:
    files = [*REPO.glob("*.py"), *(path for package in ALLOWED for path in _sources(package))]
    wrong = [
        str(path.relative_to(REPO))
        for path in files
        if "sys.path.insert" in path.read_text() or "sys.path.append" in path.read_text()
    ]
    assert not wrong, f"run scripts as python -m scripts.NAME instead: {wrong}"


def test_the_import_reader_sees_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from training.loop import fit\n    import models.norm\n")
    assert _imports(source) == {"os", "training", "models"}


def _code_files() -> list[Path]:
    """Every non-test source file of ours (Python and the C++ kernels), outside the virtual environment and runs."""
    skip = {"tests", ".venv", "outputs", "multirun", ".git"}
    return [
        path
        for pattern in ("*.py", "*.cpp")
        for path in REPO.rglob(pattern)
        if not skip & set(path.relative_to(REPO).parts)
    ]


def test_no_top_level_folder_holds_more_than_a_fifth_of_the_code() -> None:
    """A folder that grows past a fifth of the code has become a drawer of several concerns: split it."""
    lines: dict[str, int] = {}
    for path in _code_files():
        parts = path.relative_to(REPO).parts
        folder = parts[0] if len(parts) > 1 else "."
        lines[folder] = lines.get(folder, 0) + len(path.read_text().splitlines())
    total = sum(lines.values())
    too_big = {folder: f"{count / total:.0%}" for folder, count in lines.items() if count > 0.2 * total}
    assert not too_big, f"of {total} lines: {too_big}"


def _long_functions_without_reason(path: Path, limit: int = 60) -> list[str]:
    """Functions whose body (after the docstring) is over ``limit`` lines and whose docstring or opening comment
    does not say why with the word ``long``."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        docstring = ast.get_docstring(node) or ""
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
        start = first.end_lineno + 1 if has_doc else first.lineno
        if node.end_lineno - start + 1 <= limit:
            continue
        opening = " ".join(lines[node.lineno - 1 : start + 2])  # the signature down to the first statements
        if "long" not in docstring.lower() and "# long" not in opening.lower():
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)")
    return found


def test_long_functions_say_why() -> None:
    long = [found for path in _code_files() if path.suffix == ".py" for found in _long_functions_without_reason(path)]
    assert not long, f"split these, or say in their docstring or first comment why they are long: {long}"


def test_the_length_check_can_fail(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    (tmp_path / "m.py").write_text(f'def f():\n    """Short."""\n{body}\n\ndef g():\n    # Long: a table.\n{body}')
    global REPO
    repo, REPO = REPO, tmp_path
    try:
        assert [line.split()[1] for line in _long_functions_without_reason(tmp_path / "m.py")] == ["f"]
    finally:
        REPO = repo


def test_every_package_is_installed() -> None:
    """pyproject.toml lists every package folder, so `python -m scripts.NAME` / `evaluation` / `benchmarks` work from
    any folder after `make test`'s editable install (a package missing there imports only from the repository)."""
    import re

    # tomllib is Python 3.11+ and the project supports 3.10: the one-line list is read with a pattern.
    line = re.search(r"^packages = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    listed = {name.strip().strip('"') for name in line.split(",")}
    folders = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in REPO.rglob("__init__.py")
        if not {"tests", ".venv", "outputs", ".git"} & set(init.relative_to(REPO).parts)
    }
    assert folders <= listed, f"add to pyproject.toml's packages: {sorted(folders - listed)}"


def test_no_test_file_imports_another() -> None:
    """Shared test code lives in tests/support.py (functions) and tests/conftest.py (fixtures)."""
    wrong = []
    for path in (REPO / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [module or ""]
            if any(name.split(".")[-1].startswith("test_") for name in names):
                wrong.append(str(path.relative_to(REPO)))
    assert not wrong, wrong
