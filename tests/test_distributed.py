"""Vocab-parallel cross-entropy and DDP training over gloo, against the float64 oracle.

Two process groups are spawned (2 and 3 ranks on CPU); each runs every case, writes its loss and
gradient slice to a file, and the test process compares them with :mod:`fastxent.reference` on
the full logits. Error cases run inside the workers with ``pytest.raises``; those detected by the
layout all-gather pass ``validate=True``, since the layout of the group is cached by then. Bad
input on one rank only runs on two more ranks, whose collectives time out after a few seconds:
every rank must raise (none may be left waiting in a collective).
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastxent
from fastxent import reference
from fastxent.distributed import vocab_parallel_cross_entropy
from versions import TORCH, newer_torch

pytestmark = pytest.mark.distributed

WORLDS = (2, 3)
# Uneven slices of V = 1001, in rank order: one rank of world 3 holds a single class.
SHARDS = {2: (400, 601), 3: (500, 1, 500)}


@dataclass(frozen=True)
class Case:
    name: str
    options: dict = field(default_factory=dict)
    shape: tuple[int, ...] = (13,)  # rows of the target; the logits add the class dim
    vocab: int = 1001
    weight: bool = False
    ignored: int = 2  # rows whose target is ignore_index
    scale: float = 3.0  # logit spread
    dtype: torch.dtype = torch.float64
    reversed_slices: bool = False  # rank r holds the r-th slice from the END (vocab_start given)
    inplace: bool = False
    requires_grad: bool = True
    masked: bool = False  # row 0 is -inf on the whole slice of the last rank; ignored row 1 at 0
    nonfinite: bool = False  # NaN in ignored rows 0 and 1 and counted row 5, +inf in counted row 6
    grad_mode: str = "enabled"  # or the context the call runs in: "no_grad", "inference_mode"
    offset: float = 0.0  # added to every logit: float32 keeps its precision relative to the max
    # Rows of -inf on every rank (0 and 1 are ignored rows). With any, row 6 is -inf on rank 0's
    # slice and 1e3 lower elsewhere, so that the factor e^{m_r - lse} of rank 0 overflows.
    dead: tuple[int, ...] = ()


CASES = [
    Case("mean"),
    Case("smoothing", {"label_smoothing": 0.1}),
    Case("weight_smoothing", {"label_smoothing": 0.3}, weight=True),
    Case(
        "zloss_softcap_scale",
        {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "logit_scale": 1.3},
        weight=True,
    ),
    Case("sum_weight", {"reduction": "sum", "z_loss": 1e-3}, weight=True),
    Case(
        "none_grad_output",
        {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0},
        weight=True,
    ),
    Case("ignore_valid_class", {"ignore_index": 3, "label_smoothing": 0.1}, ignored=3),
    Case("all_ignored", {"label_smoothing": 0.1, "z_loss": 1e-2}, weight=True, ignored=13),
    Case("btv", {"label_smoothing": 0.1, "z_loss": 1e-3}, shape=(3, 5)),
    Case("btv_none", {"reduction": "none"}, shape=(2, 4), weight=True),
    Case("reversed_slices", {"label_smoothing": 0.1}, weight=True, reversed_slices=True),
    Case("inplace", {"label_smoothing": 0.1, "z_loss": 1e-3}, inplace=True),
    Case("forward_only", {"label_smoothing": 0.1}, weight=True, requires_grad=False),
    Case("inference_mode", {"label_smoothing": 0.1}, weight=True, grad_mode="inference_mode"),
    Case("large_logits", {"label_smoothing": 0.1, "z_loss": 1e-4}, scale=60.0),
    Case("small_vocab", {"label_smoothing": 0.2}, vocab=7, shape=(5,), weight=True),
    Case("masked_slice", {}, masked=True),
    Case("nonfinite", {"reduction": "none", "z_loss": 1e-3}, nonfinite=True),
    # Rows of -inf logits: NaN gradient (ignored rows too) and loss (counted rows), as PyTorch.
    Case("dead_rows", {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-3}, dead=(0, 5)),
    Case("dead_rows_float32", {}, weight=True, dtype=torch.float32, dead=(0,)),
    Case(
        "dead_rows_inplace", {"reduction": "none"}, dtype=torch.float32, inplace=True, dead=(0, 5)
    ),
    Case("dead_rows_bfloat16", {"reduction": "none"}, dtype=torch.bfloat16, dead=(0, 5)),
    Case(
        "float32",
        {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
        weight=True,
        dtype=torch.float32,
    ),
    Case(
        "float32_offset",
        {"label_smoothing": 0.1},
        weight=True,
        dtype=torch.float32,
        offset=1e4,
    ),
    # The gradient is recomputed in pass 2 (not kept from pass 1) for these two.
    Case("inplace_softcap", {"label_smoothing": 0.1, "softcap": 4.0}, weight=True, inplace=True),
    Case(
        "bfloat16",
        {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
        weight=True,
        dtype=torch.bfloat16,
    ),
    # float16: each rank writes its slice relative to the same carried weight (deferred_factor).
    Case(
        "float16_sum",
        {"reduction": "sum", "label_smoothing": 0.1},
        weight=True,
        dtype=torch.float16,
    ),
    Case("float16_none", {"reduction": "none", "z_loss": 1e-3}, weight=True, dtype=torch.float16),
]
# (loss, gradient) tolerances against the float64 reference on the same (rounded) logits: the
# loss accumulates in float32 below float64; a bf16 gradient is rounded once to 8 bits.
TOLERANCE = {
    torch.float64: ({"rtol": 1e-12, "atol": 1e-15}, {"rtol": 1e-12, "atol": 1e-15}),
    torch.float32: ({"rtol": 2e-6, "atol": 0}, {"rtol": 2e-5, "atol": 1e-7}),
    torch.bfloat16: ({"rtol": 2e-6, "atol": 0}, {"rtol": 8e-3, "atol": 1e-6}),
    torch.float16: ({"rtol": 2e-6, "atol": 0}, {"rtol": 1e-3, "atol": 1e-7}),
}


def shard_sizes(case: Case, world: int) -> tuple[int, ...]:
    if case.vocab == 1001:
        return SHARDS[world]
    return tuple(len(s) for s in torch.arange(case.vocab).tensor_split(world))


def slices(case: Case, world: int) -> list[tuple[int, int]]:
    """``(vocab_start, size)`` of every rank."""
    sizes = shard_sizes(case, world)
    order = range(world - 1, -1, -1) if case.reversed_slices else range(world)
    starts, at = {}, 0
    for r in order:
        starts[r] = at
        at += sizes[r]
    return [(starts[r], sizes[r]) for r in range(world)]


def make_case(case: Case, world: int):
    """The full float64 logits (*shape, V), targets, weights and grad_output of ``case``."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    z = torch.randn(*case.shape, case.vocab, generator=g, dtype=torch.float64) * case.scale
    z += case.offset
    y = torch.randint(0, case.vocab, case.shape, generator=g).reshape(-1)
    ignore_index = case.options.get("ignore_index", -100)
    # Targets on slice borders: the first and last class of every rank.
    borders = [s for start, size in slices(case, world) for s in (start, start + size - 1)]
    y[case.ignored : case.ignored + len(borders)] = torch.tensor(borders)[: len(y) - case.ignored]
    y[: case.ignored] = ignore_index
    if case.masked:
        start, size = slices(case, world)[-1]
        z.reshape(-1, case.vocab)[0, start : start + size] = float("-inf")
        y[0] = 0
        z.reshape(-1, case.vocab)[1, 0] = float("-inf")  # ignored row 1, masked where it is read
    if case.dead:
        rows = z.reshape(-1, case.vocab)
        rows[list(case.dead)] = float("-inf")
        start, size = slices(case, world)[0]
        rows[6] -= 1e3
        rows[6, start : start + size] = float("-inf")
        y[6] = case.vocab - 1  # on the last rank's slice
    if case.nonfinite:  # each on a different rank's slice: the first, the last, the first
        rows = z.reshape(-1, case.vocab)
        rows[0, 0] = rows[1, case.vocab - 1] = rows[5, 3] = float("nan")
        rows[6, case.vocab - 2] = float("inf")
    weight = torch.rand(case.vocab, generator=g, dtype=torch.float64) + 0.5 if case.weight else None
    grad_output = None
    if case.options.get("reduction") == "none":
        grad_output = torch.rand(case.shape, generator=g, dtype=torch.float64) * 2 - 0.5
    return z, y.reshape(case.shape), weight, grad_output


