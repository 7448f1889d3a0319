"""The non-causal hybrid window on the compiled CPU backend over several chunks of 64 queries (csrc/rf_window.cpp
and rf_window_bwd.cpp: a prefix walk and a suffix walk around each query's band, never a subtraction):
forward against the dense fp64 oracle ``helpers.hybrid_oracle`` and gradients against the reference backend,
for windows 0 (sinks only), 1, small, one chunk and beyond T, sinks inside and beyond the band, masks that
empty a whole prefix or suffix, GQA, packed sequences with a short one, the learned factor and every fused
feature kind. Each comparison prints nothing on success; ``assert_close`` names the worst elements."""

import math

import pytest
import torch
from helpers import assert_close, hybrid_oracle

from spectraformer_fused import RandomFeatureMap, WindowState
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.reference import reference_attention

pytestmark = pytest.mark.skipif(not cpu_ops.extension_available(), reason="CPU extension unavailable")

D = 16


def _inputs(B, T, H, Hk, *, Dv=8, seed=0, amp=0.6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g) * amp
    k = torch.randn(B, T, Hk, D, generator=g) * amp
    v = torch.randn(B, T, Hk, Dv, generator=g)
    return q, k, v


def _map(component, *, Hk=2, m=8, weights="orf", mix=0.3):
    fm = RandomFeatureMap(D, m, component=component, weights=weights, num_heads=Hk, seed=3, mix=mix)
    with torch.no_grad():
        if fm.log_mix is not None and Hk > 1:
            fm.log_mix.add_(torch.linspace(-0.4, 0.4, Hk))
    return fm.eval()


def _params(fm, q, k, **kw):
    return fm.feature_params(q, k, scale=1.0 / math.sqrt(D), causal=False, **kw)


def _mask(B, T, seed=4):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.25
    mask[:, 2] = True
    return mask


T_LONG = 200
CASES = [(0, 3), (1, 0), (1, 2), (3, 0), (3, 5), (33, 2), (64, 0), (70, 4), (T_LONG + 50, 1)]


@pytest.mark.parametrize("window,sinks", CASES, ids=[f"W{w}-S{s}" for w, s in CASES])
@pytest.mark.parametrize("component", ["posrf", "hyprf", "trigrf", "hedgehog"])
def test_forward_matches_oracle_over_chunks(component, window, sinks):
    """Several chunks (T = 200), GQA, a padding mask, the factor: the prefix and suffix walks, the lower and
    upper in-region blocks and the carried region rows."""
    q, k, v = _inputs(2, T_LONG, 4, 2, seed=1)
    mask = _mask(2, T_LONG)
    fm = _map(component)
    p = _params(fm, q, k, key_padding_mask=mask)
    o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=False, window=window, sinks=sinks, key_padding_mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=False, key_padding_mask=mask, sinks=sinks)
    assert_close(o, ref, torch.float32, name=f"{component} W={window} S={sinks} o")


@pytest.mark.parametrize("window,sinks", [(1, 0), (5, 2), (40, 0), (0, 2)])
def test_masked_prefix_or_suffix(window, sinks):
    """Row 0 has no visible key before token 130 (an empty prefix for most queries), row 1 none after token 60
    (an empty suffix); row 2 keeps only the keys inside the bands of a few queries."""
    T = 190
    q, k, v = _inputs(3, T, 2, 2, seed=2)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[0, :130] = False
    mask[1, 60:] = False
    mask[2] = False
    mask[2, 100:104] = True
    fm = _map("hyprf")
    p = _params(fm, q, k, key_padding_mask=mask)
    o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=False, window=window, sinks=sinks, key_padding_mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=False, key_padding_mask=mask, sinks=sinks)
    assert_close(o, ref, torch.float32, name=f"masked W={window} S={sinks} o")


def test_packed_sequences_with_a_short_one():
    """cu_seqlens with a long sequence, one of 2 tokens (shorter than the window), an empty one and one of
    one chunk and a bit: each against the oracle."""
    lengths = [150, 2, 0, 70]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32)
    q, k, v = _inputs(1, offsets[-1], 4, 2, seed=3)
    fm = _map("posrf")  # (positive features: TRIG's can leave a row's denominator near 0, an ill-posed output)
    p = _params(fm, q, k, offsets=offsets)
    for window, sinks in ((5, 0), (3, 2), (80, 1)):
        o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=False, window=window, sinks=sinks, cu_seqlens=cu)
        for i in range(len(lengths)):
            a, b = offsets[i], offsets[i + 1]
            if b == a:
                continue
            pi = p.rows(i, i + 1)
            ref = hybrid_oracle(q[:, a:b], k[:, a:b], v[:, a:b], pi, window=window, causal=False, sinks=sinks)
            assert_close(o[:, a:b], ref, torch.float32, name=f"packed seq {i} W={window} S={sinks}")


