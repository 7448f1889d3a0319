"""Context parallelism and data-parallel consistency, in real processes on the CPU (gloo backend).

One spawn of 4 processes runs everything (starting processes is the slow part): the whole world is a
context-parallel group of 4, and two groups of 2 ([0, 1] and [2, 3]) run the same cases at world size 2.
Every case compares with ``rf_attention`` on the whole sequence in one process (fp64, reference
backend): outputs, final states, running statistics, and the gradients of q, k, v, the initial state and
the learnable weights (summed over ranks). ``run_local`` starts the processes: they meet through a file
store in a temporary directory (no port to choose), collectives time out, the processes are always
joined or killed, and a worker's exception fails the test with its traceback.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import assert_close

import spectraformer_fused as sf
from spectraformer_fused import RandomFeatureMap, RFState, rf_attention
from spectraformer_fused.distributed import (
    CommunicationLog,
    RunningStatsAllReduce,
    context_parallel_rf_attention,
    convert_sync_stats,
    run_local,
)

WORLD = 4
TIMEOUT_S = 240
B, H, D, DV, M = 2, 2, 8, 6, 8
F64 = torch.float64
_WEIGHTS = ("learnable", "fastfood_learnable", "orf")


def _split(total_sizes, rank):
    lo = sum(total_sizes[:rank])
    return slice(lo, lo + total_sizes[rank])


def _full_inputs(case: int, T: int, masked: bool, with_state: bool, F: int, hk: int = H):
    """The same whole-sequence inputs on every rank (seeded by the case); k, v with ``hk`` heads."""
    g = torch.Generator().manual_seed(1000 + case)
    q = torch.randn(B, T, H, D, generator=g, dtype=F64)
    k = torch.randn(B, T, hk, D, generator=g, dtype=F64)
    v = torch.randn(B, T, hk, DV, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.7) if masked else None
    state = None
    if with_state:
        state = RFState(
            torch.rand(B, hk, F, DV, generator=g, dtype=F64),
            torch.rand(B, hk, F, generator=g, dtype=F64) + 0.5,
            torch.randn(B, hk, generator=g, dtype=F64),
        )
    go = torch.randn(B, T, H, DV, generator=g, dtype=F64)
    gS = torch.randn(B, hk, F, DV, generator=g, dtype=F64)
    return q, k, v, mask, state, go, gS


def _leaf(t):
    return None if t is None else t.clone().requires_grad_(True)


def _grad(t):
    """The gradient of a leaf; zeros where nothing reached it (a rank holding an empty slice)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def _run_case(case, component, causal, masked, group, sizes, rank, hk=H):
    """One context-parallel case on ``group`` against one process (``hk`` key/value heads: grouped-query
    attention when below H); returns nothing, raises on mismatch."""
    world = len(sizes)
    kernel = "gaussian" if case % 3 == 0 else "softmax"
    fm = RandomFeatureMap(
        D, M, component=component, weights=_WEIGHTS[case % 3], kernel=kernel, num_heads=hk, seed=case, dtype=F64
    )
    data_dependent = fm.spec.data_dependent
    fm.train(data_dependent)  # training mode: running statistics updated (and compared)
    single = copy.deepcopy(fm)
    with_state = case % 2 == 1
    q, k, v, mask, state, go, gS = _full_inputs(case, sum(sizes), masked, with_state, fm.feature_dim, hk)
    sl = _split(sizes, rank)
    tag = f"case {case} {component} causal={causal} mask={masked} state={with_state} H_kv={hk} w={world} rank={rank}"
    for step in range(2 if data_dependent else 1):  # step 1 uses the running statistics step 0 gathered
        for mod in (fm, single):
            mod.zero_grad(set_to_none=True)
        # one process, whole sequence
        qs, ks, vs = _leaf(q), _leaf(k), _leaf(v)
        st = None if state is None else RFState(_leaf(state.S), _leaf(state.z), state.log_scale)
        o_ref, fin_ref = rf_attention(
            qs,
            ks,
            vs,
            single,
            causal=causal,
            key_padding_mask=mask,
            initial_state=st,
            output_final_state=True,
            backend="reference",
        )
        ((o_ref * go).sum() + (fin_ref.S * gS).sum()).backward()
        # this rank's slice
        ql, kl, vl = _leaf(q[:, sl]), _leaf(k[:, sl]), _leaf(v[:, sl])
        stl = None if state is None else RFState(_leaf(state.S), _leaf(state.z), state.log_scale)
        o, fin = context_parallel_rf_attention(
            ql,
            kl,
            vl,
            fm,
            group=group,
            causal=causal,
            key_padding_mask=None if mask is None else mask[:, sl],
            initial_state=stl,
            output_final_state=True,
            backend="reference",
        )
        loss = (o * go[:, sl]).sum()
        if rank == world - 1:  # the final state enters the total loss once
            loss = loss + (fin.S * gS).sum()
        loss.backward()
        where = f"{tag} step={step}"
        assert_close(o, o_ref[:, sl], F64, name=f"o ({where})")
        for name, a, e in zip(("S", "z", "log_scale"), fin, fin_ref):
            assert_close(
                a.masked_fill(torch.isneginf(a), 0),
                e.masked_fill(torch.isneginf(e), 0),
                F64,
                name=f"final {name} ({where})",
            )
        for name, a, e in (("dq", ql, qs), ("dk", kl, ks), ("dv", vl, vs)):
            assert_close(_grad(a), e.grad[:, sl], F64, name=f"{name} ({where})")
        if state is not None and rank == 0:
            assert_close(stl.S.grad, st.S.grad, F64, name=f"d initial S ({where})")
            assert_close(stl.z.grad, st.z.grad, F64, name=f"d initial z ({where})")
        for (pname, p), p_ref in zip(fm.named_parameters(), single.parameters()):
            total = _grad(p).clone()
            dist.all_reduce(total, group=group)
            assert_close(total, p_ref.grad, F64, name=f"sum over ranks of d{pname} ({where})")
        for name, buf in fm.named_buffers():
            assert_close(buf.double(), single.get_buffer(name).double(), F64, name=f"buffer {name} ({where})")


