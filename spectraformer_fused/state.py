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
    """State of hybrid attention with a window of ``W`` exact keys (DESIGN.md section 6), fp32 (fp64 for
    fp64 inputs) but ``tail_keep``.

    ``S``, ``z`` and ``log_scale`` are an ``RFState`` of every key that has left the window (all keys but the
    last W - 1 positions). ``k_tail [B, H, W - 1, D]`` and ``v_tail [B, H, W - 1, Dv]`` are the raw keys and
    values (not multiplied by sqrt(scale)) of the last W - 1 positions, oldest first; ``tail_keep
    [B, W - 1]`` (bool) is False where a position holds no key (before the first token, or masked). Its size
    does not depend on T. Passing the state of one piece as ``initial_state`` of the next equals one run.
    """

    S: torch.Tensor
    z: torch.Tensor
    log_scale: torch.Tensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor
    tail_keep: torch.Tensor

    @property
    def window(self) -> int:
        return self.k_tail.shape[2] + 1

    @property
    def rf(self) -> RFState:
        """The feature part alone (keys that have left the window)."""
        return RFState(self.S, self.z, self.log_scale)


def empty_window_state(
    B: int, H: int, F: int, D: int, Dv: int, window: int, *, dtype=torch.float32, device=None
) -> WindowState:
    S, z, m = empty_state(B, H, F, Dv, dtype=dtype, device=device)
    n = window - 1
    return WindowState(
        S,
        z,
        m,
        torch.zeros(B, H, n, D, dtype=dtype, device=device),
        torch.zeros(B, H, n, Dv, dtype=dtype, device=device),
        torch.zeros(B, n, dtype=torch.bool, device=device),
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
