"""linear_cross_entropy's filter_eps on a peaked distribution: time, skipped blocks, error.

    python benchmarks/linear_filter.py                      # N=2048 D=512 V=65536 float32
    python benchmarks/linear_filter.py --probs 1e-6,1e-8 --rounds 3

filter_eps skips, within a chunk, the d_hidden and d_weight contributions of vocab blocks where
every row's |g| is below eps. It pays off only where the softmax is peaked, as after training;
on random weights every block has some mass and nothing is skipped. So this script times it on
two inputs, interleaved with the exact walk:

* "peaked": logits shaped like a trained LM's. Class j has a Zipf prior, ``log p_j`` with
  ``p_j ∝ (j+1)^-s`` (ids in frequency order, as BPE vocabularies roughly are), carried by a
  constant hidden feature; targets are drawn from that prior; each token's hidden state points
  at its target's weight row (a logit margin ``--margin``), the rest is noise.
* "random": the suite's inputs (``h ~ N(0, 1)``, ``W ~ N(0, 1/D)``, uniform targets).

``--probs`` are thresholds on the softmax probability; with reduction "mean" the gradient is
``(o - y) / N``, so ``filter_eps = prob / N``. Errors are ``max|g - g_exact| / max|g_exact|`` over
d_hidden and d_weight; the loss is exact either way.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import fastxent
from fastxent._linear import default_chunk_size, kept_blocks


def peaked_inputs(n: int, d: int, v: int, zipf: float, margin: float, gen: torch.Generator):
    """Hidden states, weights and targets whose softmax is peaked like a trained model's."""
    log_prior = -zipf * torch.log(torch.arange(1, v + 1, dtype=torch.float64))
    log_prior = (log_prior - torch.logsumexp(log_prior, 0)).float()  # (V,) log p_j
    y = torch.multinomial(log_prior.exp(), n, replacement=True, generator=gen)  # (N,)
    u = torch.randn(v, d - 1, generator=gen)
    u /= u.norm(dim=1, keepdim=True)  # (V, D-1) unit directions, one per class
    w = torch.cat([log_prior.unsqueeze(1), u * math.sqrt(margin)], dim=1)  # (V, D)
    noise = torch.randn(n, d - 1, generator=gen) / math.sqrt(d - 1)
    h = torch.cat([torch.ones(n, 1), u[y] * math.sqrt(margin) + noise], dim=1)  # (N, D)
    return h, w, y


def random_inputs(n: int, d: int, v: int, gen: torch.Generator):
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / math.sqrt(d)
    return h, w, torch.randint(0, v, (n,), generator=gen)


def describe(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> str:
    """Mean target probability and entropy (nats) over the first 256 rows."""
    logp = torch.log_softmax(h[:256] @ w.T, dim=1)  # (256, V)
    p_target = logp.gather(1, y[:256, None]).exp().mean()
    entropy = -(logp.exp() * logp).sum(1).mean()
    return f"mean p(target) {p_target:.3f}, mean entropy {entropy:.2f} nats"


def kept_fraction(h, w, y, eps: float, chunk: int) -> float:
    """Share of (chunk, vocab block) pairs the filter keeps, from the exact gradient."""
    kept = total = 0
    for start in range(0, h.shape[0], chunk):
        g = torch.softmax(h[start : start + chunk] @ w.T, dim=1) / h.shape[0]  # (n, V)
        rows = torch.arange(g.shape[0])
        g[rows, y[start : start + chunk]] -= 1.0 / h.shape[0]
        blocks = kept_blocks(g, eps)  # the library's own test
        kept += int(blocks.sum())
        total += blocks.numel()
    return kept / total


def run(name: str, h, w, y, probs: list[float], rounds: int) -> None:
    n = h.shape[0]
    chunk = default_chunk_size(w.shape[0], w.shape[1], w.dtype)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()

    def step(eps: float | None):
        hr.grad = wr.grad = None
        fastxent.linear_cross_entropy(hr, wr, y, filter_eps=eps).backward()
        return hr.grad, wr.grad

    exact = [g.clone() for g in step(None)]
    variants = {"exact": None, **{f"p < {p:g}": p / n for p in probs}}
    errors = {}
    for label, eps in variants.items():
        got = step(eps)
        errors[label] = max(
            float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, exact, strict=True)
        )
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, eps in variants.items():
            start = time.perf_counter()
            step(eps)
            times[label].append(time.perf_counter() - start)
    base = statistics.median(times["exact"])
    print(f"{name}: N={n} D={w.shape[1]} V={w.shape[0]} float32, chunk {chunk} rows, "
          f"{rounds} rounds; {describe(h, w, y)}")  # fmt: skip
    for label, eps in variants.items():
        median = statistics.median(times[label])
        kept = 1.0 if eps is None else kept_fraction(h, w, y, eps, chunk)
        print(
            f"  {label:12s} eps {eps or 0:8.1e}  blocks kept {kept:6.1%}  "
            f"median {median * 1e3:7.1f} ms  × exact {median / base:5.3f}  "
            f"grad err {errors[label]:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=65536)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the prior")
    parser.add_argument("--margin", type=float, default=12.0, help="target logit margin")
    parser.add_argument("--probs", default="1e-6,1e-8", help="probability thresholds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    probs = [float(p) for p in args.probs.split(",") if p]
    gen = torch.Generator().manual_seed(0)
    peaked = peaked_inputs(args.n, args.d, args.v, args.zipf, args.margin, gen)
    run("peaked", *peaked, probs, args.rounds)
    run("random", *random_inputs(args.n, args.d, args.v, gen), probs, args.rounds)


if __name__ == "__main__":
    main()
