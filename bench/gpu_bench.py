"""GPU benchmark of the fused Triton backend against the unfused reference and torch SDPA.

    python -m bench.gpu_bench [--out results.md] [--dtypes fp16,bf16] [--T 2048,8192,32768]
    python -m bench.gpu_bench --dry-run           # tiny shapes on the CPU, reference backend only

Times forward and forward+backward with ``triton.testing.do_bench`` (warm-up first, so compilation and
autotuning stay out of the figures) at B=4, H=16, D=Dv=64, m=128 for posrf x orf and oprf x
fastfood_learnable, causal and non-causal; reports the peak memory of every row and prints a markdown
table (also written to ``--out``).
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
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spectraformer_fused as sf  # noqa: E402
from bench.report import peak_memory, versions  # noqa: E402

PAIRS = (("posrf", "orf"), ("oprf", "fastfood_learnable"))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def bench_ms(fn, device, rep_ms: int) -> tuple:
    """(median, p20, p80) ms: do_bench on CUDA; on the CPU (dry run) perf_counter after one warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def make_call(impl: str, fm, causal: bool):
    if impl == "torch-sdpa":
        def call(q, k, v):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=causal)
            return o.transpose(1, 2)
        return call
    backend = impl.split("-", 1)[1]
    return lambda q, k, v: sf.rf_attention(q, k, v, fm, causal=causal, backend=backend)


def run(args) -> list[dict]:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        B, H, D, m = 1, 2, 16, 16
        Ts = (64, 128)
        dtypes = ("fp32",)
        impls = ("sf-reference", "torch-sdpa")
    else:
        B, H, D, m = 4, 16, 64, 128
        Ts = tuple(int(t) for t in args.T.split(","))
        dtypes = tuple(args.dtypes.split(","))
        impls = ("sf-triton", "sf-reference", "torch-sdpa")
        if "triton" not in sf.available_backends():
            print("backend 'triton' is not available in this process: its rows are skipped")
            impls = impls[1:]
    rows, slow = [], {}
    for dname in dtypes:
        dt = DTYPES[dname]
        for T in Ts:
            gen = torch.Generator().manual_seed(T)
            q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(device, dt) for _ in range(4))
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    sdpa_ms = None
                    for impl in impls:
                        pairs = (("-", "-"),) if impl == "torch-sdpa" else PAIRS
                        for comp, wname in pairs:
                            row = {"impl": impl, "pair": "exact" if comp == "-" else f"{comp}/{wname}",
                                   "dtype": dname, "causal": causal, "mode": mode, "B": B, "H": H, "T": T,
                                   "D": D, "m": m}
                            key = (impl, row["pair"], dname, causal, mode)
                            if key in slow:
                                row.update(ms=None, status=slow[key])
                            else:
                                row.update(measure(impl, comp, wname, q, k, v, do, causal, mode, D, H, m, device,
                                                   args.rep))
                            later = [t for t in Ts if t > T]
                            if row.get("ms") is not None and later and row["ms"] * later[0] / T > args.max_ms:
                                slow[key] = f"skipped: {row['ms']:.0f} ms at T={T}, predicted > {args.max_ms:.0f} ms"
                            elif row["status"] == "OOM":
                                slow[key] = f"skipped: OOM at T={T}"
                            if impl == "torch-sdpa":
                                sdpa_ms = row.get("ms")
                            rows.append(row)
                            print(_line(row), flush=True)
                    for row in rows:
                        if (row["dtype"], row["T"], row["causal"], row["mode"]) == (dname, T, causal, mode):
                            row["vs_sdpa"] = (sdpa_ms / row["ms"]) if sdpa_ms and row.get("ms") else None
                    if args.out:                       # keep what is done if the run is cut short
                        write(args.out, table(rows, header(args, rows, "partial")))
            del q, k, v, do
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def measure(impl, comp, wname, q, k, v, do, causal, mode, D, H, m, device, rep_ms) -> dict:
    fm = None
    try:
        if impl != "torch-sdpa":
            fm = sf.RandomFeatureMap(D, m, component=comp, weights=wname, num_heads=H, seed=0, device=device).eval()
        call = make_call(impl, fm, causal)
        if mode == "fwd":
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
        med, lo, hi = bench_ms(fn, device, rep_ms)
        mem = peak_memory(fn, device)
        T, B = q.shape[1], q.shape[0]
        return {"ms": med, "ms_p20": lo, "ms_p80": hi, "tokens_per_s": B * T / (med * 1e-3), "peak_bytes": mem,
                "status": "ok"}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "status": "OOM"}
    except Exception as exc:                           # one failing row does not stop the table
        return {"ms": None, "status": f"error: {type(exc).__name__}: {str(exc)[:100]}"}


def _line(r) -> str:
    ms = "n/a" if r.get("ms") is None else f"{r['ms']:.3f} ms"
    return f"{r['impl']:13s} {r['pair']:26s} {r['dtype']} T={r['T']:<6d} {'causal' if r['causal'] else 'full  '} " \
           f"{r['mode']:8s} {ms} {r['status'] if r['status'] != 'ok' else ''}"


def table(rows, header: str) -> str:
    L = [header, "", "| impl | pair | dtype | T | causal | mode | ms (p20-p80) | tokens/s | peak MiB | speedup vs SDPA | status |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("ms") is None:
            cells = ("n/a", "", "", "")
        else:
            cells = (f"{r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})", f"{r['tokens_per_s']:.3g}",
                     "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 20:.0f}",
                     "n/a" if r.get("vs_sdpa") is None else f"{r['vs_sdpa']:.2f}")
        L.append(f"| {r['impl']} | {r['pair']} | {r['dtype']} | {r['T']} | {'yes' if r['causal'] else 'no'} | "
                 f"{r['mode']} | {' | '.join(cells)} | {r['status']} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="GPU benchmark: Triton backend vs reference vs torch SDPA")
    ap.add_argument("--out", default=None, help="also write the markdown table to this path")
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16, fp32")
    ap.add_argument("--T", default="2048,8192,32768", help="comma-separated sequence lengths")
    ap.add_argument("--rep", type=int, default=40, help="do_bench repetition time in ms")
    ap.add_argument("--max-ms", type=float, default=1500.0,
                    help="skip an implementation at larger T once it is predicted slower than this")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU with the reference backend")
    args = ap.parse_args(argv)
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
    timer = "perf_counter median of 3" if args.dry_run else f"do_bench median, rep {args.rep} ms"
    from spectraformer_fused.ops import autotune_enabled

    if args.dry_run:
        tuning = "no Triton rows"
    elif autotune_enabled():
        tuning = "Triton configs autotuned"
    else:
        tuning = "fixed Triton configs (SPECTRAFORMER_FUSED_AUTOTUNE=0)"
    return (f"## spectraformer_fused GPU benchmark\n\n{dev} | torch {v['torch']}, triton {v['triton']}, "
            f"spectraformer_fused {v['spectraformer_fused']} | {datetime.datetime.now():%Y-%m-%d %H:%M} | "
            f"dtypes {', '.join(sorted({r['dtype'] for r in rows}))} | {timer} | {tuning} | peak memory beyond the inputs | "
            f"{note}")


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())


