"""float16 gradients under loss scaling (GradScaler's grad_output of 2^16).

Most entries of a mean's gradient are about o_i / N, below float16's smallest subnormal (6e-8)
for a large vocabulary; PyTorch under autocast computes them in float32 and multiplies by the
loss scale before casting to float16, so they survive. fastxent writes the gradient in forward,
so it writes float16 gradients without the mean's 1/N and applies it with grad_output in backward
(``fastxent._autograd.deferred_factor``). Each test compares the error against float64 with that of
PyTorch under float16 autocast, as a norm over the whole gradient (a max-entry error cannot see
entries flushed to zero).
"""

import pytest
import torch
import torch.nn.functional as F

import fastxent
from fastxent.check import torch_composed

SCALE = 2.0**16


def norm_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got / SCALE - want‖ / ‖want‖ (got carries the loss scale)."""
    return float((got.double() / SCALE - want).norm() / want.norm())


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_cross_entropy_float16_gradient_survives_loss_scaling(backend):
    g = torch.Generator().manual_seed(0)
    z64 = torch.randn(1024, 8192, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 8192, (1024,), generator=g)
    z16 = z64.half()
    exact = z16.double().requires_grad_()
    F.cross_entropy(exact, target).backward()

    ours = z16.clone().requires_grad_()
    loss = fastxent.cross_entropy(ours, target, backend=backend)
    (loss * SCALE).backward()
    theirs = z16.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        (F.cross_entropy(theirs, target) * SCALE).backward()

    torch.testing.assert_close(loss.double(), F.cross_entropy(exact.detach(), target))
    assert norm_error(ours.grad, exact.grad) <= 1.5 * norm_error(theirs.grad, exact.grad)
    assert float((ours.grad == 0).double().mean()) < 0.01  # was 0.6: entries flushed to zero


@pytest.mark.parametrize("options", [{"logit_scale": 1e5}, {"logit_scale": 1e5, "softcap": 3.0}])
@pytest.mark.parametrize("backend", ["torch", "compiled", "linear"])
def test_a_large_logit_scale_does_not_overflow_the_float16_mean(backend, options):
    """A row's entries carry the chain factor α (α(1 - tanh²) with softcap): written before the
    mean's 1/N, α = 1e5 made them inf where the mean's gradient, 12496 here, fits float16."""
    z = torch.zeros(8, 16)
    z[:, 1] = 1e-5
    target = torch.zeros(8, dtype=torch.long)
    exact = z.half().double().requires_grad_()
    torch_composed(exact, target, **options).backward()  # PyTorch's ops, in float64
    ours = z.half().requires_grad_()
    if backend == "linear":  # the logits as h·Wᵀ with W the identity
        eye = torch.eye(16).half()
        fastxent.linear_cross_entropy(ours, eye, target, chunk_size=4, **options).backward()
    else:
        fastxent.cross_entropy(ours, target, backend=backend, **options).backward()
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(ours.grad.double(), exact.grad.half().double(), rtol=2e-3, atol=0)


@pytest.mark.parametrize(
    "options",
    [{"logit_scale": 100.0}, {"logit_scale": 100.0, "softcap": 3.0}, {"logit_scale": -50.0}],
)
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_moderate_logit_scale_keeps_the_small_float16_entries(backend, options):
    """A row's entries keep α's factor up to 2^12: dividing all of α = 100 out of the float16
    buffer flushed to 0 entries that are normal numbers after a loss scale of 2^10. The error
    (as a norm) stays within PyTorch's under float16 autocast."""
    scale = 2.0**10
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(16, 4096, generator=g) * 0.05).half()
    target = torch.randint(0, 4096, (16,), generator=g)
    exact = z.double().requires_grad_()
    (torch_composed(exact, target, **options) * scale).backward()
    ours = z.clone().requires_grad_()
    (fastxent.cross_entropy(ours, target, backend=backend, **options) * scale).backward()
    theirs = z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        (torch_composed(theirs, target, **options) * scale).backward()
    normal = exact.grad.half().abs() >= 2.0**-14
    assert not (ours.grad[normal] == 0).any()

    def error(got):
        return float((got.double() - exact.grad).norm() / exact.grad.norm())

    assert error(ours.grad) <= 1.5 * error(theirs.grad)


