r"""The autograd Function shared by every backend, and the kernel contract behind it.

A backend supplies one *row kernel*. It computes the loss of every row and, when asked, writes
the gradient of the reduced loss into a buffer during the same pass:

.. code-block:: python

    def kernel(
        z: Tensor,             # (M, V) logits, any float dtype, any strides
        target: Tensor,        # (M,) int64 class indices, or (M, V) float probabilities
        weight: Tensor | None, # (V,) class weights
        opts: CrossEntropyOptions,
        ce_scale: Tensor,      # 0-dim float: factor on each row's cross-entropy
        z_scale: Tensor,       # 0-dim float: factor on each row's z-loss
        grad: Tensor | None,   # (M, V) in z.dtype, to receive ∂loss/∂z; may be z itself
    ) -> Tensor:               # (M,) ce_scale·E_r + z_scale·s·lse_r², float32 (float64 for f64)

For row r with effective targets t (see :mod:`fastxent.reference`) the kernel writes

.. math::

    \frac{\partial \ell}{\partial z'_{ri}} = a\,(o_{ri} \textstyle\sum_j t_{rj} - t_{ri})
        + b\, 2 s\, \mathrm{lse}_r\, o_{ri}

with ``a = ce_scale``, ``b = z_scale``, then the softcap chain factor. When ``grad is z`` the
kernel must finish reading a row block before writing its gradient.

The Function turns the reduction into those two scales, calls the kernel once in forward and keeps
only the gradient buffer. The first backward multiplies that buffer by ``grad_output`` in place
and hands it to autograd: nothing else of size N×V is saved, and for "mean"/"sum" no N×V buffer
is allocated in backward. Later backwards through a retained graph rescale the buffer into a new
tensor; "none" (one factor per row) always scales into a new tensor. A float16 gradient (any
reduction) hands the kernel its scales divided by a power of two that backward multiplies back in
with grad_output (:func:`deferred_factor`: the entries would otherwise leave float16's range).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastxent._options import CrossEntropyOptions, carries_tangent

Kernel = Callable[
    [Tensor, Tensor, "Tensor | None", CrossEntropyOptions, Tensor, Tensor, "Tensor | None"], Tensor
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_scales(
    z: Tensor, target: Tensor, weight: Tensor | None, opts: CrossEntropyOptions
) -> tuple[Tensor, Tensor]:
    """The factors ``(a, b)`` on each row's cross-entropy and z-loss for the chosen reduction.

    "mean" divides the cross-entropy by the total target weight W (index targets: Σ w_y over
    non-ignored rows; probability targets: the row count) and the z-loss by the number of counted
    rows n. W = 0 or n = 0 gives a factor 0, not a division by zero. No host sync.
    """
    dtype, device = accumulation_dtype(z.dtype), z.device
    if opts.reduction != "mean":
        one = torch.ones((), dtype=dtype, device=device)
        return one, one
    if opts.soft:
        # z's rows counted by an op on z's size, not torch.full((), float(rows)): torch.jit.trace
        # would record the number as a constant, and torch.export fix the batch size to it
        n = z.new_ones(z.shape[:1], dtype=torch.int64).sum().to(dtype)  # exact, one rounding
        total_weight = n
    else:
        counted = target != opts.ignore_index
        n = counted.sum().to(dtype)  # exact count (int64), then one rounding
        if weight is None:
            total_weight = n
        else:
            total_weight = _target_weights(target, weight, counted, dtype).sum()

    def inverse(x: Tensor) -> Tensor:  # 1/x, and 0 for x = 0 (1/±0 = ±inf); NaN stays NaN
        return torch.nan_to_num(x.reciprocal(), nan=math.nan, posinf=0.0, neginf=0.0)

    inverse_n = inverse(n)
    return (inverse_n if total_weight is n else inverse(total_weight)), inverse_n


def _target_weights(target: Tensor, weight: Tensor, counted: Tensor, dtype: torch.dtype) -> Tensor:
    """``w_y`` of each row (M,) in ``dtype``, 0 where not ``counted``. The indices are clamped
    into range: on CUDA their range check may still be in flight (start_index_target_check)."""
    w_y = weight.to(dtype)[torch.where(counted, target, 0).clamp(0, weight.numel() - 1)]
    return torch.where(counted, w_y, 0)


def carried_weight(target: Tensor, weight: Tensor, opts: CrossEntropyOptions) -> Tensor:
    """The largest class weight that a row's gradient entries carry, to within a factor 2
    (0-dim, float32): what :func:`deferred_factor` divides out of a float16 gradient.

    Index targets: ``(1 - ε)·max |w_y|`` over the counted rows, plus ``ε·max |w|`` for label
    smoothing ε, whose part of an entry, ``(ε/V)(o_i Σ_j w_j - w_i)``, is at most
    ``2ε·max |w|``; a large weight of a class no row targets then leaves the entries alone
    (``max |w|`` flushed them all to zero at 1e8 beside weights of 1). Probability targets:
    ``max |w|`` (their entries carry ``w_i y_i`` of any class).
    """
    dtype = torch.float32
    largest = weight.detach().abs().amax().to(dtype)
    if opts.soft:
        return largest
    counted = target != opts.ignore_index
    targeted = _target_weights(target, weight.detach().abs(), counted, dtype)
    targeted = targeted.amax() if targeted.numel() else torch.zeros_like(largest)
    smoothing = opts.label_smoothing
    return targeted if smoothing == 0 else (1 - smoothing) * targeted + smoothing * largest


CHAIN_KEPT = 2.0**12  # float16: entries keep a logit scale's factor up to this much


def deferred_factor(
    ce_scale: Tensor,
    z_scale: Tensor,
    grad_dtype: torch.dtype,
    target: Tensor,
    weight: Tensor | None,
    opts: CrossEntropyOptions,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""The reduction's scales for a float16 gradient: ``(a/f, b/f, f)``.

    The mean's factors ``a = 1/W``, ``b = 1/n`` make most entries of the gradient about
    ``o_i / N``: below float16's smallest subnormal (6e-8) for most classes of a large vocabulary
    (``o_i ≈ 1/V``), so they would flush to zero before backward multiplies them by grad_output,
    the very loss scale (2^16 under GradScaler) that is there to keep them. So a float16 gradient
    is written with ``a/f`` and ``b/f``, where ``f`` is ``a·w_max·max(1, |α|/2^12)`` (``b`` where
    that is 0) rounded down to a power of two (1 where both are 0), so entries are near
    ``o_i·w_y/w_max`` (``w_max`` the largest class weight the entries carry,
    :func:`carried_weight`, 1 without weights: weights of 1e5 overflowed float16 where
    PyTorch's weighted mean does not depend on their scale), times the chain factor of a
    logit scale ``α`` (or softcap's ``α(1 - tanh²)``) up to 2^12: at α = 1e5 a row's entries
    overflowed where the mean's did not, while dividing all of α out flushed the small entries
    of a moderate α (100) to zero.
    ``f`` joins grad_output in backward; the loss is ``f·Σ rows``. A power of two changes no
    rounding: ``fp16(x·a/f)·f`` is ``fp16(x·a)`` wherever the latter is a normal number, and a
    loss scale (a power of two too) then multiplies exactly. "sum" and "none" (``a = 1``) are
    written the same way, relative to ``w_max`` and α: a weight of 1e5 overflowed their entries
    to inf where the true gradient times a grad_output below 1 fits float16, and weights of 1e-6
    flushed them to subnormals that a loss scale could not restore. Other dtypes (float32's and
    bf16's range reach 1e-38) get ``f = None``.
    """
    if grad_dtype != torch.float16:
        return ce_scale, z_scale, None
    chain = max(1.0, abs(opts.logit_scale) / CHAIN_KEPT)  # α's part beyond CHAIN_KEPT, see above
    ce_scale_max = ce_scale  # a·w_max
    if weight is not None and weight.numel():
        ce_scale_max = ce_scale * carried_weight(target, weight, opts).to(ce_scale)
    f = power_of_two_at_most(torch.where(ce_scale_max != 0, ce_scale_max, z_scale) * chain)
    return ce_scale / f, z_scale / f, f


