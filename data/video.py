"""Video files in and out (PyAV): the one owner of containers, codecs, timestamps, display rotation and audio copy.

- :func:`probe_video` reads a file's header and first frame: displayed size, frame rate, duration, frame count.
- :class:`VideoReader` decodes the frames one by one, upright (the display matrix applied) and resized, as 8-bit
  RGB PIL images (``Frame.tensor()`` gives the (3, H, W) float32 [0, 1] tensor of docs/architecture.md, "Images"),
  handing every audio packet to a callback so it can be copied; memory does not depend on the clip's length. It
  never raises mid-clip: when the file ends early (truncated) or its data is broken, iteration stops and
  ``stopped`` says where.
- :func:`open_video_writer` encodes frames (H.264 yuv420p, VP9 in WebM) with the source's timestamps, copies or
  re-encodes the audio, and writes the file atomically (core.fileio.atomic_output): an error or Ctrl-C inside the
  block leaves no file behind.

Frames here are 8-bit (H, W, 3) RGB. Decoding to RGB follows the source's color-space and range tags (BT.601 when
untagged, as ffmpeg does); the output is limited range in the source's color space, tagged with its color space,
primaries and transfer (10-bit sources are written with 8 bits).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.errors import FaststyleError
from core.fileio import atomic_output
from data.io import resize_to

logger = logging.getLogger(__name__)


class _PyAV:
    """PyAV (a requirement), imported at its first use instead of with this module: stylize imports this module for
    its names (``VIDEO_EXTENSIONS``, ``is_video_file``, ``output_size``) on every run, and loading PyAV, which loads
    ffmpeg's libraries, is a start-up cost that a run on images alone must not pay. Every use below goes through the
    one name ``av``, as after ``import av``."""

    def __getattr__(self, name: str) -> Any:
        import av as pyav

        return getattr(pyav, name)


av = _PyAV()

VIDEO_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
"""Video extensions (lower case, with the dot) read and written, and the container (ffmpeg muxer) each writes."""
VIDEO_EXTENSIONS = tuple(VIDEO_CONTAINERS)
"""The extensions of the video files stylize reads (in folders as one by one) and writes."""
VIDEO_CODECS = {"webm": "libvpx-vp9"}
"""Video encoder per container; every other container gets H.264 (libx264). WebM cannot hold H.264."""
AUDIO_CODECS = {"webm": "libopus"}
"""Audio encoder for a container that cannot hold the source's audio codec (others get AAC)."""
CRF_MAX = 51
"""The largest ``crf`` (H.264's scale, 0 = lossless, 51 = worst); VP9's 0-63 scale is mapped onto it linearly."""
DEFAULT_CRF = 18

_TRUNCATION_TOLERANCE_S = 0.1
"""A file whose streams end more than this (plus two frame durations) before its header's duration is truncated."""


def _reason(err: BaseException) -> str:
    """An ffmpeg error as a few words (PyAV's message repeats the errno and the file name)."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


@contextlib.contextmanager
def _encoding_errors(name: str) -> Iterator[None]:
    """ffmpeg errors while writing ``name`` as OSError (one failed file, not a bug)."""
    try:
        yield
    except av.FFmpegError as err:
        code = getattr(err, "errno", None)  # kept, so that core.fileio reports a full disk as such
        message = f"cannot encode {name}: {_reason(err)}"
        raise (OSError(code, message) if isinstance(code, int) and code > 0 else OSError(message)) from err


def is_video_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has a video extension (any letter case)."""
    return Path(path).suffix.lower() in VIDEO_CONTAINERS


def even_size(width: int, height: int) -> tuple[int, int]:
    """The size written for a (width, height) frame: yuv420p stores one color sample per 2 x 2 pixels, so H.264
    and VP9 encoders need even sizes; an odd width or height loses its last column or row (at least 2 kept)."""
    return max(2, width - width % 2), max(2, height - height % 2)


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------
_TRANSPOSES = {
    # (swaps axes, mirror x', mirror y') -> the PIL operation that shows the frame upright
    (False, False, False): None,
    (False, True, False): Image.Transpose.FLIP_LEFT_RIGHT,
    (False, False, True): Image.Transpose.FLIP_TOP_BOTTOM,
    (False, True, True): Image.Transpose.ROTATE_180,
    (True, False, False): Image.Transpose.TRANSPOSE,
    (True, False, True): Image.Transpose.ROTATE_90,  # counter-clockwise
    (True, True, False): Image.Transpose.ROTATE_270,
    (True, True, True): Image.Transpose.TRANSVERSE,
}


