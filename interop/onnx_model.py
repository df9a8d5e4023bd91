"""``.onnx`` style networks in: an onnxruntime session wrapped with TransformerNet's inference contract.

``OnnxStyleModel(path)(x)`` takes x (N, 3, H, W) float32 RGB in [0, 1] and returns (N, 3, H, W) in [0, 1] (the
same range promise as the torch model it was exported from), so ``stylize.py`` can treat both alike for untiled
inference; interop.read reads ``.onnx`` files through :func:`read_onnx_file`. Files written by
``scripts/export.py`` carry the model's config and meta as JSON in the ONNX ``metadata_props`` (key ``faststyle``)
and take and give [0, 1]; they run exactly as exported.

A multi-style export (``model_config["num_styles"]`` S > 1 in that metadata) has a second input, ``style_weights``
(S,) float32 (interop/onnx_export.py). ``num_styles`` says so (1 for every other file); ``model.for_style(weights)``
returns a one-style callable that feeds those weights, like ``TransformerNet.for_style``; calling the model itself
without choosing a style raises FaststyleError.

Any other ONNX file with one float (N, 3, H, W) input and output is *foreign*: nothing in it says its pixel range,
and the common ones (pytorch/examples ``fast_neural_style --export_onnx``, the ONNX model zoo's fast-neural-style
files) take and give RGB in 0-255, often at a fixed 1x3xHxW size. For those the model

- finds the pixel range (``pixel_range="auto"``, see ``detect_pixel_range``) or takes it as given (``"0-1"`` /
  ``"0-255"``), and scales input and output so callers still see [0, 1]; the output is clamped to [0, 1] like
  TransformerNet's eval-mode "linear" output;
- runs a fixed-size graph on each image resized to that size and resizes the result back, with one warning: such
  files' sizes come from the export tool, not the (fully convolutional) network, and their holders usually cannot
  re-export them, so a lower-resolution picture serves them better than a refusal; a graph fixed at a size that
  is not a multiple of 4 returns up to 3 extra bottom/right rows and columns (pytorch/examples' network), cropped;
- pads a dynamic-size graph bottom/right (reflection) to the smallest multiple (1, 4, 8, 16 or 32) at which its
  output has its input's size, found once at load (pytorch/examples' network returns 4 * ceil(H / 4) rows), and
  crops back, as TransformerNet itself does;
- runs a fixed batch of 1 image by image.

onnxruntime is an optional dependency: importing this module never fails, constructing a model without it raises
FaststyleError saying what to install.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import FaststyleError
from models.modelfile import ONNX_METADATA_KEY, ONNX_STYLE_INPUT_NAME
from models.styles import style_names

log = logging.getLogger(__name__)


PIXEL_RANGES = ("auto", "0-1", "0-255")
"""Values of ``pixel_range``: detect it (foreign files only), or the range the network takes and gives."""
# Spellings people type (and what YAML makes of them: onnx_pixel_range=255 arrives as an int).
_PIXEL_RANGE_SPELLINGS = {"auto": "auto", "0-1": "0-1", "1": "0-1", "0-255": "0-255", "255": "0-255"}
_PIXEL_SCALE = {"0-1": 1.0, "0-255": 255.0}
_ASK_FOR_RANGE = "pass onnx_pixel_range=0-255 (pytorch/examples and ONNX model zoo exports) or onnx_pixel_range=0-1"

PROBE_PHOTO = Path(__file__).resolve().parents[1] / "data" / "samples" / "content" / "chelsea.jpg"
"""The photo run through a foreign network to find its pixel range: a trained network's output range is only
meaningful on natural-image statistics (noise or flat test patterns can push it anywhere)."""
PROBE_LONG_SIDE_PX = 128
"""Long side of the probe photo for dynamic-size graphs: enough for image statistics, cheap at load time."""
PLAUSIBLE_BAND = (-0.5, 1.5)
"""An output, divided by the candidate scale, must lie mostly in this band: trained networks overshoot [0, 1] a
little (their stylize scripts clamp), a wrong scale misses it by a factor of 255."""
PLAUSIBLE_FRACTION = 0.9
PLAUSIBLE_MIN_STD = 0.03
"""...and must vary (about 8 levels of 255): a stylized photo has contrast, while a 0-1 network fed 0-255 and
instance-normalized after its first conv returns its usual output, which divided by 255 is nearly flat."""
SIZE_MULTIPLES = (1, 4, 8, 16, 32)
"""Paddings tried, smallest first, until a dynamic-size graph returns its input's size (strided encoders)."""
MAX_EXTRA_PX = max(SIZE_MULTIPLES) - 1
"""A fixed-size graph may return up to this many extra bottom/right rows and columns (pytorch/examples' network
exported at a size that is not a multiple of 4 returns 4 * ceil(H / 4) rows): they are cropped."""
SHAPE_PROBE_HW = (45, 61)
"""Odd, coprime-ish sides for the size probe, so any stride-2 encoder shows whether it keeps the size."""


