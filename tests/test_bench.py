"""The benchmark suite: structure of its results, its error measure, its memory measure.

Nothing here times anything: speed and memory goals are what the suite itself reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from fastxent import bench

# Methods without torch.compile, so the quick run takes seconds; "liger" is skipped on CPU.
QUICK_METHODS = "fastxent-torch,fastxent-linear,fastxent-vocab,eager,chunked,liger"
# on CPU the bench skips Liger for want of CUDA, or first for want of Liger (no peers extra)
LIGER_SKIPPED_FOR = "CUDA" if importlib.util.find_spec("liger_kernel") else "not installed"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = bench.run(parse(["--quick", "--methods", QUICK_METHODS, "--out", str(out)]))
    return code, out


def test_quick_run_writes_results_plot_and_exit_code(quick_run):
    code, out = quick_run
    report = json.loads((out / "bench.json").read_text())
    fastxent_rows = [
        (c["case"], row) for c in report["cases"] for row in c["rows"] if row["is_fastxent"]
    ]
    assert code == 0, fastxent_rows  # 1: a fastxent row failed or exceeded its tolerance
    assert {"cpu", "cores", "torch", "device", "date"} <= set(report["machine"])
    assert report["machine"]["device"] == "cpu"
    labels = [(c["case"]["kind"], c["case"]["v"], c["case"]["dtype"]) for c in report["cases"]]
    expected = [
        ("cross_entropy", v, dtype) for dtype in ("float32", "bfloat16") for v in bench.QUICK["v"]
    ]
    assert labels == [*expected, ("linear", bench.QUICK["linear_v"][0], "float32")]
    png = out / "bench.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_rows_have_figures_or_a_reason(quick_run):
    _, out = quick_run
    report = json.loads((out / "bench.json").read_text())
    repeats = report["settings"]["repeats"]
    for case in report["cases"]:
        names = [row["name"] for row in case["rows"]]
        assert names[-1] == "floor"
        assert case["baseline"] in ("fastxent-torch", "fastxent-linear")
        for row in case["rows"]:
            if row["skipped"] is not None:
                assert isinstance(row["skipped"], str) and row["skipped"]
                assert row["times_s"] == [] and row["median_s"] is None
                continue
            assert len(row["times_s"]) == repeats
            assert row["median_s"] == sorted(row["times_s"])[repeats // 2]
            assert row["ratio"] is not None and row["ratio"] > 0
            if row["name"] != "floor":
                assert row["peak_extra_bytes"] is not None or row["memory_skipped"]
                assert row["first_call_s"] is not None and row["first_call_s"] > 0
        baseline = next(row for row in case["rows"] if row["name"] == case["baseline"])
        assert baseline["ratio"] == 1.0
    liger = [row for case in report["cases"] for row in case["rows"] if row["name"] == "liger"]
    assert liger and all(LIGER_SKIPPED_FOR in row["skipped"] for row in liger)


def test_quick_run_errors_are_small(quick_run):
    _, out = quick_run
    report = json.loads((out / "bench.json").read_text())
    for case in report["cases"]:
        # bf16 gradients are rounded to 8 bits: relative to the largest entry, <= 2^-8.
        tol = {"float32": 1e-5, "bfloat16": 4e-3}[case["case"]["dtype"]]
        for row in case["rows"]:
            if row["skipped"] is None and row["name"] != "floor":
                assert row["grad_rel_err"] <= tol, (case["case"], row["name"])
                if row["name"].startswith("fastxent"):  # float32 loss, whatever the input
                    assert row["loss_rel_err"] <= 1e-5, (case["case"], row["name"])


def test_ce_errors_measures_a_known_perturbation():
    torch.manual_seed(0)
    z, y = torch.randn(300, 50, dtype=torch.float64), torch.randint(0, 50, (300,))
    zr = z.clone().requires_grad_()
    loss = F.cross_entropy(zr, y)
    loss.backward()
    grad = zr.grad.clone()
    reference = bench.ce_reference(z, y)
    loss_err, grad_err = bench.ce_errors(z, y, reference, loss.detach(), grad)
    assert loss_err < 1e-14 and grad_err < 1e-12
    grad[7, 3] += 1e-3 * grad.abs().max()
    _, grad_err = bench.ce_errors(z, y, reference, loss.detach() * (1 + 1e-4), grad)
    assert grad_err == pytest.approx(1e-3, rel=1e-6)


def test_linear_reference_matches_autograd():
    torch.manual_seed(0)
    h, w = torch.randn(300, 16), torch.randn(40, 16)
    y = torch.randint(0, 40, (300,))
    loss, dh, dw = bench.linear_reference(h, w, y)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    full = F.cross_entropy(h64 @ w64.T, y)
    full.backward()
    assert loss == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(dh, h64.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(dw, w64.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.skipif(bench.cpu_memory_reason() is not None, reason="needs Linux clear_refs")
def test_peak_memory_sees_a_known_allocation():
    size = 64 << 20
    keep = torch.zeros(8)

    def forward():
        scratch = torch.ones(size // 4)  # 64 MiB, touched, freed before backward
        return (keep * scratch[:8]).sum()

    keep.requires_grad_()
    runner = bench.Runner(forward, [keep])
    extra = bench.peak_extra_bytes(runner, torch.device("cpu"))
    assert size - (1 << 20) <= extra < size + (16 << 20)  # RSS counts pages, not bytes


def test_allocated_peak_counts_what_is_live_at_once():
    size = 1 << 20
    kept = []

    def steps():
        first = torch.empty(size // 4)  # 1 MiB, freed by Python before the next two exist
        del first
        kept.append(torch.empty(size // 4))
        second = torch.empty(size // 2)  # 2 MiB beside the kept 1 MiB: the peak, 3 MiB
        del second

    assert bench.allocated_peak_bytes(steps) == 3 * size
    assert bench.allocated_peak_bytes(lambda: None) == 0


@pytest.mark.skipif(bench.cpu_memory_reason() is not None, reason="needs Linux clear_refs")
def test_peak_memory_counts_a_reused_fastxent_gradient():
    """A warm step leaves fastxent's gradient buffer kept for reuse; it must still be counted.

    Measured the way the suite does, in a fresh process: in this one, pages that earlier tests
    freed but the allocator kept could serve the new gradient without raising the peak RSS.
    """
    case = bench.Case("cross_entropy", 2048, 8192, "float32")  # a 64 MiB gradient
    (extra,) = bench.measure_memory_in_subprocess("fastxent-torch", [case], warmup=1, threads=1)
    assert isinstance(extra, int), extra
    assert extra >= (64 << 20) - (1 << 20)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--dtypes", "int8"], "unknown dtype 'int8'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--warmup", "0"], "--warmup must be >= 1"),
        (["--budget", "-1"], "--budget must be a finite number of seconds >= 0"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:99"], "--device 'cuda:99' was asked for, but torch sees"),
        (["--budget", "nan"], "--budget must be a finite number of seconds >= 0"),
        (["--budget", "inf"], "--budget must be a finite number of seconds >= 0"),
        (["--v", "10000000000000"], "V=10000000000000 needs 1.53e+08 GiB for its inputs alone"),
        (["--quick", "--d", "10000000000000"], "GiB for its inputs alone"),
        (["--no-linear", "--methods", "fastxent-linear"], "no selected method runs"),
    ],
)
def test_bad_flags_are_refused_with_a_message(argv, message, capsys, tmp_path):
    """Before anything is timed: a one-line error on stderr, exit code 2, no result files."""
    assert bench.run(parse([*argv, "--out", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bench.json").exists()


def test_an_out_path_that_cannot_be_a_directory_is_refused_before_the_run(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        assert bench.run(parse(["--quick", "--no-memory", "--out", str(out)])) == 2
        assert f"--out {out}: cannot make that directory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["bench.json", "bench.png"])
def test_a_result_file_that_cannot_be_written_is_refused_before_the_run(name, capsys, tmp_path):
    """Found after the run, it lost the run's tables to a traceback."""
    (tmp_path / name).mkdir()
    assert bench.run(parse(["--quick", "--no-memory", "--out", str(tmp_path)])) == 2
    captured = capsys.readouterr()
    assert f"cannot write {name} there" in captured.err and captured.out == "", captured


