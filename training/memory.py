"""The memory a training run needs, estimated before anything large is allocated.

A setting the machine cannot hold (``data.image_size=100000``, ``train.batch_size=100000``, ``style_size=4096`` on
a laptop) would otherwise run until the kernel kills the process; :func:`check_training_fits` refuses it with one
line that says how much it needs, how much the machine has and what to change.

The estimate counts the activations a step keeps for its backward pass, per pixel of a training crop, from the
layer shapes: the transformer's (every conv, pad, norm and ReLU output, proportional to ``model.base_width``) and
the loss network's up to its deepest tapped layer (VGG's fixed widths, a quarter of the pixels per block), times
``batch_size x image_size^2``, the element size of the precision, and two when the stability term runs a second
copy of the batch. The style image goes through the loss network once, without gradients, before training: its
tapped features plus the largest pair of consecutive layers, in float32. The run needs the larger of the two.

The count leaves out what is small or hard to pin down (weights, Adam's state, the allocator's slack, the data
loader), and :data:`MEASURED_FACTOR` scales it to at most the peak resident memory measured for small settings on
CPU, so the estimate stays below what a run really takes: only a setting that surely does not fit is refused.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from core.device import host_memory_available
from core.errors import FaststyleError

log = logging.getLogger(__name__)

MEASURED_FACTOR = 0.9
"""Scale from the counted activations to the memory a run takes: below the smallest ratio of measured peak
resident memory (minus the process's memory before training) to the count, over small CPU settings in fp32 and
bf16 (with and without train.malloc_reuse), so that the estimate errs low."""
HALF_PRECISION_BYTES = 3
"""Bytes per counted element under bf16/fp16 autocast: between 2 and 4, as autocast keeps the norms, the Grams
and the losses in float32, so a bf16 step holds most of an fp32 step's memory."""

_GIB = 2**30


def transformer_elements_per_px(base_width: int, residual_blocks: int, upsample: str = "nearest") -> float:
    """Activation elements the transformer keeps for backward, per pixel of its input (models/transformer.py:
    w channels at full resolution, 2w at half, 4w at quarter; each conv layer keeps its padded input, its output,
    the norm's and the ReLU's)."""
    w = base_width
    full, half, quarter = 1.0, 0.25, 1.0 / 16
    total = 3 + 3 * w * 4 * full  # padded input; conv 9x9 -> norm -> relu (w channels)
    total += 3 * 2 * w * 4 * half + 3 * 4 * w * 4 * quarter  # the two stride-2 convs
    total += residual_blocks * 4 * w * 6 * quarter  # per block: two padded convs, two norms, a ReLU, the sum
    upsampled = 1 if upsample == "nearest" else 0  # the nearest x2 copy of each decoder input
    total += (4 * w * upsampled + 2 * w * 4) * half + (2 * w * upsampled + w * 4) * full  # the two decoder convs
    total += 3 * 3 * full  # the last conv, its padded input and the output activation
    return total


def _vgg_sizes(blocks: Sequence[int], widths: Sequence[int]) -> dict[str, float]:
    """{layer name: output elements per input pixel} of a VGG (models/vgg.py): block b runs at 4**-(b-1) of the
    pixels, and its pool's output at a quarter of that."""
    from models.vgg import layer_names

    sizes = {}
    for name in layer_names(blocks):
        block = int(name[4])
        scale = 0.25 ** (block - 1) / (4 if name.startswith("pool") else 1)
        sizes[name] = widths[block - 1] * scale
    return sizes


def loss_network_elements_per_px(blocks: Sequence[int], widths: Sequence[int], deepest: str) -> float:
    """Activation elements of a VGG's forward pass up to layer ``deepest`` (e.g. "relu4_3"), per input pixel: each
    conv's, ReLU's (not in place) and pool's output."""
    sizes = _vgg_sizes(blocks, widths)
    names = list(sizes)
    return 3 + sum(sizes[name] for name in names[: names.index(deepest) + 1])


def _style_pass_elements_per_px(blocks: Sequence[int], widths: Sequence[int], taps: Sequence[str]) -> float:
    """A forward pass without gradients: the tapped features stay until their Grams are made, and the largest
    pair of consecutive layers is alive at once."""
    sizes = _vgg_sizes(blocks, widths)
    names = list(sizes)
    kept = names[: max(names.index(t) for t in taps) + 1]
    pairs = max(sizes[a] + sizes[b] for a, b in zip(kept, kept[1:], strict=False)) if len(kept) > 1 else 0.0
    return 3 + pairs + sum(sizes[t] for t in taps)


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a run needs: ``step`` for a training step, ``style`` for the style images' pass."""

    step: float
    style: float

    @property
    def total(self) -> float:
        return max(self.step, self.style)


def estimate(
    batch_size: int,
    image_size: int,
    base_width: int,
    residual_blocks: int,
    upsample: str,
    network: str,
    layers: Sequence[str],
    style_layers: Sequence[str],
    element_bytes: int,
    temporal: bool,
    style_sizes: Sequence[tuple[int, int]],
) -> MemoryNeed:
    """The memory a run needs (see the module docstring). ``layers``: every tapped loss layer;
    ``element_bytes``: :data:`HALF_PRECISION_BYTES` under bf16/fp16 autocast, else 4; ``style_sizes``: (width,
    height) of each style image as the loss network sees it."""
    from models.vgg import VGG16_BLOCKS, VGG19_BLOCKS, VGG_WIDTHS, layer_names

    blocks = VGG16_BLOCKS if network == "vgg16" else VGG19_BLOCKS
    deepest = max(layers, key=layer_names(blocks).index)
    per_px = transformer_elements_per_px(base_width, residual_blocks, upsample)
    per_px += loss_network_elements_per_px(blocks, VGG_WIDTHS, deepest)
    images = batch_size * (2 if temporal else 1)
    step = MEASURED_FACTOR * images * float(image_size) ** 2 * per_px * element_bytes
    style_px = max((w * h for w, h in style_sizes), default=0)
    style = MEASURED_FACTOR * style_px * _style_pass_elements_per_px(blocks, VGG_WIDTHS, style_layers) * 4
    return MemoryNeed(step, style)


def available_bytes(device: object) -> tuple[int | None, str]:
    """(bytes free for tensors on ``device``, its description): GPU memory on CUDA, else RAM (None if unknown)."""
    import torch

    if getattr(device, "type", None) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    if getattr(device, "type", None) == "mps":
        return None, "MPS"
    return host_memory_available(), "of RAM available"


def check_fits(need: MemoryNeed, free: int | None, where: str, batch_size: int, image_size: int) -> None:
    """FaststyleError when ``need`` surely does not fit in ``free`` bytes; says what to change."""
    if free is None or need.total <= free:
        return
    have = f"{free / _GIB:.1f} GiB {where}"
    if need.step >= need.style:
        per_image = need.step / batch_size  # the step grows with the batch and the crop's pixel count
        fitting_batch = int(free // per_image)
        side = int(image_size * math.sqrt(free / per_image)) // 8 * 8
        hint = (
            f"train.batch_size={fitting_batch} or less fits"
            if fitting_batch >= 1
            else f"at train.batch_size=1, data.image_size={side} or less fits"
        )
        raise FaststyleError(
            f"a training step at train.batch_size={batch_size} and data.image_size={image_size} needs about "
            f"{need.step / _GIB:.1f} GiB, but the machine has {have}: lower them ({hint}) or model.base_width"
        )
    raise FaststyleError(
        f"the style image at this style_size needs about {need.style / _GIB:.1f} GiB in the loss network, but the "
        f"machine has {have}: lower style_size (or crop the style image)"
    )


def training_need(cfg: object, policy: object, style_sizes: Sequence[tuple[int, int]]) -> MemoryNeed:
    """:func:`estimate` for a run's composed config, precision policy (core.precision) and style image sizes."""
    style_layers = list(cfg.loss.style_layers)
    return estimate(
        batch_size=int(cfg.train.batch_size),
        image_size=int(cfg.data.image_size),
        base_width=int(cfg.model.base_width),
        residual_blocks=int(cfg.model.residual_blocks),
        upsample=str(cfg.model.upsample),
        network=str(cfg.loss.network),
        layers=[*cfg.loss.content_layers, *style_layers],
        style_layers=style_layers,
        element_bytes=HALF_PRECISION_BYTES if getattr(policy, "dtype", None) is not None else 4,
        temporal=float(cfg.loss.temporal_weight) > 0,
        style_sizes=style_sizes,
    )


def check_training_fits(cfg: object, policy: object, device: object, style_sizes: Sequence[tuple[int, int]]) -> None:
    """Refuse (FaststyleError) a run whose :func:`training_need` surely exceeds the memory ``device`` has free."""
    need = training_need(cfg, policy, style_sizes)
    if getattr(device, "type", None) == "cpu":  # torchrun's processes on this machine share its RAM
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        need = MemoryNeed(need.step * processes, need.style * processes)
    free, where = available_bytes(device)
    log.info(
        "memory estimate: %.2f GiB per step, %.2f GiB for the style image (%s)",
        need.step / _GIB,
        need.style / _GIB,
        f"{free / _GIB:.1f} GiB {where}" if free is not None else "available memory unknown",
    )
    check_fits(need, free, where, int(cfg.train.batch_size), int(cfg.data.image_size))
