"""Validation at the public boundary, and the frozen options that travel to every backend.

Every check here raises a real exception (never ``assert``) saying what was expected and what
came, so that bad input never reaches a kernel and never turns into a silent wrong number.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import forward_ad

REDUCTIONS = ("none", "mean", "sum")


@dataclass(frozen=True)
class CrossEntropyOptions:
    """Non-tensor options of one cross-entropy call (hashable, so backward returns ``None`` for it).

    ``soft`` is True for probability targets, False for class indices.
    """

    num_classes: int
    soft: bool
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    inplace_backward: bool = False

    @classmethod
    def of(
        cls,
        num_classes: int,
        soft: bool,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        softcap: float | None,
        logit_scale: float,
        inplace_backward: bool = False,
    ) -> CrossEntropyOptions:
        """The options of a call, its numbers as Python floats (whatever numeric type came)."""
        return cls(
            num_classes=num_classes,
            soft=soft,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=float(label_smoothing),
            z_loss=float(z_loss),
            softcap=None if softcap is None else float(softcap),
            logit_scale=float(logit_scale),
            inplace_backward=inplace_backward,
        )


def legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """PyTorch's deprecated ``size_average``/``reduce`` pair turned into ``reduction``, as PyTorch
    does it: None for either means True; reduce=False gives "none", else size_average picks
    "mean" or "sum". When both are None, ``reduction`` stands, but for its deprecated spelling
    "elementwise_mean", which is "mean" (with PyTorch's warning)."""
    if size_average is None and reduce is None:
        if reduction == "elementwise_mean":
            warnings.warn(
                "reduction='elementwise_mean' is deprecated (as in PyTorch); use reduction='mean'.",
                UserWarning,
                stacklevel=3,
            )
            return "mean"
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    legacy = ("mean" if size_average else "sum") if reduce else "none"
    warnings.warn(
        f"size_average and reduce are deprecated (as in PyTorch); use reduction={legacy!r}.",
        UserWarning,
        stacklevel=3,
    )
    return legacy


# Read as int64, uint64 indices from 2**63 on wrap to negative numbers: 2**64 - 100 would pass
# as ignore_index -100. PyTorch refuses every integer dtype but int64.
_WRAPPING_INDEX_DTYPES = tuple(d for d in (getattr(torch, "uint64", None),) if d is not None)


def holds_class_indices(target: Tensor) -> bool:
    """Whether ``target``'s dtype is an integer one that int64 holds (not floating, complex,
    bool or uint64)."""
    return not (
        target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
        or target.dtype in _WRAPPING_INDEX_DTYPES
    )


def check_ignore_index(ignore_index: int) -> int:
    """``ignore_index`` as a Python int; TypeError for anything that is not an integer,
    ValueError for one that int64 targets cannot hold."""
    if isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}.")
    try:
        index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"ignore_index must be an int (a class index, -100 by default), got "
            f"{type(ignore_index).__name__} {ignore_index!r}."
        ) from None
    if not -(2**63) <= index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 like the targets, got {index}.")
    return index


def check_soft_ignore_index(soft: bool, ignore_index: int) -> None:
    """Probability targets have no class to ignore: a class index (>= 0) is refused there, as
    PyTorch refuses it; a negative value, which names no class, has no effect (PyTorch's rule)."""
    if soft and ignore_index >= 0:
        raise ValueError(
            "ignore_index is only supported with class-index targets; probability targets have "
            f"no class to ignore (got ignore_index={ignore_index}; leave it at -100)."
        )


def check_inplace_logits(z: Tensor, **read_in_forward: Tensor | None) -> None:
    """``inplace_backward`` writes the gradient into ``z``'s storage: refused when that storage
    belongs to a leaf that requires grad (the leaf itself or a view of it: PyTorch refuses in-place
    ops there too), and when elements share memory (an expanded tensor). A view that is a leaf
    requiring grad itself (``x.detach()[:4].requires_grad_()``, whose base requires none) is
    refused as a leaf. So are tensors the kernel reads while it writes (``read_in_forward``:
    targets, class weights) that share ``z``'s storage: a chunk written before another chunk
    reads them would change what it reads (class weights taken from a row of the logits gave
    the compiled kernel a loss 20x off)."""
    for name, x in read_in_forward.items():
        if x is not None and shares_storage(x, z):
            raise ValueError(
                f"inplace_backward=True overwrites the logits while it reads {name}, which "
                f"shares their memory (a view of the logits); pass {name}.clone() or "
                "inplace_backward=False."
            )
    base = z._base if z._is_view() else z
    through_view = not z.is_leaf and base.is_leaf and base.requires_grad
    if z.requires_grad and (z.is_leaf or through_view):
        raise ValueError(
            "inplace_backward=True would overwrite a leaf tensor that requires grad (your "
            "parameters or data, or the detached input of a reentrant torch.utils.checkpoint"
            + (", through a view of it" if through_view else "")
            + "); use it on logits computed by the model (within the checkpointed function), "
            "or pass inplace_backward=False."
        )
    if may_overlap(tuple(z.shape), z.stride()):
        raise ValueError(
            "inplace_backward=True needs logits whose elements have memory of their own; these "
            f"share it (shape {tuple(z.shape)}, strides {z.stride()}: expanded, or overlapping "
            "windows as from unfold). Pass input.contiguous() or inplace_backward=False."
        )


