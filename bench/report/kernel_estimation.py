"""Section 2 of the report: which weight matrix lowers the variance of the kernel estimate, with statistics.

For every component x weight pair and several fixed query/key sets, ``draws`` independent W are drawn at
once (one feature map with ``num_heads = draws``: every sampler draws its heads independently) and each
draw r gives

- the kernel-estimate error ``e_r = mean_ij (K^_r(q_i, k_j) - K(q_i, k_j))^2 / mean_ij K(q_i, k_j)^2``
  (``RandomFeatureMap.kernel_estimate`` against ``exact_kernel``, all T x T pairs), and
- the attention-output error ``||o_r - o||^2 / ||v||^2`` (``rf_attention``, reference backend, non-causal,
  against ``exact_attention``).

The mean of e_r over the draws is the (relative) mean squared error, i.e. the estimator's variance for
the unbiased weights plus the squared bias for the others. It is heavy-tailed (PosRF's estimate is
log-normal-like), so the median of e_r is reported beside it. 95% confidence intervals are bootstrap
percentile intervals over the draws. Within one q, k set every pair uses the same seed, so draw r of
every pair is built from the same random numbers (``simplex`` and ``orf`` even share their rotations and
lengths): the ratio to ORF is bootstrapped by resampling the same draw indices for both (a paired
bootstrap), and a pair counts as lower-variance than ORF only where the whole interval is below 1.

Sets (head dim D, T queries and T keys): ``iso-s``, q, k ~ N(0, s^2 I); ``subspace`` and ``trained``, the
structured sets of ``bench/report/fitting.py`` (a 6-dimensional subspace plus noise; q, k of the last layer of
a small causal softmax transformer trained here on a copy task, the queries of the copy half against the
keys of the source half). The logits are q.k / sqrt(D), as everywhere in the report.

A second run sweeps m (16 ... 512) for PosRF and a few weights and fits the slope of log MSE against log m
(-1 for i.i.d. rows), with a bootstrap interval for the slope.

Runs alone: ``python -m bench.report --section kernel`` (quick, a few minutes on 2 cores) or ``--full``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

import spectraformer_fused as sf

from ..common import Bar, Context, fmt, get_plt, md_table

METRICS = ("k", "o")  # kernel estimate, attention output
METRIC_NAMES = {"k": "kernel-estimate MSE", "o": "attention-output MSE"}


@dataclass
class KestSettings:
    D: int
    m: int
    T: int
    draws: int
    boot: int
    scales: tuple
    kernels: tuple
    train_steps: int
    sweep_ms: tuple
    sweep_scales: tuple
    sweep_weights: tuple
    sweep_component: str = "posrf"
    reference: str = "orf"
    seed: int = 2000


def make_settings(full: bool) -> KestSettings:
    """Quick mode fits in a few minutes on 2 CPU cores; ``--full`` draws 4x more W and a larger sweep."""
    return KestSettings(
        D=16,
        m=16,
        T=48 if full else 32,
        draws=2000 if full else 500,
        boot=2000 if full else 1000,
        scales=(0.3, 0.5, 1.0, 1.5),
        kernels=("softmax", "gaussian"),
        train_steps=500 if full else 250,
        sweep_ms=(16, 32, 64, 128, 256, 512),
        sweep_scales=(0.3, 0.5, 1.0) if full else (0.5, 1.0),
        sweep_weights=("gaussian", "orf", "simplex", "sorf", "qmc", "mm", "fastfood"),
    )


# ----------------------------------------------------------------------------------------------------
# Query/key sets
# ----------------------------------------------------------------------------------------------------


def qk_sets(ks: KestSettings) -> list[dict]:
    """[{name, s, q, k, v, note}] with q, k, v [1, T, 1, D] float64."""
    from . import fitting

    T, D = ks.T, ks.D
    out = []
    for s in ks.scales:
        q, k, v = fitting.isotropic((1, T, 1, D), s, 77)
        out.append({"name": f"iso-{s}", "s": s, "q": q, "k": k, "v": v, "note": f"q, k ~ N(0, {s}^2 I)"})
    q, k, v = fitting.subspace((1, T, 1, D), 1.0, 77, rank=min(6, D))
    out.append({"name": "subspace", "s": 1.0, "q": q, "k": k, "v": v, "note": "fitting.subspace, s = 1"})
    Tm = 2 * T
    qt, kt, log = fitting.trained_qk((1, Tm, 2, D), ks.train_steps)
    v = torch.randn(1, T, 1, D, generator=torch.Generator().manual_seed(77))
    out.append(
        {
            "name": "trained",
            "s": None,
            "q": qt[:1, T:, :1].contiguous(),
            "k": kt[:1, :T, :1].contiguous(),
            "v": v,
            "note": f"fitting.trained_qk: 2 heads of {D}, T = {Tm}, {log['train_steps']} steps, copy accuracy "
            f"{log['copy_accuracy']:.2f}; head 0, queries {T}..{Tm - 1} against keys 0..{T - 1}",
        }
    )
    for d in out:
        for key in ("q", "k", "v"):
            d[key] = d[key].double()
    return out


# ----------------------------------------------------------------------------------------------------
# Per-draw errors and their statistics
# ----------------------------------------------------------------------------------------------------


def draw_errors(qs: dict, comp: str, wname: str, kernel: str, m: int, draws: int, seed: int, outputs=True):
    """(kernel-estimate errors [draws], attention-output errors [draws] or None), float64."""
    q, k, v = qs["q"], qs["k"], qs["v"]
    _, T, _, D = q.shape
    fm = sf.RandomFeatureMap(
        D, m, component=comp, weights=wname, kernel=kernel, num_heads=draws, seed=seed, dtype=torch.float64
    ).eval()
    qe, ke, ve = (t.expand(1, T, draws, D) for t in (q, k, v))
    with torch.no_grad():
        exact = sf.exact_kernel(q, k, kernel=kernel)[0, 0]  # [T, T]
        est = fm.kernel_estimate(qe, ke)[0]  # [draws, T, T]
        ek = (est - exact).square().mean((-1, -2)) / exact.square().mean()
        if not outputs:
            return ek, None
        o_exact = sf.exact_attention(q, k, v, kernel=kernel)  # [1, T, 1, D]
        o = sf.rf_attention(qe, ke, ve, fm, backend="reference")  # [1, T, draws, D]
        eo = (o - o_exact).square().sum((0, 1, 3)) / v.square().sum()
    return ek, eo


def boot_indices(draws: int, boot: int, seed: int) -> torch.Tensor:
    return torch.randint(0, draws, (boot, draws), generator=torch.Generator().manual_seed(seed))


def _ci(samples: torch.Tensor) -> tuple[float, float]:
    lo, hi = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=samples.dtype)).tolist()
    return lo, hi


def stats(e: torch.Tensor, idx: torch.Tensor) -> dict:
    """Mean and median of the per-draw errors with bootstrap 95% intervals."""
    res = e[idx]
    mean_lo, mean_hi = _ci(res.mean(-1))
    med_lo, med_hi = _ci(res.median(-1).values)
    return {
        "mse": float(e.mean()),
        "mse_lo": mean_lo,
        "mse_hi": mean_hi,
        "med": float(e.median()),
        "med_lo": med_lo,
        "med_hi": med_hi,
    }


def ratio_stats(e: torch.Tensor, e0: torch.Tensor, idx: torch.Tensor) -> dict:
    """mean(e) / mean(e0) and median(e) / median(e0) with paired-bootstrap 95% intervals (the same draw
    indices for both, since draw r of both pairs comes from the same random numbers)."""
    a, b = e[idx], e0[idx]
    r_lo, r_hi = _ci(a.mean(-1) / b.mean(-1))
    m_lo, m_hi = _ci(a.median(-1).values / b.median(-1).values)
    return {
        "ratio": float(e.mean() / e0.mean()),
        "ratio_lo": r_lo,
        "ratio_hi": r_hi,
        "med_ratio": float(e.median() / e0.median()),
        "med_ratio_lo": m_lo,
        "med_ratio_hi": m_hi,
    }


def verdict(lo: float | None, hi: float | None) -> str:
    """'lower' where the whole interval is below 1, 'higher' where it is above 1, else 'n.d.'."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return "lower" if hi < 1 else ("higher" if lo > 1 else "n.d.")


