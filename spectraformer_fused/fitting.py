"""Fitting a feature map to the attention it replaces: softmax mimicry and attention transfer.

With a few hundred features, random features cannot follow peaked attention. A feature map with
learnable parameters (``weights="learnable"`` or ``"fastfood_learnable"``, or the learned component
``hedgehog``) can instead be trained so that its attention rows match the exact (softmax) attention rows
on given queries and keys (Hedgehog, Zhang et al., ICLR 2024), layer by layer for a converted model
(attention transfer, as in LoLCATs, Zhang et al., 2024).

* ``attention_distillation_loss``: the cross-entropy of the random-feature attention rows against the
  exact rows (reported as a KL divergence), or the output MSE against given values. It walks the queries
  chunk by chunk: no tensor larger than ``[B, H, chunk, T]`` (or the ``[B, H, T, F]`` key features) is
  formed, and under autograd each chunk is recomputed in the backward pass (activation checkpointing),
  so the backward never holds more than one chunk's block either.
* ``fit_feature_map``: Adam on the feature map's trainable parameters; returns the loss curve.
* ``distill``: every ``SpectraAttention`` of a model, or every attention layer of a HuggingFace model
  converted by ``integrations.transformers.convert`` (grouped-query attention included), fitted to its
  own softmax attention (stage 1): its attention weights (KL) or its attention outputs (MSE, as LoLCATs),
  as hybrid attention when the layer has a window or attention sinks (with the learned exact-part factor
  of a feature map built with ``mix``).
* ``finetune``: stage 2, the converted model trained as a whole to match the unconverted model's outputs
  (final hidden states or next-token distributions), moving the feature maps, the attention projections
  too, or low-rank adapters of the projections (through ``peft``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from .components import feature_logits
from .feature_map import RandomFeatureMap
from .reference import exact_attention, exact_logits
from .validation import check_qk_pair, check_sinks, check_window, hybrid_window, resolve_scale

LOSSES = ("kl", "mse")
_TINY = 1e-30  # floor of a random-feature attention weight before its log


def _check_mask(mask, q):
    if mask is None:
        return None
    B, T = q.shape[:2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor [B, T] (True = keep), got "
            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    if tuple(mask.shape) != (B, T) or mask.device != q.device:
        raise ValueError(
            f"key_padding_mask must have shape [B, T] = {(B, T)} on {q.device}, got "
            f"{tuple(mask.shape)} on {mask.device}"
        )
    return mask


class _Recomputed(torch.autograd.Function):
    """``fn(*inputs)`` run without saving its intermediates; the backward pass runs it again under autograd.

    This is activation checkpointing for one query chunk: only references to the inputs (W, the bias, the
    shared key exponents) are kept, so the backward holds one chunk's ``[B, H, c, T]`` block at a time.
    (``torch.utils.checkpoint`` does the same but imports torch._dynamo on first use, seconds on a CPU.)
    """

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return (None,) + tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


def _chunk_loss(
    eq, ek, kshift, logits, vis, v, kind_loss: str, mult_q, mult_k, band=None, target_band=None, log_mix=None
):
    """Loss terms of one query chunk, summed over its rows; the G query heads of a key/value head in dim 2.

    eq ``[B, H_kv, G, c, F]`` query exponents, ek ``[B, H_kv, 1, n, F]`` key exponents of the n visible keys,
    kshift ``[B, H_kv, 1, 1, 1]`` their shared stabiliser, logits ``[B, H_kv, G, c, n]`` the exact logits, vis
    ``[B|1, 1, 1, c, n]`` bool (visible pairs) or None, v ``[B, H_kv, 1, n, Dv]`` (mse) or None. ``band``
    ``[c, n]`` bool or None: the hybrid's exact pairs (the window's and the sinks': DESIGN.md sections 6
    and 8), whose weight in the model's row is the exact kernel itself, on one scale with the features (log
    space), times the factor g = exp(log_mix) (``log_mix [1, H_kv, 1, 1, 1]`` or None: g = 1). ``target_band``
    ``[c, n]`` bool or None: the pairs the exact target attends (a sliding-window layer's); none outside.
    Returns the sum of the row losses.
    """
    sq = eq.amax(-1, keepdim=True).detach()
    phiq = torch.exp(eq - sq)
    phik = torch.exp(ek - kshift)
    if mult_q is not None:
        phiq, phik = phiq * mult_q, phik * mult_k
    scores = phiq @ phik.transpose(-1, -2)  # [B, H_kv, G, c, n], on the scale exp(sq + kshift)
    if vis is not None:
        scores = scores.masked_fill(~vis, 0.0)
        logits = logits.masked_fill(~vis, float("-inf"))
    target = logits if target_band is None else logits.masked_fill(~target_band, float("-inf"))
    # the model's exact logits: log g added to every exact logit (the target's are left as they are)
    mlogits = logits if log_mix is None or band is None else logits + log_mix
    rows = torch.isfinite(target.amax(-1))  # [B, H_kv, G, c]: a visible key
    logp = torch.log_softmax(target, dim=-1).masked_fill(~rows[..., None], float("-inf"))
    p = logp.exp()  # 0 where masked
    shift = sq + kshift  # [B, H_kv, G, c, 1]
    if kind_loss == "kl":
        if band is None:
            den = scores.sum(-1, keepdim=True)
            logq = torch.log(scores.clamp_min(_TINY)) - torch.log(den.clamp_min(_TINY))
        else:
            logw = torch.where(band, mlogits, torch.log(scores.clamp_min(_TINY)) + shift)
            if vis is not None:
                logw = logw.masked_fill(~vis, float("-inf"))
            logq = logw - torch.logsumexp(logw, -1, keepdim=True).clamp_min(-1e30)
        terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))  # KL(p || q) per pair
        per_row = terms.sum(-1)
    else:
        if band is not None:  # both parts on the scale of the larger of the two row maxima
            top = torch.maximum(shift, mlogits.masked_fill(~band, float("-inf")).amax(-1, keepdim=True)).detach()
            scores = torch.where(band, torch.exp(mlogits - top), scores * torch.exp(shift - top))
        den = scores.sum(-1, keepdim=True).abs().clamp_min(_TINY)
        diff = (scores @ v) / den - p @ v  # [B, H_kv, G, c, Dv]
        per_row = diff.pow(2).mean(-1)
    return torch.where(rows, per_row, torch.zeros_like(per_row)).sum()


def _check_loss_backend(backend, loss):
    from .attention import BACKENDS

    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; valid names are None, {', '.join(BACKENDS)}")
    return None if loss != "mse" else backend


@torch.no_grad()
def output_target(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel: str = "softmax",
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    target_window: int | None = None,
) -> torch.Tensor:
    """The exact attention output that ``loss="mse"`` fits, ``[B, T, H, Dv]`` in fp32 (fp64 for fp64
    inputs): softmax (or Gaussian-kernel) attention of q ``[B, T, H, D]`` over k, v ``[B, T, H_kv, .]``,
    over the last ``target_window`` keys when given (sliding-window attention). Computed one key/value head
    at a time (``[B, H/H_kv, T, T]`` at most); it depends on the recorded q, k, v only, so a fit computes
    it once per batch and reuses it at every step."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.detach().to(cdt), k.detach().to(cdt), v.detach().to(cdt)
    Hk = k.shape[2]
    G = q.shape[2] // Hk
    parts = [
        exact_attention(
            q[:, :, h * G : (h + 1) * G],
            k[:, :, h : h + 1],
            v[:, :, h : h + 1],
            kernel=kernel,
            causal=causal,
            scale=scale,
            key_padding_mask=key_padding_mask,
            window=target_window,
        )
        for h in range(Hk)
    ]
    return torch.cat(parts, dim=2)


def _check_values(v, k) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            "loss='mse' needs v [B, T, H_kv, Dv] matching k in batch, length and heads; got "
            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
        )


