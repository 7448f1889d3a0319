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


def empty_state(B: int, H: int, F: int, Dv: int, *, dtype=torch.float32, device=None) -> RFState:
    return RFState(
        torch.zeros(B, H, F, Dv, dtype=dtype, device=device),
        torch.zeros(B, H, F, dtype=dtype, device=device),
        torch.full((B, H), float("-inf"), dtype=dtype, device=device),
    )


def safe_log_scale(m: torch.Tensor) -> torch.Tensor:
    """The stabiliser to subtract: ``m`` where finite, 0 where no key has been seen (-inf)."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)