def _finite(e) -> bool:
    return e is not None and bool(torch.isfinite(e).all())


def _prefixed(prefix: str, d: dict) -> dict:
    return {f"{prefix}_{key}": value for key, value in d.items()}


# ----------------------------------------------------------------------------------------------------
# The two runs
# ----------------------------------------------------------------------------------------------------


def run(st, ctx: Context, ks: KestSettings | None = None):
    """(rows: one per set x kernel x component x weights, sweep rows: one per set x weights x m, meta);
    ``ks`` defaults to ``make_settings(st.full)``."""
    ks = ks or make_settings(st.full)
    sets = qk_sets(ks)
    rows, errors = [], {}
    fields = ctx.fields("float64")
    bar = Bar(
        len(sets) * len(ks.kernels) * len(sf.COMPONENTS) + len(ks.sweep_scales) * len(ks.sweep_ms), "2 kernel estimates"
    )
    for si, qs in enumerate(sets):
        idx = boot_indices(ks.draws, ks.boot, 10 + si)
        for kernel in ks.kernels:
            for comp in sf.COMPONENTS:
                errs = {}
                for wname in sf.WEIGHTS:
                    row = {
                        "section": "kernel",
                        "set": qs["name"],
                        "s": qs["s"],
                        "kernel": kernel,
                        "component": comp,
                        "weights": wname,
                        "D": ks.D,
                        "m": ks.m,
                        "T": ks.T,
                        "draws": ks.draws,
                        "boot": ks.boot,
                    }
                    try:
                        ek, eo = draw_errors(qs, comp, wname, kernel, ks.m, ks.draws, ks.seed + si)
                    except Exception as exc:  # a pair that cannot run here is a row that says why
                        rows.append(row | {"status": f"n/a ({type(exc).__name__}: {exc})"} | fields)
                        continue
                    bad = [n for n, e in (("kernel", ek), ("output", eo)) if not _finite(e)]
                    row["status"] = "ok" if not bad else f"non-finite {' and '.join(bad)} error in some draws"
                    for p, e in (("k", ek), ("o", eo)):
                        if _finite(e):
                            row |= _prefixed(p, stats(e, idx))
                            errs[(wname, p)] = e
                    rows.append(row | fields)
                ref = ks.reference
                for row in rows[-len(sf.WEIGHTS) :]:
                    for p in METRICS:
                        e, e0 = errs.get((row["weights"], p)), errs.get((ref, p))
                        if e is None or e0 is None or row["weights"] == ref:
                            continue
                        rs = ratio_stats(e, e0, idx)
                        row |= _prefixed(p, rs)
                        row[f"{p}_vs_{ref}"] = verdict(rs["ratio_lo"], rs["ratio_hi"])
                        row[f"{p}_med_vs_{ref}"] = verdict(rs["med_ratio_lo"], rs["med_ratio_hi"])
                for (wname, p), e in errs.items():
                    errors[(qs["name"], kernel, comp, wname, p)] = e
                bar.update()
    meta = {"settings": dict(ks.__dict__), "sets": [{"name": s["name"], "note": s["note"]} for s in sets]}
    meta["recommend"] = recommend(errors, sets, ks)
    sweep, meta["slopes"] = run_sweep(ks, bar, fields)
    bar.close()
    return rows, sweep, meta


