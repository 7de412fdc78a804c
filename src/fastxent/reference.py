r"""The float64 oracle: softmax cross-entropy and its gradient, written to be read against the math.

Every other path in fastxent is tested against this module. It uses NumPy only (no torch) and
materialises everything, so it is slow and exact.

Notation (one row; ``p`` classes):

.. math::

    z'_j &= c \tanh(\alpha z_j / c) \quad\text{(softcap } c\text{; just } \alpha z_j
            \text{ without it)}\\
    \mathrm{lse} &= \log \textstyle\sum_k e^{z'_k}, \qquad o_j = e^{z'_j - \mathrm{lse}}\\
    E &= -\textstyle\sum_j t_j \log o_j + s\,\mathrm{lse}^2

where ``t`` are the *effective targets*: class weights ``w`` and label smoothing ``ε`` folded into
the targets ``y*``. For a class-index target ``y``: ``t_j = w_j((1-ε)[j=y] + ε/p)`` with ``w_j``
replaced by ``w_y`` in the one-hot part, i.e. ``t = (1-ε) w_y e_y + (ε/p) w``. For probability
targets: ``t_j = w_j((1-ε) y*_j + ε/p)``. This is exactly PyTorch's formula in both cases.

Because ``∂o_j/∂z'_i = o_j([i=j] - o_i)``, the gradient is, in its general form,

.. math::

    \frac{\partial E}{\partial z'_i} = o_i \textstyle\sum_j t_j - t_i + 2 s\,\mathrm{lse}\, o_i

which is ``o - y`` only when the targets sum to one. The chain rule through the softcap gives
``∂z'/∂z = α (1 - (z'/c)^2)``.

Reductions follow PyTorch: ``"mean"`` divides the summed loss by the total weight of the
non-ignored targets (index targets) or by the number of rows (probability targets). The z-loss
term is averaged over the non-ignored rows, unaffected by class weights. A batch whose every
target is ignored (total weight zero) gives loss 0 and a zero gradient where PyTorch gives NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cross_entropy", "linear_cross_entropy", "log_softmax", "softmax"]


def softmax(z: np.ndarray) -> np.ndarray:
    """o_j = e^{z_j} / Σ_k e^{z_k} over the last axis, max-shifted so e^{...} cannot overflow."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log o_j = z_j - lse(z) over the last axis."""
    return z - logsumexp(z)[..., None]


def logsumexp(z: np.ndarray) -> np.ndarray:
    """lse(z) = m + log Σ_k e^{z_k - m}, m = max_k z_k (finite for finite z)."""
    m = z.max(axis=-1)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(z - m[..., None]).sum(axis=-1))


