r"""``fastxent check``: verify the math symbolically, then every backend numerically.

1. SymPy derives, for a softmax over a few classes with symbolic logits and targets:
   ``∂o_j/∂z_i = -o_j o_i`` (j ≠ i), ``∂o_i/∂z_i = o_i - o_i²``, and
   ``∂E/∂z_i = o_i Σ_j y_j - y_i`` for targets that need not sum to one; then the extensions
   ``∂(s·lse²)/∂z_i = 2 s lse o_i`` and ``d/dz c·tanh(αz/c) = α(1 - tanh²(αz/c))``.
2. Each available backend runs default random cases in float64 and is compared with
   :mod:`fastxent.reference` and with PyTorch's own ``F.cross_entropy`` composed with autograd;
   then ``linear_cross_entropy``'s token walk (on each backend's row kernel) and vocabulary walk,
   with every option at once, against the reference's and PyTorch's ``F.linear`` + loss.
3. The same in float32 for the backends whose float64 rows run another kernel (Triton's runs
   float64 on the portable one: ``FLOAT64_NOTES``), against the reference on the
   float32-rounded inputs, within ``FLOAT32_TOLERANCE`` (float32 arithmetic, not the float64
   tolerance). The other backends' float64 rows are their own kernels already; float32 rows
   for them too would compile every variant of the compiled kernel again (~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fastxent import reference
from fastxent._torch.composed import pytorch_cross_entropy
from fastxent.functional import (
    BACKENDS,
    cross_entropy,
    linear_cross_entropy,
    unavailable_reason,
)


def derivation_steps(num_classes: int = 3) -> list[tuple[str, bool]]:
    """Each step of the derivation, and whether SymPy proves it (the difference simplifies to 0)."""
    import sympy as sp

    z = sp.symbols(f"z0:{num_classes}", real=True)
    y = sp.symbols(f"y0:{num_classes}", real=True)  # arbitrary targets: Σy need not be 1
    s, c, a, x = sp.symbols("s c alpha x", positive=True)
    total = sum(sp.exp(zk) for zk in z)
    o = [sp.exp(zj) / total for zj in z]
    lse = sp.log(total)
    loss = -sum(yj * sp.log(oj) for yj, oj in zip(y, o, strict=True))
    i, j = 0, 1

    def proves(expr) -> bool:
        return sp.simplify(sp.expand_log(expr, force=True)) == 0

    softcap = c * sp.tanh(a * x / c)
    return [
        ("∂o_j/∂z_i = -o_j·o_i  (j ≠ i)", proves(sp.diff(o[j], z[i]) + o[j] * o[i])),
        ("∂o_i/∂z_i = o_i - o_i²", proves(sp.diff(o[i], z[i]) - (o[i] - o[i] ** 2))),
        (
            "∂E/∂z_i = o_i·Σ_j y_j - y_i  (any y)",
            proves(sp.diff(loss, z[i]) - (o[i] * sum(y) - y[i])),
        ),
        ("∂(s·lse²)/∂z_i = 2·s·lse·o_i", proves(sp.diff(s * lse**2, z[i]) - 2 * s * lse * o[i])),
        (
            "d/dz c·tanh(αz/c) = α(1 - tanh²(αz/c))",
            proves(sp.diff(softcap, x) - a * (1 - (softcap / c) ** 2)),
        ),
    ]


def torch_composed(
    z: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """The same loss built from PyTorch's ops: transform, ``F.cross_entropy``, plus the z-loss term.

    An independent oracle for fastxent's extras (PyTorch has no z-loss or softcap of its own).
    """
    zp = z * logit_scale if softcap is None else softcap * torch.tanh(logit_scale * z / softcap)
    loss = pytorch_cross_entropy(  # PyTorch's even where users replaced F.cross_entropy
        zp,
        target,
        weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if z_loss:
        lse = torch.logsumexp(zp, dim=0 if z.dim() == 1 else 1)
        counted = torch.ones_like(lse, dtype=torch.bool)
        if not target.is_floating_point():
            counted = target != ignore_index
        rows = torch.where(counted, z_loss * lse**2, 0.0)
        if reduction == "none":
            loss = loss + rows
        elif reduction == "sum":
            loss = loss + rows.sum()
        else:
            loss = loss + rows.sum() / counted.sum()
    return loss


@dataclass
class Case:
    """One default random case of ``fastxent check``."""

    name: str
    soft: bool = False
    kwargs: dict = field(default_factory=dict)
    weighted: bool = False
    rows: int = 64
    peaked: bool = False  # every fifth row's largest logit lies past its first 64 columns


CASES = [
    Case("index targets"),
    Case("soft targets (Σy ≠ 1)", soft=True),
    Case(
        "soft targets, class weights, smoothing 0.2",
        soft=True,
        weighted=True,
        kwargs={"label_smoothing": 0.2},
    ),
    Case("label smoothing 0.1", kwargs={"label_smoothing": 0.1}),
    Case("class weights + ignore_index", weighted=True, kwargs={"ignore_index": 3}),
    Case("z-loss 1e-4", kwargs={"z_loss": 1e-4}),
    Case("softcap 30, logit scale 0.5", kwargs={"softcap": 30.0, "logit_scale": 0.5}),
    Case("logit scale 1.7", kwargs={"logit_scale": 1.7}),
    Case(
        "sum, smoothing, z-loss",
        kwargs={"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-4},
    ),
    # 2^18 logits and more: the compiled backend's two-graph (split) gradient
    Case(
        "300 rows: weights, smoothing, logit scale",
        weighted=True,
        rows=300,
        kwargs={"label_smoothing": 0.1, "logit_scale": 0.8},
    ),
    Case("peaked rows (max past column 64)", peaked=True, kwargs={"label_smoothing": 0.1}),
]


def case_data(case: Case, v: int = 1000, seed: int = 0):
    """float64 logits, targets and weights for ``case``."""
    g = torch.Generator().manual_seed(seed)
    n = case.rows
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 4
    if case.peaked:  # the compiled kernel's shift suits none of these rows: they are redone
        z[::5, v - 1] = 400.0
    if case.soft:
        target = torch.rand(n, v, generator=g, dtype=torch.float64)
    else:
        target = torch.randint(0, v, (n,), generator=g)
        target[::7] = case.kwargs.get("ignore_index", -100)
    weight = torch.rand(v, generator=g, dtype=torch.float64) + 0.5 if case.weighted else None
    return z, target, weight


# What a backend's float64 rows actually exercise, where that is not its own kernel.
FLOAT64_NOTES = {"triton": "the triton backend runs float64 on the portable kernel"}
# float32 rows: relative to the largest magnitude, a kernel's float32 arithmetic (float32
# accumulation over ~1000 classes and 64-300 rows) against float64 on the same rounded inputs.
# On these cases the CPU kernels (torch, compiled) and Triton's interpreter stay below 2e-6.
FLOAT32_TOLERANCE = 1e-5


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (absolute when want is all zero)."""
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got - want).max()) / scale


