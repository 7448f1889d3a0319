"""The accuracy, speed and memory report: ``python -m bench.report [--full] [--out DIR]``.

Writes ``bench/results/<device>-<date>/report.md`` with PNG plots and the raw numbers (CSV and JSON),
shows a progress bar while it runs and prints a short summary. Sections:

1. approximation quality of every component x weight pair against exact attention (reference backend);
2. kernel estimation error of every pair;
3. speed and memory of every available backend and peer over the sequence length;
4. the cost of each weight matrix (building W; a training step, fixed versus learnable);
5. training on generated tasks (ListOps, MQAR) with each attention (``bench/train.py``; ``--no-train`` skips it);
6. a practitioner's guide derived from the numbers above.

Quick mode (the default) is sized for a 2-core CPU (a few minutes); ``--full`` is meant for a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import spectraformer_fused as sf
from spectraformer_fused.weights import build_weights

from . import peers as peer_mod

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------
# Settings, environment
# ----------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    full: bool
    device: torch.device
    seeds: int
    acc_shape: tuple                       # B, T, H, D for the accuracy section
    ms: tuple
    scales: tuple                          # std of q and k: flat and peaked attention
    kest_m: int
    kest_shape: tuple                      # B, T, H, D for kernel estimation
    speed_T: tuple
    speed_shape: tuple                     # B, H, D, m
    speed_dtype: torch.dtype
    weight_shape: tuple                    # H, m, D for building W
    train_shape: tuple                     # B, T, E, H, m
    run_budget_s: float                    # timing budget per measured configuration
    slow_s: float                          # an implementation predicted slower than this at the next T is skipped
    speed_budget_s: float                  # wall-clock budget of the whole speed section
    kernels: tuple = ("softmax", "gaussian")


def make_settings(full: bool, device: torch.device) -> Settings:
    cuda = device.type == "cuda"
    if not full:
        speed_T = (1024, 4096, 16384) if cuda else (256, 1024, 4096)
        return Settings(False, device, 3, (2, 128, 2, 32), (16, 32, 64, 128, 256), (0.5, 1.0, 1.5), 64, (1, 64, 2, 32),
                        speed_T, (1, 8, 64, 128), torch.bfloat16 if cuda else torch.float32, (8, 128, 64),
                        (2, 256, 256, 4, 128), 0.5, 4.0, 90.0 if cuda else 200.0)
    speed_T = (1024, 2048, 4096, 8192, 16384, 32768, 65536) if cuda else (256, 512, 1024, 2048, 4096, 8192)
    return Settings(True, device, 5, (2, 256, 2, 32), (16, 32, 64, 128, 256, 512), (0.5, 1.0, 1.5), 64,
                    (2, 64, 2, 32), speed_T, (1, 8, 64, 128), torch.bfloat16 if cuda else torch.float32,
                    (8, 128, 64), (4, 512, 256, 4, 128), 1.0 if not cuda else 0.5, 20.0 if not cuda else 2.0,
                    120.0 if cuda else 900.0)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{name} ({os.cpu_count()} logical CPUs)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def versions() -> dict:
    out = {"torch": torch.__version__, "spectraformer_fused": sf.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "absent"
    return out


@dataclass
class Context:
    device: str
    date: str
    versions: dict
    mode: str
    load: list = field(default_factory=list)
    threads: dict = field(default_factory=dict)
    default_threads: int = 1

    def line(self, dtype: str, section: str | None = None) -> str:
        v = self.versions
        n = self.threads.get(section)
        threads = "" if n is None else f" | {n} of {self.default_threads} threads"
        return (f"device: {self.device}{threads} | dtype: {dtype} | torch {v['torch']}, triton {v['triton']}, "
                f"spectraformer_fused {v['spectraformer_fused']} | {self.date} | mode: {self.mode}")

    def use_threads(self, section: str, device: torch.device) -> None:
        if device.type == "cpu":
            self.threads[section] = pick_threads(self.default_threads)

    def fields(self, dtype: str) -> dict:
        return {"device": self.device, "dtype": dtype, "torch": self.versions["torch"],
                "triton": self.versions["triton"], "spectraformer_fused": self.versions["spectraformer_fused"],
                "date": self.date, "threads": torch.get_num_threads()}


def pick_threads(default: int) -> int:
    """The thread count for the next section: ``default`` unless OpenMP with ``default`` threads is slower
    than one thread right now (other processes busy on the same cores make its barriers stall)."""
    if default <= 1:
        return torch.get_num_threads()
    a = torch.randn(256, 256)

    def best(n):
        torch.set_num_threads(n)
        a @ a
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(10):
                a @ a
            times.append(time.perf_counter() - t0)
        return min(times)

    n = default if best(default) <= best(1) else 1
    torch.set_num_threads(n)
    return n


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class _Bar:
    """tqdm when installed, else a silent stand-in."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True,
                             mininterval=0.5 if sys.stderr.isatty() else 5.0)
        except ImportError:
            self._bar = None

    def update(self, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------------
# Section 1: approximation quality
# ----------------------------------------------------------------------------------------------------

def _qkv(shape, s: float, seed: int, device, dtype=torch.float32):
    B, T, H, D = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=dtype) * s
    k = torch.randn(B, T, H, D, generator=gen, dtype=dtype) * s
    v = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


