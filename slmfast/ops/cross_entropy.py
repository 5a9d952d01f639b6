"""cross_entropy: fused softmax cross-entropy of logits — contract, reference, autograd, dispatch.

Math, per row of logits z (V classes), target y, eps = label_smoothing (PyTorch's definition):
    lse  = log sum_j exp(z_j)
    loss = lse - (1 - eps) z_y - (eps / V) sum_j z_j  +  z_loss * lse^2
    dloss/dz = softmax(z) (1 + 2 z_loss lse) - eps / V - (1 - eps) onehot(y)
which is F.cross_entropy(z, y, label_smoothing=eps) plus the z-loss of PaLM (Chowdhery et al.
2022) and flash-attention's cross_entropy. Rows with target == ignore_index give 0 and a zero
gradient. reduction="mean" divides the sum by the number of non-ignored rows, or by num_items
(int or 0-dim tensor) when given, so that gradient accumulation normalizes over the whole
accumulated batch; an all-ignored batch gives 0 (F.cross_entropy gives NaN). "sum" and "none"
(per-row losses, shaped like target) as in torch.

Shapes: logits (..., V) (copied when its last dim is not contiguous), target (...) of an integer
dtype with values in [0, V) or ignore_index. Dtypes: float32, bfloat16, float16, float64
(float64 falls back from triton); float32 arithmetic (float64 for fp64). The loss has the dtype of
logits, like F.cross_entropy.

Saved for backward: logits (an input, alive anyway; no new bytes), target, and two floats per row,
m = max z and r = log sum exp(z - m) (8 bytes; 16 for fp64). Never the softmax: the backward
recomputes exp((z - m) - r) in one pass (from (m, r) rather than one lse = m + r, whose float32
rounding at |lse| ~ 30 would cost every probability ~4 bits). With
inplace_backward=True the gradient is written over the logits' storage instead of a new (N, V)
tensor (flash-attention's inplace_backward): the logits must not be needed by anything else
afterwards (autograd raises if another node saved them). Under torch.compile the backward is
out of place.

Backends: cuda (csrc/cuda/cross_entropy.cu), triton (slmfast/triton/cross_entropy.py), cpu
(csrc/cpu/cross_entropy.cpp), torch (cross_entropy_reference below).
"""

from __future__ import annotations

import torch

from slmfast import backends, gpu_table
from slmfast.ops import _checks
from slmfast.ops import _loss_math as M

OP = "cross_entropy"
IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def cross_entropy_reference(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                            z_loss=0.0, num_items=None):
    """Plain PyTorch (F.cross_entropy + z_loss), the oracle of the tests when run in float64."""
    v = logits.shape[-1]
    z, y = logits.reshape(-1, v), target.reshape(-1)
    rows = M.cross_entropy_rows_reference(z, y, ignore_index, label_smoothing, z_loss)
    if reduction == "none":
        return rows.reshape(target.shape)
    scale = M.mean_scale(OP, y != ignore_index, y.numel(), reduction, num_items, M.acc_dtype(logits.dtype),
                         logits.device)
    return (rows.sum() * scale).to(logits.dtype)


# ---- autograd wiring ----------------------------------------------------------------------

def _fake_forward(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    acc = M.acc_dtype(logits.dtype)
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty((logits.shape[0], 2), dtype=acc)


def _fake_backward(grad_loss, logits, target, stats, ignore_index, label_smoothing, z_loss, softcap):
    return logits.new_empty(logits.shape)


def _fake_forward_backward(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    return _fake_forward(logits, target, ignore_index, label_smoothing, z_loss, softcap)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, z_loss, softcap = inputs
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
    ctx.save_for_backward(logits, target, output[1])


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _grad_stats):
        logits, target, stats = ctx.saved_tensors
        dlogits = backward_op(grad_loss.contiguous(), logits, target, stats, *ctx.options)
        return dlogits, None, None, None, None, None

    return backward


if backends.extension() is not None:
    torch.library.register_fake("slmfast::cross_entropy_bwd")(_fake_backward)
    torch.library.register_fake("slmfast::cross_entropy_bwd_")(lambda *args: None)
    torch.library.register_fake("slmfast::cross_entropy_fwd_bwd_")(_fake_forward_backward)
    torch.library.register_fake("slmfast::cross_entropy_fwd")(_fake_forward)
    torch.library.register_autograd("slmfast::cross_entropy_fwd",
                                    _make_backward(torch.ops.slmfast.cross_entropy_bwd),
                                    setup_context=_setup_context)

if backends.triton_version() is not None:
    from slmfast.triton import cross_entropy as _triton_kernels

    @torch.library.custom_op("slmfast_triton::cross_entropy_fwd", mutates_args=())
    def _triton_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                        z_loss: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss,
                                                 softcap)

    @torch.library.custom_op("slmfast_triton::cross_entropy_bwd", mutates_args=())
    def _triton_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                         stats: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                         softcap: float) -> torch.Tensor:
        return _triton_kernels.cross_entropy_bwd(grad_loss, logits, target, stats, ignore_index,
                                                 label_smoothing, z_loss, softcap)

    @torch.library.custom_op("slmfast_triton::cross_entropy_bwd_", mutates_args=("logits",))
    def _triton_backward_inplace(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                                 stats: torch.Tensor, ignore_index: int, label_smoothing: float,
                                 z_loss: float, softcap: float) -> None:
        _triton_kernels.cross_entropy_bwd(grad_loss, logits, target, stats, ignore_index, label_smoothing,
                                          z_loss, softcap, out=logits)

    _triton_forward.register_fake(_fake_forward)
    _triton_backward.register_fake(_fake_backward)
    torch.library.register_autograd("slmfast_triton::cross_entropy_fwd",
                                    _make_backward(torch.ops.slmfast_triton.cross_entropy_bwd),
                                    setup_context=_setup_context)


