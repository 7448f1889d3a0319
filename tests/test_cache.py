"""The exact cache (``cache=C``, DESIGN.md section 9) on the reference and the CPU backend and through the API:
against the oracle (``helpers.cache_oracle``: the cache's contents replayed by a plain loop, exact weights over
window U sinks U cache, features over the rest), in one prefill and token by token, with masks, GQA, sinks,
the factor, packed sequences; the CPU backend against the reference; the state's size; gradients;
validation and routing; the module, convert / RFCache / generate() and linearize."""

import pytest
import torch
from helpers import assert_close, cache_oracle, component_id

from spectraformer_fused import RandomFeatureMap, SpectraAttention, rf_attention
from spectraformer_fused.attention import CACHE_BACKENDS
from spectraformer_fused.cache import SCORES, key_scores
from spectraformer_fused.ops import cpu_extension_loaded
from spectraformer_fused.reference import _cache_attention
from spectraformer_fused.state import CacheState, WindowState, empty_window_state

D = 8
T = 23
COMPONENTS = [("posrf", {}), ("hyprf", {}), ("oprf", {}), ("hedgehog", {})]
needs_cpu = pytest.mark.skipif(not cpu_extension_loaded(), reason="the compiled CPU backend is not built")


def _inputs(B=2, T=T, H=4, Hk=2, dtype=torch.float64, seed=0, amp=0.8):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * amp).to(dtype)
    k = (torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64) * amp).to(dtype)
    v = torch.randn(B, T, Hk, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _map(component="posrf", args=None, *, Hk=2, mix=None, dtype=torch.float64):
    fm = RandomFeatureMap(D, 8, component=component, num_heads=Hk, seed=1, dtype=dtype, mix=mix, **(args or {}))
    with torch.no_grad():
        if fm.log_mix is not None and Hk > 1:
            fm.log_mix.add_(torch.linspace(-0.5, 0.5, Hk, dtype=fm.log_mix.dtype))
        if fm.spec.learned:
            fm.log_weight.copy_(torch.randn(fm.log_weight.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    return fm.eval()


def _mask(B, T, seed=5):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, 1] = True
    return mask


def _oracle(q, k, v, fm, *, window, cache, sinks=0, mask=None):
    p = fm.feature_params(q, k, scale=D**-0.5, causal=True, key_padding_mask=mask)
    return cache_oracle(q, k, v, p, window=window, cache=cache, sinks=sinks, key_padding_mask=mask)


def _cached_positions(state, k, b, h):
    """The positions of the keys a final state's cache holds (row b, key/value head h), in slot order."""
    out = []
    for s in range(state.cache):
        if not state.cache_keep[b, s]:
            continue
        hit = (k[b, :, h].double() - state.k_cache[b, h, s].double()).abs().amax(-1) == 0
        out.append(int(hit.nonzero()[0]))
    return out


# ---------------------------------------------------------------- the reference against the oracle
@pytest.mark.parametrize("window,sinks,cache", [(1, 0, 1), (1, 0, 5), (3, 0, 2), (4, 2, 3), (2, 1, 30), (30, 0, 2)])
@pytest.mark.parametrize("case", COMPONENTS, ids=lambda c: component_id(*c))
def test_reference_matches_oracle(case, window, sinks, cache):
    q, k, v = _inputs()
    fm = _map(*case, mix=0.6 if case[0] == "hyprf" else None)
    mask = _mask(2, T)
    o, st = rf_attention(
        q,
        k,
        v,
        fm,
        causal=True,
        window=window,
        sinks=sinks,
        cache=cache,
        key_padding_mask=mask,
        backend="reference",
        output_final_state=True,
    )
    ref, cached = _oracle(q, k, v, fm, window=window, cache=cache, sinks=sinks, mask=mask)
    assert_close(o, ref, torch.float64, name="o")
    assert isinstance(st, CacheState) and st.k_cache.shape == (2, 2, cache, D)
    for b in range(2):
        assert int(st.cache_keep[b].sum()) == len(cached[b][0]) <= cache
        for h in range(2):
            assert _cached_positions(st, k, b, h) == cached[b][h], (b, h)


@pytest.mark.parametrize("score", SCORES)
def test_every_score_matches_the_oracle(score):
    q, k, v = _inputs(seed=2)
    fm = _map("hyprf")
    p = fm.feature_params(q, k, scale=D**-0.5, causal=True)
    o, _ = _cache_attention(
        q,
        k,
        v,
        p,
        window=2,
        key_padding_mask=None,
        initial_state=None,
        output_final_state=False,
        cache=3,
        score=score,
    )
    ref, _ = cache_oracle(q, k, v, p, window=2, cache=3, score=score)
    assert_close(o, ref, torch.float64, name=score)


def test_scores_differ_and_unknown_is_refused():
    q, k, v = _inputs(B=1, T=6, Hk=2)
    fm = _map("posrf")
    p = fm.feature_params(q, k, scale=D**-0.5, causal=True)
    st = rf_attention(q, k, v, fm, causal=True, window=1, output_final_state=True)[1]
    kk, vv = k.transpose(1, 2), v.transpose(1, 2)
    got = {s: key_scores(kk, vv, st.S, st.z, st.log_scale, p, D**-0.25, s) for s in SCORES}
    assert all(g.shape == (1, 2, 6) and torch.isfinite(g).all() for g in got.values())
    assert not torch.allclose(got["recall"], got["recall_other"])
    with pytest.raises(ValueError, match="score"):
        key_scores(kk, vv, st.S, st.z, st.log_scale, p, D**-0.25, "nope")


def test_cache_zero_changes_nothing_and_big_cache_is_exact():
    """cache=0 (or None) is the window's result bit for bit; a cache that never fills keeps every key exact
    (softmax attention, the factor cancelling)."""
    from spectraformer_fused import exact_attention

    q, k, v = _inputs(T=12)
    fm = _map("hyprf", mix=0.3)
    a = rf_attention(q, k, v, fm, causal=True, window=3, sinks=1, output_final_state=True)
    b = rf_attention(q, k, v, fm, causal=True, window=3, sinks=1, cache=0, output_final_state=True)
    assert isinstance(b[1], WindowState) and torch.equal(a[0], b[0])
    o = rf_attention(q, k, v, fm, causal=True, window=3, cache=12)
    assert_close(o, exact_attention(q, k, v, causal=True), torch.float64, name="all exact")


def test_pieces_and_token_by_token_reference():
    q, k, v = _inputs(T=17)
    mask = _mask(2, 17)
    fm = _map("posrf", mix=0.5)
    ref, _ = _oracle(q, k, v, fm, window=3, cache=3, sinks=2, mask=mask)
    for cuts in ([6], [1, 2, 9], list(range(1, 17))):
        state, outs, lo = None, [], 0
        for hi in cuts + [17]:
            o, state = rf_attention(
                q[:, lo:hi],
                k[:, lo:hi],
                v[:, lo:hi],
                fm,
                causal=True,
                window=3,
                sinks=2,
                cache=3,
                key_padding_mask=mask[:, lo:hi],
                initial_state=state,
                output_final_state=True,
                backend="reference",
            )
            assert state.k_cache.shape == (2, 2, 3, D) and state.k_tail.shape == (2, 2, 2, D)
            assert int(state.cache_keep.sum(-1).max()) <= 3
            outs.append(o)
            lo = hi
        assert_close(torch.cat(outs, 1), ref, torch.float64, name=f"cuts={cuts}")


def test_gqa_and_packed_sequences():
    q, k, v = _inputs(B=1, T=26, H=4, Hk=1)
    fm = _map("hyprf", Hk=1)
    cu = torch.tensor([0, 9, 9, 26], dtype=torch.int32)
    o, st = rf_attention(q, k, v, fm, causal=True, window=2, cache=2, sinks=1, cu_seqlens=cu, output_final_state=True)
    assert isinstance(st, CacheState) and st.k_cache.shape == (3, 1, 2, D)
    assert not st.cache_keep[1].any()
    for i, (a, b) in enumerate(((0, 9), (9, 26))):
        ref, _ = _oracle(q[:, a:b], k[:, a:b], v[:, a:b], fm, window=2, cache=2, sinks=1)
        assert_close(o[:, a:b], ref, torch.float64, name=f"sequence {i}")


def test_gradients_flow_with_the_decisions_fixed():
    """Gradients of q, k, v and the factor equal those of the oracle (whose decisions are constants too)."""
    q, k, v = (t.requires_grad_() for t in _inputs(T=11))
    fm = _map("posrf", mix=0.5)
    g = torch.randn(2, 11, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    leaves = [q, k, v, fm.log_mix]
    o = rf_attention(q, k, v, fm, causal=True, window=2, cache=2, backend="reference")
    got = torch.autograd.grad((o * g).sum(), leaves)
    ref, _ = _oracle(q, k, v, fm, window=2, cache=2)
    want = torch.autograd.grad((ref * g).sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, torch.float64, name=f"grad {i}")


# ---------------------------------------------------------------- the CPU backend
def _assert_same_state(a, b):
    """Two CacheStates hold the same keys: the window's fields equal (the feature state to rounding: the
    folds may be summed in another order), the cache the same set of keys and values per (row, head) (the
    slot order may differ)."""
    for name in ("S", "z", "log_scale"):  # log_scale is -inf while nothing has been folded
        x, y = getattr(a, name).double(), getattr(b, name).double()
        assert_close(x.nan_to_num(neginf=-1e9), y.nan_to_num(neginf=-1e9), torch.float32, name=name)
    for name in CacheState._fields[3:10]:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.cache_keep, b.cache_keep)
    for r in range(a.k_cache.shape[0]):
        for h in range(a.k_cache.shape[1]):
            rows = []
            for st in (a, b):
                kv = torch.cat([st.k_cache[r, h], st.v_cache[r, h]], -1)[st.cache_keep[r]]
                rows.append(sorted(map(tuple, kv.tolist())))
            assert rows[0] == rows[1], (r, h)


@needs_cpu
@pytest.mark.parametrize("window,sinks,cache,chunk", [(1, 0, 1, 64), (3, 0, 4, 5), (4, 2, 3, 7), (2, 1, 40, 64)])
@pytest.mark.parametrize("case", [("hyprf", {}), ("hedgehog", {}), ("trigrf", {})], ids=lambda c: component_id(*c))
def test_cpu_equals_reference(case, window, sinks, cache, chunk):
    """The same decisions (a state-free score decided for a whole piece at once, or the reference's loop for
    the others): the same cache and tail, the state and the outputs to rounding; in one prefill and token by
    token."""
    from spectraformer_fused.ops.cpu.cache import cpu_cache_attention

    q, k, v = _inputs(T=29, dtype=torch.float32)
    fm = _map(*case, mix=0.4, dtype=torch.float32)
    mask = _mask(2, 29)
    kw = dict(causal=True, window=window, sinks=sinks, cache=cache, output_final_state=True)
    o_ref, s_ref = rf_attention(q, k, v, fm, key_padding_mask=mask, backend="reference", **kw)
    o_cpu, s_cpu = rf_attention(q, k, v, fm, key_padding_mask=mask, backend="cpu", **kw)
    assert_close(o_cpu, o_ref, torch.float32, name="prefill")
    _assert_same_state(s_cpu, s_ref)
    p = fm.feature_params(q, k, scale=D**-0.5, causal=True, key_padding_mask=mask)
    o_chunk, _ = cpu_cache_attention(
        q, k, v, p, causal=True, window=window, sinks=sinks, cache=cache, key_padding_mask=mask, chunk_size=chunk
    )
    assert_close(o_chunk, o_ref, torch.float32, name=f"chunk {chunk}")
    state, outs = None, []
    for t in range(29):
        o, state = rf_attention(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            fm,
            key_padding_mask=mask[:, t : t + 1],
            initial_state=state,
            backend="cpu",
            **kw,
        )
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_ref, torch.float32, name="token by token")
    _assert_same_state(state, s_ref)


@needs_cpu
@pytest.mark.parametrize("window,sinks,cache", [(2, 0, 1), (3, 2, 4), (5, 1, 3)])
@pytest.mark.parametrize(
    "case", [("posrf", {}), ("oprf", {}), ("hedgehog", {}), ("trigrf", {})], ids=lambda c: component_id(*c)
)
def test_compiled_decoding_step_equals_reference(monkeypatch, case, window, sinks, cache):
    """The T = 1 step without gradients runs on the extension (``_compiled_step``: the cache's slots read as
    exact keys beside the sinks); token by token it equals the reference's steps: the outputs to rounding,
    the tail, the sinks, the cache and its decisions bit for bit, the state to rounding; with masks, GQA and
    the factor. Each step starts from the reference's state, so a slip cannot hide in a later one."""
    from spectraformer_fused.ops.cpu import cache as cpu_cache

    calls, folds = [], []
    step, ext = cpu_cache._compiled_step, cpu_cache._load()

    class Counting:  # the extension, counting the steps that fold in C++ (the cache full in every row)
        def __getattr__(self, name):
            if name == "cache_fold":
                folds.append(1)
            return getattr(ext, name)

    monkeypatch.setattr(cpu_cache, "_compiled_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    monkeypatch.setattr(cpu_cache, "_load", Counting)
    Tn = 26
    q, k, v = _inputs(T=Tn, H=6, Hk=2, dtype=torch.float32, seed=11)
    fm = _map(*case, mix=0.4, dtype=torch.float32)
    mask = _mask(2, Tn, seed=2)
    kw = dict(causal=True, window=window, sinks=sinks, cache=cache, output_final_state=True)
    st_ref, worst = None, 0.0
    with torch.no_grad():
        for t in range(Tn):
            args = (q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], fm)
            m = mask[:, t : t + 1]
            o_ref, nxt = rf_attention(*args, key_padding_mask=m, initial_state=st_ref, backend="reference", **kw)
            o_cpu, st_cpu = rf_attention(*args, key_padding_mask=m, initial_state=st_ref, backend="cpu", **kw)
            worst = max(worst, float((o_cpu - o_ref).abs().max()))
            assert_close(o_cpu, o_ref, torch.float32, name=f"step {t}")
            _assert_same_state(st_cpu, nxt)
            assert torch.equal(st_cpu.k_cache, nxt.k_cache) and torch.equal(st_cpu.v_cache, nxt.v_cache), t
            st_ref = nxt
    # chained on its own states: the outputs of one prefill of the reference, the final cache the same
    o_full, s_full = rf_attention(q, k, v, fm, key_padding_mask=mask, backend="reference", **kw)
    st, outs = None, []
    with torch.no_grad():
        for t in range(Tn):
            args = (q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], fm)
            o, st = rf_attention(*args, key_padding_mask=mask[:, t : t + 1], initial_state=st, backend="cpu", **kw)
            outs.append(o)
    assert_close(torch.cat(outs, 1), o_full, torch.float32, name="chained steps")
    _assert_same_state(st, s_full)
    assert len(calls) == 2 * Tn, "the T = 1 calls did not take the compiled step"
    assert folds, "no step folded in the extension"
    print(f"compiled step vs reference: worst |o| difference {worst:.2e}; {len(folds)} of {Tn} steps folded in C++")


