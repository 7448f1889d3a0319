"""Linearizing whole models: stage 2 (finetune) after attention transfer, the linearize command, saving and
loading. The models are a tiny BERT and a tiny Llama with grouped-query attention, built and pre-trained
with softmax attention here (bench.report.linearize.build_tiny: a few seconds), with a word-level tokenizer."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402

from bench.report.linearize import build_tiny  # noqa: E402
from spectraformer_fused import fitting  # noqa: E402
from spectraformer_fused import linearize as lz  # noqa: E402
from spectraformer_fused.integrations import transformers as hf  # noqa: E402

FAST = dict(steps_distill=15, steps_finetune=30, lr_finetune=3e-3, held_out=16, batch_size=16, verbose=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{kind: model directory} of the pre-trained tiny models (each with its tokenizer and data.txt)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in ("tiny-bert", "tiny-llama"):
        build_tiny(kind, str(root / kind), steps=120, lines=80)
        out[kind] = str(root / kind)
    return out


def data_of(d):
    return os.path.join(d, "data.txt")


def check_round_trip(model, out_dir, lines, task):
    """load_linearized(out_dir) gives the outputs of the model that was saved, exactly."""
    loaded = lz.load_linearized(out_dir)
    assert type(loaded) is type(model)
    tok = lz.load_tokenizer(out_dir)
    (batch,) = lz.make_batches(tok, lines, batch_size=len(lines), max_length=32)
    got, want = lz._outputs(loaded, batch, task), lz._outputs(model, batch, task)
    assert torch.equal(got, want), f"max |diff| {float((got - want).abs().max()):.3g} after the round trip"
    fm_keys = [k for k in loaded.state_dict() if f".{hf.FEATURE_MAP_ATTR}." in k]
    assert fm_keys and all(torch.equal(loaded.state_dict()[k], model.state_dict()[k]) for k in fm_keys)
    return loaded


# -- the pipeline on an encoder and on a causal LM ----------------------------------------------------
def test_bert_stage2_beats_stage1_and_round_trip(tiny, tmp_path):
    d = tiny["tiny-bert"]
    out = str(tmp_path / "bert-linear")
    rep = lz.linearize(
        d,
        component="hedgehog",
        weights="learnable",
        num_features=16,
        data=data_of(d),
        out=out,
        train="attention",
        **FAST,
    )
    err = {s: lz.held_out_error(rep["stages"][s]["metrics"]) for s in lz.STAGES}
    print({s: rep["stages"][s]["metrics"] for s in lz.STAGES})
    assert err["distill"] < err["convert"], err
    assert err["finetune"] < 0.5 * err["distill"], err
    fin = rep["stages"]["finetune"]["metrics"]
    assert fin["cosine"] > rep["stages"]["distill"]["metrics"]["cosine"]
    assert 0.0 <= fin["nn_agreement"] <= 1.0 and fin["texts"] == 16
    assert len(rep["finetune_curve"]) == 30 and all(t >= 0 for t in rep["times_s"].values())
    # the files: the model, the tokenizer, the conversion arguments and the report
    with open(os.path.join(out, lz.META_FILE)) as f:
        meta = json.load(f)
    assert meta["task"] == "encoder" and meta["convert"]["component"] == "hedgehog" and "window" not in meta["convert"]
    with open(os.path.join(out, lz.REPORT_JSON)) as f:
        assert json.load(f)["stages"]["finetune"]["metrics"] == fin
    assert "| finetune |" in open(os.path.join(out, lz.REPORT_MD)).read()
    check_round_trip(rep["model"], out, lz.read_lines(data_of(d))[:5], "encoder")


def test_llama_gqa_command_with_lora(tiny, tmp_path, capsys):
    """The command on a causal LM with H_kv = 2 < H = 4, stage 2 through LoRA adapters (peft), merged: the
    saved model loads without peft and gives the same logits."""
    pytest.importorskip("peft")
    d = tiny["tiny-llama"]
    out = str(tmp_path / "llama-linear")
    args = [d, "--component", "hyprf", "--weights", "learnable", "--num-features", "16", "--data", data_of(d)]
    args += ["--out", out, "--steps-distill", "15", "--steps-finetune", "30", "--lr-finetune", "3e-3"]
    args += ["--train", "lora", "--lora-rank", "4", "--held-out", "16", "--batch-size", "16", "--quiet"]
    assert lz.main(args) == 0
    printed = capsys.readouterr().out
    assert "| finetune |" in printed and "load_linearized" in printed
    with open(os.path.join(out, lz.REPORT_JSON)) as f:
        rep = json.load(f)
    stages = rep["stages"]
    print({s: stages[s]["metrics"] for s in lz.STAGES})
    assert rep["task"] == "causal-lm" and rep["train"] == "lora"
    kl = {s: stages[s]["metrics"]["kl"] for s in lz.STAGES}
    assert kl["distill"] < kl["convert"] and kl["finetune"] < 0.5 * kl["distill"], kl
    fin = stages["finetune"]["metrics"]
    assert fin["greedy_agreement"] >= stages["convert"]["metrics"]["greedy_agreement"]
    assert fin["teacher_ppl"] == stages["convert"]["metrics"]["teacher_ppl"]
    loaded = lz.load_linearized(out)
    for layer in loaded.model.layers:
        assert layer.self_attn.rf_feature_map.num_heads == 2
        assert type(layer.self_attn.q_proj) is torch.nn.Linear  # the adapters were merged
    assert not any("lora" in k for k in loaded.state_dict())
    # the saved model equals the one the pipeline evaluated: same held-out metrics after loading
    teacher, _ = lz.load_model(d)
    tok = lz.load_tokenizer(out)
    train, test = lz.split_lines(lz.read_lines(data_of(d)), 16, 0)
    again = lz.evaluate(loaded, teacher, lz.make_batches(tok, test, batch_size=16, max_length=128), "causal-lm")
    assert again["kl"] == pytest.approx(fin["kl"], rel=1e-5) and again["greedy_agreement"] == fin["greedy_agreement"]


def test_window_is_passed_to_convert(tiny, tmp_path):
    """--window W reaches convert(..., window=W) and is saved with the conversion arguments. convert gains
    its window= keyword on another branch: until then this raises a TypeError from convert."""
    d = tiny["tiny-llama"]
    out = str(tmp_path / "llama-window")
    fast = dict(FAST, steps_distill=5, steps_finetune=5)
    rep = lz.linearize(
        d, component="hyprf", weights="learnable", num_features=16, window=4, data=data_of(d), out=out, **fast
    )
    assert rep["convert_args"]["window"] == 4
    with open(os.path.join(out, lz.META_FILE)) as f:
        assert json.load(f)["convert"]["window"] == 4
    check_round_trip(rep["model"], out, lz.read_lines(data_of(d))[:4], "causal-lm")


# -- finetune on its own ---------------------------------------------------------------------------
def converted_pair(d, **convert_args):
    teacher, task = lz.load_model(d)
    args = dict(component="posrf", weights="learnable", num_features=16, seed=0, **convert_args)
    return hf.convert(copy.deepcopy(teacher), **args), teacher, task


def test_finetune_moves_only_what_it_is_asked_to(tiny):
    student, teacher, _ = converted_pair(tiny["tiny-bert"])
    (batch,) = lz.make_batches(
        lz.load_tokenizer(tiny["tiny-bert"]), lz.read_lines(data_of(tiny["tiny-bert"]))[:8], batch_size=8, max_length=32
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    projections = set(fitting.attention_projections(student))
    assert (
        "encoder.layer.0.attention.self.query" in projections
        and "encoder.layer.1.attention.output.dense" in projections
    )
    curve = fitting.finetune(student, teacher, [batch], steps=4, lr=1e-2, train="attention")
    assert len(curve) == 4
    for n, p in student.named_parameters():
        moved = not torch.equal(p, before[n])
        expected = hf.FEATURE_MAP_ATTR in n or n.rsplit(".", 1)[0] in projections
        assert moved == expected, n
        assert p.grad is None, n
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    fitting.finetune(student, teacher, [batch], steps=2, lr=1e-2, train="feature_maps")
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) != (hf.FEATURE_MAP_ATTR in n), n


def test_chunked_kl_equals_full_kl_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 13, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 13, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    got = fitting.output_loss(s, t, mask, "logits", chunk_size=4)
    logp, logq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    want = (logp.exp() * (logp - logq)).sum(-1)[mask].mean()
    assert_close(got, want, torch.float64, name="chunked kl")
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    assert_close(g_got, g_want, torch.float64, name="gradient of the chunked kl")
    h = fitting.output_loss(s, t, mask, "hidden")
    assert_close(h, (s - t).pow(2).mean(-1)[mask].mean(), torch.float64, name="hidden mse")


def test_progress_without_tqdm_prints_plain_lines(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    bar = fitting._Progress(20, "finetune", True)
    for _ in range(20):
        bar.update(0.5)
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 10 and err[-1].startswith("finetune: 20/20") and "loss 0.5" in err[-1]
    silent = fitting._Progress(20, "x", False)
    silent.update(1.0)
    assert capsys.readouterr().err == ""


def test_finetune_clear_errors(tiny):
    student, teacher, _ = converted_pair(tiny["tiny-bert"])
    (batch,) = lz.make_batches(lz.load_tokenizer(tiny["tiny-bert"]), ["red cat = red cat"], batch_size=1, max_length=8)
    ok = dict(steps=1, lr=1e-3)
    with pytest.raises(TypeError, match="teacher"):
        fitting.finetune(student, "teacher", [batch], **ok)
    with pytest.raises(ValueError, match="separate copy"):
        fitting.finetune(student, student, [batch], **ok)
    with pytest.raises(ValueError, match="unknown target"):
        fitting.finetune(student, teacher, [batch], target="tokens", **ok)
    with pytest.raises(ValueError, match="unknown train"):
        fitting.finetune(student, teacher, [batch], train="everything", **ok)
    with pytest.raises(ValueError, match="steps"):
        fitting.finetune(student, teacher, [batch], steps=-1, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        fitting.finetune(student, teacher, [batch], steps=1, lr=0.0)
    with pytest.raises(ValueError, match="lora_rank"):
        fitting.finetune(student, teacher, [batch], train="lora", lora_rank=0, **ok)
    with pytest.raises(TypeError, match="progress"):
        fitting.finetune(student, teacher, [batch], progress="yes", **ok)
    with pytest.raises(ValueError, match="empty"):
        fitting.finetune(student, teacher, [], **ok)
    with pytest.raises(ValueError, match="no converted attention layer"):
        fitting.finetune(teacher, copy.deepcopy(teacher), [batch], **ok)
    with pytest.raises(ValueError, match="before conversion"):
        fitting.finetune(student, copy.deepcopy(student), [batch], **ok)
    with pytest.raises(TypeError, match="target='logits'"):
        fitting.finetune(student, teacher, [batch], target="logits", **ok)
    orf = hf.convert(copy.deepcopy(teacher), component="posrf", weights="orf", num_features=8, seed=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fitting.finetune(orf, teacher, [batch], **ok)
    fitting.finetune(orf, teacher, [batch], train="attention", **ok)  # the projections can still move


# -- the command's inputs ----------------------------------------------------------------------------
def test_linearize_clear_errors(tiny, tmp_path):
    d = tiny["tiny-bert"]
    args = dict(component="hedgehog", weights="learnable", num_features=8, **FAST)
    with pytest.raises(ValueError, match="does not exist"):
        lz.linearize(str(tmp_path / "nowhere"), data=data_of(d), **args)
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        lz.linearize(str(tmp_path / "empty-dir"), data=data_of(d), **args)
    with pytest.raises(ValueError, match="data file .* does not exist"):
        lz.linearize(d, data=str(tmp_path / "missing.txt"), **args)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="holds no text"):
        lz.linearize(d, data=str(blank), **args)
    few = tmp_path / "few.txt"
    few.write_text("red cat = red cat\nblue dog = blue dog\n")
    with pytest.raises(ValueError, match="leaves no training line"):
        lz.linearize(d, data=str(few), **args)
    with pytest.raises(ValueError, match="unknown train"):
        lz.linearize(d, data=data_of(d), **dict(args, train="all"))
    # a model directory without a tokenizer: a clear error that names --tokenizer, which fixes it
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(d, name), bare / name)
    with pytest.raises(ValueError, match="--tokenizer"):
        lz.linearize(str(bare), data=data_of(d), **args)
    # a model convert refuses (cross-attention layers)
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    cfg.is_decoder, cfg.add_cross_attention = True, True
    cross = tmp_path / "cross"
    BertLMHeadModel(cfg).save_pretrained(cross)
    shutil.copy(os.path.join(d, "tokenizer.json"), cross / "tokenizer.json")
    shutil.copy(os.path.join(d, "tokenizer_config.json"), cross / "tokenizer_config.json")
    with pytest.raises(ValueError, match="cross-attention"):
        lz.linearize(str(cross), data=data_of(d), **args)
    # load_linearized of a directory linearize did not write
    with pytest.raises(ValueError, match="linearize.json"):
        lz.load_linearized(d)


def test_command_reports_errors_and_usage(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        lz.main([str(tmp_path / "nowhere"), "--component", "posrf", "--weights", "learnable", "--num-features", "8"])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err  # argparse: a required option is missing
    with pytest.raises(SystemExit) as exc:
        lz.main([str(tmp_path / "nowhere"), "--component", "posrf", "--weights", "learnable", "--num-features", "8",
                 "--data", data_of(tiny["tiny-bert"]), "--out", str(tmp_path / "o"), "--quiet"])  # fmt: skip
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


# -- hybrid layers with sinks and the exact-part factor; stage 1 on the attention outputs --------------------
def fm_tensors(model, name):
    return {k: v for k, v in model.state_dict().items() if k.endswith(f".{hf.FEATURE_MAP_ATTR}.{name}")}


def test_mix_and_output_loss_are_fitted_saved_and_loaded(tiny, tmp_path):
    """mix=G reaches convert (a log_mix per layer, starting at log G), stage 1 fits the attention outputs
    (distill_loss='mse') and moves the factor; it is saved with the conversion arguments and
    load_linearized gives back the same layers, their fitted log_mix included."""
    import math

    d = tiny["tiny-llama"]
    out = str(tmp_path / "llama-mix")
    fast = dict(FAST, steps_distill=8, steps_finetune=0)  # what moves, stage 1 moved
    rep = lz.linearize(
        d,
        component="hedgehog",
        weights="learnable",
        num_features=8,
        window=4,
        mix=0.1,
        distill_loss="mse",
        data=data_of(d),
        out=out,
        **fast,
    )
    assert rep["convert_args"]["mix"] == 0.1 and rep["distill_loss"] == "mse"
    err = {s: lz.held_out_error(rep["stages"][s]["metrics"]) for s in ("convert", "distill")}
    assert err["distill"] < err["convert"], err
    with open(os.path.join(out, lz.META_FILE)) as f:
        assert json.load(f)["convert"]["mix"] == 0.1
    mixes = fm_tensors(rep["model"], "log_mix")
    assert len(mixes) == len(rep["model"].model.layers)
    assert all(not torch.allclose(t, torch.full_like(t, math.log(0.1))) for t in mixes.values()), mixes
    loaded = check_round_trip(rep["model"], out, lz.read_lines(data_of(d))[:4], "causal-lm")
    back = fm_tensors(loaded, "log_mix")
    assert back.keys() == mixes.keys() and all(torch.equal(back[k], mixes[k]) for k in mixes)


def test_sinks_are_passed_to_convert_and_round_trip(tiny, tmp_path):
    """sinks=S reaches convert(..., sinks=S) (the layers' rf_sinks), with mix and a window; saved and loaded
    back as the same layers."""
    d = tiny["tiny-llama"]
    out = str(tmp_path / "llama-sinks")
    fast = dict(FAST, steps_distill=5, steps_finetune=3)
    rep = lz.linearize(
        d,
        component="hyprf",
        weights="learnable",
        num_features=16,
        window=4,
        sinks=2,
        mix=0.5,
        distill_loss="mse",
        data=data_of(d),
        out=out,
        **fast,
    )
    assert rep["convert_args"]["sinks"] == 2 and rep["convert_args"]["mix"] == 0.5
    with open(os.path.join(out, lz.META_FILE)) as f:
        meta = json.load(f)["convert"]
    assert meta["sinks"] == 2 and meta["window"] == 4
    loaded = check_round_trip(rep["model"], out, lz.read_lines(data_of(d))[:4], "causal-lm")
    for layer in loaded.model.layers:
        assert getattr(layer.self_attn, "rf_sinks", None) == 2
        assert layer.self_attn.rf_feature_map.log_mix is not None


def test_command_flags_and_preset(monkeypatch, tmp_path):
    """--sinks, --mix [G], --distill-loss reach linearize(); --preset lolcats fills in LoLCATs' settings for
    the options not given (explicit ones win); without a preset --component, --weights and
    --num-features are required."""
    seen = {}

    def fake(model_dir, **kwargs):
        seen.clear()
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(lz, "linearize", fake)
    base = [str(tmp_path), "--data", "x.txt", "--out", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(SystemExit):
        lz.main(base + ["--component", "hyprf", "--weights", "learnable", "--num-features", "8", "--sinks", "4",
                        "--mix", "--distill-loss", "mse"])  # fmt: skip
    assert seen["sinks"] == 4 and seen["mix"] == 1.0 and seen["distill_loss"] == "mse" and seen["window"] is None
    assert seen["train"] == "feature_maps" and seen["lora_rank"] == 8
    with pytest.raises(SystemExit):
        lz.main(base + ["--component", "hyprf", "--weights", "learnable", "--num-features", "8", "--mix", "0.25"])
    assert seen["mix"] == 0.25 and seen["sinks"] is None and seen["distill_loss"] == "kl"
    with pytest.raises(SystemExit):
        lz.main(base + ["--preset", "lolcats", "--window", "16"])
    want = dict(lz.PRESETS["lolcats"], window=16)
    assert {k: seen[k] for k in want} == want
    assert want["sinks"] == 4 and want["distill_loss"] == "mse" and want["train"] == "lora" and want["lora_rank"] == 8
    with pytest.raises(SystemExit) as exc:
        lz.main(base + ["--weights", "learnable"])
    assert exc.value.code == 2


def test_linearize_rejects_bad_sinks_mix_and_loss(tiny):
    d = tiny["tiny-llama"]
    args = dict(component="hyprf", weights="learnable", num_features=8, data=data_of(d), **FAST)
    for bad, err, match in (
        (dict(sinks=-1), ValueError, "sinks must be a non-negative int"),
        (dict(sinks=True), TypeError, "sinks must be a non-negative int"),
        (dict(sinks=2.0), TypeError, "sinks must be a non-negative int"),
        (dict(mix=-1.0), ValueError, "mix must be a positive finite factor"),
        (dict(mix="big"), TypeError, "mix must be None, a bool or a positive float"),
        (dict(distill_loss="output"), ValueError, "distill_loss"),
    ):
        with pytest.raises(err, match=match):
            lz.linearize(d, **args, **bad)
