"""The compiled CPU kernel with softcap: its tanh through expm1 (shipped) or torch.tanh.

One choice per process (dynamo traces the kernel once), so alternate processes to compare:

    for t in expm1 tanh expm1 tanh; do python benchmarks/softcap_tanh.py --tanh $t; done

Times cross_entropy forward + backward (backend="compiled", softcap=30) and prints the median,
the plain (no softcap) kernel's median in the same process, and the loss and gradient errors
against float64 PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastxent
from fastxent._compiled import kernel

CAP = 30.0


def median_ms(step, rounds: int) -> float:
    step()  # compiles
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tanh", choices=["expm1", "tanh"], default="expm1")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--scale", type=float, default=3.0, help="standard deviation of z")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.tanh == "tanh":
        kernel._tanh = torch.tanh
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(args.n, args.v, generator=gen) * args.scale).requires_grad_()
    y = torch.randint(0, args.v, (args.n,), generator=gen)

    def step(**options):
        def run() -> None:
            z.grad = None
            fastxent.cross_entropy(z, y, backend="compiled", **options).backward()

        return run

    capped = median_ms(step(softcap=CAP), args.rounds)
    plain = median_ms(step(), args.rounds)
    step(softcap=CAP)()
    z64 = z.detach().double().requires_grad_()
    want = F.cross_entropy(CAP * torch.tanh(z64 / CAP), y)
    want.backward()
    got = fastxent.cross_entropy(z.detach(), y, backend="compiled", softcap=CAP)
    loss_err = abs(got.item() - want.item()) / abs(want.item())
    grad_err = ((z.grad.double() - z64.grad).abs().max() / z64.grad.abs().max()).item()
    print(
        f"N={args.n} V={args.v} float32, tanh via {args.tanh}: softcap {capped:.1f} ms, "
        f"plain {plain:.1f} ms (× {capped / plain:.2f}); errors loss {loss_err:.1e}, "
        f"grad {grad_err:.1e}"
    )


if __name__ == "__main__":
    main()
