"""Simplex random features (``weights="simplex"``, DESIGN.md section 7): the geometry of each block, the
chi_d row lengths, unbiasedness of every component's kernel estimate and the same attention on every
backend. The generic checks every weight matrix gets (shape, dtype, seeds, redraw, moments of N(0, I_d)
rows) are in test_weights.py. All seeds are fixed, so the statistical tests are deterministic."""

import copy
import math

import pytest
import torch
from helpers import assert_close, component_id

from spectraformer_fused import KERNELS, RandomFeatureMap, available_backends, exact_kernel, rf_attention
from spectraformer_fused.ops import triton_importable, triton_interpreting
from spectraformer_fused.weights import sample_weights, simplex_directions


@pytest.mark.parametrize("d", [1, 2, 3, 16, 24], ids=lambda d: f"d{d}")
def test_simplex_directions(d):
    s = simplex_directions(d)
    assert s.shape == (d, d)
    gram = s @ s.T
    off = 1.0 if d == 1 else -1.0 / (d - 1)
    expected = torch.full((d, d), off, dtype=torch.float64).fill_diagonal_(1.0)
    assert (gram - expected).abs().max().item() < 1e-12
    if d > 1:
        assert s.sum(0).abs().max().item() < 1e-12, "the vertices of a centred simplex sum to zero"


@pytest.mark.parametrize("m", [16, 40, 7], ids=lambda m: f"m{m}")
def test_block_angles_are_a_simplex(m):
    """Within each block of d rows the directions have pairwise normalised dot -1/(d-1); across blocks not."""
    h, d = 3, 16
    w = sample_weights("simplex", h, m, d, seed=2)
    assert w.shape == (h, m, d)
    u = w / w.norm(dim=-1, keepdim=True)
    for start in range(0, m, d):
        blk = u[:, start : start + d]
        n = blk.shape[1]
        gram = blk @ blk.transpose(-1, -2)
        expected = torch.full((n, n), -1.0 / (d - 1), dtype=torch.float64).fill_diagonal_(1.0)
        assert (gram - expected).abs().max().item() < 1e-10, f"block at row {start}"
    if m > d:
        cross = u[:, :d] @ u[:, d : 2 * d].transpose(-1, -2)
        assert (cross + 1.0 / (d - 1)).abs().max().item() > 1e-2, "different blocks are independent"
    # the rotation differs per block and per head
    assert not torch.allclose(u[0, :1], u[1, :1])


def test_row_lengths_are_chi_d():
    """Squared row lengths follow chi^2_d: Kolmogorov-Smirnov distance to its CDF below the 0.1% critical
    value 1.95 / sqrt(n); and they are independent of the direction (not all equal within a block)."""
    h, m, d = 64, 64, 16
    w = sample_weights("simplex", h, m, d, seed=4)
    sq = w.square().sum(-1).flatten().sort().values
    n = sq.numel()
    cdf = torch.special.gammainc(torch.tensor(d / 2, dtype=torch.float64), sq / 2)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n), f"KS distance {ks:.4f} to chi^2_{d} with n = {n}"
    assert w[:, :d].norm(dim=-1).std(dim=-1).min().item() > 0.1, "lengths are drawn per row, not per block"


def test_simplex_is_not_orf():
    """Same seed, same Haar rotations and lengths as orf: simplex rows are the simplex vertices in that frame."""
    h, m, d = 2, 32, 8
    orf = sample_weights("orf", h, m, d, seed=5)
    simplex = sample_weights("simplex", h, m, d, seed=5)
    assert torch.allclose(orf.norm(dim=-1), simplex.norm(dim=-1), rtol=1e-12, atol=0)
    assert not torch.allclose(orf, simplex)


