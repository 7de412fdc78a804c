r"""Vocab-parallel cross-entropy: the single-device row kernel with its collectives marked.

With tensor parallelism the vocabulary is split across the ranks of a process group: rank ``r``
holds the logits ``z[:, s_r : s_r + V_r]`` of its slice of the ``V`` classes (Megatron-style; the
slices may be uneven). The loss needs the global log-sum-exp of each row, which is assembled from
per-rank statistics with two all-reduces, one row chunk of local logits at a time:

.. math::

    m_r = \max_{j \in r} z'_j, \qquad S_r = \textstyle\sum_{j \in r} e^{z'_j - m_r}
        \qquad \text{(local, one read of the logits)}

    m = \max_r m_r \quad \text{(MAX all-reduce)}, \qquad
    S = \textstyle\sum_r S_r\, e^{m_r - m} \quad \text{(SUM all-reduce)}, \qquad
    \mathrm{lse} = m + \log S

The same SUM all-reduce carries the target logit ``z'_y`` (nonzero only on the rank that owns
``y``) and, with label smoothing, ``Σ_j z'_j`` (or ``Σ_j w_j z'_j`` with class weights) over the
whole vocabulary. With the global ``lse`` every rank knows each row's loss (the same number on every
rank) and writes its own slice of the gradient in a second pass:

.. math::

    \frac{\partial \ell}{\partial z'_i} = a\,(o_i \textstyle\sum_j t_j - t_i)
        + b\, 2 s\, \mathrm{lse}\, o_i, \qquad o_i = e^{z'_i - \mathrm{lse}}, \quad i \in r

The second pass starts from ``e^{z'_i - m_r}``, kept in the gradient buffer by the first pass
when that buffer has the accumulation dtype (float32 and float64 logits), so ``o_i`` is one
multiply; otherwise (bf16/fp16, or softcap with ``inplace_backward``) it reads the logits again.
Nothing of size N×V_r is allocated besides the gradient buffer (none with ``inplace_backward``)
and chunk temporaries of a few MB.

Label smoothing uses the global ``V`` and the global sums, so each rank's gradient is exactly its
slice of the single-process gradient (the local vocabulary size would give a different loss on
every rank). Softcap and logit scale act elementwise on the local logits; the z-loss uses the
global ``lse``.

Communication, all inside forward (backward only scales the kept gradient, as in
:class:`fastxent._autograd.CrossEntropyFunction`, which this module reuses unchanged):

* a call whose layout key (the entry point, ``V_r``, ``vocab_start``) differs from the group's
  last one also makes one ``all_gather`` of twelve int64 per rank: whether the rank's own input
  checks passed (else its exception's class), the logits' dtype, rows, local vocabulary size,
  ``vocab_start``, the length of the class weights, the least and the largest counted target, a
  hash of the options and three checksums of the targets, to check every rank's inputs and
  derive the shard layout (fifteen for the fused projection, which also compares
  ``chunk_size``, ``hidden.requires_grad`` and ``D``). The
  layout ``(vocab_start, sizes of all ranks)`` is then kept with that key, the group's last,
  and later calls with the same key skip the all-gather and its checks (and their host sync):
  alternating between two layouts (two heads of different sizes) gathers on every switch;
* every call makes one MAX ``all_reduce`` of an ``(N,)`` tensor in the accumulation dtype: the
  row max;
* and one SUM ``all_reduce`` of an ``(N, 2)`` tensor (``(N, 3)`` with label smoothing) in the
  accumulation dtype: ``S_r e^{m_r - m}``, ``z'_y``, smoothing sum.

``validate=True`` makes the all-gather and every check of the first call on every call: use it to
debug inputs that may differ between ranks (row counts, targets, options), which without it are
not compared after the first call and can hang NCCL or give wrong results. Cache hits are per
rank and not compared either: when the slices of a group change, the key must change on every
rank (or every rank passes ``validate=True`` for that call); if it changes on some ranks only,
those all-gather while the others all-reduce.

Supported: class-index targets of shape ``local_logits.shape[:-1]`` (classes on the LAST dim,
so ``(N, V_r)`` and ``(B, T, V_r)`` both work), uneven and arbitrarily ordered slices (given by
``vocab_start``), class weights (the global ``(V,)`` vector, the same on every rank), label
smoothing, z-loss, softcap, logit scale, ``ignore_index``, every reduction, in-place backward,
any device the process group's backend handles (gloo on CPU, NCCL on CUDA).
Not supported: probability targets, sequence parallelism (rows split across ranks as well as the
vocabulary: each rank must hold all N rows), a shard with no class, and the upstream all-reduce of
the gradient of replicated inputs (for ``z = h W_r^T`` the caller sums ``∂ℓ/∂h`` over the group,
as Megatron's copy-to-tensor-parallel-region does).

The fused projection ``fastxent.linear_cross_entropy(h, W_r, y, b_r, process_group=group)``
(:func:`vocab_parallel_linear_cross_entropy`) never holds the ``(N, V_r)`` logits: it walks token
chunks with this row kernel (one MAX and one SUM all-reduce per chunk) and does the ``∂h``
all-reduce itself, once, at the end of forward; slices follow rank order there.

Bad input raises on every rank, not on one rank while the others wait in a collective until the
process group times out, on the calls that make the all-gather (the first for a layout, and every
call with ``validate=True``): each rank runs its own checks first and sends their verdict in the
all-gather. A rank whose input fails (a wrong shape or dtype, a target out of range, class weights
of the wrong length, an option out of range, ...) raises its own error, and every other rank an
error of the same class that names it; what differs between ranks (dtype, shard layout, row
count, targets, weights given on some ranks only, the scalar options ``reduction``,
``ignore_index``, ``label_smoothing``, ``z_loss``, ``softcap`` and ``logit_scale``, and the
options of the fused projection above) raises the same error on every rank. On the other calls
nothing is compared: an error raised on some ranks only leaves the others waiting in their next
collective (pass ``validate=True`` on every rank to have it raised everywhere). The target and
option checks compare checksums (they catch any realistic mismatch, they are not a proof); the
values of ``weight`` must be the same on every rank and are not compared.
Validation reads small results on the host (the all-gather's, and the target range), as
:func:`fastxent.cross_entropy` does for the target range.
"""

