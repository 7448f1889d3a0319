"""GPU benchmark of the fused Triton backend against fla, torch SDPA and the unfused reference.

    python -m bench.perf.gpu [--out results.md] [--dtypes fp16,bf16] [--shapes 4x16x2048,...]
    TRITON_INTERPRET=1 python -m bench.perf.gpu --dry-run   # tiny shapes on the CPU, every implementation

Times forward and forward+backward with ``triton.testing.do_bench`` (warm-up first, so compilation and
autotuning stay out of the figures) at D=Dv=64, m=128 and the shapes B x H x T of ``--shapes`` (default
B=4 H=16 at T = 2k, 8k, 32k and B=1 H=8 at T=32k) for posrf x orf and oprf x fastfood_learnable, causal
and non-causal. Implementations: the Triton backend in both causal modes side by side (``walk`` and
``chunk``, column "triton mode"; one row when non-causal), fla's ``chunk_linear_attn`` and
``fused_chunk_linear_attn`` (causal; when ``fla`` imports) fed with the same features computed in PyTorch
(the unfused route: a torch feature map, then fla's kernel), torch SDPA (FlashAttention) and the
reference. Every row gives its peak memory and its floor: the larger of bytes / copy bandwidth and
flops / matmul rate, both rates measured at the start of the same run (a large device-to-device copy, a
large matmul in the row's dtype), and the fraction of the floor reached (floor / time).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import spectraformer_fused as sf  # noqa: E402
from bench import timing  # noqa: E402
from bench.common import peak_memory, versions  # noqa: E402
from bench.peers import FLA_KERNELS, load, torch_features, window_exact_attention  # noqa: E402

PAIRS = (("posrf", "orf"), ("oprf", "fastfood_learnable"))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"


def measure_rates(device, dtypes, dry: bool) -> dict:
    """Copy bandwidth (bytes read + written per second, one large device-to-device copy) and dense matmul
    rate (flop/s, one large square matmul per dtype), measured in this process: the floors' rates."""
    n_copy, n_mm = (1 << 20, 256) if dry else (1 << 28, 8192)
    x = torch.empty(n_copy, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), device, 50, dry)[0]
    rates = {"copy_Bps": 2 * x.numel() * 4 / (ms * 1e-3), "matmul_flops": {}}
    x = y = None  # free the copy buffers before the matmuls
    for dname in dtypes:
        a = torch.randn(n_mm, n_mm, device=device).to(DTYPES[dname])
        b = torch.randn(n_mm, n_mm, device=device).to(DTYPES[dname])
        ms = bench_ms(lambda: a @ b, device, 50, dry)[0]
        rates["matmul_flops"][dname] = 2 * n_mm**3 / (ms * 1e-3)
    return rates


def floor_ms(row, rates, feature_dim: int, chunk: int = 32) -> float:
    """The row's floor in ms: max(bytes / copy bandwidth, flops / matmul rate).

    Bytes: q, k, v read and o written once (fwd); the backward adds q, k, v, o, dO read and dq, dk, dv
    written. Flops: exact attention 4 B H T^2 D (half when causal), backward 2.5x (FlashAttention's
    count); random features: the projections of q and k (2 x 2 B T H D m), the state products (2 x 2 B T
    H F Dv) and, causal, the intra-chunk products (2 B T H C (F + Dv), chunks of C = 32), backward 2x."""
    B, H, T, D, m = row["B"], row["H"], row["T"], row["D"], row["m"]
    e = DTYPES[row["dtype"]].itemsize
    nbytes = B * T * H * (2 * D + D + D) * e
    if row["pass"] == "fwd+bwd":
        nbytes += B * T * H * (2 * D + 2 * D + 2 * D + D) * e
    if row["pair"] == "exact":
        flops = 4 * B * H * T * T * D * (0.5 if row["causal"] else 1.0)
        flops *= 3.5 if row["pass"] == "fwd+bwd" else 1.0
    else:
        F = feature_dim
        flops = 4 * B * T * H * D * m + 4 * B * T * H * F * D
        if row["causal"]:
            flops += 2 * B * T * H * chunk * (F + D)
        flops *= 3.0 if row["pass"] == "fwd+bwd" else 1.0
    return 1e3 * max(nbytes / rates["copy_Bps"], flops / rates["matmul_flops"][row["dtype"]])


