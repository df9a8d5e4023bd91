"""Web page out: a TransformerNet as a self-contained static folder that stylizes photos in a browser.

The folder holds the page (index.html, app.mjs, pixels.mjs, style.css: the sources in interop/webpage/), the
network as ONNX (``model.onnx``, dynamic size, exported by interop/onnx_export.py; its weights stored in float16 by
default, half the download, computed in float32: :func:`store_weights_fp16`), ``model.json`` (style
names, input names, smallest side, runtime version: what the page needs before it loads the model) and the browser
runtime under ``ort/``: onnxruntime-web's WebGPU bundle, whose WebAssembly build runs the WebGPU execution provider
and the CPU one, so one set of files serves both backends. The runtime is copied from ``web/node_modules`` (``make
web-deps`` installs it from web/package-lock.json): nothing is fetched from elsewhere when the page loads, so the
folder works offline, from ``python -m http.server`` or any static host.

The page computes what stylize.py computes (same mix normalisation, colour preservation, strength and 8-bit
rounding: pixels.mjs, tested against the Python functions).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from core.errors import FaststyleError
from core.fileio import atomic_output, new_dir_mode
from interop.exportable import MIN_SIDE
from interop.onnx_export import DEFAULT_OPSET, ONNX_INPUT_NAME, ONNX_OUTPUT_NAME, export_onnx
from models.modelfile import ONNX_STYLE_INPUT_NAME
from models.styles import style_names
from models.transformer import TransformerNet

log = logging.getLogger(__name__)

WEB_FORMAT = "faststyle-web"
PAGE_DIR = Path(__file__).resolve().parent / "webpage"
PAGE_FILES = ("index.html", "app.mjs", "pixels.mjs", "style.css")
MODEL_FILE = "model.onnx"
INFO_FILE = "model.json"
RUNTIME_SUBDIR = "ort"
RUNTIME_PACKAGE = "onnxruntime-web"
# The WebGPU bundle and the one WebAssembly build it loads (it holds both execution providers); the other builds in
# the package (plain wasm, JSEP, JSPI, WebGL) are not loaded by the page and are left out.
RUNTIME_FILES = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
DEFAULT_MAX_SIDE_PX = 512
RUNTIME_HINT = "run `make web-deps` in the faststyle checkout (npm ci in web/)"


def default_runtime_dir() -> Path:
    """Where ``make web-deps`` installs onnxruntime-web: web/node_modules/onnxruntime-web in the checkout."""
    return Path(__file__).resolve().parents[1] / "web" / "node_modules" / RUNTIME_PACKAGE


def runtime_files(runtime_dir: Path | None = None) -> tuple[str, list[Path]]:
    """The runtime's version and the files the page loads; FaststyleError (one line) when any is missing."""
    runtime_dir = Path(runtime_dir or default_runtime_dir())
    files = [runtime_dir / "dist" / name for name in RUNTIME_FILES]
    missing = [f.name for f in files if not f.is_file()]
    package = runtime_dir / "package.json"
    if missing or not package.is_file():
        raise FaststyleError(
            f"the web export needs {RUNTIME_PACKAGE} in {runtime_dir} ({', '.join(missing) or 'package.json'} "
            f"missing): {RUNTIME_HINT}"
        )
    version = json.loads(package.read_text(encoding="utf-8")).get("version", "unknown")
    return str(version), files


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """A new or empty folder, or (``overwrite``) an existing folder whose page files are replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FaststyleError(f"{out_dir} is a file: the web export writes a folder, give a folder name")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FaststyleError(f"{out_dir} exists and is not empty: pass --overwrite (its page files are replaced)")


WEIGHTS = ("fp16", "fp32")
"""How model.onnx stores its weights: fp16 (the default: half the file; every runtime takes it, since the graph
casts them back to float32 and computes in float32) or fp32 (bit for bit the trained weights)."""


def store_weights_fp16(path: Path) -> int:
    """Rewrite the ONNX file ``path`` so that its float32 weights are stored as float16, each followed by a Cast back
    to float32 under its old name: the graph computes exactly as before, on weights rounded to float16 (what
    :func:`fp16_weight_twin` gives in PyTorch). A tensor that float16 cannot hold (beyond its range, or a nonzero
    value that would round to 0) stays float32. Returns how many tensors were converted."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts, converted = [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.isfinite(half).all() or ((half == 0) & (values != 0)).any():
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
        converted += 1
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return converted