@needs_cpu
@pytest.mark.parametrize(
    "case", [("posrf", {}), ("hyprf", {}), ("trigrf", {}), ("hedgehog", {})], ids=lambda c: component_id(*c)
)
def test_extension_fold_equals_admit(case):
    """``cache_fold`` (csrc/rf_cache.cpp), the decoding step's fold: given admit's decision on a full cache, the
    same state to rounding (from an empty state too) and the same slots bit for bit, in arrival order."""
    from spectraformer_fused.cache import _scores_and_features, admit
    from spectraformer_fused.ops.cpu.extension import _load
    from spectraformer_fused.reference import _cast_params

    C, Hk = 5, 2
    q, k, v = _inputs(B=3, T=C + 1, H=4, Hk=Hk, dtype=torch.float32, seed=8, amp=1.2)
    fm = _map(*case, dtype=torch.float32)
    p = _cast_params(fm.feature_params(q, k, scale=D**-0.5, causal=True), torch.float32)
    kc, vc = k[:, :C].transpose(1, 2).contiguous(), v[:, :C].transpose(1, 2).contiguous()
    kn, vn = k[:, C].contiguous(), v[:, C].contiguous()
    ckeep, keep = torch.ones(3, C, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    g = torch.Generator().manual_seed(4)
    F = fm.feature_dim
    S = torch.randn(3, Hk, F, D, generator=g)
    z = torch.rand(3, Hk, F, generator=g)
    m = torch.tensor([[0.5, -0.3], [float("-inf"), float("-inf")], [9.0, 2.0]])  # row 1: nothing folded yet
    S[1], z[1] = 0.0, 0.0
    root = D**-0.25
    want = admit(S, z, m, kc, vc, ckeep, kn, vn, keep, p, root)
    ck, cv = torch.cat([kc, kn[:, :, None]], 2), torch.cat([vc, vn[:, :, None]], 2)
    sc, (e, mult) = _scores_and_features(ck, cv, S, z, m, p, root, None)
    assert torch.equal(sc.argmin(-1), want[6].folded)
    mult = None if mult is None else mult.contiguous()
    got = _load().cache_fold(S, z, m, e.contiguous(), mult, ck, cv, sc.argmin(-1).contiguous())
    for name, a, b in zip(("S", "z", "log_scale"), got[:3], want[:3]):
        assert_close(a.nan_to_num(neginf=-1e9), b.nan_to_num(neginf=-1e9), torch.float32, name=name)
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])
    with pytest.raises(ValueError, match="loser"):
        _load().cache_fold(S, z, m, e.contiguous(), mult, ck, cv, torch.full((3, Hk), C + 1))


