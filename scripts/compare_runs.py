"""Compare batch norm and instance norm style networks (Ulyanov et al. 2016) on held-out photos.

    python train.py -m experiment=in_vs_bn model.norm=instance,batch      # both runs under one multirun dir
    python -m scripts.compare_norms multirun/in_vs_bn/<date>/<time>        # writes the report into that dir
    python -m scripts.compare_norms RUN_DIR_A RUN_DIR_B --out report/      # or name the run dirs yourself

A run dir is a folder holding ``model.pth`` and Hydra's ``.hydra/config.yaml`` (plus ``tb/`` for the curves).
Written into the output directory (the one directory given, else --out, else the run dirs' common parent):

- ``compare_norms_figure.png``: one row per held-out content image; columns content | style | batch norm
  (eval mode: running statistics) | batch norm with per-image statistics (train-mode BN on the single image, on a
  copy of the network so the running statistics are not touched) | instance norm; plus one row per
  --figure-variant: the first held-out image as clip(a * x + b) (default a = 0.5, b = 0.25: half the contrast).
- ``compare_norms_table.md`` and ``.csv``: content, style and total perceptual loss on the held-out images
  (``models.loss.PerceptualLoss`` built from each run's own loss config), and the contrast-invariance measure: the
  mean absolute difference (RGB in [0, 1]) between the stylization of each image x and the stylizations of its
  variants clip(a * x + b, 0, 1). Ulyanov et al.'s argument is that stylization should not depend on the content
  image's contrast; instance norm after the first convolution removes any a > 0 and b exactly (up to eps and the
  clipping), batch norm with running statistics does not.
- ``compare_norms_curves.png``: the training curves of every run, read back from its TensorBoard events.

Held-out images (--content, default ``data/samples/held_out``) must not be training images: every held-out file is
compared by content (size, then SHA-256) with the files under each run's ``data.root`` and the script refuses to
run on an overlap.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from core.errors import FaststyleError, exit_with_error
from core.fileio import atomic_write_text
from data.io import (
    is_image_file,
    load_image,
    pil_to_tensor,
    resize_max_side,
    resize_short_side,
    resize_to,
    save_image,
    tensor_to_pil,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)

DEFAULT_HELD_OUT = REPO_ROOT / "data" / "samples" / "held_out"
FIGURE_NAME = "compare_norms_figure.png"
TABLE_MD_NAME = "compare_norms_table.md"
TABLE_CSV_NAME = "compare_norms_table.csv"
CURVES_NAME = "compare_norms_curves.png"

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

Stylizer = Callable[[Tensor], Tensor]
"""A stylization function: (N, 3, H, W) RGB in [0, 1] -> (N, 3, H, W) RGB in [0, 1]."""


# --------------------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    """One training run: its directory, display name, resolved config, and the trained network (eval mode)."""

    path: Path
    name: str
    config: object  # omegaconf DictConfig (kept untyped so the module imports without omegaconf at type-check time)
    launch_dir: Path
    model: nn.Module
    meta: dict = field(default_factory=dict)

    @property
    def norm(self) -> str:
        return str(self.model.config()["norm"])


def find_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run directories (``.hydra/config.yaml`` + ``model.pth``) at or anywhere below each of ``paths``, sorted.

    A run dir whose training has not finished (no ``model.pth``) is an error rather than silently skipped: a
    comparison that quietly drops one side is worse than none.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FaststyleError(f"{path} does not exist: pass a multirun dir or run dirs made by train.py")
        configs = [path / ".hydra" / "config.yaml"] if (path / ".hydra" / "config.yaml").is_file() else []
        if not configs and path.is_dir():
            configs = sorted(p for p in path.rglob("config.yaml") if p.parent.name == ".hydra")
        if not configs:
            raise FaststyleError(f"no training run under {path}: expected <run>/.hydra/config.yaml from train.py")
        for config in configs:
            run_dir = config.parent.parent
            if not (run_dir / "model.pth").is_file():
                raise FaststyleError(
                    f"{run_dir} has no model.pth: its training did not finish (finish or resume it, or leave it out)"
                )
            if run_dir.resolve() not in {p.resolve() for p in found}:
                found.append(run_dir)
    return sorted(found)


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


def load_run(run_dir: Path, name: str, device: torch.device) -> Run:
    """Load a run's ``.hydra/config.yaml`` and ``model.pth`` (eval mode, on ``device``)."""
    from omegaconf import OmegaConf

    from training.checkpoint import load_model

    try:
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except Exception as err:  # omegaconf/yaml raise many types; any of them means the file is unusable
        raise FaststyleError(f"cannot read {run_dir / '.hydra' / 'config.yaml'}: {err}") from err
    model, meta = load_model(run_dir / "model.pth", device=device)
    return Run(path=run_dir, name=name, config=config, launch_dir=_launch_dir(run_dir), model=model, meta=meta)


