"""torch.compile(fullgraph=True) of SpectraAttention: the reference backend traces through, the Triton
backend's custom ops stay opaque; forward and backward match eager.

On the CPU the "aot_eager" backend is used (the full graph is still captured and the backward traced by
AOTAutograd; inductor's C++ code generation would only add minutes of compile time); on CUDA, inductor.
"""

import copy

import pytest
import torch
from helpers import assert_close

from spectraformer_fused import ops
from spectraformer_fused.modules import SpectraAttention

BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not ops.triton_importable(), reason="triton is not installed")),
]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_matches_eager(backend, causal, device):
    if backend == "triton" and device == "cpu" and not ops.triton_interpreting():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SpectraAttention(
        32,
        2,
        num_features=16,
        component="oprf",
        weights="fastfood_learnable",
        causal=causal,
        seed=0,
        backend=backend,
        device=device,
    ).eval()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    x = torch.randn(2, 37, 32, device=device)
    mask = torch.rand(2, 37, device=device) > 0.2
    outs = []
    for model, owner in ((eager, eager), (compiled, compiled_module)):
        xi = x.clone().requires_grad_()
        y = model(xi, key_padding_mask=mask)
        (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        grads = {n: p.grad for n, p in owner.named_parameters() if p.grad is not None}
        outs.append((y, xi.grad, grads))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert_close(y1, y0, torch.float32, name="y")
    assert_close(gx1, gx0, torch.float32, name="dx")
    assert set(gp1) == set(gp0) and len(gp0) >= 5
    for name in gp0:
        assert_close(gp1[name], gp0[name], torch.float32, name=f"d{name}")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_compile_training_mode_updates_running_statistics(causal, device):
    """backend="auto" in training mode: OPRF's running statistics (buffers mutated after the forward) and
    the outputs of a compiled model follow eager, step after step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SpectraAttention(32, 2, num_features=16, component="oprf", causal=causal, seed=0, device=device).train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    for step in range(3):
        x = torch.randn(2, 21, 32, device=device)
        assert_close(compiled(x), eager(x), torch.float32, name=f"y at step {step}")
    fe, fc = eager.feature_map, compiled_module.feature_map
    assert fe.num_batches_tracked.item() == fc.num_batches_tracked.item() == 3
    for a, b in zip(fe.running_moments().tensors(), fc.running_moments().tensors()):
        assert_close(b, a, torch.float32, name="running statistics")
