"""A whole stylize run from a composed config (configs/stylize.yaml): load the model, plan the outputs, then decode,
stylize and write every input with a small I/O thread pool, collecting per-image failures instead of stopping.
Videos go to inference.video_stylize one by one (a stream of frame batches each), after the images of the same style.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from configs.schema import check_stylize_config
from core.cli import model_file
from core.device import reuse_freed_memory
from core.errors import FaststyleError
from core.fileio import DiskFullError, remove_stale_temp_files
from inference.jobs import Job, output_location, plan_jobs
from inference.network import StyleModel, load_style_model
from inference.runner import Loaded, Runner, batches, load_job, non_finite_error, save_result
from inference.video_stylize import StyleRamp, stylize_video
from models.styles import StyleChoice, all_styles, parse_style

logger = logging.getLogger(__name__)


@dataclass
class Summary:
    """Counts of a stylize run; ``failed`` and ``passed_over`` list (file, reason)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    passed_over: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    videos_written: int = 0  # of ``written``
    video_frames: int = 0  # frames encoded, also those of videos that stopped early (failed, file kept)
    video_seconds: float = 0.0  # the clip time those frames cover
    video_wall_s: float = 0.0  # wall time spent on videos (part of ``seconds``)
    video_in_progress: Path | None = None  # the video output being written when Ctrl-C came (not kept)
    output: str = ""  # where the outputs go: the output file, or the folder (with a trailing "/")
    out_of_space: DiskFullError | None = None  # the write that found the disk full (the run stops there)

    def line(self) -> str:
        """The one summary line: counts, time, images/s and, with videos, frames/s and the real-time factor
        (clip seconds stylized per wall second)."""
        images = len(self.written) - self.videos_written
        image_s = self.seconds - self.video_wall_s
        rates = []
        if images or not self.video_frames:
            rates.append(f"{images / image_s if image_s > 0 else 0.0:.2f} images/s")
        if self.video_frames:
            wall = max(self.video_wall_s, 1e-9)
            rates.append(
                f"video: {self.video_frames} frames, {self.video_seconds:.1f} s of video in {self.video_wall_s:.1f} s, "
                f"{self.video_frames / wall:.2f} frames/s, {self.video_seconds / wall:.3g}x real time"
            )
        passed = f", passed over {len(self.passed_over)} (not image files)" if self.passed_over else ""
        where = f"; output: {self.output}" if self.output else ""
        return (
            f"stylized {len(self.written)}, skipped {len(self.skipped)} (exist; overwrite=true redoes them){passed}, "
            f"failed {len(self.failed)} in {self.seconds:.1f} s ({'; '.join(rates)}){where}"
        )


class StylizeInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run; ``summary`` holds what was written (every written file is complete)."""

    def __init__(self, summary: Summary, remaining: int, signum: int) -> None:
        super().__init__("interrupted")
        self.summary, self.remaining, self.signum = summary, remaining, signum


class StylizeOutOfSpace(Exception):
    """The output disk filled up (or a file hit the size limit): the run stopped at the first write that failed so,
    since every later one would fail the same way. ``summary`` holds what was written (every file complete)."""

    def __init__(self, summary: Summary, remaining: int, error: DiskFullError) -> None:
        super().__init__(str(error))
        self.summary, self.remaining, self.error = summary, remaining, error

    def line(self) -> str:
        """The one line that replaces a failure line per remaining image."""
        folder, done = self.error.folder, f"after {len(self.summary.written)} written, {self.remaining} not done"
        again = "run the same command again (finished outputs are skipped)"
        if self.error.kind == "file too large":
            return (
                f"an output is larger than the file system or the file size limit (ulimit -f) allows in {folder} "
                f"({done}): raise the limit, or write smaller files (max_side_px=, format=jpg), and {again}"
            )
        if self.error.kind == "quota exceeded":
            return f"disk quota exceeded on {folder} ({done}): free some space or raise the quota and {again}"
        return f"no space left on {folder} ({done}): free some space and {again}"


class Terminate(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so both stop the run the same way."""


