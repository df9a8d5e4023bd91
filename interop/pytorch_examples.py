"""pytorch/examples ``fast_neural_style`` model files in and out: their state dicts as our TransformerNet, and back.

Those files are a bare ``state_dict`` of their TransformerNet (``torch.save(transformer.state_dict(), path)``).
Format facts this module relies on (from the published format, no code taken from it):

- keys ``conv1.conv2d.*``, ``in1.*``, ``conv2.conv2d.*``, ``in2.*``, ``conv3.conv2d.*``, ``in3.*``, then per residual
  block ``res{k}.conv1.conv2d.*``, ``res{k}.in1.*``, ``res{k}.conv2.conv2d.*``, ``res{k}.in2.*`` (k = 1..R), then
  ``deconv1.conv2d.*``, ``in4.*``, ``deconv2.conv2d.*``, ``in5.*``, ``deconv3.conv2d.*`` (``*`` = weight, bias);
- reflection padding of kernel_size // 2 before every conv, nearest x2 upsampling before deconv1 and deconv2,
  affine instance norm (eps 1e-5) after every conv but the last, ReLU after every norm except the second one of a
  residual block, no output activation;
- the network takes and returns RGB in 0-255; files written by old torch versions also hold
  ``in*.running_mean`` / ``in*.running_var`` buffers, which instance norm never uses at inference: they are dropped.

That is exactly our TransformerNet(norm="instance", upsample="nearest", output="linear") once the 0-255 scale is
folded into the weights: the first conv sees ``255 * x`` (so its weight is multiplied by 255; its bias and the
reflection padding are unaffected) and our output is theirs divided by 255 (so the last conv's weight and bias are
divided by 255). Every layer in between sees the same numbers as in their network. Our "linear" output clamps to
[0, 1] in eval mode, which is what their stylize script does when it saves (clamp to 0-255).

The base width w (conv1 has w output channels; 32 in their releases, 16 and 8 in light variants) and the number of
residual blocks R are read from the tensor shapes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import FaststyleError
from core.fileio import file_sha256, safe_torch_load
from models.modelfile import check_finite, check_model_config
from models.transformer import ConvLayer, TransformerNet, UpsampleConvLayer

log = logging.getLogger(__name__)

SOURCE_NAME = "pytorch/examples"
# The scale of their images: x_theirs = 255 * x_ours on input, y_ours = y_theirs / 255 on output.
PIXEL_SCALE = 255.0

_RESIDUAL_KEY = re.compile(r"^res(\d+)\.")
# Instance-norm buffers written by old torch versions: harmless, unused by instance norm, dropped on import.
_DROPPED_BUFFER = re.compile(r"^(res\d+\.)?in\d+\.(running_mean|running_var|num_batches_tracked)$")
# The keys whose presence identifies the format (first and last conv of their network).
_SIGNATURE_KEYS = ("conv1.conv2d.weight", "deconv3.conv2d.weight")
EXAMPLES_FIX = "pass a state_dict saved by their fast_neural_style"


def examples_config(base_width: int, residual_blocks: int) -> dict[str, Any]:
    """The TransformerNet config that represents a pytorch/examples network exactly."""
    return {
        "norm": "instance",
        "base_width": int(base_width),
        "residual_blocks": int(residual_blocks),
        "upsample": "nearest",
        "output": "linear",
    }


def is_examples_state_dict(obj: object) -> bool:
    """True when ``obj`` looks like a pytorch/examples TransformerNet state dict (string keys -> tensors with
    ``conv1.conv2d.weight`` and ``deconv3.conv2d.weight``). Says nothing about whether it is complete: that is
    checked, with an error naming the keys, by ``from_examples_state_dict``."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(k, str) for k in obj):
        return False
    return all(isinstance(obj.get(k), Tensor) for k in _SIGNATURE_KEYS)