def upright_transpose(matrix: tuple[int, ...] | None) -> Image.Transpose | None:
    """The PIL transpose that shows a frame the way a player does, given its display matrix (9 int32, the
    ``DISPLAYMATRIX`` side data: 16.16 fixed point, a pixel (x, y) of the frame is shown at
    (a x + c y, b x + d y) with a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]); None for upright frames.

    Phones store portrait video as landscape frames plus this matrix. Rotations by other angles than a quarter turn
    are taken to the nearest quarter turn (a player would rotate the picture itself: rare outside editors).
    """
    if matrix is None:
        return None
    a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
    swap = abs(b) > abs(a)
    if swap:
        return _TRANSPOSES[(True, c < 0, b < 0)]
    return _TRANSPOSES[(False, a < 0, d < 0)]


def _display_matrix(frame: object) -> tuple[int, ...] | None:
    data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    if data is None:
        return None
    raw = bytes(data)
    return struct.unpack("=9i", raw[:36]) if len(raw) >= 36 else None


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's header (and first frame) says. ``width`` x ``height``: the frames as displayed (display
    rotation applied, before any resize); ``frames``: the count the header gives, else estimated from duration and
    frame rate (None when neither is known); ``duration_s``: the file's duration (None when unknown)."""

    path: Path
    container: str
    codec: str
    width: int
    height: int
    frame_rate: Fraction
    frames: int | None
    duration_s: float | None
    rotation: int
    audio_codecs: tuple[str, ...]

    def describe(self) -> str:
        turn = f", shown rotated by {self.rotation} degrees" if self.rotation else ""
        length = f"{self.duration_s:.2f} s" if self.duration_s is not None else "unknown length"
        frames = f"{self.frames} frames" if self.frames else "frame count unknown"
        audio = f", audio {', '.join(self.audio_codecs)}" if self.audio_codecs else ", no audio"
        rate = f"{float(self.frame_rate):.3g} fps"
        return f"{self.width}x{self.height} {self.codec}{turn}, {rate}, {frames}, {length}{audio}"


@dataclass
class Frame:
    """One decoded frame: ``pixels`` (H, W, 3) uint8 RGB, upright, at the requested size (a writable array of its
    own); ``index`` counts from 0 in display order; ``pts`` in ``time_base`` units; ``time`` in seconds from the
    file's time origin."""

    pixels: np.ndarray
    index: int
    pts: int
    time_base: Fraction
    time: float

    @property
    def image(self) -> Image.Image:
        """The frame as a PIL RGB image (a copy)."""
        return Image.fromarray(self.pixels, "RGB")

    def tensor(self) -> torch.Tensor:
        """The frame as a (3, H, W) float32 tensor in [0, 1]."""
        return torch.from_numpy(self.pixels).permute(2, 0, 1).float().div_(255.0)


def _cut_short_hint(path: Path) -> str:
    """What to check when a video cannot be read: whether the file is complete (the usual cause)."""
    hint = "is it a complete video file?"
    if path.suffix.lower() in (".mp4", ".m4v", ".mov"):
        hint += " An MP4/MOV cut short cannot be read: its index is written at the end"
    return hint


def _open_input(path: Path) -> object:
    if path.is_dir():
        raise FaststyleError(f"{path} is a folder, not a video file: give the path of one video")
    if not path.is_file():
        raise FaststyleError(f"video not found: {path} (check the path)")
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as err:
        raise FaststyleError(f"cannot read video {path}: {_reason(err)} ({_cut_short_hint(path)})") from err


def _video_stream(container: object, path: Path) -> object:
    streams = [s for s in container.streams.video if not (s.disposition & 1024)]  # 1024: attached picture (cover)
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        if set(kinds) <= {"data", "attachment"}:
            # No stream a player could show: a file cut inside its header (an MP4 cut before or inside its index
            # opens with no streams, or with only the data streams that were listed before the cut).
            have = f"only {', '.join(kinds)} streams" if kinds else "no streams"
            raise FaststyleError(f"cannot read video {path}: it has {have} ({_cut_short_hint(path)})")
        raise FaststyleError(f"{path} holds no video stream (it has {', '.join(kinds)}): give a video file")
    return streams[0]


