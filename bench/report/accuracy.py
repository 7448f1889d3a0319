"""Section 1 of the report: approximation quality of every component x weight pair against exact
attention (reference backend), with its heatmaps and its markdown."""

from __future__ import annotations

import math
import os
import statistics

import torch

import spectraformer_fused as sf

from ..common import Bar, Context, fmt, gaussian_qkv, get_plt, md_table, pick_threads
from .settings import Settings


def attention_entropy(q, k, kernel: str) -> float:
    """Mean row entropy (nats) of the exact attention weights."""
    logits = sf.reference.exact_logits(q, k, kernel=kernel)
    logp = torch.log_softmax(logits, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def _err(o, ref, v) -> float:
    return float((o.double() - ref.double()).norm() / v.double().norm())


def run(st: Settings, ctx: Context):
    pairs = [(c, w) for c in sf.COMPONENTS for w in sf.WEIGHTS]
    B, T, H, D = st.acc_shape
    dev = st.device
    rows, settings_info = [], []
    total = len(pairs) * len(st.ms) * st.seeds * len(st.kernels)
    bar = Bar(total, "1/4 accuracy")
    data = {}  # (kernel, s, seed) -> q, k, v, exact
    for kernel in st.kernels:
        for s in st.scales:
            ent, base = [], []
            for seed in range(st.seeds):
                q, k, v = gaussian_qkv(st.acc_shape, s, seed, dev)
                ref = sf.exact_attention(q, k, v, kernel=kernel)
                uniform = v.mean(1, keepdim=True).expand_as(v)
                data[kernel, s, seed] = (q, k, v, ref)
                ent.append(attention_entropy(q, k, kernel))
                base.append(_err(uniform, ref, v))
            settings_info.append(
                {
                    "kernel": kernel,
                    "s": s,
                    "entropy": statistics.fmean(ent),
                    "max_entropy": math.log(T),
                    "uniform_mean": statistics.fmean(base),
                    "uniform_std": statistics.pstdev(base),
                }
            )
    for kernel in st.kernels:
        for i, (comp, wname) in enumerate(pairs):
            if dev.type == "cpu" and i % 9 == 8:  # load changes: re-pick the thread count (speed only)
                pick_threads(ctx.default_threads)
            for m in st.ms:
                errs = {s: [] for s in st.scales}
                reason = None
                for seed in range(st.seeds):
                    if reason is None:
                        try:
                            fm = sf.RandomFeatureMap(
                                D,
                                m,
                                component=comp,
                                weights=wname,
                                kernel=kernel,
                                num_heads=H,
                                seed=1000 + seed,
                                device=dev,
                            ).eval()
                            with torch.no_grad():  # every scale in one call, stacked on B
                                q, k, v = (torch.cat([data[kernel, s, seed][i] for s in st.scales]) for i in range(3))
                                o = sf.rf_attention(q, k, v, fm, backend="reference").split(B)
                                for s, o_s in zip(st.scales, o):
                                    _, _, v_s, ref = data[kernel, s, seed]
                                    errs[s].append(_err(o_s, ref, v_s))
                        except Exception as exc:  # an unsupported pair/size is recorded, not fatal
                            reason = f"{type(exc).__name__}: {exc}"
                    bar.update()
                for s in st.scales:
                    vals = errs[s]
                    finite = [e for e in vals if math.isfinite(e)]
                    row = {
                        "section": "accuracy",
                        "kernel": kernel,
                        "s": s,
                        "component": comp,
                        "weights": wname,
                        "m": m,
                        "seeds": st.seeds,
                        "B": B,
                        "T": T,
                        "H": H,
                        "D": D,
                        **ctx.fields("float32"),
                    }
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
        r["worse_than_uniform"] = r["mean"] is not None and not (r["mean"] < u)
    return rows, settings_info


def plot(rows, info, st: Settings, out: str, ctx: Context) -> list[str]:
    plt = get_plt()
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
        vmax = max(min(max(finite + [vmin * 2]), 4 * setting["uniform_mean"]), vmin * 2)  # saturate outliers
        for ax, m in zip(axes[0], st.ms):
            grid = np.full((len(comps), len(weights)), np.nan)
            for r in sel:
                if r["m"] == m and r["mean"] is not None:
                    grid[comps.index(r["component"]), weights.index(r["weights"])] = r["mean"]
            from matplotlib.colors import LogNorm

            im = ax.imshow(np.clip(grid, vmin, vmax), cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax), aspect="auto")
            for i in range(len(comps)):
                for j in range(len(weights)):
                    val = grid[i, j]
                    txt = "n/a" if np.isnan(val) else (f"{val:.2g}" if val < 10 else f"{val:.0f}")
                    bad = not np.isnan(val) and val >= setting["uniform_mean"]
                    ax.text(
                        j,
                        i,
                        txt,
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="red" if bad else "white",
                        fontweight="bold" if bad else "normal",
                    )
            ax.set_xticks(range(len(weights)), weights, rotation=70, fontsize=7)
            ax.set_yticks(range(len(comps)), comps if m == st.ms[0] else [""] * len(comps), fontsize=8)
            ax.set_title(f"m = {m}", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="||o - o_exact|| / ||v|| (saturated at 4x uniform)")
        fig.suptitle(
            f"{kernel} kernel, q,k ~ N(0, {s}^2), entropy {setting['entropy']:.2f} of "
            f"{setting['max_entropy']:.2f} nats; uniform baseline {setting['uniform_mean']:.3f} "
            f"(red = not better than uniform)\n{ctx.line('float32', 'accuracy')}",
            fontsize=8,
        )
        name = f"accuracy_heatmap_{kernel}_s{s}.png"
        fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)

        fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True, squeeze=False)
        for ax, comp in zip(axes.flat, comps):
            for wname in weights:
                pts = sorted(
                    (r["m"], r["mean"], r["std"])
                    for r in sel
                    if r["component"] == comp
                    and r["weights"] == wname
                    and r["mean"] is not None
                    and math.isfinite(r["mean"])
                )
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