@pytest.mark.parametrize(
    ("first_run_s", "runs"), [(1.0, 5), (2.0, 5), (2.1, 4), (4.0, 2), (11.0, 1), (99.0, 1)]
)
def test_budget_cuts_the_runs_of_slow_methods_to_what_fits(first_run_s, runs):
    assert bench.Timing(5, 1, 10.0).runs_within_budget(first_run_s) == runs
    assert bench.Timing(5, 1, 0.0).runs_within_budget(first_run_s) == 5  # 0: no budget


def test_peer_over_budget_is_timed_once_and_says_so(tmp_path, capsys):
    """The budget cuts peers only: fastxent and the floor, the ratios' references, keep all runs.
    The table says so beside --no-memory's note (it showed only the first note of a row)."""
    argv = ["--quick", "--no-linear", "--methods", "fastxent-torch,eager", "--no-memory"]
    code = bench.run(parse([*argv, "--repeats", "3", "--budget", "1e-9", "--out", str(tmp_path)]))
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"eager \(1,2\)", out) and "(2) timed 1 of 3 runs" in out, out
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = [row for case in report["cases"] for row in case["rows"] if not row["skipped"]]
    assert {row["name"] for row in rows} == {"fastxent-torch", "eager", "floor"}
    for row in rows:
        if row["name"] == "eager":
            assert len(row["times_s"]) == 1, row
            assert "timed 1 of 3 runs" in row["note"], row
        else:
            assert len(row["times_s"]) == 3, row
            assert "timed" not in (row["note"] or ""), row


