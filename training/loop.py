"""The training loop, with plain arguments (no Hydra: training/run.py turns the config into these and calls ``fit``).

One step: a (B, 3, S, S) batch of photos in [0, 1] -> TransformerNet -> PerceptualLoss(output, photos) ->
backward -> Adam (Johnson et al. 2016, section 4: Adam, lr 1e-3, batch 4, 256 px crops, 40k iterations).

Pieces: ``Trainer`` sets a run up (precision, memory format and compilation from core.precision's policy, Adam,
the resumed state, DDP) and runs one step; ``LossWindow`` sums the losses between log points; ``_StepLoop`` decides
per step what to log, draw, save or stop; ``fit`` ties them together for train.py.

Several styles (a multi-style network, Dumoulin et al. 2017): every sample of a batch gets a style by
:func:`style_indices`, a pure function of the step (so resumed and distributed runs see the same assignment): the
global sample sequence cycles through the styles, so any ``num_styles`` consecutive steps give every style exactly
``batch_size`` samples per rank. The loss compares each sample with its own style's Grams; TensorBoard gets the
style loss per style (``loss/per_style/<name>``) and one image grid per style.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import precision
from core.errors import FaststyleError
from models.modelfile import save_model, unwrap_model
from training.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from training.distributed import DistContext, agree_to_stop, all_reduce_mean, wait_for_ranks, wrap_ddp
from training.interrupt import StopSignals, TrainingInterrupted, stop_signals
from training.rundir import CHECKPOINT_DIR_NAME, LAST_CHECKPOINT_NAME, MODEL_FILE_NAME, TB_DIR_NAME

log = logging.getLogger(__name__)

LR_SCHEDULES = ("none", "cosine", "linear")
NOT_LOOP_KEYS = ("batch_size", "resume", "resume_override", "extend", "malloc_reuse")
"""Keys of the config's ``train:`` block that the data loader or the process set-up use, not :func:`fit`."""
FUSED_ADAM = True
"""Whether Adam runs fused where torch has a fused kernel (:func:`make_optimizer`); False: the per-parameter loop
(for ``python -m benchmarks train --count-ops --unoptimized-copies`` and tests that compare the two)."""


@dataclass
class RunRecord:
    """What a run records about itself besides the weights: the images TensorBoard shows and the plain values its
    files carry."""

    style_image: torch.Tensor | list[torch.Tensor]
    """(1, 3, H, W) in [0, 1], logged once to TensorBoard; a list of them, one per style, for several styles."""
    val_images: torch.Tensor
    """(N, 3, S, S) in [0, 1]: fixed photos stylized into a grid every ``image_interval_steps`` (N = 0: none)."""
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    """Plain values stored in every checkpoint (resolved config, data order state, ...)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Plain values for ``model.pth`` (style name, ...); ``steps`` is added by :func:`fit`."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """Flat {name: int | float | str | bool} for the TensorBoard hparams summary."""
    style_names: list[str] = field(default_factory=list)
    """The styles of a multi-style network, in table order (TensorBoard tags); empty for one style."""
    final_model: Callable[[nn.Module], nn.Module] | None = None
    """Maps the trained network to the one ``model.pth`` holds (adding a style: the frozen copy -> the network
    with one more style); None writes the trained network itself."""
    seed: int = 0
    """The run's seed: with the step and the rank it seeds the stability term's warps (Trainer.step_generator)."""


class NonFiniteLossError(FaststyleError):
    """The loss became NaN or infinite; the run stopped and the last checkpoint on disk predates it."""


@dataclass
class TrainOptions:
    """The ``train:`` block of the config, as plain values (see configs/train.yaml for each knob's meaning).

    ``precision``, ``channels_last`` and ``compile`` may be "auto": :meth:`precision_policy` resolves them
    (core.precision).
    """

    steps: int
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "none"
    lr_warmup_steps: int = 0
    log_interval_steps: int = 50
    image_interval_steps: int = 500
    checkpoint_interval_steps: int = 1000
    precision: str = "auto"
    channels_last: bool | str = "auto"
    compile: bool | str = False

    @classmethod
    def from_config(cls, train_block: Mapping[str, Any]) -> TrainOptions:
        """From the resolved ``train:`` block, leaving out the keys that are not the loop's (:data:`NOT_LOOP_KEYS`)."""
        return cls(**{k: v for k, v in train_block.items() if k not in NOT_LOOP_KEYS})

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
        if self.precision not in precision.PRECISIONS:
            raise FaststyleError(f"train.precision={self.precision!r}: use one of {', '.join(precision.PRECISIONS)}")
        for name in ("log_interval_steps", "image_interval_steps", "checkpoint_interval_steps"):
            if getattr(self, name) < 1:
                raise FaststyleError(f"train.{name} must be at least 1, got {getattr(self, name)}")

    def precision_policy(self, device: torch.device) -> precision.PrecisionPolicy:
        """Precision, memory format and compilation for training on ``device`` (FaststyleError when impossible,
        e.g. fp16 without CUDA)."""
        return precision.resolve_precision(device, self.precision, self.channels_last, self.compile, training=True)


def make_optimizer(params: list[nn.Parameter], options: TrainOptions, device: torch.device) -> torch.optim.Adam:
    """Adam over ``params``: fused on CPU and CUDA, one kernel over every parameter that updates each element in one
    pass, where the per-parameter loop issues about ten ops per parameter (a step's 124 ``add_`` and 248 small
    ``copy_`` calls for a TransformerNet's 62 tensors). The same update, with the element-wise arithmetic ordered
    differently: weights agree with the loop's to float32 rounding (about 1 ulp per step), not bit for bit."""
    fused = FUSED_ADAM and device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=options.lr, betas=tuple(options.betas), fused=fused or None)


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


