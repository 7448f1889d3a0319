"""Training the task model (``bench/tasks/model.py``) on a generated task: a task's settings and data
on the training device, one seeded training run (AdamW, warm-up then cosine decay, clipping) with its
learning curve, time per step and cost breakdown, and the summary of a pair's runs over seeds. The
report's section 5 and its CLI (``python -m bench.report.train``) size the tasks and write the tables.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import common
from ..timing import sync, time_fn, timed
from .listops import NUM_CLASSES, ListOpsConfig, listops_splits
from .listops import VOCAB as LISTOPS_VOCAB
from .model import ModelConfig, TaskModel
from .mqar import IGNORE, mqar_splits


@dataclass(frozen=True)
class TaskSettings:
    task: str
    data: object  # ListOpsConfig or MQARConfig
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    evals: int = 8  # validation points on the learning curve
    model: ModelConfig = ModelConfig()


class TaskData:
    """A task's splits on the training device, batches and accuracy."""

    def __init__(self, ts: TaskSettings, device: torch.device, data_seed: int = 0):
        self.ts, self.device = ts, device
        if isinstance(ts.data, ListOpsConfig):
            splits = listops_splits(ts.data, data_seed)
            self.vocab, self.outputs, self.causal = len(LISTOPS_VOCAB), NUM_CLASSES, False
            self.chance_note = "majority class of the test set"
            y = splits["test"][1]
            self.chance = float(torch.bincount(y, minlength=NUM_CLASSES).max()) / len(y)
        else:
            splits = mqar_splits(ts.data, data_seed)
            self.vocab, self.outputs, self.causal = ts.data.vocab_size, ts.data.vocab_size, True
            self.chance_note = "1 / num_pairs (a value seen in the sequence, picked at random)"
            self.chance = 1.0 / ts.data.num_pairs
            if ts.data.vocab_size > 32767:
                raise ValueError(f"MQAR vocab_size must be <= 32767, got {ts.data.vocab_size}")
        # Token ids fit int16 (ListOps 16, MQAR <= 32767); full ListOps is 96000 x 1999 tokens.
        self.splits = {k: (x.to(device=device, dtype=torch.int16), y.to(device)) for k, (x, y) in splits.items()}
        self.max_len = max(x.shape[1] for x, _ in self.splits.values())

    def _inputs(self, x):
        x = x.long()
        if self.causal:
            return x, None
        mask = x != 0  # ListOps: id 0 is padding
        T = int(mask.sum(1).max())
        return x[:, :T], mask[:, :T]

    def loss_and_correct(self, model, x, y):
        ids, mask = self._inputs(x)
        logits = model(ids, mask)
        if self.causal:
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            keep = y != IGNORE
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
            correct = (logits.argmax(-1)[keep] == y[keep]).sum()
            return loss, correct, keep.sum()
        loss = F.cross_entropy(logits, y)
        return loss, (logits.argmax(-1) == y).sum(), torch.tensor(y.numel())

    def batch(self, gen: torch.Generator):
        x, y = self.splits["train"]
        idx = torch.randint(0, x.shape[0], (self.ts.batch_size,), generator=gen).to(x.device)
        return x[idx], y[idx]

    @torch.no_grad()
    def accuracy(self, model, split: str, batch_size: int = 256) -> float:
        model.eval()
        x, y = self.splits[split]
        correct = total = 0
        for i in range(0, x.shape[0], batch_size):
            _, c, n = self.loss_and_correct(model, x[i : i + batch_size], y[i : i + batch_size])
            correct += int(c)
            total += int(n)
        model.train()
        return correct / max(total, 1)