from __future__ import annotations

import functools
import math
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fastxent._autograd import (
    CrossEntropyFunction,
    accumulation_dtype,
    apply_outside_graph,
    autocast_off,
    copy_into,
    detached_without_grad_mode,
    fx_proxy_among,
    fx_recorded,
    needs_pytorch_ops,
)
from fastxent._options import (
    CrossEntropyOptions,
    check_device,
    check_flag,
    check_ignore_index,
    check_index_targets,
    check_inplace_logits,
    check_logits,
    check_scalars,
    check_weight,
    holds_class_indices,
)
from fastxent._torch.kernel import rows_per_chunk, transform

__all__ = ["vocab_parallel_cross_entropy"]


def _check_group(name: str, group: object, none_means: str) -> None:
    """TypeError unless ``group`` is a ProcessGroup (or None, where ``none_means`` says what it
    means): a name or a rank list would otherwise fail as an uninitialised group, or deep in a
    collective. The same on every rank, so raised before any collective."""
    process_group = getattr(dist, "ProcessGroup", None)  # None in builds without distributed
    if group is None or (process_group is not None and isinstance(group, process_group)):
        return
    raise TypeError(
        f"{name} must be a torch.distributed ProcessGroup (e.g. from dist.new_group) or "
        f"{none_means}, got {type(group).__name__}."
    )


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
    validate: bool = False,
) -> Tensor:
    r"""Cross-entropy over a vocabulary split across the ranks of ``group``.

    Every rank passes its slice of the logits, ``z[..., s_r : s_r + V_r]``, and the same global
    targets; every rank gets the same loss, equal to
    :func:`fastxent.cross_entropy` of the full logits, and its slice of the full gradient:

    .. math::

        \ell = -\sum_j t_j \log o_j + s\,\mathrm{lse}^2, \qquad
        \mathrm{lse} = \log \sum_{r} \sum_{j \in r} e^{z'_j}, \qquad
        \frac{\partial \ell}{\partial z'_i} = o_i \sum_j t_j - t_i + 2 s\,\mathrm{lse}\,o_i

    with ``t = (1-ε) w_y e_y + (ε/V) w`` over the global vocabulary of ``V`` classes. Forward
    makes one MAX and one SUM all-reduce of per-row statistics; backward communicates nothing.
    The first call for a layout key ``(group, V_r, vocab_start)`` also makes a tiny all-gather
    that derives and checks the shard layout, the dtype, the row count and the targets on every
    rank, and caches the layout; later calls with the same key skip it. On the calls that make it,
    bad input on any rank raises on every rank: that rank raises its own error, the others one of
    the same class naming it (see :mod:`fastxent.distributed`). A row of ``-inf`` logits on every
    rank gets a NaN gradient, ignored or not, and a NaN loss if counted, as in PyTorch.

    Shapes: ``local_logits`` is ``(N, V_r)`` or ``(..., V_r)`` with classes on the LAST dim (for
    ``(B, T, V_r)`` the leading dims are flattened into rows); ``target`` is
    ``local_logits.shape[:-1]`` of int64 global class ids in ``[0, V)`` or ``ignore_index``, the
    same on every rank. ``reduction="none"`` returns the target's shape.

    Args:
        local_logits: this rank's logits, any floating dtype (bf16/fp16 accumulate in float32).
        target: global class indices, identical on every rank (checked on the first call for a
            layout, and on every call with ``validate=True``).
        group: the tensor-parallel process group; None for the default group.
        vocab_start: the first global class of this rank's slice. None on every rank: slices
            follow rank order (prefix sums of the slice sizes). Given on every rank: the slices
            must tile ``[0, V)`` without gap or overlap.
        weight: the GLOBAL ``(V,)`` class weights, the same on every rank; each rank reads its
            slice. "mean" divides by the total weight of the counted targets, as PyTorch does.
        ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale: as in
            :func:`fastxent.cross_entropy`, with ``V`` the global vocabulary size.
        inplace_backward: write this rank's gradient into ``local_logits`` during forward.
        validate: make the all-gather and its checks (every rank's input checks, layout, dtype,
            row count, targets) on every call, not only on the first call for a layout; for
            debugging inputs that may be wrong or differ on some ranks only, which otherwise
            leave the other ranks waiting in a collective. The same on every rank.

    Returns:
        The loss, the same on every rank: a scalar for "mean"/"sum", float32 (float64 for
        float64 logits).

    Example (run under ``torchrun --nproc-per-node 2``; see ``examples/vocab_parallel.py``):
        >>> import torch, torch.distributed as dist, fastxent  # doctest: +SKIP
        >>> dist.init_process_group("gloo")  # doctest: +SKIP
        >>> _ = torch.manual_seed(0)  # the same logits and targets on every rank  # doctest: +SKIP
        >>> z = torch.randn(8, 1001)  # the full logits  # doctest: +SKIP
        >>> local = z.tensor_split(dist.get_world_size(), dim=1)[dist.get_rank()]  # doctest: +SKIP
        >>> y = torch.randint(0, 1001, (8,))  # doctest: +SKIP
        >>> loss = fastxent.vocab_parallel_cross_entropy(local, y)  # doctest: +SKIP

    References:
        Shoeybi et al. (2019), "Megatron-LM: Training Multi-Billion Parameter Language Models
        Using Model Parallelism" (vocab-parallel cross-entropy).
    """
    if fx_proxy_among(local_logits, target, weight):  # torch.fx.symbolic_trace
        return fx_recorded(vocab_parallel_cross_entropy, locals())
    _check_group("group", group, "None (the default group)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab_parallel_cross_entropy needs an initialised torch.distributed process group; "
            "call torch.distributed.init_process_group (e.g. under torchrun) first."
        )
    # This rank's checks; a failure reaches every rank through the layout all-gather (if made).
    try:
        rows_shape, z, y, ignore_index = _check_cross_entropy(
            local_logits,
            target,
            vocab_start,
            ignore_index,
            reduction,
            label_smoothing,
            z_loss,
            softcap,
            logit_scale,
            inplace_backward,
        )
        options = _options_hash(
            reduction, ignore_index, label_smoothing, z_loss, softcap, logit_scale
        )
        mine: _RankInputs | Exception = _RankInputs(
            y=y,
            num_local=z.shape[1],
            vocab_start=vocab_start,
            dtype=z.dtype,
            ignore_index=ignore_index,
            weight_length=_weight_length(weight, "weight", z.device, "local_logits"),
            check_classes=functools.partial(
                _check_classes, weight=weight, name="weight", target=y, ignore_index=ignore_index
            ),
            agreed=(options,),
        )
    except Exception as error:  # raised after the all-gather, or now if there is none
        mine = error
    key = _layout_key(local_logits, -1, vocab_start)
    device = _device_of(local_logits, target)
    vocab_start, sizes = _shard_layout(mine, key, group, device, validate, _AGREED)
    vocab_size = sum(sizes)
    opts = CrossEntropyOptions.of(
        vocab_size,
        False,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        inplace_backward,
    )
    kernel = functools.partial(vocab_parallel_rows, vocab_start=vocab_start, group=group)
    (z,) = detached_without_grad_mode(z)
    with autocast_off(z):
        loss = apply_outside_graph(CrossEntropyFunction, z, y, weight, opts, kernel)
    return loss.reshape(rows_shape) if reduction == "none" else loss


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    group: dist.ProcessGroup,
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
    backend: str = "auto",
    validate: bool = False,
    master_weights: bool = False,
    vocab_block: int | None = None,
) -> Tensor:
    r"""``fastxent.linear_cross_entropy(..., process_group=group)``: the vocab-parallel path.

    Rank ``r`` (in the group's rank order) holds rows ``[s_r, s_r + V_r)`` of the ``(V, D)``
    weight and of the bias; ``hidden`` and the global ``target`` are the same on every rank. The
    chunked walk of :mod:`fastxent._linear` runs on every rank with the local weight and the
    vocab-parallel row kernel:

    .. math::

        z_c^{(r)} = h_c W_r^\top + b_r, \qquad
        \frac{\partial \ell}{\partial h} = \textstyle\sum_r g^{(r)} W_r, \qquad
        \frac{\partial \ell}{\partial W_r} = \textstyle\sum_c g_c^{(r)\top} h_c

    Each token chunk makes the row kernel's MAX and SUM all-reduces over its rows, so every rank
    uses the same chunk size (taken from the largest ``V_r`` when None; checked when given).
    ∂W_r and ∂b_r are local and complete; ∂h is summed by one all-reduce of the (N, D) gradient
    at the end of forward ("mean"/"sum", backward then communicates nothing). "none" recomputes
    the chunks in backward with the same collectives plus that all-reduce: every rank must run
    backward, with the same ``grad_output``. ``filter_eps`` acts on each rank's local gradient
    (the dropped contributions are those of its own vocab blocks). Class-index targets only.

    The first call for a layout key ``(group, V_r)`` also makes the all-gather of
    :mod:`fastxent.distributed`, which checks the layout, hidden's dtype and ``D``, the row
    count, the targets, ``chunk_size`` and ``hidden.requires_grad`` on every rank and caches the
    layout; later calls skip it, so each forward makes 2 all-reduces per token chunk plus the one
    of ∂h. On the calls that make it, bad input on any rank (shapes, dtypes, targets, options)
    raises on every rank. ``validate=True`` makes the all-gather and its checks on every call.
    ``master_weights``
    (set under autocast, which has cast ``hidden``) lets the weight and bias keep their own
    floating dtype: they are cast for the matmuls and get their gradients in it.
    """
    from fastxent._linear import (
        LinearCrossEntropyFunction,
        LinearOptions,
        check_chunking,
        check_inputs,
        default_chunk_size,
    )

    _check_group("process_group", group, "None (one device)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "linear_cross_entropy with a process_group needs an initialised torch.distributed "
            "process group; call torch.distributed.init_process_group (e.g. under torchrun) first."
        )
    # This rank's checks; a failure reaches every rank through the layout all-gather (if made).
    try:
        _check_kernel_inputs(
            "linear_cross_entropy with a process_group", hidden, local_weight, bias, target,
            class_weight,
        )  # fmt: skip
        if vocab_block is not None:
            raise ValueError(
                "vocab_block is for one device; with process_group the vocabulary is already "
                "split across ranks (leave vocab_block None)."
            )
        label_smoothing, z_loss, softcap, logit_scale = check_scalars(
            reduction, label_smoothing, z_loss, softcap, logit_scale
        )
        ignore_index = check_ignore_index(ignore_index)
        # Before the shape checks, which would ask for (N, V_r) probabilities.
        if isinstance(target, Tensor) and target.is_floating_point():
            raise TypeError(
                "linear_cross_entropy with a process_group takes global class indices (an int64 "
                "tensor) as target; probability targets are not supported, got dtype "
                f"{target.dtype}."
            )
        # A shard without classes passes here and is refused on every rank by the layout gather.
        check_inputs(
            hidden, local_weight, bias, target, shift, master_weights, allow_no_classes=True
        )
        chunk_size, _ = check_chunking(chunk_size, filter_eps)
        if backend not in ("auto", "torch"):
            raise ValueError(
                "with a process_group the vocab-parallel PyTorch row kernel is used; backend must "
                f"be 'auto' or 'torch', got {backend!r}."
            )
        y = (target[..., 1:] if shift else target).reshape(-1).long()  # (M,) loss rows' targets
        needs_hidden = torch.is_grad_enabled() and hidden.requires_grad
        options = _options_hash(
            reduction, ignore_index, label_smoothing, z_loss, softcap, logit_scale
        )
        mine: _RankInputs | Exception = _RankInputs(
            y=y,
            num_local=local_weight.shape[0],
            vocab_start=None,
            dtype=hidden.dtype,
            ignore_index=ignore_index,
            weight_length=_weight_length(class_weight, "class_weight", hidden.device, "hidden"),
            check_classes=functools.partial(
                _check_classes,
                weight=class_weight,
                name="class_weight",
                target=target,
                ignore_index=ignore_index,
                shift=shift,
            ),
            agreed=(
                chunk_size or 0,
                int(needs_hidden),
                hidden.shape[-1],
                options,
            ),
            dtype_of="hidden",
            weight_name="class_weight",
        )
    except Exception as error:  # raised after the all-gather, or now if there is none
        mine = error
    key = _layout_key(local_weight, 0, None)
    device = _device_of(hidden, local_weight, target)
    vocab_start, sizes = _shard_layout(mine, key, group, device, validate, _LINEAR_AGREED)
    vocab_size = sum(sizes)
    opts = LinearOptions(
        ce=CrossEntropyOptions.of(
            vocab_size,
            False,
            ignore_index,
            reduction,
            label_smoothing,
            z_loss,
            softcap,
            logit_scale,
        ),
        # The same on every rank: a rank with fewer chunks would leave the others' all-reduces.
        chunk_size=chunk_size
        or default_chunk_size(
            max(sizes), hidden.shape[-1], hidden.dtype, device_type=hidden.device.type
        ),
        shift=shift,
        filter_eps=None if filter_eps is None else float(filter_eps),
        reduce_hidden_grad=functools.partial(dist.all_reduce, group=group),
    )
    kernel = functools.partial(vocab_parallel_rows, vocab_start=vocab_start, group=group)
    hidden, local_weight, bias = detached_without_grad_mode(hidden, local_weight, bias)
    return apply_outside_graph(
        LinearCrossEntropyFunction, hidden, local_weight, bias, target, class_weight, opts, kernel
    )


