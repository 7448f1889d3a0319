"""Decoding: the token-independent parameters are kept between calls and rebuilt when their sources change;
rf_attention and SpectraAttention decode token by token as one pass does."""

import copy

import pytest
import torch
from helpers import assert_close

from spectraformer_fused import RandomFeatureMap, SpectraAttention, available_backends, rf_attention

D = 8


def _qk(dtype=torch.float32, B=2, T=5, H=4, Hk=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=gen).to(dtype), torch.randn(B, T, Hk, D, generator=gen).to(dtype))


def _params(fm, q, k):
    return fm.feature_params(q, k, scale=0.5, causal=True)


def _fresh(fm, q, k):
    """The parameters built from scratch (no kept entry)."""
    fm._static_cache = None
    return _params(fm, q, k)


def _same(a, b):
    for name in ("W", "bias", "freq"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_kept_between_calls():
    fm = RandomFeatureMap(D, 12, component="gerf", num_heads=2, seed=0, A=-0.1)
    q, k = _qk()
    with torch.no_grad():
        p1, p2 = _params(fm, q, k), _params(fm, q, k)
    assert p1.W is p2.W and p1.bias.data_ptr() == p2.bias.data_ptr()
    _same(p1, _fresh(fm, q, k))


def _redraw(fm):
    fm.redraw(seed=7)


def _load_other(fm):
    fm.load_state_dict(
        RandomFeatureMap(
            D,
            12,
            component=fm.component,
            weights=fm.weight_name,
            num_heads=2,
            seed=11,
            **({"A": -0.1} if fm.component == "gerf" else {}),
        ).state_dict()
    )


def _round_trip_half(fm):
    fm.to(torch.float16).to(torch.float32)  # new storage each time; W rounded to fp16


def _set_A(fm):
    fm.A.fill_(-0.2)


def _sgd_step(fm):
    opt = torch.optim.SGD(fm.parameters(), lr=0.5)
    q, k = _qk(seed=3)
    v = torch.randn(2, 5, 2, 4)
    rf_attention(q, k, v, fm, causal=True, backend="reference").pow(2).sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "change, weights",
    [
        (_redraw, "orf"),
        (_redraw, "fastfood_learnable"),
        (_load_other, "orf"),
        (_round_trip_half, "gaussian"),
        (_set_A, "orf"),
        (_sgd_step, "learnable"),
        (_sgd_step, "fastfood_learnable"),
    ],
    ids=[
        "redraw",
        "redraw-learnable",
        "load_state_dict",
        "to-dtype",
        "gerf-A",
        "optimizer-step",
        "optimizer-step-fastfood",
    ],
)
def test_rebuilt_when_a_source_changes(change, weights):
    fm = RandomFeatureMap(D, 12, component="gerf", weights=weights, num_heads=2, seed=0, A=-0.1)
    q, k = _qk()
    with torch.no_grad():
        before = _params(fm, q, k)
        W_before, bias_before = before.W.clone(), before.bias.clone()
    change(fm)
    with torch.no_grad():
        after = _params(fm, q, k)
        assert not torch.equal(after.bias, bias_before), "the change did not change the parameters"
        if change is not _set_A:
            assert not torch.equal(after.W, W_before)
        _same(after, _fresh(fm, q, k))


def test_input_dtype_and_heads_select_the_entry():
    fm = RandomFeatureMap(D, 12, num_heads=1, seed=0)
    q, k = _qk()
    with torch.no_grad():
        p32 = _params(fm, q, k)
        p64 = _params(fm, q.double(), k.double())
        p1 = _params(fm, q, k[:, :, :1])
    assert p32.W.dtype == torch.float32 and p64.W.dtype == torch.float64
    assert p32.W.shape[0] == 2 and p1.W.shape[0] == 1


def test_learnable_weights_under_autograd():
    """With grad enabled and learnable W, nothing is kept: two backward passes in a row both reach W (a kept
    graph would fail the second time), and they equal a map that never kept anything."""
    fm = RandomFeatureMap(D, 12, component="posrf", weights="learnable", num_heads=2, seed=0)
    twin = copy.deepcopy(fm)
    q, k = _qk()
    v = torch.randn(2, 5, 2, 4)
    with torch.no_grad():
        _params(fm, q, k)  # an entry made without grad
    for _ in range(2):
        fm.zero_grad()
        rf_attention(q, k, v, fm, causal=True, backend="reference").pow(2).sum().backward()
        assert fm.weights.weight.grad is not None and fm.weights.weight.grad.abs().sum() > 0
    twin.zero_grad()
    twin._static_cache = None
    rf_attention(q, k, v, twin, causal=True, backend="reference").pow(2).sum().backward()
    assert_close(fm.weights.weight.grad, twin.weights.weight.grad, name="dW")


