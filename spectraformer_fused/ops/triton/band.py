"""The exact band of the hybrid window on the Triton backend (``window.py``): for every query t the
exact kernel over the extended keys ``t .. t + band - 1`` (band = W causal, 2W - 1 non-causal), as an
unnormalised numerator, denominator and the row's log scale, forward and backward.

Three kernels, each over a table of blocks so that packed sequences (each with its own extended rows) run
in the same launch as a dense batch:

* ``_band_fwd_kernel`` (grid ``(query blocks, B x H)``): BT queries against the ``BT + band - 1`` extended
  keys they can reach, BK at a time, with an online maximum (as flash attention): ``num [B, H, T, Dv]``,
  ``den [B, H, T]`` relative to ``exp(top)``, top the row's largest logit (0 for a row without a visible
  key). Logits: ``x.y + exact_sq (|x|^2 + |y|^2)``, x, y = sqrt(scale) q, k.
* ``_band_dq_kernel`` (same grid) and ``_band_dkv_kernel`` (grid ``(key blocks, B x H)``): from the
  gradients of num and den (``dnum``, ``dden``, on the same scale), with p = exp(logit - top) recomputed:
  ds = p (dnum . v + dden), dx = sum_j ds y_j (+ 2 exact_sq x sum_j ds), dy = sum_t ds x_t (+ ...),
  dv = sum_t p dnum_t. The key side writes per-query-head partials, summed over each group on the host.

Sinks (DESIGN.md section 8): the forward and dq kernels read S sink slots per sequence (``ks``, ``vs`` ``[R,
S, Hk, .]``; the block tables give each query block its sequence row and first query row; ``sfrom [R, S]``
the first position of the sequence whose query sees the slot) as one more key block before the band, in
the same online maximum; the dq kernel writes each block's share of the slots' dk, dv as per-block partials
(``[blocks, B H, S, .]``), summed per sequence on the host. Window 0 (``band = 0``) runs the sinks alone.

No ``[T, band]`` tensor exists outside registers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import _dot, dot_precision

BT = 32  # queries per block
BK = 32  # keys per step


@triton.jit
def _band_logits(x, y, xsq, o_t, m_t, o_j, keep, eo, ee, s_mb, i_b, exact_sq, WB, HAS_SQ: tl.constexpr,
                 PREC: tl.constexpr):  # fmt: skip
    """[BT, BK] logits of query rows o_t (x [BT, BD], times sqrt(scale)) against extended keys o_j (y
    [BK, BD]), -inf outside each row's band, past the segment's end ee, or where keep is 0."""
    s = _dot(x, tl.trans(y), PREC)
    if HAS_SQ:
        s += xsq[:, None] + exact_sq * tl.sum(y * y, axis=1)[None, :]
    rel = o_j[None, :] - (o_t[:, None] + eo)
    m_j = o_j < ee
    kept = tl.load(keep + i_b * s_mb + o_j, mask=m_j, other=0) != 0
    vis = (rel >= 0) & (rel < WB) & (m_j & kept)[None, :] & m_t[:, None]
    return tl.where(vis, s, float("-inf"))


@triton.jit
def _sink_logits(x, y, xsq, t_loc, m_t, sfrom, srow, NS, o_s, exact_sq, HAS_SQ: tl.constexpr, PREC: tl.constexpr):
    """[BT, BS] logits of query rows (local positions t_loc in their sequence) against sink slots o_s of
    sequence row srow (y [BS, BD]): -inf where the slot is not visible (``sfrom [R, NS]``: the first local
    query position that sees the slot; past the end where it is empty or masked)."""
    s = _dot(x, tl.trans(y), PREC)
    if HAS_SQ:
        s += xsq[:, None] + exact_sq * tl.sum(y * y, axis=1)[None, :]
    m_s = o_s < NS
    fr = tl.load(sfrom + srow * NS + o_s, mask=m_s, other=0)
    vis = (fr[None, :] <= t_loc[:, None]) & m_s[None, :] & m_t[:, None]
    return tl.where(vis, s, float("-inf"))


@triton.jit
def _online(s, vv, m_i, l_i, acc, PREC: tl.constexpr):
    """One step of the online softmax sums (flash attention) with logits s [BT, BK] and values vv [BK, BV]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p, vv, PREC)
    return m_new, l_i, acc


