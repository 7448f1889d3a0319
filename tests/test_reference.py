"""The reference backend against the mathematics: unbiasedness, convergence, equivalent formulations,
streaming, masking, causality, stability and float64 gradients."""

import copy
import math

import pytest
import torch
from helpers import assert_close, component_id

from spectraformer_fused import COMPONENTS, KERNELS, RandomFeatureMap, exact_attention, exact_kernel, rf_attention
from spectraformer_fused.components import Moments, oprf_A
from spectraformer_fused.reference import reference_attention

COMPONENT_CASES = [
    ("posrf", {}),
    ("hyprf", {}),
    ("trigrf", {}),
    ("gerf", {"A": -0.1}),
    ("gerf", {"A": 0.05, "s": -1}),
    ("oprf", {}),
    ("saderf", {}),
]


def _cid(case):
    return component_id(*case)


def qkv(B=2, T=40, H=2, D=16, Dv=None, mag=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * mag).to(dtype)
    k = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * mag).to(dtype)
    v = torch.randn(B, T, H, Dv or D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


# ---------------------------------------------------------------- unbiasedness (statistical)
@pytest.mark.parametrize("weights", ["gaussian", "orf"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", COMPONENT_CASES, ids=_cid)
def test_kernel_estimate_is_unbiased(case, kernel, weights):
    """Mean of kernel_estimate over many independent W (one per head) = exact kernel within 5 s.e."""
    name, args = case
    draws, D = 4000, 4
    g = torch.Generator().manual_seed(1)
    q1 = torch.randn(1, 3, 1, D, generator=g, dtype=torch.float64) * 0.6
    k1 = torch.randn(1, 3, 1, D, generator=g, dtype=torch.float64) * 0.6
    q, k = q1.expand(1, 3, draws, D), k1.expand(1, 3, draws, D)
    fm = RandomFeatureMap(
        D, 4, component=name, weights=weights, kernel=kernel, num_heads=draws, seed=7, dtype=torch.float64, **args
    )
    est = fm.kernel_estimate(q, k, scale=1.0)[0]  # [draws, 3, 3]
    exact = exact_kernel(q1, k1, kernel=kernel, scale=1.0)[0, 0]  # [3, 3]
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    z = ((mean - exact) / se).abs().max().item()
    assert z < 5.0, f"{name}{args} {kernel} {weights}: max |mean - exact| = {z:.2f} standard errors\n{mean}\n{exact}"


def test_kernel_estimate_detects_bias():
    """The statistical test has power: a kernel scaled by 1.1 is rejected."""
    draws, D = 4000, 4
    g = torch.Generator().manual_seed(1)
    q1 = torch.randn(1, 3, 1, D, generator=g, dtype=torch.float64) * 0.6
    k1 = torch.randn(1, 3, 1, D, generator=g, dtype=torch.float64) * 0.6
    fm = RandomFeatureMap(D, 4, component="posrf", weights="gaussian", num_heads=draws, seed=7, dtype=torch.float64)
    est = fm.kernel_estimate(q1.expand(1, 3, draws, D), k1.expand(1, 3, draws, D), scale=1.0)[0] * 1.1
    exact = exact_kernel(q1, k1, scale=1.0)[0, 0]
    z = ((est.mean(0) - exact) / (est.std(0) / math.sqrt(draws))).abs().max().item()
    assert z > 5.0


def test_oprf_optimum_matches_closed_form():
    """The cancellation-free rho* equals DESIGN.md's closed form, and A* <= 0."""
    g = torch.Generator().manual_seed(0)
    d = 16
    m = Moments(
        torch.randn(5, d, generator=g, dtype=torch.float64),
        torch.rand(5, d, generator=g, dtype=torch.float64) * 3,
        torch.randn(5, d, generator=g, dtype=torch.float64),
        torch.rand(5, d, generator=g, dtype=torch.float64) * 3,
    )
    m.sq_x += m.mean_x**2
    m.sq_y += m.mean_y**2
    p = m.sq_x.sum(-1) + m.sq_y.sum(-1) + 2 * (m.mean_x * m.mean_y).sum(-1)
    rho = (torch.sqrt((2 * p + d) ** 2 + 8 * d * p) - 2 * p - d) / (4 * p)
    assert_close(oprf_A(m), (1 - 1 / rho) / 8, torch.float64, name="A*")
    assert (oprf_A(m) <= 0).all()
    zero = Moments(*(torch.zeros(1, d, dtype=torch.float64) for _ in range(4)))
    assert oprf_A(zero).item() == 0.0


# ---------------------------------------------------------------- convergence
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("component", ["posrf", "hyprf", "oprf", "saderf"])
def test_error_falls_as_m_grows(component, kernel):
    # moderate |q + k|: posrf's estimator is log-normal, with heavy tails for large |q + k|
    q, k, v = qkv(B=1, T=64, H=2, D=16, mag=0.4)
    exact = exact_attention(q, k, v, kernel=kernel)

    def err(m):
        errs = []
        for seed in range(4):
            fm = RandomFeatureMap(
                16, m, component=component, kernel=kernel, num_heads=2, seed=seed, dtype=torch.float64
            )
            o = rf_attention(q, k, v, fm, backend="reference")
            errs.append(((o - exact).norm() / v.norm()).item())
        return sum(errs) / len(errs)

    small, large = err(8), err(512)
    assert large < small / 3, f"{component}/{kernel}: error {small:.4f} at m=8, {large:.4f} at m=512"


# ---------------------------------------------------------------- equivalent formulations
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", COMPONENT_CASES, ids=_cid)
def test_attention_equals_normalised_kernel_estimate(case, kernel):
    name, args = case
    q, k, v = qkv(B=2, T=37, H=2, D=8, Dv=5, mag=0.5)
    fm = RandomFeatureMap(8, 24, component=name, kernel=kernel, num_heads=2, seed=3, dtype=torch.float64, **args).eval()
    K = fm.kernel_estimate(q, k)  # [B, H, T, T]
    vt = v.transpose(1, 2)
    full = (K @ vt) / (K.sum(-1, keepdim=True))
    assert_close(rf_attention(q, k, v, fm), full.transpose(1, 2), torch.float64, name="non-causal")
    if fm.spec.data_dependent:
        return  # causal OPRF/SADERF use running statistics, not this sequence's: another estimate of K
    Kc = K.tril()
    causal = (Kc @ vt) / Kc.sum(-1, keepdim=True)
    assert_close(rf_attention(q, k, v, fm, causal=True), causal.transpose(1, 2), torch.float64, name="causal")


@pytest.mark.parametrize("case", COMPONENT_CASES, ids=_cid)
def test_causal_data_dependent_uses_running_statistics(case):
    """In causal mode the lower triangle of the estimate built from the RUNNING statistics is applied."""
    name, args = case
    q, k, v = qkv(B=2, T=30, H=2, D=8, mag=0.5)
    fm = RandomFeatureMap(8, 24, component=name, num_heads=2, seed=3, dtype=torch.float64, **args)
    if fm.spec.data_dependent:
        fm.train()
        warm = qkv(B=3, T=50, H=2, D=8, mag=0.8, seed=9)
        rf_attention(*warm, fm)  # gathers statistics
    fm.eval()
    p = fm.feature_params(q, k, scale=8**-0.5, causal=True)
    if fm.spec.data_dependent:
        A = oprf_A(
            fm.running_moments().__class__(*(t.double() for t in fm.running_moments().tensors())),
            None if p.psi is None else p.psi[0],
        )
        assert_close(p.freq, (1 - 4 * A).sqrt().expand_as(p.freq), torch.float64, name="freq from running stats")
    o_ref, _ = reference_attention(q, k, v, p, causal=True)
    assert_close(rf_attention(q, k, v, fm, causal=True), o_ref, torch.float64, name="causal")


# ---------------------------------------------------------------- streaming, masking, causality
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", COMPONENT_CASES, ids=_cid)
@pytest.mark.parametrize("split", [1, 23, 64])
def test_two_pieces_equal_one_run(case, kernel, split):
    name, args = case
    q, k, v = qkv(B=2, T=100, H=2, D=8, Dv=6, mag=0.6)
    fm = RandomFeatureMap(8, 16, component=name, kernel=kernel, num_heads=2, seed=2, dtype=torch.float64, **args).eval()
    o, st = rf_attention(q, k, v, fm, causal=True, output_final_state=True)
    o1, s1 = rf_attention(q[:, :split], k[:, :split], v[:, :split], fm, causal=True, output_final_state=True)
    o2, s2 = rf_attention(
        q[:, split:], k[:, split:], v[:, split:], fm, causal=True, initial_state=s1, output_final_state=True
    )
    assert_close(torch.cat([o1, o2], 1), o, torch.float64, name="output")
    scale = lambda s: s.log_scale.exp()  # noqa: E731
    assert_close(s2.S * scale(s2)[..., None, None], st.S * scale(st)[..., None, None], torch.float64, name="S")
    assert_close(s2.z * scale(s2)[..., None], st.z * scale(st)[..., None], torch.float64, name="z")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", COMPONENT_CASES, ids=_cid)
def test_masked_keys_equal_removed_keys(case, causal):
    """Masking positions = deleting them (queries there aside): nothing leaks into the normaliser."""
    name, args = case
    q, k, v = qkv(B=1, T=40, H=2, D=8, mag=0.5)
    fm = RandomFeatureMap(8, 16, component=name, num_heads=2, seed=2, dtype=torch.float64, **args).eval()
    keep = torch.ones(1, 40, dtype=torch.bool)
    keep[0, [3, 10, 11, 25, 39]] = False
    o = rf_attention(q, k, v, fm, causal=causal, key_padding_mask=keep)
    idx = keep[0].nonzero()[:, 0]
    o_cut = rf_attention(q[:, idx], k[:, idx], v[:, idx], fm, causal=causal)
    assert_close(o[:, idx], o_cut, torch.float64, name="kept positions")
    # a masked key with huge values must not change anything
    k2, v2 = k.clone(), v.clone()
    k2[0, 10] = 50.0
    v2[0, 10] = 1e6
    assert_close(
        rf_attention(q, k2, v2, fm, causal=causal, key_padding_mask=keep)[:, idx],
        o_cut,
        torch.float64,
        name="masked outlier",
    )


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", COMPONENT_CASES, ids=_cid)
def test_causal_outputs_ignore_the_future(case, training):
    name, args = case
    q, k, v = qkv(B=2, T=70, H=2, D=8, mag=0.6)
    fm = RandomFeatureMap(8, 16, component=name, num_heads=2, seed=4, dtype=torch.float64, **args)
    fm.train(training)
    if fm.spec.data_dependent:
        rf_attention(*qkv(B=2, T=50, H=2, D=8, mag=0.9, seed=5), fm, causal=True)  # earlier batch
    t = 33
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, t + 1 :] = torch.randn_like(q2[:, t + 1 :]) * 3
    k2[:, t + 1 :] = torch.randn_like(k2[:, t + 1 :]) * 3
    v2[:, t + 1 :] = torch.randn_like(v2[:, t + 1 :]) * 3
    o1 = rf_attention(q, k, v, copy.deepcopy(fm), causal=True)
    o2 = rf_attention(q2, k2, v2, copy.deepcopy(fm), causal=True)
    assert_close(o2[:, : t + 1], o1[:, : t + 1], torch.float64, name="outputs up to t")
    assert not torch.allclose(o2[:, t + 1 :], o1[:, t + 1 :])


def test_running_statistics_update_after_forward_in_training_only():
    q, k, v = qkv(B=2, T=30, H=2, D=8)
    fm = RandomFeatureMap(8, 16, component="oprf", num_heads=2, seed=0, dtype=torch.float64)
    assert fm.num_batches_tracked.item() == 0
    o_first = rf_attention(q, k, v, fm, causal=True)
    # the first causal call used the empty statistics (A* = 0): it equals plain PosRF with the same W
    posrf = RandomFeatureMap(8, 16, component="posrf", num_heads=2, seed=0, dtype=torch.float64)
    assert_close(o_first, rf_attention(q, k, v, posrf, causal=True), torch.float64, name="first causal call")
    assert fm.num_batches_tracked.item() == 1
    mean_x = (q * 8**-0.25).mean((0, 1))
    assert_close(fm.running_mean_x, mean_x.float(), torch.float32, name="running mean of x")
    before = [t.clone() for t in fm.running_moments().tensors()]
    fm.eval()
    rf_attention(q, k, v, fm, causal=True)
    assert fm.num_batches_tracked.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, fm.running_moments().tensors()))
    sd = fm.state_dict()
    for name in ("running_mean_x", "running_sq_x", "running_mean_y", "running_sq_y", "num_batches_tracked"):
        assert name in sd
    assert "A" in RandomFeatureMap(8, 16, component="gerf").state_dict()


