"""Fitting feature maps to softmax attention: the loss against the reference, its chunk bound, where its
gradients go, the hedgehog component's routing, and fits that beat uniform attention on held-out data."""

import math

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import spectraformer_fused as sf
from spectraformer_fused import (
    RandomFeatureMap,
    SpectraAttention,
    attention_distillation_loss,
    distill,
    exact_attention,
    fit_feature_map,
    rf_attention,
)
from spectraformer_fused.reference import exact_logits


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: one thread avoids OpenMP barrier stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def structured_qkv(seed, B=2, T=48, H=1, D=16, rank=3, s=1.6, noise=0.1, dtype=torch.float32):
    """q, k near a fixed rank-``rank`` subspace per head (as in trained models): peaked attention."""
    basis = torch.linalg.qr(torch.randn(H, D, rank, generator=torch.Generator().manual_seed(7)))[0]
    g = torch.Generator().manual_seed(seed)

    def one():
        z = torch.randn(B, T, H, rank, generator=g) * math.sqrt(D / rank) * s
        return torch.einsum("bthr,hdr->bthd", z, basis) + noise * torch.randn(B, T, H, D, generator=g)

    q, k = one(), one()
    return q.to(dtype), k.to(dtype), torch.randn(B, T, H, D, generator=g).to(dtype)


def rel_err(o, ref, v):
    return float((o.double() - ref.double()).norm() / v.double().norm())


def masks_for(case, B, T):
    if case != "mask":
        return None
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 5 :] = False
    mask[1, :3] = False
    return mask


@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
@pytest.mark.parametrize("component", ["posrf", "hyprf", "trigrf", "hedgehog"])
def test_mse_loss_equals_reference_attention(component, case):
    """loss='mse' is the mean squared difference of rf_attention (reference backend) and exact attention."""
    B, T, H, D = 2, 37, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    fm = RandomFeatureMap(D, 12, component=component, weights="learnable", num_heads=H, seed=1).double()
    causal, mask = case == "causal", masks_for(case, B, T)
    got = attention_distillation_loss(fm, q, k, v, causal=causal, key_padding_mask=mask, loss="mse", chunk_size=8)
    o = rf_attention(q, k, v, fm, causal=causal, key_padding_mask=mask, backend="reference")
    ref = exact_attention(q, k, v, causal=causal, key_padding_mask=mask)
    rows = torch.ones(B, T, dtype=torch.bool) if mask is None else mask  # padded queries left out
    want = (o - ref).pow(2).mean(-1)[rows].mean()
    assert_close(got, want, torch.float64, name="mse loss")


@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
@pytest.mark.parametrize("component", ["posrf", "hyprf", "hedgehog"])
def test_kl_loss_equals_full_matrix_kl(component, case):
    """loss='kl' and its gradient (through the chunk recomputation) equal KL(p || q) computed from the full
    T x T matrices (exact and random-feature)."""
    B, T, H, D = 2, 29, 2, 8
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) * 1.5 for _ in range(2))
    fm = RandomFeatureMap(D, 10, component=component, weights="learnable", num_heads=H, seed=2).double()
    causal, mask = case == "causal", masks_for(case, B, T)
    got = attention_distillation_loss(fm, q, k, causal=causal, key_padding_mask=mask, chunk_size=7)
    vis = torch.ones(B, 1, T, T, dtype=torch.bool)
    if causal:
        vis = vis & torch.ones(T, T, dtype=torch.bool).tril()
    if mask is not None:
        vis = vis & mask[:, None, None, :] & mask[:, None, :, None]
    kern = fm.kernel_estimate(q, k).masked_fill(~vis, 0.0)  # [B, H, T, T]
    qrow = kern / kern.sum(-1, keepdim=True)
    logp = torch.log_softmax(exact_logits(q, k).masked_fill(~vis, float("-inf")), -1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - torch.log(qrow)), torch.zeros_like(p)).sum(-1)
    rows = vis.expand(B, H, T, T).any(-1)
    want = terms[rows].mean()
    assert_close(got, want, torch.float64, name="kl loss")
    params = [p for p in fm.parameters() if p.requires_grad]
    for g_got, g_want, p in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), params):
        assert_close(g_got, g_want, torch.float64, name=f"gradient of {tuple(p.shape)}")


