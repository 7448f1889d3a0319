"""Attention sinks and the learned exact-part factor (DESIGN.md section 8) on the compiled CPU backend
(csrc/rf_window.cpp, ops/cpu/window.py) against the reference backend's ``_window_attention`` (the oracle)
and the dense fp64 oracle ``helpers.hybrid_oracle``: window 0 (sinks only) and W >= 1, S from 1 to >= T,
causal and not, masks (a masked sink included), GQA, packed sequences with their own sinks, chunk
boundaries, pieces and token by token with the state's sink slots, every fused feature kind (hedgehog's
lse included), and the gradients of q, k, v, learnable W, the factor and the initial state."""

import math

import pytest
import torch
from helpers import assert_close, hybrid_oracle

from spectraformer_fused import RandomFeatureMap, WindowState, rf_attention
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.ops.cpu.window import cpu_window_attention
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import empty_window_state

pytestmark = pytest.mark.skipif(not cpu_ops.extension_available(), reason="CPU extension unavailable")

D = 16
COMPONENTS = [("posrf", "softmax"), ("hyprf", "softmax"), ("trigrf", "softmax"), ("oprf", "softmax"),
              ("saderf", "gaussian"), ("hedgehog", "softmax")]  # fmt: skip


def _inputs(B, T, H, Hk, *, Dv=8, seed=0, dtype=torch.float32, amp=0.7):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g) * amp).to(dtype)
    k = (torch.randn(B, T, Hk, D, generator=g) * amp).to(dtype)
    v = torch.randn(B, T, Hk, Dv, generator=g).to(dtype)
    return q, k, v


def _map(component="hyprf", kernel="softmax", *, Hk=2, m=8, weights="orf", mix=0.4):
    fm = RandomFeatureMap(D, m, component=component, kernel=kernel, weights=weights, num_heads=Hk, seed=3, mix=mix)
    with torch.no_grad():
        if fm.log_mix is not None and Hk > 1:  # a different factor per key/value head
            fm.log_mix.add_(torch.linspace(-0.5, 0.5, Hk))
        if fm.spec.learned:
            fm.log_weight.copy_(torch.randn(fm.log_weight.shape, generator=torch.Generator().manual_seed(9)) * 0.3)
    return fm.eval()


def _params(fm, q, k, causal, **kw):
    return fm.feature_params(q, k, scale=1.0 / math.sqrt(D), causal=causal, **kw)


def _mask(B, T, seed=5):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, 0] = False  # a masked sink
    mask[:, 1] = True
    return mask


def _both(q, k, v, p, **kw):
    """(cpu, reference) results of one call."""
    a = cpu_ops.cpu_attention(q, k, v, p, output_final_state=True, **kw)
    b = reference_attention(q, k, v, p, output_final_state=True, **kw)
    return a, b


def _check_state(a, b, tag):
    assert isinstance(a, WindowState) and isinstance(b, WindowState)
    # the same state may sit on another key shift (non-causal: the reference's is the maximum over every
    # key, the window's tail included, and finite with no key folded): compare S and z on one shift
    ma, mb = a.log_scale.double(), b.log_scale.double()
    ref = torch.where(torch.isfinite(mb), mb, torch.where(torch.isfinite(ma), ma, torch.zeros_like(ma)))
    ra, rb = (ma - ref).exp(), (mb - ref).exp()
    assert_close(a.S * ra[..., None, None], b.S * rb[..., None, None], torch.float32, name=f"{tag} S")
    assert_close(a.z * ra[..., None], b.z * rb[..., None], torch.float32, name=f"{tag} z")
    for name in ("k_tail", "v_tail", "k_sink", "v_sink"):
        assert getattr(a, name).shape == getattr(b, name).shape, f"{tag} {name} shape"
        assert_close(getattr(a, name), getattr(b, name).float(), torch.float32, name=f"{tag} {name}")
    for name in ("tail_keep", "sink_keep", "sink_seen"):
        assert torch.equal(getattr(a, name), getattr(b, name)), (
            f"{tag}: {name} {getattr(a, name)} != {getattr(b, name)}"
        )


