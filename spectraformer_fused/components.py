"""Component functions: the nonlinearity that turns the projection ``W x`` into random features.

Every component of the package is a point of one family (GERF, Likhosherstov et al. 2022), written in
log space so that every backend evaluates the same formula. For a (scaled) query or key ``x``, with
``x' = psi * x`` for queries and ``x' = x / psi`` for keys (``psi = 1`` unless the component is SADERF),
``u_i = w_i . x'`` and ``r = c_t |x'|^2 + c_o |x|^2``:

    kind EXP   (F = m):  phi_i   = exp(bias_i + freq * u_i + r)
    kind HYP   (F = 2m): phi     = [exp(bias_i + freq * u_i + r), exp(bias_i - freq * u_i + r)]
    kind TRIG  (F = 2m): phi     = [exp(bias_i + r) cos(freq * u_i), exp(bias_i + r) sin(freq * u_i)]

with ``bias_i = log D + A |w_i|^2 - log(sqrt(norm))``, ``D = (1 - 4A)^(d/4)``, ``freq = sqrt(1 - 4A)``,
``norm = m`` (EXP, TRIG) or ``2m`` (HYP), ``c_t = -s/2`` and ``c_o = 0`` for the softmax kernel or
``-1/2`` for the Gaussian kernel. The ``exp(.)`` factor is the feature's *magnitude*; a stabiliser
subtracts a constant from its exponent (see ``reference.py``). DESIGN.md section 3 derives every row.

The learned component ``hedgehog`` (in the spirit of Hedgehog, Zhang et al., ICLR 2024) is no random
feature estimator: it estimates no fixed kernel, it is trained (``fitting.py``) to mimic softmax attention.

    kind NORM_HYP (F = 2m): phi = softmax([bias_i + u_i, bias_i - u_i])   over all 2m features of the row

with ``u = W x`` (``freq = 1``, no |x|^2 term) and ``bias_i`` a learnable per-frequency log-weight. The
per-row log-sum-exp cancels for queries (without a window), but for keys it is a per-key weight: the fused
backends compute it per key and subtract it (``attention.KIND_BACKENDS`` lists the backends that run it).
With ``W`` rows ~ N(0, I) the key normaliser is about exp(|y|^2/2) 2m, so at initialisation the map is
close to ``hyprf`` with a self-normalised key weight.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .contract import EXP, HYP, NORM_HYP, TRIG, feature_width

COMPONENTS = ("posrf", "hyprf", "trigrf", "gerf", "oprf", "saderf")
# Learned components: trained to mimic softmax attention (fit_feature_map), not unbiased estimators.
LEARNED_COMPONENTS = ("hedgehog",)
KERNELS = ("softmax", "gaussian")

# Signature of the component keyword arguments accepted by RandomFeatureMap(**component_args).
_COMPONENT_ARGS = {
    "posrf": (),
    "hyprf": (),
    "trigrf": (),
    "gerf": ("A", "s"),
    "oprf": ("stats_momentum",),
    "saderf": ("stats_momentum",),
    "hedgehog": (),
}
GERF_DEFAULT_A = -0.125


@dataclass(frozen=True)
class ComponentSpec:
    """Static description of a component: everything that does not depend on the data."""

    name: str
    kind: int  # EXP, HYP or TRIG
    sign: int  # s in GERF: +1 (positive features) or -1 (trigonometric)
    A: float  # the fixed A (ignored when data_dependent)
    data_dependent: bool  # A (and psi) come from query/key statistics: oprf, saderf
    uses_psi: bool  # saderf's diagonal Psi
    kernel: str  # "softmax" or "gaussian" (for a learned component: the attention it is fitted to)

    @property
    def positive(self) -> bool:
        return self.kind != TRIG

    @property
    def learned(self) -> bool:
        """A learned component (hedgehog): no fixed kernel, a learnable per-frequency log-weight."""
        return self.name in LEARNED_COMPONENTS

    @property
    def c_t(self) -> float:
        """Coefficient of |x'|^2 in the feature exponent (x' the psi-transformed input)."""
        return 0.0 if self.learned else -self.sign / 2.0

    @property
    def c_o(self) -> float:
        """Coefficient of |x|^2 of the ORIGINAL input: the Gaussian kernel's exp(-|x|^2/2) factor."""
        return -0.5 if self.kernel == "gaussian" and not self.learned else 0.0

    def feature_dim(self, num_features: int) -> int:
        return feature_width(self.kind, num_features)

    def log_norm(self, num_features: int) -> float:
        """log of the 1/sqrt(norm) prefactor of every feature."""
        return -0.5 * math.log(num_features if self.kind != HYP else 2 * num_features)


