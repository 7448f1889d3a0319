"""How bench/ times code: every timing loop of the benchmarks is ``measure`` (on CUDA, ``do_bench``).

``measure`` runs the functions given, warm-up calls first (not counted), then round after round one timed
call of each in turn, so that load from other processes hits them alike; it returns every call's seconds
and leaves the statistic to the caller. ``time_fn`` and ``time_interleaved`` are the report's use of it
(median, p20, p80, min in ms, rounds set by a time budget); ``do_bench`` is Triton's timer on CUDA.

This module imports nothing of bench/, so every benchmark can use it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

MAX_BUDGET_ROUNDS = 25  # a time budget ends the rounds after this many


def sync(device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, sync: Callable | None = None) -> tuple[object, float]:
    """(``fn()``, its wall time in seconds), with ``sync()`` (a device's queue) inside the timing."""
    t0 = time.perf_counter()
    out = fn()
    if sync is not None:
        sync()
    return out, time.perf_counter() - t0


def measure(
    fns: dict[str, Callable],
    *,
    warmup: int = 1,
    rounds: int = 3,
    budget_s: float | None = None,
    sync: Callable | None = None,
    before: Callable | None = None,
) -> dict[str, list[float]]:
    """{name: [seconds of each timed call]} of the functions in ``fns``.

    First ``warmup`` calls of each function (not counted); then rounds, each one timed call of every
    function in turn. ``rounds`` rounds; with ``budget_s``, rounds go on while the budget lasts
    (``budget_s`` per function, up to ``MAX_BUDGET_ROUNDS``) and ``rounds`` is only the least number, cut
    to 2 when a warm-up call took more than 2 budgets and to 1 beyond 8. ``sync()`` runs after each
    call, inside its timing (a device's queue); ``before()`` runs before each timed call, outside it
    (a barrier between processes)."""
    first = 0.0
    for fn in fns.values():
        for _ in range(warmup):
            first = max(first, timed(fn, sync)[1])
    if budget_s is not None:
        rounds = min(rounds, 3 if first < 2 * budget_s else (2 if first < 8 * budget_s else 1))
    times = {name: [] for name in fns}
    start = time.perf_counter()
    done = 0
    while done < rounds or (
        budget_s is not None and done < MAX_BUDGET_ROUNDS and time.perf_counter() - start < budget_s * len(fns)
    ):
        for name, fn in fns.items():
            if before is not None:
                before()
            times[name].append(timed(fn, sync)[1])
        done += 1
    return times


def quantiles(times: list[float]) -> tuple:
    """(median, p20, p80, min) in ms of run times in seconds."""
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e3  # noqa: E731
    return statistics.median(times) * 1e3, q(0.2), q(0.8), times[0] * 1e3


def do_bench(fn: Callable, warmup_ms: int, rep_ms: int) -> tuple:
    """(median, p20, p80) ms by ``triton.testing.do_bench`` (CUDA; ImportError without Triton)."""
    from triton.testing import do_bench as triton_do_bench

    return tuple(triton_do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))


def time_fn(fn, device, budget_s: float) -> tuple:
    """(median, p20, p80, min) in ms. GPU: ``do_bench``; CPU: ``measure`` over N runs after one warm-up
    run, N adaptive to the budget (at least 3 unless one run is much longer than the budget)."""
    if device.type == "cuda":
        try:
            med, lo, hi = do_bench(fn, 10, max(20, int(budget_s * 100)))
            return med, lo, hi, lo
        except ImportError:
            pass
    return quantiles(measure({"fn": fn}, budget_s=budget_s, sync=lambda: sync(device))["fn"])


def time_interleaved(fns: dict, device, budget_s: float) -> dict:
    """``time_fn`` of several functions: {name: (median, p20, p80, min)} ms. On the CPU the runs alternate
    between the functions, one of each per round after one warm-up run of each, so that load from other
    processes hits them alike; rounds go on while the budget (``budget_s`` per function) lasts, at least
    3 unless one round is much longer than the budget. On CUDA each is timed on its own by ``time_fn``."""
    if device.type == "cuda":
        return {name: time_fn(fn, device, budget_s) for name, fn in fns.items()}
    times = measure(fns, budget_s=budget_s, sync=lambda: sync(device))
    return {name: quantiles(ts) for name, ts in times.items()}