T_SMALL = 13
WS = [(0, 1), (0, 4), (1, 1), (3, 2), (5, 4), (2, T_SMALL), (T_SMALL, 3), (0, T_SMALL + 7)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window,sinks", WS, ids=[f"W{w}-S{s}" for w, s in WS])
@pytest.mark.parametrize("component,kernel", COMPONENTS, ids=[c for c, _ in COMPONENTS])
def test_forward_matches_reference_and_oracle(component, kernel, window, sinks, causal):
    """GQA (4 query heads on 2 key/value heads), a padding mask with a masked sink, a per-head factor."""
    q, k, v = _inputs(2, T_SMALL, 4, 2)
    fm = _map(component, kernel)
    mask = _mask(2, T_SMALL)
    p = _params(fm, q, k, causal, key_padding_mask=mask)
    (o, s), (ro, rs) = _both(q, k, v, p, causal=causal, window=window, sinks=sinks, key_padding_mask=mask)
    assert_close(o, ro, torch.float32, name="o vs reference")
    _check_state(s, rs, "final state")
    ref = hybrid_oracle(q.double(), k.double(), v.double(), p, window=window, causal=causal, key_padding_mask=mask,
                        sinks=sinks)  # fmt: skip
    assert_close(o, ref, torch.float32, name="o vs oracle")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window,sinks", [(0, 3), (5, 2), (70, 4)], ids=["W0-S3", "W5-S2", "W70-S4"])
def test_long_sequence_chunk_boundaries(window, sinks, causal):
    """T = 150 crosses the 64-token chunks (and, W = 70, a band wider than a chunk)."""
    q, k, v = _inputs(1, 150, 2, 1, seed=4)
    fm = _map("posrf", Hk=1, m=16)
    mask = torch.rand(1, 150, generator=torch.Generator().manual_seed(2)) > 0.2
    p = _params(fm, q, k, causal, key_padding_mask=mask)
    (o, s), (ro, rs) = _both(q, k, v, p, causal=causal, window=window, sinks=sinks, key_padding_mask=mask)
    assert_close(o, ro, torch.float32, name="o")
    _check_state(s, rs, "state")


@pytest.mark.parametrize("window", [0, 1, 3])
@pytest.mark.parametrize("sinks", [1, 3, 6])
@pytest.mark.parametrize("component", ["hyprf", "hedgehog"])
def test_pieces_and_token_by_token(component, window, sinks):
    """Causal: pieces of every size and one token at a time (the T = 1 decode step) equal one run; the
    state (sink slots included) equals the reference's after every piece."""
    T = 11
    q, k, v = _inputs(2, T, 4, 2, seed=1)
    mask = _mask(2, T)
    fm = _map(component)
    p = _params(fm, q, k, True)
    whole, _ = reference_attention(q, k, v, p, causal=True, window=window, sinks=sinks, key_padding_mask=mask)
    for cuts in ([5], [1, 2, 3], list(range(1, T))):
        state = rstate = None
        outs, lo = [], 0
        for hi in cuts + [T]:
            args = (q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], p)
            kw = dict(causal=True, window=window, sinks=sinks, key_padding_mask=mask[:, lo:hi], output_final_state=True)
            o, state = cpu_ops.cpu_attention(*args, initial_state=state, **kw)
            _, rstate = reference_attention(*args, initial_state=rstate, **kw)
            _check_state(state, rstate, f"cuts={cuts} after {hi}")
            outs.append(o)
            lo = hi
        assert_close(torch.cat(outs, 1), whole, torch.float32, name=f"cuts={cuts}")
        seen = min(sinks, T)
        assert state.sink_seen[:, :seen].all() and not state.sink_seen[:, seen:].any()
        assert torch.equal(state.sink_keep[:, :seen], mask[:, :seen])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_packed_sequences_have_their_own_sinks(causal, window, with_state):
    """Packed sequences (an empty one included) against the reference's per-sequence runs; with an initial
    state whose rows have seen 0, some or all of the sink slots."""
    sinks = 3
    q, k, v = _inputs(1, 17, 4, 2, seed=2)
    fm = _map("hyprf")
    cu = torch.tensor([0, 4, 4, 6, 13, 17], dtype=torch.int32)
    p = _params(fm, q, k, causal, offsets=cu.tolist())
    init = None
    if with_state:
        # rows' histories of 0, 1, 2, 5 and 9 tokens, through the reference
        hist = [0, 1, 2, 5, 9]
        hq, hk, hv = _inputs(1, sum(hist), 4, 2, seed=7)
        hcu = torch.tensor([0] + torch.tensor(hist).cumsum(0).tolist(), dtype=torch.int32)
        hp = _params(fm, hq, hk, True, offsets=hcu.tolist())
        _, init = reference_attention(hq, hk, hv, hp, causal=True, window=window, sinks=sinks, cu_seqlens=hcu,
                                      output_final_state=True)  # fmt: skip
        init = WindowState(*(t.float() if t.is_floating_point() else t for t in init))
    kw = dict(causal=causal, window=window, sinks=sinks, cu_seqlens=cu, initial_state=init)
    (o, s), (ro, rs) = _both(q, k, v, p, **kw)
    assert_close(o, ro, torch.float32, name="o")
    _check_state(s, rs, "packed state")
    assert s.k_sink.shape == (5, 2, sinks, D)


