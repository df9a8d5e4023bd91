"""The schema of train.py's and stylize.py's configs: every key, its type, and the values that cannot work.

The YAML files hold the defaults and explain each knob; this module says what a value must be, so that a typo
(``+train.foo=1``), a non-number (``train.steps=abc``) or an impossible value (``data.image_size=4``) is refused
with one line before any work starts, instead of a traceback deep inside the run (or a silently ignored key).
``check_train_config`` / ``check_stylize_config`` raise ``FaststyleError``; the entry points call them both before
Hydra starts the job (``cli.preflight``) and at the top of ``train()`` / ``stylize()`` (which tests call directly).
``compose_stylize_config`` composes stylize.py's config without a running Hydra app (tests, reports, benchmarks).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.errors import FaststyleError
from core.limits import MODEL_RANGES


def _choices(*values: Any) -> dict:
    return {"choices": values}


def _range(name: str) -> dict:
    """A network shape option's range, the one model files are checked against too (core/limits.py)."""
    low, high = MODEL_RANGES[name]
    return {"min": low, "max": high}


SWITCH = {"choices": ("auto", True, False, "true", "false"), "words": "auto, true or false"}
"""A switch that core.precision resolves per device when it is "auto" (channels_last, compile); a quoted "true" is
still true."""


MAX_STEPS = 10_000_000
"""250 times Johnson et al.'s 40k steps: more is a typo, not a plan (the progress bar would show years)."""
MAX_SEED = 2**32 - 1
"""The seed feeds torch's and the data order's 64-bit generators, also multiplied by the step (training/loop.py)."""
MAX_WEIGHT = 1e20
"""Loss weights (vgg16's style weight is 1e10): far above, the weighted loss overflows float32."""


@dataclass
class ModelSchema:
    norm: str = field(metadata=_choices("instance", "batch", "none"))
    base_width: int = field(metadata=_range("base_width"))
    residual_blocks: int = field(metadata=_range("residual_blocks"))
    upsample: str = field(metadata=_choices("nearest", "transpose"))
    output: str = field(metadata=_choices("sigmoid", "linear"))


@dataclass
class LossSchema:
    network: str = field(metadata=_choices("vgg19", "vgg16", "random"))
    weights_path: str | None
    content_layers: list[str]
    style_layers: dict[str, float]
    content_weight: float = field(metadata={"min": 0.0, "max": MAX_WEIGHT})
    style_weight: float = field(metadata={"min": 0.0, "max": MAX_WEIGHT})
    tv_weight: float = field(metadata={"min": 0.0, "max": MAX_WEIGHT})
    temporal_weight: float = field(metadata={"min": 0.0, "max": MAX_WEIGHT})
    temporal_shift_px: float = field(metadata={"min": 0.0, "max": 64.0})
    temporal_rotation_deg: float = field(metadata={"min": 0.0, "max": 45.0})
    temporal_zoom: float = field(metadata={"min": 0.0, "max": 0.5})
    temporal_noise_std: float = field(metadata={"min": 0.0, "max": 1.0})
    temporal_local_px: float = field(metadata={"min": 0.0, "max": 64.0})
    temporal_regions: int = field(metadata={"min": 0, "max": 16})
    temporal_light: float = field(metadata={"min": 0.0, "max": 0.5})


@dataclass
class DataSchema:
    root: str
    # The real minimum depends on the loss layers (check_train_config); what fits is estimated per machine
    # (training/memory.py).
    image_size: int = field(metadata={"min": 1, "max": 4096})
    num_workers: int = field(metadata={"min": 0, "max": 64})
    val_images: int = field(metadata={"min": 0, "max": 64})


@dataclass
class TrainLoopSchema:
    steps: int = field(metadata={"min": 1, "max": MAX_STEPS})
    batch_size: int = field(metadata={"min": 1, "max": 4096})
    lr: float = field(metadata={"min_exclusive": 0.0, "max": 1.0})
    betas: list[float]
    lr_schedule: str = field(metadata=_choices("none", "cosine", "linear"))
    lr_warmup_steps: int = field(metadata={"min": 0, "max": MAX_STEPS})
    log_interval_steps: int = field(metadata={"min": 1, "max": MAX_STEPS})
    image_interval_steps: int = field(metadata={"min": 1, "max": MAX_STEPS})
    checkpoint_interval_steps: int = field(metadata={"min": 1, "max": MAX_STEPS})
    resume: str | None
    resume_override: bool
    extend: str | None
    precision: str = field(metadata=_choices("auto", "fp32", "fp16", "bf16"))
    channels_last: Any = field(metadata=SWITCH)
    compile: Any = field(metadata=SWITCH)
    malloc_reuse: bool


@dataclass
class TrainSchema:
    model: ModelSchema
    loss: LossSchema
    data: DataSchema
    style: Any  # one path, or a list of paths (a multi-style network): check_train_config
    style_size: int | None = field(metadata={"min": 16, "max": 4096})
    seed: int = field(metadata={"min": 0, "max": MAX_SEED})
    device: str
    train: TrainLoopSchema


