"""The Triton backend against the float64 reference.

Without a GPU the kernels run through Triton's interpreter on small CPU tensors. Triton decides
when a function is *decorated* whether it is interpreted (its own ``tl.zeros``, ``tl.sum``, ...
included), so this module sets ``TRITON_INTERPRET=1`` while it imports triton and the kernels,
and only when triton is not imported yet and there is no CUDA (GPU tests keep compiled kernels).
Otherwise the interpreter tests run in a child process started with the variable set
(``test_interpreter_checks_in_a_subprocess``), so they run whatever the import order.

Tests marked ``gpu`` run the compiled kernels at realistic sizes, N×V > 2^31 included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # The interpreter must be on while triton (whose own tl.zeros, tl.sum, ... are jit
    # functions) and the kernels are imported; afterwards the variable is put back.
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        import fastxent._triton.kernels
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
triton = pytest.importorskip("triton")

import fastxent  # noqa: E402
import fastxent._triton as triton_backend  # noqa: E402
from fastxent import reference  # noqa: E402
from fastxent._options import CrossEntropyOptions  # noqa: E402
from fastxent._triton import kernels  # noqa: E402
from versions import graph_break_has_a_reason, tested_triton  # noqa: E402

pytestmark = tested_triton

INTERPRETED = all(
    type(fn).__name__ == "InterpretedFunction"
    for fn in (kernels.cross_entropy_rows_kernel, triton.language.zeros)
)
interpreter = pytest.mark.skipif(
    not INTERPRETED,
    reason="kernels were compiled before TRITON_INTERPRET=1; the subprocess test runs these",
)
compiled = pytest.mark.skipif(INTERPRETED, reason="the kernels were decorated for the interpreter")
V_ODD = 423  # not a multiple of any tile


def test_constexpr_parameters_are_annotated_with_the_object():
    """Triton 3.0's interpreter takes a parameter as a compile-time constant only when its
    annotation is tl.constexpr itself: a string annotation (``from __future__ import
    annotations`` in kernels.py) made every interpreted call fail on tl.arange."""
    import inspect

    for kernel in (kernels.cross_entropy_rows_kernel, kernels.scale_unless_one_kernel):
        parameters = inspect.signature(kernel.fn).parameters.values()
        annotations = [p.annotation for p in parameters if p.annotation is not p.empty]
        assert annotations and all(a is triton.language.constexpr for a in annotations)


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    """CPU calls need TRITON_INTERPRET=1 at call time too (the backend's availability check)."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 128 columns, so V = 423 takes three full tiles and a partial one."""
    monkeypatch.setattr(triton_backend, "MAX_BLOCK", 128)


def oracle(z, target, weight=None, grad_output=None, **kw):
    """Loss and gradient of fastxent.reference in float64, as torch tensors."""
    loss, grad = reference.cross_entropy(
        z.detach().double().numpy(),
        target.double().numpy() if target.is_floating_point() else target.numpy(),
        None if weight is None else weight.double().numpy(),
        grad_output=None if grad_output is None else grad_output.double().numpy(),
        **kw,
    )
    return torch.as_tensor(loss), torch.as_tensor(grad)


def run(z, target, weight=None, grad_output=None, backend="triton", **kw):
    """Loss and z.grad of fastxent.cross_entropy on a leaf copy of z."""
    x = z.detach().clone().requires_grad_()
    loss = fastxent.cross_entropy(x, target, weight, backend=backend, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), x.grad


def assert_fp32_close(got, want, rtol=1e-5):
    """float32 arithmetic against float64: error within rtol of the largest magnitude."""
    got, want = got.double(), want.double()
    tol = rtol * max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


def make_case(n, v, soft, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 4).to(dtype)
    if soft:
        target = torch.rand(n, v, generator=g)  # rows need not sum to one
    else:
        target = torch.randint(0, v, (n,), generator=g)
        if n > 2:
            target[1] = -100
    weight = torch.rand(v, generator=g) + 0.5
    return z, target, weight


EXTRAS = [
    {},
    {"label_smoothing": 0.15},
    {"z_loss": 1e-2},
    {"softcap": 6.0, "logit_scale": 0.8},
    {"logit_scale": 1.7, "z_loss": 3e-3, "label_smoothing": 0.05},
]


@interpreter
@pytest.mark.parametrize("extras", EXTRAS, ids=lambda e: "-".join(e) or "plain")
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_matches_reference(soft, reduction, weighted, extras, small_tiles):
    """Loss and gradient equal the float64 reference to float32 accuracy, over several tiles."""
    z, target, weight = make_case(5, V_ODD, soft)
    weight = weight if weighted else None
    grad_output = torch.rand(5) + 0.5 if reduction == "none" else torch.tensor(0.7)
    kw = dict(reduction=reduction, **extras)
    loss, grad = run(z, target, weight, grad_output, **kw)
    want_loss, want_grad = oracle(z, target, weight, grad_output, **kw)
    assert_fp32_close(loss, want_loss)
    assert_fp32_close(grad, want_grad)


@interpreter
@pytest.mark.parametrize("num_classes", [1, 7, V_ODD])
@pytest.mark.parametrize("num_rows", [1, 3])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_odd_shapes(num_rows, num_classes, soft):
    """V = 1, 7, 423 with the default tiles (one partial tile), N = 1."""
    z, target, weight = make_case(num_rows, num_classes, soft, seed=num_classes)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    loss, grad = run(z, target, weight, **kw)
    want_loss, want_grad = oracle(z, target, weight, **kw)
    assert_fp32_close(loss, want_loss)
    assert_fp32_close(grad, want_grad)


@interpreter
def test_ignore_index_may_be_a_valid_class():
    z, _, weight = make_case(6, 9, soft=False)
    target = torch.tensor([3, 0, 3, 8, 3, 1])
    kw = dict(ignore_index=3, label_smoothing=0.2, z_loss=1e-2, reduction="mean")
    loss, grad = run(z, target, weight, **kw)
    want_loss, want_grad = oracle(z, target, weight, **kw)
    assert_fp32_close(loss, want_loss)
    assert_fp32_close(grad, want_grad)
    assert not grad[[0, 2, 4]].any()


@interpreter
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_non_finite_logits_like_the_portable_kernel(z_loss):
    """-inf on a class, +inf, NaN, an all -inf row and an ignored row masked at class 0: the
    same loss and gradient rows (finite or not) as the portable kernel, which follows PyTorch.
    The oracle is PyTorch's autograd in float64 (F.cross_entropy, plus the z-loss composed by
    check.torch_composed): NaN and finite entries where it has them, the finite ones to float32
    accuracy. The portable kernel as oracle could not see an error both backends share."""
    from fastxent.check import torch_composed

    z = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    z[0, 4] = float("-inf")
    z[1, 5] = float("inf")
    z[2, 2] = float("nan")
    z[3, :] = float("-inf")
    z[4, 0] = float("-inf")
    target = torch.tensor([1, 2, 3, 4, -100, 5])
    got = run(z, target, reduction="none", z_loss=z_loss)
    x = z.double().requires_grad_()
    want_loss = torch_composed(x, target, reduction="none", z_loss=z_loss)
    want_loss.backward(torch.ones_like(want_loss))
    for ours, theirs in zip(got, (want_loss.detach(), x.grad), strict=True):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(ours), finite)
        assert_fp32_close(ours[finite], theirs[finite])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_ignored_gives_zero_loss_and_gradient(reduction):
    z = torch.randn(4, 7)
    loss, grad = run(z, torch.full((4,), -100), reduction=reduction, z_loss=1e-2)
    assert not loss.any() and not loss.isnan().any()
    assert not grad.any()


