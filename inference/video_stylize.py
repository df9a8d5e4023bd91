"""Stylize one video file: decode (data.video) -> Runner (batches, or the exact tiled executor for large frames)
-> finish colors (preserve_color, strength) -> encode, as a stream.

Three threads share the work so the network is rarely idle: a reader decodes and converts frames ahead (and hands
the audio packets to the writer), the calling thread runs the network, and a writer encodes and muxes. The queues
between them are short (a few batches), so memory does not depend on the clip's length. The output is written
atomically (data.video.open_video_writer): Ctrl-C or an error leaves no file behind, and a clip that ends early
(truncated, broken data) is still written up to its last decodable frame and reported.

With ``video_blend`` above 0 each finished frame is blended with the previous output moved by the optical flow
(inference/steady.py), in display order on the calling thread.

A multi-style model can change its mix over the clip (``StyleRamp``): frame k gets the mix ``(1 - t) * start + t *
end``, t its time between the first and the last frame, folded into a plain network for that frame alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from core.errors import FaststyleError
from data.video import Frame, VideoReader, VideoSettings, even_size, frame_span, open_video_writer, output_size
from inference.jobs import Job
from inference.memory import FRAME_FLOAT_BYTES_PER_PX, memory_problem
from inference.runner import Loaded, Runner
from inference.steady import BYTES_PER_PX as BLEND_BYTES_PER_PX
from inference.steady import FlowBlend
from models.styles import StyleChoice

logger = logging.getLogger(__name__)

_STOP = object()
ENCODER_QUEUE_BYTES = 512 * 2**20
"""Frames waiting for the encoder beyond two batches take at most this much memory (and at most 64 of them): the
slack lets the reader hand over audio packets without waiting, and must not grow with the frame size."""


def queue_depths(batch_size: int, frame_bytes: int) -> tuple[int, int]:
    """(reader queue, encoder queue) depths in items for frames of ``frame_bytes``: what stylize_video holds."""
    slack = max(4, min(64, ENCODER_QUEUE_BYTES // max(frame_bytes, 1)))
    return batch_size + 2, 2 * batch_size + slack


@dataclass
class VideoResult:
    """What became of one video job: ``frames`` written to ``target`` covering ``seconds`` of the clip, in
    ``wall_s`` seconds; ``stopped`` says where decoding stopped early (the file is written up to there), else None."""

    target: Path
    frames: int
    seconds: float
    wall_s: float
    stopped: str | None = None


@dataclass(frozen=True)
class StyleRamp:
    """A mix of a multi-style model that moves linearly from ``start`` at the first frame to ``end`` at the last:
    each frame's network is the model's plain network of that frame's mix (Runner.with_style)."""

    start: StyleChoice
    end: StyleChoice

    def weights(self, t: float) -> tuple[float, ...]:
        """The mix at position ``t`` in [0, 1]: exactly ``start`` at 0 and exactly ``end`` at 1."""
        if t <= 0.0:
            return self.start.weights
        if t >= 1.0:
            return self.end.weights
        return tuple((1.0 - t) * a + t * b for a, b in zip(self.start.weights, self.end.weights, strict=True))

    def choice(self, t: float) -> StyleChoice:
        """The mix at position ``t`` as a style choice (labelled like the video's output name)."""
        return StyleChoice(f"{self.start.label}_to_{self.end.label}", self.weights(t))


