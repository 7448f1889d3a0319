"""Input validation shared by the functional API and the feature map: clear errors, never asserts."""

from __future__ import annotations

import math

import torch

from .cache import SCORES
from .state import CacheState, RFState, WindowState

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(t, name: str, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_qk_pair(q, k, *, grouped: bool = False) -> None:
    """q ``[B, Tq, H, D]`` and k ``[B, Tk, H, D]``; with ``grouped`` k may have H_kv heads dividing H."""
    _check_tensor(q, "q", 4, "[B, T, H, D]")
    _check_tensor(k, "k", 4, "[B, T, H_kv, D]" if grouped else "[B, T, H, D]")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if not grouped and (q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim")
    if grouped and (q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim")
    if grouped and (k.shape[2] == 0 or q.shape[2] % k.shape[2]):
        raise ValueError(
            f"the number of key/value heads ({k.shape[2]}) must divide the number of query heads ({q.shape[2]})"
        )


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return float(scale)


def check_window(window) -> int | None:
    """The hybrid window (DESIGN.md section 6): None or 0 (random features only), else a positive int."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be a non-negative int or None, got {type(window).__name__}")
    if window < 0:
        raise ValueError(f"window must be a non-negative int or None, got {window}")
    return window or None


def check_sinks(sinks) -> int:
    """Attention sinks (DESIGN.md section 8): None or 0 (none), else a positive int; returns the int."""
    if sinks is None:
        return 0
    if isinstance(sinks, bool) or not isinstance(sinks, int):
        raise TypeError(f"sinks must be a non-negative int or None, got {type(sinks).__name__}")
    if sinks < 0:
        raise ValueError(f"sinks must be a non-negative int or None, got {sinks}")
    return sinks


def check_mix(mix) -> float | None:
    """The initial exact-part factor g of a feature map's ``mix`` (DESIGN.md section 8): None or False (no
    factor), True (g = 1) or a positive finite float; returns g or None."""
    if mix is None or mix is False:
        return None
    if mix is True:
        return 1.0
    if not isinstance(mix, (int, float)):
        raise TypeError(f"mix must be None, a bool or a positive float, got {type(mix).__name__}")
    if not (math.isfinite(mix) and mix > 0):
        raise ValueError(f"mix must be a positive finite factor, got {mix}")
    return float(mix)


def check_cache(cache) -> int:
    """The exact cache (DESIGN.md section 9): None or 0 (none), else a positive int; returns the int."""
    if cache is None:
        return 0
    if isinstance(cache, bool) or not isinstance(cache, int):
        raise TypeError(f"cache must be a non-negative int or None, got {type(cache).__name__}")
    if cache < 0:
        raise ValueError(f"cache must be a non-negative int or None, got {cache}")
    return cache


def check_cache_score(score, cache: int) -> str | None:
    """The exact cache's score (``cache.SCORES``, DESIGN.md section 9): None (``cache.DEFAULT_SCORE`` at call
    time) or one of the names; a score needs a cache (``cache`` already checked)."""
    if score is None:
        return None
    if not isinstance(score, str):
        raise TypeError(f"cache_score must be a str or None, got {type(score).__name__}")
    if score not in SCORES:
        raise ValueError(f"cache_score={score!r} is not a cache score; valid names are {', '.join(SCORES)}")
    if not cache:
        raise ValueError(f"cache_score={score!r} needs a cache (cache=C >= 1): it chooses the keys the cache keeps")
    return score


def check_cache_setting(cache: int, window: int | None, causal: bool) -> None:
    """A cache (already checked, > 0) holds keys that have left a causal window: it needs ``causal=True`` and
    a window >= 1 (``window`` as ``hybrid_window`` returns it: 0 or None has no window)."""
    if not cache:
        return
    if not causal:
        raise ValueError(
            f"cache={cache} needs causal attention: the cache holds keys that have left a causal window "
            "(non-causal attention has no order in which keys leave it)"
        )
    if not window:
        raise ValueError(
            f"cache={cache} needs a window >= 1 (window={window}): the cache holds the keys that leave the window"
        )


def hybrid_window(window: int | None, sinks: int) -> int | None:
    """The window a backend runs (both already checked): ``window``, or 0 for sinks without a window (an
    exact set of sinks only), or None for random features only."""
    if window is None and sinks > 0:
        return 0
    return window


def check_attention_inputs(
    q,
    k,
    v,
    key_padding_mask,
    initial_state,
    feature_dim: int,
    window: int | None = None,
    sinks: int = 0,
    cache: int = 0,
):
    """Validate q ``[B, T, H, D]``, k ``[B, T, H_kv, D]``, v ``[B, T, H_kv, Dv]`` (H_kv divides H:
    grouped-query attention; H_kv = H is multi-head, H_kv = 1 multi-query), the mask and the state
    ``[B, H_kv, F, Dv]``; with a ``window`` (already checked by ``check_window``) the state must be a
    ``WindowState`` whose tail holds ``max(window - 1, 0)`` positions and whose sink slots hold ``sinks``
    positions, without one it must not be (``window = 0``: sinks only, see ``hybrid_window``).

    With ``cache`` C > 0 (DESIGN.md section 9) the state must be a ``CacheState`` with C slots.

    Returns the state as an RFState (a 2-tuple (S, z) gets log_scale = 0), a WindowState or a CacheState,
    or None.
    """
    _check_tensor(q, "q", 4, "[B, T, H, D]")
    _check_tensor(k, "k", 4, "[B, T, H_kv, D]")
    _check_tensor(v, "v", 4, "[B, T, H_kv, Dv]")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    B, T, H, D = q.shape
    if k.shape[1] != T:
        raise ValueError(f"q and k must have the same sequence length, got {T} and {k.shape[1]}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head dim")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in batch, length and heads")
    Hk = k.shape[2]
    if Hk == 0 or H % Hk:
        raise ValueError(f"the number of key/value heads ({Hk}) must divide the number of query heads ({H})")
    Dv = v.shape[-1]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor [B, T], got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be torch.bool (True = keep), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, T):
            raise ValueError(f"key_padding_mask must have shape [B, T] = {(B, T)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device}, got {key_padding_mask.device}")
    if initial_state is None:
        return None
    if isinstance(initial_state, CacheState) or cache:
        return _check_cache_state(initial_state, window, sinks, cache, B, Hk, feature_dim, D, Dv, q.device)
    if isinstance(initial_state, WindowState):
        if window is None:
            raise ValueError(
                f"initial_state is a WindowState (hybrid attention with a window of {initial_state.window}), "
                "but window is None: pass the window it was made with"
            )
        rf = _check_rf_state(initial_state.rf, B, Hk, feature_dim, Dv, q.device)
        tail = _check_tail(initial_state, window, B, Hk, D, Dv, q.device)
        return WindowState(*rf, *tail, *_check_sinks_state(initial_state, sinks, B, Hk, D, Dv, q.device))
    if window is not None:
        raise TypeError(
            f"with window={window}, initial_state must be a WindowState (the final state of a call with the "
            f"same window) or None, got {type(initial_state).__name__}"
        )
    return _check_rf_state(initial_state, B, Hk, feature_dim, Dv, q.device)


def _check_rf_state(initial_state, B: int, Hk: int, feature_dim: int, Dv: int, device) -> RFState:
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) not in (2, 3):
        raise TypeError("initial_state must be an RFState or a tuple (S, z) or (S, z, log_scale)")
    S, z = initial_state[0], initial_state[1]
    expect = {"S": (S, (B, Hk, feature_dim, Dv), "[B, H_kv, F, Dv]"), "z": (z, (B, Hk, feature_dim), "[B, H_kv, F]")}
    if len(initial_state) == 3:
        expect["log_scale"] = (initial_state[2], (B, Hk), "[B, H_kv]")
    for name, (t, shape, layout) in expect.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"initial_state.{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state.{name} must have shape {shape} {layout}, got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"initial_state.{name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"initial_state.{name} must be on {device}, got {t.device}")
    m = initial_state[2] if len(initial_state) == 3 else torch.zeros(B, Hk, dtype=S.dtype, device=S.device)
    return RFState(S, z, m)


def _check_tail(state: WindowState, window: int, B: int, Hk: int, D: int, Dv: int, device) -> tuple:
    """The tail of a WindowState: ``max(window - 1, 0)`` positions of keys, values and keep flags."""
    n = max(window - 1, 0)
    for name in ("k_tail", "v_tail", "tail_keep"):
        if not isinstance(getattr(state, name), torch.Tensor):
            raise TypeError(f"initial_state.{name} must be a tensor, got {type(getattr(state, name)).__name__}")
    if state.k_tail.dim() == 4 and state.k_tail.shape[2] != n:
        raise ValueError(
            f"initial_state holds the last {state.k_tail.shape[2]} keys (a window of {state.k_tail.shape[2] + 1}), "
            f"but window={window} needs the last {n} (window - 1)"
        )
    expect = {
        "k_tail": ((B, Hk, n, D), "[B, H_kv, W - 1, D]"),
        "v_tail": ((B, Hk, n, Dv), "[B, H_kv, W - 1, Dv]"),
        "tail_keep": ((B, n), "[B, W - 1]"),
    }
    _check_fields(state, expect, ("tail_keep",), device)
    return state.k_tail, state.v_tail, state.tail_keep


def _check_slots(state, expect: dict, flags: tuple, count: int, mismatch: str, device) -> None:
    """The fixed-size slots of a state (the sinks', the cache's): every field of ``expect`` (name -> (shape,
    layout)) a tensor of that shape on ``device``, bool for the names in ``flags`` and floating point
    otherwise; the first field's slot axis of size ``count`` (``mismatch`` formatted with the size held)."""
    for name in expect:
        if not isinstance(getattr(state, name), torch.Tensor):
            raise TypeError(f"initial_state.{name} must be a tensor, got {type(getattr(state, name)).__name__}")
    first = getattr(state, next(iter(expect)))
    if first.dim() == 4 and first.shape[2] != count:
        raise ValueError(mismatch.format(n=first.shape[2], count=count))
    _check_fields(state, expect, flags, device)


def _check_fields(state, expect: dict, flags: tuple, device) -> None:
    """Every field of ``expect`` (name -> (shape, layout)) of the initial state: that shape, on ``device``,
    bool for the names in ``flags`` and floating point otherwise."""
    for name, (shape, layout) in expect.items():
        t = getattr(state, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state.{name} must have shape {shape} {layout}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"initial_state.{name} must be on {device}, got {t.device}")
        if name in flags and t.dtype != torch.bool:
            raise TypeError(f"initial_state.{name} must be torch.bool, got {t.dtype}")
        if name not in flags and not t.dtype.is_floating_point:
            raise TypeError(f"initial_state.{name} must be floating point, got {t.dtype}")


def _check_sinks_state(state: WindowState, sinks: int, B: int, Hk: int, D: int, Dv: int, device) -> tuple:
    """The sink slots of a WindowState: ``sinks`` positions of keys, values, keep and seen flags."""
    names = ("k_sink", "v_sink", "sink_keep", "sink_seen")
    if len(state) != 10:
        raise TypeError(f"initial_state must be a WindowState with its sink fields {names}")
    expect = {
        "k_sink": ((B, Hk, sinks, D), "[B, H_kv, S, D]"),
        "v_sink": ((B, Hk, sinks, Dv), "[B, H_kv, S, Dv]"),
        "sink_keep": ((B, sinks), "[B, S]"),
        "sink_seen": ((B, sinks), "[B, S]"),
    }
    mismatch = "initial_state holds {n} attention sinks, but sinks={count}: pass the sinks it was made with"
    _check_slots(state, expect, ("sink_keep", "sink_seen"), sinks, mismatch, device)
    return state.k_sink, state.v_sink, state.sink_keep, state.sink_seen


def _check_cache_state(state, window, sinks, cache, B, Hk, feature_dim, D, Dv, device) -> CacheState:
    """A CacheState of ``cache`` slots (and the window and sinks of the call)."""
    if not isinstance(state, CacheState):
        raise TypeError(
            f"with cache={cache}, initial_state must be a CacheState (the final state of a call with the same "
            f"window, sinks and cache) or None, got {type(state).__name__}"
        )
    if not cache:
        raise ValueError(
            f"initial_state is a CacheState (an exact cache of {state.cache} keys), but cache is None: pass the "
            "cache it was made with"
        )
    if window is None:
        raise ValueError("initial_state is a CacheState (hybrid attention with a cache), but window is None")
    rf = _check_rf_state(state.rf, B, Hk, feature_dim, Dv, device)
    tail = _check_tail(state, window, B, Hk, D, Dv, device)
    sink_part = _check_sinks_state(state.window_state, sinks, B, Hk, D, Dv, device)
    expect = {
        "k_cache": ((B, Hk, cache, D), "[B, H_kv, C, D]"),
        "v_cache": ((B, Hk, cache, Dv), "[B, H_kv, C, Dv]"),
        "cache_keep": ((B, cache), "[B, C]"),
    }
    mismatch = "initial_state holds an exact cache of {n} keys, but cache={count}: pass the cache it was made with"
    _check_slots(state, expect, ("cache_keep",), cache, mismatch, device)
    return CacheState(*rf, *tail, *sink_part, *state.cache_part)


def check_cu_seqlens(cu_seqlens, q, key_padding_mask) -> list[int]:
    """Validate packed-sequence offsets ``cu_seqlens`` (int32/int64 ``[N + 1]`` on q's device, starting at 0,
    non-decreasing, ending at q's length) for q ``[1, sum T_i, H, D]``; returns the offsets as Python ints."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor [N + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D [N + 1] with at least one element, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on {q.device} like q, got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k and v must be packed as [1, sum T_i, H, D]; got batch {q.shape[0]}")
    if key_padding_mask is not None:
        raise ValueError("cu_seqlens cannot be combined with key_padding_mask: packed sequences carry no padding")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    bad = next((i for i in range(1, len(offsets)) if offsets[i] < offsets[i - 1]), None)
    if bad is not None:
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got {offsets[bad - 1]} then {offsets[bad]} at index {bad}"
        )
    if offsets[-1] != q.shape[1]:
        raise ValueError(f"cu_seqlens must end at the packed length {q.shape[1]}, got {offsets[-1]}")
    return offsets