def _ops(name: str):
    ns = torch.ops.slmfast_triton if name == "triton" else torch.ops.slmfast
    return ns.cross_entropy_fwd, ns.cross_entropy_bwd, ns.cross_entropy_bwd_


class _InplaceBackward(torch.autograd.Function):
    """The same op, with the gradient written over the saved logits in backward. A property of
    the call rather than of the op, so it is an autograd.Function around the registered ops."""

    @staticmethod
    def forward(ctx, logits, target, options, name):
        fwd, _bwd, _bwd_inplace = _ops(name)
        loss, stats = fwd(logits, target, *options)
        ctx.save_for_backward(logits, target, stats)
        ctx.options, ctx.name = options, name
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, target, stats = ctx.saved_tensors
        _fwd, bwd, bwd_inplace = _ops(ctx.name)
        if torch.compiler.is_compiling():
            return bwd(grad_loss.contiguous(), logits, target, stats, *ctx.options), None, None, None
        dlogits = logits.detach()
        bwd_inplace(grad_loss.contiguous(), dlogits, target, stats, *ctx.options)
        # A C++ op's (a!) annotation does not bump the version counter: do it, so that any other
        # node that saved these logits raises instead of reading the gradient.
        torch.autograd.graph.increment_version(dlogits)
        return dlogits, None, None, None


# ---- the public op ------------------------------------------------------------------------

def _check(logits, target, ignore_index, label_smoothing, reduction, z_loss):
    _checks.check_float(OP, "logits", logits)
    _checks.check_tensor(OP, "target", target)
    device = _checks.check_same_device(OP, logits=logits, target=target)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{OP}: logits must have a non-empty last (class) dimension, got shape "
                         f"{tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{OP}: target must have shape {tuple(logits.shape[:-1])} (logits without its class "
                         f"dimension), got {tuple(target.shape)}")
    M.check_reduction(OP, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0:
        raise ValueError(f"{OP}: z_loss must be >= 0, got {z_loss}")
    return device


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                  inplace_backward: bool = False, num_items=None, *, backend: str | None = None):
    """Softmax cross-entropy of logits (..., V) against target (...); see the module docstring."""
    device = _check(logits, target, ignore_index, label_smoothing, reduction, z_loss)
    v = logits.shape[-1]
    z = logits.reshape(-1, v)
    y = M.check_target(OP, target, z.shape[0], v, ignore_index)
    scale = None
    if reduction != "none":
        scale = M.mean_scale(OP, y != ignore_index, y.numel(), reduction, num_items,
                             M.acc_dtype(logits.dtype), device)
    elif num_items is not None:
        raise ValueError(f"{OP}: num_items is the denominator of reduction='mean', got reduction='none'")
    grad = torch.is_grad_enabled() and logits.requires_grad
    # On CUDA tensors the GPU dispatch table decides; where it says native: the "torch" backend.
    kind = (("dtype", logits.dtype), ("grad", grad))
    name = gpu_table.select(OP, IMPLEMENTED, device, backend, kind, False)
    if name == "triton" and logits.dtype == torch.float64:
        name = backends.fallback(OP, name, "float64", IMPLEMENTED, device)
    if name == "torch":
        rows = M.cross_entropy_rows_reference(z, y, ignore_index, label_smoothing, z_loss)
    else:
        z = z if z.stride(-1) == 1 else z.contiguous()
        options = (int(ignore_index), float(label_smoothing), float(z_loss), 0.0)
        if inplace_backward and torch.is_grad_enabled() and z.requires_grad:
            rows, _stats = _InplaceBackward.apply(z, y, options, name)
        else:
            rows, _stats = _ops(name)[0](z, y, *options)
    if reduction == "none":
        return rows.to(logits.dtype).reshape(target.shape)
    return (rows.to(scale.dtype).sum() * scale).to(logits.dtype)
