"""The hybrid window on the compiled CPU backend (csrc/rf_window.cpp, ops/cpu/window.py) against the dense
fp64 oracle ``helpers.hybrid_oracle`` (DESIGN.md section 6), and split runs against one run.

``ops.cpu.cpu_attention(..., window=W)`` is called directly with the parameters of ``fm.feature_params``
(the API routes a window to a backend only once that backend is switched on).
"""

import inspect
import math

import pytest
import torch
from helpers import assert_close, hybrid_oracle

from spectraformer_fused import RandomFeatureMap
from spectraformer_fused.ops import cpu as cpu_ops
from spectraformer_fused.ops.cpu.window import cpu_window_attention
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import RFState, WindowState, empty_window_state

pytestmark = pytest.mark.skipif(not cpu_ops.extension_available(), reason="CPU extension unavailable")


def _inputs(B, T, H, Hk, D, Dv, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, T, Hk, Dv, generator=g).to(dtype)
    return q, k, v


def _map(component, D, m, Hk, kernel="softmax"):
    fm = RandomFeatureMap(D, m, component=component, kernel=kernel, num_heads=Hk, seed=3).eval()
    if component == "hedgehog":
        with torch.no_grad():
            fm.log_weight.copy_(torch.randn(Hk, m, generator=torch.Generator().manual_seed(9)))
    return fm


def _params(fm, q, k, causal, **kw):
    return fm.feature_params(q, k, scale=1.0 / math.sqrt(q.shape[-1]), causal=causal, **kw)


def _mask(B, T, seed=1):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, : T // 3] = False
    return mask


def _check_state(a, b, tag):
    assert isinstance(a, WindowState)
    empty = torch.isneginf(b.log_scale)
    assert torch.equal(torch.isneginf(a.log_scale), empty), f"{tag}: empty states differ"
    assert_close(a.log_scale[~empty], b.log_scale[~empty], torch.float32, name=f"{tag} log_scale")
    for name in ("S", "z", "k_tail", "v_tail"):
        assert_close(getattr(a, name), getattr(b, name), torch.float32, name=f"{tag} {name}")
    assert torch.equal(a.tail_keep, b.tail_keep), f"{tag}: tail_keep {a.tail_keep} != {b.tail_keep}"


# (component, kernel): positive random features, both kernel targets, data-dependent ones, hedgehog
COMPONENTS = [("hyprf", "softmax"), ("posrf", "gaussian"), ("oprf", "softmax"), ("saderf", "gaussian"),
              ("hedgehog", "softmax")]  # fmt: skip
T_ORACLE = 37


@pytest.mark.parametrize("window", [1, 2, 5, T_ORACLE + 3], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("component,kernel", COMPONENTS, ids=[f"{c}-{k}" for c, k in COMPONENTS])
def test_matches_oracle(component, kernel, causal, window):
    """GQA (4 query heads on 2 key/value heads), a padding mask, every window size class."""
    q, k, v = _inputs(2, T_ORACLE, 4, 2, 16, 8)
    mask = _mask(2, T_ORACLE)
    fm = _map(component, 16, 24, 2, kernel)
    p = _params(fm, q, k, causal, key_padding_mask=mask)
    o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=causal, window=window, key_padding_mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask)
    assert o.dtype == v.dtype
    assert_close(o, ref, torch.float32, name=f"{component} causal={causal} W={window} o")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_trigonometric_features(causal):
    """trigrf: signed features whose denominators come near 0 (outputs far above |v|), so the fp32 backend
    is compared as a relative error of the whole output, 1e-3 (the plain path reaches about 1e-5 here; the
    non-causal window subtracts the band's feature products from the whole state, which costs about
    fp32's epsilon times the sum of |phi_q . phi_k| per row)."""
    q, k, v = _inputs(1, 64, 2, 2, 16, 8, seed=4)
    fm = _map("trigrf", 16, 64, 2)
    p = _params(fm, q, k, causal)
    for window in (3, 70):
        o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=causal, window=window)
        ref = hybrid_oracle(q, k, v, p, window=window, causal=causal)
        err = ((o.double() - ref).norm() / ref.norm()).item()
        print(f"trigrf causal={causal} W={window}: relative error {err:.3e}")
        assert err <= 1e-3, f"trigrf causal={causal} W={window}: relative error {err:.3e}"


