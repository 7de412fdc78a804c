"""fastxent.cross_entropy on CPU (the portable row kernel, and the fused-ops path "auto" takes
for small calls) against PyTorch and the float64 reference."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastxent
from fastxent import functional, reference
from fastxent.check import torch_composed
from versions import folds_in_place, newer_torch

BACKEND = "torch"  # the row kernel
# Both ways a CPU call is computed: the row kernel, and PyTorch's fused ops ("auto", small calls).
PATHS = ["torch", "auto"]
SHAPES = [(7,), (5, 7), (3, 7, 2, 4), (1, 1), (2, 423)]


def make_case(shape, soft, weighted, ignore_index=-100, seed=0, dtype=torch.float64):
    """Logits (scale 3), targets with one ignored position, optional class weights."""
    g = torch.Generator().manual_seed(seed)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    z = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    if soft:
        target = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
        target = torch.randint(0, num_classes, target_shape, generator=g)
        if target.numel() > 1:
            target.view(-1)[0] = ignore_index
    weight = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    return z, target, weight


def loss_and_grad(fn, z, *args, grad_output=None, **kwargs):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, *args, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), z.grad


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_torch_float64(backend, shape, soft, weighted, reduction, label_smoothing):
    """Loss and gradient equal F.cross_entropy to 1e-12 relative, for every option torch has."""
    z, target, weight = make_case(shape, soft, weighted)
    for ignore_index in [-100] if soft else [-100, 2 % z.shape[-1 if z.dim() == 1 else 1]]:
        if not soft and target.dim() and target.numel() > 1:
            target.view(-1)[0] = ignore_index
        kwargs = {
            "ignore_index": ignore_index,
            "reduction": reduction,
            "label_smoothing": label_smoothing,
        }
        want = loss_and_grad(F.cross_entropy, z, target, weight, **kwargs)
        got = loss_and_grad(fastxent.cross_entropy, z, target, weight, backend=backend, **kwargs)
        if torch.isnan(want[0]).any():  # every target ignored: torch says NaN, we say 0
            continue
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", [*PATHS, "compiled"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 7, 2, 4)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_probability_targets_and_their_class_weights_get_pytorchs_gradients(
    backend, reduction, shape, z_loss
):
    """PyTorch differentiates its probability-target loss in the targets and class weights
    too; such calls run on PyTorch's ops (whatever the backend) and match its gradients to
    1e-12. The z-loss s·lse² reaches neither (its mean is over the rows, as the CE's)."""
    z, target, weight = make_case(shape, soft=True, weighted=True)
    g = torch.Generator().manual_seed(1)

    def leaves():
        return [x.detach().clone().requires_grad_() for x in (z, target, weight)]

    mine, theirs = leaves(), leaves()
    kwargs = {"reduction": reduction, "label_smoothing": 0.2}
    loss = fastxent.cross_entropy(*mine, z_loss=z_loss, backend=backend, **kwargs)
    want = F.cross_entropy(*theirs, **kwargs)
    lse_squared = torch.logsumexp(theirs[0], dim=1).square() * z_loss
    want = want + (lse_squared if reduction == "none" else getattr(lse_squared, reduction)())
    grad_output = torch.rand(want.shape, generator=g, dtype=torch.float64) + 0.5
    loss.backward(grad_output)
    want.backward(grad_output)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-13)
    for got_grad, want_grad in zip(mine, theirs, strict=True):
        torch.testing.assert_close(got_grad.grad, want_grad.grad, rtol=1e-12, atol=1e-13)


