"""Shared pytest fixtures, and the test networks other test files import (``from tests.conftest import ...``)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from models.norm import ConditionalInstanceNorm
from models.transformer import TransformerNet


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same random state (torch, NumPy, Python), whichever tests ran before it: an
    unseeded ``torch.rand`` in one test must not make it pass or fail by the order or selection of the suite."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on small tensors: starting and synchronising threads costs more than such small
    ops themselves, the more so when other processes share the CPU (README, "Using the environment", has a figure).

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_style_tables(net: nn.Module, seed: int = 0) -> None:
    """Distinct (gamma, beta) rows per style (freshly built tables are all ones and zeros, which hides mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, ConditionalInstanceNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)


def perturb_weights(net: nn.Module, scale: float) -> nn.Module:
    """Push every parameter off its initialisation by ``scale`` x N(0, 1) noise (torch's global generator) and give
    batch norms non-trivial running statistics, so that the output is far from flat and every weight matters."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def perturbed_net(
    norm: str = "instance",
    *,
    base_width: int = 8,
    residual_blocks: int = 1,
    upsample: str = "nearest",
    num_styles: int = 1,
    scale: float = 0.2,
    seed: int = 0,
) -> TransformerNet:
    """The small eval-mode test network whose output is far from flat, the same for a given ``seed``:
    :func:`perturb_weights`, and distinct style tables when ``num_styles`` > 1."""
    torch.manual_seed(seed)
    net = TransformerNet(
        norm=norm, base_width=base_width, residual_blocks=residual_blocks, upsample=upsample, num_styles=num_styles
    )
    perturb_weights(net, scale)
    if num_styles > 1:
        randomise_style_tables(net, seed)
    return net.eval()
