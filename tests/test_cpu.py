"""The compiled CPU backend (csrc/, spectraformer_fused/ops/cpu/attention.py) against the reference backend.

The extension is built here if it is not cached yet: a build failure fails these tests (it is not a
reason to skip them).
"""

import pytest
import torch
from helpers import Case, assert_close, case_id, causal_id

from spectraformer_fused import RandomFeatureMap, available_backends, rf_attention
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.ops.cpu import extension as cpu_ext

# every component (gerf with both signs s) x kernel x causal, fp32, masked
COMPONENT_CASES = [
    Case(component, causal, kernel=kernel, B=2, T=100, H=2, D=24, Dv=40, m=32, mask=True, amp=0.5, args=args)
    for component, args in [
        ("posrf", {}),
        ("hyprf", {}),
        ("trigrf", {}),
        ("gerf", {"A": -0.1, "s": 1}),
        ("gerf", {"A": -0.1, "s": -1}),
        ("oprf", {}),
        ("saderf", {}),
    ]
    for kernel in ("softmax", "gaussian")
    for causal in (False, True)
]


def _inputs(B, T, H, D, Dv, dtype, *, seed=0, amp=1.0, vdtype=None):
    g = torch.Generator().manual_seed(seed)
    q = (amp * torch.randn(B, T, H, D, generator=g)).to(dtype)
    k = (amp * torch.randn(B, T, H, D, generator=g)).to(dtype)
    v = torch.randn(B, T, H, Dv, generator=g).to(vdtype or dtype)
    return q, k, v


def _feature_map(component, args, D, m, H, *, kernel="softmax", weights="orf"):
    return RandomFeatureMap(
        D, m, component=component, kernel=kernel, weights=weights, num_heads=H, seed=3, **args
    ).eval()


def _both(q, k, v, fm, **kw):
    out = {}
    for backend in ("cpu", "reference"):
        o, state = rf_attention(q, k, v, fm, backend=backend, output_final_state=True, **kw)
        out[backend] = (o, state)
    return out["cpu"], out["reference"]


def _check_log_scale(a, b, name):
    """-inf (empty state) exactly where the reference has it, close elsewhere."""
    empty = torch.isneginf(b)
    assert torch.equal(torch.isneginf(a), empty), f"{name}: empty states differ: {a} vs {b}"
    assert_close(a[~empty], b[~empty], torch.float32, name=name)


def _check(cpu, ref, dtype, tag, *, check_state=True):
    (o, s), (o_ref, s_ref) = cpu, ref
    assert o.dtype == o_ref.dtype, f"{tag}: output dtype {o.dtype} != {o_ref.dtype}"
    assert_close(o, o_ref, dtype, name=f"{tag} o")
    if check_state:
        assert s.S.dtype == torch.float32 and s.z.dtype == torch.float32
        _check_log_scale(s.log_scale, s_ref.log_scale, f"{tag} log_scale")
        assert_close(s.S, s_ref.S, dtype, name=f"{tag} S")
        assert_close(s.z, s_ref.z, dtype, name=f"{tag} z")


def test_extension_builds():
    assert cpu_ops.extension_available(), f"the CPU extension did not build: {cpu_ops.extension_error()}"
    assert cpu_ops.extension_error() == ""
    assert "cpu" in available_backends()


@pytest.mark.parametrize("case", COMPONENT_CASES, ids=case_id)
def test_components_fp32(case):
    q, k, v = _inputs(case.B, case.T, case.H, case.D, case.Dv, case.dtype, amp=case.amp)
    mask = torch.rand(case.B, case.T, generator=torch.Generator().manual_seed(1)) > 0.25
    fm = _feature_map(case.component, case.args, case.D, case.m, case.H, kernel=case.kernel)
    cpu, ref = _both(q, k, v, fm, causal=case.causal, key_padding_mask=mask)
    _check(cpu, ref, case.dtype, case.id)


