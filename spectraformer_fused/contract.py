"""The contract between the feature map and the backends: what one call's features are, as plain data.

A leaf module (it imports torch only): ``reference.py``, the compiled backends (``ops/``) and
``feature_map.py`` all import it, so no backend depends on the ``nn.Module`` that produces the parameters.

- Feature kinds: the constexpr switch of every compiled backend. With ``u = freq * W x'`` (``components.py``):
  ``EXP`` one block ``exp(bias + u + r)`` (F = m); ``HYP`` two blocks ``exp(bias +- u + r)`` (F = 2m);
  ``TRIG`` ``exp(bias + r) [cos u, sin u]`` (F = 2m); ``NORM_HYP`` hedgehog's per-row softmax over
  ``[bias + u, bias - u]`` (F = 2m): a per-key log-sum-exp the backends compute and subtract.
- ``feature_width(kind, m)``: F, the width of the feature vector (and of the state's feature axis).
- ``DEN_EPS``: the floor of ``|denominator|`` in every backend.
- ``FeatureParams``: everything a backend needs to evaluate one call's features, already resolved, and
  ``exact_sq``, the target kernel's exact log-weight for the keys inside a hybrid window, and ``log_mix``,
  the learned log-factor on the hybrid's exact part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXP, HYP, TRIG, NORM_HYP = 0, 1, 2, 3
KIND_NAMES = {EXP: "EXP", HYP: "HYP", TRIG: "TRIG", NORM_HYP: "NORM_HYP"}

# Floor of |denominator|: only reached when every key is masked or every feature underflows. Positive
# components give den >= 0; trigonometric ones (trigrf, gerf with s = -1) estimate a positive normaliser by
# a signed sum, and a non-positive estimate is replaced by its magnitude instead of flipping the output.
DEN_EPS = 1e-30


def feature_width(kind: int, num_features: int) -> int:
    """F: m features for EXP, 2m (two blocks per frequency) for every other kind."""
    if kind not in KIND_NAMES:
        raise ValueError(f"unknown feature kind {kind!r}; valid kinds are {sorted(KIND_NAMES)}")
    return num_features if kind == EXP else 2 * num_features


@dataclass
class FeatureParams:
    """Everything a backend needs to evaluate the features of one call, already resolved.

    Shapes, per key/value head (H = H_kv; the query heads of a group share them): ``W [H, m, D]`` (its
    first stride may be 0 when all heads share one matrix), ``bias [B, H, m]``, ``freq [B, H]`` (both may
    be expanded over the batch, stride 0), ``psi [B, H, D]`` or None; fp32 (fp64 for fp64 inputs).
    With packed sequences (``cu_seqlens``) the batch axis is the sequence axis: row n belongs to sequence n.
    ``W`` and ``bias`` may require grad (learnable weights); ``freq`` and ``psi`` never do (A* and Psi
    are constants for differentiation). Inputs are multiplied by ``sqrt(scale)`` before anything else.
    """

    kind: int
    W: torch.Tensor
    bias: torch.Tensor
    freq: torch.Tensor
    psi: torch.Tensor | None
    c_t: float
    c_o: float
    scale: float
    num_features: int
    feature_dim: int
    # The exact log-weight of the hybrid's window (DESIGN.md section 6), with x = sqrt(scale) q and
    # y = sqrt(scale) k: log K(x, y) = x.y + exact_sq (|x|^2 + |y|^2); 0 for the softmax target, -1/2 for
    # the Gaussian one (the target a learned component is fitted to, for hedgehog).
    exact_sq: float = 0.0
    # The log of the learned factor g on the hybrid's exact part (DESIGN.md section 8), ``[H]`` (H = H_kv),
    # added to every exact logit; None is g = 1. It may require grad.
    log_mix: torch.Tensor | None = None

    @property
    def positive(self) -> bool:
        return self.kind != TRIG

    def rows(self, lo: int, hi: int) -> "FeatureParams":
        """The parameters of batch (or sequence) rows ``lo:hi``; W is shared by every row."""
        return FeatureParams(
            self.kind,
            self.W,
            self.bias[lo:hi],
            self.freq[lo:hi],
            None if self.psi is None else self.psi[lo:hi],
            self.c_t,
            self.c_o,
            self.scale,
            self.num_features,
            self.feature_dim,
            self.exact_sq,
            self.log_mix,
        )


__all__ = [
    "EXP",
    "HYP",
    "TRIG",
    "NORM_HYP",
    "KIND_NAMES",
    "DEN_EPS",
    "feature_width",
    "FeatureParams",
]
