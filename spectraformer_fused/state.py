"""The recurrent state of random-feature attention."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RFState(NamedTuple):
    """State after a prefix of keys, in fp32 (fp64 for fp64 inputs).

    ``S [B, H, F, Dv]`` and ``z [B, H, F]`` are sum_j phi_k(k_j) v_j^T and sum_j phi_k(k_j), both
    stored divided by ``exp(log_scale)``; ``log_scale [B, H]`` is the key stabiliser (the running maximum
    of the key-feature exponents), ``-inf`` while no key has been seen. Passing the state of one piece of
    a sequence as ``initial_state`` of the next equals one run over the whole sequence (for the same
    feature-map parameters).
    """

    S: torch.Tensor
    z: torch.Tensor
    log_scale: torch.Tensor


class WindowState(NamedTuple):
    """State of hybrid attention with a window of ``W`` exact keys and ``S`` attention sinks (DESIGN.md
    sections 6 and 8), fp32 (fp64 for fp64 inputs) but the bool flags.

    ``S``, ``z`` and ``log_scale`` are an ``RFState`` of every key that has left the window and is not a
    sink. ``k_tail [B, H, W - 1, D]`` and ``v_tail [B, H, W - 1, Dv]`` are the raw keys and values (not
    multiplied by sqrt(scale)) of the last W - 1 positions, oldest first; ``tail_keep [B, W - 1]`` (bool) is
    False where a position holds no key (before the first token, masked, or a sink, which the sink slots
    hold). ``k_sink [B, H, S, D]``, ``v_sink [B, H, S, Dv]`` are the raw keys and values of the first S
    positions of the sequence, ``sink_keep [B, S]`` False where a position is masked or not seen yet, and
    ``sink_seen [B, S]`` True for the positions already seen (the first ones). With sinks only (no window)
    the tail is empty. Its size does not depend on T. Passing the state of one piece as ``initial_state``
    of the next equals one run.
    """

    S: torch.Tensor
    z: torch.Tensor
    log_scale: torch.Tensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor
    tail_keep: torch.Tensor
    k_sink: torch.Tensor
    v_sink: torch.Tensor
    sink_keep: torch.Tensor
    sink_seen: torch.Tensor

    @property
    def window(self) -> int:
        """W (a state of sinks only, W = 0, has an empty tail and reads as W = 1: the two hold the same)."""
        return self.k_tail.shape[2] + 1

    @property
    def sinks(self) -> int:
        return self.k_sink.shape[2]

    @property
    def rf(self) -> RFState:
        """The feature part alone (keys that have left the window)."""
        return RFState(self.S, self.z, self.log_scale)

    @property
    def tail(self) -> tuple:
        """(k_tail, v_tail, tail_keep)."""
        return self.k_tail, self.v_tail, self.tail_keep

    @property
    def sink_part(self) -> tuple:
        """(k_sink, v_sink, sink_keep, sink_seen)."""
        return self.k_sink, self.v_sink, self.sink_keep, self.sink_seen


class CacheState(NamedTuple):
    """State of hybrid attention with an exact cache of ``C`` keys (DESIGN.md section 9): the ten fields of a
    ``WindowState`` (same meaning, same order) and the cache. ``k_cache [B, H, C, D]`` and ``v_cache
    [B, H, C, Dv]`` are the raw keys and values (not multiplied by sqrt(scale)) that have left the window and
    that the features represent worst, per key/value head, in no particular order (slot i of one head and of
    another need not hold the same position); ``cache_keep [B, C]`` (bool) is False for a slot that holds no
    key yet (slots fill in order, the same for every head). Its size does not depend on T: W - 1 + S + C
    keys and values per sequence and key/value head besides S, z, log_scale. Passing the state of one piece
    as ``initial_state`` of the next equals one run.
    """

    S: torch.Tensor
    z: torch.Tensor
    log_scale: torch.Tensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor
    tail_keep: torch.Tensor
    k_sink: torch.Tensor
    v_sink: torch.Tensor
    sink_keep: torch.Tensor
    sink_seen: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_keep: torch.Tensor

    @property
    def window(self) -> int:
        return self.k_tail.shape[2] + 1

    @property
    def sinks(self) -> int:
        return self.k_sink.shape[2]

    @property
    def cache(self) -> int:
        """C, the number of cache slots."""
        return self.k_cache.shape[2]

    @property
    def rf(self) -> RFState:
        """The feature part alone (keys folded into the features)."""
        return RFState(self.S, self.z, self.log_scale)

    @property
    def tail(self) -> tuple:
        return self.k_tail, self.v_tail, self.tail_keep

    @property
    def sink_part(self) -> tuple:
        return self.k_sink, self.v_sink, self.sink_keep, self.sink_seen

    @property
    def cache_part(self) -> tuple:
        """(k_cache, v_cache, cache_keep)."""
        return self.k_cache, self.v_cache, self.cache_keep

    @property
    def window_state(self) -> WindowState:
        """The ten ``WindowState`` fields (the cache left out)."""
        return WindowState(*self[:10])


def empty_window_state(
    B: int,
    H: int,
    F: int,
    D: int,
    Dv: int,
    window: int,
    *,
    sinks: int = 0,
    cache: int = 0,
    dtype=torch.float32,
    device=None,
) -> WindowState | CacheState:
    """The state before any token of hybrid attention with ``window``, ``sinks`` and, when ``cache`` C > 0,
    an exact cache of C slots (then a ``CacheState``)."""
    S, z, m = empty_state(B, H, F, Dv, dtype=dtype, device=device)
    n = max(window - 1, 0)
    state = WindowState(
        S,
        z,
        m,
        torch.zeros(B, H, n, D, dtype=dtype, device=device),
        torch.zeros(B, H, n, Dv, dtype=dtype, device=device),
        torch.zeros(B, n, dtype=torch.bool, device=device),
        *empty_sinks(B, H, D, Dv, sinks, dtype=dtype, device=device),
    )
    if not cache:
        return state
    return CacheState(
        *state,
        torch.zeros(B, H, cache, D, dtype=dtype, device=device),
        torch.zeros(B, H, cache, Dv, dtype=dtype, device=device),
        torch.zeros(B, cache, dtype=torch.bool, device=device),
    )


def empty_sinks(B: int, H: int, D: int, Dv: int, sinks: int, *, dtype=torch.float32, device=None) -> tuple:
    """The sink part of a WindowState before any token: (k_sink, v_sink, sink_keep, sink_seen)."""
    return (
        torch.zeros(B, H, sinks, D, dtype=dtype, device=device),
        torch.zeros(B, H, sinks, Dv, dtype=dtype, device=device),
        torch.zeros(B, sinks, dtype=torch.bool, device=device),
        torch.zeros(B, sinks, dtype=torch.bool, device=device),
    )


def empty_state(B: int, H: int, F: int, Dv: int, *, dtype=torch.float32, device=None) -> RFState:
    return RFState(
        torch.zeros(B, H, F, Dv, dtype=dtype, device=device),
        torch.zeros(B, H, F, dtype=dtype, device=device),
        torch.full((B, H), float("-inf"), dtype=dtype, device=device),
    )


def safe_log_scale(m: torch.Tensor) -> torch.Tensor:
    """The stabiliser to subtract: ``m`` where finite, 0 where no key has been seen (-inf)."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)
