"""Packed variable-length sequences (``cu_seqlens``): the packed call equals running every sequence
separately with ``rf_attention`` (outputs, final states, gradients of q, k, v and of a learnable W, and
OPRF/SADERF running statistics, updated once per sequence in order)."""

import copy

import pytest
import torch
from helpers import assert_close

from spectraformer_fused import COMPONENTS, RandomFeatureMap, RFState, available_backends, rf_attention
from spectraformer_fused.ops import triton_importable, triton_interpreting

LENGTHS = [3, 0, 1, 7]  # an empty and a length-1 sequence among them


def _packed(lengths, H, Hk, D, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(1, T, H, D, generator=gen, dtype=dtype)
    k = torch.randn(1, T, Hk, D, generator=gen, dtype=dtype)
    v = torch.randn(1, T, Hk, Dv, generator=gen, dtype=dtype)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _feature_map(component, D, m, heads, dtype, *, weights="orf", train=False):
    fm = RandomFeatureMap(D, m, component=component, weights=weights, num_heads=heads, seed=3).to(dtype)
    if fm.spec.data_dependent:  # filled running statistics, so causal A* != 0
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(1, 16, heads, D, generator=gen, dtype=dtype)
        fm.train()
        fm.feature_params(x * 0.7, x.flip(1) + 0.3, scale=D**-0.5, causal=False)
    return fm.train(train)


def _run_both(fm, q, k, v, cu, *, causal, backend, state=None):
    """(packed output, packed state, grads) and the same from running each sequence separately."""
    fm_sep = copy.deepcopy(fm)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, fin = rf_attention(
        *leaves, fm, causal=causal, cu_seqlens=cu, initial_state=state, output_final_state=True, backend=backend
    )
    (o.square().sum() + fin.S.sum() + fin.z.sum()).backward()
    packed = (o, fin, [t.grad for t in leaves], fm)
    offs = cu.tolist()
    outs, finals, grads = [], [], [[], [], []]
    for i in range(len(offs) - 1):
        parts = [t[:, offs[i] : offs[i + 1]].clone().requires_grad_() for t in (q, k, v)]
        init = None if state is None else RFState(*(t[i : i + 1] for t in state))
        oi, fi = rf_attention(
            *parts, fm_sep, causal=causal, initial_state=init, output_final_state=True, backend=backend
        )
        loss = oi.square().sum() + fi.S.sum() + fi.z.sum()
        if loss.requires_grad:  # an empty sequence without a state has no graph
            loss.backward()
        outs.append(oi.detach())
        finals.append(fi)
        for g, p in zip(grads, parts):
            g.append(p.grad if p.grad is not None else torch.zeros_like(p))
    sep = (
        torch.cat(outs, 1),
        RFState(*(torch.cat(x, 0) for x in zip(*finals))),
        [torch.cat(g, 1) for g in grads],
        fm_sep,
    )
    return packed, sep


def _compare(packed, sep, dtype):
    (o, fin, grads, fm), (o2, fin2, grads2, fm2) = packed, sep
    assert_close(o, o2, dtype, name="o")
    for name, a, b in zip(("S", "z", "log_scale"), fin, fin2):
        assert a.shape == b.shape, name
        assert_close(torch.nan_to_num(a, neginf=-1e4), torch.nan_to_num(b, neginf=-1e4), dtype, name=name)
    for name, a, b in zip("qkv", grads, grads2):
        assert_close(a, b, dtype, name=f"d{name}")
    for (name, a), (_, b) in zip(fm.named_buffers(), fm2.named_buffers()):
        if a.dtype.is_floating_point:
            assert_close(a, b, name=name)
    for (name, a), (_, b) in zip(fm.named_parameters(), fm2.named_parameters()):
        if a.grad is not None or b.grad is not None:
            assert_close(a.grad, b.grad, name=f"d{name}")


CASES = [(c, causal) for c in COMPONENTS for causal in (False, True)]


@pytest.mark.parametrize("component, causal", CASES, ids=[f"{c}-{'causal' if k else 'noncausal'}" for c, k in CASES])
def test_reference_equals_each_sequence(component, causal):
    H, Hk, D, Dv, m = 4, 2, 8, 5, 12  # grouped-query: 2 query heads per key/value head
    q, k, v, cu = _packed(LENGTHS, H, Hk, D, Dv, torch.float64)
    # Non-causal OPRF/SADERF in training mode: per-sequence statistics and running statistics updated
    # once per sequence; causal ones read the running statistics (eval mode).
    fm = _feature_map(component, D, m, Hk, torch.float64, train=not causal)
    gen = torch.Generator().manual_seed(5)
    N = len(LENGTHS)
    state = RFState(
        torch.rand(N, Hk, fm.feature_dim, Dv, generator=gen, dtype=torch.float64),
        torch.rand(N, Hk, fm.feature_dim, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(N, Hk, generator=gen, dtype=torch.float64),
    )
    packed, sep = _run_both(fm, q, k, v, cu, causal=causal, backend="reference", state=state)
    _compare(packed, sep, torch.float64)
    assert packed[1].S.shape == (N, Hk, fm.feature_dim, Dv)


@pytest.mark.parametrize("component", ["oprf", "saderf"])
def test_causal_training_reads_running_statistics_in_order(component):
    """Causal OPRF/SADERF in training mode: each sequence reads the running statistics as the sequences
    before it left them (one update per non-empty sequence), as separate calls in order would."""
    q, k, v, cu = _packed([6, 0, 3, 5], 2, 2, 8, 4, torch.float64, seed=4)
    fm = _feature_map(component, 8, 12, 2, torch.float64, train=True)
    before = fm.num_batches_tracked.clone()
    packed, sep = _run_both(fm, q, k, v, cu, causal=True, backend="reference")
    _compare(packed, sep, torch.float64)
    assert int(fm.num_batches_tracked - before) == 3  # three non-empty sequences


@pytest.mark.parametrize("causal", [False, True])
def test_learnable_weights_gradient(causal):
    q, k, v, cu = _packed([5, 1, 0, 4], 2, 2, 8, 4, torch.float64, seed=1)
    fm = _feature_map("posrf", 8, 16, 2, torch.float64, weights="learnable")
    assert any(p.requires_grad for p in fm.parameters())
    packed, sep = _run_both(fm, q, k, v, cu, causal=causal, backend="reference")
    _compare(packed, sep, torch.float64)
    assert all(p.grad is not None for p in packed[3].parameters() if p.requires_grad)


def test_int64_offsets_all_empty_and_no_state():
    q, k, v, cu = _packed([4, 2], 2, 1, 8, 3, torch.float64, seed=2)
    fm = _feature_map("posrf", 8, 8, 1, torch.float64)
    o = rf_attention(q, k, v, fm, cu_seqlens=cu.long())
    ref = torch.cat([rf_attention(q[:, :4], k[:, :4], v[:, :4], fm), rf_attention(q[:, 4:], k[:, 4:], v[:, 4:], fm)], 1)
    assert_close(o, ref, name="o")
    e = q[:, :0], k[:, :0], v[:, :0]
    o, fin = rf_attention(*e, fm, cu_seqlens=torch.zeros(3, dtype=torch.int32), output_final_state=True)
    assert o.shape == (1, 0, 2, 3) and fin.S.shape == (2, 1, fm.feature_dim, 3)
    o, fin = rf_attention(*e, fm, cu_seqlens=torch.zeros(1, dtype=torch.int32), output_final_state=True)
    assert o.shape == (1, 0, 2, 3) and fin.S.shape == (0, 1, fm.feature_dim, 3)


def _cpu_available():
    from spectraformer_fused.ops import cpu as cpu_ops

    return cpu_ops.extension_available() and "cpu" in available_backends()


@pytest.mark.parametrize("component, causal", [("posrf", False), ("posrf", True), ("oprf", False), ("trigrf", True)])
def test_cpu_backend_equals_each_sequence(component, causal):
    if not _cpu_available():
        pytest.skip("the compiled CPU extension is unavailable")
    q, k, v, cu = _packed(LENGTHS, 4, 2, 8, 5, torch.float32, seed=3)
    fm = _feature_map(component, 8, 12, 2, torch.float32, train=not causal)
    packed, sep = _run_both(fm, q, k, v, cu, causal=causal, backend="cpu")
    _compare(packed, sep, torch.float32)


@pytest.mark.skipif(not (triton_importable() and triton_interpreting()), reason="needs the Triton interpreter")
def test_triton_interpreter_equals_each_sequence():
    q, k, v, cu = _packed([9, 1, 0, 6], 2, 1, 16, 16, torch.float32, seed=4)
    fm = _feature_map("posrf", 16, 16, 1, torch.float32)
    packed, sep = _run_both(fm, q, k, v, cu, causal=True, backend="triton")
    _compare(packed, sep, torch.float32)


def _bad(q, **kw):
    fm = RandomFeatureMap(8, 8, num_heads=1, seed=0)
    return rf_attention(q, q[..., :1, :], q[..., :1, :], fm, **kw)


@pytest.mark.parametrize(
    "cu, shape, extra, err, match",
    [
        (torch.tensor([0.0, 4.0]), (1, 4, 2, 8), {}, TypeError, "int32 or int64"),
        ([0, 4], (1, 4, 2, 8), {}, TypeError, "int32 or int64 tensor"),
        (torch.tensor([[0, 4]]), (1, 4, 2, 8), {}, ValueError, "1-D"),
        (torch.tensor([1, 4]), (1, 4, 2, 8), {}, ValueError, "start at 0"),
        (torch.tensor([0, 3, 2, 4]), (1, 4, 2, 8), {}, ValueError, "non-decreasing"),
        (torch.tensor([0, 3]), (1, 4, 2, 8), {}, ValueError, "end at the packed length 4"),
        (torch.tensor([0, 4]), (2, 4, 2, 8), {}, ValueError, "batch 2"),
        (
            torch.tensor([0, 4]),
            (1, 4, 2, 8),
            {"key_padding_mask": torch.ones(1, 4, dtype=torch.bool)},
            ValueError,
            "key_padding_mask",
        ),
        (
            torch.tensor([0, 4]),
            (1, 4, 2, 8),
            {"initial_state": (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8)), "cu_seqlens": torch.tensor([0, 2, 4])},
            ValueError,
            r"initial_state.S",
        ),
    ],
    ids=["float", "list", "2d", "start", "decreasing", "end", "batch", "mask", "state-rows"],
)
def test_bad_cu_seqlens(cu, shape, extra, err, match):
    kw = {"cu_seqlens": cu, **extra}
    with pytest.raises(err, match=match):
        _bad(torch.randn(*shape), **kw)


def test_cu_seqlens_on_another_device():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must be on cpu"):
        _bad(q, cu_seqlens=torch.tensor([0, 4], device="meta"))
