"""The CPU gradient buffer is reused across steps only when nothing else holds it."""

import pytest
import torch
import torch.nn.functional as F

import fastxent
from fastxent import _autograd
from versions import folds_in_place

N, V = 64, 4096  # 1 MiB of float32: the smallest gradient that is kept for reuse


@pytest.fixture(autouse=True)
def fresh_cache():
    fastxent.empty_cache()
    yield
    fastxent.empty_cache()


def step(z, target, **kwargs):
    loss = fastxent.cross_entropy(z, target, backend="torch", **kwargs)
    loss.backward()
    return loss


def torch_grad(z, target):
    x = z.detach().clone().requires_grad_()
    F.cross_entropy(x, target).backward()
    return x.grad


def make(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g).requires_grad_(), torch.randint(0, V, (N,), generator=g)


@folds_in_place
def test_a_dropped_gradient_is_reused():
    z, y = make(0)
    step(z, y)
    first = z.grad.data_ptr()
    z.grad = None  # the usual zero_grad(set_to_none=True)
    step(z, y)
    assert z.grad.data_ptr() == first
    torch.testing.assert_close(z.grad, torch_grad(z, y))


@pytest.mark.parametrize("keep", ["grad", "view", "numpy"])
def test_a_gradient_still_held_is_never_overwritten(keep):
    z, y = make(1)
    step(z, y)
    held = {"grad": lambda g: g, "view": lambda g: g[3:], "numpy": lambda g: g.numpy()}[keep]
    kept = held(z.grad)
    snapshot = torch.as_tensor(kept).clone()
    z.grad = None
    other, y2 = make(2)
    step(other, y2)
    assert torch.equal(torch.as_tensor(kept), snapshot)  # untouched by the second step
    torch.testing.assert_close(other.grad, torch_grad(other, y2))


def test_a_gradient_whose_storage_object_is_held_is_never_overwritten():
    # t.untyped_storage() is one Python object per storage, the one the reuse list keeps: it
    # adds a Python reference, not a use count
    z, y = make(3)
    step(z, y)
    storage = z.grad.untyped_storage()
    snapshot = z.grad.clone()
    z.grad = None
    other, y2 = make(4)
    step(other, y2)
    kept = torch.empty(0).set_(storage, 0, (N, V))
    assert torch.equal(kept, snapshot)
    torch.testing.assert_close(other.grad, torch_grad(other, y2))


def test_a_gradient_in_shared_memory_is_let_go():
    # what torch.multiprocessing does to a tensor it sends: the receiving process's mapping is
    # not seen in this process's use count, so the storage must not be handed out again
    z, y = make(5)
    step(z, y)
    shared = z.grad.share_memory_().data_ptr()
    z.grad = None
    other, y2 = make(6)
    step(other, y2)
    assert other.grad.data_ptr() != shared
    assert all(not s.is_shared() for s, _ in _autograd._spares)


@folds_in_place
def test_a_gradient_moved_to_shared_memory_while_it_was_checked_is_let_go(monkeypatch):
    """A multiprocessing queue's feeder thread pickles a sent tensor (moving its storage to
    shared memory) and then drops it, on its own schedule: between the reuse list's shared
    memory filter and its test that nothing holds the storage, the storage passed both and was
    handed out while the other process read it (19 of 3000 sent gradients overwritten, with
    frequent thread switches). Here the move happens inside that window, every time."""
    z, y = make(7)
    step(z, y)
    sent = z.grad
    z.grad = None
    unheld = _autograd._unheld

    def feeder_moves_it_then_lets_go(entry):
        nonlocal sent
        if sent is not None and entry[0].data_ptr() == sent.data_ptr():
            sent.share_memory_()
            sent = None
        return unheld(entry)

    monkeypatch.setattr(_autograd, "_unheld", feeder_moves_it_then_lets_go)
    other, y2 = make(8)
    step(other, y2)
    assert sent is None  # the window was reached
    assert not other.grad.is_shared()  # (moving it changed its address: that says nothing)
    torch.testing.assert_close(other.grad, torch_grad(other, y2))


def test_gradient_accumulation_is_exact():
    """.grad is not reset: the second gradient accumulates into the first buffer, not over it."""
    z, y = make(3)
    step(z, y)
    step(z, y)
    torch.testing.assert_close(z.grad, 2 * torch_grad(z, y))