# --------------------------------------------------------------------------- worker processes


def init_gloo(rank: int, world: int, init_file: str, timeout_s: float) -> None:
    """This process as ``rank`` of a ``world``-rank gloo group (one torch thread)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def leave_gloo() -> None:
    """``destroy_process_group()``, first letting gloo's threads free their finished work.

    Before PyTorch's fix (pytorch/pytorch #154976, June 2025: 2.8) the group's destructor held
    the GIL while it joined gloo's threads, and one of them could be waiting for the GIL to free
    a tensor of a finished collective whose Python object was gone (any function's temporaries:
    plain collectives on them hung the same way): rank 1 hung there in 3 runs of 8 on torch
    2.4.1, never in 20 with the pause."""
    if TORCH < (2, 8):
        time.sleep(0.2)
    dist.destroy_process_group()


def run_worker(rank, world, init_file, out_dir, cases, run_case, error_cases, extra) -> None:
    """One rank of a gloo group: every case, every error check, then ``extra`` -> rank{r}.pt."""
    init_gloo(rank, world, init_file, 30)
    results: dict = {"cases": {}, "errors": {}}
    for case in cases:
        results["cases"][case.name] = run_case(case, rank, world)
    for name, check in error_cases.items():
        try:
            check(rank, world)
            results["errors"][name] = None
        except BaseException:  # pytest.raises failing raises a BaseException
            results["errors"][name] = traceback.format_exc()
    results.update(extra(rank, world))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    leave_gloo()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_worker(rank, world, init_file, out_dir, CASES, _run_case, ERROR_CASES, _extra)


def _extra(rank: int, world: int) -> dict:
    extra = {"collectives": _collectives(rank, world)}
    if world == 2:
        extra["ddp"] = _ddp_training(rank)
    return extra


def _run_case(case: Case, rank: int, world: int) -> dict:
    z, y, weight, grad_output = make_case(case, world)
    start, size = slices(case, world)[rank]
    leaf = z[..., start : start + size].to(case.dtype).requires_grad_(case.requires_grad)
    if case.grad_mode != "enabled":  # contiguous: reshaped in there, it still requires grad
        leaf = leaf.detach().contiguous().requires_grad_()
    local = leaf * 1.0 if case.inplace else leaf  # in-place needs a non-leaf
    w = None if weight is None else weight.to(case.dtype)
    grad_mode = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with grad_mode.get(case.grad_mode, contextlib.nullcontext)():  # logits that require grad
        loss = vocab_parallel_cross_entropy(
            local,
            y,
            weight=w,
            vocab_start=start if case.reversed_slices else None,
            inplace_backward=case.inplace,
            **case.options,
        )
    if case.requires_grad and case.grad_mode == "enabled":
        loss.backward(None if grad_output is None else grad_output.to(loss.dtype))
    return {"loss": loss.detach(), "grad": None if leaf.grad is None else leaf.grad.detach()}


def _raises_everywhere(exc, match, call):
    """A check that runs ``call(rank, world)`` expecting ``exc`` with ``match`` on every rank."""

    def check(rank: int, world: int) -> None:
        with pytest.raises(exc, match=match):
            call(rank, world)

    return check


def _under_forward_ad(call, x: torch.Tensor):
    """``call`` on ``x`` made a dual tensor of forward-mode AD (tangent of ones)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return call(fwAD.make_dual(x, torch.ones_like(x)))


