"""The Triton backward (and the autograd custom op around it) against the reference's autograd.

Every gradient is checked: q, k, v, the learnable weight parameters (through ``projection()``), the
bias path (OPRF and GERF have A != 0, so the bias depends on W), the initial state's S and z, and the
gradients that flow back from the returned final state.
"""

import math

import pytest
import torch
from helpers import Case, assert_close, case_id

from spectraformer_fused import ops
from spectraformer_fused.attention import rf_attention
from spectraformer_fused.components import feature_logits
from spectraformer_fused.feature_map import RandomFeatureMap
from spectraformer_fused.modules import SpectraAttention
from spectraformer_fused.state import RFState

pytestmark = pytest.mark.skipif(not ops.triton_importable(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def _need_device(device):
    if device == "cpu" and not ops.triton_interpreting():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")


def _case(component: str, **kw) -> Case:
    """The backward cases: learnable weights (W has a gradient) unless a case names other weights."""
    return Case(component, **{"weights": "learnable", **kw})


CASES = [
    _case("posrf", causal=True, T=63, m=32, Dv=19, mask=True, init=True, final=True),
    _case("hyprf", kernel="gaussian", D=40, Dv=40, mask=True, final=True),
    _case("hyprf", causal=True, T=37, D=16, Dv=16, init=True),
    _case("trigrf", causal=True, D=16, Dv=16, amp=0.3, final=True),
    _case("gerf", causal=True, T=1, D=16, Dv=16, init=True, final=True, args={"A": -0.1}),
    _case("gerf", T=63, D=40, Dv=24, amp=0.3, args={"A": -0.05, "s": -1}),
    _case("oprf", weights="fastfood_learnable", T=63, D=16, Dv=16, mask=True, init=True, final=True),
    _case("oprf", weights="fastfood_learnable", causal=True, dtype=torch.float16, mask=True, init=True),
    _case("saderf", T=37, D=24, Dv=32, init=True, final=True),
    _case("saderf", causal=True, kernel="gaussian", dtype=torch.float16, T=63, D=16, Dv=16, mask=True),
    _case("posrf", weights="fastfood_learnable", dtype=torch.float16, B=1, H=3, T=37, D=40, Dv=40, m=48, mask=True),
]


def _make(case: Case, device, seed=0):
    """Inputs and a feature map in eval mode (OPRF/SADERF running statistics filled, so causal A* != 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device)

    Hk = case.kv_heads
    fm = RandomFeatureMap(
        case.D,
        case.m,
        component=case.component,
        weights=case.weights,
        kernel=case.kernel,
        num_heads=1 if case.shared else Hk,
        seed=seed,
        device=device,
        **case.args,
    )
    shape, kv_shape = (case.B, case.T, case.H, case.D), (case.B, case.T, Hk, case.D)
    q = rnd(*shape, s=case.amp).to(case.dtype)
    k = rnd(*kv_shape, s=case.amp).to(case.dtype)
    v = rnd(case.B, case.T, Hk, case.Dv).to(case.dtype)
    if fm.spec.data_dependent:
        fm.train()
        fm.feature_params(rnd(*shape), rnd(*kv_shape), scale=case.D**-0.5, causal=False)
    fm.eval()
    mask = None
    if case.mask:
        mask = (torch.rand(case.B, case.T, generator=gen) > 0.3).to(device)
        mask[:, 0] = True
    state = None
    if case.init:
        F = fm.feature_dim
        state = RFState(rnd(case.B, Hk, F, case.Dv).abs() * 0.1, rnd(case.B, Hk, F).abs() * 0.1 + 0.05, rnd(case.B, Hk))
    return fm, q, k, v, mask, state


def _run(backend, fm, q, k, v, mask, state, case: Case, seed=1):
    """Forward + backward of a fixed random linear loss of o (and of the final state, when asked)."""
    fm.zero_grad(set_to_none=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    st = (
        None
        if state is None
        else RFState(state.S.clone().requires_grad_(), state.z.clone().requires_grad_(), state.log_scale)
    )
    o, final = rf_attention(
        q,
        k,
        v,
        fm,
        causal=case.causal,
        key_padding_mask=mask,
        initial_state=st,
        output_final_state=True,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    if case.final:
        loss = loss + (final.S * torch.randn(final.S.shape, generator=gen).to(o.device)).sum()
        loss = loss + (final.z * torch.randn(final.z.shape, generator=gen).to(o.device)).sum()
    loss.backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    grads.update({f"W.{n}": p.grad for n, p in fm.named_parameters() if p.requires_grad})
    if st is not None:
        grads["S0"], grads["z0"] = st.S.grad, st.z.grad
    return o, final, grads


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_reference(case, device):
    fm, q, k, v, mask, state = _make(case, device)
    o_ref, fin_ref, g_ref = _run("reference", fm, q, k, v, mask, state, case)
    o, fin, g = _run("triton", fm, q, k, v, mask, state, case)
    dt = case.dtype
    assert_close(o, o_ref, dt, name="o")
    assert_close(fin.S, fin_ref.S, dt, name="S")
    assert_close(fin.z, fin_ref.z, dt, name="z")
    assert_close(fin.log_scale, fin_ref.log_scale, dt, name="log_scale")
    learnable = [n for n in g_ref if n.startswith("W.")]
    assert learnable, "the weights of these cases are learnable"
    for name, expected in g_ref.items():
        assert expected is not None, name
        assert g[name] is not None, f"no gradient for {name}"
        assert g[name].dtype == expected.dtype, name
        assert_close(g[name], expected, dt, name=f"d{name}")


def _torch_stats(q, k, v, p, mask, state, causal, chunk):
    """o, den, qmax, kstab of the forward's contract, computed directly in fp64 (O(T^2), tests only)."""
    B, T, H, D = q.shape
    root = math.sqrt(p.scale)
    x, y = (t.double().transpose(1, 2) * root for t in (q, k))
    W, bias, freq = p.W.detach().double(), p.bias.detach().double(), p.freq.double()
    psi = None if p.psi is None else p.psi.double()
    kw = dict(kind=p.kind, c_t=p.c_t, c_o=p.c_o)
    eq, mq = feature_logits(x, W, bias, freq, psi, query=True, **kw)
    ek, mk = feature_logits(y, W, bias, freq, psi, query=False, **kw)
    if mask is not None:
        ek = ek.masked_fill(~mask[:, None, :, None], float("-inf"))
    qmax = eq.amax(-1)
    phiq = torch.exp(eq - qmax[..., None]) * (1.0 if mq is None else mq)
    m0 = torch.full((B, H), float("-inf"), dtype=torch.float64) if state is None else state.log_scale.double()
    if causal:
        NC = -(-T // chunk)
        cmax = torch.stack([ek[:, :, c * chunk : (c + 1) * chunk].amax((-1, -2)) for c in range(NC)], -1)
        run = torch.maximum(torch.cummax(cmax, -1).values, m0[..., None])
        chunk_of = torch.arange(T) // chunk
    else:
        run = torch.maximum(ek.amax((-1, -2)), m0)[..., None]
        chunk_of = torch.zeros(T, dtype=torch.long)
    kstab = torch.where(torch.isneginf(run), torch.zeros_like(run), run)
    ks = kstab[..., chunk_of]  # [B, H, T] per query
    phik = torch.exp(ek[:, :, None] - ks[..., None, None]) * (1.0 if mk is None else mk[:, :, None])
    A = (phiq[:, :, :, None] * phik).sum(-1)  # [B, H, Tq, Tk]
    if causal:
        A = A.tril()
    num = A @ v.double().transpose(1, 2)
    den = A.sum(-1)
    if state is not None:
        alpha = torch.exp(m0[..., None] - ks)
        num = num + (phiq @ state.S.double()) * alpha[..., None]
        den = den + (phiq @ state.z.double()[..., None])[..., 0] * alpha
    o = num / den.abs().clamp_min(1e-30)[..., None]
    # final state, relative to the last key stabiliser (the one the last query row used)
    phik_last = phik[:, :, -1]  # [B, H, Tk, F]
    S = phik_last.transpose(-1, -2) @ v.double().transpose(1, 2)
    z = phik_last.sum(-2)
    if state is not None:
        alpha_last = torch.exp(m0 - ks[..., -1])
        S = S + state.S.double() * alpha_last[..., None, None]
        z = z + state.z.double() * alpha_last[..., None]
    return o.transpose(1, 2).to(v.dtype), den.float(), qmax.float(), kstab.float(), S.float(), z.float()


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[6]], ids=case_id)
def test_bwd_kernels_alone(case, device):
    """rf_bwd fed statistics computed independently of the Triton forward equals the reference."""
    from spectraformer_fused.ops.triton.bwd import rf_bwd

    if case.dtype != torch.float32:
        pytest.skip("fp32 only")
    fm, q, k, v, mask, state = _make(case, device)
    case_final = case.replace(final=True)
    o_ref, fin_ref, g_ref = _run("reference", fm, q, k, v, mask, state, case_final)
    p = fm.feature_params(q, k, scale=case.D**-0.5, causal=case.causal, key_padding_mask=mask)
    o, den, qmax, kstab, S, z = _torch_stats(q, k, v, p, mask, state, case.causal, 32)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen)
    dS = torch.randn(fin_ref.S.shape, generator=gen)
    dz = torch.randn(fin_ref.z.shape, generator=gen)
    s0 = (None, None, None) if state is None else tuple(state)
    dq, dk, dv, dW, dbias, dS0, dz0 = rf_bwd(
        do,
        dS,
        dz,
        q,
        k,
        v,
        p.W.detach(),
        p.bias.detach(),
        p.freq,
        p.psi,
        mask,
        *s0,
        o,
        den,
        qmax,
        kstab,
        S,
        z,
        kind=p.kind,
        c_t=p.c_t,
        c_o=p.c_o,
        scale=p.scale,
        causal=case.causal,
        chunk_size=32,
    )
    assert_close(dq, g_ref["q"], name="dq")
    assert_close(dk, g_ref["k"], name="dk")
    assert_close(dv, g_ref["v"], name="dv")
    if state is not None:
        assert_close(dS0, g_ref["S0"], name="dS0")
        assert_close(dz0, g_ref["z0"], name="dz0")
    else:
        assert dS0 is None and dz0 is None
    # W's and bias' gradients reach the weight parameters through the resolved parameters' graph
    fm.zero_grad(set_to_none=True)
    torch.autograd.backward([p.W, p.bias], [dW, dbias])
    for name, param in fm.named_parameters():
        if param.requires_grad:
            assert_close(param.grad, g_ref[f"W.{name}"], name=f"dW.{name}")


