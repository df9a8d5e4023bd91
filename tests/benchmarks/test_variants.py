"""The benchmarks' variant parsing and reference networks (benchmarks/stylize.py, benchmarks/train.py,
benchmarks/common.py) and their one command (python -m benchmarks NAME): the parts whose mistakes would not show in
the printed figures, only in what they mean. Speed itself is never asserted."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import common
from benchmarks import stylize as bench_stylize
from benchmarks import train as bench_train
from core import precision
from models.norm import InstanceNorm
from models.transformer import TransformerNet
from training.loop import Trainer

CPU = torch.device("cpu")


def test_plain_network_has_only_torch_instance_norms_and_the_same_output() -> None:
    torch.manual_seed(0)
    net = TransformerNet(base_width=4, residual_blocks=1).eval()
    x = torch.rand(1, 3, 24, 32)
    with torch.inference_mode():
        want = net(x)
    common.torch_instance_norms(net)
    assert not any(isinstance(m, InstanceNorm) for m in net.modules())
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in net.modules()) == 7  # 5 + 2 per residual block
    with torch.inference_mode():
        torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no InstanceNorm"):
        common.torch_instance_norms(TransformerNet(norm="batch", base_width=4, residual_blocks=1))


def test_stylize_variant_names() -> None:
    parse = bench_stylize.parse_variant
    assert parse("plain", CPU) == {
        "tnorm": True,
        "channels_last": False,
        "compile": False,
        "executor": False,
        "layers": False,
        "malloc": False,
        "autocast": False,
        "precision": "fp32",
    }
    assert parse("bf16_cl_layers", CPU)["layers"] and not parse("best", CPU)["layers"]
    # The names of earlier tables keep their meaning.
    assert parse("eager", CPU) == {**parse("plain", CPU), "tnorm": False}
    assert parse("channels_last_malloc", CPU) == {**parse("eager", CPU), "channels_last": True, "malloc": True}
    assert parse("compile_cl", CPU)["compile"] and parse("compile_cl", CPU)["channels_last"]
    assert parse("bf16_executor_malloc", CPU)["executor"] and parse("bf16_executor_malloc", CPU)["precision"] == "bf16"
    autocast = parse("bf16ac_cl_malloc", CPU)
    assert autocast["autocast"] and autocast["precision"] == "bf16" and autocast["channels_last"]
    for bad in ("fast", "bf16_fp16", "executor_compile", "plain_executor", "fp16_cl"):
        with pytest.raises(ValueError, match="variant"):
            parse(bad, CPU)
    for name in bench_stylize.DEFAULT_VARIANTS.split(","):
        parse(name, CPU)


@pytest.mark.parametrize("auto", ["fp32", "bf16"])
def test_best_variants_follow_the_precision_policy(monkeypatch: pytest.MonkeyPatch, auto: str) -> None:
    """``best`` is whatever ``auto`` resolves to, so the benchmarks follow core.precision when it changes."""
    real = precision.resolve_precision

    def resolve(device: torch.device, name: str = "auto", *args: object, **kwargs: object) -> precision.PrecisionPolicy:
        return real(device, auto if name == "auto" else name, *args, **kwargs)

    monkeypatch.setattr(precision, "resolve_precision", resolve)
    best = bench_stylize.parse_variant("best", CPU)
    assert best["precision"] == auto and not best["autocast"] and best["malloc"] and not best["tnorm"]
    assert best["channels_last"] == real(CPU, "fp32", "auto", False, training=False).channels_last
    train_cl = precision.auto_switches("cpu", True, auto)["channels_last"]  # CPU bf16 training runs NHWC
    expected = [part for part, on in ((auto, auto != "fp32"), ("cl", train_cl), ("malloc", True)) if on]
    assert bench_train.best_variant(CPU) == "+".join(expected)
    assert bench_train._expand("examples,plain,best", CPU) == ["examples", "plain", bench_train.best_variant(CPU)]


def test_random_vgg16_weights_load_as_vgg16(tmp_path: Path) -> None:
    """The stand-in for missing VGG-16 weights has exactly the shapes models/vgg.py's VGG-16 loader expects."""
    from models.vgg import build_loss_network

    path = bench_train.write_random_vgg16(tmp_path / "vgg16.pth")
    net = build_loss_network("vgg16", ["relu1_2"], weights_path=str(path))
    assert net.name == "vgg16" and torch.isfinite(net(torch.rand(1, 3, 16, 16))["relu1_2"]).all()


