"""The hybrid window on the compiled CPU backend: binding and autograd of ``csrc/rf_window.cpp``.

``cpu_window_attention`` is ``ops.cpu.cpu_attention`` with ``window=W``: exact kernel weights for the keys
inside the window, random features beyond it, one shared normaliser (DESIGN.md section 6). The state is a
``WindowState``; the forward runs in C++ (``window_forward`` of the CPU extension), attention sinks
(section 8: the first S keys of each sequence exact, their slots in the state) and the learned factor
``log_mix`` included; the backward too (``window_backward``, csrc/rf_window_bwd.cpp), causal and not, an
initial ``log_scale`` that requires grad included (``_with_log_scale_grad``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...contract import DEN_EPS, FeatureParams
from ...state import WindowState, empty_window_state
from ...validation import check_window
from .extension import _load, _transposed, extension_error

_STATE_NAMES = ("S", "z", "log_scale", "k_tail", "v_tail", "tail_keep", "k_sink", "v_sink", "sink_keep", "sink_seen")
# sink_from of a slot no query of the call sees
_NEVER = 1 << 62


def _rows(t, shape):
    return t.detach().to(torch.float32).expand(shape).contiguous()


def _check_state(state, R, Hk, F, D, Dv, window, sinks):
    if not isinstance(state, WindowState):
        raise TypeError(
            f"with a window the initial state must be a WindowState (state.empty_window_state), got "
            f"{type(state).__name__}"
        )
    if state.window != max(window, 1):
        raise ValueError(f"the initial state was made for window {state.window}, this call has window {window}")
    if state.sinks != sinks:
        raise ValueError(f"the initial state was made for {state.sinks} sinks, this call has sinks={sinks}")
    n = max(window - 1, 0)
    want = {
        "S": (R, Hk, F, Dv),
        "z": (R, Hk, F),
        "log_scale": (R, Hk),
        "k_tail": (R, Hk, n, D),
        "v_tail": (R, Hk, n, Dv),
        "tail_keep": (R, n),
        "k_sink": (R, Hk, sinks, D),
        "v_sink": (R, Hk, sinks, Dv),
        "sink_keep": (R, sinks),
        "sink_seen": (R, sinks),
    }
    for name, t in zip(_STATE_NAMES, state):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"initial_state.{name} must be {list(want[name])}, got {list(t.shape)}")
    for name in ("tail_keep", "sink_keep", "sink_seen"):
        if getattr(state, name).dtype != torch.bool:
            raise TypeError(f"initial_state.{name} must be bool, got {getattr(state, name).dtype}")


class _Slots(NamedTuple):
    k: torch.Tensor  # [R, H_kv, S, D] fp32: the slots after the call (what the kernel reads)
    v: torch.Tensor
    keep: torch.Tensor  # [R, S] bool
    seen_after: torch.Tensor  # [R, S] bool
    sink_from: torch.Tensor  # [R, S] int64
    skip: torch.Tensor  # [R] int64
    seen: torch.Tensor  # [R, S] bool: held by the initial state
    fresh: torch.Tensor  # [R, S] bool: filled by a token of this call
    token: torch.Tensor  # [R, S] int64: that token's row in k.reshape(B * T, ...)


def _sink_slots(k, v, mask, k_sink, v_sink, sink_keep, sink_seen, offsets):
    """The sink slots after this call and what the kernel reads of them (DESIGN.md section 8; the
    reference's ``_window_attention`` spells the same rule): ``(k_sink, v_sink [R, H_kv, S, .] fp32,
    sink_keep, sink_seen [R, S] bool, sink_from [R, S] int64, sink_skip [R] int64)``. Row r has seen
    ``c = sink_seen[r].sum()`` positions before this call, so its token t is a sink iff ``c + t < S``: the
    first ``sink_skip = max(S - c, 0)`` tokens; slot s is filled by token ``s - c`` (when the row has it) and
    seen by the queries from ``sink_from[s]`` on (-1: every query; ``_NEVER``: none, empty or masked). The
    slots are differentiable functions of k, v and the initial slots (the fused backward returns the slots'
    gradients and autograd routes them)."""
    B, Tt, Hk, D = k.shape
    Dv = v.shape[-1]
    R, S = sink_seen.shape
    seen = sink_seen.to(torch.bool)
    count = seen.sum(-1)  # [R]
    if offsets is None:
        lengths = torch.full((R,), Tt, dtype=torch.long)
        base = torch.arange(R, dtype=torch.long) * Tt
    else:
        off = torch.tensor(offsets, dtype=torch.long)
        lengths, base = off[1:] - off[:-1], off[:-1]
    at = torch.arange(S, dtype=torch.long)[None] - count[:, None]  # the token that fills the slot
    fresh = ~seen & (at < lengths[:, None])
    total = B * Tt
    if total > 0:
        idx = (base[:, None] + at.clamp_min(0)).clamp(0, total - 1)
        fill_k = k.reshape(total, Hk, D)[idx].to(torch.float32).transpose(1, 2)
        fill_v = v.reshape(total, Hk, Dv)[idx].to(torch.float32).transpose(1, 2)
        fill_keep = mask.reshape(total)[idx] if mask is not None else torch.ones_like(fresh)
    else:
        fill_k = torch.zeros(R, Hk, S, D)
        fill_v = torch.zeros(R, Hk, S, Dv)
        fill_keep = torch.ones_like(fresh)
    f = fresh[:, None, :, None]
    s = seen[:, None, :, None]
    zero = torch.zeros((), dtype=torch.float32)
    k_out = torch.where(s, k_sink.to(torch.float32), torch.where(f, fill_k, zero)).contiguous()
    v_out = torch.where(s, v_sink.to(torch.float32), torch.where(f, fill_v, zero)).contiguous()
    keep = torch.where(seen, sink_keep.to(torch.bool), fresh & fill_keep)
    never = torch.full_like(at, _NEVER)
    frm = torch.where(seen, torch.full_like(at, -1), torch.where(fresh, at, never))
    frm = torch.where(keep, frm, never).contiguous()
    skip = (S - count).clamp_min(0).to(torch.long).contiguous()
    token = idx if total > 0 else torch.zeros_like(at)
    return _Slots(k_out, v_out, keep, seen | fresh, frm, skip, seen, fresh, token)


def _kernel_args(params: FeatureParams, R, Hk, D, log_mix):
    """(WT, bias, freq, psi, mix) as the extension takes them."""
    m = params.W.shape[1]
    psi = None if params.psi is None else _rows(params.psi, (R, Hk, D))
    mix = None if log_mix is None else log_mix.detach().to(torch.float32).reshape(Hk).contiguous()
    return _transposed(params.W), _rows(params.bias, (R, Hk, m)), _rows(params.freq, (R, Hk)), psi, mix


def _slot_args(slots):
    """(sink_k, sink_v, sink_from, sink_skip) for the extension (all None without sinks)."""
    if slots is None:
        return None, None, None, None
    return slots.k.detach().contiguous(), slots.v.detach().contiguous(), slots.sink_from, slots.skip


def _forward(
    q,
    k,
    v,
    params: FeatureParams,
    log_mix,
    causal,
    window,
    mask,
    state: WindowState,
    cu_seqlens,
    offsets,
    slots=None,
    need_stats=False,
    extra=None,
):
    """The C++ forward: ``(o, S, z, log_scale, k_tail, v_tail, tail_keep, k_sink, v_sink, sink_keep,
    sink_seen)``. ``slots``: the sink slots of ``_sink_slots`` when already made. ``need_stats``: returns
    ``(that tuple, (stats, key_shift))`` for the backward: stats ``[B, T, H, 2]`` each query row's (top, den),
    key_shift ``[R, H_kv]`` (non-causal; None when causal) each task's key stabiliser. ``extra``: ``(k [R,
    H_kv, C, D], v [R, H_kv, C, Dv] fp32, keep [R, C] bool)``, more exact keys that every query of the call
    sees where kept (the exact cache's slots, ``ops.cpu.cache``): the kernel reads them after the sink slots;
    the returned sink part is the sinks' alone."""
    ext = _load()
    R, Hk = state.log_scale.shape
    D = q.shape[-1]
    WT, bias, freq, psi, mix = _kernel_args(params, R, Hk, D, log_mix)
    S0, z0, m0, kt, vt = (t.detach().to(torch.float32).contiguous() for t in state[:5])
    if state.sinks > 0 and slots is None:
        slots = _sink_slots(k, v, mask, *state.sink_part, offsets)
    if slots is not None:
        sk, sv, skeep, sseen = slots.k, slots.v, slots.keep, slots.seen_after
    else:
        sk = sv = None
        skeep, sseen = state.sink_keep, state.sink_seen
    ksl, vsl, sfrom, sskip = _slot_args(slots)
    if extra is not None:
        xk, xv, xkeep = extra
        xfrom = torch.full(xkeep.shape, _NEVER, dtype=torch.long).masked_fill_(xkeep, -1)
        if ksl is None:
            ksl, vsl, sfrom = xk.contiguous(), xv.contiguous(), xfrom.contiguous()
            sskip = torch.zeros(R, dtype=torch.long)
        else:
            ksl, vsl = torch.cat([ksl, xk], dim=2).contiguous(), torch.cat([vsl, xv], dim=2).contiguous()
            sfrom = torch.cat([sfrom, xfrom], dim=1).contiguous()
    o, S, z, ms, kt_out, vt_out, keep_out, stats, kshift = ext.window_forward(
        q.detach(),
        k.detach(),
        v.detach(),
        WT,
        bias,
        freq,
        psi,
        int(params.kind),
        float(params.c_t),
        float(params.c_o),
        float(params.scale),
        float(params.exact_sq),
        bool(causal),
        int(window),
        mask,
        S0,
        z0,
        m0,
        kt,
        vt,
        state.tail_keep.contiguous(),
        DEN_EPS,
        cu_seqlens,
        ksl,
        vsl,
        sfrom,
        sskip,
        mix,
        bool(need_stats),
    )
    if sk is None:
        sk, sv = (t.detach().to(torch.float32).clone() for t in state[6:8])  # empty: [R, H_kv, 0, .]
    outs = (o, S, z, ms, kt_out, vt_out, keep_out, sk, sv, skeep, sseen)
    return (outs, (stats, kshift)) if need_stats else outs


class _CpuWindowFused(torch.autograd.Function):
    """Forward and backward in C++ (``window_forward``, ``window_backward``: csrc/rf_window_bwd.cpp).
    The forward saves its inputs only; the backward recomputes the features chunk by chunk. The sink slots
    (``_sink_slots``, made without grad) are outputs: the slots' gradients (the kernel's plus the final
    state's) go to the initial slots they kept and to the tokens that filled them (added to those rows of
    dk, dv: no [T]-sized temporary)."""

    @staticmethod
    def forward(
        ctx, q, k, v, W, bias, log_mix, S0, z0, m0, kt0, vt0, ks0, vs0, flags, params, causal, window, mask, cu, offsets
    ):
        tail_keep, slots = flags
        state = WindowState(S0, z0, m0, kt0, vt0, tail_keep, ks0, vs0, *_flags_keep(slots, ks0))
        outs, (stats, kshift) = _forward(
            q, k, v, params, log_mix, causal, window, mask, state, cu, offsets, slots, True
        )
        # the output and each row's (top, den) (and, non-causal, the key shift) let the backward skip both
        # parts' numerators
        ctx.save_for_backward(q, k, v, W, bias, log_mix, S0, z0, m0, kt0, vt0, ks0, vs0, outs[0], stats, kshift)
        ctx.flags, ctx.params, ctx.window, ctx.mask, ctx.cu = flags, params, window, mask, cu
        ctx.causal = causal
        ctx.mark_non_differentiable(outs[3], outs[6])
        ctx.set_materialize_grads(False)
        return outs[:9]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS, dz, _dm, dkt, dvt, _dkeep, dks, dvs):
        q, k, v, W, bias, log_mix, S0, z0, m0, kt0, vt0, ks0, vs0, o_saved, stats, kshift = ctx.saved_tensors
        tail_keep, slots = ctx.flags
        p = ctx.params
        R, Hk = m0.shape
        WT, pbias, freq, psi, mix = _kernel_args(p, R, Hk, q.shape[-1], log_mix)
        ksl, vsl, sfrom, sskip = _slot_args(slots)
        if do is None:
            do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype)
        grads = _load().window_backward(
            do,
            dS,
            dz,
            dkt,
            dvt,
            q,
            k,
            v,
            W,
            pbias,
            freq,
            psi,
            int(p.kind),
            float(p.c_t),
            float(p.c_o),
            float(p.scale),
            float(p.exact_sq),
            bool(ctx.causal),
            int(ctx.window),
            ctx.mask,
            S0,
            z0,
            m0,
            kt0,
            vt0,
            tail_keep.contiguous(),
            DEN_EPS,
            ctx.cu,
            ksl,
            vsl,
            sfrom,
            sskip,
            mix,
            o_saved,
            stats,
            kshift,
        )
        dq, dk, dv, dW, dbias, dS0, dz0, dkt0, dvt0, dsk, dsv, dmix = grads
        dks0 = dvs0 = None
        if slots is not None:
            # the slots' gradients: the kernel's and the final state's, to where each slot came from
            dsk = dsk if dks is None else dsk + dks
            dsv = dsv if dvs is None else dsv + dvs
            seen = slots.seen[:, None, :, None]
            dks0, dvs0 = torch.where(seen, dsk, 0.0), torch.where(seen, dsv, 0.0)
            fresh = slots.fresh
            if bool(fresh.any()):
                rows = slots.token[fresh]
                # (distinct rows; index_add_ would take the slow scatter path over all of dk)
                dk.view(-1, *dk.shape[2:])[rows] += dsk.transpose(1, 2)[fresh]
                dv.view(-1, *dv.shape[2:])[rows] += dsv.transpose(1, 2)[fresh]
        dmix = None if log_mix is None else dmix.sum(0).reshape(log_mix.shape)
        inputs = (q, k, v, W, bias, log_mix, S0, z0, m0, kt0, vt0, ks0, vs0)
        full = (dq, dk, dv, dW.sum_to_size(W.shape), dbias.sum_to_size(bias.shape), dmix, dS0, dz0, None)
        full = full + (dkt0, dvt0, dks0, dvs0)
        out = [
            g.to(t.dtype) if t is not None and t.requires_grad and g is not None else None for g, t in zip(full, inputs)
        ]
        return (*out, None, None, None, None, None, None, None)