def recommend(errors: dict, sets, ks: KestSettings) -> list[dict]:
    """Per kernel, set and metric: the pair with the lowest mean error and its paired-bootstrap ratio to the
    runner-up (the interval says whether the two are distinguishable)."""
    out = []
    for si, qs in enumerate(sets):
        idx = boot_indices(ks.draws, ks.boot, 10 + si)
        for kernel in ks.kernels:
            for p in METRICS:
                cand = {
                    (c, w): e
                    for (name, kn, c, w, pp), e in errors.items()
                    if name == qs["name"] and kn == kernel and pp == p
                }
                if len(cand) < 2:
                    continue
                order = sorted(cand, key=lambda key: float(cand[key].mean()))
                best, second = order[0], order[1]
                # learnable and fastfood_learnable start as orf and fastfood: the runner-up is another matrix
                second = next((key for key in order[1:] if not torch.equal(cand[key], cand[best])), second)
                rs = ratio_stats(cand[best], cand[second], idx)
                out.append(
                    {
                        "set": qs["name"],
                        "kernel": kernel,
                        "metric": p,
                        "component": best[0],
                        "weights": best[1],
                        "mse": float(cand[best].mean()),
                        "runner_up": f"{second[0]} x {second[1]}",
                        "runner_up_mse": float(cand[second].mean()),
                        "ratio": rs["ratio"],
                        "ratio_lo": rs["ratio_lo"],
                        "ratio_hi": rs["ratio_hi"],
                        "distinct": rs["ratio_hi"] < 1,
                    }
                )
    return out


