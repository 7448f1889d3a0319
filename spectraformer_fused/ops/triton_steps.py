"""The per-chunk steps of the Triton kernels, written once for both causal modes.

The walk (``triton_fwd`` / ``triton_bwd``: one ordered pass over every chunk per program) and the chunk
mode (``triton_chunk``: ranges of chunks in parallel, states passed between ranges) run the same body on
each chunk of BT tokens; they differ only in where a walk starts, where it stops and which state it
starts from. The body lives here, as ``@triton.jit`` helpers both modes call (Triton inlines them: the
compiled code is the one each kernel had with its own copy):

* the parameter prologue of a frequency tile (``_tile_params``, ``_w_tile``) and the state tiles'
  loads, stores and rescaling (``_load_state``, ``_store_state``, ``_rescale``);
* the features of a chunk's keys and queries (``_key_features``, ``_query_features``; hedgehog's per-key
  log-sum-exp enters through ``_key_shift``);
* the forward step (``_fwd_chunk``: intra-chunk product, state term, output, state update), the key
  state sum (``_key_state_chunk``), and the backward steps (``_dq_chunk``, ``_dkv_chunk``,
  ``_dstate_chunk``).

A state is four tiles: S ``[BM, BV]`` and z ``[BM]`` of feature block a, and of block b (HYP/TRIG; zero
and unused for EXP), all fp32, relative to the current key stabiliser.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    KIND_EXP,
    KIND_HYP,
    KIND_TRIG,
    _dot,
    _features,
    _keep_rows,
    _load_rows,
    _store_out,
    _transform,
)


@triton.jit
def _tile_params(psi, freq, bias, i_bk, o_m, m_m, o_d, m_d, M, D, HAS_PSI: tl.constexpr, BD: tl.constexpr):
    """The parameters of key/value head row i_bk for frequency tile o_m: bias [BM] (-inf on padded
    frequencies), freq (scalar) and psi [BD] (ones without psi)."""
    b_bias = tl.load(bias + i_bk * M + o_m, mask=m_m, other=float("-inf"))
    b_freq = tl.load(freq + i_bk)
    if HAS_PSI:
        b_psi = tl.load(psi + i_bk * D + o_d, mask=m_d, other=1.0)
    else:
        b_psi = tl.full([BD], 1.0, tl.float32)
    return b_bias, b_freq, b_psi


@triton.jit
def _w_tile(W, i_hk, o_m, m_m, o_d, m_d, s_wh, s_wm, s_wd):
    """The [BM, BD] tile of W (fp32) of key/value head i_hk; zeros outside."""
    p_w = W + i_hk * s_wh + o_m[:, None] * s_wm + o_d[None, :] * s_wd
    return tl.load(p_w, mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_state(p_s, p_z, m_s, m_m, M, DV, alpha, KIND: tl.constexpr):
    """A state (S at p_s [F, Dv] rows, z at p_z [F]) of one tile, times alpha; block b M rows further."""
    b_sa = tl.load(p_s, mask=m_s, other=0.0) * alpha
    b_za = tl.load(p_z, mask=m_m, other=0.0) * alpha
    b_sb = tl.zeros(b_sa.shape, dtype=tl.float32)
    b_zb = tl.zeros(b_za.shape, dtype=tl.float32)
    if KIND != KIND_EXP:
        b_sb = tl.load(p_s + M * DV, mask=m_s, other=0.0) * alpha
        b_zb = tl.load(p_z + M, mask=m_m, other=0.0) * alpha
    return b_sa, b_sb, b_za, b_zb


@triton.jit
def _store_state(p_s, p_z, b_sa, b_sb, b_za, b_zb, m_s, m_m, M, DV, STORE_Z, KIND: tl.constexpr):
    """Store a state's tiles (``_load_state``'s layout); z only where STORE_Z (the first Dv tile)."""
    tl.store(p_s, b_sa, mask=m_s)
    if KIND != KIND_EXP:
        tl.store(p_s + M * DV, b_sb, mask=m_s)
    if STORE_Z:
        tl.store(p_z, b_za, mask=m_m)
        if KIND != KIND_EXP:
            tl.store(p_z + M, b_zb, mask=m_m)


@triton.jit
def _rescale(b_sa, b_sb, b_za, b_zb, alpha, KIND: tl.constexpr):
    """A state moved to another stabiliser: every tile times alpha."""
    b_sa *= alpha
    b_za *= alpha
    if KIND != KIND_EXP:
        b_sb *= alpha
        b_zb *= alpha
    return b_sa, b_sb, b_za, b_zb


@triton.jit
def _key_shift(b_kst, lse, i_row, T, o_t, m_t, HAS_LSE: tl.constexpr):
    """The exponent shift of a chunk's key features: the chunk's key stabiliser, plus (hedgehog,
    HAS_LSE) each key's log-sum-exp over its 2m exponents (lse ``[rows, T]`` of the stabiliser pass, row
    i_row = token batch x key/value heads + key/value head); broadcasts against [BT, BM]."""
    if HAS_LSE:
        shift = b_kst + tl.load(lse + i_row * T + o_t, mask=m_t, other=0.0)[:, None]
    else:
        shift = b_kst
    return shift


@triton.jit
def _key_features(
    b_k,
    keep,
    b_w,
    b_bias,
    b_freq,
    b_psi,
    shift,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    PREC: tl.constexpr,
):
    """A chunk's key tile b_k [BT, BD] (raw) -> (x' [BT, BD], features a, b [BT, BM] relative to shift);
    keys not kept give 0."""
    kt, kr = _transform(b_k, b_psi, root, c_t, c_o, False, HAS_PSI, HAS_CO)
    ka, kb = _features(kt, kr, b_w, b_bias, b_freq, shift, keep, KIND, PREC)
    return kt, ka, kb


@triton.jit
def _query_features(
    b_q,
    b_qm,
    m_t,
    b_w,
    b_bias,
    b_freq,
    b_psi,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    PREC: tl.constexpr,
):
    """A chunk's query tile b_q [BT, BD] (raw) -> (x' [BT, BD], features a, b [BT, BM] relative to the
    saved row maxima b_qm [BT])."""
    qt, qr = _transform(b_q, b_psi, root, c_t, c_o, True, HAS_PSI, HAS_CO)
    qa, qb = _features(qt, qr, b_w, b_bias, b_freq, b_qm[:, None], m_t, KIND, PREC)
    return qt, qa, qb


@triton.jit
def _accumulate_state(b_sa, b_sb, b_za, b_zb, ka, kb, b_v, KIND: tl.constexpr, PREC: tl.constexpr):
    """S += phi_k^T v, z += colsum(phi_k) over a chunk's keys."""
    b_sa += _dot(tl.trans(ka), b_v, PREC)  # [BM, BT] @ [BT, BV] -> [BM, BV]
    b_za += tl.sum(ka, axis=0)
    if KIND != KIND_EXP:
        b_sb += _dot(tl.trans(kb), b_v, PREC)
        b_zb += tl.sum(kb, axis=0)
    return b_sa, b_sb, b_za, b_zb


