"""Vocab-parallel cross-entropy on a sharded output projection, checked against one process.

Run on CPU with gloo (2 or more ranks; the vocabulary need not divide evenly):

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Every rank holds the same hidden states ``h`` (N, D) and a slice ``W_r`` (V_r, D) of the output
projection, so its logits are ``h W_r^T`` (N, V_r). ``fastxent.vocab_parallel_cross_entropy`` gives
every rank the loss of the full (N, V) logits and its slice of their gradient. The gradient of
the replicated ``h`` is a partial sum on each rank: one SUM all-reduce completes it (Megatron's
copy-to-tensor-parallel-region does that in backward).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _leave import destroy_group_and_exit, init_group_from_torchrun  # examples/_leave.py

import fastxent

N, D, V = 64, 32, 1001  # rows, hidden size, vocabulary (uneven over 2 or 3 ranks)
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4}


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_group_from_torchrun(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else None
    )

    # The same full model and batch on every rank (same seed); each rank keeps its vocab slice.
    g = torch.Generator().manual_seed(0)
    h_full = torch.randn(N, D, generator=g)
    w_full = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[:4] = -100  # a few padded positions
    h_full, w_full, y = (t.to(device) for t in (h_full, w_full, y))
    w_local = w_full.tensor_split(world)[rank].clone().requires_grad_()  # (V_r, D)
    vocab_start = sum(len(s) for s in w_full.tensor_split(world)[:rank])

    h = h_full.clone().requires_grad_()
    local_logits = h @ w_local.T  # (N, V_r)
    loss = fastxent.vocab_parallel_cross_entropy(local_logits, y, **OPTIONS)
    loss.backward()
    dist.all_reduce(h.grad)  # ∂ℓ/∂h = Σ_r ∂ℓ_r/∂h: each rank saw only its classes

    # The single-process loss on the full logits, for comparison.
    h_ref, w_ref = h_full.clone().requires_grad_(), w_full.clone().requires_grad_()
    loss_ref = fastxent.cross_entropy(h_ref @ w_ref.T, y, **OPTIONS)
    loss_ref.backward()
    grad_w_ref = w_ref.grad[vocab_start : vocab_start + len(w_local)]

    err_w = (w_local.grad - grad_w_ref).abs().max().item()
    err_h = (h.grad - h_ref.grad).abs().max().item()
    print(
        f"rank {rank}/{world}: classes [{vocab_start}, {vocab_start + len(w_local)}) of {V}; "
        f"vocab-parallel loss {loss.item():.6f}, single-process loss {loss_ref.item():.6f}; "
        f"max |grad W_r error| {err_w:.2e}, max |grad h error| {err_h:.2e}",
        flush=True,
    )
    ok = (
        abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
        and max(err_w, err_h) < 1e-5
    )
    if not ok:
        print(f"rank {rank}: vocab-parallel result differs from the single-process one")
    destroy_group_and_exit(0 if ok else 1)


if __name__ == "__main__":
    main()
