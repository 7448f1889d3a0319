"""Multi-query associative recall (MQAR; Arora et al. 2024, "Zoology").

A sequence lists ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys), then asks for some of
the keys again at random later positions; at a query position the model must predict the value that
followed that key in the pairs. Positions between queries hold a filler token and are not scored. The
model is causal, so it can only answer by recalling the pair.

``layout="spread"`` scatters the pairs over the whole sequence instead of listing them first: every pair
sits at a random place and each of its queries at a random later one, so the distance from a query back
to its pair ranges from 1 to nearly ``seq_len`` (the hybrid-window benchmark, ``bench/report/window.py``, uses it
with ``seq_len >= 8 W`` so that most pairs lie outside a window of W recent tokens).

Token ids: 0 = filler, keys ``1 .. num_keys``, values ``num_keys + 1 .. vocab_size - 1`` with
``num_keys = (vocab_size - 1) // 2``. Targets are -100 (ignored) except at query positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
LAYOUTS = ("front", "spread")


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 8192
    num_pairs: int = 64
    seq_len: int = 256
    num_queries: int | None = None  # default: every key once
    train_size: int = 100_000
    val_size: int = 2_000
    test_size: int = 3_000
    layout: str = "front"  # "front": pairs first (Zoology); "spread": pairs anywhere, each query after its pair

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.num_keys < self.num_pairs:
            raise ValueError(
                f"vocab_size {self.vocab_size} gives {self.num_keys} keys, fewer than num_pairs={self.num_pairs}"
            )
        if not 1 <= self.queries <= self.num_pairs:
            raise ValueError(f"num_queries must lie in [1, num_pairs={self.num_pairs}], got {self.num_queries}")
        if self.seq_len < 2 * self.num_pairs + self.queries:
            raise ValueError(
                f"seq_len {self.seq_len} is shorter than 2 * num_pairs + num_queries = "
                f"{2 * self.num_pairs + self.queries}"
            )

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - 1) // 2

    @property
    def num_values(self) -> int:
        return self.vocab_size - 1 - self.num_keys

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries


def generate_mqar(n: int, config: MQARConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[n, seq_len]`` and targets ``[n, seq_len]`` (value id at query positions, else -100)."""
    g = torch.Generator().manual_seed(seed)
    N, Q, T = config.num_pairs, config.queries, config.seq_len
    keys = torch.rand(n, config.num_keys, generator=g).argsort(-1)[:, :N] + 1  # distinct keys
    values = torch.randint(0, config.num_values, (n, N), generator=g) + 1 + config.num_keys
    x = torch.zeros(n, T, dtype=torch.long)
    y = torch.full((n, T), IGNORE, dtype=torch.long)
    if config.layout == "spread":
        return _spread(x, y, keys, values, N, Q, T, g)
    x[:, 0 : 2 * N : 2], x[:, 1 : 2 * N : 2] = keys, values
    which = torch.rand(n, N, generator=g).argsort(-1)[:, :Q]  # asked pairs
    tail = T - 2 * N
    pos = torch.rand(n, tail, generator=g).argsort(-1)[:, :Q].sort(-1).values + 2 * N  # query positions
    x.scatter_(1, pos, keys.gather(1, which))
    y.scatter_(1, pos, values.gather(1, which))
    return x, y


def _spread(x, y, keys, values, N, Q, T, g):
    """The spread layout: N pairs (two tokens each) and Q queries as N + Q items in a random order in which
    every query follows its pair, placed on random distinct positions in that order."""
    n = x.shape[0]
    which = torch.rand(n, N, generator=g).argsort(-1)[:, :Q]  # asked pairs
    t_pair = torch.rand(n, N, generator=g)
    t_query = t_pair.gather(1, which)
    t_query = t_query + (1 - t_query) * torch.rand(n, Q, generator=g)  # after its pair
    order = torch.cat([t_pair, t_query], 1).argsort(-1)  # item ids in sequence order: < N pairs, >= N queries
    is_pair = order < N
    # a pair takes two tokens: choose N + Q of the T - N "units", then shift by the pairs placed before
    units = torch.rand(n, T - N, generator=g).argsort(-1)[:, : N + Q].sort(-1).values
    pos = units + is_pair.long().cumsum(1) - is_pair.long()  # [n, N + Q] token position of each item
    item_pos = torch.empty_like(pos).scatter_(1, order, pos)  # position of item i
    pair_pos, query_pos = item_pos[:, :N], item_pos[:, N:]
    x.scatter_(1, pair_pos, keys)
    x.scatter_(1, pair_pos + 1, values)
    x.scatter_(1, query_pos, keys.gather(1, which))
    y.scatter_(1, query_pos, values.gather(1, which))
    return x, y


def mqar_splits(config: MQARConfig, seed: int = 0) -> dict:
    """``{"train"|"val"|"test": (inputs, targets)}``, each split from its own generator."""
    sizes = {"train": config.train_size, "val": config.val_size, "test": config.test_size}
    return {name: generate_mqar(n, config, seed * 1000 + i) for i, (name, n) in enumerate(sizes.items())}