def test_retained_graph_backward_twice_keeps_the_factor():
    """A second backward through a retained graph (grad_output halved) gives half the first
    one's gradient: the deferred factor is applied once per backward, not folded in twice."""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(256, 4096, generator=g) * 2).half()
    target = torch.randint(0, 4096, (256,), generator=g)
    ours, theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = fastxent.cross_entropy(ours, target, backend="torch")
    (loss * SCALE).backward(retain_graph=True)
    first = ours.grad.clone()
    ours.grad = None  # the buffer was handed over as .grad; a second backward makes a new one
    (loss * SCALE / 2).backward()
    torch.testing.assert_close(ours.grad, first / 2, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.float16):
        (F.cross_entropy(theirs, target) * SCALE).backward()
    assert norm_error(first, theirs.grad.double() / SCALE) < 1e-2


@pytest.mark.parametrize("walk", [{"chunk_size": 128}, {"vocab_block": 1024}], ids=str)
def test_linear_float16_gradients_survive_loss_scaling(walk):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(512, 32, generator=g).half()
    weight = (torch.randn(8192, 32, generator=g) * 0.4).half()
    target = torch.randint(0, 8192, (512,), generator=g)
    exact = [x.double().requires_grad_() for x in (hidden, weight)]
    F.cross_entropy(exact[0] @ exact[1].T, target).backward()

    ours = [x.clone().requires_grad_() for x in (hidden, weight)]
    (fastxent.linear_cross_entropy(*ours, target, **walk) * SCALE).backward()
    theirs = [x.clone().requires_grad_() for x in (hidden, weight)]
    with torch.autocast("cpu", dtype=torch.float16):
        (F.cross_entropy(F.linear(*theirs), target) * SCALE).backward()
    for name, mine, base, want in zip(("dh", "dW"), ours, theirs, exact, strict=True):
        err, base_err = norm_error(mine.grad, want.grad), norm_error(base.grad, want.grad)
        assert err <= 1.5 * base_err + 1e-4, f"{name}: {err:.2e} against PyTorch's {base_err:.2e}"


def test_filter_eps_thresholds_the_true_float16_gradient():
    """filter_eps compares |∂ℓ/∂z| with eps: a float16 gradient held without the mean's factor
    is compared with eps divided by it. With eps above every |∂ℓ/∂z| every block is skipped
    (∂h = ∂W = 0, the loss exact); just below the largest, some block is kept."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 16, generator=g).half()
    weight = (torch.randn(1024, 16, generator=g) * 0.5).half()
    target = torch.randint(0, 1024, (64,), generator=g)
    exact = [x.double().requires_grad_() for x in (hidden, weight)]
    logits = exact[0] @ exact[1].T
    largest = float(torch.autograd.grad(F.cross_entropy(logits, target), logits)[0].abs().max())
    for eps, skips_all in ((1.5 * largest, True), (0.5 * largest, False)):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        loss = fastxent.linear_cross_entropy(*leaves, target, chunk_size=64, filter_eps=eps)
        loss.backward()
        assert bool((leaves[1].grad == 0).all()) == skips_all, eps
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits, target), rtol=1e-3, atol=0)


@pytest.mark.parametrize("grad_output", [1024.0, 1 / 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_filter_eps_thresholds_the_true_per_row_gradient(dtype, grad_output):
    """With reduction="none" filter_eps compares eps with |grad_output · ∂ℓ/∂z|, in float16 too,
    where backward divides grad_output by its largest power of two (a loss scale of 1024 made
    the threshold 1024× too coarse, a grad_output of 1/64 64× too fine)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 16, generator=g).to(dtype)
    weight = (torch.randn(1024, 16, generator=g) * 0.5).to(dtype)
    target = torch.randint(0, 1024, (64,), generator=g)
    logits = (hidden.double() @ weight.double().T).requires_grad_()
    dz = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), logits)[0]
    largest = grad_output * float(dz.abs().max())
    for eps, skips_all in ((1.5 * largest, True), (0.5 * largest, False)):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        losses = fastxent.linear_cross_entropy(
            *leaves, target, reduction="none", chunk_size=64, filter_eps=eps
        )
        losses.backward(torch.full_like(losses, grad_output))
        assert bool((leaves[1].grad == 0).all()) == skips_all, eps


