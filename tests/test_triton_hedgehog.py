"""hedgehog (kind NORM_HYP) on the Triton backend against the reference backend, forward and gradients.

The stabiliser pass computes each row's log-sum-exp over its 2m exponents online over the frequency
tiles; the kernels subtract each key's (HAS_LSE) and give dL/dlse, and ``ops/triton/lse.lse_grads`` adds what
the lse itself contributes. Walk and chunk modes, causal and not, GQA, masks, packed sequences, an initial
state, and the hybrid window (whose query rows need their lse too). Without CUDA the kernels run in the
Triton interpreter (conftest.py).
"""

import math

import pytest
import torch
from helpers import assert_close, hybrid_oracle

from spectraformer_fused import RandomFeatureMap, rf_attention
from spectraformer_fused.attention import KIND_BACKENDS
from spectraformer_fused.contract import NORM_HYP
from spectraformer_fused.ops import triton_importable
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import RFState, WindowState

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA: the interpreter (conftest.py)

MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"


def _attend(*args, **kw):
    from spectraformer_fused.ops.triton.attention import triton_attention

    kw.setdefault("key_padding_mask", None)
    kw.setdefault("initial_state", None)
    kw.setdefault("output_final_state", True)
    return triton_attention(*args, **kw)


def _setup(B, T, H, Hk, D, Dv, m, *, seed=0, amp=1.0):
    g = torch.Generator().manual_seed(seed)
    q = amp * torch.randn(B, T, H, D, generator=g)
    k = amp * torch.randn(B, T, Hk, D, generator=g)
    v = torch.randn(B, T, Hk, Dv, generator=g)
    fm = RandomFeatureMap(D, m, component="hedgehog", num_heads=Hk, seed=3)
    with torch.no_grad():  # a trained map's log-weights are not zero
        fm.log_weight.copy_(torch.randn(Hk, m, generator=g))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), fm.to(DEVICE)


def _true_state(s):
    e = torch.exp(torch.where(torch.isneginf(s.log_scale), torch.zeros_like(s.log_scale), s.log_scale))
    return s.S * e[..., None, None], s.z * e[..., None]


def _run(backend, fm, q, k, v, *, causal, mask=None, state=None, window=None, cu_seqlens=None):
    """Output, final state and gradients (q, k, v, the initial state's S and z, the map's log-weights) of a
    loss on the output and on the final state's value."""
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    st = None
    if state is not None:
        st = type(state)(*(t.detach().clone().requires_grad_(i in (0, 1)) for i, t in enumerate(state)))
    fm.zero_grad()
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()
    p = fm.feature_params(xs[0], xs[1], scale=1.0 / math.sqrt(q.shape[-1]), causal=causal, key_padding_mask=mask,
                          offsets=offsets)  # fmt: skip
    assert p.kind == NORM_HYP
    kw = dict(causal=causal, key_padding_mask=mask, initial_state=st, output_final_state=True)
    if window is not None:
        kw["window"] = window
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    o, s = _attend(*xs, p, **kw) if backend == "triton" else reference_attention(*xs, p, **kw)
    S, z = _true_state(s)
    g = torch.Generator().manual_seed(7)
    (sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in (o, S, z))).backward()
    grads = [("dq", xs[0].grad), ("dk", xs[1].grad), ("dv", xs[2].grad), ("dlog_weight", fm.log_weight.grad)]
    if st is not None:
        grads += [("dS0", st.S.grad), ("dz0", st.z.grad)]
    return o, (S, z), grads


def _compare(a, b, tag):
    assert_close(a[0], b[0], torch.float32, name=f"{tag} o")
    for name, x, y in zip(("S", "z"), a[1], b[1]):
        assert_close(x, y, torch.float32, name=f"{tag} final {name}")
    for (name, x), (_, y) in zip(a[2], b[2]):
        assert x is not None and y is not None, f"{tag}: {name} missing"
        assert_close(x, y, torch.float32, name=f"{tag} {name}", min_scale=1e-6)