def run_sweep(ks: KestSettings, bar, fields: dict) -> tuple[list, list]:
    """Kernel-estimate MSE against m for ``sweep_component`` x ``sweep_weights`` (softmax kernel) and the
    fitted log-log slopes with bootstrap intervals."""
    from . import fitting

    rows, slopes = [], []
    logm = torch.log(torch.tensor(ks.sweep_ms, dtype=torch.float64))
    xc = logm - logm.mean()
    for j, s in enumerate(ks.sweep_scales):
        q, k, v = fitting.isotropic((1, ks.T, 1, ks.D), s, 77)
        qs = {"q": q.double(), "k": k.double(), "v": v.double()}
        boot_means = {w: [] for w in ks.sweep_weights}
        point = {w: [] for w in ks.sweep_weights}
        med = {w: [] for w in ks.sweep_weights}
        for i, m in enumerate(ks.sweep_ms):
            idx = boot_indices(ks.draws, ks.boot, 100 + 10 * j + i)
            errs = {}
            for w in ks.sweep_weights:
                ek, _ = draw_errors(qs, ks.sweep_component, w, "softmax", m, ks.draws, ks.seed + 50 + i, outputs=False)
                errs[w] = ek
                row = {
                    "section": "kernel_vs_m",
                    "set": f"iso-{s}",
                    "s": s,
                    "component": ks.sweep_component,
                    "kernel": "softmax",
                    "weights": w,
                    "D": ks.D,
                    "m": m,
                    "T": ks.T,
                    "draws": ks.draws,
                } | _prefixed("k", stats(ek, idx))
                rows.append(row | fields)
                boot_means[w].append(ek[idx].mean(-1))
                point[w].append(float(ek.mean()))
                med[w].append(float(ek.median()))
            for row in rows[-len(ks.sweep_weights) :]:
                if row["weights"] != ks.reference:
                    row |= _prefixed("k", ratio_stats(errs[row["weights"]], errs[ks.reference], idx))
            bar.update()
        for w in ks.sweep_weights:
            y = torch.log(torch.tensor(point[w], dtype=torch.float64))
            yb = torch.log(torch.stack(boot_means[w], dim=-1))  # [boot, n_m]
            slope = float((xc * (y - y.mean())).sum() / xc.square().sum())
            sb = ((yb - yb.mean(-1, keepdim=True)) * xc).sum(-1) / xc.square().sum()
            lo, hi = _ci(sb)
            ym = torch.log(torch.tensor(med[w], dtype=torch.float64))
            slopes.append(
                {
                    "set": f"iso-{s}",
                    "weights": w,
                    "slope": slope,
                    "slope_lo": lo,
                    "slope_hi": hi,
                    "median_slope": float((xc * (ym - ym.mean())).sum() / xc.square().sum()),
                }
            )
    return rows, slopes


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def _cell(r: dict, key: str) -> str:
    if r.get(key) is None:
        return "n/a"
    text = f"{fmt(r[key])} [{fmt(r[key + '_lo'])}, {fmt(r[key + '_hi'])}]"
    v = verdict(r[key + "_lo"], r[key + "_hi"])
    return f"**{text}**" if v == "lower" else (f"_{text}_" if v == "higher" else text)


def settings_of(kest) -> KestSettings:
    return KestSettings(**kest[2]["settings"])


