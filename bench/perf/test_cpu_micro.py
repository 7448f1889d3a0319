"""CPU micro-benchmarks (pytest-benchmark): ``pytest bench -q``. Small shapes, inputs made outside the
timed region, one warm-up round; each benchmark also checks its output against the reference once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spectraformer_fused as sf
from spectraformer_fused.ops.cpu import extension_available

pytest.importorskip("pytest_benchmark")

B, T, H, D, M = 1, 256, 2, 32, 64
# available_backends() lists "cpu" once the extension is built: build it first (`make bench` already has).
extension_available()
BACKENDS = [b for b in ("reference", "cpu") if b in sf.available_backends()]
COMPONENTS = ("posrf", "hyprf", "trigrf", "oprf")


def _inputs(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) * 0.5 for _ in range(3))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _feature_map(component: str, weights: str = "orf"):
    return sf.RandomFeatureMap(D, M, component=component, weights=weights, num_heads=H, seed=0).eval()


def _run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, backend, component, causal):
    q, k, v = _inputs()
    fm = _feature_map(component)
    benchmark.group = f"forward-B{B}-T{T}-H{H}-D{D}-M{M}-{'causal' if causal else 'full'}"
    with torch.no_grad():
        out = _run(benchmark, lambda: sf.rf_attention(q, k, v, fm, causal=causal, backend=backend))
        ref = sf.rf_attention(q, k, v, fm, causal=causal, backend="reference")
    err = float((out - ref).norm() / ref.norm())
    assert err < 1e-4, f"{backend} {component} causal={causal}: relative error {err:.2e} against the reference"


@pytest.mark.parametrize("weights", ["orf", "learnable"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(benchmark, backend, weights):
    q, k, v = _inputs(requires_grad=True)
    fm = _feature_map("posrf", weights)
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1))
    leaves = [q, k, v] + [p for p in fm.parameters() if p.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        sf.rf_attention(q, k, v, fm, causal=True, backend=backend).backward(do)
        return q.grad

    benchmark.group = f"fwd+bwd-B{B}-T{T}-H{H}-D{D}-M{M}-causal"
    dq = _run(benchmark, step)
    assert dq is not None and torch.isfinite(dq).all(), f"{backend} {weights}: missing or non-finite dq"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_baseline(benchmark, causal):
    q, k, v = (t.transpose(1, 2) for t in _inputs())
    benchmark.group = f"forward-B{B}-T{T}-H{H}-D{D}-M{M}-{'causal' if causal else 'full'}"
    with torch.no_grad():
        out = _run(benchmark, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    assert out.shape == (B, H, T, D)


@pytest.mark.parametrize("weights", sf.WEIGHTS)
def test_build_weights(benchmark, weights):
    benchmark.group = f"build-W-H{H}-M{M}-D{D}"
    fm = _run(benchmark, lambda: _feature_map("posrf", weights))
    W = fm.projection()
    assert W.shape == (H, M, D) and torch.isfinite(W).all(), f"{weights}: bad W {tuple(W.shape)}"
