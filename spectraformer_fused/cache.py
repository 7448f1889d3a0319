"""The exact cache of hybrid attention (``cache=C``, DESIGN.md section 9): which keys that leave the window
stay exact, and which are folded into the feature state.

Per sequence and key/value head the cache holds up to C raw keys and values. When a key leaves the window
(causal: before query t is answered, key t - W, which query t - 1 still held in its band) it becomes a
candidate: a masked key (padding, or a sink: sinks are never candidates) is dropped; if a slot is free the
candidate takes it; otherwise the C cached keys and the candidate are scored (afresh at every fold; the
default score reads only the keys, the recall scores the current feature state too) and the lowest-scored
one is folded into the state (S += phi(k) v^T, z += phi(k), the running key maximum
and the rescale of ``feature_math._rescale``); the candidate takes the freed slot when it was not the one
folded. The decisions are constants for differentiation: scores are computed without gradient.

The score (``SCORES``) is chosen per call: ``rf_attention(..., cache_score=)``, ``SpectraAttention(cache_score=)``,
``convert(cache_score=)`` / ``set_cache(model, C, score=)``, ``linearize --cache-score``; None (the default)
is ``DEFAULT_SCORE``, ``"kernel"``, read at call time. Which one to choose (DESIGN.md section 9): the kernel
score keeps heavy keys (the attention-level MQAR's pairs) and decides a CPU prefill without a loop over
tokens; on a fitted real model the recall score keeps the keys a retrieval needs and the kernel score does not:

- ``"kernel"`` (the default): the log-error of the key's own feature weight against its exact weight,
  ``|log(phi_q(k).phi_k(k)) - s |k|^2 (1 + 2 exact_sq) - log_mix|`` (log_mix: the exact part's factor, 0
  without one; a weight <= 0, possible with signed features, counts as the tiniest positive one): how badly
  the features estimate the weight of this key for the query that looks it up (the query equal to it).
  State-free and value-free; for the exponential features it grows with |k| (their estimate of a heavy key's
  weight is mostly far below it), so it keeps the heavy keys, whose weights a retrieval query needs exact.
  Rounded to steps of 1 / ``KERNEL_STEPS`` nats, so that scores that differ by rounding only tie (ties keep
  the newer key); the trigonometric features estimate every key's self-weight exactly (cos^2 + sin^2 = 1),
  so with them every score ties and the cache keeps the most recent keys.
- ``"kernel_rel"``: the same ratio r as a relative error, ``|r - 1|`` (bounded by 1 for underestimates, so
  a light key overestimated twice outranks a heavy key underestimated a hundred times; measured as an
  alternative).
- ``"recall"``: the self-recall error of the state once the key is folded, ``|| v - (S + phi_k(k) v^T)^T
  phi_q(k) / (z + phi_k(k))^T phi_q(k) ||`` (k used as a query, the state S, z of the keys folded so far):
  how wrong the answer of the features would be for the query that looks for this very key. It equals
  ``||S^T phi_q(k) - (z^T phi_q(k)) v|| / |z^T phi_q(k) + phi_q(k).phi_k(k)|``: the state's recall residual
  (which does not see the key) damped by the key's own feature weight.
- ``"recall_other"``: the same without the key's own term, ``|| v - S^T phi_q(k) / z^T phi_q(k) ||`` (the
  state's prediction of v from the other keys alone; LoLA-style, measured as an alternative).

``bench/report/cache.py`` measures them (bench/results/cache-mqar-2026-12-07.md).
"""

from __future__ import annotations

import torch

from . import feature_math as fmath
from .contract import FeatureParams
from .state import safe_log_scale

SCORES = ("kernel", "kernel_rel", "recall", "recall_other")
DEFAULT_SCORE = "kernel"
KERNEL_STEPS = 4096.0  # "kernel" scores are rounded to 1 / KERNEL_STEPS nats
# Scores of the key alone (not of the state): the CPU backend decides them for a whole piece at once.
STATE_FREE_SCORES = ("kernel", "kernel_rel")


