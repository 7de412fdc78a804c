"""Fused projection + loss over a vocabulary split across ranks, checked against one process.

Run on CPU with gloo (2 or more ranks; the vocabulary need not divide evenly):

    torchrun --nproc-per-node 2 examples/vocab_parallel_linear.py

Every rank holds the same hidden states ``h`` (N, D) and targets, and its rows ``W_r`` (V_r, D)
and ``b_r`` of the output projection (Megatron's vocab-parallel embedding, slices in rank order).
``fastxent.linear_cross_entropy(h, W_r, y, b_r, process_group=group)`` never forms the (N, V_r)
logits; every rank gets the loss of the full model, the full ∂h (summed over the ranks inside the
call, no all-reduce left to the caller) and its slices of ∂W and ∂b.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _leave import destroy_group_and_exit, init_group_from_torchrun  # examples/_leave.py

import fastxent

N, D, V = 64, 32, 1001  # tokens, hidden size, vocabulary (uneven over 2 or 3 ranks)
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4, "chunk_size": 24}


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_group_from_torchrun(backend)
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else None
    )

    # The same full model and batch on every rank (same seed); each rank keeps its vocab slice.
    g = torch.Generator().manual_seed(0)
    h_full = torch.randn(N, D, generator=g)
    w_full = torch.randn(V, D, generator=g) / D**0.5
    b_full = torch.randn(V, generator=g) * 0.1
    y = torch.randint(0, V, (N,), generator=g)
    y[:4] = -100  # a few padded positions
    h_full, w_full, b_full, y = (t.to(device) for t in (h_full, w_full, b_full, y))
    rows = torch.arange(V).tensor_split(world)[rank]  # this rank's classes
    vocab_start, vocab_end = int(rows[0]), int(rows[-1]) + 1
    w_local = w_full[vocab_start:vocab_end].clone().requires_grad_()  # (V_r, D)
    b_local = b_full[vocab_start:vocab_end].clone().requires_grad_()  # (V_r,)

    h = h_full.clone().requires_grad_()
    loss = fastxent.linear_cross_entropy(h, w_local, y, b_local, process_group=group, **OPTIONS)
    loss.backward()  # h.grad is already the sum over the ranks

    # The single-process fused loss on the full weight, for comparison.
    h_ref, w_ref, b_ref = (t.clone().requires_grad_() for t in (h_full, w_full, b_full))
    loss_ref = fastxent.linear_cross_entropy(h_ref, w_ref, y, b_ref, **OPTIONS)
    loss_ref.backward()

    err_h = (h.grad - h_ref.grad).abs().max().item()
    err_w = (w_local.grad - w_ref.grad[vocab_start:vocab_end]).abs().max().item()
    err_b = (b_local.grad - b_ref.grad[vocab_start:vocab_end]).abs().max().item()
    print(
        f"rank {rank}/{world}: classes [{vocab_start}, {vocab_end}) of {V}; vocab-parallel loss "
        f"{loss.item():.6f}, single-process loss {loss_ref.item():.6f}; max |grad error| "
        f"h {err_h:.2e}, W_r {err_w:.2e}, b_r {err_b:.2e}",
        flush=True,
    )
    ok = (
        abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
        and max(err_h, err_w, err_b) < 1e-5
    )
    if not ok:
        print(f"rank {rank}: vocab-parallel result differs from the single-process one")
    destroy_group_and_exit(0 if ok else 1)


if __name__ == "__main__":
    main()
