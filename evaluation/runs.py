"""Training runs and their labels: a run folder (``.hydra/config.yaml`` + ``model.pth``, ``tb/`` for the curves)
read back with its config (paths made absolute as training resolved them), its network ready to run
(inference.network), a label per run from what differs between the runs' configs, and the scalars of its
TensorBoard events."""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from core.errors import FaststyleError

if TYPE_CHECKING:
    import torch

    from inference.network import StyleNetwork

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One training run: its directory, display name, config (paths made absolute), and the trained network (a
    multi-style one in its first style: ``network.with_style`` gives the others)."""

    path: Path
    name: str
    cfg: Any  # omegaconf DictConfig whose PATH_KEYS are absolute, as training resolved them
    saved: dict[str, object]  # the saved config flattened to dotted keys, values as written: what labels compare
    network: StyleNetwork  # fp32, eval mode, on the device
    label_parts: list[str] = field(default_factory=list)  # "key=value" per config difference, or the run's name

    @property
    def model(self) -> nn.Module:
        """The network module (fp32, eval mode, on the device)."""
        return self.network.net

    @property
    def meta(self) -> dict:
        return self.network.meta

    @property
    def styles(self) -> int:
        """How many styles the run's model.pth holds."""
        return len(self.network.style_names)

    @property
    def label(self) -> str:
        return ", ".join(self.label_parts)

    @property
    def has_batch_norm(self) -> bool:
        from training.distributed import has_batch_norm

        return has_batch_norm(self.model)