@interpreter
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_non_contiguous_rows(soft, small_tiles):
    """A row stride larger than V, a storage offset, and transposed (non-unit V stride) input."""
    z, target, weight = make_case(4, V_ODD, soft)
    buf = torch.randn(8, V_ODD + 37)
    buf[1::2, 5 : 5 + V_ODD] = z
    rows = buf[1::2, 5 : 5 + V_ODD]  # row stride 2·(V + 37), offset
    columns = z.t().contiguous().t()  # stride along V is N
    if soft:
        target = target.t().contiguous().t()
    want_loss, want_grad = oracle(z, target, weight, label_smoothing=0.1)
    for view in (rows, columns):
        assert not view.is_contiguous()
        loss, grad = run(view, target, weight, label_smoothing=0.1)
        assert_fp32_close(loss, want_loss)
        assert_fp32_close(grad, want_grad)


@interpreter
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "columns"])
def test_inplace_backward_writes_the_gradient_into_the_logits(transposed, small_tiles):
    z, target, weight = make_case(4, V_ODD, soft=False)
    x = z.clone().requires_grad_()
    logits = x * 1.0 if not transposed else (x.t() * 1.0).t()  # non-leaf, as from a model
    grad_output = torch.rand(4) + 0.5
    loss = fastxent.cross_entropy(
        logits, target, weight, reduction="none", z_loss=1e-3, inplace_backward=True,
        backend="triton",
    )  # fmt: skip
    _, written = oracle(z, target, weight, reduction="none", z_loss=1e-3)
    assert_fp32_close(logits.detach(), written)  # forward wrote ∂(Σ rows)/∂z into the logits
    loss.backward(grad_output)
    want_loss, want_grad = oracle(z, target, weight, grad_output, reduction="none", z_loss=1e-3)
    assert_fp32_close(loss.detach(), want_loss)
    assert_fp32_close(x.grad, want_grad)


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_half_precision(dtype, soft, small_tiles):
    """bf16/fp16 accumulate in float32 and round the gradient once.

    Against the float64 reference of the same (rounded) logits: the loss to 1e-5 relative; each
    gradient element within one rounding of its value (relative u = 2^-11 for fp16; 2^-7 for
    bf16, one whole ulp, because Triton's interpreter truncates float32 to bf16 where the GPU
    rounds to nearest), plus 1e-5 of the largest for the float32 arithmetic before it.
    """
    z, target, weight = make_case(5, V_ODD, soft, dtype=dtype)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    loss, grad = run(z, target, weight, **kw)
    want_loss, want_grad = oracle(z, target, weight, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_fp32_close(loss, want_loss)
    u = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-11
    bound = u * want_grad.abs() + 1e-5 * want_grad.abs().max()
    excess = ((grad.double() - want_grad).abs() - bound).max().item()
    assert excess <= 0.0, f"gradient error exceeds one rounding by {excess:.3g}"


def _softcap_far_below_the_cap(softcap: float, device: str) -> None:
    """tanh(u) as 1 - 2/(e^{2u}+1) cancelled near 0: c·6e-8 in every capped logit (loss error
    7.7e-4 at c = 1e4, PyTorch's float32 6.6e-7). Bound: a few times PyTorch's own error."""
    z, target, _ = make_case(8, 300, soft=False)
    z = z / 2  # logits of scale 2, far below the cap
    want_loss, want_grad = oracle(z, target, softcap=softcap, reduction="none")
    loss, grad = run(z.to(device), target.to(device), softcap=softcap, reduction="none")
    loss, grad = loss.cpu(), grad.cpu()
    zp = softcap * torch.tanh(z / softcap)  # PyTorch in float32 (on the CPU), for its own error
    torch_loss = torch.nn.functional.cross_entropy(zp, target, reduction="none")
    torch_err = (torch_loss.double() - want_loss).abs().max().item()
    assert (loss.double() - want_loss).abs().max().item() <= 4 * torch_err + 1e-7
    assert_fp32_close(grad, want_grad, rtol=2e-6)


@interpreter
@pytest.mark.parametrize("softcap", [30.0, 1e4])
def test_softcap_keeps_float32_precision_for_logits_far_below_the_cap(softcap):
    _softcap_far_below_the_cap(softcap, "cpu")


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("softcap", [30.0, 1e4])
def test_gpu_softcap_keeps_float32_precision_for_logits_far_below_the_cap(softcap):
    """The same with the GPU's exp and log, which Kahan's expm1 in the kernel relies on."""
    _softcap_far_below_the_cap(softcap, "cuda")


@interpreter
def test_softcap_gradient_keeps_its_digits_where_tanh_saturates():
    """Logits of scale 50 under softcap 30: dz'/dz as 1 - tanh² cancelled where tanh saturates
    (an entry's relative error up to 1.3e-2; PyTorch's autograd, which does the same, 6.5e-3).
    From e^{-2|u|} it keeps float32's digits: bound 1e-4 on entries above 1e-30."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, V_ODD, generator=gen) * 50
    target = torch.randint(0, V_ODD, (8,), generator=gen)
    _, want_grad = oracle(z, target, softcap=30.0, reduction="sum")
    _, grad = run(z, target, softcap=30.0, reduction="sum")
    big = want_grad.abs() > 1e-30
    relative = ((grad.double() - want_grad).abs() / want_grad.abs())[big]
    assert relative.max().item() <= 1e-4


@interpreter
@pytest.mark.parametrize("soft, smoothing", [(True, 0.0), (False, 0.1), (True, 0.1)])
def test_target_sums_keep_precision_when_a_later_tile_holds_the_max(small_tiles, soft, smoothing):
    """The first tile's logits lie 3000 below the rest: target sums held relative to the first
    tile's max cancelled two terms of size 3000·Σt (loss error 3.1e-4 against PyTorch's
    float32 2.6e-7). Bound: a few times PyTorch's own float32 error."""
    z, target, weight = make_case(4, V_ODD, soft=soft, seed=5)
    z[:, :128] -= 3000.0  # the whole first tile of 128 columns
    if soft:
        target[:, :128] = 0.0  # targets only where the max is
    else:
        target = torch.randint(128, V_ODD, (4,), generator=torch.Generator().manual_seed(6))
    kw = {"label_smoothing": smoothing, "reduction": "none"}
    for w in (None, weight):
        want_loss, _ = oracle(z, target, w, **kw)
        loss, _ = run(z, target, w, **kw)
        theirs = torch.nn.functional.cross_entropy(z, target, w, **kw)  # float32 PyTorch
        torch_err = (theirs.double() - want_loss).abs().max().item()
        err = (loss.double() - want_loss).abs().max().item()
        assert err <= 4 * torch_err + 2e-6 * want_loss.abs().max().item(), (err, torch_err)