def _local(rank: int, world: int, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, SHARDS[world][rank], dtype=torch.float64)


_y = torch.tensor([0, 5, 1000, 7])
ERROR_CASES = {
    "target_shape": _raises_everywhere(
        ValueError,
        r"target must have shape \(4,\)",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), _y[:3]),
    ),
    "probability_target": _raises_everywhere(
        TypeError,
        "probability targets are not supported",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), _local(r, w)),
    ),
    "uint64_target": _raises_everywhere(
        TypeError,
        r"class indices \(an int64 tensor\) as target, got dtype torch.uint64\.$",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), _y.to(torch.uint64)),
    ),
    "target_out_of_range": _raises_everywhere(
        IndexError,
        r"target\[2\] = 1001 is out of range: the input has 1001 classes",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), torch.tensor([0, 5, 1001, 7])),
    ),
    "negative_target": _raises_everywhere(
        IndexError,
        r"target\[0\] = -1 is out of range",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), torch.tensor([-1, 5, 9, 7])),
    ),
    "targets_differ": _raises_everywhere(
        ValueError,
        "target must be the same on every rank",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), (_y + r) % 1001, validate=True),
    ),
    # Same Σy, Σy², Σ i·y, least and largest: only the positions' mix tells them apart.
    "targets_differ_in_order": _raises_everywhere(
        ValueError,
        "target must be the same on every rank",
        lambda r, w: vocab_parallel_cross_entropy(
            _local(r, w, 5), torch.tensor([[0, 0, 0, 2, 1], [0, 0, 1, 0, 2]][r % 2]), validate=True
        ),
    ),
    "dual_logits": _raises_everywhere(
        TypeError,
        "runs fastxent's kernels only, which take plain tensors",
        lambda r, w: _under_forward_ad(
            lambda dual: vocab_parallel_cross_entropy(dual, _y % 100), _local(r, w)
        ),
    ),
    "rows_differ": _raises_everywhere(
        ValueError,
        "same rows",
        lambda r, w: vocab_parallel_cross_entropy(
            _local(r, w, 4 + r), torch.zeros(4 + r).long(), validate=True
        ),
    ),
    "vocab_start_overlap": _raises_everywhere(
        ValueError,
        r"must tile \[0, 1001\) without gap or overlap",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), _y, vocab_start=0, validate=True),
    ),
    "vocab_start_on_some_ranks": _raises_everywhere(
        ValueError,
        "vocab_start must be given on every rank or on none",
        lambda r, w: vocab_parallel_cross_entropy(
            _local(r, w), _y, vocab_start=None if r else 0, validate=True
        ),
    ),
    "vocab_start_negative": _raises_everywhere(
        ValueError,
        "vocab_start must be None or an int >= 0, got -3",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), _y, vocab_start=-3),
    ),
    "local_weight": _raises_everywhere(
        ValueError,
        r"weight must have shape \(1001,\)",
        lambda r, w: vocab_parallel_cross_entropy(
            _local(r, w), _y, weight=torch.ones(SHARDS[w][r], dtype=torch.float64)
        ),
    ),
    "empty_shard": _raises_everywhere(  # the last rank holds no class: no rank may hang
        ValueError,
        "every rank must hold at least one class",
        lambda r, w: vocab_parallel_cross_entropy(
            torch.randn(4, 0 if r == w - 1 else 11, dtype=torch.float64),  # 11: no cached layout
            torch.tensor([0, 1, 2, 0]),
        ),
    ),
    "one_dim_logits": _raises_everywhere(
        ValueError,
        r"shape \(N, V_local\)",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w)[0], _y[0]),
    ),
    "inplace_on_leaf": _raises_everywhere(
        ValueError,
        "would overwrite a leaf tensor",
        lambda r, w: vocab_parallel_cross_entropy(
            _local(r, w).requires_grad_(), _y, inplace_backward=True
        ),
    ),
    "bad_reduction": _raises_everywhere(
        ValueError,
        "reduction must be one of",
        lambda r, w: vocab_parallel_cross_entropy(_local(r, w), _y, reduction="avg"),
    ),
}


# --------------------------------------------------------------------------- bad input on one rank

# Every collective of these checks gives up after CHECK_TIMEOUT, so that a rank left waiting for
# one that raised fails its check in seconds; the whole run is killed after ONE_RANK_DEADLINE.
CHECK_TIMEOUT = timedelta(seconds=5)
ONE_RANK_DEADLINE = 240.0
# Each check runs as the first call on a fresh group (whose layout every rank all-gathers), and
# with validate=True on a group whose layout is cached.
MODES = ("first_call", "validate")
ELSEWHERE = "rank 1 of the group passed inputs that failed its checks"


