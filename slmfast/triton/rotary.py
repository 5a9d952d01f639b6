"""Triton kernel for rotary position embedding (contract and autograd in slmfast/ops/rotary.py).

RoPE (Su et al. 2021, "RoFormer"), the same math as csrc/cpu/rotary.cpp: one program per
(batch x token, block of heads) rotates the first R features of those head rows by the angles of
their position (loaded once),
pairing (i, i + R/2) (half-split, HF/NeoX) or (2i, 2i + 1) (interleaved, GPT-J), and copies the
rest (partial rotary) unless it works in place. cos/sin hold cos(theta_i), sin(theta_i) in their
first R/2 columns (the HF layout repeats them in the second half, which is not read). With
CONJUGATE the rotation is by -theta: the backward. q and k are launched separately on the same
kernel; any strides with a contiguous last dimension; float32 arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(X, OUT, COS, SIN, seqlen, heads, sxb, sxh, sxt, sob, soh, sot, csb, cst, head_dim, half,
                   INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_REST: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (batch, token) position
    b = row // seqlen
    t = row % seqlen
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,) heads
    i = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,) pair index
    c = tl.load(COS + b * csb + t * cst + i, mask=i < half, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * csb + t * cst + i, mask=i < half, other=0.0).to(tl.float32)
    if CONJUGATE:
        s = -s
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    mask = (h[:, None] < heads) & (i[None, :] < half)  # (BLOCK_H, BLOCK_HALF)
    x_rows = X + b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh  # (BLOCK_H, 1)
    o_rows = OUT + b * sob + t * sot + h[:, None].to(tl.int64) * soh
    x1 = tl.load(x_rows + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_rows + i1[None, :], (x1 * c[None, :] - x2 * s[None, :]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_rows + i2[None, :], (x2 * c[None, :] + x1 * s[None, :]).to(OUT.dtype.element_ty), mask=mask)
    if COPY_REST:
        j = 2 * half + tl.arange(0, BLOCK_D)
        rest = (h[:, None] < heads) & (j[None, :] < head_dim)
        tl.store(o_rows + j[None, :], tl.load(x_rows + j[None, :], mask=rest, other=0.0), mask=rest)


def _launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
            conjugate: bool) -> None:
    batch, heads, seqlen, head_dim = x.shape
    half = cos.shape[-1] // 2
    if batch * heads * seqlen == 0 or half == 0:
        return
    cs_batch_stride = 0 if cos.shape[0] == 1 else cos.stride(0)
    copy_rest = (out.data_ptr() != x.data_ptr()) and head_dim > 2 * half
    block_half = triton.next_power_of_2(half)
    block_d = triton.next_power_of_2(max(head_dim - 2 * half, 1))
    # Heads per program: up to ~4K elements of a position's heads in one block.
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // max(block_half, block_d)))
    _rotary_kernel[(batch * seqlen, triton.cdiv(heads, block_h))](
        x, out, cos, sin, seqlen, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        out.stride(2), cs_batch_stride, cos.stride(1), head_dim, half, INTERLEAVED=interleaved,
        CONJUGATE=conjugate, COPY_REST=copy_rest, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_D=block_d,
        num_warps=4 if block_h * block_half >= 1024 else 1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
           conjugate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, T, D), k (B, Hkv, T, D) with a contiguous last dim; cos/sin (B or 1, T, R)
    contiguous. Returns rotated copies laid out like q and k (when dense)."""
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k)
    _launch(q, q_out, cos, sin, interleaved, conjugate)
    _launch(k, k_out, cos, sin, interleaved, conjugate)
    return q_out, k_out


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
            conjugate: bool) -> None:
    """The same, in place."""
    _launch(q, q, cos, sin, interleaved, conjugate)
    _launch(k, k, cos, sin, interleaved, conjugate)
