// attention_fwd.h — attention forward for the CPU: FlashAttention-2's tiled online softmax
// (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
// Partitioning", Algorithm 1) with block products on ATen's brgemm (attention_blocks.h).
//
// One task = one query block of one head of one document. For each key block the mask can
// reach (blocks outside [kmin, kmax] are never visited):
//   S = Q_i K_j^T                      (rows x n, fp32; fp64 for fp64)
//   m' = max(m, rowmax(scale * S)),  P = exp(scale * S - m'),  l = l e^(m - m') + rowsum(P)
//   O = O e^(m - m') + P V_j           (P rounded to bf16 for the bf16 product, as on GPUs)
// then out = O / l and lse = m + log l; a row that sees no key gets out = 0 and lse = -inf.
// K^T (and, for bf16, V in VNNI form) are packed once per key block before the tasks run.
#pragma once

#include "attention_blocks.h"

namespace slmfast::cpu::CPU_CAPABILITY::attn {

// P = exp(scale * s - m) computed as ProbExp<T>::exp(fmadd(s, scale * kFactor, -m * kFactor)).
// fp32 and fp64 use ATen's accurate exp (Sleef, 1 ulp). bf16 probabilities are rounded to 8
// bits right after, so there (with AVX-512) it is 2^t with t in the base-2 domain (kFactor =
// log2 e folds the change of base into the same fused multiply-add): round t to the nearest
// integer n, a degree-4 Taylor polynomial of 2^f on f = t - n in [-1/2, 1/2] (relative error
// below 5e-5, against bf16's 2e-3 rounding), then scale by 2^n (vscalefps): 8 instructions
// where exp_u20 takes ~17. t is clamped at -126 (2^-126 underflows in bf16's products anyway).
template <typename T>
struct ProbExp {
  using Acc = acc_t<T>;
  using Vec = at::vec::Vectorized<Acc>;
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kBase2 = std::is_same_v<T, BFloat16>;
#else
  static constexpr bool kBase2 = false;
#endif
  static constexpr Acc kFactor = kBase2 ? Acc(1.4426950408889634) : Acc(1);

  static inline Vec exp(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBase2) {
      const __m512 x = _mm512_max_ps(_mm512_set1_ps(-126.0f), t);  // NaN in t stays NaN
      const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 f = _mm512_sub_ps(x, n);
      __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(0.0096181291f), f, _mm512_set1_ps(0.0555041087f));
      y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.2402265070f));
      y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.6931471806f));
      y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
      return Vec(_mm512_scalef_ps(y, n));
    }
#endif
    return t.exp();
  }
};

// Writes the probabilities x of columns [c, c + cnt) (cnt <= W) of a row as T.
template <typename T, typename Vec>
SLM_BF16_TARGET inline void store_probs(T* p, const Vec& x, int64_t cnt) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    store_bf16(p, x, cnt);
  } else {
    x.store(p, cnt);
  }
}

