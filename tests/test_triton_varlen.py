"""Packed variable-length sequences (cu_seqlens) in the Triton backend, both causal modes.

One ``triton_attention(..., cu_seqlens=)`` call over packed sequences must equal running each sequence
alone: against the Triton backend per sequence and against the reference per sequence, for the output,
the final state and the gradients of q, k, v, the learnable weights and the initial state. The lengths
include 0 and 1 and lengths that are not multiples of the chunk (16 tokens in chunk mode, where a range
holds two chunks under the interpreter, so the longer sequences span several ranges).
"""

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from helpers import assert_close

from spectraformer_fused import ops
from spectraformer_fused.feature_map import RandomFeatureMap
from spectraformer_fused.reference import reference_attention
from spectraformer_fused.state import RFState, empty_state

pytestmark = pytest.mark.skipif(not ops.triton_importable(), reason="triton is not installed")

MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"


@pytest.fixture(autouse=True)
def _need_device(device):
    if device == "cpu" and not ops.triton_interpreting():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")


@dataclass
class Case:
    component: str
    lens: tuple
    causal: bool = True
    mode: str = "walk"
    dtype: torch.dtype = torch.float32
    H: int = 2
    Hk: int = 2
    D: int = 16
    Dv: int = 16
    M: int = 16
    init: bool = True
    kernel: str = "softmax"
    input_scale: float = 1.0
    args: dict = field(default_factory=dict)
    triton_per_seq: bool = False  # also compare with the Triton backend run per sequence

    @property
    def id(self):
        dt = {torch.float32: "fp32", torch.float16: "fp16"}[self.dtype]
        parts = [
            "L" + "_".join(map(str, self.lens)),
            f"H{self.H}-Hk{self.Hk}-D{self.D}-Dv{self.Dv}-M{self.M}",
            self.component,
            "causal" if self.causal else "noncausal",
            self.mode if self.causal else "",
            dt,
        ]
        parts += [n for n, on in (("init", self.init), ("gauss", self.kernel == "gaussian")) if on]
        return "-".join(p for p in parts if p)


CASES = [
    # walk mode and non-causal (one mode): chunks of 32 tokens; non-causal sums run over two chunk ranges.
    # m = 72: two frequency tiles in the forward, three in the backward (per-tile partials).
    Case("posrf", (37, 0, 1, 20), H=1, Hk=1, M=72, triton_per_seq=True),
    Case("hyprf", (5, 40, 0), H=1, Hk=1, kernel="gaussian", init=False),
    Case("trigrf", (33, 1, 9), H=2, Hk=1, input_scale=0.3, dtype=torch.float16),
    Case("oprf", (40, 0, 23, 1), causal=False, H=2, Hk=1, triton_per_seq=True),
    Case("saderf", (29, 40, 1), causal=False, H=1, Hk=1, kernel="gaussian", dtype=torch.float16, init=False),
    # chunk mode: chunks of 16, ranges of two chunks, so the 33+ token sequences span several ranges
    Case("posrf", (50, 0, 1, 9), mode="chunk", H=1, Hk=1, M=32, Dv=19, triton_per_seq=True),
    Case("hyprf", (37, 1), mode="chunk", H=2, Hk=1, kernel="gaussian", init=False),
    Case("trigrf", (0, 40, 17), mode="chunk", H=1, Hk=1, input_scale=0.3, dtype=torch.float16),
    Case("oprf", (33, 0), mode="chunk", H=1, Hk=1, dtype=torch.float16),
    Case("saderf", (20, 1, 35), mode="chunk", H=2, Hk=1, kernel="gaussian"),
]