@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
@pytest.mark.parametrize("component,loss", [("posrf", "kl"), ("hedgehog", "kl"), ("hyprf", "mse")])
def test_grouped_query_loss_equals_repeating_k_by_hand(component, loss, case):
    """k, v with H_kv heads: the loss (and its gradient) equals that of k, v repeated per group by hand, with
    a feature map for H heads whose head h holds the parameters of key/value head h // (H / H_kv)."""
    B, T, H, Hk, D = 2, 23, 6, 2, 8
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) * 1.5
    k, v = (torch.randn(B, T, Hk, D, generator=gen, dtype=torch.float64) * 1.5 for _ in range(2))
    fm = RandomFeatureMap(D, 10, component=component, weights="learnable", num_heads=Hk, seed=4).double()
    full = RandomFeatureMap(D, 10, component=component, weights="learnable", num_heads=H, seed=5).double()
    full.load_state_dict({n: t.repeat_interleave(H // Hk, dim=0) for n, t in fm.state_dict().items()})
    causal, mask = case == "causal", masks_for(case, B, T)
    args = dict(causal=causal, key_padding_mask=mask, loss=loss, chunk_size=6, scale=0.3)
    got = attention_distillation_loss(fm, q, k, v, **args)
    want = attention_distillation_loss(
        full, q, k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2), **args
    )
    assert_close(got, want, torch.float64, name=f"{loss} loss")
    params = [p for p in fm.parameters() if p.requires_grad]
    full_params = [p for p in full.parameters() if p.requires_grad]
    for g_got, g_full in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, full_params)):
        assert_close(g_got, g_full.unflatten(0, (Hk, H // Hk)).sum(1), torch.float64, name="gradient")


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal,kv_heads", [(False, 2), (True, 2), (True, 1)])
def test_loss_never_forms_a_T_by_T_block(causal, kv_heads):
    B, T, H, D, m, chunk = 1, 128, 2, 8, 8, 16  # F = 2m = chunk
    q, k, v = structured_qkv(0, B=B, T=T, H=H, D=D)
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]  # kv_heads < H: grouped-query
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -3:] = False
    bound = B * H * max(chunk * T, T * 2 * m, T * D)  # one chunk's block, the key features
    assert bound * 4 <= B * H * T * T
    with _LargestOutput() as probe:  # the probe itself sees a T x T block
        exact_attention(q, k, v, causal=causal)
    assert probe.largest >= B * H * T * T
    fm = RandomFeatureMap(D, m, component="hyprf", weights="fastfood_learnable", num_heads=kv_heads, seed=0)
    for loss in ("kl", "mse"):
        with _LargestOutput() as probe:
            value = attention_distillation_loss(
                fm, q, k, v, causal=causal, key_padding_mask=mask, loss=loss, chunk_size=chunk
            )
            value.backward()
        assert probe.largest <= bound, f"{loss}: a tensor of {probe.largest} elements (bound {bound})"
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fm.parameters())


def test_gradients_flow_only_into_learnable_parameters():
    B, T, H, D = 2, 20, 2, 8
    q, k, _ = structured_qkv(3, B=B, T=T, H=H, D=D)
    q0, k0 = q.clone(), k.clone()
    q.requires_grad_(True)
    k.requires_grad_(True)
    for component, weights, learnable in [
        ("hedgehog", "fastfood_learnable", {"log_weight", "weights.B", "weights.G", "weights.S"}),
        ("oprf", "learnable", {"weights.weight"}),
    ]:
        fm = RandomFeatureMap(D, 12, component=component, weights=weights, num_heads=H, seed=0)
        buffers = {name: b.clone() for name, b in fm.named_buffers()}
        attention_distillation_loss(fm, q, k, causal=True).backward()
        assert {name for name, p in fm.named_parameters() if p.grad is not None} == learnable
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in fm.parameters())
        assert all(not b.requires_grad and b.grad is None for b in fm.buffers())
        for name, b in fm.named_buffers():  # running statistics are not touched
            assert torch.equal(b, buffers[name]), name
    assert q.grad is None and k.grad is None
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)


@pytest.mark.parametrize("component,weights", [("hyprf", "learnable"), ("hedgehog", "learnable")])
def test_fit_on_one_batch_beats_uniform_on_a_held_out_batch(component, weights):
    """Peaked attention on structured q, k: random features do about as well as uniform attention (0.8x to
    1x of its error here); after a short fit on one batch the held-out error is clearly below both."""
    torch.manual_seed(0)
    q, k, _ = structured_qkv(10, s=1.0)
    qh, kh, vh = structured_qkv(11, s=1.0)
    ref = exact_attention(qh, kh, vh)
    uniform = rel_err(vh.mean(1, keepdim=True).expand_as(vh), ref, vh)
    fm = RandomFeatureMap(16, 32, component=component, weights=weights, seed=0)
    with torch.no_grad():
        before = rel_err(rf_attention(qh, kh, vh, fm, backend="reference"), ref, vh)
    curve = fit_feature_map(fm, q, k, steps=60, lr=3e-2)
    with torch.no_grad():
        after = rel_err(rf_attention(qh, kh, vh, fm, backend="reference"), ref, vh)
    assert len(curve) == 60 and curve[-1] < 0.5 * curve[0]
    assert before > 0.75 * uniform, (before, uniform)  # random features: about uniform's error
    assert after < 0.85 * uniform and after < 0.95 * before, (before, after, uniform)