def error_rows(
    device: str = "cpu", dtype: torch.dtype = torch.float64, backends: tuple[str, ...] = BACKENDS
) -> Iterator[tuple[str, str, float | None, float | None, str]]:
    """(backend, case, error vs reference, error vs PyTorch, note) for each of ``backends`` and
    every case, the inputs rounded to ``dtype`` (the reference computes on the rounded values)."""
    dev = torch.device(device)
    notes = FLOAT64_NOTES if dtype == torch.float64 else {}
    for backend in backends:
        reason = unavailable_reason(backend, dev)
        if reason is not None:
            yield backend, "every case", None, None, f"skipped: {reason}"
            continue
        for case in CASES:
            z, target, weight = case_data(case)
            z = z.to(dev, dtype)
            target = target.to(dev, dtype) if case.soft else target.to(dev)
            weight = None if weight is None else weight.to(dev, dtype)
            want_loss, want_grad = reference.cross_entropy(
                z.double().cpu().numpy(),
                target.double().cpu().numpy() if case.soft else target.cpu().numpy(),
                None if weight is None else weight.double().cpu().numpy(),
                **case.kwargs,
            )
            mine = z.clone().requires_grad_()
            loss = cross_entropy(mine, target, weight, backend=backend, **case.kwargs)
            loss.backward()
            theirs = z.clone().requires_grad_()
            their_loss = torch_composed(theirs, target, weight, **case.kwargs)
            their_loss.backward()
            got_loss, got_grad = (x.double().cpu().numpy() for x in (loss.detach(), mine.grad))
            vs_ref = max(relative_error(got_loss, want_loss), relative_error(got_grad, want_grad))
            vs_torch = max(
                relative_error(got_loss, their_loss.detach().double().cpu().numpy()),
                relative_error(got_grad, theirs.grad.double().cpu().numpy()),
            )
            yield backend, case.name, vs_ref, vs_torch, notes.get(backend, "")
        for case_name, vs_ref, vs_torch in linear_error_rows(backend, dev, dtype):
            yield backend, case_name, vs_ref, vs_torch, notes.get(backend, "")


