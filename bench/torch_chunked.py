"""A careful pure-PyTorch random-feature attention (positive exponential features: posrf, oprf, gerf with
s=+1, either kernel): the baseline a user would write without this library, a peer of bench_cpu.py and
bench/report.py. Entry points take the resolved ``FeatureParams`` of a ``RandomFeatureMap``.

Batched matmuls over every (batch, head, chunk) at once, in-place exponentials, the feature map computed
once for the whole sequence. Stabilisers: each query row subtracts its own maximum; keys subtract one
maximum over the whole sequence (cheaper than a running maximum, and fine for a single pass). Causal
attention is chunked: intra-chunk masked products plus an exclusive prefix sum of per-chunk states.
"""

from __future__ import annotations

import math

import torch

from spectraformer_fused.components import EXP
from spectraformer_fused.feature_map import FeatureParams


def _check(params: FeatureParams) -> None:
    if params.kind != EXP or params.psi is not None:
        raise NotImplementedError("torch_chunked covers exponential features without psi (posrf, oprf, gerf s=+1)")


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
    _check(params)
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