@needs_cpu
def test_decoding_step_with_gradients_or_fp64_takes_the_reference():
    """A step whose inputs require grad (or fp64, or W = 1) runs the reference's step: the gradients reach q,
    k, v and the factor as the reference's do."""
    from spectraformer_fused.ops.cpu import cache as cpu_cache

    q, k, v = _inputs(T=9, dtype=torch.float32, seed=3)
    fm = _map("hyprf", mix=0.5, dtype=torch.float32)
    kw = dict(causal=True, window=2, sinks=1, cache=2, output_final_state=True)
    with torch.no_grad():
        _, st = rf_attention(q[:, :8], k[:, :8], v[:, :8], fm, backend="reference", **kw)
    x = [t[:, 8:].clone().requires_grad_() for t in (q, k, v)]
    p = fm.feature_params(*x[:2], scale=D**-0.5, causal=True)
    assert not cpu_cache._compiled_step_applies(*x, p, st, 2)
    assert not cpu_cache._compiled_step_applies(*(t.detach().double() for t in x), p, st, 2)
    assert not cpu_cache._compiled_step_applies(*(t.detach() for t in x), p, st, 1)
    g = torch.randn(2, 1, 4, D, generator=torch.Generator().manual_seed(2))
    grads = []
    for backend in ("reference", "cpu"):
        o, _ = rf_attention(*x, fm, initial_state=st, backend=backend, **kw)
        grads.append(torch.autograd.grad((o * g).sum(), [*x, fm.log_mix]))
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, torch.float32, name=f"grad {i}")


