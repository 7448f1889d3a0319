"""Linearizing the real LM in stages: convert, stage 1 (attention transfer), stage 2 (LoRA), each evaluated.

For one hybrid configuration of SmolLM2-135M-Instruct (``bench/report/real_lm.py`` fetches the model and the corpus):
the held-out perplexity, its ratio to the original, greedy next-token agreement and KL(original || model) per
token after ``convert``, after stage 1 (``fitting.distill``, the attention output or weights fitted layer by
layer) and after stage 2 (``fitting.finetune``, next-token KL to the original, LoRA on q, k, v, o), with each
stage's time; and, in the same run on the same sequences, the original and the softmax band baseline (the last
W' keys + S sinks) whose keys and values take the hybrid's state memory per key/value head.

    python -m bench.report.real_lm_fit --component hedgehog --weights learnable --m 64 --window 64 --sinks 4 \\
        --mix 0.1 --loss mse --steps1 20 --steps2 20

The table goes to ``bench/results/real-lm-fit-<date>.md`` (rewritten after every stage).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.report.real_lm import (
    _logprobs,
    _metrics,
    equal_memory_window,
    feature_width,
    load_model,
    log,
    model_dir,
    prepare_corpus,
    prepare_model,
    set_band,
)
from spectraformer_fused import fitting
from spectraformer_fused.integrations.transformers import convert

RESULTS = Path(__file__).resolve().parent.parent / "results"


def evaluate(model, base_lps, held) -> dict:
    """Perplexity, agreement and KL of ``model`` on the held-out sequences against the original's log-probs."""
    acc = {"nll": 0.0, "kl": 0.0, "agree": 0.0, "n": 0}
    t0 = time.perf_counter()
    for i in range(held.shape[0]):
        ids = held[i : i + 1]
        m = _metrics(_logprobs(model, ids), base_lps[i], ids)
        for k in acc:
            acc[k] += m[k]
    n = acc["n"]
    return {
        "ppl": float(torch.tensor(acc["nll"] / n).exp()),
        "agree": acc["agree"] / n,
        "kl": acc["kl"] / n,
        "eval_s": time.perf_counter() - t0,
    }