def check_name(value, valid, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, one of {valid}; got {type(value).__name__}")
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid names are {', '.join(valid)}")
    return value


def make_component(name: str, kernel: str = "softmax", **args) -> tuple[ComponentSpec, dict]:
    """Validate a component name, its kernel target and keyword arguments.

    Returns the spec and the remaining options (``stats_momentum`` for data-dependent components).
    """
    check_name(name, COMPONENTS + LEARNED_COMPONENTS, "component")
    check_name(kernel, KERNELS, "kernel")
    allowed = _COMPONENT_ARGS[name]
    for key in args:
        if key not in allowed:
            raise TypeError(
                f"component {name!r} takes no argument {key!r}"
                + (f"; it accepts {', '.join(allowed)}" if allowed else "")
            )
    options = {}
    if name == "posrf":
        spec = ComponentSpec(name, EXP, 1, 0.0, False, False, kernel)
    elif name == "hyprf":
        spec = ComponentSpec(name, HYP, 1, 0.0, False, False, kernel)
    elif name == "hedgehog":
        spec = ComponentSpec(name, NORM_HYP, 1, 0.0, False, False, kernel)
    elif name == "trigrf":
        spec = ComponentSpec(name, TRIG, -1, 0.0, False, False, kernel)
    elif name == "gerf":
        A = args.get("A", GERF_DEFAULT_A)
        s = args.get("s", 1)
        if isinstance(A, bool) or not isinstance(A, (int, float)):
            raise TypeError(f"gerf: A must be a float, got {type(A).__name__}")
        A = float(A)
        if not math.isfinite(A) or A >= 0.25:
            raise ValueError(f"gerf: A must be finite and < 1/4 (D = (1 - 4A)^(d/4) must be real); got {A}")
        if s not in (1, -1):
            raise ValueError(f"gerf: s must be +1 or -1, got {s!r}")
        if s == 1 and A >= 0.125:
            warnings.warn(f"gerf: A = {A} >= 1/8 gives an estimator of infinite variance (s = +1)", stacklevel=3)
        spec = ComponentSpec(name, EXP if s == 1 else TRIG, int(s), A, False, False, kernel)
    else:  # oprf, saderf
        momentum = args.get("stats_momentum", 0.1)
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 < float(momentum) <= 1.0):
            raise ValueError(f"{name}: stats_momentum must be in (0, 1] or None (cumulative mean), got {momentum!r}")
        options["stats_momentum"] = None if momentum is None else float(momentum)
        spec = ComponentSpec(name, EXP, 1, 0.0, True, name == "saderf", kernel)
    return spec, options


# ----------------------------------------------------------------------------------------------------
# Data-dependent parameters (OPRF's A*, SADERF's Psi), from first and second moments of x and y.
# ----------------------------------------------------------------------------------------------------


@dataclass
class Moments:
    """Per-group moments of the scaled queries x and keys y: means and mean squares per coordinate.

    Shapes ``[..., D]``; the leading dims are (batch, head) for a sequence, or (head,) for running
    statistics. They are all that OPRF and SADERF need.
    """

    mean_x: torch.Tensor
    sq_x: torch.Tensor
    mean_y: torch.Tensor
    sq_y: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.mean_x, self.sq_x, self.mean_y, self.sq_y)

    def rows(self, i: int) -> "Moments":
        """The moments of batch (or sequence) row i, keeping the axis: ``[1, ...]``."""
        return Moments(*(t[i : i + 1] for t in self.tensors()))


def _time_moments(t: torch.Tensor, mask: torch.Tensor | None, offsets: list[int] | None):
    """Mean and mean square over time of t ``[B, T, H, D]``: ``[B, H, D]`` per batch row, or ``[N, H, D]``
    per packed sequence (t ``[1, sum T_i, H, D]``, ``offsets`` its N + 1 boundaries; an empty sequence
    gets zeros). ``mask [B, T]`` (True = keep) leaves out padded positions."""
    if offsets is not None:
        n = len(offsets) - 1
        lengths = torch.tensor([offsets[i + 1] - offsets[i] for i in range(n)], device=t.device)
        ids = torch.repeat_interleave(torch.arange(n, device=t.device), lengths)
        rows = t[0]
        count = lengths.clamp_min(1).to(t.dtype)[:, None, None]
        total = t.new_zeros(n, *rows.shape[1:]).index_add_(0, ids, rows)
        total_sq = t.new_zeros(n, *rows.shape[1:]).index_add_(0, ids, rows * rows)
        return total / count, total_sq / count
    if mask is None:
        return t.mean(1), (t * t).mean(1)
    w = mask.to(t.dtype)[:, :, None, None]  # [B, T, 1, 1]
    count = w.sum(1).clamp_min(1.0)  # [B, 1, 1]
    return (t * w).sum(1) / count, (t * t * w).sum(1) / count


