"""Hedgehog's per-row log-sum-exp (kind NORM_HYP: phi = softmax over the row's 2m HYP exponents) where
the kernels do not hold a whole row: its gradient, and its value for the hybrid window's query rows.

The forward kernels subtract each key's lse, computed by the stabiliser pass; their backward gives
dL/dlse per key (``_rf_bwd_dkv_kernel``'s HAS_LSE) with the lse held constant. ``lse_grads`` adds what the lse
itself contributes, d lse / d e = softmax(e): one more pass over the rows, in blocks of ``ROWS`` rows, whose
exponents are recomputed and dropped block by block (a ``[ROWS, 2m]`` tile per head, never ``[T, 2m]``).
"""

from __future__ import annotations

import math

import torch

from ...components import feature_logits
from ...contract import HYP

ROWS = 512


def _blocks(x, cu):
    """(parameter rows, token rows) of each block of at most ROWS tokens: the whole batch (dense; parameter
    row b is batch row b), or one packed sequence (``cu``; batch 1) with its own parameter row."""
    T = x.shape[1]
    if cu is None:
        spans = [(slice(None), 0, T)]
    else:
        offsets = [int(c) for c in cu.tolist()]
        spans = [(slice(n, n + 1), a, b) for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))]
    for rows, a, b in spans:
        for lo in range(a, b, ROWS):
            yield rows, slice(lo, min(lo + ROWS, b))


def _per_row_head(W, bias, freq, psi, G):
    """The parameters per key/value head repeated over each group of G query heads (W ``[1, m, D]``, shared
    by every head, or None, as it is)."""
    if G == 1:
        return W, bias, freq, psi
    W = W.repeat_interleave(G, 0) if W is not None and W.shape[0] > 1 else W
    psi = None if psi is None else psi.repeat_interleave(G, 1)
    return W, bias.repeat_interleave(G, 1), freq.repeat_interleave(G, 1), psi


def _logits(x, W, bias, freq, psi, G, *, c_t, c_o, root, query):
    """HYP exponents ``[b, Hx, t, 2m]`` of raw rows x ``[b, t, Hx, D]``; the parameters per key/value head
    (``_per_row_head``)."""
    W, bias, freq, psi = _per_row_head(W, bias, freq, psi, G)
    xs = (x.float() * root).transpose(1, 2)
    return feature_logits(xs, W, bias, freq, psi, kind=HYP, c_t=c_t, c_o=c_o, query=query)[0]


def row_lse(x, W, bias, freq, psi, *, c_t, c_o, scale, query, cu=None):
    """``[B, Hx, T]`` fp32: each row's log-sum-exp over its 2m HYP exponents (not differentiated). x ``[B, T,
    Hx, D]`` raw (Hx = Hk G query heads or Hk key heads); W ``[Hk, m, D]`` or ``[1, m, D]``, bias ``[R, Hk,
    m]``, freq ``[R, Hk]``, psi ``[R, Hk, D]`` or None, R = B or (``cu``, B = 1) one row per sequence."""
    G = x.shape[2] // bias.shape[1]
    out = torch.empty(x.shape[0], x.shape[2], x.shape[1], dtype=torch.float32, device=x.device)
    root = math.sqrt(scale)
    with torch.no_grad():
        for rows, t in _blocks(x, cu):
            e = _logits(x[:, t], W, bias[rows], freq[rows], None if psi is None else psi[rows], G, c_t=c_t,
                        c_o=c_o, root=root, query=query)  # fmt: skip
            out[:, :, t] = torch.logsumexp(e, -1)
    return out


def lse_grads(x, dlse, W, bias, freq, psi, *, c_t, c_o, scale, query, cu=None):
    """The gradients of ``sum(dlse * lse(x))`` (``row_lse``'s arguments; dlse ``[B, Hx, T]``; W ``[Hk, m,
    D]``): ``(dx [B, T, Hx, D], dW [Hk, m, D], dbias [R, Hk, m])``, fp32; freq and psi are constants, as
    everywhere. Written out (no autograd: the kernels' backward runs below it): with e = [b + u + r,
    b - u + r], u = freq W x', r = c_t |x'|^2 + c_o |x|^2 and w = dlse softmax(e) = [wa, wb]: dbias = wa + wb,
    du = wa - wb, dr = dlse (the softmax sums to 1)."""
    Hk = bias.shape[1]
    G = x.shape[2] // Hk
    root = math.sqrt(scale)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    Wh = _per_row_head(W.float(), bias, freq, psi, G)[0]  # [Hx, m, D]
    M = W.shape[1]
    dW = torch.zeros(Wh.shape, dtype=torch.float32, device=x.device)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=x.device)
    for rows, t in _blocks(x, cu):
        p_h = None if psi is None else psi[rows].float()
        _, b_h, f_h, p_h = _per_row_head(None, bias[rows].float(), freq[rows].float(), p_h, G)
        xs = (x[:, t].float() * root).transpose(1, 2)  # [b, Hx, t, D]
        xt = xs if p_h is None else (xs * p_h[:, :, None] if query else xs / p_h[:, :, None])
        e = feature_logits(xs, Wh, b_h, f_h, p_h, kind=HYP, c_t=c_t, c_o=c_o, query=query)[0]
        g = dlse[:, :, t]  # [b, Hx, t]
        w = torch.softmax(e, -1) * g[..., None]
        wa, wb = w[..., :M], w[..., M:]
        du = (wa - wb) * f_h[:, :, None, None]  # [b, Hx, t, m]
        dxt = torch.einsum("bhtm,hmd->bhtd", du, Wh.expand(xt.shape[1], -1, -1))
        dW += torch.einsum("bhtm,bhtd->hmd", du, xt)
        if c_t != 0.0:
            dxt = dxt + 2.0 * c_t * xt * g[..., None]
        dxs = dxt if p_h is None else (dxt * p_h[:, :, None] if query else dxt / p_h[:, :, None])
        if c_o != 0.0:
            dxs = dxs + 2.0 * c_o * xs * g[..., None]
        dx[:, t] += (dxs * root).transpose(1, 2)
        db = wa + wb  # [b, Hx, t, m]
        db = db.sum(2)
        dbias[rows] += db.unflatten(1, (Hk, G)).sum(2) if G > 1 else db
    if G > 1:
        dW = dW.unflatten(0, (Hk, G)).sum(1)
    return dx, dW, dbias


def add_key_lse_grads(dlse_part, k, W, bias, freq, psi, dk, dW, dbias, *, H, c_t, c_o, scale, cu=None):
    """The kernels' key gradients ``(dk, dW, dbias)`` plus what each key's lse contributes, from the
    backward kernels' dL/dlse partials ``[frequency tiles, B x H, T]`` (one row per query head: summed over
    the tiles and over each group of H / Hk query heads here). W ``[Hk, m, D]``."""
    B, T, Hk = k.shape[0], k.shape[1], k.shape[2]
    dlse = dlse_part.sum(0).view(B, H, T)
    if H > Hk:
        dlse = dlse.unflatten(1, (Hk, H // Hk)).sum(2)
    gk, gW, gb = lse_grads(k, dlse, W, bias, freq, psi, c_t=c_t, c_o=c_o, scale=scale, query=False, cu=cu)
    return dk + gk, dW + gW, dbias + gb
