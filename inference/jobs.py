"""What a stylize run will do before any pixel is read: the input files, and the output path of each.

Inputs are a file, a folder (optionally recursive) or a glob, holding images and videos; a video gets a video output
in its own container (``format=`` is an image option). Every output is refused before anything is written when it
would replace an input (real paths and file identities compared) or land among the inputs.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from core.cli import absolute_user_path
from core.errors import FaststyleError
from core.fileio import SameFiles, file_kind
from data.io import (
    ALPHA_FORMATS,
    IMAGE_EXTENSIONS,
    OUTPUT_FORMATS,
    WRITE_FORMATS,
    file_has_alpha,
    is_image_file,
    walk_images,
)
from data.video import VIDEO_CONTAINERS, VIDEO_EXTENSIONS, is_video_file

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One input image and where its result goes; ``style``: which of the run's style choices (multi-style models,
    see inference.pipeline) it is stylized in."""

    source: Path
    target: Path
    style: int = 0

    @property
    def is_video(self) -> bool:
        """A video job (data.video) rather than an image: decided by the input's extension."""
        return is_video_file(self.source)


def is_media_file(path: str | os.PathLike) -> bool:
    """An image or a video by its extension: what folders and globs take as inputs."""
    return is_image_file(path) or is_video_file(path)