def _check_context_parallel(group, rank, world):
    sizes_list = {2: [[7, 6]], 4: [[4, 5, 0, 4], [3, 4, 4, 2]]}[world]
    case = 0
    for component in sf.COMPONENTS:
        for causal in (True, False):
            for masked in (False, True):
                sizes = sizes_list[case % len(sizes_list)]
                _run_case(case, component, causal, masked, group, sizes, rank)
                case += 1
    for component in ("posrf", "oprf", "saderf"):  # grouped-query (here multi-query) attention
        for causal in (True, False):
            _run_case(case, component, causal, True, group, sizes_list[case % len(sizes_list)], rank, hk=1)
            case += 1


def _absolute_S(state):
    """S on the absolute scale (the stabiliser may differ between equal states)."""
    m = state.log_scale
    return state.S * torch.exp(m.masked_fill(torch.isneginf(m), 0))[..., None, None]


def _check_window(group, rank, world):
    """Hybrid attention across ranks, causal and not: outputs, final WindowState and gradients equal one
    process, with slices shorter than W - 1 (the initial tail of a rank then reaches back over several
    slices; non-causal, the keys after a slice then reach over several too)."""
    sizes = {2: [7, 6], 4: [4, 1, 0, 6]}[world]
    T = sum(sizes)
    sl = _split(sizes, rank)
    cases = [("posrf", 6, H, True), ("trigrf", 3, 1, False), ("hyprf", 1, H, True), ("saderf", 20, H, False)]
    for case, ((component, window, hk, with_state), causal) in enumerate(
        [(c, causal) for causal in (True, False) for c in cases]
    ):
        fm = RandomFeatureMap(D, M, component=component, weights="learnable", num_heads=hk, seed=case, dtype=F64)
        fm.eval()
        q, k, v, mask, _, go, gS = _full_inputs(50 + case, T + 3, True, False, fm.feature_dim, hk)
        state = None
        if with_state:  # the state after a 3-token prefix (a constant here)
            with torch.no_grad():
                _, state = rf_attention(
                    q[:, :3], k[:, :3], v[:, :3], fm, causal=True, window=window, output_final_state=True
                )
        q, k, v, mask, go = q[:, 3:], k[:, 3:], v[:, 3:], mask[:, 3:], go[:, 3:]
        tag = f"window case {case} {component} causal={causal} W={window} H_kv={hk} w={world} rank={rank}"
        fm.zero_grad(set_to_none=True)
        qs, ks, vs = _leaf(q), _leaf(k), _leaf(v)
        o_ref, fin_ref = rf_attention(
            qs,
            ks,
            vs,
            fm,
            causal=causal,
            key_padding_mask=mask,
            initial_state=state,
            output_final_state=True,
            window=window,
        )
        ((o_ref * go).sum() + (_absolute_S(fin_ref) * gS).sum()).backward()
        ref_grads = [p.grad.clone() for p in fm.parameters()]
        fm.zero_grad(set_to_none=True)
        ql, kl, vl = _leaf(q[:, sl]), _leaf(k[:, sl]), _leaf(v[:, sl])
        o, fin = context_parallel_rf_attention(
            ql,
            kl,
            vl,
            fm,
            group=group,
            causal=causal,
            key_padding_mask=mask[:, sl],
            initial_state=state,
            output_final_state=True,
            window=window,
        )
        loss = (o * go[:, sl]).sum()
        if rank == world - 1:
            loss = loss + (_absolute_S(fin) * gS).sum()
        loss.backward()
        assert_close(o, o_ref[:, sl], F64, name=f"o ({tag})")
        assert_close(_absolute_S(fin), _absolute_S(fin_ref), F64, name=f"S ({tag})")
        assert torch.equal(fin.tail_keep, fin_ref.tail_keep), tag
        assert_close(fin.k_tail, fin_ref.k_tail, F64, name=f"k_tail ({tag})")
        for name, a, e in (("dq", ql, qs), ("dk", kl, ks), ("dv", vl, vs)):
            assert_close(_grad(a), e.grad[:, sl], F64, name=f"{name} ({tag})")
        for (pname, p), p_ref in zip(fm.named_parameters(), ref_grads):
            total = _grad(p).clone()
            dist.all_reduce(total, group=group)
            assert_close(total, p_ref, F64, name=f"sum over ranks of d{pname} ({tag})")


