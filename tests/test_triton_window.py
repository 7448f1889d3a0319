"""The hybrid window on the Triton backend (ops/triton/window.py) against the dense fp64 oracle
``helpers.hybrid_oracle`` (DESIGN.md section 6) and against ``reference_attention(..., window=W)`` for
gradients and states; both causal modes (walk and chunk); split runs against one run. Without CUDA the
kernels run in the Triton interpreter (conftest.py), so the shapes are small.
"""

import math

import pytest
import torch
from helpers import assert_close, hybrid_oracle

from spectraformer_fused import RandomFeatureMap, rf_attention
from spectraformer_fused.attention import WINDOW_BACKENDS
from spectraformer_fused.ops import triton_importable
from spectraformer_fused.reference import exact_attention, reference_attention
from spectraformer_fused.state import WindowState

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA: the interpreter (conftest.py)

MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"
T_ORACLE = 37


def _attend(*args, **kw):
    from spectraformer_fused.ops.triton.attention import triton_attention

    kw.setdefault("key_padding_mask", None)
    kw.setdefault("initial_state", None)
    kw.setdefault("output_final_state", False)
    return triton_attention(*args, **kw)


def _inputs(B, T, H, Hk, D, Dv, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, T, H, D), (B, T, Hk, D), (B, T, Hk, Dv))
    return tuple(torch.randn(*s, generator=g).to(DEVICE, dtype) for s in shapes)


def _map(component, D, m, Hk, kernel="softmax", weights="orf"):
    fm = RandomFeatureMap(D, m, component=component, kernel=kernel, num_heads=Hk, weights=weights, seed=3)
    return fm.eval().to(DEVICE)


def _params(fm, q, k, causal, **kw):
    return fm.feature_params(q, k, scale=1.0 / math.sqrt(q.shape[-1]), causal=causal, **kw)


