"""Linearizing whole models: ``python -m bench.report.linearize``.

For each model and (component, weights) pair and window: the held-out metrics after ``convert``, after
attention transfer (stage 1, ``distill``) and after the model-level fine-tune (stage 2, ``finetune``), with
the time each stage took, through ``spectraformer_fused.linearize.linearize`` (the command's pipeline).

Models:
- ``tiny-bert``: a 2-layer BERT encoder (hidden 48, 3 heads) and ``tiny-llama``: a 2-layer Llama (hidden
  64, 4 query heads, 2 key/value heads), built here with random weights, then pre-trained with softmax
  attention for a few hundred steps on a synthetic copy language (``w1 .. wn = w1 .. wn``: masked-token
  prediction for BERT, next-token prediction for Llama), so that their attention is structured; a word
  -level tokenizer from the ``tokenizers`` package is saved beside each. The data are lines of the same
  language (``synthetic_lines``).
- ``--model DIR`` (repeatable): any local transformers model directory with a tokenizer, evaluated on
  ``--data FILE`` lines (nothing is downloaded).

``--build KIND DIR`` only builds a tiny model (and ``DIR/data.txt``) for the README's example.
Writes ``bench/results/linearize-<date>.md`` and ``.json`` (device, versions and date in the header).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import tempfile
import time

import torch

WORDS = tuple(
    "red blue green cat dog bird sat ran saw big small old new the a on in under over near far up down fast".split()
)
SPECIALS = ("[PAD]", "[UNK]", "[MASK]", "=")
KINDS = ("tiny-bert", "tiny-llama")
PAIRS = (("hedgehog", "learnable"), ("hyprf", "learnable"), ("posrf", "fastfood_learnable"))


def synthetic_lines(n: int, seed: int, lo: int = 4, hi: int = 4) -> list[str]:
    """``n`` lines ``w1 .. wk = w1 .. wk`` (k from lo to hi words of WORDS): the second half copies the first."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        out.append(" ".join(words + ["="] + words))
    return out


