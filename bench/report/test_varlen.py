"""Smoke test of bench/report/varlen.py (``pytest bench -q``): tiny shapes, every row present with finite numbers,
and packed and padded outputs agree on the real tokens."""

from __future__ import annotations

import math

import pytest
import torch

from bench.report import varlen


def test_varlen_rows_and_table():
    device = torch.device("cpu")
    vs = varlen.make_settings(device, lengths=(5, 12, 3))
    vs.budget_s = 0.0
    rows = varlen.run(vs, device)
    assert len(rows) == varlen.num_rows(vs) == len(vs.backends) * 8
    keys = {(r["backend"], r["causal"], r["pass"], r["layout"]) for r in rows}
    assert keys == {
        (b, c, p, lay)
        for b in vs.backends
        for c in (False, True)
        for p in ("fwd", "fwd+bwd")
        for lay in ("packed", "padded")
    }
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens"] == 20
        for key in ("ms", "ms_p20", "ms_p80", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["peak_mem_bytes"] is None or math.isfinite(r["peak_mem_bytes"])
        assert r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-4, r
        if r["layout"] == "packed":
            assert math.isfinite(r["speedup_vs_padded"]) and r["speedup_vs_padded"] > 0, r
    text = "\n".join(varlen.markdown(rows, vs, device, varlen.header_line(device)))
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and " ok |" in ln]
    assert len(table) == len(rows)
    assert "torch " in text and "threads" in text and "torch.profiler" in text


def test_varlen_cli_rejects_bad_lengths():
    with pytest.raises(SystemExit):
        varlen.main(["--device", "cpu", "--lengths", "4,0"])
