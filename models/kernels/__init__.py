"""Fused C++ CPU kernels of the layers in models/ (one ``NAME.cpp`` each) and their build (build.py).

The layers decide per call whether a kernel applies and keep a PyTorch-op path for everything else; this package
only says whether a kernel's ops are loaded (:func:`load_kernel`), building it on first use.
"""

from models.kernels.build import FusedKernel, load_kernel

INSTANCE_NORM = FusedKernel(
    name="instance_norm",
    layer="InstanceNorm",
    switch="FASTSTYLE_NORM_KERNEL",
    fallback="the eager path",
    fallback_cost="2-3x slower on CPU",
    log_as="models.norm",
)
"""models/norm.py's InstanceNorm forward and backward (instance_norm.cpp: torch.ops.faststyle_norm.forward and
.backward), for float32/float64/bfloat16/float16 CPU tensors."""

__all__ = ["INSTANCE_NORM", "FusedKernel", "load_kernel"]