def attention_entropy(q, k, kernel: str) -> float:
    """Mean row entropy (nats) of the exact attention weights."""
    logits = sf.reference.exact_logits(q, k, kernel=kernel)
    logp = torch.log_softmax(logits, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def _err(o, ref, v) -> float:
    return float((o.double() - ref.double()).norm() / v.double().norm())


def run_accuracy(st: Settings, ctx: Context):
    pairs = [(c, w) for c in sf.COMPONENTS for w in sf.WEIGHTS]
    B, T, H, D = st.acc_shape
    dev = st.device
    rows, settings_info = [], []
    total = len(pairs) * len(st.ms) * st.seeds * len(st.kernels)
    bar = _Bar(total, "1/4 accuracy")
    data = {}                                     # (kernel, s, seed) -> q, k, v, exact
    for kernel in st.kernels:
        for s in st.scales:
            ent, base = [], []
            for seed in range(st.seeds):
                q, k, v = _qkv(st.acc_shape, s, seed, dev)
                ref = sf.exact_attention(q, k, v, kernel=kernel)
                uniform = v.mean(1, keepdim=True).expand_as(v)
                data[kernel, s, seed] = (q, k, v, ref)
                ent.append(attention_entropy(q, k, kernel))
                base.append(_err(uniform, ref, v))
            settings_info.append({"kernel": kernel, "s": s, "entropy": statistics.fmean(ent),
                                  "max_entropy": math.log(T), "uniform_mean": statistics.fmean(base),
                                  "uniform_std": statistics.pstdev(base)})
    for kernel in st.kernels:
        for i, (comp, wname) in enumerate(pairs):
            if dev.type == "cpu" and i % 9 == 8:      # load changes: re-pick the thread count (speed only)
                pick_threads(ctx.default_threads)
            for m in st.ms:
                errs = {s: [] for s in st.scales}
                reason = None
                for seed in range(st.seeds):
                    if reason is None:
                        try:
                            fm = sf.RandomFeatureMap(D, m, component=comp, weights=wname, kernel=kernel,
                                                     num_heads=H, seed=1000 + seed, device=dev).eval()
                            with torch.no_grad():            # every scale in one call, stacked on B
                                q, k, v = (torch.cat([data[kernel, s, seed][i] for s in st.scales]) for i in range(3))
                                o = sf.rf_attention(q, k, v, fm, backend="reference").split(B)
                                for s, o_s in zip(st.scales, o):
                                    _, _, v_s, ref = data[kernel, s, seed]
                                    errs[s].append(_err(o_s, ref, v_s))
                        except Exception as exc:       # an unsupported pair/size is recorded, not fatal
                            reason = f"{type(exc).__name__}: {exc}"
                    bar.update()
                for s in st.scales:
                    vals = errs[s]
                    finite = [e for e in vals if math.isfinite(e)]
                    row = {"section": "accuracy", "kernel": kernel, "s": s, "component": comp, "weights": wname,
                           "m": m, "seeds": st.seeds, "B": B, "T": T, "H": H, "D": D, **ctx.fields("float32")}
                    if reason is not None or not vals:
                        row.update(mean=None, std=None, status=f"n/a ({reason})")
                    elif len(finite) < len(vals):
                        row.update(mean=float("nan"), std=float("nan"), status="non-finite output")
                    else:
                        row.update(mean=statistics.fmean(vals), std=statistics.pstdev(vals), status="ok")
                    rows.append(row)
    bar.close()
    base = {(i["kernel"], i["s"]): i["uniform_mean"] for i in settings_info}
    for r in rows:
        u = base[r["kernel"], r["s"]]
        r["uniform"] = u
        r["worse_than_uniform"] = (r["mean"] is not None and not (r["mean"] < u))
    return rows, settings_info


# ----------------------------------------------------------------------------------------------------
# Section 2: kernel estimation
# ----------------------------------------------------------------------------------------------------

def run_kernel_estimation(st: Settings, ctx: Context):
    B, T, H, D = st.kest_shape
    m = st.kest_m
    rows = []
    bar = _Bar(len(sf.COMPONENTS) * len(sf.WEIGHTS) * len(st.kernels), "2/4 kernel estimates")
    for kernel in st.kernels:
        for comp in sf.COMPONENTS:
            for wname in sf.WEIGHTS:
                for s in (st.scales[0], st.scales[-1]):
                    mse, rel, reason = [], [], None
                    for seed in range(st.seeds):
                        q, k, _ = _qkv(st.kest_shape, s, 77 + seed, st.device)
                        try:
                            fm = sf.RandomFeatureMap(D, m, component=comp, weights=wname, kernel=kernel,
                                                     num_heads=H, seed=2000 + seed, device=st.device).eval()
                            with torch.no_grad():
                                est = fm.kernel_estimate(q, k).double()
                            exact = sf.exact_kernel(q, k, kernel=kernel).double()
                            err = float(((est - exact) ** 2).mean())
                            mse.append(err)
                            rel.append(err / float((exact ** 2).mean()))
                        except Exception as exc:
                            reason = f"{type(exc).__name__}: {exc}"
                            break
                    row = {"section": "kernel", "kernel": kernel, "s": s, "component": comp, "weights": wname,
                           "m": m, "seeds": st.seeds, "B": B, "T": T, "H": H, "D": D, **ctx.fields("float32")}
                    if reason is not None:
                        row.update(mse=None, rel_mse=None, status=f"n/a ({reason})")
                    else:
                        row.update(mse=statistics.fmean(mse), rel_mse=statistics.fmean(rel), status="ok")
                    rows.append(row)
                bar.update()
    bar.close()
    return rows


# ----------------------------------------------------------------------------------------------------
# Timing, memory, roofline
# ----------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, budget_s: float) -> tuple:
    """(median, p20, p80, min) in ms. GPU: triton.testing.do_bench; CPU: perf_counter over N runs after one
    warm-up run, N adaptive to the budget (at least 3 unless one run is much longer than the budget)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            med, lo, hi = do_bench(fn, warmup=10, rep=max(20, int(budget_s * 100)), quantiles=[0.5, 0.2, 0.8])
            return med, lo, hi, lo
        except ImportError:
            pass
    t0 = time.perf_counter()
    fn()                                               # warm-up, not counted
    _sync(device)
    first = time.perf_counter() - t0
    min_runs = 3 if first < 2 * budget_s else (2 if first < 8 * budget_s else 1)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < 25 and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e3    # noqa: E731
    return statistics.median(times) * 1e3, q(0.2), q(0.8), times[0] * 1e3


@contextlib.contextmanager
def _quiet_fds():
    """Silence what the profiler's C++ side writes to stdout/stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def peak_memory(fn, device) -> float | None:
    """Peak bytes allocated during one call beyond what was allocated before it.

    GPU: torch.cuda.max_memory_allocated. CPU: torch.profiler's allocation events replayed in time order
    (allocations at their op's start, frees at its end); None when the profiler gives nothing."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fds():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    points = []
    for e in prof.events():
        b = e.self_cpu_memory_usage
        if b > 0:
            points.append((e.time_range.start, b))
        elif b < 0:
            points.append((e.time_range.end, b))
    if not points:
        return None
    points.sort()
    cur = best = 0
    for _, b in points:
        cur += b
        best = max(best, cur)
    return float(best)


def measure_roofline(device, dtype) -> dict:
    """Matmul throughput and copy bandwidth measured now, on this device."""
    if device.type == "cuda":
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_fn(lambda: a @ b, device, 0.5)[3]
        flops = 2 * n ** 3 / (ms * 1e-3)
        x = torch.empty(256 * 2 ** 20, device=device, dtype=torch.uint8)
        y = torch.empty_like(x)
        ms_c = time_fn(lambda: y.copy_(x), device, 0.5)[3]
        bw = 2 * x.numel() / (ms_c * 1e-3)
        return {"peak_flops": flops, "peak_bw": bw, "how": f"{dtype_name(dtype)} {n}x{n} matmul and a 256 MiB "
                f"device-to-device copy"}
    n = 2048
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    ms = time_fn(lambda: torch.mm(a, b), device, 0.6)[3]
    flops = 2 * n ** 3 / (ms * 1e-3)
    x = torch.randn(32 * 2 ** 20 // 4)
    y = torch.empty_like(x)
    ms_c = time_fn(lambda: y.copy_(x), device, 0.3)[3]
    bw = 2 * x.numel() * 4 / (ms_c * 1e-3)
    return {"peak_flops": flops, "peak_bw": bw, "how": f"best of several fp32 torch.mm {n}x{n} and 32 MiB "
            f"copies, {torch.get_num_threads()} threads"}


def useful_work(exact: bool, B, T, H, D, Dv, F, m, causal: bool, backward: bool, elem: int) -> tuple:
    """(FLOPs, bytes) of the algorithm, not of an implementation: exact attention 4BHT^2D (half when
    causal; backward 2.5x the forward); random features: the linear (recurrent) form, 4BHTmD for the two
    feature maps plus 4BHTF(Dv+1) for the state and the read-out (backward 2x the forward). Bytes: q, k, v
    read and o written once (forward); backward adds do, q, k, v read and dq, dk, dv written."""
    if exact:
        f = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
        f = f * 3.5 if backward else f
    else:
        f = B * H * T * (4.0 * m * D + 4.0 * F * (Dv + 1))
        f = f * 3.0 if backward else f
    by = B * T * H * (2 * D + 2 * Dv) * elem
    if backward:
        by += B * T * H * (4 * D + 3 * Dv) * elem
    return f, float(by)


# ----------------------------------------------------------------------------------------------------
# Section 3: speed and memory
# ----------------------------------------------------------------------------------------------------

def speed_implementations(st: Settings):
    """[(name, make(fm, causal) -> fn, exact)] and a list of skip lines."""
    impls, skipped = [], []
    t0 = time.perf_counter()
    backends = sf.available_backends()
    discover_s = time.perf_counter() - t0
    for name in ("reference", "cpu", "triton"):
        if name not in backends:
            why = ("the compiled CPU extension is not available" if name == "cpu" else "triton is not importable")
            skipped.append(f"backend {name!r}: not available in this process ({why})")
            continue
        if name == "triton" and st.device.type != "cuda":
            skipped.append("backend 'triton': on the CPU Triton runs through its interpreter, which is a "
                           "correctness tool, not a performance path; timed on CUDA only")
            continue
        if name == "cpu" and st.device.type != "cpu":
            skipped.append("backend 'cpu': needs CPU tensors; this run times CUDA tensors")
            continue
        impls.append((f"sf-{name}", (lambda b: lambda fm, causal: (
            lambda q, k, v: sf.rf_attention(q, k, v, fm, causal=causal, backend=b)))(name), False))
    for p in peer_mod.peers(st.device):
        if p.skip_reason is not None:
            skipped.append(f"peer {p.name!r}: {p.skip_reason}")
        else:
            impls.append((p.name, p.make, p.exact))
    return impls, skipped, discover_s


def run_speed(st: Settings, ctx: Context):
    B, H, D, m = st.speed_shape
    Dv = D
    dev, dt = st.device, st.speed_dtype
    impls, skipped, discover_s = speed_implementations(st)
    fm = sf.RandomFeatureMap(D, m, component="posrf", weights="orf", num_heads=H, seed=0, device=dev).eval()
    F = fm.feature_dim
    roof = measure_roofline(dev, dt)
    elem = torch.tensor([], dtype=dt).element_size()
    rows, dead = [], {}
    configs = [(T, causal, bwd) for T in st.speed_T for causal in (False, True) for bwd in (False, True)]
    start = time.perf_counter()
    bar = _Bar(len(configs) * len(impls), "3/4 speed")
    for T, causal, bwd in configs:
        gen = torch.Generator().manual_seed(T)
        q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(dev, dt) for _ in range(4))
        for name, make, exact in impls:
            key = (name, causal, bwd)
            row = {"section": "speed", "impl": name, "T": T, "causal": causal,
                   "mode": "fwd+bwd" if bwd else "fwd", "B": B, "H": H, "D": D, "m": m,
                   "component": "-" if exact else "posrf", "weights": "-" if exact else "orf", **ctx.fields(dtype_name(dt))}
            if key not in dead and time.perf_counter() - start > st.speed_budget_s:
                dead[key] = f"skipped: speed section past its {st.speed_budget_s:.0f} s budget"
            if key in dead:
                row.update(ms=None, status=dead[key])
                rows.append(row)
                bar.update()
                continue
            try:
                fn_core = make(fm, causal)
                if bwd:
                    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

                    def fn(fn_core=fn_core, qq=qq, kk=kk, vv=vv):
                        for t in (qq, kk, vv):
                            t.grad = None
                        fn_core(qq, kk, vv).backward(do)
                else:
                    def fn(fn_core=fn_core):
                        with torch.no_grad():
                            fn_core(q, k, v)
                med, lo, hi, best = time_fn(fn, dev, st.run_budget_s)
                mem = peak_memory(fn, dev)
                flops, nbytes = useful_work(exact, B, T, H, D, Dv, F, m, causal, bwd, elem)
                row.update(ms=med, ms_p20=lo, ms_p80=hi, ms_min=best, tokens_per_s=B * T / (med * 1e-3),
                           peak_mem_bytes=mem, flops=flops, bytes=nbytes, gflops=flops / (med * 1e-3) / 1e9,
                           status="ok")
                later = [t for t in st.speed_T if t > T]
                if later and not exact:
                    predicted = best * 1e-3 * later[0] / T         # fastest run, linear in T at best
                    if predicted > st.slow_s:
                        dead[key] = f"skipped: {best / 1e3:.2f} s at T={T}, predicted > {st.slow_s:.0f} s"
            except torch.cuda.OutOfMemoryError:
                row.update(ms=None, status="OOM")
                dead[key] = f"skipped: OOM at T={T}"
                torch.cuda.empty_cache()
            except Exception as exc:                 # a failing implementation is reported, not fatal
                row.update(ms=None, status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
            rows.append(row)
            bar.update()
        del q, k, v, do
    bar.close()
    again = measure_roofline(dev, dt)                   # the best of the section's start and end
    roof = {"peak_flops": max(roof["peak_flops"], again["peak_flops"]),
            "peak_bw": max(roof["peak_bw"], again["peak_bw"]), "how": roof["how"] + ", at the start and end"}
    for r in rows:
        if r.get("ms") is not None:
            t_roof = max(r["flops"] / roof["peak_flops"], r["bytes"] / roof["peak_bw"])
            r["roofline_frac"] = t_roof / (r["ms"] * 1e-3)
    cross = crossovers(rows, st.speed_T)
    state_bytes = B * H * F * (Dv + 1) * 4
    return rows, {"skipped": skipped, "roofline": roof, "crossover": cross, "state_bytes": state_bytes,
                  "discover_s": discover_s, "F": F}


def crossovers(rows, Ts):
    """For each non-exact implementation and (causal, mode): the first T where it is faster than SDPA."""
    sdpa = {(r["T"], r["causal"], r["mode"]): r["ms"] for r in rows if r["impl"] == "torch-sdpa"}
    out = []
    names = sorted({r["impl"] for r in rows if r["impl"] != "torch-sdpa"})
    for name in names:
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                first = None
                for T in Ts:
                    r = next((r for r in rows if r["impl"] == name and r["T"] == T and r["causal"] == causal
                              and r["mode"] == mode), None)
                    ref = sdpa.get((T, causal, mode))
                    if r and r["ms"] is not None and ref is not None and r["ms"] < ref:
                        first = T
                        break
                out.append({"impl": name, "causal": causal, "mode": mode, "first_T_faster_than_sdpa": first})
    return out


# ----------------------------------------------------------------------------------------------------
# Section 4: cost of the weight matrices
# ----------------------------------------------------------------------------------------------------

def run_weight_cost(st: Settings, ctx: Context):
    H, m, D = st.weight_shape
    dev = st.device
    build_rows, train_rows = [], []
    backends = [b for b in sf.available_backends() if (b != "triton" or dev.type == "cuda")
                and (b != "cpu" or dev.type == "cpu")]
    train_weights = ("orf",) + tuple(sf.LEARNABLE_WEIGHTS)
    bar = _Bar(len(sf.WEIGHTS) + len(train_weights) * len(backends), "4/4 weight cost")
    for wname in sf.WEIGHTS:
        row = {"section": "weights", "weights": wname, "H": H, "m": m, "D": D, **ctx.fields("float32")}
        try:
            seeds = iter(range(10 ** 6))

            def build():
                w = build_weights(wname, H, m, D, seed=next(seeds), device=dev)
                w.projection()

            med, lo, hi, _ = time_fn(build, dev, 0.3)
            w = build_weights(wname, H, m, D, seed=0, device=dev)
            stored = sum(t.numel() * t.element_size() for t in list(w.parameters()) + list(w.buffers()))
            trainable = sum(p.numel() for p in w.parameters() if p.requires_grad)
            dense = H * m * D * 4
            row.update(build_ms=med, build_ms_p20=lo, build_ms_p80=hi, stored_bytes=stored, dense_bytes=dense,
                       trainable_params=trainable, status="ok")
        except Exception as exc:
            row.update(build_ms=None, status=f"error: {type(exc).__name__}: {exc}")
        build_rows.append(row)
        bar.update()
    B, T, E, Hh, mm = st.train_shape
    for backend in backends:
        for wname in train_weights:
            for causal in (False,):
                row = {"section": "train", "weights": wname, "backend": backend, "causal": causal, "B": B, "T": T,
                       "E": E, "H": Hh, "m": mm, "component": "posrf", **ctx.fields(dtype_name(st.speed_dtype))}
                try:
                    torch.manual_seed(0)
                    model = sf.SpectraAttention(E, Hh, num_features=mm, component="posrf", weights=wname,
                                                causal=causal, seed=0, backend=backend, device=dev)
                    model = model.to(st.speed_dtype) if dev.type == "cuda" else model
                    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                    x = torch.randn(B, T, E, device=dev, dtype=st.speed_dtype)

                    def step():
                        opt.zero_grad(set_to_none=True)
                        model(x).float().pow(2).mean().backward()
                        opt.step()

                    med, lo, hi, _ = time_fn(step, dev, st.run_budget_s)
                    mem = peak_memory(step, dev)
                    fm_params = sum(p.numel() for p in model.feature_map.parameters() if p.requires_grad)
                    row.update(step_ms=med, step_ms_p20=lo, step_ms_p80=hi, peak_mem_bytes=mem,
                               feature_map_trainable=fm_params, status="ok")
                except Exception as exc:
                    row.update(step_ms=None, status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
                train_rows.append(row)
                bar.update()
    bar.close()
    return build_rows, train_rows


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_accuracy(rows, info, st: Settings, out: str, ctx: Context) -> list[str]:
    plt = _plt()
    if plt is None:
        return []
    import numpy as np

    files = []
    comps, weights = list(sf.COMPONENTS), list(sf.WEIGHTS)
    for setting in info:
        kernel, s = setting["kernel"], setting["s"]
        sel = [r for r in rows if r["kernel"] == kernel and r["s"] == s]
        fig, axes = plt.subplots(1, len(st.ms), figsize=(4.3 * len(st.ms) + 1, 4.6), squeeze=False)
        finite = [r["mean"] for r in sel if r["mean"] is not None and math.isfinite(r["mean"]) and r["mean"] > 0]
        vmin = min(finite + [setting["uniform_mean"] / 4])
        vmax = max(min(max(finite + [vmin * 2]), 4 * setting["uniform_mean"]), vmin * 2)   # saturate outliers
        for ax, m in zip(axes[0], st.ms):
            grid = np.full((len(comps), len(weights)), np.nan)
            for r in sel:
                if r["m"] == m and r["mean"] is not None:
                    grid[comps.index(r["component"]), weights.index(r["weights"])] = r["mean"]
            from matplotlib.colors import LogNorm

            im = ax.imshow(np.clip(grid, vmin, vmax), cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax),
                           aspect="auto")
            for i in range(len(comps)):
                for j in range(len(weights)):
                    val = grid[i, j]
                    txt = "n/a" if np.isnan(val) else (f"{val:.2g}" if val < 10 else f"{val:.0f}")
                    bad = not np.isnan(val) and val >= setting["uniform_mean"]
                    ax.text(j, i, txt, ha="center", va="center", fontsize=6.5,
                            color="red" if bad else "white", fontweight="bold" if bad else "normal")
            ax.set_xticks(range(len(weights)), weights, rotation=70, fontsize=7)
            ax.set_yticks(range(len(comps)), comps if m == st.ms[0] else [""] * len(comps), fontsize=8)
            ax.set_title(f"m = {m}", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="||o - o_exact|| / ||v|| (saturated at 4x uniform)")
        fig.suptitle(f"{kernel} kernel, q,k ~ N(0, {s}^2), entropy {setting['entropy']:.2f} of "
                     f"{setting['max_entropy']:.2f} nats; uniform baseline {setting['uniform_mean']:.3f} "
                     f"(red = not better than uniform)\n{ctx.line('float32', 'accuracy')}", fontsize=8)
        name = f"accuracy_heatmap_{kernel}_s{s}.png"
        fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)

        fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True, squeeze=False)
        for ax, comp in zip(axes.flat, comps):
            for wname in weights:
                pts = sorted((r["m"], r["mean"], r["std"]) for r in sel if r["component"] == comp
                             and r["weights"] == wname and r["mean"] is not None and math.isfinite(r["mean"]))
                if pts:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, lw=1, capsize=2, label=wname)
            ax.axhline(setting["uniform_mean"], color="k", ls="--", lw=1, label="uniform attention")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(comp, fontsize=9)
            ax.set_xlabel("m")
        axes[0, 0].set_ylabel("||o - o_exact|| / ||v||")
        axes[0, 0].legend(fontsize=6, ncol=2)
        fig.suptitle(f"error against m, {kernel} kernel, s = {s}\n{ctx.line('float32', 'accuracy')}", fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        name = f"accuracy_vs_m_{kernel}_s{s}.png"
        fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def plot_speed(rows, st: Settings, out: str, ctx: Context) -> list[str]:
    plt = _plt()
    if plt is None:
        return []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    names = sorted({r["impl"] for r in rows})
    for i, causal in enumerate((False, True)):
        for j, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[i, j]
            for name in names:
                pts = sorted((r["T"], r["ms"]) for r in rows if r["impl"] == name and r["causal"] == causal
                             and r["mode"] == mode and r["ms"] is not None)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=name, ls="--" if name == "torch-sdpa" else "-",
                            color=f"C{names.index(name) % 10}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    B, H, D, m = st.speed_shape
    fig.suptitle(f"B={B} H={H} D={D} m={m} posrf/orf\n{ctx.line(dtype_name(st.speed_dtype), 'speed')}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    name = "speed.png"
    fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [name]


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------

def _fmt(x, spec=".3g"):
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return format(x, spec)


def _mib(b):
    return "n/a" if b is None else f"{b / 2 ** 20:.1f}"


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _uniform_summary(acc, info, st: Settings, max_listed: int = 5) -> list[str]:
    """The cells not better than uniform attention, summarised: counts per component and setting, per m,
    and the exceptions to each component's majority (the tables and heatmaps of section 1 show every cell)."""
    bad = [r for r in acc if r["worse_than_uniform"]]
    if not bad:
        return ["**Pairs not better than uniform attention**: none.", ""]
    settings = [(i["kernel"], i["s"]) for i in info]
    out = [f"**Pairs not better than uniform attention**: {len(bad)} of {len(acc)} cells (marked **!** in section 1; "
           "the heatmaps show where). Cells per component and setting not better than uniform, out of "
           f"{len(sf.WEIGHTS)} weights x {len(st.ms)} values of m:", ""]
    rows = []
    for comp in sf.COMPONENTS:
        cells = []
        for kernel, s in settings:
            sel = [r for r in acc if r["component"] == comp and r["kernel"] == kernel and r["s"] == s]
            cells.append(f"{sum(r['worse_than_uniform'] for r in sel)} / {len(sel)}")
        rows.append((comp, *cells))
    out += _table(("component", *[f"{k} s={s}" for k, s in settings]), rows)
    out += ["", "By m (all components, weights and settings): " + ", ".join(
        f"m={m}: {sum(r['worse_than_uniform'] for r in acc if r['m'] == m)} / {sum(1 for r in acc if r['m'] == m)}"
        for m in st.ms) + ".", ""]
    exceptions = []
    for kernel, s in settings:
        for comp in sf.COMPONENTS:
            sel = [r for r in acc if r["component"] == comp and r["kernel"] == kernel and r["s"] == s
                   and r["mean"] is not None]
            nbad = sum(r["worse_than_uniform"] for r in sel)
            if not sel or nbad in (0, len(sel)):
                continue
            mostly_bad = 2 * nbad > len(sel)
            odd = [r for r in sel if r["worse_than_uniform"] != mostly_bad]
            by_w = {}
            for r in odd:
                by_w.setdefault(r["weights"], []).append(str(r["m"]))
            names = [f"{w} (m={','.join(ms)})" for w, ms in list(by_w.items())[:max_listed]]
            more = f" and {len(by_w) - max_listed} more weights" if len(by_w) > max_listed else ""
            exceptions.append(f"- {kernel} s={s}, {comp}: mostly {'not ' if mostly_bad else ''}better than uniform; "
                              f"{'better' if mostly_bad else 'not better'}: {', '.join(names)}{more}")
    if exceptions:
        out += ["Exceptions to each component's majority:", ""] + exceptions + [""]
    return out


def guide(acc, info, kest, speed, speed_meta, build_rows, train_rows, st: Settings, train_results=()) -> list[str]:
    """Conclusions computed from the numbers; nothing here is written by hand."""
    out = []
    ok = [r for r in acc if r["mean"] is not None and math.isfinite(r["mean"])]
    out.append("**Most accurate pair** (lowest mean output error) per target, attention scale and m:")
    out.append("")
    rows = []
    for setting in info:
        for m in st.ms:
            sel = [r for r in ok if r["kernel"] == setting["kernel"] and r["s"] == setting["s"] and r["m"] == m]
            if sel:
                best = min(sel, key=lambda r: r["mean"])
                worst = max(sel, key=lambda r: r["mean"])
                rows.append((setting["kernel"], setting["s"], m, f"{best['component']} x {best['weights']}",
                             _fmt(best["mean"]), f"{worst['component']} x {worst['weights']}", _fmt(worst["mean"]),
                             _fmt(setting["uniform_mean"])))
    out += _table(("target", "s", "m", "best pair", "error", "worst pair", "error", "uniform"), rows)
    out.append("")
    ranks = {}
    for setting in info:
        for m in st.ms:
            sel = sorted((r for r in ok if r["kernel"] == setting["kernel"] and r["s"] == setting["s"]
                          and r["m"] == m), key=lambda r: r["mean"])
            for i, r in enumerate(sel):
                ranks.setdefault((r["component"], r["weights"]), []).append(i + 1)
    if ranks:
        top = sorted(ranks.items(), key=lambda kv: statistics.fmean(kv[1]))[:5]
        out.append("**Best pairs overall** (mean rank over every target, scale and m; rank 1 = most accurate): "
                   + "; ".join(f"{c} x {w} (mean rank {statistics.fmean(r):.1f})" for (c, w), r in top) + ".")
        out.append("")
    for target in st.kernels:
        comp_mean = {}
        for comp in sf.COMPONENTS:
            vals = [math.log(r["mean"]) for r in ok if r["kernel"] == target and r["component"] == comp and r["mean"] > 0]
            if vals:
                comp_mean[comp] = math.exp(statistics.fmean(vals))
        w_mean = {}
        for w in sf.WEIGHTS:
            vals = [math.log(r["mean"]) for r in ok if r["kernel"] == target and r["weights"] == w and r["mean"] > 0]
            if vals:
                w_mean[w] = math.exp(statistics.fmean(vals))
        if comp_mean and w_mean:
            out.append(f"**{target} target**: components from best to worst (geometric-mean error over weights, "
                       f"m and scales): " + ", ".join(f"{c} {v:.3g}" for c, v in sorted(comp_mean.items(), key=lambda kv: kv[1]))
                       + ". Weights from best to worst: "
                       + ", ".join(f"{w} {v:.3g}" for w, v in sorted(w_mean.items(), key=lambda kv: kv[1])) + ".")
            out.append("")
    out += _uniform_summary(acc, info, st)
    kok = [r for r in kest if r["rel_mse"] is not None and math.isfinite(r["rel_mse"])]
    for target in st.kernels:
        sel = [r for r in kok if r["kernel"] == target]
        if sel:
            best = min(sel, key=lambda r: r["rel_mse"])
            out.append(f"**Kernel estimate, {target}**: lowest relative MSE {best['rel_mse']:.3g} by "
                       f"{best['component']} x {best['weights']} (s={best['s']}, m={best['m']}).")
    out.append("")
    rows = []
    for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            for T in st.speed_T:
                sel = [r for r in speed if r["T"] == T and r["causal"] == causal and r["mode"] == mode
                       and r["ms"] is not None]
                if sel:
                    best = min(sel, key=lambda r: r["ms"])
                    rf = [r for r in sel if r["impl"] != "torch-sdpa"]
                    best_rf = min(rf, key=lambda r: r["ms"]) if rf else None
                    rows.append(("causal" if causal else "non-causal", mode, T, best["impl"], _fmt(best["ms"]),
                                 best_rf["impl"] if best_rf else "n/a", _fmt(best_rf["ms"]) if best_rf else "n/a"))
    out.append("**Fastest implementation per T** (median ms):")
    out.append("")
    out += _table(("", "mode", "T", "fastest", "ms", "fastest random-feature", "ms"), rows)
    out.append("")
    cross = [c for c in speed_meta["crossover"] if c["first_T_faster_than_sdpa"] is not None]
    if cross:
        out.append("**Where random features overtake exact attention** (first T of the sweep): "
                   + "; ".join(f"{c['impl']} {c['mode']} {'causal' if c['causal'] else 'non-causal'}: "
                               f"T={c['first_T_faster_than_sdpa']}" for c in cross) + ".")
    else:
        out.append(f"**Where random features overtake exact attention**: nowhere in T <= {max(st.speed_T)}.")
    out.append("")
    bok = [r for r in build_rows if r.get("build_ms") is not None]
    if bok:
        fast = min(bok, key=lambda r: r["build_ms"])
        slow = max(bok, key=lambda r: r["build_ms"])
        out.append(f"**Building W**: cheapest {fast['weights']} ({fast['build_ms']:.3g} ms), most expensive "
                   f"{slow['weights']} ({slow['build_ms']:.3g} ms).")
    for backend in sorted({r["backend"] for r in train_rows}):
        base = next((r for r in train_rows if r["backend"] == backend and r["weights"] == "orf"
                     and r["step_ms"] is not None), None)
        if base is None:
            continue
        parts = []
        for r in train_rows:
            if r["backend"] == backend and r["weights"] != "orf" and r["step_ms"] is not None:
                parts.append(f"{r['weights']} {100 * (r['step_ms'] / base['step_ms'] - 1):+.0f}%")
        if parts:
            out.append(f"**Learnable weights, training step on backend {backend!r}** (relative to orf, "
                       f"{base['step_ms']:.3g} ms): " + ", ".join(parts) + ".")
    out.append("")
    if train_results:
        from . import train as train_mod

        out += train_mod.guide_lines(train_results)
    return out


def write_markdown(path, ctx, st, acc, info, kest, speed, speed_meta, build_rows, train_rows, plots, elapsed,
                   train_results=()):
    L = []
    f32 = ctx.line("float32", "accuracy")
    sdt = ctx.line(dtype_name(st.speed_dtype), "speed")
    kln = ctx.line("float32", "kernel")
    wln = ctx.line("float32", "weights")
    tln = ctx.line(dtype_name(st.speed_dtype), "weights")
    L += [f"# spectraformer_fused report ({ctx.mode} mode)", "", f"{sdt}", "",
          f"Generated by `python -m bench.report{' --full' if st.full else ''}` in {elapsed:.0f} s. "
          f"Every number below was measured in this run; the guide in section 7 is computed from them.", "",
          f"1-minute load average at start / end: {ctx.load[0]} / {ctx.load[-1]} on {os.cpu_count()} logical CPUs "
          "(CPU timings are medians under that load). "
          "Before each section the run compares OpenMP with all threads against one thread on a small matmul "
          "and uses one thread when all threads are slower (busy cores make OpenMP barriers stall); each "
          "section names the thread count it used.", ""]

    B, T, H, D = st.acc_shape
    L += ["## 1. Approximation quality", "", f"_{f32}_", "",
          f"Relative error ||o - o_exact|| / ||v|| of `rf_attention(..., backend=\"reference\")` (non-causal, "
          f"default scale D^-1/2) against `exact_attention` with the same kernel; B={B} T={T} H={H} D={D}; "
          f"q, k ~ N(0, s^2), v ~ N(0, 1); mean +- std over {st.seeds} seeds (inputs and W both redrawn). "
          "Baseline: uniform attention (every output is the mean of v). "
          "**!** marks a pair whose error is not below the baseline.", ""]
    L += _table(("target", "s", "mean attention entropy (nats)", "max = ln T", "uniform baseline error"),
                [(i["kernel"], i["s"], f"{i['entropy']:.3f}", f"{i['max_entropy']:.3f}",
                  f"{i['uniform_mean']:.4f} +- {i['uniform_std']:.4f}") for i in info])
    L.append("")
    for setting in info:
        kernel, s = setting["kernel"], setting["s"]
        L += [f"### {kernel} kernel, s = {s} (entropy {setting['entropy']:.2f} nats; uniform "
              f"{setting['uniform_mean']:.4f})", "", f"_{f32}_", ""]
        table, reasons = [], {}
        for comp in sf.COMPONENTS:
            for w in sf.WEIGHTS:
                cells = []
                for m in st.ms:
                    r = next(r for r in acc if r["kernel"] == kernel and r["s"] == s and r["component"] == comp
                             and r["weights"] == w and r["m"] == m)
                    if r["mean"] is None:
                        cells.append("n/a")
                        reasons.setdefault(r["status"], []).append(f"{comp} x {w} m={m}")
                    else:
                        cells.append(f"{_fmt(r['mean'])} +- {_fmt(r['std'], '.2g')}"
                                     + (" **!**" if r["worse_than_uniform"] else ""))
                table.append((comp, w, *cells))
        L += _table(("component", "weights", *[f"m={m}" for m in st.ms]), table)
        for why, where in reasons.items():
            L.append(f"\n- {why}: {', '.join(where)}")
        L.append("")
        for p in plots:
            if p.startswith(f"accuracy_heatmap_{kernel}_s{s}") or p.startswith(f"accuracy_vs_m_{kernel}_s{s}"):
                L += [f"![{p}]({p})", ""]

    B, T, H, D = st.kest_shape
    L += ["## 2. Kernel estimation", "", f"_{kln}_", "",
          f"Mean squared error of `RandomFeatureMap.kernel_estimate(q, k)` against `exact_kernel` over all "
          f"{T}x{T} pairs, m={st.kest_m}, B={B} H={H} D={D}, mean over {st.seeds} seeds; in parentheses the MSE "
          "relative to mean(K^2).", ""]
    scales = (st.scales[0], st.scales[-1])
    cols = [(kernel, s) for kernel in st.kernels for s in scales]
    table, reasons = [], {}
    for comp in sf.COMPONENTS:
        for w in sf.WEIGHTS:
            cells = []
            for kernel, s in cols:
                r = next(r for r in kest if r["kernel"] == kernel and r["s"] == s and r["component"] == comp
                         and r["weights"] == w)
                if r["mse"] is None:
                    cells.append("n/a")
                    reasons.setdefault(r["status"], []).append(f"{comp} x {w}")
                else:
                    cells.append(f"{_fmt(r['mse'])} ({_fmt(r['rel_mse'])})")
            table.append((comp, w, *cells))
    L += _table(("component", "weights", *[f"{k} s={s}" for k, s in cols]), table)
    for why, where in reasons.items():
        L.append(f"\n- {why}: {', '.join(where)}")
    L.append("")

    B, H, D, m = st.speed_shape
    roof = speed_meta["roofline"]
    L += ["## 3. Speed and memory", "", f"_{sdt}_", "",
          f"B={B} H={H} D=Dv={D} m={m} (feature width F={speed_meta['F']}), posrf x orf for the random-feature "
          f"implementations. Times: "
          + ("`triton.testing.do_bench` median (p20-p80), warm-up excluded. " if st.device.type == "cuda" else
             "`time.perf_counter` median (p20-p80) of N runs after one warm-up run. ")
          + "Memory: peak bytes allocated during one call beyond what was allocated before it ("
          + ("`torch.cuda.max_memory_allocated`" if st.device.type == "cuda" else
             "torch.profiler allocation events replayed in time order; approximate")
          + f"). The recurrent state of random-feature attention is S [B,H,F,Dv] + z [B,H,F] in fp32 = "
          f"{speed_meta['state_bytes'] / 2 ** 10:.0f} KiB here. Roofline measured in this run: "
          f"{roof['peak_flops'] / 1e9:.1f} GFLOP/s and {roof['peak_bw'] / 1e9:.1f} GB/s ({roof['how']}); "
          "'roofline' = max(useful FLOPs / peak FLOP/s, useful bytes / peak bandwidth) / measured time, with "
          "useful work that of the algorithm (exact: 4BHT^2D, half when causal, backward 2.5x; random features: "
          "the linear form 4BHTmD + 4BHTF(Dv+1), backward 2x).", ""]
    if speed_meta["skipped"]:
        L += ["Skipped:", ""] + [f"- {s}" for s in speed_meta["skipped"]] + [""]
    table = []
    for r in speed:
        if r["ms"] is None:
            table.append((r["impl"], "causal" if r["causal"] else "non-causal", r["mode"], r["T"], r["status"],
                          "", "", "", "", ""))
        else:
            table.append((r["impl"], "causal" if r["causal"] else "non-causal", r["mode"], r["T"],
                          f"{r['ms']:.3g} ({r['ms_p20']:.3g}-{r['ms_p80']:.3g})", f"{r['tokens_per_s']:.3g}",
                          _mib(r["peak_mem_bytes"]), f"{r['gflops']:.3g}", f"{100 * r['roofline_frac']:.1f}%", r["status"]))
    L += _table(("implementation", "", "mode", "T", "ms", "tokens/s", "peak MiB", "GFLOP/s", "roofline", "status"),
                table)
    L += ["", "First T of the sweep where an implementation is faster than torch SDPA:", ""]
    L += _table(("implementation", "", "mode", "first T faster than SDPA"),
                [(c["impl"], "causal" if c["causal"] else "non-causal", c["mode"],
                  c["first_T_faster_than_sdpa"] or f"none up to {max(st.speed_T)}") for c in speed_meta["crossover"]])
    L.append("")
    for p in plots:
        if p.startswith("speed"):
            L += [f"![{p}]({p})", ""]

    H, m, D = st.weight_shape
    L += ["## 4. Cost of each weight matrix", "", f"_{wln}_", "",
          f"Building W (module construction + `projection()`) for H={H}, m={m}, D={D}, median ms; stored = bytes of "
          "the module's parameters and buffers; dense = the [H, m, D] fp32 matrix every backend reads.", ""]
    L += _table(("weights", "build ms", "stored KiB", "dense KiB", "trainable params", "status"),
                [(r["weights"], _fmt(r.get("build_ms")), _fmt(r.get("stored_bytes", 0) / 1024, ".1f"),
                  _fmt(r.get("dense_bytes", 0) / 1024, ".1f"), r.get("trainable_params", "n/a"), r["status"])
                 for r in build_rows])
    B, T, E, Hh, mm = st.train_shape
    L += ["", f"_{tln}_", "",
          f"Training step (SpectraAttention fwd + bwd + SGD step), B={B} T={T} E={E} H={Hh} m={mm}, posrf, "
          "non-causal, median ms; fixed (orf) versus learnable weights.", ""]
    L += _table(("backend", "weights", "step ms", "peak MiB", "trainable feature-map params", "status"),
                [(r["backend"], r["weights"], _fmt(r.get("step_ms")), _mib(r.get("peak_mem_bytes")),
                  r.get("feature_map_trainable", "n/a"), r["status"]) for r in train_rows])
    if train_results:
        from . import train as train_mod

        L += ["", "## 5. Training on generated tasks", "",
              f"`python -m bench.train{'' if st.full else ' --quick'}` inside this run: the model of the Spectraformer "
              "LRA study trained with each attention; files `train_<task>.*`.", ""]
        L += train_mod.section_markdown(train_results)
    L += fitting_section(os.path.dirname(os.path.abspath(path)))
    L += ["", "## 7. Practitioner's guide (computed from the tables above)", "", f"_{sdt}_", ""]
    L += guide(acc, info, kest, speed, speed_meta, build_rows, train_rows, st, train_results)
    L += ["Raw numbers: `accuracy.csv`, `kernel.csv`, `speed.csv`, `weights.csv`, `train.csv`, `report.json`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def fitting_section(out_dir: str) -> list[str]:
    """Section 6: the newest table of ``python -m bench.fit_report`` (fitted versus unfitted feature maps
    on held-out queries and keys). That script takes minutes per data set, so this report does not run it;
    it quotes the table as the script wrote it, naming the file and its own header (device, date)."""
    results = os.path.join(HERE, "results")
    files = sorted(f for f in os.listdir(results) if re.fullmatch(r"fit-\d{4}-\d{2}-\d{2}\.md", f)) \
        if os.path.isdir(results) else []
    L = ["", "## 6. Fitting the feature map to softmax attention", ""]
    if not files:
        return L + ["No table yet: `python -m bench.fit_report` writes `bench/results/fit-<date>.md`.", ""]
    with open(os.path.join(results, files[-1])) as f:
        lines = f.read().splitlines()
    header = next((ln for ln in lines if ln.startswith("device:")), "")
    table = [ln for ln in lines if ln.startswith("|")]
    rel = os.path.relpath(os.path.join(results, files[-1]), out_dir)
    return L + [f"Quoted from [`{files[-1]}`]({rel}), measured by `python -m bench.fit_report` in its own run "
                f"(not in this one; {header or 'see the file for its device and date'}). Errors are "
                "||o - o_softmax|| / ||v|| on held-out queries and keys; the file explains the data sets and "
                "what limits the fit.", ""] + table + [""]


def write_csv(path, rows):
    if not rows:
        return
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="more seeds and sizes (intended for a GPU)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<date>)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--no-train", action="store_true", help="skip section 5 (training on generated tasks)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    st = make_settings(args.full, device)
    today = datetime.date.today().isoformat()
    dname = device_name(device)
    ctx = Context(dname, datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), versions(), "full" if args.full else "quick")
    prefix = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join(HERE, "results", f"{prefix}-{today}")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    ctx.load.append(_loadavg())
    print(f"spectraformer_fused report ({ctx.mode}) on {dname} -> {out}", flush=True)

    if device.type == "cpu":
        # available_backends() lists the compiled CPU backend only once it is built: build it now (a notice
        # says so) so that its rows are in the report; `make report` has already built it.
        from spectraformer_fused.ops.cpu import extension_available

        extension_available()
    ctx.default_threads = torch.get_num_threads()
    if device.type == "cpu":
        pick_threads(ctx.default_threads)              # re-picked during the section; results do not depend on it
    acc, info = run_accuracy(st, ctx)
    ctx.use_threads("kernel", device)
    kest = run_kernel_estimation(st, ctx)
    ctx.use_threads("speed", device)
    speed, speed_meta = run_speed(st, ctx)
    ctx.use_threads("weights", device)
    build_rows, train_rows = run_weight_cost(st, ctx)
    train_results = []
    if not args.no_train:
        from . import train as train_mod

        train_results = train_mod.report_section(device, args.full, ctx, out)
    torch.set_num_threads(ctx.default_threads)

    plots = plot_accuracy(acc, info, st, out, ctx) + plot_speed(speed, st, out, ctx)
    if not plots:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
    elapsed = time.perf_counter() - t0
    ctx.load.append(_loadavg())
    write_markdown(os.path.join(out, "report.md"), ctx, st, acc, info, kest, speed, speed_meta, build_rows,
                   train_rows, plots, elapsed, train_results)
    for name, rows in (("accuracy", acc), ("kernel", kest), ("speed", speed), ("weights", build_rows),
                       ("train", train_rows)):
        write_csv(os.path.join(out, f"{name}.csv"), rows)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"context": {"device": ctx.device, "date": ctx.date, "versions": ctx.versions, "mode": ctx.mode,
                               "elapsed_s": elapsed, "loadavg_start_end": ctx.load},
                   "settings": {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v)
                                for k, v in st.__dict__.items()},
                   "accuracy_settings": info, "accuracy": acc, "kernel": kest, "speed": speed,
                   "speed_meta": speed_meta, "weights": build_rows, "train": train_rows,
                   "training": [{k: v for k, v in r.items() if k != "lines"} for r in train_results]},
                  f, indent=1, default=str)

    print(summary(acc, info, speed, speed_meta, st, out, elapsed))
    for r in train_results:
        print(f"  training, {r['task']}: " + r["findings"].get("best", ""))
    return 0


