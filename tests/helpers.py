"""Comparison helpers: relative-RMS plus max-abs checks that print the worst mismatches."""
from __future__ import annotations

import torch

# (relative RMS, max abs relative to the reference's RMS) per dtype of the inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 2e-3),
    torch.float16: (5e-3, 5e-2),
    torch.bfloat16: (3e-2, 2e-1),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, *, name: str = "tensor",
                 rtol: float | None = None, atol_rel: float | None = None, worst: int = 5) -> None:
    """Fail if rel-RMS(actual - expected) > rtol or max|actual - expected| > atol_rel * RMS(expected).

    The message names the tensor and lists the worst elements with their indices."""
    dtype = dtype or expected.dtype
    t_rms, t_abs = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    rtol = t_rms if rtol is None else rtol
    atol_rel = t_abs if atol_rel is None else atol_rel
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if e.numel() == 0:
        return
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:worst].tolist()
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite elements, first at {bad}")
    diff = (a - e).abs()
    scale = e.pow(2).mean().sqrt().item() or 1.0
    rel_rms = (a - e).pow(2).mean().sqrt().item() / scale
    max_abs = diff.max().item()
    if rel_rms > rtol or max_abs > atol_rel * scale:
        flat = diff.flatten()
        idx = flat.topk(min(worst, flat.numel())).indices
        rows = []
        for i in idx.tolist():
            where = tuple(int(c) for c in torch.unravel_index(torch.tensor(i), e.shape))
            rows.append(f"  at {where}: got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}")
        raise AssertionError(
            f"{name}: rel-RMS {rel_rms:.3e} (tol {rtol:.1e}), max abs {max_abs:.3e} (tol {atol_rel * scale:.3e})\n"
            + "\n".join(rows))


def assert_exponents_close(actual: torch.Tensor, expected: torch.Tensor, dtype, *, name: str = "exponent") -> None:
    """Exponents and stabilisers (log-space values): an error d in them is a factor exp(d) on features.

    fp32 inputs: ``assert_close`` at fp32's tolerance. fp16/bf16 inputs: the kernels' products run in tf32
    (operands rounded to 10 mantissa bits), so an exponent e may be off by about 2^-11 |e|; the check is
    max |actual - expected| <= 2^-9 (1 + max |expected|), i.e. features within about 0.2% per unit of
    exponent size."""
    if dtype in (torch.float32, torch.float64):
        assert_close(actual, expected, dtype, name=name)
        return
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite elements")
    diff = (a - e).abs()
    tol = 2.0 ** -9 * (1.0 + e.abs().max().item())
    if diff.max().item() > tol:
        i = int(diff.flatten().argmax())
        where = tuple(int(c) for c in torch.unravel_index(torch.tensor(i), e.shape))
        raise AssertionError(f"{name}: max abs error {diff.max().item():.3e} > {tol:.3e} at {where}: got "
                             f"{a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}")
