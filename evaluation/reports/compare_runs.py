"""Compare training runs on held-out photos: the runs of any multirun sweep (norm, style weight, width, seed, ...)
or any list of run dirs trained on one style.

    python train.py -m experiment=in_vs_bn model.norm=instance,batch      # both runs under one multirun dir
    python -m scripts.compare_runs multirun/in_vs_bn/<date>/<time>         # writes the report into that dir
    python -m scripts.compare_runs RUN_A RUN_B --out outputs/reports/ab   # or name the run dirs yourself

A run dir is a folder holding ``model.pth`` and Hydra's ``.hydra/config.yaml`` (plus ``tb/`` for the curves). Each
run is labelled by what differs between the runs' configs (``model.norm=batch``, ``loss.style_weight=2.0``, ...);
runs whose configs are identical are labelled by their folder. Written into the output directory (the one directory
given, else --out, else the run dirs' common parent):

- ``compare_figure.png``: one row per held-out content image; columns content | style | each run's stylization;
  plus one row per --figure-variant: the first held-out image as clip(a * x + b) (default a = 0.5, b = 0.25: half
  the contrast). A run whose network has batch norm gets two columns: BN in eval mode (running statistics, how it
  is deployed) and BN with per-image statistics (train-mode BN on the single image, on a copy of the network so the
  running statistics are not touched).
- ``compare_table.md`` and ``.csv``: content, style and total perceptual loss on the held-out images (each run's
  own loss and style target, built by ``training.run`` exactly as training built them), and the
  contrast-invariance measure: the mean absolute difference (RGB in [0, 1]) between the stylization of each
  image x and the stylizations of its variants clip(a * x + b, 0, 1). Ulyanov et al. 2016 argue that stylization
  should not depend on the content image's contrast; instance norm after the first convolution removes any a > 0
  and b exactly (up to eps and the clipping), batch norm with running statistics does not.
- ``compare_curves.png``: the training curves of every run (one panel per loss term, runs overlaid, smoothed line
  over the raw one), read back from their TensorBoard events.

Held-out images (--content, default ``data/samples/held_out``) must not be training images: every held-out file is
compared by content (size, then SHA-256) with the files under each run's ``data.root`` and the script refuses to
run on an overlap.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import logging
import os
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter, ScalarFormatter
from PIL import Image
from torch import Tensor, nn

from core.errors import FaststyleError, exit_with_error
from core.fileio import atomic_write_bytes, atomic_write_text, file_sha256
from data.io import is_image_file, load_image, pil_to_tensor, resize_max_side, resize_to, tensor_to_pil, walk_images

REPO_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)

DEFAULT_HELD_OUT = REPO_ROOT / "data" / "samples" / "held_out"
FIGURE_STEM = "compare_figure"
TABLE_MD_NAME = "compare_table.md"
TABLE_CSV_NAME = "compare_table.csv"
CURVES_NAME = "compare_curves.png"

# (a, b) pairs of the contrast/brightness variants a * x + b. Chosen to span what photos really vary by: lower and
# higher contrast around mid-grey, darker and brighter exposures. Every variant is clipped to [0, 1] like a real
# photo would be, so the strong ones (a = 1.5) lose information and no network can be exactly invariant to them.
DEFAULT_VARIANTS: tuple[tuple[float, float], ...] = (
    (0.5, 0.25),  # half the contrast, same mean
    (0.6, 0.0),  # darker, lower contrast
    (0.6, 0.4),  # brighter, lower contrast
    (1.0, -0.15),  # darker
    (1.0, 0.15),  # brighter
    (1.5, -0.25),  # more contrast, same mean (clips)
)
DEFAULT_FIGURE_VARIANTS: tuple[tuple[float, float], ...] = ((0.5, 0.25),)

BN_EVAL = "BN eval (running stats)"
BN_PER_IMAGE = "BN per-image stats"

Stylizer = Callable[[Tensor], Tensor]
"""A stylization function: (N, 3, H, W) RGB in [0, 1] -> (N, 3, H, W) RGB in [0, 1]."""


# --------------------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    """One training run: its directory, display name, config (paths made absolute), and the trained network."""

    path: Path
    name: str
    cfg: Any  # omegaconf DictConfig whose PATH_KEYS are absolute, as training resolved them
    saved: dict[str, object]  # the saved config flattened to dotted keys, values as written: what labels compare
    model: nn.Module  # eval mode
    meta: dict = field(default_factory=dict)
    label_parts: list[str] = field(default_factory=list)  # "key=value" per config difference, or the run's name

    @property
    def label(self) -> str:
        return ", ".join(self.label_parts)

    @property
    def has_batch_norm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())


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


def load_run(run_dir: Path, name: str, device: torch.device) -> Run:
    """Load a run's ``.hydra/config.yaml`` and ``model.pth`` (eval mode, on ``device``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from models.modelfile import load_model

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
    model, meta = load_model(run_dir / "model.pth", device=device)
    return Run(path=run_dir, name=name, cfg=cfg, saved=flat, model=model.eval(), meta=meta)


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
    several = [run.path for run in runs if getattr(run.model, "num_styles", 1) > 1]
    if several:
        raise FaststyleError(
            f"{several[0]} is a multi-style run: compare it with its one-style runs by python -m scripts.compare_styles"
        )
    labels = config_labels([r.saved for r in runs], [r.name for r in runs])
    for run, parts in zip(runs, labels, strict=True):
        run.label_parts = parts
    log.info("runs: %s", ", ".join(f"{r.name} ({r.label})" for r in runs))
    return runs