@needs_cpu
@pytest.mark.parametrize("score", SCORES)
def test_cpu_decides_every_score_as_the_reference(score):
    from spectraformer_fused.ops.cpu.cache import cpu_cache_attention

    q, k, v = _inputs(T=40, dtype=torch.float32, seed=7)
    fm = _map("hyprf", mix=0.4, dtype=torch.float32)
    mask = _mask(2, 40)
    p = fm.feature_params(q, k, scale=D**-0.5, causal=True, key_padding_mask=mask)
    kw = dict(window=3, sinks=1, cache=4, key_padding_mask=mask, initial_state=None, output_final_state=True)
    o_ref, s_ref = _cache_attention(q, k, v, p, score=score, **kw)
    o_cpu, s_cpu = cpu_cache_attention(q, k, v, p, causal=True, chunk_size=8, score=score, **kw)
    assert_close(o_cpu, o_ref, torch.float32, name=score)
    _assert_same_state(s_cpu, s_ref)


@needs_cpu
def test_cpu_against_oracle_gqa_packed_and_bf16():
    q, k, v = _inputs(B=1, T=30, H=4, Hk=2, dtype=torch.float32, seed=4)
    fm = _map("posrf", dtype=torch.float32)
    cu = torch.tensor([0, 13, 30], dtype=torch.int32)
    o = rf_attention(q, k, v, fm, causal=True, window=3, cache=2, cu_seqlens=cu, backend="cpu")
    for a, b in ((0, 13), (13, 30)):
        ref, _ = _oracle(q[:, a:b].double(), k[:, a:b].double(), v[:, a:b].double(), fm.double(), window=3, cache=2)
        assert_close(o[:, a:b], ref, torch.float32, name=f"{a}:{b}")
    ob = rf_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), fm, causal=True, window=3, cache=2, backend="cpu")
    assert ob.dtype == torch.bfloat16 and torch.isfinite(ob.float()).all()


