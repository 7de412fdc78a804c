"""fastxent.linear_cross_entropy against the float64 oracle, reference.linear_cross_entropy.

The oracle materialises the logits z = h Wᵀ + b in float64, takes the loss and ∂ℓ/∂z from
:func:`fastxent.reference.cross_entropy`, and chains ∂h = g W, ∂W = gᵀ h, ∂b = Σ_r g_r (it is
itself checked against PyTorch's autograd in test_reference.py).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastxent
from fastxent import reference
from fastxent._linear import CHUNK_BYTES, _kept_columns, default_chunk_size
from fastxent.bench import allocated_peak_bytes
from versions import folds_in_place

BACKEND = "torch"
F64 = {"rtol": 1e-10, "atol": 1e-12}  # float64: chunked sums reorder additions only


def make_case(tokens, dim=8, num_classes=423, soft=False, bias=True, seed=0, dtype=torch.float64):
    """Hidden (tokens..., D), weight (V, D), bias (V,), targets with one ignored position."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*tokens, dim), generator=g, dtype=torch.float64)
    weight = torch.randn((num_classes, dim), generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(num_classes, generator=g, dtype=torch.float64) if bias else None
    if soft:
        target = torch.rand((*tokens, num_classes), generator=g, dtype=torch.float64)
    else:
        target = torch.randint(0, num_classes, tokens, generator=g)
        if target.numel() > 2:
            target.view(-1)[2] = -100
    cast = (lambda x: None if x is None else x.to(dtype)) if dtype != torch.float64 else None
    if cast:
        hidden, weight, b = cast(hidden), cast(weight), cast(b)
        target = target.to(dtype) if soft else target
    return hidden, weight, b, target


def oracle(hidden, weight, bias, target, *, grad_output=None, **kwargs):
    """Loss and (∂h, ∂W, ∂b) in float64 by the materialised logits (reference.py)."""
    cw = kwargs.pop("class_weight", None)
    results = reference.linear_cross_entropy(
        *(None if x is None else x.detach().double().numpy() for x in (hidden, weight, bias)),
        target.double().numpy() if target.is_floating_point() else target.numpy(),
        class_weight=None if cw is None else cw.double().numpy(),
        grad_output=None if grad_output is None else grad_output.double().numpy(),
        **kwargs,
    )
    return tuple(torch.from_numpy(np.asarray(x)) for x in results)


def ours(hidden, weight, bias, target, *, grad_output=None, needs=(True, True, True), **kwargs):
    """Loss and gradients of fastxent.linear_cross_entropy (None where not required)."""
    leaves = [
        None if x is None else x.detach().clone().requires_grad_(need)
        for x, need in zip((hidden, weight, bias), needs, strict=True)
    ]
    kwargs.setdefault("backend", BACKEND)
    loss = fastxent.linear_cross_entropy(*leaves[:2], target, leaves[2], **kwargs)
    if any(x is not None and x.requires_grad for x in leaves):
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return (loss.detach(), *(None if x is None else x.grad for x in leaves))


def assert_within_baseline(got, baseline, want, tol, names=("loss", "dh", "dW", "db")):
    """Each output's error against the float64 ``want`` is at most ``baseline``'s (PyTorch on the
    same inputs) plus ``tol``, both relative to the output's largest entry."""
    for name, g, b, w in zip(names, got, baseline, want, strict=True):
        scale = w.abs().max()
        err = (g.cpu().double() - w).abs().max() / scale
        ref_err = (b.cpu().double() - w).abs().max() / scale
        assert err <= ref_err + tol, f"{name}: error {err:.2e} > baseline {ref_err:.2e} + {tol}"


def assert_matches(got, want, **tol):
    tol = tol or F64
    for name, g, w in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want, strict=True):
        if g is None:
            continue
        assert g.dtype in (torch.float64, torch.float32), name
        torch.testing.assert_close(g.double(), w, msg=lambda m, name=name: f"{name}: {m}", **tol)


OPTIONS = [
    {},
    {"label_smoothing": 0.2},
    {"class_weight": "rand"},
    {"class_weight": "rand", "label_smoothing": 0.1, "ignore_index": 5},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"logit_scale": 0.6},
    {"z_loss": 1e-3, "softcap": 2.0, "logit_scale": 1.4, "label_smoothing": 0.05},
]


def resolve(options, num_classes, seed=1):
    options = dict(options)
    if options.get("class_weight") == "rand":
        g = torch.Generator().manual_seed(seed)
        options["class_weight"] = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.1
    return options


# The two walks: token chunks that do not divide N = 13, vocab blocks that do not divide V = 423.
WALKS = [{"chunk_size": 5}, {"vocab_block": 50}]
# And what "auto" does with small CPU calls: the logits at once, from PyTorch's fused ops.
FUSED_OPS = {"backend": "auto"}