@interpreter
def test_float64_is_routed_to_the_portable_kernel():
    """float64 logits give float64 results, exact to 1e-12 against the reference."""
    z, target, weight = make_case(3, 11, soft=False, dtype=torch.float64)
    loss, grad = run(z, target, weight, softcap=4.0, label_smoothing=0.1)
    want_loss, want_grad = oracle(z, target, weight, softcap=4.0, label_smoothing=0.1)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)


@interpreter
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_loss_only_skips_the_gradient(soft, small_tiles):
    """Logits that do not require grad: the kernel gets grad=None and returns row losses only."""
    z, target, weight = make_case(4, V_ODD, soft)
    before = z.clone()
    loss = fastxent.cross_entropy(z, target, weight, reduction="none", backend="triton")
    want_loss, _ = oracle(z, target, weight, reduction="none")
    assert not loss.requires_grad
    assert_fp32_close(loss, want_loss)
    assert torch.equal(z, before)


@interpreter
def test_row_kernel_contract_with_scales_on_device():
    """Direct launcher call: 0-dim ce_scale/z_scale tensors are read by the kernel."""
    z, target, _ = make_case(3, 10, soft=False)
    opts = CrossEntropyOptions(num_classes=10, soft=False, reduction="none", z_loss=0.1)
    a, b = torch.tensor(0.25), torch.tensor(3.0)
    grad = torch.empty_like(z)
    rows = triton_backend.cross_entropy_rows(z, target, None, opts, a, b, grad)
    ce, dce = oracle(z, target, reduction="none")
    zl, dzl = oracle(z, target, reduction="none", z_loss=0.1)
    assert rows.dtype == torch.float32
    assert_fp32_close(rows, 0.25 * ce + 3.0 * (zl - ce))
    assert_fp32_close(grad, 0.25 * dce + 3.0 * (dzl - dce))


