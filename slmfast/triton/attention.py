"""Triton kernels for fused attention (contract and autograd in slmfast/ops/attention.py).

FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning"): the forward tiles the queries, streams key/value blocks through an online softmax
in float32 and writes only the output and the row log-sum-exp (natural log); the backward saves
nothing else and recomputes the probabilities block by block. The structure follows Triton's
fused-attention tutorial (masked / unmasked inner loops, exp2 with log2(e) folded into the scale,
a transposed dK/dV pass and a separate dQ pass), written for this library's contract:

  layouts  dense  q (B, Hq, T, D), k/v (B, Hkv, S, D), out like q, lse float32 (B, Hq, T)
           packed q (Nq, Hq, D), k/v (Nk, Hkv, D), cu_seqlens_q/k int32 (docs + 1,), out like q,
                  lse float32 (Nq, Hq); a program works inside one document and never reads
                  another's rows (the document comes from the grid, its rows from cu_seqlens).
           Any strides, the last dim contiguous (a non-contiguous last dim is copied first).
  GQA/MQA  query head h reads kv head h // (Hq // Hkv): index mapping, K/V never repeated.
  masks    the contract's mask (causal, window, per document; stated in slmfast/ops/attention.py)
           is a band of diagonals: with offset = S - T, causality is its right edge at 0, so the
           kernels see one band j - i in [offset - left, offset + right], either side optional.
           The loop bounds come from the band: key blocks that no row of a query block can see
           are never visited (and the same for query blocks in the dK/dV pass); blocks that
           every row sees fully run without mask arithmetic; only the edge blocks are masked.
           A row with no visible key gets out = 0 and lse = -inf; its gradients are 0. No NaN.
  dtypes   float32, bfloat16, float16; float32 accumulation and softmax statistics. Half types
           use the tensor cores and take scores in the log2 domain (log2(e) folded into the
           scale: one FMA + exp2 per score). Float32 uses input_precision="ieee" (no TF32) and
           keeps scores in the natural-log domain (_exp_scores), so that it rounds like torch's
           float32 softmax. Head dims up to 256: D is padded to a power of two (>= 16) inside the
           kernels with masks, so D = 40, 80, 96 work.

Kernels, what bounds each (counted for a dense non-causal head of T = S rows and head dim D, times
B*Hq heads; causal halves the FLOPs; e = bytes per element), and the floor on an H100 SXM (about
790 TFLOP/s of bf16 tensor-core work, 3.0 TB/s of HBM) at (B, Hq=Hkv, T=S, D) = (4, 16, 4096, 128),
bf16:
  _attn_fwd_kernel      FLOPs 4*T*S*D (QK^T and PV)                 549.8 GFLOP -> 0.696 ms
                        bytes  e*(2*T + 2*S)*D + 4*T (q,k,v,out,lse) 269.5 MB    -> 0.090 ms
                        compute-bound by 7.7x; it also takes T*S exp2 (1.07 G, about 0.27 ms of
                        the MUFU units), which a Triton kernel does not overlap with the MMAs.
  _attn_bwd_preprocess  FLOPs 2*T*D (delta = rowsum(dout * out))    0.07 GFLOP
                        bytes  2*e*T*D + 12*T (out, dout, lse in; delta, lse_w out)
                                                                   137.4 MB    -> 0.046 ms (memory)
  _attn_bwd_dkdv_kernel FLOPs 8*T*S*D (QK^T again, dP = dO V^T, dV += P^T dO, dK += dS^T Q)
                                                                   1099.5 GFLOP -> 1.392 ms
                        bytes  e*(2*T + 4*S)*D + 8*T (q, do, k, v in; dk, dv out; lse, delta)
                                                                   404.8 MB    -> 0.135 ms
  _attn_bwd_dq_kernel   FLOPs 6*T*S*D (QK^T and dO V^T again, dQ += dS K)
                                                                   824.6 GFLOP -> 1.044 ms
                        bytes  e*(3*T + 2*S)*D + 8*T (q, do, k, v in; dq out; lse, delta)
                                                                   337.6 MB    -> 0.113 ms
  The dK/dV and dQ passes each take T*S exp2 as well. The backward thus executes 7 block
  products (14*T*S*D FLOPs, 2.44 ms floor) where the usual count is 2.5x the forward (10*T*S*D,
  1.74 ms): QK^T and dO V^T are recomputed in the dQ pass instead of accumulating dQ with atomics.
  That is the price of determinism: every gradient element is written by exactly one program, in
  a fixed order, so the backward is bit-identical run to run.
  `deterministic=False` takes the same path (there is no faster non-deterministic one here).

Autotuning: configs (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture (sm_90 and later,
sm_80 and others), per element size and head-dim class, keyed on the padded head dim, the mask
kind, the layout and the dtype (never on the sequence lengths, so varlen batches do not re-tune). The first
config of each list is the default; SLMFAST_TRITON_AUTOTUNE=0 uses it without timing runs (no
tuning pause, and the same tiling, hence the same bits, in every process: the autotuner may pick
different configs in different processes, and a different tiling sums in a different order).
Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) one small fixed config runs
(INTERPRET_BLOCKS).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453    # ln(2): ln(x) = log2(x) * LN2
_LOG2E = tl.constexpr(LOG2E)  # the same constants, visible inside @triton.jit functions
_LN2 = tl.constexpr(LN2)
MAX_HEAD_DIM = 256

# Block shapes when the kernels run under the interpreter (tests may change them to exercise other
# tilings): (BLOCK_M, BLOCK_N) of the forward, of the dK/dV pass and of the dQ pass. In each,
# BLOCK_M tiles the queries and BLOCK_N the keys.
INTERPRET_BLOCKS = {"fwd": (16, 32), "dkdv": (16, 32), "dq": (32, 16)}


# --------------------------------------------------------------------------------------------
# Shared helpers (inlined by the compiler)
# --------------------------------------------------------------------------------------------

@triton.jit
def _doc_rows(CU_Q, CU_K, batch, seqlen_q, seqlen_k, IS_PACKED: tl.constexpr):
    """First query row, first key row, and the query / key lengths of one batch row or document."""
    if IS_PACKED:
        q_start = tl.load(CU_Q + batch)
        k_start = tl.load(CU_K + batch)
        q_len = tl.load(CU_Q + batch + 1) - q_start
        k_len = tl.load(CU_K + batch + 1) - k_start
    else:
        q_start = batch * 0
        k_start = batch * 0
        q_len = seqlen_q + batch * 0
        k_len = seqlen_k + batch * 0
    return q_start, k_start, q_len, k_len


@triton.jit
def _band_blocks(r0, r_end, n_other, lo_diff, hi_diff,
                 HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr):
    """Block loop bounds for rows r in [r0, r_end] that see the other index x iff
    0 <= x < n_other, x - r >= lo_diff (when HAS_LO) and x - r <= hi_diff (when HAS_HI).

    Returns (start, mid_lo, mid_hi, end): blocks in [start, mid_lo) and [mid_hi, end) need the
    mask, blocks in [mid_lo, mid_hi) are fully visible to every row and lie inside [0, n_other).
    Blocks outside [start, end) are invisible to every row and are not visited. All but `end` are
    multiples of BLOCK (or equal to `end`). Divisions only see non-negative numbers, because the
    compiled `//` truncates while the interpreter's floors.
    """
    lo = r0 * 0
    hi = n_other + r0 * 0
    if HAS_LO:
        lo = tl.maximum(r0 + lo_diff, 0)
    if HAS_HI:
        hi = tl.minimum(r_end + hi_diff + 1, n_other)
    start = (lo // BLOCK) * BLOCK
    end = tl.maximum(hi, start)
    full_lo = start
    if HAS_LO:
        full_lo = tl.maximum(((tl.maximum(r_end + lo_diff, 0) + BLOCK - 1) // BLOCK) * BLOCK, start)
    full_hi = (n_other // BLOCK) * BLOCK
    if HAS_HI:
        full_hi = tl.minimum(full_hi, (tl.maximum(r0 + hi_diff + 1, 0) // BLOCK) * BLOCK)
    mid_lo = tl.minimum(full_lo, end)
    mid_hi = tl.maximum(full_hi, mid_lo)
    return start, mid_lo, mid_hi, end


@triton.jit
def _band_mask(rows, cols, lo_diff, hi_diff, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """(rows, cols) boolean: cols - rows within [lo_diff, hi_diff] on the sides that exist."""
    diff = cols[None, :] - rows[:, None]
    visible = diff == diff
    if HAS_LO:
        visible = visible & (diff >= lo_diff)
    if HAS_HI:
        visible = visible & (diff <= hi_diff)
    return visible


@triton.jit
def _exp_scores(s, m, PRECISE: tl.constexpr):
    """exp(score - row statistic) where both are in the score domain: the log2 domain (scores
    already times scale * log2(e)) unless PRECISE, which keeps float32 inputs in the natural-log
    domain and converts the difference, so that it rounds like torch's exp(s - max) (one multiply
    more per score; the half-precision paths do not need it)."""
    if PRECISE:
        return tl.exp2((s - m) * _LOG2E)
    else:
        return tl.exp2(s - m)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                n_start, n_end, k_len, lo_diff, hi_diff, qk_scale,
                MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """Online softmax over the key blocks [n_start, n_end): m_i is the running max of the scores
    (q.k * qk_scale, see _exp_scores for the domain), l_i the running sum of exp(score - m_i)."""
    d_ok = offs_d[None, :] < D
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n                                                     # (BLOCK_N,)
        if MASKED:
            kv_ok = (cols[:, None] < k_len) & d_ok
            k = tl.load(k_ptrs + n0 * stride_kn, mask=kv_ok, other=0.0)        # (BLOCK_N, HEAD_DIM)
        elif D == HEAD_DIM:
            k = tl.load(k_ptrs + n0 * stride_kn)
        else:
            k = tl.load(k_ptrs + n0 * stride_kn, mask=d_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)            # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = _band_mask(offs_m, cols, lo_diff, hi_diff, HAS_LO, HAS_HI)
            visible = visible & (cols[None, :] < k_len)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
        p = _exp_scores(qk * qk_scale, m_use[:, None], PRECISE)  # one FMA + exp2 per score
        alpha = _exp_scores(m_i, m_use, PRECISE)                                # (BLOCK_M,)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + n0 * stride_vn, mask=kv_ok, other=0.0)        # (BLOCK_N, HEAD_DIM)
        elif D == HEAD_DIM:
            v = tl.load(v_ptrs + n0 * stride_vn)
        else:
            v = tl.load(v_ptrs + n0 * stride_vn, mask=d_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, OUT, LSE, CU_Q, CU_K,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                     stride_lb, stride_lh, stride_lm,
                     seqlen_q, seqlen_k, group, qk_scale, window_left, window_right,
                     D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, IS_PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     PRECISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, query head, batch row or document)."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    if HAS_RIGHT and not HAS_LEFT:
        pid_m = tl.num_programs(0) - 1 - pid_m  # causal: the longest rows first
    q_start, k_start, q_len, k_len = _doc_rows(CU_Q, CU_K, batch, seqlen_q, seqlen_k, IS_PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:  # past this document's end (packed) or the last row
        return
    kv_head = head // group
    offset = k_len - q_len
    lo_diff = offset - window_left   # key j visible to query i iff j - i in [lo_diff, hi_diff]
    hi_diff = offset + window_right

    offs_m = m0 + tl.arange(0, BLOCK_M)                                        # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)                                             # (BLOCK_N,)
    offs_d = tl.arange(0, HEAD_DIM)                                            # (HEAD_DIM,)
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh \
        + q_start.to(tl.int64) * stride_qm
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh \
        + k_start.to(tl.int64) * stride_kn
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh \
        + k_start.to(tl.int64) * stride_vn
    row_ok = (offs_m[:, None] < q_len) & (offs_d[None, :] < D)                 # (BLOCK_M, HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok, other=0.0)
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]            # (BLOCK_N, HEAD_DIM)
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_end = tl.minimum(m0 + BLOCK_M, q_len) - 1
    start, mid_lo, mid_hi, end = _band_blocks(m0, m_end, k_len, lo_diff, hi_diff,
                                              HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_LEFT:  # without a left edge [start, mid_lo) is empty
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m,
                                    offs_n, offs_d, start, mid_lo, k_len, lo_diff, hi_diff,
                                    qk_scale, True, HAS_LEFT, HAS_RIGHT, D, HEAD_DIM, BLOCK_N,
                                    DOT_PRECISION, PRECISE)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m,
                                offs_n, offs_d, mid_lo, mid_hi, k_len, lo_diff, hi_diff, qk_scale,
                                False, HAS_LEFT, HAS_RIGHT, D, HEAD_DIM, BLOCK_N, DOT_PRECISION,
                                PRECISE)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m,
                                offs_n, offs_d, mid_hi, end, k_len, lo_diff, hi_diff, qk_scale,
                                True, HAS_LEFT, HAS_RIGHT, D, HEAD_DIM, BLOCK_N, DOT_PRECISION,
                                PRECISE)

    seen = l_i != 0.0                      # rows with a visible key (NaN: a NaN or +inf score)
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]            # rows that saw nothing have acc == 0: out row = 0
    if PRECISE:
        lse = m_i + tl.log2(l_safe) * _LN2
    else:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    lse = tl.where(seen, lse, float("-inf"))
    o_base = OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh \
        + q_start.to(tl.int64) * stride_om
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok)
    l_base = LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh \
        + q_start.to(tl.int64) * stride_lm
    tl.store(l_base + offs_m * stride_lm, lse, mask=offs_m < q_len)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(OUT, DO, LSE, DELTA, LSE_W, rows,
                         stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
                         stride_lb, stride_lh, stride_lm, stride_wb, stride_wh,
                         D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISE: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """delta = rowsum(dout * out) and lse_w = lse in the score domain (times log2(e) unless
    PRECISE), +inf where lse = -inf so that the probabilities of a row that saw no key recompute
    as exp(x - inf) = 0; both float32 in the row-contiguous workspace layout (batch, head, row)."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                           # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_m[:, None] < rows) & (offs_d[None, :] < D)
    o = tl.load(OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
                 + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                    # (BLOCK_M,)
    lse = tl.load(LSE + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                  + offs_m.to(tl.int64) * stride_lm, mask=offs_m < rows, other=0.0)
    if not PRECISE:
        lse = lse * _LOG2E
    lse_w = tl.where(lse == float("-inf"), float("inf"), lse)
    w = batch.to(tl.int64) * stride_wb + head.to(tl.int64) * stride_wh + offs_m
    tl.store(DELTA + w, delta, mask=offs_m < rows)
    tl.store(LSE_W + w, lse_w, mask=offs_m < rows)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_w_ptr, delta_ptr, stride_qm, stride_dom,
                 offs_m, offs_n, offs_d, m_start, m_end, q_len, lo_diff, hi_diff, qk_scale,
                 MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                 D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key block over the query blocks [m_start, m_end),
    transposed: P^T = exp(K Q^T * qk_scale - lse_w), dV += P^T dO,
    dS^T = P^T * (V dO^T - delta), dK += dS^T Q. Visibility: row i - key j in [lo_diff, hi_diff]."""
    d_ok = offs_d[None, :] < D
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m                                                     # (BLOCK_M,)
        if MASKED:
            q_ok = (rows[:, None] < q_len) & d_ok
            q = tl.load(q_ptrs + m0 * stride_qm, mask=q_ok, other=0.0)         # (BLOCK_M, HEAD_DIM)
            do = tl.load(do_ptrs + m0 * stride_dom, mask=q_ok, other=0.0)
            lse_w = tl.load(lse_w_ptr + rows, mask=rows < q_len, other=0.0)       # (BLOCK_M,)
            delta = tl.load(delta_ptr + rows, mask=rows < q_len, other=0.0)
        else:
            if D == HEAD_DIM:
                q = tl.load(q_ptrs + m0 * stride_qm)
                do = tl.load(do_ptrs + m0 * stride_dom)
            else:
                q = tl.load(q_ptrs + m0 * stride_qm, mask=d_ok, other=0.0)
                do = tl.load(do_ptrs + m0 * stride_dom, mask=d_ok, other=0.0)
            lse_w = tl.load(lse_w_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)          # (BLOCK_N, BLOCK_M)
        p_t = _exp_scores(qk_t * qk_scale, lse_w[None, :], PRECISE)
        if MASKED:
            visible = _band_mask(offs_n, rows, lo_diff, hi_diff, HAS_LO, HAS_HI)
            visible = visible & (rows[None, :] < q_len)
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)     # (BLOCK_N, HEAD_DIM)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)         # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        if MASKED:  # 0 * NaN: a NaN row of dO V^T or delta must not reach the keys it does not see
            ds_t = tl.where(visible, ds_t, 0.0)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)      # (BLOCK_N, HEAD_DIM)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE_W, DELTA, DK, DV, CU_Q, CU_K,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          stride_wb, stride_wh,
                          seqlen_q, seqlen_k, group, scale, qk_scale, window_left, window_right,
                          D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr,
                          HAS_RIGHT: tl.constexpr, IS_PACKED: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key block, kv head, batch row or document). It loops over every query
    head of its GQA group and over the query blocks that can see its keys, so each dK/dV element
    is written once, by one program, without atomics."""
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start, k_start, q_len, k_len = _doc_rows(CU_Q, CU_K, batch, seqlen_q, seqlen_k, IS_PACKED)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    offset = k_len - q_len
    # query i sees key j iff j - i in [offset - left, offset + right], i.e.
    # i - j in [-offset - right, left - offset]: the band seen from the key side.
    lo_diff = -offset - window_right
    hi_diff = window_left - offset

    offs_n = n0 + tl.arange(0, BLOCK_N)                                        # (BLOCK_N,)
    offs_m = tl.arange(0, BLOCK_M)                                             # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ok = (offs_n[:, None] < k_len) & (offs_d[None, :] < D)                  # (BLOCK_N, HEAD_DIM)
    k_rows = k_start.to(tl.int64) + offs_n[:, None]
    k = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
                + k_rows * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                + k_rows * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    n_end = tl.minimum(n0 + BLOCK_N, k_len) - 1
    start, mid_lo, mid_hi, end = _band_blocks(n0, n_end, q_len, lo_diff, hi_diff,
                                              HAS_RIGHT, HAS_LEFT, BLOCK_M)
    for g in range(group):
        head = kv_head * group + g
        q_ptrs = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh \
            + q_start.to(tl.int64) * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh \
            + q_start.to(tl.int64) * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :]
        w = batch.to(tl.int64) * stride_wb + head.to(tl.int64) * stride_wh + q_start
        if HAS_RIGHT:  # without a right edge (seen from the keys: a low edge) it is empty
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, LSE_W + w, DELTA + w, stride_qm,
                                  stride_dom, offs_m, offs_n, offs_d, start, mid_lo, q_len,
                                  lo_diff, hi_diff, qk_scale, True, HAS_RIGHT, HAS_LEFT, D,
                                  HEAD_DIM, BLOCK_M, DOT_PRECISION, PRECISE)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, LSE_W + w, DELTA + w, stride_qm,
                              stride_dom, offs_m, offs_n, offs_d, mid_lo, mid_hi, q_len, lo_diff,
                              hi_diff, qk_scale, False, HAS_RIGHT, HAS_LEFT, D, HEAD_DIM, BLOCK_M,
                              DOT_PRECISION, PRECISE)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, LSE_W + w, DELTA + w, stride_qm,
                              stride_dom, offs_m, offs_n, offs_d, mid_hi, end, q_len, lo_diff,
                              hi_diff, qk_scale, True, HAS_RIGHT, HAS_LEFT, D, HEAD_DIM, BLOCK_M,
                              DOT_PRECISION, PRECISE)

    dk = dk * scale  # dS was taken with respect to the scaled scores
    tl.store(DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
             + k_rows * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
             + k_rows * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_blocks(dq, q, do, lse_w, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
               offs_d, n_start, n_end, k_len, lo_diff, hi_diff, qk_scale,
               MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over the key blocks [n_start, n_end):
    P = exp(Q K^T * qk_scale - lse_w), dS = P * (dO V^T - delta), dQ += dS K."""
    d_ok = offs_d[None, :] < D
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n                                                     # (BLOCK_N,)
        if MASKED:
            kv_ok = (cols[:, None] < k_len) & d_ok
            k = tl.load(k_ptrs + n0 * stride_kn, mask=kv_ok, other=0.0)        # (BLOCK_N, HEAD_DIM)
            v = tl.load(v_ptrs + n0 * stride_vn, mask=kv_ok, other=0.0)
        elif D == HEAD_DIM:
            k = tl.load(k_ptrs + n0 * stride_kn)
            v = tl.load(v_ptrs + n0 * stride_vn)
        else:
            k = tl.load(k_ptrs + n0 * stride_kn, mask=d_ok, other=0.0)
            v = tl.load(v_ptrs + n0 * stride_vn, mask=d_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)            # (BLOCK_M, BLOCK_N)
        p = _exp_scores(qk * qk_scale, lse_w[:, None], PRECISE)
        if MASKED:
            visible = _band_mask(offs_m, cols, lo_diff, hi_diff, HAS_LO, HAS_HI)
            visible = visible & (cols[None, :] < k_len)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)           # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        if MASKED:  # 0 * NaN: a NaN value row must not reach the queries that do not see its key
            ds = tl.where(visible, ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)        # (BLOCK_M, HEAD_DIM)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE_W, DELTA, DQ, CU_Q, CU_K,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                        stride_dqb, stride_dqh, stride_dqm, stride_wb, stride_wh,
                        seqlen_q, seqlen_k, group, scale, qk_scale, window_left, window_right,
                        D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_LEFT: tl.constexpr,
                        HAS_RIGHT: tl.constexpr, IS_PACKED: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, query head, batch row or document); no atomics."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    if HAS_RIGHT and not HAS_LEFT:
        pid_m = tl.num_programs(0) - 1 - pid_m
    q_start, k_start, q_len, k_len = _doc_rows(CU_Q, CU_K, batch, seqlen_q, seqlen_k, IS_PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kv_head = head // group
    offset = k_len - q_len
    lo_diff = offset - window_left
    hi_diff = offset + window_right

    offs_m = m0 + tl.arange(0, BLOCK_M)                                        # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m[:, None] < q_len) & (offs_d[None, :] < D)                 # (BLOCK_M, HEAD_DIM)
    q_rows = q_start.to(tl.int64) + offs_m[:, None]
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                + q_rows * stride_qm + offs_d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                 + q_rows * stride_dom + offs_d[None, :], mask=row_ok, other=0.0)
    w = batch.to(tl.int64) * stride_wb + head.to(tl.int64) * stride_wh + q_start + offs_m
    lse_w = tl.load(LSE_W + w, mask=offs_m < q_len, other=0.0)                   # (BLOCK_M,)
    delta = tl.load(DELTA + w, mask=offs_m < q_len, other=0.0)
    k_ptrs = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh \
        + k_start.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh \
        + k_start.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_end = tl.minimum(m0 + BLOCK_M, q_len) - 1
    start, mid_lo, mid_hi, end = _band_blocks(m0, m_end, k_len, lo_diff, hi_diff,
                                              HAS_LEFT, HAS_RIGHT, BLOCK_N)
    if HAS_LEFT:
        dq = _dq_blocks(dq, q, do, lse_w, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m,
                        offs_n, offs_d, start, mid_lo, k_len, lo_diff, hi_diff, qk_scale, True,
                        HAS_LEFT, HAS_RIGHT, D, HEAD_DIM, BLOCK_N, DOT_PRECISION, PRECISE)
    dq = _dq_blocks(dq, q, do, lse_w, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                    offs_d, mid_lo, mid_hi, k_len, lo_diff, hi_diff, qk_scale, False, HAS_LEFT,
                    HAS_RIGHT, D, HEAD_DIM, BLOCK_N, DOT_PRECISION, PRECISE)
    dq = _dq_blocks(dq, q, do, lse_w, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                    offs_d, mid_hi, end, k_len, lo_diff, hi_diff, qk_scale, True, HAS_LEFT,
                    HAS_RIGHT, D, HEAD_DIM, BLOCK_N, DOT_PRECISION, PRECISE)
    dq = dq * scale
    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
             + q_rows * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------------------------
# Configs and autotuning
# --------------------------------------------------------------------------------------------

def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M always tiles queries, BLOCK_N keys. The dK/dV
# pass keeps a key block resident (k, v, dk, dv) and streams query blocks: large BLOCK_N, small
# BLOCK_M; the dQ pass is the mirror image. Half-precision lists by head-dim class; float32 uses
# CUDA-core FMA products (input_precision="ieee"), so it gets small tiles.
_CONFIGS = {
    # sm_90 (H100/H200: 228 KB shared memory per SM, wgmma). Chosen from ptxas reports of
    # sm_90a builds (few or no register spills with Hq == Hkv) and, for D = 128, from timings on
    # an H200 (triton 3.6, (4, 16, 4096, 128) bf16). The first of each list is the default.
    ("sm90", "fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4)],
    ("sm90", "fwd", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)],
    ("sm90", "fwd", 256): [(128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
    ("sm90", "dkdv", 64): [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
    ("sm90", "dkdv", 128): [(64, 128, 8, 2), (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 3)],
    ("sm90", "dkdv", 256): [(16, 64, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2)],
    ("sm90", "dq", 64): [(128, 64, 8, 3), (128, 32, 4, 5), (64, 64, 4, 3)],
    ("sm90", "dq", 128): [(128, 64, 8, 3), (128, 64, 8, 4), (64, 32, 4, 3), (128, 32, 8, 3)],
    ("sm90", "dq", 256): [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
    # sm_80 and others (A100: 164 KB shared memory per SM, mma.sync: fragments in registers)
    ("sm80", "fwd", 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    ("sm80", "fwd", 128): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    ("sm80", "fwd", 256): [(64, 64, 8, 2), (64, 32, 4, 2)],
    ("sm80", "dkdv", 64): [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
    ("sm80", "dkdv", 128): [(32, 64, 4, 3), (32, 128, 8, 3), (32, 128, 8, 2)],
    ("sm80", "dkdv", 256): [(16, 64, 8, 2), (16, 32, 4, 2)],
    ("sm80", "dq", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    ("sm80", "dq", 128): [(128, 32, 8, 2), (64, 32, 4, 3), (128, 16, 4, 3)],
    ("sm80", "dq", 256): [(64, 32, 8, 2), (32, 32, 4, 2)],
    # float32 on any architecture: CUDA-core FMA products, operands in registers, small tiles
    ("fp32", "fwd", 64): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("fp32", "fwd", 128): [(32, 32, 8, 2), (32, 16, 4, 2)],
    ("fp32", "fwd", 256): [(32, 16, 8, 2), (16, 16, 4, 2)],
    ("fp32", "dkdv", 64): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("fp32", "dkdv", 128): [(16, 32, 8, 2), (16, 16, 4, 2)],
    ("fp32", "dkdv", 256): [(16, 16, 8, 2)],
    ("fp32", "dq", 64): [(64, 32, 8, 2), (32, 32, 8, 2)],
    ("fp32", "dq", 128): [(32, 16, 4, 2), (32, 16, 8, 2)],
    ("fp32", "dq", 256): [(32, 16, 8, 2), (16, 16, 4, 2)],
}
_TUNING_KEY = ["HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "IS_PACKED"]
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


ENV_AUTOTUNE = "SLMFAST_TRITON_AUTOTUNE"  # "0": always the first config of each list (no timing runs)
ENV_CONFIG = "SLMFAST_TRITON_ATTN_CONFIG"  # "i": always the i-th config (clamped), for tests/warm-up


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _short_bench(kernel_call, quantiles):
    # 5 ms warm-up, 25 ms of timed runs per config: enough to rank configs that differ by >2%.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@functools.cache
def _tuned(arch: str, kind: str, dim_class: int):
    """The autotuned launcher of one kernel for one (architecture, head-dim class) config list;
    it tunes once per key (padded head dim, mask kind, layout) and dtype."""
    import triton.testing  # noqa: F401  (used by _short_bench)

    configs = [_cfg(*c) for c in _CONFIGS[(arch, kind, dim_class)]]
    kwargs = {}
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kwargs["do_bench"] = _short_bench
    return triton.autotune(configs=configs, key=_TUNING_KEY, **kwargs)(_KERNELS[kind])


def _launch(kind: str, grid_rows: int, other_grid: tuple[int, int], args: list, meta: dict,
            device: torch.device, dtype: torch.dtype) -> None:
    """Launch one of the three block kernels: a fixed config under the interpreter, else the
    autotuned one for this device and head dim. grid_rows is the length that axis 0 tiles
    (queries for fwd and dq, keys for dkdv)."""
    tile = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if _interpreting() or device.type != "cuda":
        block_m, block_n = INTERPRET_BLOCKS[kind]
        blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        grid = (triton.cdiv(grid_rows, blocks[tile]),) + other_grid
        _KERNELS[kind][grid](*args, **meta, **blocks)
        return
    head_dim = meta["HEAD_DIM"]
    dim_class = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
    if dtype == torch.float32:
        arch = "fp32"
    else:
        arch = "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"
    with torch.cuda.device(device):
        forced = os.environ.get(ENV_CONFIG)
        if forced is not None or os.environ.get(ENV_AUTOTUNE, "1") == "0":  # one config, no tuning
            configs = _CONFIGS[(arch, kind, dim_class)]
            block_m, block_n, warps, stages = configs[min(int(forced or 0), len(configs) - 1)]
            blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
            grid = (triton.cdiv(grid_rows, blocks[tile]),) + other_grid
            _KERNELS[kind][grid](*args, **meta, **blocks, num_warps=warps, num_stages=stages)
        else:
            kernel = _tuned(arch, kind, dim_class)
            kernel[lambda m: (triton.cdiv(grid_rows, m[tile]),) + other_grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _strides(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides in elements: dense (B, H, L, D), packed (N, H, D)."""
    if packed:
        return 0, x.stride(1), x.stride(0)
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _band(causal: bool, window_left: int, window_right: int) -> tuple[bool, int, bool, int]:
    """(has_left, left, has_right, right) of the visible band; causal is a right edge at 0."""
    has_left = window_left >= 0
    has_right = causal or window_right >= 0
    right = 0 if causal else window_right
    if causal and window_right >= 0:
        right = min(0, window_right)
    return has_left, max(window_left, 0), has_right, max(right, 0)


def _geometry(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
              max_seqlen_k: int):
    """(packed, batch, Hq, Hkv, T, S, cu_q, cu_k) where T/S are the dense lengths or the largest
    document's (read from cu_seqlens when max_seqlen_* is not given)."""
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if not packed:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"attention: dense q and k must be 4-D (B, H, T, D), got q "
                             f"{tuple(q.shape)} and k {tuple(k.shape)}")
        return False, q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], None, None
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"attention: packed q and k must be 3-D (N, H, D), got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    cu_q = (cu_seqlens_q if cu_seqlens_q is not None else cu_seqlens_k).to(torch.int32).contiguous()
    cu_k = (cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens_q).to(torch.int32).contiguous()
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"attention: cu_seqlens_q has {cu_q.numel()} entries and cu_seqlens_k "
                         f"{cu_k.numel()}; both must be (num_docs + 1,)")
    batch = cu_q.numel() - 1
    if batch > 0 and max_seqlen_q <= 0:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max().item())
    if batch > 0 and max_seqlen_k <= 0:
        max_seqlen_k = int((cu_k[1:] - cu_k[:-1]).max().item())
    return True, batch, q.shape[1], k.shape[1], max_seqlen_q, max_seqlen_k, cu_q, cu_k


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads_q: int, heads_kv: int) -> None:
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16,
                                                              torch.bfloat16):
        raise ValueError(f"attention (triton): q, k, v must share one of float32, float16, bfloat16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]) or q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention (triton): q, k, v need one head dim <= {MAX_HEAD_DIM}, got "
                         f"{q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"attention (triton): Hq ({heads_q}) must be a multiple of Hkv ({heads_kv})")


def _check_grid(batch: int, heads_q: int) -> None:
    if batch > 65535 or heads_q > 65535:  # CUDA grid axes 1 and 2
        raise ValueError(f"attention (triton): at most 65535 batch rows / documents and heads, got "
                         f"{batch} and {heads_q}")


def _meta(q: torch.Tensor, packed: bool, has_left: bool, has_right: bool) -> dict:
    head_dim = q.shape[-1]
    return {"D": head_dim, "HEAD_DIM": max(16, triton.next_power_of_2(head_dim)),
            "HAS_LEFT": has_left, "HAS_RIGHT": has_right, "IS_PACKED": packed,
            "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "PRECISE": q.dtype == torch.float32}


def _qk_scale(scale: float, dtype: torch.dtype) -> float:
    """Scores are q.k * qk_scale: in the log2 domain (log2(e) folded into the softmax scale) for
    half inputs, natural for float32 (see _exp_scores)."""
    return scale if dtype == torch.float32 else scale * LOG2E


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                  window_left: int, window_right: int, cu_seqlens_q: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0,
                  max_seqlen_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. Dense q (B, Hq, T, D), k/v (B, Hkv, S, D) -> out (B, Hq, T, D), lse (B, Hq, T);
    packed q (Nq, Hq, D), k/v (Nk, Hkv, D), cu_seqlens_* int32 -> out (Nq, Hq, D), lse (Nq, Hq).
    lse is float32, natural log; -inf (with a zero out row) where a query sees no key."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    packed, batch, heads_q, heads_kv, seqlen_q, seqlen_k, cu_q, cu_k = _geometry(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check(q, k, v, heads_q, heads_kv)
    _check_grid(batch, heads_q)
    has_left, left, has_right, right = _band(causal, window_left, window_right)
    alloc = torch.zeros_like if packed else torch.empty_like  # packed: rows outside cu_seqlens stay defined
    out = alloc(q)  # q's memory layout when dense, as the C++ op (csrc/common/attention_args.h)
    if packed:
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)  # (Nq, Hq)
        lse_strides = (0, 1, heads_q)
    else:
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)               # (B, Hq, T)
        lse_strides = (heads_q * seqlen_q, seqlen_q, 1)
    if q.numel() == 0 or batch == 0 or seqlen_q == 0:
        return out, lse
    cu_q_arg = cu_q if packed else lse  # any tensor: unused when not packed
    cu_k_arg = cu_k if packed else lse
    args = [q, k, v, out, lse, cu_q_arg, cu_k_arg,
            *_strides(q, packed), *_strides(k, packed), *_strides(v, packed), *_strides(out, packed),
            *lse_strides, seqlen_q, seqlen_k, heads_q // heads_kv, _qk_scale(scale, q.dtype), left, right]
    _launch("fwd", seqlen_q, (heads_q, batch), args, _meta(q, packed, has_left, has_right),
            q.device, q.dtype)
    return out, lse


def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
                  window_left: int, window_right: int, cu_seqlens_q: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0,
                  max_seqlen_k: int = 0, deterministic: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward from the saved q, k, v, out and lse: (dq, dk, dv) in the layouts of q, k, v.

    Always deterministic (no atomics: a dK/dV pass per key block and a dQ pass per query block);
    `deterministic=False` is accepted and takes the same path.
    """
    del deterministic  # one path, bit-identical run to run
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    packed, batch, heads_q, heads_kv, seqlen_q, seqlen_k, cu_q, cu_k = _geometry(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check(q, k, v, heads_q, heads_kv)
    _check_grid(batch, heads_q)
    if dout.shape != q.shape or out.shape != q.shape or dout.dtype != q.dtype:
        raise ValueError(f"attention (triton): dout {tuple(dout.shape)} {dout.dtype} and out "
                         f"{tuple(out.shape)} must match q {tuple(q.shape)} {q.dtype}")
    has_left, left, has_right, right = _band(causal, window_left, window_right)
    alloc = torch.zeros_like if packed else torch.empty_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    if batch == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()  # no query sees a key: every gradient is 0

    # Workspaces delta and lse in the score domain, float32, row-contiguous: dense (B, Hq, T),
    # packed (1, Hq, Nq).
    rows = q.shape[0] if packed else seqlen_q
    work_shape = (1, heads_q, rows) if packed else (batch, heads_q, rows)
    delta = torch.empty(work_shape, dtype=torch.float32, device=q.device)
    lse_w = torch.empty(work_shape, dtype=torch.float32, device=q.device)
    work_strides = (0 if packed else heads_q * rows, rows)
    lse_strides = (0, lse.stride(1), lse.stride(0)) if packed else tuple(lse.stride())
    meta = _meta(q, packed, has_left, has_right)
    pre_block = 64 if meta["HEAD_DIM"] <= 128 else 32
    pre_grid = (triton.cdiv(rows, pre_block), heads_q, 1 if packed else batch)
    _attn_bwd_preprocess[pre_grid](
        out, dout, lse, delta, lse_w, rows, *_strides(out, packed), *_strides(dout, packed),
        *lse_strides, *work_strides, D=meta["D"], HEAD_DIM=meta["HEAD_DIM"], PRECISE=meta["PRECISE"],
        BLOCK_M=pre_block, num_warps=4)

    cu_q_arg = cu_q if packed else delta
    cu_k_arg = cu_k if packed else delta
    group = heads_q // heads_kv
    common = [*_strides(q, packed), *_strides(k, packed), *_strides(v, packed),
              *_strides(dout, packed)]
    tail = [*work_strides, seqlen_q, seqlen_k, group, scale, _qk_scale(scale, q.dtype), left, right]
    if seqlen_k > 0:
        _launch("dkdv", seqlen_k, (heads_kv, batch),
                [q, k, v, dout, lse_w, delta, dk, dv, cu_q_arg, cu_k_arg, *common,
                 *_strides(dk, packed), *_strides(dv, packed), *tail], meta, q.device, q.dtype)
    if seqlen_q > 0:
        _launch("dq", seqlen_q, (heads_q, batch),
                [q, k, v, dout, lse_w, delta, dq, cu_q_arg, cu_k_arg, *common,
                 *_strides(dq, packed), *tail], meta, q.device, q.dtype)
    return dq, dk, dv
