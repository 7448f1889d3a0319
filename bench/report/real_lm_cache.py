"""The exact cache on the real LM: passkey retrieval, held-out perplexity, memory and decode time per token.

SmolLM2-135M-Instruct (``bench/report/real_lm.py`` fetches the model, the corpus and writes the passkey
prompts) in these rows, all in one run on the same prompts and sequences:

* the original (SDPA and its KV cache);
* the softmax band: the last W keys + S sinks only (window + sinks, no features);
* the linearized model (``--model DIR``: a ``linearize.save_linearized`` directory, e.g. from
  ``bench/report/real_lm_fit.py --save``; else ``convert`` of posrf x orf m = 128, unfitted) without the
  cache and with ``set_cache(model, C)`` for each ``--caches`` C (DESIGN.md section 9's kernel score).

Columns: passkey accuracy per prompt length (a 5-digit key at a random depth of filler text, greedy, the
prompts, keys and depths of ``real_lm``'s passkey stage), held-out perplexity and its ratio to the
original, the cache's bytes after a 1024-token prompt (RFCache / DynamicCache tensors), and the time per
generated token after that prompt (greedy ``generate()``, batch 1).

    python -m bench.report.real_lm_cache --model ~/.cache/spectraformer_fused/models/smollm2-hedgehog-w64s4 \\
        --caches 16,64,256 --passkey-lens 1024,2048,4096 --trials 10

Writes ``bench/results/real-lm-cache-<date>.md`` (rewritten after every row) unless ``--out`` says otherwise.
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

from bench.common import source_commit
from bench.report.real_lm import (
    _decode_from,
    _logprobs,
    _prefill,
    load_model,
    log,
    make_hybrid,
    model_dir,
    prepare_corpus,
    prepare_model,
    set_band,
)
from bench.report.real_lm_fit import passkey

RESULTS = Path(__file__).resolve().parent.parent / "results"
COLUMNS = ["ppl", "ppl / orig", "cache MiB", "ms / token", "passkey s", "load"]  # after the passkey columns


@torch.no_grad()
def perplexity(model, held: torch.Tensor) -> float:
    """Held-out perplexity over the rows of ``held``; nan for none (``--seqs 0``: a decode-only run)."""
    if held.shape[0] == 0:
        return float("nan")
    nll, n = 0.0, 0
    for i in range(held.shape[0]):
        ids = held[i : i + 1]
        lp = _logprobs(model, ids)[:, :-1]
        nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
        n += ids.shape[1] - 1
    return float(torch.tensor(nll / n).exp())


def decode_cost(model, ids: torch.Tensor, new: int, repeats: int = 1) -> tuple[float, float]:
    """(cache MiB after the prompt and ``new`` tokens, ms per generated token: the median of ``repeats``
    generate() calls from the same prefill) at batch 1."""
    pre = _prefill(model, ids)
    runs = [_decode_from(model, ids, pre, 1, new) for _ in range(max(repeats, 1))]
    return runs[0]["cache"], sorted(r["ms_tok"] for r in runs)[len(runs) // 2]


@torch.no_grad()
def retention(hybrid, tok, scores: list[str], caches: list[int], n_tokens: int = 1024, min_mass: float = 0.1):
    """Which needle tokens the cache keeps, layer by layer, on one passkey prompt (the first trial's key and
    depth of ``passkey``): every layer gets the original model's q, k, v (``record_attention_inputs`` with
    the teacher), so the rows differ only in the cache's decisions. For each layer whose last query (the one
    that answers) puts at least ``min_mass`` of a query head's softmax weight on the key's digit tokens, the
    key/value head of that query head and, per score and C, how many of the digit tokens its cache holds
    after the prompt. Returns (the digit positions, rows, layers scanned)."""
    import random

    from bench.report.real_lm import passkey_prompt
    from spectraformer_fused import fitting
    from spectraformer_fused.ops.cpu.cache import cpu_cache_attention

    rng = random.Random(0)
    key, depth = rng.randint(10000, 99999), rng.random()
    ids = passkey_prompt(tok, n_tokens, depth, key)
    digits = [i for i, t in enumerate(ids[0].tolist()) if any(c.isdigit() for c in tok.decode([t]))]
    recs = fitting.record_attention_inputs(hybrid, [{"input_ids": ids, "use_cache": False}], teacher=True)
    maps = {name: mod.rf_feature_map for name, mod in hybrid.named_modules() if hasattr(mod, "rf_feature_map")}
    rows = []
    for li, name in enumerate(recs):
        r = recs[name][0]
        q, k, v = r.q.float(), r.k.float(), r.v.float()
        G = q.shape[2] // k.shape[2]
        logits = torch.einsum("bhd,bthd->bht", q[:, -1], k.repeat_interleave(G, 2)) * r.scale
        mass = logits.softmax(-1)[0][:, digits].sum(-1)  # [H]
        head = int(mass.argmax())
        if float(mass[head]) < min_mass:
            continue
        kv = head // G
        p = maps[name].feature_params(q, k, scale=r.scale, causal=True)
        kept = []
        for sc in scores:
            for c in caches:
                _, st = cpu_cache_attention(
                    q,
                    k,
                    v,
                    p,
                    causal=True,
                    window=r.window,
                    sinks=r.sinks or 0,
                    cache=c,
                    output_final_state=True,
                    score=sc,
                )
                held = st.k_cache[0, kv][st.cache_keep[0]]  # [kept, D]
                at = torch.cdist(held, k[0, :, kv]).argmin(-1).tolist() if held.numel() else []
                kept.append(len(set(at) & set(digits)))
        rows.append((li, head, float(mass[head]), kept))
    return digits, rows, len(recs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a linearized model directory (else posrf x orf, unfitted)")
    p.add_argument("--window", type=int, default=64, help="window of the band row and of the unfitted hybrid")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--caches", default="16,64,256")
    p.add_argument("--passkey-lens", default="1024,2048,4096")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument(
        "--seqs", type=int, default=4, help="held-out sequences of 1024 tokens for the perplexity (0: not measured)"
    )
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--decode-repeats", type=int, default=1, help="generate() calls per row; ms / token is their median")
    p.add_argument(
        "--score", default=None, help="the cache's score (spectraformer_fused.cache.SCORES; default: its default)"
    )
    p.add_argument(
        "--baselines",
        default="original,band,nocache",
        help="which rows besides the cached ones to run: any of original, band, nocache (comma-separated; '' none)",
    )
    p.add_argument(
        "--retention",
        default="",
        help="instead of the rows: which needle tokens each score's cache keeps in the layers that retrieve, "
        "for these scores (comma-separated, e.g. kernel,recall,recall_other) at each of --caches",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from spectraformer_fused import cache as cache_mod

    if args.score is not None and args.score not in cache_mod.SCORES:
        p.error(f"--score {args.score!r}: valid scores are {', '.join(cache_mod.SCORES)}")
    baselines = {x for x in args.baselines.split(",") if x}
    if baselines - {"original", "band", "nocache"}:
        p.error(f"--baselines: unknown rows {sorted(baselines - {'original', 'band', 'nocache'})}")
    torch.set_num_threads(args.threads)
    prepare_model()
    from transformers import AutoTokenizer

    from spectraformer_fused.integrations.transformers import set_cache

    tok = AutoTokenizer.from_pretrained(model_dir())
    corpus = prepare_corpus(tok)
    held = corpus["heldout"][: args.seqs]
    lens = [int(x) for x in args.passkey_lens.split(",") if x]
    caches = [int(x) for x in args.caches.split(",") if x]
    base = load_model(model_dir())
    band = copy.deepcopy(base)
    set_band(band, args.window, args.sinks)
    if args.model is not None:
        from spectraformer_fused.linearize import load_linearized

        hybrid, label = load_linearized(str(args.model)), f"linearized ({args.model.name})"
    else:
        spec = dict(component="posrf", weights="orf", m=128, window=args.window, sinks=args.sinks)
        hybrid, label = make_hybrid(base, spec), f"posrf x orf m=128 W={args.window} S={args.sinks}, unfitted"
    if args.retention:
        write_retention(args, tok, hybrid, label, caches)
        return
    score = args.score or cache_mod.DEFAULT_SCORE  # set_cache(score=) below; None would be this default
    rows_spec = [("original (SDPA)", base, None)] if "original" in baselines else []
    rows_spec += [(f"band softmax W'={args.window} S={args.sinks}", band, None)] if "band" in baselines else []
    rows_spec += [(f"{label}, no cache", hybrid, 0)] if "nocache" in baselines else []
    rows_spec += [(f"{label}, cache C={c}, score {score}", hybrid, c) for c in caches]
    prompt = corpus["heldout"].flatten()[:1024][None]
    out = args.out or RESULTS / f"real-lm-cache-{datetime.date.today():%Y-%m-%d}.md"
    rows = []
    # the perplexity ratio's denominator: the original's, measured here even when its row is not run
    orig_ppl = None if "original" in baselines else perplexity(base, held)
    t_all = time.perf_counter()
    for name, model, cache in rows_spec:
        if cache is not None:
            set_cache(model, cache or None, score=args.score if cache else None)
        t0 = time.perf_counter()
        hits = passkey(model, tok, lens, args.trials)
        t_pk = time.perf_counter() - t0
        ppl = perplexity(model, held)
        orig_ppl = orig_ppl or ppl
        mib, ms = decode_cost(model, prompt, args.new_tokens, args.decode_repeats)
        cells = [name] + [f"{hits[n]}/{args.trials}" for n in lens]
        cells += ["-", "-"] if ppl != ppl else [f"{ppl:.2f}", f"{ppl / orig_ppl:.3f}"]  # nan: --seqs 0
        cells += [f"{mib:.2f}", f"{ms:.1f}", f"{t_pk:.0f}", f"{os.getloadavg()[0]:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
        log(rows[-1])
        write(out, args, lens, rows, time.perf_counter() - t_all)


def _header(args, title: str, seconds: float) -> list[str]:
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- command: `python -m bench.report.real_lm_cache {' '.join(sys.argv[1:])}`",
        f"- commit: {source_commit()}",
        f"- total {seconds:.0f} s so far; load: the 1-minute load average when the row finished (above 2: other "
        "processes shared the cores, and the times are upper bounds)",
        "",
    ]


def write_retention(args, tok, hybrid, label: str, caches: list[int]) -> None:
    scores = [x for x in args.retention.split(",") if x]
    from spectraformer_fused import cache as cache_mod

    bad = [x for x in scores if x not in cache_mod.SCORES]
    if bad:
        raise ValueError(f"--retention: unknown scores {bad}; valid: {', '.join(cache_mod.SCORES)}")
    t0 = time.perf_counter()
    digits, rows, n_layers = retention(hybrid, tok, scores, caches)
    cols = [f"{sc} C={c}" for sc in scores for c in caches]
    mean = [sum(r[3][i] for r in rows) / max(len(rows), 1) for i in range(len(cols))]
    out = args.out or RESULTS / f"real-lm-cache-retention-{datetime.date.today():%Y-%m-%d}.md"
    text = _header(
        args, "Which needle tokens the exact cache keeps in the layers that retrieve", time.perf_counter() - t0
    )
    text += [
        f"Model: {label}. One passkey prompt of 1024 tokens (the "
        f"first trial's key and depth); its key's {len(digits)} digit tokens at positions {digits}. Every layer "
        "gets the original model's q, k, v, so the columns differ only in the cache's decisions "
        "(`ops/cpu/cache.py`, the window and sinks of the model). Rows: the layers (of "
        f"{n_layers}) whose last query, the one that answers, puts >= 0.1 of a query head's softmax weight on the "
        "digit tokens; columns: how many of the digit tokens the cache of that head's key/value head holds after "
        "the prompt, per score and C.",
        "",
        "| layer | query head | its weight on the digits | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
        *(f"| {li} | {h} | {m:.2f} | " + " | ".join(str(x) for x in kept) + " |" for li, h, m, kept in rows),
        "| mean | | | " + " | ".join(f"{x:.1f}" for x in mean) + " |",
    ]
    out.write_text("\n".join(text) + "\n")
    log(f"retention written to {out}")


def write(out: Path, args, lens, rows, seconds) -> None:
    text = _header(args, "The exact cache on SmolLM2-135M-Instruct: passkey, perplexity, memory, decode time", seconds)
    text += [
        f"Passkey: {args.trials} trials per length (the same keys, depths and prompts for every row). Perplexity: "
        f"{args.seqs} held-out sequences of 1024 tokens, with the cache in the prefill. Cache MiB and ms / token: "
        f"greedy generate() of {args.new_tokens} tokens after a 1024-token held-out prompt at batch 1 (the cache's "
        f"tensors at the end; wall time per token, the median of {args.decode_repeats} calls). The band row is the original model under a band mask: its "
        "cache column is the whole DynamicCache it keeps, not the (W + S) keys a band needs.",
        "",
        "| " + " | ".join(["row"] + [f"passkey {n}" for n in lens] + COLUMNS) + " |",
        "|---|" + "---|" * (len(lens) + len(COLUMNS)),
        *rows,
    ]
    out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
