"""Stylize images with a trained faststyle model: one file, a folder (optionally recursive) or a glob.

    python stylize.py model=outputs/train/<date>/<run>/model.pth input=photo.jpg
    python stylize.py model=run/model.pth input=photos/ recursive=true output=stylized/
    python stylize.py model=run/model.pth 'input=photos/*.png' preserve_color=true strength=0.7 format=webp
    python stylize.py model=run/model.pth input=huge.tif.png max_memory_mb=1500    # any size, exact tiling

Options and defaults: configs/stylize.yaml. Outputs are named ``<input stem>_<style>.<ext>`` and go to
``<model dir>/stylized/`` unless ``output`` says otherwise; they never replace an input. Images whose untiled
forward pass would exceed ``max_memory_mb`` run through inference/tiled.py, which reproduces the untiled result
exactly (global instance-norm statistics) with bounded memory.

Exit status: 0 when every image was written or skipped, 1 when some failed (each is reported), 2 on a usage
error (``error: ...`` on stderr), 3 on an internal error (a bug), 130 / 143 when stopped by Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from configs.schema import check_stylize_config
from core.cli import EXIT_INTERNAL, preflight
from core.device import reuse_freed_memory
from core.errors import FaststyleError, exit_with_error
from core.fileio import remove_stale_temp_files
from data.io import (
    ALPHA_FORMATS,
    WRITE_FORMATS,
    image_rows,
    is_image_file,
    load_image,
    paste_rows,
    resize_max_side,
    resize_to,
    rows_to_tensor,
    save_image,
    tensor_to_pil,
    to_uint8,
    walk_images,
)

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = {"jpg": ".jpg", "jpeg": ".jpg", "png": ".png", "webp": ".webp", "tif": ".tif", "tiff": ".tif",
                  "bmp": ".bmp"}
"""format= values and the extension each writes (inputs in other formats are written as PNG)."""
PRECISIONS = ("auto", "fp32", "fp16")


# ----------------------------------------------------------------------------------------------------------------
# Colour: luminance-only transfer and strength.
# ----------------------------------------------------------------------------------------------------------------
# Full-range YCbCr of ITU-R BT.601 (the JPEG/JFIF definition). Gatys et al. 2016 ("Preserving Color in Neural
# Artistic Style Transfer", arXiv:1606.05897) use YIQ; any luma/chroma split works the same way: take the stylized
# luminance, keep the photo's chroma.
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float32
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., 3, H, W) Y in [0, 1], Cb and Cr in [-0.5, 0.5]."""
    return torch.einsum("ij,...jhw->...ihw", _RGB_TO_YCBCR.to(x), x)


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_ycbcr (not clamped)."""
    return torch.einsum("ij,...jhw->...ihw", _YCBCR_TO_RGB.to(x), x)


def preserve_colors(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Stylized luminance with the content's chroma: (..., 3, H, W) in [0, 1] each -> same shape, clamped."""
    y = rgb_to_ycbcr(stylized)[..., :1, :, :]
    chroma = rgb_to_ycbcr(content)[..., 1:, :, :]
    return ycbcr_to_rgb(torch.cat([y, chroma], dim=-3)).clamp(0.0, 1.0)


