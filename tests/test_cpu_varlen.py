"""Packed variable-length sequences (cu_seqlens) in the compiled CPU backend.

One ``cpu_attention(..., cu_seqlens=cu)`` call over [1, Ttot, ...] inputs must equal one call per sequence,
of the CPU backend and of the reference, with row n of the parameters and of the initial state: outputs,
final states and gradients, for every component, causal or not, with grouped-query attention and
sequences of length 0 and 1.
"""

import pytest
import torch
from helpers import assert_close

from spectraformer_fused import RandomFeatureMap, RFState
from spectraformer_fused.contract import DEN_EPS, FeatureParams
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.ops.cpu import cpu_attention
from spectraformer_fused.ops.cpu import extension as cpu_ext
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import empty_state

LENGTHS = [37, 0, 1, 64, 70, 1, 0]

COMPONENT_CASES = [
    ("posrf", {}),
    ("hyprf", {}),
    ("trigrf", {}),
    ("gerf", {"A": -0.1, "s": 1}),
    ("oprf", {}),
    ("saderf", {}),
]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    assert cpu_ops.extension_available(), f"the CPU extension did not build: {cpu_ops.extension_error()}"


def _offsets(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _packed(lengths, H, Hk, D, Dv, dtype, *, seed=0, amp=0.5):
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    q = (amp * torch.randn(1, T, H, D, generator=g)).to(dtype)
    k = (amp * torch.randn(1, T, Hk, D, generator=g)).to(dtype)
    v = torch.randn(1, T, Hk, Dv, generator=g).to(dtype)
    return q, k, v, torch.tensor(_offsets(lengths), dtype=torch.int32)


def _feature_map(component, args, D, m, Hk, weights="orf"):
    return RandomFeatureMap(D, m, component=component, weights=weights, num_heads=Hk, seed=3, **args).eval()


def _row(p: FeatureParams, n) -> FeatureParams:
    pick = lambda t: None if t is None else t[n : n + 1]
    return FeatureParams(
        p.kind, p.W, pick(p.bias), pick(p.freq), pick(p.psi), p.c_t, p.c_o, p.scale, p.num_features, p.feature_dim
    )


def _params(fm, q, k, cu, *, causal, scale):
    """Per-sequence parameters (non-causal OPRF/SADERF statistics of each sequence), rows along dim 0."""
    parts = [
        fm.feature_params(q[:, a:b], k[:, a:b], scale=scale, causal=causal, update_stats=False)
        for a, b in zip(cu[:-1], cu[1:])
    ]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=0)
    p = parts[0]
    return FeatureParams(
        p.kind,
        p.W,
        cat([x.bias for x in parts]),
        cat([x.freq for x in parts]),
        cat([x.psi for x in parts]),
        p.c_t,
        p.c_o,
        p.scale,
        p.num_features,
        p.feature_dim,
    )


def _state(N, Hk, F, Dv, *, seed=4):
    g = torch.Generator().manual_seed(seed)
    S = 0.1 * torch.rand(N, Hk, F, Dv, generator=g)
    z = 0.1 * torch.rand(N, Hk, F, generator=g) + 0.05
    m = torch.randn(N, Hk, generator=g)
    m[0, 0] = float("-inf")  # one empty initial state (S, z zero with it)
    S[0, 0] = 0
    z[0, 0] = 0
    return RFState(S, z, m)


def _per_sequence(fn, q, k, v, params, cu, *, causal, state):
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        init = None if state is None else RFState(*(t[n : n + 1] for t in state))
        o, s = fn(
            q[:, a:b], k[:, a:b], v[:, a:b], _row(params, n), causal=causal, initial_state=init, output_final_state=True
        )
        outs.append(o)
        finals.append(s)
    return torch.cat(outs, dim=1), RFState(*(torch.cat(parts, dim=0) for parts in zip(*finals)))


def _check(got, want, dtype, tag):
    (o, s), (o_ref, s_ref) = got, want
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape, f"{tag}: o {o.dtype} {tuple(o.shape)}"
    assert_close(o, o_ref, dtype, name=f"{tag} o")
    empty = torch.isneginf(s_ref.log_scale)
    assert torch.equal(torch.isneginf(s.log_scale), empty), f"{tag}: empty states differ"
    assert_close(s.log_scale[~empty], s_ref.log_scale[~empty], torch.float32, name=f"{tag} log_scale")
    assert_close(s.S, s_ref.S, dtype, name=f"{tag} S")
    assert_close(s.z, s_ref.z, dtype, name=f"{tag} z")


@pytest.mark.parametrize("causal,with_state", [(False, False), (True, True)], ids=["noncausal", "causal-state"])
@pytest.mark.parametrize("case", COMPONENT_CASES, ids=[c[0] for c in COMPONENT_CASES])
def test_components_fp32(case, causal, with_state):
    _compare_components(case, causal, with_state)


