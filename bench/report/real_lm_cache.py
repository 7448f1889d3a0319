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


@torch.no_grad()
def perplexity(model, held: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for i in range(held.shape[0]):
        ids = held[i : i + 1]
        lp = _logprobs(model, ids)[:, :-1]
        nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
        n += ids.shape[1] - 1
    return float(torch.tensor(nll / n).exp())


def decode_cost(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(cache MiB after the prompt and ``new`` tokens, ms per generated token) at batch 1."""
    pre = _prefill(model, ids)
    r = _decode_from(model, ids, pre, 1, new)
    return r["cache"], r["ms_tok"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a linearized model directory (else posrf x orf, unfitted)")
    p.add_argument("--window", type=int, default=64, help="window of the band row and of the unfitted hybrid")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--caches", default="16,64,256")
    p.add_argument("--passkey-lens", default="1024,2048,4096")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seqs", type=int, default=4, help="held-out sequences of 1024 tokens for the perplexity")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
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
    rows_spec = [("original (SDPA)", base, None), (f"band softmax W'={args.window} S={args.sinks}", band, None)]
    rows_spec += [(f"{label}, no cache", hybrid, 0)] + [(f"{label}, cache C={c}", hybrid, c) for c in caches]
    prompt = corpus["heldout"].flatten()[:1024][None]
    out = args.out or RESULTS / f"real-lm-cache-{datetime.date.today():%Y-%m-%d}.md"
    rows, orig_ppl = [], None
    t_all = time.perf_counter()
    for name, model, cache in rows_spec:
        if cache is not None:
            set_cache(model, cache or None)
        t0 = time.perf_counter()
        hits = passkey(model, tok, lens, args.trials)
        t_pk = time.perf_counter() - t0
        ppl = perplexity(model, held)
        orig_ppl = orig_ppl or ppl
        mib, ms = decode_cost(model, prompt, args.new_tokens)
        rows.append(
            f"| {name} | "
            + " | ".join(f"{hits[n]}/{args.trials}" for n in lens)
            + f" | {ppl:.2f} | {ppl / orig_ppl:.3f} | {mib:.2f} | {ms:.1f} | {t_pk:.0f} | {os.getloadavg()[0]:.1f} |"
        )
        log(rows[-1])
        write(out, args, lens, rows, time.perf_counter() - t_all)


def write(out: Path, args, lens, rows, seconds) -> None:
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    text = [
        "# The exact cache on SmolLM2-135M-Instruct: passkey, perplexity, memory, decode time",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- command: `python -m bench.report.real_lm_cache {' '.join(sys.argv[1:])}`",
        f"- total {seconds:.0f} s so far; load: the 1-minute load average when the row finished (above 2: other "
        "processes shared the cores, and the times are upper bounds)",
        "",
        f"Passkey: {args.trials} trials per length (the same keys, depths and prompts for every row). Perplexity: "
        f"{args.seqs} held-out sequences of 1024 tokens, with the cache in the prefill. Cache MiB and ms / token: "
        f"greedy generate() of {args.new_tokens} tokens after a 1024-token held-out prompt at batch 1 (the cache's "
        "tensors at the end; wall time per token). The band row is the original model under a band mask: its "
        "cache column is the whole DynamicCache it keeps, not the (W + S) keys a band needs.",
        "",
        "| row | " + " | ".join(f"passkey {n}" for n in lens) + " | ppl | ppl / orig | cache MiB | ms / token | "
        "passkey s | load |",
        "|---|" + "---|" * (len(lens) + 6),
        *rows,
    ]
    out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
