"""GPU benchmark: fastxent against PyTorch and peers at LLM vocabulary sizes, with floors.

For each shape (Llama-3-8B: N=8192, D=4096, V=128256; Gemma-2-2B: N=8192, D=2304, V=256000;
bf16) and each provider it checks the loss and gradient against a float32 PyTorch computation,
then records forward and forward+backward time (median of CUDA-event timings after warm-up) and
the peak memory allocated beyond the inputs. Two tasks:

* ``cross_entropy``: logits (N, V) given. Floor: 2 reads + 1 write of the logits at the HBM
  bandwidth measured here by a device-to-device copy.
* ``linear_cross_entropy``: hidden (N, D) and classifier (V, D) given. Floor: 6·N·D·V FLOPs at
  the bf16 matmul rate measured here.
* ``amp``: the same under ``torch.autocast(bf16)`` with a float32 classifier (master weights,
  the mixed-precision training set-up) and bf16 hidden states; every provider's ∂W is then
  float32, and the reference takes the bf16-cast classifier autocast computes with.

Besides fastxent's default (the token walk), the linear tasks time its vocabulary walk
(``vocab_block``), which trades a fourth matmul for memory: no float32 copy of ∂W.

Peers (each skipped with its reason when it cannot be imported or run): torch.compile,
``F.linear_cross_entropy`` (native, with ``LinearCrossEntropyOptions()`` when present),
Liger-Kernel, Cut Cross-Entropy.

    python benchmarks/gpu.py --out results/gpu.json          # on a CUDA machine
    python benchmarks/gpu.py --small --out /tmp/small.json   # tiny shapes, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

SHAPES = {  # name: (N, D, V)
    "llama3-8b": (8192, 4096, 128256),
    "gemma2-2b": (8192, 2304, 256000),
}
SMALL_SHAPES = {"small": (48, 32, 1000)}
# fastxent's vocabulary walk (``vocab_block``), the lean-memory row: its blocks of logits are
# (N, B), 128 MiB in float32 at N = 8192, B = 4096, beside bf16 ∂W and a float32 ∂h.
VOCAB_BLOCK = 4096
SMALL_VOCAB_BLOCK = 256
TASKS = ("ce", "linear", "amp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_results.json", help="JSON file for the results")
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}"
    )
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per provider")
    parser.add_argument("--iters", type=int, default=10, help="timed runs per provider")
    parser.add_argument(
        "--small",
        "--dry-run",
        action="store_true",
        help="tiny shapes on CPU through Triton's interpreter (checks the script, not speed)",
    )
    args = parser.parse_args(argv)
    shapes = SMALL_SHAPES if args.small else SHAPES
    names = list(shapes) if args.small else [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in shapes]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    args.shape_items = {name: shapes[name] for name in names}
    args.task_list = [t for t in args.tasks.split(",") if t]
    if not set(args.task_list) <= set(TASKS):
        parser.error(f"--tasks must be a subset of {','.join(TASKS)}, got {args.tasks!r}")
    return args


# ---- measurement ----


class Timer:
    """Wall time of a region: CUDA events on GPU (no sync inside), perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        import torch

        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def measure(step: Callable, inputs: list, args, cuda: bool) -> dict:
    """Median forward and forward+backward seconds, and peak bytes beyond the inputs.

    ``step()`` returns the loss; backward is timed right after it in the same run.
    """
    import torch

    timer = Timer(cuda)

    def once():
        for x in inputs:
            x.grad = None
        t0 = timer.mark()
        loss = step()
        t1 = timer.mark()
        loss.backward()
        t2 = timer.mark()
        return t0, t1, t2

    for _ in range(args.warmup):
        once()
    marks = [once() for _ in range(args.iters)]
    fwd = [timer.seconds(a, b) for a, b, _ in marks]
    total = [timer.seconds(a, c) for a, _, c in marks]
    peak = None
    if cuda:
        for x in inputs:
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        once()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return {
        "forward_s": statistics.median(fwd),
        "forward_backward_s": statistics.median(total),
        "peak_extra_bytes": peak,
    }


