"""The peers and baselines the benchmarks time or check beside the library: the report's speed section
(``PEERS``), ``bench/perf/gpu.py`` (``FLA_KERNELS``), ``bench/perf/cpu.py`` (``chunked_attention``,
``decode_step``) and the sliding-window baseline of the hybrid (``window_exact_attention``).

Every peer takes q, k, v ``[B, T, H, D]`` (the library's layout) and returns ``[B, T, H, Dv]``; a peer
that cannot be used in this process is reported by ``Peer.skip_reason`` instead of raising. Each external
peer is an optional import; the torch-chunked peer is written here.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import spectraformer_fused as sf
from spectraformer_fused.components import EXP, TRIG, feature_logits
from spectraformer_fused.feature_map import FeatureParams


@dataclass
class Peer:
    """A named implementation. ``make(fm, causal)`` returns ``fn(q, k, v) -> o`` or raises."""

    name: str
    make: Callable | None
    skip_reason: str | None = None
    exact: bool = False


@dataclass(frozen=True)
class PeerSpec:
    """One declared peer: the callable ``module.attr`` it times and ``build(fn, fm, causal) -> fn(q, k, v)``,
    which wraps that callable for the library's layout. ``check`` (optional) returns why the loaded peer
    cannot be used here, or None; ``install`` is the pip name printed when the import fails."""

    name: str
    module: str
    attr: str
    build: Callable
    exact: bool = False
    cuda_only: bool = False
    install: str | None = None
    check: Callable | None = None


def load(spec: PeerSpec):
    """The peer's callable; ImportError naming ``module.attr`` (and what to install) when it is missing."""
    try:
        mod = importlib.import_module(spec.module)
    except Exception as exc:
        hint = f"; pip install {spec.install}" if spec.install else ""
        raise ImportError(f"{spec.module} not importable ({type(exc).__name__}: {exc}){hint}") from exc
    fn = getattr(mod, spec.attr, None)
    if not callable(fn):
        raise ImportError(f"{spec.module} has no callable {spec.attr!r} (another version of it?)")
    return fn


def maker(spec: PeerSpec) -> Callable:
    """``make(fm, causal) -> fn(q, k, v)`` for a peer: loads its callable, then wraps it."""
    return lambda fm, causal: spec.build(load(spec), fm, causal)


# ----------------------------------------------------------------------------------------------------
# torch SDPA: exact softmax attention (FlashAttention / memory-efficient kernels on CUDA)
# ----------------------------------------------------------------------------------------------------


def _make_sdpa(sdpa, fm, causal):
    def run(q, k, v):
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)

    return run


# ----------------------------------------------------------------------------------------------------
# Sliding-window attention: the exact kernel over the keys inside each query's window (the baseline of the
# hybrid, DESIGN.md section 6; bench/report/window.py, bench/perf/gpu.py and the task model's softmax@w<W>)
# ----------------------------------------------------------------------------------------------------


def band_mask(T: int, window: int, causal: bool, device=None) -> torch.Tensor:
    """``[T, T]`` bool, True where key j is inside query t's window of W keys (DESIGN.md section 6):
    causal t - W < j <= t, non-causal |t - j| < W."""
    t = torch.arange(T, device=device)
    diff = t[:, None] - t[None, :]
    return ((diff >= 0) & (diff < window)) if causal else diff.abs() < window