def test_triton_runs_hedgehog():
    assert "triton" in KIND_BACKENDS[NORM_HYP]


CASES = [("walk", True), ("chunk", True), ("walk", False)]


@pytest.mark.parametrize("mode,causal", CASES, ids=[f"{m}-{'causal' if c else 'noncausal'}" for m, c in CASES])
def test_matches_reference(monkeypatch, mode, causal):
    """GQA (4 query heads on 2 key/value heads), a padding mask, an initial state, 40 frequencies (two
    frequency tiles of the backward, so the lse's gradient sums partials)."""
    monkeypatch.setenv(MODE_ENV, mode)
    q, k, v, fm = _setup(2, 37, 4, 2, 16, 8, 40, amp=1.5)
    mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, :12] = False
    mask = mask.to(DEVICE)
    g = torch.Generator().manual_seed(2)
    state = RFState(torch.rand(2, 2, 80, 8, generator=g), torch.rand(2, 2, 80, generator=g), torch.zeros(2, 2))
    state = RFState(*(t.to(DEVICE) for t in state))
    kw = dict(causal=causal, mask=mask, state=state)
    _compare(_run("triton", fm, q, k, v, **kw), _run("reference", fm, q, k, v, **kw), f"{mode} causal={causal}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_packed_sequences(causal):
    """cu_seqlens with an empty and a one-token sequence: each sequence its own lse rows and state."""
    lengths = [20, 0, 1, 33]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    q, k, v, fm = _setup(1, offsets[-1], 2, 1, 16, 8, 24, seed=4)
    _compare(_run("triton", fm, q, k, v, causal=causal, cu_seqlens=cu),
             _run("reference", fm, q, k, v, causal=causal, cu_seqlens=cu), f"packed causal={causal}")  # fmt: skip


@pytest.mark.parametrize("window", [1, 5, 40], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_window(monkeypatch, causal, window):
    """The hybrid: against the dense oracle, then gradients against the reference with an initial window
    state (chunk mode when causal)."""
    if causal:
        monkeypatch.setenv(MODE_ENV, "chunk")
    q, k, v, fm = _setup(2, 29, 4, 2, 16, 8, 24, seed=5)
    mask = (torch.rand(2, 29, generator=torch.Generator().manual_seed(6)) > 0.3).to(DEVICE)
    p = fm.feature_params(q, k, scale=0.25, causal=causal, key_padding_mask=mask)
    o, _ = _attend(q, k, v, p, causal=causal, window=window, key_padding_mask=mask, output_final_state=False)
    ref = hybrid_oracle(q, k, v, p, window=window, causal=causal, key_padding_mask=mask)
    assert_close(o, ref, torch.float32, name=f"hedgehog causal={causal} W={window} against the oracle")
    qp, kp, vp, _ = _setup(2, 7, 4, 2, 16, 8, 24, seed=8)
    pp = fm.feature_params(qp, kp, scale=0.25, causal=True)
    _, state = reference_attention(qp, kp, vp, pp, causal=True, window=window, output_final_state=True)
    assert isinstance(state, WindowState)
    kw = dict(causal=causal, mask=mask, state=state, window=window)
    _compare(_run("triton", fm, q, k, v, **kw), _run("reference", fm, q, k, v, **kw), f"causal={causal} W={window}")


def test_through_the_api():
    """backend="triton" runs hedgehog (the interpreter stands in for the GPU)."""
    q, k, v, fm = _setup(1, 20, 2, 2, 16, 8, 16, seed=9)
    for causal in (False, True):
        o = rf_attention(q, k, v, fm, causal=causal, backend="triton")
        o_ref = rf_attention(q, k, v, fm, causal=causal, backend="reference")
        assert_close(o, o_ref, torch.float32, name=f"api causal={causal}")
