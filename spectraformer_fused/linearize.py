"""Linearize a pretrained transformers model end to end: convert, attention transfer, fine-tune, save, evaluate.

``python -m spectraformer_fused.linearize MODEL_DIR --component C --weights W --num-features M --data FILE
--out DIR`` (``--help`` lists every option):

1. loads a local transformers model from MODEL_DIR (``AutoModelForCausalLM`` for causal LMs, ``AutoModel``
   for encoders; ``local_files_only``: no hub access) and its tokenizer (MODEL_DIR or ``--tokenizer``);
2. reads the text lines of FILE (blank lines skipped), holds ``--held-out`` of them out (a seeded shuffle)
   and tokenizes the rest into batches;
3. converts a copy of the model (``integrations.transformers.convert``; ``--window W``, ``--sinks S`` and
   ``--mix G`` are passed as ``convert(..., window=W, sinks=S, mix=G)``, each only when given), runs
   attention transfer (``fitting.distill``, stage 1: ``--distill-loss kl`` fits the attention weights,
   ``mse`` the attention outputs) and the model-level fine-tune (``fitting.finetune``, stage 2: final
   hidden states for encoders, next-token distributions for causal LMs) against the unconverted model;
4. evaluates after conversion, after stage 1 and after stage 2 on the held-out lines (encoders: mean cosine
   of the mean-pooled embeddings to the original's and nearest-neighbour agreement; causal LMs: perplexity
   of both models and greedy next-token agreement), with the time of every stage;
5. saves the model with ``save_pretrained`` (feature maps in its state_dict), the tokenizer, the conversion
   arguments (``linearize.json``) and the evaluation (``report.json``, ``report.md``) in DIR.

``load_linearized(DIR)`` loads the saved model again, converted, in one call. ``linearize(...)`` is the
same pipeline as a function (it returns the report).

Recommended for causal LMs (LoLCATs, Zhang et al. 2024): ``--component hedgehog --weights learnable
--num-features 64 --window 64 --sinks 4 --mix 0.1 --distill-loss mse --train lora --lora-rank 8`` (hybrid
attention: exact over the last 64 keys and the first 4, hedgehog features beyond, the exact part's factor
learned from 0.1; stage 1 on the attention outputs; stage 2 through rank-8 LoRA adapters on q, k, v, o).
``--preset lolcats`` fills in exactly these for every option not given on the command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time

import torch

from .cache import SCORES
from .fitting import FINETUNE_TRAIN, distill, finetune, output_loss
from .fitting import LOSSES as DISTILL_LOSSES
from .validation import check_cache_score, check_mix, check_sinks

META_FILE = "linearize.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TASKS = ("auto", "encoder", "causal-lm")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
STAGES = ("convert", "distill", "finetune")
# --preset: the settings it fills in (for the options not given on the command line)
PRESETS = {
    "lolcats": dict(
        component="hedgehog",
        weights="learnable",
        num_features=64,
        window=64,
        sinks=4,
        mix=0.1,
        distill_loss="mse",
        train="lora",
        lora_rank=8,
    ),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("linearize needs transformers>=5.0: pip install 'spectraformer_fused[hf]'") from exc
    return transformers


def _hf():
    from .integrations import transformers as hf

    return hf


# ----------------------------------------------------------------------------------------------------
# Loading the model, the tokenizer and the data
# ----------------------------------------------------------------------------------------------------


def _check_model_dir(model_dir) -> str:
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"the model directory must be a path, got {type(model_dir).__name__}")
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist (a local directory is needed: no hub access)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(
            f"{model_dir!r} has no config.json: it is not a transformers model directory (save one with save_pretrained)"
        )
    return model_dir


def model_task(config) -> str:
    """``"causal-lm"`` when the config names a causal-LM architecture (``*ForCausalLM``, ``*LMHeadModel``)
    or is a decoder, else ``"encoder"``."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or getattr(
        config, "is_decoder", False
    ):
        return "causal-lm"
    return "encoder"