COMPONENT_CASES = [
    ("posrf", {}),
    ("hyprf", {}),
    ("trigrf", {}),
    ("gerf", {"A": -0.1}),
    ("oprf", {}),
    ("saderf", {}),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", COMPONENT_CASES, ids=lambda c: component_id(*c))
def test_kernel_estimate_is_unbiased(case, kernel):
    """Mean of kernel_estimate over 4000 independent simplex W (one per head) = exact kernel within 5 s.e.
    (as tests/test_reference.py checks gaussian and orf)."""
    name, args = case
    draws, D = 4000, 4
    g = torch.Generator().manual_seed(1)
    q1 = torch.randn(1, 3, 1, D, generator=g, dtype=torch.float64) * 0.6
    k1 = torch.randn(1, 3, 1, D, generator=g, dtype=torch.float64) * 0.6
    fm = RandomFeatureMap(
        D, 4, component=name, weights="simplex", kernel=kernel, num_heads=draws, seed=7, dtype=torch.float64, **args
    )
    est = fm.kernel_estimate(q1.expand(1, 3, draws, D), k1.expand(1, 3, draws, D), scale=1.0)[0]
    exact = exact_kernel(q1, k1, kernel=kernel, scale=1.0)[0, 0]
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    z = ((mean - exact) / se).abs().max().item()
    assert z < 5.0, f"{name}{args} {kernel}: max |mean - exact| = {z:.2f} standard errors\n{mean}\n{exact}"


def test_posrf_mse_below_orf_at_small_norm():
    """The coupling works: at small |q|, |k| and m = d the PosRF estimate's mean squared error over 2000
    draws is well below ORF's (the paper's theorem; bench/report/kernel_estimation.py measures how far)."""
    draws, D = 2000, 16
    g = torch.Generator().manual_seed(3)
    q1 = torch.randn(1, 4, 1, D, generator=g, dtype=torch.float64) * 0.3
    k1 = torch.randn(1, 4, 1, D, generator=g, dtype=torch.float64) * 0.3
    exact = exact_kernel(q1, k1)[0, 0]
    mse = {}
    for weights in ("orf", "simplex"):
        fm = RandomFeatureMap(D, D, weights=weights, num_heads=draws, seed=11, dtype=torch.float64)
        est = fm.kernel_estimate(q1.expand(1, 4, draws, D), k1.expand(1, 4, draws, D))[0]
        mse[weights] = (est - exact).square().mean().item()
    assert mse["simplex"] < 0.5 * mse["orf"], mse


def _fused_backends() -> list[str]:
    names = ["cpu"] if "cpu" in available_backends() else []
    if triton_importable() and (torch.cuda.is_available() or triton_interpreting()):
        names.append("triton")
    return names


@pytest.mark.parametrize("shared", [False, True], ids=["perheadW", "sharedW"])
@pytest.mark.parametrize("component", ["posrf", "trigrf", "oprf"])
@pytest.mark.parametrize("backend", _fused_backends())
def test_every_backend_matches_reference(backend, component, shared):
    """A simplex W is a dense W like any other: every fused backend gives the reference's output and state
    (fp32, causal, D = 13 with m = 33: two full blocks and a truncated one)."""
    B, T, H, D, m = 2, 17, 2, 13, 33
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) * 0.5 for _ in range(3))
    fm = RandomFeatureMap(D, m, component=component, weights="simplex", num_heads=1 if shared else H, seed=3)
    if fm.spec.data_dependent:
        fm.train()
        fm.feature_params(q, k, scale=D**-0.5, causal=False)
    fm.eval()
    o_ref, st_ref = rf_attention(q, k, v, fm, causal=True, output_final_state=True, backend="reference")
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    o, st = rf_attention(
        q.to(dev),
        k.to(dev),
        v.to(dev),
        copy.deepcopy(fm).to(dev),
        causal=True,
        output_final_state=True,
        backend=backend,
    )
    name = f"{backend}-{component}-{'shared' if shared else 'per-head'}"
    assert_close(o, o_ref, torch.float32, name=f"{name} o")
    assert_close(st.S, st_ref.S, torch.float32, name=f"{name} S")
    assert_close(st.z, st_ref.z, torch.float32, name=f"{name} z")
