"""Test configuration.

* Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before any
  kernel module is imported, which is why it is set here, at collection time.
* ``torch.empty`` / ``torch.empty_like`` are poisoned with NaN, so an output element a kernel forgot to
  write fails loudly instead of passing by luck.
* Hypothesis profiles (``HYPOTHESIS_PROFILE``): "ci", the default, draws the same examples on every run
  (``derandomize``), keeps no example database and sets no deadline (the Triton interpreter is slow and
  the machine may be loaded) and does not shrink a failing example (shrinking through the Triton
  interpreter takes many minutes; the failing example is printed as drawn); "explore" draws fresh
  examples each run, to look for new failures locally.
  Each property test sets its own bounded ``max_examples``.
* Marker ``gpu``: the test needs a CUDA device and is skipped without one (``-m gpu`` selects them).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    deadline=None,
    derandomize=False,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("marked gpu: needs a CUDA device")


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
