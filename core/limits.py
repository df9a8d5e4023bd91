"""The shape ranges of a style network, shared by the training config (``configs/schema.py``: ``model.*``) and the
model-file reader (``models/modelfile.py``), which sit in layers that cannot import each other
(docs/architecture.md, "Packages").

A model file is checked against the same ranges a training run may use, so a file whose config claims a network
nobody can train (``base_width=1000000000``, a million residual blocks) is refused with one line when it is read,
before anything is allocated.
"""

from __future__ import annotations

MODEL_RANGES: dict[str, tuple[int, int]] = {
    "base_width": (1, 256),  # 32 in the paper; 256 is already ~64x its compute
    "residual_blocks": (0, 64),  # 5 in the paper
    "num_styles": (1, 1024),  # a multi-style network's (gamma, beta) table rows
}
"""Inclusive (lowest, highest) value of each integer ``TransformerNet`` argument."""