def markdown(acc, info, st: Settings, ctx: Context, plots) -> list[str]:
    f32 = ctx.line("float32", "accuracy")
    L = []
    B, T, H, D = st.acc_shape
    L += [
        "## 1. Approximation quality",
        "",
        f"_{f32}_",
        "",
        f'Relative error ||o - o_exact|| / ||v|| of `rf_attention(..., backend="reference")` (non-causal, '
        f"default scale D^-1/2) against `exact_attention` with the same kernel; B={B} T={T} H={H} D={D}; "
        f"q, k ~ N(0, s^2), v ~ N(0, 1); mean +- std over {st.seeds} seeds (inputs and W both redrawn). "
        "Baseline: uniform attention (every output is the mean of v). "
        "**!** marks a pair whose error is not below the baseline.",
        "",
    ]
    L += md_table(
        ("target", "s", "mean attention entropy (nats)", "max = ln T", "uniform baseline error"),
        [
            (
                i["kernel"],
                i["s"],
                f"{i['entropy']:.3f}",
                f"{i['max_entropy']:.3f}",
                f"{i['uniform_mean']:.4f} +- {i['uniform_std']:.4f}",
            )
            for i in info
        ],
    )
    L.append("")
    for setting in info:
        kernel, s = setting["kernel"], setting["s"]
        L += [
            f"### {kernel} kernel, s = {s} (entropy {setting['entropy']:.2f} nats; uniform "
            f"{setting['uniform_mean']:.4f})",
            "",
            f"_{f32}_",
            "",
        ]
        table, reasons = [], {}
        for comp in sf.COMPONENTS:
            for w in sf.WEIGHTS:
                cells = []
                for m in st.ms:
                    r = next(
                        r
                        for r in acc
                        if r["kernel"] == kernel
                        and r["s"] == s
                        and r["component"] == comp
                        and r["weights"] == w
                        and r["m"] == m
                    )
                    if r["mean"] is None:
                        cells.append("n/a")
                        reasons.setdefault(r["status"], []).append(f"{comp} x {w} m={m}")
                    else:
                        cells.append(
                            f"{fmt(r['mean'])} +- {fmt(r['std'], '.2g')}"
                            + (" **!**" if r["worse_than_uniform"] else "")
                        )
                table.append((comp, w, *cells))
        L += md_table(("component", "weights", *[f"m={m}" for m in st.ms]), table)
        for why, where in reasons.items():
            L.append(f"\n- {why}: {', '.join(where)}")
        L.append("")
        for p in plots:
            if p.startswith(f"accuracy_heatmap_{kernel}_s{s}") or p.startswith(f"accuracy_vs_m_{kernel}_s{s}"):
                L += [f"![{p}]({p})", ""]
    return L
