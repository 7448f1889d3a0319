"""Section 7 of the report: a practitioner's guide computed from the numbers of sections 1-5."""

from __future__ import annotations

import math
import statistics

import spectraformer_fused as sf

from ..common import dtype_name, fmt, md_table
from . import kernel_estimation
from .settings import Settings


def uniform_summary(acc, info, st: Settings, max_listed: int = 5) -> list[str]:
    """The cells not better than uniform attention, summarised: counts per component and setting, per m,
    and the exceptions to each component's majority (the tables and heatmaps of section 1 show every cell)."""
    bad = [r for r in acc if r["worse_than_uniform"]]
    if not bad:
        return ["**Pairs not better than uniform attention**: none.", ""]
    settings = [(i["kernel"], i["s"]) for i in info]
    out = [
        f"**Pairs not better than uniform attention**: {len(bad)} of {len(acc)} cells (marked **!** in section 1; "
        "the heatmaps show where). Cells per component and setting not better than uniform, out of "
        f"{len(sf.WEIGHTS)} weights x {len(st.ms)} values of m:",
        "",
    ]
    rows = []
    for comp in sf.COMPONENTS:
        cells = []
        for kernel, s in settings:
            sel = [r for r in acc if r["component"] == comp and r["kernel"] == kernel and r["s"] == s]
            cells.append(f"{sum(r['worse_than_uniform'] for r in sel)} / {len(sel)}")
        rows.append((comp, *cells))
    out += md_table(("component", *[f"{k} s={s}" for k, s in settings]), rows)
    out += [
        "",
        "By m (all components, weights and settings): "
        + ", ".join(
            f"m={m}: {sum(r['worse_than_uniform'] for r in acc if r['m'] == m)} / {sum(1 for r in acc if r['m'] == m)}"
            for m in st.ms
        )
        + ".",
        "",
    ]
    exceptions = []
    for kernel, s in settings:
        for comp in sf.COMPONENTS:
            sel = [
                r
                for r in acc
                if r["component"] == comp and r["kernel"] == kernel and r["s"] == s and r["mean"] is not None
            ]
            nbad = sum(r["worse_than_uniform"] for r in sel)
            if not sel or nbad in (0, len(sel)):
                continue
            mostly_bad = 2 * nbad > len(sel)
            odd = [r for r in sel if r["worse_than_uniform"] != mostly_bad]
            by_w = {}
            for r in odd:
                by_w.setdefault(r["weights"], []).append(str(r["m"]))
            names = [f"{w} (m={','.join(ms)})" for w, ms in list(by_w.items())[:max_listed]]
            more = f" and {len(by_w) - max_listed} more weights" if len(by_w) > max_listed else ""
            exceptions.append(
                f"- {kernel} s={s}, {comp}: mostly {'not ' if mostly_bad else ''}better than uniform; "
                f"{'better' if mostly_bad else 'not better'}: {', '.join(names)}{more}"
            )
    if exceptions:
        out += ["Exceptions to each component's majority:", ""] + exceptions + [""]
    return out


