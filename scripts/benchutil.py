"""Helpers shared by the benchmark scripts: a measured matmul peak, timing, peak memory, environment line.

Figures are printed, never asserted: speed targets are read off these scripts' output, and the
README's speed table quotes it with the command that produced it.
"""

from __future__ import annotations

import platform
import resource
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


def matmul_peak_gflops(device: torch.device, size: int = 2048, seconds: float = 2.0) -> float:
    """Measured fp32 matmul throughput (GFLOP/s) on ``device``: the practical peak other figures are compared to.

    A square fp32 matmul of ``size`` is the best case for the BLAS library (2*size^3 flops per call); the best of
    several timed calls is taken, for about ``seconds`` of work.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    flops = 2.0 * size**3
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment_line(device: torch.device) -> str:
    """One line saying what the figures were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (
        f"# torch {torch.__version__}, device {device} ({name}), "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    )
