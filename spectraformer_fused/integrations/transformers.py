"""Random-feature attention inside HuggingFace transformers models.

* ``register()`` adds an attention implementation named ``"spectraformer"`` to transformers'
  ``AttentionInterface`` and a mask function of the same name to its ``AttentionMaskInterface`` (the
  attention function then receives a ``[B, kv_len]`` bool keep-mask, or None when nothing is padded).
* ``convert(model, component=..., weights=..., num_features=...)`` gives every self-attention layer its
  own ``RandomFeatureMap`` (a submodule named ``rf_feature_map``, so it is saved in the state_dict) and
  switches the model to ``"spectraformer"``.
* ``convert(..., window=W)`` makes every layer hybrid attention (DESIGN.md section 6): exact softmax over
  the last W keys, the features beyond. A sliding-window layer (Mistral's ``config.sliding_window``, or a
  ``"sliding_attention"`` entry of ``config.layer_types``) always becomes hybrid attention whose window is
  the layer's own sliding window: exact where the original attended, the features beyond.
* ``convert(..., cache=C)`` (with a window) keeps in every layer an exact cache of the C keys that have left
  the window and that the features represent worst (DESIGN.md section 9): causal layers only, an
  inference-time addition (``set_cache`` switches it on or off in a converted model).
* ``RFCache`` holds one ``RFState`` per layer for decoding (a ``WindowState`` for a layer with a window:
  the last W - 1 keys and values besides; a ``CacheState`` with a cache): its ``update`` stores no growing keys or values, so the
  memory of a decoding model does not grow with the generated length. ``generate()`` of a converted model
  uses one by default; ``decode_step`` runs one forward step with it.
* ``recording()`` collects what the attention function of each converted layer receives (and can make it
  compute exact softmax attention meanwhile): attention transfer (``spectraformer_fused.distill``) uses it.

Queries see the keys of their own layer only: key/value heads (H_kv) go to ``rf_attention`` as they are
(grouped-query attention is never expanded), and each feature map is built for H_kv heads.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import types
from typing import NamedTuple

import torch
from torch import nn

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
    )
    from transformers.modeling_utils import AttentionInterface, PreTrainedModel
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "spectraformer_fused.integrations.transformers needs transformers>=5.0: pip install 'spectraformer_fused[hf]'"
    ) from exc

from ..attention import BACKENDS, rf_attention
from ..feature_map import RandomFeatureMap
from ..reference import exact_attention
from ..state import CacheState, RFState, WindowState
from ..validation import check_cache, check_cache_score, check_sinks, check_window, resolve_scale

NAME = "spectraformer"
FEATURE_MAP_ATTR = "rf_feature_map"
BACKEND_ATTR = "rf_backend"
# The layer's hybrid window (None: random features only) and the sliding window the layer had in the
# original model (None: full attention), both set by convert.
WINDOW_ATTR = "rf_window"
SINKS_ATTR = "rf_sinks"
CACHE_ATTR = "rf_cache"
CACHE_SCORE_ATTR = "rf_cache_score"
SLIDING_ATTR = "rf_sliding_window"

# Keyword arguments some models pass to their attention function for features random-feature attention
# does not have (attention sinks, logit soft-capping, additive position biases).
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


# -- the per-layer state of decoding ----------------------------------------------------------------
# RFCacheLayer.update hands the new keys back unchanged and leaves (layer, keys) here; the attention
# function of the same layer, called next on this thread with those very keys, takes the layer and reads
# and writes its state. The identity check ties the two calls together without any model-specific hook.
_PENDING = threading.local()


class RFCacheLayer(CacheLayerMixin):
    """One decoder layer's random-feature state: ``state`` (an ``RFState`` with ``S [B, H_kv, F, Dv]``,
    ``z [B, H_kv, F]``, ``log_scale [B, H_kv]``; a ``WindowState`` for a layer with a window, which adds
    the last W - 1 keys and values; None before the first token) and ``seen``, the number of positions
    processed (padding included, as in the attention mask). No growing key or value store is kept."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: RFState | WindowState | CacheState | None = None
        self.seen = 0
        self.layer_idx: int | None = None
        self._awaiting = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._awaiting:
            raise ValueError(
                f"RFCache layer {self.layer_idx}: the previous keys handed out by the cache never reached the "
                "'spectraformer' attention function. The model must use attn_implementation='spectraformer' "
                "(see convert) and pass the keys returned by cache.update unchanged to its attention function."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self._awaiting = True
        _PENDING.value = (self, key_states)
        return key_states, value_states

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # transformers >= 5.x passes the query length, earlier 5.x the cache positions of the queries.
        return self.seen + (query if isinstance(query, int) else query.shape[0]), 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.x renamed it

    def reset(self) -> None:
        self.state, self.seen, self._awaiting = None, 0, False

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = type(self.state)(*(fn(t) for t in self.state))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "an RFCache cannot remove tokens: the random-feature state is a sum over all of them "
                "(assisted generation and other rollbacks are not supported)"
            )

    def offload(self) -> None:
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_state(lambda t: t.to(self.device, non_blocking=True))


