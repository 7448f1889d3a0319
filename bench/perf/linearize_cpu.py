"""Linearizing the real LM on the CPU, before and after the fused path: ``python -m bench.perf.linearize_cpu``.

SmolLM2-135M-Instruct (``bench/report/real_lm.py`` fetches it) converted to hybrid attention (hedgehog m 64,
W 64, 4 sinks, the exact-part factor), then stage 1 (``fitting.distill(loss="mse")``, every layer) and stage
2 (``fitting.finetune(target="logits", train="lora")``), each timed twice in this one process on the same
batches, from the same converted model:

* **before**: the code paths of the package before the fused CPU hybrid backward and the fused output loss:
  stage 1 on the chunked PyTorch loss (``distill(backend=None)``), stage 2 with the converted layers on the
  reference backend (``rf_backend = "reference"``: before the CPU backend ran sinks, a call with sinks fell
  back to it, and its backward recomputed through the reference anyway), and no heap trim between steps;
* **after**: ``distill(backend="auto")`` (the compiled CPU hybrid forward and fused backward against the exact
  output computed once per batch) and stage 2 on the compiled CPU backend (``rf_backend = "auto"``), with
  the heap trimmed after each step.

The final stage-1 losses of both runs are printed beside the times: the same computation, so they agree to
float rounding. Writes ``bench/results/linearize-cpu-<date>.md`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.report.real_lm import load_model, model_dir, prepare_corpus, prepare_model
from bench.report.real_lm_fit import _batches
from spectraformer_fused import fitting
from spectraformer_fused.integrations.transformers import BACKEND_ATTR, convert

RESULTS = Path(__file__).resolve().parent.parent / "results"


@contextlib.contextmanager
def _before(model):
    """The model's converted layers on the reference backend and no heap trim: the code paths before."""
    saved = {m: getattr(m, BACKEND_ATTR) for m in model.modules() if hasattr(m, BACKEND_ATTR)}
    trim = fitting._trim_heap
    for m in saved:
        setattr(m, BACKEND_ATTR, "reference")
    fitting._trim_heap = lambda: None
    try:
        yield
    finally:
        fitting._trim_heap = trim
        for m, b in saved.items():
            setattr(m, BACKEND_ATTR, b)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(converted, base, batches, args, before: bool) -> dict:
    model = copy.deepcopy(converted)
    ctx = _before(model) if before else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        curves = fitting.distill(
            model, batches, steps=args.steps1, lr=1e-2, loss="mse", backend=None if before else "auto"
        )
        t1 = time.perf_counter()
        load1 = os.getloadavg()[0]
        teacher = [{"input_ids": b["input_ids"]} for b in batches]
        curve2 = fitting.finetune(
            model, base, teacher, steps=args.steps2, lr=1e-3, target="logits", train="lora", lora_rank=8
        )
        t2 = time.perf_counter()
    return {
        "stage1": t1 - t0,
        "stage2": t2 - t1,
        "load1": load1,
        "load2": os.getloadavg()[0],
        "last1": sum(c[-1] for c in curves.values()),
        "first2": curve2[0] if curve2 else float("nan"),
        "rss": _rss_mib(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps1", type=int, default=5, help="stage 1 Adam steps per layer")
    p.add_argument("--steps2", type=int, default=5, help="stage 2 AdamW steps")
    p.add_argument("--fit-seqs", type=int, default=2)
    p.add_argument("--fit-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prepare_model()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    corpus = prepare_corpus(tok)
    base = load_model(model_dir())
    converted = copy.deepcopy(base)
    convert(converted, component="hedgehog", weights="learnable", num_features=64, window=64, sinks=4, mix=1.0, seed=0)
    converted.eval()
    batches = _batches(corpus["train"], args.fit_seqs, args.fit_len, seed=1)
    res = {}
    for label, before in (("before", True), ("after", False)):
        res[label] = run(converted, base, batches, args, before)
        print(label, res[label], flush=True)
    b, a = res["before"], res["after"]
    rows = [
        f"| stage 1 ({args.steps1} steps x 30 layers) | {b['stage1']:.1f} | {a['stage1']:.1f} | "
        f"{b['stage1'] / a['stage1']:.2f}x |",
        f"| stage 2 ({args.steps2} LoRA steps) | {b['stage2']:.1f} | {a['stage2']:.1f} | {b['stage2'] / a['stage2']:.2f}x |",
        f"| stage 1 + stage 2 | {b['stage1'] + b['stage2']:.1f} | {a['stage1'] + a['stage2']:.1f} | "
        f"{(b['stage1'] + b['stage2']) / (a['stage1'] + a['stage2']):.2f}x |",
    ]
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    out = args.out or RESULTS / f"linearize-cpu-{datetime.date.today():%Y-%m-%d}.md"
    text = [
        "# Linearizing SmolLM2-135M-Instruct on the CPU: stage times before and after the fused path",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- 1-minute load average after stage 1 / stage 2: before {b['load1']:.1f} / {b['load2']:.1f}, "
        f"after {a['load1']:.1f} / {a['load2']:.1f} (above the thread count: other processes shared the cores)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- command: `python -m bench.perf.linearize_cpu {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"- model: hedgehog x learnable m=64 (F=128), W=64, 4 sinks, factor; {args.fit_seqs} training sequences of "
        f"{args.fit_len} tokens, batch 1",
        "",
        "Seconds per stage, measured one after the other in this process from the same converted model "
        "(the docstring of `bench/perf/linearize_cpu.py` says what 'before' runs).",
        "",
        "| stage | before s | after s | speed-up |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Sum over the layers of the last stage-1 loss: before {b['last1']:.6g}, after {a['last1']:.6g}; first "
        f"stage-2 loss: before {b['first2']:.6g}, after {a['first2']:.6g}. Resident memory at the end: before "
        f"{b['rss']:.0f} MiB, after {a['rss']:.0f} MiB.",
    ]
    out.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
