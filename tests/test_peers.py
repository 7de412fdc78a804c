"""What README.md's "Coming from Liger-Kernel or Cut Cross-Entropy" maps, run on both sides.

Each test calls a peer and fastxent on the same inputs and compares the loss and the gradients
of the hidden states, the weight and the bias (where the peer takes one). Checked with
liger_kernel 0.8.5 and cut_cross_entropy 25.1.1 (each test skips without its peer).

Tolerance: both sides compute in float32, the same sums in another order, so the largest
difference is a few float32 ulps of the largest entry (at most 1.1e-6 of it here, in d_hidden).
``REL = 1e-5`` of the largest entry leaves a margin of 9x; an option off by 1% (label_smoothing
0.101 for 0.1) already fails it, and a different formula (a mean over another count, a term
missing) far more. Where a peer is lossy (bf16 results or bf16 accumulation) both are bounded
against float64 instead.

Without CUDA, Liger's Triton kernels run on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1; the ``liger`` fixture hands the interpreter's
kernels Python floats as fp32 scalars, as compiled Triton does, which Liger's class-weight path
needs), and CCE through its ``torch_compile`` path: its own kernel (``impl="cce"``) fails in the
interpreter, so the test of that kernel is a ``gpu`` test (Liger's softcap cases, too, run only
on CUDA). Each CCE option set compiles once (a few seconds), so there are few.
"""

import inspect
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastxent
from versions import TRITON_TOO_OLD

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REL = 1e-5  # float32 against float32, as the module docstring says
CLASS_WEIGHT = "class weight"  # stands for a (V,) tensor of class weights in the cases below


def assert_near(ours, theirs, what, rel=REL):
    """max |ours - theirs| <= rel · max |theirs|, with the numbers in the message."""
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {theirs.shape}"
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rel * scale, f"{what}: max difference {err:.3g}, allowed {rel:g} of {scale:.3g}"


def loss_and_grads(loss_fn, inputs, grad_output):
    """The loss of ``loss_fn(*leaves)`` and the gradients of the leaves (copies of ``inputs``;
    None stays None) after ``loss.backward(grad_output)``."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    loss.backward(grad_output)
    return [loss] + [None if x is None else x.grad for x in leaves]


def assert_same_results(ours, theirs, names):
    for name, a, b in zip(names, ours, theirs, strict=True):
        if b is not None:
            assert_near(a, b, name)


def make_case(tokens=48, dim=32, num_classes=257, ignore_index=-100, seed=0):
    """Hidden (tokens, D), weight (V, D) giving logits of std ~2, bias, class weights in
    [0.5, 1.5), and targets with every fifth ignored (and some equal to 5)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g)
    weight = torch.randn(num_classes, dim, generator=g) * 2 / dim**0.5
    bias = torch.randn(num_classes, generator=g)
    class_weight = torch.rand(num_classes, generator=g) + 0.5
    target = torch.randint(0, num_classes, (tokens,), generator=g)
    target[1::7] = 5
    target[::5] = ignore_index
    return [x.to(DEVICE) for x in (hidden, weight, bias, class_weight, target)]


def with_class_weight(options, class_weight):
    return {k: class_weight if v == CLASS_WEIGHT else v for k, v in options.items()}


def grad_output_for(reduction, rows):
    """A per-row grad_output for "none", else a scalar other than 1 (so backward scales)."""
    if reduction == "none":
        return torch.linspace(0.5, 1.5, rows, device=DEVICE)
    return torch.tensor(1.7, device=DEVICE)


# --- Liger-Kernel -----------------------------------------------------------------------------


