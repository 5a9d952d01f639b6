"""Chunk loops of the memory-lean losses: logits of a few rows at a time, never (N, V).

For each chunk of rows (tokens) the loops compute logits = h_chunk @ W.T (+ b) with one GEMM,
hand them to a fused row kernel that turns them into the chunk's loss and, in place, the
gradient of the loss with respect to them, and fold that gradient into the parameter gradients
with two more GEMMs:
    grad_hidden[chunk] = dlogits @ W            grad_W += dlogits.T @ h_chunk     grad_b += sum dlogits
So the largest temporary is one chunk of logits, (C, V), and the three GEMMs are the ones an
unfused forward + backward does anyway (this is Liger Kernel's FusedLinearCrossEntropy, computing
the gradients during the forward). The row kernels come from the backend: `torch`
(slmfast/ops/_loss_math.py), `cpu` and `cuda` (torch.ops.slmfast, csrc/), `triton`
(slmfast/triton/). GEMMs run in the input dtype with float32 accumulation inside (torch.mm);
grad_W is summed over chunks in float32 when the weight is bf16/fp16.

Chunk size (default_chunk_size): C = the next power of two >= max(N H / V, H / 4) rows on a GPU;
on the CPU, for float32/64, the largest power of two whose logits take at most 5% of the step's
memory floor (its inputs and their gradients), for bf16/fp16 >= max(4 N H / V, H); clamped to
[64, 8192] and to N (the reasons are in its docstring).
Vocabulary chunking is not done: a row of logits (V floats, 128 KiB at V = 32768) stays in cache
across the row kernel's passes, and splitting V would need an online log-sum-exp across GEMM
calls for no memory gain once C is this small.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from slmfast.ops import _loss_math as M

MIN_CHUNK, MAX_CHUNK = 64, 8192
FLOOR_SLACK = 0.05  # CPU: the share of the memory floor one chunk of logits may take
MIN_CHUNK_CPU_FLOAT = 256  # below this the grad_W traffic costs more than 10% (docstring)


def default_chunk_size(rows: int, hidden: int, vocab: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> int:
    """Rows per chunk.

    On a GPU: C = the next power of two >= max(N H / V, H / 4) (Liger Kernel's N H / V: a chunk of
    logits about the size of the hidden states, but at least H / 4 rows so that at V = 152k the
    float32 grad_W sum, streamed through memory once per chunk, does not outgrow the GEMMs).

    On the CPU with float32/float64 inputs the chunk is sized against the step's memory floor,
    the inputs and their gradients: 2 (N + V) H elements. The chunk's logits (C x V, the same
    dtype) get FLOOR_SLACK of it: C = the largest power of two <= FLOOR_SLACK x 2 (N + V) H / V
    (128 rows at N = 8192, H = 1024, V = 32k; 64 at V = 152k), but at least MIN_CHUNK_CPU_FLOAT =
    256 rows: each chunk streams the grad_W sum through memory once more (N / C x V H x 8 bytes in
    all), and at N = 4096, H = 1024, V = 32k float32 a step took 7.36 s at C = 64, 6.03 s at 128,
    5.65 s at 256 and 4.93 s at 1,024 (the unfused step: 5.2 s), so 256 keeps the step within
    1.1x the unfused time while its logits stay at 32 MiB.
    With bf16/fp16 inputs the float32 grad_W sum (V x H x 4 bytes, twice the gradient) is already
    above that floor, so small chunks would cost time (1.8x at C = 128 against C = 1024, measured
    at N = 8192, H = 1024, V = 32k) for little memory: C = the next power of two
    >= max(4 N H / V, H) there, the GPU rule with the CPU's lower bandwidth per flop.
    Clamped to [64, 8192] and to N."""
    if device is not None and device.type == "cuda":
        base = max(1, -(-rows * hidden // max(vocab, 1)))
        c = _next_pow2(max(base, hidden // 4))
    elif dtype in (torch.bfloat16, torch.float16):
        base = max(1, -(-rows * hidden // max(vocab, 1)))
        c = _next_pow2(max(4 * base, hidden))
    else:
        allowed = FLOOR_SLACK * 2 * (rows + vocab) * hidden / max(vocab, 1)
        c = max(MIN_CHUNK_CPU_FLOAT, 1 << max(int(allowed), 1).bit_length() - 1)  # power of two <= allowed
    return max(1, min(rows, max(MIN_CHUNK, min(MAX_CHUNK, c))))


def _next_pow2(x: int) -> int:
    return 1 << (max(x, 1) - 1).bit_length()


# ---- row kernels per backend ------------------------------------------------------------------

def ce_rows(backend: str, logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """Loss per row (acc dtype); with grad_scale the scaled gradient is written over logits."""
    if backend == "torch":
        return M.ce_rows_torch(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap)[0]
    if backend == "triton":
        from slmfast.triton import cross_entropy as tk
        if grad_scale is None:
            return tk.cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss, softcap)[0]
        return tk.cross_entropy_fwd_bwd_(logits, target, grad_scale, ignore_index, label_smoothing, z_loss,
                                         softcap)[0]
    if grad_scale is None:
        return torch.ops.slmfast.cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss,
                                                   softcap)[0]
    return torch.ops.slmfast.cross_entropy_fwd_bwd_(logits, target, grad_scale, ignore_index, label_smoothing,
                                                    z_loss, softcap)[0]


def distill_rows(backend: str, student, teacher, target, grad_scale, kind, beta, temperature, hard_weight,
                 ignore_index):
    """Loss per row; with grad_scale the scaled gradient is written over student."""
    args = (kind, beta, temperature, hard_weight, ignore_index)
    if backend == "torch":
        return M.distill_rows_torch(student, teacher, target, grad_scale, *args)
    if backend == "triton":
        from slmfast.triton import distill as tk
        if grad_scale is None:
            return tk.distill_fwd(student, teacher, target, *args)[0]
        return tk.distill_fwd_bwd_(student, teacher, target, grad_scale, *args)
    if grad_scale is None:
        return torch.ops.slmfast.distill_fwd(student, teacher, target, *args)[0]
    return torch.ops.slmfast.distill_fwd_bwd_(student, teacher, target, grad_scale, *args)


# ---- the loop ---------------------------------------------------------------------------------

class GradAccumulator:
    """grad_hidden, grad_W and grad_b of logits = hidden @ weight[:V].T + bias[:V], from the
    gradient of one chunk of logits at a time. Rows of weight beyond V (vocabulary padding) get 0.

    grad_W is summed over chunks in float32 (float64 for fp64). For a float32/64 weight that is an
    addmm_ into the result. For bf16/fp16: on the CPU, torch.ops.slmfast.loss_grad_weight_acc_
    (csrc/cpu/loss_gemm.cpp) accumulates the chunk's product straight into a transposed float32
    buffer (H, V) with brgemm; elsewhere each chunk's product is taken in the weight's dtype and
    added to a float32 buffer (on a GPU that add is a small fraction of the GEMM)."""

    def __init__(self, hidden, weight, bias, vocab, need_hidden, need_weight, need_bias):
        acc = M.acc_dtype(weight.dtype)
        self.hidden, self.weight, self.vocab = hidden, weight, vocab
        self.gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
        self.gw = self.gw_t = self.tmp = None
        if need_weight:
            if weight.dtype == acc:
                self.gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            elif weight.device.type == "cpu" and _has_cpu_op():
                shape_t = (weight.shape[1], weight.shape[0])  # (H, V of the weight)
                self.gw_t = torch.zeros(shape_t, dtype=torch.float32, device=weight.device)
            else:
                self.gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                self.tmp = torch.empty((vocab, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        self.gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None

    def add(self, c0: int, c1: int, dlogits: torch.Tensor) -> None:
        v = self.vocab
        h = self.hidden[c0:c1]  # (C, H)
        if self.gh.numel():
            torch.mm(dlogits, self.weight[:v], out=self.gh[c0:c1])  # (C, H)
        if self.gw_t is not None:
            torch.ops.slmfast.loss_grad_weight_acc_(self.gw_t[:, :v], dlogits, h)  # (H, V) += h^T dlogits
        elif self.tmp is not None:
            torch.mm(dlogits.t(), h, out=self.tmp)  # (V, H) in the weight's dtype
            self.gw[:v].add_(self.tmp)
        elif self.gw is not None:
            self.gw[:v].addmm_(dlogits.t(), h)  # (V, H)
        if self.gb is not None:
            self.gb[:v].add_(dlogits.sum(0, dtype=self.gb.dtype))

    def result(self):
        # (distinct empty tensors: a custom op's outputs must not alias each other)
        if self.gw_t is not None:
            gw = torch.empty(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)
            gw.copy_(self.gw_t.t())
            self.gw_t = None
        else:
            gw = self.gw.to(self.weight.dtype) if self.gw is not None else self.weight.new_empty(0)
        gb = self.gb.to(self.weight.dtype) if self.gb is not None else self.weight.new_empty(0)
        return self.gh, gw, gb


def _has_cpu_op() -> bool:
    from slmfast import backends
    return backends.extension() is not None and hasattr(torch.ops.slmfast, "loss_grad_weight_acc_")


def logits_of(hidden, weight, bias, vocab):
    """(C, V) = hidden @ weight[:V].T + bias[:V], one GEMM in the inputs' dtype."""
    w = weight[:vocab]
    if bias is None:
        return torch.mm(hidden, w.t())
    return torch.addmm(bias[:vocab], hidden, w.t())


