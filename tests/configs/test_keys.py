"""Every config key a user can set stays: ``train.py --cfg job`` and ``stylize.py --cfg job`` print the composed
configs, and each key listed here must still be in them (a key may be added; removing or renaming one breaks
users' commands, sweeps and saved configs, so it must be a deliberate change of this list)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.support import REPO

TRAIN_KEYS = {
    "seed",
    "style",
    "style_size",
    "device",
    "data.root",
    "data.image_size",
    "data.num_workers",
    "data.val_images",
    "model.norm",
    "model.base_width",
    "model.residual_blocks",
    "model.upsample",
    "model.output",
    "loss.network",
    "loss.weights_path",
    "loss.content_layers",
    "loss.style_layers",
    "loss.content_weight",
    "loss.style_weight",
    "loss.tv_weight",
    "loss.temporal_weight",
    "loss.temporal_shift_px",
    "loss.temporal_rotation_deg",
    "loss.temporal_zoom",
    "loss.temporal_noise_std",
    "loss.temporal_local_px",
    "loss.temporal_regions",
    "loss.temporal_light",
    "train.steps",
    "train.batch_size",
    "train.lr",
    "train.betas",
    "train.lr_schedule",
    "train.lr_warmup_steps",
    "train.log_interval_steps",
    "train.image_interval_steps",
    "train.checkpoint_interval_steps",
    "train.resume",
    "train.precision",
    "train.channels_last",
    "train.compile",
    "train.malloc_reuse",
}
STYLIZE_KEYS = {
    "model",
    "input",
    "output",
    "recursive",
    "suffix",
    "format",
    "overwrite",
    "jpeg_quality",
    "video_crf",
    "style",
    "style_end",
    "device",
    "precision",
    "onnx_pixel_range",
    "channels_last",
    "batch_size",
    "max_memory_mb",
    "tmp_dir",
    "malloc_reuse",
    "io_threads",
    "max_side_px",
    "scale",
    "preserve_color",
    "strength",
}
VALUE_MAPPINGS = {"loss.style_layers"}
"""Keys whose value is a mapping of data (layer name -> weight), not further options."""


def _keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value and key not in VALUE_MAPPINGS:
            keys |= _keys(value, f"{key}.")
        else:
            keys.add(key)
    return keys


def _job_config(script: str) -> dict:
    result = subprocess.run(
        [sys.executable, script, "--cfg", "job"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize(("script", "expected"), [("train.py", TRAIN_KEYS), ("stylize.py", STYLIZE_KEYS)])
def test_no_config_key_disappears(script: str, expected: set[str]) -> None:
    keys = _keys(_job_config(script))
    missing = sorted(expected - keys)
    assert not missing, f"{script} --cfg job lost config keys {missing}: users' overrides with them now fail"


def test_the_key_walk_sees_a_removed_key() -> None:
    config = {"train": {"steps": 1, "lr": 0.1}, "loss": {"style_layers": {"relu1_2": 1.0}}}
    assert _keys(config) == {"train.steps", "train.lr", "loss.style_layers"}
    del config["train"]["lr"]
    assert "train.lr" in TRAIN_KEYS - _keys(config)
