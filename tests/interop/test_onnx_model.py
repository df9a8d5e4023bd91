"""ONNX files not written by faststyle (no metadata) through interop/onnx_model.py.

The files are built here at test time in the pytorch/examples ``fast_neural_style`` layout (their key names,
reflection padding, affine instance norm, nearest x2 before deconv1/2, RGB 0-255 in and out, no output activation),
written from those published format facts. The architecture is stated once (``_forward``) and run by two backends:
PyTorch ops (the reference) and ONNX nodes built with ``onnx.helper`` (the file under test), so a file matches its
reference by construction and every difference measured below comes from the runner's scaling, resizing and padding.
Skipped without onnx or onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import FaststyleError
from interop.pytorch_examples import examples_config, from_examples_state_dict, to_examples_state_dict
from models.norm import InstanceNorm
from models.transformer import TransformerNet
from tests.support import REPO

_missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason=f"running ONNX files needs {', '.join(_missing)} (pip install)"),
    pytest.mark.usefixtures("one_thread"),
]

WIDTH, BLOCKS = 8, 1
FIXED_HW = (48, 64)  # multiples of 4: their network keeps the size there
TOLERANCE = 1e-3  # on [0, 1] outputs; measured differences are ~1e-6 (float32 rounding of 0-255 arithmetic)
OPSET = 17
LOG = "interop.onnx_model"


class _TorchOps:
    """The reference backend: PyTorch functional ops on a state dict in their layout."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state

    def conv(self, name: str, y: Tensor, stride: int = 1, upsample: bool = False) -> Tensor:
        weight, bias = self.state[f"{name}.conv2d.weight"], self.state[f"{name}.conv2d.bias"]
        if upsample:
            y = F.interpolate(y, scale_factor=2, mode="nearest")
        pad = weight.shape[-1] // 2
        return F.conv2d(F.pad(y, (pad,) * 4, mode="reflect"), weight, bias, stride)

    def norm(self, name: str, y: Tensor) -> Tensor:
        return F.instance_norm(y, weight=self.state[f"{name}.weight"], bias=self.state[f"{name}.bias"], eps=1e-5)

    def relu(self, y: Tensor) -> Tensor:
        return F.relu(y)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class _OnnxOps:
    """The file backend: the same ops as ONNX nodes (Pad reflect, Conv, InstanceNormalization, Resize nearest)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        from onnx import numpy_helper

        self.state, self.nodes, self.initializers, self.count = state, [], [], 0
        self._array = numpy_helper.from_array
        self.scales = self._constant("scales_x2", np.array([1, 1, 2, 2], dtype=np.float32))

    def _constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self._array(array, name))
        return name

    def _weight(self, key: str) -> str:
        return self._constant(key, self.state[key].detach().numpy().astype(np.float32))

    def _node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        self.count += 1
        out = f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(self, name: str, y: str, stride: int = 1, upsample: bool = False) -> str:
        if upsample:  # asymmetric + floor is torch's "nearest"
            resize = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
            y = self._node("Resize", [y, "", self.scales], **resize)
        kernel = int(self.state[f"{name}.conv2d.weight"].shape[-1])
        pads = self._constant(f"{name}.pads", np.array([0, 0, kernel // 2, kernel // 2] * 2, dtype=np.int64))
        y = self._node("Pad", [y, pads], mode="reflect")
        weight, bias = self._weight(f"{name}.conv2d.weight"), self._weight(f"{name}.conv2d.bias")
        return self._node("Conv", [y, weight, bias], kernel_shape=[kernel, kernel], strides=[stride, stride])

    def norm(self, name: str, y: str) -> str:
        scale, bias = self._weight(f"{name}.weight"), self._weight(f"{name}.bias")
        return self._node("InstanceNormalization", [y, scale, bias], epsilon=1e-5)

    def relu(self, y: str) -> str:
        return self._node("Relu", [y])

    def add(self, a: str, b: str) -> str:
        return self._node("Add", [a, b])


def _forward(ops: _TorchOps | _OnnxOps, x: Tensor | str, blocks: int = BLOCKS) -> Tensor | str:
    """pytorch/examples' TransformerNet forward, on either backend."""
    y = ops.relu(ops.norm("in1", ops.conv("conv1", x)))
    y = ops.relu(ops.norm("in2", ops.conv("conv2", y, stride=2)))
    y = ops.relu(ops.norm("in3", ops.conv("conv3", y, stride=2)))
    for k in range(1, blocks + 1):
        r = ops.relu(ops.norm(f"res{k}.in1", ops.conv(f"res{k}.conv1", y)))
        y = ops.add(y, ops.norm(f"res{k}.in2", ops.conv(f"res{k}.conv2", r)))
    y = ops.relu(ops.norm("in4", ops.conv("deconv1", y, upsample=True)))
    y = ops.relu(ops.norm("in5", ops.conv("deconv2", y, upsample=True)))
    return ops.conv("deconv3", y)


