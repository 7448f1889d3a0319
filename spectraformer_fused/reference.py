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

Hybrid attention (``window=W``, DESIGN.md section 6) prepends the initial state's tail (the W - 1 keys
before token 0) to the keys and walks query chunks: each chunk's exact logits over the keys of its
window, its feature part from the state of the keys that have left the window (causal: the state lags W
keys behind the queries; non-causal: the keys before and after the band, from a forward and a backward
walk, never a difference of sums), the two combined in log space before the one division. Memory is
O(T (W + chunk)).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .cache import admit
from .causal_chunks import causal_chunks
from .contract import FeatureParams
from .feature_math import _apply, _cast_params, _features, _rescale, safe_denominator
from .state import CacheState, RFState, WindowState, empty_state, empty_window_state, safe_log_scale


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
    window: int | None = None,
    sinks: int = 0,
    cache: int = 0,
    score: str | None = None,
):
    """Random-feature attention of q ``[B, T, H, D]``, k ``[B, T, H_kv, D]`` and v ``[B, T, H_kv, Dv]``.

    Grouped-query attention: query head h reads key/value head h // (H / H_kv) and its parameters; the
    state is one per key/value head. Returns ``(o [B, T, H, Dv] in v's dtype, RFState or None)``.

    ``cu_seqlens`` (packed sequences, validated by the caller): q, k, v hold B = 1 row of N sequences with
    these N + 1 boundaries, the parameters and the states one row per sequence; each sequence is attended
    on its own, by definition (the oracle of the fused backends' packed kernels).

    ``window`` (None or >= 1, already checked): hybrid attention, exact inside the window and features
    beyond it (DESIGN.md section 6); ``initial_state`` is then a ``WindowState`` or None and the final
    state a ``WindowState``. ``sinks`` S > 0 (already checked) holds the first S keys of each sequence exact
    too (DESIGN.md section 8); ``window=0`` is then sinks without a window. ``cache`` C > 0 (already
    checked: causal, window >= 1) keeps up to C keys that have left the window exact (DESIGN.md section 9);
    the state is then a ``CacheState``; ``score`` (None: ``cache.DEFAULT_SCORE``) chooses which.
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
            window=window,
            sinks=sinks,
            **({"cache": cache, "score": score} if cache else {}),
        )
    if cache:
        return _cache_attention(
            q,
            k,
            v,
            params,
            window=window,
            key_padding_mask=key_padding_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            sinks=sinks,
            cache=cache,
            score=score,
        )
    if window is not None:
        return _window_attention(
            q,
            k,
            v,
            params,
            window=window,
            causal=causal,
            key_padding_mask=key_padding_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
            sinks=sinks,
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
    p = _cast_params(params, cdt)
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

    if not causal:
        if T > 0:
            ek, mk = key_logits(0, T)
            S, z, m, shift = _rescale(ek, S, z, m)
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


def _sink_slots(initial_state, kq, vq, key_padding_mask, keep_t, sinks: int, cdt):
    """The sink slots of a piece (DESIGN.md section 8) from the initial state's and the piece's first tokens
    (``kq [B, H_kv, T, D]``, ``vq``): returns ``keep_t`` with the piece's sink tokens cleared and
    ``(sink_k, sink_v, sink_keep, sink_from, seen, fresh)``: the slots, their keep flags ``[B, S]``, the token
    of the piece that fills each (-1: filled before the piece, T: not filled), the slots filled before the
    piece and those this piece fills."""
    B, Hk, T, D = kq.shape
    Dv = vq.shape[-1]
    seen = initial_state.sink_seen.to(torch.bool)  # [B, S]
    count = seen.sum(-1)  # [B]: positions seen before this piece (at most S)
    tpos = torch.arange(T, device=kq.device)
    keep_t = keep_t & (count[:, None] + tpos[None] >= sinks)  # sinks leave the band and the features
    slot = torch.arange(sinks, device=kq.device)
    at = slot[None] - count[:, None]  # [B, S]: the token of this piece that fills the slot (if 0 <= at < T)
    fresh = ~seen & (at < T)
    idx = at.clamp(0, max(T - 1, 0))
    fill_k = kq.gather(2, idx[:, None, :, None].expand(B, Hk, sinks, D)) if T > 0 else initial_state.k_sink.to(cdt)
    fill_v = vq.gather(2, idx[:, None, :, None].expand(B, Hk, sinks, Dv)) if T > 0 else initial_state.v_sink.to(cdt)
    fill_keep = key_padding_mask.gather(1, idx) if (key_padding_mask is not None and T > 0) else torch.ones_like(fresh)
    sink_k = torch.where(seen[:, None, :, None], initial_state.k_sink.to(cdt), fill_k * fresh[:, None, :, None])
    sink_v = torch.where(seen[:, None, :, None], initial_state.v_sink.to(cdt), fill_v * fresh[:, None, :, None])
    sink_keep = torch.where(seen, initial_state.sink_keep.to(torch.bool), fresh & fill_keep)  # [B, S]
    sink_from = torch.where(seen, torch.full_like(at, -1), torch.where(fresh, at, torch.full_like(at, T)))
    return keep_t, (sink_k, sink_v, sink_keep, sink_from, seen, fresh)


def _window_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    window,
    causal,
    key_padding_mask,
    initial_state,
    output_final_state,
    chunk_size,
    sinks: int = 0,
):
    """Hybrid attention (DESIGN.md sections 6 and 8) with the conventions of ``reference_attention``.

    The keys are extended by the initial tail: extended key ``j'`` is the tail's key ``j'`` for ``j' < n``
    (``n = max(W - 1, 0)``) and token ``j' - n`` after, so query t (at extended position ``t + n``) holds key
    ``j'`` exact iff ``t <= j' <= t + W - 1`` (causal) or ``t <= j' <= t + 2W - 2`` (non-causal), and every
    other visible key, with the initial state's S and z, through the features. ``window=0`` (sinks only)
    has no exact band.

    Sinks (``sinks`` S > 0): the first S positions of each sequence. The state's ``sink_seen`` says how
    many came before this piece (``c`` per row), so token t is position ``c + t`` and a sink iff
    ``c + t < S``. A sink key leaves the extended keys (its keep flag is cleared: never in the band, never
    in the features) and joins the S sink slots, exact for every query that sees it (causal: slot s
    filled before the piece, or filled at token ``s - c <= t``). The learned factor ``params.log_mix`` is
    added to every exact logit, band and sinks alike.
    """
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    Dv = v.shape[-1]
    n = max(window - 1, 0)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    root = math.sqrt(params.scale)
    p = _cast_params(params, cdt)
    if initial_state is None:
        initial_state = empty_window_state(B, Hk, p.feature_dim, D, Dv, window, sinks=sinks, dtype=cdt, device=q.device)
    S, z, m = (t.to(cdt) for t in initial_state.rf)
    keep_t = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    kq, vq = k.to(cdt).transpose(1, 2), v.to(cdt).transpose(1, 2)  # [B, H_kv, T, .]
    sink_k = sink_v = sink_keep = None
    if sinks > 0:
        keep_t, (sink_k, sink_v, sink_keep, sink_from, seen, fresh) = _sink_slots(
            initial_state, kq, vq, key_padding_mask, keep_t, sinks, cdt
        )
    # the extended keys and values [B, H_kv, n + T, .] (raw, as the tail stores them) and their keep mask
    k_ext = torch.cat([initial_state.k_tail.to(cdt), kq], dim=2)
    v_ext = torch.cat([initial_state.v_tail.to(cdt), vq], dim=2)
    keep_ext = torch.cat([initial_state.tail_keep.to(torch.bool), keep_t], dim=1)  # [B, n + T]
    L = n + T
    x = (q.to(cdt) * root).transpose(1, 2).unflatten(1, (Hk, G))  # [B, H_kv, G, T, D]
    y = k_ext * root
    log_mix = None if p.log_mix is None else p.log_mix[None, :, None, None, None]  # [1, H_kv, 1, 1, 1]

    def key_logits(lo, hi):
        ek, mk = _features(y[:, :, lo:hi], p, query=False)
        return ek.masked_fill(~keep_ext[:, None, lo:hi, None], float("-inf")), mk

    def query_features(lo, hi):
        """Stabilised features ``[B, H_kv, G, c, F]`` and their row shift ``[B, H_kv, G, c, 1]``."""
        eq, mq = _features(x[:, :, :, lo:hi].flatten(2, 3), p, query=True)
        sq = eq.amax(-1, keepdim=True).detach()
        return _apply(eq, mq, sq).unflatten(2, (G, hi - lo)), sq.unflatten(2, (G, hi - lo))

    def exact_logits_of(xs, ys, visible):
        logits = xs @ ys.transpose(-1, -2)  # [B, H_kv, G, c, keys]
        if p.exact_sq != 0.0:
            logits = logits + p.exact_sq * ((xs * xs).sum(-1)[..., :, None] + (ys * ys).sum(-1)[..., None, :])
        if log_mix is not None:
            logits = logits + log_mix
        return logits.masked_fill(~visible, float("-inf"))

    def exact_part(lo, hi, a, b, exact):
        """Exact logits of queries lo:hi against extended keys a:b (-inf outside ``exact [c, b - a]``) and
        against the sinks they see, with the matching values."""
        xs = x[:, :, :, lo:hi]
        visible = exact & keep_ext[:, None, None, None, a:b]
        logits, ve = exact_logits_of(xs, y[:, :, None, a:b], visible), v_ext[:, :, None, a:b]
        if sink_k is None:
            return logits, ve
        t = torch.arange(lo, hi, device=q.device)
        sees = sink_from[:, None, :] <= (t[None, :, None] if causal else T - 1)  # [B, c, S]
        sees = (sees & sink_keep[:, None, :])[:, None, None]  # [B, 1, 1, c, S]
        sl = exact_logits_of(xs, sink_k[:, :, None] * root, sees)
        return torch.cat([logits, sl], dim=-1), torch.cat([ve, sink_v[:, :, None]], dim=-2)

    def combine(num_f, den_f, shift_f, logits, ve):
        """o = (feature part + exact part) / (their normalisers): the feature part is on the scale
        exp(shift_f) (query row shift + key shift), the exact part exp(logits); both are moved to their
        larger shift (detached: it cancels) before the one division."""
        top = torch.maximum(shift_f, logits.amax(-1, keepdim=True).detach())
        pe = torch.exp(logits - top)  # 0 outside the window
        alpha = torch.exp(shift_f - top)
        return (alpha * num_f + pe @ ve) / safe_denominator(alpha * den_f + pe.sum(-1, keepdim=True))

    band = torch.arange(chunk_size + 2 * n, device=q.device)
    has_band = window > 0
    outs = []
    if causal:
        for lo in range(0, T, chunk_size):
            hi = min(lo + chunk_size, T)
            c = hi - lo
            # feature keys of the chunk: extended lo:hi, i.e. the keys W or more positions before its queries
            # (W = 0: the chunk's own keys up to the query)
            ek, mk = key_logits(lo, hi)
            S, z, m, shift = _rescale(ek, S, z, m)
            phik = _apply(ek, mk, shift)  # [B, H_kv, c, F]
            phiq, sq = query_features(lo, hi)
            vc = v_ext[:, :, None, lo:hi]
            scores = phiq @ phik[:, :, None].transpose(-1, -2)
            scores = scores.tril(-1) if has_band else scores.tril(0)
            num_f = scores @ vc + phiq @ S[:, :, None]
            den_f = scores.sum(-1, keepdim=True) + phiq @ z[:, :, None, :, None]
            # exact keys: extended lo : hi + W - 1, key a exact for query i iff 0 <= a - i <= W - 1
            rel = band[None, : c + n] - band[:c, None]
            logits, ve = exact_part(lo, hi, lo, hi + n, (rel >= 0) & (rel <= n) & has_band)
            outs.append(combine(num_f, den_f, sq + shift[..., None], logits, ve))
            S = S + phik.transpose(-1, -2) @ vc[:, :, 0]
            z = z + phik.sum(-2)
    elif T > 0:
        # one key shift for every key; the feature part of a chunk is its prefix (extended keys before lo, with
        # the initial state), its suffix (keys after its band region) and, inside the band region, the keys
        # before a query or more than 2W - 2 after it
        ek, mk = key_logits(0, L)
        S, z, m, shift = _rescale(ek, S, z, m)
        phik = _apply(ek, mk, shift)  # [B, H_kv, L, F]
        chunks = [(lo, min(lo + chunk_size, T)) for lo in range(0, T, chunk_size)]
        prefix = []
        for lo, hi in chunks:
            prefix.append((S, z))
            S = S + phik[:, :, lo:hi].transpose(-1, -2) @ v_ext[:, :, lo:hi]
            z = z + phik[:, :, lo:hi].sum(-2)
        suffix = []
        Ss, zs, cursor = torch.zeros_like(S), torch.zeros_like(z), L
        for _, hi in reversed(chunks):
            e = min(hi + 2 * n, L)
            Ss = Ss + phik[:, :, e:cursor].transpose(-1, -2) @ v_ext[:, :, e:cursor]
            zs = zs + phik[:, :, e:cursor].sum(-2)
            cursor = e
            suffix.append((Ss, zs))
        for (lo, hi), (Sp, zp), (Ss, zs) in zip(chunks, prefix, reversed(suffix)):
            c, e = hi - lo, min(hi + 2 * n, L)
            phiq, sq = query_features(lo, hi)
            rel = band[None, : e - lo] - band[:c, None]
            exact = (rel >= 0) & (rel <= 2 * n) & has_band
            scores = (phiq @ phik[:, :, None, lo:e].transpose(-1, -2)).masked_fill(exact, 0.0)
            ve = v_ext[:, :, None, lo:e]
            num_f = scores @ ve + phiq @ (Sp + Ss)[:, :, None]
            den_f = scores.sum(-1, keepdim=True) + phiq @ (zp + zs)[:, :, None, :, None]
            logits, ve = exact_part(lo, hi, lo, e, exact)
            outs.append(combine(num_f, den_f, sq + shift[..., None], logits, ve))
    o = torch.cat(outs, dim=3) if outs else v_ext.new_zeros(B, Hk, G, 0, Dv)
    o = o.reshape(B, H, T, Dv).transpose(1, 2).to(v.dtype)
    if not output_final_state:
        return o, None
    # every extended key but the last n is in S (the initial state's included); the last n are the tail
    if sink_k is None:
        sink_part = tuple(t.to(cdt) if t.is_floating_point() else t for t in initial_state.sink_part)
    else:
        sink_part = (sink_k, sink_v, sink_keep, seen | fresh)
    return o, WindowState(S, z, m, k_ext[:, :, T:], v_ext[:, :, T:], keep_ext[:, T:], *sink_part)


def _cache_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    window,
    key_padding_mask,
    initial_state,
    output_final_state,
    sinks: int = 0,
    cache: int,
    score: str | None = None,
):
    """Hybrid attention with an exact cache (DESIGN.md section 9), causal, ``window`` >= 1: the readable
    oracle, one token at a time. Extended keys as in ``_window_attention`` (``n = W - 1`` tail keys first).
    Before query t, the extended key t - 1 (the key that query t - 1 held last in its band) competes for
    the cache (``cache.admit``: a free slot, or the lowest ``score`` of cache U candidate, None for
    ``cache.DEFAULT_SCORE``, is folded into the state); then query t attends exactly to its band (extended keys t .. t + n), the sinks it sees and the
    cached keys, and through the features to the state, with one normaliser (the factor ``log_mix`` on every
    exact logit). After the last query the extended key T - 1 competes too, so the final state has
    processed every key but the last n (its tail). Gradients flow through the attention with the cache's
    decisions held fixed (they are discrete)."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    Dv = v.shape[-1]
    n = window - 1
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    root = math.sqrt(params.scale)
    p = _cast_params(params, cdt)
    if initial_state is None:
        initial_state = empty_window_state(
            B, Hk, p.feature_dim, D, Dv, window, sinks=sinks, cache=cache, dtype=cdt, device=q.device
        )
    S, z, m = (t.to(cdt) for t in initial_state.rf)
    kc, vc = initial_state.k_cache.to(cdt), initial_state.v_cache.to(cdt)
    ckeep = initial_state.cache_keep.to(torch.bool)
    keep_t = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    kq, vq = k.to(cdt).transpose(1, 2), v.to(cdt).transpose(1, 2)  # [B, H_kv, T, .]
    if sinks > 0:
        keep_t, (sink_k, sink_v, sink_keep, sink_from, seen, fresh) = _sink_slots(
            initial_state, kq, vq, key_padding_mask, keep_t, sinks, cdt
        )
    k_ext = torch.cat([initial_state.k_tail.to(cdt), kq], dim=2)
    v_ext = torch.cat([initial_state.v_tail.to(cdt), vq], dim=2)
    keep_ext = torch.cat([initial_state.tail_keep.to(torch.bool), keep_t], dim=1)  # [B, n + T]
    x = (q.to(cdt) * root).transpose(1, 2).unflatten(1, (Hk, G))  # [B, H_kv, G, T, D]

    def step(S, z, m, kc, vc, ckeep, j):
        """Extended key j leaves the window and competes for the cache."""
        S, z, m, kc, vc, ckeep, _ = admit(
            S, z, m, kc, vc, ckeep, k_ext[:, :, j], v_ext[:, :, j], keep_ext[:, j], p, root, score
        )
        return S, z, m, kc, vc, ckeep

    outs = []
    for t in range(T):
        if t > 0:
            S, z, m, kc, vc, ckeep = step(S, z, m, kc, vc, ckeep, t - 1)
        xt = x[:, :, :, t]  # [B, H_kv, G, D]
        eq, mq = _features(xt, p, query=True)
        sq = eq.amax(-1, keepdim=True).detach()
        phiq = _apply(eq, mq, sq)  # [B, H_kv, G, F]
        num_f = phiq @ S  # [B, H_kv, G, Dv] on the scale exp(sq + shift)
        den_f = phiq @ z[..., None]  # [B, H_kv, G, 1]
        shift = safe_log_scale(m)[:, :, None, None]
        # the exact keys: the band (extended t .. t + n), the sinks query t sees, the cache
        keys, vals, vis = [k_ext[:, :, t : t + n + 1]], [v_ext[:, :, t : t + n + 1]], [keep_ext[:, t : t + n + 1]]
        if sinks > 0:
            keys.append(sink_k)
            vals.append(sink_v)
            vis.append(sink_keep & (sink_from <= t))
        keys.append(kc)
        vals.append(vc)
        vis.append(ckeep)
        ye, ve, visible = torch.cat(keys, 2) * root, torch.cat(vals, 2), torch.cat(vis, 1)
        logits = xt @ ye.transpose(-1, -2)  # [B, H_kv, G, K]
        if p.exact_sq != 0.0:
            logits = logits + p.exact_sq * ((xt * xt).sum(-1)[..., None] + (ye * ye).sum(-1)[:, :, None, :])
        if p.log_mix is not None:
            logits = logits + p.log_mix[None, :, None, None]
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
        top = torch.maximum(sq + shift, logits.amax(-1, keepdim=True).detach())
        pe = torch.exp(logits - top)
        alpha = torch.exp(sq + shift - top)
        outs.append((alpha * num_f + pe @ ve) / safe_denominator(alpha * den_f + pe.sum(-1, keepdim=True)))
    if T > 0:
        S, z, m, kc, vc, ckeep = step(S, z, m, kc, vc, ckeep, T - 1)
    o = torch.stack(outs, dim=3) if outs else v_ext.new_zeros(B, Hk, G, 0, Dv)  # [B, H_kv, G, T, Dv]
    o = o.reshape(B, H, T, Dv).transpose(1, 2).to(v.dtype)
    if not output_final_state:
        return o, None
    if sinks > 0:
        sink_part = (sink_k, sink_v, sink_keep, seen | fresh)
    else:
        sink_part = tuple(t.to(cdt) if t.is_floating_point() else t for t in initial_state.sink_part)
    tail = (k_ext[:, :, T:], v_ext[:, :, T:], keep_ext[:, T:])
    return o, CacheState(S, z, m, *tail, *sink_part, kc, vc, ckeep)


