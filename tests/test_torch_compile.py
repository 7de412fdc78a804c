"""fastxent inside torch.compile'd code: the same losses and gradients as eager; calls that
"auto" computes with PyTorch's fused ops trace whole (no graph break, fullgraph=True works);
the kernel paths run outside the graph as one graph break. Compiled equals eager, and eager is
anchored to the float64 oracle (reference.py), so an error both share shows too.

Dynamo's ``aot_eager`` backend traces forward and backward as torch.compile does, without
inductor's code generation (seconds less per case); the kernels themselves are tested
elsewhere.
"""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import fastxent
from fastxent import reference
from test_linear import oracle as linear_oracle
from versions import (
    compiled_backend,
    exports_a_dynamic_batch,
    graph_break_has_a_reason,
    graph_keeps_asserts,
    newer_torch,
)

SMALL, LARGE = (32, 512), (600, 1000)  # below and above auto's fused-ops limit (2^19 logits)
F32 = {"rtol": 1e-5, "atol": 1e-6}


def compiled_and_eager(fn, *inputs, fullgraph=False, dynamic=None):
    """(loss, grads) of ``fn`` compiled, then eager, on fresh leaves of the float inputs."""
    results = []
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=fullgraph, dynamic=dynamic)
    for run in (compiled, fn):
        leaves = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
        loss = run(*leaves)
        loss.sum().backward()
        results.append((loss.detach(), [x.grad for x in leaves if x.is_floating_point()]))
    return results


def assert_same(got, want):
    """(loss, grads) against ``want``'s at F32's tolerances: eager's, dtype included, or the
    float64 oracle's (``got`` then compared in float64)."""
    for g, w in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        torch.testing.assert_close(g.double() if w.dtype == torch.float64 else g, w, **F32)


def oracle(z, y, **options):
    """(loss, [∂loss/∂z]) of ``cross_entropy(z * 2, y, **options)`` in float64 (reference.py, the
    2 as its logit_scale), backward with ones as ``compiled_and_eager``'s ``loss.sum()``."""
    loss, grad = reference.cross_entropy(z.double().numpy(), y.numpy(), logit_scale=2.0, **options)
    return torch.from_numpy(np.asarray(loss)), [torch.from_numpy(grad)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("shape", [SMALL, LARGE])
@pytest.mark.parametrize("backend", ["auto", "torch", "compiled"])
def test_cross_entropy_compiled_matches_eager(backend, shape):
    """The gradient buffer made in forward reaches backward intact (a traced forward once
    recorded its version counter at trace time: backward then refused small 'torch' calls)."""
    z = torch.randn(shape)
    y = torch.randint(0, shape[1], shape[:1])
    got, want = compiled_and_eager(
        lambda z, y: fastxent.cross_entropy(z * 2, y, label_smoothing=0.1, backend=backend), z, y
    )
    assert_same(got, want)
    assert_same(want, oracle(z, y, label_smoothing=0.1))
    breaks = sum(counters["graph_break"].values())
    if backend == "auto" and shape == SMALL:
        assert breaks == 0  # PyTorch's ops: traced whole
    else:
        assert 0 < breaks <= 2  # the kernel path, and nothing before it


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "none"}, {"z_loss": 1e-3, "label_smoothing": 0.1, "softcap": 30.0}],
)
def test_small_auto_calls_trace_with_fullgraph(options, dynamic):
    """dynamic=True makes the float options symbolic: the checks on them must trace too
    (math.isfinite did not: 'torch.* op returned non-Tensor')."""
    z, y = torch.randn(SMALL), torch.randint(0, SMALL[1], SMALL[:1])
    got, want = compiled_and_eager(
        lambda z, y: fastxent.cross_entropy(z * 2, y, **options), z, y, fullgraph=True,
        dynamic=dynamic,
    )  # fmt: skip
    assert_same(got, want)
    assert_same(want, oracle(z, y, **options))
    h, w, y = torch.randn(16, 8), torch.randn(100, 8), torch.randint(0, 100, (16,))
    got, want = compiled_and_eager(
        lambda h, w, y: fastxent.linear_cross_entropy(h, w, y, **options),
        h, w, y, fullgraph=True, dynamic=dynamic,
    )  # fmt: skip
    assert_same(got, want)
    loss, dh, dw, _ = linear_oracle(h, w, None, y, **options)
    assert_same(want, (loss, [dh, dw]))


