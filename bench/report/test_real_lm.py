"""Smoke test of bench/report/real_lm.py without the real model or the network: the equal-memory formula, the band
mask, the band attention function on a tiny random Llama, the held-out split and the passkey prompt."""

from __future__ import annotations

import inspect

import pytest
import torch

from bench.report import real_lm

transformers = pytest.importorskip("transformers")


def test_equal_memory_window():
    # W=64, S=0, F=128: 63 * 128 + 128 * 65 = 16384 floats -> W' = 128
    assert real_lm.equal_memory_window(64, 0, 128) == (128, 16384)
    # W=64, S=4, F=128: 67 * 128 + 8320 = 16896 -> W' + 4 >= 132 -> W' = 128
    assert real_lm.equal_memory_window(64, 4, 128) == (128, 16896)
    for w, s, f in [(16, 0, 128), (16, 4, 64), (1, 0, 1), (100, 2, 300)]:
        wp, floats = real_lm.equal_memory_window(w, s, f)
        assert (wp + s) * 128 >= floats > (wp - 1 + s) * 128


def test_band_keep():
    keep = real_lm.band_keep(6, 6, window=2, sinks=1)
    want = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        for j in range(i + 1):
            want[i, j] = i - j < 2 or j < 1
    assert torch.equal(keep, want)
    # decoding: one query at the end of 6 keys sees the same row
    assert torch.equal(real_lm.band_keep(1, 6, 2, 1), want[-1:])


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_band_attention_matches_definition():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 24))
    full = model(input_ids=ids).logits
    # a band wider than the sequence is the original model
    real_lm.set_band(model, 1000, 0)
    torch.testing.assert_close(model(input_ids=ids).logits, full, atol=1e-5, rtol=1e-5)
    # a narrow band: tokens before the window (and the sinks) do not change the logits beyond it
    real_lm.set_band(model, 4, 2)
    a = model(input_ids=ids).logits
    ids2 = ids.clone()
    ids2[0, 5:10] = (ids2[0, 5:10] + 1) % 64  # outside the sinks; the last position it reaches is 9 + 2 layers
    b = model(input_ids=ids2).logits
    torch.testing.assert_close(a[:, 17:], b[:, 17:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 9], b[:, 9])
    # token-by-token decoding with the KV cache equals one pass
    out = model(input_ids=ids[:, :20], use_cache=True)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step = model(input_ids=ids[:, 20:21], use_cache=True, **{kw: out.past_key_values}).logits
    torch.testing.assert_close(step[:, -1], a[:, 20], atol=1e-5, rtol=1e-5)


def test_split_and_passkey_prompt():
    names = [f"doc{i}.rst.txt" for i in range(400)]
    held = [n for n in names if real_lm.is_heldout(n, 0.1)]
    assert 10 < len(held) < 80 and held == [n for n in names if real_lm.is_heldout(n, 0.1)]

    class Tok:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    ids = real_lm.passkey_prompt(Tok(), 2000, 0.5, 12345)
    text = "".join(chr(i) for i in ids[0].tolist())
    assert ids.shape[0] == 1 and 1800 < ids.shape[1] <= 2000
    assert "The pass key is 12345." in text and text.endswith("The pass key is")


@torch.no_grad()
@pytest.mark.parametrize("converted", [False, True], ids=["original", "converted"])
def test_decode_from_a_prefill_equals_generate(converted):
    """The decode stage prefills once and continues with generate() from that cache, repeated over a batch:
    the tokens are those of generate() from the prompt, for every row of the batch; a converted model
    prefills into an RFCache."""
    model = _tiny_llama()
    if converted:
        from spectraformer_fused.integrations.transformers import RFCache, convert

        convert(model, component="hyprf", weights="orf", num_features=8, window=4, sinks=1, seed=0)
    ids = torch.randint(0, 64, (1, 20))
    pre = real_lm._prefill(model, ids)
    if converted:
        assert isinstance(pre["cache"], RFCache)
    want = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert int(pre["next"]) == int(want[0, 20])
    r = real_lm._decode_from(model, ids, pre, 2, 3)
    assert r["tok_s"] > 0 and r["cache"] > 0
    full = torch.cat([ids, pre["next"]], 1)
    import copy

    cache = copy.deepcopy(pre["cache"])
    cache.batch_repeat_interleave(2)
    got = model.generate(
        full.expand(2, -1), past_key_values=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[0]), (got, want)
