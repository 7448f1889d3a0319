"""The hybrid window (DESIGN.md section 6) on the Triton backend.

Hybrid attention sums its weights over disjoint sets of keys and divides once. With the initial state's
tail in front of the tokens (the extended keys: extended key ``j'`` is the tail's ``j'`` for ``j' < W - 1``,
token ``j' - (W - 1)`` after), query t holds exact the extended keys ``t .. t + W - 1`` (causal) or
``t .. t + 2W - 2`` (non-causal); every other visible key goes through the features:

* the keys before the band (and the initial state S0, z0): the fused causal kernels (``rf_fwd``'s walk or
  ``chunk_fwd``'s chunk mode, as the plain path chooses) run on the extended keys shifted one position
  later, behind a masked first key, so that query t reads extended keys ``< t``. One query row is added
  after the last (its output is dropped): the run's final state then holds every extended key but the last
  W - 1, which is the final state the causal continuation needs, causal or not;
* non-causal, the keys after the band: the same causal kernels on the reversed sequence, the keys shifted
  W positions (behind W masked keys), without a state;
* the band: exact logits ``x.y + exact_sq (|x|^2 + |y|^2)`` of each query against the W (causal) or
  2W - 1 (non-causal) extended keys it holds exact, in ``band.py``'s kernels (flash-attention style
  blocks with an online maximum; backward recomputes the logits).

Each part returns an unnormalised numerator and denominator with its own per-row log scale (the kernels:
the query row's ``qmax`` plus the key stabiliser of its chunk; the band: its largest logit); they are moved
to their largest scale before the one division, as in the reference. The backward hands each part the
gradients of its own numerator and denominator (``rf_bwd`` / ``chunk_bwd`` with ``coeffs``: the kernels'
backward is linear in them), so no feature is ever stored.

Packed sequences (``cu_seqlens``) run in one launch per kernel (each sequence with its own tail, state and
stabilisers), the band's kernels included (block tables per sequence).

Sinks and the factor (DESIGN.md section 8):

* the learned factor g (``params.log_mix``, per key/value head) adds log g to every exact logit, which moves
  the exact part's log scale by log g and nothing else: it is added to the band's ``top`` on the host (no
  kernel sees it), and its gradient is the exact part's share of the combined gradient,
  ``sum_t exp(top_t + log g - M_t) (dnum_t . num_t + dden_t den_t)``;
* sinks S: ``_sink_slots`` fills the S slots per sequence as the reference does (slots seen by earlier
  pieces, and this piece's first positions) and clears the sink tokens' keep flags, so that neither the
  feature runs nor the band see them. The band's query-side kernels read the slots as one more key block
  before the band (a second table: the sequence row of each query block and its first row; ``sfrom`` per
  slot, the first query position that sees it), in the same online maximum, so band and sinks are one exact
  part with one log scale. Backward: the dq kernel also writes each query block's share of the slots' dk,
  dv (``[blocks, B H, S, .]`` partials, summed per sequence on the host); autograd carries them to k, v and
  the initial slots;
* window 0 (sinks only): no band; the prefix run reads the keys up to the query itself (no shift, no
  appended row), the suffix run the keys after it (shift 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from ...contract import DEN_EPS, NORM_HYP, FeatureParams
from ...state import WindowState, empty_window_state
from .band import BandTables, band_backward, band_forward
from .bwd import grad_coefficients, rf_bwd
from .chunk import chunk_bwd, chunk_fwd, chunk_size
from .fwd import default_chunk_size, rf_fwd
from .lse import lse_grads, row_lse


@dataclass
class _Run:
    """One causal kernel run over rearranged rows: its queries (rows of q with one zero row appended), keys
    and values (rows of the extended ones), their keep flags, packed boundaries, the run row of every real
    query (``out_idx [T]``) and every run row's chunk slot of kstab (``slot``)."""

    q_idx: Tensor
    k_idx: Tensor
    keep: Tensor  # [B, Tr] bool
    cu: Optional[Tensor]
    out_idx: Tensor
    slot: Tensor
    has_state: bool
    mode: str
    BT: int


