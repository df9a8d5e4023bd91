"""Distributed data parallel training on PyTorch's own engine (torchrun + torch.distributed + DDP), no Hydra.

How a run becomes distributed: ``torchrun --nproc_per_node=N train.py ...`` starts N copies of the script and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each one's environment
(https://pytorch.org/docs/stable/elastic/run.html). :func:`init_distributed` reads them, joins the process group
(``nccl`` on CUDA, ``gloo`` on CPU) and gives each process its own device (``cuda:LOCAL_RANK``). Without those
variables it is a plain single-process run and nothing is initialised, so the same script serves both.

Conventions used by training/run.py and training/loop.py:

- every rank runs the same loop on its own shard of each global batch (data/dataset.py's sampler does the sharding),
  :func:`wrap_ddp` all-reduces (averages) the gradients during ``backward``, so every rank applies the same update;
- only the main process (rank 0, :attr:`DistContext.is_main`) logs, writes TensorBoard, checkpoints and
  ``model.pth``; train.py, which decides before torch is imported, reads torchrun's ``RANK`` variable instead;
- logged metrics are averaged over ranks with :func:`all_reduce_mean` (one collective, one host sync) at log
  intervals only;
- a stop request (Ctrl-C, SIGTERM) is agreed on every step with :func:`agree_to_stop`, a one-integer all-reduce on
  a CPU (gloo) side group, so that every rank stops after the same step and rank 0 saves that step;
- files are always saved from ``models.modelfile.unwrap_model(model)`` (the plain module, without DDP's
  ``module.`` or torch.compile's ``_orig_mod.`` prefixes), so a model trained on 8 GPUs loads like one trained on a
  laptop.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.device import resolve_device
from core.errors import FaststyleError

logger = logging.getLogger(__name__)

# Environment variables torchrun sets in every worker (torch.distributed.run documentation).
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its global rank, the number of processes, its rank on its node and its device.

    ``backend`` is None for a single-process run (no process group exists then). ``control_group`` is the CPU
    (gloo) side group for control messages (:func:`agree_to_stop`), so that under NCCL they need no GPU sync; None
    for a single process.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    control_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """True on the one process that logs and writes files (global rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one member is in use."""
        return self.backend is not None and self.world_size > 1


def torchrun_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` read from torchrun's variables, or None when they are not all set.

    Raises FaststyleError on values that are not consistent integers (a hand-written environment gone wrong).
    """
    env = os.environ if environ is None else environ
    present = [name for name in _TORCHRUN_VARS if name in env]
    if not present:
        return None
    if len(present) != len(_TORCHRUN_VARS):
        missing = ", ".join(name for name in _TORCHRUN_VARS if name not in env)
        raise FaststyleError(f"distributed environment is incomplete (missing {missing}): launch with torchrun")
    try:
        rank, world_size, local_rank = (int(env[name]) for name in _TORCHRUN_VARS)
    except ValueError as err:
        raise FaststyleError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err}): launch with torchrun") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise FaststyleError(
            f"invalid RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}: launch with torchrun"
        )
    return rank, world_size, local_rank


def _device_for_rank(device_name: str, local_rank: int) -> torch.device:
    """The device of one torchrun worker: ``cuda:LOCAL_RANK`` for CUDA runs, the CPU for CPU runs.

    A fixed CUDA index (``device=cuda:1``) makes no sense when every worker would pick the same GPU, and MPS has no
    collective backend, so both are refused with a message rather than silently changed.
    """
    kind = device_name.split(":", 1)[0]
    if kind == "cuda" and ":" in device_name:
        raise FaststyleError(
            f"device={device_name} pins one GPU, but under torchrun each process uses cuda:LOCAL_RANK: "
            "use device=cuda (select GPUs with CUDA_VISIBLE_DEVICES)"
        )
    base = resolve_device(device_name)  # raises for unavailable devices, picks cuda>mps>cpu for auto
    if base.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            err = FaststyleError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible: "
                f"use --nproc_per_node={count} or fewer"
            )
            err.rank_specific = True  # rank 0 may have a GPU: the workers without one say so
            raise err
        return torch.device("cuda", local_rank)
    if base.type == "mps":
        raise FaststyleError("distributed training is not supported on MPS: use device=cpu or a CUDA machine")
    return torch.device("cpu")


