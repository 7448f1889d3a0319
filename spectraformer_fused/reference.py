"""The reference backend: readable PyTorch, fp32 math (fp64 for fp64 inputs). It is the oracle of every
test and the fallback of every device.

Stabilisers (DESIGN.md section 3): every query row subtracts the maximum of its own feature exponents;
all keys summed together subtract one shared constant, the running maximum of their exponents, and the
state is rescaled whenever that maximum grows (as online softmax does). Both constants cancel exactly
between numerator and denominator, so they are detached. Masked keys get exponent -inf: they add
nothing, not even to the denominator, and do not move the maximum.

Causal attention runs chunk by chunk (intra-chunk masked products plus the carried state), so memory
stays O(T) and no T x T matrix is formed; ``causal_chunks.py`` batches the chunks and differentiates the
walk by hand (its autograd graph is a few nodes, not some thirty per chunk).
"""

from __future__ import annotations

import math

import torch

from .causal_chunks import causal_chunks
from .components import feature_logits
from .contract import DEN_EPS, FeatureParams
from .state import RFState, empty_state, safe_log_scale


def safe_denominator(den: torch.Tensor) -> torch.Tensor:
    """|den| floored at DEN_EPS (contract.py says why the magnitude)."""
    return den.abs().clamp_min(DEN_EPS)


def _features(x, p: FeatureParams, query: bool):
    return feature_logits(x, p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=query)


def _apply(e, mult, shift):
    phi = torch.exp(e - shift)
    return phi if mult is None else phi * mult


def reference_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    causal: bool = False,
    key_padding_mask=None,
    initial_state: RFState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: torch.Tensor | None = None,
):
    """Random-feature attention of q ``[B, T, H, D]``, k ``[B, T, H_kv, D]`` and v ``[B, T, H_kv, Dv]``.

    Grouped-query attention: query head h reads key/value head h // (H / H_kv) and its parameters; the
    state is one per key/value head. Returns ``(o [B, T, H, Dv] in v's dtype, RFState or None)``.

    ``cu_seqlens`` (packed sequences, validated by the caller): q, k, v hold B = 1 row of N sequences with
    these N + 1 boundaries, the parameters and the states one row per sequence; each sequence is attended
    on its own, by definition (the oracle of the fused backends' packed kernels).
    """
    if cu_seqlens is not None:
        return per_sequence(
            reference_attention,
            q,
            k,
            v,
            params,
            cu_seqlens.tolist(),
            causal=causal,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
        )
    B, T, H, _ = q.shape
    Hk = k.shape[2]
    G = H // Hk
    Dv = v.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    root = math.sqrt(params.scale)
    # queries as [B, H_kv, G * T, D]: a group's queries in one row block (features are row-wise)
    x = (q.to(cdt) * root).transpose(1, 2).reshape(B, Hk, G * T, q.shape[-1])
    y = (k.to(cdt) * root).transpose(1, 2)  # [B, H_kv, T, D]
    vv = v.to(cdt).transpose(1, 2)  # [B, H_kv, T, Dv]
    p = FeatureParams(
        params.kind,
        params.W.to(cdt),
        params.bias.to(cdt),
        params.freq.to(cdt),
        None if params.psi is None else params.psi.to(cdt),
        params.c_t,
        params.c_o,
        params.scale,
        params.num_features,
        params.feature_dim,
        params.exact_sq,
    )
    F = p.feature_dim
    if initial_state is None:
        S, z, m = empty_state(B, Hk, F, Dv, dtype=cdt, device=q.device)
    else:
        S, z, m = (t.to(cdt) for t in initial_state)
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None]  # [B, 1, T, 1]

    def key_logits(lo, hi):
        ek, mk = _features(y[:, :, lo:hi], p, query=False)
        if keep is not None:
            ek = ek.masked_fill(~keep[:, :, lo:hi], float("-inf"))
        return ek, mk

    def query_features(lo, hi):
        """[B, H_kv, G, hi - lo, F]"""
        xs = x.unflatten(2, (G, T))[:, :, :, lo:hi].flatten(2, 3)
        eq, mq = _features(xs, p, query=True)
        return _apply(eq, mq, eq.amax(-1, keepdim=True).detach()).unflatten(2, (G, hi - lo))

    def rescale(ek, S, z, m):
        """Move the state to the new running maximum of the key exponents; returns the shift to use."""
        m_new = torch.maximum(m, ek.amax(dim=(-1, -2)).detach())  # [B, H_kv]
        shift = safe_log_scale(m_new)
        alpha = torch.exp(m - shift)  # 0 while the state is empty
        return S * alpha[..., None, None], z * alpha[..., None], m_new, shift[:, :, None, None]

    if not causal:
        if T > 0:
            ek, mk = key_logits(0, T)
            S, z, m, shift = rescale(ek, S, z, m)
            phik = _apply(ek, mk, shift)  # [B, H_kv, T, F]
            S = S + phik.transpose(-1, -2) @ vv
            z = z + phik.sum(-2)
            phiq = query_features(0, T)  # [B, H_kv, G, T, F]
            o = (phiq @ S[:, :, None]) / safe_denominator(phiq @ z[:, :, None, :, None])
        else:
            o = vv.new_zeros(B, Hk, G, 0, Dv)
    elif T > 0:  # every chunk at once, the state carried by causal_chunks (same stabilisers as a loop)
        ek, mk = key_logits(0, T)
        num, den, S, z, m = causal_chunks(query_features(0, T), ek, mk, vv, S, z, m, chunk_size)
        o = num / safe_denominator(den)[..., None]
    else:
        o = vv.new_zeros(B, Hk, G, 0, Dv)
    o = o.reshape(B, H, T, Dv).transpose(1, 2).to(v.dtype)
    return o, (RFState(S, z, m) if output_final_state else None)


