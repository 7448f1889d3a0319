"""HuggingFace transformers integration: tiny models built from configs (random weights, no download).

Decoding with RFCache is checked against generation recomputed from scratch without any cache, and each
converted layer against rf_attention applied by hand to the layer's own projections."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402
from transformers import BertConfig, BertModel, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

import spectraformer_fused as sf  # noqa: E402
from spectraformer_fused import rf_attention  # noqa: E402
from spectraformer_fused.fitting import record_attention_inputs  # noqa: E402
from spectraformer_fused.integrations import transformers as hf  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models are tiny: a matrix product of 64 x 64 costs microseconds, and waking a thread pool for
    # each one costs more than the product itself on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(num_kv_heads: int = 4, dtype=torch.float64, model_seed: int = 0, **convert_args) -> LlamaForCausalLM:
    torch.manual_seed(model_seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        intermediate_size=96,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    args = {"component": "posrf", "weights": "orf", "num_features": 24, "seed": 0, **convert_args}
    return hf.convert(model, **args)


def tiny_bert(model_seed: int = 0, **convert_args) -> BertModel:
    torch.manual_seed(model_seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertModel(config, add_pooling_layer=False).double().eval()
    args = {"component": "posrf", "weights": "orf", "num_features": 24, "seed": 0, **convert_args}
    return hf.convert(model, **args)


def prompt_with_left_padding(batch: int = 2, length: int = 6, pad: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    ids[0, :pad], mask[0, :pad] = 0, 0
    return ids, mask


def greedy_without_cache(model, ids, mask, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence at every step, with generate()'s position ids."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids


def check_generate_matches_recompute(num_kv_heads: int, window: int | None = None, **convert_args) -> None:
    model = tiny_llama(num_kv_heads, window=window, **convert_args)
    sinks = convert_args.get("sinks")
    ids, mask = prompt_with_left_padding()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True
    )
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert isinstance(cache, hf.RFCache), f"generate() used {type(cache).__name__}, not an RFCache"
    expected = greedy_without_cache(model, ids, mask, 8)
    assert torch.equal(out.sequences, expected), f"cached {out.sequences.tolist()} != recomputed {expected.tolist()}"
    # The state of every layer has H_kv heads; the cache holds no keys or values.
    for state, layer in zip(cache.states, cache.layers):
        assert state.S.shape[:2] == (2, num_kv_heads) and state.z.shape[:2] == (2, num_kv_heads)
        assert layer.keys is None and layer.values is None
        # with a window: the last W - 1 keys and values besides, a fixed size
        assert isinstance(state, sf.WindowState) == (window is not None or bool(sinks))
        if window is not None:
            assert state.k_tail.shape == (2, num_kv_heads, window - 1, 16) and state.tail_keep.shape == (2, window - 1)
        if sinks:  # the sinks' keys and values besides, a fixed size
            assert state.k_sink.shape == (2, num_kv_heads, sinks, 16) and state.sink_seen.all()
    assert cache.get_seq_length() == ids.shape[1] + 7  # the last token is never fed back


def capture_call(module, run):
    """Run ``run()``; return the hidden states, keyword arguments and output of ``module``'s call, and
    what ``run`` returned."""
    seen = {}

    def hook(mod, args, kwargs, output):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["kwargs"], seen["out"] = kwargs, output[0]

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    return seen["x"], seen["kwargs"], seen["out"], result


def llama_layer_by_hand(model, ids) -> None:
    """Layer 0's output equals o_proj(rf_attention(rotated q, k, v)) with k, v at H_kv heads."""
    attn = model.model.layers[0].self_attn
    x, kwargs, out, _ = capture_call(attn, lambda: model(input_ids=ids, use_cache=False))
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, attn.head_dim)
    q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
    assert k.shape[1] == model.config.num_key_value_heads and attn.rf_feature_map.num_heads == k.shape[1]
    o = rf_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v,
        attn.rf_feature_map,
        causal=True,
        scale=attn.scaling,
        window=attn.rf_window,
    )
    assert_close(out, attn.o_proj(o.reshape(B, T, -1)), name="llama layer 0")


# -- causal LM ---------------------------------------------------------------------------------------
def test_generate_matches_recompute():
    check_generate_matches_recompute(num_kv_heads=4)


