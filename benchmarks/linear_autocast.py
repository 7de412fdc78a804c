"""linear_cross_entropy under torch.autocast with float32 master weights, against eager PyTorch.

The mixed-precision training set-up: float32 hidden states and classifier weight, autocast to
bf16 (or fp16), forward + backward. Both methods run the matmuls in the autocast dtype; eager
PyTorch (``F.cross_entropy(F.linear(h, W), y)``) rounds ∂W to bf16 before autograd casts it to
float32, fastxent returns its float32 accumulator. Per method: the median time of interleaved
rounds, the peak extra memory of one step (resident set size in a fresh process, as in
``fastxent bench``), and the errors against float64 on the bf16-cast inputs (loss: relative;
∂W, ∂h: max |Δ| / max |ref|).

    python benchmarks/linear_autocast.py                      # N=2048, D=512, V=65536, bf16
    python benchmarks/linear_autocast.py --n 1024 --v 32768 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastxent
from fastxent.bench import _reset_peak_rss, _status_kib

METHODS = ("fastxent", "eager")


def inputs(n: int, d: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def step(method: str, h, w, y, dtype: torch.dtype) -> torch.Tensor:
    """One forward + backward under autocast; returns the loss (gradients land in .grad)."""
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=dtype):
        if method == "fastxent":
            loss = fastxent.linear_cross_entropy(h, w, y)
        else:
            loss = F.cross_entropy(F.linear(h, w), y)
    loss.backward()
    return loss.detach()


def errors(h, w, y, dtype: torch.dtype, loss: torch.Tensor) -> dict[str, float]:
    """The last step's errors against float64 on the inputs as autocast casts them."""
    h64 = h.detach().to(dtype).double().requires_grad_()
    w64 = w.detach().to(dtype).double().requires_grad_()
    want = F.cross_entropy(F.linear(h64, w64), y)
    want.backward()
    return {
        "loss": abs(float(loss) - float(want.detach())) / abs(float(want.detach())),
        "dh": float((h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()),
        "dW": float((w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()),
    }


def peak_memory(args: argparse.Namespace, method: str) -> int:
    """Peak extra resident bytes of one step (after a warm-up), in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks go back at once
    argv = [sys.executable, __file__, "--memory-of", method, "--n", str(args.n), "--d"]
    argv += [str(args.d), "--v", str(args.v), "--dtype", args.dtype]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["bytes"]


def memory_child(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    h, w, y = inputs(args.n, args.d, args.v)
    step(args.memory_of, h, w, y, dtype)  # warm-up: allocator and one-time costs
    h.grad = w.grad = None
    fastxent.empty_cache()  # the buffers kept for reuse count as the step's memory
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    step(args.memory_of, h, w, y, dtype)
    print(json.dumps({"bytes": (_status_kib("VmHWM") - before) * 1024}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=65536)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        memory_child(args)
        return 0
    dtype = getattr(torch, args.dtype)
    h, w, y = inputs(args.n, args.d, args.v)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    errs = {}
    for method in METHODS:  # warm-up, and the errors of each method's step
        errs[method] = errors(h, w, y, dtype, step(method, h, w, y, dtype))
    for r in range(args.rounds):
        for method in METHODS[r % 2 :] + METHODS[: r % 2]:  # rotate the order
            start = time.perf_counter()
            step(method, h, w, y, dtype)
            times[method].append(time.perf_counter() - start)
    print(
        f"linear_cross_entropy under torch.autocast({args.dtype}), float32 h and W, "
        f"N={args.n} D={args.d} V={args.v}, {torch.get_num_threads()} thread(s), "
        f"{args.rounds} interleaved rounds"
    )
    print(f"{'method':10s} {'median s':>9s} {'peak MiB':>9s} {'loss err':>9s} {'dh err':>9s} "
          f"{'dW err':>9s}")  # fmt: skip
    for method in METHODS:
        mib = peak_memory(args, method) / 2**20
        e = errs[method]
        print(
            f"{method:10s} {statistics.median(times[method]):9.3f} {mib:9.0f} "
            f"{e['loss']:9.1e} {e['dh']:9.1e} {e['dW']:9.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