def test_hedgehog_runs_on_the_backends_that_list_it():
    from spectraformer_fused.attention import KIND_BACKENDS

    q, k, v = structured_qkv(4, T=12, H=2, D=8)
    fm = RandomFeatureMap(8, 6, component="hedgehog", weights="learnable", num_heads=2, seed=0)
    assert fm.feature_dim == 12 and fm.component in sf.LEARNED_COMPONENTS and fm.component not in sf.COMPONENTS
    able = KIND_BACKENDS[fm.kind]
    for backend in ("triton", "cpu"):
        if backend not in able:
            with pytest.raises(ValueError, match="cannot run component 'hedgehog'"):
                rf_attention(q, k, v, fm, backend=backend)
        elif backend in sf.available_backends() and (backend != "triton" or q.is_cuda):
            for causal in (False, True):
                assert_close(
                    rf_attention(q, k, v, fm, causal=causal, backend=backend),
                    rf_attention(q, k, v, fm, causal=causal, backend="reference"),
                    torch.float32,
                    name=backend,
                )
    for causal in (False, True):
        assert_close(
            rf_attention(q, k, v, fm, causal=causal),
            rf_attention(q, k, v, fm, causal=causal, backend="reference"),
            torch.float32,
            name="auto",
        )


def test_distill_fits_every_layer_and_freezes_the_rest():
    torch.manual_seed(0)
    E, H = 32, 2
    model = torch.nn.Sequential(
        SpectraAttention(
            E, H, num_features=16, component="hyprf", weights="learnable", causal=True, seed=0, num_kv_heads=1
        ),
        torch.nn.GELU(),
        SpectraAttention(E, H, num_features=16, component="hedgehog", weights="fastfood_learnable", seed=1),
    )
    with torch.no_grad():  # peaked attention: larger query/key projections
        for layer in (model[0], model[2]):
            layer.qkv.weight[: E + layer.num_kv_heads * layer.head_dim] *= 4.0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".feature_map." not in n}
    fitted = {n: p.detach().clone() for n, p in model.named_parameters() if ".feature_map." in n}
    batches = [torch.randn(2, 24, E) for _ in range(2)]
    for joint in (False, True):
        curves = distill(model, batches, steps=15, lr=2e-2, joint=joint)
        assert set(curves) == {"0", "2"}
        for name, curve in curves.items():
            assert len(curve) == 15 and curve[-1] < curve[0], (joint, name, curve)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
        else:
            assert not torch.equal(p, fitted[n]), n


