"""The compiled kernel's gradient pass: keep e = exp(z' - m) in a row buffer, or recompute it?

Times the two compiled graphs of the same variant, interleaved, writing the gradient into a
separate buffer (the default, not inplace_backward). The shipped choice (``Variant.of``) is to
recompute for float32 and keep the buffer for half precision.

    python benchmarks/row_buffer.py --dtype float32 --v 8192,32768 --rounds 40
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from fastxent._compiled.kernel import Variant, compiled_graph
from fastxent._options import CrossEntropyOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", default="8192,32768", help="vocabulary sizes, comma-separated")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    for v in (int(x) for x in args.v.split(",")):
        gen = torch.Generator().manual_seed(0)
        z = torch.empty(args.n, v).normal_(0.0, 2.0, generator=gen).to(DTYPES[args.dtype])
        y = torch.randint(0, v, (args.n,), generator=gen)
        grad = torch.empty_like(z)
        z_y = z.gather(1, y.unsqueeze(1)).squeeze(1).float()  # z_y: part of the shift
        opts = CrossEntropyOptions(num_classes=v, soft=False)
        # The graph's option values: a = 1/N, b = 0, ε, s, c, α, and Σw = V (no class weights).
        k = torch.tensor([1.0 / args.n, 0.0, 0.0, 0.0, 0.0, 1.0, float(v)])
        shipped = Variant.of(z, y, None, opts, grad)
        graphs = {
            f"recompute_exp={flag}": compiled_graph(
                dataclasses.replace(shipped, recompute_exp=flag)
            )
            for flag in (False, True)
        }
        out = {}
        for name, graph in graphs.items():  # compile, and check both write the same gradient
            graph(z, y, z_y, k, k, grad)
            out[name] = grad.clone()
        a, b = out.values()
        same = int((a != b).sum())
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, graph in graphs.items():
                start = time.perf_counter()
                graph(z, y, z_y, k, k, grad)
                times[name].append(time.perf_counter() - start)
        print(
            f"N={args.n} V={v} {args.dtype}, {args.rounds} rounds "
            f"(shipped: recompute_exp={shipped.recompute_exp}; {same} gradient entries differ)"
        )
        base = statistics.median(times["recompute_exp=False"])
        for name, runs in times.items():
            median = statistics.median(runs)
            print(f"  {name:22s} median {median * 1e3:7.1f} ms   × row buffer {median / base:.3f}")


if __name__ == "__main__":
    main()
