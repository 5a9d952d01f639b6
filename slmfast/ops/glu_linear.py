"""glu_linear: the down projection of a gated MLP, fused with the gate, without storing the product.

out = F.linear(act(gate) * up, W_down, b_down) with act = silu (SwiGLU) or gelu (GeGLU). Eager
PyTorch stores the product a = act(gate) * up for the weight gradient dW_down = dout^T a, on top
of gate, act(gate) and up for the gate's own backward. This layer saves gate and up only (which
the gate's backward needs anyway); its backward runs one glu_bwd pass that recomputes a while it
computes the gate's gradients:
    da = dout W_down;  (dgate, dup, a) = glu_bwd(da, gate, up, recompute=True)
    dW_down = dout^T a;  db_down = sum_rows(dout)
(selective recomputation at kernel level, as in Korthikanti et al. 2022).

Bytes saved for backward, per token (e = bytes per element, I intermediate size):
    glu_linear:                            2 * I * e   (gate, up)
    eager down_proj(F.silu(gate) * up):    4 * I * e   (gate, silu(gate), up, the product)
plus W_down, which both keep.

Shapes: gate, up (..., I), weight (out, I), bias (out,) or None; gate/up/weight in one dtype (or
the autocast dtype under torch.autocast). Backends: those of slmfast.ops.glu for the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmfast.ops import _amp, _checks
from slmfast.ops import glu as _glu

OP = "glu_linear"


class _GluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias, activation, backend):
        forward, _ = _glu.kernels(backend)
        product = forward(gate, up, activation)  # (..., I), never saved
        dtype = _amp.linear_dtype(product)
        out = F.linear(_amp.cast(product, dtype), _amp.cast(weight, dtype), _amp.cast(bias, dtype))
        ctx.save_for_backward(gate, up, weight)
        ctx.activation, ctx.backend, ctx.dtype = activation, backend, dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up, weight = ctx.saved_tensors
        _, backward = _glu.kernels(ctx.backend)
        d2 = dout.reshape(-1, dout.shape[-1])  # (N, out)
        w_c = _amp.cast(weight, ctx.dtype)
        dproduct = (d2 @ w_c).reshape(gate.shape).to(gate.dtype)  # (..., I)
        dgate, dup, product = backward(dproduct, gate, up, ctx.activation, True)
        del dproduct
        dweight = None
        if ctx.needs_input_grad[2]:
            p2 = _amp.cast(product.reshape(-1, gate.shape[-1]), ctx.dtype)  # (N, I)
            dweight = (d2.t() @ p2).to(weight.dtype)
        dbias = d2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dgate, dup, dweight, dbias, None, None


def glu_linear_reference(gate, up, weight, bias=None, activation="silu"):
    """Plain PyTorch: the oracle of the tests in float64."""
    return F.linear(_glu.glu_reference(gate, up, activation), weight, bias)


def glu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str = "silu", *, backend: str | None = None) -> torch.Tensor:
    """F.linear(act(gate) * up, weight, bias), saving only gate and up; see the module docstring."""
    device = _glu.check_inputs(OP, gate, up)
    if activation not in _glu.ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {_glu.ACTIVATIONS}, got {activation!r}")
    _checks.check_tensor(OP, "weight", weight)
    _checks.check_same_device(OP, gate=gate, weight=weight, bias=bias)
    if gate.dim() < 1 or weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        width = gate.shape[-1] if gate.dim() else "?"
        raise ValueError(f"{OP}: weight must have shape (out, {width}) to read gate's last dimension, "
                         f"got {tuple(weight.shape)}")
    if _amp.linear_dtype(gate) is None:
        _checks.check_same_dtype(OP, "weight", weight, "gate", gate)
    if bias is not None:
        _checks.check_tensor(OP, "bias", bias)
        _checks.check_shape(OP, "bias", bias, (weight.shape[0],), "the rows of weight")
        _checks.check_same_dtype(OP, "bias", bias, "weight", weight)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (gate, up, weight, bias))
    name = _glu.select_backend(OP, gate.dtype, device, backend, activation, grad)
    return _GluLinear.apply(gate.contiguous(), up.contiguous(), weight, bias, activation, name)
