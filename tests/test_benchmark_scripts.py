"""The CPU scripts under benchmarks/ that back figures in BENCHMARKS.md run, on tiny shapes.

They are run by hand, so nothing else notices when a change breaks them. Their timings are not
checked (none can be, in a test); what is checked is that they finish, that the errors against
float64 they print are bounded, and that the filter script's own account of skipped blocks
agrees with what the library does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import fastxent
from versions import builds_inplace_variants, compiled_backend

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import kernel_memory  # noqa: E402
import linear_autocast  # noqa: E402
import linear_chunks  # noqa: E402
import linear_filter  # noqa: E402
import row_buffer  # noqa: E402
import row_passes  # noqa: E402
import small_logits  # noqa: E402
import softcap_tanh  # noqa: E402
import split_gradient  # noqa: E402
import varying_batch  # noqa: E402


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        (
            linear_chunks,
            ["--n", "64", "--d", "16", "--v", "512", "--chunks", "16,0", "--bare", "--torch-mm"],
        ),
        (linear_chunks, ["--n", "40", "--d", "8", "--v", "96", "--chunks", "16", "--tiles", "32"]),
        (linear_chunks, ["--n", "40", "--d", "8", "--v", "96", "--chunks", "16", "--products"]),
        (linear_filter, ["--n", "64", "--d", "16", "--v", "512", "--probs", "1e-2"]),
        (row_buffer, ["--n", "64", "--v", "512", "--dtype", "float32"]),
        pytest.param(
            small_logits, ["--shapes", "8x16,4x64", "--calls", "2"], marks=compiled_backend
        ),
        pytest.param(
            small_logits,
            ["--shapes", "8x16", "--calls", "2", "--linear-dim", "4"],
            marks=compiled_backend,
        ),
        (row_passes, ["--n", "8", "--v", "300", "--graphs", "head shift,two graphs"]),
        (split_gradient, ["--n", "8", "--v", "300", "--options"]),
        pytest.param(
            varying_batch,
            ["--v", "2048", "--n-min", "128", "--n-max", "300", "--steps", "5"],
            marks=compiled_backend,
        ),
    ],
    ids=[
        "linear_chunks",
        "linear_chunks_tiled",
        "linear_chunks_products",
        "linear_filter",
        "row_buffer",
        "small_logits",
        "small_logits_linear",
        "row_passes",
        "split_gradient",
        "varying_batch",
    ],
)
def test_script_runs_on_tiny_shapes(script, flags, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script.__file__, *flags, "--rounds", "1"])
    script.main()  # in this process: torch.compile's start-up is paid once per test session
    assert "× " in capsys.readouterr().out


@compiled_backend
def test_softcap_script_reports_float32_errors(monkeypatch, capsys):
    """The loss and gradient errors it prints (against float64 PyTorch) are float32 rounding:
    relative loss <= 1e-6, gradient max |Δ| / max |ref| <= 2e-6 (8e-9 and 2e-7 measured)."""
    flags = ["--n", "8", "--v", "300", "--rounds", "1"]
    monkeypatch.setattr(sys, "argv", [softcap_tanh.__file__, *flags])
    softcap_tanh.main()
    out = capsys.readouterr().out
    found = re.search(r"× \S+\); errors loss (\S+), grad (\S+)$", out.strip())
    assert found, out
    loss_err, grad_err = (float(x) for x in found.groups())
    assert loss_err <= 1e-6 and grad_err <= 2e-6, out  # NaN fails too


@compiled_backend  # the scripts below time or measure the compiled backend
def test_varying_batch_outlier_reports_both_methods(monkeypatch, capsys):
    flags = ["--v", "2048", "--n-min", "128", "--outlier", "600", "--steps", "2"]
    monkeypatch.setattr(sys, "argv", [varying_batch.__file__, *flags])
    varying_batch.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["F.cross_entropy", "fastxent"]
    assert all("MiB held after 2 steps of N=128" in line for line in lines)


@pytest.mark.parametrize(
    "shape",
    [("32", "8", "256"), ("640", "8", "1024")],
    ids=["composed", "walk"],  # 2^13 logits: PyTorch's ops; 640·1024 > 2^19: the chunked walk
)
def test_autocast_script_runs_on_tiny_shapes(shape, capsys):
    """Both rows, each with its peak memory from a fresh process and its errors against
    float64: fastxent's loss, ∂h and ∂W errors at most eager's plus one bf16 rounding (2^-8)."""
    n, d, v = shape
    linear_autocast.main(["--n", n, "--d", d, "--v", v, "--rounds", "1"])
    out = capsys.readouterr().out
    rows = {row[0]: [float(x) for x in row[1:]] for row in map(str.split, out.splitlines()[-2:])}
    assert list(rows) == ["fastxent", "eager"], out
    for row in rows.values():
        assert len(row) == 5 and all(x >= 0 for x in row), out  # time, MiB, 3 errors
    errors = zip(("loss", "dh", "dW"), rows["fastxent"][2:], rows["eager"][2:], strict=True)
    for name, mine, eager in errors:
        assert mine <= eager + 2**-8, (name, out)


def test_filter_script_counts_the_blocks_the_library_skips():
    """All blocks kept: the filtered gradients are the exact ones; some skipped: they differ."""
    gen = torch.Generator().manual_seed(0)
    h, w, y = linear_filter.peaked_inputs(64, 64, 2048, 1.1, 20.0, gen)
    exact = _grads(h, w, y, None)
    for prob in (1e-12, 1e-3):
        eps = prob / h.shape[0]
        kept = linear_filter.kept_fraction(h, w, y, eps, chunk=64)
        filtered = _grads(h, w, y, eps)
        same = all(torch.equal(a, b) for a, b in zip(filtered, exact, strict=True))
        # The library falls back to the dense (exact) update when half the blocks or more stay.
        assert same == (kept >= 0.5), (prob, kept)
    assert linear_filter.kept_fraction(h, w, y, 1e-3 / 64, chunk=64) < 0.5  # both cases ran


def _grads(h, w, y, eps):
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    fastxent.linear_cross_entropy(hr, wr, y, filter_eps=eps, chunk_size=64).backward()
    return hr.grad, wr.grad


@compiled_backend
@builds_inplace_variants
def test_kernel_memory_script_reports_row_sized_extra(monkeypatch, capsys):
    flags = ["--n", "16", "--v", "512", "--dtypes", "bfloat16", "--options", "all"]
    monkeypatch.setattr(sys, "argv", [kernel_memory.__file__, *flags, "--targets", "index"])
    kernel_memory.main()
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[:3] == ["bfloat16", "index", "all"]
    assert all(0.0 <= float(x) < 1.0 for x in row[3:]), row  # no (M, V)-sized temporary


def test_varying_batch_linear_padding_reports_resident_memory(monkeypatch, capsys):
    flags = ["--linear-padding", "2", "--v", "512", "--d", "8", "--batch", "2", "--seq", "16"]
    monkeypatch.setattr(sys, "argv", [varying_batch.__file__, *flags])
    varying_batch.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "step     1",
        "step     2",
        "after malloc_trim",
    ]
