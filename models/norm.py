"""Our instance normalisation layer and the normalisation switch ``make_norm``.

Instance norm (Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization: The Missing Ingredient for Fast
Stylization", arXiv:1607.08022) normalises each sample and each channel over all spatial positions:

    y[n, c, ...] = gamma[c] * (x[n, c, ...] - mu[n, c]) / sqrt(var[n, c] + eps) + beta[c]

with the biased variance, exactly like ``torch.nn.InstanceNorm2d``.

Three implementations of that formula, chosen per call:

* CPU, float32/float64/bfloat16/float16: a fused C++ kernel (``models/kernels/instance_norm.cpp``,
  ``_FusedInstanceNormFunction``), compiled on first use by ``models/kernels/build.py`` and cached in torch's
  extension directory. It reads each tensor from memory about once per pass, which is what lets it beat
  ``nn.InstanceNorm2d`` (README, "Speed and memory"; ``python -m benchmarks norm`` measures both). A 16-bit
  tensor stays 16-bit in memory: the kernel widens it chunk by chunk and does all its arithmetic in float32, with
  weight and bias (and their gradients) in float32. When it cannot be built, ONE warning names the cause and the
  eager path below runs instead.
* Otherwise (CUDA and other devices, or no kernel): ``_InstanceNormFunction``, torch ops with a hand-written
  closed-form backward, so that autograd keeps no intermediates, and every large result written into a buffer we
  own, because fresh large allocations page-fault on CPU and cost as much as the op itself. It takes float16/bfloat16
  inputs as a float32 copy and rounds the output back.
* While a tracer, exporter or compiler records the graph: ``_plain_instance_norm``, the same maths in plain
  differentiable ops that they understand. ``InstanceNorm.to_torch()`` gives the equivalent ``nn.InstanceNorm2d``,
  which interop/export.py swaps in so that ONNX gets a single ``InstanceNormalization`` node.

All of them take the variance in two passes, the mean first and then the squared deviations from it (the kernel
and the eager path also correct for the rounding of that mean, after Chan, Golub & LeVeque 1983): the one-pass
``E[x^2] - E[x]^2`` cancels catastrophically in float32 and returns negative variances for inputs such as
randn + 1e4, and ``torch.var_mean`` is stable but slower on CPU than two plain passes (docs/architecture.md,
"Numerics").
Channels-last inputs are reduced as (N, M, C) views without a copy and keep their memory format.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from models.kernels import INSTANCE_NORM, load_kernel

NORM_KINDS = ("instance", "batch", "none")


def _cl_format(dim: int) -> torch.memory_format | None:
    """The channels-last memory format for a tensor of ``dim`` dims (4: NHWC, 5: NDHWC), else None."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(dim)


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is stored channels-last (and not also plain contiguous, as tensors with one channel or one
    position are): the layout the kernels then take it in."""
    fmt = _cl_format(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _to_3d(x: Tensor, rd: int) -> Tensor:
    """View ``x`` (N, C, *spatial) as 3-D, copying only if its memory layout differs from the one ``rd`` names.

    rd 2: (N, C, M) over contiguous memory; rd 1: (N, M, C) over channels-last memory (M = spatial positions).
    """
    n, c = x.shape[0], x.shape[1]
    if rd == 2:
        return x.contiguous().view(n, c, -1)
    x = x.contiguous(memory_format=_cl_format(x.dim()))
    return x.permute(0, *range(2, x.dim()), 1).reshape(n, -1, c)


def _empty_in_layout(shape: torch.Size, rd: int, like: Tensor) -> Tensor:
    """An uninitialised (N, C, *spatial) tensor in the memory layout named by ``rd``."""
    if rd == 2:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_cl_format(len(shape)))


def _channel_shape(rd: int, c: int) -> tuple[int, int, int]:
    """Broadcast shape of a per-channel vector against the 3-D view."""
    return (1, c, 1) if rd == 2 else (1, 1, c)


class _InstanceNormFunction(torch.autograd.Function):
    """Instance norm with owned buffers and a closed-form backward, on a float32/float64 (N, C, *spatial) tensor
    (``InstanceNorm`` hands it 16-bit inputs as float32 copies).

    forward(x, weight|None, bias|None, eps) -> (y, mean (N, C), biased var (N, C)); mean and var are not
    differentiable outputs (they only feed the running statistics). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):  # type: ignore[override]
        n, c = x.shape[0], x.shape[1]
        rd = 1 if is_channels_last(x) else 2
        xs = _to_3d(x, rd)
        m = xs.shape[rd]
        y = _empty_in_layout(x.shape, rd, x)
        ys = _to_3d(y, rd)  # a view of y's memory (same layout): writing ys writes y
        # xc (the centred input) gets its own buffer: the backward pass needs it, and saving it is cheaper than
        # recomputing it there (one pass either way, but a saved buffer needs no second allocation).
        xc = torch.empty_like(xs)
        mean = xs.sum(rd, keepdim=True).div_(m)
        torch.sub(xs, mean, out=xc)
        # Corrected two-pass algorithm (Chan, Golub & LeVeque 1983): the float32 mean of values near 1e4 is off by
        # ~1e-3; d = mean(xc) measures that error, and we fold it in below instead of another pass over memory.
        d = xc.sum(rd, keepdim=True).div_(m)
        if rd == 2:
            # vector_norm over the contiguous last dim is vectorised: about twice as fast as mul + sum.
            var = torch.linalg.vector_norm(xc, dim=rd, keepdim=True).square_().div_(m)
        else:
            # over the middle dim vector_norm is not vectorised (many times slower): square into the output buffer
            # and sum.
            torch.mul(xc, xc, out=ys)
            var = ys.sum(rd, keepdim=True).div_(m)
        var = (var - d * d).clamp_(min=0)
        mean = mean + d
        rstd = (var + eps).rsqrt_()
        cshape = _channel_shape(rd, c)
        scale = rstd if weight is None else rstd * weight.view(cshape)
        # y = (xc - d) * scale + bias
        shift = -d * scale
        if bias is not None:
            shift = shift + bias.view(cshape)
        torch.addcmul(shift.expand_as(xs), xc, scale, out=ys)
        ctx.save_for_backward(xc, d, rstd, weight)
        ctx.rd = rd
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean.reshape(n, c), var.reshape(n, c)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):  # type: ignore[override]
        xc, d, rstd, weight = ctx.saved_tensors
        rd, shape = ctx.rd, ctx.x_shape
        n, c = shape[0], shape[1]
        m = xc.shape[rd]
        # grad_y has the layout of whatever produced it: bring it to ours (a copy only when it differs).
        gs = _to_3d(grad_y.to(xc.dtype), rd)
        grad_x = _empty_in_layout(shape, rd, xc)
        dx = _to_3d(grad_x, rd)
        # Per-instance sums over the spatial positions: sg = sum(g) and sgxc = sum(g * xc) (g * xc staged in dx).
        sg = gs.sum(rd, keepdim=True)
        torch.mul(gs, xc, out=dx)
        sgxc = dx.sum(rd, keepdim=True)
        cshape = _channel_shape(rd, c)
        a = rstd if weight is None else rstd * weight.view(cshape)
        # Batch-norm gradient (Ioffe & Szegedy 2015) applied per instance, with xhat = xc * rstd:
        #   dx = a * (g - sum(g) / M - xhat * sum(g * xhat) / M),  a = gamma * rstd
        # written as dx = a * g + coef * xc + const so that it takes two passes over memory.
        # xc still carries the small mean error d: sum(g * (xc - d)) = sgxc - d * sg, and the d-term of
        # coef * (xc - d) goes into the constant.
        sgxc = sgxc - d * sg
        coef = a * rstd * rstd * sgxc / (-m)
        const = a * sg / (-m) - coef * d
        torch.addcmul(const.expand_as(xc), xc, coef, out=dx)
        dx.addcmul_(gs, a)
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (sgxc * rstd).reshape(n, c).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = sg.reshape(n, c).sum(0)
        return grad_x, grad_w, grad_b, None


