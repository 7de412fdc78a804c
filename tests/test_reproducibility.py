"""What README.md says of reproducibility on CPU: the same call gives bitwise the same loss and
gradients when repeated and under deterministic algorithms; at another thread count the row
kernels' too, the linear walks' gradients to rounding (their matmuls are the BLAS's).

The oracle is the first call itself: any difference in any bit fails, where bits are claimed.
"""

from __future__ import annotations

import pytest
import torch

import fastxent
from versions import compiled_backend

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


NAMES = [
    pytest.param(name, marks=compiled_backend if "-compiled-" in name else ())
    for name in sorted(CALLS)
]


def _same_bits(first: tuple[torch.Tensor, ...], again: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_repeated_and_under_deterministic_algorithms(name):
    make, option, dtype = CALLS[name]
    call = make(option, dtype)
    first = call()
    assert _same_bits(first, call()), "a repeated call differs"
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert _same_bits(first, call()), "deterministic algorithms differ"
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("name", NAMES)
def test_at_other_thread_counts(name):
    """The row kernels give the same bits at any thread count (each row is one thread's). The
    linear walks' gradients come from the BLAS's matmuls, which on some CPUs split their sums
    by thread count (an Intel Xeon with AMX: the last bits of ∂h and ∂W, float32 and bf16;
    not on the AMD EPYC machines): there they agree to rounding, the loss bitwise."""
    make, option, dtype = CALLS[name]
    call = make(option, dtype)
    threads = torch.get_num_threads()
    first = call()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            again = call()
            if name.startswith("cross_entropy"):
                assert _same_bits(first, again), f"{count} thread(s) differ from {threads}"
            else:
                assert torch.equal(first[0], again[0]), f"loss at {count} thread(s)"
                torch.testing.assert_close(again, first, msg=f"{count} thread(s)")
    finally:
        torch.set_num_threads(threads)
