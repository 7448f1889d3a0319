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

from ...contract import DEN_EPS, NORM_HYP, feature_width
from .common import (
    KIND_EXP,
    VarlenTables,
    _dot,
    autotuned,
    dot_precision,
    kernel_kind,
    optional_inputs,
    varlen_args,
)
from .fwd import _num_splits, _states_before
from .lse import add_key_lse_grads
from .scan import _first_stabiliser, _rf_bwd_dstate_kernel, _scan, _varlen_ranges, range_chunks
from .stats import _f32, _key_lse, freq_tile
from .steps import (
    _accumulate_dstate,
    _accumulate_state,
    _input_grad,
    _key_phi,
    _last_chunk,
    _load_state,
    _phi_grad,
    _program_rows,
    _query_phi,
    _rescale,
    _tile_params,
    _w_tile,
)

# Autotuning candidates of the dq and dkv kernels. Without autotuning: 8 warps for the causal walk and 4
# otherwise. Compiled for sm_90 at D = Dv = 64, m = 128, 8 warps spill less in every causal case (dkv,
# fp16: 40 bytes per thread against 208) at the same warps per multiprocessor (both use 255 registers);
# non-causal, the posrf kernels hardly spill with 4 warps (0-24 bytes) and fit more programs.
_BWD_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]
_KEY = ["BT", "BM", "BD", "BV", "KIND", "CAUSAL"]


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
    range_off,
    range_seq,
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
    NRS,
    s_wp,
    s_bp,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    RANGES: tl.constexpr,
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
    """dq (and the query part of dW, dbias; slice i_s of dw, db, strides s_wp, s_bp) of range i_s of CPS
    chunks, walking forward: dphiq_t = S_t a_t + z_t beta_t. Causal: the state is rebuilt chunk by chunk,
    from the initial state (the walk: one range of every chunk) or, RANGES (chunk mode), from the state
    before the range (sf, zf [B, HK, NR, F, Dv], relative to kstab at its first chunk); per chunk it is
    rescaled from the previous chunk's stabiliser and the chunk's own keys j <= t count. Non-causal: the
    state is the forward's final one (sf, zf: every key and the initial state, relative to the one key
    stabiliser), so ranges run in parallel."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_b, i_h, i_hk, i_bk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _program_rows(
        cu, chunk_off, range_off, range_seq, kstab, i_bh, i_s, T, H, HK, G, CPS, NCS, NRS, BT, CAUSAL, RANGES,
        IS_VARLEN,
    )  # fmt: skip
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
    m_sv = m_m[:, None] & m_v[None, :]
    if CAUSAL and not RANGES:  # the walk: every chunk, from the initial state
        c_lo = 0
        c_hi = NC
        b_kprev = tl.load(p_ks)
        if HAS_S0:
            b_alpha = tl.exp(tl.load(m0 + i_bk) - b_kprev)
            b_sa, b_sb, b_za, b_zb = _load_state(
                s0 + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :], z0 + i_bk * F + o_m, m_sv, m_m, M, DV, b_alpha,
                KIND,
            )  # fmt: skip
        else:
            b_sa = tl.zeros([BM, BV], dtype=tl.float32)
            b_sb = tl.zeros([BM, BV], dtype=tl.float32)
            b_za = tl.zeros([BM], dtype=tl.float32)
            b_zb = tl.zeros([BM], dtype=tl.float32)
    else:
        c_lo = i_rl * CPS
        c_hi = tl.minimum(c_lo + CPS, NC)
        b_sa, b_sb, b_za, b_zb = _load_state(
            sf + i_row * F * DV + o_m[:, None] * DV + o_v[None, :], zf + i_row * F + o_m, m_sv, m_m, M, DV, 1.0, KIND
        )
        if CAUSAL:
            b_kprev = tl.load(p_ks + c_lo)
        else:
            b_kprev = tl.load(p_ks)

    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    b_db = tl.zeros([BM], dtype=tl.float32)
    for c in range(c_lo, c_hi):
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        if CAUSAL:
            b_ks = tl.load(p_ks + c)
        p_tq = ((i_bt * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]  # q, dq (and partials)
        m_tq = m_t[:, None] & m_d[None, :]
        p_ta = ((i_bt * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :]  # a
        m_tv = m_t[:, None] & m_v[None, :]
        b_a = tl.load(da + p_ta, mask=m_tv, other=0.0)  # [BT, BV]
        b_beta = tl.load(dbeta + i_bht * T + o_t, mask=m_t, other=0.0)  # [BT]
        if CAUSAL:
            p_tk = ((i_bt * T + o_t[:, None]) * HK + i_hk) * D + o_d[None, :]  # k
            p_tv = ((i_bt * T + o_t[:, None]) * HK + i_hk) * DV + o_v[None, :]  # v
            # as in the forward: min() keeps the factor finite after chunks with no key (state zero)
            b_sa, b_sb, b_za, b_zb = _rescale(b_sa, b_sb, b_za, b_zb, tl.exp(tl.minimum(b_kprev - b_ks, 0.0)), KIND)
            b_kprev = b_ks
            b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
            _, _, ka, kb = _key_phi(
                k, mask, lse, p_tk, m_tq, i_bt, i_bt * HK + i_hk, T, o_t, m_t, b_w, b_bias, b_freq, b_psi, b_ks,
                root, c_t, c_o, KIND=KIND, HAS_PSI=HAS_PSI, HAS_CO=HAS_CO, HAS_MASK=HAS_MASK, HAS_LSE=HAS_LSE,
                PREC=PREC,
            )  # fmt: skip
            # P[t, j] = a_t . v_j + beta_t for keys j <= t of this chunk
            b_p = _dot(b_a, tl.trans(b_v), PREC) + b_beta[:, None]  # [BT, BV] @ [BV, BT]
            b_p = tl.where(o_t[:, None] >= o_t[None, :], b_p, 0.0)
            dqa = _dot(b_p, ka, PREC)  # [BT, BT] @ [BT, BM]
            dqb = dqa
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
            q, qmax, p_tq, m_tq, i_bht, T, o_t, m_t, b_w, b_bias, b_freq, b_psi, root, c_t, c_o, KIND, HAS_PSI,
            HAS_CO, PREC,
        )  # fmt: skip
        de, du = _phi_grad(dqa, dqb, qa, qb, KIND)
        b_db += tl.sum(de, axis=0)
        b_dw += _dot(tl.trans(du), qt, PREC) * b_freq  # [BM, BT] @ [BT, BD]
        b_dq = _input_grad(de, du, qt, b_q, b_w, b_psi, b_freq, root, c_t, c_o, True, HAS_PSI, HAS_CO, PREC)
        tl.store(dq + part * D + p_tq, b_dq, mask=m_tq)
        if CAUSAL:
            b_sa, b_sb, b_za, b_zb = _accumulate_state(b_sa, b_sb, b_za, b_zb, ka, kb, b_v, KIND, PREC)

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
    range_off,
    range_seq,
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
    NRS,
    s_wp,
    s_bp,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    RANGES: tl.constexpr,
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
    """dk, dv (and the key part of dW, dbias; slice i_s) of range i_s, walking backward: dphik_j = dS v_j
    + dz, dv_j = dS^T phik_j with the carried dS, dz of later queries. Causal: per chunk they are rescaled
    from the next chunk's stabiliser, then this chunk's queries t >= j join; they start from the final
    state's gradient (the walk: dsf, dzf per query head, given to the first of each group by the host) or,
    RANGES, from dS, dz of every later query (dsf, dzf [B, HK, NR, F, Dv] relative to kstab at the range's
    last chunk: the group's sum, carried by its first query head). The walk writes the initial state's
    gradient (HAS_S0). Non-causal: every query's dS, dz (reduced on the host, HAS_DSF), one range each.
    Hedgehog (HAS_LSE): also this tile's part of dL/dlse_j = -sum_f dphik_jf phik_jf, to dlse."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    i_b, i_h, i_hk, i_bk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _program_rows(
        cu, chunk_off, range_off, range_seq, kstab, i_bh, i_s, T, H, HK, G, CPS, NCS, NRS, BT, CAUSAL, RANGES,
        IS_VARLEN,
    )  # fmt: skip
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

    # carried dS, dz of this tile, relative to the current key stabiliser: [BM, BV] and [BM] (the chunk mode
    # and the walk declare them in the orders their kernels had: the loop's registers follow it)
    if RANGES:
        c_lo = i_rl * CPS
        c_hi = tl.minimum(c_lo + CPS, NC)
        b_dsa = tl.zeros([BM, BV], dtype=tl.float32)
        b_dza = tl.zeros([BM], dtype=tl.float32)
        b_dsb = tl.zeros([BM, BV], dtype=tl.float32)
        b_dzb = tl.zeros([BM], dtype=tl.float32)
        if i_h % G == 0:  # the group's later queries: its first query head carries them, the others start at 0
            b_dsa, b_dsb, b_dza, b_dzb = _load_state(
                dsf + i_row * F * DV + o_m[:, None] * DV + o_v[None, :], dzf + i_row * F + o_m, m_sv, m_m, M, DV, 1.0,
                KIND,
            )  # fmt: skip
    else:
        b_dsa = tl.zeros([BM, BV], dtype=tl.float32)
        b_dsb = tl.zeros([BM, BV], dtype=tl.float32)
        b_dza = tl.zeros([BM], dtype=tl.float32)
        b_dzb = tl.zeros([BM], dtype=tl.float32)
        if HAS_DSF:  # per query head: the host gives the final state's gradient to the first of each group
            b_dsa, b_dsb, b_dza, b_dzb = _load_state(
                dsf + i_bh * F * DV + o_m[:, None] * DV + o_v[None, :], dzf + i_bh * F + o_m, m_sv, m_m, M, DV, 1.0,
                KIND,
            )  # fmt: skip
        if CAUSAL:  # the walk: every chunk
            c_lo = 0
            c_hi = NC
        else:
            c_lo = i_rl * CPS
            c_hi = tl.minimum(c_lo + CPS, NC)

    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    b_db = tl.zeros([BM], dtype=tl.float32)
    if RANGES:
        b_knext = tl.load(p_ks + _last_chunk(c_lo, c_hi, IS_VARLEN))
    elif CAUSAL and IS_VARLEN:
        b_knext = tl.load(p_ks + tl.maximum(NC, 1) - 1)  # an empty sequence owns one chunk slot
    elif CAUSAL:
        b_knext = tl.load(p_ks + NC - 1)
    else:
        b_knext = tl.load(p_ks)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        if CAUSAL:
            b_ks = tl.load(p_ks + c)
        p_tq = ((i_bt * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]  # q, dk partials
        m_tq = m_t[:, None] & m_d[None, :]
        p_ta = ((i_bt * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :]  # a, dv partials
        m_tv = m_t[:, None] & m_v[None, :]
        p_tk = ((i_bt * T + o_t[:, None]) * HK + i_hk) * D + o_d[None, :]  # k
        p_tv = ((i_bt * T + o_t[:, None]) * HK + i_hk) * DV + o_v[None, :]  # v
        if CAUSAL:
            # the derivative of the forward's exp(min(kstab_c - kstab_{c+1}, 0)): finite after empty chunks
            b_dsa, b_dsb, b_dza, b_dzb = _rescale(
                b_dsa, b_dsb, b_dza, b_dzb, tl.exp(tl.minimum(b_ks - b_knext, 0.0)), KIND
            )
            b_knext = b_ks
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_k, kt, ka, kb = _key_phi(
            k, mask, lse, p_tk, m_tq, i_bt, i_bt * HK + i_hk, T, o_t, m_t, b_w, b_bias, b_freq, b_psi, b_knext, root,
            c_t, c_o, KIND=KIND, HAS_PSI=HAS_PSI, HAS_CO=HAS_CO, HAS_MASK=HAS_MASK, HAS_LSE=HAS_LSE, PREC=PREC,
        )  # fmt: skip
        if CAUSAL:
            b_a = tl.load(da + p_ta, mask=m_tv, other=0.0)
            b_beta = tl.load(dbeta + i_bht * T + o_t, mask=m_t, other=0.0)
            _, _, qa, qb = _query_phi(
                q, qmax, p_tq, m_tq, i_bht, T, o_t, m_t, b_w, b_bias, b_freq, b_psi, root, c_t, c_o, KIND, HAS_PSI,
                HAS_CO, PREC,
            )  # fmt: skip
            causal = o_t[:, None] <= o_t[None, :]  # key j (row) <= query t
            # P^T[j, t] = a_t . v_j + beta_t; A^T[j, t] = phik_j . phiq_t
            b_pt = tl.where(causal, _dot(b_v, tl.trans(b_a), PREC) + b_beta[None, :], 0.0)  # [BT, BV] @ [BV, BT]
            # carried part: dphik_j = dS v_j + dz, dv_j = dS^T phik_j; then this chunk's queries
            dka = _dot(b_v, tl.trans(b_dsa), PREC) + b_dza[None, :] + _dot(b_pt, qa, PREC)
            b_dv = _dot(ka, b_dsa, PREC)  # [BT, BM] @ [BM, BV]
            b_at = _dot(ka, tl.trans(qa), PREC)  # [BT, BM] @ [BM, BT]
            if KIND != KIND_EXP:
                dkb = _dot(b_v, tl.trans(b_dsb), PREC) + b_dzb[None, :] + _dot(b_pt, qb, PREC)
                b_dv += _dot(kb, b_dsb, PREC)
                b_at += _dot(kb, tl.trans(qb), PREC)
            else:
                dkb = dka
            b_at = tl.where(causal, b_at, 0.0)
            b_dv += _dot(b_at, b_a, PREC)  # [BT, BT] @ [BT, BV]
        else:
            # every query's dS, dz: dphik_j = dS v_j + dz, dv_j = dS^T phik_j
            dka = _dot(b_v, tl.trans(b_dsa), PREC) + b_dza[None, :]  # [BT, BV] @ [BV, BM]
            b_dv = _dot(ka, b_dsa, PREC)  # [BT, BM] @ [BM, BV]
            if KIND != KIND_EXP:
                dkb = _dot(b_v, tl.trans(b_dsb), PREC) + b_dzb[None, :]
                b_dv += _dot(kb, b_dsb, PREC)
            else:
                dkb = dka
        tl.store(dv + part * DV + p_ta, b_dv, mask=m_tv)
        de, du = _phi_grad(dka, dkb, ka, kb, KIND)
        if HAS_LSE:  # phi = exp(e - lse - kstab): dL/dlse = -sum_f dphi_f phi_f = -rowsum(de)
            tl.store(dlse + part + i_bht * T + o_t, -tl.sum(de, axis=1), mask=m_t)
        b_db += tl.sum(de, axis=0)
        b_dw += _dot(tl.trans(du), kt, PREC) * b_freq  # [BM, BT] @ [BT, BD]
        b_dk = _input_grad(de, du, kt, b_k, b_w, b_psi, b_freq, root, c_t, c_o, False, HAS_PSI, HAS_CO, PREC)
        tl.store(dk + part * D + p_tq, b_dk, mask=m_tq)
        if CAUSAL:
            b_dsa, b_dsb, b_dza, b_dzb = _accumulate_dstate(b_dsa, b_dsb, b_dza, b_dzb, qa, qb, b_a, b_beta, KIND, PREC)

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


def _dstate_args(common: dict) -> dict:
    """The arguments of ``_rf_bwd_dstate_kernel`` among those the dq and dkv kernels share."""
    return {name: value for name, value in common.items() if name in _rf_bwd_dstate_kernel.arg_names}


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
    ranges: bool = False,
    cps: int | None = None,
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

    ``ranges`` (causal only): the chunk mode (``triton_chunk``), ranges of ``cps`` chunks in parallel: the
    states before each range are recomputed (``triton_fwd._states_before``), each range's query-side dS, dz
    pass in reverse order through the scan (seeded with the final state's gradient), then every range's
    dq, dk, dv run in parallel.
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
        W, stride_wh = W[:1].float().contiguous(), 0
    else:
        W, stride_wh = W.float().contiguous(), M * D
    bias, freq, psi, S0, z0, m0 = (_f32(t) for t in (bias, freq, psi, S0, z0, m0))
    a, beta = grad_coefficients(do, o, den) if coeffs is None else coeffs
    W_heads = W.expand(Hk, M, D) if W.shape[0] == 1 else W  # per key/value head (the lse's dW)
    lse = None
    if kind == NORM_HYP:  # hedgehog: each key's lse, as the forward's stabiliser pass computed it
        lse = _key_lse(
            q, k, W, bias, freq, psi, mask, c_t=c_t, c_o=c_o, scale=scale, BT=chunk_size, cu_seqlens=cu_seqlens
        )

    BT = chunk_size
    BD, BV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    # At most 32 frequencies per program: besides W each carries dS (two blocks for HYP/TRIG) and its
    # dW partial across the walk; at D = Dv = 64 a tile of 64 spilled about three times more (sm_90,
    # bench/perf/compile_check.py) and, for HYP in fp32, needed 224 of the 227 KiB of shared memory.
    BM = min(32, freq_tile(max(BD, BV)), max(16, triton.next_power_of_2(M)))
    NM = triton.cdiv(M, BM)
    varlen = None
    if cu_seqlens is not None and ranges:
        varlen, cps = _varlen_ranges(cu_seqlens, BT, cps, NM * (cu_seqlens.shape[0] - 1) * H, dev)
    elif cu_seqlens is not None:
        varlen = VarlenTables(cu_seqlens, BT)
    NS = B if varlen is None else varlen.num_seqs  # batch rows of the parameters and the states
    has_s0 = S0 is not None
    has_dsf = dS is not None or dz is not None
    if has_dsf:
        dS = torch.zeros(NS, Hk, F, Dv, device=dev) if dS is None else dS.float()
        dz = torch.zeros(NS, Hk, F, device=dev) if dz is None else dz.float()
        if G > 1 and not ranges:  # the walk reads dS, dz per query head: the first head of each group has them
            dS = torch.cat([dS[:, :, None], dS.new_zeros(NS, Hk, G - 1, F, Dv)], 2).flatten(1, 2)
            dz = torch.cat([dz[:, :, None], dz.new_zeros(NS, Hk, G - 1, F)], 2).flatten(1, 2)
        dS, dz = dS.contiguous(), dz.contiguous()
    mask_arg = None if mask is None else mask.contiguous()
    qmax, kstab = qmax.contiguous(), kstab.contiguous()
    tables = ("cu", "chunk_off", "range_off", "range_seq", "NCS", "NRS") if ranges else ("cu", "chunk_off", "NCS")
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
        **{"range_off": None, "range_seq": None, "NRS": None, **varlen_args(varlen, *tables)},
        T=T,
        H=H,
        HK=Hk,
        G=G,
        M=M,
        D=D,
        DV=Dv,
        stride_wh=stride_wh,
        root=math.sqrt(scale),
        c_t=c_t,
        c_o=c_o,
        KIND=kernel_kind(kind),
        RANGES=ranges,
        HAS_CO=c_o != 0.0,
        PREC=dot_precision(q.dtype, v.dtype),
        BT=BT,
        BM=BM,
        BD=BD,
        BV=BV,
    )

    NC = triton.cdiv(T, BT)
    if ranges:
        if cps is None:
            cps = range_chunks(NC, BT, NM * B * H, dev)
        nsplit = triton.cdiv(NC, cps) if varlen is None else varlen.num_range_slots  # packed: range slots
        rows = B * H  # packed: program id 1 is the head, the range slot picks the sequence
    else:
        NC = NC if varlen is None else max(1, varlen.max_chunks)
        # packed sequences: every sequence gets the ranges of the longest (ranges past its end are empty)
        cps = NC if causal else triton.cdiv(NC, _num_splits(NC, NM * NS * H, dev))
        nsplit = triton.cdiv(NC, cps)
        rows = NS * H
    dq_part = torch.empty(NM, B, T, H, D, device=dev, dtype=torch.float32)
    dk_part = torch.empty(NM, B, T, H, D, device=dev, dtype=torch.float32)
    dlse_part = None if lse is None else torch.zeros(NM, B * H, T, device=dev, dtype=torch.float32)
    dv_part = torch.empty(NM, B, T, H, Dv, device=dev, dtype=torch.float32)
    dw_part = torch.empty(2, nsplit, rows, M, D, device=dev, dtype=torch.float32)
    db_part = torch.empty(2, nsplit, rows, M, device=dev, dtype=torch.float32)
    common.update(CPS=cps, s_wp=rows * M * D, s_bp=rows * M)
    dS0 = dz0 = None
    state = dict(s0=S0, z0=z0, m0=m0, sf=S, zf=z)
    if ranges:
        # the states before each range (recomputed), then dS, dz after each range (a reverse pass)
        state = dict(s0=None, z0=None, m0=None)
        state["sf"], state["zf"], _, _ = _states_before(
            k, v, W.expand(Hk, M, D) if stride_wh == 0 else W, bias, freq, psi, mask_arg, kstab, S0, z0, m0,
            kind=kind, c_t=c_t, c_o=c_o, scale=scale, BT=BT, cps=cps, varlen=varlen, lse=lse,
        )  # fmt: skip
        # the query side's dS, dz per key/value head: each program sums its group's query heads in order
        dsp = torch.empty(B, Hk, nsplit, F, Dv, dtype=torch.float32, device=dev)
        dzp = torch.empty(B, Hk, nsplit, F, dtype=torch.float32, device=dev)
        _rf_bwd_dstate_kernel[(NM, B * Hk, nsplit)](
            **_dstate_args(common), dsp=dsp, dzp=dzp, s_sp=0, s_zp=0, num_warps=4
        )
        dS, dz, dS_all, dz_all = _scan(dsp, dzp, kstab, dS, dz, NC, cps, reverse=True, varlen=varlen)
        if has_s0:
            alpha = torch.exp(m0 - _first_stabiliser(kstab, varlen))
            dS0, dz0 = dS_all * alpha[..., None, None], dz_all * alpha[..., None]
    elif not causal:
        S, z = S.float().contiguous(), z.float().contiguous()
        state.update(sf=S, zf=z)
        # dS, dz of every query, per chunk range, then reduced (with the final-state gradients)
        dsp = torch.empty(nsplit, NS, H, F, Dv, device=dev, dtype=torch.float32)
        dzp = torch.empty(nsplit, NS, H, F, device=dev, dtype=torch.float32)
        _rf_bwd_dstate_kernel[(NM, rows, nsplit)](
            **_dstate_args(common), dsp=dsp, dzp=dzp, s_sp=NS * H * F * Dv, s_zp=NS * H * F, num_warps=4
        )
        dsp, dzp = dsp.sum(0), dzp.sum(0)
        dS, dz = (dsp + dS, dzp + dz) if has_dsf else (dsp, dzp)
    if has_s0 and not ranges:
        dS0 = torch.empty(NS, H, F, Dv, device=dev, dtype=torch.float32)  # per query head
        dz0 = torch.empty(NS, H, F, device=dev, dtype=torch.float32)

    if ranges or _rf_bwd_dq_kernel_tuned is None:
        dq_kernel, dkv_kernel = _rf_bwd_dq_kernel, _rf_bwd_dkv_kernel
        launch = dict(num_warps=8 if causal else 4, num_stages=1)
    else:
        dq_kernel, dkv_kernel, launch = _rf_bwd_dq_kernel_tuned, _rf_bwd_dkv_kernel_tuned, {}
    grid = (NM, rows, nsplit)
    common.update(CAUSAL=bool(causal), **launch)
    dq_kernel[grid](**state, dq=dq_part, dw=dw_part[0], db=db_part[0], **common)
    dkv_kernel[grid](m0=None if ranges else m0, dsf=dS, dzf=dz, dk=dk_part, dv=dv_part, dlse=dlse_part,
                     dw=dw_part[1], db=db_part[1], ds0=None if ranges else dS0, dz0=dz0 if not ranges else None,
                     **common)  # fmt: skip
    dq = dq_part.sum(0).to(q.dtype)
    # per-query-head partials of the key/value-head gradients, summed over each group in a fixed order
    dk, dv, dW = dk_part.sum(0), dv_part.sum(0), dw_part.view(2, nsplit, -1, H, M, D).sum((0, 1, 2))
    if ranges and varlen is not None:  # packed chunk mode: the range slots' partials summed per sequence
        dbias = varlen.per_sequence(db_part.sum(0)[:, :H])
    else:
        dbias = db_part.view(2, nsplit, -1, H, M).sum((0, 1))
    if G > 1:
        dk, dv = dk.unflatten(2, (Hk, G)).sum(3), dv.unflatten(2, (Hk, G)).sum(3)
        dW, dbias = dW.unflatten(0, (Hk, G)).sum(1), dbias.unflatten(1, (Hk, G)).sum(2)
        if has_s0 and not ranges:
            dS0, dz0 = dS0.unflatten(1, (Hk, G)).sum(2), dz0.unflatten(1, (Hk, G)).sum(2)
    if lse is not None:  # what each key's lse contributes (the kernels held it constant)
        dk, dW, dbias = add_key_lse_grads(
            dlse_part, k, W_heads, bias, freq, psi, dk, dW, dbias, H=H, c_t=c_t, c_o=c_o, scale=scale, cu=cu_seqlens
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype), dW, dbias, dS0, dz0
