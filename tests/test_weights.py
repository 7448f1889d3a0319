"""Tests of spectraformer_fused.weights (DESIGN.md section 4).

Statistical tolerances are 5 standard deviations of the estimator under N(0, I_d) rows,
computed from the sample size: for N rows of dimension d the mean squared row norm has
std sqrt(2 d / N), the mean of all N d entries std 1 / sqrt(N d), a coordinate's mean
square std sqrt(2 / N).  All seeds are fixed, so the tests are deterministic.
"""

import math

import numpy as np
import pytest
import torch

from spectraformer_fused.weights import (
    LEARNABLE_WEIGHTS,
    WEIGHTS,
    WeightMatrix,
    build_weights,
    sample_weights,
)

FIXED_WEIGHTS = tuple(n for n in WEIGHTS if n not in LEARNABLE_WEIGHTS)
SHAPES = [(1, 64, 16), (2, 100, 24), (3, 7, 40), (2, 130, 64), (2, 3, 5)]
SIGMAS = 5.0


def _params_and_buffers(module):
    return dict(module.named_parameters()) | dict(module.named_buffers())


def test_names():
    assert WEIGHTS == (
        "gaussian",
        "orf",
        "simplex",
        "sorf",
        "qmc",
        "mm",
        "sgq",
        "fastfood",
        "fastfood_learnable",
        "learnable",
    )
    assert LEARNABLE_WEIGHTS == ("fastfood_learnable", "learnable")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-m{}-d{}".format(*s))
@pytest.mark.parametrize("name", WEIGHTS)
def test_shape_dtype_and_forward(name, shape):
    h, m, d = shape
    module = build_weights(name, h, m, d, seed=3)
    assert isinstance(module, WeightMatrix)
    assert (module.name, module.num_heads, module.num_features, module.head_dim) == (name, h, m, d)
    assert module.learnable == (name in LEARNABLE_WEIGHTS)
    w = module.projection()
    assert w.shape == (h, m, d)
    assert w.dtype == torch.float32
    assert torch.isfinite(w).all()
    assert torch.equal(module(), w)


@pytest.mark.parametrize("d", [32, 24], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("name", WEIGHTS)
def test_moments_like_standard_normal_rows(name, d):
    h, m = 4, 1024
    w = sample_weights(name, h, m, d, seed=11).reshape(-1, d)
    n_rows = w.shape[0]
    mean_sq_norm = w.square().sum(-1).mean().item()
    assert abs(mean_sq_norm - d) < SIGMAS * math.sqrt(2 * d / n_rows)
    assert abs(w.mean().item()) < SIGMAS / math.sqrt(n_rows * d)
    coord_var = w.square().mean(0)
    assert (coord_var - 1).abs().max().item() < SIGMAS * math.sqrt(2 / n_rows)


@pytest.mark.parametrize("name", WEIGHTS)
def test_float32_is_cast_of_float64_draw(name):
    m32 = build_weights(name, 2, 100, 24, seed=5, dtype=torch.float32)
    m64 = build_weights(name, 2, 100, 24, seed=5, dtype=torch.float64)
    s32, s64 = m32.state_dict(), m64.state_dict()
    assert s32.keys() == s64.keys() and len(s32) > 0
    for key in s32:
        expected = s64[key].to(torch.float32) if s64[key].is_floating_point() else s64[key]
        assert torch.equal(s32[key], expected), key


@pytest.mark.parametrize("name", WEIGHTS)
def test_seed_determinism(name):
    a = sample_weights(name, 2, 100, 24, seed=7)
    b = sample_weights(name, 2, 100, 24, seed=7)
    c = sample_weights(name, 2, 100, 24, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1]), "heads must get independent draws"


