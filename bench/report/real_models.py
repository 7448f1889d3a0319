"""The "real models" section: every measured row of SmolLM2-135M-Instruct linearized, in one place.

Nothing is measured here. The rows come from the result files of the real-model scripts in
``bench/results/``:

* ``real-lm-fit-*.md`` (``bench/report/real_lm_fit.py``): per hybrid configuration, held-out perplexity
  after convert, stage 1 and stage 2, each beside the band baseline of equal state memory from the same run;
* ``real-lm-cache-*.md`` (``bench/report/real_lm_cache.py``) and the passkey sections of ``real-lm-*.md``
  (``bench/report/real_lm.py``): passkey retrieval;
* ``real-lm-decode-*.md`` (``bench/report/real_lm.py decode``): ``generate()`` speed, the linearized model
  against the original at each prompt length and batch, both from the same run.

    python -m bench.report.real_models [--results DIR] [--out FILE]

Every row links the file it comes from (date, device, command and load are in that file's header). The
ratios in the goal lines are computed from rows of one file each, never across files.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re

from ..common import RESULTS

FIT = re.compile(r"^real-lm-fit-\d{4}-\d{2}-\d{2}.*\.md$")
CACHE = re.compile(r"^real-lm-cache-\d{4}-\d{2}-\d{2}.*\.md$")
DECODE = re.compile(r"^real-lm-decode-\d{4}-\d{2}-\d{2}.*\.md$")
EVAL = re.compile(r"^real-lm-\d{4}-\d{2}-\d{2}.*\.md$")  # bench/report/real_lm.py's eval (convert only)
SINKS = re.compile(r" S=(\d+)")
CONFIG = re.compile(r"^hybrid (?P<cfg>.+?), (?P<stage>after convert|after stage 1|after stage 2)$")
BAND = re.compile(r"^band softmax W'=(?P<w>\d+) S=(?P<s>\d+)(?P<eq> \(equal memory\))?$")
STAGE1 = re.compile(r"(\d+) Adam steps per layer at lr \S+ on (\d+) x (\d+) training tokens")
STAGE2 = re.compile(r"Stage 2: .*?, (\d+) AdamW steps")
PASSKEY_NOTE = re.compile(r"Passkey retrieval of the final row[^:]*: (?P<hits>[^(]+)\(")


def tables(lines: list[str]) -> list[list[dict]]:
    """The markdown tables of a file, each a list of rows ``{column: cell}``."""
    out, head, rows = [], None, []
    for line in lines + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if head is None:
                head = cells
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(dict(zip(head, cells)))
            continue
        if head is not None:
            out.append(rows)
        head, rows = None, []
    return out


def _read(results: str, name: str) -> list[str]:
    with open(os.path.join(results, name)) as f:
        return f.read().splitlines()


def _files(results: str, pattern: re.Pattern) -> list[str]:
    return sorted(n for n in os.listdir(results) if pattern.match(n))


def fit_rows(results: str) -> tuple[list[list[str]], list[str]]:
    """One row per stage of every ``real-lm-fit`` file, with that file's equal-memory band; and a goal line per
    hybrid configuration: its best row over the files against the band of that row's own run."""
    rows, best = [], {}
    for name in _files(results, FIT):
        lines = _read(results, name)
        body = [r for t in tables(lines) for r in t if "ppl / orig" in r]
        band = next((r for r in body if (m := BAND.match(r["row"])) and m.group("eq")), None)
        hybrid = [r for r in body if CONFIG.match(r["row"])]
        if band is None or not hybrid:
            continue
        bm = BAND.match(band["row"])
        hits = next((m.group("hits").strip().rstrip(",") for ln in lines if (m := PASSKEY_NOTE.search(ln))), "")
        s1 = next((m for ln in lines if (m := STAGE1.search(ln))), None)
        s2 = next((m for ln in lines if (m := STAGE2.search(ln))), None)
        fit = f"stage 1: {s1.group(1)} steps/layer, {s1.group(2)} x {s1.group(3)} tokens" if s1 else ""
        fit += f"; stage 2: {s2.group(1)} steps" if s2 else ""
        base = float(band["ppl / orig"])
        for r in hybrid:
            m = CONFIG.match(r["row"])
            ratio = float(r["ppl / orig"])
            rows.append(
                [
                    m.group("cfg"),
                    fit if m.group("stage") != "after convert" else "",
                    m.group("stage"),
                    r["ppl / orig"],
                    r["top-1 agree"],
                    r["KL nats/tok"],
                ]
                + [r["stage s"], f"W'={bm.group('w')} S={bm.group('s')}: {band['ppl / orig']}"]
                + ["yes" if ratio < base else "no", hits if r is hybrid[-1] else "", f"[{name}]({name})"]
            )
            if m.group("cfg") not in best or ratio < best[m.group("cfg")][0]:
                best[m.group("cfg")] = (ratio, base, m.group("stage"), name)
    goals = [
        f"- {cfg}: best {ratio:.3f}x the original ({stage}) against {base:.3f}x for the equal-memory band of the "
        f"same run ({'below it' if ratio < base else 'not below it'}); <= 1.10x: "
        f"{'met' if ratio <= 1.10 else 'not met'} ([{name}]({name}))"
        for cfg, (ratio, base, stage, name) in sorted(best.items())
    ]
    return rows, goals