def test_finite_differences(device):
    """Directional derivative of a scalar loss through the Triton path (fp32) against central differences.

    Central differences at eps and eps / 2 combined by Richardson extrapolation leave an O(eps^4)
    truncation error (< 1e-5 relative at eps = 1e-2); fp32 rounding of the loss (|L| ~ 30, unit roundoff
    6e-8) adds about 3 * 30 * 6e-8 / eps ~ 5e-4 absolute (~1e-4 relative); 2e-3 relative bounds both.
    The returned S is stored divided by exp(log_scale), a detached maximum that moves under a finite
    perturbation, so the loss uses the scale-free S * exp(log_scale - m_ref) with m_ref fixed.
    """
    case = _case("oprf", causal=True, T=37, D=16, Dv=16, init=True, final=True)
    fm, q, k, v, mask, state = _make(case, device)
    gen = torch.Generator().manual_seed(3)
    params = [p for p in fm.parameters() if p.requires_grad]
    dirs = [torch.randn(t.shape, generator=gen).to(device) for t in [q, k, v, state.S, state.z] + params]
    w_o = torch.randn(case.B, case.T, case.H, case.Dv, generator=gen).to(device)
    w_s = torch.randn(state.S.shape, generator=gen).to(device)

    def loss(eps):
        with torch.no_grad():
            for p, d in zip(params, dirs[5:]):
                p.add_(eps * d)
        try:
            qi, ki, vi, Si, zi = (t + eps * d for t, d in zip([q, k, v, state.S, state.z], dirs))
            o, fin = rf_attention(
                qi,
                ki,
                vi,
                fm,
                causal=True,
                initial_state=RFState(Si, zi, state.log_scale),
                output_final_state=True,
                backend="triton",
            )
            rescale = torch.exp(fin.log_scale - m_ref)[..., None, None]
            return (o * w_o).sum() + 0.1 * (fin.S * rescale * w_s).sum()
        finally:
            with torch.no_grad():
                for p, d in zip(params, dirs[5:]):
                    p.sub_(eps * d)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, state.S, state.z)]
    o, fin = rf_attention(
        *leaves[:3],
        fm,
        causal=True,
        initial_state=RFState(leaves[3], leaves[4], state.log_scale),
        output_final_state=True,
        backend="triton",
    )
    m_ref = fin.log_scale.detach()
    ((o * w_o).sum() + 0.1 * (fin.S * w_s).sum()).backward()
    analytic = sum((t.grad * d).sum() for t, d in zip(leaves + params, dirs)).item()
    eps = 1e-2
    central = [(loss(h) - loss(-h)).item() / (2 * h) for h in (eps, eps / 2)]
    numeric = (4 * central[1] - central[0]) / 3  # Richardson: the O(eps^2) term cancels
    assert abs(numeric - analytic) <= 2e-3 * abs(analytic), (numeric, analytic)


