"""RandomFeatureMap: a weight matrix, a component function and the statistics some components need."""

from __future__ import annotations

import math

import torch
from torch import nn

from .components import (
    COMPONENTS,
    ComponentSpec,
    Moments,
    feature_logits,
    make_component,
    oprf_A,
    saderf_psi,
    sequence_moments,
)
from .contract import EXP, HYP, TRIG, FeatureParams
from .validation import check_mix, check_qk_pair, resolve_scale
from .weights import WEIGHTS, build_weights


def _shared_seed() -> int | None:
    """A seed drawn on rank 0 and broadcast when a torch.distributed process group is initialised, else
    None (the weights then draw their own from torch's global generator)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    dist.broadcast(seed, src=0)
    return int(seed.item())


def _default_num_features(head_dim: int) -> int:
    # Performer's choice m = d log d, at least 16.
    return max(16, int(round(head_dim * math.log(max(head_dim, 2)))))


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
    return value


class RandomFeatureMap(nn.Module):
    """phi(x) = component(W x) for every head: the feature map of random-feature attention.

    Args:
        head_dim: D, the size of each query/key vector.
        num_features: m, the number of random frequencies (rows of W). The feature width F is m, or 2m
            for ``hyprf``, ``trigrf`` and ``gerf`` with ``s=-1``. Default: Performer's ``D ln D`` (>= 16).
        component: one of ``COMPONENTS``, or the learned ``hedgehog`` (``LEARNED_COMPONENTS``: no fixed
            kernel, trained with ``fit_feature_map``; the backends of ``attention.KIND_BACKENDS``).
        weights: one of ``WEIGHTS``.
        kernel: ``"softmax"`` (estimates exp(x.y)) or ``"gaussian"`` (exp(-|x - y|^2 / 2)).
        num_heads: one W per key/value head (H_kv; with grouped-query attention the query heads of a
            group share their key/value head's W); ``num_heads=1`` shares one W among all heads.
        seed: makes W reproducible; None draws from torch's global generator.
        weight_args: options of the weight matrix (e.g. ``{"sgq_points": 7}``).
        mix: the learned factor g > 0 on the exact part of hybrid attention (DESIGN.md section 8; LoLCATs'
            window factor): None or False (the default) has no factor (g = 1, no parameter); True starts at
            g = 1, a positive float at g = that value. Stored as ``log_mix [num_heads]`` (g = exp(log_mix),
            one per key/value head), a parameter saved in the state_dict and trained with the feature map.
            It acts only where a call has exact keys (``window`` or ``sinks``).
        **component_args: ``A`` and ``s`` for ``gerf``; ``stats_momentum`` for ``oprf``/``saderf``.

    OPRF and SADERF derive their parameters (A*, Psi) from query/key statistics. Non-causal attention
    uses the statistics of the sequence itself, per (batch, head). Causal attention must not look ahead,
    so it uses running statistics gathered from earlier batches (zero at first, which gives plain PosRF);
    in training mode every call updates them after its forward, like BatchNorm, and they are saved in
    the state_dict. A* and Psi are constants for differentiation.
    """

    # Data parallel: a callable (batch means, local batch size) -> means over every rank's batch, set by
    # ``distributed.convert_sync_stats``; None keeps the statistics of the local batch.
    stats_sync = None

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        *,
        component: str = "posrf",
        weights: str = "orf",
        kernel: str = "softmax",
        num_heads: int = 1,
        seed: int | None = None,
        device=None,
        dtype=None,
        weight_args: dict | None = None,
        mix: bool | float | None = None,
        **component_args,
    ):
        super().__init__()
        mix_init = check_mix(mix)
        _check_positive_int(head_dim, "head_dim")
        _check_positive_int(num_heads, "num_heads")
        if num_features is None:
            num_features = _default_num_features(head_dim)
        _check_positive_int(num_features, "num_features")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        spec, options = make_component(component, kernel, **component_args)
        self.spec: ComponentSpec = spec
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.weights = build_weights(
            weights,
            num_heads,
            num_features,
            head_dim,
            seed=seed,
            device=device,
            dtype=dtype or torch.float32,
            **(weight_args or {}),
        )
        self.stats_momentum = options.get("stats_momentum")
        if component == "gerf":
            self.register_buffer("A", torch.tensor(spec.A, dtype=torch.float64, device=device))
        if spec.learned:  # hedgehog: a learnable log-weight per frequency, added to the bias
            self.log_weight = nn.Parameter(torch.zeros(num_heads, num_features, device=device, dtype=dtype))
        if spec.data_dependent:
            for name in ("running_mean_x", "running_sq_x", "running_mean_y", "running_sq_y"):
                self.register_buffer(name, torch.zeros(num_heads, head_dim, dtype=torch.float32, device=device))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        if mix_init is None:
            self.register_parameter("log_mix", None)
        else:
            init = torch.full((num_heads,), math.log(mix_init), dtype=dtype or torch.float32, device=device)
            self.log_mix = nn.Parameter(init)
        self._static_cache = None  # see _static_params
        self._source_modules = tuple(self.weights.modules())
        self._num_features = self.weights.num_features
        self._feature_dim = spec.feature_dim(self._num_features)

    # -- description -----------------------------------------------------------------------------
    @property
    def component(self) -> str:
        return self.spec.name

    @property
    def kernel(self) -> str:
        return self.spec.kernel

    @property
    def weight_name(self) -> str:
        return self.weights.name

    @property
    def num_features(self) -> int:
        return self._num_features

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    @property
    def kind(self) -> int:
        return self.spec.kind

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_features={self.num_features}, component={self.component!r}, "
            f"weights={self.weight_name!r}, kernel={self.kernel!r}, num_heads={self.num_heads}"
            + ("" if self.log_mix is None else ", mix=True")
        )

    def projection(self) -> torch.Tensor:
        """The dense W ``[num_heads, m, head_dim]`` (differentiable for learnable weights)."""
        return self.weights.projection()

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Resample W in place (learnable weights and a learned component's log-weights are re-initialised).

        Under an initialised ``torch.distributed`` process group, ``seed=None`` takes a seed drawn on rank 0
        and broadcast, so every rank draws the same W (a collective: every rank must call it)."""
        self.weights.redraw(_shared_seed() if seed is None else seed)
        if self.spec.learned:
            self.log_weight.zero_()

    # -- statistics ------------------------------------------------------------------------------
    def running_moments(self) -> Moments:
        return Moments(self.running_mean_x, self.running_sq_x, self.running_mean_y, self.running_sq_y)

    @torch.no_grad()
    def _update_running(self, m: Moments) -> None:
        # Per-(batch, head) moments [B, H, D] -> per head [num_heads, D] (shared W: pooled over heads).
        def reduce(t, like):
            t = t.to(like.dtype).mean(0)
            return t.mean(0, keepdim=True) if self.num_heads == 1 else t

        first = self.num_batches_tracked == 0
        n = self.num_batches_tracked.float() + 1.0
        rate = 1.0 / n if self.stats_momentum is None else torch.full_like(n, self.stats_momentum)
        rate = torch.where(first, torch.ones_like(rate), rate)
        bufs = self.running_moments().tensors()
        new = [reduce(t, buf) for buf, t in zip(bufs, m.tensors())]
        if self.stats_sync is not None:  # data parallel: the means of the global batch
            new = self.stats_sync(new, m.mean_x.shape[0])
        for buf, t in zip(bufs, new):
            buf.lerp_(t, rate.to(buf.dtype))
        self.num_batches_tracked.add_(1)

    # -- resolving the parameters of one call ----------------------------------------------------
    def check_input(self, head_dim: int, num_heads: int) -> None:
        """``num_heads``: the key/value heads of the inputs (H_kv); the map has one W per key/value head
        or one shared W."""
        if head_dim != self.head_dim:
            raise ValueError(
                f"feature map was built for head_dim={self.head_dim}, but the inputs have head dim {head_dim}"
            )
        if self.num_heads not in (1, num_heads):
            raise ValueError(
                f"feature map was built for num_heads={self.num_heads}, but the inputs have {num_heads} key/value heads"
            )

    def _source_tensors(self) -> list[torch.Tensor]:
        """Every tensor W and the constant parts of the parameters are made of (read from the modules'
        own dicts: cheaper than ``parameters()`` on the decode path)."""
        tensors = [
            t
            for mod in self._source_modules
            for d in (mod._parameters, mod._buffers)
            for t in d.values()
            if t is not None
        ]
        if self.spec.name == "gerf":
            tensors.append(self._buffers["A"])
        if self.spec.learned:
            tensors.append(self._parameters["log_weight"])
        return tensors

    def _static_params(self, H: int, device, cdt) -> tuple:
        """(W ``[H, m, D]``, wsq ``[H, m]``, and for components whose A is a constant: bias ``[1, H, m]``,
        freq ``[1, H]``): the parts of the parameters that do not depend on the tokens.

        They are kept for the next call and rebuilt when a source tensor changes: the key holds each
        source's storage address and version counter (bumped by in-place updates: optimizer steps,
        ``redraw``, ``load_state_dict``), so ``.to()`` (new storage) and in-place changes both miss.
        The entry holds the sources themselves, so their storage cannot be reused while it lives. Nothing
        is kept while autograd records a graph through learnable weights (each call then builds its own
        differentiable W), nor inside a torch.compile trace."""
        sources = self._source_tensors()
        track = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        cacheable = not track and not torch.compiler.is_compiling()
        if cacheable:
            key = (H, device, cdt, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources))
            entry = self._static_cache
            if entry is not None and entry[0] == key:
                return entry[2]
        W = self.projection().to(device=device, dtype=cdt)
        if W.shape[0] != H:
            W = W.expand(H, -1, -1)
        wsq = (W * W).sum(-1)  # [H, m]
        bias = freq = None
        spec = self.spec
        if not spec.data_dependent:
            if spec.name == "gerf":
                A = self.A.to(device=device, dtype=cdt).expand(1, H)
            else:
                A = torch.zeros((), dtype=cdt, device=device).expand(1, H)
            bias, freq = self._bias_freq(A, wsq)
        value = (W, wsq, bias, freq)
        if cacheable:
            self._static_cache = (key, sources, value)
        return value

    def _bias_freq(self, A: torch.Tensor, wsq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bias ``[B, H, m]`` and freq ``[B, H]`` from A ``[B, H]`` and |w|^2 ``[H, m]``."""
        A = A.detach()
        one_m4a = 1.0 - 4.0 * A
        freq = one_m4a.sqrt().contiguous()
        log_d = (self.head_dim / 4.0) * torch.log(one_m4a)  # [B, H]
        bias = log_d[:, :, None] + A[:, :, None] * wsq[None] + self.spec.log_norm(self.num_features)
        if self.spec.learned:  # hedgehog: a learnable log-weight per frequency, added to the bias
            bias = bias + self.log_weight.to(device=wsq.device, dtype=wsq.dtype)[None]
        return bias.contiguous(), freq

    def feature_params(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        causal: bool,
        key_padding_mask: torch.Tensor | None = None,
        update_stats: bool | None = None,
        moments: Moments | None = None,
        offsets: list[int] | None = None,
    ) -> FeatureParams:
        """Resolve W, bias, freq and psi for queries ``q [B, T, H, D]`` and keys ``k [B, T, H_kv, D]``.

        The parameters are per key/value head (``[H_kv, ...]``): the H / H_kv query heads of a group share
        them. OPRF/SADERF statistics of a (batch, key/value head) pool the keys of that head and the
        queries of every query head of its group. fp32 parameters (fp64 for fp64 inputs). In training
        mode (or when ``update_stats`` is True) OPRF/SADERF's running statistics are updated from this
        batch after the parameters were computed. ``moments`` replaces the sequence moments of q and k
        ``[B, H_kv, D]`` (context parallelism passes those of the whole sequence, reduced over the ranks
        that hold its pieces).

        ``offsets`` (packed sequences: B = 1 and the N + 1 boundaries of ``cu_seqlens`` as a list) gives one
        parameter row per sequence (``bias [N, H_kv, m]`` ...), equal to resolving every sequence on its
        own in order: non-causal statistics per sequence, the running statistics updated once per
        non-empty sequence, and in causal mode each sequence reads them as the sequences before it left them.
        """
        B, _, H, D = q.shape
        Hk = k.shape[2]
        self.check_input(D, Hk)
        spec = self.spec
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        device = q.device
        W, wsq, bias, freq = self._static_params(Hk, device, cdt)
        rows = B if offsets is None else len(offsets) - 1
        psi = None
        if spec.data_dependent:
            update = update_stats if update_stats is not None else self.training
            if moments is None and (update or not causal):  # causal inference reads the running ones only
                root = math.sqrt(scale)
                x, y = q.detach().to(cdt) * root, k.detach().to(cdt) * root
                moments = sequence_moments(x, y, key_padding_mask, offsets)
            if causal and update and offsets is not None:
                # each packed sequence reads the running statistics as the sequences before it left them
                parts = []
                for i in range(rows):
                    parts.append(self._oprf_params(self.running_moments(), device, cdt))
                    if offsets[i + 1] > offsets[i]:
                        self._update_running(moments.rows(i))
                A = torch.stack([a for a, _ in parts])
                psi = None if parts[0][1] is None else torch.stack([p for _, p in parts])
            else:
                if causal:
                    A, psi = self._oprf_params(self.running_moments(), device, cdt)  # [H_kv], [H_kv, D]
                    A = A[None].expand(rows, Hk)
                    psi = None if psi is None else psi[None].expand(rows, Hk, D)
                else:
                    A, psi = self._oprf_params(moments, device, cdt)  # [rows, H_kv], [rows, H_kv, D]
                if update and offsets is None:
                    self._update_running(moments)
                elif update:  # one update per non-empty packed sequence, in order
                    for i in range(rows):
                        if offsets[i + 1] > offsets[i]:
                            self._update_running(moments.rows(i))
            if psi is not None:
                psi = psi.contiguous()
            bias, freq = self._bias_freq(A, wsq)
        elif rows != 1:
            bias, freq = bias.expand(rows, -1, -1), freq.expand(rows, -1)
        return FeatureParams(
            spec.kind,
            W,
            bias,
            freq,
            psi,
            spec.c_t,
            spec.c_o,
            float(scale),
            self.num_features,
            self.feature_dim,
            -0.5 if spec.kernel == "gaussian" else 0.0,
            self._log_mix(Hk, device, cdt),
        )

    def _log_mix(self, H: int, device, cdt) -> torch.Tensor | None:
        """The exact part's log-factor ``[H]`` (one per key/value head), or None without a factor."""
        a = self.log_mix
        if a is None:
            return None
        a = a.to(device=device, dtype=cdt)
        return a.expand(H) if a.shape[0] != H else a

    def _oprf_params(self, src: Moments, device, cdt) -> tuple[torch.Tensor, torch.Tensor | None]:
        """OPRF's A* and SADERF's psi (or None) from moments ``[..., D]``."""
        src = Moments(*(t.to(device=device, dtype=cdt) for t in src.tensors()))
        psi = saderf_psi(src) if self.spec.uses_psi else None
        return oprf_A(src, psi), psi

    # -- kernel estimate ------------------------------------------------------------------------
    def kernel_estimate(self, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """The random-feature estimate of K(q, k) for every pair: ``[B, H, Tq, Tk]``.

        K is exp(scale q.k) (softmax) or exp(-scale |q - k|^2 / 2) (gaussian). q ``[B, Tq, H, D]``,
        k ``[B, Tk, H, D]``. Data-dependent parameters come from q and k themselves (non-causal rule);
        running statistics are not touched.
        """
        check_qk_pair(q, k)
        self.check_input(q.shape[-1], q.shape[2])
        scale = resolve_scale(scale, q.shape[-1])
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        x = q.to(cdt) * math.sqrt(scale)
        y = k.to(cdt) * math.sqrt(scale)
        p = self.feature_params(q, k, scale=scale, causal=False, update_stats=False)
        eq, mq = feature_logits(
            x.transpose(1, 2), p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=True
        )
        ek, mk = feature_logits(
            y.transpose(1, 2), p.W, p.bias, p.freq, p.psi, kind=p.kind, c_t=p.c_t, c_o=p.c_o, query=False
        )
        sq = eq.amax(-1, keepdim=True).detach()
        sk = ek.amax(-1, keepdim=True).detach()
        fq = torch.exp(eq - sq)
        fk = torch.exp(ek - sk)
        if mq is not None:
            fq, fk = fq * mq, fk * mk
        return (fq @ fk.transpose(-1, -2)) * torch.exp(sq + sk.transpose(-1, -2))


__all__ = ["RandomFeatureMap", "FeatureParams", "COMPONENTS", "WEIGHTS", "EXP", "HYP", "TRIG"]