def test_unavailable_reason_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastxent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="triton")
    assert "CUDA" in triton_backend.unavailable_reason(torch.device("meta"))


def test_without_triton_cpu_is_told_about_the_interpreter_and_cuda_to_install(monkeypatch):
    """Installing triton would not make it run on CPU: there the reason is the interpreter."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    on_cpu = triton_backend.unavailable_reason(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in on_cpu and "pip install" not in on_cpu
    assert "pip install triton" in triton_backend.unavailable_reason(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "pip install triton" in triton_backend.unavailable_reason(torch.device("cpu"))


@interpreter
def test_unavailable_reason_with_the_interpreter():
    assert triton_backend.unavailable_reason(torch.device("cpu")) is None


@pytest.mark.parametrize("version", ["3.0.0", "3.5.1", "2.3.1"])
def test_a_triton_older_than_the_tested_ones_is_not_used(monkeypatch, version):
    """Under triton 3.0 (torch 2.4's) the interpreter computed losses off by 6e4 and more;
    "auto" then takes the portable kernel, on CUDA too."""
    monkeypatch.setattr(triton, "__version__", version)
    for device in ("cpu", "cuda"):
        reason = triton_backend.unavailable_reason(torch.device(device))
        assert reason is not None and f"triton {version} is older than 3.6" in reason
    assert fastxent.functional.resolve_backend("auto", torch.device("cuda"))[0] == "torch"
    for tested in ("3.6.0", "3.9.0+git1234", "4.0"):
        monkeypatch.setattr(triton, "__version__", tested)
        assert triton_backend.unavailable_reason(torch.device("cuda")) is None


def test_unavailable_reason_on_cuda_when_triton_imports():
    assert triton_backend.unavailable_reason(torch.device("cuda")) is None


def test_launch_config_for_large_vocabularies():
    assert triton_backend.launch_config(128256) == (4096, 8)
    assert triton_backend.launch_config(423) == (512, 4)
    assert triton_backend.launch_config(1) == (16, 4)


@interpreter
@pytest.mark.parametrize("factor", [1.0, 0.5, -3.0, 1.0 + 1e-12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_unless_one(factor, dtype, monkeypatch):
    """x *= f through the grid-stride loop (3 programs of 16-element tiles over 1000 elements)."""
    monkeypatch.setattr(triton_backend, "SCALE_PROGRAMS", 3)
    monkeypatch.setattr(triton_backend, "SCALE_BLOCK", 16)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = (x.double() * factor).to(dtype)
    triton_backend.scale_unless_one(x, torch.tensor(factor, dtype=torch.float64))
    # float64 is not squeezed through the kernel's float32 (1 + 1e-12 would round to 1)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 0.0  # the interpreter truncates to bf16
    torch.testing.assert_close(x, want, rtol=ulp, atol=0.0)


@interpreter
@pytest.mark.parametrize("factor", [float("inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_unless_one_keeps_zeros_under_a_non_finite_factor(factor, dtype):
    """Zero entries (ignored rows) stay 0 under grad_output inf or NaN, as PyTorch's gradient
    of an ignored row does; the others take the product."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[::3] = 0.0
    want = torch.where(x == 0, 0.0, x.float() * factor).to(dtype)
    triton_backend.scale_unless_one(x, torch.tensor(factor))
    torch.testing.assert_close(x, want, rtol=0.0, atol=0.0, equal_nan=True)


@interpreter
def test_out_of_range_targets_are_read_safely_by_the_kernel():
    """The kernel clamps a bad target for its reads (its loss is garbage, no fault): on CUDA the
    range check runs alongside the kernel and raises once it is in."""
    z = torch.randn(3, 5)
    opts = CrossEntropyOptions(num_classes=5, soft=False, reduction="none")
    one = torch.ones(())
    rows = triton_backend.cross_entropy_rows(
        z, torch.tensor([1, 7, -5]), None, opts, one, one, None
    )
    want = torch.nn.functional.cross_entropy(z[:1], torch.tensor([1]), reduction="none")
    torch.testing.assert_close(rows[:1], want)


# A row stride that fits in int32 while row·stride does not: rows 1 and 2 start past 2^31
# elements of a 4 GiB float16 storage that is allocated but, apart from those rows, never
# touched (the OS maps the pages lazily). A 32-bit row offset reads and writes elsewhere —
# usually a segmentation fault — so the check runs in a child process.
_WIDE_OFFSETS = """
import torch
from fastxent import reference
from fastxent._options import CrossEntropyOptions
from fastxent._triton import cross_entropy_rows

V, S = 64, (1 << 30) + 64
storage = torch.empty(2 * S + V, dtype=torch.float16)
z = torch.as_strided(storage, (3, V), (S, 1))  # z[2] starts at element 2^31 + 128
values = (torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3).half()
z.copy_(values)
target = torch.tensor([1, 5, 63])
opts = CrossEntropyOptions(num_classes=V, soft=False, reduction="none")
one = torch.ones(())
rows = cross_entropy_rows(z, target, None, opts, one, one, z)  # gradient written into z
loss, grad = reference.cross_entropy(values.double().numpy(), target.numpy(), reduction="none")
assert (rows.double() - torch.as_tensor(loss)).abs().max() < 1e-5, rows
assert (z.double() - torch.as_tensor(grad)).abs().max() < 1e-3
print("ok")
"""


@interpreter
def test_row_offsets_beyond_2_31_elements():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WIDE_OFFSETS)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@interpreter
def test_checks_float32_rows_run_the_kernel_within_their_tolerance(monkeypatch):
    """``fastxent check``'s float32 table is where Triton's own kernel is checked (its float64
    runs on the portable kernel): two cases here, and a kernel 1e-4 off is caught."""
    from fastxent import check

    monkeypatch.setattr(check, "CASES", check.CASES[4:6])  # weights + ignore_index; z-loss
    rows = list(check.error_rows("cpu", torch.float32, ("triton",)))
    assert len(rows) == 3  # two cases and the linear token walk
    for backend, case, vs_ref, vs_torch, note in rows:
        assert vs_ref <= check.FLOAT32_TOLERANCE and vs_torch <= check.FLOAT32_TOLERANCE, case
        assert backend == "triton" and not note
    real = triton_backend.cross_entropy_rows
    monkeypatch.setattr(
        triton_backend, "cross_entropy_rows", lambda *args: real(*args) * (1 + 1e-4)
    )
    off = next(check.error_rows("cpu", torch.float32, ("triton",)))
    assert off[2] > check.FLOAT32_TOLERANCE