@pytest.mark.parametrize("text", ["8,x", "0,8", ""])
def test_bad_size_lists_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        bench._ints(text)


def test_methods_flag_selects_backends_by_prefix():
    args = parse(["--quick", "--methods", "fastxent", "--no-linear"])
    assert {c.kind for c in bench.cases_of(args)} == {"cross_entropy"}
    chosen = [m.name for m in bench.methods() if bench._selected(m.name, args.methods)]
    backends = [f"fastxent-{b}" for b in bench.functional.BACKENDS]
    assert chosen == [*backends, "fastxent-linear", "fastxent-vocab", "fastxent-wide"]


@pytest.mark.parametrize(
    "flags", [[], ["--full"], ["--methods", "chunked,fastxent"], ["--device", "cuda"]]
)
def test_default_run_shows_the_slow_linear_rows_as_skipped_and_flags_bring_them(flags):
    cpu = torch.device("cpu")
    why = {(m.name, m.kind): m.why_not(cpu) for m in bench.methods_of(parse(flags))}
    left_out = [key for key, reason in why.items() if reason and "left out unless" in reason]
    if flags:
        assert left_out == []
        assert ("chunked", "linear") in why and ("fastxent-vocab", "linear") in why
    else:
        assert left_out == [
            ("fastxent-vocab", "linear"),
            ("fastxent-wide", "linear"),
            ("chunked", "linear"),
        ]
        assert why[("fastxent-linear", "linear")] is None and why[("eager", "linear")] is None


@pytest.mark.parametrize(
    ("methods", "kinds"),
    [("fastxent-linear", {"linear"}), ("fastxent-torch", {"cross_entropy"}), (None, None)],
)
def test_cases_are_only_those_a_selected_method_runs(methods, kinds):
    """Cases of the other kind timed only a floor (the default cross_entropy cases: most of a
    linear-only run)."""
    args = parse(["--quick"] if methods is None else ["--quick", "--methods", methods])
    assert {c.kind for c in bench.cases_of(args)} == (kinds or {"cross_entropy", "linear"})


def test_cpu_device_with_an_index_is_refused_not_taken_as_another_device(capsys, tmp_path):
    """--device cpu:0 ran the methods a default CPU run leaves out, as if it were a GPU."""
    argv = ["--quick", "--no-memory", "--device", "cpu:0", "--out", str(tmp_path)]
    assert bench.run(parse(argv)) == 2
    assert "--device must be cpu, cuda or cuda:N, got 'cpu:0'" in capsys.readouterr().err


def test_default_cases_sweep_v_in_float32_and_run_bf16_at_the_headline_shape():
    labels = [case.label for case in bench.cases_of(parse([]))]
    assert labels == [
        "cross_entropy N=4096 V=8192 float32",
        "cross_entropy N=4096 V=32768 float32",
        "cross_entropy N=4096 V=32768 bfloat16",
        "linear N=1024 V=32768 D=512 float32",
    ]