def test_bad_inputs():
    q, k, v = structured_qkv(5, T=8, D=8)
    fm = RandomFeatureMap(8, 6, component="hyprf", weights="learnable", seed=0)
    with pytest.raises(ValueError, match="unknown loss"):
        attention_distillation_loss(fm, q, k, loss="l2")
    with pytest.raises(ValueError, match="needs v"):
        attention_distillation_loss(fm, q, k, loss="mse")
    with pytest.raises(ValueError, match="chunk_size"):
        attention_distillation_loss(fm, q, k, chunk_size=0)
    with pytest.raises(ValueError, match="positive features"):
        attention_distillation_loss(RandomFeatureMap(8, 6, component="trigrf", seed=0), q, k)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_feature_map(RandomFeatureMap(8, 6, weights="orf", seed=0), q, k, steps=1)
    with pytest.raises(ValueError, match="same positive number of batches"):
        fit_feature_map(fm, [q, q], [k], steps=1)
    with pytest.raises(ValueError, match="steps"):
        fit_feature_map(fm, q, k, steps=-1)
    with pytest.raises(TypeError, match="key_padding_mask"):
        attention_distillation_loss(fm, q, k, key_padding_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="must divide"):
        attention_distillation_loss(fm, q.expand(-1, -1, 3, -1), torch.cat([k, k], 2))
    with pytest.raises(ValueError, match="no SpectraAttention"):
        distill(torch.nn.Linear(4, 4), [torch.randn(1, 4)], steps=1)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_window_loss_is_the_hybrid_rows_kl(causal):
    """attention_distillation_loss(window=W): the mean KL from the exact rows to hybrid attention's rows
    (exact kernel inside the window, phi(q).phi(k) beyond, one normaliser), evaluated densely in fp64;
    query chunks of 5 cross the window; W >= T gives 0 (the hybrid is then exact)."""
    from helpers import dense_features

    B, T, H, Hk, D = 2, 23, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, T, h, D, generator=g) for h in (H, Hk))
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    fm = RandomFeatureMap(D, 16, component="hyprf", weights="learnable", num_heads=Hk, seed=1)
    scale = D**-0.5
    for window in (1, 4, 9):
        got = sf.attention_distillation_loss(
            fm, q, k, scale=scale, causal=causal, key_padding_mask=mask, chunk_size=5, window=window
        )
        p = fm.feature_params(q, k, scale=scale, causal=causal, key_padding_mask=mask, update_stats=False)
        fq, fk = dense_features(q, k, p)
        est = (fq @ fk.transpose(-1, -2)).unflatten(2, (H // Hk, T))  # [B, Hk, G, T, T]
        logit = exact_logits(q.double(), k.double().repeat_interleave(H // Hk, 2), scale=scale).unflatten(1, (Hk, -1))
        t = torch.arange(T)
        diff = t[:, None] - t[None, :]
        inside = (diff >= 0) & (diff < window) if causal else diff.abs() < window
        visible = (diff >= 0 if causal else torch.ones(T, T, dtype=torch.bool)) & mask[:, None, None, None, :]
        w = torch.where(inside, logit.exp(), est) * visible
        qrow = w / w.sum(-1, keepdim=True)
        prow = torch.softmax(logit.masked_fill(~visible, float("-inf")), -1)
        kl = torch.where(prow > 0, prow * (prow.log() - qrow.clamp_min(1e-300).log()), torch.zeros_like(prow))
        rows = mask[:, None, None, :].expand(B, Hk, H // Hk, T)  # padded query rows are left out
        expected = kl.sum(-1)[rows].mean()
        print(f"causal={causal} W={window}: loss {got.item():.6f}, dense {expected.item():.6f}")
        assert abs(got.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())
        # against sliding-window attention (a converted sliding-window layer): the target ends at the window
        got = sf.attention_distillation_loss(
            fm, q, k, scale=scale, causal=causal, key_padding_mask=mask, chunk_size=5, window=window,
            target_window=window,
        )  # fmt: skip
        prow = torch.softmax(logit.masked_fill(~(visible & inside), float("-inf")), -1).nan_to_num(0.0)
        kl = torch.where(prow > 0, prow * (prow.log() - qrow.clamp_min(1e-300).log()), torch.zeros_like(prow))
        rows = ((visible & inside).any(-1) & mask[:, None, None, :]).expand(B, Hk, H // Hk, T)
        expected = kl.sum(-1)[rows].mean()
        print(f"  target window {window}: loss {got.item():.6f}, dense {expected.item():.6f}")
        assert abs(got.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())
    wide = sf.attention_distillation_loss(fm, q, k, scale=scale, causal=causal, key_padding_mask=mask, window=T)
    assert abs(wide.item()) < 1e-6, wide.item()


def test_distill_fits_a_hybrid_layer_with_its_window():
    """A SpectraAttention layer with window=W is recorded with its window; the loss it is fitted with is
    attention_distillation_loss(..., window=W) (lower than without the window: the window's keys are exact)."""
    from spectraformer_fused.fitting import record_attention_inputs

    layer = SpectraAttention(32, 2, num_features=16, weights="learnable", causal=True, window=4, seed=0)
    model = torch.nn.Sequential(layer)
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(4))
    rec = record_attention_inputs(model, [x])["0"][0]
    assert rec.window == 4
    kw = dict(scale=rec.scale, causal=True)
    hybrid = sf.attention_distillation_loss(layer.feature_map, rec.q, rec.k, window=4, **kw)
    plain = sf.attention_distillation_loss(layer.feature_map, rec.q, rec.k, **kw)
    assert hybrid < plain, (hybrid, plain)
    curves = sf.distill(model, [x], steps=3, lr=1e-2)
    assert abs(curves["0"][0] - hybrid.item()) < 1e-5, (curves["0"][0], hybrid.item())


# -- attention sinks, the exact-part factor and the output loss (DESIGN.md section 8) ----------------------
def hybrid_rows_oracle(fm, q, k, *, scale, causal, mask, window, sinks, log_mix=None):
    """The model's (unnormalised) hybrid weights and the exact target rows, densely in fp64, by definition:
    exact set E_t = window(t) U {j < S}, weight g exp(l_tj) on E_t and phi(q_t).phi(k_j) elsewhere, invisible
    keys 0. Returns (w [B, Hk, G, T, T], target p, visible). Differentiable in the feature map's parameters
    (``log_mix`` overrides ``fm.log_mix``)."""
    from helpers import dense_features

    B, T, H, _ = q.shape
    Hk = k.shape[2]
    G = H // Hk
    p = fm.feature_params(q, k, scale=scale, causal=causal, key_padding_mask=mask, update_stats=False)
    fq, fk = dense_features(q, k, p)
    est = (fq @ fk.transpose(-1, -2)).unflatten(2, (G, T))  # [B, Hk, G, T, T]
    logit = exact_logits(q.double(), k.double().repeat_interleave(G, 2), scale=scale).unflatten(1, (Hk, G))
    t = torch.arange(T)
    diff = t[:, None] - t[None, :]
    inside = (diff >= 0) & (diff < (window or 0)) if causal else diff.abs() < (window or 0)
    inside = inside | (t[None, :] < (sinks or 0))
    lm = fm.log_mix if log_mix is None else log_mix
    mixed = logit if lm is None else logit + lm.double().expand(Hk)[None, :, None, None, None]
    visible = (diff >= 0 if causal else torch.ones(T, T, dtype=torch.bool)).expand(B, 1, 1, T, T)
    if mask is not None:
        visible = visible & mask[:, None, None, None, :]
    w = torch.where(inside, mixed.exp(), est) * visible
    prow = torch.softmax(logit.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return w, prow, visible


def oracle_loss(fm, q, k, v, *, loss, scale, causal, mask, window, sinks, log_mix=None):
    w, prow, visible = hybrid_rows_oracle(
        fm, q, k, scale=scale, causal=causal, mask=mask, window=window, sinks=sinks, log_mix=log_mix
    )
    B, T, H, _ = q.shape
    Hk = k.shape[2]
    rows = visible.any(-1).expand(B, Hk, H // Hk, T)
    if mask is not None:
        rows = rows & mask[:, None, None, :]
    if loss == "kl":
        qrow = w / w.sum(-1, keepdim=True)
        kl = torch.where(prow > 0, prow * (prow.log() - qrow.clamp_min(1e-300).log()), torch.zeros_like(prow))
        return kl.sum(-1)[rows].mean()
    vv = v.double().transpose(1, 2)[:, :, None]  # [B, Hk, 1, T, Dv]
    diff = (w @ vv) / w.sum(-1, keepdim=True) - prow @ vv
    return diff.pow(2).mean(-1)[rows].mean()


@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("window,sinks", [(None, 3), (4, 2), (3, 5)])
def test_sinks_and_mix_loss_equal_the_dense_oracle(window, sinks, causal, loss):
    """attention_distillation_loss(window=, sinks=) with a feature map built with ``mix``: the loss and the
    gradient of every trainable parameter (log_mix included) equal those of the dense fp64 oracle (exact
    logits and materialised features, E_t = window U sinks with the factor g, one normaliser); query
    chunks of 5 cross the sinks and the window; padding masks a sink."""
    B, T, H, Hk, D = 2, 19, 4, 2, 8
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for h in (H, Hk, Hk))
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0], mask[1, 1] = True, False  # sequence 1 has a padded sink
    fm = RandomFeatureMap(D, 12, component="hyprf", weights="learnable", num_heads=Hk, seed=1, mix=0.3).double()
    with torch.no_grad():
        fm.log_mix.add_(torch.tensor([0.4, -0.7], dtype=torch.float64))  # one factor per key/value head
    assert any(p is fm.log_mix for p in sf.fitting.trainable_parameters(fm))
    scale = D**-0.5
    kw = dict(scale=scale, causal=causal, window=window, sinks=sinks, loss=loss)
    got = attention_distillation_loss(fm, q, k, v, key_padding_mask=mask, chunk_size=5, **kw)
    want = oracle_loss(fm, q, k, v, mask=mask, **kw)
    assert_close(got, want, torch.float64, name=f"{loss} loss")
    params = sf.fitting.trainable_parameters(fm)
    for g_got, g_want, p in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), params):
        assert_close(g_got, g_want, torch.float64, name=f"gradient of {tuple(p.shape)}")
        if p is fm.log_mix:
            assert (g_got.abs() > 1e-8).all(), g_got  # the factor is fitted
    # the factor's gradient by central finite differences, per head
    (g_mix,) = torch.autograd.grad(attention_distillation_loss(fm, q, k, v, key_padding_mask=mask, **kw), fm.log_mix)
    for h in range(Hk):
        e = torch.zeros(Hk, dtype=torch.float64)
        e[h] = 1e-5
        with torch.no_grad():
            up = oracle_loss(fm, q, k, v, mask=mask, log_mix=fm.log_mix + e, **kw)
            down = oracle_loss(fm, q, k, v, mask=mask, log_mix=fm.log_mix - e, **kw)
        fd = (up - down) / 2e-5
        assert abs(g_mix[h].item() - fd.item()) <= 1e-6 * max(1.0, abs(fd.item())), (h, g_mix[h].item(), fd.item())


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_sinks_cover_the_row_then_the_factor_cancels(causal):
    """sinks >= T: every visible key is exact, so the row is softmax attention whatever g is: loss 0, and
    no gradient reaches log_mix (g cancels); without a window or sinks log_mix plays no part."""
    B, T, H, D = 2, 9, 2, 8
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    fm = RandomFeatureMap(D, 12, component="hedgehog", weights="learnable", num_heads=H, seed=0, mix=0.1)
    for loss in ("kl", "mse"):
        value = attention_distillation_loss(fm, q, k, v, causal=causal, sinks=T, loss=loss)
        assert abs(value.item()) < 1e-6, (loss, value.item())
        (grad,) = torch.autograd.grad(value, fm.log_mix, allow_unused=True)
        assert grad is None or grad.abs().max() < 1e-6
        value = attention_distillation_loss(fm, q, k, v, causal=causal, loss=loss)
        assert torch.autograd.grad(value, fm.log_mix, allow_unused=True)[0] is None


def test_sinks_mse_loss_equals_rf_attention_with_sinks():
    """loss='mse' with sinks and the factor is the squared difference of rf_attention(..., sinks=) (reference
    backend) from exact attention."""
    B, T, H, Hk, D = 2, 21, 4, 2, 8
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for h in (H, Hk, Hk))
    fm = RandomFeatureMap(D, 12, component="hyprf", weights="learnable", num_heads=Hk, seed=2, mix=0.5).double()
    for window, causal in ((3, True), (None, True), (2, False)):
        got = attention_distillation_loss(fm, q, k, v, causal=causal, loss="mse", chunk_size=4, window=window, sinks=3)
        o = rf_attention(q, k, v, fm, causal=causal, backend="reference", window=window, sinks=3)
        want = (o - exact_attention(q, k, v, causal=causal)).pow(2).mean(-1).mean()
        assert_close(got, want, torch.float64, name=f"mse window={window} causal={causal}")


def student_and_teacher_outputs(layer, x):
    """(the layer's random-feature attention output before out_proj, the softmax attention's)."""
    with torch.no_grad():
        q, k, v = layer.project(x)
        extra = {} if getattr(layer, "sinks", None) is None else {"sinks": layer.sinks}
        o = rf_attention(
            q, k, v, layer.feature_map, causal=layer.causal, backend="reference", window=layer.window, **extra
        )
        return o, exact_attention(q, k, v, causal=layer.causal)


def test_distill_output_loss_brings_the_layer_output_closer():
    """distill(loss='mse') records v with q and k and fits the attention output (LoLCATs' stage 1): its first
    loss is attention_distillation_loss(loss='mse') on the recorded q, k, v, the loss falls, and the layer's
    output moves closer to the softmax output, on the training batch and on a held-out one."""
    from spectraformer_fused.fitting import record_attention_inputs

    torch.manual_seed(0)
    E, H = 32, 2
    layer = SpectraAttention(E, H, num_features=16, component="hedgehog", weights="learnable", causal=True, seed=0)
    with torch.no_grad():  # peaked attention
        layer.qkv.weight[: 2 * E] *= 4.0
    model = torch.nn.Sequential(layer)
    gen = torch.Generator().manual_seed(5)
    x, held = (torch.randn(2, 32, E, generator=gen) for _ in range(2))
    rec = record_attention_inputs(model, [x])["0"][0]
    assert rec.v is not None and rec.v.shape == rec.k.shape and rec.sinks is None
    first = attention_distillation_loss(
        layer.feature_map, rec.q, rec.k, rec.v, scale=rec.scale, causal=True, loss="mse"
    )
    before = {n: rel_err(*student_and_teacher_outputs(layer, z), z) for n, z in (("train", x), ("held", held))}
    curves = distill(model, [x], steps=40, lr=2e-2, loss="mse")
    after = {n: rel_err(*student_and_teacher_outputs(layer, z), z) for n, z in (("train", x), ("held", held))}
    curve = curves["0"]
    print(before, after, curve[0], curve[-1])
    assert abs(curve[0] - first.item()) < 1e-6 * max(1.0, first.item())
    assert curve[-1] < 0.7 * curve[0], curve
    assert after["train"] < 0.9 * before["train"] and after["held"] < before["held"], (before, after)


def test_distill_fits_sinks_and_the_factor():
    """A hybrid layer with sinks (SpectraAttention's ``sinks``) and a feature map with ``mix``: the record
    carries the sinks, distill's first loss is attention_distillation_loss(..., sinks=) and log_mix moves,
    with the KL and with the output loss."""

    from spectraformer_fused.fitting import record_attention_inputs

    E, H = 32, 2
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 24, E, generator=gen)
    for loss in ("kl", "mse"):
        kw = dict(num_features=16, weights="learnable", causal=True, window=4, seed=0, mix=0.1)
        layer = SpectraAttention(E, H, sinks=2, **kw)
        model = torch.nn.Sequential(layer)
        rec = record_attention_inputs(model, [x])["0"][0]
        assert rec.sinks == 2 and rec.window == 4
        start = layer.feature_map.log_mix.detach().clone()
        want = attention_distillation_loss(
            layer.feature_map, rec.q, rec.k, rec.v, scale=rec.scale, causal=True, window=4, sinks=2, loss=loss
        )
        curves = distill(model, [x], steps=5, lr=2e-2, loss=loss, init_mix=False)
        assert abs(curves["0"][0] - want.item()) < 1e-6 * max(1.0, want.item()), (loss, curves["0"][0], want.item())
        assert not torch.equal(layer.feature_map.log_mix.detach(), start), loss


def test_sinks_loss_never_forms_a_T_by_T_block():
    """With a window, sinks and the factor, both losses still stay within one chunk's block."""
    B, T, H, D, m, chunk = 1, 128, 2, 8, 8, 16
    q, k, v = structured_qkv(0, B=B, T=T, H=H, D=D)
    bound = B * H * max(chunk * T, T * 2 * m, T * D)
    fm = RandomFeatureMap(D, m, component="hedgehog", weights="learnable", num_heads=H, seed=0, mix=0.1)
    for loss in ("kl", "mse"):
        with _LargestOutput() as probe:
            value = attention_distillation_loss(
                fm, q, k, v, causal=True, loss=loss, chunk_size=chunk, window=8, sinks=4
            )
            value.backward()
        assert probe.largest <= bound, f"{loss}: a tensor of {probe.largest} elements (bound {bound})"
        assert fm.log_mix.grad is not None and (fm.log_mix.grad != 0).all()
        fm.zero_grad()


def test_sinks_bad_inputs():
    q, k, v = structured_qkv(5, T=8, D=8)
    fm = RandomFeatureMap(8, 6, component="hyprf", weights="learnable", seed=0)
    with pytest.raises(ValueError, match="sinks"):
        attention_distillation_loss(fm, q, k, sinks=-1)
    with pytest.raises(TypeError, match="sinks"):
        attention_distillation_loss(fm, q, k, sinks=True)
    with pytest.raises(ValueError, match="sinks"):
        fit_feature_map(fm, q, k, steps=1, sinks=-2)
    layer = SpectraAttention(8, 1, num_features=6, weights="learnable", seed=0)
    with pytest.raises(ValueError, match="unknown loss"):
        distill(torch.nn.Sequential(layer), [torch.randn(1, 4, 8)], steps=1, loss="output")


# -- the factor's start from data (init_mix) -------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("component", ["posrf", "hedgehog"])
def test_init_mix_matches_dense_definition(component, causal):
    """log g = median over rows of log(sum_R est / sum_R exp(l)), computed densely from kernel_estimate and
    exact_logits (multi-head: one feature map head per head)."""
    from spectraformer_fused.fitting import init_mix
    from spectraformer_fused.reference import exact_logits

    g = torch.Generator().manual_seed(4)
    B, T, H, D, W, S = 2, 40, 2, 8, 5, 2
    q, k = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * 0.8 for _ in range(2))
    fm = RandomFeatureMap(D, 16, component=component, num_heads=H, seed=0, dtype=torch.float64, mix=True)
    got = init_mix(fm, q, k, causal=causal, window=W, sinks=S, rows=T)
    est = fm.kernel_estimate(q, k)  # [B, H, T, T]
    logits = exact_logits(q, k)
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = j <= t if causal else torch.ones(T, T, dtype=torch.bool)
    exact = ((t - j >= 0) & (t - j < W) if causal else (t - j).abs() < W) | (j < S)
    rest = visible & ~exact
    ratio = (est * rest).sum(-1) / (logits.exp() * rest).sum(-1)  # [B, H, T]
    ok = rest.any(-1)
    want = torch.stack([ratio[:, h][:, ok].log().flatten().median() for h in range(H)])
    assert_close(got, want, torch.float64, name="log_mix")
    assert torch.equal(fm.log_mix.detach(), got)
    if component == "hedgehog":  # per-row normalised features: far below the exact scale
        assert (got < -1).all()


