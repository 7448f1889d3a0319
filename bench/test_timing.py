"""bench/timing.py (``pytest bench -q``): the one timing loop calls what it is asked to, in order."""

from __future__ import annotations

import torch

from bench import timing


def test_measure_warms_up_then_interleaves_rounds():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = timing.measure(fns, warmup=2, rounds=3, before=lambda: calls.append("|"))
    assert calls == ["a", "a", "b", "b"] + ["|", "a", "|", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_measure_syncs_inside_every_call():
    calls = []
    timing.measure({"f": lambda: calls.append("f")}, warmup=1, rounds=2, sync=lambda: calls.append("sync"))
    assert calls == ["f", "sync"] * 3


def test_a_budget_sets_at_least_the_rounds_and_at_most_the_cap():
    times = timing.measure({"f": lambda: None}, budget_s=0.05)["f"]
    assert 3 <= len(times) <= timing.MAX_BUDGET_ROUNDS
    # a warm-up call longer than 8 budgets: one round
    assert len(timing.measure({"f": lambda: None}, budget_s=0.0)["f"]) == 1


def test_time_fn_on_the_cpu_gives_ordered_quantiles():
    med, p20, p80, best = timing.time_fn(lambda: torch.ones(8).sum(), torch.device("cpu"), 0.01)
    assert 0 <= best <= p20 <= med <= p80
