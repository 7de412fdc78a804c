r"""Row kernel of the portable backend (contract: :mod:`fastxent._autograd`).

Rows are processed in chunks of about ``CHUNK_ELEMENTS`` logits, so the float32 temporaries stay
a few MB however large N×V is (no full-size float32 copy of bf16 logits). Per chunk:

.. math::

    z' = T(z), \quad m = \max_j z'_j, \quad \mathrm{lse} = m + \log \textstyle\sum_j e^{z'_j - m}

    E = (\mathrm{lse} - m) \textstyle\sum_j t_j - \sum_j t_j (z'_j - m), \qquad
    \partial E / \partial z'_i = o_i \textstyle\sum_j t_j - t_i

The loss is summed relative to the shift ``m``: ``lse·Σt - Σ t z'`` would cancel two numbers of
the size of the logits, and lose float32 precision when they share a large offset (1000 + z).

For class-index targets ``t = (1-ε) w_y e_y + (ε/V) w`` is never materialised: ``Σ t`` and
``Σ t z'`` are a gather and a (weighted) row sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastxent._autograd import accumulation_dtype, copy_into
from fastxent._options import CrossEntropyOptions

CHUNK_ELEMENTS = 1 << 21  # 8 MB of float32 per temporary


def rows_per_chunk(num_classes: int, budget: int = CHUNK_ELEMENTS) -> int:
    """How many rows of ``num_classes`` logits fit in ``budget`` elements (at least one)."""
    return max(1, budget // max(1, num_classes))


def transform(z: Tensor, opts: CrossEntropyOptions) -> tuple[Tensor, Tensor | None]:
    """z' = c·tanh(αz/c) (or αz) and dz'/dz = α(1 - (z'/c)²) (or None when z' = z)."""
    if opts.softcap is not None:
        zp = torch.tanh(z * (opts.logit_scale / opts.softcap)).mul_(opts.softcap)
        dzp_dz = (zp / opts.softcap).square_().neg_().add_(1.0).mul_(opts.logit_scale)
        return zp, dzp_dz
    if opts.logit_scale != 1.0:
        return z * opts.logit_scale, None
    return z, None


def cross_entropy_rows(
    z: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: CrossEntropyOptions,
    ce_scale: Tensor,
    z_scale: Tensor,
    grad: Tensor | None,
) -> Tensor:
    """Row losses ``ce_scale·E + z_scale·s·lse²`` (M,), and ∂loss/∂z into ``grad`` if given."""
    num_rows, num_classes = z.shape
    acc = accumulation_dtype(z.dtype)
    rows = torch.empty(num_rows, dtype=acc, device=z.device)
    w = None if weight is None else weight.to(device=z.device, dtype=acc)
    a, b = ce_scale.to(acc), z_scale.to(acc)
    eps, s = opts.label_smoothing, opts.z_loss
    smooth = eps / num_classes
    step = rows_per_chunk(num_classes)

    for start in range(0, num_rows, step):
        chunk = slice(start, start + step)
        zp, dzp_dz = transform(z[chunk].to(acc), opts)  # (n, V); may alias z when fp32, no T
        m = zp.amax(dim=1, keepdim=True)
        pos_inf = m == torch.inf  # (n, 1); a +inf logit: log-softmax is inf - inf, NaN
        m = torch.where(torch.isfinite(m), m, 0.0)  # rows of ±inf: keep exp() finite
        zs = zp - m  # (n, V), z'_j - m
        e = torch.exp(zs)  # (n, V), e_j = e^{z'_j - m}
        sum_e = e.sum(dim=1, keepdim=True)
        sum_e = torch.where(pos_inf, torch.nan, sum_e)  # NaN loss and gradient rows, as PyTorch
        log_sum_e = sum_e.log().squeeze(1)  # (n,), lse - m
        lse = m.squeeze(1) + log_sum_e  # (n,)

        if opts.soft:
            t = target[chunk].to(acc)  # (n, V)
            if eps:
                t = t * (1.0 - eps) + smooth
            if w is not None:
                t = t * w
            counted = None
            sum_t = t.sum(dim=1)
            # E = -Σ t (z' - lse), with m taken out of both terms
            ce = log_sum_e * sum_t - (t * zs).sum(dim=1)
        else:
            y = target[chunk]
            counted = y != opts.ignore_index
            y_safe = torch.where(counted, y, 0)
            counted_f = counted.to(acc)
            w_y = counted_f if w is None else torch.where(counted, w[y_safe], 0.0)
            zs_y = zs.gather(1, y_safe.unsqueeze(1)).squeeze(1)  # z'_y - m
            sum_t = (1.0 - eps) * w_y
            # -t_y log o_y as one product: an infinite w_y gives inf (as PyTorch), not the NaN
            # of inf·0 that the difference of two products made when z'_y is the row's max
            ce = sum_t * (log_sum_e - zs_y)
            if eps:  # the uniform part (ε/V)·w, only on counted rows
                row_w = num_classes if w is None else w.sum()
                smooth_t = counted_f * (smooth * row_w)
                sum_t = sum_t + smooth_t
                zs_sum = zs.sum(dim=1) if w is None else zs @ w
                ce = ce + log_sum_e * smooth_t - torch.where(counted, smooth * zs_sum, 0.0)
        if counted is not None:  # ignored rows add 0, whatever their logits (0·inf would be NaN)
            ce = torch.where(counted, ce, 0.0)
        rows[chunk] = a * ce
        if s:  # not 0·lse², which is NaN where lse² overflows (|lse| > 1.8e19 in float32)
            zl = s * lse.square()
            rows[chunk] += b * (zl if counted is None else torch.where(counted, zl, 0.0))

        if grad is None:
            continue
        # ∂ℓ/∂z'_i = o_i (a Σt + 2 b s lse) - a t_i, with o_i = e_i / Σe.
        coef = a * sum_t + 2.0 * s * b * lse
        if counted is not None:
            coef = torch.where(counted, coef, 0.0)
        g = e.mul_(coef.unsqueeze(1) / sum_e)  # (n, V), reuses e
        if opts.soft:
            g.sub_(a * t)
        else:
            g.scatter_add_(1, y_safe.unsqueeze(1), (-(1.0 - eps) * a * w_y).unsqueeze(1))
            if eps:
                uniform = smooth * a * (torch.ones_like(g[0]) if w is None else w)  # (V,)
                g.sub_(counted_f.unsqueeze(1) * uniform)
        if dzp_dz is not None:
            g.mul_(dzp_dz)
        elif opts.logit_scale != 1.0:
            g.mul_(opts.logit_scale)
        copy_into(grad[chunk], g)
    return rows