def _first_frame(path: Path) -> object:
    """The first decoded frame of ``path`` (opened on its own: no seeking back); FaststyleError when there is none."""
    container = _open_input(path)
    try:
        stream = _video_stream(container, path)
        for packet in container.demux(stream):
            for frame in packet.decode():
                return frame
    except av.FFmpegError:
        pass
    finally:
        container.close()
    raise FaststyleError(f"cannot read video {path}: no frame could be decoded ({_cut_short_hint(path)})")


class VideoReader:
    """Decode one video file frame by frame. Use as a context manager; iterate :meth:`frames` once.

    ``info`` is read when opening (FaststyleError for a file that is not a readable video). While ``frames`` runs,
    every packet of the file's audio streams (``audio_streams``) goes to ``on_packet`` unchanged, in file order,
    so that a writer can copy it. Decoding stops at the first broken packet or at the end of the data; when that
    is earlier than the header's duration, ``stopped`` says where (frame and time), else it stays None.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        first = _first_frame(self.path)  # its side data holds the display matrix
        self._container = _open_input(self.path)
        try:
            self.stream = _video_stream(self._container, self.path)
            self.stream.thread_type = "AUTO"  # frame and slice threads: decoding keeps up with the network
            self.audio_streams = list(self._container.streams.audio)
        except BaseException:
            self._container.close()
            raise
        self.matrix = _display_matrix(first)
        self._transpose = upright_transpose(self.matrix)
        swap = self._transpose in (
            Image.Transpose.TRANSPOSE,
            Image.Transpose.TRANSVERSE,
            Image.Transpose.ROTATE_90,
            Image.Transpose.ROTATE_270,
        )
        width, height = (first.height, first.width) if swap else (first.width, first.height)
        stream, container = self.stream, self._container
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(25)
        duration = _seconds(stream.duration, stream.time_base)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        frames = int(stream.frames) or (round(duration * rate) if duration else None)
        self.info = VideoInfo(
            path=self.path,
            container=container.format.name,
            codec=stream.codec_context.name,
            width=width,
            height=height,
            frame_rate=Fraction(rate),
            frames=frames,
            duration_s=duration,
            rotation=int(first.rotation),
            audio_codecs=tuple(s.codec_context.name for s in self.audio_streams),
        )
        self.colorspace = first.colorspace
        self.color_range = first.color_range
        self.color_primaries = first.color_primaries
        self.color_trc = first.color_trc
        self.sample_aspect_ratio = self.stream.sample_aspect_ratio
        if swap and self.sample_aspect_ratio:
            self.sample_aspect_ratio = 1 / self.sample_aspect_ratio
        self.stopped: str | None = None
        self.frames_read = 0
        self._started = False
        self._lock = threading.Lock()
        self._closed = False
        # AVI stores decode-order timestamps only (no presentation times): its frames are evenly spaced by design.
        self._even_timestamps = self._container.format.name == "avi"

    @property
    def start_time(self) -> float:
        """Where the file's timeline starts (seconds; frame times count from the same origin)."""
        start = self._container.start_time
        return start / av.time_base if start is not None else 0.0

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the file (waits for a packet being decoded in another thread; frames() then ends)."""
        with self._lock:
            self._closed = True
            self._container.close()

    def frames(
        self,
        size: tuple[int, int] | None = None,
        on_packet: Callable[[object], None] | None = None,
    ) -> Iterator[Frame]:
        """The frames in display order, upright, resized to ``size`` (width, height) when given (Lanczos down,
        bicubic up: data.io). ``on_packet`` receives each audio packet (PyAV Packet, its ``stream`` one of
        ``audio_streams``) as the file is read. Only the frames of one packet are held here at a time."""
        if self._started:
            raise RuntimeError("VideoReader.frames() can be iterated once")
        self._started = True
        container, stream = self._container, self.stream
        audio = {s.index for s in self.audio_streams} if on_packet is not None else set()
        wanted = [stream, *self.audio_streams] if on_packet is not None else [stream]
        start = self.start_time
        step = 1 / float(self.info.frame_rate)
        data_end = start  # where the data read so far ends, in seconds, over all streams
        last_time = None
        packets = container.demux(wanted)
        while True:
            ready: list[Frame] = []
            # The lock makes close() wait for the packet in hand: the container is never closed under the decoder
            # (frames may be read in another thread than the one that closes the reader).
            with self._lock:
                if self._closed:
                    return
                try:
                    packet = next(packets, None)
                    if packet is None:
                        break
                    if packet.pts is not None and packet.time_base is not None:
                        end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                        data_end = max(data_end, end)
                    if packet.stream.index in audio:
                        if packet.size:  # the empty packet at the end only flushes a decoder
                            on_packet(packet)
                        continue
                    for decoded in packet.decode():
                        pts, time = decoded.pts, decoded.time
                        if pts is None or time is None or self._even_timestamps:
                            time = start + self.frames_read * step
                            pts = round(time / stream.time_base)
                        last_time = time
                        ready.append(self._frame(decoded, size, pts, time))
                except av.FFmpegError as err:
                    where = f"after frame {self.frames_read}{self._at(last_time, start)}"
                    self.stopped = f"the data is broken {where}: {_reason(err)}"
                    return
            yield from ready
        if self.frames_read == 0:
            self.stopped = "no frame could be decoded"
            return
        expected = self._expected_end()
        if expected is not None and data_end < expected - (_TRUNCATION_TOLERANCE_S + 2 * step):
            self.stopped = (
                f"the file ends after frame {self.frames_read}{self._at(last_time, start)} of "
                f"{expected - start:.2f} s (truncated?)"
            )

    def _at(self, time: float | None, start: float) -> str:
        return "" if time is None else f" (at {time - start:.2f} s)"

    def _expected_end(self) -> float | None:
        """The time the file's header says its streams end at (seconds), or None when it does not say."""
        if self._container.duration is None:
            return None
        return self.start_time + self._container.duration / av.time_base

    def _frame(self, decoded: object, size: tuple[int, int] | None, pts: int, time: float) -> Frame:
        array = decoded.to_ndarray(format="rgb24", src_color_range=decoded.color_range)
        resize = size is not None and tuple(size) != (self.info.width, self.info.height)
        if self._transpose is not None or resize:
            image = Image.fromarray(array, "RGB")
            if self._transpose is not None:
                image = image.transpose(self._transpose)
            if resize:
                image = resize_to(image, *size)
            array = np.array(image)
        frame = Frame(array, self.frames_read, pts, self.stream.time_base, time)
        self.frames_read += 1
        return frame