def image_grid(content: torch.Tensor, stylized: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) photos and their stylizations in [0, 1] -> (3, H', W') grid; rows: content | stylized."""
    from torchvision.utils import make_grid

    # On the CPU in float32: the photos come from the loader, the stylizations from the device (maybe in bf16).
    pairs = torch.stack([content.float().cpu(), stylized.float().cpu()], dim=1).flatten(0, 1)  # c0, s0, c1, s1, ...
    return make_grid(pairs.clamp(0, 1), nrow=2, padding=2, pad_value=1.0)


def style_indices(step: int, batch_size: int, num_styles: int, rank: int = 0, world_size: int = 1) -> range:
    """The style of each sample of rank ``rank``'s batch at optimizer step ``step`` (1-based), as a range of global
    sample numbers to take modulo ``num_styles``: sample k of the whole run (all ranks) gets style k mod num_styles,
    so every style gets the same number of samples, and each batch holds min(batch_size, num_styles) styles."""
    first = ((step - 1) * world_size + rank) * batch_size
    return range(first, first + batch_size)


def style_counts(step: int, batch_size: int, num_styles: int, world_size: int = 1) -> list[int]:
    """How many samples of each style step ``step`` trains on, over all ranks (see :func:`style_indices`)."""
    counts = [0] * num_styles
    for k in range((step - 1) * world_size * batch_size, step * world_size * batch_size):
        counts[k % num_styles] += 1
    return counts


def train_step(
    model: nn.Module | Any,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    content: torch.Tensor,
    policy: precision.PrecisionPolicy,
    style: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step on a (B, 3, S, S) batch in [0, 1]; returns the loss components (device tensors, no sync).

    The network and the loss network run under the policy's autocast (the loss network is most of the step's
    FLOPs); PerceptualLoss keeps its Grams and reductions in fp32 itself. ``scaler`` is a disabled pass-through
    except for fp16. ``style``: (B,) style indices for a multi-style network, None for one style.

    With the stability term (``loss_fn.temporal``, models/temporal.py) the network also stylizes a warped, noisy
    copy of the batch, drawn from ``generator``, in the same forward pass (2B images; instance norm keeps the
    samples independent, batch norm's statistics cover both halves); the perceptual terms see the B photos only,
    and ``temporal`` is added to ``total``.
    """
    term = getattr(loss_fn, "temporal", None)
    with policy.autocast():
        inputs, styles = content, style
        if term is not None:
            frame = term.second_frame(content, generator)
            inputs = torch.cat([content, frame.image]).contiguous(memory_format=policy.memory_format)
            styles = None if style is None else torch.cat([style, style])
        output = model(inputs) if styles is None else model(inputs, styles)
        stylized = output[: content.shape[0]]
        losses = loss_fn(stylized, content) if style is None else loss_fn(stylized, content, style)
        if term is not None:
            losses["temporal"] = term(stylized, output[content.shape[0] :], frame)
            losses["total"] = losses["total"] + losses["temporal"]
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

        self.writer = SummaryWriter(log_dir=str(self.run_dir / TB_DIR_NAME))
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
        with self._resumable_on_error():
            if periodic:
                save_checkpoint(self.checkpoint_dir / f"step_{step:07d}.pt", state)
                self.last_checkpoint = self.checkpoint_dir / f"step_{step:07d}.pt"
            save_checkpoint(self.checkpoint_dir / LAST_CHECKPOINT_NAME, state)
        self.last_checkpoint = self.checkpoint_dir / LAST_CHECKPOINT_NAME
        log.info("checkpoint at step %d: %s", step, self.checkpoint_dir)

    def final(self, model: nn.Module, meta: dict, hparams: dict[str, Any], metrics: dict[str, float]) -> Path:
        """Write ``model.pth`` and the hparams summary (with the final losses); returns the model path."""
        path = self.run_dir / MODEL_FILE_NAME
        if not self.enabled:
            return path
        with self._resumable_on_error():
            save_model(path, model, meta)
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # Written into this run's own event file (SummaryWriter.add_hparams would start a separate run dir).
            for summary in hparams_summary(hparams, metrics):
                self.writer.file_writer.add_summary(summary)
            self.scalars(metrics, int(meta.get("steps", 0)))
        return path

    @contextlib.contextmanager
    def _resumable_on_error(self) -> Iterator[None]:
        """A write that fails with a one-line error (a full disk) says how to go on from the newest checkpoint
        that is on disk, if any (training.checkpoint.open_checkpoint finds it in the run dir)."""
        try:
            yield
        except FaststyleError as err:
            if self.last_checkpoint is None:
                raise
            raise FaststyleError(f"{err}; then continue with train.resume={self.run_dir}") from err

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """What one optimizer step needs, set up as :func:`fit` sets it up: the policy (core.precision) resolved and
    applied, the network on the device in the policy's memory format, the loss network, Adam, the GradScaler, the
    resumed state, DDP, compilation. :meth:`step` is the training step that ``fit`` runs and
    python -m benchmarks train times.

    ``model`` stays the plain module (checkpoints, images, ``model.pth``); ``step_model`` is what the step calls
    (DDP first, then compiled: PyTorch's DDP + torch.compile guidance).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        options: TrainOptions,
        device: torch.device,
        resume: dict | None = None,
        dist_ctx: DistContext | None = None,
        style_names: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.options, self.device, self.seed = options, device, int(seed)
        self.style_names = list(style_names or [])
        self.rank, self.world_size = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None else (0, 1)
        self.policy = options.precision_policy(device)
        precision.configure_backends(self.policy)
        self.model = self.policy.prepare_module(model, device)
        self.loss_fn = self.policy.prepare_module(loss_fn, device)
        # Frozen parameters (adding a style trains only its (gamma, beta)) stay out of the optimizer.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, options, device)
        self.scaler = self.policy.grad_scaler()
        self.start_step = self._restore(resume) if resume is not None else 0
        train_model = wrap_ddp(self.model, dist_ctx) if dist_ctx is not None else self.model
        self.step_model = self.policy.maybe_compile(train_model)
        self.lr = options.lr
        # The stability term's random warps and noise: drawn on the device (no host-to-device copy) from a generator
        # reseeded every step, so they are a pure function of (seed, step, rank), like the data order: a resumed run
        # draws the same ones, and no other random draw shifts them.
        uses_rng = getattr(loss_fn, "temporal", None) is not None
        self.generator = torch.Generator(device=device) if uses_rng else None

    def step_generator(self, step: int) -> torch.Generator | None:
        """The generator of step ``step`` on this rank (None when the loss draws nothing)."""
        if self.generator is not None:
            self.generator.manual_seed((self.seed * 1_000_003 + step) * 4099 + self.rank)
        return self.generator

    def _restore(self, resume: dict) -> int:
        """Load a checkpoint's weights, optimizer, scaler and RNG state; returns its step."""
        unwrap_model(self.model).load_state_dict(resume["model"])
        self.optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        restore_rng_state(resume["rng"])
        step = int(resume["step"])
        log.info("resumed at step %d", step)
        return step

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch from the loader on the device, in the policy's memory format."""
        return self.policy.batch_to(batch, self.device)

    def step(self, step: int, content: torch.Tensor) -> dict[str, torch.Tensor]:
        """Optimizer step ``step`` (1-based: sets its learning rate) on a batch from :meth:`to_device`; returns
        the loss components as device tensors (no host sync)."""
        self.lr = self.options.lr * lr_factor(step, self.options)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        styles = len(self.style_names)
        generator = self.step_generator(step)
        if styles <= 1:
            return train_step(
                self.step_model, self.loss_fn, self.optimizer, self.scaler, content, self.policy, generator=generator
            )
        numbers = style_indices(step, content.shape[0], styles, self.rank, self.world_size)
        # Made on the device from the step alone: no host-to-device copy, which would wait for the GPU.
        index = torch.arange(numbers.start, numbers.stop, device=content.device) % styles
        losses = train_step(
            self.step_model, self.loss_fn, self.optimizer, self.scaler, content, self.policy, index, generator
        )
        per_sample = losses.pop("style_per_sample").detach()
        sums = torch.zeros(styles, device=per_sample.device, dtype=per_sample.dtype).index_add_(0, index, per_sample)
        for i, name in enumerate(self.style_names):
            losses[f"per_style/{name}"] = sums[i]
        return losses

    def style_counts(self, step: int, batch_size: int) -> dict[str, int] | None:
        """Samples per style at ``step`` over all ranks, keyed like the per-style losses (None for one style)."""
        if len(self.style_names) <= 1:
            return None
        counts = style_counts(step, batch_size, len(self.style_names), self.world_size)
        return {f"per_style/{name}": count for name, count in zip(self.style_names, counts, strict=True)}

    def stylize(self, images: torch.Tensor, style: int | None = None) -> torch.Tensor:
        """The plain network's output for (N, 3, H, W) CPU images (in style ``style`` of a multi-style network), in
        eval mode and without gradients (no DDP collective runs, so one rank may call it alone)."""
        self.model.eval()
        with torch.no_grad(), self.policy.autocast():
            x = self.to_device(images)
            stylized = self.model(x) if style is None else self.model(x, style)
        self.model.train()
        return stylized

    def checkpoint_state(self, step: int, extra: Mapping[str, Any]) -> dict:
        """Everything a resume needs after ``step``, with ``extra`` (config, data order, ...) alongside."""
        net = unwrap_model(self.model)
        return {
            **extra,
            "step": step,
            "model_config": net.config(),
            "model": net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": capture_rng_state(),
        }


