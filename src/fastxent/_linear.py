r"""Fused linear + cross-entropy: the N×V logits exist one chunk of tokens at a time.

For hidden states ``h`` (N, D), weight ``W`` (V, D) and bias ``b`` (V,), the logits are
``z = h Wᵀ + b``. Tokens are processed in chunks of ``n`` rows; per chunk:

.. math::

    z_c = h_c W^\top + b \;(n, V), \qquad
    g_c = \partial\ell/\partial z_c \text{ (row kernel, written over } z_c),

    \partial\ell/\partial h_c = g_c W, \qquad
    \partial\ell/\partial W \mathrel{+}= g_c^\top h_c, \qquad
    \partial\ell/\partial b \mathrel{+}= \textstyle\sum_r g_{c,r}

The row kernel (contract: :mod:`fastxent._autograd`) gets the reduction's scales computed once
over all targets, so "mean" is exact across chunks. Ignored tokens are dropped before the matmul.
With "mean"/"sum" the three gradients are complete after forward and backward only scales them by
``grad_output``. With "none", ∂ℓ/∂W sums over rows, so a per-row ``grad_output`` cannot be applied
afterwards: forward computes the losses only, and backward recomputes each chunk's logits with
the rows of the gradient multiplied by ``grad_output``.

Memory beyond the inputs and the gradients themselves: one chunk of logits (by default, for
float32 on CPU a sixth of ∂W's bytes or 16 MiB, else half of ∂W or 64 MB, whichever is more:
:func:`default_chunk_size`), the row kernel's temporaries, and an (n, D) block. On CPU the
float32 chunk products ``h_c Wᵀ`` and ``g_c W`` are oneDNN's (:func:`small_rows_linear`), which
keeps their speed at the few rows that this budget allows, or MKL's on Intel CPUs, where it is
the faster (:func:`mkl_outpaces_onednn`).

With the vocabulary split across ranks (:mod:`fastxent.distributed`) the same walk runs on every
rank with the vocab-parallel row kernel and the local ``W_r``, ``b_r``: ∂W_r and ∂b_r are then
complete on each rank, while ``g_c W_r`` is one rank's share of ∂h, summed over the ranks by
``LinearOptions.reduce_hidden_grad`` once the walk is done.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastxent._autograd import (
    Kernel,
    accumulation_dtype,
    deferred_factor,
    first_order_backward,
    keep_for_backward,
    power_of_two_at_most,
    reduction_scales,
    reusable_empty,
    scaled_gradients,
    scaled_in_blocks,
    times_deferred,
)
from fastxent._options import (
    CrossEntropyOptions,
    check_count,
    check_device,
    check_flag,
    check_number,
    check_target_kind,
    is_finite,
    quiet_under_jit_trace,
)

CHUNK_BYTES = 64 << 20  # logits of one chunk: 64 MB, or half of ∂W's accumulator if that is more
CHUNK_ROWS_MULTIPLE = 64  # default chunks are made even in multiples of this many rows
CHUNK_ROWS_FINE = 8  # ... or of this many, where 64 does not fit (see default_chunk_size)
# float32 on CPU, where chunks of few rows keep the matmuls' rate (small_cpu_chunks), a chunk
# holds a sixth of ∂W's bytes, or 16 MiB when that is more (fewer, larger calls for a small V·D).
CPU_CHUNK_SHARE = 6
CPU_CHUNK_MIN_BYTES = 16 << 20
CPUINFO = "/proc/cpuinfo"  # where Linux names the CPU's vendor (mkl_outpaces_onednn)
FILTER_BLOCK = 128  # vocabulary entries per block for filter_eps (a multiple of GPU tile widths)
WEIGHT_BLOCK = 8192  # vocab rows per half-precision ∂W product before its float32 accumulation
# On CUDA, ∂W += gᵀh for half-precision g, h goes straight into the float32 accumulator
# (torch.addmm with out_dtype): no half-precision (V, D) product in between. None: not yet
# tried (cuda_float32_out_matmul); False: this PyTorch cannot.
CUDA_FLOAT32_OUT_MATMUL: bool | None = (
    None if "dtype_out" in torch.ops.aten.addmm.overloads() else False
)


def cuda_float32_out_matmul() -> bool:
    """Whether cuBLAS adds half-precision ``gᵀh`` into a float32 ``∂W`` (``torch.addmm`` with
    ``out_dtype``), tried once on tiny tensors of the current CUDA device.

    PyTorch has the overloads from 2.8, but its first addmm refused a float32 ``self`` with
    half-precision operands ("self and mat2 must have the same dtype", pytorch#154086), which
    a later release relaxed: only a try tells. Otherwise ∂W goes by blocks of half-precision
    products added in float32.
    """
    global CUDA_FLOAT32_OUT_MATMUL
    if CUDA_FLOAT32_OUT_MATMUL is None:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
            acc = torch.zeros(2, 2, device="cuda")
            torch.mm(a, a, out_dtype=acc.dtype, out=acc)
            torch.addmm(acc, a, a, out_dtype=acc.dtype, out=acc)
            CUDA_FLOAT32_OUT_MATMUL = bool((acc == 4.0).all())  # one host sync, once
        except (RuntimeError, TypeError, AssertionError):  # AssertionError: no CUDA in torch
            CUDA_FLOAT32_OUT_MATMUL = False
    return CUDA_FLOAT32_OUT_MATMUL


@dataclass(frozen=True)
class LinearOptions:
    """Options of one linear_cross_entropy call: the loss's, plus how the tokens are walked.

    ``shift``: loss row ``(b, t)`` uses hidden ``(b, t)`` and target ``(b, t + 1)``.
    ``chunk_size``: tokens per chunk. ``filter_eps``: skip vocab blocks with ``|g| < eps``.
    ``reduce_hidden_grad``: completes ∂h in place when each rank computed a partial sum of it
    (a SUM all-reduce over the tensor-parallel group); None on a single device.
    ``vocab_block``: None walks token chunks (:func:`chunked_pass`); an int walks blocks of that
    many classes over all tokens (:func:`vocab_pass`).
    """

    ce: CrossEntropyOptions
    chunk_size: int
    shift: bool = False
    filter_eps: float | None = None
    reduce_hidden_grad: Callable[[Tensor], object] | None = None
    vocab_block: int | None = None  # walk the vocabulary in blocks instead (see vocab_pass)


def default_chunk_size(
    num_classes: int,
    dim: int,
    dtype: torch.dtype,
    num_tokens: int | None = None,
    device_type: str = "cuda",
) -> int:
    """Tokens per chunk: one chunk of logits within a budget that ∂W's size sets.

    Every chunk reads and writes all of ∂W's accumulator (V×D, float32 for half-precision
    weights) once, while its three matmuls do ``6·n·V·D`` FLOPs: the share of that traffic falls
    as ``1/n`` whatever V and D are. So the budget is counted in rows: ``R = D · acc_itemsize /
    itemsize`` rows of logits have ∂W's bytes (D rows for bf16 with float32 accumulation).

    * ``max(CHUNK_BYTES, R / 2 rows)`` by default: a GPU does ~160 bf16 FLOPs per byte
      (H100/H200), so chunks must be wide (a fixed 64 MB is only 131 bf16 rows at V = 256000).
    * ``max(CPU_CHUNK_MIN_BYTES, R / CPU_CHUNK_SHARE rows)`` for float32 on CPU
      (``device_type="cpu"``) with oneDNN in the build (:func:`small_cpu_chunks`): its
      products keep their rate on chunks of ~64 rows, so the chunk can be small beside ∂W: at
      N = 2048, D = 512, V = 65536, 80-row chunks of 20 MiB beside ∂W's 128 MiB, at ~1.1x the
      time of three unchunked matmuls (``python benchmarks/linear_chunks.py``). bf16 on CPU
      keeps the wide budget: its float32 ∂W accumulation is one more pass over ∂W per chunk
      (170-row chunks took 1.26x the time of 512-row ones at that shape).

    Given ``num_tokens``, the same number of chunks is made even: ``ceil(N / k)`` rows for the
    ``k`` chunks the limit needs, rounded up to a multiple of ``CHUNK_ROWS_MULTIPLE`` within it
    (a short last chunk costs nearly a full one; on an H200, Gemma-2-2B shapes: 2048-row
    chunks 48.7 ms, 2304-row ones 53.5 ms, ``benchmarks/gpu_tune.py --part linear``), else to
    one of ``CHUNK_ROWS_FINE`` (up, or down to the limit's multiple where up does not fit: up to
    7 rows fewer per chunk, so up to 7/limit more chunks, one more at N = 2048). So the
    heights a run meets are few whatever N is: on CPU each new height of oneDNN's chunk logits
    left memory with the C allocator, and a token count that changed every step (a varying
    batch, or ignored tokens, dropped before the products) grew the process by 0.3 to 0.55 GB
    over 300 to 800 steps (BENCHMARKS.md, "Machine D, a sixth VM").
    """
    item = dtype.itemsize
    weight_grad_rows = dim * accumulation_dtype(dtype).itemsize // item
    if small_cpu_chunks(device_type, dtype):
        min_bytes, share = CPU_CHUNK_MIN_BYTES, CPU_CHUNK_SHARE
    else:
        min_bytes, share = CHUNK_BYTES, 2
    by_budget = min_bytes // (item * max(1, num_classes))
    limit = max(1, by_budget, weight_grad_rows // share)
    if not num_tokens:
        return limit
    even = -(-num_tokens // -(-num_tokens // limit))  # ceil(N / k), k = ceil(N / limit)
    for multiple in (CHUNK_ROWS_MULTIPLE, CHUNK_ROWS_FINE):
        rounded = -(-even // multiple) * multiple
        if rounded <= limit:
            return rounded
    down = limit // CHUNK_ROWS_FINE * CHUNK_ROWS_FINE
    return down or even


@quiet_under_jit_trace
def check_inputs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    shift: bool,
    master_weights: bool = False,
    allow_no_classes: bool = False,
) -> bool:
    """Check kinds, dtypes and shapes; return True for probability targets.

    ``hidden`` (N, D) or (B, T, D) float; ``weight`` (V, D) and ``bias`` (V,) of its dtype and
    device; ``target`` the tokens' shape (N,)/(B, T) of class indices or (..., V) probabilities.
    ``allow_no_classes``: V = 0 is let through (one rank's shard; the caller checks the whole).
    With ``master_weights`` (under autocast) weight and bias may have any floating dtype but
    float64: the walk casts them to hidden's dtype and returns their gradients in their own.
    """
    for name, x in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    check_flag("shift", shift)  # it decides which targets each position takes
    _check_dtensor_mix(hidden=hidden, weight=weight, bias=bias)
    if not hidden.is_floating_point():
        raise TypeError(
            f"hidden must be a floating-point tensor, got dtype {hidden.dtype}; convert it "
            "with hidden.float()."
        )
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"hidden must have shape (N, D) or (B, T, D), got shape {tuple(hidden.shape)}."
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        class_weights = (
            "; weight is the (V, D) projection (lm_head.weight), class weights go in class_weight="
            if weight.dim() == 1
            else ""
        )
        raise ValueError(
            f"weight must have shape (V, D) with D = {hidden.shape[-1]} (hidden's last "
            f"dimension), got shape {tuple(weight.shape)}{class_weights}."
        )
    _check_parameter_dtype("weight", weight, hidden, master_weights)
    num_classes = weight.shape[0]
    if num_classes == 0 and not allow_no_classes:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} has no rows, so no classes (V = 0): a softmax "
            "needs at least one."
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}.")
        if bias.dim() != 1 or bias.shape[0] != num_classes:
            raise ValueError(
                f"bias must have shape ({num_classes},), one entry per row of weight, got "
                f"shape {tuple(bias.shape)}."
            )
        _check_parameter_dtype("bias", bias, hidden, master_weights)
    tokens = tuple(hidden.shape[:-1])
    after = "; shift=True uses target[..., 1:] with hidden[..., :-1, :]" if shift else ""

    def context() -> str:
        swapped = (
            "; are hidden and weight swapped? The order is (hidden (N, D), weight (V, D), target)"
            if target.dim() == 1 and target.shape[0] == num_classes != hidden.shape[0]
            else ""
        )
        return (
            f"one per token of hidden of shape {tuple(hidden.shape)}, by V for "
            f"probabilities{after}{swapped}"
        )

    return check_target_kind(
        target, tokens, (*tokens, num_classes), context, hidden.device, "hidden"
    )


def _check_dtensor_mix(**tensors: Tensor | None) -> None:
    """DTensor's ops refuse plain tensors among their inputs ("aten.mm.default got mixed
    torch.Tensor and DTensor"); say which input is which, and the usual cause: a weight that
    FSDP2 (``fully_shard``) holds sharded outside its module's forward. The target is not
    asked: under ``loss_parallel()`` DTensor takes a plain one."""
    # loaded wherever a DTensor exists; torch < 2.5 defines it in torch.distributed._tensor.
    # A plain loop: the dynamo of 2.4 and 2.8 could not trace next() over a generator (a graph
    # break in every small call that torch.compile traces whole, an error under fullgraph=True).
    dtensor = None
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "DTensor"):
            dtensor = module.DTensor
            break
    if dtensor is None:
        return
    given = {name: x for name, x in tensors.items() if x is not None}
    dtensors = [name for name, x in given.items() if isinstance(x, dtensor)]
    if not dtensors or len(dtensors) == len(given):
        return
    plain = [name for name in given if name not in dtensors]
    raise TypeError(
        f"{', '.join(dtensors)} {'is a DTensor' if len(dtensors) == 1 else 'are DTensors'} but "
        f"{', '.join(plain)} {'is' if len(plain) == 1 else 'are'} not: DTensor's ops need all "
        "inputs on one device mesh. FSDP2 (fully_shard) holds a weight as a plain tensor only "
        "inside the forward of the fully_shard module it belongs to, and after the root "
        "module's forward (which keeps its parameters gathered for backward): shard lm_head "
        "with the root module, not in a fully_shard of its own, and call linear_cross_entropy "
        "in or after the model's forward; or put the other inputs on the weight's mesh with "
        "torch.distributed.tensor.distribute_tensor."
    )


def _check_parameter_dtype(name: str, x: Tensor, hidden: Tensor, master_weights: bool) -> None:
    """``x`` (weight or bias) on hidden's device (ValueError, as for the targets), in its dtype,
    or under autocast (``master_weights``) in any floating dtype but float64, as autocast's
    F.linear accepts."""
    check_device(name, x, hidden.device, of="hidden")
    if master_weights:
        if x.is_floating_point() and x.dtype != torch.float64:
            return
        raise TypeError(
            f"under torch.autocast, {name} must be a floating tensor that autocast casts "
            f"(not float64), got {x.dtype}."
        )
    if x.dtype != hidden.dtype:
        halves = (torch.float16, torch.bfloat16)
        hint = (
            "; for float32 parameters with half-precision hidden states, call it under "
            "torch.autocast, as for F.linear"
            if hidden.dtype in halves and x.dtype == torch.float32
            else f"; convert one, e.g. {name}.to(hidden)"
        )
        raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {x.dtype}{hint}.")


def check_chunking(
    chunk_size: int | None, filter_eps: float | None, vocab_block: int | None = None
) -> tuple[int | None, int | None]:
    """chunk_size, vocab_block: None or an int >= 1, returned as Python ints; filter_eps: None
    or a finite number >= 0; vocab_block excludes the other two (they describe the token walk)."""
    chunk_size = check_count("chunk_size", chunk_size)
    vocab_block = check_count("vocab_block", vocab_block)
    if vocab_block is not None and (chunk_size is not None or filter_eps is not None):
        raise ValueError(
            "vocab_block walks the vocabulary over all tokens at once; it cannot be combined "
            "with chunk_size or filter_eps, which apply to the token walk (leave them None)."
        )
    check_number("filter_eps", filter_eps, none_means="off")
    if filter_eps is not None and not (is_finite(filter_eps) and filter_eps >= 0.0):
        raise ValueError(f"filter_eps must be None (off) or a number >= 0, got {filter_eps}.")
    return chunk_size, vocab_block


def loss_shape(hidden: Tensor, shift: bool) -> tuple[int, ...]:
    """Shape of the per-token losses: hidden's tokens, one fewer per sequence with shift."""
    tokens = tuple(hidden.shape[:-1])
    return (*tokens[:-1], max(0, tokens[-1] - 1)) if shift else tokens


class _Tokens:
    """Which rows a chunk reads: loss rows ``rows``, hidden rows ``tok`` (targets at ``tok+shift``).

    Only counted loss rows (target != ignore_index) are walked. ``None`` stands for the identity,
    so that without shift and ignored tokens the chunks are slices (views), not gathers.
    """

    def __init__(self, hidden: Tensor, target: Tensor, opts: LinearOptions) -> None:
        self.shift = int(opts.shift)
        self.shape = loss_shape(hidden, opts.shift)
        self.num_rows = math.prod(self.shape)
        pos = None
        if opts.shift:  # loss row r = (b, t) reads hidden token b·T + t, i.e. r + b
            r = torch.arange(self.num_rows, device=hidden.device)
            pos = r + r // max(1, self.shape[-1])  # (M,)
        self.y = None  # (M,) class-index targets of the loss rows
        rows = None
        if not opts.ce.soft:
            flat = target.reshape(-1)
            self.y = flat if pos is None else flat[pos + 1]
            keep = self.y != opts.ce.ignore_index
            if not bool(keep.all()):
                rows = keep.nonzero().squeeze(1)  # (K,)
        self.rows = rows
        self.tok = pos if rows is None else (rows if pos is None else pos[rows])
        self.num_counted = self.num_rows if rows is None else rows.numel()

    def chunk(self, start: int, stop: int) -> tuple[slice | Tensor, slice | Tensor]:
        """(hidden rows, loss rows) of counted rows ``start:stop``, as slices or index tensors."""
        span = slice(start, stop)
        tok = span if self.tok is None else self.tok[span]
        rows = span if self.rows is None else self.rows[span]
        return tok, rows


class Walked(NamedTuple):
    """What a walk returns: the row losses (M,), the gradients asked for (None otherwise), and
    the factor :func:`~fastxent._autograd.deferred_factor` kept out of a float16 gradient (the true
    losses and gradients are ``factor ×`` those returned; None: nothing kept out)."""

    losses: Tensor
    dh: Tensor | None
    dw: Tensor | None
    db: Tensor | None
    factor: Tensor | None = None


def _walk_inputs(
    hidden: Tensor, weight: Tensor, target: Tensor, class_weight: Tensor | None, opts: LinearOptions
) -> tuple[Tensor, Tensor, _Tokens, Tensor, Tensor, Tensor | None]:
    """What both walks start from: hidden as (B·T, D) (a view when contiguous), the targets as
    (B·T,) or (B·T, V), the loss rows, the reduction's scales over all targets, and the factor
    kept out of them for float16 (:func:`~fastxent._autograd.deferred_factor`)."""
    num_classes, dim = weight.shape
    h2 = hidden.reshape(-1, dim)
    t2 = target.reshape(-1, num_classes) if opts.ce.soft else target.reshape(-1)
    toks = _Tokens(hidden, target, opts)
    # reduction_scales reads only the row count, dtype and device of the logits.
    rows_like = torch.empty((toks.num_rows, 0), dtype=hidden.dtype, device=hidden.device)
    y_all = t2 if toks.y is None else toks.y
    ce_scale, z_scale = reduction_scales(rows_like, y_all, class_weight, opts.ce)
    deferred = deferred_factor(ce_scale, z_scale, hidden.dtype, y_all, class_weight, opts.ce)
    return h2, t2, toks, *deferred


def _take(x: Tensor, index: slice | Tensor, offset: int = 0) -> Tensor:
    if isinstance(index, slice):
        return x[index.start + offset : index.stop + offset]
    return x.index_select(0, index + offset if offset else index)


LinearProduct = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


@functools.cache
def _onednn_linear() -> LinearProduct | None:
    """oneDNN's float32 ``x wᵀ + b`` (the op torch.compile's CPU linear lowers to), or None when
    this PyTorch build lacks it or it disagrees with ``torch.addmm`` on a small check."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=gen) for shape in ((3, 5), (4, 5), (4,)))
        agrees = torch.allclose(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t()), 1e-5, 1e-6)
    except (AttributeError, RuntimeError):
        return None
    return (lambda x, w, b: op(x, w, b, "none", [], "")) if agrees else None


def small_cpu_chunks(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the token walk takes the small CPU chunks that oneDNN's products made fast
    (:func:`default_chunk_size`; the products are oneDNN's unless :func:`mkl_outpaces_onednn`):
    float32 on CPU with oneDNN in the build, and not while torch.compile traces the call
    (inductor lowers oneDNN's linear only for frozen weights; its own matmuls serve there)."""
    if device_type != "cpu" or dtype != torch.float32 or torch.compiler.is_dynamo_compiling():
        return False
    return _onednn_linear() is not None


@functools.cache
def mkl_outpaces_onednn() -> bool:
    """Whether ``torch.mm`` (MKL's sgemm) beats oneDNN's product on small chunks here: on an
    Intel CPU with MKL in the build (Linux's ``/proc/cpuinfo`` says GenuineIntel).

    On the AMD EPYC machines MKL re-packs all of W on every small call and the walk with
    ``torch.mm`` took 1.43x the three unchunked matmuls against ~1.1x with oneDNN; on an Intel
    Xeon with AMX it was the reverse at every chunk height (80 rows: 1.60x against 1.71x;
    1024 rows: 1.10x against 1.33x; BENCHMARKS.md, "Machine E"). Elsewhere (other vendors, no
    /proc/cpuinfo) oneDNN stays.
    """
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open(CPUINFO, encoding="ascii", errors="replace") as info:
            vendor = next((line for line in info if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return "GenuineIntel" in vendor


def small_rows_linear(hidden: Tensor, weight: Tensor) -> LinearProduct | None:
    """The product for a chunk's logits ``h Wᵀ + b`` and its ``∂h = g W`` (as ``g (Wᵀ)ᵀ``),
    when it is oneDNN's (:func:`small_cpu_chunks`, W contiguous, and not an Intel CPU with MKL:
    :func:`mkl_outpaces_onednn`); None means ``torch.mm``.

    Chunks of few rows are what keep the walk's memory small, and on the AMD machines MKL's
    sgemm (torch.mm on CPU) runs them far below its large-matrix rate (each call re-packs all of
    W), while oneDNN keeps its rate down to ~64 rows. ``python benchmarks/linear_chunks.py
    --torch-mm`` times both.
    """
    if not small_cpu_chunks(hidden.device.type, hidden.dtype) or mkl_outpaces_onednn():
        return None
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    return _onednn_linear()


def chunked_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    opts: LinearOptions,
    kernel: Kernel,
    needs: tuple[bool, bool, bool],
    grad_rows: Tensor | None = None,
    rows_kept_out: Tensor | None = None,
) -> Walked:
    """Losses (M,) and, for each of hidden, weight, bias flagged in ``needs``, its gradient.

    ``grad_rows`` (M,) multiplies each row's gradient ("none" with a per-row grad_output);
    ``rows_kept_out``: the factor it was divided by (float16), which ``filter_eps``, a bound on
    the true ``|grad_output · ∂ℓ/∂z|``, divides out as it does the deferred factor.
    """
    num_classes = weight.shape[0]
    h2, t2, toks, ce_scale, z_scale, factor = _walk_inputs(
        hidden, weight, target, class_weight, opts
    )
    acc = accumulation_dtype(hidden.dtype)

    losses = torch.zeros(toks.num_rows, dtype=acc, device=hidden.device)  # (M,)
    need_h, need_w, need_b = needs
    any_grad = need_h or need_w or need_b
    dh = torch.zeros_like(h2) if need_h else None  # (B·T, D); untouched rows stay zero
    # ∂W is written, not added to, by the first chunk's dense update: no zero-fill pass then.
    first_writes_dw = opts.filter_eps is None and toks.num_counted > 0
    dw = None
    if need_w:  # kept for reuse on CPU (reusable_empty): the next step writes it again
        dw = reusable_empty(tuple(weight.shape), acc, weight.device)
        if not first_writes_dw:
            dw.zero_()
    db = torch.zeros(num_classes, dtype=acc, device=weight.device) if need_b else None

    step = opts.chunk_size
    rows_max = min(step, toks.num_counted)
    linear = small_rows_linear(hidden, weight)
    if linear is not None and bias is not None:
        bias = bias.contiguous()  # oneDNN reads the bias as dense memory, whatever its strides
    # torch.mm writes into one kept buffer; oneDNN allocates each chunk's logits itself.
    buf = None if linear else reusable_empty((rows_max, num_classes), hidden.dtype, hidden.device)
    wt = weight.t()  # (D, V)
    for start in range(0, toks.num_counted, step):
        stop = min(start + step, toks.num_counted)
        tok, rows = toks.chunk(start, stop)
        h = _take(h2, tok)  # (n, D)
        y = _take(t2, tok, toks.shift) if opts.ce.soft else _take(toks.y, rows)  # (n, V) | (n,)
        z = g = padded = None  # the last chunk's logits are freed before this chunk's exist
        if linear is not None:
            padded = linear(_rows_padded(h, step), weight, bias)  # (n', V), n' >= n
            z = padded[: stop - start]  # (n, V)
        elif bias is None:
            z = torch.mm(h, wt, out=buf[: stop - start])
        else:
            z = torch.addmm(bias, h, wt, out=buf[: stop - start])
        losses[rows] = kernel(
            z, y, class_weight, opts.ce, ce_scale, z_scale, z if any_grad else None
        )
        if not any_grad:
            continue
        g = z  # now ∂ℓ/∂z of the chunk, (n, V)
        if grad_rows is not None:
            scaled_in_blocks(g, _take(grad_rows, rows), out=g)
        if need_b:
            db.add_(g.sum(0, dtype=acc))
        cols = None
        if opts.filter_eps is not None:  # a float16 g is held without these factors
            eps = opts.filter_eps
            for kept_out in (factor, rows_kept_out):
                eps = eps if kept_out is None else eps / kept_out
            cols = _kept_columns(g, eps)
        if cols is None:
            _dense_update(
                g, h, weight, tok, dh, dw, overwrite=start == 0, linear=linear, padded=padded
            )
        elif cols.numel():
            _sparse_update(g, h, weight, tok, cols, dh, dw)
    return Walked(losses, dh, dw, db, factor)


def _rows_padded(h: Tensor, step: int) -> Tensor:
    """``h`` (n, D) with zero rows appended up to a multiple of ``CHUNK_ROWS_FINE`` within
    ``step`` rows: a short last chunk's oneDNN logits then take one of a few heights (see
    :func:`default_chunk_size`), at the cost of at most 7 rows of products."""
    n = h.shape[0]
    padded = -(-n // CHUNK_ROWS_FINE) * CHUNK_ROWS_FINE
    if padded == n or padded > step:
        return h
    return torch.cat([h, h.new_zeros(padded - n, h.shape[1])])


def _dense_update(
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    tok: slice | Tensor,
    dh: Tensor | None,
    dw: Tensor | None,
    overwrite: bool = False,
    linear: LinearProduct | None = None,
    padded: Tensor | None = None,
) -> None:
    """dh[tok] = g W;  dW += gᵀ h, or dW = gᵀ h with ``overwrite`` (float32 accumulation for
    half-precision weights). ``linear``: :func:`small_rows_linear`'s product for g W, on
    ``padded`` where given (the logits :func:`_rows_padded` made, ``g`` their first rows: the
    others are zeroed here, as they have no gradient)."""
    if dh is not None:
        if linear is not None:
            rows = g
            if padded is not None and padded.shape[0] > g.shape[0]:
                padded[g.shape[0] :].zero_()
                rows = padded
            dh_rows = linear(rows, weight.t(), None)[: g.shape[0]]  # (n, D)
            if isinstance(tok, slice):
                dh[tok] = dh_rows
            else:
                dh.index_copy_(0, tok, dh_rows)
        elif isinstance(tok, slice):
            torch.mm(g, weight, out=dh[tok])
        else:
            dh.index_copy_(0, tok, torch.mm(g, weight))
    if dw is None:
        return
    if dw.dtype == g.dtype:
        if overwrite:
            torch.mm(g.t(), h, out=dw)
        else:
            dw.addmm_(g.t(), h)
        return
    if dw.is_cuda and cuda_float32_out_matmul():  # cuBLAS: half in, float32 out (C += AB)
        if overwrite:
            torch.mm(g.t(), h, out_dtype=dw.dtype, out=dw)
        else:
            torch.addmm(dw, g.t(), h, out_dtype=dw.dtype, out=dw)
        return
    # float16's range cannot hold a sum over the chunk's tokens (made before backward's 1/N or
    # grad_output < 1 scales it): its products run in float32; bf16's range can.
    h_wide = h.to(dw.dtype) if g.dtype == torch.float16 else None  # (n, D)
    for v in range(0, dw.shape[0], WEIGHT_BLOCK):
        block = slice(v, v + WEIGHT_BLOCK)
        if h_wide is None:
            part = torch.mm(g[:, block].t(), h)  # (Vb, D) in bf16, then float32
        else:
            part = torch.mm(g[:, block].t().to(dw.dtype), h_wide)  # (Vb, D) in float32
        if overwrite:
            dw[block].copy_(part)
        else:
            dw[block].add_(part)


def kept_blocks(g: Tensor, eps: float | Tensor) -> Tensor:
    """Which ``FILTER_BLOCK``-class blocks of a chunk's gradient g (n, V) have some |g| >= eps
    or a NaN (kept, so that it reaches the gradients as in PyTorch): (ceil(V / FILTER_BLOCK),)
    booleans."""
    col_max = torch.maximum(g.amax(0), g.amin(0).neg())  # (V,) max_r |g_rj|; NaN stays NaN
    pad = (-g.shape[1]) % FILTER_BLOCK
    if pad:
        col_max = torch.nn.functional.pad(col_max, (0, pad))
    return ~(col_max.view(-1, FILTER_BLOCK).amax(1) < eps)  # not "<": NaN blocks are kept


def _kept_columns(g: Tensor, eps: float | Tensor) -> Tensor | None:
    """Vocab columns of blocks where some |g| >= eps; None (dense, exact) when at least half
    the blocks are kept, since gathering that many columns costs more than it saves."""
    num_classes = g.shape[1]
    keep = kept_blocks(g, eps)  # (V / block,)
    if 2 * int(keep.sum()) >= keep.numel():
        return None
    blocks = keep.nonzero().squeeze(1)
    cols = blocks.unsqueeze(1) * FILTER_BLOCK + torch.arange(FILTER_BLOCK, device=g.device)
    cols = cols.reshape(-1)
    return cols[cols < num_classes]


def _sparse_update(
    g: Tensor,
    h: Tensor,
    weight: Tensor,
    tok: slice | Tensor,
    cols: Tensor,
    dh: Tensor | None,
    dw: Tensor | None,
) -> None:
    """The dense update restricted to the vocab columns ``cols`` (the others' |g| < eps)."""
    gk = g.index_select(1, cols)  # (n, K)
    if dh is not None:
        dh_rows = torch.mm(gk, weight.index_select(0, cols))  # (n, D)
        if isinstance(tok, slice):
            dh[tok] = dh_rows
        else:
            dh.index_copy_(0, tok, dh_rows)
    if dw is not None:
        dw.index_add_(0, cols, torch.mm(gk.t(), h).to(dw.dtype))  # (K, D)


def vocab_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    opts: LinearOptions,
    kernel: Kernel,
    needs: tuple[bool, bool, bool],
    grad_rows: Tensor | None = None,
    rows_kept_out: Tensor | None = None,
) -> Walked:
    r""":func:`chunked_pass`'s results by walking blocks of ``B = opts.vocab_block`` classes.

    All K counted tokens go through each block ``W_b`` (B, D) at once, twice: the first walk
    gathers each row's log-sum-exp online, the second recomputes ``z_b = h W_bᵀ + b_b`` (K, B)
    and turns it into ``g_b = ∂ℓ/∂z_b``:

    .. math::

        m \leftarrow \max(m, \max_{j \in b} z'_j), \quad
        S \leftarrow S e^{m_{old} - m} + \textstyle\sum_{j \in b} e^{z'_j - m}, \quad
        \mathrm{lse} = m + \log S

        g_b = \big(e^{z'_b - \mathrm{lse}} (a \textstyle\sum t + 2 b s\, \mathrm{lse})
            - a\, t_b\big) \cdot dz'/dz, \qquad
        \partial\ell/\partial W_b = g_b^\top h, \qquad
        \partial\ell/\partial h \mathrel{+}= g_b W_b

    Four matmuls instead of three, but ∂W_b is written once, by one matmul over all K tokens
    (for bf16 its float32 accumulation happens inside that matmul, so there is no float32 copy
    of ∂W; float16 ∂W is computed in float32, its range being too small for a sum over tokens
    before backward's scaling), and nothing larger than a few (K, B) blocks is held beside the
    gradients.
    ``kernel`` is unused: the block math needs the row's lse before the row is complete;
    ``rows_kept_out`` too: ``filter_eps`` does not apply to this walk.
    """
    from fastxent._torch.kernel import transform

    ce = opts.ce
    num_classes, dim = weight.shape
    device = hidden.device
    h2, t2, toks, a, b, factor = _walk_inputs(hidden, weight, target, class_weight, opts)
    acc = accumulation_dtype(hidden.dtype)
    a, b = a.to(acc), b.to(acc)
    tok, rows = toks.chunk(0, toks.num_counted)
    h = _take(h2, tok)  # (K, D): counted tokens only
    y = _take(t2, tok, toks.shift) if ce.soft else _take(toks.y, rows)  # (K, V) | (K,)
    num_tokens = h.shape[0]
    w = None if class_weight is None else class_weight.to(device=device, dtype=acc)
    eps, s = ce.label_smoothing, ce.z_loss
    blocks = [
        slice(v, min(v + opts.vocab_block, num_classes))
        for v in range(0, num_classes, opts.vocab_block)
    ]

    def logits(block: slice) -> tuple[Tensor, Tensor | None]:  # z'_b (K, B) and dz'/dz
        wb = weight[block].t()  # (D, B)
        zb = torch.mm(h, wb) if bias is None else torch.addmm(bias[block], h, wb)
        return transform(zb.to(acc), ce)

    def targets(block: slice) -> Tensor:  # soft targets' t_b (K, B), smoothed and weighted
        tb = y[:, block].to(acc)
        if eps:
            tb = tb * (1.0 - eps) + eps / num_classes
        return tb if w is None else tb * w[block]

    def target_column(block: slice) -> tuple[Tensor, Tensor]:  # y inside the block?, its column
        inside = (y >= block.start) & (y < block.stop)  # (K,)
        col = (y - block.start).clamp(0, block.stop - block.start - 1).unsqueeze(1)  # (K, 1)
        return inside, col

    w_y = None  # (K,) class weight of each row's target (index targets)
    if not ce.soft:
        w_y = torch.ones(num_tokens, dtype=acc, device=device) if w is None else w[y]

    # Walk 1: lse, and Σt (z' - r) (the target logit, the smoothing sum, or soft Σ t z'), taken
    # relative to r, the first finite block max: lse·Σt - Σt z' would cancel two numbers the
    # size of the logits, and lose float32 precision when they share a large offset.
    m = torch.full((num_tokens,), -math.inf, dtype=acc, device=device)
    m_safe = torch.zeros_like(m)
    r = torch.zeros_like(m)
    sum_e = torch.zeros_like(m)
    sum_t = torch.zeros_like(m)
    sum_tz = torch.zeros_like(m)  # Σt(z' - r); class indices: of the smoothing part only
    target_rel = torch.zeros_like(m)  # class indices: z'_y - r
    for block in blocks:
        zp, _ = logits(block)  # (K, B)
        m_new = torch.maximum(m, zp.amax(dim=1))
        m_new_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)  # ±inf rows: keep exp finite
        r = torch.where(torch.isfinite(m), r, m_new_safe)  # frozen once the max is finite
        if ce.soft:
            tb = targets(block)
            sum_t += tb.sum(dim=1)
            sum_tz += (tb * (zp - r[:, None])).sum(dim=1)
        else:
            inside, col = target_column(block)
            target_rel += torch.where(inside, zp.gather(1, col).squeeze(1) - r, 0.0)
            if eps:
                zs = zp - r[:, None]  # (K, B)
                sum_tz += (eps / num_classes) * (zs.sum(dim=1) if w is None else zs @ w[block])
        e = zp.sub_(m_new_safe[:, None]).exp_()  # in place: z'_b is not needed any more
        # S e^{m_old - m}; the exponent is capped at 0 for the first finite max (S = 0 then,
        # and e^{0 - m} could overflow to inf, 0·inf = NaN).
        sum_e = sum_e * torch.exp((m_safe - m_new_safe).clamp(max=0.0)) + e.sum(dim=1)
        m, m_safe = m_new, m_new_safe
        del zp, e  # this block is freed before the next one is made: one block at a time
    log_sum_e = sum_e.log()  # (K,), lse - m
    lse = m_safe + log_sum_e  # (K,)
    lse_rel = (m_safe - r) + log_sum_e  # lse - r
    if ce.soft:
        ce_rows = lse_rel * sum_t - sum_tz  # (lse - r) Σt - Σt (z' - r)
    else:  # the one-hot part as one product: an infinite w_y gives inf, not inf·0 = NaN
        one_hot = (1.0 - eps) * w_y
        ce_rows = one_hot * (lse_rel - target_rel)
        sum_t = one_hot
        if eps:  # (not 0·Σw: NaN for an infinite weight)
            smooth_t = (eps / num_classes) * (num_classes if w is None else w.sum())
            sum_t = one_hot + smooth_t
            ce_rows = ce_rows + lse_rel * smooth_t - sum_tz

    losses = torch.zeros(toks.num_rows, dtype=acc, device=device)  # (M,); ignored rows stay 0
    losses[rows] = a * ce_rows + b * s * lse.square()
    need_h, need_w, need_b = needs
    if not (need_h or need_w or need_b):
        return Walked(losses, None, None, None, factor)

    # Walk 2: g_b = o (a Σt + 2 b s lse) - a t_b, times dz'/dz (and the rows' grad_output).
    coef = a * sum_t + 2.0 * b * s * lse  # (K,)
    row_scale = None if grad_rows is None else _take(grad_rows, rows).to(acc)  # (K,)
    # ∂h of the K tokens (K, D): accumulated in place in dh (B·T, D) when it can, else beside
    # it, and dh is then made only after the walk, so that it never sits beside the blocks.
    in_place = need_h and isinstance(tok, slice) and h2.dtype == acc
    dh = torch.zeros_like(h2) if in_place else None  # untouched rows stay zero
    dh_used = dh[tok] if in_place else None
    if need_h and not in_place:
        dh_used = torch.zeros((num_tokens, dim), dtype=acc, device=device)
    dw = None  # each block written once
    # float16's range is too small for ∂W before backward scales it (a sum over tokens, without
    # the mean's 1/N or a grad_output < 1): float32 then, from the float32 g_b and h.
    h_acc = h.to(acc) if need_w and hidden.dtype == torch.float16 else None  # (K, D)
    if need_w:
        dw_dtype = weight.dtype if h_acc is None else acc
        dw = reusable_empty(tuple(weight.shape), dw_dtype, weight.device)
    db = torch.empty(num_classes, dtype=acc, device=device) if need_b else None
    for block in blocks:
        zp, chain = logits(block)
        # e^{(z' - m) - log S}: z' - lse directly would lose float32 precision when lse is large
        g = zp.sub_(m_safe[:, None]).sub_(log_sum_e[:, None]).exp_().mul_(coef[:, None])  # (K, B)
        if ce.soft:
            g.sub_(a * targets(block))
        else:
            inside, col = target_column(block)
            one_hot = torch.where(inside, -a * (1.0 - eps) * w_y, 0.0)  # (K,)
            g.scatter_add_(1, col, one_hot.unsqueeze(1))
            if eps:
                g.sub_(a * eps / num_classes * (1.0 if w is None else w[block]))
        if chain is not None:
            g.mul_(chain)
        elif ce.logit_scale != 1.0:
            g.mul_(ce.logit_scale)
        if row_scale is not None:
            g.mul_(row_scale[:, None])
        if need_b:
            db[block] = g.sum(dim=0)
        if h_acc is not None:
            torch.mm(g.t(), h_acc, out=dw[block])  # (B, D) in float32, over all K tokens
        g = g.to(hidden.dtype)  # the matmuls run in the inputs' dtype
        if need_h and dh_used.dtype == g.dtype:
            dh_used.addmm_(g, weight[block])  # (K, D)
        elif need_h:
            dh_used += torch.mm(g, weight[block])  # half precision, accumulated in float32
        if need_w and h_acc is None:
            torch.mm(g.t(), h, out=dw[block])  # (B, D), over all K tokens at once
        del zp, g, chain  # as in walk 1
    if need_h and not in_place:
        dh = torch.zeros_like(h2)
        if isinstance(tok, slice):
            dh[tok] = dh_used
        else:
            dh.index_copy_(0, tok, dh_used.to(dh.dtype))
    return Walked(losses, dh, dw, db, factor)


def in_hidden_dtype(
    hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Weight and bias in hidden's dtype, the one the matmuls run in: themselves, or copies under
    autocast (float32 master weights with half-precision hidden states)."""
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    return weight, bias


def in_own_dtype(
    dw: Tensor | None, db: Tensor | None, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """∂W and ∂b cast once to the dtypes of weight and bias. The token walk accumulates them in
    float32 for half precision, so float32 master weights take that accumulator as it is."""
    return (
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


def walk_of(opts: LinearOptions):
    """The walk over tokens and classes that ``opts`` asks for."""
    return chunked_pass if opts.vocab_block is None else vocab_pass


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = reduce(row kernel(h Wᵀ + b)), chunk by chunk; gradients for h, W, b."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        class_weight: Tensor | None,
        opts: LinearOptions,
        kernel: Kernel,
    ) -> Tensor:
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.opts, ctx.kernel, ctx.needs = opts, kernel, needs
        ctx.hidden_shape = hidden.shape
        if opts.ce.reduction == "none":
            # ∂W sums rows, so grad_output must be known first: backward recomputes the chunks.
            losses, *_, factor = walk_of(opts)(
                hidden, *in_hidden_dtype(hidden, weight, bias), target, class_weight, opts,
                kernel, (False,) * 3,
            )  # fmt: skip
            ctx.save_for_backward(hidden, weight, bias, target, class_weight)
            if factor is not None:
                losses = losses * factor
            return losses.reshape(loss_shape(hidden, opts.shift))
        losses, dh, dw, db, ctx.factor = walk_of(opts)(
            hidden, *in_hidden_dtype(hidden, weight, bias), target, class_weight, opts, kernel,
            needs,
        )  # fmt: skip
        if dh is not None and opts.reduce_hidden_grad is not None:
            opts.reduce_hidden_grad(dh)  # COLLECTIVE (vocab-parallel): Σ_r g W_r
        # ∂W and ∂b stay in their (float32) accumulators until backward has scaled them: cast
        # first, a float16 ∂W summed over tokens overflows where the scaled one would not.
        keep_for_backward(ctx, dh, dw, db)
        ctx.dtypes = (None, weight.dtype, None if bias is None else bias.dtype)
        return losses.sum() if ctx.factor is None else losses.sum() * ctx.factor

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss: Tensor):
        opts = ctx.opts
        if opts.ce.reduction == "none":
            hidden, weight, bias, target, class_weight = ctx.saved_tensors
            grad_rows = grad_loss.reshape(-1)
            peak = None
            if hidden.dtype == torch.float16:  # the rows' largest grad_output joins the factor
                finite = torch.where(grad_rows.isfinite(), grad_rows.abs(), 0.0)
                peak = power_of_two_at_most(finite.amax() if finite.numel() else finite.sum())
                grad_rows = grad_rows / peak
            _, dh, dw, db, factor = walk_of(opts)(
                hidden, *in_hidden_dtype(hidden, weight, bias), target, class_weight, opts,
                ctx.kernel, ctx.needs, grad_rows=grad_rows, rows_kept_out=peak,
            )  # fmt: skip
            if factor is not None:  # ∂W and ∂b in their float32 accumulators; ∂h float16
                factor = factor * peak
                dh, dw, db = (
                    None if x is None else scaled_in_blocks(x, factor, x) for x in (dh, dw, db)
                )
            if dh is not None and opts.reduce_hidden_grad is not None:
                opts.reduce_hidden_grad(dh)  # COLLECTIVE (vocab-parallel): Σ_r g W_r
            dw, db = in_own_dtype(dw, db, weight, bias)
        else:
            factor = times_deferred(grad_loss, ctx.factor)
            dh, dw, db = scaled_gradients(ctx, factor, ctx.dtypes)
        if dh is not None:
            dh = dh.view(ctx.hidden_shape)
        return dh, dw, db, None, None, None, None