def bench_ms(fn, device, rep_ms: int, dry: bool = False) -> tuple:
    """(median, p20, p80) ms: do_bench on CUDA; on the CPU (dry run) perf_counter after one warm-up
    (one timed call: the interpreter is slow; the dry run checks the script, not speed)."""
    if device.type == "cuda":
        return timing.do_bench(fn, max(5, rep_ms // 4), rep_ms)
    times = sorted(1e3 * t for t in timing.measure({"fn": fn}, rounds=1 if dry else 3)["fn"])
    return statistics.median(times), times[0], times[-1]


def make_call(impl: str, algo: str, fm, causal: bool):
    if impl == "torch-sdpa":

        def call(q, k, v):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
            return o.transpose(1, 2)

        return call
    if impl in FLA_KERNELS:
        kernel = load(FLA_KERNELS[impl])

        def call(q, k, v):
            phiq, phik = torch_features(q, k, fm, causal=True)
            return kernel(phiq.to(v.dtype), phik.to(v.dtype), v, scale=1.0, normalize=True)[0]

        return call
    backend = impl.split("-", 1)[1]
    if algo in ("walk", "chunk"):

        def call(q, k, v):
            old = os.environ.get(MODE_ENV)
            os.environ[MODE_ENV] = algo
            try:
                return sf.rf_attention(q, k, v, fm, causal=causal, backend=backend)
            finally:
                if old is None:
                    del os.environ[MODE_ENV]
                else:
                    os.environ[MODE_ENV] = old

        return call
    return lambda q, k, v: sf.rf_attention(q, k, v, fm, causal=causal, backend=backend)


def implementations(dry: bool) -> tuple[list, list[str]]:
    """[(impl, triton mode, causal only)], and notes on what is skipped in this process and why."""
    from spectraformer_fused.ops import triton_importable, triton_interpreting

    impls, notes = [], []
    if triton_importable() and (torch.cuda.is_available() if not dry else triton_interpreting()):
        impls += [("sf-triton", "walk", True), ("sf-triton", "chunk", True), ("sf-triton", "-", False)]
    else:
        notes.append("backend 'triton' is not available in this process: its rows are skipped")
    try:
        if dry:
            from bench.perf.fla_interpret import interpretable_fla

            interpretable_fla()
        for spec in FLA_KERNELS.values():
            load(spec)
        impls += [(name, "-", True) for name in FLA_KERNELS]
    except Exception as exc:
        notes.append(
            f"fla not importable ({type(exc).__name__}: {exc}): its rows are skipped "
            "(pip install flash-linear-attention, or the fla-core wheel)"
        )
    impls += [("sf-reference", "-", None), ("torch-sdpa", "-", None)]
    return impls, notes


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes must be comma-separated BxHxT triples of positive integers, got {text!r}")
    return shapes


def run(args) -> list[dict]:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        D, m = 16, 16
        shapes = [(1, 2, 64)]
        dtypes = ("fp32",)
        pairs = PAIRS[:1]
    else:
        D, m = 64, 128
        shapes = parse_shapes(args.shapes)
        dtypes = tuple(args.dtypes.split(","))
        pairs = PAIRS
    impls, notes = implementations(args.dry_run)
    for note in notes:
        print(note)
    args.notes = notes
    args.rates = rates = measure_rates(device, dtypes, args.dry_run)
    print(
        f"copy {rates['copy_Bps'] / 1e9:.1f} GB/s; matmul "
        + ", ".join(f"{d} {r / 1e12:.1f} TFLOP/s" for d, r in rates["matmul_flops"].items()),
        flush=True,
    )
    rows, slow = [], {}
    for dname in dtypes:
        dt = DTYPES[dname]
        for B, H, T in shapes:
            gen = torch.Generator().manual_seed(T)
            q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(device, dt) for _ in range(4))
            for causal in (False, True):
                for pas in ("fwd", "fwd+bwd"):
                    sdpa_ms = None
                    for impl, algo, causal_only in impls:
                        if causal_only is not None and causal_only != causal:
                            continue
                        for comp, wname in (("-", "-"),) if impl == "torch-sdpa" else pairs:
                            row = {
                                "impl": impl,
                                "algo": algo,
                                "pair": "exact" if comp == "-" else f"{comp}/{wname}",
                                "dtype": dname,
                                "causal": causal,
                                "pass": pas,
                                "B": B,
                                "H": H,
                                "T": T,
                                "D": D,
                                "m": m,
                            }
                            key = (impl, algo, row["pair"], dname, causal, pas, B, H)
                            if key in slow:
                                row.update(ms=None, status=slow[key])
                            else:
                                row.update(
                                    measure(
                                        impl,
                                        algo,
                                        comp,
                                        wname,
                                        q,
                                        k,
                                        v,
                                        do,
                                        causal,
                                        pas,
                                        D,
                                        H,
                                        m,
                                        device,
                                        args.rep,
                                        args.dry_run,
                                    )
                                )
                            if row.get("ms") is not None:
                                row["floor_ms"] = floor_ms(row, rates, row.pop("feature_dim", m))
                            later = [t for b, h, t in shapes if (b, h) == (B, H) and t > T]
                            if row.get("ms") is not None and later and row["ms"] * later[0] / T > args.max_ms:
                                slow[key] = f"skipped: {row['ms']:.0f} ms at T={T}, predicted > {args.max_ms:.0f} ms"
                            elif row["status"] == "OOM":
                                slow[key] = f"skipped: OOM at T={T}"
                            if impl == "torch-sdpa":
                                sdpa_ms = row.get("ms")
                            rows.append(row)
                            print(_line(row), flush=True)
                    for row in rows:
                        if (row["dtype"], row["B"], row["H"], row["T"], row["causal"], row["pass"]) == (
                            dname,
                            B,
                            H,
                            T,
                            causal,
                            pas,
                        ):
                            row["vs_sdpa"] = (sdpa_ms / row["ms"]) if sdpa_ms and row.get("ms") else None
                    if args.out:  # keep what is done if the run is cut short
                        write(args.out, table(rows, header(args, rows, "partial")))
            del q, k, v, do
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows += window_rows(args, device, D, m, dtypes, shapes[:2])  # the hybrid window
    return rows


def measure(impl, algo, comp, wname, q, k, v, do, causal, pas, D, H, m, device, rep_ms, dry) -> dict:
    fm = None
    try:
        if impl != "torch-sdpa":
            fm = sf.RandomFeatureMap(D, m, component=comp, weights=wname, num_heads=H, seed=0, device=device).eval()
        call = make_call(impl, algo, fm, causal)
        if pas == "fwd":

            def fn():
                with torch.no_grad():
                    call(q, k, v)
        else:
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            params = [] if fm is None else [p for p in fm.parameters() if p.requires_grad]

            def fn():
                for t in [qq, kk, vv] + params:
                    t.grad = None
                call(qq, kk, vv).backward(do)

        med, lo, hi = bench_ms(fn, device, rep_ms, dry)
        mem = peak_memory(fn, device)
        T, B = q.shape[1], q.shape[0]
        return {
            "ms": med,
            "ms_p20": lo,
            "ms_p80": hi,
            "tokens_per_s": B * T / (med * 1e-3),
            "peak_bytes": mem,
            "feature_dim": m if fm is None else fm.feature_dim,
            "status": "ok",
        }
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "status": "OOM"}
    except Exception as exc:  # one failing row does not stop the table
        return {"ms": None, "status": f"error: {type(exc).__name__}: {str(exc)[:100]}"}


