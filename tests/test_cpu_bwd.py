"""The fused CPU backward (csrc/rf_backward.cpp) against the reference backend's autograd.

Every gradient is compared: q, k, v, the learnable weights (through ``projection()``; OPRF and GERF have
A != 0, so their bias depends on W too), the initial state's S and z, with a loss that also reads the
final state when a case says so. The extension is built here if it is not cached yet.
"""

import pytest
import torch
from helpers import Case, assert_close, case_id

from spectraformer_fused import RandomFeatureMap, rf_attention
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.ops.cpu import extension as cpu_ext
from spectraformer_fused.state import RFState

pytestmark = pytest.mark.skipif(cpu_ext._disabled(), reason=f"the CPU extension is disabled by {cpu_ops.SKIP_ENV}")


def _case(component: str, **kw) -> Case:
    return Case(component, **{"weights": "learnable", "D": 24, "Dv": 24, "m": 16, **kw})


CASES = [
    _case("posrf", causal=True, T=150, mask=True, init=True, final=True),
    _case("posrf", causal=False, T=150, mask=True, init=True, final=True),
    _case("posrf", causal=True, T=1, init=True, final=True),
    _case("hyprf", causal=True, kernel="gaussian", T=37, Dv=19, init=True, final=True),
    _case("hyprf", causal=False, T=37, mask=True),
    _case("trigrf", causal=True, T=100, amp=0.3, final=True),
    _case("trigrf", causal=False, T=37, amp=0.3, init=True, final=True),
    _case("gerf", causal=True, T=37, mask=True, args={"A": -0.1}),
    _case("gerf", causal=False, T=37, amp=0.3, args={"A": -0.05, "s": -1}),
    _case("oprf", causal=True, T=130, weights="fastfood_learnable", init=True, final=True),
    _case("saderf", causal=False, T=37, kernel="gaussian", init=True, final=True),
    _case("saderf", causal=True, T=37, mask=True),
    _case("posrf", causal=True, T=100, H=4, H_kv=2, init=True, final=True),
    _case("hyprf", causal=False, T=37, H=4, H_kv=1, mask=True, final=True),
    _case("posrf", causal=True, T=37, shared=True, weights="orf", init=True, final=True),
    _case("posrf", causal=True, T=100, dtype=torch.bfloat16, mask=True),
    _case("trigrf", causal=False, T=37, amp=0.3, dtype=torch.float16, final=True),
]


