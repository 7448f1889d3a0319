"""Attention sinks and the learned exact/feature factor (DESIGN.md section 8) on the reference backend and the
API: against the dense oracle (``helpers.hybrid_oracle`` with ``sinks=`` and the factor), with and without a
window (W and S from 0 to >= T), causal and not, masks, GQA, packed sequences, pieces and token by token,
gradients of q, k, v, the feature parameters and the factor; the state's sink slots; validation and routing."""

import pytest
import torch
from helpers import assert_close, component_id, hybrid_oracle

from spectraformer_fused import RandomFeatureMap, SpectraAttention, WindowState, exact_attention, rf_attention
from spectraformer_fused.state import empty_window_state

COMPONENTS = [("posrf", {}), ("hyprf", {}), ("trigrf", {}), ("oprf", {}), ("hedgehog", {})]
D = 8
T = 13


def _inputs(B=2, T=T, H=4, Hk=2, dtype=torch.float64, seed=0, amp=0.7):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * amp).to(dtype)
    k = (torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64) * amp).to(dtype)
    v = torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _map(component="posrf", args=None, *, Hk=2, weights="orf", mix=0.4, dtype=torch.float64):
    fm = RandomFeatureMap(
        D, 8, component=component, weights=weights, num_heads=Hk, seed=1, dtype=dtype, mix=mix, **(args or {})
    )
    with torch.no_grad():
        if fm.log_mix is not None and Hk > 1:  # a different factor per key/value head
            fm.log_mix.add_(torch.linspace(-0.5, 0.5, Hk, dtype=fm.log_mix.dtype))
        if fm.spec.learned:
            fm.log_weight.copy_(torch.randn(fm.log_weight.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    return fm.eval()


def _mask(B, T, seed=5):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, 0] = False  # a masked sink
    mask[:, 1] = True
    return mask


def _oracle(q, k, v, fm, *, window, sinks, causal, mask=None):
    p = fm.feature_params(q, k, scale=D**-0.5, causal=causal, key_padding_mask=mask)
    return hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask, sinks=sinks)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window,sinks", [(None, 1), (None, 4), (1, 1), (3, 2), (5, 4), (2, 13), (13, 3), (None, 20)])
@pytest.mark.parametrize("case", COMPONENTS, ids=lambda c: component_id(*c))
def test_forward_matches_oracle(case, window, sinks, causal):
    q, k, v = _inputs()
    fm = _map(*case)
    mask = _mask(2, T)
    o = rf_attention(q, k, v, fm, causal=causal, window=window, sinks=sinks, key_padding_mask=mask)
    ref = _oracle(q, k, v, fm, window=window, sinks=sinks, causal=causal, mask=mask)
    assert_close(o, ref, torch.float64, name="o")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_sinks_zero_and_factor_one_change_nothing(causal):
    """sinks=0 (or None) is today's hybrid bit for bit; a factor of 1 equals no factor."""
    q, k, v = _inputs()
    plain, one = _map("hyprf", mix=None), _map("hyprf", mix=True, Hk=2)
    with torch.no_grad():
        one.log_mix.zero_()
    a = rf_attention(q, k, v, plain, causal=causal, window=3, output_final_state=True)
    b = rf_attention(q, k, v, plain, causal=causal, window=3, sinks=0, output_final_state=True)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert b[1].sinks == 0
    c = rf_attention(q, k, v, one, causal=causal, window=3)
    assert_close(c, a[0], torch.float64, name="factor 1")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_all_exact_is_softmax_and_factor_cancels(causal):
    """S >= T (or W >= T): every visible key is exact, so the factor cancels and the row is softmax."""
    q, k, v = _inputs(T=9)
    fm = _map("posrf", mix=5.0)
    for window, sinks in ((None, 9), (2, 9), (9, 1)):
        o = rf_attention(q, k, v, fm, causal=causal, window=window, sinks=sinks)
        assert_close(o, exact_attention(q, k, v, causal=causal), torch.float64, name=f"W={window} S={sinks}")