def shares_storage(x: Tensor, y: Tensor) -> bool:
    """Whether ``x`` and ``y`` are views of one storage (neither empty: those hold no memory)."""
    if not (x.numel() and y.numel()) or x.device != y.device:
        return False
    return x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


def may_overlap(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether two elements of this strided layout may share memory. False when, taking the
    dimensions of size > 1 by increasing stride, each stride steps past all the memory the
    smaller ones span: then no two elements meet (any dense, transposed or sliced layout)."""
    span = 0  # the largest offset the dimensions taken so far reach
    for stride, size in sorted(zip(strides, shape, strict=True)):
        if size <= 1:
            continue
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def check_number(name: str, value: object, none_means: str | None = None) -> object:
    """``value``; TypeError naming option ``name`` unless it is a real number (a bool is not
    one), or None where ``none_means`` says what None stands for. A 0-dim real tensor that
    requires no grad is taken as its value, as PyTorch's loss takes one for label_smoothing
    (its bool tensors are refused here, as bools are): read with ``.item()``, a host sync for
    a CUDA tensor on every call, as in PyTorch. The option is not differentiated, so a tensor
    that requires grad is refused, with that reason."""
    if value is None and none_means is not None:
        return value
    if (
        isinstance(value, Tensor)
        and value.dim() == 0
        and not (value.is_complex() or value.dtype == torch.bool)
    ):
        if value.requires_grad:
            raise TypeError(
                f"{name} is not differentiated: pass a number, or a 0-dim tensor that does not "
                f"require grad ({name}.detach()), got {value!r}."
            )
        return value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        allowed = "a number" + (f" or None ({none_means})" if none_means else "")
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}.")
    return value


def check_flag(name: str, value: object) -> None:
    """TypeError naming option ``name`` unless ``value`` is True or False: a truthy string such
    as "False" must not switch on an option that decides what is computed or overwritten."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")


def check_count(name: str, value: object) -> int | None:
    """``value`` as a Python int >= 1, or None; TypeError/ValueError naming option ``name``.
    Integers of other types (NumPy's, a 0-dim integer tensor) are taken, a bool is not."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be None or an int >= 1, got {type(value).__name__} {value!r}."
        ) from None
    if count < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {count}.")
    return count


def is_finite(x: float) -> bool:
    """``math.isfinite(x)``; while dynamo traces, the same test in arithmetic (``x - x`` is NaN
    for ±inf and NaN), since math.isfinite does not trace on the symbolic floats of
    ``torch.compile(dynamic=True)`` (or of a float option whose value changed between calls):
    a graph break, and an error under ``fullgraph=True``. Dynamo assumes symbolic floats are
    finite, so there a non-finite option is not caught: the loss is then inf or NaN."""
    if torch.compiler.is_dynamo_compiling():
        return x - x == 0.0
    return math.isfinite(x)


def check_scalars(
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
) -> tuple[float, float, float | None, float]:
    """label_smoothing, z_loss, softcap and logit_scale, checked (0-dim tensors read as
    numbers, :func:`check_number`); raise TypeError or ValueError naming the bad one."""
    label_smoothing = check_number("label_smoothing", label_smoothing)
    z_loss = check_number("z_loss", z_loss)
    logit_scale = check_number("logit_scale", logit_scale)
    softcap = check_number("softcap", softcap, none_means="off")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    if not (is_finite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}.")
    if softcap is not None and not (is_finite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap must be None (off) or a finite number > 0, got {softcap}.")
    if not (is_finite(logit_scale) and logit_scale != 0.0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}.")
    return label_smoothing, z_loss, softcap, logit_scale


def check_logits(z: Tensor, name: str = "input") -> None:
    """The logits must be a floating-point tensor with at least one dimension."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}.")
    if not z.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of logits, got dtype {z.dtype}; "
            f"convert it with {name}.float()."
        )
    if z.dim() == 0:
        raise ValueError(
            f"{name} must have a class dimension: shape (C,), (N, C) or (N, C, d1, ...)."
        )