def _config_value(run: Run, key: str) -> object:
    from omegaconf import OmegaConf

    value = OmegaConf.select(run.cfg, key, default=None)
    if value is None or value == "???":
        raise FaststyleError(f"{run.path}: .hydra/config.yaml has no {key} (was it made by faststyle's train.py?)")
    return value


def shared_style(runs: Sequence[Run]) -> Path:
    """The one style image every run was trained on (the figure has one style column)."""
    styles = {Path(str(_config_value(r, "style"))).resolve() for r in runs}
    if len(styles) != 1:
        raise FaststyleError(
            f"the runs were trained on different styles ({', '.join(map(str, sorted(styles)))}): "
            "compare runs of one style"
        )
    return styles.pop()


# --------------------------------------------------------------------------------------------------------------------
# Held-out images


def collect_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by ``paths`` (files, or directories scanned recursively), sorted, duplicates removed."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(walk_images(path)[0])
        elif path.is_file():
            if not is_image_file(path):
                raise FaststyleError(f"{path} is not an image file (use .jpg, .png, .webp or .bmp)")
            files.append(path)
        else:
            raise FaststyleError(f"held-out image path {path} does not exist: pass files or folders with --content")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    if not unique:
        named = ", ".join(map(str, paths))
        raise FaststyleError(f"no held-out images in {named}: pass files or folders with --content")
    return unique


def check_held_out(held_out: Sequence[Path], training_roots: Sequence[Path]) -> None:
    """Raise FaststyleError if any held-out file is (byte for byte) one of the training images.

    Compares sizes first and hashes only files of equal size, so a COCO-sized training folder costs one ``stat``
    per file. (A resized or re-encoded copy would not be caught; the held-out folder's README says where the
    photos come from.)
    """
    by_size: dict[int, list[Path]] = {}
    for path in held_out:
        by_size.setdefault(path.stat().st_size, []).append(path)
    hashes: dict[Path, str] = {}
    for root in training_roots:
        if not root.is_dir():
            raise FaststyleError(f"training data root {root} is not a folder: cannot check the held-out images")
        for candidate in walk_images(root)[0]:  # the files training reads
            same_size = by_size.get(candidate.stat().st_size)
            if not same_size:
                continue
            digest = file_sha256(candidate)
            for path in same_size:
                if hashes.setdefault(path, file_sha256(path)) == digest:
                    raise FaststyleError(
                        f"held-out image {path} is the training image {candidate}: pick held-out photos "
                        f"that are not under the training data root {root}"
                    )


def load_content(path: Path, max_side_px: int) -> Tensor:
    """Load a photo as a (1, 3, H, W) tensor in [0, 1], longest side at most ``max_side_px``."""
    return pil_to_tensor(resize_max_side(load_image(path), max_side_px)).unsqueeze(0)


def held_out_images(
    content: Sequence[str | os.PathLike],
    runs: Sequence[Run],
    max_images: int,
    max_side_px: int,
    device: torch.device,
) -> tuple[list[Path], list[Tensor]]:
    """The first ``max_images`` held-out files, checked against every run's training data, and their tensors
    ((1, 3, H, W) in [0, 1] on ``device``)."""
    roots = list(dict.fromkeys(Path(str(_config_value(r, "data.root"))).resolve() for r in runs))
    files = collect_images(content)[:max_images]
    check_held_out(files, roots)
    log.info("held-out images: %s", ", ".join(p.name for p in files))
    return files, [load_content(p, max_side_px).to(device) for p in files]


