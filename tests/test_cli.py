"""The command line: fastxent check proves the math and prints the error table."""

import subprocess
import sys

from fastxent import cli


def test_check_passes_and_prints_every_step(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for step in ("∂o_j/∂z_i = -o_j·o_i", "∂o_i/∂z_i = o_i - o_i²", "o_i·Σ_j y_j - y_i"):
        assert step in out
    assert "✗" not in out
    assert "soft targets" in out and "softcap" in out
    assert "all checks passed" in out


def test_check_fails_when_tolerance_is_impossible(capsys):
    """The table really compares: a tolerance of 0 cannot be met in floating point."""
    assert cli.main(["check", "--tolerance", "0"]) == 1
    assert "some checks failed" in capsys.readouterr().out


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "fastxent.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "check" in result.stdout and "bench" in result.stdout
