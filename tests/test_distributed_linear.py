"""linear_cross_entropy with process_group (vocabulary split over gloo ranks) against float64.

Two process groups are spawned (2 and 3 ranks on CPU, uneven slices of V = 1001, one rank of
world 3 holding a single class); each rank holds its rows of the weight and bias, runs every case
and writes its loss and gradients to a file. The test process compares them with the oracle of
``test_linear`` (the float64 logits by F.linear, then :mod:`fastxent.reference`): the loss and
∂h on every rank, ∂W and ∂b as the rank's slice. Error cases run inside the workers; those
detected by the layout all-gather pass ``validate=True``, since the layout is cached by then.
Bad input on one rank of two (:func:`test_distributed.bad_on_rank_1`) must raise on both, within
a short process-group timeout.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

import fastxent
from test_distributed import (
    ELSEWHERE,
    MODES,
    SHARDS,
    WORLDS,
    _raises_everywhere,
    bad_on_rank_1,
    count_collectives,
    run_one_rank_worker,
    run_worker,
    spawn_groups,
    spawn_with_deadline,
)
from test_linear import oracle
from versions import newer_torch

pytestmark = pytest.mark.distributed

V, D = 1001, 8
# Float64: the partial ∂h of the ranks are summed by an all-reduce, chunks reorder sums.
F64 = {"rtol": 1e-10, "atol": 1e-12}
F32 = {"rtol": 2e-4, "atol": 2e-6}
# Under autocast the matmuls run in bf16: the logits carry bf16 rounding (the oracle gets the
# bf16-cast inputs); the gradients are float32 like the inputs.
BF16 = {"rtol": 2e-2, "atol": 2e-3}


@dataclass(frozen=True)
class Case:
    name: str
    options: dict = field(default_factory=dict)
    tokens: tuple[int, ...] = (13,)
    chunk_size: int | None = 5  # does not divide 13
    bias: bool = True
    class_weight: bool = False
    ignored: int = 2  # leading loss rows whose target is ignore_index
    needs: tuple[bool, bool, bool] = (True, True, True)  # requires_grad of hidden, weight, bias
    dtype: torch.dtype = torch.float64
    zero_grads: bool = False  # filter_eps above every |g|: ∂h = ∂W = 0, loss and ∂b exact
    autocast: bool = False  # call it under torch.autocast (bf16) with inputs of ``dtype``


CASES = [
    Case("mean"),
    Case("sum_weight_smoothing", {"reduction": "sum", "label_smoothing": 0.2}, class_weight=True),
    Case(
        "all_options",
        {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0, "logit_scale": 1.3},
        class_weight=True,
        chunk_size=4,
    ),
    Case(
        "none_grad_output",
        {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
        class_weight=True,
    ),
    Case("shift", {"shift": True, "label_smoothing": 0.1}, tokens=(3, 5), chunk_size=4),
    Case(
        "shift_none",
        {"shift": True, "reduction": "none", "z_loss": 1e-3},
        tokens=(2, 6),
        class_weight=True,
        chunk_size=3,
    ),
    Case("ignore_valid_class", {"ignore_index": 3, "label_smoothing": 0.1}, ignored=3),
    Case("all_ignored", {"z_loss": 1e-2}, class_weight=True, ignored=13),
    Case("no_bias", {"z_loss": 1e-3}, bias=False, chunk_size=1),
    Case("default_chunk", {"label_smoothing": 0.1}, chunk_size=None),
    Case("hidden_only", {"reduction": "sum"}, needs=(True, False, False)),
    Case("weight_only", {"label_smoothing": 0.1}, needs=(False, True, False)),
    Case("bias_only_none", {"reduction": "none"}, needs=(False, False, True)),
    Case("forward_only", {"label_smoothing": 0.1}, class_weight=True, needs=(False,) * 3),
    Case("filter_eps_zero", {"filter_eps": 0.0, "label_smoothing": 0.1}),
    Case("filter_eps_all", {"filter_eps": 1.0, "reduction": "mean"}, zero_grads=True),
    Case("float32", {"label_smoothing": 0.1, "z_loss": 1e-3}, dtype=torch.float32),
    Case("autocast_master_weights", {"z_loss": 1e-3}, dtype=torch.float32, autocast=True),
]


def slices(world: int) -> list[tuple[int, int]]:
    """``(vocab_start, V_r)`` of every rank: the slices in rank order."""
    sizes = SHARDS[world]
    return [(sum(sizes[:r]), sizes[r]) for r in range(world)]


def make_case(case: Case, world: int):
    """Float64 hidden (tokens, D), full weight (V, D), bias, targets, class weight, grad_output."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    hidden = torch.randn((*case.tokens, D), generator=g, dtype=torch.float64)
    weight = torch.randn((V, D), generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(V, generator=g, dtype=torch.float64) if case.bias else None
    target = torch.randint(0, V, case.tokens, generator=g)
    shift = case.options.get("shift", False)
    rows = target[..., 1:] if shift else target  # the loss rows' targets (a view)
    flat = rows.reshape(-1) if shift else rows.view(-1)
    # Targets on slice borders: the first and last class of every rank.
    borders = [c for start, size in slices(world) for c in (start, start + size - 1)]
    y = flat.clone()
    y[case.ignored : case.ignored + len(borders)] = torch.tensor(borders)[: len(y) - case.ignored]
    y[: case.ignored] = case.options.get("ignore_index", -100)
    rows.copy_(y.reshape(rows.shape))
    class_weight = (
        torch.rand(V, generator=g, dtype=torch.float64) + 0.5 if case.class_weight else None
    )
    grad_output = torch.tensor(1.7, dtype=torch.float64)
    if case.options.get("reduction") == "none":
        grad_output = torch.rand(rows.shape, generator=g, dtype=torch.float64) * 2 - 0.5
    return hidden, weight, bias, target, class_weight, grad_output


# --------------------------------------------------------------------------- worker processes


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    def extra(rank: int, world: int) -> dict:
        return {"collectives": _collectives(rank, world)}

    run_worker(rank, world, init_file, out_dir, CASES, _run_case, ERROR_CASES, extra)


def _run_case(case: Case, rank: int, world: int) -> dict:
    hidden, weight, bias, target, class_weight, grad_output = make_case(case, world)
    start, size = slices(world)[rank]
    local = (
        hidden,
        weight[start : start + size],
        None if bias is None else bias[start : start + size],
    )
    leaves = [
        None if x is None else x.to(case.dtype).requires_grad_(need)
        for x, need in zip(local, case.needs, strict=True)
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.autocast):
        loss = fastxent.linear_cross_entropy(
            leaves[0],
            leaves[1],
            target,
            leaves[2],
            class_weight=None if class_weight is None else class_weight.to(case.dtype),
            chunk_size=case.chunk_size,
            process_group=dist.group.WORLD,
            **case.options,
        )
    if any(case.needs):
        loss.backward(grad_output.to(loss.dtype))
    grads = [None if x is None or x.grad is None else x.grad.detach() for x in leaves]
    return {"loss": loss.detach(), "grads": grads}


def _inputs(rank: int, world: int, rows: int = 4, grad: bool = False):
    """Hidden (rows, D), this rank's weight (V_r, D) and bias (V_r,)."""
    hidden = torch.randn(rows, D, dtype=torch.float64, requires_grad=grad)
    size = SHARDS[world][rank]
    return hidden, torch.randn(size, D, dtype=torch.float64), torch.randn(size, dtype=torch.float64)


def _call(hidden, weight, target, bias=None, **kwargs):
    return fastxent.linear_cross_entropy(
        hidden, weight, target, bias, process_group=dist.group.WORLD, **kwargs
    )


_y = torch.tensor([0, 5, 1000, 7])
ERROR_CASES = {
    "bias_global_length": _raises_everywhere(
        ValueError,
        r"bias must have shape \(\d+,\), one entry per row of weight, got shape \(1001,\)",
        lambda r, w: _call(*_inputs(r, w)[:2], _y, torch.zeros(V, dtype=torch.float64)),
    ),
    "empty_shard": _raises_everywhere(  # the last rank holds no class: no rank may hang
        ValueError,
        "every rank must hold at least one class",
        lambda r, w: _call(
            torch.randn(4, D, dtype=torch.float64),
            torch.randn(0 if r == w - 1 else 11, D, dtype=torch.float64),  # 11: no cached layout
            torch.tensor([0, 1, 2, 0]),
        ),
    ),
    "class_weight_local": _raises_everywhere(
        ValueError,
        r"class_weight must have shape \(1001,\)",
        lambda r, w: _call(
            *_inputs(r, w)[:2], _y, class_weight=torch.ones(SHARDS[w][r], dtype=torch.float64)
        ),
    ),
    "probability_target": _raises_everywhere(
        TypeError,
        "probability targets are not supported",
        lambda r, w: _call(*_inputs(r, w)[:2], torch.rand(4, SHARDS[w][r], dtype=torch.float64)),
    ),
    "probability_target_global": _raises_everywhere(  # not a shape error asking for (4, V_r)
        TypeError,
        "probability targets are not supported",
        lambda r, w: _call(*_inputs(r, w)[:2], torch.rand(4, V, dtype=torch.float64)),
    ),
    "target_out_of_range": _raises_everywhere(
        IndexError,
        r"target\[2\] = 1001 is out of range: the input has 1001 classes",
        lambda r, w: _call(*_inputs(r, w)[:2], torch.tensor([0, 5, 1001, 7])),
    ),
    "targets_differ": _raises_everywhere(
        ValueError,
        "target must be the same on every rank",
        lambda r, w: _call(*_inputs(r, w)[:2], (_y + r) % V, validate=True),
    ),
    "rows_differ": _raises_everywhere(
        ValueError,
        r"same rows \(sequence parallelism is not supported\)",
        lambda r, w: _call(
            *_inputs(r, w, rows=4 + r)[:2], torch.zeros(4 + r).long(), validate=True
        ),
    ),
    "chunk_size_differs": _raises_everywhere(
        ValueError,
        r"chunk_size \(0 = None\) must be the same on every rank of the group; got \[2, 3",
        lambda r, w: _call(*_inputs(r, w)[:2], _y, chunk_size=2 + r, validate=True),
    ),
    "hidden_grad_differs": _raises_everywhere(
        ValueError,
        r"hidden\.requires_grad must be the same on every rank of the group; got \[1, 0",
        lambda r, w: _call(*_inputs(r, w, grad=r == 0)[:2], _y, validate=True),
    ),
    "other_backend": _raises_everywhere(
        ValueError,
        "backend must be 'auto' or 'torch', got 'triton'",
        lambda r, w: _call(*_inputs(r, w)[:2], _y, backend="triton"),
    ),
    "bad_reduction": _raises_everywhere(
        ValueError,
        "reduction must be one of",
        lambda r, w: _call(*_inputs(r, w)[:2], _y, reduction="avg"),
    ),
}


def _linear_call(bad: dict, class_weight=None):
    """``call`` for :func:`~test_distributed.bad_on_rank_1`: linear_cross_entropy of the rank's
    hidden, weight and bias with _y and ``class_weight``; ``bad`` (argument name -> f(rank,
    world)) replaces the arguments of a bad rank."""

    def call(rank: int, world: int, group, validate: bool, is_bad: bool) -> None:
        hidden, weight, bias = _inputs(rank, world)
        args = {
            "hidden": hidden,
            "weight": weight,
            "target": _y,
            "bias": bias,
            "class_weight": class_weight,
        }
        if is_bad:
            args.update({name: value(rank, world) for name, value in bad.items()})
        fastxent.linear_cross_entropy(**args, process_group=group, validate=validate)

    return call


_ones = torch.ones(V, dtype=torch.float64)
ONE_RANK_CASES = {
    "hidden_size": bad_on_rank_1(
        ValueError,
        r"weight must have shape \(V, D\) with D = 8 \(hidden's last dimension\), got shape "
        r"\(601, 9\)",
        ELSEWHERE,
        _linear_call(
            {"weight": lambda r, w: torch.randn(SHARDS[w][r], D + 1, dtype=torch.float64)}
        ),
    ),
    "bias_length": bad_on_rank_1(
        ValueError,
        r"bias must have shape \(601,\), one entry per row of weight, got shape \(1001,\)",
        ELSEWHERE,
        _linear_call({"bias": lambda r, w: torch.zeros(V, dtype=torch.float64)}),
    ),
    "hidden_not_a_tensor": bad_on_rank_1(
        TypeError,
        "hidden must be a torch.Tensor, got list",
        ELSEWHERE,
        _linear_call({"hidden": lambda r, w: [[0.0] * D]}),
    ),
    "other_backend": bad_on_rank_1(
        ValueError,
        "backend must be 'auto' or 'torch', got 'triton'",
        ELSEWHERE,
        _linear_call({"backend": lambda r, w: "triton"}),
    ),
    "target_out_of_range": bad_on_rank_1(
        IndexError,
        r"target\[2\] = 1001 is out of range: the input has 1001 classes",
        r"rank 1 of the group passed a target with class indices outside \[0, 1001\)",
        _linear_call({"target": lambda r, w: torch.tensor([0, 5, 1001, 7])}),
    ),
    "class_weight_length": bad_on_rank_1(
        ValueError,
        r"class_weight must have shape \(1001,\), one weight per class, got shape \(601,\)",
        r"rank 1 of the group passed a class_weight that does not have shape \(1001,\)",
        _linear_call({"class_weight": lambda r, w: _ones[: SHARDS[w][r]]}, _ones),
    ),
    "vocab_block": bad_on_rank_1(  # checked in linear_cross_entropy before, on rank 1 alone
        ValueError,
        "vocab_block is for one device; with process_group the vocabulary is already split",
        ELSEWHERE,
        _linear_call({"vocab_block": lambda r, w: 64}),
    ),
    "ignore_index": bad_on_rank_1(  # the same
        TypeError,
        r"ignore_index must be an int \(a class index, -100 by default\), got float 1.5",
        ELSEWHERE,
        _linear_call({"ignore_index": lambda r, w: 1.5}),
    ),
    "hidden_dtype": bad_on_rank_1(
        TypeError,
        r"hidden must have the same dtype on every rank of the group; got "
        r"\[torch.float64, torch.float32\]",
        r"hidden must have the same dtype on every rank of the group; got "
        r"\[torch.float64, torch.float32\]",
        _linear_call(
            {
                "hidden": lambda r, w: _inputs(r, w)[0].float(),
                "weight": lambda r, w: _inputs(r, w)[1].float(),
                "bias": lambda r, w: _inputs(r, w)[2].float(),
            }
        ),
    ),
    "options_differ": bad_on_rank_1(
        ValueError,
        r"the scalar options \(reduction, .*\) must be the same on every rank",
        r"the scalar options \(reduction, .*\) must be the same on every rank",
        _linear_call({"z_loss": lambda r, w: 1e-2}),
    ),
    "hidden_dim": bad_on_rank_1(  # a consistent (N, D + 1) hidden and (V_r, D + 1) weight
        ValueError,
        r"hidden.shape\[-1\] \(D\) must be the same on every rank of the group; got \[8, 9\]",
        r"hidden.shape\[-1\] \(D\) must be the same on every rank of the group; got \[8, 9\]",
        _linear_call(
            {
                "hidden": lambda r, w: torch.randn(4, D + 1, dtype=torch.float64),
                "weight": lambda r, w: torch.randn(SHARDS[w][r], D + 1, dtype=torch.float64),
            }
        ),
    ),
}


def _one_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_one_rank_worker(rank, world, init_file, out_dir, ONE_RANK_CASES)


def _collectives(rank: int, world: int) -> dict[str, dict[str, int]]:
    """Collectives of forward + backward ("mean", 7 rows in 3 chunks) on a fresh group."""
    group = dist.new_group(list(range(world)))  # a layout key no earlier call has used
    y = torch.tensor([0, 5, 1000, 7, 400, 999, 1])

    def call(**kwargs):
        hidden, weight, bias = _inputs(rank, world, rows=7, grad=True)
        fastxent.linear_cross_entropy(
            hidden, weight, y, bias, chunk_size=3, process_group=group, **kwargs
        ).backward()

    return {
        "first": count_collectives(call),
        "second": count_collectives(call),
        "validate": count_collectives(lambda: call(validate=True)),
        "after_validate": count_collectives(call),
    }


# --------------------------------------------------------------------------- test process


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict[int, list[dict]]:
    """World size -> per-rank results. Both process groups start at once and run every case."""
    return spawn_groups(tmp_path_factory.mktemp("dist_linear"), _worker)


@pytest.fixture(scope="module")
def one_rank_spawned(tmp_path_factory) -> list[dict]:
    """Per-rank results of the bad-input-on-rank-1 checks, on 2 ranks."""
    return spawn_with_deadline(tmp_path_factory.mktemp("dist_linear_one_rank"), _one_rank_worker, 2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_linear_matches_single_process(spawned, world, case):
    """Every rank: the full float64 loss and ∂h, and its slices of ∂W and ∂b."""
    hidden, weight, bias, target, class_weight, grad_output = make_case(case, world)
    options = {k: v for k, v in case.options.items() if k != "filter_eps"}

    def cast(x, matmul=True):  # the values the ranks see (in their matmuls), in float64
        dtype = torch.bfloat16 if case.autocast and matmul else case.dtype
        return None if x is None else x.to(dtype).double()

    want_loss, *want_grads = oracle(
        cast(hidden),
        cast(weight),
        cast(bias),
        target,
        class_weight=cast(class_weight, matmul=False),
        grad_output=grad_output,
        **options,
    )
    if case.zero_grads:  # every vocab block filtered out: no ∂h, ∂W contributions
        want_grads[0] = torch.zeros_like(want_grads[0])
        want_grads[1] = torch.zeros_like(want_grads[1])
    tol = F64 if case.dtype == torch.float64 else BF16 if case.autocast else F32
    ranks = spawned[world]
    for rank, result in enumerate(ranks):
        got = result["cases"][case.name]
        torch.testing.assert_close(got["loss"].double(), want_loss, **tol)
        assert torch.equal(got["loss"], ranks[0]["cases"][case.name]["loss"])  # same everywhere
        start, size = slices(world)[rank]
        wants = (
            want_grads[0],
            want_grads[1][start : start + size],
            want_grads[2][start : start + size],
        )
        for name, need, g, want in zip(
            ("d_hidden", "d_weight", "d_bias"), case.needs, got["grads"], wants, strict=True
        ):
            if not need or (name == "d_bias" and not case.bias):
                assert g is None, f"rank {rank}: {name} should not be computed"
                continue
            assert g.dtype == case.dtype
            torch.testing.assert_close(
                g.double(), want, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}", **tol
            )
    if case.name == "all_ignored":
        assert float(want_loss) == 0.0
    if case.zero_grads:  # the filter did drop something: the unfiltered gradients are not zero
        assert oracle(hidden, weight, bias, target, grad_output=grad_output)[1].abs().max() > 0


@pytest.mark.parametrize("name", list(ERROR_CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_linear_errors(spawned, world, name):
    """Each bad call raises the expected error on every rank (and no rank hangs)."""
    for rank, result in enumerate(spawned[world]):
        assert result["errors"][name] is None, f"rank {rank}:\n{result['errors'][name]}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ONE_RANK_CASES))
def test_linear_bad_input_on_one_rank_raises_on_every_rank(one_rank_spawned, name, mode):
    """Bad input on rank 1 only: rank 1 raises its own error, rank 0 one naming rank 1 (or both
    the same one), on the first call for a group's layout and with validate=True; no rank waits."""
    failures = {r: result[name, mode] for r, result in enumerate(one_rank_spawned)}
    assert not any(failures.values()), "\n".join(f"rank {r}:\n{f}" for r, f in failures.items())


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_linear_collectives(spawned, world):
    """The layout all-gather happens on the first call for a layout and with validate=True only;
    otherwise one MAX and one SUM all-reduce per token chunk (3) and the one of ∂h."""
    for result in spawned[world]:
        assert result["collectives"] == {
            "first": {"all_gather": 1, "all_reduce": 2 * 3 + 1},
            "second": {"all_gather": 0, "all_reduce": 2 * 3 + 1},
            "validate": {"all_gather": 1, "all_reduce": 2 * 3 + 1},
            "after_validate": {"all_gather": 0, "all_reduce": 2 * 3 + 1},
        }


@newer_torch((2, 6), "ProcessGroup(store, rank, size)")
def test_process_group_needs_initialised_distributed():
    assert not dist.is_initialized()
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # a group object, no default group
    with pytest.raises(RuntimeError, match=r"needs an initialised torch\.distributed"):
        fastxent.linear_cross_entropy(
            torch.randn(2, D), torch.randn(5, D), torch.tensor([0, 1]), process_group=group
        )


@pytest.mark.parametrize("group", ["tp", [0, 1], object()])
def test_a_process_group_that_is_not_one_is_named_as_such(group):
    """A name or a rank list was reported as an uninitialised torch.distributed."""
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed Proces"):
        fastxent.linear_cross_entropy(
            torch.randn(2, D), torch.randn(5, D), torch.tensor([0, 1]), process_group=group
        )
    with pytest.raises(TypeError, match=r"^group must be .* or None \(the default group\), got"):
        fastxent.vocab_parallel_cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), group=group)