def check_device(name: str, x: Tensor, device: torch.device | None, of: str = "input") -> None:
    """ValueError unless ``x`` lies on ``device`` (that of the tensor named ``of``); None: any.
    PyTorch's own ops would raise deep inside, a kernel could read the wrong memory, and a
    silent copy each call would hide a forgotten ``.to(device)``."""
    if device is not None and x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but {of} is on {device}; move it there with "
            f"{name}.to({of}.device)."
        )


def check_weight(
    weight: Tensor | None,
    num_classes: int,
    name: str = "weight",
    device: torch.device | None = None,
    of: str = "input",
    soft: bool = False,
) -> None:
    """Class weights are a 1-D floating tensor of length C, on ``device`` (that of the tensor
    named ``of``) when given. Any floating dtype: they are used in the accumulation dtype
    (float32, float64 for float64 logits), where PyTorch asks for the logits' dtype. They may
    require grad only with probability targets (``soft``; see :func:`needs_pytorch_autograd`),
    as in PyTorch, whose class-index loss has no weight gradient either."""
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(weight).__name__}.")
    check_device(name, weight, device, of)
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise ValueError(
            f"{name} must have shape ({num_classes},), one weight per class, "
            f"got shape {tuple(weight.shape)}."
        )
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {weight.dtype}.")
    if weight.requires_grad and torch.is_grad_enabled() and not soft:
        raise ValueError(
            f"gradients with respect to the class weights are not computed for class-index "
            f"targets (as in PyTorch); pass {name}.detach()."
        )
    if not soft and carries_tangent(weight):  # PyTorch's loss drops it silently
        raise ValueError(
            f"forward-mode derivatives with respect to the class weights are not computed for "
            f"class-index targets (PyTorch's loss gives none); pass "
            f"torch.autograd.forward_ad.unpack_dual({name}).primal."
        )


_vf_unpack_dual = getattr(torch._VF, "_unpack_dual", None)  # forward_ad.unpack_dual's C op


def carries_tangent(x: object) -> bool:
    """Whether ``x`` is a dual tensor of forward-mode AD (``torch.autograd.forward_ad``) at
    the current level. Outside every dual level no tensor is: one read of a global then. The
    C op rather than ``forward_ad.unpack_dual``, which costs ~4.5 µs a tensor (a namedtuple and
    an export-mode lookup) in every call made inside a dual level."""
    level = getattr(forward_ad, "_current_level", 0)
    if level < 0 or not isinstance(x, Tensor) or not x.is_floating_point():
        return False
    if _vf_unpack_dual is None:
        return forward_ad.unpack_dual(x, level=level).tangent is not None
    return _vf_unpack_dual(x, level)[1] is not None


def needs_pytorch_autograd(soft: bool, target: Tensor, weight: Tensor | None) -> bool:
    """Whether a gradient is asked for that only PyTorch's ops give: of probability targets,
    or of class weights with them (grad mode on and one of them requiring grad). The kernels
    compute the logits' gradient alone; with probability targets y and weights w, PyTorch's
    loss also differentiates −Σ_c w_c y'_c log o_c in y (through y' = (1−ε)y + ε/C) and w."""
    if not (soft and torch.is_grad_enabled()):
        return False
    return target.requires_grad or (weight is not None and weight.requires_grad)


def values_readable(*tensors: Tensor | None) -> bool:
    """Whether Python may read the tensors' values and branch on them: not on the meta device,
    not the fake tensors that torch.export traces with (their values are symbols: a read
    raises), and not while torch.jit.trace or make_fx records (a branch would be frozen into
    the trace for every later input; make_fx refuses the read). Such calls are computed from
    PyTorch's ops (``_torch.composed``), which serve meta and traced tensors as PyTorch's own
    loss does, and their targets are not checked here. While dynamo traces, only the meta test
    applies (dynamo's tensors are fake, and it traces through fastxent as through any code)."""
    compiling = torch.compiler.is_dynamo_compiling()  # dynamo cannot trace _proxy_tracing
    if torch.jit.is_tracing() or is_exporting() or (not compiling and _proxy_tracing()):
        return False
    for x in tensors:
        if x is None:
            continue
        if x.is_meta:
            return False
        # A plain Tensor is never fake: only subclasses (FakeTensor, FunctionalTensor,
        # Parameter) are asked, which keeps the test to a type check on ordinary calls.
        if not compiling and type(x) is not Tensor and _is_fake(x):
            return False
    return True


