"""The stabiliser pass of the Triton forward: every kernel's exponent shifts, before any state exists.

* ``_rf_stats_fwd_kernel`` (grid ``(B*H, NC)``): per chunk, every query row's maximum feature exponent
  (``qmax``) and the chunk's maximum key exponent (masked keys excluded); hedgehog (HAS_LSE) also each
  row's log-sum-exp. ``stabilisers`` turns the chunk maxima into ``kstab``: the running maximum over
  chunks when causal, the global maximum otherwise, both combined with the initial state's ``m0``.
* ``_rf_varlen_stab_kernel``: the same per packed sequence (``cu_seqlens``), one program per (sequence,
  key/value head) over its chunk slots.

Also the host-side sizes every Triton module shares: the chunk size, the frequency tile, stride keywords.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...contract import NORM_HYP
from .common import (
    KIND_HYP,
    VarlenTables,
    _feature_logits,
    _keep_rows,
    _load_rows,
    _seq_span,
    _transform,
    dot_precision,
    kernel_kind,
    optional_inputs,
    varlen_args,
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


def freq_tile(width: int) -> int:
    """Frequencies per tile for a kernel that holds whole rows of width ``width`` (the padded head dim,
    or the widest of D and Dv in the backward): 64, then 32 above 64 and 16 above 128, so that the
    operands the tensor cores read from shared memory fit one sm_90 block (227 KiB) at D = Dv = 256 in
    fp32 (tests/test_gpu_lowering.py; ``python -m bench.perf.compile_check --cases large``)."""
    return 64 if width <= 64 else 32 if width <= 128 else 16


def default_chunk_size(T: int) -> int:
    """The chunk size of the forward (and of the backward, which reuses it): 32 tokens, smaller when the
    whole sequence fits in fewer (at least 16, the smallest tile tl.dot accepts). Compiled for sm_90 at
    D = Dv = 64, m = 128, chunks of 64 make every causal kernel spill several times more registers than
    chunks of 32 (``python -m bench.perf.compile_check``; bench/results/compile-sm90-*.md)."""
    return max(16, min(32, triton.next_power_of_2(T)))


def _strides(**tensors) -> dict:
    """Keyword stride arguments ``s_<x>b, s_<x>t, s_<x>h, s_<x>d`` of [B, T, H, D] tensors (``s_wh, s_wm, s_wd``
    for W)."""
    out = {}
    for x, t in tensors.items():
        dims = "hmd" if x == "w" else "bthd"
        out.update({f"s_{x}{d}": s for d, s in zip(dims, t.stride())})
    return out


def _f32(t):
    """fp32, contiguous (None stays None)."""
    return None if t is None else t.to(torch.float32).contiguous()


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