# --------------------------------------------------------------------------------------------------------------------
# Stylizers and measures


def eval_stylizer(model: nn.Module) -> Stylizer:
    """The network as it is deployed: eval mode (batch norm uses its running statistics)."""
    model.eval()

    @torch.no_grad()
    def stylize(x: Tensor) -> Tensor:
        return model(x)

    return stylize


def per_image_bn_stylizer(model: nn.Module) -> Stylizer:
    """Batch norm normalising with the statistics of the image being stylized (one image per call).

    Works on a deep copy: every BatchNorm is put in training mode (batch statistics) with
    ``track_running_stats=False``, which makes PyTorch pass no running buffers at all, so nothing is updated even on
    the copy; the caller's network and its running statistics are untouched. With a batch of one image this is
    instance norm with the trained BN scale and shift, i.e. the network Ulyanov et al. argue for, but evaluated with
    weights that were trained under batch statistics.
    """
    per_image = copy.deepcopy(model).eval()
    count = 0
    for module in per_image.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
            count += 1
    if count == 0:
        raise ValueError("per_image_bn_stylizer needs a network with BatchNorm layers")

    @torch.no_grad()
    def stylize(x: Tensor) -> Tensor:
        # One image at a time: a batch of several would share statistics, which is not "per image".
        return torch.cat([per_image(x[i : i + 1]) for i in range(x.shape[0])])

    return stylize


def contrast_variants(x: Tensor, variants: Sequence[tuple[float, float]] = DEFAULT_VARIANTS) -> list[Tensor]:
    """``clip(a * x + b, 0, 1)`` for each (a, b); x: (N, 3, H, W) in [0, 1]."""
    return [(a * x + b).clamp(0.0, 1.0) for a, b in variants]


def contrast_invariance(
    stylize: Stylizer, images: Sequence[Tensor], variants: Sequence[tuple[float, float]] = DEFAULT_VARIANTS
) -> tuple[float, list[float]]:
    """How much the stylization changes when the input's contrast/brightness changes.

    For each image x (1, 3, H, W) in [0, 1] and each (a, b): mean over pixels and channels of
    ``|stylize(clip(a x + b)) - stylize(x)|``. Returns (mean over images and variants, per-variant means).
    0 means the stylization ignores the input's contrast and brightness; the scale is RGB in [0, 1].
    """
    if not images or not variants:
        raise ValueError("contrast_invariance needs at least one image and one variant")
    per_variant = [0.0] * len(variants)
    for x in images:
        reference = stylize(x)
        for i, variant in enumerate(contrast_variants(x, variants)):
            per_variant[i] += float((stylize(variant) - reference).abs().mean())
    per_variant = [value / len(images) for value in per_variant]
    return sum(per_variant) / len(per_variant), per_variant


def input_change(images: Sequence[Tensor], variants: Sequence[tuple[float, float]] = DEFAULT_VARIANTS) -> float:
    """Mean |clip(a x + b) - x| over images and variants: the size of the change the networks are shown."""
    total = 0.0
    for x in images:
        total += sum(float((v - x).abs().mean()) for v in contrast_variants(x, variants))
    return total / (len(images) * len(variants))


@torch.no_grad()
def held_out_losses(stylize: Stylizer, loss: nn.Module, images: Sequence[Tensor]) -> dict[str, float]:
    """Mean content, style, tv and total perceptual loss of ``stylize`` over ``images`` (each (1, 3, H, W))."""
    sums = {"content": 0.0, "style": 0.0, "tv": 0.0, "total": 0.0}
    for x in images:
        terms = loss(stylize(x), x)
        for key in sums:
            sums[key] += float(terms[key])
    return {key: value / len(images) for key, value in sums.items()}


def training_loss(run: Run, device: torch.device) -> nn.Module:
    """The run's PerceptualLoss with its style targets, built by the training code itself from the run's config,
    so the table measures exactly what training optimised."""
    from omegaconf.errors import OmegaConfBaseException

    from training.run import build_loss, style_target

    try:
        return build_loss(run.cfg, style_target(run.cfg), device).eval()
    except (OmegaConfBaseException, TypeError) as err:  # an old or hand-edited config without the keys training uses
        raise FaststyleError(f"{run.path}: its .hydra/config.yaml does not build the training loss ({err})") from err