def _slots(lengths: list[int], BT: int, dev) -> Tensor:
    """The kstab chunk slot of every row of runs of these lengths (``triton_common.VarlenTables``' layout:
    ``max(1, ceil(len / BT))`` slots per sequence)."""
    out, base = [], 0
    for n in lengths:
        out.append(base + torch.arange(n, device=dev) // BT)
        base += max(1, triton.cdiv(n, BT))
    return torch.cat(out)


def _plan(T_list, window, causal, keep_e, dev, mode, packed):
    """The prefix run (and, non-causal, the suffix run) of sequences of lengths ``T_list`` (one per packed
    sequence; one for the dense batch) whose extended rows start at E_i = sum_j<i (n + T_j). Index
    tensors: -1 marks a masked key. ``window`` 0 (sinks only, no band): the prefix run reads the keys up to
    the query itself (no shift, no appended row) and the suffix run the keys after it (shift 1)."""
    n = max(window - 1, 0)
    lag = 1 if window >= 1 else 0  # the prefix run's shift: query t reads extended keys < t + 1 - lag
    sh = max(window, 1)  # the suffix run's shift
    B = keep_e.shape[0]
    pre_q, pre_k, pre_out, suf_q, suf_k, suf_out = ([] for _ in range(6))
    q_base = e_base = r_base = 0
    zero_row = torch.full((1,), sum(T_list), dtype=torch.long, device=dev)  # the appended zero query
    masked = torch.full((1,), -1, dtype=torch.long, device=dev)
    for T in T_list:
        t = torch.arange(T, device=dev)
        # prefix: keys [masked, ext 0 .. T - 1], queries [q 0 .. T - 1, zero row]: T + 1 run rows (lag 0: keys
        # [ext 0 .. T - 1], queries [q 0 .. T - 1])
        pre_k += [masked[:lag], e_base + t]
        pre_q += [q_base + t, zero_row[:lag]]
        pre_out.append(r_base + t)
        if not causal:  # suffix (reversed): run row u is query T - 1 - u, key ext L - 1 - (u - sh) from u = sh
            suf_k.append(torch.where(t >= sh, e_base + n + T - 1 - (t - sh), -1))
            suf_q.append(q_base + T - 1 - t)
            suf_out.append(q_base + T - 1 - t)
        q_base += T
        e_base += n + T
        r_base += T + lag

    def run(q_idx, k_idx, out_idx, lengths, has_state):
        q_idx, k_idx = torch.cat(q_idx), torch.cat(k_idx)
        real = k_idx >= 0
        k_idx = k_idx.clamp_min(0)
        keep = (keep_e.index_select(1, k_idx) & real[None]).expand(B, -1).contiguous()
        BT = chunk_size(sum(lengths)) if mode == "chunk" else default_chunk_size(max(lengths))
        cu = _cu(lengths, dev) if packed else None
        return _Run(q_idx, k_idx, keep, cu, torch.cat(out_idx), _slots(lengths, BT, dev), has_state, mode, BT)

    runs = [run(pre_q, pre_k, pre_out, [T + lag for T in T_list], True)]
    if not causal and any(T > sh for T in T_list):
        runs.append(run(suf_q, suf_k, suf_out, list(T_list), False))
    return runs


def _cu(lengths, dev):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=dev)