class LossWindow:
    """Loss sums since the last log point, kept on the device; :meth:`flush` is the window's one host sync (and,
    under DDP, its one collective)."""

    def __init__(self, outputs: RunOutputs, start_step: int, world_size: int = 1) -> None:
        self.outputs = outputs
        self.world_size = world_size
        self.sums: dict[str, torch.Tensor] = {}
        self.style_counts: dict[str, int] = {}  # samples per style in the window, all ranks (host ints: no sync)
        self.start = start_step
        self.started_at = time.perf_counter()
        self.batch_size = 0
        self.last: dict[str, float] = {}  # the means of the last flushed window, tagged "loss/<name>"

    def add(
        self, losses: Mapping[str, torch.Tensor], batch_size: int, style_counts: dict[str, int] | None = None
    ) -> None:
        """One step's losses; ``style_counts``: samples per style over all ranks, for the ``per_style/*`` sums."""
        self.batch_size = batch_size
        for name, value in losses.items():
            self.sums[name] = self.sums[name] + value.detach() if name in self.sums else value.detach().clone()
        for name, count in (style_counts or {}).items():
            self.style_counts[name] = self.style_counts.get(name, 0) + count

    def flush(self, step: int, lr: float) -> dict[str, str]:
        """Means over the window's steps and the ranks to TensorBoard; returns the progress bar's postfix.

        Raises NonFiniteLossError, before anything of the window is saved, when the mean total is NaN or infinite.
        """
        count = step - self.start
        means = {name: value / count for name, value in all_reduce_mean(self.sums).items()}
        # A per-style sum covers that style's samples only: its mean divides by their number (summed over ranks,
        # while all_reduce_mean averaged the ranks' sums).
        # A style with no sample in the window (fewer samples than styles) has no value to log.
        for name, samples in self.style_counts.items():
            if samples:
                means[name] = means[name] * count * self.world_size / samples
            else:
                del means[name]
        if not math.isfinite(means["total"]):
            raise NonFiniteLossError(
                f"loss became {means['total']} between steps {self.start + 1} and {step}; stopped. Last good "
                f"checkpoint: {self.outputs.last_checkpoint or 'none yet'}. Lower train.lr or use "
                "train.precision=fp32"
            )
        elapsed = time.perf_counter() - self.started_at
        images_per_s = count * self.batch_size / elapsed if elapsed > 0 else float("nan")
        self.last = {f"loss/{name}": value for name, value in means.items()}
        self.outputs.scalars({**self.last, "lr": lr, "perf/images_per_s": images_per_s}, step)
        self.sums, self.start, self.style_counts = {}, step, {}
        return {"loss": f"{means['total']:.4g}", "img/s": f"{images_per_s:.1f}"}

    def restart_clock(self) -> None:
        """images/s measures training: the clock restarts after the images and checkpoints of a log point."""
        self.started_at = time.perf_counter()

    def final_metrics(self) -> dict[str, float]:
        return {f"final/{name.replace('/', '_')}": value for name, value in self.last.items()}