def copy_bandwidth(device, cuda: bool, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(cuda)
    times = []
    for i in range(12):
        t0 = timer.mark()
        dst.copy_(src)
        t1 = timer.mark()
        if i >= 2:
            times.append(timer.seconds(t0, t1))
    return 2 * nbytes / statistics.median(times)


def matmul_rate(n: int, d: int, v: int, device, dtype, cuda: bool) -> float:
    """FLOP/s of the (N, D) × (D, V) matmul in ``dtype``."""
    import torch

    h = torch.randn(n, d, device=device, dtype=dtype)
    w = torch.randn(v, d, device=device, dtype=dtype)
    timer = Timer(cuda)
    times = []
    for i in range(8):
        t0 = timer.mark()
        h @ w.T
        t1 = timer.mark()
        if i >= 2:
            times.append(timer.seconds(t0, t1))
    return 2 * n * d * v / statistics.median(times)


# ---- providers ----


def ce_providers(small: bool) -> dict[str, Callable]:
    """name -> factory(z, y) -> step() returning the loss; a factory may raise to be skipped."""
    import torch
    import torch.nn.functional as F

    import fastxent

    backend = "triton" if small else "auto"
    providers = {
        "fastxent": lambda z, y: lambda: fastxent.cross_entropy(z, y, backend=backend),
        "torch": lambda z, y: lambda: F.cross_entropy(z, y),
    }
    if not small:  # compiling on CPU takes minutes and says nothing about the GPU
        compiled = torch.compile(F.cross_entropy, dynamic=False)  # each shape specialised
        providers["torch.compile"] = lambda z, y: lambda: compiled(z, y)

    def liger(z, y):
        from liger_kernel.transformers.functional import liger_cross_entropy

        return lambda: liger_cross_entropy(z, y)

    providers["liger"] = liger
    return providers


def linear_providers(small: bool) -> dict[str, Callable]:
    """name -> factory(h, w, y) -> step() returning the loss."""
    import torch
    import torch.nn.functional as F

    import fastxent

    kw = {"backend": "triton"} if small else {}
    block = SMALL_VOCAB_BLOCK if small else VOCAB_BLOCK

    def fastxent_linear(h, w, y):
        if not hasattr(fastxent, "linear_cross_entropy"):
            raise ImportError("fastxent.linear_cross_entropy does not exist in this version")
        return lambda: fastxent.linear_cross_entropy(h, w, y, **kw)

    def fastxent_vocab_walk(h, w, y):  # the lean option: ∂W written once per vocab block
        return lambda: fastxent.linear_cross_entropy(h, w, y, vocab_block=block, **kw)

    def eager(h, w, y):
        return lambda: F.cross_entropy((h @ w.T).float(), y)

    providers = {
        "fastxent": fastxent_linear,
        f"fastxent vocab_block={block}": fastxent_vocab_walk,
        "torch": eager,
    }
    if not small:
        compiled = torch.compile(
            lambda h, w, y: F.cross_entropy((h @ w.T).float(), y), dynamic=False
        )  # each shape specialised, as the peers are
        providers["torch.compile"] = lambda h, w, y: lambda: compiled(h, w, y)

    def native(h, w, y):
        if not hasattr(F, "linear_cross_entropy"):
            raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy")
        kw = {}
        if hasattr(torch.nn, "LinearCrossEntropyOptions"):
            kw["options"] = torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(h, w, y, **kw)

    def liger(h, w, y):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda: liger_fused_linear_cross_entropy(h, w, y)

    def cce(h, w, y):
        from cut_cross_entropy import linear_cross_entropy

        return lambda: linear_cross_entropy(h, w, y)

    providers.update({"torch.linear_cross_entropy": native, "liger": liger, "cce": cce})
    return providers


def under_autocast(factory: Callable, device_type: str, dtype) -> Callable:
    """``factory`` whose step (the forward) runs under ``torch.autocast``; backward runs
    outside it, as PyTorch recommends."""
    import torch

    def build(*tensors):
        step = factory(*tensors)

        def run():
            with torch.autocast(device_type, dtype=dtype):
                return step()

        return run

    return build


# ---- correctness ----


def rel_error(got, want) -> float:
    """max |got - want| / max |want|, in float64 (chunked, so it needs no N×V float64 copy)."""
    import torch

    scale = want.abs().max().double().clamp_min(1e-30)
    worst = torch.zeros((), dtype=torch.float64, device=want.device)
    for g, r in zip(got.reshape(-1).split(1 << 26), want.reshape(-1).split(1 << 26), strict=True):
        worst = torch.maximum(worst, (g.double() - r.double()).abs().max())
    return float(worst / scale)


def ce_reference(z, y):
    """Loss and gradient of the mean cross-entropy in float32 (PyTorch autograd)."""
    import torch
    import torch.nn.functional as F

    x = z.detach().float().requires_grad_()
    loss = F.cross_entropy(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad.to(z.dtype)


def linear_reference(h, w, y):
    import torch
    import torch.nn.functional as F

    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = F.cross_entropy(hf @ wf.T, y)
    dh, dw = torch.autograd.grad(loss, (hf, wf))
    return loss.detach(), dh, dw


# ---- driver ----


def run_provider(name, factory, make_inputs, reference, floor_s, args, cuda) -> dict:
    """Build the provider, check its loss and gradients, time it; errors become a skip."""
    import torch

    row: dict = {"provider": name}
    try:
        inputs, tensors = make_inputs()
        build = factory(*tensors)

        def step():
            out = build()
            return out[0] if isinstance(out, tuple) else out  # some peers return (loss, ...)

        loss = step()
        loss.backward()
        loss = loss.detach()
        want_loss, *want_grads = reference
        row["loss_rel_error"] = abs(float(loss) - float(want_loss)) / max(abs(float(want_loss)), 1)
        row["grad_rel_error"] = max(
            rel_error(x.grad, g) for x, g in zip(inputs, want_grads, strict=True)
        )
        row.update(measure(step, inputs, args, cuda))
        row["floor_fraction"] = floor_s / row["forward_backward_s"]
    except Exception as error:  # a peer that cannot run here is reported, not fatal
        row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def print_rows(title: str, rows: list[dict], floor_s: float) -> None:
    print(f"\n{title}   floor {floor_s * 1e3:.3f} ms")
    header = f"{'provider':28s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'floor %':>8s}"
    print(header + f" {'extra MiB':>10s} {'loss err':>9s} {'grad err':>9s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['provider']:28s} skipped: {r['skipped']}")
            continue
        mem = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        print(
            f"{r['provider']:28s} {r['forward_s'] * 1e3:9.3f} {r['forward_backward_s'] * 1e3:11.3f}"
            f" {100 * r['floor_fraction']:7.1f}% {mem:>10s} {r['loss_rel_error']:9.1e}"
            f" {r['grad_rel_error']:9.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.small:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    cuda = not args.small
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --small for the CPU interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    results: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": str(dtype),
        "warmup": args.warmup,
        "iters": args.iters,
        "complete": False,  # True once every task has run: a run cut short keeps what it had
        "runs": [],
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    bandwidth = copy_bandwidth(device, cuda, (2 << 30) if cuda else (64 << 20))
    results["copy_bandwidth_bytes_per_s"] = bandwidth
    print(f"device {results['device']}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    failed = False

    for shape_name, (n, d, v) in args.shape_items.items():
        g = torch.Generator(device=device).manual_seed(0)
        y = torch.randint(0, v, (n,), device=device, generator=g)
        if "ce" in args.task_list:
            z0 = torch.randn(n, v, device=device, dtype=dtype, generator=g) * 2

            def make_ce(z0=z0, y=y):
                z = z0.clone().requires_grad_()
                return [z], (z, y)

            reference = ce_reference(z0, y)
            floor_s = 3 * z0.numel() * z0.element_size() / bandwidth
            rows = [
                run_provider(name, f, make_ce, reference, floor_s, args, cuda)
                for name, f in ce_providers(args.small).items()
            ]
            del reference
            print_rows(f"cross_entropy {shape_name} N={n} V={v} {dtype}", rows, floor_s)
            results["runs"].append(
                {"task": "cross_entropy", "shape": shape_name, "N": n, "V": v, "floor_s": floor_s,
                 "rows": rows}
            )  # fmt: skip
            write_results(results, args.out)
            failed |= _fastxent_wrong(rows, dtype)
            del z0
        for task in ("linear", "amp"):
            if task in args.task_list:
                run = linear_task(task == "amp", shape_name, (n, d, v), y, g, args, device, cuda)
                results["runs"].append(run)
                write_results(results, args.out)
                failed |= _fastxent_wrong(run["rows"], dtype)

    results["complete"] = True
    write_results(results, args.out)
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


def write_results(results: dict, path: str) -> None:
    """The JSON as it stands, rewritten after every task's run: a lent GPU's time may run out
    (or a provider crash the process) before the last one, and what ran is still kept."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)  # never half a file, even when killed while writing


def linear_task(amp: bool, shape_name: str, shape, y, g, args, device, cuda: bool) -> dict:
    """Every provider on the linear case (bf16 classifier), or with ``amp`` on the amp case
    (float32 classifier, forward under bf16 autocast); the run's record for the JSON."""
    import torch

    n, d, v = shape
    dtype = torch.bfloat16
    h0 = torch.randn(n, d, device=device, dtype=dtype, generator=g)
    w_dtype = torch.float32 if amp else dtype  # amp: the float32 master weights
    w0 = torch.randn(v, d, device=device, dtype=w_dtype, generator=g) / d**0.5

    def make_inputs():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        return [h, w], (h, w, y)

    rate = matmul_rate(n, d, v, device, dtype, cuda)
    floor_s = 6 * n * d * v / rate
    reference = linear_reference(h0, w0.to(dtype), y)  # autocast computes with the bf16 cast
    providers = linear_providers(args.small)
    if amp:
        providers = {name: under_autocast(f, device.type, dtype) for name, f in providers.items()}
    rows = [
        run_provider(name, f, make_inputs, reference, floor_s, args, cuda)
        for name, f in providers.items()
    ]
    where = "under autocast(bf16), float32 classifier" if amp else str(dtype)
    print_rows(
        f"linear_cross_entropy {shape_name} N={n} D={d} V={v} {where}"
        f" (matmul {rate / 1e12:.0f} TFLOP/s)",
        rows,
        floor_s,
    )
    return {
        "task": "linear_cross_entropy_amp" if amp else "linear_cross_entropy",
        "shape": shape_name, "N": n, "D": d, "V": v, "matmul_flops_per_s": rate,
        "floor_s": floor_s, "rows": rows,
    }  # fmt: skip


def _fastxent_wrong(rows: list[dict], dtype) -> bool:
    """fastxent must run and agree with float32 PyTorch: loss to 1e-4, gradient to 2 bf16 ulps."""
    row = next(r for r in rows if r["provider"] == "fastxent")
    if "skipped" in row:
        return "does not exist" not in row["skipped"]
    ok = row["loss_rel_error"] < 1e-4 and row["grad_rel_error"] < 2 * 2.0**-7
    if not ok:
        print(f"fastxent FAILED the correctness check: {row}", file=sys.stderr)
    return not ok


if __name__ == "__main__":
    sys.exit(main())