def _key_pairs(net: TransformerNet) -> list[tuple[str, str]]:
    """(our parameter prefix, their parameter prefix) for every conv and norm, found by walking ``net``'s
    documented structure (encoder / residuals / decoder) rather than hard-coding Sequential indices."""
    names = {id(module): name for name, module in net.named_modules()}
    pairs: list[tuple[str, str]] = []

    def conv_and_norms(modules: nn.Sequential, conv_names: list[str], norm_names: list[str]) -> None:
        convs = [m for m in modules if isinstance(m, (ConvLayer, UpsampleConvLayer))]
        norms = [m for m in modules if not isinstance(m, (ConvLayer, UpsampleConvLayer, nn.ReLU))]
        if len(convs) != len(conv_names) or len(norms) != len(norm_names):
            raise RuntimeError("TransformerNet structure changed: update interop/pytorch_examples.py's mapping")
        pairs.extend((names[id(m)] + ".conv", f"{theirs}.conv2d") for m, theirs in zip(convs, conv_names, strict=True))
        pairs.extend((names[id(m)], theirs) for m, theirs in zip(norms, norm_names, strict=True))

    conv_and_norms(net.encoder, ["conv1", "conv2", "conv3"], ["in1", "in2", "in3"])
    for k, block in enumerate(net.residuals, start=1):
        prefix = names[id(block)]
        pairs += [
            (f"{prefix}.conv1.conv", f"res{k}.conv1.conv2d"),
            (f"{prefix}.norm1", f"res{k}.in1"),
            (f"{prefix}.conv2.conv", f"res{k}.conv2.conv2d"),
            (f"{prefix}.norm2", f"res{k}.in2"),
        ]
    conv_and_norms(net.decoder, ["deconv1", "deconv2", "deconv3"], ["in4", "in5"])
    return pairs


def _key_map(net: TransformerNet) -> dict[str, str]:
    """Their full key -> our full key, for weights and biases."""
    return {f"{theirs}.{p}": f"{ours}.{p}" for ours, theirs in _key_pairs(net) for p in ("weight", "bias")}


def _first_and_last_conv(key_map: Mapping[str, str]) -> tuple[str, str]:
    """Our prefixes of the first conv (sees 0-255 input) and the last conv (produces 0-255 output)."""
    return key_map["conv1.conv2d.weight"].rsplit(".", 1)[0], key_map["deconv3.conv2d.weight"].rsplit(".", 1)[0]


