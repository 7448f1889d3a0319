"""The tile-level steps of the Triton kernels (``triton_fwd``, ``triton_bwd``, ``triton_scan``).

The walk and the chunk mode run the same kernels: a walk is one range of chunks that starts from the
initial state, the chunk mode (RANGES) runs ranges of chunks in parallel from the states before them.
What the kernels share lives here, as ``@triton.jit`` helpers (Triton inlines them):

* where a program works (``_program_rows``: batch, heads, token rows, kstab row, range row;
  ``_kstab_row``, ``_last_chunk``), the parameter prologue of a frequency tile (``_tile_params``,
  ``_w_tile``) and the state tiles' loads, stores and rescaling (``_load_state``, ``_store_state``,
  ``_rescale``);
* the features of a chunk's keys and queries (``_key_features``, ``_query_features``; hedgehog's per-key
  log-sum-exp enters through ``_key_shift``; the backward's contiguous tiles: ``_key_phi``,
  ``_query_phi``), the state sums (``_accumulate_state``, ``_accumulate_dstate``) and the feature and
  input gradients (``_phi_grad``, ``_input_grad``).

A state is four tiles: S ``[BM, BV]`` and z ``[BM]`` of feature block a, and of block b (HYP/TRIG; zero
and unused for EXP), all fp32, relative to the current key stabiliser.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    KIND_EXP,
    KIND_HYP,
    KIND_TRIG,
    _dot,
    _features,
    _keep_rows,
    _seq_span,
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
def _program_rows(
    cu,
    chunk_off,
    range_off,
    range_seq,
    kstab,
    i_bh,
    i_r,
    T,
    H,
    HK,
    G,
    CPS,
    NCS,
    NRS,
    BT: tl.constexpr,
    CAUSAL: tl.constexpr,
    RANGES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Where the program of (program-id row i_bh, range i_r) works.

    i_bh = batch (or sequence) x H + head, except for packed sequences in chunk mode (RANGES and
    IS_VARLEN): i_bh is then the head and i_r a global range slot, whose sequence (range_seq) is the batch
    index i_b of the parameters and states; packed rows are [cu[i_b], cu[i_b + 1]) of the batch-1 token
    tensors. A walk (not RANGES) is range 0 of length NC. Returns (i_b, i_h, i_hk, i_bhk, i_rl: the range
    within its sequence, bos, eos, i_bt, i_bht (see ``_seq_span``), NC: the sequence's chunks, p_ks: its
    kstab row (CAUSAL: one per chunk slot; otherwise the one stabiliser), i_row: RANGES, the range's row
    of the per-range state buffers [B, HK, NR, ...] or, packed, [1, HK, NRS, ...]; otherwise i_bhk)."""
    if IS_VARLEN and RANGES:
        i_b = tl.load(range_seq + i_r).to(tl.int64)
        i_h = i_bh
        i_rl = i_r - tl.load(range_off + i_b)
    else:
        i_b = i_bh // H
        i_h = i_bh % H
        i_rl = i_r
    i_hk = i_h // G  # grouped-query attention: the key/value head of query head i_h
    i_bhk = i_b * HK + i_hk  # the parameters, kstab and the states are per key/value head
    bos, eos, i_bt, i_bht = _seq_span(cu, i_b, i_bh, i_h, H, T, IS_VARLEN)
    NC = tl.cdiv(eos - bos, BT)
    p_ks = _kstab_row(kstab, chunk_off, i_b, i_hk, i_bhk, NC, NCS, CAUSAL, IS_VARLEN)
    i_row = i_bhk
    if RANGES and IS_VARLEN:
        i_row = i_hk * NRS + i_r
    elif RANGES:
        i_row = i_bhk * tl.cdiv(NC, CPS) + i_r
    return i_b, i_h, i_hk, i_bhk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row


@triton.jit
def _kstab_row(kstab, chunk_off, i_b, i_hk, i_bk, NC, NCS, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Pointer to the key stabilisers of (batch or sequence i_b, key/value head i_hk): the causal kstab
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
def _last_chunk(c_lo, c_hi, IS_VARLEN: tl.constexpr):
    """The last chunk of a range [c_lo, c_hi); the empty range of an empty packed sequence: its one slot."""
    if IS_VARLEN:
        c = tl.maximum(c_hi, c_lo + 1) - 1
    else:
        c = c_hi - 1
    return c


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