def per_sequence(
    attend, q, k, v, params: FeatureParams, offsets: list[int], *, causal, initial_state, output_final_state, **kwargs
):
    """The packed-sequence semantics, by definition: ``attend`` (a backend function with
    ``reference_attention``'s signature) on every sequence ``offsets[i]:offsets[i + 1]`` of q, k, v
    ``[1, sum T_i, ., .]`` on its own, with row i of the parameters and of the initial state; outputs
    concatenated along time, final states stacked along the sequence axis."""
    n = len(offsets) - 1
    outs, finals = [], []
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        init = None if initial_state is None else RFState(*(t[i : i + 1] for t in initial_state))
        if a == b:  # an empty sequence: no output rows; its state passes through
            cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
            if init is None:
                init = empty_state(1, k.shape[2], params.feature_dim, v.shape[-1], dtype=cdt, device=q.device)
            outs.append(v.new_empty(1, 0, q.shape[2], v.shape[-1]))
            finals.append(RFState(*(t.to(cdt) for t in init)))
            continue
        o, final = attend(
            q[:, a:b],
            k[:, a:b],
            v[:, a:b],
            params.rows(i, i + 1),
            causal=causal,
            key_padding_mask=None,
            initial_state=init,
            output_final_state=output_final_state,
            **kwargs,
        )
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1) if outs else v.new_empty(1, 0, q.shape[2], v.shape[-1])
    if not output_final_state:
        return o, None
    if finals:
        return o, RFState(*(torch.cat(parts, dim=0) for parts in zip(*finals)))
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o, empty_state(0, k.shape[2], params.feature_dim, v.shape[-1], dtype=cdt, device=q.device)


# ----------------------------------------------------------------------------------------------------
# Exact attention, for tests and the accuracy report
# ----------------------------------------------------------------------------------------------------


def exact_logits(q, k, *, kernel: str = "softmax", scale: float | None = None) -> torch.Tensor:
    """log K(q_i, k_j) ``[B, H, Tq, Tk]``: scale q.k (softmax) or -scale |q - k|^2 / 2 (gaussian)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    logits = scale * (qt @ kt.transpose(-1, -2))
    if kernel == "gaussian":
        logits = logits - 0.5 * scale * ((qt * qt).sum(-1)[..., :, None] + (kt * kt).sum(-1)[..., None, :])
    return logits


def exact_kernel(q, k, *, kernel: str = "softmax", scale: float | None = None) -> torch.Tensor:
    """K(q_i, k_j) ``[B, H, Tq, Tk]``: exp(scale q.k) or exp(-scale |q - k|^2 / 2)."""
    return torch.exp(exact_logits(q, k, kernel=kernel, scale=scale))


def exact_attention(
    q, k, v, *, kernel: str = "softmax", causal: bool = False, scale: float | None = None, key_padding_mask=None
) -> torch.Tensor:
    """Exact kernel attention (softmax attention for kernel="softmax"), O(T^2), ``[B, T, H, Dv]``.
    A query with no visible key gets 0. k, v may have H_kv heads dividing H (grouped-query attention:
    query head h reads key/value head h // (H / H_kv), as SDPA with enable_gqa)."""
    G = q.shape[2] // k.shape[2]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    logits = exact_logits(q, k, kernel=kernel, scale=scale)
    T = q.shape[1]
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (w @ v.transpose(1, 2).to(w.dtype)).transpose(1, 2)
