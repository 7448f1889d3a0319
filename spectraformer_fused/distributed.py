"""Random-feature attention across processes (``torch.distributed``): context parallelism by state
passing, and the pieces data-parallel training needs to keep replicas identical.

Context parallelism. Random-feature attention carries everything it knows about a prefix of keys in the
state ``(S [B, H, F, Dv], z [B, H, F], log_scale [B, H])``, whose size does not depend on the length of
the prefix. When the ranks of a group hold contiguous pieces of one sequence (rank order = sequence
order), each rank computes the state of its own keys, the states are all-gathered (one collective of
``B H (F Dv + F + 1)`` numbers per rank), and each rank combines exactly

    causal:      the states of the ranks before it   (its queries see every earlier key)
    non-causal:  the states of every other rank      (its queries see every key)

by rescaling each to the largest stabiliser (``S_i exp(m_i - max_j m_j)``, as the state of one process
is rescaled when its running maximum grows). That combined state is the ``initial_state`` of the local
attention, computed by the usual backends. Ring attention would move all of K and V instead.

OPRF and SADERF take their parameters from statistics of the sequence (non-causal) or update running
statistics from it (training): their per-(batch, head) moments are all-reduced over the group first
(masked sums and counts), so every rank uses the moments of the whole sequence, as one process would.

Gradients flow through the collectives (the adjoint of the all-gather is a reduce over ranks), so
``backward`` is a collective too: every rank of the group must run it. Each rank's gradients of its q, k,
v slices equal the single-process gradients of those slices; a parameter used on every rank (a learnable
W, the q/k/v projections) gets on each rank the part of its gradient that flows through that rank's
computation, and the sum over ranks is the single-process gradient. DistributedDataParallel averages
gradients over its ranks, i.e. it gives that sum divided by the world size: the gradient of the mean of
the per-rank losses, as for any loss split across ranks.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing
import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from .attention import _backend_function, _resolve_backend
from .components import Moments
from .feature_map import RandomFeatureMap
from .state import RFState, WindowState, empty_sinks, empty_state, empty_window_state, safe_log_scale
from .validation import check_attention_inputs, check_sinks, check_window, hybrid_window, resolve_scale

__all__ = [
    "context_parallel_rf_attention",
    "convert_sync_stats",
    "RunningStatsAllReduce",
    "CommunicationLog",
    "run_local",
]

# ----------------------------------------------------------------------------------------------------
# Counting what is communicated
# ----------------------------------------------------------------------------------------------------


class CommunicationLog:
    """Counts the collectives of this module on this rank while active (``with CommunicationLog() as log``).

    ``records`` holds ``(op, payload_bytes, sent_bytes)`` per collective, forward and backward alike.
    ``payload_bytes`` is the size of the tensor this rank hands to the collective; ``sent_bytes`` is what
    a ring algorithm sends from this rank: ``(w - 1) * payload`` for an all-gather (every other rank needs
    this rank's piece) and ``2 (w - 1) / w * payload`` for an all-reduce, with ``w`` the group size.
    """

    _active: list["CommunicationLog"] = []

    def __init__(self):
        self.records: list[tuple[str, int, int]] = []

    def __enter__(self) -> "CommunicationLog":
        CommunicationLog._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        CommunicationLog._active.remove(self)

    @property
    def sent_bytes(self) -> int:
        return sum(r[2] for r in self.records)

    @property
    def payload_bytes(self) -> int:
        return sum(r[1] for r in self.records)

    @classmethod
    def _record(cls, op: str, t: torch.Tensor, group) -> None:
        if not cls._active:
            return
        w = dist.get_world_size(group)
        n = t.numel() * t.element_size()
        sent = (w - 1) * n if op.startswith("all_gather") else int(round(2 * (w - 1) / w * n))
        for log in cls._active:
            log.records.append((op, n, sent))


# ----------------------------------------------------------------------------------------------------
# Differentiable collectives (the group's members all run forward and backward)
# ----------------------------------------------------------------------------------------------------


def _all_reduce_sum(t: torch.Tensor, group, op: str) -> torch.Tensor:
    t = t.contiguous().clone()
    CommunicationLog._record(op, t, group)
    dist.all_reduce(t, group=group)
    return t


class _AllGather(torch.autograd.Function):
    """Stacks every rank's tensor: ``[w, *shape]``. Backward: this rank's gradient is the sum over ranks
    of their gradients of its piece (an all-reduce of the stacked gradients, then its own row; gloo has
    no reduce-scatter)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        t = t.contiguous()
        out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
        CommunicationLog._record("all_gather", t, group)
        dist.all_gather(out, t, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = _all_reduce_sum(grad, ctx.group, "all_reduce (all_gather backward)")
        return grad[dist.get_rank(ctx.group)], None


# ----------------------------------------------------------------------------------------------------
# States: the state of one slice of keys, and the exact combination of several
# ----------------------------------------------------------------------------------------------------


def _combine(S: torch.Tensor, z: torch.Tensor, m: torch.Tensor, take: torch.Tensor) -> RFState:
    """The state of the keys of every piece ``i`` with ``take[i]``: ``sum_i S_i exp(m_i - m_new)`` (and z)
    with ``m_new = max_i m_i``. ``S [n, B, H, F, Dv]``, ``z [n, B, H, F]``, ``m [n, B, H]`` (detached);
    ``take [n]`` bool. Every piece stays in the autograd graph (with weight 0 when not taken), so that
    every rank runs the backward of the collective that made them."""
    m = m.detach()
    neg_inf = torch.tensor(float("-inf"), dtype=m.dtype, device=m.device)
    m_sel = torch.where(take[:, None, None], m, neg_inf)  # [n, B, H]
    m_new = m_sel.amax(0)
    alpha = torch.exp(m_sel - safe_log_scale(m_new))  # 0 for a piece not taken or empty
    return RFState((S * alpha[..., None, None]).sum(0), (z * alpha[..., None]).sum(0), m_new)


def _pack(state: RFState) -> torch.Tensor:
    S, z, m = state
    B, H = m.shape
    return torch.cat([S.reshape(B, H, -1), z, m.detach()[..., None]], dim=-1)  # [B, H, F Dv + F + 1]


def _unpack(packed: torch.Tensor, F: int, Dv: int) -> RFState:
    lead = packed.shape[:-1]
    S = packed[..., : F * Dv].reshape(*lead, F, Dv)
    z = packed[..., F * Dv : F * Dv + F]
    return RFState(S, z, packed[..., -1].detach())


def _group_moments(q, k, scale: float, key_padding_mask, group) -> Moments:
    """The per-(batch, key/value head) moments of the scaled queries and keys of the WHOLE sequence
    ``[B, H_kv, D]``: masked sums and counts of every rank's slice, all-reduced; with grouped-query
    attention the queries of a group are pooled as ``RandomFeatureMap.feature_params`` pools them.
    Constants for differentiation."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    root = math.sqrt(scale)
    x, y = q.detach().to(cdt) * root, k.detach().to(cdt) * root  # [B, T, H, D], [B, T, H_kv, D]
    B, T, H, D = x.shape
    Hk = y.shape[2]
    w = (torch.ones(B, T, dtype=cdt, device=q.device) if key_padding_mask is None else key_padding_mask.to(cdt))[
        :, :, None, None
    ]  # [B, T, 1, 1]
    sx = torch.stack([(x * w).sum(1), (x * x * w).sum(1)])  # [2, B, H, D]
    sy = torch.stack([(y * w).sum(1), (y * y * w).sum(1)])  # [2, B, H_kv, D]
    packed = _all_reduce_sum(
        torch.cat([sx.flatten(), sy.flatten(), w.flatten(1).sum(1)]), group, "all_reduce (moments)"
    )
    total = packed[-B:].clamp_min(1.0)[:, None, None]  # [B, 1, 1]: kept positions
    mx = packed[: sx.numel()].view(2, B, H, D) / total
    my = packed[sx.numel() : -B].view(2, B, Hk, D) / total
    if H != Hk:  # the queries of a group count together: means over time, then over the group
        mx = mx.unflatten(2, (Hk, H // Hk)).mean(3)
    return Moments(mx[0], mx[1], my[0], my[1])


# ----------------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------------


def _resolve_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "context_parallel_rf_attention needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or torchrun)"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return world, rank


def context_parallel_rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: RandomFeatureMap,
    *,
    group=None,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    initial_state=None,
    output_final_state: bool = False,
    backend: str = "auto",
    window: int | None = None,
    sinks: int | None = None,
):
    """Random-feature attention of one sequence split across the ranks of ``group``.

    Every rank passes its own contiguous slice ``q, k [B, T_r, H, D]``, ``v [B, T_r, H, Dv]`` (and
    ``key_padding_mask [B, T_r]``), rank ``r`` of the group holding positions after those of rank
    ``r - 1``; the slices may differ in length (even be empty). The result on each rank equals the
    matching slice of ``rf_attention`` on the whole sequence, forward and backward (see the module
    docstring for how gradients of shared parameters add up over ranks).

    Communication per rank and call: one all-gather of the slice states, ``B H (F Dv + F + 1)`` numbers
    in fp32 (fp64 for fp64 inputs) whatever the length, i.e. ``(w - 1) B H (F Dv + F + 1)`` numbers sent
    and received per rank for ``w`` ranks; OPRF and SADERF (non-causal, or causal in training) add one
    all-reduce of ``4 B H D + B`` numbers. The backward all-reduces the gradients of the gathered states
    (``w`` times the state; gloo has no reduce-scatter): ``2 (w - 1)`` states sent per rank.
    ``CommunicationLog`` counts it all.

    Work per rank: the keys of its slice are walked twice, once for its state (a non-causal pass of the
    backend) and once in the attention that starts from the combined state.

    Args:
        q, k, v, feature_map, scale, key_padding_mask, backend: as for ``rf_attention``, for this rank's
            slice. The feature map must be the same on every rank (same W: build it with a seed, or call
            ``redraw()`` under the process group; same running statistics).
        group: the process group holding the sequence (default: the whole world).
        causal: True (the default here) or False.
        initial_state: the state before the first position of the sequence; read on the group's first
            rank only (ignored elsewhere).
        output_final_state: also return the state after the LAST position of the whole sequence, the
            same on every rank (for decoding after a context-parallel prefill).
        window: hybrid attention (DESIGN.md section 6). Each rank also needs the last W - 1 keys and values
            before its slice (its initial tail, which may reach back over several short slices): every rank
            computes the ``WindowState`` of its slice, the states are all-gathered (``B H_kv (F Dv + F + 1 +
            (W - 1)(D + Dv))`` numbers plus ``B W`` keep flags and lengths per rank), and rank r composes
            those of ranks before it: their feature states, the features of the tail keys later positions
            pushed out of the window, and the last W - 1 positions as its tail. Non-causal, the mirror image
            too: every rank also sends the state of its keys after its first W - 1 and those first W - 1
            keys and values (as much again); rank r composes those of the ranks after it into the first
            W - 1 positions after its slice (attended as extra keys, exact or not by distance) and the
            features of every later key, added to the state every query reads.
        sinks: attention sinks (DESIGN.md section 8): the first S positions of the WHOLE sequence (which may
            span several short slices, some empty; with an initial state, the positions its ``sink_seen`` has
            not seen yet) are exact for every query that sees them, besides the window (``window=None``:
            sinks only, the internal window 0 of ``rf_attention``); they never enter a tail or a feature
            state. Before the state gather, one more all-gather: every rank's sink slots after its slice
            alone, i.e. its first min(S, T_r) keys and values padded to S (rank 0's after its initial
            state's slots), ``B H_kv S (D + Dv)`` numbers, and ``2 B S`` keep/seen flags; each rank
            composes those of the ranks before it (the sinks its causal queries may see, and the count that
            tells which of its own tokens are sinks) and of every rank (the non-causal queries' sinks, and
            the final state's slots, the same on every rank). The backward all-reduces their gradients
            (``w`` times that payload). Nothing else changes: sinks leave the states and tails that are
            gathered.

    Returns:
        o ``[B, T_r, H, Dv]``, or ``(o, state)`` when ``output_final_state``: an ``RFState``, or a
        ``WindowState`` with a window or sinks.

    Every rank of the group must call it (and later run backward) together, with the same B, H, D, Dv,
    dtype, causal flag and options, as for any collective.
    """
    if not isinstance(feature_map, RandomFeatureMap):
        raise TypeError(f"feature_map must be a RandomFeatureMap, got {type(feature_map).__name__}")
    sinks = check_sinks(sinks)
    world, rank = _resolve_group(group)
    window = hybrid_window(check_window(window), sinks)  # sinks without a window: the internal window 0
    F = feature_map.feature_dim
    state0 = check_attention_inputs(q, k, v, key_padding_mask, initial_state, F, window, sinks)
    B, T, H, D = q.shape
    Hk = k.shape[2]  # key/value heads: the state is [B, H_kv, F, Dv] (grouped-query attention)
    Dv = v.shape[-1]
    feature_map.check_input(D, Hk)
    scale = resolve_scale(scale, D)
    name = _resolve_backend(backend, q, feature_map, window, sinks)
    causal = bool(causal)
    if window is not None:
        return _context_parallel_window(
            q,
            k,
            v,
            feature_map,
            group,
            world,
            rank,
            scale,
            key_padding_mask,
            state0,
            output_final_state,
            name,
            window,
            causal,
            sinks,
        )

    moments = None
    if feature_map.spec.data_dependent and (not causal or feature_map.training):
        moments = _group_moments(q, k, scale, key_padding_mask, group)
    p = feature_map.feature_params(q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, moments=moments)
    cdt = p.W.dtype
    F = p.feature_dim

    fn = _backend_function(name)
    base = empty_state(B, Hk, F, Dv, dtype=cdt, device=q.device)
    local = base
    if T > 0:  # the state of this slice's keys: the final state of a non-causal pass (its output unused)
        _, local = fn(q, k, v, p, causal=False, key_padding_mask=key_padding_mask, output_final_state=True)
        local = RFState(*(t.to(cdt) for t in local))
    if rank == 0 and state0 is not None:
        base = RFState(*(t.to(cdt) for t in state0))
        pair = [torch.stack(t) for t in zip(base, local)]
        local = _combine(*pair, torch.ones(2, dtype=torch.bool, device=q.device))
    packed = _pack(local)
    if (
        not packed.requires_grad
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (q, k, v, p.W, p.bias, *(state0 or ())))
    ):
        packed.requires_grad_()  # an empty slice: its rank must still join the backward's collective
    S, z, m = _unpack(_AllGather.apply(packed, group), F, Dv)  # [w, B, H, ...]
    # Piece 0 is this rank's `base` (the initial state on rank 0, empty elsewhere); pieces 1..w the ranks'.
    S, z, m = (torch.cat([b[None], t]) for b, t in zip(base, (S, z, m)))
    ranks = torch.arange(world, device=q.device)
    take = (ranks < rank) if causal else (ranks != rank)
    start = _combine(S, z, m, torch.cat([take.new_ones(1), take]))
    if T == 0:
        # An empty slice: its output still hangs on the gathered states, so this rank joins the backward's
        # collective like the others.
        o = (start.S.sum() * 0).to(v.dtype).expand(B, 0, H, Dv)
    else:
        o, _ = fn(
            q, k, v, p, causal=causal, key_padding_mask=key_padding_mask, initial_state=start, output_final_state=False
        )
    if not output_final_state:
        return o
    final = _combine(
        S,
        z,
        m,
        torch.cat(
            [torch.zeros(1, dtype=torch.bool, device=q.device), torch.ones(world, dtype=torch.bool, device=q.device)]
        ),
    )
    return o, final


def _context_parallel_window(
    q,
    k,
    v,
    feature_map,
    group,
    world,
    rank,
    scale,
    key_padding_mask,
    state0,
    output_final_state,
    name,
    window,
    causal,
    sinks=0,
):
    """Hybrid attention of one sequence split across the ranks (see context_parallel_rf_attention); with
    ``sinks`` (``window`` 0: sinks only) the sink slots are gathered first (``_gather_sinks``)."""
    B, T, H, D = q.shape
    Hk, Dv, n = k.shape[2], v.shape[-1], max(window - 1, 0)
    moments = None
    if feature_map.spec.data_dependent and (not causal or feature_map.training):
        moments = _group_moments(q, k, scale, key_padding_mask, group)
    p = feature_map.feature_params(q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, moments=moments)
    cdt, F = p.W.dtype, p.feature_dim
    fn = _backend_function(name)
    extra = {"window": window, "sinks": sinks} if sinks else {"window": window}
    base = empty_window_state(B, Hk, F, D, Dv, window, sinks=sinks, dtype=cdt, device=q.device)
    if rank == 0 and state0 is not None:
        base = WindowState(*(t if t.dtype == torch.bool else t.to(cdt) for t in state0))
    keep_in = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    touch_sinks, sinks_after = 0, None
    if sinks:
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, p.W, p.bias, *(state0 or ()))
        )
        before, sinks_after, touch_sinks = _gather_sinks(k, v, keep_in, base, group, rank, world, sinks, grad)
        base = WindowState(*base[:6], *before)
        # this slice's sink tokens (positions < S of the sequence) leave the band, the tail and the features
        seen_before = before[3].sum(-1)  # [B]
        keep_in = keep_in & (seen_before[:, None] + torch.arange(T, device=q.device)[None] >= sinks)
    local = base
    if T > 0:  # the window state of this slice (rank 0: after the initial state): a non-causal pass
        _, local = fn(
            q,
            k,
            v,
            p,
            causal=False,
            key_padding_mask=key_padding_mask,
            initial_state=base,
            output_final_state=True,
            **extra,
        )
    # positions of the sequence in this rank's tail: all W - 1 on rank 0 (its initial tail's included), the
    # last min(T, W - 1) elsewhere (the front of the tail then belongs to no position)
    count = n if rank == 0 else min(T, n)
    parts = [
        _pack(RFState(*(t.to(cdt) for t in local.rf))),
        local.k_tail.to(cdt).reshape(B, Hk, n * D),
        local.v_tail.to(cdt).reshape(B, Hk, n * Dv),
    ]
    h = min(T, n)  # non-causal: this slice's first h positions (its head) and the state of the keys after them
    if not causal:
        rest = empty_state(B, Hk, F, Dv, dtype=cdt, device=q.device)
        if T > h:
            _, rest = fn(q[:, h:], k[:, h:], v[:, h:], p, causal=False, key_padding_mask=keep_in[:, h:],
                         output_final_state=True)  # fmt: skip
        pad = n - h
        heads = [torch.nn.functional.pad(t[:, :h].transpose(1, 2).to(cdt), (0, 0, 0, pad)) for t in (k, v)]
        parts += [_pack(RFState(*(t.to(cdt) for t in rest))), heads[0].reshape(B, Hk, n * D),
                  heads[1].reshape(B, Hk, n * Dv)]  # fmt: skip
    packed = torch.cat(parts, dim=-1)
    if (
        not packed.requires_grad
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (q, k, v, p.W, p.bias, *(state0 or ())))
    ):
        packed.requires_grad_()  # an empty slice: its rank must still join the backward's collective
    meta = [local.tail_keep.to(cdt), torch.full((B, 1), float(count), dtype=cdt, device=q.device)]
    if not causal:
        head_keep = torch.nn.functional.pad(keep_in[:, :h], (0, n - h), value=False)
        meta += [head_keep.to(cdt), torch.full((B, 1), float(h), dtype=cdt, device=q.device)]
    every = _AllGather.apply(packed, group)  # [w, B, H_kv, P]
    metas = _AllGather.apply(torch.cat(meta, -1), group)  # [w, B, W (x 2)]: keep flags and position counts
    r = F * Dv + F + 1
    size = r + n * (D + Dv)  # one state with its W - 1 keys and values
    pieces = _unpack(every[..., :r], F, Dv)
    k_tails = every[..., r : r + n * D].unflatten(-1, (n, D))
    v_tails = every[..., r + n * D : size].unflatten(-1, (n, Dv))
    keeps = metas[..., :n] > 0.5
    counts = [int(c) for c in metas[:, 0, n].tolist()]
    # every rank's output hangs on the whole gather, so that every rank runs its backward (a collective)
    touch = every.nan_to_num(neginf=0.0).sum() * 0
    if sinks:
        touch = touch + touch_sinks

    def state_after(upto: int, sink_part) -> WindowState:
        """The window state after the slices of ranks 0..upto-1 (upto >= 1), with the sink slots given."""
        ks = torch.cat([k_tails[s, :, :, n - counts[s] :] for s in range(upto)], dim=2)
        vs = torch.cat([v_tails[s, :, :, n - counts[s] :] for s in range(upto)], dim=2)
        keep = torch.cat([keeps[s, :, n - counts[s] :] for s in range(upto)], dim=1)
        out = ks.shape[2] - n  # positions pushed out of the window by later ones: into the features
        S, z, m = (t[:upto] for t in pieces)
        if out > 0:
            S, z, m = _with_key_state((S, z, m), ks[:, :, :out], vs[:, :, :out], keep[:, :out], q, k, v, p, fn)
        rf = _combine(S, z, m, torch.ones(S.shape[0], dtype=torch.bool, device=q.device))
        tail = (ks[:, :, out:], vs[:, :, out:], keep[:, out:])
        return WindowState(rf.S + touch, rf.z, rf.log_scale, *tail, *sink_part)

    if rank == 0:
        start = WindowState(base.S + touch, *base[1:])
    else:
        start = state_after(rank, base.sink_part)
    if T == 0:
        o = (start.S.sum() * 0).to(v.dtype).expand(B, 0, H, Dv)
    elif causal:
        o, _ = fn(q, k, v, p, causal=True, key_padding_mask=key_padding_mask, initial_state=start, **extra)
    else:
        if sinks:  # every query sees every sink: all slots count as seen (the unfilled ones are not kept)
            start = WindowState(*start[:6], *sinks_after[:3], torch.ones_like(sinks_after[3]))
        o = _after_slice(
            q, k, v, p, fn, every[..., size:], metas[..., n + 1 :], start, rank, world, window, keep_in, extra
        )
    if not output_final_state:
        return o
    return o, state_after(world, sinks_after if sinks else base.sink_part)


def _fill_sinks(part, ks, vs, keep):
    """The sink slots ``part = (k_sink [B, H_kv, S, D], v_sink, sink_keep [B, S], sink_seen [B, S])`` after a
    piece whose first tokens are ``ks [B, H_kv, L, D]``, ``vs``, ``keep [B, L]`` (L >= the slots it fills):
    as the reference backend fills them, slot s from token s - sum(sink_seen) of the piece."""
    k_sink, v_sink, sink_keep, seen = part
    L = ks.shape[2]
    if L == 0:
        return part
    B, Hk, S, D = k_sink.shape
    at = torch.arange(S, device=seen.device)[None] - seen.sum(-1)[:, None]  # [B, S]
    fresh = ~seen & (at < L)
    idx = at.clamp(0, L - 1)
    fill_k = ks.gather(2, idx[:, None, :, None].expand(B, Hk, S, D)) * fresh[:, None, :, None]
    fill_v = vs.gather(2, idx[:, None, :, None].expand(B, Hk, S, vs.shape[-1])) * fresh[:, None, :, None]
    return (
        torch.where(seen[:, None, :, None], k_sink, fill_k),
        torch.where(seen[:, None, :, None], v_sink, fill_v),
        torch.where(seen, sink_keep, fresh & keep.gather(1, idx)),
        seen | fresh,
    )


def _gather_sinks(k, v, keep_in, base, group, rank, world, sinks, grad):
    """Attention sinks across ranks: one all-gather of every rank's sink slots after its slice alone (its
    first min(S, T_r) keys, values and keep flags, padded to S; rank 0's after its initial state's slots)
    and their seen flags. Returns the sink part ``(k_sink, v_sink, sink_keep, sink_seen)`` before this
    rank's slice (rank 0: its initial state's), the one after the whole sequence (the same on every rank),
    and a zero that hangs on the gather (every rank must run its backward). ``grad``: the gathered slots
    take part in autograd on every rank alike (whether its own slots depend on a tensor with a gradient or
    not), so that every rank runs the gather's backward."""
    B, T, Hk, D = k.shape
    Dv, cdt = v.shape[-1], base.S.dtype
    h = min(T, sinks)
    start = base.sink_part if rank == 0 else empty_sinks(B, Hk, D, Dv, sinks, dtype=cdt, device=k.device)
    head_k, head_v = (t[:, :h].transpose(1, 2).to(cdt) for t in (k, v))
    own = _fill_sinks(start, head_k, head_v, keep_in[:, :h])
    packed = torch.cat([own[0].reshape(B, Hk, sinks * D), own[1].reshape(B, Hk, sinks * Dv)], -1)
    if grad and not packed.requires_grad:
        packed.requires_grad_()  # every rank (an empty slice's too) must join the backward's collective
    every = _AllGather.apply(packed, group)  # [w, B, H_kv, S (D + Dv)]
    flags = _AllGather.apply(torch.cat([own[2], own[3]], -1).to(cdt), group) > 0.5  # [w, B, 2 S]
    k_all = every[..., : sinks * D].unflatten(-1, (sinks, D))
    v_all = every[..., sinks * D :].unflatten(-1, (sinks, Dv))

    def compose(upto: int):
        part = (k_all[0], v_all[0], flags[0, :, :sinks], flags[0, :, sinks:])
        for s in range(1, upto):
            L = int(flags[s, :, sinks:].sum(-1).max())  # min(S, T_s): every row alike
            part = _fill_sinks(part, k_all[s, :, :, :L], v_all[s, :, :, :L], flags[s, :, :L])
        return part

    before = base.sink_part if rank == 0 else compose(rank)
    return before, compose(world), every.sum() * 0


def _with_key_state(states, ks, vs, keep, q, k, v, p, fn):
    """The stacked states ``(S, z, m)`` with one more: the feature state of the raw keys and values ``ks
    [B, H_kv, n, D]``, ``vs`` (keep flags ``[B, n]``), from a non-causal call of the backend ``fn`` whose
    queries are any (only its final state is used)."""
    ko, vo = ks.transpose(1, 2), vs.transpose(1, 2)
    qo = ko.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    _, state = fn(qo.to(q.dtype), ko.to(k.dtype), vo.to(v.dtype), p, causal=False, key_padding_mask=keep,
                  output_final_state=True)  # fmt: skip
    return tuple(torch.cat([a, b.to(a.dtype)[None]]) for a, b in zip(states, state))


def _after_slice(q, k, v, p, fn, every, metas, start, rank, world, window, keep_in, extra):
    """Non-causal hybrid output of this rank's slice: the keys after it are the first W - 1 positions after
    the slice (gathered from the heads of the next ranks, which reach over several slices shorter than
    W - 1), attended as extra keys of this call (their queries' outputs dropped), and the features of every
    later key (the next ranks' states after their heads, and the head keys past those W - 1 positions),
    added to the initial state's S and z, which every query reads."""
    B, T, H, D = q.shape
    Dv, n = v.shape[-1], max(window - 1, 0)
    F, cdt = p.feature_dim, p.W.dtype
    r = F * Dv + F + 1
    rests = _unpack(every[..., :r], F, Dv)
    k_heads = every[..., r : r + n * D].unflatten(-1, (n, D))
    v_heads = every[..., r + n * D :].unflatten(-1, (n, Dv))
    head_keeps = metas[..., :n] > 0.5
    lengths = [int(c) for c in metas[:, 0, n].tolist()]
    later = range(rank + 1, world)
    ks = torch.cat([k_heads[s, :, :, : lengths[s]] for s in later] + [k_heads[rank, :, :, :0]], dim=2)
    vs = torch.cat([v_heads[s, :, :, : lengths[s]] for s in later] + [v_heads[rank, :, :, :0]], dim=2)
    keep = torch.cat([head_keeps[s, :, : lengths[s]] for s in later] + [head_keeps[rank, :, :0]], dim=1)
    S, z, m = (t[rank + 1 :] for t in rests)
    if ks.shape[2] > n:  # head keys past the first W - 1 positions after the slice: features
        S, z, m = _with_key_state((S, z, m), ks[:, :, n:], vs[:, :, n:], keep[:, n:], q, k, v, p, fn)
        ks, vs, keep = ks[:, :, :n], vs[:, :, :n], keep[:, :n]
    S, z, m = (torch.cat([a, b.to(cdt)[None]]) for a, b in zip((S, z, m), start.rf))
    rf = _combine(S, z, m, torch.ones(S.shape[0], dtype=torch.bool, device=q.device))
    init = WindowState(rf.S, rf.z, rf.log_scale, *start[3:])
    e = ks.shape[2]
    q_ext = torch.cat([q, q.new_zeros(B, e, H, D)], 1)
    k_ext = torch.cat([k, ks.transpose(1, 2).to(k.dtype)], 1)
    v_ext = torch.cat([v, vs.transpose(1, 2).to(v.dtype)], 1)
    mask = torch.cat([keep_in, keep], 1)
    o, _ = fn(q_ext, k_ext, v_ext, p, causal=False, key_padding_mask=mask, initial_state=init, **extra)
    return o[:, :T]


# ----------------------------------------------------------------------------------------------------
# Data parallel: running statistics over the global batch
# ----------------------------------------------------------------------------------------------------


class RunningStatsAllReduce:
    """``RandomFeatureMap.stats_sync`` for data parallelism: turns the batch means of OPRF/SADERF's
    moments into the means over the batches of every rank of ``group`` (weighted by batch size), with one
    all-reduce of ``4 D num_heads + 1`` numbers per training call, so the running statistics are those of
    the concatenated batch (as ``SyncBatchNorm`` does for batch norm). Without an initialised process
    group it keeps the local means."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, means: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
        if not (dist.is_available() and dist.is_initialized()):
            return means
        flat = torch.cat([t.reshape(-1) * batch for t in means] + [means[0].new_full((1,), float(batch))])
        flat = _all_reduce_sum(flat, self.group, "all_reduce (running statistics)")
        return [t.view_as(like) / flat[-1] for t, like in zip(flat[:-1].split([t.numel() for t in means]), means)]

    def __deepcopy__(self, memo):  # a process group cannot be copied; a copied model shares it
        return self


def convert_sync_stats(module: nn.Module, process_group=None) -> nn.Module:
    """Make every ``RandomFeatureMap`` in ``module`` (itself included) all-reduce the OPRF/SADERF running
    statistics over ``process_group`` (default: the world) when it updates them in training. Returns
    ``module``. Set a feature map's ``stats_sync = None`` to undo it.

    Use it for data parallelism: with it the running statistics of every rank equal those one process
    would gather from the concatenated batch, so causal OPRF/SADERF replicas keep identical parameters
    (DistributedDataParallel's default ``broadcast_buffers`` would instead copy rank 0's, gathered from
    rank 0's batch alone). Components without running statistics are left as they are."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    sync = RunningStatsAllReduce(process_group)
    for mod in module.modules():
        if isinstance(mod, RandomFeatureMap) and mod.spec.data_dependent:
            mod.stats_sync = sync
    return module


# ----------------------------------------------------------------------------------------------------
# Local launcher (tests, benchmarks, trying it out on one machine)
# ----------------------------------------------------------------------------------------------------


def _start_method() -> str:
    """ "forkserver" where there is one: a fresh server process imports torch once and forks the workers
    from there (importing torch in every worker is most of the start-up time); "spawn" elsewhere. Either
    way the workers do not inherit the caller's state. Only torch is preloaded: the server does not get the
    caller's sys.path, so it must not import this package."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed"])
    return "forkserver"


def _local_worker(rank: int, fn, world_size: int, tmp: str, backend: str, timeout: float, args: tuple) -> None:
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{os.path.join(tmp, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        with open(os.path.join(tmp, f"result-{rank}"), "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        with open(os.path.join(tmp, f"error-{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_local(fn, world_size: int, *args, timeout: float = 300.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh local processes joined in a process
    group of ``backend`` (the default group inside ``fn``), and return the list of their return values.

    ``fn`` must be picklable (a module-level function). The processes meet through a file store in a
    temporary directory, so no port has to be chosen; a collective that waits longer than ``timeout``
    seconds raises, and all processes are joined (or killed after ``timeout``). If a process raises, this
    raises ``RuntimeError`` with the tracebacks, the first failure first (the others are usually peers
    that lost their connection to it)."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _local_worker,
            args=(fn, world_size, tmp, backend, timeout, args),
            nprocs=world_size,
            join=False,
            start_method=_start_method(),
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_local: processes still running after {timeout} s")
        except ProcessException:
            errors = sorted(
                (e for e in os.scandir(tmp) if e.name.startswith("error-")), key=lambda e: e.stat().st_mtime
            )
            text = "\n".join(f"--- rank {e.name[6:]} ---\n{open(e.path).read()}" for e in errors)
            raise RuntimeError(f"run_local: a process failed (first failure first):\n{text}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(10)
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"result-{rank}"), "rb") as f:
                results.append(pickle.load(f))
        return results
