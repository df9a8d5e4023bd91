"""What the benchmarks share: timing, a measured matmul peak, peak memory, the fresh worker process each
measurement runs in, the random model they time, and the line saying which precision policy a figure was measured
under (printed beside the figures with core.device.environment_line, so that tables side by side can be compared).

Figures are printed, never asserted: speed targets are read off the benchmarks' output, and the README's speed
table quotes it with the command that produced it. On a shared machine, run them one at a time under
``flock /tmp/faststyle-cpu.lock`` (a benchmark never takes a lock itself).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 2.0
) -> float:
    """Measured matmul throughput (GFLOP/s) of ``dtype`` on ``device``: the practical peak other figures are compared
    to (fp32, and bf16/fp16 for reduced-precision variants, measured in the same run).

    A square matmul of ``size`` is the best case for a GEMM library (2*n^3 flops per call); the best of several timed
    calls is taken, for about ``seconds`` of work per library. On the CPU, torch.mm runs fp32 in MKL and bf16 in
    oneDNN, and MKL does not take its fastest path on every CPU (AMD), so the same GEMM also runs as a 1x1
    convolution (oneDNN, the library of the network's convolutions) and the better of the two is the peak. Where the
    dtype is emulated (bf16 without AMX or AVX512-BF16 runs a reference kernel: a 2048^2 call can take a minute)
    the size is halved until one call fits a quarter of ``seconds``: the peak costs seconds, not minutes.
    """
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def as_mm(n: int) -> Callable[[], object]:
        a, b = randn(n, n), randn(n, n)
        return lambda: torch.mm(a, b)

    def as_conv(n: int) -> Callable[[], object]:
        # (1, n, n/32, 32) x (n, n, 1, 1) in NHWC is an (n x n) @ (n x n) GEMM in oneDNN.
        x = randn(1, n, n // 32, 32).contiguous(memory_format=torch.channels_last)
        w = randn(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        return lambda: torch.nn.functional.conv2d(x, w)

    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    def peak(make: Callable[[int], Callable[[], object]]) -> float:
        n = min(256, size)
        timed(make(n))  # library initialisation, not counted
        while n < size and timed(make(n)) * 8 <= seconds / 4:  # the next size costs ~8x this one
            n *= 2
        fn = make(n)
        best = timed(fn)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            best = min(best, timed(fn))
        return 2.0 * n**3 / best / 1e9

    with torch.inference_mode():
        return max(peak(as_mm), peak(as_conv)) if device.type == "cpu" else peak(as_mm)


def reduced_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit type whose peak the benchmarks print beside fp32's: fp16 on CUDA (what stylize runs there), bf16
    elsewhere (the only 16-bit type CPU training and stylize use)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def precision_line(device: torch.device) -> str:
    """One line saying whether this CPU has native bf16 and what ``auto`` resolves to (core.precision) for stylize
    and for training, with the ISA-capping variables when set, so a table says which policy it was measured under
    (on a CPU without native bf16, auto must stay fp32)."""
    from core.precision import cpu_has_native_bf16, resolve_precision

    stylize = resolve_precision(device, "auto", "auto", False, training=False).describe()
    train = resolve_precision(device, "auto", "auto", "auto", training=True).describe()
    caps = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ]
    lines = [f"# auto = {stylize}", f"# auto = {train}"]
    if device.type == "cpu":
        native = "yes" if cpu_has_native_bf16() else "no (bf16 is emulated)"
        lines.insert(0, f"# native bf16: {native}" + (f", ISA capped by {' '.join(caps)}" if caps else ""))
    return "\n".join(lines)


def torch_instance_norms(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` (in place) with each of our InstanceNorms replaced by torch's nn.InstanceNorm2d: the TransformerNet of
    the plain configuration, the way pytorch/examples runs it. The swap is interop/export.py's (the ONNX export
    needs the same form); a network left with none of torch's norms would measure ours, so that is an error."""
    from interop.exportable import swap_instance_norms

    if swap_instance_norms(net) == 0:
        raise ValueError("no InstanceNorm to replace with nn.InstanceNorm2d: the plain variants need norm=instance")
    return net


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: Linux's VmHWM, the high-water mark of the address
    space this program's exec created. Not ru_maxrss, which a child process inherits from its parent's peak across
    fork and exec (a benchmark's fresh worker would report the parent's peak when that is larger); ru_maxrss only
    where /proc is missing (macOS reports it in bytes, Linux in KiB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024.0


def run_worker(benchmark: str, args: list[str], cwd: Path | None = REPO_ROOT) -> tuple[dict | None, str]:
    """Run ``python -m benchmarks BENCHMARK ARGS`` (a benchmark's hidden worker option) in a fresh process, so that
    its peak memory is its own and no cache of one measurement helps the next.

    Returns (the JSON object the worker prints on its last stdout line, or None when it failed; its stderr).
    ``cwd=None`` keeps this process's folder (for relative paths in ``args``).
    """
    command = [sys.executable, "-m", "benchmarks", benchmark, *args]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def save_random_model(path: Path, base_width: int = 32) -> Path:
    """A randomly initialised TransformerNet (seed 0) saved as a faststyle model file at ``path``: weights change
    neither speed nor memory, so the benchmarks time this unless given a trained model."""
    from models.modelfile import save_model
    from models.transformer import TransformerNet

    torch.manual_seed(0)
    save_model(path, TransformerNet(base_width=base_width).eval(), {"style_stem": "random"})
    return path