# linear_cross_entropy's walks: the token walk runs each backend's row kernel, the vocabulary
# walk its own block math (listed under "torch").
LINEAR_WALKS = {
    "token walk, chunks of 7": {"chunk_size": 7},
    "vocab walk, blocks of 128": {"vocab_block": 128},
}
LINEAR_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0, "shift": True}


def linear_error_rows(
    backend: str, dev: torch.device, dtype: torch.dtype = torch.float64
) -> Iterator[tuple[str, float, float]]:
    """(case, error vs reference, error vs PyTorch) of ``linear_cross_entropy``'s walks: hidden
    (3, 11, 16), weight (1000, 16), bias, class weights, ignored targets, LINEAR_OPTIONS; the
    worst of the loss, ∂h, ∂W and ∂b. The inputs are rounded to ``dtype``."""
    g = torch.Generator().manual_seed(1)
    hidden, weight, bias = (
        x.to(dtype).double()
        for x in (
            torch.randn(3, 11, 16, generator=g, dtype=torch.float64),
            torch.randn(1000, 16, generator=g, dtype=torch.float64) * 0.5,
            torch.randn(1000, generator=g, dtype=torch.float64),
        )
    )
    target = torch.randint(0, 1000, (3, 11), generator=g)
    target[:, ::4] = -100
    class_weight = (torch.rand(1000, generator=g, dtype=torch.float64) + 0.5).to(dtype).double()
    want = reference.linear_cross_entropy(
        *(x.numpy() for x in (hidden, weight, bias, target)),
        class_weight=class_weight.numpy(),
        **LINEAR_OPTIONS,
    )
    leaves = [x.to(dev, dtype).requires_grad_() for x in (hidden, weight, bias)]
    class_weight = class_weight.to(dev, dtype)
    h, y = leaves[0][:, :-1], target[:, 1:].to(dev)
    loss = torch_composed(
        torch.nn.functional.linear(h, *leaves[1:]).flatten(0, 1),
        y.flatten(),
        class_weight,
        **{k: v for k, v in LINEAR_OPTIONS.items() if k != "shift"},
    )
    loss.backward()
    theirs = [loss.detach(), *(x.grad for x in leaves)]
    walks = LINEAR_WALKS if backend == "torch" else dict(list(LINEAR_WALKS.items())[:1])
    for name, walk in walks.items():
        mine = [x.detach().clone().requires_grad_() for x in leaves]
        loss = linear_cross_entropy(
            mine[0], mine[1], target.to(dev), mine[2], class_weight=class_weight,
            backend=backend, **walk, **LINEAR_OPTIONS,
        )  # fmt: skip
        loss.backward()
        got = [loss.detach(), *(x.grad for x in mine)]
        got = [x.double().cpu().numpy() for x in got]
        vs_ref = max(relative_error(a, np.asarray(b)) for a, b in zip(got, want, strict=True))
        vs_torch = max(
            relative_error(a, b.double().cpu().numpy()) for a, b in zip(got, theirs, strict=True)
        )
        yield f"linear: {name}", vs_ref, vs_torch


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run the numeric checks (``cpu``, ``cuda``, ``cuda:N``), or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # not a device string torch can parse
        dev = None
    # "cpu:0" names the same CPU; refused so that one spelling means it
    if (
        dev is None
        or dev.type not in ("cpu", "cuda")
        or (dev.type == "cpu" and dev.index is not None)
    ):
        return f"must be cpu, cuda or cuda:N, got {device!r}"
    if dev.type == "cpu":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"{device!r} was asked for, but torch sees no CUDA device"
    if dev.index is not None and dev.index >= count:
        return f"{device!r} was asked for, but torch sees only {count} CUDA device(s)"
    return None


