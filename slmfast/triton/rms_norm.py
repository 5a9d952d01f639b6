"""Triton kernels for rms_norm (contract and autograd in slmfast/ops/rms_norm.py).

Same math as csrc/cpu/rms_norm.cpp (Zhang & Sennrich 2019, pre-norm residual form), in the
style of Triton's layer-norm tutorial: one program per row in the forward, the whole row in one
block of registers; the backward gives each program a fixed run of rows, keeps its dweight
partial sums in registers and writes them to a (programs, cols) float32 buffer that is summed
afterwards without atomics, so gradients are identical run to run.
Dtypes float32, bfloat16, float16 with float32 arithmetic; rows up to MAX_COLS elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows longer than this fall back (ops/rms_norm.py): the whole row lives in one block of registers, and
# on an H200 (triton 3.6) rows of 65,536 failed to launch ("invalid argument") in the backward;
# widths up to 5,120 passed the GPU tests (benchmarks/RESULTS.md, 2026-12-04).
MAX_COLS = 16384


@triton.jit
def _rms_norm_fwd_kernel(X, RES, W, Y, H, RSTD, cols, eps, offset,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(X + row * cols + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(RES + row * cols + offs, mask=mask, other=0.0)
        h = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)  # rounded as stored
        tl.store(H + row * cols + offs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    y = hf * rstd * (offset + w)
    tl.store(Y + row * cols + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, DH, H, W, RSTD, DX, DW_PARTIAL, rows, cols, rows_per_program, offset,
                         HAS_DH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = offset + tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 row offsets on the GPU
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = h * rstd
        g = dy * w
        c = tl.sum(g * xhat, axis=0) / cols
        dx = rstd * (g - xhat * c)
        if HAS_DH:
            dx += tl.load(DH + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * cols + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * cols + offs, dw, mask=mask)


def _block(cols: int) -> int:
    return triton.next_power_of_2(cols)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                 eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (..., cols) contiguous; weight: (cols,). Returns y, h (empty without a
    residual) and rstd (x.shape[:-1], float32)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows > 0:
        block = _block(cols)
        _rms_norm_fwd_kernel[(rows,)](
            x, residual if residual is not None else x, weight, y, h if residual is not None else y,
            rstd, cols, eps, offset, HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=_num_warps(block))
    return y, h, rstd


def _num_programs(rows: int, device: torch.device) -> int:
    """Row blocks for the dweight reduction: fixed for a given device and row count."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 2 * sms))
    return max(1, min(rows, 4))


def rms_norm_bwd(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x (including dh, the gradient of the h output) and of weight."""
    cols = h.shape[-1]
    rows = h.numel() // cols
    dx = torch.empty_like(h)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    programs = _num_programs(rows, h.device)
    rows_per_program = triton.cdiv(rows, programs)
    partial = torch.empty((programs, cols), dtype=torch.float32, device=h.device)
    block = _block(cols)
    _rms_norm_bwd_kernel[(programs,)](
        dy, dh if dh is not None else dy, h, weight, rstd, dx, partial, rows, cols,
        rows_per_program, offset, HAS_DH=dh is not None, BLOCK=block, num_warps=_num_warps(block))
    return dx, partial.sum(0).to(weight.dtype)