@dataclass
class Column:
    """One way of running one run's network: a figure column and a table row."""

    run: Run
    mode: str  # "" for the network as deployed; BN_EVAL / BN_PER_IMAGE for a batch-norm network
    stylize: Stylizer

    @property
    def model(self) -> str:
        """Table label: the run's label, then the mode."""
        return f"{self.run.label}, {self.mode}" if self.mode else self.run.label

    def title(self, width_chars: int) -> str:
        """Figure column title: one line per config difference and one for the mode, wrapped to ``width_chars``."""
        lines = self.run.label_parts + ([self.mode] if self.mode else [])
        return "\n".join(wrapped for line in lines for wrapped in textwrap.wrap(line, width_chars) or [""])


def columns_for(runs: Sequence[Run]) -> list[Column]:
    """Each run as deployed; a batch-norm run also with per-image statistics (the comparison Ulyanov et al. make)."""
    columns = []
    for run in runs:
        if run.has_batch_norm:
            columns += [
                Column(run, BN_EVAL, eval_stylizer(run.model)),
                Column(run, BN_PER_IMAGE, per_image_bn_stylizer(run.model)),
            ]
        else:
            columns.append(Column(run, "", eval_stylizer(run.model)))
    return columns


# --------------------------------------------------------------------------------------------------------------------
# Table


@dataclass
class Row:
    """One line of the table: a model evaluated in one mode."""

    model: str
    label: str
    mode: str
    run: str
    losses: dict[str, float]
    invariance: float
    per_variant: list[float]


def evaluate(
    columns: Sequence[Column],
    images: Sequence[Tensor],
    variants: Sequence[tuple[float, float]],
    device: torch.device,
) -> list[Row]:
    """Held-out losses and contrast invariance of every column; one loss network per run (its own loss config)."""
    rows = []
    losses: dict[str, nn.Module] = {}
    for column in columns:
        run = column.run
        if run.name not in losses:
            losses = {run.name: training_loss(run, device)}  # one loss network in memory at a time
        invariance, per_variant = contrast_invariance(column.stylize, images, variants)
        held_out = held_out_losses(column.stylize, losses[run.name], images)
        rows.append(Row(column.model, run.label, column.mode, run.name, held_out, invariance, per_variant))
        log.info("%s: %s, invariance %.4f", column.model, held_out, invariance)
    return rows


def _variant_text(variants: Sequence[tuple[float, float]]) -> str:
    return ", ".join(f"({a:g}, {b:+g})" for a, b in variants)


def table_markdown(rows: Sequence[Row], variants: Sequence[tuple[float, float]], n_images: int, change: float) -> str:
    """The table as markdown, with a paragraph saying what each column measures."""
    lines = [
        f"Held-out images: {n_images}. Losses: mean over the held-out images of each run's own training loss "
        "(lower is better). Invariance: mean |stylize(clip(a*x+b)) - stylize(x)| in RGB [0, 1] over images and "
        f"{len(variants)} variants (a, b) = {_variant_text(variants)} "
        f"(0 = ignores contrast and brightness; the inputs themselves differ by {change:.4f}).",
        "",
        "| model | run | content loss | style loss | total loss | contrast invariance (MAD) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.run} | {row.losses['content']:.4g} | {row.losses['style']:.4g} | "
            f"{row.losses['total']:.4g} | {row.invariance:.4f} |"
        )
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[Row], variants: Sequence[tuple[float, float]]) -> str:
    """The table as CSV, with the invariance of each variant in a column of its own."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    variant_cols = [f"mad_a{a:g}_b{b:+g}" for a, b in variants]
    writer.writerow(
        [
            "model",
            "label",
            "mode",
            "run",
            "content_loss",
            "style_loss",
            "tv_loss",
            "total_loss",
            "invariance_mad",
            *variant_cols,
        ]
    )
    for row in rows:
        losses = [f"{row.losses[k]:.6g}" for k in ("content", "style", "tv", "total")]
        writer.writerow(
            [
                row.model,
                row.label,
                row.mode,
                row.run,
                *losses,
                f"{row.invariance:.6g}",
                *(f"{v:.6g}" for v in row.per_variant),
            ]
        )
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg canvas: rendered to bytes, written atomically)

DPI = 100
PANEL_PX = (520, 360)
"""Size of one curves panel in pixels."""


def new_figure(width_px: float, height_px: float, **kwargs: Any) -> Figure:
    """A matplotlib figure of exactly ``width_px`` x ``height_px`` pixels on an Agg canvas (no pyplot state)."""
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def render(figure: Figure, fmt: str = "png") -> bytes:
    """The figure encoded as PNG or JPEG bytes at its own pixel size."""
    buffer = io.BytesIO()
    options = {"pil_kwargs": {"quality": 92}} if fmt in ("jpg", "jpeg") else {}
    figure.savefig(buffer, format=fmt, dpi=DPI, facecolor="white", **options)
    return buffer.getvalue()


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` (format from the extension) through the project's one atomic write."""
    atomic_write_bytes(path, render(figure, path.suffix.lower().lstrip(".")))


