"""Chunk-parallel causal forward and backward of random-feature attention (the "chunk" mode).

The walk (``triton_fwd`` / ``triton_bwd``) runs one ordered pass over all chunks per (batch x head,
frequency tile, Dv tile): few programs when B x H is small and T long. Here the chunks of BT tokens are
grouped into NR ranges of CPS chunks and the state passes between ranges, as fla's ``chunk`` mode and
Lightning Attention-2 pass it between chunks:

1. ``_rf_chunk_state_kernel`` (grid ``(B*Hk, NMT, NV*NR)``, all ranges in parallel): each range's own key
   state ``L_r = sum_j phi_k(j) v_j^T`` and ``l_r = sum_j phi_k(j)`` over its keys, the features taken
   relative to the range's last key stabiliser ``e_r = kstab[last chunk of r]`` (the running maximum,
   known before any state pass: ``triton_fwd.stabilisers``).
2. ``_rf_chunk_scan_kernel`` (grid ``(B*Hk, F tiles, Dv tiles)``): a short ordered pass over the NR ranges
   that turns them into the state before each range, relative to ``s_r = kstab[first chunk of r]``
   (the initial state folded in), and the final state. Rescaling between stabilisers uses the walk's
   factor ``exp(min(earlier - later, 0))``, so the states are the walk's.
3. ``_rf_chunk_fwd_kernel`` (grid ``(B*H, NMT, NV*NR)``, all ranges in parallel): the walk over the
   range's CPS chunks starting from its key/value head's state: per chunk the masked intra-chunk
   product plus ``phi_q`` times the state before the chunk.

The backward mirrors it: the states before each range are recomputed (steps 1 and 2); each range's
query-side ``dS``/``dz`` (``_rf_chunk_bwd_dstate_kernel``, relative to ``s_r``) pass in reverse order
through the same scan kernel, seeded with the final state's gradient, giving ``dS``/``dz`` after each
range and the initial state's gradient; then ``_rf_chunk_bwd_dq_kernel`` and ``_rf_chunk_bwd_dkv_kernel``
run every range in parallel. Deterministic: no atomics; every partial (frequency tiles, W's and the
bias' gradients per range) is an fp32 buffer summed on the host in a fixed order.

Grouped-query attention (k, v, the parameters and the states with Hk = H / G heads): steps 1 and 2 and
the reverse scan run per (batch, key/value head); query head h reads key/value head ``h // G``. The
query-side ``dS``/``dz`` of a range sum the group's G query heads in order inside one program; dq is per
query head; dk, dv, dW, dbias are written per query head (the carried ``dS``/``dz``, already the group's
sum, by the first head of the group only) and summed over each group on the host in a fixed order; the
initial state's gradient comes out of the reverse scan per key/value head.

Packed variable-length sequences (``cu_seqlens``): every sequence has its own ranges of CPS chunks, so no
range straddles two sequences; the range kernels run over a global table of range slots (``range_seq``,
``range_off``: fla's ``prepare_chunk_indices`` idea at the range level; an empty sequence owns one empty
slot) and the scan runs per (sequence, key/value head), from that sequence's own initial state. The
per-range buffers are ``[1, Hk, range slots, ...]``: nothing is padded to the longest sequence.

Memory beyond the walk's: the states before each range ``[B, Hk, NR, F, Dv]`` and ``[B, Hk, NR, F]`` in
fp32 (the ranges' local states, written first, are overwritten by the pass; the backward holds two
such buffers, key and query side).
``range_chunks`` makes a range at least ``RANGE_TOKENS`` = 256 tokens long on a GPU, so the states hold
``4 F Dv / 256`` bytes per token and key/value head (128 at F = 128, Dv = 64: a third of fp16 q, k,
v's 384 without grouping), whatever the batch; fp32 states cost no accuracy against the walk (tests/test_triton_chunk.py).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..contract import DEN_EPS, NORM_HYP, feature_width
from .row_lse import add_key_lse_grads
from .triton_bwd import grad_coefficients
from .triton_common import (
    KIND_EXP,
    VarlenTables,
    _seq_span,
    dot_precision,
    kernel_kind,
    optional_inputs,
    varlen_args,
)
from .triton_fwd import MAX_BM, _key_lse, _strides, default_chunk_size, freq_tile, stabilisers
from .triton_steps import (
    _dkv_chunk,
    _dq_chunk,
    _dstate_chunk,
    _fwd_chunk,
    _key_state_chunk,
    _load_state,
    _store_state,
    _tile_params,
    _w_tile,
)

MODES = ("auto", "walk", "chunk")
MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"
RANGE_TOKENS = 256
# Fixed launch configurations, chosen for no spills at D = Dv = 64, m = 128 on sm_90 (python -m
# bench.compile_check; bench/results/compile-sm90-*.md): Dv tiles of 32 in the forward's output kernel,
# 8 warps for the dq and dkv kernels, which hold whole rows of D and Dv.
FWD_BV = 64
FWD_WARPS = 8
BWD_WARPS = 8
CHUNK = 16


def chunk_size(T: int) -> int:
    """The chunk (compute tile) of the chunk mode: 16 tokens. Its programs hold [chunk, D] and [chunk, Dv]
    tiles beside whole rows of the state; with chunks of 32 the dq and dkv kernels spill (sm_90,
    D = Dv = 64, m = 128: 40 and 136 bytes per thread), and the ranges give the parallelism back."""
    return CHUNK


def requested_mode() -> str:
    """The causal mode asked for by ``SPECTRAFORMER_FUSED_TRITON_MODE`` (default "auto")."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: valid values are {', '.join(MODES)}")
    return mode


