"""Chunk loops of the memory-lean losses: logits of a few rows at a time, never (N, V).

One pass (chunked; float32/64 everywhere, every dtype on a GPU, and sampled_distill_loss):
for each chunk of rows (tokens) the loop computes logits = h_chunk @ W.T (+ b) with one GEMM,
hands them to a fused row kernel that turns them into the chunk's loss and, in place, the
gradient of the loss with respect to them, and folds that gradient into the parameter gradients
with two more GEMMs:
    grad_hidden[chunk] = dlogits @ W            grad_W += dlogits.T @ h_chunk     grad_b += sum dlogits
So the largest temporary is one chunk of logits, (C, V), and the three GEMMs are the ones an
unfused forward + backward does anyway (this is Liger Kernel's FusedLinearCrossEntropy, computing
the gradients during the forward). The row kernels come from the backend: `torch`
(slmfast/ops/_loss_math.py), `cpu` and `cuda` (torch.ops.slmfast, csrc/), `triton`
(slmfast/triton/). GEMMs run in the input dtype with float32 accumulation inside (torch.mm);
grad_W is summed over chunks in float32 when the weight is bf16/fp16, a V x H float32 buffer:
twice the gradient.

Two passes (first_pass, then second_pass, or both in two_pass; linear_cross_entropy,
distill_loss and topk_distill_loss with bf16/fp16 weights on the CPU, linear_cross_entropy's
forward running pass 1 and its backward pass 2), which never hold that buffer (the idea of
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models": the weight gradient
accumulated in float32 one vocabulary tile at a time and written once):
  pass 1, chunks of C tokens: logits, the row kernel's loss and in-place dlogits, grad_hidden[chunk]
          = dlogits @ W, and each row's statistics: (m, r), lse = m + r for cross-entropy (N x 2
          floats; the distillation losses keep theirs, slmfast/ops/distill_loss.py);
  pass 2, tiles of Vt rows of W: the tile's logits for Ct tokens at a time (Ct = N where the
          memory allows it), their gradient rebuilt from (m, r), the target and the options
          (ce_tile_grad: the row kernel's backward on the tile, one element per row fixed up),
          grad_W[tile] = dlogits^T h (one GEMM with float32 accumulation inside, or a float32
          (H, Vt) sum over the Ct chunks) written once in the weight's dtype, grad_b likewise.
Four GEMMs instead of three; no V x H float32 tensor at any point.

Chunk sizes. One pass (default_chunk_size): C = the next power of two >= max(N H / V, H / 4) rows
on a GPU; on the CPU, for float32/64, the largest power of two whose logits take at most 5% of
the step's memory floor (its inputs and their gradients), for bf16/fp16 >= max(4 N H / V, H);
clamped to [64, 8192] and to N (the reasons are in its docstring). Two passes (two_pass_sizes):
C's logits and pass 2's (Ct, Vt) tile each at most 5% of the floor.
The one-pass loop does not chunk the vocabulary: a row of logits (V floats, 128 KiB at V = 32768)
stays in cache across the row kernel's passes, and splitting V would need an online log-sum-exp
across GEMM calls for no memory gain once C is this small; two_pass takes the log-sum-exp from
pass 1 instead.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from slmfast.ops import _loss_math as M

MIN_CHUNK, MAX_CHUNK = 64, 8192
FLOOR_SLACK = 0.05  # CPU: the share of the memory floor one chunk of logits may take
MIN_CHUNK_CPU_FLOAT = 256  # below this the grad_W traffic costs more than 10% (docstring)
TILE_SLACK = 0.05  # two_pass: the share of the floor pass 2's tile of logits may take (two_pass_sizes)
MIN_VOCAB_TILE, MAX_VOCAB_TILE = 64, 4096


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
    1.1x the unfused time while its logits stay at 32 MiB. That minimum never takes the logits
    above twice FLOOR_SLACK (at N = 8192, H = 1024, V = 128k or 152k, 256 rows would be 12% of
    the floor and the step 1.13x it; 128 rows are 6%).
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
        c = min(max(MIN_CHUNK_CPU_FLOAT, _pow2_floor(allowed)), _pow2_floor(2 * allowed))
    return max(1, min(rows, max(MIN_CHUNK, min(MAX_CHUNK, c))))


def uses_two_pass(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the cross-entropy loops take the two-pass path (bf16/fp16 on the CPU; on the meta
    device too, so that slmfast.recompute's memory count of a CPU model matches its run)."""
    return device.type in ("cpu", "meta") and dtype in (torch.bfloat16, torch.float16)


