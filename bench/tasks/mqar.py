"""Multi-query associative recall (MQAR; Arora et al. 2024, "Zoology").

A sequence lists ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys), then asks for some of
the keys again at random later positions; at a query position the model must predict the value that
followed that key in the pairs. Positions between queries hold a filler token and are not scored. The
model is causal, so it can only answer by recalling the pair.

Token ids: 0 = filler, keys ``1 .. num_keys``, values ``num_keys + 1 .. vocab_size - 1`` with
``num_keys = (vocab_size - 1) // 2``. Targets are -100 (ignored) except at query positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 8192
    num_pairs: int = 64
    seq_len: int = 256
    num_queries: int | None = None  # default: every key once
    train_size: int = 100_000
    val_size: int = 2_000
    test_size: int = 3_000

    def __post_init__(self):
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
    x[:, 0 : 2 * N : 2], x[:, 1 : 2 * N : 2] = keys, values
    which = torch.rand(n, N, generator=g).argsort(-1)[:, :Q]  # asked pairs
    tail = T - 2 * N
    pos = torch.rand(n, tail, generator=g).argsort(-1)[:, :Q].sort(-1).values + 2 * N  # query positions
    x.scatter_(1, pos, keys.gather(1, which))
    y.scatter_(1, pos, values.gather(1, which))
    return x, y


def mqar_splits(config: MQARConfig, seed: int = 0) -> dict:
    """``{"train"|"val"|"test": (inputs, targets)}``, each split from its own generator."""
    sizes = {"train": config.train_size, "val": config.val_size, "test": config.test_size}
    return {name: generate_mqar(n, config, seed * 1000 + i) for i, (name, n) in enumerate(sizes.items())}
