"""training/checkpoint.py: training checkpoints round-trip (optimizer and random state, through a weights-only
file), a run dir resolves to its last checkpoint, and a failed write keeps the previous file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import FaststyleError
from tests.support import tiny_net
from training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    open_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_checkpoint_round_trip_and_resume_lookup(tmp_path: Path) -> None:
    net = tiny_net().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(1, 3, 16, 16)).mean().backward()
    optimizer.step()
    state = {
        "step": 7,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": {"train": {"lr": 1e-3, "betas": [0.9, 0.999]}},
        "rng": capture_rng_state(),
    }
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "last.pt", state)
    assert open_checkpoint(run_dir)[0] == run_dir / "checkpoints" / "last.pt"
    loaded = load_checkpoint(run_dir)  # a run dir resolves to its last checkpoint
    assert loaded["step"] == 7 and loaded["format"] == "faststyle-checkpoint"
    fresh = torch.optim.Adam(tiny_net().parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(FaststyleError, match="no checkpoint"):
        open_checkpoint(tmp_path)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
