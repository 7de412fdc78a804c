"""The float64 oracle against PyTorch's autograd, and the documented formulas against the oracle."""

import doctest
import inspect
import re

import numpy as np
import pytest
import torch

import fastxent
from fastxent import reference
from fastxent.check import derivation_steps, torch_composed

EXTRAS = [
    {},
    {"z_loss": 1e-2},
    {"softcap": 5.0, "logit_scale": 0.7},
    {"z_loss": 1e-3, "softcap": 2.0, "logit_scale": 1.3},
]


@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("soft", [False, True])
def test_reference_matches_torch_autograd(extras, reduction, soft):
    """Loss and gradient of the NumPy reference equal PyTorch autograd to 1e-12 (float64)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 9, 3, generator=g, dtype=torch.float64) * 3
    if soft:
        target = torch.rand(6, 9, 3, generator=g, dtype=torch.float64)
    else:
        target = torch.randint(0, 9, (6, 3), generator=g)
        target[0, 0] = -100
    weight = torch.rand(9, generator=g, dtype=torch.float64)
    grad_output = torch.rand(6, 3, dtype=torch.float64) if reduction == "none" else 0.7

    theirs = z.clone().requires_grad_()
    loss = torch_composed(
        theirs, target, weight, reduction=reduction, label_smoothing=0.2, **extras
    )
    loss.backward(torch.as_tensor(grad_output, dtype=torch.float64).expand_as(loss))
    want_loss, want_grad = reference.cross_entropy(
        z.numpy(),
        target.numpy(),
        weight.numpy(),
        reduction=reduction,
        label_smoothing=0.2,
        grad_output=np.asarray(grad_output),
        **extras,
    )
    np.testing.assert_allclose(want_loss, loss.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(want_grad, theirs.grad.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("soft", [False, True])
def test_linear_reference_matches_torch_autograd(shift, reduction, soft):
    """reference.linear_cross_entropy (loss, ∂h, ∂W, ∂b) equals PyTorch's F.linear, then
    F.cross_entropy and the z-loss, through autograd (float64, 1e-12), (B, T, D) hidden."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(11, generator=g, dtype=torch.float64)
    if soft:
        target = torch.rand(2, 5, 11, generator=g, dtype=torch.float64)
    else:
        target = torch.randint(0, 11, (2, 5), generator=g)
        target[0, 2] = -100
    class_weight = torch.rand(11, generator=g, dtype=torch.float64) + 0.5
    options = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2}
    rows = (2, 4) if shift else (2, 5)
    grad_output = torch.rand(rows, generator=g, dtype=torch.float64) if reduction == "none" else 1.3

    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    h, y = (leaves[0][:, :-1], target[:, 1:]) if shift else (leaves[0], target)
    z = torch.nn.functional.linear(h, *leaves[1:])  # (2, T, 11)
    loss = torch_composed(z.flatten(0, 1), y.flatten(0, 1), class_weight, **options)
    loss = loss.reshape(rows) if reduction == "none" else loss
    loss.backward(torch.as_tensor(grad_output, dtype=torch.float64).expand_as(loss))

    got = reference.linear_cross_entropy(
        *(x.numpy() for x in (hidden, weight, bias, target)), shift=shift,
        class_weight=class_weight.numpy(), grad_output=np.asarray(grad_output), **options,
    )  # fmt: skip
    for name, mine, want in zip(
        ("loss", "dh", "dW", "db"), got, (loss, *(x.grad for x in leaves)), strict=True
    ):
        np.testing.assert_allclose(
            mine, want.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=name
        )


def test_general_gradient_is_not_o_minus_y():
    """For targets summing to 2, ∂E/∂z = o·Σy - y, which differs from o - y."""
    z = np.array([[1.0, -0.5, 2.0]])
    y = np.array([[0.5, 1.0, 0.5]])  # Σy = 2
    _, grad = reference.cross_entropy(z, y, reduction="sum")
    o = reference.softmax(z)
    np.testing.assert_allclose(grad, o * 2.0 - y, rtol=1e-14)
    assert np.abs(grad - (o - y)).max() > 0.1