def find_inputs(input_spec: str, recursive: bool) -> tuple[list[Path], Path, list[tuple[Path, str]]]:
    """The files named by ``input_spec`` (file, folder, or glob), the base folder output names mirror, and the
    entries that were passed over, with the reason (folders named like images, broken links, ...).

    Folder and glob inputs take every file with an image or a video extension (data.io.IMAGE_EXTENSIONS,
    data.video.VIDEO_EXTENSIONS, the same formats a single file is read in); a file that turns out to be corrupt or
    in an unsupported format fails later, when it is decoded, and is reported. A single file is taken whatever its
    name (a video by its extension, anything else as an image).
    """
    path = absolute_user_path(input_spec)
    if path.is_file():
        return [path], path.parent, []
    if path.is_dir():
        files, skipped = walk_images(path, recursive=recursive, extensions=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        if not files:
            hint = "" if recursive else " (add recursive=true to look in sub-folders)"
            raise FaststyleError(f"no image files or videos in folder {path}{hint}")
        return files, path, skipped
    kind = file_kind(path)
    if kind != "missing":  # a FIFO, a device, a socket, a broken link: never opened (a FIFO would block)
        fix = "point it at an image or a folder" if "symbolic link" in kind else "give an image or video file"
        raise FaststyleError(f"input {path} is {kind}, not a regular file: {fix}")
    if glob.has_magic(str(input_spec)):
        files, skipped = [], []
        for match in sorted(glob.glob(str(path), recursive=recursive)):
            entry = absolute_user_path(match)
            if not is_media_file(entry):
                continue
            if entry.is_file():
                files.append(entry)
            else:
                skipped.append((entry, "a folder, not an image file" if entry.is_dir() else "not a readable file"))
        if not files:
            raise FaststyleError(f"the pattern {input_spec!r} matches no image files or videos: check it (quote it)")
        return files, Path(os.path.commonpath([str(f.parent) for f in files])), skipped
    raise FaststyleError(f"input not found: {path} (give an image or video file, a folder or a glob pattern)")


def style_name(model_path: Path, meta: dict) -> str:
    """The name added to output files: the style the model was trained on, else the model file's name."""
    stem = meta.get("style_stem") or (Path(str(meta["style"])).stem if meta.get("style") else "")
    if not stem:
        stem = model_path.parent.name if model_path.stem == "model" else model_path.stem
    return file_name_part(stem)


def file_name_part(text: str) -> str:
    """``text`` made safe inside a file name: characters other than letters, digits, ``-_.`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)).strip(".") or "stylized"


def _output_is_file(output: Path) -> bool:
    """An output path with an image or video extension names a file (unless such a folder exists); else it is a
    folder."""
    return (output.suffix.lower() in WRITE_FORMATS or is_media_file(output)) and not output.is_dir()


def output_location(cfg: DictConfig, model_path: Path) -> tuple[Path, bool]:
    """Where the outputs go, and whether that is one file (else a folder): ``output=``, or ``<model dir>/stylized/``.
    A trailing ``/`` always names a folder (``output=x.jpg/``)."""
    if not cfg.output:
        return model_path.parent / "stylized", False
    text = str(cfg.output)
    output = absolute_user_path(text)
    names_folder = text.endswith(("/", os.sep)) or text.endswith(("/.", os.sep + "."))
    return output, not names_folder and _output_is_file(output)


def _check_output_folder(output: Path, single_file: bool, text: str) -> None:
    """FaststyleError when the output folder (``output``, or its parent for a file output), or the first of its
    parents that exists, is something other than a folder: an existing file, /dev/null or a FIFO would otherwise
    fail every image with "[Errno 17] File exists"."""
    folder = output.parent if single_file else output
    probe = folder
    while True:
        kind = file_kind(probe)
        if kind == "a folder":
            return
        if kind != "missing":
            if probe == output:
                raise FaststyleError(
                    f"output={text} is {kind}, not a folder: give a folder for the outputs (or, for one input, an "
                    "image file name)"
                )
            raise FaststyleError(f"output={text} cannot be made: {probe} is {kind}, not a folder: choose another path")
        if probe.parent == probe:
            return
        probe = probe.parent


def plan_jobs(
    cfg: DictConfig, model_path: Path, meta: dict, style_labels: list[str] | None = None
) -> tuple[list[Job], list[tuple[Path, str]]]:
    """Match every input to its output path and return the jobs and the passed-over entries (see find_inputs).

    ``style_labels``: the styles or mixes of a multi-style model to write, each input once per label (style by
    style: ``<stem>_<label>.<ext>``, or ``<stem>_<suffix>_<label>.<ext>`` with a suffix); None for one style.

    Refuses, before anything is written, any output that is an input or sits among the inputs, comparing real
    paths (symbolic links resolved) and file identities (hard links): ``overwrite=true`` never applies to an input.
    """
    files, base, skipped = find_inputs(str(cfg.input), bool(cfg.recursive))
    names = _output_names(cfg, model_path, meta, style_labels)
    forced_ext = None
    if cfg.format:
        forced_ext = OUTPUT_FORMATS.get(str(cfg.format).lower().lstrip("."))
        if forced_ext is None:
            raise FaststyleError(f"format={cfg.format} is not supported: use one of {', '.join(OUTPUT_FORMATS)}")

    def ext_for(source: Path) -> str:
        ext = source.suffix.lower()
        if is_video_file(source):
            return ext  # the same container (format= is for images)
        if forced_ext:
            return forced_ext
        return OUTPUT_FORMATS.get(ext.lstrip("."), ".png")

    output, single_file = output_location(cfg, model_path)
    _check_output_folder(output, single_file, str(cfg.output or output))
    real_output = Path(os.path.realpath(output))
    # Earlier results inside an input tree must not be stylized again (recursive folders, broad globs).
    real_base = Path(os.path.realpath(base))
    files = [f for f in files if real_output == real_base or real_output not in Path(os.path.realpath(f)).parents]
    if not files:
        raise FaststyleError(f"every input image is inside the output folder {output}: choose another output")
    if single_file:
        jobs = [_single_file_job(cfg, output, files, names)]
    else:
        jobs = [
            Job(f, output / f.relative_to(base).parent / f"{f.stem}_{name}{ext_for(f)}", style=index)
            for index, name in enumerate(names)
            for f in files
        ]
    _keep_alpha(jobs)
    _name_apart(jobs)
    _refuse_outputs_among_inputs(jobs, files, single_file=single_file)
    return jobs, skipped


def _output_names(cfg: DictConfig, model_path: Path, meta: dict, style_labels: list[str] | None) -> list[str]:
    """The part of the output names after the input's stem, one per style written (plan_jobs)."""
    if style_labels is None:
        return [str(cfg.suffix) if cfg.suffix else style_name(model_path, meta)]
    if len(style_labels) == 1 and cfg.suffix:
        return [str(cfg.suffix)]
    labels = [file_name_part(label) for label in style_labels]
    # Two styles of one name (a hand-made model, or names that differ only in characters file names cannot
    # hold) get their index too: the index is what style= takes to pick one of them.
    labels = [f"{label}_{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    return [f"{cfg.suffix}_{label}" if cfg.suffix else label for label in labels]


def _single_file_job(cfg: DictConfig, output: Path, files: list[Path], names: list[str]) -> Job:
    """The one job of an ``output=`` that names a file: one input, one style, a format that file can hold."""
    if len(files) != 1:
        raise FaststyleError(
            f"output={cfg.output} is a file but {len(files)} images were found: give a folder (a trailing / "
            "makes any name a folder)"
        )
    if len(names) != 1:
        raise FaststyleError(
            f"output={cfg.output} is a file but the model writes {len(names)} styles: pick one with "
            "style=<name> or give an output folder"
        )
    if is_video_file(files[0]):
        if output.suffix.lower() not in VIDEO_CONTAINERS:
            raise FaststyleError(
                f"cannot write the video {files[0].name} to {output.name}: give a video output "
                f"({', '.join(VIDEO_EXTENSIONS)}) or a folder"
            )
    elif output.suffix.lower() not in WRITE_FORMATS:
        raise FaststyleError(
            f"cannot write {output.name}: use a {', '.join(sorted(set(OUTPUT_FORMATS.values())))} output"
        )
    return Job(files[0], output)


def _keep_alpha(jobs: list[Job]) -> None:
    """Images with transparency bound for a format without alpha are written as PNG instead (jobs changed in
    place)."""
    for job in jobs:
        if job.is_video:
            continue
        if WRITE_FORMATS[job.target.suffix.lower()] not in ALPHA_FORMATS and file_has_alpha(job.source):
            # JPEG cannot hold transparency: keep it (the user's data) in a PNG rather than flatten it, and say so.
            new_target = job.target.with_suffix(".png")
            logger.warning(
                "%s has transparency, which JPEG cannot hold: writing %s instead", job.source, new_target.name
            )
            job.target = new_target


def _name_apart(jobs: list[Job]) -> None:
    """Inputs of one stem in one folder (photo.jpg and photo.png, whose outputs share a format or where one is a
    GIF written as PNG) keep their own extension in the output name: photo_jpg_<style>.png, photo_png_<style>.png.
    Outputs that do not collide keep the plain <stem>_<style>.<ext>. FaststyleError, naming both inputs, for a
    collision left after that (an input named like another's renamed output)."""
    by_target: dict[Path, list[Job]] = {}
    for job in jobs:
        by_target.setdefault(job.target, []).append(job)
    for same in by_target.values():
        if len(same) > 1 and len({job.source for job in same}) == len(same):
            for job in same:
                stem, ext = job.source.stem, job.source.suffix.lstrip(".") or "file"
                job.target = job.target.with_name(f"{stem}_{ext}{job.target.name[len(stem) :]}")
    seen: dict[Path, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.target, job)
        if other is not job:
            raise FaststyleError(
                f"{other.source} and {job.source} would both be written to {job.target}: rename one of them or "
                "stylize them separately"
            )


def _refuse_outputs_among_inputs(jobs: list[Job], files: list[Path], single_file: bool) -> None:
    """FaststyleError when an output would replace an input (also through a symbolic or hard link) or, for folder
    outputs, land in a folder that holds inputs."""
    inputs = SameFiles(files)
    input_dirs = {os.path.dirname(os.path.realpath(f)) for f in files}
    for job in jobs:
        source = inputs.find(job.target)
        if source is not None:
            link = "" if str(job.target) == str(source) else f" (the same file as input {source})"
            kind = "video" if job.is_video else "image"
            raise FaststyleError(
                f"output {job.target}{link} is an input {kind}: choose another output; "
                "overwrite=true never replaces an input"
            )
        if not single_file and os.path.dirname(os.path.realpath(job.target)) in input_dirs:
            raise FaststyleError(
                f"output folder {job.target.parent} would put results among the input images: "
                "choose another output folder"
            )