class RFCache(Cache):
    """A transformers ``Cache`` that holds one ``RFState`` (``WindowState`` for a layer with a window) per
    layer instead of growing keys and values.

    Pass it as the model's cache (``model(ids, cache=cache)``, ``past_key_values=`` in older transformers)
    or let ``generate()`` of a converted model create one. Layers are created on first use.
    """

    def __init__(self):
        super().__init__(layer_class_to_replicate=RFCacheLayer)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(RFCacheLayer())
        self.layers[layer_idx].layer_idx = layer_idx
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    @property
    def states(self) -> list[RFState | WindowState | CacheState | None]:
        """The state of every layer (None for a layer that has seen no token yet)."""
        return [layer.state for layer in self.layers]


def _take_pending(key: torch.Tensor) -> RFCacheLayer | None:
    pending = getattr(_PENDING, "value", None)
    if pending is None or pending[1] is not key:
        return None
    _PENDING.value = None
    layer = pending[0]
    layer._awaiting = False
    return layer


# -- recording the attention inputs (attention transfer) ---------------------------------------------
# While ``recording()`` is active on a thread, the attention function of every converted layer appends
# what it receives to the recorder, and in teacher mode returns exact softmax attention instead of
# random-feature attention. spectraformer_fused.fitting.distill uses it; nothing in transformers is patched.
_RECORDER = threading.local()


class AttentionCall(NamedTuple):
    """One call of the attention function: ``q [B, T, H, D]``, ``k [B, T, H_kv, D]`` and ``v [B, T, H_kv, Dv]``
    as it received them (after rotary embeddings, detached), the ``[B, T]`` bool keep-mask (None when nothing
    is padded), the resolved ``scale`` and ``causal``."""

    module: nn.Module
    q: torch.Tensor
    k: torch.Tensor
    key_padding_mask: torch.Tensor | None
    scale: float
    causal: bool
    v: torch.Tensor | None = None


@contextlib.contextmanager
def recording(teacher: bool = True):
    """Record every call of the ``"spectraformer"`` attention function on this thread; yields the list of
    ``AttentionCall`` it fills, in call order.

    With ``teacher=True`` each call returns exact attention with the layer's feature-map kernel (softmax
    attention for ``kernel="softmax"``: causality, padding, the sliding window of a sliding-window layer
    and the grouped-query mapping, query head h reading key/value head ``h // (H / H_kv)``, as in SDPA), so
    every layer sees the hidden states of the model before conversion. A teacher run cannot continue from an ``RFCache``. Not reentrant."""
    if getattr(_RECORDER, "value", None) is not None:
        raise ValueError("recording() is already active on this thread (it does not nest)")
    calls: list[AttentionCall] = []
    _RECORDER.value = (calls, bool(teacher))
    try:
        yield calls
    finally:
        _RECORDER.value = None


