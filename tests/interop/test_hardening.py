"""Model files a user may pass by mistake or malice: whatever the file, one line, exit status 2, no traceback, no
torch paragraph or warning.

- Random and damaged bytes (a seeded corpus, also bytes that start like a pickle or a zip archive) are "not a
  faststyle ... model file"; only a well-formed pickle that would import code is "refusing to load", and neither
  carries torch's "Weights only load failed ... In PyTorch 2.6" paragraph.
- A config outside the ranges training allows (core/limits.py) is refused before anything is allocated, naming the
  value and the range; so is a network whose weights do not fit in memory.
- A FIFO, a device or a broken link given as model= is named as what it is (never opened: a FIFO would block).

Most cases call the loaders directly (cheap); a few run stylize.py as a user would.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.schema import ModelSchema
from core.errors import FaststyleError
from core.fileio import check_regular_file, regular_file_problem
from core.limits import MODEL_RANGES
from interop.pytorch_examples import read_examples_file, to_examples_state_dict
from interop.read import read_torch_model_file
from models.modelfile import load_model, save_model
from models.transformer import TransformerNet
from tests.support import REPO, make_clip, noise_bytes, tiny_model_file
from training.checkpoint import load_checkpoint

PHOTO = REPO / "data" / "samples" / "content" / "chelsea.jpg"

# First bytes that send a file past the magic-number check into torch.load (pickle protocols 2, 4, 5, a legacy
# torch file's magic number, a zip archive), and some that do not (pickle MARK / EMPTY_DICT / EMPTY_LIST, none).
PREFIXES = [
    b"",
    b"\x80\x02",
    b"\x80\x04\x95",
    b"\x80\x05\x95",
    b"(",
    b"}",
    b"]",
    b"PK\x03\x04",
    b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.",
]
RANDOM_FILES = 27  # three per prefix
TORCH_NOISE = ("Weights only", "PyTorch 2.6", "weights_only", "WeightsUnpickler", "add_safe_globals")


def _random_files(folder: Path) -> list[Path]:
    """The seeded corpus: file i starts with PREFIXES[i % 9], then 1 to 4096 random bytes."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(22)
    paths = []
    for index in range(RANDOM_FILES):
        size = int(rng.integers(1, 4097))
        path = folder / f"random_{index:02d}.pth"
        path.write_bytes(PREFIXES[index % len(PREFIXES)] + rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths.append(path)
    return paths


def _message(loader, path: Path) -> str:
    """The one-line FaststyleError ``loader(path)`` raises; fails on any warning on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FaststyleError) as info:
            loader(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert not any(word in message for word in TORCH_NOISE), message
    assert not caught, [str(w.message) for w in caught]
    return message


def _small_model(path: Path) -> dict:
    tiny_model_file(path, base_width=4)
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# not model files, whatever their first bytes
# ---------------------------------------------------------------------------------------------------------------
def test_every_random_file_is_not_a_model_file(tmp_path: Path) -> None:
    for path in _random_files(tmp_path / "random"):
        for loader, origin in ((read_torch_model_file, "faststyle or pytorch/examples"), (load_model, "faststyle")):
            message = _message(loader, path)
            assert message.startswith(f"{path} is not a {origin} model file: it is "), message
            assert message.endswith("pass the model.pth of a training run)") or "fast_neural_style" in message
        assert _message(load_checkpoint, path).startswith(f"{path} is not a faststyle checkpoint: it is ")


def test_damaged_torch_files_are_not_model_files(tmp_path: Path) -> None:
    import zipfile

    _small_model(tmp_path / "model.pth")
    whole = (tmp_path / "model.pth").read_bytes()
    cases = {
        "cut.pth": whole[: len(whole) // 2],
        "cut_early.pth": whole[:40],
        "legacy_cut.pth": b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "other.pth", "w") as archive:  # a zip archive that torch did not write
        archive.writestr("notes.txt", "hello")
    for name in [*cases, "other.pth"]:
        message = _message(read_torch_model_file, tmp_path / name)
        assert "is not a faststyle or pytorch/examples model file: it is corrupt" in message, message


class _RunsCode:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _code_files(folder: Path, marker: Path) -> dict[str, Path]:
    payload = {"format": "faststyle-model", "meta": _RunsCode(marker)}
    paths = {}
    for protocol in (2, 4, 5):  # GLOBAL (2) and STACK_GLOBAL with memoized names (4, 5)
        paths[f"pickle protocol {protocol}"] = folder / f"code_p{protocol}.pth"
        paths[f"pickle protocol {protocol}"].write_bytes(pickle.dumps(payload, protocol=protocol))
    paths["torch.save"] = folder / "code_zip.pth"
    torch.save(payload, paths["torch.save"])
    paths["torch.save legacy"] = folder / "code_legacy.pth"
    torch.save(payload, paths["torch.save legacy"], _use_new_zipfile_serialization=False)
    return paths


def test_files_that_carry_code_are_refused_for_safety_in_one_plain_line(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER_code_ran"
    for label, path in _code_files(tmp_path, marker).items():
        for loader in (read_torch_model_file, load_model, read_examples_file, load_checkpoint):
            message = _message(loader, path)
            assert message.startswith(f"refusing to load {path}: it would import "), (label, message)
            assert "system" in message, (label, message)  # names what it would call (posix.system, nt.system)
    assert not marker.exists()


def test_a_whole_pickled_network_is_refused_and_named(tmp_path: Path) -> None:
    """torch.save(model) instead of a state dict: a common mistake; the pickle names the class it would build."""
    path = tmp_path / "whole.pth"
    torch.save(TransformerNet(base_width=4, residual_blocks=0), path)
    message = _message(read_torch_model_file, path)
    assert message.startswith(f"refusing to load {path}: it would import models.transformer.TransformerNet")


def test_an_old_format_pytorch_examples_file_loads_without_warnings(tmp_path: Path) -> None:
    """Files of torch < 1.6 (not zip archives) make torch warn about deprecated storages: not on our stderr."""
    torch.manual_seed(0)
    net = TransformerNet(base_width=4, residual_blocks=1, output="linear")
    path = tmp_path / "old.pth"
    torch.save(to_examples_state_dict(net), path, _use_new_zipfile_serialization=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, meta = read_torch_model_file(path)
    assert not caught, [str(w.message) for w in caught]
    assert meta["source"] == "pytorch/examples" and loaded.config()["base_width"] == 4


# ---------------------------------------------------------------------------------------------------------------
# absurd configs
# ---------------------------------------------------------------------------------------------------------------
def test_model_file_ranges_are_the_training_ranges() -> None:
    schema = {f.name: (f.metadata.get("min"), f.metadata.get("max")) for f in fields(ModelSchema)}
    for key in ("base_width", "residual_blocks"):
        assert schema[key] == MODEL_RANGES[key]


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("base_width", 1_000_000_000, "base_width=1000000000, outside the allowed range 1..256"),
        ("base_width", 0, "base_width=0, outside the allowed range 1..256"),
        ("base_width", 4.0, "base_width=4.0, outside the allowed range 1..256"),
        ("base_width", True, "base_width=True, outside"),
        ("residual_blocks", 1_000_000, "residual_blocks=1000000, outside the allowed range 0..64"),
        ("residual_blocks", -1, "residual_blocks=-1, outside the allowed range 0..64"),
        ("num_styles", 10**9, "num_styles=1000000000, outside the allowed range 1..1024"),
        ("base_width", "abc", "base_width='abc', outside"),
    ],
)
def test_a_config_outside_the_ranges_is_refused_before_allocating(
    tmp_path: Path, key: str, value: object, shown: str
) -> None:
    obj = _small_model(tmp_path / "model.pth")
    path = tmp_path / "absurd.pth"
    torch.save({**obj, "model_config": {**obj["model_config"], key: value}}, path)
    message = _message(read_torch_model_file, path)
    assert message.startswith(f"{path} describes a network with {shown}"), message


def test_a_pytorch_examples_file_claiming_a_huge_width_is_refused(tmp_path: Path) -> None:
    """A stride-0 view claims a billion output channels on one float of storage: refused from its shape."""
    state = to_examples_state_dict(TransformerNet(base_width=4, residual_blocks=1, output="linear"))
    state["conv1.conv2d.weight"] = torch.zeros(1).expand(10**9, 3, 9, 9)
    path = tmp_path / "huge.pth"
    torch.save(state, path)
    assert "base_width=1000000000, outside the allowed range 1..256" in _message(read_torch_model_file, path)


def test_a_network_larger_than_the_memory_left_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.modelfile

    path = tmp_path / "model.pth"
    save_model(path, TransformerNet(), {})  # the paper's network: 1.68 M weights, 6 MiB
    monkeypatch.setattr(models.modelfile, "host_memory_available", lambda: 2**20)
    message = _message(read_torch_model_file, path)
    assert "describes a network of 1,679,235 weights (6 MiB), more than the 1 MiB of memory available" in message


# ---------------------------------------------------------------------------------------------------------------
# paths that are not regular files
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def odd_paths(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "fifo": tmp_path / "fifo.pth",
        "zero": tmp_path / "zero.pth",
        "broken": tmp_path / "broken.pth",
        "loop": tmp_path / "loop.pth",
        "folder": tmp_path / "folder.pth",
        "missing": tmp_path / "missing.pth",
    }
    os.mkfifo(paths["fifo"])
    paths["zero"].symlink_to("/dev/zero")
    paths["broken"].symlink_to(tmp_path / "nowhere.pth")
    paths["loop"].symlink_to(paths["loop"])
    paths["folder"].mkdir()
    return paths


EXPECTED_KINDS = {
    "fifo": "a named pipe (FIFO)",
    "zero": "a character device (a symbolic link to /dev/zero)",
    "broken": "a broken symbolic link (to ",
    "loop": "a broken symbolic link (a loop)",
    "folder": "a folder",
    "missing": "not found",
}


def test_paths_that_are_not_regular_files_say_what_they_are(odd_paths: dict[str, Path]) -> None:
    for name, path in odd_paths.items():
        assert regular_file_problem(path).startswith(EXPECTED_KINDS[name]), name
        with pytest.raises(FaststyleError) as info:
            check_regular_file(path, "model file", "pass model=<run dir>/model.pth")
        message = str(info.value)
        expected = f"model file not found: {path}" if name == "missing" else f"model file {path} is "
        assert message.startswith(expected) and "pass model=<run dir>/model.pth" in message, message
    assert regular_file_problem(PHOTO) is None
    # The loaders check the same way, before opening anything (a FIFO opened for reading would block).
    assert "not a regular file" in _message(read_torch_model_file, odd_paths["fifo"])
    assert "not a regular file" in _message(read_examples_file, odd_paths["zero"])


# ---------------------------------------------------------------------------------------------------------------
# the real command line
# ---------------------------------------------------------------------------------------------------------------
def _stylize(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stylize.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,  # a FIFO opened for reading would wait here forever
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.slow
def test_stylize_answers_each_bad_model_file_with_one_line(tmp_path: Path, odd_paths: dict[str, Path]) -> None:

    obj = _small_model(tmp_path / "model.pth")
    torch.save({**obj, "model_config": {**obj["model_config"], "base_width": 10**9}}, tmp_path / "wide.pth")
    torch.save({**obj, "model_config": {**obj["model_config"], "residual_blocks": 10**6}}, tmp_path / "deep.pth")
    (tmp_path / "pickle_noise.pth").write_bytes(b"\x80\x04\x95" + noise_bytes(4096, seed=7))
    code = _code_files(tmp_path, tmp_path / "MARKER_code_ran")["pickle protocol 2"]
    clip = make_clip(tmp_path / "clip.mp4", frames=4)
    out = tmp_path / "out"
    cases = [
        ("pickle_noise.pth", [], "pickle_noise.pth is not a faststyle or pytorch/examples model file: it is corrupt"),
        (code.name, [], "refusing to load"),
        ("wide.pth", [], "base_width=1000000000, outside the allowed range 1..256"),
        ("deep.pth", ["max_memory_mb=1", "scale=4"], "residual_blocks=1000000, outside the allowed range 0..64"),
        (odd_paths["fifo"], [], "is a named pipe (FIFO), not a regular file"),
        (odd_paths["zero"], [], "is a character device (a symbolic link to /dev/zero), not a regular file"),
    ]
    for model, extra, expected in cases:
        proc = _stylize([f"model={tmp_path / model}", f"input={clip}", f"output={out}", *extra], cwd=tmp_path)
        where = f"{model}:\n{proc.stderr[-3000:]}"
        assert proc.returncode == 2, where
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], where
        assert "Traceback" not in proc.stdout + proc.stderr and "Warning" not in proc.stderr, where
    assert not out.exists() and not (tmp_path / "MARKER_code_ran").exists()
