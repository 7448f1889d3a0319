"""Smoke test of bench/report/kernel_estimation.py (``pytest bench -q``): tiny sizes, every pair of every set has
a row with finite statistics and ordered intervals, the m sweep has its slopes, and the section's markdown
(with the findings sentence for every weight matrix) and plots are written."""

from __future__ import annotations

import math

import torch

import spectraformer_fused as sf
from bench.common import Context, versions
from bench.report import kernel_estimation
from bench.report.settings import make_settings


def test_kernel_section_rows_markdown_and_plots(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP on busy cores only stalls
    try:
        _check(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check(tmp_path):
    st = make_settings(False, torch.device("cpu"))
    ks = kernel_estimation.KestSettings(
        D=4, m=4, T=6, draws=24, boot=50, scales=(0.3,), kernels=("softmax",), train_steps=2,
        sweep_ms=(4, 8), sweep_scales=(0.5,), sweep_weights=("gaussian", "orf", "simplex"),
    )  # fmt: skip
    ctx = Context("cpu (test)", "2026-01-01 00:00", versions(), "quick")
    kest = kernel_estimation.run(st, ctx, ks)
    rows, sweep, meta = kest
    sets = ["iso-0.3", "subspace", "trained"]
    assert [s["name"] for s in meta["sets"]] == sets
    assert len(rows) == len(sets) * len(sf.COMPONENTS) * len(sf.WEIGHTS)
    for r in rows:
        assert r["status"] == "ok", r
        for p in ("k", "o"):
            assert r[f"{p}_mse_lo"] <= r[f"{p}_mse"] * (1 + 1e-12) and r[f"{p}_mse"] <= r[f"{p}_mse_hi"] * (1 + 1e-12)
            if r["weights"] != "orf":
                assert math.isfinite(r[f"{p}_ratio"]) and r[f"{p}_ratio_lo"] <= r[f"{p}_ratio_hi"]
                assert r[f"{p}_vs_orf"] in ("lower", "higher", "n.d.")
    learnable = [r for r in rows if r["weights"] == "learnable"]
    assert all(r["k_ratio"] == 1.0 for r in learnable), "learnable starts as orf: the same draws"
    assert all(r["device"] == "cpu (test)" and "torch" in r for r in rows + sweep)
    assert len(sweep) == 2 * 3 and {s["weights"] for s in meta["slopes"]} == {"gaussian", "orf", "simplex"}
    assert len(meta["recommend"]) == len(sets) * 2
    plots = kernel_estimation.plot(kest, st, str(tmp_path), ctx)
    for p in plots:
        assert (tmp_path / p).stat().st_size > 0
    md = "\n".join(kernel_estimation.markdown(kest, st, ctx, plots))
    assert "## 2. Kernel estimation" in md and "device: cpu (test)" in md
    lines = kernel_estimation.kernel_lines(kest, ks)
    for w in sf.WEIGHTS:
        if w != "orf":
            assert any(line.startswith(f"- **{w}**") for line in lines), w
    assert any("posrf x simplex against posrf x orf" in line for line in lines)