// One row of the online softmax over the columns [c0, c1] of a block of n scores (the others are
// masked): updates the running max m and sum l, rescales the output row o (D values) and writes
// the row of probabilities as T to p (n values plus `pad` zeros; p may alias s when T is Acc).
template <typename T, typename Acc>
SLM_BF16_TARGET void softmax_row(const Acc* s, T* p, int64_t n, int64_t pad, int64_t c0, int64_t c1,
                                 Acc scale, Acc& m, Acc& l, Acc* o, int64_t D) {
  using Vec = at::vec::Vectorized<Acc>;
  constexpr int64_t W = Vec::size();
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  if (c0 > c1) {
    std::fill(p, p + n + pad, T(0));
    return;
  }
  const int64_t end = c1 + 1;
  const Acc m_new = std::max(m, max_scaled(s, c0, end, scale));
  using E = ProbExp<T>;
  // While every score so far is -inf (the mask value: such keys get probability 0), shift by 0
  // instead of -inf, so that exp gives 0 for them rather than exp(-inf + inf) = NaN.
  const Acc shift = m_new == kNegInf ? Acc(0) : m_new;
  const Vec vscale(scale * E::kFactor), vneg(-shift * E::kFactor);
  Vec sum0(Acc(0)), sum1(Acc(0));
  std::fill(p, p + c0, T(0));
  int64_t c = c0;
  for (; c + 2 * W <= end; c += 2 * W) {
    const Vec x0 = E::exp(at::vec::fmadd(Vec::loadu(s + c), vscale, vneg));
    const Vec x1 = E::exp(at::vec::fmadd(Vec::loadu(s + c + W), vscale, vneg));
    sum0 = sum0 + x0;
    sum1 = sum1 + x1;
    if constexpr (std::is_same_v<T, BFloat16>) {
      store_bf16x2(p + c, x0, x1);
    } else {
      x0.store(p + c);
      x1.store(p + c + W);
    }
  }
  for (; c < end; c += W) {
    const int64_t cnt = std::min(W, end - c);
    Vec x = E::exp(at::vec::fmadd(Vec::loadu(s + c, cnt), vscale, vneg));
    if (cnt < W) x = Vec::set(Vec(Acc(0)), x, cnt);
    sum0 = sum0 + x;
    store_probs<T>(p + c, x, cnt);
  }
  std::fill(p + end, p + n + pad, T(0));
  const Acc block_sum = at::vec::vec_reduce_all<Acc>([](Vec& a, Vec& b) { return a + b; }, sum0 + sum1);
  if (m_new == m) {  // the running max did not move: nothing to rescale
    l += block_sum;
    return;
  }
  const Acc alpha = m == kNegInf ? Acc(0) : std::exp(m - m_new);
  l = l * alpha + block_sum;
  m = m_new;
  const Vec va(alpha);
  for (int64_t d = 0; d < D; d += W) {
    const int64_t cnt = std::min(W, D - d);
    (Vec::loadu(o + d, cnt) * va).store(o + d, cnt);
  }
}

// Rows per strip of a block the mask cuts, and the column granularity of its products.
constexpr int64_t kStrip = 64;
constexpr int64_t kAlign = 32;