@pytest.mark.parametrize("causal,with_state", [(False, True), (True, False)], ids=["noncausal-state", "causal"])
@pytest.mark.parametrize("case", [COMPONENT_CASES[0], COMPONENT_CASES[-1]], ids=["posrf", "saderf"])
def test_state_and_causality_combinations(case, causal, with_state):
    _compare_components(case, causal, with_state)


def _compare_components(case, causal, with_state):
    component, args = case
    H, Hk, D, Dv, m = 4, 2, 24, 16, 32
    q, k, v, cu_t = _packed(LENGTHS, H, Hk, D, Dv, torch.float32)
    cu = cu_t.tolist()
    fm = _feature_map(component, args, D, m, Hk)
    params = _params(fm, q, k, cu, causal=causal, scale=D**-0.5)
    state = _state(len(LENGTHS), Hk, fm.feature_dim, Dv) if with_state else None
    got = cpu_attention(q, k, v, params, causal=causal, initial_state=state, output_final_state=True, cu_seqlens=cu_t)
    tag = f"{component} causal={causal} state={with_state}"
    _check(
        got,
        _per_sequence(cpu_attention, q, k, v, params, cu, causal=causal, state=state),
        torch.float32,
        f"{tag} vs cpu per sequence",
    )
    _check(
        got,
        _per_sequence(reference_attention, q, k, v, params, cu, causal=causal, state=state),
        torch.float32,
        f"{tag} vs reference per sequence",
    )
    for n in (1, 6):  # empty sequences: their final state is their initial state, or the empty state
        want = empty_state(1, Hk, fm.feature_dim, Dv) if state is None else RFState(*(t[n : n + 1] for t in state))
        assert all(torch.equal(a[n : n + 1], w) for a, w in zip(got[1], want)), f"{tag}: empty sequence {n}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("component", ["posrf", "saderf"])
def test_half_precision(component, causal, dtype):
    H, Hk, D, Dv, m = 2, 1, 32, 32, 64
    q, k, v, cu_t = _packed(LENGTHS, H, Hk, D, Dv, dtype, amp=1.0)
    cu = cu_t.tolist()
    fm = _feature_map(component, {}, D, m, Hk)
    params = _params(fm, q, k, cu, causal=causal, scale=D**-0.5)
    got = cpu_attention(q, k, v, params, causal=causal, output_final_state=True, cu_seqlens=cu_t)
    assert got[0].dtype == dtype
    _check(
        got,
        _per_sequence(reference_attention, q, k, v, params, cu, causal=causal, state=None),
        dtype,
        f"{component} {dtype} causal={causal}",
    )


def test_params_expanded_over_sequences():
    """Parameters that do not depend on the data may come once, expanded (stride 0) over the N sequences."""
    lengths = [5, 70, 0, 1]
    q, k, v, cu_t = _packed(lengths, 2, 2, 16, 8, torch.float32)
    fm = _feature_map("hyprf", {}, 16, 16, 2)
    p = fm.feature_params(q, k, scale=0.25, causal=True, update_stats=False)
    N = len(lengths)
    wide = FeatureParams(
        p.kind,
        p.W,
        p.bias.expand(N, -1, -1),
        p.freq.expand(N, -1),
        None,
        p.c_t,
        p.c_o,
        p.scale,
        p.num_features,
        p.feature_dim,
    )
    got = cpu_attention(q, k, v, wide, causal=True, output_final_state=True, cu_seqlens=cu_t)
    _check(
        got,
        _per_sequence(reference_attention, q, k, v, wide, cu_t.tolist(), causal=True, state=None),
        torch.float32,
        "expanded params",
    )


@pytest.mark.parametrize("lengths", [[0], [0, 0], [1], [1, 0, 1]], ids=str)
def test_empty_and_single_token(lengths):
    q, k, v, cu_t = _packed(lengths, 2, 1, 16, 8, torch.float32)
    fm = _feature_map("posrf", {}, 16, 16, 1)
    params = _params(fm, q, k, cu_t.tolist(), causal=True, scale=0.25)
    state = _state(len(lengths), 1, fm.feature_dim, 8)
    got = cpu_attention(q, k, v, params, causal=True, initial_state=state, output_final_state=True, cu_seqlens=cu_t)
    assert got[0].shape == (1, sum(lengths), 2, 8) and got[1].S.shape == (len(lengths), 1, 16, 8)
    _check(
        got,
        _per_sequence(reference_attention, q, k, v, params, cu_t.tolist(), causal=True, state=state),
        torch.float32,
        f"lengths {lengths}",
    )


