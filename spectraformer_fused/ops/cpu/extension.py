"""The binding of the compiled CPU backend: how ``csrc/`` is built, cached and loaded once per process.

The extension is compiled with ``torch.utils.cpp_extension`` (needs a C++ compiler and ninja) into the
build cache of ``build_cache.py`` (``~/.cache/spectraformer_fused/<name>-<key>``, the key a hash of the
sources, torch, Python, compiler flags and CPU), either ahead of time (``python -m
spectraformer_fused.build``) or on the first call that needs it, which then prints a one-line notice on
stderr (once per process) before compiling. Later processes load the cached binary without compiling.
The sources come from the copy shipped inside the package (``spectraformer_fused/csrc``) or, in a source
checkout, from the top-level ``csrc/``. A machine without a compiler still imports the package:
``extension_available()`` then warns once, naming the fix, and returns False.
SPECTRAFORMER_FUSED_NO_CPU_EXT=1 skips the extension altogether.

``ops.cpu.attention`` (plain attention) and ``ops.cpu.window`` (the hybrid) both call through here; neither imports
the other's module back.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from . import build_cache

EXTENSION_NAME = "spectraformer_fused_cpu"
_SOURCES = ("rf_attention.cpp", "rf_backward.cpp")
# rf_window.cpp (the hybrid window) and rf_cache.cpp (the exact cache's fold) are #included by
# rf_attention.cpp, rf_window_bwd.cpp (the window's backward) by rf_backward.cpp: one translation unit each,
# their helpers shared.
_HEADERS = ("rf_kernels.h", "rf_backward.h", "rf_window.cpp", "rf_window_bwd.cpp", "rf_cache.cpp")
# -fopenmp: at::parallel_for is OpenMP-based in torch's CPU builds (and serial without it); the OpenMP
# runtime already loaded by torch is reused, so torch.set_num_threads applies.
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
_LDFLAGS = ("-fopenmp",)
SKIP_ENV = "SPECTRAFORMER_FUSED_NO_CPU_EXT"
NOTICE = (
    "spectraformer_fused: compiling the CPU backend (C++ extension {name}; not yet built for these "
    "sources, this torch, Python and CPU), which takes 30 s to a few minutes, into {{dir}}. "
    "Build it ahead of time with `python -m spectraformer_fused.build`; "
    "skip it with {skip}=1."
).format(name=EXTENSION_NAME, skip=SKIP_ENV)

_lock = threading.Lock()
_module = None
_error: str | None = None
_warned = False


def _source_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent.parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES + _HEADERS):
            return candidate
    return None


def _disabled() -> bool:
    return os.environ.get(SKIP_ENV, "0") not in ("", "0")


def extension_spec() -> build_cache.ExtensionSpec | None:
    """What the extension is built from, or None when its sources are missing from this installation."""
    src = _source_dir()
    if src is None:
        return None
    return build_cache.ExtensionSpec(EXTENSION_NAME, src, _SOURCES, _HEADERS, _CFLAGS, _LDFLAGS)


def _build(force: bool = False):
    """The extension module: loaded from the build cache, or compiled into it (after the notice)."""
    spec = extension_spec()
    if spec is None:
        raise FileNotFoundError("the C++ sources (csrc/rf_attention.cpp) are missing from this installation")
    verbose = os.environ.get("SPECTRAFORMER_FUSED_VERBOSE_BUILD", "0") not in ("", "0")
    return build_cache.build(spec, force=force, notice=NOTICE, verbose=verbose)


def _load(build: bool = True):
    """The extension module, loaded (``build``: or built) once per process; None when that failed, or,
    without ``build``, when the cache holds no built binary."""
    global _module, _error, _warned
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is None and _error is None and _disabled():
            _error = f"disabled by {SKIP_ENV}"
            _warned = True
        if _module is None and _error is None and not build:
            spec = extension_spec()
            _module = None if spec is None else build_cache.load_cached(spec)
            return _module
        if _module is None and _error is None:
            try:
                _module = _build()
            except Exception as exc:  # compiler, ninja or headers missing: fall back, do not break import
                _error = f"{type(exc).__name__}: {exc}".strip()
        if _error is not None and not _warned:
            _warned = True
            warnings.warn(
                "spectraformer_fused: the compiled CPU backend could not be built, so backend='auto' uses the "
                "reference backend on the CPU. To enable it, install a C++ compiler (g++) and ninja "
                f"(pip install ninja), and make the build cache {build_cache.cache_root()} writable (or set "
                f"{build_cache.CACHE_ENV}). Error: {_error.splitlines()[0] if _error else ''}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module


def extension_available() -> bool:
    """True when the compiled CPU extension is loaded; builds it if needed (tries once per process)."""
    return _load() is not None


def extension_built() -> bool:
    """True when the extension is loaded or loads from the build cache; never compiles."""
    return _load(build=False) is not None


def extension_error() -> str:
    """Why the extension did not load ("" when it did, or when no attempt was made yet)."""
    return _error or ""


def extension_status() -> str:
    """Where the extension stands, without compiling anything: "loaded" (in this process), "built" (in the
    build cache, loaded on first use), "buildable" (compiled on first use, or by ``python -m
    spectraformer_fused.build``), or "unavailable: <reason>"."""
    if _module is not None:
        return "loaded"
    if _error is not None:
        return f"unavailable: {_error.splitlines()[0] if _error else ''}"
    if _disabled():
        return f"unavailable: disabled by {SKIP_ENV}"
    spec = extension_spec()
    if spec is None:
        return "unavailable: the C++ sources (csrc/rf_attention.cpp) are missing from this installation"
    if build_cache.is_built(spec):
        return "built"
    missing = build_cache.missing_tools()
    if missing:
        return f"unavailable: {' and '.join(missing)} not found"
    return "buildable"


_wt_cache: tuple | None = None  # (key, W, WT): the last W seen and its transposed fp32 copy


def _transposed(W: torch.Tensor) -> torch.Tensor:
    """W ``[H, m, D]`` as a contiguous fp32 ``[H, D, m]``, cached for the last W seen, so that decode
    steps reusing one W do not transpose it every token. The key holds the storage address, the view
    and the version counter (bumped by in-place updates); the cache keeps a reference to W, so that
    storage cannot be freed and reused by another tensor while the entry lives."""
    global _wt_cache
    entry = _wt_cache
    if entry is not None and entry[1] is W and entry[0][-1] == W._version:  # the feature map's kept W
        return entry[2]
    key = (W.untyped_storage().data_ptr(), W.storage_offset(), tuple(W.shape), tuple(W.stride()), W.dtype, W._version)
    if entry is not None and entry[0] == key:
        return entry[2]
    WT = W.detach().to(torch.float32).transpose(1, 2).contiguous()
    _wt_cache = (key, W, WT)
    return WT
