"""The compiled kernel's float32 gradient: one graph, or two (store e, then scale in place)?

Runs the shipped row kernel (`cross_entropy_rows`, class-index targets, a preallocated gradient)
with ``Variant.split`` as shipped and forced off, interleaved in one process, and prints how
far apart the two gradients are (the largest difference over the largest entry). The shipped
choice (``Variant.of``) splits float32/64 index-target variants without softcap whose gradient
goes to its own buffer, from ``SPLIT_MIN_LOGITS`` logits on; here at every size.

    python benchmarks/split_gradient.py --v 8192,32768 --rounds 15
    python benchmarks/split_gradient.py --options   # smoothing, z-loss, logit scale, weights
    python benchmarks/split_gradient.py --n 512 --v 256,512,1024,2048 --rounds 41   # small
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from fastxent._compiled import kernel
from fastxent._options import CrossEntropyOptions

EVERY_OPTION = dict(label_smoothing=0.1, z_loss=1e-3, logit_scale=1.3)


def compare(n: int, v: int, rounds: int, options: bool, gen: torch.Generator) -> None:
    """Time the kernel with the split as shipped and forced off; print both and their ratio."""
    z = torch.randn(n, v, generator=gen) * 2  # (N, V)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::7] = -100  # some ignored rows
    weight = torch.rand(v, generator=gen) + 0.5 if options else None
    opts = CrossEntropyOptions(num_classes=v, soft=False, **(EVERY_OPTION if options else {}))
    a, b = torch.tensor(1.0 / n), torch.tensor(0.5)
    grad = torch.empty_like(z)
    shipped_of = kernel.Variant.of

    threshold = kernel.SPLIT_MIN_LOGITS

    def run(split: bool) -> None:
        def variant_of(*call):
            shipped = shipped_of(*call)
            return dataclasses.replace(shipped, split=shipped.split and split)

        kernel.Variant.of = staticmethod(variant_of)
        kernel.SPLIT_MIN_LOGITS = 0  # at every size: this measures what the threshold is for
        try:
            kernel.cross_entropy_rows(z, y, weight, opts, a, b, grad)
        finally:
            kernel.Variant.of = staticmethod(shipped_of)
            kernel.SPLIT_MIN_LOGITS = threshold

    grads = {}
    for split in (False, True):
        run(split)  # compile, and fault in grad
        run(split)
        grads[split] = grad.clone()
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for split in (False, True) if r % 2 else (True, False):
            start = time.perf_counter()
            run(split)
            times[split].append(time.perf_counter() - start)
    one, two = (statistics.median(times[s]) for s in (False, True))
    apart = (grads[True] - grads[False]).abs().max() / grads[False].abs().max()
    label = "every option but softcap" if options else "no options"
    print(f"N={n} V={v} float32, {label}, {rounds} rounds (gradients apart: {apart:.1e})")
    print(f"  one graph   {one * 1e3:9.3f} ms")
    print(f"  two graphs  {two * 1e3:9.3f} ms   × one graph {two / one:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", default="8192,32768", help="vocabulary sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--options", action="store_true", help="every option but softcap")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    for v in (int(x) for x in args.v.split(",")):
        compare(args.n, v, args.rounds, args.options, gen)


if __name__ == "__main__":
    main()
