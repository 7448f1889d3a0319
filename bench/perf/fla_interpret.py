"""Run flash-linear-attention's Triton kernels under the Triton interpreter (CPU tensors), for the dry run
of bench/perf/gpu.py, so the fla peer is exercised end to end without a GPU.

Two obstacles, both specific to the interpreter, and what is done about them:
* fla's kernels are ``@triton.autotune``d; the autotuner times its candidates with the GPU driver, which
  the interpreter lacks ("0 active drivers"). Here every candidate is given the same time, so the first
  configuration runs (the interpreter runs any configuration the same way).
* Inside a kernel fla writes ``for i_t in range(NT): i_t.to(tl.int64)``; compiled, the loop index is a
  Triton integer, but the interpreter runs the kernel as Python and the index is a Python int, which has
  no ``.to``. Here fla's modules get a ``range`` that, called from one of their kernels, yields
  interpreter integers (``tl.full((), i, tl.int32)``) and is the builtin anywhere else.
Call ``interpretable_fla()`` after TRITON_INTERPRET=1 is set and before the first fla call.
"""

from __future__ import annotations

import builtins
import sys


def interpretable_fla() -> None:
    import fla.ops.linear_attn  # noqa: F401  (loads the kernel modules)
    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    from triton.runtime.jit import JITFunction

    autotuner.Autotuner._bench = lambda self, *args, **kwargs: [0.0, 0.0, 0.0]
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("fla.") and m is not None]
    kernels = set()
    for module in modules:
        for obj in list(vars(module).values()):
            fn = obj
            while hasattr(fn, "fn"):  # Autotuner / Heuristics -> JITFunction -> function
                fn = fn.fn
            if (isinstance(obj, JITFunction) or fn is not obj) and hasattr(fn, "__code__"):
                kernels.add(fn.__code__.co_name)

    def kernel_range(*args):
        if sys._getframe(1).f_code.co_name in kernels:
            return (tl.full((), i, tl.int32) for i in builtins.range(*(int(a) for a in args)))
        return builtins.range(*args)

    for module in modules:
        module.range = kernel_range
