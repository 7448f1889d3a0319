"""The chunk-parallel causal mode (ops/triton/chunk.py) against the reference, forward and every gradient,
and the mode switch. The chunk mode's chunks are 16 tokens and, under the interpreter, a range holds at
most two chunks (``range_chunks``), so the cases cross range boundaries: T = 50 (four chunks, two
ranges, the last chunk partial), T = 70 (five chunks, three ranges, the last range one partial chunk),
T = 20 (two ranges of one chunk); T = 1 is one range. The CUDA-only tests check a GPU user's overheads:
no host synchronisation in a causal forward and backward, and a decode step captured in a CUDA graph.
"""

import pytest
import torch
from helpers import assert_close, case_id
from test_triton_bwd import _case, _make, _run

from spectraformer_fused import ops
from spectraformer_fused.attention import rf_attention
from spectraformer_fused.state import RFState

pytestmark = pytest.mark.skipif(not ops.triton_importable(), reason="triton is not installed")

MODE_ENV = "SPECTRAFORMER_FUSED_TRITON_MODE"


@pytest.fixture(autouse=True)
def _need_device(device):
    if device == "cpu" and not ops.triton_interpreting():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def chunk_calls(monkeypatch):
    """Run the Triton backend in chunk mode and count the chunk-mode forward and backward calls."""
    from spectraformer_fused.ops.triton import attention as ta

    calls = {"fwd": 0, "bwd": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setenv(MODE_ENV, "chunk")
    monkeypatch.setattr(ta, "chunk_fwd", counted("fwd", ta.chunk_fwd))
    monkeypatch.setattr(ta, "chunk_bwd", counted("bwd", ta.chunk_bwd))
    return calls


CASES = [
    _case("posrf", causal=True, B=1, T=50, m=32, Dv=19, mask=True, init=True, final=True),
    _case("hyprf", causal=True, B=1, T=50, D=16, Dv=16, kernel="gaussian", init=True, final=True),
    _case("trigrf", causal=True, B=1, T=50, D=16, Dv=16, amp=0.3, mask=True, final=True),
    _case("gerf", causal=True, B=1, T=70, D=16, Dv=16, amp=0.3, init=True, args={"A": -0.05, "s": -1}),
    _case("saderf", causal=True, B=1, T=50, D=16, Dv=16, kernel="gaussian", dtype=torch.float16, mask=True, final=True),
    _case(
        "oprf",
        weights="fastfood_learnable",
        causal=True,
        B=1,
        T=50,
        D=16,
        Dv=16,
        dtype=torch.float16,
        mask=True,
        init=True,
    ),
    _case("posrf", causal=True, B=2, T=1, D=16, Dv=16, init=True, final=True),
    _case("posrf", causal=True, B=1, T=20, D=16, Dv=16, m=16, mask=True),
]


def _check_chunk_mode(case, chunk_calls, fm, q, k, v, mask, state):
    """The Triton backend in chunk mode against the reference: o, the final state, every gradient."""
    o_ref, fin_ref, g_ref = _run("reference", fm, q, k, v, mask, state, case)
    o, fin, g = _run("triton", fm, q, k, v, mask, state, case)
    assert chunk_calls == {"fwd": 1, "bwd": 1}
    assert o.shape == o_ref.shape and fin.S.shape == fin_ref.S.shape
    dt = case.dtype
    assert_close(o, o_ref, dt, name="o")
    assert_close(fin.S, fin_ref.S, dt, name="S")
    assert_close(fin.z, fin_ref.z, dt, name="z")
    assert_close(fin.log_scale, fin_ref.log_scale, dt, name="log_scale")
    assert any(n.startswith("W.") for n in g_ref), "the weights of these cases are learnable"
    for name, expected in g_ref.items():
        assert g[name] is not None, f"no gradient for {name}"
        assert_close(g[name], expected, dt, name=f"d{name}")
    return g_ref


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunk_mode_matches_reference(case, device, chunk_calls):
    _check_chunk_mode(case, chunk_calls, *_make(case, device))


# grouped-query (H = 4, H_kv = 2) and multi-query (H_kv = 1) attention; T crosses two or three ranges.
# trigrf with groups: test_modes_give_the_same_gradients
GQA_CASES = [
    _case("posrf", causal=True, B=1, T=50, H=4, H_kv=2, D=16, Dv=16, mask=True, init=True, final=True),
    _case("hyprf", causal=True, B=1, T=70, H=4, H_kv=1, D=16, Dv=16, kernel="gaussian", init=True, final=True),
    _case(
        "saderf",
        causal=True,
        B=1,
        T=50,
        H=4,
        H_kv=1,
        D=16,
        Dv=16,
        kernel="gaussian",
        dtype=torch.float16,
        mask=True,
        init=True,
        final=True,
    ),
]


@pytest.mark.parametrize("case", GQA_CASES, ids=case_id)
def test_chunk_mode_grouped_query_matches_reference(case, device, chunk_calls):
    """Grouped-query and multi-query attention in chunk mode: outputs, the final state per key/value head
    and every gradient (dk, dv, dW, the initial state's: a group's sum)."""
    fm, q, k, v, mask, state = _make(case, device)
    assert q.shape[2] == case.H and k.shape[2] == case.H_kv < case.H
    g_ref = _check_chunk_mode(case, chunk_calls, fm, q, k, v, mask, state)
    assert ("S0" in g_ref) == case.init


@pytest.mark.parametrize("cps", [1, 3])
def test_chunk_forward_equals_walk(cps, device):
    """The chunk forward equals the walk (same stabilisers, same final state) whatever the range length:
    the states passed between ranges are fp32, so the ranges cost no accuracy."""
    from spectraformer_fused.ops.triton.chunk import chunk_fwd
    from spectraformer_fused.ops.triton.fwd import rf_fwd

    case = _case("hyprf", causal=True, B=1, T=70, D=16, Dv=16, mask=True, init=True)
    fm, q, k, v, mask, state = _make(case, device)
    p = fm.feature_params(q, k, scale=case.D**-0.5, causal=True)
    args = (q, k, v, p.W.detach(), p.bias.detach(), p.freq, p.psi, mask, state.S, state.z, state.log_scale)
    kw = dict(
        kind=int(p.kind),
        c_t=float(p.c_t),
        c_o=float(p.c_o),
        scale=float(p.scale),
        output_final_state=True,
        chunk_size=16,
    )
    walk = rf_fwd(*args, causal=True, **kw)
    chunk = chunk_fwd(*args, cps=cps, **kw)
    for name, a, b in zip(("o", "den", "qmax", "kstab", "S", "z", "m"), chunk[:7], walk[:7]):
        assert_close(a, b, torch.float32, name=name, rtol=1e-5, atol_rel=1e-4)


MODE_CASES = [_case("trigrf", causal=True, B=1, T=50, D=16, Dv=16, amp=0.3, init=True, final=True)]
MODE_CASES.append(MODE_CASES[0].replace(H=4, H_kv=2))


@pytest.mark.parametrize("case", MODE_CASES, ids=case_id)
def test_modes_give_the_same_gradients(case, device, monkeypatch):
    """Walk and chunk mode, same inputs: outputs and every gradient agree to fp32 rounding (also with
    grouped-query attention: 4 query heads on 2 key/value heads)."""
    fm, q, k, v, mask, state = _make(case, device)
    results = {}
    for mode in ("walk", "chunk"):
        monkeypatch.setenv(MODE_ENV, mode)
        results[mode] = _run("triton", fm, q, k, v, mask, state, case)
    (o_w, fin_w, g_w), (o_c, fin_c, g_c) = results["walk"], results["chunk"]
    assert_close(o_c, o_w, torch.float32, name="o", rtol=1e-5, atol_rel=1e-4)
    assert_close(fin_c.S, fin_w.S, torch.float32, name="S", rtol=1e-5, atol_rel=1e-4)
    for name in g_w:
        assert_close(g_c[name], g_w[name], torch.float32, name=f"d{name}", rtol=1e-5, atol_rel=1e-4)


def test_mode_override_is_validated(device, monkeypatch):
    from spectraformer_fused.ops.triton.chunk import requested_mode

    monkeypatch.setenv(MODE_ENV, "fast")
    with pytest.raises(ValueError, match="auto, walk, chunk"):
        requested_mode()
    case = _case("posrf", causal=True, B=1, T=20, D=16, Dv=16)
    fm, q, k, v, mask, state = _make(case, device)
    with pytest.raises(ValueError, match=MODE_ENV):
        rf_attention(q, k, v, fm, causal=True, backend="triton")
    monkeypatch.setenv(MODE_ENV, " Walk ")
    assert requested_mode() == "walk"


def test_auto_rule():
    """auto: the walk while it fills the device or T spans at most two ranges; the chunk mode otherwise
    (132 multiprocessors: an H100). Without a GPU auto is the walk."""
    from spectraformer_fused.ops.triton.chunk import choose_mode, range_chunks, resolve_mode

    cpu = torch.device("cpu")
    assert choose_mode(programs=16, T=32768, multiprocessors=132) == "chunk"  # B=1 H=8, m=128
    assert choose_mode(programs=128, T=8192, multiprocessors=132) == "chunk"  # B=4 H=16
    assert choose_mode(programs=512, T=8192, multiprocessors=132) == "walk"
    assert choose_mode(programs=16, T=512, multiprocessors=132) == "walk"
    assert resolve_mode("auto", 2, 1 << 15, cpu) == "walk"
    assert resolve_mode("walk", 2, 1024, cpu) == "walk"
    assert resolve_mode("chunk", 64, 16, cpu) == "chunk"
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_mode("sequential", 2, 1024, cpu)
    assert [range_chunks(nc, 16, 1, cpu) for nc in (1, 3, 4, 9)] == [1, 1, 2, 2]


def test_range_states_stay_below_the_inputs():
    """The materialised states at the benchmark shape (B=4, H=16, T=8k, m=128, D=Dv=64, fp16) with ranges of
    RANGE_TOKENS tokens, forward and backward (two buffers: key and query side), below the size of q, k, v."""
    from spectraformer_fused.ops.triton.chunk import RANGE_TOKENS

    B, H, T, D, Dv, F = 4, 16, 8192, 64, 64, 128
    ranges = T // RANGE_TOKENS
    states = 2 * B * H * ranges * (F * Dv + F) * 4
    inputs = B * T * H * (2 * D + Dv) * 2
    assert states < inputs, (states, inputs)


@pytest.mark.gpu  # host synchronisation is a GPU matter
@pytest.mark.parametrize("mode", ["walk", "chunk"])
def test_causal_forward_backward_make_no_host_sync(mode, monkeypatch):
    monkeypatch.setenv(MODE_ENV, mode)
    case = _case("posrf", causal=True, B=1, T=512, H=2, D=64, Dv=64, m=64, dtype=torch.float16)
    fm, q, k, v, mask, state = _make(case, "cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, _ = rf_attention(q, k, v, fm, causal=True, backend="triton")  # compile and autotune first
    o.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, _ = rf_attention(q, k, v, fm, causal=True, backend="triton")
        o.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu  # CUDA graphs are a GPU feature
def test_decode_step_replays_in_a_cuda_graph():
    """A decode step (T = 1 with a state) captured in a CUDA graph and replayed equals the eager call."""
    case = _case("posrf", causal=True, B=2, T=1, H=2, D=64, Dv=64, m=64, dtype=torch.float16, init=True)
    fm, q, k, v, mask, state = _make(case, "cuda")
    static = [t.clone() for t in (q, k, v, state.S, state.z, state.log_scale)]

    def step():
        st = RFState(static[3], static[4], static[5])
        return rf_attention(
            static[0],
            static[1],
            static[2],
            fm,
            causal=True,
            initial_state=st,
            output_final_state=True,
            backend="triton",
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_g, st_g = step()
    gen = torch.Generator(device="cuda").manual_seed(3)
    for t in static[:3]:
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda").to(t.dtype))
    graph.replay()
    o_e, st_e = step()
    assert_close(o_g, o_e, torch.float32, name="o", rtol=0, atol_rel=0)
    assert_close(st_g.S, st_e.S, torch.float32, name="S", rtol=0, atol_rel=0)