Layout = tuple[int, list[int]]  # (vocab_start of this rank, local vocabulary sizes of all ranks)
LayoutKey = tuple[int, int | None]  # (local vocabulary size, vocab_start argument)
# process group -> its last layout key and layout: one entry, not one per key ever seen, so that
# ranks that each hit a key they cached under different earlier layouts cannot combine them
# into a layout nobody passed. Weak keys: a destroyed group (and its threads) must not be kept.
_LAYOUTS: weakref.WeakKeyDictionary[dist.ProcessGroup, tuple[LayoutKey, Layout]] = (
    weakref.WeakKeyDictionary()
)


# The values the ranks must agree on, in the order of _RankInputs.agreed.
_OPTIONS = (
    "the scalar options (reduction, ignore_index, label_smoothing, z_loss, softcap, logit_scale; "
    "compared by a hash)"
)
_AGREED = (_OPTIONS,)
_LINEAR_AGREED = ("chunk_size (0 = None)", "hidden.requires_grad", "hidden.shape[-1] (D)", _OPTIONS)


def _options_hash(reduction: str, ignore_index: int, *scalars: float | None) -> int:
    """One int for the options, the same on every rank exactly when their values are equal: the
    float options hashed as floats (``0`` and ``0.0``, ``-0.0`` and ``0.0``, a NumPy float and
    its value were refused as different when their reprs were hashed)."""
    floats = tuple(None if x is None else float(x) + 0.0 for x in scalars)  # + 0.0: -0.0 → 0.0
    return zlib.crc32(repr((reduction, int(ignore_index), *floats)).encode())