template <typename T>
void attention_fwd_kernel(const AttentionParams& p, double softmax_scale, int64_t bq, int64_t bk) {
  using Acc = acc_t<T>;
  using Vec = at::vec::Vectorized<Acc>;
  constexpr int64_t W = Vec::size();
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const Geometry g(p, bq, bk);
  const Mask mask(p);
  const int64_t D = p.head_dim, Hq = p.heads_q, Hkv = p.heads_kv, group = Hq / Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const Strides q_s{p.q_batch_stride, p.q_head_stride, p.q_row_stride};
  const Strides k_s{p.k_batch_stride, p.k_head_stride, p.k_row_stride};
  const Strides v_s{p.v_batch_stride, p.v_head_stride, p.v_row_stride};
  const Strides o_s{p.o_batch_stride, p.o_head_stride, p.o_row_stride};
  const Strides lse_s{p.lse_batch_stride, p.lse_head_stride, p.lse_row_stride};
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);

  // Packed B operands, one block of bk x D values per (kv head, key block).
  const int64_t blk = bk * D;
  at::Tensor kt_buf = empty_output({Hkv * g.nkb * blk}, opts);  // huge pages: see alloc.h
  at::Tensor vv_buf = empty_output({kVnni<T> ? Hkv * g.nkb * blk : 0}, opts);
  T* kt = kt_buf.data_ptr<T>();
  T* vv = vv_buf.data_ptr<T>();
  at::parallel_for(0, Hkv * g.nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t hk = t / g.nkb, jb = t % g.nkb, doc = g.kb_doc[jb];
      const int64_t j0 = (jb - g.kb_off[doc]) * bk, n = std::min(bk, g.S[doc] - j0);
      const T* ks = k + g.k_offset(k_s, doc, hk, j0);
      pack_transposed<T>(ks, p.k_row_stride, n, D, kt + t * blk, bk);  // (D, bk) K_j^T
      if constexpr (kVnni<T>) {
        const T* vs = v + g.k_offset(v_s, doc, hk, j0);
        pack_vnni(vs, p.v_row_stride, n, D, vv + t * blk);  // (bk, D) V_j
      }
    }
  });

  // Query blocks in order of decreasing work (the number of keys they can see), so that the
  // dynamic hand-out of tasks ends with the small ones.
  std::vector<int64_t> order(g.nqb), cost(g.nqb);
  {
    std::vector<int64_t> lo(bq), hi(bq);
    for (int64_t qb = 0; qb < g.nqb; ++qb) {
      const int64_t doc = g.qb_doc[qb], r0 = (qb - g.qb_off[doc]) * bq;
      int64_t kmin, kmax;
      mask.rows(g.T[doc], g.S[doc], r0, std::min(bq, g.T[doc] - r0), lo.data(), hi.data(), kmin, kmax);
      cost[qb] = std::max<int64_t>(0, kmax - kmin + 1);
      order[qb] = qb;
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  }

  struct State {
    at::Tensor acc_buf, t_buf;
    Acc *s, *o, *m, *l;
    T* pb;
    std::vector<int64_t> lo, hi;
  };
  auto make_state = [&]() {
    State st;
    const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value);
    st.acc_buf = at::empty({bq * bk + bq * D + 2 * bq}, acc_opts);
    st.t_buf = at::empty({kVnni<T> ? bq * bk : 0}, opts);
    st.s = st.acc_buf.template data_ptr<Acc>();
    st.o = st.s + bq * bk;
    st.m = st.o + bq * D;
    st.l = st.m + bq;
    // The probabilities overwrite the scores in place unless they need another type.
    st.pb = kVnni<T> ? st.t_buf.template data_ptr<T>() : reinterpret_cast<T*>(st.s);
    st.lo.resize(bq), st.hi.resize(bq);
    return st;
  };

  run_tasks(g.nqb * Hq, make_state, [&](int64_t task, State& st) {
    const int64_t qb = order[task / Hq], h = task % Hq, hk = h / group;
    const int64_t doc = g.qb_doc[qb], Td = g.T[doc], Sd = g.S[doc];
    const int64_t r0 = (qb - g.qb_off[doc]) * bq, rows = std::min(bq, Td - r0);
    const T* qp = q + g.q_offset(q_s, doc, h, r0);
    T* op = out + g.q_offset(o_s, doc, h, r0);
    float* lp = p.lse + g.q_offset(lse_s, doc, h, r0);
    int64_t kmin, kmax;
    mask.rows(Td, Sd, r0, rows, st.lo.data(), st.hi.data(), kmin, kmax);
    std::fill(st.o, st.o + rows * D, Acc(0));
    std::fill(st.m, st.m + rows, kNegInf);
    std::fill(st.l, st.l + rows, Acc(0));
    const Acc scale = static_cast<Acc>(softmax_scale);
    for (int64_t j = kmin / bk; kmin <= kmax && j <= kmax / bk; ++j) {
      const int64_t j0 = j * bk, n = std::min(bk, Sd - j0), jb = g.kb_off[doc] + j;
      const int64_t pad = kVnni<T> ? (n & 1) : 0;
      const T* ktj = kt + (hk * g.nkb + jb) * blk;  // K_j^T (D, bk); VNNI: column c at ktj + 2c
      const T* vj = kVnni<T> ? vv + (hk * g.nkb + jb) * blk
                             : v + g.k_offset(v_s, doc, hk, j0);
      const int64_t ldv = kVnni<T> ? D : p.v_row_stride;  // V_j: key row c at vj + c * ldv
      // Every row sees the whole block when the last row's lower bound and the first row's
      // upper bound (both grow with the row) enclose it: one product pair, no per-row masking.
      if (st.lo[rows - 1] <= j0 && st.hi[0] >= j0 + n - 1) {
        Gemm<T>::run(rows, n, D, qp, p.q_row_stride, ktj, bk, st.s, bk, false);  // S = Q_i K_j^T
        for (int64_t r = 0; r < rows; ++r) {
          softmax_row<T, Acc>(st.s + r * bk, st.pb + r * bk, n, pad, 0, n - 1, scale, st.m[r], st.l[r],
                              st.o + r * D, D);
        }
        Gemm<T>::run(rows, D, n + pad, st.pb, bk, vj, ldv, st.o, D, true);  // O += P V_j
        continue;
      }
      // A block the mask cuts: strips of kStrip rows each multiply only the columns [ca, cb)
      // their rows can see (rounded out to multiples of kAlign, so that brgemm sees few shapes).
      for (int64_t r0s = 0; r0s < rows; r0s += kStrip) {
        const int64_t sn = std::min(kStrip, rows - r0s);
        int64_t ca = n, cb = 0;
        for (int64_t r = r0s; r < r0s + sn; ++r) {
          const int64_t c0 = std::max<int64_t>(0, st.lo[r] - j0);
          const int64_t c1 = std::min<int64_t>(n - 1, st.hi[r] - j0);
          if (st.lo[r] <= st.hi[r] && c0 <= c1) ca = std::min(ca, c0), cb = std::max(cb, c1 + 1);
        }
        if (ca >= cb) continue;  // no row of the strip sees this block
        ca = ca / kAlign * kAlign;
        const int64_t kb = std::min(n + pad, (cb + kAlign - 1) / kAlign * kAlign);
        cb = std::min(n, kb);
        const T* kt_cols = ktj + ca * (kVnni<T> ? 2 : 1);  // columns from ca (VNNI: pairs of values)
        Gemm<T>::run(sn, cb - ca, D, qp + r0s * p.q_row_stride, p.q_row_stride, kt_cols, bk,
                     st.s + r0s * bk + ca, bk, false);
        for (int64_t r = r0s; r < r0s + sn; ++r) {
          const int64_t c0 = std::max<int64_t>(0, st.lo[r] - j0);
          const int64_t c1 = std::min<int64_t>(n - 1, st.hi[r] - j0);
          // c0 > c1 (nothing visible here) also covers rows that see no key at all (lo > hi).
          softmax_row<T, Acc>(st.s + r * bk, st.pb + r * bk, n, pad, c0, c1, scale, st.m[r], st.l[r],
                              st.o + r * D, D);
        }
        Gemm<T>::run(sn, D, kb - ca, st.pb + r0s * bk + ca, bk, vj + ca * ldv, ldv, st.o + r0s * D, D, true);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* orow = op + r * p.o_row_stride;
      const Acc l = st.l[r];
      // A row that sees keys divides by l, also when l is NaN: a NaN among its scores, or a
      // +inf (whose exp(inf - inf) is NaN, as in softmax), reaches out and lse. A row whose
      // visible scores are all -inf (l = 0) is a row that sees no key, as one the mask empties:
      // out = 0, lse = -inf (and no gradient flows through it).
      if (st.lo[r] <= st.hi[r] && l != Acc(0)) {
        const Vec inv(Acc(1) / l);
        for (int64_t d = 0; d < D; d += W) {
          const int64_t cnt = std::min(W, D - d);
          store_acc<T>(orow + d, Vec::loadu(st.o + r * D + d, cnt) * inv, cnt);
        }
        lp[r * p.lse_row_stride] = static_cast<float>(st.m[r] + std::log(l));
      } else {
        std::fill(orow, orow + D, T(0));
        lp[r * p.lse_row_stride] = -std::numeric_limits<float>::infinity();
      }
    }
  }, [] { Gemm<T>::release(); });
}

}  // namespace slmfast::cpu::CPU_CAPABILITY::attn