@pytest.mark.parametrize("walk", [*WALKS, FUSED_OPS], ids=["tokens", "vocab", "fused ops"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_options_match_oracle(options, reduction, soft, walk):
    """Every loss option, index and soft targets, both walks. ignore_index applies to class
    indices only (a class index as ignore_index is refused with soft targets): soft targets
    take the rest of that case, class weights with smoothing."""
    if soft:
        options = {k: v for k, v in options.items() if k != "ignore_index"}
    hidden, weight, bias, target = make_case((13,), soft=soft, seed=2)
    if not soft and "ignore_index" in options:
        target[target == -100] = options["ignore_index"]
    kwargs = {"reduction": reduction, **resolve(options, weight.shape[0])}
    go = torch.rand(13, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7)
    got = ours(hidden, weight, bias, target, grad_output=go, **walk, **kwargs)
    assert_matches(got, oracle(hidden, weight, bias, target, grad_output=go, **kwargs))


@pytest.mark.skipif(
    fastxent.functional.unavailable_reason("compiled", torch.device("cpu")) is not None,
    reason="the compiled backend cannot run here",
)
@pytest.mark.parametrize("walk", WALKS, ids=["tokens", "vocab"])
@pytest.mark.parametrize("soft", [False, True])
def test_compiled_backend_in_both_walks(soft, walk):
    """backend="compiled" ("auto" on CPU above 2^17 logits), every option at once, shift, and a
    per-token grad_output. The token walk runs the compiled row kernel on each chunk; the vocab
    walk uses no row kernel (portable block math) and must accept the backend all the same."""
    hidden, weight, bias, target = make_case((3, 5), soft=soft, seed=4)
    options = resolve({**OPTIONS[-1], "class_weight": "rand"}, weight.shape[0])
    kwargs = {"reduction": "none", "shift": True, **options}
    go = torch.rand(3, 4, dtype=torch.float64) + 0.5
    got = ours(hidden, weight, bias, target, grad_output=go, backend="compiled", **walk, **kwargs)
    assert_matches(got, oracle(hidden, weight, bias, target, grad_output=go, **kwargs))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
@pytest.mark.parametrize(
    ("tokens", "num_classes"), [((1,), 423), ((9,), 1), ((2, 5), 423), ((3, 4), 37)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_shapes_and_chunks(tokens, num_classes, bias, chunk_size):
    """(N, D) and (B, T, D), N = 1, V = 1 and odd V, chunks that do and do not divide N."""
    hidden, weight, b, target = make_case(tokens, num_classes=num_classes, bias=bias, seed=3)
    for reduction in ("mean", "none"):
        go = torch.rand(tokens, dtype=torch.float64) + 0.5 if reduction == "none" else None
        kwargs = {"reduction": reduction, "label_smoothing": 0.1}
        got = ours(hidden, weight, b, target, grad_output=go, chunk_size=chunk_size, **kwargs)
        want = oracle(hidden, weight, b, target, grad_output=go, **kwargs)
        assert got[0].shape == want[0].shape == (tokens if reduction == "none" else ())
        assert_matches(got, want)


@pytest.mark.parametrize("walk", [{"chunk_size": 4}, FUSED_OPS], ids=["tokens", "fused ops"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("tokens", [(3, 6), (7,), (2, 1)])
def test_shift(tokens, soft, reduction, walk):
    """shift=True: position t predicts target t+1 within each sequence; an (N, D) input is one."""
    hidden, weight, bias, target = make_case(tokens, soft=soft, num_classes=57, seed=4)
    if not soft:
        target.view(-1)[0] = 10_000  # never read with shift: the first position has no predictor
    shifted = (*tokens[:-1], tokens[-1] - 1)
    go = torch.rand(shifted, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kwargs = {"reduction": reduction, "z_loss": 1e-3, "shift": True}
    got = ours(hidden, weight, bias, target, grad_output=go, **walk, **kwargs)
    want = oracle(hidden, weight, bias, target, grad_output=go, **kwargs)
    assert got[0].shape == want[0].shape
    assert_matches(got, want)


def test_shift_equals_explicit_slices():
    """shift=True gives what slicing hidden[:, :-1] and target[:, 1:] by hand gives."""
    hidden, weight, bias, target = make_case((3, 8), num_classes=50, seed=5)
    got = ours(hidden, weight, bias, target, shift=True, chunk_size=5)
    sliced = ours(hidden[:, :-1], weight, bias, target[:, 1:], chunk_size=5)
    torch.testing.assert_close(got[0], sliced[0], **F64)
    torch.testing.assert_close(got[1][:, :-1], sliced[1], **F64)
    assert torch.count_nonzero(got[1][:, -1]) == 0
    torch.testing.assert_close(got[2], sliced[2], **F64)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradient(reduction, backend):
    """No counted token: loss 0 (not NaN) and zero gradients, as fastxent.cross_entropy."""
    hidden, weight, bias, target = make_case((2, 5), num_classes=30, seed=6)
    target.fill_(-100)
    got = ours(hidden, weight, bias, target, reduction=reduction, z_loss=1e-2, backend=backend)
    for x in got:
        assert torch.count_nonzero(x) == 0
    assert_matches(got, oracle(hidden, weight, bias, target, reduction=reduction, z_loss=1e-2))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]
)
def test_gradients_only_where_required(needs, reduction, backend):
    """hidden only / weight only / bias only: the others get no gradient."""
    hidden, weight, bias, target = make_case((11,), num_classes=40, seed=7)
    go = torch.rand(11, dtype=torch.float64) if reduction == "none" else None
    got = ours(
        hidden, weight, bias, target, needs=needs, grad_output=go, reduction=reduction,
        backend=backend,
    )  # fmt: skip
    want = oracle(hidden, weight, bias, target, grad_output=go, reduction=reduction)
    for need, g in zip(needs, got[1:], strict=True):
        assert (g is not None) == need
    assert_matches(got, want)


def test_matches_torch_autograd_and_no_grad():
    """Against PyTorch's own F.cross_entropy(F.linear(...)) and autograd; no_grad gives the loss."""
    hidden, weight, bias, target = make_case((4, 6), num_classes=101, seed=8)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    want = F.cross_entropy(F.linear(*leaves).flatten(0, 1), target.flatten(), label_smoothing=0.1)
    want.backward()
    got = ours(hidden, weight, bias, target, label_smoothing=0.1, chunk_size=5)
    assert_matches(got, (want.detach(), *(x.grad for x in leaves)))
    for grad_mode in (torch.no_grad, torch.inference_mode):
        for walk in ({"chunk_size": 5}, {"vocab_block": 50}, {"backend": "auto"}):
            with grad_mode():
                loss = fastxent.linear_cross_entropy(
                    *leaves[:2], target, leaves[2], label_smoothing=0.1, **walk
                )
            assert not loss.requires_grad
            torch.testing.assert_close(loss, want.detach(), **F64)


def test_gradcheck_none_reduction():
    """torch.autograd.gradcheck (float64) through the recomputing "none" path, all options on."""
    hidden, weight, bias, target = make_case((2, 3), dim=3, num_classes=7, seed=9)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]

    def fn(h, w, b):
        return fastxent.linear_cross_entropy(
            h, w, target, b, reduction="none", z_loss=1e-2, softcap=2.0, logit_scale=1.3,
            label_smoothing=0.1, shift=True, chunk_size=2, backend=BACKEND,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, leaves)


def test_non_contiguous_inputs():
    """Hidden as a transposed (T, B, D) view and a transposed weight give the same result."""
    hidden, weight, bias, target = make_case((3, 5), num_classes=29, seed=10)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # (3, 5, D), not contiguous
    weight_t = weight.t().contiguous().t()
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous()
    got = ours(hidden_t, weight_t, bias, target, shift=True, chunk_size=4)
    assert_matches(got, oracle(hidden, weight, bias, target, shift=True))


@pytest.mark.parametrize("walk", [{"chunk_size": 2}, {"vocab_block": 5}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backward_twice_through_a_retained_graph(walk, dtype):
    """retain_graph: each backward gives the gradients for its own grad_output, as PyTorch's
    (the first one folds grad_output into the buffers, later ones scale new tensors)."""
    hidden, weight, bias, target = make_case((5,), num_classes=11, dtype=dtype)
    h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss = fastxent.linear_cross_entropy(h, w, target, b, backend=BACKEND, **walk)
    zero = torch.autograd.grad(loss, (h, w, b), torch.tensor(0.0), retain_graph=True)
    assert not any(g.any() for g in zero)  # and, not folded in, it leaves the next ones right
    first = torch.autograd.grad(loss, (h, w, b), torch.tensor(1.5), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b), torch.tensor(-3.0), retain_graph=True)
    want = oracle(hidden, weight, bias, target)[1:]
    tol = F64 if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-3}
    for got_1, got_2, w_ in zip(first, second, want, strict=True):
        assert got_1.dtype == got_2.dtype == dtype
        torch.testing.assert_close(got_1.double(), 1.5 * w_, **tol)
        torch.testing.assert_close(got_2.double(), -3.0 * w_, **tol)
    loss.backward()  # the last one may free the graph; after it, PyTorch's own error
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("walk", WALKS, ids=["tokens", "vocab"])
def test_checkpointed_backward_again_scales_the_recomputed_gradients(walk):
    """Activation checkpointing recomputes the walk at each unpack: each backward scales its own
    fresh gradients by its grad_output (not by a ratio to an earlier backward's)."""
    hidden, weight, bias, target = make_case((6,), num_classes=11)
    h = hidden.clone().requires_grad_()

    def loss_fn(x):
        return fastxent.linear_cross_entropy(x, weight, target, bias, backend=BACKEND, **walk)

    loss = torch.utils.checkpoint.checkpoint(loss_fn, h, use_reentrant=False)
    want = oracle(hidden, weight, bias, target)[1]
    for factor in (2.0, 1.0, 3.0):
        (got,) = torch.autograd.grad(factor * loss, h, retain_graph=True)
        torch.testing.assert_close(got, factor * want, **F64)
    with pytest.raises(RuntimeError, match="not differentiable again"):
        torch.autograd.grad(loss_fn(h), h, create_graph=True)


@folds_in_place
def test_backward_after_weight_grad_was_accumulated_into_raises():
    """float32 ∂W is handed to autograd as the buffer itself: once .grad is added to, a
    retained graph refuses to back-propagate rather than return a modified gradient."""
    hidden, weight, _, target = make_case((5,), num_classes=11, bias=False)
    w = weight.clone().requires_grad_()
    loss = fastxent.linear_cross_entropy(hidden, w, target, backend=BACKEND, chunk_size=2)
    loss.backward(retain_graph=True)
    w.grad.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place after forward"):
        loss.backward()


@pytest.mark.parametrize(
    "walk", [{"chunk_size": 9}, {"vocab_block": 100}, FUSED_OPS], ids=["tokens", "vocab", "fused"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_within_baseline_error(dtype, reduction, walk):
    """Our error against float64 is at most PyTorch's own (F.linear + F.cross_entropy in the same
    dtype) plus a tolerance: err <= ref_err + tol, per output, relative to the output's max. The
    vocab walk writes ∂W in the weight's dtype from one matmul over all tokens (no float32 copy)."""
    hidden, weight, bias, target = make_case((4, 16), dim=32, num_classes=523, seed=11, dtype=dtype)
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    go = torch.rand(4, 16, dtype=torch.float64) + 0.5 if reduction == "none" else None
    want = oracle(hidden, weight, bias, target, grad_output=go, **kwargs)
    got = ours(hidden, weight, bias, target, grad_output=None if go is None else go.to(dtype),
               **walk, **kwargs)  # fmt: skip
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    base = F.cross_entropy(F.linear(*leaves).flatten(0, 1), target.flatten(), **kwargs)
    base.backward(torch.ones_like(base) if go is None else go.to(dtype).flatten())
    baseline = (base.detach().reshape(want[0].shape), *(x.grad for x in leaves))
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    for name, g in zip(("loss", "dh", "dW", "db"), got, strict=True):
        assert g.dtype == (torch.float32 if name == "loss" else dtype), name
    assert_within_baseline(got, baseline, want, tol)


@pytest.mark.parametrize("vocab_block", [1, 7, 423, 10_000])
@pytest.mark.parametrize(("tokens", "num_classes"), [((1,), 423), ((9,), 1), ((3, 4), 37)])
def test_vocab_walk_shapes_shift_and_partial_grads(tokens, num_classes, vocab_block):
    """(N, D) and (B, T, D), V = 1, one block or many, shift, and only some inputs needing grad."""
    hidden, weight, b, target = make_case(tokens, num_classes=num_classes, seed=3)
    for kwargs in ({"label_smoothing": 0.1}, {"shift": True, "z_loss": 1e-3}):
        got = ours(hidden, weight, b, target, vocab_block=vocab_block, **kwargs)
        assert_matches(got, oracle(hidden, weight, b, target, **kwargs))
    got = ours(hidden, weight, b, target, vocab_block=vocab_block, needs=(False, True, False))
    assert got[1] is None and got[3] is None
    assert_matches(got, oracle(hidden, weight, b, target))


def test_vocab_walk_all_ignored_gives_zero_loss_and_gradient():
    hidden, weight, bias, target = make_case((2, 3), num_classes=30, seed=5)
    target.fill_(-100)
    loss, dh, dw, db = ours(hidden, weight, bias, target, vocab_block=8)
    assert float(loss) == 0.0
    assert not dh.any() and not dw.any() and not db.any()


def walk_peak_bytes(n, dim, num_classes, dtype, **walk) -> int:
    """Peak bytes allocated by one warm forward + backward of linear_cross_entropy(**walk) on
    random (n, dim) hidden states and a (num_classes, dim) weight in ``dtype``, with the
    gradients allocated by the measured step (nothing kept from the warm-up counts as live)."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(n, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(num_classes, dim, generator=gen) / dim**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, num_classes, (n,), generator=gen)

    def step():
        fastxent.linear_cross_entropy(hidden, weight, target, **walk).backward()

    step()
    hidden.grad = weight.grad = None
    fastxent.empty_cache()  # ∂W must be allocated by the step, to be counted
    return allocated_peak_bytes(step)


@folds_in_place
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vocab_walk_holds_one_block_beside_the_gradients(dtype):
    # What vocab_block is for: beside ∂h and ∂W, one (N, B) block of float32 logits at a time
    # (for half precision with its product and gradient in the inputs' dtype, and ∂h's float32
    # accumulator), and the workspace of a block's matmul (about half a block here). A second
    # block held while the next is made adds 4 bytes per block entry, more than that slack.
    n, dim, num_classes, block = 256, 128, 4096, 512
    peak = walk_peak_bytes(n, dim, num_classes, dtype, vocab_block=block)
    size = torch.tensor([], dtype=dtype).element_size()
    grads = (n + num_classes) * dim * size
    accumulator = n * dim * 4 if dtype == torch.bfloat16 else 0
    one_block = n * block * (4 if dtype == torch.float32 else 4 + 2 * size)
    workspace = n * block * 2
    assert grads <= peak <= grads + accumulator + one_block + workspace, peak


@folds_in_place
def test_token_walk_half_precision_casts_dw_without_a_float32_copy():
    # bf16 ∂W is accumulated in float32 and cast in backward. On CPU a mixed-dtype
    # torch.mul(out=) computes in a float32 temporary of ∂W's size first: backward then held
    # the accumulator, that temporary and the bf16 result at once (4 + 4 + 2 bytes per entry).
    n, dim, num_classes, chunk = 256, 32, 32768, 64
    peak = walk_peak_bytes(n, dim, num_classes, torch.bfloat16, chunk_size=chunk)
    entries = num_classes * dim
    logits = chunk * num_classes * 2  # the chunk's bf16 logits, kept for the next step
    cast = entries * (4 + 2) + logits  # backward: the float32 accumulator and its bf16 cast
    # forward: the accumulator beside a product's own workspace (a BLAS's, on some machines)
    blas = product_workspace_bytes(chunk, dim, num_classes, torch.bfloat16)
    products = entries * 4 + logits + blas
    slack = entries  # a quarter of the temporary
    assert peak <= max(cast, products) + slack, (peak, cast, products)


def product_workspace_bytes(rows: int, dim: int, num_classes: int, dtype: torch.dtype) -> int:
    """The most that one of a chunk's products (logits ``h Wᵀ``, ``∂h = g W``, a block of
    ``∂W = gᵀ h``) allocates for itself, beside its output, on this machine: none on the AMD
    EPYC machines; on an Intel Xeon with AMX at 2 threads, for bf16, 2 MiB for the logits and a
    reordered copy of ``g`` (4 MiB) for ``∂h`` at the shapes below."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, dim, generator=gen).to(dtype)
    w = torch.randn(num_classes, dim, generator=gen).to(dtype)
    g = torch.randn(rows, num_classes, generator=gen).to(dtype)
    products = (
        lambda: torch.mm(h, w.t(), out=g),
        lambda: torch.mm(g, w, out=h),
        lambda: torch.mm(g.t(), h, out=w),
    )
    for product in products:
        product()  # warm
    return max(allocated_peak_bytes(product) for product in products)


def peaked_case(tokens=64, dim=64, num_classes=2048, sharpness=40.0, seed=12):
    """Hidden states correlated with their target's weight row: a peaked (trained-like) softmax."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) / dim**0.5
    target = torch.randint(0, num_classes, (tokens,), generator=g)
    hidden = sharpness * weight[target] + 0.1 * torch.randn(tokens, dim, generator=g).double()
    return hidden, weight, target


def test_filter_eps_zero_is_exact_and_eps_error_is_bounded():
    """filter_eps skips only vocab blocks with |g| < eps in every row: ∂W differs from the exact
    gradient by at most eps·Σ_r |h_r| per entry, ∂h by eps·Σ_j |W_j|; the loss stays exact."""
    hidden, weight, target = peaked_case()
    exact = oracle(hidden, weight, None, target)
    assert_matches(ours(hidden, weight, None, target, filter_eps=0.0, chunk_size=16), exact)
    eps = 1e-7
    _, dz = reference.cross_entropy(F.linear(hidden, weight).numpy(), target.numpy())  # (N, V)
    cols = _kept_columns(torch.from_numpy(dz[:16]), eps)  # the first chunk's kept vocab
    assert cols is not None and 0 < cols.numel() < 2048, "nothing or everything skipped: vacuous"
    got = ours(hidden, weight, None, target, filter_eps=eps, chunk_size=16)
    torch.testing.assert_close(got[0], exact[0], **F64)
    dw_bound = eps * hidden.abs().sum(0) + 1e-12  # (D,), broadcast over V
    assert ((got[2] - exact[2]).abs() <= dw_bound).all()
    dh_bound = eps * weight.abs().sum(0) + 1e-12
    assert ((got[1] - exact[1]).abs() <= dh_bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vocab_walk_first_block_far_below_the_rest(dtype):
    """A row whose first vocab block lies 1000 below the rest: the running sum starts at the
    first finite max, e^{0 - m} is not formed (it overflowed to inf, and 0·inf made the loss
    NaN for any block max below -88 in float32)."""
    hidden = torch.tensor([[1.0], [2.0]], dtype=dtype)
    weight = torch.tensor([[-1000.0], [-999.0], [0.5], [0.0]], dtype=dtype)
    target = torch.tensor([2, 0])
    want = oracle(hidden, weight, None, target)
    got = ours(hidden, weight, None, target, vocab_block=2)
    tol = F64 if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    assert_matches(got, want, **tol)


@pytest.mark.parametrize("walk", [{"vocab_block": 50}, {"chunk_size": 5}], ids=["vocab", "tokens"])
@pytest.mark.parametrize("soft", [False, True])
def test_float32_logits_with_a_large_common_offset(walk, soft):
    """Logits 1000 + z (through the bias) lose nothing to cancellation: the errors against
    float64 stay within 2x eager PyTorch's own float32 errors (lse·Σt - Σ t z' was 20x off)."""
    hidden, weight, bias, target = make_case((13,), soft=soft, seed=3)
    h, w, b = hidden.float(), weight.float(), (bias + 1000.0).float()
    t = target.float() if soft else target
    options = {"reduction": "none", "label_smoothing": 0.1}
    want = oracle(h, w, b, target, **options)
    got = ours(h, w, b, t, **options, **walk)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    eager = F.cross_entropy(F.linear(*leaves), t, **options)
    eager.backward(torch.ones_like(eager))
    baseline = (eager.detach(), *(x.grad for x in leaves))
    for g, e, x in zip(got, baseline, want, strict=True):
        our_err, eager_err = ((y.double() - x).abs().max().item() for y in (g, e))
        assert our_err <= 2 * eager_err + 1e-6 * max(1.0, x.abs().max().item())


@pytest.mark.parametrize("filter_eps", [0.0, 1e-3])
def test_filter_eps_lets_a_nan_through(filter_eps):
    """A NaN hidden state makes ∂W NaN (as in PyTorch) and leaves the other rows' ∂h exact:
    its vocab blocks are kept, where "max |g| >= eps" was False for NaN and skipped them all."""
    hidden, weight, bias, target = make_case((13,), seed=4)
    target[2] = 1  # every row counted: the NaN row's gradient reaches ∂W
    hidden[5, 0] = float("nan")
    got = ours(hidden, weight, bias, target, filter_eps=filter_eps, chunk_size=16)
    want = ours(hidden, weight, bias, target, chunk_size=16)
    assert torch.isnan(got[0]) and torch.isnan(got[2]).any() and torch.isnan(want[2]).any()
    finite = torch.ones(13, dtype=torch.bool)
    finite[5] = False
    clean = oracle(hidden[finite], weight, bias, target[finite], reduction="sum")
    torch.testing.assert_close(got[1][finite] * 13, clean[1], **F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("walk", [{"chunk_size": 4}, {"vocab_block": 4}], ids=str)
def test_a_nan_in_an_ignored_tokens_hidden_state_reaches_no_gradient(walk, reduction):
    """The walks drop ignored tokens before the matmul (README): a NaN hidden state there
    leaves every gradient that of the other tokens, where PyTorch's 0·NaN makes ∂W NaN."""
    hidden, weight, bias, target = make_case((13,), seed=4)
    target[5] = -100
    hidden[5, 0] = float("nan")
    got = ours(hidden, weight, bias, target, reduction=reduction, **walk)
    kept = torch.ones(13, dtype=torch.bool)
    kept[5] = False
    want = oracle(hidden[kept], weight, bias, target[kept], reduction="sum")
    counted = int((target != -100).sum())
    scale = 1 / counted if reduction == "mean" else 1.0
    loss, dh, dw, db = got
    assert torch.isfinite(dw).all() and torch.isfinite(db).all() and torch.isfinite(dh).all()
    assert (dh[5] == 0).all()
    torch.testing.assert_close(loss.sum().double(), want[0] * scale, **F64)
    for g, w in ((dh[kept], want[1]), (dw, want[2]), (db, want[3])):
        torch.testing.assert_close(g.double(), w * scale, **F64)


@pytest.mark.parametrize(
    "walk", [{}, {"chunk_size": 3}, {"vocab_block": 4}, {"filter_eps": 0.0}, {"backend": "auto"}]
)
def test_zero_hidden_features_give_the_bias_as_logits(walk):
    """D = 0: the logits are the bias alone (PyTorch's result), whichever walk is asked for."""
    hidden, weight, bias, target = make_case((6,), dim=0, num_classes=9)
    walk = {"backend": BACKEND, **walk}
    assert_matches(ours(hidden, weight, bias, target, **walk), oracle(hidden, weight, bias, target))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("walk", [{"chunk_size": 2}, {"vocab_block": 4}, FUSED_OPS])
def test_narrow_integer_targets(dtype, walk):
    """int32/int16/uint8 class indices act as int64 ones, also with an ignore_index beyond
    their range: in int32, 2**40 wrapped to 0 and class-0 targets were silently ignored."""
    hidden, weight, bias, _ = make_case((6,), num_classes=9)
    target = torch.tensor([0, 3, 0, 8, 1, 0])
    for ignore_index in (-100, 2**40):
        want = ours(hidden, weight, bias, target, ignore_index=ignore_index, **walk)
        got = ours(hidden, weight, bias, target.to(dtype), ignore_index=ignore_index, **walk)
        assert_matches(got, want)
    assert_matches(want, oracle(hidden, weight, bias, target))


def test_module_form():
    """LinearCrossEntropyLoss holds the options and equals the functional form."""
    hidden, weight, bias, target = make_case((2, 6), num_classes=45, seed=13)
    cw = torch.rand(45, dtype=torch.float64) + 0.1
    module = fastxent.LinearCrossEntropyLoss(
        class_weight=cw, label_smoothing=0.1, z_loss=1e-3, shift=True, chunk_size=3, backend=BACKEND
    )
    assert "shift=True" in repr(module)
    h = hidden.clone().requires_grad_()
    loss = module(h, weight, target, bias)
    loss.backward()
    want = oracle(hidden, weight, bias, target, class_weight=cw, label_smoothing=0.1,
                  z_loss=1e-3, shift=True)  # fmt: skip
    torch.testing.assert_close(loss.detach(), want[0], **F64)
    torch.testing.assert_close(h.grad, want[1], **F64)
    vocab = fastxent.LinearCrossEntropyLoss(label_smoothing=0.1, vocab_block=7, backend=BACKEND)
    assert "vocab_block=7" in repr(vocab)
    h.grad = None
    vocab(h, weight, target, bias).backward()
    want = oracle(hidden, weight, bias, target, label_smoothing=0.1)
    torch.testing.assert_close(h.grad, want[1], **F64)


def test_default_chunk_size_follows_the_budget():
    """chunk_size=None: one chunk of logits within max(CHUNK_BYTES, half of ∂W's accumulator)."""
    # The CPU goal case: 64 MB and half of the float32 ∂W (128 MiB) agree on 256 rows.
    assert default_chunk_size(65536, 512, torch.float32) * 65536 * 4 == CHUNK_BYTES
    assert default_chunk_size(65536, 512, torch.float32) == 256
    # Small D: the byte budget decides, and bf16 logits fit twice the rows.
    assert default_chunk_size(65536, 64, torch.bfloat16) == 2 * CHUNK_BYTES // (65536 * 4)
    assert default_chunk_size(10**9, 1, torch.float32) == 1
    # Large V (Gemma-2-2B, bf16, float32 ∂W): 64 MB would be 131 rows, ∂W allows D = 2304.
    rows = default_chunk_size(256000, 2304, torch.bfloat16)
    assert rows == 2304
    assert rows * 256000 * 2 == 256000 * 2304 * 4 // 2  # logits = half the float32 ∂W


@pytest.mark.parametrize(
    ("num_tokens", "rows"),
    [(8192, 2048), (8191, 2048), (4608, 2304), (2305, 1216), (1000, 1024), (100, 128)],
)
def test_default_chunk_size_splits_the_tokens_evenly(num_tokens, rows):
    """Given the token count, as many chunks as the 2304-row limit needs, of even size (rounded up
    to 64 rows while that stays within the limit)."""
    chunk = default_chunk_size(256000, 2304, torch.bfloat16, num_tokens)
    assert chunk == rows
    assert -(-num_tokens // chunk) == -(-num_tokens // 2304)  # no more chunks than the limit's


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("walk", [{}, {"chunk_size": 3}])
def test_probability_targets_and_class_weights_get_pytorchs_gradients(reduction, shift, walk):
    """As cross_entropy: a target or class weight that requires grad is differentiated on
    PyTorch's ops (the logits materialised, walk options set aside), to 1e-12 of PyTorch."""
    hidden, weight, bias, target = make_case((2, 5), num_classes=30, soft=True, seed=21)
    class_weight = torch.rand(30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def leaves():
        return [x.detach().clone().requires_grad_() for x in (hidden, weight, bias, target)]

    (h, w, b, y), theirs = leaves(), leaves()
    cw, their_cw = (class_weight.clone().requires_grad_() for _ in range(2))
    loss = fastxent.linear_cross_entropy(
        h, w, y, b, class_weight=cw, reduction=reduction, label_smoothing=0.1, shift=shift,
        backend=BACKEND, **walk,
    )  # fmt: skip
    th, tw, tb, ty = theirs
    if shift:
        th, ty = th[:, :-1], ty[:, 1:]
    want = F.cross_entropy(
        F.linear(th, tw, tb).flatten(0, 1), ty.flatten(0, 1), their_cw, reduction=reduction,
        label_smoothing=0.1,
    ).reshape(loss.shape)  # fmt: skip
    grad_output = torch.rand(want.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_output)
    want.backward(grad_output)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-13)
    for got, expected in zip([h, w, b, y, cw], [*theirs, their_cw], strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-12, atol=1e-13)


def _call(**overrides):
    hidden, weight, bias, target = make_case((2, 4), num_classes=20, seed=14)
    args = {"hidden": hidden, "weight": weight, "target": target, "bias": bias}
    args |= {"backend": BACKEND, **overrides}
    return fastxent.linear_cross_entropy(
        args.pop("hidden"), args.pop("weight"), args.pop("target"), args.pop("bias"), **args
    )


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"hidden": torch.ones(2, 4, 8, dtype=torch.long)}, TypeError, "hidden must be a floating"),
        ({"hidden": [1.0]}, TypeError, "hidden must be a torch.Tensor"),
        ({"hidden": torch.randn(8, dtype=torch.float64)}, ValueError, r"shape \(N, D\)"),
        ({"weight": torch.randn(20, 7, dtype=torch.float64)}, ValueError, "D = 8"),
        (
            {"weight": torch.randn(20, 8)},
            TypeError,
            r"weight must have hidden's dtype.*to\(hidden\)",
        ),
        (
            {"hidden": torch.randn(2, 4, 8).half(), "weight": torch.randn(20, 8)},
            TypeError,
            "call it under torch.autocast",
        ),
        ({"weight": torch.randn(0, 8, dtype=torch.float64)}, ValueError, r"no classes \(V = 0\)"),
        (
            {"weight": torch.ones(20, dtype=torch.float64)},
            ValueError,
            r"got shape \(20,\); weight is the \(V, D\) .* class_weight=",
        ),
        (
            {"weight": torch.randn(20, 8, dtype=torch.float64, device="meta")},
            ValueError,
            r"weight is on meta but hidden is on cpu; .*weight.to\(hidden.device\)",
        ),
        (
            {"bias": torch.randn(20, dtype=torch.float64, device="meta")},
            ValueError,
            "bias is on meta but hidden is on cpu",
        ),
        (
            {"bias": torch.randn(19, dtype=torch.float64)},
            ValueError,
            r"bias must have shape \(20,\)",
        ),
        ({"bias": torch.randn(20)}, TypeError, "bias must have hidden's dtype"),
        (
            {"target": torch.zeros(2, 5, dtype=torch.long)},
            ValueError,
            r"shape \(2, 4\) \(one per token",
        ),
        (
            {"target": torch.zeros(8, dtype=torch.long)},
            ValueError,
            r"shape \(2, 4\) \(one per token",
        ),
        ({"target": torch.full((2, 4), 20)}, IndexError, "out of range"),
        ({"target": torch.full((2, 4), -3)}, IndexError, "out of range"),
        ({"target": torch.rand(2, 4, 19, dtype=torch.float64)}, ValueError, r"\(2, 4, 20\)"),
        ({"target": torch.zeros(2, 4, dtype=torch.bool)}, TypeError, "class indices"),
        ({"target": torch.zeros(2, 4, 20, dtype=torch.long)}, ValueError, r"target\.float\(\)"),
        ({"class_weight": torch.ones(19, dtype=torch.float64)}, ValueError, "class_weight must"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be None or an int"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size must be None or an int >= 1, got float"),
        ({"chunk_size": True}, TypeError, "chunk_size must be None or an int >= 1, got bool"),
        ({"filter_eps": -1e-3}, ValueError, "filter_eps must be None"),
        ({"filter_eps": "1e-3"}, TypeError, "filter_eps must be a number or None .* str"),
        ({"filter_eps": True}, TypeError, "filter_eps must be a number or None .* bool"),
        ({"z_loss": None}, TypeError, "z_loss must be a number, got NoneType"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a number, got str"),
        ({"shift": "yes"}, TypeError, "shift must be True or False, got str 'yes'"),
        ({"shift": 1}, TypeError, "shift must be True or False, got int 1"),
        ({"vocab_block": 0}, ValueError, "vocab_block must be None or an int"),
        ({"vocab_block": 4, "chunk_size": 2}, ValueError, "cannot be combined with chunk_size"),
        ({"vocab_block": 4, "filter_eps": 0.0}, ValueError, "cannot be combined"),
        ({"backend": "cuda-magic"}, ValueError, "unknown backend"),
    ],
)
def test_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_integer_like_chunk_sizes_are_taken():
    """NumPy's integers and 0-dim integer tensors are ints to Python (operator.index)."""
    want = _call(chunk_size=3)
    for chunk_size in (np.int64(3), torch.tensor(3)):
        torch.testing.assert_close(_call(chunk_size=chunk_size), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"chunk_size": 0}, ValueError, "chunk_size must be None or an int >= 1"),
        ({"vocab_block": 4, "chunk_size": 2}, ValueError, "cannot be combined"),
        ({"shift": None}, TypeError, "shift must be True or False"),
        ({"z_loss": "1e-4"}, TypeError, "z_loss must be a number"),
        ({"backend": "nope"}, ValueError, "unknown backend 'nope'"),
        ({"weight": torch.ones(20)}, TypeError, r"weight in forward.*class weights go in class_w"),
    ],
)
def test_the_module_checks_its_options_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastxent.LinearCrossEntropyLoss(**kwargs)