@compiled_backend
def test_small_smoothed_mean_compiled_by_inductor_is_as_exact_as_pytorchs():
    """Traced, a small "auto" mean was PyTorch's "sum" times 1/n (the count of counted targets
    cannot be read on the host there): inductor's code for that form lost a digit of the label
    smoothing gradient (3e-6 of its largest entry, against 4e-7 for PyTorch's compiled "mean").
    PyTorch's "mean" is asked for now, 0 on the device where every target is ignored."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(93, 4096, generator=gen) * 2
    y = torch.randint(0, 4096, (93,), generator=gen)
    y[:5] = -100
    z64 = z.double().requires_grad_()
    torch.nn.functional.cross_entropy(z64, y, label_smoothing=0.1).backward()
    want = z64.grad

    def error(fn) -> float:
        x = z.clone().requires_grad_()
        torch.compile(fn)(x).backward()
        return ((x.grad.double() - want).abs().max() / want.abs().max()).item()

    ours = error(lambda x: fastxent.cross_entropy(x, y, label_smoothing=0.1))
    pytorch = error(lambda x: torch.nn.functional.cross_entropy(x, y, label_smoothing=0.1))
    assert ours <= 2 * pytorch + 1e-8, (ours, pytorch)
    ignored = torch.full((93,), -100)
    x = z.clone().requires_grad_()
    loss = torch.compile(lambda x: fastxent.cross_entropy(x, ignored, label_smoothing=0.1))(x)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


@graph_break_has_a_reason
@pytest.mark.parametrize("options", [{"backend": "torch"}, {"inplace_backward": True}])
def test_fullgraph_names_the_kernel_path(options):
    """inplace_backward's check of the logits (Tensor._is_view) runs outside the graph too: in
    it, dynamo failed on that call first, with a message that named no fastxent reason."""
    z, y = torch.randn(SMALL), torch.randint(0, SMALL[1], SMALL[:1])
    fn = torch.compile(lambda z: fastxent.cross_entropy(z * 2, y, **options), fullgraph=True)
    with pytest.raises(Exception, match=r"fastxent runs its own kernel"):
        fn(z)


@pytest.mark.parametrize("option", ["z_loss", "softcap", "logit_scale", "label_smoothing"])
def test_a_nan_option_is_refused_in_compiled_code_too(option):
    """Dynamo makes a float option symbolic once its value changed (here: dynamic=True), and
    assumes it finite, so an infinite one goes through there (README); NaN it keeps a
    constant, and fastxent's check refuses it as in eager."""
    z, y = torch.randn(SMALL), torch.randint(0, SMALL[1], SMALL[:1])
    fn = torch.compile(
        lambda z, value: fastxent.cross_entropy(z, y, **{option: value}),
        backend="aot_eager",
        dynamic=True,
    )
    fn(z, 0.5)
    fn(z, 0.25)
    with pytest.raises(ValueError, match=rf"{option} must be .*, got nan"):
        fn(z, float("nan"))


@graph_keeps_asserts
@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev"])
def test_torch_func_transforms_of_small_calls_compile_with_the_in_graph_check(transform):
    """vmap has no batching rule for the graph's target check (torch._assert_async): under
    vmap (jacrev's too) it is left out, and the transforms give eager PyTorch's results."""
    z, y = torch.randn(3, 8, 16), torch.randint(0, 16, (3, 8))

    def loss(loss_fn):
        per_batch = lambda z, y: loss_fn(z, y, label_smoothing=0.1)  # noqa: E731
        if transform == "vmap":
            return torch.func.vmap(per_batch)
        if transform == "grad":
            return lambda z, y: torch.func.grad(per_batch)(z[0], y[0])
        return lambda z, y: torch.func.jacrev(per_batch)(z[0], y[0])

    got = torch.compile(loss(fastxent.cross_entropy), fullgraph=True)(z, y)
    torch.testing.assert_close(got, loss(torch.nn.functional.cross_entropy)(z, y), **F32)


@graph_break_has_a_reason
def test_the_host_check_of_cuda_targets_is_a_graph_break_with_its_reason():
    """What small CUDA calls with class indices run first under torch.compile (their range
    check reads the targets; a graph break), here on CPU tensors: fullgraph=True names it,
    and without fullgraph a bad target raises fastxent's IndexError, as in eager."""
    from fastxent.functional import check_index_targets_on_the_host

    def fn(y):
        check_index_targets_on_the_host(y, 16, -100)
        return y + 1

    y = torch.randint(0, 16, (8,))
    with pytest.raises(Exception, match="reads CUDA class-index targets on the host"):
        torch.compile(fn, fullgraph=True)(y)
    y[2] = 99
    with pytest.raises(IndexError, match=r"target\[2\] = 99 is out of range"):
        torch.compile(fn)(y)


