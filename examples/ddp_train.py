"""Data-parallel training with fastxent's loss: nothing distributed-specific is needed.

Run on CPU with gloo (NCCL when CUDA is available):

    torchrun --nproc-per-node 2 examples/ddp_train.py

Each rank trains a replica of a tiny next-token model on its own batches; DistributedDataParallel
averages the parameter gradients. fastxent's gradient is computed in forward and handed to
autograd in backward like any other, so DDP's gradient hooks see it unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _leave import destroy_group_and_exit, init_group_from_torchrun  # examples/_leave.py
from torch.nn.parallel import DistributedDataParallel as DDP

import fastxent

V, D, T, B, STEPS = 257, 64, 32, 8, 20  # vocabulary, width, context, batch per rank, steps


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_group_from_torchrun(backend)
    rank = dist.get_rank()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else None
    )

    torch.manual_seed(0)  # the same initial replica on every rank
    model = torch.nn.Sequential(
        torch.nn.Embedding(V, D), torch.nn.Linear(D, D), torch.nn.GELU(), torch.nn.Linear(D, V)
    ).to(device)
    model = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = fastxent.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)

    g = torch.Generator().manual_seed(1 + rank)  # each rank its own data: a noisy counting task
    for step in range(STEPS):
        x = torch.randint(0, V, (B, T), generator=g)
        y = (x + 1) % V  # next token = current + 1
        y[torch.rand(B, T, generator=g) < 0.1] = -100  # padded positions
        logits = model(x.to(device))  # (B, T, V)
        loss = loss_fn(logits.flatten(0, 1), y.flatten().to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 4:
            print(f"step {step + 1}: loss on rank 0 = {loss.item():.4f}", flush=True)

    # DDP kept the replicas identical: compare a checksum of the parameters across ranks.
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    checks = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(checks, total)
    if rank == 0:
        print(f"parameter checksums per rank: {[f'{c.item():.10f}' for c in checks]}")
    destroy_group_and_exit()


if __name__ == "__main__":
    main()