def convert_rows(results: str) -> list[list[str]]:
    """The hybrid rows of ``real_lm.py``'s eval (after convert, no fitting: every window and sinks setting it
    measured), each with the band its equal-memory table names (same run)."""
    rows = []
    for name in _files(results, EVAL):
        ts = tables(_read(results, name))
        body = [r for t in ts for r in t if "ppl / orig" in r]
        wprime = {r["hybrid"]: r["W'"] for t in ts for r in t if "W'" in r and "hybrid" in r}
        for r in body:
            if not r["row"].startswith("hybrid ") or r["row"] not in wprime:
                continue
            m = SINKS.search(r["row"])
            s = m.group(1) if m else "0"
            band = next((b for b in body if b["row"].startswith(f"band softmax W'={wprime[r['row']]} S={s}")), None)
            if band is None:
                continue
            below = "yes" if float(r["ppl / orig"]) < float(band["ppl / orig"]) else "no"
            rows.append(
                [
                    r["row"][len("hybrid ") :],
                    "",
                    "after convert",
                    r["ppl / orig"],
                    r["top-1 agree"],
                    r["KL nats/tok"],
                    "",
                ]
                + [f"W'={wprime[r['row']]} S={s}: {band['ppl / orig']}", below, "", f"[{name}]({name})"]
            )
    return rows


def passkey_rows(results: str) -> tuple[list[int], list[list[str]]]:
    """Every passkey row of the ``real-lm-cache`` files, one column per prompt length ('' where not run)."""
    found = []
    for name in _files(results, CACHE):
        for t in tables(_read(results, name)):
            for r in t:
                lens = {int(k.split()[1]): v for k, v in r.items() if k.startswith("passkey ") and k[8:].isdigit()}
                if lens:
                    found.append((r["row"], lens, r.get("ppl / orig", ""), r.get("cache MiB", ""), name))
    lengths = sorted({n for _, lens, *_ in found for n in lens})
    rows = [
        [row] + [lens.get(n, "") for n in lengths] + [ratio, mib, f"[{name}]({name})"]
        for row, lens, ratio, mib, name in found
    ]
    return lengths, rows


def decode_rows(results: str) -> tuple[list[list[str]], list[str]]:
    """Per (T, B) of the newest ``real-lm-decode`` file: the original's and the hybrid's tokens per second
    and their ratio (both rows of that one run)."""
    names = _files(results, DECODE)
    if not names:
        return [], []
    name = names[-1]
    rows, goals = [], []
    by = {}
    for t in tables(_read(results, name)):
        for r in t:
            if "decode tok/s" in r and r["decode tok/s"] not in ("", "-"):
                kind = "original" if r["row"].startswith("original") else "hybrid"
                by.setdefault((int(r["T"]), int(r["B"])), {})[kind] = r
    for (T, B), pair in sorted(by.items()):
        if "original" not in pair or "hybrid" not in pair:
            continue
        o, h = pair["original"], pair["hybrid"]
        ratio = float(h["decode tok/s"]) / float(o["decode tok/s"])
        cpu = float(o["CPU ms / step"]) / float(h["CPU ms / step"])
        rows.append(
            [str(T), str(B), o["decode tok/s"], h["decode tok/s"], f"{ratio:.2f}", f"{cpu:.2f}"]
            + [o["cache MiB"], h["cache MiB"], o["prefill s (B=1)"], h["prefill s (B=1)"], f"[{name}]({name})"]
        )
        need = {1: 1.5, 8: 3.0}.get(B)
        if T == 8192 and need is not None:
            goals.append(
                f"- decode at 8k, batch {B}: {ratio:.2f}x the original's tokens per second (CPU time per step: "
                f"{cpu:.2f}x); goal >= {need}x: {'met' if ratio >= need else 'not met'} ([{name}]({name}))"
            )
    return rows, goals


CACHE_ROW = re.compile(r", cache C=(?P<c>\d+)")


