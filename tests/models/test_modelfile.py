"""models/modelfile.py: model files round-trip, load safely, fail clearly (a training checkpoint given as a model,
an unsafe pickle, damaged or foreign files, mismatched weights, an absurd width)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import FaststyleError
from models.modelfile import load_model, save_model, unwrap_model
from tests.support import tiny_net
from training.checkpoint import save_checkpoint


def test_save_model_round_trip_gives_same_output(tmp_path: Path) -> None:
    net = tiny_net()
    path = tmp_path / "model.pth"
    save_model(path, net, {"style": "wave", "steps": 3})
    loaded, meta = load_model(path)
    assert meta == {"style": "wave", "steps": 3}
    assert not loaded.training
    assert loaded.config() == net.config()
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_save_model_unwraps_compiled_module(tmp_path: Path) -> None:
    """A torch.compile wrapper's state_dict keys start with ``_orig_mod.``; the file must hold the plain keys."""
    net = tiny_net()
    wrapped = torch.compile(net)  # compiling is lazy: nothing runs until the first call
    assert unwrap_model(wrapped) is net
    save_model(tmp_path / "m.pth", wrapped, {})
    state = torch.load(tmp_path / "m.pth", weights_only=True)["state_dict"]
    assert set(state) == set(net.state_dict())


def test_load_model_rejects_missing_corrupt_foreign_and_unsafe_files(tmp_path: Path) -> None:
    with pytest.raises(FaststyleError, match="not found"):
        load_model(tmp_path / "nope.pth")

    corrupt = tmp_path / "corrupt.pth"
    save_model(corrupt, tiny_net(), {})
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    with pytest.raises(FaststyleError, match="corrupt"):
        load_model(corrupt)

    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(FaststyleError, match="not a faststyle model"):
        load_model(foreign)

    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, {"step": 1})
    with pytest.raises(FaststyleError, match="training checkpoint"):
        load_model(ckpt)

    # A pickle that would run code on load: weights_only must refuse it before anything executes.
    unsafe = tmp_path / "unsafe.pth"
    marker = tmp_path / "pwned"
    torch.save({"format": "faststyle-model", "payload": _Exploit(str(marker))}, unsafe)
    with pytest.raises(FaststyleError, match="refusing to load"):
        load_model(unsafe)
    assert not marker.exists()


class _Exploit:
    """Unpickling this object would create a file (it must never be unpickled by our loaders)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.marker, "w"))


def test_load_model_rejects_mismatched_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_model(path, tiny_net(), {})
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["base_width"] = 16
    torch.save(obj, path)
    # The message names a key and both shapes (the stored weights were written at base_width 8).
    with pytest.raises(
        FaststyleError,
        match=r"does not fit its model config: encoder\.0\.conv\.weight is "
        r"\(8, 3, 9, 9\), expected \(16, 3, 9, 9\)",
    ):
        load_model(path)


def test_an_absurd_width_in_a_model_file_fails_before_allocating(tmp_path: Path) -> None:
    """base_width=256 (the largest allowed) would allocate ~380 MB if the network were built for real before the
    shapes are checked."""
    import resource

    path = tmp_path / "model.pth"
    save_model(path, tiny_net(), {})
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["base_width"] = 256
    torch.save(obj, path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FaststyleError, match="does not fit its model config"):
        load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: under 200 MiB more


@pytest.mark.parametrize("change", ["meta", "nan"])
def test_damaged_model_files_are_one_line_errors(tmp_path: Path, change: str) -> None:
    path = tmp_path / "model.pth"
    save_model(path, tiny_net(), {})
    obj = torch.load(path, weights_only=True)
    if change == "meta":
        obj["meta"] = [1, 2]
        expected = "its meta is a list"
    else:
        obj["state_dict"]["decoder.6.conv.weight"][0, 0, 0, 0] = float("nan")
        expected = "1 NaN or infinite weights"
    torch.save(obj, path)
    with pytest.raises(FaststyleError, match=expected):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"hello world\n", "a text file"),
        (b"", "an empty file"),
        (b"\xff\xd8\xff\xe0 JFIF", "a JPEG image"),
        (bytes(range(7, 256)), "not a file written by torch.save"),
    ],
)
def test_files_that_are_not_model_files_say_what_they_are(tmp_path: Path, content: bytes, kind: str) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(FaststyleError, match=f"is not a faststyle model file: it is {kind}"):
        load_model(path)