def finish_colors(stylized: torch.Tensor, content: torch.Tensor, preserve_color: bool, strength: float) -> torch.Tensor:
    """Apply colour preservation, then blend with the content: ``strength * s + (1 - strength) * content``."""
    if preserve_color:
        stylized = preserve_colors(stylized, content)
    if strength >= 1.0:
        return stylized
    if strength <= 0.0:
        return content.clone()
    return torch.lerp(content, stylized, strength)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One input image and where its result goes."""

    source: Path
    target: Path


def _absolute(path: str | os.PathLike) -> Path:
    """User paths are relative to the directory the command was started from (Hydra does not chdir)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def find_inputs(input_spec: str, recursive: bool) -> tuple[list[Path], Path, list[tuple[Path, str]]]:
    """The files named by ``input_spec`` (file, folder, or glob), the base folder output names mirror, and the
    entries that were passed over, with the reason (folders named like images, broken links, ...).

    Folder and glob inputs take every file with an image extension (data.io.IMAGE_EXTENSIONS, the same formats a
    single file is read in); a file that turns out to be corrupt or in an unsupported format fails later, when it
    is decoded, and is reported. A single file is taken whatever its name.
    """
    path = _absolute(input_spec)
    if path.is_file():
        return [path], path.parent, []
    if path.is_dir():
        files, skipped = walk_images(path, recursive=recursive)
        if not files:
            hint = "" if recursive else " (add recursive=true to look in sub-folders)"
            raise FaststyleError(f"no image files in folder {path}{hint}")
        return files, path, skipped
    if path.is_symlink():
        raise FaststyleError(f"input {path} is a broken symbolic link: point it at an image or a folder")
    if glob.has_magic(str(input_spec)):
        files, skipped = [], []
        for match in sorted(glob.glob(str(path), recursive=recursive)):
            entry = _absolute(match)
            if not is_image_file(entry):
                continue
            if entry.is_file():
                files.append(entry)
            else:
                skipped.append((entry, "a folder, not an image file" if entry.is_dir() else "not a readable file"))
        if not files:
            raise FaststyleError(f"the pattern {input_spec!r} matches no image files: check it (and quote it)")
        return files, Path(os.path.commonpath([str(f.parent) for f in files])), skipped
    raise FaststyleError(f"input not found: {path} (give an image file, a folder or a glob pattern)")


def style_name(model_path: Path, meta: dict) -> str:
    """The name added to output files: the style the model was trained on, else the model file's name."""
    stem = meta.get("style_stem") or (Path(str(meta["style"])).stem if meta.get("style") else "")
    if not stem:
        stem = model_path.parent.name if model_path.stem == "model" else model_path.stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(stem)).strip(".") or "stylized"


def _output_is_file(output: Path) -> bool:
    """An output path with an image extension names a file (unless such a folder exists); else it is a folder."""
    return (output.suffix.lower() in WRITE_FORMATS or is_image_file(output)) and not output.is_dir()


def plan_jobs(cfg: DictConfig, model_path: Path, meta: dict) -> tuple[list[Job], list[tuple[Path, str]]]:
    """Match every input to its output path and return the jobs and the passed-over entries (see find_inputs).

    Refuses, before anything is written, any output that is an input or sits among the inputs, comparing real
    paths (symbolic links resolved) and file identities (hard links): ``overwrite=true`` never applies to an input.
    """
    files, base, skipped = find_inputs(str(cfg.input), bool(cfg.recursive))
    suffix = str(cfg.suffix) if cfg.suffix else style_name(model_path, meta)
    forced_ext = None
    if cfg.format:
        forced_ext = OUTPUT_FORMATS.get(str(cfg.format).lower().lstrip("."))
        if forced_ext is None:
            raise FaststyleError(f"format={cfg.format} is not supported: use one of {', '.join(OUTPUT_FORMATS)}")

    def ext_for(source: Path) -> str:
        if forced_ext:
            return forced_ext
        ext = source.suffix.lower()
        return OUTPUT_FORMATS.get(ext.lstrip("."), ".png")

    output = _absolute(cfg.output) if cfg.output else model_path.parent / "stylized"
    real_output = Path(os.path.realpath(output))
    # Earlier results inside an input tree must not be stylized again (recursive folders, broad globs).
    real_base = Path(os.path.realpath(base))
    files = [f for f in files if real_output == real_base or real_output not in Path(os.path.realpath(f)).parents]
    if not files:
        raise FaststyleError(f"every input image is inside the output folder {output}: choose another output")
    single_file = bool(cfg.output) and _output_is_file(output)
    if single_file:
        if len(files) != 1:
            raise FaststyleError(f"output={cfg.output} is a file but {len(files)} images were found: give a folder")
        if output.suffix.lower() not in WRITE_FORMATS:
            raise FaststyleError(f"cannot write {output.name}: use a {', '.join(sorted(set(OUTPUT_FORMATS.values())))} "
                                 "output")
        jobs = [Job(files[0], output)]
    else:
        jobs = [Job(f, output / f.relative_to(base).parent / f"{f.stem}_{suffix}{ext_for(f)}") for f in files]
    for job in jobs:
        if WRITE_FORMATS[job.target.suffix.lower()] not in ALPHA_FORMATS and _has_alpha(job.source):
            # JPEG cannot hold transparency: keep it (the user's data) in a PNG rather than flatten it, and say so.
            new_target = job.target.with_suffix(".png")
            logger.warning("%s has transparency, which JPEG cannot hold: writing %s instead", job.source,
                           new_target.name)
            job.target = new_target
    _refuse_outputs_among_inputs(jobs, files, single_file=single_file)
    targets = [job.target for job in jobs]
    if len(set(targets)) != len(targets):
        raise FaststyleError("two inputs map to the same output name (same stem, different extension): set format")
    return jobs, skipped


