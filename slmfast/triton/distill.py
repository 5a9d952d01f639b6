"""Triton row kernel for the distillation losses (contract in slmfast/ops/distill_loss.py).

Same math as the distillation part of csrc/cpu/cross_entropy.cpp (Hinton et al. 2015 with T^2;
JSD(beta) as in GKD, Agarwal et al. 2023): one program per row walks the vocabulary in blocks.
Pass 1 keeps online maxima of s and t and the sums of exp((x - max) / T) (and of exp(s - max) for
a hard loss), so that log-probabilities are (x - max) / T - log sum as in log_softmax; pass 2
sums the soft loss and c, the row sum the gradient needs; pass 3 writes
    dL/ds = T * dL/du + hard_weight * (softmax(s) - onehot(y)),  u = s / T
times a per-row scale, in place of the student logits when asked. The per-row stats
(max s, max t, the three log-sums, c, c2) are returned so that a backward alone is pass 3 only.
Kinds: 0 forward_kl, 1 reverse_kl, 2 jsd (0 < beta < 1), 3 tvd. float32/bf16/fp16, fp32 math.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slmfast.triton.cross_entropy import _num_warps, block_size

NUM_STATS = 7


@triton.jit
def _log_mix(lp, lq, log_b, log_1mb):
    """log M = log(beta P + (1 - beta) Q) from log P and log Q, without underflow; NaN when
    either is NaN (tl.maximum and tl.minimum drop a NaN operand)."""
    a = lp + log_b
    b = lq + log_1mb
    hi = tl.maximum(a, b)
    lm = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
    return tl.where((a == a) & (b == b), lm, a + b)


@triton.jit
def _times_nonzero(x, v):
    """x * v with 0 where x == 0 exactly: 0 log 0 = 0, so a class whose probability is 0 (a -inf
    logit, a banned token) counts 0 although its log-ratio is infinite or NaN; a NaN x stays."""
    return tl.where(x == 0.0, 0.0, x * v)


@triton.jit
def _tvd_grad(q, p, above, below):
    """Q (a - sum Q a) for a = sign(Q - P) / 2, from the masses where Q > P (above) and Q < P
    (below): with sum Q = 1 the bracket is below, -above or (below - above) / 2, free of the
    cancellation of 1/2 - sum(Q a)."""
    return q * tl.where(q > p, below, tl.where(q < p, -above, 0.5 * (below - above)))


@triton.jit
def _rescale(m, m_new, inv_t):
    return tl.exp((m - m_new) * inv_t)


@triton.jit
def _distill_row_kernel(S, DS, T, TARGET, SCALE, LOSS, STATS, cols, s_stride, ds_stride, t_stride,
                        scale_stride, ignore_index, beta, log_b, log_1mb, temperature, hard_weight,
                        KIND: tl.constexpr, HAS_TARGET: tl.constexpr, HARD: tl.constexpr,
                        FORWARD: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * s_stride
    t_ptr = T + row * t_stride
    st_ptr = STATS + row * 7
    inv_t = 1.0 / temperature
    offs = tl.arange(0, BLOCK)
    valid = True
    y = -1
    if HAS_TARGET:
        y = tl.load(TARGET + row)
        valid = y != ignore_index
    if FORWARD:
        # Online maxima of the raw rows (ms, mt) and the sums of exp((x - max) / T) (and of
        # exp(s - ms) for the hard loss); log-probabilities are then (x - max) / T - log sum.
        mask = offs < cols
        s = tl.where(mask, tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32), float("-inf"))
        t = tl.where(mask, tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32), float("-inf"))
        ms = tl.max(s, 0)
        mt = tl.max(t, 0)
        su = tl.sum(tl.exp((s - ms) * inv_t), 0)
        sv = tl.sum(tl.exp((t - mt) * inv_t), 0)
        sh = tl.sum(tl.exp(s - ms), 0)
        for start in range(BLOCK, cols, BLOCK):
            cur = start + offs
            mask = cur < cols
            s = tl.where(mask, tl.load(s_ptr + cur, mask=mask, other=0.0).to(tl.float32), float("-inf"))
            t = tl.where(mask, tl.load(t_ptr + cur, mask=mask, other=0.0).to(tl.float32), float("-inf"))
            ms_new = tl.maximum(ms, tl.max(s, 0))
            mt_new = tl.maximum(mt, tl.max(t, 0))
            su = su * _rescale(ms, ms_new, inv_t) + tl.sum(tl.exp((s - ms_new) * inv_t), 0)
            sv = sv * _rescale(mt, mt_new, inv_t) + tl.sum(tl.exp((t - mt_new) * inv_t), 0)
            if HARD:
                sh = sh * tl.exp(ms - ms_new) + tl.sum(tl.exp(s - ms_new), 0)
            ms = ms_new
            mt = mt_new
        log_su = tl.log(su)
        log_sv = tl.log(sv)
        log_sh = tl.log(sh)
        soft = tl.sum(tl.zeros([BLOCK], tl.float32), 0)  # 0-d float32 accumulators
        c = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        c2 = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for start in range(0, cols, BLOCK):
            cur = start + offs
            mask = cur < cols
            lq = (tl.load(s_ptr + cur, mask=mask, other=0.0).to(tl.float32) - ms) * inv_t - log_su
            lp = (tl.load(t_ptr + cur, mask=mask, other=0.0).to(tl.float32) - mt) * inv_t - log_sv
            q = tl.exp(lq)
            p = tl.exp(lp)
            if KIND == 0:
                term = _times_nonzero(p, lp - lq)
                cterm = tl.zeros_like(term)
            elif KIND == 1:
                term = _times_nonzero(q, lq - lp)
                cterm = term
            elif KIND == 2:
                lm = _log_mix(lp, lq, log_b, log_1mb)
                cterm = (1.0 - beta) * _times_nonzero(q, lq - lm)
                term = beta * _times_nonzero(p, lp - lm) + cterm
            else:
                # masses where Q > P and Q < P (see _tvd_grad)
                term = 0.5 * tl.abs(p - q)
                cterm = tl.where(q > p, q, 0.0)
                c2 += tl.sum(tl.where(mask & (q < p), q, 0.0), 0)
            soft += tl.sum(tl.where(mask, term, 0.0), 0)
            c += tl.sum(tl.where(mask, cterm, 0.0), 0)
        loss = temperature * temperature * soft
        if HARD:
            s_y = tl.load(s_ptr + tl.where(valid, y, 0)).to(tl.float32)
            loss += hard_weight * ((ms - s_y) + log_sh)
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        tl.store(st_ptr + 0, tl.where(valid, ms, 0.0))
        tl.store(st_ptr + 1, tl.where(valid, mt, 0.0))
        tl.store(st_ptr + 2, tl.where(valid, log_su, 0.0))
        tl.store(st_ptr + 3, tl.where(valid, log_sv, 0.0))
        tl.store(st_ptr + 4, tl.where(valid, log_sh, 0.0))
        tl.store(st_ptr + 5, tl.where(valid, c, 0.0))
        tl.store(st_ptr + 6, tl.where(valid, c2, 0.0))
    else:
        ms = tl.load(st_ptr + 0)
        mt = tl.load(st_ptr + 1)
        log_su = tl.load(st_ptr + 2)
        log_sv = tl.load(st_ptr + 3)
        log_sh = tl.load(st_ptr + 4)
        c = tl.load(st_ptr + 5)
        c2 = tl.load(st_ptr + 6)
    if GRAD:
        scale = tl.load(SCALE + row * scale_stride).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        d_ptr = DS + row * ds_stride
        for start in range(0, cols, BLOCK):
            cur = start + offs
            mask = cur < cols
            s = tl.load(s_ptr + cur, mask=mask, other=0.0).to(tl.float32) - ms
            lq = s * inv_t - log_su
            lp = (tl.load(t_ptr + cur, mask=mask, other=0.0).to(tl.float32) - mt) * inv_t - log_sv
            q = tl.exp(lq)
            if KIND == 0:
                gu = q - tl.exp(lp)
            elif KIND == 1:
                gu = _times_nonzero(q, lq - lp - c)
            elif KIND == 2:
                gu = _times_nonzero(q, (1.0 - beta) * (lq - _log_mix(lp, lq, log_b, log_1mb)) - c)
            else:
                gu = _tvd_grad(q, tl.exp(lp), c, c2)
            d = gu * (temperature * scale)
            if HARD:
                d += hard_weight * scale * (tl.exp(s - log_sh) - tl.where(cur == y, 1.0, 0.0))
            d = tl.where(valid, d, 0.0)  # ignored rows: exactly 0, even where their logits hold NaN
            tl.store(d_ptr + cur, d.to(DS.dtype.element_ty), mask=mask)


def _launch(student, dstudent, teacher, target, scale, loss, stats, kind, beta, temperature, hard_weight,
            ignore_index, forward, grad):
    rows, cols = student.shape
    if rows == 0:
        return
    block = block_size(cols, student.device)
    jsd = kind == 2
    _distill_row_kernel[(rows,)](
        student, dstudent if dstudent is not None else student, teacher,
        target if target is not None else stats, scale if scale is not None else stats,
        loss if loss is not None else stats, stats, cols, student.stride(0),
        dstudent.stride(0) if dstudent is not None else 0, teacher.stride(0),
        (0 if scale.numel() == 1 else 1) if scale is not None else 0, ignore_index, float(beta),
        math.log(beta) if jsd else 0.0, math.log1p(-beta) if jsd else 0.0, float(temperature),
        float(hard_weight), KIND=kind, HAS_TARGET=target is not None, HARD=hard_weight > 0,
        FORWARD=forward, GRAD=grad, BLOCK=block, num_warps=_num_warps(block))


def distill_fwd(student, teacher, target, kind, beta, temperature, hard_weight, ignore_index):
    """Per-row loss (float32) and stats (rows, 4) of (rows, V) student and teacher logits."""
    rows = student.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(rows, NUM_STATS, dtype=torch.float32, device=student.device)
    _launch(student, None, teacher, target, None, loss, stats, kind, beta, temperature, hard_weight,
            ignore_index, True, False)
    return loss, stats


def distill_bwd(grad_loss, student, teacher, target, stats, kind, beta, temperature, hard_weight,
                ignore_index):
    """grad_loss[i] * dloss_i / dstudent from the saved stats."""
    dstudent = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _launch(student, dstudent, teacher, target, grad_loss, None, stats, kind, beta, temperature,
            hard_weight, ignore_index, False, True)
    return dstudent


def distill_fwd_bwd_(student, teacher, target, grad_scale, kind, beta, temperature, hard_weight,
                     ignore_index):
    """Per-row loss, and grad_scale * the gradient written over the student logits."""
    rows = student.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(rows, NUM_STATS, dtype=torch.float32, device=student.device)
    _launch(student, student, teacher, target, grad_scale, loss, stats, kind, beta, temperature,
            hard_weight, ignore_index, True, True)
    return loss