@needs_cpu
def test_cpu_gradients_equal_reference():
    q, k, v = (t.requires_grad_() for t in _inputs(T=15, dtype=torch.float32))
    fm = _map("hyprf", mix=0.5, dtype=torch.float32)
    g = torch.randn(2, 15, 4, D, generator=torch.Generator().manual_seed(1))
    grads = []
    for backend in ("reference", "cpu"):
        o = rf_attention(q, k, v, fm, causal=True, window=2, sinks=1, cache=3, backend=backend)
        grads.append(torch.autograd.grad((o * g).sum(), [q, k, v, fm.log_mix]))
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, torch.float32, name=f"grad {i}")


# ---------------------------------------------------------------- validation and routing
def test_cache_score_is_chosen_per_call():
    """``cache_score`` chooses the keys: the reference equals the oracle with that score (fp64), the CPU backend
    the reference (fp32); None is the default score; the module and bad values."""
    mask = _mask(2, 21)
    kw = dict(causal=True, window=3, sinks=1, cache=3, key_padding_mask=mask)
    outs = {}
    for dtype in (torch.float64, torch.float32):
        q, k, v = _inputs(T=21, seed=9, dtype=dtype)
        fm = _map("hyprf", mix=0.4, dtype=dtype)
        with torch.no_grad():
            for score in SCORES:
                o = outs[score] = rf_attention(q, k, v, fm, cache_score=score, backend="reference", **kw)
                if dtype == torch.float64:
                    p = fm.feature_params(q, k, scale=D**-0.5, causal=True, key_padding_mask=mask)
                    want, _ = cache_oracle(q, k, v, p, window=3, cache=3, sinks=1, key_padding_mask=mask, score=score)
                    assert_close(o, want, dtype, name=score)
                elif cpu_extension_loaded():
                    got = rf_attention(q, k, v, fm, cache_score=score, backend="cpu", **kw)
                    assert_close(got, o, dtype, name=f"cpu {score}")
            assert torch.equal(rf_attention(q, k, v, fm, backend="reference", **kw), outs["kernel"])
        assert not torch.equal(outs["kernel"], outs["recall"])
    m = SpectraAttention(16, 2, num_features=8, causal=True, window=2, cache=2, cache_score="recall")
    assert m.cache_score == "recall"
    for bad, err in (("nope", ValueError), (1, TypeError)):
        with pytest.raises(err, match="cache_score"):
            rf_attention(q, k, v, fm, cache_score=bad, **kw)
    with pytest.raises(ValueError, match="needs a cache"):
        rf_attention(q, k, v, fm, causal=True, window=3, cache_score="recall")
    with pytest.raises(ValueError, match="needs a cache"):
        SpectraAttention(16, 2, num_features=8, causal=True, window=2, cache_score="recall")


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (True, TypeError), (2.0, TypeError), ("4", TypeError)])
def test_bad_cache(bad, err):
    q, k, v = _inputs(T=4)
    fm = _map("posrf")
    with pytest.raises(err, match="cache"):
        rf_attention(q, k, v, fm, causal=True, window=2, cache=bad)
    with pytest.raises(err, match="cache"):
        SpectraAttention(16, 2, num_features=8, causal=True, window=2, cache=bad)


