"""The precision policy: numeric precision, memory format and torch.compile, decided once per run.

Training (training/loop.py), stylize (the Runner) and the benchmarks all call :func:`resolve_precision` with the
device, the three settings and whether the run trains, and get a frozen :class:`PrecisionPolicy` back; nothing else
in the code base chooses an autocast dtype, a GradScaler, a memory format or compilation.

Settings (config keys ``train.precision`` / ``precision``, ``train.channels_last`` / ``channels_last``,
``train.compile`` / ``compile``):

- precision ``fp32``: no reduced precision; the reference every other setting is compared with.
- precision ``bf16``: bfloat16 has fp32's exponent range, so training needs no loss scaling. Needs native bf16:
  NVIDIA Ampere or newer, or a CPU with AMX-BF16 or AVX512-BF16 (:func:`cpu_bf16_hardware`). Allowed on other
  CPUs when asked for, with a warning, because they emulate it many times slower than fp32.
- precision ``fp16``: float16 (CUDA only). Training scales the loss with a GradScaler, because fp16 gradients of
  small losses underflow to zero otherwise (Micikevicius et al. 2018, "Mixed Precision Training").
- channels_last ``true``: NHWC memory layout for the network and its inputs; compile ``true``: ``torch.compile``.
- ``auto`` (every setting): the fastest choice for the device whose results stay within the tolerances of
  tests/core/test_precision.py. ``"true"``/``"false"`` strings are accepted like booleans.

What ``auto`` resolves to per device, for training and for stylizing, is the table in docs/architecture.md
("Precision policy"); :func:`auto_switches` and :func:`_precision_name` are the code of that table.

"Native bf16" on a CPU: AMX-BF16 or AVX512-BF16, read from the CPU flags at run time (:func:`cpu_bf16_hardware`).

Why training and inference differ where they do:

- Training runs the forward pass under autocast and keeps fp32 master weights; inference has no gradients, so it
  casts the network itself to the 16-bit type, which also halves the activations its memory estimate counts.
- On CUDA, inference picks fp16 even where bf16 is native: a forward pass of an instance-normalised network stays
  far inside fp16's range, and fp16 keeps 3 more mantissa bits for the 8-bit output. Training picks bf16 there
  because gradients need the range and then no loss scaling is needed.
- On a CPU the 16-bit type is bf16, for inference too: CPU fp16 matmuls run no faster than fp32, native bf16 ones
  several times faster.
- channels_last on CPU: oneDNN's NHWC kernels are faster for the forward pass alone, and for the whole bf16
  training step, but slower for the whole fp32 training step (README, "Speed and memory"); compile did not speed up
  CPU training, in fp32 or bf16; stylize compiles only when asked (``compile=true``, CUDA only): it meets a new
  input shape per image size, and on the CPU the fused path (models/fused.py) beat the compiled network (README,
  "Precision and kernels").

The defaults are ``auto`` except ``train.compile``, which defaults to false (configs/train.yaml): turning
compilation on is the user's choice, since its first step compiles for a while. Stylize's ``compile`` auto is off
on every device.

On the CPU the precision follows the hardware detected at run time (:func:`cpu_auto_precision`), never a constant
written for one machine: the same code base runs on CPUs with AMX, with AVX512-BF16 only, and with AVX2 only.
The log line names the reason, e.g. ``precision: bf16 (auto: AMX detected), channels_last: on, ...``.

Whatever the precision, our code keeps the numerically fragile parts in fp32: Gram matrices and loss reductions
(models/loss.py) and instance-norm statistics (models/norm.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.device import cpu_flags
from core.errors import FaststyleError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SWITCH_VALUES = ("auto", True, False)
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Each precision name's dtype: the one mapping of the project (the policy, the benchmarks)."""

# channels_last / compile under "auto", per device type, mode (training?) and precision ("any": every precision);
# a device type not listed gets the CPU's. CPU training: NHWC made the fp32 step slower but the bf16 step faster;
# CUDA training: with bf16, channels_last + compile gave the fastest step (README, "Speed and memory").
AUTO_SWITCHES: dict[tuple[str, bool, str], dict[str, bool]] = {
    ("cpu", True, "fp32"): {"channels_last": False, "compile": False},
    ("cpu", True, "bf16"): {"channels_last": True, "compile": False},
    ("cpu", False, "any"): {"channels_last": True, "compile": False},
    ("mps", True, "any"): {"channels_last": False, "compile": False},
    ("mps", False, "any"): {"channels_last": True, "compile": False},
    ("cuda", True, "any"): {"channels_last": True, "compile": True},
    ("cuda", False, "any"): {"channels_last": True, "compile": False},
}


