"""The build cache of compiled extensions (spectraformer_fused/ops/cpu/build_cache.py, spectraformer_fused/build.py).

* The cache key depends on the sources' contents, torch, the flags and the CPU, never on where the
  sources live: two installations of the same sources share one directory, different sources get their
  own (checked on the real CPU extension's key, and by building a small stand-in extension: a plain CPython
  module that compiles in seconds, through the same torch build path as the real one).
* ``available_backends()`` never compiles: a fresh process with an empty cache answers without creating
  anything, and one pointed at the cache holding the real extension lists "cpu" and loads it from there.
* The notice before a build is printed once, for a forced rebuild and for the build ``backend="auto"``
  triggers on first need.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_close

import spectraformer_fused
from spectraformer_fused import RandomFeatureMap, rf_attention
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.ops.cpu import build_cache
from spectraformer_fused.ops.cpu import extension as cpu_ext

ROOT = Path(spectraformer_fused.__file__).resolve().parent.parent

STANDIN = """\
// A stand-in extension: a plain CPython module named by torch's TORCH_EXTENSION_NAME.
#include <Python.h>
#define SF_CAT_(a, b) a##b
#define SF_CAT(a, b) SF_CAT_(a, b)
#define SF_STR_(a) #a
#define SF_STR(a) SF_STR_(a)
static struct PyModuleDef standin_def = {PyModuleDef_HEAD_INIT, SF_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC SF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&standin_def);
  if (m != nullptr) PyModule_AddIntConstant(m, "VALUE", %d);
  return m;
}
"""


def _standin(directory: Path, value: int, name: str) -> build_cache.ExtensionSpec:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "standin.cpp").write_text(STANDIN % value)
    return build_cache.ExtensionSpec(name, directory, ("standin.cpp",), cflags=("-O0",))


def _binary_stamp(spec):
    """(inode, mtime) of the cached binary: a rebuild replaces it."""
    st = (build_cache.build_dir(spec) / f"{spec.name}.so").stat()
    return st.st_ino, st.st_mtime_ns


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(build_cache.CACHE_ENV, str(root))
    monkeypatch.setattr(build_cache, "_noticed", set())
    return root


# ---- the key ---------------------------------------------------------------------------------------------


def test_key_ignores_location_and_follows_contents(tmp_path, monkeypatch):
    spec = cpu_ops.extension_spec()
    assert spec is not None, "the C++ sources were not found"
    copies = []
    for where in ("site/spectraformer_fused/csrc", "checkout/csrc"):
        target = tmp_path / where
        shutil.copytree(spec.source_dir, target)
        copies.append(spec.__class__(spec.name, target, spec.sources, spec.headers, spec.cflags, spec.ldflags))
    home = build_cache.build_dir(spec)
    assert [build_cache.build_dir(s) for s in copies] == [home, home], "same sources, different build directories"
    assert home.parent == build_cache.cache_root() and home.name.startswith(spec.name + "-")

    edited = copies[1]
    (edited.source_dir / spec.headers[0]).write_text((edited.source_dir / spec.headers[0]).read_text() + "\n// edit\n")
    assert build_cache.build_dir(edited) != home, "edited sources reuse the old build directory"
    flags = spec.__class__(spec.name, spec.source_dir, spec.sources, spec.headers, spec.cflags + ("-g",), spec.ldflags)
    assert build_cache.build_dir(flags) != home, "other compiler flags reuse the old build directory"
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert build_cache.build_dir(spec) != home, "another torch version reuses the old build directory"
    inputs = build_cache.key_inputs(spec)
    assert sys.implementation.cache_tag in inputs["python"] and inputs["cpu"], inputs


# ---- builds, with a stand-in extension -------------------------------------------------------------------


def test_installs_share_a_build_and_never_evict(tmp_path, cache, capfd):
    a = _standin(tmp_path / "venv/site-packages/pkg/csrc", 1, "sf_standin_share")
    b = _standin(tmp_path / "checkout/csrc", 1, "sf_standin_share")  # same sources, elsewhere
    c = _standin(tmp_path / "other-version/csrc", 2, "sf_standin_share")  # different sources
    notice = "building {dir}"
    assert build_cache.build_dir(a) == build_cache.build_dir(b) != build_cache.build_dir(c)

    assert build_cache.build(a, notice=notice).VALUE == 1
    stamp_a = _binary_stamp(a)
    assert build_cache.build(b, notice=notice).VALUE == 1
    assert _binary_stamp(b) == stamp_a, "a second install of the same sources rebuilt the shared binary"

    assert build_cache.build(c, notice=notice).VALUE == 2
    assert _binary_stamp(a) == stamp_a, "building other sources touched the first build"
    assert build_cache.build(a, notice=notice).VALUE == 1 and _binary_stamp(a) == stamp_a
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        {build_cache.build_dir(a).name, build_cache.build_dir(c).name}
    )
    err = capfd.readouterr().err
    assert err.count("building ") == 1, f"the notice should be printed once per process:\n{err}"


def test_forced_rebuild_prints_the_notice_once(tmp_path, cache, capfd):
    spec = _standin(tmp_path / "csrc", 7, "sf_standin_force")
    assert build_cache.build(spec).VALUE == 7  # no notice text: builds silently
    stamp = _binary_stamp(spec)
    capfd.readouterr()
    module = build_cache.build(spec, force=True, notice=cpu_ext.NOTICE)
    assert module.VALUE == 7 and _binary_stamp(spec) != stamp, "the forced rebuild did not rebuild"
    stamp = _binary_stamp(spec)
    assert build_cache.build(spec, notice=cpu_ext.NOTICE).VALUE == 7 and _binary_stamp(spec) == stamp
    err = capfd.readouterr().err
    assert err.count("spectraformer_fused: compiling") == 1, err
    line = next(line for line in err.splitlines() if "compiling" in line)
    assert str(build_cache.build_dir(spec)) in line
    assert "python -m spectraformer_fused.build" in line and f"{cpu_ops.SKIP_ENV}=1" in line, line
    record = json.loads((build_cache.build_dir(spec) / build_cache.MARKER).read_text())
    assert record["inputs"] == build_cache.key_inputs(spec)


def test_auto_builds_on_first_need_with_one_notice(tmp_path, monkeypatch, capfd):
    """backend="auto" on a CPU without a built extension compiles it (here: the compile step is replaced by
    the real module, already built) after the notice, once; available_backends() before it compiles nothing."""
    real = cpu_ext._load()  # from the real cache, before the empty one is set
    assert real is not None, f"the CPU extension did not build: {cpu_ops.extension_error()}"
    monkeypatch.setenv(build_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(build_cache, "_noticed", set())
    calls = []

    def fake_load(name, sources, build_directory, **kwargs):
        calls.append(build_directory)
        assert all(Path(s).parent == Path(build_directory) / "src" for s in sources), sources
        return real

    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpu_ext, "_module", None)
    monkeypatch.setattr(cpu_ext, "_error", None)
    assert cpu_ops.extension_status() == "buildable"
    assert "cpu" not in spectraformer_fused.available_backends() and not calls
    fm = RandomFeatureMap(16, 16, component="posrf", weights="orf", num_heads=1, seed=0).eval()
    q, k, v = torch.randn(3, 1, 8, 1, 16).unbind(0)
    for _ in range(2):
        o = rf_attention(q, k, v, fm, causal=True)
        assert_close(o, rf_attention(q, k, v, fm, causal=True, backend="reference"), torch.float32, name="auto")
    assert len(calls) == 1 and cpu_ops.extension_status() == "loaded"
    err = capfd.readouterr().err
    assert err.count("spectraformer_fused: compiling the CPU backend") == 1, err


RACE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from spectraformer_fused.ops.cpu import build_cache
    spec = build_cache.ExtensionSpec("sf_standin_race", Path(sys.argv[1]), ("standin.cpp",), cflags=("-O0",))
    print(build_cache.build(spec).VALUE)
""")


