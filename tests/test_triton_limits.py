"""The Triton backend at the largest sizes it promises: head dim 256, m = 512 (F = 1024 for the 2m-wide
components), Dv != D, forward and every input gradient against the reference."""

import pytest
import torch
from helpers import assert_close

from spectraformer_fused import RandomFeatureMap, available_backends, rf_attention

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    "D, m, component", [(256, 512, "posrf"), (128, 512, "trigrf")], ids=["D256-M512-posrf", "D128-M512-trigrf"]
)
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


def test_gradients_after_leading_masked_chunks_with_far_negative_exponents(device):
    """Keys of the first chunks all masked (their stabiliser is 0), later key exponents far below 0
    (Gaussian kernel, large |k|): the rescaling between them must stay finite in the backward too."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 100, 1, 16, generator=g) * 14 for _ in range(2))
    v = torch.randn(1, 100, 1, 16, generator=g)
    keep = torch.ones(1, 100, dtype=torch.bool, device=device)
    keep[0, :70] = False
    fm = RandomFeatureMap(16, 32, kernel="gaussian", seed=0, device=device).eval()
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        o, state = rf_attention(
            *leaves, fm, causal=True, key_padding_mask=keep, backend=backend, output_final_state=True
        )
        o[:, 70:].square().sum().backward()
        results[backend] = (o[:, 70:], *(t.grad for t in leaves))
        assert state.log_scale.item() < -100
    for name, got, want in zip(("o", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert_close(got, want, torch.float32, name=name)


@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_out_of_resources_is_a_clear_error(stage, monkeypatch, device):
    """A kernel that does not fit the GPU (Triton's OutOfResources) surfaces as an error naming the call,
    the dtype and head dims, and the ways around it."""
    from triton.runtime.errors import OutOfResources

    import spectraformer_fused.ops.triton.attention as ta

    def out_of_resources(*args, **kwargs):
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(ta, "rf_fwd" if stage == "forward" else "rf_bwd", out_of_resources)
    fm = RandomFeatureMap(16, 16, num_heads=1, seed=0, device=device)
    q = torch.randn(1, 8, 1, 16, device=device, requires_grad=True)
    v = torch.randn(1, 8, 1, 24, device=device)
    with pytest.raises(
        RuntimeError,
        match=rf"Triton {stage} for float32 inputs with head dims D=16, Dv=24 does "
        r"not fit this GPU .*shared memory.*backend='reference'",
    ):
        rf_attention(q, q, v, fm, backend="triton").sum().backward()


def test_device_guard_names_the_input_on_another_device():
    from spectraformer_fused.ops.triton.common import on_device_of

    a, b = torch.zeros(2), torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="q is on cpu, W on meta"):
        with on_device_of("q, k, W", a, None, b):
            pass
    with on_device_of("q, k, W", a, None, a):  # one device (None = an absent optional input): no error
        pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_under_the_inputs_device():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1 and give the reference's result."""
    q, k, v = (torch.randn(1, 64, 2, 16, device="cuda:1") for _ in range(3))
    fm = RandomFeatureMap(16, 32, num_heads=2, seed=0, device="cuda:1").eval()
    with torch.cuda.device(0):
        o = rf_attention(q, k, v, fm, causal=True, backend="triton")
        ref = rf_attention(q, k, v, fm, causal=True, backend="reference")
    assert o.device == q.device
    assert_close(o, ref, torch.float32, name="o")
