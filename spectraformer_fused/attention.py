"""rf_attention: validate once, resolve the feature map's parameters, dispatch to a backend."""

from __future__ import annotations

import torch

from .contract import NORM_HYP
from .feature_map import RandomFeatureMap
from .ops import cpu_extension_built, cpu_extension_loaded, triton_importable, triton_interpreting
from .reference import reference_attention
from .state import empty_state, empty_window_state
from .validation import (
    check_attention_inputs,
    check_cache,
    check_cache_score,
    check_cache_setting,
    check_cu_seqlens,
    check_sinks,
    check_window,
    hybrid_window,
    resolve_scale,
)

BACKENDS = ("auto", "reference", "triton", "cpu")
# The backends whose attention function takes ``window=`` (hybrid attention, DESIGN.md section 6). A window
# call on "auto" falls back to the reference when the backend it would choose is not here; an explicit
# backend that is not here raises.
WINDOW_BACKENDS = {"reference", "cpu", "triton"}
# The backends with attention sinks (``sinks=``, DESIGN.md section 8), and those that apply a feature map's
# learned exact-part factor (``mix``); the same fallback rule.
SINK_BACKENDS = {"reference", "cpu", "triton"}
MIX_BACKENDS = {"reference", "cpu", "triton"}
# The backends with the exact cache (``cache=``, DESIGN.md section 9): the reference (a token loop, any device)
# and "cpu" (``ops.cpu.cache``: the cache's decisions in a loop, the attention in blocks). A CUDA call on
# "auto" runs the reference; backend="triton" raises.
CACHE_BACKENDS = {"reference", "cpu"}
# The backends that evaluate each feature kind, for the kinds not every backend has; "auto" falls back to the
# reference when the backend it would choose is not listed, an explicit backend that is not listed raises.
KIND_BACKENDS = {NORM_HYP: {"reference", "cpu", "triton"}}


def available_backends() -> list[str]:
    """Backends usable in this process: always "reference"; "triton" when Triton imports; "cpu" when the
    compiled CPU extension is loaded or built in the cache. Never compiles: a CPU backend that is not built
    yet is missing here (``spectraformer_fused.build.status()`` tells "buildable" from "unavailable") and
    is built by the first call that needs it, or ahead of time by ``python -m spectraformer_fused.build``."""
    names = ["reference"]
    if triton_importable():
        names.append("triton")
    if cpu_extension_built():
        names.append("cpu")
    return names