# ---------------------------------------------------------------- stability
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("component", ["posrf", "hyprf", "oprf", "saderf", "gerf"])
def test_large_inputs_stay_finite_and_accurate(component, causal):
    """|q|, |k| large enough that unstabilised exp features overflow fp32: fp32 still matches fp64."""
    q, k, v = qkv(B=1, T=80, H=2, D=16, mag=6.0)
    fm = RandomFeatureMap(16, 32, component=component, num_heads=2, seed=1).eval()
    o32 = rf_attention(q.float(), k.float(), v.float(), fm, causal=causal)
    fm64 = copy.deepcopy(fm).double()
    o64 = rf_attention(q, k, v, fm64, causal=causal)
    assert torch.isfinite(o32).all()
    assert_close(o32, o64, torch.float32, name="fp32 vs fp64", rtol=1e-3, atol_rel=2e-2)


def test_gaussian_kernel_large_norms_do_not_underflow_to_zero():
    """Gaussian-kernel key exponents all far below zero (large |k|^2): the shared stabiliser follows them
    down (a stabiliser clamped at 0 would flush every feature to 0), and fp32 matches fp64."""
    q, k, v = qkv(B=1, T=50, H=1, D=16, mag=5.0)
    fm = RandomFeatureMap(16, 64, kernel="gaussian", seed=1).eval()
    for causal in (False, True):
        o, st = rf_attention(q.float(), k.float(), v.float(), fm, causal=causal, output_final_state=True)
        o64 = rf_attention(q, k, v, copy.deepcopy(fm).double(), causal=causal)
        assert st.log_scale.item() < -5
        assert_close(o, o64, torch.float32, name="fp32 vs fp64", rtol=1e-3, atol_rel=2e-2)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", COMPONENT_CASES + [("oprf-learnable", {})], ids=_cid)