def _check_sinks(group, rank, world):
    """Attention sinks across ranks (DESIGN.md section 8), causal and not, with and without a window (None:
    sinks only) and an initial state part-way through the sinks: outputs, the final WindowState with its sink
    slots (the same on every rank), and the gradients of q, k, v, the initial state and the parameters (the
    learned exact-part factor included) equal one process. The slices are shorter than S (the sinks span
    several), one is empty, and one case has S beyond the whole sequence."""
    sizes = {2: [2, 9], 4: [1, 0, 2, 7]}[world]
    T = sum(sizes)
    sl = _split(sizes, rank)
    cases = [
        ("posrf", None, 4, H, 0, 0.5),
        ("trigrf", 3, 4, 1, 2, None),
        ("hyprf", 2, 3, H, 1, 0.7),
        ("posrf", 1, 2, H, 0, None),
        ("saderf", None, 20, H, 3, 1.3),
    ]
    for case, ((component, window, sinks, hk, prefix, mix), causal) in enumerate(
        [(c, causal) for causal in (True, False) for c in cases]
    ):
        fm = RandomFeatureMap(
            D, M, component=component, weights="learnable", num_heads=hk, seed=case, dtype=F64, mix=mix
        )
        fm.eval()
        q, k, v, mask, _, go, gS = _full_inputs(80 + case, T + prefix, True, False, fm.feature_dim, hk)
        gk = torch.randn(B, hk, sinks, D, generator=torch.Generator().manual_seed(case), dtype=F64)
        state = None
        if prefix:  # the state after a prefix of `prefix` tokens, part of the sinks (its tensors get gradients)
            with torch.no_grad():
                _, state = rf_attention(
                    q[:, :prefix],
                    k[:, :prefix],
                    v[:, :prefix],
                    fm,
                    causal=True,
                    window=window,
                    sinks=sinks,
                    key_padding_mask=mask[:, :prefix],
                    output_final_state=True,
                )
        q, k, v, mask, go = (t[:, prefix:] for t in (q, k, v, mask, go))
        tag = f"sinks case {case} {component} causal={causal} W={window} S={sinks} H_kv={hk} w={world} rank={rank}"

        def leaf_state():
            return None if state is None else type(state)(*(t if t.dtype == torch.bool else _leaf(t) for t in state))

        fm.zero_grad(set_to_none=True)
        qs, ks, vs, st = _leaf(q), _leaf(k), _leaf(v), leaf_state()
        o_ref, fin_ref = rf_attention(
            qs,
            ks,
            vs,
            fm,
            causal=causal,
            key_padding_mask=mask,
            initial_state=st,
            output_final_state=True,
            window=window,
            sinks=sinks,
        )
        ((o_ref * go).sum() + (_absolute_S(fin_ref) * gS).sum() + (fin_ref.k_sink * gk).sum()).backward()
        ref_grads = [p.grad.clone() for p in fm.parameters()]
        fm.zero_grad(set_to_none=True)
        ql, kl, vl, stl = _leaf(q[:, sl]), _leaf(k[:, sl]), _leaf(v[:, sl]), leaf_state()
        o, fin = context_parallel_rf_attention(
            ql,
            kl,
            vl,
            fm,
            group=group,
            causal=causal,
            key_padding_mask=mask[:, sl],
            initial_state=stl,
            output_final_state=True,
            window=window,
            sinks=sinks,
        )
        loss = (o * go[:, sl]).sum()
        if rank == world - 1:
            loss = loss + (_absolute_S(fin) * gS).sum() + (fin.k_sink * gk).sum()
        loss.backward()
        assert_close(o, o_ref[:, sl], F64, name=f"o ({tag})")
        assert_close(_absolute_S(fin), _absolute_S(fin_ref), F64, name=f"S ({tag})")
        for name in ("tail_keep", "sink_keep", "sink_seen"):
            assert torch.equal(getattr(fin, name), getattr(fin_ref, name)), f"{name} ({tag})"
        for name in ("k_tail", "v_tail", "k_sink", "v_sink"):
            assert_close(getattr(fin, name), getattr(fin_ref, name), F64, name=f"{name} ({tag})")
        for name, a, e in (("dq", ql, qs), ("dk", kl, ks), ("dv", vl, vs)):
            # the floor: a query whose every visible key is exact has a zero dq (rounding noise in both runs)
            floor = e.grad.pow(2).mean().sqrt().item()
            assert_close(_grad(a), e.grad[:, sl], F64, name=f"{name} ({tag})", min_scale=floor)
        if state is not None and rank == 0:
            for name in ("S", "z", "k_tail", "v_tail", "k_sink", "v_sink"):
                a, e = getattr(stl, name), getattr(st, name)
                floor = _grad(e).pow(2).mean().sqrt().item()
                assert_close(_grad(a), _grad(e), F64, name=f"d initial {name} ({tag})", min_scale=floor)
        for (pname, p), p_ref in zip(fm.named_parameters(), ref_grads):
            total = _grad(p).clone()
            dist.all_reduce(total, group=group)
            # floor: with S beyond the sequence every key is exact and the factor's gradient is 0 (noise)
            assert_close(total, p_ref, F64, name=f"sum over ranks of d{pname} ({tag})", min_scale=1e-3)


