"""Numeric precision and kernel layout for training: autocast dtype, gradient scaling, channels_last, torch.compile.

``train.precision`` is one of :data:`PRECISIONS`:

- ``fp32``: no autocast; the reference path every other setting is compared to.
- ``bf16``: autocast to bfloat16. Same exponent range as fp32, so no gradient scaling is needed. Needs a GPU with
  native bf16 (NVIDIA Ampere or newer); on this project's CPU it is ~100x slower than fp32 (issue 6), so it is only
  used there when asked for explicitly.
- ``fp16``: autocast to float16 with a GradScaler: fp16 gradients of small losses underflow to zero unless the loss
  is scaled up before ``backward`` and the gradients scaled back before the step (Micikevicius et al. 2018, "Mixed
  Precision Training"; https://pytorch.org/docs/stable/amp.html). CUDA only.
- ``auto``: bf16 on CUDA devices that support it, else fp16 with scaling on CUDA; fp32 on CPU and MPS.

Autocast runs convolutions and matmuls in the low-precision dtype and keeps reductions in fp32. Our own code must
keep the numerically fragile parts in fp32 whatever the autocast dtype: Gram matrices (sums of H*W products per
entry overflow fp16's 65504 on real feature maps), loss reductions, and instance-norm statistics
(models/norm.py computes them in fp32).

``channels_last`` (NHWC memory layout) lets cuDNN use tensor-core kernels without transposes; ``compile`` runs
``torch.compile``. Both accept ``"auto"``, resolved per device to the setting scripts/bench_train.py measured fastest
(see :data:`AUTO_DEFAULTS`). Neither changes results beyond float rounding (tests/test_precision.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import FaststyleError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# What "auto" means for channels_last and compile, per device type. CPU: on the project's 2-core AMD EPYC neither
# helped (`python scripts/bench.py train --variants all --image-size 128 --steps 2 --warmup 0`, batch 4, a loaded
# machine, so noisy: plain 8.8 s/step, channels_last 14.3, compile 21.7 (+271 s compiling), both 11.3), so plain
# eager NCHW fp32 stays the CPU default. Re-measured 2026-11-23 on a quiet machine with the fused InstanceNorm
# kernel, 256 px (`python scripts/bench.py train --variants plain,malloc,cl+malloc --steps 5`, twice): malloc reuse
# 4.9-5.0 s/step, channels_last + malloc reuse 5.8-6.1 s/step: channels_last stays off on CPU.
# CUDA: unmeasured in this project so far; set to the configuration PyTorch's performance guides recommend for
# convolutional nets with AMP on tensor cores (channels_last + torch.compile); re-check with
# `python scripts/bench.py train` on a GPU.
AUTO_DEFAULTS: dict[str, dict[str, bool]] = {
    "cpu": {"channels_last": False, "compile": False},
    "mps": {"channels_last": False, "compile": False},
    "cuda": {"channels_last": True, "compile": True},
}


@dataclass(frozen=True)
class PrecisionPolicy:
    """A resolved precision: ``name`` in fp32/fp16/bf16, the autocast ``dtype`` (None = no autocast), whether a
    GradScaler is used, and the ``device_type`` ("cuda", "cpu", "mps") autocast runs on."""

    name: str
    dtype: torch.dtype | None
    use_grad_scaler: bool
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context manager for the forward pass and loss (not for ``backward`` or the optimizer step)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled for fp16 only; a disabled one passes ``scale``/``step``/``update`` straight through,
        so the training step is written once for every precision. Save its ``state_dict`` in checkpoints."""
        # A disabled scaler never touches the device; "cpu" avoids a CUDA warning on machines without one.
        device = self.device_type if self.use_grad_scaler else "cpu"
        return torch.amp.GradScaler(device, enabled=self.use_grad_scaler)


def _cuda_supports_bf16(device: torch.device) -> bool:
    """Native bf16 (compute capability >= 8.0, Ampere); emulated bf16 on older GPUs is slower than fp16."""
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(name: str, device: torch.device) -> PrecisionPolicy:
    """Turn ``train.precision`` into a policy for ``device``; unsupported combinations raise FaststyleError.

    Explicit requests are honoured or refused, never silently replaced: fp16 is CUDA-only (there is no point in
    fp16 autocast on CPU, and GradScaler support elsewhere is uneven), bf16 needs a GPU with native bf16 or the
    CPU (allowed, with a warning that it is slow there), and MPS trains in fp32 only (mixed precision on MPS is
    untested here).
    """
    if name not in PRECISIONS:
        raise FaststyleError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")
    kind = device.type
    if name == "auto":
        name = ("bf16" if _cuda_supports_bf16(device) else "fp16") if kind == "cuda" else "fp32"
    elif name == "fp16" and kind != "cuda":
        raise FaststyleError(f"precision=fp16 needs a CUDA device (device is {kind}): use precision=fp32 or auto")
    elif name == "bf16" and kind == "cuda" and not _cuda_supports_bf16(device):
        raise FaststyleError(
            f"precision=bf16 needs an Ampere or newer GPU ({torch.cuda.get_device_name(device)} has no native bf16): "
            "use precision=fp16 or auto"
        )
    elif name == "bf16" and kind == "mps":
        raise FaststyleError("precision=bf16 is not supported on MPS here: use precision=fp32 or auto")
    elif name == "bf16" and kind == "cpu":
        logger.warning("precision=bf16 on CPU is much slower than fp32 on most CPUs; precision=auto uses fp32")
    return PrecisionPolicy(name=name, dtype=_DTYPES[name], use_grad_scaler=name == "fp16", device_type=kind)


def resolve_switch(value: bool | str, setting: str, device: torch.device) -> bool:
    """Resolve a ``train.channels_last`` / ``train.compile`` value: a bool, or "auto" (see :data:`AUTO_DEFAULTS`).

    Strings "true"/"false" are accepted too because command-line overrides sometimes arrive quoted.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text == "auto":
        return AUTO_DEFAULTS.get(device.type, AUTO_DEFAULTS["cpu"])[setting]
    raise FaststyleError(f"train.{setting}={value!r} is not valid: use true, false or auto")


def configure_backends(device: torch.device) -> None:
    """Process-wide kernel settings for training on ``device`` (call once at start-up).

    cuDNN autotuning (``benchmark=True``) picks the fastest convolution algorithm per input shape once; training
    crops have one fixed size, so the search is paid once and every later step benefits. TF32 tensor-core matmuls
    for fp32 convolutions are PyTorch's default on Ampere+ and are left as they are.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Move ``model``'s 4-D parameters to NHWC (channels_last) in place when asked; returns ``model``.

    Inputs should be converted too (:func:`batch_to`), or the first conv converts them on every call.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def batch_to(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a (N, 3, H, W) batch to ``device`` (non-blocking from pinned memory) in the chosen memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return batch.to(device, non_blocking=True, memory_format=fmt)


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module | Callable:
    """``torch.compile(module)`` when ``enabled``, else ``module`` unchanged.

    Compilation happens lazily on the first call (seconds to minutes) and again whenever input shapes change;
    benchmarks time it separately from the steady state. Wrap DDP first and compile the DDP module (PyTorch's
    DDP + compile guidance: DDPOptimizer then splits the graph at gradient-bucket boundaries so communication
    still overlaps backward). Save :func:`training.distributed.unwrap` of the result.
    """
    if not enabled:
        return module
    return torch.compile(module)