def bad_on_rank_1(exc, own, others, call):
    """A check of ``call(rank, world, group, validate, bad)`` with bad input on rank 1 only: every
    rank raises ``exc``, rank 1 its own error (matching ``own``), the others one matching
    ``others``. A good call with validate=True follows on the same group: it all-gathers, so it
    fails unless every rank left the bad call at the same point."""

    def check(rank: int, world: int, group, validate: bool) -> None:
        if validate:  # cache the group's layout: then only validate=True makes the all-gather
            call(rank, world, group, False, False)
        with pytest.raises(exc, match=own if rank == 1 else others):
            call(rank, world, group, validate, rank == 1)
        call(rank, world, group, True, False)

    return check


def run_one_rank_worker(rank: int, world: int, init_file: str, out_dir: str, checks) -> None:
    """One rank: every check of ``checks`` in every mode, each on a new group -> rank{r}.pt."""
    init_gloo(rank, world, init_file, 60)
    results = {}
    for name, check in checks.items():
        for mode in MODES:
            group = dist.new_group(list(range(world)), timeout=CHECK_TIMEOUT)
            try:
                check(rank, world, group, mode == "validate")
                results[name, mode] = None
            except BaseException:  # pytest.raises failing raises a BaseException
                results[name, mode] = traceback.format_exc()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    leave_gloo()


