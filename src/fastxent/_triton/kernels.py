r"""Triton kernels of the row-kernel contract (:mod:`fastxent._autograd`); launchers live in
:mod:`fastxent._triton`.

One program per row of ``V`` logits, in two passes over tiles of ``BLOCK`` columns, all
arithmetic in float32 (bf16/fp16 are widened on load, the gradient is rounded once on store):

1. Online softmax, one read: with ``m`` the running max and ``d = Σ_j e^{z'_j - m}``, a tile
   with max ``m_t`` updates ``m ← max(m, m_t)``, ``d ← d·e^{m_old - m} + Σ_tile e^{z'_j - m}``.
   The sums the loss needs (``Σ t``, ``Σ t (z' - r)`` for probabilities; ``Σ w``,
   ``Σ w (z' - r)`` for label smoothing) are gathered in the same loop, relative to ``r``, the
   first finite tile max: ``lse·Σt - Σ t z'`` would cancel two numbers the size of the logits
   and lose float32 precision when they share a large offset, ``(lse - r)·Σt - Σ t (z' - r)``
   does not. A class index ``y`` reads ``z_y`` directly.
2. Only when a gradient is asked for: ``o_i = e^{(z'_i - m) - \log d}`` and

   .. math::

       \frac{\partial \ell}{\partial z_i} = \Big(o_i\,(a \textstyle\sum_j t_j
           + 2 b s\,\mathrm{lse}) - a\, t_i\Big)\, \frac{\partial z'_i}{\partial z_i}

   written once, tile by tile. Each tile is read before it is written (by the same threads),
   and a barrier between the passes orders every thread's read of ``z_y`` before any store, so
   the gradient buffer may be the logits themselves.

64-bit offsets: the program id is widened to int64 before it is multiplied by the row stride,
so ``row·stride`` (which exceeds 2^31 elements once N×V does) is computed in int64 and folded
into the row's base pointer. Within a row the column offsets stay int32: the launcher requires
unit stride along V and V < 2^30, so ``start + arange(BLOCK)`` cannot overflow.
"""

# No `from __future__ import annotations`: Triton 3.0's interpreter takes a parameter as a
# compile-time constant only when its annotation is the object tl.constexpr, not the string.
import triton
import triton.language as tl


@triton.jit
def _tanh_sech2(u):
    """tanh u = sign(u)·(-t/(2 + t)), t = e^x - 1 with x = -2|u| (x <= 0), and its derivative
    1 - tanh² u = 4e/(2 + t)² with e = e^x.

    ``1 - 2/(e^{2u} + 1)`` cancels near 0 (absolute error ~6e-8, i.e. c·6e-8 in every capped
    logit); here t is Kahan's expm1, ``(e - 1)·x / log e`` (x itself where e rounds to 1),
    exact to a few ulps from exp and log alone. e < 2^-100 gives t = e - 1 = -1, so ±inf gives
    ±1; NaN stays NaN. The derivative from e, not as 1 - tanh²: that cancels where tanh
    saturates (|u| large), the softcap's chain factor there lost all its digits.
    """
    x = -2.0 * tl.abs(u)
    e = tl.exp(x)
    log_e = tl.log(tl.maximum(e, 2.0**-100))
    t = tl.where(e == 1.0, x, (e - 1.0) * x / tl.where(e == 1.0, 1.0, log_e))
    t = tl.where(e < 2.0**-100, e - 1.0, t)
    magnitude = -t / (2.0 + t)
    return tl.where(u < 0, -magnitude, magnitude), 4.0 * e / ((2.0 + t) * (2.0 + t))