def key_scores(k, v, S, z, m, p: FeatureParams, root: float, score: str | None = None) -> torch.Tensor:
    """The score of keys ``k [B, H_kv, n, D]`` (raw) with values ``v [B, H_kv, n, Dv]`` against the feature
    state ``S [B, H_kv, F, Dv]``, ``z [B, H_kv, F]``, ``m [B, H_kv]`` (stored divided by exp(safe(m)));
    ``p`` in the compute dtype; ``score`` None is ``DEFAULT_SCORE``. Returns ``[B, H_kv, n]``, detached: the
    lowest is folded first."""
    return _scores_and_features(k, v, S, z, m, p, root, score)[0]


def _scores_and_features(k, v, S, z, m, p: FeatureParams, root: float, score: str | None):
    """``(key_scores(...), (ek, mk))``: the scores and the keys' feature logits and signs
    (``feature_math._features(k * root, p, query=False)``), which ``admit`` folds the loser with."""
    score = DEFAULT_SCORE if score is None else score
    with torch.no_grad():
        y = k.detach() * root
        vv = v.detach()
        ek, mk = fmath._features(y, p, query=False)  # [B, H_kv, n, F]
        # the query's features differ from the key's only through psi (OPRF / SADERF): else the same tensors
        eq, mq = (ek, mk) if p.psi is None else fmath._features(y, p, query=True)
        sq = eq.amax(-1, keepdim=True)
        phiq = fmath._apply(eq, mq, sq)  # row-stabilised: the row shift cancels in every ratio below
        if score in ("kernel", "kernel_rel"):
            shared = eq is ek  # then the key's features are the query's, on the same row shift
            top = sq if shared else ek.amax(-1, keepdim=True)
            w = (phiq * (phiq if shared else fmath._apply(ek, mk, top))).sum(-1)  # on the scale exp(sq + top)
            exact = (y * y).sum(-1) * (1.0 + 2.0 * p.exact_sq)
            if p.log_mix is not None:
                exact = exact + p.log_mix.detach()[None, :, None]
            if score == "kernel_rel":
                return (w * torch.exp(sq[..., 0] + top[..., 0] - exact) - 1.0).abs(), (ek, mk)
            # |log r|, r = estimate / exact; r <= 0 (signed features) counts as the worst, log of the tiniest
            log_r = torch.log(w.clamp_min(torch.finfo(w.dtype).tiny)) + sq[..., 0] + top[..., 0] - exact
            # in steps of 2^-12 nats: scores closer than rounding noise tie, and ties keep the newer key
            return torch.round(log_r.abs() * KERNEL_STEPS) / KERNEL_STEPS, (ek, mk)
        if score not in ("recall", "recall_other"):
            raise ValueError(f"unknown cache score {score!r}; valid names are {', '.join(SCORES)}")
        S, z = S.detach(), z.detach()
        rs = phiq @ S  # [B, H_kv, n, Dv]: on the state's scale exp(sq + shift)
        rz = (phiq @ z[..., None])[..., 0]  # [B, H_kv, n]
        resid = (rs - rz[..., None] * vv).norm(dim=-1)
        if score == "recall_other":
            return resid / fmath.safe_denominator(rz), (ek, mk)
        shift = safe_log_scale(m.detach())[..., None]  # [B, H_kv, 1]
        top = ek.amax(-1)  # [B, H_kv, n]: the key's own scale
        big = torch.maximum(shift, top)
        a = torch.exp(shift - big)
        w = (phiq * fmath._apply(ek, mk, top[..., None])).sum(-1) * torch.exp(top - big)
        return a * resid / fmath.safe_denominator(a * rz + w), (ek, mk)


class Admitted:
    """What ``admit`` did in each row and key/value head: ``folded [B, H_kv]`` the slot whose key was
    folded into the state (C: the candidate itself, -1: none; the slots after it move up by one) and ``slot
    [B, H_kv]`` the slot the candidate now holds (-1: none)."""

    __slots__ = ("folded", "slot")

    def __init__(self, folded, slot):
        self.folded, self.slot = folded, slot