def test_a_retained_graph_keeps_its_buffer():
    z, y = make(4)
    loss = fastxent.cross_entropy(z, y, backend="torch")
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    first = first.clone()
    other, y2 = make(5)
    step(other, y2)  # must not take the buffer the retained graph still needs
    (again,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(again, first)


def storage_of(x):
    return x.untyped_storage().data_ptr()


@folds_in_place  # the gradient handed out is the kept storage itself
def test_a_smaller_gradient_takes_a_kept_storage_up_to_twice_its_size():
    """Batches whose size changes every step reuse kept storages (each fresh one pays a page
    fault per page): one of 3/4 of a kept storage's size takes it; one of 3/8 does not."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(128, 2 * V, generator=g).requires_grad_()  # 4 MiB gradient
    y = torch.randint(0, 2 * V, (128,), generator=g)
    step(z, y)
    first = storage_of(z.grad)
    z.grad = None
    for rows, reused in ((96, True), (48, False)):
        part = z.detach()[:rows].clone().requires_grad_()
        step(part, y[:rows])
        assert (storage_of(part.grad) == first) == reused, rows
        torch.testing.assert_close(part.grad, torch_grad(part, y[:rows]))


def test_an_unused_kept_storage_is_let_go():
    """One outsized step does not pin its gradient's memory: a kept storage that serves none of
    the next SPARE_AGE requests leaves the list (and is freed once nothing else holds it)."""
    z, y = make(9)
    big = torch.randn(4 * N, V).requires_grad_()
    step(big, torch.randint(0, V, (4 * N,)))
    big_storage = storage_of(big.grad)
    big.grad = None
    for _ in range(_autograd.SPARE_AGE + 1):
        step(z, y)
        z.grad = None
    assert big_storage not in [s.data_ptr() for s, _ in _autograd._spares]
    assert len(_autograd._spares) == 1


def test_empty_cache_releases_the_buffer():
    z, y = make(6)
    step(z, y)
    z.grad = None
    assert _autograd._spares
    fastxent.empty_cache()
    assert not _autograd._spares


def test_small_and_non_contiguous_gradients_are_not_kept():
    z = torch.randn(4, 10, requires_grad=True)
    step(z, torch.tensor([1, 2, 3, 4]))
    zt = torch.randn(V, N).t().requires_grad_()  # (N, V), transposed: keeps its own layout
    step(zt, torch.randint(0, V, (N,)))
    assert not _autograd._spares
    assert zt.grad.stride() == zt.stride()


def linear_case(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = (torch.randn(8192, 32, generator=g) * 0.3).requires_grad_()  # ∂W: 1 MiB
    return hidden, weight, torch.randint(0, 8192, (64,), generator=g)


def linear_step(hidden, weight, target):
    fastxent.linear_cross_entropy(hidden, weight, target, chunk_size=32).backward()


def linear_torch_grads(hidden, weight, target):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.cross_entropy(h @ w.T, target).backward()
    return h.grad, w.grad


@folds_in_place
@pytest.mark.parametrize("walk", [{}, {"vocab_block": 1024, "chunk_size": None}], ids=str)
def test_linear_walks_reuse_a_dropped_weight_gradient_and_their_logits(walk):
    """The token walk's float32 ∂W (the vocab walk's too) and its logits chunk (32 × 8192, 1 MiB)
    come from kept storages on the next step; the gradients stay exact."""
    hidden, weight, target = linear_case(7)
    kwargs = {"chunk_size": 32, **walk}
    fastxent.linear_cross_entropy(hidden, weight, target, **kwargs).backward()
    first, kept = weight.grad.data_ptr(), len(_autograd._spares)
    hidden.grad = weight.grad = None
    fastxent.linear_cross_entropy(hidden, weight, target, **kwargs).backward()
    assert weight.grad.data_ptr() == first and len(_autograd._spares) == kept
    wants = linear_torch_grads(hidden, weight, target)
    for got, want in zip((hidden.grad, weight.grad), wants, strict=True):
        torch.testing.assert_close(got, want)


def test_a_weight_gradient_still_held_is_never_overwritten():
    hidden, weight, target = linear_case(8)
    linear_step(hidden, weight, target)
    kept = weight.grad
    snapshot = kept.clone()
    weight.grad = None
    other = linear_case(9)
    linear_step(*other)
    assert torch.equal(kept, snapshot)
    torch.testing.assert_close(other[1].grad, linear_torch_grads(*other)[1])


def test_weight_gradient_accumulation_is_exact():
    hidden, weight, target = linear_case(10)
    linear_step(hidden, weight, target)
    linear_step(hidden, weight, target)
    torch.testing.assert_close(weight.grad, 2 * linear_torch_grads(hidden, weight, target)[1])
