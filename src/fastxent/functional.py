r"""Public functions: validate the call, pick a backend, run it."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastxent._autograd import (
    CrossEntropyFunction,
    Kernel,
    autocast_dtype,
    autocast_off,
    detached_without_grad_mode,
    fx_proxy_among,
    fx_recorded,
    needs_pytorch_ops,
    outside_graph,
)
from fastxent._options import (
    CrossEntropyOptions,
    check_flag,
    check_ignore_index,
    check_index_targets,
    check_inplace_logits,
    check_logits,
    check_scalars,
    check_soft_ignore_index,
    check_targets,
    check_weight,
    holds_class_indices,
    legacy_reduction,
    needs_pytorch_autograd,
    start_index_target_check,
    values_readable,
)
from fastxent._torch import composed

if TYPE_CHECKING:
    from fastxent import _linear

# Backend name -> module. Each module exposes ``cross_entropy_rows`` (the row kernel, see
# fastxent._autograd) and ``unavailable_reason(device) -> str | None``; it is imported on first use.
BACKENDS: dict[str, str] = {
    "torch": "fastxent._torch",
    "compiled": "fastxent._compiled",
    "triton": "fastxent._triton",
}
# What "auto" tries, in order, for each device type; "torch" runs everywhere.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("compiled", "torch"), "cuda": ("triton", "torch")}
# "auto" on CPU takes the portable kernel for logits of at most this many entries: there it was
# faster per forward+backward in every run of benchmarks/small_logits.py (0.31-0.50 ms against
# 0.47-0.69 ms for 16K-131K float32 logits), and it compiles nothing, where the compiled kernel's
# first call in a process takes seconds. From 2^18 to 2^19 logits the portable kernel was faster
# in some runs and twice as slow in others; from 2^20 on the compiled one wins (BENCHMARKS.md,
# "Which backend auto picks").
AUTO_PORTABLE_MAX_LOGITS = 1 << 17
# "auto" on CPU computes a cross_entropy call of at most this many logits from PyTorch's own fused
# ops instead (fastxent._torch.composed; not with inplace_backward). benchmarks/small_logits.py,
# two runs, float32 fwd+bwd: 0.12-0.13 ms against 0.26-0.35 (portable) and 0.44-0.47 (compiled)
# up to 64 x 256, and faster than both up to 2^19 logits (0.81-0.82 against 0.88-1.04 ms); at
# 2^20 the compiled kernel is as fast or faster (1.24-1.26 against 1.30-1.54 ms).
AUTO_COMPOSED_MAX_LOGITS = 1 << 19
# The same on CUDA, for cross_entropy: on an H200 at N = 4096 (benchmarks/gpu_tune.py --part
# small, back to back, two runs) 0.57-0.85 ms per fwd+bwd against 0.80-1.41 for the Triton
# kernel at V = 2048 and 8192 (up to 2^25 logits; in every one of the 8 pairs), while at
# V = 32768 the kernel wins (0.81-1.14 against 1.24-1.81). Eager PyTorch: 0.16-0.29 ms there.
AUTO_COMPOSED_MAX_LOGITS_CUDA = 1 << 25


def _backend_module(name: str):
    return importlib.import_module(BACKENDS[name])


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` now, or None when it can."""
    try:
        module = _backend_module(name)
    except ImportError as error:
        return f"it could not be imported ({error})"
    return module.unavailable_reason(device)


def check_backend_name(backend: str) -> None:
    """ValueError for a name that is neither "auto" nor one of :data:`BACKENDS`."""
    if backend != "auto" and backend not in BACKENDS:
        choices = ", ".join(repr(b) for b in ("auto", *BACKENDS))
        raise ValueError(f"unknown backend {backend!r}; choose one of {choices}.")


