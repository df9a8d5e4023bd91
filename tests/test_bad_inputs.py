"""Hostile inputs against the real command lines: every case is a ``train.py`` or ``stylize.py`` subprocess.

The corpus is built at run time: corrupt, truncated, empty, CMYK, 16-bit, palette, 1x1 and 1xN images, formats
read one by one and in folders (GIF, TIFF, AVIF, BMP, WebP), a fake HEIC, a 115-byte PNG that declares 12000 x
12000 pixels, odd file names, symbolic-link loops, broken links, folders named like images, text/JPEG/random files
given as models, damaged model files, bad option values and a full disk. For each case: the exit status, exactly
the expected number of ``error:`` / ``failed:`` lines on stderr, no Python traceback anywhere, and the sha256 of
every input file unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import REPO, noise_bytes, tiny_model_file
from training.checkpoint import load_checkpoint

PHOTOS = REPO / "data" / "samples" / "content"
STYLES = REPO / "data" / "samples" / "styles"

pytestmark = pytest.mark.slow

ODD_NAMES = [
    "spaced name.jpg",
    "ünïcödé.jpg",
    "a=b.jpg",
    "photo (1).jpg",
    "-dash.jpg",
    "semi;colon.jpg",
    "quote'.jpg",
    "comma,name.jpg",
]
# Images a stylize run must write (all of them in folder mode; the hostile ones also one by one).
GOOD_IMAGES = [
    "good.jpg",
    "cmyk.jpg",
    "deep16.png",
    "palette_alpha.png",
    "one.png",
    "thin.png",
    "wide.png",
    "anim.gif",
    "scan.tif",
    "photo.avif",
    "old.bmp",
    "web.webp",
    "gray.png",
]
SINGLE_IMAGES = ["cmyk.jpg", "deep16.png", "one.png", "thin.png", "wide.png", "anim.gif", "scan.tif", "photo.avif"]
BAD_IMAGES = {
    "corrupt.jpg": "cannot identify",
    "truncated.jpg": "truncated",
    "empty.png": "cannot identify",
    "phone.heic": "pillow-heif",
}


def _photo(width: int = 64, height: int = 48) -> Image.Image:
    with Image.open(PHOTOS / "chelsea.jpg") as img:
        return img.convert("RGB").resize((width, height))


def _build_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    _photo().save(folder / "good.jpg", quality=90)
    _photo().convert("CMYK").save(folder / "cmyk.jpg")
    deep = (np.asarray(_photo().convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    palette = _photo().convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_alpha.png", transparency=0)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one.png")
    _photo(1, 300).save(folder / "thin.png")
    _photo(300, 1).save(folder / "wide.png")
    frames = [_photo(), _photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    _photo().save(folder / "scan.tif")
    _photo().save(folder / "photo.avif")
    _photo().save(folder / "old.bmp")
    _photo().save(folder / "web.webp")
    _photo().convert("L").save(folder / "gray.png")
    (folder / "corrupt.jpg").write_bytes(noise_bytes(3000, seed=1))
    buffer = io.BytesIO()
    _photo(256, 192).save(buffer, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + noise_bytes(200, seed=2))
    (folder / "notes.txt").write_text("not an image")
    (folder / "folder.jpg").mkdir()
    (folder / "broken.jpg").symlink_to(folder / "missing.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "back").symlink_to(folder)  # a folder loop for recursive walks


def _bomb_png(path: Path, side: int = 12000) -> None:
    """A valid PNG of side x side black pixels in ~100 bytes of compressed data (Pillow only warns below 179 MP)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(side)  # filter byte + one grey byte per pixel
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")
    )


