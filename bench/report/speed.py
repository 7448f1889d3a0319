"""Section 3 of the report: speed and memory of every available backend and peer over the sequence
length, against a roofline measured in the same run."""

from __future__ import annotations

import os
import time

import torch

import spectraformer_fused as sf

from .. import peers as peer_mod
from ..common import PEAK_MEMORY_HOW, Bar, Context, dtype_name, get_plt, md_table, mib, peak_memory
from ..timing import time_fn
from .settings import Settings


def measure_roofline(device, dtype) -> dict:
    """Matmul throughput and copy bandwidth measured now, on this device."""
    if device.type == "cuda":
        n = 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_fn(lambda: a @ b, device, 0.5)[3]
        flops = 2 * n**3 / (ms * 1e-3)
        x = torch.empty(256 * 2**20, device=device, dtype=torch.uint8)
        y = torch.empty_like(x)
        ms_c = time_fn(lambda: y.copy_(x), device, 0.5)[3]
        bw = 2 * x.numel() / (ms_c * 1e-3)
        return {
            "peak_flops": flops,
            "peak_bw": bw,
            "how": f"{dtype_name(dtype)} {n}x{n} matmul and a 256 MiB device-to-device copy",
        }
    n = 2048
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    ms = time_fn(lambda: torch.mm(a, b), device, 0.6)[3]
    flops = 2 * n**3 / (ms * 1e-3)
    x = torch.randn(32 * 2**20 // 4)
    y = torch.empty_like(x)
    ms_c = time_fn(lambda: y.copy_(x), device, 0.3)[3]
    bw = 2 * x.numel() * 4 / (ms_c * 1e-3)
    return {
        "peak_flops": flops,
        "peak_bw": bw,
        "how": f"best of several fp32 torch.mm {n}x{n} and 32 MiB copies, {torch.get_num_threads()} threads",
    }


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


def implementations(st: Settings):
    """[(name, make(fm, causal) -> fn, exact)] and a list of skip lines."""
    impls, skipped = [], []
    t0 = time.perf_counter()
    backends = sf.available_backends()
    discover_s = time.perf_counter() - t0
    for name in ("reference", "cpu", "triton"):
        if name not in backends:
            why = "the compiled CPU extension is not available" if name == "cpu" else "triton is not importable"
            skipped.append(f"backend {name!r}: not available in this process ({why})")
            continue
        if name == "triton" and st.device.type != "cuda":
            skipped.append(
                "backend 'triton': on the CPU Triton runs through its interpreter, which is a "
                "correctness tool, not a performance path; timed on CUDA only"
            )
            continue
        if name == "cpu" and st.device.type != "cpu":
            skipped.append("backend 'cpu': needs CPU tensors; this run times CUDA tensors")
            continue
        impls.append(
            (
                f"sf-{name}",
                (lambda b: lambda fm, causal: lambda q, k, v: sf.rf_attention(q, k, v, fm, causal=causal, backend=b))(
                    name
                ),
                False,
            )
        )
    for p in peer_mod.peers(st.device):
        if p.skip_reason is not None:
            skipped.append(f"peer {p.name!r}: {p.skip_reason}")
        else:
            impls.append((p.name, p.make, p.exact))
    return impls, skipped, discover_s


def run(st: Settings, ctx: Context):
    B, H, D, m = st.speed_shape
    Dv = D
    dev, dt = st.device, st.speed_dtype
    impls, skipped, discover_s = implementations(st)
    fm = sf.RandomFeatureMap(D, m, component="posrf", weights="orf", num_heads=H, seed=0, device=dev).eval()
    F = fm.feature_dim
    roof = measure_roofline(dev, dt)
    elem = torch.tensor([], dtype=dt).element_size()
    rows, dead = [], {}
    configs = [(T, causal, bwd) for T in st.speed_T for causal in (False, True) for bwd in (False, True)]
    start = time.perf_counter()
    bar = Bar(len(configs) * len(impls), "3/4 speed")
    for T, causal, bwd in configs:
        gen = torch.Generator().manual_seed(T)
        q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(dev, dt) for _ in range(4))
        for name, make, exact in impls:
            key = (name, causal, bwd)
            row = {
                "section": "speed",
                "impl": name,
                "T": T,
                "causal": causal,
                "mode": "fwd+bwd" if bwd else "fwd",
                "B": B,
                "H": H,
                "D": D,
                "m": m,
                "component": "-" if exact else "posrf",
                "weights": "-" if exact else "orf",
                **ctx.fields(dtype_name(dt)),
            }
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
                row.update(
                    ms=med,
                    ms_p20=lo,
                    ms_p80=hi,
                    ms_min=best,
                    tokens_per_s=B * T / (med * 1e-3),
                    peak_mem_bytes=mem,
                    flops=flops,
                    bytes=nbytes,
                    gflops=flops / (med * 1e-3) / 1e9,
                    status="ok",
                )
                later = [t for t in st.speed_T if t > T]
                if later and not exact:
                    predicted = best * 1e-3 * later[0] / T  # fastest run, linear in T at best
                    if predicted > st.slow_s:
                        dead[key] = f"skipped: {best / 1e3:.2f} s at T={T}, predicted > {st.slow_s:.0f} s"
            except torch.cuda.OutOfMemoryError:
                row.update(ms=None, status="OOM")
                dead[key] = f"skipped: OOM at T={T}"
                torch.cuda.empty_cache()
            except Exception as exc:  # a failing implementation is reported, not fatal
                row.update(ms=None, status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
            rows.append(row)
            bar.update()
        q = k = v = do = None  # free the inputs before the next T allocates its own
    bar.close()
    again = measure_roofline(dev, dt)  # the best of the section's start and end
    roof = {
        "peak_flops": max(roof["peak_flops"], again["peak_flops"]),
        "peak_bw": max(roof["peak_bw"], again["peak_bw"]),
        "how": roof["how"] + ", at the start and end",
    }
    for r in rows:
        if r.get("ms") is not None:
            t_roof = max(r["flops"] / roof["peak_flops"], r["bytes"] / roof["peak_bw"])
            r["roofline_frac"] = t_roof / (r["ms"] * 1e-3)
    cross = crossovers(rows, st.speed_T)
    state_bytes = B * H * F * (Dv + 1) * 4
    return rows, {
        "skipped": skipped,
        "roofline": roof,
        "crossover": cross,
        "state_bytes": state_bytes,
        "discover_s": discover_s,
        "F": F,
    }


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
                    r = next(
                        (
                            r
                            for r in rows
                            if r["impl"] == name and r["T"] == T and r["causal"] == causal and r["mode"] == mode
                        ),
                        None,
                    )
                    ref = sdpa.get((T, causal, mode))
                    if r and r["ms"] is not None and ref is not None and r["ms"] < ref:
                        first = T
                        break
                out.append({"impl": name, "causal": causal, "mode": mode, "first_T_faster_than_sdpa": first})
    return out


def plot(rows, st: Settings, out: str, ctx: Context) -> list[str]:
    plt = get_plt()
    if plt is None:
        return []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    names = sorted({r["impl"] for r in rows})
    for i, causal in enumerate((False, True)):
        for j, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[i, j]
            for name in names:
                pts = sorted(
                    (r["T"], r["ms"])
                    for r in rows
                    if r["impl"] == name and r["causal"] == causal and r["mode"] == mode and r["ms"] is not None
                )
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        label=name,
                        ls="--" if name == "torch-sdpa" else "-",
                        color=f"C{names.index(name) % 10}",
                    )
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