def auto_switches(device_type: str, training: bool, precision: str) -> dict[str, bool]:
    """The ``auto`` row of :data:`AUTO_SWITCHES` for a device type, mode and (resolved) precision."""
    for key in ((device_type, training, precision), (device_type, training, "any")):
        if key in AUTO_SWITCHES:
            return AUTO_SWITCHES[key]
    return auto_switches("cpu", training, precision if precision in ("fp32", "bf16") else "fp32")


def precision_name(dtype: torch.dtype) -> str:
    """The precision name of a dtype of :data:`PRECISION_DTYPES` ("fp32", "fp16", "bf16")."""
    return next(name for name, known in PRECISION_DTYPES.items() if known == dtype)


def cuda_supports_bf16(device: torch.device) -> bool:
    """Native bf16 (compute capability >= 8.0, Ampere); emulated bf16 on older GPUs is slower than fp16."""
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, docs "CPU Dispatcher Control") below which its bf16 kernels are emulated, and
# below which AMX is off. A cap above these, or none, leaves what the CPU flags say.
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)
_ONEDNN_ISAS_WITHOUT_AMX = _ONEDNN_ISAS_WITHOUT_BF16 | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"}


def cpu_bf16_hardware() -> str | None:
    """The instructions that compute bf16 natively on this CPU, as oneDNN will use them: "AMX" (AMX-BF16),
    "AVX512-BF16", or None where bf16 is emulated.

    Read from the kernel's CPU flags, not the vendor (recent AMD CPUs have AVX512-BF16 too), and capped by the
    ``ONEDNN_MAX_CPU_ISA`` (or older ``DNNL_MAX_CPU_ISA``) environment variable, which limits the instructions
    oneDNN's convolutions and matmuls may use. Emulated bf16 runs far slower than fp32; native bf16 matmuls run
    several times faster. Unknown (not Linux, or a torch without oneDNN): None, the safe side.
    """
    flags = set(cpu_flags() or ())
    if not flags or not torch.backends.mkldnn.is_available():
        return None
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if "amx_bf16" in flags and cap not in _ONEDNN_ISAS_WITHOUT_AMX:
        return "AMX"
    if flags & {"amx_bf16", "avx512_bf16"} and cap not in _ONEDNN_ISAS_WITHOUT_BF16:
        return "AVX512-BF16"
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (:func:`cpu_bf16_hardware` names the instructions)."""
    return cpu_bf16_hardware() is not None


def cpu_auto_precision(training: bool) -> tuple[str, str]:
    """What ``auto`` picks on this CPU, and why (for the log line): bf16 where the CPU computes it natively, fp32
    elsewhere.

    Native bf16 is faster than fp32 for the training step and for stylize and passes the quality gates (the figures
    and their commands: README, "Speed and memory"); without native bf16 it is emulated and many times slower.
    ``training`` is an argument because the two modes pass separate gates and may come to differ.
    """
    hardware = cpu_bf16_hardware()
    if hardware is None:
        return "fp32", "no native bf16 on this CPU"
    return "bf16", f"{hardware} detected"


@dataclass(frozen=True)
class PrecisionPolicy:
    """One run's resolved settings.

    ``name``: fp32 | fp16 | bf16. ``dtype``: the 16-bit type (None for fp32): under autocast when training, the
    type the network and its inputs are cast to for inference. ``use_grad_scaler``: fp16 training only.
    ``device_type``: "cpu", "cuda", "mps". ``training``: which column of the table above was used.
    """

    name: str
    dtype: torch.dtype | None
    use_grad_scaler: bool
    channels_last: bool
    compile: bool
    device_type: str
    training: bool
    reason: str = ""

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def tensor_dtype(self) -> torch.dtype:
        """The dtype inference casts the network and its inputs to; float32 for training, whose module keeps its
        own dtype (autocast converts per op)."""
        return self.dtype if self.dtype is not None and not self.training else torch.float32

    @property
    def activation_bytes_factor(self) -> float:
        """Activation bytes relative to fp32 (0.5 for 16-bit inference): scales fp32 memory estimates."""
        return self.tensor_dtype.itemsize / 4

    def describe(self) -> str:
        """One line for the log, e.g. ``precision: fp32, channels_last: on, compile: off (cpu, stylize)``."""
        name = f"{self.name} + loss scaling" if self.use_grad_scaler else self.name
        if self.reason:
            name = f"{name} (auto: {self.reason})"
        on = {True: "on", False: "off"}
        return (
            f"precision: {name}, channels_last: {on[self.channels_last]}, compile: {on[self.compile]} "
            f"({self.device_type}, {'train' if self.training else 'stylize'})"
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the training forward pass and loss (not ``backward`` or the optimizer step); a no-op for fp32
        and for inference, whose network is cast instead (:meth:`prepare_module`)."""
        if self.dtype is None or not self.training:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled for fp16 training only; a disabled one passes ``scale``/``step``/``update``
        straight through, so the training step is written once for every precision."""
        # A disabled scaler never touches the device; "cpu" avoids a CUDA warning on machines without one.
        device = self.device_type if self.use_grad_scaler else "cpu"
        return torch.amp.GradScaler(device, enabled=self.use_grad_scaler)

    def prepare_module(self, module: nn.Module, device: torch.device | None = None) -> nn.Module:
        """Move ``module`` (in place) to ``device`` and the memory format; for inference also to
        :attr:`tensor_dtype` (training keeps the module's own dtype: autocast converts per op)."""
        module.to(device=device, dtype=None if self.training else self.tensor_dtype)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def batch_to(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A (N, C, H, W) batch on ``device`` in the memory format (and, for inference, :attr:`tensor_dtype`),
        non-blocking from pinned memory; without this the first convolution converts it on every call."""
        dtype = None if self.training else self.tensor_dtype
        return batch.to(device, dtype, non_blocking=True, memory_format=self.memory_format)

    def maybe_compile(self, module: nn.Module) -> nn.Module | Callable:
        """``torch.compile(module)`` when the policy compiles, else ``module``.

        Compilation happens on the first call and again when input shapes change. Wrap DDP first and compile the
        DDP module (PyTorch's DDP + compile guidance: gradient communication still overlaps backward); save
        :func:`models.modelfile.unwrap_model` of the result.
        """
        return torch.compile(module) if self.compile else module


def _precision_name(name: str, device: torch.device, training: bool) -> tuple[str, str]:
    """``name`` checked against ``device``, with ``auto`` replaced by the table's choice, and the reason for that
    choice ("" when asked for); FaststyleError if the device cannot run it. Explicit requests are honoured or
    refused, never silently replaced."""
    if name not in PRECISIONS:
        raise FaststyleError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            if not training:
                return "fp16", "CUDA inference"
            if cuda_supports_bf16(device):
                return "bf16", "GPU with native bf16"
            return "fp16", "GPU without native bf16"
        if kind == "cpu":
            return cpu_auto_precision(training)
        return "fp32", f"{kind} default"
    if name == "fp16" and kind != "cuda":
        raise FaststyleError(
            f"precision=fp16 needs a CUDA device (device is {kind}): use precision=fp32 or auto, or device=cuda"
        )
    if name == "bf16" and kind == "cuda" and not cuda_supports_bf16(device):
        raise FaststyleError(
            f"precision=bf16 needs an Ampere or newer GPU ({torch.cuda.get_device_name(device)} has no native bf16): "
            "use precision=fp16 or auto"
        )
    if name == "bf16" and kind == "mps":
        raise FaststyleError("precision=bf16 is not supported on MPS here: use precision=fp32 or auto")
    return name, ""


def resolve_switch(
    value: bool | str, setting: str, device: torch.device, training: bool, precision: str = "fp32"
) -> bool:
    """A channels_last / compile value: a bool, "true"/"false" (command-line overrides sometimes arrive quoted) or
    "auto" (see :data:`AUTO_SWITCHES`; ``precision`` is the resolved one)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text == "auto":
        return auto_switches(device.type, training, precision)[setting]
    raise FaststyleError(f"{setting}={value!r} is not valid: use auto, true or false")


def resolve_precision(
    device: torch.device,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    compile: bool | str = "auto",
    *,
    training: bool,
) -> PrecisionPolicy:
    """The policy for a run on ``device``: every ``auto`` resolved, impossible requests refused (FaststyleError).

    Pure: no logging and no process-wide state; :func:`configure_backends` applies and logs the result.
    """
    name, reason = _precision_name(str(precision), device, training)
    return PrecisionPolicy(
        name=name,
        dtype=None if name == "fp32" else PRECISION_DTYPES[name],
        use_grad_scaler=training and name == "fp16",
        channels_last=resolve_switch(channels_last, "channels_last", device, training, name),
        compile=resolve_switch(compile, "compile", device, training, name),
        device_type=device.type,
        training=training,
        reason=reason,
    )


def configure_backends(policy: PrecisionPolicy) -> None:
    """Process-wide kernel settings for ``policy`` and one log line of the choices; call once at start-up.

    cuDNN autotuning (``benchmark``) times every convolution algorithm once per input shape: training crops have
    one shape, so the search is paid once; stylize meets a new shape per image size, where the search costs far
    more than it saves, and keeps cuDNN's heuristics.
    Matmul precision stays PyTorch's default (full fp32), because the fp32 Gram matrices of the loss are matmuls.
    """
    if policy.device_type == "cuda":
        torch.backends.cudnn.benchmark = policy.training
    if policy.name == "bf16" and policy.device_type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "precision=bf16: this CPU has no native bf16 (AMX or AVX512-BF16), so it runs emulated and much slower "
            "than fp32; precision=auto uses fp32"
        )
    logger.info("%s", policy.describe())