def per_sequence(
    attend, q, k, v, params: FeatureParams, offsets: list[int], *, causal, initial_state, output_final_state, **kwargs
):
    """The packed-sequence semantics, by definition: ``attend`` (a backend function with
    ``reference_attention``'s signature) on every sequence ``offsets[i]:offsets[i + 1]`` of q, k, v
    ``[1, sum T_i, ., .]`` on its own, with row i of the parameters and of the initial state (an
    ``RFState``, or a ``WindowState`` with ``window=``); outputs concatenated along time, final states
    stacked along the sequence axis."""
    n = len(offsets) - 1
    window = kwargs.get("window")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    def empty(rows):
        Hk, F, Dv = k.shape[2], params.feature_dim, v.shape[-1]
        if window is None:
            return empty_state(rows, Hk, F, Dv, dtype=cdt, device=q.device)
        sinks, cache = kwargs.get("sinks", 0), kwargs.get("cache", 0)
        D = q.shape[-1]
        return empty_window_state(rows, Hk, F, D, Dv, window, sinks=sinks, cache=cache, dtype=cdt, device=q.device)

    outs, finals = [], []
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        init = None if initial_state is None else type(initial_state)(*(t[i : i + 1] for t in initial_state))
        if a == b:  # an empty sequence: no output rows; its state passes through
            if init is None:
                init = empty(1)
            outs.append(v.new_empty(1, 0, q.shape[2], v.shape[-1]))
            finals.append(type(init)(*(t if t.dtype == torch.bool else t.to(cdt) for t in init)))
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
        return o, type(finals[0])(*(torch.cat(parts, dim=0) for parts in zip(*finals)))
    return o, empty(0)


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
    q,
    k,
    v,
    *,
    kernel: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask=None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact kernel attention (softmax attention for kernel="softmax"), O(T^2), ``[B, T, H, Dv]``.
    A query with no visible key gets 0. k, v may have H_kv heads dividing H (grouped-query attention:
    query head h reads key/value head h // (H / H_kv), as SDPA with enable_gqa). ``window`` W keeps only
    the keys of the hybrid's exact set (causal: t - W < j <= t; non-causal: |t - j| < W): sliding-window
    attention, the hybrid without its feature part."""
    G = q.shape[2] // k.shape[2]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    logits = exact_logits(q, k, kernel=kernel, scale=scale)
    T = q.shape[1]
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    if window:
        t = torch.arange(T, device=q.device)
        logits = logits.masked_fill((t[:, None] - t[None, :]).abs() >= window, float("-inf"))
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (w @ v.transpose(1, 2).to(w.dtype)).transpose(1, 2)


def reference_grads(params: FeatureParams, inputs, out_grads, make_state, *, mix: bool = False, **attend):
    """The gradients of ``inputs`` (q, k, v, W, bias, with ``mix`` the factor ``log_mix``, then the initial
    state's tensors; None where absent) by
    recomputing the forward through the reference backend under enable_grad and differentiating that graph
    (exact, at the cost of one reference forward and backward). ``make_state`` builds the initial state from
    the state's leaves (None for no state); ``out_grads`` are the gradients of the output and of the final
    state's fields in order, None where none flows; ``attend`` the reference's other keyword arguments."""
    leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    lq, lk, lv, lW, lbias, *lstate = leaves
    with torch.enable_grad():
        if mix:
            lmix, *lstate = lstate
            rp = dataclasses.replace(params, W=lW, bias=lbias, log_mix=lmix)
        else:
            rp = dataclasses.replace(params, W=lW, bias=lbias)
        # packed sequences: the reference runs them one by one on views
        o, final = reference_attention(
            lq, lk, lv, rp, initial_state=make_state(lstate), output_final_state=True, **attend
        )
        outs, grads = [], []
        for out, g in zip((o, *final), out_grads):
            if g is not None and out.requires_grad:
                outs.append(out)
                grads.append(g)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = torch.autograd.grad(outs, wanted, grads, allow_unused=True) if outs and wanted else []
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in leaves]
