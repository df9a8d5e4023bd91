"""inference/steady.py (stylize's video_blend): the previous output, moved by the flow of the input frames, blended
in where the flow can be trusted, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2", reason="video_blend needs OpenCV (requirements-dev.txt)")

from inference.steady import FlowBlend  # noqa: E402


def _texture(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth, strongly textured RGB frame that optical flow can follow (uint8)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(6):
            fx, fy, phase = rng.uniform(0.05, 0.25), rng.uniform(0.05, 0.25), rng.uniform(0, 6.3)
            image[..., c] += np.sin(fx * xs + phase) * np.cos(fy * ys + phase)
    image = (image - image.min()) / (image.max() - image.min())
    return (image * 255).round().astype(np.uint8)


def _flicker(frame: np.ndarray, seed: int, amount: float = 12.0) -> np.ndarray:
    """``frame`` with independent noise per frame: a network's flicker on a still scene."""
    noise = np.random.default_rng(seed).normal(0, amount, frame.shape)
    return np.clip(frame.astype(np.float32) + noise, 0, 255).round().astype(np.uint8)


def test_the_first_frame_is_the_network_output_unchanged() -> None:
    source = _texture()
    stylized = _flicker(source, 1)
    assert np.array_equal(FlowBlend(0.5)(source, stylized), stylized)


def test_on_a_still_scene_it_removes_most_of_the_flicker() -> None:
    source = _texture()
    blend = FlowBlend(0.7)
    plain, steady = [], []
    for t in range(8):
        stylized = _flicker(source, t)
        plain.append(stylized.astype(np.float32))
        steady.append(blend(source, stylized).astype(np.float32))
    plain_change = np.mean([np.mean((b - a) ** 2) for a, b in zip(plain[:-1], plain[1:], strict=True)])
    steady_change = np.mean([np.mean((b - a) ** 2) for a, b in zip(steady[3:-1], steady[4:], strict=True)])
    # An exponential average with weight 0.7 on independent noise: about (1 - a)^2 * 2 / (1 + a) / 2 = 0.05 of the
    # frame-to-frame change, once warmed up. Allow for the rounding to 8 bits and the flow's small errors.
    assert steady_change < 0.2 * plain_change
    assert blend.blended == 7 and blend.cuts == 0


