"""Grouped-query and multi-query attention: k and v with H_kv heads, H_kv dividing H.

"Running each group by hand" means: for key/value head g, the query heads G g ... G g + G - 1
(G = H / H_kv) attend to key/value head g as a multi-query attention with a one-head feature map that
holds head g's W (and head g's running statistics). Its OPRF/SADERF statistics pool the keys of head g
and the queries of all G query heads: the moments of the group's queries laid end to end.
"""

import pytest
import torch
from helpers import Case, assert_close, case_id, causal_id

from spectraformer_fused import RandomFeatureMap, available_backends, rf_attention
from spectraformer_fused.ops import triton_importable, triton_interpreting
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import RFState


def _inputs(B, T, H, Hk, D, Dv, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    k = torch.randn(B, T, Hk, D, generator=gen, dtype=dtype)
    v = torch.randn(B, T, Hk, Dv, generator=gen, dtype=dtype)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = True
    return q, k, v, mask


def _feature_map(component, D, m, heads, *, weights="orf", dtype=torch.float64, **args):
    """An eval-mode map; OPRF/SADERF running statistics filled (so causal A* != 0), one entry per head."""
    fm = RandomFeatureMap(D, m, component=component, weights=weights, num_heads=heads, seed=3, **args).to(dtype)
    if fm.spec.data_dependent:
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(2, 16, heads, D, generator=gen, dtype=dtype)
        fm.train()
        fm.feature_params(x * 0.7, x.flip(1) + 0.3, scale=D**-0.5, causal=False)
    return fm.eval()


def _one_head_map(fm, g):
    """A one-head copy of head g of ``fm`` (its W and its running statistics)."""
    one = RandomFeatureMap(
        fm.head_dim,
        fm.num_features,
        component=fm.component,
        weights=fm.weight_name,
        kernel=fm.kernel,
        num_heads=1,
        **({"A": fm.spec.A} if fm.component == "gerf" else {}),
    )
    state = {
        name: t[g : g + 1] if t.dim() >= 1 and t.shape[0] == fm.num_heads else t for name, t in fm.state_dict().items()
    }
    one.to(fm.weights.weight.dtype).load_state_dict(state)
    return one.eval()


GROUP_CASES = [
    ("posrf", False),
    ("posrf", True),
    ("hyprf", True),
    ("trigrf", False),
    ("oprf", False),
    ("oprf", True),
    ("saderf", False),
    ("saderf", True),
]


@pytest.mark.parametrize("component, causal", GROUP_CASES, ids=[f"{c}-{causal_id(k)}" for c, k in GROUP_CASES])
def test_equals_each_group_by_hand(component, causal):
    B, T, H, Hk, D, Dv, m = 2, 11, 6, 2, 8, 5, 12
    G = H // Hk
    q, k, v, mask = _inputs(B, T, H, Hk, D, Dv)
    fm = _feature_map(component, D, m, Hk)
    state = RFState(
        torch.rand(B, Hk, fm.feature_dim, Dv, dtype=torch.float64),
        torch.rand(B, Hk, fm.feature_dim, dtype=torch.float64) + 0.1,
        torch.randn(B, Hk, dtype=torch.float64),
    )
    o, final = rf_attention(
        q,
        k,
        v,
        fm,
        causal=causal,
        key_padding_mask=mask,
        initial_state=state,
        output_final_state=True,
        backend="reference",
    )
    assert o.shape == (B, T, H, Dv) and final.S.shape == (B, Hk, fm.feature_dim, Dv)
    for g in range(Hk):
        heads = slice(g * G, (g + 1) * G)
        one = _one_head_map(fm, g)
        og, fg = rf_attention(
            q[:, :, heads],
            k[:, :, g : g + 1],
            v[:, :, g : g + 1],
            one,
            causal=causal,
            key_padding_mask=mask,
            initial_state=RFState(*(t[:, g : g + 1] for t in state)),
            output_final_state=True,
            backend="reference",
        )
        assert_close(o[:, :, heads], og, name=f"o group {g}")
        for name, a, b in zip(("S", "z", "log_scale"), final, fg):
            assert_close(a[:, g : g + 1], b, name=f"{name} group {g}")


@pytest.mark.parametrize("component", ["oprf", "saderf"])
def test_group_statistics_pool_the_group_queries(component):
    """Non-causal A* and Psi of key/value head g come from the keys of head g and the queries of its
    whole group, laid end to end as one sequence (keys repeated: their moments do not change)."""
    B, T, H, Hk, D = 2, 9, 4, 2, 8
    G = H // Hk
    q, k, _, mask = _inputs(B, T, H, Hk, D, 3)
    fm = _feature_map(component, D, 10, Hk)
    p = fm.feature_params(q, k, scale=0.3, causal=False, key_padding_mask=mask)
    for g in range(Hk):
        x = q[:, :, g * G : (g + 1) * G].transpose(1, 2).reshape(B, G * T, 1, D)  # the group's queries
        y = k[:, :, g : g + 1].repeat(1, G, 1, 1)
        pg = _one_head_map(fm, g).feature_params(x, y, scale=0.3, causal=False, key_padding_mask=mask.repeat(1, G))
        assert_close(p.bias[:, g : g + 1], pg.bias, name=f"bias {g}")
        assert_close(p.freq[:, g : g + 1], pg.freq, name=f"freq {g}")
        if p.psi is not None:
            assert_close(p.psi[:, g : g + 1], pg.psi, name=f"psi {g}")
        # the pooling matters: the statistics of the group's first query head alone give other parameters
        p1 = _one_head_map(fm, g).feature_params(
            q[:, :, g * G : g * G + 1], k[:, :, g : g + 1], scale=0.3, causal=False, key_padding_mask=mask
        )
        assert not torch.allclose(p1.freq, pg.freq)


@pytest.mark.parametrize("causal", [False, True], ids=causal_id)
def test_reference_equals_repeated_heads(causal):
    """Components with constant parameters: GQA equals multi-head attention on repeated k, v and W (the
    G = 1 path), outputs, states and gradients (a key/value head's gradient sums its group's)."""
    B, T, H, Hk, D, Dv, m = 2, 70, 4, 2, 8, 6, 16
    G = H // Hk
    q, k, v, mask = _inputs(B, T, H, Hk, D, Dv)
    fm = _feature_map("hyprf", D, m, Hk, weights="learnable")
    with torch.no_grad():
        p = fm.feature_params(q, k, scale=D**-0.5, causal=causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, st = reference_attention(*leaves, p, causal=causal, key_padding_mask=mask, output_final_state=True)
    (o.pow(2).sum() + st.S.sum()).backward()
    rep = [leaves[0].detach().clone().requires_grad_()] + [
        t.detach().repeat_interleave(G, 2).requires_grad_() for t in leaves[1:]
    ]
    pr = type(p)(
        p.kind,
        p.W.repeat_interleave(G, 0),
        p.bias.repeat_interleave(G, 1),
        p.freq.repeat_interleave(G, 1),
        None,
        p.c_t,
        p.c_o,
        p.scale,
        p.num_features,
        p.feature_dim,
    )
    o2, st2 = reference_attention(*rep, pr, causal=causal, key_padding_mask=mask, output_final_state=True)
    (o2.pow(2).sum() + st2.S[:, ::G].sum()).backward()
    assert_close(o, o2, name="o")
    assert_close(st.S, st2.S[:, ::G], name="S")
    assert_close(leaves[0].grad, rep[0].grad, name="dq")
    assert_close(leaves[1].grad, rep[1].grad.unflatten(2, (Hk, G)).sum(3), name="dk")
    assert_close(leaves[2].grad, rep[2].grad.unflatten(2, (Hk, G)).sum(3), name="dv")


# T = 100 for the compiled CPU backend; the Triton cases run at T = 40 (see test_triton_backend)
BACKEND_CASES = [
    Case(
        component,
        causal,
        weights="learnable",
        B=2,
        T=100,
        H=H,
        H_kv=Hk,
        D=16,
        Dv=16,
        m=16,
        shared=shared,
        mask=mask,
        init=init,
        final=final,
    )
    for component, causal, H, Hk, shared, mask, init, final in [
        ("posrf", True, 4, 2, False, True, True, True),
        ("hyprf", False, 4, 2, False, True, True, True),
        ("oprf", True, 3, 1, False, False, True, False),
        ("saderf", False, 4, 1, True, True, False, True),
        ("hyprf", True, 4, 2, True, False, False, False),
    ]
]


def _backend_run(backend, case: Case):
    B, T, H, Hk, D, Dv = case.B, case.T, case.H, case.H_kv, case.D, case.Dv
    q, k, v, mask = _inputs(B, T, H, Hk, D, Dv, dtype=case.dtype, seed=1)
    fm = _feature_map(case.component, D, case.m, 1 if case.shared else Hk, weights=case.weights, dtype=case.dtype)
    F = fm.feature_dim
    gen = torch.Generator().manual_seed(5)
    state = None
    if case.init:
        state = RFState(
            torch.rand(B, Hk, F, Dv, generator=gen, dtype=case.dtype).requires_grad_(),
            (torch.rand(B, Hk, F, generator=gen, dtype=case.dtype) + 0.1).requires_grad_(),
            torch.randn(B, Hk, generator=gen, dtype=case.dtype),
        )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, st = rf_attention(
        *leaves,
        fm,
        causal=case.causal,
        key_padding_mask=mask if case.mask else None,
        initial_state=state,
        output_final_state=True,
        backend=backend,
    )
    w = torch.randn(o.shape, generator=gen, dtype=case.dtype)
    loss = (o * w).sum()
    if case.final:
        loss = loss + (st.S * torch.randn(st.S.shape, generator=gen, dtype=case.dtype)).sum() + 0.5 * st.z.sum()
    inputs = leaves + [fm.weights.weight] + ([state.S, state.z] if case.init else [])
    grads = torch.autograd.grad(loss, inputs)
    return o, st, grads


GRAD_NAMES = ("dq", "dk", "dv", "dW", "dS0", "dz0")


@pytest.mark.parametrize("case", BACKEND_CASES, ids=case_id)
def test_cpu_backend(case):
    if "cpu" not in available_backends():
        pytest.skip("the compiled CPU backend is not built")
    ref = _backend_run("reference", case)
    got = _backend_run("cpu", case)
    assert_close(got[0], ref[0], name="o")
    for name, a, b in zip(("S", "z", "log_scale"), got[1], ref[1]):
        assert_close(a, b, name=name)
    for name, a, b in zip(GRAD_NAMES, got[2], ref[2]):
        assert_close(a, b, name=name)


@pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
@pytest.mark.parametrize("case", [c.replace(T=40) for c in BACKEND_CASES[:3]], ids=case_id)
def test_triton_backend(case, device):
    """T = 40: two chunks of 32 (causal), two chunk ranges (non-causal)."""
    if device == "cpu" and not triton_interpreting():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    ref = _backend_run("reference", case)
    got = _backend_run("triton", case)
    assert_close(got[0], ref[0], name="o")
    for name, a, b in zip(("S", "z", "log_scale"), got[1], ref[1]):
        assert_close(a, b, name=name)
    for name, a, b in zip(GRAD_NAMES, got[2], ref[2]):
        assert_close(a, b, name=name)


def test_errors():
    q, k, v, _ = _inputs(1, 4, 6, 4, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"key/value heads \(4\) must divide the number of query heads \(6\)"):
        rf_attention(q, k, v, RandomFeatureMap(8, 8, num_heads=1))
    q, k, v, _ = _inputs(1, 4, 6, 2, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="v .* must match k"):
        rf_attention(q, k, v[:, :, :1], RandomFeatureMap(8, 8, num_heads=1))
    with pytest.raises(ValueError, match="num_heads=6, but the inputs have 2 key/value heads"):
        rf_attention(q, k, v, RandomFeatureMap(8, 8, num_heads=6))
    F = 8
    with pytest.raises(ValueError, match=r"initial_state.S must have shape \(1, 2, 8, 8\) \[B, H_kv, F, Dv\]"):
        rf_attention(
            q, k, v, RandomFeatureMap(8, 8, num_heads=2), initial_state=(torch.zeros(1, 6, F, 8), torch.zeros(1, 2, F))
        )
