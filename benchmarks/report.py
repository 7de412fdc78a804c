"""Render a ``fastxent bench`` result file as the Markdown tables of BENCHMARKS.md.

Usage: ``python benchmarks/report.py bench-results/bench.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def render(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, device {m['device']}, {m['date']}, "
        f"load average at the end {m.get('load_average')}. "
        f"{s['repeats']} timed runs per method after {s['warmup']} warm-up run(s).",
        "",
    ]
    notes: list[str] = []
    for case in report["cases"]:
        c = case["case"]
        shape = f"N={c['n']}, V={c['v']}" + (f", D={c['d']}" if c["kind"] == "linear" else "")
        title = f"**{c['kind']}**, {shape}, {c['dtype']}"
        if "bandwidth_gbps" in case:
            title += f" (copy bandwidth {case['bandwidth_gbps']:.1f} GB/s)"
        lines += [
            title,
            "",
            "| method | median ms | × fastxent | first call s | peak extra MiB | loss rel err "
            "| grad rel err |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for row in case["rows"]:
            note = row["skipped"] or row["memory_skipped"] or row["note"]
            name = row["name"]
            if note:
                if note not in notes:
                    notes.append(note)
                name += f" ({notes.index(note) + 1})"
            memory = row["peak_extra_bytes"]
            median = row["median_s"]
            lines.append(
                f"| {name} | {fmt(None if median is None else 1e3 * median, '.1f')} "
                f"| {fmt(row['ratio'], '.2f')} | {fmt(row.get('first_call_s'), '.2f')} "
                f"| {fmt(None if memory is None else memory / 2**20, '.0f')} "
                f"| {fmt(row['loss_rel_err'], '.1e')} | {fmt(row['grad_rel_err'], '.1e')} |"
            )
        lines.append("")
    lines += [f"({i}) {note}  " for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    summary = (__doc__ or "").split("\n", 1)[0].replace("``", "")  # __doc__ is None under -OO
    parser = argparse.ArgumentParser(description=summary)
    parser.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=Path("bench-results/bench.json"),
        help="the bench.json that fastxent bench wrote (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    path = args.path / "bench.json" if args.path.is_dir() else args.path  # an --out DIR too
    if not path.is_file():
        parser.error(f"no file {path}; `fastxent bench --out DIR` writes DIR/bench.json")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"{path} is not a fastxent bench result (not JSON: {error})")
    sys.stdout.write(render(report))


if __name__ == "__main__":
    main()