def _mask(B, T, seed=1):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[0, : T // 3] = False
    return mask.to(DEVICE)


def _true_state(s):
    """(S, z) times exp(log_scale): the state's value, whatever constant each backend divides it by."""
    e = torch.exp(torch.where(torch.isneginf(s.log_scale), torch.zeros_like(s.log_scale), s.log_scale))
    return s.S * e[..., None, None], s.z * e[..., None]


def _check_state(a, b, tag):
    assert isinstance(a, WindowState)
    for name, x, y in zip(("S", "z"), _true_state(a), _true_state(b)):
        assert_close(x, y, torch.float32, name=f"{tag} {name} (times exp(log_scale))")
    for name in ("k_tail", "v_tail"):
        assert_close(getattr(a, name), getattr(b, name), torch.float32, name=f"{tag} {name}")
    assert torch.equal(a.tail_keep, b.tail_keep), f"{tag}: tail_keep {a.tail_keep} != {b.tail_keep}"


def test_triton_is_a_window_backend():
    assert "triton" in WINDOW_BACKENDS


# (component, kernel): positive random features, both kernel targets, the data-dependent ones
COMPONENTS = [("hyprf", "softmax"), ("posrf", "gaussian"), ("oprf", "softmax"), ("saderf", "gaussian")]


@pytest.mark.parametrize("window", [1, 5, T_ORACLE + 3], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("component,kernel", COMPONENTS, ids=[f"{c}-{k}" for c, k in COMPONENTS])
def test_matches_oracle(component, kernel, causal, window):
    """GQA (4 query heads on 2 key/value heads), a padding mask, every window size class."""
    q, k, v = _inputs(2, T_ORACLE, 4, 2, 16, 8)
    mask = _mask(2, T_ORACLE)
    fm = _map(component, 16, 24, 2, kernel)
    p = _params(fm, q, k, causal, key_padding_mask=mask)
    o, _ = _attend(q, k, v, p, causal=causal, window=window, key_padding_mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask)
    assert o.dtype == v.dtype
    assert_close(o, ref, torch.float32, name=f"{component} causal={causal} W={window} o")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_trigonometric_features(causal):
    """trigrf's signed features bring denominators near 0, so the whole output's relative error is
    compared, 1e-3, as for the CPU backend."""
    q, k, v = _inputs(1, 64, 2, 2, 16, 8, seed=4)
    fm = _map("trigrf", 16, 64, 2)
    p = _params(fm, q, k, causal)
    for window in (3, 70):
        o, _ = _attend(q, k, v, p, causal=causal, window=window)
        ref = hybrid_oracle(q, k, v, p, window=window, causal=causal)
        err = ((o.double() - ref).norm() / ref.norm()).item()
        print(f"trigrf causal={causal} W={window}: relative error {err:.3e}")
        assert err <= 1e-3, f"trigrf causal={causal} W={window}: relative error {err:.3e}"


def test_window_covers_everything_is_exact_attention():
    q, k, v = _inputs(2, 30, 2, 1, 16, 8, seed=6)
    fm = _map("posrf", 16, 16, 1)
    for causal in (False, True):
        p = _params(fm, q, k, causal)
        o, _ = _attend(q, k, v, p, causal=causal, window=30)
        ref = exact_attention(q, k, v, causal=causal, scale=p.scale)
        assert_close(o, ref, torch.float32, name=f"W >= T causal={causal}")


def test_half_precision():
    """fp16 inputs (bf16 needs a GPU: the interpreter does not run it)."""
    q, k, v = _inputs(2, 45, 2, 2, 16, 16, seed=8, dtype=torch.float16)
    fm = _map("hyprf", 16, 32, 2)
    for causal in (False, True):
        p = _params(fm, q, k, causal)
        o, _ = _attend(q, k, v, p, causal=causal, window=6)
        assert o.dtype == torch.float16
        ref = hybrid_oracle(q, k, v, p, window=6, causal=causal)
        assert_close(o, ref, torch.float16, name=f"fp16 causal={causal}")


def _grads(backend, fm, q, k, v, state, *, causal, window, mask=None, cu_seqlens=None):
    """Outputs, final state and the gradients of a loss on both (the state's value, so that every backend's
    choice of log_scale gives the same loss) for q, k, v, the map's parameters and the initial state."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    st = None
    if state is not None:
        st = WindowState(*(t.detach().clone().requires_grad_(i in (0, 1, 3, 4)) for i, t in enumerate(state)))
    fm.zero_grad()
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()
    p = _params(fm, xs[0], xs[1], causal, key_padding_mask=mask, offsets=offsets)
    kw = dict(causal=causal, window=window, key_padding_mask=mask, initial_state=st, output_final_state=True)
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    if backend == "triton":
        o, s = _attend(*xs, p, **kw)
    else:
        o, s = reference_attention(*xs, p, **kw)
    S, z = _true_state(s)
    g = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in (o, S, z, s.k_tail, s.v_tail))
    loss.backward()
    named = [("dq", xs[0]), ("dk", xs[1]), ("dv", xs[2])]
    if st is not None:
        named += [("dS0", st.S), ("dz0", st.z), ("dk_tail", st.k_tail), ("dv_tail", st.v_tail)]
    named = [(n, t.grad) for n, t in named]
    named += [(f"d{n}", t.grad) for n, t in fm.named_parameters() if t.grad is not None]
    return o, s, named


def _compare_grads(a, b, tag):
    assert_close(a[0], b[0], torch.float32, name=f"{tag} o")
    _check_state(a[1], b[1], tag)
    assert [n for n, _ in a[2]] == [n for n, _ in b[2]], f"{tag}: gradients of {a[2]} vs {b[2]}"
    for (name, x), (_, y) in zip(a[2], b[2]):
        assert x is not None and y is not None, f"{tag}: {name} missing"
        assert_close(x, y, torch.float32, name=f"{tag} {name}", min_scale=1e-6)


def _prefix_state(fm, window, B=2, Hk=2, H=4, D=16, Dv=8, T=9):
    qp, kp, vp = _inputs(B, T, H, Hk, D, Dv, seed=5)
    pp = _params(fm, qp, kp, True)
    return reference_attention(qp, kp, vp, pp, causal=True, window=window, output_final_state=True)[1]


@pytest.mark.parametrize("mode", ["walk", "chunk"])
@pytest.mark.parametrize("window", [1, 4, 50], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradients_match_reference(monkeypatch, mode, causal, window):
    """q, k, v, a learnable W and bias, the initial state's S, z and tail (made by a causal prefix: the
    tail's keys and the state both nonzero), gradients of the output and of the final state; GQA, a mask."""
    monkeypatch.setenv(MODE_ENV, mode)
    q, k, v = _inputs(2, T_ORACLE, 4, 2, 16, 8, seed=2)
    mask = _mask(2, T_ORACLE)
    fm = _map("hyprf", 16, 24, 2, weights="learnable")
    state = _prefix_state(fm, window)
    kw = dict(causal=causal, window=window, mask=mask)
    tri = _grads("triton", fm, q, k, v, state, **kw)
    ref = _grads("reference", fm, q, k, v, state, **kw)
    _compare_grads(tri, ref, f"{mode} causal={causal} W={window}")


def _run(q, k, v, p, window, state=None, mask=None):
    return _attend(q, k, v, p, causal=True, window=window, key_padding_mask=mask, initial_state=state,
                   output_final_state=True)  # fmt: skip


@pytest.mark.parametrize("window", [1, 4, 40], ids=lambda w: f"W{w}")
def test_split_runs_equal_one_run(window):
    """Two pieces with the state passed, then T = 1 decode steps, equal one causal run (output and final
    state); a padding mask is carried across the pieces (its tail flags included)."""
    T = 30
    q, k, v = _inputs(2, T, 4, 2, 16, 8, seed=3)
    mask = _mask(2, T, seed=4)
    fm = _map("posrf", 16, 24, 2)
    p = _params(fm, q, k, True)
    o_full, s_full = _run(q, k, v, p, window, mask=mask)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=True, key_padding_mask=mask)
    assert_close(o_full, ref, torch.float32, name=f"W={window} one run")
    _, s_ref = reference_attention(q, k, v, p, causal=True, window=window, key_padding_mask=mask,
                                   output_final_state=True)  # fmt: skip
    _check_state(s_full, s_ref, f"W={window} final state")
    cut = 17
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
    q, k, v = _inputs(2, 40, 2, 2, 16, 8, seed=5)
    mask = _mask(2, 40)
    fm = _map("hyprf", 16, 24, 2)
    p = _params(fm, q, k, True)
    for window in (1, 7, 45):
        init = _run(q[:, :10], k[:, :10], v[:, :10], p, window, mask=mask[:, :10])[1]
        kw = dict(window=window, key_padding_mask=mask[:, 10:], initial_state=init, output_final_state=True)
        _, s_nc = _attend(q[:, 10:], k[:, 10:], v[:, 10:], p, causal=False, **kw)
        _, s_c = _attend(q[:, 10:], k[:, 10:], v[:, 10:], p, causal=True, **kw)
        _check_state(s_nc, s_c, f"non-causal final state W={window}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_packed_sequences(monkeypatch, causal):
    """cu_seqlens (an empty sequence, one shorter than the window) in one call equals the reference's
    packed call, outputs, final states and gradients, with an initial state per sequence made by a packed
    causal prefix; chunk mode for the causal case."""
    if causal:
        monkeypatch.setenv(MODE_ENV, "chunk")
    lengths = [23, 0, 3, 40]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    q, k, v = _inputs(1, offsets[-1], 2, 1, 16, 8, seed=11)
    fm = _map("posrf", 16, 24, 1, weights="learnable")
    window = 5
    qp, kp, vp = _inputs(1, 4 * 6, 2, 1, 16, 8, seed=12)
    pre = torch.tensor([0, 6, 12, 18, 24], dtype=torch.int32, device=DEVICE)
    pp = _params(fm, qp, kp, True, offsets=pre.tolist())
    _, init = reference_attention(qp, kp, vp, pp, causal=True, window=window, cu_seqlens=pre, output_final_state=True)
    tri = _grads("triton", fm, q, k, v, init, causal=causal, window=window, cu_seqlens=cu)
    ref = _grads("reference", fm, q, k, v, init, causal=causal, window=window, cu_seqlens=cu)
    _compare_grads(tri, ref, f"packed causal={causal}")


def test_through_the_api():
    """rf_attention(backend="triton", window=W) runs the fused path and equals the reference backend."""
    q, k, v = _inputs(1, 20, 2, 2, 16, 8, seed=13)
    fm = _map("hyprf", 16, 16, 2)
    for causal in (False, True):
        kw = dict(feature_map=fm, causal=causal, window=3, output_final_state=True)
        o, s = rf_attention(q, k, v, backend="triton", **kw)
        o_ref, s_ref = rf_attention(q, k, v, backend="reference", **kw)
        assert_close(o, o_ref, torch.float32, name=f"api causal={causal} o")
        _check_state(s, s_ref, f"api causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gaussian_kernel_gradients(causal):
    """The Gaussian target: the band's logits carry exact_sq (|x|^2 + |y|^2) = -(|x|^2 + |y|^2) / 2, whose
    gradients the band kernels add (dx += 2 exact_sq x sum ds)."""
    q, k, v = _inputs(1, 29, 2, 2, 16, 8, seed=14)
    fm = _map("posrf", 16, 24, 2, kernel="gaussian", weights="learnable")
    state = _prefix_state(fm, 6, B=1, H=2)
    kw = dict(causal=causal, window=6)
    tri = _grads("triton", fm, 0.7 * q, 0.7 * k, v, state, **kw)
    ref = _grads("reference", fm, 0.7 * q, 0.7 * k, v, state, **kw)
    _compare_grads(tri, ref, f"gaussian causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_data_dependent_map_gradients(causal):
    """OPRF (its A* from the call's statistics, a constant for differentiation) with a learnable
    W: gradients against the reference, a mask that hides every key of one row's window."""
    q, k, v = _inputs(2, 30, 2, 1, 16, 8, seed=15)
    mask = _mask(2, 30, seed=16)
    fm = _map("oprf", 16, 16, 1, weights="learnable")
    kw = dict(causal=causal, window=3, mask=mask)
    tri = _grads("triton", fm, q, k, v, None, **kw)
    ref = _grads("reference", fm, q, k, v, None, **kw)
    _compare_grads(tri, ref, f"oprf causal={causal}")


def test_every_key_masked():
    """Rows with no visible key give 0 (as every backend floors the denominator), and their state is empty."""
    q, k, v = _inputs(1, 20, 2, 2, 16, 8, seed=17)
    mask = torch.zeros(1, 20, dtype=torch.bool, device=DEVICE)
    fm = _map("hyprf", 16, 16, 2)
    for causal in (False, True):
        p = _params(fm, q, k, causal, key_padding_mask=mask)
        o, s = _attend(q, k, v, p, causal=causal, window=4, key_padding_mask=mask, output_final_state=True)
        assert torch.equal(o, torch.zeros_like(o)), f"causal={causal}: {o.abs().max()}"
        assert torch.equal(s.S, torch.zeros_like(s.S)) and not s.tail_keep.any()