def init_distributed(device_name: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join torchrun's process group if this process was started by torchrun; otherwise a single-process context.

    ``device_name`` is the config's ``device`` ("auto", "cuda", "cpu", ...). Under torchrun, CUDA workers get
    ``cuda:LOCAL_RANK`` (also made the current CUDA device, which NCCL needs) and use the ``nccl`` backend; CPU
    workers use ``gloo``. ``timeout_s`` bounds how long a collective waits for a straggler before failing.
    Call :func:`teardown_distributed` at the end (also after errors) to leave the group cleanly.
    """
    env = torchrun_env()
    if env is None:
        return DistContext(rank=0, world_size=1, local_rank=0, device=resolve_device(device_name), backend=None)
    rank, world_size, local_rank = env
    device = _device_for_rank(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available():
        raise FaststyleError("this PyTorch build has no torch.distributed: run without torchrun")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # MASTER_ADDR/MASTER_PORT come from torchrun via the default env:// init method.
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            # Binding the group to the device lets NCCL set up its communicator eagerly and silences the
            # "devices used by this process are currently unknown" warning of barrier().
            device_id=device if device.type == "cuda" else None,
        )
    # Every rank must create the group, in the same order as any other group (new_group is itself a collective).
    # Also under gloo, where the default group would do, so that CPU runs (and tests) use the code NCCL runs use.
    control_group = dist.new_group(backend="gloo") if world_size > 1 else None
    logger.info("distributed: rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, device, backend)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        control_group=control_group,
    )


def worker_hydra_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    """Hydra command-line overrides that keep a non-zero torchrun rank from creating its own run directory.

    Hydra makes the run dir (``outputs/<job>/<date>/<time>...``), writes ``.hydra/`` and opens a log file there
    before ``main(cfg)`` runs, so every rank would leave its own dir (names differ when ranks start in different
    seconds). Appended to ``sys.argv`` on ranks > 0 only (after the user's overrides, so they win), these point
    the run dir at the current directory (which exists: ``mkdir(exist_ok=True)`` creates nothing), skip the
    ``.hydra/`` snapshot and drop Hydra's file/console logging config, which leaves Python's last-resort handler:
    warnings and errors of worker ranks still reach stderr, info lines come from rank 0 only. Workers write no
    files (train.py reads ``RANK``, the training code checks :attr:`DistContext.is_main`); rank 0's run dir is
    shared with :func:`broadcast_object`.
    Returns ``[]`` on rank 0 and outside torchrun. Plain strings: this module never imports Hydra.
    """
    env = torchrun_env(environ)
    if env is None or env[0] == 0:
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def teardown_distributed(wait_for_peers: bool = False) -> None:
    """Leave the process group if one was joined (safe to call in a ``finally`` block, or twice).

    ``wait_for_peers=True`` (the normal end of a run) first waits at a barrier until every rank is done: a gloo
    rank that destroys its connections while a peer still works on its last steps aborts now and then
    (SIGABRT, "terminate called without an active exception").
    After an error, leave at once: the peers may never reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def get_world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree_to_stop(local_request: int, ctx: DistContext | None) -> int:
    """The stop request every rank acts on: the largest ``local_request`` over ranks (0 = keep training, else the
    number of the signal this rank received), so that all ranks stop after the same step.

    A collective: every rank calls it once per step, at the same point. One int32 all-reduce (MAX) on the CPU
    control group, so it never waits for the GPU; a single process returns ``local_request`` without communicating.
    """
    if ctx is None or not ctx.distributed:
        return local_request
    flag = torch.tensor([local_request], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return int(flag.item())


def wait_for_ranks(ctx: DistContext | None) -> None:
    """Barrier on the CPU control group (no-op for one process), e.g. until rank 0 has saved the stop checkpoint:
    a gloo rank that leaves the group while a peer still works can make that peer abort (see
    :func:`teardown_distributed`)."""
    if ctx is not None and ctx.distributed:
        dist.barrier(group=ctx.control_group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (a picklable primitive such as a run-dir path); identity alone."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def has_batch_norm(model: nn.Module) -> bool:
    """True when ``model`` contains a BatchNorm layer (whose statistics depend on how the batch is split)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap ``model`` (already on ``ctx.device``) in DistributedDataParallel when there is more than one process.

    DDP broadcasts rank 0's parameters at construction (so all ranks start equal even with different seeds) and
    averages gradients over ranks in ``backward``: with the global batch split evenly, the update equals that of
    one process with the whole batch (the loss is a per-sample mean).

    Instance norm normalises each sample on its own, so it is unaffected by the split. BatchNorm is not: on CUDA
    it is converted to SyncBatchNorm (statistics over the global batch, as a single process would compute them);
    on CPU (gloo) SyncBatchNorm is not available, so each rank normalises over its own shard and a warning says so.
    Returns ``model`` unchanged for a single process.
    """
    if not ctx.distributed:
        return model
    if has_batch_norm(model):
        if ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning(
                "norm=batch under DDP on CPU: each rank normalises over its own %d-way shard of the batch "
                "(SyncBatchNorm needs CUDA), so results differ from a single-process run",
                ctx.world_size,
            )
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean(metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Average scalar metrics over ranks and return them as Python floats (call at log intervals only).

    All values travel in one fp32 tensor and one all-reduce, and are copied to the host once, so the cost is a
    single device sync per call however many metrics are logged. A single process just converts to floats
    (still one sync). Every rank must call this with the same keys in the same order (it is a collective).
    """
    if not metrics:
        return {}
    names = list(metrics)
    device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if get_world_size() > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL reduces CUDA tensors only
    elif get_world_size() > 1:
        device = torch.device("cpu")  # gloo reduces CPU tensors
    values = torch.stack(
        [
            (v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))).to(device)
            for v in metrics.values()
        ]
    )
    if get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / get_world_size()
    return dict(zip(names, values.tolist(), strict=True))
