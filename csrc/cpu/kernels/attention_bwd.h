// attention_bwd.h — attention backward for the CPU: FlashAttention-2's backward (Dao 2023,
// Algorithm 2) from the saved q, k, v, out and lse only; the probabilities are recomputed block
// by block and no T x S tensor exists. Per (query block i, key block j) pair:
//   S = Q_i K_j^T,  P = exp(scale * S - lse)          (0 where masked)
//   dP = dO_i V_j^T,  dS = P * (dP - delta),  delta = rowsum(dO * O)
//   dV_j += P^T dO_i,  dK_j += scale * dS^T Q_i,  dQ_i += scale * dS K_j
// No atomics, and each gradient block is summed in one fixed order, so gradients are
// bit-identical run to run whatever thread runs what. Two schedules, chosen by how many
// (document, kv head) pairs there are per thread:
//  * grouped (many pairs): one task per (document, kv head) owns dK, dV and the dQ of every
//    query head of its group; it walks key blocks j, and for each, the query heads and blocks i
//    that see it, doing the five products above once per pair.
//  * split (few pairs, e.g. one long sequence with one kv head): dK/dV tasks per (document, kv
//    head, key block) loop over the query heads and blocks of their group, and a separate dQ
//    pass has one task per (document, query head, query block) that recomputes S, P, dP and dS
//    over its key blocks. Both passes keep every core busy at the cost of two more products.
// Both schedules add dQ_i's terms in increasing j and dK_j's in increasing (head, i), with the
// same block products, so they give the same bits.
#pragma once

#include "attention_fwd.h"

namespace slmfast::cpu::CPU_CAPABILITY::attn {

template <typename T>
void attention_bwd_kernel(const AttentionBwdParams& p, double softmax_scale, int64_t bq, int64_t bk) {
  using Acc = acc_t<T>;
  using Vec = at::vec::Vectorized<Acc>;
  constexpr int64_t W = Vec::size();
  const Geometry g(p, bq, bk);
  const Mask mask(p);
  const int64_t D = p.head_dim, Hq = p.heads_q, Hkv = p.heads_kv, group = Hq / Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* o = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value);
  const Acc scale = static_cast<Acc>(softmax_scale);  // p.scale is float; fp64 keeps all digits

  // ---- pre-pass: delta per query row; packed B operands per block ----
  const int64_t qblk = bq * D, kblk = bk * D;
  // Fresh multi-megabyte buffers: advised to huge pages (alloc.h) to cut first-touch faults.
  at::Tensor delta_buf = empty_output({Hq * g.nqb * bq}, acc_opts);  // (Hq, query blocks, bq)
  at::Tensor qv_buf = empty_output({kVnni<T> ? Hq * g.nqb * qblk : 0}, opts);
  at::Tensor dov_buf = empty_output({kVnni<T> ? Hq * g.nqb * qblk : 0}, opts);
  at::Tensor kt_buf = empty_output({Hkv * g.nkb * kblk}, opts);
  at::Tensor vt_buf = empty_output({Hkv * g.nkb * kblk}, opts);
  at::Tensor kv_buf = empty_output({kVnni<T> ? Hkv * g.nkb * kblk : 0}, opts);
  Acc* delta = delta_buf.data_ptr<Acc>();
  T *qv = qv_buf.data_ptr<T>(), *dov = dov_buf.data_ptr<T>();
  T *kt = kt_buf.data_ptr<T>(), *vt = vt_buf.data_ptr<T>(), *kv = kv_buf.data_ptr<T>();

  const Strides q_s{p.q_batch_stride, p.q_head_stride, p.q_row_stride};
  const Strides k_s{p.k_batch_stride, p.k_head_stride, p.k_row_stride};
  const Strides v_s{p.v_batch_stride, p.v_head_stride, p.v_row_stride};
  const Strides o_s{p.o_batch_stride, p.o_head_stride, p.o_row_stride};
  const Strides lse_s{p.lse_batch_stride, p.lse_head_stride, p.lse_row_stride};
  const Strides do_s{p.do_batch_stride, p.do_head_stride, p.do_row_stride};
  const Strides dq_s{p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride};
  const Strides dk_s{p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride};
  const Strides dv_s{p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride};