def test_thread_count_does_not_change_result():
    lengths = [300, 3, 129, 0, 64, 200]
    q, k, v, cu_t = _packed(lengths, 3, 3, 16, 16, torch.float32)
    fm = _feature_map("posrf", {}, 16, 32, 3)
    params = _params(fm, q, k, cu_t.tolist(), causal=True, scale=0.25)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention(q, k, v, params, causal=True, output_final_state=True, cu_seqlens=cu_t)
        torch.set_num_threads(max(2, threads))
        many = cpu_attention(q, k, v, params, causal=True, output_final_state=True, cu_seqlens=cu_t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and all(torch.equal(a, b) for a, b in zip(one[1], many[1]))


def _grads(varlen, q, k, v, fm, state, cu_t, causal):
    """Gradients of q, k, v, the initial S and z and the feature map's parameters: one packed call of the
    CPU backend (varlen) or one reference call per sequence, each with its own parameters' graph."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, state.S, state.z)]
    lq, lk, lv, lS, lz = leaves
    init = RFState(lS, lz, state.log_scale)
    cu = cu_t.tolist()
    fm.zero_grad()
    params = _params(fm, lq, lk, cu, causal=causal, scale=0.25)
    if varlen:
        o, s = cpu_attention(
            lq, lk, lv, params, causal=causal, initial_state=init, output_final_state=True, cu_seqlens=cu_t
        )
    else:
        o, s = _per_sequence(reference_attention, lq, lk, lv, params, cu, causal=causal, state=init)
    g = torch.Generator().manual_seed(9)
    loss = (
        (o * torch.randn(o.shape, generator=g)).sum()
        + (s.S * torch.randn(s.S.shape, generator=g)).sum()
        + (s.z * torch.randn(s.z.shape, generator=g)).sum()
    )
    loss.backward()
    return [t.grad for t in leaves] + [p.grad.clone() for p in fm.parameters()]


@pytest.mark.parametrize(
    "component,causal",
    [("posrf", False), ("posrf", True), ("gerf", True), ("oprf", False)],
    ids=["posrf-noncausal", "posrf-causal", "gerf-causal", "oprf-noncausal"],
)
def test_gradients_match_reference(component, causal):
    # The non-causal OPRF statistics of an empty sequence are NaN (a mean over no tokens), and so is the
    # gradient they pass to W: data-dependent components get no empty sequence here.
    lengths = [20, 1, 45] if component == "oprf" else [20, 0, 1, 45]
    H, Hk, D, Dv, m = 4, 2, 16, 8, 16
    q, k, v, cu_t = _packed(lengths, H, Hk, D, Dv, torch.float32, amp=0.7)
    args = {"A": -0.1, "s": 1} if component == "gerf" else {}
    fm = _feature_map(component, args, D, m, Hk, weights="learnable")
    state = _state(len(lengths), Hk, fm.feature_dim, Dv)
    got = _grads(True, q, k, v, fm, state, cu_t, causal)
    want = _grads(False, q, k, v, fm, state, cu_t, causal)
    names = ["dq", "dk", "dv", "dS0", "dz0"] + [f"dparam{i}" for i in range(len(got) - 5)]
    assert len(got) > 5, "the learnable weights should contribute a parameter gradient"
    for name, a, b in zip(names, got, want):
        assert a is not None, f"{name} missing"
        assert b.abs().sum() > 0, f"{name} is zero in the reference"
        assert_close(a, b, torch.float32, name=f"{component} causal={causal} {name}")


def _dense_args(T=8):
    q, k, v, _ = _packed([T], 2, 2, 16, 8, torch.float32)
    fm = _feature_map("posrf", {}, 16, 16, 2)
    return q, k, v, fm.feature_params(q, k, scale=0.25, causal=True, update_stats=False)


def test_state_parts_given_together():
    q, k, v, p = _dense_args()
    S, z, m = _state(1, 2, 16, 8)
    ext = cpu_ext._load()
    for parts in ((S, None, None), (S, z, None), (None, z, m), (S, None, m)):
        with pytest.raises(ValueError, match="S, z and log_scale"):
            ext.forward(
                q, k, v, p.W, p.bias, p.freq, None, int(p.kind), p.c_t, p.c_o, p.scale, True, None, *parts, DEN_EPS
            )
        with pytest.raises(ValueError, match="S, z and log_scale"):
            cpu_attention(q, k, v, p, causal=True, initial_state=RFState(*parts))


@pytest.mark.parametrize(
    "cu,match",
    [
        ([0, 4, 7], "end at the packed length"),
        ([0, 5, 3, 8], "non-decreasing"),
        ([1, 8], "start at 0"),
        ([8], r"\[N \+ 1\]"),
    ],
    ids=str,
)
def test_bad_offsets_rejected(cu, match):
    q, k, v, p = _dense_args()
    with pytest.raises(ValueError, match=match):
        cpu_attention(q, k, v, p, causal=True, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_param_rows_checked():
    q, k, v, cu_t = _packed([3, 5], 2, 2, 16, 8, torch.float32)
    fm = _feature_map("posrf", {}, 16, 16, 2)
    p = fm.feature_params(q, k, scale=0.25, causal=True, update_stats=False)
    three = FeatureParams(
        p.kind,
        p.W,
        p.bias.expand(3, -1, -1),
        p.freq.expand(3, -1),
        None,
        p.c_t,
        p.c_o,
        p.scale,
        p.num_features,
        p.feature_dim,
    )
    with pytest.raises(ValueError, match="bias must be"):
        cpu_attention(q, k, v, three, causal=True, cu_seqlens=cu_t)
