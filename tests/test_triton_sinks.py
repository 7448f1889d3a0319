"""Attention sinks and the learned exact-part factor (DESIGN.md section 8) on the Triton hybrid
(ops/triton/window.py): against the dense fp64 oracle ``helpers.hybrid_oracle(..., sinks=)`` and against
``reference_attention(..., window=W, sinks=S)`` for gradients (q, k, v, a learnable W, the factor, the initial
state) and final states; W and S from 0/1 to >= T, causal and not, masks, GQA, packed sequences (sinks per
sequence), pieces and token by token, hedgehog. Without CUDA the kernels run in the Triton interpreter
(conftest.py), so the shapes are small.
"""

import math

import pytest
import torch
from helpers import assert_close, hybrid_oracle

from spectraformer_fused import RandomFeatureMap, rf_attention
from spectraformer_fused.ops import triton_importable
from spectraformer_fused.reference import exact_attention, reference_attention
from spectraformer_fused.state import WindowState

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA: the interpreter (conftest.py)

MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"
D = 16
T = 21


def _attend(*args, **kw):
    from spectraformer_fused.ops.triton.attention import triton_attention

    kw.setdefault("key_padding_mask", None)
    kw.setdefault("initial_state", None)
    kw.setdefault("output_final_state", False)
    return triton_attention(*args, **kw)