@exports_a_dynamic_batch  # torch.compiler.is_exporting is there (2.7)
def test_kernel_paths_stay_kernels_where_dynamo_says_it_exports(monkeypatch):
    """The dynamo of PyTorch 2.7-2.11 folded ``torch.compiler.is_exporting()`` to True wherever it
    traced (pytorch/pytorch#176347): every compiled call took PyTorch's ops, the linear loss
    with its whole logits. Here the function is that of those versions (dynamo traces into a
    stand-in); fastxent reads the flag that export sets, so the kernel path and the linear walk
    still run outside the graph, a graph break each."""

    class FoldedToTrue:  # not a torch function, so dynamo traces its call
        def __call__(self) -> bool:
            return torch.compiler.is_compiling()

    monkeypatch.setattr(torch.compiler, "is_exporting", FoldedToTrue())
    z, y = torch.randn(SMALL), torch.randint(0, SMALL[1], SMALL[:1])
    h, w, t = torch.randn(40, 8), torch.randn(100, 8), torch.randint(0, 100, (40,))
    for fn, inputs in (
        (lambda z: fastxent.cross_entropy(z * 2, y, backend="torch"), (z,)),
        (lambda h, w: fastxent.linear_cross_entropy(h, w, t, chunk_size=8), (h, w)),
    ):
        counters.clear()
        got, want = compiled_and_eager(fn, *inputs)
        assert_same(got, want)
        assert sum(counters["graph_break"].values()) > 0


@pytest.mark.parametrize("walk", [{"chunk_size": 8}, {"vocab_block": 30}])
def test_linear_walks_compiled_match_eager(walk):
    h, w = torch.randn(40, 8), torch.randn(100, 8)
    y = torch.randint(0, 100, (40,))
    got, want = compiled_and_eager(
        lambda h, w, y: fastxent.linear_cross_entropy(h, w, y, **walk), h, w, y
    )
    assert_same(got, want)
    loss, dh, dw, _ = linear_oracle(h, w, None, y)
    assert_same(want, (loss, [dh, dw]))


def test_another_threads_compilation_changes_no_path(monkeypatch):
    """torch.compiler.is_compiling() is one flag for the process, True in every thread while any
    thread compiles: read here, it sent torch.func calls to the Function (which raised) and the
    linear walk off oneDNN. fastxent asks whether dynamo traces its own frame instead."""
    from fastxent import _linear

    if not hasattr(torch.compiler, "_is_compiling_flag"):
        pytest.skip("this PyTorch keeps the flag elsewhere")
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)  # as during another compile
    assert torch.compiler.is_compiling()
    z = torch.randn(4, 10, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    got = torch.func.grad(lambda z: fastxent.cross_entropy(z, y, backend="torch"))(z)
    want = torch.func.grad(lambda z: torch.nn.functional.cross_entropy(z, y))(z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert _linear.small_cpu_chunks("cpu", torch.float32) == (_linear._onednn_linear() is not None)


def _compiled_autograd():
    """Compiled autograd's context manager (``_enable``; ``enable`` before PyTorch 2.6)."""
    module = pytest.importorskip("torch._dynamo.compiled_autograd")
    enable = getattr(module, "_enable", None) or getattr(module, "enable", None)
    if enable is None:
        pytest.skip("no compiled autograd in this PyTorch")
    return enable(torch.compile(backend="eager"))


@pytest.mark.parametrize("form", ["cross_entropy", "linear"])
def test_compiled_autograd_backward_through_a_retained_graph(form):
    """Compiled autograd hands backward a proxy of ctx whose attribute writes are dropped: every
    backward then took itself for the first and folded its grad_output in again (2x with
    grad_outputs 2 and 2). Several backwards through one graph match PyTorch's to 1e-12."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(8, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(16, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 16, (8,), generator=g)
    grad_outputs = [2.0, 0.5, 4.0]

    def scale_grad(loss_of):
        scale = torch.ones(4, dtype=torch.float64, requires_grad=True)  # a leaf before the loss
        loss = loss_of(hidden * scale)
        for i, grad_output in enumerate(grad_outputs):
            with _compiled_autograd():
                loss.backward(torch.tensor(grad_output, dtype=torch.float64),
                              retain_graph=i < len(grad_outputs) - 1)  # fmt: skip
        return scale.grad

    want = scale_grad(lambda h: torch.nn.functional.cross_entropy(h @ weight.T, target))
    if form == "cross_entropy":
        got = scale_grad(lambda h: fastxent.cross_entropy(h @ weight.T, target, backend="torch"))
    else:
        got = scale_grad(lambda h: fastxent.linear_cross_entropy(h, weight, target, chunk_size=4))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_backward_inside_a_compiled_step_leaves_fastxents_backward_untraced():
    """With loss.backward() in the compiled function, dynamo compiled fastxent's backward
    frames as well and broke their graphs on the host read of grad_output (``Tensor.item()``,
    with a warning pointing into fastxent); they now run as the kernel does, outside."""
    z, y = torch.randn(LARGE), torch.randint(0, LARGE[1], LARGE[:1])
    weight = torch.ones(LARGE[1], requires_grad=True)

    @torch.compile(backend="aot_eager")
    def step(z):
        loss = fastxent.cross_entropy(z * weight, y, backend="torch")
        loss.backward()
        return loss.detach()

    counters.clear()
    step(z)
    breaks = " ".join(counters["graph_break"])
    assert "item()" not in breaks
    leaf = weight.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(z * leaf, y).backward()
    torch.testing.assert_close(weight.grad, leaf.grad, **F32)


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("loss", ["cross_entropy", "linear walk"])
def test_dual_tensors_through_a_compiled_kernel_call_keep_their_tangent(loss, grad_mode):
    """Forward AD: while dynamo traces, the caller cannot see dual tensors, so the kernel path
    was taken, and after the graph break its Function met them: "You must implement the jvp
    function" with grad mode on, and without it the tangent silently dropped (None)."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    h, tangent = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    w, y = torch.randn(100, 8, generator=g), torch.randint(0, 100, (40,), generator=g)
    if loss == "cross_entropy":
        fn = lambda x: fastxent.cross_entropy(x @ w.T, y, backend="torch")  # noqa: E731
    else:
        fn = lambda x: fastxent.linear_cross_entropy(x, w, y, chunk_size=8)  # noqa: E731
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        want = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(h, tangent) @ w.T, y)).tangent
        got = fwAD.unpack_dual(torch.compile(fn, backend="aot_eager")(fwAD.make_dual(h, tangent)))
        assert got.tangent is not None
        torch.testing.assert_close(got.tangent, want, **F32)