def test_full_cases_are_the_shapes_the_goals_are_stated_at():
    labels = [case.label for case in bench.cases_of(parse(["--full"]))]
    assert labels == [
        "cross_entropy N=4096 V=8192 float32",
        "cross_entropy N=4096 V=16384 float32",
        "cross_entropy N=4096 V=32768 float32",
        "cross_entropy N=4096 V=32768 bfloat16",
        "linear N=2048 V=65536 D=512 float32",
    ]
    # A shape flag still wins over the preset.
    assert bench.cases_of(parse(["--full", "--linear-n", "64"]))[-1].n == 64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--v", "8192,,"], "--v: expected comma-separated integers, got '8192,,'"),
        (["--v", ",8192"], "--v: expected comma-separated integers"),
        (["--v", "8192,0"], "--v: expected positive integers"),
        (["--methods", "eager,,chunked"], "--methods: expected comma-separated names"),
    ],
)
def test_lists_with_an_empty_or_bad_entry_are_refused(argv, message, capsys):
    """An empty entry was dropped silently: a value left out or mistyped ran without it."""
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_full_and_quick_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parse(["--full", "--quick"])
    assert "not allowed with argument" in capsys.readouterr().err


def _result(case: bench.Case, rows: dict[str, tuple[float, int | None]]) -> dict:
    """A finished case as ``run`` leaves it: rows of (median seconds, peak bytes)."""
    return {
        "case": asdict(case),
        "rows": [
            {"name": name, "median_s": t, "peak_extra_bytes": m} for name, (t, m) in rows.items()
        ],
    }


def test_goal_checks_compute_each_ratio_from_the_rows():
    mib = 1 << 20
    results = [
        _result(bench.Case("cross_entropy", 64, 256, "float32"), {"eager": (1.0, 1)}),  # no goal
        _result(
            bench.GOAL_CE,
            {"fastxent-compiled": (0.1, 513 * mib), "eager": (0.6, 1536 * mib), "floor": (0.08, 0)},
        ),
        _result(bench.GOAL_CE_HALF, {"fastxent-compiled": (0.12, 256 * mib)}),
        _result(
            bench.GOAL_LINEAR,
            {
                "fastxent-linear": (2.0, 200 * mib),
                "eager": (2.4, 1500 * mib),
                "chunked": (8.0, 300 * mib),
                "floor": (1.6, 132 * mib),
                "fastxent-wide": (1.7, 400 * mib),
            },  # no fastxent-vocab row: its goals are left out, not failed
        ),
    ]
    goals = {(g.case, g.goal): g for g in bench.goal_checks(results)}
    ce, half, linear = (c.label for c in (bench.GOAL_CE, bench.GOAL_CE_HALF, bench.GOAL_LINEAR))
    expected = {
        (ce, "× faster than torch eager"): (6.0, True),
        (ce, "× the bandwidth floor's time"): (1.25, True),
        (ce, "peak memory ÷ one N×V buffer (1% for per-row vectors)"): (513 / 512, True),
        (half, "× the float32 time (bf16 at least as fast)"): (1.2, False),
        (linear, "token walk: × three matmuls' time"): (1.25, False),
        (linear, "token walk: × less peak memory than eager"): (7.5, False),
        (linear, "token walk: × faster than torch chunked"): (4.0, True),
        (linear, "token walk: × less peak memory than torch chunked"): (1.5, True),
        # The wide chunks trade memory for time: their time goals only.
        (linear, f"token walk, {bench.WIDE_CHUNK}-row chunks: × three matmuls' time"): (
            1.7 / 1.6,
            True,
        ),
        (linear, f"token walk, {bench.WIDE_CHUNK}-row chunks: × faster than torch chunked"): (
            8.0 / 1.7,
            True,
        ),
    }
    assert set(goals) == set(expected)
    for key, (value, met) in expected.items():
        assert goals[key].value == pytest.approx(value), key
        assert goals[key].met is met, key


def test_quick_run_states_no_goals(quick_run):
    _, out = quick_run
    assert json.loads((out / "bench.json").read_text())["goals"] == []


def test_missing_matplotlib_fails_before_any_measurement(monkeypatch, capsys, tmp_path):
    from fastxent import cli

    def measure(*args, **kwargs):
        raise AssertionError("measured before the plot's dependency was checked")

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(bench, "run_case", measure)
    monkeypatch.setattr(bench, "measure_memory_in_subprocess", measure)
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    assert "matplotlib" in (err := capsys.readouterr().err)
    assert "pip install 'fastxent[cli]'" in err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("flag", ["--methods", "--dtypes", "--linear-dtypes"])
