"""stylize.py on videos (data/video.py, inference/video_stylize.py): frames, timing, audio copy, rotation,
containers, folders, bad files, refusals, bounded memory, tiling, multi-style mixes and Ctrl-C. Clips are made
with PyAV (``tests.support.make_clip``): a window moving over a real photo, with a sine-tone audio track."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from core import metrics
from core.errors import FaststyleError
from data.video import even_size, probe_video
from evaluation.warping import warping_error
from inference.flow import estimate_flows, non_occlusion_mask
from inference.pipeline import stylize
from stylize import compose_config
from tests.support import CONTENT, REPO, make_clip, start_stylize_until, tiny_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTO = CONTENT / "chelsea.jpg"


# ------------------------------------------------------------------------------------------------------------------
# Models and what a file holds
# ------------------------------------------------------------------------------------------------------------------
def make_model(path: Path, styles: int = 1, seed: int = 0) -> Path:
    """A width-8 network whose output is far from flat; ``styles`` > 1: a multi-style model with distinct styles."""
    return tiny_model_file(path, num_styles=styles, scale=0.3, seed=seed)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("run") / "model.pth")


def run(model: Path, inputs: Path | str, **options):
    overrides = [f"model={model}", f"input={inputs}", "precision=fp32"]
    return stylize(compose_config(overrides + [f"{k}={v}" for k, v in options.items()]))


def frames_of(path: Path) -> list[np.ndarray]:
    """Every decoded frame as (H, W, 3) uint8 RGB, as stored (no rotation applied)."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def video_times(path: Path) -> list[float]:
    """The presentation times of the video packets (seconds), in display order."""
    with av.open(str(path)) as container:
        return sorted(float(p.pts * p.time_base) for p in container.demux(video=0) if p.size)