def _fit(img: Image.Image, box: int) -> Image.Image:
    """Resize (down or up) so the longest side is ``box`` pixels."""
    scale = box / max(img.size)
    return resize_to(img, max(1, round(img.width * scale)), max(1, round(img.height * scale)))


def _show_tile(figure: Figure, rect: tuple[float, float, float, float], tile: Image.Image) -> Axes:
    """An image in its own frameless axes at ``rect`` (figure fractions: left, bottom, width, height)."""
    ax = figure.add_axes(rect)
    ax.imshow(np.asarray(tile), interpolation="antialiased")
    ax.set_axis_off()
    return ax


def make_figure(
    contents: Sequence[Tensor],
    style: Image.Image,
    columns: Sequence[tuple[str, Stylizer]],
    cell_px: int = 192,
    captions: Sequence[str | None] | None = None,
) -> Figure:
    """Image grid: one row per content (1, 3, H, W) in [0, 1]; columns content | style | each stylizer's output,
    under a title per column (``\\n`` splits a title into lines).

    ``captions[row]``, when given, is written on that row's content tile (e.g. "0.5x+0.25" for a variant row).
    """
    titles = ["content", "style", *(title for title, _ in columns)]
    pad, line_px = 6, 15
    header = pad + line_px * max(t.count("\n") + 1 for t in titles)
    width = pad + len(titles) * (cell_px + pad)
    height = header + len(contents) * (cell_px + pad)
    figure = new_figure(width, height)

    def rect(row: int, col: int) -> tuple[float, float, float, float]:
        left, top = pad + col * (cell_px + pad), header + row * (cell_px + pad)
        return left / width, 1 - (top + cell_px) / height, cell_px / width, cell_px / height

    for col, title in enumerate(titles):
        x_centre = (pad + col * (cell_px + pad) + cell_px / 2) / width
        figure.text(x_centre, 1 - 3 / height, title, ha="center", va="top", fontsize=9, linespacing=1.25)
    style_tile = _fit(style, cell_px)
    for row, x in enumerate(contents):
        tiles = [tensor_to_pil(x[0].cpu()), style_tile] + [tensor_to_pil(fn(x)[0].cpu()) for _, fn in columns]
        axes = [_show_tile(figure, rect(row, col), _fit(tile, cell_px)) for col, tile in enumerate(tiles)]
        caption = captions[row] if captions else None
        if caption:
            axes[0].text(
                0.03,
                0.03,
                caption,
                transform=axes[0].transAxes,
                fontsize=9,
                va="bottom",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 2},
            )
    return figure


# Training curves from TensorBoard events


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


def ema(values: Sequence[float], decay: float) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's smoothing slider does)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * value
        out.append(avg / (1 - decay**i))
    return out


Series = Sequence[tuple[int, float]]
"""[(step, value)] sorted by step."""

LOG_SCALE_RATIO = 20.0
"""A panel gets a log y axis when its positive values span more than this factor (early losses dwarf late ones)."""


def _log_decades(series: Sequence[tuple[str, Series]]) -> float | None:
    """Decades the values span when the panel needs a log axis (all positive, spanning > ``LOG_SCALE_RATIO``),
    else None."""
    values = [v for _, data in series for _, v in data if np.isfinite(v)]
    if not values or min(values) <= 0 or max(values) / min(values) <= LOG_SCALE_RATIO:
        return None
    return float(np.log10(max(values) / min(values)))