def _pass_float_arguments_as_fp32(monkeypatch):
    """Compiled Triton passes a Python float argument to a kernel as an fp32 scalar; Triton's
    interpreter (3.9) passes it on as a Python float, on which Liger's class-weight path calls
    ``.to(tl.float32)`` and fails. Wrapping it as an fp32 scalar, as compiled Triton has it,
    lets that path run on CPU; Liger's kernels themselves run unchanged."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert = getattr(interpreter, "_implicit_cvt", None)
    if convert is None:
        pytest.skip("this Triton's interpreter has no _implicit_cvt to pass floats as fp32")

    def floats_as_fp32(arg):
        if isinstance(arg, float):
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", floats_as_fp32)


@pytest.fixture
def liger(monkeypatch):
    """liger_kernel.transformers (its losses, and .functional their functional forms)."""
    pytest.importorskip("liger_kernel")
    import liger_kernel.transformers as transformers
    import liger_kernel.transformers.functional  # noqa: F401  (transformers.functional)

    if INTERPRETED:
        if TRITON_TOO_OLD is not None:  # triton 3.0's interpreter: Liger's losses off by 16 too
            pytest.skip(f"Triton's interpreter: {TRITON_TOO_OLD}")
        _pass_float_arguments_as_fp32(monkeypatch)
    return transformers


# Liger's softcap calls libdevice's tanh, which Triton's interpreter does not provide (it
# returns None there): those cases are ``gpu`` tests (run by `pytest -m gpu` on a GPU).
liger_softcap_needs_cuda = (
    pytest.mark.gpu,
    pytest.mark.skipif(
        INTERPRETED, reason="Liger's softcap calls libdevice tanh, absent from Triton's interpreter"
    ),
)

# (Liger's options, fastxent's options): the mapping README.md's table states.
CROSS_ENTROPY_CASES = {
    "plain": ({}, {}),
    "ignore_index=5": ({"ignore_index": 5}, {"ignore_index": 5}),
    "class weights": ({"weight": CLASS_WEIGHT}, {"weight": CLASS_WEIGHT}),
    "label smoothing": ({"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "z-loss": ({"lse_square_scale": 1e-2}, {"z_loss": 1e-2}),
    "weights, smoothing, z-loss": (
        {"weight": CLASS_WEIGHT, "label_smoothing": 0.1, "lse_square_scale": 1e-2},
        {"weight": CLASS_WEIGHT, "label_smoothing": 0.1, "z_loss": 1e-2},
    ),
    "sum": (
        {"reduction": "sum", "weight": CLASS_WEIGHT, "label_smoothing": 0.1},
        {"reduction": "sum", "weight": CLASS_WEIGHT, "label_smoothing": 0.1},
    ),
    "none": (
        {"reduction": "none", "weight": CLASS_WEIGHT, "lse_square_scale": 1e-2},
        {"reduction": "none", "weight": CLASS_WEIGHT, "z_loss": 1e-2},
    ),
    "softcap": ({"softcap": 2.0}, {"softcap": 2.0}),
}


def _cases(cases):
    return [
        pytest.param(*options, id=name, marks=liger_softcap_needs_cuda if "softcap" in name else ())
        for name, options in cases.items()
    ]


@pytest.mark.parametrize(("theirs", "ours"), _cases(CROSS_ENTROPY_CASES))
def test_liger_cross_entropy_options(liger, theirs, ours):
    ignore_index = ours.get("ignore_index", -100)
    hidden, weight, _, class_weight, target = make_case(ignore_index=ignore_index)
    logits = hidden @ weight.T  # (N, V)
    grad_output = grad_output_for(ours.get("reduction", "mean"), len(target))
    theirs, ours = (with_class_weight(o, class_weight) for o in (theirs, ours))

    # Liger writes the gradient into the logits it is given: hand it a copy inside the graph
    liger_results = loss_and_grads(
        lambda z: liger.functional.liger_cross_entropy(z.clone(), target, **theirs),
        [logits],
        grad_output,
    )
    our_results = loss_and_grads(
        lambda z: fastxent.cross_entropy(z, target, **ours), [logits], grad_output
    )
    assert_same_results(our_results, liger_results, ["loss", "d_logits"])


def test_liger_cross_entropy_module(liger):
    hidden, weight, _, class_weight, target = make_case()
    logits = hidden @ weight.T
    theirs = liger.LigerCrossEntropyLoss(class_weight, lse_square_scale=1e-2, label_smoothing=0.1)
    ours = fastxent.CrossEntropyLoss(class_weight, z_loss=1e-2, label_smoothing=0.1)
    one = torch.tensor(1.0, device=DEVICE)
    liger_results = loss_and_grads(lambda z: theirs(z.clone(), target), [logits], one)
    our_results = loss_and_grads(lambda z: ours(z, target), [logits], one)
    assert_same_results(our_results, liger_results, ["loss", "d_logits"])


def test_liger_return_z_loss_is_the_z_loss_term(liger):
    """Liger's return_z_loss=True has no fastxent option: the term is the difference of the
    losses with and without z_loss (a mean over counted rows, whatever the class weights)."""
    hidden, weight, _, class_weight, target = make_case()
    logits = hidden @ weight.T
    out = liger.functional.liger_cross_entropy(
        logits.clone(), target, class_weight, lse_square_scale=1e-2, return_z_loss=True
    )
    with_z = fastxent.cross_entropy(logits, target, class_weight, z_loss=1e-2)
    without = fastxent.cross_entropy(logits, target, class_weight)
    assert_near(with_z, out.loss, "loss")
    assert_near(with_z - without, out.z_loss, "z-loss term")


def test_liger_overwrites_the_logits_it_is_given(liger):
    """Liger writes the gradient into its input (and zeroes ignored rows even without grad);
    fastxent leaves the logits alone unless inplace_backward=True, which writes the same."""
    hidden, weight, _, _, target = make_case()
    logits = hidden @ weight.T
    ignored = target == -100

    z = logits.clone()
    liger.functional.liger_cross_entropy(z, target)  # no grad
    assert (z[ignored] == 0).all() and not torch.equal(z, logits)
    z = logits.clone()
    fastxent.cross_entropy(z, target)
    assert torch.equal(z, logits)

    liger_z = logits.clone().requires_grad_().clone()  # not a leaf, as fastxent asks
    liger.functional.liger_cross_entropy(liger_z, target)
    our_z = logits.clone().requires_grad_().clone()
    fastxent.cross_entropy(our_z, target, inplace_backward=True)
    exact = logits.double().requires_grad_()
    F.cross_entropy(exact, target).backward()
    assert_near(our_z, liger_z, "logits after the call")
    assert_near(liger_z, exact.grad, "Liger's logits after the call against the gradient")


def test_liger_loss_of_bf16_logits_is_bf16(liger):
    """Liger keeps bf16 logits' per-row losses and their sum in bf16; fastxent returns float32."""
    hidden, weight, _, _, target = make_case()
    logits = (hidden @ weight.T).bfloat16()
    exact = F.cross_entropy(logits.double(), target, reduction="sum")
    theirs = liger.functional.liger_cross_entropy(logits.clone(), target, reduction="sum")
    ours = fastxent.cross_entropy(logits, target, reduction="sum")
    assert theirs.dtype == torch.bfloat16 and ours.dtype == torch.float32
    assert abs(ours.double() - exact) <= 1e-6 * exact  # float32 accumulation
    # bf16 rows and sum: 4.1e-3 relative here (fastxent 1.4e-8); bf16 rounds each by 2^-9
    assert 1e-4 * exact < abs(theirs.double() - exact) <= 2**-7 * exact