def _check_communication(group, rank, world):
    """Bytes per call depend on B, H, F, Dv (and S) and the world size, never on the length of the slices."""
    fm = RandomFeatureMap(D, M, component="posrf", num_heads=H, seed=0, dtype=F64)
    sent = []
    for T in (3, 40):
        q, k, v = (torch.randn(B, T, H, d, dtype=F64) for d in (D, D, DV))
        with torch.no_grad(), CommunicationLog() as log:
            context_parallel_rf_attention(q, k, v, fm, group=group, causal=True, backend="reference")
        sent.append(log.sent_bytes)
    expected = (world - 1) * B * H * (fm.feature_dim * DV + fm.feature_dim + 1) * 8
    assert sent == [expected, expected], f"bytes sent per rank {sent}, expected {expected} for both lengths"
    # sinks add one all-gather of the sink slots (S keys and values per key/value head) and 2 S flags per row
    added = []
    for T in (2, 40):
        q, k, v = (torch.randn(B, T, H, d, dtype=F64) for d in (D, D, DV))
        logs = []
        for sinks in (0, 3):
            with torch.no_grad(), CommunicationLog() as log:
                context_parallel_rf_attention(q, k, v, fm, group=group, window=2, sinks=sinks, backend="reference")
            logs.append(log.sent_bytes)
        added.append(logs[1] - logs[0])
    expected = (world - 1) * (B * H * 3 * (D + DV) + B * 2 * 3) * 8
    assert added == [expected, expected], f"bytes sinks add per rank {added}, expected {expected} for both lengths"