def test_concurrent_builds_compile_once(tmp_path, cache):
    """Two processes building the same extension into an empty cache at once: one compiles, the other
    waits on the build directory's lock (or finds the finished build), and both load the binary."""
    spec = _standin(tmp_path / "csrc", 3, "sf_standin_race")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(spec.source_dir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0 and out.strip().splitlines()[-1] == "3", err
    directory = build_cache.build_dir(spec)
    log = (directory / ".ninja_log").read_text().splitlines()  # "start end mtime output hash" per step
    links = [line for line in log if len(line.split("\t")) == 5 and line.split("\t")[3].endswith(".so")]
    assert len(links) == 1, f"the binary was linked {len(links)} times:\n{links}"
    assert json.loads((directory / build_cache.MARKER).read_text())["module"] == spec.name
    assert not (directory / "lock").exists()


# ---- fresh processes -------------------------------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, sys, time
    import spectraformer_fused
    from spectraformer_fused import build
    from spectraformer_fused.ops.cpu import extension as cpu
    out = {}
    os.environ["SPECTRAFORMER_FUSED_CACHE_DIR"] = sys.argv[1]          # empty
    t = time.perf_counter()
    out["empty_backends"] = spectraformer_fused.available_backends()
    out["empty_seconds"] = time.perf_counter() - t
    out["empty_status"] = build.status()
    os.environ["SPECTRAFORMER_FUSED_CACHE_DIR"] = sys.argv[2]          # holds the real extension
    out["built_status"] = build.status()
    out["built_backends"] = spectraformer_fused.available_backends()
    out["module_file"] = getattr(cpu._module, "__file__", None)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    """One fresh interpreter: available_backends() with an empty cache, then with the real one."""
    assert cpu_ops.extension_available(), f"the CPU extension did not build: {cpu_ops.extension_error()}"
    empty = tmp_path_factory.mktemp("empty-cache")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(cpu_ops.SKIP_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(empty), str(build_cache.cache_root())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), empty, proc.stderr


def test_available_backends_never_compiles(fresh_process):
    out, empty, err = fresh_process
    assert "cpu" not in out["empty_backends"] and out["empty_status"] == "buildable", out
    assert list(empty.iterdir()) == [], "available_backends() created files in the build cache"
    assert "compiling" not in err, err
    assert out["empty_seconds"] < 5.0, f"available_backends() took {out['empty_seconds']:.2f} s with an empty cache"


def test_a_fresh_process_finds_the_real_extension_in_the_cache(fresh_process):
    out, _, err = fresh_process
    directory = build_cache.build_dir(cpu_ops.extension_spec())
    assert Path(cpu_ext._module.__file__).parent == directory, "this process did not load the cached extension"
    assert out["built_status"] == "built" and "cpu" in out["built_backends"], out
    assert Path(out["module_file"]).parent == directory, out
    assert "compiling" not in err, err


def test_cli_status_builds_nothing(tmp_path, monkeypatch, capsys):
    from spectraformer_fused import build

    assert cpu_ops.extension_available(), f"the CPU extension did not build: {cpu_ops.extension_error()}"
    monkeypatch.setenv(build_cache.CACHE_ENV, str(tmp_path / "cache"))
    assert build.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "cpu backend: loaded" in out and str(build_cache.build_dir(cpu_ops.extension_spec())) in out, out
    assert not (tmp_path / "cache").exists(), "--status created the cache directory"