def test_init_mix_refuses_what_it_cannot_do():
    from spectraformer_fused.fitting import init_mix

    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="mix"):
        init_mix(RandomFeatureMap(8, 4, num_heads=2), q, q, window=2)
    with pytest.raises(ValueError, match="window or sinks"):
        init_mix(RandomFeatureMap(8, 4, num_heads=2, mix=True), q, q)


def test_distill_starts_the_factor_from_data():
    """distill(init_mix=True) moves log_mix to init_mix's value before its steps; init_mix=False keeps mix=."""
    from spectraformer_fused.fitting import distill, init_mix, record_attention_inputs

    x = torch.randn(1, 30, 16, generator=torch.Generator().manual_seed(2))
    for flag in (True, False):
        torch.manual_seed(0)
        layer = SpectraAttention(16, 2, num_features=8, component="hedgehog", causal=True, window=4, sinks=1, mix=1.0)
        model = torch.nn.Sequential(layer)
        rec = record_attention_inputs(model, [x])["0"][0]
        ref = RandomFeatureMap(8, 8, component="hedgehog", num_heads=2, mix=1.0)
        ref.load_state_dict(layer.feature_map.state_dict())
        want = init_mix(ref, rec.q, rec.k, scale=rec.scale, causal=True, window=4, sinks=1)
        curves = distill(model, [x], steps=1, lr=1e-9, loss="mse", init_mix=flag)
        assert len(curves["0"]) == 1
        if flag:
            assert torch.allclose(layer.feature_map.log_mix.detach(), want, atol=1e-6)
        else:
            assert torch.allclose(layer.feature_map.log_mix.detach(), torch.zeros(2), atol=1e-6)