def test_reference_gradcheck_float64(case, causal):
    name, args = case
    weights = "orf"
    if name.endswith("-learnable"):
        name, weights = "oprf", "learnable"
    q, k, v = qkv(B=1, T=9, H=2, D=4, Dv=3, mag=0.5)
    fm = RandomFeatureMap(
        4, 6, component=name, weights=weights, num_heads=2, seed=0, dtype=torch.float64, **args
    ).eval()
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 4] = False
    q0, k0 = q.clone(), k.clone()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    params = list(fm.parameters())

    def f(q, k, v, *ps):  # ps are fm's own parameters: gradcheck perturbs them in place
        if fm.spec.data_dependent and not causal:
            # A* and Psi are constants for differentiation: freeze them at the unperturbed inputs' values
            p = fm.feature_params(q0, k0, scale=0.5, causal=False, key_padding_mask=mask)
            return reference_attention(q, k, v, p, causal=False, key_padding_mask=mask)[0]
        return rf_attention(q, k, v, fm, causal=causal, key_padding_mask=mask)

    assert torch.autograd.gradcheck(f, (q, k, v, *params), eps=1e-6, atol=1e-7)


def test_learnable_weights_get_gradients_and_fixed_ones_have_none():
    q, k, v = qkv(B=1, T=20, H=2, D=8, dtype=torch.float32)
    for weights in ("learnable", "fastfood_learnable"):
        fm = RandomFeatureMap(8, 16, component="oprf", weights=weights, num_heads=2, seed=0)
        rf_attention(q, k, v, fm, causal=True).sum().backward()
        grads = [p.grad for p in fm.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), weights
    assert list(RandomFeatureMap(8, 16, weights="orf").parameters()) == []