def _output_inputs_ok(q, k, v, mask) -> bool:
    """Whether q, k, v, mask pass the checks of ``attention_distillation_loss`` (which raises the error
    otherwise), so that a target can be computed from them first."""
    try:
        check_qk_pair(q, k, grouped=True)
        _check_values(v, k)
        _check_mask(mask, q)
    except (TypeError, ValueError):
        return False
    return q.shape[1] == k.shape[1]


def _output_rows(q, mask) -> torch.Tensor:
    """``[B, T]`` bool: the query rows an output loss counts (not padded, with a visible key)."""
    if mask is None:
        return torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    return mask & mask.any(-1, keepdim=True)


def _backend_output_loss(feature_map, q, k, v, target, *, scale, causal, mask, window, sinks, backend):
    """``loss="mse"`` with the model's output computed by an ``rf_attention`` backend (fused forward and
    backward) against a precomputed ``target``; the mean over counted rows and heads of the squared error
    averaged over Dv, as the chunked loss."""
    from .attention import _backend_function, _resolve_backend

    sinks = sinks or 0
    win = hybrid_window(window, sinks)
    p = feature_map.feature_params(q, k, scale=scale, causal=causal, key_padding_mask=mask, update_stats=False)
    name = _resolve_backend(backend, q, feature_map, win, sinks)
    extra = {} if win is None else {"window": win}
    if sinks:
        extra["sinks"] = sinks
    o, _ = _backend_function(name)(
        q, k, v, p, causal=causal, key_padding_mask=mask, initial_state=None, output_final_state=False, **extra
    )
    rows = _output_rows(q, mask)[..., None]  # [B, T, 1]
    per_row = (o.to(target.dtype) - target).pow(2).mean(-1)  # [B, T, H]
    per_row = torch.where(rows, per_row, torch.zeros_like(per_row))
    return per_row.sum() / max(int(rows.sum()) * q.shape[2], 1)


