"""The model trained on the generated tasks: Spectraformer's LRA model (2 layers, 2 heads of 32, model dim
64, FFN 128, m = 128 features) with any attention, and the attentions' names.

Attentions: ``softmax`` (exact, ``torch.nn.functional.scaled_dot_product_attention``), ``uniform`` (the
floor: every query averages the values it may see) and ``<component>:<weights>`` (``SpectraAttention``).
A suffix ``@w<W>`` gives a window of W keys (DESIGN.md section 6): ``posrf:orf@w16`` is the hybrid (exact
softmax over the 16 most recent keys, random features beyond), ``softmax@w16`` sliding-window softmax
(exact attention over those keys only, nothing beyond). The trainer is ``bench/tasks/trainer.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import spectraformer_fused as sf

from ..peers import band_mask

BASELINES = ("softmax", "uniform")
# The quick subset: exact and uniform attention and five pairs, five components, fixed, structured and
# learnable weights (gerf, the general form of posrf/oprf, is left to the full run).
QUICK_PAIRS = ("softmax", "uniform", "posrf:orf", "hyprf:sorf", "oprf:fastfood_learnable", "saderf:mm", "trigrf:orf")


def _split_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    B, T, E = t.shape
    return t.view(B, T, H, E // H).transpose(1, 2)  # [B, H, T, D]


class SoftmaxAttention(nn.Module):
    """Exact softmax attention through SDPA, with the same projections as ``SpectraAttention``;
    ``window``: sliding-window softmax, each query attends only to the keys inside its window."""

    def __init__(self, embed_dim: int, num_heads: int, causal: bool, window: int | None = None):
        super().__init__()
        self.num_heads, self.causal, self.window = num_heads, causal, window
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, key_padding_mask=None):
        B, T, E = x.shape
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        mask, causal = None, self.causal
        if self.window is not None:
            mask, causal = band_mask(T, self.window, causal, x.device), False
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, None, :]  # True = take part
            if causal:
                mask, causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), False
            mask = keep if mask is None else keep & mask
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, E))


class UniformAttention(nn.Module):
    """The floor: every query averages the values it may see (a prefix mean when causal; kept keys only)."""

    def __init__(self, embed_dim: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.v = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, key_padding_mask=None):
        v = self.v(x)
        w = torch.ones_like(x[..., :1]) if key_padding_mask is None else key_padding_mask[..., None].to(x.dtype)
        if self.causal:
            o = (v * w).cumsum(1) / w.cumsum(1).clamp_min(1.0)
        else:
            o = (v * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
            o = o.expand_as(v)
        return self.out_proj(o)


@dataclass(frozen=True)
class ModelConfig:
    """Spectraformer's LRA model: 2 layers, 2 heads of 32, model dim 64, FFN 128, m = 128. ``token_shift``
    adds a learned projection of the previous token's embedding to each token's (a causal convolution of
    width 2, the short convolution of H3 and Based): a key-value pair then sits in one token.
    ``positions=False`` drops the learned position embeddings (order then comes from the causal mask and
    the shift alone)."""

    layers: int = 2
    heads: int = 2
    dim: int = 64
    ffn: int = 128
    num_features: int = 128
    token_shift: bool = False
    positions: bool = True


def make_attention(pair: str, cfg: ModelConfig, causal: bool, seed: int, backend: str) -> nn.Module:
    base, window = split_window(pair)
    if base == "softmax":
        return SoftmaxAttention(cfg.dim, cfg.heads, causal, window)
    if base == "uniform":
        return UniformAttention(cfg.dim, causal)
    component, weights = parse_pair(base)
    return sf.SpectraAttention(
        cfg.dim,
        cfg.heads,
        num_features=cfg.num_features,
        component=component,
        weights=weights,
        causal=causal,
        seed=seed,
        backend=backend,
        **({} if window is None else {"window": window}),
    )


class Block(nn.Module):
    def __init__(self, attn: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.attn = attn
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, cfg.dim))

    def forward(self, x, key_padding_mask=None):
        x = x + self.attn(self.ln1(x), key_padding_mask=key_padding_mask)
        return x + self.ffn(self.ln2(x))


class TaskModel(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, then a pooled classifier (``causal=False``)
    or a per-position head (``causal=True``)."""

    def __init__(
        self,
        pair: str,
        vocab: int,
        num_outputs: int,
        max_len: int,
        causal: bool,
        seed: int,
        cfg: ModelConfig = ModelConfig(),
        backend: str = "auto",
    ):
        super().__init__()
        self.pair, self.causal = pair, causal
        self.embed = nn.Embedding(vocab, cfg.dim)
        self.pos = nn.Embedding(max_len, cfg.dim) if cfg.positions else None
        self.shift = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.token_shift else None
        self.blocks = nn.ModuleList(
            Block(make_attention(pair, cfg, causal, seed * 101 + i, backend), cfg) for i in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_outputs)

    def forward(self, ids, key_padding_mask=None):
        T = ids.shape[1]
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(T, device=ids.device))
        if self.shift is not None:
            x = x + self.shift(F.pad(x, (0, 0, 1, 0))[:, :-1])  # token t also sees token t - 1
        for blk in self.blocks:
            x = blk(x, key_padding_mask)
        x = self.norm(x)
        if self.causal:
            return self.head(x)  # [B, T, outputs]
        if key_padding_mask is None:
            return self.head(x.mean(1))
        w = key_padding_mask[..., None].to(x.dtype)
        return self.head((x * w).sum(1) / w.sum(1).clamp_min(1.0))  # [B, outputs]

    def feature_maps(self):
        return [b.attn.feature_map for b in self.blocks if isinstance(b.attn, sf.SpectraAttention)]

    @torch.no_grad()
    def redraw(self, seed: int) -> int:
        """Redraw every fixed W (learnable ones stay); returns how many were redrawn."""
        n = 0
        for i, fm in enumerate(self.feature_maps()):
            if not fm.weights.learnable:
                fm.redraw(seed * 7919 + i)
                n += 1
        return n


