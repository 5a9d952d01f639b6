"""Triton kernels for the gated linear units (contract and autograd in slmfast/ops/glu.py).

out = act(gate) * up with act = silu (SwiGLU) or gelu, erf or tanh form (GeGLU), after Shazeer
2020 ("GLU Variants Improve Transformer"); same math as csrc/cpu/glu.cpp. Elementwise over
the flattened tensors, BLOCK elements per program, float32 arithmetic. The backward reads only
gate and up (and dout), recomputes act and act', and can write out again (RECOMPUTE) for the
weight gradient of the projection that consumed it. tanh is written with exp (tanh z =
1 - 2 / (e^2z + 1)) so that the same code runs compiled and under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
BLOCK = 1024



@triton.jit
def _tanh(z):
    z = tl.minimum(tl.maximum(z, -15.0), 15.0)  # tanh(15) is 1 in float32; e^2z stays finite
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """act(x) and act'(x) in float32."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-x))
        f = x * s
        df = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 + 0.5 * tl.erf(x * 0.7071067811865476)  # x / sqrt(2)
        f = x * cdf
        df = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
    else:
        x2 = x * x
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))  # sqrt(2 / pi) (x + kappa x^3)
        f = 0.5 * x * (1.0 + t)
        df = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x2)
    return f, df


@triton.jit
def _glu_fwd_kernel(GATE, UP, OUT, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    f, _df = _act_and_grad(g, ACT)
    tl.store(OUT + offs, (f * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, OUT, n, ACT: tl.constexpr, RECOMPUTE: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    f, df = _act_and_grad(g, ACT)
    tl.store(DGATE + offs, (d * u * df).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (d * f).to(DUP.dtype.element_ty), mask=mask)
    if RECOMPUTE:
        tl.store(OUT + offs, (f * u).to(OUT.dtype.element_ty), mask=mask)


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate, up: contiguous, same shape and dtype. Returns act(gate) * up."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        _glu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, ACT=ACTIVATIONS[activation], BLOCK=BLOCK,
                                                  num_warps=4)
    return out


def glu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
            recompute: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate, dup, out): out = act(gate) * up when recompute, else an empty tensor."""
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    out = torch.empty_like(gate) if recompute else gate.new_empty(0)
    n = gate.numel()
    if n > 0:
        _glu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            dout, gate, up, dgate, dup, out if recompute else dgate, n, ACT=ACTIVATIONS[activation],
            RECOMPUTE=recompute, BLOCK=BLOCK, num_warps=4)
    return dgate, dup, out