def test_targets_requiring_grad_need_no_detach_without_a_graph():
    """Under no_grad a target or class weight that requires grad asks for no gradient."""
    z, target, weight = make_case((5, 7), soft=True, weighted=True)
    want = F.cross_entropy(z, target, weight)
    with torch.no_grad():
        got = fastxent.cross_entropy(
            z, target.requires_grad_(), weight.requires_grad_(), backend="torch"
        )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    z, target, _ = make_case((5, 7), soft=False, weighted=False)
    with pytest.raises(ValueError, match="not computed for class-index targets"):
        fastxent.cross_entropy(z, target, weight)  # as PyTorch: no weight gradient there


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize(
    "extras",
    [
        {"z_loss": 1e-2},
        {"softcap": 5.0},
        {"logit_scale": 0.5},
        {"z_loss": 1e-3, "softcap": 2.0, "logit_scale": 1.3},
    ],
)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("soft", [False, True])
def test_extras_match_reference_and_torch(backend, extras, reduction, soft):
    """z-loss, softcap and logit scale against the reference and PyTorch composed with autograd."""
    z, target, weight = make_case((6, 11, 2), soft, weighted=True, seed=3)
    grad_output = torch.rand(6, 2, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kwargs = {"reduction": reduction, "label_smoothing": 0.1, **extras}
    got = loss_and_grad(
        fastxent.cross_entropy,
        z,
        target,
        weight,
        backend=backend,
        grad_output=grad_output,
        **kwargs,
    )
    want = loss_and_grad(torch_composed, z, target, weight, grad_output=grad_output, **kwargs)
    ref_loss, ref_grad = reference.cross_entropy(
        z.numpy(),
        target.numpy(),
        weight.numpy(),
        grad_output=None if grad_output is None else grad_output.numpy(),
        **kwargs,
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got[0].numpy(), ref_loss, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got[1].numpy(), ref_grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("soft", [False, True])
def test_low_precision_error_bounded_by_torch(backend, dtype, soft):
    """In fp32/bf16/fp16 our error against float64 is at most torch's own error plus a margin.

    Margins: the gradient is stored in the input dtype, so one rounding (half an ulp) is allowed.
    """
    z64, target, weight = make_case((64, 1000), soft, weighted=True, seed=5)
    z = z64.to(dtype)
    ref = loss_and_grad(F.cross_entropy, z.double(), target, weight, label_smoothing=0.1)
    tgt = target.to(dtype) if soft else target
    mine = loss_and_grad(
        fastxent.cross_entropy, z, tgt, weight.to(dtype), label_smoothing=0.1, backend=backend
    )
    torch_ = loss_and_grad(F.cross_entropy, z, tgt, weight.to(dtype), label_smoothing=0.1)
    assert mine[0].dtype == torch.float32  # loss in float32 for fp32/bf16/fp16
    assert mine[1].dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    loss_err = (mine[0].double() - ref[0]).abs().item()
    torch_loss_err = (torch_[0].double() - ref[0]).abs().item()
    assert loss_err <= torch_loss_err + tol * ref[0].abs().item()
    grad_err = (mine[1].double() - ref[1]).abs().max().item()
    torch_grad_err = (torch_[1].double() - ref[1]).abs().max().item()
    assert grad_err <= torch_grad_err + tol * ref[1].abs().max().item()


@pytest.mark.parametrize("backend", PATHS)
def test_float32_accumulation_for_bf16(backend):
    """A bf16 row whose sum-exp would lose precision in bf16 still gives a float32-exact loss."""
    z = torch.zeros(2, 50000, dtype=torch.bfloat16)
    target = torch.tensor([0, 1])
    loss = fastxent.cross_entropy(z, target, backend=backend)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(np.log(50000.0), dtype=torch.float32))


@pytest.mark.parametrize("backend", [*PATHS, "compiled"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.float64, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
)
def test_class_weights_of_another_float_dtype(backend, soft, dtype, weight_dtype):
    """README: class weights may have any floating dtype (PyTorch asks for the logits'). The
    value is PyTorch's float64 loss and gradient of the same rounded inputs, to the logits'
    precision."""
    z, target, weight = make_case((6, 33), soft=soft, weighted=True, dtype=dtype)
    weight = weight.to(weight_dtype)
    kw = {"label_smoothing": 0.1}
    got = loss_and_grad(fastxent.cross_entropy, z, target, weight, backend=backend, **kw)
    want = loss_and_grad(F.cross_entropy, z.double(), target, weight.double(), **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=0)
    torch.testing.assert_close(got[1].double(), want[1], rtol=0, atol=tol * want[1].abs().max())


@pytest.mark.parametrize("backend", [*PATHS, "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("target_dtype", [torch.float64, torch.float32, torch.float16])
def test_the_loss_dtype_follows_the_logits_not_the_probability_targets(
    backend, dtype, target_dtype
):
    """README: float32 for float32/bf16/fp16 logits whatever the targets' dtype, float64 for
    float64 logits; the value is the float64 loss of the same (rounded) inputs."""
    z, target, _ = make_case((6, 33), soft=True, weighted=False, dtype=dtype)
    target = target.to(target_dtype)
    loss = fastxent.cross_entropy(z, target, backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = F.cross_entropy(z.double(), target.double())
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "compiled", "triton"])
@pytest.mark.parametrize(
    "case",
    [{}, {"label_smoothing": 0.2}, {"label_smoothing": 0.2, "weighted": True}, {"soft": True}],
)
def test_float32_logits_with_a_large_common_offset(backend, case):
    """Logits 1000 + z lose nothing to cancellation: loss and gradient errors against float64 are
    within 2x PyTorch's own float32 errors (plus 2e-6 / 1e-7), as they are without the offset.

    ``lse·Σt - Σ t z'`` computed directly cancels two numbers near 1000 and was off by 3e-5 here;
    ``exp(z' - lse)`` with lse near 1000 put 1e-5 errors in the Triton gradient.
    """
    case = dict(case)
    z, target, weight = make_case((16, 100), case.pop("soft", False), case.pop("weighted", False))
    if target.dim() == 2:
        target = target * 1.3 / target.sum(dim=1, keepdim=True)  # targets summing to 1.3
    z = z + 1000.0
    grad_output = torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(fn, dtype, **kwargs):
        def cast(x):
            return x.to(dtype) if x is not None and x.is_floating_point() else x

        return loss_and_grad(fn, cast(z), cast(target), cast(weight), grad_output=cast(grad_output),
                             reduction="none", **case, **kwargs)  # fmt: skip

    want = run(F.cross_entropy, torch.float64)
    torch_f32 = run(F.cross_entropy, torch.float32)
    got = run(fastxent.cross_entropy, torch.float32, backend=backend)
    for ours, theirs, exact, tol in zip(got, torch_f32, want, (2e-6, 1e-7), strict=True):
        our_err = (ours.double() - exact).abs().max().item()
        torch_err = (theirs.double() - exact).abs().max().item()
        assert our_err <= 2 * torch_err + tol, (our_err, torch_err)


@pytest.mark.parametrize("backend", PATHS)
def test_non_contiguous_input(backend):
    base = torch.randn(16, 64, dtype=torch.float64)
    z = base[:, ::2]  # stride 2 along classes
    zt = torch.randn(32, 8, dtype=torch.float64).t()  # transposed
    for logits in (z, zt):
        target = torch.randint(0, logits.shape[1], (logits.shape[0],))
        want = loss_and_grad(F.cross_entropy, logits, target)
        got = loss_and_grad(fastxent.cross_entropy, logits, target, backend=backend)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-13)


def test_many_chunks_and_grad_output():
    """More rows than one chunk holds, with grad_output != 1 (mean and sum)."""
    from fastxent._torch import rows_per_chunk

    z, target, _ = make_case((rows_per_chunk(5000) * 2 + 3, 5000), soft=False, weighted=False)
    for reduction in ("mean", "sum"):
        g = torch.tensor(2.5, dtype=torch.float64)
        want = loss_and_grad(F.cross_entropy, z, target, reduction=reduction, grad_output=g)
        got = loss_and_grad(
            fastxent.cross_entropy, z, target, reduction=reduction, grad_output=g, backend=BACKEND
        )
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", PATHS)
def test_gradcheck_float64(backend):
    z, target, weight = make_case((4, 6), soft=False, weighted=True, seed=2)
    for kwargs in ({}, {"label_smoothing": 0.2, "z_loss": 0.1, "softcap": 3.0, "logit_scale": 0.8}):

        def f(x, kwargs=kwargs):
            return fastxent.cross_entropy(x, target, weight, backend=backend, **kwargs)

        assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(),))
    soft_target = torch.rand(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: fastxent.cross_entropy(x, soft_target, reduction="none", backend=backend),
        (z.clone().requires_grad_(),),
    )


