"""Context-parallel attention on CPU ranks against one process: ``python -m bench.perf.distributed``.

One causal sequence (fp32, posrf x orf; default B=1, T=16384, H=4, D=Dv=32, m=64) is run

* in this process by ``rf_attention`` on the whole sequence, with every core (the baseline), and
* by ``context_parallel_rf_attention`` on 1, 2 and 4 local ranks (gloo, ``run_local``), each rank holding
  T / ranks positions, with cores / ranks threads each (at least 1: 4 ranks oversubscribe 2 cores).

Forward times are medians over ``--reps`` runs after a warm-up; a run's time is the slowest rank's, every
rank starting after a barrier. The backward is not timed at this length: the CPU backends' backward
recomputes through the reference backend, which takes tens of seconds at T = 16384 on two cores and
would measure that. Bytes are counted by ``CommunicationLog`` from the tensors this package hands to its
collectives (what a ring algorithm sends per rank): for the forward at the full length and at T / 8 (the
same: they do not depend on T), and for forward + backward at T / 8. For contrast, the bytes of K and V
that ring attention would send per rank for the same forward, (ranks - 1) / ranks * T * B * H * (D + Dv)
* 4, are computed, not measured. Writes ``bench/results/distributed-cpu-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

from bench.common import RESULTS, command_line, machine  # noqa: E402
from bench.timing import measure  # noqa: E402
from spectraformer_fused import RandomFeatureMap, available_backends, rf_attention  # noqa: E402
from spectraformer_fused.attention import _resolve_backend  # noqa: E402
from spectraformer_fused.distributed import CommunicationLog, context_parallel_rf_attention, run_local  # noqa: E402


def _inputs(cfg: dict, lo: int, hi: int):
    g = torch.Generator().manual_seed(0)
    B, T, H, D = cfg["B"], cfg["T"], cfg["H"], cfg["D"]
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    return [t[:, lo:hi].contiguous() for t in (q, k, v)]


def _feature_map(cfg: dict) -> RandomFeatureMap:
    return RandomFeatureMap(cfg["D"], cfg["m"], component="posrf", weights="orf", num_heads=cfg["H"], seed=0)


def _timed(fn, reps: int, sync=None) -> float:
    """Median seconds of ``fn()``; with ``sync`` (distributed), each run starts after a barrier and
    counts the slowest rank."""
    times = measure({"fn": fn}, rounds=reps, before=dist.barrier if sync else None)["fn"]
    if sync:
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # run by run, the slowest rank
        times = slowest.tolist()
    return statistics.median(times)


def _rank(rank: int, world: int, cfg: dict):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    per = cfg["T"] // world
    q, k, v = _inputs(cfg, rank * per, (rank + 1) * per)
    fm = _feature_map(cfg)

    def call(q, k, v):
        return context_parallel_rf_attention(q, k, v, fm, causal=True, backend=cfg["backend"])

    def forward():
        with torch.no_grad():
            call(q, k, v)

    row = {"threads": torch.get_num_threads(), "per_rank": per, "fwd": _timed(forward, cfg["reps"], sync=True)}
    with CommunicationLog() as log:
        forward()
    row["bytes_fwd"] = log.sent_bytes
    short = [t[:, : per // 8].detach().requires_grad_() for t in (q, k, v)]
    with torch.no_grad(), CommunicationLog() as log:
        call(*short)
    row["bytes_fwd_short"] = log.sent_bytes
    with CommunicationLog() as log:
        call(*short).sum().backward()
    row["bytes_fwd_bwd_short"] = log.sent_bytes
    return row if rank == 0 else None


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(cfg: dict, worlds: list[int], command: str = "") -> str:
    load = os.getloadavg()
    fm = _feature_map(cfg)
    q, k, v = _inputs(cfg, 0, cfg["T"])
    backend = _resolve_backend(cfg["backend"], q, fm)
    torch.set_num_threads(os.cpu_count() or 1)

    def forward():
        with torch.no_grad():
            rf_attention(q, k, v, fm, causal=True, backend=cfg["backend"])

    base = _timed(forward, cfg["reps"])
    rows = [(w, run_local(_rank, w, cfg, timeout=900)[0]) for w in worlds]

    B, T, H, D, m = cfg["B"], cfg["T"], cfg["H"], cfg["D"], cfg["m"]
    lines = [
        f"# Context-parallel attention on CPU ranks ({datetime.date.today().isoformat()})",
        "",
        f"- machine: {machine()}; load average before the run: {load[0]:.2f} (other processes share these "
        "cores, so timings are noisy)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, gloo; commit {_commit()}",
        *([f"- command: `{command}`"] if command else []),
        f"- causal, fp32, posrf x orf, B={B}, T={T}, H={H}, D=Dv={D}, m={m}; backend {backend!r} on every rank; "
        f"median of {cfg['reps']} runs after a warm-up (distributed: the slowest rank, after a barrier)",
        f"- one process: rf_attention on the whole sequence in the benchmark's own process with "
        f"{torch.get_num_threads()} threads",
        "- bytes sent per rank: counted from the tensors handed to the collectives (ring algorithm: "
        "(ranks - 1) x payload for an all-gather); independent of T (same at T/8)",
        "- ring K,V: the bytes of K and V a ring attention would send per rank for the forward, computed "
        "(not measured) for contrast",
        f"- {os.cpu_count()} cores: with more ranks than cores the ranks share cores (oversubscribed), so "
        "those rows show the cost of communication and extra work, not a speed-up",
        "",
        "| ranks | threads/rank | positions/rank | forward ms | vs one process | sent/rank forward | "
        "sent/rank forward at T/8 | sent/rank fwd+bwd at T/8 | ring K,V forward (computed) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| one process | {torch.get_num_threads()} | {T} | {base * 1e3:.1f} | 1.00x | 0 | 0 | 0 | 0 |",
    ]
    for w, r in rows:
        ring = int((w - 1) / w * T * B * H * 2 * D * 4)
        lines.append(
            f"| {w} | {r['threads']} | {r['per_rank']} | {r['fwd'] * 1e3:.1f} | {base / r['fwd']:.2f}x | "
            f"{r['bytes_fwd']:,} | {r['bytes_fwd_short']:,} | {r['bytes_fwd_bwd_short']:,} | {ring:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--D", type=int, default=32)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu"))
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    if args.backend in ("auto", "cpu"):
        available_backends()  # builds the CPU extension once, before the ranks load it
    cfg = {"B": args.B, "T": args.T, "H": args.H, "D": args.D, "m": args.m, "reps": args.reps, "backend": args.backend}
    table = run(cfg, [int(w) for w in args.worlds.split(",")], command_line("bench.perf.distributed"))
    print(table)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"distributed-cpu-{datetime.date.today().isoformat()}.md")
    with open(path, "w") as f:
        f.write(table)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