@pytest.mark.parametrize("text", [",", " , ", ""])
def test_empty_name_lists_are_refused_by_argparse(flag, text, capsys, monkeypatch):
    from fastxent import cli

    monkeypatch.setattr(bench, "run", lambda args: pytest.fail(f"{flag} {text!r} was accepted"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", flag, text])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected comma-separated names, got {text!r}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("terminal", [False, True])
def test_a_log_gets_a_line_per_finished_row_as_it_finishes(terminal, monkeypatch, capsys, tmp_path):
    """Not on a terminal rich draws no bar: each finished row is a plain line, printed before
    the end (the tables, printed after the run, see them); on a terminal the bar is all there is."""
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")
        monkeypatch.setenv("TERM", "xterm")
    seen_by_the_tables = []
    monkeypatch.setattr(
        bench, "print_table", lambda *_: seen_by_the_tables.append(capsys.readouterr().out)
    )
    monkeypatch.setattr(bench, "cpu_memory_reason", lambda: None)  # memory "measured" below
    monkeypatch.setattr(
        bench, "measure_memory_in_subprocess", lambda name, cases, *_: [3 << 20] * len(cases)
    )
    argv = ["--quick", "--no-linear", "--methods", "fastxent-torch,eager,liger", "--v", "256"]
    assert bench.run(parse([*argv, "--dtypes", "float32", "--out", str(tmp_path)])) == 0
    [logged] = seen_by_the_tables
    label = "cross_entropy N=64 V=256 float32"
    if terminal:
        assert f"{label} fastxent-torch:" not in logged and "MiB" not in logged, logged
        return
    head, ms = re.escape(label), r"\d+\.\d ms"
    expected = [
        rf"{head} fastxent-torch: {ms}",
        rf"{head} eager: {ms}",
        rf"{head} liger: skipped \(.*{LIGER_SKIPPED_FOR}.*\)",
        rf"{head} floor: {ms}",
    ]
    lines = [line for line in logged.splitlines() if line]  # rich ends its bar with a newline
    assert len(lines) == len(expected) + 2, lines  # then a memory line per measured method
    for pattern, line in zip(expected, lines, strict=False):
        assert re.fullmatch(pattern, line), (pattern, line)
    memory = sorted(lines[len(expected) :])  # in the order the processes finish
    assert memory == [f"{label} {name}: peak 3 MiB" for name in ("eager", "fastxent-torch")]


def test_plot_colours_each_method_alike_in_every_panel(quick_run, monkeypatch, tmp_path):
    """The quick run's results drawn again, the figure kept: a method's lines share one colour
    across the cross_entropy and linear panels (eager's lines in both), and the memory panels
    label the floor as what it is there."""
    import matplotlib.pyplot as plt

    _, out = quick_run
    report = json.loads((out / "bench.json").read_text())
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    bench.plot(report["cases"], tmp_path / "bench.png")
    (fig,) = kept
    colour_of: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.lines:
            colour_of.setdefault(line.get_label().rsplit(" ", 1)[0], set()).add(line.get_color())
    assert all(len(colours) == 1 for colours in colour_of.values()), colour_of
    eager = colour_of["torch F.cross_entropy"] | colour_of["torch F.linear + F.cross_entropy"]
    assert len(eager) == 1, eager
    time_ax, memory_ax = fig.axes[2], fig.axes[3]  # the linear row
    assert any(line.get_label().startswith("floor: 3 matmuls") for line in time_ax.lines)
    assert any(line.get_label().startswith(bench.FLOOR_MEMORY_LABEL) for line in memory_ax.lines)
    assert not any(line.get_label().startswith("floor: 3") for line in memory_ax.lines)


def test_every_method_has_its_own_plot_colour():
    names = {m.name for m in bench.methods()} | {"floor"}
    assert names <= set(bench.PLOT_COLORS)
    by_colour: dict[str, set] = {}
    for name in names:
        by_colour.setdefault(bench.PLOT_COLORS[name], set()).add(name)
    shared = [group for group in by_colour.values() if len(group) > 1]
    assert shared == [{"fastxent-compiled", "fastxent-linear"}], shared
