"""The compiled CPU backend against the float64 oracle (reference.py) and the portable backend.

Compilation is the slow part, so the tests share a handful of graph variants (dtype x which options
are on); sizes are dynamic, so every shape below reuses the variant's graph.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo.utils

import fastxent
from fastxent import reference
from fastxent._compiled import kernel, unavailable_reason
from fastxent._options import CrossEntropyOptions
from fastxent.bench import allocated_peak_bytes
from versions import TORCH, builds_inplace_variants, compiled_backend, folds_in_place

pytestmark = compiled_backend


@pytest.fixture(autouse=True)
def split_at_every_size(monkeypatch):
    """The tests' logits are small; let every eligible variant take the two-graph path anyway
    (the threshold itself is tested with the shipped value, below)."""
    monkeypatch.setattr(kernel, "SPLIT_MIN_LOGITS", 0)


# Variant "general, index targets": every option on, values varied freely between tests.
GENERAL = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=1.3)
# Every option but softcap: the split variant (two graphs) for float32/64 index targets; also,
# without a softcap bounding z', a row's max can lie far above the graph's shift m.
UNCAPPED = dict(label_smoothing=0.1, z_loss=1e-3, logit_scale=1.3)


def run(z, target, grad_output=None, backend="compiled", **kwargs):
    """Loss and ∂loss/∂z through the public API, on a fresh leaf copy of ``z``."""
    x = z.detach().clone().requires_grad_()
    loss = fastxent.cross_entropy(x, target, backend=backend, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), x.grad


def oracle(z, target, weight=None, grad_output=None, **kwargs):
    """Loss and gradient from the float64 NumPy oracle."""
    loss, grad = reference.cross_entropy(
        z.double().numpy(),
        target.numpy() if not target.is_floating_point() else target.double().numpy(),
        None if weight is None else weight.double().numpy(),
        grad_output=None if grad_output is None else grad_output.double().numpy(),
        **kwargs,
    )
    return torch.from_numpy(np.asarray(loss)), torch.from_numpy(grad)


def max_err(actual, expected) -> float:
    """Largest absolute error, relative to the largest expected magnitude (at least 1)."""
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return (actual.double() - expected).abs().max().item() / scale if expected.numel() else 0.0


def rounding_excess(actual, expected, u, slack=1e-5) -> float:
    """How far the worst entry's error exceeds u·|expected| (u: one rounding, relative) plus
    slack·max|expected| (the float32 arithmetic before it); at most 0 when within. Relative to
    each entry, not to max(1, ...): a "mean" gradient's entries are ~1/(N·V), far below 1."""
    expected = expected.double()
    bound = u * expected.abs() + slack * expected.abs().max()
    return ((actual.double() - expected).abs() - bound).max().item()


def index_targets(n, v, gen, ignore_index=-100, ignored=()):
    y = torch.randint(0, v, (n,), generator=gen)
    y[list(ignored)] = ignore_index
    return y


