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
``hydra.compose``. The loop itself is ``training.loop.fit`` (plain arguments, no Hydra).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from configs.schema import check_train_config, min_image_size
from core.cli import EXIT_INTERNAL, claim_fresh_dir, holds_run, hydra_value, resolve_user_path
from core.errors import FaststyleError, exit_with_error
from core.fileio import remove_stale_temp_files

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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


MAX_STYLE_ASPECT = 4
"""The style image's long side is at most this many times ``style_size`` (its short side)."""
MAX_STYLE_SIDE_PX = 2048
"""Long-side cap for ``style_size=null`` (the image as stored): VGG's activations grow with the pixel count."""


def load_style_image(path: Path, style_size: int | None, min_side: int) -> Any:
    """The style image as a PIL RGB image at the size its Gram targets are computed at.

    Its short side becomes ``style_size`` (the scale of the brush strokes), but the long side is capped at
    ``MAX_STYLE_ASPECT * style_size`` (or ``MAX_STYLE_SIDE_PX`` for ``style_size=null``), with a warning: a 1 x 500
    strip would otherwise become 256 x 128000 pixels and need gigabytes in the loss network. An image so thin that
    the loss layers would get no pixel (short side below ``min_side`` after capping) is refused with one line.
    """
    from data.io import load_image, resize_to

    img = load_image(path, min_short_side=style_size)
    width, height = img.size
    short, long = min(width, height), max(width, height)
    scale = (style_size / short) if style_size else 1.0
    long_cap = MAX_STYLE_ASPECT * style_size if style_size else MAX_STYLE_SIDE_PX
    capped = long * scale > long_cap
    if capped:
        scale = long_cap / long
    if short * scale < min_side:
        raise FaststyleError(
            f"style image {path} is {width}x{height} px, too elongated: with its long side capped at {long_cap} px "
            f"its short side would be {short * scale:.0f} px, and the style layers need {min_side}; crop it"
        )
    if capped:
        log.warning("style image %s is %dx%d: scaled to %dx%d for its Gram targets (the long side is capped at %d "
                    "px); crop it to a less elongated shape to keep more of it", path.name, width, height,
                    max(1, round(width * scale)), max(1, round(height * scale)), long_cap)
    return resize_to(img, max(1, round(width * scale)), max(1, round(height * scale)))


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> Path:
    """Train as ``cfg`` says and return the path of the written ``model.pth``.

    ``run_dir`` defaults to Hydra's run dir (``hydra.runtime.output_dir``); tests pass a temporary folder.
    Raises FaststyleError for user mistakes (missing style image or data, bad values), before building any model.
    """
    from training.distributed import broadcast_object, init_distributed, teardown_distributed

    check_train_config(cfg)
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
    """The body of :func:`train` on one process (``ctx``: training.distributed.DistContext)."""
    import torch

    from core.device import reuse_freed_memory
    from data.images import ImageFolderDataset, make_train_loader
    from data.io import pil_to_tensor
    from models.loss import PerceptualLoss
    from models.transformer import TransformerNet
    from training.checkpoint import check_state_dict, load_checkpoint
    from training.loop import RunOutputs, TrainOptions, fit, resolve_precision

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
    style_layers = list(cfg.loss.style_layers)
    style_image = pil_to_tensor(load_style_image(style_path, cfg.style_size, min_image_size(style_layers)))[None]
    dataset = ImageFolderDataset(data_root, int(cfg.data.image_size), train=True)
    val_images = dataset.fixed_batch(int(cfg.data.val_images))  # centre crops of the first files: fixed
    resume = load_checkpoint(resume_path) if resume_path is not None else None
    if ctx.is_main:  # temporary files a killed run (kill -9, power loss) left behind, in this run and the resumed one
        folders = [run_dir, run_dir / "checkpoints"]
        if resume_path is not None:
            folders += [resume_path, resume_path / "checkpoints"] if resume_path.is_dir() else [resume_path.parent]
        for folder in folders:
            remove_stale_temp_files(folder)

    torch.manual_seed(int(cfg.seed))  # model initialisation; the data order has its own seeded sampler
    try:
        model = TransformerNet(**OmegaConf.to_container(cfg.model, resolve=True))
    except (TypeError, ValueError) as err:  # an unknown norm/upsample name or a bad width in model.*
        raise FaststyleError(f"bad model config: {err}") from err
    if resume is not None and resume.get("model_config") != model.config():
        raise FaststyleError(f"train.resume checkpoint was trained with model {resume.get('model_config')}, but the "
                             f"config asks for {model.config()}: pass the same model.* options")
    if resume is not None:
        check_state_dict(model.state_dict(), resume.get("model") or {}, resume_path)
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