# ------------------------------------------------------------------------------------------------------------------
# The fused C++ kernel (CPU; float32/float64/bfloat16/float16): models/kernels/instance_norm.cpp, built on first use by
# models/kernels/build.py.
# ------------------------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _use_fused_kernel(x: Tensor) -> bool:
    """True when the fused C++ kernel handles ``x`` (CPU float32/float64/bfloat16/float16), building it on first
    use."""
    if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return False
    return load_kernel(INSTANCE_NORM)


class _FusedInstanceNormFunction(torch.autograd.Function):
    """Instance norm by the fused C++ kernel: same contract as ``_InstanceNormFunction``, on the CPU, except that
    mean and var come back in float64 and that x may also be bfloat16/float16 (read and written in 16 bits, computed
    in float32); weight and bias are then float32 or x's dtype (the kernel reads them in float32), and their
    gradients come back in float32 (autograd rounds them to a 16-bit parameter's dtype).

    Forward is one statistics sweep plus one normalising sweep over x; backward one sweep for sum(g) and
    sum(g * (x - mean)) plus one sweep writing dx. Only x itself and (N, C) float64 statistics are saved.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):  # type: ignore[override]
        # The kernel takes x whole in either layout and allocates y like it (no views or allocations here: small ops
        # per call are a visible share of the time at training sizes).
        channels_last = is_channels_last(x)
        if not channels_last:
            x = x.contiguous()
        y, mean, var, rstd = torch.ops.faststyle_norm.forward(x, weight, bias, float(eps), channels_last)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.channels_last = channels_last
        ctx.has_bias = bias is not None
        # mean/var ((N, C)) stay float64 (only the running statistics read them, and convert), and no zero gradients
        # are made for them in backward.
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):  # type: ignore[override]
        if grad_y is None:  # grads are not materialised (see forward): nothing flowed back into y
            return None, None, None, None
        x, mean, rstd, weight = ctx.saved_tensors
        # grad_y has the layout of whatever produced it: bring it to ours (a copy only when it differs).
        fmt = _cl_format(x.dim()) if ctx.channels_last else torch.contiguous_format
        grad_x, grad_w, grad_b = torch.ops.faststyle_norm.backward(
            grad_y.to(x.dtype).contiguous(memory_format=fmt), x, mean, rstd, weight, ctx.channels_last
        )
        if weight is None or not ctx.needs_input_grad[1]:
            grad_w = None
        if not ctx.has_bias or not ctx.needs_input_grad[2]:
            grad_b = None
        return grad_x, grad_w, grad_b, None


class _NormStoreFunction(torch.autograd.Function):
    """Instance norm, then ReLU or a residual add, stored nearest-upsampled, reflection-padded (and, channels-last,
    in space-to-depth cells) for the next convolution: ``torch.ops.faststyle_norm.store``, one sweep instead of the
    four passes of norm, ReLU, upsample and pad (models/fused.py walks the network with it).

    forward(x, weight, bias, eps, relu, residual|None, up, pad, block) -> the stored buffer (see the kernel's
    store_op for its shape). Backward (``faststyle_norm.store_backward``) gathers the gradient of every stored copy
    of a pixel back onto it, masks it by the ReLU, whose sign it reads from the saved output (which the next
    convolution keeps anyway), and runs the fused norm backward on it. Saves x, the output and the (N, C)
    statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu, residual, up, pad, block):  # type: ignore[override]
        channels_last = is_channels_last(x)
        if not channels_last:
            x = x.contiguous()
        out, mean, _var, rstd = torch.ops.faststyle_norm.store(
            x, weight, bias, float(eps), channels_last, relu, residual, up, pad, block
        )
        ctx.save_for_backward(x, out, mean, rstd, weight)
        ctx.settings = (channels_last, relu, residual is not None, up, pad, block, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, out, mean, rstd, weight = ctx.saved_tensors
        channels_last, relu, has_residual, up, pad, block, has_bias = ctx.settings
        grad_x, grad_w, grad_b, grad_y = torch.ops.faststyle_norm.store_backward(
            grad_out, out, x, mean, rstd, weight, channels_last, relu, up, pad, block
        )
        if weight is None or not ctx.needs_input_grad[1]:
            grad_w = None
        if not has_bias or not ctx.needs_input_grad[2]:
            grad_b = None
        return grad_x, grad_w, grad_b, None, None, grad_y if has_residual else None, None, None, None


def norm_store(
    norm: InstanceNorm,
    x: Tensor,
    relu: bool,
    residual: Tensor | None = None,
    up: int = 1,
    pad: int = 0,
    block: int = 1,
) -> Tensor:
    """``norm(x)``, then ReLU (``relu``) or ``+ residual``, nearest-upsampled by ``up``, reflection-padded by ``pad``
    and with ``block`` > 1 (channels-last x only) rearranged into space-to-depth cells, in one sweep of the fused
    kernel. For :func:`can_store` inputs only (models/fused.py checks)."""
    return _NormStoreFunction.apply(x, norm.weight, norm.bias, norm.eps, relu, residual, up, pad, block)


def can_store(norm: nn.Module, x: Tensor) -> bool:
    """Whether :func:`norm_store` serves ``norm`` on ``x``: our InstanceNorm normalising by the input's statistics
    (no running statistics), a 4-D CPU tensor in a layout the kernel takes, no graph being recorded, and the kernel
    loaded."""
    return (
        isinstance(norm, InstanceNorm)
        and not norm.track_running_stats
        and x.dim() == 4
        and x.shape[0] > 0
        and not capturing_graph()
        and (x.is_contiguous() or is_channels_last(x))
        and _use_fused_kernel(x)
    )


def _plain_instance_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, ...]:
    """The same maths as ``_InstanceNormFunction`` in plain differentiable ops (for tracing/export/compile)."""
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=dims, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    cshape = (1, x.shape[1]) + (1,) * len(dims)
    if weight is not None:
        y = y * weight.view(cshape)
    if bias is not None:
        y = y + bias.view(cshape)
    return y, mean.detach().flatten(1), var.detach().flatten(1)