@pytest.mark.parametrize(
    ("n", "v", "ignore_index", "ignored", "reduction"),
    [
        (9, 423, -100, (1, 4), "mean"),
        (9, 423, -100, (0,), "sum"),
        (9, 423, -100, (2, 3), "none"),
        (9, 423, 3, (5,), "mean"),  # ignore_index is a valid class
        (6, 423, -100, range(6), "mean"),  # every target ignored: loss 0, gradient 0
        (6, 423, -100, range(6), "none"),
        (1, 423, -100, (), "mean"),  # N = 1
        (6, 1, -100, (2,), "sum"),  # V = 1
    ],
)
@pytest.mark.parametrize("options", ["general", "uncapped"])  # one graph; split in two
def test_index_targets_all_options_match_oracle(n, v, ignore_index, ignored, reduction, options):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    y = index_targets(n, v, gen, ignore_index, ignored)
    w = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    go = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    every = GENERAL if options == "general" else UNCAPPED
    opts = dict(ignore_index=ignore_index, reduction=reduction, **every)
    loss, grad = run(z, y, go, weight=w, **opts)
    ref_loss, ref_grad = oracle(z, y, w, go, **opts)
    assert loss.dtype == torch.float64
    assert max_err(loss, ref_loss) <= 1e-12
    assert max_err(grad, ref_grad) <= 1e-12
    if len(ignored) == n:
        assert torch.all(grad == 0) and torch.all(loss == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_targets_match_oracle(reduction):
    gen = torch.Generator().manual_seed(1)
    n, v = 7, 423
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    y = torch.rand(n, v, generator=gen, dtype=torch.float64)  # rows need not sum to one
    w = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    go = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    opts = dict(reduction=reduction, label_smoothing=0.2, z_loss=1e-2, logit_scale=0.7)
    loss, grad = run(z, y, go, weight=w, **opts)
    ref_loss, ref_grad = oracle(z, y, w, go, **opts)
    assert max_err(loss, ref_loss) <= 1e-12
    assert max_err(grad, ref_grad) <= 1e-12


# Allowed excess error over the portable backend's own error against float64.
LOW_PRECISION_TOL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_portable_and_oracle(dtype):
    gen = torch.Generator().manual_seed(2)
    n, v = 33, 1000
    z = (torch.randn(n, v, generator=gen) * 4).to(dtype)
    y = index_targets(n, v, gen, ignored=(3,))
    loss, grad = run(z, y, reduction="sum")
    port_loss, port_grad = run(z, y, backend="torch", reduction="sum")
    ref_loss, ref_grad = oracle(z, y, reduction="sum")
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    tol = LOW_PRECISION_TOL[dtype]
    assert max_err(loss, ref_loss) <= max_err(port_loss, ref_loss) + 1e-6
    assert max_err(grad, ref_grad) <= max_err(port_grad, ref_grad) + tol
    assert max_err(grad, port_grad) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_weighted_smoothing_matches_the_oracle(dtype):
    """Class weights with label smoothing in bf16/fp16, "sum": the target column's smoothing
    term is a·(ε/V)·w_y (a mutant that left out w_y passed the suite: an error of 0.06 there
    against 0.001 elsewhere). Each entry within one rounding of the float64 oracle's plus 1e-3 of
    the largest (the rounded logits' own error)."""
    gen = torch.Generator().manual_seed(5)
    n, v = 64, 16
    z = torch.randn(n, v, generator=gen).to(dtype)
    y = index_targets(n, v, gen, ignored=(7,))
    w = torch.rand(v, generator=gen) * 4 + 0.5
    kwargs = {"reduction": "sum", "label_smoothing": 0.3}
    loss, grad = run(z, y, weight=w, **kwargs)
    ref_loss, ref_grad = oracle(z, y, w, **kwargs)
    assert max_err(loss, ref_loss) <= 1e-6
    excess = rounding_excess(grad, ref_grad, LOW_PRECISION_TOL[dtype], slack=1e-3)
    assert excess <= 0.0, excess


def test_inplace_backward_writes_the_gradient_into_the_logits():
    """The loss, the leaf's gradient and the overwritten logits against the float64 oracle
    (float32: the loss to 1e-6, each gradient entry to 1e-6 relative plus 1e-5 of the largest),
    and to 1e-7 the same as the compiled call without inplace_backward (which alone would miss
    an error the two variants share)."""
    gen = torch.Generator().manual_seed(3)
    n, v = 17, 423
    z = torch.randn(n, v, generator=gen)
    y = index_targets(n, v, gen, ignored=(0,))
    ref_loss, ref_grad = oracle(z, y)
    expected_loss, expected_grad = run(z, y)
    leaf = z.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a model's output would be
    loss = fastxent.cross_entropy(logits, y, inplace_backward=True, backend="compiled")
    loss.backward()
    assert max_err(loss.detach(), ref_loss) <= 1e-6
    assert rounding_excess(leaf.grad, ref_grad, 1e-6) <= 0.0
    assert rounding_excess(logits.detach(), ref_grad, 1e-6) <= 0.0  # the logits hold it now
    assert max_err(loss.detach(), expected_loss) <= 1e-7
    assert max_err(leaf.grad, expected_grad) <= 1e-7
    assert max_err(logits.detach(), expected_grad) <= 1e-7


def test_forward_without_grad_and_non_contiguous_input():
    gen = torch.Generator().manual_seed(4)
    n, v = 11, 423
    wide = torch.randn(n, v + 77, generator=gen)
    z = wide[:, 5 : v + 5]  # rows strided by v + 77
    assert not z.is_contiguous()
    y = index_targets(n, v, gen)
    ref_loss, ref_grad = oracle(z, y)
    assert max_err(fastxent.cross_entropy(z, y, backend="compiled"), ref_loss) <= 1e-6
    loss, grad = run(z, y)
    assert max_err(loss, ref_loss) <= 1e-6
    assert max_err(grad, ref_grad) <= 1e-6


@pytest.mark.parametrize("strided", ["logits", "targets"])
def test_logits_strided_along_classes_are_exact(strided):
    """Inductor turned 64 x 64 fp16 logits or probabilities strided along the classes into
    NaN rows; such inputs take the portable kernel."""
    gen = torch.Generator().manual_seed(6)
    n = v = 64
    wide = torch.randn(n, 2 * v, generator=gen).half().requires_grad_()
    t = torch.softmax(torch.randn(n, 2 * v, generator=gen), 1).half()[:, ::2]
    z = wide[:, ::2]  # (n, v), stride 2 along the classes
    if strided == "logits":
        t = t.contiguous()
    else:
        z = z.detach().contiguous().requires_grad_()
    assert (z.stride(1), t.stride(1)) == ((2, 1) if strided == "logits" else (1, 2))
    loss = fastxent.cross_entropy(z, t, reduction="none", backend="compiled")
    loss.sum().backward()
    grad = wide.grad[:, ::2] if strided == "logits" else z.grad
    ref_loss, ref_grad = oracle(z.detach(), t, reduction="none")
    assert max_err(loss.detach(), ref_loss) <= 1e-5
    assert max_err(grad, ref_grad) <= 1e-3  # the fp16 gradient's rounding


def test_new_sizes_do_not_recompile():
    # Inductor specialises the row sum on V <= 4096 or V > 4096, and the shift's slice on V < 64:
    # at most three graphs per variant (plus N = 1 or V = 1, which dynamo always specialises).
    gen = torch.Generator().manual_seed(5)
    for n, v in [(8, 30), (8, 300), (8, 5000)]:
        run(torch.randn(n, v, generator=gen), torch.randint(0, v, (n,), generator=gen))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n, v in [(5, 100), (64, 1000), (3, 4097), (130, 17), (2, 32768), (9, 4096)]:
        z = torch.randn(n, v, generator=gen)
        y = torch.randint(0, v, (n,), generator=gen)
        loss, grad = run(z, y)
        ref_loss, ref_grad = oracle(z, y)
        assert max_err(loss, ref_loss) <= 1e-6 and max_err(grad, ref_grad) <= 1e-6
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def logits_the_shift_does_not_suit(n, v, gen, dtype):
    """Random rows, and two the graph's shift (the max of the first SHIFT_COLUMNS logits and of
    the target's) does not suit, where Σe leaves its range: row 1 has a maximum 150 above that
    shift, row 3 a head of -1e4 before an ordinary tail (give it a target in the head)."""
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    z[1, v - 7] = 150.0
    z[3, : kernel.SHIFT_COLUMNS] = -1e4
    return z.to(dtype)


@pytest.mark.parametrize(
    ("soft", "inplace", "dtype", "tol"),
    [
        (False, False, torch.float64, 1e-12),
        (True, False, torch.float64, 1e-12),
        (False, True, torch.float32, 1e-6),
    ],
    ids=["index", "soft", "inplace"],
)
def test_rows_the_shift_does_not_suit_are_redone_exactly(monkeypatch, soft, inplace, dtype, tol):
    gen = torch.Generator().manual_seed(8)
    n, v = 6, 300
    z = logits_the_shift_does_not_suit(n, v, gen, dtype)
    y = torch.rand(n, v, generator=gen, dtype=dtype) if soft else index_targets(n, v, gen)
    if not soft:
        y[1], y[3] = 0, 5  # neither at the row's maximum
    w = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    go = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    opts = dict(reduction="none", **UNCAPPED)
    redone = []
    portable = kernel._portable

    def spy(z_rows, *args):
        redone.append(z_rows.shape[0])
        return portable(z_rows, *args)

    monkeypatch.setattr(kernel, "_portable", spy)
    leaf = z.detach().clone().requires_grad_()
    logits = leaf * 1.0
    loss = fastxent.cross_entropy(
        logits, y, weight=w.to(dtype), backend="compiled", inplace_backward=inplace, **opts
    )
    loss.backward(go.to(loss.dtype))
    assert redone == [2]  # rows 1 and 3, in one call
    ref_loss, ref_grad = oracle(z, y, w, go, **opts)
    assert max_err(loss.detach(), ref_loss) <= tol
    assert max_err(leaf.grad, ref_grad) <= tol


def test_rows_with_a_non_finite_head_or_nan():
    # Row 1: an -inf head and a tail far below 0 (the shift falls back to 0 and Σe underflows
    # its range: redone); row 2: an -inf head and an ordinary tail (shift 0 suits it: kept);
    # row 3: a NaN (redone, and NaN as in the portable kernel). Targets avoid the -inf head.
    gen = torch.Generator().manual_seed(9)
    n, v, head = 5, 300, kernel.SHIFT_COLUMNS
    z = torch.randn(n, v, generator=gen, dtype=torch.float64)
    z[1:3, :head] = float("-inf")
    z[1, head:] -= 200.0
    z[3, 100] = float("nan")
    y = torch.randint(head, v, (n,), generator=gen)
    loss, grad = run(z, y, reduction="none")
    port_loss, port_grad = run(z, y, backend="torch", reduction="none")
    assert torch.isnan(loss[3]) and torch.isnan(port_loss[3])
    assert torch.equal(torch.isnan(grad), torch.isnan(port_grad))
    finite = torch.tensor([0, 1, 2, 4])  # against PyTorch (the NumPy oracle says NaN at -inf)
    x = z[finite].clone().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(x, y[finite], reduction="none")
    ref_loss.sum().backward()
    assert max_err(loss[finite], ref_loss.detach()) <= 1e-12
    assert max_err(grad[finite], x.grad) <= 1e-12


def test_softcap_tanh_matches_tanh_eager_and_compiled():
    """The kernel's tanh (expm1, and its series below |x| = 1/4) within 2 float32 ulps of tanh,
    relative, eager and compiled: inductor's expm1 alone gave 0 for |x| < 1e-8."""
    magnitudes = torch.logspace(-30, 3, 20001, dtype=torch.float64)
    x = torch.cat([magnitudes, -magnitudes, torch.zeros(1)]).float()
    want = torch.tanh(x.double())
    eager = kernel._tanh(x).double()
    assert ((eager - want).abs() <= 2 * 2.0**-23 * want.abs()).all()
    compiled = torch.compile(kernel._tanh, dynamic=True)(x).double()
    assert ((compiled - want).abs() <= 2 * 2.0**-23 * want.abs()).all()
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    got = kernel._tanh(special)
    assert got[:2].tolist() == [1.0, -1.0] and got[2].isnan() and got[3].item() == 0.0
    wide = torch.compile(kernel._tanh, dynamic=True)(x.double())  # float64: tanh itself
    # (inductor before 2.7 computes a float64 tanh to 3e-16 absolute, 0 for |x| ~ 1e-30)
    close = 2 * 2.0**-52 * (want.abs() if TORCH >= (2, 7) else 1.0)
    assert ((wide - want).abs() <= close).all()


@pytest.mark.parametrize("softcap", [1e5, 1e8, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cap_far_above_the_logits_is_the_identity(softcap, dtype):
    """c ≫ |z|: z' = c·tanh(z/c) is z. The graph's tanh of z/c ~ 1e-8 came out 0 (inductor's
    expm1 near 0), losses 5-40% off; now the loss and gradient are those without softcap, within
    the dtype's rounding of the gradient (loss: float32 sums)."""
    gen = torch.Generator().manual_seed(4)
    z = (torch.randn(64, 300, generator=gen) * 2).to(dtype)
    y = torch.randint(0, 300, (64,), generator=gen)
    loss, grad = run(z, y, softcap=softcap)
    ref_loss, ref_grad = oracle(z.double(), y)
    grad_tol = 1e-6 if dtype == torch.float32 else 2.0**-8
    assert max_err(loss.double(), ref_loss) <= 1e-6
    assert max_err(grad.double(), ref_grad) <= grad_tol


def test_split_variants_are_float_index_targets_without_softcap_into_a_buffer(monkeypatch):
    monkeypatch.setattr(kernel, "SPLIT_MIN_LOGITS", 20)
    z32 = torch.zeros(2, 10)
    y = torch.zeros(2, dtype=torch.long)

    def split(z, target=y, grad="buffer", **options):
        kw = dict(num_classes=z.shape[1], soft=target.is_floating_point(), **options)
        opts = CrossEntropyOptions(**kw)
        buffer = {"buffer": torch.empty_like(z), "z": z, None: None}[grad]
        return kernel.Variant.of(z, target, None, opts, buffer).split

    assert split(z32) and split(z32.double()) and split(z32, label_smoothing=0.1, z_loss=0.1)
    assert not split(z32.bfloat16()) and not split(z32.half())
    assert not split(z32, softcap=4.0)
    assert not split(z32, torch.rand(2, 10))
    assert not split(z32, grad="z") and not split(z32, grad=None)
    assert not split(torch.zeros(2, 9), torch.zeros(2, dtype=torch.long))  # below the threshold


@pytest.mark.parametrize("failing", ["every graph", "the scale graph"])
def test_compile_failure_falls_back_to_portable_with_one_warning(monkeypatch, failing):
    # "the scale graph": the second graph of a split variant (UNCAPPED options) fails to build
    # after the first one ran; the call must still fall back whole.
    build = kernel.compiled_graph

    def flaky(variant, graph=kernel._rows_graph, generation=0):
        if failing == "every graph" or graph is kernel._scale_graph:
            raise RuntimeError("no compiler today")
        return build(variant, graph, generation)

    monkeypatch.setattr(kernel, "compiled_graph", flaky)
    monkeypatch.setattr(kernel, "_failed", set())
    monkeypatch.setattr(kernel, "_warned", False)
    options = GENERAL if failing == "every graph" else UNCAPPED
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 50, (4,), generator=gen)
    ref_loss, ref_grad = oracle(z, y, **options)
    with pytest.warns(RuntimeWarning, match="falling back to the portable 'torch' backend"):
        loss, grad = run(z, y, **options)
    assert max_err(loss, ref_loss) <= 1e-12 and max_err(grad, ref_grad) <= 1e-12
    with warnings.catch_warnings():  # a second failure (another variant) stays silent
        warnings.simplefilter("error")
        run(z.float(), y, **options)
    assert len(kernel._failed) == 2


class FailOnRecompileLimitHit(Exception):
    """Stands in for torch._dynamo.exc.FailOnRecompileLimitHit."""


@pytest.mark.parametrize("limited_generations", [1, kernel.GENERATIONS])
def test_recompile_limit_starts_a_new_generation(monkeypatch, limited_generations):
    """Dynamo's recompile limit (many size specialisations of one variant) gives the variant a
    fresh compiled function, not the portable kernel for the rest of the process; only when
    every generation has hit it does the call fall back (with the one warning)."""
    build, built = kernel.compiled_graph, []

    def limited(variant, graph=kernel._rows_graph, generation=0):
        built.append(generation)
        if generation < limited_generations:
            raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
        return build(variant, graph, 0)

    monkeypatch.setattr(kernel, "compiled_graph", limited)
    monkeypatch.setattr(kernel, "_failed", set())
    monkeypatch.setattr(kernel, "_generation", {})
    monkeypatch.setattr(kernel, "_warned", False)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 50, (4,), generator=gen)
    ref_loss, ref_grad = oracle(z, y, **GENERAL)
    if limited_generations < kernel.GENERATIONS:
        with warnings.catch_warnings():  # no fallback warning (PyTorch's own, on a first
            warnings.simplefilter("error", RuntimeWarning)  # compile in the process, may come)
            loss, grad = run(z, y, **GENERAL)
        assert not kernel._failed and built == [0, 1]
    else:
        with pytest.warns(RuntimeWarning, match="falling back"):
            loss, grad = run(z, y, **GENERAL)
        assert len(kernel._failed) == 1 and built == list(range(kernel.GENERATIONS))
    assert max_err(loss, ref_loss) <= 1e-12 and max_err(grad, ref_grad) <= 1e-12


def test_calls_the_graph_does_not_take(shapes_passed_to):
    """One row, one class, and the gradient into row-strided logits run the portable kernel
    (the last failed to build in inductor: KeyError 'buf0'), with the right result and no
    warning; a plain call runs the graph."""
    portable = shapes_passed_to(kernel, "_portable")
    leaf = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for z, target in [
            (torch.randn(1, 8, dtype=torch.float64), y[:1]),
            (torch.randn(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.long)),
        ]:
            loss, grad = run(z, target)
            ref_loss, ref_grad = oracle(z, target)
            assert max_err(loss, ref_loss) <= 1e-12 and max_err(grad, ref_grad) <= 1e-12
        strided = (leaf * 1.0)[::2]
        loss = fastxent.cross_entropy(
            strided, y, softcap=5.0, inplace_backward=True, backend="compiled"
        )
        loss.backward()
    ref_loss, ref_grad = oracle(leaf.detach()[::2], y, softcap=5.0)
    assert max_err(loss, ref_loss) <= 1e-12
    assert max_err(leaf.grad[::2], ref_grad) <= 1e-12
    assert portable == [(1, 8), (3, 1), (3, 8)]
    run(torch.randn(3, 8, dtype=torch.float64), y)
    assert len(portable) == 3


@builds_inplace_variants
@pytest.mark.parametrize("num_classes", [13, 100])
@pytest.mark.parametrize("soft", [False, True])
def test_softcap_and_smoothing_into_the_logits_build_or_go_portable(
    num_classes, soft, shapes_passed_to
):
    """Gradient into the logits with softcap and label smoothing: inductor failed to build the
    graph at V <= SHIFT_COLUMNS (KeyError 'buf3'), and with probability targets at any V
    (KeyError 'buf1'); the failed variant then ran portably for every later call of the
    process. Those go portable without trying; class indices at larger V build."""
    portable = shapes_passed_to(kernel, "_portable")
    gen = torch.Generator().manual_seed(3)
    leaf = torch.randn(6, num_classes, generator=gen, requires_grad=True)
    y = (
        torch.rand(6, num_classes, generator=gen)
        if soft
        else torch.randint(0, num_classes, (6,), generator=gen)
    )
    options = {"label_smoothing": 0.1, "softcap": 5.0}
    with warnings.catch_warnings(record=True) as caught:  # compiling may warn in dynamo
        warnings.simplefilter("always")
        loss = fastxent.cross_entropy(leaf * 1.0, y, inplace_backward=True, backend="compiled",
                                      **options)  # fmt: skip
        loss.backward()
    assert not [w for w in caught if "fastxent" in str(w.message)]
    ref_loss, ref_grad = oracle(leaf.detach().double(), y, **options)
    assert max_err(loss.double(), ref_loss) <= 1e-6
    assert max_err(leaf.grad.double(), ref_grad) <= 1e-6
    assert not any(v.inplace and v.softcap for v in kernel._failed)
    goes_portable = soft or num_classes <= kernel.SHIFT_COLUMNS
    assert portable == ([(6, num_classes)] if goes_portable else [])


def test_unavailable_reason(monkeypatch):
    assert unavailable_reason(torch.device("cpu")) is None
    assert "CPU kernels only" in unavailable_reason(torch.device("meta"))
    import fastxent._compiled as compiled

    compiled._toolchain_reason.cache_clear()
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    try:
        assert "no C++ compiler" in unavailable_reason(torch.device("cpu"))
        with pytest.raises(RuntimeError, match="backend 'compiled' cannot run on cpu"):
            fastxent.cross_entropy(
                torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), backend="compiled"
            )
    finally:
        compiled._toolchain_reason.cache_clear()


