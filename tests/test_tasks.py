"""The generated tasks: labels on hand-checked examples, length bounds, fixed seeds give fixed splits."""

import pytest
import torch

from bench.tasks import ListOpsConfig, MQARConfig, evaluate_listops, generate_listops, generate_mqar, listops_splits
from bench.tasks.listops import TOKEN_ID, encode, parse_listops, tokens
from bench.tasks.mqar import IGNORE


@pytest.mark.parametrize(
    "text, label",
    [
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 3 [MAX 8 1 ] 5 ]", 3),
        ("[MED 4 3 6 1 7 1 3 7 ]", 3),  # sorted 1 1 3 3 4 6 7 7: (3 + 4) // 2
        ("[MED 9 0 5 ]", 5),
        ("[SM 4 5 3 4 [MIN 4 8 9 ] 1 5 1 5 3 ]", 5),  # 35 mod 10
        ("[MIN [SM 8 0 4 8 2 5 2 [MAX 0 5 4 0 ] 2 ] 9 ]", 6),
        ("[SM [SM 9 9 ] [MED 2 8 ] ]", 3),  # 18 % 10 = 8, median 5, 13 % 10
        ("7", 7),
    ],
    ids=lambda v: str(v)[:24],
)
def test_listops_labels_hand_checked(text, label):
    tree = parse_listops(text)
    assert evaluate_listops(tree) == label
    assert " ".join(tokens(tree)) == text


def test_listops_generated_examples_are_consistent():
    cfg = ListOpsConfig(min_length=12, max_length=40, max_depth=4, max_args=5)
    ex = generate_listops(300, cfg, seed=3)
    for toks, label in ex:
        assert cfg.min_length <= len(toks) < cfg.max_length
        assert evaluate_listops(parse_listops(" ".join(toks))) == label
        assert toks[0].startswith("[") and toks.count("]") == sum(t.startswith("[") for t in toks)
    depth = max(max(_depths(toks)) for toks, _ in ex)
    assert depth <= cfg.max_depth - 1  # depth 1 is the root operator; leaves sit at max_depth
    assert max(sum(1 for _ in _args(toks)) for toks, _ in ex) <= cfg.max_args
    assert len({y for _, y in ex}) == 10


def _depths(toks):
    d = 0
    for t in toks:
        d += t.startswith("[")
        d -= t == "]"
        yield d


def _args(toks):
    # number of arguments of the root operator
    d = 0
    for t in toks[1:-1]:
        if d == 0:
            yield t
        d += t.startswith("[")
        d -= t == "]"


def test_listops_splits_fixed_by_seed_and_distinct():
    cfg = ListOpsConfig(min_length=8, max_length=30, train_size=40, val_size=10, test_size=10)
    a, b, c = listops_splits(cfg, 0), listops_splits(cfg, 0), listops_splits(cfg, 1)
    for name in ("train", "val", "test"):
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    assert not torch.equal(a["train"][0][:10], c["train"][0][:10])
    assert not torch.equal(a["val"][0], a["test"][0])
    ids, y = a["train"]
    assert ids.shape[0] == 40 and y.min() >= 0 and y.max() <= 9
    lengths = (ids != TOKEN_ID["<pad>"]).sum(1)
    assert lengths.min() >= 8 and lengths.max() < 30


def test_listops_encode_pads_with_zero():
    ids, y = encode([(["[MAX", "1", "2", "]"], 2), (["5"], 5)])
    assert ids.tolist() == [[TOKEN_ID["[MAX"], TOKEN_ID["1"], TOKEN_ID["2"], TOKEN_ID["]"]], [TOKEN_ID["5"], 0, 0, 0]]
    assert y.tolist() == [2, 5]


def test_mqar_targets_are_the_paired_values():
    cfg = MQARConfig(vocab_size=21, num_pairs=5, seq_len=24, num_queries=4)
    x, y = generate_mqar(50, cfg, seed=0)
    assert x.shape == y.shape == (50, 24)
    for xi, yi in zip(x.tolist(), y.tolist()):
        keys, values = xi[0:10:2], xi[1:10:2]
        assert len(set(keys)) == 5 and all(1 <= k <= cfg.num_keys for k in keys)
        assert all(cfg.num_keys < v < cfg.vocab_size for v in values)
        pairs = dict(zip(keys, values))
        asked = [(t, xi[t], yi[t]) for t in range(24) if yi[t] != IGNORE]
        assert len(asked) == 4 and all(t >= 10 for t, _, _ in asked)
        assert all(pairs[k] == v for _, k, v in asked)
        assert len({k for _, k, _ in asked}) == 4
        assert all(xi[t] == 0 for t in range(10, 24) if yi[t] == IGNORE)
        assert all(yi[t] == IGNORE for t in range(10))


def test_mqar_hand_checked_layout():
    cfg = MQARConfig(vocab_size=9, num_pairs=2, seq_len=6)  # keys 1-4, values 5-8
    x, y = generate_mqar(1, cfg, seed=7)
    k1, v1, k2, v2, q1, q2 = x[0].tolist()
    assert {q1, q2} == {k1, k2}
    expect = {k1: v1, k2: v2}
    assert y[0].tolist() == [IGNORE] * 4 + [expect[q1], expect[q2]]


def test_mqar_fixed_by_seed():
    cfg = MQARConfig(vocab_size=33, num_pairs=4, seq_len=16)
    assert torch.equal(generate_mqar(20, cfg, 5)[0], generate_mqar(20, cfg, 5)[0])
    assert not torch.equal(generate_mqar(20, cfg, 5)[0], generate_mqar(20, cfg, 6)[0])


@pytest.mark.parametrize(
    "kwargs, what",
    [
        (dict(vocab_size=9, num_pairs=5, seq_len=20), "keys"),
        (dict(vocab_size=33, num_pairs=4, seq_len=10), "seq_len"),
        (dict(vocab_size=33, num_pairs=4, seq_len=16, num_queries=5), "num_queries"),
    ],
)
def test_mqar_bad_config(kwargs, what):
    with pytest.raises(ValueError, match=what):
        MQARConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, what",
    [
        (dict(min_length=50, max_length=50), "min_length"),
        (dict(max_depth=1), "max_depth"),
        (dict(max_args=1), "max_args"),
    ],
)
def test_listops_bad_config(kwargs, what):
    with pytest.raises(ValueError, match=what):
        ListOpsConfig(**kwargs)
