"""The math of the loss ops, in plain PyTorch: references, row kernels and shared checks.

Three kinds of function live here, for slmfast/ops/{cross_entropy,linear_cross_entropy,distill_loss}.py:
  *_reference   the unfused computation differentiated by autograd (F.cross_entropy, log_softmax,
                F.kl_div): the oracle of the tests when run in float64, and the `torch` backend of
                the ops that take logits.
  *_rows_torch  the row kernels of the `torch` backend of the chunked ops: loss per row and the
                gradient written over the logits, by the explicit formulas the C++ and Triton
                kernels use (csrc/cpu/cross_entropy.cpp). Float32 arithmetic (float64 for fp64).
  *_tile_grad_  two_pass's second pass (bf16/fp16 on the CPU, slmfast/ops/_loss_chunks.py): the
                gradient of a tile of columns written over it, from per-row stats of pass 1 (the
                lse of any backend's row kernel; the distillation row functions' with_stats, or
                distill_kernel_stats of the kernels' stats).

Distillation (Hinton et al. 2015): with u = s / T, v = t / T, Q = softmax(u) the student and
P = softmax(v) the teacher, the soft loss of a row is one of
    forward_kl  KL(P || Q)      reverse_kl  KL(Q || P)      tvd  1/2 sum |P - Q|
    jsd         beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
(JSD(beta) of Agarwal et al. 2023, "GKD", as TRL and Liger Kernel write it.) The mixture form is
0 at beta = 0 and 1; JSD(beta) / beta -> KL(P || Q) as beta -> 0 and JSD(beta) / (1 - beta) ->
KL(Q || P) as beta -> 1, so, like TRL and Liger, beta = 0 means forward_kl and beta = 1 means
reverse_kl. The row loss is T^2 * soft + hard_weight * CE(s, y) (CE at temperature 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
REDUCTIONS = ("mean", "sum", "none")
TAILS = ("none", "bucket")
# A vocabulary may exceed the other by padding up to the next multiple of this (see vocab_columns).
VOCAB_PAD_MULTIPLE = 512


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- argument checks shared by the loss ops -------------------------------------------------

def check_reduction(op: str, reduction: str, allowed=REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def resolve_kind(op: str, kind: str, beta: float) -> int:
    """The kernel's kind number; jsd at beta 0 / 1 is forward_kl / reverse_kl (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"{op}: beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return KINDS["forward_kl"]
        if beta == 1.0:
            return KINDS["reverse_kl"]
    return KINDS[kind]


def check_target(op: str, target: torch.Tensor, rows: int, vocab: int, ignore_index: int,
                 name: str = "target") -> torch.Tensor:
    """Integer (rows,) target in [0, vocab) or ignore_index; returned flat as int64."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must hold class indices (an integer dtype), got {target.dtype}")
    if target.numel() != rows:
        raise ValueError(f"{op}: {name} must have {rows} elements (one per row), got shape "
                         f"{tuple(target.shape)}")
    target = target.reshape(rows).to(torch.int64)
    if not torch.compiler.is_compiling() and target.device.type != "meta" and rows > 0:
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: {name}[{i}] = {int(target[i])} is out of range [0, {vocab}) and is not "
                             f"ignore_index ({ignore_index})")
    return target


def mean_scale(op: str, valid: torch.Tensor | None, rows: int, reduction: str, num_items,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 0-dim factor that turns the sum of row losses into the reduced loss: 1 for "sum",
    1 / (number of non-ignored rows, or num_items) for "mean". A zero count gives 0 (the loss of
    an all-ignored batch is 0, where F.cross_entropy returns NaN)."""
    if num_items is not None and reduction != "mean":
        raise ValueError(f"{op}: num_items is the denominator of reduction='mean', got "
                         f"reduction={reduction!r}")
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if num_items is None:
        count = valid.sum().to(dtype) if valid is not None else torch.full((), float(rows), dtype=dtype,
                                                                           device=device)
    elif isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"{op}: num_items must be an int or a one-element tensor, got shape "
                             f"{tuple(num_items.shape)}")
        count = num_items.reshape(()).to(device=device, dtype=dtype)
    else:
        if int(num_items) < 0:
            raise ValueError(f"{op}: num_items must be >= 0, got {num_items}")
        count = torch.full((), float(num_items), dtype=dtype, device=device)
    return torch.where(count > 0, 1.0 / count.clamp(min=1e-30), torch.zeros_like(count))