_get_dispatch_mode = getattr(torch._C, "_get_dispatch_mode", None)
_PROXY_MODE = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "PROXY", None)


def _proxy_tracing() -> bool:
    """Whether make_fx (or another FX proxy trace) records the ops now: in its "real" mode the
    tensors are real, but a read of their values raises. Private API; False where it is gone."""
    if _get_dispatch_mode is None or _PROXY_MODE is None:
        return False
    return _get_dispatch_mode(_PROXY_MODE) is not None


def is_exporting() -> bool:
    """Whether torch.export traces now (strict export traces with dynamo, where a size test
    on the symbolic batch would fix it); False before PyTorch has the test (2.7).

    The flag behind ``torch.compiler.is_exporting()`` is read, not the function: the dynamo of
    2.7-2.11 replaces that call by a constant True wherever it traces, torch.compile included
    (pytorch/pytorch#176347; 2.12's reads the flag), which sent every compiled call to
    PyTorch's ops: the whole N×V logits of ``linear_cross_entropy``, no kernel, no
    ``inplace_backward``. (2.7's strict export runs dynamo before it sets the flag, so there
    only ``strict=False`` exports a dynamic batch.)"""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    asks_torch = getattr(torch.compiler, "is_exporting", None)
    return asks_torch is not None and asks_torch()


def _is_fake(x: Tensor) -> bool:
    """Whether ``x`` is a FakeTensor (or wraps one): PyTorch's tracing tensor, private API."""
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - present from PyTorch 2.0 on
        return False
    return is_fake(x)


def check_index_targets(
    target: Tensor, num_classes: int, ignore_index: int, shift: bool = False
) -> None:
    """Every class index is in [0, C) or is ignore_index, else IndexError naming the first bad one.

    With ``shift`` the targets checked are ``target[..., 1:]`` (the causal-LM shift), and the
    position named is the one in ``target``. This reads the targets on the host: one cheap
    reduction (a device sync on CUDA).
    """
    if shift:
        target = target[..., 1:]
    if target.numel() == 0 or not values_readable(target):
        return
    bad = targets_out_of_range(target, num_classes, ignore_index)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0]) if target.dim() else ()
        value = int(target[where]) if where else int(target)
        if shift:
            where = (*where[:-1], where[-1] + 1)
        raise IndexError(
            f"target{list(where) if where else ''} = {value} is out of range: the input has "
            f"{num_classes} classes, so targets must be in [0, {num_classes - 1}] or equal "
            f"ignore_index ({ignore_index})."
        )