# -- the attention and mask functions ----------------------------------------------------------------
def _key_padding_mask(attention_mask, batch: int, length: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        )
        raise ValueError(
            f"attn_implementation='{NAME}' takes a 2D padding mask [B, T] (True or 1 = keep), got "
            f"{shape}; custom 4D masks cannot be expressed by random-feature attention"
        )
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(
            f"the padding mask has shape {tuple(attention_mask.shape)}, but the attention has batch "
            f"{batch} and {length} keys"
        )
    mask = attention_mask[:, attention_mask.shape[1] - length :].to(torch.bool)
    return None if bool(mask.all()) else mask


def spectraformer_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
):
    """The function registered as ``"spectraformer"``: ``query [B, H, T, D]``, ``key [B, H_kv, T, D]``,
    ``value [B, H_kv, T, Dv]`` -> ``([B, T, H, Dv], None)`` through ``rf_attention`` with the module's
    feature map and window. Attention dropout is not applied (random-feature attention forms no attention
    matrix); no attention weights are returned."""
    feature_map = getattr(module, FEATURE_MAP_ATTR, None)
    if not isinstance(feature_map, RandomFeatureMap):
        raise ValueError(
            f"{type(module).__name__} has no random feature map: call "
            f"spectraformer_fused.integrations.transformers.convert(model, ...) before using "
            f"attn_implementation='{NAME}'"
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{type(module).__name__} passes {name}=..., which random-feature attention does not support"
            )
    sliding = kwargs.get("sliding_window")
    if sliding is not None and sliding != getattr(module, SLIDING_ATTR, None):
        raise ValueError(
            f"{type(module).__name__} passes sliding_window={sliding}, but it was converted as a layer with "
            f"sliding window {getattr(module, SLIDING_ATTR, None)}: convert the model again"
        )
    window = getattr(module, WINDOW_ATTR, None)
    sinks = getattr(module, SINKS_ATTR, None)
    cache = getattr(module, CACHE_ATTR, None)
    cache_score = getattr(module, CACHE_SCORE_ATTR, None) if cache else None
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    layer = _take_pending(key)
    if Tk != Tq:
        raise ValueError(
            f"{type(module).__name__} received {Tk} keys for {Tq} queries: the keys come from a cache that stores "
            "them (such as DynamicCache). Decode with spectraformer_fused.integrations.transformers.RFCache "
            "(generate() of a converted model uses one), or run with use_cache=False"
        )
    state = None if layer is None else layer.state
    if state is not None and not causal:
        raise ValueError(
            "non-causal random-feature attention cannot continue from a cache: every query would have "
            "to see the keys that come after it"
        )
    kpm = _key_padding_mask(attention_mask, B, Tk)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    recorder = getattr(_RECORDER, "value", None)
    if recorder is not None:
        calls, teacher = recorder
        scale = resolve_scale(scaling, q.shape[-1])
        calls.append(AttentionCall(module, q.detach(), k.detach(), kpm, scale, causal, v.detach()))
        if teacher:
            if layer is not None:
                raise ValueError(
                    "a teacher recording runs the softmax model, which cannot continue from an RFCache: "
                    "record with use_cache=False or without a cache"
                )
            o = exact_attention(
                q,
                k,
                v,
                kernel=feature_map.kernel,
                causal=causal,
                scale=scale,
                key_padding_mask=kpm,
                window=_hf_window(getattr(module, SLIDING_ATTR, None), causal),
            )
            return o.to(v.dtype), None
    backend = getattr(module, BACKEND_ATTR, "auto")
    if layer is None:
        o = rf_attention(
            q,
            k,
            v,
            feature_map,
            causal=causal,
            scale=scaling,
            key_padding_mask=kpm,
            backend=backend,
            window=window,
            sinks=sinks,
            cache=cache,
            cache_score=cache_score,
        )
    else:
        o, layer.state = rf_attention(
            q,
            k,
            v,
            feature_map,
            causal=causal,
            scale=scaling,
            key_padding_mask=kpm,
            initial_state=state,
            output_final_state=True,
            backend=backend,
            window=window,
            sinks=sinks,
            cache=cache,
            cache_score=cache_score,
        )
    return o, None


