"""Section 4 of the report: the cost of each weight matrix (building W; a training step, fixed versus
learnable weights, on every available backend)."""

from __future__ import annotations

import torch

import spectraformer_fused as sf
from spectraformer_fused.weights import build_weights

from ..common import Bar, Context, dtype_name, fmt, md_table, mib, peak_memory
from ..timing import time_fn
from .settings import Settings


def run(st: Settings, ctx: Context):
    H, m, D = st.weight_shape
    dev = st.device
    build_rows, train_rows = [], []
    backends = [
        b
        for b in sf.available_backends()
        if (b != "triton" or dev.type == "cuda") and (b != "cpu" or dev.type == "cpu")
    ]
    train_weights = ("orf",) + tuple(sf.LEARNABLE_WEIGHTS)
    bar = Bar(len(sf.WEIGHTS) + len(train_weights) * len(backends), "4/4 weight cost")
    for wname in sf.WEIGHTS:
        row = {"section": "weights", "weights": wname, "H": H, "m": m, "D": D, **ctx.fields("float32")}
        try:
            seeds = iter(range(10**6))

            def build():
                w = build_weights(wname, H, m, D, seed=next(seeds), device=dev)
                w.projection()

            med, lo, hi, _ = time_fn(build, dev, 0.3)
            w = build_weights(wname, H, m, D, seed=0, device=dev)
            stored = sum(t.numel() * t.element_size() for t in list(w.parameters()) + list(w.buffers()))
            trainable = sum(p.numel() for p in w.parameters() if p.requires_grad)
            dense = H * m * D * 4
            row.update(
                build_ms=med,
                build_ms_p20=lo,
                build_ms_p80=hi,
                stored_bytes=stored,
                dense_bytes=dense,
                trainable_params=trainable,
                status="ok",
            )
        except Exception as exc:
            row.update(build_ms=None, status=f"error: {type(exc).__name__}: {exc}")
        build_rows.append(row)
        bar.update()
    B, T, E, Hh, mm = st.train_shape
    for backend in backends:
        for wname in train_weights:
            for causal in (False,):
                row = {
                    "section": "train",
                    "weights": wname,
                    "backend": backend,
                    "causal": causal,
                    "B": B,
                    "T": T,
                    "E": E,
                    "H": Hh,
                    "m": mm,
                    "component": "posrf",
                    **ctx.fields(dtype_name(st.speed_dtype)),
                }
                try:
                    torch.manual_seed(0)
                    model = sf.SpectraAttention(
                        E,
                        Hh,
                        num_features=mm,
                        component="posrf",
                        weights=wname,
                        causal=causal,
                        seed=0,
                        backend=backend,
                        device=dev,
                    )
                    model = model.to(st.speed_dtype) if dev.type == "cuda" else model
                    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                    x = torch.randn(B, T, E, device=dev, dtype=st.speed_dtype)

                    def step():
                        opt.zero_grad(set_to_none=True)
                        model(x).float().pow(2).mean().backward()
                        opt.step()

                    med, lo, hi, _ = time_fn(step, dev, st.run_budget_s)
                    mem = peak_memory(step, dev)
                    fm_params = sum(p.numel() for p in model.feature_map.parameters() if p.requires_grad)
                    row.update(
                        step_ms=med,
                        step_ms_p20=lo,
                        step_ms_p80=hi,
                        peak_mem_bytes=mem,
                        feature_map_trainable=fm_params,
                        status="ok",
                    )
                except Exception as exc:
                    row.update(step_ms=None, status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
                train_rows.append(row)
                bar.update()
    bar.close()
    return build_rows, train_rows


def markdown(build_rows, train_rows, st: Settings, ctx: Context) -> list[str]:
    wln = ctx.line("float32", "weights")
    tln = ctx.line(dtype_name(st.speed_dtype), "weights")
    L = []
    H, m, D = st.weight_shape
    L += [
        "## 4. Cost of each weight matrix",
        "",
        f"_{wln}_",
        "",
        f"Building W (module construction + `projection()`) for H={H}, m={m}, D={D}, median ms; stored = bytes of "
        "the module's parameters and buffers; dense = the [H, m, D] fp32 matrix every backend reads.",
        "",
    ]
    L += md_table(
        ("weights", "build ms", "stored KiB", "dense KiB", "trainable params", "status"),
        [
            (
                r["weights"],
                fmt(r.get("build_ms")),
                fmt(r.get("stored_bytes", 0) / 1024, ".1f"),
                fmt(r.get("dense_bytes", 0) / 1024, ".1f"),
                r.get("trainable_params", "n/a"),
                r["status"],
            )
            for r in build_rows
        ],
    )
    B, T, E, Hh, mm = st.train_shape
    L += [
        "",
        f"_{tln}_",
        "",
        f"Training step (SpectraAttention fwd + bwd + SGD step), B={B} T={T} E={E} H={Hh} m={mm}, posrf, "
        "non-causal, median ms; fixed (orf) versus learnable weights.",
        "",
    ]
    L += md_table(
        ("backend", "weights", "step ms", "peak MiB", "trainable feature-map params", "status"),
        [
            (
                r["backend"],
                r["weights"],
                fmt(r.get("step_ms")),
                mib(r.get("peak_mem_bytes")),
                r.get("feature_map_trainable", "n/a"),
                r["status"],
            )
            for r in train_rows
        ],
    )
    return L
