"""Distillation losses: dense on hidden states (chunked), on logits, and against a cached top-k or
sampled teacher — contract, reference, autograd, dispatch.

The loss of a token (row) with student logits s and teacher logits t over the shared vocabulary
(the math and the JSD(beta) endpoints are in slmfast/ops/_loss_math.py):
    T^2 * D(P_T || Q_T) + hard_weight * CE(s, target)
where Q_T = softmax(s / T), P_T = softmax(t / T) (Hinton et al. 2015: the T^2 keeps the soft
gradients' scale independent of T), D one of kind = "forward_kl" KL(P||Q), "reverse_kl" KL(Q||P),
"jsd" beta KL(P||M) + (1 - beta) KL(Q||M) with M = beta P + (1 - beta) Q (beta = 0 is forward_kl
and beta = 1 is reverse_kl exactly), "tvd" 1/2 sum |P - Q|. The teacher carries no gradient.
Rows whose target is ignore_index count for nothing (soft and hard); reduction "mean" divides the
sum by the number of such non-ignored rows (all rows without a target), or by num_items; "sum".

Vocabulary padding: student and teacher use their first V columns, V = vocab_size when given,
else the smaller of the two vocabularies; the extra rows of the larger weight (or columns of the
larger logits) are masked out: they are in neither softmax and get a zero gradient. The larger
may exceed the smaller only up to the next multiple of 512 (Qwen2.5's 151936/152064); anything
else is taken as a different tokenizer and rejected (_loss_math.vocab_columns).

distill_loss(hidden states, LM-head weights): chunked over tokens like linear_cross_entropy
(slmfast/ops/_loss_chunks.py): per chunk, the teacher's and the student's logits, the fused row
kernel (loss and, in place, d loss / d student logits), then grad_hidden and grad_W by GEMM. The
gradients are computed during the forward and scaled in backward. Saved for backward: the student
grad_hidden (N x Hs), grad_W (Vs x Hs) and grad_b: the bytes of the gradients themselves; no
(N, V) tensor, nothing of the teacher. Transient, during the forward: the student's and the
teacher's logits of one chunk (2 x C x V) and, for bf16/fp16 weights on a GPU, the float32 grad_W
sum (V x Hs x 4).
bf16/fp16 on the CPU with the weight's gradient needed take two passes instead
(_loss_chunks.two_pass; no V x Hs float32 tensor at any point). Pass 1, per chunk of C tokens, as
above without grad_W, keeping 4 floats per token: the log-sum-exps of s / T, t / T and s, and the
row sum of w = Q dL/dQ (dL/du = w - Q sum w, u = s / T); the C++ and Triton kernels give their
stats from their forward (converted: _loss_math.distill_kernel_stats) and the gradient from their
backward on them, a third (C, V) 16-bit tensor. Pass 2, per vocabulary tile of Vt columns: the
student's tile logits for Ct tokens (Ct = N where memory allows), the teacher's for R rows at a
time, their gradient rebuilt in torch ops from those stats (_loss_math.distill_tile_grad_, float32
temporaries of R x Vt), grad_W[tile] by one GEMM: six GEMMs (both logits twice) where one pass
has four. Sizes as two_pass_sizes on a floor that counts the teacher's inputs, 2 (N + V) Hs +
(N + V) Ht: one chunk's logits or one tile, each <= 5% of it.

distill_loss_from_logits: the same losses when the caller has both logits. Saved for backward:
the logits (inputs) and 7 floats per row (two maxima, three log-sums, two row sums); the
backward is one pass.

topk_distill_loss: against a cached sparse teacher, `teacher_topk_ids` (N, k) and
`teacher_topk_logprobs` (N, k), the teacher's log-probabilities at temperature 1 of its k most
likely tokens. The teacher distribution lives on the outcomes S: the k ids (tail="none",
renormalized), or the k ids plus one tail bucket holding 1 - sum(exp(logprobs)) (tail="bucket",
floored at 0; with k = V there is no tail and "bucket" is "none", so that rounding noise in the
cached log-probabilities is not turned into a bucket, which temperature would then inflate). At
temperature T it is softmax over S of (log p) / T (the tail bucket as one outcome). The
student's Q_T = softmax(s / T) over the full vocabulary is grouped the same way: the k ids
renormalized (none), or the k ids plus the summed mass of all other tokens (bucket).
Then T^2 * D(P_S || Q_S) + hard_weight * CE as above. With k = V both tails are empty and the loss
is the dense one. Row math in PyTorch on every backend (_loss_math.topk_rows_torch), chunked; for
bf16/fp16 on the CPU in two passes as distill_loss, keeping 4 + k floats per token (the log-sum-exp
of the group, that of s, sum w, the tail bucket's w_tail / Q_tail, and w on the k ids), from which
_loss_math.topk_tile_grad_ rebuilds each tile's gradient.

sampled_distill_loss: against tokens drawn from the teacher (random-sampling KD, Anshumann et al.
2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs"): per row m ids
`teacher_sample_ids` (N, m) with `teacher_sample_weights` (N, m), either integer draw counts
(weights count / row total) or float weights (count / N times P_T / r for draws from a proposal r
other than the teacher), weight 0 marking padding; optionally `teacher_entropy` (N,), H(P_T).
Row loss: T^2 (-sum_j w_j log Q_T(id_j) - H) + hard_weight * CE, Q_T over the FULL vocabulary.
With draws from P_T (the teacher at the same temperature T), its expected value is T^2 KL(P_T ||
Q_T) (+ hard CE) and its expected gradient T (Q_T - P_T), full forward-KL distillation's; without
the entropy the value is off by the constant T^2 H(P_T) and the gradient is unchanged. Only
forward KL: a sample of P estimates expectations under P, which reverse KL, JSD and TVD are not.
How the paper's choices map here: draws with replacement from the teacher itself (proposal =
teacher, so the weights are counts / N and the estimate is unbiased, not self-normalized), the
draws made at the distillation temperature and the loss scaled by T^2 as the dense loss is; the
entropy is ours, so that the logged value is a KL and equals the dense loss when the "draws" are
the whole distribution. Row math: the torch backend (_loss_math.sampled_rows_torch: gather, one
softmax pass for the gradient) on every device; for float32 chunks on cpu and triton, the dense
distillation row kernels above are reused with a (C, V) teacher whose softmax(t / T) is w / W
(T log w on the sampled ids, -inf elsewhere), the gradient scaled by W per row and the value
corrected by T^2 (W H(w / W) - H) (float weights with hard_weight > 0, and bf16/fp16 chunks,
whose teacher logits would be rounded, take the torch row math). Transient per chunk: that
(C, V) teacher besides the student's logits, as distill_loss with a live teacher. Saved for
backward: the gradients, as above. One pass on every device (for bf16/fp16 on the CPU with the
float32 grad_W sum).

Backends (row kernels): triton (slmfast/triton/distill.py), cpu (csrc/cpu/cross_entropy.cpp),
torch (_loss_math). No CUDA kernel: on a GPU the automatic choice is triton.
"""