def window_exact_attention(q, k, v, *, window: int, causal: bool, kernel: str = "softmax"):
    """Sliding-window attention ``[B, T, H, Dv]``: the exact kernel over the keys inside each query's window
    (causal t - W < j <= t, non-causal |t - j| < W), normalised over them; softmax through SDPA with the band
    as its mask."""
    mask = band_mask(q.shape[1], window, causal, q.device)
    if kernel == "softmax":
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)
    logits = sf.reference.exact_logits(q, k, kernel=kernel).masked_fill(~mask, float("-inf"))
    return (torch.softmax(logits, -1) @ v.transpose(1, 2)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# performer-pytorch's FastAttention (FAVOR+ = posrf x orf)
# ----------------------------------------------------------------------------------------------------


def _make_performer(FastAttention, fm, causal):
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice when its CUDA kernel is missing
        attn = FastAttention(dim_heads=fm.head_dim, nb_features=fm.num_features, causal=causal)
    attn = attn.to(fm.projection().device)
    return lambda q, k, v: attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# torch-chunked: a careful pure-PyTorch random-feature attention (positive exponential features: posrf,
# oprf, gerf with s=+1, either kernel), the baseline a user would write without this library. Entry points
# take the resolved ``FeatureParams`` of a ``RandomFeatureMap``.
#
# Batched matmuls over every (batch, head, chunk) at once, in-place exponentials, the feature map computed
# once for the whole sequence. Stabilisers: each query row subtracts its own maximum; keys subtract one
# maximum over the whole sequence (cheaper than a running maximum, and fine for a single pass). Causal
# attention is chunked: intra-chunk masked products plus an exclusive prefix sum of per-chunk states.
# ----------------------------------------------------------------------------------------------------


def _check_exp(params: FeatureParams) -> None:
    if params.kind != EXP or params.psi is not None:
        raise NotImplementedError(
            "the torch-chunked peer covers exponential features without psi (posrf, oprf, gerf s=+1)"
        )


def exp_features(x: torch.Tensor, p: FeatureParams, *, query: bool) -> torch.Tensor:
    """exp(bias + freq W x + (c_t + c_o) |x|^2 - max) for x ``[B, H, T, D]`` (already scaled) -> ``[B, H, T, m]``.
    In-place arithmetic when autograd is off (inference); out-of-place when it records a graph."""
    u = torch.matmul(x, p.W.transpose(-1, -2))  # [B, H, T, D] @ [H, D, m] -> [B, H, T, m]
    r = (p.c_t + p.c_o) * (x * x).sum(-1, keepdim=True)
    dims = -1 if query else (-1, -2)
    if not torch.is_grad_enabled():
        u.mul_(p.freq[:, :, None, None]).add_(p.bias[:, :, None, :]).add_(r)
        return u.sub_(u.amax(dim=dims, keepdim=True)).exp_()
    u = u * p.freq[:, :, None, None] + p.bias[:, :, None, :] + r
    return torch.exp(u - u.amax(dim=dims, keepdim=True).detach())


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: FeatureParams, *, causal: bool, chunk_size: int = 64
) -> torch.Tensor:
    """q, k ``[B, T, H, D]``, v ``[B, T, H, Dv]`` (fp32) -> o ``[B, T, H, Dv]``."""
    _check_exp(params)
    B, T, H, D = q.shape
    root = math.sqrt(params.scale)
    x = (q * root).transpose(1, 2)  # [B, H, T, D]
    y = (k * root).transpose(1, 2)
    vv = v.transpose(1, 2)  # [B, H, T, Dv]
    pq = exp_features(x, params, query=True)  # [B, H, T, m]
    pk = exp_features(y, params, query=False)
    if not causal:
        S = torch.matmul(pk.transpose(-1, -2), vv)  # [B, H, m, Dv]
        z = pk.sum(-2)  # [B, H, m]
        num = torch.matmul(pq, S)
        den = torch.matmul(pq, z.unsqueeze(-1))
        return (num / den.clamp_min(1e-30)).transpose(1, 2)
    C = chunk_size
    pad = (-T) % C
    if pad:
        pq = torch.nn.functional.pad(pq, (0, 0, 0, pad))
        pk = torch.nn.functional.pad(pk, (0, 0, 0, pad))
        vv = torch.nn.functional.pad(vv, (0, 0, 0, pad))
    N = (T + pad) // C
    m, Dv = pq.shape[-1], vv.shape[-1]
    pq = pq.reshape(B, H, N, C, m)
    pk = pk.reshape(B, H, N, C, m)
    vc = vv.reshape(B, H, N, C, Dv)
    kv = torch.matmul(pk.transpose(-1, -2), vc)  # [B, H, N, m, Dv]: per-chunk states
    ksum = pk.sum(-2)  # [B, H, N, m]
    S = kv.cumsum(2).sub_(kv)  # exclusive prefix: keys before the chunk
    z = ksum.cumsum(2).sub_(ksum)
    scores = torch.matmul(pq, pk.transpose(-1, -2)).tril_()  # [B, H, N, C, C]
    num = torch.matmul(scores, vc).add_(torch.matmul(pq, S))  # [B, H, N, C, Dv]
    den = scores.sum(-1).add_(torch.matmul(pq, z.unsqueeze(-1)).squeeze(-1))
    o = num.div_(den.clamp_min_(1e-30).unsqueeze(-1)).reshape(B, H, N * C, Dv)[:, :, :T]
    return o.transpose(1, 2)


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: FeatureParams,
    S: torch.Tensor,
    z: torch.Tensor,
    m: torch.Tensor,
):
    """One token of causal decoding with a carried, running-max-stabilised state (plain PyTorch).

    q, k ``[B, H, D]``, v ``[B, H, Dv]``, S ``[B, H, m, Dv]``, z ``[B, H, m]``, m ``[B, H]`` (the key
    stabiliser, -inf while empty). Returns (o ``[B, H, Dv]``, S, z, m), the state updated in place.
    """
    root = math.sqrt(params.scale)
    xy = torch.stack((q, k), dim=2).mul_(root)  # [B, H, 2, D]
    e = torch.matmul(xy, params.W.transpose(-1, -2))  # [B, H, 2, D] @ [H, D, m] -> [B, H, 2, m]
    e.mul_(params.freq[:, :, None, None]).add_(params.bias[:, :, None, :])
    e.add_((params.c_t + params.c_o) * (xy * xy).sum(-1, keepdim=True))
    eq, ek = e[:, :, 0], e[:, :, 1]
    pq = eq.sub_(eq.amax(-1, keepdim=True)).exp_()
    m_new = torch.maximum(m, ek.amax(-1))
    alpha = torch.exp(m - m_new)
    pk = ek.sub_(m_new.unsqueeze(-1)).exp_()
    z.mul_(alpha.unsqueeze(-1)).add_(pk)
    S.mul_(alpha[..., None, None]).add_(pk.unsqueeze(-1) * v.unsqueeze(-2))
    m.copy_(m_new)
    num = torch.matmul(pq.unsqueeze(-2), S).squeeze(-2)  # [B, H, Dv]
    den = (pq * z).sum(-1, keepdim=True)
    return num / den.clamp_min(1e-30), S, z, m


