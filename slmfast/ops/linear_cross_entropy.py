"""linear_cross_entropy: cross-entropy of an LM head, without the (N, V) logits — contract,
reference, autograd, dispatch.

Computes exactly F.cross_entropy(hidden @ weight.T + bias, target, ignore_index=...,
label_smoothing=..., reduction=...), with an optional Gemma 2 logit softcap
(logits = softcap * tanh(logits / softcap)), and its gradients with respect to hidden, weight
and bias, chunk by chunk over the N tokens (slmfast/ops/_loss_chunks.py): the largest temporary
is one chunk of logits, (C, V) in the input dtype, instead of the unfused computation's logits,
their float32 copy, the saved log-softmax and the logits' gradient, each (N, V).

Shapes: hidden (..., H), weight (V, H), bias (V,) or None, target (...) with values in [0, V) or
ignore_index. hidden, weight and bias share a dtype (float32, bfloat16, float16, float64); a
float32 weight with bf16/fp16 hidden is cast to the hidden dtype (as F.linear under autocast);
under autocast both are cast to the autocast dtype. GEMMs in that dtype, softmax and loss in
float32 (float64 for fp64); grad_W summed in float32 (over chunks, or inside one GEMM per vocabulary
tile for bf16/fp16 on the CPU). The loss has hidden's dtype.
Token normalization and num_items: as slmfast.ops.cross_entropy ("mean" divides by the number of
non-ignored tokens or by num_items; an all-ignored batch gives 0).

Two ways to the gradients, chosen per call:
* reduction "mean"/"sum" with gradients needed (training): the gradients are computed during the
  forward (as Liger Kernel's FusedLinearCrossEntropy does) and scaled by the incoming gradient in
  backward: 3 GEMMs in all, the unfused count. Saved for backward: grad_hidden (N x H, hidden's
  dtype) and grad_weight (V x H, weight's dtype) and grad_bias (V), i.e. exactly the bytes of the
  gradients the backward returns, nothing of size N x V. Transient, during the forward: one chunk
  of logits (C x V, input dtype) and, for bf16/fp16 weights on a GPU, the float32 grad_W sum
  (V x H x 4). When the incoming gradient is exactly 1 the saved gradients are handed over
  without a copy.
  bf16/fp16 on the CPU take two passes instead (_loss_chunks.first_pass / second_pass; 4 GEMMs),
  which never hold a float32 V x H buffer: the forward (pass 1) computes the loss, grad_hidden and
  each row's softmax stats (m, r); the backward (pass 2) rebuilds the weight's gradient one
  vocabulary tile at a time from those stats, times the incoming gradient. Saved for backward:
  hidden, weight, bias and target (the inputs), grad_hidden (N x H) and 2 floats per token; the
  weight's gradient exists only from the backward on. Transient: one chunk of logits or one
  (N, Vt) tile, each <= 5% of the inputs and their gradients.
* reduction "none" (per-token losses, any incoming gradient) or no gradients: the forward keeps
  only the per-row losses; the backward recomputes each chunk's logits (4 GEMMs; 5 for bf16/fp16
  on the CPU). Saved: the inputs (hidden, weight, bias, target: alive anyway) and nothing else.

Backends of the row kernel (the GEMMs are torch.mm on every backend): cuda, triton, cpu, torch.
"""

from __future__ import annotations

import torch

from slmfast import backends, gpu_table
from slmfast.ops import _amp, _checks
from slmfast.ops import _loss_chunks as C
from slmfast.ops import _loss_math as M

