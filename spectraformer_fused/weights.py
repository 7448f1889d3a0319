"""Weight matrices of the Spectraformer framework (DESIGN.md, section 4).

Every random-feature map is ``phi(x) = component(W x)``.  This module makes the
weight matrix ``W``: one ``[m, d]`` matrix per head, stored (or built) dense as a
``[H, m, d]`` tensor so that every kernel sees one dense matrix.

All random draws happen on the CPU in float64 from one ``torch.Generator`` seeded
with ``seed``; the result is then cast to ``dtype`` and moved to ``device``.  The
same seed therefore gives a bit-identical ``W`` on every device, and
``seed=None`` draws the seed from the global torch RNG so that results follow
``torch.manual_seed``.

Structured kinds (``orf``, ``simplex``, ``sorf``, ``fastfood``, ``fastfood_learnable``) build
``ceil(m / block)`` independent blocks per head and keep the first ``m`` rows, so
any positive ``m`` is honoured (including ``m < d``).  The Hadamard-based kinds
work in dimension ``n`` = the next power of two ``>= d`` and keep the first ``d``
columns, i.e. inputs are implicitly zero-padded to ``n``.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import nn

__all__ = [
    "WEIGHTS",
    "LEARNABLE_WEIGHTS",
    "WeightMatrix",
    "GaussianWeights",
    "ORFWeights",
    "SimplexWeights",
    "SORFWeights",
    "QMCWeights",
    "MomentMatchingWeights",
    "SGQWeights",
    "FastFoodWeights",
    "FastFoodLearnableWeights",
    "LearnableWeights",
    "build_weights",
    "sample_weights",
    "hadamard",
    "simplex_directions",
]

WEIGHTS = ("gaussian", "orf", "simplex", "sorf", "qmc", "mm", "sgq", "fastfood", "fastfood_learnable", "learnable")
LEARNABLE_WEIGHTS = ("fastfood_learnable", "learnable")

_SEED_HIGH = 2**62


def _next_pow2(d: int) -> int:
    return 1 << (d - 1).bit_length()


def _num_blocks(m: int, block: int) -> int:
    return -(-m // block)


def hadamard(n: int, *, normalized: bool = False, dtype=torch.float64, device=None) -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix of size ``n`` (a power of two).

    Entries are +-1 (``normalized=False``) or +-1/sqrt(n) (``normalized=True``,
    the orthonormal version).  ``H @ H.T == n I`` for the unnormalised matrix.
    """
    n = operator.index(n)
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n must be a positive power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def _signs(gen: torch.Generator, shape) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int64).to(torch.float64).mul_(2).sub_(1)


def _check_size(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _resolve_seed(seed) -> int:
    if seed is None:
        return int(torch.randint(0, _SEED_HIGH, (1,)).item())
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int or None, got bool {seed!r}")
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}") from None


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------------------------
# Samplers: each returns float64 CPU tensors drawn from ``gen``.
# ----------------------------------------------------------------------------------------------


def _sample_gaussian(gen, h, m, d):
    return torch.randn(h, m, d, generator=gen, dtype=torch.float64)


