"""Import of pytorch/examples fast_neural_style networks (interop/pytorch_examples.py).

``ReferenceNet`` below is an independent re-statement of their network from the published format facts (key names,
reflection padding, nearest x2 before deconv1/2, affine instance norm, 0-255 in and out, no output activation),
written here from those facts so the import is checked against a second implementation and not only against its
own inverse.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import FaststyleError
from interop.pytorch_examples import (
    examples_config,
    examples_shape,
    from_examples_state_dict,
    is_examples_state_dict,
    read_examples_file,
    to_examples_state_dict,
)
from models.transformer import TransformerNet


class _Conv(nn.Module):
    """Their conv layer: reflection pad k//2, Conv2d in attribute ``conv2d``; optional nearest x2 first."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.upsample = upsample
        self.pad = k // 2
        self.conv2d = nn.Conv2d(cin, cout, k, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv2d(F.pad(x, (self.pad,) * 4, mode="reflect"))


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.in1 = _Conv(c, c, 3), nn.InstanceNorm2d(c, affine=True)
        self.conv2, self.in2 = _Conv(c, c, 3), nn.InstanceNorm2d(c, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.in2(self.conv2(F.relu(self.in1(self.conv1(x)))))


class ReferenceNet(nn.Module):
    """pytorch/examples' TransformerNet layout: (N, 3, H, W) RGB 0-255 -> (N, 3, H, W) unbounded ~0-255."""

    def __init__(self, w: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.conv1, self.in1 = _Conv(3, w, 9), nn.InstanceNorm2d(w, affine=True)
        self.conv2, self.in2 = _Conv(w, 2 * w, 3, 2), nn.InstanceNorm2d(2 * w, affine=True)
        self.conv3, self.in3 = _Conv(2 * w, 4 * w, 3, 2), nn.InstanceNorm2d(4 * w, affine=True)
        for k in range(1, blocks + 1):
            setattr(self, f"res{k}", _Res(4 * w))
        self.blocks = blocks
        self.deconv1, self.in4 = _Conv(4 * w, 2 * w, 3, upsample=True), nn.InstanceNorm2d(2 * w, affine=True)
        self.deconv2, self.in5 = _Conv(2 * w, w, 3, upsample=True), nn.InstanceNorm2d(w, affine=True)
        self.deconv3 = _Conv(w, 3, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.in1(self.conv1(x)))
        y = F.relu(self.in2(self.conv2(y)))
        y = F.relu(self.in3(self.conv3(y)))
        for k in range(1, self.blocks + 1):
            y = getattr(self, f"res{k}")(y)
        y = F.relu(self.in4(self.deconv1(y)))
        y = F.relu(self.in5(self.deconv2(y)))
        return self.deconv3(y)


def _randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm a non-trivial affine (defaults 1/0 would hide a swapped weight/bias) and centre the output
    around mid-range so comparisons are not dominated by clamping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1 and "conv" not in name:
                p.copy_(
                    torch.rand(p.shape, generator=g) + 0.5
                    if name.endswith("weight")
                    else torch.randn(p.shape, generator=g) * 0.3
                )
    return net


@pytest.fixture
def reference() -> ReferenceNet:
    torch.manual_seed(0)
    net = _randomised(ReferenceNet(w=8, blocks=2))
    with torch.no_grad():
        net.deconv3.conv2d.weight.mul_(40.0)  # output spread over ~0-255 like a trained net
        net.deconv3.conv2d.bias.fill_(127.0)
    return net.eval()


def test_imported_network_matches_reference_implementation(reference: ReferenceNet) -> None:
    state = reference.state_dict()
    assert is_examples_state_dict(state)
    net = from_examples_state_dict(state)
    assert net.config() == examples_config(8, 2)
    x = torch.rand(2, 3, 32, 44, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(x * 255.0)
        assert theirs.std() > 10  # the comparison is not trivially of constants
        net.train()  # our "linear" output is unclamped in train mode: compare the raw values
        raw = net(x) * 255.0
        net.eval()
        clamped = net(x)
    torch.testing.assert_close(raw, theirs, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(clamped, (theirs / 255.0).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_round_trip_from_our_weights_gives_our_output(tmp_path) -> None:
    torch.manual_seed(3)
    ours = _randomised(TransformerNet(**examples_config(16, 3)), seed=3).eval()
    path = tmp_path / "mosaic.pth"
    torch.save(to_examples_state_dict(ours), path)
    imported, meta = read_examples_file(path)
    assert imported.config() == ours.config()
    assert meta["source"] == "pytorch/examples" and meta["source_file"] == "mosaic.pth"
    assert len(meta["source_sha256"]) == 64
    x = torch.rand(1, 3, 29, 37)  # odd size: our pad/crop path applies to both alike
    with torch.no_grad():
        torch.testing.assert_close(imported(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("width", "blocks"), [(32, 5), (16, 5), (8, 5), (8, 3), (16, 0)])
def test_width_and_block_count_are_inferred(width: int, blocks: int) -> None:
    state = ReferenceNet(w=width, blocks=blocks).state_dict()
    assert examples_shape(state) == (width, blocks)
    assert from_examples_state_dict(state).config() == examples_config(width, blocks)


def test_old_running_stat_buffers_are_dropped(reference: ReferenceNet) -> None:
    state = dict(reference.state_dict())
    for name in ("in1", "in4", "res1.in2"):
        state[f"{name}.running_mean"] = torch.zeros(1)  # old files: any shape, never used
        state[f"{name}.running_var"] = torch.ones(1)
    net = from_examples_state_dict(state)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), from_examples_state_dict(reference.state_dict())(x))


def test_missing_extra_and_misshaped_keys_are_named(reference: ReferenceNet) -> None:
    state = dict(reference.state_dict())
    del state["res2.in1.bias"]
    state["res1.extra.weight"] = torch.zeros(3)
    state["in4.weight"] = torch.zeros(7)
    with pytest.raises(FaststyleError) as info:
        from_examples_state_dict(state)
    message = str(info.value)
    assert "\n" not in message
    assert "missing keys: res2.in1.bias" in message
    assert "unexpected keys: res1.extra.weight" in message
    assert "in4.weight (7,) (expected (16,))" in message


def test_gap_in_residual_numbering_is_refused(reference: ReferenceNet) -> None:
    state = {k.replace("res2.", "res3."): v for k, v in reference.state_dict().items()}
    with pytest.raises(FaststyleError, match=r"numbered \[1, 3\]"):
        from_examples_state_dict(state)


def test_detector_rejects_other_objects() -> None:
    assert not is_examples_state_dict({"format": "faststyle-model", "state_dict": {}})
    assert not is_examples_state_dict(TransformerNet(base_width=8, residual_blocks=1).state_dict())
    assert not is_examples_state_dict({"conv1.conv2d.weight": 1, "deconv3.conv2d.weight": 2})
    assert not is_examples_state_dict([])


def test_only_representable_networks_export_to_their_layout() -> None:
    with pytest.raises(FaststyleError, match="output=sigmoid"):
        to_examples_state_dict(TransformerNet(base_width=8, residual_blocks=1))