def test_generate_with_window_matches_recompute():
    """convert(window=3): every layer hybrid; generate() with the RFCache (WindowStates) equals recomputation."""
    check_generate_matches_recompute(num_kv_heads=2, window=3)
    model = tiny_llama(2, window=3)
    assert all(layer.self_attn.rf_window == 3 for layer in model.model.layers)
    llama_layer_by_hand(model, torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("window,sinks", [(None, None), (3, 2), (None, 2)])
def test_generate_with_sinks_and_mix_matches_recompute(window, sinks):
    """convert(sinks=, mix=): generate() with the RFCache (sink slots in the WindowStates) equals
    recomputation, with and without a window; the layers carry rf_sinks and a learned factor."""
    check_generate_matches_recompute(num_kv_heads=2, window=window, sinks=sinks, mix=0.5)
    model = tiny_llama(2, window=window, sinks=sinks, mix=0.5)
    for layer in model.model.layers:
        assert layer.self_attn.rf_sinks == sinks
        assert torch.allclose(layer.self_attn.rf_feature_map.log_mix.double().exp(), torch.tensor(0.5).double())


def test_convert_refuses_bad_sinks():
    for bad, err in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(err, match="sinks"):
            tiny_llama(2, sinks=bad)


@pytest.mark.parametrize("window,sinks", [(None, None), (3, None), (3, 2)], ids=["nowindow", "window3", "sinks2"])
def test_beam_search_matches_uncached(window, sinks):
    """Beam search reorders the per-layer states (RFCacheLayer.reorder_cache) between steps, tails and
    sink slots included."""
    model = tiny_llama(4, window=window, sinks=sinks)
    ids, mask = prompt_with_left_padding()
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(**args), model.generate(**args, use_cache=False))


def test_llama_layer_equals_rf_attention_by_hand():
    model = tiny_llama(4)
    llama_layer_by_hand(model, prompt_with_left_padding()[0])
    # The conversion changed the model's computation (the check above compares against the feature map).
    sdpa = tiny_llama(4)
    sdpa.set_attn_implementation("sdpa")
    ids = prompt_with_left_padding()[0]
    assert not torch.allclose(model(input_ids=ids).logits, sdpa(input_ids=ids).logits)


def test_decode_steps_fp32_match_full_forward():
    """Default backend, fp32: prompt + 6 single-token steps through decode_step equal one full forward;
    the state keeps its shape while the sequence grows."""
    model = tiny_llama(4, dtype=torch.float32, component="hyprf", weights="sorf")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    cache = hf.RFCache()
    steps = [hf.decode_step(model, ids[:, :5], cache)]
    shapes = [tuple(tuple(t.shape) for t in s) for s in cache.states]
    for t in range(5, 11):
        steps.append(hf.decode_step(model, ids[:, t : t + 1], cache))
        assert [tuple(tuple(t.shape) for t in s) for s in cache.states] == shapes
    assert cache.get_seq_length() == 11
    full = model(input_ids=ids, use_cache=False).logits
    assert_close(torch.stack(steps, 1), full[:, 4:], name="decode-step logits")


# -- encoder -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("component,weights", [("posrf", "orf"), ("oprf", "qmc")], ids=["posrf-orf", "oprf-qmc"])
def test_bert_padding_equals_rf_attention_by_hand(component, weights):
    model = tiny_bert(component=component, weights=weights)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    attn = model.encoder.layer[1].attention.self
    x, _, out, result = capture_call(attn, lambda: model(input_ids=ids, attention_mask=mask))
    hidden = result.last_hidden_state
    q, k, v = (proj(x).view(2, 9, 3, 16) for proj in (attn.query, attn.key, attn.value))
    fm = attn.rf_feature_map
    expected = rf_attention(q, k, v, fm, key_padding_mask=mask.bool(), scale=attn.scaling)
    assert_close(out, expected.reshape(2, 9, 48), name="bert layer 1")
    unmasked = rf_attention(q, k, v, fm, scale=attn.scaling).reshape(2, 9, 48)
    assert (out[1] - unmasked[1]).abs().max() > 1e-3, "the padding mask did not reach the attention"
    # Kept positions do not depend on what the padded positions hold.
    other = ids.clone()
    other[1, 6:] = torch.randint(3, VOCAB, (3,), generator=g)
    assert_close(
        model(input_ids=other, attention_mask=mask).last_hidden_state[1, :6], hidden[1, :6], name="kept positions"
    )


# -- state_dict, registration, errors ---------------------------------------------------------------
def test_state_dict_round_trip():
    source = tiny_llama(4, component="posrf", weights="fastfood_learnable", seed=0)
    keys = [k for k in source.state_dict() if ".rf_feature_map." in k]
    assert len({k.split(".rf_feature_map.")[0] for k in keys}) == 2, keys
    target = tiny_llama(4, component="posrf", weights="fastfood_learnable", seed=7)
    ids = prompt_with_left_padding()[0]
    assert not torch.allclose(source(input_ids=ids).logits, target(input_ids=ids).logits)
    target.load_state_dict(source.state_dict())
    assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits, name="logits after load")
    # Each layer has its own W.
    w0, w1 = (layer.self_attn.rf_feature_map.projection() for layer in source.model.layers)
    assert not torch.allclose(w0, w1)


