"""fastxent under torch.autocast (CPU, bfloat16): the mixed-precision training set-up.

``linear_cross_entropy`` follows F.linear there: hidden states are cast to the autocast dtype, the
float32 weight and bias are cast for the matmuls, and each gradient comes back in its input's own
dtype (the token walk's ∂W straight from its float32 accumulator). Inside every call autocast is
off, so fastxent's ops run as they do without it: results are bit for bit those of the same call
on inputs cast by hand.
"""

import pytest
import torch
import torch.nn.functional as F

import fastxent
from fastxent import reference
from fastxent.check import torch_composed
from test_compiled import rounding_excess
from test_linear import assert_within_baseline, make_case, oracle

AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}
WALKS = [{"chunk_size": 9, "backend": "torch"}, {"vocab_block": 100}, {"backend": "auto"}]
WALK_IDS = ["tokens", "vocab", "fused ops"]


def leaves(*tensors):
    return [None if x is None else x.detach().clone().requires_grad_() for x in tensors]


def run(fn, tensors, grad_output=None):
    """(loss, gradients of the tensors) of ``fn(*leaves)``, backward with ``grad_output``."""
    xs = leaves(*tensors)
    loss = fn(*xs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return (loss.detach(), *(None if x is None else x.grad for x in xs))


@pytest.mark.parametrize("walk", WALKS, ids=WALK_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_linear_with_float32_master_weights(walk, reduction, hidden_dtype):
    """float32 weight and bias, float32 or bf16 hidden states: the gradients have the inputs'
    dtypes, and each output's error against float64 (on the bf16-cast inputs autocast computes
    with) is at most eager PyTorch's under autocast plus 1e-2 of the output's largest entry."""
    hidden, weight, bias, target = make_case((4, 16), dim=32, num_classes=523, seed=21)
    hidden, weight, bias = hidden.to(hidden_dtype), weight.float(), bias.float()
    kwargs = {"reduction": reduction, "label_smoothing": 0.1}
    go = torch.rand(4, 16) + 0.5 if reduction == "none" else None
    half = [x.to(torch.bfloat16) for x in (hidden, weight, bias)]
    want = oracle(*half, target, grad_output=go, **kwargs)

    with torch.autocast(**AUTOCAST):
        got = run(
            lambda h, w, b: fastxent.linear_cross_entropy(h, w, target, b, **walk, **kwargs),
            (hidden, weight, bias),
            go,
        )
        base = run(
            lambda h, w, b: F.cross_entropy(
                F.linear(h, w, b).flatten(0, 1), target.flatten(), **kwargs
            ).reshape(go.shape if go is not None else ()),
            (hidden, weight, bias),
            go,
        )
    dtypes = (torch.float32, hidden_dtype, torch.float32, torch.float32)
    names = ("loss", "dh", "dW", "db")
    for name, g, dtype in zip(names, got, dtypes, strict=True):
        assert g.dtype == dtype, name
    assert_within_baseline(got, base, want, 1e-2, names)


def test_token_walk_weight_gradient_is_its_float32_accumulator():
    """With float32 master weights the token walk hands its float32 ∂W over as it is: entries
    that a bf16 rounding would change are kept (PyTorch's F.linear rounds ∂W to bf16 first)."""
    hidden, weight, bias, target = make_case((64,), dim=32, num_classes=523, seed=22)
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    with torch.autocast(**AUTOCAST):
        _, _, dw, db = run(
            lambda h, w, b: fastxent.linear_cross_entropy(h, w, target, b, chunk_size=16),
            (hidden, weight, bias),
        )
        _, _, dw_eager, _ = run(
            lambda h, w, b: F.cross_entropy(F.linear(h, w, b), target), (hidden, weight, bias)
        )
    assert torch.equal(dw_eager, dw_eager.bfloat16().float())  # eager: a rounded bf16 product
    assert not torch.equal(dw, dw.bfloat16().float())
    assert not torch.equal(db, db.bfloat16().float())


@pytest.mark.parametrize("walk", WALKS, ids=WALK_IDS)
def test_linear_under_autocast_equals_the_call_on_cast_inputs(walk):
    """Bit for bit the same loss and gradients as calling it outside autocast on inputs cast to
    bf16 by hand (gradients then cast back), with the options whose math has a matmul of its
    own (label smoothing with class weights: z'·w): autocast is off inside the call. And, so
    that an error both calls share shows, each output's error against float64 on the bf16-cast
    inputs is at most eager PyTorch's under autocast plus 1e-2 of its largest entry."""
    hidden, weight, bias, target = make_case((3, 11), dim=16, num_classes=523, seed=23)
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    class_weight = torch.rand(523) + 0.5
    options = {"class_weight": class_weight, "label_smoothing": 0.2, "z_loss": 1e-3}
    kwargs = {**options, **walk}

    def call(h, w, b):
        return fastxent.linear_cross_entropy(h, w, target, b, **kwargs)

    with torch.autocast(**AUTOCAST):
        got = run(call, (hidden, weight, bias))
    by_hand = run(
        lambda h, w, b: call(*(x.to(torch.bfloat16) for x in (h, w, b))), (hidden, weight, bias)
    )
    for name, g, w in zip(("loss", "dh", "dW", "db"), got, by_hand, strict=True):
        if name in ("dW", "db"):
            # By hand ∂W and ∂b are rounded to bf16 (the weight's dtype there); under autocast
            # the walks hand over their float32 accumulators: equal up to that one rounding.
            g = g.bfloat16().float()
        assert torch.equal(g, w), name
    exact = oracle(*(x.to(torch.bfloat16) for x in (hidden, weight, bias)), target, **options)
    with torch.autocast(**AUTOCAST):
        eager = run(
            lambda h, w, b: torch_composed(
                F.linear(h, w, b).flatten(0, 1),
                target.flatten(),
                class_weight,
                label_smoothing=0.2,
                z_loss=1e-3,
            ),
            (hidden, weight, bias),
        )
    assert_within_baseline(got, eager, exact, 1e-2)


@pytest.mark.parametrize("backend", ["torch", "compiled", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_under_autocast_is_unchanged(backend, dtype):
    """cross_entropy computes as without autocast (float32 accumulation, the gradient in the
    logits' dtype), here with class weights and smoothing, whose z'·w is a matmul that CPU
    autocast would otherwise run in bf16: the same results bit for bit, and against the float64
    reference on the same logits the loss to 1e-5 relative (float32 sums) and each gradient
    entry within one rounding (2^-8 relative in bf16, 1e-6 in float32) plus 1e-5 of the largest.
    """
    g = torch.Generator().manual_seed(24)
    z = torch.randn(64, 3000, generator=g).to(dtype)
    target = torch.randint(0, 3000, (64,), generator=g)
    weight = torch.rand(3000, generator=g) + 0.5
    kwargs = {"weight": weight, "label_smoothing": 0.2, "z_loss": 1e-3, "backend": backend}

    def call(x):
        return fastxent.cross_entropy(x, target, **kwargs)

    want = run(call, (z,))
    with torch.autocast(**AUTOCAST):
        got = run(call, (z,))
    assert got[1].dtype == dtype
    for g_, w_ in zip(got, want, strict=True):
        assert torch.equal(g_, w_)
    ref_loss, ref_grad = reference.cross_entropy(
        z.double().numpy(),
        target.numpy(),
        weight.double().numpy(),
        label_smoothing=0.2,
        z_loss=1e-3,
    )
    assert abs(got[0].item() - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    u = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    assert rounding_excess(got[1], torch.from_numpy(ref_grad), u) <= 0.0


def test_mixed_dtypes_outside_autocast_say_how_to_fix_it():
    hidden, weight, _, target = make_case((4,), dim=8, num_classes=20, seed=25)
    with pytest.raises(TypeError, match=r"call it under torch\.autocast"):
        fastxent.linear_cross_entropy(hidden.bfloat16(), weight.float(), target)
    with torch.autocast(**AUTOCAST), pytest.raises(TypeError, match="not float64"):
        fastxent.linear_cross_entropy(hidden.float(), weight, target)  # autocast leaves f64


def test_module_under_autocast():
    """LinearCrossEntropyLoss on a float32 nn.Linear head under autocast: the head's .grad is
    float32, as with F.linear."""
    torch.manual_seed(26)
    head = torch.nn.Linear(16, 300)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    target = torch.randint(0, 300, (2, 5))
    with torch.autocast(**AUTOCAST):
        loss = fastxent.LinearCrossEntropyLoss(shift=True)(hidden, head.weight, target, head.bias)
        expected = F.cross_entropy(head(hidden)[:, :-1].flatten(0, 1), target[:, 1:].flatten())
    loss.backward()
    assert head.weight.grad.dtype == head.bias.grad.dtype == hidden.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)


def test_amp_example_trains_like_eager_pytorch():
    """examples/amp_lm_head.py: fastxent and eager PyTorch, trained side by side from the same
    start under bf16 autocast, give the same losses (bf16 matmuls: to 1e-3) as both fall."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "amp_lm_head.py"
    spec = importlib.util.spec_from_file_location("amp_lm_head", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.train(steps=12, device=torch.device("cpu"))
    for ours, theirs in history:
        assert abs(ours - theirs) <= 1e-3 * abs(theirs)
    assert history[-1][0] < history[0][0]