def frame_span(path: str | os.PathLike) -> tuple[float, float]:
    """The times (seconds) of the first and the last frame of ``path``'s video, read from the packets without
    decoding them (a pass over the file's bytes); for packets without timestamps, from their count and the rate."""
    with VideoReader(path) as reader:
        container, stream = reader._container, reader.stream
        first = last = None
        count = 0
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                count += 1
                if packet.pts is not None:
                    moment = float(packet.pts * packet.time_base)
                    first = moment if first is None else min(first, moment)
                    last = moment if last is None else max(last, moment)
        except av.FFmpegError:  # a broken file: the span of what could be read (decoding stops there too)
            pass
        if first is None:
            start = reader.start_time
            return start, start + max(count - 1, 0) / float(reader.info.frame_rate)
        return first, last


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """The header of a video file (FaststyleError with one line when it is not a readable video)."""
    with VideoReader(path) as reader:
        return reader.info


def output_size(width: int, height: int, scale: float | None = None, max_side_px: int | None = None) -> tuple[int, int]:
    """The size frames of ``width`` x ``height`` are stylized at: ``scale`` first, then ``max_side_px`` (never
    upscales), the same rounding as stylize's images (data.io)."""
    if scale is not None and scale != 1:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    if max_side_px and max(width, height) > max_side_px:
        factor = max_side_px / max(width, height)
        width, height = max(1, round(width * factor)), max(1, round(height * factor))
    return width, height


