"""The command line: fastxent check proves the math and prints the error table; bad flags are
usage errors (exit code 2, no traceback); every command and script has a --help."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastxent import check, cli
from versions import TRITON_TOO_OLD

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"


def test_version_and_python_dash_m():
    """``python -m fastxent`` is the ``fastxent`` script; ``--version`` names torch's too."""
    import fastxent

    run = subprocess.run(
        [sys.executable, "-m", "fastxent", "--version"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"fastxent {fastxent.__version__} (torch {torch.__version__})"


def test_check_passes_and_prints_every_step(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for step in ("∂o_j/∂z_i = -o_j·o_i", "∂o_i/∂z_i = o_i - o_i²", "o_i·Σ_j y_j - y_i"):
        assert step in out
    assert "✗" not in out
    assert "soft targets" in out and "softcap" in out
    assert "linear: token walk" in out and "linear: vocab walk" in out
    if TRITON_TOO_OLD is None:  # the table for Triton's own kernel (the interpreter's)
        assert "max relative error in float32" in out
    assert "all checks passed" in out


def test_check_cases_reach_every_kernel_path():
    """Paths a wrong formula could hide in without check running them (found by mutating the
    kernels): soft targets with weights and smoothing, logit scale alone, "sum", the compiled
    backend's two-graph gradient (2^18 logits and more) and the rows its shift does not suit."""
    from fastxent._compiled.kernel import SHIFT_COLUMNS, SPLIT_MIN_LOGITS

    cases = {case.name: case for case in check.CASES}
    assert any(c.soft and c.weighted and c.kwargs.get("label_smoothing") for c in cases.values())
    assert any(c.kwargs.get("logit_scale", 1.0) != 1.0 and "softcap" not in c.kwargs
               for c in cases.values())  # fmt: skip
    assert any(c.kwargs.get("reduction") == "sum" for c in cases.values())
    split = [c for c in cases.values() if check.case_data(c)[0].numel() >= SPLIT_MIN_LOGITS]
    assert any(c.kwargs.get("label_smoothing") and c.kwargs.get("logit_scale") for c in split)
    for case in cases.values():
        if case.peaked:
            z = check.case_data(case)[0]
            assert (z.argmax(dim=1) >= SHIFT_COLUMNS).any()
            break
    else:
        raise AssertionError("no case with a row whose maximum lies past the shift's columns")


def test_check_catches_a_wrong_linear_loss(monkeypatch, capsys):
    """The linear rows compare the loss and gradients: all scaled by 1.001 fails (1e-10)."""
    real = check.linear_cross_entropy
    monkeypatch.setattr(check, "linear_cross_entropy", lambda *a, **k: real(*a, **k) * 1.001)
    assert cli.main(["check"]) == 1
    assert "some checks failed" in capsys.readouterr().out


def test_check_fails_when_tolerance_is_impossible(capsys):
    """The table really compares: float64 round-off alone is far above a tolerance of 1e-300."""
    assert cli.main(["check", "--tolerance", "1e-300"]) == 1
    out = capsys.readouterr().out
    assert "some checks failed" in out
    assert "│ ✗  │" in out  # marked, not only red: piped output has no colour


def test_check_says_in_one_line_that_a_table_had_nothing_to_run(monkeypatch, capsys):
    """Without Triton the float32 table (Triton's own kernel) would hold a single skipped row."""
    real = check.unavailable_reason
    monkeypatch.setattr(
        check,
        "unavailable_reason",
        lambda name, device: "not installed" if name == "triton" else real(name, device),
    )
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "max relative error in float32" not in out
    assert "│ –  │ triton" in out  # the float64 table lists its skipped backends still
    # its reason is under the float64 table already: the float32 line refers to it
    assert out.count("skipped: not installed") == 1
    assert "float32 on cpu, triton: skipped, as above" in out


def registered_commands() -> dict[str, str]:
    """The subcommands the parser registers, each with its help line (not the usage metavar)."""
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {choice.dest: choice.help for choice in commands._choices_actions}


def test_no_command_names_the_commands(capsys):
    """The usage error lists exactly the registered subcommands, which are check and bench."""
    commands = registered_commands()
    assert list(commands) == ["check", "bench"]
    named = re.search(r"required: \{(.*)\}", usage_error([], capsys))
    assert named is not None and named.group(1).split(",") == list(commands)


def usage_error(argv: list[str], capsys) -> str:
    """The message of the argparse usage error ``argv`` must raise (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("foo", "argument --device: must be cpu, cuda or cuda:N, got 'foo'"),
        ("meta", "argument --device: must be cpu, cuda or cuda:N, got 'meta'"),
        ("", "argument --device: must be cpu, cuda or cuda:N, got ''"),
        ("cpu:1", "argument --device: must be cpu, cuda or cuda:N, got 'cpu:1'"),
    ],
)
def test_check_rejects_a_device_it_cannot_run_on(value, message, capsys):
    assert message in usage_error(["check", "--device", value], capsys)


def test_check_rejects_cuda_without_a_cuda_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = usage_error(["check", "--device", "cuda"], capsys)
    assert "argument --device: 'cuda' was asked for, but torch sees no CUDA device" in err


def test_check_rejects_a_cuda_index_past_the_last_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = usage_error(["check", "--device", "cuda:2"], capsys)
    assert "'cuda:2' was asked for, but torch sees only 2 CUDA device(s)" in err
    assert check.device_problem("cuda:1") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be a finite number > 0, got 0.0"),
        ("-1", "must be a finite number > 0, got -1.0"),
        ("nan", "must be a finite number > 0, got nan"),
        ("inf", "must be a finite number > 0, got inf"),
        ("tight", "expected a number, got 'tight'"),
    ],
)
def test_check_rejects_a_tolerance_that_is_not_positive(value, message, capsys):
    assert f"argument --tolerance: {message}" in usage_error(
        ["check", "--tolerance", value], capsys
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "foo"}, "device must be cpu, cuda or cuda:N, got 'foo'"),
        ({"tolerance": 0.0}, "tolerance must be a finite number > 0, got 0.0"),
    ],
)
def test_check_run_raises_on_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check.run(**kwargs)


@pytest.mark.parametrize("command", ["check", "bench"])
def test_ctrl_c_is_one_line_and_exit_code_130(command, monkeypatch, capsys):
    from fastxent import bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(check if command == "check" else bench, "run", interrupted)
    assert cli.main([command]) == 130
    assert capsys.readouterr().err == "fastxent: interrupted\n"


def test_bad_device_is_a_usage_error_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "fastxent.cli", "check", "--device", "foo"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "fastxent check: error: argument --device" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "fastxent.cli", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())  # argparse wraps the help lines
    commands = registered_commands()
    assert list(commands) == ["check", "bench"]
    for name, line in commands.items():
        assert f"{name} {line}" in text, name


@pytest.mark.parametrize(
    ("command", "description"),
    [
        ("check", "fastxent check: verify the math symbolically, then every backend numerically."),
        ("bench", "The benchmark suite behind fastxent bench: time, peak memory and error"),
    ],
)
def test_subcommand_help_has_a_description(command, description, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert description in out
    if command == "check":
        assert "(default: cpu)" in out and "(default: 1e-10)" in out


def test_report_script_help_and_missing_file(tmp_path):
    help_run = subprocess.run(
        [sys.executable, str(REPORT), "--help"], capture_output=True, text=True, check=True
    )
    assert "Render a fastxent bench result file as the Markdown tables" in help_run.stdout
    missing = subprocess.run(
        [sys.executable, str(REPORT), str(tmp_path / "bench.json")], capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert "no file" in missing.stderr and "Traceback" not in missing.stderr


def test_report_script_refuses_a_file_that_is_not_json_and_reads_a_directory(tmp_path):
    not_json = tmp_path / "notes.txt"
    not_json.write_text("not a result\n")
    done = subprocess.run(
        [sys.executable, str(REPORT), str(not_json)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "is not a fastxent bench result" in done.stderr and "Traceback" not in done.stderr
    empty_dir = subprocess.run(
        [sys.executable, str(REPORT), str(tmp_path)], capture_output=True, text=True
    )
    assert empty_dir.returncode == 2 and f"no file {tmp_path / 'bench.json'}" in empty_dir.stderr


def test_first_call_script_refuses_a_vocabulary_its_second_call_cannot_shrink():
    script = REPORT.parent / "first_call.py"
    done = subprocess.run(
        [sys.executable, str(script), "--v", "256"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--v > 1000" in done.stderr and "Traceback" not in done.stderr
