"""The Triton backend: one fused row kernel on CUDA (on CPU only through Triton's interpreter).

Imported on first use only; ``triton`` itself is imported by :func:`unavailable_reason` and the
launcher, never by ``import fastxent``. The kernels are in :mod:`fastxent._triton.kernels`.

Launch choices (large V): tiles of ``MAX_BLOCK = 4096`` columns (8 KB of bf16, 16 KB of float32
per read) with 8 warps, i.e. 16 elements per thread per tile: on an H200 the row kernel streams
~3.9 TB/s of a 4.1-4.2 TB/s copy at Llama-3-8B and Gemma-2-2B vocabularies, the best of the tile
widths × warps measured there (BENCHMARKS.md, "H200"); smaller V gets the next power of two (at
least 16) and fewer warps. float64 logits are routed to the portable kernel (a float64 Triton
kernel would still receive its options as float32).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import Tensor

from fastxent._options import CrossEntropyOptions, major_minor

__all__ = ["cross_entropy_rows", "launch_config", "scale_unless_one", "unavailable_reason"]

MAX_BLOCK = 4096  # columns per tile for large V
MAX_CLASSES = 1 << 30  # int32 column offsets inside a row stay exact below this

_TRUE = ("1", "true", "yes", "on", "y")


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to interpret kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


# The oldest triton the kernels were run with: 3.6 on the GPU machine's image (torch 2.11), and
# its interpreter; CI's is newer. Under triton 3.0 and 3.1 (torch 2.4's, 2.5's) the interpreter
# computed wrong losses (errors of 16 to 6e4 and more); 3.4's could not run the kernels (its
# interpreter converts a size-1 array to an int); 3.2's, 3.3's and 3.5's pass the interpreter
# tests, but no GPU has run the kernels with them.
MIN_TRITON = (3, 6)


def version_problem(version: str) -> str | None:
    """Why triton ``version`` is not used, or None."""
    if major_minor(version) >= MIN_TRITON:
        return None
    return (
        f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest the "
        "kernels are tested with (triton 3.0's interpreter gave wrong results)"
    )


def unavailable_reason(device: torch.device) -> str | None:
    """None on CUDA when triton imports, and on CPU when ``TRITON_INTERPRET=1``; else why not.

    The device is asked first: on CPU without the interpreter, installing triton would not help.
    """
    if device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA devices, not on {device.type}"
    if device.type == "cpu" and not interpreter_requested():
        return (
            "Triton kernels run on CUDA devices, and on CPU only through Triton's interpreter "
            "(slow; for tests): set the environment variable TRITON_INTERPRET=1 before triton "
            "is first imported"
        )
    try:
        import triton
    except ImportError as error:
        return f"triton could not be imported ({error}); install it with `pip install triton`"
    problem = version_problem(triton.__version__)
    if problem is not None:
        return problem
    if device.type == "cuda":
        return None
    kernels = sys.modules.get("fastxent._triton.kernels")
    compiled = [triton.language.zeros] + (
        [] if kernels is None else [kernels.cross_entropy_rows_kernel]
    )
    if not all(_interpreted(fn) for fn in compiled):
        return (
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled "
            "for the GPU; set the variable before triton is first imported"
        )
    return None


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def launch_config(num_classes: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rows of ``num_classes`` logits."""
    block = min(MAX_BLOCK, max(16, 1 << max(0, num_classes - 1).bit_length()))
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def cross_entropy_rows(
    z: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: CrossEntropyOptions,
    ce_scale: Tensor,
    z_scale: Tensor,
    grad: Tensor | None,
) -> Tensor:
    """Row losses ``ce_scale·E + z_scale·s·lse²`` (M,), and ∂loss/∂z into ``grad`` if given.

    The kernel needs unit stride along V (any row stride is fine); other layouts are copied to
    a contiguous buffer first and the gradient copied back into ``grad``. No host sync.
    """
    num_rows, num_classes = z.shape
    if z.dtype == torch.float64 or num_rows == 0 or num_classes == 0:
        from fastxent._torch.kernel import cross_entropy_rows as portable

        return portable(z, target, weight, opts, ce_scale, z_scale, grad)
    if num_classes >= MAX_CLASSES:
        raise ValueError(
            f"the Triton backend supports fewer than {MAX_CLASSES} classes, got {num_classes}; "
            "use backend='torch'."
        )
    from fastxent._triton import kernels

    zk = _unit_stride(z)
    gk = grad
    if grad is z:
        gk = zk  # the gradient overwrites the logits the kernel reads (copied back below)
    elif grad is not None:
        gk = _unit_stride(grad)
    tk = _unit_stride(target) if opts.soft else target
    # The kernel reads w[y] at unit stride: a strided float32 view would be read wrongly.
    wk = None if weight is None else _unit_stride(weight.to(device=z.device, dtype=torch.float32))
    rows = torch.empty(num_rows, dtype=torch.float32, device=z.device)
    block, num_warps = launch_config(num_classes)
    eps = opts.label_smoothing
    with on_device(z):
        kernels.cross_entropy_rows_kernel[(num_rows,)](
            zk,
            zk.stride(0),
            tk,
            tk.stride(0),
            zk if wk is None else wk,
            zk if gk is None else gk,
            0 if gk is None else gk.stride(0),
            rows,
            ce_scale.to(device=z.device, dtype=torch.float32),
            z_scale.to(device=z.device, dtype=torch.float32),
            num_classes,
            opts.ignore_index,
            1.0 - eps,
            eps / num_classes,
            opts.z_loss,
            1.0 if opts.softcap is None else opts.softcap,
            opts.logit_scale,
            SOFT=opts.soft,
            HAS_WEIGHT=wk is not None,
            HAS_SMOOTHING=eps != 0.0,
            HAS_Z_LOSS=opts.z_loss != 0.0,
            HAS_SOFTCAP=opts.softcap is not None,
            HAS_SCALE=opts.logit_scale != 1.0,
            WRITE_GRAD=gk is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
    if grad is not None and gk is not grad:
        grad.copy_(gk)
    return rows


def on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """``x``'s GPU as the current device: Triton launches on the current device and stream,
    not on its arguments' device, so a tensor on ``cuda:1`` while ``cuda:0`` is current would
    be read through the wrong GPU's context."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


SCALE_BLOCK = 4096  # elements per tile of scale_unless_one
SCALE_PROGRAMS = 1024  # its fixed grid (a few waves of programs on a large GPU)


def scale_unless_one(x: Tensor, factor: Tensor) -> None:
    """``x *= factor`` in place (``x`` contiguous), a no-op pass when ``factor == 1``.

    The test runs on the device: backward's ``grad_output`` is usually exactly 1, and this skips
    reading and writing the N×V gradient then without a host sync. The kernel computes in
    float32: a float64 ``x`` is multiplied by PyTorch instead (always, 1 or not).
    """
    from fastxent._triton import kernels

    numel = x.numel()
    if numel == 0:
        return
    if x.dtype == torch.float64:
        x.mul_(factor)
        return
    grid = (min(SCALE_PROGRAMS, -(-numel // SCALE_BLOCK)),)
    with on_device(x):
        kernels.scale_unless_one_kernel[grid](
            x, factor.to(device=x.device, dtype=torch.float32), numel, BLOCK=SCALE_BLOCK,
            num_warps=8,
        )  # fmt: skip


def _unit_stride(x: Tensor) -> Tensor:
    """``x`` itself when its last dimension has unit stride (or one element), else a copy; a
    copy too with the negative bit (``torch._neg_view``): the kernel reads memory as it is."""
    if x.is_neg():
        x = x.resolve_neg()
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()
