"""Every Triton kernel lowers to GPU code (sm_90) and fits the GPU's shared memory, checked without a GPU.

The interpreter runs the kernels' Python semantics only: a construct the GPU compiler rejects (a dot shape
too small for the tensor cores, a dtype it cannot convert, a constexpr it cannot fold) or a tile that needs
more shared memory than a block may have would pass every interpreter test and fail on the first GPU
launch. ``bench/perf/compile_check.py`` compiles each kernel specialisation that the host code launches for a
few small cases, for sm_90, with Triton's own compiler and ptxas; ``--check`` fails on a compile error or
on shared memory beyond the target's limit.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(bin_dir, "ptxas")) and os.path.exists(os.path.join(bin_dir, "cuobjdump"))


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.perf.compile_check",
            "--cases",
            "small",
            "--arch",
            "90",
            "--check",
            "--jobs",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stdout[-6000:])
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, "a kernel failed to compile for sm_90 or exceeds its shared memory (table above)"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| _rf_")]
    names = {row.split("|")[1].strip() for row in rows}
    # both phases of the forward, the causal and non-causal backward, the chunk mode (the walk's kernels with
    # RANGES, and its scan kernel), packed sequences' per-sequence stabilisers: every kernel of the package
    assert names == {
        "_rf_stats_fwd_kernel",
        "_rf_varlen_stab_kernel",
        "_rf_fwd_kernel",
        "_rf_bwd_dq_kernel",
        "_rf_bwd_dkv_kernel",
        "_rf_bwd_dstate_kernel",
        "_rf_chunk_scan_kernel",
    }, names