class _Worker:
    """A thread fed through a bounded queue; ``error`` holds what it raised. ``put`` re-raises that error in the
    caller, and stops waiting when the worker is gone."""

    def __init__(self, name: str, handle: Callable[[object], None], depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._handle = handle
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    item = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _STOP:
                    return
                self._handle(item)
        except BaseException as err:  # handed to the caller: it decides what failed
            self.error = err
            self.stop.set()

    def put(self, item: object) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if self.stop.is_set():
                raise RuntimeError("the video writer stopped")
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Let the queued work complete, then end the thread (errors re-raised)."""
        self.put(_STOP)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """End the thread after the item in hand; queued work is dropped."""
        self.stop.set()
        self._thread.join()


def _prefetch(frames: Iterator[Frame], depth: int) -> Iterator[Frame]:
    """``frames`` produced in a background thread, at most ``depth`` ahead; closing this generator (also on
    Ctrl-C in the consumer) stops the thread before returning."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for frame in frames:
                while not stop.is_set():
                    try:
                        buffer.put(frame, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:
            failure.append(err)
        finally:
            while not stop.is_set():
                try:
                    buffer.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    continue

    thread = threading.Thread(target=produce, name="video-read", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _STOP:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        thread.join()


def stylize_video(
    job: Job,
    runner: Runner,
    cfg: DictConfig,
    ramp: StyleRamp | None = None,
    progress: bool | None = None,
) -> VideoResult:
    """Stylize the video ``job.source`` into ``job.target`` (atomic). ``runner`` runs the style (for a ``ramp``,
    its settings run each frame's mix). FaststyleError: the file cannot be read as a video (nothing written).
    RuntimeError/OSError from the network or the encoder: nothing written. KeyboardInterrupt: nothing written.
    ``progress``: show a tqdm bar (None: only on a terminal)."""
    start = time.perf_counter()
    max_side = int(cfg.max_side_px) if cfg.max_side_px is not None else None
    scale = float(cfg.scale) if cfg.scale is not None else None
    with VideoReader(job.source) as reader:
        info = reader.info
        logger.info("%s: %s", job.source.name, info.describe())
        width, height = output_size(info.width, info.height, scale, max_side)
        even_w, even_h = _even_size(job, width, height)
        span = frame_span(job.source) if ramp is not None else None
        batch_size = max(1, min(int(cfg.batch_size), runner.max_batch(height, width)))
        if ramp is not None:
            batch_size = 1  # each frame has its own network
        settings = VideoSettings.like(reader, even_w, even_h, crf=int(cfg.video_crf))
        frame_bytes = width * height * 3
        read_depth, write_depth = queue_depths(batch_size, frame_bytes)
        blend = FlowBlend(float(cfg.video_blend)) if float(cfg.video_blend) > 0 else None
        _check_memory(job, runner, (width, height), batch_size, read_depth + write_depth, scale, blend is not None)
        disable = None if progress is None else not progress  # tqdm: None = shown on a terminal only
        bar = tqdm(total=info.frames, unit="frame", desc=job.source.name, disable=disable)
        first_time = last_time = None
        written = 0
        try:
            with open_video_writer(job.target, settings) as writer:
                encoder = _Worker("video-write", lambda item: _encode(writer, item), depth=write_depth)
                frames = _prefetch(reader.frames((width, height), on_packet=encoder.put), depth=read_depth)
                try:
                    for batch in _batches(frames, batch_size):
                        for frame, pixels in _stylize_batch(batch, job, runner, ramp, span):
                            if blend is not None:
                                pixels = blend(frame.pixels, pixels)
                            encoder.put((pixels[:even_h, :even_w], frame.pts))
                            first_time = frame.time if first_time is None else first_time
                            last_time = frame.time
                            written += 1
                        bar.update(len(batch))
                    encoder.finish()
                except BaseException:  # Ctrl-C, a failed frame or encoder: the file is discarded
                    encoder.stop.set()  # first, so that the reader is not left waiting to hand it audio
                    frames.close()
                    encoder.cancel()
                    raise
        finally:
            bar.close()
        seconds = 0.0 if first_time is None else last_time - first_time + 1 / float(info.frame_rate)
        result = VideoResult(job.target, written, seconds, time.perf_counter() - start, reader.stopped)
        logger.info(
            "%s: %d frames in %.1f s (%.2f frames/s, %.3gx real time)",
            *(job.target.name, written, result.wall_s, written / result.wall_s, seconds / result.wall_s),
        )
        if blend is not None:
            logger.info(
                "%s: video_blend=%g blended %d frames (%d cuts or frames the flow could not follow)",
                *(job.target.name, blend.alpha, blend.blended, blend.cuts),
            )
        return result


def _even_size(job: Job, width: int, height: int) -> tuple[int, int]:
    """The size frames are written at (data.video.even_size), with one log line when it differs."""
    even_w, even_h = even_size(width, height)
    if (even_w, even_h) != (width, height):
        logger.info(
            "%s: %dx%d frames are written %dx%d (yuv420p needs even sizes: the last column/row is dropped)",
            *(job.source.name, width, height, even_w, even_h),
        )
    return even_w, even_h


def _check_memory(
    job: Job, runner: Runner, size: tuple[int, int], batch_size: int, queued: int, scale: float | None, blend: bool
) -> None:
    """FaststyleError (nothing written) when the frames ``queued`` for the network and the encoder, the batch in
    hand with its float copies, the blend's state and work (``blend``) and the network's share of max_memory_mb do
    not fit the memory available. Checked before the first frame is decoded, so that a frame size the machine cannot
    hold fails with one line."""
    width, height = size
    frame_bytes = width * height * 3
    pixels = frame_bytes * (queued + batch_size) + FRAME_FLOAT_BYTES_PER_PX * width * height * batch_size
    pixels += BLEND_BYTES_PER_PX * width * height if blend else 0
    network = runner.network_bytes(height, width, batch_size)
    problem = memory_problem(f"stylizing {job.source.name}", size, pixels, network, scale)
    if problem is not None:
        raise FaststyleError(f"{problem}; nothing written")


def _encode(writer: object, item: object) -> None:
    if isinstance(item, tuple):
        writer.write(*item)
    else:  # an audio packet from the reader
        writer.copy_packet(item)


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stylize_batch(
    batch: list[Frame],
    job: Job,
    runner: Runner,
    ramp: StyleRamp | None,
    span: tuple[float, float] | None,
) -> list[tuple[Frame, np.ndarray]]:
    """Run one batch of frames (of one size) through the network; returns each frame with its finished (H, W, 3)
    uint8 pixels. Frames that fit max_memory_mb untiled go through Runner.stylize_pixels (colors finished on the
    device); larger ones one by one through the exact tiled executor, which returns them finished too."""
    if ramp is not None:
        first, last = span if span is not None else (batch[0].time, batch[0].time)
        t = 0.0 if last <= first else (batch[0].time - first) / (last - first)
        runner = runner.with_style(ramp.choice(t))
    height, width = batch[0].pixels.shape[:2]
    if runner.max_batch(height, width) >= len(batch):
        out = runner.stylize_pixels(torch.from_numpy(np.stack([frame.pixels for frame in batch])))
        return [(frame, pixels) for frame, pixels in zip(batch, out.numpy(), strict=True)]
    loaded = [Loaded(job, frame.image, size=(height, width)) for frame in batch]
    return [(frame, np.asarray(image)) for frame, image in zip(batch, runner(loaded), strict=True)]
