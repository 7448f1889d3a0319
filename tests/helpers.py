"""Shared test vocabulary: ``Case`` (one attention configuration and its readable id) and comparison
helpers (relative-RMS plus max-abs checks that print the worst mismatches)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def causal_id(causal: bool) -> str:
    return "causal" if causal else "noncausal"


def component_id(component: str, args: dict | None = None) -> str:
    """A component and its arguments, e.g. ``gerf-A-0.1-s1``."""
    return component + "".join(f"-{k}{v:g}" for k, v in (args or {}).items())


@dataclass(frozen=True)
class Case:
    """One attention configuration of a parametrized test.

    q is ``[B, T, H, D]``, k ``[B, T, H_kv, D]`` and v ``[B, T, H_kv, Dv]`` (``H_kv=None``: H_kv = H); the
    feature map has ``m`` frequencies and one W per key/value head (``shared``: one W for all heads).
    ``mask``: a key padding mask; ``init``: an initial state; ``final``: the loss also reads the final
    state; ``amp``: q and k are ``randn * amp``; ``chunk``: an explicit kernel chunk size. How a flag turns
    into tensors is up to each test file's input builder.

    ``id`` is the one test-id format of the suite:
    ``B2-T37-H4-Hkv2-D24-Dv24-M16-gerf-A-0.1-s1-orf-softmax-causal-fp32-mask-init-final-sharedW-x0.5-chunk16``
    (shape, component and its arguments, weights, kernel, causality, dtype, then the flags that are set).
    """

    component: str = "posrf"
    causal: bool = False
    dtype: torch.dtype = torch.float32
    weights: str = "orf"
    kernel: str = "softmax"
    B: int = 2
    T: int = 37
    H: int = 2
    H_kv: int | None = None
    D: int = 24
    Dv: int = 24
    m: int = 16
    mask: bool = False
    init: bool = False
    final: bool = False
    shared: bool = False
    amp: float = 1.0
    chunk: int | None = None
    args: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def kv_heads(self) -> int:
        return self.H if self.H_kv is None else self.H_kv

    @property
    def id(self) -> str:
        heads = f"H{self.H}" + ("" if self.H_kv is None else f"-Hkv{self.H_kv}")
        parts = [
            f"B{self.B}-T{self.T}-{heads}-D{self.D}-Dv{self.Dv}-M{self.m}",
            component_id(self.component, self.args),
            self.weights,
            self.kernel,
            causal_id(self.causal),
            DTYPE_NAMES[self.dtype],
        ]
        parts += [
            n
            for n, on in (("mask", self.mask), ("init", self.init), ("final", self.final), ("sharedW", self.shared))
            if on
        ]
        if self.amp != 1.0:
            parts.append(f"x{self.amp:g}")
        if self.chunk is not None:
            parts.append(f"chunk{self.chunk}")
        return "-".join(parts)

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)


def case_id(case: Case) -> str:
    """``ids=`` of ``pytest.mark.parametrize`` over cases."""
    return case.id


# (relative RMS, max abs relative to the reference's RMS) per dtype of the inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 2e-3),
    torch.float16: (5e-3, 5e-2),
    torch.bfloat16: (3e-2, 2e-1),
}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype=None,
    *,
    name: str = "tensor",
    rtol: float | None = None,
    atol_rel: float | None = None,
    worst: int = 5,
    min_scale: float = 0.0,
) -> None:
    """Fail if rel-RMS(actual - expected) > rtol or max|actual - expected| > atol_rel * RMS(expected).

    Errors are measured against ``max(RMS(expected), min_scale)``: a floor for tensors that are zero in
    exact arithmetic, where both sides hold rounding noise. The message names the tensor and lists the
    worst elements with their indices."""
    dtype = dtype or expected.dtype
    t_rms, t_abs = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    rtol = t_rms if rtol is None else rtol
    atol_rel = t_abs if atol_rel is None else atol_rel
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if e.numel() == 0:
        return
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:worst].tolist()
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite elements, first at {bad}")
    diff = (a - e).abs()
    scale = max(e.pow(2).mean().sqrt().item(), min_scale) or 1.0
    rel_rms = (a - e).pow(2).mean().sqrt().item() / scale
    max_abs = diff.max().item()
    if rel_rms > rtol or max_abs > atol_rel * scale:
        flat = diff.flatten()
        idx = flat.topk(min(worst, flat.numel())).indices
        rows = []
        for i in idx.tolist():
            where = tuple(int(c) for c in torch.unravel_index(torch.tensor(i), e.shape))
            rows.append(f"  at {where}: got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}")
        raise AssertionError(
            f"{name}: rel-RMS {rel_rms:.3e} (tol {rtol:.1e}), max abs {max_abs:.3e} (tol {atol_rel * scale:.3e})\n"
            + "\n".join(rows)
        )


def assert_exponents_close(actual: torch.Tensor, expected: torch.Tensor, dtype, *, name: str = "exponent") -> None:
    """Exponents and stabilisers (log-space values): an error d in them is a factor exp(d) on features.

    fp32 inputs: ``assert_close`` at fp32's tolerance. fp16/bf16 inputs: the kernels' products run in tf32
    (operands rounded to 10 mantissa bits), so an exponent e may be off by about 2^-11 |e|; the check is
    max |actual - expected| <= 2^-9 (1 + max |expected|), i.e. features within about 0.2% per unit of
    exponent size."""
    if dtype in (torch.float32, torch.float64):
        assert_close(actual, expected, dtype, name=name)
        return
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite elements")
    diff = (a - e).abs()
    tol = 2.0**-9 * (1.0 + e.abs().max().item())
    if diff.max().item() > tol:
        i = int(diff.flatten().argmax())
        where = tuple(int(c) for c in torch.unravel_index(torch.tensor(i), e.shape))
        raise AssertionError(
            f"{name}: max abs error {diff.max().item():.3e} > {tol:.3e} at {where}: got "
            f"{a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}"
        )


def dense_features(q, k, params):
    """phi(q) and phi(k) of every token, materialised in fp64 without stabiliser: ``[B, H_kv, G * T, F]``
    (a group's query heads in one row block, head-major) and ``[B, H_kv, T, F]``. Small test shapes only."""
    import math

    from spectraformer_fused.components import feature_logits

    B, T, H, D = q.shape
    Hk = k.shape[2]
    root = math.sqrt(params.scale)
    x = (q.double() * root).transpose(1, 2).reshape(B, Hk, (H // Hk) * T, D)
    y = (k.double() * root).transpose(1, 2)
    W, bias, freq = params.W.double(), params.bias.double(), params.freq.double()
    psi = None if params.psi is None else params.psi.double()
    kw = dict(kind=params.kind, c_t=params.c_t, c_o=params.c_o)
    feats = []
    for t, query in ((x, True), (y, False)):
        e, mult = feature_logits(t, W, bias, freq, psi, query=query, **kw)
        feats.append(torch.exp(e) if mult is None else torch.exp(e) * mult)
    return feats


def hybrid_oracle(q, k, v, params, *, window, causal, key_padding_mask=None, sinks=0):
    """Hybrid attention by definition (DESIGN.md section 6), O(T^2) in fp64: the weight of key j for query
    t is the exact kernel exp(x.y + exact_sq (|x|^2 + |y|^2)) when j is inside the window (causal:
    t - W < j <= t; non-causal: |t - j| < W) and the dense feature estimate phi(q_t).phi(k_j) otherwise;
    invisible keys (future ones when causal, masked ones) weigh 0; one normaliser, floored as every
    backend floors it. ``window`` None or 0: random features only. ``sinks`` S (DESIGN.md section 8): keys
    j < S are exact too; ``params.log_mix`` (the learned factor) is added to every exact logit. Returns
    ``[B, T, H, Dv]`` fp64."""
    import math

    from spectraformer_fused.contract import DEN_EPS

    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    fq, fk = dense_features(q, k, params)
    est = (fq @ fk.transpose(-1, -2)).unflatten(2, (G, T))  # [B, Hk, G, T, T]
    root = math.sqrt(params.scale)
    x = (q.double() * root).transpose(1, 2).unflatten(1, (Hk, G))  # [B, Hk, G, T, D]
    y = (k.double() * root).transpose(1, 2)[:, :, None]  # [B, Hk, 1, T, D]
    logit = x @ y.transpose(-1, -2)
    logit = logit + params.exact_sq * ((x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :])
    t = torch.arange(T, device=q.device)
    diff = t[:, None] - t[None, :]  # query minus key position
    W = window or 0
    inside = (diff >= 0) & (diff < W) if causal else diff.abs() < W
    inside = inside | (t[None, :] < (sinks or 0))
    if params.log_mix is not None:
        logit = logit + params.log_mix.double()[None, :, None, None, None]
    w = torch.where(inside, torch.exp(logit), est)
    visible = (diff >= 0) if causal else torch.ones_like(inside)
    visible = visible.expand(B, 1, 1, T, T)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, None, :]
    w = w * visible
    den = w.sum(-1, keepdim=True)
    vv = v.double().transpose(1, 2)[:, :, None]  # [B, Hk, 1, T, Dv]
    o = (w @ vv) / den.abs().clamp_min(DEN_EPS)
    return o.flatten(1, 2).transpose(1, 2)


def cache_oracle(q, k, v, params, *, window, cache, sinks=0, key_padding_mask=None, score="kernel"):
    """Causal hybrid attention with an exact cache by definition (DESIGN.md section 9), O(T^2) in fp64,
    written apart from the backends: the cache's contents replayed by a plain loop per (sequence, key/value
    head) with unstabilised dense features (the state S = sum phi(k) v^T, z = sum phi(k) of the folded keys),
    then every query's weights: exact exp(logit + log_mix) over window U sinks U cache(t), the features
    phi(q).phi(k) over the other visible keys, one normaliser.

    Before query t the key t - W (when kept and not a sink) competes: it takes a free slot (in order), or the
    key of cache U {it} with the lowest ``score`` is folded into S, z (ties: the first in [slots, candidate],
    i.e. the oldest). Scores, f = phi_q(k): ``"kernel"``: |log(f.phi(k)) - logit(k, k) - log_mix| in steps of
    2^-12 nats; ``"kernel_rel"``: |f.phi(k) / exp(logit(k, k) + log_mix) - 1|; ``"recall"``:
    ||S^T f - (z.f) v|| / |z.f + f.phi(k)|; ``"recall_other"``: ||S^T f - (z.f) v|| / |z.f|. The slots stay in
    arrival order (a folded key's later slots move up, the candidate comes last). After the last query the
    key T - W competes as well, as a final state would hold.

    Returns ``(o [B, T, H, Dv] fp64, cached)`` where ``cached[b][h]`` is the list of key positions in the
    cache's slots after the sequence (slot order)."""
    import math

    from spectraformer_fused.contract import DEN_EPS

    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    fq, fk = dense_features(q, k, params)  # [B, Hk, G * T, F], [B, Hk, T, F]
    fkq, _ = dense_features(k, k, params)  # keys used as queries: [B, Hk, T, F]
    est = (fq @ fk.transpose(-1, -2)).unflatten(2, (G, T))  # [B, Hk, G, T, T]
    root = math.sqrt(params.scale)
    x = (q.double() * root).transpose(1, 2).unflatten(1, (Hk, G))
    y = (k.double() * root).transpose(1, 2)  # [B, Hk, T, D]
    logit = x @ y[:, :, None].transpose(-1, -2)
    logit = logit + params.exact_sq * ((x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[:, :, None, None, :])
    if params.log_mix is not None:
        logit = logit + params.log_mix.double()[None, :, None, None, None]
    self_logit = (y * y).sum(-1) * (1 + 2 * params.exact_sq)  # [B, Hk, T]
    if params.log_mix is not None:
        self_logit = self_logit + params.log_mix.double()[None, :, None]
    vv = v.double().transpose(1, 2)  # [B, Hk, T, Dv]
    keep = torch.ones(B, T, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.cpu()
    exact = torch.zeros(B, Hk, T, T, dtype=torch.bool)
    t = torch.arange(T)
    diff = t[:, None] - t[None, :]
    exact[:] = ((diff >= 0) & (diff < window)) | ((t[None, :] < sinks) & (diff >= 0))
    cached = []
    for b in range(B):
        cached.append([])
        for h in range(Hk):
            S = torch.zeros(fk.shape[-1], vv.shape[-1], dtype=torch.float64)
            z = torch.zeros(fk.shape[-1], dtype=torch.float64)
            slots = []

            @torch.no_grad()
            def err(i):
                f = fkq[b, h, i]
                if score == "kernel_rel":
                    return abs(float(f @ fk[b, h, i]) / math.exp(float(self_logit[b, h, i])) - 1.0)
                if score == "kernel":  # |log r|, r <= 0 as the tiniest positive r, in steps of 2^-12
                    w = max(float(f @ fk[b, h, i]), torch.finfo(torch.float64).tiny)
                    return round(abs(math.log(w) - float(self_logit[b, h, i])) * 4096.0) / 4096.0
                resid = float((S.T @ f - (z @ f) * vv[b, h, i]).norm())
                den = float(z @ f) + (float(f @ fk[b, h, i]) if score == "recall" else 0.0)
                return resid / max(abs(den), DEN_EPS)

            for step in range(T + 1):
                j = step - window
                if j >= 0 and bool(keep[b, j]) and j >= sinks:
                    if len(slots) < cache:
                        slots.append(j)
                    else:
                        cands = slots + [j]
                        errs = [err(i) for i in cands]
                        loser = cands[min(range(len(cands)), key=lambda i: (errs[i], i))]
                        S = S + torch.outer(fk[b, h, loser], vv[b, h, loser])
                        z = z + fk[b, h, loser]
                        if loser != j:  # the slots stay in arrival order
                            slots.remove(loser)
                            slots.append(j)
                if step < T:
                    exact[b, h, step, slots] = True
            cached[b].append(slots)
    visible = (diff >= 0)[None, None] & keep[:, None, None, :]  # [B, 1, T, T]
    w = torch.where(exact[:, :, None], torch.exp(logit), est) * visible[:, :, None]
    o = (w @ vv[:, :, None]) / (w.sum(-1, keepdim=True)).abs().clamp_min(DEN_EPS)
    return o.flatten(1, 2).transpose(1, 2), cached