def test_factor_scales_the_exact_part():
    """The oracle's definition checked by hand for one row: g multiplies the exact weights only."""
    q, k, v = _inputs(B=1, T=6, H=2, Hk=2)
    a, b = _map("posrf", mix=None), _map("posrf", mix=3.0)
    o1 = rf_attention(q, k, v, a, causal=True, window=2, sinks=1)
    o3 = rf_attention(q, k, v, b, causal=True, window=2, sinks=1)
    assert not torch.allclose(o1, o3)
    p = a.feature_params(q, k, scale=D**-0.5, causal=True)
    with torch.no_grad():
        p.log_mix = b.log_mix.clone()
    assert_close(o3, hybrid_oracle(q, k, v, p, window=2, causal=True, sinks=1), torch.float64, name="o")


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("sinks", [1, 3, 6])
def test_pieces_and_token_by_token(window, sinks):
    """Causal: pieces of every size and one token at a time equal one run; the state's size is fixed."""
    q, k, v = _inputs(T=11)
    mask = _mask(2, 11)
    fm = _map("hyprf")
    ref = _oracle(q, k, v, fm, window=window, sinks=sinks, causal=True, mask=mask)
    for cuts in ([5], [1, 2, 3], list(range(1, 11))):
        state, outs, lo = None, [], 0
        for hi in cuts + [11]:
            o, state = rf_attention(
                q[:, lo:hi],
                k[:, lo:hi],
                v[:, lo:hi],
                fm,
                causal=True,
                window=window,
                sinks=sinks,
                key_padding_mask=mask[:, lo:hi],
                initial_state=state,
                output_final_state=True,
            )
            assert state.k_sink.shape == (2, 2, sinks, D) and state.k_tail.shape[2] == max((window or 0) - 1, 0)
            outs.append(o)
            lo = hi
        assert_close(torch.cat(outs, 1), ref, torch.float64, name=f"cuts={cuts}")
        seen = min(sinks, 11)
        assert state.sink_seen[:, :seen].all() and not state.sink_seen[:, seen:].any()
        assert torch.equal(state.sink_keep[:, :seen], mask[:, :seen])
        assert torch.equal(state.k_sink[:, :, :seen], k[:, :seen].transpose(1, 2))


def test_sink_slots_fill_across_pieces():
    """A sink that arrives in a later piece (the first piece shorter than S) is exact from then on."""
    q, k, v = _inputs(T=8)
    fm = _map("posrf")
    ref = _oracle(q, k, v, fm, window=2, sinks=5, causal=True)
    o1, s1 = rf_attention(q[:, :2], k[:, :2], v[:, :2], fm, causal=True, window=2, sinks=5, output_final_state=True)
    assert s1.sink_seen.sum().item() == 2 * 2
    o2 = rf_attention(q[:, 2:], k[:, 2:], v[:, 2:], fm, causal=True, window=2, sinks=5, initial_state=s1)
    assert_close(torch.cat([o1, o2], 1), ref, torch.float64, name="o")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packed_sequences_have_their_own_sinks(causal):
    q, k, v = _inputs(B=1, T=15)
    fm = _map("hyprf")
    cu = torch.tensor([0, 4, 4, 11, 15], dtype=torch.int32)
    o, st = rf_attention(q, k, v, fm, causal=causal, window=2, sinks=3, cu_seqlens=cu, output_final_state=True)
    assert st.k_sink.shape == (4, 2, 3, D)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            assert not st.sink_seen[i].any()
            continue
        ref = _oracle(q[:, a:b], k[:, a:b], v[:, a:b], fm, window=2, sinks=3, causal=causal)
        assert_close(o[:, a:b], ref, torch.float64, name=f"sequence {i}")
        assert st.sink_seen[i].sum().item() == min(3, b - a)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("window,sinks", [(None, 2), (3, 2), (2, 13)])