class _TritonWindow(torch.autograd.Function):
    """(o [B, T, H, Dv] fp32, S, z, m) of the hybrid from q, the extended keys and values (fp32, [B, L, Hk, .])
    and the parameters; see the module docstring for the parts and their backward. ``log_mix`` ([Hk] or
    None): the learned factor's log, added to the exact part's log scale (every exact logit moves by it, so
    the band's kernels need not see it). ``ks``, ``vs`` ([R, Hk, S, .] fp32) or None: the sink slots, read
    by the band's kernels besides the band (``cfg["sfrom"]`` says which query sees which slot)."""

    @staticmethod
    def forward(ctx, q, Ke, Ve, W, bias, S0, z0, m0, keep_e, log_mix, ks, vs, params, cfg):
        runs = cfg["runs"]
        B, T, H, D = q.shape
        Hk = Ke.shape[2]
        G = H // Hk
        q_aug = torch.cat([q, q.new_zeros(q.shape[0], 1, H, D)], 1)
        parts, stats = [], []
        final = (None, None, None)
        hedgehog = int(params.kind) == NORM_HYP
        if hedgehog:  # the kernels leave each query row unnormalised; the hybrid needs its log-sum-exp
            lse_q = row_lse(q, W, bias, cfg["freq"], cfg["psi"], c_t=params.c_t, c_o=params.c_o, scale=params.scale,
                            query=True, cu=cfg["cu"]).unflatten(1, (Hk, G))  # fmt: skip
        for run in runs:
            o, den, qmax, kstab, S, z, m = _run_forward(run, q_aug, Ke, Ve, W, bias, S0, z0, m0, params, cfg)
            if run.has_state:
                final = (S, z, m)
            o = o.index_select(1, run.out_idx).float().transpose(1, 2).unflatten(1, (Hk, G))  # [B, Hk, G, T, Dv]
            den_t = den.index_select(2, run.out_idx).unflatten(1, (Hk, G))
            num = o * den_t.abs().clamp_min(DEN_EPS)[..., None]
            kst = kstab.index_select(2, run.slot.index_select(0, run.out_idx))[:, :, None]  # [B, Hk, 1, T]
            shift = qmax.index_select(2, run.out_idx).unflatten(1, (Hk, G)) + kst
            if hedgehog:
                shift = shift - lse_q
            parts.append((num, den_t, shift))
            stats.append((qmax, kstab))
        exact = []  # the exact part (band and sinks, one online maximum): its log scale moved by the factor
        sinks = None if ks is None else _sink_tensors(ks, vs, cfg)
        band_top = None
        if cfg["band"].band > 0 or sinks is not None:
            num_b, den_b, band_top = (t.unflatten(1, (Hk, G)) for t in band_forward(
                q, Ke, Ve, cfg["keep_u8"], scale=params.scale, exact_sq=params.exact_sq, tables=cfg["band"],
                sinks=sinks))  # fmt: skip
            shift_b = band_top if log_mix is None else band_top + log_mix.detach().float()[None, :, None, None]
            exact.append((num_b, den_b, shift_b))
        top = parts[0][2]
        for p in parts[1:] + exact:
            top = torch.maximum(top, p[2])
        # the feature parts' numerator and denominator on the scale of top, then the exact parts'
        num_f = sum(p[0] * torch.exp(p[2] - top)[..., None] for p in parts)
        den_f = sum(p[1] * torch.exp(p[2] - top) for p in parts)
        num, den = num_f, den_f
        for p in exact:
            w = torch.exp(p[2] - top)
            num = num + p[0] * w[..., None]
            den = den + p[1] * w
        o = num / den.abs().clamp_min(DEN_EPS)[..., None]
        ctx.save_for_backward(q, Ke, Ve, W, bias, S0, z0, m0, keep_e, o, den, top, *(p[2] for p in parts),
                              *(t for s in stats for t in s))  # fmt: skip
        ctx.params, ctx.cfg, ctx.nruns = params, cfg, len(runs)
        ctx.features = (num_f, den_f) if hedgehog else None  # d/d lse_q
        ctx.exact = None  # the exact part's (num, den) (only for d log_mix) and log scale
        if exact:
            ctx.exact = exact[0] if log_mix is not None else (None, None, exact[0][2])
        ctx.band_top = band_top
        ctx.mix = log_mix is not None
        ctx.sinks = sinks
        S, z, m = final
        ctx.mark_non_differentiable(m)
        ctx.set_materialize_grads(False)
        return o.flatten(1, 2).transpose(1, 2), S, z, m

    @staticmethod
    def backward(ctx, do, dS, dz, _dm):
        q, Ke, Ve, W, bias, S0, z0, m0, keep_e, o, den, top, *rest = ctx.saved_tensors
        nr = ctx.nruns
        shifts, stats = rest[:nr], rest[nr:]
        params, cfg = ctx.params, ctx.cfg
        B, T, H, D = q.shape
        Hk = Ke.shape[2]
        G = H // Hk
        Dv = Ve.shape[-1]
        o_rows = o.flatten(1, 2).transpose(1, 2)  # [B, T, H, Dv], the layout of do
        do = torch.zeros_like(o_rows) if do is None else do
        # the gradients of the combined numerator and denominator (on the scale of top)
        dnum, dden = grad_coefficients(do, o_rows, den.flatten(1, 2))
        dnum, dden = dnum.transpose(1, 2).unflatten(1, (Hk, G)), dden.unflatten(1, (Hk, G))
        q_aug = torch.cat([q, q.new_zeros(B, 1, H, D)], 1)
        dq_aug = torch.zeros(q_aug.shape, dtype=torch.float32, device=q.device)
        dKe, dVe = torch.zeros_like(Ke), torch.zeros_like(Ve)
        dW = dbias = dS0 = dz0 = None
        for i, run in enumerate(cfg["runs"]):
            w = torch.exp(shifts[i] - top)
            Tr = run.q_idx.shape[0]
            a = torch.zeros(B, H, Tr, Dv, dtype=torch.float32, device=q.device)
            a[:, :, run.out_idx] = (dnum * w[..., None]).flatten(1, 2)
            beta = torch.zeros(B, H, Tr, dtype=torch.float32, device=q.device)
            beta[:, :, run.out_idx] = (dden * w).flatten(1, 2)
            qmax, kstab = stats[2 * i], stats[2 * i + 1]
            grads = _run_backward(run, q_aug, Ke, Ve, W, bias, S0, z0, m0, params, cfg, qmax, kstab,
                                  (a.transpose(1, 2).contiguous(), beta),
                                  dS if run.has_state else None, dz if run.has_state else None)  # fmt: skip
            dq_r, dk_r, dv_r, dW_r, dbias_r, dS0_r, dz0_r = grads
            keep = run.keep[..., None, None]
            dq_aug.index_add_(1, run.q_idx, dq_r.float())
            dKe.index_add_(1, run.k_idx, dk_r.float() * keep)
            dVe.index_add_(1, run.k_idx, dv_r.float() * keep)
            dW = dW_r if dW is None else dW + dW_r
            dbias = dbias_r if dbias is None else dbias + dbias_r
            if run.has_state:
                dS0, dz0 = dS0_r, dz0_r
        if ctx.features is not None:  # hedgehog: each query row's lse scales the feature parts by exp(-lse)
            num_f, den_f = ctx.features
            dlse = -((dnum * num_f).sum(-1) + dden * den_f).flatten(1, 2)  # [B, H, T]
            W_heads = W.expand(Hk, -1, -1) if W.shape[0] == 1 else W
            gq, gW, gb = lse_grads(q, dlse, W_heads, bias, cfg["freq"], cfg["psi"], c_t=params.c_t, c_o=params.c_o,
                                   scale=params.scale, query=True, cu=cfg["cu"])  # fmt: skip
            dq_aug[:, :T] += gq
            dW, dbias = dW + gW, dbias + gb
        dq = dq_aug[:, :T]
        dmix = dks = dvs = None
        if ctx.band_top is not None:
            # the exact part: the band's kernels' backward from the gradients of its numerator and denominator
            num_b, den_b, shift_b = ctx.exact
            w = torch.exp(shift_b - top)
            dq_b, dK_b, dV_b, dks, dvs = band_backward(q, Ke, Ve, cfg["keep_u8"], ctx.band_top.flatten(1, 2),
                                                       (dnum * w[..., None]).flatten(1, 2), (dden * w).flatten(1, 2),
                                                       scale=params.scale, exact_sq=params.exact_sq,
                                                       tables=cfg["band"], sinks=ctx.sinks)  # fmt: skip
            dq = dq + dq_b
            dKe = dKe + dK_b
            dVe = dVe + dV_b
            if ctx.mix:  # the factor moves every exact logit: d/d log_mix = the exact part's share of the gradient
                dmix = (w * ((dnum * num_b).sum(-1) + dden * den_b)).sum((0, 2, 3))
            if dks is not None:
                dks, dvs = dks.transpose(1, 2), dvs.transpose(1, 2)  # [R, Hk, S, .]
        if ctx.mix and dmix is None:
            dmix = torch.zeros(Hk, dtype=torch.float32, device=q.device)
        if S0 is not None and dS0 is None:
            dS0, dz0 = torch.zeros_like(S0), torch.zeros_like(z0)
        return dq.to(q.dtype), dKe, dVe, dW, dbias, dS0, dz0, None, None, dmix, dks, dvs, None, None