@dataclass
class Corpus:
    root: Path
    images: Path
    model: Path
    data: Path
    runs: Path
    hashes: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every regular file the cases may read (images, models, data), by path."""
        result = {}
        for base in (self.images, self.root / "models", self.data, self.root / "odd"):
            for dirpath, _, names in os.walk(base):
                for name in names:
                    path = Path(dirpath) / name
                    if path.is_file() and not path.is_symlink():
                        result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    _build_images(root / "images")
    models = root / "models"
    models.mkdir()
    tiny_model_file(models / "model.pth", base_width=4)
    (models / "notes.txt").write_text("hello, I am not a model\n")
    (models / "photo.pth").write_bytes((PHOTOS / "coffee.jpg").read_bytes())
    (models / "random.pth").write_bytes(noise_bytes(4096, seed=3))
    (models / "pickle_noise.pth").write_bytes(b"\x80\x02" + noise_bytes(4096, seed=4))  # starts like a pickle
    obj = torch.load(models / "model.pth", weights_only=True)
    torch.save({**obj, "meta": "not a dict"}, models / "badmeta.pth")
    torch.save({**obj, "model_config": {**obj["model_config"], "base_width": 256}}, models / "wide.pth")
    torch.save({**obj, "model_config": {**obj["model_config"], "base_width": 4096}}, models / "huge.pth")
    nan_state = {k: v.clone() for k, v in obj["state_dict"].items()}
    next(v for v in nan_state.values() if v.is_floating_point()).fill_(float("nan"))
    torch.save({**obj, "state_dict": nan_state}, models / "nan.pth")
    odd = root / "odd"
    odd.mkdir()
    for name in ODD_NAMES:
        _photo(40, 30).save(odd / name, format="JPEG")
    data = root / "data"
    data.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (data / name).write_bytes((PHOTOS / name).read_bytes())
    for name in (
        "corrupt.jpg",
        "truncated.jpg",
        "empty.png",
        "cmyk.jpg",
        "deep16.png",
        "palette_alpha.png",
        "one.png",
        "thin.png",
    ):
        (data / name).write_bytes((root / "images" / name).read_bytes())
    _bomb_png(data / "bomb.png")
    (data / "folder.jpg").mkdir()
    (data / "broken.jpg").symlink_to(data / "missing.jpg")
    (data / "loop.jpg").symlink_to(data / "loop.jpg")
    _bomb_png(root / "bomb_style.png", side=11000)
    _photo(1, 500).save(root / "thin_style.png")
    (root / "link").symlink_to(root / "images")
    result = Corpus(root, root / "images", models / "model.pth", data, root / "runs")
    result.hashes = result.fingerprint()
    return result


def _slug(case: str) -> str:
    """A folder name for a case (no characters Hydra's override grammar or the image-extension rule would read)."""
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in case)


def _run(
    program: str, args: list[str], cwd: Path, env: dict | None = None, driver: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", driver, *args] if driver else [sys.executable, str(REPO / program), *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)


def _verdict(proc: subprocess.CompletedProcess, corpus: Corpus, code: int, problems: int, expect: str | None) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "failed:"))]
    where = f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, where
    assert proc.returncode == code, where
    assert len(lines) == problems, where
    if expect is not None:
        assert expect in " ".join(lines), where
    assert corpus.fingerprint() == corpus.hashes, "an input file changed"