def read_frames(path: str | os.PathLike, max_side_px: int | None = None, scale: float | None = None) -> Iterator[Frame]:
    """Every frame of a video file, upright and resized like stylize resizes it (for benchmarks and scripts)."""
    with VideoReader(path) as reader:
        size = output_size(reader.info.width, reader.info.height, scale, max_side_px)
        yield from reader.frames(size)
        if reader.stopped:
            logger.warning("%s: %s", path, reader.stopped)


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class VideoSettings:
    """How to encode: ``width`` x ``height`` (even), ``frame_rate`` (the encoder's nominal rate), ``time_base`` of
    the pts given to ``write``, ``crf`` on H.264's 0-51 scale, and the color tags of the source."""

    width: int
    height: int
    frame_rate: Fraction
    time_base: Fraction
    crf: int = DEFAULT_CRF
    colorspace: int | None = None
    color_range: int | None = None
    color_primaries: int | None = None
    color_trc: int | None = None
    sample_aspect_ratio: Fraction | None = None
    source: VideoReader | None = None  # whose audio streams are copied; it must stay open while writing

    @property
    def audio_streams(self) -> list:
        """The source's audio streams, checked to be readable (a closed file's streams would crash ffmpeg)."""
        if self.source is None:
            return []
        if self.source.closed:
            raise ValueError("the VideoReader whose audio is copied is closed: write while it is open")
        return list(self.source.audio_streams)

    @classmethod
    def like(
        cls, reader: VideoReader, width: int, height: int, crf: int = DEFAULT_CRF, audio: bool = True
    ) -> VideoSettings:
        """Settings that keep ``reader``'s timing, color tags and (``audio``) audio, for frames of ``width`` x
        ``height``. With audio, write while ``reader`` is open: its packets are copied from it."""
        return cls(
            width=width,
            height=height,
            frame_rate=reader.info.frame_rate,
            time_base=reader.stream.time_base,
            crf=crf,
            colorspace=reader.colorspace,
            color_range=reader.color_range,
            color_primaries=reader.color_primaries,
            color_trc=reader.color_trc,
            sample_aspect_ratio=reader.sample_aspect_ratio,
            source=reader if audio else None,
        )


