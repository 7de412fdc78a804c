"""GPU tuning runs behind the Triton backend's launch choices (CUDA only).

Three measurements, each printed as a table (medians of CUDA-event timings by do_bench):

1. ``--part ce``: the row kernel alone at LLM vocabularies (bf16), for tile widths x warps, with
   the gradient written over the logits and into a separate buffer; then the whole
   ``cross_entropy`` forward+backward with the chosen default against Liger-Kernel.
2. ``--part linear``: ``linear_cross_entropy`` forward+backward for several ``chunk_size`` values,
   with ∂W accumulated by cuBLAS straight into float32 (``addmm(out_dtype=float32)``) or by the
   block-wise half-precision product + float32 add; the matmul floor (6·N·D·V FLOPs) alongside.
3. ``--part profile``: the CUDA kernels of one fastxent step of each task (torch.profiler).
4. ``--part small``: host time per call at a small shape, against eager, and where it goes
   (cProfile).

    python benchmarks/gpu_tune.py --part ce,linear,profile
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

SHAPES = {"llama3-8b": (8192, 4096, 128256), "gemma2-2b": (8192, 2304, 256000)}
TILES = (2048, 4096, 8192, 16384)
WARPS = (4, 8, 16, 32)


def bench(fn, grad_none=()) -> float:
    """Median milliseconds of ``fn`` (gradients of ``grad_none`` reset before each call)."""
    import triton

    def run():
        for x in grad_none:
            x.grad = None
        fn()

    return triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")


def part_ce(dtype) -> None:
    import torch

    import fastxent
    import fastxent._triton as tb
    from fastxent._options import CrossEntropyOptions

    default = tb.launch_config
    for name, (n, _, v) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        z = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dtype)
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        floor = 3 * z.numel() * z.element_size()
        opts = CrossEntropyOptions(num_classes=v, soft=False)
        one = torch.ones((), device="cuda")
        spare = torch.empty_like(z)
        print(f"\nrow kernel, {name} N={n} V={v} {dtype}: ms (GB/s counting 2 reads + 1 write)")
        print(f"{'tile':>6s} {'warps':>5s} {'in place':>16s} {'new buffer':>16s}")
        for tile in TILES:
            for warps in WARPS:
                tb.launch_config = lambda _v, t=tile, w=warps: (t, w)
                zz = z.clone()
                t_in = bench(partial(tb.cross_entropy_rows, zz, y, None, opts, one, one, zz))
                t_new = bench(partial(tb.cross_entropy_rows, z, y, None, opts, one, one, spare))
                print(
                    f"{tile:6d} {warps:5d} {t_in:8.3f} {floor / t_in / 1e6:6.0f}GB/s"
                    f" {t_new:8.3f} {floor / t_new / 1e6:6.0f}GB/s"
                )
        tb.launch_config = default
        print(f"default {default(v)}; whole fwd+bwd (ms):")
        x = z.clone().requires_grad_()
        rows = {"fastxent": partial(fastxent.cross_entropy, x, y)}
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            rows["liger"] = partial(liger_cross_entropy, x, y)
        except ImportError as error:
            print(f"liger skipped: {error}")
        for label, loss_of in rows.items():
            t = bench(lambda loss_of=loss_of: loss_of().backward(), grad_none=(x,))
            print(f"  {label:18s} {t:8.3f}   floor {floor / 4.2e12 * 1e3:.3f} at 4.2 TB/s")


def part_linear(dtype) -> None:
    import torch

    import fastxent
    import fastxent._linear as lin

    h32 = torch.randn(512, 256, device="cuda")
    g32 = torch.randn(512, 1000, device="cuda")
    acc = torch.randn(1000, 256, device="cuda")
    want = acc.double() + g32.to(dtype).double().t() @ h32.to(dtype).double()
    try:
        torch.addmm(acc, g32.to(dtype).t(), h32.to(dtype), out_dtype=torch.float32, out=acc)
        err = ((acc.double() - want).abs().max() / want.abs().max()).item()
        print(f"addmm(out_dtype=float32, out=self) max rel error vs float64: {err:.1e}")
    except Exception as error:  # reported, and the flag is turned off for the timings
        print(f"addmm(out_dtype=float32) failed: {type(error).__name__}: {error}")
        lin.CUDA_FLOAT32_OUT_MATMUL = False
    for name, (n, d, v) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(n, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(v, d, device="cuda", dtype=dtype, generator=g) / d**0.5).requires_grad_()
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        a = torch.randn(n, d, device="cuda", dtype=dtype)
        b = torch.randn(d, v, device="cuda", dtype=dtype)
        mm = bench(partial(torch.mm, a, b))
        print(f"\nlinear {name} N={n} D={d} V={v} {dtype}: matmul {mm:.3f} ms, floor {3 * mm:.3f}")
        print(
            f"{'chunk':>6s} {'fp32-out':>8s} {'fwd+bwd ms':>10s} {'x floor':>8s} {'peak MiB':>9s}"
        )
        default = lin.default_chunk_size(v, d, dtype, n)
        for flag in (True, False):
            if flag and not lin.cuda_float32_out_matmul():
                continue
            saved, lin.CUDA_FLOAT32_OUT_MATMUL = lin.CUDA_FLOAT32_OUT_MATMUL, flag
            for chunk in sorted({2048, 4096, default}):

                def step(h=h, w=w, y=y, chunk=chunk):
                    fastxent.linear_cross_entropy(h, w, y, chunk_size=chunk).backward()

                t = bench(step, grad_none=(h, w))
                h.grad = w.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                h.grad = w.grad = None
                mark = "*" if chunk == default else " "
                print(f"{chunk:5d}{mark} {flag!s:>8s} {t:10.3f} {t / (3 * mm):8.2f} {peak:9.0f}")
            lin.CUDA_FLOAT32_OUT_MATMUL = saved


def part_profile(dtype) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import fastxent

    n, d, v = SHAPES["llama3-8b"]
    z = torch.randn(n, v, device="cuda", dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    h = torch.randn(n, d, device="cuda", dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda", dtype=dtype) / d**0.5).requires_grad_()
    steps = {
        "cross_entropy": lambda: fastxent.cross_entropy(z, y).backward(),
        "linear_cross_entropy": lambda: fastxent.linear_cross_entropy(h, w, y).backward(),
    }
    for label, fn in steps.items():
        for _ in range(3):
            z.grad = h.grad = w.grad = None
            fn()
        torch.cuda.synchronize()
        z.grad = h.grad = w.grad = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"\nprofile: {label} (llama3-8b, {dtype})")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=12, max_name_column_width=60
            )
        )


def part_small(dtype) -> None:
    """Host time of one small call (N=4096, V=8192, float32: ~0.1 ms of HBM traffic)."""
    import cProfile
    import pstats
    import time

    import torch
    import torch.nn.functional as F

    import fastxent
    import fastxent.functional as fn

    def per_call(step, calls=200) -> float:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            z.grad = None
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e3

    def fused_ops(backend, device, num_logits, linear=False):  # "auto" for small calls, any V
        return backend == "auto"

    print("\nfwd+bwd ms per call, back to back (one sync per 200 calls), N=4096:")
    print(f"{'V':>7s} {'dtype':>9s} {'eager':>7s} {'triton':>7s} {'fused ops':>9s}")
    for v in (2048, 8192, 32768, 131072):
        for dtype in (torch.float32, torch.bfloat16):
            z = torch.randn(4096, v, device="cuda").to(dtype).requires_grad_()
            y = torch.randint(0, v, (4096,), device="cuda")
            eager = per_call(lambda z=z, y=y: F.cross_entropy(z, y).backward())
            triton_ms = per_call(
                lambda z=z, y=y: fastxent.cross_entropy(z, y, backend="triton").backward()
            )
            default, fn.uses_composed = fn.uses_composed, fused_ops
            fused = per_call(lambda z=z, y=y: fastxent.cross_entropy(z, y).backward())
            fn.uses_composed = default
            name = str(dtype).removeprefix("torch.")
            print(f"{v:7d} {name:>9s} {eager:7.3f} {triton_ms:7.3f} {fused:9.3f}")
    z = torch.randn(4096, 8192, device="cuda", requires_grad=True)
    y = torch.randint(0, 8192, (4096,), device="cuda")
    steps = {"fastxent": lambda: fastxent.cross_entropy(z, y, backend="triton").backward()}
    deferred = fn.start_index_target_check
    fn.start_index_target_check = lambda *a, defer: deferred(*a, defer=False)
    print(f"V=8192 float32, triton with the immediate check: {per_call(steps['fastxent']):.3f}")
    fn.start_index_target_check = deferred
    profiler = cProfile.Profile()
    profiler.enable()
    per_call(steps["fastxent"], calls=100)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    from torch.profiler import ProfilerActivity, profile

    for label, step in {
        "triton kernel": steps["fastxent"],
        "auto (fused ops)": lambda: fastxent.cross_entropy(z, y).backward(),
        "eager": lambda: F.cross_entropy(z, y).backward(),
    }.items():
        per_call(step, calls=20)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            per_call(step, calls=20)
        print(f"\nhost ops of {label}, 30 calls (10 warm-up + 20), V=8192 float32")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parts_help = "comma-separated subset of ce,linear,profile,small"
    parser.add_argument("--part", default="ce,linear,profile", help=parts_help)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(torch.__version__, torch.cuda.get_device_name())
    parts = {"ce": part_ce, "linear": part_linear, "profile": part_profile, "small": part_small}
    for part in args.part.split(","):
        parts[part](torch.bfloat16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
