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
  own softmax attention.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from .components import feature_logits
from .feature_map import RandomFeatureMap
from .reference import exact_logits
from .validation import check_qk_pair, resolve_scale

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


def _chunk_loss(eq, ek, kshift, logits, vis, v, kind_loss: str, mult_q, mult_k):
    """Loss terms of one query chunk, summed over its rows; the G query heads of a key/value head in dim 2.

    eq ``[B, H_kv, G, c, F]`` query exponents, ek ``[B, H_kv, 1, n, F]`` key exponents of the n visible keys,
    kshift ``[B, H_kv, 1, 1, 1]`` their shared stabiliser, logits ``[B, H_kv, G, c, n]`` the exact logits, vis
    ``[B|1, 1, 1, c, n]`` bool (visible pairs) or None, v ``[B, H_kv, 1, n, Dv]`` (mse) or None. Returns the
    sum of the row losses.
    """
    phiq = torch.exp(eq - eq.amax(-1, keepdim=True).detach())
    phik = torch.exp(ek - kshift)
    if mult_q is not None:
        phiq, phik = phiq * mult_q, phik * mult_k
    scores = phiq @ phik.transpose(-1, -2)  # [B, H_kv, G, c, n]
    if vis is not None:
        scores = scores.masked_fill(~vis, 0.0)
        logits = logits.masked_fill(~vis, float("-inf"))
    rows = torch.isfinite(logits.amax(-1))  # [B, H_kv, G, c]: a visible key
    logp = torch.log_softmax(logits, dim=-1).masked_fill(~rows[..., None], float("-inf"))
    p = logp.exp()  # 0 where masked
    if kind_loss == "kl":
        den = scores.sum(-1, keepdim=True)
        logq = torch.log(scores.clamp_min(_TINY)) - torch.log(den.clamp_min(_TINY))
        terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))  # KL(p || q) per pair
        per_row = terms.sum(-1)
    else:
        den = scores.sum(-1, keepdim=True).abs().clamp_min(_TINY)
        diff = (scores @ v) / den - p @ v  # [B, H_kv, G, c, Dv]
        per_row = diff.pow(2).mean(-1)
    return torch.where(rows, per_row, torch.zeros_like(per_row)).sum()


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
    """
    if not isinstance(feature_map, RandomFeatureMap):
        raise TypeError(f"feature_map must be a RandomFeatureMap, got {type(feature_map).__name__}")
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
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[:3] != k.shape[:3]:
            raise ValueError(
                "loss='mse' needs v [B, T, H_kv, Dv] matching k in batch, length and heads; got "
                f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
            )
    mask = _check_mask(key_padding_mask, q)
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    feature_map.check_input(D, Hk)
    scale = resolve_scale(scale, D)
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

        def run(W, bias, ek, mult_k, xc=x[:, :, :, lo:hi], qc=qt[:, :, :, lo:hi], n=n, vis=vis, kshift=kshift):
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
            )

        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (W, bias, ek, mult_k)):
            total = total + _Recomputed.apply(run, W, bias, ek, mult_k)
        else:
            total = total + run(W, bias, ek, mult_k)
        count += (hi - lo) * B * H if vis is None else H * int(vis.expand(B, 1, 1, hi - lo, n).any(-1).sum())
    return total / max(count, 1)


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
    """The parameters a fit moves: learnable weights (``learnable``: W; ``fastfood_learnable``: B, G, S)
    and a learned component's log-weights (``hedgehog``), i.e. every parameter that requires grad."""
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

    Returns the loss before each step (``steps`` floats).
    """
    if not isinstance(feature_map, RandomFeatureMap):
        raise TypeError(f"feature_map must be a RandomFeatureMap, got {type(feature_map).__name__}")
    _check_steps_lr(steps, lr)
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
    opt = torch.optim.Adam(params, lr=float(lr))
    curve = []
    for step in range(steps):
        i = step % len(qs)
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
        )
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        curve.append(float(value.detach()))
    opt.zero_grad(set_to_none=True)
    return curve


# ----------------------------------------------------------------------------------------------------
# Attention transfer: every attention layer of a model fitted to its own softmax attention
# ----------------------------------------------------------------------------------------------------


class AttentionRecord(NamedTuple):
    """What one attention layer received on one batch: ``q [B, T, H, D]``, ``k [B, T, H_kv, D]`` (detached),
    the ``[B, T]`` bool keep-mask or None, the scale of its logits and whether it is causal."""

    q: torch.Tensor
    k: torch.Tensor
    key_padding_mask: torch.Tensor | None
    scale: float
    causal: bool


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
    ``integrations.transformers.recording``). ``batches``: an iterable of model inputs (a tensor, a tuple
    of positional arguments or a dict of keyword arguments). With ``teacher=True`` every layer computes
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
                AttentionRecord(q.detach(), k.detach(), mask, resolve_scale(None, layer.head_dim), bool(layer.causal))
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
    for call in calls:
        records[converted[id(call.module)]].append(
            AttentionRecord(call.q, call.k, call.key_padding_mask, call.scale, call.causal)
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
) -> dict:
    """Attention transfer: fit every attention layer's feature map to that layer's softmax attention.

    The layers are the model's ``SpectraAttention`` modules and the attention modules of a HuggingFace
    model converted by ``integrations.transformers.convert`` (grouped-query attention included: each
    feature map is fitted per key/value head). The q, k of each layer are recorded once on ``batches``
    (see ``record_attention_inputs``; with ``teacher=True`` from the softmax model the layers were
    converted from), with the layer's own scale, causality and padding mask. Only the feature maps'
    trainable parameters move; every other parameter of the model is left as it is, without gradients.
    ``joint=False`` fits the layers one after another (``steps`` Adam steps each); ``joint=True`` takes
    ``steps`` steps of one optimizer on the sum of the layers' losses. Batches are used in turn.

    Returns ``{layer name: loss curve}`` (the per-layer loss before each step).
    """
    _check_steps_lr(steps, lr)
    layers = {name: fm for name, (_, fm) in _distill_layers(model).items()}
    records = record_attention_inputs(model, batches, teacher=teacher)
    if not any(records.values()):
        raise ValueError("batches is empty: nothing to distill on")
    unused = [name for name, recs in records.items() if not recs]
    if unused:
        raise ValueError(f"layers {unused} were not called on batches: nothing to distill them on")
    missing = [name for name, fm in layers.items() if not trainable_parameters(fm)]
    if missing:
        raise ValueError(
            f"layers {missing} have no trainable feature-map parameters: build them with "
            "weights='learnable' or 'fastfood_learnable', or component='hedgehog'"
        )

    def layer_loss(name, i):
        rec = records[name][i % len(records[name])]
        return attention_distillation_loss(
            layers[name],
            rec.q,
            rec.k,
            scale=rec.scale,
            causal=rec.causal,
            key_padding_mask=rec.key_padding_mask,
            loss=loss,
            chunk_size=chunk_size,
        )

    if not joint:
        curves = {}
        for name, fm in layers.items():
            recs = records[name]
            curves[name] = fit_feature_map(
                fm,
                [r.q for r in recs],
                [r.k for r in recs],
                steps=steps,
                lr=lr,
                scale=recs[0].scale,
                causal=recs[0].causal,
                key_padding_mask=[r.key_padding_mask for r in recs],
                loss=loss,
                chunk_size=chunk_size,
            )
        return curves
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
    opt.zero_grad(set_to_none=True)
    return curves


__all__ = [
    "LOSSES",
    "AttentionRecord",
    "attention_distillation_loss",
    "fit_feature_map",
    "distill",
    "record_attention_inputs",
    "trainable_parameters",
]