def test_cache_needs_causal_and_a_window():
    q, k, v = _inputs(T=4)
    fm = _map("posrf")
    with pytest.raises(ValueError, match="causal"):
        rf_attention(q, k, v, fm, causal=False, window=2, cache=2)
    for window, sinks in ((None, None), (None, 2), (0, None)):
        with pytest.raises(ValueError, match="window"):
            rf_attention(q, k, v, fm, causal=True, window=window, sinks=sinks, cache=2)
    with pytest.raises(ValueError, match="causal"):
        SpectraAttention(16, 2, num_features=8, window=2, cache=2)


def test_states_of_another_cache_are_refused():
    q, k, v = _inputs(T=4)
    fm = _map("posrf")
    st = empty_window_state(2, 2, fm.feature_dim, D, D, 3, cache=2, dtype=torch.float64)
    assert isinstance(st, CacheState) and st.cache == 2 and st.window_state.window == 3
    with pytest.raises(ValueError, match="cache"):
        rf_attention(q, k, v, fm, causal=True, window=3, cache=4, initial_state=st)
    with pytest.raises(ValueError, match="cache"):
        rf_attention(q, k, v, fm, causal=True, window=3, initial_state=st)
    with pytest.raises(TypeError, match="CacheState"):
        rf_attention(q, k, v, fm, causal=True, window=3, cache=2, initial_state=st.window_state)
    with pytest.raises(ValueError, match="window"):
        rf_attention(q, k, v, fm, causal=True, window=2, cache=2, initial_state=st)


