"""benchmarks/gpu.py runs end to end: its --small mode, on CPU through Triton's interpreter.

The script is what a lent GPU runs first; this keeps it from rotting between such sessions. It
checks that every task writes its rows and that fastxent passes the script's own correctness
check (exit status 0), not speed.
"""

from __future__ import annotations

import importlib.util
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
    assert results["complete"] is True
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


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@tested_triton
def test_a_run_cut_short_keeps_the_tasks_that_ran(tmp_path, monkeypatch):
    """The JSON is written after each task: when a later task dies (here: raises; on a lent GPU,
    the lease's time limit), the runs before it are on disk, marked incomplete."""
    script = _load_script()

    def dies(*args, **kwargs):
        raise RuntimeError("the linear task died")

    monkeypatch.setattr(script, "linear_task", dies)
    out = tmp_path / "gpu.json"
    with pytest.raises(RuntimeError, match="linear task died"):
        script.main(["--small", "--tasks", "ce,linear", "--warmup", "1", "--iters", "1",
                     "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    assert results["complete"] is False
    assert [run["task"] for run in results["runs"]] == ["cross_entropy"]
    assert not list(tmp_path.glob("*.tmp"))


SESSION = SCRIPT.parent / "gpu_session.sh"


def _fake_python(tmp_path: Path, body: str) -> Path:
    """A stand-in for the GPU machine's python: records its arguments, then runs ``body``."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n{body}\n')
    fake.chmod(0o755)
    return fake


def _session(tmp_path: Path, fake: Path, **env: str) -> subprocess.CompletedProcess:
    """The script run from ``tmp_path`` (no .whl/ of peers' wheels to install there)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), **env)
    return subprocess.run(
        ["bash", str(SESSION)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def test_gpu_session_runs_every_step_into_one_log(tmp_path):
    done = _session(tmp_path, _fake_python(tmp_path, "exit 0"))
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[1] if c.startswith("-m") else c.split()[0] for c in calls] == [
        "-c", "pytest", "benchmarks/gpu.py", "benchmarks/gpu.py", "fastxent.cli",
        "fastxent.cli",
    ]  # fmt: skip
    log = (tmp_path / "out" / "session.log").read_text()
    steps = ["machine", "gpu-tests", "gpu-bench", "gpu-amp", "check", "suite"]
    ended = [line.split(":")[0][3:] for line in log.splitlines() if ": exit 0 (" in line]
    assert ended == steps, log
    # no nvidia-smi on this machine: the machine step's status is its last command's (0)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_session_stops_a_step_at_the_deadline_and_skips_the_rest(tmp_path):
    """A hung step (a stand-in that sleeps) is stopped when DEADLINE's seconds are spent; the
    steps after it are not started, and the script exits 124 (timeout's status)."""
    fake = _fake_python(tmp_path, 'case "$*" in *pytest*) sleep 60;; esac')
    done = _session(tmp_path, fake, DEADLINE="3", MIN_STEP="1")
    log = (tmp_path / "out" / "session.log").read_text()
    assert "== gpu-tests: stopped at its" in log, log
    assert "== suite: not run" in log, log
    assert done.returncode == 124, done.stdout + done.stderr


def test_gpu_session_installs_carried_wheels_first(tmp_path):
    """Peers' wheels carried in .whl/ are installed (no index: the GPU machine reaches none)
    before any step runs."""
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "peer-1.0-py3-none-any.whl").write_bytes(b"")
    _session(tmp_path, _fake_python(tmp_path, "exit 0"))
    first, second = (tmp_path / "calls").read_text().splitlines()[:2]
    assert first.startswith("-m pip install") and "--no-index" in first, first
    assert first.endswith(".whl/peer-1.0-py3-none-any.whl"), first
    assert second.startswith("-c "), second  # then the machine step
