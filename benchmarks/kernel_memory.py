"""What the compiled CPU row kernel allocates beside the gradient, per variant, in bytes per logit.

    python benchmarks/kernel_memory.py                                 # N=64 V=4096, every variant
    python benchmarks/kernel_memory.py --dtypes bfloat16 --options all,zloss --targets index

Each variant's forward + backward (``torch.autograd.grad`` of the loss with respect to logits
computed from a leaf) is measured after a warm-up call, with the peak read from the profiler's
memory events (``fastxent.bench.allocated_peak_bytes``: exact bytes, not pages). The gradient
itself (one (N, V) buffer, none with ``inplace_backward``) is subtracted: what is left should be
row-sized, well under a byte per logit. A float32 (M, V) temporary shows as 4.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import fastxent
from fastxent.bench import allocated_peak_bytes

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "scale": {"logit_scale": 1.3},
    "weighted": {"weight": None},  # filled with random class weights
    "all": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 1.3},
}


def extra_bytes_per_logit(n: int, v: int, dtype, options: dict, soft: bool, inplace: bool):
    gen = torch.Generator().manual_seed(0)
    if "weight" in options:
        options = {**options, "weight": torch.rand(v, generator=gen) + 0.5}
    if soft:
        target = torch.rand(n, v, generator=gen).to(dtype)
    else:
        target = torch.randint(0, v, (n,), generator=gen)
    leaf = torch.randn(n, v, generator=gen).to(dtype).requires_grad_()
    grads = []

    def step(logits):
        loss = fastxent.cross_entropy(
            logits, target, backend="compiled", inplace_backward=inplace, **options
        )
        grads.append(torch.autograd.grad(loss, logits)[0])

    step(leaf * 1.0)  # compiles the variant outside the measurement
    grads.clear()
    fastxent.empty_cache()  # the measured step allocates its gradient
    logits = leaf * 1.0  # a non-leaf, as inplace_backward requires
    peak = allocated_peak_bytes(lambda: step(logits))
    gradient = 0 if inplace else n * v * leaf.element_size()
    return (peak - gradient) / (n * v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="rows (default: %(default)s)")
    parser.add_argument("--v", type=int, default=4096, help="classes (default: %(default)s)")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16,float16,float64", help="default: %(default)s"
    )
    parser.add_argument(
        "--options", default=",".join(OPTIONS), help="comma-separated, of: %(default)s"
    )
    parser.add_argument("--targets", default="index,soft", help="index, soft or index,soft")
    args = parser.parse_args()
    for flag, given, known in (
        ("--options", args.options, OPTIONS),
        ("--targets", args.targets, ("index", "soft")),
        ("--dtypes", args.dtypes, ("float32", "bfloat16", "float16", "float64")),
    ):
        unknown = [name for name in given.split(",") if name not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    warnings.simplefilter("ignore")  # a fallback's warning would show as its own bytes anyway
    print(f"N={args.n} V={args.v}: bytes per logit beside the gradient (peak)")
    print(f"  {'dtype':9s} {'targets':7s} {'options':9s} {'into a buffer':>14s} {'in place':>9s}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for targets in args.targets.split(","):
            for name in args.options.split(","):
                row = [
                    extra_bytes_per_logit(
                        args.n, args.v, dtype, OPTIONS[name], targets == "soft", inplace
                    )
                    for inplace in (False, True)
                ]
                print(f"  {dtype_name:9s} {targets:7s} {name:9s} {row[0]:14.2f} {row[1]:9.2f}")


if __name__ == "__main__":
    main()
