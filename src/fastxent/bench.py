r"""The benchmark suite behind ``fastxent bench``: time, peak memory and error of every method.

Two kinds of case:

* ``cross_entropy``: logits ``z`` of shape ``(N, V)`` and class indices ``y`` of shape ``(N,)``;
  the loss ``mean_r -log o_{r,y_r}`` and its gradient with respect to ``z``.
* ``linear``: hidden states ``h`` ``(N, D)`` and a classifier ``W`` ``(V, D)``; logits
  ``z = h Wᵀ`` are part of the method, and the gradients are ``dh`` and ``dW``.

For each (case, method) the suite reports

* the forward+backward time: the median of ``repeats`` runs after ``warmup`` runs, with the
  methods interleaved (one run of each in turn, the order rotating) so drift hits all alike; a
  peer whose first timed run is longer than ``budget / repeats`` seconds gets only the runs
  that fit in ``budget`` (at least one), so a slow peer does not dominate the suite's time;
* the first call: the time of the first warm-up run, compilation included (in the first case a
  method runs, also torch.compile's one-time start-up in this process);
* the peak extra memory: bytes allocated beyond the inputs during one forward+backward, the
  gradients included. On CPU each method runs in its own subprocess, and the peak resident set
  size is reset (``/proc/self/clear_refs``) after warm-up so compilation does not count, and two
  such processes run at a time (nothing is timed then); on CUDA
  it is ``torch.cuda.max_memory_allocated`` minus what was allocated before the step;
* the max relative error of the loss and of the gradients against float64 PyTorch on the same
  data: ``|loss - ref| / |ref|`` and ``max|g - g_ref| / max|g_ref|``;
* the time ratio to fastxent measured in the same run (``ratio`` 2.0: twice fastxent's time).

A ``floor`` row bounds what any method can reach: for ``cross_entropy`` the bytes that must move
(read the logits twice, write the gradient once) at the memory bandwidth of a large tensor copy
timed in the same run; for ``linear`` the three plain matmuls ``z = h Wᵀ``, ``dh = g W`` and
``dW = gᵀ h`` of the same sizes, timed in the same run.

Results go to ``bench.json`` (raw numbers and the machine) and ``bench.png`` (time and memory
against the vocabulary size) in the output directory; the terminal shows a table per case and,
on CPU, the performance goals whose cases ran, each with its measured value (``goal_checks``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import fastxent
from fastxent import functional
from fastxent.check import device_problem

KINDS = ("cross_entropy", "linear")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# Shapes of the three presets. The default run is short (about a minute on 2 cores, warm
# compile cache, with LEFT_OUT_BY_DEFAULT): it sweeps V in the first dtype (the plot) and runs
# the other dtypes at the headline V only. --full has the shapes the performance goals are
# stated at (the linear one is 4x the default's work). --quick is tiny (seconds; the tests).
DEFAULTS = {"n": 4096, "v": [8192, 32768], "linear_n": 1024, "d": 512, "linear_v": [32768]}
FULL = {"n": 4096, "v": [8192, 16384, 32768], "linear_n": 2048, "d": 512, "linear_v": [65536]}
QUICK = {"n": 64, "v": [256, 1024], "linear_n": 64, "d": 32, "linear_v": [512]}
HEADLINE_V = 32768
DEFAULT_REPEATS, DEFAULT_WARMUP = 3, 1
QUICK_REPEATS = 3
DEFAULT_BUDGET_S = 10.0  # timed seconds per peer and case before its runs are cut (0: no cut)
# Linear rows the default CPU run leaves out (shown as skipped), so that it takes about a minute
# on two cores: PyTorch's chunked path is the slowest peer by far, and the vocabulary walk and
# the wide chunks are opt-in settings. --full and --methods run them.
LEFT_OUT_BY_DEFAULT = ("chunked", "fastxent-vocab", "fastxent-wide")
RESULT_FILES = ("bench.json", "bench.png")  # what a run writes into --out: raw numbers, plot
MEMORY_PROCESSES = 2  # memory subprocesses at a time (peak RSS is per process; nothing is timed)
VOCAB_BLOCK = 512  # classes per block of the linear vocabulary walk, the least-memory row
WIDE_CHUNK = 1024  # tokens per chunk of the linear token walk's row that trades memory for time
# Largest relative error (loss and gradient) a fastxent row may show before the run fails.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
# Bytes of the tensor copied to measure the memory bandwidth (large enough to leave the caches).
BANDWIDTH_BYTES, QUICK_BANDWIDTH_BYTES = 256 << 20, 16 << 20
REFERENCE_ROWS = 32  # rows per float64 reference chunk: never N×V in float64, and cache-sized
LINEAR_REFERENCE_ROWS = 256  # the linear reference's chunk: each one adds into a V×D dW
MIB = float(1 << 20)
# Library deprecation chatter is not about the measured call; other warnings go in the notes.
_QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@dataclass(frozen=True)
class Case:
    """One problem: ``n`` rows, ``v`` classes, ``d`` hidden size (linear only), one dtype."""

    kind: str
    n: int
    v: int
    dtype: str
    d: int = 0
    seed: int = 0

    @property
    def label(self) -> str:
        shape = f"N={self.n} V={self.v}" + (f" D={self.d}" if self.kind == "linear" else "")
        return f"{self.kind} {shape} {self.dtype}"


def make_inputs(case: Case, device: torch.device) -> dict[str, Tensor]:
    """Random inputs of ``case``, the same for every method and process (seeded on the CPU).

    Drawn in place into one float32 buffer each (no temporaries: these are the largest
    allocations of a memory subprocess, where each page is a fault).
    """
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    y = torch.randint(0, case.v, (case.n,), generator=gen).to(device)  # (N,)
    if case.kind == "cross_entropy":
        z = torch.empty(case.n, case.v).normal_(0.0, 2.0, generator=gen)  # (N, V)
        return {"z": z.to(device, dtype).requires_grad_(), "y": y}
    h = torch.empty(case.n, case.d).normal_(generator=gen)  # (N, D)
    w = torch.empty(case.v, case.d).normal_(0.0, 1.0 / math.sqrt(case.d), generator=gen)  # (V, D)
    return {
        "h": h.to(device, dtype).requires_grad_(),
        "w": w.to(device, dtype).requires_grad_(),
        "y": y,
    }


# ---------------------------------------------------------------------------------------------
# Methods


@dataclass
class Runner:
    """One method bound to one case's inputs.

    ``step`` runs forward and backward and returns the loss and the gradients; ``clear`` drops
    the gradients (outside the timed region); ``reset`` restores anything the method overwrote;
    ``prepare`` does both, before every step.
    """

    forward: Callable[[], Tensor]
    grads_of: list[Tensor]
    reset: Callable[[], None] | None = None

    def clear(self) -> None:
        for x in self.grads_of:
            x.grad = None

    def prepare(self) -> None:
        self.clear()
        if self.reset is not None:
            self.reset()

    def step(self) -> tuple[Tensor, list[Tensor | None]]:
        loss = self.forward()
        loss.backward()
        return loss.detach(), [x.grad for x in self.grads_of]


@dataclass(frozen=True)
class Method:
    """A way to compute the loss: ``why_not(device)`` says why it cannot run (None: it can)."""

    name: str
    kind: str
    label: str
    why_not: Callable[[torch.device], str | None]
    build: Callable[[dict[str, Tensor], torch.device], Runner]
    is_fastxent: bool = False


def _can_run(device: torch.device) -> str | None:
    return None


def _installed(module: str, package: str) -> Callable[[torch.device], str | None]:
    def why_not(device: torch.device) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install 'fastxent[peers]')"
        return None

    return why_not


def _liger_why_not(device: torch.device) -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return "Liger-Kernel is not installed (pip install 'fastxent[peers]')"
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need CUDA (on CPU only TRITON_INTERPRET, too slow)"
    return None


def _fastxent_ce(backend: str) -> Method:
    def why_not(device: torch.device) -> str | None:
        return functional.unavailable_reason(backend, device)

    def build(inputs: dict[str, Tensor], device: torch.device) -> Runner:
        z, y = inputs["z"], inputs["y"]
        return Runner(lambda: fastxent.cross_entropy(z, y, backend=backend), [z])

    return Method(
        f"fastxent-{backend}", "cross_entropy", f"fastxent ({backend})", why_not, build, True
    )


def _eager_ce(inputs: dict[str, Tensor], device: torch.device) -> Runner:
    z, y = inputs["z"], inputs["y"]
    return Runner(lambda: F.cross_entropy(z, y), [z])


def _torch_ce(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z, y)


def _compiled_ce(inputs: dict[str, Tensor], device: torch.device) -> Runner:
    z, y = inputs["z"], inputs["y"]
    compiled = torch.compile(_torch_ce, dynamic=False)
    return Runner(lambda: compiled(z, y), [z])


def _liger_ce(inputs: dict[str, Tensor], device: torch.device) -> Runner:
    from liger_kernel.transformers.functional import liger_cross_entropy

    # Liger writes the gradient into its input during forward: give it its own copy of the
    # logits, refreshed before every step outside the timed region.
    z, y = inputs["z"], inputs["y"]
    own = z.detach().clone().requires_grad_()

    def reset() -> None:
        with torch.no_grad():
            own.copy_(z)

    return Runner(lambda: liger_cross_entropy(own, y), [own], reset)


def _fastxent_linear_why_not(device: torch.device) -> str | None:
    if not hasattr(fastxent, "linear_cross_entropy"):
        return "this fastxent has no linear_cross_entropy"
    return None


def _fastxent_linear(**options) -> Callable[[dict[str, Tensor], torch.device], Runner]:
    """The runner builder of ``fastxent.linear_cross_entropy(h, W, y, **options)``."""

    def build(inputs: dict[str, Tensor], device: torch.device) -> Runner:
        h, w, y = inputs["h"], inputs["w"], inputs["y"]
        return Runner(lambda: fastxent.linear_cross_entropy(h, w, y, **options), [h, w])

    return build


def _eager_linear(inputs: dict[str, Tensor], device: torch.device) -> Runner:
    h, w, y = inputs["h"], inputs["w"], inputs["y"]
    return Runner(lambda: F.cross_entropy(F.linear(h, w), y), [h, w])


def _chunked_why_not(device: torch.device) -> str | None:
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with chunking options"
    return None


def _chunked_linear(inputs: dict[str, Tensor], device: torch.device) -> Runner:
    h, w, y = inputs["h"], inputs["w"], inputs["y"]
    options = torch.nn.LinearCrossEntropyOptions()
    return Runner(lambda: F.linear_cross_entropy(h, w, y, options=options), [h, w])


def _cce_impl(device: torch.device) -> str:
    # CCE's own Triton kernel on CUDA; its torch.compile path elsewhere (it runs on CPU).
    return "cce" if device.type == "cuda" else "torch_compile"


def _cce_linear(inputs: dict[str, Tensor], device: torch.device) -> Runner:
    from cut_cross_entropy import linear_cross_entropy

    h, w, y = inputs["h"], inputs["w"], inputs["y"]
    impl = _cce_impl(device)
    return Runner(lambda: linear_cross_entropy(h, w, y, impl=impl), [h, w])


def _liger_linear(inputs: dict[str, Tensor], device: torch.device) -> Runner:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, w, y = inputs["h"], inputs["w"], inputs["y"]
    return Runner(lambda: liger_fused_linear_cross_entropy(h, w, y), [h, w])


def methods() -> list[Method]:
    """Every method the suite knows, fastxent first (one row per backend)."""
    cross_entropy = [_fastxent_ce(backend) for backend in functional.BACKENDS]
    cross_entropy += [
        Method("eager", "cross_entropy", "torch F.cross_entropy", _can_run, _eager_ce),
        Method(
            "compile", "cross_entropy", "torch.compile(F.cross_entropy)", _can_run, _compiled_ce
        ),
        Method("liger", "cross_entropy", "Liger-Kernel", _liger_why_not, _liger_ce),
    ]
    linear = [
        Method(
            "fastxent-linear",
            "linear",
            "fastxent.linear_cross_entropy",
            _fastxent_linear_why_not,
            _fastxent_linear(),
            True,
        ),
        Method(
            "fastxent-vocab",
            "linear",
            f"fastxent.linear_cross_entropy(vocab_block={VOCAB_BLOCK})",
            _fastxent_linear_why_not,
            _fastxent_linear(vocab_block=VOCAB_BLOCK),
            True,
        ),
        Method(
            "fastxent-wide",
            "linear",
            f"fastxent.linear_cross_entropy(chunk_size={WIDE_CHUNK})",
            _fastxent_linear_why_not,
            _fastxent_linear(chunk_size=WIDE_CHUNK),
            True,
        ),
        Method("eager", "linear", "torch F.linear + F.cross_entropy", _can_run, _eager_linear),
        Method(
            "chunked",
            "linear",
            "torch F.linear_cross_entropy (chunked)",
            _chunked_why_not,
            _chunked_linear,
        ),
        Method(
            "cce",
            "linear",
            "Cut Cross-Entropy",
            _installed("cut_cross_entropy", "CCE"),
            _cce_linear,
        ),
        Method("liger", "linear", "Liger-Kernel fused linear", _liger_why_not, _liger_linear),
    ]
    return cross_entropy + linear


def methods_of(args: argparse.Namespace) -> list[Method]:
    """The methods the flags ask for; on CPU without --methods, --full or --quick, those in
    ``LEFT_OUT_BY_DEFAULT`` come back as methods that say why they do not run."""
    chosen = [m for m in methods() if _selected(m.name, args.methods)]
    if (
        args.methods is not None
        or args.full
        or args.quick
        or torch.device(args.device).type != "cpu"
    ):
        return chosen
    return [_left_out(m) if m.name in LEFT_OUT_BY_DEFAULT else m for m in chosen]


def _left_out(m: Method) -> Method:
    reason = f"left out unless --full, --quick or --methods {m.name} asks for it"
    return replace(m, why_not=lambda device: reason)


def method_names() -> list[str]:
    """Distinct method names, in order, for ``--methods``."""
    return list(dict.fromkeys(m.name for m in methods()))


def _selected(name: str, wanted: Sequence[str] | None) -> bool:
    """``--methods fastxent`` selects every ``fastxent-<backend>`` row as well."""
    if wanted is None:
        return True
    return any(name == w or name.startswith(w + "-") for w in wanted)


def _method(name: str, kind: str) -> Method:
    for m in methods():
        if m.name == name and m.kind == kind:
            return m
    raise ValueError(f"no method {name!r} for {kind} cases.")


# ---------------------------------------------------------------------------------------------
# Float64 reference and errors


def _rel(diff: float, ref: float) -> float:
    return diff / ref if ref > 0 else diff


@dataclass(frozen=True)
class CrossEntropyReference:
    """Float64 facts of one cross_entropy case: the mean loss, each row's log-sum-exp, and
    ``max|N ∂loss/∂z|``, the scale the gradient error is relative to."""

    loss: float
    lse: Tensor  # (N,) float64
    largest_scaled_grad: float


def _scaled_ref_grad(z: Tensor, y: Tensor, lse: Tensor, r: int) -> Tensor:
    """``N ∂loss/∂z = o - e_y`` of rows ``r : r + REFERENCE_ROWS`` in float64, a new tensor."""
    g = z[r : r + REFERENCE_ROWS].detach().to(torch.float64, copy=True)  # (rows, V), never z
    g.sub_(lse[r : r + REFERENCE_ROWS, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), y[r : r + REFERENCE_ROWS]] -= 1.0
    return g


def ce_reference(z: Tensor, y: Tensor) -> CrossEntropyReference:
    """The float64 loss ``mean_r (lse_r - z_{r,y_r})`` and its facts, in row chunks (never the
    whole N×V in float64)."""
    n = z.shape[0]
    rows = torch.arange(n, device=z.device)
    lse = torch.cat(
        [
            torch.logsumexp(z[r : r + REFERENCE_ROWS].detach().double(), dim=1)
            for r in range(0, n, REFERENCE_ROWS)
        ]
    )  # (N,)
    loss = (lse - z.detach()[rows, y].double()).mean().item()
    largest = max(
        _scaled_ref_grad(z, y, lse, r).abs_().max().item() for r in range(0, n, REFERENCE_ROWS)
    )
    return CrossEntropyReference(loss, lse, largest)


def ce_errors(
    z: Tensor, y: Tensor, reference: CrossEntropyReference, loss: Tensor, grad: Tensor
) -> tuple[float, float]:
    """Relative errors of a mean loss and its gradient ``∂loss/∂z = (o - e_y) / N``, the
    gradient compared as ``N·grad`` against float64 ``o - e_y``."""
    n = z.shape[0]
    worst = 0.0
    for r in range(0, n, REFERENCE_ROWS):
        diff = _scaled_ref_grad(z, y, reference.lse, r).sub_(grad[r : r + REFERENCE_ROWS], alpha=n)
        worst = max(worst, diff.abs_().max().item())
    return (
        _rel(abs(loss.double().item() - reference.loss), abs(reference.loss)),
        _rel(worst, reference.largest_scaled_grad),
    )


def linear_reference(h: Tensor, w: Tensor, y: Tensor) -> tuple[float, Tensor, Tensor]:
    """Loss, ``dh`` and ``dW`` of ``F.cross_entropy(h Wᵀ, y)`` in float64, in row chunks."""
    n = h.shape[0]
    w64 = w.detach().double().requires_grad_()
    dh, total = [], 0.0
    for r in range(0, n, LINEAR_REFERENCE_ROWS):
        hc = h[r : r + LINEAR_REFERENCE_ROWS].detach().double().requires_grad_()  # (rows, D)
        loss = F.cross_entropy(hc @ w64.T, y[r : r + LINEAR_REFERENCE_ROWS], reduction="sum") / n
        loss.backward()
        total += loss.item()
        dh.append(hc.grad)
    return total, torch.cat(dh), w64.grad


def linear_errors(
    reference: tuple[float, Tensor, Tensor], loss: Tensor, grads: list[Tensor]
) -> tuple[float, float]:
    """Relative errors of a loss and of the worse of ``dh`` and ``dW``."""
    ref_loss, *ref_grads = reference
    grad_err = max(
        _rel((g.double() - g_ref).abs().max().item(), g_ref.abs().max().item())
        for g, g_ref in zip(grads, ref_grads, strict=True)
    )
    return _rel(abs(loss.double().item() - ref_loss), abs(ref_loss)), grad_err


# ---------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds of ``fn()``, the device synchronised on both sides, and what it returned."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def time_step(runner: Runner, device: torch.device) -> float:
    """Seconds of one forward+backward; clearing and resetting happen outside the clock."""
    runner.prepare()
    return timed(runner.step, device)[0]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} is missing from /proc/self/status.")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set size (Linux >= 4.0)


def cpu_memory_reason() -> str | None:
    """Why the peak resident set size cannot be measured per step here, or None."""
    if not (os.path.exists("/proc/self/status") and os.access("/proc/self/clear_refs", os.W_OK)):
        return "peak RSS reset needs Linux /proc/self/clear_refs"
    return None


def peak_extra_bytes(runner: Runner, device: torch.device) -> int:
    """Bytes allocated beyond what was live before one forward+backward (gradients included).

    fastxent's CPU gradient buffer, kept between steps for reuse, is released first: it would
    otherwise count as live before the step and hide the gradient's memory.
    """
    runner.prepare()
    fastxent.empty_cache()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = runner.step()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        _reset_peak_rss()
        before = _status_kib("VmRSS")
        out = runner.step()
        extra = (_status_kib("VmHWM") - before) * 1024
    del out
    runner.clear()
    return max(extra, 0)


def allocated_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes held through PyTorch's CPU allocator while ``fn()`` runs, above the
    start: exact and deterministic, unlike the resident set size (no page or glibc effects).

    Read from the profiler's memory events, one per allocation and per free, each with the
    allocator's running total; the Chrome trace keeps them in order. (An op's own memory count
    would miss buffers that compiled code allocates outside any op and Python frees later.)
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [
        (e["args"]["Total Allocated"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0  # CPU
    ]
    if not totals:
        return 0
    start = totals[0][0] - totals[0][1]
    return max(0, max(total for total, _ in totals) - start)


def _reset_compiled_code() -> None:
    """Forget what torch.compile traced for the last case (nothing to do, and no second of
    importing dynamo, in a process that has not compiled)."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def memory_worker() -> None:
    """Subprocess entry: measure one method's peak memory on each case given as JSON on stdin.

    Prints one JSON line per case: ``{"bytes": int}`` or ``{"error": str}``. Compiled code is
    kept from one case to the next: each case's warm-up absorbs any (re)compilation.
    """
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    for fields in spec["cases"]:
        case = Case(**fields)
        try:
            inputs = make_inputs(case, device)
            runner = _method(spec["method"], case.kind).build(inputs, device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(spec["warmup"]):
                    runner.prepare()
                    runner.step()
                result = {"bytes": peak_extra_bytes(runner, device)}
            del runner, inputs
        except Exception as error:  # reported in the results, never fatal
            result = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(result), flush=True)