def _natural_key(path: Path) -> list[object]:
    """Sort key that puts multirun job ``2-x`` before ``10-x`` (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _config_files(path: Path) -> list[Path]:
    """``.hydra/config.yaml`` of the run at ``path``, or of every run below it."""
    own = path / ".hydra" / "config.yaml"
    if own.is_file():
        return [own]
    if path.is_dir():
        return sorted(p for p in path.rglob("config.yaml") if p.parent.name == ".hydra")
    return []


def find_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run directories (``.hydra/config.yaml`` + ``model.pth``) at or anywhere below each of ``paths``, in sweep
    order (job numbers compared as numbers).

    A run dir whose training has not finished (no ``model.pth``) is an error rather than silently skipped: a
    comparison that quietly drops one side is worse than none.
    """
    found: dict[Path, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FaststyleError(f"{path} does not exist: pass a multirun dir or run dirs made by train.py")
        configs = _config_files(path)
        if not configs:
            raise FaststyleError(f"no training run under {path}: expected <run>/.hydra/config.yaml from train.py")
        for config in configs:
            run_dir = config.parent.parent
            if not (run_dir / "model.pth").is_file():
                raise FaststyleError(
                    f"{run_dir} has no model.pth: its training did not finish (finish or resume it, or leave it out)"
                )
            found.setdefault(run_dir.resolve(), run_dir)
    return sorted(found.values(), key=_natural_key)


def _launch_dir(run_dir: Path) -> Path:
    """The directory train.py was started from (Hydra's runtime.cwd): relative paths in the config are relative
    to it. Falls back to the current directory when the run has no ``.hydra/hydra.yaml``."""
    from omegaconf import OmegaConf

    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd", default=None)
        if cwd:
            return Path(str(cwd))
    return Path.cwd()


def resolve_path(value: str | os.PathLike, launch_dir: Path) -> Path:
    """``value`` as an absolute path: user home expanded, relative paths taken from the run's launch dir."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else launch_dir / path


PATH_KEYS = ("style", "data.root", "loss.weights_path", "train.resume")
"""Config keys holding paths: relative to the launch dir in a saved config, made absolute before use."""


def absolute_paths(cfg: Any, launch_dir: Path) -> Any:
    """A copy of ``cfg`` whose path keys are absolute (``training.run`` resolves them against the current dir)."""
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value not in (None, "", "???"):
            OmegaConf.update(cfg, key, str(resolve_path(str(value), launch_dir)), merge=False)
    return cfg


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings as one mapping of dotted keys (``{"model": {"norm": "batch"}}`` -> ``{"model.norm": ...}``).
    Lists and empty mappings are leaves."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def load_model_network(
    path: str | os.PathLike,
    *,
    style: str | int | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    channels_last: bool | str = False,
    style_option: str | None = None,
) -> StyleNetwork:
    """A model file's network ready to run (inference.network), where one style option serves several files: a
    multi-style file is folded to ``style``, or without one to its first style (or, with ``style_option``, refused
    with one line naming that option); a one-style file ignores ``style``. fp32 and NCHW by default: the
    reports measure the network as trained."""
    from inference.network import load_style_model

    model = load_style_model(path, device=device, precision=precision, channels_last=channels_last)
    if model.num_styles > 1 and style is None:
        if style_option is not None:
            names = ", ".join(model.style_names)
            raise FaststyleError(
                f"{model.path} holds {model.num_styles} styles: pick one with {style_option} ({names})"
            )
        style = 0
    return model.network(style if model.num_styles > 1 else None)


def load_run(run_dir: Path, name: str, device: torch.device) -> Run:
    """Load a run's ``.hydra/config.yaml`` and ``model.pth`` (fp32, eval mode, on ``device``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_file = run_dir / ".hydra" / "config.yaml"
    try:
        saved = OmegaConf.load(config_file)
        flat = flatten(OmegaConf.to_container(saved, resolve=True))
    except Exception as err:  # omegaconf/yaml raise many types; any of them means the file is unusable
        raise FaststyleError(f"cannot read {config_file}: {err}") from err
    try:
        cfg = absolute_paths(saved, _launch_dir(run_dir))
    except OmegaConfBaseException as err:
        raise FaststyleError(f"{config_file} is not a faststyle training config ({err})") from err
    network = load_model_network(run_dir / "model.pth", device=device)
    return Run(path=run_dir, name=name, cfg=cfg, saved=flat, network=network)


def format_value(value: object) -> str:
    """A config value as Hydra's override syntax writes it (``null``, ``true``, ``0.5``, ``[a, b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


_UNSET = "<unset>"


def differing_keys(configs: Sequence[dict[str, object]]) -> list[str]:
    """Dotted keys whose value is not the same in every config, in the order the configs list them."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if len({format_value(c.get(key, _UNSET)) for c in configs}) > 1]


def config_labels(configs: Sequence[dict[str, object]], names: Sequence[str], max_keys: int = 3) -> list[list[str]]:
    """One label per run, as its parts: ``key=value`` for every key that differs between the flattened ``configs``
    (at most ``max_keys``), or the run's name where the configs do not tell the runs apart."""
    keys = differing_keys(configs)
    if not keys:
        return [[name] for name in names]
    labels = []
    for config in configs:
        parts = [f"{key}={format_value(config.get(key, _UNSET))}" for key in keys[:max_keys]]
        if len(keys) > max_keys:
            parts.append(f"+{len(keys) - max_keys} more")
        labels.append(parts)
    if len({tuple(parts) for parts in labels}) < len(labels):  # the shown keys alone do not tell some runs apart
        labels = [[*parts, f"({name})"] for parts, name in zip(labels, names, strict=True)]
    return labels


def default_out_dir(run_dirs: Sequence[Path], inputs: Sequence[Path]) -> Path:
    """The single directory the user named, else the run dirs' deepest common parent."""
    if len(inputs) == 1 and inputs[0].is_dir():
        return inputs[0]
    return Path(os.path.commonpath([str(p.resolve()) for p in run_dirs]))


def load_runs(run_dirs: Sequence[Path], out: Path, device: torch.device) -> list[Run]:
    """Every run, named by its path relative to ``out`` and labelled by its config differences."""
    runs = [load_run(p, os.path.relpath(p.resolve(), out.resolve()), device) for p in run_dirs]
    several = [run.path for run in runs if run.styles > 1]
    if several:
        raise FaststyleError(
            f"{several[0]} is a multi-style run: compare it with its one-style runs by "
            "python -m evaluation compare_styles"
        )
    labels = config_labels([r.saved for r in runs], [r.name for r in runs])
    for run, parts in zip(runs, labels, strict=True):
        run.label_parts = parts
    log.info("runs: %s", ", ".join(f"{r.name} ({r.label})" for r in runs))
    return runs


def config_value(run: Run, key: str) -> object:
    """``key`` of the run's config; FaststyleError when it is missing (not a config made by train.py)."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(run.cfg, key, default=None)
    if value is None or value == "???":
        raise FaststyleError(f"{run.path}: .hydra/config.yaml has no {key} (was it made by faststyle's train.py?)")
    return value


def shared_style(runs: Sequence[Run]) -> Path:
    """The one style image every run was trained on (the figure has one style column)."""
    styles = {Path(str(config_value(r, "style"))).resolve() for r in runs}
    if len(styles) != 1:
        raise FaststyleError(
            f"the runs were trained on different styles ({', '.join(map(str, sorted(styles)))}): "
            "compare runs of one style"
        )
    return styles.pop()


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in a TensorBoard log dir: tag -> [(step, value)] sorted by step.

    A step logged twice (a resumed run re-logs the steps after its last checkpoint) keeps the value written last.
    """
    from tensorboard.backend.event_processing import event_accumulator

    if not tb_dir.is_dir():
        raise FaststyleError(f"no TensorBoard events in {tb_dir}: was the run made by train.py?")
    # size_guidance 0 = keep every point (the default keeps a random sample of 10000 per tag).
    accumulator = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {}
        for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
            by_step[int(event.step)] = float(event.value)
        series[tag] = sorted(by_step.items())
    return series