@pytest.mark.parametrize("name", WEIGHTS)
def test_seed_none_follows_torch_manual_seed(name):
    torch.manual_seed(123)
    a = sample_weights(name, 2, 40, 8)
    torch.manual_seed(123)
    b = sample_weights(name, 2, 40, 8)
    c = sample_weights(name, 2, 40, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", WEIGHTS)
def test_redraw_in_place(name):
    module = build_weights(name, 2, 100, 24, seed=1, dtype=torch.float64)
    w0 = module.projection().detach().clone()
    tensors = _params_and_buffers(module)
    ptrs = {k: t.data_ptr() for k, t in tensors.items()}

    module.redraw(2)
    w1 = module.projection().detach().clone()
    assert not torch.allclose(w0, w1)
    assert torch.equal(w1, sample_weights(name, 2, 100, 24, seed=2))
    after = _params_and_buffers(module)
    assert after.keys() == tensors.keys()
    for k, t in after.items():
        assert t is tensors[k], k
        assert t.data_ptr() == ptrs[k], k

    module.redraw(1)
    assert torch.equal(module.projection().detach(), w0)
    assert module.seed == 1

    module.redraw()
    assert not torch.allclose(module.projection().detach(), w0)


@pytest.mark.parametrize("name", FIXED_WEIGHTS)
def test_fixed_kinds_store_a_buffer(name):
    module = build_weights(name, 2, 50, 16, seed=0)
    assert list(module.parameters()) == []
    assert "weight" in dict(module.named_buffers())
    assert "weight" in module.state_dict()
    assert module.projection() is module.weight
    moved = module.to(torch.float64)
    assert moved.weight.dtype == torch.float64


@pytest.mark.parametrize("name", LEARNABLE_WEIGHTS)
def test_learnable_kinds_have_gradients(name):
    module = build_weights(name, 2, 100, 24, seed=0)
    params = dict(module.named_parameters())
    assert params
    module.projection().sum().backward()
    for key, p in params.items():
        assert p.grad is not None, key
        assert p.grad.abs().sum().item() > 0, key


def test_learnable_is_initialised_from_orf():
    module = build_weights("learnable", 2, 100, 24, seed=4, dtype=torch.float64)
    assert set(dict(module.named_parameters())) == {"weight"}
    assert torch.equal(module.weight.detach(), sample_weights("orf", 2, 100, 24, seed=4))


def test_fastfood_learnable_structure():
    h, m, d = 2, 100, 24
    module = build_weights("fastfood_learnable", h, m, d, seed=4, dtype=torch.float64)
    n, nb = 32, 4
    assert set(dict(module.named_parameters())) == {"B", "G", "S"}
    for key in ("B", "G", "S"):
        assert getattr(module, key).shape == (h, nb, n)
    assert set(module.B.detach().unique().tolist()) == {-1.0, 1.0}
    assert module.perm.dtype == torch.long and "perm" in module.state_dict()
    assert torch.equal(module.perm.sort(-1).values, torch.arange(n).expand(h, nb, n))
    assert torch.equal(module.projection().detach(), sample_weights("fastfood", h, m, d, seed=4))


def test_orf_rows_orthogonal_within_blocks():
    h, m, d = 3, 100, 24
    w = sample_weights("orf", h, m, d, seed=2)
    norms = w.norm(dim=-1)
    assert norms.std().item() > 0.1, "rows must be rescaled to chi_d norms, not unit"
    u = w / norms.unsqueeze(-1)
    for start in range(0, m, d):
        blk = u[:, start : start + d]
        gram = blk @ blk.transpose(-1, -2)
        eye = torch.eye(blk.shape[1], dtype=torch.float64).expand_as(gram)
        assert (gram - eye).abs().max().item() < 1e-10
    full = u[:, :48]
    cross = full[:, :24] @ full[:, 24:].transpose(-1, -2)
    assert cross.abs().max().item() > 1e-3, "different blocks are independent, not orthogonal"


@pytest.mark.parametrize("d", [32, 24, 5], ids=lambda d: f"d{d}")
def test_sorf_block_is_sqrt_n_orthogonal(d):
    h, m = 2, 130
    n = 1 << (d - 1).bit_length()
    w = sample_weights("sorf", h, m, d, seed=9)
    for start in range(0, m - n + 1, n):
        blk = w[:, start : start + n]
        eye = torch.eye(d, dtype=torch.float64)
        assert (blk.transpose(-1, -2) @ blk - n * eye).abs().max().item() < 1e-10
        if d == n:
            assert (blk @ blk.transpose(-1, -2) - n * eye).abs().max().item() < 1e-10
    mean_sq_norm = w[:, : (m // n) * n].square().sum(-1).mean().item()
    assert abs(mean_sq_norm - d) < 1e-9


@pytest.mark.parametrize("m", [33, 64, 200], ids=lambda m: f"m{m}")
def test_mm_exact_moments_full(m):
    d = 32
    w = sample_weights("mm", 3, m, d, seed=1)
    assert w.mean(dim=1).abs().max().item() < 1e-10
    cov = w.transpose(-1, -2) @ w / m
    assert (cov - torch.eye(d, dtype=torch.float64)).abs().max().item() < 1e-10


@pytest.mark.parametrize("m", [2, 20, 32], ids=lambda m: f"m{m}")
def test_mm_coordinatewise_when_m_le_d(m):
    d = 32
    w = sample_weights("mm", 3, m, d, seed=1)
    assert w.mean(dim=1).abs().max().item() < 1e-10
    assert (w.square().mean(dim=1) - 1).abs().max().item() < 1e-10


@pytest.mark.parametrize("points", [3, 5, 8], ids=lambda p: f"points{p}")
def test_sgq_nodes_and_moments(points):
    nodes, _ = np.polynomial.hermite_e.hermegauss(points)
    w = sample_weights("sgq", 4, 1024, 32, seed=6, sgq_points=points).flatten()
    dist = (w.unsqueeze(-1) - torch.as_tensor(nodes)).abs().min(-1).values
    assert dist.max().item() == 0.0
    assert len(w.unique()) == points
    n = w.numel()
    gauss = [1.0, 0.0, 1.0, 0.0, 3.0, 0.0, 15.0, 0.0, 105.0]
    for k in range(1, 5):
        std = math.sqrt((gauss[2 * k] - gauss[k] ** 2) / n)
        assert abs(w.pow(k).mean().item() - gauss[k]) < SIGMAS * std, k


def test_sgq_points_changes_the_rule():
    a = sample_weights("sgq", 1, 50, 8, seed=0, sgq_points=3)
    assert len(a.unique()) == 3


@pytest.mark.parametrize("m", [16, 100, 257], ids=lambda m: f"m{m}")
def test_fastfood_honours_m(m):
    w = sample_weights("fastfood", 2, m, 24, seed=0)
    assert w.shape == (2, m, 24)
    assert not torch.allclose(w[:, -1], torch.zeros(24, dtype=torch.float64))


def test_fastfood_full_rows_have_norm_s():
    h, m, d = 2, 100, 16
    module = build_weights("fastfood_learnable", h, m, d, seed=3, dtype=torch.float64)
    w = module.projection().detach()
    expected = (module.S * module.G.norm(dim=-1, keepdim=True)).detach().reshape(h, -1)[:, :m]
    assert (w.norm(dim=-1) - expected.abs()).abs().max().item() < 1e-10
    assert expected.std().item() > 0.1, "row norms are chi_n draws, not constant"


def test_qmc_is_low_discrepancy_and_differs_per_head():
    w = sample_weights("qmc", 2, 1024, 16, seed=0)
    assert not torch.allclose(w[0], w[1])
    # A Gaussian column mean over 1024 rows has std 1/32; scrambled Sobol is far tighter.
    assert w.mean(dim=1).abs().max().item() < 0.005
    g = sample_weights("gaussian", 2, 1024, 16, seed=0)
    assert g.mean(dim=1).abs().max().item() > 0.01


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_weights("circulant", 2, 16, 8)
    for name in WEIGHTS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "args, exc, word",
    [
        ((0, 16, 8), ValueError, "num_heads"),
        ((2, 0, 8), ValueError, "num_features"),
        ((2, 16, 0), ValueError, "head_dim"),
        ((2, -3, 8), ValueError, "num_features"),
        ((2, 16.0, 8), TypeError, "num_features"),
        ((2, 16, "8"), TypeError, "head_dim"),
        ((True, 16, 8), TypeError, "num_heads"),
    ],
    ids=["H0", "m0", "d0", "m-neg", "m-float", "d-str", "H-bool"],
)
@pytest.mark.parametrize("name", ["gaussian", "fastfood_learnable"])
def test_bad_sizes(name, args, exc, word):
    with pytest.raises(exc, match=word):
        build_weights(name, *args)


@pytest.mark.parametrize("name", WEIGHTS)
def test_unknown_weight_arg(name):
    with pytest.raises(TypeError, match="bogus_arg"):
        build_weights(name, 2, 16, 8, bogus_arg=1)


def test_sgq_points_only_for_sgq():
    with pytest.raises(TypeError, match="sgq_points"):
        build_weights("gaussian", 2, 16, 8, sgq_points=3)
    with pytest.raises(ValueError, match="sgq_points"):
        build_weights("sgq", 2, 16, 8, sgq_points=1)


def test_mm_needs_two_features():
    with pytest.raises(ValueError, match="num_features"):
        build_weights("mm", 2, 1, 8)


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed"):
        build_weights("gaussian", 2, 16, 8, seed=1.5)
