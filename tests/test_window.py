"""Hybrid attention (DESIGN.md section 6): the reference backend against the dense oracle
(``helpers.hybrid_oracle``), forward and gradients; state passing (pieces, token by token); packed
sequences; W >= T as exact attention; the API's validation and routing; decoding with the module."""

import pytest
import torch
from helpers import assert_close, component_id, hybrid_oracle

from spectraformer_fused import (
    RandomFeatureMap,
    SpectraAttention,
    WindowState,
    available_backends,
    exact_attention,
    rf_attention,
)
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import RFState, empty_window_state

COMPONENTS = [
    ("posrf", {}),
    ("hyprf", {}),
    ("trigrf", {}),
    ("gerf", {"A": -0.1}),
    ("oprf", {}),
    ("saderf", {}),
    ("hedgehog", {}),
]
D = 8


def _cid(case):
    return component_id(*case)


def _inputs(B=2, T=13, H=4, Hk=2, Dv=D, dtype=torch.float64, seed=0, amp=0.7):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * amp).to(dtype)
    k = (torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64) * amp).to(dtype)
    v = torch.randn(B, T, Hk, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _map(component="posrf", args=None, *, Hk=2, weights="orf", kernel="softmax", dtype=torch.float64, m=8):
    fm = RandomFeatureMap(
        D, m, component=component, weights=weights, kernel=kernel, num_heads=Hk, seed=1, dtype=dtype, **(args or {})
    )
    if fm.spec.learned:  # hedgehog: non-trivial log-weights
        with torch.no_grad():
            fm.log_weight.copy_(torch.randn(fm.log_weight.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    return fm.eval()


def _params(fm, q, k, causal):
    return fm.feature_params(q, k, scale=D**-0.5, causal=causal)


def _mask(B, T, seed=5):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, 0] = True
    return mask


# ---------------------------------------------------------------- forward against the oracle
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window", [1, 2, 5, 13])
@pytest.mark.parametrize("case", COMPONENTS, ids=_cid)
def test_forward_matches_oracle(case, window, causal):
    q, k, v = _inputs()
    fm = _map(*case)
    p = _params(fm, q, k, causal)
    mask = _mask(2, 13)
    o, _ = reference_attention(q, k, v, p, causal=causal, window=window, chunk_size=4, key_padding_mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask)
    assert_close(o, ref, torch.float64, name="o")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "weights,kernel", [("gaussian", "softmax"), ("sorf", "gaussian"), ("learnable", "softmax"), ("qmc", "gaussian")]
)
def test_forward_weights_and_kernels(weights, kernel, causal):
    q, k, v = _inputs(T=11)
    fm = _map("posrf", weights=weights, kernel=kernel)
    p = _params(fm, q, k, causal)
    o, _ = reference_attention(q, k, v, p, causal=causal, window=3, chunk_size=5)
    assert_close(o, hybrid_oracle(q, k, v, p, window=3, causal=causal), torch.float64, name="o")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_forward_low_precision_inputs(dtype, causal):
    """fp32 math (the reference's) for fp32/fp16/bf16 inputs, against the fp64 oracle of the same inputs."""
    q, k, v = _inputs(T=17, dtype=dtype)
    fm = _map("hyprf", dtype=torch.float32)
    p = _params(fm, q, k, causal)
    o, _ = reference_attention(q, k, v, p, causal=causal, window=4, chunk_size=8)
    assert o.dtype == dtype
    ref = hybrid_oracle(q, k, v, p, window=4, causal=causal).to(dtype)
    assert_close(o, ref, dtype, name="o")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", COMPONENTS[:3] + COMPONENTS[-1:], ids=_cid)
def test_wide_window_is_exact_attention(case, causal):
    """W >= T without an initial state: softmax attention (Gaussian attention for kernel='gaussian')."""
    q, k, v = _inputs(T=9)
    mask = _mask(2, 9)
    for kernel in ("softmax", "gaussian"):
        fm = _map(*case, kernel=kernel)
        p = _params(fm, q, k, causal)
        o, _ = reference_attention(q, k, v, p, causal=causal, window=9, key_padding_mask=mask, chunk_size=4)
        ref = exact_attention(q, k, v, kernel=kernel, causal=causal, scale=D**-0.5, key_padding_mask=mask)
        assert_close(o, ref, torch.float64, name=f"o-{kernel}")


def test_window_none_unchanged():
    """window=None is the plain path, bit for bit."""
    q, k, v = _inputs()
    fm = _map("hyprf")
    for causal in (True, False):
        p = _params(fm, q, k, causal)
        a = reference_attention(q, k, v, p, causal=causal, output_final_state=True)
        b = reference_attention(q, k, v, p, causal=causal, output_final_state=True, window=None)
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(
    "case,weights",
    [(("posrf", {}), "learnable"), (("trigrf", {}), "fastfood_learnable"), (("hedgehog", {}), "orf")],
    ids=["posrf-learnable", "trigrf-fastfood_learnable", "hedgehog-orf"],
)
def test_gradients_match_oracle(case, weights, causal):
    """Gradients of q, k, v and of the learnable parameters (W, hedgehog's log-weights) through autograd."""
    q, k, v = (t.requires_grad_() for t in _inputs(T=11))
    fm = _map(*case, weights=weights)
    leaves = [q, k, v] + [t for t in fm.parameters() if t.requires_grad]
    assert len(leaves) > 3
    g = torch.randn(2, 11, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mask = _mask(2, 11)
    grads = []
    for attend in ("reference", "oracle"):
        p = _params(fm, q, k, causal)
        if attend == "reference":
            o, _ = reference_attention(q, k, v, p, causal=causal, window=3, chunk_size=4, key_padding_mask=mask)
        else:
            o = hybrid_oracle(q, k, v, p, window=3, causal=causal, key_padding_mask=mask)
        grads.append(torch.autograd.grad((o * g).sum(), leaves))
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, torch.float64, name=f"grad {i}")


# ---------------------------------------------------------------- states
def _state_close(a: WindowState, b: WindowState, dtype=torch.float64):
    """Two window states hold the same keys: S and z compared on one absolute scale, the tails exactly."""
    for name in ("S", "z"):
        x = getattr(a, name) * torch.exp(a.log_scale).reshape(*a.log_scale.shape, *[1] * (getattr(a, name).dim() - 2))
        y = getattr(b, name) * torch.exp(b.log_scale).reshape(*b.log_scale.shape, *[1] * (getattr(b, name).dim() - 2))
        assert_close(x, y, dtype, name=name)
    assert torch.equal(a.tail_keep, b.tail_keep)
    keep = a.tail_keep[:, None, :, None]
    assert torch.equal(a.k_tail * keep, b.k_tail * keep) and torch.equal(a.v_tail * keep, b.v_tail * keep)


@pytest.mark.parametrize("window", [1, 2, 5, 12])
@pytest.mark.parametrize("case", [("posrf", {}), ("trigrf", {}), ("hedgehog", {})], ids=_cid)
def test_pieces_and_tokens_equal_one_run(case, window):
    """Causal: a sequence in pieces (some shorter than W - 1) and token by token, each piece starting from
    the state the previous one left, equals one run; the final states agree."""
    T = 15
    q, k, v = _inputs(T=T)
    mask = _mask(2, T)
    fm = _map(*case)
    p = _params(fm, q, k, True)
    full, final = reference_attention(
        q, k, v, p, causal=True, window=window, key_padding_mask=mask, output_final_state=True, chunk_size=4
    )
    for cuts in ([0, 7, T], [0, 1, 3, 4, 10, T], list(range(T + 1))):
        state, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            o, state = reference_attention(
                q[:, a:b],
                k[:, a:b],
                v[:, a:b],
                p,
                causal=True,
                window=window,
                key_padding_mask=mask[:, a:b],
                initial_state=state,
                output_final_state=True,
                chunk_size=4,
            )
            outs.append(o)
        assert_close(torch.cat(outs, 1), full, torch.float64, name=f"o pieces {cuts[:4]}")
        _state_close(state, final)
    assert final.k_tail.shape == (2, 2, window - 1, D)


@pytest.mark.parametrize("window", [1, 4, 30])
def test_noncausal_after_a_prefix(window):
    """Non-causal queries after an initial state: the prefix's tail keys are exact within W positions, its
    older keys go through the features; equal to the oracle over the concatenation (prefix queries dropped),
    where the prefix's keys are visible to the new queries only."""
    T0, T = 7, 9
    q, k, v = _inputs(T=T0 + T)
    fm = _map("hyprf")
    p = _params(fm, q, k, False)
    _, state = reference_attention(
        q[:, :T0], k[:, :T0], v[:, :T0], p, causal=True, window=window, output_final_state=True
    )
    o, final = reference_attention(
        q[:, T0:], k[:, T0:], v[:, T0:], p, causal=False, window=window, initial_state=state, output_final_state=True
    )
    ref = hybrid_oracle(q, k, v, p, window=window, causal=False)[:, T0:]
    # the oracle's prefix queries are not ours, but its rows T0: see every key, as ours do
    assert_close(o, ref, torch.float64, name="o")
    _, causal_final = reference_attention(q, k, v, p, causal=True, window=window, output_final_state=True)
    _state_close(final, causal_final)


def test_empty_input_passes_the_state():
    q, k, v = _inputs(T=6)
    fm = _map("posrf")
    p = _params(fm, q, k, True)
    _, state = reference_attention(q, k, v, p, causal=True, window=4, output_final_state=True)
    for causal in (True, False):
        o, after = reference_attention(
            q[:, :0], k[:, :0], v[:, :0], p, causal=causal, window=4, initial_state=state, output_final_state=True
        )
        assert o.shape == (2, 0, 4, D)
        assert all(torch.equal(a, b) for a, b in zip(after, state))


# ---------------------------------------------------------------- packed sequences
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packed_equals_separate_calls(causal):
    lengths = [5, 0, 9, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    N, total = len(lengths), sum(lengths)
    q, k, v = _inputs(B=1, T=total)
    fm = _map("saderf")
    p = fm.feature_params(q, k, scale=D**-0.5, causal=causal, offsets=cu.tolist())
    init = empty_window_state(N, 2, fm.feature_dim, D, D, 3, dtype=torch.float64)
    _, init = reference_attention(
        *(t[:, :2].expand(N, -1, -1, -1) for t in (q, k, v)),
        p,
        causal=True,
        window=3,
        initial_state=init,
        output_final_state=True,
    )
    o, final = reference_attention(
        q, k, v, p, causal=causal, window=3, cu_seqlens=cu, initial_state=init, output_final_state=True
    )
    for i in range(N):
        a, b = cu[i].item(), cu[i + 1].item()
        oi, fi = reference_attention(
            q[:, a:b],
            k[:, a:b],
            v[:, a:b],
            p.rows(i, i + 1),
            causal=causal,
            window=3,
            initial_state=WindowState(*(t[i : i + 1] for t in init)),
            output_final_state=True,
        )
        assert_close(o[:, a:b], oi, torch.float64, name=f"o seq {i}")
        _state_close(WindowState(*(t[i : i + 1] for t in final)), fi)


# ---------------------------------------------------------------- the API: validation and routing
def test_rf_attention_window_equals_reference():
    q, k, v = _inputs(T=10, dtype=torch.float32)
    fm = _map("gerf", {"A": -0.1}, dtype=torch.float32)
    for causal in (True, False):
        o, state = rf_attention(q, k, v, fm, causal=causal, window=4, output_final_state=True, backend="reference")
        p = _params(fm, q, k, causal)
        ref, ref_state = reference_attention(q, k, v, p, causal=causal, window=4, output_final_state=True)
        assert torch.equal(o, ref) and isinstance(state, WindowState)
        assert all(torch.equal(a, b) for a, b in zip(state, ref_state))
    # window 0 is random features only
    assert torch.equal(rf_attention(q, k, v, fm, causal=True, window=0), rf_attention(q, k, v, fm, causal=True))
    if "cpu" in available_backends():  # the CPU backend's window through the API, against the reference
        for causal in (True, False):
            o, state = rf_attention(q, k, v, fm, causal=causal, window=4, output_final_state=True, backend="cpu")
            p = _params(fm, q, k, causal)
            ref, ref_state = reference_attention(q, k, v, p, causal=causal, window=4, output_final_state=True)
            assert_close(o, ref, torch.float32, name=f"cpu window o causal={causal}")
            _state_close(state, ref_state, torch.float32)


@pytest.mark.parametrize(
    "window,error,match",
    [(-1, ValueError, "window must be"), (True, TypeError, "window must be"), (2.0, TypeError, "window must be")],
)
def test_bad_window(window, error, match):
    q, k, v = _inputs(T=4, dtype=torch.float32)
    fm = _map(dtype=torch.float32)
    with pytest.raises(error, match=match):
        rf_attention(q, k, v, fm, window=window)
    with pytest.raises(error, match=match):
        SpectraAttention(16, 2, window=window)


def test_state_must_match_the_window():
    q, k, v = _inputs(T=4, dtype=torch.float32)
    fm = _map(dtype=torch.float32)
    _, ws = rf_attention(q, k, v, fm, causal=True, window=3, output_final_state=True)
    _, rs = rf_attention(q, k, v, fm, causal=True, output_final_state=True)
    with pytest.raises(ValueError, match="last 2 keys .* window=5 needs the last 4"):
        rf_attention(q, k, v, fm, causal=True, window=5, initial_state=ws)
    with pytest.raises(ValueError, match="WindowState .* but window is None"):
        rf_attention(q, k, v, fm, causal=True, initial_state=ws)
    with pytest.raises(TypeError, match="with window=3, initial_state must be a WindowState"):
        rf_attention(q, k, v, fm, causal=True, window=3, initial_state=rs)
    with pytest.raises(ValueError, match="tail_keep must have shape"):
        rf_attention(q, k, v, fm, causal=True, window=3, initial_state=ws._replace(tail_keep=ws.tail_keep[:1]))
    with pytest.raises(ValueError, match="v_tail must have shape"):
        rf_attention(q, k, v, fm, causal=True, window=3, initial_state=ws._replace(v_tail=ws.v_tail[..., :3]))
    with pytest.raises(TypeError, match="tail_keep must be torch.bool"):
        rf_attention(q, k, v, fm, causal=True, window=3, initial_state=ws._replace(tail_keep=ws.tail_keep.float()))


def test_backends_without_window(monkeypatch):
    """An explicit backend without window support is refused by name; "auto" falls back to the reference."""
    import spectraformer_fused.attention as api

    q, k, v = _inputs(T=6, dtype=torch.float32)
    fm = _map(dtype=torch.float32)
    for name in ("cpu", "triton"):
        if name not in api.WINDOW_BACKENDS:
            with pytest.raises(ValueError, match=f"backend='{name}' does not run hybrid attention"):
                rf_attention(q, k, v, fm, window=2, backend=name)
    monkeypatch.setattr(api, "WINDOW_BACKENDS", {"reference"})
    monkeypatch.setattr(api, "_resolve_plain", lambda *a: "cpu")
    calls = []
    monkeypatch.setitem(
        api._BACKEND_FNS, "reference", lambda *a, **kw: calls.append(kw) or reference_attention(*a, **kw)
    )
    rf_attention(q, k, v, fm, window=2)
    assert calls and calls[0]["window"] == 2


def test_empty_sequence_state_through_api():
    q, k, v = _inputs(T=0, dtype=torch.float32)
    fm = _map(dtype=torch.float32)
    o, state = rf_attention(q, k, v, fm, causal=True, window=3, output_final_state=True)
    assert o.shape == (2, 0, 4, D) and isinstance(state, WindowState) and state.k_tail.shape == (2, 2, 2, D)
    assert not state.tail_keep.any()


# ---------------------------------------------------------------- the module: decoding with the state
@pytest.mark.parametrize("window", [1, 3, 8])
def test_module_decodes_token_by_token(window):
    torch.manual_seed(0)
    layer = SpectraAttention(16, 4, num_kv_heads=2, component="hyprf", causal=True, window=window, seed=0).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        full = layer(x)
        y, state = layer(x[:, :2], output_final_state=True)
        outs = [y]
        for t in range(2, 9):
            y, state = layer(x[:, t : t + 1], initial_state=state, output_final_state=True)
            outs.append(y)
    assert isinstance(state, WindowState) and state.k_tail.shape == (2, 2, window - 1, 4)
    assert_close(torch.cat(outs, 1), full, torch.float32, name="decoded")


def test_rfstate_has_no_window():
    assert not isinstance(RFState(*empty_window_state(1, 1, 2, 2, 2, 3)[:3]), WindowState)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_oracle_is_kernel_estimate_and_exact_logits(causal):
    """``helpers.hybrid_oracle`` (the oracle of every backend's window tests) against the hybrid built
    directly from the public pieces: ``fm.kernel_estimate`` beyond the window, ``exp(exact_logits)`` inside,
    one normaliser, for both kernel targets and W = 1, 3, T (fp64, no data-dependent parameter, so the
    estimate's parameters are the call's)."""
    from spectraformer_fused.reference import exact_logits

    B, T, H, D = 2, 11, 2, 8
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    for kernel in ("softmax", "gaussian"):
        fm = RandomFeatureMap(D, 16, component="hyprf", kernel=kernel, num_heads=H, seed=4, dtype=torch.float64)
        p = fm.feature_params(q, k, scale=0.3, causal=causal, key_padding_mask=mask)
        est = fm.kernel_estimate(q, k, scale=0.3)  # [B, H, T, T]
        exact = exact_logits(q, k, kernel=kernel, scale=0.3).exp()
        t = torch.arange(T)
        diff = t[:, None] - t[None, :]
        for window in (1, 3, T):
            inside = (diff >= 0) & (diff < window) if causal else diff.abs() < window
            visible = (diff >= 0 if causal else torch.ones(T, T, dtype=torch.bool)) & mask[:, None, None, :]
            w = torch.where(inside, exact, est) * visible
            direct = ((w @ v.transpose(1, 2)) / w.sum(-1, keepdim=True)).transpose(1, 2)
            oracle = hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask)
            assert_close(oracle, direct, torch.float64, name=f"{kernel} causal={causal} W={window}")