# ----------------------------------------------------------------------------------------------------
# The hybrid window (DESIGN.md section 6; bench/report/window.py is its CPU section)
# ----------------------------------------------------------------------------------------------------


def window_rows(args, device, D: int, m: int, dtypes, shapes) -> list[dict]:
    """The hybrid's rows (the row format of ``run``, so ``table`` prints them): causal
    forward and forward + backward of ``rf_attention(window=W)`` on the Triton backend (walk and chunk
    modes) and the reference, and sliding-window SDPA (band mask), at the first dtype and the shapes given
    (W = 64; 16 in the dry run). The matching rows without the window are ``run``'s own."""
    W = 16 if args.dry_run else 64
    dname = dtypes[0]
    dt = DTYPES[dname]
    triton_ok = any(impl == "sf-triton" for impl, _, _ in implementations(args.dry_run)[0])
    impls = ([("sf-triton", "walk"), ("sf-triton", "chunk")] if triton_ok else []) + [
        ("sf-reference", "-"),
        ("sdpa-window", "-"),
    ]
    rows = []
    for B, H, T in shapes:
        gen = torch.Generator().manual_seed(T)
        q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(device, dt) for _ in range(4))
        for pas in ("fwd", "fwd+bwd"):
            for impl, algo in impls:
                if impl == "sdpa-window" and T * T > 2**28:  # the [T, T] band mask alone
                    continue
                row = {
                    "impl": impl,
                    "algo": algo,
                    "pair": "exact" if impl == "sdpa-window" else f"posrf/orf@w{W}",
                    "dtype": dname,
                    "causal": True,
                    "pass": pas,
                    "B": B,
                    "H": H,
                    "T": T,
                    "D": D,
                    "m": m,
                    "window": W,
                }
                row.update(_window_measure(impl, algo, W, q, k, v, do, pas, D, H, m, device, args))
                if row.get("ms") is not None:
                    row["floor_ms"] = floor_ms(row, args.rates, row.pop("feature_dim", m))
                    row["floor_ms"] += _window_floor_ms(row, W, args.rates)
                row["vs_sdpa"] = None
                rows.append(row)
                print(_line(row) + f" W={W}", flush=True)
        del q, k, v, do
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _window_floor_ms(row, W: int, rates) -> float:
    """The window's exact products (q.k and p.v over W keys: 4 B H T W D flops; the backward 2.5x more) at
    the measured matmul rate; sdpa-window rows are counted by ``floor_ms`` as exact attention already."""
    if row["impl"] == "sdpa-window":
        return 0.0
    flops = 4 * row["B"] * row["H"] * row["T"] * W * row["D"] * (3.5 if row["pass"] == "fwd+bwd" else 1.0)
    return 1e3 * flops / rates["matmul_flops"][row["dtype"]]


