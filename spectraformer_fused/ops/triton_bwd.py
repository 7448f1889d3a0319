"""Triton backward of random-feature attention.

The forward saves only its inputs, the output ``o``, the raw denominator ``den``, the query stabilisers
``qmax [B, H, T]``, the key stabilisers ``kstab`` (one per chunk) and its final state; every feature is
recomputed here, so no ``[T, F]`` tensor is ever stored or allocated.

With ``g_t = dL/do_t``, ``den_s = max(|den_t|, eps)``, ``a_t = g_t / den_s`` and
``beta_t = -(g_t . o_t) sign(den_t) / den_s`` (0 where the floor is active):

    dphiq_t = S_t a_t + z_t beta_t                    (S_t, z_t: the state after key t, causal; all keys otherwise)
    dphik_j = dS_j v_j + dz_j,  dS_j = sum_{t >= j} phiq_t a_t^T,  dz_j = sum_{t >= j} phiq_t beta_t
    dv_j    = dS_j^T phik_j

Key features and the carried state of chunk c are relative to the key stabiliser ``kstab_c``; the
carried ``dS``/``dz`` of chunk c are relative to the same constant, so moving from chunk c + 1 to c
multiplies them by ``exp(min(kstab_c - kstab_{c+1}, 0)) <= 1``: the forward's factor (kstab only
decreases after leading chunks without any key, whose stabiliser is 0 and whose state is zero).
Gradients of the returned final state seed ``dS``/``dz`` before the last chunk;
``dS0 = dS * exp(m0 - kstab_0)`` after the first.

Kernels, all tiled by frequency (a tile of BM rows of W gives one or two feature blocks) and holding the
full head dims in registers:

* ``_rf_bwd_dq_kernel``: the query gradient of its frequency tile. Causal: walks the chunks forward,
  rebuilding the state. Non-causal: the state is the forward's final one, and program id 2 takes one of
  NSPLIT ranges of chunks, so the ranges run in parallel.
* ``_rf_bwd_dstate_kernel`` (non-causal only): each range's part of ``dS``/``dz`` over its queries,
  reduced on the host together with the final-state gradients.
* ``_rf_bwd_dkv_kernel``: key and value gradients of its tile and the initial state's gradient. Causal:
  walks the chunks backward carrying ``dS``/``dz``; non-causal: reads the reduced ones, one range each.

The input gradients of each frequency tile, and W's and the bias' gradients of each (batch, head, range),
are fp32 partials summed on the host: deterministic, no atomics.

Grouped-query attention (k, v with Hk = H / G heads): every kernel runs per (batch, query head) and
reads k, v, the parameters, kstab and the state of key/value head ``i_h // G``. The gradients of
key/value-head tensors (dk, dv, dW, dbias, dS0, dz0) are written as per-query-head fp32 partials and
summed over each group on the host in a fixed order; the final state's gradient seeds the first query
head of each group, so it counts once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..contract import DEN_EPS, feature_width
from .triton_common import (
    KIND_EXP,
    KIND_HYP,
    KIND_TRIG,
    VarlenTables,
    _dot,
    _features,
    _keep_rows,
    _seq_span,
    _transform,
    autotuned,
    dot_precision,
    optional_inputs,
    varlen_args,
)
from .triton_fwd import _num_splits, freq_tile

# Autotuning candidates of the dq and dkv kernels. Without autotuning: 8 warps for the causal walk and 4
# otherwise. Compiled for sm_90 at D = Dv = 64, m = 128, 8 warps spill less in every causal case (dkv,
# fp16: 40 bytes per thread against 208) at the same warps per multiprocessor (both use 255 registers);
# non-causal, the posrf kernels hardly spill with 4 warps (0-24 bytes) and fit more programs.
_BWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]
_KEY = ["BT", "BM", "BD", "BV", "KIND", "CAUSAL"]


@triton.jit
def _query_phi(
    q,
    qmax,
    p_tk,
    m_tk,
    i_bh,
    T,
    o_t,
    m_t,
    w,
    bias,
    freq,
    psi,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    PREC: tl.constexpr,
):
    """A chunk's query tile [BT, BD], its x' and its features relative to the saved qmax."""
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0)
    qt, qr = _transform(b_q, psi, root, c_t, c_o, True, HAS_PSI, HAS_CO)
    b_qm = tl.load(qmax + i_bh * T + o_t, mask=m_t, other=0.0)
    qa, qb = _features(qt, qr, w, bias, freq, b_qm[:, None], m_t, KIND, PREC)
    return b_q, qt, qa, qb


@triton.jit
def _key_phi(
    k,
    mask,
    p_tk,
    m_tk,
    i_b,
    T,
    o_t,
    m_t,
    w,
    bias,
    freq,
    psi,
    shift,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PREC: tl.constexpr,
):
    """A chunk's key tile [BT, BD], its x' and its features relative to ``shift``; masked keys give 0."""
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
    kt, kr = _transform(b_k, psi, root, c_t, c_o, False, HAS_PSI, HAS_CO)
    keep = _keep_rows(mask, i_b, o_t, m_t, T, 1, HAS_MASK)  # the mask is contiguous [B, T]
    ka, kb = _features(kt, kr, w, bias, freq, shift, keep, KIND, PREC)
    return b_k, kt, ka, kb


@triton.jit
def _tile_params(
    w, bias, freq, psi, i_bh, i_h, o_m, m_m, o_d, m_d, stride_wh, M, D, HAS_PSI: tl.constexpr, BD: tl.constexpr
):
    """This program's W tile [BM, BD], bias [BM] (-inf on padded frequencies), freq and psi [BD]."""
    b_w = tl.load(w + i_h * stride_wh + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_bias = tl.load(bias + i_bh * M + o_m, mask=m_m, other=float("-inf"))
    b_freq = tl.load(freq + i_bh)
    if HAS_PSI:
        b_psi = tl.load(psi + i_bh * D + o_d, mask=m_d, other=1.0)
    else:
        b_psi = tl.full([BD], 1.0, tl.float32)
    return b_w, b_bias, b_freq, b_psi


@triton.jit
def _kstab_row(kstab, chunk_off, i_b, i_hk, i_bk, NC, NCS, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Pointer to the key stabilisers of (batch or sequence i_b, key/value head): the causal kstab
    ``[B, HK, NC]``, or of packed sequences ``[1, HK, NCS]`` with sequence i_b's chunks from slot
    chunk_off[i_b]; the non-causal ``[B, HK, 1]`` (one per sequence)."""
    if CAUSAL and IS_VARLEN:
        p = kstab + i_hk * NCS + tl.load(chunk_off + i_b)
    elif CAUSAL:
        p = kstab + i_bk * NC
    else:
        p = kstab + i_bk
    return p


@triton.jit
def _phi_grad(dpa, dpb, pa, pb, KIND: tl.constexpr):
    """Feature gradients -> (de, du) [BT, BM]: de the gradient of the common exponent part
    (bias + r, summed over both blocks), du the gradient of u = freq * w . x'."""
    if KIND == KIND_TRIG:
        de = dpa * pa + dpb * pb
        du = dpb * pa - dpa * pb
    elif KIND == KIND_HYP:
        dea = dpa * pa
        deb = dpb * pb
        de = dea + deb
        du = dea - deb
    else:
        de = dpa * pa
        du = de
    return de, du


@triton.jit
def _input_grad(
    de,
    du,
    xt,
    raw,
    w,
    psi,
    freq,
    root,
    c_t,
    c_o,
    QUERY: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    PREC: tl.constexpr,
):
    """(de, du) [BT, BM] -> this tile's part of dL/d(input) [BT, BD] (through x' and x = root * raw)."""
    dr = tl.sum(de, axis=1)  # [BT]
    dxt = _dot(du, w, PREC) * freq  # [BT, BM] @ [BM, BD]
    dxt += (2.0 * c_t) * xt * dr[:, None]
    if HAS_PSI:
        if QUERY:
            dx = dxt * psi[None, :]
        else:
            dx = dxt / psi[None, :]
    else:
        dx = dxt
    if HAS_CO:
        dx += (2.0 * c_o * root) * raw.to(tl.float32) * dr[:, None]
    return dx * root


@optional_inputs(HAS_PSI="psi", HAS_MASK="mask", HAS_S0="s0", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_bwd_dq_kernel(
    q,
    k,
    v,
    w,
    bias,
    freq,
    psi,
    mask,
    s0,
    z0,
    m0,
    sf,
    zf,
    qmax,
    kstab,
    da,
    dbeta,
    dq,
    dw,
    db,
    cu,
    chunk_off,
    T,
    H,
    HK,
    G,
    M,
    D,
    DV,
    stride_wh,
    CPS,
    NCS,
    s_wp,
    s_bp,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_S0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
):
    """dq (and the query part of dW, dbias). Causal: one ordered walk rebuilding the state. Non-causal:
    program id 2 picks a range of CPS chunks, and the state is the forward's final one (sf, zf: every
    key and the initial state, relative to the one key stabiliser), so ranges run in parallel; dW/dbias
    partials go to slice i_s (strides s_wp, s_bp)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // G  # grouped-query attention: the key/value head of query head i_h
    i_bk = i_b * HK + i_hk  # k, v, the parameters, kstab and the state are per key/value head
    bos, eos, i_bt, i_bht = _seq_span(cu, i_b, i_bh, i_h, H, T, IS_VARLEN)
    NC = tl.cdiv(eos - bos, BT)
    F = M if KIND == KIND_EXP else 2 * M
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    o_c = tl.arange(0, BT)
    if IS_VARLEN:
        part = i_m * T * H  # start of this tile's partial [1, T, H, D]
    else:
        part = i_m * T * tl.num_programs(1)  # start of this tile's partial [B, T, H, D]

    b_w, b_bias, b_freq, b_psi = _tile_params(
        w, bias, freq, psi, i_bk, i_hk, o_m, m_m, o_d, m_d, stride_wh, M, D, HAS_PSI, BD
    )
    p_ks = _kstab_row(kstab, chunk_off, i_b, i_hk, i_bk, NC, NCS, CAUSAL, IS_VARLEN)
    b_ks0 = tl.load(p_ks)

    # carried state of this tile, relative to the current key stabiliser: [BM, BV] and [BM]
    b_sa = tl.zeros([BM, BV], dtype=tl.float32)
    b_sb = tl.zeros([BM, BV], dtype=tl.float32)
    b_za = tl.zeros([BM], dtype=tl.float32)
    b_zb = tl.zeros([BM], dtype=tl.float32)
    m_sv = m_m[:, None] & m_v[None, :]
    if CAUSAL:
        c_lo = 0
        c_hi = NC
        if HAS_S0:
            b_alpha = tl.exp(tl.load(m0 + i_bk) - b_ks0)
            p_s0 = s0 + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :]
            b_sa = tl.load(p_s0, mask=m_sv, other=0.0) * b_alpha
            b_za = tl.load(z0 + i_bk * F + o_m, mask=m_m, other=0.0) * b_alpha
            if KIND != KIND_EXP:
                b_sb = tl.load(p_s0 + M * DV, mask=m_sv, other=0.0) * b_alpha
                b_zb = tl.load(z0 + i_bk * F + M + o_m, mask=m_m, other=0.0) * b_alpha
    else:
        c_lo = i_s * CPS
        c_hi = tl.minimum(c_lo + CPS, NC)
        p_sf = sf + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :]
        b_sa = tl.load(p_sf, mask=m_sv, other=0.0)
        b_za = tl.load(zf + i_bk * F + o_m, mask=m_m, other=0.0)
        if KIND != KIND_EXP:
            b_sb = tl.load(p_sf + M * DV, mask=m_sv, other=0.0)
            b_zb = tl.load(zf + i_bk * F + M + o_m, mask=m_m, other=0.0)

    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    b_db = tl.zeros([BM], dtype=tl.float32)
    b_kprev = b_ks0
    for c in range(c_lo, c_hi):
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        p_tk = ((i_bt * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]  # q, dq (and partials)
        m_tk = m_t[:, None] & m_d[None, :]
        p_tv = ((i_bt * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :]  # a (and partials)
        m_tv = m_t[:, None] & m_v[None, :]
        p_kk = ((i_bt * T + o_t[:, None]) * HK + i_hk) * D + o_d[None, :]  # k
        p_kv = ((i_bt * T + o_t[:, None]) * HK + i_hk) * DV + o_v[None, :]  # v
        b_a = tl.load(da + p_tv, mask=m_tv, other=0.0)  # [BT, BV]
        b_beta = tl.load(dbeta + i_bht * T + o_t, mask=m_t, other=0.0)  # [BT]
        if CAUSAL:
            b_ks = tl.load(p_ks + c)
            # as in the forward: min() keeps the factor finite after chunks with no key (state zero)
            b_rescale = tl.exp(tl.minimum(b_kprev - b_ks, 0.0))
            b_kprev = b_ks
            b_sa *= b_rescale
            b_za *= b_rescale
            b_sb *= b_rescale
            b_zb *= b_rescale
            b_v = tl.load(v + p_kv, mask=m_tv, other=0.0).to(tl.float32)
            _, _, ka, kb = _key_phi(
                k,
                mask,
                p_kk,
                m_tk,
                i_bt,
                T,
                o_t,
                m_t,
                b_w,
                b_bias,
                b_freq,
                b_psi,
                b_ks,
                root,
                c_t,
                c_o,
                KIND,
                HAS_PSI,
                HAS_CO,
                HAS_MASK,
                PREC,
            )
            # P[t, j] = a_t . v_j + beta_t for keys j <= t of this chunk
            b_p = _dot(b_a, tl.trans(b_v), PREC) + b_beta[:, None]  # [BT, BV] @ [BV, BT]
            b_p = tl.where(o_t[:, None] >= o_t[None, :], b_p, 0.0)
            dqa = _dot(b_p, ka, PREC)  # [BT, BT] @ [BT, BM]
            if KIND != KIND_EXP:
                dqb = _dot(b_p, kb, PREC)
        else:
            dqa = tl.zeros([BT, BM], dtype=tl.float32)
            dqb = tl.zeros([BT, BM], dtype=tl.float32)
        dqa += _dot(b_a, tl.trans(b_sa), PREC) + b_beta[:, None] * b_za[None, :]
        if KIND != KIND_EXP:
            dqb += _dot(b_a, tl.trans(b_sb), PREC) + b_beta[:, None] * b_zb[None, :]
        else:
            dqb = dqa

        b_q, qt, qa, qb = _query_phi(
            q,
            qmax,
            p_tk,
            m_tk,
            i_bht,
            T,
            o_t,
            m_t,
            b_w,
            b_bias,
            b_freq,
            b_psi,
            root,
            c_t,
            c_o,
            KIND,
            HAS_PSI,
            HAS_CO,
            PREC,
        )
        de, du = _phi_grad(dqa, dqb, qa, qb, KIND)
        b_db += tl.sum(de, axis=0)
        b_dw += _dot(tl.trans(du), qt, PREC) * b_freq  # [BM, BT] @ [BT, BD]
        b_dq = _input_grad(de, du, qt, b_q, b_w, b_psi, b_freq, root, c_t, c_o, True, HAS_PSI, HAS_CO, PREC)
        tl.store(dq + part * D + p_tk, b_dq, mask=m_tk)

        if CAUSAL:
            b_sa += _dot(tl.trans(ka), b_v, PREC)
            b_za += tl.sum(ka, axis=0)
            if KIND != KIND_EXP:
                b_sb += _dot(tl.trans(kb), b_v, PREC)
                b_zb += tl.sum(kb, axis=0)

    tl.store(dw + i_s * s_wp + (i_bh * M + o_m[:, None]) * D + o_d[None, :], b_dw, mask=m_m[:, None] & m_d[None, :])
    tl.store(db + i_s * s_bp + i_bh * M + o_m, b_db, mask=m_m)


@optional_inputs(HAS_PSI="psi", HAS_MASK="mask", HAS_S0="ds0", HAS_DSF="dsf", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_bwd_dkv_kernel(
    q,
    k,
    v,
    w,
    bias,
    freq,
    psi,
    mask,
    m0,
    qmax,
    kstab,
    da,
    dbeta,
    dsf,
    dzf,
    dk,
    dv,
    dw,
    db,
    ds0,
    dz0,
    cu,
    chunk_off,
    T,
    H,
    HK,
    G,
    M,
    D,
    DV,
    stride_wh,
    CPS,
    NCS,
    s_wp,
    s_bp,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_S0: tl.constexpr,
    HAS_DSF: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // G  # grouped-query attention: the key/value head of query head i_h
    i_bk = i_b * HK + i_hk  # k, v, the parameters, kstab and the state are per key/value head
    bos, eos, i_bt, i_bht = _seq_span(cu, i_b, i_bh, i_h, H, T, IS_VARLEN)
    NC = tl.cdiv(eos - bos, BT)
    F = M if KIND == KIND_EXP else 2 * M
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    o_c = tl.arange(0, BT)
    m_sv = m_m[:, None] & m_v[None, :]
    if IS_VARLEN:
        part = i_m * T * H  # start of this tile's partial [1, T, H, .]
    else:
        part = i_m * T * tl.num_programs(1)  # start of this tile's partial [B, T, H, .]

    b_w, b_bias, b_freq, b_psi = _tile_params(
        w, bias, freq, psi, i_bk, i_hk, o_m, m_m, o_d, m_d, stride_wh, M, D, HAS_PSI, BD
    )
    if CAUSAL and IS_VARLEN:
        NK = tl.maximum(NC, 1)  # an empty sequence owns one chunk slot (its initial stabiliser)
    elif CAUSAL:
        NK = NC
    else:
        NK = 1

    # carried dS, dz of this tile, relative to the current key stabiliser: [BM, BV] and [BM]
    b_dsa = tl.zeros([BM, BV], dtype=tl.float32)
    b_dsb = tl.zeros([BM, BV], dtype=tl.float32)
    b_dza = tl.zeros([BM], dtype=tl.float32)
    b_dzb = tl.zeros([BM], dtype=tl.float32)
    if HAS_DSF:  # per query head: the host gives the final state's gradient to the first of each group
        p_sf = dsf + i_bh * F * DV + o_m[:, None] * DV + o_v[None, :]
        b_dsa = tl.load(p_sf, mask=m_sv, other=0.0)
        b_dza = tl.load(dzf + i_bh * F + o_m, mask=m_m, other=0.0)
        if KIND != KIND_EXP:
            b_dsb = tl.load(p_sf + M * DV, mask=m_sv, other=0.0)
            b_dzb = tl.load(dzf + i_bh * F + M + o_m, mask=m_m, other=0.0)

    if CAUSAL:
        c_lo = 0
        c_hi = NC
    else:
        # dS, dz of every query (and the final-state gradients) were reduced on the host (HAS_DSF)
        c_lo = i_s * CPS
        c_hi = tl.minimum(c_lo + CPS, NC)

    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    b_db = tl.zeros([BM], dtype=tl.float32)
    p_ks = _kstab_row(kstab, chunk_off, i_b, i_hk, i_bk, NC, NCS, CAUSAL, IS_VARLEN)
    b_knext = tl.load(p_ks + NK - 1)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        p_tk = ((i_bt * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]  # q, dq (and partials)
        m_tk = m_t[:, None] & m_d[None, :]
        p_tv = ((i_bt * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :]  # a (and partials)
        m_tv = m_t[:, None] & m_v[None, :]
        p_kk = ((i_bt * T + o_t[:, None]) * HK + i_hk) * D + o_d[None, :]  # k
        p_kv = ((i_bt * T + o_t[:, None]) * HK + i_hk) * DV + o_v[None, :]  # v
        if CAUSAL:
            b_ks = tl.load(p_ks + c)
            # the derivative of the forward's exp(min(kstab_c - kstab_{c+1}, 0)): finite after empty chunks
            b_rescale = tl.exp(tl.minimum(b_ks - b_knext, 0.0))
            b_knext = b_ks
            b_dsa *= b_rescale
            b_dza *= b_rescale
            b_dsb *= b_rescale
            b_dzb *= b_rescale
        else:
            b_ks = b_knext
        b_v = tl.load(v + p_kv, mask=m_tv, other=0.0).to(tl.float32)
        b_k, kt, ka, kb = _key_phi(
            k,
            mask,
            p_kk,
            m_tk,
            i_bt,
            T,
            o_t,
            m_t,
            b_w,
            b_bias,
            b_freq,
            b_psi,
            b_ks,
            root,
            c_t,
            c_o,
            KIND,
            HAS_PSI,
            HAS_CO,
            HAS_MASK,
            PREC,
        )

        # carried part: dphik_j = dS v_j + dz, dv_j = dS^T phik_j
        dka = _dot(b_v, tl.trans(b_dsa), PREC) + b_dza[None, :]  # [BT, BV] @ [BV, BM]
        b_dv = _dot(ka, b_dsa, PREC)  # [BT, BM] @ [BM, BV]
        if KIND != KIND_EXP:
            dkb = _dot(b_v, tl.trans(b_dsb), PREC) + b_dzb[None, :]
            b_dv += _dot(kb, b_dsb, PREC)
        else:
            dkb = dka
        if CAUSAL:
            b_a = tl.load(da + p_tv, mask=m_tv, other=0.0)
            b_beta = tl.load(dbeta + i_bht * T + o_t, mask=m_t, other=0.0)
            _, _, qa, qb = _query_phi(
                q,
                qmax,
                p_tk,
                m_tk,
                i_bht,
                T,
                o_t,
                m_t,
                b_w,
                b_bias,
                b_freq,
                b_psi,
                root,
                c_t,
                c_o,
                KIND,
                HAS_PSI,
                HAS_CO,
                PREC,
            )
            causal = o_t[:, None] <= o_t[None, :]  # key j (row) <= query t
            # P^T[j, t] = a_t . v_j + beta_t
            b_pt = _dot(b_v, tl.trans(b_a), PREC) + b_beta[None, :]  # [BT, BV] @ [BV, BT]
            b_pt = tl.where(causal, b_pt, 0.0)
            # A^T[j, t] = phik_j . phiq_t
            b_at = _dot(ka, tl.trans(qa), PREC)  # [BT, BM] @ [BM, BT]
            dka += _dot(b_pt, qa, PREC)  # [BT, BT] @ [BT, BM]
            if KIND != KIND_EXP:
                b_at += _dot(kb, tl.trans(qb), PREC)
                dkb += _dot(b_pt, qb, PREC)
            else:
                dkb = dka
            b_at = tl.where(causal, b_at, 0.0)
            b_dv += _dot(b_at, b_a, PREC)  # [BT, BT] @ [BT, BV]
        tl.store(dv + part * DV + p_tv, b_dv, mask=m_tv)

        de, du = _phi_grad(dka, dkb, ka, kb, KIND)
        b_db += tl.sum(de, axis=0)
        b_dw += _dot(tl.trans(du), kt, PREC) * b_freq  # [BM, BT] @ [BT, BD]
        b_dk = _input_grad(de, du, kt, b_k, b_w, b_psi, b_freq, root, c_t, c_o, False, HAS_PSI, HAS_CO, PREC)
        tl.store(dk + part * D + p_tk, b_dk, mask=m_tk)

        if CAUSAL:
            b_dsa += _dot(tl.trans(qa), b_a, PREC)
            b_dza += tl.sum(qa * b_beta[:, None], axis=0)
            if KIND != KIND_EXP:
                b_dsb += _dot(tl.trans(qb), b_a, PREC)
                b_dzb += tl.sum(qb * b_beta[:, None], axis=0)

    tl.store(dw + i_s * s_wp + (i_bh * M + o_m[:, None]) * D + o_d[None, :], b_dw, mask=m_m[:, None] & m_d[None, :])
    tl.store(db + i_s * s_bp + i_bh * M + o_m, b_db, mask=m_m)
    if HAS_S0:
        if i_s == 0:  # non-causal ranges all hold the same reduced dS; one writes it
            b_alpha = tl.exp(tl.load(m0 + i_bk) - b_knext)
            p_s0 = ds0 + i_bh * F * DV + o_m[:, None] * DV + o_v[None, :]
            tl.store(p_s0, b_dsa * b_alpha, mask=m_sv)
            tl.store(dz0 + i_bh * F + o_m, b_dza * b_alpha, mask=m_m)
            if KIND != KIND_EXP:
                tl.store(p_s0 + M * DV, b_dsb * b_alpha, mask=m_sv)
                tl.store(dz0 + i_bh * F + M + o_m, b_dzb * b_alpha, mask=m_m)


_rf_bwd_dq_kernel_tuned = autotuned(_rf_bwd_dq_kernel, _BWD_CONFIGS, key=_KEY)
_rf_bwd_dkv_kernel_tuned = autotuned(_rf_bwd_dkv_kernel, _BWD_CONFIGS, key=_KEY)


@optional_inputs(HAS_PSI="psi", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_bwd_dstate_kernel(
    q,
    w,
    bias,
    freq,
    psi,
    qmax,
    da,
    dbeta,
    dsp,
    dzp,
    cu,
    T,
    H,
    HK,
    G,
    M,
    D,
    DV,
    stride_wh,
    CPS,
    s_sp,
    s_zp,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
):
    """Non-causal: this chunk range's part of dS = sum_t phiq_t a_t^T and dz = sum_t phiq_t beta_t,
    written to slice i_s of dsp [NSPLIT, B, H, F, Dv] / dzp [NSPLIT, B, H, F] and summed on the host."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // G  # grouped-query attention: the key/value head of query head i_h
    i_bk = i_b * HK + i_hk  # k, v, the parameters, kstab and the state are per key/value head
    bos, eos, i_bt, i_bht = _seq_span(cu, i_b, i_bh, i_h, H, T, IS_VARLEN)
    NC = tl.cdiv(eos - bos, BT)
    F = M if KIND == KIND_EXP else 2 * M
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    o_c = tl.arange(0, BT)
    m_sv = m_m[:, None] & m_v[None, :]
    b_w, b_bias, b_freq, b_psi = _tile_params(
        w, bias, freq, psi, i_bk, i_hk, o_m, m_m, o_d, m_d, stride_wh, M, D, HAS_PSI, BD
    )
    b_dsa = tl.zeros([BM, BV], dtype=tl.float32)
    b_dsb = tl.zeros([BM, BV], dtype=tl.float32)
    b_dza = tl.zeros([BM], dtype=tl.float32)
    b_dzb = tl.zeros([BM], dtype=tl.float32)
    c_lo = i_s * CPS
    for c in range(c_lo, tl.minimum(c_lo + CPS, NC)):
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        p_tk = ((i_bt * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]
        b_a = tl.load(
            da + ((i_bt * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
        )
        b_beta = tl.load(dbeta + i_bht * T + o_t, mask=m_t, other=0.0)
        _, _, qa, qb = _query_phi(
            q,
            qmax,
            p_tk,
            m_t[:, None] & m_d[None, :],
            i_bht,
            T,
            o_t,
            m_t,
            b_w,
            b_bias,
            b_freq,
            b_psi,
            root,
            c_t,
            c_o,
            KIND,
            HAS_PSI,
            HAS_CO,
            PREC,
        )
        b_dsa += _dot(tl.trans(qa), b_a, PREC)  # [BM, BT] @ [BT, BV]
        b_dza += tl.sum(qa * b_beta[:, None], axis=0)
        if KIND != KIND_EXP:
            b_dsb += _dot(tl.trans(qb), b_a, PREC)
            b_dzb += tl.sum(qb * b_beta[:, None], axis=0)
    p_ds = dsp + i_s * s_sp + i_bh * F * DV + o_m[:, None] * DV + o_v[None, :]
    p_dz = dzp + i_s * s_zp + i_bh * F + o_m
    tl.store(p_ds, b_dsa, mask=m_sv)
    tl.store(p_dz, b_dza, mask=m_m)
    if KIND != KIND_EXP:
        tl.store(p_ds + M * DV, b_dsb, mask=m_sv)
        tl.store(p_dz + M, b_dzb, mask=m_m)


def grad_coefficients(do, o, den):
    """``(a [B, T, H, Dv], beta [B, H, T])``, fp32 contiguous: a_t = g_t / den_s and
    beta_t = -(g_t . o_t) d|den_t|/dden_t / den_s. O(T Dv), like softmax's delta."""
    den_abs = den.abs()
    den_s = den_abs.clamp_min(DEN_EPS)  # [B, H, T]
    sgn = torch.where(den_abs >= DEN_EPS, torch.sign(den), torch.zeros_like(den))
    g = do.float()
    a = (g / den_s.transpose(1, 2)[..., None]).contiguous()  # [B, T, H, Dv]
    beta = (-(g * o.float()).sum(-1).transpose(1, 2) * sgn / den_s).contiguous()  # [B, H, T]
    return a, beta


def rf_bwd(
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
    o,
    den,
    qmax,
    kstab,
    S,
    z,
    *,
    kind: int,
    c_t: float,
    c_o: float,
    scale: float,
    causal: bool,
    chunk_size: int,
    cu_seqlens=None,
):
    """Gradients of random-feature attention from the saved forward statistics.

    ``do [B, T, H, Dv]``; ``dS [B, H, F, Dv]`` and ``dz [B, H, F]`` the gradients of the final state (or
    None). The other arguments are ``rf_fwd``'s inputs and its outputs ``o, den, qmax, kstab`` and final
    state ``S, z`` (read by the non-causal backward only), and the ``chunk_size`` it used. Non-causal
    gradients run over NSPLIT ranges of chunks in parallel: dS, dz of all queries are reduced on the host
    first, the state is the forward's. Returns ``(dq, dk, dv, dW [H, m, D] fp32, dbias [B, H, m] fp32,
    dS0, dz0)``; dS0, dz0 are None without an initial state.

    ``cu_seqlens``: packed variable-length sequences, as in ``rf_fwd`` (the per-sequence tensors, dbias,
    dS0 and dz0 included, have batch N; dW is summed over every sequence).
    """
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    Dv = v.shape[-1]
    M = W.shape[1]
    F = feature_width(kind, M)
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if W.stride(0) == 0:
        W, stride_wh = W[:1].contiguous(), 0
    else:
        W, stride_wh = W.float().contiguous(), M * D
    W = W.float()
    bias, freq = bias.float().contiguous(), freq.float().contiguous()
    psi = None if psi is None else psi.float().contiguous()

    a, beta = grad_coefficients(do, o, den)

    BT = chunk_size
    varlen = None if cu_seqlens is None else VarlenTables(cu_seqlens, BT)
    NS = B if varlen is None else varlen.num_seqs  # batch rows of the parameters and the states
    BD, BV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    # At most 32 frequencies per program: besides W each carries dS (two blocks for HYP/TRIG) and its
    # dW partial across the walk; at D = Dv = 64 a tile of 64 spilled about three times more (sm_90,
    # bench/compile_check.py) and, for HYP in fp32, needed 224 of the 227 KiB of shared memory.
    BM = min(32, freq_tile(max(BD, BV)), max(16, triton.next_power_of_2(M)))
    NM = triton.cdiv(M, BM)
    has_s0 = S0 is not None
    has_dsf = dS is not None or dz is not None
    if has_s0:
        S0, z0, m0 = S0.float().contiguous(), z0.float().contiguous(), m0.float().contiguous()
    if has_dsf:
        dS = torch.zeros(NS, Hk, F, Dv, device=dev) if dS is None else dS.float()
        dz = torch.zeros(NS, Hk, F, device=dev) if dz is None else dz.float()
        if G > 1:  # the kernels read dS, dz per query head: the first head of each group carries them
            dS = torch.cat([dS[:, :, None], dS.new_zeros(NS, Hk, G - 1, F, Dv)], 2).flatten(1, 2)
            dz = torch.cat([dz[:, :, None], dz.new_zeros(NS, Hk, G - 1, F)], 2).flatten(1, 2)
        dS, dz = dS.contiguous(), dz.contiguous()
    dS_final, dz_final = dS, dz
    mask_arg = None if mask is None else mask.contiguous()
    root = math.sqrt(scale)
    prec = dot_precision(q.dtype, v.dtype)
    flags = dict(KIND=kind, CAUSAL=bool(causal), HAS_CO=c_o != 0.0, PREC=prec, BT=BT, BM=BM, BD=BD, BV=BV)

    NC = triton.cdiv(T, BT) if varlen is None else max(1, varlen.max_chunks)
    if causal:
        nsplit, cps = 1, NC
    else:
        # packed sequences: every sequence gets the ranges of the longest (ranges past its end are empty)
        cps = triton.cdiv(NC, _num_splits(NC, NM * NS * H, dev))
        nsplit = triton.cdiv(NC, cps)
    grid = (NM, NS * H, nsplit)
    tables = varlen_args(varlen, "cu", "chunk_off", "NCS")
    dq_part = torch.empty(NM, B, T, H, D, device=dev, dtype=torch.float32)
    dk_part = torch.empty(NM, B, T, H, D, device=dev, dtype=torch.float32)
    dv_part = torch.empty(NM, B, T, H, Dv, device=dev, dtype=torch.float32)
    dw_part = torch.empty(2, nsplit, NS, H, M, D, device=dev, dtype=torch.float32)
    db_part = torch.empty(2, nsplit, NS, H, M, device=dev, dtype=torch.float32)
    s_wp, s_bp = NS * H * M * D, NS * H * M
    dS0 = torch.empty(NS, H, F, Dv, device=dev, dtype=torch.float32) if has_s0 else None  # per query head
    dz0 = torch.empty(NS, H, F, device=dev, dtype=torch.float32) if has_s0 else None
    qmax, kstab = qmax.contiguous(), kstab.contiguous()
    if not causal:
        S, z = S.float().contiguous(), z.float().contiguous()
        # dS, dz of every query, per chunk range, then reduced (with the final-state gradients)
        dsp = torch.empty(nsplit, NS, H, F, Dv, device=dev, dtype=torch.float32)
        dzp = torch.empty(nsplit, NS, H, F, device=dev, dtype=torch.float32)
        _rf_bwd_dstate_kernel[grid](
            q=q,
            w=W,
            bias=bias,
            freq=freq,
            psi=psi,
            qmax=qmax,
            da=a,
            dbeta=beta,
            dsp=dsp,
            dzp=dzp,
            cu=tables["cu"],
            T=T,
            H=H,
            HK=Hk,
            G=G,
            M=M,
            D=D,
            DV=Dv,
            stride_wh=stride_wh,
            CPS=cps,
            s_sp=NS * H * F * Dv,
            s_zp=NS * H * F,
            root=root,
            c_t=c_t,
            c_o=c_o,
            KIND=kind,
            HAS_CO=c_o != 0.0,
            PREC=prec,
            BT=BT,
            BM=BM,
            BD=BD,
            BV=BV,
            num_warps=4,
        )
        dS, dz = dsp.sum(0), dzp.sum(0)
        if has_dsf:
            dS, dz = dS + dS_final, dz + dz_final

    if _rf_bwd_dq_kernel_tuned is None:
        dq_kernel, dkv_kernel = _rf_bwd_dq_kernel, _rf_bwd_dkv_kernel
        launch = dict(num_warps=8 if causal else 4, num_stages=1)
    else:
        dq_kernel, dkv_kernel, launch = _rf_bwd_dq_kernel_tuned, _rf_bwd_dkv_kernel_tuned, {}
    common = dict(
        q=q,
        k=k,
        v=v,
        w=W,
        bias=bias,
        freq=freq,
        psi=psi,
        mask=mask_arg,
        qmax=qmax,
        kstab=kstab,
        da=a,
        dbeta=beta,
        **tables,
        T=T,
        H=H,
        HK=Hk,
        G=G,
        M=M,
        D=D,
        DV=Dv,
        stride_wh=stride_wh,
        CPS=cps,
        s_wp=s_wp,
        s_bp=s_bp,
        root=root,
        c_t=c_t,
        c_o=c_o,
        **flags,
        **launch,
    )
    dq_kernel[grid](s0=S0, z0=z0, m0=m0, sf=S, zf=z, dq=dq_part, dw=dw_part[0], db=db_part[0], **common)
    dkv_kernel[grid](
        m0=m0, dsf=dS, dzf=dz, dk=dk_part, dv=dv_part, dw=dw_part[1], db=db_part[1], ds0=dS0, dz0=dz0, **common
    )
    dq = dq_part.sum(0).to(q.dtype)
    # per-query-head partials of the key/value-head gradients, summed over each group in a fixed order
    dk, dv, dW, dbias = dk_part.sum(0), dv_part.sum(0), dw_part.sum((0, 1, 2)), db_part.sum((0, 1))
    if G > 1:
        dk, dv = dk.unflatten(2, (Hk, G)).sum(3), dv.unflatten(2, (Hk, G)).sum(3)
        dW, dbias = dW.unflatten(0, (Hk, G)).sum(1), dbias.unflatten(1, (Hk, G)).sum(2)
        if has_s0:
            dS0, dz0 = dS0.unflatten(1, (Hk, G)).sum(2), dz0.unflatten(1, (Hk, G)).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dW, dbias, dS0, dz0