@pytest.mark.skipif(INTERPRETED, reason="the interpreter checks already ran in this process")
def test_interpreter_checks_in_a_subprocess():
    """The kernels were compiled in this process: run the interpreter tests in a child."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-m", "not gpu", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:]


# ---- compiled kernels on a GPU, realistic sizes ----


def _torch_rows(z, target, **kw):
    """PyTorch's loss and gradient in float32 for a slice of rows (the independent baseline)."""
    x = z.float().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x, target, reduction="sum", **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_llama_vocabulary(dtype, inplace):
    n, v = 4096, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, v, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda", generator=g)
    target[::7] = -100
    logits = x * 1.0
    loss = fastxent.cross_entropy(
        logits, target, reduction="sum", label_smoothing=0.1, inplace_backward=inplace
    )
    loss.backward()
    want_loss, want_grad = _torch_rows(x.detach(), target, label_smoothing=0.1)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-2)
    tol = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}[dtype]  # one rounding
    torch.testing.assert_close(x.grad.float(), want_grad, rtol=0.0, atol=tol)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("target_value", [-1, 1000, -100])
def test_gpu_out_of_range_target_raises_and_the_device_stays_usable(target_value):
    """The CUDA range check runs alongside the kernel, yet raises the same IndexError."""
    z = torch.randn(64, 1000, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    target[37] = target_value
    with pytest.raises(IndexError, match=rf"target\[37\] = {target_value} is out of range"):
        fastxent.cross_entropy(z, target, ignore_index=-7, backend="triton")
    target[37] = 3
    loss = fastxent.cross_entropy(
        z, target, weight=torch.rand(1000, device="cuda"), backend="triton"
    )
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("grad_output", [1.0, 2.5, 0.0])
def test_gpu_backward_scales_by_grad_output_on_the_device(grad_output):
    """grad_output folded in by the device-side scale (skipped when it is 1) vs PyTorch."""
    z = torch.randn(300, 5000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 5000, (300,), device="cuda")
    (fastxent.cross_entropy(z, target, backend="triton") * grad_output).backward()
    x = z.detach().float().requires_grad_()
    (torch.nn.functional.cross_entropy(x, target) * grad_output).backward()
    torch.testing.assert_close(z.grad.float(), x.grad, rtol=0.0, atol=4e-3 * max(grad_output, 1))


@pytest.mark.gpu
@compiled
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_logits_on_a_device_that_is_not_the_current_one():
    """Triton launches on the current device: the launchers make the logits' device current."""
    z = torch.randn(64, 1000, device="cuda:1", requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda:1")
    with torch.cuda.device(0):
        (fastxent.cross_entropy(z, target, backend="triton") * 2.5).backward()
    x = z.detach().clone().requires_grad_()
    (torch.nn.functional.cross_entropy(x, target) * 2.5).backward()
    torch.testing.assert_close(z.grad, x.grad, rtol=0.0, atol=1e-6)


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("chunk_size", [48, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_linear_cross_entropy_against_reference(dtype, chunk_size):
    """The CUDA token walk (∂W by cuBLAS into float32, written by the first chunk) vs float64."""
    from test_linear import oracle

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 70, 64, generator=gen).to(dtype)
    weight = (torch.randn(5000, 64, generator=gen) * 0.2).to(dtype)
    bias = torch.randn(5000, generator=gen).to(dtype)
    target = torch.randint(0, 5000, (3, 70), generator=gen)
    target[1, ::3] = -100
    leaves = [x.cuda().requires_grad_() for x in (hidden, weight, bias)]
    loss = fastxent.linear_cross_entropy(
        leaves[0], leaves[1], target.cuda(), leaves[2], label_smoothing=0.1, chunk_size=chunk_size
    )
    loss.backward()
    want = oracle(hidden, weight, bias, target, label_smoothing=0.1)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    got = (loss, *(x.grad for x in leaves))
    for name, g, w in zip(("loss", "dh", "dW", "db"), got, want, strict=True):
        err = (g.detach().cpu().double() - w).abs().max() / w.abs().max()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol}"


def _compiled_then_eager(fn, inputs, rows_launched: list) -> list:
    """[(loss, grads, kernel launches)] of ``fn`` under torch.compile (inductor), then eager,
    each on fresh leaves of ``inputs``."""
    results = []
    for run in (torch.compile(fn), fn):
        rows_launched.clear()
        leaves = [x.clone().requires_grad_() for x in inputs]
        loss = run(*leaves)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves], len(rows_launched)))
    return results