def _backends():
    return ["reference"] + (["cpu"] if "cpu" in available_backends() else [])


@pytest.mark.parametrize("backend", _backends())
def test_rf_attention_token_by_token(backend):
    B, T, H, Hk = 2, 9, 4, 2
    gen = torch.Generator().manual_seed(1)
    q, k = _qk(B=B, T=T, H=H, Hk=Hk)
    v = torch.randn(B, T, Hk, 6, generator=gen)
    fm = RandomFeatureMap(D, 16, component="hyprf", num_heads=Hk, seed=0)
    with torch.no_grad():
        o, final = rf_attention(q, k, v, fm, causal=True, output_final_state=True, backend=backend)
        state, steps = None, []
        for t in range(T):
            ot, state = rf_attention(
                q[:, t : t + 1],
                k[:, t : t + 1],
                v[:, t : t + 1],
                fm,
                causal=True,
                initial_state=state,
                output_final_state=True,
                backend=backend,
            )
            steps.append(ot)
    assert_close(torch.cat(steps, 1), o, name="o")
    assert_close(state.S, final.S, name="S")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("component, kv_heads", [("posrf", 4), ("oprf", 2), ("saderf", 1)])
def test_spectra_attention_decodes_incrementally(component, kv_heads, backend):
    """Prompt in one call, then one token per call carrying the state: the outputs of one pass. OPRF and
    SADERF decode in eval mode, with running statistics gathered in training mode before."""
    torch.manual_seed(0)
    layer = SpectraAttention(
        32, 4, num_kv_heads=kv_heads, num_features=16, component=component, causal=True, seed=0, backend=backend
    )
    x = torch.randn(2, 12, 32)
    if layer.feature_map.spec.data_dependent:
        layer.train()
        layer(torch.randn(2, 12, 32))
        assert layer.feature_map.num_batches_tracked.item() == 1
    layer.eval()
    with torch.no_grad():
        y, final = layer(x, output_final_state=True)
        assert final.S.shape == (2, kv_heads, layer.feature_map.feature_dim, 8)
        yp, state = layer(x[:, :5], output_final_state=True)
        outs = [yp]
        for t in range(5, 12):
            yt, state = layer(x[:, t : t + 1], initial_state=state, output_final_state=True)
            outs.append(yt)
    assert_close(torch.cat(outs, 1), y, name="y")
    assert_close(state.S, final.S, name="S")
    assert_close(state.z, final.z, name="z")


def test_spectra_attention_kv_heads_errors():
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        SpectraAttention(32, 4, num_kv_heads=3)
    layer = SpectraAttention(32, 4, num_kv_heads=2)
    assert layer.qkv.out_features == 32 + 2 * 2 * 8 and layer.feature_map.num_heads == 2


@pytest.mark.parametrize("window", [1, 4])
def test_window_decode_token_by_token_fp32(window):
    """rf_attention with a window, default backend, fp32, grouped-query: a prompt then single tokens with
    the WindowState passed equal one pass; the state keeps its shape while the sequence grows."""
    fm = RandomFeatureMap(D, 12, component="hyprf", num_heads=2, seed=0).eval()
    q, k = _qk(T=9)
    v = torch.randn(2, 9, 2, D, generator=torch.Generator().manual_seed(1))
    full = rf_attention(q, k, v, fm, causal=True, scale=0.5, window=window)
    o, state = rf_attention(
        q[:, :3], k[:, :3], v[:, :3], fm, causal=True, scale=0.5, window=window, output_final_state=True
    )
    outs, shapes = [o], [tuple(t.shape) for t in state]
    for t in range(3, 9):
        s = slice(t, t + 1)
        o, state = rf_attention(
            q[:, s],
            k[:, s],
            v[:, s],
            fm,
            causal=True,
            scale=0.5,
            window=window,
            initial_state=state,
            output_final_state=True,
        )
        outs.append(o)
        assert [tuple(t.shape) for t in state] == shapes
    assert_close(torch.cat(outs, 1), full, torch.float32, name="decoded")