def _batches(train: torch.Tensor, n: int, length: int, seed: int, batch: int = 1) -> list[dict]:
    """``n`` training sequences of ``length`` tokens at random offsets, in batches of ``batch`` sequences."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - length, (n,), generator=g).tolist()
    seqs = [train[s : s + length] for s in starts]
    return [{"input_ids": torch.stack(seqs[i : i + batch]), "use_cache": False} for i in range(0, n, batch)]


def passkey(model, tok, lens: list[int], trials: int) -> dict:
    """Passkey accuracy of ``model`` per prompt length: the keys, depths and prompts of ``real_lm``'s passkey
    stage (the same seed), greedy decoding of 7 tokens."""
    import random
    import re

    from bench.report.real_lm import _greedy, passkey_prompt

    rng = random.Random(0)
    keys = [[(rng.randint(10000, 99999), rng.random()) for _ in range(trials)] for _ in lens]
    out = {}
    for n, cases in zip(lens, keys):
        ok = 0
        for key, depth in cases:
            gen, _ = _greedy(model, passkey_prompt(tok, n, depth, key), 7)
            m = re.search(r"\d{5}", tok.decode(gen[0], skip_special_tokens=True))
            ok += int(bool(m) and int(m.group(0)) == key)
        out[n] = ok
        log(f"passkey {n}: {ok}/{trials}")
    return out


def _row(label: str, r: dict, orig_ppl: float, stage_s) -> str:
    t = "" if stage_s is None else f"{stage_s:.0f}"
    return f"| {label} | {r['ppl']:.2f} | {r['ppl'] / orig_ppl:.3f} | {r['agree']:.3f} | {r['kl']:.4f} | {t} |"


def write(path: Path, args, header_rows: list[str], rows: list[str], notes: list[str]) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import transformers

    text = [
        "# Linearizing SmolLM2-135M-Instruct in stages: convert, stage 1, stage 2",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"load average at the end {os.getloadavg()[0]:.1f} (other jobs shared the machine: stage times are upper bounds)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- command: `python -m bench.report.real_lm_fit {' '.join(sys.argv[1:])}`",
        "",
        "Columns: held-out perplexity, its ratio to the original, greedy next-token agreement with the original, "
        "KL(original || row) in nats per token, the stage's own time in seconds (fitting only, not the evaluation).",
        "",
        "| row | ppl | ppl / orig | top-1 agree | KL nats/tok | stage s |",
        "|---|---|---|---|---|---|",
        *header_rows,
        *rows,
        "",
        *notes,
    ]
    path.write_text("\n".join(text) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--component", default="hedgehog")
    p.add_argument("--weights", default="learnable")
    p.add_argument("--m", type=int, default=64, help="number of random features m")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--mix", type=float, default=None, help="initial exact-part factor (LoLCATs: 0.1)")
    p.add_argument("--loss", choices=("mse", "kl"), default="mse", help="stage 1: outputs (mse) or weights (kl)")
    p.add_argument("--steps1", type=int, default=20, help="stage 1 Adam steps per layer")
    p.add_argument("--lr1", type=float, default=1e-2)
    p.add_argument("--steps2", type=int, default=20, help="stage 2 AdamW steps (0: no stage 2)")
    p.add_argument("--lr2", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--fit-seqs", type=int, default=2, help="training sequences per stage")
    p.add_argument("--fit-len", type=int, default=1024)
    p.add_argument("--fit-batch", type=int, default=1, help="training sequences per step (stages 1 and 2)")
    p.add_argument("--passkey-lens", default="", help="passkey of the final model at these lengths, e.g. 1024,2048")
    p.add_argument("--trials", type=int, default=10, help="passkey trials per length")
    p.add_argument(
        "--save",
        type=Path,
        default=None,
        help="save the model here after each fitting stage (linearize.save_linearized)",
    )
    p.add_argument("--seqs", type=int, default=8, help="held-out sequences of 1024 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prepare_model()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    corpus = prepare_corpus(tok)
    held = corpus["heldout"][: args.seqs]
    out = args.out or RESULTS / f"real-lm-fit-{datetime.date.today():%Y-%m-%d}.md"
    base = load_model(model_dir())
    base_lps = [_logprobs(base, held[i : i + 1]) for i in range(held.shape[0])]
    orig = evaluate(base, base_lps, held)
    head = [_row("original (SDPA)", orig, orig["ppl"], None)]

    kwargs = dict(component=args.component, weights=args.weights, num_features=args.m, window=args.window, seed=0)
    if args.sinks:
        kwargs["sinks"] = args.sinks
    if args.mix is not None:
        kwargs["mix"] = args.mix
    model = copy.deepcopy(base)
    convert(model, **kwargs)
    model.eval()
    F = feature_width(model)
    wp, floats = equal_memory_window(args.window, args.sinks, F)
    band = copy.deepcopy(base)
    for w, s in sorted({(args.window, args.sinks), (wp, args.sinks)}):
        set_band(band, w, s)
        tag = " (equal memory)" if w == wp else ""
        head.append(_row(f"band softmax W'={w} S={s}{tag}", evaluate(band, base_lps, held), orig["ppl"], None))
    del band
    name = f"hybrid {args.component} x {args.weights} m={args.m} (F={F}) W={args.window} S={args.sinks}"
    name += f" mix={args.mix}" if args.mix is not None else ""
    notes = [
        f"Held-out: {held.shape[0]} sequences of {held.shape[1]} tokens ({corpus['meta']['package']} documents "
        "never seen in training). Equal memory: the hybrid holds (W - 1 + S)(D + Dv) + F(Dv + 1) = "
        f"{floats} floats per key/value head (D = Dv = 64); the band baseline (W' + S)(D + Dv) with the smallest "
        f"such W' = {wp}.",
        f"Stage 1: `fitting.distill(loss={args.loss!r})`, {args.steps1} Adam steps per layer at lr {args.lr1} on "
        f"{args.fit_seqs} x {args.fit_len} training tokens. Stage 2: `fitting.finetune(target='logits', "
        f"train='lora', lora_rank={args.lora_rank})`, {args.steps2} AdamW steps at lr {args.lr2}, {args.fit_batch} "
        f"sequence(s) of {args.fit_len} tokens per step (stage 1 too) from {args.fit_seqs} training sequences.",
    ]
    rows = []

    def stage(label, seconds):
        rows.append(_row(f"{name}, {label}", evaluate(model, base_lps, held), orig["ppl"], seconds))
        write(out, args, head, rows, notes)
        log(rows[-1])
        if args.save is not None and label != "after convert":
            # saved after each fitting stage, so a run stopped in stage 2 keeps its stage-1 model
            from spectraformer_fused.linearize import save_linearized

            save_linearized(model, args.save, task="causal-lm", convert_args=kwargs, tokenizer=tok)
            log(f"saved ({label}) to {args.save}")

    stage("after convert", None)
    batches = _batches(corpus["train"], args.fit_seqs, args.fit_len, seed=1, batch=args.fit_batch)
    if args.steps1 > 0:
        t0 = time.perf_counter()
        fitting.distill(model, batches, steps=args.steps1, lr=args.lr1, loss=args.loss)
        model.eval()
        stage("after stage 1", time.perf_counter() - t0)
    if args.steps2 > 0:
        t0 = time.perf_counter()
        teacher_batches = [{"input_ids": b["input_ids"]} for b in batches]
        fitting.finetune(
            model,
            base,
            teacher_batches,
            steps=args.steps2,
            lr=args.lr2,
            target="logits",
            train="lora",
            lora_rank=args.lora_rank,
        )
        model.eval()
        stage("after stage 2", time.perf_counter() - t0)
    lens = [int(x) for x in args.passkey_lens.split(",") if x]
    if lens:
        t0 = time.perf_counter()
        hits = passkey(model, tok, lens, args.trials)
        notes.append(
            "Passkey retrieval of the final row (the prompts, keys and depths of `bench/report/real_lm.py`'s "
            f"passkey stage, {args.trials} trials per length, greedy): "
            + ", ".join(f"{hits[n]}/{args.trials} at {n} tokens" for n in lens)
            + f" ({time.perf_counter() - t0:.0f} s)."
        )
        write(out, args, head, rows, notes)


if __name__ == "__main__":
    main()