# ---------------------------------------------------------------------------------------------------------------
# stylize.py
# ---------------------------------------------------------------------------------------------------------------
# (id, arguments with {images} {model} {models} {out} {root} placeholders, exit status, problem lines, text)
STYLIZE_CASES = [
    ("folder of everything", ["model={model}", "input={images}", "output={out}"], 1, len(BAD_IMAGES), None),
    (
        "recursive folder with a link loop",
        ["model={model}", "input={images}", "output={out}", "recursive=true"],
        1,
        len(BAD_IMAGES),
        None,
    ),
    ("glob", ["model={model}", "input={images}/*.*", "output={out}"], 1, len(BAD_IMAGES), None),
    *[
        (f"single {name}", ["model={model}", f"input={{images}}/{name}", "output={out}"], 0, 0, None)
        for name in SINGLE_IMAGES
    ],
    *[
        (f"single {name}", ["model={model}", f"input={{images}}/{name}", "output={out}"], 1, 1, text)
        for name, text in BAD_IMAGES.items()
    ],
    ("a folder named x.jpg", ["model={model}", "input={images}/folder.jpg", "output={out}"], 2, 1, "no image files"),
    ("broken link as input", ["model={model}", "input={images}/broken.jpg", "output={out}"], 2, 1, "broken"),
    ("link loop as input", ["model={model}", "input={images}/loop.jpg", "output={out}"], 2, 1, "broken"),
    (
        "suffix is a path",
        ["model={model}", "input={images}/good.jpg", "output={out}", "suffix=../../images/good"],
        2,
        1,
        "plain name",
    ),
    (
        "output is the input through a link",
        ["model={model}", "input={images}/good.jpg", "output={root}/link/good.jpg", "overwrite=true"],
        2,
        1,
        "is an input",
    ),
    (
        "output folder is the input folder through a link",
        ["model={model}", "input={images}", "output={root}/link/"],
        2,
        1,
        "among the input images",
    ),
    (
        "output is the input",
        ["model={model}", "input={images}/good.jpg", "output={images}/good.jpg", "overwrite=true"],
        2,
        1,
        "is an input",
    ),
    ("output .tif is a file", ["model={model}", "input={images}/good.jpg", "output={out}/o.tif"], 0, 0, None),
    (
        "output .gif is refused",
        ["model={model}", "input={images}/good.jpg", "output={out}/o.gif"],
        2,
        1,
        "cannot write o.gif",
    ),
    (
        "bomb png, reduced",
        ["model={model}", "input={root}/data/bomb.png", "output={out}", "max_side_px=256"],
        0,
        0,
        None,
    ),
    ("strength=abc", ["model={model}", "input={images}/good.jpg", "strength=abc"], 2, 1, "must be a number"),
    ("max_side_px=abc", ["model={model}", "input={images}/good.jpg", "max_side_px=abc"], 2, 1, "integer"),
    ("channels_last=banana", ["model={model}", "input={images}/good.jpg", "channels_last=banana"], 2, 1, "not one of"),
    ("unknown option", ["model={model}", "input={images}/good.jpg", "+foo=1"], 2, 1, "unknown option foo"),
    ("unknown option without +", ["model={model}", "input={images}/good.jpg", "foo=1"], 2, 1, "unknown option"),
    ("text file as model", ["model={models}/notes.txt", "input={images}/good.jpg"], 2, 1, "a text file"),
    ("JPEG as model", ["model={models}/photo.pth", "input={images}/good.jpg"], 2, 1, "a JPEG image"),
    ("random bytes as model", ["model={models}/random.pth", "input={images}/good.jpg"], 2, 1, "not a faststyle"),
    ("pickle-like bytes as model", ["model={models}/pickle_noise.pth", "input={images}/good.jpg"], 2, 1, "corrupt"),
    ("folder as model", ["model={models}", "input={images}/good.jpg"], 2, 1, "is a folder"),
    ("meta not a dict", ["model={models}/badmeta.pth", "input={images}/good.jpg"], 2, 1, "meta"),
    ("absurd width", ["model={models}/huge.pth", "input={images}/good.jpg"], 2, 1, "allowed range 1..256"),
    ("width that does not fit", ["model={models}/wide.pth", "input={images}/good.jpg"], 2, 1, "does not fit"),
    ("NaN weights", ["model={models}/nan.pth", "input={images}/good.jpg"], 2, 1, "NaN"),
    ("missing input", ["model={model}", "input={images}/nothing.jpg"], 2, 1, "not found"),
    ("unquoted '=' in a name", ["model={model}", "input={root}/odd/a=b.jpg"], 2, 1, "quote the value"),
    ("unquoted non-ASCII name", ["model={model}", "input={root}/odd/ünïcödé.jpg"], 2, 1, "quote the value"),
    ("unquoted comma in a name", ["model={model}", "input={root}/odd/comma,name.jpg"], 2, 1, "quote it"),
    *[
        (
            f"quoted odd name {name}",
            [
                "model={model}",
                f'input="{{root}}/odd/{name}"' if '"' not in name else f"input='{{root}}/odd/{name}'",
                "output={out}",
            ],
            0,
            0,
            None,
        )
        for name in ODD_NAMES
    ],
]