def test_half_precision_and_api():
    """bf16 inputs; rf_attention(backend="cpu") runs sinks and the factor; "auto" takes the CPU backend."""
    from spectraformer_fused.attention import MIX_BACKENDS, SINK_BACKENDS

    q, k, v = _inputs(2, 20, 4, 2, seed=3)
    fm = _map("posrf")
    ref = rf_attention(q, k, v, fm, causal=True, window=3, sinks=2, backend="reference")
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    p = _params(fm, qb, kb, True)
    o, _ = cpu_window_attention(qb, kb, vb, p, causal=True, window=3, sinks=2)
    assert o.dtype == torch.bfloat16
    assert (o.float() - ref).abs().max() < 0.05
    if "cpu" in SINK_BACKENDS and "cpu" in MIX_BACKENDS:
        for backend in ("cpu", "auto"):
            got = rf_attention(q, k, v, fm, causal=True, window=3, sinks=2, backend=backend)
            assert_close(got, ref, torch.float32, name=backend)
        got = rf_attention(q, k, v, fm, causal=False, sinks=4, backend="cpu")
        assert_close(got, rf_attention(q, k, v, fm, causal=False, sinks=4, backend="reference"), torch.float32)


def test_errors():
    q, k, v = _inputs(2, 5, 2, 2)
    fm = _map("hyprf")
    p = _params(fm, q, k, True)
    with pytest.raises(ValueError, match="window"):
        cpu_window_attention(q, k, v, p, causal=True, window=0)
    st = empty_window_state(2, 2, p.feature_dim, D, 8, 3, sinks=2)
    with pytest.raises(ValueError, match="sinks"):
        cpu_window_attention(q, k, v, p, causal=True, window=3, sinks=4, initial_state=st)


GRAD_CASES = [
    ("posrf", "learnable", 3, 2),
    ("hedgehog", "orf", 0, 2),
    ("trigrf", "fastfood_learnable", 2, 9),
    ("hyprf", "orf", 1, 1),
    ("posrf", "orf", 9, 3),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "component,weights,window,sinks", GRAD_CASES, ids=[f"{c}-{w}-W{a}-S{b}" for c, w, a, b in GRAD_CASES]
)
def test_gradients_match_reference(component, weights, window, sinks, causal):
    """Gradients of q, k, v, the learnable feature parameters, the factor and the initial state (S, z, the
    tail and the sink slots, whose rows have seen 0 and 1 tokens), with a mask."""
    T = 9
    q, k, v = _inputs(2, T + 1, 4, 2, seed=11)
    fm = _map(component, weights=weights)
    mask = _mask(2, T + 1)
    p0 = _params(fm, q[:, :1], k[:, :1], True)
    with torch.no_grad():
        _, init = reference_attention(q[:, :1], k[:, :1], v[:, :1], p0, causal=True, window=window, sinks=sinks,
                                      key_padding_mask=torch.tensor([[True], [False]]), output_final_state=True)  # fmt: skip
    # row 0 has seen one token, row 1 none (its history is dropped)
    init = WindowState(*(torch.cat([t[:1], torch.zeros_like(t[1:])]) for t in init))
    q, k, v, mask = q[:, 1:], k[:, 1:], v[:, 1:], mask[:, 1:]
    g = torch.randn(2, T, 4, 8, generator=torch.Generator().manual_seed(9))
    results = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        st = [t.clone().requires_grad_(t.dtype != torch.bool and i != 2) for i, t in enumerate(init)]
        params = [t for t in fm.parameters() if t.requires_grad]
        p = _params(fm, leaves[0], leaves[1], causal, key_padding_mask=mask)
        o, s = fn(*leaves, p, causal=causal, window=window, sinks=sinks, key_padding_mask=mask,
                  initial_state=WindowState(*st), output_final_state=True)  # fmt: skip
        # S and z on the shift log_scale (non-causal, the backends may keep the final state on different ones)
        shift = s.log_scale.exp()
        S, z = s.S * shift[..., None, None], s.z * shift[..., None]
        loss = (o * g).sum() + S.sum() + z.sum() + s.k_tail.sum() + s.v_tail.pow(2).sum()
        loss = loss + s.k_sink.pow(2).sum() + s.v_sink.sum()
        want = leaves + params + [st[i] for i in (0, 1, 3, 4, 6, 7)]
        results.append(torch.autograd.grad(loss, want, allow_unused=True))
    names = ["q", "k", "v"] + [n for n, t in fm.named_parameters() if t.requires_grad]
    names += ["S0", "z0", "k_tail0", "v_tail0", "k_sink0", "v_sink0"]
    assert "log_mix" in names
    for name, a, b in zip(names, *results):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert_close(a, b, torch.float32, name=f"grad {name}", min_scale=0.1 if name == "log_mix" else 1e-6)