def test_shift_errors_count_the_shifted_targets():
    """With shift the shapes still match the tokens; a bad target after the shift is reported."""
    target = torch.randint(0, 20, (2, 4))
    target[1, 2] = 99
    with pytest.raises(IndexError, match=r"target\[1, 2\] = 99 is out of range"):
        _call(target=target, shift=True)  # the position in the caller's target
    target[1, 2], target[0, 0] = 3, 99  # position 0 is never a target with shift: no error
    _call(target=target, shift=True)
    with pytest.raises(ValueError, match=r"shift=True uses target\[\.\.\., 1:\]"):
        _call(target=torch.zeros(2, 3, dtype=torch.long), shift=True)
    with pytest.raises(ValueError, match="ignore_index is only supported"):
        _call(target=torch.rand(2, 4, 20, dtype=torch.float64), ignore_index=0)


def test_hidden_and_weight_swapped_is_named():
    """With the projection passed as hidden (and hidden as weight) the target count matches the
    projection's rows: the error says so; a target of another count gets no such guess."""
    hidden, weight = torch.randn(6, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match="are hidden and weight swapped"):
        fastxent.linear_cross_entropy(weight, hidden, torch.randint(0, 50, (6,)))
    with pytest.raises(ValueError, match=r"got \(7,\)\.$") as error:
        fastxent.linear_cross_entropy(hidden, weight, torch.randint(0, 50, (7,)))
    assert "swapped" not in str(error.value)


def test_auto_takes_the_fused_ops_path_for_small_cpu_calls(monkeypatch, shapes_passed_to):
    """ "auto" computes small CPU calls without a chosen walk from the materialised logits; an
    explicit backend, chunk_size, filter_eps or vocab_block, or more logits, take the walks."""
    from fastxent import functional

    calls = shapes_passed_to(functional.composed, "linear_cross_entropy")
    hidden, weight, bias, target = make_case((2, 5), num_classes=30, seed=11)
    fastxent.linear_cross_entropy(hidden, weight, target, bias)
    fastxent.LinearCrossEntropyLoss(shift=True)(hidden, weight, target, bias)
    assert calls == [(2, 5, 8)] * 2
    for walk in ({"backend": "torch"}, {"chunk_size": 4}, {"filter_eps": 0.0}, {"vocab_block": 8}):
        fastxent.linear_cross_entropy(hidden, weight, target, bias, **walk)
    monkeypatch.setattr(functional, "AUTO_COMPOSED_MAX_LOGITS", 2 * 5 * 30 - 1)
    monkeypatch.setattr(functional, "AUTO_PORTABLE_MAX_LOGITS", 2 * 5 * 30)  # nothing to compile
    fastxent.linear_cross_entropy(hidden, weight, target, bias)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "walk", [{}, {"chunk_size": 1}, {"vocab_block": 2}, {"filter_eps": 1e-9}], ids=str
)
def test_an_infinite_class_weight_gives_pytorchs_inf(walk):
    """Row 0's target is its row's maximum and has weight inf: PyTorch's loss is inf (the
    vocabulary walk's (lse - r)Σt - w_y(z'_y - r) made it inf·0 = NaN). W = I, so z = h."""
    hidden = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    weight, target = torch.eye(3, dtype=torch.float64), torch.tensor([0, 1])
    class_weight = torch.tensor([torch.inf, 1.0, 1.0], dtype=torch.float64)
    for reduction in ("none", "sum"):
        got = fastxent.linear_cross_entropy(
            hidden, weight, target, class_weight=class_weight, reduction=reduction, **walk
        )
        want = F.cross_entropy(hidden, target, class_weight, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_a_sharded_weight_is_named_where_torch_keeps_dtensor_elsewhere(monkeypatch):
    """torch 2.4 defines DTensor in torch.distributed._tensor, and its torch.distributed.tensor
    (loaded by torch.distributed.fsdp) has none: every linear_cross_entropy call then raised
    AttributeError. Stand-ins for both modules, as torch 2.4 has them."""
    import sys
    import types

    class DTensor(torch.Tensor):
        pass

    hidden, weight, bias, target = make_case((2, 4), num_classes=20, seed=15)
    want = oracle(hidden, weight, bias, target)[0]
    old_home = types.ModuleType("torch.distributed._tensor")
    old_home.DTensor = DTensor
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.ModuleType("empty"))
    monkeypatch.setitem(sys.modules, "torch.distributed._tensor", old_home)
    plain = fastxent.linear_cross_entropy(hidden, weight, target, bias)  # no AttributeError
    with pytest.raises(TypeError, match="weight is a DTensor but hidden, bias are not"):
        fastxent.linear_cross_entropy(hidden, weight.as_subclass(DTensor), target, bias)
    monkeypatch.undo()  # assert_close itself imports DTensor from torch.distributed.tensor
    torch.testing.assert_close(plain, want, **F64)