from __future__ import annotations

import torch

from slmfast import backends
from slmfast.ops import _checks
from slmfast.ops import _loss_chunks as C
from slmfast.ops import _loss_math as M
from slmfast.ops.linear_cross_entropy import loss_dtype, needs_grad, prepare_linear, select_backend

OP = "distill_loss"
OP_LOGITS = "distill_loss_from_logits"
OP_TOPK = "topk_distill_loss"
OP_SAMPLED = "sampled_distill_loss"
IMPLEMENTED = ("triton", "cpu", "torch")
IMPLEMENTED_TOPK = ("torch",)
IMPLEMENTED_SAMPLED = IMPLEMENTED  # cpu / triton through the dense distill row kernels (docstring)
NUM_STATS = 7  # per-row stats of the distill row kernels (csrc/cpu/cross_entropy.cpp)


# ---- references ---------------------------------------------------------------------------

def _reduce(rows, target, ignore_index, reduction, num_items, dtype, op):
    if reduction == "none":
        return rows
    valid = target != ignore_index if target is not None else None
    scale = M.mean_scale(op, valid, rows.shape[0], reduction, num_items, M.acc_dtype(dtype), rows.device)
    return (rows.sum() * scale).to(dtype)


def distill_loss_from_logits_reference(student_logits, teacher_logits, target=None, *, kind="forward_kl",
                                       beta=0.5, temperature=1.0, hard_weight=0.0, ignore_index=-100,
                                       num_items=None, reduction="mean", vocab_size=None):
    """Unfused log_softmax / F.kl_div / F.cross_entropy with autograd; the oracle of the tests."""
    k = M.resolve_kind(OP_LOGITS, kind, beta)
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    v = M.vocab_columns(OP_LOGITS, vs, vt, vocab_size)
    s = student_logits.reshape(-1, vs)[:, :v]
    t = teacher_logits.reshape(-1, vt)[:, :v].to(s.dtype)
    y = target.reshape(-1) if target is not None else None
    rows = M.distill_rows_reference(s, t, y, k, beta, temperature, hard_weight, ignore_index)
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    return _reduce(rows, y, ignore_index, reduction, num_items, student_logits.dtype, OP_LOGITS)


def distill_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *,
                           student_bias=None, teacher_bias=None, **options):
    """Unfused: both logits in full, then distill_loss_from_logits_reference."""
    s = student_hidden.reshape(-1, student_hidden.shape[-1]) @ student_weight.t()
    if student_bias is not None:
        s = s + student_bias
    with torch.no_grad():
        t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) @ teacher_weight.t()
        if teacher_bias is not None:
            t = t + teacher_bias
    return distill_loss_from_logits_reference(s, t, target, **options)