def _flags_keep(slots, ks0):
    """(sink_keep, sink_seen) for the fused Function's state (the kernel reads ``slots``)."""
    if slots is None:
        empty = torch.zeros(ks0.shape[0], 0, dtype=torch.bool)
        return empty, empty
    return slots.keep, slots.seen_after


def _with_log_scale_grad(q, k, v, params, causal, window, sinks, mask, st, output_final_state, cu_seqlens):
    """The fused path for an initial state whose ``log_scale`` requires grad (a state differentiated through).

    The state stands for S exp(log_scale), z exp(log_scale) (DESIGN.md section 5): the attention depends on
    log_scale only through those products, and on the final state's stabiliser only through its choice, so
    the call runs on log_scale detached with S, z multiplied by exp(log_scale - log_scale.detach()) (value
    1, derivative 1: log_scale gets <dS0, S0> + <dz0, z0> from the fused backward); where the initial scale
    is the final one (no key above it, the reference's running maximum is then log_scale itself), the final
    state is written on log_scale with its gradient, S and z divided by the same factor. The values are
    those of the plain call, and the gradients the reference's."""
    ls0 = st.log_scale
    lsd = ls0.detach()
    finite = torch.isfinite(lsd)
    delta = torch.where(finite, ls0 - lsd, torch.zeros_like(ls0))  # 0, with derivative 1 where finite
    scale = delta.exp()
    start = st._replace(S=st.S * scale[..., None, None], z=st.z * scale[..., None], log_scale=lsd)
    o, final = cpu_window_attention(
        q,
        k,
        v,
        params,
        causal=causal,
        window=window,
        sinks=sinks,
        key_padding_mask=mask,
        initial_state=start,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    if final is None:
        return o, None
    same = finite & (final.log_scale == lsd)
    d = torch.where(same, delta, torch.zeros_like(delta))
    back = (-d).exp()
    return o, final._replace(
        S=final.S * back[..., None, None], z=final.z * back[..., None], log_scale=final.log_scale + d
    )


def cpu_window_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    causal: bool,
    window: int,
    sinks: int = 0,
    key_padding_mask=None,
    initial_state: WindowState | None = None,
    output_final_state: bool = False,
    cu_seqlens=None,
):
    """Hybrid attention with a window of ``window`` exact keys (DESIGN.md section 6) and ``sinks`` exact
    first keys of each sequence (section 8), on the compiled CPU extension: ``(o [B, T, H, Dv] in v's
    dtype, WindowState in fp32 or None)``. ``params.log_mix`` (the learned factor, or None) is added to every
    exact logit.

    As ``ops.cpu.cpu_attention`` (fp32/bf16/fp16 inputs, GQA, masks, packed sequences ``cu_seqlens`` with
    one state row per sequence) plus ``window >= 1``, or ``window = 0`` with sinks (sinks only);
    ``initial_state`` is a ``WindowState`` of that window and sinks (or None: the empty one).
    Differentiable: the backward is fused as well (``_CpuWindowFused``).
    """
    if window is None or isinstance(window, bool) or not isinstance(window, int) or window < 0:
        window = check_window(window)
    if window is None or (window == 0 and not sinks):
        raise ValueError("cpu_window_attention needs a window >= 1 or sinks (use cpu_attention without them)")
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the compiled CPU backend is unavailable ({extension_error()})")
    B, T, _, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    if offsets is not None and key_padding_mask is not None:
        raise ValueError("cu_seqlens and a key padding mask cannot be combined")
    R = B if offsets is None else len(offsets) - 1
    F = params.feature_dim
    if initial_state is None:
        initial_state = empty_window_state(R, Hk, F, D, Dv, window, sinks=sinks, device=q.device)
    else:
        _check_state(initial_state, R, Hk, F, D, Dv, window, sinks)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    st = initial_state
    tensors = (q, k, v, params.W, params.bias, params.log_mix, *st[:5], st.k_sink, st.v_sink)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad and st.log_scale.requires_grad:
        return _with_log_scale_grad(
            q, k, v, params, causal, window, sinks, key_padding_mask, st, output_final_state, cu_seqlens
        )
    if needs_grad:  # the fused backward
        with torch.no_grad():
            slots = _sink_slots(k, v, mask, *st.sink_part, offsets) if sinks else None
        fused_in = (q, k, v, params.W, params.bias, params.log_mix, *st[:5], st.k_sink, st.v_sink)
        flags = (st.tail_keep, slots)
        outs = _CpuWindowFused.apply(*fused_in, flags, params, causal, window, mask, cu_seqlens, offsets)
        if not output_final_state:
            return outs[0], None
        keep = (slots.keep, slots.seen_after) if slots is not None else (st.sink_keep, st.sink_seen)
        return outs[0], WindowState(*outs[1:], *keep)
    outs = _forward(q, k, v, params, params.log_mix, causal, window, mask, st, cu_seqlens, offsets)
    o, *final = outs
    if not output_final_state:
        return o, None
    return o, WindowState(*final)