@pytest.mark.gpu
@compiled
def test_gpu_compiled_steps_run_the_triton_kernel_and_the_walk(shapes_passed_to):
    """torch.compile'd code on CUDA runs fastxent's Triton kernel and linear walk outside its
    graph, as eager does. The dynamo of torch 2.7-2.11 folds ``is_exporting()`` to True where it
    traces (pytorch/pytorch#176347): fastxent took that for torch.export before, and every
    compiled call computed PyTorch's ops instead (the linear loss with all its logits)."""
    rows_launched = shapes_passed_to(triton_backend, "cross_entropy_rows")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, v = 512, 70000  # 3.6e7 logits: above auto's fused-ops limit on CUDA (2^25)
    z = torch.randn(n, v, device="cuda", generator=g)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    h = torch.randn(300, 64, device="cuda", generator=g)
    w = torch.randn(5000, 64, device="cuda", generator=g) * 0.2
    t = torch.randint(0, 5000, (300,), device="cuda", generator=g)
    cases = {
        "cross_entropy": (lambda z: fastxent.cross_entropy(z * 2, y, label_smoothing=0.1), [z]),
        "linear": (lambda h, w: fastxent.linear_cross_entropy(h, w, t, chunk_size=128), [h, w]),
    }
    for name, (fn, inputs) in cases.items():
        (loss, grads, launched), (want_loss, want_grads, eager_launched) = _compiled_then_eager(
            fn, inputs, rows_launched
        )
        assert launched == eager_launched > 0, (name, launched, eager_launched)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0.0)
        for got, want in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0.0, atol=1e-6 * want.abs().max().item())


@pytest.mark.gpu
def test_gpu_small_compiled_call_checks_its_targets_on_the_host():
    """A small CUDA call traced by torch.compile reads its class indices outside the graph (a
    device-side assert in the graph would leave the device unusable): a bad one raises
    fastxent's IndexError, and the device still computes the next call."""
    z = torch.randn(40, 300, device="cuda", requires_grad=True)
    y = torch.randint(0, 300, (40,), device="cuda")
    fn = torch.compile(lambda z, y: fastxent.cross_entropy(z, y, label_smoothing=0.1))
    want = torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1)
    torch.testing.assert_close(fn(z, y), want)
    y_bad = y.clone()
    y_bad[7] = 300
    with pytest.raises(IndexError, match=r"target\[7\] = 300 is out of range"):
        fn(z, y_bad)
    torch.testing.assert_close(fn(z, y), want)