class _StepLoop:
    """The steps of one :func:`fit` call, with what each step may write (losses, images, checkpoints) and the
    Ctrl-C/SIGTERM stop agreed by every rank."""

    def __init__(
        self,
        trainer: Trainer,
        outputs: RunOutputs,
        val_images: torch.Tensor,
        checkpoint_extra: Mapping[str, Any],
        stop: StopSignals,
        dist_ctx: DistContext | None,
    ) -> None:
        self.trainer, self.outputs, self.val_images = trainer, outputs, val_images
        self.checkpoint_extra, self.stop, self.dist_ctx = checkpoint_extra, stop, dist_ctx
        self.window = LossWindow(outputs, trainer.start_step, trainer.world_size)

    def run(self, batches: Iterator[torch.Tensor]) -> None:
        options = self.trainer.options
        self.trainer.model.train()
        for step in range(self.trainer.start_step + 1, options.steps + 1):
            content = self.trainer.to_device(next(batches))
            losses = self.trainer.step(step, content)
            self.window.add(losses, content.shape[0], self.trainer.style_counts(step, content.shape[0]))

            at_checkpoint = step % options.checkpoint_interval_steps == 0 or step == options.steps
            postfix = None
            if step % options.log_interval_steps == 0 or at_checkpoint:
                postfix = self.window.flush(step, self.trainer.lr)
            if step % options.image_interval_steps == 0 or step == options.steps:
                self._log_images(step)
            if at_checkpoint:
                self._save(step, periodic=step % options.checkpoint_interval_steps == 0)
            self.outputs.progress(postfix)
            if postfix is not None:
                self.window.restart_clock()

            # Checked after the images and the checkpoint, so a signal that arrived while they were written stops
            # at this step, whose checkpoint is then already on disk. Every rank calls this (a collective).
            stop_request = agree_to_stop(self.stop.signum or 0, self.dist_ctx)
            if stop_request:
                self._stop(step, stop_request, saved=at_checkpoint, flushed=postfix is not None)

    def _log_images(self, step: int) -> None:
        # Rank 0 only (the plain module runs, no DDP collective); data.val_images=0 asks for no image grid.
        if not self.outputs.enabled or len(self.val_images) == 0:
            return
        if len(self.trainer.style_names) <= 1:
            stylized = self.trainer.stylize(self.val_images)
            self.outputs.image("val/content_stylized", image_grid(self.val_images, stylized), step)
            return
        for index, name in enumerate(self.trainer.style_names):
            stylized = self.trainer.stylize(self.val_images, style=index)
            self.outputs.image(f"val/{name}", image_grid(self.val_images, stylized), step)

    def _save(self, step: int, periodic: bool) -> None:
        self.outputs.checkpoint(self.trainer.checkpoint_state(step, self.checkpoint_extra), step, periodic=periodic)
        self.stop.saved(step, self.outputs.last_checkpoint)

    def _stop(self, step: int, request: int, saved: bool, flushed: bool) -> None:
        """Save ``step`` (unless its checkpoint is written already), wait for every rank, raise TrainingInterrupted."""
        if not saved:
            if not flushed:  # the loss is checked (and logged) before the weights are saved
                self.window.flush(step, self.trainer.lr)
            self._save(step, periodic=False)
        wait_for_ranks(self.dist_ctx)  # no rank leaves the group before rank 0 has saved
        raise TrainingInterrupted(self.stop.signum or request, step, self.outputs.last_checkpoint)


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    batches: Iterator[torch.Tensor],
    options: TrainOptions,
    device: torch.device,
    outputs: RunOutputs,
    record: RunRecord,
    resume: dict | None = None,
    dist_ctx: DistContext | None = None,
) -> Path:
    """Train ``model`` up to ``options.steps`` optimizer steps and write ``model.pth``; return its path.

    Args:
        model: a TransformerNet (plain module; DDP wrapping happens here).
        loss_fn: PerceptualLoss whose ``set_style`` was already called (style Grams computed once per run).
        batches: endless iterator of (B, 3, S, S) float32 [0, 1] CPU batches, already positioned at the first
            step to run (``make_train_loader(..., start_step=resume step)``).
        outputs: where the run writes (disabled on ranks > 0).
        record: the style image, validation photos, and the values stored in checkpoints, model.pth and hparams.
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
    # Long for its docstring, the loop's whole contract; the work is Trainer's (set-up, step) and _StepLoop's.
    options.validate()
    trainer = Trainer(
        model,
        loss_fn,
        options,
        device,
        resume=resume,
        dist_ctx=dist_ctx,
        style_names=record.style_names,
        seed=record.seed,
    )
    start_step = trainer.start_step
    with stop_signals() as stop:
        loop = _StepLoop(trainer, outputs, record.val_images, record.checkpoint_extra, stop, dist_ctx)
        with stop.deferred():
            if isinstance(record.style_image, torch.Tensor):
                outputs.image("style", record.style_image[0], start_step)
            else:
                for name, image in zip(record.style_names, record.style_image, strict=True):
                    outputs.image(f"style/{name}", image[0], start_step)
            loop.run(batches)
        if start_step >= options.steps:
            log.warning(
                "checkpoint is already at step %d >= train.steps=%d: nothing to train", start_step, options.steps
            )
        final = record.final_model(unwrap_model(trainer.model)) if record.final_model else trainer.model
        return outputs.final(
            final,
            {**record.meta, "steps": max(start_step, options.steps)},
            record.hparams,
            loop.window.final_metrics(),
        )
