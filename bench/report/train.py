"""Section 5 of the report: the task model trained with every component x weight pair against softmax
attention on generated tasks.

``python -m bench.report.train --task listops|mqar[,...] --pairs all|softmax,posrf:orf,... --steps N --seeds S
[--device cuda] [--quick]`` trains the Spectraformer LRA model (2 layers, 2 heads, head_dim 32, model
dim 64, FFN 128, m = 128 features; ``bench/tasks/model.py``) with each attention (``bench/tasks/trainer.py``),
evaluates test accuracy and writes a table (accuracy mean +- std over seeds, training time per step and
where it goes, peak memory, parameters), a plot of accuracy against time per step, and learning curves.

Attentions: ``softmax``, ``uniform`` and ``<component>:<weights>``, each but uniform optionally with a
window ``@w<W>`` (``bench/tasks/model.py``); ``--window W`` adds it to every random-feature pair.
Tasks (``bench/tasks``): ListOps (LRA; encoder, mean-pooled over the kept tokens, 10 classes),
multi-query associative recall (causal, the value predicted at each query) and ``mqar_spread``, MQAR with
the pairs spread over a sequence of 8 times the window of ``bench/report/window.py`` (not in the default run).

Random features: by default W is drawn once from the run's seed and kept fixed during training
(``--redraw-every 0``); ``--redraw-every N`` redraws every fixed W every N steps (learnable weights are
never redrawn). ``--quick`` is the CPU-sized mode that ``make report`` runs (short sequences, few steps,
the pairs of ``QUICK_PAIRS``); without it, the sizes are LRA's and MQAR's usual ones, meant for a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import textwrap
from dataclasses import asdict

import torch

from .. import common
from ..tasks.listops import ListOpsConfig
from ..tasks.model import ModelConfig, is_baseline, resolve_pairs
from ..tasks.mqar import MQARConfig
from ..tasks.trainer import TaskData, TaskSettings, default_backend, summarise, train_one
from .settings import WindowSettings, window_settings

TASKS = ("listops", "mqar")
EXTRA_TASKS = ("mqar_spread",)  # accepted by --task, not part of the report's section 5


def task_settings(task: str, quick: bool) -> TaskSettings:
    """Quick: sized for a 2-core CPU inside ``make report``. Full: LRA's ListOps (lengths 500-2000, depth 10,
    10 arguments, 96k training examples, batch 32) and Zoology's MQAR (vocab 8192, 64 pairs, T = 256).
    ``mqar_spread``: the window section's MQAR (``bench/report/settings.window_settings``)."""
    if task == "mqar_spread":
        return mqar_spread_task(window_settings(not quick, torch.device("cpu")))
    if task == "listops":
        if quick:
            return TaskSettings(
                task,
                ListOpsConfig(min_length=16, max_length=48, train_size=4000, val_size=256, test_size=512),
                steps=150,
                batch_size=32,
                lr=2e-3,
            )
        return TaskSettings(task, ListOpsConfig(), steps=5000, batch_size=32, lr=5e-4)
    if task == "mqar":
        if quick:
            return TaskSettings(
                task,
                MQARConfig(vocab_size=17, num_pairs=4, seq_len=16, train_size=8000, val_size=256, test_size=512),
                steps=200,
                batch_size=64,
                lr=3e-3,
            )
        return TaskSettings(task, MQARConfig(), steps=8000, batch_size=64, lr=1e-3)
    raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS + EXTRA_TASKS)}")


def mqar_spread_task(ws: WindowSettings) -> TaskSettings:
    """The ``TaskSettings`` of the window section's MQAR (``bench.report.train --task mqar_spread``): the key-value
    pairs spread over T = 8 W tokens, sized by ``ws`` (``bench/report/settings.window_settings``)."""
    model = ModelConfig(token_shift=ws.mqar_token_shift, positions=ws.mqar_positions)
    return TaskSettings(
        "mqar_spread", ws.mqar, steps=ws.mqar_steps, batch_size=ws.mqar_batch, lr=ws.mqar_lr, model=model
    )


# ----------------------------------------------------------------------------------------------------
# Writing: table, plots
# ----------------------------------------------------------------------------------------------------