def resume_command(run_dir: str | Path) -> str:
    """The shell command that continues this run from ``run_dir``: the same program and overrides (Hydra's task
    overrides, as typed), with ``train.resume=<run_dir>`` in place of any earlier ``train.resume``. Hydra's own
    settings (``hydra.run.dir``, ...) are left out, so the resumed run gets a run dir of its own."""
    import shlex

    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    overrides = [text for text in hydra_cfg.overrides.task
                 if text.lstrip("~+").split("=", 1)[0].strip() != "train.resume"]
    value = str(run_dir)
    if not re.fullmatch(r"[\w./~:@%+-]+", value):  # quoted for Hydra's override grammar too (spaces, commas, ...)
        value = f'"{value}"' if '"' not in value else f"'{value}'"
    words = [*overrides, f"train.resume={value}"]
    if hydra_cfg.job.config_name not in (None, "train"):
        words = ["--config-name", str(hydra_cfg.job.config_name), *words]
    command = " ".join(shlex.quote(word) for word in [sys.argv[0], *words])
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return f"python {command}"
    if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":  # one node: torchrun needs only the process count
        return f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')} {command}"
    return f"torchrun <the same torchrun options> {command}"


def interrupted_message(err: BaseException, run_dir: str | Path) -> str:
    """The one line printed for a run stopped by a signal (``err``: training.interrupt.TrainingInterrupted)."""
    from training.interrupt import signal_label

    how = signal_label(err.signum)
    if err.step is None or err.checkpoint is None:
        return f"interrupted before the first training step ({how}); nothing to save"
    return (f"interrupted at step {err.step} ({how}): checkpoint saved to {err.checkpoint}; "
            f"resume with: {resume_command(run_dir)}")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: train, then print where the model and the logs are.

    Ctrl-C or SIGTERM (handlers installed for the whole run, training/interrupt.py): the current step is finished and
    saved, one line gives the resume command, and the exit status is 130 / 143; a second Ctrl-C exits at once.
    """
    from training.interrupt import TrainingInterrupted, stop_signals

    with stop_signals():
        try:
            model_path = train(cfg)
        except FaststyleError as err:
            exit_with_error(err)
            return
        except TrainingInterrupted as err:
            if int(os.environ.get("RANK", "0")) == 0:  # torchrun workers: rank 0 speaks for the run
                run_dir = hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
                print(interrupted_message(err, run_dir), file=sys.stderr)
            # Files are saved and closed by now. Leaving at once, still under our handlers, means a late signal (the
            # launcher's follow-up, another Ctrl-C) cannot meet Python's default handler during the interpreter's
            # shutdown and print a traceback after all.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(err.exit_code)
        except Exception:
            traceback.print_exc()
            print("internal error (a bug in faststyle): please report the traceback above", file=sys.stderr)
            raise SystemExit(EXIT_INTERNAL) from None
        if int(os.environ.get("RANK", "0")) != 0:
            return  # torchrun workers: rank 0 prints the summary
        print(f"model: {model_path}")
        print(f"tensorboard --logdir {model_path.parent / 'tb'}")


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The config ``python train.py <overrides>`` runs with, including the ``hydra`` node (for cli.preflight)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def choose_run_dir(cfg: DictConfig, parsed_overrides: list, multirun: bool) -> list[str]:
    """Pin the run folder before Hydra creates it: a fresh one, or the user's own if it holds no other run.

    The default name (``outputs/train/<date>/<time>-<style>``) gets ``-2``, ``-3``, ... when another run took it
    (two runs started in the same second); a folder the user names with ``hydra.run.dir`` / ``hydra.sweep.dir`` is
    refused when it already holds a run's model or checkpoints, unless this run resumes that very run.
    """
    if os.environ.get("RANK", "0") != "0":
        return []  # torchrun workers use rank 0's run dir (training.distributed.worker_hydra_overrides)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = hydra_value(cfg, key)
    if any(override.key_or_group == key for override in parsed_overrides):
        path = resolve_user_path(folder)
        if multirun:
            taken = sorted(child for child in path.iterdir() if child.is_dir() and holds_run(child)) if (
                path.is_dir()) else []
        else:
            resume = cfg.train.resume
            resumes_it = bool(resume) and (resolve_user_path(str(resume)) == path
                                           or path in resolve_user_path(str(resume)).parents)
            taken = [path] if holds_run(path) and not resumes_it else []
        if taken:
            raise FaststyleError(
                f"{key}={folder}: {taken[0]} already holds a training run (model.pth or checkpoints): choose a new "
                f"folder, leave {key} out for a fresh one, or continue that run with train.resume={taken[0]}"
            )
        return []
    claimed = claim_fresh_dir(Path(os.path.abspath(folder)))
    return [f'{key}="{Path(folder).with_name(claimed.name)}"']


if __name__ == "__main__":
    from core.cli import preflight

    # Before torch is imported, so that a mistake on the command line is reported in a fraction of a second.
    sys.argv += preflight(sys.argv[1:], compose_with_hydra, check_train_config, choose_run_dir)
    # torchrun ranks > 0: no run dir, no .hydra/, no log file of their own (only rank 0's run dir is used).
    from training.distributed import worker_hydra_overrides

    sys.argv += worker_hydra_overrides()
    main()
