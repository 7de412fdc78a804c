r"""Small calls: the loss built from PyTorch's fused ops and differentiated by autograd.

For a few thousand logits a call costs what its ops cost to launch (microseconds each), not
what they compute. The row kernel runs about 25 small ops and an autograd.Function; PyTorch's
fused ``log_softmax`` and ``nll_loss`` are two ops forward and two backward. So ``"auto"`` builds
small losses from them, with fastxent's semantics kept:

.. math::

    z' = T(z), \qquad
    \ell = \mathrm{CE}_{\Sigma}(z', y) + s \textstyle\sum_{r\ \mathrm{counted}} \mathrm{lse}_r^2

where ``T`` is the softcap/logit scale (as in the row kernel), computed in float32 for bf16/fp16
(float64 for float64), ``CE_Σ`` is ``F.cross_entropy`` with ``reduction="sum"`` (or ``"none"``),
and "mean" multiplies by the same safe factors ``1/W`` and ``1/n`` as the row kernel
(:func:`fastxent._autograd.reduction_scales`: 0 when nothing is counted, so a batch whose targets
are all ignored gives loss 0 and gradient 0, not NaN). Where PyTorch's own "mean" is exactly that
(on CPU, class indices without class weights or z-loss, some target counted) it is asked for
directly instead. Autograd's gradient of the log-softmax,
``g - o Σg``, is the general ``o Σt - t``: targets need not sum to one.

Unlike the row kernel this keeps the log-softmax, (M, V), for backward, and the linear form
materialises the logits: both are used only for calls of at most ``AUTO_COMPOSED_MAX_LOGITS``
logits (:mod:`fastxent.functional`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_batchedtensor

from fastxent._autograd import (
    accumulation_dtype,
    reduction_scales,
    under_torch_func,
    wrapper_subclass,
)
from fastxent._options import (
    CrossEntropyOptions,
    is_exporting,
    major_minor,
    targets_out_of_range,
    values_readable,
)

# PyTorch's loss as it was at import: users replace torch.nn.functional.cross_entropy with
# fastxent's (a drop-in), and calls through the module attribute then came back here forever.
pytorch_cross_entropy = F.cross_entropy


def cross_entropy(
    z: Tensor, target: Tensor, weight: Tensor | None, opts: CrossEntropyOptions
) -> Tensor:
    """Loss of (M, V) logits ``z`` and (M,) class indices or (M, V) probabilities ``target``:
    per row (M,) for "none", else a scalar; float32 (float64 for float64 logits)."""
    acc = accumulation_dtype(z.dtype)
    zp = z.to(acc)  # float32 accumulation for bf16/fp16: the loss and its gradient's softmax
    if opts.softcap is not None:
        zp = torch.tanh(zp * (opts.logit_scale / opts.softcap)) * opts.softcap
    elif opts.logit_scale != 1.0:
        zp = zp * opts.logit_scale
    if opts.soft:
        target = target.to(acc)
    elif checks_targets_in_graph(z, target):
        target = asserted_in_range(target, opts)
    w = None if weight is None else weight.to(device=z.device, dtype=acc)
    per_row = opts.reduction == "none"
    torch_mean = _torch_mean_form(z, target, weight, opts)
    loss = pytorch_cross_entropy(
        zp,
        target,
        w,
        ignore_index=opts.ignore_index,
        reduction="none" if per_row else "mean" if torch_mean else "sum",
        label_smoothing=opts.label_smoothing,
    )  # (M,) or ()
    if torch_mean == MEAN_IF_COUNTED:  # 0, not PyTorch's NaN, when every target is ignored
        loss = torch.where((target != opts.ignore_index).any(), loss, 0.0)
    z_loss = None
    if opts.z_loss:
        z_loss = torch.logsumexp(zp, dim=1).square() * opts.z_loss  # (M,)
        if not opts.soft:
            z_loss = torch.where(target != opts.ignore_index, z_loss, 0.0)
        if not per_row:
            z_loss = z_loss.sum()
    if opts.reduction == "mean" and not torch_mean:
        ce_scale, z_scale = reduction_scales(z, target, weight, opts)
        loss = loss * ce_scale
        z_loss = None if z_loss is None else z_loss * z_scale
    return loss if z_loss is None else loss + z_loss


MEAN_IF_COUNTED = "mean where some target is counted"

# From torch 2.9 inductor compiles torch._assert_async into a check that raises (C++) or a
# device assert (Triton); 2.4-2.8 drop the op (measured), so a graph relying on it ran unchecked.
GRAPH_KEEPS_ASSERTS = major_minor(torch.__version__) >= (2, 9)
TRACED_RANGE_MESSAGE = (
    "fastxent: a class-index target is out of range (not in [0, C) and not ignore_index). "
    "A torch.compile graph cannot name it: call the loss without torch.compile to see which"
)  # inside generated C++ and Triton string literals: no quotes, no backslashes


def checks_targets_in_graph(z: Tensor, target: Tensor) -> bool:
    """Whether the class indices ``target`` of logits ``z`` are checked inside the graph that
    torch.compile traces now (:func:`asserted_in_range`): on CPU, while dynamo traces (not for
    torch.export), where inductor keeps the check; not for DTensor (:func:`wrapper_subclass`),
    which has no sharding rule for the assert, nor under vmap (jacrev, ...), which has no
    batching rule for it (dynamo traces ``is_batchedtensor``). On CUDA the check would be a
    device-side assert, which leaves the device unusable: there fastxent reads the targets on
    the host (a graph break) and raises its IndexError, as in eager (:mod:`fastxent.functional`).
    """
    if z.device.type != "cpu" or not GRAPH_KEEPS_ASSERTS:
        return False
    if not torch.compiler.is_dynamo_compiling() or is_exporting():
        return False
    if wrapper_subclass(z) or wrapper_subclass(target):
        return False
    return not (is_batchedtensor(z) or is_batchedtensor(target))


def asserted_in_range(target: Tensor, opts: CrossEntropyOptions) -> Tensor:
    """Class indices ``target`` (M,) with a check traced before the loss: one outside [0, C)
    that is not ignore_index raises :data:`TRACED_RANGE_MESSAGE` (a RuntimeError on CPU) when
    the graph runs, instead of inductor's bounds check of the gather ("index out of bounds:
    0 <= tmp11 < 16L"). A graph cannot name the position, as the eager IndexError does. The
    loss reads such targets as ignore_index, so that the bounds check, which inductor may
    order first, never fires."""
    bad = targets_out_of_range(target, opts.num_classes, opts.ignore_index)
    torch._assert_async(~bad.any(), TRACED_RANGE_MESSAGE)
    return torch.where(bad, opts.ignore_index, target)


def _torch_mean_form(
    z: Tensor, target: Tensor, weight: Tensor | None, opts: CrossEntropyOptions
) -> str | bool:
    """Whether PyTorch's own "mean" is fastxent's here, so it can be asked for directly: class
    indices without class weights or z-loss (PyTorch divides by the counted targets, as
    fastxent does), some target counted (none: PyTorch's 0/0 is NaN, fastxent's loss 0).

    True when that count is read on the host: on CPU only (a read is no sync there), not under
    torch.func (vmap cannot), not on fake tensors (torch.export's). While torch.compile traces
    (where a read is a graph break) :data:`MEAN_IF_COUNTED`: the caller picks 0 on the device
    where no target is counted. inductor's code for the other form, a "sum" times 1/n, lost a
    digit of the gradient with label smoothing (3e-6 of its largest entry, against 4e-7 for
    "mean", as PyTorch's own compiled loss has). False otherwise, and for DTensor
    (:func:`wrapper_subclass`): its rows may be sharded, and its mean of each rank's mean is
    not the mean of all rows when ranks count different numbers of targets (the sum, scaled by
    the global count, is)."""
    if opts.reduction != "mean" or opts.soft or weight is not None or opts.z_loss:
        return False
    if wrapper_subclass(z) or wrapper_subclass(target) or not values_readable(target):
        return False
    if torch.compiler.is_dynamo_compiling():
        return MEAN_IF_COUNTED
    if z.device.type != "cpu" or under_torch_func(z, target):
        return False
    return bool((target != opts.ignore_index).any())


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    opts: CrossEntropyOptions,
    shift: bool,
) -> Tensor:
    """:func:`cross_entropy` of ``z = h Wᵀ + b`` over all tokens at once, for small calls: the
    logits are materialised (at most ``AUTO_COMPOSED_MAX_LOGITS``) and autograd gives ∂h, ∂W,
    ∂b. ``hidden`` (N, D) or (B, T, D); with ``shift`` position t predicts target t+1."""
    if shift:
        hidden = hidden[..., :-1, :]
        target = target[..., 1:, :] if opts.soft else target[..., 1:]
    weight = weight.to(hidden.dtype)  # under autocast: float32 master weights, autograd casts back
    bias = None if bias is None else bias.to(hidden.dtype)
    z = F.linear(hidden, weight, bias)  # (..., V)
    rows = z.reshape(-1, opts.num_classes)  # (M, V)
    t = target.reshape(-1, opts.num_classes) if opts.soft else target.reshape(-1).long()
    loss = cross_entropy(rows, t, class_weight, opts)
    return loss.reshape(z.shape[:-1]) if opts.reduction == "none" else loss