OP = "linear_cross_entropy"
IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def linear_cross_entropy_reference(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
                                   reduction="mean", softcap=None, num_items=None):
    """Unfused: logits = hidden @ weight.T + bias, then F.cross_entropy (autograd)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    y = target.reshape(-1)
    rows = M.cross_entropy_rows_reference(logits, y, ignore_index, label_smoothing, 0.0, softcap)
    if reduction == "none":
        return rows.reshape(target.shape)
    scale = M.mean_scale(OP, y != ignore_index, y.numel(), reduction, num_items, M.acc_dtype(hidden.dtype),
                         hidden.device)
    return (rows.sum() * scale).to(hidden.dtype)


# ---- custom ops: the chunk loops ------------------------------------------------------------

def _rows_fn(backend, target, ignore_index, label_smoothing, softcap, with_stats=False):
    def rows(c0, c1, logits, scale):
        return C.ce_rows(backend, logits, target[c0:c1], scale, ignore_index, label_smoothing, 0.0, softcap,
                         with_stats)
    return rows


def _tile_grad_fn(backend, target, vocab, ignore_index, label_smoothing, softcap):
    def tile_grad(c0, c1, v0, logits, stats, tile_scale):
        return C.ce_tile_grad(backend, logits, target[c0:c1], stats, tile_scale, v0, vocab, ignore_index,
                              label_smoothing, 0.0, softcap)
    return tile_grad


def _two_pass_sizes(backend, hidden, weight, chunk_size):
    return C.two_pass_sizes(hidden.shape[0], hidden.shape[1], weight.shape[0], chunk_size, backend == "torch")


def _loss_and_grads(backend, hidden, weight, bias, target, scale, ignore_index, label_smoothing, softcap,
                    chunk_size, need):
    """(loss rows, grad_hidden, grad_weight, grad_bias) of sum_i scale_i loss_i in one call (the
    backward of reduction="none"): one pass over the tokens (C.chunked), or for bf16/fp16 on the
    CPU both passes of C.two_pass, the weight gradient rebuilt tile by tile (C.ce_tile_grad)."""
    vocab = weight.shape[0]
    if not C.uses_two_pass(hidden.device, hidden.dtype):
        return C.chunked(_rows_fn(backend, target, ignore_index, label_smoothing, softcap), hidden, weight,
                         bias, vocab, chunk_size, scale, need)
    return C.two_pass(_rows_fn(backend, target, ignore_index, label_smoothing, softcap, True),
                      _tile_grad_fn(backend, target, vocab, ignore_index, label_smoothing, softcap), hidden,
                      weight, bias, vocab, _two_pass_sizes(backend, hidden, weight, chunk_size), scale, need)


@torch.library.custom_op("slmfast_loss::linear_cross_entropy_fused", mutates_args=())
def _fused(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
           scale: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float, chunk_size: int,
           grad_hidden: bool, grad_weight: bool, grad_bias: bool,
           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale * sum of row losses, and its gradients (empty where not asked), in one pass."""
    rows, gh, gw, gb = C.chunked(_rows_fn(backend, target, ignore_index, label_smoothing, softcap), hidden,
                                 weight, bias, weight.shape[0], chunk_size, scale,
                                 (grad_hidden, grad_weight, grad_bias))
    return rows.sum() * scale, gh, gw, gb


@_fused.register_fake
def _(hidden, weight, bias, target, scale, ignore_index, label_smoothing, softcap, chunk_size, grad_hidden,
      grad_weight, grad_bias, backend):
    empty = hidden.new_empty(0)
    return (scale.new_empty(()), torch.empty_like(hidden) if grad_hidden else empty,
            torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if grad_bias else weight.new_empty(0))


def _fused_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:])
    # The gradient outputs get no incoming gradient; without this autograd would fill one with
    # zeros of their size (N x H + V x H) during backward, a second copy of the gradients.
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, _gh, _gw, _gb):
    gh, gw, gb = C.scale_saved_grads(ctx.saved_tensors, grad_loss)
    return gh, gw, gb if ctx.has_bias else None, None, None, None, None, None, None, None, None, None, None


_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op("slmfast_loss::linear_cross_entropy_first_pass", mutates_args=())
def _first_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                scale: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                chunk_size: int, grad_hidden: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two passes, forward: scale * sum of row losses, grad_hidden (empty when not asked) and
    each row's softmax stats (N, 2); the weight's gradient waits for the backward (_second_pass)."""
    rows, gh, stats = C.first_pass(_rows_fn(backend, target, ignore_index, label_smoothing, softcap, True),
                                   hidden, weight, bias, weight.shape[0], chunk_size, scale, grad_hidden)
    return rows.sum() * scale, gh, stats


@_first_pass.register_fake
def _(hidden, weight, bias, target, scale, ignore_index, label_smoothing, softcap, chunk_size, grad_hidden,
      backend):
    return (scale.new_empty(()), torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            hidden.new_empty((hidden.shape[0], 2), dtype=torch.float32))


@torch.library.custom_op("slmfast_loss::linear_cross_entropy_second_pass", mutates_args=())
def _second_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                 stats: torch.Tensor, grad_scale: torch.Tensor, ignore_index: int, label_smoothing: float,
                 softcap: float, chunk_size: int, grad_weight: bool, grad_bias: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two passes, backward: grad_weight and grad_bias of grad_scale * sum of row losses, one
    vocabulary tile at a time, from the first pass's stats."""
    tile_grad = _tile_grad_fn(backend, target, weight.shape[0], ignore_index, label_smoothing, softcap)
    return C.second_pass(tile_grad, hidden, weight, bias, weight.shape[0],
                         _two_pass_sizes(backend, hidden, weight, chunk_size), stats, grad_scale, grad_weight,
                         grad_bias)


