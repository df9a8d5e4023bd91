"""The training loop, with plain arguments (no Hydra: train.py turns the config into these and calls ``fit``).

One step: a (B, 3, S, S) batch of photos in [0, 1] -> TransformerNet -> PerceptualLoss(output, photos) ->
backward -> Adam (Johnson et al. 2016, section 4: Adam, lr 1e-3, batch 4, 256 px crops, 40k iterations).

Host syncs: the loss components are summed on the device every step and read back (``.item()``) only at log
points (every ``log_interval_steps``, before every checkpoint and at the end), so the GPU is never stalled waiting
for the Python loop. A non-finite total found at such a point stops the run with ``NonFiniteLossError`` before any
checkpoint of the poisoned weights is written, so the last checkpoint on disk is the last good one.

Side effects (TensorBoard, progress bar, checkpoints, images, ``model.pth``) all go through ``RunOutputs``; under
torchrun only rank 0 creates one with ``enabled=True`` (``is_main``), the other ranks get a disabled one that
does nothing, so no rank-dependent ``if`` is scattered through the loop.

Ctrl-C and SIGTERM (training/interrupt.py): the step under way is finished, every rank agrees to stop after the same
step (``agree_to_stop``), rank 0 saves ``checkpoints/last.pt`` at that step (unless that step's checkpoint is
already written) and ``fit`` raises ``TrainingInterrupted`` carrying the step, the checkpoint and the signal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import FaststyleError
from core.precision import resolve_precision as resolve_precision_policy
from models.modelfile import save_model, unwrap_model
from training.checkpoint import (
    CHECKPOINT_DIR_NAME,
    LAST_CHECKPOINT_NAME,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from training.distributed import DistContext, agree_to_stop, all_reduce_mean, wait_for_ranks, wrap_ddp
from training.interrupt import TrainingInterrupted, stop_signals

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LR_SCHEDULES = ("none", "cosine", "linear")
MODEL_FILE_NAME = "model.pth"


class NonFiniteLossError(FaststyleError):
    """The loss became NaN or infinite; the run stopped and the last checkpoint on disk predates it."""


@dataclass
class TrainOptions:
    """The ``train:`` block of the config, as plain values (see configs/train.yaml for each knob's meaning)."""

    steps: int
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "none"
    lr_warmup_steps: int = 0
    log_interval_steps: int = 50
    image_interval_steps: int = 500
    checkpoint_interval_steps: int = 1000
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    malloc_reuse: bool = True  # core.device.reuse_freed_memory, applied by the caller before building

    def validate(self) -> None:
        """Raise FaststyleError on values that cannot work, before any model is built."""
        if self.steps < 1:
            raise FaststyleError(f"train.steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise FaststyleError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise FaststyleError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FaststyleError(f"train.lr_schedule={self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise FaststyleError(f"train.precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")
        for name in ("log_interval_steps", "image_interval_steps", "checkpoint_interval_steps"):
            if getattr(self, name) < 1:
                raise FaststyleError(f"train.{name} must be at least 1, got {getattr(self, name)}")


def lr_factor(step: int, options: TrainOptions) -> float:
    """Multiplier of ``options.lr`` for optimizer step ``step`` (1-based).

    A pure function of the step, so a resumed run needs no scheduler state. Linear warm-up over
    ``lr_warmup_steps``, then constant ("none"), cosine decay to 0 at ``steps`` (Loshchilov & Hutter 2017, SGDR,
    without restarts) or linear decay to 0.
    """
    warmup = options.lr_warmup_steps
    if warmup > 0 and step <= warmup:
        return step / warmup
    if options.lr_schedule == "none":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, options.steps - warmup))
    if options.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype of the autocast region (core.precision decides: "auto" is bf16 on CUDA GPUs with native
    bf16, fp16 + GradScaler on older GPUs, fp32 on CPU/MPS; unsupported requests raise FaststyleError)."""
    return resolve_precision_policy(precision, device).dtype or torch.float32


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision region for the network's forward pass (a no-op for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def image_grid(content: torch.Tensor, stylised: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) photos and their stylisations in [0, 1] -> (3, H', W') grid; rows: content | stylised."""
    from torchvision.utils import make_grid

    pairs = torch.stack([content, stylised], dim=1).flatten(0, 1)  # c0, s0, c1, s1, ...
    return make_grid(pairs.float().clamp(0, 1).cpu(), nrow=2, padding=2, pad_value=1.0)


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    content: torch.Tensor,
    autocast: contextlib.AbstractContextManager,
) -> dict[str, torch.Tensor]:
    """One optimizer step on a (B, 3, S, S) batch in [0, 1]; returns the loss components (device tensors, no sync).

    The network runs under ``autocast``; the loss computes in float32 inside (its Grams are fp32). ``scaler`` is a
    disabled pass-through except for fp16.
    """
    # The loss network runs under autocast too (it is most of the step's FLOPs); PerceptualLoss keeps its Grams and
    # reductions in fp32 itself.
    with autocast:
        stylised = model(content)
        losses = loss_fn(stylised, content)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses


class RunOutputs:
    """Everything a run writes: TensorBoard (``<run>/tb``), progress bar, checkpoints, ``model.pth``.

    The single place for rank-0-only side effects: with ``enabled=False`` (ranks > 0) every method does nothing.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR_NAME
        self.last_checkpoint: Path | None = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: (3, H, W) in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image.float().clamp(0, 1).cpu(), step)

    def progress(self, postfix: dict[str, str] | None = None) -> None:
        """Advance the bar by one step; show ``postfix`` (loss, speed) when given."""
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def checkpoint(self, state: dict, step: int, periodic: bool) -> None:
        """Write ``checkpoints/last.pt`` (and ``step_<n>.pt`` when ``periodic``), each atomically."""
        if not self.enabled:
            return
        if periodic:
            save_checkpoint(self.checkpoint_dir / f"step_{step:07d}.pt", state)
        save_checkpoint(self.checkpoint_dir / LAST_CHECKPOINT_NAME, state)
        self.last_checkpoint = self.checkpoint_dir / LAST_CHECKPOINT_NAME
        log.info("checkpoint at step %d: %s", step, self.checkpoint_dir)

    def final(self, model: nn.Module, meta: dict, hparams: dict[str, Any], metrics: dict[str, float]) -> Path:
        """Write ``model.pth`` and the hparams summary (with the final losses); returns the model path."""
        path = self.run_dir / MODEL_FILE_NAME
        if not self.enabled:
            return path
        save_model(path, model, meta)
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # Written into this run's own event file (SummaryWriter.add_hparams would start a separate run dir).
            for summary in hparams_summary(hparams, metrics):
                self.writer.file_writer.add_summary(summary)
            self.scalars(metrics, int(meta.get("steps", 0)))
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    batches: Iterator[torch.Tensor],
    options: TrainOptions,
    device: torch.device,
    outputs: RunOutputs,
    style_image: torch.Tensor,
    val_images: torch.Tensor,
    checkpoint_extra: dict[str, Any],
    meta: dict[str, Any],
    hparams: dict[str, Any],
    resume: dict | None = None,
    dist_ctx: DistContext | None = None,
) -> Path:
    """Train ``model`` up to ``options.steps`` optimizer steps and write ``model.pth``; return its path.

    Args:
        model: a TransformerNet (plain module; DDP wrapping is the caller's job).
        loss_fn: PerceptualLoss whose ``set_style`` was already called (style Grams computed once per run).
        batches: endless iterator of (B, 3, S, S) float32 [0, 1] CPU batches, already positioned at the first
            step to run (``make_train_loader(..., start_step=resume step)``).
        style_image: (1, 3, H, W) in [0, 1], logged once to TensorBoard.
        val_images: (N, 3, S, S) in [0, 1], fixed photos stylised into a grid every ``image_interval_steps``.
        checkpoint_extra: plain values stored in every checkpoint (resolved config, data order state, ...).
        meta: plain values for ``model.pth`` (style name, ...); ``steps`` is added here.
        hparams: flat {name: int|float|str|bool} for the TensorBoard hparams summary.
        resume: a checkpoint dict (``training.checkpoint.load_checkpoint``) to continue from, or None.
        dist_ctx: torchrun context (training.distributed.init_distributed); with more than one process the network
            is wrapped in DDP here (after ``resume`` is loaded, identically on every rank) and logged losses are
            averaged over ranks. ``outputs`` must be disabled on ranks > 0.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM (handlers from training.interrupt.stop_signals: the caller's, else
            installed here for the call). In the loop: after the current step, which is saved to
            ``checkpoints/last.pt`` first; while ``model.pth`` is written: at once, carrying the last checkpoint.
        NonFiniteLossError: the loss became NaN/inf (found at a log point); nothing of it is saved.
    """
    options.validate()
    compute_dtype = resolve_precision(options.precision, device)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr, betas=tuple(options.betas))
    # GradScaler only for fp16 (bf16 has fp32's exponent range and needs no loss scaling).
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    start_step = 0
    if resume is not None:
        unwrap_model(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        restore_rng_state(resume["rng"])
        start_step = int(resume["step"])
        log.info("resumed at step %d", start_step)
    # DDP first, then compile the DDP module (PyTorch's DDP + torch.compile guidance).
    train_model = wrap_ddp(model, dist_ctx) if dist_ctx is not None else model
    step_model = torch.compile(train_model) if options.compile else train_model
    autocast = autocast_context(device, compute_dtype)

    def checkpoint_state(step: int) -> dict:
        net = unwrap_model(model)
        return {**checkpoint_extra, "step": step, "model_config": net.config(), "model": net.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": capture_rng_state()}

    def log_images(step: int) -> None:
        if not outputs.enabled or len(val_images) == 0:  # rank 0 only (the plain module: no DDP collective runs
            return  # on one rank alone); data.val_images=0 asks for no image grid
        model.eval()
        with torch.no_grad(), autocast:
            stylised = model(val_images.to(device, memory_format=memory_format))
        model.train()
        outputs.image("val/content_stylised", image_grid(val_images, stylised), step)

    sums: dict[str, torch.Tensor] = {}
    window_start, window_time = start_step, time.perf_counter()
    last: dict[str, float] = {}
    batch_size = 0

    def log_window(step: int, lr: float) -> dict[str, str]:
        """Means of the losses since the last log point (over steps and ranks) to TensorBoard; returns the progress
        bar's postfix. The one host sync (and, under DDP, the one collective) of the window."""
        nonlocal sums, window_start, last
        count = step - window_start
        means = {name: value / count for name, value in all_reduce_mean(sums).items()}
        if not math.isfinite(means["total"]):
            raise NonFiniteLossError(
                f"loss became {means['total']} between steps {window_start + 1} and {step}; stopped. Last good "
                f"checkpoint: {outputs.last_checkpoint or 'none yet'}. Lower train.lr or use train.precision=fp32"
            )
        elapsed = time.perf_counter() - window_time
        images_per_s = count * batch_size / elapsed if elapsed > 0 else float("nan")
        last = {f"loss/{name}": value for name, value in means.items()}
        outputs.scalars({**last, "lr": lr, "perf/images_per_s": images_per_s}, step)
        sums, window_start = {}, step
        return {"loss": f"{means['total']:.4g}", "img/s": f"{images_per_s:.1f}"}

    with stop_signals() as stop:
        with stop.deferred():
            outputs.image("style", style_image[0], start_step)
            model.train()
            for step in range(start_step + 1, options.steps + 1):
                content = next(batches).to(device, non_blocking=True, memory_format=memory_format)
                batch_size = content.shape[0]
                lr = options.lr * lr_factor(step, options)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = train_step(step_model, loss_fn, optimizer, scaler, content, autocast)
                for name, value in losses.items():
                    sums[name] = sums[name] + value.detach() if name in sums else value.detach().clone()

                at_checkpoint = step % options.checkpoint_interval_steps == 0 or step == options.steps
                postfix = None
                if step % options.log_interval_steps == 0 or at_checkpoint:
                    postfix = log_window(step, lr)
                if step % options.image_interval_steps == 0 or step == options.steps:
                    log_images(step)
                if at_checkpoint:
                    periodic = step % options.checkpoint_interval_steps == 0
                    outputs.checkpoint(checkpoint_state(step), step, periodic=periodic)
                    stop.saved(step, outputs.last_checkpoint)
                outputs.progress(postfix)
                if postfix is not None:  # images/s measures training: the window restarts after images/checkpoints
                    window_time = time.perf_counter()

                # Checked after the images and the checkpoint, so a signal that arrived while they were written stops
                # at this step, whose checkpoint is then already on disk. Every rank calls this (a collective).
                stop_request = agree_to_stop(stop.signum or 0, dist_ctx)
                if stop_request:
                    if not at_checkpoint:
                        if postfix is None:  # the loss is checked (and logged) before the weights are saved
                            log_window(step, lr)
                        outputs.checkpoint(checkpoint_state(step), step, periodic=False)
                        stop.saved(step, outputs.last_checkpoint)
                    wait_for_ranks(dist_ctx)  # no rank leaves the group before rank 0 has saved
                    raise TrainingInterrupted(stop.signum or stop_request, step, outputs.last_checkpoint)

        if start_step >= options.steps:
            log.warning("checkpoint is already at step %d >= train.steps=%d: nothing to train", start_step,
                        options.steps)
        final_metrics = {f"final/{name.replace('/', '_')}": value for name, value in last.items()}
        return outputs.final(model, {**meta, "steps": max(start_step, options.steps)}, hparams, final_metrics)
