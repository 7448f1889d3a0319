"""The public contract: names, shapes, the module, and a clear error for every bad input."""

import pytest
import torch
from helpers import assert_close

import spectraformer_fused as sf
from spectraformer_fused import RandomFeatureMap, SpectraAttention, available_backends, rf_attention


def test_public_names():
    for name in ("posrf", "hyprf", "trigrf", "gerf", "oprf", "saderf"):
        assert name in sf.COMPONENTS
    for name in ("gaussian", "orf", "sorf", "qmc", "mm", "sgq", "fastfood", "fastfood_learnable", "learnable"):
        assert name in sf.WEIGHTS
    backends = available_backends()
    assert isinstance(backends, list) and "reference" in backends


@pytest.mark.parametrize("weights", sf.WEIGHTS)
@pytest.mark.parametrize("component", sf.COMPONENTS)
def test_every_pair_runs(component, weights):
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
    fm = RandomFeatureMap(8, 20, component=component, weights=weights, num_heads=2, seed=0)
    assert fm.projection().shape == (2, 20, 8)
    assert fm.kernel_estimate(q, k).shape == (1, 2, 12, 12)
    for causal in (False, True):
        o, st = rf_attention(q, k, v, fm, causal=causal, output_final_state=True)
        assert o.shape == v.shape and torch.isfinite(o).all()
        assert st.S.shape == (1, 2, fm.feature_dim, 8) and st.z.shape == (1, 2, fm.feature_dim)


def test_seed_and_redraw():
    a = RandomFeatureMap(8, 16, seed=5)
    b = RandomFeatureMap(8, 16, seed=5)
    assert torch.equal(a.projection(), b.projection())
    w = a.projection().clone()
    a.redraw(6)
    assert not torch.equal(a.projection(), w)
    a.redraw(5)
    assert torch.equal(a.projection(), w)


