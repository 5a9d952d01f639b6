// attention_fwd.cuh — the FlashAttention-2 forward kernel (Dao 2023, arXiv:2307.08691, Alg. 1)
// on the tensor cores of sm_80+ (mma.sync m16n8k16, ldmatrix, cp.async). Launched from
// attention_fwd.cu; kept in a header so that a benchmark harness can instantiate other tiles.
//
// One thread block per (query block of kBM rows, query head, batch row or document). Each warp
// owns 16 * kMT query rows and keeps their output accumulator O (16 kMT x kD, fp32), running
// row max and row sum in registers. The block walks the key blocks [n_begin, n_end) that the
// mask leaves visible (fully masked blocks are never loaded); K and V tiles of kBN rows are
// double-buffered in shared memory with cp.async, the copy of block n + 1 in flight while
// block n is computed:
//   S = Q K^T (scaled to log2 units), mask on the blocks the band cuts, m' = max(m, rowmax S),
//   P = exp2(S - m'), l' = l 2^(m - m') + rowsum P, O' = O 2^(m - m') + P V
// and at the end out = O / l, lse = (m + log2 l) ln 2 (natural log), with out = 0, lse = -inf
// for a row that saw no key. P is rounded to the input dtype for the P V product (as
// flash-attention does); l sums the fp32 P.
#pragma once

#include "attention_common.cuh"

namespace slmfast::cuda::attn {

template <int kD_, int kWarps_, int kMT_, int kBN_, bool kQInRegs_>
struct FwdConfig {
  static constexpr int kD = kD_;          // head dim the tiles are sized for (>= the real one)
  static constexpr int kWarps = kWarps_;
  static constexpr int kMT = kMT_;        // 16-row m-tiles per warp
  static constexpr int kBN = kBN_;        // keys per block
  static constexpr bool kQInRegs = kQInRegs_;  // Q fragments loaded once into registers
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kMT * kWarps;
  static constexpr int kLd = kD + kPad;
  // Q, then two stages of K, then two of V.
  static constexpr int kSmemBytes = (kBM + 4 * kBN) * kLd * 2;
  static_assert(kD % 32 == 0 && kBN % 16 == 0, "FwdConfig: tile sizes");
};

// The tiles per head dim (the one table; see attention_fwd.cu for registers and the reasons).
template <int kD>
struct FwdTile;
template <>
struct FwdTile<32> : FwdConfig<32, 4, 2, 64, true> {};
template <>
struct FwdTile<64> : FwdConfig<64, 4, 2, 64, false> {};
template <>
struct FwdTile<96> : FwdConfig<96, 4, 2, 32, false> {};
template <>
struct FwdTile<128> : FwdConfig<128, 8, 1, 64, true> {};
template <>
struct FwdTile<256> : FwdConfig<256, 8, 1, 32, false> {};

template <typename Elem, typename Cfg, bool kMasked>
__global__ void __launch_bounds__(Cfg::kThreads, 1) attention_fwd_kernel(const __grid_constant__ AttentionParams p) {
  constexpr int kD = Cfg::kD;
  constexpr int kMT = Cfg::kMT;
  constexpr int kBM = Cfg::kBM;
  constexpr int kBN = Cfg::kBN;
  constexpr int kLd = Cfg::kLd;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);  // (kBM, kLd); later the output staging
  Elem* sK = sQ + kBM * kLd;                     // (2, kBN, kLd)
  Elem* sV = sK + 2 * kBN * kLd;                 // (2, kBN, kLd)

  // Heaviest query blocks (last rows, most keys under a causal mask) are scheduled first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const SeqInfo seq = seq_info(p, b);
  const int m0 = m_block * kBM;
  if (m0 >= seq.T) return;  // packed: this document is shorter than max_seqlen_q
  const Mask mask = make_mask<kMasked>(p, seq);
  const int hk = h / static_cast<int>(p.heads_q / p.heads_kv);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int cols = static_cast<int>(p.head_dim);
  const int m_rows = min(kBM, seq.T - m0);
  const int warp_row0 = warp * 16 * kMT;  // first tile row of this warp

  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                  (seq.q_start + m0) * p.q_row_stride;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                  seq.k_start * p.k_row_stride;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                  seq.k_start * p.v_row_stride;

  // Key blocks holding a key visible to some row of this block; the rest are skipped.
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

