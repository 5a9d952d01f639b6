// attention_bwd.cuh — the FlashAttention-2 backward (Dao 2023, arXiv:2307.08691, Alg. 2) as
// three deterministic kernels on the tensor cores of sm_80+; launched from attention_bwd.cu.
//
// With S = scale Q K^T and P = exp(S - lse) recomputed block by block from the saved lse (no
// T x S tensor is ever stored), dP = dO V^T, delta = rowsum(dO o O) and dS = P o (dP - delta):
//   dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K.
// 1. delta kernel: delta = rowsum(dO o O) in fp32 (a workspace shaped like lse).
// 2. dK/dV kernel: one block per (key block of kBN = 16 x warps keys, kv head, batch row or
//    document); each warp owns 16 keys and keeps their dK and dV (16 x kD, fp32) in registers.
//    The block walks every query head of its GQA group and every query block that sees one of
//    its keys (loop bounds from the mask), with Q, dO, lse and delta double-buffered by cp.async.
//    Per warp and query block (all in registers, transposed so that the warp's keys are rows):
//      S^T = K Q^T, P^T = exp2(S^T scale log2e - lse log2e), dV += P^T dO, dP^T = V dO^T,
//      dS^T = P^T o (dP^T - delta), dK += dS^T Q
// 3. dQ kernel: one block per (query block, query head, batch row or document), each warp owns
//    16 query rows and their dQ; it walks the visible key blocks (K, V double-buffered):
//      S = Q K^T, P, dP = dO V^T, dS = P o (dP - delta), dQ += dS K
// No atomics anywhere and a fixed order of every sum: gradients are bit-identical run to run.
// The dQ pass recomputes S and dP (7 block products per block pair instead of flash-attention's
// 5 with atomic dQ): the price of determinism without a T x S buffer.
//
// A row with lse = -inf (it saw no key) gets P = 0 (its lse is taken as +inf), so its dQ is 0
// and it adds nothing to dK and dV. Rows past the end of a sequence are zero-filled and masked.
#pragma once

#include "attention_common.cuh"

namespace slmfast::cuda::attn {

// lse in log2 units, a row without visible keys as +inf so that exp2(s - lse) = 0 for it.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ---------------------------------------------------------------------------------------------
// 1. delta = rowsum(dO o O).

template <int kD>
struct DeltaConfig {
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static constexpr int kLanes = kChunks <= 4 ? 4 : (kChunks <= 8 ? 8 : (kChunks <= 16 ? 16 : 32));  // per row
  static constexpr int kRowsPerWarp = 32 / kLanes;
  static constexpr int kWarps = 8;
  static constexpr int kRows = kWarps * kRowsPerWarp;  // per block
  static_assert(kChunks <= 32, "DeltaConfig: head dim up to 256");
};

// Grid: (ceil(seqlen_q / kRows), heads_q, batch); 256 threads.
template <typename Elem, int kD>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const __grid_constant__ AttentionBwdParams p) {
  using Cfg = DeltaConfig<kD>;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const SeqInfo seq = seq_info(p, b);
  if (int(blockIdx.x) * Cfg::kRows >= seq.T) return;  // the whole block: no lane skips a shuffle below
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * Cfg::kRows + (threadIdx.x / 32) * Cfg::kRowsPerWarp + lane / Cfg::kLanes;
  const int col = (lane % Cfg::kLanes) * 8;
  float sum = 0.f;
  if (row < seq.T && col < p.head_dim) {
    const int64_t r = seq.q_start + row;
    const uint4 ov = *reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.out) + b * p.o_batch_stride +
                                                     h * p.o_head_stride + r * p.o_row_stride + col);
    const uint4 dv = *reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.dout) + b * p.do_batch_stride +
                                                     h * p.do_head_stride + r * p.do_row_stride + col);
    const Elem* o8 = reinterpret_cast<const Elem*>(&ov);
    const Elem* d8 = reinterpret_cast<const Elem*>(&dv);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += to_float(o8[e]) * to_float(d8[e]);
  }
