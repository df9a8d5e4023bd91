"""Benchmark our InstanceNorm against nn.InstanceNorm2d: forward + backward time, side by side, with the ratio.

Both modules are affine (gamma, beta), train mode, no running stats (the configuration TransformerNet uses), with
input, gradient and parameters in the --dtype (fp32 by default; bf16/fp16 as in a network cast to that dtype; with
--autocast the parameters stay float32 and the forward runs under torch.autocast, as mixed-precision training does).
Each repetition runs forward, then backward with a fixed upstream gradient (--forward-only: forward alone, under
no_grad, as in inference); ours and torch's alternate inside the loop so that load from other processes hits both
alike. The figure is the median over the repetitions.

Usage:
    flock /tmp/faststyle-cpu.lock .venv/bin/python -m benchmarks norm            # CPU (+ CUDA if present)
    .venv/bin/python -m benchmarks norm --device cpu --reps 5 --channels-last
    .venv/bin/python -m benchmarks norm --device cpu --dtype bf16 --forward-only
    .venv/bin/python -m benchmarks norm --device cpu --dtype bf16 --autocast      # bf16 training's configuration

Both sides run with glibc malloc reuse (core.device.reuse_freed_memory, as train.py and stylize.py do);
--no-malloc-reuse turns it off. The first run in a fresh environment also builds our fused C++ kernel (~13 s, see
models/norm.py), outside the timed loop.

The figures measured with it are in the README's speed table; the script prints them with the machine they were
taken on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from benchmarks.common import synchronize
from core.cli import tool_parser
from core.device import reuse_freed_memory
from core.precision import PRECISION_DTYPES
from models.norm import InstanceNorm

DEFAULT_SHAPES = ((4, 128, 64, 64), (4, 32, 256, 256), (1, 32, 1080, 1920))


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not like 4,128,64,64") from None
    if len(shape) < 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} needs N,C and at least one spatial size, all >= 1")
    return shape


def bench_shape(
    shape: tuple[int, ...],
    device: torch.device,
    reps: int,
    warmup: int,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
    forward_only: bool = False,
    autocast: bool = False,
) -> tuple[float, float]:
    """Median seconds of forward+backward (or forward alone) for (ours, nn.InstanceNorm2d/1d/3d) at ``shape``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    if channels_last and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, grad = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
    x.requires_grad_(not forward_only)
    c = shape[1]
    ref_cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[len(shape)]
    param_dtype = torch.float32 if autocast else dtype
    ours = InstanceNorm(c, affine=True).to(device, param_dtype)
    ref = ref_cls(c, affine=True).to(device, param_dtype)
    amp = torch.autocast(device.type, dtype=dtype, enabled=autocast)

    def step(module: nn.Module) -> float:
        synchronize(device)
        start = time.perf_counter()
        if forward_only:
            with torch.no_grad(), amp:
                module(x)
        else:
            with amp:
                y = module(x)
            y.backward(grad)
        synchronize(device)
        elapsed = time.perf_counter() - start
        x.grad = None
        module.zero_grad(set_to_none=True)
        return elapsed

    for _ in range(warmup):
        step(ours)
        step(ref)
    ours_t, ref_t = [], []
    for _ in range(reps):
        ours_t.append(step(ours))
        ref_t.append(step(ref))
    return statistics.median(ours_t), statistics.median(ref_t)


def main(argv: list[str] | None = None) -> int:
    # Long: half of it is the command line's options; the rest is the side-by-side table.
    parser = tool_parser("python -m benchmarks norm", __doc__)
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, and CUDA too when present"
    )
    parser.add_argument(
        "--shape", type=_parse_shape, action="append", help="N,C,H,W (repeatable); default: the three issue shapes"
    )
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (default: 15, 5 for >50M elements)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC input and gradient")
    parser.add_argument(
        "--dtype",
        choices=tuple(PRECISION_DTYPES),
        default="fp32",
        help="input, gradient and parameter dtype (default fp32)",
    )
    parser.add_argument("--forward-only", action="store_true", help="time forward alone, under no_grad (inference)")
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="parameters in float32, forward under torch.autocast to --dtype (mixed-precision training); "
        "by default the parameters are in --dtype",
    )
    parser.add_argument(
        "--no-malloc-reuse",
        action="store_true",
        help="leave glibc malloc at its defaults (by default both sides run with core.device.reuse_freed_memory, "
        "as train.py and stylize.py do)",
    )
    args = parser.parse_args(argv)

    # Like train.py and stylize.py: keep freed large blocks for reuse instead of page-faulting fresh mmaps. It
    # applies process-wide, so to ours and to torch's alike.
    malloc_reuse = False if args.no_malloc_reuse else reuse_freed_memory()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("error: --device cuda was asked for but CUDA is not available: use --device cpu", file=sys.stderr)
            return 2
        devices.append(torch.device("cuda"))
    shapes = args.shape or list(DEFAULT_SHAPES)

    print(
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, dtype={args.dtype}, "
        f"{'forward only' if args.forward_only else 'forward+backward'}, channels_last={args.channels_last}, "
        f"params={'fp32 (autocast)' if args.autocast else args.dtype}, "
        f"malloc reuse (both sides)={malloc_reuse}"
    )
    print(f"{'device':<7}{'shape':<22}{'ours ms':>10}{'torch ms':>10}{'speed-up':>10}")
    for device in devices:
        for shape in shapes:
            numel = 1
            for s in shape:
                numel *= s
            reps = args.reps or (5 if numel > 50_000_000 else 15)
            ours_s, ref_s = bench_shape(
                shape,
                device,
                reps,
                args.warmup,
                args.channels_last,
                PRECISION_DTYPES[args.dtype],
                args.forward_only,
                args.autocast,
            )
            print(
                f"{device.type:<7}{str(shape):<22}{ours_s * 1e3:>10.2f}{ref_s * 1e3:>10.2f}{ref_s / ours_s:>9.2f}x",
                flush=True,
            )
    return 0