@pytest.mark.parametrize("version", ["2.4.1+cpu", "2.5.1+cu124"])
def test_inductor_that_flushes_subnormals_is_not_used(monkeypatch, version):
    """torch 2.4's and 2.5's inductor builds with -ffast-math, whose loaded kernels flush
    subnormal numbers to zero in the whole process: "auto" then takes the portable kernel."""
    import fastxent._compiled as compiled

    compiled._toolchain_reason.cache_clear()
    monkeypatch.setattr(torch, "__version__", version)
    try:
        assert "-ffast-math" in unavailable_reason(torch.device("cpu"))
        name, _ = fastxent.functional.resolve_backend("auto", torch.device("cpu"), 1 << 22)
        assert name == "torch"
    finally:
        compiled._toolchain_reason.cache_clear()


@pytest.mark.parametrize(
    ("options", "soft"),
    [({}, False), (GENERAL, False), (UNCAPPED, False), (GENERAL, True)],
    ids=["plain", "all", "uncapped", "soft-all"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@folds_in_place  # else backward scales into a second (N, V) buffer
def test_step_holds_the_gradient_and_no_logits_sized_temporary(options, soft, dtype):
    # The step must hold one (N, V) gradient and row-sized work; any full-size temporary (a
    # z.to(float32), a float32 scatter_ into a bf16 gradient, a second float32 buffer beside the
    # split variant's, a float32 z' = c·tanh(z/c) or e^{z'-m} that inductor stores for all rows
    # because several nodes read it) adds 2 bytes per logit or more.
    gen = torch.Generator().manual_seed(7)
    n, v = 64, 4096
    z = torch.randn(n, v, generator=gen).to(dtype)
    if soft:
        y = torch.rand(n, v, generator=gen).to(dtype)
    else:
        y = index_targets(n, v, gen, ignored=(5,))
    z.requires_grad_()

    def step():
        fastxent.cross_entropy(z, y, backend="compiled", **options).backward()

    step()  # compile outside the measurement
    z.grad = None
    fastxent.empty_cache()  # the step must allocate its gradient, to be counted
    grad_bytes = n * v * z.element_size()
    peak = allocated_peak_bytes(step)
    assert grad_bytes <= peak < grad_bytes + n * v * 2
    expected_grad = oracle(z.detach(), y, **options)[1]
    # Each entry within one rounding of the float64 oracle's (2^-8 relative in bf16, 1e-6 in
    # float32) plus 1e-5 of the largest: a bound of 2^-8 absolute passed bf16 "mean" gradients
    # (entries ~1/(N·V), the largest ~1/N) with every o_j term missing.
    assert rounding_excess(z.grad, expected_grad, LOW_PRECISION_TOL[dtype]) <= 0.0


@pytest.mark.parametrize(
    "options",
    [pytest.param({}, id="plain"), pytest.param(GENERAL, id="all", marks=builds_inplace_variants)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@folds_in_place  # else backward scales into a new (N, V) buffer
def test_inplace_backward_allocates_nothing_logits_sized(options, dtype):
    # "Zero extra with inplace_backward": the gradient goes into the logits' own storage, and
    # the step allocates only per-row vectors (well under one (N, V) buffer).
    gen = torch.Generator().manual_seed(10)
    n, v = 64, 4096
    leaf = torch.randn(n, v, generator=gen).to(dtype).requires_grad_()
    y = index_targets(n, v, gen, ignored=(3,))

    def step(logits):
        loss = fastxent.cross_entropy(
            logits, y, inplace_backward=True, backend="compiled", **options
        )
        return torch.autograd.grad(loss, logits)[0]

    step(leaf * 1.0)  # compile outside the measurement
    logits = leaf * 1.0  # a non-leaf, as a model's output would be
    expected_grad = oracle(logits.detach(), y, **options)[1]
    grads = []
    peak = allocated_peak_bytes(lambda: grads.append(step(logits)))
    assert grads[0].data_ptr() == logits.data_ptr()
    assert peak < n * v * logits.element_size() / 8
    # Each entry within one rounding of the float64 oracle's, plus 1e-5 of the largest (above).
    assert rounding_excess(grads[0], expected_grad, LOW_PRECISION_TOL[dtype]) <= 0.0


def test_graph_code_is_renamed_on_python_3_10_too():
    """Each variant's graph gets a code object of its own name; Python 3.10's code objects have
    no co_qualname (and refuse it in replace): the compiled backend then fell back to the
    portable kernel on every call there."""

    class Python310Code:  # replace() as 3.10 has it: no co_qualname
        def replace(self, *, co_name):
            return ("renamed", co_name)

    assert kernel.renamed(Python310Code(), "g_7") == ("renamed", "g_7")
    code = kernel.renamed(kernel._rows_graph.__code__, "g_8")
    assert code.co_name == "g_8"
    if sys.version_info >= (3, 11):  # co_qualname is 3.11's
        assert code.co_qualname == "g_8"


def test_first_calls_of_a_graph_run_one_thread_at_a_time(monkeypatch):
    """A graph's first call compiles it: threads arriving together take turns (dynamo compiled
    the frame again for every waiting thread), and once it has run they no longer wait."""
    active, most = 0, []
    count = threading.Lock()

    def graph(*args):  # stands in for a compiled graph: records how many threads are inside
        nonlocal active
        with count:
            active += 1
            most.append(active)
        time.sleep(0.2)
        with count:
            active -= 1

    monkeypatch.setattr(kernel, "compiled_graph", lambda variant, g, generation=0: graph)
    monkeypatch.setattr(kernel, "_called", set())

    def four_threads() -> int:
        most.clear()
        barrier = threading.Barrier(4)
        threads = [
            threading.Thread(target=lambda: (barrier.wait(), kernel._call("variant", "graph")))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return max(most)

    assert four_threads() == 1  # the first calls, in turn
    assert four_threads() > 1  # compiled: together


@pytest.mark.parametrize("split", [True, False], ids=["two graphs", "one graph"])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_confident_target_past_the_shift_gets_pytorchs_gradient(monkeypatch, split, inplace):
    """Targets beyond the shift's first K columns, 30 above the row's other logits: o_y is 1 to
    within float32, and ∂ℓ/∂z_y = o_y - 1 is -Σ_{j≠y} o_j, about -1e-11. The eager exp at the
    target rounded an ulp above the graph's, so o_y - 1 came out +1.2e-7 (30x PyTorch's error
    relative to the largest entry, of the wrong sign) in about a third of the rows."""
    if not split:
        monkeypatch.setattr(kernel, "SPLIT_MIN_LOGITS", 1 << 40)
    gen = torch.Generator().manual_seed(3)
    n, v = 64, 4096
    z = torch.randn(n, v, generator=gen)
    y = torch.randint(kernel.SHIFT_COLUMNS, v, (n,), generator=gen)
    rows = torch.arange(n)
    z[rows, y] = z.amax(dim=1) + 30.0
    leaf = z.clone().requires_grad_()
    fastxent.cross_entropy(
        leaf * 1.0, y, reduction="sum", backend="compiled", inplace_backward=inplace
    ).backward()
    _, ref_grad = oracle(z, y, reduction="sum")
    z_torch = z.clone().requires_grad_()
    torch.nn.functional.cross_entropy(z_torch, y, reduction="sum").backward()
    torch_grad = z_torch.grad
    got, want = leaf.grad[rows, y].double(), ref_grad[rows, y]
    assert bool((got <= 0).all())
    torch_err = (torch_grad[rows, y].double() - want).abs().max()
    assert (got - want).abs().max() <= torch_err + 1e-12


def test_softcap_target_column_is_as_exact_as_pytorchs():
    """softcap = 30 on rows whose target lies 8-16 above the rest: the target column was
    recomputed outside the graph from an eager z'_y that the graph's tanh (its own expm1) puts
    ~c·1e-7 away, 5x PyTorch's error there; it is now the graph's own entry."""
    gen = torch.Generator().manual_seed(0)
    n, v = 256, 1024
    z = torch.randn(n, v, generator=gen) * 3
    y = torch.randint(0, v, (n,), generator=gen)
    rows = torch.arange(n)
    z[rows, y] += 8 + 8 * torch.rand(n, generator=gen)
    _, ref_grad = oracle(z, y, reduction="sum", softcap=30.0)
    _, got = run(z, y, reduction="sum", softcap=30.0)
    z_torch = z.clone().requires_grad_()
    torch.nn.functional.cross_entropy(
        30.0 * torch.tanh(z_torch / 30.0), y, reduction="sum"
    ).backward()
    err = (got.double() - ref_grad).abs().max()
    torch_err = (z_torch.grad.double() - ref_grad).abs().max()
    assert err <= 1.5 * torch_err


@pytest.mark.parametrize("soft", [False, True])
def test_tensors_with_the_negative_bit_are_read_as_their_values(soft):
    """A ``torch._neg_view`` is -x with x's memory and a bit set: the compiled graph read the
    memory as it is (the loss of -z, a gradient off by 100%). Logits, probability targets and
    class weights here are all such views; the linear walk shares the weights' path."""
    gen = torch.Generator().manual_seed(9)
    n, v = 16, 300
    base = torch.randn(n, v, generator=gen, requires_grad=True)
    y = torch.rand(n, v, generator=gen) if soft else index_targets(n, v, gen, ignored=(3,))
    weight = torch.rand(v, generator=gen) + 0.5
    views = (torch._neg_view(base), torch._neg_view(-y) if soft else y, torch._neg_view(-weight))
    assert views[0].is_neg() and views[2].is_neg()
    loss = fastxent.cross_entropy(*views, backend="compiled", **GENERAL)
    loss.backward()
    ref_loss, ref_grad = oracle(-base.detach(), y, weight, **GENERAL)
    assert max_err(loss, ref_loss) <= 1e-6
    assert max_err(-base.grad, ref_grad) <= 1e-6
    if soft:
        return
    eye = torch.eye(v)  # the logits as h·Wᵀ with W the identity: the walk's row kernel
    linear_loss = fastxent.linear_cross_entropy(
        -base.detach(), eye, y, class_weight=views[2], chunk_size=8, backend="compiled", **GENERAL
    )
    assert max_err(linear_loss, ref_loss) <= 1e-6


def test_a_tensor_subclass_takes_the_portable_kernel_and_spoils_no_variant():
    """A ``__torch_function__`` subclass made the graph fail to build: a warning, and its variant
    marked failed, so later plain calls of that variant ran the slower portable kernel."""

    class Logged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    gen = torch.Generator().manual_seed(10)
    z = torch.randn(32, 200, generator=gen)
    y = index_targets(32, 200, gen)
    failed_before = set(kernel._failed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fall-back's RuntimeWarning would raise here
        loss, grad = run(z.as_subclass(Logged), y, **GENERAL)
    assert Logged.calls > 0
    assert kernel._failed == failed_before
    ref_loss, ref_grad = oracle(z, y, **GENERAL)
    assert max_err(loss, ref_loss) <= 1e-6
    assert max_err(grad, ref_grad) <= 1e-6
