"""ListOps as in the Long Range Arena (Tay et al. 2021; generator of Nangia & Bowman 2018).

Operators MAX, MIN, MED (median, rounded down) and SM (sum mod 10) over the digits 0-9, nested up to
``max_depth`` levels with 2 to ``max_args`` arguments each; the label (10 classes) is the value of the
expression. Recipe of LRA's ``listops.py``: a node is a digit with probability 3/4 (always at the
maximum depth) and otherwise an operator with ``randint(2, max_args)`` children; trees are drawn until
their token count lies in ``[min_length, max_length)``. The token sequence is LRA's input with the
binary-tree parentheses removed: ``[MAX 2 9 [MIN 4 7 ] 0 ]``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
PAD = "<pad>"
# Token ids: 0 = padding, 1-10 = digits 0-9, then the operators and the closing bracket.
VOCAB = (PAD,) + tuple(str(d) for d in range(10)) + OPERATORS + (END,)
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
NUM_CLASSES = 10
VALUE_P = 0.25  # LRA's constant: an operator when random() <= VALUE_P, a digit otherwise


@dataclass(frozen=True)
class ListOpsConfig:
    """LRA's ListOps: lengths 500-2000, depth 10, 10 arguments, 96k/2k/2k examples."""

    min_length: int = 500
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10
    train_size: int = 96_000
    val_size: int = 2_000
    test_size: int = 2_000

    def __post_init__(self):
        if not 1 <= self.min_length < self.max_length:
            raise ValueError(f"need 1 <= min_length < max_length, got {self.min_length}, {self.max_length}")
        if self.max_depth < 2:
            raise ValueError(f"max_depth must be >= 2 (depth 1 is a single digit), got {self.max_depth}")
        if self.max_args < 2:
            raise ValueError(f"max_args must be >= 2, got {self.max_args}")


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: float = math.inf):
    """(tree, token count); a tree is a digit or (operator, [subtrees]). Raises ``_TooLong`` as soon as the
    tree has more than ``budget`` tokens: a tree that long is rejected anyway, so stopping early changes
    nothing in the distribution of the accepted trees, only the time spent on rejected ones."""
    if depth >= max_depth or rng.random() > VALUE_P:
        return rng.randrange(10), 1
    n = rng.randint(2, max_args)
    children, length = [], 2
    for _ in range(n):
        child, child_len = _tree(rng, depth + 1, max_depth, max_args, budget - length)
        children.append(child)
        length += child_len
        if length > budget:
            raise _TooLong
    return (rng.choice(OPERATORS), children), length


def evaluate_listops(tree) -> int:
    """The value of a tree given as nested ``(operator, [arguments])`` with digit leaves."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = sorted(evaluate_listops(a) for a in args)
    if op == "[MAX":
        return vals[-1]
    if op == "[MIN":
        return vals[0]
    if op == "[MED":
        n = len(vals)
        return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) // 2  # int(np.median(...))
    if op == "[SM":
        return sum(vals) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def tokens(tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    out = [op]
    for a in args:
        out += tokens(a)
    return out + [END]


def parse_listops(text: str):
    """The tree of a space-separated token string (the inverse of ``" ".join(tokens(tree))``)."""
    stack, root = [], None
    for tok in text.split():
        if tok in OPERATORS:
            stack.append((tok, []))
        elif tok == END:
            if not stack:
                raise ValueError(f"unbalanced ']' in {text!r}")
            node = stack.pop()
            if stack:
                stack[-1][1].append(node)
            else:
                root = node
        elif tok.isdigit() and len(tok) == 1:
            if stack:
                stack[-1][1].append(int(tok))
            else:
                root = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r}")
    if stack or root is None:
        raise ValueError(f"incomplete ListOps expression {text!r}")
    return root


def generate_listops(n: int, config: ListOpsConfig, seed: int) -> list[tuple[list[str], int]]:
    """``n`` examples ``(tokens, label)`` drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        try:
            tree, length = _tree(rng, 1, config.max_depth, config.max_args, config.max_length - 1)
        except _TooLong:
            continue
        if config.min_length <= length < config.max_length:
            out.append((tokens(tree), evaluate_listops(tree)))
    return out


def encode(examples, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[N, T]`` (0 = padding, T the longest example or ``pad_to``) and labels ``[N]``."""
    T = pad_to or max(len(t) for t, _ in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    for i, (toks, _) in enumerate(examples):
        ids[i, : len(toks)] = torch.tensor([TOKEN_ID[t] for t in toks])
    return ids, torch.tensor([y for _, y in examples], dtype=torch.long)


def listops_splits(config: ListOpsConfig, seed: int = 0) -> dict:
    """``{"train"|"val"|"test": (ids [N, T], labels [N])}``, each split from its own generator."""
    sizes = {"train": config.train_size, "val": config.val_size, "test": config.test_size}
    return {name: encode(generate_listops(n, config, seed * 1000 + i)) for i, (name, n) in enumerate(sizes.items())}