def choose_mode(programs: int, T: int, multiprocessors: int, range_tokens: int = RANGE_TOKENS) -> str:
    """The causal mode "auto" runs on a GPU with ``multiprocessors``: "walk" or "chunk".

    ``programs`` is what the walk launches, B x H x frequency tiles x Dv tiles. The walk's programs each
    walk all T / 32 chunks in order; the chunk mode adds two launches and a pass over the ranges, and in
    exchange runs ranges of ``range_tokens`` tokens in parallel. So: the walk while it already gives
    every multiprocessor two programs (many heads: the chunk mode would only add work), or while T spans
    at most two ranges (little to parallelise); the chunk mode otherwise. These thresholds are reasoned,
    not measured: no GPU timing of either mode exists yet (bench/gpu_bench.py prints both modes side by
    side; its crossovers are to replace them).
    """
    if programs >= 2 * multiprocessors or T <= 2 * range_tokens:
        return "walk"
    return "chunk"


def resolve_mode(mode: str, programs: int, T: int, device: torch.device) -> str:
    """ "walk" or "chunk" for a causal call: ``mode`` ("auto", "walk", "chunk") with "auto" resolved by
    ``choose_mode`` on a GPU. Without one (the Triton interpreter runs one program at a time: nothing to
    fill) "auto" is the walk, so the walk's tests stay the walk's; the chunk mode's tests ask for it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "walk"
    return choose_mode(programs, T, torch.cuda.get_device_properties(device).multi_processor_count)


def range_chunks(num_chunks: int, BT: int, programs: int, device: torch.device) -> int:
    """CPS, the chunks per range. On a GPU: enough ranges for about four programs per multiprocessor
    (``programs`` per range), but ranges of at least RANGE_TOKENS tokens (the states' memory, see the
    module docstring). Under the interpreter: ranges of at most two chunks, so tests cross several."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        ranges = max(1, triton.cdiv(target, max(1, programs)))
        cps = max(triton.cdiv(num_chunks, ranges), triton.cdiv(RANGE_TOKENS, BT))
    else:
        cps = 2 if num_chunks >= 4 else 1
    return max(1, min(num_chunks, cps))


