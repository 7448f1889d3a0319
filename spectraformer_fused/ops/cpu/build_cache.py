"""A build cache for compiled extensions: one directory per combination of what the binary depends on.

``torch.utils.cpp_extension.load`` keys its build directory by the extension's name only, and rebuilds
whenever the command line changes; the command line holds the source paths, so two installations of the
same sources (a venv and an editable checkout, say) evict each other's build. Here the directory is
``<cache root>/<name>-<key>``, the key a hash of

* the contents of the sources and headers (not their location),
* the torch version and its C++ ABI, the Python version and ABI (the extension-module suffix), the
  platform,
* the compiler (``$CXX``) and the compile and link flags, and, for ``-march=native`` builds, the CPU
  (its model and instruction-set flags), so that a cache in a home directory shared between machines
  never hands one CPU a binary built for another.

Identical inputs share one directory, wherever they are installed; different inputs never share one.
The sources are copied into ``<dir>/src`` and compiled from there, so the build files do not depend on
where the package lives either. A finished build leaves ``built.json`` (written last, atomically); a
directory holding it is loaded straight away, without running the compiler or ninja. Concurrent builds
of one directory are serialised by torch's lock file (``<dir>/lock``): the second process waits and
loads what the first built.

The cache root is ``$SPECTRAFORMER_FUSED_CACHE_DIR`` when set, otherwise
``$XDG_CACHE_HOME/spectraformer_fused`` (``~/.cache/spectraformer_fused``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "SPECTRAFORMER_FUSED_CACHE_DIR"
KEY_VERSION = 1  # bump when the layout of a build directory or the key's recipe changes
MARKER = "built.json"
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"

_lock = threading.RLock()
_noticed: set[str] = set()  # extension names whose build notice this process already printed


@dataclass(frozen=True)
class ExtensionSpec:
    """What a compiled extension is built from: its module name, the directory holding its files, the
    files compiled (``sources``) and included (``headers``), and the compile and link flags."""

    name: str
    source_dir: Path
    sources: tuple[str, ...]
    headers: tuple[str, ...] = ()
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()


def cache_root() -> Path:
    """``$SPECTRAFORMER_FUSED_CACHE_DIR``, else ``$XDG_CACHE_HOME/spectraformer_fused``, else
    ``~/.cache/spectraformer_fused``."""
    env = os.environ.get(CACHE_ENV, "")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "spectraformer_fused"


def _cpu_fingerprint() -> str:
    """The CPU model and its instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            wanted = {}
            for line in f:
                field, _, value = line.partition(":")
                field = field.strip()
                if field in ("vendor_id", "model name", "flags", "Features", "CPU part") and field not in wanted:
                    wanted[field] = value.strip()
                if not line.strip() and wanted:  # the first processor's block is enough
                    break
        if wanted:
            return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str:
    return os.environ.get("CXX", "") or ("cl" if sys.platform == "win32" else "c++")


def key_inputs(spec: ExtensionSpec) -> dict:
    """Everything the binary depends on, as a JSON-able dict (its hash is the cache key)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(spec.sources + spec.headers):
        data = (spec.source_dir / name).read_bytes()
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return {
        "key_version": KEY_VERSION,
        "name": spec.name,
        "sources_sha256": digest.hexdigest(),
        "torch": torch.__version__,
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
        "python": sys.implementation.cache_tag + (sysconfig.get_config_var("EXT_SUFFIX") or ""),
        "platform": f"{sys.platform}-{platform.machine()}",
        "compiler": _compiler(),
        "cflags": list(spec.cflags),
        "ldflags": list(spec.ldflags),
        "cpu": _cpu_fingerprint() if "-march=native" in spec.cflags else "",
    }


def cache_key(spec: ExtensionSpec) -> str:
    return hashlib.sha256(json.dumps(key_inputs(spec), sort_keys=True).encode()).hexdigest()[:20]


def build_dir(spec: ExtensionSpec) -> Path:
    """The build directory of ``spec``: ``<cache root>/<name>-<key>``."""
    return cache_root() / f"{spec.name}-{cache_key(spec)}"


def _built_module_file(directory: Path) -> tuple[str, Path] | None:
    """(module name, binary) of a finished build in ``directory``, or None."""
    try:
        record = json.loads((directory / MARKER).read_text())
        path = directory / record["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (record["module"], path) if path.is_file() else None


def is_built(spec: ExtensionSpec) -> bool:
    """True when the cache holds a finished build of ``spec`` (nothing is compiled or loaded)."""
    return _built_module_file(build_dir(spec)) is not None


def _import(name: str, path: Path):
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path} as the module {name}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_cached(spec: ExtensionSpec):
    """The module of a finished build of ``spec`` loaded from the cache, or None when there is none or it
    does not load. Never compiles."""
    found = _built_module_file(build_dir(spec))
    if found is None:
        return None
    try:
        return _import(*found)
    except ImportError:
        return None


def missing_tools() -> list[str]:
    """The build tools (compiler, ninja) that cannot be found; empty when a build can be tried."""
    missing = []
    compiler = shlex.split(_compiler())
    if not compiler or shutil.which(compiler[0]) is None:
        missing.append(f"a C++ compiler ({_compiler()})")
    if _ninja_dir() is None:
        missing.append("ninja")
    return missing


def _ninja_dir() -> str | None:
    """The directory of a ninja executable: from PATH, else from the ``ninja`` Python package (which
    installs it next to the interpreter, off PATH when the environment is not activated)."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    try:
        import ninja
    except ImportError:
        return None
    bin_dir = getattr(ninja, "BIN_DIR", None)
    return bin_dir if bin_dir and os.path.isdir(bin_dir) else None


