"""Small logits on CPU: the three ways fastxent computes them, forward+backward per call.

The portable row kernel (``backend="torch"``), the compiled one, and the loss built from
PyTorch's fused ops (what ``"auto"`` takes up to ``functional.AUTO_COMPOSED_MAX_LOGITS``; timed
here at every size by raising that limit). PyTorch's own ``F.cross_entropy`` is timed alongside,
for the per-call cost fastxent adds. Backs that limit and ``AUTO_PORTABLE_MAX_LOGITS``. Each
shape times every way, interleaved, after a warm-up (the compiled kernel's compilation is not in
the figures: it is a one-time cost on top).

    python benchmarks/small_logits.py --shapes 64x256,256x256,128x1024,256x1024,128x2048 --calls 200
    python benchmarks/small_logits.py --linear-dim 64 --shapes 64x512,256x1024 --calls 50

``--linear-dim D`` times ``linear_cross_entropy`` instead, on N tokens of D hidden features and
V classes (the row kernels in its token walk; eager is ``F.cross_entropy(F.linear(h, W), y)``).
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
FUSED = "fused ops"  # fastxent's small-call path, at every size
EAGER = "F.cross_entropy"  # PyTorch itself, timed alongside for reference
DEFAULT_SHAPES = "64x256,256x256,64x1024,128x1024,512x256,256x1024,128x2048,512x1024,512x2048"


def per_call_ms(
    n: int, v: int, calls: int, rounds: int, dim: int | None = None
) -> dict[str, float]:
    """Median milliseconds of one forward+backward each way on (n, v) float32 logits, or on the
    logits of (n, dim) hidden states and a (v, dim) weight with ``dim``."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, v, (n,), generator=gen)
    if dim is None:
        leaves = [torch.randn(n, v, generator=gen).requires_grad_()]
    else:
        leaves = [torch.randn(n, dim, generator=gen), torch.randn(v, dim, generator=gen) / dim**0.5]
        leaves = [x.requires_grad_() for x in leaves]

    def loss(way: str) -> torch.Tensor:
        backend = "auto" if way in (FUSED, EAGER) else way
        if dim is None:
            z = leaves[0]
            return (
                F.cross_entropy(z, y)
                if way == EAGER
                else fastxent.cross_entropy(z, y, backend=backend)
            )
        h, w = leaves
        if way == EAGER:
            return F.cross_entropy(F.linear(h, w), y)
        return fastxent.linear_cross_entropy(h, w, y, backend=backend)

    def step(way: str) -> None:
        for x in leaves:
            x.grad = None
        loss(way).backward()

    def timed(way: str) -> float:
        limit = functional.AUTO_COMPOSED_MAX_LOGITS
        functional.AUTO_COMPOSED_MAX_LOGITS = n * v if way == FUSED else limit
        try:
            start = time.perf_counter()
            for _ in range(calls):
                step(way)
            return (time.perf_counter() - start) / calls
        finally:
            functional.AUTO_COMPOSED_MAX_LOGITS = limit

    per_call: dict[str, list[float]] = {w: [] for w in (*BACKENDS, FUSED, EAGER)}
    for way in per_call:
        step(way)  # the compiled kernel compiles on the first shape
    for _ in range(rounds):
        for way in per_call:
            per_call[way].append(timed(way))
    return {w: statistics.median(t) * 1e3 for w, t in per_call.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxV, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per backend")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--linear-dim", type=int, help="time linear_cross_entropy, hidden size D")
    args = parser.parse_args()

    what = (
        "cross_entropy" if args.linear_dim is None else f"linear_cross_entropy D={args.linear_dim}"
    )
    print(
        f"{what}, float32, {args.rounds} rounds of {args.calls} calls, ms per call; auto: fused "
        f"ops up to {functional.AUTO_COMPOSED_MAX_LOGITS} logits, torch up to "
        f"{functional.AUTO_PORTABLE_MAX_LOGITS}, else compiled"
    )
    for shape in args.shapes.split(","):
        n, v = (int(x) for x in shape.split("x"))
        ms = per_call_ms(n, v, args.calls, args.rounds, args.linear_dim)
        auto = (
            FUSED
            if n * v <= functional.AUTO_COMPOSED_MAX_LOGITS
            else functional.resolve_backend("auto", torch.device("cpu"), n * v)[0]
        )
        print(
            f"  N={n:5d} V={v:6d} ({n * v:>8d} logits)  torch {ms['torch']:6.3f}  compiled "
            f"{ms['compiled']:6.3f}  fused ops {ms[FUSED]:6.3f}  eager {ms[EAGER]:6.3f}  "
            f"auto: {auto} ({ms[auto] / ms[EAGER]:.2f}× eager)"
        )


if __name__ == "__main__":
    main()
