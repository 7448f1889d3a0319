"""The exact cache (DESIGN.md section 9): an MQAR-style sanity measurement at the attention level, no training.

``python -m bench.report.cache [--trials N] [--seq-len T] [--out FILE]``

Each sequence (one key/value head, head dim D) holds P key-value pairs at random positions of its first
3/4 and filler tokens elsewhere; its last P queries each look up one pair (query = that pair's key). A
query's answer is correct when the attention output is closer (cosine) to the pair's value than to every
other pair's value. Two settings: ``salient``, the pairs' keys longer than the fillers' (|y|^2 =
``--pair-logit``, y = sqrt(scale) k, against ``--filler-logit``) and the query equal to the key; ``equal``,
the pairs' keys as long as the fillers' and the query the key stretched to the same logit (q.k scale =
``--pair-logit``): exact attention still finds the pair, but no key tells it apart before the question. Rows, at the same memory per sequence where it applies (W - 1 + C keys besides the state):

- ``exact``: softmax attention (the ceiling);
- ``window W``: hybrid attention, features beyond the window (no cache);
- ``window W + C``: a longer window of the same memory as the cache (the most recent keys kept exact);
- ``cache C (<score>)``: window W and the cache, for every score of ``spectraformer_fused.cache.SCORES``.

Accuracy and mean cosine to the right value, with a 95% interval over sequences (normal approximation).
A last table times the cache (default score) against the window alone: a prefill on the reference and the
CPU backend, and the T = 1 decoding step on the CPU backend.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import torch

from spectraformer_fused import RandomFeatureMap, exact_attention, rf_attention
from spectraformer_fused.cache import SCORES
from spectraformer_fused.ops.cpu.cache import cpu_cache_attention


def make_batch(trials, T, P, D, pair_logit, filler_logit, scale, seed, equal=False):
    """q, k, v [trials, T, 1, D] and the (position of the pair, query position) of every question."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(trials, T, 1, D, generator=g)
    k = k / k.norm(dim=-1, keepdim=True) * math.sqrt(filler_logit / scale)
    q = torch.randn(trials, T, 1, D, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(filler_logit / scale)
    v = torch.randn(trials, T, 1, D, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    where = torch.stack([torch.randperm(3 * T // 4, generator=g)[:P] for _ in range(trials)])  # [trials, P]
    rows = torch.arange(trials)[:, None]
    pk = torch.randn(trials, P, D, generator=g)
    key_logit = filler_logit if equal else pair_logit
    k[rows, where, 0] = pk / pk.norm(dim=-1, keepdim=True) * math.sqrt(key_logit / scale)
    asks = T - P + torch.arange(P)  # the last P positions ask, in a random order of the pairs
    order = torch.stack([torch.randperm(P, generator=g) for _ in range(trials)])
    q[rows, asks[None].expand(trials, P), 0] = k[rows, where.gather(1, order), 0] * (pair_logit / key_logit)
    return q, k, v, where.gather(1, order), asks


def score_answers(o, v, where_asked, where_all, asks):
    """(correct [trials, P] bool, cosine to the right value [trials, P])."""
    rows = torch.arange(o.shape[0])[:, None]
    out = o[rows, asks[None].expand_as(where_asked), 0]  # [trials, P, D]
    vals = v[rows, where_all, 0]  # [trials, P, D]: every pair's value
    cos = torch.nn.functional.cosine_similarity(out[:, :, None], vals[:, None], dim=-1)  # [trials, P, P]
    right = v[rows, where_asked, 0]
    cos_right = torch.nn.functional.cosine_similarity(out, right, dim=-1)
    best = where_all.gather(1, cos.argmax(-1))
    return best == where_asked, cos_right


def run(args) -> str:
    torch.manual_seed(0)
    D, T, P, W, C = args.head_dim, args.seq_len, args.pairs, args.window, args.cache
    scale = D**-0.5
    fm = RandomFeatureMap(D, args.num_features, component=args.component, weights="orf", num_heads=1, seed=1).eval()
    lines = []
    for setting in ("salient", "equal"):
        equal = setting == "equal"
        q, k, v, asked, asks = make_batch(
            args.trials, T, P, D, args.pair_logit, args.filler_logit, scale, args.seed, equal=equal
        )
        where_all = asked.sort(-1).values
        p = fm.feature_params(q, k, scale=scale, causal=True)
        rows = [("exact", lambda: exact_attention(q, k, v, causal=True))]
        rows.append((f"window {W}", lambda: rf_attention(q, k, v, fm, causal=True, window=W, backend="reference")))
        rows.append(
            (f"window {W + C} (= memory of cache {C})", lambda: rf_attention(q, k, v, fm, causal=True, window=W + C))
        )
        for s in SCORES:
            rows.append(
                (
                    f"window {W} + cache {C} ({s})",
                    lambda s=s: cpu_cache_attention(q, k, v, p, causal=True, window=W, cache=C, score=s)[0],
                )
            )
        lines += [
            f"### {setting} pair keys (|y|^2 = {args.filler_logit if equal else args.pair_logit:g}, fillers "
            f"{args.filler_logit:g}; the question's logit {args.pair_logit:g})",
            "",
            "| attention | accuracy | 95% CI | cosine to the right value | time (s) |",
            "|---|---|---|---|---|",
        ]
        for name, fn in rows:
            t0 = time.perf_counter()
            with torch.no_grad():
                o = fn()
            dt = time.perf_counter() - t0
            ok, cos = score_answers(o.float(), v, asked, where_all, asks)
            per_seq = ok.float().mean(-1)
            acc = per_seq.mean().item()
            half = 1.96 * per_seq.std().item() / math.sqrt(args.trials)
            lines.append(f"| {name} | {acc:.3f} | [{acc - half:.3f}, {acc + half:.3f}] | {cos.mean():.3f} | {dt:.2f} |")
        lines.append("")
    return "\n".join(lines)


def timing(args) -> str:
    """Prefill and T = 1 step times of the cache (default score) against the window alone (median of 3)."""
    B, T, H, Hk, D, W, C = 1, args.time_len, 8, 2, 64, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, generator=g) * 0.5 for h in (H, Hk, Hk))
    fm = RandomFeatureMap(D, 64, component="hyprf", num_heads=Hk, seed=0).eval()

    def med(fn, n=3):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    p = fm.feature_params(q, k, scale=D**-0.5, causal=True)

    def cache_cpu(q, k, v, state=None):  # ops/cpu/cache.py needs no compiled extension
        return cpu_cache_attention(
            q, k, v, p, causal=True, window=W, cache=C, initial_state=state, output_final_state=True
        )

    def window(backend, q, k, v, state=None):  # None when the compiled CPU backend is not loadable
        try:
            return rf_attention(
                q, k, v, fm, causal=True, window=W, backend=backend, initial_state=state, output_final_state=True
            )
        except RuntimeError:
            return None

    def ms(t, steps=1):
        return "n/a (no compiled CPU backend)" if t is None else f"{t / steps * 1e3:.2f}"

    rows = []
    for backend in ("reference", "cpu"):
        t_w = med(lambda: window(backend, q, k, v)) if window(backend, q, k, v) is not None else None
        if backend == "reference":
            t_c = med(lambda: rf_attention(q, k, v, fm, causal=True, window=W, cache=C, backend=backend), n=1)
        else:
            t_c = med(lambda: cache_cpu(q, k, v))
        rows.append(f"| prefill T = {T}, {backend} | {ms(t_w)} | {ms(t_c)} |")
    one = [t[:, :1] for t in (q, k, v)]
    steps = 50
    sw = window("cpu", q, k, v)
    t_w = None if sw is None else med(lambda: [window("cpu", *one, sw[1]) for _ in range(steps)])
    sc = cache_cpu(q, k, v)[1]
    t_c = med(lambda: [cache_cpu(*one, sc) for _ in range(steps)])
    rows.append(f"| T = 1 step after {T} tokens, cpu | {ms(t_w, steps)} | {ms(t_c, steps)} |")
    head = [
        f"### Cost: B = {B}, H = {H}, H_kv = {Hk}, D = {D}, hyprf m = 64, W = {W}, C = {C}, fp32",
        "",
        f"| call | window {W} (ms) | window {W} + cache {C} (ms) |",
        "|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--cache", type=int, default=16)
    ap.add_argument("--num-features", type=int, default=32)
    ap.add_argument("--component", default="hyprf")
    ap.add_argument("--pair-logit", type=float, default=6.0)
    ap.add_argument("--filler-logit", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the decision loop's tensors are tiny; on a loaded machine intra-op "
        "threads only add waits)",
    )
    ap.add_argument("--time-len", type=int, default=1024, help="the prefill length of the timing table (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    body = run(args)
    if args.time_len:
        body += "\n" + timing(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = [
        "# The exact cache: MQAR-style associative recall at the attention level",
        "",
        f"date: {datetime.date.today()} | device: CPU ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads) | load average {load:.1f} | torch {torch.__version__}",
        f"command: `python -m bench.report.cache {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"setting: T = {args.seq_len}, P = {args.pairs} pairs, D = {args.head_dim}, {args.component} x orf, "
        f"m = {args.num_features}, {args.trials} sequences; total {time.perf_counter() - t0:.0f} s",
        "",
    ]
    text = "\n".join(head) + body
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
