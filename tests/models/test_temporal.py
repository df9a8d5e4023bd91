"""The stability term (models/temporal.py): the warp, its valid mask, the term and its second frame (training with
it: tests/training/test_temporal.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import FaststyleError
from models.temporal import TemporalTerm, inside_mask, random_affine, warp

pytestmark = pytest.mark.usefixtures("one_thread")


def _grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.affine_grid(theta, [theta.shape[0], 3, height, width], align_corners=False)


def _pixels(grid: torch.Tensor) -> torch.Tensor:
    """A grid's sample points in pixel coordinates (x, y) about the image centre (the units random_affine uses)."""
    height, width = grid.shape[1:3]
    return grid * grid.new_tensor([width / 2, height / 2])


def test_no_motion_is_the_identity_with_every_pixel_valid() -> None:
    theta = random_affine(2, 30, 50, shift_px=0, rotation_deg=0, zoom=0)
    grid = _grid(theta, 30, 50)
    x = torch.rand(2, 3, 30, 50)
    torch.testing.assert_close(warp(x, grid), x, atol=2e-5, rtol=0)  # affine_grid rounds in float32
    assert inside_mask(grid).min() == 1


def test_a_shift_moves_every_pixel_by_the_same_amount_within_the_range() -> None:
    generator = torch.Generator().manual_seed(1)
    theta = random_affine(16, 30, 50, shift_px=4, rotation_deg=0, zoom=0, generator=generator)
    moved = _pixels(_grid(theta, 30, 50)) - _pixels(_grid(random_affine(16, 30, 50, 0, 0, 0), 30, 50))
    shift = moved[:, :1, :1, :]
    torch.testing.assert_close(moved, shift.expand_as(moved), atol=1e-4, rtol=0)
    assert shift.abs().max() <= 4 and shift.abs().max() > 1  # drawn from U(-4, 4): not all tiny


def test_rotation_and_zoom_are_similarities_in_pixels_on_a_non_square_image() -> None:
    generator = torch.Generator().manual_seed(2)
    theta = random_affine(8, 40, 90, shift_px=0, rotation_deg=10, zoom=0.1, generator=generator)
    points = _pixels(_grid(theta, 40, 90))
    source = _pixels(_grid(random_affine(8, 40, 90, 0, 0, 0), 40, 90))
    # Distances between sample points are the output's distances times one scale per warp (no shear, no stretch).
    a, b, c = (0, 0), (39, 0), (0, 89)
    for k in range(8):
        ratios = [
            torch.dist(points[k][p], points[k][q]) / torch.dist(source[k][p], source[k][q])
            for p, q in ((a, b), (a, c), (b, c))
        ]
        assert max(ratios) - min(ratios) < 1e-4
        assert 1 / 1.1 - 1e-4 <= float(ratios[0]) <= 1.1 + 1e-4
    assert (theta[:, 0, 1].abs() > 1e-3).any()  # some rotation was drawn


def test_the_valid_mask_leaves_out_exactly_the_border_a_shift_invents() -> None:
    # A shift of +2.5 pixels in x: output column j samples input x = j + 2.5, inside for j <= W - 1 - 2.5.
    width, height = 20, 8
    theta = torch.tensor([[[1.0, 0.0, 2.5 * 2 / width], [0.0, 1.0, 0.0]]])
    mask = inside_mask(_grid(theta, height, width))[0, 0]
    assert mask[:, : width - 3].min() == 1 and mask[:, width - 3 :].max() == 0
    x = torch.rand(1, 3, height, width)
    inside = warp(x, _grid(theta, height, width))[..., : width - 3]
    torch.testing.assert_close(inside, (x[..., 2 : width - 1] + x[..., 3:width]) / 2, atol=1e-6, rtol=0)


def test_the_term_is_zero_for_a_network_that_commutes_with_the_warp() -> None:
    term = TemporalTerm(weight=5.0, shift_px=4, rotation_deg=3, zoom=0.05, noise_std=0.0)
    x = torch.rand(4, 3, 48, 64)
    frame = term.second_frame(x, torch.Generator().manual_seed(0))
    assert frame.valid.mean() < 1  # the warp did invent a border
    color_map = torch.nn.Conv2d(3, 3, 1)  # per pixel and linear: commutes with any bilinear warp
    with torch.no_grad():
        assert term(color_map(x), color_map(frame.image), frame) < 1e-10


def test_the_term_is_positive_for_a_network_that_does_not_commute() -> None:
    term = TemporalTerm(weight=1.0, shift_px=4, rotation_deg=3, zoom=0.05, noise_std=0.0)
    x = torch.rand(4, 3, 48, 64)
    frame = term.second_frame(x, torch.Generator().manual_seed(0))
    pattern = 0.2 * torch.sin(torch.arange(64.0) / 2).expand(48, 64)  # fixed on the screen: does not follow the warp
    with torch.no_grad():
        value = term(x + pattern, frame.image + pattern, frame)
    assert value > 1e-3
    # and twice the weight gives twice the term
    double = TemporalTerm(weight=2.0, shift_px=4, rotation_deg=3, zoom=0.05, noise_std=0.0)
    torch.testing.assert_close(double(x + pattern, frame.image + pattern, frame), 2 * value)


