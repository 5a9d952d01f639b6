"""rms_norm: RMSNorm with an optional fused residual add — contract, reference, autograd, dispatch.

Math (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), in the pre-norm residual
form of Llama-style blocks:
    h = x + residual                    (h = x without a residual)
    r = 1 / sqrt(mean(h**2, -1) + eps)  one value per row, accumulated in float32 (float64 for fp64)
    y = h * r * (offset + weight)       offset=1.0 gives Gemma's (1 + w) weights
Returns y, or (y, h) with a residual: h is the residual stream the next block adds to.

Shapes: x and residual (..., H), contiguous (non-contiguous inputs are copied); weight (H,).
Dtypes: x in float32, bfloat16, float16 or float64; residual in x's dtype; weight in x's dtype
or float32 (fp32 master weights with bf16/fp16 activations). y and h in x's dtype.

Saved for backward: h (x without a residual, which is an input anyway; with one, h is also the
output the next layer consumes, so no new bytes), r (4 bytes per row; 8 for fp64) and weight (a
parameter). Never y. The backward recomputes xhat = h * r:
    g = dy * (offset + w);  dh = r * (g - xhat * mean(g * xhat)) + dh_out;  dw = sum(dy * xhat)
dx and dresidual are both dh. New bytes saved per row of H elements: 4 (the r of that row).

Backends: cuda (csrc/cuda/rms_norm.cu), triton (slmfast/triton/rms_norm.py; float32/bf16/fp16,
H <= 65536), cpu (csrc/cpu/rms_norm.cpp), torch (rms_norm_reference below). On CUDA tensors the
automatic choice follows the GPU dispatch table (slmfast/gpu_table.py), which may pick torch's
own F.rms_norm instead (rms_norm_native below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmfast import backends, gpu_table
from slmfast.ops import _amp, _checks, _registry

OP = "rms_norm"
IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def rms_norm_reference(x, weight, eps=1e-6, residual=None, offset=0.0):
    """Plain PyTorch, the oracle of the tests when run in float64."""
    h = x if residual is None else x + residual
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    hf = h.to(acc)
    r = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    y = (hf * r * (offset + weight.to(acc))).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_native(x, weight, eps=1e-6, residual=None, offset=0.0):
    """The same op on torch's own kernels: the residual add, then F.rms_norm (fused on CUDA in
    recent torch), what the GPU dispatch table calls "native". A weight in x's dtype with no
    offset goes to the fused kernel as it is; otherwise (fp32 master weights, Gemma's offset) the
    row is normalized in float32 with offset + weight in float32 and rounded once, as the contract
    says. Autocast is off inside (it would run the norm in float32 and return float32)."""
    with torch.autocast(x.device.type, enabled=False):
        h = x if residual is None else x + residual
        if weight.dtype == x.dtype and offset == 0.0:
            y = F.rms_norm(h, (h.shape[-1],), weight, eps)
        else:
            y = F.rms_norm(h.float(), (h.shape[-1],), weight.float() + offset, eps).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_reference_forward(x, weight, residual, eps, offset):
    """The kernels' forward contract in plain PyTorch: (y, h or empty, rstd)."""
    h = x if residual is None else x + residual
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    hf = h.to(acc)
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)  # (...)
    y = (hf * rstd.unsqueeze(-1) * (offset + weight.to(acc))).to(x.dtype)
    return y, (h if residual is not None else x.new_empty(0)), rstd


def rms_norm_reference_backward(dy, dh, h, weight, rstd, offset):
    """The kernels' backward contract in plain PyTorch: (dx, dweight) from h and rstd."""
    acc = rstd.dtype
    xhat = h.to(acc) * rstd.unsqueeze(-1)  # (..., H)
    g = dy.to(acc) * (offset + weight.to(acc))
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(acc)
    dweight = (dy.to(acc) * xhat).reshape(-1, h.shape[-1]).sum(0)
    return dx.to(h.dtype), dweight.to(weight.dtype)


def kernels(name: str):
    """(forward, backward) of a backend without autograd, for fused layers built on this op
    (slmfast/ops/norm_linear.py): forward(x, weight, residual, eps, offset) -> (y, h, rstd),
    backward(dy, dh, h, weight, rstd, offset) -> (dx, dweight); inputs contiguous."""
    if name == "torch":
        return rms_norm_reference_forward, rms_norm_reference_backward
    ns = torch.ops.slmfast_triton if name == "triton" else torch.ops.slmfast
    return ns.rms_norm_fwd, ns.rms_norm_bwd