def task_description(data: TaskData) -> str:
    ts, c = data.ts, data.ts.data
    if isinstance(c, ListOpsConfig):
        what = (
            f"ListOps (LRA recipe): lengths [{c.min_length}, {c.max_length}), depth <= {c.max_depth}, "
            f"<= {c.max_args} arguments, {c.train_size}/{c.val_size}/{c.test_size} examples; encoder, mean-pooled, "
            "10 classes"
        )
    else:
        what = (
            f"MQAR{' (pairs spread over the sequence)' if c.layout == 'spread' else ''}: vocab {c.vocab_size} "
            f"({c.num_keys} keys, {c.num_values} values), {c.num_pairs} pairs, "
            f"{c.queries} queries, T = {c.seq_len}, {c.train_size}/{c.val_size}/{c.test_size} sequences; causal, "
            "accuracy over query positions"
        )
    mc = ts.model
    model = (
        f"{mc.layers} layers, {mc.heads} heads x {mc.dim // mc.heads}, dim {mc.dim}, FFN {mc.ffn}, "
        f"m = {mc.num_features} features"
        + (", token shift (width-2 causal convolution)" if mc.token_shift else "")
        + ("" if mc.positions else ", no position embeddings")
    )
    return (
        f"{what}. Model: {model}; AdamW (lr {ts.lr:g}, "
        f"weight decay {ts.weight_decay:g}, betas 0.9/0.98), {int(ts.warmup_frac * 100)}% linear warm-up then "
        f"cosine decay, gradient norm clipped at 1, batch {ts.batch_size}."
    )


def table_lines(task: str, summaries: list[dict], data: TaskData, meta: dict) -> list[str]:
    soft = next((s for s in summaries if s["pair"] == "softmax"), None)
    L = [
        f"_{meta['header']}_",
        "",
        task_description(data) + f" {meta['steps']} steps, seeds "
        f"{', '.join(map(str, meta['seeds']))}; random features {meta['redraw']}. Chance: "
        f"{data.chance:.3f} ({data.chance_note}).",
        "",
        "Time per step: median wall time of a training step (forward, backward, clipping, AdamW) over the run. "
        "Attention: the attention layers alone, forward + backward on one batch of the step's shape; the rest "
        "of the step is embeddings, FFNs, loss and the optimizer. Peak memory: " + meta["mem_how"] + ". The attentions "
        f"train one after another: 1-minute load average {meta['load'][0]} at the start, {meta['load'][-1]} at the "
        f"end on {os.cpu_count()} logical CPUs; a load that changes during the run biases the time ratios.",
        "",
    ]
    rows = []
    for s in summaries:
        rel = f"{s['step_ms'] / soft['step_ms']:.2f}x" if soft else "n/a"
        rows.append(
            (
                s["pair"].replace(":", " x "),
                f"{100 * s['acc_mean']:.1f} +- {100 * s['acc_std']:.1f}",
                "yes" if s["above_chance"] else "**no**",
                f"{s['step_ms']:.3g}",
                rel,
                common.fmt(s["attn_ms"]),
                common.mib(s["peak_mem_bytes"]),
                s["params"],
                s["feature_map_params"],
                f"{s['loss_first']:.3f} -> {s['loss_last']:.3f}",
            )
        )
    L += common.md_table(
        (
            "attention",
            "test acc %",
            "above chance",
            "ms / step",
            "vs softmax",
            "attention ms (fwd+bwd)",
            "peak MiB",
            "params",
            "of which feature map",
            "train loss first -> last 10%",
        ),
        rows,
    )
    L.append("")
    return L


