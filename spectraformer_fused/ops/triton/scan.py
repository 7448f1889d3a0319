"""Range states: the chunk mode's pass over ranges (``triton_chunk``) and the query side's range sums.

``_rf_bwd_dstate_kernel`` sums a range's queries into dS = sum_t phiq_t a_t^T, dz = sum_t phiq_t beta_t
(the non-causal backward's partials, reduced on the host; the chunk mode's per-range sums, passed
through the scan in reverse).

``_rf_chunk_scan_kernel`` (grid ``(B*Hk, F tiles, Dv tiles)``) turns the ranges' own states into the state
before each range (forward, keys) or after it (REVERSE, the queries' dS, dz), one ordered pass over the
NR ranges per (batch x key/value head); rescaling between stabilisers uses the walk's factor
``exp(min(earlier - later, 0))``, so the states are the walk's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import KIND_EXP, VarlenTables, optional_inputs, varlen_args
from .steps import _accumulate_dstate, _program_rows, _query_phi, _store_state, _tile_params, _w_tile

RANGE_TOKENS = 256


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


@optional_inputs(HAS_PSI="psi", IS_VARLEN="cu")
@triton.jit(do_not_specialize=["T"])
def _rf_bwd_dstate_kernel(
    q,
    w,
    bias,
    freq,
    psi,
    qmax,
    kstab,
    da,
    dbeta,
    dsp,
    dzp,
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
    s_sp,
    s_zp,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    RANGES: tl.constexpr,
    HAS_PSI: tl.constexpr,
    HAS_CO: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
):
    """Range i_s's part of the query side's dS = sum_t phiq_t a_t^T and dz = sum_t phiq_t beta_t.

    Non-causal (not RANGES): program id 1 is a (batch, query head) pair; its part goes to slice i_s of
    dsp [NSPLIT, B, H, F, Dv] / dzp [NSPLIT, B, H, F] (strides s_sp, s_zp), summed on the host.
    Chunk mode (RANGES): program id 1 is a (batch, key/value head) pair (packed: the key/value head) and
    the sum runs over the G query heads of its group in order, relative to s_r: query t of chunk c counts
    exp(min(s_r - kstab_c, 0)) (the walk's factors from chunk c back to the range's first); written to
    the range's row of dsp [B, HK, NR, F, Dv], dzp [B, HK, NR, F]."""
    i_m = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    if RANGES:  # rows of key/value heads (H = HK, G = 1)
        i_b, i_h, i_hk, i_bk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _program_rows(
            cu, chunk_off, range_off, range_seq, kstab, i_p, i_s, T, HK, HK, 1, CPS, NCS, NRS, BT, True, True,
            IS_VARLEN,
        )  # fmt: skip
        NG = G
    else:
        i_b, i_h, i_hk, i_bk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _program_rows(
            cu, chunk_off, range_off, range_seq, kstab, i_p, i_s, T, H, HK, G, CPS, NCS, NRS, BT, False, False,
            IS_VARLEN,
        )  # fmt: skip
        i_row = i_p
        NG = 1
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
    c_lo = i_rl * CPS
    if RANGES:
        b_ks = tl.load(p_ks + c_lo)
    for g in range(0, NG):
        if RANGES:
            i_hq = i_hk * G + g
            i_bhq = i_bt * H + i_hq  # the token tensors' (batch, query head) row
        else:
            i_hq = i_h
            i_bhq = i_bht
        for c in range(c_lo, tl.minimum(c_lo + CPS, NC)):
            o_t = bos + c * BT + o_c
            m_t = o_t < eos
            if RANGES:
                b_f = tl.exp(tl.minimum(b_ks - tl.load(p_ks + c), 0.0))
            else:
                b_f = 1.0
            p_tq = ((i_bt * T + o_t[:, None]) * H + i_hq) * D + o_d[None, :]
            p_ta = ((i_bt * T + o_t[:, None]) * H + i_hq) * DV + o_v[None, :]
            b_a = tl.load(da + p_ta, mask=m_t[:, None] & m_v[None, :], other=0.0) * b_f
            b_beta = tl.load(dbeta + i_bhq * T + o_t, mask=m_t, other=0.0) * b_f
            _, _, qa, qb = _query_phi(
                q, qmax, p_tq, m_t[:, None] & m_d[None, :], i_bhq, T, o_t, m_t, b_w, b_bias, b_freq, b_psi, root,
                c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC,
            )  # fmt: skip
            b_dsa, b_dsb, b_dza, b_dzb = _accumulate_dstate(b_dsa, b_dsb, b_dza, b_dzb, qa, qb, b_a, b_beta, KIND, PREC)
    _store_state(
        dsp + i_s * s_sp + i_row * F * DV + o_m[:, None] * DV + o_v[None, :],
        dzp + i_s * s_zp + i_row * F + o_m,
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