  // One parallel pass for both sides (one barrier less): items [0, Hq * nqb) are query blocks
  // (delta, and for bf16 Q and dO in VNNI form), the rest key blocks (K^T, V^T; bf16 also K).
  const int64_t q_items = Hq * g.nqb;
  at::parallel_for(0, q_items + Hkv * g.nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      if (item < q_items) {
        const int64_t t = item, h = t / g.nqb, qb = t % g.nqb, doc = g.qb_doc[qb];
        const int64_t r0 = (qb - g.qb_off[doc]) * bq, rows = std::min(bq, g.T[doc] - r0);
        const T* dop = dout + g.q_offset(do_s, doc, h, r0);
        const T* op = o + g.q_offset(o_s, doc, h, r0);
        for (int64_t r = 0; r < rows; ++r) {
          Vec acc(Acc(0));
          for (int64_t d = 0; d < D; d += W) {
            const int64_t cnt = std::min(W, D - d);
            acc = at::vec::fmadd(load_acc<T>(dop + r * p.do_row_stride + d, cnt),
                                 load_acc<T>(op + r * p.o_row_stride + d, cnt), acc);
          }
          delta[t * bq + r] = at::vec::vec_reduce_all<Acc>([](Vec& a, Vec& b) { return a + b; }, acc);
        }
        if constexpr (kVnni<T>) {
          pack_vnni(q + g.q_offset(q_s, doc, h, r0), p.q_row_stride, rows, D, qv + t * qblk);  // Q_i
          pack_vnni(dop, p.do_row_stride, rows, D, dov + t * qblk);                            // dO_i
        }
      } else {
        const int64_t t = item - q_items, hk = t / g.nkb, jb = t % g.nkb, doc = g.kb_doc[jb];
        const int64_t j0 = (jb - g.kb_off[doc]) * bk, n = std::min(bk, g.S[doc] - j0);
        const T* kp = k + g.k_offset(k_s, doc, hk, j0);
        const T* vp = v + g.k_offset(v_s, doc, hk, j0);
        pack_transposed<T>(kp, p.k_row_stride, n, D, kt + t * kblk, bk);  // K_j^T (D, bk)
        pack_transposed<T>(vp, p.v_row_stride, n, D, vt + t * kblk, bk);  // V_j^T (D, bk)
        if constexpr (kVnni<T>) pack_vnni(kp, p.k_row_stride, n, D, kv + t * kblk);  // K_j (bk, D)
      }
    }
  });

  // fp64 (gradcheck's path): the saved lse is float32 (the contract's type), good to ~1e-7 only,
  // which would cap the fp64 gradients there; recompute it in fp64 from the scores instead.
  at::Tensor lse64_buf;
  const Acc* lse64 = nullptr;
  if constexpr (std::is_same_v<T, double>) {
    lse64_buf = at::empty({Hq * g.nqb * bq}, acc_opts);
    Acc* out64 = lse64_buf.data_ptr<Acc>();
    at::parallel_for(0, Hq * g.nqb, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> sbuf(bq * bk);
      std::vector<int64_t> lo(bq), hi(bq);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t h = t / g.nqb, qb = t % g.nqb, doc = g.qb_doc[qb], hk = h / group;
        const int64_t r0 = (qb - g.qb_off[doc]) * bq, rows = std::min(bq, g.T[doc] - r0);
        const T* qp = q + g.q_offset(q_s, doc, h, r0);
        int64_t kmin, kmax;
        mask.rows(g.T[doc], g.S[doc], r0, rows, lo.data(), hi.data(), kmin, kmax);
        std::vector<Acc> m(rows, -std::numeric_limits<Acc>::infinity()), l(rows, Acc(0));
        for (int64_t j = kmin / bk; kmin <= kmax && j <= kmax / bk; ++j) {
          const int64_t j0 = j * bk, n = std::min(bk, g.S[doc] - j0), jb = g.kb_off[doc] + j;
          const T* ktj = kt + (hk * g.nkb + jb) * kblk;
          Gemm<T>::run(rows, n, D, qp, p.q_row_stride, ktj, bk, sbuf.data(), bk, false);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t c0 = std::max<int64_t>(0, lo[r] - j0), c1 = std::min<int64_t>(n - 1, hi[r] - j0);
            for (int64_t c = c0; c <= c1; ++c) {
              const Acc x = sbuf[r * bk + c] * scale;
              if (x == -std::numeric_limits<Acc>::infinity()) continue;  // probability 0, as in the forward
              if (x > m[r]) l[r] = l[r] * std::exp(m[r] - x), m[r] = x;
              l[r] += std::exp(x - m[r]);
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          // As the forward: m + log l, NaN when a NaN or +inf is among the scores; -inf for a row
          // that sees no key or whose visible scores are all -inf (l = 0).
          out64[t * bq + r] = l[r] != Acc(0) ? m[r] + std::log(l[r]) : -std::numeric_limits<Acc>::infinity();
        }
      }
    });
    lse64 = out64;
  }

  // ---- per-thread scratch ----
  const bool grouped = g.docs * Hkv >= 4 * static_cast<int64_t>(at::get_num_threads());
  struct State {
    at::Tensor acc_buf, t_buf, dq_buf;
    Acc *s, *dp, *dk_acc, *dv_acc, *lse, *delta, *dq_acc;
    T *pt, *dst, *ds;
    std::vector<int64_t> lo, hi;
  };
  auto make_state = [&]() {
    State st;
    st.acc_buf = at::empty({2 * bq * bk + 2 * bk * D + 2 * bq}, acc_opts);
    st.s = st.acc_buf.template data_ptr<Acc>();
    st.dp = st.s + bq * bk;
    st.dk_acc = st.dp + bq * bk;
    st.dv_acc = st.dk_acc + bk * D;
    st.lse = st.dv_acc + bk * D;
    st.delta = st.lse + bq;
    st.t_buf = at::empty({2 * bk * bq + (kVnni<T> ? bq * bk : 0)}, opts);
    st.pt = st.t_buf.template data_ptr<T>();
    st.dst = st.pt + bk * bq;
    // dS as the A operand of dQ += dS K_j: its own bf16 copy, or the fp32 dP/dS buffer itself.
    st.ds = kVnni<T> ? st.dst + bk * bq : reinterpret_cast<T*>(st.dp);
    st.dq_buf = at::empty({grouped ? group * g.max_T * D : bq * D}, acc_opts);
    st.dq_acc = st.dq_buf.template data_ptr<Acc>();
    st.lo.resize(bq), st.hi.resize(bq);
    return st;
  };

  // Rows [r0, r0 + rows) of query block qb of head h: mask bounds, lse and delta; returns the
  // union [kmin, kmax] of the keys they see.
  auto load_rows = [&](State& st, int64_t doc, int64_t h, int64_t qb, int64_t r0, int64_t rows, int64_t& kmin,
                       int64_t& kmax) {
    mask.rows(g.T[doc], g.S[doc], r0, rows, st.lo.data(), st.hi.data(), kmin, kmax);
    const float* lp =
        p.lse + g.q_offset(lse_s, doc, h, r0);
    for (int64_t r = 0; r < rows; ++r) {
      st.lse[r] = lse64 != nullptr ? lse64[(h * g.nqb + qb) * bq + r]
                                   : static_cast<Acc>(lp[r * p.lse_row_stride]);
      st.delta[r] = delta[(h * g.nqb + qb) * bq + r];
    }
  };

  // P (into st.s) and dS (into st.dp) of query rows [r0, r0 + rows) of head h against key block
  // j (n keys from j0) of kv head hk.
  auto p_and_ds = [&](State& st, int64_t doc, int64_t h, int64_t hk, int64_t r0, int64_t rows, int64_t j0,
                      int64_t n, int64_t jb) {
    const T* qp = q + g.q_offset(q_s, doc, h, r0);
    const T* dop = dout + g.q_offset(do_s, doc, h, r0);
    Gemm<T>::run(rows, n, D, qp, p.q_row_stride, kt + (hk * g.nkb + jb) * kblk, bk, st.s, bk, false);
    Gemm<T>::run(rows, n, D, dop, p.do_row_stride, vt + (hk * g.nkb + jb) * kblk, bk, st.dp, bk, false);
    const bool full = st.lo[rows - 1] <= j0 && st.hi[0] >= j0 + n - 1;
    using E = ProbExp<T>;
    const Vec vscale(scale * E::kFactor);
    for (int64_t r = 0; r < rows; ++r) {
      Acc* srow = st.s + r * bk;
      Acc* dprow = st.dp + r * bk;
      const int64_t c0 = full ? 0 : std::max<int64_t>(0, st.lo[r] - j0);
      const int64_t c1 = full ? n - 1 : std::min<int64_t>(n - 1, st.hi[r] - j0);
      if (c0 > c1 || st.lse[r] == -std::numeric_limits<Acc>::infinity()) {  // nothing visible here
        std::fill(srow, srow + n, Acc(0));
        std::fill(dprow, dprow + n, Acc(0));
        continue;
      }
      std::fill(srow, srow + c0, Acc(0));
      std::fill(dprow, dprow + c0, Acc(0));
      const Vec vlse(-st.lse[r] * E::kFactor), vdelta(st.delta[r]);
      for (int64_t c = c0; c <= c1; c += W) {
        const int64_t cnt = std::min(W, c1 + 1 - c);
        const Vec pv = E::exp(at::vec::fmadd(Vec::loadu(srow + c, cnt), vscale, vlse));
        pv.store(srow + c, cnt);
        (pv * (Vec::loadu(dprow + c, cnt) - vdelta)).store(dprow + c, cnt);
      }
      std::fill(srow + c1 + 1, srow + n, Acc(0));
      std::fill(dprow + c1 + 1, dprow + n, Acc(0));
    }
  };

  // dV_j += P^T dO_i and dK_j += dS^T Q_i from st.s / st.dp (rows x n).
  auto accumulate_dk_dv = [&](State& st, int64_t doc, int64_t h, int64_t qb, int64_t r0, int64_t rows,
                              int64_t n) {
    const int64_t pad = kVnni<T> ? (rows & 1) : 0;
    transpose_to<T, Acc>(st.s, bk, st.pt, bq, rows, n);    // P^T (n, rows)
    transpose_to<T, Acc>(st.dp, bk, st.dst, bq, rows, n);  // dS^T (n, rows)
    if (pad) {
      for (int64_t c = 0; c < n; ++c) st.pt[c * bq + rows] = T(0), st.dst[c * bq + rows] = T(0);
    }
    if constexpr (kVnni<T>) {
      Gemm<T>::run(n, D, rows + pad, st.pt, bq, dov + (h * g.nqb + qb) * qblk, D, st.dv_acc, D, true);
      Gemm<T>::run(n, D, rows + pad, st.dst, bq, qv + (h * g.nqb + qb) * qblk, D, st.dk_acc, D, true);
    } else {
      const T* dop = dout + g.q_offset(do_s, doc, h, r0);
      const T* qp = q + g.q_offset(q_s, doc, h, r0);
      Gemm<T>::run(n, D, rows, st.pt, bq, dop, p.do_row_stride, st.dv_acc, D, true);
      Gemm<T>::run(n, D, rows, st.dst, bq, qp, p.q_row_stride, st.dk_acc, D, true);
    }
  };

  // dQ_i (rows x D at dq_acc, leading dimension D) += dS K_j.
  auto accumulate_dq = [&](State& st, int64_t doc, int64_t hk, int64_t rows, int64_t j0, int64_t n,
                           int64_t jb, Acc* dq_acc) {
    if constexpr (kVnni<T>) {
      const int64_t pad = n & 1;
      convert_rows<T, Acc>(st.dp, bk, st.ds, bk, rows, n, pad);
      Gemm<T>::run(rows, D, n + pad, st.ds, bk, kv + (hk * g.nkb + jb) * kblk, D, dq_acc, D, true);
    } else {
      const T* kp = k + g.k_offset(k_s, doc, hk, j0);
      Gemm<T>::run(rows, D, n, st.ds, bk, kp, p.k_row_stride, dq_acc, D, true);
    }
  };

  auto store_scaled = [&](const Acc* src, T* dst, int64_t dst_row_stride, int64_t rows, Acc factor) {
    const Vec f(factor);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < D; d += W) {
        const int64_t cnt = std::min(W, D - d);
        store_acc<T>(dst + r * dst_row_stride + d, Vec::loadu(src + r * D + d, cnt) * f, cnt);
      }
    }
  };

  // The dK/dV work of key block j (kv head hk): over the query heads of the group and the query
  // blocks that see the block; with dq_acc (grouped schedule) also dQ.
  auto key_block = [&](State& st, int64_t doc, int64_t hk, int64_t j, Acc* dq_acc) {
    const int64_t j0 = j * bk, n = std::min(bk, g.S[doc] - j0), jb = g.kb_off[doc] + j;
    std::fill(st.dk_acc, st.dk_acc + n * D, Acc(0));
    std::fill(st.dv_acc, st.dv_acc + n * D, Acc(0));
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t h = hk * group + hh;
      for (int64_t qb = g.qb_off[doc]; qb < g.qb_off[doc + 1]; ++qb) {
        const int64_t r0 = (qb - g.qb_off[doc]) * bq, rows = std::min(bq, g.T[doc] - r0);
        int64_t kmin, kmax;
        load_rows(st, doc, h, qb, r0, rows, kmin, kmax);
        if (kmin > kmax || kmax < j0 || kmin > j0 + n - 1) continue;  // this query block sees none of it
        p_and_ds(st, doc, h, hk, r0, rows, j0, n, jb);
        accumulate_dk_dv(st, doc, h, qb, r0, rows, n);
        if (dq_acc != nullptr) accumulate_dq(st, doc, hk, rows, j0, n, jb, dq_acc + (hh * g.T[doc] + r0) * D);
      }
    }
    store_scaled(st.dk_acc, dk + g.k_offset(dk_s, doc, hk, j0),
                 p.dk_row_stride, n, scale);
    store_scaled(st.dv_acc, dv + g.k_offset(dv_s, doc, hk, j0),
                 p.dv_row_stride, n, Acc(1));
  };

  auto dq_rows = [&](int64_t doc, int64_t h, int64_t r0) {
    return dq + g.q_offset(dq_s, doc, h, r0);
  };
  auto release = [] { Gemm<T>::release(); };

  if (grouped) {
    // Largest documents first.
    std::vector<int64_t> order(g.docs * Hkv);
    for (int64_t t = 0; t < g.docs * Hkv; ++t) order[t] = t;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return g.T[a / Hkv] * g.S[a / Hkv] > g.T[b / Hkv] * g.S[b / Hkv];
    });
    run_tasks(g.docs * Hkv, make_state, [&](int64_t task, State& st) {
      const int64_t doc = order[task] / Hkv, hk = order[task] % Hkv, Td = g.T[doc];
      std::fill(st.dq_acc, st.dq_acc + group * Td * D, Acc(0));
      for (int64_t j = 0; j < g.kb_off[doc + 1] - g.kb_off[doc]; ++j) key_block(st, doc, hk, j, st.dq_acc);
      for (int64_t hh = 0; hh < group; ++hh) {
        store_scaled(st.dq_acc + hh * Td * D, dq_rows(doc, hk * group + hh, 0), p.dq_row_stride, Td, scale);
      }
    }, release);
    return;
  }

  // Split schedule, pass 1: dK and dV per (kv head, key block).
  run_tasks(Hkv * g.nkb, make_state, [&](int64_t task, State& st) {
    const int64_t hk = task / g.nkb, jb = task % g.nkb, doc = g.kb_doc[jb];
    key_block(st, doc, hk, jb - g.kb_off[doc], nullptr);
  }, release);
  // Pass 2: dQ per (query head, query block).
  run_tasks(Hq * g.nqb, make_state, [&](int64_t task, State& st) {
    const int64_t h = task / g.nqb, qb = task % g.nqb, hk = h / group, doc = g.qb_doc[qb];
    const int64_t r0 = (qb - g.qb_off[doc]) * bq, rows = std::min(bq, g.T[doc] - r0);
    int64_t kmin, kmax;
    load_rows(st, doc, h, qb, r0, rows, kmin, kmax);
    std::fill(st.dq_acc, st.dq_acc + rows * D, Acc(0));
    for (int64_t j = kmin / bk; kmin <= kmax && j <= kmax / bk; ++j) {
      const int64_t j0 = j * bk, n = std::min(bk, g.S[doc] - j0), jb = g.kb_off[doc] + j;
      p_and_ds(st, doc, h, hk, r0, rows, j0, n, jb);
      accumulate_dq(st, doc, hk, rows, j0, n, jb, st.dq_acc);
    }
    store_scaled(st.dq_acc, dq_rows(doc, h, r0), p.dq_row_stride, rows, scale);
  }, release);
}

}  // namespace slmfast::cpu::CPU_CAPABILITY::attn