def measure_memory_in_subprocess(
    name: str, cases: list[Case], warmup: int, threads: int
) -> list[int | str]:
    """Peak extra bytes of method ``name`` on each case (or why not), in a fresh process that
    uses ``threads`` torch threads.

    A fixed mmap threshold makes glibc hand every freed block above 64 KiB back to the system, so
    memory freed by one case is not silently reused by the next.
    """
    spec = {
        "method": name,
        "device": "cpu",
        "threads": threads,
        "warmup": warmup,
        "cases": [asdict(c) for c in cases],
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    source = str(Path(fastxent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    code = "import fastxent.bench as b; b.memory_worker()"
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(lines) != len(cases):
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return [f"memory subprocess failed (exit {done.returncode}): {tail[0]}"] * len(cases)
    return [line.get("bytes", line.get("error")) for line in lines]


# ---------------------------------------------------------------------------------------------
# One case


@dataclass
class Row:
    """Results of one method on one case."""

    name: str
    label: str
    is_fastxent: bool = False
    skipped: str | None = None
    note: str | None = None
    first_call_s: float | None = None  # the first warm-up run: compilation included
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    ratio: float | None = None
    peak_extra_bytes: int | None = None
    memory_skipped: str | None = None
    loss_rel_err: float | None = None
    grad_rel_err: float | None = None


def _floor(case: Case, inputs: dict[str, Tensor], device: torch.device, quick: bool):
    """The floor's timed step and what it records: a copy (cross_entropy) or three matmuls."""
    dtype = DTYPES[case.dtype]
    if case.kind == "cross_entropy":
        size = (QUICK_BANDWIDTH_BYTES if quick else BANDWIDTH_BYTES) // dtype.itemsize
        src = torch.ones(size, dtype=dtype, device=device)
        dst = torch.empty_like(src)
        must_move = 3 * case.n * case.v * dtype.itemsize  # read z twice, write the gradient once

        def copy() -> None:
            dst.copy_(src)

        # One copy moves 2·size·itemsize bytes; the floor moves must_move at the same rate.
        scale = must_move / (2 * size * dtype.itemsize)
        label = "floor: 3·N·V bytes at copy bandwidth"
        return copy, scale, label, case.n * case.v * dtype.itemsize
    h, w = inputs["h"].detach(), inputs["w"].detach()
    z = torch.empty(case.n, case.v, dtype=dtype, device=device)  # (N, V), reused as g
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def matmuls() -> None:
        torch.mm(h, w.T, out=z)  # z = h Wᵀ      (N, V)
        torch.mm(z, w, out=dh)  # dh = g W      (N, D)
        torch.mm(z.T, h, out=dw)  # dW = gᵀ h   (V, D)

    return matmuls, 1.0, "floor: 3 matmuls", (h.numel() + w.numel()) * dtype.itemsize


@dataclass(frozen=True)
class Timing:
    """How each method is timed: ``warmup`` untimed runs, then up to ``repeats`` timed ones,
    fewer when they would take more than ``budget_s`` seconds (0: no limit)."""

    repeats: int
    warmup: int
    budget_s: float

    def runs_within_budget(self, first_run_s: float) -> int:
        """Timed runs for a method whose first timed run took ``first_run_s`` seconds."""
        if self.budget_s <= 0 or first_run_s * self.repeats <= self.budget_s:
            return self.repeats
        return max(1, int(self.budget_s // first_run_s))


def run_case(
    case: Case,
    candidates: list[Method],
    device: torch.device,
    timing: Timing,
    quick: bool,
    advance: Callable[[], None],
) -> tuple[list[Row], dict]:
    """Warm up, check errors, then time every runnable method, interleaved; memory on CUDA."""
    _reset_compiled_code()
    inputs = make_inputs(case, device)
    if case.kind == "cross_entropy":
        reference = ce_reference(inputs["z"], inputs["y"])
    else:
        reference = linear_reference(inputs["h"], inputs["w"], inputs["y"])
    rows, runners = [], {}
    for m in candidates:
        row = Row(m.name, m.label, m.is_fastxent)
        rows.append(row)
        row.skipped = m.why_not(device)
        if row.skipped is not None:
            continue
        if m.name == "cce":
            row.label = f"{m.label} (impl={_cce_impl(device)})"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                runner = m.build(inputs, device)
                for i in range(timing.warmup):  # the last warm-up run's output is checked
                    runner.prepare()
                    elapsed, (loss, grads) = timed(runner.step, device)
                    if i == 0:
                        row.first_call_s = elapsed
                    advance()
            said = [w for w in caught if not issubclass(w.category, _QUIET_WARNINGS)]
            if said:
                row.note = str(said[0].message).splitlines()[0][:200]
        except Exception as error:  # a peer that fails is reported, not fatal
            row.skipped = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        if case.kind == "cross_entropy":
            errors = ce_errors(inputs["z"], inputs["y"], reference, loss, grads[0])
        else:
            errors = linear_errors(reference, loss, grads)
        row.loss_rel_err, row.grad_rel_err = errors
        del loss, grads
        if device.type == "cuda":
            row.peak_extra_bytes = peak_extra_bytes(runner, device)
        runner.clear()
        runners[m.name] = runner

    floor_step, floor_scale, floor_label, floor_bytes = _floor(case, inputs, device, quick)
    for _ in range(timing.warmup):  # as every method: its first run faults in its fresh buffers
        timed(floor_step, device)
    floor = Row("floor", floor_label, peak_extra_bytes=floor_bytes)
    floor.note = "memory: the gradients themselves"
    rows.append(floor)
    by_name = {row.name: row for row in rows if row.name in runners or row is floor}
    order = list(by_name)
    # A peer is cut after the first round if over budget; fastxent and the floor, which the
    # ratios are taken against, always get every run.
    runs = dict.fromkeys(order, timing.repeats)
    for r in range(timing.repeats):
        k = r % len(order)
        for name in order[k:] + order[:k]:  # interleaved, the order rotating each round
            if r < runs[name]:
                if name == "floor":
                    elapsed = timed(floor_step, device)[0]
                    by_name[name].times_s.append(floor_scale * elapsed)
                else:
                    elapsed = time_step(runners[name], device)
                    by_name[name].times_s.append(elapsed)
                if r == 0 and not (by_name[name].is_fastxent or name == "floor"):
                    runs[name] = timing.runs_within_budget(elapsed)  # peers only
            advance()
    for name, count in runs.items():
        if count < timing.repeats:
            cut = (
                f"timed {count} of {timing.repeats} runs: {timing.repeats} would exceed the "
                f"{timing.budget_s:g} s budget (--budget)"
            )
            by_name[name].note = "; ".join(filter(None, [by_name[name].note, cut]))
    del runners
    extra = {}
    if case.kind == "cross_entropy" and floor.times_s:
        must_move = 3 * case.n * case.v * DTYPES[case.dtype].itemsize
        extra["bandwidth_gbps"] = must_move / statistics.median(floor.times_s) / 1e9
    for row in rows:
        if row.times_s:
            row.median_s = statistics.median(row.times_s)
    return rows, extra


def _baseline(case: Case, rows: list[Row], device: torch.device) -> Row | None:
    """The fastxent row the ratios divide by: the backend "auto" picks for the case's logits,
    else the first timed."""
    auto = "fastxent"
    with contextlib.suppress(RuntimeError):
        auto = "fastxent-" + functional.resolve_backend("auto", device, case.n * case.v)[0]
    ran = [row for row in rows if row.is_fastxent and row.median_s]
    return next((row for row in ran if row.name == auto), ran[0] if ran else None)


# ---------------------------------------------------------------------------------------------
# Report


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
            cpu,
        )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastxent": fastxent.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict], console) -> None:
    """One table per case; skip reasons and warnings listed once each, under the tables."""
    from rich.table import Table

    notes: list[str] = []
    for result in results:
        case = Case(**result["case"])
        table = Table(title=case.label, title_justify="left", min_width=72)
        table.add_column("method", no_wrap=True)
        for header in ("ms", "× fastxent", "1st call s", "peak MiB", "loss err", "grad err"):
            table.add_column(header, justify="right")
        for row in result["rows"]:
            said = [row["skipped"]] if row["skipped"] else [row["memory_skipped"], row["note"]]
            marks = []
            for note in filter(None, said):
                if note not in notes:
                    notes.append(note)
                marks.append(str(notes.index(note) + 1))
            mark = f" ({','.join(marks)})" if marks else ""
            memory = row["peak_extra_bytes"]
            table.add_row(
                row["name"] + mark,
                _fmt(None if row["median_s"] is None else 1e3 * row["median_s"], ".1f"),
                _fmt(row["ratio"], ".2f"),
                _fmt(row["first_call_s"], ".2f"),
                _fmt(None if memory is None else memory / MIB, ".0f"),
                _fmt(row["loss_rel_err"], ".1e"),
                _fmt(row["grad_rel_err"], ".1e"),
                style="dim" if row["skipped"] else ("bold" if row["is_fastxent"] else None),
            )
        console.print(table)
    for i, note in enumerate(notes, 1):
        console.print(f"({i}) {note}", highlight=False, markup=False)


# The CPU performance goals, at the shapes they are stated for (a 2-core machine). Each is
# checked when its case is in the run (the headline cases always are; the linear one with --full).
GOAL_CE = Case("cross_entropy", 4096, HEADLINE_V, "float32")
GOAL_CE_HALF = Case("cross_entropy", 4096, HEADLINE_V, "bfloat16")
GOAL_LINEAR = Case("linear", 2048, 65536, "float32", 512)
ONE_BUFFER_SLACK = 1.01  # "one N×V buffer": plus 1% for per-row vectors (N·V·4 is 512 MiB)


@dataclass(frozen=True)
class Goal:
    """One stated goal and what this run measured: met when ``value`` is on the right side of
    ``target`` (``at_most``: value <= target, else value >= target)."""

    case: str
    goal: str
    value: float
    target: float
    at_most: bool

    @property
    def met(self) -> bool:
        return self.value <= self.target if self.at_most else self.value >= self.target


def _rows_of(results: list[dict], case: Case) -> dict[str, dict] | None:
    """The rows (by method name) of ``case`` in the finished ``results``, or None."""
    for result in results:
        if Case(**result["case"]) == case:
            return {row["name"]: row for row in result["rows"]}
    return None


def goal_checks(results: list[dict]) -> list[Goal]:
    """The CPU goals whose cases (and rows) are in ``results``, each with its measured value."""
    goals: list[Goal] = []

    def add(case: Case, goal: str, value: float | None, target: float, at_most: bool) -> None:
        if value is not None:
            goals.append(Goal(case.label, goal, value, target, at_most))

    def ratio(a: dict | None, b: dict | None, key: str = "median_s") -> float | None:
        if a is None or b is None or not a.get(key) or not b.get(key):
            return None
        return a[key] / b[key]

    ce = _rows_of(results, GOAL_CE)
    if ce is not None:
        fx = ce.get("fastxent-compiled")
        add(GOAL_CE, "× faster than torch eager", ratio(ce.get("eager"), fx), 5.0, False)
        add(GOAL_CE, "× the bandwidth floor's time", ratio(fx, ce.get("floor")), 1.5, True)
        one_buffer = GOAL_CE.n * GOAL_CE.v * DTYPES[GOAL_CE.dtype].itemsize
        memory = None if fx is None or not fx["peak_extra_bytes"] else fx["peak_extra_bytes"]
        add(
            GOAL_CE,
            "peak memory ÷ one N×V buffer (1% for per-row vectors)",
            None if memory is None else memory / one_buffer,
            ONE_BUFFER_SLACK,
            True,
        )
    half = _rows_of(results, GOAL_CE_HALF)
    if ce is not None and half is not None:
        add(
            GOAL_CE_HALF,
            "× the float32 time (bf16 at least as fast)",
            ratio(half.get("fastxent-compiled"), ce.get("fastxent-compiled")),
            1.0,
            True,
        )
    linear = _rows_of(results, GOAL_LINEAR)
    if linear is not None:
        eager, chunked = linear.get("eager"), linear.get("chunked")
        # The wide chunks trade memory for time: the memory goals are not theirs to meet.
        for name, walk, memory_goals in (
            ("fastxent-linear", "token walk", True),
            ("fastxent-vocab", "vocab walk", True),
            ("fastxent-wide", f"token walk, {WIDE_CHUNK}-row chunks", False),
        ):
            fx = linear.get(name)
            add(
                GOAL_LINEAR,
                f"{walk}: × three matmuls' time",
                ratio(fx, linear.get("floor")),
                1.1,
                True,
            )
            if memory_goals:
                add(
                    GOAL_LINEAR,
                    f"{walk}: × less peak memory than eager",
                    ratio(eager, fx, "peak_extra_bytes"),
                    10.0,
                    False,
                )
            add(GOAL_LINEAR, f"{walk}: × faster than torch chunked", ratio(chunked, fx), 1.0, False)
            if memory_goals:
                add(
                    GOAL_LINEAR,
                    f"{walk}: × less peak memory than torch chunked",
                    ratio(chunked, fx, "peak_extra_bytes"),
                    1.0,
                    False,
                )
    return goals


def print_goals(goals: list[Goal], console) -> None:
    """The goal checks as one table (nothing when no goal case ran)."""
    from rich.table import Table

    if not goals:
        return
    table = Table(title="goals (CPU, at their stated shapes; this run)", title_justify="left")
    for header, justify in (("case", "left"), ("goal", "left"), ("measured", "right")):
        table.add_column(header, justify=justify)
    table.add_column("target", justify="right")
    table.add_column("met", justify="center")
    for g in goals:
        sign = "≤" if g.at_most else "≥"
        table.add_row(
            g.case,
            g.goal,
            f"{g.value:.2f}",
            f"{sign} {g.target:g}",
            "yes" if g.met else "no",
            style=None if g.met else "yellow",
        )
    console.print(table)


# One colour per method in every panel of the plot; fastxent's usual path of each kind (the
# compiled kernel, the token walk) shares the first, so the eye follows it from row to row.
PLOT_COLORS = {
    "fastxent-compiled": "C0",
    "fastxent-linear": "C0",
    "fastxent-torch": "C1",
    "fastxent-triton": "C2",
    "eager": "C3",
    "compile": "C4",
    "liger": "C5",
    "cce": "C6",
    "chunked": "C7",
    "fastxent-vocab": "C8",
    "fastxent-wide": "C9",
    "floor": "black",
}
# The floor row's memory is not what its time is (the products or the copy): the gradients.
FLOOR_MEMORY_LABEL = "floor: the gradients' own memory"


def plot(results: list[dict], path: Path) -> None:
    """Time and peak memory against V, one line per (method, dtype), one row per kind; each
    method in the same colour (:data:`PLOT_COLORS`) in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(r["case"]["kind"] == k for r in results)]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 6 * len(kinds)), squeeze=False)
    for (ax_time, ax_mem), kind in zip(axes, kinds, strict=True):
        lines: dict[tuple[str, str], list[tuple[int, float | None, int | None]]] = {}
        for result in results:
            case = result["case"]
            if case["kind"] != kind:
                continue
            for row in result["rows"]:
                if row["median_s"] is None:
                    continue
                point = (case["v"], row["median_s"], row["peak_extra_bytes"])
                lines.setdefault((row["name"], row["label"], case["dtype"]), []).append(point)
        dashes = {dtype: ls for dtype, ls in zip(DTYPES, ("-", "--", ":", "-."), strict=True)}
        markers = {dtype: mk for dtype, mk in zip(DTYPES, ("o", "s", "^", "D"), strict=True)}
        undrawn = 0  # series with a peak of 0 (below what the RSS measurement resolves)
        for (name, label, dtype), points in sorted(lines.items(), key=lambda item: item[0][1:]):
            points.sort()
            color = PLOT_COLORS.get(name, "grey")
            style = {"color": color, "linestyle": dashes[dtype], "marker": markers[dtype]}
            v = [p[0] for p in points]
            ax_time.plot(v, [1e3 * p[1] for p in points], label=f"{label} {dtype}", **style)
            memory = [(p[0], p[2] / MIB) for p in points if p[2]]  # log axis: no zeros
            undrawn += any(p[2] == 0 for p in points)
            if memory:
                mem_label = FLOOR_MEMORY_LABEL if name == "floor" else label
                ax_mem.plot(*zip(*memory, strict=True), label=f"{mem_label} {dtype}", **style)
        if undrawn:
            ax_mem.text(
                0.01, 0.01, f"{undrawn} series at 0 MiB (below resolution): not drawn there",
                transform=ax_mem.transAxes, fontsize=7,
            )  # fmt: skip
        for ax, ylabel in [(ax_time, "forward+backward (ms)"), (ax_mem, "peak extra memory (MiB)")]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(ylabel)
            ax.set_title(kind)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:  # below the axes, where it hides no point; one column: no overlap
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in _names(text)]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    if not all(names):  # "a,,b" or "a,": a name left out, or a typo
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _listed(values: Sequence[object]) -> str:
    return ",".join(map(str, values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastxent bench`` flags to ``parser``."""
    d = DEFAULTS
    shapes = parser.add_argument_group("shapes (--full and --quick change the defaults)")
    shapes.add_argument(
        "--n", type=int, help=f"rows of the cross_entropy cases (default: {d['n']})"
    )
    shapes.add_argument(
        "--v", type=_ints, help=f"vocabulary sizes, comma-separated (default: {_listed(d['v'])})"
    )
    shapes.add_argument(
        "--linear-n", type=int, help=f"rows of the linear cases (default: {d['linear_n']})"
    )
    shapes.add_argument(
        "--d", type=int, help=f"hidden size of the linear cases (default: {d['d']})"
    )
    shapes.add_argument(
        "--linear-v",
        type=_ints,
        help=f"vocabulary sizes of the linear cases (default: {_listed(d['linear_v'])})",
    )
    parser.add_argument(
        "--dtypes",
        type=_names,
        default=["float32", "bfloat16"],
        help=f"dtypes of the cross_entropy cases, comma-separated, from {', '.join(DTYPES)}; "
        f"without --v or --quick, dtypes after the first run at V={HEADLINE_V} only "
        "(default: float32,bfloat16)",
    )
    parser.add_argument(
        "--linear-dtypes",
        type=_names,
        default=["float32"],
        help=f"dtypes of the linear cases, from {', '.join(DTYPES)} (default: float32)",
    )
    parser.add_argument("--no-linear", action="store_true", help="skip the linear cases")
    parser.add_argument(
        "--methods",
        type=_names,
        help="methods to run, comma-separated; 'fastxent' selects every fastxent row (each "
        "backend and the linear walks); only the cases of a kind they run are timed "
        f"(default: all of {', '.join(method_names())}; but on "
        "CPU without --full or --quick, "
        f"{' and '.join(LEFT_OUT_BY_DEFAULT)} are shown as skipped linear rows: name them to run "
        "them)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--repeats", type=int, help=f"timed runs per method (default: {DEFAULT_REPEATS})"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help="untimed runs first (compilation); the last is checked against float64 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds of timed runs per peer and case: a slower peer gets fewer runs, at least "
        f"one; fastxent and the floor always get --repeats (default: {DEFAULT_BUDGET_S:g}; "
        "0: no cut)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--full",
        action="store_true",
        help=f"the shapes the goals are stated at: V={_listed(FULL['v'])}, linear "
        f"N={FULL['linear_n']} D={FULL['d']} V={_listed(FULL['linear_v'])}, nothing left out "
        "(minutes)",
    )
    preset.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny shapes: N={QUICK['n']} V={_listed(QUICK['v'])}, linear N={QUICK['linear_n']} "
        f"D={QUICK['d']} V={_listed(QUICK['linear_v'])}, each --dtypes dtype at every V, "
        f"nothing left out, a {QUICK_BANDWIDTH_BYTES >> 20} MiB bandwidth copy, "
        f"{QUICK_REPEATS} timed runs (under a minute, most of it memory subprocesses: "
        "--no-memory skips them)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output directory (default: %(default)s)",
    )


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, or None."""
    for name in ("n", "linear_n", "d", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if not (math.isfinite(args.budget) and args.budget >= 0):
        return f"--budget must be a finite number of seconds >= 0 (0: no cut), got {args.budget:g}"
    if args.warmup < 1:
        return f"--warmup must be >= 1 (its last run is the one checked), got {args.warmup}"
    for dtype in [*args.dtypes, *args.linear_dtypes]:
        if dtype not in DTYPES:
            return f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}"
    known = [*method_names(), "fastxent"]
    for name in args.methods or []:
        if name not in known:
            return f"unknown method {name!r}; choose from {', '.join(dict.fromkeys(known))}"
    problem = device_problem(args.device)
    if problem is not None:
        return f"--device {problem}"
    cases = cases_of(args)
    if not cases:
        return "no selected method runs on the selected cases (--no-linear with linear methods?)"
    return _memory_problem(cases) or _out_problem(args.out)


def _memory_problem(cases: Sequence[Case]) -> str | None:
    """A case whose inputs alone (drawn in float32) would not fit in this machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare
        return None
    for case in cases:
        elements = case.n * case.v if case.kind == "cross_entropy" else (case.n + case.v) * case.d
        if elements * 4 > total:
            shape = f"N={case.n} V={case.v}" + (f" D={case.d}" if case.d else "")
            return (
                f"the {case.kind} case {shape} needs {elements * 4 / 2**30:.3g} GiB for its "
                f"inputs alone; this machine has {total / 2**30:.3g} GiB"
            )
    return None


def _out_problem(out: Path) -> str | None:
    """Why ``--out`` cannot take the results, found before the run rather than after it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"--out {out}: cannot make that directory ({error.strerror})"
    if not os.access(out, os.W_OK):
        return f"--out {out}: the directory is not writable"
    for path in (out / name for name in RESULT_FILES):
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            return f"--out {out}: cannot write {path.name} there (a directory or read-only file)"
    return None


def cases_of(args: argparse.Namespace) -> list[Case]:
    """The cases the flags ask for, in run order; only those of a kind a selected method runs
    (``--methods fastxent-linear`` times no cross_entropy case, not even its floor)."""
    shapes = QUICK if args.quick else FULL if args.full else DEFAULTS
    n = args.n or shapes["n"]
    sweep = args.v or shapes["v"]
    kinds = {m.kind for m in methods_of(args)}
    cases = [
        Case("cross_entropy", n, v, dtype)
        for i, dtype in enumerate(args.dtypes)
        for v in (sweep if i == 0 or args.v or args.quick else [HEADLINE_V])
        if "cross_entropy" in kinds
    ]
    if not args.no_linear and "linear" in kinds:
        linear_n, d = args.linear_n or shapes["linear_n"], args.d or shapes["d"]
        cases += [
            Case("linear", linear_n, v, dtype, d)
            for dtype in args.linear_dtypes
            for v in args.linear_v or shapes["linear_v"]
        ]
    return cases


def run(args: argparse.Namespace) -> int:
    """Run the suite the flags describe; 0 when every fastxent row ran within tolerance."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    importlib.import_module("matplotlib")  # the plot's: if missing, fail now, not after the run
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for the table, not rich's 80
        console = Console(width=120)
    plain = not console.is_terminal or console.is_dumb_terminal  # where rich draws no bar

    def log(line: str) -> None:
        """A line per finished row, where there is no bar (a log, a pipe): it shows progress."""
        if plain:
            console.print(line, highlight=False, markup=False, soft_wrap=True)

    problem = _check(args)
    if problem is not None:
        print(f"fastxent bench: error: {problem}.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    timing = Timing(repeats, args.warmup, args.budget)
    cases = cases_of(args)
    chosen = methods_of(args)
    per_case = {k: [m for m in chosen if m.kind == k] for k in KINDS}
    memory_reason = "not measured (--no-memory)" if args.no_memory else None
    if device.type == "cpu" and memory_reason is None:
        memory_reason = cpu_memory_reason()

    def steps(case: Case) -> int:  # progress units of one case: every run, floor included
        return len(per_case[case.kind]) * (args.warmup + repeats) + repeats

    results = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    # Triton's kernels (fastxent's, Liger's, CCE's) launch on the current device.
    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with progress, current:
        task = progress.add_task("timing", total=sum(steps(c) for c in cases))
        done = 0
        for case in cases:
            progress.update(task, description=f"timing {case.label}")
            rows, extra = run_case(
                case,
                per_case[case.kind],
                device,
                timing,
                args.quick,
                lambda: progress.advance(task),
            )
            results.append({"case": case, "rows": rows, **extra})
            for row in rows:
                log(_timing_line(case, row))
            done += steps(case)
            progress.update(task, completed=done)  # skipped methods never advanced
            gc.collect()
        if device.type == "cpu":
            _cpu_memory(results, memory_reason, args.warmup, progress, log)

    failures = []
    for result in results:
        case, rows = result["case"], result["rows"]
        base = _baseline(case, rows, device)
        result["baseline"] = base.name if base else None
        for row in rows:
            if base and row.median_s is not None:
                row.ratio = row.median_s / base.median_s
            if device.type == "cuda" and row.peak_extra_bytes is None and not row.skipped:
                row.memory_skipped = memory_reason
            if row.is_fastxent:
                failures += _fastxent_failures(case, row)
        result["case"] = asdict(case)
        result["rows"] = [asdict(row) for row in rows]

    report = {
        "machine": machine_info(device),
        "settings": {
            "repeats": repeats,
            "warmup": args.warmup,
            "budget_s": args.budget,
            "quick": args.quick,
            "flags": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if v is None or isinstance(v, (bool, int, float, str, list, Path))
            },
            "tolerance": TOLERANCE,
            "error": "loss: |l - l64|/|l64|; grad: max|g - g64| / max|g64| (worst of dh, dW)",
            "memory": "peak bytes beyond the inputs during one forward+backward, grads included",
        },
        "cases": results,
    }
    goals = goal_checks(results) if device.type == "cpu" else []
    report["goals"] = [{**asdict(g), "met": g.met} for g in goals]
    print_table(results, console)  # first: what was measured is shown even if a write fails
    print_goals(goals, console)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (args.out / name for name in RESULT_FILES)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(results, png_path)
    console.print(f"raw numbers: {json_path}   plot: {png_path}")
    for failure in failures:
        console.print(f"FAILED {failure}", style="red")
    return 1 if failures else 0


def _timing_line(case: Case, row: Row) -> str:
    """One finished row as a plain line, for a log."""
    if row.skipped is not None:
        return f"{case.label} {row.name}: skipped ({row.skipped})"
    ms = None if row.median_s is None else 1e3 * row.median_s
    return f"{case.label} {row.name}: {_fmt(ms, '.1f')} ms"


def _memory_line(case: Case, row: Row) -> str:
    """One row's measured memory as a plain line, for a log."""
    if row.peak_extra_bytes is None:
        return f"{case.label} {row.name}: memory not measured ({row.memory_skipped})"
    return f"{case.label} {row.name}: peak {row.peak_extra_bytes / MIB:.0f} MiB"


def _cpu_memory(
    results: list[dict],
    reason: str | None,
    warmup: int,
    progress,
    log: Callable[[str], None],
) -> None:
    """Fill in peak memory on CPU: one subprocess per method, over every case it ran on (both
    kinds: a method that runs on both pays its imports once),
    ``MEMORY_PROCESSES`` at a time, the torch threads shared out between them; ``log`` gets a
    line per row as each method finishes."""
    by_method: dict[str, list[tuple[Case, Row]]] = {}
    for result in results:
        for row in result["rows"]:
            if row.name == "floor" or row.skipped:
                continue
            if reason is not None:
                row.memory_skipped = reason
                continue
            by_method.setdefault(row.name, []).append((result["case"], row))
    if not by_method:
        return
    task = progress.add_task(
        f"memory: each method in its own process, {MEMORY_PROCESSES} at a time",
        total=len(by_method),
    )
    threads = max(1, torch.get_num_threads() // MEMORY_PROCESSES)

    def measure(name: str, pairs: list[tuple[Case, Row]]) -> list[tuple[Case, Row]]:
        cases = [case for case, _ in pairs]
        measured = measure_memory_in_subprocess(name, cases, warmup, threads)
        for (_, row), value in zip(pairs, measured, strict=True):
            if isinstance(value, int):
                row.peak_extra_bytes = value
            else:
                row.memory_skipped = value
        progress.advance(task)
        return pairs

    def cost(item) -> float:  # the longest processes first, for the shortest schedule
        # Each case runs a warm-up and a step; the first call includes compilation (torch.compile
        # start-up in the first case), which is most of a compiling method's process.
        return -sum((row.first_call_s or 0.0) + (row.median_s or 0.0) for _, row in item[1])

    with concurrent.futures.ThreadPoolExecutor(MEMORY_PROCESSES) as pool:
        todo = sorted(by_method.items(), key=cost)
        jobs = [pool.submit(measure, name, pairs) for name, pairs in todo]
        for job in concurrent.futures.as_completed(jobs):
            for case, row in job.result():  # logged here, by one thread
                log(_memory_line(case, row))


def _fastxent_failures(case: Case, row: Row) -> list[str]:
    if row.skipped is not None:
        return (
            [f"{case.label} {row.name}: {row.skipped}"] if row.skipped.startswith("failed") else []
        )
    tolerance = TOLERANCE[case.dtype]
    return [
        f"{case.label} {row.name}: {what} relative error {err:.2e} > {tolerance:.0e}"
        for what, err in (("loss", row.loss_rel_err), ("grad", row.grad_rel_err))
        if err is not None and err > tolerance
    ]