def audio_payloads(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return []
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit frames."""
    return metrics.psnr(a, b, peak=255.0)


# ------------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------------
def test_clip_keeps_frames_timing_size_and_audio(model_file: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=30)
    summary = run(model_file, clip, output=tmp_path / "out")
    out = tmp_path / "out" / "clip_wave.mp4"
    assert summary.written == [out] and not summary.failed
    assert "30 frames" in summary.line() and "frames/s" in summary.line() and "real time" in summary.line()
    info = probe_video(out)
    assert (info.width, info.height, info.frame_rate, info.codec) == (64, 48, 20, "h264")
    assert abs(info.duration_s - 1.5) < 0.03
    assert video_times(out) == video_times(clip)  # the source's timestamps, frame for frame
    frames, source = frames_of(out), frames_of(clip)
    assert len(frames) == 30 and frames[0].shape == (48, 64, 3)
    assert psnr(frames[0], source[0]) < 20 and frames[0].std() > 10  # stylized, not flat
    assert psnr(frames[1], frames[0]) < 45  # the content moves
    payloads = audio_payloads(clip)
    assert payloads and audio_payloads(out) == payloads  # the audio packets copied bit for bit
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == "yuv420p" and stream.codec_context.name == "h264"


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_variable_frame_rate_keeps_every_timestamp(model_file: Path, tmp_path: Path, ext: str) -> None:
    clip = make_clip(tmp_path / f"vfr{ext}", frames=12, steps=[1, 3, 2])  # 50, 150, 100 ms between frames
    run(model_file, clip, output=tmp_path / f"out{ext}")
    times = video_times(tmp_path / f"out{ext}")
    assert times == video_times(clip) and len(times) == 12
    assert sorted({round(b - a, 3) for a, b in zip(times[:-1], times[1:], strict=True)}) == [0.05, 0.1, 0.15]


def test_color_tags_are_followed(model_file: Path, tmp_path: Path) -> None:
    """A full-range BT.709 clip comes back with the same colors (strength 0 returns the frames themselves): the
    RGB conversions follow the tags both ways, and the output says what it holds."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, 255 - x * 3], -1).clip(0, 255).astype(np.uint8)
    with av.open(str(tmp_path / "full.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.color_range, stream.codec_context.colorspace = 2, 1  # full range ("JPEG"), BT.709
        stream.options = {"crf": "0"}
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(rgb).reformat(format="yuv420p", dst_colorspace=1, dst_color_range=2)
            frame.pts, frame.time_base = i, Fraction(1, 10)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    run(model_file, tmp_path / "full.mp4", output=tmp_path / "back.mp4", strength=0.0, video_crf=0)
    with av.open(str(tmp_path / "back.mp4")) as container:
        assert container.streams.video[0].codec_context.colorspace == 1  # BT.709, limited range
        frame = next(container.decode(video=0))
        back = frame.to_ndarray(format="rgb24", src_color_range=frame.color_range).astype(np.int64)
    assert np.abs(back - rgb).mean() < 4  # 4:2:0 chroma twice; a wrong matrix or range gives 7 and more


def test_max_side_px_scale_and_odd_sizes(model_file: Path, tmp_path: Path, caplog) -> None:
    clip = make_clip(tmp_path / "clip.mkv", frames=8)
    run(model_file, clip, output=tmp_path / "small.mkv", max_side_px=32)
    assert probe_video(tmp_path / "small.mkv").width == 32 and len(frames_of(tmp_path / "small.mkv")) == 8
    assert frames_of(tmp_path / "small.mkv")[0].shape == (24, 32, 3)
    with caplog.at_level("INFO"):
        run(model_file, clip, output=tmp_path / "odd.mkv", scale=0.77)  # 49 x 37 -> 48 x 36
    assert frames_of(tmp_path / "odd.mkv")[0].shape == (36, 48, 3)
    assert "49x37 frames are written 48x36" in caplog.text
    assert even_size(49, 37) == (48, 36) and even_size(1, 1) == (2, 2)


def test_rotation_metadata_comes_out_upright(model_file: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "phone.mp4", frames=6, rotation=90)  # stored 64 x 48, shown 48 x 64
    info = probe_video(clip)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    run(model_file, clip, output=tmp_path / "up.mp4", strength=0.0)  # strength 0: the photo itself
    written = frames_of(tmp_path / "up.mp4")
    assert written[0].shape == (64, 48, 3)
    upright = np.rot90(frames_of(clip)[0])  # a quarter turn counter-clockwise, as the display matrix says
    assert psnr(written[0], upright) > 30
    assert psnr(written[0], np.rot90(frames_of(clip)[0], -1)) < 20  # not the other way round
    with av.open(str(tmp_path / "up.mp4")) as container:
        assert next(container.decode(video=0)).rotation == 0  # no display matrix left to apply twice


@pytest.mark.parametrize("ext", [".mov", ".mkv", ".webm", ".avi"])
def test_containers(model_file: Path, tmp_path: Path, ext: str) -> None:
    clip = make_clip(tmp_path / f"clip{ext}", frames=12)
    summary = run(model_file, clip, output=tmp_path / "out")
    out = tmp_path / "out" / f"clip_wave{ext}"
    assert summary.written == [out], summary.failed
    assert len(frames_of(out)) == 12
    info = probe_video(out)
    assert (info.width, info.height, info.frame_rate) == (64, 48, 20)
    assert info.codec == ("vp9" if ext == ".webm" else "h264")
    assert audio_payloads(out) == audio_payloads(clip)  # Opus in WebM, AAC elsewhere: copied


def test_audio_is_reencoded_where_the_container_cannot_hold_it(model_file: Path, tmp_path: Path, caplog) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=10)
    with caplog.at_level("INFO"):
        summary = run(model_file, clip, output=tmp_path / "clip.webm")
    assert summary.written == [tmp_path / "clip.webm"]
    assert "cannot hold aac audio: re-encoding it as opus" in caplog.text
    assert probe_video(tmp_path / "clip.webm").audio_codecs == ("opus",)
    assert len(frames_of(tmp_path / "clip.webm")) == 10


def test_folder_with_a_video_and_an_image(model_file: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_clip(src / "clip.mov", frames=6)
    Image.open(PHOTO).convert("RGB").resize((40, 30)).save(src / "cat.jpg")
    summary = run(model_file, src, output=tmp_path / "out", format="png")  # format= is for the images only
    assert sorted(p.name for p in summary.written) == ["cat_wave.png", "clip_wave.mov"]
    assert len(frames_of(tmp_path / "out" / "clip_wave.mov")) == 6
    assert "images/s" in summary.line() and "frames/s" in summary.line()


def test_output_that_is_the_input_is_refused(model_file: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=4)
    before = clip.read_bytes()
    (tmp_path / "link.mp4").symlink_to(clip)
    os.link(clip, tmp_path / "hard.mp4")
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "sym.mp4").symlink_to(clip)
    for output in (clip, tmp_path / "link.mp4", tmp_path / "hard.mp4", elsewhere / "sym.mp4"):
        with pytest.raises(FaststyleError, match="is an input video"):
            run(model_file, clip, output=output, overwrite="true")
    with pytest.raises(FaststyleError, match="give a video output"):
        run(model_file, clip, output=tmp_path / "frame.png")
    assert clip.read_bytes() == before


def test_tiled_frames_equal_untiled(model_file: Path, tmp_path: Path, caplog) -> None:
    clip = make_clip(tmp_path / "clip.mkv", frames=4, size=(96, 64))
    run(model_file, clip, output=tmp_path / "untiled.mkv", video_crf=0)
    with caplog.at_level("INFO"):
        run(model_file, clip, output=tmp_path / "tiled.mkv", video_crf=0, max_memory_mb=0.05)
    assert caplog.text.count("exact tiled inference") == 1  # taken, and said once for the clip
    tiled, untiled = frames_of(tmp_path / "tiled.mkv"), frames_of(tmp_path / "untiled.mkv")
    assert len(tiled) == len(untiled) == 4
    for a, b in zip(tiled, untiled, strict=True):
        assert a.std() > 10 and psnr(a, b) >= 45  # equal up to float rounding (a few 8-bit steps at most)


def test_multistyle_style_and_changing_mix(tmp_path: Path) -> None:
    model = make_model(tmp_path / "multi.pth", styles=2, seed=1)
    clip = make_clip(tmp_path / "clip.mkv", frames=9)
    # Lossless, so equal pixels decode equal; one frame per batch in every run, as the changing mix runs, so that
    # the comparison does not depend on a kernel giving the same result for a frame alone and within a batch.
    options = {"output": tmp_path / "out", "video_crf": 0, "batch_size": 1}
    run(model, clip, style="s0", **options)
    run(model, clip, style="s1", **options)
    ramp = run(model, clip, style="s0", style_end="s1", **options)
    assert [p.name for p in ramp.written] == ["clip_s0_to_s1.mkv"]
    first, second, mixed = (frames_of(tmp_path / "out" / f"clip_{n}.mkv") for n in ("s0", "s1", "s0_to_s1"))
    assert len(mixed) == 9
    assert np.array_equal(mixed[0], first[0]) and np.array_equal(mixed[-1], second[-1])
    assert not np.array_equal(mixed[4], first[4]) and not np.array_equal(mixed[4], second[4])
    assert psnr(first[0], second[0]) < 30  # the two styles differ, so the ends prove something
    with pytest.raises(FaststyleError, match="one style"):
        run(make_model(tmp_path / "one.pth"), clip, style_end="s1")
    Image.open(PHOTO).convert("RGB").resize((40, 30)).save(tmp_path / "cat.jpg")
    with pytest.raises(FaststyleError, match="is an image"):
        run(model, tmp_path / "cat.jpg", style="s0", style_end="s1", output=tmp_path / "x")
    with pytest.raises(FaststyleError, match="needs style="):
        run(model, clip, style_end="s1", output=tmp_path / "x")


@pytest.mark.slow
def test_bad_files_fail_one_line_each(model_file: Path, tmp_path: Path) -> None:
    """A real stylize.py over a folder: a good clip, a clip cut in half (written up to where it stops, reported),
    an audio-only file, a text file named .mp4 and an MP4 cut in half (its index is lost): exit status 1."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    make_clip(src / "good.mp4", frames=8)
    whole = make_clip(tmp_path / "whole.mkv", frames=40).read_bytes()
    (src / "cut.mkv").write_bytes(whole[: len(whole) // 2])
    make_clip(src / "sound.mp4", frames=20, video=False)
    (src / "notes.mp4").write_text("not a video")
    whole = make_clip(tmp_path / "whole.mp4", frames=20).read_bytes()
    (src / "cut_index.mp4").write_bytes(whole[: len(whole) // 2])
    proc = subprocess.run(
        [sys.executable, "stylize.py", f"model={model_file}", f"input={src}", f"output={out}", "precision=fp32"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    failed = sorted(line for line in proc.stderr.splitlines() if line.startswith("failed: "))
    assert len(failed) == 4, proc.stderr
    cut, cut_index, notes, sound = failed
    assert "cut.mkv" in cut and "the file ends after frame" in cut and " s" in cut and "cut_wave.mkv" in cut
    assert "cut_index.mp4" in cut_index and "cannot read video" in cut_index
    assert "notes.mp4" in notes and "cannot read video" in notes
    assert "sound.mp4" in sound and "no video stream" in sound
    assert "stylized 1," in proc.stdout and "failed 4" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["cut_wave.mkv", "good_wave.mp4"]  # nothing half-written
    stopped_at = int(cut.split("the file ends after frame ")[1].split()[0])
    assert 5 <= stopped_at < 40 and len(frames_of(out / "cut_wave.mkv")) == stopped_at


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from stylize import compose_config
    from inference.pipeline import stylize

    cfg = ["model=" + sys.argv[1], "input=" + sys.argv[2], "output=" + sys.argv[3], "precision=fp32"]
    assert stylize(compose_config(cfg)).written
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))  # peak RSS, kB
    """
)


@pytest.mark.slow
def test_memory_does_not_grow_with_the_clip_length(tmp_path: Path) -> None:
    """Peak resident memory of a fresh process stylizing 900 frames exceeds that of one stylizing 300 frames of the
    same size by far less than the extra frames would take if kept (600 x 128 x 96 RGB: 22 MB as 8-bit, 88 MB as
    float32; repeated runs differ by -3 to +4 MB). The short clip is long enough for the steady state (encoder
    look-ahead, allocator pools)."""
    model = make_model(tmp_path / "m.pth")
    peaks = {}
    for frames in (300, 900):
        clip = make_clip(tmp_path / f"c{frames}.mkv", frames=frames, size=(128, 96), audio=True)
        out = tmp_path / f"out{frames}.mkv"
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(model), str(clip), str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        assert len(frames_of(out)) == frames
        peaks[frames] = int(proc.stdout.split()[-1])
    print("peak RSS (kB) by clip length:", peaks)
    assert peaks[900] - peaks[300] < 10 * 1024, peaks


def _largest_file(folder: Path) -> int:
    """Bytes of the largest file in ``folder`` (0 when it is missing or empty; files may vanish while we look)."""
    sizes = [0]
    try:
        for entry in os.scandir(folder):
            try:
                sizes.append(entry.stat().st_size)
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        pass
    return max(sizes)


@pytest.mark.slow
def test_ctrl_c_leaves_no_partial_video(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    clip = make_clip(tmp_path / "long.mp4", frames=800, size=(96, 64))
    args = [f"model={model_file}", f"input={clip}", f"output={out}", "batch_size=1"]
    # Signalled once frames are being encoded into the temporary file (it has grown), not after a fixed delay: on a
    # fast machine the whole clip may take less than any delay chosen here.
    proc = start_stylize_until(args, lambda: _largest_file(out) > 0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted (Ctrl-C): 0 written, 1 not done") and "was removed" in last, err
    assert "Traceback" not in err and list(out.iterdir()) == []


def test_video_blend_steadies_the_frames_and_keeps_everything_else(
    model_file: Path, tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("cv2", reason="video_blend needs OpenCV (requirements-dev.txt)")
    clip = make_clip(tmp_path / "clip.mp4", frames=6, size=(96, 64))
    run(model_file, clip, output=tmp_path / "plain.mp4", video_crf=0)
    with caplog.at_level("INFO"):
        run(model_file, clip, output=tmp_path / "steady.mp4", video_crf=0, video_blend=0.6)
    assert "video_blend=0.6 blended 5 frames" in caplog.text
    plain, steady = frames_of(tmp_path / "plain.mp4"), frames_of(tmp_path / "steady.mp4")
    assert len(plain) == len(steady) == 6 and video_times(tmp_path / "plain.mp4") == video_times(
        tmp_path / "steady.mp4"
    )
    assert np.array_equal(plain[0], steady[0])  # nothing before the first frame to blend with
    # later frames are mixed with the moved previous output, which makes them steadier along the input's motion
    assert all(psnr(a, b) < 60 for a, b in zip(plain[1:], steady[1:], strict=True))
    frames = torch.from_numpy(np.stack(frames_of(clip))).permute(0, 3, 1, 2).float() / 255
    backward, forward = estimate_flows(frames)
    mask = non_occlusion_mask(backward, forward)

    def flicker(video: list[np.ndarray]) -> float:
        return warping_error(torch.from_numpy(np.stack(video)).permute(0, 3, 1, 2).float() / 255, backward, mask).value

    assert flicker(steady) < 0.7 * flicker(plain)
    # images take no blend; an input with no video is refused in one line, and so is a value that would freeze it
    with pytest.raises(FaststyleError, match="video_blend=0.6 steadies videos, but the input holds no video"):
        run(model_file, PHOTO, output=tmp_path / "cat.png", video_blend=0.6)
    with pytest.raises(FaststyleError, match="video_blend"):
        run(model_file, clip, output=tmp_path / "frozen.mp4", video_blend=1.0)
    # without OpenCV: one line saying what to install, before anything is written
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(FaststyleError, match="video_blend needs OpenCV.*pip install opencv-python-headless"):
        run(model_file, clip, output=tmp_path / "no_cv.mp4", video_blend=0.6)
    assert not (tmp_path / "no_cv.mp4").exists() and not (tmp_path / "frozen.mp4").exists()
