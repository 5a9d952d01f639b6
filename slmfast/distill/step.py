"""The student and its loss as one module: what DDP/FSDP wrap and what the loop calls.

Wrapping the loss together with the student matters for the parallel wrappers: DDP and FSDP
hook a module's forward, and the LM-head weight is used by the loss, not by the student's
hidden-state forward; inside one forward both run while FSDP has the weights gathered.

Losses (slmfast.functional), all on final hidden states and the LM-head weight, chunked, so the
(tokens x vocab) logits of neither model are materialized:
  * with a live teacher: distill_loss(student_hidden, W_s, teacher_hidden, W_t, target, kind, beta,
    temperature, hard_weight=alpha): soft loss x T^2 (Hinton et al. 2015) + alpha * CE;
  * with the offline cache: topk_distill_loss against the cached top-k log-probabilities, or
    sampled_distill_loss against tokens drawn from the teacher (ids, counts, teacher entropy);
  * without a teacher (pretraining): linear_cross_entropy.
Every loss is a sum over the micro-batch's predicting positions divided by `num_items`, the count
over the whole accumulated (and all-reduced) batch, so accumulation and data parallelism give the
gradient of the mean over the global batch, whatever the split.

`mode="eval"` returns summed validation statistics instead (cross-entropy, and against the
teacher: KL(teacher || student) at temperature 1 and top-1 agreement), under no_grad: the
student's logits in token chunks, the KL by the fused distill_loss.
"""

from __future__ import annotations

import torch
from torch import nn

from slmfast import functional as F
from slmfast.distill.config import LossConfig

IGNORE_INDEX = -100
EVAL_FIELDS = ("ce_sum", "count", "kl_sum", "top1_sum")


class StepModule(nn.Module):
    def __init__(self, student: nn.Module, loss: LossConfig):
        super().__init__()
        self.student = student
        self.loss_cfg = loss

    def forward(self, input_ids, cu_seqlens, max_seqlen: int, targets, num_items=None,
                teacher_hidden=None, teacher_weight=None, teacher_bias=None, topk_ids=None,
                topk_logprobs=None, teacher_top1=None, mode: str = "loss", sample_ids=None,
                sample_counts=None, sample_entropy=None):
        hidden = self.student.hidden_states(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # (N, H)
        weight = self.student.output_weight                                                          # (V, H)
        if weight.dtype != hidden.dtype:            # autocast: the loss ops take one dtype
            weight = weight.to(hidden.dtype)
        if teacher_hidden is not None:
            teacher_hidden = teacher_hidden.to(hidden.dtype)                             # (N, Ht)
            teacher_weight = teacher_weight.to(hidden.dtype)                             # (Vt, Ht)
            teacher_bias = teacher_bias.to(hidden.dtype) if teacher_bias is not None else None
        if mode == "eval":
            return eval_stats(hidden, weight, targets, teacher_hidden, teacher_weight, teacher_bias,
                              teacher_top1)
        c = self.loss_cfg
        chunk = c.chunk_size or None
        if teacher_hidden is not None:
            return F.distill_loss(hidden, weight, teacher_hidden, teacher_weight, targets, kind=c.kind,
                                  beta=c.beta, temperature=c.temperature, hard_weight=c.alpha,
                                  ignore_index=IGNORE_INDEX, chunk_size=chunk, teacher_bias=teacher_bias,
                                  num_items=num_items)
        if topk_ids is not None:
            return F.topk_distill_loss(hidden, weight, topk_ids, topk_logprobs, target=targets, kind=c.kind,
                                       beta=c.beta, temperature=c.temperature, hard_weight=c.alpha,
                                       ignore_index=IGNORE_INDEX, tail=c.tail, chunk_size=chunk,
                                       num_items=num_items)
        if sample_ids is not None:
            return F.sampled_distill_loss(hidden, weight, sample_ids, sample_counts,
                                          teacher_entropy=sample_entropy, temperature=c.temperature,
                                          target=targets, hard_weight=c.alpha,
                                          ignore_index=IGNORE_INDEX, chunk_size=chunk, num_items=num_items)
        return F.linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, chunk_size=chunk,
                                      num_items=num_items)


@torch.no_grad()
def eval_stats(hidden, weight, targets, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
               teacher_top1=None, chunk: int = 1024) -> torch.Tensor:
    """Sums over predicting positions: [CE, count, KL(t||s), top-1 match] (4,) fp64. KL at
    temperature 1 by the fused distill_loss (no teacher logits kept); top-1 agreement against
    `teacher_top1` (N,), the teacher's argmax, which does not change between evaluations and is
    computed once (teacher_stats)."""
    out = torch.zeros(len(EVAL_FIELDS), dtype=torch.float64, device=hidden.device)
    valid_all = targets != IGNORE_INDEX                                                  # (N,)
    for start in range(0, hidden.shape[0], chunk):
        valid = valid_all[start:start + chunk]
        if not bool(valid.any()):
            continue
        h = hidden[start:start + chunk][valid]                                          # (C, H)
        t = targets[start:start + chunk][valid]                                         # (C,)
        s_logp = torch.log_softmax((h @ weight.T).float(), dim=-1)                      # (C, V)
        out[0] += -s_logp.gather(1, t[:, None]).sum().double()
        out[1] += t.numel()
        if teacher_top1 is not None:
            out[3] += (s_logp.argmax(-1) == teacher_top1[start:start + chunk][valid]).sum().double()
    if teacher_hidden is not None and bool(valid_all.any()):
        out[2] = F.distill_loss(hidden[valid_all], weight, teacher_hidden[valid_all], teacher_weight,
                                kind="forward_kl", temperature=1.0, teacher_bias=teacher_bias,
                                reduction="sum").double()
    return out


@torch.no_grad()
def teacher_stats(hidden, weight, bias, targets, vocab: int, chunk: int = 1024) -> tuple[float, torch.Tensor]:
    """The teacher's summed CE over predicting positions and its argmax (N,) over the first `vocab`
    columns (padding rows of a larger teacher vocabulary dropped)."""
    ce, top1 = 0.0, []
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start:start + chunk] @ weight[:vocab].T).float()              # (C, V)
        if bias is not None:
            logits += bias[:vocab].float()
        logp = torch.log_softmax(logits, dim=-1)                                        # (C, V)
        t = targets[start:start + chunk]
        valid = t != IGNORE_INDEX
        ce += float(-logp[valid].gather(1, t[valid][:, None]).sum())
        top1.append(logp.argmax(-1))
    return ce, torch.cat(top1)