def test_long_sequence_chunks():
    """Several chunks of 64 tokens, a window crossing chunk boundaries, one head per group."""
    T = 150
    q, k, v = _inputs(1, T, 2, 2, 16, 16, seed=2)
    fm = _map("hyprf", 16, 32, 2)
    for causal in (False, True):
        p = _params(fm, q, k, causal)
        for window in (17, 64, 65):
            o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=causal, window=window)
            ref = hybrid_oracle(q, k, v, p, window=window, causal=causal)
            assert_close(o, ref, torch.float32, name=f"T={T} causal={causal} W={window} o")


def test_window_covers_everything_is_exact_attention():
    from spectraformer_fused.reference import exact_attention

    q, k, v = _inputs(2, 30, 2, 1, 16, 8, seed=6)
    fm = _map("posrf", 16, 16, 1)
    for causal in (False, True):
        p = _params(fm, q, k, causal)
        o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=causal, window=30)
        ref = exact_attention(q, k, v, causal=causal, scale=p.scale)
        assert_close(o, ref, torch.float32, name=f"W >= T causal={causal}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(dtype):
    q, k, v = _inputs(2, 45, 2, 2, 16, 16, seed=8, dtype=dtype)
    fm = _map("hyprf", 16, 32, 2)
    for causal in (False, True):
        p = _params(fm, q, k, causal)
        o, _ = cpu_ops.cpu_attention(q, k, v, p, causal=causal, window=6)
        assert o.dtype == dtype
        ref = hybrid_oracle(q, k, v, p, window=6, causal=causal)
        assert_close(o, ref, dtype, name=f"{dtype} causal={causal}")


def _run(q, k, v, p, window, state=None, mask=None):
    return cpu_ops.cpu_attention(
        q, k, v, p, causal=True, window=window, key_padding_mask=mask, initial_state=state, output_final_state=True
    )


@pytest.mark.parametrize("window", [1, 4, 9, 80], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("component", ["hyprf", "hedgehog"])
def test_split_runs_equal_one_run(component, window):
    """Two pieces with the state passed, and a prefix then T = 1 decode steps, equal one causal run (output
    and final state); a padding mask is carried across the pieces (its tail flags included)."""
    T = 70
    q, k, v = _inputs(2, T, 4, 2, 16, 8, seed=3)
    mask = _mask(2, T, seed=4)
    fm = _map(component, 16, 24, 2)
    p = _params(fm, q, k, True)
    o_full, s_full = _run(q, k, v, p, window, mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=True, key_padding_mask=mask)
    assert_close(o_full, ref, torch.float32, name=f"W={window} one run")
    cut = 33
    o1, s1 = _run(q[:, :cut], k[:, :cut], v[:, :cut], p, window, mask=mask[:, :cut])
    o2, s2 = _run(q[:, cut:], k[:, cut:], v[:, cut:], p, window, s1, mask=mask[:, cut:])
    assert_close(torch.cat([o1, o2], 1), o_full, torch.float32, name=f"W={window} two pieces")
    _check_state(s2, s_full, f"W={window} two pieces")
    outs, state = [o1], s1
    for t in range(cut, T):
        sl = slice(t, t + 1)
        o, state = _run(q[:, sl], k[:, sl], v[:, sl], p, window, state, mask=mask[:, sl])
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_full, torch.float32, name=f"W={window} token by token")
    _check_state(state, s_full, f"W={window} token by token")


def test_final_state_is_the_causal_continuations():
    """Non-causal calls return the state a causal continuation needs: the causal call's state."""
    q, k, v = _inputs(2, 50, 2, 2, 16, 8, seed=5)
    mask = _mask(2, 50)
    fm = _map("hyprf", 16, 24, 2)
    p = _params(fm, q, k, True)
    for window in (1, 7, 60):
        init = _run(q[:, :10], k[:, :10], v[:, :10], p, window, mask=mask[:, :10])[1]
        kw = dict(window=window, key_padding_mask=mask[:, 10:], initial_state=init, output_final_state=True)
        _, s_nc = cpu_ops.cpu_attention(q[:, 10:], k[:, 10:], v[:, 10:], p, causal=False, **kw)
        _, s_c = cpu_ops.cpu_attention(q[:, 10:], k[:, 10:], v[:, 10:], p, causal=True, **kw)
        _check_state(s_nc, s_c, f"non-causal final state W={window}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_packed_sequences(causal):
    """cu_seqlens (an empty sequence, one shorter than the window) equals one call per sequence, with an
    initial state per sequence; each sequence against the oracle when it starts empty."""
    lengths = [23, 0, 3, 70]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32)
    q, k, v = _inputs(1, offsets[-1], 2, 1, 16, 8, seed=11)
    fm = _map("posrf", 16, 24, 1)
    p = _params(fm, q, k, causal, offsets=offsets)
    window = 5
    # a non-empty initial state per sequence, made by a causal packed prefix
    qp, kp, vp = _inputs(1, 4 * 6, 2, 1, 16, 8, seed=12)
    pre = torch.tensor([0, 6, 12, 18, 24], dtype=torch.int32)
    _, init = cpu_ops.cpu_attention(qp, kp, vp, p, causal=True, window=window, cu_seqlens=pre, output_final_state=True)
    for state in (None, init):
        o, s = cpu_ops.cpu_attention(
            q, k, v, p, causal=causal, window=window, cu_seqlens=cu, initial_state=state, output_final_state=True
        )
        for i in range(len(lengths)):
            a, b = offsets[i], offsets[i + 1]
            st = None if state is None else WindowState(*(t[i : i + 1] for t in state))
            oi, si = cpu_ops.cpu_attention(
                q[:, a:b], k[:, a:b], v[:, a:b], p.rows(i, i + 1), causal=causal, window=window,
                initial_state=st, output_final_state=True,
            )  # fmt: skip
            tag = f"packed seq {i} causal={causal} state={state is not None}"
            assert_close(o[:, a:b], oi, torch.float32, name=f"{tag} o")
            _check_state(WindowState(*(t[i : i + 1] for t in s)), si, tag)
            if state is None and b > a:
                ref = hybrid_oracle(q[:, a:b], k[:, a:b], v[:, a:b], p.rows(i, i + 1), window=window, causal=causal)
                assert_close(oi, ref, torch.float32, name=f"{tag} vs oracle")


def test_empty_window_state_and_errors():
    q, k, v = _inputs(2, 5, 2, 2, 16, 8)
    fm = _map("hyprf", 16, 8, 2)
    p = _params(fm, q, k, True)
    empty = empty_window_state(2, 2, p.feature_dim, 16, 8, 4)
    o0, s0 = _run(q, k, v, p, 4)
    o1, s1 = _run(q, k, v, p, 4, empty)
    assert torch.equal(o0, o1)
    _check_state(s1, s0, "explicit empty state")
    # T = 2 < W - 1: the new tail spans into the initial one
    assert torch.equal(s0.tail_keep, torch.ones(2, 3, dtype=torch.bool))
    o, s = _run(q[:, :2], k[:, :2], v[:, :2], p, 4)
    assert s.tail_keep.tolist() == [[False, True, True]] * 2
    assert torch.equal(s.k_tail[:, :, 1:], k[:, :2].transpose(1, 2))
    with pytest.raises(TypeError, match="WindowState"):
        _run(q, k, v, p, 4, RFState(s0.S, s0.z, s0.log_scale))
    with pytest.raises(ValueError, match="window 4"):
        _run(q, k, v, p, 3, s0)
    with pytest.raises(ValueError, match="window"):
        cpu_window_attention(q, k, v, p, causal=True, window=0)


@pytest.mark.skipif(
    "window" not in inspect.signature(reference_attention).parameters,
    reason="reference_attention has no window yet (the CPU backward recomputes through it)",
)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradients(causal):
    """The fused backward (csrc/rf_window_bwd.cpp): gradients of q, k, v and of the initial state's S, z,
    k_tail, v_tail equal the reference's."""
    q, k, v = _inputs(2, 30, 2, 1, 16, 8, seed=13)
    fm = _map("hyprf", 16, 16, 1)
    p = _params(fm, q, k, causal)
    init = _run(q[:, :6], k[:, :6], v[:, :6], p, 4)[1]
    grads = []
    for fn in (cpu_ops.cpu_attention, reference_attention):
        leaves = [t[:, 6:].clone().requires_grad_(True) for t in (q, k, v)]
        st = [t.clone().requires_grad_(t.dtype != torch.bool and i != 2) for i, t in enumerate(init)]
        o, s = fn(*leaves, p, causal=causal, window=4, initial_state=WindowState(*st), output_final_state=True)
        # S and z on the shift log_scale: non-causal, the CPU backend returns the causal continuation's state
        # (its own shift), the reference the one on the maximum over every key
        shift = s.log_scale.exp()
        S, z = s.S * shift[..., None, None], s.z * shift[..., None]
        (o.pow(2).sum() + S.sum() + z.sum() + s.k_tail.sum() + s.v_tail.sum()).backward()
        grads.append([t.grad for t in leaves] + [st[i].grad for i in (0, 1, 3, 4)])
    for name, a, b in zip(("q", "k", "v", "S", "z", "k_tail", "v_tail"), *grads):
        assert_close(a, b, torch.float32, name=f"window grad {name} causal={causal}")
