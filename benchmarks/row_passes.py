"""Where the compiled kernel's time goes: its passes over a row, each compiled and timed apart.

Every entry is a small inductor graph over (N, V) float32 logits, timed interleaved in one
process (median of --rounds). The gradient is written into a preallocated buffer, as the kernel
does. Read the ratios: "passes" shifts by the row max (a max pass, then exp-sum, then the
gradient), "head shift" by the max of the first 64 logits (no max pass), "touch next row" adds a
reduction over row i + 1 to row i's gradient loop, and "two graphs" stores e = exp(z - m) while
summing it, then scales the stored rows in place.

    python benchmarks/row_passes.py --n 4096 --v 32768 --rounds 9
    python benchmarks/row_passes.py --graphs "passes (max shift),head shift"
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

HEAD = 64


def max_pass(z: Tensor, out: Tensor):
    return z.amax(1, keepdim=True)


def max_then_exp_sum(z: Tensor, out: Tensor):
    m = z.amax(1, keepdim=True)
    return m, torch.exp(z - m).sum(1, keepdim=True)


def exp_store(z: Tensor, out: Tensor):
    out.copy_(torch.exp(z - 1.0) * 0.5)


def scaled_copy(z: Tensor, out: Tensor):
    out.copy_(z * 0.5)


def passes(z: Tensor, out: Tensor):
    m = z.amax(1, keepdim=True)
    s = torch.exp(z - m).sum(1, keepdim=True)
    out.copy_(torch.exp(z - m) * (1.0 / s))
    return m, s


def head_shift(z: Tensor, out: Tensor):
    m = z[:, :HEAD].amax(1, keepdim=True)
    s = torch.exp(z - m).sum(1, keepdim=True)
    out.copy_(torch.exp(z - m) * (1.0 / s))
    return m, s


def store_e(z: Tensor, out: Tensor):
    m = z[:, :HEAD].amax(1, keepdim=True)
    e = torch.exp(z - m)
    out.copy_(e)
    return m, e.sum(1, keepdim=True)


def scale_in_place(out: Tensor, sum_e: Tensor):
    out.copy_(out * (1.0 / sum_e))


def touch_next_row(z: Tensor, out: Tensor):
    m = z[:, :HEAD].amax(1, keepdim=True)
    s = torch.exp(z - m).sum(1, keepdim=True)
    g = torch.exp(z - m) * (1.0 / s)
    nxt = torch.clamp(torch.arange(z.shape[0], device=z.device) + 1, max=z.shape[0] - 1)
    touch = (z[nxt] * 0.0 + g).sum(1)  # loads row i + 1 in row i's store loop
    out.copy_(g)
    return m, s, touch


GRAPHS = {
    "max pass": max_pass,
    "max then exp-sum": max_then_exp_sum,
    "exp written out": exp_store,
    "scaled copy": scaled_copy,
    "passes (max shift)": passes,
    "head shift": head_shift,
    "touch next row": touch_next_row,
    "two graphs": (store_e, scale_in_place),  # the second takes the first's Σe
}


def _compiled(entry, z: Tensor, out: Tensor):
    """A call of one entry of GRAPHS on (z, out): one graph, or two in a row."""
    if not isinstance(entry, tuple):
        graph = torch.compile(entry, dynamic=True)
        return lambda: graph(z, out)
    first, second = (torch.compile(fn, dynamic=True) for fn in entry)
    return lambda: second(out, first(z, out)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--graphs", default=",".join(GRAPHS), help="comma-separated subset (default: all)"
    )
    args = parser.parse_args()
    z = torch.randn(args.n, args.v, generator=torch.Generator().manual_seed(0)) * 2
    out = torch.empty_like(z)
    names = args.graphs.split(",")
    graphs = {name: _compiled(GRAPHS[name], z, out) for name in names}
    for graph in graphs.values():  # compile, and fault in out
        graph()
        graph()
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for r in range(args.rounds):
        order = list(graphs)
        for name in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            graphs[name]()
            times[name].append(time.perf_counter() - start)
    print(f"N={args.n} V={args.v} float32, {torch.get_num_threads()} threads, {args.rounds} rounds")
    base = statistics.median(times[names[0]])
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"  {name:20s} {median * 1e3:8.1f} ms  × {names[0]} {median / base:5.2f}")


if __name__ == "__main__":
    main()
