"""One training run, from a composed config to a written ``model.pth``: inputs, model, loss, loader, then
:func:`training.loop.fit`. ``train.py`` is the Hydra entry point around :func:`train`; tests and reports call these
functions with a config from ``hydra.compose`` (the loss and style-target set-up is shared with
``scripts/compare_runs.py``, so a comparison measures exactly what training optimised).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from configs.schema import check_train_config, min_image_size
from core.cli import absolute_user_path
from core.errors import FaststyleError
from training.rundir import remove_stale_temp_files, style_stem

log = logging.getLogger(__name__)


def style_paths(cfg: DictConfig) -> list[Path]:
    """The style images of the run, absolute: ``style`` as one path or a list of paths."""
    if OmegaConf.is_missing(cfg, "style") or not cfg.style:
        raise FaststyleError("style is required: pass style=<path to the style image>")
    styles = OmegaConf.to_container(cfg.style) if OmegaConf.is_config(cfg.style) else [cfg.style]
    return [absolute(str(path)) for path in styles]


def absolute(path: str | None) -> Path | None:
    """An optional user path (None or "" for none) made absolute: :func:`core.cli.absolute_user_path`."""
    return None if path is None or str(path) == "" else absolute_user_path(path)


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The knobs worth comparing across runs, flattened for TensorBoard's hparams tab (primitives only)."""
    flat: dict[str, Any] = {
        "style": ",".join(style_stem(p) for p in style_paths(cfg)),
        "style_size": cfg.style_size,
        "seed": cfg.seed,
    }
    for group in ("model", "loss", "data", "train"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():
            if key not in ("root", "resume", "resume_override", "extend", "weights_path"):
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
    if short * scale < min_side and not capped:  # style_size=null: the image as stored is too small
        raise FaststyleError(
            f"style image {path} is {width}x{height} px: the loss layers need a short side of at least {min_side} "
            "px; set style_size (e.g. style_size=256) to scale it, or use a larger image"
        )
    if short * scale < min_side:
        crop = (
            f"{width}x{min(height, MAX_STYLE_ASPECT * width)}"
            if width < height
            else f"{min(width, MAX_STYLE_ASPECT * height)}x{height}"
        )
        raise FaststyleError(
            f"style image {path} ({width}x{height} px) is too elongated to learn a style from: its long side is "
            f"{long / short:.0f} times its short side, and at most {long_cap // min_side} can be used "
            f"(up to {MAX_STYLE_ASPECT} keeps all of it); crop a less elongated part of it (e.g. {crop} px) or use "
            "another image"
        )
    if capped:
        log.warning(
            "style image %s is %dx%d: scaled to %dx%d for its Gram targets (the long side is capped at %d "
            "px); crop it to a less elongated shape to keep more of it",
            path.name,
            width,
            height,
            max(1, round(width * scale)),
            max(1, round(height * scale)),
            long_cap,
        )
    return resize_to(img, max(1, round(width * scale)), max(1, round(height * scale)))


def train(cfg: DictConfig, run_dir: str | Path, set_keys: set[str] | None = None) -> Path:
    """Train as ``cfg`` says into ``run_dir`` and return the path of the written ``model.pth``.

    With ``train.resume`` the run's own options come from the checkpoint (training/resume.py); ``set_keys`` names
    the options the command line set (None: every option of ``cfg`` counts as set).
    Raises FaststyleError for user mistakes (missing style image or data, bad values), before building any model.
    """
    from training.distributed import broadcast_object, init_distributed, teardown_distributed

    check_train_config(cfg)
    # Under torchrun: join the process group (nccl/gloo), one device per process; else a single-process context.
    ctx = init_distributed(str(cfg.device))
    try:
        # rank 0's run dir on every rank
        model_path = _train(cfg, ctx, Path(broadcast_object(str(run_dir))), set_keys)
    except BaseException:
        teardown_distributed()
        raise
    teardown_distributed(wait_for_peers=True)
    return model_path


def style_images(cfg: DictConfig) -> list[Any]:
    """The style images as PIL RGB images at ``cfg.style_size`` (see :func:`load_style_image`), one per style."""
    min_side = min_image_size(list(cfg.loss.style_layers))
    return [load_style_image(path, cfg.style_size, min_side) for path in style_paths(cfg)]


def style_target(cfg: DictConfig, images: list[Any] | None = None) -> Any:
    """The style image as the loss network sees it: a (1, 3, H, W) float32 tensor in [0, 1] at ``cfg.style_size``
    (see :func:`load_style_image`); a list of them, one per style, when ``style`` lists several. ``images``: the
    :func:`style_images` already loaded."""
    from data.io import pil_to_tensor

    tensors = [pil_to_tensor(image)[None] for image in (images if images is not None else style_images(cfg))]
    return tensors[0] if len(tensors) == 1 else tensors


def build_loss(cfg: DictConfig, style_image: Any, device: Any) -> Any:
    """``cfg.loss``'s PerceptualLoss on ``device``, with the Gram targets of ``style_image`` (from
    :func:`style_target`: one image, or a list for several styles) computed once."""
    from models.loss import PerceptualLoss

    loss_options = OmegaConf.to_container(cfg.loss, resolve=True)
    weights_path = absolute(loss_options.get("weights_path"))
    loss_options["weights_path"] = str(weights_path) if weights_path else None
    loss_fn = PerceptualLoss(**loss_options).to(device)
    if isinstance(style_image, list):
        loss_fn.set_styles([image.to(device) for image in style_image])
    else:
        loss_fn.set_style(style_image.to(device))
    return loss_fn


def build_model(cfg: DictConfig, num_styles: int = 1) -> Any:
    """A freshly initialised TransformerNet from ``cfg.model`` holding ``num_styles`` styles (seed it first for a
    reproducible start)."""
    from models.transformer import TransformerNet

    try:
        return TransformerNet(**OmegaConf.to_container(cfg.model, resolve=True), num_styles=num_styles)
    except (TypeError, ValueError) as err:  # an unknown norm/upsample name or a bad width in model.*
        raise FaststyleError(f"bad model config: {err}") from err


def _check_resume(
    resume: dict, resume_path: Path, model: Any, data_state: dict, style_record: Any, overridden: bool = False
) -> None:
    """Refuse a checkpoint whose network differs from the config's; warn when the data order differs (the run
    continues, but not as the interrupted one would have). The style was settled by training/resume.py; a
    checkpoint without a config (an older faststyle) is only warned about."""
    from models.modelfile import check_state_dict

    if resume.get("model_config") != model.config():
        raise FaststyleError(
            f"train.resume checkpoint was trained with model {resume.get('model_config')}, but the "
            f"config asks for {model.config()}: pass the same model.* options"
        )
    check_state_dict(model.state_dict(), resume.get("model") or {}, resume_path)
    if resume.get("data") != data_state:
        log.warning(
            "data order differs from the checkpoint's (%s vs now %s): batches after resume will differ "
            "from an uninterrupted run",
            resume.get("data"),
            data_state,
        )
    if resume.get("style_path") != style_record and not overridden and not isinstance(resume.get("config"), dict):
        log.warning(
            "resuming a run trained on style %s with style %s: pass style=... to keep the original",
            resume.get("style_path"),
            style_record,
        )


def _model_meta(cfg: DictConfig, paths: list[Path], names: list[str]) -> dict[str, Any]:
    """What ``model.pth`` records about its training besides the network (plain primitives); a multi-style model
    lists its style names in table order (``styles``, models/styles.py)."""
    common = {"source": "faststyle train.py", "image_size": int(cfg.data.image_size)}
    if len(names) == 1:
        return {"style": paths[0].name, "style_stem": names[0], **common}
    return {"styles": names, "style_files": [path.name for path in paths], **common}


def _style_setup(cfg: DictConfig, paths: list[Path]) -> tuple[Any, list[str], Any, dict]:
    """For ``train.extend``: (base network, all style names with the new one last, the network to train, meta);
    otherwise (None, the run's style names, a fresh network, meta)."""
    names = [style_stem(path) for path in paths]
    extend_path = absolute(cfg.train.extend)
    if extend_path is None:
        return None, names, build_model(cfg, len(paths)), _model_meta(cfg, paths, names)
    from training.add_style import extension_network, load_base

    base, base_meta, base_names = load_base(extend_path)
    if names[0] in base_names:
        raise FaststyleError(
            f"{extend_path.name} already holds a style named {names[0]} (its styles: {', '.join(base_names)}): "
            "rename the new style image"
        )
    if OmegaConf.to_container(cfg.model, resolve=True) != {k: v for k, v in base.config().items() if k != "num_styles"}:
        log.info(
            "train.extend: the network is %s's (%s); model.* options are not used", extend_path.name, base.config()
        )
    meta = {
        **{k: v for k, v in base_meta.items() if k not in ("style", "style_stem", "steps")},
        "styles": [*base_names, names[0]],
        "style_files": [*base_meta.get("style_files", [base_meta.get("style", base_names[0])]), paths[0].name],
        "extended_from": str(extend_path),
        "base_steps": base_meta.get("steps"),
    }
    return base, [*base_names, names[0]], extension_network(base), meta


def _resume(cfg: DictConfig, set_keys: set[str] | None) -> tuple[DictConfig, dict | None, list[str]]:
    """(the run's config, the checkpoint to continue from or None, the learned options changed by
    ``train.resume_override``)."""
    from training.checkpoint import open_checkpoint
    from training.resume import resumed_config

    resume_path = absolute(cfg.train.resume)
    if resume_path is None:
        return cfg, None, []
    source, resume = open_checkpoint(resume_path)
    cfg, changed = resumed_config(cfg, resume, set_keys, resume_path)
    check_train_config(cfg)
    if changed and int(resume["step"]) >= int(cfg.train.steps):
        # Nothing would be trained: model.pth would carry the new settings' name on the old weights.
        raise FaststyleError(
            f"train.resume_override: {source} is at step {resume['step']} and train.steps={cfg.train.steps}, so "
            f"nothing would be trained on the new settings: pass train.steps above {resume['step']}"
        )
    return cfg, resume, changed


def _recorded_config(cfg: DictConfig, style_record: Any) -> dict:
    """The resolved config checkpoints store, with every user path absolute (a resume from another folder reads
    the same files)."""
    from training.resume import absolute_paths

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["style"] = style_record
    resolved["data"]["root"] = absolute_paths(resolved["data"]["root"])
    resolved["loss"]["weights_path"] = absolute_paths(resolved["loss"]["weights_path"])
    for key in ("resume", "extend"):
        resolved["train"][key] = absolute_paths(resolved["train"][key])
    return resolved


def _train(cfg: DictConfig, ctx: Any, run_dir: Path, set_keys: set[str] | None = None) -> Path:
    """The body of :func:`train` on one process (``ctx``: training.distributed.DistContext): the run's inputs,
    network and loss, then :func:`_fit`."""
    import torch

    from data.dataset import ImageFolderDataset
    from training.add_style import add_trained_style
    from training.loop import RunRecord
    from training.memory import check_training_fits

    cfg, resume, changed = _resume(cfg, set_keys)  # first: a resumed run's style and data are the checkpoint's
    if OmegaConf.is_missing(cfg.data, "root"):
        raise FaststyleError("data.root is required: pass data.root=<folder of photos, e.g. data/coco/train2014>")
    paths, data_root = style_paths(cfg), absolute(cfg.data.root)
    resume_path = absolute(cfg.train.resume)
    options, policy = _options(cfg, ctx.device)

    # Inputs first, so that a wrong path fails in a second, before the loss network is loaded; then what the run
    # will need against what the machine has, before anything large is allocated.
    styles = style_images(cfg)
    check_training_fits(cfg, policy, ctx.device, [image.size for image in styles])
    style_image = style_target(cfg, styles)
    dataset = ImageFolderDataset(data_root, int(cfg.data.image_size), train=True)
    val_images = dataset.fixed_batch(int(cfg.data.val_images))  # centre crops of the first files: fixed
    if ctx.is_main:
        remove_stale_temp_files(run_dir, resume_path)

    torch.manual_seed(int(cfg.seed))  # model initialisation; the data order has its own seeded sampler
    base, names, model, meta = _style_setup(cfg, paths)
    style_record = str(paths[0]) if len(paths) == 1 else [str(path) for path in paths]
    # The loader is a pure function of (seed, step, batch size): storing them reproduces the exact batches.
    data_state = {"seed": int(cfg.seed), "batch_size": int(cfg.train.batch_size), "world_size": ctx.world_size}
    data_state["dataset_size"] = len(dataset)
    if resume is not None:
        _check_resume(resume, resume_path, model, data_state, style_record, bool(changed))
    loss_fn = build_loss(cfg, style_image, ctx.device)
    record = RunRecord(
        style_image,
        val_images,
        checkpoint_extra={
            "config": _recorded_config(cfg, style_record),
            "data": data_state,
            "style_path": style_record,
        },
        meta=meta,
        hparams=_flat_hparams(cfg),
        style_names=names if len(paths) > 1 else [],
        final_model=add_trained_style(base) if base is not None else None,
        seed=int(cfg.seed),
    )
    log.info(
        "training %s on %d images from %s, device %s, run dir %s",
        ", ".join(path.name for path in paths) if len(paths) < 4 else f"{len(paths)} styles",
        len(dataset),
        data_root,
        ctx.device,
        run_dir,
    )
    return _fit(cfg, ctx, run_dir, dataset, model, loss_fn, options, record, resume)


def _options(cfg: DictConfig, device: Any) -> tuple[Any, Any]:
    """The loop's options (training.loop.TrainOptions, checked) and the precision policy they give on ``device``
    (fp16 without CUDA fails here, not after the model is built)."""
    from core.device import reuse_freed_memory
    from training.loop import TrainOptions

    options = TrainOptions.from_config(OmegaConf.to_container(cfg.train, resolve=True))
    if cfg.train.malloc_reuse:
        reuse_freed_memory()  # before the first large allocation
    options.validate()
    return options, options.precision_policy(device)


def _fit(
    cfg: DictConfig,
    ctx: Any,
    run_dir: Path,
    dataset: Any,
    model: Any,
    loss_fn: Any,
    options: Any,
    record: Any,
    resume: dict | None,
) -> Path:
    """The training loop (training.loop.fit) over the run's loader, from the checkpoint's step when resuming; the
    loader and the run's outputs are closed however it ends."""
    from data.dataset import make_train_loader
    from training.loop import RunOutputs, fit

    start_step = int(resume["step"]) if resume is not None else 0
    loader = make_train_loader(
        dataset,
        int(cfg.train.batch_size),
        int(cfg.data.num_workers),
        int(cfg.seed),
        pin_memory=ctx.device.type == "cuda",
        rank=ctx.rank,
        world_size=ctx.world_size,
        start_step=start_step,
    )
    outputs = RunOutputs(run_dir, options.steps, start_step, enabled=ctx.is_main)  # rank 0 alone writes
    try:
        model_path = fit(model, loss_fn, loader, options, ctx.device, outputs, record, resume=resume, dist_ctx=ctx)
    finally:
        outputs.close()
        loader.close()
    if dataset.skipped or loader.skipped:
        log.warning("%d unreadable images were skipped", max(dataset.skipped, loader.skipped))
    return model_path
