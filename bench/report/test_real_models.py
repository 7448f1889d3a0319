"""bench/report/real_models.py (``pytest bench -q``): the real-model rows collected from result files."""

from __future__ import annotations

from bench.report import real_models

FIT = """# Linearizing SmolLM2-135M-Instruct in stages: convert, stage 1, stage 2

- date: 2026-01-01 10:00 UTC

| row | ppl | ppl / orig | top-1 agree | KL nats/tok | stage s |
|---|---|---|---|---|---|
| original (SDPA) | 8.00 | 1.000 | 1.000 | 0.0000 |  |
| band softmax W'=64 S=4 | 16.00 | 2.000 | 0.700 | 0.6000 |  |
| band softmax W'=128 S=4 (equal memory) | 11.00 | {band} | 0.800 | 0.3000 |  |
| hybrid hedgehog x learnable m=64 (F=128) W=64 S=4, after convert | 16.00 | 2.000 | 0.700 | 0.6000 |  |
| hybrid hedgehog x learnable m=64 (F=128) W=64 S=4, after stage 1 | 12.00 | {s1} | 0.780 | 0.4000 | 100 |

Passkey retrieval of the final row (the prompts of the passkey stage, 10 trials per length, greedy): 4/10 at 1024 tokens, 1/10 at 2048 tokens (50 s).
"""

CACHE = """# The exact cache

| row | passkey 1024 | passkey 8192 | ppl | ppl / orig | cache MiB | ms / token | passkey s | load |
|---|---|---|---|---|---|---|---|---|
| original (SDPA) | 10/10 | 9/10 | 8.11 | 1.000 | 45.35 | 224.0 | 326 | 4.3 |
| hybrid, cache C=64 | 3/10 | 0/10 | 12.32 | 1.518 | 8.62 | 123.0 | 124 | 2.1 |
"""

DECODE = """# decode

| row | T | B | prefill s (B=1) | prefill CPU s | decode tok/s | ms / step | CPU ms / step | peak RSS MiB | cache MiB | note |
|---|---|---|---|---|---|---|---|---|---|---|
| original (SDPA, DynamicCache) | 8192 | 1 | 60.0 | 40.0 | 2.0 | 500.0 | 400.0 | 5 | 361.41 | load 1 |
| hybrid posrf x orf m=128 W=64 S=4 (RFCache) | 8192 | 1 | 30.0 | 20.0 | 4.0 | 250.0 | 100.0 | 0 | 5.80 | load 1 |
| original (SDPA, DynamicCache) | 8192 | 8 | 60.0 | 40.0 | 1.0 | 8000.0 | 4000.0 | 5 | 2891.25 | load 1 |
| hybrid posrf x orf m=128 W=64 S=4 (RFCache) | 8192 | 8 | 30.0 | 20.0 | 2.5 | 3200.0 | 1000.0 | 0 | 46.43 | load 1 |
"""


def test_fit_rows_compare_each_run_with_its_own_band(tmp_path):
    (tmp_path / "real-lm-fit-2026-01-01-a.md").write_text(FIT.format(band="1.375", s1="1.500"))
    (tmp_path / "real-lm-fit-2026-01-02-b.md").write_text(FIT.format(band="1.600", s1="1.450"))
    rows, goals = real_models.fit_rows(str(tmp_path))
    print(rows, goals)
    assert [r[1] for r in rows] == ["after convert", "after stage 1"] * 2
    assert [r[7] for r in rows] == ["no", "no", "no", "yes"]
    # the passkey note goes on the run's last row only
    assert rows[1][8] == "4/10 at 1024 tokens, 1/10 at 2048 tokens" and rows[0][8] == ""
    # one goal line per configuration: its best row (1.450, file b) against file b's own band (1.600)
    assert len(goals) == 1
    assert "best 1.450x" in goals[0] and "1.600x" in goals[0] and "below it" in goals[0] and "2026-01-02-b" in goals[0]
    assert "not below" not in goals[0]


def test_passkey_and_decode_rows(tmp_path):
    (tmp_path / "real-lm-cache-2026-01-01.md").write_text(CACHE)
    (tmp_path / "real-lm-decode-2026-01-01.md").write_text(DECODE)
    lengths, rows = real_models.passkey_rows(str(tmp_path))
    assert lengths == [1024, 8192]
    assert rows[1][:3] == ["hybrid, cache C=64", "3/10", "0/10"]
    dec, goals = real_models.decode_rows(str(tmp_path))
    print(dec, goals)
    assert [(r[0], r[1], r[4], r[5]) for r in dec] == [("8192", "1", "2.00", "4.00"), ("8192", "8", "2.50", "4.00")]
    assert "goal >= 1.5x: met" in goals[0] and "goal >= 3.0x: not met" in goals[1]
    text = "\n".join(real_models.markdown(str(tmp_path)))
    assert "| 8192 | 8 | 1.0 | 2.5 | 2.50 |" in text
