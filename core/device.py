"""Device selection: the one place that turns a config string into a torch.device."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from core.errors import FaststyleError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str) -> torch.device:
    """Return the device for ``name``: "auto" picks cuda, then mps, then cpu.

    "cuda:1" style indices are accepted. A device that was asked for by name but is not available raises
    FaststyleError rather than silently running somewhere else.
    """
    kind = name.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise FaststyleError(f"unknown device {name!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FaststyleError(f"device={name} was requested but CUDA is not available: use device=auto or device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise FaststyleError(f"device={name} was requested but MPS is not available: use device=auto or device=cpu")
    return torch.device(name)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h> mallopt parameters


def reuse_freed_memory() -> bool:
    """Make glibc malloc keep freed large blocks for reuse instead of unmapping them (process-wide).

    Why: by default every tensor above ~32 MiB is a fresh mmap whose pages the kernel zero-fills on first touch,
    and inference (layer after layer) and training (VGG activations, every step) allocate and free such tensors
    all the time, so page faults took a large share of the time; the price is more resident memory (README,
    "Speed and memory"; scripts/bench_stylize.py variant channels_last_malloc, scripts/bench_train.py option
    malloc). Returns False where unavailable (not glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.debug("glibc mallopt unavailable: large tensors are mmapped afresh (slower on CPU)")
    return ok


def release_freed_heap() -> None:
    """Return the free pages of the C heap to the OS (glibc ``malloc_trim``; nothing elsewhere).

    With :func:`reuse_freed_memory`, freed blocks stay resident; the tiled executor calls this after each layer so
    that one layer's strips do not stay resident next to the stores and strips of the following layers, whose
    sizes differ. One call costs a few ms and one round of page faults for the next strips.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("glibc malloc_trim unavailable: freed heap pages stay resident")


def host_memory_available() -> int | None:
    """Bytes of RAM this process may still allocate without swapping or being killed (None if unknown): Linux's
    MemAvailable, lowered to what a cgroup memory limit (v2 or v1: a container, a Slurm job) leaves."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            available = None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = Path(limit_file).read_text(encoding="ascii").strip()
            used = Path(usage_file).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if limit.isdigit() and used.isdigit() and int(limit) < 2**60:  # "max" / a huge v1 number: no limit
            left = max(int(limit) - int(used), 0)
            available = left if available is None else min(available, left)
    return available


def cpu_flags() -> list[str] | None:
    """The CPU's feature flags, in the kernel's order, from /proc/cpuinfo (Linux: the "flags" line on x86,
    "Features" on ARM), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return None


def environment_line(device: torch.device) -> str:
    """One line saying what figures were measured on (torch, the device, threads, Python), for reports and
    benchmarks alike."""
    import platform

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (
        f"# torch {torch.__version__}, device {device} ({name}), "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    )
