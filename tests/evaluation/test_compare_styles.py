"""The compare_styles report (evaluation/reports/compare_styles.py) on tiny real runs: a 2-style run, its two
one-style runs and an added style."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.reports import compare_styles as cs
from tests.support import REPO, compose_train, save_hydra_files

pytestmark = pytest.mark.usefixtures("one_thread")

STYLES = REPO / "data" / "samples" / "styles"
TINY = [
    "experiment=multistyle_demo",
    "loss.network=random",
    "model.base_width=4",
    "model.residual_blocks=1",
    "style_size=64",
    "data.image_size=32",
    "data.val_images=0",
    "train.steps=4",
    "train.batch_size=2",
    "train.log_interval_steps=2",
    "train.checkpoint_interval_steps=4",
    "device=cpu",
]


def _run(run_dir: Path, *overrides: str) -> Path:
    from training.run import train as run_training

    cfg = compose_train([*TINY, *overrides])
    run_training(cfg, run_dir=run_dir)
    save_hydra_files(run_dir, cfg, REPO)
    return run_dir


def test_compare_styles_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    a, b, c = (STYLES / f"{name}.jpg" for name in ("hokusai_great_wave", "arcimboldo_spring", "leonardo_mona_lisa"))
    multi = _run(tmp_path / "multi", f"style=[{a},{b}]")
    singles = [_run(tmp_path / p.stem, f"style={p}", "train.steps=2") for p in (a, b)]
    added = _run(tmp_path / "added", f"style={c}", f"train.extend={multi / 'model.pth'}")
    alone = _run(tmp_path / "alone", f"style={c}")
    out = tmp_path / "table.md"
    argv = [str(multi), *map(str, singles), "--max-images", "1", "--size", "48", "--out", str(out)]
    assert cs.main([*argv, "--added", str(added), "--alone", str(alone), "--speed", "--reps", "1"]) == 0
    text = out.read_text()
    assert "| hokusai_great_wave |" in text and "| arcimboldo_spring |" in text
    assert "2 styles" in text and "2 one-style networks" in text
    assert "Added style `added`: its training loss/total" in text and "Stylize speed, 1920x1080" in text
    assert text == capsys.readouterr().out
    # a one-style run given as the multi-style one is refused with one line
    with pytest.raises(SystemExit) as stop:
        cs.main([str(singles[0]), str(singles[1])])
    assert stop.value.code == 2
    assert "not a multi-style run" in capsys.readouterr().err