def stylize(cfg: DictConfig) -> Summary:
    """Stylize every input named by ``cfg`` (configs/stylize.yaml); returns the counts. Usage errors raise
    FaststyleError before any image is processed; per-image failures are collected in the summary; Ctrl-C
    (KeyboardInterrupt) raises StylizeInterrupted once the writes in flight are complete."""
    check_stylize_config(cfg)
    if cfg.malloc_reuse:
        reuse_freed_memory()
    model_path = model_file(cfg.model)
    # Read once, the precision policy resolved once (a refused precision fails here, before any output is planned);
    # each style is folded from the model as its turn comes. .onnx models run through onnxruntime, untiled only.
    model = load_style_model(
        model_path,
        device=str(cfg.device),
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        pixel_range=cfg.onnx_pixel_range,
    )
    choices, end, jobs, passed_over = _plan(cfg, model, model_path)
    output, single_file = output_location(cfg, model_path)
    summary = Summary(passed_over=passed_over, output=str(output) if single_file else f"{output}/")
    for path, reason in passed_over:
        logger.warning("passed over %s: %s", path, reason)
    todo = _to_do(jobs, bool(cfg.overwrite), summary)
    start = time.perf_counter()
    runner = None
    try:
        for index, choice in enumerate(choices or [None]):
            style_jobs = [job for job in todo if job.style == index]
            if not style_jobs:
                continue
            if choice is not None:
                logger.info("style %d/%d: %s", index + 1, len(choices), choice.label)
            # A multi-style model runs as the plain network of the chosen style or mix: same cost per image as a
            # one-style model, and the tiled executor, bf16 and channels_last apply unchanged.
            runner = Runner(model.network(choice), cfg) if runner is None else runner.with_style(choice)
            image_jobs = [job for job in style_jobs if not job.is_video]
            if image_jobs:
                _run(image_jobs, runner, cfg, summary)
            ramp = StyleRamp(choice, end) if end is not None else None
            for job in style_jobs:
                if job.is_video:
                    _run_video(job, runner, cfg, summary, ramp)
    except KeyboardInterrupt as stop:
        summary.seconds = time.perf_counter() - start
        done = len(summary.written) + len(summary.failed)
        raise StylizeInterrupted(summary, len(todo) - done, 15 if isinstance(stop, Terminate) else 2) from None
    except DiskFullError as full:
        summary.seconds = time.perf_counter() - start
        done = len(summary.written) + len(summary.failed)
        raise StylizeOutOfSpace(summary, len(todo) - done, full) from None
    summary.seconds = time.perf_counter() - start
    return summary


def _plan(
    cfg: DictConfig, model: StyleModel, model_path: Path
) -> tuple[list[StyleChoice] | None, StyleChoice | None, list[Job], list[tuple[Path, str]]]:
    """The styles to write (None: a one-style model), the style a video ends in (``style_end``), the jobs and the
    entries passed over; FaststyleError for a usage error."""
    choices = style_choices(model, cfg.style)
    end = ramp_end_choice(model, cfg.style_end, cfg.style)
    labels = [c.label for c in choices] if choices else None
    if end is not None:
        labels = [f"{choices[0].label}_to_{end.label}"]
    jobs, passed_over = plan_jobs(cfg, model_path, model.meta, labels)
    if end is not None:
        images = [job.source for job in jobs if not job.is_video]
        if images:
            raise FaststyleError(
                f"style_end={cfg.style_end} changes the style over a video, but {images[0]} is an image: give "
                "videos only, or leave style_end out"
            )
    if float(cfg.video_blend) > 0:
        if not any(job.is_video for job in jobs):
            raise FaststyleError(
                f"video_blend={cfg.video_blend} steadies videos, but the input holds no video: leave video_blend out"
            )
        from inference.flow import import_cv2

        import_cv2("video_blend")  # before any file is written
    return choices, end, jobs, passed_over


def _to_do(jobs: list[Job], overwrite: bool, summary: Summary) -> list[Job]:
    """The jobs to run: those whose output does not exist yet (all with ``overwrite``); the others are recorded in
    ``summary`` as skipped, or failed when their output path cannot be used. Clears the stale temporary files of a
    killed run from the output folders."""
    todo = []
    for job in jobs:
        try:
            exists = job.target.exists()
        except OSError as err:  # ENAMETOOLONG: a deep input tree, mirrored under a longer output folder
            summary.failed.append((job.source, _unusable_target(job.target, err)))
            continue
        if exists and not overwrite:
            summary.skipped.append(job.source)
        else:
            todo.append(job)
    if summary.skipped:
        logger.info("%d outputs exist already and are skipped (overwrite=true redoes them)", len(summary.skipped))
    for folder in sorted({job.target.parent for job in todo}):
        remove_stale_temp_files(folder)  # left by a stylize run that was killed mid-write
    return todo


def _unusable_target(target: Path, err: OSError) -> str:
    """Why an output path cannot be written, checked before its image is decoded (one failure line)."""
    if err.errno == errno.ENAMETOOLONG:
        longest = max(len(part.encode()) for part in target.parts)
        return (
            f"cannot write {target}: the path is longer than the system allows ({len(str(target).encode())} bytes, "
            f"longest name {longest} bytes): choose a shorter output folder, or stylize this sub-folder on its own"
        )
    return f"cannot write {target}: {err.strerror or err}"


def style_choices(model: StyleModel, spec: str | int | None) -> list[StyleChoice] | None:
    """The styles to write: None for a one-style model (``style=`` refused), else every style of a multi-style
    model (``style=null``) or the one style or mix ``spec`` names (models/styles.py)."""
    if model.num_styles == 1:
        if spec is not None:
            raise FaststyleError(f"style={spec}: this model holds one style; leave style out")
        return None
    return all_styles(model.style_names) if spec is None else [model.choice(spec)]


def ramp_end_choice(model: StyleModel, spec: str | int | None, start: str | int | None) -> StyleChoice | None:
    """The style or mix a video ends in (``style_end=``), or None. Needs a multi-style model and ``style=`` (the
    style or mix at the first frame)."""
    if spec is None:
        return None
    if model.num_styles == 1:
        raise FaststyleError(f"style_end={spec}: this model holds one style, it cannot change; leave style_end out")
    if start is None:
        raise FaststyleError(f"style_end={spec} needs style=<the style or mix at the first frame> as well")
    return parse_style(spec, model.style_names, option="style_end")


