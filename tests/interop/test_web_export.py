"""The web export's folder (interop/web_export.py through scripts/export.py), without a browser: what it writes
for one-style, multi-style and pytorch/examples model files, the one-line refusals (runtime not installed, a
non-empty folder without --overwrite, a file in the folder's place) and --overwrite. A stand-in runtime folder
replaces web/node_modules, so these run without ``make web-deps``; tests/interop/test_web_page.py runs the page."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from interop import web_export
from interop.pytorch_examples import examples_config, to_examples_state_dict
from models.transformer import TransformerNet
from scripts.export import main as export_main
from tests.support import tiny_model_file

_missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(_missing), reason=f"ONNX export needs {', '.join(_missing)} (pip install)")


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in onnxruntime-web package: the files the export copies, with placeholder contents."""
    package = tmp_path / "node_modules" / "onnxruntime-web"
    (package / "dist").mkdir(parents=True)
    (package / "package.json").write_text(json.dumps({"name": "onnxruntime-web", "version": "9.9.9"}))
    for name in web_export.RUNTIME_FILES:
        (package / "dist" / name).write_text(f"// {name}\n")
    monkeypatch.setattr(web_export, "default_runtime_dir", lambda: package)
    return package


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one error line of a refused export (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        export_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


EXPECTED = {*web_export.PAGE_FILES, "model.onnx", "model.json", *(f"ort/{n}" for n in web_export.RUNTIME_FILES)}


@needs_onnx
def test_multi_style_folder_and_its_default_name(tmp_path, runtime, capsys):
    model = tiny_model_file(tmp_path / "styles.pth", num_styles=3, meta={"styles": ["wave", "night", "scream"]})
    assert export_main([str(model), "--format", "web"]) == 0
    out = tmp_path / "styles_web"
    assert _files(out) == EXPECTED
    assert "python -m http.server -d" in capsys.readouterr().out
    info = json.loads((out / "model.json").read_text())
    assert info["styles"] == ["wave", "night", "scream"] and info["style_input"] == "style_weights"
    assert info["runtime"] == {"package": "onnxruntime-web", "version": "9.9.9", "module": "ort/ort.webgpu.min.mjs"}
    assert info["model_bytes"] == (out / "model.onnx").stat().st_size and info["precision"] == "fp32"
    assert info["weights"] == "fp16"  # the default
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the build folder is gone


@needs_onnx
def test_pytorch_examples_file_and_overwrite_keeps_other_files(tmp_path, runtime, capsys):
    torch.manual_seed(0)
    model = tmp_path / "mosaic.pth"
    torch.save(to_examples_state_dict(TransformerNet(**examples_config(8, 1))), model)
    out = tmp_path / "page"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "not empty" in _refused([str(model), "--format", "web", "--out", str(out)], capsys)
    assert export_main([str(model), "--format", "web", "--out", str(out), "--overwrite"]) == 0
    assert _files(out) == EXPECTED | {"notes.txt"}
    info = json.loads((out / "model.json").read_text())
    assert info["styles"] == ["mosaic"] and info["style_input"] is None


def test_one_line_refusals(tmp_path, runtime, capsys, monkeypatch):
    model = tiny_model_file(tmp_path / "one.pth")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "index.html").write_text("someone's page")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        "exists and is not empty: pass --overwrite": ["--out", str(taken)],
        "is a file: the web export writes a folder": ["--out", str(a_file)],
        "leave out --height and --width": ["--height", "64", "--width", "64"],
    }
    for message, extra in cases.items():
        assert message in _refused([str(model), "--format", "web", *extra], capsys)
    assert (taken / "index.html").read_text() == "someone's page"
    monkeypatch.setattr(web_export, "default_runtime_dir", lambda: tmp_path / "nowhere")
    assert "run `make web-deps`" in _refused([str(model), "--format", "web"], capsys)
    assert not (tmp_path / "one_web").exists()


@needs_onnx
def test_fp16_weights_halve_the_file_and_compute_as_the_rounded_network(tmp_path: Path, runtime: Path) -> None:
    """--web-weights fp32 keeps the trained weights; store_weights_fp16 (the default's step) stores them in float16
    with a Cast back, half their bytes, and onnxruntime then computes what the network on float16-rounded
    weights computes (within --verify's 1e-4), which differs from the unrounded one."""
    import shutil

    import onnx

    from interop.read import read_torch_model_file
    from scripts.export import verify

    model = tiny_model_file(tmp_path / "m.pth", base_width=8, scale=0.3)
    out = tmp_path / "page"
    assert export_main([str(model), "--format", "web", "--out", str(out), "--web-weights", "fp32"]) == 0
    assert json.loads((out / "model.json").read_text())["weights"] == "fp32"
    half = tmp_path / "half.onnx"
    shutil.copyfile(out / "model.onnx", half)
    assert web_export.store_weights_fp16(half) > 0

    def kernels(path: Path) -> tuple[set[int], int]:
        """The convolution kernels' element types and stored bytes."""
        inits = [init for init in onnx.load(str(path)).graph.initializer if len(init.dims) == 4]
        return {init.data_type for init in inits}, sum(len(init.raw_data) for init in inits)

    (full_types, full_bytes), (half_types, half_bytes) = kernels(out / "model.onnx"), kernels(half)
    assert full_types == {onnx.TensorProto.FLOAT} and half_types == {onnx.TensorProto.FLOAT16}
    assert half_bytes * 2 == full_bytes > 0
    net, _ = read_torch_model_file(model)
    assert verify(web_export.fp16_weight_twin(net), half, "onnx", [(32, 40)]) <= 1e-4
    with pytest.raises(FaststyleError, match="differs from PyTorch"):
        verify(net, half, "onnx", [(32, 40)])