def _strokes(seed: int, height: int = 96, width: int = 128, amount: float = 40.0) -> np.ndarray:
    """Independent fine texture per frame (3x3 box-filtered noise): strokes a network places anew every frame."""
    noise = np.random.default_rng(seed).normal(0, 1, (height + 2, width + 2, 3)).astype(np.float32)
    boxed = sum(noise[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) / 3
    return boxed * amount


def test_strokes_placed_anew_every_frame_keep_their_contrast_while_their_flicker_goes() -> None:
    # A plain average of independent textures keeps (1 - a) / (1 + a) of their variance: 18% at 0.7, measured 18% of
    # this texture's detail. The blend keeps each band's contrast instead, and still removes most of the flicker.
    source = _texture()
    blend = FlowBlend(0.7)
    plain, steady = [], []
    for t in range(12):
        stylized = np.clip(source * 0.5 + 64 + _strokes(seed=t), 0, 255).round().astype(np.uint8)
        plain.append(stylized.astype(np.float32))
        steady.append(blend(source, stylized).astype(np.float32))
    assert blend.blended == 11
    kept = np.mean([_detail(frame) for frame in steady[5:]]) / np.mean([_detail(frame) for frame in plain[5:]])
    assert kept > 0.7  # measured 0.81
    plain_change = np.mean([np.mean((b - a) ** 2) for a, b in zip(plain[:-1], plain[1:], strict=True)])
    steady_change = np.mean([np.mean((b - a) ** 2) for a, b in zip(steady[5:-1], steady[6:], strict=True)])
    assert steady_change < 0.15 * plain_change  # measured 0.075 (a plain average: 0.054)


def test_it_follows_the_motion_instead_of_leaving_a_trail() -> None:
    # The scene pans 3 pixels a frame; the network's output moves with it (no flicker): the blend must not change
    # it, which it would if it mixed in the previous output unmoved.
    wide = _texture(96, 200, seed=3)
    frames = [np.ascontiguousarray(wide[:, 3 * t : 3 * t + 128]) for t in range(5)]
    styled = [255 - frame for frame in frames]  # a "style" that moves exactly with the scene
    blend = FlowBlend(0.7)
    for frame, stylized in zip(frames, styled, strict=True):
        out = blend(frame, stylized)
    inner = np.s_[8:-8, 8:-16]  # away from the edges the pan reveals
    difference = np.abs(out[inner].astype(np.float32) - styled[-1][inner].astype(np.float32))
    assert difference.mean() < 2.0
    # a still blend of the same frames (no motion compensation) would differ by far more
    assert np.abs(styled[-1][inner].astype(np.float32) - styled[-2][inner].astype(np.float32)).mean() > 10


def _waves(height: int, width: int, shift: float, frequencies: tuple[float, float], seed: int) -> np.ndarray:
    """Sums of sines (uint8 RGB) moved ``shift`` pixels to the left: any sub-pixel motion, known exactly."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(6):
            fx, fy, phase = rng.uniform(*frequencies), rng.uniform(*frequencies), rng.uniform(0, 6.3)
            image[..., c] += np.sin(fx * (xs + shift) + phase) * np.cos(fy * ys + phase)
    return np.clip((image + 6) / 12 * 255, 0, 255).round().astype(np.uint8)


def _detail(image: np.ndarray) -> float:
    """Energy of the image minus the mean of its four neighbours: the fine texture a blur takes away."""
    x = image.astype(np.float32)
    neighbours = (x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:]) / 4
    return float(np.mean((x[1:-1, 1:-1] - neighbours) ** 2))


def test_a_fine_texture_moving_by_half_a_pixel_keeps_its_detail() -> None:
    # Half a pixel a frame is where bilinear sampling blurs most (each pixel the mean of two), and the moving
    # average compounds it: bilinear kept 49% of this texture's detail after ten frames, bicubic all of it.
    blend = FlowBlend(0.7)
    for t in range(10):
        source = _waves(96, 128, 0.5 * t, (0.05, 0.25), seed=0)  # smooth: the flow follows it
        stylized = _waves(96, 128, 0.5 * t, (0.8, 1.6), seed=1)  # a fine style texture moving with the scene
        out = blend(source, stylized)
    assert blend.blended == 9
    inner = np.s_[8:-8, 8:-8]
    assert 0.85 < _detail(out[inner]) / _detail(stylized[inner]) < 1.2
    assert np.abs(out[inner].astype(np.float32) - stylized[inner].astype(np.float32)).mean() < 3.0


def test_a_cut_is_not_blended() -> None:
    blend = FlowBlend(0.7)
    first = _texture(seed=0)
    blend(first, _flicker(first, 0))
    other = _texture(seed=9)  # another shot
    stylized = _flicker(other, 1)
    assert np.array_equal(blend(other, stylized), stylized)
    assert blend.cuts == 1 and blend.blended == 0


def test_pixels_whose_input_changed_take_the_new_frame_alone() -> None:
    # A bright square appears on a still scene: the flow cannot explain it, so its pixels are not mixed with the
    # old output (no ghost of what was there before), while the rest of the frame is blended.
    source = _texture()
    blend = FlowBlend(0.7)
    blend(source, _flicker(source, 0))
    changed = source.copy()
    changed[30:60, 40:80] = 255
    stylized = _flicker(changed, 1)
    out = blend(changed, stylized)
    assert np.array_equal(out[36:54, 46:74], stylized[36:54, 46:74])
    assert not np.array_equal(out[:20], stylized[:20])


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_alpha_must_lie_between_0_and_1(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        FlowBlend(alpha)
