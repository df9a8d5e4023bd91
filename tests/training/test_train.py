"""train.py / training/loop.py: Hydra-composed runs, TensorBoard contents, resume equality, bad inputs, NaN stop.

Small on purpose (64 px, base width 8, one residual block, a few steps, the "random" loss network except where
the real VGG-19 weights matter).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from core.errors import FaststyleError
from models.loss import PerceptualLoss
from models.modelfile import load_model
from models.transformer import TransformerNet
from tests.support import CONTENT, REPO, SMALL, STYLE, compose_train, read_events, scalar_values
from training.checkpoint import load_checkpoint
from training.loop import NonFiniteLossError, RunOutputs, RunRecord, TrainOptions, fit
from training.run import train as run_training


def test_train_through_hydra_writes_model_checkpoints_and_tensorboard(tmp_path: Path) -> None:
    cfg = compose_train(SMALL)
    model_path = run_training(cfg, run_dir=tmp_path)

    assert model_path == tmp_path / "model.pth"
    model, meta = load_model(model_path)
    assert model.config()["base_width"] == 8
    assert meta["style"] == STYLE.name and meta["steps"] == 4
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"step_0000002.pt", "step_0000004.pt", "last.pt"}
    last = load_checkpoint(tmp_path)
    assert last["step"] == 4 and last["config"]["train"]["steps"] == 4
    assert last["data"] == {"seed": 0, "batch_size": 2, "world_size": 1, "dataset_size": 4}

    events = read_events(tmp_path)
    style_layers = list(cfg.loss.style_layers)
    expected = {"loss/total", "loss/content", "loss/style", "loss/tv", "lr", "perf/images_per_s"}
    expected |= {f"loss/style/{layer}" for layer in style_layers}
    assert expected <= set(events.Tags()["scalars"])
    assert sorted(scalar_values(events, "loss/total")) == [1, 2, 3, 4]
    assert set(events.Tags()["images"]) == {"style", "val/content_stylized"}
    grids = events.Images("val/content_stylized")
    assert [g.step for g in grids] == [2, 4]
    # Two validation photos, one row each, content | stylized: 2 columns of 64 px plus 2 px padding.
    assert (grids[0].width, grids[0].height) == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2))
    assert len(events.Images("style")) == 1
    # The hparams summary lives in this run's event file, with the final losses as its metrics.
    assert "_hparams_/experiment" in events.summary_metadata
    assert "final/loss_total" in events.Tags()["scalars"]


def test_resume_continues_with_the_same_losses_and_weights(tmp_path: Path) -> None:
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    run_training(compose_train(SMALL), run_dir=full_dir)
    checkpoint = full_dir / "checkpoints" / "step_0000002.pt"
    # The resumed run decodes in 2 worker processes: batches depend on (seed, step) only, not on the workers.
    run_training(compose_train([*SMALL, f"train.resume={checkpoint}", "data.num_workers=2"]), run_dir=resumed_dir)

    full = scalar_values(read_events(full_dir), "loss/total")
    resumed = scalar_values(read_events(resumed_dir), "loss/total")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)
    full_model, _ = load_model(full_dir / "model.pth")
    resumed_model, _ = load_model(resumed_dir / "model.pth")
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    run_training(compose_train([*SMALL, "train.steps=2"]), run_dir=tmp_path / "a")
    with pytest.raises(FaststyleError, match="same model"):
        run_training(
            compose_train([*SMALL, "model.base_width=16", f"train.resume={tmp_path / 'a'}"]), run_dir=tmp_path / "b"
        )


@pytest.mark.slow
def test_loss_decreases_with_real_vgg19_weights(tmp_path: Path) -> None:
    """30 steps on one fixed batch with the default loss config (real VGG-19 weights): the total must fall."""
    cfg = compose_train([])
    torch.manual_seed(0)
    model = TransformerNet(**{**OmegaConf.to_container(cfg.model), "base_width": 8, "residual_blocks": 1})
    loss_fn = PerceptualLoss(**OmegaConf.to_container(cfg.loss))
    from data.io import load_image, pil_to_tensor, resize_short_side

    style = pil_to_tensor(resize_short_side(load_image(STYLE), 64)).unsqueeze(0)
    loss_fn.set_style(style)
    photos = torch.stack(
        [
            pil_to_tensor(resize_short_side(load_image(CONTENT / name), 64).crop((0, 0, 64, 64)))
            for name in ("chelsea.jpg", "coffee.jpg")
        ]
    )
    options = TrainOptions(
        steps=30, lr=float(cfg.train.lr), log_interval_steps=1, image_interval_steps=30, checkpoint_interval_steps=30
    )
    outputs = RunOutputs(tmp_path, options.steps, 0)
    fit(
        model,
        loss_fn,
        itertools.repeat(photos),
        options,
        torch.device("cpu"),
        outputs,
        RunRecord(style, photos, hparams={"lr": options.lr}),
    )
    outputs.close()
    losses = scalar_values(read_events(tmp_path), "loss/total")
    first, last = losses[1], sum(losses[s] for s in range(26, 31)) / 5
    assert last < 0.7 * first, f"loss went from {first:.4g} to {last:.4g} over 30 steps"


class _NaNAfter(torch.nn.Module):
    """Wraps a PerceptualLoss and returns NaN losses from call ``bad_call`` on (a diverging run, on demand)."""

    def __init__(self, loss: torch.nn.Module, bad_call: int) -> None:
        super().__init__()
        self.loss, self.bad_call, self.calls = loss, bad_call, 0

    def forward(self, output: torch.Tensor, content: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        losses = self.loss(output, content)
        if self.calls >= self.bad_call:
            losses = {name: value * float("nan") for name, value in losses.items()}
        return losses


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TransformerNet(base_width=8, residual_blocks=1)
    loss = PerceptualLoss("random", ["relu2_2"], {"relu1_2": 1.0}, 1.0, 1.0, 0.0)
    photos = torch.rand(2, 3, 32, 32)
    loss.set_style(photos[:1])
    options = TrainOptions(steps=6, log_interval_steps=4, image_interval_steps=100, checkpoint_interval_steps=2)
    outputs = RunOutputs(tmp_path, options.steps, 0)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan between steps 5 and 6.*checkpoints/last\.pt"):
        fit(
            model,
            _NaNAfter(loss, bad_call=5),
            itertools.repeat(photos),
            options,
            torch.device("cpu"),
            outputs,
            RunRecord(photos[:1], photos),
        )
    outputs.close()
    last = load_checkpoint(tmp_path)
    assert last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pth").exists()


def test_missing_style_image_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(FaststyleError, match="image not found"):
        run_training(compose_train([*SMALL, f"style={tmp_path / 'nope.jpg'}"]), run_dir=tmp_path)


def test_empty_data_folder_fails_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FaststyleError, match="no images"):
        run_training(compose_train([*SMALL, f"data.root={empty}"]), run_dir=tmp_path / "run")


def test_unknown_override_is_rejected_by_hydra() -> None:
    with pytest.raises(ConfigCompositionException, match="lr_rate"):
        compose_train([*SMALL, "train.lr_rate=0.1"])


def test_corrupt_image_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(CONTENT / name, photos / name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with caplog.at_level(logging.WARNING):
        model_path = run_training(
            compose_train([*SMALL, f"data.root={photos}", "train.steps=2", "style_size=null"]), run_dir=tmp_path / "run"
        )
    assert model_path.is_file()
    assert any("broken.jpg" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
def test_cli_reports_user_errors_in_one_line(tmp_path: Path) -> None:
    """The entry point itself: a user mistake prints ``error: ...`` (no traceback) and exits with status 2."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "train.py", f"style={tmp_path / 'missing.jpg'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: image not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_lr_schedules_are_pure_functions_of_the_step() -> None:
    from training.loop import lr_factor

    constant = TrainOptions(steps=100)
    assert [lr_factor(s, constant) for s in (1, 50, 100)] == [1.0, 1.0, 1.0]
    cosine = TrainOptions(steps=110, lr_schedule="cosine", lr_warmup_steps=10)
    assert lr_factor(5, cosine) == pytest.approx(0.5)  # linear warm-up
    assert lr_factor(10, cosine) == pytest.approx(1.0)
    assert lr_factor(60, cosine) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(110, cosine) == pytest.approx(0.0, abs=1e-12)
    linear = TrainOptions(steps=100, lr_schedule="linear")
    assert lr_factor(50, linear) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=fp16", "needs a CUDA device"),
        ("train.lr_schedule=step", "lr_schedule"),
        ("train.steps=0", "the minimum is 1"),
        ("device=tpu", "unknown device"),
        ("model.norm=layer", "not one of instance, batch, none"),
    ],
)
def test_bad_train_values_fail_with_one_line(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(FaststyleError, match=message):
        run_training(compose_train([*SMALL, override]), run_dir=tmp_path)