@pytest.mark.parametrize("window,sinks", [(0, 2), (3, 0), (4, 3), (20, 2)], ids=["W0-S2", "W3-S0", "W4-S3", "W20-S2"])
def test_gradients_packed_and_pieces(window, sinks):
    """Causal gradients through packed sequences (an empty one included) and through a chain of pieces
    (the state, tail and sink slots carried, one piece a single token), against the reference's."""
    fm = _map("hedgehog", weights="learnable")
    cu = torch.tensor([0, 5, 5, 12, 19], dtype=torch.int32)
    q, k, v = _inputs(1, 19, 4, 2, seed=21)
    g = torch.randn(1, 19, 4, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        p = _params(fm, leaves[0], leaves[1], True, offsets=cu.tolist())
        o, s = fn(*leaves, p, causal=True, window=window, sinks=sinks, cu_seqlens=cu, output_final_state=True)
        loss = (o * g).sum() + s.S.sum() + s.k_tail.pow(2).sum() + s.k_sink.sum()
        params = [t for t in fm.parameters() if t.requires_grad]
        results.append(torch.autograd.grad(loss, leaves + params, allow_unused=True))
    for i, (a, b) in enumerate(zip(*results)):
        # the feature parameters' and the factor's gradients sum many terms and may be 0 in exact arithmetic
        assert_close(a, b, torch.float32, name=f"packed grad {i}", min_scale=1e-4 if i < 3 else 0.1)
    # pieces
    q, k, v = _inputs(2, 14, 4, 2, seed=22)
    mask = _mask(2, 14)
    results = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        state, loss, lo = None, 0.0, 0
        for hi in (3, 4, 9, 14):
            sl = slice(lo, hi)
            p = _params(fm, leaves[0][:, sl], leaves[1][:, sl], True, key_padding_mask=mask[:, sl])
            o, state = fn(leaves[0][:, sl], leaves[1][:, sl], leaves[2][:, sl], p, causal=True, window=window,
                          sinks=sinks, key_padding_mask=mask[:, sl], initial_state=state, output_final_state=True)  # fmt: skip
            loss = loss + (o * o).sum()
            lo = hi
        loss = loss + state.z.sum() + state.v_sink.pow(2).sum()
        params = [t for t in fm.parameters() if t.requires_grad]
        results.append(torch.autograd.grad(loss, leaves + params, allow_unused=True))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float32, name=f"pieces grad {i}", min_scale=1e-4 if i < 3 else 0.1)