def _sink_tensors(ks, vs, cfg):
    """The band kernels' sink arguments from the slots ``[R, Hk, S, .]``: ``[R, S, Hk, .]`` rows, sfrom."""
    return ks.detach().transpose(1, 2).contiguous(), vs.detach().transpose(1, 2).contiguous(), cfg["sfrom"]


def _run_inputs(run: _Run, q_aug, Ke, Ve, cfg):
    qr = q_aug.index_select(1, run.q_idx)
    kr = Ke.index_select(1, run.k_idx).to(cfg["kdtype"])
    vr = Ve.index_select(1, run.k_idx)  # fp32: o comes back in fp32 and is multiplied back to the numerator
    return qr, kr, vr


def _run_forward(run: _Run, q_aug, Ke, Ve, W, bias, S0, z0, m0, p: FeatureParams, cfg):
    qr, kr, vr = _run_inputs(run, q_aug, Ke, Ve, cfg)
    state = (S0, z0, m0) if run.has_state else (None, None, None)
    kw = dict(kind=int(p.kind), c_t=float(p.c_t), c_o=float(p.c_o), scale=float(p.scale), output_final_state=run.has_state,
              chunk_size=run.BT, cu_seqlens=run.cu)  # fmt: skip
    if run.mode == "chunk":
        out = chunk_fwd(qr, kr, vr, W, bias, cfg["freq"], cfg["psi"], run.keep, *state, **kw)
    else:
        out = rf_fwd(qr, kr, vr, W, bias, cfg["freq"], cfg["psi"], run.keep, *state, causal=True, **kw)
    return out[:7]


