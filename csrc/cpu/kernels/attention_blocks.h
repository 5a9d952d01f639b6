// attention_blocks.h — the building blocks of the CPU attention kernels (attention_fwd.h,
// attention_bwd.h): document geometry and masks, block products, operand layouts, transposes.
//
// Block products go through ATen's batch-reduce GEMM, at::native::cpublas::brgemm (oneDNN's
// ukernel: AMX tiles for bf16, AVX-512 FMA for fp32), never through at::mm (its dispatch costs
// more than a 64x64 block product: 23 us for torch.mm against 4.8 us for brgemm, packing
// included, on a 256x64x64 bf16 block). brgemm computes C (M, N) (+)= A (M, K) B (K, N) with A
// and C row-major and B either row-major (fp32) or, for bf16, in the VNNI layout
//   B_vnni[k / 2][n][k % 2] = B[k][n]   (pairs of K rows interleaved; K padded to even with zeros)
// which brgemm accepts for any N and any ld_b (checked here: N = 16..256, ld_b up to 1024).
// cpublas::pack produces the same layout but only for ld_out in {16, 32, 48, 64}; the packers
// below build it directly, in one pass, from row-major sources:
//   natural    B = X      (rows, D):  interleave pairs of rows            -> [rows/2][D][2]
//   transposed B = X^T    (D, rows):  transpose X as 32-bit pairs of bf16 -> [D/2][rows][2]
// fp64 (which exists for gradcheck) uses a plain loop product; fp32 and fp64 take natural B
// operands straight from the input tensors and transposed ones from a plain transpose.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "../../common/params.h"
#include "../alloc.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY::attn {

using at::BFloat16;

template <typename T>
constexpr bool kVnni = std::is_same_v<T, BFloat16>;

// ---- geometry -------------------------------------------------------------------------------

// A tensor's strides in elements (AttentionParams): batch (0 when packed), head and row.
struct Strides {
  int64_t batch, head, row;
};

// The documents of one call (dense: the batch rows) cut into query blocks of bq rows and key
// blocks of bk rows. Blocks are numbered globally (document after document) so that per-block
// packed operands and per-block work items have one flat index.
struct Geometry {
  int64_t docs = 0;
  int64_t bq = 0, bk = 0;
  std::vector<int64_t> q_start, k_start, T, S;  // per document: first row (packed), lengths
  std::vector<int64_t> qb_off, kb_off;          // per document: index of its first block
  std::vector<int32_t> qb_doc, kb_doc;          // per global block: its document
  int64_t nqb = 0, nkb = 0;                     // total blocks
  int64_t max_T = 0;

  Geometry(const AttentionParams& p, int64_t bq_, int64_t bk_) : docs(p.batch), bq(bq_), bk(bk_) {
    q_start.resize(docs), k_start.resize(docs), T.resize(docs), S.resize(docs);
    qb_off.resize(docs + 1), kb_off.resize(docs + 1);
    for (int64_t b = 0; b < docs; ++b) {
      if (p.cu_seqlens_q != nullptr) {
        q_start[b] = p.cu_seqlens_q[b], T[b] = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
        k_start[b] = p.cu_seqlens_k[b], S[b] = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
      } else {
        q_start[b] = 0, T[b] = p.seqlen_q, k_start[b] = 0, S[b] = p.seqlen_k;
      }
      max_T = std::max(max_T, T[b]);
      qb_off[b + 1] = qb_off[b] + (T[b] + bq - 1) / bq;
      kb_off[b + 1] = kb_off[b] + (S[b] + bk - 1) / bk;
    }
    nqb = qb_off[docs], nkb = kb_off[docs];
    qb_doc.resize(nqb), kb_doc.resize(nkb);
    for (int64_t b = 0; b < docs; ++b) {
      for (int64_t i = qb_off[b]; i < qb_off[b + 1]; ++i) qb_doc[i] = static_cast<int32_t>(b);
      for (int64_t j = kb_off[b]; j < kb_off[b + 1]; ++j) kb_doc[j] = static_cast<int32_t>(b);
    }
  }

  // Element offset of query row r (key row, for k_offset) of head h of document `doc`.
  int64_t q_offset(const Strides& s, int64_t doc, int64_t h, int64_t r) const {
    return doc * s.batch + h * s.head + (q_start[doc] + r) * s.row;
  }
  int64_t k_offset(const Strides& s, int64_t doc, int64_t h, int64_t r) const {
    return doc * s.batch + h * s.head + (k_start[doc] + r) * s.row;
  }
};

// The visible keys of query row r of a document with T queries and S keys: the interval
// [lo, hi] (empty when lo > hi) of the mask in AttentionParams (params.h), bottom-right aligned.
struct Mask {
  bool causal;
  int64_t window_left, window_right;

