"""Triton building blocks shared by the forward and backward kernels: the component switch.

Features are tiled by FREQUENCY: a tile of BM rows of W gives one feature block for EXP components
and two (plus/minus for HYP, cos/sin for TRIG) for the others, so W is loaded once per tile. Feature
f of a width-2m map is frequency f mod m, half f // m (the layout of ``components.feature_logits``).

Every exponent is computed in fp32. Padded frequencies, padded rows and masked keys get exponent -inf, so
they add nothing and never move a maximum.

Matrix products (``_dot``) run on tensor cores with fp32 accumulation, at the precision PREC the host
picks from the input dtype (``dot_precision``): "tf32x3" for fp32 inputs (three passes: about fp32
accuracy) and "tf32" for fp16/bf16 inputs. In "tf32" mode both operands are first rounded to the nearest
tf32 value (10 mantissa bits, as many as fp16 inputs carry; fp32's exponent range, so features far below
their stabiliser still count): a tensor core reads an fp32 operand by truncating it, a bias of about
-2^-11 per operand that, in the projection, would shift every exponent by about 0.1% of its size.
Rounded operands are exact in tf32, so the product is the same on a GPU and in the Triton interpreter
(which multiplies in fp32 whatever the precision asked): the interpreter tests check the GPU's numerics.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton
import triton.language as tl

from ...contract import DEN_EPS, EXP, HYP, NORM_HYP, TRIG

# The contract's feature kinds and denominator floor as Triton constexprs (jit functions read only
# constexpr globals): kernels compare KIND with these names, never with literals.
KIND_EXP = tl.constexpr(EXP)
KIND_HYP = tl.constexpr(HYP)
KIND_TRIG = tl.constexpr(TRIG)
DEN_FLOOR = tl.constexpr(DEN_EPS)


def kernel_kind(kind: int) -> int:
    """The KIND a kernel is compiled for: hedgehog (NORM_HYP) is HYP's features with each key's
    log-sum-exp subtracted (the kernels' HAS_LSE, lse from the stabiliser pass), every other kind itself."""
    return HYP if kind == NORM_HYP else kind


@contextlib.contextmanager
def resource_errors(what: str, dtype, D: int, Dv: int):
    """Turn Triton's OutOfResources (a kernel needs more shared memory or registers than this GPU gives a
    block) into an error that names the call and the ways around it."""
    from triton.runtime.errors import OutOfResources

    try:
        yield
    except OutOfResources as exc:
        raise RuntimeError(
            f"the Triton {what} for {str(dtype).replace('torch.', '')} inputs with head dims D={D}, Dv={Dv} does "
            f"not fit this GPU ({exc}); fp16/bf16 inputs or head dims <= 128 need less, and "
            f"backend='reference' runs any shape"
        ) from exc


@contextlib.contextmanager
def on_device_of(names: str, *tensors):
    """The device guard of every Triton entry: the tensors (None for an absent optional input) must share
    one device, else a ValueError names the first that differs; the kernels then launch under that device
    (a launch goes to the current CUDA device, which need not be the inputs' one). ``names``: the
    tensors' names, comma separated, for the error."""
    labels = [n.strip() for n in names.split(",")]
    first = tensors[0].device
    for label, t in zip(labels, tensors):
        if t is not None and t.device != first:
            raise ValueError(
                f"the Triton backend needs every input on one device: {labels[0]} is on {first}, {label} on {t.device}"
            )
    if first.type == "cuda":
        with torch.cuda.device(first):
            yield
    else:
        yield


def autotuned(kernel, configs, key, **kwargs):
    """The one autotuning convention of the kernels: a kernel with several candidate configurations is
    wrapped once, at import, by ``triton.autotune(configs, key=key, **kwargs)``; where autotuning is off
    (the Triton interpreter, which cannot benchmark, or ``SPECTRAFORMER_FUSED_AUTOTUNE=0``) this returns
    None and the caller launches the plain kernel with its fixed configuration. Kernels with a single
    configuration (the chunk mode's, chosen with ``bench.perf.compile_check``) are never wrapped."""
    from .. import autotune_enabled

    return triton.autotune(configs, key=key, **kwargs)(kernel) if autotune_enabled() else None


def dot_precision(*dtypes) -> str:
    """The PREC constexpr of every kernel for inputs of these dtypes (see the module docstring)."""
    return "tf32x3" if torch.float32 in dtypes else "tf32"


@triton.jit
def _tf32(x):
    """Round fp32 values to the nearest tf32 value (ties to even) in integer arithmetic; exact values, inf
    and NaN are unchanged (values within 2^-11 of fp32's largest would round to inf; never the case here)."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0xFFF + ((b >> 13) & 1)) & -8192  # -8192 = 0xFFFFE000: drop 13 bits
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation: "tf32" (operands rounded to tf32, one tensor-core pass) or "tf32x3"."""
    if PREC == "tf32":
        return tl.dot(_tf32(a), _tf32(b), input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _transform(x, psi, root, c_t, c_o, QUERY: tl.constexpr, HAS_PSI: tl.constexpr, HAS_CO: tl.constexpr):
    """x [BT, BD] raw input tile -> (x' [BT, BD], r [BT]) with x = sqrt(scale) q, x' = psi x (queries)
    or x / psi (keys), r = c_t |x'|^2 + c_o |x|^2. psi [BD] (ignored unless HAS_PSI)."""
    x = x.to(tl.float32) * root
    if HAS_PSI:
        if QUERY:
            xt = x * psi[None, :]
        else:
            xt = x / psi[None, :]
    else:
        xt = x
    r = c_t * tl.sum(xt * xt, axis=1)
    if HAS_CO:
        r += c_o * tl.sum(x * x, axis=1)
    return xt, r


@triton.jit
def _feature_logits(xt, w, bias, freq, r, KIND: tl.constexpr, PREC: tl.constexpr):
    """Exponents and multipliers of one frequency tile.

    xt [BT, BD] fp32, w [BM, BD] fp32, bias [BM] (-inf on padded frequencies), freq scalar, r [BT].
    Returns (u, ea, eb, ma, mb), all [BT, BM]: u = freq * x'.w, block a = (exp / plus / cos), block b =
    (unused / minus / sin); phi = exp(e - shift) * m. For EXP and HYP the multipliers are 1.
    """
    u = _dot(xt, tl.trans(w), PREC) * freq  # [BT, BD] @ [BD, BM] -> [BT, BM]
    base = bias[None, :] + r[:, None]  # [BT, BM]
    if KIND == KIND_TRIG:
        ea = base
        eb = base
        ma = tl.cos(u)
        mb = tl.sin(u)
    elif KIND == KIND_HYP:
        ea = base + u
        eb = base - u
        ma = tl.full(u.shape, 1.0, tl.float32)
        mb = ma
    else:
        ea = base + u
        eb = ea
        ma = tl.full(u.shape, 1.0, tl.float32)
        mb = ma
    return u, ea, eb, ma, mb


@triton.jit
def _features(xt, r, w, bias, freq, shift, keep, KIND: tl.constexpr, PREC: tl.constexpr):
    """Stabilised features (blocks a, b) of one frequency tile: phi = exp(e - shift) * mult, 0 on rows
    not kept and on padded frequencies (their bias is -inf). shift broadcasts against [BT, BM]."""
    _, ea, eb, ma, mb = _feature_logits(xt, w, bias, freq, r, KIND, PREC)
    # Rows not kept get exponent -inf before exp (never exp of a large number that is then discarded).
    pa = tl.exp(tl.where(keep[:, None], ea - shift, float("-inf"))) * ma
    pb = pa
    if KIND != KIND_EXP:
        pb = tl.exp(tl.where(keep[:, None], eb - shift, float("-inf"))) * mb
    return pa, pb


@triton.jit
def _keep_rows(mask, i_b, o_t, m_t, s_mb, s_mt, HAS_MASK: tl.constexpr):
    """[BT] rows that are real tokens and, with a key padding mask, kept."""
    keep = m_t
    if HAS_MASK:
        keep = keep & (tl.load(mask + i_b * s_mb + o_t * s_mt, mask=m_t, other=0) != 0)
    return keep


@triton.jit
def _load_rows(x, i_b, i_h, o_t, m_t, o_d, m_d, s_b, s_t, s_h, s_d):
    """[BT, BD] tile of a [B, T, H, D] tensor of any strides; zeros outside."""
    p_x = x + i_b * s_b + i_h * s_h + o_t[:, None] * s_t + o_d[None, :] * s_d
    return tl.load(p_x, mask=m_t[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _store_out(
    o, den, b_num, b_den, i_bh, i_b, i_h, i_m, i_v, o_t, m_t, o_v, m_v, T, H, DV, s_on, s_dn, SPLIT: tl.constexpr
):
    """Write one chunk's output rows: o = num / max(|den|, eps), or the partials of frequency tile i_m."""
    p_o = o + i_b * T * H * DV + o_t[:, None] * H * DV + i_h * DV + o_v[None, :]
    if SPLIT:
        tl.store(p_o + i_m * s_on, b_num, mask=m_t[:, None] & m_v[None, :])
    else:
        b_o = b_num / tl.maximum(tl.abs(b_den), DEN_FLOOR)[:, None]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(den + i_m * s_dn + i_bh * T + o_t, b_den, mask=m_t)


@triton.jit
def _seq_span(cu, i_b, i_bh, i_h, H, T, IS_VARLEN: tl.constexpr):
    """The token rows of one program: ``(bos, eos, i_bt, i_bht)``.

    Dense: rows [0, T) of batch row i_b. Packed variable-length sequences (IS_VARLEN): i_b is the sequence
    index n (it indexes the parameters, states and per-sequence stabilisers), the token tensors have batch
    1 and the rows are [cu[n], cu[n + 1]). i_bt is the batch index of the token tensors and i_bht their
    (batch, head) row (= i_bh when dense)."""
    if IS_VARLEN:
        bos = tl.load(cu + i_b).to(tl.int64)
        eos = tl.load(cu + i_b + 1).to(tl.int64)
        i_bt = i_b * 0
        i_bht = i_h
    else:
        bos = 0  # a constant: the dense offsets keep T's 32-bit type
        eos = T
        i_bt = i_b
        i_bht = i_bh
    return bos, eos, i_bt, i_bht


class VarlenTables:
    """Host-side tables of packed variable-length sequences (``cu_seqlens [N + 1]``, read once).

    Every sequence owns ``max(1, ceil(len / BT))`` consecutive chunk SLOTS (an empty sequence one slot, so
    that the stabiliser of its first and last chunk, i.e. of its initial state, exists), and, with ``cps``
    chunks per range, ``max(1, ceil(chunks / cps))`` range slots. No buffer is padded to the longest
    sequence: per-chunk buffers have ``num_chunk_slots <= Ttot // BT + N`` (``chunk_capacity``, the size
    the forward allocates, known from the shapes alone), per-range ones ``num_range_slots`` entries.

    chunk_off / range_off: int32 ``[N + 1]`` offsets of each sequence's first slot; chunk_seq / range_seq:
    int32 ``[slots]`` the sequence of each slot; range_lens: the range slots per sequence (a list)."""

    def __init__(self, cu_seqlens: torch.Tensor, BT: int):
        cu = [int(x) for x in cu_seqlens.tolist()]
        dev = cu_seqlens.device
        self.cu = cu_seqlens
        self.num_seqs = len(cu) - 1
        self.total = cu[-1]
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        chunks = [triton.cdiv(n, BT) for n in lens]
        self.max_chunks = max(chunks, default=0)
        self.chunk_capacity = chunk_capacity(self.total, self.num_seqs, BT)
        self.chunks = chunks
        slots = [max(1, c) for c in chunks]
        self.num_chunk_slots = sum(slots)
        self.chunk_off, self.chunk_seq = self._offsets(slots, dev), self._owners(slots, dev)

    def set_ranges(self, cps: int) -> "VarlenTables":
        """The range slots for ranges of ``cps`` chunks (the chunk mode)."""
        ranges = [max(1, triton.cdiv(c, cps)) for c in self.chunks]
        self.range_lens = ranges
        self.num_range_slots = sum(ranges)
        dev = self.cu.device
        self.range_off, self.range_seq = self._offsets(ranges, dev), self._owners(ranges, dev)
        return self

    @staticmethod
    def _offsets(sizes, dev):
        return torch.tensor([0] + list(itertools.accumulate(sizes)), dtype=torch.int32, device=dev)

    @staticmethod
    def _owners(sizes, dev):
        return torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(sizes)).to(dev)

    def first_chunk(self, kstab: torch.Tensor) -> torch.Tensor:
        """``[N, Hk]``: each sequence's stabiliser at its first chunk slot, from a causal kstab ``[1, Hk, cap]``."""
        return kstab[0][:, self.chunk_off[:-1].long()].transpose(0, 1)

    def per_sequence(self, parts: torch.Tensor) -> torch.Tensor:
        """Sum per-range-slot partials ``[range slots, ...]`` over each sequence's slots, in order: ``[N, ...]``."""
        lengths = torch.tensor(self.range_lens, device=parts.device)
        return torch.segment_reduce(parts, "sum", lengths=lengths, axis=0)


# Kernel parameter -> VarlenTables attribute, for every kernel that takes packed-sequence tables.
_VARLEN_ATTRS = dict(
    cu="cu",
    chunk_off="chunk_off",
    chunk_seq="chunk_seq",
    range_off="range_off",
    range_seq="range_seq",
    NCS="chunk_capacity",  # chunk slots of a per-chunk stabiliser buffer (kstab)
    NRS="num_range_slots",
)


def varlen_args(varlen: VarlenTables | None, *names: str, **values) -> dict:
    """The packed-sequence arguments ``names`` of a kernel from ``varlen``; ``values`` set others (or
    replace a table's, e.g. the slots of a buffer that is not kstab). All None when dense: IS_VARLEN is
    then False and the dense kernels keep the signature they have without packed sequences."""
    if varlen is None:
        return dict.fromkeys((*names, *values))
    return {**{name: getattr(varlen, _VARLEN_ATTRS[name]) for name in names}, **values}


def chunk_capacity(total: int, num_seqs: int, BT: int) -> int:
    """The chunk slots a causal kstab of packed sequences is allocated with: Ttot // BT + N bounds
    sum over sequences of max(1, ceil(len / BT))."""
    return total // BT + num_seqs


def optional_inputs(**flags: str):
    """``@triton.heuristics`` that derives each constexpr flag from whether the pointer argument it names
    was given: optional inputs travel as None and ``@optional_inputs(HAS_PSI="psi", IS_VARLEN="cu")``
    is the one place their flags are set (a None argument is a constexpr: its branch compiles away)."""
    return triton.heuristics({flag: _given(arg) for flag, arg in flags.items()})


def _given(arg: str):
    return lambda args: args[arg] is not None
