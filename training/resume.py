"""What a resumed run takes from its checkpoint (``train.resume``), and what the command line may still change.

A checkpoint holds the run's resolved config. Resuming continues *that* run: its style, data, network and loss come
from the checkpoint, whatever the defaults or the command line's other options would give, so that
``python train.py train.resume=RUN`` alone continues the run as it was trained (and not, say, on the embedded demo
photos because ``data.root`` was not repeated). The options fall into three kinds:

- **learned** (:data:`LEARNED`): what the network learns: the style, the photos, their crop size, the loss. A
  different value on the command line is refused with one line naming the keys, unless ``train.resume_override=true``
  asks for it (fine-tuning the run's weights towards a new target). The network's shape (``model.*``) and
  ``train.extend`` can never change: the saved weights and optimizer state fit nothing else (:data:`FIXED`).
- **plan** (:data:`PLAN`): how long and how it trains: steps, learning rate and schedule, batch, seed, log and
  checkpoint intervals. Taken from the checkpoint unless the command line sets them (``train.steps=`` extends a
  run, a lower ``train.lr`` calms one that diverged).
- everything else describes this machine (``device``, ``train.precision``, ``data.num_workers``, ...) and comes from
  the command line and the defaults, as for a new run.

"Set on the command line" means typed directly (``style=...``) or changed from the defaults by a group
(``experiment=demo``); train.py works that out before Hydra starts (:func:`set_keys`). Without that information
(a config composed in a test or a script) every option counts as set.

No torch here: train.py's command-line check imports this module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.errors import FaststyleError

log = logging.getLogger(__name__)

GROUPS = ("model", "loss", "data", "train")
"""Config groups whose direct children are options of their own (``model.base_width``); other keys are top-level."""
FIXED = ("model.", "train.extend")
LEARNED = (*FIXED, "style", "style_size", "data.root", "data.image_size", "loss.")
PLAN = (
    "seed",
    "train.steps",
    "train.batch_size",
    "train.lr",
    "train.betas",
    "train.lr_schedule",
    "train.lr_warmup_steps",
    "train.log_interval_steps",
    "train.image_interval_steps",
    "train.checkpoint_interval_steps",
    "data.val_images",
)
PATH_KEYS = ("style", "data.root", "loss.weights_path", "train.extend", "train.resume")
"""Options holding user paths: compared (and stored in checkpoints) as absolute paths."""


def _is(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == prefix or (prefix.endswith(".") and key.startswith(prefix)) for prefix in prefixes)


def leaves(node: dict) -> dict[str, Any]:
    """A plain config as ``{"style": ..., "model.base_width": ..., "loss.style_layers": {...}, ...}``: the
    granularity at which options are typed and compared (a layer table or a list is one option)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update({f"{key}.{child}": item for child, item in value.items()})
        elif key != "hydra":
            flat[key] = value
    return flat


def set_keys(typed: Iterable[str], composed: dict, defaults: dict) -> set[str]:
    """The options a command line sets: the keys typed (``typed``, e.g. ``model.base_width``) and every option
    whose composed value differs from the defaults' (what ``experiment=...`` or ``loss=vgg16`` change)."""
    mine, base = leaves(composed), leaves(defaults)
    keys = {key for key in typed if key in mine}
    keys |= {key for key, value in mine.items() if base.get(key, object()) != value}
    return keys


def absolute_paths(value: Any) -> Any:
    """A path option's value (one path, a list of paths, or None/"") with each path made absolute."""
    from core.cli import absolute_user_path

    if value is None or value == "" or value == "???":
        return value
    if isinstance(value, list | tuple):
        return [str(absolute_user_path(str(item))) for item in value]
    return str(absolute_user_path(str(value)))