def cache_decode_rows(results: str) -> tuple[list[list[str]], list[str]]:
    """Per ``real-lm-cache`` file that has a no-cache row and cache rows with their ms / token: each cache
    row's time per generated token against that file's no-cache row (one run) and the commit it was measured
    on; a goal line for C = 64 from the files that record their commit (the older ones predate the compiled
    decoding step, and their rows stay in the table)."""
    rows, goals = [], []
    for name in _files(results, CACHE):
        lines = _read(results, name)
        commit = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("- commit:")), "not recorded")
        for t in tables(lines):
            base = next((r for r in t if r["row"].endswith(", no cache") and r.get("ms / token")), None)
            if base is None:
                continue
            for r in t:
                hit = CACHE_ROW.search(r["row"])
                if hit is None or not r.get("ms / token"):
                    continue
                ratio = float(r["ms / token"]) / float(base["ms / token"])
                cells = [r["row"], base["ms / token"], r["ms / token"], f"{ratio:.2f}", r.get("load", ""), commit]
                rows.append(cells + [f"[{name}]({name})"])
                if int(hit["c"]) == 64 and commit != "not recorded":
                    goals.append(
                        f"- decode with the exact cache at C = 64: {ratio:.2f}x the cache-free linearized model's time "
                        f"per token; goal <= 1.3x: {'met' if ratio <= 1.3 else 'not met'} ([{name}]({name}))"
                    )
    return rows, goals


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: str) -> list[str]:
    fits, fit_goals = fit_rows(results)
    fits = convert_rows(results) + fits
    lengths, keys = passkey_rows(results)
    dec, dec_goals = decode_rows(results)
    cdec, cdec_goals = cache_decode_rows(results)
    L = [
        "# Real models: SmolLM2-135M-Instruct linearized, every measured row",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (collected; measured in the linked files)",
        "- device: see each linked file (CPU runs on 2 cores; their loads are in their headers)",
        "- command: `python -m bench.report.real_models`",
        "",
        "Collected from the real-model result files in `bench/results/` by `bench/report/real_models.py`, which "
        "measures nothing. Each row links its file; the original, the bands and the hybrids of one file were "
        "measured in one run on the same held-out sequences (python3.11-doc documents never seen in training: 8 x "
        "1024 tokens in the fit and eval files; the passkey table's perplexity column is on the sequences its file "
        "names, often fewer).",
        "",
        "## Goals",
        "",
        *fit_goals,
        *dec_goals,
        *cdec_goals,
        "",
        "## Perplexity by configuration and stage",
        "",
        "Ratio to the original's held-out perplexity; agreement: greedy next-token agreement with the original; "
        "KL(original || row) per token; the stage's fitting time; the softmax band whose keys and values take the "
        "hybrid's state memory per key/value head (same run); below: the hybrid's ratio is below the band's; "
        "passkey: the final model of the run, where measured.",
        "",
        *table(
            [
                "hybrid",
                "fitting (planned)",
                "stage",
                "ppl / orig",
                "agree",
                "KL",
                "stage s",
                "equal-memory band",
                "below",
                "passkey",
                "file",
            ],
            fits,
        ),
        "",
        "## Passkey retrieval",
        "",
        "A 5-digit key at a random depth of filler text, 10 trials per length unless the file says otherwise, the "
        "same prompts in every file. Cache rows: the exact cache of `cache=C` (DESIGN.md section 9).",
        "",
        *table(["row"] + [f"passkey {n}" for n in lengths] + ["ppl / orig", "cache MiB", "file"], keys),
        "",
        "## Decoding: generate() after a prompt of T tokens",
        "",
        "Tokens per second of the original (SDPA, DynamicCache) and of the linearized model (RFCache), both rows "
        "of one run; the ratio of their CPU time per step beside it (less sensitive to other jobs on the cores).",
        "",
        *table(
            ["T", "B", "original tok/s", "hybrid tok/s", "ratio", "CPU-time ratio", "original cache MiB"]
            + ["hybrid cache MiB", "original prefill s", "hybrid prefill s", "file"],
            dec,
        ),
        "",
        "## Decoding with the exact cache",
        "",
        "Time per generated token of the linearized model with `cache=C` against the same model without it, both "
        "rows of one run (greedy generate() after a 1024-token prompt, batch 1; load: the file's load column).",
        "",
        *table(["row", "no cache ms / token", "ms / token", "ratio", "load", "commit", "file"], cdec),
    ]
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.results, f"real-models-{datetime.date.today():%Y-%m-%d}.md")
    text = "\n".join(markdown(args.results)) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
