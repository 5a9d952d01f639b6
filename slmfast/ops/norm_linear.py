"""rms_norm_linear: RMSNorm fused into the projections that read it; the normalized activation is
never stored — contract, reference, autograd.

In a pre-norm block the normalized activation y = RMSNorm(h) feeds the q/k/v (or gate/up)
projections, and eager PyTorch keeps y alive for their weight gradients dW_i = dout_i^T y, next to
h, which the norm keeps for its own backward. This layer saves only h and one rstd per row; the
backward recomputes y = h * rstd * (offset + w) with one pass of the rms_norm kernel and then:
    dy = sum_i dout_i W_i;  dW_i = dout_i^T y;  db_i = sum_rows(dout_i);  (dx, dw) = rms_norm_bwd(dy)
This is selective recomputation at kernel level (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"): recompute what is cheap (one elementwise pass over a
row held in cache) and keep what is expensive (the matmul outputs).

    outs = rms_norm_linear(x, norm_weight, [W_q, W_k, W_v], biases=None, eps, residual=None, offset=0.0)
returns (x_norm @ W_q^T + b_q, ...) — one output per weight — and, when `residual` is given, the
residual stream h = x + residual as one more, last, element (the norm's residual add is fused too).

Shapes: x, residual (..., H); norm_weight (H,); weights[i] (out_i, H) in x's dtype (or the
autocast dtype under torch.autocast), biases[i] (out_i,) or None. Dtypes as rms_norm.

Bytes saved for backward, per token per layer (e = bytes per element of x, H hidden size):
    rms_norm_linear:  H * e (h, or x without a residual) + 4 (rstd)
    eager RMSNorm -> Linear(s): at least 2 * H * e (x and y; HF's LlamaRMSNorm also keeps its
                      float32 temporaries, x * rstd in float32 and, for bf16/fp16 x, x in float32)
plus the parameters, which both keep. The difference, H * e per token and norm, is the normalized
activation.

Backends: those of rms_norm (cuda, triton, cpu, torch) for the norm; the projections are matmuls
(torch.matmul / F.linear) on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmfast.ops import _amp, _checks
from slmfast.ops import rms_norm as _rms

OP = "rms_norm_linear"


class _RmsNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, norm_weight, eps, offset, backend, num_weights, *params):
        weights, biases = params[:num_weights], params[num_weights:]
        forward, _ = _rms.kernels(backend)
        y, h, rstd = forward(x, norm_weight, residual, eps, offset)
        stream = h if residual is not None else x
        dtype = _amp.linear_dtype(y)
        y = _amp.cast(y, dtype)
        outs = [F.linear(y, _amp.cast(w, dtype), _amp.cast(b, dtype)) for w, b in zip(weights, biases)]
        # y is not saved (the whole point): it is freed when forward returns.
        ctx.save_for_backward(stream, norm_weight, rstd, *weights)
        ctx.eps, ctx.offset, ctx.backend, ctx.dtype = eps, offset, backend, dtype
        ctx.has_residual = residual is not None
        ctx.has_bias = [b is not None for b in biases]
        if residual is not None:
            return (*outs, h)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        stream, norm_weight, rstd, *weights = ctx.saved_tensors
        forward, backward = _rms.kernels(ctx.backend)
        n = len(weights)
        douts, dh = grads[:n], (grads[n] if ctx.has_residual else None)
        # Recompute y from the stream and rstd (the same kernel as the forward: the same bits).
        y, _, _ = forward(stream, norm_weight, None, ctx.eps, ctx.offset)
        hidden = stream.shape[-1]
        y2 = _amp.cast(y.reshape(-1, hidden), ctx.dtype)  # (N, H)
        dy = None
        dweights, dbiases = [], []
        for w, dout, has_bias in zip(weights, douts, ctx.has_bias):
            if dout is None:
                dweights.append(None)
                dbiases.append(None)
                continue
            d2 = dout.reshape(-1, dout.shape[-1])  # (N, out_i)
            w_c = _amp.cast(w, ctx.dtype)
            dy = d2 @ w_c if dy is None else dy.addmm_(d2, w_c)  # (N, H)
            dweights.append((d2.t() @ y2).to(w.dtype) if ctx.needs_input_grad[7 + len(dweights)] else None)
            dbiases.append(d2.sum(0) if has_bias else None)
        del y, y2
        if dy is None:
            dy = torch.zeros_like(stream)
        dy = dy.reshape(stream.shape).to(stream.dtype).contiguous()
        dh = dh.contiguous() if dh is not None else None
        dx, dnorm_weight = backward(dy, dh, stream, norm_weight, rstd, ctx.offset)
        dbiases = [db.to(w.dtype) if db is not None else None for db, w in zip(dbiases, weights)]
        return (dx, dx if ctx.has_residual else None, dnorm_weight, None, None, None, None,
                *dweights, *dbiases)


def rms_norm_linear_reference(x, norm_weight, weights, biases=None, eps=1e-6, residual=None, offset=0.0):
    """Plain PyTorch (rms_norm_reference, then F.linear): the oracle of the tests in float64."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    out = _rms.rms_norm_reference(x, norm_weight, eps, residual, offset)
    y, h = out if residual is not None else (out, None)
    outs = tuple(F.linear(y, w, b) for w, b in zip(weights, biases))
    return (*outs, h) if residual is not None else outs


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, weights, biases=None, eps: float = 1e-6,
                    residual: torch.Tensor | None = None, offset: float = 0.0, *,
                    backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """(F.linear(rms_norm(x), W_i, b_i) for each i) [+ (h,) with a residual]; see the module docstring."""
    x, residual = _amp.promote_residual(x, residual)
    device = _rms.check_inputs(x, norm_weight, residual, eps, op=OP)
    weights = list(weights)
    if not weights:
        raise ValueError(f"{OP}: weights must hold at least one (out, H) tensor, got none")
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"{OP}: biases must have one entry per weight ({len(weights)}), got {len(biases)}")
    hidden = x.shape[-1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        _checks.check_tensor(OP, f"weights[{i}]", w)
        _checks.check_same_device(OP, x=x, **{f"weights[{i}]": w})
        if w.dim() != 2 or w.shape[1] != hidden:
            raise ValueError(f"{OP}: weights[{i}] must have shape (out, {hidden}) to read x's last "
                             f"dimension, got {tuple(w.shape)}")
        if _amp.linear_dtype(x) is None:
            _checks.check_same_dtype(OP, f"weights[{i}]", w, "x", x)
        if b is not None:
            _checks.check_tensor(OP, f"biases[{i}]", b)
            _checks.check_shape(OP, f"biases[{i}]", b, (w.shape[0],), f"the rows of weights[{i}]")
            _checks.check_same_dtype(OP, f"biases[{i}]", b, f"weights[{i}]", w)
    grad = _rms.needs_grad(x, norm_weight, residual, *weights, *biases)
    name = _rms.select_backend(x, device, backend, op=OP, grad=grad)  # "torch" where the table says native
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    return _RmsNormLinear.apply(x, residual, norm_weight.contiguous(), float(eps), float(offset), name,
                                len(weights), *weights, *biases)
