"""Meta tensors, torch.export, torch.jit.trace/script and torch.fx, as PyTorch's loss meets them.

Under each, fastxent cannot read the targets' values or must not branch on them (a trace would
freeze the branch): the calls are computed from PyTorch's ops. The oracle is the float64
reference (fastxent.reference) on the same logits.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastxent
from fastxent import reference
from versions import exports_a_dynamic_batch, strict_export_sets_the_flag

IGNORED = -100
# PyTorch 2.13 deprecates TorchScript; fastxent still meets users' existing jit code.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


class _Head(nn.Module):
    """A linear layer and a fastxent loss: the end of a model, as torch.export sees it."""

    def __init__(self, linear_loss: bool = False, **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 5, dtype=torch.float64)
        self.linear_loss = linear_loss
        self.loss = (fastxent.LinearCrossEntropyLoss if linear_loss else fastxent.CrossEntropyLoss)(
            **options
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.linear_loss:
            return self.loss(x, self.proj.weight, target, self.proj.bias)
        return self.loss(self.proj(x), target)


def _oracle(logits: torch.Tensor, target: torch.Tensor, **options):
    """Loss and gradient of the float64 reference, as tensors."""
    weight = options.pop("weight", None)
    loss, grad = reference.cross_entropy(
        logits.detach().double().numpy(),
        target.numpy(),
        None if weight is None else weight.numpy(),
        **options,
    )
    return torch.as_tensor(loss), torch.as_tensor(grad)


def _inputs(rows: int, seed: int, all_ignored: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, dtype=torch.float64, generator=gen)
    target = torch.randint(0, 5, (rows,), generator=gen)
    return x, target.fill_(IGNORED) if all_ignored else target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_meta_tensors_give_meta_results_of_pytorchs_shape(reduction):
    logits = torch.randn(6, 5, 3, device="meta")
    target = torch.zeros(6, 3, dtype=torch.long, device="meta")
    want = torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
    for backend in ("auto", "torch", "compiled"):
        got = fastxent.cross_entropy(logits, target, reduction=reduction, backend=backend)
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
    hidden, weight = torch.randn(2, 3, 4, device="meta"), torch.randn(5, 4, device="meta")
    got = fastxent.linear_cross_entropy(
        hidden, weight, target[:2], reduction=reduction, shift=True, chunk_size=2
    )
    assert got.device.type == "meta" and got.shape == ((2, 2) if reduction == "none" else ())


@pytest.mark.parametrize(
    ("linear_loss", "options"),
    [
        (False, {}),
        (False, {"label_smoothing": 0.1}),
        (False, {"weight": torch.rand(5, dtype=torch.float64)}),
        (False, {"z_loss": 1e-2, "reduction": "sum"}),
        (True, {}),
    ],
)
@exports_a_dynamic_batch
def test_torch_export_with_a_dynamic_batch_matches_the_reference(linear_loss, options):
    """Exported with a symbolic batch size, the program gives the reference's loss on another
    batch size, and the documented 0 (not NaN) when every target is ignored."""
    head = _Head(linear_loss, **options)
    batch = torch.export.Dim("batch")
    program = torch.export.export(  # strict=False: 2.7's default is strict (the test below)
        head, _inputs(6, seed=1), dynamic_shapes=({0: batch}, {0: batch}), strict=False
    ).module()
    for all_ignored in (False, True):
        x, target = _inputs(9, seed=2, all_ignored=all_ignored)
        with torch.no_grad():
            want, _ = _oracle(head.proj(x), target, **options)
            torch.testing.assert_close(program(x, target), want, rtol=1e-12, atol=1e-15)
    assert float(program(*_inputs(9, seed=3, all_ignored=True)).detach()) == 0.0


@exports_a_dynamic_batch
@strict_export_sets_the_flag
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("rows", [6, 700])
def test_strict_export_with_a_dynamic_batch_matches_the_reference(rows, inplace_backward):
    """strict=True traces with dynamo: the small-call size test fixed the symbolic batch (an
    opaque AssertionError), larger calls met the kernel's graph break (refused), and
    inplace_backward's check of the logits called Tensor._is_view, which dynamo cannot trace."""
    head = _Head(label_smoothing=0.1, inplace_backward=inplace_backward)
    head.proj = nn.Linear(4, 1000, dtype=torch.float64)  # 700 x 1000: the kernel's size
    gen = torch.Generator().manual_seed(4)

    def inputs(count: int):
        x = torch.randn(count, 4, dtype=torch.float64, generator=gen)
        return x, torch.randint(0, 1000, (count,), generator=gen)

    batch = torch.export.Dim("batch")
    program = torch.export.export(
        head, inputs(rows), dynamic_shapes=({0: batch}, {0: batch}), strict=True
    ).module()
    x, target = inputs(rows + 3)
    with torch.no_grad():
        want, _ = _oracle(head.proj(x), target, label_smoothing=0.1)
        torch.testing.assert_close(program(x, target), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}])