@dataclass
class StylizeSchema:
    model: str
    input: str
    output: str | None
    recursive: bool
    overwrite: bool
    format: str | None
    jpeg_quality: int = field(metadata={"min": 1, "max": 100})
    video_crf: int = field(metadata={"min": 0, "max": 51})  # H.264's CRF scale (data/video.py maps it for VP9)
    video_blend: float = field(metadata={"min": 0.0, "max": 0.95})  # inference/steady.py; 1 would freeze the video
    suffix: str | None
    style: str | None  # a name, an index or a mix (models/styles.py parse_style)
    style_end: str | None  # videos: the style or mix at the last frame
    max_side_px: int | None = field(metadata={"min": 1})
    scale: float | None = field(metadata={"min_exclusive": 0.0, "max": 64.0})  # and memory is checked per image
    preserve_color: bool
    strength: float = field(metadata={"min": 0.0, "max": 1.0})
    device: str
    precision: str = field(metadata=_choices("auto", "fp32", "fp16", "bf16"))
    onnx_pixel_range: Any = field(metadata=_choices("auto", "0-1", "0-255", 1, 255))
    channels_last: Any = field(metadata=SWITCH)
    compile: Any = field(metadata=SWITCH)
    batch_size: int = field(metadata={"min": 1, "max": 1024})  # also bounded by max_memory_mb (Runner.max_batch)
    max_memory_mb: float = field(metadata={"min_exclusive": 0.0, "max": 2.0**20})  # 1 TiB
    tmp_dir: str | None
    malloc_reuse: bool
    io_threads: int = field(metadata={"min": 1, "max": 64})


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a text value"}