def _haar_blocks(gen, h, nb, d):
    """``nb`` Haar-distributed d x d orthogonal matrices per head and chi_d row lengths, each [h, nb, d(, d)].

    The Q of the QR decomposition of a Gaussian matrix, its columns' signs corrected by sign(diag(R)) so
    that it is uniform on O(d) (Mezzadri 2007); the lengths are norms of independent N(0, I_d) vectors.
    """
    g = torch.randn(h, nb, d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    q = q * torch.where(diag >= 0, 1.0, -1.0).to(q.dtype).unsqueeze(-2)
    norms = torch.randn(h, nb, d, d, generator=gen, dtype=torch.float64).norm(dim=-1)
    return q, norms


def _sample_orf(gen, h, m, d):
    nb = _num_blocks(m, d)
    q, norms = _haar_blocks(gen, h, nb, d)
    w = q * norms.unsqueeze(-1)
    return w.reshape(h, nb * d, d)[:, :m]


def simplex_directions(d: int) -> torch.Tensor:
    """The d unit vertices of a regular simplex centred at the origin in R^d, as the rows of a [d, d] matrix.

    ``s_i = sqrt(d / (d - 1)) (e_i - 1 / d)``: unit length, pairwise dot products -1 / (d - 1), summing to
    zero (they span the hyperplane orthogonal to the all-ones vector).  d = 1 gives the single vector [1].
    """
    d = _check_size("d", d)
    if d == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    return (eye - 1.0 / d) * math.sqrt(d / (d - 1))


def _sample_simplex(gen, h, m, d):
    nb = _num_blocks(m, d)
    q, norms = _haar_blocks(gen, h, nb, d)
    # rows s_i^T Q: the simplex vertices rotated by the Haar matrix Q^T, then given chi_d lengths
    w = (simplex_directions(d) @ q) * norms.unsqueeze(-1)
    return w.reshape(h, nb * d, d)[:, :m]


def _sorf_blocks(gen, h, nb, n):
    """Full SORF blocks ``sqrt(n) H D1 H D2 H D3`` of shape [h, nb, n, n] (orthonormal H)."""
    had = hadamard(n, normalized=True)
    d1, d2, d3 = (_signs(gen, (h, nb, n)) for _ in range(3))
    x = had * d3.unsqueeze(-2)
    x = had @ (d2.unsqueeze(-1) * x)
    x = had @ (d1.unsqueeze(-1) * x)
    return x * math.sqrt(n)


def _sample_sorf(gen, h, m, d):
    n = _next_pow2(d)
    nb = _num_blocks(m, n)
    w = _sorf_blocks(gen, h, nb, n)[..., :d]
    return w.reshape(h, nb * n, d)[:, :m]


def _sample_qmc(gen, h, m, d):
    eps = 2.0**-31
    seeds = torch.randint(0, 2**31 - 1, (h,), generator=gen).tolist()
    heads = []
    for s in seeds:
        engine = torch.quasirandom.SobolEngine(d, scramble=True, seed=int(s))
        u = engine.draw(m, dtype=torch.float64).clamp_(eps, 1.0 - eps)
        heads.append(torch.special.ndtri(u))
    return torch.stack(heads, dim=0)


def _sample_mm(gen, h, m, d):
    if m < 2:
        raise ValueError(f"weight 'mm' (moment matching) needs num_features >= 2, got {m}")
    g = torch.randn(h, m, d, generator=gen, dtype=torch.float64)
    x = g - g.mean(dim=1, keepdim=True)
    if m > d:
        cov = x.transpose(-1, -2) @ x / m
        chol = torch.linalg.cholesky(cov)
        w = torch.linalg.solve_triangular(chol, x.transpose(-1, -2), upper=False).transpose(-1, -2)
    else:
        w = x / x.square().mean(dim=1, keepdim=True).sqrt()
    return w


def _sample_sgq(gen, h, m, d, sgq_points=5):
    nodes, weights = np.polynomial.hermite_e.hermegauss(sgq_points)
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    cdf = torch.cumsum(torch.as_tensor(weights / weights.sum(), dtype=torch.float64), dim=0)
    cdf[-1] = 1.0
    u = torch.rand(h, m, d, generator=gen, dtype=torch.float64)
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=sgq_points - 1)
    return nodes[idx]


def _sample_fastfood_params(gen, h, m, d):
    """B (+-1), G (N(0,1)), S (s_i / ||g||, s_i ~ chi_n) and Pi (permutation), each [h, nb, n]."""
    n = _next_pow2(d)
    nb = _num_blocks(m, n)
    b = _signs(gen, (h, nb, n))
    perm = torch.argsort(torch.rand(h, nb, n, generator=gen, dtype=torch.float64), dim=-1)
    g = torch.randn(h, nb, n, generator=gen, dtype=torch.float64)
    s = torch.randn(h, nb, n, n, generator=gen, dtype=torch.float64).norm(dim=-1)
    s = s / g.norm(dim=-1, keepdim=True)
    return {"B": b, "G": g, "S": s, "perm": perm}


