"""Building and loading the fused C++ CPU kernels of models/kernels/: a kernel's name -> its ops registered in
``torch.ops``, or one warning and the layer's own PyTorch-op path.

A kernel ``NAME`` is the source ``models/kernels/NAME.cpp``, which registers its ops with ``TORCH_LIBRARY``. It is
compiled on first use with torch.utils.cpp_extension (``-O3 -march=native -fopenmp``) into torch's extension
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under the extension name
``NAME_kernel_<cpu tag>``, and later runs load the cached library. :func:`load_kernel` decides once per process and
kernel whether its layer may call the ops:

- the kernel's switch variable set to ``0`` (e.g. ``FASTSTYLE_NORM_KERNEL=0``): not built, one INFO line (an
  explicit choice, to compare against or debug the PyTorch-op path);
- no C++ compiler or no ninja, or a failed compile or load: ONE warning naming the cause and the fallback;
- otherwise built (or reused) and loaded; a build worth the wait gets an INFO line, a cached load a DEBUG one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from core.device import cpu_flags

KERNEL_DIR = Path(__file__).resolve().parent
"""Where the kernels' C++ sources live (package data: pyproject.toml ships them with the package)."""

_COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_LINK_FLAGS = ["-fopenmp"]


@dataclass(frozen=True)
class FusedKernel:
    """One fused CPU kernel and what its layer does without it.

    ``name``: the source ``<name>.cpp`` in ``source_dir`` and the extension ``<name>_kernel_<cpu tag>``;
    ``layer``: the layer it serves, as the messages name it ("InstanceNorm"); ``switch``: the environment variable
    that turns it off with ``0``; ``fallback``: what runs instead ("the eager path"), and ``fallback_cost``: how much
    slower that is (for the warning); ``log_as``: the logger the messages go to (the layer's module, so the
    warning is filed under the layer that falls back).
    """

    name: str
    layer: str
    switch: str
    fallback: str
    fallback_cost: str
    log_as: str
    source_dir: Path = KERNEL_DIR

    @property
    def source(self) -> Path:
        return self.source_dir / f"{self.name}.cpp"


_loaded: dict[str, bool] = {}
"""Per kernel name, decided in this process: True when its ops are registered, False when its layer falls back."""


def load_kernel(kernel: FusedKernel) -> bool:
    """True when ``kernel``'s ops are registered in ``torch.ops`` (building them on first use); False, after one
    message the first time, when its layer must use its PyTorch-op path instead. Decided once per process."""
    state = _loaded.get(kernel.name)
    if state is None:
        state = _loaded[kernel.name] = _try_load(kernel)
    return state


def _try_load(kernel: FusedKernel) -> bool:
    log = logging.getLogger(kernel.log_as)
    if os.environ.get(kernel.switch, "1") == "0":
        # an explicit opt-out (to compare against, or to debug, the fallback): said at INFO, not a failure
        log.info("fused %s CPU kernel disabled by %s=0: using %s", kernel.layer, kernel.switch, kernel.fallback)
        return False
    cause = missing_build_tool()
    if cause is None:
        try:
            _build_and_load(kernel, log)
            return True
        except Exception as exc:  # noqa: BLE001  (any build/load failure: fall back, loudly, below)
            cause = f"{type(exc).__name__}: {_failure_cause(exc)}"
    log.warning(
        "%s: could not build the fused CPU kernel %s (%s); falling back to %s, which is %s",
        kernel.layer,
        kernel.source.name,
        cause,
        kernel.fallback,
        kernel.fallback_cost,
    )
    return False


def cpu_tag() -> str:
    """A short hash of the CPU's instruction-set flags: the kernels are built with -march=native, so a home directory
    shared between different machines must not reuse a build made for another CPU."""
    flags = cpu_flags()
    described = " ".join(flags) if flags is not None else platform.processor()
    return hashlib.sha1(f"{platform.machine()} {described}".encode()).hexdigest()[:8]


def _failure_cause(exc: BaseException) -> str:
    """One line saying why the build failed: the first compiler 'error' line if there is one, else the message."""
    text = str(exc)
    for line in text.splitlines():
        if "error" in line.lower() and "Error building extension" not in line:
            return line.strip()[:300]
    return (text.splitlines() or [type(exc).__name__])[0].strip()[:300]


def missing_build_tool() -> str | None:
    """Why the kernels cannot be built here (no C++ compiler, no ninja), or None when the tools are there.

    cpp_extension runs ``ninja`` from PATH; the pip package (requirements.txt) installs it into the virtual
    environment's bin directory, which is not on PATH when the venv is not activated (``.venv/bin/python``), so that
    directory is added to PATH here.
    """
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler (c++/g++/clang++) on PATH"
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja

        bin_dir = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        bin_dir = ""
    if bin_dir and shutil.which("ninja", path=bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return None
    return "the ninja build tool is not installed (pip install ninja)"


def _build_and_load(kernel: FusedKernel, log: logging.Logger) -> None:
    """Compile ``kernel``'s source (or reuse the cached build) and load it, registering its ops; raises on any
    failure. The build is named after the CPU (:func:`cpu_tag`) because it targets that CPU's instruction set."""
    name = f"{kernel.name}_kernel_{cpu_tag()}"
    # Importing cpp_extension logs a CUDA_HOME warning on CPU-only machines: irrelevant for these CPU kernels.
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        ext_log.setLevel(level)
    start = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(kernel.source)],
        extra_cflags=list(_COMPILE_FLAGS),
        extra_ldflags=list(_LINK_FLAGS),
        is_python_module=False,
        verbose=False,
    )
    seconds = time.perf_counter() - start
    # a build (first use) is worth a line on the console; loading the cached library on every run is not
    log.log(
        logging.INFO if seconds > 1.0 else logging.DEBUG,
        "fused %s CPU kernel %s ready in %.1f s",
        kernel.layer,
        name,
        seconds,
    )
