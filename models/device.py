"""Device selection: the one place that turns a config string into a torch.device."""

from __future__ import annotations

import torch

from errors import FaststyleError

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
