"""layer_norm: LayerNorm with an optional fused residual add — contract, reference, autograd, dispatch.

Math (Ba, Kiros & Hinton 2016, "Layer Normalization"), in the pre-norm residual form:
    h = x + residual                        (h = x without a residual)
    mu = mean(h, -1), r = 1 / sqrt(mean((h - mu)**2, -1) + eps)   per row, float32 (float64 for fp64)
    y = (h - mu) * r * weight + bias
Returns y, or (y, h) with a residual: h is the residual stream the next block adds to.
Same result as torch.nn.functional.layer_norm(x + residual, (H,), weight, bias, eps).

Shapes: x and residual (..., H), contiguous (non-contiguous inputs are copied); weight and bias
(H,) or None (None: no scale / no shift, as torch.nn.LayerNorm(elementwise_affine=False, bias=False)).
Dtypes: x in float32, bfloat16, float16 or float64; residual in x's dtype; weight and bias in
x's dtype or float32 (fp32 master weights with bf16/fp16 activations), both the same dtype.

Saved for backward: h (x without a residual: an input anyway; with one, h is also the output the
next layer consumes, so no new bytes), mu and r (4 + 4 bytes per row; 16 for fp64) and weight (a
parameter). Never y, never xhat. The backward recomputes xhat = (h - mu) * r:
    g = dy * w;  dh = r * (g - mean(g) - xhat * mean(g * xhat)) + dh_out
    dw = sum_rows(dy * xhat);  db = sum_rows(dy)
New bytes saved per row of H elements: 8 (mu and r), against torch's native layer_norm which
also saves x, mean and rstd (its y is not saved either).

Backends: triton (slmfast/triton/layer_norm.py; float32/bf16/fp16, H <= 65536), cpu
(csrc/cpu/layer_norm.cpp), torch (layer_norm_reference below). No CUDA kernel. On CUDA tensors
the automatic choice follows the GPU dispatch table (slmfast/gpu_table.py): the Triton kernel, or
torch's own F.layer_norm (layer_norm_native below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmfast import backends, gpu_table
from slmfast.ops import _checks, _registry

OP = "layer_norm"
IMPLEMENTED = ("triton", "cpu", "torch")


def layer_norm_reference(x, weight, bias, eps=1e-5, residual=None):
    """Plain PyTorch, the oracle of the tests when run in float64."""
    h = x if residual is None else x + residual
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    hf = h.to(acc)
    mean = hf.mean(-1, keepdim=True)  # (..., 1)
    centred = hf - mean
    r = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    y = centred * r
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def layer_norm_native(x, weight, bias, eps=1e-5, residual=None):
    """The same op on torch's own kernels: the residual add, then F.layer_norm, what the GPU
    dispatch table calls "native". Parameters in x's dtype go to the kernel as they are; fp32
    parameters with bf16/fp16 x (master weights) are applied to the row normalized in float32,
    rounded once, as the contract says (torch's mixed-dtype kernel sums dweight/dbias at x's
    precision on the CPU). Autocast is off inside (it would return float32)."""
    params = [p for p in (weight, bias) if p is not None]
    with torch.autocast(x.device.type, enabled=False):
        h = x if residual is None else x + residual
        if all(p.dtype == x.dtype for p in params):
            y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
        else:
            w32, b32 = (p.float() if p is not None else None for p in (weight, bias))
            y = F.layer_norm(h.float(), (h.shape[-1],), w32, b32, eps).to(x.dtype)
    return y if residual is None else (y, h)


# ---- autograd wiring, shared by the C++ op and the Triton op --------------------------------

def _fake_forward(x, weight, bias, residual, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    stats = x.new_empty(x.shape[:-1], dtype=acc)
    return torch.empty_like(x), h, stats, torch.empty_like(stats)


def _fake_backward(dy, dh, h, weight, mean, rstd):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _eps = inputs
    _y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)


def _make_backward(backward_op):
    def backward(ctx, dy, dh, _dmean, _drstd):
        saved, weight, mean, rstd = ctx.saved_tensors
        dh = dh.contiguous() if ctx.has_residual and dh is not None else None
        dx, dweight, dbias = backward_op(dy.contiguous(), dh, saved, weight, mean, rstd)
        return dx, dweight, (dbias if ctx.has_bias else None), (dx if ctx.has_residual else None), None

    return backward


_triton_kernels = _registry.triton_module(OP)
_registry.register_forward_backward(OP, _fake_forward, _fake_backward, _setup_context, _make_backward,
                                    _triton_kernels)


# ---- the public op ------------------------------------------------------------------------

def _check(x, weight, bias, residual, eps) -> torch.device:
    _checks.check_float(OP, "x", x)
    if weight is not None:
        _checks.check_tensor(OP, "weight", weight)
    if bias is not None:
        _checks.check_tensor(OP, "bias", bias)
    device = _checks.check_same_device(OP, x=x, weight=weight, bias=bias, residual=residual)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{OP}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            _checks.check_shape(OP, name, param, (x.shape[-1],), "the last dimension of x")
            _checks.check_param_dtype(OP, name, param, "x", x)
    if weight is not None and bias is not None:
        _checks.check_same_dtype(OP, "bias", bias, "weight", weight)
    _checks.check_residual_and_eps(OP, residual, x, eps)
    return device


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               residual: torch.Tensor | None = None, *, backend: str | None = None):
    """LayerNorm of x (or of h = x + residual) over its last dimension; see the module docstring.

    Returns y, or (y, h) when `residual` is given.
    """
    device = _check(x, weight, bias, residual, eps)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias, residual))
    name = gpu_table.select(OP, IMPLEMENTED, device, backend, (("dtype", x.dtype), ("grad", grad)), True)
    if name == "native":
        return layer_norm_native(x, weight, bias, eps, residual)
    if name == "triton":
        if x.dtype == torch.float64:
            name = backends.fallback(OP, name, "float64", IMPLEMENTED, device)
        elif x.shape[-1] > _triton_kernels.MAX_COLS:
            name = backends.fallback(OP, name, f"rows longer than {_triton_kernels.MAX_COLS}",
                                     IMPLEMENTED, device)
    if name == "torch":
        return layer_norm_reference(x, weight, bias, eps, residual)
    if weight is None:  # no scale: multiply by ones (its gradient is computed and dropped)
        weight = torch.ones(x.shape[-1], dtype=bias.dtype if bias is not None else x.dtype, device=device)
    x = x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    residual = residual.contiguous() if residual is not None else None
    fwd = torch.ops.slmfast_triton.layer_norm_fwd if name == "triton" else torch.ops.slmfast.layer_norm_fwd
    y, h, _mean, _rstd = fwd(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)