def _make(case: Case, device, seed=0):
    """Packed inputs [1, Ttot, ., .], offsets, a learnable-weight feature map (eval mode, OPRF/SADERF running
    statistics filled) and, with ``case.init``, an initial state per sequence."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device)

    fm = RandomFeatureMap(
        case.D,
        case.M,
        component=case.component,
        weights="learnable",
        kernel=case.kernel,
        num_heads=case.Hk,
        seed=seed,
        device=device,
        **case.args,
    )
    T, N = sum(case.lens), len(case.lens)
    q = rnd(1, T, case.H, case.D, s=case.input_scale).to(case.dtype)
    k = rnd(1, T, case.Hk, case.D, s=case.input_scale).to(case.dtype)
    v = rnd(1, T, case.Hk, case.Dv).to(case.dtype)
    if fm.spec.data_dependent:
        fm.train()
        fm.feature_params(rnd(2, 24, case.H, case.D), rnd(2, 24, case.Hk, case.D), scale=case.D**-0.5, causal=False)
    fm.eval()
    cu = torch.tensor([0, *torch.tensor(case.lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    state = None
    if case.init:
        F = fm.feature_dim
        state = RFState(rnd(N, case.Hk, F, case.Dv).abs() * 0.1, rnd(N, case.Hk, F).abs() * 0.1 + 0.05, rnd(N, case.Hk))
    return fm, q, k, v, cu, state


def _params(fm, q, k, a, b, case):
    """The parameters of sequence q[:, a:b] alone (an empty sequence takes those of a one-token view: its
    parameters are never read for features, only its state passes through)."""
    b_ = max(b, a + 1)
    return fm.feature_params(q[:, a:b_], k[:, a:b_], scale=case.D**-0.5, causal=case.causal, update_stats=False)


def _run(case, fm, q, k, v, cu, state, *, how, seed=1):
    """Forward + backward of a fixed random linear loss of o and of the final state; ``how`` is "varlen"
    (one packed Triton call), "triton" or "reference" (one call per sequence)."""
    from spectraformer_fused.ops.triton.attention import triton_attention

    fm.zero_grad(set_to_none=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    st = (
        None
        if state is None
        else RFState(state.S.clone().requires_grad_(), state.z.clone().requires_grad_(), state.log_scale)
    )
    offs = cu.tolist()
    N = len(offs) - 1
    per_seq = [_params(fm, q, k, offs[n], offs[n + 1], case) for n in range(N)]
    kw = dict(causal=case.causal, key_padding_mask=None, output_final_state=True)
    if how == "varlen":
        p = dataclasses.replace(
            per_seq[0],
            bias=torch.cat([p.bias for p in per_seq]),
            freq=torch.cat([p.freq for p in per_seq]),
            psi=None if per_seq[0].psi is None else torch.cat([p.psi for p in per_seq]),
        )
        o, fin = triton_attention(q, k, v, p, initial_state=st, cu_seqlens=cu, **kw)
    else:
        fn = triton_attention if how == "triton" else reference_attention
        outs, fins = [], []
        for n in range(N):
            a, b = offs[n], offs[n + 1]
            init = None if st is None else RFState(*(t[n : n + 1] for t in st))
            if a == b:  # an empty sequence: its final state is its initial state
                fins.append(
                    init if init is not None else empty_state(1, case.Hk, fm.feature_dim, case.Dv, device=q.device)
                )
                continue
            o_n, fin_n = fn(q[:, a:b], k[:, a:b], v[:, a:b], per_seq[n], initial_state=init, **kw)
            outs.append(o_n)
            fins.append(fin_n)
        o = torch.cat(outs, 1)
        fin = RFState(*(torch.cat(parts, 0) for parts in zip(*fins)))
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    loss = loss + (fin.S * torch.randn(fin.S.shape, generator=gen).to(o.device)).sum()
    loss = loss + (fin.z * torch.randn(fin.z.shape, generator=gen).to(o.device)).sum()
    loss.backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    grads.update({f"W.{n}": p.grad for n, p in fm.named_parameters() if p.requires_grad})
    if st is not None:
        grads["S0"], grads["z0"] = st.S.grad, st.z.grad
    return o, fin, grads


def _compare(got, expected, dt, what):
    (o, fin, g), (o_e, fin_e, g_e) = got, expected
    assert_close(o, o_e, dt, name=f"o vs {what}")
    assert_close(fin.S, fin_e.S, dt, name=f"S vs {what}")
    assert_close(fin.z, fin_e.z, dt, name=f"z vs {what}")
    assert torch.equal(torch.isneginf(fin.log_scale), torch.isneginf(fin_e.log_scale)), f"log_scale vs {what}"
    finite = torch.isfinite(fin_e.log_scale)
    assert_close(fin.log_scale[finite], fin_e.log_scale[finite].float(), dt, name=f"log_scale vs {what}")
    assert any(n.startswith("W.") for n in g_e), "the weights of these cases are learnable"
    for name, e in g_e.items():
        assert g[name] is not None, f"no gradient for {name}"
        assert_close(g[name], e, dt, name=f"d{name} vs {what}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_varlen_matches_per_sequence(case, device, monkeypatch):
    from spectraformer_fused.ops.triton import attention as ta

    monkeypatch.setenv(MODE_ENV, case.mode)
    calls = []
    for name in ("rf_fwd", "chunk_fwd"):
        fn = getattr(ta, name)
        monkeypatch.setattr(ta, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    fm, q, k, v, cu, state = _make(case, device)
    got = _run(case, fm, q, k, v, cu, state, how="varlen")
    expected = "chunk_fwd" if case.causal and case.mode == "chunk" else "rf_fwd"
    assert calls == [expected], calls  # one forward for all the sequences, in the asked mode
    _compare(got, _run(case, fm, q, k, v, cu, state, how="reference"), case.dtype, "reference per sequence")
    if case.triton_per_seq:
        _compare(got, _run(case, fm, q, k, v, cu, state, how="triton"), case.dtype, "triton per sequence")