@contextlib.contextmanager
def _ninja_on_path():
    """torch runs ``ninja`` from PATH: put the ninja package's copy there for the build if needed."""
    bin_dir = _ninja_dir()
    old = os.environ.get("PATH", "")
    if bin_dir is None or shutil.which("ninja") is not None:
        yield
        return
    os.environ["PATH"] = bin_dir + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _stage_sources(spec: ExtensionSpec, directory: Path) -> Path:
    """Copy the sources into ``<directory>/src`` (a file already there is left alone: its content is
    part of the key, and rewriting it would make ninja rebuild)."""
    src = directory / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in spec.sources + spec.headers:
        target = src / name
        if not target.is_file():
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(spec.source_dir / name, tmp)
            os.replace(tmp, target)
    return src


def _clear_outputs(directory: Path) -> None:
    """Remove a build's outputs (objects, binary, ninja files, the marker), keeping the staged sources
    and the lock file."""
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.name in ("src", "lock"):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _forget_in_process(name: str) -> None:
    """torch remembers, per process, the extensions it built and skips building one whose inputs it has
    seen; a forced rebuild must not be skipped."""
    from torch.utils import cpp_extension

    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    entries = getattr(versioner, "entries", None)
    if isinstance(entries, dict):
        entries.pop(name, None)


def _write_marker(directory: Path, module, inputs: dict, seconds: float) -> None:
    record = {
        "module": module.__name__,
        "file": Path(module.__file__).name,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": inputs,
    }
    tmp = directory / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, directory / MARKER)


def notify_once(name: str, message: str) -> None:
    """Print ``message`` on stderr, the first time only for ``name`` in this process."""
    with _lock:
        if name in _noticed:
            return
        _noticed.add(name)
    print(message, file=sys.stderr, flush=True)


def build(spec: ExtensionSpec, *, force: bool = False, notice: str | None = None, verbose: bool = False):
    """The module of ``spec``: loaded from the cache when built there, compiled into it otherwise.

    ``notice`` (``{dir}`` is replaced by the build directory) is printed on stderr before compiling, once
    per process and extension. ``force`` discards a cached build and compiles again. Raises whatever the
    compiler or the loader raise.
    """
    with _lock:
        directory = build_dir(spec)
        if not force:
            module = load_cached(spec)
            if module is not None:
                return module
        if notice:
            notify_once(spec.name, notice.replace("{dir}", str(directory)))
        inputs = key_inputs(spec)
        directory.mkdir(parents=True, exist_ok=True)
        if force or (directory / MARKER).exists():  # forced, or a cached binary that does not load
            _clear_outputs(directory)
            _forget_in_process(spec.name)
        src = _stage_sources(spec, directory)
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        with _ninja_on_path():
            module = load(
                name=spec.name,
                sources=[str(src / name) for name in spec.sources],
                extra_cflags=list(spec.cflags),
                extra_ldflags=list(spec.ldflags),
                extra_include_paths=[str(src)],
                build_directory=str(directory),
                verbose=verbose,
            )
        _write_marker(directory, module, inputs, time.perf_counter() - start)
        return module