def markdown(speed, speed_meta, st: Settings, ctx: Context, plots) -> list[str]:
    sdt = ctx.line(dtype_name(st.speed_dtype), "speed")
    L = []
    B, H, D, m = st.speed_shape
    roof = speed_meta["roofline"]
    L += [
        "## 3. Speed and memory",
        "",
        f"_{sdt}_",
        "",
        f"B={B} H={H} D=Dv={D} m={m} (feature width F={speed_meta['F']}), posrf x orf for the random-feature "
        f"implementations. Times: "
        + (
            "`triton.testing.do_bench` median (p20-p80), warm-up excluded. "
            if st.device.type == "cuda"
            else "`time.perf_counter` median (p20-p80) of N runs after one warm-up run. "
        )
        + "Memory: peak bytes allocated during one call beyond what was allocated before it ("
        + PEAK_MEMORY_HOW[st.device.type]
        + f"). The recurrent state of random-feature attention is S [B,H,F,Dv] + z [B,H,F] in fp32 = "
        f"{speed_meta['state_bytes'] / 2**10:.0f} KiB here. Roofline measured in this run: "
        f"{roof['peak_flops'] / 1e9:.1f} GFLOP/s and {roof['peak_bw'] / 1e9:.1f} GB/s ({roof['how']}); "
        "'roofline' = max(useful FLOPs / peak FLOP/s, useful bytes / peak bandwidth) / measured time, with "
        "useful work that of the algorithm (exact: 4BHT^2D, half when causal, backward 2.5x; random features: "
        "the linear form 4BHTmD + 4BHTF(Dv+1), backward 2x).",
        "",
    ]
    if speed_meta["skipped"]:
        L += ["Skipped:", ""] + [f"- {s}" for s in speed_meta["skipped"]] + [""]
    table = []
    for r in speed:
        if r["ms"] is None:
            table.append(
                (
                    r["impl"],
                    "causal" if r["causal"] else "non-causal",
                    r["mode"],
                    r["T"],
                    r["status"],
                    "",
                    "",
                    "",
                    "",
                    "",
                )
            )
        else:
            table.append(
                (
                    r["impl"],
                    "causal" if r["causal"] else "non-causal",
                    r["mode"],
                    r["T"],
                    f"{r['ms']:.3g} ({r['ms_p20']:.3g}-{r['ms_p80']:.3g})",
                    f"{r['tokens_per_s']:.3g}",
                    mib(r["peak_mem_bytes"]),
                    f"{r['gflops']:.3g}",
                    f"{100 * r['roofline_frac']:.1f}%",
                    r["status"],
                )
            )
    L += md_table(
        ("implementation", "", "mode", "T", "ms", "tokens/s", "peak MiB", "GFLOP/s", "roofline", "status"), table
    )
    L += ["", "First T of the sweep where an implementation is faster than torch SDPA:", ""]
    L += md_table(
        ("implementation", "", "mode", "first T faster than SDPA"),
        [
            (
                c["impl"],
                "causal" if c["causal"] else "non-causal",
                c["mode"],
                c["first_T_faster_than_sdpa"] or f"none up to {max(st.speed_T)}",
            )
            for c in speed_meta["crossover"]
        ],
    )
    L.append("")
    for p in plots:
        if p.startswith("speed"):
            L += [f"![{p}]({p})", ""]
    return L