@pytest.mark.parametrize(
    ("case", "args", "code", "problems", "expect"), STYLIZE_CASES, ids=[case[0] for case in STYLIZE_CASES]
)
def test_stylize(corpus: Corpus, case: str, args: list[str], code: int, problems: int, expect: str | None) -> None:
    out = corpus.root / "out" / _slug(case)
    values = {
        "images": corpus.images,
        "model": corpus.model,
        "models": corpus.model.parent,
        "out": out,
        "root": corpus.root,
    }
    proc = _run("stylize.py", [arg.format(**values) for arg in args], cwd=corpus.root)
    _verdict(proc, corpus, code, problems, expect)
    if code == 0:
        assert any(out.rglob("*.*")), "nothing was written"


def test_stylize_folder_lists_what_it_passed_over(corpus: Corpus) -> None:
    out = corpus.root / "out" / "passed_over"
    proc = _run("stylize.py", [f"model={corpus.model}", f"input={corpus.images}", f"output={out}"], cwd=corpus.root)
    _verdict(proc, corpus, 1, len(BAD_IMAGES), None)
    assert "passed over 3 (not image files)" in proc.stdout
    for name in ("folder.jpg", "broken.jpg", "loop.jpg"):
        assert f"passed over {corpus.images / name}" in proc.stdout
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == len(GOOD_IMAGES), written


# ---------------------------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------------------------
SMALL = [
    "loss.network=random",
    "model.base_width=4",
    "model.residual_blocks=1",
    "data.image_size=32",
    "data.num_workers=0",
    "data.val_images=1",
    "style_size=32",
    "train.batch_size=2",
    "train.steps=2",
    "train.log_interval_steps=1",
    "train.image_interval_steps=2",
    "train.checkpoint_interval_steps=1",
]

TRAIN_CASES = [
    ("hostile data folder trains", [], 0, 0, None),
    ("style is missing", ["style={root}/nothing.jpg"], 2, 1, "image not found"),
    ("style is a folder", ["style={root}/images"], 2, 1, "is a folder"),
    ("style is a text file", ["style={root}/models/notes.txt"], 2, 1, "cannot read image"),
    ("style is 1x500", ["style={root}/thin_style.png"], 2, 1, "too elongated"),
    ("style is a 11000x11000 bomb", ["style={root}/bomb_style.png"], 0, 0, None),
    ("data root missing", ["data.root={root}/nothing"], 2, 1, "not found"),
    ("data root has no images", ["data.root={root}/models"], 2, 1, "no images"),
    ("image_size too small", ["data.image_size=4"], 2, 1, "the minimum is 8"),
    ("val_images=0", ["data.val_images=0"], 0, 0, None),
    ("val_images=-1", ["data.val_images=-1"], 2, 1, "val_images"),
    ("style_size=-1", ["style_size=-1"], 2, 1, "style_size"),
    ("unknown key with +", ["+train.foo=1"], 2, 1, "unknown option train.foo"),
    ("unknown key", ["train.foo=1"], 2, 1, "unknown option train.foo"),
    ("steps=abc", ["train.steps=abc"], 2, 1, "integer"),
    ("channels_last=banana", ["train.channels_last=banana"], 2, 1, "true or false"),
    ("base_width=abc", ["model.base_width=abc"], 2, 1, "integer"),
    ("lr=-1", ["train.lr=-1"], 2, 1, "greater than 0"),
    ("unknown experiment", ["experiment=nope"], 2, 1, "Available options"),
    ("resume from a text file", ["train.resume={root}/models/notes.txt"], 2, 1, "a text file"),
    ("resume from a JPEG", ["train.resume={root}/models/photo.pth"], 2, 1, "a JPEG image"),
    ("resume from a model.pth", ["train.resume={root}/models/model.pth"], 2, 1, "an inference model"),
    ("unquoted '=' in the style name", ["style={root}/odd/a=b.jpg"], 2, 1, "quote the value"),
    ("quoted odd style name", ['style="{root}/odd/photo (1).jpg"'], 0, 0, None),
]