HALF_CASES = [
    Case(component, causal, dtype, B=2, T=77, H=2, D=32, Dv=32, m=64)
    for component in ("posrf", "hyprf", "saderf")
    for causal in (False, True)
    for dtype in (torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("case", HALF_CASES, ids=case_id)
def test_half_precision(case):
    q, k, v = _inputs(case.B, case.T, case.H, case.D, case.Dv, case.dtype)
    fm = _feature_map(case.component, {}, case.D, case.m, case.H)
    cpu, ref = _both(q, k, v, fm, causal=case.causal)
    _check(cpu, ref, case.dtype, case.id)


# posrf at odd and even sizes, one shared W or one per head, masked (the first half of batch 0 masked) or not
SHAPES = [
    Case("posrf", causal, B=B, T=T, H=H, D=D, Dv=Dv, m=m, shared=shared, mask=mask)
    for B, T, H, D, Dv, m, shared, mask in [
        (1, 1, 1, 16, 16, 16, False, False),
        (1, 63, 3, 24, 8, 48, False, True),
        (2, 64, 2, 32, 32, 64, True, False),
        (2, 65, 4, 40, 24, 40, True, True),
        (1, 200, 2, 64, 64, 128, False, False),
        (3, 129, 1, 8, 72, 20, False, True),
    ]
    for causal in (False, True)
]


@pytest.mark.parametrize("case", SHAPES, ids=case_id)
def test_shapes(case):
    B, T, H = case.B, case.T, case.H
    q, k, v = _inputs(B, T, H, case.D, case.Dv, case.dtype, seed=T)
    fm = _feature_map(case.component, {}, case.D, case.m, 1 if case.shared else H)
    mask = None
    if case.mask:
        mask = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[0, : T // 2] = False
    cpu, ref = _both(q, k, v, fm, causal=case.causal, key_padding_mask=mask)
    _check(cpu, ref, case.dtype, case.id)


def test_all_keys_masked():
    q, k, v = _inputs(2, 20, 2, 16, 16, torch.float32)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    fm = _feature_map("hyprf", {}, 16, 16, 2)
    for causal in (False, True):
        cpu, ref = _both(q, k, v, fm, causal=causal, key_padding_mask=mask)
        _check(cpu, ref, torch.float32, f"all masked causal={causal}")
        assert torch.isneginf(cpu[1].log_scale[1]).all()
        assert (cpu[0][1] == 0).all()


def test_value_dtype_differs():
    q, k, _ = _inputs(1, 50, 2, 16, 16, torch.float32)
    v = torch.randn(1, 50, 2, 24).to(torch.bfloat16)
    fm = _feature_map("posrf", {}, 16, 32, 2)
    for causal in (False, True):
        cpu, ref = _both(q, k, v, fm, causal=causal)
        assert cpu[0].dtype == torch.bfloat16
        _check(cpu, ref, torch.bfloat16, f"bf16 v causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=causal_id)
@pytest.mark.parametrize("component", ["posrf", "trigrf"])
def test_initial_state(component, causal):
    B, T, H, D, Dv, m = 2, 90, 2, 16, 24, 32
    q, k, v = _inputs(B, T, H, D, Dv, torch.float32, amp=0.5)
    fm = _feature_map(component, {}, D, m, H)
    _, s0 = rf_attention(q[:, :30], k[:, :30], v[:, :30], fm, causal=True, output_final_state=True, backend="reference")
    cpu, ref = _both(q[:, 30:], k[:, 30:], v[:, 30:], fm, causal=causal, initial_state=s0)
    _check(cpu, ref, torch.float32, f"{component} initial state causal={causal}")
    legacy = rf_attention(q[:, 30:], k[:, 30:], v[:, 30:], fm, causal=causal, initial_state=(s0.S, s0.z), backend="cpu")
    legacy_ref = rf_attention(
        q[:, 30:], k[:, 30:], v[:, 30:], fm, causal=causal, initial_state=(s0.S, s0.z), backend="reference"
    )
    assert_close(legacy, legacy_ref, torch.float32, name="(S, z) initial state")


def test_pieces_equal_one_pass():
    B, T, H, D, Dv, m = 1, 150, 2, 32, 16, 64
    q, k, v = _inputs(B, T, H, D, Dv, torch.float32)
    fm = _feature_map("hyprf", {}, D, m, H)
    o_full, s_full = rf_attention(q, k, v, fm, causal=True, output_final_state=True, backend="cpu")
    state, outs = None, []
    for lo, hi in ((0, 1), (1, 70), (70, 71), (71, 150)):
        o, state = rf_attention(
            q[:, lo:hi],
            k[:, lo:hi],
            v[:, lo:hi],
            fm,
            causal=True,
            initial_state=state,
            output_final_state=True,
            backend="cpu",
        )
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_full, torch.float32, name="pieces o")
    assert_close(
        state.S * state.log_scale.exp()[..., None, None],
        s_full.S * s_full.log_scale.exp()[..., None, None],
        torch.float32,
        name="pieces S",
    )


def test_empty_sequence():
    q, k, v = _inputs(2, 0, 2, 16, 8, torch.float32)
    fm = _feature_map("posrf", {}, 16, 16, 2)
    o, s = rf_attention(q, k, v, fm, causal=True, output_final_state=True, backend="cpu")
    assert o.shape == (2, 0, 2, 8) and s.S.shape == (2, 2, 16, 8)
    assert torch.isneginf(s.log_scale).all() and (s.S == 0).all()


@pytest.mark.parametrize("component", ["posrf", "hyprf", "oprf"])
def test_decode_loop_equals_causal_pass(component):
    B, T, H, D, Dv, m = 1, 500, 2, 16, 16, 32
    q, k, v = _inputs(B, T, H, D, Dv, torch.float32, seed=5)
    fm = _feature_map(component, {}, D, m, H)
    o_ref, s_ref = rf_attention(q, k, v, fm, causal=True, output_final_state=True, backend="reference")
    state, outs = None, []
    for t in range(T):
        o, state = rf_attention(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            fm,
            causal=True,
            initial_state=state,
            output_final_state=True,
            backend="cpu",
        )
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_ref, torch.float32, name=f"{component} decode o")
    _check_log_scale(state.log_scale, s_ref.log_scale, "decode log_scale")
    assert_close(state.S, s_ref.S, torch.float32, name="decode S")
    assert_close(state.z, s_ref.z, torch.float32, name="decode z")


def test_thread_count_does_not_change_result():
    q, k, v = _inputs(2, 70, 3, 16, 16, torch.float32)
    fm = _feature_map("posrf", {}, 16, 32, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rf_attention(q, k, v, fm, causal=True, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = rf_attention(q, k, v, fm, causal=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def _grads(backend, q, k, v, fm, S0, z0, causal):
    tensors = [t.detach().clone().requires_grad_(True) for t in (q, k, v, S0, z0)]
    fm.zero_grad()
    o, s = rf_attention(
        *tensors[:3],
        fm,
        causal=causal,
        initial_state=(tensors[3], tensors[4]),
        output_final_state=True,
        backend=backend,
    )
    g = torch.Generator().manual_seed(9)
    loss = (
        (o * torch.randn(o.shape, generator=g)).sum()
        + (s.S * torch.randn(s.S.shape, generator=g)).sum()
        + (s.z * torch.randn(s.z.shape, generator=g)).sum()
    )
    loss.backward()
    params = [p.grad.clone() for p in fm.parameters()]
    return [t.grad for t in tensors] + params


@pytest.mark.parametrize("causal", [False, True], ids=causal_id)
@pytest.mark.parametrize("component", ["posrf", "gerf"])
def test_gradients_match_reference(component, causal):
    B, T, H, D, Dv, m = 2, 40, 2, 16, 8, 16
    q, k, v = _inputs(B, T, H, D, Dv, torch.float32, amp=0.7)
    fm = _feature_map(component, {}, D, m, H, weights="learnable")
    F = fm.feature_dim
    S0 = 0.1 * torch.rand(B, H, F, Dv)
    z0 = 0.1 * torch.rand(B, H, F) + 0.05
    got = _grads("cpu", q, k, v, fm, S0, z0, causal)
    want = _grads("reference", q, k, v, fm, S0, z0, causal)
    names = ["dq", "dk", "dv", "dS0", "dz0"] + [f"dparam{i}" for i in range(len(got) - 5)]
    assert len(got) > 5, "the learnable weights should contribute a parameter gradient"
    for name, a, b in zip(names, got, want):
        assert a is not None, f"{name} missing"
        assert b.abs().sum() > 0, f"{name} is zero in the reference"
        assert_close(a, b, torch.float32, name=name)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken_build():
        raise OSError("no compiler found")

    monkeypatch.setattr(cpu_ext, "_module", None)
    monkeypatch.setattr(cpu_ext, "_error", None)
    monkeypatch.setattr(cpu_ext, "_warned", False)
    monkeypatch.setattr(cpu_ext, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="g\\+\\+.*ninja") as record:
        assert cpu_ops.extension_available() is False
        assert cpu_ops.extension_available() is False
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert "no compiler found" in cpu_ops.extension_error()
    assert "cpu" not in available_backends()
    q, k, v = _inputs(1, 8, 1, 16, 16, torch.float32)
    fm = _feature_map("posrf", {}, 16, 16, 1)
    with pytest.raises(RuntimeError, match="unavailable"):
        rf_attention(q, k, v, fm, backend="cpu")
    o = rf_attention(q, k, v, fm, backend="auto")
    assert_close(o, rf_attention(q, k, v, fm, backend="reference"), torch.float32, name="auto fallback")
