"""Context-parallel random-feature attention and consistent data-parallel training, on the CPU.

    torchrun --nproc_per_node 2 examples/context_parallel.py

1. Context parallel: one long sequence is split across the ranks; each rank keeps only its slice of
   q, k, v, and the ranks exchange the attention state (a few KB, whatever the length) instead of keys
   and values. Every rank checks its slice against one process running the whole sequence.
2. Data parallel: every rank trains a causal OPRF layer on its own batch under
   DistributedDataParallel; ``redraw()`` draws the same W on every rank and ``convert_sync_stats``
   keeps the running statistics those of the global batch, so the replicas stay identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from spectraformer_fused import RandomFeatureMap, SpectraAttention, rf_attention
from spectraformer_fused.distributed import CommunicationLog, context_parallel_rf_attention, convert_sync_stats


def context_parallel(rank: int, world: int) -> None:
    B, T, H, D = 1, 4096, 4, 32
    fm = RandomFeatureMap(D, 64, component="posrf", weights="orf", num_heads=H)
    fm.redraw()  # seed drawn on rank 0 and broadcast: the same W everywhere
    g = torch.Generator().manual_seed(0)  # the whole sequence, to check against one process
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    piece = slice(rank * T // world, (rank + 1) * T // world)
    ql, kl, vl = (t[:, piece].clone().requires_grad_() for t in (q, k, v))

    with CommunicationLog() as log:
        o = context_parallel_rf_attention(ql, kl, vl, fm, causal=True)
        o.square().sum().backward()  # the loss of the whole sequence is the sum over ranks

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o_one = rf_attention(qs, ks, vs, fm, causal=True)
    o_one.square().sum().backward()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    print(
        f"[rank {rank}] positions {piece.start}..{piece.stop - 1}: largest difference to one process, "
        f"relative to the largest value: output {rel(o, o_one[:, piece]):.1e}, "
        f"dq {rel(ql.grad, qs.grad[:, piece]):.1e}, dk {rel(kl.grad, ks.grad[:, piece]):.1e}, "
        f"dv {rel(vl.grad, vs.grad[:, piece]):.1e}; sent {log.sent_bytes:,} bytes (forward and backward) "
        f"while its {2 * B * (T // world) * H * D * 4:,} bytes of K and V stayed here"
    )


def data_parallel(rank: int, world: int) -> None:
    torch.manual_seed(rank)  # different data on every rank, and a different W at first
    layer = SpectraAttention(64, 4, num_features=32, component="oprf", weights="learnable", causal=True)
    layer.feature_map.redraw()  # ... until redraw(): one seed, broadcast from rank 0
    model = DistributedDataParallel(convert_sync_stats(layer))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(2 + rank, 128, 64)  # batches of different sizes
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = torch.cat([t.detach().flatten() for t in layer.state_dict().values() if t.is_floating_point()])
    every = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(every, state)
    same = all(torch.equal(s, state) for s in every)
    print(f"[rank {rank}] data parallel: parameters and running statistics identical on every rank: {same}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    try:
        context_parallel(rank, world)
        data_parallel(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