@pytest.mark.gpu
@graph_break_has_a_reason
def test_gpu_small_calls_under_fullgraph():
    """fullgraph=True on CUDA: probability targets trace whole (nothing to read on the host);
    class indices are read on the host, a graph break that fullgraph refuses with its reason."""
    z = torch.randn(40, 300, device="cuda")
    probs = torch.softmax(torch.randn(40, 300, device="cuda"), dim=1)
    fn = torch.compile(
        lambda z, t: fastxent.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-3), fullgraph=True
    )
    want = fastxent.cross_entropy(z, probs, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(fn(z, probs), want)
    with pytest.raises(Exception, match="reads CUDA class-index targets on the host"):
        fn(z, torch.randint(0, 300, (40,), device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_gpu_small_auto_calls_take_the_fused_ops_and_match_the_reference(soft, monkeypatch):
    """Small CUDA calls under "auto" run PyTorch's fused ops with fastxent's semantics."""
    from fastxent import functional
    from fastxent._torch import composed

    calls = []
    original = composed.cross_entropy
    monkeypatch.setattr(composed, "cross_entropy", lambda *a: calls.append(1) or original(*a))
    z, target, weight = make_case(40, 300, soft=soft, seed=8)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    x = z.cuda().requires_grad_()
    loss = fastxent.cross_entropy(x, target.cuda(), weight.cuda(), **kw)
    loss.backward()
    assert calls and z.numel() <= functional.AUTO_COMPOSED_MAX_LOGITS_CUDA
    want_loss, want_grad = oracle(z, target, weight, **kw)
    assert_fp32_close(loss.detach().cpu().double(), want_loss)
    assert_fp32_close(x.grad.cpu().double(), want_grad)
    if not soft:  # the range check reads the targets before PyTorch's kernel could assert
        target[3] = 300
        with pytest.raises(IndexError, match=r"target\[3\] = 300 is out of range"):
            fastxent.cross_entropy(x, target.cuda())


@pytest.mark.gpu
@compiled
def test_gpu_options_against_reference():
    """Every option at once, float32, V = 70001, against the float64 reference."""
    n, v = 32, 70001
    z, target, weight = make_case(n, v, soft=False, seed=3)
    target[target == -100] = 17  # make_case's ignored row, under this call's ignore_index
    target[5] = 17
    kw = dict(ignore_index=17, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=0.9)
    loss, grad = run(z.cuda(), target.cuda(), weight.cuda(), **kw)
    want_loss, want_grad = oracle(z, target, weight, **kw)
    assert_fp32_close(loss.cpu(), want_loss)
    assert_fp32_close(grad.cpu(), want_grad)
    zs, ts, ws = make_case(n, v, soft=True, seed=4)
    loss, grad = run(zs.cuda(), ts.cuda(), ws.cuda(), z_loss=1e-3)
    want_loss, want_grad = oracle(zs, ts, ws, z_loss=1e-3)
    assert_fp32_close(loss.cpu(), want_loss)
    assert_fp32_close(grad.cpu(), want_grad)


@pytest.mark.gpu
@compiled
def test_gpu_more_than_2_31_elements():
    """N×V = 16800 × 128256 > 2^31 (bf16, 4.3 GB): rows at both ends against PyTorch."""
    n, v = 16800, 128256
    assert n * v > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)
    target = torch.randint(0, v, (n,), device="cuda", generator=g)
    x = z.clone().requires_grad_()
    loss = fastxent.cross_entropy(x, target, reduction="none")
    loss.backward(torch.ones_like(loss))
    for part in (slice(0, 16), slice(n - 16, n)):
        want_loss = torch.nn.functional.cross_entropy(
            z[part].float(), target[part], reduction="none"
        )
        torch.testing.assert_close(loss[part], want_loss, rtol=1e-5, atol=1e-4)
        _, want_grad = _torch_rows(z[part], target[part])
        torch.testing.assert_close(x.grad[part].float(), want_grad, rtol=0.0, atol=4e-3)


@interpreter
@pytest.mark.parametrize("shift", [False, True])
def test_linear_cross_entropy_runs_the_triton_kernel_per_chunk(shift, small_tiles, monkeypatch):
    """The fused linear loss on the Triton kernel (chunks that do not divide N) vs float64."""
    from test_linear import oracle

    calls = []
    kernel = triton_backend.cross_entropy_rows
    monkeypatch.setattr(
        triton_backend, "cross_entropy_rows", lambda *a: calls.append(1) or kernel(*a)
    )
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(423, 16, generator=gen) * 0.3).requires_grad_()
    bias = torch.randn(423, generator=gen, requires_grad=True)
    target = torch.randint(0, 423, (2, 7), generator=gen)
    target[0, 3] = -100
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
    loss = fastxent.linear_cross_entropy(
        hidden, weight, target, bias, shift=shift, chunk_size=5, backend="triton", **options
    )
    loss.backward()
    assert len(calls) == 3  # 13 (or 11 after the shift) counted tokens in chunks of 5
    want = oracle(hidden, weight, bias, target, shift=shift, **options)
    for got, expected in zip((loss, hidden.grad, weight.grad, bias.grad), want, strict=True):
        assert_fp32_close(got.detach().double(), expected)


def _loss_scaled_float16_errors(z: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Gradient errors of fastxent (Triton) and of PyTorch under float16 autocast for a "mean"
    under a 2^16 loss scale, as ‖g - g_ref‖ / ‖g_ref‖ against float32 (float64 on CPU)."""
    exact = z.to(torch.float64 if z.device.type == "cpu" else torch.float32).requires_grad_()
    torch.nn.functional.cross_entropy(exact, target).backward()
    ours, theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    (fastxent.cross_entropy(ours, target, backend="triton") * 2.0**16).backward()
    with torch.autocast(z.device.type, dtype=torch.float16):
        (torch.nn.functional.cross_entropy(theirs, target) * 2.0**16).backward()
    return tuple(
        float((x.grad.to(exact.dtype) / 2.0**16 - exact.grad).norm() / exact.grad.norm())
        for x in (ours, theirs)
    )


@interpreter
def test_float16_mean_gradient_survives_loss_scaling():
    """The Triton kernel writes a float16 "mean" gradient without the mean's 1/N (backward
    applies it with grad_output): under a 2^16 loss scale the error, a norm over all entries, is
    PyTorch's under float16 autocast (tests/test_loss_scaling.py for the other kernels)."""
    g = torch.Generator().manual_seed(12)
    z = (torch.randn(512, 1024, generator=g) * 3).half()  # o ≈ 1e-5: o/512 is below 6e-8
    ours, theirs = _loss_scaled_float16_errors(z, torch.randint(0, 1024, (512,), generator=g))
    assert ours <= 1.5 * theirs


@pytest.mark.gpu
@compiled
def test_gpu_float16_mean_under_grad_scaler():
    """The same at a large vocabulary on the GPU (8192 × 32000)."""
    g = torch.Generator(device="cuda").manual_seed(13)
    z = (torch.randn(8192, 32000, device="cuda", generator=g) * 2).half()
    target = torch.randint(0, 32000, (8192,), device="cuda", generator=g)
    ours, theirs = _loss_scaled_float16_errors(z, target)
    assert ours <= 1.5 * theirs


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_gpu_linear_under_autocast_with_float32_master_weights(autocast_dtype):
    """The CUDA token walk under autocast, float32 weight and bias: gradients in float32 (∂W
    straight from the accumulator), errors against float64 on the cast inputs within those of
    eager PyTorch under the same autocast plus 1e-2 of the largest entry."""
    from test_linear import assert_within_baseline, oracle

    gen = torch.Generator().manual_seed(14)
    hidden = torch.randn(4, 300, 64, generator=gen)
    weight = torch.randn(20000, 64, generator=gen) * 0.2
    bias = torch.randn(20000, generator=gen)
    target = torch.randint(0, 20000, (4, 300), generator=gen)
    want = oracle(*(x.to(autocast_dtype) for x in (hidden, weight, bias)), target)
    results = []
    for fn in (fastxent.linear_cross_entropy, None):
        leaves = [x.cuda().requires_grad_() for x in (hidden, weight, bias)]
        with torch.autocast("cuda", dtype=autocast_dtype):
            if fn is None:
                logits = torch.nn.functional.linear(*leaves).flatten(0, 1)
                loss = torch.nn.functional.cross_entropy(logits, target.cuda().flatten())
            else:
                loss = fn(leaves[0], leaves[1], target.cuda(), leaves[2])
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in leaves)))
    ours, theirs = results
    assert all(x.dtype == torch.float32 for x in ours)
    assert_within_baseline(ours, theirs, want, 1e-2)