# (Liger's options, fastxent's options) of the fused linear loss
LINEAR_CASES = {
    "plain": ({}, {}),
    "class weights": ({"ce_weight": CLASS_WEIGHT}, {"class_weight": CLASS_WEIGHT}),
    "label smoothing": ({"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "z-loss": ({"lse_square_scale": 1e-2}, {"z_loss": 1e-2}),
    "sum": (
        {"reduction": "sum", "ce_weight": CLASS_WEIGHT, "lse_square_scale": 1e-2},
        {"reduction": "sum", "class_weight": CLASS_WEIGHT, "z_loss": 1e-2},
    ),
    "none": (
        {"reduction": "none", "ce_weight": CLASS_WEIGHT, "label_smoothing": 0.1},
        {"reduction": "none", "class_weight": CLASS_WEIGHT, "label_smoothing": 0.1},
    ),
    "softcap": ({"softcap": 2.0}, {"softcap": 2.0}),
}


@pytest.mark.parametrize(("theirs", "ours"), _cases(LINEAR_CASES))
def test_liger_fused_linear_options(liger, theirs, ours):
    """liger_fused_linear_cross_entropy(input, weight, target, bias, ...) against fastxent's
    linear_cross_entropy(hidden, weight, target, bias, ...) in the same order, on fastxent's
    small-call path, its token walk and its vocabulary walk."""
    hidden, weight, bias, class_weight, target = make_case()
    grad_output = grad_output_for(ours.get("reduction", "mean"), len(target))
    theirs, ours = (with_class_weight(o, class_weight) for o in (theirs, ours))
    inputs = [hidden, weight, bias]
    liger_results = loss_and_grads(
        lambda h, w, b: liger.functional.liger_fused_linear_cross_entropy(
            h, w, target, b, **theirs
        ),
        inputs,
        grad_output,
    )
    for walk in ({}, {"chunk_size": 16}, {"vocab_block": 64}):
        our_results = loss_and_grads(
            lambda h, w, b, walk=walk: fastxent.linear_cross_entropy(
                h, w, target, b, **ours, **walk
            ),
            inputs,
            grad_output,
        )
        assert_same_results(
            our_results, liger_results, [f"{name} {walk}" for name in ("loss", "dh", "dW", "db")]
        )


def test_liger_fused_linear_module_takes_the_weight_first(liger):
    hidden, weight, bias, class_weight, target = make_case()
    theirs = liger.LigerFusedLinearCrossEntropyLoss(
        ce_weight=class_weight, lse_square_scale=1e-2, label_smoothing=0.1
    )
    ours = fastxent.LinearCrossEntropyLoss(
        class_weight=class_weight, z_loss=1e-2, label_smoothing=0.1
    )
    one = torch.tensor(1.0, device=DEVICE)
    liger_results = loss_and_grads(
        lambda h, w, b: theirs(w, h, target, b), [hidden, weight, bias], one
    )
    our_results = loss_and_grads(lambda h, w, b: ours(h, w, target, b), [hidden, weight, bias], one)
    assert_same_results(our_results, liger_results, ["loss", "dh", "dW", "db"])
    with pytest.raises(ValueError, match="are hidden and weight swapped"):
        ours(weight, hidden, target)  # Liger's order


def test_liger_needs_flat_tokens_and_has_no_shift(liger):
    """Liger takes (B·T, D) and (B·T,); fastxent also (B, T, D) and (B, T), and shift=True is
    Liger on hidden[:, :-1] and target[:, 1:]."""
    hidden, weight, _, _, target = make_case()
    hidden, target = hidden.reshape(4, 12, -1), target.reshape(4, 12)
    one = torch.tensor(1.0, device=DEVICE)
    for shift in (False, True):
        h, y = (hidden[:, :-1], target[:, 1:]) if shift else (hidden, target)
        liger_results = loss_and_grads(
            lambda h, w, y=y: liger.functional.liger_fused_linear_cross_entropy(
                h.flatten(0, 1), w, y.flatten()
            ),
            [h, weight],
            one,
        )
        our_results = loss_and_grads(
            lambda h, w, shift=shift: fastxent.linear_cross_entropy(h, w, target, shift=shift),
            [hidden, weight],
            one,
        )
        if shift:  # the last position predicts nothing
            assert (our_results[1][:, -1] == 0).all()
            our_results[1] = our_results[1][:, :-1]
        assert_same_results(our_results, liger_results, [f"{n} shift={shift}" for n in "lhw"])
    with pytest.raises(ValueError, match="too many values to unpack"):
        liger.functional.liger_fused_linear_cross_entropy(hidden, weight, target)


def test_liger_bf16_weight_gradient_accumulation(liger):
    """Liger's accum_dtype=None sums bf16 weights' d_weight in bf16, chunk after chunk (16 here);
    accum_dtype=torch.float32 sums in float32, as fastxent always does. Errors are norm-wise
    against float64, where the final bf16 rounding alone is 1.6e-3: over four draws Liger's
    default 6.3-6.5e-3, with float32 4.5-4.7e-3, fastxent's token walk 3.6-3.9e-3."""
    hidden, weight, _, _, target = make_case(tokens=256, dim=16, num_classes=300)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    exact = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    F.cross_entropy(exact[0] @ exact[1].T, target).backward()
    one = torch.tensor(1.0, device=DEVICE)

    def d_weight_error(loss_fn):
        _, _, d_weight = loss_and_grads(loss_fn, [hidden, weight], one)
        assert d_weight.dtype == torch.bfloat16
        return (d_weight.double() - exact[1].grad).norm() / exact[1].grad.norm()

    fused = liger.functional.liger_fused_linear_cross_entropy
    liger_bf16 = d_weight_error(lambda h, w: fused(h, w, target))
    liger_fp32 = d_weight_error(lambda h, w: fused(h, w, target, accum_dtype=torch.float32))
    ours = d_weight_error(lambda h, w: fastxent.linear_cross_entropy(h, w, target, chunk_size=16))
    assert ours <= liger_fp32 + 1e-3
    assert liger_bf16 > 1.4 * ours  # 1.66-1.82x in the four draws


def test_liger_options_without_a_fastxent_counterpart(liger):
    theirs = inspect.signature(liger.functional.liger_fused_linear_cross_entropy).parameters
    ours = inspect.signature(fastxent.linear_cross_entropy).parameters
    for name in (
        "return_z_loss",
        "accum_dtype",
        "use_token_scaling",
        "return_token_accuracy",
        "return_predicted_tokens",
        "chunk_mem_const",
    ):
        assert name in theirs and name not in ours


def test_liger_positional_options_are_refused(liger):
    """Liger's fifth positional argument is ce_weight; fastxent's options after the bias are
    keyword-only, so a call written for Liger fails instead of misreading it."""
    hidden, weight, bias, class_weight, target = make_case()
    with pytest.raises(TypeError, match="positional"):
        fastxent.linear_cross_entropy(hidden, weight, target, bias, class_weight)


# --- Cut Cross-Entropy ------------------------------------------------------------------------


@pytest.fixture
def cce():
    return pytest.importorskip("cut_cross_entropy")


def make_sequences(batch=3, length=16, dim=24, num_classes=200, ignore_index=-100, seed=0):
    """(B, T, D) hidden states, (V, D) weight, (B, T) targets with every fourth ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=g)
    weight = torch.randn(num_classes, dim, generator=g) * 2 / dim**0.5
    target = torch.randint(0, num_classes, (batch, length), generator=g)
    target[:, ::4] = ignore_index
    return [x.to(DEVICE) for x in (hidden, weight, target)]


def test_cce_mean_shift_and_argument_order(cce):
    """One compiled graph of CCE (mean, no softcap): (B, T, D) with and without shift, an
    (N, D) input with shift (one sequence), ignore_index as CCE's 4th positional argument, and
    a filter_eps that its torch_compile path ignores."""
    hidden, weight, target = make_sequences()
    one = torch.tensor(1.0, device=DEVICE)
    flat_hidden, flat_target = hidden.flatten(0, 1), target.flatten()
    for h, y, options in [
        (hidden, target, {}),
        (hidden, target, {"shift": True}),
        (flat_hidden, flat_target, {"shift": True}),
    ]:
        theirs = loss_and_grads(
            lambda h, w, y=y, o=options: cce.linear_cross_entropy(
                h, w, y, impl="torch_compile", **o
            ),
            [h, weight],
            one,
        )
        ours = loss_and_grads(
            lambda h, w, y=y, o=options: fastxent.linear_cross_entropy(h, w, y, **o),
            [h, weight],
            one,
        )
        assert_same_results(ours, theirs, [f"{n} {tuple(h.shape)} {options}" for n in "lhw"])

    positional = loss_and_grads(
        lambda h, w: cce.linear_cross_entropy(
            h, w, target, -100, filter_eps=1e9, impl="torch_compile"
        ),
        [hidden, weight],
        one,
    )
    ours = loss_and_grads(
        lambda h, w: fastxent.linear_cross_entropy(h, w, target, ignore_index=-100),
        [hidden, weight],
        one,
    )
    assert_same_results(ours, positional, ["loss", "dh", "dW"])
    with pytest.raises(TypeError, match=r"bias must be a torch\.Tensor or None, got int"):
        fastxent.linear_cross_entropy(hidden, weight, target, -100)  # CCE's order


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_cce_softcap_and_reductions(cce, reduction):
    """softcap c·tanh(z/c), the reductions and ignore_index (a class, 7, with "sum": a graph of
    its own anyway); "none" with shift gives (B, T - 1) on both sides, ignored positions 0."""
    ignore_index = 7 if reduction == "sum" else -100
    hidden, weight, target = make_sequences(ignore_index=ignore_index)
    options = {"softcap": 2.5, "reduction": reduction, "shift": True, "ignore_index": ignore_index}
    grad_output = (
        torch.linspace(0.5, 1.5, 3 * 15, device=DEVICE).reshape(3, 15)
        if reduction == "none"
        else torch.tensor(1.7, device=DEVICE)
    )
    theirs = loss_and_grads(
        lambda h, w: cce.linear_cross_entropy(h, w, target, impl="torch_compile", **options),
        [hidden, weight],
        grad_output,
    )
    ours = loss_and_grads(
        lambda h, w: fastxent.linear_cross_entropy(h, w, target, **options),
        [hidden, weight],
        grad_output,
    )
    assert_same_results(ours, theirs, ["loss", "dh", "dW"])
    if reduction == "none":
        assert ours[0].shape == (3, 15) and (ours[0][target[:, 1:] == ignore_index] == 0).all()


def test_cce_all_ignored_mean_is_nan(cce):
    """A batch whose targets are all ignored: CCE's mean is NaN (0/0), fastxent's 0."""
    hidden, weight, target = make_sequences()
    target = torch.full_like(target, -100)
    theirs = cce.linear_cross_entropy(hidden, weight, target, impl="torch_compile")
    ours = fastxent.linear_cross_entropy(hidden, weight, target)
    assert theirs.isnan() and ours == 0


def test_cce_filters_gradients_by_default(cce):
    """CCE's filter_eps defaults to "high": finfo(dtype).eps / 32 (2.4e-4 for bf16), which its
    CUDA kernel applies; fastxent's filter_eps defaults to None, exact."""
    from cut_cross_entropy.utils import _handle_eps

    assert inspect.signature(cce.linear_cross_entropy).parameters["filter_eps"].default == "high"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert _handle_eps("high", dtype) == torch.finfo(dtype).eps / 32
    assert inspect.signature(fastxent.linear_cross_entropy).parameters["filter_eps"].default is None


@pytest.mark.gpu
def test_cce_kernel_without_filter(cce):
    """CCE's own kernel (CUDA only) with filter_eps=None gives fastxent's exact results."""
    hidden, weight, target = make_sequences()
    one = torch.tensor(1.0, device=DEVICE)
    theirs = loss_and_grads(
        lambda h, w: cce.linear_cross_entropy(
            h, w, target, shift=True, softcap=2.5, filter_eps=None, impl="cce"
        ),
        [hidden, weight],
        one,
    )
    ours = loss_and_grads(
        lambda h, w: fastxent.linear_cross_entropy(h, w, target, shift=True, softcap=2.5),
        [hidden, weight],
        one,
    )
    assert_same_results(ours, theirs, ["loss", "dh", "dW"])