def _comparable(key: str, value: Any) -> Any:
    if _is(key, PATH_KEYS):
        value = absolute_paths(value)
        return [os.path.realpath(v) for v in value] if isinstance(value, list) else value and os.path.realpath(value)
    return value


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_show(item) for item in value) + "]"
    if isinstance(value, str) and os.sep in value:
        return Path(value).name or value
    return str(value)


def resumed_config(
    cfg: DictConfig, checkpoint: dict, keys_set: set[str] | None, source: Path
) -> tuple[DictConfig, list[str]]:
    """``cfg`` with the run's own options from ``checkpoint`` (see the module docstring), and the learned options
    the command line changed (only with ``train.resume_override=true``; otherwise FaststyleError, as for any change
    of ``model.*`` or ``train.extend``). ``keys_set``: the options the command line set (None: all of them);
    ``source``: the ``train.resume`` path, for messages."""
    saved_config = checkpoint.get("config")
    if not isinstance(saved_config, dict):
        log.warning("%s holds no config (an older faststyle): the run's options are taken as given", source)
        return cfg, []
    saved = leaves(saved_config)
    if "style_path" in checkpoint:  # absolute, also in checkpoints whose config kept the path as typed
        saved["style"] = checkpoint["style_path"]
    current = OmegaConf.to_container(cfg, resolve=True)
    mine = leaves(current)
    changed: list[tuple[str, Any, Any]] = []
    taken: list[str] = []
    fixed: dict[str, str] = {}
    for key, value in saved.items():
        if key not in mine or not _is(key, (*LEARNED, *PLAN)):
            continue
        if keys_set is not None and key not in keys_set:
            if _comparable(key, mine[key]) != _comparable(key, value):
                taken.append(key)
            mine[key] = value
        elif _is(key, LEARNED) and _comparable(key, mine[key]) != _comparable(key, value):
            if _is(key, FIXED):
                fixed[key] = f"{key}={_show(value)} (given: {_show(mine[key])})"
            else:
                changed.append((key, value, mine[key]))
    _refuse_changes(source, saved, mine, fixed, changed, bool(cfg.train.get("resume_override", False)))
    news = [f"{key}={_show(given)} (the run's: {_show(value)})" for key, value, given in changed]
    if news:
        log.warning("train.resume_override: training %s on with %s", source, "; ".join(news))
    if taken:
        log.info("resuming %s with its own %s", source, ", ".join(f"{key}={_show(mine[key])}" for key in taken))
    merged: dict[str, Any] = {}
    for key, value in mine.items():
        group, _, child = key.partition(".")
        if child and group in GROUPS:
            merged.setdefault(group, {})[child] = value
        else:
            merged[key] = value
    return OmegaConf.create(merged), news


def _refuse_changes(
    source: Path,
    saved: dict[str, Any],
    mine: dict[str, Any],
    fixed: dict[str, str],
    changed: list[tuple[str, Any, Any]],
    override: bool,
) -> None:
    """FaststyleError for what a resumed run may not change: its network (``fixed``: ``model.*``, ``train.extend``)
    ever, its other learned options (``changed``) without ``train.resume_override`` (``override``)."""
    if "train.extend" in fixed:
        was, given = saved["train.extend"], mine["train.extend"]
        raise FaststyleError(
            f"train.resume={source} continues a run trained from scratch, while train.extend={given} starts adding "
            "a style to another model: use one of the two"
            if not was
            else f"train.resume={source} continues a run that adds a style to {was}: leave train.extend out, or "
            "give that same file"
        )
    if fixed:
        raise FaststyleError(
            f"train.resume={source}: a run keeps its network: it was trained with {'; '.join(fixed.values())}; leave "
            "model.* and train.extend out (or pass the same model.* options), or start a new run"
        )
    if changed and not override:
        was = "; ".join(f"{key}={_show(value)} (given: {_show(given)})" for key, value, given in changed)
        raise FaststyleError(
            f"train.resume={source}: the run was trained with {was}: leave these out to continue it as it was, or "
            "add train.resume_override=true to train its weights on towards the new settings"
        )
