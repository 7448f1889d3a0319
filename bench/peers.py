"""Peer implementations the report times beside the library, each an optional import.

Every peer takes q, k, v ``[B, T, H, D]`` (the library's layout) and returns ``[B, T, H, Dv]``; a peer
that cannot be used in this process is reported by ``Peer.skip_reason`` instead of raising.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import spectraformer_fused as sf
from spectraformer_fused.components import TRIG, feature_logits


@dataclass
class Peer:
    """A named implementation. ``make(fm, causal)`` returns ``fn(q, k, v) -> o`` or raises."""

    name: str
    make: Callable | None
    skip_reason: str | None = None
    exact: bool = False


# ----------------------------------------------------------------------------------------------------
# torch SDPA: exact softmax attention (FlashAttention / memory-efficient kernels on CUDA)
# ----------------------------------------------------------------------------------------------------

def sdpa_attention(q, k, v, causal: bool):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return o.transpose(1, 2)


def _make_sdpa(fm, causal):
    return lambda q, k, v: sdpa_attention(q, k, v, causal)


# ----------------------------------------------------------------------------------------------------
# performer-pytorch's FastAttention (FAVOR+ = posrf x orf)
# ----------------------------------------------------------------------------------------------------

def _make_performer(fm, causal):
    from performer_pytorch import FastAttention

    with contextlib.redirect_stdout(io.StringIO()):      # it prints a notice when its CUDA kernel is missing
        attn = FastAttention(dim_heads=fm.head_dim, nb_features=fm.num_features, causal=causal)
    attn = attn.to(fm.projection().device)
    return lambda q, k, v: attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# bench/torch_chunked.py: a pure-PyTorch chunked implementation (optional, its entry point discovered)
# ----------------------------------------------------------------------------------------------------

_CHUNKED_NAMES = ("torch_chunked_attention", "chunked_rf_attention", "chunked_attention", "chunk_rf_attention",
                  "rf_attention_chunked", "torch_chunked", "chunk_attention", "attention")


def _find_chunked():
    """Returns ``(callable, how)`` where how is "params" or "feature_map", or raises ImportError."""
    mod = importlib.import_module("bench.torch_chunked")
    names = list(_CHUNKED_NAMES) + sorted(n for n in dir(mod) if "attention" in n and not n.startswith("_"))
    for name in names:
        fn = getattr(mod, name, None)
        if not callable(fn) or inspect.isclass(fn):
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        args = list(sig.parameters)
        if len(args) < 4 or args[:3] != ["q", "k", "v"]:
            continue
        if "causal" not in sig.parameters:
            continue
        how = "feature_map" if "feature_map" in args[3] or args[3] == "fm" else "params"
        return fn, how, name
    raise ImportError("bench.torch_chunked has no function fn(q, k, v, params|feature_map, *, causal, ...)")


def _make_chunked(fm, causal):
    fn, how, _ = _find_chunked()
    scale = fm.head_dim ** -0.5

    def run(q, k, v):
        if how == "feature_map":
            out = fn(q, k, v, fm, causal=causal)
        else:
            p = fm.feature_params(q, k, scale=scale, causal=causal)
            out = fn(q, k, v, p, causal=causal)
        return out[0] if isinstance(out, tuple) else out

    return run


def _check_chunked() -> str | None:
    """None when bench.torch_chunked imports and matches the reference on a tiny input; else why not."""
    try:
        _, _, name = _find_chunked()
    except Exception as exc:                                   # absent or different: skip, say why
        return f"bench.torch_chunked unusable ({type(exc).__name__}: {exc})"
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 40, 2, 16, generator=gen) for _ in range(3))
        fm = sf.RandomFeatureMap(16, 16, num_heads=2, seed=0)
        for causal in (False, True):
            o = _make_chunked(fm, causal)(q, k, v)
            ref = sf.rf_attention(q, k, v, fm, causal=causal, backend="reference")
            err = ((o - ref).norm() / ref.norm()).item()
            if not math.isfinite(err) or err > 1e-3:
                return f"bench.torch_chunked.{name} disagrees with the reference (rel. err {err:.2e}, causal={causal})"
    except Exception as exc:
        return f"bench.torch_chunked.{name} failed on a tiny input ({type(exc).__name__}: {exc})"
    return None


# ----------------------------------------------------------------------------------------------------
# flash-linear-attention's chunk_linear_attn, fed with PyTorch features (CUDA, causal only)
# ----------------------------------------------------------------------------------------------------

def torch_features(q, k, fm, *, causal: bool, scale: float | None = None):
    """phi(q), phi(k) ``[B, T, H, F]`` in plain PyTorch, with the reference's stabilisers (queries: own
    row max; keys: one max per (batch, head)); positive components only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = fm.feature_params(q, k, scale=scale, causal=causal)
    root = math.sqrt(scale)
    x, y = (t.float().transpose(1, 2) * root for t in (q, k))
    eq, _ = feature_logits(x, p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=True)
    ek, _ = feature_logits(y, p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=False)
    phiq = torch.exp(eq - eq.amax(-1, keepdim=True).detach())
    phik = torch.exp(ek - ek.amax(dim=(-1, -2), keepdim=True).detach())
    return phiq.transpose(1, 2), phik.transpose(1, 2)


def _make_fla(fm, causal):
    if not causal:
        raise ValueError("chunk_linear_attn is causal only")
    if fm.kind == TRIG:
        raise ValueError("fla peer needs a positive component")
    from fla.ops.linear_attn import chunk_linear_attn

    layout = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}

    def run(q, k, v):
        phiq, phik = torch_features(q, k, fm, causal=True)
        dt = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float32
        out = chunk_linear_attn(phiq.to(dt), phik.to(dt), v.to(dt), scale=1.0, normalize=True, **layout)
        return out[0] if isinstance(out, tuple) else out

    return run


def _importable(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{module} not importable ({type(exc).__name__}: {exc}); pip install {module.split('.')[0].replace('_', '-')}"
    return None


def peers(device: torch.device) -> list[Peer]:
    """Every peer with the reason it is skipped in this process (None when usable)."""
    out = [Peer("torch-sdpa", _make_sdpa, None, exact=True)]
    out.append(Peer("performer-pytorch", _make_performer, _importable("performer_pytorch")))
    out.append(Peer("torch-chunked", _make_chunked, _check_chunked()))
    if device.type != "cuda":
        out.append(Peer("fla-chunk_linear_attn", _make_fla, "flash-linear-attention needs CUDA"))
    else:
        reason = _importable("fla.ops.linear_attn")
        if reason is not None:
            reason = reason.replace("pip install fla", "pip install flash-linear-attention")
        out.append(Peer("fla-chunk_linear_attn", _make_fla, reason))
    return out