# ---- autograd wiring, shared by the C++ op (cpu/cuda) and the Triton op ---------------------

def _fake_forward(x, weight, residual, eps, offset):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), h, x.new_empty(x.shape[:-1], dtype=acc)


def _fake_backward(dy, dh, h, weight, rstd, offset):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, _eps, offset = inputs
    _y, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.offset = offset
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _make_backward(backward_op):
    def backward(ctx, dy, dh, _drstd):
        saved, weight, rstd = ctx.saved_tensors
        dh = dh.contiguous() if ctx.has_residual and dh is not None else None
        dx, dweight = backward_op(dy.contiguous(), dh, saved, weight, rstd, ctx.offset)
        return dx, dweight, (dx if ctx.has_residual else None), None, None

    return backward


_triton_kernels = _registry.triton_module(OP)
_registry.register_forward_backward(OP, _fake_forward, _fake_backward, _setup_context, _make_backward,
                                    _triton_kernels)


# ---- the public op ------------------------------------------------------------------------

def check_inputs(x, weight, residual, eps, op: str = OP) -> torch.device:
    _checks.check_float(op, "x", x)
    _checks.check_tensor(op, "weight", weight)
    device = _checks.check_same_device(op, x=x, weight=weight, residual=residual)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    _checks.check_shape(op, "weight", weight, (x.shape[-1],), "the last dimension of x")
    _checks.check_param_dtype(op, "weight", weight, "x", x)
    _checks.check_residual_and_eps(op, residual, x, eps)
    return device


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cuda_backward_max_cols(device: torch.device, dtype: torch.dtype) -> int:
    """The widest row the CUDA backward takes: it keeps one float32 (float64 for fp64) dweight sum
    per column in shared memory (csrc/cuda/rms_norm.cu), up to the card's opt-in limit per block
    (227 KiB on Hopper: 58,112 columns)."""
    if device.type != "cuda":
        return 1 << 62
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    return limit // (8 if dtype == torch.float64 else 4)


def select_backend(x: torch.Tensor, device: torch.device, backend: str | None, op: str = OP,
                   grad: bool = False, has_native: bool = False) -> str:
    """The backend for this call, with the Triton kernels' limits applied (fp64, row length).
    On CUDA tensors the GPU dispatch table decides (slmfast/gpu_table.py, read under the rms_norm
    rows): "native" when `has_native` (the caller runs rms_norm_native), else "torch" for it."""
    kind = (("dtype", x.dtype), ("grad", bool(grad)))
    name = gpu_table.select(op, IMPLEMENTED, device, backend, kind, has_native, OP)
    if name == "cuda" and grad and x.shape[-1] > _cuda_backward_max_cols(device, x.dtype):
        limit = _cuda_backward_max_cols(device, x.dtype)
        name = backends.fallback(op, name, f"rows longer than {limit} in the backward (its dweight sums "
                                 "live in shared memory)", IMPLEMENTED, device)
    if name == "triton":
        if x.dtype == torch.float64:
            name = backends.fallback(op, name, "float64", IMPLEMENTED, device)
        elif x.shape[-1] > _triton_kernels.MAX_COLS:
            name = backends.fallback(op, name, f"rows longer than {_triton_kernels.MAX_COLS}",
                                     IMPLEMENTED, device)
    return name


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None, offset: float = 0.0, *,
             backend: str | None = None):
    """RMSNorm of x (or of h = x + residual) over its last dimension; see the module docstring.

    Returns y, or (y, h) when `residual` is given.
    """
    x, residual = _amp.promote_residual(x, residual)
    device = check_inputs(x, weight, residual, eps)
    name = select_backend(x, device, backend, grad=needs_grad(x, weight, residual), has_native=True)
    if name == "native":
        return rms_norm_native(x, weight, eps, residual, offset)
    if name == "torch":
        return rms_norm_reference(x, weight, eps, residual, offset)
    x = x.contiguous()
    weight = weight.contiguous()
    residual = residual.contiguous() if residual is not None else None
    fwd = torch.ops.slmfast_triton.rms_norm_fwd if name == "triton" else torch.ops.slmfast.rms_norm_fwd
    y, h, _rstd = fwd(x, weight, residual, float(eps), float(offset))
    return y if residual is None else (y, h)