def _run_backward(run: _Run, q_aug, Ke, Ve, W, bias, S0, z0, m0, p: FeatureParams, cfg, qmax, kstab, coeffs, dS, dz):
    qr, kr, vr = _run_inputs(run, q_aug, Ke, Ve, cfg)
    state = (S0, z0, m0) if run.has_state else (None, None, None)
    kw = dict(kind=int(p.kind), c_t=float(p.c_t), c_o=float(p.c_o), scale=float(p.scale), chunk_size=run.BT,
              cu_seqlens=run.cu, coeffs=coeffs)  # fmt: skip
    args = (qr, kr, vr, W, bias, cfg["freq"], cfg["psi"], run.keep, *state, None, None, qmax, kstab)
    if run.mode == "chunk":
        return chunk_bwd(None, dS, dz, *args, **kw)
    return rf_bwd(None, dS, dz, *args, None, None, causal=True, **kw)


def _sink_slots(q, k, v, state: WindowState, sinks: int, causal: bool, mask, offsets):
    """The sinks (DESIGN.md section 8): the first ``sinks`` positions of each sequence (of each packed one),
    as ``reference._window_attention`` fills them. Returns the final state's sink slots (k_sink, v_sink
    [R, Hk, S, .] fp32, differentiable in k, v and the initial slots; sink_keep, sink_seen [R, S]), the keep
    flags of the tokens ``[B, T]`` (False for a sink: it leaves the band and the features) and ``sfrom [R, S]``
    int64, the first position of its sequence in this piece whose query sees the slot (causal: -1 for a slot
    filled before the piece, the filling token for a fresh one; non-causal -1 for both), past every query
    where the slot is empty or masked."""
    B, T = q.shape[:2]
    dev = q.device
    N = B * T  # token rows, flattened (packed: B = 1)
    if offsets is None:
        R = B
        starts = torch.arange(B, device=dev) * T
        lens = torch.full((B,), T, dtype=torch.long, device=dev)
    else:
        R = len(offsets) - 1
        starts = torch.tensor(offsets[:-1], dtype=torch.long, device=dev)
        lens = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])], dtype=torch.long, device=dev)
    row = torch.repeat_interleave(torch.arange(R, device=dev), lens, output_size=N)  # [N]: each token's row
    t_loc = torch.arange(N, device=dev) - starts.index_select(0, row)  # position in its sequence
    seen = state.sink_seen.to(torch.bool)  # [R, S]
    count = seen.sum(-1)  # positions of each row seen before this piece (at most S)
    keep_tok = (count.index_select(0, row) + t_loc >= sinks).view(B, T)
    at = torch.arange(sinks, device=dev)[None] - count[:, None]  # [R, S]: the token that fills the slot
    fresh = ~seen & (at < lens[:, None])
    gidx = (starts[:, None] + at.clamp_min(0)).clamp(0, N - 1).flatten()  # [R S] token rows (used where fresh)
    fill_k = k.flatten(0, 1).index_select(0, gidx).unflatten(0, (R, sinks)).transpose(1, 2).float()  # [R, Hk, S, D]
    fill_v = v.flatten(0, 1).index_select(0, gidx).unflatten(0, (R, sinks)).transpose(1, 2).float()
    fill_keep = torch.ones_like(fresh) if mask is None else mask.flatten().index_select(0, gidx).view(R, -1)
    sel, fr = seen[:, None, :, None], fresh[:, None, :, None]
    sink_k = torch.where(sel, state.k_sink.float(), torch.where(fr, fill_k, torch.zeros_like(fill_k)))
    sink_v = torch.where(sel, state.v_sink.float(), torch.where(fr, fill_v, torch.zeros_like(fill_v)))
    sink_keep = torch.where(seen, state.sink_keep.to(torch.bool), fresh & fill_keep.to(torch.bool))
    never = torch.full_like(at, N + 1)
    first = at.clamp_min(-1) if causal else torch.full_like(at, -1)
    sfrom = torch.where(seen, torch.full_like(at, -1), first)
    sfrom = torch.where((seen | fresh) & sink_keep, sfrom, never).contiguous()
    return (sink_k, sink_v, sink_keep, seen | fresh), keep_tok, sfrom