# A rank whose checks failed sends 1 + the index here of its exception's class (0: passed), so
# that every rank raises the same class; other exceptions reach the other ranks as RuntimeError.
_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, IndexError, RuntimeError)
# Every dtype of this torch build, in a fixed order: the all-gather carries an index into it.
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
_HEADER = 8  # failed, dtype, rows, V_r, vocab_start, weight length, least and largest target
_TOO = "; this rank raises too, so that no rank is left waiting in a collective."


@dataclass(frozen=True)
class _RankInputs:
    """What a rank whose inputs passed its own checks brings to the layout all-gather.

    ``y`` (M,): the loss rows' targets; ``weight_length``: see :func:`_weight_length`;
    ``check_classes(V)``: this rank's checks that need the global vocabulary size ``V`` (the
    class weights' shape, the target range), raising its own error; ``agreed``: the values of
    the names given to :func:`_shard_layout`, which must be equal on every rank; ``dtype_of`` and
    ``weight_name`` name the inputs in the errors.
    """

    y: Tensor
    num_local: int
    vocab_start: int | None
    dtype: torch.dtype
    ignore_index: int
    weight_length: int
    check_classes: Callable[[int], None]
    agreed: tuple[int, ...] = ()
    dtype_of: str = "local_logits"
    weight_name: str = "weight"


def _check_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    vocab_start: int | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    inplace_backward: bool,
) -> tuple[tuple[int, ...], Tensor, Tensor, int]:
    """The checks of :func:`vocab_parallel_cross_entropy` that need no other rank. Returns the
    rows' shape, the logits as rows ``(N, V_r)``, the targets ``(N,)`` in int64 and ignore_index."""
    check_logits(local_logits, "local_logits")
    _check_kernel_inputs("vocab_parallel_cross_entropy", local_logits, target)
    label_smoothing, z_loss, softcap, logit_scale = check_scalars(
        reduction, label_smoothing, z_loss, softcap, logit_scale
    )
    ignore_index = check_ignore_index(ignore_index)
    if local_logits.dim() < 2:
        raise ValueError(
            "local_logits must have shape (N, V_local) or (..., V_local) with the classes on the "
            f"last dim, got shape {tuple(local_logits.shape)}."
        )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    check_device("target", target, local_logits.device, "local_logits")
    if not holds_class_indices(target):
        raise TypeError(
            "vocab_parallel_cross_entropy takes global class indices (an int64 tensor) as "
            f"target, got dtype {target.dtype}"
            + ("; probability targets are not supported." if target.is_floating_point() else ".")
        )
    rows_shape = tuple(local_logits.shape[:-1])
    if tuple(target.shape) != rows_shape:
        raise ValueError(
            f"target must have shape {rows_shape} for local_logits of shape "
            f"{tuple(local_logits.shape)} (the logits without their last, class dim), got "
            f"{tuple(target.shape)}."
        )
    check_flag("inplace_backward", inplace_backward)
    if inplace_backward:
        check_inplace_logits(local_logits)
    if vocab_start is not None and (not isinstance(vocab_start, int) or vocab_start < 0):
        raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}.")
    # (N, V_r); not reshape(-1, V_r): a rank with no class (V_r = 0) must reach the layout
    # all-gather, which refuses it on every rank, instead of failing alone and hanging the rest.
    z = local_logits.reshape(math.prod(rows_shape), local_logits.shape[-1])
    return rows_shape, z, target.reshape(-1).long(), ignore_index


def _check_kernel_inputs(name: str, *tensors: Tensor | None) -> None:
    """TypeError for the inputs that one device computes with PyTorch's ops (a torch.func
    transform, forward-mode AD's dual tensors, DTensor: ``needs_pytorch_ops``): over a split
    vocabulary PyTorch's ops cannot see the other ranks' classes, and fastxent's kernels cannot
    serve them (under no_grad a dual tensor's tangent was dropped, silently)."""
    if needs_pytorch_ops(*tensors):
        raise TypeError(
            f"{name} runs fastxent's kernels only, which take plain tensors: not under torch.func "
            f"transforms, nor forward-mode AD's dual tensors, nor DTensor inputs. Compute such "
            f"derivatives from the gathered full-vocabulary logits (fastxent.cross_entropy)."
        )


def _weight_length(weight: Tensor | None, name: str, device: torch.device, of: str) -> int:
    """The number of classes that ``weight`` fits, for the all-gather: -1 for None (any), -2 for a
    tensor that is not 1-D (none). What :func:`check_weight` refuses whatever that number is (not
    a floating tensor, requiring grad, not on ``device``, that of ``of``) raises here, before the
    all-gather."""
    if weight is None:
        return -1
    if isinstance(weight, Tensor) and weight.dim() != 1:
        return -2  # refused once V is known, which the error then names
    check_weight(weight, weight.numel() if isinstance(weight, Tensor) else 0, name, device, of)
    return weight.numel()


def _check_classes(
    num_classes: int,
    *,
    weight: Tensor | None,
    name: str,
    target: Tensor,
    ignore_index: int,
    shift: bool = False,
) -> None:
    """The checks that need the global vocabulary size: the shape of the class weights and the
    range of the targets (of ``target[..., 1:]`` with ``shift``)."""
    check_weight(weight, num_classes, name)
    check_index_targets(target, num_classes, ignore_index, shift)