def vocab_columns(op: str, student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    """How many leading columns the student and teacher share; the rest are masked out.

    Rule: with vocab_size given, both must have at least vocab_size rows and columns >= vocab_size
    are dropped on both sides. Otherwise the shared vocabulary is the smaller one, and the larger
    may exceed it only by padding to the next multiple of VOCAB_PAD_MULTIPLE (512): Qwen2.5's
    151936 and 152064, GPT-2's 50257 and 50304 pass; 32000 and 32768, or 50257 and 151936, are
    taken as different tokenizers and rejected.
    """
    if vocab_size is not None:
        if vocab_size < 1 or vocab_size > min(student_vocab, teacher_vocab):
            raise ValueError(f"{op}: vocab_size={vocab_size} must be in [1, min(student vocabulary "
                             f"{student_vocab}, teacher vocabulary {teacher_vocab})]")
        return int(vocab_size)
    small, large = min(student_vocab, teacher_vocab), max(student_vocab, teacher_vocab)
    padded = -(-small // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if large > padded:
        raise ValueError(f"{op}: student vocabulary {student_vocab} and teacher vocabulary "
                         f"{teacher_vocab} cannot be paddings of one vocabulary (the larger may exceed "
                         f"the smaller only up to the next multiple of {VOCAB_PAD_MULTIPLE}, {padded}); "
                         "different tokenizers are not supported (pass vocab_size= if they do share "
                         "their first vocab_size tokens)")
    return small


# ---- references: unfused, differentiated by autograd ----------------------------------------

def cross_entropy_rows_reference(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                                 softcap=None):
    """Per-row loss of (N, V) logits: F.cross_entropy (+ z_loss * lse^2), 0 on ignored rows.

    An ignored row counts for nothing whatever its logits hold: its loss and gradient are exactly
    0 even when they are NaN or infinite (F.cross_entropy alone gives such a row a NaN gradient,
    and z_loss * lse^2 * 0 would be NaN)."""
    valid = target != ignore_index
    logits = torch.where(valid[:, None], logits, 0)
    z = logits if not softcap else softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        rows = rows + z_loss * torch.where(valid, torch.logsumexp(z, -1).pow(2), 0)
    return rows


def _xlogr(x: torch.Tensor, lx: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """sum x (log x - log r) over the last dim with 0 log 0 = 0: a term whose x is exactly 0
    counts 0 and passes no gradient (a -inf logit, a banned token, leaves the divergence finite;
    F.kl_div gives 0 * -inf = NaN there). A NaN x is not 0: it reaches the sum."""
    zero = x == 0
    return torch.where(zero, 0, x * (torch.where(zero, 0, lx) - torch.where(zero, 0, lr))).sum(-1)


def soft_rows_reference(lq: torch.Tensor, lp: torch.Tensor, kind: int, beta: float) -> torch.Tensor:
    """Soft loss per row from student and teacher log-probabilities (last dim): KL(P||Q), KL(Q||P)
    and JSD as F.kl_div(..., log_target=True) computes them, with 0 log 0 = 0 (_xlogr)."""
    q, p = lq.exp(), lp.exp()
    if kind == 0:
        return _xlogr(p, lp, lq)
    if kind == 1:
        return _xlogr(q, lq, lp)
    if kind == 2:
        both = (p == 0) & (q == 0)  # no term reads lm there; keep logaddexp's gradient finite
        lm = torch.logaddexp(torch.where(both, 0, lp) + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                             torch.where(both, 0, lq) + torch.log1p(torch.tensor(-beta, dtype=lq.dtype)))
        return beta * _xlogr(p, lp, lm) + (1 - beta) * _xlogr(q, lq, lm)
    return 0.5 * (p - q).abs().sum(-1)


def distill_rows_reference(student_logits, teacher_logits, target, kind: int, beta: float, temperature: float,
                           hard_weight: float, ignore_index: int):
    """Per-row T^2 * soft + hard_weight * CE of (N, V) logits; the teacher is detached. Ignored
    rows give exactly 0 and a zero gradient, whatever their logits hold (NaN and inf included)."""
    teacher_logits = teacher_logits.detach()
    if target is not None:
        valid = (target != ignore_index)[:, None]
        student_logits = torch.where(valid, student_logits, 0)
        teacher_logits = torch.where(valid, teacher_logits, 0)
    lq = F.log_softmax(student_logits / temperature, -1)
    lp = F.log_softmax(teacher_logits / temperature, -1)
    rows = temperature ** 2 * soft_rows_reference(lq, lp, kind, beta)
    return _with_hard_rows(rows, student_logits, target, hard_weight, ignore_index)


def _with_hard_rows(rows, student_logits, target, hard_weight: float, ignore_index: int):
    """The references' common end: ignored rows exactly 0, plus hard_weight * CE on the target."""
    if target is None:
        return rows
    rows = torch.where(target != ignore_index, rows, 0)
    if hard_weight:
        rows = rows + hard_weight * F.cross_entropy(student_logits, target, ignore_index=ignore_index,
                                                    reduction="none")
    return rows


def _tail_log(mass: torch.Tensor) -> torch.Tensor:
    """log of a tail mass, floored at the dtype's smallest normal so that an empty tail is finite."""
    return torch.log(mass.clamp(min=torch.finfo(mass.dtype).tiny))


def topk_rows_reference(student_logits, topk_ids, topk_logprobs, target, kind: int, beta: float,
                        temperature: float, hard_weight: float, ignore_index: int, tail: str):
    """Per-row top-k distillation loss by autograd (the rule is in slmfast/ops/distill_loss.py)."""
    if target is not None:  # ignored rows: exactly 0 and no gradient, whatever they hold
        valid = (target != ignore_index)[:, None]
        student_logits = torch.where(valid, student_logits, 0)
        topk_logprobs = torch.where(valid, topk_logprobs, 0)
    lq_full = F.log_softmax(student_logits / temperature, -1)
    lq_k = lq_full.gather(-1, topk_ids)
    lp = topk_logprobs.to(lq_full.dtype)
    if tail == "none" or topk_ids.shape[-1] == student_logits.shape[-1]:  # k = V: no tail
        lq = F.log_softmax(lq_k, -1)
        lp_t = F.log_softmax(lp / temperature, -1)
    else:
        not_k = torch.ones_like(lq_full, dtype=torch.bool).scatter(-1, topk_ids, False)
        q_tail = (lq_full.exp() * not_k).sum(-1, keepdim=True)
        lq = torch.cat([lq_k, _tail_log(q_tail)], -1)
        p_tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
        lp_t = F.log_softmax(torch.cat([lp, _tail_log(p_tail)], -1) / temperature, -1)
    rows = temperature ** 2 * soft_rows_reference(lq, lp_t, kind, beta)
    return _with_hard_rows(rows, student_logits, target, hard_weight, ignore_index)


# ---- row kernels of the torch backend: explicit formulas, gradient over the logits ----------

def _ce_grad(s, target):
    """d CE(s, target) / d s = softmax(s) - onehot(target), per row (the 1 subtracted in place: no
    (C, V) int64 one-hot)."""
    return torch.softmax(s, -1).scatter_add_(1, target[:, None], torch.full_like(s[:, :1], -1))


def ce_rows_torch(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """Loss and lse per row (acc dtype); with grad_scale (rows or one value), the scaled
    gradient is written over logits. The formulas of CrossEntropyParams (csrc/common/params.h)."""
    acc = acc_dtype(logits.dtype)
    a = logits.to(acc)
    z = softcap * torch.tanh(a / softcap) if softcap > 0 else a
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    lse = torch.logsumexp(z, -1)
    z_y = z.gather(1, safe[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * z_y + z_loss * lse * lse
    if label_smoothing > 0:
        loss = loss - label_smoothing / z.shape[1] * z.sum(-1)
    loss = torch.where(valid, loss, 0)
    if grad_scale is not None:
        scale = torch.where(valid, grad_scale.to(acc).expand(len(valid)), 0)[:, None]
        d = torch.softmax(z, -1) * (1 + 2 * z_loss * lse[:, None]) - label_smoothing / z.shape[1]
        d.scatter_add_(1, safe[:, None], torch.full_like(z_y[:, None], label_smoothing - 1))
        if softcap > 0:
            d = d * (1 - (z / softcap) ** 2)
        logits.copy_(torch.where(valid[:, None], d * scale, 0))  # ignored: 0 even for NaN logits
    return loss, torch.where(valid, lse, 0)


def ce_grad_values(a, lse, scale, at_target, cols: int, label_smoothing: float, z_loss: float,
                   softcap: float):
    """Elements of the cross-entropy gradient, from the logits a themselves and their row's lse.

    a: logits (float32), lse: the log-sum-exp of the row's (softcapped) logits, scale: the row's
    gradient scale, at_target: whether a is the row's target logit; all broadcastable. With z =
    softcap tanh(a / softcap) (z = a without softcap) and eps = label_smoothing:
        d = scale (exp(z - lse) (1 + 2 z_loss lse) - eps / cols - (1 - eps) at_target)
            x (1 - (z / softcap)^2)          (the last factor only with softcap)
    the gradient ce_rows_torch and the row kernels (CrossEntropyParams, csrc/common/params.h)
    write for one element of a row of `cols` logits."""
    if softcap > 0:
        u = torch.tanh(a / softcap)
        z = softcap * u
    else:
        z = a
    d = torch.exp(z - lse) * (1 + 2 * z_loss * lse) - label_smoothing / cols \
        - (1 - label_smoothing) * at_target
    if softcap > 0:
        d = d * (1 - u * u)
    return scale * d


def ce_tile_grad_(logits, target, lse, grad_scale, col0: int, cols: int, ignore_index: int,
                  label_smoothing: float, z_loss: float, softcap: float) -> torch.Tensor:
    """The cross-entropy gradient of a tile of columns, written over the tile (the tile gradient
    of the `torch` backend); returns the tile.

    logits (C, Vt) holds columns [col0, col0 + Vt) of C rows whose full rows have `cols` columns;
    lse (C,) is each full row's log-sum-exp of the (softcapped) logits (float32, as the row
    kernels leave it), so one tile needs none of the row's other columns; grad_scale: one value
    or (C,). Each element gets ce_grad_values (the formula is there), in float32, rounded once;
    rows whose target is ignore_index get exactly 0, whatever their logits hold."""
    valid = target != ignore_index                                                    # (C,)
    scale = grad_scale.to(torch.float32).expand(len(valid))                           # (C,)
    columns = torch.arange(col0, col0 + logits.shape[1], device=logits.device)        # (Vt,)
    d = ce_grad_values(logits.to(torch.float32), lse[:, None], scale[:, None], columns == target[:, None],
                       cols, label_smoothing, z_loss, softcap)                        # (C, Vt)
    return logits.copy_(torch.where(valid[:, None], d, 0))


def _soft_weights(lq, lp, kind: int, beta: float, with_loss: bool = True):
    """(soft loss per row, w = Q * dL/dQ per column) from log Q and log P (last dim); the loss is
    None without with_loss (the tile gradients need w alone)."""
    # Terms with a probability of exactly 0 count 0 (0 log 0 = 0); `== 0`, not `> 0`, so that a
    # NaN probability (from a NaN logit) reaches the loss instead of being dropped.
    q, p = lq.exp(), lp.exp()
    if kind == 0:
        return (torch.where(p == 0, 0, p * (lp - lq)).sum(-1) if with_loss else None), -p
    if kind == 1:
        w = torch.where(q == 0, 0, q * (lq - lp + 1))
        return (torch.where(q == 0, 0, q * (lq - lp)).sum(-1) if with_loss else None), w
    if kind == 2:
        lm = torch.logaddexp(lp + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                             lq + torch.log1p(torch.tensor(-beta, dtype=lq.dtype)))
        w = (1 - beta) * torch.where(q == 0, 0, q * (lq - lm))
        if not with_loss:
            return None, w
        return (beta * torch.where(p == 0, 0, p * (lp - lm))).sum(-1) + w.sum(-1), w
    return (0.5 * (p - q).abs().sum(-1) if with_loss else None), 0.5 * q * torch.sign(q - p)


def _finish_soft_rows(student, s, loss, soft_grad, target, grad_scale, temperature: float, hard_weight: float,
                      ignore_index: int):
    """The part every distillation row function shares, from the soft loss per row (already
    times T^2) on: adds hard_weight * CE(s, target), gives ignored rows exactly 0, and with
    grad_scale writes the scaled gradient T soft_grad() + hard_weight (softmax(s) - onehot(y))
    over student (exactly 0 on ignored rows, even where their logits hold NaN). soft_grad() is
    dL/du / T^2 for u = s / T, called only when the gradient is asked for. s is student in the
    accumulation dtype."""
    valid = target != ignore_index if target is not None else None
    hard = hard_weight > 0 and target is not None
    if hard:
        loss = loss + hard_weight * F.cross_entropy(s, torch.where(valid, target, 0), reduction="none")
    if valid is not None:
        loss = torch.where(valid, loss, 0)
    if grad_scale is not None:
        hard_grad = (lambda: _ce_grad(s, torch.where(valid, target, 0))) if hard else None
        student.copy_(_scaled_grad(soft_grad(), hard_grad, valid, grad_scale, temperature, hard_weight))
    return loss


def _scaled_grad(soft_grad, hard_grad, valid, grad_scale, temperature: float, hard_weight: float):
    """T soft_grad + hard_weight hard_grad() (the CE gradient; None: no hard loss) times each row's
    grad_scale (one value or (rows,)), exactly 0 on the rows that are not valid (None: all are)."""
    d = temperature * soft_grad
    if hard_grad is not None:
        d = d + hard_weight * hard_grad()
    d = d * grad_scale.to(d.dtype).expand(d.shape[0])[:, None]
    return d if valid is None else torch.where(valid[:, None], d, 0)


def distill_rows_torch(student, teacher, target, grad_scale, kind, beta, temperature, hard_weight,
                       ignore_index, with_stats: bool = False):
    """Per-row loss (acc dtype); with grad_scale, the scaled gradient written over student.
    with_stats: (loss, stats), stats (C, 4) the row constants of distill_tile_grad_."""
    acc = acc_dtype(student.dtype)
    s = student.to(acc)
    lq = F.log_softmax(s / temperature, -1)
    lp = F.log_softmax(teacher.to(acc) / temperature, -1)
    soft, w = _soft_weights(lq, lp, kind, beta)
    stats = None
    if with_stats:  # before the gradient overwrites student (which s is, for acc-dtype logits)
        lse1 = _row_lse(s) if hard_weight > 0 and target is not None else torch.zeros_like(soft)
        stats = torch.stack([_row_lse(s / temperature), _row_lse(teacher.to(acc) / temperature), lse1,
                             w.sum(-1)], 1)
    loss = _finish_soft_rows(student, s, temperature ** 2 * soft,
                             lambda: w - lq.exp() * w.sum(-1, keepdim=True),  # dL/du / T^2
                             target, grad_scale, temperature, hard_weight, ignore_index)
    return (loss, stats) if with_stats else loss


def _row_lse(x):
    """The log-sum-exp of each row (last dim) as log_softmax forms it: NaN where the row holds
    +inf (torch.logsumexp gives +inf there, log_softmax NaN), so that a tile gradient rebuilt from
    it is non-finite wherever the row function's is."""
    lse = torch.logsumexp(x, -1)
    return torch.where(lse == float("inf"), float("nan"), lse)


def distill_kernel_stats(stats, kind: int, temperature: float, hard: bool):
    """The row constants of distill_tile_grad_ (C, 4) from the distillation row kernels' stats
    (C, 7): max s, max t, log sum exp((s - max s) / T), log sum exp((t - max t) / T), log sum
    exp(s - max s), c, c2 (csrc/common/params.h). The log-sum-exps are max / T + the log-sums; the
    row sum of w is -1 (forward_kl: w = -P), c + 1 (reverse_kl: c = KL(Q || P)), c (jsd: c = sum w)
    or (c - c2) / 2 (tvd: c, c2 the masses where Q > P and Q < P)."""
    m_s, m_t, log_su, log_sv, log_sh, c, c2 = stats.unbind(1)                         # (C,) each
    inv_t = 1.0 / temperature
    lse1 = m_s + log_sh if hard else torch.zeros_like(m_s)
    sum_w = (-torch.ones_like(c), c + 1, c, 0.5 * (c - c2))[kind]
    return torch.stack([m_s * inv_t + log_su, m_t * inv_t + log_sv, lse1, sum_w], 1)


def distill_tile_grad_(student, teacher, target, stats, grad_scale, col0: int, kind: int, beta: float,
                       temperature: float, hard_weight: float, ignore_index: int):
    """The distillation gradient of a tile of columns, written over the student's tile (R, Vt);
    returns it (two_pass's second pass, slmfast/ops/distill_loss.py).

    student, teacher: columns [col0, col0 + Vt) of R rows of logits; stats (R, 4): each full row's
    log-sum-exp of s / T, of t / T and of s (0 without a hard loss) and the row sum of w, from
    distill_rows_torch(with_stats=True) or distill_kernel_stats. log Q = s / T - lse, log P =
    t / T - lse_t, w = _soft_weights' per column, and the column's gradient is what the row
    functions write: T (w - Q sum w) + hard_weight (exp(s - lse_s) - onehot(y)), times the row's
    grad_scale, exactly 0 on ignored rows. Float32 temporaries of (R, Vt)."""
    acc = acc_dtype(student.dtype)
    s = student.to(acc)                                                               # (R, Vt)
    lq = s / temperature - stats[:, 0:1]                                              # (R, Vt)
    _, w = _soft_weights(lq, teacher.to(acc) / temperature - stats[:, 1:2], kind, beta, with_loss=False)
    return _finish_tile_(student, s, w - lq.exp() * stats[:, 3:4], stats[:, 2], target, grad_scale, col0,
                         temperature, hard_weight, ignore_index)


def _finish_tile_(student, s, soft_grad, lse1, target, grad_scale, col0: int, temperature: float,
                  hard_weight: float, ignore_index: int):
    """The tile gradients' common end (_finish_soft_rows' gradient on columns [col0, col0 + Vt)):
    T soft_grad + hard_weight (exp(s - lse1) - onehot(y)), scaled, 0 on ignored rows, written
    over student; lse1 (R,) the full rows' log-sum-exp of s."""
    valid = target != ignore_index if target is not None else None

    def hard_grad():  # softmax(s) - onehot(y) on the tile's columns
        columns = torch.arange(col0, col0 + s.shape[1], device=s.device)             # (Vt,)
        return torch.exp(s - lse1[:, None]) - (columns == target[:, None]).to(s.dtype)

    hard = hard_weight > 0 and target is not None
    return student.copy_(_scaled_grad(soft_grad, hard_grad if hard else None, valid, grad_scale, temperature,
                                      hard_weight))


def topk_tail(tail: str, k: int, vocab: int) -> str:
    """The tail a top-k row uses: "none" when k = V (no tail), else the one asked for."""
    return "none" if k == vocab else tail


def topk_rows_torch(student, topk_ids, topk_logprobs, target, grad_scale, kind, beta, temperature,
                    hard_weight, ignore_index, tail, with_stats: bool = False):
    """Per-row top-k loss; with grad_scale, the scaled gradient over student. With w_o = Q_S(o)
    dL/dQ_S(o) on the outcomes o (the k ids, and the tail bucket): for a column m of outcome o(m),
    dL/du_m = w_o(m) Q_m / Q_S(o(m)) - Q_m sum_o w_o (tail="bucket", Q_S the full softmax grouped);
    for tail="none" (Q_S renormalized over the k ids) dL/du_m = w_m - Q_S(m) sum w on the ids, 0 off them.
    with_stats: (loss, stats), stats (C, 4 + k) the row constants of topk_tile_grad_."""
    acc = acc_dtype(student.dtype)
    s = student.to(acc)
    lq_full = F.log_softmax(s / temperature, -1)
    lq_k = lq_full.gather(-1, topk_ids)
    lp = topk_logprobs.to(acc)
    tail = topk_tail(tail, topk_ids.shape[-1], s.shape[-1])
    if tail == "none":
        lq = F.log_softmax(lq_k, -1)
        lp_t = F.log_softmax(lp / temperature, -1)
    else:
        not_k = torch.ones_like(s, dtype=torch.bool).scatter_(-1, topk_ids, False)
        q_tail = (lq_full.exp() * not_k).sum(-1, keepdim=True)
        lq = torch.cat([lq_k, _tail_log(q_tail)], -1)
        p_tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
        lp_t = F.log_softmax(torch.cat([lp, _tail_log(p_tail)], -1) / temperature, -1)
    soft, w = _soft_weights(lq, lp_t, kind, beta)
    c = w.sum(-1, keepdim=True)                                                       # (C, 1)
    ratio = None
    if tail != "none":  # the tail bucket's dL/du per unit of Q on the columns outside the k ids
        ratio = torch.where(q_tail > 0, w[:, -1:] / q_tail.clamp(min=torch.finfo(acc).tiny), 0)  # (C, 1)

    def soft_grad():
        if tail == "none":
            return torch.zeros_like(s).scatter_(-1, topk_ids, w - lq.exp() * c)
        q = lq_full.exp()
        return torch.where(not_k, q * ratio, 0).scatter_(-1, topk_ids, w[:, :-1]) - q * c

    stats = None
    if with_stats:  # before the gradient overwrites student (which s is, for acc-dtype logits)
        lse = _row_lse(s / temperature)[:, None]                                      # (C, 1)
        if tail == "none":  # Q_S(m) = exp(s_m / T - lse - log sum_k Q)
            lse = lse + torch.logsumexp(lq_k, -1, keepdim=True)
        hard = hard_weight > 0 and target is not None
        lse1 = _row_lse(s)[:, None] if hard else torch.zeros_like(c)                 # (C, 1)
        k = topk_ids.shape[-1]
        stats = torch.cat([lse, lse1, c, ratio if ratio is not None else torch.zeros_like(c), w[:, :k]], 1)
    loss = _finish_soft_rows(student, s, temperature ** 2 * soft, soft_grad, target, grad_scale, temperature,
                             hard_weight, ignore_index)
    return (loss, stats) if with_stats else loss


def topk_tile_grad_(student, topk_ids, target, stats, grad_scale, col0: int, kind: int, beta: float,
                    temperature: float, hard_weight: float, ignore_index: int, tail: str):
    """The top-k gradient of a tile of columns [col0, col0 + Vt) of R rows, written over the
    student's tile (R, Vt); returns it (two_pass's second pass). stats (R, 4 + k) from
    topk_rows_torch(with_stats=True): lse (of s / T; for tail="none" that of the k ids' group, so
    that exp(s / T - lse) is Q_S on an id), the log-sum-exp of s (0 without a hard loss), c = sum_o
    w_o, the bucket's ratio w_tail / Q_tail (0 for "none") and w on the k ids. Per column, as
    topk_rows_torch: an id inside the tile gets w_m - Q c, any other column Q (ratio - c) (bucket)
    or 0 (none); then the hard loss, the scale and the ignored rows as the row functions do.
    tail: topk_tail's (k = V is "none"). Float32 temporaries of (R, Vt + 1)."""
    acc = acc_dtype(student.dtype)
    s = student.to(acc)                                                               # (R, Vt)
    width = s.shape[1]
    q = torch.exp(s / temperature - stats[:, 0:1])                                    # (R, Vt)
    inside = (topk_ids >= col0) & (topk_ids < col0 + width)                           # (R, k)
    col = torch.where(inside, topk_ids - col0, width)  # ids outside the tile: a spare last column  # (R, k)
    is_id = torch.zeros(s.shape[0], width + 1, dtype=torch.bool, device=s.device).scatter_(
        1, col, True)[:, :width]                                                      # (R, Vt)
    w_at = torch.zeros(s.shape[0], width + 1, dtype=acc, device=s.device).scatter_(
        1, col, stats[:, 4:])[:, :width]                                              # (R, Vt)
    c = stats[:, 2:3]                                                                 # (R, 1)
    if tail == "none":
        soft = torch.where(is_id, w_at - q * c, 0)
    else:
        soft = torch.where(is_id, w_at, q * stats[:, 3:4]) - q * c
    return _finish_tile_(student, s, soft, stats[:, 1], target, grad_scale, col0, temperature, hard_weight,
                         ignore_index)


# ---- sampled teacher (random-sampling KD): references and row kernels -----------------------
#
# Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs":
# instead of the teacher's top k, keep a few tokens drawn from the teacher, as (id, weight) pairs
# per row. With x_1..x_N drawn from the tempered teacher P_T and weights w(x) = count(x) / N
# (or count(x) / N * P_T(x) / r(x) for draws from another proposal r), sum_x w(x) f(x) is an
# unbiased estimate of E_P_T[f] for every f. The row loss
#     T^2 * (-sum_j w_j log Q_T(id_j) - H_row)
# with Q_T = softmax(s / T) over the FULL vocabulary is then, in expectation, T^2 * (CE(P_T, Q_T)
# - H_row): with H_row the teacher's entropy H(P_T) that is T^2 KL(P_T || Q_T) exactly, and its
# gradient T (W Q_T - w) (W = sum_j w_j, 1 for counts) has expectation T (Q_T - P_T), the
# gradient of full forward-KL distillation. Normalizing the student over the sampled ids only
# would bias it (as top-k is biased); the entropy is a constant that carries no gradient.


def sampled_rows_reference(student_logits, sample_ids, sample_weights, entropy, target, temperature: float,
                           hard_weight: float, ignore_index: int):
    """Per-row sampled-teacher loss by autograd: T^2 (-sum_j w_j log_softmax(s / T)[id_j] - H) (+ hard
    CE); weights as given (already normalized). Entries of weight exactly 0 count 0 (padding)."""
    if target is not None:  # ignored rows: exactly 0 and no gradient, whatever they hold
        valid = (target != ignore_index)[:, None]
        student_logits = torch.where(valid, student_logits, 0)
    lq = F.log_softmax(student_logits / temperature, -1).gather(-1, sample_ids)      # (N, m)
    w = sample_weights.to(lq.dtype)
    rows = -torch.where(w == 0, 0, w * lq).sum(-1)
    if entropy is not None:
        rows = rows - entropy.to(rows.dtype)
    return _with_hard_rows(temperature ** 2 * rows, student_logits, target, hard_weight, ignore_index)


def sampled_rows_torch(student, sample_ids, sample_weights, entropy, target, grad_scale, temperature,
                       hard_weight, ignore_index):
    """Per-row sampled-teacher loss; with grad_scale, the scaled gradient over student:
    d loss / d s = T (W softmax(s / T) - scatter(w)) + hard_weight (softmax(s) - onehot(y))."""
    acc = acc_dtype(student.dtype)
    s = student.to(acc)
    lq = F.log_softmax(s / temperature, -1)                                           # (C, V)
    w = sample_weights.to(acc)                                                        # (C, m)
    loss = -torch.where(w == 0, 0, w * lq.gather(-1, sample_ids)).sum(-1)
    if entropy is not None:
        loss = loss - entropy.to(acc)
    return _finish_soft_rows(
        student, s, temperature ** 2 * loss,
        lambda: lq.exp_().mul_(w.sum(-1, keepdim=True)).scatter_add_(-1, sample_ids, -w),  # (C, V)
        target, grad_scale, temperature, hard_weight, ignore_index)


def sampled_dense_teacher(sample_ids, sample_weights, vocab: int, temperature: float, dtype):
    """(C, V) teacher logits t whose softmax(t / T) is the normalized sampled distribution w / W:
    t = T log w on the sampled ids, -inf (probability exactly 0) everywhere else. Lets the dense
    distillation row kernels compute the sampled loss's gradient (slmfast/ops/distill_loss.py)."""
    w = sample_weights.to(torch.float32)
    logw = torch.log(w.clamp(min=torch.finfo(torch.float32).tiny))
    vals = torch.where(w > 0, temperature * logw, -torch.inf)                         # (C, m)
    t = torch.full((sample_ids.shape[0], vocab), -torch.inf, dtype=torch.float32, device=sample_ids.device)
    # amax: a weight-0 padding entry that shares an id with a sampled one must not overwrite it
    t.scatter_reduce_(-1, sample_ids, vals, reduce="amax")                            # (C, V)
    return t.to(dtype)


def sampled_row_entropy(sample_weights):
    """(W, H(w / W)) per row: the weights' sum and the entropy of the normalized sampled distribution."""
    w = sample_weights.to(torch.float32 if sample_weights.dtype != torch.float64 else torch.float64)
    total = w.sum(-1)
    p = w / total.clamp(min=torch.finfo(w.dtype).tiny)[:, None]
    return total, -torch.where(p > 0, p * torch.log(p.clamp(min=torch.finfo(w.dtype).tiny)), 0).sum(-1)