def plot(kest, st, out: str, ctx: Context) -> list[str]:
    rows, sweep, meta = kest
    plt = get_plt()
    if plt is None:
        return []
    ks = settings_of(kest)
    names = []
    scales = list(dict.fromkeys(r["s"] for r in sweep))
    fig, axes = plt.subplots(1, len(scales), figsize=(6 * len(scales), 4.5), squeeze=False)
    for ax, s in zip(axes[0], scales):
        for i, w in enumerate(ks.sweep_weights):
            pts = sorted(
                (r["m"], r["k_mse"], r["k_mse_lo"], r["k_mse_hi"]) for r in sweep if r["s"] == s and r["weights"] == w
            )
            ms, y, lo, hi = zip(*pts)
            sl = next(x for x in meta["slopes"] if x["set"] == f"iso-{s}" and x["weights"] == w)
            ax.errorbar(
                ms,
                y,
                yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                marker="o",
                ms=3,
                capsize=2,
                color=f"C{i}",
                label=f"{w} (slope {sl['slope']:.2f})",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("m")
        ax.set_ylabel("relative kernel-estimate MSE (mean over draws, 95% CI)")
        ax.set_title(f"{ks.sweep_component}, softmax, iso-{s}, D={ks.D}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(ctx.line("float64", "kernel"), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    names.append("kernel_vs_m.png")
    fig.savefig(os.path.join(out, names[-1]), dpi=110, bbox_inches="tight")
    plt.close(fig)

    comps = [c for c in sf.COMPONENTS]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    weights = [w for w in sf.WEIGHTS if w != ks.reference]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8), squeeze=False)
    for ax, comp in zip(axes.flat, comps):
        for i, w in enumerate(weights):
            pts = [
                (j, r["k_ratio"], r["k_ratio_lo"], r["k_ratio_hi"])
                for j, name in enumerate(sets)
                for r in rows
                if r["set"] == name
                and r["kernel"] == "softmax"
                and r["component"] == comp
                and r["weights"] == w
                and r.get("k_ratio") is not None
            ]
            if pts:
                x, y, lo, hi = zip(*pts)
                x = [a + (i - len(weights) / 2) * 0.06 for a in x]
                ax.errorbar(
                    x,
                    y,
                    yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                    fmt="o",
                    ms=3,
                    capsize=2,
                    color=f"C{i}",
                    label=w,
                )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sets)), sets, fontsize=7)
        ax.set_title(f"{comp}, softmax: kernel-estimate MSE / {ks.reference}'s (95% CI)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.suptitle(ctx.line("float64", "kernel"), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    names.append("kernel_ratio_to_orf.png")
    fig.savefig(os.path.join(out, names[-1]), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return names


def _ci_text(r: dict, key: str) -> str:
    return f"{r[key]:.3g} [{r[key + '_lo']:.3g}, {r[key + '_hi']:.3g}]"


def _same_draws(rows: list, w: str) -> str | None:
    """The weight matrix whose every measured error equals ``w``'s (a learnable kind at its initialisation)."""
    mine = {(r["set"], r["kernel"], r["component"]): r.get("k_mse") for r in rows if r["weights"] == w}
    for other in sf.WEIGHTS:
        if other != w:
            theirs = {(r["set"], r["kernel"], r["component"]): r.get("k_mse") for r in rows if r["weights"] == other}
            if theirs == mine and any(v is not None for v in mine.values()):
                return other
    return None


def _cells_text(cells: list, key: str, max_listed: int = 6) -> str:
    """'softmax posrf: iso-0.3 0.27 [0.21, 0.34], iso-0.5 ...; gaussian ...', at most ``max_listed`` cells."""
    groups = {}
    for r in cells[:max_listed]:
        groups.setdefault(f"{r['kernel']} {r['component']}", []).append(f"{r['set']} {_ci_text(r, key)}")
    more = f"; and {len(cells) - max_listed} more" if len(cells) > max_listed else ""
    return "; ".join(f"{g}: {', '.join(v)}" for g, v in groups.items()) + more


def kernel_lines(kest, ks) -> list[str]:
    """Section 2's conclusions: one sentence per weight matrix (where its MSE is below or above the
    reference's with the whole 95% interval on one side of 1, by how much), where simplex's PosRF advantage
    ends, and the pair recommended per setting. Computed from ``run``'s results."""
    rows, _, meta = kest
    ref = ks.reference
    out = [
        f"**Weight matrices against {ref}** (ratio of the relative MSE to {ref}'s for the same component, kernel "
        "and q, k set; lower/higher only where the whole 95% interval is below/above 1):",
        "",
    ]
    for w in sf.WEIGHTS:
        if w == ref:
            continue
        sel = [r for r in rows if r["weights"] == w and r.get("k_ratio") is not None]
        if not sel:
            out.append(f"- **{w}**: no measurement ran (see the table's n/a cells).")
            continue
        lower = sorted((r for r in sel if r["k_vs_" + ref] == "lower"), key=lambda r: r["k_ratio"])
        higher = sorted((r for r in sel if r["k_vs_" + ref] == "higher"), key=lambda r: -r["k_ratio"])
        nd = len(sel) - len(lower) - len(higher)
        if not lower and not higher:
            text = f"not distinguishable from {ref} in any of the {len(sel)} cells"
        else:
            parts = []
            if lower:
                parts.append(f"lower than {ref} in {len(lower)} of {len(sel)} cells ({_cells_text(lower, 'k_ratio')})")
            if higher:
                parts.append(f"higher in {len(higher)} ({_cells_text(higher, 'k_ratio', 3)})")
            text = "; ".join(parts) + f"; not distinguishable in {nd}"
        same = _same_draws(rows, w) if w in sf.LEARNABLE_WEIGHTS else None
        if same is not None:
            text += f" (measured at initialisation, where its W is {same}'s: the same draws)"
        med = {v: sum(r["k_med_vs_" + ref] == v for r in sel) for v in ("lower", "higher")}
        osel = [r for r in sel if r.get("o_ratio") is not None]
        ov = {v: sum(r["o_vs_" + ref] == v for r in osel) for v in ("lower", "higher")}
        out.append(
            f"- **{w}**: kernel-estimate MSE {text}. Median error: lower in {med['lower']}, higher in "
            f"{med['higher']}. Attention-output MSE: lower in {ov['lower']}, higher in {ov['higher']} of "
            f"{len(osel)}."
        )
    out.append("")
    simplex = [r for r in rows if r["weights"] == "simplex" and r["component"] == "posrf" and r.get("k_ratio")]
    for kernel in ks.kernels:
        sel = [r for r in simplex if r["kernel"] == kernel]
        if sel:
            out.append(
                f"**posrf x simplex against posrf x {ref}, {kernel} kernel, by set** (MSE ratio; median ratio): "
                + "; ".join(
                    f"{r['set']} {_ci_text(r, 'k_ratio')} ({r['k_vs_' + ref]}; median {_ci_text(r, 'k_med_ratio')}, "
                    f"{r['k_med_vs_' + ref]})"
                    for r in sel
                )
                + "."
            )
            out.append("")
    rec = meta["recommend"]
    if rec:
        out.append(
            "**Recommended pair per setting** (lowest mean error over the draws; the ratio to the runner-up "
            "with its paired 95% interval says whether the choice is clear; for the approximately unbiased "
            "weights, sorf's fixed row lengths included, the MSE counts the squared bias):"
        )
        out.append("")
        table = [
            (
                r["kernel"],
                r["set"],
                METRIC_NAMES[r["metric"]],
                f"{r['component']} x {r['weights']}",
                fmt(r["mse"]),
                r["runner_up"],
                _ci_text(r, "ratio"),
                "yes" if r["distinct"] else "no",
            )
            for r in rec
        ]
        out += md_table(("kernel", "set", "metric", "pair", "MSE", "runner-up", "ratio", "clear"), table)
        out.append("")
    return out


def markdown(kest, st, ctx: Context, plots=()) -> list[str]:
    rows, sweep, meta = kest
    ks = settings_of(kest)
    ref = ks.reference
    sets = list(dict.fromkeys(r["set"] for r in rows))
    L = [
        "## 2. Kernel estimation: which weight matrix lowers the variance",
        "",
        f"_{ctx.line('float64', 'kernel')}_",
        "",
        f"D = {ks.D}, m = {ks.m} (one block of d rows for the block-structured weights), T = {ks.T} queries "
        f"and {ks.T} keys per set, {ks.draws} independent draws of W per pair at fixed q, k (one feature map "
        f"with {ks.draws} heads), {ks.boot} bootstrap resamples. Per draw: the kernel-estimate error "
        "mean_ij (K^ - K)^2 / mean_ij K^2 and the attention-output error ||o - o_exact||^2 / ||v||^2 "
        "(reference backend, non-causal). MSE = the mean over the draws (the variance for unbiased "
        "weights, plus the squared bias for sorf, qmc, mm, sgq and fastfood); the median beside it because "
        "the error is heavy-tailed (at larger s the mean is set by a few draws, and a bootstrap interval of "
        f"such a mean is itself unreliable). Ratios to {ref} are paired by q, k set (the same seed, and "
        "the same bootstrap draw indices, for every pair); **bold**: the whole 95% interval below 1 "
        f"(lower than {ref}), _italic_: above 1, plain: not distinguishable. `learnable` and "
        "`fastfood_learnable` are measured at their initialisation (equal to `orf` and `fastfood`).",
        "",
        "Sets: " + "; ".join(f"`{s['name']}`: {s['note']}" for s in meta["sets"]) + ".",
        "",
    ]
    L += ["### Findings (computed from the tables below)", ""] + kernel_lines(kest, ks) + [""]
    for kernel in ks.kernels:
        sel = [r for r in rows if r["kernel"] == kernel]
        L += [f"### {kernel} kernel: {ref}'s MSE (mean [95% CI] and median of the per-draw error)", ""]
        table = []
        for comp in sf.COMPONENTS:
            cells = []
            for name in sets:
                r = next(x for x in sel if x["set"] == name and x["component"] == comp and x["weights"] == ref)
                cells.append(
                    "n/a"
                    if r.get("k_mse") is None
                    else f"{fmt(r['k_mse'])} [{fmt(r['k_mse_lo'])}, {fmt(r['k_mse_hi'])}], med {fmt(r['k_med'])}"
                )
            table.append((comp, *cells))
        L += md_table(("component", *sets), table) + [""]
        for key, what in (
            ("k_ratio", "kernel-estimate MSE"),
            ("k_med_ratio", "median kernel-estimate error"),
            ("o_ratio", "attention-output MSE"),
        ):
            L += [f"### {kernel} kernel: {what} / {ref}'s, [95% CI]", ""]
            table = []
            for comp in sf.COMPONENTS:
                for w in sf.WEIGHTS:
                    if w == ref:
                        continue
                    cells = []
                    for name in sets:
                        r = next(x for x in sel if x["set"] == name and x["component"] == comp and x["weights"] == w)
                        cells.append(_cell(r, key) if r["status"] == "ok" or r.get(key) is not None else "n/a")
                    table.append((comp, w, *cells))
            L += md_table(("component", "weights", *sets), table) + [""]
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        L.append(f"- {r['component']} x {r['weights']} ({r['kernel']}, {r['set']}): {r['status']}")
    if bad:
        L.append("")
    L += [
        f"### Variance against m ({ks.sweep_component}, softmax kernel, D = {ks.D})",
        "",
        "Slope of log MSE against log m (least squares over m = "
        + ", ".join(str(m) for m in ks.sweep_ms)
        + "; i.i.d. rows give -1), with a bootstrap 95% interval, and the slope of the median:",
        "",
    ]
    table = [
        (
            s["set"],
            s["weights"],
            f"{s['slope']:.2f} [{s['slope_lo']:.2f}, {s['slope_hi']:.2f}]",
            f"{s['median_slope']:.2f}",
        )
        for s in meta["slopes"]
    ]
    L += md_table(("set", "weights", "slope of the MSE", "slope of the median"), table) + [""]
    table = []
    for r in sweep:
        table.append(
            (
                r["set"],
                r["weights"],
                r["m"],
                f"{fmt(r['k_mse'])} [{fmt(r['k_mse_lo'])}, {fmt(r['k_mse_hi'])}]",
                fmt(r["k_med"]),
                _cell(r, "k_ratio") if r["weights"] != ref else "1",
            )
        )
    L += md_table(("set", "weights", "m", "MSE [95% CI]", "median", f"MSE / {ref}'s"), table) + [""]
    for p in plots:
        if p.startswith("kernel_"):
            L += [f"![{p}]({p})", ""]
    L += ["Raw numbers: `kernel.csv` (every pair), `kernel_vs_m.csv` (the m sweep), `report.json`.", ""]
    return L