def test_backends_without_cache_fall_back_or_refuse():
    q, k, v = _inputs(T=6, dtype=torch.float32)
    fm = _map("posrf", dtype=torch.float32)
    ref = rf_attention(q, k, v, fm, causal=True, window=2, cache=2, backend="reference")
    assert_close(rf_attention(q, k, v, fm, causal=True, window=2, cache=2), ref, torch.float32, name="auto")
    assert "triton" not in CACHE_BACKENDS
    with pytest.raises(ValueError, match="cache.*reference"):
        rf_attention(q, k, v, fm, causal=True, window=2, cache=2, backend="triton")


def test_empty_input_returns_the_state():
    q, k, v = _inputs(T=0)
    fm = _map("posrf")
    o, st = rf_attention(q, k, v, fm, causal=True, window=2, cache=3, output_final_state=True)
    assert o.shape == (2, 0, 4, D) and isinstance(st, CacheState) and st.cache == 3


# ---------------------------------------------------------------- the module and transformers
def test_module_decodes_as_it_prefills():
    torch.manual_seed(0)
    m = SpectraAttention(16, 2, num_features=8, causal=True, window=2, sinks=1, cache=2, dtype=torch.float64).eval()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    full = m(x)
    state, outs = None, []
    for t in range(12):
        o, state = m(x[:, t : t + 1], initial_state=state, output_final_state=True)
        outs.append(o)
    assert_close(torch.cat(outs, 1), full, torch.float64, name="decode")
    assert isinstance(state, CacheState) and state.cache == 2 and m.cache == 2


def _tiny_llama(dtype=torch.float64, **convert_args):
    transformers = pytest.importorskip("transformers")
    from spectraformer_fused.integrations import transformers as hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = None  # greedy decoding runs every step, as the recomputation
    args = {"component": "hyprf", "weights": "orf", "num_features": 16, "seed": 0, **convert_args}
    return hf.convert(model, **args)


