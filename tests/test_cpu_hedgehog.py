"""hedgehog (kind NORM_HYP) on the compiled CPU backend against the reference backend: its per-key
log-sum-exp over the 2m features is computed per key in the C++ forward and subtracted, and the C++
backward adds its gradient.

``ops.cpu.cpu_attention`` is called directly with the parameters of ``fm.feature_params``; the API routes
hedgehog to it through ``attention.KIND_BACKENDS``.
"""

import math

import pytest
import torch
from helpers import assert_close

from spectraformer_fused import RandomFeatureMap
from spectraformer_fused.contract import NORM_HYP
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.ops.cpu import attention as cpu_attention_module
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import RFState

pytestmark = pytest.mark.skipif(not cpu_ops.extension_available(), reason="CPU extension unavailable")


def _setup(B, T, H, Hk, D, Dv, m, *, dtype=torch.float32, seed=0, amp=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (amp * torch.randn(B, T, H, D, generator=g)).to(dtype)
    k = (amp * torch.randn(B, T, Hk, D, generator=g)).to(dtype)
    v = torch.randn(B, T, Hk, Dv, generator=g).to(dtype)
    fm = RandomFeatureMap(D, m, component="hedgehog", num_heads=Hk, seed=3).eval()
    with torch.no_grad():  # a trained map's log-weights are not zero
        fm.log_weight.copy_(torch.randn(Hk, m, generator=g))
    return q, k, v, fm


def _params(fm, q, k, causal, **kw):
    p = fm.feature_params(q, k, scale=1.0 / math.sqrt(q.shape[-1]), causal=causal, **kw)
    assert p.kind == NORM_HYP
    return p


def _check_state(s, s_ref, tag):
    empty = torch.isneginf(s_ref.log_scale)
    assert torch.equal(torch.isneginf(s.log_scale), empty), f"{tag}: empty states differ"
    assert_close(s.log_scale[~empty], s_ref.log_scale[~empty], torch.float32, name=f"{tag} log_scale")
    assert_close(s.S, s_ref.S, torch.float32, name=f"{tag} S")
    assert_close(s.z, s_ref.z, torch.float32, name=f"{tag} z")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    "B,T,H,Hk,D,Dv,m,masked",
    [(2, 100, 2, 2, 24, 40, 32, True), (1, 129, 4, 2, 32, 16, 48, False), (2, 1, 2, 1, 16, 16, 16, False)],
    ids=["masked", "gqa", "one-token"],
)
def test_forward_matches_reference(causal, B, T, H, Hk, D, Dv, m, masked):
    q, k, v, fm = _setup(B, T, H, Hk, D, Dv, m, amp=1.5)
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[0, : T // 2] = False
    p = _params(fm, q, k, causal, key_padding_mask=mask)
    kw = dict(causal=causal, key_padding_mask=mask, output_final_state=True)
    o, s = cpu_ops.cpu_attention(q, k, v, p, **kw)
    o_ref, s_ref = reference_attention(q, k, v, p, **kw)
    tag = f"hedgehog causal={causal} T={T}"
    assert_close(o, o_ref, torch.float32, name=f"{tag} o")
    _check_state(s, s_ref, tag)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(dtype):
    q, k, v, fm = _setup(2, 77, 2, 2, 32, 32, 64, dtype=dtype)
    p = _params(fm, q, k, True)
    o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=True)
    o_ref, _ = reference_attention(q, k, v, p, causal=True)
    assert o.dtype == dtype
    assert_close(o, o_ref, dtype, name=f"hedgehog {dtype} o")


def test_decode_token_by_token():
    """A prefix, then T = 1 decode steps with the state passed, equals the reference over the whole run."""
    q, k, v, fm = _setup(2, 40, 4, 2, 16, 24, 24)
    p = _params(fm, q, k, True)
    o_ref, s_ref = reference_attention(q, k, v, p, causal=True, output_final_state=True)
    o, state = cpu_ops.cpu_attention(q[:, :30], k[:, :30], v[:, :30], p, causal=True, output_final_state=True)
    outs = [o]
    for t in range(30, 40):
        sl = slice(t, t + 1)
        o, state = cpu_ops.cpu_attention(
            q[:, sl], k[:, sl], v[:, sl], p, causal=True, initial_state=state, output_final_state=True
        )
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_ref, torch.float32, name="hedgehog decode o")
    _check_state(state, s_ref, "hedgehog decode")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_packed_sequences(causal):
    lengths = [17, 0, 70, 5]
    T = sum(lengths)
    q, k, v, fm = _setup(1, T, 2, 1, 16, 16, 32, seed=5)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32)
    p = _params(fm, q, k, causal, offsets=offsets)
    kw = dict(causal=causal, output_final_state=True, cu_seqlens=cu)
    o, s = cpu_ops.cpu_attention(q, k, v, p, **kw)
    o_ref, s_ref = reference_attention(q, k, v, p, **kw)
    assert_close(o, o_ref, torch.float32, name=f"hedgehog packed causal={causal} o")
    _check_state(s, s_ref, f"hedgehog packed causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradients(causal, monkeypatch):
    """The fused C++ backward (each key's lse held in its features, plus the lse's own gradient: de -=
    softmax(e) sum(de)) against autograd through the reference: GQA, a mask, an initial state, the final
    state's gradient; the reference recompute is not used."""

    def no_recompute(*args, **kwargs):
        raise AssertionError("hedgehog's backward recomputed through the reference")

    monkeypatch.setattr(cpu_attention_module, "reference_grads", no_recompute)
    q, k, v, fm = _setup(2, 50, 4, 2, 16, 8, 16, seed=7)
    mask = torch.rand(2, 50, generator=torch.Generator().manual_seed(2)) > 0.2
    g = torch.Generator().manual_seed(3)
    S0, z0 = torch.rand(2, 2, 32, 8, generator=g), torch.rand(2, 2, 32, generator=g)
    grads = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        fm.zero_grad()
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, S0, z0)]
        p = _params(fm, *leaves[:2], causal, key_padding_mask=mask)
        state = RFState(leaves[3], leaves[4], torch.zeros(2, 2))
        o, s = fn(*leaves[:3], p, causal=causal, key_padding_mask=mask, initial_state=state, output_final_state=True)
        e = torch.exp(s.log_scale)[..., None]
        (o.pow(2).sum() + (s.S * e[..., None]).sum() + (s.z * e).sum()).backward()
        grads.append([t.grad for t in leaves] + [fm.log_weight.grad.clone()])
    for name, a, b in zip(("q", "k", "v", "S0", "z0", "log_weight"), *grads):
        assert_close(a, b, torch.float32, name=f"hedgehog grad {name} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_packed_gradients(causal):
    lengths = [17, 0, 40, 5]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32)
    q, k, v, fm = _setup(1, offsets[-1], 2, 1, 16, 8, 16, seed=9)
    grads = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        fm.zero_grad()
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        p = _params(fm, *leaves[:2], causal, offsets=offsets)
        o, _ = fn(*leaves, p, causal=causal, cu_seqlens=cu)
        o.pow(2).sum().backward()
        grads.append([t.grad for t in leaves] + [fm.log_weight.grad.clone()])
    for name, a, b in zip(("q", "k", "v", "log_weight"), *grads):
        assert_close(a, b, torch.float32, name=f"hedgehog packed grad {name} causal={causal}")