def attention_distillation_loss(
    feature_map: RandomFeatureMap,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    loss: str = "kl",
    chunk_size: int = 64,
    window: int | None = None,
    target_window: int | None = None,
    sinks: int | None = None,
    backend: str | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """How far the feature map's attention is from exact attention on q ``[B, T, H, D]``, k ``[B, T, H_kv, D]``:
    a scalar.

    ``loss="kl"``: the mean over query rows of KL(p_i || q_i), p_i the exact attention row (softmax of
    scale q.k for ``kernel="softmax"``, the Gaussian kernel's for ``"gaussian"``) and q_i the
    random-feature row phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j'); its gradient is that of the
    cross-entropy -sum_j p_ij log q_ij. Needs positive features. ``loss="mse"``: the mean squared
    difference of the outputs for values v ``[B, T, H_kv, Dv]``. ``causal`` restricts row i to keys j <= i;
    masked keys (``key_padding_mask`` False) count in neither attention, and rows without a visible key
    (and padded query positions) are left out of the mean.

    Grouped-query attention: H_kv must divide H; query head h reads key/value head ``h // (H / H_kv)``
    (its keys, its feature map's W and data-dependent statistics), as in ``rf_attention``. k is never
    repeated: a group's query heads are stacked against their key/value head.

    Queries are processed ``chunk_size`` at a time: the largest tensors are the ``[B, H, chunk, T]`` block
    of one chunk and the ``[B, H_kv, T, F]`` key features; under autograd each chunk is recomputed in the
    backward pass, so at most one chunk's block is held at a time. Data-dependent parameters (OPRF, SADERF)
    come from q and k as in ``rf_attention``; running statistics are not updated.

    ``window`` W (None or 0: random features only): the model's row is hybrid attention's (DESIGN.md
    section 6): the exact kernel for the keys inside the window (causal: i - W < j <= i; non-causal:
    |i - j| < W), the features beyond, one normaliser, against the same exact target; only the keys beyond
    the window then train the feature map (through their share of the row). ``target_window``: the exact
    attention it is compared with is sliding-window attention over that window (the attention of a
    sliding-window layer, converted to hybrid attention with its own window: the features beyond the
    window are then fitted to weigh nothing); None: all visible keys.

    ``sinks`` S (None or 0: none): attention sinks (DESIGN.md section 8): the first S keys of the sequence
    (positions j < S, those row i may see) are exact too, with or without a window (a key in both counts
    once); the target is unchanged. A feature map built with ``mix`` carries the factor g = exp(log_mix)
    on the exact part (one per key/value head): log g is added to the model's exact logits (not the
    target's), so g gets a gradient (and is fitted) wherever a row has both exact and feature keys.

    ``backend`` (``loss="mse"`` only; ignored for "kl", whose rows need the weights): None computes the
    model's output in the chunked PyTorch code above; a backend name of ``rf_attention`` ("auto", "cpu",
    "triton", "reference") computes it with that backend's attention and its fused backward (no
    ``[B, H, chunk, T]`` feature block; the exact target by ``output_target``). Same value, much faster on
    the compiled backends; ``fit_feature_map`` and ``distill`` use "auto" and compute the target once per
    batch. ``target``: that target, ``output_target`` of these inputs, when already computed.
    """
    if not isinstance(feature_map, RandomFeatureMap):
        raise TypeError(f"feature_map must be a RandomFeatureMap, got {type(feature_map).__name__}")
    window = check_window(window)
    target_window = check_window(target_window)
    sinks = check_sinks(sinks) or None
    check_qk_pair(q, k, grouped=True)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same sequence length, got {q.shape[1]} and {k.shape[1]}")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid names are {', '.join(LOSSES)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if loss == "kl" and not feature_map.spec.positive:
        raise ValueError(
            f"loss='kl' needs positive features; component {feature_map.component!r} has signed "
            "(trigonometric) features whose attention weights can be negative: use loss='mse'"
        )
    if loss == "mse":
        _check_values(v, k)
    mask = _check_mask(key_padding_mask, q)
    backend = _check_loss_backend(backend, loss)
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    feature_map.check_input(D, Hk)
    scale = resolve_scale(scale, D)
    if backend is not None:
        q, k, v = q.detach(), k.detach(), v.detach()
        if target is None:
            target = output_target(
                q,
                k,
                v,
                kernel=feature_map.kernel,
                scale=scale,
                causal=causal,
                key_padding_mask=mask,
                target_window=target_window,
            )
        elif not isinstance(target, torch.Tensor) or target.shape != (B, T, H, v.shape[-1]):
            raise ValueError(
                f"target must be the exact output [B, T, H, Dv] = {(B, T, H, v.shape[-1])} (output_target), got "
                f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}"
            )
        return _backend_output_loss(
            feature_map,
            q,
            k,
            v,
            target,
            scale=scale,
            causal=causal,
            mask=mask,
            window=window,
            sinks=sinks,
            backend=backend,
        )
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.detach(), k.detach()
    p = feature_map.feature_params(q, k, scale=scale, causal=causal, key_padding_mask=mask, update_stats=False)
    root = math.sqrt(scale)
    x = (q.to(cdt) * root).transpose(1, 2).unflatten(1, (Hk, G))  # [B, H_kv, G, T, D]
    y = (k.to(cdt) * root).transpose(1, 2)  # [B, H_kv, T, D]
    qt = q.to(cdt).transpose(1, 2).unflatten(1, (Hk, G))  # unscaled, for the exact logits
    kt = k.to(cdt).transpose(1, 2)[:, :, None]  # [B, H_kv, 1, T, D]
    args = dict(kind=p.kind, c_t=p.c_t, c_o=p.c_o)
    W, bias, freq = p.W.to(cdt), p.bias.to(cdt), p.freq.to(cdt)
    psi = None if p.psi is None else p.psi.to(cdt)
    has_exact = window is not None or sinks is not None
    log_mix = getattr(p, "log_mix", None)
    log_mix = None if log_mix is None or not has_exact else log_mix.to(cdt)[None, :, None, None, None]
    ek, mult_k = feature_logits(y, W, bias, freq, psi, query=False, **args)  # [B, H_kv, T, F]
    if mask is not None:
        ek = ek.masked_fill(~mask[:, None, :, None], float("-inf"))
    key_max = ek.detach().amax(-1)  # [B, H_kv, T]
    vv = None if v is None or loss != "mse" else v.detach().to(cdt).transpose(1, 2)[:, :, None]
    keep_q = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, T]: padded queries left out
    total = x.new_zeros(())
    count = 0
    ids = torch.arange(T, device=q.device)
    for lo in range(0, T, chunk_size):
        hi = min(lo + chunk_size, T)
        n = hi if causal else T  # keys a row of the chunk can see
        vis = None
        if causal:
            vis = (ids[None, :n] <= ids[lo:hi, None])[None, None, None]  # [1, 1, 1, c, n]
        if mask is not None:
            km = mask[:, None, None, None, :n]
            vis = km if vis is None else vis & km
        if keep_q is not None:
            qm = keep_q[:, :, :, lo:hi, None]
            vis = qm if vis is None else vis & qm
        kshift = key_max[:, :, :n].amax(-1).clamp_min(-1e30)[..., None, None, None]
        diff = ids[lo:hi, None] - ids[None, :n]
        band = target_band = None
        if window is not None:
            band = (diff >= 0) & (diff < window) if causal else diff.abs() < window
        if sinks is not None:  # the first S keys (causal visibility comes with vis)
            sink = (ids[None, :n] < sinks).expand(hi - lo, n)
            band = sink if band is None else band | sink
        if target_window is not None:
            target_band = (diff >= 0) & (diff < target_window) if causal else diff.abs() < target_window

        def run(
            W,
            bias,
            ek,
            mult_k,
            log_mix,
            xc=x[:, :, :, lo:hi],
            qc=qt[:, :, :, lo:hi],
            n=n,
            vis=vis,
            kshift=kshift,
            band=band,
            target_band=target_band,
        ):
            c = xc.shape[3]
            eq, mult_q = feature_logits(xc.flatten(2, 3), W, bias, freq, psi, query=True, **args)
            eq = eq.unflatten(2, (G, c))  # [B, H_kv, G, c, F]
            mult_q = None if mult_q is None else mult_q.unflatten(2, (G, c))
            # exact_logits takes [B, T, H, D] and swaps dims 1, 2: hand it the 5-D blocks with those swapped
            logits = exact_logits(
                qc.transpose(1, 2), kt[:, :, :, :n].transpose(1, 2), kernel=feature_map.kernel, scale=scale
            )  # [B, H_kv, G, c, n]
            return _chunk_loss(
                eq,
                ek[:, :, None, :n],
                kshift,
                logits,
                vis,
                None if vv is None else vv[:, :, :, :n],
                loss,
                mult_q,
                None if mult_k is None else mult_k[:, :, None, :n],
                band,
                target_band,
                log_mix,
            )

        inputs = (W, bias, ek, mult_k, log_mix)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            total = total + _Recomputed.apply(run, *inputs)
        else:
            total = total + run(*inputs)
        rows = vis if target_band is None else (target_band if vis is None else vis & target_band)
        count += (hi - lo) * B * H if rows is None else H * int(rows.expand(B, 1, 1, hi - lo, n).any(-1).sum())
    return total / max(count, 1)


_LIBC = None  # glibc's handle once looked up; False where there is none


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; nothing elsewhere).

    A training step on the CPU allocates and frees tensors of many large sizes. glibc raises its mmap
    threshold after each large free, so later large tensors come from the heap, whose free pieces it keeps:
    measured on a 135M-parameter model, the resident size of ``finetune`` grew by 200-400 MiB per step
    (7.3 GiB after 12 steps, out of memory after about 60 on 24 GiB) with no tensor alive; trimming after
    every step keeps it flat and the steps faster (fewer page faults)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                pass
    if _LIBC:
        _LIBC.malloc_trim(0)


