"""Triton kernels for layer_norm (contract and autograd in slmfast/ops/layer_norm.py).

LayerNorm (Ba, Kiros & Hinton 2016) with a fused residual add, the same math as
csrc/cpu/layer_norm.cpp and the structure of slmfast/triton/rms_norm.py (after Triton's
layer-norm tutorial): one program per row in the forward with the whole row in registers; the
backward gives each program a fixed run of rows, keeps dweight/dbias partial sums in registers
and writes them to a (programs, 2, cols) float32 buffer summed afterwards (no atomics, so the
gradients are identical run to run). float32/bf16/fp16 with float32 arithmetic; rows up to
MAX_COLS elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows longer than this fall back (ops/layer_norm.py): the whole row lives in one block of registers,
# as in the rms_norm kernel, whose backward failed to launch for rows of 65,536 on an H200 (triton
# 3.6, "invalid argument"); widths up to 5,120 passed the GPU tests (benchmarks/RESULTS.md, 2026-12-04).
MAX_COLS = 16384


@triton.jit
def _layer_norm_fwd_kernel(X, RES, W, B, Y, H, MEAN, RSTD, cols, eps,
                           HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
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
    mean = tl.sum(hf, axis=0) / cols
    d = tl.where(mask, hf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd * w
    if HAS_BIAS:
        y += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * cols + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, DH, H, W, MEAN, RSTD, DX, PARTIAL, rows, cols, rows_per_program,
                           HAS_DH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        g = dy * w
        c1 = tl.sum(g, axis=0) / cols
        c2 = tl.sum(g * xhat, axis=0) / cols
        dx = rstd * (g - c1 - xhat * c2)
        if HAS_DH:
            dx += tl.load(DH + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * cols + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    base = PARTIAL + pid.to(tl.int64) * 2 * cols
    tl.store(base + offs, dw, mask=mask)
    tl.store(base + cols + offs, db, mask=mask)


def _block(cols: int) -> int:
    return triton.next_power_of_2(cols)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   residual: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (..., cols) contiguous; weight, bias: (cols,). Returns y, h (empty without a
    residual), mean and rstd (x.shape[:-1], float32)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows > 0:
        block = _block(cols)
        _layer_norm_fwd_kernel[(rows,)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            y, h if residual is not None else y, mean, rstd, cols, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=_num_warps(block))
    return y, h, mean, rstd


def _num_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 2 * sms))
    return max(1, min(rows, 4))


def layer_norm_bwd(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x (including dh, the gradient of the h output), weight and bias."""
    cols = h.shape[-1]
    rows = h.numel() // cols
    dx = torch.empty_like(h)
    if rows == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    programs = _num_programs(rows, h.device)
    partial = torch.empty((programs, 2, cols), dtype=torch.float32, device=h.device)
    block = _block(cols)
    _layer_norm_bwd_kernel[(programs,)](
        dy, dh if dh is not None else dy, h, weight, mean, rstd, dx, partial, rows, cols,
        triton.cdiv(rows, programs), HAS_DH=dh is not None, BLOCK=block, num_warps=_num_warps(block))
    # Two separate reductions: views of one (2, cols) sum would alias each other.
    return dx, partial[:, 0].sum(0).to(weight.dtype), partial[:, 1].sum(0).to(weight.dtype)
