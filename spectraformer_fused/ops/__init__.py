"""Compiled backends. Each exposes ``<name>_attention(q, k, v, params, *, causal, key_padding_mask,
initial_state, output_final_state) -> (o, RFState | None)`` with the reference's semantics."""

from __future__ import annotations

import importlib.util

# Decided once at import, without importing triton (kernel modules must be imported only after
# TRITON_INTERPRET is set); a plain constant also keeps torch.compile from tracing a cache.
_TRITON_SPEC = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """True when the triton package is installed (the Triton backend can be imported)."""
    return _TRITON_SPEC


def autotune_enabled() -> bool:
    """Kernels autotune on a GPU unless SPECTRAFORMER_FUSED_AUTOTUNE=0 (one fixed config: quicker
    compilation, e.g. for test runs). Never under the interpreter, which cannot benchmark."""
    import os

    return os.environ.get("SPECTRAFORMER_FUSED_AUTOTUNE", "1") != "0" and not triton_interpreting()


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except Exception:
        return False


_CPU_MODULE = None  # ops.cpu, imported on first need and kept (an import statement per call costs microseconds)


def cpu_extension_loaded() -> bool:
    """True when the compiled CPU extension is loaded; builds it first if needed (with a notice)."""
    global _CPU_MODULE
    if _CPU_MODULE is None:
        try:
            from . import cpu
        except ImportError:
            return False
        _CPU_MODULE = cpu
    return _CPU_MODULE.extension_available()


def cpu_extension_built() -> bool:
    """True when the compiled CPU extension is loaded or loads from the build cache; never compiles."""
    try:
        from .cpu import extension_built
    except ImportError:
        return False
    return extension_built()
