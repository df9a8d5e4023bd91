"""Train a fast style-transfer network (Johnson et al. 2016) for one style image.

Examples (run from the repository root)::

    # the embedded demo (4 photos in data/samples, ~5 minutes on a laptop CPU): what `make demo` runs
    python train.py experiment=demo

    # COCO (scripts/download_coco.sh), your painting: all a user needs to type
    python train.py style=path/to/painting.jpg data.root=data/coco/train2014

    # a light model, a shorter run, more style, cosine learning-rate decay
    python train.py style=my.jpg data.root=photos/ model.base_width=16 train.steps=10000 \\
        loss.style_weight=2e-5 train.lr_schedule=cosine

    # continue a run from its last checkpoint (a run dir or a checkpoint file)
    python train.py style=my.jpg data.root=photos/ train.resume=outputs/train/2026-01-01/10-00-00-my

    # print the composed config instead of training; sweep two styles (Hydra multirun)
    python train.py --cfg job
    python train.py -m experiment=demo \\
        style=data/samples/styles/hokusai_great_wave.jpg,data/samples/styles/van_gogh_village_street_auvers.jpg

Outputs: ``outputs/train/<date>/<time>-<style>/`` holds ``model.pth`` (for stylize.py), ``checkpoints/``, ``tb/``
(``tensorboard --logdir outputs/train``), Hydra's ``.hydra/`` config snapshot and ``train.log``.

``main(cfg)`` is the Hydra entry point; ``train(cfg)`` does the work and is what tests call with a config from
``hydra.compose``. The loop itself is ``models.training.fit`` (plain arguments, no Hydra).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from errors import FaststyleError, exit_with_error

log = logging.getLogger(__name__)


def style_stem(path: str) -> str:
    """Run-dir suffix from the style image path: its file stem with characters other than [A-Za-z0-9_-] dropped."""
    return re.sub(r"[^A-Za-z0-9_-]+", "", Path(str(path)).stem)[:40] or "style"


# Used by configs/train.yaml's hydra.run.dir; registering a resolver is a cheap declaration, not work.
OmegaConf.register_new_resolver("style_stem", style_stem, replace=True)


def absolute(path: str | None) -> Path | None:
    """A user path resolved against the directory the command was started from (Hydra never changes cwd here)."""
    if path is None or str(path) == "":
        return None
    return Path(hydra.utils.to_absolute_path(str(Path(str(path)).expanduser())))


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The knobs worth comparing across runs, flattened for TensorBoard's hparams tab (primitives only)."""
    flat: dict[str, Any] = {"style": style_stem(cfg.style), "style_size": cfg.style_size, "seed": cfg.seed}
    for group in ("model", "loss", "data", "train"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if key not in ("root", "resume", "weights_path"):
                flat[f"{group}.{key}"] = value
    # TensorBoard's hparams accept only int/float/str/bool: lists, mappings and None become their text.
    return {key: value if isinstance(value, int | float | str | bool) else str(value) for key, value in flat.items()}


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> Path:
    """Train as ``cfg`` says and return the path of the written ``model.pth``.

    ``run_dir`` defaults to Hydra's run dir (``hydra.runtime.output_dir``); tests pass a temporary folder.
    Raises FaststyleError for user mistakes (missing style image or data, bad values), before building any model.
    """
    from models.distributed import broadcast_object, init_distributed, teardown_distributed

    if run_dir is None:
        run_dir = hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    # Under torchrun: join the process group (nccl/gloo), one device per process; else a single-process context.
    ctx = init_distributed(str(cfg.device))
    try:
        model_path = _train(cfg, ctx, Path(broadcast_object(str(run_dir))))  # rank 0's run dir on every rank
    except BaseException:
        teardown_distributed()
        raise
    teardown_distributed(wait_for_peers=True)
    return model_path


def _train(cfg: DictConfig, ctx: Any, run_dir: Path) -> Path:
    """The body of :func:`train` on one process (``ctx``: models.distributed.DistContext)."""
    import torch

    from data.images import ImageFolderDataset, make_train_loader
    from data.io import load_image, pil_to_tensor, resize_short_side
    from models.checkpoint import load_checkpoint
    from models.device import reuse_freed_memory
    from models.loss import PerceptualLoss
    from models.training import RunOutputs, TrainOptions, fit, resolve_precision
    from models.transformer import TransformerNet

    if OmegaConf.is_missing(cfg.data, "root"):
        raise FaststyleError("data.root is required: pass data.root=<folder of photos, e.g. data/coco/train2014>")
    if OmegaConf.is_missing(cfg, "style") or not cfg.style:
        raise FaststyleError("style is required: pass style=<path to the style image>")
    style_path, data_root = absolute(cfg.style), absolute(cfg.data.root)
    resume_path = absolute(cfg.train.resume)
    options = TrainOptions(**{k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
                              if k not in ("batch_size", "resume")})
    if options.malloc_reuse:
        reuse_freed_memory()  # before the first large allocation
    options.validate()
    device = ctx.device
    resolve_precision(options.precision, device)  # fp16 without CUDA fails here, not after the model is built

    # Inputs first, so that a wrong path fails in a second, before the loss network is loaded.
    style_img = load_image(style_path)
    if cfg.style_size:
        style_img = resize_short_side(style_img, int(cfg.style_size))
    style_image = pil_to_tensor(style_img).unsqueeze(0)
    dataset = ImageFolderDataset(data_root, int(cfg.data.image_size), train=True)
    val_images = dataset.fixed_batch(int(cfg.data.val_images))  # centre crops of the first files: fixed
    resume = load_checkpoint(resume_path) if resume_path is not None else None

    torch.manual_seed(int(cfg.seed))  # model initialisation; the data order has its own seeded sampler
    try:
        model = TransformerNet(**OmegaConf.to_container(cfg.model, resolve=True))
    except (TypeError, ValueError) as err:  # an unknown norm/upsample name or a bad width in model.*
        raise FaststyleError(f"bad model config: {err}") from err
    if resume is not None and resume.get("model_config") != model.config():
        raise FaststyleError(f"train.resume checkpoint was trained with model {resume.get('model_config')}, but the "
                             f"config asks for {model.config()}: pass the same model.* options")
    loss_options = OmegaConf.to_container(cfg.loss, resolve=True)
    weights_path = absolute(loss_options.get("weights_path"))
    loss_options["weights_path"] = str(weights_path) if weights_path else None
    loss_fn = PerceptualLoss(**loss_options).to(device)
    loss_fn.set_style(style_image.to(device))  # Gram targets once per run

    start_step = int(resume["step"]) if resume is not None else 0
    loader = make_train_loader(dataset, int(cfg.train.batch_size), int(cfg.data.num_workers), int(cfg.seed),
                               pin_memory=device.type == "cuda", rank=ctx.rank, world_size=ctx.world_size,
                               start_step=start_step)
    # The loader is a pure function of (seed, step, batch size): storing them reproduces the exact batches.
    data_state = {"seed": int(cfg.seed), "batch_size": int(cfg.train.batch_size), "world_size": ctx.world_size,
                  "dataset_size": len(dataset)}
    if resume is not None and resume.get("data") != data_state:
        log.warning("data order differs from the checkpoint's (%s vs now %s): batches after resume will differ "
                    "from an uninterrupted run", resume.get("data"), data_state)
    if resume is not None and resume.get("style_path") != str(style_path):
        log.warning("resuming a run trained on style %s with style %s: pass style=... to keep the original",
                    resume.get("style_path"), style_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    log.info("training %s on %d images from %s, device %s, run dir %s", style_path.name, len(dataset), data_root,
             device, run_dir)
    outputs = RunOutputs(run_dir, options.steps, start_step, enabled=ctx.is_main)  # rank 0 alone writes
    try:
        model_path = fit(
            model, loss_fn, loader, options, device, outputs, style_image, val_images,
            checkpoint_extra={"config": resolved, "data": data_state, "style_path": str(style_path)},
            meta={"style": style_path.name, "style_stem": style_stem(cfg.style), "source": "faststyle train.py",
                  "image_size": int(cfg.data.image_size)},
            hparams=_flat_hparams(cfg),
            resume=resume,
            dist_ctx=ctx,
        )
    finally:
        outputs.close()
        loader.close()
    if dataset.skipped or loader.skipped:
        log.warning("%d unreadable images were skipped", max(dataset.skipped, loader.skipped))
    return model_path


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: train, then print where the model and the logs are."""
    try:
        model_path = train(cfg)
    except FaststyleError as err:
        exit_with_error(err)
        return
    if int(os.environ.get("RANK", "0")) != 0:
        return  # torchrun workers: rank 0 prints the summary
    print(f"model: {model_path}")
    print(f"tensorboard --logdir {model_path.parent / 'tb'}")


if __name__ == "__main__":
    from models.distributed import worker_hydra_overrides

    # torchrun ranks > 0: no run dir, no .hydra/, no log file of their own (only rank 0's run dir is used).
    sys.argv += worker_hydra_overrides()
    main()