  float o[kMT][kD / 8][4];  // (16 kMT, kD) per warp
  float row_max[kMT][2];    // rows g and g + 8 of each m-tile, log2 units
  float row_sum[kMT][2];    // this thread's part of the row sum (its 2 columns of each n-tile)
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    zero(o[mt]);
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  if (n_begin < n_end) {
    load_tile_async<kBM, kD, kThreads>(sQ, q, p.q_row_stride, m_rows, cols, tid);
    {
      const int j0 = n_begin * kBN;
      load_tile_async<kBN, kD, kThreads>(sK, k + j0 * p.k_row_stride, p.k_row_stride, seq.S - j0, cols, tid);
      load_tile_async<kBN, kD, kThreads>(sV, v + j0 * p.v_row_stride, p.v_row_stride, seq.S - j0, cols, tid);
    }
    cp_async_commit();
    uint32_t qf[kMT][Cfg::kQInRegs ? kD / 16 : 1][4];  // Q's A fragments when kept in registers

    for (int n = n_begin; n < n_end; ++n) {
      const int stage = (n - n_begin) & 1;
      if (n + 1 < n_end) {  // prefetch block n + 1 into the other stage (freed at the end of n - 1)
        const int j0 = (n + 1) * kBN;
        Elem* sKn = sK + (stage ^ 1) * kBN * kLd;
        Elem* sVn = sV + (stage ^ 1) * kBN * kLd;
        load_tile_async<kBN, kD, kThreads>(sKn, k + j0 * p.k_row_stride, p.k_row_stride, seq.S - j0, cols, tid);
        load_tile_async<kBN, kD, kThreads>(sVn, v + j0 * p.v_row_stride, p.v_row_stride, seq.S - j0, cols, tid);
        cp_async_commit();
        cp_async_wait<1>();  // block n (and Q) landed; block n + 1 may still be in flight
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const Elem* sKs = sK + stage * kBN * kLd;
      const Elem* sVs = sV + stage * kBN * kLd;
      if constexpr (Cfg::kQInRegs) {
        if (n == n_begin) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
            for (int kk = 0; kk < kD / 16; ++kk) load_a(qf[mt][kk], sQ, kLd, warp_row0 + mt * 16, kk * 16, lane);
          }
        }
      }

      // S = Q K^T: (16 kMT, kBN) per warp; each K fragment serves all kMT m-tiles.
      float s[kMT][kBN / 8][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) zero(s[mt]);
      // With Q in shared memory nothing here is indexed by kk, so the loop stays rolled: the
      // compiler then cannot hoist every k-step's loads at once (which spills at kMT = 2).
#pragma unroll(Cfg::kQInRegs ? kD / 16 : 1)
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a_smem[kMT][4];  // used when Q stays in shared memory
        if constexpr (!Cfg::kQInRegs) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) load_a(a_smem[mt], sQ, kLd, warp_row0 + mt * 16, kk * 16, lane);
        }
#pragma unroll
        for (int nn = 0; nn < kBN / 16; ++nn) {
          uint32_t bf[4];
          load_b_nk(bf, sKs, kLd, nn * 16, kk * 16, lane);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            if constexpr (Cfg::kQInRegs) {
              mma_16816<Elem>(s[mt][2 * nn], qf[mt][kk], bf[0], bf[1]);
              mma_16816<Elem>(s[mt][2 * nn + 1], qf[mt][kk], bf[2], bf[3]);
            } else {
              mma_16816<Elem>(s[mt][2 * nn], a_smem[mt], bf[0], bf[1]);
              mma_16816<Elem>(s[mt][2 * nn + 1], a_smem[mt], bf[2], bf[3]);
            }
          }
        }
      }

      // Online softmax, in log2 units of the scaled scores; -inf where masked (a separate loop
      // under one branch keeps the mask's index math out of the unmasked blocks).
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] *= scale_log2;
        }
      }
      const int j0 = n * kBN;
      if (mask.partial(m0, kBM, j0, kBN, false)) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = m0 + warp_row0 + mt * 16 + g + 8 * (e >> 1);
              if (!mask.visible(i, j0 + nt * 8 + 2 * t + (e & 1))) s[mt][nt][e] = -INFINITY;
            }
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = row_max[mt][r];
#pragma unroll
          for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // A row with nothing visible yet keeps max -inf; subtract 0 then (exp2(-inf) = 0, no NaN).
          const float base = mx == -INFINITY ? 0.f : mx;
          const float corr = fast_exp2(row_max[mt][r] - base);
          row_max[mt][r] = mx;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float pv = fast_exp2(s[mt][nt][2 * r + e] - base);
              s[mt][nt][2 * r + e] = pv;
              sum += pv;
            }
          }
          row_sum[mt][r] = row_sum[mt][r] * corr + sum;
#pragma unroll
          for (int dt = 0; dt < kD / 8; ++dt) {
            o[mt][dt][2 * r] *= corr;
            o[mt][dt][2 * r + 1] *= corr;
          }
        }
      }

      // O += P V: P straight from the accumulators; each V fragment serves all m-tiles.
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) acc_to_a<Elem>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
        for (int nn = 0; nn < kD / 16; ++nn) {
          uint32_t bf[4];
          load_b_kn(bf, sVs, kLd, kk * 16, nn * 16, lane);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma_16816<Elem>(o[mt][2 * nn], a[mt], bf[0], bf[1]);
            mma_16816<Elem>(o[mt][2 * nn + 1], a[mt], bf[2], bf[3]);
          }
        }
      }
      __syncthreads();  // every warp is done with this stage before it is refilled
    }
  }

  // Epilogue: out = O / l (0 for a row that saw no key), lse = (m + log2 l) ln 2 (-inf then).
  float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        o[mt][dt][2 * r] *= inv;
        o[mt][dt][2 * r + 1] *= inv;
      }
      const int row = m0 + warp_row0 + mt * 16 + g + 8 * r;
      if (t == 0 && row < seq.T) {
        lse[(seq.q_start + row) * p.lse_row_stride] = l > 0.f ? (row_max[mt][r] + log2f(l)) * kLn2 : -INFINITY;
      }
    }
    // Each warp stages only its own rows of sQ, which no other warp reads.
    acc_to_smem<Elem, kD>(sQ, warp_row0 + mt * 16, o[mt], 1.f, lane);
  }
  __syncwarp();
  Elem* out = static_cast<Elem*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
              (seq.q_start + m0 + warp_row0) * p.o_row_stride;
  store_rows_warp<16 * kMT, kD>(out, p.o_row_stride, sQ + warp_row0 * kLd, m_rows - warp_row0, cols, lane);
}

}  // namespace slmfast::cuda::attn
