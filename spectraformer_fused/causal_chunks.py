"""The causal chunk walk of the reference backend, batched over the chunks with a hand-written backward.

``reference_attention(causal=True)`` computes the features of the whole sequence with autograd (so the
feature map, W and the bias are differentiated by PyTorch as before), then this module does what its
chunk loop did, with the same stabilisers: the keys of chunk c subtract ``shift_c``, the running maximum
of the key exponents after chunk c (from the initial state's log-scale), and the carried state is moved
to it by ``alpha_c = exp(m_{c-1} - shift_c)`` (0 while it is empty). Every chunk's intra-chunk products
and state read run as one batched matmul; only the state recurrence ``S_c = alpha_c S_{c-1} + phik_c^T v_c``
is a loop over the chunks (on ``[B, H_kv, F, Dv]`` tensors), forward and backward. The autograd graph is
a handful of nodes instead of some thirty per chunk, and memory stays O(T) (the states entering each
chunk, ``T / chunk`` of ``[F, Dv]``, are saved; the intra-chunk scores are recomputed in the backward).
"""

from __future__ import annotations

import torch

from .state import safe_log_scale


class _ChunkScan(torch.autograd.Function):
    """(phiq [B, Hk, G, N, C, F], phik [B, Hk, N, C, F], v [B, Hk, N, C, Dv], S0, z0, alpha [B, Hk, N]) ->
    (num [B, Hk, G, N, C, Dv], den [B, Hk, G, N, C], S, z): the causal linear attention of stabilised
    features chunk by chunk, the state rescaled by alpha_c before chunk c reads it."""

    @staticmethod
    def forward(ctx, phiq, phik, v, S, z, alpha):
        # S and z carried as one [F, Dv + 1] state (z the last column): one op per chunk of the recurrence
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
        kv = phik.transpose(-1, -2) @ v1  # [B, Hk, N, F, Dv + 1]: each chunk's keys
        Sz = torch.cat([S, z[..., None]], -1)
        Sp = kv.new_empty(kv.shape)  # the states before each chunk
        for c in range(phik.shape[2]):
            Sp[:, :, c] = Sz
            Sz = torch.addcmul(kv[:, :, c], Sz, alpha[:, :, c, None, None])
        S_in = Sp * alpha[..., None, None]
        scores = (phiq @ phik[:, :, None].transpose(-1, -2)).tril_()  # [B, Hk, G, N, C, C]: key j <= query t
        nd = scores @ v1[:, :, None] + phiq @ S_in[:, :, None]
        ctx.save_for_backward(phiq, phik, v, Sp, alpha)
        return nd[..., :-1], nd[..., -1], Sz[..., :-1], Sz[..., -1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dnum, dden, dS, dz):
        phiq, phik, v, Sp, alpha = ctx.saved_tensors
        if dnum is None:
            dnum = phiq.new_zeros(*phiq.shape[:-1], v.shape[-1])
        if dden is None:
            dden = phiq.new_zeros(phiq.shape[:-1])
        S_in = Sp * alpha[..., None, None]
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)[:, :, None]
        dnd = torch.cat([dnum, dden[..., None]], -1)  # [B, Hk, G, N, C, Dv + 1]
        # P[t, j] = dnum_t . v_j + dden_t for j <= t
        P = (dnd @ v1.transpose(-1, -2)).tril_()
        dphiq = P @ phik[:, :, None]
        dphiq += dnd @ S_in[:, :, None].transpose(-1, -2)
        dphik = (P.transpose(-1, -2) @ phiq).sum(2)
        scores = (phiq @ phik[:, :, None].transpose(-1, -2)).tril_()
        dv = (scores.transpose(-1, -2) @ dnum).sum(2)
        d_local = (phiq.transpose(-1, -2) @ dnd).sum(2)  # [B, Hk, N, F, Dv + 1]: what each chunk's queries read
        # the gradient of the state after a chunk, carried backwards
        dSa = Sp.new_zeros(Sp[:, :, 0].shape)
        if dS is not None:
            dSa[..., :-1] = dS
        if dz is not None:
            dSa[..., -1] = dz
        N = phik.shape[2]
        dkv, d_tot = torch.empty_like(Sp), torch.empty_like(Sp)
        for c in range(N - 1, -1, -1):
            dkv[:, :, c] = dSa
            torch.add(d_local[:, :, c], dSa, out=d_tot[:, :, c])
            dSa = d_tot[:, :, c] * alpha[:, :, c, None, None]
        dphik += v1[:, :, 0] @ dkv.transpose(-1, -2)
        dv += phik @ dkv[..., :-1]
        dalpha = (d_tot * Sp).sum((-1, -2)) if ctx.needs_input_grad[5] else None
        return dphiq, dphik, dv, dSa[..., :-1], dSa[..., -1], dalpha


def causal_chunks(phiq, ek, mk, v, S, z, m, chunk: int):
    """Causal attention of the stabilised query features ``phiq [B, Hk, G, T, F]`` and the key exponents
    ``ek [B, Hk, T, F]`` (-inf for masked keys; ``mk`` the TRIG factors or None), values ``v [B, Hk, T, Dv]``
    and the initial state (S, z, m) relative to its log-scale m. Returns ``(num [B, Hk, G, T, Dv],
    den [B, Hk, G, T], S, z, m)`` as the reference's chunk loop computed them: the same stabilisers, the
    final state relative to the last chunk's."""
    B, Hk, G, T, F = phiq.shape
    N = -(-T // chunk)
    pad = N * chunk - T
    if pad:
        phiq = torch.nn.functional.pad(phiq, (0, 0, 0, pad))
        ek = torch.nn.functional.pad(ek, (0, 0, 0, pad), value=float("-inf"))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        mk = None if mk is None else torch.nn.functional.pad(mk, (0, 0, 0, pad))
    ek = ek.unflatten(2, (N, chunk))  # [B, Hk, N, C, F]
    m_all = torch.maximum(m[..., None], torch.cummax(ek.detach().amax((-1, -2)), -1).values)  # [B, Hk, N]
    shift = safe_log_scale(m_all)
    alpha = torch.exp(torch.cat([m[..., None], m_all[..., :-1]], -1) - shift)  # 0 while the state is empty
    phik = torch.exp(ek - shift[..., None, None])
    if mk is not None:
        phik = phik * mk.unflatten(2, (N, chunk))
    num, den, S, z = _ChunkScan.apply(phiq.unflatten(3, (N, chunk)), phik, v.unflatten(2, (N, chunk)), S, z, alpha)
    return num.flatten(3, 4)[:, :, :, :T], den.flatten(3, 4)[:, :, :, :T], S, z, m_all[..., -1]