class VideoWriter:
    """Encodes frames and copies audio into one open output container (see :func:`open_video_writer`)."""

    def __init__(self, file: Path, container_format: str, settings: VideoSettings, name: str) -> None:
        if settings.width % 2 or settings.height % 2:
            raise ValueError(f"yuv420p needs an even size, got {settings.width}x{settings.height} (see even_size)")
        self.name = name
        self.settings = settings
        self._out = av.open(str(file), mode="w", format=container_format)
        try:
            self._video = self._add_video(settings)
            self._audio_map = {}  # input stream index -> (output stream, None to copy or the re-encoding resampler)
            for source in settings.audio_streams:
                self._add_audio(source)
        except BaseException:
            self._out.close()
            raise
        self._lock = threading.Lock()  # abort() from another thread waits for the frame being encoded
        self._closed = False
        self._cfr = container_format == "avi"  # AVI stores one frame per tick of 1/frame_rate: no free timestamps
        self._last_pts: int | None = None
        self.frames_written = 0

    def _add_video(self, settings: VideoSettings) -> object:
        container = self._out.format.name
        codec = VIDEO_CODECS.get(container, "libx264")
        rate = settings.frame_rate if settings.frame_rate > 0 else Fraction(25)
        stream = self._out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = settings.width, settings.height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(settings.crf), "preset": "medium"}
            if container == "avi":  # AVI has no presentation timestamps: B-frames would shift the picture in time
                stream.options = {**stream.options, "bf": "0"}
        else:  # VP9 in constant-quality mode (bit rate 0); its crf scale is 0-63
            crf = round(settings.crf * 63 / CRF_MAX)
            stream.options = {"crf": str(crf), "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"}
        ctx = stream.codec_context
        if container != "avi":
            # The source's time base: its timestamps, hence variable frame rates and the duration, pass unchanged.
            ctx.time_base = settings.time_base
            stream.time_base = settings.time_base
        if settings.colorspace:
            ctx.colorspace = settings.colorspace
        ctx.color_range = 1  # limited ("MPEG") range: what players expect of yuv420p H.264 and VP9
        if settings.color_primaries:
            ctx.color_primaries = settings.color_primaries
        if settings.color_trc:
            ctx.color_trc = settings.color_trc
        if settings.sample_aspect_ratio:
            ctx.sample_aspect_ratio = settings.sample_aspect_ratio
        ctx.thread_type = "AUTO"
        return stream

    def _add_audio(self, source: object) -> None:
        name = source.codec_context.name
        container = self._out.format.name
        if name in _supported_codecs(container):
            self._audio_map[source.index] = (self._out.add_stream_from_template(source), None)
            return
        codec = AUDIO_CODECS.get(container, "aac")
        rate = 48000 if codec == "libopus" else (source.codec_context.sample_rate or 48000)
        stream = self._out.add_stream(codec, rate=rate)
        layout = source.codec_context.layout
        if layout is not None and layout.nb_channels:
            stream.layout = layout if layout.nb_channels <= 2 or codec != "libopus" else "stereo"
        logger.info(
            "%s: the %s cannot hold %s audio: re-encoding it as %s",
            self.name,
            container,
            name,
            codec.removeprefix("lib"),
        )
        self._audio_map[source.index] = (stream, "encode")

    def write(self, rgb: np.ndarray, pts: int | None) -> None:
        """Encode one (H, W, 3) uint8 RGB frame shown at ``pts`` (in ``settings.time_base``; None: right after the
        previous frame). Timestamps that do not increase are moved one tick after the previous one."""
        with self._lock, _encoding_errors(self.name):
            self._check_open()
            self._write(rgb, pts)
        self.frames_written += 1

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(f"{self.name}: the video writer is closed")

    def _write(self, rgb: np.ndarray, pts: int | None) -> None:
        settings = self.settings
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame = frame.reformat(
            format="yuv420p",
            dst_colorspace=settings.colorspace or None,
            dst_color_range=1,
        )
        if self._cfr:  # AVI: timestamps in frames
            tb = 1 / Fraction(self._video.codec_context.framerate or settings.frame_rate)
            pts = None if pts is None else round(pts * settings.time_base / tb)
        else:
            tb = settings.time_base
        if pts is None or (self._last_pts is not None and pts <= self._last_pts):
            pts = 0 if self._last_pts is None else self._last_pts + 1
        frame.pts, frame.time_base = pts, tb
        self._last_pts = pts
        for packet in self._video.encode(frame):
            self._out.mux(packet)

    def copy_packet(self, packet: object) -> None:
        """Copy one audio packet of a source stream (from VideoReader.frames' ``on_packet``) into its output stream,
        unchanged where the container accepts the codec, else decoded and encoded again."""
        target = self._audio_map.get(packet.stream.index)
        if target is None:
            return
        with self._lock, _encoding_errors(self.name):
            self._check_open()
            self._copy(packet, *target)

    def _copy(self, packet: object, stream: object, encode: str | None) -> None:
        if encode is None:
            packet.stream = stream
            self._out.mux(packet)
            return
        for frame in packet.decode():
            for out in stream.encode(frame):
                self._out.mux(out)

    def finish(self) -> None:
        """Flush the encoders and write the container's index (the file is complete afterwards)."""
        with self._lock:
            self._check_open()
            self._closed = True
            self._finish()

    def _finish(self) -> None:
        for packet in self._video.encode(None):
            self._out.mux(packet)
        for stream, encode in self._audio_map.values():
            if encode is not None:
                for packet in stream.encode(None):
                    self._out.mux(packet)
        self._out.close()

    def abort(self) -> None:
        """Close the container without flushing (the file is discarded by open_video_writer); waits for a frame
        being encoded in another thread, and later writes raise OSError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):
                self._out.close()


_SUPPORTED: dict[str, frozenset[str]] = {}


def _supported_codecs(container: str) -> frozenset[str]:
    """The codec names ``container`` can hold (ffmpeg's avformat_query_codec), computed once per container."""
    if container not in _SUPPORTED:
        with av.open(os.devnull, mode="w", format=container) as probe:
            _SUPPORTED[container] = frozenset(probe.supported_codecs)
    return _SUPPORTED[container]


@contextlib.contextmanager
def open_video_writer(path: str | os.PathLike, settings: VideoSettings) -> Iterator[VideoWriter]:
    """A VideoWriter for ``path``, whose extension picks the container (VIDEO_CONTAINERS). The file is written to a
    temporary name and renamed onto ``path`` when the block ends normally (core.fileio.atomic_output); on an
    exception, Ctrl-C included, the temporary file is removed and nothing appears at ``path``."""
    path = Path(path)
    container = VIDEO_CONTAINERS.get(path.suffix.lower())
    if container is None:
        raise FaststyleError(f"cannot write video {path.name}: use one of {', '.join(VIDEO_EXTENSIONS)}")
    with atomic_output(path) as tmp:
        with _encoding_errors(path.name):
            writer = VideoWriter(tmp, container, settings, path.name)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        with _encoding_errors(path.name):
            writer.finish()