#pragma unroll
  for (int off = Cfg::kLanes / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (row < seq.T && lane % Cfg::kLanes == 0) {
    p.delta[b * p.lse_batch_stride + h * p.lse_head_stride + (seq.q_start + row) * p.lse_row_stride] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. dK, dV.

template <int kD_, int kWarps_, int kBM_>
struct DkDvConfig {
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kBM = kBM_;  // query rows per step
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBN = 16 * kWarps;  // keys per block, 16 per warp
  static constexpr int kLd = kD + kPad;
  // K, V, then two stages of Q and of dO, then two stages of lse and of delta.
  static constexpr int kSmemBytes = (2 * kBN + 4 * kBM) * kLd * 2 + 4 * kBM * 4;
  static_assert(kD % 32 == 0 && kBM % 16 == 0 && kThreads >= 2 * kBM, "DkDvConfig: tile sizes");
};

template <typename Elem, typename Cfg, bool kMasked>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_bwd_dkdv_kernel(const __grid_constant__ AttentionBwdParams p) {
  constexpr int kD = Cfg::kD;
  constexpr int kBM = Cfg::kBM;
  constexpr int kBN = Cfg::kBN;
  constexpr int kLd = Cfg::kLd;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Elem* sK = reinterpret_cast<Elem*>(smem_raw);  // (kBN, kLd); later the dK staging
  Elem* sV = sK + kBN * kLd;                     // (kBN, kLd); later the dV staging
  Elem* sQ = sV + kBN * kLd;                     // (2, kBM, kLd)
  Elem* sdO = sQ + 2 * kBM * kLd;                // (2, kBM, kLd)
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBM * kLd);  // (2, kBM)
  float* sDelta = sLse + 2 * kBM;                                // (2, kBM)

  const int n_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const SeqInfo seq = seq_info(p, b);
  const int n0 = n_block * kBN;
  if (n0 >= seq.S) return;  // packed: this document has fewer keys
  const Mask mask = make_mask<kMasked>(p, seq);
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int cols = static_cast<int>(p.head_dim);
  const int n_rows = min(kBN, seq.S - n0);
  const int key_row0 = warp * 16;  // this warp's keys in the tile

  // Query blocks holding a query that sees one of these keys; the rest are skipped.
  int m_begin = 0;
  int m_count = 0;
  {
    const int i_first = mask.first_query(n0);
    const int i_last = mask.last_query(n0 + n_rows - 1);
    if (i_first <= i_last) {
      m_begin = i_first / kBM;
      m_count = i_last / kBM + 1 - m_begin;
    }
  }
  const int steps = m_count * group;  // (query head, query block) pairs, head-major
  const float scale_log2 = p.scale * kLog2e;

  float dk[kD / 8][4];  // (16, kD) per warp
  float dv[kD / 8][4];
  zero(dk);
  zero(dv);

  if (steps > 0) {
    const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                    (seq.k_start + n0) * p.k_row_stride;
    const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                    (seq.k_start + n0) * p.v_row_stride;
    load_tile_async<kBN, kD, kThreads>(sK, k, p.k_row_stride, n_rows, cols, tid);
    load_tile_async<kBN, kD, kThreads>(sV, v, p.v_row_stride, n_rows, cols, tid);

    // Starts the copies of step `it` (Q, dO, lse, delta of one head and query block) into `stage`.
    auto load_step = [&](int it, int stage) {
      const int h = hk * group + it / m_count;
      const int m0 = (m_begin + it % m_count) * kBM;
      const int rows = seq.T - m0;
      const int64_t row0 = seq.q_start + m0;
      const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + row0 * p.q_row_stride;
      const Elem* dout = static_cast<const Elem*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                         row0 * p.do_row_stride;
      load_tile_async<kBM, kD, kThreads>(sQ + stage * kBM * kLd, q, p.q_row_stride, rows, cols, tid);
      load_tile_async<kBM, kD, kThreads>(sdO + stage * kBM * kLd, dout, p.do_row_stride, rows, cols, tid);
      // Threads 0..kBM-1 copy lse, kBM..2kBM-1 delta (both use lse's strides).
      if (tid < 2 * kBM) {
        const int r = tid % kBM;
        const float* src = (tid < kBM ? p.lse : p.delta) + b * p.lse_batch_stride + h * p.lse_head_stride +
                           row0 * p.lse_row_stride;
        float* dst = (tid < kBM ? sLse : sDelta) + stage * kBM + r;
        cp_async_4(dst, r < rows ? src + r * p.lse_row_stride : src, r < rows);
      }
    };
    load_step(0, 0);
    cp_async_commit();

    for (int it = 0; it < steps; ++it) {
      const int stage = it & 1;
      if (it + 1 < steps) {
        load_step(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const int m0 = (m_begin + it % m_count) * kBM;
      const Elem* sQs = sQ + stage * kBM * kLd;
      const Elem* sdOs = sdO + stage * kBM * kLd;
      const float* sLses = sLse + stage * kBM;
      const float* sDeltas = sDelta + stage * kBM;

      // S^T = K Q^T: (16 keys, kBM queries) per warp.
      float st[kBM / 8][4];
      zero(st);
      gemm_ss_nk<Elem, kD, kBM>(st, sK, key_row0, sQs, kLd, lane);
      // P^T = exp2(S^T scale log2e - lse log2e), then 0 where masked (a separate loop: one branch
      // around it keeps the mask's index math out of the unmasked blocks and their registers).
#pragma unroll
      for (int qt = 0; qt < kBM / 8; ++qt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float lse2 = lse_log2(sLses[qt * 8 + 2 * t + e]);  // query qt*8+2t+e: column of S^T
#pragma unroll
          for (int r = 0; r < 2; ++r) st[qt][2 * r + e] = fast_exp2(st[qt][2 * r + e] * scale_log2 - lse2);
        }
      }
      if (mask.partial(m0, kBM, n0, kBN, true)) {
#pragma unroll
        for (int qt = 0; qt < kBM / 8; ++qt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!mask.visible(m0 + qt * 8 + 2 * t + (e & 1), n0 + key_row0 + g + 8 * (e >> 1))) st[qt][e] = 0.f;
          }
        }
      }
      // dV += P^T dO.
      gemm_rs_kn<Elem, kBM, kD>(dv, st, sdOs, kLd, lane);
      // dP^T = V dO^T, then dS^T = P^T o (dP^T - delta), in place.
      float dpt[kBM / 8][4];
      zero(dpt);
      gemm_ss_nk<Elem, kD, kBM>(dpt, sV, key_row0, sdOs, kLd, lane);
#pragma unroll
      for (int qt = 0; qt < kBM / 8; ++qt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float delta = sDeltas[qt * 8 + 2 * t + e];
#pragma unroll
          for (int r = 0; r < 2; ++r) dpt[qt][2 * r + e] = st[qt][2 * r + e] * (dpt[qt][2 * r + e] - delta);
        }
      }
      // dK += dS^T Q (scale applied once at the end).
      gemm_rs_kn<Elem, kBM, kD>(dk, dpt, sQs, kLd, lane);
      __syncthreads();  // every warp is done with this stage before it is refilled
    }
  }

  // Epilogue: each warp stages its own 16 rows of dK (in sK) and dV (in sV), read by no other warp.
  acc_to_smem<Elem, kD>(sK, key_row0, dk, p.scale, lane);
  acc_to_smem<Elem, kD>(sV, key_row0, dv, 1.f, lane);
  __syncwarp();
  const int64_t row0 = seq.k_start + n0 + key_row0;
  Elem* dk_out = static_cast<Elem*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride + row0 * p.dk_row_stride;
  Elem* dv_out = static_cast<Elem*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride + row0 * p.dv_row_stride;
  store_rows_warp<16, kD>(dk_out, p.dk_row_stride, sK + key_row0 * kLd, n_rows - key_row0, cols, lane);
  store_rows_warp<16, kD>(dv_out, p.dv_row_stride, sV + key_row0 * kLd, n_rows - key_row0, cols, lane);
}

