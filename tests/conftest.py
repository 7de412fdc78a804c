"""Shared test set-up: the ``gpu`` marker skips without CUDA; without CUDA, Triton interprets;
each test starts from the same global random state, and ends with subnormal numbers on; the
``shapes_passed_to`` fixture records calls.

Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test
module (or torch.compile) can import it: the Triton kernels then run on CPU tensors.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import versions  # imports triton, so after the line above


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip without CUDA; cases parametrised with ``backend="compiled"`` or
    ``"triton"`` skip where that backend is refused for its version (torch 2.4, triton < 3.6:
    see tests/versions.py)."""
    gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if gpu is not None and "gpu" in item.keywords:
            item.add_marker(gpu)
        callspec = getattr(item, "callspec", None)
        backend = None if callspec is None else callspec.params.get("backend")
        if backend in ("compiled", "triton"):
            item.add_marker(
                versions.compiled_backend if backend == "compiled" else versions.tested_triton
            )


@pytest.fixture(autouse=True)
def same_random_draws():
    """Every test starts from the same global RNG state. torch seeds its default generator
    from the OS in each process, so a test that draws without a generator of its own saw new
    values on every run: one with too tight a tolerance failed one run in three, unnoticed."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def subnormals_kept():
    """After a test, subnormal numbers work again in this thread. The inductor of torch 2.4 and
    2.5 built its C++ with -ffast-math, whose start-up code turns on flush-to-zero in the thread
    that loads a compiled kernel (pytorch/pytorch #126848): every later test inherited it,
    Hypothesis then refused to draw floats. Only there: on later releases a test that leaves
    them off should show in the tests after it (it would mean fastxent or inductor turned them
    off)."""
    yield
    if versions.INDUCTOR_FLUSHES_SUBNORMALS and versions.flushes_subnormals():
        versions.restore_default_float_environment()


@pytest.fixture
def shapes_passed_to(monkeypatch):
    """``shapes_passed_to(module, name)``: a list that gets the shape of the first argument of
    every later call to ``module.name``, which still runs."""

    def record(module, name: str) -> list:
        shapes, original = [], getattr(module, name)

        def recorded(*args, **kwargs):
            shapes.append(tuple(args[0].shape))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)
        return shapes

    return record
