"""training/rundir.py: claiming a run folder never returns a taken one."""

from __future__ import annotations

from pathlib import Path

from training.rundir import claim_fresh_dir


def test_claim_fresh_dir_never_returns_a_taken_folder(tmp_path: Path) -> None:
    first = claim_fresh_dir(tmp_path / "run")
    second = claim_fresh_dir(tmp_path / "run")
    third = claim_fresh_dir(tmp_path / "run")
    assert [p.name for p in (first, second, third)] == ["run", "run-2", "run-3"]