def admit(S, z, m, kc, vc, ckeep, k_new, v_new, keep_new, p: FeatureParams, root: float, score: str | None = None):
    """One candidate per row: the key ``k_new [B, H_kv, D]`` (raw) with value ``v_new [B, H_kv, Dv]`` that
        has just left the window, ``keep_new [B]`` False for none (masked, a sink, or no key). The cache is
        ``kc [B, H_kv, C, D]``, ``vc``, ``ckeep [B, C]``; the state S, z, m as in ``key_scores``. Returns
        ``(S, z, m, kc, vc, ckeep, Admitted)``. ``score``: see ``key_scores``. The slots hold their keys in arrival
    order, and the lowest score is the first in [slots..., candidate]: of tied keys the oldest is folded."""
    B, Hk, C, _ = kc.shape
    dev = kc.device
    free = ~ckeep
    has_free = free.any(-1)  # [B]
    place = keep_new & has_free  # the candidate takes the first free slot
    compete = keep_new & ~has_free  # the cache is full: the lowest score of cache U candidate is folded
    slot = torch.full((B, Hk), -1, dtype=torch.long, device=dev)
    folded = torch.full((B, Hk), -1, dtype=torch.long, device=dev)
    if bool(place.any()):
        first = free.to(torch.uint8).argmax(-1)  # [B]
        hot = (torch.arange(C, device=dev)[None] == first[:, None]) & place[:, None]  # [B, C]
        kc = torch.where(hot[:, None, :, None], k_new[:, :, None], kc)
        vc = torch.where(hot[:, None, :, None], v_new[:, :, None], vc)
        ckeep = ckeep | hot
        slot = torch.where(place[:, None], first[:, None].expand(B, Hk), slot)
    if bool(compete.any()):
        ck = torch.cat([kc, k_new[:, :, None]], dim=2)  # [B, H_kv, C + 1, D]: slot C is the candidate
        cv = torch.cat([vc, v_new[:, :, None]], dim=2)
        sc, (ek_all, mk_all) = _scores_and_features(ck, cv, S, z, m, p, root, score)
        loser = sc.argmin(-1)  # [B, H_kv]
        v_out = cv.gather(2, loser[..., None, None].expand(B, Hk, 1, cv.shape[-1]))  # [B, H_kv, 1, Dv]
        grads = (ck, p.W, p.bias, p.freq, p.psi)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grads):
            # the state is differentiable in the folded key: its features again, with the graph
            k_out = ck.gather(2, loser[..., None, None].expand(B, Hk, 1, ck.shape[-1]))  # [B, H_kv, 1, D]
            ek, mk = fmath._features(k_out * root, p, query=False)  # [B, H_kv, 1, F]
        else:  # the loser's features, as scored
            at = loser[..., None, None].expand(B, Hk, 1, ek_all.shape[-1])
            ek = ek_all.gather(2, at)
            mk = None if mk_all is None else mk_all.gather(2, at)
        every = bool(compete.all())  # decoding's steady state: no row to leave as it was
        if not every:
            ek = ek.masked_fill(~compete[:, None, None, None], float("-inf"))
        S, z, m, shift = fmath._rescale(ek, S, z, m)
        phik = fmath._apply(ek, mk, shift)
        S = S + phik.transpose(-1, -2) @ v_out
        z = z + phik.sum(-2)
        # the slots stay in arrival order: the ones after the folded key move up, the candidate comes last
        pos = torch.arange(C, device=dev)
        take = pos + (pos >= loser[..., None])  # [B, H_kv, C]
        if every:
            kc = ck.gather(2, take[..., None].expand_as(kc))
            vc = cv.gather(2, take[..., None].expand_as(vc))
            folded = loser
            slot = torch.where(loser < C, torch.full_like(loser, C - 1), slot)
        else:
            take = torch.where(compete[:, None, None], take, pos)
            kc = torch.where(compete[:, None, None, None], ck.gather(2, take[..., None].expand_as(kc)), kc)
            vc = torch.where(compete[:, None, None, None], cv.gather(2, take[..., None].expand_as(vc)), vc)
            folded = torch.where(compete[:, None], loser, folded)
            slot = torch.where(compete[:, None] & (loser < C), torch.full_like(loser, C - 1), slot)
    return S, z, m, kc, vc, ckeep, Admitted(folded, slot)