@interpreter
def test_linear_under_autocast_on_the_triton_kernel(small_tiles):
    """Float32 master weights under bf16 autocast on the Triton kernel: the same loss and ∂h as
    the call on inputs cast to bf16 by hand, and ∂W equal to that call's after one rounding to
    bf16 (autocast hands over the float32 accumulator). Those equalities cannot see an error
    both calls share, so loss, ∂h and ∂W are also compared with float64 on the cast inputs:
    within eager PyTorch's error under the same autocast plus 1e-2 of the largest entry, as
    test_gpu_linear_under_autocast_with_float32_master_weights."""
    from test_linear import assert_within_baseline, oracle

    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(2, 7, 16, generator=gen)
    weight = torch.randn(423, 16, generator=gen) * 0.3
    target = torch.randint(0, 423, (2, 7), generator=gen)
    results = []
    for autocast in (True, False):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
        h, w = leaves if autocast else [x.to(torch.bfloat16) for x in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fastxent.linear_cross_entropy(
                h, w, target, chunk_size=5, label_smoothing=0.1, backend="triton"
            )
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in leaves)))
    (loss, dh, dw), (loss_cast, dh_cast, dw_cast) = results
    assert dw.dtype == torch.float32 and torch.equal(loss, loss_cast) and torch.equal(dh, dh_cast)
    assert torch.equal(dw.bfloat16().float(), dw_cast)
    want = oracle(*(x.bfloat16() for x in (hidden, weight)), None, target, label_smoothing=0.1)[:3]
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(*leaves).flatten(0, 1)
        eager = torch.nn.functional.cross_entropy(logits, target.flatten(), label_smoothing=0.1)
    eager.backward()
    eager = (eager.detach(), *(x.grad for x in leaves))
    assert_within_baseline((loss, dh, dw), eager, want, 1e-2, ("loss", "dh", "dW"))


@pytest.mark.parametrize("soft", [False, True])
def test_strided_float32_class_weights(soft):
    """A float32 weight that is a strided view (every other entry) is read by class, not by
    memory position: the kernel once read w[y] at unit stride and got the wrong weights.
    Compared with the float64 reference on the contiguous weights, to float32 accuracy."""
    z, target, _ = make_case(6, 9, soft)
    weight = torch.arange(1.0, 19.0)[::2]  # (9,), stride 2
    got = run(z, target, weight, reduction="none", label_smoothing=0.1)
    want = oracle(z, target, weight.contiguous(), reduction="none", label_smoothing=0.1)
    assert_fp32_close(got[0], want[0])
    assert_fp32_close(got[1], want[1])


@interpreter
@pytest.mark.parametrize("soft", [False, True])
def test_tensors_with_the_negative_bit_are_read_as_their_values(soft):
    """The kernel reads memory through pointers: a ``torch._neg_view`` (logits, probabilities,
    class weights) is resolved first, and the gradient written into its logits' view."""
    z, target, weight = make_case(5, 40, soft)
    base = (-z).requires_grad_()
    views = (torch._neg_view(base), torch._neg_view(-target) if soft else target)
    loss = fastxent.cross_entropy(*views, torch._neg_view(-weight), backend="triton", z_loss=1e-2)
    loss.backward()
    want_loss, want_grad = oracle(z, target, weight, z_loss=1e-2)
    assert_fp32_close(loss, want_loss)
    assert_fp32_close(-base.grad, want_grad)