def _window_measure(impl, algo, W, q, k, v, do, pas, D, H, m, device, args) -> dict:
    try:
        fm = None
        if impl == "sdpa-window":

            def call(q, k, v):
                return window_exact_attention(q, k, v, window=W, causal=True)
        else:
            fm = sf.RandomFeatureMap(D, m, component="posrf", weights="orf", num_heads=H, seed=0, device=device).eval()
            backend = impl.split("-", 1)[1]

            def call(q, k, v):
                old = os.environ.get(MODE_ENV)
                if algo != "-":
                    os.environ[MODE_ENV] = algo
                try:
                    return sf.rf_attention(q, k, v, fm, causal=True, backend=backend, window=W)
                finally:
                    if old is None:
                        os.environ.pop(MODE_ENV, None)
                    else:
                        os.environ[MODE_ENV] = old

        if pas == "fwd":

            def fn():
                with torch.no_grad():
                    call(q, k, v)
        else:
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

            def fn():
                for t in (qq, kk, vv):
                    t.grad = None
                call(qq, kk, vv).backward(do)

        med, lo, hi = bench_ms(fn, device, args.rep, args.dry_run)
        T, B = q.shape[1], q.shape[0]
        return {
            "ms": med,
            "ms_p20": lo,
            "ms_p80": hi,
            "tokens_per_s": B * T / (med * 1e-3),
            "peak_bytes": peak_memory(fn, device),
            "feature_dim": m if fm is None else fm.feature_dim,
            "status": "ok",
        }
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "status": "OOM"}
    except Exception as exc:  # one failing row does not stop the table
        return {"ms": None, "status": f"error: {type(exc).__name__}: {str(exc)[:100]}"}


