"""ONNX and TorchScript export (interop/onnx_export.py, interop/torchscript_export.py, scripts/export.py) and running
the export (interop/onnx_model.py).

Exported graphs must match PyTorch within 1e-4 at several sizes, odd ones included. ONNX tests skip when onnx,
onnxscript or onnxruntime are not installed (they are test-only dependencies).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import FaststyleError
from data.io import save_image
from interop.read import read_torch_model_file
from models.modelfile import save_model
from models.norm import InstanceNorm
from models.transformer import TransformerNet
from tests.support import tiny_net

SIZES = [(8, 8), (33, 47), (64, 31), (40, 52)]
TOLERANCE = 1e-4

_missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(_missing), reason=f"ONNX export/run needs {', '.join(_missing)} (pip install)")


def _net(output: str = "sigmoid") -> TransformerNet:
    net = tiny_net(output=output)
    with torch.no_grad():  # non-trivial affine norms, so a dropped weight/bias would show
        for module in net.modules():
            if isinstance(module, InstanceNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return net


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"scripts.{Path(script).stem}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _max_diff(model, net: TransformerNet, sizes) -> float:
    worst = 0.0
    for h, w in sizes:
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            worst = max(worst, float((model(x) - net(x)).abs().max()))
    return worst


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.pth"
    save_model(path, _net(), {"style": "unit"})
    return path


@pytest.fixture(scope="module")
def dynamic_onnx(model_file: Path) -> Path:
    """model_file exported by scripts/export.py with dynamic N/H/W (one export, shared: exporting takes seconds)."""
    out = model_file.with_name("dyn.onnx")
    result = _run("export.py", str(model_file), "--format", "onnx", "--dynamic", "-o", str(out), cwd=model_file.parent)
    assert result.returncode == 0, result.stderr
    return out


@needs_onnx
@pytest.mark.slow
def test_dynamic_onnx_export_matches_pytorch(model_file: Path, dynamic_onnx: Path) -> None:
    import onnx

    from interop.onnx_model import OnnxStyleModel

    graph = onnx.load(str(dynamic_onnx)).graph
    ops = [node.op_type for node in graph.node]
    net, _ = read_torch_model_file(model_file)
    norms = sum(isinstance(m, InstanceNorm) for m in net.modules())
    assert ops.count("InstanceNormalization") == norms == 7
    runner = OnnxStyleModel(dynamic_onnx)
    assert runner.config() == net.config() and runner.meta == {"style": "unit"}
    assert _max_diff(runner, net, SIZES) < TOLERANCE
    with pytest.raises(FaststyleError, match="at least 8x8"):
        runner(torch.rand(1, 3, 5, 30))


@needs_onnx
@pytest.mark.slow
def test_stylize_runs_onnx_models_untiled_only(model_file: Path, dynamic_onnx: Path, tmp_path: Path) -> None:
    from inference.pipeline import stylize
    from stylize import compose_config

    gradient = torch.linspace(0, 1, 45 * 61).reshape(1, 45, 61).expand(3, -1, -1).clone()
    gradient[1] = gradient[1].flip(-1)
    save_image(gradient, tmp_path / "photo.png")
    for model in (model_file, dynamic_onnx):
        summary = stylize(
            compose_config(
                [
                    f"model={model}",
                    f"input={tmp_path / 'photo.png'}",
                    f"output={tmp_path / (model.suffix[1:] + '.png')}",
                    "precision=fp32",  # onnxruntime computes in fp32: compare like with like on every CPU
                ]
            )
        )
        assert len(summary.written) == 1
    via_onnx = np.asarray(Image.open(tmp_path / "onnx.png"), dtype=np.int16)
    via_torch = np.asarray(Image.open(tmp_path / "pth.png"), dtype=np.int16)
    assert via_onnx.shape == (45, 61, 3) and via_torch.std() > 5
    assert np.abs(via_onnx - via_torch).max() <= 1  # 8-bit rounding of values within 1e-4
    with pytest.raises(FaststyleError, match="cannot be tiled"):
        stylize(
            compose_config(
                [
                    f"model={dynamic_onnx}",
                    f"input={tmp_path / 'photo.png'}",
                    f"output={tmp_path / 'tiled.png'}",
                    "max_memory_mb=0.01",
                ]
            )
        )


@needs_onnx
@pytest.mark.slow
def test_fixed_size_onnx_export_and_its_size_check(tmp_path: Path) -> None:
    from interop.onnx_export import export_onnx
    from interop.onnx_model import OnnxStyleModel

    net = _net(output="linear")
    path = export_onnx(net, tmp_path / "fixed.onnx", height=36, width=20)
    runner = OnnxStyleModel(path)
    assert _max_diff(runner, net, [(36, 20)]) < TOLERANCE
    with pytest.raises(FaststyleError, match="fixed size 36x20"):
        runner(torch.rand(1, 3, 20, 36))


def test_torchscript_export_matches_pytorch_at_odd_sizes(tmp_path: Path) -> None:
    from interop.torchscript_export import export_torchscript

    net = _net()
    path = export_torchscript(net, tmp_path / "model.ts", meta={"style": "unit"})
    extra = {"faststyle.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["faststyle.json"])["model_config"] == net.config()
    assert _max_diff(loaded, net, SIZES) < TOLERANCE


def test_export_rejects_half_a_size(model_file: Path) -> None:
    result = _run("export.py", str(model_file), "--format", "torchscript", "--height", "64", cwd=model_file.parent)
    assert result.returncode == 2 and result.stderr.startswith("error: give both --height and --width")


def test_export_refuses_an_existing_output_without_overwrite(model_file: Path, tmp_path: Path, capsys) -> None:
    """The tools' overwrite rule (core.cli.check_output_file), checked before the model is read; the model file is
    never an output, even with --overwrite."""
    from scripts.export import main

    existing = tmp_path / "earlier.onnx"
    existing.write_bytes(b"an earlier export")
    for target, extra, message in (
        (existing, [], "exists: pass --overwrite or choose another -o"),
        (model_file, ["--overwrite"], "is the model"),
    ):
        with pytest.raises(SystemExit) as stop:
            main([str(model_file), "--format", "onnx", "-o", str(target), *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and message in err, err
    assert existing.read_bytes() == b"an earlier export"
