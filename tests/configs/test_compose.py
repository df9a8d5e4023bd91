"""Every config group option and every experiment composes into a config train.py accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import train  # noqa: F401  (registers the style_stem resolver that hydra.run.dir uses)
from configs.schema import check_against_schema, check_stylize_config, check_train_config
from core.errors import FaststyleError
from tests.support import REPO, compose_train
from training.loop import TrainOptions
from training.run import train as run_training

CONFIGS = REPO / "configs"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _check_train_block(cfg) -> None:
    check_train_config(cfg)  # every key is in configs/schema.py and every value fits it
    train_block = OmegaConf.to_container(cfg.train, resolve=True)
    options = TrainOptions.from_config(train_block)
    options.validate()
    assert cfg.train.batch_size >= 1


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_train([f"experiment={experiment}"])
    _check_train_block(cfg)
    assert set(cfg) >= {"model", "loss", "data", "train", "style", "style_size", "seed", "device"}


@pytest.mark.parametrize("group", ["model", "loss", "data"])
def test_every_group_option_composes(group: str) -> None:
    options = _options(group)
    assert options, f"configs/{group}/ is empty"
    for option in options:
        cfg = compose_train([f"{group}={option}"])
        _check_train_block(cfg)
        assert cfg[group] is not None


def test_defaults_are_the_embedded_demo_and_paths_exist() -> None:
    cfg = compose_train([])
    assert (REPO / cfg.data.root).is_dir()
    assert (REPO / cfg.style).is_file()
    assert cfg.train.lr_schedule == "none"


def test_coco_requires_a_root_with_a_clear_message(tmp_path: Path) -> None:
    cfg = compose_train(["data=coco"])
    assert OmegaConf.is_missing(cfg.data, "root")
    with pytest.raises(FaststyleError, match="data.root is required"):
        run_training(cfg, run_dir=tmp_path)
    cfg = compose_train(["data=coco", "data.root=some/folder"])
    assert cfg.data.root == "some/folder"


def test_unknown_override_is_hydras_error() -> None:
    with pytest.raises(ConfigCompositionException, match="stepz"):
        compose_train(["train.stepz=3"])


def test_run_dir_has_date_time_and_style_and_never_chdirs() -> None:
    cfg = compose_train(["style='some/where/My Painting!.jpg'"], return_hydra_config=True)
    assert cfg.hydra.job.chdir is False
    run_dir = Path(cfg.hydra.run.dir)
    assert run_dir.parts[:2] == ("outputs", "train")
    assert run_dir.name.endswith("-MyPainting")
    assert cfg.hydra.sweep.dir.startswith("multirun/train/")


def test_schema_refuses_with_one_line() -> None:
    from dataclasses import dataclass, field

    @dataclass
    class Schema:
        a: int = field(metadata={"min": 1})
        b: str

    cases = [
        ({"a": 1, "b": "x", "extra": 2}, "unknown option extra: the top-level options are a, b"),
        ({"a": "abc", "b": "x"}, "a=abc must be an integer"),
        ({"a": True, "b": "x"}, "a=true must be an integer"),
        ({"a": 1.5, "b": "x"}, "a=1.5 must be an integer"),
        ({"a": 0, "b": "x"}, "a=0 is too small: the minimum is 1"),
        ({"a": 1, "b": None}, "b=null is not allowed"),
        ({"a": 1}, "option b is missing"),
    ]
    for node, message in cases:
        with pytest.raises(FaststyleError) as info:
            check_against_schema(node, Schema)
        assert str(info.value).startswith(message), (node, str(info.value))
    check_against_schema({"a": 1, "b": 2024}, Schema)  # Hydra reads `b=2024` as a number: still a text value


def test_the_stylize_defaults_fit_the_schema() -> None:
    from stylize import compose_config

    check_stylize_config(compose_config(["model=m.pth", "input=x.jpg"]))
