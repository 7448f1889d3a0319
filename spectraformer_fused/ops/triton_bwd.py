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

from ..contract import DEN_EPS, NORM_HYP, feature_width
from .row_lse import add_key_lse_grads
from .triton_common import (
    KIND_EXP,
    VarlenTables,
    _seq_span,
    autotuned,
    dot_precision,
    kernel_kind,
    optional_inputs,
    varlen_args,
)
from .triton_fwd import _key_lse, _num_splits, freq_tile
from .triton_steps import _dkv_chunk, _dq_chunk, _dstate_chunk, _load_state, _store_state, _tile_params, _w_tile

# Autotuning candidates of the dq and dkv kernels. Without autotuning: 8 warps for the causal walk and 4
# otherwise. Compiled for sm_90 at D = Dv = 64, m = 128, 8 warps spill less in every causal case (dkv,
# fp16: 40 bytes per thread against 208) at the same warps per multiprocessor (both use 255 registers);
# non-causal, the posrf kernels hardly spill with 4 warps (0-24 bytes) and fit more programs.
_BWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]
_KEY = ["BT", "BM", "BD", "BV", "KIND", "CAUSAL"]


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


@optional_inputs(HAS_PSI="psi", HAS_MASK="mask", HAS_S0="s0", HAS_LSE="lse", IS_VARLEN="cu")
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
    lse,
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
    HAS_LSE: tl.constexpr,
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

    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    b_w = _w_tile(w, i_hk, o_m, m_m, o_d, m_d, stride_wh, D, 1)
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
            b_sa, b_sb, b_za, b_zb = _load_state(
                s0 + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :],
                z0 + i_bk * F + o_m,
                m_sv,
                m_m,
                M,
                DV,
                b_alpha,
                KIND,
            )
    else:
        c_lo = i_s * CPS
        c_hi = tl.minimum(c_lo + CPS, NC)
        b_sa, b_sb, b_za, b_zb = _load_state(
            sf + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :], zf + i_bk * F + o_m, m_sv, m_m, M, DV, 1.0, KIND
        )

    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    b_db = tl.zeros([BM], dtype=tl.float32)
    b_kprev = b_ks0
    for c in range(c_lo, c_hi):
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        if CAUSAL:
            b_ks = tl.load(p_ks + c)
        else:
            b_ks = b_ks0
        b_sa, b_sb, b_za, b_zb, b_dw, b_db = _dq_chunk(
            q,
            k,
            v,
            mask,
            qmax,
            lse,
            da,
            dbeta,
            dq,
            b_w,
            b_bias,
            b_freq,
            b_psi,
            b_sa,
            b_sb,
            b_za,
            b_zb,
            b_kprev,
            b_ks,
            b_dw,
            b_db,
            i_bt,
            i_h,
            i_hk,
            i_bht,
            part,
            o_t,
            m_t,
            o_d,
            m_d,
            o_v,
            m_v,
            T,
            H,
            HK,
            D,
            DV,
            root,
            c_t,
            c_o,
            KIND,
            CAUSAL,
            HAS_PSI,
            HAS_CO,
            HAS_MASK,
            HAS_LSE,
            PREC,
            BT,
            BM,
        )
        b_kprev = b_ks

    tl.store(dw + i_s * s_wp + (i_bh * M + o_m[:, None]) * D + o_d[None, :], b_dw, mask=m_m[:, None] & m_d[None, :])
    tl.store(db + i_s * s_bp + i_bh * M + o_m, b_db, mask=m_m)