def _plot_series(ax: Axes, label: str, data: Series, colour: str, smoothing: float) -> None:
    """One run on ``ax``: the raw values thin and light, the smoothed values thick and labelled for the legend."""
    points = [(s, v) for s, v in data if np.isfinite(v)]
    if not points:
        return
    steps, values = zip(*points, strict=True)
    if len(points) == 1:
        ax.plot(steps, values, "o", color=colour, label=label)
        return
    ax.plot(steps, values, color=colour, linewidth=0.8, alpha=0.35)
    ax.plot(steps, ema(values, smoothing), color=colour, linewidth=2.0, label=label)


def _style_axes(ax: Axes, log_decades: float | None) -> None:
    """Step axis in whole numbers. A linear value axis is labelled without an additive offset, so every tick reads
    as its own value (1.005 x 10^5, never "+1e5" plus a small number); a log axis spanning up to two decades gets
    1-2-5 ticks, since powers of ten alone would leave it with one or two labels."""
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    if log_decades is None:
        formatter = ScalarFormatter(useOffset=False, useMathText=True)
        formatter.set_powerlimits((-3, 4))
        ax.yaxis.set_major_formatter(formatter)
    else:
        ax.set_yscale("log")
        ax.set_ylabel("log scale", color="grey")
        if log_decades <= 2:
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            every_tick = (np.inf, np.inf)  # the formatter's default hides 5 x 10^k past one decade
            ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=every_tick))
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", color="0.9")
    ax.legend(loc="best", fontsize="small", framealpha=0.85)


def plot_panel(ax: Axes, title: str, series: Sequence[tuple[str, Series]], smoothing: float = 0.8) -> None:
    """One metric on ``ax``: x = step, y = value (log axis when positive values span > ``LOG_SCALE_RATIO``), one
    colour per run, raw series thin and light under an EMA-smoothed copy."""
    ax.set_title(title, fontsize=11)
    if not any(np.isfinite(v) for _, data in series for _, v in data):
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", color="grey")
        return
    for index, (label, data) in enumerate(series):
        _plot_series(ax, label, data, f"C{index}", smoothing)
    _style_axes(ax, _log_decades(series))


PREFERRED_TAGS = ("loss/total", "loss/content", "loss/style", "loss/tv")


def curve_tags(runs: Sequence[tuple[str, dict[str, Series]]], max_panels: int = 4) -> list[str]:
    """The ``loss/...`` tags every run logged (total, content, style first), without terms that are 0 throughout
    in every run (a term whose weight is 0, e.g. tv)."""
    common = set.intersection(*(set(series) for _, series in runs)) if runs else set()
    common = {t for t in common if t.startswith("loss/") and any(v != 0 for _, s in runs for _, v in s[t])}
    tags = [t for t in PREFERRED_TAGS if t in common]
    tags += sorted(t for t in common if t not in tags)
    return tags[:max_panels]