def test_register_is_idempotent():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf.register()
    hf.register()
    assert ALL_ATTENTION_FUNCTIONS[hf.NAME] is hf.spectraformer_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[hf.NAME] is hf.spectraformer_mask
    model = tiny_llama(4)
    ids = prompt_with_left_padding()[0]
    before = model(input_ids=ids).logits
    hf.register()
    assert torch.equal(model(input_ids=ids).logits, before)


def test_clear_errors():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.convert(torch.nn.Linear(2, 2), component="posrf", weights="orf", num_features=8)
    with pytest.raises(ValueError, match="backend"):
        hf.convert(tiny_llama(4), component="posrf", weights="orf", num_features=8, backend="gpu")
    model = tiny_llama(4)
    ids = prompt_with_left_padding()[0]
    # A cache that stores keys hands the attention more keys than queries.
    cache = DynamicCache()
    key = hf._model_cache_kwarg(model)
    model(input_ids=ids, use_cache=True, **{key: cache})
    with pytest.raises(ValueError, match="RFCache"):
        model(input_ids=ids[:, :1], use_cache=True, **{key: cache})
    # Custom 4D masks cannot be expressed.
    with pytest.raises(ValueError, match="2D padding mask"):
        model(input_ids=ids, attention_mask=torch.zeros(2, 1, 6, 6, dtype=torch.float64), use_cache=False)
    # Removing tokens from a state is impossible.
    rf_cache = hf.RFCache()
    hf.decode_step(model, ids, rf_cache)
    with pytest.raises(ValueError, match="cannot remove tokens"):
        rf_cache.crop(-1)
    # A model switched to the implementation without convert has no feature map.
    plain = LlamaForCausalLM(copy.deepcopy(model.config))
    for layer in plain.model.layers:
        assert not hasattr(layer.self_attn, hf.FEATURE_MAP_ATTR)
    with pytest.raises(ValueError, match="convert"):
        plain(input_ids=ids, use_cache=False)


def tiny_mistral(sliding_window: int = 3) -> "MistralForCausalLM":  # noqa: F821
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        sliding_window=sliding_window,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MistralForCausalLM(config).double().eval()


def test_sliding_window_model_converts_to_window_attention():
    """A Mistral-style model (config.sliding_window = 3 on every layer) converts to hybrid attention with
    window 3: each layer equals rf_attention(window=3) by hand, generate() with the RFCache equals
    recomputation, and a teacher recording runs the original sliding-window softmax model."""
    original = tiny_mistral(3)
    original.set_attn_implementation("eager")
    model = hf.convert(copy.deepcopy(original), component="posrf", weights="orf", num_features=8, seed=0, window=5)
    assert [layer.self_attn.rf_window for layer in model.model.layers] == [3, 3]
    ids, mask = prompt_with_left_padding(length=8)
    llama_layer_by_hand(model, ids)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 6))
    with hf.recording(teacher=True):
        teacher = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    expected = original(input_ids=ids, attention_mask=mask, use_cache=False).logits
    # (eager attention takes its softmax in fp32)
    assert_close(teacher[1], expected[1], torch.float32, name="teacher = sliding-window softmax model")
    assert_close(teacher[0, 2:], expected[0, 2:], torch.float32, name="teacher, kept positions")
    # distill records each layer's hybrid window and the sliding window of the attention it replaced
    from spectraformer_fused.fitting import record_attention_inputs

    records = record_attention_inputs(model, [dict(input_ids=ids, attention_mask=mask, use_cache=False)])
    assert [(r[0].window, r[0].target_window) for r in records.values()] == [(3, 3), (3, 3)]


