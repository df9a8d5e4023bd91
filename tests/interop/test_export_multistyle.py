"""Export of multi-style networks (interop/exportable.py, interop/onnx_export.py, scripts/export.py) and running
them (interop/onnx_model.py).

A 3-style network with distinct (gamma, beta) rows per style is exported once per format (module-scoped fixtures:
exports take seconds) through ``scripts.export.main --verify``; the files must match ``net(x, weights)`` within 1e-4
for each style alone and for a mix, at an odd size too, whether the weights come normalised or not. ONNX tests skip
when onnx, onnxscript or onnxruntime are not installed (test-only dependencies).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import FaststyleError
from interop.exportable import ExportableStyleNet
from interop.onnx_export import ONNX_INPUT_NAME, ONNX_OUTPUT_NAME, ONNX_STYLE_INPUT_NAME
from models.modelfile import ONNX_METADATA_KEY, save_model
from models.norm import ConditionalInstanceNorm
from models.transformer import TransformerNet
from tests.support import tiny_net

STYLES = ["wave", "night", "scream"]
SIZES = [(40, 52), (33, 47)]  # a multiple of 4, and odd sides that need padding and cropping
BATCH = {SIZES[0]: 2, SIZES[1]: 3}  # the traces used batch 2: another batch size checks the batch axis is free
TOLERANCE = 1e-4
MIXES = [*torch.eye(len(STYLES)), torch.tensor([0.2, 0.5, 0.3])]
NORMS = 7  # 3 encoder + 2 per residual block (1 block) + 2 decoder norms

_missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(_missing), reason=f"ONNX export/run needs {', '.join(_missing)} (pip install)")


def _multi_net() -> TransformerNet:
    """A small 3-style network whose styles differ (fresh tables are all ones and zeros, which hides mistakes)."""
    return tiny_net(num_styles=len(STYLES), style_seed=1)


def _batch(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(BATCH[height, width], 3, height, width, generator=torch.Generator().manual_seed(seed))


def _expected(net: TransformerNet, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x, weights)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def net() -> TransformerNet:
    return _multi_net()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, net: TransformerNet) -> Path:
    path = tmp_path_factory.mktemp("export_multistyle") / "model.pth"
    save_model(path, net, {"styles": STYLES})
    return path


@pytest.fixture(scope="module")
def onnx_file(model_file: Path) -> Path:
    if _missing:
        pytest.skip(f"ONNX export/run needs {', '.join(_missing)} (pip install)")
    return _export(model_file, "onnx", ".onnx")


@pytest.fixture(scope="module")
def torchscript_file(model_file: Path) -> Path:
    return _export(model_file, "torchscript", ".ts")


def _export(model_file: Path, fmt: str, suffix: str) -> Path:
    """Export through the script with --verify (which compares every one-hot style and a mix with PyTorch and
    fails above 1e-4); its summary line is read from stdout (module fixtures cannot use capsys)."""
    import contextlib
    import io

    from scripts.export import main

    out = model_file.with_suffix(suffix)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([str(model_file), "--format", fmt, "--verify", "-o", str(out)])
    assert "max |diff| vs PyTorch" in printed.getvalue()
    assert f"second input {ONNX_STYLE_INPUT_NAME} (3,): wave, night, scream" in printed.getvalue()
    return out


def test_exportable_net_swaps_the_conditional_norms_inner_instance_norm(net: TransformerNet) -> None:
    module = ExportableStyleNet(net)
    inner = [m.norm for m in module.net.modules() if isinstance(m, ConditionalInstanceNorm)]
    assert module.swapped_norms == len(inner) == NORMS
    assert all(type(norm) is nn.InstanceNorm2d and not norm.affine for norm in inner)
    x = _batch(*SIZES[1])
    with torch.no_grad():
        for weights in MIXES:
            assert _max_diff(module(x, weights), _expected(net, x, weights)) < TOLERANCE
        with pytest.raises(ValueError, match="pass style_weights"):
            module(x)
    one_style = ExportableStyleNet(TransformerNet(base_width=8, residual_blocks=1).eval())
    with pytest.raises(ValueError, match="without style_weights"):
        one_style(x, MIXES[0])


@needs_onnx
@pytest.mark.slow
def test_onnx_graph_inputs_nodes_and_metadata(onnx_file: Path, net: TransformerNet) -> None:
    import onnx

    model = onnx.load(str(onnx_file))
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert list(inputs) == [ONNX_INPUT_NAME, ONNX_STYLE_INPUT_NAME]
    assert inputs[ONNX_STYLE_INPUT_NAME] == [len(STYLES)]
    assert [o.name for o in model.graph.output] == [ONNX_OUTPUT_NAME]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("InstanceNormalization") == NORMS  # the per-style scale and shift follow each one
    info = json.loads({p.key: p.value for p in model.metadata_props}[ONNX_METADATA_KEY])
    assert info["model_config"] == net.config() and info["model_config"]["num_styles"] == 3
    assert info["meta"]["styles"] == STYLES and info["styles"] == STYLES
    assert info["style_input"] == ONNX_STYLE_INPUT_NAME


@needs_onnx
@pytest.mark.slow
def test_onnx_matches_pytorch_for_each_style_and_a_mix_normalised_or_not(onnx_file: Path, net: TransformerNet) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for height, width in SIZES:
        x = _batch(height, width)
        for weights in MIXES:
            expected = _expected(net, x, weights)
            for scale in (1.0, 7.5):  # raw slider values: the graph normalises them
                feed = {ONNX_INPUT_NAME: x.numpy(), ONNX_STYLE_INPUT_NAME: (weights * scale).numpy()}
                (out,) = session.run([ONNX_OUTPUT_NAME], feed)
                assert out.shape == x.shape
                assert _max_diff(torch.from_numpy(out), expected) < TOLERANCE, (height, width, weights, scale)
    # The styles really differ, so a graph ignoring style_weights could not pass the loop above.
    x = _batch(*SIZES[0])
    assert _max_diff(_expected(net, x, MIXES[0]), _expected(net, x, MIXES[1])) > 100 * TOLERANCE


def test_torchscript_matches_pytorch_for_each_style_and_a_mix_normalised_or_not(
    torchscript_file: Path, net: TransformerNet
) -> None:
    extra = {"faststyle.json": ""}
    loaded = torch.jit.load(str(torchscript_file), _extra_files=extra)
    info = json.loads(extra["faststyle.json"])
    assert info["model_config"]["num_styles"] == 3 and info["styles"] == STYLES
    with torch.no_grad():
        for height, width in SIZES:
            x = _batch(height, width, seed=1)
            for weights in MIXES:
                expected = _expected(net, x, weights)
                assert _max_diff(loaded(x, weights), expected) < TOLERANCE, (height, width, weights)
                assert _max_diff(loaded(x, weights * 7.5), expected) < TOLERANCE, (height, width, weights)


@needs_onnx
@pytest.mark.slow
def test_onnx_style_model_for_style_round_trip(onnx_file: Path, net: TransformerNet) -> None:
    from interop.onnx_model import OnnxStyleModel

    model = OnnxStyleModel(onnx_file)
    assert model.num_styles == 3 and model.style_names == STYLES and model.meta["styles"] == STYLES
    assert model.config() == net.config() and model.style_weights is None
    x = _batch(*SIZES[1], seed=2)
    for weights in [*MIXES, [0.0, 2.0, 6.0]]:  # a plain list of raw weights too
        chosen = model.for_style(weights)
        assert chosen.eval() is chosen and chosen.to("cpu") is chosen and not isinstance(chosen, nn.Module)
        assert chosen.num_styles == 1 and "num_styles" not in chosen.config()
        assert chosen.session is model.session  # shares the session: choosing a style builds nothing
        total = float(torch.as_tensor(weights).sum())
        assert chosen.style_weights == pytest.approx([float(w) / total for w in weights])
        expected = _expected(net, x, torch.as_tensor(weights, dtype=torch.float32))
        assert _max_diff(chosen(x), expected) < TOLERANCE
        assert chosen.for_style(MIXES[0]).style_weights == chosen.style_weights  # already chosen: kept
    assert model.num_styles == 3 and model.style_weights is None  # the original is unchanged


@needs_onnx
@pytest.mark.slow
def test_onnx_multistyle_model_without_a_style_or_with_bad_weights(onnx_file: Path) -> None:
    from interop.onnx_model import OnnxStyleModel

    model = OnnxStyleModel(onnx_file)
    with pytest.raises(FaststyleError) as err:
        model(_batch(*SIZES[0]))
    message = str(err.value)
    assert "\n" not in message and "holds 3 styles (wave, night, scream): pick one" in message
    with pytest.raises(FaststyleError, match="holds 3 styles .*: got 2 style weights"):
        model.for_style([0.5, 0.5])
    for bad in ([0.0, 0.0, 0.0], [1.0, -0.5, 0.5], [float("nan"), 1.0, 1.0]):
        with pytest.raises(FaststyleError, match="finite, >= 0 and not all 0"):
            model.for_style(bad)


def _two_input_onnx(path: Path, style_shape: list[int], metadata: dict | None) -> Path:
    """A tiny graph with an image input and a second input (image -> Identity): enough for the input checks."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"])
    style = helper.make_tensor_value_info(ONNX_STYLE_INPUT_NAME, TensorProto.FLOAT, style_shape)
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, "H", "W"])
    graph = helper.make_graph([helper.make_node("Identity", ["img"], ["out"])], "two_inputs", [image, style], [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if metadata is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
    onnx.save_model(model, str(path))
    return path


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="needs onnx and onnxruntime",
)
def test_two_input_onnx_files_are_refused_unless_faststyle_multistyle(tmp_path: Path) -> None:
    from interop.onnx_model import OnnxStyleModel

    foreign = _two_input_onnx(tmp_path / "foreign.onnx", [3], None)
    with pytest.raises(FaststyleError, match="is not a style network: expected one"):
        OnnxStyleModel(foreign)
    info = {"format": "faststyle-onnx", "model_config": {"num_styles": 3}, "meta": {}, "min_side": 8}
    wrong_length = _two_input_onnx(tmp_path / "wrong.onnx", [4], info)
    with pytest.raises(FaststyleError, match=r"declares 3 styles but has no \(3,\) input 'style_weights'"):
        OnnxStyleModel(wrong_length)
    one_style = _two_input_onnx(tmp_path / "one.onnx", [3], {**info, "model_config": {}})
    with pytest.raises(FaststyleError, match="is not a style network"):
        OnnxStyleModel(one_style)
    fine = OnnxStyleModel(_two_input_onnx(tmp_path / "fine.onnx", [3], info))
    assert fine.num_styles == 3 and fine.style_names == ["style_0", "style_1", "style_2"]
    x = torch.rand(1, 3, 12, 16)
    assert torch.equal(fine.for_style([1, 0, 0])(x), x)  # the image input found by name, the weights fed
    np.testing.assert_allclose(fine.for_style([1, 1, 2]).style_weights, [0.25, 0.25, 0.5])


@needs_onnx
def test_stylize_runs_a_multi_style_onnx_file_like_its_pth(onnx_file: Path, model_file: Path, tmp_path: Path) -> None:
    """stylize.py with an exported multi-style .onnx: every style (named from the file's metadata) and a mix, the
    same images as the .pth gives in fp32 (8-bit rounding apart)."""
    from PIL import Image

    from data.io import load_image, pil_to_tensor
    from inference.pipeline import stylize
    from stylize import compose_config

    photo = tmp_path / "photo.png"
    pixels = (torch.rand(37, 45, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(photo)
    for model, out in ((onnx_file, tmp_path / "onnx"), (model_file, tmp_path / "pth")):
        for style in ("null", "'night:1,scream:3'"):
            overrides = [f"model={model}", f"input={photo}", f"output={out}", f"style={style}", "precision=fp32"]
            stylize(compose_config(overrides))
    names = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "pth").iterdir())
    assert names == sorted([*(f"photo_{s}.png" for s in STYLES), "photo_night-25_scream-75.png"])
    for name in names:
        a, b = (pil_to_tensor(load_image(tmp_path / kind / name)) for kind in ("onnx", "pth"))
        assert (a - b).abs().max() <= 1 / 255 + 1e-6, name
