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
        kv = phik.transpose(-1, -2) @ v  # [B, Hk, N, F, Dv]: each chunk's keys
        ks = phik.sum(-2)  # [B, Hk, N, F]
        S_prev, z_prev = [], []
        for c in range(phik.shape[2]):
            S_prev.append(S)
            z_prev.append(z)
            a = alpha[:, :, c]
            S = S * a[..., None, None] + kv[:, :, c]
            z = z * a[..., None] + ks[:, :, c]
        Sp, zp = torch.stack(S_prev, 2), torch.stack(z_prev, 2)  # the states before each chunk
        S_in, z_in = Sp * alpha[..., None, None], zp * alpha[..., None]
        scores = (phiq @ phik[:, :, None].transpose(-1, -2)).tril_()  # [B, Hk, G, N, C, C]: key j <= query t
        num = scores @ v[:, :, None] + phiq @ S_in[:, :, None]
        den = scores.sum(-1) + (phiq @ z_in[:, :, None, :, :, None]).squeeze(-1)
        ctx.save_for_backward(phiq, phik, v, Sp, zp, alpha)
        return num, den, S, z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dnum, dden, dS, dz):
        phiq, phik, v, Sp, zp, alpha = ctx.saved_tensors
        if dnum is None:
            dnum = phiq.new_zeros(*phiq.shape[:-1], v.shape[-1])
        if dden is None:
            dden = phiq.new_zeros(phiq.shape[:-1])
        S_in, z_in = Sp * alpha[..., None, None], zp * alpha[..., None]
        vg = v[:, :, None]
        # P[t, j] = dnum_t . v_j + dden_t for j <= t
        P = (dnum @ vg.transpose(-1, -2)).add_(dden[..., None]).tril_()
        dphiq = P @ phik[:, :, None]
        dphiq += dnum @ S_in[:, :, None].transpose(-1, -2)
        dphiq += dden[..., None] * z_in[:, :, None, :, None, :]
        dphik = (P.transpose(-1, -2) @ phiq).sum(2)
        scores = (phiq @ phik[:, :, None].transpose(-1, -2)).tril_()
        dv = (scores.transpose(-1, -2) @ dnum).sum(2)
        dS_local = (phiq.transpose(-1, -2) @ dnum).sum(2)  # [B, Hk, N, F, Dv]: what each chunk's queries read
        dz_local = (phiq * dden[..., None]).sum(2).sum(-2)  # [B, Hk, N, F]
        dSa = torch.zeros_like(Sp[:, :, 0]) if dS is None else dS  # the gradient of the state after a chunk
        dza = torch.zeros_like(zp[:, :, 0]) if dz is None else dz
        N = phik.shape[2]
        dkv, dks, dS_tot, dz_tot = [None] * N, [None] * N, [None] * N, [None] * N
        for c in range(N - 1, -1, -1):
            dkv[c], dks[c] = dSa, dza
            dS_tot[c], dz_tot[c] = dS_local[:, :, c] + dSa, dz_local[:, :, c] + dza
            a = alpha[:, :, c]
            dSa, dza = dS_tot[c] * a[..., None, None], dz_tot[c] * a[..., None]
        dkv, dks = torch.stack(dkv, 2), torch.stack(dks, 2)
        dphik += v @ dkv.transpose(-1, -2)
        dphik += dks[..., None, :]
        dv += phik @ dkv
        dalpha = None
        if ctx.needs_input_grad[5]:
            dalpha = (torch.stack(dS_tot, 2) * Sp).sum((-1, -2)) + (torch.stack(dz_tot, 2) * zp).sum(-1)
        return dphiq, dphik, dv, dSa, dza, dalpha


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