def two_pass_sizes(rows: int, hidden: int, vocab: int, chunk_size: int | None = None,
                   float_temporaries: bool = False) -> tuple[int, int, int, int]:
    """(C, Ct, Vt, R) of two_pass: pass 1's token chunk; pass 2's token chunk, vocabulary tile and
    rows per call of the tile gradient.

    Each is sized against the memory floor F = 2 (N + V) H elements (the inputs and their
    gradients, all 16-bit here). Pass 1's logits (C x V, 16-bit) get FLOOR_SLACK of it: C = the
    largest power of two <= FLOOR_SLACK F / V (128 rows at N = 8192, H = 1024, V = 32k), or
    chunk_size when given. Pass 2's tile of logits (Ct x Vt, 16-bit) gets TILE_SLACK of F. All N
    tokens in one chunk where that leaves a tile of at least MIN_VOCAB_TILE columns: Vt = the
    largest power of two <= TILE_SLACK F / N (512 at N = 8192, H = 1024, V = 32k; 2048 at H =
    2048, V = 128k), Ct = N, and the tile's weight gradient is one GEMM. Otherwise (N much larger
    than V) Vt = MIN_VOCAB_TILE, Ct = the largest power of two <= TILE_SLACK F / Vt, and the
    tile's gradient is summed over chunks in float32 (another H x Vt x 4 bytes). The row kernels
    rebuild the tile's gradient in place (R = Ct); with float_temporaries (the torch backend's
    tile gradient holds float32 copies of its rows) R = the largest power of two <= TILE_SLACK
    F / (4 Vt), so that those get as much again. Vt at most MAX_VOCAB_TILE; C, Ct and R clamped to
    [MIN_CHUNK, MAX_CHUNK] and N (Ct = N exempt from MAX_CHUNK), R to Ct."""
    budget = TILE_SLACK * 2 * (rows + vocab) * hidden
    c = int(chunk_size) if chunk_size else _clamp_rows(_pow2_floor(FLOOR_SLACK * 2 * (rows + vocab) * hidden
                                                                   / max(vocab, 1)), rows)
    vt = min(MAX_VOCAB_TILE, _pow2_floor(budget / max(rows, 1)))
    if vt >= MIN_VOCAB_TILE:
        ct = max(rows, 1)
    else:
        vt = MIN_VOCAB_TILE
        ct = _clamp_rows(_pow2_floor(budget / vt), rows)
    return c, ct, vt, (_clamp_rows(_pow2_floor(budget / (4 * vt)), ct) if float_temporaries else ct)


def _clamp_rows(c: int, rows: int) -> int:
    return max(1, min(rows, max(MIN_CHUNK, min(MAX_CHUNK, c))))


def _pow2_floor(x: float) -> int:
    return 1 << max(int(x), 1).bit_length() - 1


def _next_pow2(x: int) -> int:
    return 1 << (max(x, 1) - 1).bit_length()


# ---- row kernels per backend ------------------------------------------------------------------

def ce_rows(backend: str, logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
            with_stats: bool = False):
    """Loss per row (acc dtype); with grad_scale the scaled gradient is written over logits.
    with_stats: (loss, stats), stats (C, 2) = (m, r) with m + r the log-sum-exp of the row's
    (softcapped) logits, 0 on ignored rows: the kernels' own stats; (lse, 0) from the torch one."""
    if backend == "torch":
        args = (ignore_index, label_smoothing, z_loss, softcap)
        loss, lse = M.ce_rows_torch(logits, target, grad_scale, *args)
        return (loss, torch.stack([lse, torch.zeros_like(lse)], 1)) if with_stats else loss
    args = (ignore_index, label_smoothing, z_loss, softcap)
    if backend == "triton":
        from slmfast.triton import cross_entropy as tk
        fwd, fwd_bwd = tk.cross_entropy_fwd, tk.cross_entropy_fwd_bwd_
    else:
        fwd, fwd_bwd = torch.ops.slmfast.cross_entropy_fwd, torch.ops.slmfast.cross_entropy_fwd_bwd_
    if grad_scale is None:
        loss, stats = fwd(logits, target, *args)
    else:
        loss, stats = fwd_bwd(logits, target, grad_scale, *args)
    return (loss, stats) if with_stats else loss