def _refuse_outputs_among_inputs(jobs: list[Job], files: list[Path], single_file: bool) -> None:
    """FaststyleError when an output would replace an input (also through a symbolic or hard link) or, for folder
    outputs, land in a folder that holds inputs."""
    real_inputs = {os.path.realpath(f): f for f in files}
    identities = {}
    for f in files:
        with contextlib.suppress(OSError):
            stat = os.stat(f)
            identities[(stat.st_dev, stat.st_ino)] = f
    input_dirs = {os.path.dirname(real) for real in real_inputs}
    for job in jobs:
        real_target = os.path.realpath(job.target)
        source = real_inputs.get(real_target)
        if source is None:
            with contextlib.suppress(OSError):
                stat = os.stat(job.target)
                source = identities.get((stat.st_dev, stat.st_ino))
        if source is not None:
            link = "" if str(job.target) == str(source) else f" (the same file as input {source})"
            raise FaststyleError(f"output {job.target}{link} is an input image: choose another output; "
                                 "overwrite=true never replaces an input")
        if not single_file and os.path.dirname(real_target) in input_dirs:
            raise FaststyleError(f"output folder {job.target.parent} would put results among the input images: "
                                 "choose another output folder")


def _has_alpha(path: Path) -> bool:
    """Whether the image file has an alpha channel, from its header only (False if it cannot be read)."""
    try:
        with Image.open(path) as img:
            return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


@dataclass
class Loaded:
    """A decoded input: its 8-bit pixels at the size they are stylized. No float copy is made here: small images
    are converted when they are batched, large ones are read by the tiled executor strip by strip."""

    job: Job
    pixels: Image.Image | None = None  # mode "RGB", or "RGBA" when the file has transparency (kept)
    error: str | None = None
    size: tuple[int, int] = field(default=(0, 0))  # (H, W)

    def tensor(self) -> torch.Tensor:
        """The whole image as a (3, H, W) float32 tensor in [0, 1] (alpha left out): for the untiled path only."""
        return rows_to_tensor(image_rows(self.pixels, 0, self.size[0]))