def chunked(rows_fn, hidden, weight, bias, vocab, chunk_size, grad_scale, need):
    """Run rows_fn(c0, c1, logits, grad_scale_chunk) -> loss rows over chunks of hidden; when
    grad_scale is not None, rows_fn leaves the gradient in logits and the parameter gradients are
    accumulated. Returns (loss rows (N,) acc dtype, grad_hidden, grad_weight, grad_bias), the
    unneeded gradients as empty tensors. need = (hidden, weight, bias) flags."""
    n = hidden.shape[0]
    acc = M.acc_dtype(hidden.dtype)
    loss = torch.empty(n, dtype=acc, device=hidden.device)
    grads = GradAccumulator(hidden, weight, bias, vocab, *need) if grad_scale is not None else None
    # (meta tensors have no autocast; slmfast.recompute's tracker runs this loop on them to count its chunks)
    meta = hidden.device.type == "meta"
    with nullcontext() if meta else torch.autocast(hidden.device.type, enabled=False):
        for c0 in range(0, n, chunk_size):
            c1 = min(n, c0 + chunk_size)
            logits = logits_of(hidden[c0:c1], weight, bias, vocab)  # (C, V)
            scale = None
            if grad_scale is not None:
                scale = grad_scale if grad_scale.numel() == 1 else grad_scale[c0:c1]
            loss[c0:c1] = rows_fn(c0, c1, logits, scale)
            if grads is not None:
                grads.add(c0, c1, logits)
            del logits
    if grads is None:
        return loss, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    return (loss, *grads.result())


def _concrete(t: torch.Tensor) -> bool:
    """Whether t holds real data (not traced by torch.compile / AOTAutograd, not fake or meta)."""
    from torch._subclasses.fake_tensor import is_fake
    return not torch.compiler.is_compiling() and t.device.type != "meta" and not is_fake(t)


def scale_saved_grads(saved, grad_loss):
    """Backward of the ops that compute their gradients in the forward: the saved gradients times
    the incoming gradient of the (scalar) loss. When that is exactly 1 (loss.backward() without
    loss scaling) the saved tensors are returned as they are: no arithmetic, and autograd takes
    them over without a copy once the graph releases them. Otherwise (and under torch.compile)
    a new product, so that a retained graph can run backward again. On the meta device, which
    has no values to scale, the saved tensors are returned too: the memory a meta run predicts
    (slmfast memory) is then that of the common loss.backward(). Empty tensors: None."""
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized): none flows on
        return [None] * len(saved)
    one = grad_loss.device.type == "meta" or (_concrete(grad_loss) and bool(grad_loss == 1))
    return [None if g.numel() == 0 else (g if one else g * grad_loss.to(g.dtype)) for g in saved]
