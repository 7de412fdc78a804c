"""A property test of linear_cross_entropy against the float64 oracle: random shapes, options,
walks and required gradients (kept apart from test_linear.py, which the GPU image runs without
hypothesis)."""

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_linear import FUSED_OPS, assert_matches, make_case, oracle, ours, resolve


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.sampled_from([(1,), (5,), (17,), (2, 1), (3, 6)]),
    dim=st.integers(0, 6),
    num_classes=st.integers(1, 40),
    bias=st.booleans(),
    soft=st.booleans(),
    weighted=st.booleans(),
    shift=st.booleans(),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    eps=st.sampled_from([0.0, 0.3]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    softcap=st.sampled_from([None, 2.0]),
    scale=st.sampled_from([1.0, 0.7]),
    walk=st.sampled_from(
        [{"chunk_size": 1}, {"chunk_size": 4}, {"vocab_block": 3}, {"filter_eps": 0.0}, FUSED_OPS]
    ),
    needs=st.sampled_from([(True, True, True), (True, False, False), (False, True, True)]),
    offset=st.sampled_from([0.0, -200.0, 500.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(
    tokens, dim, num_classes, bias, soft, weighted, shift, reduction, eps, z_loss, softcap,
    scale, walk, needs, offset, seed,
):  # fmt: skip
    """Any mix of shapes (D = 0, V = 1, one token), options, walks and required gradients, with
    logits shifted by a large offset through the bias, equals the float64 oracle."""
    hidden, weight, b, target = make_case(tokens, dim, num_classes, soft, bias, seed)
    if b is not None:
        b = b + offset
    options = {
        "reduction": reduction,
        "label_smoothing": eps,
        "z_loss": z_loss,
        "softcap": softcap,
        "logit_scale": scale,
        "shift": shift,
        **resolve({"class_weight": "rand"} if weighted else {}, num_classes, seed),
    }
    rows = (*tokens[:-1], tokens[-1] - 1) if shift else tokens
    gen = torch.Generator().manual_seed(seed)
    go = torch.rand(rows, generator=gen, dtype=torch.float64) - 0.3 if reduction == "none" else None
    got = ours(hidden, weight, b, target, grad_output=go, needs=needs, **walk, **options)
    want = oracle(hidden, weight, b, target, grad_output=go, **options)
    assert got[0].shape == want[0].shape
    assert_matches(got, want)