def test_mixed_layer_types_convert_per_layer():
    """config.layer_types with full and sliding layers (Qwen2): the sliding layer gets its own window, the
    full one the window given to convert (None here: random features only); generate() equals recomputation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    assert config.layer_types == ["full_attention", "sliding_attention"]
    model = hf.convert(
        Qwen2ForCausalLM(config).double().eval(), component="posrf", weights="orf", num_features=8, seed=0
    )
    assert [layer.self_attn.rf_window for layer in model.model.layers] == [None, 3]
    ids, mask = prompt_with_left_padding(length=8)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 6))


def test_sliding_window_pattern_probe():
    """The mask function accepts the causal and bidirectional sliding windows of the given size only."""
    from transformers.masking_utils import (
        chunked_causal_mask_function,
        sliding_window_bidirectional_mask_function,
        sliding_window_causal_mask_function,
    )

    assert hf._is_sliding_pattern(sliding_window_causal_mask_function(4), 4)
    assert hf._is_sliding_pattern(sliding_window_bidirectional_mask_function(4), 4)
    assert not hf._is_sliding_pattern(sliding_window_causal_mask_function(4), 5)
    assert not hf._is_sliding_pattern(chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="chunked"):
        hf.spectraformer_mask(
            kv_length=6, mask_function=chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), local_size=4
        )


# -- grouped-query attention (k, v at H_kv < H heads, passed to rf_attention without repetition) ----------
def test_gqa_generate_and_layer_by_hand():
    model = tiny_llama(num_kv_heads=2)
    for layer in model.model.layers:
        assert layer.self_attn.rf_feature_map.num_heads == 2
    check_generate_matches_recompute(num_kv_heads=2)
    llama_layer_by_hand(model, prompt_with_left_padding()[0])


# -- attention transfer (distill) on a converted model ---------------------------------------------------
def test_distill_grouped_query_llama():
    """distill on a converted Llama with H_kv = 2 < H = 4: the teacher run is the softmax model, the recorded
    q, k are the rotated projections the attention function receives (checked through the first loss
    value, computed by hand), every layer's loss falls, and only the feature maps move."""
    convert_args = dict(component="hyprf", weights="learnable", num_features=16)
    model = tiny_llama(num_kv_heads=2, **convert_args)
    softmax = tiny_llama(num_kv_heads=2, **convert_args)
    softmax.set_attn_implementation("sdpa")
    with torch.no_grad():  # peaked attention (random weights give nearly uniform rows)
        for m in (model, softmax):
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight *= 6.0
                layer.self_attn.k_proj.weight *= 6.0
    ids, mask = prompt_with_left_padding(length=12, pad=3)
    batch = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    keep = mask.bool()

    # teacher recording: the converted model computes what the softmax model computes (real positions)
    with hf.recording(teacher=True) as calls:
        with torch.no_grad():
            logits = model(**batch).logits
    assert len(calls) == 2 and calls[0].k.shape[2] == 2 and calls[0].q.shape[2] == 4
    assert_close(logits[keep], softmax(**batch).logits[keep], name="teacher logits")

    # q, k by hand from each layer's input in the teacher run, and the first loss value from them
    layers = [layer.self_attn for layer in model.model.layers]
    seen = {}
    hooks = [
        attn.register_forward_hook(lambda mod, args, kwargs, out, i=i: seen.__setitem__(i, kwargs), with_kwargs=True)
        for i, attn in enumerate(layers)
    ]
    try:
        records = record_attention_inputs(model, [batch])
    finally:
        for h in hooks:
            h.remove()
    expected = {}
    for i, attn in enumerate(layers):
        x = seen[i]["hidden_states"]
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *seen[i]["position_embeddings"])
        rec = records[f"model.layers.{i}.self_attn"][0]
        assert_close(rec.q, q.transpose(1, 2), name=f"recorded q {i}")
        assert_close(rec.k, k.transpose(1, 2), name=f"recorded k {i}")
        assert rec.scale == attn.scaling and rec.causal and torch.equal(rec.key_padding_mask, keep)
        expected[f"model.layers.{i}.self_attn"] = sf.attention_distillation_loss(
            attn.rf_feature_map,
            q.transpose(1, 2).detach(),
            k.transpose(1, 2).detach(),
            scale=attn.scaling,
            causal=True,
            key_padding_mask=keep,
        )
    assert set(records) == set(expected)
    student = record_attention_inputs(model, [batch], teacher=False)  # the converted model as it is
    assert torch.equal(student["model.layers.0.self_attn"][0].q, records["model.layers.0.self_attn"][0].q)
    assert not torch.allclose(student["model.layers.1.self_attn"][0].q, records["model.layers.1.self_attn"][0].q)
    with hf.recording(teacher=True):
        with pytest.raises(ValueError, match="RFCache"):
            hf.decode_step(model, ids, hf.RFCache())
        with pytest.raises(ValueError, match="does not nest"):
            with hf.recording():
                pass

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if hf.FEATURE_MAP_ATTR not in n}
    fitted = {n: p.detach().clone() for n, p in model.named_parameters() if hf.FEATURE_MAP_ATTR in n}
    assert fitted
    curves = sf.distill(model, [batch], steps=30, lr=3e-2)
    assert set(curves) == set(expected)
    for name, curve in curves.items():
        assert_close(torch.tensor(curve[0], dtype=torch.float64), expected[name].detach(), name=f"{name} first loss")
        assert len(curve) == 30 and curve[-1] < 0.5 * curve[0], (name, curve)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
        else:
            assert not torch.equal(p, fitted[n]), n
