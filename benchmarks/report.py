"""Render a ``fastxent bench`` result file as the Markdown tables of BENCHMARKS.md.

Usage: ``python benchmarks/report.py bench-results/bench.json``
"""

from __future__ import annotations

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


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results/bench.json")
    sys.stdout.write(render(json.loads(path.read_text())))