@triton.jit
def _range_of(
    cu,
    chunk_off,
    range_off,
    range_seq,
    kstab,
    i_bh,
    i_r,
    H,
    HK,
    G,
    T,
    CPS,
    NCS,
    NRS,
    BT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Where the program of (program-id row i_bh, range i_r) works.

    Dense: i_bh = batch x H + head, i_r the range of that batch row. Packed sequences (IS_VARLEN): i_bh is
    the head and i_r a global range slot, whose sequence (range_seq) is the batch index i_b of the
    parameters and states; its rows are [cu[i_b], cu[i_b + 1]) of the batch-1 token tensors.
    Returns (i_b, i_h, i_hk, i_bhk, i_rl: the range within its sequence, bos, eos, i_bt, i_bht (see
    ``_seq_span``), NC: the sequence's chunks, p_ks: its kstab row (chunk slots), i_row: the range's row
    of the per-range state buffers [B, HK, NR, ...] or, packed, [1, HK, NRS, ...])."""
    if IS_VARLEN:
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
    if IS_VARLEN:
        p_ks = kstab + i_hk * NCS + tl.load(chunk_off + i_b)
        i_row = i_hk * NRS + i_r
    else:
        p_ks = kstab + i_bhk * NC
        i_row = i_bhk * tl.cdiv(NC, CPS) + i_r
    return i_b, i_h, i_hk, i_bhk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row


@triton.jit
def _last_chunk(c_lo, c_hi, IS_VARLEN: tl.constexpr):
    """The last chunk of a range [c_lo, c_hi); the empty range of an empty packed sequence: its one slot."""
    if IS_VARLEN:
        c = tl.maximum(c_hi, c_lo + 1) - 1
    else:
        c = c_hi - 1
    return c


@optional_inputs(HAS_MASK="mask", HAS_PSI="psi", HAS_LSE="lse", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_chunk_state_kernel(
    k,
    v,
    W,
    bias,
    freq,
    psi,
    mask,
    lse,
    kstab,
    L,
    Lz,
    cu,
    chunk_off,
    range_off,
    range_seq,
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
    T,
    H,
    M,
    D,
    DV,
    CPS,
    NCS,
    NRS,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_CO: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """L[b, h, r] = sum over range r's keys of phi_k v^T (and Lz: of phi_k), features relative to e_r;
    h a key/value head (H here counts them). Program id 2 = Dv tile + NV * range."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_vr = tl.program_id(2).to(tl.int64)
    NV = tl.cdiv(DV, BV)
    i_v = i_vr % NV
    i_r = i_vr // NV
    # launched per (batch, key/value head): H is the key/value heads
    i_b, i_h, i_hk, i_bhk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _range_of(
        cu, chunk_off, range_off, range_seq, kstab, i_bh, i_r, H, H, 1, T, CPS, NCS, NRS, BT, IS_VARLEN
    )
    if not IS_VARLEN:
        i_row = i_bh * tl.cdiv(NC, CPS) + i_r  # dense: the program row is the (batch, key/value head)
    F = M if KIND == KIND_EXP else 2 * M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    o_i = tl.arange(0, BT)
    i_bkt = i_bt * H + i_hk  # the token tensors' (batch, key/value head) row: hedgehog's lse
    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bhk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    p_w = W + i_hk * s_wh + o_m[:, None] * s_wm + o_d[None, :] * s_wd
    m_w = m_m[:, None] & m_d[None, :]
    c_lo = i_rl * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    b_ke = tl.load(p_ks + _last_chunk(c_lo, c_hi, IS_VARLEN))
    b_sa = tl.zeros([BM, BV], dtype=tl.float32)
    b_sb = tl.zeros([BM, BV], dtype=tl.float32)
    b_za = tl.zeros([BM], dtype=tl.float32)
    b_zb = tl.zeros([BM], dtype=tl.float32)
    for i_c in range(c_lo, c_hi):
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
            b_ke,
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
    _store_state(
        L + i_row * F * DV + o_m[:, None] * DV + o_v[None, :],
        Lz + i_row * F + o_m,
        b_sa,
        b_sb,
        b_za,
        b_zb,
        m_m[:, None] & m_v[None, :],
        m_m,
        M,
        DV,
        i_v == 0,
        KIND,
    )


@optional_inputs(HAS_INIT="init", IS_VARLEN="chunk_off")
@triton.jit
def _rf_chunk_scan_kernel(
    L,
    Lz,
    kstab,
    init,
    init_z,
    out,
    out_z,
    fin,
    fin_z,
    chunk_off,
    range_off,
    NC,
    F,
    DV,
    CPS,
    HK,
    NCS,
    NRS,
    REVERSE: tl.constexpr,
    HAS_INIT: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
):
    """The ordered pass over ranges of one (batch x key/value head, F tile, Dv tile); L, out
    [B, Hk, NR, F, Dv], Lz, out_z [B, Hk, NR, F], init, fin [B, Hk, F, Dv], init_z, fin_z [B, Hk, F].

    Forward (keys): L_r relative to e_r; writes out_r = the state before range r, relative to s_r;
    init is relative to kstab[0]; fin (after the last range) to kstab[NC - 1].
    REVERSE (queries' dS): L_r relative to s_r; writes out_r = the sum over later ranges, relative to
    e_r; init is relative to kstab[NC - 1], fin (every range) to kstab[0].
    Rescaling from stabiliser a (earlier in time) to b (later): exp(min(a - b, 0)), the walk's factor.
    IS_VARLEN: program id 0 is (sequence, key/value head); its chunk slots start at chunk_off[n] of kstab
    ``[1, HK, NCS]`` (NC of them, 1 for an empty sequence), its range slots at range_off[n] of L, out
    ``[1, HK, NRS, F, Dv]``; init, fin ``[N, HK, F, Dv]``.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_f = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2).to(tl.int64)
    if IS_VARLEN:
        i_n = i_bh // HK
        i_hk = i_bh % HK
        c_0 = tl.load(chunk_off + i_n)
        NC = tl.load(chunk_off + i_n + 1) - c_0
        p_ks = kstab + i_hk * NCS + c_0
        r_0 = tl.load(range_off + i_n)
        NR = tl.load(range_off + i_n + 1) - r_0
        i_row = i_hk * NRS + r_0
    else:
        NR = tl.cdiv(NC, CPS)
        p_ks = kstab + i_bh * NC
        i_row = i_bh * NR
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    m_s = m_f[:, None] & m_v[None, :]
    o_s = o_f[:, None] * DV + o_v[None, :]
    if HAS_INIT:
        b_g = tl.load(init + i_bh * F * DV + o_s, mask=m_s, other=0.0)
        b_gz = tl.load(init_z + i_bh * F + o_f, mask=m_f, other=0.0)
    else:
        b_g = tl.zeros([BF, BV], dtype=tl.float32)
        b_gz = tl.zeros([BF], dtype=tl.float32)
    if REVERSE:
        b_prev = tl.load(p_ks + NC - 1)
    else:
        b_prev = tl.load(p_ks)
    for i in range(0, NR):
        if REVERSE:
            r = NR - 1 - i
        else:
            r = i
        b_s = tl.load(p_ks + r * CPS)
        b_e = tl.load(p_ks + tl.minimum(r * CPS + CPS, NC) - 1)
        if REVERSE:
            b_alpha = tl.exp(tl.minimum(b_e - b_prev, 0.0))
            b_prev = b_s
        else:
            b_alpha = tl.exp(tl.minimum(b_prev - b_s, 0.0))
            b_prev = b_e
        b_g *= b_alpha
        b_gz *= b_alpha
        p_r = (i_row + r) * F
        # read before written: out may be L itself (each program owns its [BF, BV] block; out_z is written
        # by the programs of the first Dv tile only, the others' copies of b_gz are never stored)
        b_l = tl.load(L + p_r * DV + o_s, mask=m_s, other=0.0)
        b_lz = tl.load(Lz + p_r + o_f, mask=m_f, other=0.0)
        tl.store(out + p_r * DV + o_s, b_g, mask=m_s)
        if i_v == 0:
            tl.store(out_z + p_r + o_f, b_gz, mask=m_f)
        # across the range: its start and end stabilisers, then its own part
        b_alpha = tl.exp(tl.minimum(b_s - b_e, 0.0))
        b_g = b_g * b_alpha + b_l
        b_gz = b_gz * b_alpha + b_lz
    if STORE_FINAL:
        tl.store(fin + i_bh * F * DV + o_s, b_g, mask=m_s)
        if i_v == 0:
            tl.store(fin_z + i_bh * F + o_f, b_gz, mask=m_f)


@optional_inputs(HAS_MASK="mask", HAS_PSI="psi", HAS_LSE="lse", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_chunk_fwd_kernel(
    q,
    k,
    v,
    W,
    bias,
    freq,
    psi,
    mask,
    lse,
    Sb,
    zb,
    qmax,
    kstab,
    o,
    den,
    cu,
    chunk_off,
    range_off,
    range_seq,
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
    T,
    H,
    HK,
    G,
    M,
    D,
    DV,
    CPS,
    NCS,
    NRS,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_LSE: tl.constexpr,
    HAS_CO: tl.constexpr,
    SPLIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
):
    """The outputs of one range (program id 2 = Dv tile + NV * range): the walk over its chunks from the
    state before it (Sb [B, HK, NR, F, Dv], zb [B, HK, NR, F] of its key/value head, relative to kstab at
    its first chunk)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_vr = tl.program_id(2).to(tl.int64)
    NV = tl.cdiv(DV, BV)
    i_v = i_vr % NV
    i_r = i_vr // NV
    i_b, i_h, i_hk, i_bhk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _range_of(
        cu, chunk_off, range_off, range_seq, kstab, i_bh, i_r, H, HK, G, T, CPS, NCS, NRS, BT, IS_VARLEN
    )
    F = M if KIND == KIND_EXP else 2 * M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    o_i = tl.arange(0, BT)
    i_bkt = i_bt * HK + i_hk  # the token tensors' (batch, key/value head) row: hedgehog's lse
    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bhk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    p_w = W + i_hk * s_wh + o_m[:, None] * s_wm + o_d[None, :] * s_wd
    m_w = m_m[:, None] & m_d[None, :]
    c_lo = i_rl * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    b_sa, b_sb, b_za, b_zb = _load_state(
        Sb + i_row * F * DV + o_m[:, None] * DV + o_v[None, :],
        zb + i_row * F + o_m,
        m_m[:, None] & m_v[None, :],
        m_m,
        M,
        DV,
        1.0,
        KIND,
    )
    b_kprev = tl.load(p_ks + c_lo)
    for i_c in range(c_lo, c_hi):
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


@optional_inputs(HAS_PSI="psi", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_chunk_bwd_dstate_kernel(
    q,
    w,
    bias,
    freq,
    psi,
    qmax,
    kstab,
    da,
    dbeta,
    L,
    Lz,
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
    """Range i_r's own dS = sum_t phiq_t a_t^T and dz = sum_t phiq_t beta_t, relative to s_r: query t of
    chunk c counts exp(min(s_r - kstab_c, 0)) (the walk's factors from chunk c back to the range's
    first). Program id 1 is a (batch, key/value head) pair: the sum runs over the G query heads of its
    group in order (grouped-query attention), so the states stay per key/value head. Writes
    L [B, HK, NR, F, Dv], Lz [B, HK, NR, F]."""
    i_m = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1).to(tl.int64)
    i_r = tl.program_id(2).to(tl.int64)
    # program id 1 is a (batch, key/value head) pair (packed: the key/value head)
    i_b, i_hk, i_hk, i_bhk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _range_of(  # H = HK, G = 1
        cu, chunk_off, range_off, range_seq, kstab, i_p, i_r, HK, HK, 1, T, CPS, NCS, NRS, BT, IS_VARLEN
    )
    if not IS_VARLEN:  # dense: the program row is the (batch, key/value head)
        i_bhk = i_p
        p_ks = kstab + i_bhk * NC
        i_row = i_bhk * tl.cdiv(NC, CPS) + i_r
    F = M if KIND == KIND_EXP else 2 * M
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    o_c = tl.arange(0, BT)
    m_sv = m_m[:, None] & m_v[None, :]
    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bhk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    b_w = _w_tile(w, i_hk, o_m, m_m, o_d, m_d, stride_wh, D, 1)
    b_dsa = tl.zeros([BM, BV], dtype=tl.float32)
    b_dsb = tl.zeros([BM, BV], dtype=tl.float32)
    b_dza = tl.zeros([BM], dtype=tl.float32)
    b_dzb = tl.zeros([BM], dtype=tl.float32)
    c_lo = i_rl * CPS
    b_ks = tl.load(p_ks + c_lo)
    for g in range(0, G):
        i_h = i_hk * G + g
        i_bh = i_bt * H + i_h  # the token tensors' (batch, query head) row
        for c in range(c_lo, tl.minimum(c_lo + CPS, NC)):
            o_t = bos + c * BT + o_c
            m_t = o_t < eos
            b_f = tl.exp(tl.minimum(b_ks - tl.load(p_ks + c), 0.0))
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
                b_f,
                i_bt,
                i_h,
                i_bh,
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
        L + i_row * F * DV + o_m[:, None] * DV + o_v[None, :],
        Lz + i_row * F + o_m,
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


@optional_inputs(HAS_PSI="psi", HAS_MASK="mask", HAS_LSE="lse", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_chunk_bwd_dq_kernel(
    q,
    k,
    v,
    w,
    bias,
    freq,
    psi,
    mask,
    lse,
    Sb,
    zb,
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
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
):
    """dq of range i_r's chunks (and the query part of dW, dbias, slice i_r), walking forward from the
    state before the range (Sb, zb: relative to kstab at its first chunk)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_r = tl.program_id(2).to(tl.int64)
    i_b, i_h, i_hk, i_bhk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _range_of(
        cu, chunk_off, range_off, range_seq, kstab, i_bh, i_r, H, HK, G, T, CPS, NCS, NRS, BT, IS_VARLEN
    )
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
        part = i_m * T * H  # start of this tile's partial [1, T, H, D]
    else:
        part = i_m * T * tl.num_programs(1)  # start of this tile's partial [B, T, H, D]
    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bhk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    b_w = _w_tile(w, i_hk, o_m, m_m, o_d, m_d, stride_wh, D, 1)
    c_lo = i_rl * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    b_sa, b_sb, b_za, b_zb = _load_state(
        Sb + i_row * F * DV + o_m[:, None] * DV + o_v[None, :], zb + i_row * F + o_m, m_sv, m_m, M, DV, 1.0, KIND
    )
    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    b_db = tl.zeros([BM], dtype=tl.float32)
    b_kprev = tl.load(p_ks + c_lo)
    for c in range(c_lo, c_hi):
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        b_ks = tl.load(p_ks + c)
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
            True,
            HAS_PSI,
            HAS_CO,
            HAS_MASK,
            HAS_LSE,
            PREC,
            BT,
            BM,
        )
        b_kprev = b_ks
    tl.store(dw + i_r * s_wp + (i_bht * M + o_m[:, None]) * D + o_d[None, :], b_dw, mask=m_m[:, None] & m_d[None, :])
    tl.store(db + i_r * s_bp + i_bht * M + o_m, b_db, mask=m_m)


@optional_inputs(HAS_PSI="psi", HAS_MASK="mask", HAS_LSE="lse", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_chunk_bwd_dkv_kernel(
    q,
    k,
    v,
    w,
    bias,
    freq,
    psi,
    mask,
    lse,
    dSa,
    dza_,
    qmax,
    kstab,
    da,
    dbeta,
    dk,
    dv,
    dlse,
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
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
):
    """dk, dv of range i_r's chunks (and the key part of dW, dbias, slice i_r), walking backward from
    dS, dz of every later query (dSa, dza_: relative to kstab at the range's last chunk)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_r = tl.program_id(2).to(tl.int64)
    i_b, i_h, i_hk, i_bhk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _range_of(
        cu, chunk_off, range_off, range_seq, kstab, i_bh, i_r, H, HK, G, T, CPS, NCS, NRS, BT, IS_VARLEN
    )
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
    b_bias, b_freq, b_psi = _tile_params(psi, freq, bias, i_bhk, o_m, m_m, o_d, m_d, M, D, HAS_PSI, BD)
    b_w = _w_tile(w, i_hk, o_m, m_m, o_d, m_d, stride_wh, D, 1)
    c_lo = i_rl * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    # dSa, dza_ (per key/value head) hold the whole group's later queries: the first query head of the
    # group carries them, the others start from zero (their partials are summed on the host)
    b_dsa = tl.zeros([BM, BV], dtype=tl.float32)
    b_dza = tl.zeros([BM], dtype=tl.float32)
    b_dsb = tl.zeros([BM, BV], dtype=tl.float32)
    b_dzb = tl.zeros([BM], dtype=tl.float32)
    if i_h % G == 0:
        b_dsa, b_dsb, b_dza, b_dzb = _load_state(
            dSa + i_row * F * DV + o_m[:, None] * DV + o_v[None, :], dza_ + i_row * F + o_m, m_sv, m_m, M, DV, 1.0, KIND
        )
    b_dw = tl.zeros([BM, BD], dtype=tl.float32)
    b_db = tl.zeros([BM], dtype=tl.float32)
    b_knext = tl.load(p_ks + _last_chunk(c_lo, c_hi, IS_VARLEN))
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        o_t = bos + c * BT + o_c
        m_t = o_t < eos
        b_ks = tl.load(p_ks + c)
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
            True,
            HAS_PSI,
            HAS_CO,
            HAS_MASK,
            HAS_LSE,
            PREC,
        )
        b_knext = b_ks
    tl.store(dw + i_r * s_wp + (i_bht * M + o_m[:, None]) * D + o_d[None, :], b_dw, mask=m_m[:, None] & m_d[None, :])
    tl.store(db + i_r * s_bp + i_bht * M + o_m, b_db, mask=m_m)


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _varlen_args(varlen: VarlenTables | None) -> dict:
    """The packed-sequence arguments of the range kernels (``triton_common.varlen_args``)."""
    return varlen_args(varlen, "cu", "chunk_off", "range_off", "range_seq", "NCS", "NRS")


def _varlen_ranges(cu_seqlens, BT: int, cps: int | None, programs: int, device) -> tuple[VarlenTables, int]:
    """Chunk and range tables of packed sequences, and the chunks per range (``range_chunks`` of the
    longest sequence unless given)."""
    varlen = VarlenTables(cu_seqlens, BT)
    if cps is None:
        cps = range_chunks(max(1, varlen.max_chunks), BT, programs, device)
    return varlen.set_ranges(cps), cps


def _first_stabiliser(kstab, varlen: VarlenTables | None):
    """``[B, Hk]`` (or ``[N, Hk]``): the key stabiliser of every row's first chunk."""
    return kstab[..., 0] if varlen is None else varlen.first_chunk(kstab)


def _scan(L, Lz, kstab, init, init_z, NC, cps, *, reverse: bool, varlen: VarlenTables | None = None):
    """``(out, out_z, fin, fin_z)`` of ``_rf_chunk_scan_kernel`` for local states L [B, Hk, NR, F, Dv]
    (one per key/value head; packed sequences: ``[1, Hk, range slots, F, Dv]`` and fin per sequence);
    out, out_z overwrite L, Lz (the local states are not needed after the pass)."""
    B, Hk, NR, F, Dv = L.shape
    if varlen is not None:
        B = varlen.num_seqs
    BF, BV = 32, max(16, min(64, triton.next_power_of_2(Dv)))
    out, out_z = L, Lz
    fin = torch.empty(B, Hk, F, Dv, dtype=torch.float32, device=L.device)
    fin_z = torch.empty(B, Hk, F, dtype=torch.float32, device=L.device)
    tables = _varlen_args(varlen)
    _rf_chunk_scan_kernel[(B * Hk, triton.cdiv(F, BF), triton.cdiv(Dv, BV))](
        L=L,
        Lz=Lz,
        kstab=kstab,
        init=init,
        init_z=init_z,
        out=out,
        out_z=out_z,
        fin=fin,
        fin_z=fin_z,
        chunk_off=tables["chunk_off"],
        range_off=tables["range_off"],
        NC=NC,
        F=F,
        DV=Dv,
        CPS=cps,
        HK=None if varlen is None else Hk,
        NCS=tables["NCS"],
        NRS=tables["NRS"],
        REVERSE=reverse,
        STORE_FINAL=True,
        BF=BF,
        BV=BV,
        num_warps=4,
    )
    return out, out_z, fin, fin_z


def _states_before(
    k,
    v,
    W,
    bias,
    freq,
    psi,
    mask,
    kstab,
    S0,
    z0,
    m0,
    *,
    kind,
    c_t,
    c_o,
    scale,
    BT,
    cps,
    varlen: VarlenTables | None = None,
    lse=None,
):
    """The state before every range ``[B, Hk, NR, F, Dv]``, ``[B, Hk, NR, F]`` (relative to kstab at its
    first chunk) and the final state (relative to the last kstab): steps 1 and 2 of the module docstring.
    bias, freq, psi, S0, z0, m0: fp32 contiguous or None. Packed sequences (``varlen``, B = 1): the range
    slots ``[1, Hk, NRS, ...]`` and the final state per sequence."""
    B, T, H, D = k.shape
    Dv = v.shape[-1]
    M = W.shape[1]
    F = feature_width(kind, M)
    NC = triton.cdiv(T, BT)
    NR = triton.cdiv(NC, cps) if varlen is None else varlen.num_range_slots
    BD = max(16, triton.next_power_of_2(D))
    BM = max(16, min(MAX_BM, triton.next_power_of_2(M), freq_tile(BD)))
    BV = max(16, min(64, triton.next_power_of_2(Dv)))
    dev = k.device
    L = torch.empty(B, H, NR, F, Dv, dtype=torch.float32, device=dev)
    Lz = torch.empty(B, H, NR, F, dtype=torch.float32, device=dev)
    s_mb, s_mt = (0, 0) if mask is None else mask.stride()
    _rf_chunk_state_kernel[(B * H, triton.cdiv(M, BM), triton.cdiv(Dv, BV) * NR)](
        k=k,
        v=v,
        W=W,
        bias=bias,
        freq=freq,
        psi=psi,
        mask=None if mask is None else mask.view(torch.uint8),
        lse=lse,
        kstab=kstab,
        L=L,
        Lz=Lz,
        **_varlen_args(varlen),
        **_strides(k=k, v=v, w=W),
        s_mb=s_mb,
        s_mt=s_mt,
        T=T,
        H=H,
        M=M,
        D=D,
        DV=Dv,
        CPS=cps,
        root=math.sqrt(scale),
        c_t=c_t,
        c_o=c_o,
        KIND=kernel_kind(kind),
        HAS_CO=c_o != 0.0,
        PREC=dot_precision(k.dtype, v.dtype),
        BT=BT,
        BD=BD,
        BM=BM,
        BV=BV,
        num_warps=4,
        num_stages=1,
    )
    init = init_z = None
    if S0 is not None:
        # the initial state is relative to exp(m0); move it to the first stabiliser (0 when m0 = -inf)
        alpha = torch.exp(m0 - _first_stabiliser(kstab, varlen))
        init, init_z = (S0 * alpha[..., None, None]).contiguous(), (z0 * alpha[..., None]).contiguous()
    return _scan(L, Lz, kstab, init, init_z, NC, cps, reverse=False, varlen=varlen)


def chunk_fwd(
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
    output_final_state: bool,
    chunk_size: int | None = None,
    cps: int | None = None,
    cu_seqlens=None,
):
    """The causal forward in chunk mode; ``triton_fwd.rf_fwd``'s arguments and results (causal only;
    k, v, the parameters and the states may have Hk = H / G heads). ``cps``: chunks per range (default
    ``range_chunks``). ``cu_seqlens``: packed variable-length sequences as in ``rf_fwd``; every sequence
    has its own ranges (range slots: no range straddles two sequences) and its scan starts from its own
    initial state; all sequences' ranges run in one launch per kernel."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if H % Hk:
        raise ValueError(f"the query heads ({H}) must be a multiple of the key/value heads ({Hk})")
    Dv = v.shape[-1]
    M = W.shape[1]
    BT = int(chunk_size) if chunk_size is not None else default_chunk_size(T)
    if BT < 16 or BT & (BT - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {BT}")
    NC = triton.cdiv(T, BT)
    BD = max(16, triton.next_power_of_2(D))
    BM = max(16, min(MAX_BM, triton.next_power_of_2(M)))
    BV = max(16, min(FWD_BV, triton.next_power_of_2(Dv)))
    NMT, NV = triton.cdiv(M, BM), triton.cdiv(Dv, BV)
    dev = q.device
    bias, freq, psi = _f32(bias), _f32(freq), _f32(psi)
    S0, z0, m0 = _f32(S0), _f32(z0), _f32(m0)
    varlen = None
    if cu_seqlens is not None:
        varlen, cps = _varlen_ranges(cu_seqlens, BT, cps, (cu_seqlens.shape[0] - 1) * H * NMT * NV, dev)
    qmax, kstab, m_final, lse = stabilisers(
        q, k, W, bias, freq, psi, mask, m0, kind=kind, c_t=c_t, c_o=c_o, scale=scale, causal=True, BT=BT, varlen=varlen
    )
    if cps is None:
        cps = range_chunks(NC, BT, B * H * NMT * NV, dev)
    NR = triton.cdiv(NC, cps) if varlen is None else varlen.num_range_slots
    Sb, zb, S, z = _states_before(
        k,
        v,
        W,
        bias,
        freq,
        psi,
        mask,
        kstab,
        S0,
        z0,
        m0,
        kind=kind,
        c_t=c_t,
        c_o=c_o,
        scale=scale,
        BT=BT,
        cps=cps,
        varlen=varlen,
        lse=None if lse is None else lse[0],
    )

    split = NMT > 1
    o = torch.empty(B, T, H, Dv, dtype=v.dtype, device=dev)
    if split:
        o_buf = torch.empty(NMT, B, T, H, Dv, dtype=torch.float32, device=dev)
        den_buf = torch.empty(NMT, B, H, T, dtype=torch.float32, device=dev)
    else:
        o_buf, den_buf = o, torch.empty(B, H, T, dtype=torch.float32, device=dev)
    s_mb, s_mt = (0, 0) if mask is None else mask.stride()
    _rf_chunk_fwd_kernel[(B * H, NMT, NV * NR)](
        q=q,
        k=k,
        v=v,
        W=W,
        bias=bias,
        freq=freq,
        psi=psi,
        mask=None if mask is None else mask.view(torch.uint8),
        lse=None if lse is None else lse[0],
        Sb=Sb,
        zb=zb,
        qmax=qmax,
        kstab=kstab,
        o=o_buf,
        den=den_buf,
        **_varlen_args(varlen),
        **_strides(q=q, k=k, v=v, w=W),
        s_mb=s_mb,
        s_mt=s_mt,
        s_on=B * T * H * Dv if split else 0,
        s_dn=B * H * T if split else 0,
        T=T,
        H=H,
        HK=Hk,
        G=H // Hk,
        M=M,
        D=D,
        DV=Dv,
        CPS=cps,
        root=math.sqrt(scale),
        c_t=c_t,
        c_o=c_o,
        KIND=kernel_kind(kind),
        HAS_CO=c_o != 0.0,
        SPLIT=split,
        PREC=dot_precision(q.dtype, v.dtype),
        BT=BT,
        BD=BD,
        BM=BM,
        BV=BV,
        num_warps=FWD_WARPS,
        num_stages=1,
    )
    if split:
        den = den_buf.sum(0)  # [B, H, T]
        o = (o_buf.sum(0) / den.abs().clamp_min(DEN_EPS).transpose(1, 2)[..., None]).to(v.dtype)
    else:
        den = den_buf
    if not output_final_state:
        return o, den, qmax, kstab, None, None, None, BT
    return o, den, qmax, kstab, S, z, m_final, BT


def chunk_bwd(
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
    *,
    kind: int,
    c_t: float,
    c_o: float,
    scale: float,
    chunk_size: int,
    cps: int | None = None,
    cu_seqlens=None,
    coeffs=None,
):
    """The causal backward in chunk mode; ``triton_bwd.rf_bwd``'s arguments (``coeffs`` included; less the
    final state, which the causal backward does not read) and results; dk, dv, dW, dbias, dS0, dz0 per key/value head.
    ``cu_seqlens``: packed variable-length sequences (``chunk_fwd``); dbias, dS0, dz0 per sequence."""
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
    bias, freq, psi = _f32(bias), _f32(freq), _f32(psi)
    S0, z0, m0 = _f32(S0), _f32(z0), _f32(m0)
    a, beta = grad_coefficients(do, o, den) if coeffs is None else coeffs
    W_heads = W.expand(Hk, M, D) if W.shape[0] == 1 else W  # per key/value head (the lse's dW)
    lse = None
    if kind == NORM_HYP:  # hedgehog: each key's lse, as the forward's stabiliser pass computed it
        lse = _key_lse(
            q, k, W, bias, freq, psi, mask, c_t=c_t, c_o=c_o, scale=scale, BT=chunk_size, cu_seqlens=cu_seqlens
        )
    BT = chunk_size
    NC = triton.cdiv(T, BT)
    BD, BV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    BM = min(32, freq_tile(max(BD, BV)), max(16, triton.next_power_of_2(M)))
    NM = triton.cdiv(M, BM)
    varlen = None
    if cu_seqlens is not None:
        varlen, cps = _varlen_ranges(cu_seqlens, BT, cps, NM * (cu_seqlens.shape[0] - 1) * H, dev)
    if cps is None:
        cps = range_chunks(NC, BT, NM * B * H, dev)
    NR = triton.cdiv(NC, cps) if varlen is None else varlen.num_range_slots  # packed: range slots, B = 1
    NS = B if varlen is None else varlen.num_seqs  # batch rows of the parameters and the states
    kstab, qmax = kstab.contiguous(), qmax.contiguous()
    mask_arg = None if mask is None else mask.contiguous()
    root = math.sqrt(scale)
    prec = dot_precision(q.dtype, v.dtype)
    flags = dict(KIND=kernel_kind(kind), HAS_CO=c_o != 0.0, PREC=prec, BT=BT, BM=BM, BD=BD, BV=BV)

    # the states before each range (recomputed), then dS, dz after each range (a reverse pass)
    Sb, zb, _, _ = _states_before(
        k,
        v,
        W.expand(Hk, M, D) if stride_wh == 0 else W,
        bias,
        freq,
        psi,
        mask_arg,
        kstab,
        S0,
        z0,
        m0,
        kind=kind,
        c_t=c_t,
        c_o=c_o,
        scale=scale,
        BT=BT,
        cps=cps,
        varlen=varlen,
        lse=lse,
    )
    # the query side's dS, dz per key/value head: each program sums its group's query heads in order
    Lq = torch.empty(B, Hk, NR, F, Dv, dtype=torch.float32, device=dev)
    Lqz = torch.empty(B, Hk, NR, F, dtype=torch.float32, device=dev)
    grid = (NM, B * H, NR)
    _rf_chunk_bwd_dstate_kernel[(NM, B * Hk, NR)](
        q=q,
        w=W,
        bias=bias,
        freq=freq,
        psi=psi,
        qmax=qmax,
        kstab=kstab,
        da=a,
        dbeta=beta,
        L=Lq,
        Lz=Lqz,
        **_varlen_args(varlen),
        T=T,
        H=H,
        HK=Hk,
        G=G,
        M=M,
        D=D,
        DV=Dv,
        stride_wh=stride_wh,
        CPS=cps,
        root=root,
        c_t=c_t,
        c_o=c_o,
        **flags,
        num_warps=4,
    )
    has_dsf = dS is not None or dz is not None
    if has_dsf:
        dS = torch.zeros(NS, Hk, F, Dv, device=dev) if dS is None else dS.float().contiguous()
        dz = torch.zeros(NS, Hk, F, device=dev) if dz is None else dz.float().contiguous()
    dSa, dza, dS_all, dz_all = _scan(Lq, Lqz, kstab, dS, dz, NC, cps, reverse=True, varlen=varlen)

    dq_part = torch.empty(NM, B, T, H, D, device=dev, dtype=torch.float32)
    dk_part = torch.empty(NM, B, T, H, D, device=dev, dtype=torch.float32)
    dlse_part = None if lse is None else torch.zeros(NM, B * H, T, device=dev, dtype=torch.float32)
    dv_part = torch.empty(NM, B, T, H, Dv, device=dev, dtype=torch.float32)
    dw_part = torch.empty(2, NR, B, H, M, D, device=dev, dtype=torch.float32)
    db_part = torch.empty(2, NR, B, H, M, device=dev, dtype=torch.float32)
    s_wp, s_bp = B * H * M * D, B * H * M
    launch = dict(num_warps=BWD_WARPS, num_stages=1)
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
        **_varlen_args(varlen),
        **flags,
        **launch,
    )
    _rf_chunk_bwd_dq_kernel[grid](Sb=Sb, zb=zb, dq=dq_part, dw=dw_part[0], db=db_part[0], **common)
    _rf_chunk_bwd_dkv_kernel[grid](
        dSa=dSa, dza_=dza, dk=dk_part, dv=dv_part, dlse=dlse_part, dw=dw_part[1], db=db_part[1], **common
    )
    dS0 = dz0 = None
    if S0 is not None:
        alpha = torch.exp(m0 - _first_stabiliser(kstab, varlen))
        dS0, dz0 = dS_all * alpha[..., None, None], dz_all * alpha[..., None]
    dq = dq_part.sum(0).to(q.dtype)
    # per-query-head partials of the key/value-head gradients, summed over each group in a fixed order
    dk, dv, dW = dk_part.sum(0), dv_part.sum(0), dw_part.sum((0, 1, 2))
    # packed sequences: the range slots' partials summed per sequence
    dbias = db_part.sum((0, 1)) if varlen is None else varlen.per_sequence(db_part.sum(0)[:, 0])
    if G > 1:
        dk, dv = dk.unflatten(2, (Hk, G)).sum(3), dv.unflatten(2, (Hk, G)).sum(3)
        dW, dbias = dW.unflatten(0, (Hk, G)).sum(1), dbias.unflatten(1, (Hk, G)).sum(2)
    if lse is not None:  # what each key's lse contributes (the kernels held it constant)
        dk, dW, dbias = add_key_lse_grads(
            dlse_part, k, W_heads, bias, freq, psi, dk, dW, dbias, H=H, c_t=c_t, c_o=c_o, scale=scale, cu=cu_seqlens
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype), dW, dbias, dS0, dz0