def _hf_window(sliding_window: int | None, causal: bool) -> int | None:
    """The window W (DESIGN.md section 6) of a transformers sliding window: causal, key j within
    ``t - sliding_window < j <= t`` (W = sliding_window); bidirectional, ``|t - j| <= sliding_window``
    (W = sliding_window + 1)."""
    if sliding_window is None:
        return None
    return sliding_window if causal else sliding_window + 1


def _is_sliding_pattern(mask_function, size) -> bool:
    """Whether ``mask_function`` (a transformers index-based mask function) is the causal or the
    bidirectional sliding window of ``size``, checked on the index pairs that tell a window from causal,
    chunked or blockwise attention (below, at and past both edges of the window)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return False
    qs = torch.tensor([0, 1, size - 1, size, size + 1, 2 * size + 1, 3 * size + 2])
    ds = torch.tensor([-size - 1, -size, -size + 1, -1, 0, 1, size - 1, size, size + 1])
    q_idx, d = (t.flatten() for t in torch.meshgrid(qs, ds, indexing="ij"))
    kv_idx = q_idx + d
    q_idx, d, kv_idx = q_idx[kv_idx >= 0], d[kv_idx >= 0], kv_idx[kv_idx >= 0]
    zero = torch.zeros_like(q_idx)
    try:
        got = torch.as_tensor(mask_function(zero, zero, q_idx, kv_idx)).expand_as(q_idx)
    except Exception:  # a pattern that cannot be probed elementwise is not one of these two
        return False
    return bool(torch.equal(got, (d <= 0) & (d > -size)) or torch.equal(got, d.abs() <= size))


def spectraformer_mask(
    *, kv_length: int, mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs
):
    """The mask function registered as ``"spectraformer"``: the ``[B, kv_length]`` bool keep-mask, or None
    when nothing is padded. Causality comes from the module (``is_causal``), not from the mask, and so does
    a sliding window (the layer's window, set by ``convert``): the causal and bidirectional sliding-window
    patterns are accepted. The other arguments transformers passes (batch size, query length or cache
    position, offsets, dtype) are unused."""
    if (
        mask_function is not causal_mask_function
        and mask_function is not bidirectional_mask_function
        and not _is_sliding_pattern(mask_function, kwargs.get("local_size"))
    ):
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        raise ValueError(
            f"attn_implementation='{NAME}' supports full causal or bidirectional attention and sliding "
            f"windows, with a padding mask; this model asks for another pattern ({name}: chunked or "
            "blockwise attention, or packed sequences)"
        )
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def register() -> None:
    """Register ``"spectraformer"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, spectraformer_attention_forward)
    AttentionMaskInterface.register(NAME, spectraformer_mask)


# -- converting a model -------------------------------------------------------------------------------
def _attention_layers(model: nn.Module) -> list[nn.Module]:
    # Self-attention modules of the AttentionInterface kind: they carry their config, their layer index and
    # the scaling they pass to the attention function. Cross-attention is refused (its keys come from
    # another sequence).
    found = []
    for name, module in model.named_modules():
        if not (hasattr(module, "layer_idx") and hasattr(module, "config") and hasattr(module, "scaling")):
            continue
        if "crossattention" in type(module).__name__.lower() or getattr(module, "is_cross_attention", False):
            raise ValueError(
                f"{name} ({type(module).__name__}) is a cross-attention layer, which the "
                f"'{NAME}' implementation does not support"
            )
        found.append(module)
    return found


