"""The data benchmark (benchmarks/data.py, python -m benchmarks data): its help in process and through the
dispatcher, and a tiny run's table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support import run_command

BENCH = ["-m", "benchmarks", "data"]


def test_bench_data_help_runs_in_process_and_through_the_dispatcher(capsys: pytest.CaptureFixture) -> None:
    from benchmarks import data as bench_data

    with pytest.raises(SystemExit) as info:
        bench_data.main(["--help"])
    assert info.value.code == 0 and "--workers" in capsys.readouterr().out
    dispatched = run_command([sys.executable, *BENCH, "--help"])
    assert dispatched.returncode == 0 and "--train-images-per-s" in dispatched.stdout


@pytest.mark.slow
def test_bench_data_tiny_run_prints_the_table(tmp_path: Path) -> None:
    result = run_command(
        [
            sys.executable,
            *BENCH,
            "--images",
            "8",
            "--width",
            "96",
            "--height",
            "64",
            "--image-size",
            "32",
            "--workers",
            "0,1",
            "--train-images-per-s",
            "1.0",
        ]  # fmt: skip
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("original", "prepared")) and "worker gives" not in line]
    assert len(rows) == 6  # 3 sources x 2 worker counts
    assert "needs at least" in result.stdout and "target with 2 workers >= 5x" in result.stdout