@triton.jit
def _accumulate_dstate(b_dsa, b_dsb, b_dza, b_dzb, qa, qb, b_a, b_beta, KIND: tl.constexpr, PREC: tl.constexpr):
    """dS += phi_q^T a, dz += phi_q^T beta over a chunk's queries."""
    b_dsa += _dot(tl.trans(qa), b_a, PREC)  # [BM, BT] @ [BT, BV] -> [BM, BV]
    b_dza += tl.sum(qa * b_beta[:, None], axis=0)
    if KIND != KIND_EXP:
        b_dsb += _dot(tl.trans(qb), b_a, PREC)
        b_dzb += tl.sum(qb * b_beta[:, None], axis=0)
    return b_dsa, b_dsb, b_dza, b_dzb


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


@triton.jit
def _fwd_chunk(
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
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_LSE: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    """One causal chunk of the forward (both modes): the state moves from the previous chunk's key
    stabiliser b_kprev to this one's b_kst, then ``num = tril(phi_q phi_k^T) v + phi_q S``,
    ``den = rowsum(tril(phi_q phi_k^T)) + phi_q z`` are written (``_store_out``) and the chunk's keys
    join the state, which is returned."""
    # The stabiliser never decreases while the state is non-empty; min() keeps the factor
    # finite (the state is zero) when the previous chunks had no key.
    b_sa, b_sb, b_za, b_zb = _rescale(b_sa, b_sb, b_za, b_zb, tl.exp(tl.minimum(b_kprev - b_kst, 0.0)), KIND)
    b_w = tl.load(p_w, mask=m_w, other=0.0).to(tl.float32)
    keep = _keep_rows(mask, i_bt, o_t, m_t, s_mb, s_mt, HAS_MASK)
    b_k = _load_rows(k, i_bt, i_hk, o_t, m_t, o_d, m_d, s_kb, s_kt, s_kh, s_kd)
    shift = _key_shift(b_kst, lse, i_bkt, T, o_t, m_t, HAS_LSE)
    _, b_pka, b_pkb = _key_features(
        b_k, keep, b_w, b_bias, b_freq, b_psi, shift, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC
    )
    b_q = _load_rows(q, i_bt, i_h, o_t, m_t, o_d, m_d, s_qb, s_qt, s_qh, s_qd)
    b_qmax = tl.load(qmax + i_bht * T + o_t, mask=m_t, other=0.0)
    _, b_pqa, b_pqb = _query_features(
        b_q, b_qmax, m_t, b_w, b_bias, b_freq, b_psi, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC
    )
    b_v = _load_rows(v, i_bt, i_hk, o_t, m_t, o_v, m_v, s_vb, s_vt, s_vh, s_vd).to(tl.float32)
    # [BT, BM] @ [BM, BT] -> [BT, BT]: query t, key j of this chunk
    b_s = _dot(b_pqa, tl.trans(b_pka), PREC)
    # [BT, BM] @ [BM, BV] -> [BT, BV]: earlier chunks
    b_num = _dot(b_pqa, b_sa, PREC)
    b_den = tl.sum(b_pqa * b_za[None, :], axis=1)
    if KIND != KIND_EXP:
        b_s += _dot(b_pqb, tl.trans(b_pkb), PREC)
        b_num += _dot(b_pqb, b_sb, PREC)
        b_den += tl.sum(b_pqb * b_zb[None, :], axis=1)
    b_s = tl.where(o_i[:, None] >= o_i[None, :], b_s, 0.0)
    # [BT, BT] @ [BT, BV] -> [BT, BV]
    b_num += _dot(b_s, b_v, PREC)
    b_den += tl.sum(b_s, axis=1)
    _store_out(o, den, b_num, b_den, i_bht, i_bt, i_h, i_m, i_v, o_t, m_t, o_v, m_v, T, H, DV, s_on, s_dn, SPLIT)
    return _accumulate_state(b_sa, b_sb, b_za, b_zb, b_pka, b_pkb, b_v, KIND, PREC)


@triton.jit
def _key_state_chunk(
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
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_LSE: tl.constexpr,
    PREC: tl.constexpr,
):
    """A chunk's keys added to a state (features relative to b_kst): the non-causal forward's partial
    states and the chunk mode's range states."""
    b_w = tl.load(p_w, mask=m_w, other=0.0).to(tl.float32)
    keep = _keep_rows(mask, i_bt, o_t, m_t, s_mb, s_mt, HAS_MASK)
    b_k = _load_rows(k, i_bt, i_hk, o_t, m_t, o_d, m_d, s_kb, s_kt, s_kh, s_kd)
    shift = _key_shift(b_kst, lse, i_bkt, T, o_t, m_t, HAS_LSE)
    _, b_pka, b_pkb = _key_features(
        b_k, keep, b_w, b_bias, b_freq, b_psi, shift, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC
    )
    b_v = _load_rows(v, i_bt, i_hk, o_t, m_t, o_v, m_v, s_vb, s_vt, s_vh, s_vd).to(tl.float32)
    return _accumulate_state(b_sa, b_sb, b_za, b_zb, b_pka, b_pkb, b_v, KIND, PREC)


@triton.jit
def _key_phi(
    k,
    mask,
    lse,
    p_tk,
    m_tk,
    i_bt,
    i_bkt,
    T,
    o_t,
    m_t,
    w,
    bias,
    freq,
    psi,
    b_ks,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LSE: tl.constexpr,
    PREC: tl.constexpr,
):
    """The backward's key tile [BT, BD] (contiguous k at p_tk), its x' and its features relative to the
    key stabiliser b_ks (and hedgehog's per-key log-sum-exp); masked keys give 0."""
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
    keep = _keep_rows(mask, i_bt, o_t, m_t, T, 1, HAS_MASK)  # the mask is contiguous [B, T]
    shift = _key_shift(b_ks, lse, i_bkt, T, o_t, m_t, HAS_LSE)
    kt, ka, kb = _key_features(b_k, keep, w, bias, freq, psi, shift, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC)
    return b_k, kt, ka, kb


@triton.jit
def _query_phi(
    q,
    qmax,
    p_tq,
    m_tq,
    i_bht,
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
    """The backward's query tile [BT, BD] (contiguous q at p_tq), its x' and its features relative to the
    saved qmax."""
    b_q = tl.load(q + p_tq, mask=m_tq, other=0.0)
    b_qm = tl.load(qmax + i_bht * T + o_t, mask=m_t, other=0.0)
    qt, qa, qb = _query_features(b_q, b_qm, m_t, w, bias, freq, psi, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC)
    return b_q, qt, qa, qb


@triton.jit
def _dq_chunk(
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
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LSE: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
):
    """One chunk of the query gradient (both modes): dphiq_t = S_t a_t + z_t beta_t with, CAUSAL, the
    state rescaled from b_kprev to this chunk's b_ks and the chunk's own keys j <= t (the state after them
    is returned); otherwise the given state (every key) as it is. Writes this tile's dq partial (``part``)
    and returns the state and the dW, dbias accumulators."""
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
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
        _, _, ka, kb = _key_phi(
            k,
            mask,
            lse,
            p_tk,
            m_tq,
            i_bt,
            i_bt * HK + i_hk,
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
            HAS_LSE,
            PREC,
        )
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
        q, qmax, p_tq, m_tq, i_bht, T, o_t, m_t, b_w, b_bias, b_freq, b_psi, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC
    )
    de, du = _phi_grad(dqa, dqb, qa, qb, KIND)
    b_db += tl.sum(de, axis=0)
    b_dw += _dot(tl.trans(du), qt, PREC) * b_freq  # [BM, BT] @ [BT, BD]
    b_dq = _input_grad(de, du, qt, b_q, b_w, b_psi, b_freq, root, c_t, c_o, True, HAS_PSI, HAS_CO, PREC)
    tl.store(dq + part * D + p_tq, b_dq, mask=m_tq)
    if CAUSAL:
        b_sa, b_sb, b_za, b_zb = _accumulate_state(b_sa, b_sb, b_za, b_zb, ka, kb, b_v, KIND, PREC)
    return b_sa, b_sb, b_za, b_zb, b_dw, b_db


@triton.jit
def _dkv_chunk(
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
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LSE: tl.constexpr,
    PREC: tl.constexpr,
):
    """One chunk of the key and value gradients (both modes), walking backward: dphik_j = dS v_j + dz,
    dv_j = dS^T phik_j with the carried dS, dz of later queries (CAUSAL: rescaled from the next chunk's
    stabiliser b_knext to b_ks, plus this chunk's queries t >= j, after which they are returned;
    otherwise every query's, as given). Writes this tile's dk, dv partials (``part``) and, hedgehog
    (HAS_LSE), the tile's part of dL/dlse_j = -sum_f dphik_jf phik_jf to dlse; returns the carried dS,
    dz and the dW, dbias accumulators."""
    p_tq = ((i_bt * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]  # q, dk partials
    m_tq = m_t[:, None] & m_d[None, :]
    p_ta = ((i_bt * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :]  # a, dv partials
    m_tv = m_t[:, None] & m_v[None, :]
    p_tk = ((i_bt * T + o_t[:, None]) * HK + i_hk) * D + o_d[None, :]  # k
    p_tv = ((i_bt * T + o_t[:, None]) * HK + i_hk) * DV + o_v[None, :]  # v
    if CAUSAL:
        # the derivative of the forward's exp(min(kstab_c - kstab_{c+1}, 0)): finite after empty chunks
        b_dsa, b_dsb, b_dza, b_dzb = _rescale(b_dsa, b_dsb, b_dza, b_dzb, tl.exp(tl.minimum(b_ks - b_knext, 0.0)), KIND)
    b_v = tl.load(v + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_k, kt, ka, kb = _key_phi(
        k,
        mask,
        lse,
        p_tk,
        m_tq,
        i_bt,
        i_bt * HK + i_hk,
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
        HAS_LSE,
        PREC,
    )
    if CAUSAL:
        b_a = tl.load(da + p_ta, mask=m_tv, other=0.0)
        b_beta = tl.load(dbeta + i_bht * T + o_t, mask=m_t, other=0.0)
        _, _, qa, qb = _query_phi(
            q,
            qmax,
            p_tq,
            m_tq,
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
    return b_dsa, b_dsb, b_dza, b_dzb, b_dw, b_db


@triton.jit
def _dstate_chunk(
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
    b_f,
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
    KIND: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    PREC: tl.constexpr,
):
    """A chunk's queries added to a query-side dS = sum_t phiq_t a_t^T, dz = sum_t phiq_t beta_t, each
    query weighted by b_f (the chunk mode's factor to its range's first stabiliser; 1 otherwise)."""
    p_tq = ((i_bt * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]
    b_a = (
        tl.load(
            da + ((i_bt * T + o_t[:, None]) * H + i_h) * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
        )
        * b_f
    )
    b_beta = tl.load(dbeta + i_bht * T + o_t, mask=m_t, other=0.0) * b_f
    _, _, qa, qb = _query_phi(
        q,
        qmax,
        p_tq,
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
    return _accumulate_dstate(b_dsa, b_dsb, b_dza, b_dzb, qa, qb, b_a, b_beta, KIND, PREC)