def _check_redraw(rank, world):
    for weights in ("orf", "learnable"):
        fm = RandomFeatureMap(D, M, weights=weights, num_heads=H, seed=100 + rank)  # a different W per rank
        fm.redraw()
        W = fm.projection().detach().contiguous()
        every = [torch.empty_like(W) for _ in range(world)]
        dist.all_gather(every, W)
        for r, Wr in enumerate(every):
            assert torch.equal(Wr, W), f"{weights}: W of rank {r} differs from rank {rank}'s after redraw()"
        fresh = RandomFeatureMap(D, M, weights=weights, num_heads=H, seed=fm.weights.seed)
        assert torch.equal(fresh.projection().detach(), W), f"{weights}: redraw() W is not the W of its seed"


def _check_sync_stats(rank, world):
    """Data parallel: rank r holds r + 1 sequences; the synced running statistics are those of the
    concatenated batch in one process."""
    sizes = [r + 1 for r in range(world)]
    sl = _split(sizes, rank)
    for component, heads, causal in (("oprf", H, False), ("saderf", 1, True), ("saderf", H, False)):
        fm = convert_sync_stats(RandomFeatureMap(D, M, component=component, num_heads=heads, seed=0, dtype=F64))
        single = RandomFeatureMap(D, M, component=component, num_heads=heads, seed=0, dtype=F64)
        for step in range(2):
            g = torch.Generator().manual_seed(50 + step)
            q, k = (torch.randn(sum(sizes), 9, H, D, generator=g, dtype=F64) * 2 + 0.3 for _ in range(2))
            v = torch.randn(sum(sizes), 9, H, DV, generator=g, dtype=F64)
            mask = torch.rand(sum(sizes), 9, generator=g) < 0.8
            rf_attention(q, k, v, single, causal=causal, key_padding_mask=mask)
            rf_attention(q[sl], k[sl], v[sl], fm, causal=causal, key_padding_mask=mask[sl])
            for name, buf in fm.named_buffers():
                assert_close(
                    buf.double(),
                    single.get_buffer(name).double(),
                    torch.float32,
                    name=f"{component} heads={heads} step {step}: synced {name} on rank {rank}",
                )


def _worker(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    pair = pairs[rank // 2]
    for group, grank, gworld in ((None, rank, world), (pair, rank % 2, 2)):
        _check_context_parallel(group, grank, gworld)
        _check_window(group, grank, gworld)
        _check_sinks(group, grank, gworld)
        _check_communication(group, grank, gworld)
    _check_redraw(rank, world)
    _check_sync_stats(rank, world)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_distributed_world_4_and_2():
    run_local(_worker, WORLD, timeout=TIMEOUT_S)


# -- in this process: errors and the single-process fallbacks ---------------------------------------


def test_context_parallel_needs_a_process_group():
    fm = RandomFeatureMap(D, M, seed=0)
    q = torch.randn(1, 4, 1, D)
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        context_parallel_rf_attention(q, q, q, fm)
    with pytest.raises(TypeError, match="RandomFeatureMap"):
        context_parallel_rf_attention(q, q, q, object())


def test_convert_sync_stats():
    layer = sf.SpectraAttention(16, 2, num_features=8, component="oprf", seed=0)
    plain = RandomFeatureMap(D, M, component="posrf", seed=0)
    assert convert_sync_stats(layer) is layer
    assert isinstance(layer.feature_map.stats_sync, RunningStatsAllReduce)
    assert convert_sync_stats(plain).stats_sync is None  # nothing to synchronise
    copy.deepcopy(layer)  # the hook survives a deep copy
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync_stats("not a module")
    # No process group: the local statistics, as without the hook.
    ref = RandomFeatureMap(D, M, component="oprf", seed=0)
    synced = convert_sync_stats(RandomFeatureMap(D, M, component="oprf", seed=0))
    q, k, v = (torch.randn(2, 5, 1, D) for _ in range(3))
    for fm in (ref, synced):
        fm.train()
        rf_attention(q, k, v, fm, backend="reference")
    for name, buf in ref.named_buffers():
        assert torch.equal(buf, synced.get_buffer(name)), name


def _fail_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.barrier()
    return rank


def test_run_local_reports_the_failure():
    with pytest.raises(RuntimeError, match="(?s)rank 1 .*ValueError: rank 1 gives up"):
        run_local(_fail_on_rank_1, 2, timeout=60)
