"""Small logits on CPU: the portable kernel against the compiled one, forward+backward per call.

PyTorch's own ``F.cross_entropy`` is timed alongside, for the per-call cost fastxent adds.

Backs ``functional.AUTO_PORTABLE_MAX_LOGITS``, the size up to which ``backend="auto"`` takes the
portable kernel on CPU. Each shape times both backends, interleaved, after a warm-up (the
compiled kernel's compilation is not in the figures: it is a one-time cost on top).

    python benchmarks/small_logits.py --shapes 64x256,256x256,128x1024,256x1024,128x2048 --calls 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastxent
from fastxent import functional

BACKENDS = ("torch", "compiled")
EAGER = "F.cross_entropy"  # PyTorch itself, timed alongside for reference
DEFAULT_SHAPES = "64x256,256x256,64x1024,128x1024,512x256,256x1024,128x2048,512x1024,512x2048"


def per_call_ms(n: int, v: int, calls: int, rounds: int) -> dict[str, float]:
    """Median milliseconds of one forward+backward per backend on (n, v) float32 logits."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=gen).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)

    def step(backend: str) -> None:
        z.grad = None
        if backend == EAGER:
            F.cross_entropy(z, y).backward()
        else:
            fastxent.cross_entropy(z, y, backend=backend).backward()

    per_call: dict[str, list[float]] = {b: [] for b in (*BACKENDS, EAGER)}
    for backend in per_call:
        step(backend)  # the compiled kernel compiles on the first shape
    for _ in range(rounds):
        for backend in per_call:
            start = time.perf_counter()
            for _ in range(calls):
                step(backend)
            per_call[backend].append((time.perf_counter() - start) / calls)
    return {b: statistics.median(t) * 1e3 for b, t in per_call.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxV, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per backend")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()

    limit = functional.AUTO_PORTABLE_MAX_LOGITS
    print(f"float32, {args.rounds} rounds of {args.calls} calls; auto: torch up to {limit} logits")
    for shape in args.shapes.split(","):
        n, v = (int(x) for x in shape.split("x"))
        ms = per_call_ms(n, v, args.calls, args.rounds)
        auto = functional.resolve_backend("auto", torch.device("cpu"), n * v)[0]
        print(
            f"  N={n:5d} V={v:6d} ({n * v:>8d} logits)  torch {ms['torch']:6.3f} ms  "
            f"compiled {ms['compiled']:6.3f} ms  compiled × torch "
            f"{ms['compiled'] / ms['torch']:.2f}  auto: {auto} (× eager "
            f"{ms[auto] / ms[EAGER]:.2f}; eager {ms[EAGER]:6.3f} ms)"
        )


if __name__ == "__main__":
    main()