@pytest.mark.parametrize("score", [None, "recall"])
def test_generate_with_cache_matches_recompute(score):
    """convert(window=, sinks=, cache=, cache_score=): generate() with the RFCache (CacheStates of fixed size)
    equals greedy decoding that recomputes the whole sequence at every step; left padding never enters the
    cache."""
    from spectraformer_fused.integrations import transformers as hf

    model = _tiny_llama(window=3, sinks=1, cache=2, cache_score=score)
    assert all(layer.self_attn.rf_cache == 2 for layer in model.model.layers)
    assert all(layer.self_attn.rf_cache_score == score for layer in model.model.layers)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 61, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    ids[0, :3], mask[0, :3] = 0, 0
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True
    )
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert isinstance(cache, hf.RFCache)
    seq, msk = ids, mask
    for _ in range(8):  # recomputation, with generate()'s position ids
        pos = (msk.cumsum(-1) - 1).masked_fill(msk == 0, 0)
        logits = model(input_ids=seq, attention_mask=msk, position_ids=pos, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        msk = torch.cat([msk, msk.new_ones(2, 1)], 1)
    assert torch.equal(out.sequences, seq)
    for state in cache.states:
        assert isinstance(state, CacheState)
        assert state.k_cache.shape == (2, 2, 2, 8) and state.k_tail.shape == (2, 2, 2, 8)
        assert state.cache_keep.all()
    # the logits of the last step by the state equal those of one pass
    step = model(input_ids=seq, attention_mask=msk, use_cache=False).logits[:, -1]
    assert torch.isfinite(step).all()


def test_convert_and_set_cache_refuse_bad_settings():
    from spectraformer_fused.integrations import transformers as hf

    for bad, err in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(err, match="cache"):
            _tiny_llama(window=3, cache=bad)
    with pytest.raises(ValueError, match="window"):
        _tiny_llama(cache=2)
    model = _tiny_llama(window=3)
    assert all(layer.self_attn.rf_cache is None for layer in model.model.layers)
    hf.set_cache(model, 4)
    assert all(layer.self_attn.rf_cache == 4 for layer in model.model.layers)
    hf.set_cache(model, None)
    assert all(layer.self_attn.rf_cache is None for layer in model.model.layers)
    for bad, err in (("nope", ValueError), (3, TypeError)):
        with pytest.raises(err, match="cache_score"):
            hf.set_cache(model, 2, score=bad)
        with pytest.raises(err, match="cache_score"):
            _tiny_llama(window=3, cache=2, cache_score=bad)
    with pytest.raises(ValueError, match="needs a cache"):
        hf.set_cache(model, None, score="recall")


def test_linearize_cache_option_and_load(tmp_path):
    """linearize(cache=C) trains without the cache, then switches it on, evaluates and saves it; --cache
    reaches it; load_linearized rebuilds the layers with it."""
    pytest.importorskip("transformers")
    from bench.report.linearize import build_tiny
    from spectraformer_fused import linearize as lz

    d = str(tmp_path / "tiny-llama")
    build_tiny("tiny-llama", d, steps=10, lines=40)
    args = lz.parser().parse_args(
        [
            d,
            "--component",
            "hyprf",
            "--weights",
            "orf",
            "--num-features",
            "8",
            "--window",
            "4",
            "--cache",
            "3",
            "--cache-score",
            "recall",
            "--data",
            "x",
            "--out",
            "y",
        ]
    )
    assert args.cache == 3 and args.cache_score == "recall"
    out = str(tmp_path / "out")
    rep = lz.linearize(
        d,
        component="hyprf",
        weights="learnable",
        num_features=8,
        window=4,
        cache=3,
        cache_score="recall",
        data=f"{d}/data.txt",
        out=out,
        steps_distill=2,
        steps_finetune=2,
        held_out=8,
        batch_size=8,
        verbose=False,
    )
    assert rep["convert_args"]["cache"] == 3 and rep["convert_args"]["cache_score"] == "recall"
    assert "cache" in rep["stages"]
    loaded = lz.load_linearized(out)
    assert all(layer.self_attn.rf_cache == 3 for layer in loaded.model.layers)
    assert all(layer.self_attn.rf_cache_score == "recall" for layer in loaded.model.layers)
    with pytest.raises(ValueError, match="cache_score"):
        lz.linearize(d, component="hyprf", weights="orf", num_features=8, window=4, cache_score="recall", data="x")
    with pytest.raises(ValueError, match="cache"):
        lz.linearize(d, component="hyprf", weights="orf", num_features=8, window=4, cache=0, data=f"{d}/data.txt")
    with pytest.raises(ValueError, match="window"):
        lz.linearize(
            d,
            component="hyprf",
            weights="orf",
            num_features=8,
            cache=2,
            data=f"{d}/data.txt",
            steps_distill=1,
            steps_finetune=1,
            held_out=8,
            verbose=False,
        )


@needs_cpu
def test_default_score_is_read_at_call_time(monkeypatch):
    """cache.DEFAULT_SCORE (a measurement knob, not an API) reaches both backends through rf_attention."""
    import spectraformer_fused.cache as cache_mod

    q, k, v = _inputs(T=30, dtype=torch.float32, seed=11)
    fm = _map("posrf", dtype=torch.float32)
    kw = dict(causal=True, window=2, cache=3, output_final_state=True)
    got = {}
    for score in ("kernel", "recall"):
        monkeypatch.setattr(cache_mod, "DEFAULT_SCORE", score)
        o_ref, s_ref = rf_attention(q, k, v, fm, backend="reference", **kw)
        o_cpu, s_cpu = rf_attention(q, k, v, fm, backend="cpu", **kw)
        assert_close(o_cpu, o_ref, torch.float32, name=score)
        _assert_same_state(s_cpu, s_ref)
        p = fm.feature_params(q, k, scale=D**-0.5, causal=True)
        want, _ = _cache_attention(
            q,
            k,
            v,
            p,
            window=2,
            key_padding_mask=None,
            initial_state=None,
            output_final_state=False,
            cache=3,
            score=score,
        )
        assert torch.equal(o_ref, want)
        got[score] = s_ref.k_cache
    assert not torch.equal(got["kernel"], got["recall"])