@pytest.mark.parametrize("window", [1, 7, 90])
def test_final_state_is_the_causal_continuations_over_chunks(window):
    """The non-causal final state (P after the prefix walk, moved to its own shift) equals the causal call's,
    with an initial state and a mask."""
    q, k, v = _inputs(2, 170, 2, 2, seed=5)
    mask = _mask(2, 170)
    fm = _map("hyprf", mix=None)
    p = _params(fm, q, k)
    _, init = cpu_ops.cpu_attention(
        q[:, :20], k[:, :20], v[:, :20], p, causal=True, window=window, key_padding_mask=mask[:, :20],
        output_final_state=True,
    )  # fmt: skip
    kw = dict(window=window, key_padding_mask=mask[:, 20:], initial_state=init, output_final_state=True)
    _, s_nc = cpu_ops.cpu_attention(q[:, 20:], k[:, 20:], v[:, 20:], p, causal=False, **kw)
    _, s_c = cpu_ops.cpu_attention(q[:, 20:], k[:, 20:], v[:, 20:], p, causal=True, **kw)
    assert torch.equal(torch.isneginf(s_nc.log_scale), torch.isneginf(s_c.log_scale))
    assert_close(s_nc.log_scale, s_c.log_scale, torch.float32, name="log_scale")
    for name in ("S", "z", "k_tail", "v_tail"):
        assert_close(getattr(s_nc, name), getattr(s_c, name), torch.float32, name=f"W={window} {name}")


GRAD_CASES = [("posrf", "orf", 0, 2), ("hedgehog", "learnable", 1, 0), ("trigrf", "fastfood_learnable", 5, 3),
              ("hyprf", "learnable", 40, 1), ("posrf", "learnable", 70, 0)]  # fmt: skip


@pytest.mark.parametrize(
    "component,weights,window,sinks", GRAD_CASES, ids=[f"{c}-{w}-W{a}-S{b}" for c, w, a, b in GRAD_CASES]
)
def test_gradients_over_chunks(component, weights, window, sinks):
    """Gradients of q, k, v, the learnable feature parameters, the factor and the initial state (S, z, the
    tail, the sink slots) through several chunks, with a mask and the final state's gradients, against the
    reference backend's."""
    T = 150
    q, k, v = _inputs(2, T + 3, 4, 2, seed=7)
    mask = _mask(2, T + 3)
    fm = _map(component, weights=weights)
    with torch.no_grad():
        p0 = _params(fm, q[:, :3], k[:, :3])
        _, init = reference_attention(q[:, :3], k[:, :3], v[:, :3], p0, causal=True, window=window, sinks=sinks,
                                      key_padding_mask=mask[:, :3], output_final_state=True)  # fmt: skip
    q, k, v, mask = q[:, 3:], k[:, 3:], v[:, 3:], mask[:, 3:]
    g = torch.randn(2, T, 4, 8, generator=torch.Generator().manual_seed(8))
    results = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        st = [t.clone().requires_grad_(t.dtype != torch.bool and i != 2) for i, t in enumerate(init)]
        params = [t for t in fm.parameters() if t.requires_grad]
        p = _params(fm, leaves[0], leaves[1], key_padding_mask=mask)
        o, s = fn(*leaves, p, causal=False, window=window, sinks=sinks, key_padding_mask=mask,
                  initial_state=WindowState(*st), output_final_state=True)  # fmt: skip
        shift = s.log_scale.exp()  # S and z on one scale (the backends keep the final state on different shifts)
        S, z = s.S * shift[..., None, None], s.z * shift[..., None]
        loss = (o * g).sum() + S.pow(2).sum() * 1e-3 + z.sum() + s.k_tail.sum() + s.v_tail.pow(2).sum()
        loss = loss + s.k_sink.pow(2).sum() + s.v_sink.sum()
        want = leaves + params + [st[i] for i in (0, 1, 3, 4, 6, 7)]
        results.append(torch.autograd.grad(loss, want, allow_unused=True))
    names = ["q", "k", "v"] + [n for n, t in fm.named_parameters() if t.requires_grad]
    names += ["S0", "z0", "k_tail0", "v_tail0", "k_sink0", "v_sink0"]
    for name, a, b in zip(names, *results):
        if a is None or b is None:
            assert all(t is None or t.numel() == 0 or t.abs().max() == 0 for t in (a, b)), name
            continue
        assert_close(a, b, torch.float32, name=f"grad {name}", min_scale=0.1 if name == "log_mix" else 1e-4)


def test_gradients_packed_over_chunks():
    """Packed sequences (one long, one of 2 tokens, an empty one) through the fused non-causal backward."""
    fm = _map("hedgehog", weights="learnable")
    cu = torch.tensor([0, 140, 142, 142, 210], dtype=torch.int32)
    q, k, v = _inputs(1, 210, 4, 2, seed=9)
    g = torch.randn(1, 210, 4, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        p = _params(fm, leaves[0], leaves[1], offsets=cu.tolist())
        o, s = fn(*leaves, p, causal=False, window=6, sinks=2, cu_seqlens=cu, output_final_state=True)
        shift = s.log_scale.exp()
        loss = (o * g).sum() + (s.z * shift[..., None]).sum() + s.k_tail.pow(2).sum()
        params = [t for t in fm.parameters() if t.requires_grad]
        results.append(torch.autograd.grad(loss, leaves + params, allow_unused=True))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, torch.float32, name=f"packed grad {i}", min_scale=1e-4 if i < 3 else 0.1)