def test_jit_trace_keeps_no_data_dependent_choice(options):
    """A trace recorded on ordinary targets gives eager's loss and gradient on all-ignored ones
    (it froze fastxent's "some target counted" test before, and gave NaN) and on kernel-sized
    calls (700 × 1000 logits: PyTorch's trace check found two different graphs)."""
    loss_fn = fastxent.CrossEntropyLoss(**options)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(700, 1000, dtype=torch.float64, generator=gen)
    traced = torch.jit.trace(loss_fn, (logits, torch.randint(0, 1000, (700,), generator=gen)))
    for target in (torch.randint(0, 1000, (700,), generator=gen), torch.full((700,), IGNORED)):
        z_traced = logits.clone().requires_grad_()
        loss_traced = traced(z_traced, target)
        loss_traced.backward()
        want_loss, want_grad = _oracle(logits, target, **options)
        torch.testing.assert_close(loss_traced.detach(), want_loss, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(z_traced.grad, want_grad, rtol=1e-10, atol=1e-18)
    assert float(loss_traced.detach()) == 0.0


@exports_a_dynamic_batch
@pytest.mark.parametrize("linear", [False, True])
def test_traced_and_exported_probability_targets_follow_the_batch_size(linear):
    """A "mean" over probability targets divides by the row count: it was a number that
    torch.jit.trace recorded as a constant (9 rows after a 6-row trace: 1.5x the loss) and at
    which torch.export fixed the batch size."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 4, dtype=torch.float64, generator=gen)

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if linear:
            return fastxent.linear_cross_entropy(x, weight, target)
        return fastxent.cross_entropy(x @ weight.T, target)

    class Loss(nn.Module):
        def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss(x, target)

    class PyTorchLoss(nn.Module):
        def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(x @ weight.T, target)

    def inputs(rows: int):
        x = torch.randn(rows, 4, dtype=torch.float64, generator=gen)
        return x, torch.rand(rows, 5, dtype=torch.float64, generator=gen).softmax(dim=1)

    traced = torch.jit.trace(Loss(), inputs(6))
    batch = torch.export.Dim("batch")
    dynamic_batch = ({0: batch}, {0: batch})
    try:  # PyTorch's own loss first: torch 2.11's fixes the batch of probability targets
        torch.export.export(PyTorchLoss(), inputs(6), dynamic_shapes=dynamic_batch)
    except Exception as error:  # torch._dynamo.exc.UserError: "Constraints violated (batch)"
        first_line = str(error).splitlines()[0]
        pytest.skip(f"this torch cannot export F.cross_entropy with a dynamic batch: {first_line}")
    exported = torch.export.export(Loss(), inputs(6), dynamic_shapes=dynamic_batch).module()
    x, target = inputs(9)
    want, _ = _oracle(x @ weight.T, target)
    torch.testing.assert_close(traced(x, target), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(exported(x, target), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("linear_loss", [False, True])
def test_jit_script_is_refused_with_what_to_use_instead(linear_loss):
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch.jit.script\. Use"):
        torch.jit.script(_Head(linear_loss))


@pytest.mark.parametrize("fn", [fastxent.cross_entropy, fastxent.linear_cross_entropy])
def test_jit_script_of_the_functions_fails_with_torchscripts_own_reason(fn):
    """README: of the functions, TorchScript's own error says why (keyword-only arguments)."""
    with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-only arguments"):
        torch.jit.script(fn)


def test_elementwise_mean_is_mean_with_pytorchs_deprecation_warning():
    logits, target = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    with pytest.warns(UserWarning, match="elementwise_mean' is deprecated"):
        got = fastxent.cross_entropy(logits, target, reduction="elementwise_mean")
    with pytest.warns(UserWarning, match="elementwise_mean' is deprecated"):
        loss_fn = fastxent.CrossEntropyLoss(reduction="elementwise_mean")
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, target))
    assert loss_fn.reduction == "mean"


