"""The declared peers of bench/peers.py (``pytest bench -q``): each resolves to its named callable or is
skipped with a reason naming what is missing; no entry point is guessed."""

from __future__ import annotations

import pytest
import torch

import spectraformer_fused as sf
from bench import peers


def test_missing_peer_fails_clearly():
    absent = peers.PeerSpec("absent", "bench.peers", "no_such_function", peers._make_chunked)
    with pytest.raises(ImportError, match="no_such_function"):
        peers.load(absent)
    assert "no_such_function" in peers.skip_reason(absent, torch.device("cpu"))
    missing = peers.PeerSpec("missing", "no_such_module_here", "f", peers._make_chunked, install="no-such-dist")
    reason = peers.skip_reason(missing, torch.device("cpu"))
    assert "no_such_module_here" in reason and "pip install no-such-dist" in reason


def test_declared_peers_on_cpu():
    found = {p.name: p for p in peers.peers(torch.device("cpu"))}
    assert list(found) == [spec.name for spec in peers.PEERS]
    assert found["torch-sdpa"].skip_reason is None and found["torch-chunked"].skip_reason is None
    assert found["fla-chunk_linear_attn"].skip_reason == "flash-linear-attention needs CUDA"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=gen) for _ in range(3))
    fm = sf.RandomFeatureMap(16, 16, num_heads=2, seed=0)
    for causal in (False, True):
        o = found["torch-chunked"].make(fm, causal)(q, k, v)
        ref = sf.rf_attention(q, k, v, fm, causal=causal, backend="reference")
        assert float((o - ref).norm() / ref.norm()) < 1e-4
        exact = found["torch-sdpa"].make(fm, causal)(q, k, v)
        ref = sf.exact_attention(q, k, v, causal=causal)
        assert float((exact - ref).norm() / ref.norm()) < 1e-5