def _head_sizes(module: nn.Module) -> tuple[int, int]:
    config = module.config
    num_heads = getattr(config, "num_attention_heads", None)
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or getattr(config, "head_dim", None)
    )
    if head_dim is None and num_heads:
        head_dim = config.hidden_size // num_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if not isinstance(head_dim, int) or not isinstance(num_kv_heads, int):
        raise ValueError(f"cannot read the head dim and key/value heads of {type(module).__name__} from its config")
    return head_dim, num_kv_heads


def _sliding_window(module: nn.Module) -> int | None:
    """The sliding window of an attention layer of the original model, None for full attention: the
    module's own ``sliding_window`` (Qwen2, Gemma 2...), else its entry of ``config.layer_types``, else
    ``config.sliding_window`` (Mistral: every layer)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = module.config
    types_ = getattr(config, "layer_types", None)
    if types_ is not None and module.layer_idx is not None and module.layer_idx < len(types_):
        return config.sliding_window if types_[module.layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _model_cache_kwarg(model: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_with_rf_cache(model: PreTrainedModel) -> None:
    # Without a cache given, generate() (or the model's forward) builds a DynamicCache; a converted model is
    # handed an RFCache instead, as if the caller had passed one.
    original = getattr(type(model), "_prepare_cache_for_generation", None)
    if original is None or getattr(model, "_rf_cache_hook", False):
        return
    key = _model_cache_kwarg(model)

    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        if (
            model_kwargs.get(key) is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            model_kwargs[key] = RFCache()
        return original(self, generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(prepare, model)
    model._rf_cache_hook = True


def convert(
    model: PreTrainedModel,
    *,
    component: str,
    weights: str,
    num_features: int,
    kernel: str = "softmax",
    seed: int | None = None,
    backend: str = "auto",
    weight_args: dict | None = None,
    window: int | None = None,
    sinks: int | None = None,
    mix: bool | float | None = None,
    cache: int | None = None,
    cache_score: str | None = None,
    **component_args,
) -> PreTrainedModel:
    """Switch a transformers model to random-feature attention, in place; returns the model.

    Every self-attention layer gets its own ``RandomFeatureMap(head_dim, num_features, component=...,
    weights=..., kernel=..., num_heads=H_kv)`` as the submodule ``rf_feature_map`` (saved in the
    state_dict; layer i uses ``seed + i`` when ``seed`` is given), and the model's attention implementation
    becomes ``"spectraformer"`` (``register()`` is called). ``backend`` is passed to ``rf_attention``.

    ``window`` (None: random features only) makes every full-attention layer hybrid attention with that
    window (DESIGN.md section 6). A sliding-window layer of the original model (``config.sliding_window``
    as in Mistral, or ``"sliding_attention"`` in ``config.layer_types``) becomes hybrid attention whose
    window is its own sliding window, whatever ``window`` is: exact softmax where the original attended,
    the features beyond. The layer's window is its attribute ``rf_window``.

    ``sinks`` (None: none) keeps the first S positions of every sequence exact in every converted layer, with
    or without a window (attention sinks, DESIGN.md section 8); the layer's attribute ``rf_sinks``. The
    positions are those of the attention mask: with left padding the first S positions are padding, so pad
    on the right (or not at all) where the sinks matter. ``mix`` gives every feature map the learned factor
    on its exact part (``RandomFeatureMap(mix=)``: True starts at 1, a float at that value; LoLCATs starts at
    0.1), saved in the state_dict.

    ``cache`` (None: none) gives every layer an exact cache of C keys (DESIGN.md section 9): of the keys that
    leave a layer's window, the C whose own weight the features estimate worst (``cache.key_scores``)
    stay exact, per sequence and key/value head; the others are folded into the features. Causal layers with
    a window only (``window``, or the layer's sliding window); the layer's attribute ``rf_cache``. The cache
    is meant for inference (its decisions are not differentiable): ``set_cache(model, C)`` switches it on a
    model converted without one. ``cache_score`` chooses the keys it keeps (``rf_attention``'s; None: the
    default score); the layer's attribute ``rf_cache_score``.

    Supported: models whose attention goes through transformers' ``AttentionInterface`` with full or
    sliding-window causal (decoders) or bidirectional (encoders) attention and a 2D padding mask.
    Chunked and cross-attention layers, learned sink logits (``s_aux``) and soft-capping raise a ValueError.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"convert expects a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid names are {', '.join(BACKENDS)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    window = check_window(window)
    sinks = check_sinks(sinks) or None
    cache = check_cache(cache) or None
    cache_score = check_cache_score(cache_score, cache or 0)
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no attention layer that uses transformers' AttentionInterface "
            "(modules with layer_idx, config and scaling)"
        )
    register()
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation to '{NAME}': its "
            "attention layers do not dispatch through transformers' AttentionInterface"
        )
    for module in layers:
        head_dim, num_kv_heads = _head_sizes(module)
        param = next(module.parameters(), None)
        layer_seed = None if seed is None else seed + int(module.layer_idx or 0)
        fm = RandomFeatureMap(
            head_dim,
            num_features,
            component=component,
            weights=weights,
            kernel=kernel,
            num_heads=num_kv_heads,
            seed=layer_seed,
            device=None if param is None else param.device,
            weight_args=weight_args,
            mix=mix,
            **component_args,
        )
        setattr(module, FEATURE_MAP_ATTR, fm)
        setattr(module, SINKS_ATTR, sinks)
        setattr(module, BACKEND_ATTR, backend)
        sliding = _sliding_window(module)
        setattr(module, SLIDING_ATTR, sliding)
        layer_window = _hf_window(sliding, bool(getattr(module, "is_causal", True)))
        setattr(module, WINDOW_ATTR, window if layer_window is None else layer_window)
    set_cache(model, cache, score=cache_score)
    _decode_with_rf_cache(model)
    return model


