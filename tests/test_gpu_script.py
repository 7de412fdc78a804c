"""benchmarks/gpu.py runs end to end: its --small mode, on CPU through Triton's interpreter.

The script is what a lent GPU runs first; this keeps it from rotting between such sessions. It
checks that every task writes its rows and that fastxent passes the script's own correctness
check (exit status 0), not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from versions import tested_triton

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


@tested_triton  # fastxent's rows run the Triton kernels (interpreted here)
def test_small_run_checks_fastxent_and_writes_every_task(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    argv = ["--small", "--warmup", "1", "--iters", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    tasks = ["cross_entropy", "linear_cross_entropy", "linear_cross_entropy_amp"]
    assert [run["task"] for run in results["runs"]] == tasks
    for run in results["runs"]:
        rows = {row["provider"]: row for row in run["rows"]}
        assert {"fastxent", "torch"} <= set(rows), rows
        ours = rows["fastxent"]
        assert "skipped" not in ours, ours
        # The script's bar (bf16 logits against float32 PyTorch): loss 1e-4, gradient 2 ulps.
        assert ours["loss_rel_error"] < 1e-4 and ours["grad_rel_error"] < 2 * 2.0**-7, ours
        assert ours["forward_backward_s"] > 0 and run["floor_s"] > 0
        if run["task"] != "cross_entropy":  # the vocabulary walk meets the same bar
            lean = next(row for name, row in rows.items() if name.startswith("fastxent vocab"))
            assert "skipped" not in lean, lean
            assert lean["loss_rel_error"] < 1e-4 and lean["grad_rel_error"] < 2 * 2.0**-7, lean
