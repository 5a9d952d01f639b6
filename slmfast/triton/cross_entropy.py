"""Triton row kernel for softmax cross-entropy (contract in slmfast/ops/cross_entropy.py).

Same math as csrc/cpu/cross_entropy.cpp (see CrossEntropyParams in csrc/common/params.h): one
program per row walks the vocabulary in blocks of BLOCK columns; the forward keeps an online
(max, sum of exp) pair (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"),
so a row is read once for the loss and once more for the gradient, as in Liger Kernel's
cross-entropy. The gradient can be written over the logits (the fused step of the chunked linear
cross-entropy). Dtypes float32, bfloat16, float16 with float32 arithmetic; no tl.dot, so the
bf16 path is also right under the interpreter. A target outside [0, V) that is not ignore_index
gives a NaN loss (the op wrappers reject it before).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh in float32 without libdevice (which the interpreter lacks): an odd Taylor polynomial
    below |x| = 0.25 (truncation < 1e-11), else (1 - e) / (1 + e) with e = exp(-2|x|)."""
    ax = tl.abs(x)
    x2 = x * x
    poly = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (
        62.0 / 2835 + x2 * (-1382.0 / 155925 + x2 * (21844.0 / 6081075)))))))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.25, poly, big)


@triton.jit
def _softcap(a, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        return softcap * _tanh(a / softcap)
    else:
        return a


@triton.jit
def _ce_row_kernel(LOGITS, DLOGITS, TARGET, SCALE, LOSS, STATS, cols, logits_stride, dlogits_stride,
                   scale_stride, ignore_index, label_smoothing, z_loss, softcap,
                   FORWARD: tl.constexpr, GRAD: tl.constexpr, SOFTCAP: tl.constexpr,
                   SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = LOGITS + row * logits_stride
    y = tl.load(TARGET + row)
    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= cols))
    y_safe = tl.where(valid & (y >= 0) & (y < cols), y, 0)
    offs = tl.arange(0, BLOCK)
    z_y = _softcap(tl.load(x_ptr + y_safe).to(tl.float32), softcap, SOFTCAP)  # before any write
    if FORWARD:
        # Online max and sum of exp over the row; the first block holds column 0, so m is finite.
        mask = offs < cols
        z = _softcap(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m = tl.max(z, 0)
        s = tl.sum(tl.exp(z - m), 0)
        sum_z = tl.sum(tl.where(mask, z, 0.0), 0)
        for start in range(BLOCK, cols, BLOCK):
            cur = start + offs
            mask = cur < cols
            z = _softcap(tl.load(x_ptr + cur, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            if SMOOTH:
                sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
        r = tl.log(s)
        lse = m + r
        loss = (1.0 - label_smoothing) * (m - z_y) + r + z_loss * lse * lse
        if SMOOTH:
            loss += label_smoothing * (m - sum_z / cols)
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
        tl.store(LOSS + row, loss)
        tl.store(STATS + 2 * row, tl.where(valid, m, 0.0))
        tl.store(STATS + 2 * row + 1, tl.where(valid, r, 0.0))
    else:
        m = tl.load(STATS + 2 * row).to(tl.float32)
        r = tl.load(STATS + 2 * row + 1).to(tl.float32)
    if GRAD:
        scale = tl.load(SCALE + row * scale_stride).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)  # ignored rows: zero gradient
        p_factor = scale * (1.0 + 2.0 * z_loss * (m + r))
        offset = scale * label_smoothing / cols
        hot = scale * (1.0 - label_smoothing)
        d_ptr = DLOGITS + row * dlogits_stride
        for start in range(0, cols, BLOCK):
            cur = start + offs
            mask = cur < cols
            a = tl.load(x_ptr + cur, mask=mask, other=0.0).to(tl.float32)
            z = _softcap(a, softcap, SOFTCAP)
            d = tl.exp((z - m) - r) * p_factor - offset
            d = tl.where(cur == y, d - hot, d)
            if SOFTCAP:
                zc = z / softcap
                d = d * (1.0 - zc * zc)
            d = tl.where(valid, d, 0.0)  # ignored rows: exactly 0, even where their logits hold NaN
            tl.store(d_ptr + cur, d.to(DLOGITS.dtype.element_ty), mask=mask)


def block_size(cols: int, device: torch.device) -> int:
    """Columns per step: whole rows up to 4096 on a GPU (as Liger Kernel caps its block); 128
    under the interpreter, so that the tests cross block boundaries with small vocabularies."""
    cap = 4096 if device.type == "cuda" else 128
    return min(triton.next_power_of_2(cols), cap)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _launch(logits, dlogits, target, scale, loss, stats, ignore_index, label_smoothing, z_loss, softcap,
            forward, grad):
    rows, cols = logits.shape
    if rows == 0:
        return
    block = block_size(cols, logits.device)
    dummy = stats  # any pointer for the arguments a mode does not read
    _ce_row_kernel[(rows,)](
        logits, dlogits if dlogits is not None else logits, target,
        scale if scale is not None else dummy, loss if loss is not None else dummy, stats,
        cols, logits.stride(0), dlogits.stride(0) if dlogits is not None else 0,
        (0 if scale.numel() == 1 else 1) if scale is not None else 0,
        ignore_index, float(label_smoothing), float(z_loss), float(softcap) if softcap > 0 else 1.0,
        FORWARD=forward, GRAD=grad, SOFTCAP=softcap > 0, SMOOTH=label_smoothing > 0, BLOCK=block,
        num_warps=_num_warps(block))


def cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    """logits (rows, V) with a contiguous last dim; target (rows,) int64. Returns loss (rows,) and
    stats (rows, 2) = (max, log sum exp(z - max)), float32."""
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=logits.device)
    _launch(logits, None, target, None, loss, stats, ignore_index, label_smoothing, z_loss, softcap, True,
            False)
    return loss, stats


def cross_entropy_bwd(grad_loss, logits, target, stats, ignore_index, label_smoothing, z_loss, softcap,
                      out=None):
    """dlogits = grad_loss[i] * dloss_i / dlogits from the saved stats; into `out` (logits itself
    for the in-place backward) or a new tensor. grad_loss: rows values or one."""
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if out is None else out
    _launch(logits, dlogits, target, grad_loss, None, stats, ignore_index, label_smoothing, z_loss, softcap,
            False, True)
    return dlogits


def cross_entropy_fwd_bwd_(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """Loss and stats per row, and grad_scale * the gradient written over logits."""
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=logits.device)
    _launch(logits, logits, target, grad_scale, loss, stats, ignore_index, label_smoothing, z_loss, softcap,
            True, True)
    return loss, stats