@optional_inputs(HAS_PSI="psi", HAS_MASK="mask", HAS_S0="ds0", HAS_DSF="dsf", HAS_LSE="lse", IS_VARLEN="cu")
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
    lse,
    m0,
    qmax,
    kstab,
    da,
    dbeta,
    dsf,
    dzf,
    dk,
    dv,
    dlse,
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
    HAS_LSE: tl.constexpr,
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

    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    b_w = _w_tile(w, i_hk, o_m, m_m, o_d, m_d, stride_wh, D, 1)
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
        b_dsa, b_dsb, b_dza, b_dzb = _load_state(
            dsf + i_bh * F * DV + o_m[:, None] * DV + o_v[None, :], dzf + i_bh * F + o_m, m_sv, m_m, M, DV, 1.0, KIND
        )

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
        if CAUSAL:
            b_ks = tl.load(p_ks + c)
        else:
            b_ks = b_knext
        b_dsa, b_dsb, b_dza, b_dzb, b_dw, b_db = _dkv_chunk(
            q,
            k,
            v,
            mask,
            qmax,
            lse,
            da,
            dbeta,
            dk,
            dv,
            dlse,
            b_w,
            b_bias,
            b_freq,
            b_psi,
            b_dsa,
            b_dsb,
            b_dza,
            b_dzb,
            b_knext,
            b_ks,
            b_dw,
            b_db,
            i_bt,
            i_h,
            i_hk,
            i_bht,
            part,
            o_t,
            m_t,
            o_d,
            m_d,
            o_v,
            m_v,
            T,
            H,
            HK,
            D,
            DV,
            root,
            c_t,
            c_o,
            KIND,
            CAUSAL,
            HAS_PSI,
            HAS_CO,
            HAS_MASK,
            HAS_LSE,
            PREC,
        )
        b_knext = b_ks

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
    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    b_w = _w_tile(w, i_hk, o_m, m_m, o_d, m_d, stride_wh, D, 1)
    b_dsa = tl.zeros([BM, BV], dtype=tl.float32)
    b_dsb = tl.zeros([BM, BV], dtype=tl.float32)
    b_dza = tl.zeros([BM], dtype=tl.float32)
    b_dzb = tl.zeros([BM], dtype=tl.float32)
    c_lo = i_s * CPS
    for c in range(c_lo, tl.minimum(c_lo + CPS, NC)):
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        b_dsa, b_dsb, b_dza, b_dzb = _dstate_chunk(
            q,
            qmax,
            da,
            dbeta,
            b_w,
            b_bias,
            b_freq,
            b_psi,
            b_dsa,
            b_dsb,
            b_dza,
            b_dzb,
            1.0,
            i_bt,
            i_h,
            i_bht,
            o_t,
            m_t,
            o_d,
            m_d,
            o_v,
            m_v,
            T,
            H,
            D,
            DV,
            root,
            c_t,
            c_o,
            KIND,
            HAS_PSI,
            HAS_CO,
            PREC,
        )
    _store_state(
        dsp + i_s * s_sp + i_bh * F * DV + o_m[:, None] * DV + o_v[None, :],
        dzp + i_s * s_zp + i_bh * F + o_m,
        b_dsa,
        b_dsb,
        b_dza,
        b_dzb,
        m_sv,
        m_m,
        M,
        DV,
        True,
        KIND,
    )


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
    coeffs=None,
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

    ``coeffs``: ``(a [B, T, H, Dv], beta [B, H, T])``, fp32 contiguous, the gradients of the loss with
    respect to the unnormalised numerator and denominator (``grad_coefficients``' results), for callers
    that combine ``num`` and ``den`` with other terms before the division (the hybrid window); ``do``, ``o``
    and ``den`` are then not read.
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

    a, beta = grad_coefficients(do, o, den) if coeffs is None else coeffs
    W_heads = W.expand(Hk, M, D) if W.shape[0] == 1 else W  # per key/value head (the lse's dW)
    lse = None
    if kind == NORM_HYP:  # hedgehog: each key's lse, as the forward's stabiliser pass computed it
        lse = _key_lse(
            q, k, W, bias, freq, psi, mask, c_t=c_t, c_o=c_o, scale=scale, BT=chunk_size, cu_seqlens=cu_seqlens
        )

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
    flags = dict(KIND=kernel_kind(kind), CAUSAL=bool(causal), HAS_CO=c_o != 0.0, PREC=prec, BT=BT, BM=BM, BD=BD, BV=BV)

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
    dlse_part = None if lse is None else torch.zeros(NM, B * H, T, device=dev, dtype=torch.float32)
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
            KIND=kernel_kind(kind),
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
        lse=lse,
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
        m0=m0,
        dsf=dS,
        dzf=dz,
        dk=dk_part,
        dv=dv_part,
        dlse=dlse_part,
        dw=dw_part[1],
        db=db_part[1],
        ds0=dS0,
        dz0=dz0,
        **common,
    )
    dq = dq_part.sum(0).to(q.dtype)
    # per-query-head partials of the key/value-head gradients, summed over each group in a fixed order
    dk, dv, dW, dbias = dk_part.sum(0), dv_part.sum(0), dw_part.sum((0, 1, 2)), db_part.sum((0, 1))
    if G > 1:
        dk, dv = dk.unflatten(2, (Hk, G)).sum(3), dv.unflatten(2, (Hk, G)).sum(3)
        dW, dbias = dW.unflatten(0, (Hk, G)).sum(1), dbias.unflatten(1, (Hk, G)).sum(2)
        if has_s0:
            dS0, dz0 = dS0.unflatten(1, (Hk, G)).sum(2), dz0.unflatten(1, (Hk, G)).sum(2)
    if lse is not None:  # what each key's lse contributes (the kernels held it constant)
        dk, dW, dbias = add_key_lse_grads(
            dlse_part, k, W_heads, bias, freq, psi, dk, dW, dbias, H=H, c_t=c_t, c_o=c_o, scale=scale, cu=cu_seqlens
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype), dW, dbias, dS0, dz0