def test_all_ignored_gives_zero_not_nan():
    loss, grad = reference.cross_entropy(np.ones((3, 4)), np.full(3, -100))
    assert loss == 0.0
    assert not grad.any()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ignored_row_with_non_finite_logits_adds_nothing(bad, reduction):
    """As in PyTorch's nll_loss (and fastxent): an ignored row's logits never reach the loss."""
    z = np.random.default_rng(0).normal(size=(4, 5))
    z[1, 2] = bad
    target = np.array([0, -100, 3, 4])
    loss, _ = reference.cross_entropy(z, target, reduction=reduction)
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(z), torch.from_numpy(target), reduction=reduction
    )
    np.testing.assert_allclose(loss, want.numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    ("soft", "label_smoothing", "weight"),
    [(False, 0.0, None), (False, 0.1, None), (False, 0.0, [1.0, 0.0, 2.0]), (True, 0.0, None)],
)
def test_minus_inf_logits_as_in_pytorch(soft, label_smoothing, weight):
    """A -inf non-target logit adds nothing for class indices (PyTorch gathers log o_y; the
    oracle gave NaN from 0·(-inf)); with smoothing the loss is inf, and with probability
    targets 0·(-inf) is NaN, as in PyTorch. Row 1's target logit is -inf itself."""
    z = np.array([[1.0, -np.inf, 0.5], [-np.inf, 0.2, 0.3]])
    target = np.array([[0.6, 0.0, 0.4], [0.5, 0.5, 0.0]]) if soft else np.array([0, 0])
    w = None if weight is None else np.array(weight)
    loss, grad = reference.cross_entropy(
        z, target, w, reduction="none", label_smoothing=label_smoothing
    )
    zt = torch.from_numpy(z).requires_grad_()
    want = torch.nn.functional.cross_entropy(
        zt, torch.from_numpy(target), None if w is None else torch.from_numpy(w),
        reduction="none", label_smoothing=label_smoothing,
    )  # fmt: skip
    np.testing.assert_allclose(loss, want.detach().numpy(), rtol=1e-12)
    want[0].backward()  # row 0's gradient (row 1's loss is inf or NaN)
    np.testing.assert_allclose(grad[0], zt.grad[0].numpy(), rtol=1e-12, atol=1e-15)


def test_derivation_is_proved_by_sympy():
    steps = derivation_steps()
    assert len(steps) == 5
    assert all(proved for _, proved in steps), steps


def test_docstring_examples_run():
    """The runnable examples in the public docstrings give the printed results."""
    for obj in (fastxent.functional.cross_entropy, fastxent.modules.CrossEntropyLoss):
        for test in doctest.DocTestFinder().find(obj):
            result = doctest.DocTestRunner().run(test)
            assert result.failed == 0, test.name


def _cross_entropy(q):  # -Σ_j t_j log o_j + s·lse²
    return -(q["t"] * np.log(q["o"])).sum() + q["s"] * q["lse"] ** 2


def _gradient(q):  # o_i Σ_j t_j - t_i + 2 s·lse·o_i
    return q["o"] * q["t"].sum() - q["t"] + 2 * q["s"] * q["lse"] * q["o"]


