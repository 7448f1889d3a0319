"""Build the compiled CPU backend ahead of time, or say where it stands.

    python -m spectraformer_fused.build            # compile it now (once per sources/torch/Python/CPU)
    python -m spectraformer_fused.build --force    # discard the cached binary and compile again
    python -m spectraformer_fused.build --status   # loaded/built/buildable/unavailable, the cache directory

Without this step the first call that needs the CPU backend (``rf_attention`` with ``backend="auto"`` on
fp32/bf16 CPU tensors, or ``backend="cpu"``) compiles it, after a one-line notice on stderr. The binary
goes to the build cache (``$SPECTRAFORMER_FUSED_CACHE_DIR``, default ``~/.cache/spectraformer_fused``),
in a directory keyed by what it depends on, so every environment on the machine with the same sources,
torch, Python and compiler flags reuses it and none evicts another's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .ops.cpu import build_cache
from .ops.cpu import extension as cpu


def status() -> str:
    """The CPU backend's state, without compiling: "loaded", "built", "buildable" or "unavailable: <reason>"."""
    return cpu.extension_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spectraformer_fused.build",
        description="Build the compiled CPU backend of spectraformer_fused ahead of time.",
    )
    parser.add_argument("--force", action="store_true", help="discard a cached build and compile again")
    parser.add_argument("--status", action="store_true", help="print the state and the cache directory; build nothing")
    args = parser.parse_args(argv)

    spec = cpu.extension_spec()
    if args.status:
        print(f"cpu backend: {status()}")
        print(f"cache root: {build_cache.cache_root()}")
        if spec is not None:
            print(f"build directory: {build_cache.build_dir(spec)}")
            print(f"key inputs: {json.dumps(build_cache.key_inputs(spec), sort_keys=True)}")
        return 0
    if spec is None:
        print(
            "spectraformer_fused: the C++ sources (csrc/rf_attention.cpp) are missing from this installation",
            file=sys.stderr,
        )
        return 1
    if cpu._disabled():
        print(
            f"spectraformer_fused: note: {cpu.SKIP_ENV} is set, so this environment will not use the build",
            file=sys.stderr,
        )
    missing = build_cache.missing_tools()
    if missing:
        print(
            f"spectraformer_fused: cannot build the CPU backend: {' and '.join(missing)} not found "
            "(install g++ and `pip install ninja`)",
            file=sys.stderr,
        )
        return 1
    start = time.perf_counter()
    try:
        cpu._build(force=args.force)
    except Exception as exc:
        print(f"spectraformer_fused: building the CPU backend failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(
        f"spectraformer_fused: CPU backend ready in {build_cache.build_dir(spec)} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