def _backend_or_skip(backend):
    if backend == "cpu":
        from spectraformer_fused.ops import cpu as cpu_ops

        if not cpu_ops.extension_available():
            pytest.skip("CPU extension unavailable")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "component,window,sinks,causal,masked,target_window",
    [
        ("hedgehog", 5, 2, True, False, None),
        ("hedgehog", None, 3, True, True, None),
        ("hedgehog", None, None, True, False, None),
        ("posrf", 4, None, False, True, None),
        ("posrf", 4, 2, False, False, 6),
        ("oprf", 4, 2, True, True, None),
        ("hyprf", 3, 1, True, False, 3),
    ],
)
def test_backend_mse_loss_equals_the_chunked_loss(backend, component, window, sinks, causal, masked, target_window):
    """loss='mse' on a backend (rf_attention's fused forward and backward against the exact output) has the
    chunked loss's value and gradients (every trainable parameter, the factor included): GQA, windows,
    sinks, padding, a sliding-window target."""
    _backend_or_skip(backend)
    B, T, H, Hk, D, m = 2, 37, 6, 3, 16, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hk, Hk))
    mask = (torch.rand(B, T, generator=g) > 0.3) if masked else None
    mix = 0.5 if (window or sinks) else None
    fm = RandomFeatureMap(D, m, component=component, weights="learnable", num_heads=Hk, seed=2, mix=mix)
    kw = dict(causal=causal, key_padding_mask=mask, loss="mse", window=window, sinks=sinks, target_window=target_window)
    params = sf.fitting.trainable_parameters(fm)
    want = attention_distillation_loss(fm, q, k, v, chunk_size=8, **kw)
    got = attention_distillation_loss(fm, q, k, v, backend=backend, **kw)
    assert_close(got, want, torch.float32, name=f"{backend} mse loss")
    for g_got, g_want, p in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), params):
        assert_close(g_got, g_want, torch.float32, name=f"{backend} gradient of {tuple(p.shape)}")
    target = sf.fitting.output_target(q, k, v, causal=causal, key_padding_mask=mask, target_window=target_window)
    again = attention_distillation_loss(fm, q, k, v, backend=backend, target=target, **kw)
    assert_close(again, got, torch.float32, name="loss with the target given")