def sequence_moments(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, offsets: list[int] | None = None
) -> Moments:
    """Moments over time of the scaled queries x ``[B, T, H, D]`` and keys y ``[B, T, H_kv, D]`` per
    (batch, key/value head): ``[B, H_kv, D]``. With grouped-query attention (H_kv < H) the query heads of
    a group count together (moments over time, then the mean over the group). ``mask [B, T]`` (True =
    keep) removes padded positions from both; ``offsets`` (packed sequences, B = 1) gives one row per
    sequence: ``[N, H_kv, D]``."""
    mx, sx = _time_moments(x, mask, offsets)
    my, sy = _time_moments(y, mask, offsets)
    H, Hk = x.shape[2], y.shape[2]
    if H != Hk:
        mx, sx = (t.unflatten(1, (Hk, H // Hk)).mean(2) for t in (mx, sx))
    return Moments(mx, sx, my, sy)


def saderf_psi(m: Moments) -> torch.Tensor:
    """psi_l = (sum_j y_jl^2 / sum_i x_il^2)^(1/4); 1 where either sum is zero (no data yet)."""
    ok = (m.sq_x > 0) & (m.sq_y > 0)
    ratio = torch.where(ok, m.sq_y / torch.where(ok, m.sq_x, torch.ones_like(m.sq_x)), torch.ones_like(m.sq_x))
    return ratio.pow(0.25)


def oprf_A(m: Moments, psi: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR++'s variance-optimal A* from phibar = E|x'|^2 + E|y'|^2 + 2 E[x']^T E[y'].

    rho* = (sqrt((2p + d)^2 + 8 d p) - 2p - d) / (4p) is evaluated in the algebraically equal form
    2d / (sqrt((2p + d)^2 + 8 d p) + 2p + d), which has no cancellation and gives rho* = 1 (A* = 0,
    plain PosRF) at p = 0. A* = (1 - 1/rho*) / 8 <= 0.
    """
    d = m.mean_x.shape[-1]
    if psi is None:
        p = m.sq_x.sum(-1) + m.sq_y.sum(-1)
    else:
        p = (psi * psi * m.sq_x).sum(-1) + (m.sq_y / (psi * psi)).sum(-1)
    p = p + 2.0 * (m.mean_x * m.mean_y).sum(-1)  # (psi x)^T (y / psi) = x^T y
    p = p.clamp_min(0.0)
    rho = 2.0 * d / (torch.sqrt((2.0 * p + d) ** 2 + 8.0 * d * p) + 2.0 * p + d)
    return (1.0 - 1.0 / rho) / 8.0


# ----------------------------------------------------------------------------------------------------
# The features themselves (used by the reference and by kernel_estimate; kernels inline the same math)
# ----------------------------------------------------------------------------------------------------


def feature_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor,
    freq: torch.Tensor,
    psi: torch.Tensor | None,
    *,
    kind: int,
    c_t: float,
    c_o: float,
    query: bool,
):
    """Log-magnitudes and signs of the features of ``x [B, H, T, D]`` (already scaled by sqrt(scale)).

    ``W [H, m, D]`` (or ``[1, m, D]``), ``bias [B, H, m]``, ``freq [B, H]``, ``psi [B, H, D]`` or None.
    Returns ``(e, mult)``: ``e [B, H, T, F]`` the exponent of each feature's magnitude and ``mult`` None
    (positive kinds) or ``[B, H, T, F]`` the cos/sin factors (TRIG). phi = exp(e) * mult. NORM_HYP
    subtracts each row's log-sum-exp (a softmax over the row's 2m features), for queries and keys alike.
    """
    if psi is not None:
        xt = x * psi[:, :, None, :] if query else x / psi[:, :, None, :]
    else:
        xt = x
    u = torch.einsum("bhtd,hmd->bhtm", xt, W) * freq[:, :, None, None]  # [B, H, T, m]
    r = c_t * (xt * xt).sum(-1, keepdim=True)  # [B, H, T, 1]
    if c_o != 0.0:
        r = r + c_o * (x * x).sum(-1, keepdim=True)
    b = bias[:, :, None, :]  # [B, H, 1, m]
    if kind == EXP:
        return b + u + r, None
    if kind == HYP:
        return torch.cat([b + u + r, b - u + r], dim=-1), None
    if kind == NORM_HYP:
        e = torch.cat([b + u + r, b - u + r], dim=-1)
        return e - torch.logsumexp(e, dim=-1, keepdim=True), None
    e = (b + r).expand_as(u)
    return torch.cat([e, e], dim=-1), torch.cat([torch.cos(u), torch.sin(u)], dim=-1)