def test_kernel_estimate_cross_lengths():
    fm = RandomFeatureMap(8, 16, num_heads=2, seed=0)
    est = fm.kernel_estimate(torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8), scale=0.3)
    assert est.shape == (2, 2, 5, 7) and (est > 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_spectra_attention_module(causal):
    torch.manual_seed(0)
    layer = SpectraAttention(
        32, 4, num_features=16, component="oprf", weights="fastfood_learnable", causal=causal, seed=0
    )
    x = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    y = layer(x, key_padding_mask=mask)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    # a padded tail does not change the unpadded positions of a causal layer / the rest of a non-causal one
    layer.eval()
    y_full = layer(x, key_padding_mask=mask)
    y_cut = layer(x[1:, :7])
    assert_close(y_full[1:, :7], y_cut, torch.float32, name="padded vs cut")
    y2, state = layer(x, output_final_state=True)
    assert state.S.shape == (2, 4, 16, 8)


def test_spectra_attention_streaming_decode():
    layer = SpectraAttention(16, 2, num_features=8, causal=True, seed=0).eval()
    x = torch.randn(1, 9, 16)
    full = layer(x)
    state, outs = None, []
    for t in range(9):
        y, state = layer(x[:, t : t + 1], initial_state=state, output_final_state=True)
        outs.append(y)
    assert_close(torch.cat(outs, 1), full, torch.float32, name="token by token")


# ---------------------------------------------------------------- errors
def _inputs(B=2, T=6, H=2, D=8, Dv=4):
    return torch.randn(B, T, H, D), torch.randn(B, T, H, D), torch.randn(B, T, H, Dv)


def fm8():
    return RandomFeatureMap(8, 16, num_heads=2, seed=0)


@pytest.mark.parametrize(
    "label, make, exc, words",
    [
        ("q ndim", lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
        ("k ndim", lambda q, k, v: (q, k[0], v), ValueError, "k must have 4 dims"),
        ("v ndim", lambda q, k, v: (q, k, v[0]), ValueError, "v must have 4 dims"),
        ("int q", lambda q, k, v: (q.long(), k.long(), v), TypeError, "int64"),
        ("qk dtype", lambda q, k, v: (q, k.double(), v), TypeError, "same dtype"),
        ("batch", lambda q, k, v: (q, k[:1], v), ValueError, "batch"),
        ("length", lambda q, k, v: (q, k[:, :3], v), ValueError, "sequence length"),
        ("heads", lambda q, k, v: (q, k[:, :, :1], v), ValueError, "heads"),
        ("head dim", lambda q, k, v: (q, k[..., :4], v), ValueError, "head dim"),
        ("v length", lambda q, k, v: (q, k, v[:, :3]), ValueError, "v"),
        ("not tensor", lambda q, k, v: (q.tolist(), k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors(label, make, exc, words):
    q, k, v = make(*_inputs())
    with pytest.raises(exc, match=words):
        rf_attention(q, k, v, fm8())


def test_bad_feature_map_and_options():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="RandomFeatureMap"):
        rf_attention(q, k, v, object())
    with pytest.raises(ValueError, match="head_dim=16"):
        rf_attention(q, k, v, RandomFeatureMap(16, 8, num_heads=2))
    with pytest.raises(ValueError, match="num_heads=3"):
        rf_attention(q, k, v, RandomFeatureMap(8, 8, num_heads=3))
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid names are auto, reference"):
        rf_attention(q, k, v, fm8(), backend="gpu")
    with pytest.raises(ValueError, match="scale must be positive"):
        rf_attention(q, k, v, fm8(), scale=-1.0)
    with pytest.raises(TypeError, match="scale must be a float"):
        rf_attention(q, k, v, fm8(), scale="big")


def test_bad_mask_and_state():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, T\] = \(2, 6\), got \(2, 5\)"):
        rf_attention(q, k, v, fm8(), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        rf_attention(q, k, v, fm8(), key_padding_mask=torch.ones(2, 6))
    with pytest.raises(TypeError, match="initial_state must be"):
        rf_attention(q, k, v, fm8(), initial_state=torch.zeros(2, 2, 16, 4))
    with pytest.raises(ValueError, match=r"initial_state.S must have shape \(2, 2, 16, 4\)"):
        rf_attention(q, k, v, fm8(), initial_state=(torch.zeros(2, 2, 16, 5), torch.zeros(2, 2, 16)))
    with pytest.raises(ValueError, match=r"initial_state.z must have shape \(2, 2, 16\)"):
        rf_attention(q, k, v, fm8(), initial_state=(torch.zeros(2, 2, 16, 4), torch.zeros(2, 2, 15)))
    with pytest.raises(ValueError, match=r"initial_state.log_scale must have shape \(2, 2\)"):
        rf_attention(q, k, v, fm8(), initial_state=(torch.zeros(2, 2, 16, 4), torch.zeros(2, 2, 16), torch.zeros(2)))


def test_float64_is_refused_by_compiled_backends_but_runs_on_auto():
    q, k, v = (t.double() for t in _inputs())
    fm = fm8().double()
    assert rf_attention(q, k, v, fm).dtype == torch.float64
    for backend in ("triton", "cpu"):
        if backend in available_backends():
            with pytest.raises(TypeError, match="not float64"):
                rf_attention(q, k, v, fm, backend=backend)


def test_bad_feature_map_construction():
    with pytest.raises(ValueError, match="unknown component 'favor'; valid names are posrf"):
        RandomFeatureMap(8, component="favor")
    with pytest.raises(ValueError, match="unknown kernel"):
        RandomFeatureMap(8, kernel="laplace")
    with pytest.raises(ValueError, match="unknown weight"):
        RandomFeatureMap(8, weights="hadamard")
    with pytest.raises(ValueError, match="head_dim must be positive"):
        RandomFeatureMap(0)
    with pytest.raises(TypeError, match="num_features must be an int"):
        RandomFeatureMap(8, 2.5)
    with pytest.raises(TypeError, match="takes no argument 'A'"):
        RandomFeatureMap(8, component="posrf", A=0.1)
    with pytest.raises(ValueError, match="A must be finite and < 1/4"):
        RandomFeatureMap(8, component="gerf", A=0.3)
    with pytest.raises(ValueError, match="s must be"):
        RandomFeatureMap(8, component="gerf", s=2)
    with pytest.warns(UserWarning, match="infinite variance"):
        RandomFeatureMap(8, component="gerf", A=0.2)
    with pytest.raises(ValueError, match="stats_momentum"):
        RandomFeatureMap(8, component="oprf", stats_momentum=2.0)
    with pytest.raises(ValueError, match="divisible"):
        SpectraAttention(30, 4)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, T, 32\]"):
        SpectraAttention(32, 4)(torch.randn(2, 3, 16))