def summary(acc, info, speed, speed_meta, st, out, elapsed) -> str:
    lines = [f"done in {elapsed:.0f} s; report: {os.path.join(out, 'report.md')}"]
    ok = [r for r in acc if r["mean"] is not None and math.isfinite(r["mean"])]
    m = max(st.ms)
    for setting in info:
        sel = [r for r in ok if r["kernel"] == setting["kernel"] and r["s"] == setting["s"] and r["m"] == m]
        if sel:
            b = min(sel, key=lambda r: r["mean"])
            lines.append(f"  {setting['kernel']:8s} s={setting['s']}: best at m={m} {b['component']} x {b['weights']} "
                         f"err {b['mean']:.3g} (uniform {setting['uniform_mean']:.3g})")
    bad = sum(1 for r in acc if r["worse_than_uniform"])
    na = sum(1 for r in acc if r["mean"] is None)
    lines.append(f"  cells not better than uniform: {bad} of {len(acc)}; n/a: {na}")
    for c in speed_meta["crossover"]:
        if c["mode"] == "fwd":
            lines.append(f"  {c['impl']:22s} {'causal' if c['causal'] else 'non-causal':10s} fwd faster than SDPA "
                         f"from T={c['first_T_faster_than_sdpa'] or 'never (in sweep)'}")
    for s in speed_meta["skipped"]:
        lines.append(f"  skipped {s}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
