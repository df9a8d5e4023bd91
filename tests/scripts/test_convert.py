"""scripts/convert.py: a pytorch/examples file becomes ours with its source recorded, an existing output needs
--overwrite, and the output is never the source (hard and symbolic links included)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from interop.pytorch_examples import examples_config, to_examples_state_dict
from interop.read import read_torch_model_file
from models.transformer import TransformerNet
from tests.support import run_command

CONVERT = [sys.executable, "-m", "scripts.convert"]


def test_convert_refuses_an_output_that_is_its_source_even_with_overwrite(tmp_path: Path) -> None:
    from scripts.convert import convert

    source = tmp_path / "candy.model"
    source.write_bytes(b"their state dict")
    os.link(source, tmp_path / "hard_link.pth")
    (tmp_path / "soft_link.pth").symlink_to(source)
    for target in (source, tmp_path / "hard_link.pth", tmp_path / "soft_link.pth"):
        with pytest.raises(FaststyleError, match="is the source file .*: choose another -o"):
            convert(source, target, overwrite=True)
    assert source.read_bytes() == b"their state dict" and os.stat(source).st_nlink == 2


@pytest.mark.slow
def test_convert_writes_our_format_with_its_source(tmp_path: Path) -> None:
    ours = TransformerNet(**examples_config(8, 2)).eval()
    source = tmp_path / "candy.model"
    torch.save(to_examples_state_dict(ours), source)
    out = tmp_path / "candy_faststyle.pth"
    result = run_command([*CONVERT, str(source), "-o", str(out)], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    converted, meta = read_torch_model_file(out)
    assert meta["source"] == "pytorch/examples" and meta["source_file"] == "candy.model"
    assert meta["style"] == "candy" and len(meta["source_sha256"]) == 64
    x = torch.rand(1, 3, 24, 28)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ours(x), atol=1e-5, rtol=1e-5)
    # their file also loads directly (stylize.py model=candy.model)
    direct, direct_meta = read_torch_model_file(source)
    assert direct.config() == ours.config() and direct_meta["source_sha256"] == meta["source_sha256"]
    again = run_command([*CONVERT, str(source), "-o", str(out)], cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr
