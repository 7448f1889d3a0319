"""The exact cache (``cache=C``, DESIGN.md section 9) on the CPU backend: ``cpu_cache_attention``.

The decisions first. With a state-free score (``cache.STATE_FREE_SCORES``, the default ``"kernel"``) a key's
score never changes and the cache is always the C best-scored candidates so far, so every key's fate is
decided for the whole piece at once (``_decide_at_once``: O(T^2) comparisons per head, in row blocks, no loop
over tokens). A score that reads the feature state (``"recall"``) is sequential by nature: one ``cache.admit``
per key leaving the window, as the reference takes them (``_decide_in_a_loop``). Either way every key gets
the last query for which it is exact (its band, then its stay in the cache: ``[j - W + 1, until_j]``) and
the features after it, and the outputs are computed in query blocks of ``chunk_size`` with matrix products
instead of one small product per token:

- the feature state at the block's first query (the keys folded before it), rescaled to the key maximum at
  the block's end;
- the keys that may be exact for a query of the block: the cache's slots at the block's start and the
  extended keys of the band region ``lo .. hi + W - 2``; each is exact for the queries in its interval and a
  feature key for the later queries of the block (a key folded inside the block);
- the sinks, as the reference adds them.

The cache and the tail equal the reference's (slots in arrival order, ties to the newer key), the state to
rounding (its folds are summed block by block). A T = 1 call (a decoding step) without gradients runs the
query in the compiled extension (``_compiled_step``: the window's C++ step with the cache's slots read as
exact keys beside the sinks) and then the reference's decision (``cache.admit``); with gradients, fp64 or
W = 1 it runs the reference's step.

Cost (``bench/results/cache-mqar-2026-12-07.md``): a 1024-token prefill about 10x the window alone and a
tenth of the reference's loop. The prefill is pure PyTorch, device-agnostic: autograd flows through the
attention with the decisions held fixed, as in the reference.
"""

from __future__ import annotations

import math

import torch

from ... import cache as cache_rules
from ...cache import STATE_FREE_SCORES, _scores_and_features, admit, key_scores
from ...contract import FeatureParams
from ...feature_math import _apply, _cast_params, _features, _rescale, safe_denominator
from ...reference import _cache_attention, _sink_slots, per_sequence
from ...state import CacheState, empty_window_state, safe_log_scale
from .extension import _load


def cpu_cache_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    causal: bool,
    key_padding_mask=None,
    initial_state: CacheState | None = None,
    output_final_state: bool = False,
    cu_seqlens=None,
    window: int,
    sinks: int = 0,
    cache: int,
    chunk_size: int = 64,
    score: str | None = None,
):
    """Hybrid attention with an exact cache of ``cache`` keys, the semantics of
    ``reference_attention(..., window=W, sinks=S, cache=C)`` (causal, W >= 1, checked by the caller).
    Returns ``(o [B, T, H, Dv] in v's dtype, CacheState in fp32 or None)``."""
    if not causal or not window or not cache:
        raise ValueError("cpu_cache_attention needs causal=True, a window >= 1 and cache >= 1")
    if cu_seqlens is not None:
        return per_sequence(
            cpu_cache_attention,
            q,
            k,
            v,
            params,
            cu_seqlens.tolist(),
            causal=causal,
            initial_state=initial_state,
            output_final_state=output_final_state,
            window=window,
            sinks=sinks,
            cache=cache,
            chunk_size=chunk_size,
            score=score,
        )
    B, T, H, D = q.shape
    if T == 1 and _compiled_step_applies(q, k, v, params, initial_state, window):
        return _compiled_step(
            q,
            k,
            v,
            params,
            key_padding_mask=key_padding_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            window=window,
            sinks=sinks,
            cache=cache,
            score=score,
        )
    if T == 1:  # a decoding step: one decision and one query, the reference's step has fewer operations
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
    Hk = k.shape[2]
    G = H // Hk
    Dv = v.shape[-1]
    n = window - 1
    C = cache
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    root = math.sqrt(params.scale)
    p = _cast_params(params, cdt)
    if initial_state is None:
        initial_state = empty_window_state(
            B, Hk, p.feature_dim, D, Dv, window, sinks=sinks, cache=C, dtype=cdt, device=dev
        )
    S, z, m = (t.to(cdt) for t in initial_state.rf)
    kc0, vc0 = initial_state.k_cache.to(cdt), initial_state.v_cache.to(cdt)
    ckeep0 = initial_state.cache_keep.to(torch.bool)
    keep_t = torch.ones(B, T, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask
    kq, vq = k.to(cdt).transpose(1, 2), v.to(cdt).transpose(1, 2)
    if sinks > 0:
        keep_t, (sink_k, sink_v, sink_keep, sink_from, seen, fresh) = _sink_slots(
            initial_state, kq, vq, key_padding_mask, keep_t, sinks, cdt
        )
    k_ext = torch.cat([initial_state.k_tail.to(cdt), kq], dim=2)  # [B, H_kv, L, D], L = n + T
    v_ext = torch.cat([initial_state.v_tail.to(cdt), vq], dim=2)
    keep_ext = torch.cat([initial_state.tail_keep.to(torch.bool), keep_t], dim=1)  # [B, L]
    L = n + T

    # -- the decisions. Every key has an id: the initial cache's slots 0 .. C - 1, extended key j is C + j;
    # ``until[id]`` is the last query for which it is exact (big: past the piece). ``snaps[lo]``: the feature
    # state before query lo and the cache's ids and keep flags then, at every block boundary lo.
    bounds = list(range(0, T, chunk_size)) + [T]
    score = cache_rules.DEFAULT_SCORE if score is None else score  # read at call time
    if score in STATE_FREE_SCORES:
        until, snaps, (S, z, m, kc, vc, ckeep) = _decide_at_once(
            S, z, m, kc0, vc0, ckeep0, k_ext, v_ext, keep_ext, T, p, root, score, bounds
        )
    else:
        until, snaps, (S, z, m, kc, vc, ckeep) = _decide_in_a_loop(
            S, z, m, kc0, vc0, ckeep0, k_ext, v_ext, keep_ext, T, p, root, score, bounds
        )
    k_all = torch.cat([kc0, k_ext], dim=2)  # by id
    v_all = torch.cat([vc0, v_ext], dim=2)

    # -- the attention in query blocks ------------------------------------------------------------------
    x = (q.to(cdt) * root).transpose(1, 2).unflatten(1, (Hk, G))  # [B, H_kv, G, T, D]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        c = hi - lo
        S0, z0, m0, ids_slot, keep_slot = snaps[lo]
        m1 = snaps[hi][2]  # the key maximum once every key folded in the block is in
        shift = safe_log_scale(m1)  # [B, H_kv]
        a0 = torch.exp(m0 - shift)[..., None, None]  # 0 while the state is empty
        e = min(hi + n, L)
        ids = torch.cat([ids_slot, (C + torch.arange(lo, e, device=dev)).expand(B, Hk, e - lo)], dim=2)  # [B, H_kv, K]
        valid = torch.cat([keep_slot, keep_ext[:, lo:e]], dim=1)[:, None, :]  # [B, 1, K]
        start = torch.cat([torch.full((C,), -1, device=dev), torch.arange(lo, e, device=dev) - n])  # [K]
        last = until.gather(2, ids)  # [B, H_kv, K]
        kb = k_all.gather(2, ids[..., None].expand(B, Hk, ids.shape[-1], D)) * root
        vb = v_all.gather(2, ids[..., None].expand(B, Hk, ids.shape[-1], Dv))
        t = torch.arange(lo, hi, device=dev)[:, None]  # [c, 1]
        exact = valid[:, :, None] & (start <= t) & (t <= last[:, :, None])  # [B, H_kv, c, K]
        feat = valid[:, :, None] & (t > last[:, :, None])
        # features of the keys folded inside the block (the others masked before the exponential: their
        # exponents may exceed the block's key maximum)
        ek, mk = _features(kb, p, query=False)  # [B, H_kv, K, F]
        ek = ek.masked_fill(~(valid & (last < hi - 1))[..., None], float("-inf"))
        phik = _apply(ek, mk, shift[..., None, None])
        xs = x[:, :, :, lo:hi]
        eq, mq = _features(xs.flatten(2, 3), p, query=True)
        sq = eq.amax(-1, keepdim=True).detach()
        phiq = _apply(eq, mq, sq).unflatten(2, (G, c))  # [B, H_kv, G, c, F]
        sq = sq.unflatten(2, (G, c))
        scores = (phiq @ phik[:, :, None].transpose(-1, -2)) * feat[:, :, None]  # [B, H_kv, G, c, K]
        num_f = scores @ vb[:, :, None] + phiq @ (a0 * S0)[:, :, None]
        den_f = scores.sum(-1, keepdim=True) + phiq @ (a0[..., 0] * z0)[:, :, None, :, None]
        logits = xs @ kb[:, :, None].transpose(-1, -2)  # [B, H_kv, G, c, K]
        if p.exact_sq != 0.0:
            logits = logits + p.exact_sq * ((xs * xs).sum(-1)[..., None] + (kb * kb).sum(-1)[:, :, None, None, :])
        logits = logits.masked_fill(~exact[:, :, None], float("-inf"))
        ve = vb[:, :, None]
        if sinks > 0:
            sees = (sink_from[:, None, :] <= t[None]) & sink_keep[:, None, :]  # [B, c, S]
            ys = sink_k * root
            sl = xs @ ys[:, :, None].transpose(-1, -2)
            if p.exact_sq != 0.0:
                sl = sl + p.exact_sq * ((xs * xs).sum(-1)[..., None] + (ys * ys).sum(-1)[:, :, None, None, :])
            sl = sl.masked_fill(~sees[:, None, None], float("-inf"))
            logits = torch.cat([logits, sl], dim=-1)
            ve = torch.cat([ve, sink_v[:, :, None].expand(B, Hk, 1, sinks, Dv)], dim=-2)
        if p.log_mix is not None:
            logits = logits + p.log_mix[None, :, None, None, None]
        fs = sq + shift[:, :, None, None, None]
        top = torch.maximum(fs, logits.amax(-1, keepdim=True).detach())
        pe = torch.exp(logits - top)
        alpha = torch.exp(fs - top)
        outs.append((alpha * num_f + pe @ ve) / safe_denominator(alpha * den_f + pe.sum(-1, keepdim=True)))
    o = torch.cat(outs, dim=3) if outs else v_ext.new_zeros(B, Hk, G, 0, Dv)
    o = o.reshape(B, H, T, Dv).transpose(1, 2).to(v.dtype)
    if not output_final_state:
        return o, None
    if sinks > 0:
        sink_part = (sink_k, sink_v, sink_keep, seen | fresh)
    else:
        sink_part = tuple(t.to(cdt) if t.is_floating_point() else t for t in initial_state.sink_part)
    return o, CacheState(S, z, m, k_ext[:, :, T:], v_ext[:, :, T:], keep_ext[:, T:], *sink_part, kc, vc, ckeep)


def _compiled_step_applies(q, k, v, params: FeatureParams, state, window: int) -> bool:
    """Whether a T = 1 call takes ``_compiled_step``: the extension is built, the inputs are fp32, bf16 or
    fp16 on the CPU, the window holds a tail (W >= 2) and nothing asks for gradients (the step's fused
    forward has no backward here; the reference's step has, with the decisions held fixed)."""
    if window < 2 or q.dtype == torch.float64 or q.device.type != "cpu" or _load() is None:
        return False
    if not torch.is_grad_enabled():
        return True
    tensors = (q, k, v, params.W, params.bias, params.log_mix, *(() if state is None else state))
    return not any(t is not None and t.requires_grad for t in tensors)


def _compiled_step(
    q, k, v, params: FeatureParams, *, key_padding_mask, initial_state, output_final_state, window, sinks, cache, score
):
    """A decoding step (T = 1) on the compiled extension: the query runs in ``window_forward`` (as the
    window's step) with the cache's slots read as exact keys beside the sinks (every slot held is seen), and
    the state after it is the reference's: the tail moves by one, the sinks fill as in the reference, and the
    key that leaves the window (the tail's first, which this query held last) competes for the cache
    (``cache.admit``) against the state before the call; in decoding's steady state (a state-free score, every
    row's cache full and its candidate kept) the same decision and then the fold in one call of the extension
    (``cache_fold``, csrc/rf_cache.cpp). The output equals the reference's step to rounding (the same exact
    keys, the same features; the sums run in another order), so does the state; the tail, the sinks, the cache
    and the decisions equal it bit for bit (the same scores on the same fp32 keys)."""
    from .window import _forward, _sink_slots

    B, _, _, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    f32 = torch.float32
    st = initial_state
    if st is None:
        st = empty_window_state(B, Hk, params.feature_dim, D, Dv, window, sinks=sinks, cache=cache, dtype=f32)
    st = CacheState(*(t if t.dtype == torch.bool else t.to(f32) for t in st))
    ws = st.window_state
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    slots = _sink_slots(k, v, mask, *ws.sink_part, None) if sinks else None
    outs = _forward(
        q, k, v, params, params.log_mix, True, window, mask, ws, None, None, slots=slots, extra=st.cache_part
    )
    o = outs[0]
    if not output_final_state:
        return o, None
    p = _cast_params(params, f32)
    root = math.sqrt(params.scale)
    kn, vn, keep_new = st.k_tail[:, :, 0], st.v_tail[:, :, 0], st.tail_keep[:, 0]
    score = cache_rules.DEFAULT_SCORE if score is None else score  # read at call time
    if score in STATE_FREE_SCORES and bool(st.cache_keep.all()) and bool(keep_new.all()):
        # decoding's steady state: every row's cache is full and its candidate competes. The decision is
        # admit's (the same scores, the first lowest), the fold and the slots' shift one call of the extension
        # (the state equals admit's to rounding: exp is another implementation's)
        ck = torch.cat([st.k_cache, kn[:, :, None]], dim=2)
        cv = torch.cat([st.v_cache, vn[:, :, None]], dim=2)
        sc, (e, mult) = _scores_and_features(ck, cv, st.S, st.z, st.log_scale, p, root, score)
        mult = None if mult is None else mult.contiguous()
        S, z, m, kc, vc = _load().cache_fold(
            *(t.contiguous() for t in (st.S, st.z, st.log_scale, e)), mult, ck, cv, sc.argmin(-1).contiguous()
        )
        return o, CacheState(S, z, m, *outs[4:], kc, vc, st.cache_keep)
    S, z, m, kc, vc, ckeep, _ = admit(st.S, st.z, st.log_scale, *st.cache_part, kn, vn, keep_new, p, root, score)
    return o, CacheState(S, z, m, *outs[4:], kc, vc, ckeep)


def _decide_in_a_loop(S, z, m, kc0, vc0, ckeep0, k_ext, v_ext, keep_ext, T, p, root, score, bounds):
    """The decisions one key at a time (``cache.admit``, as the reference takes them: the same cache and
    state bit for bit); any score. Returns ``(until, snaps, final (S, z, m, k_cache, v_cache, cache_keep))``."""
    B, Hk, C, _ = kc0.shape
    L = k_ext.shape[2]
    dev = kc0.device
    # one column more takes the "nothing folded" writes
    until = torch.full((B, Hk, C + L + 1), T + L + 1, dtype=torch.long, device=dev)
    slot_id = torch.arange(C, device=dev).expand(B, Hk, C).clone()
    snaps, marks = {}, set(bounds)
    kc, vc, ckeep = kc0, vc0, ckeep0
    for j in range(T + 1):
        if j in marks:
            snaps[j] = (S, z, m, slot_id, ckeep)
        if j == T:
            break
        S, z, m, kc, vc, ckeep, did = admit(
            S, z, m, kc, vc, ckeep, k_ext[:, :, j], v_ext[:, :, j], keep_ext[:, j], p, root, score
        )
        cand = torch.full_like(did.folded, C + j)
        out_id = torch.where(did.folded == C, cand, slot_id.gather(2, did.folded.clamp(0, C - 1)[..., None])[..., 0])
        out_id = torch.where(did.folded >= 0, out_id, torch.full_like(out_id, C + L))
        until.scatter_(2, out_id[..., None], j)  # folded after query j: exact up to it
        pos = torch.arange(C, device=dev)
        shift = (did.folded >= 0) & (did.folded < C)  # a cached key folded: the later slots move up
        take = torch.where(shift[..., None], pos + (pos >= did.folded[..., None]), pos).clamp(max=C - 1)
        slot_id = slot_id.gather(2, take)
        hot = pos == did.slot[..., None]  # [B, H_kv, C]; slot -1 matches nothing
        slot_id = torch.where(hot, cand[..., None], slot_id)
    return until[..., : C + L], snaps, (S, z, m, kc, vc, ckeep)


def _first_ids(mask, count: int):
    """The first ``count`` ids (ascending) where ``mask [B, H_kv, N]`` holds, padded with others: ``(ids
    [B, H_kv, count], held [B, H_kv, count])``."""
    N = mask.shape[-1]
    rank = torch.arange(N, 0, -1, device=mask.device)  # N .. 1: earlier ids first
    key = torch.where(mask, rank + N, rank)
    count = min(count, N)
    ids = key.topk(count, dim=-1).indices if count else key[..., :0].long()
    return ids, mask.gather(-1, ids)


def _decide_at_once(S, z, m, kc0, vc0, ckeep0, k_ext, v_ext, keep_ext, T, p, root, score, bounds, rows=256):
    """The decisions of a state-free score without a loop over tokens. A key's score does not change, and
    folding the lowest of cache U candidate keeps the cache the C best-scored candidates so far; so key j
    (arriving at step a_j: -1 for the initial cache, j for extended key j) is folded at the step at which
    the C-th key that beats it has arrived (at a_j if C had arrived before it), and never if fewer do. A key
    beats another with a higher score, or an equal one and a later arrival (``cache.admit`` keeps its slots
    in arrival order and folds the first lowest: the same rule). The state at every block boundary adds the features of the keys folded
    in the block (at most one per step). Returns what ``_decide_in_a_loop`` returns; the final cache holds
    its keys in arrival order, as the loop's slots."""
    B, Hk, C, D = kc0.shape
    L, Dv = k_ext.shape[2], v_ext.shape[-1]
    dev = kc0.device
    N = C + T  # the candidates: the initial cache, then extended keys 0 .. T - 1
    big = T + L + 1
    kn = torch.cat([kc0, k_ext[:, :, :T]], dim=2)
    vn = torch.cat([vc0, v_ext[:, :, :T]], dim=2)
    valid = torch.cat([ckeep0, keep_ext[:, :T]], dim=1)[:, None, :].expand(B, Hk, N)  # [B, H_kv, N]
    sc = key_scores(kn, vn, S, z, m, p, root, score)  # [B, H_kv, N]
    arrive = torch.cat([torch.full((C,), -1, device=dev), torch.arange(T, device=dev)])  # [N]
    order = torch.arange(N, device=dev)
    until = torch.full((B, Hk, N), big, dtype=torch.long, device=dev)
    for lo in range(0, N, rows):
        hi = min(lo + rows, N)
        sj = sc[..., lo:hi, None]  # [B, H_kv, r, 1] against every candidate i [..., N]
        si = sc[..., None, :]
        beats = valid[..., None, :] & ((si > sj) | ((si == sj) & (order > order[lo:hi, None])))
        cnt = beats.to(torch.int32).cumsum(-1)  # beaters among the first i + 1 candidates in arrival order
        full = cnt >= C
        first = full.to(torch.uint8).argmax(-1)  # the candidate whose arrival folds j
        when = torch.maximum(arrive[first], arrive[lo:hi])
        until[..., lo:hi] = torch.where(full.any(-1), when, torch.full_like(when, big))
    until = torch.where(valid, until, torch.full_like(until, big))
    snaps = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        here = valid & (arrive < lo) & (until >= lo)  # in the cache before query lo
        ids, held = _first_ids(here, C)
        snaps[lo] = (S, z, m, ids, held[:, 0])
        # the keys folded by the steps lo .. hi - 1 (at most one per step)
        ids, held = _first_ids(valid & (until >= lo) & (until < hi), hi - lo)
        kf = kn.gather(2, ids[..., None].expand(B, Hk, ids.shape[-1], D))
        vf = vn.gather(2, ids[..., None].expand(B, Hk, ids.shape[-1], Dv))
        ek, mk = _features(kf * root, p, query=False)
        ek = ek.masked_fill(~held[..., None], float("-inf"))
        S, z, m, shift = _rescale(ek, S, z, m)
        phik = _apply(ek, mk, shift)
        S = S + phik.transpose(-1, -2) @ vf
        z = z + phik.sum(-2)
    here = valid & (until == big)  # never folded: the final cache
    ids, held = _first_ids(here, C)
    snaps[T] = (S, z, m, ids, held[:, 0])
    kc = kn.gather(2, ids[..., None].expand(B, Hk, C, D)) * held[..., None]
    vc = vn.gather(2, ids[..., None].expand(B, Hk, C, Dv)) * held[..., None]
    full_until = torch.cat([until, torch.full((B, Hk, L - T), big, dtype=torch.long, device=dev)], dim=2)
    return full_until, snaps, (S, z, m, kc, vc, held[:, 0])
