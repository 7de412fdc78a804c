"""nn.Module wrappers: hold the options, call :mod:`fastxent.functional`."""

from __future__ import annotations

from torch import Tensor, nn

from fastxent import functional
from fastxent._options import check_flag, check_ignore_index, check_scalars, legacy_reduction


def _refuse_scripting(module: nn.Module) -> nn.Module:
    """``torch.jit.script`` calls this on each module first: the losses' forward is Python
    (keyword-only options, kernels chosen at run time), which TorchScript cannot compile."""
    raise RuntimeError(
        f"fastxent.{type(module).__name__} cannot be compiled by torch.jit.script. Use "
        "torch.compile or torch.jit.trace (both supported), or script the model without the "
        "loss and apply the loss to its output."
    )


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Module form of :func:`fastxent.cross_entropy` (a drop-in for ``nn.CrossEntropyLoss``).

    A subclass of ``nn.CrossEntropyLoss``, so code that asks ``isinstance(loss_fn,
    nn.CrossEntropyLoss)`` takes it for one; it keeps PyTorch's attributes (``weight`` a buffer
    that follows ``.to(device)``, ``ignore_index``, ``reduction``, ``label_smoothing``) and
    adds its own options. The arguments are :func:`fastxent.cross_entropy`'s, in
    ``nn.CrossEntropyLoss``'s order (its deprecated ``size_average`` and ``reduce`` included).

    Example:
        >>> import torch, fastxent
        >>> loss_fn = fastxent.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss = loss_fn(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))
    """

    def __init__(
        self,
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
    ) -> None:
        nn.Module.__init__(self)  # PyTorch's __init__ would set the attributes unchecked
        reduction = legacy_reduction(size_average, reduce, reduction)
        label_smoothing, z_loss, softcap, logit_scale = check_scalars(
            reduction, label_smoothing, z_loss, softcap, logit_scale
        )
        check_flag("inplace_backward", inplace_backward)
        functional.check_backend_name(backend)
        self.register_buffer("weight", weight)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    __prepare_scriptable__ = _refuse_scripting

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, logit_scale={self.logit_scale}"
            + (", inplace_backward=True" if self.inplace_backward else "")
            + (f", backend={self.backend!r}" if self.backend != "auto" else "")
        )


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fastxent.linear_cross_entropy`: holds the options.

    ``forward(hidden, weight, target, bias=None)`` takes the classifier's weight (and bias) as
    arguments, so the module can sit after a tied embedding or an ``nn.Linear`` it does not own.
    ``class_weight`` is registered as a buffer. (``weight=`` is refused here: it is forward's
    projection, where PyTorch's ``nn.LinearCrossEntropyLoss`` means class weights by it.)

    Example:
        >>> import torch, fastxent
        >>> loss_fn = fastxent.LinearCrossEntropyLoss(shift=True, z_loss=1e-4)
        >>> head = torch.nn.Linear(8, 50, bias=False)
        >>> h, ids = torch.randn(2, 5, 8), torch.randint(0, 50, (2, 5))
        >>> loss = loss_fn(h, head.weight, ids)
    """

    def __init__(
        self,
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
        weight: None = None,
    ) -> None:
        super().__init__()
        from fastxent._linear import check_chunking

        if weight is not None:  # PyTorch's nn.LinearCrossEntropyLoss(weight=) is class weights
            raise TypeError(
                "LinearCrossEntropyLoss takes the projection weight in forward(hidden, weight, "
                "target); class weights go in class_weight=."
            )
        label_smoothing, z_loss, softcap, logit_scale = check_scalars(
            reduction, label_smoothing, z_loss, softcap, logit_scale
        )
        check_flag("shift", shift)
        chunk_size, vocab_block = check_chunking(chunk_size, filter_eps, vocab_block)
        functional.check_backend_name(backend)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.shift = shift
        self.chunk_size = chunk_size
        self.filter_eps = filter_eps
        self.vocab_block = vocab_block
        self.backend = backend

    def forward(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        return functional.linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            class_weight=self.class_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            shift=self.shift,
            chunk_size=self.chunk_size,
            filter_eps=self.filter_eps,
            vocab_block=self.vocab_block,
            backend=self.backend,
        )

    __prepare_scriptable__ = _refuse_scripting

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, logit_scale={self.logit_scale}, shift={self.shift}, "
            f"chunk_size={self.chunk_size}, filter_eps={self.filter_eps}, "
            f"vocab_block={self.vocab_block}, backend={self.backend!r}"
        )
