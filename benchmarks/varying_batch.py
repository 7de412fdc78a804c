"""A batch size that changes every step: time per row and the memory the process keeps.

    python benchmarks/varying_batch.py                       # V=32768, N in 1000..9000
    python benchmarks/varying_batch.py --outlier 16384       # one large step among small ones

The first part alternates phases of a fixed N with phases of a random N (uniform in
``--n-min``..``--n-max``), fastxent forward + backward on the compiled kernel, and prints the
median time per row of each phase and the process's resident memory after it. Fresh N×V
gradients cost a page fault per 4 KiB page; fastxent keeps recent large gradient storages for
reuse (``fastxent._autograd.reusable_empty``), which a changing N must still hit.

``--outlier N`` instead makes one step of N rows between steps of ``--n-min`` rows, for fastxent
and for ``F.cross_entropy``, and prints how much more memory the process holds afterwards than
before the large step.

``--linear-padding STEPS`` runs ``linear_cross_entropy`` (float32, ``shift=True``) on a fixed
``--batch`` × ``--seq`` batch of hidden size ``--d`` over ``--v`` classes whose targets end in
padding (ignore_index) of a random length each step, as padded training does: the walk drops
ignored tokens before its products, so its chunks change height every step. It prints the
resident memory every ``STEPS // 8`` steps, and after glibc's ``malloc_trim``.

    python benchmarks/varying_batch.py --linear-padding 800 --v 8192   # D = 128, (4, 256)
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import time

import torch
import torch.nn.functional as F

import fastxent


def resident_mib() -> int:
    """The process's resident set size (Linux /proc), in MiB."""
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmRSS:"))
    return int(line.split()[1]) >> 10


def step(logits: torch.Tensor, target: torch.Tensor, loss_fn) -> float:
    """Forward + backward on a fresh leaf copy of ``logits``; seconds."""
    x = logits.clone().requires_grad_()
    start = time.perf_counter()
    loss_fn(x, target).backward()
    return time.perf_counter() - start


def phases(args, loss_fn) -> None:
    pool = torch.randn(args.n_max, args.v)
    targets = torch.randint(0, args.v, (args.n_max,))
    rng = random.Random(0)

    def median_us_per_row(sizes: list[int]) -> float:
        times = [step(pool[:n], targets[:n], loss_fn) / n * 1e6 for n in sizes]
        return statistics.median(times[3:])  # the first steps may still fault in kept storages

    median_us_per_row([args.n_min] * 4)  # compiles the kernel
    fixed = (args.n_min + args.n_max) // 2
    for _ in range(args.rounds):
        us_fixed = median_us_per_row([fixed] * args.steps)
        print(f"fixed N={fixed}: {us_fixed:6.1f} us/row, resident {resident_mib()} MiB")
        sizes = [rng.randint(args.n_min, args.n_max) for _ in range(args.steps)]
        us = median_us_per_row(sizes)
        print(f"random N:     {us:6.1f} us/row, resident {resident_mib()} MiB, "
              f"{us / us_fixed:.2f}× the fixed N's time per row")  # fmt: skip
    fastxent.empty_cache()
    print(f"after fastxent.empty_cache(): resident {resident_mib()} MiB")


def outlier(args) -> None:
    small = torch.randn(args.n_min, args.v)
    small_target = torch.randint(0, args.v, (args.n_min,))
    big = torch.randn(args.outlier, args.v)
    big_target = torch.randint(0, args.v, (args.outlier,))
    for name, loss_fn in (("F.cross_entropy", F.cross_entropy), ("fastxent", _fastxent)):
        step(small, small_target, loss_fn)
        before = resident_mib()
        step(big, big_target, loss_fn)
        for _ in range(args.steps):
            step(small, small_target, loss_fn)
        held = resident_mib() - before
        print(f"{name}: {held:+d} MiB held after {args.steps} steps of N={args.n_min} that "
              f"followed one of N={args.outlier}")  # fmt: skip


def linear_padding(args) -> None:
    rng = random.Random(0)
    weight = (torch.randn(args.v, args.d) * 0.05).requires_grad_()
    every = max(1, args.linear_padding // 8)
    for i in range(1, args.linear_padding + 1):
        hidden = torch.randn(args.batch, args.seq, args.d, requires_grad=True)
        target = torch.randint(0, args.v, (args.batch, args.seq))
        for row in target:
            row[rng.randint(args.seq // 4, args.seq) :] = -100  # right padding
        fastxent.linear_cross_entropy(hidden, weight, target, shift=True).backward()
        weight.grad = None
        if i % every == 0 or i == 1:
            print(f"step {i:5d}: resident {resident_mib()} MiB")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of it the C allocator could return
    print(f"after malloc_trim: resident {resident_mib()} MiB")


def _fastxent(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return fastxent.cross_entropy(x, target, backend="compiled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--n-min", type=int, default=1000)
    parser.add_argument("--n-max", type=int, default=9000)
    parser.add_argument("--steps", type=int, default=25, help="steps per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--outlier", type=int, default=None, help="rows of the one large step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--linear-padding", type=int, default=None, metavar="STEPS")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d", type=int, default=128)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.linear_padding:
        linear_padding(args)
    elif args.outlier:
        outlier(args)
    else:
        phases(args, _fastxent)


if __name__ == "__main__":
    main()
