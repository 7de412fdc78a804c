"""What README.md says of reproducibility on CPU: the same call gives bitwise the same loss and
gradients when repeated, at another thread count, and under deterministic algorithms.

The oracle is the first call itself: any difference in any bit fails.
"""

from __future__ import annotations

import pytest
import torch

import fastxent

N, V, D = 96, 3000, 32


def _cross_entropy(backend: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=gen) * 3).to(dtype)
    target = torch.randint(0, V, (N,), generator=gen)
    target[::7] = -100

    def call() -> tuple[torch.Tensor, ...]:
        z = logits.clone().requires_grad_()
        loss = fastxent.cross_entropy(z, target, label_smoothing=0.1, backend=backend)
        loss.backward()
        return loss.detach(), z.grad

    return call


def _linear(walk: dict, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, D, generator=gen).to(dtype)
    weight = (torch.randn(V, D, generator=gen) * 0.2).to(dtype)
    target = torch.randint(0, V, (N,), generator=gen)

    def call() -> tuple[torch.Tensor, ...]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fastxent.linear_cross_entropy(h, w, target, z_loss=1e-4, **walk)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    return call


CALLS = {
    **{
        f"cross_entropy-{backend}-{dtype}": (_cross_entropy, backend, dtype)
        for backend in ("torch", "compiled")
        for dtype in (torch.float32, torch.bfloat16)
    },
    **{
        f"linear-{name}-{dtype}": (_linear, walk, dtype)
        for name, walk in (("chunks", {"chunk_size": 40}), ("vocab", {"vocab_block": 1024}))
        for dtype in (torch.float32, torch.bfloat16)
    },
}


def _same_bits(first: tuple[torch.Tensor, ...], again: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_repeated_at_other_thread_counts_and_deterministic(name):
    make, option, dtype = CALLS[name]
    call = make(option, dtype)
    threads = torch.get_num_threads()
    first = call()
    assert _same_bits(first, call()), "a repeated call differs"
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert _same_bits(first, call()), f"{count} thread(s) differ from {threads}"
    finally:
        torch.set_num_threads(threads)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert _same_bits(first, call()), "deterministic algorithms differ"
    finally:
        torch.use_deterministic_algorithms(deterministic)
