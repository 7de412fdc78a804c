"""Under torch.func transforms (grad, vmap, jacrev) calls run on PyTorch's own ops.

fastxent's autograd Functions make the gradient in forward and keep state on ``ctx``, which the
transforms do not allow, and its target check reads values; so a call whose tensors a transform
has wrapped is built from PyTorch's fused ops instead (``fastxent._torch.composed``), with
fastxent's semantics, and PyTorch's ops check the targets. Compared here with ``F.cross_entropy``
under the same transforms, in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import fastxent
from fastxent.check import torch_composed

F64 = {"rtol": 1e-12, "atol": 1e-14}


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(8, 100, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 100, (8,), generator=g)
    target[2] = -100
    return z, target


@pytest.mark.parametrize("backend", ["auto", "torch", "compiled"])
def test_grad_and_jacrev_match_pytorch(backend):
    """grad of the mean; jacrev of the per-row losses ("none"), an (8, 8, 100) Jacobian."""
    z, target = case()
    for reduction, transform in (("mean", grad), ("none", jacrev)):

        def ours(x, reduction=reduction):
            return fastxent.cross_entropy(
                x, target, reduction=reduction, label_smoothing=0.1, backend=backend
            )

        def theirs(x, reduction=reduction):
            return F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)

        torch.testing.assert_close(transform(ours)(z), transform(theirs)(z), **F64)


def test_vmap_and_per_sample_gradients():
    """vmap over batches of logits; per-sample gradients of a linear head by vmap(grad(...))."""
    z, target = case(1)
    z3, t3 = z.reshape(2, 4, 100), target.reshape(2, 4)
    torch.testing.assert_close(
        vmap(lambda x, y: fastxent.cross_entropy(x, y, z_loss=1e-3, backend="torch"))(z3, t3),
        vmap(lambda x, y: F.cross_entropy(x, y) + 1e-3 * _mean_lse2(x, y))(z3, t3),
        **F64,
    )
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(8, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(100, 16, generator=g, dtype=torch.float64)
    y = target.clamp(min=0)

    def per_sample(loss):
        return vmap(grad(loss), in_dims=(None, 0, 0))(weight, hidden, y)

    ours = per_sample(
        lambda w, h, t: fastxent.linear_cross_entropy(h[None], w, t[None], chunk_size=4)
    )
    theirs = per_sample(lambda w, h, t: F.cross_entropy(h[None] @ w.T, t[None]))
    torch.testing.assert_close(ours, theirs, **F64)


def _mean_lse2(x, y):
    counted = y != -100
    return torch.where(counted, torch.logsumexp(x, dim=1) ** 2, 0.0).sum() / counted.sum()


def test_bad_targets_are_reported_by_pytorch_under_a_transform():
    z, _ = case()
    with pytest.raises(IndexError, match="Target 500 is out of bounds"):
        grad(lambda x: fastxent.cross_entropy(x, torch.full((8,), 500), backend="torch"))(z)


def test_an_unknown_backend_is_refused_under_a_transform_too():
    """PyTorch's ops serve calls under torch.func, where no backend is looked up: the name is
    still checked (and for linear_cross_entropy's D = 0, which PyTorch's ops serve too)."""
    z, y = torch.randn(4, 10, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        torch.func.grad(lambda z: fastxent.cross_entropy(z, y, backend="nope"))(z)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fastxent.linear_cross_entropy(torch.randn(4, 0), torch.randn(10, 0), y, backend="nope")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["cross_entropy", "linear"])
def test_batched_grad_outputs_get_a_clear_error_and_leave_the_graph_usable(form, reduction):
    """autograd.grad(is_grads_batched=True) vmaps backward, which cannot batch the in-place
    scaling: it raised vmap's "Batching rule not implemented for aten::mul.out". Now fastxent's
    error says what to use instead, and a plain backward through the retained graph afterwards
    still gives PyTorch's gradient (the failed call recorded no fold)."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    target = torch.tensor([0, 1, 3, 4])
    if form == "cross_entropy":
        loss = fastxent.cross_entropy(
            hidden @ weight.T, target, reduction=reduction, backend="torch"
        )
    else:
        loss = fastxent.linear_cross_entropy(
            hidden, weight, target, reduction=reduction, chunk_size=2
        )
    batched = torch.stack([torch.ones_like(loss), 2 * torch.ones_like(loss)])
    with pytest.raises(RuntimeError, match=r"is_grads_batched=True.* is not supported"):
        torch.autograd.grad(loss, hidden, batched, is_grads_batched=True, retain_graph=True)
    grad_output = torch.full_like(loss, 3.0)
    (got,) = torch.autograd.grad(loss, hidden, grad_output)
    want_loss = torch.nn.functional.cross_entropy(hidden @ weight.T, target, reduction=reduction)
    (want,) = torch.autograd.grad(want_loss, hidden, grad_output)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _tangent(fn, z, direction, grad_mode: bool):
    """The forward-mode AD tangent of ``fn(z)`` along ``direction``."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        return fwAD.unpack_dual(fn(fwAD.make_dual(z, direction))).tangent


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("form", ["torch", "compiled", "linear"])
def test_forward_mode_ad_gives_pytorchs_tangent(form, grad_mode):
    """Dual tensors (torch.autograd.forward_ad) run on PyTorch's ops: the Function has no jvp
    (PyTorch's NotImplementedError before), and under no_grad its detached inputs dropped the
    tangent, a silent None. The tangent of the loss is ⟨∇loss, direction⟩."""
    z, target = case()
    direction = torch.randn(
        z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    if form == "linear":  # the logits as h·Wᵀ with W the identity, walked in chunks

        def ours(x):
            eye = torch.eye(100, dtype=torch.float64)
            return fastxent.linear_cross_entropy(x, eye, target, chunk_size=2, **options)
    else:

        def ours(x):
            return fastxent.cross_entropy(x, target, backend=form, **options)

    got = _tangent(ours, z, direction, grad_mode)
    want = _tangent(lambda x: torch_composed(x, target, **options), z, direction, True)
    torch.testing.assert_close(got, want, **F64)


def test_a_dual_class_weight_with_class_indices_is_refused_as_a_weight_requiring_grad():
    """PyTorch's loss gives class weights no derivative with class-index targets (its forward
    tangent is None): fastxent refuses one, as it refuses a weight that requires grad, where
    PyTorch's ops under fastxent's mean differentiated 1/Σw_y alone (a wrong tangent)."""
    import torch.autograd.forward_ad as fwAD

    z, target = case()
    weight = torch.rand(100, dtype=torch.float64) + 0.5
    with fwAD.dual_level():
        dual = fwAD.make_dual(weight, torch.ones_like(weight))
        with pytest.raises(ValueError, match=r"unpack_dual\(weight\).primal"):
            fastxent.cross_entropy(z, target, weight=dual)
        soft = torch.softmax(z, 1)  # probability targets: the weights' tangent is computed
        got = fwAD.unpack_dual(fastxent.cross_entropy(z, soft, weight=dual)).tangent
        want = fwAD.unpack_dual(F.cross_entropy(z, soft, weight=dual)).tangent
    torch.testing.assert_close(got, want, **F64)