def test_backward_is_deterministic(device):
    case = CASES[0]
    fm, q, k, v, mask, state = _make(case, device)
    _, _, g1 = _run("triton", fm, q, k, v, mask, state, case)
    _, _, g2 = _run("triton", fm, q, k, v, mask, state, case)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_float64_rejected(device):
    fm = RandomFeatureMap(16, 16, num_heads=1, device=device)
    x = torch.randn(1, 4, 1, 16, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        rf_attention(x, x, x, fm, backend="triton")


def test_training_loop_matches_reference(device):
    """A few SGD steps of SpectraAttention (oprf x fastfood_learnable) on both backends give the same losses."""
    torch.manual_seed(0)
    models = {
        b: SpectraAttention(
            32, 2, num_features=16, component="oprf", weights="fastfood_learnable", seed=0, backend=b, device=device
        )
        for b in ("reference", "triton")
    }
    models["triton"].load_state_dict(models["reference"].state_dict())
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(2, 37, 32, generator=gen).to(device), torch.randn(2, 37, 32, generator=gen).to(device))
    batches = [batch] * 4
    losses = {}
    for b, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[b] = []
        for x, target in batches:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses[b].append(loss.item())
    assert losses["reference"][-1] < losses["reference"][0]
    assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]), torch.float32, name="losses")
    for (n, p), (_, pr) in zip(models["triton"].named_parameters(), models["reference"].named_parameters()):
        assert_close(p, pr, torch.float32, name=n)