def _layout_key(x: object, dim: int, vocab_start: object) -> tuple[int, int | None] | None:
    """The layout cache key ``(x.shape[dim], vocab_start)``, taken before the inputs are checked;
    None (never cached: the rank all-gathers) when they give none."""
    if not isinstance(x, Tensor) or x.dim() == 0:
        return None
    if vocab_start is not None and not isinstance(vocab_start, int):
        return None
    return x.shape[dim], vocab_start


def _device_of(*inputs: object) -> torch.device:
    """Where the all-gather's tensor lives: on the first input that is a tensor, else the CPU."""
    return next((x.device for x in inputs if isinstance(x, Tensor)), torch.device("cpu"))


def _shard_layout(
    mine: _RankInputs | Exception,
    key: tuple[int, int | None] | None,
    group,
    device: torch.device,
    validate: bool,
    agreed: tuple[str, ...] = (),
) -> Layout:
    """``(vocab_start, local sizes of all ranks)``, from :data:`_LAYOUTS` or one all-gather.

    ``mine`` is this rank's checked inputs, or the exception its checks raised. A call whose
    ``key`` differs from the group's last one, and every call with ``validate``, make the
    all-gather of :func:`_gather_layout`, so that every rank raises if the inputs of any rank are
    wrong; a layout that passes is kept with its key. A call with the last key takes that layout
    without communicating, and raises this rank's errors on this rank only.
    """
    group_key = dist.group.WORLD if group is None else group
    last = _LAYOUTS.get(group_key)
    # The entry point's fields are in the key: the fused projection checks more than the
    # logits' path, so a layout the other path gathered does not skip its checks.
    cache_key = None if key is None else (key, agreed)
    if validate or cache_key is None or last is None or last[0] != cache_key:
        # The all-gather compares every rank's class-weight length and target range with V.
        layout = _gather_layout(mine, group, device, agreed)
        _LAYOUTS[group_key] = (cache_key, layout)
        return layout
    if isinstance(mine, Exception):
        raise mine
    layout = last[1]
    mine.check_classes(sum(layout[1]))
    return layout


