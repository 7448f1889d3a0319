"""Test configuration.

* Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before any
  kernel module is imported, which is why it is set here, at collection time.
* ``torch.empty`` / ``torch.empty_like`` are poisoned with NaN, so an output element a kernel forgot to
  write fails loudly instead of passing by luck.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t):
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(float("nan"))
    return t


def _poisoned_empty(*args, **kwargs):
    return _poison(_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
