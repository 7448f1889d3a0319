"""Packed variable-length sequences against padding: ``python -m bench.report.varlen [--full] [--device cuda]``.

A batch of sequences of mixed lengths is attended two ways through the public ``rf_attention``:

* packed: q, k, v ``[1, sum T_i, H, D]`` with ``cu_seqlens`` (the offsets of the sequences);
* padded: q, k, v ``[N, max T_i, H, D]``, each sequence at the start of its row, padding at the end,
  with ``key_padding_mask`` (True = a real token). Padding at the end keeps causal attention exact on
  the real tokens, so both layouts compute the same outputs there (the table checks it).

Rows: every available backend (reference and the compiled CPU backend for CPU tensors, Triton for CUDA
tensors), causal and non-causal, forward and forward+backward, with the median time, tokens/s (real
tokens only, the same count for both layouts), peak memory and packed's speedup over padded. Quick mode
(the default) fits a couple of minutes on a 2-core CPU; ``--full`` runs the whole length mix, meant for a
GPU. ``--dry-run`` exercises the Triton rows on the CPU under the interpreter (``TRITON_INTERPRET=1``) at
tiny shapes. Writes ``bench/results/varlen-<device>-<date>.md`` unless ``--out`` says otherwise; the
report (``python -m bench.report``) runs the same measurement as its section 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import spectraformer_fused as sf  # noqa: E402
from bench.common import (  # noqa: E402
    PEAK_MEMORY_HOW,
    RESULTS,
    device_name,
    dtype_name,
    fmt,
    loadavg,
    md_table,
    mib,
    peak_memory,
    pick_threads,
    slug,
    versions,
)
from bench.timing import time_fn, time_interleaved  # noqa: E402

FULL_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class VarlenSettings:
    lengths: tuple  # the mix of sequence lengths, one sequence each
    heads: int
    head_dim: int  # D = Dv
    num_features: int  # m
    dtype: torch.dtype
    budget_s: float  # timing budget per row
    backends: tuple
    mode: str


def make_settings(
    device: torch.device, full: bool = False, dry_run: bool = False, lengths: tuple | None = None
) -> VarlenSettings:
    """Quick: lengths 64-2048, H=4 D=64 m=64, fp32 on the CPU (on CUDA: lengths 64-4096, H=16, m=128, bf16);
    full: lengths 64-4096, H=16 D=64 m=128 (bf16 on CUDA); dry run: lengths 8 and 24, one head, Triton
    under its interpreter beside the reference."""
    cuda = device.type == "cuda"
    if dry_run:
        from spectraformer_fused.ops import triton_importable, triton_interpreting

        backends = ("reference",) + (("triton",) if triton_importable() and triton_interpreting() else ())
        return VarlenSettings(tuple(lengths or (8, 24)), 1, 16, 16, torch.float32, 0.0, backends, "dry run")
    available = sf.available_backends()
    if cuda:
        backends = tuple(b for b in ("triton", "reference") if b in available)
    else:
        backends = tuple(b for b in ("cpu", "reference") if b in available)
    if full:
        return VarlenSettings(
            tuple(lengths or FULL_LENGTHS),
            16,
            64,
            128,
            torch.bfloat16 if cuda else torch.float32,
            0.5 if cuda else 2.0,
            backends,
            "full",
        )
    return VarlenSettings(
        tuple(lengths or (FULL_LENGTHS if cuda else (64, 128, 256, 512, 1024, 2048))),
        16 if cuda else 4,
        64,
        128 if cuda else 64,
        torch.bfloat16 if cuda else torch.float32,
        0.3 if cuda else 1.0,
        backends,
        "quick",
    )


def make_inputs(vs: VarlenSettings, device: torch.device, seed: int = 0):
    """Packed q, k, v, dO ``[1, sum T_i, H, D]`` with ``cu_seqlens``, and the same values padded at the end to
    ``[N, max T_i, H, D]`` with ``key_padding_mask``."""
    lengths, H, D = vs.lengths, vs.heads, vs.head_dim
    total, longest, n = sum(lengths), max(lengths), len(lengths)
    gen = torch.Generator().manual_seed(seed)
    packed = [torch.randn(1, total, H, D, generator=gen) * (0.5 if i < 2 else 1.0) for i in range(4)]
    offsets = [0]
    for t in lengths:
        offsets.append(offsets[-1] + t)
    mask = torch.zeros(n, longest, dtype=torch.bool)
    padded = [torch.zeros(n, longest, H, D) for _ in range(4)]
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        mask[i, : b - a] = True
        for dst, src in zip(padded, packed):
            dst[i, : b - a] = src[0, a:b]
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    packed = [t.to(device, vs.dtype) for t in packed]
    padded = [t.to(device, vs.dtype) for t in padded]
    return packed, cu, padded, mask.to(device)


def _timed_call(call, args, bwd: bool):
    """The function a row times: forward under no_grad, or forward + backward from fresh leaves."""
    q, k, v, do = args
    if not bwd:

        def fn():
            with torch.no_grad():
                return call(q, k, v)

        return fn
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def fn():
        for t in leaves:
            t.grad = None
        call(*leaves).backward(do)

    return fn


def _time_layouts(fns: dict, status: dict, device: torch.device, budget_s: float) -> dict:
    """Both layouts timed together (interleaved on the CPU); when that fails, each alone, so that the
    failure lands in ``status`` on the layout that raised it."""
    try:
        return time_interleaved(fns, device, budget_s)
    except Exception:
        times = {}
        for layout, fn in fns.items():
            try:
                times[layout] = time_fn(fn, device, budget_s)
            except Exception as exc:
                status[layout] = exc
        return times


def run(vs: VarlenSettings, device: torch.device, progress=None) -> list[dict]:
    """One row per backend x causal x pass x layout (packed, padded)."""
    packed, cu, padded, mask = make_inputs(vs, device)
    fm = sf.RandomFeatureMap(
        vs.head_dim, vs.num_features, component="posrf", weights="orf", num_heads=vs.heads, seed=0, device=device
    ).eval()
    tokens = sum(vs.lengths)
    valid = mask.reshape(-1)
    rows = []
    for backend in vs.backends:
        for causal in (False, True):
            calls = {
                "packed": lambda q, k, v: sf.rf_attention(q, k, v, fm, causal=causal, backend=backend, cu_seqlens=cu),
                "padded": lambda q, k, v: sf.rf_attention(
                    q, k, v, fm, causal=causal, backend=backend, key_padding_mask=mask
                ),
            }
            inputs = {"packed": packed, "padded": padded}
            diff = None
            try:  # both layouts give the same outputs on the real tokens
                with torch.no_grad():
                    o_packed = calls["packed"](*packed[:3]).float().reshape(tokens, -1)
                    o_padded = calls["padded"](*padded[:3]).float().reshape(valid.numel(), -1)[valid]
                diff = float((o_packed - o_padded).abs().max())
            except Exception:  # the rows below say what failed
                pass
            for bwd in (False, True):
                fns = {layout: _timed_call(calls[layout], inputs[layout], bwd) for layout in ("packed", "padded")}
                status = {}  # layout -> the exception its calls raised
                times = _time_layouts(fns, status, device, vs.budget_s)
                for layout in ("packed", "padded"):
                    row = {
                        "backend": backend,
                        "causal": causal,
                        "pass": "fwd+bwd" if bwd else "fwd",
                        "layout": layout,
                        "N": len(vs.lengths),
                        "tokens": tokens,
                        "T": max(vs.lengths) if layout == "padded" else tokens,
                        "H": vs.heads,
                        "D": vs.head_dim,
                        "m": vs.num_features,
                        "dtype": dtype_name(vs.dtype),
                        "max_abs_diff": diff,
                    }
                    try:
                        if layout in status:
                            raise status[layout]
                        med, lo, hi, _ = times[layout]
                        row.update(
                            ms=med,
                            ms_p20=lo,
                            ms_p80=hi,
                            tokens_per_s=tokens / (med * 1e-3),
                            peak_mem_bytes=peak_memory(fns[layout], device),
                            status="ok",
                        )
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        row.update(ms=None, status="OOM")
                    except Exception as exc:  # a failing row is reported, not fatal
                        row.update(ms=None, status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
                    rows.append(row)
                    if progress is not None:
                        progress()
                packed_row, padded_row = rows[-2], rows[-1]
                if packed_row.get("ms") and padded_row.get("ms"):
                    packed_row["speedup_vs_padded"] = padded_row["ms"] / packed_row["ms"]
    return rows


def num_rows(vs: VarlenSettings) -> int:
    return len(vs.backends) * 2 * 2 * 2


def describe(vs: VarlenSettings, device: torch.device) -> str:
    n, longest, tokens = len(vs.lengths), max(vs.lengths), sum(vs.lengths)
    timer = (
        "`triton.testing.do_bench` median (p20-p80), warm-up excluded"
        if device.type == "cuda"
        else "`time.perf_counter` median (p20-p80) of N runs after one warm-up run, the packed and padded runs "
        "alternating"
    )
    return (
        f"N={n} sequences of lengths {', '.join(map(str, vs.lengths))} ({tokens} tokens; padded: "
        f"[{n}, {longest}] = {n * longest} slots, {100 * (1 - tokens / (n * longest)):.0f}% padding), H={vs.heads} "
        f"D=Dv={vs.head_dim} m={vs.num_features}, posrf x orf, {dtype_name(vs.dtype)}. packed = "
        "`rf_attention(q, k, v, fm, cu_seqlens=...)` on [1, sum T_i, H, D]; padded = `rf_attention(q, k, v, fm, "
        "key_padding_mask=...)` on [N, max T_i, H, D], padding at the end. Times: " + timer + ". tokens/s counts "
        "real tokens only. Peak memory: bytes allocated during one call beyond what was allocated before it ("
        + PEAK_MEMORY_HOW[device.type]
        + "). 'max |diff|': largest difference between the two layouts' "
        "forward outputs on the real tokens. 'packed speedup' = padded time / packed time."
    )


def markdown(rows: list[dict], vs: VarlenSettings, device: torch.device, header: str) -> list[str]:
    L = [f"_{header}_", "", describe(vs, device), ""]
    table = []
    for r in rows:
        causal = "causal" if r["causal"] else "non-causal"
        if r.get("ms") is None:
            table.append((r["backend"], causal, r["pass"], r["layout"], "n/a", "", "", "", "", r["status"]))
            continue
        table.append(
            (
                r["backend"],
                causal,
                r["pass"],
                r["layout"],
                f"{r['ms']:.3g} ({r['ms_p20']:.3g}-{r['ms_p80']:.3g})",
                f"{r['tokens_per_s']:.3g}",
                mib(r["peak_mem_bytes"]),
                fmt(r.get("speedup_vs_padded"), ".2f") if r["layout"] == "packed" else "",
                fmt(r["max_abs_diff"], ".2g"),
                r["status"],
            )
        )
    L += md_table(
        ("backend", "", "pass", "layout", "ms", "tokens/s", "peak MiB", "packed speedup", "max |diff|", "status"), table
    )
    return L + [""]


def header_line(device: torch.device, dry_run: bool = False, default_threads: int | None = None) -> str:
    v = versions()
    dev = "CPU (dry run)" if dry_run else device_name(device)
    if device.type == "cuda":
        from spectraformer_fused.ops import autotune_enabled

        extra = " | Triton configs autotuned" if autotune_enabled() else " | fixed Triton configs"
    else:
        extra = f" | {torch.get_num_threads()} of {default_threads or torch.get_num_threads()} threads"
    return (
        f"device: {dev}{extra} | torch {v['torch']}, triton {v['triton']}, spectraformer_fused "
        f"{v['spectraformer_fused']} | {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every length up to 4096 (intended for a GPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default: the mode's mix)")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU; the Triton rows need TRITON_INTERPRET=1"
    )
    ap.add_argument("--out", default=None, help="markdown file (default bench/results/varlen-<device>-<date>.md)")
    args = ap.parse_args(argv)
    lengths = None
    if args.lengths:
        try:
            lengths = tuple(int(x) for x in args.lengths.split(",") if x)
        except ValueError:
            lengths = ()
        if not lengths or min(lengths) < 1:
            ap.error(f"--lengths must be comma-separated positive integers, got {args.lengths!r}")
    device = torch.device("cpu" if args.dry_run else (args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    default_threads = None
    if device.type == "cpu" and not args.dry_run:
        from spectraformer_fused.ops.cpu import extension_available

        extension_available()  # builds the compiled CPU backend, so that its rows run
        default_threads = torch.get_num_threads()
        pick_threads(default_threads)  # one thread when all threads are slower right now (busy cores)
    vs = make_settings(device, args.full, args.dry_run, lengths)
    cmd = (
        "python -m bench.report.varlen"
        + (" --full" if args.full else "")
        + (" --dry-run" if args.dry_run else "")
        + (f" --device {args.device}" if args.device else "")
        + (f" --lengths {args.lengths}" if args.lengths else "")
    )
    prefix = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join(RESULTS, f"varlen-{prefix}-{datetime.date.today().isoformat()}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    load = loadavg()
    t0 = time.perf_counter()
    rows = []
    for i, backend in enumerate(vs.backends):  # the file is rewritten after each backend: a run cut
        rows += run(dataclasses.replace(vs, backends=(backend,)), device)  # short keeps what is done
        done = "" if i + 1 == len(vs.backends) else f" (partial: {i + 1} of {len(vs.backends)} backends)"
        text = "\n".join(
            [
                f"# Packed variable-length sequences against padding ({vs.mode} mode)",
                "",
                f"Generated by `{cmd}` in {time.perf_counter() - t0:.0f} s{done}; 1-minute load average "
                f"at the start: {load} on {os.cpu_count()} logical CPUs (CPU timings are medians under that "
                "load).",
                "",
            ]
            + markdown(rows, vs, device, header_line(device, args.dry_run, default_threads))
        )
        with open(out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
