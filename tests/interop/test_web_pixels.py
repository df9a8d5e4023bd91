"""The web page's pixel arithmetic (interop/webpage/pixels.mjs) against the Python it mirrors: node runs the JS
functions on inputs made here, and their results must equal data/io.py's rounding and resizing, models/styles.py's
mix rule and inference/color.py's colour and strength formulas. Skips without node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.errors import FaststyleError
from data.io import resize_max_side, to_uint8
from inference.color import finish_colors
from models.styles import parse_style

PIXELS = Path(__file__).resolve().parents[2] / "interop" / "webpage" / "pixels.mjs"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is missing (Debian: apt-get install -y nodejs)")

# Reads the cases from stdin, applies the named pixels.mjs function to each and prints the results as JSON.
RUNNER = """
import * as px from "%s";
let text = "";
for await (const chunk of process.stdin) text += chunk;
const out = JSON.parse(text).map(([name, args]) => {
  if (name === "finish") {
    const [stylized, content, w, h, preserve, strength] = args;
    const rgba = px.planarToRgba(px.finishColors(Float32Array.from(stylized),
      px.rgbaToPlanar(content, w, h), preserve, strength), w, h);
    return Array.from(rgba).filter((_, i) => i %% 4 !== 3);
  }
  return px[name](...args);
});
console.log(JSON.stringify(out));
"""


def run_node(cases: list[tuple[str, list]]) -> list:
    script = RUNNER % PIXELS.as_uri()
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script], input=json.dumps(cases), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_rounding_is_half_to_even_as_torch():
    values = [0.5, 1.5, 2.5, -0.5, 254.5, 3.4999, 3.5001, 0.0, 255.0]
    got = run_node([("roundHalfEven", [v]) for v in values])
    assert got == [float(torch.tensor(v, dtype=torch.float64).round()) for v in values]
    # toByte: every exact byte value survives /255 and back, ties and out-of-range values as data/io.to_uint8
    floats = [k / 255 for k in range(256)] + [(k + 0.5) / 255 for k in range(0, 255, 7)] + [-0.2, 1.3, 1.0, 0.0]
    got = run_node([("toByte", [v]) for v in floats])
    assert got == to_uint8(torch.tensor(floats, dtype=torch.float32)).tolist()


def test_working_size_is_resize_max_side():
    cases = [(640, 480, 333), (101, 57, 64), (3, 300, 10), (50, 40, 64), (255, 85, 128), (7, 5, 3), (97, 96, 2)]
    got = run_node([("workingSize", [w, h, m]) for w, h, m in cases])
    assert got == [list(resize_max_side(Image.new("RGB", (w, h)), m).size) for w, h, m in cases]


def test_mix_weights_are_stylize_mixes():
    names = ["a", "b", "c"]
    mixes = [[0.3, 0.7, 0.0], [1.0, 1.0, 2.0], [0.0, 0.0, 5.0], [30.0, 70.0, 0.0], [1e-3, 0.0, 2e-3]]
    got = run_node([("mixWeights", [m]) for m in mixes])
    for mix, weights in zip(mixes, got, strict=True):
        spec = ",".join(f"{n}:{w!r}" for n, w in zip(names, mix, strict=True))
        assert weights == pytest.approx(list(parse_style(spec, names).weights), abs=1e-15)
    for bad in ([0.0, 0.0, 0.0], [-1.0, 2.0, 0.0]):
        with pytest.raises(FaststyleError):
            parse_style(",".join(f"{n}:{w}" for n, w in zip(names, bad, strict=True)), names)
    assert run_node([("mixWeights", [[0, 0, 0]]), ("mixWeights", [[-1, 2, 0]])]) == [None, None]


@pytest.mark.parametrize("preserve", [False, True])
def test_finish_colors_and_bytes_are_stylize(preserve: bool):
    h, w = 9, 13
    gen = torch.Generator().manual_seed(3)
    stylized = torch.rand(3, h, w, generator=gen) * 1.1 - 0.05  # a little outside [0, 1], as a network may give
    content_bytes = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
    content = content_bytes.permute(2, 0, 1).float() / 255
    rgba = torch.cat([content_bytes, torch.full((h, w, 1), 255, dtype=torch.uint8)], dim=2).flatten().tolist()
    strengths = [0.0, 0.3, 0.5, 0.77, 1.0]
    cases = [("finish", [stylized.flatten().tolist(), rgba, w, h, preserve, s]) for s in strengths]
    for strength, got in zip(strengths, run_node(cases), strict=True):
        expected = to_uint8(finish_colors(stylized, content, preserve, strength)).permute(1, 2, 0).flatten()
        diff = (torch.tensor(got) - expected.int()).abs()
        # float64 in JS against float32 in torch: a value within 1e-7 of a rounding tie may land one byte apart
        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2, (strength, diff.max(), (diff > 0).sum())
        if strength == 0:
            assert got == content_bytes.flatten().tolist()