# Every equation the docstrings' ``.. math::`` blocks state, as written there (split at \qquad and
# \\, spacing normalised by ``math_equations``), beside its NumPy transcription for one row: the
# quantity it defines and how, from the row's z, t, s, c, α and the quantities defined above it.
DOCUMENTED = {
    r"z'_j = c \tanh(\alpha z_j / c) \quad\text{(softcap } c\text{; just } \alpha z_j "
    r"\text{ without it)}": ("zp", lambda q: q["c"] * np.tanh(q["alpha"] * q["z"] / q["c"])),
    r"\mathrm{lse} = \log \sum_k e^{z'_k}": ("lse", lambda q: np.log(np.exp(q["zp"]).sum())),
    r"o_j = e^{z'_j - \mathrm{lse}}": ("o", lambda q: np.exp(q["zp"] - q["lse"])),
    r"o_j = \frac{e^{z'_j}}{\sum_k e^{z'_k}}": (
        "o",
        lambda q: np.exp(q["zp"]) / np.exp(q["zp"]).sum(),
    ),
    r"E = -\sum_j t_j \log o_j + s \mathrm{lse}^2": ("loss", _cross_entropy),
    r"\ell = -\sum_j t_j \log o_j + s \mathrm{lse}^2": ("loss", _cross_entropy),
    r"\frac{\partial E}{\partial z'_i} = o_i \sum_j t_j - t_i + 2 s \mathrm{lse} o_i": (
        "grad",
        _gradient,
    ),
    r"\frac{\partial \ell}{\partial z'_i} = o_i \sum_j t_j - t_i + 2 s \mathrm{lse} o_i": (
        "grad",
        _gradient,
    ),
}


def math_equations(doc: str) -> list[str]:
    r"""The equations of every ``.. math::`` block in ``doc``: split at ``\qquad`` and ``\\``,
    without alignment ``&``, ``\textstyle`` or trailing commas, thin spaces ``\,`` as spaces."""
    equations, block, indent = [], None, 0
    for line in [*inspect.cleandoc(doc).splitlines(), "."]:
        depth = len(line) - len(line.lstrip())
        if block is not None and (not line.strip() or depth > indent):
            block.append(line)
            continue
        if block is not None:
            text = re.sub(r"&|\\textstyle", "", " ".join(block)).replace(r"\,", " ")
            for part in re.split(r"\\qquad|\\\\", text):
                equations.append(" ".join(part.split()).rstrip(","))
            block = None
        if line.strip() == ".. math::":
            block, indent = [], depth
    return [e for e in equations if e]


@pytest.mark.parametrize(
    "documented", [fastxent.functional.cross_entropy, reference], ids=["cross_entropy", "reference"]
)
def test_docstring_formula_matches_reference(documented):
    """The loss and gradient in the docstring's ``.. math::`` block, read from ``__doc__`` and
    evaluated through DOCUMENTED (so a changed sign is an equation this test does not know),
    equal the oracle's to 1e-13 for one row with every option, as does its effective target."""
    if documented.__doc__ is None:
        pytest.skip("docstrings stripped (python -OO)")
    equations = math_equations(documented.__doc__)
    unknown = [e for e in equations if e not in DOCUMENTED]
    assert not unknown, f"documented but not transcribed in DOCUMENTED: {unknown}"
    names = [DOCUMENTED[e][0] for e in equations]
    assert "loss" in names and "grad" in names, equations
    # The effective target, stated in prose: t = (1-ε) w_y e_y + (ε/C) w (p classes in reference).
    assert re.search(r"``t = \(1-ε\) w_y e_y \+ \(ε/[Cp]\) w``", documented.__doc__)

    rng = np.random.default_rng(0)
    z, y, w = rng.normal(size=(1, 5)) * 3, np.array([2]), rng.random(5) + 0.5
    eps, s, c, alpha = 0.1, 0.01, 2.0, 1.3
    t = (1 - eps) * w[2] * np.eye(5)[2] + eps / 5 * w
    zp = c * np.tanh(alpha * z[0] / c)  # as the prose defines z' where no equation does
    q = {"z": z[0], "t": t, "s": s, "c": c, "alpha": alpha, "zp": zp}
    q |= {"lse": reference.logsumexp(zp), "o": reference.softmax(zp)}
    for equation, (name, value) in DOCUMENTED.items():  # in order: each uses those above it
        if equation in equations:
            q[name] = value(q)
    loss, grad = reference.cross_entropy(
        z, y, w, reduction="sum", label_smoothing=eps, z_loss=s, softcap=c, logit_scale=alpha
    )
    np.testing.assert_allclose(q["loss"], loss, rtol=1e-13)
    dzp_dz = alpha * (1 - (q["zp"] / c) ** 2)  # the chain rule through the softcap
    np.testing.assert_allclose(q["grad"] * dzp_dz, grad[0], rtol=1e-13)
