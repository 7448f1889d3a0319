"""The stabilised feature arithmetic that the reference backend and the exact cache's rules share
(DESIGN.md section 3): the feature exponents of a ``FeatureParams``, their application with a shift, the
running-maximum rescale of a state, the floored denominator, the parameters in a compute dtype. Below both
``reference.py`` and ``cache.py``, so that the cache's rules need not import the reference to reach them."""

from __future__ import annotations

import torch

from .components import feature_logits
from .contract import DEN_EPS, FeatureParams
from .state import safe_log_scale


def safe_denominator(den: torch.Tensor) -> torch.Tensor:
    """|den| floored at DEN_EPS (contract.py says why the magnitude)."""
    return den.abs().clamp_min(DEN_EPS)


def _features(x, p: FeatureParams, query: bool):
    return feature_logits(x, p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=query)


def _apply(e, mult, shift):
    phi = torch.exp(e - shift)
    return phi if mult is None else phi * mult


def _cast_params(params: FeatureParams, cdt) -> FeatureParams:
    """The parameters in the compute dtype."""
    return FeatureParams(
        params.kind,
        params.W.to(cdt),
        params.bias.to(cdt),
        params.freq.to(cdt),
        None if params.psi is None else params.psi.to(cdt),
        params.c_t,
        params.c_o,
        params.scale,
        params.num_features,
        params.feature_dim,
        params.exact_sq,
        None if params.log_mix is None else params.log_mix.to(cdt),
    )


def _rescale(ek, S, z, m):
    """Move the state to the new running maximum of the key exponents ``ek [B, H_kv, n, F]``; returns the
    state and the shift to use ``[B, H_kv, 1, 1]``."""
    m_new = torch.maximum(m, ek.amax(dim=(-1, -2)).detach())  # [B, H_kv]
    shift = safe_log_scale(m_new)
    alpha = torch.exp(m - shift)  # 0 while the state is empty
    return S * alpha[..., None, None], z * alpha[..., None], m_new, shift[:, :, None, None]