class _Progress:
    """A progress bar on stderr: tqdm when installed, else a plain line every tenth of the way (and at the
    end). ``enabled=False`` shows nothing. ``update(loss)`` advances one step."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.done, self._bar = total, desc, 0, None
        self.enabled = bool(enabled) and total > 0
        self._t0 = time.perf_counter()
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, loss: float | None = None) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            return
        if self.done == self.total or self.done % max(1, self.total // 10) == 0:
            tail = "" if loss is None else f"  loss {loss:.4g}"
            elapsed = time.perf_counter() - self._t0
            print(f"{self.desc}: {self.done}/{self.total}  {elapsed:.1f}s{tail}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _check_progress(progress):
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    return progress


# ----------------------------------------------------------------------------------------------------
# Fitting one feature map
# ----------------------------------------------------------------------------------------------------


def _as_batches(x, what: str) -> list:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Iterable) and not isinstance(x, (str, bytes)):
        out = list(x)
        for i, t in enumerate(out):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        return out
    raise TypeError(f"{what} must be a tensor or an iterable of tensors, got {type(x).__name__}")


def trainable_parameters(feature_map: nn.Module) -> list[nn.Parameter]:
    """The parameters a fit moves: learnable weights (``learnable``: W; ``fastfood_learnable``: B, G, S),
    a learned component's log-weights (``hedgehog``) and the hybrid's exact-part factor ``log_mix`` (a map
    built with ``mix``), i.e. every parameter that requires grad."""
    return [p for p in feature_map.parameters() if p.requires_grad]


def _check_steps_lr(steps, lr):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive float, got {lr!r}")


def fit_feature_map(
    feature_map: RandomFeatureMap,
    q,
    k,
    *,
    v=None,
    steps: int = 200,
    lr: float = 1e-2,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask=None,
    loss: str = "kl",
    chunk_size: int = 64,
    progress: bool = False,
    window: int | None = None,
    target_window: int | None = None,
    sinks: int | None = None,
    backend: str | None = "auto",
) -> list[float]:
    """Train the feature map's learnable parameters so that its attention matches exact attention.

    Args:
        feature_map: a ``RandomFeatureMap`` with trainable parameters (``weights="learnable"`` or
            ``"fastfood_learnable"``, or ``component="hedgehog"``); nothing else is changed (running
            statistics included).
        q, k: ``[B, T, H, D]`` tensors, or equal-length iterables of them (batches used in turn, cycled).
        v: values for ``loss="mse"`` (a tensor or an iterable like q).
        steps, lr: Adam steps and learning rate.
        scale, causal, key_padding_mask, loss, chunk_size: as in ``attention_distillation_loss``
            (``key_padding_mask`` a tensor or an iterable like q).
        progress: show a progress bar on stderr (tqdm when installed, else a plain line now and then).
        window, target_window: fit the feature map as the feature part of hybrid attention with this
            window, against sliding-window attention over ``target_window`` (see
            ``attention_distillation_loss``); None: random features only, against full attention.
        sinks: the hybrid's attention sinks (the first ``sinks`` keys exact, see
            ``attention_distillation_loss``). A feature map built with ``mix`` fits its exact-part factor
            ``log_mix`` too (it is one of its trainable parameters).
        backend: ``loss="mse"``: the ``rf_attention`` backend that computes the model's output with its
            fused forward and backward ("auto": the compiled CPU backend on CPU tensors, Triton on CUDA),
            against the exact output computed once per batch; None: the chunked PyTorch loss (see
            ``attention_distillation_loss``; the same value). Not used by ``loss="kl"``.

    Returns the loss before each step (``steps`` floats).
    """
    if not isinstance(feature_map, RandomFeatureMap):
        raise TypeError(f"feature_map must be a RandomFeatureMap, got {type(feature_map).__name__}")
    _check_steps_lr(steps, lr)
    window, target_window = check_window(window), check_window(target_window)
    sinks = check_sinks(sinks) or None
    _check_loss_backend(backend, "mse")
    bar = _Progress(steps, "fit_feature_map", _check_progress(progress))
    try:
        return _fit(
            feature_map,
            q,
            k,
            v,
            steps,
            lr,
            scale,
            causal,
            key_padding_mask,
            loss,
            chunk_size,
            bar,
            window,
            target_window,
            sinks,
            backend,
        )
    finally:
        bar.close()


def _fit(
    feature_map,
    q,
    k,
    v,
    steps,
    lr,
    scale,
    causal,
    key_padding_mask,
    loss,
    chunk_size,
    bar,
    window=None,
    target_window=None,
    sinks=None,
    backend=None,
) -> list[float]:
    qs, ks = _as_batches(q, "q"), _as_batches(k, "k")
    if not qs or len(qs) != len(ks):
        raise ValueError(f"q and k must hold the same positive number of batches, got {len(qs)} and {len(ks)}")
    vs = _as_batches(v, "v") or [None] * len(qs)
    masks = _as_batches(key_padding_mask, "key_padding_mask") or [None] * len(qs)
    if len(vs) != len(qs) or len(masks) != len(qs):
        raise ValueError(f"v and key_padding_mask must hold one entry per batch ({len(qs)})")
    params = trainable_parameters(feature_map)
    if not params:
        raise ValueError(
            f"the feature map ({feature_map.component} x {feature_map.weight_name}) has no trainable "
            "parameters: use weights='learnable' or 'fastfood_learnable', or component='hedgehog'"
        )
    backend = _check_loss_backend(backend, loss)
    targets = {}  # batch -> its exact output (mse on a backend): computed once, reused at every step
    opt = torch.optim.Adam(params, lr=float(lr))
    curve = []
    for step in range(steps):
        i = step % len(qs)
        if backend is not None and i not in targets and _output_inputs_ok(qs[i], ks[i], vs[i], masks[i]):
            targets[i] = output_target(
                qs[i],
                ks[i],
                vs[i],
                kernel=feature_map.kernel,
                scale=scale,
                causal=causal,
                key_padding_mask=masks[i],
                target_window=target_window,
            )
        value = attention_distillation_loss(
            feature_map,
            qs[i],
            ks[i],
            vs[i],
            scale=scale,
            causal=causal,
            key_padding_mask=masks[i],
            loss=loss,
            chunk_size=chunk_size,
            window=window,
            target_window=target_window,
            sinks=sinks,
            backend=backend,
            target=targets.get(i),
        )
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        curve.append(float(value.detach()))
        del value
        _trim_heap()
        bar.update(curve[-1])
    opt.zero_grad(set_to_none=True)
    return curve


# ----------------------------------------------------------------------------------------------------
# Attention transfer: every attention layer of a model fitted to its own softmax attention
# ----------------------------------------------------------------------------------------------------


class AttentionRecord(NamedTuple):
    """What one attention layer received on one batch: ``q [B, T, H, D]``, ``k [B, T, H_kv, D]`` (detached),
    the ``[B, T]`` bool keep-mask or None, the scale of its logits, whether it is causal, the layer's
    hybrid window (None: random features only), the window of the attention it replaces (a converted
    sliding-window layer's; None: full attention), its values ``v [B, T, H_kv, Dv]`` (detached; None when
    not recorded) and its attention sinks (None: none), which ``distill`` fits with."""

    q: torch.Tensor
    k: torch.Tensor
    key_padding_mask: torch.Tensor | None
    scale: float
    causal: bool
    window: int | None = None
    target_window: int | None = None
    v: torch.Tensor | None = None
    sinks: int | None = None


def _hf_integration():
    # convert() lives in the transformers integration: a model can hold converted layers only once that
    # module was imported, so a model without them never pays for importing transformers here.
    return sys.modules.get("spectraformer_fused.integrations.transformers")


def _distill_layers(model: nn.Module) -> dict:
    """``{name: (module, feature map)}`` of every SpectraAttention and every attention module converted by
    ``integrations.transformers.convert`` (it carries its feature map as a submodule)."""
    from .modules import SpectraAttention

    hf = _hf_integration()
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SpectraAttention):
            layers[name] = (mod, mod.feature_map)
        elif hf is not None and isinstance(getattr(mod, hf.FEATURE_MAP_ATTR, None), RandomFeatureMap):
            layers[name] = (mod, getattr(mod, hf.FEATURE_MAP_ATTR))
    return layers


@torch.no_grad()
def record_attention_inputs(model: nn.Module, batches, *, teacher: bool = True) -> dict:
    """Run ``model`` on every batch and record what each attention layer receives.

    The layers: every ``SpectraAttention`` (its q, k from its own projection) and every attention module of
    a HuggingFace model converted by ``integrations.transformers.convert`` (the q, k its attention function
    receives, after rotary embeddings; k with the model's H_kv key/value heads; recorded through
    ``integrations.transformers.recording``), with their values v and the layer's window and sinks.
    ``batches``: an iterable of model inputs (a tensor, a tuple of positional arguments or a dict of
    keyword arguments). With ``teacher=True`` every layer computes
    exact softmax attention during the recording (the model it was converted from), so each layer sees
    the hidden states of the softmax model, as in attention transfer; with ``teacher=False`` the model runs
    as it is. Returns ``{layer name: [AttentionRecord, ...]}`` (one per batch).
    """
    from .reference import exact_attention

    layers = _distill_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no SpectraAttention layer (or attention layer converted by "
            "spectraformer_fused.integrations.transformers.convert) to distill"
        )
    spectra = {name: mod for name, (mod, fm) in layers.items() if fm is getattr(mod, "feature_map", None)}
    converted = {id(mod): name for name, (mod, _) in layers.items() if name not in spectra}
    records = {name: [] for name in layers}

    def make_hook(name):
        def hook(layer, args, kwargs, out):
            x = args[0] if args else kwargs["x"]
            mask = args[1] if len(args) > 1 else kwargs.get("key_padding_mask")
            q, k, v = layer.project(x)
            records[name].append(
                AttentionRecord(
                    q.detach(),
                    k.detach(),
                    mask,
                    resolve_scale(None, layer.head_dim),
                    bool(layer.causal),
                    layer.window,
                    v=v.detach(),
                    sinks=getattr(layer, "sinks", None),
                )
            )
            if teacher:
                if (len(args) > 3 and args[3]) or kwargs.get("output_final_state"):
                    raise ValueError("distill records a model run without output_final_state")
                o = exact_attention(
                    q, k, v, kernel=layer.feature_map.kernel, causal=layer.causal, key_padding_mask=mask
                ).to(v.dtype)
                return layer.out_proj(o.reshape(x.shape))
            return None

        return hook

    backends = {name: layer.backend for name, layer in spectra.items()}
    with contextlib.ExitStack() as stack:
        for name, layer in spectra.items():
            stack.callback(setattr, layer, "backend", backends[name])
            stack.enter_context(layer.register_forward_hook(make_hook(name), with_kwargs=True))
            if teacher:  # its random-feature output is replaced: the plain reference suffices
                layer.backend = "reference"
        calls = stack.enter_context(_hf_integration().recording(teacher)) if converted else []
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    hf = _hf_integration()
    for call in calls:
        records[converted[id(call.module)]].append(
            AttentionRecord(
                call.q,
                call.k,
                call.key_padding_mask,
                call.scale,
                call.causal,
                getattr(call.module, hf.WINDOW_ATTR, None),
                hf._hf_window(getattr(call.module, hf.SLIDING_ATTR, None), call.causal),
                call.v,
                getattr(call.module, hf.SINKS_ATTR, None),
            )
        )
    return records


def distill(
    model: nn.Module,
    batches,
    *,
    steps: int = 200,
    lr: float = 1e-2,
    joint: bool = False,
    teacher: bool = True,
    loss: str = "kl",
    chunk_size: int = 64,
    progress: bool = False,
    init_mix: bool = True,
    backend: str | None = "auto",
) -> dict:
    """Attention transfer: fit every attention layer's feature map to that layer's softmax attention.

    The layers are the model's ``SpectraAttention`` modules and the attention modules of a HuggingFace
    model converted by ``integrations.transformers.convert`` (grouped-query attention included: each
    feature map is fitted per key/value head). The q, k of each layer are recorded once on ``batches``
    (see ``record_attention_inputs``; with ``teacher=True`` from the softmax model the layers were
    converted from), with the layer's own scale, causality, padding mask, hybrid window and attention
    sinks (a layer with a window or sinks is fitted as the feature part of its hybrid attention, its
    exact-part factor ``log_mix`` with it when its feature map has one, and a converted sliding-window
    layer against the sliding-window attention it replaced; the sinks are ``SpectraAttention.sinks`` or
    the converted module's ``rf_sinks``). Only the feature maps' trainable parameters move; every other
    parameter of the model is left as it is, without gradients.
    ``loss="kl"`` fits the attention weights (KL from the softmax rows, as Hedgehog); ``loss="mse"`` fits
    the attention outputs: the mean squared difference of the layer's attention output (before the output
    projection) from the softmax attention's on the recorded values (LoLCATs' stage 1; Adam is
    insensitive to their x1000 scale). Both are computed ``chunk_size`` query rows at a time, never a
    T x T matrix.
    ``joint=False`` fits the layers one after another (``steps`` Adam steps each); ``joint=True`` takes
    ``steps`` steps of one optimizer on the sum of the layers' losses. Batches are used in turn.
    ``progress=True`` shows one progress bar over all the steps on stderr (tqdm when installed, else a
    plain line now and then).
    ``init_mix=True`` first sets the exact-part factor of every layer whose feature map has one (and that
    has a window or sinks) from its first recorded batch (``init_mix``: the factor by which its features
    mis-scale the keys beyond the exact set, which for hedgehog is far below 1 and would take Adam thousands
    of steps to reach from 1); False starts from the value given to ``mix=``.
    ``backend`` (``loss="mse"``): the ``rf_attention`` backend whose fused forward and backward compute
    each layer's output ("auto": compiled CPU / Triton), against the softmax output computed once per
    recorded batch; None: the chunked PyTorch loss (the same value, slower). See ``fit_feature_map``.

    Returns ``{layer name: loss curve}`` (the per-layer loss before each step).
    """
    _check_steps_lr(steps, lr)
    _check_progress(progress)
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid names are {', '.join(LOSSES)}")
    backend = _check_loss_backend(backend, loss)
    layers = {name: fm for name, (_, fm) in _distill_layers(model).items()}
    records = record_attention_inputs(model, batches, teacher=teacher)
    if loss != "mse":  # the values are not needed: free them
        records = {name: [r._replace(v=None) for r in recs] for name, recs in records.items()}
    if not any(records.values()):
        raise ValueError("batches is empty: nothing to distill on")
    unused = [name for name, recs in records.items() if not recs]
    if unused:
        raise ValueError(f"layers {unused} were not called on batches: nothing to distill them on")
    if init_mix:
        for name, fm in layers.items():
            rec = records[name][0]
            if fm.log_mix is not None and (rec.window is not None or rec.sinks):
                _init_mix_record(fm, rec)
    missing = [name for name, fm in layers.items() if not trainable_parameters(fm)]
    if missing:
        raise ValueError(
            f"layers {missing} have no trainable feature-map parameters: build them with "
            "weights='learnable' or 'fastfood_learnable', or component='hedgehog'"
        )

    targets = {}  # (layer, batch) -> the exact output (mse on a backend), computed once

    def layer_loss(name, i):
        j = i % len(records[name])
        rec = records[name][j]
        if backend is not None and (name, j) not in targets:
            targets[name, j] = output_target(
                rec.q,
                rec.k,
                rec.v,
                kernel=layers[name].kernel,
                scale=rec.scale,
                causal=rec.causal,
                key_padding_mask=rec.key_padding_mask,
                target_window=rec.target_window,
            )
        return attention_distillation_loss(
            layers[name],
            rec.q,
            rec.k,
            rec.v,
            scale=rec.scale,
            causal=rec.causal,
            key_padding_mask=rec.key_padding_mask,
            loss=loss,
            chunk_size=chunk_size,
            window=rec.window,
            target_window=rec.target_window,
            sinks=rec.sinks,
            backend=backend,
            target=targets.get((name, j)),
        )

    bar = _Progress(steps * (1 if joint else len(layers)), "distill", progress)
    try:
        if not joint:
            curves = {}
            for name, fm in layers.items():
                recs = records[name]
                curves[name] = _fit(
                    fm,
                    [r.q for r in recs],
                    [r.k for r in recs],
                    [r.v for r in recs] if loss == "mse" else None,
                    steps,
                    lr,
                    recs[0].scale,
                    recs[0].causal,
                    [r.key_padding_mask for r in recs],
                    loss,
                    chunk_size,
                    bar,
                    recs[0].window,
                    recs[0].target_window,
                    recs[0].sinks,
                    backend,
                )
            return curves
        return _distill_joint(layers, layer_loss, steps, lr, bar)
    finally:
        bar.close()


def _init_mix_record(fm: RandomFeatureMap, rec: AttentionRecord) -> None:
    init_mix(
        fm,
        rec.q,
        rec.k,
        scale=rec.scale,
        causal=rec.causal,
        key_padding_mask=rec.key_padding_mask,
        window=rec.window,
        sinks=rec.sinks,
    )


@torch.no_grad()
def init_mix(
    feature_map: RandomFeatureMap,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    sinks: int | None = None,
    rows: int = 256,
) -> torch.Tensor:
    """Start the exact-part factor g of a hybrid layer from data; returns the new ``log_mix`` ``[H_kv]``.

    In the model's row t the exact part weighs ``g sum_E exp(l_tj)`` and the feature part ``sum_R est_tj``
    (``est = phi(q).phi(k)``); in the softmax row they weigh ``sum_E exp(l)`` and ``sum_R exp(l)``. The
    shares agree when ``g = sum_R est_tj / sum_R exp(l_tj)``: the factor by which the features mis-scale the
    keys they stand for (about 1 for an unbiased map, far below 1 for hedgehog's per-row normalised
    features). ``log_mix`` is set, per key/value head, to the median of ``log g`` over up to ``rows`` query
    rows (evenly spaced, those with both exact and feature keys) of q ``[B, T, H, D]``, k ``[B, T, H_kv, D]``;
    unchanged for a head with no such row. Exact set and visibility as in ``attention_distillation_loss``.
    """
    if not isinstance(feature_map, RandomFeatureMap):
        raise TypeError(f"feature_map must be a RandomFeatureMap, got {type(feature_map).__name__}")
    if feature_map.log_mix is None:
        raise ValueError("init_mix needs a feature map built with mix= (it has no exact-part factor)")
    window, sinks = check_window(window), check_sinks(sinks)
    if window is None and not sinks:
        raise ValueError("init_mix needs a window or sinks: without an exact part the factor does nothing")
    check_qk_pair(q, k, grouped=True)
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    feature_map.check_input(D, Hk)
    scale = resolve_scale(scale, D)
    mask = _check_mask(key_padding_mask, q)
    p = feature_map.feature_params(q, k, scale=scale, causal=causal, key_padding_mask=mask, update_stats=False)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    root = math.sqrt(scale)
    idx = torch.linspace(0, T - 1, min(rows, T), device=q.device).round().long().unique()
    x = (q.to(cdt) * root).transpose(1, 2).unflatten(1, (Hk, G))[:, :, :, idx]  # [B, Hk, G, r, D]
    y = (k.to(cdt) * root).transpose(1, 2)  # [B, Hk, T, D]
    args = dict(kind=p.kind, c_t=p.c_t, c_o=p.c_o)
    W, bias, freq = p.W.to(cdt), p.bias.to(cdt), p.freq.to(cdt)
    psi = None if p.psi is None else p.psi.to(cdt)
    eq, mq = feature_logits(x.flatten(2, 3), W, bias, freq, psi, query=True, **args)  # [B, Hk, G r, F]
    ek, mk = feature_logits(y, W, bias, freq, psi, query=False, **args)  # [B, Hk, T, F]
    if mask is not None:
        ek = ek.masked_fill(~mask[:, None, :, None], float("-inf"))
    sq = eq.amax(-1, keepdim=True)
    sk = ek.amax(dim=(-1, -2), keepdim=True).clamp_min(-1e30)
    fq, fk = torch.exp(eq - sq), torch.exp(ek - sk)
    if mq is not None:
        fq, fk = fq * mq, fk * mk
    est = (fq @ fk.transpose(-1, -2)).unflatten(2, (G, len(idx)))  # [B, Hk, G, r, T], on the scale exp(sq + sk)
    log_est = torch.log(est.clamp_min(_TINY)) + sq.unflatten(2, (G, len(idx))) + sk[:, :, None]
    logits = x @ y[:, :, None].transpose(-1, -2)
    if p.exact_sq != 0.0:
        logits = logits + p.exact_sq * ((x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[:, :, None, None, :])
    t, j = idx[:, None], torch.arange(T, device=q.device)[None, :]
    visible = (j <= t) if causal else torch.ones_like(j <= t)
    visible = visible.expand(B, 1, 1, len(idx), T)
    if mask is not None:
        visible = visible & mask[:, None, None, None, :]
    exact = torch.zeros_like(t - j, dtype=torch.bool)
    if window is not None:
        exact = exact | (((t - j >= 0) & (t - j < window)) if causal else (t - j).abs() < window)
    if sinks:
        exact = exact | (j < sinks)
    rest = visible & ~exact
    lg = torch.logsumexp(log_est.masked_fill(~rest, float("-inf")), -1) - torch.logsumexp(
        logits.masked_fill(~rest, float("-inf")), -1
    )  # [B, Hk, G, r]
    ok = rest.any(-1) & (visible & exact).any(-1) & torch.isfinite(lg)
    new = feature_map.log_mix.detach().clone()
    per_head = lg.transpose(0, 1).reshape(Hk, -1)
    ok = ok.expand_as(lg).transpose(0, 1).reshape(Hk, -1)
    if feature_map.num_heads == 1:
        per_head, ok = per_head.reshape(1, -1), ok.reshape(1, -1)
    for h in range(per_head.shape[0]):
        if ok[h].any():
            new[h] = per_head[h][ok[h]].median().to(new.dtype)
    feature_map.log_mix.copy_(new)
    return new


def _distill_joint(layers, layer_loss, steps, lr, bar) -> dict:
    params = [p for fm in layers.values() for p in trainable_parameters(fm)]
    opt = torch.optim.Adam(params, lr=float(lr))
    curves = {name: [] for name in layers}
    for step in range(steps):
        values = {name: layer_loss(name, step) for name in layers}
        opt.zero_grad(set_to_none=True)
        sum(values.values()).backward()
        opt.step()
        for name, value in values.items():
            curves[name].append(float(value.detach()))
        bar.update(float(sum(values.values()).detach()))
        del values
        _trim_heap()
    opt.zero_grad(set_to_none=True)
    return curves


# ----------------------------------------------------------------------------------------------------
# Stage 2: the converted model fine-tuned to match the model it was converted from
# ----------------------------------------------------------------------------------------------------

FINETUNE_TARGETS = ("hidden", "logits")
FINETUNE_TRAIN = ("feature_maps", "attention", "lora")
# names of an attention module's output projection (o_proj in Llama-style models; BERT keeps it in the
# sibling module attention.output.dense)
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "Wo")


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the q/k/v/o projections (``nn.Linear`` modules) of every converted attention layer.

    The linear submodules of each attention module (its feature map excepted: q_proj, k_proj, v_proj and
    o_proj in Llama-style models; query, key and value in BERT), and, where the module has no output
    projection of its own, the ``output.dense`` of its parent (BERT's ``attention.output.dense``)."""
    names = []
    for name, (mod, _) in _distill_layers(model).items():
        found = [
            sub
            for sub, m in mod.named_modules()
            if sub and isinstance(m, nn.Linear) and not sub.startswith(_fm_attr(mod))
        ]
        names += [f"{name}.{sub}" for sub in found]
        if not any(sub.split(".")[-1] in _OUT_PROJ_NAMES for sub in found) and "." in name:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            dense = getattr(getattr(parent, "output", None), "dense", None)
            if isinstance(dense, nn.Linear):
                names.append(f"{name.rsplit('.', 1)[0]}.output.dense")
    return names


