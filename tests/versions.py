"""Skips for tests of what older releases lack: the package admits torch>=2.4 (and the Triton
that comes with it), the suite is written against torch 2.13. Each condition tests the feature,
or the version that brought it."""

import ctypes
import ctypes.util

import numpy as np
import pytest
import torch

from fastxent import _autograd
from fastxent._compiled import inductor_flushes_subnormals, unavailable_reason
from fastxent._options import major_minor
from fastxent._torch import composed

TORCH = major_minor(torch.__version__)


def newer_torch(version: tuple[int, int], why: str):
    """Skip below torch ``version``, for ``why``."""
    return pytest.mark.skipif(version > TORCH, reason=why)


# the gradient buffer handed to autograd in place (without saved-tensor hooks to ask about, as
# before torch 2.8, every backward scales into a new tensor)
folds_in_place = pytest.mark.skipif(
    _autograd._top_saved_hooks is None,
    reason="this torch cannot tell whether saved-tensor hooks are active: no in-place fold",
)
exports_a_dynamic_batch = pytest.mark.skipif(
    not hasattr(torch.compiler, "is_exporting"),
    reason="torch.compiler.is_exporting (torch 2.7) tells fastxent not to fix the batch size",
)
# 2.7's strict export traces with dynamo before it sets the export flag, and its dynamo folds
# torch.compiler.is_exporting() to True under torch.compile too: export looks like compile there
strict_export_sets_the_flag = newer_torch(
    (2, 8), "before torch 2.8 strict export's dynamo stage runs without the export flag"
)
graph_break_has_a_reason = newer_torch(
    (2, 8), "torch.compiler.disable takes a reason from torch 2.8"
)
# inductor keeps torch._assert_async in a compiled graph (it dropped it before 2.9): small calls
# traced by torch.compile check their class indices in the graph
graph_keeps_asserts = pytest.mark.skipif(
    not composed.GRAPH_KEEPS_ASSERTS, reason="inductor drops torch._assert_async before 2.9"
)
COMPILED_UNAVAILABLE = unavailable_reason(torch.device("cpu"))
compiled_backend = pytest.mark.skipif(
    COMPILED_UNAVAILABLE is not None, reason=f"compiled backend: {COMPILED_UNAVAILABLE}"
)


# inductor before 2.13 fails to build several of the compiled kernel's in-place-gradient
# variants (2.8, 2.11 and 2.12 measured: label smoothing, softcap, a bf16 logit scale; "KeyError
# 'bufN'"): fastxent warns once and runs them on the portable kernel, which the build and
# memory tests of those variants do not allow.
builds_inplace_variants = newer_torch(
    (2, 13), "inductor before 2.13 fails to build in-place variants (portable fallback)"
)


def _triton_reason() -> str | None:
    try:
        import triton
    except ImportError:
        return None  # the Triton tests skip on their own
    from fastxent._triton import version_problem

    return version_problem(triton.__version__)


TRITON_TOO_OLD = _triton_reason()
tested_triton = pytest.mark.skipif(TRITON_TOO_OLD is not None, reason=str(TRITON_TOO_OLD))


INDUCTOR_FLUSHES_SUBNORMALS = inductor_flushes_subnormals()


def flushes_subnormals() -> bool:
    """Whether this thread flushes subnormal results to zero (the CPU's FTZ flag)."""
    return bool(np.float32(1e-38) * np.float32(1e-3) == 0)


def restore_default_float_environment() -> None:
    """C's ``fesetenv(FE_DFL_ENV)`` in this thread: glibc's default environment (FE_DFL_ENV is
    ``(const fenv_t *) -1``) clears the SSE flush-to-zero and denormals-are-zero flags."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    if libm.fesetenv(ctypes.c_void_p(-1)) != 0 or flushes_subnormals():
        raise RuntimeError("fesetenv(FE_DFL_ENV) did not bring subnormal numbers back")
