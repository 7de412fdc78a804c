"""Every bad input raises a clear error that names the problem."""

import pytest
import torch

import fastxent

Z = torch.randn(4, 5)
T = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": torch.tensor([0, 1, 7, 3])}, IndexError, r"target\[2\] = 7 is out of range"),
        ({"target": torch.tensor([0, 1, 7, 3])}, IndexError, r"has 5 classes.*\[0, 4\]"),
        ({"target": torch.tensor([0, -1, 2, 3])}, IndexError, r"\[1\] = -1 .*index \(-100\)"),
        ({"target": torch.tensor([0, 1, 2])}, ValueError, r"index targets must have shape \(4,\)"),
        ({"target": torch.rand(4, 6)}, ValueError, r"probability targets must have shape \(4, 5\)"),
        ({"target": T.float()}, ValueError, r"\(input of shape \(4, 5\), classes on dim 1\)"),
        ({"target": torch.tensor([True, False, True, True])}, TypeError, "indices .* torch.bool"),
        ({"target": [0, 1, 2, 3]}, TypeError, "target must be a torch.Tensor, got list"),
        ({"input": torch.randint(0, 5, (4, 5))}, TypeError, "floating-point tensor.*int64"),
        ({"input": torch.tensor(1.0)}, ValueError, "must have a class dimension"),
        ({"input": torch.randn(4, 0)}, ValueError, r"shape \(4, 0\) has no classes"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\]"),
        ({"weight": torch.ones(4)}, ValueError, r"weight must have shape \(5,\).*got shape \(4,\)"),
        ({"weight": torch.ones(5, dtype=torch.long)}, TypeError, "weight must be floating point"),
        ({"weight": torch.ones(5, requires_grad=True)}, ValueError, r"weight\.detach\(\)"),
        ({"reduction": "average"}, ValueError, r"reduction must be one of .*'average'"),
        ({"softcap": -1.0}, ValueError, "softcap must be None .* > 0, got -1.0"),
        ({"softcap": 0.0}, ValueError, "softcap must be None"),
        ({"z_loss": -1e-4}, ValueError, "z_loss must be a finite number >= 0"),
        ({"logit_scale": 0.0}, ValueError, "logit_scale must be a finite non-zero"),
        ({"logit_scale": None}, TypeError, "logit_scale must be a number, got NoneType"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a number, got str"),
        ({"z_loss": True}, TypeError, "z_loss must be a number, got bool"),
        ({"softcap": "30"}, TypeError, r"softcap must be a number or None \(off\), got str"),
        ({"label_smoothing": torch.tensor([0.1])}, TypeError, "label_smoothing must be a numb"),
        ({"z_loss": torch.tensor(1e-3, requires_grad=True)}, TypeError, r"z_loss is not diff"),
        ({"logit_scale": torch.tensor(True)}, TypeError, "logit_scale must be a number, got T"),
        ({"softcap": torch.tensor(-1.0)}, ValueError, "softcap must be None .* > 0, got -1.0"),
        ({"target": torch.rand(4, 5), "ignore_index": 3}, ValueError, "ignore_index is only"),
        ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
        ({"ignore_index": None}, TypeError, "ignore_index must be an int .* NoneType None"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int .* float 1.5"),
        ({"ignore_index": "1"}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int, got True"),
        ({"ignore_index": 2**63}, ValueError, "ignore_index must fit in int64"),
        ({"ignore_index": -(2**63) - 1}, ValueError, "ignore_index must fit in int64"),
        ({"inplace_backward": "False"}, TypeError, "inplace_backward must be True or False, got"),
        ({"inplace_backward": 1}, TypeError, "inplace_backward must be True or False, got int 1"),
        ({"weight": torch.ones(5, device="meta")}, ValueError, r"on meta but input is on cpu; "),
        ({"weight": torch.ones(5, device="meta")}, ValueError, r"with weight.to\(input.device\)"),
        ({"target": T.to("meta")}, ValueError, r"target is on meta but input is on cpu"),
        ({"target": torch.zeros(4, 5, dtype=torch.long)}, ValueError, r"as floats, target\.float"),
        (
            {"input": torch.randn(2, 3, 5), "target": torch.zeros(2, 3, dtype=torch.long)},
            ValueError,
            r"got \(2, 3\); with the classes last, .* input\.reshape\(-1, 5\) and target\.resh",
        ),
        (
            {"input": torch.randn(4), "target": T},
            ValueError,
            r"got \(4,\); input of shape \(4,\) is one row of 4 classes: for N rows pass \(N, C\)"
            r".*binary_cross_entropy_with_logits, and for a one-hot row pass target\.float\(\)\.$",
        ),
        ({"target": torch.rand(4, 5, device="meta")}, ValueError, r"target is on meta but input"),
    ],
)  # fmt: skip
def test_bad_input_raises(kwargs, error, match):
    call = {"input": Z, "target": T, **kwargs}
    with pytest.raises(error, match=match):
        fastxent.cross_entropy(**call)


def test_out_of_range_target_names_its_position_in_nd_input():
    z = torch.randn(2, 5, 3, 4)
    target = torch.zeros(2, 3, 4, dtype=torch.long)
    target[1, 2, 0] = 9
    with pytest.raises(IndexError, match=r"target\[1, 2, 0\] = 9"):
        fastxent.cross_entropy(z, target)


def test_ignore_index_outside_the_range_is_not_an_error():
    loss = fastxent.cross_entropy(Z, torch.tensor([0, 1, 999, 3]), ignore_index=999)
    assert torch.isfinite(loss)


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastxent.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fastxent.CrossEntropyLoss(backend="nope")


def test_ignore_index_accepts_numpy_and_tensor_integers():
    import numpy as np

    want = fastxent.cross_entropy(Z, T, ignore_index=1)
    for index in (np.int64(1), torch.tensor(1)):
        torch.testing.assert_close(fastxent.cross_entropy(Z, T, ignore_index=index), want)


@pytest.mark.parametrize("backend", ["auto", "torch", "compiled"])
def test_float_options_accept_0_dim_tensors_as_pytorch_does(backend):
    """PyTorch's loss takes a 0-dim tensor for label_smoothing (its float argument): the value
    is read, as for a Python float, by the functions, the modules and the linear form."""
    options = {"label_smoothing": 0.25, "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 0.5}
    as_tensors = {name: torch.tensor(value) for name, value in options.items()}
    as_tensors["label_smoothing"] = torch.tensor(0.25, dtype=torch.float64)
    calls = [
        lambda **o: fastxent.cross_entropy(Z, T, backend=backend, **o),
        lambda **o: fastxent.CrossEntropyLoss(backend=backend, **o)(Z, T),
        lambda **o: fastxent.linear_cross_entropy(
            Z, torch.eye(5), T, chunk_size=2, backend=backend, **o
        ),
    ]
    for call in calls:
        torch.testing.assert_close(call(**as_tensors), call(**options), rtol=0, atol=0)
    smoothed = torch.nn.functional.cross_entropy(Z, T, label_smoothing=0.25)
    torch.testing.assert_close(fastxent.cross_entropy(Z, T, label_smoothing=torch.tensor(0.25)),
                               smoothed, rtol=1e-6, atol=1e-7)  # fmt: skip


def test_linear_and_module_check_ignore_index():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastxent.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), T, ignore_index=None)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastxent.CrossEntropyLoss(ignore_index=0.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastxent.LinearCrossEntropyLoss(ignore_index="x")


def test_class_weight_requiring_grad_is_refused_by_linear():
    weight = torch.ones(5, requires_grad=True)
    with pytest.raises(ValueError, match=r"class_weight\.detach\(\)"):
        fastxent.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), T, class_weight=weight)
    with torch.no_grad():  # no graph, nothing to refuse
        fastxent.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), T, class_weight=weight)