def load_job(job: Job, max_side_px: int | None, scale: float | None) -> Loaded:
    """Decode (EXIF orientation, any colour mode, 16-bit) and resize one input; errors are returned, not raised,
    so one bad file in a folder does not stop the others.

    Memory: the decoded 8-bit image (Pillow holds RGB and RGBA as 4 bytes per pixel) and nothing else once this
    returns; while decoding a non-RGB file, rotating it (EXIF) or resizing it, a second image exists briefly.
    """
    try:
        img = load_image(job.source, mode="RGBA")  # RGBA only when the file has transparency
        if scale is not None and scale != 1:
            img = resize_to(img, max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if max_side_px:
            img = resize_max_side(img, int(max_side_px))
        return Loaded(job, img, size=(img.height, img.width))
    except FaststyleError as err:
        return Loaded(job, error=str(err))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return Loaded(job, error=f"cannot read image {job.source}: {err}")
    except MemoryError:
        return Loaded(job, error=f"cannot read image {job.source}: not enough memory to decode it")


def save_result(loaded: Loaded, stylized: torch.Tensor | Image.Image, cfg: DictConfig) -> Path:
    """Colour handling, alpha re-attachment and an atomic write; returns the path written.

    ``stylized``: the untiled network output, (3, H, W) float32 in [0, 1], finished here; or the tiled path's
    image (Runner), which is finished already (colours, alpha and 8-bit rounding applied strip by strip).
    """
    if isinstance(stylized, Image.Image):
        img = stylized
    else:
        out = finish_colors(stylized, loaded.tensor(), bool(cfg.preserve_color), float(cfg.strength))
        img = tensor_to_pil(out)
        if loaded.pixels.mode == "RGBA":
            img.putalpha(loaded.pixels.getchannel("A"))
    target = loaded.job.target
    if img.mode == "RGBA" and WRITE_FORMATS[target.suffix.lower()] not in ALPHA_FORMATS:
        # Normally decided in plan_jobs from the header; this catches files whose header did not say.
        target = target.with_suffix(".png")
        logger.warning("%s has transparency, which JPEG cannot hold: wrote %s instead", loaded.job.source,
                       target.name)
    try:
        save_image(img, target, quality=int(cfg.jpeg_quality))
    except MemoryError:
        raise OSError("not enough memory to encode the image") from None
    return target


# ----------------------------------------------------------------------------------------------------------------
# The network runner: batched untiled forward, or the exact tiled executor for large images.
# ----------------------------------------------------------------------------------------------------------------
FINISH_BYTES_PER_PX = 96
"""Temporary bytes per pixel of the tiled path's colour finishing of one output strip (Runner._tiled_image): the
content rows (uint8 and float), finish_colors' float copies, the 8-bit conversion and the strip pasted into the
image; measured 65 B/px with preserve_color=true and strength=0.6 (peak RSS growth on a 3000 x 1000 RGBA strip).
Passed to the executor so that its strip sizes include it."""


class Runner:
    """Runs the model on decoded images of one size: in batches through the untiled network when they fit
    ``max_memory_mb``, otherwise one by one through the exact tiled executor, reading and writing 8-bit strips."""

    def __init__(self, net: torch.nn.Module, device: torch.device, cfg: DictConfig) -> None:
        from inference.tiled import untiled_bytes_estimate

        precision = str(cfg.precision)
        if precision not in PRECISIONS:
            raise FaststyleError(f"precision={precision} is not one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and device.type != "cuda":
            raise FaststyleError("precision=fp16 needs a CUDA device: use precision=fp32 or device=cuda")
        self.dtype = torch.float16 if precision == "fp16" or (precision == "auto" and device.type == "cuda") else (
            torch.float32
        )
        channels_last = cfg.channels_last
        # Measured (scripts/bench_stylize.py, 1920x1080, 2-core CPU): NHWC 8.2 s vs NCHW 10.7 s per image, and
        # 1.6 GB less peak memory; NHWC is also the fast layout for CUDA tensor cores. So "auto" = on everywhere.
        self.channels_last = True if channels_last == "auto" else bool(channels_last)
        self.net = net.to(device=device, dtype=self.dtype).eval()
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device = device
        self.budget_mb = float(cfg.max_memory_mb)
        if self.budget_mb <= 0:
            raise FaststyleError("max_memory_mb must be positive")
        self.tmp_dir = str(_absolute(cfg.tmp_dir)) if cfg.tmp_dir else None
        self.preserve_color, self.strength = bool(cfg.preserve_color), float(cfg.strength)
        self._estimate = untiled_bytes_estimate
        self._tiled = None
        self.tiled_images = 0

    def max_batch(self, height: int, width: int) -> int:
        """How many (height, width) images fit the memory budget untiled (0: must be tiled)."""
        per_image = self._estimate(self.net, height, width) * (0.5 if self.dtype == torch.float16 else 1.0)
        return int(self.budget_mb * 2**20 // max(per_image, 1))

    @torch.inference_mode()
    def __call__(self, batch: list[Loaded]) -> list[torch.Tensor | Image.Image]:
        """Stylize decoded images of one size. Untiled, each result is a (3, H, W) float32 CPU tensor in [0, 1]
        (save_result finishes it); tiled, it is the finished 8-bit image (see _tiled_image)."""
        height, width = batch[0].size
        if self.max_batch(height, width) >= len(batch):
            x = torch.stack([item.tensor() for item in batch]).to(self.device, self.dtype, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return list(self.net(x).to("cpu", torch.float32))
        if not isinstance(self.net, torch.nn.Module):  # .onnx model: the tiled executor needs the torch layers
            raise FaststyleError(
                f"a {width}x{height} image exceeds max_memory_mb={self.budget_mb:g} untiled and "
                ".onnx models cannot be tiled: raise max_memory_mb, set max_side_px, or use the .pth model"
            )
        if self._tiled is None:
            from inference.tiled import TiledExecutor

            self._tiled = TiledExecutor(self.net, budget_mb=self.budget_mb, tmp_dir=self.tmp_dir)
        self.tiled_images += len(batch)
        logger.info("image of %dx%d exceeds max_memory_mb=%g untiled: exact tiled inference", width, height,
                    self.budget_mb)
        return [self._tiled_image(item) for item in batch]

    def _tiled_image(self, item: Loaded) -> Image.Image:
        """Stylize one image through the tiled executor and return it finished: the network reads uint8 strips of
        ``item.pixels``, and each output strip gets finish_colors (pointwise, given the content pixel), the 8-bit
        rounding of data.io.to_uint8 and the input's alpha, and is written back over the same rows of
        ``item.pixels`` (those rows of the input are not needed again). So the only image-sized memory is the
        decoded image itself. Raises RuntimeError (one failed file) when the image cannot be tiled or the model
        produced NaN or infinite values."""
        img = item.pixels
        height, width = item.size
        non_finite = 0

        def read_rows(lo: int, hi: int) -> torch.Tensor:
            return image_rows(img, lo, hi)

        def finish(row: int, strip: torch.Tensor) -> None:  # strip: (3, h, W) float32 in [0, 1]
            nonlocal non_finite
            if not math.isfinite(float(strip.sum())):  # one pass; values in [0, 1] cannot sum to infinity
                non_finite += int((~torch.isfinite(strip)).sum())
            rows = image_rows(img, row, row + strip.shape[1])  # the content, read before it is overwritten
            out = finish_colors(strip, rows_to_tensor(rows), self.preserve_color, self.strength)
            out = to_uint8(out).permute(1, 2, 0)
            if rows.shape[2] == 4:
                out = torch.cat([out, rows[..., 3:]], dim=2)
            paste_rows(img, row, out)

        try:
            self._tiled.stream(read_rows, height, width, finish, sink_bytes_per_px=FINISH_BYTES_PER_PX)
        except (ValueError, MemoryError) as err:
            raise RuntimeError(f"{str(err) or 'out of memory'} (raise max_memory_mb or set max_side_px)") from err
        if non_finite:
            raise RuntimeError(f"the model produced {non_finite} NaN or infinite values for this image (is the "
                               "model broken?); nothing written")
        return img


def _batches(loaded: Iterator[Loaded], runner: Runner, batch_size: int) -> Iterator[list[Loaded]]:
    """Group consecutive decoded images of equal size into batches (failed decodes pass through alone)."""
    pending: list[Loaded] = []
    for item in loaded:
        if item.error is not None:
            yield [item]
            continue
        if pending and (item.size != pending[0].size or len(pending) >= batch_size):
            yield pending
            pending = []
        pending.append(item)
        if len(pending) >= max(1, min(batch_size, runner.max_batch(*item.size))):
            yield pending
            pending = []
    if pending:
        yield pending


@dataclass
class Summary:
    """Counts of a stylize run; ``failed`` and ``passed_over`` list (file, reason)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    passed_over: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        rate = len(self.written) / self.seconds if self.seconds > 0 else 0.0
        passed = f", passed over {len(self.passed_over)} (not image files)" if self.passed_over else ""
        return (
            f"stylized {len(self.written)}, skipped {len(self.skipped)} (exist; overwrite=true redoes them){passed}, "
            f"failed {len(self.failed)} in {self.seconds:.1f} s ({rate:.2f} images/s)"
        )


class StylizeInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run; ``summary`` holds what was written (every written file is complete)."""

    def __init__(self, summary: Summary, remaining: int, signum: int) -> None:
        super().__init__("interrupted")
        self.summary, self.remaining, self.signum = summary, remaining, signum


class _Terminate(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so both stop the run the same way."""


def _non_finite_error(image: torch.Tensor) -> str | None:
    """Why a stylized image must not be written (NaN or infinite values: a broken model), or None."""
    bad = int((~torch.isfinite(image)).sum())
    if bad == 0:
        return None
    return f"the model produced {bad} NaN or infinite values for this image (is the model broken?); nothing written"


def stylize(cfg: DictConfig) -> Summary:
    """Stylize every input named by ``cfg`` (configs/stylize.yaml); returns the counts. Usage errors raise
    FaststyleError before any image is processed; per-image failures are collected in the summary; Ctrl-C
    (KeyboardInterrupt) raises StylizeInterrupted once the writes in flight are complete."""
    from core.device import resolve_device
    from interop.legacy import load_any_model

    check_stylize_config(cfg)
    if cfg.malloc_reuse:
        reuse_freed_memory()
    model_path = _absolute(cfg.model)
    if model_path.is_dir():
        raise FaststyleError(f"model={model_path} is a folder: pass the model file, e.g. model=<run dir>/model.pth")
    if not model_path.is_file():
        raise FaststyleError(f"model file not found: {model_path} (pass model=<run dir>/model.pth)")
    device = resolve_device(str(cfg.device))
    if model_path.suffix.lower() == ".onnx":  # exported models run through onnxruntime, untiled only
        from inference.onnx_runner import load_onnx_model

        net, meta = load_onnx_model(model_path, device=device, pixel_range=cfg.onnx_pixel_range)
    else:
        net, meta = load_any_model(model_path, device="cpu")
    jobs, passed_over = plan_jobs(cfg, model_path, meta)
    summary = Summary(passed_over=passed_over)
    for path, reason in passed_over:
        logger.warning("passed over %s: %s", path, reason)
    todo = []
    for job in jobs:
        if job.target.exists() and not cfg.overwrite:
            summary.skipped.append(job.source)
        else:
            todo.append(job)
    if summary.skipped:
        logger.info("%d outputs exist already and are skipped (overwrite=true redoes them)", len(summary.skipped))
    for folder in sorted({job.target.parent for job in todo}):
        remove_stale_temp_files(folder)  # left by a stylize run that was killed mid-write
    runner = Runner(net, device, cfg)
    start = time.perf_counter()
    try:
        _run(todo, runner, cfg, summary)
    except KeyboardInterrupt as stop:
        summary.seconds = time.perf_counter() - start
        done = len(summary.written) + len(summary.failed)
        raise StylizeInterrupted(summary, len(todo) - done, 15 if isinstance(stop, _Terminate) else 2) from None
    summary.seconds = time.perf_counter() - start
    return summary


def _run(todo: list[Job], runner: Runner, cfg: DictConfig, summary: Summary) -> None:
    """Decode, stylize and write ``todo``, recording every result in ``summary``."""
    max_side = int(cfg.max_side_px) if cfg.max_side_px is not None else None
    scale = float(cfg.scale) if cfg.scale is not None else None
    # Decoding and encoding run in a small thread pool (PIL releases the GIL while it decodes/encodes), so the
    # network is rarely idle waiting for files; at most io_threads + 1 decoded images wait in memory. Leaving the
    # pool's block (also on Ctrl-C) waits for the writes in flight, which are atomic: no file is left half-written.
    with ThreadPoolExecutor(max_workers=int(cfg.io_threads), thread_name_prefix="stylize-io") as pool:
        ahead = int(cfg.io_threads) + 1

        def decoded() -> Iterator[Loaded]:
            futures: list[Future[Loaded]] = []
            for job in todo:
                futures.append(pool.submit(load_job, job, max_side, scale))
                if len(futures) > ahead:
                    yield futures.pop(0).result()
            for future in futures:
                yield future.result()

        writes: list[tuple[Loaded, Future[Path]]] = []
        progress = tqdm(total=len(todo), unit="img", desc="stylize", disable=None)
        try:
            for batch in _batches(decoded(), runner, int(cfg.batch_size)):
                if batch[0].error is not None:
                    summary.failed.append((batch[0].job.source, batch[0].error))
                    logger.error("skipping: %s", batch[0].error)
                    progress.update(1)
                    continue
                try:
                    outputs = runner(batch)
                except (RuntimeError, OSError) as err:  # e.g. out of memory on one huge image: report, go on
                    for item in batch:
                        summary.failed.append((item.job.source, f"stylizing failed: {err}"))
                    logger.error("stylizing %d image(s) failed: %s", len(batch), err)
                    progress.update(len(batch))
                    continue
                for item, out in zip(batch, outputs, strict=True):
                    problem = _non_finite_error(out) if isinstance(out, torch.Tensor) else None  # tiled: checked
                    if problem is not None:
                        summary.failed.append((item.job.source, problem))
                        logger.error("%s: %s", item.job.source, problem)
                    else:
                        writes.append((item, pool.submit(save_result, item, out, cfg)))
                progress.update(len(batch))
                writes = _collect(writes, summary, wait=False)
        except BaseException:  # Ctrl-C: drop the writes not started yet; those started finish (atomically)
            for _, future in writes:
                future.cancel()
            _collect([w for w in writes if not w[1].cancelled()], summary, wait=True)
            raise
        else:
            _collect(writes, summary, wait=True)
        finally:
            progress.close()


def _collect(writes: list, summary: Summary, wait: bool) -> list:
    """Move finished writes into the summary; returns those still running."""
    still = []
    for item, future in writes:
        if not wait and not future.done():
            still.append((item, future))
            continue
        try:
            summary.written.append(future.result())
        except (FaststyleError, OSError, ValueError) as err:
            summary.failed.append((item.job.source, f"cannot write {item.job.target}: {err}"))
            logger.error("cannot write %s: %s", item.job.target, err)
    return still


CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "stylize.yaml"


def register_config() -> None:
    """Register configs/stylize.yaml under the name "stylize" in Hydra's ConfigStore.

    Why not ``config_path="configs"``: that folder holds train.py's config groups, and ``model`` is one of them,
    so Hydra would read ``model=run/model.pth`` as a choice in the ``model/`` group and refuse it. The stylize
    config is therefore loaded on its own, with no groups beside it.
    """
    ConfigStore.instance().store(name="stylize", node=OmegaConf.load(CONFIG_FILE))


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose the stylize config with ``overrides`` (for tests and notebooks; needs no Hydra app running)."""
    register_config()
    with hydra.initialize(version_base="1.3", config_path=None):
        return hydra.compose(config_name="stylize", overrides=overrides)


@hydra.main(version_base="1.3", config_path=None, config_name="stylize")
def main(cfg: DictConfig) -> None:
    """Entry point: ``python stylize.py model=... input=...``; prints the summary line.

    Exit status: 0 every image written (or skipped because it exists), 1 some images failed (each one listed),
    2 a usage error, 3 an internal error (a bug: traceback), 130 / 143 Ctrl-C / SIGTERM.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminate)
    try:
        summary = stylize(cfg)
    except FaststyleError as err:
        exit_with_error(err)
        return
    except StylizeInterrupted as stop:
        done = stop.summary
        print(f"interrupted ({'SIGTERM' if stop.signum == 15 else 'Ctrl-C'}): {len(done.written)} written, "
              f"{stop.remaining} not done; run the same command again to finish them (finished outputs are "
              "skipped)", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except Exception:
        traceback.print_exc()
        print("internal error (a bug in faststyle): please report the traceback above", file=sys.stderr)
        raise SystemExit(EXIT_INTERNAL) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    for source, reason in summary.failed:
        print(f"failed: {source}: {reason}", file=sys.stderr)
    print(summary.line())
    if summary.failed:
        raise SystemExit(1)


def _raise_terminate(signum: int, frame: object) -> None:
    raise _Terminate()


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The config ``python stylize.py <overrides>`` runs with, including the ``hydra`` node (cli.preflight)."""
    register_config()
    with hydra.initialize(version_base="1.3", config_path=None):
        return hydra.compose(config_name="stylize", overrides=overrides, return_hydra_config=True)


if __name__ == "__main__":
    register_config()  # before main(): @hydra.main looks the config up by name when it runs
    try:
        sys.argv += preflight(sys.argv[1:], compose_with_hydra, check_stylize_config)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) before any image was stylized", file=sys.stderr)
        raise SystemExit(130) from None
    main()