def guide(acc, info, kest, speed, speed_meta, build_rows, train_rows, st: Settings, train_results=()) -> list[str]:
    """Conclusions computed from the numbers; nothing here is written by hand."""
    out = []
    ok = [r for r in acc if r["mean"] is not None and math.isfinite(r["mean"])]
    out.append("**Most accurate pair** (lowest mean output error) per target, attention scale and m:")
    out.append("")
    rows = []
    for setting in info:
        for m in st.ms:
            sel = [r for r in ok if r["kernel"] == setting["kernel"] and r["s"] == setting["s"] and r["m"] == m]
            if sel:
                best = min(sel, key=lambda r: r["mean"])
                worst = max(sel, key=lambda r: r["mean"])
                rows.append(
                    (
                        setting["kernel"],
                        setting["s"],
                        m,
                        f"{best['component']} x {best['weights']}",
                        fmt(best["mean"]),
                        f"{worst['component']} x {worst['weights']}",
                        fmt(worst["mean"]),
                        fmt(setting["uniform_mean"]),
                    )
                )
    out += md_table(("target", "s", "m", "best pair", "error", "worst pair", "error", "uniform"), rows)
    out.append("")
    ranks = {}
    for setting in info:
        for m in st.ms:
            sel = sorted(
                (r for r in ok if r["kernel"] == setting["kernel"] and r["s"] == setting["s"] and r["m"] == m),
                key=lambda r: r["mean"],
            )
            for i, r in enumerate(sel):
                ranks.setdefault((r["component"], r["weights"]), []).append(i + 1)
    if ranks:
        top = sorted(ranks.items(), key=lambda kv: statistics.fmean(kv[1]))[:5]
        out.append(
            "**Best pairs overall** (mean rank over every target, scale and m; rank 1 = most accurate): "
            + "; ".join(f"{c} x {w} (mean rank {statistics.fmean(r):.1f})" for (c, w), r in top)
            + "."
        )
        out.append("")
    for target in st.kernels:
        comp_mean = {}
        for comp in sf.COMPONENTS:
            vals = [
                math.log(r["mean"]) for r in ok if r["kernel"] == target and r["component"] == comp and r["mean"] > 0
            ]
            if vals:
                comp_mean[comp] = math.exp(statistics.fmean(vals))
        w_mean = {}
        for w in sf.WEIGHTS:
            vals = [math.log(r["mean"]) for r in ok if r["kernel"] == target and r["weights"] == w and r["mean"] > 0]
            if vals:
                w_mean[w] = math.exp(statistics.fmean(vals))
        if comp_mean and w_mean:
            out.append(
                f"**{target} target**: components from best to worst (geometric-mean error over weights, "
                f"m and scales): "
                + ", ".join(f"{c} {v:.3g}" for c, v in sorted(comp_mean.items(), key=lambda kv: kv[1]))
                + ". Weights from best to worst: "
                + ", ".join(f"{w} {v:.3g}" for w, v in sorted(w_mean.items(), key=lambda kv: kv[1]))
                + "."
            )
            out.append("")
    out += uniform_summary(acc, info, st)
    out += kernel_estimation.kernel_lines(kest, kernel_estimation.settings_of(kest))
    out.append("")
    rows = []
    for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            for T in st.speed_T:
                sel = [
                    r
                    for r in speed
                    if r["T"] == T and r["causal"] == causal and r["mode"] == mode and r["ms"] is not None
                ]
                if sel:
                    best = min(sel, key=lambda r: r["ms"])
                    rf = [r for r in sel if r["impl"] != "torch-sdpa"]
                    best_rf = min(rf, key=lambda r: r["ms"]) if rf else None
                    rows.append(
                        (
                            "causal" if causal else "non-causal",
                            mode,
                            T,
                            best["impl"],
                            fmt(best["ms"]),
                            best_rf["impl"] if best_rf else "n/a",
                            fmt(best_rf["ms"]) if best_rf else "n/a",
                        )
                    )
    out.append("**Fastest implementation per T** (median ms):")
    out.append("")
    out += md_table(("", "mode", "T", "fastest", "ms", "fastest random-feature", "ms"), rows)
    out.append("")
    cross = [c for c in speed_meta["crossover"] if c["first_T_faster_than_sdpa"] is not None]
    if cross:
        out.append(
            "**Where random features overtake exact attention** (first T of the sweep): "
            + "; ".join(
                f"{c['impl']} {c['mode']} {'causal' if c['causal'] else 'non-causal'}: "
                f"T={c['first_T_faster_than_sdpa']}"
                for c in cross
            )
            + "."
        )
    else:
        out.append(f"**Where random features overtake exact attention**: nowhere in T <= {max(st.speed_T)}.")
    out.append("")
    bok = [r for r in build_rows if r.get("build_ms") is not None]
    if bok:
        fast = min(bok, key=lambda r: r["build_ms"])
        slow = max(bok, key=lambda r: r["build_ms"])
        out.append(
            f"**Building W**: cheapest {fast['weights']} ({fast['build_ms']:.3g} ms), most expensive "
            f"{slow['weights']} ({slow['build_ms']:.3g} ms)."
        )
    for backend in sorted({r["backend"] for r in train_rows}):
        base = next(
            (r for r in train_rows if r["backend"] == backend and r["weights"] == "orf" and r["step_ms"] is not None),
            None,
        )
        if base is None:
            continue
        parts = []
        for r in train_rows:
            if r["backend"] == backend and r["weights"] != "orf" and r["step_ms"] is not None:
                parts.append(f"{r['weights']} {100 * (r['step_ms'] / base['step_ms'] - 1):+.0f}%")
        if parts:
            out.append(
                f"**Learnable weights, training step on backend {backend!r}** (relative to orf, "
                f"{base['step_ms']:.3g} ms): " + ", ".join(parts) + "."
            )
    out.append("")
    if train_results:
        from . import train as train_mod

        out += train_mod.guide_lines(train_results)
    return out


def markdown(acc, info, kest, speed, speed_meta, build_rows, train_rows, st: Settings, ctx, train_results=()):
    sdt = ctx.line(dtype_name(st.speed_dtype), "speed")
    return ["", "## 7. Practitioner's guide (computed from the tables above)", "", f"_{sdt}_", ""] + guide(
        acc, info, kest, speed, speed_meta, build_rows, train_rows, st, train_results
    )
