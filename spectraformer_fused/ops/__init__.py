"""Compiled backends. Each exposes ``<name>_attention(q, k, v, params, *, causal, key_padding_mask,
initial_state, output_final_state) -> (o, RFState | None)`` with the reference's semantics."""
from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


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


def cpu_extension_loaded() -> bool:
    try:
        from .cpu import extension_available
    except ImportError:
        return False
    return extension_available()