@pytest.mark.parametrize(
    "case,weights",
    [(("posrf", {}), "learnable"), (("hedgehog", {}), "orf"), (("trigrf", {}), "fastfood_learnable")],
    ids=["posrf-learnable", "hedgehog", "trigrf-fastfood_learnable"],
)
def test_gradients_match_oracle(case, weights, window, sinks, causal):
    """Gradients of q, k, v, the learnable feature parameters and the factor, against the oracle's."""
    q, k, v = (t.requires_grad_() for t in _inputs(T=9))
    fm = _map(*case, weights=weights)
    leaves = [q, k, v] + [t for t in fm.parameters() if t.requires_grad]
    assert any(t is fm.log_mix for t in leaves)
    g = torch.randn(2, 9, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    o = rf_attention(q, k, v, fm, causal=causal, window=window, sinks=sinks)
    got = torch.autograd.grad((o * g).sum(), leaves, allow_unused=True)
    ref = _oracle(q, k, v, fm, window=window, sinks=sinks, causal=causal)
    want = torch.autograd.grad((ref * g).sum(), leaves, allow_unused=True)
    for i, (a, b, leaf) in enumerate(zip(got, want, leaves)):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        # the factor's gradient is 0 in exact arithmetic when every key is exact (S >= T): rounding noise
        floor = 1e-4 if leaf is fm.log_mix else 1e-8
        assert_close(a, b, torch.float64, name=f"grad {i}", min_scale=floor)
    mix_grad = next(a for a, t in zip(got, leaves) if t is fm.log_mix)
    if sinks < 9:  # some keys go through the features: the factor matters
        assert mix_grad.abs().max() > 1e-3


def test_module_and_decoding():
    """SpectraAttention(sinks=, window=) decodes token by token as it prefills."""
    torch.manual_seed(0)
    m = SpectraAttention(16, 2, num_features=8, causal=True, window=3, sinks=2, dtype=torch.float64).eval()
    m.feature_map.log_mix = torch.nn.Parameter(torch.zeros(m.feature_map.num_heads, dtype=torch.float64) - 0.5)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    full = m(x)
    state, outs = None, []
    for t in range(9):
        o, state = m(x[:, t : t + 1], initial_state=state, output_final_state=True)
        outs.append(o)
    assert_close(torch.cat(outs, 1), full, torch.float64, name="decode")
    assert isinstance(state, WindowState) and state.sinks == 2


# ---------------------------------------------------------------- validation and routing
@pytest.mark.parametrize("bad,err", [(-1, ValueError), (True, TypeError), (2.0, TypeError), ("4", TypeError)])
def test_bad_sinks(bad, err):
    q, k, v = _inputs(T=4)
    fm = _map("posrf")
    with pytest.raises(err, match="sinks"):
        rf_attention(q, k, v, fm, causal=True, sinks=bad)
    with pytest.raises(err, match="sinks"):
        SpectraAttention(16, 2, num_features=8, sinks=bad)


@pytest.mark.parametrize(
    "bad,err", [(-0.5, ValueError), (0.0, ValueError), (float("inf"), ValueError), ("x", TypeError)]
)
def test_bad_mix(bad, err):
    with pytest.raises(err, match="mix"):
        RandomFeatureMap(D, 8, mix=bad)


def test_state_of_other_sinks_is_refused():
    q, k, v = _inputs(T=4)
    fm = _map("posrf")
    st = empty_window_state(2, 2, fm.feature_dim, D, D, 3, sinks=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sinks"):
        rf_attention(q, k, v, fm, causal=True, window=3, sinks=4, initial_state=st)
    with pytest.raises(ValueError, match="sinks"):
        rf_attention(q, k, v, fm, causal=True, window=3, initial_state=st)


def test_backends_without_sinks_fall_back_or_refuse():
    """'auto' runs sinks (and the factor) on a backend that has them; an explicit one without raises."""
    from spectraformer_fused.attention import MIX_BACKENDS, SINK_BACKENDS

    q, k, v = _inputs(T=6, dtype=torch.float32)
    fm = _map("posrf", dtype=torch.float32)
    ref = rf_attention(q, k, v, fm, causal=True, window=2, sinks=2, backend="reference")
    assert_close(rf_attention(q, k, v, fm, causal=True, window=2, sinks=2), ref, torch.float32, name="auto")
    for name in ("cpu", "triton"):
        if name not in SINK_BACKENDS:
            with pytest.raises(ValueError, match="sinks"):
                rf_attention(q, k, v, fm, causal=True, window=2, sinks=2, backend=name)
        if name not in MIX_BACKENDS:
            with pytest.raises(ValueError, match="mix"):
                rf_attention(q, k, v, fm, causal=True, window=2, backend=name)


def test_factor_is_saved_and_loaded():
    fm = _map("posrf", mix=0.1)
    other = RandomFeatureMap(D, 8, num_heads=2, seed=1, dtype=torch.float64, mix=True)
    other.load_state_dict(fm.state_dict())
    assert torch.equal(other.log_mix, fm.log_mix)
    with pytest.raises(RuntimeError):
        RandomFeatureMap(D, 8, num_heads=2, seed=1, dtype=torch.float64).load_state_dict(fm.state_dict())


def test_context_parallel_takes_sinks():
    """Context parallelism runs sinks (compared with one process in test_distributed.py, in real processes):
    here, without a process group, a bad value is refused first and a good one only asks for the group."""
    import torch.distributed as dist

    from spectraformer_fused.distributed import context_parallel_rf_attention

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    q, k, v = _inputs(T=4)
    with pytest.raises(ValueError, match="sinks"):
        context_parallel_rf_attention(q, k, v, _map("posrf"), sinks=-1)
    with pytest.raises(RuntimeError, match="process group"):
        context_parallel_rf_attention(q, k, v, _map("posrf"), sinks=2)