def ce_tile_grad(backend: str, logits, target, stats, grad_scale, col0, cols, ignore_index, label_smoothing,
                 z_loss, softcap):
    """The cross-entropy gradient of columns [col0, col0 + Vt) of rows of `cols` logits, written
    over the tile (C, Vt), from each row's stats (C, 2) of ce_rows (two_pass's second pass).

    torch backend: M.ce_tile_grad_. The others run their row kernel's backward in place on the
    tile (one vectorized pass) with the row's stats, which make its softmax that of the full row,
    and arguments that make its other terms right: label smoothing eps Vt / cols (so eps / cols
    per column) and as target the target's column in the tile, or column 0 for rows whose target
    lies outside it. That leaves one wrong element per row (the target-or-0 column: the kernel
    subtracted its 1 - eps Vt / cols there), which is then written exactly (M.ce_grad_values)
    from its logit, saved before the kernel overwrote it."""
    lse = stats[:, 0] + stats[:, 1]                                                   # (C,)
    if backend == "torch":
        return M.ce_tile_grad_(logits, target, lse, grad_scale, col0, cols, ignore_index, label_smoothing,
                               z_loss, softcap)
    width = logits.shape[1]
    valid = target != ignore_index                                                    # (C,)
    inside = valid & (target >= col0) & (target < col0 + width)                       # (C,)
    col = torch.where(inside, target - col0, 0)                                       # (C,)
    a = logits.gather(1, col[:, None])[:, 0].to(torch.float32)  # the logits fixed below  # (C,)
    local = torch.where(valid, col, -1)  # the kernel's targets, -1 = ignored         # (C,)
    args = (-1, label_smoothing * width / cols, z_loss, softcap)
    if backend == "triton":
        from slmfast.triton import cross_entropy as tk
        tk.cross_entropy_bwd(grad_scale, logits, local, stats, *args, out=logits)
    else:
        torch.ops.slmfast.cross_entropy_bwd_(grad_scale, logits, local, stats, *args)
    # Every row's target-or-0 column gets the exact value; ignored rows keep the kernel's 0 (a
    # select, not an index of the valid rows: no data-dependent shape, so it also runs on meta).
    # index_put_, not scatter_: on the CPU a bf16 scatter_ makes a float32 copy of the whole tile.
    scale = grad_scale.to(torch.float32).expand(len(valid))                           # (C,)
    exact = M.ce_grad_values(a, lse, scale, inside, cols, label_smoothing, z_loss, softcap)  # (C,)
    rows = torch.arange(len(col), device=logits.device)                               # (C,)
    kept = logits[rows, col]                                                          # (C,)
    logits.index_put_((rows, col), torch.where(valid, exact.to(logits.dtype), kept))
    return logits


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
    gradient of one chunk of logits at a time (the one-pass loop). Rows of weight beyond V
    (vocabulary padding) get 0.

    grad_W is summed over chunks in float32 (float64 for fp64). For a float32/64 weight that is an
    addmm_ into the result. For bf16/fp16: on the CPU (where only sampled_distill_loss still comes
    here with a weight gradient; the other losses take two_pass), torch.ops.slmfast.loss_grad_weight_acc_
    (csrc/cpu/loss_gemm.cpp) accumulates the chunk's product straight into a transposed float32
    buffer (H, V); elsewhere each chunk's product is taken in the weight's dtype and added to a
    float32 buffer (on a GPU that add is a small fraction of the GEMM)."""

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
    with _without_autocast(hidden.device):
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


def _chunk_scale(grad_scale, c0: int, c1: int):
    return grad_scale if grad_scale.numel() == 1 else grad_scale[c0:c1]


def two_pass(rows_fn, tile_fn, hidden, weight, bias, vocab, sizes, grad_scale, need):
    """Both passes in one call: first_pass, then second_pass (the backward of reduction="none",
    which has its per-row incoming gradient only then). Returns (loss rows (N,) float32,
    grad_hidden, grad_weight, grad_bias), unneeded ones empty."""
    loss, gh, stats = first_pass(rows_fn, hidden, weight, bias, vocab, sizes[0], grad_scale, need[0])
    if not (need[1] or need[2]):
        return loss, gh, weight.new_empty(0), weight.new_empty(0)
    gw, gb = second_pass(tile_fn, hidden, weight, bias, vocab, sizes, stats, grad_scale, need[1], need[2])
    return loss, gh, gw, gb


def first_pass(rows_fn, hidden, weight, bias, vocab, chunk, grad_scale, need_hidden):
    """Pass 1 of the two-pass loop (module docstring), chunks of `chunk` tokens: logits (C, V),
    rows_fn(c0, c1, logits, scale) -> (loss rows, stats rows) leaving the scaled gradient in
    logits (when grad_scale is given), and grad_hidden[chunk] = dlogits @ W. Returns (loss rows
    (N,) float32, grad_hidden or empty, stats (N, k) float32: what rows_fn keeps per row for
    second_pass)."""
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    stats = None
    with _without_autocast(hidden.device):
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            logits = logits_of(hidden[c0:c1], weight, bias, vocab)  # (C, V)
            scale = _chunk_scale(grad_scale, c0, c1) if grad_scale is not None else None
            loss[c0:c1], rows_stats = rows_fn(c0, c1, logits, scale)
            if stats is None:
                stats = torch.empty(n, rows_stats.shape[1], dtype=torch.float32, device=hidden.device)
            stats[c0:c1] = rows_stats
            if need_hidden:
                torch.mm(logits, weight[:vocab], out=gh[c0:c1])  # (C, H)
            del logits
    if stats is None:  # no tokens
        stats = torch.zeros(0, 2, dtype=torch.float32, device=hidden.device)
    return loss, gh, stats


def second_pass(tile_fn, hidden, weight, bias, vocab, sizes, stats, grad_scale, need_weight, need_bias):
    """Pass 2 of the two-pass loop, the weight's gradient (module docstring). sizes = (C, Ct, Vt,
    R) from two_pass_sizes; stats (N, k) from first_pass. For each tile of Vt rows of W and each
    chunk of Ct tokens: the tile's logits (Ct, Vt) again, tile_fn(c0, c1, v0, logits, stats rows,
    scale) writes their gradient over them, R rows at a time (the numbers pass 1's kernel wrote
    into those columns), and grad_W[tile] (Vt, H) = dlogits^T h: with Ct = N one GEMM (float32
    accumulation inside it) written straight into grad_W; with Ct < N summed over the chunks in a
    float32 (H, Vt) tile (loss_grad_weight_acc_) and written once. Returns (grad_weight,
    grad_bias), unneeded ones empty."""
    n, width = hidden.shape
    _, tile_rows, vocab_tile, block = sizes
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_bias else weight.new_empty(0)
    if n == 0:  # no tokens: nothing to sum, zero parameter gradients
        return gw.zero_(), gb.zero_()
    summed = need_weight and tile_rows < n
    acc_t = (torch.empty((width, vocab_tile), dtype=torch.float32, device=hidden.device) if summed
             else None)  # (H, Vt)
    with _without_autocast(hidden.device):
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(vocab, v0 + vocab_tile)
            tile_w = weight[v0:v1]  # (Vt, H)
            tile_b = bias[v0:v1] if bias is not None else None
            gw_t = acc_t[:, :v1 - v0].zero_() if summed else None  # (H, Vt) float32
            gb_t = torch.zeros(v1 - v0, dtype=torch.float32, device=hidden.device) if need_bias else None
            for c0 in range(0, n, tile_rows):
                c1 = min(n, c0 + tile_rows)
                h = hidden[c0:c1]  # (Ct, H)
                d = logits_of(h, tile_w, tile_b, v1 - v0)  # (Ct, Vt) logits, then their gradient
                for r0 in range(c0, c1, block):
                    r1 = min(c1, r0 + block)
                    tile_fn(r0, r1, v0, d[r0 - c0:r1 - c0], stats[r0:r1], _chunk_scale(grad_scale, r0, r1))
                if need_bias:
                    gb_t.add_(d.sum(0, dtype=torch.float32))
                if summed:
                    _acc_weight_grad_t(gw_t, d, h)
                elif need_weight:
                    torch.mm(d.t(), h, out=gw[v0:v1])  # (Vt, H)
                del d
            if summed:
                gw[v0:v1].copy_(gw_t.t())
            if need_bias:
                gb[v0:v1].copy_(gb_t)
    for g, needed in ((gw, need_weight), (gb, need_bias)):
        if needed:
            g[vocab:].zero_()  # rows of the weight beyond the vocabulary (padding): no gradient
    return gw, gb


def _acc_weight_grad_t(acc_t, dlogits, hidden) -> None:
    """acc_t (H, Vt) float32 += hidden^T (H, Ct) @ dlogits (Ct, Vt) (bf16/fp16 operands). On the
    meta device (no kernel for the C++ op) the fallback's shapes stand in for it."""
    if acc_t.device.type == "cpu" and _has_cpu_op():
        torch.ops.slmfast.loss_grad_weight_acc_(acc_t, dlogits, hidden)
    else:
        acc_t.add_(torch.mm(hidden.t(), dlogits))  # (H, Vt) in the operands' dtype, then summed


def _without_autocast(device: torch.device):
    """The loops run in the inputs' dtype: autocast off. The meta device has no autocast (and
    slmfast.recompute's tracker runs these loops on meta tensors to count their chunks)."""
    return nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


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