def lr_factor(step: int, steps: int, warmup_frac: float) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to 0."""
    warm = max(1, int(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def default_backend(device: torch.device) -> str:
    """Triton on CUDA; the reference on the CPU (the compiled CPU backend recomputes its backward through the
    reference, so training gains nothing from it, and it would be built on first use)."""
    return "auto" if device.type == "cuda" else "reference"


def build_model(pair: str, data: TaskData, seed: int, backend: str) -> TaskModel:
    torch.manual_seed(seed)
    return TaskModel(
        pair, data.vocab, data.outputs, data.max_len, data.causal, seed, cfg=data.ts.model, backend=backend
    ).to(data.device)


def train_one(
    pair: str,
    data: TaskData,
    seed: int,
    *,
    steps: int | None = None,
    backend: str = "auto",
    redraw_every: int = 0,
    bar=None,
    measure: bool = True,
) -> dict:
    """Train one model; returns test accuracy, the learning curve, time per step and (``measure``) the cost
    breakdown: attention forward+backward alone, peak memory of one step."""
    ts = data.ts
    steps = ts.steps if steps is None else steps
    dev = data.device
    model = build_model(pair, data, seed, backend)
    # Weight decay on the linear layers only: not on embeddings, norms, biases or learnable feature maps.
    decayed = {
        n
        for n, p in model.named_parameters()
        if p.dim() >= 2 and not n.startswith(("embed", "pos")) and ".feature_map." not in n
    }
    decay = [p for n, p in model.named_parameters() if n in decayed]
    other = [p for n, p in model.named_parameters() if n not in decayed]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ts.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=ts.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, ts.warmup_frac))
    gen = torch.Generator().manual_seed(10_000 + seed)
    eval_at = {max(1, round(steps * (i + 1) / ts.evals)) for i in range(ts.evals)}
    losses, curve, step_s = [], [], []

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = data.loss_and_correct(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for i in range(steps):
        if redraw_every and i and i % redraw_every == 0:
            model.redraw(seed * 1_000_003 + i)
        x, y = data.batch(gen)
        sync(dev)
        loss, seconds = timed(lambda: step(x, y), lambda: sync(dev))
        step_s.append(seconds)
        sched.step()
        losses.append(float(loss.detach()))
        if i + 1 in eval_at:
            curve.append(
                {
                    "step": i + 1,
                    "train_loss": statistics.fmean(losses[-max(1, steps // ts.evals) :]),
                    "val_acc": data.accuracy(model, "val"),
                }
            )
        if bar is not None:
            bar.update()
    out = {
        "pair": pair,
        "seed": seed,
        "steps": steps,
        "losses": losses,
        "curve": curve,
        "test_acc": data.accuracy(model, "test"),
        "val_acc": curve[-1]["val_acc"] if curve else None,
        "step_ms": 1e3 * statistics.median(step_s[min(3, len(step_s) - 1) :]),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "feature_map_params": sum(p.numel() for fm in model.feature_maps() for p in fm.parameters() if p.requires_grad),
    }
    if measure:
        out.update(measure_costs(model, data, gen, step))
    return out


def measure_costs(model: TaskModel, data: TaskData, gen: torch.Generator, step) -> dict:
    """Where a step's time goes: the attention layers alone (forward + backward on the inputs they see in
    the model) against the whole step; and the peak memory of one step."""
    x, y = data.batch(gen)
    ids, mask = data._inputs(x)
    dev = data.device
    h = torch.randn(ids.shape[0], ids.shape[1], model.blocks[0].ln1.normalized_shape[0], device=dev, requires_grad=True)

    def attn_fwd_bwd():
        for blk in model.blocks:
            blk.attn(h, key_padding_mask=mask).sum().backward()

    attn_ms, _, _, _ = time_fn(attn_fwd_bwd, dev, 0.3)
    model.zero_grad(set_to_none=True)
    mem = common.peak_memory(lambda: step(x, y), dev)
    return {"attn_ms": attn_ms, "peak_mem_bytes": mem}


def summarise(runs: list[dict], chance: float) -> dict:
    accs = [r["test_acc"] for r in runs]
    first = [statistics.fmean(r["losses"][: max(1, len(r["losses"]) // 10)]) for r in runs]
    last = [statistics.fmean(r["losses"][-max(1, len(r["losses"]) // 10) :]) for r in runs]
    mem = [r["peak_mem_bytes"] for r in runs if r.get("peak_mem_bytes") is not None]
    attn = [r["attn_ms"] for r in runs if r.get("attn_ms") is not None]
    return {
        "pair": runs[0]["pair"],
        "seeds": len(runs),
        "acc_mean": statistics.fmean(accs),
        "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "step_ms": statistics.fmean(r["step_ms"] for r in runs),
        "attn_ms": statistics.fmean(attn) if attn else None,
        "peak_mem_bytes": max(mem) if mem else None,
        "params": runs[0]["params"],
        "feature_map_params": runs[0]["feature_map_params"],
        "loss_first": statistics.fmean(first),
        "loss_last": statistics.fmean(last),
        "above_chance": statistics.fmean(accs) > chance,
    }