def _fm_attr(mod: nn.Module) -> str:
    hf = _hf_integration()
    return "feature_map" if hf is None or not hasattr(mod, hf.FEATURE_MAP_ATTR) else hf.FEATURE_MAP_ATTR


def _call(model: nn.Module, batch, target: str):
    """The model's final hidden states ``[B, T, E]`` (target "hidden") or logits ``[B, T, V]`` on one batch."""
    if isinstance(batch, dict):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "use_cache" in accepted and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # a training forward stores no cache
    if target == "hidden" and "output_hidden_states" in accepted:
        kwargs["output_hidden_states"] = True
    out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if target == "logits":
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"target='logits' needs a model whose output has logits (a causal LM); {type(model).__name__} "
                f"returned {type(out).__name__} without them: use target='hidden'"
            )
        return logits
    hidden = getattr(out, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        states = getattr(out, "hidden_states", None)
        hidden = states[-1] if states else None
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(out).__name__} without hidden states")
    return hidden


def _batch_mask(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("finetune takes a 2D attention_mask [B, T] in its batches (True or 1 = keep)")
    return mask.to(torch.bool)


def _kl_rows(s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum over the kept rows of KL(softmax(t) || softmax(s)); s, t ``[B, c, V]``, keep ``[B, c]`` float."""
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    logq = torch.log_softmax(s.to(cdt), dim=-1)
    logp = torch.log_softmax(t.to(cdt), dim=-1)
    return ((logp.exp() * (logp - logq)).sum(-1) * keep).sum()


def output_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, target: str, chunk_size=128):
    """The stage-2 loss of one batch: the mean over kept positions (``mask [B, T]`` True, or all) of the
    squared hidden-state difference averaged over the hidden size (target "hidden"), or of
    KL(teacher's next-token distribution || student's) (target "logits", computed ``chunk_size``
    positions at a time and recomputed in the backward pass, so that no more than one chunk's
    log-probabilities are held)."""
    teacher = teacher.detach().to(student.dtype)
    keep = torch.ones(student.shape[:2], dtype=student.dtype, device=student.device)
    if mask is not None:
        keep = mask.to(student.dtype)
    count = keep.sum().clamp_min(1)
    if target == "hidden":
        return ((student - teacher).pow(2).mean(-1) * keep).sum() / count
    total = student.new_zeros((), dtype=torch.float64 if student.dtype == torch.float64 else torch.float32)
    for lo in range(0, student.shape[1], chunk_size):
        part = (student[:, lo : lo + chunk_size], teacher[:, lo : lo + chunk_size], keep[:, lo : lo + chunk_size])
        if torch.is_grad_enabled() and student.requires_grad:
            total = total + _Recomputed.apply(_kl_rows, *part)
        else:
            total = total + _kl_rows(*part)
    return total / count


def _lora(model: nn.Module, names: list[str], rank: int, alpha):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("train='lora' needs peft: pip install 'spectraformer_fused[hf]'") from exc
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=names, lora_dropout=0.0, bias="none"
    )
    return get_peft_model(model, config)


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    batches,
    *,
    steps: int,
    lr: float,
    target: str = "hidden",
    train: str = "feature_maps",
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    max_grad_norm: float | None = 1.0,
    chunk_size: int = 128,
    progress: bool = False,
) -> list[float]:
    """Stage 2 of linearizing a model: train the converted ``model`` to match the unconverted ``teacher``.

    Args:
        model: a model holding converted attention layers (``integrations.transformers.convert``, or
            ``SpectraAttention`` modules), typically after attention transfer (``distill``, stage 1).
        teacher: the model it was converted from, with softmax attention (a separate copy); it runs under
            ``torch.no_grad`` and is never changed.
        batches: an iterable of model inputs, used in turn (cycled): dicts of keyword arguments (e.g.
            ``input_ids`` and ``attention_mask``; positions where ``attention_mask`` is 0 are left out of
            the loss), tuples of positional arguments or tensors. Transformers models run with
            ``use_cache=False``.
        steps, lr: AdamW steps (no weight decay) and learning rate.
        target: ``"hidden"``: the mean squared difference of the final hidden states (``last_hidden_state``,
            or the last of ``hidden_states``; encoders); ``"logits"``: KL(teacher || model) of the next-token
            distributions at every kept position (causal LMs), chunked over the sequence (``chunk_size``).
        train: what moves. ``"feature_maps"``: the trainable parameters of the feature maps only (as in
            ``distill``); ``"attention"``: those and the q/k/v/o projections of the converted layers
            (``attention_projections``); ``"lora"``: those and rank-``lora_rank`` LoRA adapters
            (``lora_alpha``, default the rank) on the projections, through ``peft`` (an optional
            dependency), merged into the projections at the end, so the model keeps its class and loads
            without ``peft``. Every other parameter stays frozen, without gradients.
        max_grad_norm: gradient-norm clipping (None: none).
        progress: show a progress bar on stderr (tqdm when installed, else a plain line now and then).

    The model runs in eval mode (no dropout; running statistics are not updated) and is left in the mode it
    was in. Its attention is random-feature attention, linear in the sequence length, and the teacher's
    forward holds no graph, so memory grows with T, not T^2 (the teacher's own attention excepted, as
    its implementation computes it). For target ``"hidden"`` the teacher's outputs are computed once per
    batch and kept; for ``"logits"`` they are recomputed at each step (``[B, T, V]`` each).

    Returns the loss before each step (``steps`` floats).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module (the unconverted model), got {type(teacher).__name__}")
    if teacher is model:
        raise ValueError("teacher must be a separate copy of the model before conversion, not the model itself")
    _check_steps_lr(steps, lr)
    _check_progress(progress)
    if not isinstance(target, str) or target not in FINETUNE_TARGETS:
        raise ValueError(f"unknown target {target!r}; valid names are {', '.join(FINETUNE_TARGETS)}")
    if not isinstance(train, str) or train not in FINETUNE_TRAIN:
        raise ValueError(f"unknown train {train!r}; valid names are {', '.join(FINETUNE_TRAIN)}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive int, got {lora_rank!r}")
    if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))):
        raise TypeError(f"lora_alpha must be a number or None, got {type(lora_alpha).__name__}")
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0
    ):
        raise ValueError(f"max_grad_norm must be a positive float or None, got {max_grad_norm!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    layers = _distill_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no converted attention layer (SpectraAttention, or a layer converted "
            "by spectraformer_fused.integrations.transformers.convert): nothing to fine-tune"
        )
    if _distill_layers(teacher):
        raise ValueError("teacher holds converted attention layers: pass the model before conversion")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: nothing to fine-tune on")
    feature_params = [p for _, fm in layers.values() for p in trainable_parameters(fm)]
    if train == "feature_maps" and not feature_params:
        raise ValueError(
            "train='feature_maps' but the feature maps have no trainable parameters: build them with "
            "weights='learnable' or 'fastfood_learnable', or component='hedgehog', or use train='attention' "
            "or 'lora'"
        )
    projections = attention_projections(model) if train != "feature_maps" else []
    if train != "feature_maps" and not projections:
        raise ValueError(f"train={train!r}: found no q/k/v/o projection (nn.Linear) in the converted layers")

    saved = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    peft_model = None
    bar = _Progress(steps, f"finetune ({train})", progress)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if train == "attention":
            for name in projections:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
        elif train == "lora":
            peft_model = _lora(model, projections, lora_rank, lora_alpha)  # injects the adapters into model
        for p in feature_params:
            p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        model.eval()
        opt = torch.optim.AdamW(params, lr=float(lr), weight_decay=0.0)
        cached = {}
        curve = []
        for step in range(steps):
            i = step % len(batches)
            batch = batches[i]
            expected = cached.get(i)
            if expected is None:
                with torch.no_grad():
                    expected = _call(teacher, batch, target).detach()
                if target == "hidden":
                    cached[i] = expected
            value = output_loss(_call(model, batch, target), expected, _batch_mask(batch), target, chunk_size)
            opt.zero_grad(set_to_none=True)
            value.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm))
            opt.step()
            curve.append(float(value.detach()))
            del value
            _trim_heap()
            bar.update(curve[-1])
        opt.zero_grad(set_to_none=True)
    finally:
        bar.close()
        if peft_model is not None:
            peft_model.merge_and_unload()
            if hasattr(model, "peft_config"):
                del model.peft_config
        for p in model.parameters():
            p.requires_grad_(saved.get(id(p), True))
            p.grad = None
        model.train(was_training)
    return curve


__all__ = [
    "LOSSES",
    "AttentionRecord",
    "attention_distillation_loss",
    "fit_feature_map",
    "FINETUNE_TARGETS",
    "FINETUNE_TRAIN",
    "attention_projections",
    "distill",
    "init_mix",
    "finetune",
    "output_loss",
    "record_attention_inputs",
    "trainable_parameters",
]