def _make(case: Case, *, seed=0, packed=None):
    """A feature map in eval mode (OPRF/SADERF statistics filled) and inputs; ``packed``: sequence
    lengths of one packed row (the state then has one row per sequence)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=gen) * s

    Hk = case.kv_heads
    fm = RandomFeatureMap(
        case.D,
        case.m,
        component=case.component,
        weights=case.weights,
        kernel=case.kernel,
        num_heads=1 if case.shared else Hk,
        seed=seed,
        **case.args,
    )
    B, T = (1, sum(packed)) if packed else (case.B, case.T)
    rows = len(packed) if packed else B
    q = rnd(B, T, case.H, case.D, s=case.amp).to(case.dtype)
    k = rnd(B, T, Hk, case.D, s=case.amp).to(case.dtype)
    v = rnd(B, T, Hk, case.Dv).to(case.dtype)
    if fm.spec.data_dependent:
        fm.train()
        fm.feature_params(rnd(B, T, case.H, case.D), rnd(B, T, Hk, case.D), scale=case.D**-0.5, causal=False)
    fm.eval()
    mask = None
    if case.mask:
        mask = torch.rand(B, T, generator=gen) > 0.3
        mask[:, 0] = True
    state = None
    if case.init:
        F = fm.feature_dim
        state = RFState(rnd(rows, Hk, F, case.Dv).abs() * 0.1, rnd(rows, Hk, F).abs() * 0.1 + 0.05, rnd(rows, Hk))
    return fm, q, k, v, mask, state


def _run(backend, fm, q, k, v, mask, state, case: Case, *, cu_seqlens=None, seed=1):
    """Forward + backward of a fixed random linear loss of o (and of the final state, when asked)."""
    fm.zero_grad(set_to_none=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    st = None
    if state is not None:
        st = RFState(state.S.clone().requires_grad_(), state.z.clone().requires_grad_(), state.log_scale)
    o, final = rf_attention(
        q,
        k,
        v,
        fm,
        causal=case.causal,
        key_padding_mask=mask,
        initial_state=st,
        output_final_state=True,
        backend=backend,
        cu_seqlens=cu_seqlens,
    )
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    if case.final:
        loss = loss + (final.S * torch.randn(final.S.shape, generator=gen)).sum()
        loss = loss + (final.z * torch.randn(final.z.shape, generator=gen)).sum()
    if loss.requires_grad:
        loss.backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    grads.update({f"W.{n}": p.grad for n, p in fm.named_parameters() if p.requires_grad})
    if st is not None:
        grads["S0"], grads["z0"] = st.S.grad, st.z.grad
    return o, final, grads


def _compare(case, g, g_ref):
    for name, expected in g_ref.items():
        if expected is None:  # T = 0 (nothing to differentiate) or a leaf the loss does not reach
            assert g[name] is None or not g[name].abs().any(), name
            continue
        assert g[name] is not None, f"no gradient for {name}"
        assert g[name].dtype == expected.dtype, name
        assert_close(g[name], expected, case.dtype, name=f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_reference(case):
    fm, q, k, v, mask, state = _make(case)
    o_ref, _, g_ref = _run("reference", fm, q, k, v, mask, state, case)
    o, _, g = _run("cpu", fm, q, k, v, mask, state, case)
    assert_close(o, o_ref, case.dtype, name="o")
    assert any(n.startswith("W.") for n in g_ref) or case.weights == "orf"
    _compare(case, g, g_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_packed_sequences(causal):
    """cu_seqlens: every (sequence, head) task, an empty sequence among them, equals the reference's
    per-sequence autograd, including the per-sequence initial and final states."""
    case = _case("hyprf", causal=causal, H=4, H_kv=2, init=True, final=True)
    lengths = [37, 0, 70, 1]
    fm, q, k, v, _, state = _make(case, packed=lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _, _, g_ref = _run("reference", fm, q, k, v, None, state, case, cu_seqlens=cu)
    _, _, g = _run("cpu", fm, q, k, v, None, state, case, cu_seqlens=cu)
    _compare(case, g, g_ref)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_empty_sequence_passes_state_gradient(causal):
    """T = 0: no output; the final state is the initial one, so its gradient passes straight through."""
    case = _case("posrf", causal=causal, T=0, init=True, final=True)
    fm, q, k, v, mask, state = _make(case)
    _, _, g_ref = _run("reference", fm, q, k, v, mask, state, case)
    _, _, g = _run("cpu", fm, q, k, v, mask, state, case)
    _compare(case, g, g_ref)


def test_log_scale_gradient_falls_back_to_reference():
    """A log_scale that requires grad is differentiated through the reference recompute: still exact."""
    case = _case("posrf", causal=True, T=37, init=True, final=True)
    fm, q, k, v, mask, state = _make(case)
    grads = {}
    for backend in ("reference", "cpu"):
        m0 = state.log_scale.clone().requires_grad_()
        st = RFState(state.S, state.z, m0)
        o, final = rf_attention(q, k, v, fm, causal=True, initial_state=st, output_final_state=True, backend=backend)
        (o.sum() + final.S.sum()).backward()
        grads[backend] = m0.grad
    assert_close(grads["cpu"], grads["reference"], torch.float32, name="dlog_scale")


def test_deterministic():
    """Two backward passes give bitwise equal gradients (fixed-order reductions, no atomics)."""
    case = _case("posrf", causal=True, B=3, T=100, H=4, H_kv=2, init=True, final=True)
    fm, q, k, v, mask, state = _make(case)
    _, _, g1 = _run("cpu", fm, q, k, v, mask, state, case)
    _, _, g2 = _run("cpu", fm, q, k, v, mask, state, case)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