def set_cache(model: nn.Module, cache: int | None, score: str | None = None) -> nn.Module:
    """Give every converted layer of ``model`` an exact cache of ``cache`` keys (None or 0: none), in place;
    returns the model. Each layer must be causal and have a window (``convert(window=)`` or its sliding
    window): the cache holds keys that have left it (DESIGN.md section 9). ``score``: which keys it keeps
    (``rf_attention``'s ``cache_score``; None: the default score)."""
    cache = check_cache(cache) or None
    score = check_cache_score(score, cache or 0)
    layers = [m for m in model.modules() if hasattr(m, FEATURE_MAP_ATTR)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no converted attention layer: call convert first")
    if cache:
        for module in layers:
            if not bool(getattr(module, "is_causal", True)):
                raise ValueError(
                    f"cache={cache} needs causal attention, but {type(module).__name__} (layer "
                    f"{module.layer_idx}) is bidirectional"
                )
            if not getattr(module, WINDOW_ATTR, None):
                raise ValueError(
                    f"cache={cache} needs a window: layer {module.layer_idx} has none (pass convert(window=W); the "
                    "cache holds the keys that leave the window)"
                )
    for module in layers:
        setattr(module, CACHE_ATTR, cache)
        setattr(module, CACHE_SCORE_ATTR, score)
    return model


@torch.no_grad()
def decode_step(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: RFCache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One forward step of a converted causal LM with its RFCache: ``input_ids [B, T]`` (the prompt for
    the first call, one token per sequence afterwards) -> logits of the last position ``[B, vocab]``.
    ``attention_mask``, when given, covers every position seen so far ``[B, cache.get_seq_length() + T]``."""
    if not isinstance(cache, RFCache):
        raise TypeError(f"cache must be an RFCache, got {type(cache).__name__}")
    kwargs = {_model_cache_kwarg(model): cache, "use_cache": True}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return model(input_ids=input_ids, **kwargs).logits[:, -1]


__all__ = [
    "NAME",
    "AttentionCall",
    "RFCache",
    "RFCacheLayer",
    "convert",
    "decode_step",
    "recording",
    "register",
    "set_cache",
    "spectraformer_attention_forward",
    "spectraformer_mask",
]
