"""Compile every Triton kernel of the package for a GPU target on any machine, and report its resources.

    python -m bench.perf.compile_check [--arch 90] [--cases quick|small|large|default|full] [--kernels NAMES]
                                  [--out FILE] [--jobs N] [--check]

No GPU is needed: Triton lowers a kernel to PTX and runs ptxas (shipped with Triton) in-process for the
chosen target. The launches come from the real host code: ``triton_attention`` and its backward run on
CPU tensors while ``JITFunction.run`` only records each launch (its arguments, constexprs and options),
so what is compiled is exactly what the package launches for that case with autotuning off (the fixed
configurations); ``--configs all`` adds every configuration the autotuner may try on a GPU (it skips one
that does not fit, but a compile error would reach the caller).

For each distinct kernel specialisation the table gives the registers per thread, the stack frame (bytes
per thread: non-zero means ptxas spilled registers to local memory), the shared memory Triton allocates
(bytes per program) and the compile time. These are properties of the generated code, not timings.
``--check`` exits 1 when a kernel fails to compile or needs more shared memory than a block of the
target may have (a launch would fail with OutOfResources).

Arguments are specialised as Triton's launcher specialises them at run time (integers equal to 1 become
constants, values divisible by 16 are marked so), so the code is the code a GPU would run for that call.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Compiled code, not the interpreter's; the fixed kernel configurations.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("SPECTRAFORMER_FUSED_AUTOTUNE", "0")
os.environ.setdefault("SPECTRAFORMER_FUSED_NO_CPU_EXT", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set, so newer Triton does not warn
if "TRITON_CACHE_DIR" not in os.environ:
    # a cache of its own, so every kernel is really compiled (and the compile times mean something)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="spectraformer-compile-check-")

import torch  # noqa: E402

# Shared memory a block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Case:
    """One call of the Triton backend whose launches are compiled (forward and backward)."""

    comp: str = "posrf"
    causal: bool = True
    dtype: str = "fp16"
    D: int = 64
    Dv: int = 64
    m: int = 128
    T: int = 256
    mask: bool = False
    init: bool = False
    mode: str = "walk"  # the causal mode (SPECTRAFORMER_FUSED_TRITON_MODE)
    kv_heads: int = 2  # key/value heads of the 2 query heads (1: multi-query attention)
    packed: tuple = ()  # lengths of packed sequences (cu_seqlens); () = one dense batch row of T tokens
    window: int = 0  # the hybrid window W (0: random features only, or sinks only with sinks > 0)
    sinks: int = 0  # attention sinks S (DESIGN.md section 8)
    mix: bool = False  # the feature map's learned exact-part factor

    @property
    def label(self) -> str:
        extra = "+mask" * self.mask + "+init" * self.init + "+chunk" * (self.causal and self.mode == "chunk")
        extra += "+mqa" * (self.kv_heads == 1)
        extra += f"+packed{len(self.packed)}" * bool(self.packed)
        extra += f"+w{self.window}" * bool(self.window)
        extra += f"+s{self.sinks}" * bool(self.sinks) + "+mix" * self.mix
        return (
            f"{self.comp} {'causal' if self.causal else 'full'} {self.dtype} D{self.D} Dv{self.Dv} m{self.m}"
            f" T{self.T}{extra}"
        )


COMPONENTS = ("posrf", "hyprf", "trigrf", "gerf", "oprf", "saderf")


def cases(which: str) -> list[Case]:
    """quick: two cases for experiments; small: tiny tiles, every kernel and flag family (the CI test);
    large: the widest heads (D = Dv = 256, m = 512) and m = 512 at D = 128; default: the benchmark shape
    (D = Dv = 64, m = 128) for posrf in fp16/fp32, causal and not, hyprf and trigrf; full: default, every
    component in bf16 with a mask and an initial state, and large."""
    if which == "quick":
        return [Case("posrf", True, "fp16"), Case("hyprf", False, "fp32"), Case("posrf", True, "fp16", mode="chunk")]
    if which == "large":
        return [
            Case("posrf", True, "fp16", 256, 256, 512),
            Case("trigrf", False, "fp16", 128, 128, 512),
            Case("hyprf", True, "fp32", 256, 256, 512),
        ]
    if which == "small":
        # tiny tiles (chunk 16): quick to compile; checks that every kernel lowers for the target
        return [
            Case("posrf", True, "fp16", 16, 16, 16, 16, True, True),
            Case("hyprf", False, "fp32", 16, 16, 16, 16, True, True),
            Case("trigrf", True, "fp32", 16, 16, 16, 16),
            Case("saderf", False, "fp16", 16, 16, 16, 16),
            Case("gerf", True, "fp16", 16, 16, 16, 16),
            Case("posrf", True, "fp16", 16, 16, 16, 64, True, True, "chunk", kv_heads=1),
            Case("oprf", False, "fp16", 16, 16, 16, 40, packed=(24, 0, 16)),
            Case("hyprf", True, "fp32", 16, 16, 16, 40, init=True, packed=(24, 0, 16)),
            Case("posrf", True, "fp16", 16, 16, 16, 80, mode="chunk", packed=(48, 1, 31)),
            Case("hedgehog", True, "fp16", 16, 16, 16, 40, True, True),
            Case("hedgehog", True, "fp32", 16, 16, 16, 40, mode="chunk", packed=(24, 0, 16)),
            Case("posrf", True, "fp16", 16, 16, 16, 40, window=5),
            Case("hyprf", False, "fp32", 16, 16, 16, 40, True, True, window=5),
            Case("posrf", True, "fp16", 16, 16, 16, 40, True, True, window=5, sinks=4, mix=True),
            Case("hyprf", False, "fp32", 16, 16, 16, 40, sinks=4),
            Case("posrf", True, "fp16", 16, 16, 16, 40, init=True, packed=(24, 0, 16), window=3, sinks=2),
        ]
    base = [Case("posrf", causal, dt) for causal in (True, False) for dt in ("fp16", "fp32")]
    base += [Case("hyprf", True, "fp16"), Case("trigrf", True, "fp16"), Case("hedgehog", True, "fp16")]
    base += [Case("hedgehog", False, "fp16")]
    base += [Case("posrf", causal, "fp16", window=64) for causal in (True, False)]
    base += [Case("posrf", causal, "fp16", window=64, sinks=4, mix=True) for causal in (True, False)]
    base += [Case("posrf", True, "fp16", sinks=4)]
    base += [dataclasses.replace(c, mode="chunk") for c in base if c.causal]
    packed = (64, 512, 1, 256, 191)  # 1024 tokens in five sequences
    base += [
        Case("posrf", causal, "fp16", T=1024, mode=mode, packed=packed)
        for causal, mode in ((False, "walk"), (True, "walk"), (True, "chunk"))
    ]
    if which == "default":
        return base
    full = base + [Case(c, causal, "bf16", mask=True, init=True) for c in COMPONENTS for causal in (True, False)]
    return full + [Case("posrf", True, "fp16", 128, 128, 256)] + cases("large")


def _record_launches():
    """Replace JITFunction.run by a recorder with a new, empty list; returns the list it appends
    (fn, args, kwargs) to."""
    from triton.runtime.jit import JITFunction

    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))
        return None

    JITFunction.run = run
    return launches


def capture(case: Case) -> list:
    """The launches (fn, args, kwargs) of one forward and backward call of the Triton backend."""
    launches = _record_launches()
    from spectraformer_fused.feature_map import RandomFeatureMap
    from spectraformer_fused.ops.triton.attention import triton_attention
    from spectraformer_fused.state import RFState, empty_window_state

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    B, H, Hk = 1, 2, case.kv_heads
    offsets = None
    if case.packed:
        if sum(case.packed) != case.T or case.mask:
            raise ValueError(f"{case.label}: packed lengths must sum to T, without a mask")
        offsets = [0]
        for n in case.packed:
            offsets.append(offsets[-1] + n)
    args = {"A": -0.1} if case.comp == "gerf" else {}
    fm = RandomFeatureMap(case.D, case.m, component=case.comp, num_heads=Hk, seed=0, mix=case.mix or None, **args)
    q = torch.randn(B, case.T, H, case.D, dtype=dt, requires_grad=True)
    k = torch.randn(B, case.T, Hk, case.D, dtype=dt, requires_grad=True)
    v = torch.randn(B, case.T, Hk, case.Dv, dtype=dt, requires_grad=True)
    mask = torch.ones(B, case.T, dtype=torch.bool) if case.mask else None
    state = None
    if case.init:
        F = fm.feature_dim
        R = B if offsets is None else len(offsets) - 1
        state = RFState(torch.zeros(R, Hk, F, case.Dv), torch.zeros(R, Hk, F), torch.zeros(R, Hk))
        if case.window or case.sinks:
            state = empty_window_state(R, Hk, F, case.D, case.Dv, case.window, sinks=case.sinks)
    params = fm.feature_params(q, k, scale=case.D**-0.5, causal=case.causal, key_padding_mask=mask, offsets=offsets)
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    os.environ["SPECTRAFORMER_FUSED_TRITON_MODE"] = case.mode
    try:
        o, _ = triton_attention(
            q,
            k,
            v,
            params,
            causal=case.causal,
            key_padding_mask=mask,
            initial_state=state,
            output_final_state=False,
            cu_seqlens=cu,
            window=case.window or (0 if case.sinks else None),
            sinks=case.sinks,
        )
        o.float().sum().backward()
    finally:
        del os.environ["SPECTRAFORMER_FUSED_TRITON_MODE"]
    return launches


def specialise(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of one recorded launch, as triton.compile takes them: the
    specialisation Triton's launcher would make (integers equal to 1 become constants, integers and
    pointers divisible by 16 are marked so, unless the kernel says do_not_specialize)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, const, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        val = values[name]
        if param.is_constexpr:
            sig[name], const[name] = "constexpr", val
            continue
        ty, spec = native_specialize_impl(
            BaseBackend, val, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        if ty == "constexpr":
            sig[name], const[name] = "constexpr", spec
        else:
            sig[name] = ty
            if isinstance(spec, str) and BaseBackend.parse_attr(spec):
                attrs[(i,)] = BaseBackend.parse_attr(spec)
    options = {k: kwargs[k] for k in _OPTIONS if kwargs.get(k) is not None}
    options.setdefault("num_warps", 4)
    return sig, const, attrs, options


def tuning_variants(fn, args, kwargs, options: dict) -> list:
    """(constexpr overrides, options) of every autotuning configuration the package gives this kernel;
    just the recorded launch for kernels that are not autotuned."""
    from spectraformer_fused.ops.triton import bwd as triton_bwd
    from spectraformer_fused.ops.triton import fwd as triton_fwd

    if fn.__name__ == "_rf_fwd_kernel":
        values = dict(zip(fn.arg_names, args), **kwargs)  # kernels are launched by keyword
        configs = triton_fwd._prune_fwd_configs(triton_fwd._FWD_CONFIGS, {"DV": values["DV"]})
    elif fn.__name__ in ("_rf_bwd_dq_kernel", "_rf_bwd_dkv_kernel"):
        configs = triton_bwd._BWD_CONFIGS
    else:
        return [({}, options)]
    return [(dict(c.kwargs), dict(options, num_warps=c.num_warps, num_stages=c.num_stages)) for c in configs]


def _resource_usage(cubin: bytes) -> dict:
    """REG and STACK of the kernel from cuobjdump (shipped with Triton's NVIDIA backend)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {}
    for line in out.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, val = item.partition(":")
                if key in ("REG", "STACK") and val.isdigit():
                    usage[key] = int(val)
    return usage


def compile_one(job):
    """Compile one specialisation (run in a worker process); returns a result row."""
    name, module, sig, const, attrs, options, arch = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # autotuned kernels wrap the JITFunction
        fn = fn.fn
    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn, sig, const, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    except Exception as exc:  # reported in the table, and fails --check
        return dict(
            error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            seconds=time.perf_counter() - t0,
        )
    usage = _resource_usage(kernel.asm["cubin"])
    return dict(
        regs=usage.get("REG"), stack=usage.get("STACK"), shared=kernel.metadata.shared, seconds=time.perf_counter() - t0
    )


def _flags(const: dict) -> str:
    keep = {k: v for k, v in const.items() if k.isupper() and v is not None}
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in keep.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200, 80 = A100)")
    ap.add_argument("--cases", choices=("quick", "small", "large", "default", "full"), default="default")
    ap.add_argument(
        "--configs",
        choices=("fixed", "all"),
        default="fixed",
        help="'all': every autotuning configuration of the autotuned kernels, not only the fixed one",
    )
    ap.add_argument("--kernels", default="", help="only kernels whose name contains one of these (comma list)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a kernel fails to compile or exceeds the target's shared memory",
    )
    args = ap.parse_args(argv)

    import triton

    jobs, seen, where = [], set(), {}
    for case in cases(args.cases):
        for fn, fargs, fkw in capture(case):
            if args.kernels and not any(n in fn.__name__ for n in args.kernels.split(",")):
                continue
            sig, const, attrs, options = specialise(fn, fargs, fkw)
            variants = [({}, options)]
            if args.configs == "all":
                variants = tuning_variants(fn, fargs, fkw, options)
            for override, opts in variants:
                cst = dict(const, **override)
                key = (
                    fn.__name__,
                    tuple(sorted(sig.items())),
                    tuple(sorted(cst.items(), key=str)),
                    tuple(sorted(opts.items())),
                )
                if key in seen:
                    continue
                seen.add(key)
                where[len(jobs)] = case.label
                jobs.append((fn.__name__, fn.__module__, sig, cst, attrs, opts, args.arch))

    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_one, jobs))

    limit = SHARED_LIMIT.get(args.arch)
    import spectraformer_fused

    src_dir = os.path.dirname(os.path.dirname(os.path.abspath(spectraformer_fused.__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", src_dir, "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Triton kernels compiled for sm_{args.arch}",
        "",
        f"{now}; triton {triton.__version__}, torch {torch.__version__}, host {platform.machine()} "
        f"(no GPU needed); package at {commit}; `python -m bench.perf.compile_check --arch {args.arch} --cases {args.cases}"
        f" --configs {args.configs}`.",
        "regs: registers per thread; stack: bytes of local memory per thread (> 0: ptxas spilled); "
        "shared: bytes of shared memory per program.",
        "",
        "| kernel | first case | flags | warps | stages | regs | stack | shared | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bad = 0
    for i, (job, res) in enumerate(zip(jobs, results)):
        name, _, sig, const, _, opts, _ = job
        if "error" in res:
            bad += 1
            lines.append(
                f"| {name} | {where[i]} | {_flags(const)} | {opts['num_warps']} | {opts.get('num_stages', '')} "
                f"| FAILED: {res['error']} | | | {res['seconds']:.1f} |"
            )
            continue
        if limit is not None and res["shared"] > limit:
            bad += 1
        lines.append(
            f"| {name} | {where[i]} | {_flags(const)} | {opts['num_warps']} | {opts.get('num_stages', '')} | "
            f"{res['regs']} | {res['stack']} | {res['shared']} | {res['seconds']:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.check and bad:
        print(f"{bad} kernel(s) failed to compile or exceed the shared memory of sm_{args.arch}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
