"""The package layout of docs/architecture.md holds: imports point down the layers only, models/ never sees Hydra,
and nothing edits sys.path. Read from the source (every import statement, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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
