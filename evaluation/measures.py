"""Measures of a trained network on held-out photos: its own training loss (content, style, tv, total), the
contrast invariance of Ulyanov et al. 2016, and the per-image batch-norm mode they compare against; one row per
run and mode. (PSNR is core.metrics.psnr; the warping error against flicker is evaluation.warping.)"""

from __future__ import annotations

import copy
import logging
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.errors import FaststyleError
from evaluation.runs import Run

log = logging.getLogger(__name__)


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


def parameters(model: nn.Module) -> int:
    """How many parameters ``model`` has."""
    return sum(p.numel() for p in model.parameters())


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
