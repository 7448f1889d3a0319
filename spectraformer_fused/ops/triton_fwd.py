"""Fused Triton forward of random-feature attention.

Two kernels, both tiled by chunks of BT tokens and by frequency tiles of BM rows of W:

* ``_rf_stats_fwd_kernel`` (grid ``(B*H, NC)``): the stabilisers. Per chunk it computes every query row's
  maximum feature exponent (``qmax``) and the chunk's maximum key exponent (masked keys excluded). The host
  turns the chunk maxima into ``kstab`` (running max over chunks when causal, global max otherwise, both
  combined with the initial state's ``m0``).
* ``_rf_fwd_kernel`` (grid ``(B*H, NMT, NV)``, NMT frequency tiles, NV tiles of Dv): walks the chunks in
  order keeping its state tiles S ``[BM, BV]`` and z ``[BM]`` (two of each for HYP/TRIG: blocks a and b)
  in fp32 registers. Causal: per chunk the state is rescaled to the new stabiliser, then
  ``num = tril(phi_q phi_k^T) v + phi_q S``, ``den = rowsum(tril(phi_q phi_k^T)) + phi_q z`` and
  ``S += phi_k^T v``, ``z += colsum(phi_k)``. Non-causal runs as two launches over NSPLIT ranges of
  chunks (program id 2 also indexes the range, so the grid fills the device however long T is): the
  first writes each range's partial S, z (reduced on the host in a fixed order), the second computes
  every range's outputs from the reduced state. With one frequency tile the kernel writes o directly; with several it
  writes per-tile partial numerators and denominators, summed on the host.

Grouped-query attention: k, v, the per-head parameters, kstab and the state belong to the key/value head
``i_hk = i_h // G`` of each query head; a group's programs share them (no repeated k or v).

Packed variable-length sequences (``cu_seqlens``, token tensors of batch 1): the batch index of every
program is the sequence index n (it picks the parameters, the states and the stabilisers of sequence n)
and its rows are ``cu[n]:cu[n + 1]``; the IS_VARLEN constexpr gates every such line, so the dense kernels
are compiled as before. Each sequence owns ``max(1, its chunks)`` chunk slots of the causal kstab
``[1, Hk, Ttot // BT + N]`` (``triton_common.VarlenTables``), so no buffer is padded to the longest
sequence; the non-causal forward gives every sequence the chunk ranges of the longest (the programs of
ranges past a sequence's end return at once).

Features exist only as ``[BT, BM]`` register tiles. Every tensor this module allocates:
  qmax ``[B, H, T]``, den ``[B, H, T]``, kmax / kstab ``[B, H, NC]``, o ``[B, T, H, Dv]``,
  final S ``[B, H, F, Dv]``, z ``[B, H, F]``, m ``[B, H]``, the non-causal partial states
  ``[NSPLIT, B, H, F, Dv]`` and ``[NSPLIT, B, H, F]`` (NSPLIT <= NC, independent of T once the device is
  full), copies of the small per-head parameters (bias ``[B, H, m]``, freq ``[B, H]``, psi ``[B, H, D]``,
  S0, z0, m0) when not already fp32-contiguous, and, only with NMT > 1 frequency tiles, partials
  ``[NMT, B, T, H, Dv]`` and ``[NMT, B, H, T]``.
  None has a ``T x F`` shape: the largest T-sized ones scale with ``T * Dv * NMT`` (NMT = ceil(m / BM)).

Precision: feature exponents, the stabilised features and every accumulator are fp32; every product runs
on tensor cores at the precision ``triton_common.dot_precision`` picks: tf32x3 (about fp32) for fp32
inputs, tf32 with operands rounded to nearest for fp16/bf16 inputs (the projection's error is then of the
order of the inputs' own rounding; tf32 keeps fp32's exponent range, so features far below their
stabiliser, down to ~1e-38, still count, which an fp16 cast, smallest normal 6e-5, would lose).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..contract import DEN_EPS, NORM_HYP, feature_width
from .triton_common import (
    KIND_EXP,
    KIND_HYP,
    VarlenTables,
    _dot,
    _feature_logits,
    _keep_rows,
    _load_rows,
    _seq_span,
    _store_out,
    _transform,
    autotuned,
    dot_precision,
    kernel_kind,
    optional_inputs,
    varlen_args,
)
from .triton_steps import (
    _fwd_chunk,
    _key_state_chunk,
    _load_state,
    _query_features,
    _store_state,
    _tile_params,
)

MAX_BM = 64


@optional_inputs(HAS_MASK="mask", HAS_PSI="psi", HAS_LSE="lse", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_stats_fwd_kernel(
    q,
    k,
    W,
    bias,
    freq,
    psi,
    mask,
    qmax,
    kmax,
    lse,
    lseq,
    cu,
    chunk_off,
    chunk_seq,
    s_qb,
    s_qt,
    s_qh,
    s_qd,
    s_kb,
    s_kt,
    s_kh,
    s_kd,
    s_wh,
    s_wm,
    s_wd,
    s_mb,
    s_mt,
    T,
    H,
    HK,
    G,
    M,
    D,
    NCS,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_LSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
):
    """qmax[b, h, t] = max_f e_q,f(t); kmax[b, h, c] = max over kept keys of chunk c and all f of e_k,f
    (of query head h's key/value head: equal within a group). IS_VARLEN: program id 0 is the head, program
    id 1 a chunk slot of the packed sequences (its sequence: chunk_seq), kmax ``[1, H, NCS]``.

    HAS_LSE (hedgehog: KIND is HYP and every row is a softmax over its 2m exponents): also each row's
    log-sum-exp, online over the frequency tiles, keys into lse ``[token batch x HK + key/value head, T]``
    (written by the first query head of each group) and queries into lseq ``[B x H, T]``; kmax is then the
    maximum of the normalised key exponents e - lse."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    if IS_VARLEN:
        i_b = tl.load(chunk_seq + i_c).to(tl.int64)
        i_h = i_bh
    else:
        i_b = i_bh // H
        i_h = i_bh % H
    i_hk = i_h // G  # grouped-query attention: the key/value head of query head i_h
    i_bk = i_b * HK + i_hk  # k, v and every parameter are per key/value head (and sequence)
    bos, eos, i_bt, i_bht = _seq_span(cu, i_b, i_bh, i_h, H, T, IS_VARLEN)
    if IS_VARLEN:
        NC = NCS
        o_t = bos + (i_c - tl.load(chunk_off + i_b)) * BT + tl.arange(0, BT)
    else:
        NC = tl.cdiv(T, BT)
        o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < eos
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if HAS_PSI:
        b_psi = tl.load(psi + i_bk * D + o_d, mask=m_d, other=1.0)
    else:
        b_psi = tl.full([BD], 1.0, tl.float32)
    b_freq = tl.load(freq + i_bk)
    b_q = _load_rows(q, i_bt, i_h, o_t, m_t, o_d, m_d, s_qb, s_qt, s_qh, s_qd)
    b_k = _load_rows(k, i_bt, i_hk, o_t, m_t, o_d, m_d, s_kb, s_kt, s_kh, s_kd)
    b_xq, b_rq = _transform(b_q, b_psi, root, c_t, c_o, True, HAS_PSI, HAS_CO)
    b_xk, b_rk = _transform(b_k, b_psi, root, c_t, c_o, False, HAS_PSI, HAS_CO)
    keep = _keep_rows(mask, i_bt, o_t, m_t, s_mb, s_mt, HAS_MASK)
    b_qmax = tl.full([BT], float("-inf"), tl.float32)
    b_kmax = tl.full([BT], float("-inf"), tl.float32)
    b_krow = tl.full([BT], float("-inf"), tl.float32)  # HAS_LSE: every key row's maximum, kept or not
    b_qsum = tl.zeros([BT], dtype=tl.float32)
    b_ksum = tl.zeros([BT], dtype=tl.float32)
    for i_m in range(0, tl.cdiv(M, BM)):
        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < M
        b_w = tl.load(
            W + i_hk * s_wh + o_m[:, None] * s_wm + o_d[None, :] * s_wd, mask=m_m[:, None] & m_d[None, :], other=0.0
        ).to(tl.float32)
        b_bias = tl.load(bias + i_bk * M + o_m, mask=m_m, other=float("-inf"))
        # [BT, BD] @ [BD, BM] -> [BT, BM] inside _feature_logits
        _, b_ea, b_eb, _, _ = _feature_logits(b_xq, b_w, b_bias, b_freq, b_rq, KIND, PREC)
        b_tile = tl.max(b_ea, axis=1)
        if KIND == KIND_HYP:
            b_tile = tl.maximum(b_tile, tl.max(b_eb, axis=1))
        if HAS_LSE:  # online log-sum-exp of the row (the first tile has a finite entry in every row)
            b_new = tl.maximum(b_qmax, b_tile)
            b_qsum = b_qsum * tl.exp(b_qmax - b_new) + tl.sum(tl.exp(b_ea - b_new[:, None]), axis=1)
            b_qsum += tl.sum(tl.exp(b_eb - b_new[:, None]), axis=1)
        b_qmax = tl.maximum(b_qmax, b_tile)
        _, b_ea, b_eb, _, _ = _feature_logits(b_xk, b_w, b_bias, b_freq, b_rk, KIND, PREC)
        if HAS_LSE:
            b_tile = tl.maximum(tl.max(b_ea, axis=1), tl.max(b_eb, axis=1))
            b_new = tl.maximum(b_krow, b_tile)
            b_ksum = b_ksum * tl.exp(b_krow - b_new) + tl.sum(tl.exp(b_ea - b_new[:, None]), axis=1)
            b_ksum += tl.sum(tl.exp(b_eb - b_new[:, None]), axis=1)
            b_krow = b_new
        else:
            b_kmax = tl.maximum(b_kmax, tl.max(tl.where(keep[:, None], b_ea, float("-inf")), axis=1))
            if KIND == KIND_HYP:
                b_kmax = tl.maximum(b_kmax, tl.max(tl.where(keep[:, None], b_eb, float("-inf")), axis=1))
    tl.store(qmax + i_bht * T + o_t, b_qmax, mask=m_t)
    if HAS_LSE:
        b_lk = b_krow + tl.log(b_ksum)
        b_kmax = tl.where(keep, b_krow - b_lk, float("-inf"))
        tl.store(lseq + i_bht * T + o_t, b_qmax + tl.log(b_qsum), mask=m_t)
        if i_h % G == 0:
            tl.store(lse + (i_bt * HK + i_hk) * T + o_t, b_lk, mask=m_t)
    tl.store(kmax + i_bht * NC + i_c, tl.max(b_kmax, axis=0))


@optional_inputs(HAS_MASK="mask", HAS_PSI="psi", HAS_INIT="S0", HAS_LSE="lse", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_fwd_kernel(
    q,
    k,
    v,
    W,
    bias,
    freq,
    psi,
    mask,
    lse,
    S0,
    z0,
    m0,
    qmax,
    kstab,
    o,
    den,
    S,
    z,
    cu,
    chunk_off,
    s_qb,
    s_qt,
    s_qh,
    s_qd,
    s_kb,
    s_kt,
    s_kh,
    s_kd,
    s_vb,
    s_vt,
    s_vh,
    s_vd,
    s_wh,
    s_wm,
    s_wd,
    s_mb,
    s_mt,
    s_on,
    s_dn,
    s_sp,
    s_zp,
    T,
    H,
    HK,
    G,
    M,
    D,
    DV,
    CPS,
    NCS,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    PHASE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_LSE: tl.constexpr,
    STORE_STATE: tl.constexpr,
    SPLIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """PHASE 0 (causal): the whole walk, in order. Non-causal runs in two launches, each program owning a range of
    CPS chunks (program id 2 = Dv tile + NV * range): PHASE 1 sums its keys into a partial state
    (S, z point at [NSPLIT, B, H, F, (Dv)] buffers, strides s_sp, s_zp), PHASE 2 reads the reduced state
    (S, z) and writes the outputs of its chunks.

    Grouped-query attention: program id 0 is a (batch, query head) pair; k, v, the parameters, the
    stabilisers kstab and the state belong to its key/value head i_hk = i_h // G. PHASE 0 programs of one
    group compute the same state; the first query head of the group stores it. PHASE 1 reads no query and
    is launched over (batch, key/value head) pairs (H = HK, G = 1).

    IS_VARLEN (packed sequences, token tensors of batch 1): the batch index is the sequence index; its
    rows are [cu[n], cu[n + 1]); the causal kstab is ``[1, HK, NCS]`` with the sequence's chunks from
    slot chunk_off[n]; the non-causal one ``[N, HK, 1]``, as dense."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_vs = tl.program_id(2).to(tl.int64)
    NV = tl.cdiv(DV, BV)
    i_v = i_vs % NV
    i_s = i_vs // NV
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // G
    i_bk = i_b * HK + i_hk
    bos, eos, i_bt, i_bht = _seq_span(cu, i_b, i_bh, i_h, H, T, IS_VARLEN)
    NC = tl.cdiv(eos - bos, BT)
    if IS_VARLEN:
        p_ks = kstab + i_hk * NCS + tl.load(chunk_off + i_b)  # this sequence's chunk slots
    else:
        p_ks = kstab + i_bk * NC
    if KIND == KIND_EXP:
        F = M
    else:
        F = 2 * M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    o_i = tl.arange(0, BT)
    i_bkt = i_bt * HK + i_hk  # the token tensors' (batch, key/value head) row: hedgehog's lse
    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    p_w = W + i_hk * s_wh + o_m[:, None] * s_wm + o_d[None, :] * s_wd
    m_w = m_m[:, None] & m_d[None, :]
    m_s = m_m[:, None] & m_v[None, :]

    b_sa = tl.zeros([BM, BV], dtype=tl.float32)
    b_sb = tl.zeros([BM, BV], dtype=tl.float32)
    b_za = tl.zeros([BM], dtype=tl.float32)
    b_zb = tl.zeros([BM], dtype=tl.float32)
    if PHASE == 0:
        b_kfirst = tl.load(p_ks)
    else:
        b_kfirst = tl.load(kstab + i_bk)
    if HAS_INIT and PHASE != 2:
        # The initial state is relative to exp(m0); move it to the first stabiliser (0 when m0 = -inf).
        # Non-causal: only the first chunk range carries it, so the reduced state counts it once.
        b_alpha = tl.exp(tl.load(m0 + i_bk) - b_kfirst)
        b_alpha = tl.where(i_s == 0, b_alpha, 0.0)
        b_sa, b_sb, b_za, b_zb = _load_state(
            S0 + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :], z0 + i_bk * F + o_m, m_s, m_m, M, DV, b_alpha, KIND
        )

    if PHASE == 0:
        b_kprev = b_kfirst
        for i_c in range(0, NC):
            o_t = bos + i_c * BT + o_i
            m_t = o_t < eos
            b_kst = tl.load(p_ks + i_c)
            b_sa, b_sb, b_za, b_zb = _fwd_chunk(
                q,
                k,
                v,
                mask,
                qmax,
                lse,
                o,
                den,
                p_w,
                m_w,
                b_sa,
                b_sb,
                b_za,
                b_zb,
                b_kprev,
                b_kst,
                b_bias,
                b_freq,
                b_psi,
                i_bt,
                i_h,
                i_hk,
                i_bht,
                i_bkt,
                i_m,
                i_v,
                o_t,
                m_t,
                o_i,
                o_m,
                m_m,
                o_d,
                m_d,
                o_v,
                m_v,
                s_qb,
                s_qt,
                s_qh,
                s_qd,
                s_kb,
                s_kt,
                s_kh,
                s_kd,
                s_vb,
                s_vt,
                s_vh,
                s_vd,
                s_mb,
                s_mt,
                s_on,
                s_dn,
                T,
                H,
                DV,
                root,
                c_t,
                c_o,
                KIND,
                HAS_MASK,
                HAS_PSI,
                HAS_CO,
                HAS_LSE,
                SPLIT,
                PREC,
            )
            b_kprev = b_kst
    elif PHASE == 1:
        b_kst = b_kfirst
        for i_c in range(i_s * CPS, tl.minimum(i_s * CPS + CPS, NC)):
            o_t = bos + i_c * BT + o_i
            m_t = o_t < eos
            b_sa, b_sb, b_za, b_zb = _key_state_chunk(
                k,
                v,
                mask,
                lse,
                p_w,
                m_w,
                b_sa,
                b_sb,
                b_za,
                b_zb,
                b_kst,
                b_bias,
                b_freq,
                b_psi,
                i_bt,
                i_hk,
                i_bkt,
                o_t,
                m_t,
                o_m,
                m_m,
                o_d,
                m_d,
                o_v,
                m_v,
                s_kb,
                s_kt,
                s_kh,
                s_kd,
                s_vb,
                s_vt,
                s_vh,
                s_vd,
                s_mb,
                s_mt,
                T,
                root,
                c_t,
                c_o,
                KIND,
                HAS_MASK,
                HAS_PSI,
                HAS_CO,
                HAS_LSE,
                PREC,
            )
    else:
        b_sa, b_sb, b_za, b_zb = _load_state(
            S + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :], z + i_bk * F + o_m, m_s, m_m, M, DV, 1.0, KIND
        )
        for i_c in range(i_s * CPS, tl.minimum(i_s * CPS + CPS, NC)):
            o_t = bos + i_c * BT + o_i
            m_t = o_t < eos
            b_w = tl.load(p_w, mask=m_w, other=0.0).to(tl.float32)
            b_q = _load_rows(q, i_bt, i_h, o_t, m_t, o_d, m_d, s_qb, s_qt, s_qh, s_qd)
            b_qmax = tl.load(qmax + i_bht * T + o_t, mask=m_t, other=0.0)
            _, b_pqa, b_pqb = _query_features(
                b_q, b_qmax, m_t, b_w, b_bias, b_freq, b_psi, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC
            )
            # [BT, BM] @ [BM, BV] -> [BT, BV]
            b_num = _dot(b_pqa, b_sa, PREC)
            b_den = tl.sum(b_pqa * b_za[None, :], axis=1)
            if KIND != KIND_EXP:
                b_num += _dot(b_pqb, b_sb, PREC)
                b_den += tl.sum(b_pqb * b_zb[None, :], axis=1)
            _store_out(
                o, den, b_num, b_den, i_bht, i_bt, i_h, i_m, i_v, o_t, m_t, o_v, m_v, T, H, DV, s_on, s_dn, SPLIT
            )

    if STORE_STATE:
        # PHASE 0: the final state, relative to the last stabiliser = the final running max (all zero when
        # it is -inf). PHASE 1: this chunk range's partial state (i_s-th slice), summed on the host.
        # One query head per group stores its key/value head's state.
        if i_h % G == 0:
            _store_state(
                S + i_s * s_sp + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :],
                z + i_s * s_zp + i_bk * F + o_m,
                b_sa,
                b_sb,
                b_za,
                b_zb,
                m_s,
                m_m,
                M,
                DV,
                i_v == 0,
                KIND,
            )


@optional_inputs(HAS_INIT="m0")
@triton.jit
def _rf_varlen_stab_kernel(
    kmax, m0, chunk_off, kstab, m_fin, HK, NCS, NCAP, CAUSAL: tl.constexpr, HAS_INIT: tl.constexpr
):
    """Packed sequences: the key stabilisers of sequence n, key/value head i_hk (program (n, i_hk)) from
    the chunk maxima kmax ``[HK, NCS]`` of its slots: the running maximum (CAUSAL, written to the same
    slots of kstab ``[HK, NCAP]``) or the maximum (kstab ``[N, HK]``), both combined with m0 and 0 where
    still -inf; m_fin ``[N, HK]`` the final one (-inf kept). Every slot of an empty sequence holds m0."""
    i_nh = tl.program_id(0).to(tl.int64)
    i_n = i_nh // HK
    i_hk = i_nh % HK
    c_lo = tl.load(chunk_off + i_n)
    c_hi = tl.load(chunk_off + i_n + 1)
    if HAS_INIT:
        b_run = tl.load(m0 + i_nh)
    else:
        b_run = tl.full([], float("-inf"), tl.float32)
    for c in range(c_lo, c_hi):
        b_run = tl.maximum(b_run, tl.load(kmax + i_hk * NCS + c))
        if CAUSAL:
            tl.store(kstab + i_hk * NCAP + c, tl.where(b_run == float("-inf"), 0.0, b_run))
    if not CAUSAL:
        tl.store(kstab + i_nh, tl.where(b_run == float("-inf"), 0.0, b_run))
    tl.store(m_fin + i_nh, b_run)


# One warpgroup: with 8 warps the [BT, *] tiles (BT <= 64 rows) are replicated across two warpgroups, which
# raises the registers per thread instead of halving them. Pipelined loads (3 stages) against none.
_FWD_CONFIGS = [triton.Config({"BV": bv}, num_warps=4, num_stages=st) for bv in (32, 64) for st in (1, 3)]


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Drop value tiles wider than Dv needs (one tile of 32 covers Dv <= 32)."""
    width = max(32, triton.next_power_of_2(named_args["DV"]))
    return [c for c in configs if c.kwargs["BV"] <= width]


_rf_fwd_kernel_tuned = autotuned(
    _rf_fwd_kernel,
    _FWD_CONFIGS,
    key=["D", "DV", "M", "KIND", "PHASE", "PREC"],
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
)


def freq_tile(width: int) -> int:
    """Frequencies per tile for a kernel that holds whole rows of width ``width`` (the padded head dim,
    or the widest of D and Dv in the backward): 64, then 32 above 64 and 16 above 128, so that the
    operands the tensor cores read from shared memory fit one sm_90 block (227 KiB) at D = Dv = 256 in
    fp32 (tests/test_gpu_lowering.py; ``python -m bench.compile_check --cases large``)."""
    return 64 if width <= 64 else 32 if width <= 128 else 16


def _num_splits(num_chunks: int, programs: int, device: torch.device) -> int:
    """How many chunk ranges the non-causal forward uses: about four programs per multiprocessor on a
    GPU; two under the interpreter (so the tests cross a range boundary); never more than the chunks."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(target, max(1, programs))
    else:
        want = 2
    return max(1, min(num_chunks, want))


def default_chunk_size(T: int) -> int:
    """The chunk size of the forward (and of the backward, which reuses it): 32 tokens, smaller when the
    whole sequence fits in fewer (at least 16, the smallest tile tl.dot accepts). Compiled for sm_90 at
    D = Dv = 64, m = 128, chunks of 64 make every causal kernel spill several times more registers than
    chunks of 32 (``python -m bench.compile_check``; bench/results/compile-sm90-*.md)."""
    return max(16, min(32, triton.next_power_of_2(T)))


def _strides(**tensors) -> dict:
    """Keyword stride arguments ``s_<x>b, s_<x>t, s_<x>h, s_<x>d`` of [B, T, H, D] tensors (``s_wh, s_wm, s_wd``
    for W)."""
    out = {}
    for x, t in tensors.items():
        dims = "hmd" if x == "w" else "bthd"
        out.update({f"s_{x}{d}": s for d, s in zip(dims, t.stride())})
    return out


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def stabilisers(
    q,
    k,
    W,
    bias,
    freq,
    psi,
    mask,
    m0,
    *,
    kind: int,
    c_t: float,
    c_o: float,
    scale: float,
    causal: bool,
    BT: int,
    varlen: VarlenTables | None = None,
):
    """The stabilisers of both causal modes and of the non-causal forward: ``(qmax [B, H, T], kstab, m,
    lse)``,
    kstab ``[B, Hk, NC]`` the running maximum of the chunks' key exponents (causal) or ``[B, Hk, 1]``
    their maximum, both combined with ``m0`` and 0 where still -inf; m ``[B, Hk]`` the final one (-inf
    kept). Hk = k.shape[2] key/value heads (grouped-query attention when Hk < H). bias, freq, psi, m0:
    fp32 contiguous (or None). ``lse``: None, or for hedgehog (kind NORM_HYP, whose features are HYP's
    divided by the row's sum) ``(keys [token batch x Hk, T], queries [B x H, T])``, the rows' log-sum-exp;
    kstab and m are then those of the normalised key exponents.

    Packed sequences (``varlen``, B = 1): per sequence n (the parameters' and m0's batch axis), kstab
    ``[1, Hk, varlen.chunk_capacity]`` (causal; sequence n's chunks at slots chunk_off[n]..., the unused
    tail 0) or ``[N, Hk, 1]``, m ``[N, Hk]``."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    M = W.shape[1]
    NC = triton.cdiv(T, BT)
    BD = max(16, triton.next_power_of_2(D))
    BM = max(16, min(MAX_BM, triton.next_power_of_2(M)))
    dev = q.device
    mask_u8 = None if mask is None else mask.view(torch.uint8)
    prec = dot_precision(q.dtype, k.dtype)
    qmax = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    if varlen is not None:
        NC = varlen.num_chunk_slots
    grid = (B * H, NC) if varlen is None else (H, NC)
    tables = varlen_args(varlen, "cu", "chunk_off", "chunk_seq", NCS=NC)  # kmax has one entry per chunk slot
    kmax = torch.empty(B, H, NC, dtype=torch.float32, device=dev)
    s_mb, s_mt = (0, 0) if mask is None else mask.stride()
    lse = lseq = None
    if kind == NORM_HYP:
        lse = torch.empty(B * Hk, T, dtype=torch.float32, device=dev)
        lseq = torch.empty(B * H, T, dtype=torch.float32, device=dev)
    _rf_stats_fwd_kernel[grid](
        q=q,
        k=k,
        W=W,
        bias=bias,
        freq=freq,
        psi=psi,
        mask=mask_u8,
        qmax=qmax,
        kmax=kmax,
        lse=lse,
        lseq=lseq,
        **tables,
        **_strides(q=q, k=k, w=W),
        s_mb=s_mb,
        s_mt=s_mt,
        T=T,
        H=H,
        HK=Hk,
        G=G,
        M=M,
        D=D,
        root=math.sqrt(scale),
        c_t=c_t,
        c_o=c_o,
        KIND=kernel_kind(kind),
        HAS_CO=c_o != 0.0,
        PREC=prec,
        BT=BT,
        BD=BD,
        BM=min(BM, freq_tile(BD)),
        num_warps=4,
    )
    lse = None if lse is None else (lse, lseq)

    if G > 1:  # every query head of a group found its key/value head's maxima
        kmax = kmax.unflatten(1, (Hk, G)).amax(2)  # [B, Hk, NC]
    if varlen is not None:
        return qmax, *_varlen_kstab(kmax.contiguous(), m0, varlen, causal=causal), lse
    m_init = m0 if m0 is not None else torch.full((B, Hk), float("-inf"), dtype=torch.float32, device=dev)
    if causal:
        run = torch.maximum(torch.cummax(kmax, dim=-1).values, m_init[..., None])  # [B, Hk, NC]
    else:
        run = torch.maximum(kmax.amax(-1, keepdim=True), m_init[..., None])  # [B, Hk, 1]
    kstab = torch.where(torch.isneginf(run), torch.zeros_like(run), run).contiguous()
    m_final = run[..., -1].contiguous()
    return qmax, kstab, m_final, lse


def _key_lse(q, k, W, bias, freq, psi, mask, *, c_t, c_o, scale, BT, cu_seqlens=None):
    """Hedgehog's per-key log-sum-exp ``[token batch x Hk, T]`` as the forward's stabiliser pass computes it
    (for the backward kernels, which subtract it as the forward kernels did)."""
    varlen = None if cu_seqlens is None else VarlenTables(cu_seqlens, BT)
    psi = None if psi is None else psi.float().contiguous()
    bias, freq = bias.float().contiguous(), freq.float().contiguous()
    stats = stabilisers(q, k, W, bias, freq, psi, mask, None, kind=NORM_HYP, c_t=c_t, c_o=c_o, scale=scale,
                        causal=True, BT=BT, varlen=varlen)  # fmt: skip
    return stats[3][0]


def _varlen_kstab(kmax, m0, varlen: VarlenTables, *, causal: bool):
    """(kstab, m) of packed sequences from the chunk maxima kmax ``[1, Hk, slots]``: see ``stabilisers``."""
    Hk, N = kmax.shape[1], varlen.num_seqs
    dev = kmax.device
    if causal:
        kstab = torch.zeros(1, Hk, varlen.chunk_capacity, dtype=torch.float32, device=dev)
    else:
        kstab = torch.empty(N, Hk, 1, dtype=torch.float32, device=dev)
    m_final = torch.empty(N, Hk, dtype=torch.float32, device=dev)
    _rf_varlen_stab_kernel[(N * Hk,)](
        kmax=kmax,
        m0=m0,
        chunk_off=varlen.chunk_off,
        kstab=kstab,
        m_fin=m_final,
        HK=Hk,
        NCS=kmax.shape[-1],
        NCAP=varlen.chunk_capacity,
        CAUSAL=bool(causal),
        num_warps=1,
    )
    return kstab, m_final


def rf_fwd(
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
    *,
    kind: int,
    c_t: float,
    c_o: float,
    scale: float,
    causal: bool,
    output_final_state: bool,
    chunk_size: int | None = None,
    cu_seqlens=None,
):
    """Fused forward. q ``[B, T, H, D]`` (fp16/bf16/fp32, any strides), k ``[B, T, Hk, D]``, v
    ``[B, T, Hk, Dv]`` (Hk divides H: query head h reads key/value head h // (H / Hk)); per key/value
    head: W ``[Hk, m, D]`` (stride(0) may be 0), bias ``[B, Hk, m]``, freq ``[B, Hk]``, psi ``[B, Hk, D]``
    or None, S0 ``[B, Hk, F, Dv]`` / z0 ``[B, Hk, F]`` / m0 ``[B, Hk]`` or all None; mask ``[B, T]``
    bool or None.

    Returns ``(o, den, qmax, kstab, S, z, m, chunk_size)``: o ``[B, T, H, Dv]`` in v's dtype; den and
    qmax ``[B, H, T]``; kstab ``[B, Hk, NC]`` (causal) or ``[B, Hk, 1]``; the final state S
    ``[B, Hk, F, Dv]``, z ``[B, Hk, F]``, m ``[B, Hk]`` (divided by exp(m)) or three Nones; the chunk size.

    ``cu_seqlens`` (int32 ``[N + 1]``, or None): packed variable-length sequences. q, k, v have batch 1
    and sequence n is rows cu_seqlens[n]:cu_seqlens[n + 1]; the parameters, S0, z0, m0 and the final
    state have batch N (one row per sequence); kstab is ``[1, Hk, Ttot // chunk + N]`` (causal, see
    ``stabilisers``) or ``[N, Hk, 1]``. One launch per kernel for all sequences, each program walking the
    chunks of its own sequence.
    """
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    Dv = v.shape[-1]
    M = W.shape[1]
    F = feature_width(kind, M)
    BT = int(chunk_size) if chunk_size is not None else default_chunk_size(T)
    if BT < 16 or BT & (BT - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {BT}")
    NC = triton.cdiv(T, BT)
    BD = max(16, triton.next_power_of_2(D))
    BM = max(16, min(MAX_BM, triton.next_power_of_2(M)))
    NMT = triton.cdiv(M, BM)
    dev = q.device
    prec = dot_precision(q.dtype, v.dtype)
    varlen = None if cu_seqlens is None else VarlenTables(cu_seqlens, BT)
    NS = B if varlen is None else varlen.num_seqs  # batch rows of the parameters and the states
    NCmax = NC if varlen is None else max(1, varlen.max_chunks)

    bias, freq = _f32(bias), _f32(freq)
    psi = None if psi is None else _f32(psi)
    has_init = S0 is not None
    if has_init:
        S0, z0, m0 = _f32(S0), _f32(z0), _f32(m0)
    mask_u8 = None if mask is None else mask.view(torch.uint8)

    qmax, kstab, m_final, lse = stabilisers(
        q,
        k,
        W,
        bias,
        freq,
        psi,
        mask,
        m0 if has_init else None,
        kind=kind,
        c_t=c_t,
        c_o=c_o,
        scale=scale,
        causal=causal,
        BT=BT,
        varlen=varlen,
    )
    s_mb, s_mt = (0, 0) if mask is None else mask.stride()

    split = NMT > 1
    o = torch.empty(B, T, H, Dv, dtype=v.dtype, device=dev)
    if split:
        o_buf = torch.empty(NMT, B, T, H, Dv, dtype=torch.float32, device=dev)
        den_buf = torch.empty(NMT, B, H, T, dtype=torch.float32, device=dev)
    else:
        o_buf = o
        den_buf = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    s_on, s_dn = (B * T * H * Dv, B * H * T) if split else (0, 0)
    common = dict(
        q=q,
        k=k,
        v=v,
        W=W,
        bias=bias,
        freq=freq,
        psi=psi,
        mask=mask_u8,
        lse=None if lse is None else lse[0],
        S0=S0,
        z0=z0,
        m0=m0,
        qmax=qmax,
        kstab=kstab,
        o=o_buf,
        den=den_buf,
        **_strides(q=q, k=k, v=v, w=W),
        s_mb=s_mb,
        s_mt=s_mt,
        s_on=s_on,
        s_dn=s_dn,
        T=T,
        HK=Hk,
        M=M,
        D=D,
        DV=Dv,
        **varlen_args(varlen, "cu", "chunk_off", "NCS"),
        root=math.sqrt(scale),
        c_t=c_t,
        c_o=c_o,
        KIND=kernel_kind(kind),
        HAS_CO=c_o != 0.0,
        SPLIT=split,
        PREC=prec,
        BT=BT,
        BD=BD,
        BM=BM,
    )

    def launch(S_ptr, z_ptr, s_sp, s_zp, nsplit, cps, phase, store_state):
        # PHASE 1 reads keys and values only: one program per (batch, key/value head)
        heads, group = (Hk, 1) if phase == 1 else (H, G)
        kw = dict(
            common,
            S=S_ptr,
            z=z_ptr,
            s_sp=s_sp,
            s_zp=s_zp,
            H=heads,
            G=group,
            CPS=cps,
            PHASE=phase,
            STORE_STATE=store_state,
        )
        if _rf_fwd_kernel_tuned is None:
            BV = max(16, min(64, triton.next_power_of_2(Dv)))
            _rf_fwd_kernel[(NS * heads, NMT, triton.cdiv(Dv, BV) * nsplit)](**kw, BV=BV, num_warps=4, num_stages=1)
        else:

            def grid(meta):
                return (NS * heads, NMT, triton.cdiv(Dv, meta["BV"]) * nsplit)

            _rf_fwd_kernel_tuned[grid](**kw)

    if causal:
        # One walk over the chunks per (batch-head, frequency tile, Dv tile): the state is sequential.
        if output_final_state:
            S = torch.empty(NS, Hk, F, Dv, dtype=torch.float32, device=dev)
            z = torch.empty(NS, Hk, F, dtype=torch.float32, device=dev)
        else:
            S = z = None
        launch(S, z, 0, 0, 1, NC, 0, bool(output_final_state))
    else:
        # Non-causal: sums over key chunks split into NSPLIT ranges (enough programs to fill the device),
        # reduced on the host in a fixed order (deterministic); then every range writes its outputs from
        # the reduced state. The reduced state is the final state.
        # Packed sequences: every sequence gets the ranges of the longest (ranges past its end are empty).
        nsplit = _num_splits(NCmax, NS * Hk * NMT * triton.cdiv(Dv, 64), dev)
        cps = triton.cdiv(NCmax, nsplit)
        nsplit = triton.cdiv(NCmax, cps)
        S_part = torch.empty(nsplit, NS, Hk, F, Dv, dtype=torch.float32, device=dev)
        z_part = torch.empty(nsplit, NS, Hk, F, dtype=torch.float32, device=dev)
        launch(S_part, z_part, NS * Hk * F * Dv, NS * Hk * F, nsplit, cps, 1, True)
        S, z = S_part.sum(0), z_part.sum(0)
        launch(S, z, 0, 0, nsplit, cps, 2, False)
    if split:
        den = den_buf.sum(0)  # [B, H, T]
        num = o_buf.sum(0)  # [B, T, H, Dv]
        o = (num / den.abs().clamp_min(DEN_EPS).transpose(1, 2)[..., None]).to(v.dtype)
    else:
        den = den_buf
    if not output_final_state:
        return o, den, qmax, kstab, None, None, None, BT
    return o, den, qmax, kstab, S, z, m_final, BT