def topk_distill_loss_reference(student_logits, teacher_topk_ids, teacher_topk_logprobs, target=None, *,
                                kind="forward_kl", beta=0.5, tail="none", temperature=1.0, hard_weight=0.0,
                                ignore_index=-100, num_items=None, reduction="mean"):
    """The top-k loss of full student logits by autograd (gather, log_softmax, F.kl_div)."""
    k = M.resolve_kind(OP_TOPK, kind, beta)
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    ids = teacher_topk_ids.reshape(s.shape[0], -1)
    lp = teacher_topk_logprobs.reshape(s.shape[0], -1)
    y = target.reshape(-1) if target is not None else None
    rows = M.topk_rows_reference(s, ids, lp, y, k, beta, temperature, hard_weight, ignore_index, tail)
    return _reduce(rows, y, ignore_index, reduction, num_items, student_logits.dtype, OP_TOPK)


def _sample_weights(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer draw counts -> count / row total (the rows' draws); float weights as they are."""
    if weights.dtype.is_floating_point:
        return weights.to(dtype)
    counts = weights.to(dtype)
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def sampled_distill_loss_reference(student_logits, teacher_sample_ids, teacher_sample_weights, *,
                                   teacher_entropy=None, temperature=1.0, target=None, hard_weight=0.0,
                                   ignore_index=-100, num_items=None, reduction="mean"):
    """The sampled-teacher loss of full student logits by autograd (log_softmax, gather)."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    ids = teacher_sample_ids.reshape(s.shape[0], -1).to(torch.int64)
    w = _sample_weights(teacher_sample_weights.reshape(s.shape[0], -1), s.dtype)
    h = teacher_entropy.reshape(-1) if teacher_entropy is not None else None
    y = target.reshape(-1) if target is not None else None
    rows = M.sampled_rows_reference(s, ids, w, h, y, temperature, hard_weight, ignore_index)
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    return _reduce(rows, y, ignore_index, reduction, num_items, student_logits.dtype, OP_SAMPLED)


# ---- custom ops: the chunk loops ------------------------------------------------------------

def _fake_fused(sh, sw, sb, *rest):
    grad_hidden, grad_weight, grad_bias = rest[-4:-1]
    return (sh.new_empty((), dtype=M.acc_dtype(sh.dtype)),
            torch.empty_like(sh) if grad_hidden else sh.new_empty(0),
            torch.empty_like(sw) if grad_weight else sw.new_empty(0),
            torch.empty_like(sb) if grad_bias else sw.new_empty(0))


def _fused_setup(ctx, inputs, output):
    ctx.num_inputs = len(inputs)
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:])
    # The gradient outputs get no incoming gradient; without this autograd would fill one with
    # zeros of their size (N x H + V x H) during backward, a second copy of the gradients.
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, *_):
    gh, gw, gb = C.scale_saved_grads(ctx.saved_tensors, grad_loss)
    return (gh, gw, gb if ctx.has_bias else None, *([None] * (ctx.num_inputs - 3)))


def _two_pass(sh: torch.Tensor, grad_weight: bool) -> bool:
    """Whether a fused op takes C.two_pass: bf16/fp16 on the CPU with the weight's gradient needed
    (without it the one-pass loop holds no V x H float32 sum either)."""
    return grad_weight and C.uses_two_pass(sh.device, sh.dtype)


def _summed_loss(rows_fn, sh, sw, sb, vocab: int, chunk_size: int, scale, need, tile_fn=None,
                 floor_hidden: float = 0.0):
    """The fused ops' common body: the chunk loop over rows_fn, gradients only when one is needed
    (need = grad_hidden, grad_weight, grad_bias), the loss as scale * the sum of the rows. With
    tile_fn (where _two_pass holds; rows_fn then also returns each row's stats) C.two_pass, sized
    by C.two_pass_sizes on a floor of 2 (N + V) floor_hidden elements."""
    if tile_fn is None:
        grad_scale = scale if any(need) else None
        rows, gh, gw, gb = C.chunked(rows_fn, sh, sw, sb, vocab, chunk_size, grad_scale, need)
    else:
        sizes = C.two_pass_sizes(sh.shape[0], floor_hidden, vocab, chunk_size, float_temporaries=True)
        rows, gh, gw, gb = C.two_pass(rows_fn, tile_fn, sh, sw, sb, vocab, sizes, scale, need)
    return rows.sum() * scale, gh, gw, gb


def _distill_floor_hidden(student_hidden: int, teacher_hidden: int) -> float:
    """distill_loss's memory floor in units of 2 (N + V) elements: the student's inputs and their
    gradients, 2 (N + V) Hs, and the teacher's inputs, (N + V) Ht."""
    return student_hidden + teacher_hidden / 2


def _distill_rows(backend, logits, teacher, target, grad_scale, kind, beta, temperature, hard_weight,
                  ignore_index, with_stats: bool):
    """C.distill_rows; with_stats: (loss rows, stats (C, 4) for M.distill_tile_grad_). The kernels
    give theirs from their forward (M.distill_kernel_stats converts them) and the gradient from
    their backward on those stats, copied over the logits."""
    args = (kind, beta, temperature, hard_weight, ignore_index)
    if not with_stats:
        return C.distill_rows(backend, logits, teacher, target, grad_scale, *args)
    if backend == "torch":
        return M.distill_rows_torch(logits, teacher, target, grad_scale, *args, with_stats=True)
    if backend == "triton":
        from slmfast.triton import distill as tk
        fwd, bwd = tk.distill_fwd, tk.distill_bwd
    else:
        fwd, bwd = torch.ops.slmfast.distill_fwd, torch.ops.slmfast.distill_bwd
    loss, stats = fwd(logits, teacher, target, *args)                                 # (C,), (C, 7)
    if grad_scale is not None:
        logits.copy_(bwd(grad_scale, logits, teacher, target, stats, *args))          # (C, V)
    hard = hard_weight > 0 and target is not None
    return loss, M.distill_kernel_stats(stats, kind, temperature, hard)


@torch.library.custom_op("slmfast_loss::distill_fused", mutates_args=())
def _distill_fused(sh: torch.Tensor, sw: torch.Tensor, sb: torch.Tensor | None, th: torch.Tensor,
                   tw: torch.Tensor, tb: torch.Tensor | None, target: torch.Tensor | None,
                   scale: torch.Tensor, kind: int, beta: float, temperature: float, hard_weight: float,
                   ignore_index: int, vocab: int, chunk_size: int, grad_hidden: bool, grad_weight: bool,
                   grad_bias: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale * sum of row losses and, when any grad_* is set, its student gradients."""
    two = _two_pass(sh, grad_weight)
    args = (kind, beta, temperature, hard_weight, ignore_index)
    return _summed_loss(_distill_rows_fn(backend, th, tw, tb, target, vocab, args, two), sh, sw, sb, vocab,
                        chunk_size, scale, (grad_hidden, grad_weight, grad_bias),
                        _distill_tile_fn(th, tw, tb, target, args) if two else None,
                        _distill_floor_hidden(sh.shape[1], th.shape[1]))


def _distill_rows_fn(backend, th, tw, tb, target, vocab: int, args, with_stats: bool):
    """distill_loss's row function of a chunk of student logits: the teacher's logits of its rows,
    then _distill_rows (args = kind, beta, temperature, hard_weight, ignore_index)."""
    def rows_fn(c0, c1, logits, grad_scale):
        with torch.no_grad():
            t = C.logits_of(th[c0:c1], tw, tb, vocab).to(logits.dtype)  # (C, V)
        y = target[c0:c1] if target is not None else None
        return _distill_rows(backend, logits, t, y, grad_scale, *args, with_stats=with_stats)

    return rows_fn


def _distill_tile_fn(th, tw, tb, target, args):
    """distill_loss's tile gradient (C.two_pass): the teacher's logits of the tile's rows and
    columns, then M.distill_tile_grad_."""
    def tile_fn(r0, r1, v0, logits, stats, grad_scale):
        v1 = v0 + logits.shape[1]
        with torch.no_grad():
            t = C.logits_of(th[r0:r1], tw[v0:v1], tb[v0:v1] if tb is not None else None, v1 - v0)  # (R, Vt)
        y = target[r0:r1] if target is not None else None
        return M.distill_tile_grad_(logits, t.to(logits.dtype), y, stats, grad_scale, v0, *args)

    return tile_fn


_distill_fused.register_fake(_fake_fused)
_distill_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op("slmfast_loss::topk_distill_fused", mutates_args=())
def _topk_fused(sh: torch.Tensor, sw: torch.Tensor, sb: torch.Tensor | None, ids: torch.Tensor,
                logprobs: torch.Tensor, target: torch.Tensor | None, scale: torch.Tensor, kind: int,
                beta: float, temperature: float, hard_weight: float, ignore_index: int, tail: str,
                chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    two = _two_pass(sh, grad_weight)
    args = (kind, beta, temperature, hard_weight, ignore_index)

    def rows_fn(c0, c1, logits, grad_scale):
        y = target[c0:c1] if target is not None else None
        return M.topk_rows_torch(logits, ids[c0:c1], logprobs[c0:c1], y, grad_scale, *args, tail,
                                 with_stats=two)

    def tile_fn(r0, r1, v0, logits, stats, grad_scale):
        y = target[r0:r1] if target is not None else None
        return M.topk_tile_grad_(logits, ids[r0:r1], y, stats, grad_scale, v0, *args,
                                 M.topk_tail(tail, ids.shape[1], sw.shape[0]))

    return _summed_loss(rows_fn, sh, sw, sb, sw.shape[0], chunk_size, scale,
                        (grad_hidden, grad_weight, grad_bias), tile_fn if two else None, sh.shape[1])


_topk_fused.register_fake(_fake_fused)
_topk_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


def _sampled_dense_path(backend: str, dtype: torch.dtype, normalized: bool, hard_weight: float) -> bool:
    """Whether a chunk runs on the dense distillation row kernels (module docstring: sampled)."""
    return backend != "torch" and dtype == torch.float32 and (normalized or hard_weight == 0)


@torch.library.custom_op("slmfast_loss::sampled_distill_fused", mutates_args=())
def _sampled_fused(sh: torch.Tensor, sw: torch.Tensor, sb: torch.Tensor | None, ids: torch.Tensor,
                   weights: torch.Tensor, entropy: torch.Tensor | None, target: torch.Tensor | None,
                   scale: torch.Tensor, temperature: float, hard_weight: float, ignore_index: int,
                   normalized: bool, chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dense = _sampled_dense_path(backend, sh.dtype, normalized, hard_weight)
    t2 = temperature ** 2

    def rows_fn(c0, c1, logits, grad_scale):
        i, w = ids[c0:c1], weights[c0:c1]                                                # (C, m) each
        h = entropy[c0:c1] if entropy is not None else None                              # (C,)
        y = target[c0:c1] if target is not None else None
        if not dense:
            return M.sampled_rows_torch(logits, i, w, h, y, grad_scale, temperature, hard_weight,
                                        ignore_index)
        t = M.sampled_dense_teacher(i, w, logits.shape[1], temperature, logits.dtype)  # (C, V)
        total, h_hat = M.sampled_row_entropy(w)                                          # (C,) each
        if normalized:
            total = torch.ones_like(total)
        elif grad_scale is not None:
            grad_scale = grad_scale * total             # T (W Q - w) = W * T (Q - w / W)
        rows = C.distill_rows(backend, logits, t, y, grad_scale, M.KINDS["forward_kl"], 0.0, temperature,
                              hard_weight, ignore_index)
        # kernel: T^2 KL(w / W || Q_T) (+ hard); ours: T^2 (W (KL + H(w / W)) - H_row) (+ hard)
        rows = rows * total + t2 * (total * h_hat - (h.to(total.dtype) if h is not None else 0))
        return torch.where(y != ignore_index, rows, 0) if y is not None else rows

    return _summed_loss(rows_fn, sh, sw, sb, sw.shape[0], chunk_size, scale,
                        (grad_hidden, grad_weight, grad_bias))


_sampled_fused.register_fake(_fake_fused)
_sampled_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


# ---- distill_loss_from_logits: the row ops with autograd ------------------------------------

def _fake_rows(student, teacher, target, kind, beta, temperature, hard_weight, ignore_index):
    acc = M.acc_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty(rows, dtype=acc), student.new_empty((rows, NUM_STATS), dtype=acc)


def _fake_rows_bwd(grad_loss, student, *rest):
    return student.new_empty(student.shape)


def _rows_setup(ctx, inputs, output):
    student, teacher, target, *options = inputs
    ctx.options = tuple(options)
    ctx.save_for_backward(student, teacher, target, output[1])


def _make_rows_backward(backward_op):
    def backward(ctx, grad_loss, _grad_stats):
        student, teacher, target, stats = ctx.saved_tensors
        ds = backward_op(grad_loss.contiguous(), student, teacher, target, stats, *ctx.options)
        return ds, None, None, None, None, None, None, None

    return backward


if backends.extension() is not None:
    torch.library.register_fake("slmfast::distill_fwd")(_fake_rows)
    torch.library.register_fake("slmfast::distill_bwd")(_fake_rows_bwd)
    torch.library.register_fake("slmfast::distill_fwd_bwd_")(
        lambda student, *rest: student.new_empty(student.shape[0], dtype=M.acc_dtype(student.dtype)))
    torch.library.register_autograd("slmfast::distill_fwd",
                                    _make_rows_backward(torch.ops.slmfast.distill_bwd),
                                    setup_context=_rows_setup)

if backends.triton_version() is not None:
    from slmfast.triton import distill as _triton_kernels

    @torch.library.custom_op("slmfast_triton::distill_fwd", mutates_args=())
    def _triton_rows(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, kind: int,
                     beta: float, temperature: float, hard_weight: float,
                     ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _triton_kernels.distill_fwd(student, teacher, target, kind, beta, temperature, hard_weight,
                                           ignore_index)

    @torch.library.custom_op("slmfast_triton::distill_bwd", mutates_args=())
    def _triton_rows_bwd(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                         target: torch.Tensor | None, stats: torch.Tensor, kind: int, beta: float,
                         temperature: float, hard_weight: float, ignore_index: int) -> torch.Tensor:
        return _triton_kernels.distill_bwd(grad_loss, student, teacher, target, stats, kind, beta,
                                           temperature, hard_weight, ignore_index)

    _triton_rows.register_fake(_fake_rows)
    _triton_rows_bwd.register_fake(_fake_rows_bwd)
    _triton_rows.register_autograd(_make_rows_backward(torch.ops.slmfast_triton.distill_bwd),
                                   setup_context=_rows_setup)


# ---- the public ops -----------------------------------------------------------------------

def _check_options(op, kind, beta, temperature, hard_weight, reduction, target, allowed=("mean", "sum")):
    k = M.resolve_kind(op, kind, beta)
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if not hard_weight >= 0:
        raise ValueError(f"{op}: hard_weight must be >= 0, got {hard_weight}")
    if hard_weight > 0 and target is None:
        raise ValueError(f"{op}: hard_weight > 0 needs a target")
    M.check_reduction(op, reduction, allowed)
    return k


def _target(op, target, rows, vocab, ignore_index, device):
    if target is None:
        return None
    _checks.check_same_device(op, hidden=torch.empty(0, device=device), target=target)
    return M.check_target(op, target, rows, vocab, ignore_index)


def _chunk(op, chunk_size, n, hidden, vocab, device, dtype, floor_hidden=None):
    """Rows per chunk: chunk_size, or the default of the loop the op takes (two_pass's pass 1 when
    floor_hidden, the floor's hidden size of _summed_loss, is given)."""
    if chunk_size is not None and int(chunk_size) < 0:
        raise ValueError(f"{op}: chunk_size must be >= 1 (or None / 0: the default), got {chunk_size}")
    if chunk_size:
        return int(chunk_size)
    if floor_hidden is not None:
        return C.two_pass_sizes(n, floor_hidden, vocab)[0]
    return C.default_chunk_size(n, hidden, vocab, device, dtype)


def distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                 teacher_weight: torch.Tensor, target: torch.Tensor | None = None, *,
                 kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 hard_weight: float = 0.0, ignore_index: int = -100, chunk_size: int | None = None,
                 student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                 num_items=None, reduction: str = "mean", vocab_size: int | None = None,
                 backend: str | None = None):
    """Distillation loss from hidden states and LM heads, chunked; see the module docstring."""
    k = _check_options(OP, kind, beta, temperature, hard_weight, reduction, target)
    need = needs_grad(student_hidden, student_weight, student_bias)
    sh, sw, sb = prepare_linear(OP, student_hidden, student_weight, student_bias, "student_hidden",
                                "student_weight", "student_bias")
    with torch.no_grad():
        th, tw, tb = prepare_linear(OP, teacher_hidden.detach(), teacher_weight.detach(),
                                    teacher_bias.detach() if teacher_bias is not None else None,
                                    "teacher_hidden", "teacher_weight", "teacher_bias")
    _checks.check_same_device(OP, student_hidden=sh, teacher_hidden=th)
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"{OP}: teacher_hidden must have the leading shape of student_hidden "
                         f"{tuple(student_hidden.shape[:-1])} (one row per token), got "
                         f"{tuple(teacher_hidden.shape[:-1])}")
    n = sh.shape[0]
    v = M.vocab_columns(OP, sw.shape[0], tw.shape[0], vocab_size)
    y = _target(OP, target, n, v, ignore_index, sh.device)
    floor = _distill_floor_hidden(sh.shape[1], th.shape[1]) if _two_pass(sh, need[1]) else None
    chunk = _chunk(OP, chunk_size, n, sh.shape[1], v, sh.device, sh.dtype, floor)
    name = select_backend(OP, IMPLEMENTED, sh.device, sh.dtype, backend, any(need))
    scale = M.mean_scale(OP, y != ignore_index if y is not None else None, n, reduction, num_items,
                         M.acc_dtype(sh.dtype), sh.device)
    loss, *_ = torch.ops.slmfast_loss.distill_fused(
        sh, sw, sb, th, tw, tb, y, scale, k, float(beta), float(temperature), float(hard_weight),
        int(ignore_index), v, chunk, need[0], need[1], need[2], name)
    return loss.to(loss_dtype(student_hidden, sh))


def distill_loss_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             target: torch.Tensor | None = None, *, kind: str = "forward_kl",
                             beta: float = 0.5, temperature: float = 1.0, hard_weight: float = 0.0,
                             ignore_index: int = -100, num_items=None, reduction: str = "mean",
                             vocab_size: int | None = None, backend: str | None = None):
    """The distillation loss of logits (..., Vs) and (..., Vt); reduction also "none" (per row)."""
    k = _check_options(OP_LOGITS, kind, beta, temperature, hard_weight, reduction, target, M.REDUCTIONS)
    _checks.check_float(OP_LOGITS, "student_logits", student_logits)
    _checks.check_float(OP_LOGITS, "teacher_logits", teacher_logits)
    device = _checks.check_same_device(OP_LOGITS, student_logits=student_logits,
                                       teacher_logits=teacher_logits)
    if student_logits.dim() < 1 or tuple(teacher_logits.shape[:-1]) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"{OP_LOGITS}: teacher_logits must have the leading shape of student_logits "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(teacher_logits.shape[:-1])}")
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    v = M.vocab_columns(OP_LOGITS, vs, vt, vocab_size)
    s = student_logits.reshape(-1, vs)[:, :v]
    t = teacher_logits.detach().reshape(-1, vt)[:, :v].to(s.dtype)
    if target is not None and tuple(target.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"{OP_LOGITS}: target must have shape {tuple(student_logits.shape[:-1])}, got "
                         f"{tuple(target.shape)}")
    y = _target(OP_LOGITS, target, s.shape[0], v, ignore_index, device)
    grad = torch.is_grad_enabled() and student_logits.requires_grad
    name = select_backend(OP_LOGITS, IMPLEMENTED, device, s.dtype, backend, grad, OP)  # the same row kernels
    options = (k, float(beta), float(temperature), float(hard_weight), int(ignore_index))
    if name == "torch":
        rows = M.distill_rows_reference(s, t, y, *options)
    else:
        s = s if s.stride(-1) == 1 else s.contiguous()
        t = t if t.stride(-1) == 1 else t.contiguous()
        ns = torch.ops.slmfast_triton if name == "triton" else torch.ops.slmfast
        rows, _stats = ns.distill_fwd(s, t, y, *options)
    if reduction == "none":
        return rows.to(student_logits.dtype).reshape(student_logits.shape[:-1])
    return _reduce(rows, y, ignore_index, reduction, num_items, student_logits.dtype, OP_LOGITS)


def topk_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                      teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor, *,
                      kind: str = "forward_kl", beta: float = 0.5, tail: str = "none",
                      temperature: float = 1.0, target: torch.Tensor | None = None, hard_weight: float = 0.0,
                      ignore_index: int = -100, chunk_size: int | None = None, num_items=None,
                      student_bias: torch.Tensor | None = None, reduction: str = "mean",
                      backend: str | None = None):
    """Distillation against a cached top-k teacher, chunked; see the module docstring."""
    k = _check_options(OP_TOPK, kind, beta, temperature, hard_weight, reduction, target)
    if tail not in M.TAILS:
        raise ValueError(f"{OP_TOPK}: tail must be one of {', '.join(map(repr, M.TAILS))}, got {tail!r}")
    need = needs_grad(student_hidden, student_weight, student_bias)
    sh, sw, sb = prepare_linear(OP_TOPK, student_hidden, student_weight, student_bias, "student_hidden",
                                "student_weight", "student_bias")
    n, v = sh.shape[0], sw.shape[0]
    _checks.check_tensor(OP_TOPK, "teacher_topk_ids", teacher_topk_ids)
    _checks.check_float(OP_TOPK, "teacher_topk_logprobs", teacher_topk_logprobs)
    _checks.check_same_device(OP_TOPK, student_hidden=sh, teacher_topk_ids=teacher_topk_ids,
                              teacher_topk_logprobs=teacher_topk_logprobs)
    lead = tuple(student_hidden.shape[:-1])
    if teacher_topk_ids.dtype.is_floating_point or tuple(teacher_topk_ids.shape[:-1]) != lead:
        raise ValueError(f"{OP_TOPK}: teacher_topk_ids must be integer with shape {lead + ('k',)}, got "
                         f"{tuple(teacher_topk_ids.shape)} {teacher_topk_ids.dtype}")
    if tuple(teacher_topk_logprobs.shape) != tuple(teacher_topk_ids.shape):
        raise ValueError(f"{OP_TOPK}: teacher_topk_logprobs must have the shape of teacher_topk_ids "
                         f"{tuple(teacher_topk_ids.shape)}, got {tuple(teacher_topk_logprobs.shape)}")
    top = teacher_topk_ids.shape[-1]
    if not 1 <= top <= v:
        raise ValueError(f"{OP_TOPK}: k = {top} (last dim of teacher_topk_ids) must be in [1, V = {v}]")
    ids = teacher_topk_ids.reshape(n, top).to(torch.int64).contiguous()
    lp = teacher_topk_logprobs.detach().reshape(n, top).contiguous()
    if not torch.compiler.is_compiling() and n > 0:
        if bool(((ids < 0) | (ids >= v)).any()):
            raise ValueError(f"{OP_TOPK}: teacher_topk_ids has ids outside [0, {v})")
        srt = ids.sort(-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(f"{OP_TOPK}: teacher_topk_ids repeats an id within a row")
    y = _target(OP_TOPK, target, n, v, ignore_index, sh.device)
    chunk = _chunk(OP_TOPK, chunk_size, n, sh.shape[1], v, sh.device, sh.dtype,
                   sh.shape[1] if _two_pass(sh, need[1]) else None)
    name = select_backend(OP_TOPK, IMPLEMENTED_TOPK, sh.device, sh.dtype, backend, any(need))
    scale = M.mean_scale(OP_TOPK, y != ignore_index if y is not None else None, n, reduction, num_items,
                         M.acc_dtype(sh.dtype), sh.device)
    loss, *_ = torch.ops.slmfast_loss.topk_distill_fused(
        sh, sw, sb, ids, lp, y, scale, k, float(beta), float(temperature), float(hard_weight),
        int(ignore_index), tail, chunk, need[0], need[1], need[2], name)
    return loss.to(loss_dtype(student_hidden, sh))


def sampled_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_sample_ids: torch.Tensor, teacher_sample_weights: torch.Tensor, *,
                         teacher_entropy: torch.Tensor | None = None, temperature: float = 1.0,
                         target: torch.Tensor | None = None, hard_weight: float = 0.0,
                         ignore_index: int = -100, chunk_size: int | None = None, num_items=None,
                         student_bias: torch.Tensor | None = None, reduction: str = "mean",
                         backend: str | None = None):
    """Forward-KL distillation against tokens sampled from the teacher, chunked; see the module
    docstring. teacher_sample_ids (..., m): ids drawn from the teacher at `temperature`;
    teacher_sample_weights (..., m): integer draw counts (normalized per row) or float weights;
    teacher_entropy (...,): the teacher's entropy at `temperature`, or None (the loss is then the
    cross-entropy part, the KL up to a constant per row)."""
    op = OP_SAMPLED
    _check_options(op, "forward_kl", 0.0, temperature, hard_weight, reduction, target)
    need = needs_grad(student_hidden, student_weight, student_bias)
    sh, sw, sb = prepare_linear(op, student_hidden, student_weight, student_bias, "student_hidden",
                                "student_weight", "student_bias")
    n, v = sh.shape[0], sw.shape[0]
    ids_in, w_in = teacher_sample_ids, teacher_sample_weights
    _checks.check_tensor(op, "teacher_sample_ids", ids_in)
    _checks.check_tensor(op, "teacher_sample_weights", w_in)
    _checks.check_same_device(op, student_hidden=sh, teacher_sample_ids=ids_in, teacher_sample_weights=w_in)
    lead = tuple(student_hidden.shape[:-1])
    if ids_in.dtype.is_floating_point or ids_in.dtype == torch.bool or tuple(ids_in.shape[:-1]) != lead:
        raise ValueError(f"{op}: teacher_sample_ids must be integer with shape {lead + ('m',)}, got "
                         f"{tuple(ids_in.shape)} {ids_in.dtype}")
    if tuple(w_in.shape) != tuple(ids_in.shape) or w_in.dtype == torch.bool or w_in.dtype.is_complex:
        raise ValueError(f"{op}: teacher_sample_weights must be counts (integer) or weights (float) with the "
                         f"shape of teacher_sample_ids {tuple(ids_in.shape)}, got {tuple(w_in.shape)} "
                         f"{w_in.dtype}")
    m = ids_in.shape[-1]
    if m < 1:
        raise ValueError(f"{op}: teacher_sample_ids needs at least one sample per row (last dim >= 1), "
                         f"got {m}")
    acc = M.acc_dtype(sh.dtype)
    normalized = not w_in.dtype.is_floating_point
    ids = ids_in.reshape(n, m).to(torch.int64).contiguous()
    w = _sample_weights(w_in.detach().reshape(n, m), acc).contiguous()                  # (N, m)
    h = None
    if teacher_entropy is not None:
        _checks.check_float(op, "teacher_entropy", teacher_entropy)
        _checks.check_same_device(op, student_hidden=sh, teacher_entropy=teacher_entropy)
        if tuple(teacher_entropy.shape) != lead:
            raise ValueError(f"{op}: teacher_entropy must have shape {lead} (one per row), got "
                             f"{tuple(teacher_entropy.shape)}")
        h = teacher_entropy.detach().reshape(n).to(acc).contiguous()
    y = _target(op, target, n, v, ignore_index, sh.device)
    if not torch.compiler.is_compiling() and n > 0:
        if bool(((ids < 0) | (ids >= v)).any()):
            raise ValueError(f"{op}: teacher_sample_ids has ids outside [0, {v})")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"{op}: teacher_sample_weights must be finite and >= 0")
        rows_ok = w.sum(-1) > 0
        if y is not None:
            rows_ok = rows_ok | (y == ignore_index)
        if not bool(rows_ok.all()):
            row = int((~rows_ok).nonzero()[0, 0])
            raise ValueError(f"{op}: row {row} has no sample (its teacher_sample_weights sum to 0); every "
                             "row that is not ignored needs at least one draw")
        # padding (weight 0) may repeat an id; sampled ids must be distinct within a row
        key = torch.where(w > 0, ids, -1 - torch.arange(m, device=ids.device))
        srt = key.sort(-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(f"{op}: teacher_sample_ids repeats an id within a row (merge repeats into one "
                             "entry with their summed count or weight)")
    chunk = _chunk(op, chunk_size, n, sh.shape[1], v, sh.device, sh.dtype)
    name = select_backend(op, IMPLEMENTED_SAMPLED, sh.device, sh.dtype, backend, any(need), OP)
    scale = M.mean_scale(op, y != ignore_index if y is not None else None, n, reduction, num_items, acc,
                         sh.device)
    loss, *_ = torch.ops.slmfast_loss.sampled_distill_fused(
        sh, sw, sb, ids, w, h, y, scale, float(temperature), float(hard_weight), int(ignore_index),
        normalized, chunk, need[0], need[1], need[2], name)
    return loss.to(loss_dtype(student_hidden, sh))