def _run_video(job: Job, runner: Runner, cfg: DictConfig, summary: Summary, ramp: StyleRamp | None) -> None:
    """Stylize one video into ``summary``: written, or failed (unreadable: nothing written; ended early: written up
    to there and reported, so the run exits with status 1)."""
    try:
        result = stylize_video(job, runner, cfg, ramp)
    except DiskFullError:  # stops the run (StylizeOutOfSpace): the next output would not fit either
        raise
    except FaststyleError as err:
        summary.failed.append((job.source, str(err)))
        logger.error("skipping: %s", err)
        return
    except (RuntimeError, OSError) as err:
        summary.failed.append((job.source, f"stylizing failed, nothing written: {err}"))
        logger.error("%s: stylizing failed, nothing written: %s", job.source, err)
        return
    except KeyboardInterrupt:
        summary.video_in_progress = job.target
        raise
    summary.video_frames += result.frames
    summary.video_seconds += result.seconds
    summary.video_wall_s += result.wall_s
    if result.stopped:
        reason = f"{result.stopped}; the {result.frames} frames before it were written to {result.target}"
        summary.failed.append((job.source, reason))
        logger.error("%s: %s", job.source, reason)
    else:
        summary.written.append(result.target)
        summary.videos_written += 1


def _decoded(pool: ThreadPoolExecutor, todo: list[Job], cfg: DictConfig, runner: Runner) -> Iterator[Loaded]:
    """``todo`` decoded in ``pool``, in order, with at most ``io_threads + 1`` decoded images waiting."""
    max_side = int(cfg.max_side_px) if cfg.max_side_px is not None else None
    scale = float(cfg.scale) if cfg.scale is not None else None
    ahead = int(cfg.io_threads) + 1
    futures: list[Future[Loaded]] = []
    for job in todo:
        futures.append(pool.submit(load_job, job, max_side, scale, runner.network_bytes))
        if len(futures) > ahead:
            yield futures.pop(0).result()
    for future in futures:
        yield future.result()


def _stylize_batch(batch: list[Loaded], runner: Runner, summary: Summary) -> list[tuple[Loaded, object]]:
    """Run one batch; failures go into ``summary``, the results to write are returned with their inputs."""
    if batch[0].error is not None:  # a file that could not be decoded travels alone
        summary.failed.append((batch[0].job.source, batch[0].error))
        logger.error("skipping: %s", batch[0].error)
        return []
    try:
        outputs = runner(batch)
    except (RuntimeError, OSError) as err:  # e.g. out of memory on one huge image: report, go on
        for item in batch:
            summary.failed.append((item.job.source, f"stylizing failed: {err}"))
        logger.error("stylizing %d image(s) failed: %s", len(batch), err)
        return []
    results = []
    for item, out in zip(batch, outputs, strict=True):
        problem = non_finite_error(out) if isinstance(out, torch.Tensor) else None  # tiled: checked already
        if problem is not None:
            summary.failed.append((item.job.source, problem))
            logger.error("%s: %s", item.job.source, problem)
        else:
            results.append((item, out))
    return results


def _run(todo: list[Job], runner: Runner, cfg: DictConfig, summary: Summary) -> None:
    """Decode, stylize and write ``todo``, recording every result in ``summary``."""
    # Decoding and encoding run in a small thread pool (PIL releases the GIL while it decodes/encodes), so the
    # network is rarely idle waiting for files. Leaving the pool's block (also on Ctrl-C) waits for the writes in
    # flight, which are atomic: no file is left half-written.
    with ThreadPoolExecutor(max_workers=int(cfg.io_threads), thread_name_prefix="stylize-io") as pool:
        writes: list[tuple[Loaded, Future[Path]]] = []
        progress = tqdm(total=len(todo), unit="img", desc="stylize", disable=None)
        try:
            for batch in batches(_decoded(pool, todo, cfg, runner), runner, int(cfg.batch_size)):
                for item, out in _stylize_batch(batch, runner, summary):
                    writes.append((item, pool.submit(save_result, item, out, cfg)))
                progress.update(len(batch))
                writes = _collect(writes, summary, wait=False)
                if summary.out_of_space is not None:
                    raise summary.out_of_space
        except BaseException:  # Ctrl-C or a full disk: drop the writes not started yet; those started finish
            for _, future in writes:
                future.cancel()
            _collect([w for w in writes if not w[1].cancelled()], summary, wait=True)
            raise
        else:
            _collect(writes, summary, wait=True)
            if summary.out_of_space is not None:
                raise summary.out_of_space
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
        except DiskFullError as err:  # the caller stops the run: one line for all the images left
            summary.out_of_space = summary.out_of_space or err
        except (FaststyleError, OSError, ValueError) as err:
            summary.failed.append((item.job.source, f"cannot write {item.job.target}: {err}"))
            logger.error("cannot write %s: %s", item.job.target, err)
    return still