def triton_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: FeatureParams,
    *,
    causal: bool,
    window: int,
    key_padding_mask: Optional[Tensor] = None,
    initial_state: Optional[WindowState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    mode: str = "walk",
    sinks: int = 0,
):
    """Hybrid attention with the Triton kernels (``triton_attention`` with ``window >= 0``, validated by the
    caller; 0: sinks only): ``(o [B, T, H, Dv] in v's dtype, WindowState (fp32) or None)``. Differentiable
    in q, k, v, W, bias, the factor ``params.log_mix`` and the initial state's S, z, k_tail, v_tail (and sink
    slots). ``mode``: the causal kernels' mode ("walk" or "chunk", ``triton_attention.causal_mode``).
    ``sinks`` S: the first S positions of each sequence are exact for every query that sees them (their
    keep flags cleared before the feature kernels and the band run), read by the band's kernels."""
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    n = max(window - 1, 0)
    dev = q.device
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    R = B if offsets is None else len(offsets) - 1
    if initial_state is None:
        initial_state = empty_window_state(R, Hk, params.feature_dim, D, Dv, window, sinks=sinks, device=dev)
    if T == 0:  # no output rows: the state passes through
        state = WindowState(*(t if t.dtype == torch.bool else t.float() for t in initial_state))
        return v.new_empty(B, 0, H, Dv), (state if output_final_state else None)
    sink = None
    if sinks > 0:
        sink, keep_tok, sfrom = _sink_slots(q, k, v, initial_state, sinks, causal, key_padding_mask, offsets)
    S0, z0, m0 = (t.float().contiguous() for t in initial_state[:3])
    kt, vt = initial_state.k_tail.float().transpose(1, 2), initial_state.v_tail.float().transpose(1, 2)
    tail_keep = initial_state.tail_keep.to(torch.bool)
    if offsets is None:
        keep = torch.ones(B, T, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask
        if sink is not None:
            keep = keep.to(torch.bool) & keep_tok
        Ke = torch.cat([kt, k.float()], 1)  # [B, n + T, Hk, D]
        Ve = torch.cat([vt, v.float()], 1)
        keep_e = torch.cat([tail_keep, keep.to(torch.bool)], 1)
        lengths, segments = [T], None
    else:
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        ks, vs, fl, segments, e = [], [], [], [], 0
        for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            ks += [kt[i], k[0, a:b].float()]
            vs += [vt[i], v[0, a:b].float()]
            fl += [tail_keep[i], torch.ones(b - a, dtype=torch.bool, device=dev) if sink is None else keep_tok[0, a:b]]
            segments.append((a, b, e))
            e += n + b - a
        Ke, Ve, keep_e = torch.cat(ks)[None], torch.cat(vs)[None], torch.cat(fl)[None]
    runs = _plan(lengths, window, causal, keep_e, dev, mode, offsets is not None)
    cfg = dict(
        runs=runs,
        band=BandTables(segments or [(0, T, 0)], n, (n + 1 if causal else 2 * n + 1) if window >= 1 else 0, dev),
        sfrom=None if sink is None else sfrom,
        keep_u8=keep_e.contiguous().view(torch.uint8),
        kdtype=k.dtype,
        cu=cu_seqlens,
        freq=params.freq.float().contiguous(),
        psi=None if params.psi is None else params.psi.float().contiguous(),
    )
    log_mix = None if params.log_mix is None else params.log_mix.float()
    ks, vs = (None, None) if sink is None else sink[:2]
    o, S, z, m = _TritonWindow.apply(
        q.contiguous(), Ke, Ve, params.W.float(), params.bias.float().contiguous(), S0, z0, m0, keep_e, log_mix,
        ks, vs, params, cfg,
    )  # fmt: skip
    o = o.to(v.dtype)
    if not output_final_state:
        return o, None
    if offsets is None:
        k_tail, v_tail, keep_tail = Ke[:, T:], Ve[:, T:], keep_e[:, T:]
    else:
        idx = torch.tensor([e + b - a + j for a, b, e in segments for j in range(n)], dtype=torch.long, device=dev)
        k_tail = Ke[0].index_select(0, idx).unflatten(0, (R, n))
        v_tail = Ve[0].index_select(0, idx).unflatten(0, (R, n))
        keep_tail = keep_e[0].index_select(0, idx).unflatten(0, (R, n))
    sink_slots = sink
    if sink is None:
        sink_slots = (t.float() if t.is_floating_point() else t for t in initial_state.sink_part)
    return o, WindowState(S, z, m, k_tail.transpose(1, 2), v_tail.transpose(1, 2), keep_tail, *sink_slots)