def _inputs(B=2, T=T, H=4, Hk=2, Dv=8, *, seed=0, dtype=torch.float32, amp=0.8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g) * amp
    k = torch.randn(B, T, Hk, D, generator=g) * amp
    v = torch.randn(B, T, Hk, Dv, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def _map(component="hyprf", Hk=2, *, kernel="softmax", weights="orf", mix=0.4):
    fm = RandomFeatureMap(D, 16, component=component, kernel=kernel, num_heads=Hk, weights=weights, seed=3, mix=mix)
    with torch.no_grad():
        if fm.log_mix is not None and Hk > 1:  # a different factor per key/value head
            fm.log_mix.add_(torch.linspace(-0.5, 0.5, Hk))
        if fm.spec.learned:
            fm.log_weight.copy_(torch.randn(fm.log_weight.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    return fm.eval().to(DEVICE)


def _params(fm, q, k, causal, **kw):
    return fm.feature_params(q, k, scale=1.0 / math.sqrt(D), causal=causal, **kw)


def _mask(B, T, seed=1):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, 0] = False  # a masked sink
    mask[1, : T // 3] = False
    mask[:, 1] = True
    return mask.to(DEVICE)


def _true_state(s):
    e = torch.exp(torch.where(torch.isneginf(s.log_scale), torch.zeros_like(s.log_scale), s.log_scale))
    return s.S * e[..., None, None], s.z * e[..., None]


def _check_state(a, b, tag):
    assert isinstance(a, WindowState)
    for name, x, y in zip(("S", "z"), _true_state(a), _true_state(b)):
        assert_close(x, y, torch.float32, name=f"{tag} {name} (times exp(log_scale))")
    for name in ("k_tail", "v_tail", "k_sink", "v_sink"):
        assert_close(getattr(a, name), getattr(b, name), torch.float32, name=f"{tag} {name}")
    for name in ("tail_keep", "sink_keep", "sink_seen"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"{tag}: {name} {x} != {y}"


# --------------------------------------------------------------------------- forward against the oracle
CASES = [(0, 1), (0, 4), (1, 1), (3, 2), (5, 4), (2, T), (T, 3), (0, T + 5), (4, 0)]


@pytest.mark.parametrize("window,sinks", CASES, ids=[f"W{w}-S{s}" for w, s in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("component,kernel", [("hyprf", "softmax"), ("posrf", "gaussian")])
def test_matches_oracle(component, kernel, causal, window, sinks):
    """GQA (4 query heads on 2 key/value heads), a padding mask (a masked sink), the factor per head."""
    q, k, v = _inputs()
    mask = _mask(2, T)
    fm = _map(component, kernel=kernel)
    p = _params(fm, q, k, causal, key_padding_mask=mask)
    o, _ = _attend(q, k, v, p, causal=causal, window=window, sinks=sinks, key_padding_mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask, sinks=sinks)
    assert o.dtype == v.dtype
    assert_close(o, ref, torch.float32, name=f"{component} causal={causal} W={window} S={sinks} o")


def test_all_exact_is_softmax():
    """S >= T or W >= T: every visible key is exact, the factor cancels, the row is softmax."""
    q, k, v = _inputs(T=12)
    fm = _map("posrf", mix=5.0)
    for causal in (False, True):
        p = _params(fm, q, k, causal)
        for window, sinks in ((0, 12), (2, 12), (12, 1)):
            o, _ = _attend(q, k, v, p, causal=causal, window=window, sinks=sinks)
            ref = exact_attention(q, k, v, causal=causal, scale=p.scale)
            assert_close(o, ref, torch.float32, name=f"causal={causal} W={window} S={sinks}")


def test_half_precision():
    q, k, v = _inputs(T=19, seed=8, dtype=torch.float16)
    fm = _map("hyprf")
    for causal in (False, True):
        p = _params(fm, q, k, causal)
        o, _ = _attend(q, k, v, p, causal=causal, window=3, sinks=2)
        assert o.dtype == torch.float16
        ref = hybrid_oracle(q, k, v, p, window=3, causal=causal, sinks=2)
        assert_close(o, ref, torch.float16, name=f"fp16 causal={causal}")


# --------------------------------------------------------------------------- gradients against the reference
def _grads(backend, fm, q, k, v, state, *, causal, window, sinks, mask=None, cu_seqlens=None):
    """Outputs, final state and the gradients of a loss on both for q, k, v, the map's parameters (the factor
    included) and the initial state (S, z, the tail and the sink slots)."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    st = None
    if state is not None:
        grad_fields = (0, 1, 3, 4, 6, 7)
        st = WindowState(*(t.detach().clone().requires_grad_(i in grad_fields) for i, t in enumerate(state)))
    fm.zero_grad()
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()
    p = _params(fm, xs[0], xs[1], causal, key_padding_mask=mask, offsets=offsets)
    kw = dict(causal=causal, window=window, key_padding_mask=mask, initial_state=st, output_final_state=True)
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    if backend == "triton":
        o, s = _attend(*xs, p, sinks=sinks, **kw)
    else:
        o, s = reference_attention(*xs, p, sinks=sinks, **kw)
    S, z = _true_state(s)
    g = torch.Generator().manual_seed(7)
    outs = (o, S, z, s.k_tail, s.v_tail, s.k_sink, s.v_sink)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in outs)
    loss.backward()
    named = [("dq", xs[0]), ("dk", xs[1]), ("dv", xs[2])]
    if st is not None:
        named += [("dS0", st.S), ("dz0", st.z), ("dk_tail", st.k_tail), ("dv_tail", st.v_tail)]
        named += [("dk_sink", st.k_sink), ("dv_sink", st.v_sink)]
    named = [(n, t.grad) for n, t in named]
    named += [(f"d{n}", t.grad) for n, t in fm.named_parameters() if t.grad is not None]
    return o, s, named


def _compare_grads(a, b, tag, *, check_mix=True):
    assert_close(a[0], b[0], torch.float32, name=f"{tag} o")
    _check_state(a[1], b[1], tag)
    assert [n for n, _ in a[2]] == [n for n, _ in b[2]], f"{tag}: gradients of {a[2]} vs {b[2]}"
    names = [n for n, _ in a[2]]
    assert not check_mix or "dlog_mix" in names, f"{tag}: no gradient of the factor in {names}"
    for (name, x), (_, y) in zip(a[2], b[2]):
        assert x is not None and y is not None, f"{tag}: {name} missing"
        assert_close(x, y, torch.float32, name=f"{tag} {name}", min_scale=1e-5 if name == "dlog_mix" else 1e-6)


def _prefix_state(fm, window, sinks, *, B=2, Hk=2, H=4, Dv=8, T=3, mask=True):
    """A state after a causal prefix of T tokens (a masked one): the tail, S, z and (T < sinks) some sink
    slots still empty."""
    qp, kp, vp = _inputs(B, T, H, Hk, Dv, seed=5)
    pp = _params(fm, qp, kp, True)
    m = None
    if mask:
        m = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
        m[1, T - 1] = False
    return reference_attention(qp, kp, vp, pp, causal=True, window=window, sinks=sinks, key_padding_mask=m,
                               output_final_state=True)[1]  # fmt: skip


@pytest.mark.parametrize("mode", ["walk", "chunk"])
@pytest.mark.parametrize("window", [1, 4], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_factor_gradients(monkeypatch, mode, causal, window):
    """The factor without sinks: q, k, v, a learnable W, log_mix and the initial state, GQA, a mask."""
    monkeypatch.setenv(MODE_ENV, mode)
    q, k, v = _inputs(seed=2)
    mask = _mask(2, T)
    fm = _map("hyprf", weights="learnable")
    state = _prefix_state(fm, window, 0, T=9)
    kw = dict(causal=causal, window=window, sinks=0, mask=mask)
    _compare_grads(_grads("triton", fm, q, k, v, state, **kw), _grads("reference", fm, q, k, v, state, **kw),
                   f"factor {mode} causal={causal} W={window}")  # fmt: skip


SINK_GRADS = [(0, 2), (3, 2), (2, 5), (0, T + 2)]


@pytest.mark.parametrize("window,sinks", SINK_GRADS, ids=[f"W{w}-S{s}" for w, s in SINK_GRADS])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_sink_gradients(causal, window, sinks):
    """Sinks with the factor: gradients of q, k, v, a learnable W, log_mix and the initial state (its sink
    slots partly filled by a 3-token prefix), GQA, a mask; outputs and final states."""
    q, k, v = _inputs(seed=2)
    mask = _mask(2, T)
    fm = _map("hyprf", weights="learnable")
    state = _prefix_state(fm, window, sinks)
    kw = dict(causal=causal, window=window, sinks=sinks, mask=mask)
    tri = _grads("triton", fm, q, k, v, state, **kw)
    ref = _grads("reference", fm, q, k, v, state, **kw)
    _compare_grads(tri, ref, f"causal={causal} W={window} S={sinks}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_sink_gradients_without_state(causal):
    """No initial state, the chunk mode, the Gaussian target (exact_sq on the sinks' logits too)."""
    q, k, v = _inputs(seed=9, amp=0.6)
    fm = _map("posrf", kernel="gaussian", weights="learnable")
    kw = dict(causal=causal, window=2, sinks=3)
    _compare_grads(_grads("triton", fm, q, k, v, None, **kw), _grads("reference", fm, q, k, v, None, **kw),
                   f"gaussian causal={causal}")  # fmt: skip


# --------------------------------------------------------------------------- pieces, packed, hedgehog
def _run(q, k, v, p, window, sinks, state=None, mask=None):
    return _attend(q, k, v, p, causal=True, window=window, sinks=sinks, key_padding_mask=mask, initial_state=state,
                   output_final_state=True)  # fmt: skip


@pytest.mark.parametrize("window,sinks", [(0, 3), (1, 1), (3, 6)], ids=["W0-S3", "W1-S1", "W3-S6"])
def test_pieces_and_token_by_token(window, sinks):
    """Causal: two pieces (the first shorter than S), then one token at a time, equal one run (outputs and
    final states, the sink slots included), which equals the oracle and the reference's state."""
    T_ = 14
    q, k, v = _inputs(T=T_, seed=3)
    mask = _mask(2, T_, seed=4)
    fm = _map("posrf")
    p = _params(fm, q, k, True)
    o_full, s_full = _run(q, k, v, p, window, sinks, mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=True, key_padding_mask=mask, sinks=sinks)
    assert_close(o_full, ref, torch.float32, name="one run")
    _, s_ref = reference_attention(q, k, v, p, causal=True, window=window, sinks=sinks, key_padding_mask=mask,
                                   output_final_state=True)  # fmt: skip
    _check_state(s_full, s_ref, "final state")
    cut = 2
    o1, s1 = _run(q[:, :cut], k[:, :cut], v[:, :cut], p, window, sinks, mask=mask[:, :cut])
    o2, s2 = _run(q[:, cut:7], k[:, cut:7], v[:, cut:7], p, window, sinks, s1, mask=mask[:, cut:7])
    outs, state = [o1, o2], s2
    for t in range(7, T_):
        sl = slice(t, t + 1)
        o, state = _run(q[:, sl], k[:, sl], v[:, sl], p, window, sinks, state, mask=mask[:, sl])
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_full, torch.float32, name="pieces and token by token")
    _check_state(state, s_full, "pieces and token by token")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("window", [0, 3], ids=lambda w: f"W{w}")
def test_packed_sequences(monkeypatch, causal, window):
    """cu_seqlens (an empty sequence, one shorter than the sinks) with sinks per sequence, in one call, equals
    the reference's packed call: outputs, final states and gradients (the factor and the initial state's
    sink slots, filled by a packed prefix of 8, 8, 2 and 8 tokens: the third's partly, and its S, z empty,
    included)."""
    if causal:
        monkeypatch.setenv(MODE_ENV, "chunk")
    lengths = [17, 0, 2, 12]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    q, k, v = _inputs(1, offsets[-1], 2, 1, seed=11)
    fm = _map("posrf", Hk=1, weights="learnable")
    sinks = 4
    qp, kp, vp = _inputs(1, 26, 2, 1, seed=12)
    pre = torch.tensor([0, 8, 16, 18, 26], dtype=torch.int32, device=DEVICE)
    pp = _params(fm, qp, kp, True, offsets=pre.tolist())
    _, init = reference_attention(qp, kp, vp, pp, causal=True, window=window, sinks=sinks, cu_seqlens=pre,
                                  output_final_state=True)  # fmt: skip
    kw = dict(causal=causal, window=window, sinks=sinks, cu_seqlens=cu)
    tri = _grads("triton", fm, q, k, v, init, **kw)
    ref = _grads("reference", fm, q, k, v, init, **kw)
    _compare_grads(tri, ref, f"packed causal={causal} W={window}")
    tri = _grads("triton", fm, q, k, v, None, **kw)
    ref = _grads("reference", fm, q, k, v, None, **kw)
    _compare_grads(tri, ref, f"packed, no state, causal={causal} W={window}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_hedgehog(causal):
    """hedgehog (its query rows' lse: the feature parts only) with sinks and the factor: the oracle, then
    gradients against the reference."""
    q, k, v = _inputs(T=17, seed=13)
    mask = _mask(2, 17)
    fm = _map("hedgehog")
    p = _params(fm, q, k, causal, key_padding_mask=mask)
    for window, sinks in ((0, 2), (3, 2)):
        o, _ = _attend(q, k, v, p, causal=causal, window=window, sinks=sinks, key_padding_mask=mask)
        ref = hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask, sinks=sinks)
        assert_close(o, ref, torch.float32, name=f"hedgehog causal={causal} W={window} o")
    kw = dict(causal=causal, window=3, sinks=2, mask=mask)
    _compare_grads(_grads("triton", fm, q, k, v, None, **kw), _grads("reference", fm, q, k, v, None, **kw),
                   f"hedgehog causal={causal}")  # fmt: skip


def test_every_key_masked():
    """Rows with no visible key (sinks masked too) give 0, and the state holds no key."""
    q, k, v = _inputs(1, 12, 2, 2, seed=17)
    mask = torch.zeros(1, 12, dtype=torch.bool, device=DEVICE)
    fm = _map("hyprf")
    for causal in (False, True):
        p = _params(fm, q, k, causal, key_padding_mask=mask)
        for window in (0, 3):
            o, s = _attend(q, k, v, p, causal=causal, window=window, sinks=2, key_padding_mask=mask,
                           output_final_state=True)  # fmt: skip
            assert torch.equal(o, torch.zeros_like(o)), f"causal={causal}: {o.abs().max()}"
            assert torch.equal(s.S, torch.zeros_like(s.S)) and not s.tail_keep.any() and not s.sink_keep.any()


# --------------------------------------------------------------------------- the API
def test_triton_runs_sinks_and_the_factor():
    from spectraformer_fused.attention import MIX_BACKENDS, SINK_BACKENDS

    assert "triton" in SINK_BACKENDS and "triton" in MIX_BACKENDS


def test_through_the_api():
    """rf_attention(backend="triton", sinks=S, window=W) with a factor equals the reference backend."""
    q, k, v = _inputs(1, 15, 2, 2, seed=13)
    fm = _map("hyprf")
    for causal in (False, True):
        for window in (None, 3):
            kw = dict(feature_map=fm, causal=causal, window=window, sinks=2, output_final_state=True)
            o, s = rf_attention(q, k, v, backend="triton", **kw)
            o_ref, s_ref = rf_attention(q, k, v, backend="reference", **kw)
            assert_close(o, o_ref, torch.float32, name=f"api causal={causal} W={window} o")
            _check_state(s, s_ref, f"api causal={causal} W={window}")
        o = rf_attention(q, k, v, fm, causal=causal, window=3, backend="triton")  # the factor, no sinks
        assert_close(o, rf_attention(q, k, v, fm, causal=causal, window=3, backend="reference"), torch.float32,
                     name=f"api factor causal={causal}")  # fmt: skip