def capturing_graph() -> bool:
    """True while a tracer, exporter or compiler records the graph: layers then emit ordinary ops only (no custom
    Function, no CPU-specific layout changes)."""
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


class InstanceNorm(nn.Module):
    """Instance normalisation over (N, C, *spatial) (any number >= 1 of spatial dims) or unbatched (C, *spatial).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for numerical stability.
        affine: learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
        track_running_stats: keep ``running_mean``/``running_var`` (updated in training mode from the unbiased
            per-instance variance averaged over the batch, like nn.InstanceNorm2d) and use them in eval mode.
        momentum: running-average factor; ``None`` means a cumulative moving average over the batches seen
            (counted in ``num_batches_tracked``). Note: nn.InstanceNorm2d itself passes momentum 0.0 when
            momentum is None (its running stats then never move); we implement the documented cumulative average.

    Input/output: float tensor (N, C, *spatial) or (C, *spatial), any value range; output has the input's shape,
    dtype and memory format (channels-last stays channels-last). float16/bfloat16 inputs are normalised in float32
    arithmetic (the CPU kernel reads and writes them in 16 bits; the other paths work on a float32 copy), with
    weight and bias applied in float32 whatever their own dtype. A 3-D+ input whose dim 1 is not C but whose dim 0
    is C is taken as unbatched; a 2-D input is always (C, L) unbatched. An input matching neither raises ValueError
    naming the expected and the received shape.

    State-dict keys are those of nn.InstanceNorm2d (``weight``, ``bias``, and ``running_mean``, ``running_var``,
    ``num_batches_tracked`` when tracking), so weights load both ways.
    """

    # version 2 like torch's _NormBase, so nn.InstanceNorm2d state dicts carry the same metadata.
    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = False,
        track_running_stats: bool = False,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = int(num_features)
        self.eps = eps
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.momentum = momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _shape_error(self, x: Tensor) -> ValueError:
        c = self.num_features
        return ValueError(
            f"InstanceNorm({c}) expected input of shape (N, {c}, *spatial) or ({c}, *spatial) with at least one "
            f"spatial dim, got {tuple(x.shape)}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, *spatial) or (C, *spatial), floating point -> same shape, dtype and memory format."""
        c = self.num_features
        if x.dim() < 2:
            raise self._shape_error(x)
        if x.dim() == 2:
            unbatched = True
        elif x.shape[1] == c:
            unbatched = False
        elif x.shape[0] == c:
            unbatched = True
        else:
            raise self._shape_error(x)
        if unbatched:
            if x.shape[0] != c:
                raise self._shape_error(x)
            return self._forward_batched(x.unsqueeze(0)).squeeze(0)
        return self._forward_batched(x)

    def _forward_batched(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"InstanceNorm expects a floating-point tensor, got {x.dtype}")
        use_input_stats = self.training or not self.track_running_stats
        in_dtype = x.dtype
        # Arithmetic in float32 for half types (fp16 overflows sums of squares; bf16 has 8 mantissa bits): the
        # fused kernel does that itself on the 16-bit tensor, every other path gets a float32 copy.
        compute_dtype = torch.float32 if in_dtype in _HALF_DTYPES else in_dtype
        weight, bias = self.weight, self.bias
        fused = use_input_stats and not capturing_graph() and x.shape[0] > 0 and _use_fused_kernel(x)
        # The fused kernel takes weight and bias in float32 or in the input's own 16-bit dtype (a network cast to
        # bf16) and converts them itself, cheaper than an op here; the other paths get them in compute_dtype.
        params_ok = weight is None or (weight.dtype in (compute_dtype, in_dtype) and bias.dtype == weight.dtype)
        if weight is not None and weight.dtype != compute_dtype and not (fused and params_ok):
            # (C,) vectors: cheap; autograd takes their gradients back to the parameters' own dtype
            weight, bias = weight.to(compute_dtype), bias.to(compute_dtype)
        if use_input_stats:
            spatial = math.prod(x.shape[2:])
            if spatial <= 1:
                # Same rule as F.instance_norm: one value per instance normalises to 0 and gives no variance.
                raise ValueError(
                    f"InstanceNorm expects more than 1 spatial element when training, got {tuple(x.shape)}"
                )
            if fused:
                y, mean, var = _FusedInstanceNormFunction.apply(x, weight, bias, self.eps)
            elif capturing_graph() or x.shape[0] == 0:
                y, mean, var = _plain_instance_norm(x.to(compute_dtype), weight, bias, self.eps)
            else:
                y, mean, var = _InstanceNormFunction.apply(x.to(compute_dtype), weight, bias, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, spatial)
        else:
            cshape = (1, self.num_features) + (1,) * (x.dim() - 2)
            scale = torch.rsqrt(self.running_var.to(compute_dtype) + self.eps)
            if weight is not None:
                scale = scale * weight
            shift = -self.running_mean.to(compute_dtype) * scale
            if bias is not None:
                shift = shift + bias
            y = torch.addcmul(shift.view(cshape), x.to(compute_dtype), scale.view(cshape))
        return y if y.dtype == in_dtype else y.to(in_dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, spatial: int) -> None:
        """Running stats as nn.InstanceNorm2d: average over the batch of per-instance mean / unbiased variance."""
        if self.momentum is None:
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = float(self.momentum)
        batch_mean = mean.mean(0).to(self.running_mean.dtype)
        batch_var = (var * (spatial / (spatial - 1))).mean(0).to(self.running_var.dtype)
        self.running_mean.mul_(1 - factor).add_(batch_mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(batch_var, alpha=factor)

    def to_torch(self) -> nn.InstanceNorm2d:
        """An nn.InstanceNorm2d with the same settings, state (copied), device, dtype and train/eval mode: the form
        exporters understand (ONNX: one InstanceNormalization node; interop/export.py swaps it in)."""
        ref = nn.InstanceNorm2d(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
        )
        floats = [t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()]
        if floats:
            ref = ref.to(floats[0].device, floats[0].dtype)
        ref.load_state_dict(self.state_dict())
        return ref.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class ConditionalInstanceNorm(nn.Module):
    """Conditional instance norm (Dumoulin, Shlens & Kudlur 2017, "A Learned Representation for Artistic Style",
    ICLR 2017): one network for ``num_styles`` styles, each norm keeping a (gamma, beta) pair per style.

    ``forward(x, mix)``: x (N, C, *spatial) float; mix (N, num_styles) float32, row n the convex weights of the styles
    for sample n (one-hot selects one style). Each sample is normalised by our InstanceNorm (fused kernel, no affine),
    then scaled and shifted by its own ``gamma = mix @ weight`` and ``beta = mix @ bias`` (rows (C,)), computed in
    float32 with autocast off: a bf16 matmul would round the selected gamma. Output: x's shape, dtype and memory
    format.

    State-dict keys are InstanceNorm's (``weight``, ``bias``), with shape (num_styles, C) instead of (C,).
    :meth:`single_style` gives the plain InstanceNorm of one mix, which inference runs (same numbers up to float
    rounding, at no extra cost per image).
    """

    takes_style = True
    """TransformerNet passes the style mix to modules that declare this (see TransformerNet.forward)."""

    def __init__(self, num_features: int, num_styles: int, eps: float = 1e-5) -> None:
        super().__init__()
        if int(num_styles) != num_styles or num_styles < 1:
            raise ValueError(f"num_styles must be a positive int, got {num_styles!r}")
        self.num_features, self.num_styles, self.eps = int(num_features), int(num_styles), eps
        self.norm = InstanceNorm(num_features, eps=eps, affine=False)
        self.weight = nn.Parameter(torch.ones(self.num_styles, self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_styles, self.num_features))

    def style_affine(self, mix: Tensor) -> tuple[Tensor, Tensor]:
        """(gamma, beta), each (N, C) float32, for an (N, num_styles) mix."""
        with torch.autocast(device_type=mix.device.type, enabled=False):
            mix = mix.float()
            return mix @ self.weight.float(), mix @ self.bias.float()

    def forward(self, x: Tensor, mix: Tensor) -> Tensor:
        if mix.dim() != 2 or mix.shape[1] != self.num_styles or mix.shape[0] != x.shape[0]:
            raise ValueError(
                f"ConditionalInstanceNorm expects a ({x.shape[0]}, {self.num_styles}) style mix, got {tuple(mix.shape)}"
            )
        normalised = self.norm(x)
        gamma, beta = self.style_affine(mix)
        shape = (x.shape[0], self.num_features) + (1,) * (x.dim() - 2)
        compute_dtype = torch.float32 if x.dtype in _HALF_DTYPES else x.dtype
        y = torch.addcmul(
            beta.to(compute_dtype).view(shape), normalised.to(compute_dtype), gamma.to(compute_dtype).view(shape)
        )
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @torch.no_grad()
    def single_style(self, mix: Tensor) -> InstanceNorm:
        """The affine InstanceNorm that this layer computes for the (num_styles,) mix ``mix`` (a one-hot mix gives
        that style's row exactly), on the same device and dtype as the tables."""
        norm = InstanceNorm(self.num_features, eps=self.eps, affine=True).to(self.weight.device, self.weight.dtype)
        gamma, beta = self.style_affine(mix.reshape(1, -1).to(self.weight.device))
        norm.weight.copy_(gamma[0])
        norm.bias.copy_(beta[0])
        return norm.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_styles={self.num_styles}, eps={self.eps}"


def make_norm(kind: str, num_features: int, num_styles: int = 1) -> nn.Module:
    """Return the normalisation layer named ``kind`` for ``num_features`` channels (one of NORM_KINDS).

    "instance" -> our InstanceNorm (affine, no running stats: Ulyanov et al. 2016), or with ``num_styles`` > 1 our
    ConditionalInstanceNorm (Dumoulin et al. 2017); "batch" -> nn.BatchNorm2d, "none" -> nn.Identity (one style
    only: there is no per-style affine to condition). Any other kind raises ValueError listing the valid kinds.
    """
    if num_styles != 1 and kind != "instance":
        raise ValueError(
            f"norm {kind!r} cannot hold several styles: conditional normalisation is instance norm "
            "(Dumoulin et al. 2017); use norm 'instance' for a multi-style network"
        )
    if kind == "instance":
        if num_styles != 1:
            return ConditionalInstanceNorm(num_features, num_styles)
        return InstanceNorm(num_features, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm kind {kind!r}: valid kinds are {', '.join(NORM_KINDS)}")
