"""The Triton backend: ``rf_fwd`` / ``rf_bwd`` as ``torch.library`` custom ops joined by autograd.

The ops are opaque to ``torch.compile`` (their fake implementations give the shapes), so a compiled
model calls the kernels as they are. The forward saves its inputs, ``o``, the raw denominator, the
stabilisers (``qmax [B, H, T]``, ``kstab`` one per chunk) and the final state: O(T (D + Dv) + F Dv). The backward
recomputes every feature from them instead of saving any ``[T, F]`` tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...contract import FeatureParams, feature_width
from ...state import RFState
from .bwd import rf_bwd
from .chunk import chunk_bwd, chunk_fwd, chunk_size, requested_mode, resolve_mode
from .common import chunk_capacity, on_device_of, resource_errors
from .fwd import MAX_BM, default_chunk_size, rf_fwd

_FWD_OUT = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("spectraformer_fused::rf_fwd", mutates_args=())
def _rf_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    W: Tensor,
    bias: Tensor,
    freq: Tensor,
    psi: Optional[Tensor],
    mask: Optional[Tensor],
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    m0: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    kind: int,
    c_t: float,
    c_o: float,
    scale: float,
    causal: bool,
    chunk_size: int,
    mode: str,
) -> _FWD_OUT:
    """(o, den, qmax, kstab, S, z, m); the final state is always returned (it is O(F Dv) per head).
    mode: "walk" or "chunk" (causal only; triton_chunk.py). cu_seqlens: packed sequences (``rf_fwd``)."""
    inputs = (q, k, v, W, bias, freq, psi, mask, S0, z0, m0)
    kw = dict(kind=kind, c_t=c_t, c_o=c_o, scale=scale, output_final_state=True, chunk_size=chunk_size,
              cu_seqlens=cu_seqlens)  # fmt: skip
    with (
        on_device_of("q, k, v, W, bias, freq, psi, mask, S0, z0, m0, cu_seqlens", *inputs, cu_seqlens),
        resource_errors("forward", q.dtype, q.shape[-1], v.shape[-1]),
    ):
        if causal and mode == "chunk":
            out = chunk_fwd(*inputs, **kw)
        else:
            out = rf_fwd(*inputs, causal=causal, **kw)
    return out[:7]


@_rf_fwd_op.register_fake
def _(q, k, v, W, bias, freq, psi, mask, S0, z0, m0, cu_seqlens, kind, c_t, c_o, scale, causal, chunk_size, mode):
    B, T, H, _ = q.shape
    Hk = k.shape[2]  # grouped-query attention: kstab and the state per key/value head
    Dv = v.shape[-1]
    F = feature_width(kind, W.shape[1])
    f32 = dict(dtype=torch.float32, device=q.device)
    if cu_seqlens is None:
        NS, kstab = B, q.new_empty(B, Hk, triton.cdiv(T, chunk_size) if causal else 1, **f32)
    else:  # packed sequences: the states per sequence, kstab per chunk slot
        NS = cu_seqlens.shape[0] - 1
        kstab = (
            q.new_empty(1, Hk, chunk_capacity(T, NS, chunk_size), **f32) if causal else q.new_empty(NS, Hk, 1, **f32)
        )
    return (
        q.new_empty(B, T, H, Dv, dtype=v.dtype),
        q.new_empty(B, H, T, **f32),
        q.new_empty(B, H, T, **f32),
        kstab,
        q.new_empty(NS, Hk, F, Dv, **f32),
        q.new_empty(NS, Hk, F, **f32),
        q.new_empty(NS, Hk, **f32),
    )


@torch.library.custom_op("spectraformer_fused::rf_bwd", mutates_args=())
def _rf_bwd_op(
    do: Tensor,
    dS: Optional[Tensor],
    dz: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    W: Tensor,
    bias: Tensor,
    freq: Tensor,
    psi: Optional[Tensor],
    mask: Optional[Tensor],
    S0: Optional[Tensor],
    z0: Optional[Tensor],
    m0: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    o: Tensor,
    den: Tensor,
    qmax: Tensor,
    kstab: Tensor,
    S: Tensor,
    z: Tensor,
    kind: int,
    c_t: float,
    c_o: float,
    scale: float,
    causal: bool,
    chunk_size: int,
    mode: str,
) -> _FWD_OUT:
    """(dq, dk, dv, dW [H, m, D], dbias, dS0, dz0); dS0 and dz0 are empty without an initial state."""
    with (
        on_device_of("q, do, k, v, W, bias", q, do, k, v, W, bias),
        resource_errors("backward", q.dtype, q.shape[-1], v.shape[-1]),
    ):
        inputs = (do, dS, dz, q, k, v, W, bias, freq, psi, mask, S0, z0, m0, o, den, qmax, kstab)
        kw = dict(kind=kind, c_t=c_t, c_o=c_o, scale=scale, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
        if causal and mode == "chunk":
            dq, dk, dv, dW, dbias, dS0, dz0 = chunk_bwd(*inputs, **kw)
        else:
            dq, dk, dv, dW, dbias, dS0, dz0 = rf_bwd(*inputs, S, z, causal=causal, **kw)
    if dS0 is None:
        dS0, dz0 = q.new_zeros(0, dtype=torch.float32), q.new_zeros(0, dtype=torch.float32)
    return dq, dk, dv, dW, dbias, dS0, dz0


@_rf_bwd_op.register_fake
def _(
    do,
    dS,
    dz,
    q,
    k,
    v,
    W,
    bias,
    freq,
    psi,
    mask,
    S0,
    z0,
    m0,
    cu_seqlens,
    o,
    den,
    qmax,
    kstab,
    S,
    z,
    kind,
    c_t,
    c_o,
    scale,
    causal,
    chunk_size,
    mode,
):
    f32 = dict(dtype=torch.float32, device=q.device)
    ds0 = q.new_empty(S0.shape, **f32) if S0 is not None else q.new_empty(0, **f32)
    dz0 = q.new_empty(z0.shape, **f32) if z0 is not None else q.new_empty(0, **f32)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty(W.shape, **f32),
        q.new_empty(bias.shape, **f32),
        ds0,
        dz0,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, W, bias, freq, psi, mask, S0, z0, m0, cu_seqlens, kind, c_t, c_o, scale, causal, chunk_size, mode = inputs
    o, den, qmax, kstab, S, z = output[:6]
    # Saved: inputs, o, the stabilisers and the final state (O(F Dv) per head: the non-causal backward's
    # state); the features are recomputed in the backward.
    ctx.save_for_backward(q, k, v, W, bias, freq, psi, mask, S0, z0, m0, cu_seqlens, o, den, qmax, kstab, S, z)
    ctx.meta = (kind, c_t, c_o, scale, causal, chunk_size, mode)
    ctx.has_s0 = S0 is not None


def _backward(ctx, do, dden, dqmax, dkstab, dS, dz, dm):
    q, k, v, W, bias, freq, psi, mask, S0, z0, m0, cu_seqlens, o, den, qmax, kstab, S, z = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dW, dbias, dS0, dz0 = torch.ops.spectraformer_fused.rf_bwd(
        do, dS, dz, q, k, v, W, bias, freq, psi, mask, S0, z0, m0, cu_seqlens, o, den, qmax, kstab, S, z, *ctx.meta
    )
    if not ctx.has_s0:
        dS0 = dz0 = None
    return dq, dk, dv, dW, dbias, None, None, None, dS0, dz0, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("spectraformer_fused::rf_fwd", _backward, setup_context=_setup_context)


def causal_mode(q: Tensor, v: Tensor, m: int, causal: bool, num_seqs: int | None = None) -> str:
    """ "walk" or "chunk": SPECTRAFORMER_FUSED_TRITON_MODE (auto, walk, chunk; default auto) with "auto"
    resolved by ``triton_chunk.choose_mode`` from the walk's program count (B x H query heads, with or
    without grouped-query attention). "walk" when not causal (the non-causal forward already splits the
    chunks into ranges). Packed sequences (``num_seqs``): the walk runs one program set per sequence, the
    typical length is the mean one."""
    mode = requested_mode()
    if not causal:
        return "walk"
    B, T, H, _ = q.shape
    if num_seqs is not None:
        B, T = num_seqs, T // max(1, num_seqs)
    walk_programs = (
        B * H * triton.cdiv(m, min(MAX_BM, max(16, triton.next_power_of_2(m)))) * triton.cdiv(v.shape[-1], 64)
    )
    return resolve_mode(mode, walk_programs, T, q.device)


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: FeatureParams,
    *,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    initial_state: Optional[RFState],
    output_final_state: bool,
    cu_seqlens: Optional[Tensor] = None,
    window: Optional[int] = None,
    sinks: int = 0,
):
    """Random-feature attention with the Triton kernels; the reference's semantics and signature.

    ``window`` (the hybrid sliding window, docs/DESIGN.md section 6): ``ops/triton/window.py`` (the fused
    causal kernels for the feature part, the band's exact logits beside them); the state is then a
    ``WindowState``. Hedgehog (kind NORM_HYP) runs fused too: HYP's kernels with each key's log-sum-exp
    subtracted (HAS_LSE; the stabiliser pass computes it, ``row_lse`` adds its gradient).

    k, v and the parameters may have fewer heads than q (grouped-query attention; see ``rf_fwd``).
    Returns ``(o [B, T, H, Dv] in v's dtype, RFState (fp32) or None)``. Differentiable in q, k, v,
    W, bias and the initial state's S and z.

    ``cu_seqlens`` (int32 ``[N + 1]``, validated by the caller): packed variable-length sequences. q, k, v
    are ``[1, Ttot, ., .]``, the parameters' batch axis and the states' are the sequence axis (N rows);
    every sequence runs as if alone (its own stabilisers, initial and final state), all in one set of
    kernel launches, causal or not, walk or chunk mode.
    """
    num_seqs = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if window is not None:
        from .window import triton_window_attention

        return triton_window_attention(
            q,
            k,
            v,
            params,
            causal=causal,
            window=window,
            key_padding_mask=key_padding_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous(),
            mode=causal_mode(q, v, params.W.shape[1], True, num_seqs),
            sinks=sinks,
        )
    if initial_state is not None:
        S0, z0, m0 = (t.float().contiguous() for t in initial_state)
    else:
        S0 = z0 = m0 = None
    psi = None if params.psi is None else params.psi.float().contiguous()
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    mode = causal_mode(q, v, params.W.shape[1], causal, num_seqs)
    chunk = chunk_size(q.shape[1]) if mode == "chunk" else default_chunk_size(q.shape[1])
    o, _, _, _, S, z, m = torch.ops.spectraformer_fused.rf_fwd(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        params.W.float(),
        params.bias.float().contiguous(),
        params.freq.float().contiguous(),
        psi,
        mask,
        S0,
        z0,
        m0,
        cu_seqlens,
        int(params.kind),
        float(params.c_t),
        float(params.c_o),
        float(params.scale),
        bool(causal),
        chunk,
        mode,
    )
    return o, (RFState(S, z, m) if output_final_state else None)