def findings(task: str, summaries: list[dict], data: TaskData) -> dict[str, str]:
    """Plain statements computed from the table, by topic (softmax, best, gap, time, learnable)."""
    soft = next((s for s in summaries if s["pair"] == "softmax"), None)
    uni = next((s for s in summaries if s["pair"] == "uniform"), None)
    rf = [s for s in summaries if not is_baseline(s["pair"])]
    out = {}
    if soft:
        out["softmax"] = (
            f"softmax reaches {100 * soft['acc_mean']:.1f}% (chance {100 * data.chance:.1f}%"
            + (f", uniform attention {100 * uni['acc_mean']:.1f}%" if uni else "")
            + ")."
        )
    if rf:
        best = max(rf, key=lambda s: s["acc_mean"])
        fastest = min(rf, key=lambda s: s["step_ms"])
        above = [s for s in rf if s["above_chance"]]
        out["best"] = (
            f"best random-feature pair: {best['pair'].replace(':', ' x ')} at {100 * best['acc_mean']:.1f}%"
            + (f" ({100 * (best['acc_mean'] - soft['acc_mean']):+.1f} points against softmax)" if soft else "")
            + f"; {len(above)} of {len(rf)} pairs above chance"
            + (f", {sum(s['acc_mean'] > uni['acc_mean'] for s in rf)} above uniform attention" if uni else "")
            + (f", {sum(s['acc_mean'] >= soft['acc_mean'] for s in rf)} at or above softmax" if soft else "")
            + "."
        )
        if soft and soft["seeds"] > 1:
            gap = best["acc_mean"] - soft["acc_mean"]
            spread = max(soft["acc_std"], best["acc_std"])
            out["gap"] = (
                f"the difference between the best pair and softmax ({100 * gap:+.1f} points) is "
                + ("within" if abs(gap) <= spread else "larger than")
                + f" the larger seed standard deviation of the two ({100 * spread:.1f} points)."
            )
        if soft:
            ratios = [s["step_ms"] / soft["step_ms"] for s in rf]
            out["time"] = (
                f"a training step with random features takes {min(ratios):.2f}x-{max(ratios):.2f}x the time "
                f"of a softmax step (fastest pair {fastest['pair'].replace(':', ' x ')}, "
                f"{fastest['step_ms']:.3g} ms against {soft['step_ms']:.3g} ms)"
                + (
                    ""
                    if soft["attn_ms"] is None or fastest["attn_ms"] is None
                    else f"; the attention layers alone take {fastest['attn_ms']:.3g} ms (random features) against "
                    f"{soft['attn_ms']:.3g} ms (SDPA)"
                )
                + "."
            )
        learn = [s for s in rf if s["feature_map_params"]]
        if learn and soft:
            out["learnable"] = (
                "learnable weights: "
                + ", ".join(
                    f"{s['pair'].replace(':', ' x ')} trains {s['feature_map_params']} feature-map parameters, "
                    f"{s['step_ms'] / soft['step_ms']:.2f}x softmax's step time"
                    for s in learn
                )
                + "."
            )
    return out