def _config_value(run: Run, key: str) -> object:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(run.config, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise FaststyleError(f"{run.path}: cannot resolve {key} in .hydra/config.yaml ({err})") from err
    if value is None:
        raise FaststyleError(f"{run.path}: .hydra/config.yaml has no {key} (was it made by faststyle's train.py?)")
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def style_path(run: Run) -> Path:
    """Absolute path of the run's style image (config key ``style``)."""
    return resolve_path(str(_config_value(run, "style")), run.launch_dir)


def build_loss(run: Run, device: torch.device) -> nn.Module:
    """``PerceptualLoss`` from the run's resolved ``loss`` config (same network, layers and weights as training)."""
    from models.loss import PerceptualLoss

    loss_cfg = _config_value(run, "loss")
    if not isinstance(loss_cfg, dict):
        raise FaststyleError(f"{run.path}: the loss config is not a mapping")
    # Built exactly as train.py builds it: the loss group's keys are PerceptualLoss's keyword arguments.
    options = dict(loss_cfg)
    if options.get("weights_path"):
        options["weights_path"] = str(resolve_path(options["weights_path"], run.launch_dir))
    try:
        loss = PerceptualLoss(**options)
    except TypeError as err:
        raise FaststyleError(f"{run.path}: the loss config does not fit PerceptualLoss ({err})") from err
    return loss.to(device).eval()


# --------------------------------------------------------------------------------------------------------------------
# Held-out images


def collect_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by ``paths`` (files, or directories scanned recursively), sorted, duplicates removed."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)))
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_held_out(held_out: Sequence[Path], training_roots: Sequence[Path]) -> None:
    """Raise FaststyleError if any held-out file is (byte for byte) one of the training images.

    Compares sizes first and hashes only files of equal size, so a COCO-sized training folder costs one ``stat``
    per file. (A resized or re-encoded copy would not be caught; the held-out folder's README says where the
    photos come from.)
    """
    sizes: dict[int, list[Path]] = {}
    for path in held_out:
        sizes.setdefault(path.stat().st_size, []).append(path)
    hashes = {}
    for root in training_roots:
        if not root.is_dir():
            raise FaststyleError(f"training data root {root} is not a folder: cannot check the held-out images")
        for dirpath, _dirnames, filenames in os.walk(root):
            for filename in filenames:
                candidate = Path(dirpath) / filename
                if not is_image_file(candidate):
                    continue
                same_size = sizes.get(candidate.stat().st_size)
                if not same_size:
                    continue
                digest = _sha256(candidate)
                for path in same_size:
                    if path not in hashes:
                        hashes[path] = _sha256(path)
                    if hashes[path] == digest:
                        raise FaststyleError(
                            f"held-out image {path} is the training image {candidate}: pick held-out photos "
                            f"that are not under the training data root {root}"
                        )


def load_content(path: Path, max_side_px: int) -> Tensor:
    """Load a photo as a (1, 3, H, W) tensor in [0, 1], longest side ``max_side_px``."""
    return pil_to_tensor(resize_max_side(load_image(path), max_side_px)).unsqueeze(0)


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


# --------------------------------------------------------------------------------------------------------------------
# Atomic text/PNG writes


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow >= 10.1 ships a scalable default font; no system font files needed.
    return ImageFont.load_default(size=size)


# --------------------------------------------------------------------------------------------------------------------
# Figure


def _fit(img: Image.Image, box: int) -> Image.Image:
    """Resize (down or up) so the longest side is ``box`` pixels."""
    scale = box / max(img.size)
    return resize_to(img, max(1, round(img.width * scale)), max(1, round(img.height * scale)))


def make_figure(
    contents: Sequence[Tensor],
    style: Image.Image,
    columns: Sequence[tuple[str, Stylizer]],
    cell_px: int = 192,
    captions: Sequence[str | None] | None = None,
) -> Image.Image:
    """Grid image: one row per content (1, 3, H, W); columns content | style | each stylizer's output.

    ``captions[row]``, when given, is written under that row's content tile (e.g. "0.5x+0.25" for a variant row).
    """
    labels = ["content", "style"] + [label for label, _ in columns]
    pad, header = 6, 40
    font = _font(13)
    width = pad + len(labels) * (cell_px + pad)
    height = header + len(contents) * (cell_px + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(labels):
        x0 = pad + col * (cell_px + pad)
        # Labels may hold a line break ("batch norm\n(eval)"); centre each line in the column.
        for line_no, line in enumerate(label.split("\n")):
            text_w = draw.textlength(line, font=font)
            draw.text((x0 + (cell_px - text_w) / 2, 4 + 16 * line_no), line, fill="black", font=font)
    style_cell = _fit(style, cell_px)
    for row, x in enumerate(contents):
        tiles = [tensor_to_pil(x[0]), style_cell] + [tensor_to_pil(fn(x)[0]) for _, fn in columns]
        y0 = header + row * (cell_px + pad)
        for col, tile in enumerate(tiles):
            tile = _fit(tile, cell_px)
            x0 = pad + col * (cell_px + pad)
            canvas.paste(tile, (x0 + (cell_px - tile.width) // 2, y0 + (cell_px - tile.height) // 2))
        caption = captions[row] if captions else None
        if caption:
            text_w = draw.textlength(caption, font=font)
            box = (pad + 2, y0 + cell_px - 20, pad + 10 + text_w, y0 + cell_px - 2)
            draw.rectangle(box, fill="white")
            draw.text((pad + 6, y0 + cell_px - 19), caption, fill="black", font=font)
    return canvas


# --------------------------------------------------------------------------------------------------------------------
# Training curves from TensorBoard events, drawn with PIL (matplotlib is not a dependency)


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


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _format_tick(value: float, digits: int = 0) -> str:
    """``value`` with ``digits`` decimals in the mantissa (scientific notation for large/small values)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.{digits}e}"
    return f"{value:.{digits + 1}g}" if digits else f"{value:g}"


def _format_ticks(values: Sequence[float]) -> list[str]:
    """Labels for one axis: the fewest digits that keep every label distinct (2e+05 and 1.5e+05, not 2e+05 twice)."""
    for digits in range(4):
        labels = [_format_tick(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _ema(values: Sequence[float], decay: float) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's smoothing slider does)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * value
        out.append(avg / (1 - decay**i))
    return out


COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def plot_panel(
    title: str, series: Sequence[tuple[str, list[tuple[int, float]]]], size: tuple[int, int] = (460, 320)
) -> Image.Image:
    """One line chart: x = step, y = value (log10 axis when positive values span > 20x). Raw series thin and
    light, a smoothed copy (EMA 0.8) thick on top, legend top-right."""
    width, height = size
    left, right, top, bottom = 64, 12, 28, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    draw.text((left, 6), title, fill="black", font=font)
    points = [p for _, data in series for p in data]
    if not points:
        draw.text((left, height // 2), "no data", fill="gray", font=font)
        return img
    xs = [p[0] for p in points]
    ys = [p[1] for p in points if math.isfinite(p[1])]
    if not ys:
        draw.text((left, height // 2), "no finite values", fill="gray", font=font)
        return img
    log_y = min(ys) > 0 and max(ys) / min(ys) > 20
    tf = math.log10 if log_y else (lambda v: v)
    y_low, y_high = tf(min(ys)), tf(max(ys))
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)

    def to_px(step: float, value: float) -> tuple[float, float]:
        px = left + (step - x_low) / (x_high - x_low) * (width - left - right)
        py = top + (y_high - tf(value)) / (y_high - y_low) * (height - top - bottom)
        return px, py

    # Axes and ticks.
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    x_ticks = _nice_ticks(x_low, x_high)
    for tick, label in zip(x_ticks, _format_ticks(x_ticks), strict=True):
        px, _ = to_px(tick, 10**y_low if log_y else y_low)
        draw.line((px, height - bottom, px, height - bottom + 4), fill="black")
        draw.text((px - draw.textlength(label, font=small) / 2, height - bottom + 6), label, fill="black", font=small)
    draw.text(((left + width - right) / 2 - 12, height - 16), "step", fill="black", font=small)
    if log_y:
        y_ticks = [10**k for k in range(math.floor(y_low), math.ceil(y_high) + 1)]
        y_ticks += [m * 10**k for k in range(math.floor(y_low), math.ceil(y_high) + 1) for m in (2, 5)]
        y_ticks = sorted(t for t in y_ticks if y_low <= math.log10(t) <= y_high)
        decades = [t for t in y_ticks if abs(math.log10(t) - round(math.log10(t))) < 1e-9]
        if len(y_ticks) > 8:  # too dense: decades only, or every n-th tick when fewer than two decades show
            y_ticks = decades if len(decades) >= 2 else y_ticks[:: len(y_ticks) // 5]
    else:
        y_ticks = _nice_ticks(y_low, y_high)
    for tick, label in zip(y_ticks, _format_ticks(y_ticks), strict=True):
        _, py = to_px(x_low, tick)
        draw.line((left - 4, py, width - right, py), fill=(225, 225, 225))
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((left - 6 - draw.textlength(label, font=small), py - 6), label, fill="black", font=small)
    if log_y:
        draw.text((4, top - 14), "log scale", fill="gray", font=small)
    draw.rectangle((left, top, width - right, height - bottom), outline="black")

    # Lines: raw (light), then smoothed (full colour).
    for index, (_name, data) in enumerate(series):
        data = [(s, v) for s, v in data if math.isfinite(v) and (not log_y or v > 0)]
        if not data:
            continue
        colour = COLOURS[index % len(COLOURS)]
        light = tuple(int(c + (255 - c) * 0.65) for c in colour)
        raw = [to_px(s, v) for s, v in data]
        smooth = [to_px(s, v) for s, v in zip([s for s, _ in data], _ema([v for _, v in data], 0.8), strict=True)]
        if len(raw) == 1:
            x, y = raw[0]
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            continue
        draw.line(raw, fill=light, width=1)
        draw.line(smooth, fill=colour, width=2)

    # Legend.
    legend_y = top + 6
    for index, (name, _data) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        text_w = draw.textlength(name, font=small)
        x1 = width - right - 8
        draw.line((x1 - text_w - 26, legend_y + 6, x1 - text_w - 6, legend_y + 6), fill=colour, width=3)
        draw.text((x1 - text_w, legend_y), name, fill="black", font=small)
        legend_y += 16
    return img


def make_curves(runs: Sequence[tuple[str, dict[str, list[tuple[int, float]]]]], max_panels: int = 4) -> Image.Image:
    """Grid of line charts, one per ``loss/...`` tag the runs share (total, content, style first), two per row.

    Tags that are 0 throughout in every run (a term whose weight is 0, e.g. tv) get no panel."""
    common = set.intersection(*(set(series) for _, series in runs)) if runs else set()
    common = {t for t in common if any(v != 0 for _, series in runs for _, v in series[t])}
    preferred = ["loss/total", "loss/content", "loss/style", "loss/tv"]
    tags = [t for t in preferred if t in common]
    tags += sorted(t for t in common if t.startswith("loss/") and t not in tags)
    tags = tags[:max_panels]
    if not tags:
        raise FaststyleError(
            "the runs share no loss/... scalars in their TensorBoard events: train longer than one log interval"
        )
    panels = [plot_panel(tag, [(name, series[tag]) for name, series in runs]) for tag in tags]
    per_row = 2
    rows = -(-len(panels) // per_row)
    pw, ph = panels[0].size
    canvas = Image.new("RGB", (per_row * pw, rows * ph), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, ((i % per_row) * pw, (i // per_row) * ph))
    return canvas


# --------------------------------------------------------------------------------------------------------------------
# Table


@dataclass
class Row:
    """One line of the table: a model evaluated in one mode."""

    model: str
    run: str
    losses: dict[str, float]
    invariance: float
    per_variant: list[float]


def table_markdown(rows: Sequence[Row], variants: Sequence[tuple[float, float]], n_images: int, change: float) -> str:
    lines = [
        f"Held-out images: {n_images}. Losses: mean over the held-out images of each run's own PerceptualLoss "
        "(lower is better). Invariance: mean |stylize(clip(a*x+b)) - stylize(x)| in RGB [0, 1] over images and "
        f"{len(variants)} variants (a, b) = {', '.join(f'({a:g}, {b:+g})' for a, b in variants)} "
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
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    variant_cols = [f"mad_a{a:g}_b{b:+g}" for a, b in variants]
    writer.writerow(["model", "run", "content_loss", "style_loss", "tv_loss", "total_loss", "invariance_mad",
                     *variant_cols])
    for row in rows:
        writer.writerow([
            row.model, row.run, f"{row.losses['content']:.6g}", f"{row.losses['style']:.6g}",
            f"{row.losses['tv']:.6g}", f"{row.losses['total']:.6g}", f"{row.invariance:.6g}",
            *(f"{v:.6g}" for v in row.per_variant),
        ])
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Driver

NORM_ORDER = {"batch": 0, "none": 1, "instance": 2}


def stylizers_for(run: Run, label_suffix: str = "") -> list[tuple[str, str, Stylizer]]:
    """(figure label, table label, stylizer) for a run: two modes for batch norm, one otherwise."""
    if run.norm == "batch":
        return [
            (f"batch norm{label_suffix}\n(eval: running stats)", "batch norm, eval (running stats)",
             eval_stylizer(run.model)),
            (f"batch norm{label_suffix}\n(per-image stats)", "batch norm, per-image stats",
             per_image_bn_stylizer(run.model)),
        ]
    name = {"instance": "instance norm", "none": "no norm"}.get(run.norm, run.norm)
    return [(f"{name}{label_suffix}", name, eval_stylizer(run.model))]


def default_out_dir(run_dirs: Sequence[Path], inputs: Sequence[Path]) -> Path:
    """The single directory the user named, else the run dirs' deepest common parent."""
    if len(inputs) == 1 and inputs[0].is_dir():
        return inputs[0]
    return Path(os.path.commonpath([str(p.resolve()) for p in run_dirs]))


def compare(
    inputs: Sequence[str | os.PathLike],
    content: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    max_side_px: int = 256,
    max_images: int = 4,
    device: str = "cpu",
    variants: Sequence[tuple[float, float]] = DEFAULT_VARIANTS,
    figure_variants: Sequence[tuple[float, float]] = ((0.5, 0.25),),
    cell_px: int = 192,
) -> dict[str, Path]:
    """Write the figure, the tables and the curves for the runs found in ``inputs``; return their paths."""
    from core.device import resolve_device

    torch_device = resolve_device(device)
    run_dirs = find_run_dirs(inputs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs, [Path(p) for p in inputs])
    names = [os.path.relpath(p.resolve(), out.resolve()) for p in run_dirs]
    runs = [load_run(p, name, torch_device) for p, name in zip(run_dirs, names, strict=True)]
    runs.sort(key=lambda r: (NORM_ORDER.get(r.norm, 1), r.name))
    log.info("runs: %s", ", ".join(f"{r.name} ({r.norm})" for r in runs))

    styles = {style_path(r).resolve() for r in runs}
    if len(styles) != 1:
        raise FaststyleError(f"the runs were trained on different styles ({', '.join(map(str, styles))}): "
                             "compare runs of one style")
    style_file = styles.pop()
    roots = list({resolve_path(str(_config_value(r, "data.root")), r.launch_dir).resolve() for r in runs})

    held_out = collect_images(content)[:max_images]
    check_held_out(held_out, roots)
    images = [load_content(p, max_side_px).to(torch_device) for p in held_out]
    log.info("held-out images: %s", ", ".join(p.name for p in held_out))

    kinds = [r.norm for r in runs]
    suffixes = [f" [{r.name}]" if kinds.count(r.norm) > 1 else "" for r in runs]
    columns: list[tuple[str, str, str, Stylizer]] = []
    for run, suffix in zip(runs, suffixes, strict=True):
        columns += [(fig_label, table_label, run.name, fn) for fig_label, table_label, fn in stylizers_for(run, suffix)]

    # Loss: each run's own loss config; the style target at the run's style_size like in training.
    rows = []
    change = input_change(images, variants)
    for run in runs:
        loss = build_loss(run, torch_device)
        style_img = load_image(style_file)
        style_size = run.config.get("style_size")
        if style_size:  # train.py: the short side of the style image is style_size px
            style_img = resize_short_side(style_img, int(style_size))
        loss.set_style(pil_to_tensor(style_img).unsqueeze(0).to(torch_device))
        for _fig_label, table_label, run_name, fn in columns:
            if run_name != run.name:
                continue
            invariance, per_variant = contrast_invariance(fn, images, variants)
            rows.append(Row(table_label, run_name, held_out_losses(fn, loss, images), invariance, per_variant))
            log.info("%s: %s, invariance %.4f", table_label, rows[-1].losses, invariance)

    # Extra rows: the first held-out image's contrast/brightness variants, so the figure shows what the table's
    # invariance column measures.
    figure_rows = list(images) + [contrast_variants(images[0], [v])[0] for v in figure_variants]
    captions = [None] * len(images) + [f"{a:g}x{b:+g}" for a, b in figure_variants]
    figure = make_figure(figure_rows, load_image(style_file), [(label, fn) for label, _, _, fn in columns],
                         cell_px=cell_px, captions=captions)
    curves = make_curves([(r.name, read_scalars(r.path / "tb")) for r in runs])

    paths = {
        "figure": out / FIGURE_NAME,
        "table_md": out / TABLE_MD_NAME,
        "table_csv": out / TABLE_CSV_NAME,
        "curves": out / CURVES_NAME,
    }
    save_image(figure, paths["figure"])
    atomic_write_text(paths["table_md"], table_markdown(rows, variants, len(images), change))
    atomic_write_text(paths["table_csv"], table_csv(rows, variants))
    save_image(curves, paths["curves"])
    return paths


def _parse_variant(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected A,B (e.g. 0.5,0.25), got {text!r}") from err
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="a multirun dir (searched recursively) or run dirs")
    parser.add_argument("--content", nargs="+", default=[str(DEFAULT_HELD_OUT)],
                        help="held-out content images or folders (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output dir (default: the one dir given, else the runs' parent)")
    parser.add_argument("--size", type=int, default=256, help="longest side of the held-out images, px (%(default)s)")
    parser.add_argument("--max-images", type=int, default=4, help="use at most this many held-out images")
    parser.add_argument("--cell-px", type=int, default=192, help="figure cell size, px (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default: %(default)s)")
    parser.add_argument("--figure-variant", type=_parse_variant, action="append", dest="figure_variants",
                        metavar="A,B", help="extra figure row: the first held-out image as clip(a*x+b) (repeatable; "
                        "default: 0.5,0.25)")
    parser.add_argument("--variant", type=_parse_variant, action="append", dest="variants", metavar="A,B",
                        help="a contrast/brightness variant a*x+b (repeatable; default: "
                             + " ".join(f"{a:g},{b:g}" for a, b in DEFAULT_VARIANTS) + ")")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.size < 16 or args.max_images < 1 or args.cell_px < 32:
        exit_with_error(FaststyleError("--size must be >= 16, --max-images >= 1 and --cell-px >= 32"))
    try:
        paths = compare(args.runs, args.content, args.out, args.size, args.max_images, args.device,
                        tuple(args.variants) if args.variants else DEFAULT_VARIANTS,
                        tuple(args.figure_variants) if args.figure_variants else ((0.5, 0.25),), args.cell_px)
    except FaststyleError as err:
        exit_with_error(err)
    print(paths["table_md"].read_text(encoding="utf-8"))
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