  explicit Mask(const AttentionParams& p)
      : causal(p.causal), window_left(p.window_left), window_right(p.window_right) {}

  inline void bounds(int64_t T, int64_t S, int64_t r, int64_t& lo, int64_t& hi) const {
    const int64_t c = r + (S - T);
    lo = window_left >= 0 ? std::max<int64_t>(0, c - window_left) : 0;
    hi = S - 1;
    if (causal) hi = std::min(hi, c);
    if (window_right >= 0) hi = std::min(hi, c + window_right);
  }

  // Bounds of rows [r0, r0 + rows) into lo/hi; returns the union [kmin, kmax] of their
  // intervals (kmin > kmax when no row sees any key). lo and hi grow with r, so the union of
  // the non-empty rows' intervals is contiguous and the key blocks outside it are skipped.
  inline void rows(int64_t T, int64_t S, int64_t r0, int64_t rows, int64_t* lo, int64_t* hi, int64_t& kmin,
                   int64_t& kmax) const {
    kmin = std::numeric_limits<int64_t>::max(), kmax = -1;
    for (int64_t r = 0; r < rows; ++r) {
      bounds(T, S, r0 + r, lo[r], hi[r]);
      if (lo[r] <= hi[r]) kmin = std::min(kmin, lo[r]), kmax = std::max(kmax, hi[r]);
    }
  }
};

// ---- block products -------------------------------------------------------------------------

// C (M, N) (+)= A (M, K) B (K, N); A and C row-major with leading dimensions lda, ldc; B row-major
// (fp32, fp64) or VNNI (bf16, K even) with leading dimension ldb.
template <typename T>
struct Gemm;

template <>
struct Gemm<float> {
  static void run(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc, bool add) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
  }
  static void release() { at::native::cpublas::brgemm_release(false); }
};

template <>
struct Gemm<BFloat16> {
  static void run(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda, const BFloat16* B,
                  int64_t ldb, float* C, int64_t ldc, bool add) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/true);
  }
  static void release() { at::native::cpublas::brgemm_release(true); }
};

// fp64 exists for gradcheck: a plain loop, vectorized along N.
template <>
struct Gemm<double> {
  static void run(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                  double* C, int64_t ldc, bool add) {
    using Vec = at::vec::Vectorized<double>;
    constexpr int64_t W = Vec::size();
    for (int64_t i = 0; i < M; ++i) {
      double* c = C + i * ldc;
      if (!add) std::fill(c, c + N, 0.0);
      for (int64_t k = 0; k < K; ++k) {
        const Vec a(A[i * lda + k]);
        const double* b = B + k * ldb;
        int64_t j = 0;
        for (; j + W <= N; j += W) at::vec::fmadd(a, Vec::loadu(b + j), Vec::loadu(c + j)).store(c + j);
        for (; j < N; ++j) c[j] += A[i * lda + k] * b[j];
      }
    }
  }
  static void release() {}
};

// ---- vector helpers -------------------------------------------------------------------------

// Functions marked SLM_BF16_TARGET may use AVX512-BF16's one-instruction fp32 -> bf16 conversion
// (round to nearest even, as at::vec's emulated conversion, which takes ~20 instructions for 32
// values). The bf16 kernels run only where cpublas::could_pack(bf16) holds, that is on CPUs with
// AMX, which all have AVX512-BF16 (oneDNN's avx512_core_amx contains avx512_core_bf16). The fp32
// and fp64 instantiations of these templates carry the attribute too but contain no bf16
// conversion, so the compiler has nothing to emit those instructions for.
#if defined(CPU_CAPABILITY_AVX512) && (defined(__GNUC__) || defined(__clang__))
#define SLM_NATIVE_BF16 1
#define SLM_BF16_TARGET __attribute__((target("avx512bf16")))
#else
#define SLM_NATIVE_BF16 0
#define SLM_BF16_TARGET
#endif

// dst[0 .. 2W) = bf16(lo), bf16(hi): two fp32 vectors as one full bf16 vector.
SLM_BF16_TARGET inline void store_bf16x2(BFloat16* dst, const at::vec::Vectorized<float>& lo,
                                         const at::vec::Vectorized<float>& hi) {
#if SLM_NATIVE_BF16
  _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
#else
  at::vec::convert_from_float<BFloat16>(lo, hi).store(dst);
#endif
}

// dst[0 .. n) = bf16(x[0 .. n)), n <= W.
SLM_BF16_TARGET inline void store_bf16(BFloat16* dst, const at::vec::Vectorized<float>& x, int64_t n) {
#if SLM_NATIVE_BF16
  const __m256i v = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << n) - 1), v);
#else
  store_acc<BFloat16>(dst, x, n);