def test_fit_computes_each_batch_target_once(monkeypatch):
    """fit_feature_map(loss='mse') on a backend computes the exact output once per batch, and its loss curve
    is the chunked loss's (the same parameters step by step)."""
    B, T, H, D = 1, 24, 2, 8
    batches = [structured_qkv(s, B=B, T=T, H=H, D=D) for s in (1, 2)]
    qs, ks, vs = ([b[i] for b in batches] for i in range(3))
    calls = []
    real = sf.fitting.output_target

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    curves = {}
    for backend in (None, "reference"):
        fm = RandomFeatureMap(D, 8, component="hedgehog", weights="learnable", num_heads=H, seed=0, mix=1.0)
        monkeypatch.setattr(sf.fitting, "output_target", counting)
        curves[backend] = fit_feature_map(
            fm, qs, ks, v=vs, steps=5, lr=1e-2, causal=True, loss="mse", window=4, sinks=1, backend=backend
        )
    assert len(calls) == 2, calls
    print(curves)
    assert curves[None][-1] < curves[None][0]
    for a, b in zip(curves[None], curves["reference"]):
        assert abs(a - b) <= 1e-4 * abs(a), (curves[None], curves["reference"])


def test_loss_backend_bad_values():
    fm = RandomFeatureMap(8, 4, component="hedgehog", weights="learnable", num_heads=1, seed=0)
    q, k, v = structured_qkv(0, B=1, T=8, H=1, D=8)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        attention_distillation_loss(fm, q, k, v, loss="mse", backend="gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        fit_feature_map(fm, q, k, v=v, steps=1, loss="mse", backend=3)
    with pytest.raises(ValueError, match="target must be the exact output"):
        attention_distillation_loss(fm, q, k, v, loss="mse", backend="reference", target=torch.zeros(1, 8, 1, 3))
