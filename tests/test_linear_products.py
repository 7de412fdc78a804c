"""The token walk's matmuls on CPU: oneDNN's product for float32, torch.mm otherwise.

Both products must give the float64 oracle's loss and gradients (reference.linear_cross_entropy)
within float32 tolerance, on every path through the walk that a product feeds: bias, index and
soft targets, ignored tokens (gathered rows), shift, a per-row grad_output, filter_eps, partial
gradients and strided inputs. Tolerance: max|ours - oracle| <= 1e-5 · max|oracle| per output
(float32 sums of a few hundred products; PyTorch's own float32 error here is ~1e-6).
"""

import pytest
import torch

import fastxent
from fastxent import _linear
from fastxent._linear import (
    CPU_CHUNK_MIN_BYTES,
    CPU_CHUNK_SHARE,
    default_chunk_size,
    small_rows_linear,
)
from test_linear import make_case, oracle, ours

F32_RELATIVE_TO_MAX = 1e-5
HAS_ONEDNN = _linear._onednn_linear() is not None
MKL_CHECK = _linear.mkl_outpaces_onednn  # the real one: the fixture below replaces it
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="this PyTorch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def onednn_wherever_it_is_built(monkeypatch):
    """These tests are of oneDNN's product where the build has it, whichever the CPU would
    take (MKL's on Intel CPUs: test_intel_cpus_take_torch_mm)."""
    monkeypatch.setattr(_linear, "mkl_outpaces_onednn", lambda: False)


@pytest.fixture(params=["onednn", "torch.mm"])
def product(request, monkeypatch):
    """Run the test with each product; count the oneDNN calls made (a list of call shapes)."""
    calls = []
    if request.param == "torch.mm":
        monkeypatch.setattr(_linear, "small_rows_linear", lambda hidden, weight: None)
        return request.param, calls
    if not HAS_ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN linear")
    onednn = _linear._onednn_linear()

    def counted(x, w, b):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return onednn(x, w, b)

    monkeypatch.setattr(_linear, "_onednn_linear", lambda: counted)
    return request.param, calls


def assert_close_f32(got, want):
    for name, g, w in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want, strict=True):
        if g is None:
            continue
        assert g.dtype == torch.float32, name
        assert g.shape == w.shape, name
        err = (g.double() - w).abs().max() / w.abs().max().clamp(min=1e-30)
        assert err <= F32_RELATIVE_TO_MAX, f"{name}: error {err:.2e} relative to its max"


CASES = {
    "index, bias, mean": ({}, {}),
    "soft, sum": ({"soft": True}, {"reduction": "sum"}),
    "ignored rows, smoothing": ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}),
    "shift, none": ({"tokens": (3, 7)}, {"shift": True, "reduction": "none"}),
    "no bias, softcap": ({"bias": False}, {"softcap": 4.0, "logit_scale": 0.7}),
    "filter_eps 0": ({}, {"filter_eps": 0.0}),
}


@pytest.mark.parametrize("case", CASES)
def test_both_products_match_the_oracle(case, product):
    """float32 through each product, chunks of 4 rows that do not divide the 13 (or 18) rows."""
    make_kwargs, options = CASES[case]
    hidden, weight, bias, target = make_case(
        make_kwargs.get("tokens", (13,)),
        dim=16,
        num_classes=301,
        soft=make_kwargs.get("soft", False),
        bias=make_kwargs.get("bias", True),
        seed=21,
        dtype=torch.float32,
    )
    go = None
    if options.get("reduction") == "none":
        go = torch.rand((3, 6), generator=torch.Generator().manual_seed(3)) + 0.5
    got = ours(hidden, weight, bias, target, grad_output=go, chunk_size=4, **options)
    options.pop("filter_eps", None)
    want = oracle(hidden, weight, bias, target, grad_output=go, **options)
    assert_close_f32(got, want)
    name, calls = product
    if name == "onednn":  # the logits of each chunk and its ∂h: both products are oneDNN's
        assert any(w == tuple(weight.shape) for _, w in calls), calls
        assert any(w == tuple(weight.t().shape) for _, w in calls), calls


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True)])
def test_partial_gradients_through_both_products(needs, product):
    """Only ∂h, or only ∂W and ∂b: the other products are skipped, the asked ones exact."""
    hidden, weight, bias, target = make_case(
        (11,), dim=8, num_classes=97, seed=5, dtype=torch.float32
    )
    got = ours(hidden, weight, bias, target, needs=needs, chunk_size=3)
    want = oracle(hidden, weight, bias, target)
    for g, need in zip(got[1:], needs, strict=True):
        assert (g is not None) == need
    assert_close_f32(got, want)