def spawn_with_deadline(base: Path, worker, world: int) -> list[dict]:
    """Per-rank results of ``worker`` on ``world`` spawned ranks; the ranks are killed and the test
    fails if they have not finished after ONE_RANK_DEADLINE seconds."""
    context = mp.spawn(
        worker, args=(world, str(base / "init"), str(base)), nprocs=world, join=False
    )
    deadline = time.monotonic() + ONE_RANK_DEADLINE
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # raises if one raised
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"the {world} ranks did not finish in {ONE_RANK_DEADLINE} s")
    return [torch.load(base / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _ce_call(bad: dict, weight=None):
    """``call`` for :func:`bad_on_rank_1`: vocab_parallel_cross_entropy of the rank's logits, _y
    and ``weight``, where ``bad`` (argument name -> f(rank, world)) replaces those of a bad rank."""

    def call(rank: int, world: int, group, validate: bool, is_bad: bool) -> None:
        args = {"local_logits": _local(rank, world), "target": _y, "weight": weight}
        if is_bad:
            args.update({name: value(rank, world) for name, value in bad.items()})
        vocab_parallel_cross_entropy(**args, group=group, validate=validate)

    return call


_ones = torch.ones(1001, dtype=torch.float64)
ONE_RANK_CASES = {
    "target_shape": bad_on_rank_1(
        ValueError,
        r"target must have shape \(4,\)",
        ELSEWHERE,
        _ce_call({"target": lambda r, w: _y[:3]}),
    ),
    "probability_target": bad_on_rank_1(
        TypeError,
        "probability targets are not supported",
        ELSEWHERE,
        _ce_call({"target": _local}),
    ),
    "logits_not_a_tensor": bad_on_rank_1(
        TypeError,
        "local_logits must be a torch.Tensor, got list",
        ELSEWHERE,
        _ce_call({"local_logits": lambda r, w: [[0.0]]}),
    ),
    "bad_reduction": bad_on_rank_1(
        ValueError,
        "reduction must be one of",
        ELSEWHERE,
        _ce_call({"reduction": lambda r, w: "avg"}),
    ),
    "options_differ": bad_on_rank_1(  # gloo aborted the process, or ranks disagreed silently
        ValueError,
        r"the scalar options \(reduction, .*\) must be the same on every rank",
        r"the scalar options \(reduction, .*\) must be the same on every rank",
        _ce_call({"label_smoothing": lambda r, w: 0.1}),
    ),
    "vocab_start_negative": bad_on_rank_1(
        ValueError,
        "vocab_start must be None or an int >= 0, got -3",
        ELSEWHERE,
        _ce_call({"vocab_start": lambda r, w: -3}),
    ),
    "target_out_of_range": bad_on_rank_1(
        IndexError,
        r"target\[2\] = 1001 is out of range: the input has 1001 classes",
        r"rank 1 of the group passed a target with class indices outside \[0, 1001\)",
        _ce_call({"target": lambda r, w: torch.tensor([0, 5, 1001, 7])}),
    ),
    "weight_length": bad_on_rank_1(
        ValueError,
        r"weight must have shape \(1001,\), one weight per class, got shape \(601,\)",
        r"rank 1 of the group passed a weight that does not have shape \(1001,\)",
        _ce_call({"weight": lambda r, w: _ones[: SHARDS[w][r]]}, _ones),
    ),
    "weight_on_one_rank": bad_on_rank_1(
        ValueError,
        r"weight must be given on every rank or on none .* got lengths \[-1, 1001\]",
        r"weight must be given on every rank or on none .* got lengths \[-1, 1001\]",
        _ce_call({"weight": lambda r, w: _ones}),
    ),
    "logits_dtype": bad_on_rank_1(
        TypeError,
        r"local_logits must have the same dtype on every rank of the group; got "
        r"\[torch.float64, torch.float32\] on ranks 0..1",
        r"local_logits must have the same dtype on every rank of the group; got "
        r"\[torch.float64, torch.float32\] on ranks 0..1",
        _ce_call({"local_logits": lambda r, w: _local(r, w).float()}),
    ),
}


def _one_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_one_rank_worker(rank, world, init_file, out_dir, ONE_RANK_CASES)


def count_collectives(call) -> dict[str, int]:
    """How many ``all_gather`` and ``all_reduce`` calls ``call()`` makes (torch.distributed's)."""
    counts = {"all_gather": 0, "all_reduce": 0}

    def counted(name: str):
        original = getattr(dist, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in counts:
            patch.setattr(dist, name, counted(name))
        call()
    return counts


def _collectives(rank: int, world: int) -> dict[str, dict[str, int]]:
    """Collectives of forward + backward ("mean") on a fresh group: first call, later, validate."""
    group = dist.new_group(list(range(world)))  # a layout key no earlier call has used
    y = torch.tensor([0, 5, 1000, 7, -100])

    def call(**kwargs):
        local = _local(rank, world, rows=5).requires_grad_()
        vocab_parallel_cross_entropy(
            local, y, group=group, label_smoothing=0.1, **kwargs
        ).backward()

    return {
        "first": count_collectives(call),
        "second": count_collectives(call),
        "validate": count_collectives(lambda: call(validate=True)),
        "after_validate": count_collectives(call),
    }


def _ddp_training(rank: int) -> dict:
    """Train the same tiny model with fastxent and with PyTorch's loss under DDP; final params."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    params = {}
    for name, loss_fn in {
        "fastxent": functools.partial(fastxent.cross_entropy, backend="torch"),
        "torch": F.cross_entropy,
    }.items():
        torch.manual_seed(0)  # same initial model on every rank and for both losses
        net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 11)
        ).double()
        model = DDP(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(4):
            x = torch.randn(6, 8, generator=g, dtype=torch.float64)
            y = torch.randint(0, 11, (6,), generator=g)
            y[0] = -100
            opt.zero_grad()
            loss_fn(model(x), y, label_smoothing=0.1).backward()
            opt.step()
        params[name] = [p.detach().clone() for p in net.parameters()]
    torch.manual_seed(0)
    params["initial"] = [
        p.detach().clone()
        for p in torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 11)
        )
        .double()
        .parameters()
    ]
    return params


# --------------------------------------------------------------------------- test process


def spawn_groups(base: Path, worker) -> dict[int, list[dict]]:
    """World size -> per-rank results of ``worker``; every group of WORLDS starts at once."""
    contexts = {}
    for world in WORLDS:
        (base / str(world)).mkdir()
        contexts[world] = mp.spawn(
            worker,
            args=(world, str(base / str(world) / "init"), str(base / str(world))),
            nprocs=world,
            join=False,
        )
    for context in contexts.values():
        while not context.join():  # raises if a worker raised
            pass
    return {
        world: [
            torch.load(base / str(world) / f"rank{r}.pt", weights_only=False) for r in range(world)
        ]
        for world in WORLDS
    }


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict[int, list[dict]]:
    """World size -> per-rank results. Both process groups start at once and run every case."""
    return spawn_groups(tmp_path_factory.mktemp("dist"), _worker)


@pytest.fixture(scope="module")
def one_rank_spawned(tmp_path_factory) -> list[dict]:
    """Per-rank results of the bad-input-on-rank-1 checks, on 2 ranks."""
    return spawn_with_deadline(tmp_path_factory.mktemp("dist_one_rank"), _one_rank_worker, 2)


def _reference(case: Case, world: int):
    """Loss and full gradient of ``case`` (the full logits), float64."""
    z, y, weight, grad_output = make_case(case, world)
    z = z.to(case.dtype).double()  # the logits and weights the ranks see
    weight = None if weight is None else weight.to(case.dtype).double()
    if case.masked or case.nonfinite or case.dead:  # PyTorch's autograd: non-finite logits
        zz = z.clone().requires_grad_()
        options = {k: v for k, v in case.options.items() if k != "z_loss"}
        loss = F.cross_entropy(zz.reshape(-1, case.vocab), y.reshape(-1), weight, **options)
        if case.options.get("z_loss"):  # s·lse² on counted rows, as fastxent defines it ("none")
            counted = y.reshape(-1) != case.options.get("ignore_index", -100)
            lse = torch.logsumexp(zz.reshape(-1, case.vocab), dim=1)
            loss = loss + torch.where(counted, case.options["z_loss"] * lse.square(), 0.0)
        loss.backward(None if grad_output is None else grad_output.reshape(loss.shape))
        if options.get("reduction") == "none":
            loss = loss.reshape(y.shape)
        return loss.detach().numpy(), zz.grad.numpy()
    options = {k: v for k, v in case.options.items()}
    loss, grad = reference.cross_entropy(
        z.reshape(-1, case.vocab).numpy(),
        y.reshape(-1).numpy(),
        None if weight is None else weight.numpy(),
        grad_output=None if grad_output is None else grad_output.reshape(-1).numpy(),
        **options,
    )
    return loss.reshape(y.shape if case.options.get("reduction") == "none" else ()), grad.reshape(
        z.shape
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_matches_reference(spawned, world, case):
    """Every rank's loss equals the single-process float64 loss; its gradient equals its slice."""
    ranks = spawned[world]
    want_loss, want_grad = _reference(case, world)
    loss_tol, grad_tol = TOLERANCE[case.dtype]
    for rank, result in enumerate(ranks):
        got = result["cases"][case.name]
        assert got["loss"].dtype == (
            torch.float64 if case.dtype == torch.float64 else torch.float32
        )
        np.testing.assert_allclose(got["loss"].double().numpy(), want_loss, **loss_tol)
        # Every rank returns exactly the same loss.
        first = ranks[0]["cases"][case.name]["loss"]
        torch.testing.assert_close(got["loss"], first, rtol=0, atol=0, equal_nan=True)
        if not case.requires_grad or case.grad_mode != "enabled":
            assert got["grad"] is None
            continue
        start, size = slices(case, world)[rank]
        assert got["grad"].dtype == case.dtype
        want = want_grad[..., start : start + size]
        np.testing.assert_allclose(got["grad"].double().numpy(), want, **grad_tol)
    if case.name == "all_ignored":
        assert float(want_loss) == 0.0 and not want_grad.any()


@pytest.mark.parametrize("case", [c for c in CASES if c.dead], ids=lambda c: c.name)
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_dead_rows_match_single_device(spawned, world, case):
    """Rows of -inf logits: every rank's loss and gradient slice have the NaNs, and the values, of
    single-device fastxent.cross_entropy on the full logits in the same dtype."""
    z, y, weight, grad_output = make_case(case, world)
    full = z.to(case.dtype).requires_grad_()
    w = None if weight is None else weight.to(case.dtype)
    loss = fastxent.cross_entropy(full, y, w, **case.options)
    loss.backward(None if grad_output is None else grad_output.to(loss.dtype))
    assert full.grad[0].isnan().all()  # the ignored row of -inf logits
    loss_tol, grad_tol = TOLERANCE[case.dtype]
    if case.dtype == torch.bfloat16:  # two roundings to bf16 of float32 values computed two ways
        grad_tol = {"rtol": 2 * 2**-7, "atol": 1e-6}  # 2 units in the last place
    for rank, result in enumerate(spawned[world]):
        got = result["cases"][case.name]
        start, size = slices(case, world)[rank]
        want = full.grad[..., start : start + size]
        torch.testing.assert_close(got["loss"], loss.detach(), equal_nan=True, **loss_tol)
        torch.testing.assert_close(got["grad"], want, equal_nan=True, **grad_tol)


@pytest.mark.parametrize("name", list(ERROR_CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_errors(spawned, world, name):
    """Each bad call raises the expected error on every rank (and no rank hangs)."""
    for rank, result in enumerate(spawned[world]):
        assert result["errors"][name] is None, f"rank {rank}:\n{result['errors'][name]}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ONE_RANK_CASES))
def test_bad_input_on_one_rank_raises_on_every_rank(one_rank_spawned, name, mode):
    """Bad input on rank 1 only: rank 1 raises its own error, rank 0 one naming rank 1 (or both
    the same one), on the first call for a group's layout and with validate=True; no rank waits."""
    failures = {r: result[name, mode] for r, result in enumerate(one_rank_spawned)}
    assert not any(failures.values()), "\n".join(f"rank {r}:\n{f}" for r, f in failures.items())


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_collectives(spawned, world):
    """The layout all-gather happens on the first call for a layout and with validate=True only;
    otherwise forward + backward is one MAX and one SUM all-reduce."""
    for result in spawned[world]:
        assert result["collectives"] == {
            "first": {"all_gather": 1, "all_reduce": 2},
            "second": {"all_gather": 0, "all_reduce": 2},
            "validate": {"all_gather": 1, "all_reduce": 2},
            "after_validate": {"all_gather": 0, "all_reduce": 2},
        }


def test_vocab_parallel_needs_process_group():
    assert not dist.is_initialized()
    with pytest.raises(
        RuntimeError, match=r"needs an initialised torch\.distributed process group"
    ):
        vocab_parallel_cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]))


def test_ddp_training_matches_torch(spawned):
    """DDP over 2 gloo ranks: 4 SGD steps with fastxent give PyTorch's parameters (float64)."""
    ranks = spawned[2]
    for result in ranks:
        for ours, theirs, initial in zip(
            result["ddp"]["fastxent"], result["ddp"]["torch"], result["ddp"]["initial"], strict=True
        ):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
            assert (ours - initial).abs().max() > 1e-3  # training moved the parameters
    for ours0, ours1 in zip(ranks[0]["ddp"]["fastxent"], ranks[1]["ddp"]["fastxent"], strict=True):
        assert torch.equal(ours0, ours1)  # DDP kept the replicas identical


def _revisited_layouts_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Slices [1, 2], [2, 1], [3, 3], then [1, 1]: every rank's key changes on every call, as
    the module's rule asks. On the last call rank 0's key (1, None) was last seen under [1, 2]
    and rank 1's under [2, 1]: a cache of every key seen combined the two into a layout nobody
    passed (loss 1.51 against 3.68, no error)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    errors = []
    for call, sizes in enumerate(([1, 2], [2, 1], [3, 3], [1, 1])):
        gen = torch.Generator().manual_seed(call)
        full = torch.randn(4, sum(sizes), generator=gen, dtype=torch.float64)  # (N, V)
        start = sum(sizes[:rank])
        target = torch.arange(4) % sum(sizes)
        local = full[:, start : start + sizes[rank]]
        loss = vocab_parallel_cross_entropy(local, target, reduction="sum")
        errors.append(abs(float(loss) - float(F.cross_entropy(full, target, reduction="sum"))))
    torch.save(errors, Path(out_dir) / f"rank{rank}.pt")
    leave_gloo()


def test_a_revisited_layout_key_is_gathered_again(tmp_path):
    for errors in spawn_with_deadline(tmp_path, _revisited_layouts_worker, 2):
        assert max(errors) < 1e-12, errors


def _entry_points_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The logits' path, then the fused projection with the same V_r on the same group."""
    init_gloo(rank, world, init_file, 60)
    gen = torch.Generator().manual_seed(rank)
    local, hidden, local_weight = (
        torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((4, 3), (4, 2), (3, 2))
    )
    y = torch.tensor([0, 5, 1, 2])
    group = dist.group.WORLD
    gathers = [
        count_collectives(call)["all_gather"]
        for call in (
            lambda: vocab_parallel_cross_entropy(local, y, group=group),
            lambda: fastxent.linear_cross_entropy(hidden, local_weight, y, process_group=group),
            lambda: fastxent.linear_cross_entropy(hidden, local_weight, y, process_group=group),
        )
    ]
    torch.save(gathers, Path(out_dir) / f"rank{rank}.pt")
    leave_gloo()


def test_each_entry_point_gathers_its_own_layout(tmp_path):
    """The fused projection checks more across ranks (chunk_size, D, hidden.requires_grad) than
    the logits' path: a layout that path cached for the same V_r must not skip those checks."""
    for gathers in spawn_with_deadline(tmp_path, _entry_points_worker, 2):
        assert gathers == [1, 1, 0]


def _equal_options_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Equal option values written differently on the two ranks (0 and 0.0, -0.0 and 0.0, 1 and
    1.0, a NumPy float and its value), each call on a new group: its first, all-gathered."""
    init_gloo(rank, world, init_file, 60)
    local = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    y = torch.tensor([0, 3, 7, 9])
    spellings = [
        {"z_loss": 0, "logit_scale": 1, "softcap": 5, "label_smoothing": np.float64(0.1)},
        {"z_loss": -0.0, "logit_scale": 1.0, "softcap": 5.0, "label_smoothing": 0.1},
    ]
    group = dist.new_group(list(range(world)))
    loss = vocab_parallel_cross_entropy(local, y, group=group, **spellings[rank])
    torch.save(float(loss), Path(out_dir) / f"rank{rank}.pt")
    leave_gloo()


def test_equal_options_spelled_differently_agree(tmp_path):
    losses = spawn_with_deadline(tmp_path, _equal_options_worker, 2)
    assert losses[0] == losses[1]


def printed_lines(done: subprocess.CompletedProcess) -> list[str]:
    """A subprocess's printed lines, without gloo's own (torch 2.8's gloo prints "[Gloo] Rank 0
    is connected to 0 peer ranks" to stdout)."""
    return [line for line in done.stdout.strip().splitlines() if not line.startswith("[Gloo]")]


@newer_torch((2, 8), "destroy_process_group() could hang with gloo (pytorch/pytorch #154976)")
def test_layout_cache_does_not_keep_a_destroyed_group_alive(tmp_path):
    """The shard-layout cache holds its groups weakly: after destroy_process_group() the group
    (and gloo's worker threads with it) can be freed. Run in a fresh process (world size 1)."""
    code = f"""
import gc, weakref, torch, torch.distributed as dist, fastxent
dist.init_process_group("gloo", init_method="file://{tmp_path / "init"}", rank=0, world_size=1)
group = weakref.ref(dist.group.WORLD)
fastxent.vocab_parallel_cross_entropy(torch.randn(3, 5), torch.tensor([0, 4, 2]))
dist.destroy_process_group()
gc.collect()
print("freed" if group() is None else "alive")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert printed_lines(done) == ["freed"], done.stderr


def _neg_view_inplace_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank's float16 slice written in place, as a ``torch._neg_view`` and as plain -x."""
    init_gloo(rank, world, init_file, 60)
    full = torch.randn(4, 9, generator=torch.Generator().manual_seed(4)).half()
    start, size = (0, 4) if rank == 0 else (4, 5)
    y = torch.tensor([1, -100, 3, 8])
    grads = []
    for neg in (True, False):
        x = full[:, start : start + size].clone().requires_grad_()
        local = torch._neg_view(x * 1.0) if neg else -(x * 1.0)
        loss = vocab_parallel_cross_entropy(local, y, reduction="sum", inplace_backward=True)
        loss.backward(torch.tensor(0.5))
        grads.append(x.grad)
    torch.save(grads, Path(out_dir) / f"rank{rank}.pt")
    leave_gloo()


def test_inplace_backward_into_float16_logits_with_the_negative_bit(tmp_path):
    """PyTorch's float32 -> float16 ``copy_`` ignores the destination's negative bit (torch
    2.13): the gradient written into a ``torch._neg_view`` slice came out negated, silently."""
    full = torch.randn(4, 9, generator=torch.Generator().manual_seed(4)).half()
    x64 = full.double().requires_grad_()
    y = torch.tensor([1, -100, 3, 8])
    F.cross_entropy(-x64, y, reduction="sum").backward(torch.tensor(0.5, dtype=torch.float64))
    ranks = spawn_with_deadline(tmp_path, _neg_view_inplace_worker, 2)
    for (start, size), (neg, plain) in zip(((0, 4), (4, 5)), ranks, strict=True):
        torch.testing.assert_close(neg, plain, rtol=0, atol=0)
        want = x64.grad[:, start : start + size]
        torch.testing.assert_close(neg.double(), want, rtol=2e-3, atol=1e-4)


def _dtensor_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """DTensor logits (rows sharded, or replicated) and a DTensor hidden/weight pair on the
    kernel paths: their errors against the same call on plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    init_gloo(rank, world, init_file, 60)
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    z, hidden = torch.randn(8, 50, generator=gen), torch.randn(8, 6, generator=gen)
    weight, target = torch.randn(50, 6, generator=gen), torch.randint(0, 50, (8,), generator=gen)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    errors = {}
    for backend, placement in product(("torch", "compiled"), (Replicate(), Shard(0))):
        leaf = distribute_tensor(z, mesh, [placement]).requires_grad_()
        sharded_target = _dtensor_target(placement, target, mesh)
        loss = fastxent.cross_entropy(leaf, sharded_target, backend=backend, **options)
        loss.backward()
        plain = z.clone().requires_grad_()
        want = fastxent.cross_entropy(plain, target, backend=backend, **options)
        want.backward()
        errors[backend, str(placement)] = (
            abs(float(loss.full_tensor()) - float(want)),
            float((leaf.grad.full_tensor() - plain.grad).abs().max()),
        )
    # Rank 1's rows all ignored, then all but one: the mean is over all counted rows (PyTorch's
    # own "mean" on DTensor averages each rank's mean: NaN, and 10.85 for 11.39 in a probe).
    for kept in (0, 1):
        uneven = target.clone()
        uneven[4 + kept :] = -100
        sharded = distribute_tensor(z, mesh, [Shard(0)])
        loss = fastxent.cross_entropy(sharded, _dtensor_target(Shard(0), uneven, mesh))
        want = fastxent.cross_entropy(z, uneven)
        errors["uneven", kept] = (abs(float(loss.full_tensor()) - float(want)), 0.0)
    compiled = torch.compile(fastxent.cross_entropy, backend="eager")  # the kernel path outside
    leaf = distribute_tensor(z, mesh, [Replicate()]).requires_grad_()
    loss = compiled(leaf, _dtensor_target(Replicate(), target, mesh), backend="torch", **options)
    loss.backward()
    plain = z.clone().requires_grad_()
    want = fastxent.cross_entropy(plain, target, backend="torch", **options)
    want.backward()
    errors["compiled caller"] = (
        abs(float(loss.full_tensor()) - float(want)),
        float((leaf.grad.full_tensor() - plain.grad).abs().max()),
    )
    h = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_()
    w = distribute_tensor(weight, mesh, [Replicate()]).requires_grad_()
    loss = fastxent.linear_cross_entropy(
        h, w, _dtensor_target(Replicate(), target, mesh), chunk_size=3
    )
    loss.backward()
    want_h, want_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = fastxent.linear_cross_entropy(want_h, want_w, target, chunk_size=3)
    want.backward()
    errors["linear"] = (
        abs(float(loss.full_tensor()) - float(want)),
        float((w.grad.full_tensor() - want_w.grad).abs().max()),
    )
    torch.save(errors, Path(out_dir) / f"rank{rank}.pt")
    leave_gloo()


def _dtensor_target(placement, target: torch.Tensor, mesh):
    """The targets as a DTensor placed like the logits' rows."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(target, mesh, [placement])


@newer_torch(
    (2, 11),
    "DTensor's sharding rules for F.cross_entropy's ops (2.8 had none for aten.masked_fill_)",
)
def test_dtensor_inputs_run_on_pytorchs_ops_and_match_plain_tensors(tmp_path):
    """DTensor implements PyTorch's ops, not the kernels' writes into plain buffers (the row
    kernels raised "got mixed torch.Tensor and DTensor", the linear walk "no sharding strategy
    for mkldnn._linear_pointwise"): such calls run on PyTorch's ops, as PyTorch's loss would."""
    for errors in spawn_with_deadline(tmp_path, _dtensor_worker, 2):
        for key, (loss_error, grad_error) in errors.items():
            assert loss_error < 1e-6 and grad_error < 1e-6, (key, loss_error, grad_error)


@newer_torch((2, 7), "fully_shard on CPU (2.6's asks its stream for record_event)")
def test_fsdp2_lm_head_weight_works_with_the_root_and_is_explained_when_sharded_alone(tmp_path):
    """FSDP2 gathers a weight into a plain tensor inside its fully_shard module's forward and
    keeps the root's gathered after forward; a plain hidden with a still-sharded weight used to
    fail in DTensor's dispatch ("aten.mm.default got mixed torch.Tensor and DTensor"). World
    size 1 in a fresh process: the root case against a plain float64 computation, the
    separately sharded lm_head against the error that names the cause."""
    code = f"""
import torch, torch.distributed as dist, torch.nn as nn, fastxent
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo", init_method="file://{tmp_path / "init"}", rank=0, world_size=1)
torch.manual_seed(0)
x, y = torch.randn(6, 8), torch.randint(0, 16, (6,))
class Model(nn.Module):  # returns the hidden states; the loss is taken outside forward
    def __init__(self):
        super().__init__()
        self.body, self.lm_head = nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
    def forward(self, x):
        return self.body(x)
for own_unit in (False, True):
    model = Model()
    want_w = model.lm_head.weight.detach().double().requires_grad_()
    want_h = model.body.to(torch.float64)(x.double()).detach()
    model.float()
    want = torch.nn.functional.cross_entropy(want_h @ want_w.T, y)
    want.backward()
    if own_unit:
        fully_shard(model.lm_head)
    fully_shard(model)
    hidden = model(x)
    try:
        loss = fastxent.linear_cross_entropy(hidden, model.lm_head.weight, y)
    except TypeError as error:
        print("refused:", error)
        continue
    loss.backward()
    grad = model.lm_head.weight.grad.full_tensor()
    print("loss", abs(float(loss) - float(want)), "grad", float((grad - want_w.grad).abs().max()))
dist.destroy_process_group()
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = printed_lines(done)
    assert len(lines) == 2, done.stdout + done.stderr
    _, loss_error, _, grad_error = lines[0].split()
    assert float(loss_error) < 1e-6 and float(grad_error) < 1e-6, lines[0]
    assert lines[1].startswith("refused: weight is a DTensor but hidden is not"), lines[1]
    assert "shard lm_head with the root module" in lines[1], lines[1]