#endif
}

// Maximum without at::vec::maximum's NaN propagation (one instruction instead of four).
template <typename Vec>
inline Vec fast_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, at::vec::Vectorized<float>>) {
    return Vec(_mm512_max_ps(a, b));
  } else if constexpr (std::is_same_v<Vec, at::vec::Vectorized<double>>) {
    return Vec(_mm512_max_pd(a, b));
  }
#endif
  return at::vec::maximum(a, b);
}

// max over c in [c0, end) of scale * s[c] (end > c0), with four independent accumulators.
template <typename Acc>
inline Acc max_scaled(const Acc* s, int64_t c0, int64_t end, Acc scale) {
  using Vec = at::vec::Vectorized<Acc>;
  constexpr int64_t W = Vec::size();
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  // For scale >= 0, max(scale * s) = scale * max(s) exactly (rounding is monotonic).
  const Acc sign = scale < Acc(0) ? Acc(-1) : Acc(1);
  const Vec vsign(sign);
  Vec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
  int64_t c = c0;
  for (; c + 4 * W <= end; c += 4 * W) {
    m0 = fast_max(m0, Vec::loadu(s + c) * vsign);
    m1 = fast_max(m1, Vec::loadu(s + c + W) * vsign);
    m2 = fast_max(m2, Vec::loadu(s + c + 2 * W) * vsign);
    m3 = fast_max(m3, Vec::loadu(s + c + 3 * W) * vsign);
  }
  for (; c + W <= end; c += W) m0 = fast_max(m0, Vec::loadu(s + c) * vsign);
  if (c < end) m1 = fast_max(m1, Vec::set(Vec(kNegInf), Vec::loadu(s + c, end - c) * vsign, end - c));
  Vec m = fast_max(fast_max(m0, m1), fast_max(m2, m3));
  const Acc raw = at::vec::vec_reduce_all<Acc>([](Vec& a, Vec& b) { return fast_max(a, b); }, m);
  return raw * sign * scale;
}

// ---- layouts --------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
// In-register transpose of a 16x16 block of 32-bit values: r[i][j] -> r[j][i] (the usual
// unpack / unpack / 128-bit-lane shuffle sequence).
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4g + c], 128-bit lane k: column 4k + c, rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// The (m, n) tile of src at row i0, column j0 (m, n <= 16), zero-padded to 16 x 16 and
// transposed in registers: r[j] holds column j0 + j, rows i0 .. i0 + m.
inline void load_transposed_tile(const float* src, int64_t ld_src, int64_t i0, int64_t m, int64_t j0, int64_t n,
                                 __m512 r[16]) {
  const __mmask16 load_mask = static_cast<__mmask16>((1u << n) - 1);
  for (int64_t i = 0; i < 16; ++i) {
    r[i] = i < m ? _mm512_maskz_loadu_ps(load_mask, src + (i0 + i) * ld_src + j0) : _mm512_setzero_ps();
  }
  transpose16x16(r);
}
#endif

// dst (N, M) = src (M, N)^T for 32-bit elements (float, or pairs of bf16), any M and N.
inline void transpose32(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t i0 = 0; i0 < M; i0 += 16) {
    const int64_t m = std::min<int64_t>(16, M - i0);
    for (int64_t j0 = 0; j0 < N; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, N - j0);
      __m512 r[16];
      load_transposed_tile(src, ld_src, i0, m, j0, n, r);
      const __mmask16 store_mask = static_cast<__mmask16>((1u << m) - 1);
      for (int64_t j = 0; j < n; ++j) _mm512_mask_storeu_ps(dst + (j0 + j) * ld_dst + i0, store_mask, r[j]);
    }
  }
#else
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
#endif
}

// dst (N, M) = src (M, N)^T converted from the accumulation type to T (fp32 -> bf16 rounds to
// nearest even, as at::vec does).
template <typename T, typename Acc>
SLM_BF16_TARGET inline void transpose_to(const Acc* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M,
                                         int64_t N) {
  if constexpr (std::is_same_v<T, float>) {
    transpose32(src, ld_src, dst, ld_dst, M, N);
  } else if constexpr (std::is_same_v<T, BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
    for (int64_t i0 = 0; i0 < M; i0 += 16) {
      const int64_t m = std::min<int64_t>(16, M - i0);
      for (int64_t j0 = 0; j0 < N; j0 += 16) {
        const int64_t n = std::min<int64_t>(16, N - j0);
        __m512 r[16];
        load_transposed_tile(src, ld_src, i0, m, j0, n, r);
        for (int64_t j = 0; j < n; ++j) {
          store_bf16(dst + (j0 + j) * ld_dst + i0, at::vec::Vectorized<float>(r[j]), m);
        }
      }
    }
#else
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = static_cast<T>(src[i * ld_src + j]);
#endif
  } else {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = static_cast<T>(src[i * ld_src + j]);
  }
}