def load_model(model_dir, *, task: str = "auto", dtype: torch.dtype = torch.float32):
    """(model, task) from a local directory: ``AutoModelForCausalLM`` for causal LMs, ``AutoModel`` for
    encoders (``task="auto"`` reads it from the config, see ``model_task``), in eval mode."""
    tf = _transformers()
    model_dir = _check_model_dir(model_dir)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid names are {', '.join(TASKS)}")
    config = tf.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    task = model_task(config) if task == "auto" else task
    cls = tf.AutoModelForCausalLM if task == "causal-lm" else tf.AutoModel
    model = cls.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    return model.eval(), task


def load_tokenizer(model_dir, tokenizer_dir=None):
    """The tokenizer of ``tokenizer_dir`` (default the model directory), with a padding token (the EOS
    token when it has none)."""
    tf = _transformers()
    where = os.fspath(model_dir if tokenizer_dir is None else tokenizer_dir)
    if not os.path.isdir(where):
        raise ValueError(f"tokenizer directory {where!r} does not exist")
    hint = "" if tokenizer_dir is not None else ": pass --tokenizer DIR (tokenizer=) with one"
    if not any(os.path.isfile(os.path.join(where, name)) for name in TOKENIZER_FILES):
        # transformers 5 would build a tokenizer with an empty vocabulary from the config alone
        raise ValueError(f"{where!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}){hint}")
    try:
        tok = tf.AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"no tokenizer could be loaded from {where!r}{hint} ({exc})") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer of {where!r} has neither a padding nor an EOS token to pad with")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def read_lines(path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the data file must be a path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"data file {os.fspath(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"data file {os.fspath(path)!r} holds no text (every line is blank)")
    return lines


def split_lines(lines: list[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines): a seeded shuffle, the first ``held_out`` lines held out."""
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 1:
        raise ValueError(f"held_out must be a positive int, got {held_out!r}")
    if held_out >= len(lines):
        raise ValueError(f"held_out={held_out} leaves no training line: the data has {len(lines)} non-blank lines")
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    return [lines[i] for i in order[held_out:]], [lines[i] for i in order[:held_out]]


def make_batches(tokenizer, lines: list[str], *, batch_size: int, max_length: int, device=None) -> list[dict]:
    """``{"input_ids", "attention_mask"}`` batches of ``batch_size`` lines, padded on the right to the
    longest line of each batch and truncated at ``max_length`` tokens."""
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    out = []
    for lo in range(0, len(lines), batch_size):
        enc = tokenizer(
            lines[lo : lo + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out.append({k: v.to(device) for k, v in batch.items()} if device is not None else batch)
    return out


def _distill_batches(model, batches: list[dict]) -> list[dict]:
    import inspect

    if "use_cache" in inspect.signature(model.forward).parameters:
        return [dict(b, use_cache=False) for b in batches]
    return batches


# ----------------------------------------------------------------------------------------------------
# Evaluation on held-out lines
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def _outputs(model, batch, task):
    kwargs = dict(batch)
    if task == "causal-lm":
        return model(**kwargs, use_cache=False).logits
    return model(**kwargs).last_hidden_state


def _pooled(hidden, mask):
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    e = torch.nn.functional.normalize(emb.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(-1)


@torch.no_grad()
def evaluate(model, teacher, batches: list[dict], task: str) -> dict:
    """Held-out metrics of ``model`` against ``teacher`` on ``batches``.

    Encoders: ``cosine`` (mean over texts of the cosine of the mean-pooled final hidden states to the
    teacher's), ``nn_agreement`` (the fraction of texts whose nearest neighbour among the held-out texts,
    by cosine of the pooled embeddings, is the same under both models) and ``hidden_mse`` (stage 2's
    objective). Causal LMs: ``ppl`` and ``teacher_ppl`` (perplexity of the next token at every kept
    position but the last), ``greedy_agreement`` (the fraction of those positions where both models' most
    likely next token agree) and ``kl`` (KL(teacher || model) per kept position: stage 2's objective)."""
    if task == "encoder":
        cos, pooled_s, pooled_t, mse, tokens = [], [], [], 0.0, 0
        for batch in batches:
            mask = batch["attention_mask"].bool()
            hs, ht = _outputs(model, batch, task), _outputs(teacher, batch, task)
            ps, pt = _pooled(hs, mask), _pooled(ht, mask)
            cos.append(torch.nn.functional.cosine_similarity(ps.double(), pt.double(), dim=-1))
            pooled_s.append(ps)
            pooled_t.append(pt)
            n = int(mask.sum())
            mse += float(output_loss(hs, ht, mask, "hidden")) * n
            tokens += n
        es, et = torch.cat(pooled_s), torch.cat(pooled_t)
        agree = float((_nearest(es) == _nearest(et)).double().mean()) if len(es) > 2 else float("nan")
        return {
            "cosine": float(torch.cat(cos).mean()),
            "nn_agreement": agree,
            "hidden_mse": mse / max(tokens, 1),
            "texts": len(es),
        }
    nll_s = nll_t = kl = 0.0
    agree = positions = kept = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        ls, lt = _outputs(model, batch, task), _outputs(teacher, batch, task)
        n = int(mask.sum())
        kl += float(output_loss(ls, lt, mask, "logits")) * n
        kept += n
        pred = mask[:, :-1] & mask[:, 1:]  # the next token is a real one
        target = ids[:, 1:][pred]
        for logits, acc in ((ls, "s"), (lt, "t")):
            logp = torch.log_softmax(logits[:, :-1][pred].double(), dim=-1)
            nll = -float(logp.gather(-1, target[:, None]).sum())
            if acc == "s":
                nll_s += nll
            else:
                nll_t += nll
        agree += int((ls[:, :-1].argmax(-1) == lt[:, :-1].argmax(-1))[pred].sum())
        positions += int(pred.sum())
    positions = max(positions, 1)
    return {
        "ppl": math.exp(nll_s / positions),
        "teacher_ppl": math.exp(nll_t / positions),
        "greedy_agreement": agree / positions,
        "kl": kl / max(kept, 1),
        "positions": positions,
    }


def held_out_error(metrics: dict) -> float:
    """Stage 2's objective on the held-out lines: ``hidden_mse`` (encoders) or ``kl`` (causal LMs)."""
    return metrics["hidden_mse"] if "hidden_mse" in metrics else metrics["kl"]


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------


def _feature_map_state(model) -> dict:
    attr = _hf().FEATURE_MAP_ATTR
    return {k: v for k, v in model.state_dict().items() if f".{attr}." in k}


def save_linearized(model, out_dir, *, task: str, convert_args: dict, tokenizer=None) -> None:
    """``model.save_pretrained(out_dir)`` (feature maps in the state_dict), the tokenizer when given, and
    ``linearize.json`` (the task, the dtype and the arguments of ``convert``) that ``load_linearized`` reads."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    dtype = next(model.parameters()).dtype
    meta = {"task": task, "dtype": str(dtype).replace("torch.", ""), "convert": convert_args}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def _saved_state(out_dir: str, keys) -> dict:
    """The tensors ``keys`` of the saved checkpoint (one safetensors file or a sharded index)."""
    from safetensors.torch import load_file

    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{out_dir!r} has no {name}: not a model saved by save_linearized")
        state.update({k: v for k, v in load_file(path).items() if k in keys})
    return state


def load_linearized(path, *, device=None):
    """Load a model saved by ``linearize`` (or ``save_linearized``): the transformers model of ``path``,
    converted with the saved arguments, its fitted feature maps loaded. Returns it in eval mode.

    ``model = spectraformer_fused.linearize.load_linearized("out/")``"""
    tf = _transformers()
    hf = _hf()
    path = _check_model_dir(path)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path!r} has no {META_FILE}: it was not saved by spectraformer_fused.linearize")
    with open(meta_path) as f:
        meta = json.load(f)
    hf.register()  # the saved config may name the "spectraformer" attention implementation
    cls = tf.AutoModelForCausalLM if meta["task"] == "causal-lm" else tf.AutoModel
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # the feature maps are "unused weights" until the model is converted
    try:
        model = cls.from_pretrained(path, local_files_only=True, dtype=DTYPES[meta["dtype"]])
    finally:
        tf.logging.set_verbosity(verbosity)
    hf.convert(model, **meta["convert"])
    wanted = _feature_map_state(model)
    state = _saved_state(path, set(wanted))
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"{path!r} lacks the feature-map tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    model.load_state_dict(state, strict=False)
    if device is not None:
        model.to(device)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def summary_markdown(report: dict) -> str:
    """The report as markdown: a header, the metrics per stage and the time of every stage."""
    c = report["convert_args"]
    lines = [
        f"# linearize {report['model_dir']}",
        "",
        f"task: {report['task']} | component {c['component']} x weights {c['weights']}, m = {c['num_features']}"
        f" | window: {c.get('window')} | sinks: {c.get('sinks')} | mix: {c.get('mix')} | stage 1 loss:"
        f" {report.get('distill_loss', 'kl')} | stage 2 trains: {report['train']} | {report['train_lines']} training"
        f" lines, {report['held_out_lines']} held out | {report['device']} | torch {report['versions']['torch']},"
        f" transformers {report['versions']['transformers']} | {report['date']}",
        "",
    ]
    metrics = list(report["stages"]["convert"]["metrics"])
    lines.append("| stage | " + " | ".join(metrics) + " | time (s) |")
    lines.append("|---" * (len(metrics) + 2) + "|")
    for stage in [*STAGES, *(["cache"] if "cache" in report["stages"] else [])]:
        row = report["stages"][stage]
        vals = [_fmt(row["metrics"][m]) for m in metrics]
        lines.append(f"| {stage} | " + " | ".join(vals) + f" | {row['time_s']:.1f} |")
    lines.append("")
    lines.append("times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["times_s"].items()))
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def linearize(
    model_dir,
    *,
    component: str,
    weights: str,
    num_features: int,
    data,
    out=None,
    window: int | None = None,
    sinks: int | None = None,
    mix: float | None = None,
    cache: int | None = None,
    cache_score: str | None = None,
    distill_loss: str = "kl",
    kernel: str = "softmax",
    tokenizer=None,
    task: str = "auto",
    dtype: str = "float32",
    steps_distill: int = 200,
    lr_distill: float = 1e-2,
    steps_finetune: int = 200,
    lr_finetune: float = 1e-3,
    train: str = "feature_maps",
    lora_rank: int = 8,
    held_out: int = 32,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    backend: str = "auto",
    verbose: bool = True,
) -> dict:
    """The whole pipeline (see the module docstring); returns the report (also written to ``out`` with the
    model when ``out`` is given).

    ``window`` (hybrid attention: exact over the last W keys), ``sinks`` (the first S keys exact too) and
    ``mix`` (a learned factor on the exact part, starting at this value: LoLCATs starts at 0.1; True is
    1.0) are passed to ``convert`` only when given, and saved with the conversion arguments, so that
    ``load_linearized`` rebuilds the same layers (the fitted factor comes back with the feature maps).
    ``distill_loss``: stage 1 fits the attention weights (``"kl"``) or the attention outputs (``"mse"``,
    LoLCATs), see ``fitting.distill``. ``cache`` (an exact cache of C keys, DESIGN.md section 9; needs a
    window) is an inference-time addition: the stages train and are evaluated without it, then it is switched
    on (``set_cache``), evaluated once more (stage ``"cache"``) and saved with the conversion arguments, so
    that ``load_linearized`` rebuilds the layers with it; ``cache_score`` chooses the keys it keeps
    (``rf_attention``'s; None: the default score) and is saved with it."""
    tf = _transformers()
    hf = _hf()
    model_dir = _check_model_dir(model_dir)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid names are {', '.join(DTYPES)}")
    if train not in FINETUNE_TRAIN:
        raise ValueError(f"unknown train {train!r}; valid names are {', '.join(FINETUNE_TRAIN)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid names are {', '.join(TASKS)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    sinks = check_sinks(sinks) or None
    mix = check_mix(mix)
    if cache is not None and (isinstance(cache, bool) or not isinstance(cache, int) or cache < 1):
        raise ValueError(f"cache must be a positive int or None, got {cache!r}")
    cache_score = check_cache_score(cache_score, cache or 0)
    if distill_loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown distill_loss {distill_loss!r}; valid names are {', '.join(DISTILL_LOSSES)}")
    train_lines, test_lines = split_lines(read_lines(data), held_out, seed)
    times = {}
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    tok = load_tokenizer(model_dir, tokenizer)
    teacher, task = load_model(model_dir, task=task, dtype=DTYPES[dtype])
    device = next(teacher.parameters()).device
    train_batches = make_batches(tok, train_lines, batch_size=batch_size, max_length=max_length, device=device)
    test_batches = make_batches(tok, test_lines, batch_size=batch_size, max_length=max_length, device=device)
    times["load"] = time.perf_counter() - t0
    _log(f"[load] {type(teacher).__name__} ({task}) from {model_dir}: {times['load']:.1f}s", verbose)

    convert_args = dict(component=component, weights=weights, num_features=num_features, kernel=kernel, seed=seed)
    convert_args["backend"] = backend
    if window is not None:
        convert_args["window"] = window
    if sinks is not None:
        convert_args["sinks"] = sinks
    if mix is not None:
        convert_args["mix"] = mix
    stages = {}
    t0 = time.perf_counter()
    student = hf.convert(copy.deepcopy(teacher), **convert_args)
    if cache is not None:  # refused here (a layer without a window, a bidirectional one) before any training
        hf.set_cache(hf.set_cache(student, cache), None)
    times["convert"] = time.perf_counter() - t0
    stages["convert"] = {"metrics": evaluate(student, teacher, test_batches, task), "time_s": times["convert"]}
    _log(f"[1/3 convert] {stages['convert']['metrics']}", verbose)

    t0 = time.perf_counter()
    curves = distill(
        student,
        _distill_batches(student, train_batches),
        steps=steps_distill,
        lr=lr_distill,
        loss=distill_loss,
        progress=verbose,
    )
    times["distill"] = time.perf_counter() - t0
    stages["distill"] = {"metrics": evaluate(student, teacher, test_batches, task), "time_s": times["distill"]}
    _log(f"[2/3 distill] {stages['distill']['metrics']}", verbose)

    t0 = time.perf_counter()
    target = "logits" if task == "causal-lm" else "hidden"
    curve = finetune(
        student,
        teacher,
        train_batches,
        steps=steps_finetune,
        lr=lr_finetune,
        target=target,
        train=train,
        lora_rank=lora_rank,
        progress=verbose,
    )
    times["finetune"] = time.perf_counter() - t0
    stages["finetune"] = {"metrics": evaluate(student, teacher, test_batches, task), "time_s": times["finetune"]}
    _log(f"[3/3 finetune] {stages['finetune']['metrics']}", verbose)
    if cache is not None:
        t0 = time.perf_counter()
        hf.set_cache(student, cache, score=cache_score)
        convert_args["cache"] = cache
        if cache_score is not None:
            convert_args["cache_score"] = cache_score
        stages["cache"] = {"metrics": evaluate(student, teacher, test_batches, task)}
        stages["cache"]["time_s"] = time.perf_counter() - t0
        _log(f"[cache {cache}] {stages['cache']['metrics']}", verbose)

    report = {
        "model_dir": model_dir,
        "task": task,
        "convert_args": convert_args,
        "train": train,
        "target": target,
        "distill_loss": distill_loss,
        "steps_distill": steps_distill,
        "steps_finetune": steps_finetune,
        "train_lines": len(train_lines),
        "held_out_lines": len(test_lines),
        "stages": stages,
        "distill_final_loss": {name: c[-1] for name, c in curves.items() if c},
        "finetune_curve": curve,
        "device": _device_name(device),
        "versions": {"torch": torch.__version__, "transformers": tf.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "times_s": times,
    }
    if out is not None:
        t0 = time.perf_counter()
        save_linearized(student, out, task=task, convert_args=convert_args, tokenizer=tok)
        times["save"] = time.perf_counter() - t0
        _log(f"[save] {out}: {times['save']:.1f}s", verbose)
        with open(os.path.join(out, REPORT_JSON), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, REPORT_MD), "w") as f:
            f.write(summary_markdown(report))
    report["model"] = student
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spectraformer_fused.linearize",
        description=(
            "Linearize a local transformers model: convert its attention to random-feature attention, fit the "
            "feature maps to the softmax attention they replace (stage 1), fine-tune the converted model to "
            "match the original's outputs (stage 2), save it and evaluate it on held-out lines of the data. "
            "Load the result with spectraformer_fused.linearize.load_linearized(OUT)."
        ),
        epilog=(
            "Recommended for causal LMs (LoLCATs): --component hedgehog --weights learnable --num-features 64 "
            "--window 64 --sinks 4 --mix 0.1 --distill-loss mse --train lora --lora-rank 8, which --preset lolcats "
            "fills in (for every option not given)."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model directory (no hub access)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="fill in recommended settings for the options not given (lolcats: see below)",
    )
    p.add_argument("--component", help="feature-map component (e.g. hedgehog, hyprf, posrf); required without --preset")
    p.add_argument(
        "--weights", help="weight matrix (learnable or fastfood_learnable to fit); required without --preset"
    )
    p.add_argument(
        "--num-features", type=int, metavar="M", help="number of random features m; required without --preset"
    )
    p.add_argument("--window", type=int, default=None, metavar="W", help="exact attention over the last W keys")
    p.add_argument(
        "--sinks", type=int, default=None, metavar="S", help="attention sinks: the first S keys exact too (LoLCATs: 4)"
    )
    p.add_argument(
        "--cache",
        type=int,
        default=None,
        metavar="C",
        help="an exact cache of the C keys the features represent worst (needs --window; applied after training)",
    )
    p.add_argument(
        "--cache-score",
        default=None,
        choices=SCORES,
        help="which keys the cache keeps (default: kernel; recall keeps what retrieval needs on fitted models)",
    )
    p.add_argument(
        "--mix",
        type=float,
        nargs="?",
        const=1.0,
        default=None,
        metavar="G",
        help="a learned factor on the exact part (window, sinks), starting at G (default 1.0; LoLCATs: 0.1)",
    )
    p.add_argument(
        "--distill-loss",
        choices=DISTILL_LOSSES,
        default=None,
        help="stage 1 fits the attention weights (kl, the default) or the attention outputs (mse, LoLCATs)",
    )
    p.add_argument("--data", required=True, metavar="FILE", help="a text file, one example per line")
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the model and the report")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default MODEL_DIR)")
    p.add_argument("--task", choices=TASKS, default="auto", help="encoder or causal-lm (default: from the config)")
    p.add_argument("--kernel", default="softmax", help="the kernel the features estimate (default softmax)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--steps-distill", type=int, default=200, metavar="N", help="Adam steps per layer in stage 1")
    p.add_argument("--lr-distill", type=float, default=1e-2)
    p.add_argument("--steps-finetune", type=int, default=200, metavar="N", help="AdamW steps in stage 2")
    p.add_argument("--lr-finetune", type=float, default=1e-3)
    p.add_argument("--train", choices=FINETUNE_TRAIN, default=None, help="what stage 2 moves (default feature_maps)")
    p.add_argument("--lora-rank", type=int, default=None, help="rank of the LoRA adapters (--train lora; default 8)")
    p.add_argument("--held-out", type=int, default=32, metavar="N", help="lines held out for the evaluation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per line at most")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the split and the feature maps")
    p.add_argument("--backend", default="auto", help="rf_attention backend of the converted layers")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


_UNSET_DEFAULTS = dict(distill_loss="kl", train="feature_maps", lora_rank=8)


def resolve_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The options with ``--preset``'s settings for those not given, then the plain defaults; an error
    (argparse's) when --component, --weights or --num-features is missing without a preset."""
    preset = PRESETS[args.preset] if args.preset is not None else {}
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in _UNSET_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    missing = [f"--{n.replace('_', '-')}" for n in ("component", "weights", "num_features") if getattr(args, n) is None]
    if missing:
        p.error(f"the following arguments are required (or --preset): {', '.join(missing)}")
    return args


def main(argv=None) -> int:
    p = parser()
    args = resolve_args(p, p.parse_args(argv))
    try:
        report = linearize(
            args.model_dir,
            component=args.component,
            weights=args.weights,
            num_features=args.num_features,
            window=args.window,
            sinks=args.sinks,
            mix=args.mix,
            cache=args.cache,
            cache_score=args.cache_score,
            distill_loss=args.distill_loss,
            data=args.data,
            out=args.out,
            tokenizer=args.tokenizer,
            task=args.task,
            kernel=args.kernel,
            dtype=args.dtype,
            steps_distill=args.steps_distill,
            lr_distill=args.lr_distill,
            steps_finetune=args.steps_finetune,
            lr_finetune=args.lr_finetune,
            train=args.train,
            lora_rank=args.lora_rank,
            held_out=args.held_out,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            backend=args.backend,
            verbose=not args.quiet,
        )
    except (ValueError, TypeError, ImportError) as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    print(summary_markdown(report))
    print(f"saved to {args.out}: load it with spectraformer_fused.linearize.load_linearized({args.out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
