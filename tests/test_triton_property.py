"""A property test of the Triton kernel through the interpreter (random shapes, options,
offsets and strided inputs against the float64 reference). Kept apart from test_triton.py,
which must run where hypothesis is not installed (the GPU image: make test-triton-gpu-image).
"""

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_triton import (  # the fixtures: CPU calls interpreted, tiles of 128 columns
    _interpret_on_cpu,  # noqa: F401
    assert_fp32_close,
    interpreter,
    make_case,
    oracle,
    run,
    small_tiles,  # noqa: F401
)
from versions import tested_triton

pytestmark = [pytest.mark.usefixtures("small_tiles"), tested_triton]


@interpreter
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 4),
    v=st.integers(1, 300),
    soft=st.booleans(),
    weighted=st.booleans(),
    strided=st.booleans(),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    eps=st.sampled_from([0.0, 0.2]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    softcap=st.sampled_from([None, 4.0]),
    scale=st.sampled_from([1.0, 0.6]),
    offset=st.sampled_from([0.0, -300.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(
    n, v, soft, weighted, strided, reduction, eps, z_loss, softcap, scale, offset, seed
):
    """Random options on random shapes (several 128-column tiles), logits with a common offset,
    and (``strided``) logits, targets and weights as every other element of wider tensors."""
    z, target, weight = make_case(n, v, soft, seed=seed)
    z = z + offset
    weight = weight if weighted else None
    if strided:

        def spread(x):  # the same values, every other element of a tensor twice as wide
            return None if x is None else x.repeat_interleave(2, dim=-1)[..., ::2]

        z, weight = spread(z), spread(weight)
        target = spread(target) if soft else target.repeat_interleave(2)[::2]
    grad_output = torch.rand(n) + 0.5 if reduction == "none" else torch.tensor(0.7)
    kw = dict(reduction=reduction, label_smoothing=eps, z_loss=z_loss, softcap=softcap,
              logit_scale=scale)  # fmt: skip
    loss, grad = run(z, target, weight, grad_output, **kw)
    want_loss, want_grad = oracle(z, target, weight, grad_output, **kw)
    assert_fp32_close(loss, want_loss)
    assert_fp32_close(grad, want_grad)