def onnxruntime_available() -> bool:
    """True when the ``onnxruntime`` package can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _providers_for(device: str | torch.device) -> list[str]:
    """onnxruntime execution providers for a faststyle device name; unavailable ones raise FaststyleError."""
    import onnxruntime as ort

    kind = device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]
    available = ort.get_available_providers()
    if kind == "auto":
        # Same preference order as core.device.resolve_device, restricted to what onnxruntime was built with.
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise FaststyleError(
                "this onnxruntime has no CUDA provider: install onnxruntime-gpu, or use device=cpu for .onnx models"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise FaststyleError(f"onnxruntime cannot run on device {kind!r}: use device=cpu (or cuda) for .onnx models")


@dataclass(frozen=True)
class RangeFit:
    """How well one candidate scaling turns a network's output on the probe photo into an image.

    ``in_band``: fraction of output values (divided by the candidate scale) inside PLAUSIBLE_BAND; ``std``: their
    standard deviation (non-finite values count as outside the band).
    """

    in_band: float
    std: float

    @property
    def plausible(self) -> bool:
        return self.in_band >= PLAUSIBLE_FRACTION and self.std >= PLAUSIBLE_MIN_STD


def range_fit(y: Tensor) -> RangeFit:
    """Measure ``y`` (any shape, already divided by the candidate scale) against the plausibility rule."""
    y = y.detach().to("cpu", torch.float64).flatten()
    finite = torch.isfinite(y)
    low, high = PLAUSIBLE_BAND
    in_band = float(((y >= low) & (y <= high) & finite).double().mean())
    std = float(y[finite].std()) if int(finite.sum()) > 1 else 0.0
    return RangeFit(in_band=in_band, std=std)


def normalize_pixel_range(value: str | int | float | None) -> str:
    """``"auto"`` / ``"0-1"`` / ``"0-255"`` from what a user may pass (1 and 255 included); else FaststyleError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    key = "auto" if value is None else str(value).strip().lower().replace(" ", "")
    if key not in _PIXEL_RANGE_SPELLINGS:
        raise FaststyleError(f"onnx_pixel_range={value!r} is not one of {', '.join(PIXEL_RANGES)}")
    return _PIXEL_RANGE_SPELLINGS[key]


def detect_pixel_range(run: Callable[[Tensor], Tensor], photo: Tensor, name: str) -> tuple[str, dict[str, RangeFit]]:
    """Decide whether a network takes and gives 0-1 or 0-255 RGB by running a real photo at both scales.

    Args:
        run: the network in its own pixel scale, (1, 3, H, W) -> (1, 3, H, W).
        photo: (1, 3, H, W) float32 RGB in [0, 1].
        name: the file name, for the message.

    Returns:
        ("0-1" or "0-255", {candidate: RangeFit}): the one candidate whose output, divided by its scale, is a
        plausible image (``RangeFit.plausible``).

    Raises:
        FaststyleError (one line, naming onnx_pixel_range) when neither or both candidates are plausible.
    """
    fits = {candidate: range_fit(run(photo * scale) / scale) for candidate, scale in _PIXEL_SCALE.items()}
    plausible = [candidate for candidate, fit in fits.items() if fit.plausible]
    if len(plausible) == 1:
        return plausible[0], fits
    summary = ", ".join(
        f"{candidate}: {fit.in_band:.0%} of outputs in range, spread {fit.std:.3f}" for candidate, fit in fits.items()
    )
    verdict = "both scalings give" if plausible else "neither scaling gives"
    raise FaststyleError(
        f"{name} has no faststyle metadata and {verdict} a plausible image on a test photo ({summary}): "
        + _ASK_FOR_RANGE
    )


def _session(path: Path, device: str | torch.device, threads: int | None) -> Any:
    """An onnxruntime InferenceSession of ``path`` on ``device``'s execution provider; FaststyleError (one line)
    when onnxruntime is missing or the file is not a usable ONNX model."""
    if not onnxruntime_available():
        raise FaststyleError("running .onnx models needs onnxruntime: pip install onnxruntime")
    import onnxruntime as ort

    if not path.is_file():
        raise FaststyleError(f"ONNX model file not found: {path}")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    # onnxruntime logs a warning for every initializer that also appears as a graph input; those are noise.
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=_providers_for(device))
    except FaststyleError:
        raise
    except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise FaststyleError(f"{path} is not a usable ONNX model ({_first_line(err)}): re-export it") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OnnxStyleModel:
    """An onnxruntime session wrapped as a callable with TransformerNet's inference contract.

    ``model(x)``: x (N, 3, H, W) float32 RGB in [0, 1] on any torch device -> (N, 3, H, W) float32 on x's device.
    It is not an ``nn.Module``: it has no parameters, no gradients and cannot be tiled by code that walks the
    torch module's layers; ``eval()``/``to()`` exist only so inference code can call them unconditionally.

    ``pixel_range`` ("auto", "0-1", "0-255"; 1 and 255 also accepted) matters for foreign files only (module
    docstring): "auto" runs ``detect_pixel_range`` at load time. Files with faststyle metadata take 0-1 and refuse
    "0-255". After loading, ``pixel_range`` holds the range used, ``pixel_range_fits`` the detection's evidence
    ({} unless detected) and ``foreign`` whether the file lacks faststyle metadata.

    A faststyle multi-style file has ``num_styles`` > 1 and ``style_names``; pick a style or mix with
    :meth:`for_style` before calling (module docstring). Other files have ``num_styles`` 1.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        pixel_range: str | int = "auto",
    ):
        path = Path(path)
        requested_range = normalize_pixel_range(pixel_range)  # a bad value fails before the session is built
        self.session = _session(path, device, threads)
        self.path = path
        info = self._read_metadata()
        all_inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        # Only a file whose faststyle metadata declares several styles may have a second (style) input.
        inputs = self._split_style_input(all_inputs, info)
        if len(inputs) != 1 or len(outputs) < 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
            raise FaststyleError(
                f"{path} is not a style network: expected one (N, 3, H, W) input, got "
                f"{[(i.name, i.shape) for i in all_inputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        # Static sizes are ints, dynamic ones are strings (symbolic names) or None.
        shape = inputs[0].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_hw = tuple(d if isinstance(d, int) else None for d in shape[2:])
        self.device = torch.device("cpu") if device == "auto" else torch.device(device)
        self._config: dict[str, Any] = dict(info.get("model_config") or {})
        self.meta: dict[str, Any] = dict(info.get("meta") or {})
        self.min_side = int(info.get("min_side") or 1)
        self.foreign = not info
        self.pixel_range = "0-1"
        self.pixel_range_fits: dict[str, RangeFit] = {}
        self.size_multiple = 1
        self._warned_resize = False
        self._noted_crop = False
        if not self.foreign:
            if requested_range == "0-255":
                raise FaststyleError(
                    f"{path.name} was exported by faststyle and takes 0-1 pixels: drop onnx_pixel_range=0-255 "
                    "(or set it to auto)"
                )
        else:
            self._prepare_foreign(inputs[0].type, outputs[0].type, requested_range)
        log.info(
            "loaded ONNX model %s (providers %s, input %s, pixel range %s)",
            path,
            self.session.get_providers(),
            list(shape),
            self.pixel_range,
        )

    def _split_style_input(self, inputs: list, info: dict[str, Any]) -> list:
        """Set ``num_styles``, ``style_names`` and ``style_input_name`` from the metadata and return the inputs
        other than the style input. A file declaring several styles without a (num_styles,) float style input is
        refused."""
        config = info.get("model_config")
        declared = config.get("num_styles", 1) if isinstance(config, dict) else 1
        self.num_styles = declared if isinstance(declared, int) and declared > 1 else 1
        self.style_names: list[str] = []
        self.style_input_name: str | None = None
        self._style_feed: np.ndarray | None = None
        if self.num_styles == 1:
            return inputs
        name = str(info.get("style_input") or ONNX_STYLE_INPUT_NAME)
        style = [i for i in inputs if i.name == name]
        if len(inputs) != 2 or len(style) != 1 or list(style[0].shape) != [self.num_styles]:
            raise FaststyleError(
                f"{self.path} declares {self.num_styles} styles but has no ({self.num_styles},) input {name!r} "
                f"(inputs {[(i.name, i.shape) for i in inputs]}): re-export it with scripts/export.py"
            )
        self.style_input_name = name
        # The export stores the names it used; without them (hand-edited metadata) meta["styles"], then style_<i>.
        names = info.get("styles")
        if not (isinstance(names, list) and len(names) == self.num_styles):
            meta = info.get("meta")
            names = meta.get("styles") if isinstance(meta, dict) else None
        self.style_names = style_names({"styles": names}, self.num_styles)
        return [i for i in inputs if i.name != name]

    def for_style(self, weights: Any) -> OnnxStyleModel:
        """A callable with this model's contract that runs the style mix ``weights`` (a sequence or tensor of
        ``num_styles`` numbers >= 0, not all 0; normalized to sum 1), like ``TransformerNet.for_style``: it shares
        this model's session, has ``num_styles`` 1 and a config without ``num_styles``. A one-style model (or one
        already chosen) is returned as a copy, unchanged. Bad weights raise FaststyleError."""
        chosen = copy.copy(self)
        if self.num_styles == 1:
            return chosen
        values = [float(v) for v in torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)]
        if len(values) != self.num_styles:
            raise FaststyleError(
                f"{self.path.name} holds {self.num_styles} styles ({', '.join(self.style_names)}): "
                f"got {len(values)} style weights"
            )
        total = sum(values)
        if not all(math.isfinite(v) and v >= 0 for v in values) or total <= 0:
            raise FaststyleError(f"style weights must be finite, >= 0 and not all 0, got {values}")
        # Normalized here too (the graph does it again), so ``style_weights`` reads as the mix that runs.
        chosen._style_feed = np.asarray([v / total for v in values], dtype=np.float32)
        chosen.num_styles = 1
        chosen._config = {k: v for k, v in self._config.items() if k != "num_styles"}
        return chosen

    @property
    def style_weights(self) -> tuple[float, ...] | None:
        """The style mix this callable runs (sums to 1); None unless made by :meth:`for_style` of a multi-style
        model."""
        return None if self._style_feed is None else tuple(float(v) for v in self._style_feed)

    def _require_style(self) -> None:
        """Raise FaststyleError (one line) for a multi-style file whose style has not been chosen."""
        if self.style_input_name is not None and self._style_feed is None:
            names = self.style_names
            raise FaststyleError(
                f"{self.path.name} holds {len(names)} styles ({', '.join(names)}): pick one, e.g. style={names[0]}, "
                f"or a mix, e.g. style={names[0]}:0.5,{names[1]}:0.5 (in Python: model.for_style(weights))"
            )

    def _feed(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """The session inputs for an image batch: the image, plus the chosen style weights for a multi-style file."""
        self._require_style()
        if self.style_input_name is None:
            return {self.input_name: array}
        return {self.input_name: array, self.style_input_name: self._style_feed}

    def _prepare_foreign(self, input_type: str, output_type: str, requested_range: str) -> None:
        """Check a file without faststyle metadata, find its size multiple and pixel range (module docstring)."""
        name = self.path.name
        if input_type != "tensor(float)" or output_type != "tensor(float)":
            raise FaststyleError(
                f"{name} takes {input_type} and returns {output_type}: faststyle runs float32 (N, 3, H, W) "
                "style networks only; re-export it with float32 input and output"
            )
        if self.fixed_batch not in (None, 1):
            raise FaststyleError(
                f"{name} accepts only batches of exactly {self.fixed_batch}: re-export it with a dynamic batch "
                "axis or batch size 1"
            )
        if None in self.fixed_hw:
            self.size_multiple = self._find_size_multiple()
            self.min_side = self.size_multiple  # reflection padding needs at least that many rows and columns
        if requested_range != "auto":
            self.pixel_range = requested_range
            log.info("%s: no faststyle metadata; pixel range %s as given", name, requested_range)
            return
        self.pixel_range, self.pixel_range_fits = detect_pixel_range(self._run_raw, self._probe_photo(), name)
        log.info(
            "%s: no faststyle metadata; detected pixel range %s (test photo in range at 0-1 scaling: %.0f%%, "
            "at 0-255: %.0f%%; onnx_pixel_range=0-1 or 0-255 overrides)",
            name,
            self.pixel_range,
            100 * self.pixel_range_fits["0-1"].in_band,
            100 * self.pixel_range_fits["0-255"].in_band,
        )

    def _find_size_multiple(self) -> int:
        """The smallest of SIZE_MULTIPLES to pad a dynamic side to so the graph returns its input's size."""
        fh, fw = self.fixed_hw
        tried = []
        for multiple in SIZE_MULTIPLES:
            h = fh or -(-SHAPE_PROBE_HW[0] // multiple) * multiple
            w = fw or -(-SHAPE_PROBE_HW[1] // multiple) * multiple
            probe = np.full((1, 3, h, w), 0.5, dtype=np.float32)
            try:
                (out,) = self.session.run([self.output_name], {self.input_name: probe})
            except Exception as err:  # onnxruntime's own types: this size is not one the graph can run
                tried.append(f"{h}x{w}: {_first_line(err)[:80]}")
                continue
            if tuple(out.shape) == (1, 3, h, w):
                if multiple > 1:
                    log.info(
                        "%s returns its input's size at multiples of %d: pads bottom/right", self.path.name, multiple
                    )
                return multiple
            tried.append(f"{h}x{w} -> {tuple(out.shape)}")
        raise FaststyleError(
            f"{self.path.name} does not return an image of its input's size ({'; '.join(tried[:2])}): faststyle "
            "runs only style networks whose (1, 3, H, W) output matches the input"
        )

    def _probe_photo(self) -> Tensor:
        """PROBE_PHOTO as (1, 3, H, W) in [0, 1], at the graph's fixed size or PROBE_LONG_SIDE_PX long side."""
        # data.io owns decoding and the 0-1 conversion; imported here so loading faststyle's own files needs none.
        from data.io import load_image, pil_to_tensor, resize_to

        if not PROBE_PHOTO.is_file():
            raise FaststyleError(
                f"cannot detect the pixel range of {self.path.name}: test photo {PROBE_PHOTO} is missing; "
                + _ASK_FOR_RANGE
            )
        img = load_image(PROBE_PHOTO)
        fh, fw = self.fixed_hw
        scale = PROBE_LONG_SIDE_PX / max(img.width, img.height)
        width = fw or max(self.min_side, round(img.width * scale))
        height = fh or max(self.min_side, round(img.height * scale))
        return pil_to_tensor(resize_to(img, width, height))[None]

    def _read_metadata(self) -> dict[str, Any]:
        """The JSON dict export stored under ``metadata_props[faststyle]``; {} for foreign ONNX files."""
        props = self.session.get_modelmeta().custom_metadata_map
        raw = props.get(ONNX_METADATA_KEY)
        if raw is None:
            return {}
        try:
            info = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("%s: unreadable faststyle metadata, ignoring it", self.path)
            return {}
        return info if isinstance(info, dict) else {}

    def config(self) -> dict[str, Any]:
        """The TransformerNet config recorded at export time ({} for foreign ONNX files)."""
        return dict(self._config)

    def eval(self) -> OnnxStyleModel:
        """No-op (an ONNX graph is always in inference mode); returns self like nn.Module.eval()."""
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxStyleModel:
        """No-op: the execution provider is fixed at load time; outputs follow the input's torch device."""
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """Stylize a batch: x (N, 3, H, W) float in [0, 1] -> (N, 3, H, W) float32 on x's device."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        self._require_style()  # before any size complaint: without a style nothing can run
        h, w = int(x.shape[2]), int(x.shape[3])
        if min(h, w) < self.min_side:
            raise FaststyleError(
                f"{self.path.name} needs images of at least {self.min_side}x{self.min_side} pixels, got {h}x{w}: "
                "use a larger image or the .pth model"
            )
        if self.foreign:
            scale = _PIXEL_SCALE[self.pixel_range]
            raw = self._run_raw(x.detach().to("cpu", torch.float32) * scale)
            # Clamped like TransformerNet's eval-mode "linear" output: foreign networks overshoot [0, 1] a little.
            return (raw / scale).clamp_(0.0, 1.0).to(x.device)
        fh, fw = self.fixed_hw
        if (fh is not None and fh != h) or (fw is not None and fw != w):
            raise FaststyleError(
                f"{self.path.name} was exported for fixed size {fh}x{fw} (HxW) but got {h}x{w}: "
                "resize to that size or re-export with scripts/export.py --dynamic"
            )
        if self.fixed_batch is not None and self.fixed_batch != x.shape[0]:
            # A fixed-batch export still runs any batch size one image at a time.
            if self.fixed_batch == 1:
                return torch.cat([self(x[i : i + 1]) for i in range(x.shape[0])], dim=0)
            raise FaststyleError(f"{self.path.name} needs batches of {self.fixed_batch}: re-export with --dynamic")
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run([self.output_name], self._feed(array))
        return torch.from_numpy(out).to(x.device)

    forward = __call__

    def _run_raw(self, x: Tensor) -> Tensor:
        """A foreign graph on x (N, 3, H, W) float32 CPU in its own pixel scale -> its raw (N, 3, H, W) output.

        Resizes to a fixed size and back (one warning per model), pads dynamic sides to ``size_multiple`` and
        crops back, and runs a fixed batch of 1 image by image. Nothing is scaled or clamped here.
        """
        n, h, w = int(x.shape[0]), int(x.shape[2]), int(x.shape[3])
        fh, fw = self.fixed_hw
        run_h, run_w = fh or h, fw or w
        resized = (run_h, run_w) != (h, w)
        if resized:
            if not self._warned_resize:
                fixed = "x".join(str(side) if side else "any" for side in self.fixed_hw)
                log.warning(
                    "%s accepts only %s (HxW) inputs: each image is resized to that size and the result back to "
                    "its own (got %dx%d), so it has the detail of a %dx%d image; for full resolution use an export "
                    "with dynamic axes or the network's .pth",
                    *(self.path.name, fixed, h, w, run_h, run_w),
                )
                self._warned_resize = True
            x = F.interpolate(x, size=(run_h, run_w), mode="bilinear", align_corners=False, antialias=True)
        # Only dynamic sides are padded: a fixed side already has the size the graph was made for.
        pad_h = 0 if fh else (-run_h) % self.size_multiple
        pad_w = 0 if fw else (-run_w) % self.size_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        batches = [x[i : i + 1] for i in range(n)] if self.fixed_batch == 1 else [x]
        outs = []
        for batch in batches:
            array = np.ascontiguousarray(batch.numpy())
            try:
                (out,) = self.session.run([self.output_name], {self.input_name: array})
            except Exception as err:  # onnxruntime's own exception types
                raise FaststyleError(
                    f"{self.path.name} failed on a {h}x{w} image ({_first_line(err)[:120]}): use another image size "
                    "or an export with dynamic axes"
                ) from err
            self._check_output_shape(tuple(out.shape), tuple(array.shape))
            outs.append(torch.from_numpy(out[:, :, : array.shape[2], : array.shape[3]]))
        y = torch.cat(outs, dim=0)[:, :, :run_h, :run_w]
        if resized:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return y

    def _check_output_shape(self, got: tuple[int, ...], sent: tuple[int, ...]) -> None:
        """Accept the input's shape or up to MAX_EXTRA_PX more rows/columns (cropped by the caller, noted once)."""
        extra = [g - s for g, s in zip(got[2:], sent[2:], strict=True)] if len(got) == 4 else []
        if len(got) != 4 or got[:2] != sent[:2] or not all(0 <= e <= MAX_EXTRA_PX for e in extra):
            raise FaststyleError(
                f"{self.path.name} returned shape {got} for input {sent}: faststyle runs only style networks whose "
                "output has the input's size"
            )
        if any(extra) and not self._noted_crop:
            log.info(
                "%s returns %dx%d for %dx%d inputs: the extra bottom/right pixels are cropped",
                *(self.path.name, got[2], got[3], sent[2], sent[3]),
            )
            self._noted_crop = True

    def __repr__(self) -> str:
        style = "" if self._style_feed is None else f", style_weights={list(self.style_weights)}"
        return f"OnnxStyleModel({str(self.path)!r}, providers={self.session.get_providers()}{style})"


def read_onnx_file(
    path: str | os.PathLike, device: str | torch.device = "cpu", pixel_range: str | int = "auto"
) -> tuple[OnnxStyleModel, dict]:
    """Load an ``.onnx`` style network; returns (callable model, meta) like the other readers of interop.read.

    ``pixel_range`` ("auto" | "0-1" | "0-255") applies to ONNX files not written by faststyle (see OnnxStyleModel).
    """
    model = OnnxStyleModel(path, device=device, pixel_range=pixel_range)
    return model, model.meta
