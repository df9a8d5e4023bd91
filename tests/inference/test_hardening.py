"""stylize.py hardening (issue 22): a full disk, first commands without arguments, overflowing style mixes, outputs
that cannot be folders, inputs that are not regular files, cut videos, icons, oversized PNG text, deep trees and
images too large for memory. CLI cases run stylize.py as a subprocess and check the exit status, exactly one
``error:``/``failed:`` line, no traceback, no warning with a site-packages path, and the inputs' sha256 unchanged;
the rest call the functions directly (cheaper)."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from core.errors import FaststyleError
from core.fileio import DiskFullError, atomic_write_bytes, file_kind
from data.io import load_image, save_image
from models.modelfile import save_model
from models.styles import parse_style
from models.transformer import TransformerNet
from tests.support import REPO

PHOTOS = REPO / "data" / "samples" / "content"
MIX_NAMES = ["van_gogh_village_street_auvers", "hokusai_great_wave"]


def _photo(width: int = 48, height: int = 36, name: str = "chelsea.jpg") -> Image.Image:
    with Image.open(PHOTOS / name) as img:
        return img.convert("RGB").resize((width, height))


def _fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (FIFOs, devices and links are not read)."""
    result = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _run(args: list[str], cwd: Path, python_flags: tuple[str, ...] = (), timeout: float = 300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, *python_flags, str(REPO / "stylize.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _verdict(proc: subprocess.CompletedProcess, code: int, problems: int, expect: str | None = None) -> list[str]:
    """Check a stylize.py run; returns its error:/failed: lines."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "failed:"))]
    where = f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, where
    assert "site-packages" not in proc.stdout + proc.stderr, where
    assert proc.returncode == code, where
    assert len(lines) == problems, where
    if expect is not None:
        assert expect in " ".join(lines), where
    return lines


def _mp4(path: Path, frames: int = 12, noise: bool = False, size: tuple[int, int] = (64, 48)) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            pixels = (
                rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                if noise
                else np.full((size[1], size[0], 3), 20 * i % 256, np.uint8)
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _bomb_png(path: Path, side: int = 12000) -> None:
    """A ~100-byte PNG whose header declares side x side pixels (never decoded by the cases that use it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    torch.manual_seed(0)
    for folder, styles in (("m", None), ("mm", MIX_NAMES), ("dup", ["wave", "wave"])):
        (root / folder).mkdir()
        net = TransformerNet(base_width=4, residual_blocks=1, num_styles=len(styles) if styles else 1)
        save_model(root / folder / "model.pth", net, {"styles": styles} if styles else {"style_stem": "wave"})
    inputs = root / "in"
    inputs.mkdir()
    _photo().save(inputs / "good.jpg", quality=90)
    _photo().save(inputs / "icon.ico")
    icons = root / "icons"
    icons.mkdir()
    for name in ("good.jpg", "icon.ico"):
        shutil.copy(inputs / name, icons / name)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (2 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)  # over Pillow's limit when unzipped
    _photo(name="coffee.jpg").save(inputs / "bigtext.png", pnginfo=info)
    (root / "big").mkdir()
    _bomb_png(root / "big" / "bomb.png")
    os.mkfifo(inputs / "fifo.jpg")
    (inputs / "zero.jpg").symlink_to("/dev/zero")
    _mp4(inputs / "clip.mp4")
    same = root / "same"
    same.mkdir()
    _photo().save(same / "photo.jpg")
    _photo(name="coffee.jpg").save(same / "photo.png")
    (root / "a_file.txt").write_text("not a folder\n")
    return root


@pytest.fixture
def unchanged(corpus: Path):
    folders = [corpus / name for name in ("in", "same", "icons", "big", "m", "mm", "dup")]
    before = {path: digest for folder in folders for path, digest in _fingerprint(folder).items()}
    yield
    after = {path: digest for folder in folders for path, digest in _fingerprint(folder).items()}
    assert after == before, "an input file changed"


# ---------------------------------------------------------------------------------------------------------------
# First commands: one line and the usage, before torch (and, without arguments, before Hydra) is imported
# ---------------------------------------------------------------------------------------------------------------
FIRST_COMMANDS = [
    ("no arguments", [], "model= and input= are missing", ("hydra", "torch")),
    ("no model", ["input=photo.jpg"], "model= is missing", ("torch",)),
    ("missing model file", ["model=nothing/model.pth", "input=photo.jpg"], "model file not found", ("torch",)),
    ("FIFO as model", ["model={in}/fifo.jpg", "input=photo.jpg"], "named pipe (FIFO)", ("torch",)),
    ("unknown option", ["model={m}", "input=photo.jpg", "colour=red"], "unknown option colour", ("torch",)),
]


@pytest.mark.parametrize(("case", "args", "expect", "not_imported"), FIRST_COMMANDS, ids=[c[0] for c in FIRST_COMMANDS])
def test_first_commands_answer_before_torch(
    corpus: Path, unchanged: None, case: str, args: list[str], expect: str, not_imported: tuple[str, ...]
) -> None:
    values = {"in": corpus / "in", "m": corpus / "m" / "model.pth"}
    proc = _run([arg.format(**values) for arg in args], cwd=corpus, python_flags=("-X", "importtime"))
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    (line,) = _verdict(proc, 2, 1, expect)
    assert not imported & set(not_imported), sorted(imported & set(not_imported))
    if "missing" in expect:
        assert "usage: python stylize.py model=" in line


# ---------------------------------------------------------------------------------------------------------------
# The command line: style mixes, outputs, inputs, deep trees, memory
# ---------------------------------------------------------------------------------------------------------------
CLI_CASES = [
    (
        "style weights overflow",
        ["model={mm}", "input={in}/good.jpg", f"style={MIX_NAMES[0]}:1e308,{MIX_NAMES[1]}:1e308"],
        2,
        1,
        "add up to more than a number can hold",
    ),
    ("output is /dev/null, folder input", ["model={m}", "input={same}", "output=/dev/null"], 2, 1, "not a folder"),
    ("output is an existing file", ["model={m}", "input={same}", "output={root}/a_file.txt"], 2, 1, "not a folder"),
    ("FIFO as input", ["model={m}", "input={in}/fifo.jpg"], 2, 1, "is a named pipe (FIFO), not a regular file"),
    (
        "link to /dev/zero",
        ["model={m}", "input={in}/zero.jpg"],
        2,
        1,
        "is a character device (a symbolic link to /dev/zero)",
    ),
    ("MP4 cut before its index", ["model={m}", "input={root}/cut.mp4", "output={out}"], 1, 1, "cut short"),
    ("an .ico file", ["model={m}", "input={in}/icon.ico", "output={out}"], 1, 1, "ICO files are not read"),
    ("a folder holding an .ico", ["model={m}", "input={root}/icons", "output={out}"], 0, 0, None),
    ("PNG with a huge text chunk", ["model={m}", "input={in}/bigtext.png", "output={out}"], 0, 0, None),
    ("same stem, format forced", ["model={m}", "input={same}", "output={out}", "format=png"], 0, 0, None),
    ("two styles of one name", ["model={dup}", "input={in}/good.jpg", "output={out}"], 0, 0, None),
    ("output=x.jpg/ is a folder", ["model={m}", "input={in}/good.jpg", "output={out}/x.jpg/"], 0, 0, None),
]
WRITTEN = {
    "a folder holding an .ico": ["good_wave.jpg"],
    "PNG with a huge text chunk": ["bigtext_wave.png"],
    "same stem, format forced": ["photo_jpg_wave.png", "photo_png_wave.png"],
    "two styles of one name": ["good_wave_0.jpg", "good_wave_1.jpg"],
    "output=x.jpg/ is a folder": ["x.jpg/good_wave.jpg"],
}


@pytest.mark.parametrize(("case", "args", "code", "problems", "expect"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_stylize_cli(
    corpus: Path, unchanged: None, case: str, args: list[str], code: int, problems: int, expect: str | None
) -> None:
    out = corpus / "out" / "".join(c if c.isalnum() else "_" for c in case)
    if case == "MP4 cut before its index":
        data = (corpus / "in" / "clip.mp4").read_bytes()
        (corpus / "cut.mp4").write_bytes(data[: data.index(b"moov") + 64])  # inside the index (the moov box)
    values = {
        "in": corpus / "in",
        "same": corpus / "same",
        "root": corpus,
        "out": out,
        **{name: corpus / name / "model.pth" for name in ("m", "mm", "dup")},
    }
    proc = _run([arg.format(**values) for arg in args], cwd=corpus, timeout=120)
    _verdict(proc, code, problems, expect)
    if code == 0:
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert written == WRITTEN[case]
        assert f"output: {out}" in proc.stdout  # the summary line says where
        assert len([line for line in proc.stdout.splitlines() if line.startswith("stylized ")]) == 1
    if "not a folder" in (expect or ""):
        assert not Path("/dev/null").is_dir() and (corpus / "a_file.txt").read_text() == "not a folder\n"


def test_a_deep_tree_fails_only_the_image_whose_output_path_is_too_long(corpus: Path, tmp_path: Path) -> None:
    """115 levels of 32-character folders: the input path fits PATH_MAX, the same tree under a longer output folder
    does not; that image fails with one line, the shallow one is written."""
    deep = tmp_path / "deep"
    deep.mkdir()
    _photo().save(deep / "top.jpg")
    folder_fd = os.open(deep, os.O_RDONLY)
    try:  # made relative to an open folder: the absolute path is too long for the usual calls
        for _ in range(115):
            os.mkdir("d" * 32, dir_fd=folder_fd)
            next_fd = os.open("d" * 32, os.O_RDONLY, dir_fd=folder_fd)
            os.close(folder_fd)
            folder_fd = next_fd
        fd = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder_fd)
        with os.fdopen(fd, "wb") as handle:
            _photo().save(handle, format="JPEG")
    finally:
        os.close(folder_fd)
    out = tmp_path / ("o" * 200) / ("p" * 200)
    proc = _run([f"model={corpus / 'm' / 'model.pth'}", f"input={deep}", "recursive=true", f"output={out}"], tmp_path)
    (line,) = _verdict(proc, 1, 1, "the path is longer than the system allows")
    assert line.startswith("failed: ") and "deep.jpg" in line
    assert (out / "top_wave.jpg").is_file()


def test_an_image_too_large_for_memory_is_one_line(corpus: Path, unchanged: None) -> None:
    """A PNG header of 12000 x 12000 at scale=16 needs ~137 GiB for its pixels: refused before decoding, and
    Pillow's DecompressionBombWarning (its header is over 89 MP) does not show."""
    from core.device import host_memory_available

    available = host_memory_available()
    if available is not None and available > 200 * 2**30:
        pytest.skip("this machine has more than 200 GiB of memory available")
    args = [f"model={corpus / 'm' / 'model.pth'}", f"input={corpus / 'big' / 'bomb.png'}", "scale=16"]
    proc = _run([*args, f"output={corpus / 'out' / 'bomb'}"], cwd=corpus)
    _verdict(proc, 1, 1, "192000x192000 needs about")
    assert "max_side_px=" in proc.stderr and "Warning" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# A full disk: no truncated output, no temporary file, one line; a second run completes the rest
# ---------------------------------------------------------------------------------------------------------------
def test_a_full_disk_stops_a_folder_run_with_one_line_and_leaves_only_complete_files(
    corpus: Path, tmp_path: Path
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {mounted.stderr.decode().strip() or 'not permitted'}")
    try:
        photos = tmp_path / "photos"
        photos.mkdir()
        rng = np.random.default_rng(22)
        sources = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
        for i in range(60):  # ~45 KB each as stylized JPEGs: 1 MiB holds about 20
            source = sources[i % len(sources)]
            left, top = (int(rng.integers(0, side - crop)) for side, crop in zip(source.size, (320, 240), strict=True))
            source.crop((left, top, left + 320, top + 240)).save(photos / f"p{i:03d}.jpg", quality=90)
        before = _fingerprint(photos)
        out = full / "out"
        args = [f"model={corpus / 'm' / 'model.pth'}", f"input={photos}", f"output={out}/"]
        proc = _run(args, cwd=tmp_path)
        (line,) = _verdict(proc, 2, 1, f"no space left on {out}")
        assert "run the same command again" in line

        def check_outputs() -> list[str]:
            names = sorted(os.listdir(out))
            assert not [n for n in names if n.startswith(".")], names  # no temporary file left
            for name in names:
                with Image.open(out / name) as img:
                    img.load()  # raises on a truncated file
            return names

        first = check_outputs()
        assert 0 < len(first) < 60 and f"after {len(first)} written" in line
        shutil.rmtree(out)
        subprocess.run(["umount", str(full)], check=True)
        proc = _run(args, cwd=tmp_path)  # the same command, with space: finishes
        _verdict(proc, 0, 0)
        assert len(check_outputs()) == 60
        assert _fingerprint(photos) == before
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)


def test_atomic_writes_give_writers_no_descriptor_and_report_efbig(tmp_path: Path) -> None:
    """Pillow writes to a descriptor with write(2) and ignores short writes; atomic_write's handle has none, so the
    buffered writer raises instead. A file over ``ulimit -f`` (EFBIG) is a DiskFullError naming the limit."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(DiskFullError, match="ulimit -f") as caught:
            save_image(image, tmp_path / "big.png")
        with pytest.raises(DiskFullError):
            atomic_write_bytes(tmp_path / "big.bin", bytes(128 * 1024))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert caught.value.errno == errno.EFBIG and caught.value.folder == tmp_path
    assert os.listdir(tmp_path) == []  # neither a final nor a temporary file


# ---------------------------------------------------------------------------------------------------------------
# Function-level cases
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["style", "style_end"])
def test_mix_weights_are_validated_where_the_mix_is_parsed(option: str) -> None:
    for spec, message in [
        (f"{MIX_NAMES[0]}:1e308,{MIX_NAMES[1]}:1e308", "more than a number can hold"),
        (f"{MIX_NAMES[1]}:1e308,{MIX_NAMES[1]}:1e308", "more than a number can hold"),
        (f"{MIX_NAMES[0]}:inf,{MIX_NAMES[1]}:1", ">= 0"),
        (f"{MIX_NAMES[0]}:nan,{MIX_NAMES[1]}:1", ">= 0"),
        (f"{MIX_NAMES[0]}:0,{MIX_NAMES[1]}:0", "all 0"),
    ]:
        with pytest.raises(FaststyleError, match=message) as caught:
            parse_style(spec, MIX_NAMES, option=option)
        assert str(caught.value).startswith(f"{option}={spec}:")
    tiny = parse_style(f"{MIX_NAMES[0]}:5e-324,{MIX_NAMES[1]}:5e-324", MIX_NAMES, option=option)
    assert tiny.weights == (0.5, 0.5)


def test_style_end_mixes_are_quoted_for_hydra_like_style() -> None:
    from stylize import quote_style_mix

    assert quote_style_mix("style_end=a:0.3,b:0.7") == 'style_end="a:0.3,b:0.7"'
    assert quote_style_mix("suffix=a,b") == "suffix=a,b"


def _plan(corpus: Path, *overrides: str, model: str = "m", labels: list[str] | None = None):
    from inference.jobs import plan_jobs
    from stylize import compose_config

    cfg = compose_config([f"model={corpus / model / 'model.pth'}", *overrides])
    return plan_jobs(cfg, corpus / model / "model.pth", {"style_stem": "wave"}, labels)[0]


def test_output_names_keep_inputs_apart(corpus: Path, tmp_path: Path) -> None:
    """Same-stem inputs keep their extension in the name only where their outputs would collide."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("photo.gif", "photo.png", "other.jpg", "other.jpeg", "alone.jpg"):
        _photo().save(inputs / name)
    jobs = _plan(corpus, f"input={inputs}", f"output={tmp_path / 'out'}")
    names = sorted(job.target.name for job in jobs)
    assert names == ["alone_wave.jpg", "other_jpeg_wave.jpg", "other_jpg_wave.jpg", "photo_gif_wave.png",
                     "photo_png_wave.png"]  # fmt: skip
    plain = _plan(corpus, f"input={corpus / 'same'}", f"output={tmp_path / 'out'}")
    assert sorted(job.target.name for job in plain) == ["photo_wave.jpg", "photo_wave.png"]  # no collision
    styles = _plan(corpus, f"input={corpus / 'same'}", f"output={tmp_path / 'o'}", labels=["wave", "wave"])
    assert len({job.target for job in styles}) == 4


def test_a_collision_left_after_renaming_names_both_inputs(corpus: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "a.gif", "a_png.png"):  # a.png becomes a_png_wave.png, which is a_png.png's plain name
        _photo().save(inputs / name)
    with pytest.raises(FaststyleError, match=r"a\.png and .*a_png\.png would both be written to"):
        _plan(corpus, f"input={inputs}", f"output={tmp_path / 'out'}")


def test_inputs_that_are_not_regular_files_say_what_they_are(corpus: Path, tmp_path: Path) -> None:
    from inference.jobs import find_inputs

    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    for path, words in [
        (corpus / "in" / "fifo.jpg", "a named pipe (FIFO)"),
        (corpus / "in" / "zero.jpg", "a character device (a symbolic link to /dev/zero)"),
        (tmp_path / "loop.jpg", "a broken symbolic link (a loop)"),
        (tmp_path / "broken.jpg", "a broken symbolic link (to "),
    ]:
        assert file_kind(path).startswith(words)
        with pytest.raises(FaststyleError, match=words.replace("(", r"\(").replace(")", r"\)")):
            find_inputs(str(path), recursive=False)


def test_an_mp4_cut_anywhere_says_it_is_incomplete(corpus: Path, tmp_path: Path) -> None:
    from data.video import VideoReader

    data = (corpus / "in" / "clip.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    for length in range(0, data.index(b"moov") + 100, 37):  # up to inside the index, which is written last
        cut.write_bytes(data[:length])
        with pytest.raises(FaststyleError, match="cut short"):
            VideoReader(cut).close()


def test_images_decode_only_in_the_listed_formats(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(FaststyleError, match="ICO files are not read"):
        load_image(corpus / "in" / "icon.ico")
    renamed = tmp_path / "icon.png"
    renamed.write_bytes((corpus / "in" / "icon.ico").read_bytes())
    with pytest.raises(FaststyleError, match="faststyle reads JPEG, PNG"):
        load_image(renamed)
    eps = tmp_path / "page.jpg"  # an EPS file named like a photo: never handed to Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(FaststyleError, match="cannot identify"):
        load_image(eps)
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):  # Pillow alone refuses it
        Image.open(corpus / "in" / "bigtext.png").load()
    assert load_image(corpus / "in" / "bigtext.png").size == (48, 36)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the header is over 89 MP on purpose
def test_memory_is_estimated_before_decoding(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inference.memory
    import inference.runner as runner
    from inference.jobs import Job

    monkeypatch.setattr(inference.memory, "host_memory_available", lambda: 2**30)
    job = Job(corpus / "in" / "good.jpg", corpus / "unused.jpg")
    loaded = runner.load_job(job, None, 16.0, lambda h, w: 0.0)  # 768 x 576: 1.7 MB + 36 x 48
    assert loaded.error is None
    bomb = runner.load_job(Job(corpus / "big" / "bomb.png", corpus / "unused.png"), None, 4.0, lambda h, w: 2.0**30)
    assert bomb.error.startswith("stylizing bomb.png at 48000x48000 needs about 10.1 GiB of memory (9.1 GiB")
    assert "but 1.0 GiB is available: set a smaller scale or max_side_px=" in bomb.error
    assert "a smaller max_memory_mb" not in bomb.error