def _gather_layout(
    mine: _RankInputs | Exception,
    group,
    device: torch.device,
    agreed: tuple[str, ...],
) -> Layout:
    """The all-gather and checks of :func:`_shard_layout`.

    Each rank sends ``_HEADER + len(agreed) + 3`` int64: whether its own checks failed (and the
    class of their exception), its dtype, row count ``len(y)``, slice size, ``vocab_start`` (-1 for
    None), the length of its class weights, its least and largest counted target, the values of
    ``agreed`` (names of ints that must be equal on every rank) and three checksums of its targets
    (Σy, Σy², Σ m_i·y with m_i a pseudo-random int64 of the position, :func:`_position_mix`;
    int64 wrap-around is the same on every rank). Every rank then reaches the
    same verdict: a rank whose inputs are wrong raises its own error and the others one that names
    it; a wrong layout, or dtypes, rows, targets or agreed values that differ between ranks, raise
    the same error on every rank.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if isinstance(mine, Exception):  # only the verdict: the other values are not compared
        kinds = enumerate(_ERRORS, 1)
        code = next((i for i, kind in kinds if isinstance(mine, kind)), len(_ERRORS))
        sent = torch.tensor([code] + [0] * (_HEADER + len(agreed) + 2), device=device)
    else:
        y = mine.y.to(device)  # (M,)
        counted = torch.where(y != mine.ignore_index, y, 0)  # (M,) ignored rows as class 0
        mix = _position_mix(y.numel(), device)
        start = -1 if mine.vocab_start is None else mine.vocab_start
        header = [0, _DTYPES.index(mine.dtype), y.numel(), mine.num_local, start]
        sent = torch.cat(
            [
                torch.tensor([*header, mine.weight_length], device=device),
                torch.stack(torch.cat([counted, counted.new_zeros(1)]).aminmax()),
                torch.tensor(mine.agreed, dtype=torch.int64, device=device),
                torch.stack([y.sum(), (y * y).sum(), (mix * y).sum()]),
            ]
        )  # int64
    everyone = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(everyone, sent, group=group)  # COLLECTIVE: verdicts, layout, target checksums
    table = [t.tolist() for t in everyone]
    if isinstance(mine, Exception):
        raise mine  # the other ranks learn of it from the all-gather
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise _ERRORS[table[failed[0]][0] - 1](
            f"{_who(failed)} of the group passed inputs that failed its checks (see the error "
            f"raised there){_TOO}"
        )
    columns = list(zip(*table, strict=True))
    dtypes, rows, sizes, starts, weights, least, largest = columns[1:_HEADER]
    values, checksums = columns[_HEADER : _HEADER + len(agreed)], columns[_HEADER + len(agreed) :]
    ranks = f"ranks 0..{world - 1}"
    if len(set(dtypes)) != 1:
        raise TypeError(
            f"{mine.dtype_of} must have the same dtype on every rank of the group; got "
            f"[{', '.join(str(_DTYPES[d]) for d in dtypes)}] on {ranks}."
        )
    if len(set(rows)) != 1:
        raise ValueError(
            f"every rank must pass the same rows (sequence parallelism is not supported); got "
            f"row counts {list(rows)} on {ranks}."
        )
    for name, column in zip(agreed, values, strict=True):
        if len(set(column)) != 1:
            raise ValueError(
                f"{name} must be the same on every rank of the group; got {list(column)} on "
                f"{ranks}."
            )
    if min(sizes) == 0:
        raise ValueError(
            f"every rank must hold at least one class; local vocabulary sizes are {list(sizes)} "
            f"on {ranks}."
        )
    vocab_start = _vocab_start(rank, starts, sizes, ranks)
    vocab_size = sum(sizes)
    # The checks that need V: each failing rank raises its own error, from check_classes.
    if len({n == -1 for n in weights}) != 1:
        raise ValueError(
            f"{mine.weight_name} must be given on every rank or on none (the same global "
            f"({vocab_size},) weights); got lengths {list(weights)} on {ranks} (-1 = None)."
        )
    for bad, kind, what in (
        (
            [r for r, n in enumerate(weights) if n not in (-1, vocab_size)],
            ValueError,
            f"a {mine.weight_name} that does not have shape ({vocab_size},)",
        ),
        (
            [r for r in range(world) if least[r] < 0 or largest[r] >= vocab_size],
            IndexError,
            f"a target with class indices outside [0, {vocab_size})",
        ),
    ):
        if bad:
            if rank in bad:
                mine.check_classes(vocab_size)  # raises this rank's own error
            raise kind(f"{_who(bad)} of the group passed {what} (see the error raised there){_TOO}")
    if any(len(set(c)) != 1 for c in checksums):
        raise ValueError(
            "target must be the same on every rank of the group (global class ids); the ranks "
            "passed different targets."
        )
    return vocab_start, list(sizes)


MIX_MULTIPLIERS = (-7046029254386353131, -4658895280553007687)  # 0x9E3779B97F4A7C15, 0xBF58...


def _position_mix(rows: int, device: torch.device) -> Tensor:
    """A pseudo-random int64 per position (rows,): ``m = (i·K1) ^ ((i·K1) >> 29)``, times K2
    (a multiply-xorshift mix; products wrap around in int64).

    The targets' third checksum is ``Σ m_i·y_i``: two target vectors pass as equal only if
    ``Σ m_i (y_i - y'_i)`` wraps to 0: for weights with no pattern, a chance of about 2^-64
    (2^-60 where every difference is a multiple of 16). With ``Σ i·y`` instead, ``[0, 0, 0, 2,
    1]`` and ``[0, 0, 1, 0, 2]`` matched on every checksum (and Σy, Σy², least, largest).
    """
    first, second = MIX_MULTIPLIERS
    mixed = torch.arange(1, rows + 1, device=device) * first
    return (mixed ^ (mixed >> 29)) * second


def _vocab_start(rank: int, starts: tuple[int, ...], sizes: tuple[int, ...], ranks: str) -> int:
    """This rank's first class: in rank order when no rank gave ``vocab_start`` (-1), else the
    one it gave; the given slices must tile ``[0, V)``."""
    if all(s == -1 for s in starts):
        return sum(sizes[:rank])
    if any(s == -1 for s in starts):
        raise ValueError(
            f"vocab_start must be given on every rank or on none; got {list(starts)} on {ranks} "
            f"(-1 = None)."
        )
    expected = 0
    for start, size in sorted(zip(starts, sizes, strict=True)):
        if start != expected:
            slices = [(s, s + n) for s, n in zip(starts, sizes, strict=True)]
            raise ValueError(
                f"the vocabulary slices [vocab_start, vocab_start + V_local) of {ranks} are "
                f"{slices} for shard sizes {list(sizes)}; they must tile [0, {sum(sizes)}) "
                f"without gap or overlap."
            )
        expected += size
    return starts[rank]


def _who(ranks: list[int]) -> str:
    """``rank 1`` or ``ranks [1, 2]``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def vocab_parallel_rows(
    z: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: CrossEntropyOptions,
    ce_scale: Tensor,
    z_scale: Tensor,
    grad: Tensor | None,
    *,
    vocab_start: int,
    group,
) -> Tensor:
    """The row kernel of :mod:`fastxent._autograd` over a slice of the vocabulary.

    Same contract as :func:`fastxent._torch.kernel.cross_entropy_rows` except that ``z`` and
    ``grad`` are ``(M, V_r)`` slices starting at global class ``vocab_start`` while ``target``,
    ``weight`` and ``opts.num_classes`` are global. Returns the global row losses (M,), the same
    on every rank of ``group``.
    """
    num_rows, num_local = z.shape
    acc = accumulation_dtype(z.dtype)
    w = None if weight is None else weight.to(device=z.device, dtype=acc)  # (V,)
    w_local = None if w is None else w[vocab_start : vocab_start + num_local]  # (V_r,)
    a, b = ce_scale.to(acc), z_scale.to(acc)
    eps, s = opts.label_smoothing, opts.z_loss
    smooth = eps / opts.num_classes
    step = rows_per_chunk(num_local)

    counted = target != opts.ignore_index
    counted_f = counted.to(acc)
    local_y = target - vocab_start
    owned = counted & (local_y >= 0) & (local_y < num_local)  # rows whose target is on this rank
    local_y = torch.where(owned, local_y, 0)

    # Pass 1: per-row statistics of the local slice, relative to the local max. When the gradient
    # buffer has the accumulation dtype, e = e^{z' - m_r} is kept in it for pass 2 (not with
    # softcap in place: pass 2 needs z for the chain factor).
    keep_e = grad is not None and grad.dtype == acc and not (opts.softcap and grad is z)
    m = torch.empty(num_rows, dtype=acc, device=z.device)  # m_r
    sums = torch.empty(num_rows, 3 if eps else 2, dtype=acc, device=z.device)  # S_r, z'_y, Σz'
    for start in range(0, num_rows, step):
        chunk = slice(start, start + step)
        zp, _ = transform(z[chunk].to(acc), opts)  # (n, V_r)
        m[chunk] = zp.amax(dim=1)
        m_safe = torch.where(torch.isfinite(m[chunk]), m[chunk], 0.0)  # ±inf: keep exp() finite
        zs = zp - m_safe.unsqueeze(1)  # (n, V_r), z' - m_r
        e = torch.exp(zs)  # (n, V_r)
        sums[chunk, 0] = e.sum(dim=1)
        z_y = zp.gather(1, local_y[chunk].unsqueeze(1)).squeeze(1)
        sums[chunk, 1] = torch.where(owned[chunk], z_y, 0.0)
        if eps:  # Σ w (z' - m_r): relative to the max, not to cancel at a large common offset
            sums[chunk, 2] = zs.sum(dim=1) if w_local is None else zs @ w_local
        if keep_e:  # after the last read of zp, which may alias grad
            grad[chunk].copy_(e)
    local_max = torch.where(torch.isfinite(m), m, 0.0)  # (M,)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # COLLECTIVE: global row max
    plus_inf = m == float("inf")  # a +inf logit: inf - inf in the softmax, NaN as in PyTorch
    m = torch.where(torch.isfinite(m), m, 0.0)  # (M,)
    # Rescale S_r to the global max; a slice whose sum is 0 (all -inf) stays 0, and a NaN logit's
    # NaN sum stays NaN (so its row's loss and gradient are NaN on every rank, as in PyTorch).
    sums[:, 0] = torch.where(sums[:, 0] == 0, 0.0, sums[:, 0] * torch.exp(local_max - m))
    # The target sums relative to the global max m: z'_y - m, and Σ w (z' - m) from Σ w (z' - m_r).
    sums[:, 1] = torch.where(owned, sums[:, 1] - m, 0.0)
    if eps:
        local_w = num_local if w_local is None else w_local.sum()
        sums[:, 2] += (local_max - m) * local_w
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # COLLECTIVE: S, z'_y, Σz' (- m)
    log_sum_e = torch.where(plus_inf, float("nan"), sums[:, 0].log())  # (M,), lse - m
    lse = m + log_sum_e  # (M,)

    # Row losses from the global sums, as in the single-device kernel.
    w_y = counted_f if w is None else torch.where(counted, w[torch.where(counted, target, 0)], 0.0)
    sum_t = (1.0 - eps) * w_y
    sum_tz = (1.0 - eps) * w_y * sums[:, 1]
    if eps:  # the uniform part (ε/V)·w, only on counted rows
        row_w = opts.num_classes if w is None else w.sum()
        sum_t = sum_t + counted_f * (smooth * row_w)
        sum_tz = sum_tz + torch.where(counted, smooth * sums[:, 2], 0.0)
    ce = torch.where(counted, log_sum_e * sum_t - sum_tz, 0.0)  # -Σ t (z' - lse); ignored: 0
    zl = torch.where(counted, s * lse.square(), 0.0)
    rows = a * ce + b * zl
    if grad is None:
        return rows

    # Pass 2: this rank's slice of ∂ℓ/∂z' = o (a Σt + 2 b s lse) - a t, o = e^{z' - lse}.
    coef = torch.where(counted, a * sum_t + 2.0 * s * b * lse, 0.0)  # (M,)
    one_hot = torch.where(owned, -(1.0 - eps) * a * w_y, 0.0)  # (M,)
    uniform = smooth * a * (1.0 if w_local is None else w_local)  # scalar or (V_r,)
    # o = e·e^{m_r - lse}. The factor is inf for a slice of -inf logits (e = 0) whose row is finite
    # on another rank: 0 there. A row of -inf logits on every rank (S = 0) gets NaN, the 0/0 of
    # the single-device kernel (ignored rows too: PyTorch's log-softmax backward gives them NaN).
    o_factor = torch.exp((local_max - m) - log_sum_e)
    o_factor = torch.where(o_factor == float("inf"), 0.0, o_factor)
    o_factor = torch.where(sums[:, 0] == 0, float("nan"), o_factor) * coef  # (M,)
    for start in range(0, num_rows, step):
        chunk = slice(start, start + step)
        if keep_e:
            g = grad[chunk].mul_(o_factor[chunk].unsqueeze(1))  # (n, V_r), in place
            dzp_dz = transform(z[chunk].to(acc), opts)[1] if opts.softcap else None
        else:
            zp, dzp_dz = transform(z[chunk].to(acc), opts)  # (n, V_r)
            zs = zp - m[chunk].unsqueeze(1)  # (n, V_r); then - log S: z' - lse would round
            g = zs.sub_(log_sum_e[chunk].unsqueeze(1)).exp_().mul_(coef[chunk].unsqueeze(1))
        g.scatter_add_(1, local_y[chunk].unsqueeze(1), one_hot[chunk].unsqueeze(1))
        if eps:
            g.sub_(counted_f[chunk].unsqueeze(1) * uniform)
        if dzp_dz is not None:
            g.mul_(dzp_dz)
        elif opts.logit_scale != 1.0:
            g.mul_(opts.logit_scale)
        if not keep_e:
            copy_into(grad[chunk], g)
    return rows
