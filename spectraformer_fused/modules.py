"""nn.Modules: they own parameters, buffers and defaults, and call the functional API."""

from __future__ import annotations

import torch
from torch import nn

from .attention import rf_attention
from .feature_map import RandomFeatureMap
from .validation import check_cache, check_cache_score, check_cache_setting, check_sinks, check_window, hybrid_window


class SpectraAttention(nn.Module):
    """Multi-head self-attention with random-feature attention inside: a drop-in for ``[B, T, E]`` inputs.

    ``forward(x, key_padding_mask=None, initial_state=None, output_final_state=False)`` returns
    ``[B, T, E]`` (and the state when asked). The feature map has one W per key/value head.

    ``num_kv_heads`` (default ``num_heads``) gives grouped-query attention: keys and values have
    ``num_kv_heads`` heads (dividing ``num_heads``), each shared by ``num_heads / num_kv_heads`` query
    heads, and the state is ``[B, num_kv_heads, F, head_dim]``.

    Incremental decoding (causal layers): pass the state of the tokens so far as ``initial_state`` and
    ask for the new one with ``output_final_state=True``; the state has a fixed size, whatever the
    length::

        y, state = layer(prompt, output_final_state=True)
        for _ in range(n):
            y, state = layer(x_next, initial_state=state, output_final_state=True)   # x_next [B, 1, E]

    Token by token this gives the outputs of one pass over the whole sequence.

    ``window=W`` makes it hybrid attention (DESIGN.md section 6): exact softmax over the last W keys
    (causal; |t - j| < W non-causal), the features beyond. The state is then a ``WindowState`` holding
    the last W - 1 keys and values besides S and z, still of fixed size, and decodes as above. ``sinks=S``
    keeps the first S keys of each sequence exact too (attention sinks, DESIGN.md section 8; with or without a
    window), and ``mix`` gives the feature map a learned factor on the exact part (``RandomFeatureMap(mix=)``).
    ``cache=C`` (causal, with a window) keeps up to C of the keys that have left the window exact, those the
    features represent worst (DESIGN.md section 9); the state is then a ``CacheState``, still of fixed size.
    ``cache_score`` chooses which keys the cache keeps (``rf_attention``'s ``cache_score``).
    OPRF/SADERF use their
    running statistics in causal attention, and a layer in training mode updates them on every call:
    decode in eval mode (``layer.eval()``) so that every step uses the same parameters.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        num_features: int | None = None,
        component: str = "posrf",
        weights: str = "orf",
        kernel: str = "softmax",
        causal: bool = False,
        bias: bool = True,
        seed: int | None = None,
        backend: str = "auto",
        window: int | None = None,
        sinks: int | None = None,
        mix: bool | float | None = None,
        cache: int | None = None,
        cache_score: str | None = None,
        device=None,
        dtype=None,
        **component_args,
    ):
        super().__init__()
        self.window = check_window(window)
        self.sinks = check_sinks(sinks) or None
        self.cache = check_cache(cache) or None
        self.cache_score = check_cache_score(cache_score, self.cache or 0)
        check_cache_setting(self.cache or 0, hybrid_window(self.window, self.sinks or 0), bool(causal))
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.num_kv_heads = num_kv_heads
        self.causal, self.backend = bool(causal), backend
        factory = {"device": device, "dtype": dtype}
        # [q | k | v]: E + 2 * num_kv_heads * head_dim outputs (3 E without grouping)
        self.qkv = nn.Linear(embed_dim, embed_dim + 2 * num_kv_heads * self.head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.feature_map = RandomFeatureMap(
            self.head_dim,
            num_features,
            component=component,
            weights=weights,
            kernel=kernel,
            num_heads=num_kv_heads,
            seed=seed,
            device=device,
            mix=mix,
            **component_args,
        )

    def project(self, x: torch.Tensor):
        """q ``[B, T, H, Dh]``, k and v ``[B, T, H_kv, Dh]`` of the input x ``[B, T, E]``."""
        kv = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((self.embed_dim, kv, kv), dim=-1)
        return (
            q.unflatten(-1, (self.num_heads, self.head_dim)),
            k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
            v.unflatten(-1, (self.num_kv_heads, self.head_dim)),
        )

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        initial_state=None,
        output_final_state: bool = False,
    ):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SpectraAttention expects x of shape [B, T, {self.embed_dim}], got {shape}")
        B, T, _ = x.shape
        q, k, v = self.project(x)
        out = rf_attention(
            q,
            k,
            v,
            self.feature_map,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            backend=self.backend,
            window=self.window,
            sinks=self.sinks,
            cache=self.cache,
            cache_score=self.cache_score,
        )
        o, state = out if output_final_state else (out, None)
        y = self.out_proj(o.reshape(B, T, self.embed_dim))
        return (y, state) if output_final_state else y