@_second_pass.register_fake
def _(hidden, weight, bias, target, stats, grad_scale, ignore_index, label_smoothing, softcap, chunk_size,
      grad_weight, grad_bias, backend):
    return (torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if grad_bias else weight.new_empty(0))


def _first_pass_setup(ctx, inputs, output):
    hidden, weight, bias, target, scale, *options = inputs
    ctx.options = tuple(options[:4])  # ignore_index, label_smoothing, softcap, chunk_size
    ctx.backend = options[-1]
    ctx.needs = (ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
    ctx.save_for_backward(hidden, weight, bias, target, scale, output[1], output[2])
    ctx.set_materialize_grads(False)  # (as _fused_setup: no zeros for grad_hidden's and stats' gradients)


def _first_pass_backward(ctx, grad_loss, _gh, _stats):
    hidden, weight, bias, target, scale, gh, stats = ctx.saved_tensors
    none = [None] * 8
    if grad_loss is None:
        return (None, None, None, *none)
    gh, = C.scale_saved_grads([gh], grad_loss)
    gw = gb = None
    if any(ctx.needs):
        gw, gb = torch.ops.slmfast_loss.linear_cross_entropy_second_pass(
            hidden, weight, bias, target, stats, scale * grad_loss.to(scale.dtype), *ctx.options, *ctx.needs,
            ctx.backend)
    return (gh, gw if ctx.needs[0] else None, gb if ctx.needs[1] else None, *none)


_first_pass.register_autograd(_first_pass_backward, setup_context=_first_pass_setup)


@torch.library.custom_op("slmfast_loss::linear_cross_entropy_rows", mutates_args=())
def _rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
          ignore_index: int, label_smoothing: float, softcap: float, chunk_size: int,
          backend: str) -> torch.Tensor:
    """Per-row losses (acc dtype), no gradient."""
    return C.chunked(_rows_fn(backend, target, ignore_index, label_smoothing, softcap), hidden, weight, bias,
                     weight.shape[0], chunk_size, None, (False, False, False))[0]


@_rows.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, softcap, chunk_size, backend):
    return hidden.new_empty(hidden.shape[0], dtype=M.acc_dtype(hidden.dtype))


@torch.library.custom_op("slmfast_loss::linear_cross_entropy_rows_bwd", mutates_args=())
def _rows_bwd(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              target: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
              chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows[i] * loss_i, recomputing each chunk's logits."""
    _, gh, gw, gb = _loss_and_grads(backend, hidden, weight, bias, target, grad_rows.contiguous(),
                                    ignore_index, label_smoothing, softcap, chunk_size,
                                    (grad_hidden, grad_weight, grad_bias))
    return gh, gw, gb


@_rows_bwd.register_fake
def _(grad_rows, hidden, weight, bias, target, ignore_index, label_smoothing, softcap, chunk_size,
      grad_hidden, grad_weight, grad_bias, backend):
    return (torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if grad_bias else weight.new_empty(0))


def _rows_setup(ctx, inputs, output):
    hidden, weight, bias, target, *options = inputs
    ctx.options = tuple(options)
    need = ctx.needs_input_grad
    ctx.needs = (need[0], need[1], bias is not None and need[2])
    ctx.save_for_backward(hidden, weight, bias, target)


def _rows_backward(ctx, grad_rows):
    hidden, weight, bias, target = ctx.saved_tensors
    *options, backend = ctx.options
    gh, gw, gb = torch.ops.slmfast_loss.linear_cross_entropy_rows_bwd(
        grad_rows.to(M.acc_dtype(hidden.dtype)), hidden, weight, bias, target, *options, *ctx.needs, backend)
    return (gh if ctx.needs[0] else None, gw if ctx.needs[1] else None, gb if ctx.needs[2] else None,
            None, None, None, None, None, None)


_rows.register_autograd(_rows_backward, setup_context=_rows_setup)


# ---- the public op ------------------------------------------------------------------------

def prepare_linear(op: str, hidden, weight, bias, name="hidden", weight_name="weight", bias_name="bias"):
    """Flattens hidden to (N, H) and brings weight/bias to hidden's dtype (autocast's, under autocast)."""
    _checks.check_float(op, name, hidden)
    _checks.check_float(op, weight_name, weight)
    _checks.check_same_device(op, **{name: hidden, weight_name: weight, bias_name: bias})
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: {weight_name} must be 2-D (vocabulary, hidden), got shape "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: {name} has hidden size {hidden.shape[-1]} but {weight_name} has shape "
                         f"{tuple(weight.shape)} (expected (V, {hidden.shape[-1]}))")
    if bias is not None:
        _checks.check_float(op, bias_name, bias)
        _checks.check_shape(op, bias_name, bias, (weight.shape[0],), f"one per row of {weight_name}")
    autocast_dtype = _amp.linear_dtype(hidden)
    if autocast_dtype is not None and hidden.dtype != torch.float64:
        hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
    elif weight.dtype != hidden.dtype:
        _checks.check_param_dtype(op, weight_name, weight, name, hidden)
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    return h if h.is_contiguous() else h.contiguous(), weight.contiguous(), (
        bias.contiguous() if bias is not None else None)


