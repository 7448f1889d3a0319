"""Smoke test of bench/report/window.py (``pytest bench -q``): a tiny case of every part, the sliding-window
baseline against its definition, the spread MQAR layout, and the window pairs of bench/tasks/model.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import spectraformer_fused as sf
from bench import common, peers
from bench.report import window
from bench.report.settings import window_settings
from bench.tasks import MQARConfig, generate_mqar, model
from bench.tasks.mqar import IGNORE


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_settings():
    ws = window_settings(False, torch.device("cpu"))
    return dataclasses.replace(
        ws,
        acc_shape=(1, 24, 2, 8),
        acc_m=8,
        windows=(0, 4, 16),
        scales=(1.0,),
        seeds=1,
        pairs=("posrf:orf", "oprf:fastfood_learnable"),
        mqar_window=4,
        mqar=MQARConfig(
            vocab_size=9, num_pairs=2, seq_len=32, train_size=64, val_size=16, test_size=16, layout="spread"
        ),
        mqar_steps=2,
        mqar_batch=8,
        mqar_seeds=1,
        mqar_pairs=("posrf:orf",),
        speed_T=(32,),
        speed_window=8,
        speed_shape=(1, 2, 8, 8),
        speed_budget_s=0.0,
    )


def test_window_section_tiny(tmp_path):
    ws = tiny_settings()
    ctx = common.Context("cpu", "now", common.versions(), "quick")
    res = window.run(ws, ctx, str(tmp_path))
    hybrid_ok = window.window_supported()
    acc = res["accuracy"]
    for r in acc:
        if r["pair"] in ws.pairs and (r["window"] == 0 or hybrid_ok):
            assert r["status"] == "ok" and math.isfinite(r["mean"]), r
        if r["pair"] == window.WINDOW_ONLY and r["window"]:
            assert r["status"] == "ok" and math.isfinite(r["mean"]), r
    # W = 16 < T = 24 non-causal: every key but |t - j| >= 16 exact; the error falls as the window grows
    if hybrid_ok:
        for causal in (True, False):
            errs = [window._acc(acc, "softmax", causal, 1.0, "posrf:orf", W)["mean"] for W in ws.windows]
            assert errs[-1] < errs[0], errs
    m = res["mqar"]
    ran = {s["pair"] for s in m["summaries"]}
    assert {"softmax", "softmax@w4", "posrf:orf"} <= ran
    assert ("posrf:orf@w4" in ran) == hybrid_ok or "posrf:orf@w4" in m["skipped"]
    sp = res["speed"]
    assert len(sp) == len(ws.speed_T) * 2 * len(window.speed_impls(ws))
    for r in sp:
        if r["impl"].startswith("sdpa") or r["window"] is None:
            assert r["status"] == "ok" and r["ms"] > 0, r
    text = "\n".join(window.markdown(res, ctx))
    assert "## 9. Hybrid attention" in text and "W=16" in text and "sliding-window softmax" in text
    assert "| rf_attention | reference | posrf x orf | 8 |" in text
    stems = [s for s, _ in window.tables(res)]
    assert stems == ["window_accuracy", "window_mqar", "window_speed"]
    assert (tmp_path / "window_accuracy_softmax.png").exists() and (tmp_path / "window_speed.png").exists()


@pytest.mark.parametrize("causal", [True, False])
def test_window_exact_attention_is_the_band_restricted_softmax(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 4, dtype=torch.float64) for _ in range(3))
    W = 3
    o = peers.window_exact_attention(q, k, v, window=W, causal=causal)
    logits = sf.reference.exact_logits(q, k)
    for t in range(9):
        keep = [j for j in range(9) if (0 <= t - j < W if causal else abs(t - j) < W)]
        p = torch.softmax(logits[:, :, t, keep], -1)  # [B, H, n]
        want = torch.einsum("bhn,bnhd->bhd", p, v[:, keep])
        torch.testing.assert_close(o[:, t], want)
    # a window covering the sequence is exact attention
    full = peers.window_exact_attention(q, k, v, window=9, causal=causal)
    torch.testing.assert_close(full, sf.exact_attention(q, k, v, causal=causal))
    gauss = peers.window_exact_attention(q, k, v, window=9, causal=causal, kernel="gaussian")
    torch.testing.assert_close(gauss, sf.exact_attention(q, k, v, causal=causal, kernel="gaussian"))


def test_spread_mqar_queries_follow_their_pairs():
    cfg = MQARConfig(vocab_size=33, num_pairs=6, seq_len=40, num_queries=4, layout="spread")
    x, y = generate_mqar(200, cfg, seed=1)
    x2, _ = generate_mqar(200, cfg, seed=1)
    assert torch.equal(x, x2)
    gaps = []
    for xs, ys in zip(x.tolist(), y.tolist()):
        assert sum(t != 0 for t in xs) == 2 * 6 + 4
        keys = [p for p, t in enumerate(xs) if 1 <= t <= cfg.num_keys]
        for p, t in enumerate(ys):
            if t == IGNORE:
                continue
            pair = [j for j in keys if j < p and xs[j] == xs[p]]
            assert len(pair) == 1 and xs[pair[0] + 1] == t  # the value right after the earlier key
            gaps.append(p - pair[0])
        assert sum(t != IGNORE for t in ys) == 4
    assert min(gaps) >= 2 and max(gaps) > 20  # near and far pairs both occur
    with pytest.raises(ValueError, match="layout"):
        MQARConfig(layout="middle")


def test_window_pairs_in_train():
    assert model.split_window("posrf:orf@w16") == ("posrf:orf", 16)
    assert model.split_window("softmax") == ("softmax", None)
    assert model.is_baseline("softmax@w8") and not model.is_baseline("posrf:orf@w8")
    assert model.resolve_pairs("softmax,softmax@w4,posrf:orf", False, window=8) == [
        "softmax",
        "softmax@w4",
        "posrf:orf@w8",
    ]
    for bad in ("posrf:orf@w0", "uniform@w4", "posrf:orf@wx", "posrf:nope@w4"):
        with pytest.raises(ValueError):
            model.resolve_pairs(bad, False)
    torch.manual_seed(0)
    att = model.SoftmaxAttention(8, 2, causal=True, window=2)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, :3] = torch.randn(1, 3, 8)  # tokens 0-2 are outside the window of tokens 4 and 5
    torch.testing.assert_close(att(x)[:, 4:], att(changed)[:, 4:])
    torch.testing.assert_close(att(x, torch.ones(1, 6, dtype=torch.bool)), att(x))
    cfg = model.ModelConfig(token_shift=True)
    m = model.TaskModel("softmax", 9, 9, 6, True, 0, cfg=cfg)
    ids = torch.randint(0, 9, (1, 6))
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 9
    torch.testing.assert_close(m(ids)[:, :4], m(later)[:, :4])  # still causal with the shift