// Row-major (rows, n) accumulation-type block -> T, with `pad` zero columns after n (the even
// K padding of a VNNI product). For T == Acc with dst == src only the padding is written.
template <typename T, typename Acc>
SLM_BF16_TARGET inline void convert_rows(const Acc* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows,
                                         int64_t n, int64_t pad) {
  using Vec = at::vec::Vectorized<Acc>;
  constexpr int64_t W = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* s = src + r * ld_src;
    T* d = dst + r * ld_dst;
    if (static_cast<const void*>(s) != static_cast<const void*>(d)) {
      int64_t c = 0;
      if constexpr (std::is_same_v<T, BFloat16>) {
        for (; c + 2 * W <= n; c += 2 * W) store_bf16x2(d + c, Vec::loadu(s + c), Vec::loadu(s + c + W));
        for (; c < n; c += W) store_bf16(d + c, Vec::loadu(s + c, std::min(W, n - c)), std::min(W, n - c));
      } else {
        for (; c < n; c += W) {
          const int64_t cnt = std::min(W, n - c);
          store_acc<T>(d + c, load_acc<Acc>(s + c, cnt), cnt);
        }
      }
    }
    for (int64_t c = n; c < n + pad; ++c) d[c] = T(0);
  }
}

// B operand of the natural kind for bf16: dst[r / 2][d][r % 2] = src[r][d] for rows r < rows,
// zero for the padding row when rows is odd. dst holds ceil(rows / 2) * 2 * D values.
inline void pack_vnni(const BFloat16* src, int64_t ld_src, int64_t rows, int64_t D, BFloat16* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t r = 0; r < rows; r += 2) {
    const uint16_t* a = s + r * ld_src;
    const uint16_t* b = r + 1 < rows ? s + (r + 1) * ld_src : nullptr;
    uint32_t* out = d32 + (r / 2) * D;
    int64_t d = 0;
#if defined(CPU_CAPABILITY_AVX512)
    for (; d + 16 <= D; d += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d)));
      __m512i hi = _mm512_setzero_si512();
      if (b != nullptr) {
        const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + d));
        hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bv), 16);
      }
      _mm512_storeu_si512(out + d, _mm512_or_si512(lo, hi));
    }
#endif
    for (; d < D; ++d) out[d] = uint32_t(a[d]) | (b != nullptr ? uint32_t(b[d]) << 16 : 0u);
  }
}

// B operand of the transposed kind: for bf16 dst[d / 2][c][d % 2] = src[c][d] (D even), for
// fp32/fp64 dst[d][c] = src[c][d]; c < n columns of a block with leading dimension ld_dst,
// columns n .. ld_dst zero-filled so that no product ever reads uninitialized memory.
template <typename T>
inline void pack_transposed(const T* src, int64_t ld_src, int64_t n, int64_t D, T* dst, int64_t ld_dst) {
  if constexpr (std::is_same_v<T, BFloat16> || std::is_same_v<T, float>) {
    constexpr int64_t per = std::is_same_v<T, BFloat16> ? 2 : 1;  // T values per 32-bit word
    const int64_t words = D / per;
    transpose32(reinterpret_cast<const float*>(src), ld_src / per, reinterpret_cast<float*>(dst), ld_dst, n,
                words);
    if (n < ld_dst) {
      float* d32 = reinterpret_cast<float*>(dst);
      for (int64_t w = 0; w < words; ++w) std::fill(d32 + w * ld_dst + n, d32 + (w + 1) * ld_dst, 0.0f);
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t c = 0; c < n; ++c) dst[d * ld_dst + c] = src[c * ld_src + d];
      for (int64_t c = n; c < ld_dst; ++c) dst[d * ld_dst + c] = T(0);
    }
  }
}

// ---- scheduling -----------------------------------------------------------------------------

// Runs body(task, thread_state) for tasks 0 .. n-1 on at::parallel_for threads, handing tasks
// out one at a time from a shared counter (so that uneven tasks, such as the query blocks of a
// causal mask, balance). Each task writes only its own outputs, so results do not depend on
// which thread ran it: the kernels stay deterministic. make_state() builds one scratch state
// per thread; finish() runs on each thread after its last task (brgemm keeps per-thread
// hardware state, the AMX tile configuration, that must be handed back).
template <typename MakeState, typename Body, typename Finish>
void run_tasks(int64_t n, MakeState&& make_state, Body&& body, Finish&& finish) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto state = make_state();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(t, state);
    finish();
  });
}

}  // namespace slmfast::cpu::CPU_CAPABILITY::attn