def make_curves(runs: Sequence[tuple[str, dict[str, Series]]], max_panels: int = 4, per_row: int = 2) -> Figure:
    """One panel per shared ``loss/...`` tag (see :func:`curve_tags`), ``per_row`` panels a row, runs overlaid;
    ``runs``: (legend label, tag -> series)."""
    tags = curve_tags(runs, max_panels)
    if not tags:
        raise FaststyleError(
            "the runs share no loss/... scalars in their TensorBoard events: train longer than one log interval"
        )
    n_cols = min(per_row, len(tags))
    n_rows = -(-len(tags) // n_cols)
    figure = new_figure(n_cols * PANEL_PX[0], n_rows * PANEL_PX[1], layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, tag in zip(axes, tags, strict=False):
        plot_panel(ax, tag, [(label, series[tag]) for label, series in runs])
    for ax in axes[len(tags) :]:
        ax.set_visible(False)
    return figure


# --------------------------------------------------------------------------------------------------------------------
# Driver


def _title_width(cell_px: int) -> int:
    """Characters of a 9 pt title line that fit in a cell (about 6 px each at 100 dpi)."""
    return max(8, cell_px // 6)


def _figure_rows(
    images: Sequence[Tensor], figure_variants: Sequence[tuple[float, float]]
) -> tuple[list[Tensor], list[str | None]]:
    """The held-out images, then the first one's contrast/brightness variants (captioned), so the figure shows what
    the table's invariance column measures."""
    rows = list(images) + [contrast_variants(images[0], [v])[0] for v in figure_variants]
    captions: list[str | None] = [None] * len(images) + [f"{a:g}x{b:+g}" for a, b in figure_variants]
    return rows, captions


def output_paths(out: Path, figure_format: str = "png") -> dict[str, Path]:
    """Where the report's files go."""
    return {
        "figure": out / f"{FIGURE_STEM}.{figure_format}",
        "table_md": out / TABLE_MD_NAME,
        "table_csv": out / TABLE_CSV_NAME,
        "curves": out / CURVES_NAME,
    }


def compare(
    inputs: Sequence[str | os.PathLike],
    content: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    max_side_px: int = 256,
    max_images: int = 4,
    device: str = "cpu",
    variants: Sequence[tuple[float, float]] = DEFAULT_VARIANTS,
    figure_variants: Sequence[tuple[float, float]] = DEFAULT_FIGURE_VARIANTS,
    cell_px: int = 192,
    figure_format: str = "png",
    max_panels: int = 4,
) -> dict[str, Path]:
    """Write the figure, the tables and the curves for the runs found in ``inputs``; return their paths."""
    from core.device import resolve_device

    torch_device = resolve_device(device)
    run_dirs = find_run_dirs(inputs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs, [Path(p) for p in inputs])
    runs = load_runs(run_dirs, out, torch_device)
    style_file = shared_style(runs)
    held_out, images = held_out_images(content, runs, max_images, max_side_px, torch_device)
    columns = columns_for(runs)

    rows = evaluate(columns, images, variants, torch_device)
    figure_rows, captions = _figure_rows(images, figure_variants)
    width = _title_width(cell_px)
    figure = make_figure(
        figure_rows,
        load_image(style_file),
        [(c.title(width), c.stylize) for c in columns],
        cell_px=cell_px,
        captions=captions,
    )
    curves = make_curves([(r.label, read_scalars(r.path / "tb")) for r in runs], max_panels=max_panels)

    paths = output_paths(out, figure_format)
    save_figure(figure, paths["figure"])
    atomic_write_text(paths["table_md"], table_markdown(rows, variants, len(held_out), input_change(images, variants)))
    atomic_write_text(paths["table_csv"], table_csv(rows, variants))
    save_figure(curves, paths["curves"])
    return paths


def _parse_variant(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected A,B (e.g. 0.5,0.25), got {text!r}") from err
    return a, b


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.compare_runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="a multirun dir (searched recursively) or run dirs")
    parser.add_argument(
        "--content",
        nargs="+",
        default=[str(DEFAULT_HELD_OUT)],
        help="held-out content images or folders (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="output dir (default: the one dir given, else the runs' parent)")
    parser.add_argument("--size", type=int, default=256, help="longest side of the held-out images, px (%(default)s)")
    parser.add_argument("--max-images", type=int, default=4, help="use at most this many held-out images")
    parser.add_argument("--cell-px", type=int, default=192, help="figure cell size, px (default: %(default)s)")
    parser.add_argument(
        "--figure-format",
        choices=("png", "jpg"),
        default="png",
        help="format of the image grid (default: %(default)s; the curves are always PNG)",
    )
    parser.add_argument(
        "--max-panels", type=int, default=4, help="at most this many loss curves panels (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    parser.add_argument(
        "--figure-variant",
        type=_parse_variant,
        action="append",
        dest="figure_variants",
        metavar="A,B",
        help="extra figure row: the first held-out image as clip(a*x+b) (repeatable; default: 0.5,0.25)",
    )
    parser.add_argument(
        "--variant",
        type=_parse_variant,
        action="append",
        dest="variants",
        metavar="A,B",
        help="a contrast/brightness variant a*x+b (repeatable; default: "
        + " ".join(f"{a:g},{b:g}" for a, b in DEFAULT_VARIANTS)
        + ")",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.size < 16 or args.max_images < 1 or args.cell_px < 32 or args.max_panels < 1:
        exit_with_error(
            FaststyleError("--size must be >= 16, --max-images >= 1, --cell-px >= 32 and --max-panels >= 1")
        )
    try:
        paths = compare(
            args.runs,
            args.content,
            args.out,
            args.size,
            args.max_images,
            args.device,
            tuple(args.variants) if args.variants else DEFAULT_VARIANTS,
            tuple(args.figure_variants) if args.figure_variants else DEFAULT_FIGURE_VARIANTS,
            args.cell_px,
            args.figure_format,
            args.max_panels,
        )
    except FaststyleError as err:
        exit_with_error(err)
    print(paths["table_md"].read_text(encoding="utf-8"))
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