def _make_chunked(chunked_attention, fm, causal):
    scale = fm.head_dim**-0.5

    def run(q, k, v):
        return chunked_attention(q, k, v, fm.feature_params(q, k, scale=scale, causal=causal), causal=causal)

    return run


def _check_chunked(spec: PeerSpec) -> str | None:
    """None when the chunked peer matches the reference on a tiny input; else why not."""
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 40, 2, 16, generator=gen) for _ in range(3))
        fm = sf.RandomFeatureMap(16, 16, num_heads=2, seed=0)
        for causal in (False, True):
            o = maker(spec)(fm, causal)(q, k, v)
            ref = sf.rf_attention(q, k, v, fm, causal=causal, backend="reference")
            err = ((o - ref).norm() / ref.norm()).item()
            if not math.isfinite(err) or err > 1e-3:
                return f"{spec.module}.{spec.attr} disagrees with the reference (rel. err {err:.2e}, causal={causal})"
    except Exception as exc:
        return f"{spec.module}.{spec.attr} failed on a tiny input ({type(exc).__name__}: {exc})"
    return None


# ----------------------------------------------------------------------------------------------------
# flash-linear-attention's chunk_linear_attn, fed with PyTorch features (CUDA, causal only)
# ----------------------------------------------------------------------------------------------------


def torch_features(q, k, fm, *, causal: bool, scale: float | None = None):
    """phi(q), phi(k) ``[B, T, H, F]`` in plain PyTorch, with the reference's stabilisers (queries: own
    row max; keys: one max per (batch, head)); positive components only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = fm.feature_params(q, k, scale=scale, causal=causal)
    root = math.sqrt(scale)
    x, y = (t.float().transpose(1, 2) * root for t in (q, k))
    eq, _ = feature_logits(x, p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=True)
    ek, _ = feature_logits(y, p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=False)
    phiq = torch.exp(eq - eq.amax(-1, keepdim=True).detach())
    phik = torch.exp(ek - ek.amax(dim=(-1, -2), keepdim=True).detach())
    return phiq.transpose(1, 2), phik.transpose(1, 2)


def _make_fla(chunk_linear_attn, fm, causal):
    if not causal:
        raise ValueError("chunk_linear_attn is causal only")
    if fm.kind == TRIG:
        raise ValueError("fla peer needs a positive component")
    layout = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}

    def run(q, k, v):
        phiq, phik = torch_features(q, k, fm, causal=True)
        dt = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float32
        out = chunk_linear_attn(phiq.to(dt), phik.to(dt), v.to(dt), scale=1.0, normalize=True, **layout)
        return out[0] if isinstance(out, tuple) else out

    return run


# The peers of the report's speed section, in its order.
PEERS = (
    PeerSpec("torch-sdpa", "torch.nn.functional", "scaled_dot_product_attention", _make_sdpa, exact=True),
    PeerSpec("performer-pytorch", "performer_pytorch", "FastAttention", _make_performer, install="performer-pytorch"),
    PeerSpec("torch-chunked", "bench.peers", "chunked_attention", _make_chunked, check=_check_chunked),
    PeerSpec(
        "fla-chunk_linear_attn",
        "fla.ops.linear_attn",
        "chunk_linear_attn",
        _make_fla,
        cuda_only=True,
        install="flash-linear-attention",
    ),
)

# fla's two causal linear-attention kernels timed by bench/perf/gpu.py (row name -> peer).
FLA_KERNELS = {
    "fla-chunk": PeerSpec(
        "fla-chunk",
        "fla.ops.linear_attn",
        "chunk_linear_attn",
        _make_fla,
        cuda_only=True,
        install="flash-linear-attention",
    ),
    "fla-fused_chunk": PeerSpec(
        "fla-fused_chunk",
        "fla.ops.linear_attn",
        "fused_chunk_linear_attn",
        _make_fla,
        cuda_only=True,
        install="flash-linear-attention",
    ),
}


def skip_reason(spec: PeerSpec, device: torch.device) -> str | None:
    """Why the peer cannot run on ``device`` in this process, or None."""
    if spec.cuda_only and device.type != "cuda":
        return f"{spec.install or spec.module} needs CUDA"
    try:
        load(spec)
    except ImportError as exc:
        return str(exc)
    return spec.check(spec) if spec.check is not None else None


def peers(device: torch.device) -> list[Peer]:
    """Every peer of ``PEERS`` with the reason it is skipped in this process (None when usable)."""
    return [Peer(spec.name, maker(spec), skip_reason(spec, device), exact=spec.exact) for spec in PEERS]