@pytest.mark.parametrize(
    "loss",
    [
        "cross_entropy",
        pytest.param(
            "linear walk",
            marks=newer_torch(
                (2, 13),
                "dynamo before 2.13 (2.8, 2.11) fails to resume after the walk's graph break "
                "under torch.func.grad (AssertionError in fakeifying the wrapped result)",
            ),
        ),
    ],
)
def test_torch_func_traced_by_the_eager_backend_around_a_kernel_call(loss):
    """backend="eager" traces vmap's and grad's functions with their tensors wrapped, where the
    caller's test cannot see it; the kernel's Function then met torch.func ("must override the
    setup_context staticmethod")."""
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g)
    h = torch.randn(3, 16, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 50, (3, 16), generator=g)
    if loss == "cross_entropy":  # per-sample losses
        fn = vmap(lambda x, t: fastxent.cross_entropy(x @ w.T, t, backend="torch"))
        pairs = zip(h, y, strict=True)
        want = torch.stack([torch.nn.functional.cross_entropy(x @ w.T, t) for x, t in pairs])
    else:  # the gradient of the walk's loss
        fn = grad(lambda x, t: fastxent.linear_cross_entropy(x, w, t, chunk_size=4), argnums=0)
        x = h[0].clone().requires_grad_()
        torch.nn.functional.cross_entropy(x @ w.T, y[0]).backward()
        h, y, want = h[0], y[0], x.grad
    got = torch.compile(fn, backend="eager")(h, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@graph_keeps_asserts
@pytest.mark.parametrize(
    "kind, dynamic", [("cross_entropy", False), ("cross_entropy", True), ("linear", False)]
)
def test_out_of_range_target_in_a_compiled_graph_raises_fastxents_message(kind, dynamic):
    """Small calls traced whole by torch.compile (inductor, fullgraph) check their class
    indices in the graph: a bad one raises fastxent's message, not inductor's bounds check
    ("index out of bounds: 0 <= tmp11 < 16L"); ignored and valid targets give eager's loss."""
    n, v = 12, 16
    z, h, w = torch.randn(n, v), torch.randn(n, 4), torch.randn(v, 4)
    if kind == "cross_entropy":
        fn = lambda y: fastxent.cross_entropy(z, y, ignore_index=3, label_smoothing=0.1)  # noqa: E731
    else:
        fn = lambda y: fastxent.linear_cross_entropy(h, w, y, ignore_index=3)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    y = torch.randint(0, v, (n,))
    y[2] = 3  # ignore_index, a valid class here: ignored, not refused
    torch.testing.assert_close(compiled(y), fn(y), **F32)
    for bad in (v, -1, -100):
        y_bad = y.clone()
        y_bad[5] = bad
        with pytest.raises(RuntimeError, match="class-index target is out of range"):
            compiled(y_bad)
