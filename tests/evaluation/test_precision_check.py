"""The precision_check report (evaluation/reports/precision_check.py): fp32 against bf16 through stylize's network
and Runner, also for a pytorch/examples file and one style of a multi-style model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from models.transformer import TransformerNet


def test_precision_check_script_compares_through_the_runner(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The precision_check report runs the network stylize runs in fp32 and bf16 (also through pytorch/examples'
    format, and tiled through stylize's Runner) and prints PSNRs: finite and high for a small network, and the images
    it says it wrote exist."""
    import re

    from evaluation.reports import precision_check
    from interop.pytorch_examples import examples_config
    from models.modelfile import save_model

    torch.manual_seed(0)
    model = tmp_path / "run" / "model.pth"
    save_model(model, TransformerNet(**examples_config(8, 1)).eval(), {"style_stem": "x"})
    args = [str(model), "--width", "64", "--height", "48", "--tiled-budget-mb", "4", "--out", str(tmp_path / "o")]
    assert precision_check.main([*args, "--as-examples"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "as pytorch/examples file" in line, line
    values = [float(v) for v in re.findall(r"([\d.]+) dB", line)]
    assert len(values) == 3 and all(30 < v < 200 for v in values), line
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "run_model_bf16.png",
        "run_model_diff_x20.png",
        "run_model_fp32.png",
    ]


def test_other_tools_take_one_style_of_a_multi_style_model(multi_model: Path, tmp_path: Path, capsys) -> None:
    from evaluation.reports import precision_check
    from interop.pytorch_examples import examples_config, to_examples_state_dict

    # pytorch/examples' format holds one style: refused with one line
    with pytest.raises(FaststyleError, match="pick one style"):
        to_examples_state_dict(TransformerNet(**examples_config(8, 1), num_styles=2))
    # precision_check folds the style it is given (the first by default), as stylize runs it
    args = [str(multi_model), "--width", "40", "--height", "32", "--tiled-budget-mb", "4", "--out", str(tmp_path)]
    assert precision_check.main([*args, "--style", "street"]) == 0
    out = capsys.readouterr().out
    assert "checking style street" in out and "dB (8-bit)" in out