@pytest.mark.parametrize("window,sinks", [(0, 2), (2, 0), (3, 2), (30, 1)], ids=["W0-S2", "W2-S0", "W3-S2", "W30-S1"])
@pytest.mark.parametrize("component", ["trigrf", "hedgehog", "oprf"])
def test_noncausal_gradients_packed_with_state(component, window, sinks):
    """Non-causal gradients (the fused backward) of packed sequences with an initial state (S, z, the tail and
    the sink slots, some rows empty), with the final state's gradients, against the reference's."""
    fm = _map(component, weights="learnable" if component != "trigrf" else "fastfood_learnable")
    cu = torch.tensor([0, 6, 6, 13, 20], dtype=torch.int32)
    hq, hk, hv = _inputs(1, 8, 4, 2, seed=30)
    hcu = torch.tensor([0, 0, 3, 5, 8], dtype=torch.int32)
    with torch.no_grad():
        hp = _params(fm, hq, hk, True, offsets=hcu.tolist())
        _, init = reference_attention(
            hq, hk, hv, hp, causal=True, window=window, sinks=sinks, cu_seqlens=hcu, output_final_state=True
        )
    q, k, v = _inputs(1, 20, 4, 2, seed=31)
    g = torch.randn(1, 20, 4, 8, generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        st = [t.clone().requires_grad_(t.dtype != torch.bool and i != 2) for i, t in enumerate(init)]
        p = _params(fm, leaves[0], leaves[1], False, offsets=cu.tolist())
        o, s = fn(*leaves, p, causal=False, window=window, sinks=sinks, cu_seqlens=cu, initial_state=WindowState(*st),
                  output_final_state=True)  # fmt: skip
        # S and z on the shift log_scale (non-causal, the backends may keep the final state on different ones)
        shift = s.log_scale.exp()
        S, z = s.S * shift[..., None, None], s.z * shift[..., None]
        loss = (o * g).sum() + S.pow(2).sum() + z.sum() + s.k_tail.sum() + s.v_sink.pow(2).sum()
        params = [t for t in fm.parameters() if t.requires_grad]
        want = leaves + params + [st[i] for i in (0, 1, 3, 4, 6, 7)]
        results.append(torch.autograd.grad(loss, want, allow_unused=True))
    for i, (a, b) in enumerate(zip(*results)):
        if a is None or b is None:  # (no sinks: the empty slots get no gradient, or an empty one)
            assert all(t is None or t.numel() == 0 or t.abs().max() == 0 for t in (a, b)), i
            continue
        assert_close(a, b, torch.float32, name=f"grad {i}", min_scale=1e-4 if i < 3 else 0.1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_backward_is_deterministic(causal):
    """No atomics, fixed-order sums: two backward passes give bitwise equal gradients (2 threads or more)."""
    q, k, v = _inputs(2, 150, 4, 2, seed=40)
    fm = _map("posrf", weights="learnable")
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        p = _params(fm, leaves[0], leaves[1], causal)
        o, _ = cpu_ops.cpu_attention(*leaves, p, causal=causal, window=9, sinks=3)
        params = [t for t in fm.parameters() if t.requires_grad]
        grads.append(torch.autograd.grad(o.pow(2).sum(), leaves + params))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dominant", [False, True], ids=["keys-above", "state-above"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window,sinks", [(3, 0), (0, 2), (4, 2)], ids=["W3", "S2", "W4-S2"])
def test_log_scale_that_requires_grad_runs_fused(window, sinks, causal, dominant):
    """An initial state whose log_scale requires grad (a state carried under autograd): the fused path
    gives the reference's output and gradients of q, k, v, S, z and log_scale, for a loss on the output and
    on the final state as it stands for (S exp(log_scale), z exp(log_scale)); with the initial scale below
    the keys' and above them (the final state is then on the initial scale in both backends, and the loss
    reads its S, z and log_scale as they are; otherwise the backends may keep it on different shifts)."""
    q, k, v = _inputs(2, 9, 4, 2, seed=6)
    fm = _map("hyprf")
    p = _params(fm, q, k, causal)
    q0, k0, v0 = _inputs(2, 10, 4, 2, seed=7)  # an earlier piece: keys beyond its window are in the state
    _, s0 = reference_attention(q0, k0, v0, p, causal=True, window=window, sinks=sinks, output_final_state=True)
    assert torch.isfinite(s0.log_scale).all()
    if dominant:  # the same state on a scale above every key's exponent
        s0 = s0._replace(S=s0.S * math.exp(-30.0), z=s0.z * math.exp(-30.0), log_scale=s0.log_scale + 30.0)
    g = torch.Generator().manual_seed(8)
    go = torch.randn(2, 9, 4, 8, generator=g)
    gS, gz = torch.randn(s0.S.shape, generator=g), torch.randn(s0.z.shape, generator=g)
    grads = {}
    for name, fn in (("cpu", cpu_ops.cpu_attention), ("reference", reference_attention)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        S0, z0, m0 = (t.clone().float().requires_grad_(True) for t in s0[:3])
        st = s0._replace(S=S0, z=z0, log_scale=m0)
        o, fin = fn(*leaves, p, causal=causal, window=window, sinks=sinks, initial_state=st, output_final_state=True)
        scale = torch.where(torch.isfinite(fin.log_scale), fin.log_scale, torch.zeros_like(fin.log_scale)).exp()
        if dominant:  # the final state is on the initial scale in both backends: the raw S, z and log_scale
            assert torch.equal(fin.log_scale.detach(), m0.detach()), "the final scale is the initial one"
            loss = (o * go).sum() + (fin.S * gS).sum() + (fin.z * gz).sum() + (fin.log_scale * gz[..., 0]).sum()
        else:
            loss = (o * go).sum() + (fin.S * scale[..., None, None] * gS).sum() + (fin.z * scale[..., None] * gz).sum()
        grads[name] = torch.autograd.grad(loss, [*leaves, S0, z0, m0])
    for label, a, b in zip(("q", "k", "v", "S0", "z0", "log_scale0"), grads["cpu"], grads["reference"]):
        assert_close(a, b, torch.float32, name=f"d{label}")