def _line(r) -> str:
    ms = "n/a" if r.get("ms") is None else f"{r['ms']:.3f} ms (floor {r['floor_ms']:.3f})"
    return (
        f"{r['impl']:15s} {r['algo']:5s} {r['pair']:26s} {r['dtype']} B={r['B']} H={r['H']} T={r['T']:<6d} "
        f"{'causal' if r['causal'] else 'full  '} {r['pass']:8s} {ms} {r['status'] if r['status'] != 'ok' else ''}"
    )


def table(rows, header: str) -> str:
    L = [
        header,
        "",
        "| impl | triton mode | pair | dtype | B | H | T | causal | pass | ms (p20-p80) | tokens/s | "
        "peak MiB | floor ms | of floor | speedup vs SDPA | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ms") is None:
            cells = ("n/a", "", "", "", "", "")
        else:
            cells = (
                f"{r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})",
                f"{r['tokens_per_s']:.3g}",
                "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}",
                f"{r['floor_ms']:.3f}",
                f"{r['floor_ms'] / r['ms']:.1%}",
                "n/a" if r.get("vs_sdpa") is None else f"{r['vs_sdpa']:.2f}",
            )
        L.append(
            f"| {r['impl']} | {r['algo']} | {r['pair']} | {r['dtype']} | {r['B']} | {r['H']} | {r['T']} | "
            f"{'yes' if r['causal'] else 'no'} | {r['pass']} | {' | '.join(cells)} | {r['status']} |"
        )
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="GPU benchmark: Triton backend vs reference vs torch SDPA")
    ap.add_argument("--out", default=None, help="also write the markdown table to this path")
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16, fp32")
    ap.add_argument(
        "--shapes",
        default="4x16x2048,4x16x8192,4x16x32768,1x8x32768",
        help="comma-separated BxHxT (batch x heads x sequence length)",
    )
    ap.add_argument("--rep", type=int, default=40, help="do_bench repetition time in ms")
    ap.add_argument(
        "--max-ms",
        type=float,
        default=1500.0,
        help="skip an implementation at larger T once it is predicted slower than this",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes on the CPU; Triton kernels (ours and fla's) need TRITON_INTERPRET=1",
    )
    args = ap.parse_args(argv)
    try:
        parse_shapes(args.shapes)
    except ValueError as exc:
        ap.error(str(exc))
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the script on the CPU")
        return 2
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    rows = run(args)
    text = table(rows, header(args, rows, f"{time.perf_counter() - t0:.0f} s"))
    print(text)
    if args.out:
        write(args.out, text)
    return 0


def header(args, rows, note: str) -> str:
    v = versions()
    dev = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    timer = "perf_counter, one call after a warm-up" if args.dry_run else f"do_bench median, rep {args.rep} ms"
    from spectraformer_fused.ops import autotune_enabled

    if args.dry_run:
        tuning = "Triton interpreter" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "no Triton rows"
    elif autotune_enabled():
        tuning = "Triton configs autotuned"
    else:
        tuning = "fixed Triton configs (SPECTRAFORMER_FUSED_AUTOTUNE=0)"
    return (
        f"## spectraformer_fused GPU benchmark\n\n{dev} | torch {v['torch']}, triton {v['triton']}, "
        f"spectraformer_fused {v['spectraformer_fused']} | {datetime.datetime.now():%Y-%m-%d %H:%M} | "
        f"dtypes {', '.join(sorted({r['dtype'] for r in rows}))} | {timer} | {tuning} | peak memory beyond the inputs | "
        f"{note}\n\nFloors from rates measured in this run: copy {args.rates['copy_Bps'] / 1e9:.1f} GB/s, matmul "
        + ", ".join(f"{d} {r / 1e12:.3g} TFLOP/s" for d, r in args.rates["matmul_flops"].items())
        + ". fla rows: chunk_linear_attn / fused_chunk_linear_attn (normalize=True) fed phi(q), phi(k) from "
        "PyTorch (bench/peers.torch_features), so feature time is included."
        + "".join(f"\n\n{n}" for n in getattr(args, "notes", []))
    )


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
