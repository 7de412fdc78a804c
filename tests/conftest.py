"""Shared test set-up: the ``gpu`` marker skips without CUDA; without CUDA, Triton interprets.

Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test
module (or torch.compile) can import it: the Triton kernels then run on CPU tensors.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