# ---------------------------------------------------------------- shapes and dtypes
def test_empty_sequence_returns_empty_output():
    q, k, v = qkv(B=2, T=0, H=2, D=8, dtype=torch.float32)
    fm = RandomFeatureMap(8, 16, num_heads=2, seed=0)
    for causal in (False, True):
        o, st = rf_attention(q, k, v, fm, causal=causal, output_final_state=True)
        assert o.shape == (2, 0, 2, 8) and st.S.shape == (2, 2, 16, 8) and torch.isneginf(st.log_scale).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_inputs_compute_in_fp32(dtype):
    q, k, v = qkv(B=1, T=30, H=2, D=8)
    fm = RandomFeatureMap(8, 16, num_heads=2, seed=0).eval()
    o = rf_attention(q.to(dtype), k.to(dtype), v.to(dtype), fm, causal=True)
    assert o.dtype == dtype
    ref = rf_attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), fm.double(), causal=True)
    assert_close(o, ref, dtype, name=str(dtype))


def test_shared_feature_map_across_heads():
    q, k, v = qkv(B=1, T=20, H=3, D=8)
    fm = RandomFeatureMap(8, 16, num_heads=1, seed=0, dtype=torch.float64)
    o = rf_attention(q, k, v, fm)
    for h in range(3):
        assert_close(
            o[:, :, h : h + 1],
            rf_attention(q[:, :, h : h + 1], k[:, :, h : h + 1], v[:, :, h : h + 1], fm),
            torch.float64,
            name=f"head {h}",
        )


@pytest.mark.parametrize("component", COMPONENTS)
def test_feature_dim(component):
    fm = RandomFeatureMap(8, 10, component=component)
    wide = component in ("hyprf", "trigrf")
    assert fm.feature_dim == (20 if wide else 10) and fm.num_features == 10
    assert fm.projection().shape == (1, 10, 8)


def test_running_statistics_follow_the_module_dtype():
    """A map converted with .double() keeps updating its (now float64) running statistics."""
    q, k, v = qkv(B=2, T=10, H=2, D=8)
    fm = RandomFeatureMap(8, 16, component="saderf", num_heads=2, seed=0).double()
    for _ in range(2):
        rf_attention(q, k, v, fm, causal=True)
    assert fm.num_batches_tracked.item() == 2 and fm.running_sq_x.dtype == torch.float64
    assert_close(fm.running_sq_x, (q * 8**-0.25).pow(2).mean((0, 1)), torch.float64, name="running E[x^2]")
