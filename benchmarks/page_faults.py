"""What fresh pages cost: fastxent (compiled) and eager PyTorch fwd+bwd, interleaved, medians.

Run it twice to see the effect of transparent huge pages on every large CPU allocation:

    python benchmarks/page_faults.py --v 32768
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/page_faults.py --v 32768

It also times a clone (fresh memory) against a copy into an existing buffer of the logits' size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastxent


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", default="compiled")
    args = parser.parse_args()

    z = torch.randn(args.n, args.v).requires_grad_()
    y = torch.randint(0, args.v, (args.n,))
    existing = torch.empty_like(z)

    def fastxent_step() -> None:
        fastxent.cross_entropy(z, y, backend=args.backend).backward()
        z.grad = None

    def eager_step() -> None:
        F.cross_entropy(z, y).backward()
        z.grad = None

    steps = {
        f"fastxent ({args.backend})": fastxent_step,
        "eager F.cross_entropy": eager_step,
        "clone (fresh memory)": lambda: z.detach().clone(),
        "copy_ into an existing buffer": lambda: existing.copy_(z.detach()),
    }
    for step in steps.values():  # warm-up: compilation, first allocations
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    print(f"N={args.n} V={args.v} float32, THP_MEM_ALLOC_ENABLE={thp}, {args.rounds} rounds")
    for name, runs in times.items():
        rounded = [round(t) for t in runs]
        print(f"  {name:32s} median {statistics.median(runs):8.1f} ms   runs {rounded}")


if __name__ == "__main__":
    main()
