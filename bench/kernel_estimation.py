"""Section 2 of the report: the error of every component x weight pair's kernel estimate
``RandomFeatureMap.kernel_estimate(q, k)`` against ``exact_kernel``."""

from __future__ import annotations

import statistics

import torch

import spectraformer_fused as sf

from .common import Bar, Context, fmt, gaussian_qkv, md_table
from .settings import Settings


def run(st: Settings, ctx: Context):
    B, T, H, D = st.kest_shape
    m = st.kest_m
    rows = []
    bar = Bar(len(sf.COMPONENTS) * len(sf.WEIGHTS) * len(st.kernels), "2/4 kernel estimates")
    for kernel in st.kernels:
        for comp in sf.COMPONENTS:
            for wname in sf.WEIGHTS:
                for s in (st.scales[0], st.scales[-1]):
                    mse, rel, reason = [], [], None
                    for seed in range(st.seeds):
                        q, k, _ = gaussian_qkv(st.kest_shape, s, 77 + seed, st.device)
                        try:
                            fm = sf.RandomFeatureMap(
                                D,
                                m,
                                component=comp,
                                weights=wname,
                                kernel=kernel,
                                num_heads=H,
                                seed=2000 + seed,
                                device=st.device,
                            ).eval()
                            with torch.no_grad():
                                est = fm.kernel_estimate(q, k).double()
                            exact = sf.exact_kernel(q, k, kernel=kernel).double()
                            err = float(((est - exact) ** 2).mean())
                            mse.append(err)
                            rel.append(err / float((exact**2).mean()))
                        except Exception as exc:
                            reason = f"{type(exc).__name__}: {exc}"
                            break
                    row = {
                        "section": "kernel",
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
                    if reason is not None:
                        row.update(mse=None, rel_mse=None, status=f"n/a ({reason})")
                    else:
                        row.update(mse=statistics.fmean(mse), rel_mse=statistics.fmean(rel), status="ok")
                    rows.append(row)
                bar.update()
    bar.close()
    return rows


def markdown(kest, st: Settings, ctx: Context) -> list[str]:
    kln = ctx.line("float32", "kernel")
    L = []
    B, T, H, D = st.kest_shape
    L += [
        "## 2. Kernel estimation",
        "",
        f"_{kln}_",
        "",
        f"Mean squared error of `RandomFeatureMap.kernel_estimate(q, k)` against `exact_kernel` over all "
        f"{T}x{T} pairs, m={st.kest_m}, B={B} H={H} D={D}, mean over {st.seeds} seeds; in parentheses the MSE "
        "relative to mean(K^2).",
        "",
    ]
    scales = (st.scales[0], st.scales[-1])
    cols = [(kernel, s) for kernel in st.kernels for s in scales]
    table, reasons = [], {}
    for comp in sf.COMPONENTS:
        for w in sf.WEIGHTS:
            cells = []
            for kernel, s in cols:
                r = next(
                    r
                    for r in kest
                    if r["kernel"] == kernel and r["s"] == s and r["component"] == comp and r["weights"] == w
                )
                if r["mse"] is None:
                    cells.append("n/a")
                    reasons.setdefault(r["status"], []).append(f"{comp} x {w}")
                else:
                    cells.append(f"{fmt(r['mse'])} ({fmt(r['rel_mse'])})")
            table.append((comp, w, *cells))
    L += md_table(("component", "weights", *[f"{k} s={s}" for k, s in cols]), table)
    for why, where in reasons.items():
        L.append(f"\n- {why}: {', '.join(where)}")
    L.append("")
    return L