def cross_entropy(
    z: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    grad_output: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and ∂loss/∂z in float64, with PyTorch's shapes: z is (C,), (N, C) or (N, C, d1, ...).

    ``target`` holds class indices (an integer array of z's shape without the class axis) or
    probabilities (z's shape). ``grad_output`` is the upstream gradient: a scalar for "mean" and
    "sum", an array of the loss's shape for "none" (default ones). Returns ``(loss, grad)``.
    """
    z = np.asarray(z, dtype=np.float64)
    target = np.asarray(target)
    p = z.shape[0] if z.ndim == 1 else z.shape[1]
    soft = np.issubdtype(target.dtype, np.floating)

    # Move the class axis last and flatten the rest: rows of p logits.
    zr = np.moveaxis(z[None] if z.ndim == 1 else z, 1, -1).reshape(-1, p)  # (M, p)
    w = np.ones(p) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = float(label_smoothing)

    if soft:
        y = np.moveaxis(target[None] if z.ndim == 1 else target, 1, -1).reshape(-1, p)
        t = w * ((1.0 - eps) * y.astype(np.float64) + eps / p)  # (M, p)
        counted = np.ones(len(zr), dtype=bool)
        total_weight = float(len(zr))
    else:
        y = target.reshape(-1)
        counted = y != ignore_index
        y_safe = np.where(counted, y, 0)
        onehot = np.zeros_like(zr)
        onehot[np.arange(len(zr)), y_safe] = 1.0
        t = (1.0 - eps) * w[y_safe][:, None] * onehot + (eps / p) * w  # (M, p)
        t[~counted] = 0.0
        total_weight = float(w[y_safe][counted].sum())

    # The logit transform z' = c·tanh(αz/c) and its derivative dz'/dz = α(1 - (z'/c)²).
    if softcap is None:
        zp, dzp_dz = logit_scale * zr, np.full_like(zr, logit_scale)
    else:
        zp = softcap * np.tanh(logit_scale * zr / softcap)
        dzp_dz = logit_scale * (1.0 - (zp / softcap) ** 2)

    lse = logsumexp(zp)  # (M,)
    o = softmax(zp)  # (M, p)
    with np.errstate(invalid="ignore"):  # 0·(-inf) terms are NaN in PyTorch too...
        terms = t * (zp - lse[:, None])  # t_j log o_j
    if not soft and eps == 0.0:  # ...but for class indices PyTorch gathers log o_y alone
        terms = np.where(onehot == 1.0, terms, 0.0)  # (a -inf non-target logit adds nothing)
    ce_rows = -terms.sum(axis=1)  # E = -Σ t_j log o_j
    ce_rows = np.where(counted, ce_rows, 0.0)  # an ignored row adds 0, even with inf/NaN logits
    z_rows = np.where(counted, z_loss * lse**2, 0.0)  # s·lse² on the counted rows only
    dce = o * t.sum(axis=1, keepdims=True) - t  # ∂E/∂z'_i = o_i Σ_j t_j - t_i
    dz = np.where(counted[:, None], 2.0 * z_loss * lse[:, None] * o, 0.0)

    # Reduction: per-row factors on the CE part and on the z-loss part.
    n_counted = int(counted.sum())
    if reduction in ("none", "sum"):
        ce_scale = z_scale = 1.0
    elif reduction == "mean":
        ce_scale = 1.0 / total_weight if total_weight != 0 else 0.0
        z_scale = 1.0 / n_counted if n_counted else 0.0
    else:
        raise ValueError(f"unknown reduction {reduction!r}")

    rows = ce_scale * ce_rows + z_scale * z_rows  # (M,)
    grad_rows = (ce_scale * dce + z_scale * dz) * dzp_dz  # (M, p)

    if reduction == "none":
        g = np.ones(len(zr)) if grad_output is None else np.asarray(grad_output, float).reshape(-1)
        loss = rows.reshape(z.shape[:1] + z.shape[2:] if z.ndim > 1 else ())
        grad_rows = grad_rows * g[:, None]
    else:
        g = 1.0 if grad_output is None else float(np.asarray(grad_output))
        loss = np.asarray(rows.sum())
        grad_rows = grad_rows * g

    # Back to the caller's layout: class axis 1 (or 0 for a single unbatched row).
    if z.ndim == 1:
        grad = grad_rows[0]
    else:
        spatial = (z.shape[0], *z.shape[2:], p)
        grad = np.moveaxis(grad_rows.reshape(spatial), -1, 1)
    return loss, grad


def linear_cross_entropy(
    hidden: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    target: np.ndarray,
    *,
    shift: bool = False,
    class_weight: np.ndarray | None = None,
    grad_output: np.ndarray | float | None = None,
    **options,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r""":func:`cross_entropy` of the logits ``z = h Wᵀ + b``, with ``(loss, ∂h, ∂W, ∂b)``.

    ``hidden`` is (N, D) or (B, T, D), ``weight`` (V, D); ``target`` the tokens' shape of class
    indices, or their shape by V of probabilities. ``shift`` pairs hidden position t with
    target t+1 within each sequence (the last position gets no loss and a zero ∂h). The logits
    are materialised; with ``g = ∂ℓ/∂z`` (from :func:`cross_entropy`, over all loss rows):

    .. math::

        \frac{\partial \ell}{\partial h} = g W, \qquad
        \frac{\partial \ell}{\partial W} = g^\top h, \qquad
        \frac{\partial \ell}{\partial b} = \textstyle\sum_r g_r

    ``options`` are :func:`cross_entropy`'s keywords (reduction, label_smoothing, ...);
    ``grad_output`` has the loss's shape for "none".
    """
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    target = np.asarray(target)
    soft = np.issubdtype(target.dtype, np.floating)
    num_classes, dim = w.shape
    used = h[..., :-1, :] if shift else h  # the hidden positions that have a loss
    y = target[..., 1:, :] if shift and soft else target[..., 1:] if shift else target
    used_rows = used.reshape(int(np.prod(used.shape[:-1])), dim)  # (M, D); not -1: D may be 0
    z = used_rows @ w.T + (0.0 if bias is None else np.asarray(bias, np.float64))
    y = y.reshape(-1, num_classes) if soft else y.reshape(-1)
    if grad_output is not None and options.get("reduction") == "none":
        grad_output = np.asarray(grad_output, dtype=np.float64).reshape(-1)
    loss, g = cross_entropy(z, y, class_weight, grad_output=grad_output, **options)  # g: (M, V)
    if options.get("reduction") == "none":
        loss = loss.reshape(used.shape[:-1])
    d_hidden = np.zeros_like(h)
    d_used = d_hidden[..., :-1, :] if shift else d_hidden
    d_used[...] = (g @ w).reshape(used.shape)
    return loss, d_hidden, g.T @ used_rows, g.sum(axis=0)
