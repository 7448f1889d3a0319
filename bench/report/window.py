"""Section 9 of the report: hybrid attention, exact inside a window of W keys and random features beyond it
(DESIGN.md section 6), against random features only, sliding-window softmax and exact attention.

``python -m bench.report.window [--full] [--device cpu|cuda] [--out DIR] [--parts accuracy,mqar,speed]`` runs it
alone; ``python -m bench.report --section window`` runs it inside the report. Three parts:

- accuracy: the relative error ||o - o_exact|| / ||v|| of ``rf_attention(..., window=W)`` (reference
  backend) against exact attention for W = 0 (random features only), 4, 16, 64 and the main pairs at
  q, k ~ N(0, s^2), s = 0.5, 1, 1.5, causal and non-causal, beside sliding-window attention (the exact
  kernel over the window's keys only, nothing beyond);
- mqar: MQAR with the key-value pairs spread over a sequence of T = 8 W tokens (``bench/tasks/mqar.py``,
  ``layout="spread"``), trained with softmax, sliding-window softmax (``softmax@w<W>``), random features
  only and the hybrid (``<component>:<weights>@w<W>``) through ``bench/tasks/model.py``;
- speed: forward (prefill) and forward + backward time and peak memory of ``rf_attention`` with and
  without the window on every backend of the device, against SDPA (causal) and SDPA with the band mask.

The hybrid's GPU rows are ``bench/perf/gpu.py``'s ``window_rows`` (and so in ``bench/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import spectraformer_fused as sf

from .. import common
from ..common import Bar, Context, fmt, gaussian_qkv, md_table, mib
from ..peers import window_exact_attention
from ..tasks.trainer import TaskData, default_backend, summarise, train_one
from ..timing import time_interleaved
from . import train
from .settings import WindowSettings, window_settings

PARTS = ("accuracy", "mqar", "speed")
WINDOW_ONLY = "window only"  # the accuracy rows of sliding-window attention


# ----------------------------------------------------------------------------------------------------
# The attentions
# ----------------------------------------------------------------------------------------------------


def window_supported() -> bool:
    """Whether ``rf_attention`` takes ``window=`` in this checkout."""
    return "window" in inspect.signature(sf.rf_attention).parameters


def hybrid_attention(q, k, v, fm, *, window: int, causal: bool, backend: str):
    """``rf_attention`` with a window of ``window`` exact keys (0: random features only, no ``window=``)."""
    kw = {"window": window} if window else {}
    return sf.rf_attention(q, k, v, fm, causal=causal, backend=backend, **kw)


def _err(o, ref, v) -> float:
    return float((o.double() - ref.double()).norm() / v.double().norm())


def _status(exc: Exception) -> str:
    return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"


# ----------------------------------------------------------------------------------------------------
# (a) approximation error against the window size
# ----------------------------------------------------------------------------------------------------


def run_accuracy(ws: WindowSettings, ctx: Context, progress=None) -> list[dict]:
    B, T, H, D = ws.acc_shape
    dev = ws.device
    rows = []
    for kernel in ws.kernels:
        for causal in (True, False):
            data = {}  # (s, seed) -> q, k, v, exact
            for s in ws.scales:
                for seed in range(ws.seeds):
                    q, k, v = gaussian_qkv(ws.acc_shape, s, seed, dev)
                    data[s, seed] = (q, k, v, sf.exact_attention(q, k, v, kernel=kernel, causal=causal))
            base = {
                "section": "window_accuracy",
                "kernel": kernel,
                "causal": causal,
                "m": ws.acc_m,
                "seeds": ws.seeds,
                "B": B,
                "T": T,
                "H": H,
                "D": D,
                **ctx.fields("float32"),
            }
            for s in ws.scales:
                uniform = []
                for seed in range(ws.seeds):
                    q, k, v, ref = data[s, seed]
                    n = torch.arange(1, T + 1, device=dev, dtype=v.dtype)[None, :, None, None]
                    mean = v.cumsum(1) / n if causal else v.mean(1, keepdim=True).expand_as(v)
                    uniform.append(_err(mean, ref, v))
                rows.append({**base, "s": s, "pair": "uniform", "window": None, "backend": "-"} | _stats(uniform, None))
                for W in ws.windows:
                    errs = [] if W else None
                    for seed in range(ws.seeds):
                        if W:
                            q, k, v, ref = data[s, seed]
                            errs.append(
                                _err(window_exact_attention(q, k, v, window=W, causal=causal, kernel=kernel), ref, v)
                            )
                    rows.append(
                        {**base, "s": s, "pair": WINDOW_ONLY, "window": W, "backend": "torch"}
                        | (_stats(errs, None) if W else {"mean": None, "std": None, "status": "n/a (no key)"})
                    )
            for pair in ws.pairs:
                comp, wname = pair.split(":")
                for W in ws.windows:
                    errs = {s: [] for s in ws.scales}
                    reason = None
                    for seed in range(ws.seeds):
                        if reason is None:
                            try:
                                fm = sf.RandomFeatureMap(
                                    D, ws.acc_m, component=comp, weights=wname, kernel=kernel, num_heads=H,
                                    seed=1000 + seed, device=dev,
                                ).eval()  # fmt: skip
                                with torch.no_grad():  # every scale in one call, stacked on B
                                    q, k, v = (torch.cat([data[s, seed][i] for s in ws.scales]) for i in range(3))
                                    o = hybrid_attention(q, k, v, fm, window=W, causal=causal, backend="reference")
                                    for s, o_s in zip(ws.scales, o.split(B)):
                                        _, _, v_s, ref = data[s, seed]
                                        errs[s].append(_err(o_s, ref, v_s))
                            except Exception as exc:  # a pair or window the checkout cannot run is recorded
                                reason = _status(exc)
                        if progress:
                            progress()
                    for s in ws.scales:
                        rows.append(
                            {**base, "s": s, "pair": pair, "window": W, "backend": "reference"}
                            | _stats(errs[s], reason)
                        )
    return rows


def accuracy_rows_total(ws: WindowSettings) -> int:
    return len(ws.kernels) * 2 * len(ws.pairs) * len(ws.windows) * ws.seeds


def _stats(vals, reason) -> dict:
    if reason is not None or not vals:
        return {"mean": None, "std": None, "status": reason or "n/a"}
    if not all(math.isfinite(e) for e in vals):
        return {"mean": float("nan"), "std": float("nan"), "status": "non-finite output"}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "status": "ok"}


def _acc(rows, kernel, causal, s, pair, W):
    return next(
        (
            r
            for r in rows
            if r["kernel"] == kernel
            and r["causal"] == causal
            and r["s"] == s
            and r["pair"] == pair
            and r["window"] == W
        ),
        None,
    )


def accuracy_findings(rows, ws: WindowSettings, W: int = 16, s: float = 1.0) -> list[str]:
    """Per kernel and mask: how many pairs have, at window W and scale s, a lower error than both random
    features only (W = 0) and the window alone."""
    out = []
    if W not in ws.windows or s not in ws.scales or 0 not in ws.windows:
        return out
    for kernel in ws.kernels:
        for causal in (True, False):
            wo = _acc(rows, kernel, causal, s, WINDOW_ONLY, W)
            wins, seen, detail = 0, 0, []
            for pair in ws.pairs:
                h, rf = _acc(rows, kernel, causal, s, pair, W), _acc(rows, kernel, causal, s, pair, 0)
                if h is None or rf is None or h["mean"] is None or rf["mean"] is None or wo["mean"] is None:
                    continue
                seen += 1
                win = h["mean"] < rf["mean"] and h["mean"] < wo["mean"]
                wins += win
                detail.append(f"{pair.replace(':', ' x ')} {h['mean']:.3g} (random features only {rf['mean']:.3g})")
            mask = "causal" if causal else "non-causal"
            if not seen:
                out.append(f"{kernel}, {mask}: no hybrid row ran (see the status column of `window_accuracy.csv`).")
                continue
            out.append(
                f"{kernel}, {mask}, s = {s:g}, W = {W}: the hybrid's error is below both random features only and "
                f"the window alone ({wo['mean']:.3g}) for {wins} of {seen} pairs: " + "; ".join(detail) + "."
            )
    return out


def plot_accuracy(rows, ws: WindowSettings, out: str, ctx: Context) -> list[str]:
    plt = common.get_plt()
    if plt is None:
        return []
    files = []
    xs = list(range(len(ws.windows)))
    for kernel in ws.kernels:
        fig, axes = plt.subplots(2, len(ws.scales), figsize=(4.4 * len(ws.scales), 7.2), sharey=True, squeeze=False)
        for i, causal in enumerate((True, False)):
            for j, s in enumerate(ws.scales):
                ax = axes[i, j]
                for pair in (*ws.pairs, WINDOW_ONLY):
                    pts = [(x, _acc(rows, kernel, causal, s, pair, W)) for x, W in zip(xs, ws.windows)]
                    pts = [(x, r["mean"], r["std"]) for x, r in pts if r and r["mean"] is not None]
                    if pts:
                        px, py, pe = zip(*pts)
                        style = dict(ls="--", color="k") if pair == WINDOW_ONLY else {}
                        ax.errorbar(px, py, yerr=pe, marker="o", ms=3, lw=1, capsize=2, label=pair, **style)
                u = _acc(rows, kernel, causal, s, "uniform", None)
                if u and u["mean"] is not None:
                    ax.axhline(u["mean"], color="grey", ls=":", lw=1, label="uniform attention")
                ax.set_yscale("log")
                ax.set_xticks(xs, [str(W) for W in ws.windows])
                ax.set_title(f"{'causal' if causal else 'non-causal'}, s = {s}", fontsize=9)
                ax.set_xlabel("window W (0 = random features only)")
        axes[0, 0].set_ylabel("||o - o_exact|| / ||v||")
        axes[0, 0].legend(fontsize=6)
        B, T, H, D = ws.acc_shape
        fig.suptitle(
            f"hybrid attention error against the window, {kernel} kernel, T = {T}, m = {ws.acc_m}\n"
            f"{ctx.line('float32', 'window')}",
            fontsize=8,
        )
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        name = f"window_accuracy_{kernel}.png"
        fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def accuracy_markdown(rows, ws: WindowSettings, ctx: Context, plots) -> list[str]:
    B, T, H, D = ws.acc_shape
    L = [
        "### Approximation error against the window",
        "",
        f"_{ctx.line('float32', 'window')}_",
        "",
        "Relative error ||o - o_exact|| / ||v|| of `rf_attention(..., window=W)` (reference backend; W = 0 is "
        "random features only, no `window=`) against `exact_attention` with the same kernel and mask; "
        f"B={B} T={T} H={H} D={D}, m = {ws.acc_m}; q, k ~ N(0, s^2), v ~ N(0, 1); mean +- std over {ws.seeds} "
        "seeds (inputs and W redrawn). *window only*: the exact kernel over the window's keys alone (sliding-"
        "window attention, normalised over them). *uniform*: the mean of the visible values. "
        "Bold: the lowest error of its column.",
        "",
    ]
    for kernel in ws.kernels:
        for causal in (True, False):
            for s in ws.scales:
                u = _acc(rows, kernel, causal, s, "uniform", None)
                L += [
                    f"**{kernel}, {'causal' if causal else 'non-causal'}, s = {s}** (uniform attention "
                    f"{fmt(u['mean'] if u else None)})",
                    "",
                ]
                names = (*ws.pairs, WINDOW_ONLY)
                best = {}
                for W in ws.windows:
                    vals = [
                        r["mean"] for p in names if (r := _acc(rows, kernel, causal, s, p, W)) and r["mean"] is not None
                    ]
                    best[W] = min(vals) if vals else None
                table, reasons = [], {}
                for p in names:
                    cells = []
                    for W in ws.windows:
                        r = _acc(rows, kernel, causal, s, p, W)
                        if r is None or r["mean"] is None:
                            cells.append("-" if p == WINDOW_ONLY and W == 0 else "n/a")
                            if r is not None and not (p == WINDOW_ONLY and W == 0):
                                reasons.setdefault(r["status"], []).append(f"{p} W={W}")
                            continue
                        txt = f"{fmt(r['mean'])} +- {fmt(r['std'], '.2g')}"
                        cells.append(f"**{txt}**" if r["mean"] == best[W] else txt)
                    table.append((p.replace(":", " x "), *cells))
                L += md_table(("attention", *[f"W={W}" for W in ws.windows]), table)
                L += [f"\n- {why}: {', '.join(where)}" for why, where in reasons.items()]
                L.append("")
    L += ["Findings (computed from the tables):", ""] + [f"- {f}" for f in accuracy_findings(rows, ws)] + [""]
    L += [f"![{p}]({p})" for p in plots] + [""]
    return L


# ----------------------------------------------------------------------------------------------------
# (b) MQAR with the pairs spread over T >= 8 W
# ----------------------------------------------------------------------------------------------------


def mqar_attentions(ws: WindowSettings) -> list[str]:
    """softmax, sliding-window softmax, then every random-feature pair alone and with the window."""
    W = ws.mqar_window
    return ["softmax", f"softmax@w{W}"] + [p for pair in ws.mqar_pairs for p in (pair, f"{pair}@w{W}")]


def run_mqar(ws: WindowSettings, ctx: Context, out: str, bar=None) -> dict:
    """Train every attention of ``mqar_attentions`` with ``mqar_seeds`` seeds; the attentions that cannot
    run in this checkout (no ``window=`` yet) get a status instead of a row of numbers."""
    ts = train.mqar_spread_task(ws)
    train.use_threads(ctx, ws.device, None)
    ctx.threads["window"] = ctx.threads["train"]
    data = TaskData(ts, ws.device)
    backend = default_backend(ws.device)
    load = [common.loadavg()]
    summaries, runs, skipped = [], [], {}
    for pair in mqar_attentions(ws):
        these = []
        for seed in range(ws.mqar_seeds):
            try:
                these.append(train_one(pair, data, seed, backend=backend, bar=bar, measure=seed == 0))
            except Exception as exc:  # e.g. no window= in this checkout
                skipped[pair] = _status(exc)
                break
        if these and pair not in skipped:
            runs += these
            summaries.append(summarise(these, data.chance))
    load.append(common.loadavg())
    header = ctx.line("float32", "window")
    meta = {
        "header": header,
        "steps": ts.steps,
        "seeds": list(range(ws.mqar_seeds)),
        "load": load,
        "redraw": "fixed (drawn once from the seed)",
        "mem_how": common.PEAK_MEMORY_HOW[ws.device.type] + ", over one training step",
    }
    lines = train.table_lines("mqar_spread", summaries, data, meta)
    plots = train.plot("mqar_spread", summaries, runs, out, header) if summaries else []
    gaps = query_gaps(data)
    return {
        "summaries": summaries,
        "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
        "skipped": skipped,
        "lines": lines,
        "plots": plots,
        "chance": data.chance,
        "gaps": gaps,
        "backend": backend,
    }


def query_gaps(data) -> dict:
    """How far back the pair of each test query lies: the share within the window, the median gap."""
    x, y = data.splits["test"]
    gaps = []
    for i in range(min(200, x.shape[0])):
        xs, ys = x[i].tolist(), y[i].tolist()
        first = {}  # a key's first place is its pair (each key is asked at most once, after its pair)
        for p, tok in enumerate(xs):
            first.setdefault(tok, p)
        gaps += [p - first[xs[p]] for p, t in enumerate(ys) if t != -100]
    return {"median": statistics.median(gaps), "max": max(gaps), "gaps": gaps}


def mqar_findings(res: dict, ws: WindowSettings) -> list[str]:
    W = ws.mqar_window
    by = {s["pair"]: s for s in res["summaries"]}
    pct = lambda s: f"{100 * s['acc_mean']:.1f} +- {100 * s['acc_std']:.1f}%"  # noqa: E731
    within = sum(g < W for g in res["gaps"]["gaps"]) / max(1, len(res["gaps"]["gaps"]))
    out = [
        f"{100 * within:.0f}% of the test queries have their pair within the window (distance < W = {W}); "
        f"median distance {res['gaps']['median']:.0f} tokens. Chance {100 * res['chance']:.1f}%."
    ]
    soft, wo = by.get("softmax"), by.get(f"softmax@w{W}")
    if soft:
        out.append(f"softmax: {pct(soft)}" + (f"; sliding-window softmax (W = {W}): {pct(wo)}." if wo else "."))
    for pair in ws.mqar_pairs:
        rf, h = by.get(pair), by.get(f"{pair}@w{W}")
        if rf is None or h is None:
            why = res["skipped"].get(f"{pair}@w{W}") or res["skipped"].get(pair) or "not run"
            out.append(f"{pair.replace(':', ' x ')}: no comparison ({why}).")
            continue
        verdicts = []
        for name, other in (("random features only", rf), ("the window alone", wo)):
            if other is None:
                continue
            gap = h["acc_mean"] - other["acc_mean"]
            spread = max(h["acc_std"], other["acc_std"])
            verdicts.append(
                f"{'above' if gap > 0 else 'not above'} {name} by {100 * gap:+.1f} points"
                + (" (more than the larger seed std)" if abs(gap) > spread else " (within the larger seed std)")
            )
        out.append(
            f"{pair.replace(':', ' x ')}: random features only {pct(rf)}, hybrid (W = {W}) {pct(h)}; the hybrid is "
            + "; ".join(verdicts)
            + "."
        )
    return out


def mqar_markdown(res: dict, ws: WindowSettings) -> list[str]:
    W = ws.mqar_window
    c = ws.mqar
    L = [
        "### MQAR with the pairs spread over T = 8 W",
        "",
        f'`bench/tasks/model.py`\'s model (2 layers, 2 heads of 32, m = 128) on MQAR with `layout="spread"`: each of the '
        f"{c.num_pairs} key-value pairs at a random place of a sequence of T = {c.seq_len} = {c.seq_len // W} W "
        f"tokens (W = {W}), each query at a random later place. Attentions: softmax (SDPA), `softmax@w{W}` "
        f"(sliding-window softmax: SDPA with the band mask, nothing beyond the window), every random-feature pair "
        f"alone and with the window (`@w{W}`: the hybrid, `SpectraAttention(window={W})`), backend "
        f"`{res['backend']}`. The model has a token shift and no position embeddings (`ModelConfig(token_shift=True, "
        "positions=False)`): a pair then sits in one token and softmax learns the task within the few steps a CPU "
        "affords (the shift is the short convolution of H3 and Based). Same task: `python -m bench.report.train "
        "--task mqar_spread --quick --pairs "
        f"{','.join(mqar_attentions(ws))}`.",
        "",
    ]
    L += res["lines"]
    for pair, why in res["skipped"].items():
        L.append(f"- `{pair}` did not run: {why}")
    if res["skipped"]:
        L.append("")
    L += ["Findings (computed from the table):", ""] + [f"- {f}" for f in mqar_findings(res, ws)] + [""]
    L += [f"![{p}]({p})" for p in res["plots"]] + [""]
    return L


# ----------------------------------------------------------------------------------------------------
# (c) speed and memory
# ----------------------------------------------------------------------------------------------------


def speed_backends(device: torch.device) -> list[str]:
    names = sf.available_backends()
    if device.type == "cuda":
        return [b for b in ("triton", "reference") if b in names]
    return [b for b in ("cpu", "reference") if b in names]


def speed_impls(ws: WindowSettings) -> list[tuple]:
    """[(impl, backend, pair, window)] of the speed table."""
    W = ws.speed_window
    out = [("sdpa", "torch", "exact", None), ("sdpa-window", "torch", "exact", W)]
    for pair in ws.speed_pairs:
        for backend in speed_backends(ws.device):
            out += [("rf_attention", backend, pair, None), ("rf_attention", backend, pair, W)]
    return out


def _call(impl, backend, pair, window, fm):
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ).transpose(1, 2)
    if impl == "sdpa-window":
        return lambda q, k, v: window_exact_attention(q, k, v, window=window, causal=True)
    return lambda q, k, v: hybrid_attention(q, k, v, fm, window=window or 0, causal=True, backend=backend)


def run_speed(ws: WindowSettings, ctx: Context, progress=None) -> list[dict]:
    """Causal forward (prefill) and forward + backward of every implementation at every T; the rows of
    one (T, pass) are timed interleaved (``timing.time_interleaved``) so that load hits them alike."""
    B, H, D, m = ws.speed_shape
    dev = ws.device
    rows = []
    impls = speed_impls(ws)
    for T in ws.speed_T:
        gen = torch.Generator().manual_seed(T)
        q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(dev) for _ in range(4))
        for pas in ("fwd", "fwd+bwd"):
            fns, meta = {}, {}
            for impl, backend, pair, window in impls:
                key = (impl, backend, pair, window)
                row = {
                    "section": "window_speed",
                    "impl": impl,
                    "backend": backend,
                    "pair": pair,
                    "window": window,
                    "causal": True,
                    "pass": pas,
                    "B": B,
                    "T": T,
                    "H": H,
                    "D": D,
                    "m": m,
                    **ctx.fields("float32"),
                }
                try:
                    fm = None
                    if impl == "rf_attention":
                        comp, wname = pair.split(":")
                        fm = sf.RandomFeatureMap(D, m, component=comp, weights=wname, num_heads=H, seed=0, device=dev)
                        fm.eval()
                    call = _call(impl, backend, pair, window, fm)
                    if pas == "fwd":

                        def fn(call=call):
                            with torch.no_grad():
                                call(q, k, v)
                    else:
                        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                        params = [] if fm is None else [p for p in fm.parameters() if p.requires_grad]

                        def fn(call=call, qq=qq, kk=kk, vv=vv, params=params):
                            for t in [qq, kk, vv, *params]:
                                t.grad = None
                            call(qq, kk, vv).backward(do)

                    fn()  # fails here, not inside the timing, when the checkout cannot run it
                    fns[key] = fn
                    row["status"] = "ok"
                except Exception as exc:
                    row.update(ms=None, status=_status(exc))
                meta[key] = row
            times = time_interleaved(fns, dev, ws.speed_budget_s) if fns else {}
            for key, row in meta.items():
                if key in times:
                    med, lo, hi, _ = times[key]
                    row.update(ms=med, ms_p20=lo, ms_p80=hi, tokens_per_s=B * T / (med * 1e-3))
                    row["peak_mem_bytes"] = common.peak_memory(fns[key], dev)
                rows.append(row)
                if progress:
                    progress()
            for row in rows[-len(meta) :]:
                plain = next(
                    (
                        r
                        for r in rows[-len(meta) :]
                        if r["impl"] == "rf_attention" and r["backend"] == row["backend"] and r["pair"] == row["pair"]
                        and r["window"] is None
                    ),
                    None,
                )  # fmt: skip
                sdpa = next(r for r in rows[-len(meta) :] if r["impl"] == "sdpa")
                ok = row.get("ms") is not None
                row["vs_plain"] = row["ms"] / plain["ms"] if ok and plain and plain.get("ms") else None
                row["vs_sdpa"] = row["ms"] / sdpa["ms"] if ok and sdpa.get("ms") else None
    return rows


def speed_findings(rows, ws: WindowSettings) -> list[str]:
    out = []
    T = max(ws.speed_T)
    for r in rows:
        if r["T"] == T and r["pass"] == "fwd" and r["impl"] == "rf_attention" and r["window"] and r.get("vs_plain"):
            plain = [
                p
                for p in rows
                if (p["T"], p["pass"], p["impl"], p["pair"]) == (T, "fwd", "rf_attention", r["pair"])
                and p["window"] is None
                and p.get("ms") is not None
            ]
            best = min(plain, key=lambda p: p["ms"]) if plain else None
            out.append(
                f"prefill at T = {T}, W = {r['window']}, {r['pair'].replace(':', ' x ')} on the `{r['backend']}` "
                f"backend: {r['ms']:.3g} ms, {r['vs_plain']:.2f}x the same backend without the window"
                + (
                    f", {r['ms'] / best['ms']:.2f}x the fastest plain path (`{best['backend']}`, {best['ms']:.3g} ms)"
                    if best is not None and best["backend"] != r["backend"]
                    else ""
                )
                + (f", {r['vs_sdpa']:.2f}x SDPA (causal)" if r.get("vs_sdpa") else "")
                + "."
            )
        elif r["T"] == T and r["pass"] == "fwd" and r["impl"] == "rf_attention" and r["window"] and r["ms"] is None:
            out.append(f"the `{r['backend']}` backend with W = {r['window']} did not run: {r['status']}.")
    return out


def speed_markdown(rows, ws: WindowSettings, ctx: Context, plots) -> list[str]:
    B, H, D, m = ws.speed_shape
    L = [
        "### Speed and memory",
        "",
        f"_{ctx.line('float32', 'window')}_",
        "",
        f"Causal attention, B={B} H={H} D=Dv={D}, m = {m}, float32; `rf_attention` as users call it, with an "
        f"explicit backend (each row names it), without and with `window={ws.speed_window}`; SDPA causal; "
        "`sdpa-window`: SDPA with the band mask (sliding-window softmax). fwd: the forward under no_grad "
        "(prefill); fwd+bwd: forward and backward to q, k, v. Time: median (p20-p80) of interleaved runs. "
        f"Peak memory: {common.PEAK_MEMORY_HOW[ws.device.type]}. vs plain: time over the same backend and pair "
        "without the window.",
        "",
    ]
    table = []
    for r in rows:
        ms = "n/a" if r.get("ms") is None else f"{r['ms']:.3g} ({r['ms_p20']:.3g}-{r['ms_p80']:.3g})"
        table.append(
            (
                r["impl"],
                r["backend"],
                r["pair"].replace(":", " x "),
                r["window"] or "-",
                r["T"],
                r["pass"],
                ms,
                fmt(r.get("tokens_per_s")),
                mib(r.get("peak_mem_bytes")),
                fmt(r.get("vs_plain"), ".2f"),
                fmt(r.get("vs_sdpa"), ".2f"),
                r["status"],
            )
        )
    L += md_table(
        (
            "impl",
            "backend",
            "pair",
            "W",
            "T",
            "pass",
            "ms (p20-p80)",
            "tokens/s",
            "peak MiB",
            "vs plain",
            "vs SDPA",
            "status",
        ),
        table,
    )
    L += ["", "Findings (computed from the table):", ""] + [f"- {f}" for f in speed_findings(rows, ws)] + [""]
    L += [f"![{p}]({p})" for p in plots] + [""]
    return L


def plot_speed(rows, ws: WindowSettings, out: str, ctx: Context) -> list[str]:
    plt = common.get_plt()
    if plt is None or not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, pas in zip(axes[0], ("fwd", "fwd+bwd")):
        for impl, backend, pair, window in speed_impls(ws):
            pts = sorted(
                (r["T"], r["ms"])
                for r in rows
                if (r["impl"], r["backend"], r["pair"], r["window"], r["pass"]) == (impl, backend, pair, window, pas)
                and r.get("ms") is not None
            )
            if pts:
                label = impl if impl.startswith("sdpa") else f"{pair} {backend}" + (f" W={window}" if window else "")
                ax.plot(*zip(*pts), marker="o", ls="--" if window else "-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
        ax.set_title(f"causal {pas}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"hybrid attention speed\n{ctx.line('float32', 'window')}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    name = "window_speed.png"
    fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [name]


# ----------------------------------------------------------------------------------------------------
# The section
# ----------------------------------------------------------------------------------------------------


def run(ws: WindowSettings, ctx: Context, out: str, parts=PARTS) -> dict:
    """Every part of ``parts``; writes the plots into ``out``. Returns what ``markdown``/``tables`` take."""
    res = {"settings": ws, "parts": tuple(parts)}
    if "accuracy" in parts:
        ctx.use_threads("window", ws.device)
        bar = Bar(accuracy_rows_total(ws), "window accuracy")
        res["accuracy"] = run_accuracy(ws, ctx, bar.update)
        bar.close()
        res["accuracy_plots"] = plot_accuracy(res["accuracy"], ws, out, ctx)
    if "mqar" in parts:
        bar = Bar(len(mqar_attentions(ws)) * ws.mqar_seeds * ws.mqar_steps, "window mqar")
        res["mqar"] = run_mqar(ws, ctx, out, bar)
        bar.close()
        torch.set_num_threads(ctx.default_threads)
    if "speed" in parts:
        ctx.use_threads("window", ws.device)
        bar = Bar(len(ws.speed_T) * 2 * len(speed_impls(ws)), "window speed")
        res["speed"] = run_speed(ws, ctx, bar.update)
        bar.close()
        res["speed_plots"] = plot_speed(res["speed"], ws, out, ctx)
    return res


def markdown(res: dict, ctx: Context, cmd: str = "python -m bench.report --section window") -> list[str]:
    ws = res["settings"]
    L = [
        "",
        "## 9. Hybrid attention: exact inside a window, random features beyond",
        "",
        f"`bench/report/window.py` inside this run (`{cmd}`): the window of DESIGN.md section 6 against random features "
        "only, sliding-window softmax and exact attention; raw numbers in `window_*.csv`. "
        + (
            "This checkout's `rf_attention` takes `window=`."
            if window_supported()
            else "**This checkout's `rf_attention` has no `window=` yet: the hybrid rows are n/a.**"
        ),
        "",
    ]
    if "accuracy" in res:
        L += accuracy_markdown(res["accuracy"], ws, ctx, res["accuracy_plots"])
    if "mqar" in res:
        L += mqar_markdown(res["mqar"], ws)
    if "speed" in res:
        L += speed_markdown(res["speed"], ws, ctx, res["speed_plots"])
    return L


def tables(res: dict) -> list[tuple]:
    """[(CSV file stem, rows)] of the parts that ran."""
    out = []
    if "accuracy" in res:
        out.append(("window_accuracy", res["accuracy"]))
    if "mqar" in res:
        out.append(("window_mqar", res["mqar"]["summaries"]))
    if "speed" in res:
        out.append(("window_speed", res["speed"]))
    return out


def raw(res: dict) -> dict:
    """What report.json keeps of the section."""
    ws = res["settings"]
    out = {
        "settings": {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v) for k, v in ws.__dict__.items()},
        "window_supported": window_supported(),
    }
    out.update({stem: rows for stem, rows in tables(res)})
    if "mqar" in res:
        m = res["mqar"]
        out["window_mqar_runs"], out["window_mqar_skipped"] = m["runs"], m["skipped"]
        out["window_mqar_gaps"] = {k: v for k, v in m["gaps"].items() if k != "gaps"}
    return out


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="more seeds, pairs and lengths (intended for a GPU)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<date>-window)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; valid parts are {', '.join(PARTS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ws = window_settings(args.full, device)
    ctx = Context(
        common.device_name(device),
        datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        common.versions(),
        "full" if args.full else "quick",
    )
    ctx.default_threads = torch.get_num_threads()
    out = args.out or common.default_out_dir(device) + "-window"
    os.makedirs(out, exist_ok=True)
    res = run(ws, ctx, out, parts)
    cmd = (
        "python -m bench.report.window"
        + (" --full" if args.full else "")
        + (f" --parts {args.parts}" if args.parts != ",".join(PARTS) else "")
    )
    with open(os.path.join(out, "window.md"), "w") as f:
        f.write("\n".join(markdown(res, ctx, cmd)))
    for stem, rows in tables(res):
        common.write_csv(os.path.join(out, f"{stem}.csv"), rows)
    with open(os.path.join(out, "window.json"), "w") as f:
        json.dump(raw(res), f, indent=1, default=str)
    print(os.path.join(out, "window.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
