"""Speed of the compiled CPU backend against its peers: ``python -m bench.perf.cpu [--threads 2] [--reps 7]``.

Prints a markdown table and writes it to ``bench/results/cpu-<date>.md`` (``cpu-<date>-t<N>.md`` for
another thread count). fp32, PosRF x ORF, D = Dv = 64,
m = 128, at (B=1, H=8, T=4096) and (B=4, H=8, T=1024), causal and non-causal, for:

* ``cpu``: this package's compiled backend (``spectraformer_fused.ops.cpu.cpu_attention``);
* ``reference``: this package's pure-PyTorch oracle;
* ``torch chunked``: ``bench/peers.py``'s ``chunked_attention``, the best of chunk sizes 64/128/256;
* ``performer-pytorch``: its ``FastAttention`` (skipped with a printed line when not installed).

Training (forward + backward, ``training_rows``): the public ``rf_attention`` (backend auto, i.e. the
compiled CPU backend with its fused backward, the feature map passed as in a model), the same call with
``backend="reference"``, the torch chunked peer (autograd; the best chunk size when causal) and SDPA
(exact softmax, its CPU kernels), each with the peak memory of one call (``bench.common.peak_memory``);
``--train-only`` runs just those rows.

And one decode step (B=1, H=8, one token, state carried) through the public ``rf_attention``,
``SpectraAttention`` and the HF attention path (when installed), beside the compiled kernel alone and a
plain PyTorch step (see ``decode_rows``); ``--decode-only`` runs just those rows. Every timing is
the median of ``--reps`` runs after a warm-up, the implementations interleaved run by run so that load
from other processes hits all of them alike. The feature-map parameters are resolved outside the timed
region for every implementation. GFLOP/s counts the same algorithmic work for every implementation
(projections, one flop per exponential, state updates, outputs; see ``flops``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root

from bench.common import PEAK_MEMORY_HOW, RESULTS, command_line, machine, peak_memory  # noqa: E402
from bench.peers import chunked_attention, decode_step  # noqa: E402
from bench.timing import measure  # noqa: E402
from spectraformer_fused import RandomFeatureMap, RFState, SpectraAttention, rf_attention  # noqa: E402
from spectraformer_fused.ops import cpu as cpu_ops  # noqa: E402
from spectraformer_fused.reference import reference_attention  # noqa: E402

D = DV = 64
M = 128
SHAPES = [(1, 8, 4096), (4, 8, 1024)]
CHUNK = 64
GOALS = {"causal": 1.5, "non-causal": 1.1, "decode": 3.0}
# forward + backward: rf_attention against the torch chunked peer (every shape) and SDPA (T = 4096); the
# reference backend against the peer
TRAIN_GOALS = {"peer": 1.5, "sdpa": 2.0, "sdpa_T": 4096, "reference": 1.0}


def flops(B: int, H: int, T: int, causal: bool) -> float:
    """Algorithmic work of one forward (PosRF, F = m): per token two projections (2 x 2 D m), 2 F
    exponentials, the state update (2 F Dv + F), the read-out (2 F Dv + 2 F + Dv); causal attention adds
    the intra-chunk products of a chunk of CHUNK tokens (on average CHUNK / 2 keys: scores 2 F, values
    2 Dv, denominator 1 each)."""
    F = M
    per_token = 4 * D * M + 2 * F + (2 * F * DV + F) + (2 * F * DV + 2 * F + DV)
    if causal:
        per_token += (CHUNK / 2) * (2 * F + 2 * DV + 1)
    return B * H * T * per_token


def decode_flops(B: int, H: int) -> float:
    F = M
    return B * H * (4 * D * M + 2 * F + 2 * F + 2 * F * DV + F + 2 * F * DV + 2 * F + DV)


def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median seconds per call of every function, the calls interleaved run by run."""
    times = measure(fns, warmup=warmup, rounds=reps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def mm_gflops(reps: int) -> tuple[float, float]:
    """torch.mm GFLOP/s at 2048^3 (peak-like) and at the projection's shape (B H T x D) @ (D x m)."""
    out = []
    for a, b, c in ((2048, 2048, 2048), (32768, D, M)):
        x, y = torch.randn(a, b), torch.randn(b, c)
        t = interleaved({"mm": lambda: torch.mm(x, y)}, reps)["mm"]
        out.append(2 * a * b * c / t / 1e9)
    return out[0], out[1]


def performer_factory():
    try:
        from performer_pytorch import FastAttention
    except ImportError:
        print("performer-pytorch is not installed: its row is skipped (pip install performer-pytorch)")
        return None

    def make(causal: bool):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return FastAttention(dim_heads=D, nb_features=M, causal=causal)

    return make


def hf_decode_loop(steps: int, qs, ks, vs, fm, warm):
    """The decode step through the HuggingFace path, or a string saying why it is not timed.

    Times what a converted transformers model runs per layer and token between its projections: the
    ``RFCache`` update and the registered ``"spectraformer"`` attention function (``[B, H, 1, D]``
    inputs, the layer's state read and written in the cache). Skipped, and named in the table, when
    transformers is not installed."""
    try:
        from spectraformer_fused.integrations import transformers as hf
    except Exception as exc:  # transformers missing or too old: skipped, named in the table
        return (
            f"HF attention path: not available ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
    module = torch.nn.Module()
    setattr(module, hf.FEATURE_MAP_ATTR, fm)
    module.is_causal = True
    qh, kh, vh = (t.transpose(2, 3) for t in (qs, ks, vs))  # [steps, B, H, 1, D]
    scaling = D**-0.5

    def loop():
        cache = hf.RFCache()
        for i in range(steps):
            key, value = cache.update(kh[i], vh[i], 0)
            if i == 0:
                cache.layers[0].state = warm  # the prompt's state, as the others
            hf.spectraformer_attention_forward(module, qh[i], key, value, None, scaling=scaling)

    return loop


def decode_rows(reps: int, mm_peak: float, verdicts: list, notes: list) -> list:
    """One causal decode step (B=1, H=8, one token, state carried) through every layer a user may call:
    the public ``rf_attention`` (feature map passed, parameters resolved per call as in a model),
    ``SpectraAttention`` (with its qkv and output projections), the HF path when present, the compiled
    kernel alone (parameters precomputed) and a plain PyTorch step (parameters precomputed)."""
    B, H = 1, 8
    fm = RandomFeatureMap(D, M, component="posrf", weights="orf", num_heads=H, seed=0).eval()
    layer = SpectraAttention(H * D, H, num_features=M, component="posrf", weights="orf", causal=True, seed=0).eval()
    steps = 64
    qs, ks, vs = (torch.randn(steps, B, 1, H, D) for _ in range(3))
    xs = torch.randn(steps, B, 1, H * D)
    p = fm.feature_params(qs[0], ks[0], scale=D**-0.5, causal=True)
    _, warm = reference_attention(qs[0], ks[0], vs[0], p, causal=True, output_final_state=True)
    _, warm_layer = layer(xs[0], output_final_state=True)

    def public_loop():
        state = warm
        for i in range(steps):
            _, state = rf_attention(qs[i], ks[i], vs[i], fm, causal=True, initial_state=state, output_final_state=True)

    def module_loop():
        state = warm_layer
        for i in range(steps):
            _, state = layer(xs[i], initial_state=state, output_final_state=True)

    def kernel_loop():
        state = warm
        for i in range(steps):
            _, state = cpu_ops.cpu_attention(
                qs[i], ks[i], vs[i], p, causal=True, key_padding_mask=None, initial_state=state, output_final_state=True
            )

    def plain_loop():
        S, z, m = (t.clone() for t in warm)
        for i in range(steps):
            decode_step(qs[i][:, 0], ks[i][:, 0], vs[i][:, 0], p, S, z, m)

    fns = {"rf_attention (public call)": public_loop, "SpectraAttention (with qkv/out projections)": module_loop}
    hf = hf_decode_loop(steps, qs, ks, vs, fm, warm)
    if isinstance(hf, str):
        print(hf)
        notes.append(hf)
    else:
        fns["HF attention function"] = hf
    fns["cpu kernel alone (parameters precomputed)"] = kernel_loop
    fns["plain PyTorch step (parameters precomputed)"] = plain_loop
    with torch.no_grad():
        S, z, m = (t.clone() for t in warm)
        o_plain = decode_step(qs[0][:, 0], ks[0][:, 0], vs[0][:, 0], p, S, z, m)[0]
        o_pub = rf_attention(qs[0], ks[0], vs[0], fm, causal=True, initial_state=RFState(*warm))[:, 0]
        err = ((o_pub - o_plain).norm() / o_plain.norm()).item()
        assert err < 1e-4, f"plain decode step disagrees with rf_attention ({err:.2e})"
        t = interleaved(fns, reps)
    work = decode_flops(B, H)
    kernel = t["cpu kernel alone (parameters precomputed)"]
    public = t["rf_attention (public call)"]
    plain = t["plain PyTorch step (parameters precomputed)"]
    ratio, speedup = public / kernel, plain / public
    verdicts.append(
        f"decode B=1 H=8: the public rf_attention step takes {ratio:.2f}x the kernel step; goal <= 1.3x: "
        + ("met" if ratio <= 1.3 else f"missed by {ratio / 1.3:.2f}x")
    )
    verdicts.append(
        f"decode B=1 H=8: the public rf_attention step is {speedup:.2f}x faster than the plain PyTorch "
        f"step; goal {GOALS['decode']}x: "
        + ("met" if speedup >= GOALS["decode"] else f"missed by {GOALS['decode'] / speedup:.2f}x")
    )
    rows = []
    for name, sec in t.items():
        sec = sec / steps
        rows.append(
            (
                "decode step B=1 H=8",
                name,
                sec * 1e3,
                B / sec,
                work / sec / 1e9,
                100 * work / sec / 1e9 / mm_peak,
                sec / (kernel / steps),
            )
        )
    return rows


def training_rows(reps: int, verdicts: list, modes=(True, False)) -> list:
    """Forward + backward of a fixed linear loss of o at every shape, causal and non-causal: rows of
    (case, implementation, ms, tokens/s, peak MiB, time / time of rf_attention)."""
    rows = []
    for B, H, T in SHAPES:
        fm = RandomFeatureMap(D, M, component="posrf", weights="orf", num_heads=H, seed=0).eval()
        gen = torch.Generator().manual_seed(T)
        q, k, v, do = (torch.randn(B, T, H, D, generator=gen) for _ in range(4))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        for causal in modes:
            mode = "causal" if causal else "non-causal"
            p = fm.feature_params(q, k, scale=D**-0.5, causal=causal)

            def step(attend):
                def fn():
                    for t in leaves:
                        t.grad = None
                    attend(*leaves).backward(do)

                return fn

            fns = {
                "rf_attention (auto: cpu)": step(lambda a, b, c: rf_attention(a, b, c, fm, causal=causal)),
                "rf_attention (reference)": step(
                    lambda a, b, c: rf_attention(a, b, c, fm, causal=causal, backend="reference")
                ),
            }
            for c in (64, 128, 256) if causal else (64,):
                name = f"torch chunked (chunk {c})" if causal else "torch chunked"
                fns[name] = step(lambda a, b, x, c=c: chunked_attention(a, b, x, p, causal=causal, chunk_size=c))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            fns["SDPA (exact softmax)"] = step(
                lambda a, b, c: sdpa(
                    a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=causal
                ).transpose(1, 2)
            )
            t = interleaved(fns, reps, warmup=1)
            if causal:  # keep the best chunk size of the torch peer
                best = min((n for n in t if n.startswith("torch chunked")), key=t.get)
                t = {n: s for n, s in t.items() if not n.startswith("torch chunked") or n == best}
            mem = {name: peak_memory(fns[name], torch.device("cpu")) for name in t}
            ours = t["rf_attention (auto: cpu)"]
            peer = next(n for n in t if n.startswith("torch chunked"))
            case = f"B={B} H={H} T={T} {mode} fwd+bwd"
            for name, sec in t.items():
                rows.append((case, name, sec * 1e3, B * T / sec, (mem[name] or 0) / 2**20, sec / ours))

            def verdict(what, ratio, goal):
                met = "met" if ratio >= goal else f"missed by {goal / ratio:.2f}x"
                verdicts.append(f"{case}: {what} {ratio:.2f}x; goal {goal}x: {met}")

            verdict("rf_attention vs torch chunked:", t[peer] / ours, TRAIN_GOALS["peer"])
            if T == TRAIN_GOALS["sdpa_T"]:
                verdict("rf_attention vs SDPA:", t["SDPA (exact softmax)"] / ours, TRAIN_GOALS["sdpa"])
            verdict("the reference backend vs torch chunked:", t[peer] / t["rf_attention (reference)"], 1.0)
            if mem[peer] and mem["rf_attention (auto: cpu)"] is not None:
                ratio = mem["rf_attention (auto: cpu)"] / mem[peer]
                met = "met" if ratio <= 1.0 else "missed"
                verdicts.append(f"{case}: peak memory of rf_attention / torch chunked {ratio:.2f}; goal <= 1: {met}")
    return rows


def run(
    threads: int,
    reps: int,
    decode_only: bool = False,
    train_only: bool = False,
    command: str = "",
    noncausal_only: bool = False,
) -> str:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load = os.getloadavg()
    if not cpu_ops.extension_available():
        raise SystemExit(f"the CPU extension did not build: {cpu_ops.extension_error()}")
    performer = None if decode_only or train_only else performer_factory()
    mm_peak, mm_proj = mm_gflops(reps)
    rows = []
    verdicts = []
    for B, H, T in [] if decode_only or train_only else SHAPES:
        fm = RandomFeatureMap(D, M, component="posrf", weights="orf", num_heads=H, seed=0).eval()
        q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        for causal in (True, False):
            mode = "causal" if causal else "non-causal"
            p = fm.feature_params(q, k, scale=D**-0.5, causal=causal)
            fns = {
                "cpu (this package)": lambda: cpu_ops.cpu_attention(
                    q, k, v, p, causal=causal, key_padding_mask=None, initial_state=None, output_final_state=False
                ),
                "reference (this package)": lambda: reference_attention(q, k, v, p, causal=causal),
            }
            chunk_sizes = (64, 128, 256) if causal else (64,)
            for c in chunk_sizes:
                fns[f"torch chunked (chunk {c})" if causal else "torch chunked"] = lambda c=c: chunked_attention(
                    q, k, v, p, causal=causal, chunk_size=c
                )
            if performer is not None:
                attn = performer(causal)
                fns["performer-pytorch FastAttention"] = lambda: attn(qh, kh, vh)
            with torch.no_grad():
                o_cpu = fns["cpu (this package)"]()[0]
                o_tc = chunked_attention(q, k, v, p, causal=causal)
                err = ((o_cpu - o_tc).norm() / o_tc.norm()).item()
                assert err < 1e-3, f"torch chunked disagrees with the cpu backend ({err:.2e})"
                t = interleaved(fns, reps)
            if causal:  # keep the best chunk size of the torch peer
                best = min((n for n in t if n.startswith("torch chunked")), key=t.get)
                t = {n: s for n, s in t.items() if not n.startswith("torch chunked") or n == best}
            work = flops(B, H, T, causal)
            ours = t["cpu (this package)"]
            peers = {n: s for n, s in t.items() if n != "cpu (this package)" and not n.startswith("reference")}
            fastest = min(peers, key=peers.get)
            speedup = peers[fastest] / ours
            goal = GOALS[mode]
            verdicts.append(
                f"{mode} B={B} T={T}: {speedup:.2f}x the fastest peer ({fastest}); goal {goal}x: "
                + ("met" if speedup >= goal else f"missed by {goal / speedup:.2f}x")
            )
            for name, s in t.items():
                rows.append(
                    (
                        f"B={B} H={H} T={T} {mode}",
                        name,
                        s * 1e3,
                        B * T / s,
                        work / s / 1e9,
                        100 * work / s / 1e9 / mm_peak,
                        s / ours,
                    )
                )

    # Decode: one token per step, state carried, B=1, H=8.
    notes = []
    if not train_only:
        rows += decode_rows(reps, mm_peak, verdicts, notes)
    train = [] if decode_only else training_rows(reps, verdicts, (False,) if noncausal_only else (True, False))
    lines = [
        f"# CPU backend benchmark ({datetime.date.today().isoformat()})",
        "",
        f"- machine: {machine()}; torch threads: {torch.get_num_threads()}; load average before the run: "
        f"{load[0]:.2f} (other processes share these cores, so single runs can be noisy)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        *([f"- command: `{command}`"] if command else []),
        f"- fp32, posrf x orf, D = Dv = {D}, m = {M}; median of {reps} interleaved runs after warm-up",
        f"- torch.mm: {mm_peak:.1f} GFLOP/s at 2048^3, {mm_proj:.1f} GFLOP/s at the projection's shape "
        f"(32768 x {D}) @ ({D} x {M})",
        "- GFLOP/s = the same algorithmic flop count for every row (see bench.perf.cpu.flops); "
        "`vs cpu` = time / time of the cpu backend",
        "",
        "| case | implementation | ms | tokens/s | GFLOP/s | % of mm peak | vs cpu |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, name, ms, tps, gf, pct, rel in rows:
        lines.append(f"| {case} | {name} | {ms:.3f} | {tps:,.0f} | {gf:.1f} | {pct:.0f}% | {rel:.2f}x |")
    if train:
        lines += [
            "",
            "## Training: forward + backward",
            "",
            "A fixed linear loss of o, gradients of q, k, v; the feature map resolved inside the timed call for "
            "rf_attention (as in a model), outside for the torch peer. Peak MiB: "
            f"{PEAK_MEMORY_HOW['cpu']}. `vs rf_attention` = time / time of rf_attention (auto).",
            "",
            "| case | implementation | ms | tokens/s | peak MiB | vs rf_attention |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for case, name, ms, tps, mib_, rel in train:
            lines.append(f"| {case} | {name} | {ms:.1f} | {tps:,.0f} | {mib_:.0f} | {rel:.2f}x |")
    lines += ([""] + [f"- {n}" for n in notes]) if notes else []
    lines += ["", "Goals:", ""] + [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--decode-only", action="store_true", help="only the decode-step rows")
    parser.add_argument("--train-only", action="store_true", help="only the forward + backward rows")
    parser.add_argument(
        "--noncausal-train-only", action="store_true", help="only the non-causal forward + backward rows"
    )
    parser.add_argument("--name", default=None, help="the result file's name (default: cpu-<date><suffix>.md)")
    args = parser.parse_args()
    args.train_only = args.train_only or args.noncausal_train_only
    table = run(
        args.threads,
        args.reps,
        decode_only=args.decode_only,
        train_only=args.train_only,
        command=command_line("bench.perf.cpu"),
        noncausal_only=args.noncausal_train_only,
    )
    print(table)
    os.makedirs(args.out, exist_ok=True)
    suffix = ("" if args.threads == 2 else f"-t{args.threads}") + ("-decode" if args.decode_only else "")
    suffix += "-train" if args.train_only else ""
    path = os.path.join(args.out, args.name or f"cpu-{datetime.date.today().isoformat()}{suffix}.md")
    with open(path, "w") as f:
        f.write(table)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
