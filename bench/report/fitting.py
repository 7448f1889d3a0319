"""Section 6 of the report, fitted versus unfitted feature maps against softmax attention:
``python -m bench.report.fitting`` measures them; ``markdown`` (the report's section 6) quotes its newest table.

For every data set and feature map: fit on training batches with ``fit_feature_map`` (loss "kl"), then
measure on a HELD-OUT batch (never fitted on) the attention output error ||o - o_softmax|| / ||v|| of the
fitted map, of the same map before fitting, and of uniform attention (the mean of v), plus the cost of the
fit (wall time per Adam step, steps until the loss has made 95% of its total decrease).

Data sets (head_dim 32, m = 128, logits q.k / sqrt(d), the Spectraformer setting):
- ``iso-s``: q, k ~ N(0, s^2 I) for s = 0.5, 1.0, 1.5 (little structure to learn).
- ``subspace``: q, k = z U^T + noise, U a fixed 6-dimensional subspace per head, z ~ N(0, (d/6) s^2 I),
  noise 0.1 (queries and keys of trained models live near low-dimensional subspaces).
- ``trained``: q, k recorded from the last layer of a small causal softmax transformer trained here, in
  the same process, on a synthetic copy task (the model and its training are below); fitted causally.
- ``recorded``: q, k loaded from ``--recorded FILE`` (a ``.pt`` dict with ``q`` and ``k`` [B, T, H, D]
  tensors, e.g. from bench/report/train.py); the first half of the batch is fitted, the second held out.

Writes ``bench/results/fit-<date>.md`` and ``.json`` (device, versions and date in the header).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import spectraformer_fused as sf

from ..common import RESULTS, device_name, versions

MAPS = (
    ("posrf", "learnable"),
    ("posrf", "fastfood_learnable"),
    ("hyprf", "learnable"),
    ("hyprf", "fastfood_learnable"),
    ("hedgehog", "learnable"),
)


def rel_err(o, ref, v) -> float:
    return float((o.double() - ref.double()).norm() / v.double().norm())


# ----------------------------------------------------------------------------------------------------
# Data sets: lists of training (q, k) batches and one held-out (q, k, v)
# ----------------------------------------------------------------------------------------------------


def isotropic(shape, s, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) * f for f in (s, s, 1.0))


def subspace(shape, s, seed, rank=6, noise=0.1):
    B, T, H, D = shape
    basis = torch.linalg.qr(torch.randn(H, D, rank, generator=torch.Generator().manual_seed(1234)))[0]
    g = torch.Generator().manual_seed(seed)

    def one():
        z = torch.randn(B, T, H, rank, generator=g) * math.sqrt(D / rank) * s
        return torch.einsum("bthr,hdr->bthd", z, basis) + noise * torch.randn(B, T, H, D, generator=g)

    return one(), one(), torch.randn(B, T, H, D, generator=g)


class TinyCausalLM(nn.Module):
    """A small pre-norm causal transformer with softmax attention (SDPA), [B, T, H, D] q/k recorded."""

    def __init__(self, vocab, T, E=64, H=2, layers=2):
        super().__init__()
        self.H, self.D = H, E // H
        self.emb, self.pos = nn.Embedding(vocab, E), nn.Parameter(torch.randn(T, E) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "n1": nn.LayerNorm(E),
                    "qkv": nn.Linear(E, 3 * E),
                    "o": nn.Linear(E, E),
                    "n2": nn.LayerNorm(E),
                    "mlp": nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E)),
                }
            )
            for _ in range(layers)
        )
        self.out = nn.Linear(E, vocab)

    def forward(self, tokens, record=None):
        B, T = tokens.shape
        h = self.emb(tokens) + self.pos[:T]
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](h)).view(B, T, 3, self.H, self.D).unbind(2)
            if record is not None:
                record.append((q.detach(), k.detach()))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            h = h + blk["o"](o.transpose(1, 2).reshape(B, T, -1))
            h = h + blk["mlp"](blk["n2"](h))
        return self.out(h)


def copy_batch(B, T, vocab, gen):
    """First half random tokens, second half a copy: predicting the copy needs sharp attention."""
    half = torch.randint(1, vocab, (B, T // 2), generator=gen)
    return torch.cat([half, half], dim=1)


def trained_qk(shape, steps, seed=0):
    """Train TinyCausalLM on the copy task; return its last layer's q, k on fresh sequences and the log."""
    B, T, H, D = shape
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = 32
    model = TinyCausalLM(vocab, T, E=H * D, H=H)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = copy_batch(16, T, vocab, gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits[:, T // 2 - 1 :].reshape(-1, vocab), x[:, T // 2 :].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        rec = []
        x = copy_batch(5 * B, T, vocab, gen)
        logits = model(x, record=rec)
        acc = float((logits[:, T // 2 - 1 : -1].argmax(-1) == x[:, T // 2 :]).float().mean())
    q, k = rec[-1]
    log = {"train_steps": steps, "train_s": round(train_s, 1), "final_loss": float(loss.detach()), "copy_accuracy": acc}
    return q, k, log


# ----------------------------------------------------------------------------------------------------
# Fitting and measuring
# ----------------------------------------------------------------------------------------------------


def steps_to_converge(curve, frac=0.95, window=10) -> int:
    """First step whose trailing mean loss has made ``frac`` of the total decrease (start to final mean)."""
    if len(curve) < 2 * window:
        return len(curve)
    smooth = [statistics.fmean(curve[max(0, i - window + 1) : i + 1]) for i in range(len(curve))]
    start, end = smooth[0], smooth[-1]
    target = start - frac * (start - end)
    return next(i + 1 for i, s in enumerate(smooth) if s <= target)


def measure(name, train, held, causal, args, rows, maps=MAPS, steps=None):
    qh, kh, vh = held
    ref = sf.exact_attention(qh, kh, vh, causal=causal)
    if causal:
        uniform = vh.cumsum(1) / torch.arange(1, vh.shape[1] + 1)[None, :, None, None]
    else:
        uniform = vh.mean(1, keepdim=True).expand_as(vh)
    u = rel_err(uniform, ref, vh)
    logp = torch.log_softmax(
        sf.reference.exact_logits(qh, kh).masked_fill(
            torch.ones(qh.shape[1], qh.shape[1], dtype=torch.bool).triu(1)
            if causal
            else torch.zeros((), dtype=torch.bool),
            float("-inf"),
        ),
        -1,
    )
    entropy = float(-(logp.exp() * logp.clamp_min(-1e30)).sum(-1).mean())
    D, H = qh.shape[-1], qh.shape[2]
    steps = steps or args.steps
    for comp, weights in maps:
        fm = sf.RandomFeatureMap(D, args.m, component=comp, weights=weights, num_heads=H, seed=args.seed)
        with torch.no_grad():
            before = rel_err(sf.rf_attention(qh, kh, vh, fm, causal=causal, backend="reference"), ref, vh)
        t0 = time.perf_counter()
        curve = sf.fit_feature_map(
            fm, [t[0] for t in train], [t[1] for t in train], steps=steps, lr=args.lr, causal=causal
        )
        per_step = (time.perf_counter() - t0) / steps
        with torch.no_grad():
            after = rel_err(sf.rf_attention(qh, kh, vh, fm, causal=causal, backend="reference"), ref, vh)
            qt, kt = train[0]  # the same error on a batch it was fitted on
            vt = torch.randn(qt.shape, generator=torch.Generator().manual_seed(5))
            on_train = rel_err(
                sf.rf_attention(qt, kt, vt, fm, causal=causal, backend="reference"),
                sf.exact_attention(qt, kt, vt, causal=causal),
                vt,
            )
        rows.append(
            {
                "data": name,
                "causal": causal,
                "entropy": entropy,
                "component": comp,
                "weights": weights,
                "uniform": u,
                "unfitted": before,
                "fitted": after,
                "fitted_over_uniform": after / u,
                "fitted_train_batch": on_train,
                "unfitted_over_uniform": before / u,
                "loss_start": curve[0],
                "loss_end": statistics.fmean(curve[-10:]),
                "steps_to_converge": steps_to_converge(curve),
                "ms_per_step": 1e3 * per_step,
                "steps": steps,
                "batches": len(train),
            }
        )
        print(
            f"{name:10s} {comp:8s} x {weights:18s} uniform {u:.3f} unfitted {before:.3f} fitted {after:.3f} "
            f"({after / u:.2f}x uniform) {1e3 * per_step:.0f} ms/step",
            flush=True,
        )


def load_recorded(path):
    data = torch.load(path, map_location="cpu")
    q, k = data["q"].float(), data["k"].float()
    if q.dim() != 4 or q.shape != k.shape or q.shape[0] < 2:
        raise ValueError(
            f"{path}: q and k must be equal [B >= 2, T, H, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    half = q.shape[0] // 2
    g = torch.Generator().manual_seed(0)
    v = torch.randn(q.shape[0] - half, *q.shape[1:], generator=g)
    return [(q[:half], k[:half])], (q[half:], k[half:], v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4, help="training batches per data set (used in turn)")
    ap.add_argument("--stream-batches", type=int, default=200, help="fresh batches of the subspace-stream set")
    ap.add_argument("--train-steps", type=int, default=250, help="training steps of the small softmax model")
    ap.add_argument("--recorded", default=None, help=".pt file with q, k [B, T, H, D] recorded from a model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--render", default=None, help="rewrite the markdown of a saved JSON table and exit")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            write_markdown(json.load(f), os.path.splitext(args.render)[0] + ".md")
        return 0
    torch.set_num_threads(1)  # a shared 2-core machine: one thread gives steadier timings
    shape = (2, 128, 2, 32)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    t_start = time.perf_counter()
    warm = sf.RandomFeatureMap(8, 8, weights="learnable")  # first backward pays one-time imports
    sf.fit_feature_map(warm, torch.randn(1, 8, 1, 8), torch.randn(1, 8, 1, 8), steps=2)
    rows, notes = [], []
    for s in (0.5, 1.0, 1.5):
        train = [isotropic(shape, s, 100 + i)[:2] for i in range(args.batches)]
        measure(f"iso-{s}", train, isotropic(shape, s, 1), False, args, rows)
    train = [subspace(shape, 1.0, 100 + i)[:2] for i in range(args.batches)]
    measure("subspace", train, subspace(shape, 1.0, 1), False, args, rows)
    stream = [subspace(shape, 1.0, 1000 + i)[:2] for i in range(args.stream_batches)]
    measure(
        "subspace-stream",
        stream,
        subspace(shape, 1.0, 1),
        False,
        args,
        rows,
        maps=(("hyprf", "learnable"), ("hedgehog", "learnable")),
        steps=2 * args.steps,
    )
    notes.append(
        f"subspace-stream: the subspace set fitted on {args.stream_batches} fresh batches for {2 * args.steps} "
        "steps (each batch seen at most twice), against the overfitting of the 4-batch fits."
    )
    q, k, log = trained_qk(shape, args.train_steps)
    B = shape[0]
    g = torch.Generator().manual_seed(1)
    train = [(q[i * B : (i + 1) * B], k[i * B : (i + 1) * B]) for i in range(min(args.batches, 4))]
    measure("trained", train, (q[4 * B :], k[4 * B :], torch.randn(B, *shape[1:], generator=g)), True, args, rows)
    notes.append(
        f"trained: a 2-layer causal softmax transformer (E = 64, 2 heads of 32) trained {log['train_steps']} "
        f"AdamW steps ({log['train_s']} s) on a copy task (final loss {log['final_loss']:.3f}, copy accuracy "
        f"{log['copy_accuracy']:.2f}); q, k of its last layer on fresh sequences; fitted and measured causally."
    )
    if args.recorded:
        train, held = load_recorded(args.recorded)
        measure("recorded", train, held, False, args, rows)
    else:
        notes.append(
            "recorded: pending (no --recorded file given; q, k recorded by bench/report/train.py can be passed)."
        )
    elapsed = time.perf_counter() - t_start
    v = versions()
    header = (
        f"device: {device_name(torch.device('cpu'))} | 1 thread | dtype: float32 | torch {v['torch']}, "
        f"triton {v['triton']}, spectraformer_fused {v['spectraformer_fused']} | {date}"
    )
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"fit-{date}")
    data = {
        "header": header,
        "date": date,
        "elapsed_s": elapsed,
        "settings": vars(args) | {"shape": shape},
        "notes": notes,
        "rows": rows,
    }
    with open(base + ".json", "w") as f:
        json.dump(data, f, indent=1)
    write_markdown(data, base + ".md")
    print(f"wrote {base}.md ({elapsed:.0f} s)")
    return 0


def findings(rows) -> list[str]:
    """Sentences derived from the rows: the best fit per data set, the goal, and what limits it."""
    out = []
    for name in dict.fromkeys(r["data"] for r in rows):
        rs = [r for r in rows if r["data"] == name]
        best = min(rs, key=lambda r: r["fitted_over_uniform"])
        best_unfitted = min(rs, key=lambda r: r["unfitted_over_uniform"])
        gap = best["fitted"] / best["fitted_train_batch"]
        out.append(
            f"- {name}: best fitted map {best['component']} x {best['weights']} at "
            f"{best['fitted_over_uniform']:.2f}x uniform attention's held-out error (best unfitted "
            f"{best_unfitted['unfitted_over_uniform']:.2f}x); on a batch it was fitted on it reaches "
            f"{best['fitted_train_batch'] / best['uniform']:.2f}x (held-out / fitted-batch error {gap:.2f})."
            + (
                ""
                if name.startswith("iso")
                else " Goal (at most 0.5x): " + ("met." if best["fitted_over_uniform"] <= 0.5 else "not met.")
            )
        )
    structured = [r for r in rows if r["data"] in ("subspace", "trained", "recorded")]
    if structured:
        gaps = [r["fitted"] / r["fitted_train_batch"] for r in structured]
        losses = [r["loss_end"] for r in structured]
        out.append("")
        out.append(
            f"What limits it: on the structured sets the held-out error is {min(gaps):.2f}x to {max(gaps):.2f}x "
            "the error on a fitted batch, and the training loss flattens (end KL "
            f"{min(losses):.3f} to {max(losses):.3f}, no map reaches 0). "
            + (
                "With little gap, more data would not help: the limit is the family. "
                if max(gaps) < 1.3
                else "Much of the remaining error is overfitting to the fitted keys: a fit on 4 batches learns their "
                "keys (m x d parameters per head); subspace-stream shows what fresh data buys. "
            )
            + "".join(
                f"With {r['batches']} fresh batches ({r['component']} x {r['weights']}, {r['steps']} steps) "
                f"the gap closes (held-out / fitted-batch error {r['fitted'] / r['fitted_train_batch']:.2f}) "
                f"and the held-out error is {r['fitted_over_uniform']:.2f}x uniform's: what remains is the "
                "limit of the map family at m = 128 (and of the fit's step budget). "
                for r in rows
                if r["data"] == "subspace-stream" and r["component"] == "hyprf"
            )
            + "A likely reason: every map here is a sum of m = 128 exponentials exp(w_i.x) exp(w_i.y) with one key weight "
            "(exp(-|y|^2/2) for posrf/hyprf, a per-key normaliser for hedgehog); matching rows whose softmax "
            "weight spans several orders of magnitude with 128 such terms needs the w_i spread over every "
            "direction the logits use, and the KL fit favours the large weights, leaving the error of the "
            "many small ones, which the output error (weighted by v) still counts."
        )
    return out


def write_markdown(data, path) -> None:
    st, rows = data["settings"], data["rows"]
    date = data.get("date") or data["header"].rsplit("| ", 1)[-1]
    took = f" ({data['elapsed_s']:.0f} s)" if data.get("elapsed_s") is not None else ""
    lines = [
        f"# Fitting feature maps to softmax attention ({date})",
        "",
        data["header"],
        "",
        f"`python -m bench.report.fitting`{took}. B, T, H, D = {tuple(st['shape'])}, "
        f"m = {st['m']}; {st['steps']} Adam steps, lr {st['lr']}, loss 'kl', on {st['batches']} training batches "
        "used in turn; errors ||o - o_softmax|| / ||v|| on a held-out batch (never fitted on), v ~ N(0, 1). "
        "`converge`: steps until the trailing-10 mean loss made 95% of its decrease. `ms/step`: wall time of "
        "one fit step (forward, backward, Adam) on one thread of a shared machine. `fitted, on a training "
        "batch`: the fitted map's error on its first training batch (a gap to `fitted` is overfitting).",
        "",
    ]
    lines += [f"- {n}" for n in data["notes"]] + [""]
    lines += [
        "| data | attention entropy (nats) | map | uniform | unfitted | fitted | fitted / uniform | "
        "fitted, on a training batch | loss start -> end | converge (steps) | ms/step |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['entropy']:.2f} | {r['component']} x {r['weights']} | {r['uniform']:.3f} | "
            f"{r['unfitted']:.3f} | {r['fitted']:.3f} | {r['fitted_over_uniform']:.2f} | "
            f"{r['fitted_train_batch']:.3f} | {r['loss_start']:.3f} -> {r['loss_end']:.3f} | "
            f"{r['steps_to_converge']} of {r.get('steps', st['steps'])} | {r['ms_per_step']:.0f} |"
        )
    lines += ["", "## Findings", ""] + findings(rows)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------
# Section 6 of the report: the newest table, quoted
# ----------------------------------------------------------------------------------------------------


def markdown(out_dir: str) -> list[str]:
    """Section 6: the newest table of ``python -m bench.report.fitting`` (fitted versus unfitted feature maps
    on held-out queries and keys). That script takes minutes per data set, so this report does not run it;
    it quotes the table as the script wrote it, naming the file and its own header (device, date)."""
    results = RESULTS
    files = (
        sorted(f for f in os.listdir(results) if re.fullmatch(r"fit-\d{4}-\d{2}-\d{2}\.md", f))
        if os.path.isdir(results)
        else []
    )
    L = ["", "## 6. Fitting the feature map to softmax attention", ""]
    if not files:
        return L + ["No table yet: `python -m bench.report.fitting` writes `bench/results/fit-<date>.md`.", ""]
    with open(os.path.join(results, files[-1])) as f:
        lines = f.read().splitlines()
    header = next((ln for ln in lines if ln.startswith("device:")), "")
    table = [ln for ln in lines if ln.startswith("|")]
    rel = os.path.relpath(os.path.join(results, files[-1]), out_dir)
    return (
        L
        + [
            f"Quoted from [`{files[-1]}`]({rel}), measured by `python -m bench.report.fitting` in its own run "
            f"(not in this one; {header or 'see the file for its device and date'}). Errors are "
            "||o - o_softmax|| / ||v|| on held-out queries and keys; the file explains the data sets and "
            "what limits the fit.",
            "",
        ]
        + table
        + [""]
    )


if __name__ == "__main__":
    raise SystemExit(main())