def test_matmul_peak_measures_bf16() -> None:
    assert common.matmul_peak_gflops(CPU, torch.bfloat16, size=64, seconds=0.01) > 0


def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    # Linux carries ru_maxrss across fork and exec: a fresh benchmark worker started by a large parent would report
    # the parent's peak. peak_rss_mb reads the worker's own high-water mark.

    ballast = torch.ones(600 * 2**20, dtype=torch.uint8)  # 600 MiB touched in this (parent) process
    code = "from benchmarks.common import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    parent = common.peak_rss_mb()
    del ballast
    assert parent >= 600
    assert float(child.stdout) < parent - 300  # the child imported torch (~0.3 GB), nothing like the parent's peak


@pytest.mark.slow
def test_bench_video_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import video as bench_video

    parser = argparse.ArgumentParser()
    bench_video.add_arguments(parser)
    argv = ["--sizes", "64x48", "--frames", "6", "--base-width", "4", "--precisions", "fp32", "--blend", "0.5"]
    assert bench_video.run(parser.parse_args(argv)) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64x48")]
    assert [line.split("|")[3].strip() for line in table] == [
        "I/O alone",
        "video_blend=0.5 alone",
        "network",
        "end to end",
        "end to end, video_blend=0.5",
    ]
    for line in table:
        assert float(line.split("|")[4]) > 0  # frames/s


def test_bench_train_times_the_trainers_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/train.py measures ``Trainer.step`` (what fit runs), not a copy of it."""
    import argparse

    from benchmarks import train as bench_train

    steps: list[int] = []
    real_step = Trainer.step

    def counted(self: Trainer, step: int, content: torch.Tensor) -> dict[str, torch.Tensor]:
        steps.append(step)
        return real_step(self, step, content)

    monkeypatch.setattr(Trainer, "step", counted)
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(
        [
            "--worker",
            "cl",
            "--device",
            "cpu",
            "--batch-size",
            "1",
            "--image-size",
            "32",
            "--base-width",
            "8",
            "--network",
            "random",
            "--steps",
            "2",
            "--warmup",
            "0",
        ]
    )
    result = bench_train._worker(args)
    assert result["variant"] == "cl" and result["step_s"] > 0
    assert len(steps) == 3  # the first (timed alone) and the two timed steps


# ---- the one command: python -m benchmarks NAME ------------------------------------------------------------------


def test_every_benchmark_module_is_listed_and_answers_help(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import BENCHMARKS, main

    modules = {p.stem for p in Path(common.__file__).parent.glob("*.py")} - {"__init__", "__main__", "common"}
    assert set(BENCHMARKS) == modules
    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks {name} ")


def test_the_dispatcher_lists_the_benchmarks_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import BENCHMARKS, main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, what in BENCHMARKS.items():
        assert sum(line.split() == [name, *what.split()] for line in lines) == 1
    assert main([]) == 2 and "benchmarks:" in capsys.readouterr().out  # no name: the list, as a usage error
    with pytest.raises(SystemExit) as info:
        main(["no_such_benchmark"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_huge_keeps_its_own_process_free_of_torch() -> None:
    # Linux starts a child's peak RSS at its parent's: the huge benchmark's figures would include torch's ~0.3 GB.
    code = "import sys, benchmarks.__main__, benchmarks.huge; print('torch' in sys.modules)"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "False"
