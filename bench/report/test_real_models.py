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

Stage 1: `fitting.distill(loss='mse')`, 300 Adam steps per layer at lr 0.01 on 16 x 1024 training tokens. Stage 2: `fitting.finetune(target='logits')`, 30 AdamW steps at lr 0.001.
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
    assert [r[2] for r in rows] == ["after convert", "after stage 1"] * 2
    assert rows[1][1] == "stage 1: 300 steps/layer, 16 x 1024 tokens; stage 2: 30 steps" and rows[0][1] == ""
    assert [r[8] for r in rows] == ["no", "no", "no", "yes"]
    # the passkey note goes on the run's last row only
    assert rows[1][9] == "4/10 at 1024 tokens, 1/10 at 2048 tokens" and rows[0][9] == ""
    # one goal line per configuration: its best row (1.450, file b) against file b's own band (1.600)
    assert len(goals) == 1
    assert "best 1.450x" in goals[0] and "1.600x" in goals[0] and "below it" in goals[0] and "2026-01-02-b" in goals[0]
    assert "not below" not in goals[0]


EVAL = """# A real LM linearized

| row | ppl | ppl / orig | top-1 agree | KL nats/tok | s / fwd | note |
|---|---|---|---|---|---|---|
| original (SDPA) | 8.28 | 1.000 | 1.000 | 0.0000 | 7.29 |  |
| band softmax W'=128 S=4 | 11.33 | 1.369 | 0.832 | 0.2762 | 9.58 |  |
| band softmax W'=128 S=0 (equal memory) | 24.63 | 2.975 | 0.602 | 1.0646 | 9.02 |  |
| hybrid hedgehog m=64 W=64 | 32.23 | 3.892 | 0.546 | 1.3055 | 7.99 |  |
| hybrid hedgehog m=64 W=64 S=4 | 16.64 | 1.300 | 0.723 | 0.6115 | 24.86 |  |

| hybrid | F | hybrid floats / kv head | W' | band floats / kv head |
|---|---|---|---|---|
| hybrid hedgehog m=64 W=64 | 128 | 16384 | 128 | 16384 |
| hybrid hedgehog m=64 W=64 S=4 | 128 | 16896 | 128 | 16896 |
"""


def test_convert_rows_take_the_band_of_their_own_sinks(tmp_path):
    (tmp_path / "real-lm-2026-01-01.md").write_text(EVAL)
    rows = real_models.convert_rows(str(tmp_path))
    print(rows)
    assert [(r[0], r[7], r[8]) for r in rows] == [
        ("hedgehog m=64 W=64", "W'=128 S=0: 2.975", "no"),
        ("hedgehog m=64 W=64 S=4", "W'=128 S=4: 1.369", "yes"),
    ]


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


CACHE_DECODE = """# The exact cache

- commit: abc1234

| row | ppl | ppl / orig | cache MiB | ms / token | passkey s | load |
|---|---|---|---|---|---|---|
| hybrid, no cache | - | - | 5.80 | 100.0 | 0 | 1.0 |
| hybrid, cache C=16, score kernel | - | - | 6.10 | 110.0 | 0 | 1.0 |
| hybrid, cache C=64, score kernel | - | - | 7.20 | {c64} | 0 | 1.1 |
"""


def test_cache_decode_rows_compare_each_file_with_its_own_no_cache_row(tmp_path):
    (tmp_path / "real-lm-cache-2026-01-01-a.md").write_text(CACHE_DECODE.format(c64="125.0"))
    (tmp_path / "real-lm-cache-2026-01-02-b.md").write_text(CACHE_DECODE.format(c64="140.0"))
    (tmp_path / "real-lm-cache-2026-01-03-c.md").write_text(CACHE)  # no no-cache row: not a decode comparison
    # a file without its commit: in the table, not in the goal lines
    old = CACHE_DECODE.format(c64="200.0").replace("- commit: abc1234", "")
    (tmp_path / "real-lm-cache-2026-01-04-d.md").write_text(old)
    rows, goals = real_models.cache_decode_rows(str(tmp_path))
    print(rows, goals)
    assert [r[3] for r in rows] == ["1.10", "1.25", "1.10", "1.40", "1.10", "2.00"]
    assert [r[5] for r in rows] == ["abc1234"] * 4 + ["not recorded"] * 2
    assert len(goals) == 2 and "1.25x" in goals[0] and ": met" in goals[0] and "not met" in goals[1]
    assert "real-lm-cache-2026-01-02-b.md" in goals[1]
