"""The Triton backend at the largest sizes it promises: head dim 256, m = 512 (F = 1024 for the 2m-wide
components), Dv != D, forward and every input gradient against the reference."""
import pytest
import torch

from helpers import assert_close
from spectraformer_fused import RandomFeatureMap, available_backends, rf_attention

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("D, m, component", [(256, 512, "posrf"), (128, 512, "trigrf")],
                         ids=["D256-M512-posrf", "D128-M512-trigrf"])
def test_largest_sizes(D, m, component, causal, device):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 40, 2, D, generator=g) * 0.3 for _ in range(2))
    v = torch.randn(1, 40, 2, 200, generator=g)
    fm = RandomFeatureMap(D, m, component=component, num_heads=2, seed=0, device=device).eval()
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        o = rf_attention(*leaves, fm, causal=causal, backend=backend)
        o.square().sum().backward()
        results[backend] = (o, *(t.grad for t in leaves))
    for name, got, want in zip(("o", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert_close(got, want, torch.float32, name=name)