@triton.jit
def _transform(z, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``(z', dz'/dz)``: ``(c·tanh(αz/c), α·sech²(αz/c))``, or ``(αz, α)``, or ``(z, 1)``.
    Where only z' is used the compiler drops the derivative."""
    zp = z
    slope = 1.0
    if HAS_SOFTCAP:
        tanh, sech2 = _tanh_sech2(z * (logit_scale / softcap))
        zp = softcap * tanh
        slope = logit_scale * sech2
    elif HAS_SCALE:
        zp = z * logit_scale
        slope = logit_scale
    return zp, slope


@triton.jit
def _soft_targets(
    target_row, weight_ptr, cols, mask, keep, spread,
    HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):  # fmt: skip
    """One tile of effective probability targets t_j = w_j((1-ε) y_j + ε/V), 0 past V."""
    t = tl.load(target_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTHING:
        t = t * keep + spread
    if HAS_WEIGHT:
        t = t * tl.load(weight_ptr + cols, mask=mask, other=0.0)
    return tl.where(mask, t, 0.0)


@triton.jit
def cross_entropy_rows_kernel(
    z_ptr,  # (M, V) logits, unit stride along V
    z_stride,  # elements between rows of z
    target_ptr,  # (M,) int64 class indices, or (M, V) probabilities with unit stride along V
    target_stride,  # elements between targets (index) or rows of targets (probabilities)
    weight_ptr,  # (V,) float32 class weights (read only when HAS_WEIGHT)
    grad_ptr,  # (M, V) ∂loss/∂z, unit stride along V, may alias z (written only if WRITE_GRAD)
    grad_stride,
    rows_ptr,  # (M,) float32 row losses out
    ce_scale_ptr,  # 0-dim float32 a: factor on each row's cross-entropy
    z_scale_ptr,  # 0-dim float32 b: factor on each row's z-loss
    V,  # classes
    ignore_index,
    keep,  # 1 - ε
    spread,  # ε / V
    z_loss,  # s
    softcap,  # c
    logit_scale,  # α
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before any multiplication by a stride
    z_row = z_ptr + row * z_stride
    offs = tl.arange(0, BLOCK)
    a = tl.load(ce_scale_ptr).to(tl.float32)
    b = tl.load(z_scale_ptr).to(tl.float32)

    # ---- pass 1: max, Σe, and the target sums, one read of the row ----
    m = float("-inf")
    d = 0.0
    r = 0.0  # the reference of the target sums: the running finite shift
    acc_t = tl.zeros([BLOCK], dtype=tl.float32)  # Σ t (probabilities) or Σ w (smoothing)
    acc_tz = tl.zeros([BLOCK], dtype=tl.float32)  # Σ t (z' - r), or Σ w (z' - r) (smoothing)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        zp, _ = _transform(x, logit_scale, softcap, HAS_SOFTCAP, HAS_SCALE)  # (BLOCK,)
        zp_max = tl.where(mask, zp, float("-inf"))
        m_new = tl.maximum(m, tl.max(zp_max, axis=0))
        # Shift by a finite max so rows of ±inf keep e^{...} defined (0 when no mass yet).
        shift_old = tl.where(tl.abs(m) < float("inf"), m, 0.0)
        shift = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        d = d * tl.exp(tl.minimum(shift_old - shift, 0.0)) + tl.sum(tl.exp(zp_max - shift), axis=0)
        # The target sums follow the shift, as Σe does: each lane's past terms move by its step.
        # (Held to the first tile's shift, (lse - r)Σt - Σt(z' - r) cancelled two terms of
        # size (m - r)Σt when a later tile's logits lay far above it.)
        if SOFT or HAS_WEIGHT:
            acc_tz -= (shift - r) * acc_t
        elif HAS_SMOOTHING:  # unweighted: one term per lane for each full tile so far
            acc_tz -= (shift - r) * (start // BLOCK)
        r = shift
        m = m_new
        if SOFT:
            t = _soft_targets(target_ptr + row * target_stride, weight_ptr, cols, mask, keep,
                              spread, HAS_SMOOTHING, HAS_WEIGHT)  # fmt: skip
            acc_t += t
            acc_tz += tl.where(mask, t * (zp - r), 0.0)
        elif HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                acc_t += w
                acc_tz += tl.where(mask, w * (zp - r), 0.0)
            else:
                acc_tz += tl.where(mask, zp - r, 0.0)
    shift = tl.where(tl.abs(m) < float("inf"), m, 0.0)
    log_d = tl.where(m == float("inf"), float("nan"), tl.log(d))  # +inf: inf - inf, NaN (PyTorch)
    lse = shift + log_d
    lse_r = (shift - r) + log_d  # lse - r

    # ---- the row's loss: a·E + b·s·lse² ----
    if SOFT:
        counted = 1.0
        sum_t = tl.sum(acc_t, axis=0)
        ce = lse_r * sum_t - tl.sum(acc_tz, axis=0)
    else:
        y = tl.load(target_ptr + row * target_stride)
        is_counted = y != ignore_index
        counted = tl.where(is_counted, 1.0, 0.0)
        # Out-of-range targets read class 0 (the caller raises for them once the check is in).
        y = tl.where(is_counted & (y >= 0) & (y < V), y, 0)
        zp_y, _ = _transform(
            tl.load(z_row + y).to(tl.float32), logit_scale, softcap, HAS_SOFTCAP, HAS_SCALE
        )
        w_y = counted
        if HAS_WEIGHT:
            w_y = tl.where(is_counted, tl.load(weight_ptr + y), 0.0)
        sum_t = keep * w_y
        ce = keep * w_y * ((shift - zp_y) + log_d)  # the one-hot part, (1-ε) w_y (lse - z'_y)
        if HAS_SMOOTHING:  # the uniform part (ε/V) Σ_j w_j (lse - z'_j), counted rows only
            sum_w = V * 1.0
            if HAS_WEIGHT:
                sum_w = tl.sum(acc_t, axis=0)
            sum_t += counted * spread * sum_w
            ce += spread * (lse_r * sum_w - tl.sum(acc_tz, axis=0))
    loss = a * ce
    if HAS_Z_LOSS:
        loss += b * z_loss * lse * lse
    if not SOFT:  # an ignored row contributes nothing, even if its logits are not finite
        loss = tl.where(is_counted, loss, 0.0)
    tl.store(rows_ptr + row, loss)

    # ---- pass 2: the gradient, written once ----
    if WRITE_GRAD:
        if not SOFT:
            # Each thread read z[y] above after pass 1; the loss's copy is warp 0's. Where the
            # gradient is written over the logits (inplace_backward, the linear walk's chunks),
            # the warp that owns column y must not store before warp 0 has read it.
            tl.debug_barrier()
        coef = a * sum_t  # ∂ℓ/∂z'_i = coef·o_i - a·t_i
        if HAS_Z_LOSS:
            coef += counted * 2.0 * b * z_loss * lse
        grad_row = grad_ptr + row * grad_stride
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            zp, slope = _transform(x, logit_scale, softcap, HAS_SOFTCAP, HAS_SCALE)
            g = coef * tl.exp((zp - shift) - log_d)
            if SOFT:
                t = _soft_targets(target_ptr + row * target_stride, weight_ptr, cols, mask, keep,
                                  spread, HAS_SMOOTHING, HAS_WEIGHT)  # fmt: skip
                g -= a * t
            else:
                g -= tl.where(cols == y, a * keep * w_y, 0.0)
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        g -= (a * spread * counted) * tl.load(
                            weight_ptr + cols, mask=mask, other=0.0
                        )
                    else:
                        g -= a * spread * counted
            if HAS_SOFTCAP or HAS_SCALE:
                g *= slope
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_unless_one_kernel(x_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """``x *= f`` for a 0-dim float32 factor ``f`` read on the device; no memory traffic if f = 1.
    Entries that are 0 stay 0 (not NaN) when f is inf or NaN, as ``scaled_in_blocks`` keeps them.

    Grid-stride loop over a fixed grid whose end is read on the device: ``numel`` elements, or
    none when ``f == 1``, so that launch costs a few microseconds whatever ``numel`` is and the
    host never reads ``f``.
    """
    factor = tl.load(factor_ptr)
    limit = tl.where(factor != 1.0, numel, 0).to(tl.int64)  # elements to scale: all, or none
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, limit, step):
        cols = start + offs
        mask = cols < limit
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        scaled = tl.where(x == 0.0, 0.0, x * factor)  # an ignored row stays 0 under f = inf
        tl.store(x_ptr + cols, scaled.to(x_ptr.dtype.element_ty), mask=mask)
