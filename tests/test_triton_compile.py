"""The Triton kernels compile to GPU machine code (cubin for Hopper and Ampere) without a GPU.

The interpreter runs the kernels' Python on CPU tensors but never runs Triton's code generator;
this compiles them ahead of time for real targets, with the ptxas that ships with triton, so a
kernel that only the interpreter accepts fails here.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from versions import tested_triton

pytestmark = tested_triton

SCRIPT = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastxent._triton import kernels

    kernel = kernels.cross_entropy_rows_kernel
    names = kernel.arg_names
    flags = ["SOFT", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP", "HAS_SCALE",
             "WRITE_GRAD"]
    variants = [  # (dtype of z, flags on)
        ("bf16", {"WRITE_GRAD"}),
        ("bf16", {"HAS_WEIGHT", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP", "WRITE_GRAD"}),
        ("fp16", {"HAS_SMOOTHING", "HAS_SCALE", "WRITE_GRAD"}),
        ("fp32", {"SOFT", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_Z_LOSS", "WRITE_GRAD"}),
        ("fp32", set()),
    ]
    compiled = 0
    for (dtype, on), (arch, warps) in itertools.product(variants, [(90, 8), (80, 8)]):
        soft = "SOFT" in on
        signature = {
            "z_ptr": f"*{dtype}", "z_stride": "i64",
            "target_ptr": "*fp32" if soft else "*i64", "target_stride": "i64",
            "weight_ptr": "*fp32", "grad_ptr": f"*{dtype}", "grad_stride": "i64",
            "rows_ptr": "*fp32", "ce_scale_ptr": "*fp32", "z_scale_ptr": "*fp32", "V": "i32",
            "ignore_index": "i64", "keep": "fp32", "spread": "fp32", "z_loss": "fp32",
            "softcap": "fp32", "logit_scale": "fp32",
        }
        constants = {flag: flag in on for flag in flags} | {"BLOCK": 4096}
        signature |= {name: "constexpr" for name in constants}
        source = ASTSource(
            fn=kernel, signature=signature,
            constexprs={(names.index(k),): v for k, v in constants.items()},
        )
        out = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": warps})
        assert len(out.asm["cubin"]) > 0
        if "WRITE_GRAD" in on and not soft:  # z_y is read by every thread after pass 1: a
            # barrier between the row loss's store and the first gradient store orders it
            lines = out.asm["ptx"].splitlines()
            stores = [i for i, line in enumerate(lines) if "st.global" in line]
            barriers = [i for i, line in enumerate(lines) if "bar.sync" in line]
            assert any(stores[0] < i < stores[1] for i in barriers), (dtype, sorted(on))
        compiled += 1
    scale = kernels.scale_unless_one_kernel
    for dtype, arch in itertools.product(["bf16", "fp32"], [90, 80]):
        signature = {"x_ptr": f"*{dtype}", "factor_ptr": "*fp32", "numel": "i64",
                     "BLOCK": "constexpr"}
        source = ASTSource(fn=scale, signature=signature,
                           constexprs={(scale.arg_names.index("BLOCK"),): 4096})
        out = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
        assert len(out.asm["cubin"]) > 0
        compiled += 1
    print("compiled", compiled)
    """
)


def test_kernels_compile_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 14" in result.stdout