def test_a_bad_target_on_the_fused_ops_path_gets_fastxents_error_alone():
    """Small CPU calls leave the range check to PyTorch's ops; their IndexError is replaced by
    fastxent's, which names the position, with no PyTorch traceback chained to it."""
    with pytest.raises(IndexError, match=r"target\[2\] = 7 is out of range") as info:
        fastxent.cross_entropy(Z, torch.tensor([0, 1, 7, 3]))
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_a_bad_target_on_the_linear_fused_ops_path_names_its_position():
    """The small-call linear path too: PyTorch's IndexError becomes fastxent's, shift counted."""
    target = torch.randint(0, 5, (2, 4))
    target[1, 2] = 9
    with pytest.raises(IndexError, match=r"target\[1, 2\] = 9 is out of range") as info:
        fastxent.linear_cross_entropy(torch.randn(2, 4, 3), torch.randn(5, 3), target, shift=True)
    assert info.value.__context__ is None


@pytest.mark.parametrize("backend", ["auto", "torch", "compiled", "triton"])
@pytest.mark.parametrize(
    ("dtype", "bad", "ignore_index"),
    [(torch.int32, -1, 2**32 - 1), (torch.uint8, 156, -100), (torch.int8, -100, 156)],
)
def test_narrow_integer_targets_are_checked_as_int64(backend, dtype, bad, ignore_index):
    """The kernels read class indices as int64, so the range check compares in int64 too: in the
    targets' own dtype an ignore_index beyond its range wraps (-100 is 156 in uint8, 2^32 - 1 is
    -1 in int32) and a bad target passed as ignored (the compiled kernel then returned a loss).
    """
    target = torch.tensor([0, 1, 2, 3], dtype=torch.int64)
    target[1] = bad
    target = target.to(dtype)
    with pytest.raises(IndexError, match=r"target\[1\] = .* is out of range"):
        fastxent.cross_entropy(Z.double(), target, ignore_index=ignore_index, backend=backend)


@pytest.mark.skipif(not hasattr(torch, "uint64"), reason="no uint64 before PyTorch 2.3")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_uint64_targets_are_refused_as_int64_cannot_hold_them(backend):
    """2**64 - 100 read as int64 is -100: it passed as ignored and its row's loss was 0."""
    target = torch.tensor([0, 1, 2**64 - 100, 3], dtype=torch.uint64)
    with pytest.raises(TypeError, match=r"got torch.uint64 \(int64 cannot hold all of uint64"):
        fastxent.cross_entropy(Z, target, backend=backend)
    with pytest.raises(TypeError, match=r"got torch.uint64 \(int64 cannot hold all of uint64"):
        fastxent.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), target, backend=backend)


def test_modules_check_inplace_backward_and_devices():
    with pytest.raises(TypeError, match="inplace_backward must be True or False, got str"):
        fastxent.CrossEntropyLoss(inplace_backward="yes")
    loss_fn = fastxent.CrossEntropyLoss(torch.ones(5)).to("meta")
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        loss_fn(Z, T)


def test_linear_checks_the_devices_of_target_and_class_weight():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="target is on meta but hidden is on cpu"):
        fastxent.linear_cross_entropy(hidden, weight, T.to("meta"))
    with pytest.raises(ValueError, match="class_weight is on meta but hidden is on cpu"):
        fastxent.linear_cross_entropy(hidden, weight, T, class_weight=torch.ones(5, device="meta"))
