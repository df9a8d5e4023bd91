"""Time onnxruntime against PyTorch eager for one image (default 1920x1080, base width 32, 5 residual blocks).

    flock /tmp/faststyle-cpu.lock .venv/bin/python -m benchmarks export --height 1080 --width 1920 --repeats 3

Exports a randomly initialised TransformerNet (weights do not change the cost) to a temporary ONNX file with
interop/export.py, then prints the median seconds per image of: PyTorch eager (NCHW, inference_mode), and
onnxruntime (CPU provider, default threads), plus the max |difference| between the two outputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import time_call
from core.cli import tool_parser
from interop.onnx_export import export_onnx
from interop.onnx_model import OnnxStyleModel
from models.transformer import TransformerNet

CPU = torch.device("cpu")


def _median_seconds(fn: Callable, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn(x)`` after one warm-up call (allocations, onnxruntime's first-run graph setup), and
    the last output."""
    out = {}

    def call() -> None:
        out["y"] = fn(x)

    return time_call(call, CPU, warmup=1, repeats=repeats), out["y"]


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser("python -m benchmarks export", __doc__)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--base-width", type=int, default=32)
    parser.add_argument("--residual-blocks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    net = TransformerNet(base_width=args.base_width, residual_blocks=args.residual_blocks).eval()
    x = torch.rand(1, 3, args.height, args.width)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net, Path(tmp) / "bench.onnx")
        runner = OnnxStyleModel(path)
        with torch.inference_mode():
            eager_s, eager_out = _median_seconds(net, x, args.repeats)
        ort_s, ort_out = _median_seconds(runner, x, args.repeats)
    print(
        f"{args.width}x{args.height}, base_width {args.base_width}, {args.residual_blocks} blocks, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"pytorch eager : {eager_s:.2f} s/image (median of {args.repeats})")
    print(f"onnxruntime   : {ort_s:.2f} s/image (median of {args.repeats})")
    print(f"max |ort - eager| = {float((ort_out - eager_out).abs().max()):.2e}")
    return 0
