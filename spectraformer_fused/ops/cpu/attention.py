"""The compiled CPU backend's plain attention: the autograd of ``csrc/rf_attention.cpp`` and
``csrc/rf_backward.cpp``; ``cpu_attention`` hands a hybrid call (``window=``) to ``ops.cpu.window``.

How the extension is built, cached and loaded is ``ops.cpu.extension`` (its public functions are
re-exported here: ``extension_available``, ``extension_built``, ``extension_error``, ``extension_status``,
``extension_spec``). SPECTRAFORMER_FUSED_NO_CPU_EXT=1 skips the extension altogether.
"""

from __future__ import annotations

import torch

from ...contract import DEN_EPS, EXP, HYP, NORM_HYP, TRIG, FeatureParams
from ...reference import reference_grads
from ...state import RFState
from .extension import (
    EXTENSION_NAME,
    SKIP_ENV,
    _load,
    _transposed,
    extension_available,
    extension_built,
    extension_error,
    extension_spec,
    extension_status,
)

# the binding's public names, re-exported (``ops.cpu`` is where callers have always found them)
__all__ = [
    "EXTENSION_NAME",
    "SKIP_ENV",
    "cpu_attention",
    "extension_available",
    "extension_built",
    "extension_error",
    "extension_spec",
    "extension_status",
    "reference_grads",
    "FUSED_BACKWARD_KINDS",
]


def _forward(ext, q, k, v, params: FeatureParams, causal, mask, S0, z0, m0, cu_seqlens):
    # Called with grad disabled (inside the autograd Function) or with no input requiring grad, so the
    # extension records no graph and nothing needs detaching.
    W = params.W
    return ext.forward(
        q,
        k,
        v,
        W,
        params.bias,
        params.freq,
        params.psi,
        int(params.kind),
        float(params.c_t),
        float(params.c_o),
        float(params.scale),
        bool(causal),
        mask,
        S0,
        z0,
        m0,
        DEN_EPS,
        _transposed(W),
        cu_seqlens,
    )


class _CpuAttention(torch.autograd.Function):
    """Forward and backward in C++ (``csrc/rf_backward.cpp``). The forward saves its inputs and, when
    non-causal, its final state (read again by the backward's queries); the backward recomputes every
    feature chunk by chunk from them. The kinds without a fused backward, and a ``log_scale`` of the
    initial state that requires grad, recompute through the reference backend instead (``reference_grads``)."""

    @staticmethod
    def forward(ctx, q, k, v, W, bias, S0, z0, m0, params, causal, mask, cu_seqlens):
        ext = _load()
        o, S, z, m = _forward(ext, q, k, v, params, causal, mask, S0, z0, m0, cu_seqlens)
        final = (None, None, None) if causal else (S, z, m)
        ctx.save_for_backward(q, k, v, W, bias, S0, z0, m0, *final)
        ctx.params, ctx.causal, ctx.mask, ctx.cu_seqlens = params, causal, mask, cu_seqlens
        ctx.has_state = S0 is not None
        ctx.mark_non_differentiable(m)
        ctx.set_materialize_grads(False)
        return o, S, z, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS, dz, _dm):
        q, k, v, W, bias, S0, z0, m0, Sf, zf, mf = ctx.saved_tensors
        p = ctx.params
        inputs = (q, k, v, W, bias, S0, z0, m0)
        if p.kind not in FUSED_BACKWARD_KINDS or (m0 is not None and m0.requires_grad):
            grads = reference_grads(
                ctx.params,
                inputs,
                (do, dS, dz),
                lambda st: RFState(*st) if ctx.has_state else None,
                causal=ctx.causal,
                key_padding_mask=ctx.mask,
                cu_seqlens=ctx.cu_seqlens,
            )
            return (*grads, None, None, None, None)
        if do is None:
            do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype)
        dq, dk, dv, dW, dbias, dS0, dz0 = _load().backward(
            do,
            dS,
            dz,
            q,
            k,
            v,
            W,
            bias,
            p.freq,
            p.psi,
            int(p.kind),
            float(p.c_t),
            float(p.c_o),
            float(p.scale),
            bool(ctx.causal),
            ctx.mask,
            S0,
            z0,
            m0,
            Sf,
            zf,
            mf,
            DEN_EPS,
            ctx.cu_seqlens,
        )
        grads = (dq, dk, dv, dW.sum_to_size(W.shape), dbias.sum_to_size(bias.shape), dS0, dz0, None)
        result = [
            g.to(t.dtype) if t is not None and t.requires_grad and g is not None else None
            for g, t in zip(grads, inputs)
        ]
        return (*result, None, None, None, None)


# The kinds whose backward is fused (csrc/rf_backward.cpp); the others recompute through the reference.
FUSED_BACKWARD_KINDS = (EXP, HYP, TRIG, NORM_HYP)


def cpu_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    causal: bool,
    key_padding_mask=None,
    initial_state: RFState | None = None,
    output_final_state: bool = False,
    cu_seqlens=None,
    window: int | None = None,
    sinks: int = 0,
):
    """Random-feature attention with the reference's semantics, computed by the compiled CPU extension.

    q, k ``[B, T, H, D]`` (fp32, bf16 or fp16), v ``[B, T, H_kv, Dv]``. Returns
    ``(o [B, T, H, Dv] in v's dtype, RFState in fp32 or None)``. Differentiable: the backward is fused as well
    (``csrc/rf_backward.cpp``).

    ``cu_seqlens`` (int32/int64 ``[N + 1]``, validated by the caller): packed variable-length sequences,
    q, k, v ``[1, Ttot, ., .]``, sequence n the rows ``cu[n]:cu[n+1]``; the parameters' and the states'
    batch axis is then the sequence axis (bias ``[N, H_kv, m]``, S ``[N, H_kv, F, Dv]``...). One call of the
    extension runs every (sequence, key/value head); the result equals one call per sequence.

    ``window`` (>= 1, or 0 with ``sinks``): the hybrid window and attention sinks
    (``ops.cpu.window.cpu_window_attention``; the state is then a ``WindowState``).
    """
    if window is not None:
        from .window import cpu_window_attention

        return cpu_window_attention(
            q,
            k,
            v,
            params,
            causal=causal,
            window=window,
            sinks=sinks,
            key_padding_mask=key_padding_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the compiled CPU backend is unavailable ({extension_error()})")
    S0, z0, m0 = (None, None, None) if initial_state is None else tuple(initial_state)
    if initial_state is not None and any(t is None for t in (S0, z0, m0)):
        raise ValueError(
            "initial_state must hold S, z and log_scale together, got "
            + ", ".join(
                f"{name}={'tensor' if t is not None else None}"
                for name, t in zip(("S", "z", "log_scale"), (S0, z0, m0))
            )
        )
    tensors = (q, k, v, params.W, params.bias, S0, z0, m0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        o, S, z, m = _CpuAttention.apply(*tensors, params, causal, key_padding_mask, cu_seqlens)
    else:
        o, S, z, m = _forward(ext, q, k, v, params, causal, key_padding_mask, S0, z0, m0, cu_seqlens)
    return o, (RFState(S, z, m) if output_final_state else None)