@triton.jit
def _rows(x, i_b, i_h, o_t, m_t, o_d, m_d, s_b, s_t, s_h):
    """[rows, cols] fp32 tile of a [B, T, H, cols] tensor (last dim contiguous); zeros outside."""
    p = x + i_b * s_b + o_t[:, None] * s_t + i_h * s_h + o_d[None, :]
    return tl.load(p, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _query_block(q, tq0, tq1, teo, tee, i_blk, i_b, i_h, s_qb, s_qt, s_qh, D, root, exact_sq, BT: tl.constexpr,
                 BD: tl.constexpr):  # fmt: skip
    """Block i_blk of the query table: its rows o_t (m_t: inside the segment), the offset eo of their bands
    (query t's band starts at extended row t + eo), the segment's end ee of extended rows, x = sqrt(scale) q
    [BT, BD] and exact_sq |x|^2."""
    q0, q1 = tl.load(tq0 + i_blk).to(tl.int64), tl.load(tq1 + i_blk).to(tl.int64)
    eo, ee = tl.load(teo + i_blk).to(tl.int64), tl.load(tee + i_blk).to(tl.int64)
    o_t = q0 + tl.arange(0, BT)
    m_t = o_t < q1
    o_d = tl.arange(0, BD)
    x = _rows(q, i_b, i_h, o_t, m_t, o_d, o_d < D, s_qb, s_qt, s_qh) * root
    return q0, eo, ee, o_t, m_t, x, exact_sq * tl.sum(x * x, axis=1)


@triton.jit
def _band_fwd_kernel(
    q, k, v, keep, num, den, top, tq0, tq1, teo, tee, tsr, tqa, ks, vs, sfrom,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_mb, s_sb, s_st, s_sh, s_ub, s_ut, s_uh,
    T, H, G, D, DV, NS, root, exact_sq, WB,
    HAS_SQ: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    BV: tl.constexpr, BS: tl.constexpr, HAS_BAND: tl.constexpr, HAS_SINK: tl.constexpr,
):  # fmt: skip
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    q0, eo, ee, o_t, m_t, x, xsq = _query_block(q, tq0, tq1, teo, tee, i_blk, i_b, i_h, s_qb, s_qt, s_qh, D, root,
                                                exact_sq, BT, BD)  # fmt: skip
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    l_i = tl.zeros([BT], dtype=tl.float32)
    m_i = tl.full([BT], float("-inf"), tl.float32)
    if HAS_SINK:  # the sinks of the block's sequence (row srow), before its band
        srow = i_b + tl.load(tsr + i_blk).to(tl.int64)
        t_loc = o_t - tl.load(tqa + i_blk).to(tl.int64)
        for s0 in range(0, NS, BS):
            o_s = s0 + tl.arange(0, BS)
            y = _rows(ks, srow, i_hk, o_s, o_s < NS, o_d, m_d, s_sb, s_st, s_sh) * root
            s = _sink_logits(x, y, xsq, t_loc, m_t, sfrom, srow, NS, o_s, exact_sq, HAS_SQ, PREC)
            vv = _rows(vs, srow, i_hk, o_s, o_s < NS, o_v, m_v, s_ub, s_ut, s_uh)
            m_i, l_i, acc = _online(s, vv, m_i, l_i, acc, PREC)
    if HAS_BAND:
        e_lo = q0 + eo
        e_hi = tl.minimum(e_lo + BT + WB - 1, ee)
        for j0 in range(e_lo, e_hi, BK):
            o_j = j0 + tl.arange(0, BK)
            m_j = o_j < ee
            y = _rows(k, i_b, i_hk, o_j, m_j, o_d, m_d, s_kb, s_kt, s_kh) * root
            s = _band_logits(x, y, xsq, o_t, m_t, o_j, keep, eo, ee, s_mb, i_b, exact_sq, WB, HAS_SQ, PREC)
            vv = _rows(v, i_b, i_hk, o_j, m_j, o_v, m_v, s_vb, s_vt, s_vh)
            m_i, l_i, acc = _online(s, vv, m_i, l_i, acc, PREC)
    row = i_bh * T + o_t
    tl.store(num + row[:, None] * DV + o_v[None, :], acc, mask=m_t[:, None] & m_v[None, :])
    tl.store(den + row, l_i, mask=m_t)
    tl.store(top + row, tl.where(m_i == float("-inf"), 0.0, m_i), mask=m_t)


@triton.jit
def _band_dq_kernel(
    q, k, v, keep, top, dnum, dden, dq, tq0, tq1, teo, tee, tsr, tqa, ks, vs, sfrom, dks, dvs,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_mb, s_sb, s_st, s_sh, s_ub, s_ut, s_uh,
    T, H, G, D, DV, NS, root, exact_sq, WB,
    HAS_SQ: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    BV: tl.constexpr, BS: tl.constexpr, HAS_BAND: tl.constexpr, HAS_SINK: tl.constexpr,
):  # fmt: skip
    """dq of a query block; with sinks also the block's share of the sinks' dk and dv, into per-block
    partials ``dks [blocks, B H, NS, D]``, ``dvs [blocks, B H, NS, DV]`` (summed per sequence on the host)."""
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    q0, eo, ee, o_t, m_t, x, xsq = _query_block(q, tq0, tq1, teo, tee, i_blk, i_b, i_h, s_qb, s_qt, s_qh, D, root,
                                                exact_sq, BT, BD)  # fmt: skip
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    row = i_bh * T + o_t
    b_top = tl.load(top + row, mask=m_t, other=0.0)
    b_dn = tl.load(dnum + row[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_dd = tl.load(dden + row, mask=m_t, other=0.0)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    dsum = tl.zeros([BT], dtype=tl.float32)
    if HAS_SINK:
        srow = i_b + tl.load(tsr + i_blk).to(tl.int64)
        t_loc = o_t - tl.load(tqa + i_blk).to(tl.int64)
        part = (i_blk.to(tl.int64) * tl.num_programs(1) + i_bh) * NS
        for s0 in range(0, NS, BS):
            o_s = s0 + tl.arange(0, BS)
            m_s = o_s < NS
            y = _rows(ks, srow, i_hk, o_s, m_s, o_d, m_d, s_sb, s_st, s_sh) * root
            s = _sink_logits(x, y, xsq, t_loc, m_t, sfrom, srow, NS, o_s, exact_sq, HAS_SQ, PREC)
            p = tl.exp(s - b_top[:, None])
            tl.store(dvs + (part + o_s[:, None]) * DV + o_v[None, :], _dot(tl.trans(p), b_dn, PREC),
                     mask=m_s[:, None] & m_v[None, :])  # fmt: skip
            vv = _rows(vs, srow, i_hk, o_s, m_s, o_v, m_v, s_ub, s_ut, s_uh)
            ds = p * (_dot(b_dn, tl.trans(vv), PREC) + b_dd[:, None])
            dy = _dot(tl.trans(ds), x, PREC)
            if HAS_SQ:
                dy += 2.0 * exact_sq * y * tl.sum(ds, axis=0)[:, None]
            tl.store(dks + (part + o_s[:, None]) * D + o_d[None, :], dy * root, mask=m_s[:, None] & m_d[None, :])
            dx += _dot(ds, y, PREC)
            dsum += tl.sum(ds, axis=1)
    if HAS_BAND:
        e_lo = q0 + eo
        e_hi = tl.minimum(e_lo + BT + WB - 1, ee)
        for j0 in range(e_lo, e_hi, BK):
            o_j = j0 + tl.arange(0, BK)
            m_j = o_j < ee
            y = _rows(k, i_b, i_hk, o_j, m_j, o_d, m_d, s_kb, s_kt, s_kh) * root
            s = _band_logits(x, y, xsq, o_t, m_t, o_j, keep, eo, ee, s_mb, i_b, exact_sq, WB, HAS_SQ, PREC)
            p = tl.exp(s - b_top[:, None])
            vv = _rows(v, i_b, i_hk, o_j, m_j, o_v, m_v, s_vb, s_vt, s_vh)
            ds = p * (_dot(b_dn, tl.trans(vv), PREC) + b_dd[:, None])
            dx += _dot(ds, y, PREC)
            dsum += tl.sum(ds, axis=1)
    if HAS_SQ:
        dx += 2.0 * exact_sq * x * dsum[:, None]
    tl.store(dq + i_b * s_qb + o_t[:, None] * s_qt + i_h * s_qh + o_d[None, :], dx * root,
             mask=m_t[:, None] & m_d[None, :])  # fmt: skip


@triton.jit
def _band_dkv_kernel(
    q, k, v, keep, top, dnum, dden, dk, dv, tk0, tke, teo, tqa, tqb,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_mb, s_pb, s_pt, s_ph, s_wb, s_wt, s_wh,
    T, H, G, D, DV, root, exact_sq, WB,
    HAS_SQ: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    BV: tl.constexpr,
):  # fmt: skip
    """Key block [k0, k0 + BK) of a segment (extended rows up to ke; query t's band starts at t + eo; the
    segment's queries qa..qb): dk, dv of query head i_h's part, into the per-query-head partials."""
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    k0, ee = tl.load(tk0 + i_blk).to(tl.int64), tl.load(tke + i_blk).to(tl.int64)
    eo = tl.load(teo + i_blk).to(tl.int64)
    qa, qb = tl.load(tqa + i_blk).to(tl.int64), tl.load(tqb + i_blk).to(tl.int64)
    o_j = k0 + tl.arange(0, BK)
    m_j = o_j < ee
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    y = _rows(k, i_b, i_hk, o_j, m_j, o_d, m_d, s_kb, s_kt, s_kh) * root
    vv = _rows(v, i_b, i_hk, o_j, m_j, o_v, m_v, s_vb, s_vt, s_vh)
    dy = tl.zeros([BK, BD], dtype=tl.float32)
    dvv = tl.zeros([BK, BV], dtype=tl.float32)
    dsum = tl.zeros([BK], dtype=tl.float32)
    t_lo = tl.maximum(k0 - WB + 1 - eo, qa)
    t_hi = tl.minimum(k0 + BK - eo, qb)
    for t0 in range(t_lo, t_hi, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < t_hi
        x = _rows(q, i_b, i_h, o_t, m_t, o_d, m_d, s_qb, s_qt, s_qh) * root
        xsq = exact_sq * tl.sum(x * x, axis=1)
        row = i_bh * T + o_t
        b_top = tl.load(top + row, mask=m_t, other=0.0)
        b_dn = tl.load(dnum + row[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_dd = tl.load(dden + row, mask=m_t, other=0.0)
        s = _band_logits(x, y, xsq, o_t, m_t, o_j, keep, eo, ee, s_mb, i_b, exact_sq, WB, HAS_SQ, PREC)
        p = tl.exp(s - b_top[:, None])
        ds = p * (_dot(b_dn, tl.trans(vv), PREC) + b_dd[:, None])
        dvv += _dot(tl.trans(p), b_dn, PREC)
        dy += _dot(tl.trans(ds), x, PREC)
        dsum += tl.sum(ds, axis=0)
    if HAS_SQ:
        dy += 2.0 * exact_sq * y * dsum[:, None]
    tl.store(dk + i_b * s_pb + o_j[:, None] * s_pt + i_h * s_ph + o_d[None, :], dy * root,
             mask=m_j[:, None] & m_d[None, :])  # fmt: skip
    tl.store(dv + i_b * s_wb + o_j[:, None] * s_wt + i_h * s_wh + o_v[None, :], dvv,
             mask=m_j[:, None] & m_v[None, :])  # fmt: skip


class BandTables:
    """The block tables of one call: ``segments`` = ``[(qa, qb, e)]``, the query rows of each segment and
    the first extended row of its keys (a dense batch: one segment ``(0, T, 0)``), ``n`` = W - 1, ``band``
    the keys per query (0: no band, sinks only). Query t of a segment starts its band at extended row
    ``e + t - qa``; segment i reads the sink slots of row ``b + i`` (batch row b of a dense batch, sequence
    i of packed ones)."""

    def __init__(self, segments, n: int, band: int, device):
        q0, q1, eo, ee, sr, qs = [], [], [], [], [], []
        k0, ke, ko, ka, kb = [], [], [], [], []
        for i, (qa, qb, e) in enumerate(segments):
            end = e + n + qb - qa
            for t in range(qa, qb, BT):
                q0.append(t), q1.append(qb), eo.append(e - qa), ee.append(end), sr.append(i), qs.append(qa)
            for j in range(e, end, BK):
                k0.append(j), ke.append(end), ko.append(e - qa), ka.append(qa), kb.append(qb)

        def table(x):
            return torch.tensor(x, dtype=torch.int64, device=device)

        self.band = band
        self.query = tuple(table(x) for x in (q0, q1, eo, ee, sr, qs))
        self.keys = tuple(table(x) for x in (k0, ke, ko, ka, kb))


def _launch_args(q, Ke, Ve, keep_e, scale, exact_sq, tables: BandTables):
    B, T, H, D = q.shape
    Hk, Dv = Ke.shape[2], Ve.shape[-1]
    return dict(
        s_qb=q.stride(0), s_qt=q.stride(1), s_qh=q.stride(2),
        s_kb=Ke.stride(0), s_kt=Ke.stride(1), s_kh=Ke.stride(2),
        s_vb=Ve.stride(0), s_vt=Ve.stride(1), s_vh=Ve.stride(2),
        s_mb=keep_e.stride(0),
        T=T, H=H, G=H // Hk, D=D, DV=Dv, root=math.sqrt(scale), exact_sq=float(exact_sq), WB=tables.band,
        HAS_SQ=exact_sq != 0.0, PREC=dot_precision(q.dtype, torch.float32), BT=BT, BK=BK,
        BD=max(16, triton.next_power_of_2(D)), BV=max(16, triton.next_power_of_2(Dv)), num_warps=4,
    )  # fmt: skip


def _sink_args(q, sinks, tables: BandTables):
    """The query-side kernels' sink arguments: ``sinks`` = (ks [R, S, Hk, D], vs [R, S, Hk, Dv] fp32, last dim
    contiguous, sfrom [R, S] int64 contiguous) or None."""
    if sinks is None:
        ks = vs = sfrom = q
        NS, st_k, st_v = 0, (0, 0, 0), (0, 0, 0)
    else:
        ks, vs, sfrom = sinks
        NS, st_k, st_v = ks.shape[1], ks.stride()[:3], vs.stride()[:3]
    return (ks, vs, sfrom), dict(
        s_sb=st_k[0], s_st=st_k[1], s_sh=st_k[2], s_ub=st_v[0], s_ut=st_v[1], s_uh=st_v[2], NS=NS,
        BS=min(BK, max(16, triton.next_power_of_2(max(NS, 1)))), HAS_BAND=tables.band > 0, HAS_SINK=NS > 0,
    )  # fmt: skip


def band_forward(q, Ke, Ve, keep_e, *, scale: float, exact_sq: float, tables: BandTables, sinks=None):
    """q ``[B, T, H, D]`` (last dim contiguous), Ke ``[B, L, Hk, D]``, Ve ``[B, L, Hk, Dv]`` (fp32, last dim
    contiguous), keep_e ``[B, L]`` uint8; ``sinks`` (``_sink_args``) or None: the sink slots, exact for every
    query they are visible to, besides the band. Returns ``(num [B, H, T, Dv], den [B, H, T], top [B, H,
    T])``: the band's and the sinks' exact part."""
    B, T, H, _ = q.shape
    Dv = Ve.shape[-1]
    num = torch.zeros(B, H, T, Dv, dtype=torch.float32, device=q.device)
    den = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    top = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    nb = tables.query[0].numel()
    sink_t, sink_kw = _sink_args(q, sinks, tables)
    if nb and T:
        _band_fwd_kernel[(nb, B * H)](q, Ke, Ve, keep_e, num, den, top, *tables.query, *sink_t,
                                      **_launch_args(q, Ke, Ve, keep_e, scale, exact_sq, tables), **sink_kw)  # fmt: skip
    return num, den, top


def band_backward(q, Ke, Ve, keep_e, top, dnum, dden, *, scale: float, exact_sq: float, tables: BandTables,
                  sinks=None):  # fmt: skip
    """The gradients of the exact part's (num, den) given as ``dnum [B, H, T, Dv]``, ``dden [B, H, T]``: ``(dq
    [B, T, H, D], dKe [B, L, Hk, D], dVe [B, L, Hk, Dv], dks [R, S, Hk, D], dvs [R, S, Hk, Dv])``, fp32 (the
    last two None without sinks)."""
    B, T, H, D = q.shape
    L, Hk, Dv = Ke.shape[1], Ke.shape[2], Ve.shape[-1]
    G = H // Hk
    dq = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, L, H, D, dtype=torch.float32, device=q.device)  # per query head
    dv = torch.zeros(B, L, H, Dv, dtype=torch.float32, device=q.device)
    args = _launch_args(q, Ke, Ve, keep_e, scale, exact_sq, tables)
    sink_t, sink_kw = _sink_args(q, sinks, tables)
    dnum, dden, top = dnum.contiguous(), dden.contiguous(), top.contiguous()
    nq, nk = tables.query[0].numel(), tables.keys[0].numel()
    NS = sink_kw["NS"]
    # the sinks' dk, dv per query block and query head (every slot of every block written); unused without
    dks = dvs = dq
    if sinks is not None:
        dks = torch.zeros(nq, B * H, NS, D, dtype=torch.float32, device=q.device)
        dvs = torch.zeros(nq, B * H, NS, Dv, dtype=torch.float32, device=q.device)
    if nq and T:
        _band_dq_kernel[(nq, B * H)](q, Ke, Ve, keep_e, top, dnum, dden, dq, *tables.query, *sink_t, dks, dvs,
                                     **args, **sink_kw)  # fmt: skip
    if nk and T and tables.band > 0:
        _band_dkv_kernel[(nk, B * H)](q, Ke, Ve, keep_e, top, dnum, dden, dk, dv, *tables.keys,
                                      s_pb=dk.stride(0), s_pt=dk.stride(1), s_ph=dk.stride(2), s_wb=dv.stride(0),
                                      s_wt=dv.stride(1), s_wh=dv.stride(2), **args)  # fmt: skip
    if G > 1:
        dk, dv = dk.unflatten(2, (Hk, G)).sum(3), dv.unflatten(2, (Hk, G)).sum(3)
    if sinks is None:
        return dq, dk, dv, None, None
    # each block's partials to its sequence row (batch row b + segment index), the query heads to their group
    R = sinks[0].shape[0]
    rows = (tables.query[4][:, None] + torch.arange(B, device=q.device)[None]).flatten()  # [nq * B]
    out = []
    for part in (dks, dvs):
        part = part.unflatten(1, (B, H)).flatten(0, 1)  # [nq * B, H, NS, .]
        acc = torch.zeros((R,) + part.shape[1:], dtype=torch.float32, device=q.device).index_add_(0, rows, part)
        out.append(acc.unflatten(1, (Hk, G)).sum(2).transpose(1, 2))  # [R, NS, Hk, .]
    return dq, dk, dv, out[0], out[1]