def _train_args(corpus: Corpus, case: str, extra: list[str]) -> list[str]:
    values = {"root": corpus.root}
    run_dir = corpus.runs / _slug(case)
    return [
        f"style={STYLES / 'van_gogh_village_street_auvers.jpg'}",
        f"data.root={corpus.data}",
        *SMALL,
        f"hydra.run.dir={run_dir}",
        *[arg.format(**values) for arg in extra],
    ]


@pytest.mark.parametrize(
    ("case", "args", "code", "problems", "expect"), TRAIN_CASES, ids=[case[0] for case in TRAIN_CASES]
)
def test_train(corpus: Corpus, case: str, args: list[str], code: int, problems: int, expect: str | None) -> None:
    proc = _run("train.py", _train_args(corpus, case, args), cwd=corpus.root)
    _verdict(proc, corpus, code, problems, expect)
    if code == 0:
        assert (corpus.runs / _slug(case) / "model.pth").is_file()


def test_train_skips_every_unreadable_data_file_with_a_warning(corpus: Corpus) -> None:
    proc = _run("train.py", _train_args(corpus, "warnings", ["train.steps=4"]), cwd=corpus.root)
    _verdict(proc, corpus, 0, 0, None)
    log = (corpus.runs / "warnings" / "train.log").read_text()
    for name in ("corrupt.jpg", "truncated.jpg", "empty.png", "bomb.png", "folder.jpg", "broken.jpg", "loop.jpg"):
        assert name in log, name
    assert "12000x12000 pixels" in log  # refused from its header, before decoding 432 MB


def test_a_finished_run_dir_is_never_reused_unless_resumed(corpus: Corpus) -> None:
    run_dir = corpus.runs / "finished"
    first = _run("train.py", _train_args(corpus, "finished", []), cwd=corpus.root)
    _verdict(first, corpus, 0, 0, None)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    again = _run("train.py", _train_args(corpus, "finished", ["seed=1"]), cwd=corpus.root)
    _verdict(again, corpus, 2, 1, "already holds a training run")
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before
    # A stale temporary file of a killed writer (its pid is gone) is removed when the run is resumed in place.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run_dir / "checkpoints" / f".last.pt.{int(dead.stdout)}.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    resumed = _run(
        "train.py", _train_args(corpus, "finished", ["train.steps=3", f"train.resume={run_dir}"]), cwd=corpus.root
    )
    _verdict(resumed, corpus, 0, 0, None)
    assert not stale.exists()
    assert load_checkpoint(run_dir)["step"] == 3
    umask = os.umask(0)
    os.umask(umask)
    for path in (run_dir / "model.pth", run_dir / "checkpoints" / "last.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_two_runs_started_together_get_two_run_dirs(corpus: Corpus) -> None:
    workdir = corpus.root / "together"
    workdir.mkdir()
    base = [f"style={STYLES / 'hokusai_great_wave.jpg'}", f"data.root={corpus.data}", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *base, f"seed={seed}"],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    models = sorted(workdir.glob("outputs/train/*/*/model.pth"))
    assert len(models) == 2, models


FULL_DISK_DRIVER = textwrap.dedent("""
    import errno, runpy, sys
    from core import fileio
    real_open = open

    class Full:
        def __init__(self, handle): self.handle = handle
        def __enter__(self): return self
        def __exit__(self, *exc): self.handle.close()
        def write(self, data): raise OSError(errno.ENOSPC, "No space left on device")

    def full_for_model(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return Full(handle) if ".model.pth." in str(path) and "w" in mode else handle

    fileio.open = full_for_model
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(corpus: Corpus) -> None:
    run_dir = corpus.runs / "full_disk"
    proc = _run("train.py", _train_args(corpus, "full_disk", []), cwd=REPO, driver=FULL_DISK_DRIVER)
    _verdict(proc, corpus, 2, 1, "disk full: cannot write")
    assert "model.pth" in proc.stderr and "MiB free" in proc.stderr
    assert load_checkpoint(run_dir)["step"] == 2  # the checkpoint written before the disk filled is intact
    assert not (run_dir / "model.pth").exists()
    assert not [p for p in run_dir.rglob(".*.tmp")]