def tolerance_problem(tolerance: float) -> str | None:
    """Why ``tolerance`` is not a usable max relative error (a finite number > 0), or None."""
    if not (math.isfinite(tolerance) and tolerance > 0):
        return f"must be a finite number > 0, got {tolerance!r}"
    return None


def device_arg(text: str) -> str:
    """``argparse`` type of ``--device``: the device, or a usage error saying what is wrong."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def tolerance_arg(text: str) -> float:
    """``argparse`` type of ``--tolerance``: a finite float > 0, or a usage error."""
    try:
        tolerance = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    problem = tolerance_problem(tolerance)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return tolerance


def run(device: str = "cpu", tolerance: float = 1e-10) -> int:
    """Print the derivation and the error table; return 0 when everything holds.

    Raises:
        ValueError: ``device`` is not one the checks can run on (or has no CUDA), or
            ``tolerance`` is not a finite number > 0.
    """
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(f"device {problem}")
    problem = tolerance_problem(tolerance)
    if problem is not None:
        raise ValueError(f"tolerance {problem}")
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ok = True
    console.print("[bold]Symbolic derivation[/bold] (SymPy, 3 classes, symbolic targets)")
    for step, proved in derivation_steps():
        ok &= proved
        console.print(f"  {'[green]✓[/green]' if proved else '[red]✗[/red]'} {step}")

    tables = (
        (torch.float64, tolerance, BACKENDS),
        (torch.float32, FLOAT32_TOLERANCE, tuple(FLOAT64_NOTES)),
    )
    shown: set[str] = set()  # notes printed already: a later table refers to them
    for dtype, bound, backends in tables:
        name = str(dtype).removeprefix("torch.")
        rows = list(error_rows(device, dtype, backends))
        if all(vs_ref is None for _, _, vs_ref, _, _ in rows):  # nothing ran: no table
            for backend, _, _, _, note in rows:
                said = "skipped, as above" if note in shown else note
                console.print(f"{name} on {device}, {backend}: {said}")
            continue
        table = Table(
            title=f"max relative error in {name} on {device}, PyTorch's in {name} too (loss "
            f"and gradient; passes at {bound:.0e})"
        )
        for column in ("ok", "backend", "case", "vs float64", "vs PyTorch", "note"):
            table.add_column(column)
        notes: dict[str, int] = {}  # long notes go under the table, numbered once each
        for backend, case, vs_ref, vs_torch, note in rows:
            passed = vs_ref is None or (vs_ref <= bound and vs_torch <= bound)
            ok &= passed
            result = "–" if vs_ref is None else "✓" if passed else "✗"  # where red is not shown
            cells = ["—" if e is None else f"{e:.1e}" for e in (vs_ref, vs_torch)]
            if note:
                note = f"({notes.setdefault(note, len(notes) + 1)})"
            table.add_row(result, backend, case, *cells, note, style="" if passed else "red")
        console.print(table)
        for note, number in notes.items():
            console.print(f"({number}) {note}")
        shown.update(notes)
    console.print("[green]all checks passed[/green]" if ok else "[red]some checks failed[/red]")
    return 0 if ok else 1