def reference(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """The network in PyTorch, in the state's own pixel scale."""
    with torch.no_grad():
        return _forward(_TorchOps(state), x)


def write_onnx(path: Path, state: dict[str, Tensor] | None, shape: list, metadata: dict | None = None) -> Path:
    """Write the network (or, with state None, an Identity graph) with input shape ``shape`` (ints fixed, strings
    dynamic), no faststyle metadata unless given, as exporters outside faststyle write them."""
    import onnx
    from onnx import TensorProto, helper

    if state is None:
        nodes, initializers = [helper.make_node("Identity", ["input"], ["output"])], []
    else:
        ops = _OnnxOps(state)
        last = _forward(ops, "input")
        ops.nodes.append(helper.make_node("Identity", [last], ["output"]))
        nodes, initializers = ops.nodes, ops.initializers
    graph = helper.make_graph(
        nodes,
        "fast_neural_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, "out_height", "out_width"])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pytorch")
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    if metadata is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "faststyle", json.dumps(metadata)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def _photo(name: str, height: int, width: int) -> Tensor:
    from data.io import load_image, pil_to_tensor, resize_to

    return pil_to_tensor(resize_to(load_image(REPO / "data" / "samples" / "content" / name), width, height))


def _unit_range(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same network taking and giving [0, 1]: the 255 folded into the first and last conv."""
    state = dict(state)
    state["conv1.conv2d.weight"] = state["conv1.conv2d.weight"] * 255.0
    state["deconv3.conv2d.weight"] = state["deconv3.conv2d.weight"] / 255.0
    state["deconv3.conv2d.bias"] = state["deconv3.conv2d.bias"] / 255.0
    return state


@pytest.fixture(scope="module")
def state() -> dict[str, Tensor]:
    """Random, deterministic weights in their layout and 0-255 scale, with the last conv calibrated so a photo
    comes out like a trained network's (mean 128, spread 60 of 255) rather than a random one's."""
    torch.manual_seed(0)
    net = TransformerNet(**examples_config(WIDTH, BLOCKS))
    with torch.no_grad():  # non-trivial affine norms, so a dropped weight/bias would show
        for module in net.modules():
            if isinstance(module, InstanceNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    theirs = to_examples_state_dict(net.eval())
    y = reference(theirs, _photo("chelsea.jpg", 84, 128)[None] * 255.0)
    bias = theirs["deconv3.conv2d.bias"]
    gain = 60.0 / float(y.std())
    theirs["deconv3.conv2d.weight"] = theirs["deconv3.conv2d.weight"] * gain
    theirs["deconv3.conv2d.bias"] = 128.0 - gain * (y.mean(dim=(0, 2, 3)) - bias)
    return theirs


@pytest.fixture(scope="module")
def files(tmp_path_factory, state: dict[str, Tensor]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    negated = {k: (-v if k.startswith("deconv3.") else v) for k, v in state.items()}
    return {
        "fixed": write_onnx(root / "fixed.onnx", state, [1, 3, *FIXED_HW]),
        "dynamic": write_onnx(root / "dynamic.onnx", state, ["batch", 3, "height", "width"]),
        "unit": write_onnx(root / "unit.onnx", _unit_range(state), ["batch", 3, "height", "width"]),
        "negated": write_onnx(root / "negated.onnx", negated, ["batch", 3, "height", "width"]),
        "identity": write_onnx(root / "identity.onnx", None, ["batch", 3, "height", "width"]),
    }


def _batch(height: int, width: int) -> Tensor:
    return torch.stack([_photo("coffee.jpg", height, width), _photo("astronaut.jpg", height, width)])


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def test_fixed_size_0_255_file_is_detected_and_matches_pytorch(files, state) -> None:
    from interop.onnx_model import read_onnx_file

    model, meta = read_onnx_file(files["fixed"])
    assert meta == {} and model.foreign
    assert model.pixel_range == "0-255"
    fits = model.pixel_range_fits
    assert fits["0-255"].plausible and not fits["0-1"].plausible
    assert fits["0-255"].in_band > 0.99 and fits["0-1"].in_band < 0.05
    x = _batch(*FIXED_HW)  # batch 2 through a fixed batch of 1: image by image
    out = model(x)
    expected = (reference(state, x * 255.0) / 255.0).clamp(0, 1)
    assert out.shape == x.shape
    assert _max_diff(out, expected) < TOLERANCE
    # the same network imported by interop/pytorch_examples.py (a third implementation, weights folded to 0-1)
    with torch.no_grad():
        assert _max_diff(out, from_examples_state_dict(state)(x)) < TOLERANCE
    assert 0.2 < float(out.mean()) < 0.8 and float(out.std()) > 0.1  # a picture, not the old near-white one


def test_fixed_size_resizes_with_one_warning(files, state, caplog) -> None:
    from interop.onnx_model import OnnxStyleModel

    model = OnnxStyleModel(files["fixed"])
    x = _batch(40, 52)
    with caplog.at_level(logging.WARNING, logger=LOG):
        out = model(x)
        again = model(x)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "accepts only 48x64 (HxW) inputs" in warnings[0]
    assert out.shape == (2, 3, 40, 52) and torch.equal(out, again)
    resized = F.interpolate(x, size=FIXED_HW, mode="bilinear", align_corners=False, antialias=True)
    y = reference(state, resized * 255.0) / 255.0
    expected = F.interpolate(y, size=(40, 52), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    assert _max_diff(out, expected) < TOLERANCE


def test_fixed_size_off_multiple_of_4_output_is_cropped(tmp_path, state, caplog) -> None:
    from interop.onnx_model import OnnxStyleModel

    model = OnnxStyleModel(write_onnx(tmp_path / "odd.onnx", state, [1, 3, 46, 62]), pixel_range="0-255")
    x = _batch(46, 62)
    with caplog.at_level(logging.INFO, logger=LOG):
        out = model(x)  # the graph itself returns 48x64
    assert "returns 48x64 for 46x62 inputs: the extra bottom/right pixels are cropped" in caplog.text
    expected = (reference(state, x * 255.0)[:, :, :46, :62] / 255.0).clamp(0, 1)
    assert out.shape == x.shape and _max_diff(out, expected) < TOLERANCE


def test_dynamic_axes_file_pads_to_a_multiple_of_4_like_transformer_net(files, state, caplog) -> None:
    from interop.onnx_model import OnnxStyleModel

    with caplog.at_level(logging.WARNING, logger=LOG):
        model = OnnxStyleModel(files["dynamic"])
        x = _batch(33, 47)  # odd: their network alone would return 36x48
        out = model(x)
    assert not caplog.records  # nothing resized
    assert model.pixel_range == "0-255" and model.size_multiple == 4
    padded = F.pad(x, (0, 1, 0, 3), mode="reflect")
    expected = (reference(state, padded * 255.0)[:, :, :33, :47] / 255.0).clamp(0, 1)
    assert out.shape == x.shape and _max_diff(out, expected) < TOLERANCE
    with torch.no_grad():
        assert _max_diff(out, from_examples_state_dict(state)(x)) < TOLERANCE


def test_0_1_foreign_file_is_detected(files, state) -> None:
    from interop.onnx_model import OnnxStyleModel

    model = OnnxStyleModel(files["unit"])
    assert model.pixel_range == "0-1"
    assert model.pixel_range_fits["0-1"].plausible and model.pixel_range_fits["0-255"].std < 0.01
    x = _batch(*FIXED_HW)
    expected = reference(_unit_range(state), x).clamp(0, 1)
    assert _max_diff(model(x), expected) < TOLERANCE


def test_explicit_pixel_range_overrides_detection(files, state) -> None:
    from interop.onnx_model import OnnxStyleModel, read_onnx_file

    x = _batch(*FIXED_HW)
    model, _ = read_onnx_file(files["fixed"], pixel_range=255)  # what YAML makes of onnx_pixel_range=255
    assert model.pixel_range == "0-255" and model.pixel_range_fits == {}  # given: no probe run
    assert _max_diff(model(x), (reference(state, x * 255.0) / 255.0).clamp(0, 1)) < TOLERANCE
    wrong = OnnxStyleModel(files["fixed"], pixel_range="0-1")  # honoured even when wrong: the old near-white image
    assert float((wrong(x) == 1.0).float().mean()) > 0.9
    with pytest.raises(FaststyleError) as info:
        OnnxStyleModel(files["fixed"], pixel_range="0-100")
    assert str(info.value) == "onnx_pixel_range='0-100' is not one of auto, 0-1, 0-255"


@pytest.mark.parametrize(("name", "verdict"), [("negated", "neither"), ("identity", "both")])
def test_undecidable_pixel_range_is_a_one_line_error(files, name: str, verdict: str) -> None:
    from interop.onnx_model import OnnxStyleModel

    with pytest.raises(FaststyleError) as info:
        OnnxStyleModel(files[name])
    message = str(info.value)
    assert "\n" not in message and f"{verdict} scaling" in message
    assert message.endswith(
        "pass onnx_pixel_range=0-255 (pytorch/examples and ONNX model zoo exports) or onnx_pixel_range=0-1"
    )
    assert OnnxStyleModel(files[name], pixel_range="0-1").pixel_range == "0-1"  # the override always loads


def test_missing_probe_photo_asks_for_the_range(files, monkeypatch) -> None:
    import interop.onnx_model as runner

    monkeypatch.setattr(runner, "PROBE_PHOTO", REPO / "no_such_photo.jpg")
    with pytest.raises(FaststyleError, match=r"test photo .* is missing; pass onnx_pixel_range=0-255"):
        runner.OnnxStyleModel(files["dynamic"])


def test_fixed_batch_above_1_and_size_changing_graphs_are_refused(tmp_path, state) -> None:
    from onnx import TensorProto, helper

    from interop.onnx_model import OnnxStyleModel

    with pytest.raises(FaststyleError, match="accepts only batches of exactly 2: re-export"):
        OnnxStyleModel(write_onnx(tmp_path / "batch2.onnx", state, [2, 3, *FIXED_HW]))
    # an upscaler: returns 2H x 2W at every padding
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    graph = helper.make_graph(
        [helper.make_node("Resize", ["input", "", "scales"], ["output"], mode="nearest")],
        "upscale",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3, "out_height", "out_width"])],
        initializer=[scales],
    )
    path = tmp_path / "upscale.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]).SerializeToString())
    with pytest.raises(FaststyleError, match=r"does not return an image of its input's size \(45x61 -> "):
        OnnxStyleModel(path)


def test_faststyle_metadata_files_run_as_before(tmp_path, state) -> None:
    """A file with faststyle metadata: no probe, no clamp, no resize (fixed size still refused), 0-255 refused."""
    import onnxruntime as ort

    from interop.onnx_model import OnnxStyleModel

    info = {"format": "faststyle-onnx", "model_config": {"base_width": WIDTH}, "meta": {"style": "unit"}, "min_side": 8}
    path = write_onnx(tmp_path / "ours.onnx", _unit_range(state), ["batch", 3, *FIXED_HW], metadata=info)
    model = OnnxStyleModel(path)
    assert not model.foreign and model.pixel_range == "0-1" and model.pixel_range_fits == {}
    assert model.meta == {"style": "unit"} and model.config() == {"base_width": WIDTH}
    x = _batch(*FIXED_HW)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (raw,) = session.run(None, {"input": x.numpy()})
    out = model(x)
    assert torch.equal(out, torch.from_numpy(raw))  # exactly the graph's output ...
    assert float(out.max()) > 1.0 or float(out.min()) < 0.0  # ... unclamped, as before
    with pytest.raises(FaststyleError, match="fixed size 48x64"):
        model(_batch(40, 52))
    assert OnnxStyleModel(path, pixel_range="auto").pixel_range == "0-1"
    with pytest.raises(FaststyleError, match="exported by faststyle and takes 0-1 pixels: drop onnx_pixel_range"):
        OnnxStyleModel(path, pixel_range="0-255")