def _resolve_backend(
    backend: str,
    q: torch.Tensor,
    feature_map: RandomFeatureMap,
    window: int | None = None,
    sinks: int = 0,
    cache: int = 0,
) -> str:
    """The backend that runs ``feature_map`` on inputs like ``q`` (with the hybrid ``window`` and ``sinks``,
    already checked): "auto" resolved, an explicit choice checked."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid names are {', '.join(BACKENDS)}")
    needs = []  # (what, the backends that have it)
    if window is not None:
        needs.append((f"hybrid attention (window={window})", WINDOW_BACKENDS))
    if sinks:
        needs.append((f"attention sinks (sinks={sinks})", SINK_BACKENDS))
    if window is not None and getattr(feature_map, "log_mix", None) is not None:
        needs.append(("the feature map's exact-part factor (mix)", MIX_BACKENDS))
    if cache:
        needs.append((f"the exact cache (cache={cache})", CACHE_BACKENDS))
    for what, able in needs:
        if backend != "auto" and backend not in able:
            raise ValueError(
                f"backend={backend!r} does not run {what}; backends that do: {', '.join(sorted(able))} "
                "(or backend='auto')"
            )
    name = _resolve_plain(backend, q, feature_map)
    if any(name not in able for _, able in needs):
        return "reference"
    return name


def _resolve_plain(backend: str, q: torch.Tensor, feature_map: RandomFeatureMap) -> str:
    able = KIND_BACKENDS.get(feature_map.kind)
    if able is not None and backend != "auto" and backend not in able:
        raise ValueError(
            f"backend={backend!r} cannot run component {feature_map.component!r}; backends that run it: "
            f"{', '.join(sorted(able))} (or backend='auto')"
        )
    name = _resolve_device(backend, q)
    return name if able is None or name in able else "reference"


def _resolve_device(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        if q.dtype == torch.float64:
            return "reference"
        if q.is_cuda:
            return "triton" if triton_importable() else "reference"
        # The compiled CPU extension is an opaque Python binding that torch.compile cannot trace; inside a
        # compiled region "auto" takes the reference on the CPU, which compiles to one graph.
        if (
            q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling()
            and cpu_extension_loaded()
        ):
            return "cpu"
        return "reference"
    if backend == "triton":
        if not triton_importable():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if q.dtype == torch.float64:
            raise TypeError(
                "backend='triton' supports float16, bfloat16 and float32 inputs, not float64; "
                "use backend='reference' (or 'auto') for float64"
            )
        if not q.is_cuda and not (q.device.type == "cpu" and triton_interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {q.device}"
            )
    if backend == "cpu":
        if q.dtype == torch.float64:
            raise TypeError(
                "backend='cpu' computes in fp32 and takes float16, bfloat16 and float32 inputs, not "
                "float64; use backend='reference' (or 'auto') for float64"
            )
        if q.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {q.device}")
        if not cpu_extension_loaded():
            from .ops.cpu import extension_error

            raise RuntimeError(
                f"backend='cpu' is unavailable: the compiled extension did not load ({extension_error()})"
            )
    return backend


_BACKEND_FNS: dict = {"reference": reference_attention}


def _backend_function(name: str):
    """The attention function of a resolved backend; a compiled one is imported on first use and kept (no
    import per call)."""
    fn = _BACKEND_FNS.get(name)
    if fn is None:
        if name == "triton":
            from .ops.triton.attention import triton_attention as fn
        else:
            from .ops.cpu import cpu_attention as fn
        _BACKEND_FNS[name] = fn
    return fn


def rf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: RandomFeatureMap,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    initial_state=None,
    output_final_state: bool = False,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    window: int | None = None,
    sinks: int | None = None,
    cache: int | None = None,
    cache_score: str | None = None,
):
    """Random-feature attention: o_t = phi(q_t)^T S / phi(q_t)^T z (DESIGN.md section 1), or with a
    ``window`` hybrid attention: exact inside the window, features beyond it (DESIGN.md section 6).

    Args:
        q: ``[B, T, H, D]``; k: ``[B, T, H_kv, D]``; v: ``[B, T, H_kv, Dv]``; float16, bfloat16, float32
            or float64. H_kv must divide H: grouped-query attention, query head h reads key/value head
            ``h // (H / H_kv)`` (H_kv = H: multi-head; H_kv = 1: multi-query). No backend repeats k or v.
        feature_map: a ``RandomFeatureMap`` built for head dim D and H_kv heads (or 1 shared head): the
            query heads of a group share their key/value head's W and its OPRF/SADERF statistics, which
            pool the keys of that head and the queries of every query head of the group.
        causal: o_t sees keys j <= t only.
        scale: multiplies q.k as in SDPA; default D^-1/2.
        key_padding_mask: ``[B, T]`` bool, True = keep; a masked key adds nothing, not even to the normaliser.
        initial_state: an ``RFState`` (S ``[B, H_kv, F, Dv]``, z ``[B, H_kv, F]``, log_scale ``[B, H_kv]``)
            from a previous call (or a tuple (S, z)): one state per key/value head.
        output_final_state: also return the state after the last key.
        backend: "auto" (Triton for CUDA tensors, the compiled CPU backend for CPU tensors when built,
            the reference otherwise and for float64), "reference", "triton" or "cpu".
        cu_seqlens: packed variable-length sequences: int32/int64 ``[N + 1]`` offsets on q's device
            (0, non-decreasing, ending at the packed length) with q, k, v ``[1, sum T_i, ., .]``. Each
            sequence is attended on its own (causal or not); ``initial_state`` and the final state hold one
            row per sequence (``[N, H_kv, ...]``); non-causal OPRF/SADERF statistics are per sequence, and in
            training mode the running statistics are updated once per sequence, in order: the result equals
            calling ``rf_attention`` on each sequence separately. Empty sequences are allowed. Not combined
            with ``key_padding_mask``. Every backend runs all sequences in one call whose kernels index the
            offsets (no padding); the offsets are read on the host once, for validation.
        window: None or 0 (random features only, the default) or W >= 1: hybrid attention. Causal, key j
            is exact for query t iff t - W < j <= t; non-causal, iff |t - j| < W; every other visible key
            goes through the features, with one shared normaliser: o_t = sum_j w_tj v_j / sum_j w_tj,
            w_tj = exp(scale q_t.k_j) (the kernel's exact weight; the Gaussian one for kernel="gaussian")
            inside the window and phi(q_t).phi(k_j) beyond. W >= T is exact attention. The state is then a
            ``WindowState``: the ``RFState`` of the keys that have left the window plus the raw keys and
            values of the last W - 1 positions (``k_tail [B, H_kv, W - 1, D]``, ``v_tail``, ``tail_keep
            [B, W - 1]``), fixed size; ``initial_state`` must be one made with the same window (or None).
            Backends: those in ``WINDOW_BACKENDS``; "auto" takes the reference when its choice has no window.
        sinks: None or 0 (the default) or S >= 1: attention sinks (DESIGN.md section 8). The first S keys of
            each sequence (of each packed sequence) are exact for every query that sees them, besides its
            window; with ``window=None`` the sinks are the only exact keys. The state is a ``WindowState``
            whose sink slots hold the sinks' raw keys and values (``k_sink [B, H_kv, S, D]``, ``v_sink``,
            ``sink_keep [B, S]``, ``sink_seen [B, S]``): fixed size; ``initial_state`` must be made with the
            same sinks and window. A feature map built with ``mix`` multiplies the exact part (window and
            sinks) by its learned factor. Backends: ``SINK_BACKENDS`` (and ``MIX_BACKENDS`` for the factor);
            "auto" takes the reference when its choice has neither.
        cache: None or 0 (the default) or C >= 1: an exact cache (DESIGN.md section 9), causal and with a
            window >= 1 only. Each sequence keeps, per key/value head, up to C of the keys and values that
            have left the window exact: when a key leaves the window and the cache is full, the key of
            cache U {it} whose own weight the features estimate best (the log-error of phi(k).phi(k)
            against the exact weight of k with itself, ``cache.key_scores``) is folded into the features. Query t is exact over its window, the sinks and the cache, features over the rest, one
            normaliser (the factor ``mix`` on every exact weight). The state is a ``CacheState``: a
            ``WindowState``'s fields plus ``k_cache [B, H_kv, C, D]``, ``v_cache``, ``cache_keep [B, C]``,
            fixed size; ``initial_state`` must be made with the same window, sinks and cache. Backends:
            ``CACHE_BACKENDS`` ("auto" on CUDA runs the reference, a loop over tokens). The cache's decisions
            are constants for differentiation.
        cache_score: which keys the cache keeps (``cache.SCORES``; needs ``cache``): None (the default) is
            ``cache.DEFAULT_SCORE``, ``"kernel"``, the score described above, state-free; ``"recall"`` scores
            a key by how wrong the feature state's answer would be for the query that looks for it (it reads
            the state, so the CPU backend decides key by key); on a fitted real model it keeps what a
            retrieval needs where the kernel score does not (DESIGN.md section 9). ``"kernel_rel"`` and
            ``"recall_other"`` are the measured alternatives.

    Returns:
        o ``[B, T, H, Dv]`` in v's dtype, or ``(o, state)`` when ``output_final_state``: an ``RFState``, or
        a ``WindowState`` with a window (a ``CacheState`` with a cache). The state is fp32 (fp64 for fp64
        inputs).
    """
    if not isinstance(feature_map, RandomFeatureMap):
        raise TypeError(f"feature_map must be a RandomFeatureMap, got {type(feature_map).__name__}")
    sinks = check_sinks(sinks)
    cache = check_cache(cache)
    cache_score = check_cache_score(cache_score, cache)
    window = hybrid_window(check_window(window), sinks)
    check_cache_setting(cache, window, causal)
    if cu_seqlens is None:
        F = feature_map.feature_dim
        state = check_attention_inputs(q, k, v, key_padding_mask, initial_state, F, window, sinks, cache)
        offsets, rows = None, q.shape[0]
    else:
        state, offsets = _check_packed(
            q, k, v, feature_map, cu_seqlens, key_padding_mask, initial_state, window, sinks, cache
        )
        rows = len(offsets) - 1
    _, T, H, D = q.shape
    Hk = k.shape[2]
    feature_map.check_input(D, Hk)
    scale = resolve_scale(scale, D)
    name = _resolve_backend(backend, q, feature_map, window, sinks, cache)
    if T == 0:  # no output rows; every state passes through
        o = v.new_empty(q.shape[0], 0, H, v.shape[-1])
        if not output_final_state:
            return o
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        if state is None and window is None:
            state = empty_state(rows, Hk, feature_map.feature_dim, v.shape[-1], dtype=cdt, device=q.device)
        elif state is None:
            F, Dv = feature_map.feature_dim, v.shape[-1]
            state = empty_window_state(rows, Hk, F, D, Dv, window, sinks=sinks, cache=cache, dtype=cdt, device=q.device)
        return o, type(state)(*(t if t.dtype == torch.bool else t.to(cdt) for t in state))
    params = feature_map.feature_params(
        q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, offsets=offsets
    )
    fn = _backend_function(name)
    extra = {} if window is None else {"window": window}  # only window backends take the keyword
    if sinks:
        extra["sinks"] = sinks
    if cache:
        extra["cache"] = cache
        if cache_score is not None:
            extra["score"] = cache_score
        if name == "cpu":
            from .ops.cpu.cache import cpu_cache_attention as fn
    if offsets is None:
        o, final = fn(
            q,
            k,
            v,
            params,
            causal=causal,
            key_padding_mask=key_padding_mask,
            initial_state=state,
            output_final_state=output_final_state,
            **extra,
        )
    else:  # every backend runs all packed sequences in one call
        o, final = fn(
            q,
            k,
            v,
            params,
            causal=causal,
            key_padding_mask=None,
            initial_state=state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens.to(torch.int32).contiguous(),
            **extra,
        )
    return (o, final) if output_final_state else o


def _check_packed(q, k, v, feature_map, cu_seqlens, key_padding_mask, initial_state, window, sinks, cache=0):
    """(state with one row per sequence or None, offsets as Python ints) of packed sequences."""
    check_attention_inputs(q, k, v, None, None, feature_map.feature_dim)
    offsets = check_cu_seqlens(cu_seqlens, q, key_padding_mask)
    n = len(offsets) - 1
    # The state is checked against N rows: zero-length views expanded to batch N carry the expected shapes.
    state = check_attention_inputs(
        *(t[:, :0].expand(n, -1, -1, -1) for t in (q, k, v)),
        None,
        initial_state,
        feature_map.feature_dim,
        window,
        sinks,
        cache,
    )
    return state, offsets