def build_tokenizer():
    """A word-level tokenizer over SPECIALS + WORDS (whitespace split), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


def _config(kind: str, vocab: int):
    from transformers import BertConfig, LlamaConfig

    if kind == "tiny-bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=96,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
    if kind == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )
    raise ValueError(f"unknown tiny model {kind!r}; valid names are {', '.join(KINDS)}")


def build_tiny(kind: str, out_dir: str, *, steps: int = 300, lr: float = 3e-3, seed: int = 0, lines: int = 200) -> dict:
    """Build, pre-train (softmax attention) and save a tiny model and its tokenizer in ``out_dir``; write
    ``lines`` training lines to ``out_dir/data.txt``. Returns ``{"loss": final pre-training loss, "time_s"}``."""
    from transformers import BertForMaskedLM, LlamaForCausalLM

    tok = build_tokenizer()
    config = _config(kind, len(tok))
    torch.manual_seed(seed)
    model = (BertForMaskedLM if kind == "tiny-bert" else LlamaForCausalLM)(config)
    model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    loss = torch.zeros(())
    model.train()
    for step in range(steps):
        enc = tok(synthetic_lines(32, seed=10_000 + step), padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        if kind == "tiny-bert":  # mask 25% of the real tokens, predict them
            hide = (torch.rand(ids.shape, generator=gen) < 0.25) & (mask == 1)
            labels = labels.masked_fill(~hide, -100)
            ids = ids.masked_fill(hide, tok.mask_token_id)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "data.txt"), "w") as f:
        f.write("\n".join(synthetic_lines(lines, seed=seed + 1)) + "\n")
    return {"loss": float(loss.detach()), "time_s": time.perf_counter() - t0}


def local_models() -> list[str]:
    """Transformers model directories in the local HuggingFace cache (snapshots with a config.json and a
    tokenizer); nothing is downloaded."""
    root = os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    found = []
    if os.path.isdir(root):
        for repo in sorted(os.listdir(root)):
            snaps = os.path.join(root, repo, "snapshots")
            for snap in sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []:
                d = os.path.join(snaps, snap)
                if os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, "tokenizer.json")):
                    found.append(d)
    return found


def _cell(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def main(argv=None) -> None:
    from spectraformer_fused.linearize import linearize

    from ..common import RESULTS, command_line, device_name

    p = argparse.ArgumentParser(prog="python -m bench.report.linearize", description=__doc__.split("\n\n")[0])
    p.add_argument("--build", nargs=2, metavar=("KIND", "DIR"), help=f"only build a tiny model ({', '.join(KINDS)})")
    p.add_argument("--model", action="append", default=[], metavar="DIR", help="a local model directory too")
    p.add_argument("--data", default=None, metavar="FILE", help="text lines for --model directories")
    p.add_argument("--windows", default="none", help="comma-separated windows, 'none' for no window (e.g. none,4)")
    p.add_argument("--steps-distill", type=int, default=60)
    p.add_argument("--steps-finetune", type=int, default=120)
    p.add_argument("--train", default="feature_maps,attention,lora", help="what stage 2 moves: comma-separated")
    p.add_argument("--lr-finetune", type=float, default=3e-3)
    p.add_argument("--num-features", type=int, default=32)
    p.add_argument("--held-out", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="one pair, few steps (a smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the models are tiny)")
    p.add_argument("--note", default=None, help="a line added to the header (e.g. which branches were merged)")
    p.add_argument("--out", default=None, help="results file stem (default bench/results/linearize-<date>)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # on a busy machine, OpenMP barriers cost more than these products
    if args.build:
        info = build_tiny(args.build[0], args.build[1])
        print(f"built {args.build[0]} in {args.build[1]} (pre-training loss {info['loss']:.3f}, {info['time_s']:.1f}s)")
        return
    trains = [t.strip() for t in args.train.split(",")]
    windows = [None if w.strip().lower() == "none" else int(w) for w in args.windows.split(",")]
    pairs = PAIRS[:1] if args.quick else PAIRS
    steps_d, steps_f = (10, 20) if args.quick else (args.steps_distill, args.steps_finetune)
    import transformers

    import spectraformer_fused as sf

    now = datetime.datetime.now(datetime.timezone.utc)
    date = now.date().isoformat()
    device = device_name(torch.device("cpu"))
    header = (
        f"device: {device} | {torch.get_num_threads()} threads | torch {torch.__version__}, transformers "
        f"{transformers.__version__}, spectraformer_fused {sf.__version__} | {now:%Y-%m-%d %H:%M} UTC"
        f" | stage 1: {steps_d} Adam steps per layer, stage 2: {steps_f} AdamW steps at lr {args.lr_finetune}"
        f" | m = {args.num_features}"
    )
    if args.note:
        header += f" | {args.note}"
    rows, notes, failed = [], [], set()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for kind in KINDS:
            d = os.path.join(tmp, kind)
            info = build_tiny(kind, d)
            models.append((kind, d, os.path.join(d, "data.txt")))
            notes.append(
                f"{kind}: pre-trained with softmax attention, final loss {info['loss']:.3f} ({info['time_s']:.1f}s)"
            )
        extra = args.model + local_models()
        if not extra:
            notes.append(
                "no pretrained model directory was found locally (HF cache empty, none given): tiny models only"
            )
        for d in extra:
            if args.data is None:
                notes.append(f"{d}: skipped (no --data FILE)")
                continue
            models.append((os.path.basename(os.path.normpath(d)), d, args.data))
        for name, d, data in models:
            for component, weights in pairs:
                for window, train in ((w, t) for w in windows for t in trains):
                    label = f"{name} {component} x {weights} window={window} train={train}"
                    if (name, component, weights, window) in failed:
                        continue  # the conversion itself failed: the other trains would fail the same way
                    print(f"== {label}", flush=True)
                    try:
                        rep = linearize(
                            d,
                            component=component,
                            weights=weights,
                            num_features=args.num_features,
                            window=window,
                            data=data,
                            steps_distill=steps_d,
                            steps_finetune=steps_f,
                            lr_finetune=args.lr_finetune,
                            train=train,
                            held_out=args.held_out,
                            batch_size=16,
                            verbose=False,
                        )
                    except (TypeError, ValueError) as exc:
                        failed.add((name, component, weights, window))
                        notes.append(
                            f"{name} {component} x {weights} window={window}: not run ({type(exc).__name__}: {exc})"
                        )
                        print(f"   not run: {exc}", flush=True)
                        continue
                    first = train == trains[0]  # convert and distill do not depend on train: listed once
                    for stage in ("convert", "distill", "finetune") if first else ("finetune",):
                        row = {
                            "model": name,
                            "task": rep["task"],
                            "component": component,
                            "weights": weights,
                            "window": window,
                            "stage": f"finetune ({train})" if stage == "finetune" else stage,
                            "time_s": round(rep["stages"][stage]["time_s"], 2),
                            **rep["stages"][stage]["metrics"],
                        }
                        rows.append(row)
                        print("   " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items()), flush=True)
    if any("argument 'window'" in n for n in notes):
        notes.append(
            "window runs: convert in this checkout has no window= keyword (it passes the unknown keyword on to "
            "the component, which refuses it); rerun with --windows none,W once convert takes window="
        )
    total = time.perf_counter() - t_all
    stem = args.out or os.path.join(RESULTS, f"linearize-{date}")
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"header": header, "total_s": total, "notes": notes, "rows": rows}, f, indent=2)
    command = command_line("bench.report.linearize", argv)
    lines = [f"# Linearizing whole models ({total:.0f} s)", "", header, "", f"Generated by `{command}`.", ""]
    for task, cols in (
        ("encoder", ["cosine", "nn_agreement", "hidden_mse"]),
        ("causal-lm", ["ppl", "teacher_ppl", "greedy_agreement", "kl"]),
    ):
        sel = [r for r in rows if r["task"] == task]
        if not sel:
            continue
        head = ["model", "component x weights", "window", "stage", *cols, "stage time (s)"]
        lines += [f"## {task}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for r in sel:
            vals = [r["model"], f"{r['component']} x {r['weights']}", str(r["window"]), r["stage"]]
            vals += [_cell(r[c]) for c in cols] + [_cell(r["time_s"])]
            lines.append("| " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