def _fastfood_dense(b, g, s, perm, had, m, d):
    """Dense FastFood ``S (1/sqrt n) H G Pi H B`` per block, truncated to [h, m, d].

    ``had`` is the unnormalised +-1 Hadamard matrix; ``(Pi x)_k = x_{perm[k]}``.
    Differentiable w.r.t. ``b``, ``g`` and ``s``.
    """
    h, nb, n = b.shape
    x = had * b.unsqueeze(-2)
    x = torch.gather(x.expand(h, nb, n, n), -2, perm.unsqueeze(-1).expand(h, nb, n, n))
    x = had @ (g.unsqueeze(-1) * x)
    x = x * (s.unsqueeze(-1) / math.sqrt(n))
    return x[..., :d].reshape(h, nb * n, d)[:, :m]


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class WeightMatrix(nn.Module):
    """Base: holds how W in R^{H x m x d} is made. ``forward() == projection()``.

    Attributes: ``name``, ``num_heads`` (H), ``num_features`` (m), ``head_dim`` (d),
    ``learnable`` and ``seed`` (the seed of the last draw, an int even when ``None``
    was passed).  ``redraw(seed)`` resamples in place: the existing buffers and
    Parameters are overwritten with ``copy_`` under ``no_grad``, so optimizer
    references stay valid.
    """

    name: str = ""
    learnable: bool = False
    _arg_names: tuple = ()

    def __init__(self, num_heads, num_features, head_dim, *, seed=None, device=None, dtype=None, **weight_args):
        super().__init__()
        for key in weight_args:
            if key not in self._arg_names:
                accepted = ", ".join(self._arg_names) or "none"
                raise TypeError(f"weight {self.name!r} got an unexpected argument {key!r} (accepted: {accepted})")
        self.num_heads = _check_size("num_heads", num_heads)
        self.num_features = _check_size("num_features", num_features)
        self.head_dim = _check_size("head_dim", head_dim)
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._weight_args = self._check_args(**weight_args)
        self.seed = _resolve_seed(seed)
        for key, value in self._draw(_generator(self.seed)).items():
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            self._register(key, value)

    def _check_args(self, **weight_args) -> dict:
        return weight_args

    def _draw(self, gen: torch.Generator) -> dict:
        raise NotImplementedError

    def _register(self, key: str, value: torch.Tensor) -> None:
        raise NotImplementedError

    def projection(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        return self.projection()

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        seed = _resolve_seed(seed)
        tensors = self._draw(_generator(seed))
        for key, value in tensors.items():
            getattr(self, key).copy_(value)
        self.seed = seed

    def extra_repr(self) -> str:
        args = "".join(f", {k}={v}" for k, v in self._weight_args.items())
        return (
            f"name={self.name!r}, num_heads={self.num_heads}, num_features={self.num_features}, "
            f"head_dim={self.head_dim}, learnable={self.learnable}{args}"
        )


class _FixedWeight(WeightMatrix):
    """A fixed (non-trainable) W stored as the registered buffer ``weight`` [H, m, d]."""

    def _sample(self, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _draw(self, gen):
        return {"weight": self._sample(gen)}

    def _register(self, key, value):
        self.register_buffer(key, value)

    def projection(self) -> torch.Tensor:
        return self.weight


class GaussianWeights(_FixedWeight):
    """``gaussian``: i.i.d. N(0, 1) entries, i.e. rows ~ N(0, I_d) (plain Monte Carlo; unbiased)."""

    name = "gaussian"

    def _sample(self, gen):
        return _sample_gaussian(gen, self.num_heads, self.num_features, self.head_dim)


class ORFWeights(_FixedWeight):
    """``orf``: orthogonal random features (Yu et al. 2016, "Orthogonal Random Features").

    Blocks of d exactly orthogonal rows: the Q of the QR decomposition of a d x d Gaussian
    matrix, sign-corrected by sign(diag(R)) so that it is Haar distributed, each row rescaled
    to the norm of an independent N(0, I_d) vector (chi_d).  Each row is marginally N(0, I_d),
    so the estimators stay unbiased.
    """

    name = "orf"

    def _sample(self, gen):
        return _sample_orf(gen, self.num_heads, self.num_features, self.head_dim)


class SimplexWeights(_FixedWeight):
    """``simplex``: simplex random features (Reid, Choromanski et al., ICML 2023, "Simplex Random Features").

    Blocks of d rows ``w_i = rho_i R s_i``: s_1..s_d the unit vertices of a regular simplex centred at the
    origin (pairwise dot products -1/(d-1)), R a Haar-random orthogonal matrix drawn per block (the
    sign-corrected QR of ORF), rho_i independent chi_d lengths.  Each row is marginally N(0, I_d), so the
    estimators stay unbiased; the rows' negative correlation lowers PosRF's mean squared error below ORF's
    (the paper's theorem; section 2 of the report measures where).  The last block is truncated to m rows.
    """

    name = "simplex"

    def _sample(self, gen):
        return _sample_simplex(gen, self.num_heads, self.num_features, self.head_dim)


class SORFWeights(_FixedWeight):
    """``sorf``: structured orthogonal random features (Yu et al. 2016).

    Per block ``sqrt(n) H D1 H D2 H D3`` with H the ORTHONORMAL Walsh-Hadamard matrix of size
    n = next power of two >= d (entries +-1/sqrt(n)) and D_i random +-1 diagonals, so each
    block is sqrt(n) times an orthogonal matrix; the first d columns are kept.  Rows have
    squared norm about d (exactly n before truncation).  Approximately unbiased.
    """

    name = "sorf"

    def _sample(self, gen):
        return _sample_sorf(gen, self.num_heads, self.num_features, self.head_dim)


class QMCWeights(_FixedWeight):
    """``qmc``: quasi-Monte Carlo features (Avron et al. 2016, "Quasi-Monte Carlo Feature Maps").

    The m first points of a scrambled Sobol sequence in [0, 1)^d (a different scramble per
    head), clamped to [2^-31, 1 - 2^-31] and mapped coordinate-wise through the inverse
    normal CDF.  Consistent (converges to the kernel as m grows).
    """

    name = "qmc"

    def _sample(self, gen):
        return _sample_qmc(gen, self.num_heads, self.num_features, self.head_dim)


class MomentMatchingWeights(_FixedWeight):
    """``mm``: moment matching.

    Gaussian rows followed by an affine map so that, per head, the sample mean is exactly 0
    and ``(1/m) sum_i w_i w_i^T = I`` exactly (centre, then whiten with the Cholesky factor of
    the sample covariance).  This needs m > d.  For 2 <= m <= d the covariance is singular, so
    the matching is coordinate-wise instead: every column has mean 0 and
    ``(1/m) sum_i w_ij^2 = 1``.  m == 1 raises ValueError.  Consistent.
    """

    name = "mm"

    def _check_args(self, **weight_args):
        if self.num_features < 2:
            raise ValueError(f"weight 'mm' (moment matching) needs num_features >= 2, got {self.num_features}")
        return weight_args

    def _sample(self, gen):
        return _sample_mm(gen, self.num_heads, self.num_features, self.head_dim)


class SGQWeights(_FixedWeight):
    """``sgq``: stochastic Gauss-Hermite quadrature.

    Each entry is drawn independently from the nodes of the ``sgq_points``-point
    probabilists' Gauss-Hermite rule (``numpy.polynomial.hermite_e.hermegauss``) with
    probabilities proportional to the quadrature weights, so the entries match the N(0, 1)
    moments up to degree ``2 * sgq_points - 1``.  ``sgq_points`` (default 5) must be >= 2
    (one point puts all the mass on 0).  Approximately unbiased.
    """

    name = "sgq"
    _arg_names = ("sgq_points",)

    def _check_args(self, sgq_points=5):
        if isinstance(sgq_points, bool) or not isinstance(sgq_points, (int, np.integer)):
            raise TypeError(f"sgq_points must be an int >= 2, got {type(sgq_points).__name__} {sgq_points!r}")
        if sgq_points < 2:
            raise ValueError(f"sgq_points must be an int >= 2, got {sgq_points}")
        self.sgq_points = int(sgq_points)
        return {"sgq_points": self.sgq_points}

    def _sample(self, gen):
        return _sample_sgq(gen, self.num_heads, self.num_features, self.head_dim, self.sgq_points)


class FastFoodWeights(_FixedWeight):
    """``fastfood``: FastFood (Le, Sarlos, Smola 2013, "Fastfood: approximating kernel expansions").

    Per block of n = next power of two >= d rows: ``W = S (1/sqrt n) H G Pi H B`` with H the
    unnormalised +-1 Hadamard matrix, B a random +-1 diagonal, Pi a random permutation, G a
    N(0, 1) diagonal and S the diagonal ``s_i / ||g||`` with s_i ~ chi_n, so that every full
    row has norm exactly s_i, like an N(0, I_n) vector.  The first d columns are kept (inputs
    zero-padded to n) and ``ceil(m / n)`` blocks give exactly m rows.  Approximately unbiased.
    """

    name = "fastfood"

    def _sample(self, gen):
        p = _sample_fastfood_params(gen, self.num_heads, self.num_features, self.head_dim)
        n = p["B"].shape[-1]
        return _fastfood_dense(p["B"], p["G"], p["S"], p["perm"], hadamard(n), self.num_features, self.head_dim)


class FastFoodLearnableWeights(WeightMatrix):
    """``fastfood_learnable``: FastFoodL (Chowdhury et al. 2022, "Learning the transformer kernel").

    The FastFood formula ``S (1/sqrt n) H G Pi H B`` with B (initialised +-1, trained as real
    values), G (initialised N(0, 1)) and S (initialised s_i / ||g||) trainable Parameters of
    shape [H, ceil(m / n), n]; the permutation ``perm`` is a long buffer and the +-1 Hadamard
    matrix a non-persistent buffer.  ``projection()`` builds the dense [H, m, d] W
    differentiably.  With the same seed its initial W equals that of ``fastfood``.
    """

    name = "fastfood_learnable"
    learnable = True

    def _draw(self, gen):
        return _sample_fastfood_params(gen, self.num_heads, self.num_features, self.head_dim)

    def _register(self, key, value):
        if key == "perm":
            self.register_buffer("perm", value)
            n = value.shape[-1]
            self.register_buffer("hadamard", hadamard(n, dtype=self.B.dtype, device=value.device), persistent=False)
        else:
            self.register_parameter(key, nn.Parameter(value))

    def projection(self) -> torch.Tensor:
        return _fastfood_dense(self.B, self.G, self.S, self.perm, self.hadamard, self.num_features, self.head_dim)


class LearnableWeights(WeightMatrix):
    """``learnable``: a dense trainable W, the Parameter ``weight`` [H, m, d], initialised from ``orf``."""

    name = "learnable"
    learnable = True

    def _draw(self, gen):
        return {"weight": _sample_orf(gen, self.num_heads, self.num_features, self.head_dim)}

    def _register(self, key, value):
        self.register_parameter(key, nn.Parameter(value))

    def projection(self) -> torch.Tensor:
        return self.weight


_CLASSES = {
    cls.name: cls
    for cls in (
        GaussianWeights,
        ORFWeights,
        SimplexWeights,
        SORFWeights,
        QMCWeights,
        MomentMatchingWeights,
        SGQWeights,
        FastFoodWeights,
        FastFoodLearnableWeights,
        LearnableWeights,
    )
}
assert tuple(_CLASSES) == WEIGHTS


def build_weights(
    name: str, num_heads: int, num_features: int, head_dim: int, *, seed=None, device=None, dtype=None, **weight_args
) -> WeightMatrix:
    """Build the weight-matrix module ``name`` (one of ``WEIGHTS``) for H heads, m features, head dim d.

    ``dtype`` defaults to torch.float32.  ``weight_args`` are the kind's own options
    (only ``sgq_points`` for ``sgq``); any other keyword raises TypeError.
    """
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown weight {name!r}; valid names: {', '.join(WEIGHTS)}")
    return cls(num_heads, num_features, head_dim, seed=seed, device=device, dtype=dtype, **weight_args)


def sample_weights(
    name: str, num_heads: int, num_features: int, head_dim: int, *, seed=None, dtype=torch.float64, **weight_args
) -> torch.Tensor:
    """The dense [H, m, d] W of a fresh ``build_weights(...)`` on the CPU (detached), in ``dtype``."""
    module = build_weights(name, num_heads, num_features, head_dim, seed=seed, dtype=dtype, **weight_args)
    return module.projection().detach()