@pytest.mark.parametrize("backend", PATHS)
def test_all_ignored_gives_zero_loss_and_zero_grad(backend):
    z = torch.randn(3, 5, requires_grad=True)
    target = torch.full((3,), -100)
    for reduction in ("mean", "sum"):
        loss = fastxent.cross_entropy(z, target, reduction=reduction, backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert not torch.isnan(loss)
        assert not z.grad.any()
        z.grad = None


@pytest.mark.parametrize("backend", [*PATHS, "compiled"])
@pytest.mark.parametrize("shape", [(0, 0), (0, 0, 3), (0, 5)])
@pytest.mark.parametrize("soft", [False, True])
def test_an_empty_batch_matches_pytorch_even_without_classes(backend, shape, soft):
    """No rows: PyTorch's sum and "none" (an empty loss), and "mean" 0 (all ignored) where
    PyTorch's is NaN. A (0, 0) batch raised "no classes" and the (0, 0, 3) one a reshape error,
    though with no rows there is no softmax to take."""
    z = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rows = shape[:1] + shape[2:]
    target = torch.rand(shape, dtype=torch.float64) if soft else torch.zeros(rows, dtype=torch.long)
    for reduction in ("none", "sum", "mean"):
        loss = fastxent.cross_entropy(z, target, reduction=reduction, backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        want = F.cross_entropy(z, target, reduction=reduction)
        assert loss.shape == want.shape and grad.shape == z.shape
        assert loss.sum().item() == 0.0


@pytest.mark.parametrize("backend", [*PATHS, "compiled", "linear"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_ignored_rows_keep_a_zero_gradient_under_a_non_finite_grad_output(backend, bad):
    """PyTorch leaves an ignored row's gradient 0 whatever grad_output is. The forward-made
    gradient times grad_output made it NaN (0·inf): a sum over an accumulation step of only
    ignored tokens divided by its count 0 (transformers' num_items_in_batch) then turned the
    gradients NaN where PyTorch's were 0. Per-row grad_outputs ("none") likewise."""
    z64 = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([-100, 2, -100, 5])

    def gradient(fn, reduction, grad_output, partial):
        x = z64.clone().requires_grad_()
        y = torch.full_like(target, -100) if not partial else target
        fn(x, y, reduction=reduction).backward(grad_output)
        return x.grad

    def ours(x, y, reduction):
        if backend == "linear":  # the logits as h·Wᵀ with W the identity, walked in chunks
            eye = torch.eye(6, dtype=torch.float64)
            return fastxent.linear_cross_entropy(x, eye, y, reduction=reduction, chunk_size=2)
        return fastxent.cross_entropy(x, y, reduction=reduction, backend=backend)

    cases = [
        ("sum", torch.tensor(bad, dtype=torch.float64), False),
        ("none", torch.tensor([bad, 1.0, bad, 2.0], dtype=torch.float64), True),
    ]
    for reduction, grad_output, partial in cases:
        got = gradient(ours, reduction, grad_output, partial)
        want = gradient(F.cross_entropy, reduction, grad_output, partial)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("backend", PATHS)
def test_zero_and_nan_total_weight(backend):
    """Class weights summing to 0 over the counted rows: "mean" gives 0 (as all-ignored); a NaN
    weight on a target class gives a NaN loss, never a silent number."""
    z, target = torch.randn(3, 5), torch.tensor([0, 1, 1])
    zero = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    assert fastxent.cross_entropy(z, target, weight=zero, backend=backend).item() == 0.0
    nan = torch.tensor([float("nan"), 1.0, 1.0, 1.0, 1.0])
    assert torch.isnan(fastxent.cross_entropy(z, target, weight=nan, backend=backend))


@pytest.mark.parametrize("backend", [*PATHS, "compiled", "triton"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_an_infinite_class_weight_gives_pytorchs_inf(backend, reduction):
    """Row 0's target, its row's maximum, has weight inf: PyTorch's loss is inf there (the
    kernels' (lse - m)·w - w·(z'_y - m) made it NaN, inf·0). Row 1 stays finite."""
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    target, weight = torch.tensor([0, 1]), torch.tensor([torch.inf, 1.0, 1.0], dtype=z.dtype)
    got = fastxent.cross_entropy(z, target, weight, reduction=reduction, backend=backend)
    want = F.cross_entropy(z, target, weight, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got.isinf().any()


@pytest.mark.parametrize("backend", PATHS)
def test_ignore_index_may_be_a_valid_class(backend):
    z, target, _ = make_case((8, 5), soft=False, weighted=False)
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    want = loss_and_grad(F.cross_entropy, z, target, ignore_index=1)
    got = loss_and_grad(fastxent.cross_entropy, z, target, ignore_index=1, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert not got[1][target == 1].any()


def test_a_row_longer_than_the_portable_kernels_chunk():
    """More classes than the portable kernel's chunk of CHUNK_ELEMENTS logits: one row per
    chunk (a rows-per-chunk of 0 made range() fail), loss and gradient as PyTorch's."""
    from fastxent._torch.kernel import CHUNK_ELEMENTS

    v = CHUNK_ELEMENTS + 1
    z = torch.randn(2, v, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([3, v - 1])
    want = loss_and_grad(F.cross_entropy, z, target)
    got = loss_and_grad(fastxent.cross_entropy, z, target, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", PATHS)
def test_nan_and_inf_propagate_like_torch(backend):
    z = torch.randn(4, 6, dtype=torch.float64)
    z[0, 3] = float("nan")
    z[1, 2] = float("-inf")  # a masked class: finite loss
    z[2, :] = float("-inf")
    target = torch.tensor([0, 1, 2, 3])
    want = F.cross_entropy(z, target, reduction="none")
    got = fastxent.cross_entropy(z, target, reduction="none", backend=backend)
    assert torch.isnan(want[[0, 2]]).all()  # the NaN row and the all -inf row
    # Every row as PyTorch's: NaN where it has NaN, the finite ones to float64 rounding.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", [*PATHS, "compiled"])
@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_ignored_rows_add_nothing_whatever_their_logits(backend, bad):
    """An ignored row's non-finite logits (a class masked with -inf, say) must not reach the
    loss: PyTorch's nll_loss skips the row, and so must every path (0·inf is NaN). With a
    z-loss the loss is PyTorch's composed one (check.torch_composed, which counts s·lse² on
    kept rows only) to 1e-12: finiteness alone passed an ignored row's finite lse² at -inf."""
    if backend == "compiled" and functional.unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend} cannot run here")
    z, _, _ = make_case((6, 9), soft=False, weighted=False, seed=4)
    z[1, 0] = z[4, 0] = bad  # rows 1 and 4 ignored below (one by the default, one by value)
    for ignore_index, target in ((-100, [3, -100, 2, 0, -100, 8]), (5, [3, 5, 2, 0, 5, 8])):
        target = torch.tensor(target)
        for reduction in ("mean", "none", "sum"):
            kwargs = {"ignore_index": ignore_index, "reduction": reduction, "z_loss": 0.0}
            got = fastxent.cross_entropy(z, target, backend=backend, **kwargs)
            want = F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
            kwargs["z_loss"] = 0.1
            with_z_loss = fastxent.cross_entropy(z, target, backend=backend, **kwargs)
            want = torch_composed(z, target, **kwargs)
            torch.testing.assert_close(with_z_loss, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", [*PATHS, "compiled"])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_a_positive_infinite_logit_gives_a_nan_row_like_torch(backend, z_loss):
    """log-softmax of a row holding +inf is inf - inf: PyTorch's loss and gradient row are NaN.
    With a z-loss the row used to come out +inf instead."""
    if backend == "compiled" and functional.unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend} cannot run here")
    z, target, _ = make_case((5, 9), soft=False, weighted=False, seed=8)
    target = torch.tensor([0, 1, 2, 3, -100])
    z[1, 5] = float("inf")
    z[2, 2] = float("inf")  # at the target
    z[4, 6] = float("inf")  # in an ignored row: no loss, but PyTorch's gradient row is NaN
    x = z.clone().requires_grad_()
    F.cross_entropy(x, target, reduction="sum").backward()
    loss, grad = loss_and_grad(
        fastxent.cross_entropy, z, target, reduction="none", z_loss=z_loss, backend=backend
    )
    assert torch.equal(torch.isnan(loss), torch.tensor([False, True, True, False, False]))
    assert torch.equal(torch.isnan(grad), torch.isnan(x.grad))  # entry by entry


@pytest.mark.parametrize("backend", [*PATHS, "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_huge_finite_logits_give_torchs_loss_without_z_loss(backend, dtype):
    """lse² overflows past |lse| ~ 1.8e19 in float32 (1.3e154 in float64): without a z-loss
    the loss must not be 0·inf = NaN (the portable kernel's rows were, and the compiled kernel
    hands it the rows whose maximum lies past its shift's columns: class 80 here)."""
    if backend == "compiled" and functional.unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"{backend} cannot run here")
    big = 1e155 if dtype == torch.float64 else 1e20
    z = torch.randn(4, 100, dtype=torch.float64)
    z[:, 80] = big
    z[1] = big  # every logit of row 1: lse = big + log 100
    z = z.to(dtype)
    target = torch.tensor([80, 3, 3, -100])
    for inplace in (False, True):
        logits = z.clone().requires_grad_() * 1.0  # not a leaf: inplace_backward may write it
        got = fastxent.cross_entropy(logits, target, inplace_backward=inplace, backend=backend)
        want = F.cross_entropy(z.double(), target)
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_inplace_backward_matches_and_overwrites_logits():
    x = torch.randn(8, 50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (8,))
    logits = x * 2
    version = logits._version
    loss = fastxent.cross_entropy(logits, target, inplace_backward=True, backend=BACKEND)
    assert logits._version > version  # autograd sees the write
    loss.backward()
    reference_x = x.detach().clone().requires_grad_()
    F.cross_entropy(reference_x * 2, target).backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-12, atol=1e-13)


def test_inplace_backward_raises_when_logits_are_needed_elsewhere():
    """exp() saves its output for backward; overwriting it must raise, not corrupt."""
    x = torch.randn(4, 10, requires_grad=True)
    logits = torch.exp(x)
    loss = fastxent.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_writing_logits_after_inplace_forward_raises():
    x = torch.randn(4, 10, requires_grad=True)
    logits = x * 2
    loss = fastxent.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True)
    logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place after forward"):
        loss.backward()


def test_inplace_backward_refuses_a_leaf():
    z = torch.randn(4, 10, requires_grad=True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        fastxent.cross_entropy(z, torch.tensor([1, 2, 3, 4]), inplace_backward=True)


@pytest.mark.parametrize("view", [lambda w: w.view(4, 10), lambda w: w[:3], lambda w: w.t().t()])
def test_inplace_backward_refuses_a_view_of_a_leaf(view):
    """A view shares the leaf's storage: writing the gradient there would overwrite the
    parameter (PyTorch refuses in-place ops on such views too)."""
    w = torch.randn(4, 10, requires_grad=True)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"leaf tensor that requires grad .*through a view"):
        fastxent.cross_entropy(view(w), torch.tensor([1, 2, 3, 4])[: view(w).shape[0]],
                               inplace_backward=True)  # fmt: skip
    assert torch.equal(w.detach(), before)


def test_inplace_backward_refuses_a_view_that_is_itself_a_leaf_requiring_grad():
    """``x.detach()[:4].requires_grad_()`` is a view whose base requires no grad, and itself a
    leaf that requires grad (PyTorch refuses in-place ops on it): it was taken, and the gradient
    overwrote the caller's data, here a parameter's, through the shared memory."""
    param = torch.nn.Parameter(torch.randn(6, 10))
    before = param.detach().clone()
    for z in (param.detach()[:4].requires_grad_(), torch.randn(8, 10)[::2].requires_grad_()):
        assert z.is_leaf and z._is_view() and not z._base.requires_grad
        with pytest.raises(ValueError, match=r"leaf tensor that requires grad \("):
            fastxent.cross_entropy(z, torch.tensor([1, 2, 3, 4]), inplace_backward=True)
    assert torch.equal(param.detach(), before)


def test_inplace_backward_refuses_expanded_logits():
    z = (torch.randn(1, 10, requires_grad=True) * 1.0).expand(4, 10)
    with pytest.raises(ValueError, match=r"expanded.*input\.contiguous"):
        fastxent.cross_entropy(z, torch.tensor([1, 2, 3, 4]), inplace_backward=True)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_inplace_backward_refuses_targets_and_weights_in_the_logits_memory(backend):
    """Class weights taken from a row of the logits, read while the kernel overwrote them, gave
    the compiled kernel a loss 20x off; a copy of them gives PyTorch's loss."""
    leaf = torch.randn(6, 80, dtype=torch.float64).softmax(1).requires_grad_()
    classes = torch.arange(6)
    inplace = {"inplace_backward": True, "backend": backend}
    for call in (
        lambda z: fastxent.cross_entropy(z, classes, z[0].detach(), **inplace),
        lambda z: fastxent.cross_entropy(z, z.detach()[:, :], **inplace),
    ):
        with pytest.raises(ValueError, match=r"shares their memory.*\.clone\(\)"):
            call(leaf * 1.0)
    z = leaf * 1.0
    weight = z[0].detach().clone()
    loss = fastxent.cross_entropy(z, classes, weight, inplace_backward=True, backend=backend)
    want = F.cross_entropy(leaf.detach(), classes, weight)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)


def test_inplace_backward_refuses_overlapping_rows_and_takes_strided_ones():
    """Windows from unfold share memory without a zero stride: writing each row's gradient
    there overwrote its neighbours' logits (wrong loss and gradient). A transpose or a
    column slice shares none and is taken."""
    x = torch.randn(30, dtype=torch.float64, requires_grad=True)
    windows = (x * 1.0).unfold(0, 9, 3)  # (8, 9), strides (3, 1): rows overlap
    target = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    with pytest.raises(ValueError, match=r"share it .*unfold"):
        fastxent.cross_entropy(windows, target, inplace_backward=True)
    base = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    for z in (lambda: (base[:, :8] * 1.0).t(), lambda: (base * 1.0)[:, ::2].t()):  # (8, 9)
        want = loss_and_grad(F.cross_entropy, z().detach(), target)
        loss = fastxent.cross_entropy(z(), target, inplace_backward=True, backend=BACKEND)
        torch.testing.assert_close(loss, want[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("grad_output", [0.5, float("inf")])
def test_inplace_backward_into_float16_logits_with_the_negative_bit(grad_output):
    """inplace_backward into float16 logits that are a ``torch._neg_view``: PyTorch's float32
    -> float16 ``copy_`` ignores the destination's negative bit (torch 2.13), so the gradient
    written there came out negated (200% off, silently), and so did the entries that an inf
    grad_output scales in backward (whose zeros are kept). The same values without the bit,
    and PyTorch in float64, are the references."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(4, 9, generator=gen).half()
    target = torch.tensor([1, -100, 3, 8])
    grads = []
    for neg in (True, False):
        x = base.clone().requires_grad_()
        z = torch._neg_view(x * 1.0) if neg else -(x * 1.0)
        assert z.is_neg() == neg
        loss = fastxent.cross_entropy(
            z, target, reduction="sum", inplace_backward=True, backend=BACKEND
        )
        loss.backward(torch.tensor(grad_output))
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    if grad_output == 0.5:
        x64 = base.double().requires_grad_()
        F.cross_entropy(-x64, target, reduction="sum").backward(torch.tensor(0.5).double())
        torch.testing.assert_close(grads[0].double(), x64.grad, rtol=2e-3, atol=1e-4)


@newer_torch((2, 11), "PyTorch's own loss takes a (1,) target for (C,) logits (2.8's did not)")
@pytest.mark.parametrize("backend", PATHS)
def test_a_single_class_index_in_a_one_element_target(backend):
    """(C,) logits take a (1,) target as PyTorch does: a 0-dim loss equal to the 0-dim target's."""
    z = torch.randn(7, dtype=torch.float64)
    for reduction in ("mean", "none"):
        want = F.cross_entropy(z, torch.tensor([3]), reduction=reduction)
        got = fastxent.cross_entropy(z, torch.tensor([3]), reduction=reduction, backend=backend)
        assert got.shape == want.shape == ()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    one_class = torch.randn(1, dtype=torch.float64)  # and (1,) probabilities of (1,) logits
    p = torch.tensor([0.7], dtype=torch.float64)
    got = fastxent.cross_entropy(one_class, p, backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(one_class, p), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", PATHS)
def test_negative_ignore_index_has_no_effect_on_probability_targets(backend):
    """PyTorch refuses a class index as ignore_index with probabilities, not a negative one."""
    z, target, _ = make_case((5, 7), soft=True, weighted=False)
    want = F.cross_entropy(z, target, ignore_index=-1)
    got = fastxent.cross_entropy(z, target, ignore_index=-1, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="ignore_index is only supported"):
        fastxent.cross_entropy(z, target, ignore_index=0, backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_twice_through_a_retained_graph(reduction):
    """retain_graph: the second backward gives the same gradient (here accumulated twice)."""
    z = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 2, 3, 4])
    loss = fastxent.cross_entropy(z, target, reduction=reduction, backend=BACKEND)
    grad_output = torch.full_like(loss, 1.5)
    loss.backward(grad_output, retain_graph=True)
    first = z.grad.clone()
    (second,) = torch.autograd.grad(loss, z, grad_output * 2, retain_graph=True)
    want = loss_and_grad(F.cross_entropy, z, target, reduction=reduction, grad_output=grad_output)
    torch.testing.assert_close(first, want[1], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(second, 2 * want[1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_retained_graph_after_a_zero_grad_output(reduction):
    """A first backward with grad_output 0 (a loss weight scheduled to 0) folded the 0 into the
    buffer, and every later backward raised; PyTorch's gives the later gradients. Also a 0 in
    one row of a "none" grad_output."""
    z = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 2, 3, 4])
    loss = fastxent.cross_entropy(z, target, reduction=reduction, backend=BACKEND)
    zero = torch.zeros_like(loss) if reduction == "mean" else torch.tensor([0.0, 1, 2, 3])
    (first,) = torch.autograd.grad(loss, z, zero.double(), retain_graph=True)
    (second,) = torch.autograd.grad(loss, z, torch.full_like(loss, 1.5), retain_graph=True)
    (third,) = torch.autograd.grad(loss, z, torch.full_like(loss, -2.0))
    want = loss_and_grad(F.cross_entropy, z, target, reduction=reduction)[1]
    torch.testing.assert_close(first, want * zero.double().reshape(-1, 1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(second, 1.5 * want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(third, -2.0 * want, rtol=1e-12, atol=1e-13)


def _checkpointed(loss_fn):
    """loss_fn recomputed at each unpack (non-reentrant activation checkpointing)."""
    return lambda x: torch.utils.checkpoint.checkpoint(loss_fn, x, use_reentrant=False)


def _hooked(pack, unpack):
    """loss_fn with its saved tensors packed and unpacked by ``pack``, ``unpack``."""

    def wrap(loss_fn):
        def run(x):
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return loss_fn(x)

        return run

    return wrap


def _on_cpu(loss_fn):
    def run(x):
        with torch.autograd.graph.save_on_cpu():
            return loss_fn(x)

    return run


HOOKED = {
    "checkpoint": _checkpointed,
    "copies": _hooked(lambda t: t, lambda t: t.clone()),
    "identity": _hooked(lambda t: t, lambda t: t),  # a new tensor object on the same memory
    "detach": _hooked(lambda t: t, lambda t: t.detach()),
    "save_on_cpu": _on_cpu,
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("wrap", HOOKED.values(), ids=HOOKED.keys())
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_backward_again_through_saved_tensor_hooks(wrap, backend, inplace):
    """Under saved-tensor hooks each backward may get a recomputed buffer, a copy, or the
    kept memory under a new tensor: each scales by its own grad_output (folding into the first
    and rescaling by a ratio gave 1/2 or 2x the gradient on the second backward)."""
    z = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 16, (8,), generator=torch.Generator().manual_seed(0))
    loss = wrap(
        lambda x: fastxent.cross_entropy(x * 1.0, target, backend=backend, inplace_backward=inplace)
    )(z)
    want = loss_and_grad(F.cross_entropy, z, target)[1]
    for factor in (2.0, 1.0, 3.0):
        (got,) = torch.autograd.grad(factor * loss, z, retain_graph=True)
        torch.testing.assert_close(got, factor * want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "compiled", "auto"])
def test_create_graph_raises_where_the_gradient_is_made_in_forward(backend):
    """The gradient made in forward is a constant to autograd: a second derivative through it
    would be zero, so create_graph=True is refused; torch.func's hessian works (PyTorch's ops).
    Small auto calls run PyTorch's ops under autograd and differentiate twice as PyTorch does."""
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, 2, 1])
    want = torch.func.hessian(lambda x: F.cross_entropy(x, target))(z.detach())
    got = torch.func.hessian(lambda x: fastxent.cross_entropy(x, target, backend=backend))
    torch.testing.assert_close(got(z.detach()), want, rtol=1e-12, atol=1e-14)
    loss = fastxent.cross_entropy(z, target, backend=backend)
    if backend == "auto":
        (g,) = torch.autograd.grad(loss, z, create_graph=True)
        (row,) = torch.autograd.grad(g[0, 0], z)
        torch.testing.assert_close(row, want[0, 0], rtol=1e-12, atol=1e-14)
        return
    with pytest.raises(RuntimeError, match=r"not differentiable again.*create_graph=True"):
        torch.autograd.grad(loss, z, create_graph=True)


@folds_in_place
def test_backward_after_grad_was_accumulated_into_raises():
    z = torch.randn(4, 10, requires_grad=True)
    loss = fastxent.cross_entropy(z, torch.tensor([1, 2, 3, 4]), backend=BACKEND)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)  # fine: accumulates into z.grad, which is our buffer
    with pytest.raises(RuntimeError, match="modified in place after forward"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_kept_loss_does_not_keep_its_gradient_after_backward(reduction):
    """As PyTorch frees saved tensors: a loss kept after backward (a list of losses, a running
    total) no longer holds the N×V gradient, and a second backward raises PyTorch's error."""
    z = torch.randn(4, 10, requires_grad=True)
    loss = fastxent.cross_entropy(z, torch.tensor([1, 2, 3, 4]), reduction=reduction,
                                  backend=BACKEND)  # fmt: skip
    node = loss.grad_fn  # "none" reshapes the rows' losses: a view's node first
    while type(node).__name__ != "CrossEntropyFunctionBackward":
        node = node.next_functions[0][0]
    (buffer,) = node.saved_tensors
    storage = buffer.untyped_storage()  # holds the storage: one use, once nothing else does
    del buffer
    loss.sum().backward()
    z.grad = None
    assert torch._C._storage_Use_Count(storage._cdata) == 1
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.sum().backward()


@folds_in_place
def test_leaf_grad_is_the_forward_buffer_not_a_copy():
    """Memory: the first backward hands its buffer to autograd, which keeps it as .grad."""
    z = torch.randn(4, 10, requires_grad=True)
    loss = fastxent.cross_entropy(z, torch.tensor([1, 2, 3, 4]), backend=BACKEND)
    (buffer,) = loss.grad_fn.saved_tensors
    loss.backward()
    assert z.grad.data_ptr() == buffer.data_ptr()


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("backend", ["torch", "compiled", "auto"])
def test_no_gradient_buffer_without_grad_mode(backend, grad_mode, shapes_passed_to):
    """Under no_grad or inference_mode, logits that require grad get their loss and no N×V
    gradient buffer (inference_mode used to fail on that buffer's version counter). 600 × 1000
    logits: "auto" takes the compiled kernel (above the fused-ops limit)."""
    from fastxent import _autograd

    buffers = shapes_passed_to(_autograd, "gradient_buffer_like")
    z = torch.randn(600, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (600,))
    with grad_mode():
        loss = fastxent.cross_entropy(z, target, backend=backend)
    assert buffers == [] and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(z.detach(), target))


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant, backend):
    """Under torch.utils.checkpoint the loss is recomputed in backward (its gradient made again
    in that forward): parameter gradients equal PyTorch's, for both checkpoint kinds."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    layer = torch.nn.Linear(16, 700).double()
    x = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 700, (300,))
    grads = []
    ours = functools.partial(fastxent.cross_entropy, backend=backend)
    for loss_fn in (ours, F.cross_entropy):
        layer.zero_grad()
        x.grad = None
        loss = checkpoint(
            lambda h, fn=loss_fn: fn(layer(h), target, label_smoothing=0.1),
            x,
            use_reentrant=use_reentrant,
        )
        loss.backward()
        grads.append((loss.detach(), x.grad, layer.weight.grad.clone()))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_module_matches_torch_module():
    weight = torch.rand(10) + 0.5
    ours = fastxent.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction="sum")
    z, target = torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    ours, theirs = ours.double(), theirs.double()
    torch.testing.assert_close(ours(z, target), theirs(z, target), rtol=1e-12, atol=1e-13)
    assert "weight" in dict(ours.named_buffers())
    assert "label_smoothing=0.1" in repr(ours)


def test_module_is_a_torch_cross_entropy_loss_with_its_state():
    """Code that asks isinstance(loss_fn, nn.CrossEntropyLoss), or loads such a module's
    state_dict, takes fastxent's module as PyTorch's (it was a plain nn.Module)."""
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    ours = fastxent.CrossEntropyLoss(torch.ones(7), ignore_index=3, label_smoothing=0.2).double()
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.2)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for name in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(ours, name) == getattr(theirs, name), name
    z, target = make_case((5, 7), soft=False, weighted=False, ignore_index=3)[:2]
    torch.testing.assert_close(
        loss_and_grad(ours, z, target), loss_and_grad(theirs, z, target), rtol=1e-12, atol=1e-13
    )


@pytest.mark.parametrize(
    ("size_average", "reduce", "reduction"),
    [(None, False, "none"), (False, None, "sum"), (True, True, "mean"), (False, False, "none")],
)
def test_positional_arguments_in_torchs_order(size_average, reduce, reduction):
    """Positional calls mean what they mean to PyTorch, its deprecated size_average/reduce
    included (turned into ``reduction`` with PyTorch's warning)."""
    z, target, weight = make_case((5, 7), soft=False, weighted=True, ignore_index=2)
    args = (z, target, weight, size_average, 2, reduce)
    with pytest.warns(UserWarning, match="deprecated"):
        want = loss_and_grad(F.cross_entropy, *args)
    with pytest.warns(UserWarning, match=f"reduction='{reduction}'"):
        got = loss_and_grad(fastxent.cross_entropy, *args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    plain = (z, target, weight, None, 2, None, "sum", 0.2)
    torch.testing.assert_close(
        loss_and_grad(fastxent.cross_entropy, *plain), loss_and_grad(F.cross_entropy, *plain)
    )
    with pytest.warns(UserWarning, match="deprecated"):
        ours = fastxent.CrossEntropyLoss(weight, size_average, 2, reduce)
        theirs = torch.nn.CrossEntropyLoss(weight, size_average, 2, reduce)
    assert ours.reduction == theirs.reduction == reduction
    torch.testing.assert_close(ours(z, target), theirs(z, target), rtol=1e-12, atol=1e-13)


def test_module_passes_backend_and_inplace_backward():
    loss_fn = fastxent.CrossEntropyLoss(inplace_backward=True, backend="torch")
    assert "inplace_backward=True, backend='torch'" in repr(loss_fn)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    logits, target = x * 1.0, torch.tensor([0, 1, 2])
    loss_fn(logits, target).backward()
    torch.testing.assert_close(x.grad, loss_and_grad(F.cross_entropy, x, target)[1])
    assert not torch.equal(logits, x)  # the gradient went into the logits' storage
    with pytest.raises(ValueError, match="unknown backend"):
        fastxent.CrossEntropyLoss(backend="gpu")(x, target)


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*'auto', 'torch'"):
        fastxent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="fast")


def test_auto_takes_the_portable_kernel_for_small_cpu_logits(monkeypatch):
    """At most AUTO_PORTABLE_MAX_LOGITS logits on CPU: "torch" (nothing compiled); above: the
    usual order. An explicit backend is never overridden."""
    import fastxent._compiled as compiled

    cpu = torch.device("cpu")
    limit = functional.AUTO_PORTABLE_MAX_LOGITS
    assert functional.resolve_backend("auto", cpu, limit)[0] == "torch"
    can_compile = functional.unavailable_reason("compiled", cpu) is None
    above = functional.resolve_backend("auto", cpu, limit + 1)[0]
    assert above == ("compiled" if can_compile else "torch")
    assert functional.resolve_backend("torch", cpu, 10 * limit)[0] == "torch"
    if not can_compile:
        return
    assert functional.resolve_backend("compiled", cpu, 1)[0] == "compiled"

    def not_here(*args, **kwargs):
        raise AssertionError("the compiled kernel ran")

    monkeypatch.setattr(compiled, "cross_entropy_rows", not_here)
    monkeypatch.setattr(functional, "AUTO_COMPOSED_MAX_LOGITS", 0)  # the row kernels' choice
    v = 1024
    z = torch.randn(limit // v, v, requires_grad=True)  # exactly the limit
    fastxent.cross_entropy(z, torch.randint(0, v, (limit // v,))).backward()
    hidden, weight = torch.randn(2, 16, 8, requires_grad=True), torch.randn(v, 8)
    fastxent.linear_cross_entropy(hidden, weight, torch.randint(0, v, (2, 16))).backward()
    with pytest.raises(AssertionError, match="the compiled kernel ran"):
        fastxent.cross_entropy(torch.randn(limit // v + 1, v), torch.zeros(limit // v + 1).long())


def test_auto_takes_the_fused_ops_path_for_small_cpu_calls(monkeypatch, shapes_passed_to):
    """ "auto" on CPU computes calls of at most AUTO_COMPOSED_MAX_LOGITS logits from PyTorch's
    fused ops; an explicit backend, inplace_backward or more logits take the row kernel."""
    calls = shapes_passed_to(functional.composed, "cross_entropy")
    limit = functional.AUTO_COMPOSED_MAX_LOGITS
    z, target = torch.randn(4, 6, requires_grad=True), torch.tensor([0, 1, 2, 3])
    fastxent.cross_entropy(z, target).backward()
    fastxent.CrossEntropyLoss()(z, target).backward()
    assert calls == [(4, 6)] * 2
    fastxent.cross_entropy(z, target, backend="torch").backward()
    logits = z * 1.0
    fastxent.cross_entropy(logits, target, inplace_backward=True).backward()
    assert not torch.equal(logits, z)  # the row kernel wrote the gradient into the logits
    monkeypatch.setattr(functional, "AUTO_COMPOSED_MAX_LOGITS", z.numel() - 1)
    monkeypatch.setattr(functional, "AUTO_PORTABLE_MAX_LOGITS", z.numel())  # nothing to compile
    fastxent.cross_entropy(z, target)
    assert calls == [(4, 6)] * 2 and limit >= z.numel()


def test_which_calls_take_the_fused_ops_on_each_device():
    """Size limits per device; the linear loss uses them on CPU only; explicit backends never."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cpu_limit, cuda_limit = (
        functional.AUTO_COMPOSED_MAX_LOGITS,
        functional.AUTO_COMPOSED_MAX_LOGITS_CUDA,
    )
    assert functional.uses_composed("auto", cpu, cpu_limit)
    assert not functional.uses_composed("auto", cpu, cpu_limit + 1)
    assert functional.uses_composed("auto", cpu, cpu_limit, linear=True)
    assert functional.uses_composed("auto", cuda, cuda_limit)
    assert not functional.uses_composed("auto", cuda, cuda_limit + 1)
    assert not functional.uses_composed("auto", cuda, 100, linear=True)
    assert not functional.uses_composed("triton", cuda, 100)
    assert not functional.uses_composed("torch", cpu, 100)
    assert not functional.uses_composed("auto", torch.device("meta"), 100)


@pytest.mark.parametrize("backend", PATHS)
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(1, 40),
    soft=st.booleans(),
    weighted=st.booleans(),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    eps=st.floats(0.0, 1.0),
    z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 1.5, 30.0]),
    scale=st.floats(0.25, 2.0),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(
    backend, n, v, soft, weighted, reduction, eps, z_loss, softcap, scale, strided, seed
):
    """Random options on random shapes; ``strided``: logits, targets and weights as strided
    views (every other column or entry) of larger tensors."""
    z, target, weight = make_case((n, v), soft, weighted, seed=seed)
    if strided:

        def spread(x):  # the same values, every other element of a tensor twice as wide
            return None if x is None else x.repeat_interleave(2, dim=-1)[..., ::2]

        z, weight = spread(z), spread(weight)
        target = spread(target) if soft else target.repeat_interleave(2)[::2]
    kwargs = {
        "reduction": reduction,
        "label_smoothing": eps,
        "z_loss": z_loss,
        "softcap": softcap,
        "logit_scale": scale,
    }
    got = loss_and_grad(fastxent.cross_entropy, z, target, weight, backend=backend, **kwargs)
    want = reference.cross_entropy(
        z.numpy(), target.numpy(), None if weight is None else weight.numpy(), **kwargs
    )
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-11, atol=1e-12)


def test_replacing_torchs_cross_entropy_with_fastxents_works(monkeypatch):
    """A drop-in is used as one: ``F.cross_entropy = fastxent.cross_entropy`` (as done to reach
    library code such as transformers' losses). fastxent's small calls, computed with PyTorch's
    loss, called it through that attribute and recursed until RecursionError."""
    z = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 3, 9])
    want = F.cross_entropy(z, target, label_smoothing=0.1)
    hidden, weight = z.detach(), torch.eye(10, dtype=torch.float64)
    want_linear = F.cross_entropy(hidden @ weight.T, target)
    monkeypatch.setattr(F, "cross_entropy", fastxent.cross_entropy)
    torch.testing.assert_close(F.cross_entropy(z, target, label_smoothing=0.1), want)
    torch.testing.assert_close(fastxent.linear_cross_entropy(hidden, weight, target), want_linear)


def test_docstrings_state_the_auto_thresholds_they_name():
    """help() readers see the sizes "auto" switches at, and they are the constants' values."""
    import re

    stated = []
    for fn in (fastxent.cross_entropy, fastxent.linear_cross_entropy):
        stated += re.findall(r":data:`(AUTO_\w+)`\s+\((2\^\d+)", fn.__doc__)
    assert len(stated) == 4
    for name, power in stated:
        assert getattr(functional, name) == 2 ** int(power.removeprefix("2^")), name
