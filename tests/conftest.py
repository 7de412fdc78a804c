"""Shared test set-up: the ``gpu`` marker skips without CUDA; without CUDA, Triton interprets;
the ``shapes_passed_to`` fixture records calls; ``peak_bytes_allocated`` measures memory.

Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test
module (or torch.compile) can import it: the Triton kernels then run on CPU tensors.
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shapes_passed_to(monkeypatch):
    """``shapes_passed_to(module, name)``: a list that gets the shape of the first argument of
    every later call to ``module.name``, which still runs."""

    def record(module, name: str) -> list:
        shapes, original = [], getattr(module, name)

        def recorded(*args, **kwargs):
            shapes.append(tuple(args[0].shape))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)
        return shapes

    return record


@pytest.fixture
def peak_bytes_allocated(tmp_path):
    """``peak_bytes_allocated(fn)``: the peak of the bytes held through PyTorch's CPU allocator
    while ``fn`` runs, above the start.

    Read from the profiler's memory events (one per allocation and per free, each with the
    allocator's running total), which the Chrome trace keeps in their order: an op's event
    alone would count a tensor that Python frees between ops as live until the enclosing one ends.
    """

    def measure(fn) -> int:
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            fn()
        trace = tmp_path / "memory-trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"]
                  if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]  # fmt: skip
        if not events:
            return 0
        start = events[0]["Total Allocated"] - events[0]["Bytes"]
        return max(0, max(e["Total Allocated"] for e in events) - start)

    return measure
