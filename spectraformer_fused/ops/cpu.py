"""The compiled CPU backend: binding, build and autograd of ``csrc/rf_attention.cpp``.

The extension is compiled with ``torch.utils.cpp_extension`` (needs a C++ compiler and ninja) into the
build cache of ``build_cache.py`` (``~/.cache/spectraformer_fused/<name>-<key>``, the key a hash of the
sources, torch, Python, compiler flags and CPU), either ahead of time (``python -m
spectraformer_fused.build``) or on the first call that needs it, which then prints a one-line notice on
stderr (once per process) before compiling. Later processes load the cached binary without compiling.
The sources come from the copy shipped inside the package (``spectraformer_fused/csrc``) or, in a source
checkout, from the top-level ``csrc/``. A machine without a compiler still imports the package:
``extension_available()`` then warns once, naming the fix, and returns False.
SPECTRAFORMER_FUSED_NO_CPU_EXT=1 skips the extension altogether.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from pathlib import Path

import torch

from ..contract import DEN_EPS, EXP, HYP, NORM_HYP, TRIG, FeatureParams
from ..reference import reference_attention
from ..state import RFState
from . import build_cache

EXTENSION_NAME = "spectraformer_fused_cpu"
_SOURCES = ("rf_attention.cpp", "rf_backward.cpp")
# rf_window.cpp (the hybrid window) is #included by rf_attention.cpp, rf_window_bwd.cpp (its backward) by
# rf_backward.cpp: one translation unit each, their helpers shared.
_HEADERS = ("rf_kernels.h", "rf_backward.h", "rf_window.cpp", "rf_window_bwd.cpp")
# -fopenmp: at::parallel_for is OpenMP-based in torch's CPU builds (and serial without it); the OpenMP
# runtime already loaded by torch is reused, so torch.set_num_threads applies.
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
_LDFLAGS = ("-fopenmp",)
SKIP_ENV = "SPECTRAFORMER_FUSED_NO_CPU_EXT"
NOTICE = (
    "spectraformer_fused: compiling the CPU backend (C++ extension {name}; not yet built for these "
    "sources, this torch, Python and CPU), which takes 30 s to a few minutes, into {{dir}}. "
    "Build it ahead of time with `python -m spectraformer_fused.build`; "
    "skip it with {skip}=1."
).format(name=EXTENSION_NAME, skip=SKIP_ENV)

_lock = threading.Lock()
_module = None
_error: str | None = None
_warned = False


def _source_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES + _HEADERS):
            return candidate
    return None


def _disabled() -> bool:
    return os.environ.get(SKIP_ENV, "0") not in ("", "0")


def extension_spec() -> build_cache.ExtensionSpec | None:
    """What the extension is built from, or None when its sources are missing from this installation."""
    src = _source_dir()
    if src is None:
        return None
    return build_cache.ExtensionSpec(EXTENSION_NAME, src, _SOURCES, _HEADERS, _CFLAGS, _LDFLAGS)


def _build(force: bool = False):
    """The extension module: loaded from the build cache, or compiled into it (after the notice)."""
    spec = extension_spec()
    if spec is None:
        raise FileNotFoundError("the C++ sources (csrc/rf_attention.cpp) are missing from this installation")
    verbose = os.environ.get("SPECTRAFORMER_FUSED_VERBOSE_BUILD", "0") not in ("", "0")
    return build_cache.build(spec, force=force, notice=NOTICE, verbose=verbose)


def _load(build: bool = True):
    """The extension module, loaded (``build``: or built) once per process; None when that failed, or,
    without ``build``, when the cache holds no built binary."""
    global _module, _error, _warned
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is None and _error is None and _disabled():
            _error = f"disabled by {SKIP_ENV}"
            _warned = True
        if _module is None and _error is None and not build:
            spec = extension_spec()
            _module = None if spec is None else build_cache.load_cached(spec)
            return _module
        if _module is None and _error is None:
            try:
                _module = _build()
            except Exception as exc:  # compiler, ninja or headers missing: fall back, do not break import
                _error = f"{type(exc).__name__}: {exc}".strip()
        if _error is not None and not _warned:
            _warned = True
            warnings.warn(
                "spectraformer_fused: the compiled CPU backend could not be built, so backend='auto' uses the "
                "reference backend on the CPU. To enable it, install a C++ compiler (g++) and ninja "
                f"(pip install ninja), and make the build cache {build_cache.cache_root()} writable (or set "
                f"{build_cache.CACHE_ENV}). Error: {_error.splitlines()[0] if _error else ''}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module


def extension_available() -> bool:
    """True when the compiled CPU extension is loaded; builds it if needed (tries once per process)."""
    return _load() is not None


def extension_built() -> bool:
    """True when the extension is loaded or loads from the build cache; never compiles."""
    return _load(build=False) is not None


def extension_error() -> str:
    """Why the extension did not load ("" when it did, or when no attempt was made yet)."""
    return _error or ""


def extension_status() -> str:
    """Where the extension stands, without compiling anything: "loaded" (in this process), "built" (in the
    build cache, loaded on first use), "buildable" (compiled on first use, or by ``python -m
    spectraformer_fused.build``), or "unavailable: <reason>"."""
    if _module is not None:
        return "loaded"
    if _error is not None:
        return f"unavailable: {_error.splitlines()[0] if _error else ''}"
    if _disabled():
        return f"unavailable: disabled by {SKIP_ENV}"
    spec = extension_spec()
    if spec is None:
        return "unavailable: the C++ sources (csrc/rf_attention.cpp) are missing from this installation"
    if build_cache.is_built(spec):
        return "built"
    missing = build_cache.missing_tools()
    if missing:
        return f"unavailable: {' and '.join(missing)} not found"
    return "buildable"


_wt_cache: tuple | None = None  # (key, W, WT): the last W seen and its transposed fp32 copy


def _transposed(W: torch.Tensor) -> torch.Tensor:
    """W ``[H, m, D]`` as a contiguous fp32 ``[H, D, m]``, cached for the last W seen, so that decode
    steps reusing one W do not transpose it every token. The key holds the storage address, the view
    and the version counter (bumped by in-place updates); the cache keeps a reference to W, so that
    storage cannot be freed and reused by another tensor while the entry lives."""
    global _wt_cache
    entry = _wt_cache
    if entry is not None and entry[1] is W and entry[0][-1] == W._version:  # the feature map's kept W
        return entry[2]
    key = (W.untyped_storage().data_ptr(), W.storage_offset(), tuple(W.shape), tuple(W.stride()), W.dtype, W._version)
    if entry is not None and entry[0] == key:
        return entry[2]
    WT = W.detach().to(torch.float32).transpose(1, 2).contiguous()
    _wt_cache = (key, W, WT)
    return WT


def _forward(ext, q, k, v, params: FeatureParams, causal, mask, S0, z0, m0, cu_seqlens):
    # Called with grad disabled (inside the autograd Function) or with no input requiring grad, so the
    # extension records no graph and nothing needs detaching.
    W = params.W
    return ext.forward(
        q,
        k,
        v,
        W,
        params.bias,
        params.freq,
        params.psi,
        int(params.kind),
        float(params.c_t),
        float(params.c_o),
        float(params.scale),
        bool(causal),
        mask,
        S0,
        z0,
        m0,
        DEN_EPS,
        _transposed(W),
        cu_seqlens,
    )


class _CpuAttention(torch.autograd.Function):
    """Forward and backward in C++ (``csrc/rf_backward.cpp``). The forward saves its inputs and, when
    non-causal, its final state (read again by the backward's queries); the backward recomputes every
    feature chunk by chunk from them. The kinds without a fused backward, and a ``log_scale`` of the
    initial state that requires grad, recompute through the reference backend instead (``reference_grads``)."""

    @staticmethod
    def forward(ctx, q, k, v, W, bias, S0, z0, m0, params, causal, mask, cu_seqlens):
        ext = _load()
        o, S, z, m = _forward(ext, q, k, v, params, causal, mask, S0, z0, m0, cu_seqlens)
        final = (None, None, None) if causal else (S, z, m)
        ctx.save_for_backward(q, k, v, W, bias, S0, z0, m0, *final)
        ctx.params, ctx.causal, ctx.mask, ctx.cu_seqlens = params, causal, mask, cu_seqlens
        ctx.has_state = S0 is not None
        ctx.mark_non_differentiable(m)
        ctx.set_materialize_grads(False)
        return o, S, z, m

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS, dz, _dm):
        q, k, v, W, bias, S0, z0, m0, Sf, zf, mf = ctx.saved_tensors
        p = ctx.params
        inputs = (q, k, v, W, bias, S0, z0, m0)
        if p.kind not in FUSED_BACKWARD_KINDS or (m0 is not None and m0.requires_grad):
            grads = reference_grads(
                ctx.params,
                inputs,
                (do, dS, dz),
                lambda st: RFState(*st) if ctx.has_state else None,
                causal=ctx.causal,
                key_padding_mask=ctx.mask,
                cu_seqlens=ctx.cu_seqlens,
            )
            return (*grads, None, None, None, None)
        if do is None:
            do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype)
        dq, dk, dv, dW, dbias, dS0, dz0 = _load().backward(
            do,
            dS,
            dz,
            q,
            k,
            v,
            W,
            bias,
            p.freq,
            p.psi,
            int(p.kind),
            float(p.c_t),
            float(p.c_o),
            float(p.scale),
            bool(ctx.causal),
            ctx.mask,
            S0,
            z0,
            m0,
            Sf,
            zf,
            mf,
            DEN_EPS,
            ctx.cu_seqlens,
        )
        grads = (dq, dk, dv, dW.sum_to_size(W.shape), dbias.sum_to_size(bias.shape), dS0, dz0, None)
        result = [
            g.to(t.dtype) if t is not None and t.requires_grad and g is not None else None
            for g, t in zip(grads, inputs)
        ]
        return (*result, None, None, None, None)


# The kinds whose backward is fused (csrc/rf_backward.cpp); the others recompute through the reference.
FUSED_BACKWARD_KINDS = (EXP, HYP, TRIG, NORM_HYP)


def reference_grads(params: FeatureParams, inputs, out_grads, make_state, *, mix: bool = False, **attend):
    """The gradients of ``inputs`` (q, k, v, W, bias, with ``mix`` the factor ``log_mix``, then the initial
    state's tensors; None where absent) by
    recomputing the forward through the reference backend under enable_grad and differentiating that graph
    (exact, at the cost of one reference forward and backward). ``make_state`` builds the initial state from
    the state's leaves (None for no state); ``out_grads`` are the gradients of the output and of the final
    state's fields in order, None where none flows; ``attend`` the reference's other keyword arguments."""
    leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    lq, lk, lv, lW, lbias, *lstate = leaves
    with torch.enable_grad():
        if mix:
            lmix, *lstate = lstate
            rp = dataclasses.replace(params, W=lW, bias=lbias, log_mix=lmix)
        else:
            rp = dataclasses.replace(params, W=lW, bias=lbias)
        # packed sequences: the reference runs them one by one on views
        o, final = reference_attention(
            lq, lk, lv, rp, initial_state=make_state(lstate), output_final_state=True, **attend
        )
        outs, grads = [], []
        for out, g in zip((o, *final), out_grads):
            if g is not None and out.requires_grad:
                outs.append(out)
                grads.append(g)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = torch.autograd.grad(outs, wanted, grads, allow_unused=True) if outs and wanted else []
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in leaves]


def cpu_attention(
    q,
    k,
    v,
    params: FeatureParams,
    *,
    causal: bool,
    key_padding_mask=None,
    initial_state: RFState | None = None,
    output_final_state: bool = False,
    cu_seqlens=None,
    window: int | None = None,
    sinks: int = 0,
):
    """Random-feature attention with the reference's semantics, computed by the compiled CPU extension.

    q, k ``[B, T, H, D]`` (fp32, bf16 or fp16), v ``[B, T, H_kv, Dv]``. Returns
    ``(o [B, T, H, Dv] in v's dtype, RFState in fp32 or None)``. Differentiable: the backward is fused as well
    (``csrc/rf_backward.cpp``).

    ``cu_seqlens`` (int32/int64 ``[N + 1]``, validated by the caller): packed variable-length sequences,
    q, k, v ``[1, Ttot, ., .]``, sequence n the rows ``cu[n]:cu[n+1]``; the parameters' and the states'
    batch axis is then the sequence axis (bias ``[N, H_kv, m]``, S ``[N, H_kv, F, Dv]``...). One call of the
    extension runs every (sequence, key/value head); the result equals one call per sequence.

    ``window`` (>= 1, or 0 with ``sinks``): the hybrid window and attention sinks
    (``ops.cpu_window.cpu_window_attention``; the state is then a ``WindowState``).
    """
    if window is not None:
        from .cpu_window import cpu_window_attention

        return cpu_window_attention(
            q,
            k,
            v,
            params,
            causal=causal,
            window=window,
            sinks=sinks,
            key_padding_mask=key_padding_mask,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the compiled CPU backend is unavailable ({_error})")
    S0, z0, m0 = (None, None, None) if initial_state is None else tuple(initial_state)
    if initial_state is not None and any(t is None for t in (S0, z0, m0)):
        raise ValueError(
            "initial_state must hold S, z and log_scale together, got "
            + ", ".join(
                f"{name}={'tensor' if t is not None else None}"
                for name, t in zip(("S", "z", "log_scale"), (S0, z0, m0))
            )
        )
    tensors = (q, k, v, params.W, params.bias, S0, z0, m0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        o, S, z, m = _CpuAttention.apply(*tensors, params, causal, key_padding_mask, cu_seqlens)
    else:
        o, S, z, m = _forward(ext, q, k, v, params, causal, key_padding_mask, S0, z0, m0, cu_seqlens)
    return o, (RFState(S, z, m) if output_final_state else None)
