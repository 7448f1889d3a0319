"""Fused Triton forward of random-feature attention: one kernel, ``_rf_fwd_kernel``, for every mode.

The stabilisers come first (``triton_stats``: each query row's maximum feature exponent ``qmax`` and the
key stabilisers ``kstab``). Then ``_rf_fwd_kernel`` (grid ``(B*H, NMT, NV x ranges)``, NMT frequency tiles
of BM rows of W, NV tiles of Dv) walks the chunks of BT tokens of its range in order, keeping its state
tiles S ``[BM, BV]`` and z ``[BM]`` (two of each for HYP/TRIG: blocks a and b) in fp32 registers.
Causal: per chunk the state is rescaled to the new stabiliser, then ``num = tril(phi_q phi_k^T) v +
phi_q S``, ``den = rowsum(tril(phi_q phi_k^T)) + phi_q z`` and ``S += phi_k^T v``, ``z += colsum(phi_k)``.
The walk is one range of every chunk from the initial state; the chunk mode (RANGES, ``triton_chunk``)
runs ranges in parallel from the states before them (``_states_before``: each range's own key state,
PHASE 1 with RANGES, then the pass over the ranges, ``triton_scan``). Non-causal runs as two launches over
NSPLIT ranges of chunks (program id 2 also indexes the range, so the grid fills the device however long
T is): the first writes each range's partial S, z (reduced on the host in a fixed order), the second
computes every range's outputs from the reduced state. With one frequency tile the kernel writes o
directly; with several it writes per-tile partial numerators and denominators, summed on the host.

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
  full), the chunk mode's states before each range ``[B, H, NR, F, Dv]`` and ``[B, H, NR, F]``, copies
  of the small per-head parameters (bias ``[B, H, m]``, freq ``[B, H]``, psi ``[B, H, D]``, S0, z0, m0)
  when not already fp32-contiguous, and, only with NMT > 1 frequency tiles, partials
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

from ...contract import DEN_EPS, feature_width
from .common import (
    KIND_EXP,
    VarlenTables,
    _dot,
    _keep_rows,
    _load_rows,
    _store_out,
    autotuned,
    dot_precision,
    kernel_kind,
    optional_inputs,
    varlen_args,
)
from .scan import _first_stabiliser, _scan, _varlen_ranges, range_chunks
from .stats import MAX_BM, _f32, _strides, default_chunk_size, freq_tile, stabilisers
from .steps import (
    _accumulate_state,
    _key_features,
    _key_shift,
    _last_chunk,
    _load_state,
    _program_rows,
    _query_features,
    _rescale,
    _store_state,
    _tile_params,
)

# The chunk mode's fixed launch configuration (chosen with bench.perf.compile_check: no spills at D = Dv = 64,
# m = 128 on sm_90): 8 warps for the output launch, whose chunks are 16 tokens.
RANGE_WARPS = 8


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
    NRS,
    root,
    c_t,
    c_o,
    KIND: tl.constexpr,
    PHASE: tl.constexpr,
    RANGES: tl.constexpr,
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
    """Program id 2 = Dv tile + NV * range (a range: CPS chunks).

    PHASE 0 (causal): walks its chunks in order. The walk (not RANGES) is one range of every chunk: it
    starts from the initial state (S0, z0, m0) and stores the final state (STORE_STATE). The chunk mode
    (RANGES) walks range i_s from the state before it (S, z: [B, HK, NR, F, Dv] and [B, HK, NR, F], see
    ``_program_rows``, relative to kstab at the range's first chunk) and stores no state.
    Non-causal runs in two launches, each program owning a range of CPS chunks: PHASE 1 sums its keys
    into a partial state (S, z point at [NSPLIT, B, H, F, (Dv)] buffers, strides s_sp, s_zp), PHASE 2 reads
    the reduced state (S, z) and writes the outputs of its chunks. PHASE 1 with RANGES is the chunk mode's
    first step: range i_s's own key state, relative to kstab at its last chunk, into its row of S, z
    ([B, HK, NR, ...]; s_sp = s_zp = 0).

    Grouped-query attention: program id 0 is a (batch, query head) pair; k, v, the parameters, the
    stabilisers kstab and the state belong to its key/value head i_hk = i_h // G. PHASE 0 programs of one
    group compute the same state; the first query head of the group stores it. PHASE 1 reads no query and
    is launched over (batch, key/value head) pairs (H = HK, G = 1).

    IS_VARLEN (packed sequences, token tensors of batch 1): the batch index is the sequence index; its
    rows are [cu[n], cu[n + 1]); the causal kstab is ``[1, HK, NCS]`` with the sequence's chunks from
    slot chunk_off[n]; the non-causal one ``[N, HK, 1]``, as dense. Chunk mode: program id 0 is the head
    and the range a global range slot (``_program_rows``)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_vs = tl.program_id(2).to(tl.int64)
    NV = tl.cdiv(DV, BV)
    i_v = i_vs % NV
    i_s = i_vs // NV
    i_b, i_h, i_hk, i_bk, i_rl, bos, eos, i_bt, i_bht, NC, p_ks, i_row = _program_rows(
        cu, chunk_off, range_off, range_seq, kstab, i_bh, i_s, T, H, HK, G, CPS, NCS, NRS, BT,
        CAUSAL=PHASE == 0 or RANGES, RANGES=RANGES, IS_VARLEN=IS_VARLEN,
    )  # fmt: skip
    if RANGES and PHASE == 1 and not IS_VARLEN:
        i_row = i_bh * tl.cdiv(NC, CPS) + i_s  # launched over (batch, key/value head) rows
    F = M if KIND == KIND_EXP else 2 * M
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
    m_s = m_m[:, None] & m_v[None, :]  # (where the store uses it: formed before the walk, fewer registers)
    if PHASE == 0 and not RANGES:  # the walk: every chunk
        c_lo = 0
        c_hi = NC
    else:
        c_lo = i_rl * CPS
        c_hi = tl.minimum(c_lo + CPS, NC)
    if RANGES and PHASE == 1:  # the range's own key state: relative to its last chunk's stabiliser
        b_kprev = tl.load(p_ks + _last_chunk(c_lo, c_hi, IS_VARLEN))
    if (RANGES and PHASE == 0) or PHASE == 2:  # the state before the range (chunk mode) or the reduced state
        b_sa, b_sb, b_za, b_zb = _load_state(
            S + i_row * F * DV + o_m[:, None] * DV + o_v[None, :], z + i_row * F + o_m, m_m[:, None] & m_v[None, :], m_m,
            M, DV, 1.0, KIND,
        )  # fmt: skip
    else:
        b_sa = tl.zeros([BM, BV], dtype=tl.float32)
        b_sb = tl.zeros([BM, BV], dtype=tl.float32)
        b_za = tl.zeros([BM], dtype=tl.float32)
        b_zb = tl.zeros([BM], dtype=tl.float32)
    if PHASE == 0:
        b_kprev = tl.load(p_ks + c_lo)  # the stabiliser of the range's first chunk
    elif not RANGES:
        b_kprev = tl.load(p_ks)  # the one stabiliser
    if HAS_INIT and PHASE != 2:
        # The initial state is relative to exp(m0); move it to the first stabiliser (0 when m0 = -inf).
        # Non-causal: only the first chunk range carries it, so the reduced state counts it once.
        b_alpha = tl.exp(tl.load(m0 + i_bk) - b_kprev)
        b_alpha = tl.where(i_s == 0, b_alpha, 0.0)
        b_sa, b_sb, b_za, b_zb = _load_state(
            S0 + i_bk * F * DV + o_m[:, None] * DV + o_v[None, :], z0 + i_bk * F + o_m, m_m[:, None] & m_v[None, :],
            m_m, M, DV, b_alpha, KIND,
        )  # fmt: skip

    for i_c in range(c_lo, c_hi):
        o_t = bos + i_c * BT + o_i
        m_t = o_t < eos
        if PHASE == 0:
            # the stabiliser never decreases while the state is non-empty; min() keeps the factor finite
            # (the state is zero) when the previous chunks had no key
            b_kst = tl.load(p_ks + i_c)
            b_sa, b_sb, b_za, b_zb = _rescale(b_sa, b_sb, b_za, b_zb, tl.exp(tl.minimum(b_kprev - b_kst, 0.0)), KIND)
            b_kprev = b_kst
        b_w = tl.load(p_w, mask=m_w, other=0.0).to(tl.float32)
        if PHASE != 2:  # the chunk's key features, relative to its stabiliser
            keep = _keep_rows(mask, i_bt, o_t, m_t, s_mb, s_mt, HAS_MASK)
            b_k = _load_rows(k, i_bt, i_hk, o_t, m_t, o_d, m_d, s_kb, s_kt, s_kh, s_kd)
            shift = _key_shift(b_kprev, lse, i_bkt, T, o_t, m_t, HAS_LSE)
            _, b_pka, b_pkb = _key_features(
                b_k, keep, b_w, b_bias, b_freq, b_psi, shift, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC
            )
        if PHASE != 1:  # the chunk's query features
            b_q = _load_rows(q, i_bt, i_h, o_t, m_t, o_d, m_d, s_qb, s_qt, s_qh, s_qd)
            b_qmax = tl.load(qmax + i_bht * T + o_t, mask=m_t, other=0.0)
            _, b_pqa, b_pqb = _query_features(
                b_q, b_qmax, m_t, b_w, b_bias, b_freq, b_psi, root, c_t, c_o, KIND, HAS_PSI, HAS_CO, PREC
            )
        if PHASE != 2:
            b_v = _load_rows(v, i_bt, i_hk, o_t, m_t, o_v, m_v, s_vb, s_vt, s_vh, s_vd).to(tl.float32)
        if PHASE == 0:
            # [BT, BM] @ [BM, BT] -> [BT, BT]: query t, key j of this chunk
            b_s = _dot(b_pqa, tl.trans(b_pka), PREC)
        if PHASE != 1:
            # [BT, BM] @ [BM, BV] -> [BT, BV]: the state (earlier chunks, or every key)
            b_num = _dot(b_pqa, b_sa, PREC)
            b_den = tl.sum(b_pqa * b_za[None, :], axis=1)
            if KIND != KIND_EXP:
                if PHASE == 0:
                    b_s += _dot(b_pqb, tl.trans(b_pkb), PREC)
                b_num += _dot(b_pqb, b_sb, PREC)
                b_den += tl.sum(b_pqb * b_zb[None, :], axis=1)
            if PHASE == 0:
                b_s = tl.where(o_i[:, None] >= o_i[None, :], b_s, 0.0)
                # [BT, BT] @ [BT, BV] -> [BT, BV]
                b_num += _dot(b_s, b_v, PREC)
                b_den += tl.sum(b_s, axis=1)
            _store_out(
                o, den, b_num, b_den, i_bht, i_bt, i_h, i_m, i_v, o_t, m_t, o_v, m_v, T, H, DV, s_on, s_dn, SPLIT
            )
        if PHASE != 2:
            b_sa, b_sb, b_za, b_zb = _accumulate_state(b_sa, b_sb, b_za, b_zb, b_pka, b_pkb, b_v, KIND, PREC)

    if STORE_STATE:
        # PHASE 0: the final state, relative to the last stabiliser = the final running max (all zero when
        # it is -inf). PHASE 1: this chunk range's partial state (i_s-th slice), summed on the host.
        # One query head per group stores its key/value head's state.
        if RANGES:  # the range's own row
            p_s = S + i_row * F * DV
            p_z = z + i_row * F
        else:  # the final state, or the i_s-th slice of the partial states
            p_s = S + i_s * s_sp + i_row * F * DV
            p_z = z + i_s * s_zp + i_row * F
        if PHASE == 1 and not RANGES:
            m_st = m_s
        else:  # formed here: fewer registers across the walk
            m_st = m_m[:, None] & m_v[None, :]
        if i_h % G == 0:
            _store_state(
                p_s + o_m[:, None] * DV + o_v[None, :],
                p_z + o_m,
                b_sa,
                b_sb,
                b_za,
                b_zb,
                m_st,
                m_m,
                M,
                DV,
                i_v == 0,
                KIND,
            )


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


def _num_splits(num_chunks: int, programs: int, device: torch.device) -> int:
    """How many chunk ranges the non-causal forward uses: about four programs per multiprocessor on a
    GPU; two under the interpreter (so the tests cross a range boundary); never more than the chunks."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(target, max(1, programs))
    else:
        want = 2
    return max(1, min(num_chunks, want))


def _fwd_args(q, k, v, W, bias, freq, psi, mask, lse, kstab, varlen, *, kind, c_t, c_o, scale, BT, BM, ranges):
    """The keyword arguments every launch of ``_rf_fwd_kernel`` shares; q None: the key state of PHASE 1
    with RANGES (no query is read). bias, freq, psi: fp32 contiguous (psi may be None)."""
    x = k if q is None else q
    s_mb, s_mt = (0, 0) if mask is None else mask.stride()
    names = ("cu", "chunk_off", "range_off", "range_seq", "NCS", "NRS") if ranges else ("cu", "chunk_off", "NCS")
    return dict(
        q=q,
        k=k,
        v=v,
        W=W,
        bias=bias,
        freq=freq,
        psi=psi,
        mask=None if mask is None else mask.view(torch.uint8),
        lse=lse,
        kstab=kstab,
        **(dict.fromkeys(("s_qb", "s_qt", "s_qh", "s_qd"), 0) if q is None else _strides(q=q)),
        **_strides(k=k, v=v, w=W),
        s_mb=s_mb,
        s_mt=s_mt,
        **{"range_off": None, "range_seq": None, "NRS": None, **varlen_args(varlen, *names)},
        T=x.shape[1],
        HK=k.shape[2],
        M=W.shape[1],
        D=x.shape[3],
        DV=v.shape[-1],
        root=math.sqrt(scale),
        c_t=c_t,
        c_o=c_o,
        KIND=kernel_kind(kind),
        RANGES=ranges,
        HAS_CO=c_o != 0.0,
        PREC=dot_precision(x.dtype, v.dtype),
        BT=BT,
        BD=max(16, triton.next_power_of_2(x.shape[3])),
        BM=BM,
    )


def _states_before(k, v, W, bias, freq, psi, mask, kstab, S0, z0, m0, *, kind, c_t, c_o, scale, BT, cps,
                   varlen: VarlenTables | None = None, lse=None):  # fmt: skip
    """The chunk mode's state before every range ``[B, Hk, NR, F, Dv]``, ``[B, Hk, NR, F]`` (relative to
    kstab at its first chunk) and the final state (relative to the last kstab): each range's own key state
    (``_rf_fwd_kernel`` PHASE 1 with RANGES, all ranges in parallel), then the pass over the ranges
    (``triton_scan``). bias, freq, psi, S0, z0, m0: fp32 contiguous or None. Packed sequences (``varlen``,
    B = 1): the range slots ``[1, Hk, NRS, ...]`` and the final state per sequence."""
    B, T, Hk, D = k.shape
    Dv = v.shape[-1]
    M = W.shape[1]
    F = feature_width(kind, M)
    NC = triton.cdiv(T, BT)
    NR = triton.cdiv(NC, cps) if varlen is None else varlen.num_range_slots
    BM = max(16, min(MAX_BM, triton.next_power_of_2(M), freq_tile(max(16, triton.next_power_of_2(D)))))
    BV = max(16, min(64, triton.next_power_of_2(Dv)))
    L = torch.empty(B, Hk, NR, F, Dv, dtype=torch.float32, device=k.device)
    Lz = torch.empty(B, Hk, NR, F, dtype=torch.float32, device=k.device)
    args = _fwd_args(None, k, v, W, bias, freq, psi, mask, lse, kstab, varlen, kind=kind, c_t=c_t, c_o=c_o,
                     scale=scale, BT=BT, BM=BM, ranges=True)  # fmt: skip
    _rf_fwd_kernel[(B * Hk, triton.cdiv(M, BM), triton.cdiv(Dv, BV) * NR)](
        **args, S0=None, z0=None, m0=None, qmax=None, o=None, den=None, S=L, z=Lz, s_on=0, s_dn=0, s_sp=0, s_zp=0,
        H=Hk, G=1, CPS=cps, PHASE=1, STORE_STATE=True, SPLIT=False, BV=BV, num_warps=4, num_stages=1,
    )  # fmt: skip
    init = init_z = None
    if S0 is not None:
        # the initial state is relative to exp(m0); move it to the first stabiliser (0 when m0 = -inf)
        alpha = torch.exp(m0 - _first_stabiliser(kstab, varlen))
        init, init_z = (S0 * alpha[..., None, None]).contiguous(), (z0 * alpha[..., None]).contiguous()
    return _scan(L, Lz, kstab, init, init_z, NC, cps, reverse=False, varlen=varlen)


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
    ranges: bool = False,
    cps: int | None = None,
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

    ``ranges`` (causal only): the chunk mode (``triton_chunk``): ranges of ``cps`` chunks (default
    ``triton_scan.range_chunks``) run in parallel from the states before them (``_states_before``); packed
    sequences get ranges of their own (range slots: no range straddles two sequences).
    """
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if H % Hk:
        raise ValueError(f"the query heads ({H}) must be a multiple of the key/value heads ({Hk})")
    G = H // Hk
    Dv = v.shape[-1]
    M = W.shape[1]
    F = feature_width(kind, M)
    BT = int(chunk_size) if chunk_size is not None else default_chunk_size(T)
    if BT < 16 or BT & (BT - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {BT}")
    NC = triton.cdiv(T, BT)
    BM = max(16, min(MAX_BM, triton.next_power_of_2(M)))
    NMT, NV = triton.cdiv(M, BM), triton.cdiv(Dv, max(16, min(64, triton.next_power_of_2(Dv))))
    dev = q.device
    varlen = None
    if cu_seqlens is not None and ranges:
        varlen, cps = _varlen_ranges(cu_seqlens, BT, cps, (cu_seqlens.shape[0] - 1) * H * NMT * NV, dev)
    elif cu_seqlens is not None:
        varlen = VarlenTables(cu_seqlens, BT)
    NS = B if varlen is None else varlen.num_seqs  # batch rows of the parameters and the states
    NCmax = NC if varlen is None else max(1, varlen.max_chunks)
    bias, freq, psi, S0, z0, m0 = (_f32(t) for t in (bias, freq, psi, S0, z0, m0))
    qmax, kstab, m_final, lse = stabilisers(
        q, k, W, bias, freq, psi, mask, m0, kind=kind, c_t=c_t, c_o=c_o, scale=scale, causal=causal, BT=BT,
        varlen=varlen,
    )  # fmt: skip
    lse = None if lse is None else lse[0]

    split = NMT > 1
    o = torch.empty(B, T, H, Dv, dtype=v.dtype, device=dev)
    if split:
        o_buf = torch.empty(NMT, B, T, H, Dv, dtype=torch.float32, device=dev)
        den_buf = torch.empty(NMT, B, H, T, dtype=torch.float32, device=dev)
    else:
        o_buf = o
        den_buf = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    common = dict(
        _fwd_args(
            q,
            k,
            v,
            W,
            bias,
            freq,
            psi,
            mask,
            lse,
            kstab,
            varlen,
            kind=kind,
            c_t=c_t,
            c_o=c_o,
            scale=scale,
            BT=BT,
            BM=BM,
            ranges=ranges,
        ),  # fmt: skip
        **(dict.fromkeys(("S0", "z0", "m0")) if ranges else dict(S0=S0, z0=z0, m0=m0)),  # chunk mode: in Sb, zb
        qmax=qmax,
        o=o_buf,
        den=den_buf,
        s_on=B * T * H * Dv if split else 0,
        s_dn=B * H * T if split else 0,
        SPLIT=split,
    )

    def launch(S_ptr, z_ptr, s_sp, s_zp, nsplit, cps, phase, store_state):
        # PHASE 1 reads keys and values only: one program per (batch, key/value head)
        heads, group = (Hk, 1) if phase == 1 else (H, G)
        kw = dict(common, S=S_ptr, z=z_ptr, s_sp=s_sp, s_zp=s_zp, H=heads, G=group, CPS=cps, PHASE=phase,
                  STORE_STATE=store_state)  # fmt: skip
        rows = (B if ranges else NS) * heads  # chunk mode: packed sequences' ranges are global range slots
        if ranges or _rf_fwd_kernel_tuned is None:
            BV = max(16, min(64, triton.next_power_of_2(Dv)))
            launch_cfg = dict(num_warps=RANGE_WARPS if ranges else 4, num_stages=1)
            _rf_fwd_kernel[(rows, NMT, triton.cdiv(Dv, BV) * nsplit)](**kw, BV=BV, **launch_cfg)
        else:

            def grid(meta):
                return (rows, NMT, triton.cdiv(Dv, meta["BV"]) * nsplit)

            _rf_fwd_kernel_tuned[grid](**kw)

    if ranges:
        # The chunk mode: the state before every range (recomputed from each range's keys), then every
        # range's outputs in parallel; the final state comes out of the pass over the ranges.
        if cps is None:
            cps = range_chunks(NC, BT, B * H * NMT * NV, dev)
        NR = triton.cdiv(NC, cps) if varlen is None else varlen.num_range_slots
        Sb, zb, S, z = _states_before(
            k, v, W, bias, freq, psi, mask, kstab, S0, z0, m0, kind=kind, c_t=c_t, c_o=c_o, scale=scale, BT=BT,
            cps=cps, varlen=varlen, lse=lse,
        )  # fmt: skip
        launch(Sb, zb, 0, 0, NR, cps, 0, False)
    elif causal:
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
