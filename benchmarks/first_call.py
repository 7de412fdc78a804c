"""What the compiled CPU backend's compilation costs a fresh process, cold and warm cache.

    python benchmarks/first_call.py            # N=256, V=32768, float32, then the variants

Each measurement is a new Python process, so that nothing is cached in memory. The first process
gets an empty inductor cache directory (a first run on a machine), the second the same directory
again (every later process). Each prints the seconds of: ``import fastxent``, the first
forward+backward (dynamo tracing, inductor's start-up, codegen and the C++ build, or a cache
load), the same call at a new N and V (dynamic shapes: no recompilation), and a new variant
(bfloat16 logits and label smoothing: a graph of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch
import fastxent
n, v = int(sys.argv[1]), int(sys.argv[2])
times = {"import": time.perf_counter() - start}

def call(name, rows, classes, dtype=torch.float32, **options):
    z = torch.randn(rows, classes).to(dtype).requires_grad_()
    y = torch.randint(0, classes, (rows,))
    start = time.perf_counter()
    fastxent.cross_entropy(z, y, backend="compiled", **options).backward()
    times[name] = time.perf_counter() - start

call("first call", n, v)
call("again", n, v)
call("new N and V", n + 44, v - 1000)
call("new variant", n, v, torch.bfloat16, label_smoothing=0.1)
print(json.dumps(times))
"""


def run_child(cache_dir: str, n: int, v: int) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(v)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"the measuring process failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--v", type=int, default=32768, help="classes, > 1000 (default: 32768)")
    args = parser.parse_args()
    if args.n < 2 or args.v <= 1000:  # the child's "new N and V" call takes V - 1000 classes
        parser.error(f"--n must be >= 2 and --v > 1000, got --n {args.n} --v {args.v}")
    with tempfile.TemporaryDirectory() as cache_dir:
        for label in ("cold cache (first process)", "warm cache (next process)"):
            times = run_child(cache_dir, args.n, args.v)
            print(f"{label}:")
            for name, seconds in times.items():
                print(f"  {name:12s} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