@pytest.mark.parametrize(
    "walk",
    [{"chunk_size": 96}, {"chunk_size": 512}, {"vocab_block": 16}],
    ids=["chunks", "one chunk", "vocab"],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_float16_weight_gradient_is_scaled_before_it_is_rounded(walk, reduction):
    """∂W of float16 weights stays finite where PyTorch's is: it sums over tokens, so made in
    forward without the mean's 1/N (or a grad_output of 1/N after a "sum") it passed 65504 and
    became inf when cast to float16 (across chunks), or in one chunk's float16 product. The
    products run in float32, and the sum is cast after backward's scaling."""
    g = torch.Generator().manual_seed(0)
    n, dim, num_classes = 512, 16, 32
    hidden = (torch.randn(n, dim, generator=g) + 200.0).half()  # ∂W entries near -200
    weight = (torch.randn(num_classes, dim, generator=g) * 0.02).half()
    target = torch.zeros(n, dtype=torch.long)
    scale = 1.0 if reduction == "mean" else 1.0 / n

    def grads(fn, dtype, **kwargs):
        h, w = (x.to(dtype).requires_grad_() for x in (hidden, weight))
        (fn(h, w, target, reduction=reduction, **kwargs) * scale).backward()
        return h.grad, w.grad

    exact = grads(lambda h, w, t, **kw: F.cross_entropy(F.linear(h, w), t, **kw), torch.float64)
    eager = grads(lambda h, w, t, **kw: F.cross_entropy(F.linear(h, w), t, **kw), torch.float16)
    ours = grads(fastxent.linear_cross_entropy, torch.float16, backend="torch", **walk)
    assert torch.isfinite(eager[1]).all() and exact[1].abs().max() > 100
    for got, base, want in zip(ours, eager, exact, strict=True):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        base_err = float((base.double() - want).norm() / want.norm())
        assert float((got.double() - want).norm() / want.norm()) <= 2 * base_err + 1e-3


def _half_case(n=64, v=20000, seed=2):
    """float16 logits whose target logit stands out (o_y near 1: entries far from overflow)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    z[torch.arange(n), y] += 8.0
    return z.half(), y


def _autocast_grad(z16, y, grad_output, **kwargs):
    """PyTorch's float16 gradient under autocast (the float32 computation, then one rounding)."""
    x = z16.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        F.cross_entropy(x, y, **kwargs).backward(grad_output)
    return x.grad


def test_a_per_row_loss_scale_beyond_float16_range_is_applied_in_float32():
    """reduction="none" with a grad_output of 2^16 per row: cast to float16 first, 65536 was inf
    and every entry of the gradient inf or NaN (PyTorch's: finite)."""
    z16, y = _half_case()
    grad_output = torch.full((z16.shape[0],), SCALE)
    x = z16.clone().requires_grad_()
    fastxent.cross_entropy(x, y, reduction="none", backend="torch").backward(grad_output)
    theirs = _autocast_grad(z16, y, grad_output, reduction="none")
    assert torch.isfinite(theirs).all() and torch.isfinite(x.grad).all()
    exact = _autocast_grad(z16.double(), y, grad_output, reduction="none").double()
    assert (x.grad.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max()
    # The token walk scales its chunks too; small weights keep the true gradients in range.
    # Its float16 ∂W is within float16's precision of the largest entry (2^-10; 6.5e-4 at worst
    # over 30 seeds): an absolute 1e-2 per entry, unseeded, failed now and then on entries
    # that cancel (float16's step is 0.25 at the largest, ~280).
    g = torch.Generator().manual_seed(3)
    h = torch.randn(64, 16, dtype=torch.float64, generator=g) * 1e-3
    w64 = (torch.randn(500, 16, dtype=torch.float64, generator=g) * 1e-3).requires_grad_()
    w = w64.detach().half().requires_grad_()
    losses = fastxent.linear_cross_entropy(h.half(), w, y % 500, reduction="none", chunk_size=16)
    losses.backward(grad_output)
    F.cross_entropy(F.linear(h, w64), y % 500, reduction="none").backward(grad_output.double())
    assert (w.grad.double() - w64.grad).abs().max() <= 2.0**-10 * w64.grad.abs().max()


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_float16_smoothing_carries_the_largest_weight_of_any_class(backend):
    """With label smoothing every row carries every class's weight (ε/C·w), so the float16
    factor must count the largest weight of all classes, not only of the targets: a weight of
    1e6 on a class no target names overflowed the gradient to -inf when it did not."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, generator=g).half()
    y = torch.tensor([0, 1, 2, 0])
    w = torch.tensor([1.0, 1.0, 1.0, 1e6])  # class 3 is never a target
    x = z.clone().requires_grad_()
    fastxent.cross_entropy(x, y, w, label_smoothing=0.5, backend=backend).backward()
    exact = z.double().requires_grad_()
    F.cross_entropy(exact, y, w.double(), label_smoothing=0.5).backward()
    torch.testing.assert_close(x.grad.double(), exact.grad, rtol=2.0**-10, atol=0.0)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_float16_z_loss_alone_is_deferred_by_its_own_scale(backend):
    """Every target weighing 0 leaves only the z-loss, whose entries 2·s·lse·o/N (~1e-8 here)
    are below float16's subnormals: the factor kept out must then come from the z-loss's scale,
    not the zero cross-entropy scale. Under a loss scale of 2^16 the gradient is within 1% of
    float64 (norm; 0.2% measured, the flushed tail of the softmax); taken from the zero scale it
    was 8% off, 90% of its entries flushed to zero."""
    g = torch.Generator().manual_seed(2)
    n, v = 64, 20000
    z = (torch.randn(n, v, generator=g) * 2).half()
    y = torch.randint(0, v, (n,), generator=g)
    w = torch.ones(v)
    w[y] = 0.0
    x = z.clone().requires_grad_()
    loss = fastxent.cross_entropy(x, y, w, z_loss=1e-3, backend=backend)
    loss.backward(torch.tensor(SCALE))
    exact = z.double().requires_grad_()
    (1e-3 * torch.logsumexp(exact, 1).square().mean()).backward()  # norm_error divides by SCALE
    assert norm_error(x.grad, exact.grad) <= 0.01


def test_a_retained_backward_rescales_by_a_ratio_beyond_float16_range():
    """grad_output 1, then 2^16 through the retained graph: the ratio cast to float16 was inf.
    The second gradient is the first times 2^16 (to one float16 rounding of each, and the
    smallest subnormal's step), and its error against float64 is within 1.5x PyTorch's under
    float16 autocast: finiteness alone passed a second backward that ignored its grad_output."""
    z16, y = _half_case()
    x = z16.clone().requires_grad_()
    loss = fastxent.cross_entropy(x, y, reduction="sum", backend="torch")
    loss.backward(torch.tensor(1.0), retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(torch.tensor(SCALE))
    theirs = _autocast_grad(z16, y, torch.tensor(SCALE), reduction="sum")
    assert torch.isfinite(theirs).all() and torch.isfinite(x.grad).all()
    exact = _autocast_grad(z16.double(), y, torch.tensor(SCALE), reduction="sum").double()
    assert norm_error(x.grad, exact / SCALE) <= 1.5 * norm_error(theirs, exact / SCALE)
    torch.testing.assert_close(
        x.grad.double(), first.double() * SCALE, rtol=2.0**-10, atol=SCALE * 2.0**-24
    )


@pytest.mark.parametrize("scale", [1e-3, 1e5])
def test_float16_weighted_mean_does_not_depend_on_the_weights_scale(scale):
    """The weighted mean is the same for weights c·w: its float16 gradient must not overflow
    (c = 1e5 gave inf at every target) nor lose precision (c = 1e-3: 8x PyTorch's error)."""
    z16, y = _half_case()
    weight = torch.full((z16.shape[1],), scale)
    x = z16.clone().requires_grad_()
    fastxent.cross_entropy(x, y, weight=weight, backend="torch").backward(torch.tensor(SCALE))
    theirs = _autocast_grad(z16, y, torch.tensor(SCALE), weight=weight)
    exact = _autocast_grad(z16.double(), y, torch.tensor(SCALE), weight=weight.double())
    assert torch.isfinite(x.grad).all()
    assert norm_error(x.grad, exact.double() / SCALE) <= 1.5 * norm_error(theirs, exact / SCALE)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize(("scale", "grad_output"), [(1e5, 0.5), (1e-6, SCALE)])
@pytest.mark.parametrize("backend", ["torch", "compiled", "linear"])
def test_float16_sum_and_none_are_written_relative_to_the_weights(
    backend, scale, grad_output, reduction
):
    """As the mean's: weights of 1e5 made the target entries of a "sum"/"none" gradient inf
    (w·(o - 1) past 65504) where the true gradient times grad_output 0.5 fits float16; weights
    of 1e-6 put its entries in float16's subnormals, where a loss scale of 2^16 restored only
    a few bits (64x PyTorch's error, entries of 2e-3 came back 0)."""
    z16, y = _half_case(n=16, v=256)
    weight = torch.rand(256, generator=torch.Generator().manual_seed(3)) * scale + scale / 2
    rows = torch.full((16,), grad_output)
    grad = rows if reduction == "none" else torch.tensor(grad_output)
    x = z16.clone().requires_grad_()
    if backend == "linear":  # the logits as h·Wᵀ with W the identity
        eye = torch.eye(256).half()
        loss = fastxent.linear_cross_entropy(
            x, eye, y, class_weight=weight, reduction=reduction, chunk_size=4
        )
    else:
        loss = fastxent.cross_entropy(x, y, weight, reduction=reduction, backend=backend)
    loss.backward(grad)
    theirs = _autocast_grad(z16, y, grad, weight=weight, reduction=reduction)
    exact = _autocast_grad(
        z16.double(), y, grad.double(), weight=weight.double(), reduction=reduction
    )
    want = F.cross_entropy(z16.double(), y, weight.double(), reduction=reduction)
    # float32's lse - z_y: rows of o_y near 1 are small, so absolute to the largest row
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert torch.isfinite(x.grad).all()
    assert norm_error(x.grad, exact / SCALE) <= 1.5 * norm_error(theirs, exact / SCALE)


@pytest.mark.parametrize("walk", [{"chunk_size": 4}, {"vocab_block": 16}])
def test_linear_float16_none_takes_the_per_row_loss_scale_out_with_the_weights(walk):
    """linear_cross_entropy "none" applies grad_output in backward's recomputed chunks: with
    the entries written relative to small weights (1e-6 to 4e-6), a per-row loss scale of 2^16
    on top overflowed them (∂h NaN, ∂W inf). The largest grad_output joins the factor now."""
    g = torch.Generator().manual_seed(4)
    hidden, eye = torch.randn(16, 64, generator=g).half(), torch.eye(64).half()
    target = torch.randint(0, 64, (16,), generator=g)
    weight = (torch.rand(64, generator=g) + 0.5) * 1e-6
    weight[32:] *= 3
    grad = torch.full((16,), SCALE)
    grad[::3] = SCALE / 64  # rows of other scales too
    x = hidden.clone().requires_grad_()
    loss = fastxent.linear_cross_entropy(
        x, eye, target, class_weight=weight, reduction="none", **walk
    )
    loss.backward(grad)
    kwargs = {"weight": weight, "reduction": "none"}
    theirs = _autocast_grad(hidden, target, grad, **kwargs)
    exact = _autocast_grad(
        hidden.double(), target, grad.double(), **{**kwargs, "weight": weight.double()}
    )
    assert torch.isfinite(x.grad).all()
    assert norm_error(x.grad, exact / SCALE) <= 1.5 * norm_error(theirs, exact / SCALE)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["torch", "compiled", "linear"])
def test_a_large_weight_of_an_untargeted_class_keeps_the_float16_mean(backend, label_smoothing):
    """The mean's float16 gradient was divided by the largest class weight of all classes: a
    weight of 1e8 on a class no row targets (weights of 1 elsewhere) flushed every entry to
    zero, silently (the loss was right). Only the weights the entries carry count now: the
    targets', and all classes' through label smoothing's ε/V share (large entries then). The
    smoothed cases passed before too: they guard that share, kept in the bound."""
    z16, y = _half_case(n=16, v=256)
    y[y == 255] = 0
    weight = torch.ones(256)
    weight[255] = 1e8  # class 255 is never a target
    x = z16.clone().requires_grad_()
    options = {"weight" if backend != "linear" else "class_weight": weight}
    options["label_smoothing"] = label_smoothing
    if backend == "linear":  # the logits as h·Wᵀ with W the identity
        eye = torch.eye(256).half()
        fastxent.linear_cross_entropy(x, eye, y, chunk_size=4, **options).backward()
    else:
        fastxent.cross_entropy(x, y, backend=backend, **options).backward()
    kwargs = {"weight": weight, "label_smoothing": label_smoothing}
    theirs = _autocast_grad(z16, y, torch.tensor(1.0), **kwargs)
    exact = _autocast_grad(
        z16.double(), y, torch.tensor(1.0), **{**kwargs, "weight": weight.double()}
    )
    assert torch.isfinite(x.grad).all()
    assert norm_error(x.grad * SCALE, exact) <= 1.5 * norm_error(theirs * SCALE, exact)


@pytest.mark.parametrize("shape", [(3000,), (5, 7, 300), (0, 40)], ids=str)
def test_scaled_in_blocks_multiplies_half_precision_in_float32_in_any_shape(shape):
    """A 0-dim or per-row factor past float16's range (2^19 here) times small entries: the
    product is in range and exact to one rounding, whatever the gradient's dimensions (∂b is
    1-D) and on blocks of rows (SCALE_BLOCK_ELEMENTS)."""
    from fastxent._autograd import scaled_in_blocks

    grad = (torch.rand(shape, dtype=torch.float64) * 1e-3).half()
    for factor in (torch.tensor(2.0**19), torch.full(shape[:1], 2.0**19)):
        want = grad.double() * factor.double().reshape(-1, *[1] * (grad.dim() - 1))
        got = scaled_in_blocks(grad, factor, torch.empty_like(grad))
        torch.testing.assert_close(got.double(), want, rtol=2.0**-11, atol=0)


@pytest.mark.gpu
def test_scaling_a_strided_cuda_half_gradient_keeps_a_large_factor():
    """Strided CUDA gradients skip the Triton scaling kernel: a 0-dim CUDA factor of 2^19
    multiplied in float16 would be inf."""
    from fastxent._autograd import scale_by_grad_output

    grad = (torch.rand(64, 200, device="cuda", dtype=torch.float64) * 1e-3).half()[:, ::2]
    want = grad.double() * 2.0**19
    scale_by_grad_output(grad, torch.tensor(2.0**19, device="cuda"))
    torch.testing.assert_close(grad.double(), want, rtol=2.0**-11, atol=0)
