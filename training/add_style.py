"""Adding a style to a trained network (``train.extend``), after Dumoulin, Shlens & Kudlur 2017, section 4: a new
style is learnt by training only its (gamma, beta) in every norm, with every convolution of the network frozen.

The run trains a one-style copy of the base network whose norms start from the mean (gamma, beta) of the base's
styles and are the only trainable parameters (under 2% of the network: 3,200 of 1.68 M at width 32); the
convolutions are the base's, frozen. At the end ``TransformerNet.with_added_style`` appends the learnt (gamma, beta)
as a new row to the base's tables, so the base's own styles come out bit-identical. Checkpoints hold the copy, so a
run resumes like any other (with the same ``train.extend``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.errors import FaststyleError
from core.limits import MODEL_RANGES
from models.modelfile import load_model
from models.norm import InstanceNorm
from models.styles import style_names
from models.transformer import TransformerNet

log = logging.getLogger(__name__)


def base_style_names(meta: dict, num_styles: int) -> list[str]:
    """The base model's style names: ``meta["styles"]``, or for a one-style model the style it was trained on."""
    if num_styles == 1:
        return [str(meta.get("style_stem") or Path(str(meta.get("style") or "style_0")).stem)]
    return style_names(meta, num_styles)


def load_base(path: Path) -> tuple[TransformerNet, dict, list[str]]:
    """The model to extend, its meta and its style names; FaststyleError when it cannot take another style."""
    net, meta = load_model(path)
    if net.config()["norm"] != "instance":
        raise FaststyleError(
            f"train.extend={path} has norm {net.config()['norm']!r}: only instance-norm networks hold several "
            "styles (conditional instance norm); train a new multi-style model instead"
        )
    most = MODEL_RANGES["num_styles"][1]
    if net.num_styles >= most:
        raise FaststyleError(
            f"train.extend={path} holds {net.num_styles} styles, the most one network holds: it cannot take another"
        )
    return net, meta, base_style_names(meta, net.num_styles)


def extension_network(base: TransformerNet) -> TransformerNet:
    """The network the run trains: one style, (gamma, beta) = the mean of the base's styles, all else frozen."""
    net = base.for_style(torch.ones(base.num_styles)).train()
    trainable = 0
    for module in net.modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(isinstance(module, InstanceNorm) and module.affine)
            trainable += param.numel() if param.requires_grad else 0
    total = sum(p.numel() for p in net.parameters())
    log.info(
        "adding a style: training %d of %d parameters (%.2f%%, every norm's gamma and beta), the rest frozen",
        trainable,
        total,
        100.0 * trainable / total,
    )
    return net


def add_trained_style(base: TransformerNet) -> Callable[[nn.Module], nn.Module]:
    """For RunRecord.final_model: the trained copy -> ``base`` with the copy's (gamma, beta) as one more style."""

    def finish(trained: nn.Module) -> nn.Module:
        return base.with_added_style(trained)

    return finish