def _save(plt, fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def plot(task: str, summaries, runs, out_dir: str, header: str) -> list[str]:
    plt = common.get_plt()
    if plt is None:
        return []
    files = []
    header = textwrap.fill(header, 110)
    fig, ax = plt.subplots(figsize=(7, 5))
    for s in summaries:
        ax.errorbar(
            s["step_ms"],
            100 * s["acc_mean"],
            yerr=100 * s["acc_std"],
            fmt="s" if is_baseline(s["pair"]) else "o",
            capsize=3,
        )
        ax.annotate(
            s["pair"].replace(":", " x "),
            (s["step_ms"], 100 * s["acc_mean"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("training time per step (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy against time per step\n{header}", fontsize=7)
    ax.grid(alpha=0.3)
    files.append(_save(plt, fig, out_dir, f"train_{task}_acc_vs_time.png"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for pair in dict.fromkeys(r["pair"] for r in runs):
        sel = [r for r in runs if r["pair"] == pair]
        steps = [c["step"] for c in sel[0]["curve"]]
        loss = [statistics.fmean(r["curve"][i]["train_loss"] for r in sel) for i in range(len(steps))]
        acc = [100 * statistics.fmean(r["curve"][i]["val_acc"] for r in sel) for i in range(len(steps))]
        style = "--" if is_baseline(pair) else "-"
        a1.plot(steps, loss, style, marker=".", label=pair.replace(":", " x "))
        a2.plot(steps, acc, style, marker=".", label=pair.replace(":", " x "))
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a2.set_xlabel("step")
    a2.set_ylabel("validation accuracy (%)")
    a2.legend(fontsize=7)
    fig.suptitle(f"{task}: learning curves (mean over seeds)\n{header}", fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    files.append(_save(plt, fig, out_dir, f"train_{task}_curves.png"))
    return files


# ----------------------------------------------------------------------------------------------------
# Running a comparison
# ----------------------------------------------------------------------------------------------------


def run_task(
    task: str,
    pairs: list[str],
    seeds: list[int],
    quick: bool,
    device: torch.device,
    ctx,
    out_dir: str,
    steps: int | None = None,
    backend: str = "auto",
    redraw_every: int = 0,
) -> dict:
    """Train every pair with every seed on one task; writes ``train_<task>.{md,csv,json}`` and the plots."""
    ts = task_settings(task, quick)
    if steps is not None:
        ts = TaskSettings(**{**ts.__dict__, "steps": steps})
    data = TaskData(ts, device)
    load = [common.loadavg()]
    runs, summaries = [], []
    bar = common.Bar(len(pairs) * len(seeds) * ts.steps, f"train {task}")
    for pair in pairs:
        these = []
        for seed in seeds:
            # The cost breakdown (attention alone, peak memory) is measured once per pair, after the first seed.
            these.append(
                train_one(
                    pair, data, seed, backend=backend, redraw_every=redraw_every, bar=bar, measure=seed == seeds[0]
                )
            )
        runs += these
        summaries.append(summarise(these, data.chance))
    bar.close()
    load.append(common.loadavg())
    header = ctx.line("float32", "train")
    meta = {
        "header": header,
        "steps": ts.steps,
        "seeds": seeds,
        "load": load,
        "redraw": f"redrawn every {redraw_every} steps" if redraw_every else "fixed (drawn once from the seed)",
        "mem_how": (
            "torch.cuda.max_memory_allocated over one step beyond what was allocated before it"
            if device.type == "cuda"
            else "torch.profiler allocation events of one step replayed in "
            "time order, beyond what was allocated before it; approximate"
        ),
    }
    lines = table_lines(task, summaries, data, meta)
    found = findings(task, summaries, data)
    plots = plot(task, summaries, runs, out_dir, header)
    md = [f"# Training comparison: {task} ({'quick' if quick else 'full'} mode)", ""] + lines
    md += ["Findings (computed from the table):", ""] + [f"- {f}" for f in found.values()] + [""]
    md += [f"![{p}]({p})" for p in plots] + [""]
    with open(os.path.join(out_dir, f"train_{task}.md"), "w") as f:
        f.write("\n".join(md))
    common.write_csv(os.path.join(out_dir, f"train_{task}.csv"), [{**s, **ctx.fields("float32")} for s in summaries])
    with open(os.path.join(out_dir, f"train_{task}.json"), "w") as f:
        json.dump(
            {
                "context": {"device": ctx.device, "date": ctx.date, "versions": ctx.versions, "mode": ctx.mode},
                "settings": {**asdict(ts.data), **{k: v for k, v in ts.__dict__.items() if k != "data"}},
                "backend": backend,
                "redraw_every": redraw_every,
                "summaries": summaries,
                "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
            },
            f,
            indent=1,
            default=str,
        )
    return {
        "task": task,
        "lines": lines,
        "findings": found,
        "plots": plots,
        "summaries": summaries,
        "chance": data.chance,
    }


def use_threads(ctx, device: torch.device, threads: int | None) -> None:
    """CPU thread count of the training runs: one unless asked. The model's tensors are small (B x T x 64),
    so OpenMP gains little, and on shared cores its barriers stall (steps measured here up to 10x slower
    with 2 threads than with 1 while other processes ran)."""
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
        ctx.threads["train"] = torch.get_num_threads()


def report_section(device: torch.device, full: bool, ctx, out_dir: str) -> list[dict]:
    """The training section of ``make report``: quick mode runs ``QUICK_PAIRS`` with 2 seeds, full mode every
    pair with 3 seeds at LRA/MQAR sizes."""
    use_threads(ctx, device, None)
    pairs = resolve_pairs("all" if full else "quick", not full)
    seeds = [0, 1, 2] if full else [0, 1]
    return [run_task(t, pairs, seeds, not full, device, ctx, out_dir, backend=default_backend(device)) for t in TASKS]


def section_markdown(results: list[dict], full: bool) -> list[str]:
    """Section 5 of the report (``full``: its mode): the training tables of every task."""
    L = [
        "",
        "## 5. Training on generated tasks",
        "",
        f"`python -m bench.report.train{'' if full else ' --quick'}` inside this run: the model of the Spectraformer "
        "LRA study trained with each attention; files `train_<task>.*`.",
        "",
    ]
    for r in results:
        L += (
            [f"### {r['task']}", ""]
            + r["lines"]
            + ["Findings:", ""]
            + [f"- {f}" for f in r["findings"].values()]
            + [""]
        )
        L += [f"![{p}]({p})" for p in r["plots"]] + [""]
    return L


def guide_lines(results: list[dict]) -> list[str]:
    """What the practitioner's guide takes from the training runs."""
    out = []
    for r in results:
        rf = [s for s in r["summaries"] if not is_baseline(s["pair"])]
        soft = next((s for s in r["summaries"] if s["pair"] == "softmax"), None)
        if not rf:
            continue
        best = max(rf, key=lambda s: s["acc_mean"])
        # The cheapest pair within one standard deviation of the best one: what to pick when time matters.
        near = [s for s in rf if s["acc_mean"] >= best["acc_mean"] - max(best["acc_std"], 1e-9)]
        pick = min(near, key=lambda s: s["step_ms"])
        out.append(
            f"**Trained on {r['task']}**: best random-feature pair {best['pair'].replace(':', ' x ')} "
            f"({100 * best['acc_mean']:.1f}%"
            + (f"; softmax {100 * soft['acc_mean']:.1f}%" if soft else "")
            + f"; chance {100 * r['chance']:.1f}%); cheapest within one std of it: "
            f"{pick['pair'].replace(':', ' x ')} ({pick['step_ms']:.3g} ms / step"
            + (f", {pick['step_ms'] / soft['step_ms']:.2f}x softmax" if soft else "")
            + "). "
            + " ".join(
                r["findings"][k][:1].upper() + r["findings"][k][1:] for k in ("gap", "time") if k in r["findings"]
            )
        )
        out.append("")
    return out


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--task", default="listops,mqar", help="listops, mqar, mqar_spread (comma-separated; default listops,mqar)"
    )
    ap.add_argument(
        "--pairs",
        default=None,
        help="all, quick, or a comma list of softmax, uniform, <component>:<weights>, each but uniform "
        "optionally with a window @w<W> (default: quick with --quick, else all)",
    )
    ap.add_argument(
        "--window",
        type=int,
        default=None,
        help="hybrid attention: a window of W exact keys on every random-feature pair without @w",
    )
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the task's setting)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2 quick, 3 full)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="CPU-sized tasks (short sequences, few steps)")
    ap.add_argument(
        "--backend",
        default=None,
        help="rf_attention backend (default: auto on CUDA, i.e. Triton; reference on the CPU, whose "
        "compiled backend recomputes its backward through the reference anyway)",
    )
    ap.add_argument(
        "--redraw-every",
        type=int,
        default=0,
        help="redraw fixed random features every N steps (default 0: drawn once, kept fixed)",
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1, see use_threads)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<date>)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS + EXTRA_TASKS:
            ap.error(f"unknown task {t!r}; valid tasks are {', '.join(TASKS + EXTRA_TASKS)}")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.redraw_every < 0:
        ap.error("--redraw-every must be >= 0")
    if args.window is not None and args.window < 1:
        ap.error("--window must be >= 1")
    try:
        pairs = resolve_pairs(args.pairs or ("quick" if args.quick else "all"), args.quick, args.window)
    except ValueError as exc:
        ap.error(str(exc))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 3)))
    mode = "quick" if args.quick else "full"
    ctx = common.Context(
        common.device_name(device), datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), common.versions(), mode
    )
    ctx.default_threads = torch.get_num_threads()
    out = args.out or common.default_out_dir(device)
    os.makedirs(out, exist_ok=True)
    print(
        f"training comparison ({mode}) on {ctx.device}: {', '.join(tasks)}; {len(pairs)} attentions x "
        f"{len(seeds)} seeds -> {out}",
        flush=True,
    )
    use_threads(ctx, device, args.threads)
    for task in tasks:
        r = run_task(
            task,
            pairs,
            seeds,
            args.quick,
            device,
            ctx,
            out,
            steps=args.steps,
            backend=args.backend or default_backend(device),
            redraw_every=args.redraw_every,
        )
        print(f"{task}: " + os.path.join(out, f"train_{task}.md"))
        for f in r["findings"].values():
            print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
