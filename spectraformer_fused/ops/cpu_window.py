"""The hybrid window on the compiled CPU backend: binding and autograd of ``csrc/rf_window.cpp``.

``cpu_window_attention`` is ``ops.cpu.cpu_attention`` with ``window=W``: exact kernel weights for the keys
inside the window, random features beyond it, one shared normaliser (DESIGN.md section 6). The state is a
``WindowState``; the forward runs in C++ (``window_forward`` of the CPU extension), the backward
recomputes through ``reference_attention(..., window=W)`` as the plain CPU path does.
"""

from __future__ import annotations

import torch

from ..contract import DEN_EPS, FeatureParams
from ..state import WindowState, empty_sinks, empty_window_state
from ..validation import check_window
from . import cpu as _cpu

_STATE_NAMES = ("S", "z", "log_scale", "k_tail", "v_tail", "tail_keep")


def _rows(t, shape):
    return t.detach().to(torch.float32).expand(shape).contiguous()


def _check_state(state, R, Hk, F, D, Dv, window):
    if not isinstance(state, WindowState):
        raise TypeError(
            f"with a window the initial state must be a WindowState (state.empty_window_state), got "
            f"{type(state).__name__}"
        )
    if state.window != window:
        raise ValueError(f"the initial state was made for window {state.window}, this call has window {window}")
    n = window - 1
    want = {
        "S": (R, Hk, F, Dv),
        "z": (R, Hk, F),
        "log_scale": (R, Hk),
        "k_tail": (R, Hk, n, D),
        "v_tail": (R, Hk, n, Dv),
        "tail_keep": (R, n),
    }
    for name, t in zip(_STATE_NAMES, state):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"initial_state.{name} must be {list(want[name])}, got {list(t.shape)}")
    if state.tail_keep.dtype != torch.bool:
        raise TypeError(f"initial_state.tail_keep must be bool, got {state.tail_keep.dtype}")


def _tail_keep(tail_keep, T, mask, offsets):
    """The keep flags of the last W - 1 positions after the call: ``[R, W - 1]``."""
    n = tail_keep.shape[1]
    if offsets is None:
        keep = mask if mask is not None else torch.ones(tail_keep.shape[0], T, dtype=torch.bool)
        return torch.cat([tail_keep, keep.to(torch.bool)], dim=1)[:, T:].contiguous()
    lengths = torch.tensor([offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)])
    idx = lengths[:, None] + torch.arange(n)[None]  # extended position of each new tail row
    old = tail_keep.gather(1, idx.clamp_max(max(n - 1, 0))) if n else tail_keep
    return torch.where(idx < n, old, torch.ones_like(old))


def _forward(q, k, v, params: FeatureParams, causal, window, mask, state: WindowState, cu_seqlens):
    ext = _cpu._load()
    R, Hk = state.log_scale.shape
    m, D = params.W.shape[1], q.shape[-1]
    psi = None if params.psi is None else _rows(params.psi, (R, Hk, D))
    S0, z0, m0, kt, vt = (t.detach().to(torch.float32).contiguous() for t in state[:5])
    o, S, z, ms, kt_out, vt_out = ext.window_forward(
        q.detach(),
        k.detach(),
        v.detach(),
        _cpu._transposed(params.W),
        _rows(params.bias, (R, Hk, m)),
        _rows(params.freq, (R, Hk)),
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
    )
    return o, S, z, ms, kt_out, vt_out


class _CpuWindowAttention(torch.autograd.Function):
    """Forward in C++; backward recomputes through ``reference_attention(..., window=W)`` under enable_grad
    on the saved inputs (exact gradients for q, k, v, W, bias and the initial state's S, z, k_tail, v_tail)."""

    @staticmethod
    def forward(ctx, q, k, v, W, bias, S0, z0, m0, kt0, vt0, tail_keep, params, causal, window, mask, cu_seqlens):
        state = WindowState(
            S0, z0, m0, kt0, vt0, tail_keep, *empty_sinks(*kt0.shape[:3], vt0.shape[-1], 0, device=kt0.device)
        )
        outs = _forward(q, k, v, params, causal, window, mask, state, cu_seqlens)
        ctx.save_for_backward(q, k, v, W, bias, S0, z0, m0, kt0, vt0, tail_keep)
        ctx.params, ctx.causal, ctx.window, ctx.mask, ctx.cu_seqlens = params, causal, window, mask, cu_seqlens
        ctx.mark_non_differentiable(outs[3])
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, do, dS, dz, _dm, dkt, dvt):
        *saved, tail_keep = ctx.saved_tensors
        grads = _cpu.reference_grads(
            ctx.params,
            saved,
            (do, dS, dz, None, dkt, dvt),
            lambda st: WindowState(
                *st, tail_keep, *empty_sinks(*st[3].shape[:3], st[4].shape[-1], 0, device=st[3].device)
            ),
            causal=ctx.causal,
            key_padding_mask=ctx.mask,
            cu_seqlens=ctx.cu_seqlens,
            window=ctx.window,
        )
        return (*grads, None, None, None, None, None, None)


def cpu_window_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    causal: bool,
    window: int,
    key_padding_mask=None,
    initial_state: WindowState | None = None,
    output_final_state: bool = False,
    cu_seqlens=None,
):
    """Hybrid attention with a window of ``window`` exact keys (DESIGN.md section 6) on the compiled CPU
    extension: ``(o [B, T, H, Dv] in v's dtype, WindowState in fp32 or None)``.

    As ``ops.cpu.cpu_attention`` (fp32/bf16/fp16 inputs, GQA, masks, packed sequences ``cu_seqlens`` with
    one state row per sequence) plus ``window >= 1``; ``initial_state`` is a ``WindowState`` of that window
    (or None: the empty one). Differentiable: the backward recomputes through the reference backend.
    """
    window = check_window(window)
    if window is None:
        raise ValueError("cpu_window_attention needs a window >= 1 (use cpu_attention without one)")
    ext = _cpu._load()
    if ext is None:
        raise RuntimeError(f"the compiled CPU backend is unavailable ({_cpu.extension_error()})")
    B, T, _, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    if offsets is not None and key_padding_mask is not None:
        raise ValueError("cu_seqlens and a key padding mask cannot be combined")
    R = B if offsets is None else len(offsets) - 1
    F = params.feature_dim
    if initial_state is None:
        initial_state = empty_window_state(R, Hk, F, D, Dv, window, device=q.device)
    else:
        _check_state(initial_state, R, Hk, F, D, Dv, window)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    tensors = (q, k, v, params.W, params.bias, *initial_state[:5])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        o, S, z, ms, kt, vt = _CpuWindowAttention.apply(
            *tensors, initial_state.tail_keep, params, causal, window, mask, cu_seqlens
        )
    else:
        o, S, z, ms, kt, vt = _forward(q, k, v, params, causal, window, mask, initial_state, cu_seqlens)
    if not output_final_state:
        return o, None
    keep = _tail_keep(initial_state.tail_keep, T, mask, offsets)
    return o, WindowState(
        S, z, ms, kt, vt, keep, *(t.float() if t.is_floating_point() else t for t in initial_state.sink_part)
    )
