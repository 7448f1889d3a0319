"""Chunk-parallel causal forward and backward of random-feature attention (the "chunk" mode).

The walk (``triton_fwd`` / ``triton_bwd``) runs one ordered pass over all chunks per (batch x head,
frequency tile, Dv tile): few programs when B x H is small and T long. The chunk mode groups the chunks
of BT tokens into NR ranges of CPS chunks and passes the state between ranges, as fla's ``chunk`` mode
and Lightning Attention-2 pass it between chunks. It runs the walk's kernels with RANGES set (a walk is
one range that starts from the initial state):

1. ``_rf_fwd_kernel`` PHASE 1 (grid ``(B*Hk, NMT, NV*NR)``, all ranges in parallel): each range's own
   key state ``L_r = sum_j phi_k(j) v_j^T`` and ``l_r = sum_j phi_k(j)`` over its keys, the features taken
   relative to the range's last key stabiliser ``e_r = kstab[last chunk of r]`` (the running maximum,
   known before any state pass: ``triton_stats.stabilisers``).
2. ``triton_scan._rf_chunk_scan_kernel`` (grid ``(B*Hk, F tiles, Dv tiles)``): a short ordered pass over
   the NR ranges that turns them into the state before each range, relative to ``s_r = kstab[first chunk
   of r]`` (the initial state folded in), and the final state. Rescaling between stabilisers uses the
   walk's factor ``exp(min(earlier - later, 0))``, so the states are the walk's.
3. ``_rf_fwd_kernel`` PHASE 0 (grid ``(B*H, NMT, NV*NR)``, all ranges in parallel): the walk over the
   range's CPS chunks starting from its key/value head's state: per chunk the masked intra-chunk
   product plus ``phi_q`` times the state before the chunk.

The backward mirrors it: the states before each range are recomputed (steps 1 and 2); each range's
query-side ``dS``/``dz`` (``_rf_bwd_dstate_kernel`` with RANGES, relative to ``s_r``) pass in reverse
order through the same scan kernel, seeded with the final state's gradient, giving ``dS``/``dz`` after
each range and the initial state's gradient; then ``_rf_bwd_dq_kernel`` and ``_rf_bwd_dkv_kernel`` run
every range in parallel. Deterministic: no atomics; every partial (frequency tiles, W's and the bias'
gradients per range) is an fp32 buffer summed on the host in a fixed order.

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

import os

import torch

from .bwd import rf_bwd
from .fwd import rf_fwd
from .scan import RANGE_TOKENS, range_chunks

__all__ = ["RANGE_TOKENS", "chunk_bwd", "chunk_fwd", "chunk_size", "choose_mode", "range_chunks", "requested_mode"]

MODES = ("auto", "walk", "chunk")
MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"
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


def chunk_fwd(q, k, v, W, bias, freq, psi, mask, S0, z0, m0, *, kind: int, c_t: float, c_o: float, scale: float,
              output_final_state: bool, chunk_size: int | None = None, cps: int | None = None, cu_seqlens=None):  # fmt: skip
    """The causal forward in chunk mode: ``triton_fwd.rf_fwd`` with ``ranges`` (its arguments and results,
    causal only; k, v, the parameters and the states may have Hk = H / G heads). ``cps``: chunks per range
    (default ``range_chunks``). ``cu_seqlens``: packed variable-length sequences as in ``rf_fwd``; every
    sequence has its own ranges (range slots: no range straddles two sequences) and its scan starts from
    its own initial state; all sequences' ranges run in one launch per kernel."""
    return rf_fwd(q, k, v, W, bias, freq, psi, mask, S0, z0, m0, kind=kind, c_t=c_t, c_o=c_o, scale=scale,
                  causal=True, output_final_state=output_final_state, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                  ranges=True, cps=cps)  # fmt: skip


def chunk_bwd(do, dS, dz, q, k, v, W, bias, freq, psi, mask, S0, z0, m0, o, den, qmax, kstab, *, kind: int, c_t: float,
              c_o: float, scale: float, chunk_size: int, cps: int | None = None, cu_seqlens=None, coeffs=None):  # fmt: skip
    """The causal backward in chunk mode: ``triton_bwd.rf_bwd`` with ``ranges`` (its arguments, ``coeffs``
    included, less the final state, which the causal backward does not read; its results); dk, dv, dW,
    dbias, dS0, dz0 per key/value head. ``cu_seqlens``: packed variable-length sequences (``chunk_fwd``);
    dbias, dS0, dz0 per sequence."""
    return rf_bwd(do, dS, dz, q, k, v, W, bias, freq, psi, mask, S0, z0, m0, o, den, qmax, kstab, None, None,
                  kind=kind, c_t=c_t, c_o=c_o, scale=scale, causal=True, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                  coeffs=coeffs, ranges=True, cps=cps)  # fmt: skip