def test_strided_inputs_take_torch_mm_for_a_strided_weight():
    """A weight that is a transposed view is not handed to oneDNN (it would copy all of W);
    strided hidden states are. Both stay exact."""
    hidden, weight, bias, target = make_case(
        (10,), dim=12, num_classes=50, seed=8, dtype=torch.float32
    )
    weight_view = weight.t().contiguous().t()  # same values, strides (1, V)
    hidden_view = torch.stack([hidden, hidden], dim=2).flatten(1)[:, ::2]  # same values, strided
    assert small_rows_linear(hidden, weight_view) is None
    assert small_rows_linear(hidden_view, weight) is _linear._onednn_linear()
    want = oracle(hidden, weight, bias, target)
    assert_close_f32(ours(hidden_view, weight_view, bias, target, chunk_size=4), want)
    assert_close_f32(ours(hidden_view, weight, bias, target, chunk_size=4), want)


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_a_non_contiguous_bias_through_both_products(layout, product):
    """A bias that is a strided slice or an expanded scalar: oneDNN read it as dense memory
    (the loss off by a third, or reading past the expanded one's element)."""
    hidden, weight, bias, target = make_case(
        (10,), dim=12, num_classes=50, seed=9, dtype=torch.float32
    )
    if layout == "strided":
        base = torch.stack([bias, -bias], dim=1).flatten().requires_grad_()  # (100,)
        bias_view = base[::2]  # bias's values, stride 2
    else:
        base = bias[:1].clone().requires_grad_()
        bias_view = base.expand(50)  # stride 0
        bias = bias_view.detach().contiguous()
    assert not bias_view.is_contiguous()
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    loss = fastxent.linear_cross_entropy(*leaves, target, bias_view, chunk_size=4, backend="torch")
    loss.backward()
    want = oracle(hidden, weight, bias, target)
    if layout == "strided":
        db = base.grad[::2]
    else:  # a constant bias moves no softmax: its gradient Σ_j ∂ℓ/∂z_j is 0 up to rounding
        db = None
        assert base.grad.abs().max() <= 1e-6
    assert_close_f32((loss.detach(), leaves[0].grad, leaves[1].grad, db), want)


@needs_onednn
def test_onednn_only_for_float32_on_cpu():
    """float64 keeps MKL's dgemm (torch.mm); bf16/fp16 keep torch.mm, which is oneDNN's there."""
    h, w = torch.zeros(2, 3), torch.zeros(4, 3)
    assert small_rows_linear(h, w) is not None
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert small_rows_linear(h.to(dtype), w.to(dtype)) is None


def test_no_onednn_means_torch_mm(monkeypatch):
    """Without oneDNN in the build the check says None (and the walk uses torch.mm)."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    _linear._onednn_linear.cache_clear()
    try:
        assert _linear._onednn_linear() is None
        hidden, weight, bias, target = make_case((6,), dim=4, num_classes=9, dtype=torch.float32)
        assert small_rows_linear(hidden, weight) is None
        assert_close_f32(
            ours(hidden, weight, bias, target, chunk_size=4), oracle(hidden, weight, bias, target)
        )
    finally:
        _linear._onednn_linear.cache_clear()


@needs_onednn
def test_cpu_default_chunk_is_a_sixth_of_the_weight_gradient():
    """float32 on CPU: logits of ∂W's bytes / CPU_CHUNK_SHARE, or CPU_CHUNK_MIN_BYTES if more."""
    # The CPU goal case: 512 // 6 = 85 rows (21 MiB of logits beside ∂W's 128 MiB), made even
    # over 2048 tokens in multiples of 8 rows within it: 25 chunks of 80 rows and one of 48.
    rows = default_chunk_size(65536, 512, torch.float32, device_type="cpu")
    assert rows == 512 // CPU_CHUNK_SHARE == 85
    assert default_chunk_size(65536, 512, torch.float32, 2048, "cpu") == 80
    # Small V·D: the byte floor decides (fewer, larger calls).
    assert default_chunk_size(1000, 512, torch.float32, device_type="cpu") == (
        CPU_CHUNK_MIN_BYTES // (1000 * 4)
    )
    # bf16 and float64 on CPU, and other devices, keep the wide budget (64 MB or half of ∂W).
    wide = {"cuda": torch.float32, "cpu": torch.bfloat16}
    for device_type, dtype in wide.items():
        assert default_chunk_size(65536, 512, dtype, device_type=device_type) == 256 * (
            4 // dtype.itemsize
        )
    assert default_chunk_size(65536, 512, torch.float64, device_type="cpu") == 256