def parse_pair(pair: str) -> tuple[str, str]:
    parts = pair.split(":")
    if len(parts) != 2 or parts[0] not in sf.COMPONENTS or parts[1] not in sf.WEIGHTS:
        raise ValueError(
            f"unknown attention {pair!r}: use softmax, uniform or <component>:<weights> with a "
            f"component in {', '.join(sf.COMPONENTS)} and weights in {', '.join(sf.WEIGHTS)}"
        )
    return parts[0], parts[1]


def split_window(pair: str) -> tuple[str, int | None]:
    """``"posrf:orf@w16"`` -> ``("posrf:orf", 16)``; no suffix -> ``(pair, None)``."""
    base, sep, w = pair.partition("@w")
    if not sep:
        return pair, None
    if not w.isdigit() or int(w) < 1 or base == "uniform":
        raise ValueError(
            f"bad window in {pair!r}: use softmax@w<W> or <component>:<weights>@w<W> with W a positive int"
        )
    return base, int(w)


def is_baseline(pair: str) -> bool:
    """softmax, uniform and sliding-window softmax: no random features."""
    return split_window(pair)[0] in BASELINES


def with_window(pair: str, window: int | None) -> str:
    """``pair`` with a window of ``window`` keys when it is a random-feature pair without one."""
    return pair if window is None or is_baseline(pair) or "@w" in pair else f"{pair}@w{window}"


def resolve_pairs(spec: str, quick: bool, window: int | None = None) -> list[str]:
    """``all`` = both baselines and every component x weight pair; ``quick`` = ``QUICK_PAIRS``; ``window``
    adds ``@w<window>`` to every random-feature pair that has no window."""
    if spec == "all":
        pairs = list(BASELINES) + [f"{c}:{w}" for c in sf.COMPONENTS for w in sf.WEIGHTS]
    elif spec == "quick":
        pairs = list(QUICK_PAIRS)
    else:
        pairs = [p.strip() for p in spec.split(",") if p.strip()]
        if not pairs:
            raise ValueError("--pairs is empty")
    for p in pairs:
        base, _ = split_window(p)
        if base not in BASELINES:
            parse_pair(base)
    return [with_window(p, window) for p in pairs]