def targets_out_of_range(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Where a class index is outside [0, C) and is not ignore_index (bool, target's shape).

    Compared in int64, as the kernels read the targets: in a narrower dtype an ignore_index
    beyond its range wraps (-100 is 156 in uint8), and a bad target could pass as ignored."""
    target = target.long()
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def start_index_target_check(
    target: Tensor, num_classes: int, ignore_index: int, defer: bool
) -> Callable[[], None]:
    """:func:`check_index_targets`, split so that a CUDA check does not stall the stream.

    With ``defer`` on CUDA the range test is queued on the device and its one-byte verdict copied
    to pinned host memory; the returned ``finish()`` waits for that copy alone (not for work
    queued after it) and raises the same IndexError as the immediate check. Launch the loss
    between the two calls: its kernel must read targets out of range safely (the Triton kernel
    clamps them). Otherwise the check runs now and ``finish`` does nothing.
    """
    if not defer or target.device.type != "cuda" or target.numel() == 0:
        check_index_targets(target, num_classes, ignore_index)
        return _nothing
    verdict = torch.empty((), dtype=torch.bool, pin_memory=True)
    verdict.copy_(targets_out_of_range(target, num_classes, ignore_index).any(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def finish() -> None:
        copied.synchronize()
        if bool(verdict):
            check_index_targets(target, num_classes, ignore_index)

    return finish


def _nothing() -> None:
    return None


ONE_HOT_HINT = "; for one-hot or probability targets pass them as floats, target.float()"


def check_target_kind(
    target: Tensor,
    index_shape: tuple[int, ...],
    soft_shape: tuple[int, ...],
    context: Callable[[], str],
    device: torch.device | None = None,
    of: str = "input",
    shape_hint: Callable[[], str] | None = None,
) -> bool:
    """Class indices of ``index_shape`` or probabilities of ``soft_shape``, on ``device`` (that of
    the tensor named ``of``) when given; True for probabilities.

    ``context()`` says where the expected shapes come from, for the error messages: built only
    for one (under torch.jit.trace formatting a shape warns that the trace may be wrong).
    ``shape_hint()``, when given, says what class-index targets of the wrong shape suggest, in
    place of the one-hot hint.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    check_device("target", target, device, of)
    if target.is_floating_point():
        if tuple(target.shape) != soft_shape:
            raise ValueError(
                f"probability targets must have shape {soft_shape} ({context()}), got "
                f"{tuple(target.shape)}; for class indices pass an integer (int64) tensor of "
                f"shape {index_shape}."
            )
        return True
    if not holds_class_indices(target):
        wraps = (
            " (int64 cannot hold all of uint64: indices from 2**63 on would wrap to negative "
            "numbers; convert valid class indices with target.long())"
            if (target.dtype in _WRAPPING_INDEX_DTYPES)
            else ""
        )
        raise TypeError(
            f"target must hold class indices (int64) or probabilities (float), got "
            f"{target.dtype}{wraps}."
        )
    if tuple(target.shape) != index_shape:
        if shape_hint is not None:
            hint = shape_hint()
        elif tuple(target.shape) == tuple(soft_shape):
            hint = ONE_HOT_HINT
        else:
            hint = ""
        raise ValueError(
            f"class-index targets must have shape {index_shape} ({context()}), got "
            f"{tuple(target.shape)}{hint}."
        )
    return False


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a release string such as "2.13.0+cpu", "3.6.0" or "3.6.0+git1234"."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def quiet_under_jit_trace(check: Callable) -> Callable:
    """``check`` (a shape check) without torch.jit.trace's TracerWarnings: under a trace the
    sizes are traced tensors, and each comparison warned that the trace keeps its result as a
    constant. It does, as intended: a trace is made for one shape of input."""

    @functools.wraps(check)
    def quiet(*args, **kwargs):
        if not torch.jit.is_tracing():
            return check(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return check(*args, **kwargs)

    return quiet


@quiet_under_jit_trace
def check_targets(z: Tensor, target: Tensor, class_dim: int) -> bool:
    """The targets of logits ``z``: indices of z's shape without ``class_dim``, or z's shape.
    ``z`` must have at least one class, unless it has no rows ((0, 0) is an empty batch)."""
    if z.shape[class_dim] == 0 and math.prod(z.shape[:class_dim] + z.shape[class_dim + 1 :]):
        raise ValueError(
            f"input of shape {tuple(z.shape)} has no classes (dim {class_dim} is empty): a "
            "softmax needs at least one."
        )
    index_shape = tuple(z.shape[:class_dim] + z.shape[class_dim + 1 :])
    return check_target_kind(
        target,
        index_shape,
        tuple(z.shape),
        lambda: f"input of shape {tuple(z.shape)}, classes on dim {class_dim}",
        z.device,
        shape_hint=lambda: _where_the_classes_were_meant(z, target),
    )


def _where_the_classes_were_meant(z: Tensor, target: Tensor) -> str:
    """What class-index targets of the wrong shape suggest: (B, T) targets of (B, T, V) logits
    (a language model's, classes last); (N,) targets of (N,) logits (one row, or a binary
    classifier's single logit per sample); else int one-hot targets."""
    shape, c = tuple(target.shape), z.shape[-1]
    if z.dim() == 1 and shape == tuple(z.shape):
        return (
            f"; input of shape ({c},) is one row of {c} classes: for N rows pass (N, C) logits, "
            "for one logit per sample (binary) use F.binary_cross_entropy_with_logits, and for "
            "a one-hot row pass target.float()"
        )
    if z.dim() >= 3 and shape == tuple(z.shape[:-1]):
        return (
            f"; with the classes last, as in (B, T, V) logits, pass input.reshape(-1, {c}) and "
            "target.reshape(-1), or input.movedim(-1, 1)"
        )
    return ONE_HOT_HINT if shape == tuple(z.shape) else ""
