"""Probe the compiled CPU backend: first-call compile time, then forward+backward time against
PyTorch eager and the portable backend, interleaved in one run (ratios are what to read).

    python benchmarks/compiled_probe.py --n 4096 --v 32768 --dtype float32 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastxent


def fwd_bwd(provider: str, z: torch.Tensor, y: torch.Tensor) -> None:
    x = z.detach().requires_grad_()
    if provider == "eager":
        loss = F.cross_entropy(x.float() if x.dtype != torch.float32 else x, y)
    else:
        loss = fastxent.cross_entropy(x, y, backend=provider)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--providers", default="eager,torch,compiled")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    z = torch.randn(args.n, args.v).to(dtype)
    y = torch.randint(0, args.v, (args.n,))
    providers = args.providers.split(",")

    start = time.perf_counter()
    fwd_bwd("compiled", z[:8], y[:8])
    print(f"compiled: first call (compile) {time.perf_counter() - start:.1f} s")
    for p in providers:  # warm up
        fwd_bwd(p, z, y)

    times: dict[str, list[float]] = {p: [] for p in providers}
    for _ in range(args.repeat):
        for p in providers:
            start = time.perf_counter()
            fwd_bwd(p, z, y)
            times[p].append(time.perf_counter() - start)

    nbytes = z.numel() * z.element_size()
    floor = 3 * nbytes / 30e9  # read logits twice + write grad once at ~30 GB/s
    print(f"N={args.n} V={args.v} {args.dtype}, threads={torch.get_num_threads()}")
    print(f"  bandwidth floor (3 x {nbytes / 1e6:.0f} MB at 30 GB/s): {floor * 1e3:.1f} ms")
    base = statistics.median(times[providers[0]])
    for p in providers:
        med = statistics.median(times[p])
        print(f"  {p:9s} median {med * 1e3:8.1f} ms  ({base / med:5.2f}x vs {providers[0]})")


if __name__ == "__main__":
    main()