def fp16_weight_twin(net: TransformerNet) -> TransformerNet:
    """A copy of ``net`` whose float32 parameters and buffers are rounded to float16 and back: what a model.onnx with
    float16 weights computes (``--verify`` compares against it)."""
    import copy

    import torch

    twin = copy.deepcopy(net)
    with torch.no_grad():
        for tensor in [*twin.parameters(), *twin.buffers()]:
            if tensor.dtype == torch.float32:
                rounded = tensor.half().float()
                if torch.isfinite(rounded).all() and not ((rounded == 0) & (tensor != 0)).any():
                    tensor.copy_(rounded)
    return twin


def page_info(
    net: TransformerNet, meta: dict[str, Any], model_bytes: int, runtime_version: str, weights: str = "fp16"
) -> dict[str, Any]:
    """model.json: what the page reads before it loads the network."""
    num_styles = net.num_styles
    if num_styles > 1:
        names = style_names(meta, num_styles)
    else:
        # our one-style files name their style image; a pytorch/examples file is named after its style (mosaic.pth)
        named = meta.get("style") or meta.get("source_file") or "style"
        names = [str(meta.get("style_stem") or Path(str(named)).stem)]
    return {
        "format": WEB_FORMAT,
        "format_version": 1,
        "model": MODEL_FILE,
        "model_bytes": model_bytes,
        "weights": weights,
        "precision": "fp32",
        "input": ONNX_INPUT_NAME,
        "style_input": ONNX_STYLE_INPUT_NAME if num_styles > 1 else None,
        "output": ONNX_OUTPUT_NAME,
        "styles": names,
        "min_side": MIN_SIDE,
        "default_max_side_px": DEFAULT_MAX_SIDE_PX,
        "runtime": {
            "package": RUNTIME_PACKAGE,
            "version": runtime_version,
            "module": f"{RUNTIME_SUBDIR}/{RUNTIME_FILES[0]}",
        },
        "model_config": net.config(),
    }


def export_web(
    net: TransformerNet,
    out_dir: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    runtime_dir: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    weights: str = "fp16",
) -> Path:
    """Write the static page folder ``out_dir`` for ``net`` (see the module docstring) and return it.

    A new folder appears whole or not at all (it is built beside it and renamed); an existing non-empty one is
    refused unless ``overwrite``, which replaces the files the export writes and leaves any others. Raises
    FaststyleError (one line) when the runtime is not installed (before any work) or the folder is refused.
    """
    out_dir = Path(out_dir)
    meta = dict(meta or {})
    version, runtime = runtime_files(Path(runtime_dir) if runtime_dir else None)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        # mkdtemp makes the folder private (0700); the page's folder is for serving, so it gets the user's umask.
        build.chmod(new_dir_mode())
        export_onnx(net, build / MODEL_FILE, opset=opset, meta=meta)
        if weights == "fp16":
            store_weights_fp16(build / MODEL_FILE)
        info = page_info(net, meta, (build / MODEL_FILE).stat().st_size, version, weights)
        (build / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in PAGE_FILES:
            shutil.copyfile(PAGE_DIR / name, build / name)
        (build / RUNTIME_SUBDIR).mkdir()
        for path in runtime:
            shutil.copyfile(path, build / RUNTIME_SUBDIR / path.name)
        _move_into_place(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log.info("wrote %s (%s %s, %d style(s))", out_dir, RUNTIME_PACKAGE, version, net.num_styles)
    return out_dir


class _PageHandler(SimpleHTTPRequestHandler):
    """Serves files quietly; with ``isolated`` the two headers that make the page cross-origin isolated, which
    browsers require before WebAssembly may use threads (SharedArrayBuffer)."""

    isolated = False

    def end_headers(self) -> None:
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        pass


@contextlib.contextmanager
def serve_folder(root: str | os.PathLike, isolated: bool = False) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port) from a thread for the block; yields its base URL. For the browser
    tests and the web benchmark; ``isolated``: with the headers WebAssembly threads need (``python -m
    http.server`` sends none, so a page served by it runs one thread)."""
    handler = type("Handler", (_PageHandler,), {"isolated": isolated})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _move_into_place(build: Path, out_dir: Path) -> None:
    """Rename the finished folder to ``out_dir``; into an existing folder, replace each file atomically."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(build, out_dir)
        return
    for source in sorted(p for p in build.rglob("*") if p.is_file()):
        target = out_dir / source.relative_to(build)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(target) as tmp:
            shutil.copyfile(source, tmp)