def test_noise_is_added_to_the_second_frame_and_kept_in_range() -> None:
    term = TemporalTerm(weight=1.0, shift_px=0, rotation_deg=0, zoom=0, noise_std=0.05)
    x = torch.full((2, 3, 64, 64), 0.5)
    frame = term.second_frame(x, torch.Generator().manual_seed(0))
    assert float((frame.image - x).std()) == pytest.approx(0.05, rel=0.05)
    assert frame.image.min() >= 0 and frame.image.max() <= 1
    # identity network, no motion: the term measures the noise itself (weight x variance)
    assert float(term(x, frame.image, frame)) == pytest.approx(0.05**2, rel=0.1)


def test_the_same_generator_seed_draws_the_same_second_frame() -> None:
    term = TemporalTerm(weight=1.0, shift_px=4, rotation_deg=2, zoom=0.03, noise_std=0.02)
    x = torch.rand(2, 3, 32, 32)
    a = term.second_frame(x, torch.Generator().manual_seed(7))
    b = term.second_frame(x, torch.Generator().manual_seed(7))
    c = term.second_frame(x, torch.Generator().manual_seed(8))
    assert torch.equal(a.image, b.image) and torch.equal(a.grid, b.grid)
    assert not torch.equal(a.image, c.image)


# --------------------------------------------------------------------------------------------------------------------
# Real-footage motion: a local displacement field, regions moving on their own, exposure changes


def test_local_field_and_regions_keep_every_valid_pixel_a_copy_of_its_source() -> None:
    # With no light and no noise, the second frame is the photo sampled at the grid: a network that commutes with
    # any bilinear warp (a 1x1 convolution) scores 0, however the motion bends and breaks.
    term = TemporalTerm(weight=1.0, shift_px=4, rotation_deg=2, zoom=0.03, noise_std=0.0, local_px=3, regions=3)
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    frame = term.second_frame(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(frame.image, warp(x, frame.grid, padding_mode="reflection"))
    color_map = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        assert term(color_map(x), color_map(frame.image), frame) < 1e-10


def test_the_local_field_bends_the_motion_within_its_amplitude() -> None:
    rigid = TemporalTerm(weight=1.0, shift_px=0, rotation_deg=0, zoom=0, noise_std=0.0)
    bent = TemporalTerm(weight=1.0, shift_px=0, rotation_deg=0, zoom=0, noise_std=0.0, local_px=3)
    x = torch.rand(2, 3, 64, 64)
    identity = _pixels(rigid.second_frame(x, torch.Generator().manual_seed(0)).grid)
    moved = _pixels(bent.second_frame(x, torch.Generator().manual_seed(0)).grid) - identity
    assert moved.abs().max() <= 3 + 1e-4
    assert moved.abs().mean() > 0.3  # and it does move
    # smooth: neighbouring pixels move almost alike, unlike an independent draw per pixel
    assert (moved[:, :, 1:] - moved[:, :, :-1]).abs().max() < 0.5


def test_a_moving_region_moves_by_its_own_shift_and_its_edge_is_left_out() -> None:
    options = {"weight": 1.0, "shift_px": 3, "rotation_deg": 0, "zoom": 0, "noise_std": 0.0}
    x = torch.rand(1, 3, 64, 64)
    frame = TemporalTerm(**options, regions=1).second_frame(x, torch.Generator().manual_seed(5))
    # the same seed without regions draws the same warp of the background (the regions are drawn after it)
    background = TemporalTerm(**options).second_frame(x, torch.Generator().manual_seed(5)).grid
    region = (frame.grid != background).any(dim=-1)[0]
    assert 0.02 < region.float().mean() < 0.5
    # the whole region moves by one shift of at most twice shift_px per axis (its own, not the background's)
    offsets = (_pixels(frame.grid) - _pixels(_grid(torch.eye(2, 3)[None], 64, 64)))[0][region]  # (pixels, 2)
    torch.testing.assert_close(offsets, offsets[:1].expand_as(offsets), atol=1e-4, rtol=0)
    assert offsets[0].abs().max() <= 6 + 1e-4
    # the band along its edge is left out, inside and outside the region; far from the edge every pixel counts
    edge = region ^ F.max_pool2d(region[None, None].float(), 3, 1, 1)[0, 0].bool()
    assert frame.valid[0, 0][edge].max() == 0
    far = ~F.max_pool2d(edge[None, None].float(), 9, 1, 4)[0, 0].bool()
    inside = background.abs().amax(dim=-1)[0] < 1 - 8 / 64  # and away from the border the warp invents
    assert frame.valid[0, 0][far & inside].min() == 1


def test_light_changes_each_channel_within_its_range() -> None:
    term = TemporalTerm(weight=1.0, shift_px=0, rotation_deg=0, zoom=0, noise_std=0.0, light=0.1)
    x = torch.full((8, 3, 16, 16), 0.5)
    image = term.second_frame(x, torch.Generator().manual_seed(0)).image
    change = image[..., 0, 0] - 0.5  # per sample and channel: 0.5 * gain change + offset
    assert change.abs().max() <= 0.5 * 0.1 + 0.05 + 1e-6
    assert change.std() > 0.01 and image.min() >= 0 and image.max() <= 1
    torch.testing.assert_close(image, image[..., :1, :1].expand_as(image))  # a global change, not noise


@pytest.mark.parametrize(
    ("options", "message"),
    [({"regions": 1.5}, "temporal_regions"), ({"light": 1.0}, "temporal_light"), ({"local_px": -1}, "local_px")],
)
def test_bad_real_motion_settings_are_refused(options: dict, message: str) -> None:
    with pytest.raises(FaststyleError, match=message):
        TemporalTerm(weight=1.0, shift_px=1, rotation_deg=0, zoom=0, noise_std=0.0, **options)