@needs_onednn
def test_onednn_logits_take_few_heights_whatever_the_token_count(monkeypatch):
    """Each new height of oneDNN's chunk logits left memory with the C allocator: with the
    token count changing every step (batch size, ignored tokens) the process grew by up to
    ~0.8 GB. Default chunks are multiples of 8 rows and a short last chunk is padded to one,
    so 40 token counts meet a handful of heights; losses and gradients stay PyTorch's."""
    heights = set()
    product = _linear._onednn_linear()

    def spy(x, w, b):
        if w.shape[0] == 300:  # the logits product (∂h's has D = 16 output columns)
            heights.add(x.shape[0])
        return product(x, w, b)

    monkeypatch.setattr(_linear, "_onednn_linear", lambda: spy)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(300, 16, generator=gen)
    for tokens in range(217, 257):
        hidden = torch.randn(tokens, 16, generator=gen)
        target = torch.randint(0, 300, (tokens,), generator=gen)
        target[: tokens % 7] = -100  # dropped before the products
        for chunk_size in (40, None):  # a short last chunk of 40, then the default
            got = ours(hidden, weight, None, target, chunk_size=chunk_size)
            assert_close_f32(got, oracle(hidden, weight, None, target))
    assert 8 in heights and heights <= {8, 16, 24, 32, 40} | set(range(192, 257, 8)), heights


@needs_onednn
def test_cpu_default_chunk_is_what_a_call_uses(monkeypatch):
    """linear_cross_entropy(chunk_size=None) on CPU walks chunks of the CPU default."""
    seen = []
    walk = _linear.chunked_pass

    def spy(*args, **kwargs):
        seen.append(args[5].chunk_size)
        return walk(*args, **kwargs)

    monkeypatch.setattr(_linear, "chunked_pass", spy)
    hidden = torch.randn(300, 64, requires_grad=True)
    weight = torch.randn(40000, 64, requires_grad=True)
    target = torch.randint(0, 40000, (300,))
    fastxent.linear_cross_entropy(hidden, weight, target, backend="torch").backward()
    assert seen == [default_chunk_size(40000, 64, torch.float32, 300, "cpu")]


def test_the_walk_under_torch_compile():
    """torch.compile traces the walk; its matmuls are then inductor's (oneDNN's linear op is
    lowered only for frozen weights: inductor raised an AssertionError on it here)."""
    hidden, weight, bias, target = make_case(
        (40,), dim=16, num_classes=301, seed=9, dtype=torch.float32
    )
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]

    def loss_of(h, w, b):
        return fastxent.linear_cross_entropy(h, w, target, b, chunk_size=16)

    loss = torch.compile(loss_of)(*leaves)
    loss.backward()
    got = (loss.detach(), *(x.grad for x in leaves))
    assert_close_f32(got, oracle(hidden, weight, bias, target))


def test_cuda_float32_out_matmul_is_tried_once(monkeypatch):
    """Whether ∂W takes cuBLAS's float32-out addmm is tried, not read off the version: without
    CUDA the try fails cleanly (the blocked ∂W path serves); with PyTorch >= 2.11 on a GPU,
    where it is known to work, it succeeds. The answer is kept."""
    has_overload = "dtype_out" in torch.ops.aten.addmm.overloads()
    monkeypatch.setattr(_linear, "CUDA_FLOAT32_OUT_MATMUL", None if has_overload else False)
    works = _linear.cuda_float32_out_matmul()
    if not torch.cuda.is_available():
        assert works is False
    elif tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 11):
        assert works is True
    assert _linear.CUDA_FLOAT32_OUT_MATMUL is works


@pytest.mark.parametrize(
    ("vendor", "mkl", "takes_mkl"),
    [("GenuineIntel", True, True), ("AuthenticAMD", True, False), ("GenuineIntel", False, False)],
)
def test_intel_cpus_take_torch_mm(vendor, mkl, takes_mkl, monkeypatch, tmp_path):
    """MKL's sgemm outpaced oneDNN's small-row product on an Intel Xeon and lost to it on the
    AMD EPYC machines: the CPU's vendor picks, and without MKL oneDNN stays. The chunk budget
    is the small one either way (the memory goal is met by it)."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\n")
    monkeypatch.setattr(_linear, "CPUINFO", str(info))
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    assert MKL_CHECK.__wrapped__() == takes_mkl  # uncached: this file and this build
    h, w = torch.zeros(2, 3), torch.zeros(4, 3)
    chunk = default_chunk_size(65536, 512, torch.float32, 2048, device_type="cpu")
    monkeypatch.setattr(_linear, "mkl_outpaces_onednn", lambda: takes_mkl)
    assert (small_rows_linear(h, w) is None) == (takes_mkl or not HAS_ONEDNN)
    assert default_chunk_size(65536, 512, torch.float32, 2048, device_type="cpu") == chunk