def power_of_two_at_most(x: Tensor) -> Tensor:
    """The power of two in (x/2, x] for a finite x > 0 (0-dim, float32), else 1: a factor that
    changes no rounding when it is divided out and multiplied back."""
    power_of_two = torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 1)
    return torch.where(torch.isfinite(x) & (x > 0), power_of_two, torch.ones_like(x))


def times_deferred(grad_output: Tensor, factor: Tensor | None) -> Tensor:
    """What backward multiplies a forward-made gradient by: grad_output, times the factor that
    :func:`deferred_factor` kept out of a float16 gradient."""
    return grad_output if factor is None else grad_output * factor.to(grad_output.dtype)


SCALE_BLOCK_ELEMENTS = 1 << 20  # CPU: elements per block of scaled_in_blocks (4 MiB in float32)


def copy_into(destination: Tensor, source: Tensor) -> None:
    """``destination.copy_(source)``, also where the destination has the negative bit (float16
    logits that are a ``torch._neg_view``, written by ``inplace_backward``): PyTorch's
    float32 -> float16 ``copy_`` ignores that bit (torch 2.13), so the source is cast first."""
    destination.copy_(source.to(destination.dtype) if destination.is_neg() else source)


def scaled_in_blocks(grad: Tensor, factor: Tensor, out: Tensor) -> Tensor:
    """``out = grad · factor`` (``factor`` 0-dim, or (M,): one per row of ``grad``, (M, ...)),
    multiplied in the accumulation dtype: cast to bf16/fp16 first, a factor past float16's range
    (a loss scale of 2^16 is 65536 > 65504) was inf and made the gradient inf or NaN. ``out``
    may be ``grad``.

    The factor is given ``grad``'s number of dimensions so that it, not ``grad``, sets the
    product's dtype. On CUDA that one mixed-dtype product writes ``out`` directly; on CPU PyTorch
    would compute it in a float32 temporary of ``grad``'s size, so there it runs over blocks of
    rows.

    On CPU, where the factor is read without a sync, an inf or NaN factor leaves the entries
    that are exactly 0 at 0 (0·inf would be NaN): they are the rows of ignored targets, whose
    gradient PyTorch leaves 0 whatever grad_output is (an accumulation step of only ignored
    tokens divides its sum by a count of 0: NaN gradients here would have ended the run where
    PyTorch's zeros do not).
    """
    factor = factor.to(accumulation_dtype(grad.dtype))
    per_row = factor.dim() > 0
    factor = factor.reshape(-1, *[1] * (grad.dim() - 1))  # (M, 1, ...) or (1, 1, ...)
    on_cpu = grad.device.type == "cpu"
    keep_zeros = on_cpu and not bool(torch.isfinite(factor).all())
    if not keep_zeros and (grad.dtype == factor.dtype or not on_cpu):
        return torch.mul(grad, factor, out=out)
    rows = max(1, SCALE_BLOCK_ELEMENTS // max(1, math.prod(grad.shape[1:])))
    for start in range(0, grad.shape[0], rows):
        block = slice(start, start + rows)
        product = grad[block] * (factor[block] if per_row else factor)
        copy_into(
            out[block], torch.where(grad[block] == 0, 0.0, product) if keep_zeros else product
        )
    return out


def scale_by_grad_output(grad: Tensor, grad_output: Tensor) -> None:
    """``grad *= grad_output`` (0-dim) in place, skipped when ``grad_output`` is 1.

    Whether it is 1 is read where that costs no host sync: on the host for CPU tensors (a CPU
    0-dim factor is multiplied in float32 for half precision); on the device for contiguous CUDA
    tensors when triton imports (a Triton kernel whose loop then covers no elements); other
    tensors are always multiplied, by :func:`scaled_in_blocks` (a 0-dim CUDA factor alone would
    be cast to the gradient's dtype first). An inf or NaN factor leaves exact zeros at 0 (on
    CPU, and in the Triton kernel): see :func:`scaled_in_blocks`.
    """
    if grad.device.type == "cpu":
        value = float(grad_output)
        if math.isfinite(value) and value != 1.0:
            grad.mul_(grad_output)
        elif not math.isfinite(value):  # zeros kept (see scaled_in_blocks)
            scaled_in_blocks(grad, grad_output, out=grad)
        return
    if grad.is_cuda and grad.is_contiguous():
        from fastxent import _triton

        if _triton.unavailable_reason(grad.device) is None:
            _triton.scale_unless_one(grad, grad_output)
            return
    scaled_in_blocks(grad, grad_output, out=grad)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
# recent large CPU storages, for reuse, newest last, each with the request count when last
# handed out (_requests): the clock by which unused ones age out
_spares: list[tuple[torch.UntypedStorage, int]] = []


def lock_made_afresh_after_fork(module_globals: dict, name: str) -> threading.Lock:
    """A lock for the module global ``name``, replaced by a new one in a forked child: a fork
    made while another thread held it would leave the child's copy held by a thread the child
    does not have, and the child's first call that takes it would wait forever."""
    if hasattr(os, "register_at_fork"):  # POSIX
        renew = functools.partial(module_globals.__setitem__, name)
        os.register_at_fork(after_in_child=lambda: renew(threading.Lock()))
    return threading.Lock()


_spares_lock = lock_made_afresh_after_fork(globals(), "_spares_lock")
_requests = 0
SPARES = 4  # how many are kept: a step's gradient, a linear walk's logits and ∂W, one more
REUSE_MIN_BYTES = 1 << 20
REUSE_MAX_RATIO = 2  # a kept storage serves a buffer of at least 1/2 of its bytes
SPARE_AGE = 16  # a kept storage not handed out in the last 16 requests is let go


def reusable_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape)``, contiguous; on CPU, a kept storage when one fits and is free.

    A fresh large CPU buffer costs a page fault per 4 KiB page at first touch (glibc returns
    large blocks to the system when they are freed): for a gradient about as long as the kernel
    itself, for the linear walk's logits and ∂W a tenth of a step on two cores. So the storages of
    the last :data:`SPARES` such buffers (1 MiB or more) are kept, and the smallest that holds
    the buffer, with at most :data:`REUSE_MAX_RATIO` times its bytes, is handed out again once
    nothing else holds it: no tensor, view or .grad on it, and no Python reference to its
    storage object (:func:`_unheld`); a storage moved to shared memory (sent to another process)
    is let go, as that process's use is not seen here. A
    batch size that changes every step (sequence packing) then still reuses storages; an exact
    size match did not, and paid the page faults every step (3.6x a fixed size's time). One that
    serves no buffer for :data:`SPARE_AGE` requests is let go, so that a single outsized step
    does not hold its gradient's memory for the rest of the process. The CUDA caching allocator
    does this for GPU memory. :func:`empty_cache` releases them all.
    """
    global _requests
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < REUSE_MIN_BYTES or _storage_use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    with _spares_lock:  # two threads must not both take a storage whose use count is 1
        _requests += 1
        # let go: the aged, and those in shared memory (another process may map them, unseen)
        _spares[:] = [
            (s, last) for s, last in _spares if _requests - last <= SPARE_AGE and not s.is_shared()
        ]
        # is_shared after _unheld too: a multiprocessing queue's feeder thread may move a
        # storage to shared memory and drop its tensor between the filter above and _unheld;
        # once nothing holds a storage, nothing can move it
        fits = [
            i
            for i, entry in enumerate(_spares)
            if nbytes <= entry[0].nbytes() <= REUSE_MAX_RATIO * nbytes
            and _unheld(entry)
            and not entry[0].is_shared()
        ]
        if fits:
            storage, _ = _spares.pop(min(fits, key=lambda i: _spares[i][0].nbytes()))
            _spares.append((storage, _requests))  # now the most recently used
            strides = tuple(math.prod(shape[k + 1 :]) for k in range(len(shape)))
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)
        buffer = torch.empty(shape, dtype=dtype)
        _spares.append((buffer.untyped_storage(), _requests))
        del _spares[:-SPARES]
        return buffer


def _python_references(entry: tuple[torch.UntypedStorage, int]) -> int:
    """How many Python references the kept storage object of ``entry`` has, this call's own
    included (compared with :data:`_KEPT_ONLY`, counted by the same call). It takes the entry,
    not the storage, and :func:`_unheld` names no local for the storage: each would be one
    more reference than the count it is compared with."""
    return sys.getrefcount(entry[0])


# A storage kept by the list alone: its entry's reference, and this count's own.
_KEPT_ONLY = _python_references((torch.UntypedStorage(1), 0))


def _unheld(entry: tuple[torch.UntypedStorage, int]) -> bool:
    """Whether nothing but the list holds ``entry``'s storage: no tensor, view or .grad on it
    (its use count is 1: the storage object's) and no other Python reference to that storage
    object. PyTorch keeps one Python object per storage, so ``t.untyped_storage()`` kept by a
    caller is the list's own object: it adds no use count, only a Python reference."""
    return _storage_use_count(entry[0]._cdata) == 1 and _python_references(entry) == _KEPT_ONLY


def gradient_buffer_like(z: Tensor) -> Tensor:
    """An uninitialised buffer like ``z`` for its gradient (:func:`reusable_empty` when ``z`` is
    contiguous; otherwise ``empty_like``, which keeps ``z``'s layout)."""
    if not z.is_contiguous():
        return torch.empty_like(z)
    return reusable_empty(tuple(z.shape), z.dtype, z.device)


def empty_cache() -> None:
    """Release the CPU buffers fastxent keeps for reuse (each is freed once unused)."""
    with _spares_lock:
        _spares.clear()


_functorch = getattr(torch._C, "_functorch", None)
_functorch_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", None)


def under_torch_func(*tensors: Tensor | None) -> bool:
    """Whether a tensor is wrapped by a ``torch.func`` transform (grad, vmap, jacrev, ...).

    The Functions here make the gradient in forward and keep state on ``ctx``, which those
    transforms do not allow, and the target check reads values (data-dependent under vmap); so
    calls under a transform are built from PyTorch's own ops instead (``_torch.composed``).
    False while torch.compile traces, which cannot call this test: there PyTorch's ops serve
    small calls anyway, and the Function path of larger ones is a graph break
    (``torch.compiler.disable``), so a transform dynamo traces around it runs eagerly, where
    the test runs. (``is_dynamo_compiling``, which dynamo folds to True where it traces; not
    ``is_compiling``, a process-wide flag that is True in every thread while one compiles.)
    """
    if _functorch_wrapped is None or torch.compiler.is_dynamo_compiling():
        return False
    return any(x is not None and _functorch_wrapped(x) for x in tensors)


def wrapper_subclass(x: Tensor) -> bool:
    """Whether ``x`` is a traceable wrapper subclass (``__tensor_flatten__``, as DTensor): a
    tensor that implements PyTorch's ops itself, over data that may live on other ranks."""
    return type(x) is not Tensor and hasattr(type(x), "__tensor_flatten__")


def needs_pytorch_ops(*tensors: Tensor | None) -> bool:
    """Whether a call must be computed from PyTorch's own ops (``_torch.composed``), as PyTorch's
    loss would be:

    - a tensor subclass that implements PyTorch's ops itself (a traceable wrapper subclass, one
      with ``__tensor_flatten__``, such as DTensor): its rules cover PyTorch's ops, not the
      kernels' in-place writes into plain buffers and oneDNN calls (DTensor raised "got mixed
      torch.Tensor and DTensor"). Checked while torch.compile traces too: the kernels then
      run eagerly, outside the graph, on the same subclass;
    - a tensor wrapped by a ``torch.func`` transform (:func:`under_torch_func`);
    - a tensor with a forward-mode AD tangent (:func:`carries_tangent`): the Functions here
      define no ``jvp`` (PyTorch's error named none of this), and under ``no_grad``, where they
      take detached inputs, the tangent was dropped: a silently wrong directional derivative.

    The last two are False while torch.compile traces, as for :func:`under_torch_func`.
    """
    tensors = [x for x in tensors if isinstance(x, Tensor)]  # others are refused elsewhere
    if any(wrapper_subclass(x) for x in tensors):
        return True
    if torch.compiler.is_dynamo_compiling():
        return False
    if _functorch_wrapped is not None and any(_functorch_wrapped(x) for x in tensors):
        return True
    return any(carries_tangent(x) for x in tensors)


KERNEL_OUTSIDE_GRAPH = (
    "fastxent runs its own kernel outside torch.compile's graph; calls that backend='auto' "
    "computes with PyTorch's fused ops (small ones, without inplace_backward or walk options) "
    "trace with fullgraph=True"
)


def outside_graph(fn: Callable, reason: str = KERNEL_OUTSIDE_GRAPH) -> Callable:
    """``fn`` never traced by torch.compile: a graph break, which ``fullgraph=True`` reports
    with ``reason`` (on PyTorch versions that take one).

    The Functions here keep their gradient buffers between forward and backward, which a traced
    graph would replace by tensors of its own, and the kernels are compiled already (or
    Triton's): only the calls computed from PyTorch's fused ops belong in a traced graph.
    """
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # no `reason` before PyTorch 2.8
        return torch.compiler.disable(fn)


def fx_proxy_among(*args: object) -> bool:
    """Whether ``torch.fx.symbolic_trace`` is tracing the call: a ``torch.fx.Proxy`` among
    ``args``. Such calls are recorded whole (:func:`fx_recorded`)."""
    return any(isinstance(arg, torch.fx.Proxy) for arg in args)


def fx_recorded(fn: Callable, arguments: dict[str, object]) -> torch.fx.Proxy:
    """The ``call_function`` node of ``fn(**arguments)`` in the graph that symbolic tracing
    builds, as fx records ``F.cross_entropy``: the GraphModule runs ``fn`` on real tensors.

    Proxies stand for no tensor: no input check or branch could run on them. (fx treats
    ``torch.nn`` modules as leaves and traces into others, so a model holding fastxent's module
    failed at the first check before.) Not a wrapper around ``fn``: one more Python frame would
    be one more graph break where torch.compile breaks inside ``fn``.
    """
    proxy = next(arg for arg in arguments.values() if isinstance(arg, torch.fx.Proxy))
    return proxy.tracer.create_proxy("call_function", fn, (), arguments)


@outside_graph
def apply_outside_graph(function: type[torch.autograd.Function], *args) -> Tensor:
    """``function.apply(*args)``, never traced by torch.compile (:func:`outside_graph`)."""
    return function.apply(*args)


def detached_without_grad_mode(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors, detached when grad mode is off (``torch.no_grad``, ``inference_mode``).

    A Function's ``needs_input_grad`` follows its inputs' ``requires_grad``, not grad mode: a
    loss taken under no_grad on logits that require grad would compute an N×V gradient no one
    can use (and under inference_mode fail on that buffer's version counter).
    """
    if torch.is_grad_enabled():
        return tensors
    return tuple(None if x is None else x.detach() for x in tensors)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device`` now, or None when it is off there."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return None


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast turned off for ``x``'s device type around fastxent's own ops, if it is on.

    The kernels choose their dtypes themselves (float32 accumulation, matmuls in the inputs'
    dtype); autocast's op lists (on CUDA they send exp, sum, log_softmax and more to float32)
    would change the ops under them.
    """
    if not isinstance(x, Tensor) or autocast_dtype(x.device) is None:  # not a tensor: the
        return contextlib.nullcontext()  # caller's checks say so (on every rank, vocab-parallel)
    return torch.autocast(x.device.type, enabled=False)


MODIFIED_SINCE_FORWARD = (
    "the gradient fastxent computed in forward was modified in place after forward (the logits "
    "were written after an inplace_backward=True call, .grad was accumulated into after an "
    "earlier backward, or a hook changed the gradient it was given in place); recompute the "
    "loss to back-propagate it, or let such a hook return a new tensor (g * 2, not g.mul_(2))."
)


_top_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (activation checkpointing, ``save_on_cpu``, any
    ``saved_tensors_hooks``) will pack what forward saves now; True when PyTorch cannot tell."""
    if _top_saved_hooks is None:
        return True
    try:
        return _top_saved_hooks(False) is not None
    except (RuntimeError, TypeError):
        return True


def keep_for_backward(ctx, *grads: Tensor | None) -> None:
    """Hold the gradients made in forward for backward as autograd holds saved tensors: freed
    by a backward that does not retain the graph (a loss kept after backward, in a list of
    losses say, does not keep them alive), and checked then for in-place writes since forward."""
    ctx.save_for_backward(*grads)
    # The factor the first backward multiplied into the buffers, once there is one. Backward
    # changes this list, never ctx's attributes: compiled autograd hands backward a proxy of
    # ctx whose attribute writes are dropped, so each backward saw "first" and folded again.
    ctx.folded = []
    # What an unpack hook returns may be a recomputed buffer (checkpointing), a copy, or a new
    # tensor on the kept memory: backward cannot tell whether an earlier one folded into it.
    ctx.hooked = saved_tensor_hooks_active()


def kept_gradients(ctx) -> tuple[Tensor | None, ...]:
    """The gradients :func:`keep_for_backward` kept. Raises PyTorch's error after a backward
    that did not retain the graph, and ours when a buffer was written since forward."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(MODIFIED_SINCE_FORWARD) from None


def scaled_gradients(
    ctx, factor: Tensor, dtypes: tuple[torch.dtype | None, ...]
) -> list[Tensor | None]:
    """The kept gradients times ``factor`` (0-dim: grad_output and any deferred mean), each in
    its dtype in ``dtypes`` (None: its own).

    The first backward multiplies ``factor`` into each buffer in place, so that for "mean" and
    "sum" backward makes no new N×V (or V×D) tensor, and hands the buffer itself to autograd
    (which can keep it as a leaf's .grad), or its cast. It writes through ``.data``, which does
    not move the version counter that autograd checks the kept buffers against: that write is
    part of backward, not a change since forward. A later backward through a retained graph
    scales into new tensors by ``factor`` over the folded one.

    Not where forward saved its buffers through saved-tensor hooks (``ctx.hooked``): their
    unpack may hand each backward a recomputed buffer (activation checkpointing), a copy, or a
    new tensor on the folded memory, so there every backward scales into a new tensor.

    A buffer cast to another dtype (a float32 ∂W accumulator for bf16/fp16 weights) is scaled
    before the cast: a float16 sum over tokens that the factor brings into range stays finite.
    On CUDA that is one pass into the cast, and the buffer is never folded; on CPU PyTorch
    computes a mixed-dtype ``out=`` product in a temporary of the buffer's size (a float32 copy
    of ∂W), so there the buffer is folded in place and then cast.
    """
    grads = kept_gradients(ctx)
    folds = [g is not None and not ctx.hooked and (d in (None, g.dtype) or g.device.type == "cpu")
             for g, d in zip(grads, dtypes, strict=True)]  # fmt: skip
    first = not ctx.folded
    # A factor with a zero would erase what a later backward through a retained graph rescales:
    # on CPU (where testing it is free) such a backward scales into new tensors and leaves the
    # folding to the next one; on CUDA that test would be a host sync, so a later one raises.
    fold_now = first and not (factor.device.type == "cpu" and bool((factor == 0).any()))
    if not first and any(folds) and bool((ctx.folded[0] == 0).any()):
        raise RuntimeError(
            "cannot back-propagate this loss again after a backward with grad_output 0 on "
            f"{factor.device.type} (fastxent folds grad_output into its gradient buffer); "
            "recompute the loss."
        )
    out = []
    for g, dtype, fold in zip(grads, dtypes, folds, strict=True):
        if g is None:
            out.append(None)
        elif fold and fold_now:
            scale_by_grad_output(g.data, factor)
            out.append(g.detach().to(dtype or g.dtype))  # the buffer itself in its own dtype
        else:
            ratio = factor / ctx.folded[0] if fold and not first else factor
            scaled = torch.empty(g.shape, dtype=dtype or g.dtype, device=g.device)
            out.append(scaled_in_blocks(g, ratio, scaled))
    if fold_now:  # recorded once the products succeeded (a batched factor fails on the first)
        ctx.folded.append(factor.detach().clone())
    return out


NOT_TWICE_DIFFERENTIABLE = (
    "fastxent computes its gradient in forward, and that gradient is not differentiable again: "
    "backward or torch.autograd.grad with create_graph=True through it would give wrong second "
    "derivatives. For double backward (gradient penalties, Hessians, Hessian-vector products) "
    "use torch.nn.functional.cross_entropy, or fastxent under torch.func (grad, jacrev, hessian), "
    "where it is built from PyTorch's own ops."
)


NOT_BATCHED = (
    "fastxent's backward scales the gradient it made in forward in place, which vmap cannot "
    "batch: autograd.grad(..., is_grads_batched=True) (and gradcheck's check_batched_grad, "
    "jacobian(vectorize=True)) is not supported on its kernel paths. Use torch.func.vjp, "
    "jacrev or vmap(grad(...)), where fastxent runs on PyTorch's own ops, or one backward per "
    "grad_output."
)


def first_order_backward(backward: Callable) -> Callable:
    """``once_differentiable``, and an error when backward runs with create_graph=True.

    PyTorch's decorator makes the returned gradient a constant and raises only when grad_output
    itself requires grad, which a scalar loss's implicit grad_output of ones does not: a
    Hessian of the loss would then come out zero with no error. Backward runs with grad mode on
    exactly when create_graph=True.
    """
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def checked(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            raise RuntimeError(NOT_TWICE_DIFFERENTIABLE)
        try:
            return once(ctx, *grad_outputs)
        except RuntimeError as error:
            if "atching rule" in str(error) or "vmap" in str(error):
                raise RuntimeError(NOT_BATCHED) from error
            raise

    # Not traced either: with loss.backward() inside a compiled function, dynamo compiled these
    # frames too, breaking its graphs on the host read of grad_output with a warning.
    return outside_graph(checked)


class CrossEntropyFunction(torch.autograd.Function):
    """loss = reduce(kernel rows); the gradient is made in forward and scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        z: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: CrossEntropyOptions,
        kernel: Kernel,
    ) -> Tensor:
        grad = None
        if ctx.needs_input_grad[0]:
            grad = z if opts.inplace_backward else gradient_buffer_like(z)
        ce_scale, z_scale = reduction_scales(z, target, weight, opts)
        ce_scale, z_scale, factor = deferred_factor(
            ce_scale, z_scale, z.dtype, target, weight, opts
        )
        rows = kernel(z, target, weight, opts, ce_scale, z_scale, grad)  # (M,)
        ctx.opts, ctx.factor = opts, factor
        if grad is not None:
            keep_for_backward(ctx, grad)
        if factor is not None:
            rows = rows * factor
        return rows if opts.reduction == "none" else rows.sum()

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss: Tensor):
        nothing = (None, None, None, None)
        if ctx.opts.reduction == "none":  # per-row factors: scale a copy, keep the buffer intact
            (grad,) = kept_gradients(ctx)
            per_row = times_deferred(grad_loss.reshape(-1), ctx.factor)
            return scaled_in_blocks(grad, per_row, torch.empty_like(grad)), *nothing
        (grad,) = scaled_gradients(ctx, times_deferred(grad_loss, ctx.factor), (None,))
        return grad, *nothing