def test_jit_trace_gives_no_tracer_warnings():
    """The error messages' shape text was formatted on every call: 14 TracerWarnings for one
    traced loss; then the shape checks' own comparisons warned (2, and 3 for the linear loss).
    A trace fixes their outcome, as it should: they are silent now."""
    z, target = torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))
    weight = torch.randn(5, 3, requires_grad=True)
    calls = [
        (lambda z, y: fastxent.cross_entropy(z, y, z_loss=1e-3), (z, target)),
        (fastxent.CrossEntropyLoss(label_smoothing=0.1), (z, target)),
        (lambda h, w: fastxent.linear_cross_entropy(h, w, target), (z[:, :3], weight)),
    ]
    for fn, inputs in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.jit.trace(fn, inputs, check_trace=False)  # one trace, no re-run
        traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
        assert traced == [], [str(w.message) for w in traced]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_make_fx_in_real_mode_records_pytorchs_ops(backend):
    """make_fx's default "real" mode refuses reads of tensor values (the targets' range check,
    the "mean" shortcut): such traces are computed from PyTorch's ops, as under jit.trace, and
    the recorded graph gives the reference's loss and gradient for other inputs too."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def loss_and_grad(z, target):
        loss = fastxent.cross_entropy(z, target, label_smoothing=0.1, backend=backend)
        return loss, torch.autograd.grad(loss, z)[0]

    gen = torch.Generator().manual_seed(7)
    z = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    graph = make_fx(loss_and_grad)(z, torch.randint(0, 5, (6,), generator=gen))
    z2, target2 = torch.randn(6, 5, dtype=torch.float64, generator=gen), torch.randint(0, 5, (6,))
    loss, grad = graph(z2.requires_grad_(), target2)
    want_loss, want_grad = _oracle(z2.detach(), target2, label_smoothing=0.1)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("linear_loss", [False, True])
def test_fx_symbolic_trace_records_the_loss_as_one_call(linear_loss):
    """torch.fx.symbolic_trace treats torch.nn modules as leaves and traces into others with
    Proxy objects, on which no check can run: fastxent's calls are recorded whole (as fx
    records F.cross_entropy), class weights as the module's buffer, and the GraphModule runs
    them on real inputs, here other than the traced ones, to the reference's loss and gradient."""
    weight = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    model = _Head(linear_loss, **{"class_weight" if linear_loss else "weight": weight}, **options)
    graph = torch.fx.symbolic_trace(model)
    calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    want_call = fastxent.linear_cross_entropy if linear_loss else fastxent.cross_entropy
    assert calls == [want_call], graph.code
    x, target = _inputs(7, seed=3)
    target[2] = IGNORED
    loss = graph(x, target)
    grad_bias = torch.autograd.grad(loss, model.proj.bias)[0]  # Σ_rows ∂loss/∂z
    logits = model.proj(x)
    want_loss, want_grad = _oracle(logits, target, weight=weight, ignore_index=IGNORED, **options)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad_bias, want_grad.sum(0), rtol=1e-12, atol=1e-15)