def resolve_backend(
    backend: str, device: torch.device, num_logits: int | None = None
) -> tuple[str, Kernel]:
    """Name and row kernel of ``backend`` on ``device``; "auto" takes the first that can run,
    and on CPU the portable kernel for at most ``AUTO_PORTABLE_MAX_LOGITS`` logits (the size of
    the call's logits, ``num_logits``, when known).

    Raises ValueError for an unknown name and RuntimeError for a backend that cannot run here.
    """
    if backend == "auto":
        order = AUTO_ORDER.get(device.type, ("torch",))
        small = num_logits is not None and num_logits <= AUTO_PORTABLE_MAX_LOGITS
        for name in ("torch",) if device.type == "cpu" and small else order:
            if unavailable_reason(name, device) is None:
                return name, _backend_module(name).cross_entropy_rows
        raise RuntimeError(f"no fastxent backend can run on {device}.")  # "torch" always can
    check_backend_name(backend)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}.")
    return backend, _backend_module(backend).cross_entropy_rows


def uses_composed(
    backend: str, device: torch.device, num_logits: int, linear: bool = False
) -> bool:
    """Whether a call is computed from PyTorch's fused ops: "auto" and small, on CPU; on CUDA
    too for cross_entropy (not measured for the linear loss there)."""
    if backend != "auto":
        return False
    if device.type == "cpu":
        return num_logits <= AUTO_COMPOSED_MAX_LOGITS
    return device.type == "cuda" and not linear and num_logits <= AUTO_COMPOSED_MAX_LOGITS_CUDA


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Softmax cross-entropy with its analytic gradient computed in the same pass.

    A drop-in for :func:`torch.nn.functional.cross_entropy`. With logits ``z`` transformed as
    ``z' = c·tanh(αz/c)`` (softcap ``c``; ``z' = αz`` without it) and effective targets ``t``
    (class weights ``w`` and label smoothing ``ε`` folded in), each row's loss and gradient are

    .. math::

        \ell = -\sum_j t_j \log o_j + s\,\mathrm{lse}^2, \qquad
        o_j = \frac{e^{z'_j}}{\sum_k e^{z'_k}}, \qquad
        \frac{\partial \ell}{\partial z'_i} = o_i \sum_j t_j - t_i + 2 s\,\mathrm{lse}\,o_i

    with ``t = (1-ε) w_y e_y + (ε/C) w`` for a class index ``y`` and ``t_j = w_j((1-ε)y_j + ε/C)``
    for probabilities ``y``, as in PyTorch. Probability targets need not sum to one: the general
    gradient ``o·Σt - t`` is used, never ``o - y``.

    Shapes: ``input`` is ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (classes on dim 1);
    ``target`` is ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` of int64 class indices, or the input's
    shape of probabilities. ``reduction="none"`` returns the target's (index) shape.

    The gradient is written during forward (into a new buffer, or into ``input`` itself with
    ``inplace_backward=True``); backward only scales it by ``grad_output``. Nothing else of size
    N×C is kept, and rows are processed in chunks so temporaries stay small. (Small calls with
    ``backend="auto"`` are the exception, see ``backend``: there the cost is per op, not per
    byte.)

    Args:
        input: logits, any floating dtype. bf16/fp16 accumulate in float32.
        target: class indices in ``[0, C)`` (or ``ignore_index``), or probabilities.
            Probabilities that require grad are differentiated as PyTorch does, on PyTorch's
            ops (which keep an N×C log-softmax; so do class weights that require grad).
        weight: ``(C,)`` class weights. "mean" divides by the total weight of the counted targets
            (index targets) or by the number of rows (probability targets), as PyTorch does.
            They may require grad with probability targets only, as in PyTorch.
        size_average, reduce: PyTorch's deprecated pair, accepted in their positions for
            drop-in calls and turned into ``reduction`` as PyTorch does (with a deprecation
            warning).
        ignore_index: class-index target value that contributes neither loss nor gradient; any
            int, including a valid class. With probability targets a class index (>= 0) is
            refused and a negative value has no effect, as in PyTorch.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        label_smoothing: ``ε`` in ``[0, 1]``, PyTorch's formula.
        z_loss: ``s >= 0``; adds ``s·lse²`` per counted row (the mean divides it by the number of
            counted rows, unaffected by class weights).
        softcap: ``c > 0`` or None; logits become ``c·tanh(αz/c)`` before the softmax.
        logit_scale: ``α``, multiplies the logits before the softcap and the softmax.
        inplace_backward: write the gradient into ``input``'s storage during forward. The logits
            are overwritten: their version counter is bumped, so autograd raises if anything
            else saved them for backward. Refused on a leaf tensor that requires grad.
        backend: ``"auto"`` or one of :data:`BACKENDS` (``"torch"``: portable, any device).
            ``"auto"`` takes ``"compiled"`` on CPU, ``"triton"`` on CUDA, each when it can run,
            else ``"torch"``. On CPU, "auto" computes calls of at most
            :data:`AUTO_COMPOSED_MAX_LOGITS` (2^19) logits from PyTorch's fused log-softmax
            ops with fastxent's semantics (fewer ops: faster there; not with
            ``inplace_backward``), and takes ``"torch"`` up to :data:`AUTO_PORTABLE_MAX_LOGITS`
            (2^17; nothing to compile); on CUDA it does the same up to
            :data:`AUTO_COMPOSED_MAX_LOGITS_CUDA` (2^25) logits. With the
            Triton kernel the target range check runs alongside it, and only its verdict is
            waited for; otherwise the check reads the targets first (a sync on CUDA).

    Returns:
        The loss: a scalar for "mean"/"sum", float32 for fp32/bf16/fp16 input and float64 for
        float64 input.

    Deviations from PyTorch (deliberate): a batch whose targets are all ignored (total weight
    zero) gives loss 0 and a zero gradient instead of NaN; the loss of half-precision input is
    float32; backward through a retained graph works until the gradient buffer is modified
    (e.g. accumulated into as a leaf's ``.grad``), then raises rather than return a wrong
    gradient. NaN and inf logits propagate as in PyTorch.

    Example:
        >>> import torch, fastxent
        >>> z = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
        >>> loss = fastxent.cross_entropy(z, torch.tensor([0]))
        >>> round(loss.item(), 4)
        0.1698
        >>> loss.backward(); z.grad.sum().abs().item() < 1e-6   # o - y sums to zero
        True

    References:
        Softmax gradient: Bridle (1990), "Probabilistic interpretation of feedforward
        classification network outputs". Label smoothing: Szegedy et al. (2016). z-loss:
        Chowdhery et al. (2022), PaLM. Softcap: Gemma 2 (2024).
    """
    if fx_proxy_among(input, target, weight):  # torch.fx.symbolic_trace: recorded whole
        return fx_recorded(cross_entropy, locals())
    check_logits(input)
    reduction = legacy_reduction(size_average, reduce, reduction)
    ignore_index = check_ignore_index(ignore_index)
    label_smoothing, z_loss, softcap, logit_scale = check_scalars(
        reduction, label_smoothing, z_loss, softcap, logit_scale
    )
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    if (
        class_dim == 0
        and isinstance(target, Tensor)
        and holds_class_indices(target)
        and target.shape == (1,)
    ):
        target = target.reshape(())  # PyTorch takes a (1,) class index for (C,) logits too
    soft = check_targets(input, target, class_dim)
    check_weight(weight, num_classes, device=input.device, soft=soft)
    check_soft_ignore_index(soft, ignore_index)
    check_flag("inplace_backward", inplace_backward)  # its logits are checked by _by_kernel
    check_backend_name(backend)  # also where PyTorch's ops serve the call
    transformed = needs_pytorch_ops(input, target, weight)  # PyTorch's ops check the targets
    fused_ops = (
        transformed
        or needs_pytorch_autograd(soft, target, weight)
        or not values_readable(input, target, weight)  # meta, torch.export: PyTorch's ops
        or (uses_composed(backend, input.device, input.numel()) and not inplace_backward)
        or num_classes == 0  # and no rows (check_targets): nothing for a kernel to do
    )
    opts = CrossEntropyOptions.of(
        num_classes,
        soft,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        inplace_backward,
    )
    z = _rows(input, class_dim)  # (M, C)
    t = _rows(target, class_dim) if soft else target.reshape(-1).long()  # (M, C) or (M,)
    if fused_ops:
        with autocast_off(input):
            if soft or transformed:
                loss = composed.cross_entropy(z, t, weight, opts)
            elif input.device.type == "cpu":  # PyTorch's ops check the class indices there
                loss = _with_our_index_error(
                    lambda: composed.cross_entropy(z, t, weight, opts), target, opts
                )
            else:
                check_index_targets_on_the_host(target, num_classes, ignore_index)
                loss = composed.cross_entropy(z, t, weight, opts)
    else:
        loss = _by_kernel(z, t, weight, opts, backend, target, input)
    if reduction == "none":
        loss = loss.reshape(input.shape[:class_dim] + input.shape[class_dim + 1 :])
    return loss


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    shift: bool = False,
    chunk_size: int | None = None,
    filter_eps: float | None = None,
    vocab_block: int | None = None,
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    validate: bool = False,
) -> Tensor:
    r"""Cross-entropy of the logits ``z = h Wᵀ + b``, without materialising the N×V logits.

    Equals ``cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2), target.flatten(),
    ...)`` (for (B, T, D) hidden the flattening puts the classes on dim 1, where
    :func:`cross_entropy` takes them; probability targets ``target.flatten(0, -2)``), with
    "none" losses in the tokens' shape. Tokens are processed in chunks: each chunk's logits
    ``z_c = h_c Wᵀ + b`` (n, V) are handed to the backend's row kernel, which overwrites them
    with ``g = ∂ℓ/∂z_c`` (the loss and gradient of :func:`cross_entropy`, with the reduction's
    scales taken over all targets); then

    .. math::

        \frac{\partial \ell}{\partial h_c} = g\,W, \qquad
        \frac{\partial \ell}{\partial W} = \sum_c g^\top h_c, \qquad
        \frac{\partial \ell}{\partial b} = \sum_c \sum_r g_r

    With "mean"/"sum" the gradients are complete after forward and backward scales them by
    ``grad_output``. With "none", forward computes the losses only and backward recomputes each
    chunk (∂W sums over rows, so a per-row ``grad_output`` must be known first).

    Shapes: ``hidden`` (N, D) or (B, T, D); ``weight`` (V, D); ``bias`` (V,); ``target`` the
    tokens' shape (N,) or (B, T) of class indices, or (N, V) / (B, T, V) probabilities.
    ``shift=True`` is the causal-LM shift: position t predicts target t+1 within each sequence
    (hidden[:, :-1] with target[:, 1:]; an (N, D) input is one sequence), read by index without
    copying the hidden states. "none" returns the tokens' shape (one fewer per sequence with shift).

    Memory beyond the inputs and gradients: one chunk of logits, the row kernel's temporaries
    and an (n, D) block. ``chunk_size=None`` sizes the chunk by ∂W's float32 accumulator, since
    every chunk rewrites ∂W and few rows would make that traffic dominate: for float32 on CPU
    a sixth of its bytes (at least 16 MiB; its matmuls are oneDNN's, which keep their speed on
    few rows), otherwise half of them (at least 64 MB). ∂W accumulates in float32 for bf16/fp16
    weights and is cast once at the end.

    Args:
        hidden: (N, D) or (B, T, D) floating hidden states. Under ``torch.autocast`` they
            are cast to the autocast dtype, as ``F.linear``'s input would be.
        weight: (V, D) classifier weight, hidden's dtype and device; under autocast any
            floating dtype but float64 (float32 master weights): cast for the matmuls, its
            gradient returned in its own dtype (the token walk's float32 accumulator as is).
        target: class indices in ``[0, V)`` (or ``ignore_index``), or probabilities.
        bias: optional (V,) bias.
        class_weight: optional (V,) class weights, as ``weight`` of :func:`cross_entropy`.
        ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale: as in
            :func:`cross_entropy`. The walks skip ignored tokens before the matmul.
        shift: next-token shift, see above.
        chunk_size: tokens per chunk; None picks it as above (by ∂W's size and the device).
        filter_eps: None (exact, the default) or ``eps >= 0``: within a chunk, skip the ∂h and ∂W
            matmul contributions of vocab blocks where ``|g| < eps`` for every row. Pays off on
            peaked (trained) distributions; the loss and ∂b stay exact.
        vocab_block: None (the token walk above) or a number of classes B: walk the vocabulary
            in blocks of B classes over all tokens at once instead. The logits of a block are
            computed twice (the log-sum-exp first, then the gradient): four matmuls instead of
            three, but ∂W is written once per block, so the memory beside the gradients is a
            few (N, B) blocks and bf16/fp16 ∂W needs no float32 copy. For when memory matters
            more than time; not with ``chunk_size``, ``filter_eps`` or ``process_group``. The
            backend's row kernel is not used (the block math is portable PyTorch).
        backend: ``"auto"`` or one of :data:`BACKENDS`; supplies the row kernel ("auto" as in
            :func:`cross_entropy`, the size being tokens × V). On CPU, "auto" computes calls of
            at most :data:`AUTO_COMPOSED_MAX_LOGITS` (2^19) tokens × V that choose no walk
            (``chunk_size``, ``filter_eps`` and ``vocab_block`` None) from the materialised
            logits with PyTorch's fused ops and autograd: faster at that size, and as small.
        process_group: None (one device), or the tensor-parallel ``torch.distributed`` group over
            which the vocabulary is split (Megatron-style): rank r passes its rows
            ``[s_r, s_r + V_r)`` of ``weight`` and ``bias`` (slices in rank order, uneven allowed)
            and the same ``hidden`` and GLOBAL class-index ``target``; ``class_weight`` is the
            global (V,) vector. Every rank gets the single-process loss, the full ∂h (one SUM
            all-reduce in forward) and its slice of ∂W and ∂b; each token chunk makes one MAX
            and one SUM all-reduce. "none" recomputes in backward with the same collectives, so
            every rank must run backward with the same grad_output. ``filter_eps`` filters each
            rank's own vocab blocks. Not supported: probability targets, sequence parallelism
            (hidden split along tokens), backends other than "auto"/"torch". See
            :mod:`fastxent.distributed` and ``examples/vocab_parallel_linear.py``.
        validate: with ``process_group``, all-gather and check the shard layout, row count,
            targets and options on every call, not only on the first call for a layout (for
            debugging inputs that differ between ranks, which otherwise can hang NCCL).

    Returns:
        The loss: a scalar for "mean"/"sum", float32 for fp32/bf16/fp16 and float64 for float64.

    Example:
        >>> import torch, fastxent
        >>> h = torch.randn(6, 8, requires_grad=True)
        >>> w = torch.randn(50, 8, requires_grad=True)
        >>> y = torch.randint(0, 50, (6,))
        >>> loss = fastxent.linear_cross_entropy(h, w, y, chunk_size=4)
        >>> expected = torch.nn.functional.cross_entropy(h @ w.T, y)
        >>> bool(torch.allclose(loss, expected, atol=1e-5))
        True
        >>> loss.backward(); tuple(w.grad.shape)
        (50, 8)

    References:
        Wijmans et al. (2025), "Cut Your Losses in Large-Vocabulary Language Models" (chunked
        logits, gradient filtering); Hsu et al. (2024), "Liger Kernel" (fused linear
        cross-entropy).
    """
    if fx_proxy_among(hidden, weight, target, bias, class_weight):
        return fx_recorded(linear_cross_entropy, locals())  # torch.fx.symbolic_trace
    from fastxent._linear import (
        LinearOptions,
        check_chunking,
        check_inputs,
        default_chunk_size,
    )

    compute_dtype = None  # what autocast runs F.linear in; it leaves float64 alone
    if isinstance(hidden, Tensor) and hidden.is_floating_point() and hidden.dtype != torch.float64:
        compute_dtype = autocast_dtype(hidden.device)
    master_weights = compute_dtype is not None
    if master_weights:  # F.linear's cast under autocast; weight and bias are cast in the walk
        hidden = hidden.to(compute_dtype)
    if isinstance(target, Tensor) and holds_class_indices(target):
        # int64, as cross_entropy's: in int32 `target != ignore_index` wraps an ignore_index
        # beyond int32 (2**40 ignored class 0), and uint8/int16 failed inside the walks' gather.
        target = target.long()
    if process_group is not None:  # every input check there, so that a failure reaches all ranks
        from fastxent.distributed import vocab_parallel_linear_cross_entropy

        with autocast_off(hidden):
            return vocab_parallel_linear_cross_entropy(
                hidden, weight, target, bias, group=process_group, class_weight=class_weight,
                ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, shift=shift,
                chunk_size=chunk_size, filter_eps=filter_eps, backend=backend, validate=validate,
                master_weights=master_weights, vocab_block=vocab_block,
            )  # fmt: skip

    ignore_index = check_ignore_index(ignore_index)
    label_smoothing, z_loss, softcap, logit_scale = check_scalars(
        reduction, label_smoothing, z_loss, softcap, logit_scale
    )
    soft = check_inputs(hidden, weight, bias, target, shift, master_weights)
    num_classes = weight.shape[0]
    check_weight(class_weight, num_classes, "class_weight", hidden.device, "hidden", soft)
    check_soft_ignore_index(soft, ignore_index)
    chunk_size, vocab_block = check_chunking(chunk_size, filter_eps, vocab_block)
    check_backend_name(backend)  # also where PyTorch's ops serve the call
    tokens = math.prod(hidden.shape[:-1])  # not Size.numel(): it fixes a symbolic batch size
    ce_opts = CrossEntropyOptions.of(
        num_classes, soft, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale
    )
    walk_chosen = chunk_size is not None or filter_eps is not None or vocab_block is not None
    # torch.func, forward AD, DTensor, meta and torch.export's fake tensors: PyTorch's ops.
    # D = 0 (logits = bias) has nothing to walk: PyTorch's ops too, which check the targets.
    transformed = needs_pytorch_ops(hidden, weight, bias, target, class_weight)
    traced = not values_readable(hidden, weight, bias, target, class_weight)
    if (
        transformed
        or traced
        or needs_pytorch_autograd(soft, target, class_weight)
        or hidden.shape[-1] == 0
        # Small calls; asked last: under torch.export the token count is a symbol, which a
        # comparison would fix to the example's value.
        or (not walk_chosen and uses_composed(backend, hidden.device, tokens * num_classes, True))
    ):

        def compute() -> Tensor:
            with autocast_off(hidden):
                return composed.linear_cross_entropy(
                    hidden, weight, bias, target, class_weight, ce_opts, shift
                )

        return (
            compute()
            if soft or transformed
            else _with_our_index_error(compute, target, ce_opts, shift)
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(
            num_classes, hidden.shape[-1], hidden.dtype, tokens, hidden.device.type
        )
    opts = LinearOptions(
        ce=ce_opts,
        chunk_size=chunk_size,
        shift=shift,
        filter_eps=None if filter_eps is None else float(filter_eps),
        vocab_block=vocab_block,
    )
    return _linear_by_walk(hidden, weight, bias, target, class_weight, opts, backend)


@outside_graph
def _linear_by_walk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    opts: _linear.LinearOptions,
    backend: str,
) -> Tensor:
    """The loss through :class:`LinearCrossEntropyFunction`'s walk with ``backend``'s row
    kernel, class indices checked by fastxent first. Never traced by torch.compile, as
    :func:`_by_kernel` (and as there, a transform traced around the break is asked for here)."""
    from fastxent._linear import LinearCrossEntropyFunction

    if needs_pytorch_ops(hidden, weight, bias, target, class_weight):
        with autocast_off(hidden):
            return composed.linear_cross_entropy(
                hidden, weight, bias, target, class_weight, opts.ce, opts.shift
            )

    num_logits = hidden.shape[:-1].numel() * weight.shape[0]
    _, kernel = resolve_backend(backend, hidden.device, num_logits)
    if not opts.ce.soft:
        check_index_targets(target, opts.ce.num_classes, opts.ce.ignore_index, opts.shift)
    hidden, weight, bias = detached_without_grad_mode(hidden, weight, bias)
    with autocast_off(hidden):
        return LinearCrossEntropyFunction.apply(
            hidden, weight, bias, target, class_weight, opts, kernel
        )


@outside_graph
def _by_kernel(
    z: Tensor,
    t: Tensor,
    weight: Tensor | None,
    opts: CrossEntropyOptions,
    backend: str,
    target: Tensor,
    logits: Tensor,
) -> Tensor:
    """The rows' loss through :class:`CrossEntropyFunction` and ``backend``'s row kernel; class
    indices checked by fastxent (on CUDA beside the Triton kernel, which reads bad targets
    safely), and with ``inplace_backward`` the caller's ``logits`` (``z`` is their rows).

    Never traced by torch.compile: one graph break (:func:`outside_graph`). That is also why the
    logits are checked here: dynamo cannot trace ``Tensor._is_view``, and the paths on PyTorch's
    ops (torch.func, torch.export, gradients of probability targets) write nothing into them.
    The caller's test for a torch.func transform or dual tensors cannot see them while dynamo
    traces (forward AD, or ``grad``/``vmap`` that the "eager" backend traces through, reached
    this Function: it has no jvp, and no setup_context for torch.func), so it is asked here.
    """
    if needs_pytorch_ops(z, t, weight):
        with autocast_off(z):
            return composed.cross_entropy(z, t, weight, opts)
    if opts.inplace_backward:
        check_inplace_logits(logits, target=target, weight=weight)
    name, kernel = resolve_backend(backend, z.device, z.numel())
    finish_target_check = None
    if not opts.soft:
        finish_target_check = start_index_target_check(
            target, opts.num_classes, opts.ignore_index, defer=name == "triton"
        )
    with autocast_off(z):
        (z_in,) = detached_without_grad_mode(z)
        loss = CrossEntropyFunction.apply(z_in, t, weight, opts, kernel)
    if finish_target_check is not None:
        finish_target_check()
    return loss


# On CUDA a check inside a traced graph would be a device-side assert, after which the device
# is unusable: the targets are read on the host, outside the graph (a break under torch.compile).
check_index_targets_on_the_host = outside_graph(
    check_index_targets,
    reason="fastxent reads CUDA class-index targets on the host, outside the graph, to check "
    "their range (on CPU, from torch 2.9, the graph checks them itself)",
)


def _with_our_index_error(
    compute: Callable[[], Tensor], target: Tensor, opts: CrossEntropyOptions, shift: bool = False
) -> Tensor:
    """``compute()``, where (on CPU) PyTorch's ops check the class indices: their IndexError
    ("Target 10 is out of bounds.") becomes fastxent's, which names the position in the caller's
    ``target`` (``shift`` as in :func:`check_index_targets`), with no PyTorch traceback chained."""
    try:
        return compute()
    except IndexError as error:
        torch_error = error
    check_index_targets(target, opts.num_classes, opts.ignore_index, shift)  # raises fastxent's
    raise torch_error


def _rows(x: Tensor, class_dim: int) -> Tensor:
    """View ``x`` as (M, C) rows of classes: (C,) -> (1, C); (N, C, d...) -> (N·d..., C)."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    rows = x.movedim(class_dim, -1)
    return rows.reshape(math.prod(rows.shape[:-1]), rows.shape[-1])  # -1 is ambiguous at C = 0