def loss_dtype(hidden: torch.Tensor, prepared: torch.Tensor) -> torch.dtype:
    """The dtype of a loss on `hidden`: float32 under autocast (as F.cross_entropy's is: a bf16
    loss of ~6 would carry 0.03 of rounding), else the inputs' dtype."""
    if _amp.linear_dtype(hidden) is not None and hidden.dtype != torch.float64:
        return torch.float32
    return prepared.dtype


def select_backend(op: str, implemented, device, dtype, backend, grad: bool = False,
                   table_op: str | None = None):
    """The row kernels' backend. On CUDA tensors the GPU dispatch table decides (rows of `table_op`,
    default `op`); where it says native: the "torch" backend (plain-PyTorch row math)."""
    kind = (("dtype", dtype), ("grad", bool(grad)))
    name = gpu_table.select(op, implemented, device, backend, kind, False, table_op)
    if name == "triton" and dtype == torch.float64:
        name = backends.fallback(op, name, "float64", implemented, device)
    return name


def needs_grad(*tensors) -> tuple[bool, ...]:
    grad = torch.is_grad_enabled()
    return tuple(grad and t is not None and t.requires_grad for t in tensors)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
                         chunk_size: int | None = None, num_items=None, *, backend: str | None = None):
    """F.cross_entropy(hidden @ weight.T + bias, target) chunk by chunk; see the module docstring."""
    _checks.check_tensor(OP, "target", target)
    M.check_reduction(OP, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{OP}: softcap must be > 0 or None, got {softcap}")
    if chunk_size is not None and int(chunk_size) < 0:
        raise ValueError(f"{OP}: chunk_size must be >= 1 (or None / 0: the default), got {chunk_size}")
    need = needs_grad(hidden, weight, bias)
    h, w, b = prepare_linear(OP, hidden, weight, bias)
    _checks.check_same_device(OP, hidden=hidden, target=target)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{OP}: target must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dimension), got {tuple(target.shape)}")
    n, vocab = h.shape[0], w.shape[0]
    y = M.check_target(OP, target, n, vocab, ignore_index)
    if chunk_size:
        chunk = int(chunk_size)
    elif C.uses_two_pass(h.device, h.dtype):
        chunk = C.two_pass_sizes(n, h.shape[1], vocab)[0]
    else:
        chunk = C.default_chunk_size(n, h.shape[1], vocab, h.device, h.dtype)
    name = select_backend(OP, IMPLEMENTED, h.device, h.dtype, backend, any(need))
    cap = float(softcap) if softcap else 0.0
    acc = M.acc_dtype(h.dtype)
    options = (int(ignore_index), float(label_smoothing), cap, chunk)
    if reduction == "none":
        if num_items is not None:
            raise ValueError(f"{OP}: num_items is the denominator of reduction='mean', got reduction='none'")
        rows = torch.ops.slmfast_loss.linear_cross_entropy_rows(h, w, b, y, *options, name)
        return rows.to(loss_dtype(hidden, h)).reshape(target.shape)
    scale = M.mean_scale(OP, y != ignore_index, n, reduction, num_items, acc, h.device)
    ops = torch.ops.slmfast_loss
    if not any(need):
        loss = ops.linear_cross_entropy_rows(h, w, b, y, *options, name).sum() * scale
    elif C.uses_two_pass(h.device, h.dtype):
        loss, *_ = ops.linear_cross_entropy_first_pass(h, w, b, y, scale, *options, need[0], name)
    else:
        loss, *_ = ops.linear_cross_entropy_fused(h, w, b, y, scale, *options, *need, name)
    return loss.to(loss_dtype(hidden, h))