// ---------------------------------------------------------------------------------------------
// 3. dQ.

template <int kD_, int kWarps_, int kBN_, bool kFragsInRegs_>
struct DqConfig {
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kBN = kBN_;  // keys per step
  static constexpr bool kFragsInRegs = kFragsInRegs_;  // Q and dO fragments loaded once into registers
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kWarps;  // query rows per block, 16 per warp
  static constexpr int kLd = kD + kPad;
  // Q, dO, then two stages of K and of V.
  static constexpr int kSmemBytes = (2 * kBM + 4 * kBN) * kLd * 2;
  static_assert(kD % 32 == 0 && kBN % 16 == 0, "DqConfig: tile sizes");
};

template <typename Elem, typename Cfg, bool kMasked>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_bwd_dq_kernel(const __grid_constant__ AttentionBwdParams p) {
  constexpr int kD = Cfg::kD;
  constexpr int kBM = Cfg::kBM;
  constexpr int kBN = Cfg::kBN;
  constexpr int kLd = Cfg::kLd;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kF = Cfg::kFragsInRegs ? kD / 16 : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);  // (kBM, kLd); later the dQ staging
  Elem* sdO = sQ + kBM * kLd;                    // (kBM, kLd)
  Elem* sK = sdO + kBM * kLd;                    // (2, kBN, kLd)
  Elem* sV = sK + 2 * kBN * kLd;                 // (2, kBN, kLd)

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) first
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const SeqInfo seq = seq_info(p, b);
  const int m0 = m_block * kBM;
  if (m0 >= seq.T) return;
  const Mask mask = make_mask<kMasked>(p, seq);
  const int hk = h / static_cast<int>(p.heads_q / p.heads_kv);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int cols = static_cast<int>(p.head_dim);
  const int m_rows = min(kBM, seq.T - m0);
  const int warp_row0 = warp * 16;

  int n_begin = 0;
  int n_end = 0;
  {
    const int j_first = mask.first_key(m0);
    const int j_last = mask.last_key(m0 + m_rows - 1);
    if (j_first <= j_last) {
      n_begin = j_first / kBN;
      n_end = j_last / kBN + 1;
    }
  }
  const float scale_log2 = p.scale * kLog2e;

  // This thread's rows g and g + 8: lse (log2 units) and delta; rows past T get P = 0.
  float lse2[2];
  float delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp_row0 + g + 8 * r;
    lse2[r] = INFINITY;
    delta[r] = 0.f;
    if (row < seq.T && n_begin < n_end) {
      const int64_t at = b * p.lse_batch_stride + h * p.lse_head_stride + (seq.q_start + row) * p.lse_row_stride;
      lse2[r] = lse_log2(p.lse[at]);
      delta[r] = p.delta[at];
    }
  }

  float dq[kD / 8][4];  // (16, kD) per warp
  zero(dq);

  if (n_begin < n_end) {
    const int64_t row0 = seq.q_start + m0;
    const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + row0 * p.q_row_stride;
    const Elem* dout = static_cast<const Elem*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                       row0 * p.do_row_stride;
    const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                    seq.k_start * p.k_row_stride;
    const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                    seq.k_start * p.v_row_stride;
    load_tile_async<kBM, kD, kThreads>(sQ, q, p.q_row_stride, m_rows, cols, tid);
    load_tile_async<kBM, kD, kThreads>(sdO, dout, p.do_row_stride, m_rows, cols, tid);
    {
      const int j0 = n_begin * kBN;
      load_tile_async<kBN, kD, kThreads>(sK, k + j0 * p.k_row_stride, p.k_row_stride, seq.S - j0, cols, tid);
      load_tile_async<kBN, kD, kThreads>(sV, v + j0 * p.v_row_stride, p.v_row_stride, seq.S - j0, cols, tid);
    }
    cp_async_commit();
    uint32_t qf[kF][4];   // Q's A fragments, when kept in registers
    uint32_t dof[kF][4];  // dO's

    for (int n = n_begin; n < n_end; ++n) {
      const int stage = (n - n_begin) & 1;
      if (n + 1 < n_end) {
        const int j0 = (n + 1) * kBN;
        Elem* sKn = sK + (stage ^ 1) * kBN * kLd;
        Elem* sVn = sV + (stage ^ 1) * kBN * kLd;
        load_tile_async<kBN, kD, kThreads>(sKn, k + j0 * p.k_row_stride, p.k_row_stride, seq.S - j0, cols, tid);
        load_tile_async<kBN, kD, kThreads>(sVn, v + j0 * p.v_row_stride, p.v_row_stride, seq.S - j0, cols, tid);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const Elem* sKs = sK + stage * kBN * kLd;
      const Elem* sVs = sV + stage * kBN * kLd;
      if constexpr (Cfg::kFragsInRegs) {
        if (n == n_begin) {
#pragma unroll
          for (int kk = 0; kk < kD / 16; ++kk) {
            load_a(qf[kk], sQ, kLd, warp_row0, kk * 16, lane);
            load_a(dof[kk], sdO, kLd, warp_row0, kk * 16, lane);
          }
        }
      }

      // S = Q K^T and dP = dO V^T: (16, kBN) per warp.
      float s[kBN / 8][4];
      float dp[kBN / 8][4];
      zero(s);
      zero(dp);
      if constexpr (Cfg::kFragsInRegs) {
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
          for (int nn = 0; nn < kBN / 16; ++nn) {
            uint32_t bf[4];
            load_b_nk(bf, sKs, kLd, nn * 16, kk * 16, lane);
            mma_16816<Elem>(s[2 * nn], qf[kk], bf[0], bf[1]);
            mma_16816<Elem>(s[2 * nn + 1], qf[kk], bf[2], bf[3]);
          }
        }
      } else {
        gemm_ss_nk<Elem, kD, kBN>(s, sQ, warp_row0, sKs, kLd, lane);
      }
      // P = exp2(S scale log2e - lse log2e), then 0 where masked.
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = fast_exp2(s[nt][e] * scale_log2 - lse2[e >> 1]);
      }
      const int j0 = n * kBN;
      if (mask.partial(m0, kBM, j0, kBN, false)) {
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!mask.visible(m0 + warp_row0 + g + 8 * (e >> 1), j0 + nt * 8 + 2 * t + (e & 1))) s[nt][e] = 0.f;
          }
        }
      }
      if constexpr (Cfg::kFragsInRegs) {
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
          for (int nn = 0; nn < kBN / 16; ++nn) {
            uint32_t bf[4];
            load_b_nk(bf, sVs, kLd, nn * 16, kk * 16, lane);
            mma_16816<Elem>(dp[2 * nn], dof[kk], bf[0], bf[1]);
            mma_16816<Elem>(dp[2 * nn + 1], dof[kk], bf[2], bf[3]);
          }
        }
      } else {
        gemm_ss_nk<Elem, kD, kBN>(dp, sdO, warp_row0, sVs, kLd, lane);
      }
      // dS = P o (dP - delta), in place of dP.
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - delta[e >> 1]);
      }
      // dQ += dS K (scale applied once at the end).
      gemm_rs_kn<Elem, kBN, kD>(dq, dp, sKs, kLd, lane);
      __syncthreads();
    }
  }

  // Epilogue: each warp stages its own rows of sQ (read by no other warp) and stores them.
  acc_to_smem<Elem, kD>(sQ, warp_row0, dq, p.scale, lane);
  __syncwarp();
  Elem* dq_out = static_cast<Elem*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride +
                 (seq.q_start + m0 + warp_row0) * p.dq_row_stride;
  store_rows_warp<16, kD>(dq_out, p.dq_row_stride, sQ + warp_row0 * kLd, m_rows - warp_row0, cols, lane);
}

}  // namespace slmfast::cuda::attn