def _describe(keys: list[str], limit: int = 6) -> str:
    """A short one-line list of keys: the first ``limit`` and how many more."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def examples_shape(state: Mapping[str, Tensor]) -> tuple[int, int]:
    """(base_width, residual_blocks) of a pytorch/examples state dict, from its tensor shapes and key names.

    Raises FaststyleError when conv1's weight is missing or not (w, 3, 9, 9), or the residual blocks are not
    numbered 1..R.
    """
    weight = state.get("conv1.conv2d.weight")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or tuple(weight.shape[1:]) != (3, 9, 9):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else "missing"
        raise FaststyleError(
            f"not a pytorch/examples style network: conv1.conv2d.weight should be (width, 3, 9, 9), got {got}"
        )
    base_width = int(weight.shape[0])
    numbers = sorted({int(m.group(1)) for k in state if (m := _RESIDUAL_KEY.match(k))})
    if numbers != list(range(1, len(numbers) + 1)):
        raise FaststyleError(
            f"pytorch/examples file has residual blocks numbered {numbers}: expected res1..resN without gaps"
        )
    return base_width, len(numbers)


def _key_problems(
    state: Mapping[str, Any], key_map: Mapping[str, str], ours: Mapping[str, Tensor]
) -> tuple[list[str], list[str]]:
    """(what is wrong with ``state``'s keys against ``key_map``: missing, unexpected or mis-shaped ones; the unused
    running-stat buffers to drop)."""
    present = set(state)
    dropped = sorted(k for k in present if _DROPPED_BUFFER.match(k))
    missing = sorted(set(key_map) - present)
    unexpected = sorted(present - set(key_map) - set(dropped))
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    wrong = []
    for theirs, mine in key_map.items():
        value = state.get(theirs)
        if value is None:
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(ours[mine].shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            wrong.append(f"{theirs} {got} (expected {tuple(ours[mine].shape)})")
    if wrong:
        problems.append(f"mis-shaped keys: {_describe(wrong, limit=4)}")
    return problems, dropped


def from_examples_state_dict(state: Mapping[str, Any]) -> TransformerNet:
    """Build our TransformerNet (eval mode, on CPU) holding a pytorch/examples network's weights.

    Args:
        state: their ``state_dict`` (key -> tensor), as read by ``torch.load(path, weights_only=True)``.

    Returns:
        ``TransformerNet(**examples_config(w, R))`` whose ``forward(x)`` for x (N, 3, H, W) in [0, 1] equals their
        ``forward(255 * x) / 255`` (clamped to [0, 1] in eval mode) for H, W multiples of 4; other sizes go through
        our usual bottom/right padding and crop (their network would change the image size there).

    Raises:
        FaststyleError naming the missing, unexpected or mis-shaped keys.
    """
    if not is_examples_state_dict(state):
        raise FaststyleError(
            "not a pytorch/examples style network (no conv1.conv2d.weight / deconv3.conv2d.weight tensors)"
        )
    base_width, residual_blocks = examples_shape(state)
    net = TransformerNet(**examples_config(base_width, residual_blocks))
    key_map = _key_map(net)
    problems, dropped = _key_problems(state, key_map, net.state_dict())
    if problems:
        raise FaststyleError(
            f"pytorch/examples file (width {base_width}, {residual_blocks} residual blocks) does not match its "
            f"format: {'; '.join(problems)}"
        )
    if dropped:
        log.info("dropping %d unused instance-norm running-stat buffers (old torch file)", len(dropped))

    mapped = {mine: state[theirs].detach().to(torch.float32) for theirs, mine in key_map.items()}
    first, last = _first_and_last_conv(key_map)
    # Fold the 0-255 pixel scale into the first and last convolutions (module docstring). float64 for the product
    # keeps the folded weights as close to the exact values as float32 can hold.
    mapped[f"{first}.weight"] = (state["conv1.conv2d.weight"].double() * PIXEL_SCALE).float()
    mapped[f"{last}.weight"] = (state["deconv3.conv2d.weight"].double() / PIXEL_SCALE).float()
    mapped[f"{last}.bias"] = (state["deconv3.conv2d.bias"].double() / PIXEL_SCALE).float()
    # strict=True: every parameter of ours must come from their file (our buffers: none for instance norm).
    net.load_state_dict(mapped, strict=True)
    log.info("imported pytorch/examples network: base_width=%d, residual_blocks=%d", base_width, residual_blocks)
    return net.eval()


def to_examples_state_dict(net: TransformerNet) -> dict[str, Tensor]:
    """The inverse of ``from_examples_state_dict``: our network's weights in pytorch/examples' layout and scale.

    Only networks that format can hold: norm="instance", upsample="nearest", output="linear" (a sigmoid output has
    no equivalent there). The tests and the precision report build files in their layout with it; no user
    command writes that format.
    """
    config = net.config()
    if net.num_styles > 1:
        raise FaststyleError(
            f"a network with {net.num_styles} styles has no pytorch/examples equivalent: pick one style first "
            "(TransformerNet.for_style)"
        )
    if (config["norm"], config["upsample"], config["output"]) != ("instance", "nearest", "linear"):
        raise FaststyleError(
            "only norm=instance, upsample=nearest, output=linear networks have a pytorch/examples equivalent, "
            f"got norm={config['norm']}, upsample={config['upsample']}, output={config['output']}"
        )
    key_map = _key_map(net)
    ours = net.state_dict()
    state = {theirs: ours[mine].detach().to("cpu", torch.float32).clone() for theirs, mine in key_map.items()}
    state["conv1.conv2d.weight"] = (state["conv1.conv2d.weight"].double() / PIXEL_SCALE).float()
    state["deconv3.conv2d.weight"] = (state["deconv3.conv2d.weight"].double() * PIXEL_SCALE).float()
    state["deconv3.conv2d.bias"] = (state["deconv3.conv2d.bias"].double() * PIXEL_SCALE).float()
    return state


def examples_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` recorded for an imported file: where it came from (name and SHA-256) and what it is."""
    path = Path(path)
    return {
        "source": SOURCE_NAME,
        "source_file": path.name,
        "source_sha256": file_sha256(path),
        "style": path.stem,
    }


def import_examples_state(
    obj: Mapping[str, Any], path: Path, device: str | torch.device = "cpu"
) -> tuple[TransformerNet, dict[str, Any]]:
    """(network in eval mode on ``device``, meta) from a pytorch/examples state dict already read safely from
    ``path`` (interop.read decides which format a file holds). Raises FaststyleError as the checks below say."""
    # The shape its tensors claim is checked before anything is built or scanned: a tensor may be a stride-0 view
    # claiming billions of elements on a few bytes of storage.
    check_model_config(examples_config(*examples_shape(obj)), path)
    net = from_examples_state_dict(obj)
    check_finite(net.state_dict(), path)  # the weights used (unused running-stat buffers were dropped)
    return net.to(device).eval(), examples_meta(path)


def read_examples_file(path: str | os.PathLike) -> tuple[TransformerNet, dict[str, Any]]:
    """Read a pytorch/examples ``.pth`` / ``.model`` file safely and import it; returns (eval network, meta).
    Anything else is refused (scripts/convert.py converts only their files)."""
    path = Path(path)
    obj = safe_torch_load(path, "model file", origin=SOURCE_NAME, fix=EXAMPLES_FIX)
    if not is_examples_state_dict(obj):
        raise FaststyleError(
            f"{path} is not a pytorch/examples style network (no conv1.conv2d.weight / deconv3.conv2d.weight): "
            f"{EXAMPLES_FIX}"
        )
    return import_examples_state(obj, path)