def _show(value: Any) -> str:
    """A value as the user typed it on the command line (true/false/null, not Python's spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _type_ok(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        # Hydra reads `style=2024` as an int and `name=1.5` as a float: for a text option those are still text.
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    return False


def _check_value(key: str, value: Any, kind: Any, meta: dict) -> None:
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):  # Optional[X]
        if value is None:
            return
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        origin = typing.get_origin(kind)
    elif value is None and kind is not Any:
        raise FaststyleError(f"{key}=null is not allowed: give {_TYPE_WORDS.get(kind, 'a value')}")
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list | tuple) or not all(_type_ok(v, item) for v in value):
            raise FaststyleError(
                f"{key}={_show(value)} must be a list of {_TYPE_WORDS[item].split(' ', 1)[1]}s, e.g. {key}=[...]"
            )
        return
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, dict) or not all(_type_ok(v, item) for v in value.values()):
            raise FaststyleError(f"{key} must map names to numbers, e.g. {key}={{relu1_2: 1.0}}")
        return
    if "choices" in meta:
        if not any(value == c and type(value) is type(c) for c in meta["choices"]):
            words = meta.get("words") or ", ".join(_show(c) for c in meta["choices"])
            raise FaststyleError(f"{key}={_show(value)} is not one of {words}")
        return
    if not _type_ok(value, kind):
        raise FaststyleError(f"{key}={_show(value)} must be {_TYPE_WORDS.get(kind, 'a value')}")
    if kind in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise FaststyleError(f"{key}={_show(value)} must be a finite number")
        low, high, above = meta.get("min"), meta.get("max"), meta.get("min_exclusive")
        if low is not None and value < low:
            raise FaststyleError(f"{key}={_show(value)} is too small: the minimum is {low}")
        if high is not None and value > high:
            raise FaststyleError(f"{key}={_show(value)} is too large: the maximum is {high}")
        if above is not None and not value > above:
            raise FaststyleError(f"{key}={_show(value)} must be greater than {above}")


def check_against_schema(node: Any, schema: type, prefix: str = "") -> None:
    """Raise FaststyleError for the first key of ``node`` (a plain dict) that ``schema`` does not know, or whose
    value has the wrong type or range. Values still missing (``???``) are left to the code that needs them."""
    hints = typing.get_type_hints(schema)
    known = {f.name: f for f in fields(schema)}
    unknown = [key for key in node if key not in known]
    if unknown:
        where = f"{prefix[:-1]}.* options" if prefix else "top-level options"
        raise FaststyleError(
            f"unknown option {prefix}{unknown[0]}: the {where} are {', '.join(known)} "
            "(--cfg job prints the whole config)"
        )
    for name, spec in known.items():
        key = f"{prefix}{name}"
        if name not in node:
            raise FaststyleError(f"option {key} is missing from the config: restore it (--cfg job shows the rest)")
        value, kind = node[name], hints[name]
        if value == "???":
            continue
        if is_dataclass(kind):
            if not isinstance(value, dict):
                raise FaststyleError(f"{key} is a group of options, not a value: set {key}.<option>=...")
            check_against_schema(value, kind, f"{key}.")
            continue
        _check_value(key, value, kind, dict(spec.metadata))


def plain_config(cfg: DictConfig) -> dict:
    """The config as plain containers, interpolations resolved, ``???`` kept as the string "???"."""
    node = {}
    for key in cfg:
        if key == "hydra":  # Hydra's own node (runtime values are missing outside a running job)
            continue
        try:
            value = cfg._get_node(key)
            node[key] = (
                OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
                if OmegaConf.is_config(value)
                else ("???" if OmegaConf.is_missing(cfg, key) else cfg[key])
            )
        except Exception as err:  # an interpolation that cannot be resolved: omegaconf has many error types
            raise FaststyleError(f"the config cannot be resolved: {str(err).splitlines()[0]}") from err
    return node


def min_image_size(layers: list[str]) -> int:
    """The smallest training crop for which every loss layer (``relu<b>_<k>``) keeps at least one pixel: VGG halves
    the image with a max-pool before each block, so block b needs 2**(b-1) input pixels."""
    blocks = [int(name[4]) for name in layers if name.startswith("relu") and name[4:5].isdigit()]
    return 2 ** (max(blocks, default=1) - 1)


def check_train_config(cfg: DictConfig) -> None:
    """Everything about train.py's config that can be checked without reading a file (FaststyleError)."""
    node = plain_config(cfg)
    check_against_schema(node, TrainSchema)
    loss, data = node["loss"], node["data"]
    layers = list(dict.fromkeys([*loss["content_layers"], *loss["style_layers"]]))
    smallest = min_image_size(layers)
    if data["image_size"] < smallest:
        raise FaststyleError(
            f"data.image_size={data['image_size']} is too small for the loss layers "
            f"({', '.join(layers)}): the minimum is {smallest}"
        )
    styles = node["style"]
    if isinstance(styles, list | tuple):
        if not styles or not all(isinstance(s, str) and s for s in styles):
            raise FaststyleError(f"style={_show(styles)} must be a path or a list of paths, e.g. 'style=[a.jpg,b.jpg]'")
        stems = [s.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for s in styles]
        repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
        if repeated:
            raise FaststyleError(
                f"style lists {repeated[0]} twice: each style is named after its file, so give distinct files"
            )
        most = MODEL_RANGES["num_styles"][1]
        if len(styles) > most:
            raise FaststyleError(f"style lists {len(styles)} paintings: one network holds at most {most} styles")
        if len(styles) > 1 and node["model"]["norm"] != "instance":
            raise FaststyleError(
                f"model.norm={node['model']['norm']} cannot hold {len(styles)} styles: a multi-style network uses "
                "conditional instance norm (Dumoulin et al. 2017); use model.norm=instance"
            )
        if len(styles) > 1 and node["train"]["extend"]:
            raise FaststyleError("train.extend adds one style: pass one style=<new painting>, not a list")
    elif styles is not None and styles != "???" and not isinstance(styles, str | int | float):
        raise FaststyleError(f"style={_show(styles)} must be a path or a list of paths")
    betas = node["train"]["betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise FaststyleError(f"train.betas={betas} must be two numbers in [0, 1), e.g. train.betas=[0.9,0.999]")


STYLIZE_USAGE = (
    "usage: python stylize.py model=<run dir>/model.pth input=<image, video, folder or 'glob'> [output=<file or "
    "folder>] [option=value ...] (--help lists the options)"
)
"""The one-line usage of stylize.py, shown when its required options are missing."""

STYLIZE_CONFIG_FILE = Path(__file__).resolve().parent / "stylize.yaml"


def register_stylize_config() -> None:
    """Register configs/stylize.yaml under the name "stylize" in Hydra's ConfigStore.

    Why not ``config_path="configs"``: that folder holds train.py's config groups, and ``model`` is one of them,
    so Hydra would read ``model=run/model.pth`` as a choice in the ``model/`` group and refuse it. The stylize
    config is therefore loaded on its own, with no groups beside it.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="stylize", node=OmegaConf.load(STYLIZE_CONFIG_FILE))


def compose_stylize_config(overrides: list[str]) -> DictConfig:
    """Compose the stylize config with ``overrides`` (for tests, notebooks, reports and benchmarks; needs no Hydra
    app running)."""
    import hydra

    register_stylize_config()
    with hydra.initialize(version_base="1.3", config_path=None):
        return hydra.compose(config_name="stylize", overrides=overrides)


def check_stylize_config(cfg: DictConfig) -> None:
    """Everything about stylize.py's config that can be checked without reading a file (FaststyleError)."""
    node = plain_config(cfg)
    check_against_schema(node, StylizeSchema)
    missing = [key for key in ("model", "input") if node[key] in ("???", None, "")]
    if missing:
        words = " and ".join(f"{key}=" for key in missing)
        raise FaststyleError(f"{words} {'is' if len(missing) == 1 else 'are'} missing: {STYLIZE_USAGE}")
    suffix = node["suffix"]
    if suffix is not None:
        text = str(suffix)
        if not text or "/" in text or "\\" in text or text.startswith(".") or "\0" in text:
            raise FaststyleError(
                f"suffix={text!r} must be a plain name (no '/', '\\', '..' or leading '.'): it is "
                "added to each output file name, e.g. suffix=mosaic"
            )
