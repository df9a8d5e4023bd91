"""Training with the stability term (models/temporal.py, loss.temporal_*): bad settings refused before
training, the term logged and added to the total, absent at weight 0, and a resumed run draws the same warps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from core.errors import FaststyleError
from tests.support import SMALL, compose_train, read_events, scalar_values
from training.run import train as run_training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "override, message",
    [("loss.temporal_weight=-1", "temporal_weight"), ("loss.temporal_zoom=0.9", "temporal_zoom")],
)
def test_bad_settings_are_refused_before_training(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(FaststyleError, match=message):
        run_training(compose_train([*SMALL, override]), run_dir=tmp_path)


def test_training_with_the_term_logs_it_and_adds_it_to_the_total(tmp_path: Path) -> None:
    run_training(compose_train([*SMALL, "loss.temporal_weight=10", "train.steps=2"]), run_dir=tmp_path)
    events = read_events(tmp_path)
    temporal = scalar_values(events, "loss/temporal")
    assert sorted(temporal) == [1, 2] and all(math.isfinite(v) and v > 0 for v in temporal.values())
    parts = ("content", "style", "tv", "temporal")
    values = {part: scalar_values(events, f"loss/{part}") for part in (*parts, "total")}
    for step in (1, 2):
        assert values["total"][step] == pytest.approx(sum(values[p][step] for p in parts), rel=1e-5)


def test_training_without_the_term_has_no_temporal_loss(tmp_path: Path) -> None:
    run_training(compose_train([*SMALL, "train.steps=1"]), run_dir=tmp_path)
    assert "loss/temporal" not in read_events(tmp_path).Tags()["scalars"]


def test_resume_with_the_term_draws_the_same_warps(tmp_path: Path) -> None:
    overrides = [*SMALL, "loss.temporal_weight=10"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    run_training(compose_train(overrides), run_dir=full_dir)
    checkpoint = full_dir / "checkpoints" / "step_0000002.pt"
    run_training(compose_train([*overrides, f"train.resume={checkpoint}"]), run_dir=resumed_dir)
    full, resumed = (scalar_values(read_events(d), "loss/temporal") for d in (full_dir, resumed_dir))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)
