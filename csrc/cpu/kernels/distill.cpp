// kernels/distill.cpp — the vectorized kernel of the CPU distillation losses between student and
// teacher logits, one row at a time, compiled once per capability (csrc/cpu/capability.h); the ops
// are csrc/cpu/distill.cpp.
//
// Distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; JSD(beta) as
// in Agarwal et al. 2023, GKD): with u = s / T, v = t / T, Q = softmax(u) (student), P =
// softmax(v) (teacher), per row
//   forward_kl  KL(P || Q) = sum P (log P - log Q)            dL/du = Q - P
//   reverse_kl  KL(Q || P) = sum Q (log Q - log P)            dL/du = Q (log Q - log P - KL)
//   jsd         beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
//               g = (1 - beta) Q (log Q - log M)              dL/du = g - Q sum(g)
//   tvd         1/2 sum |P - Q|,  a = sign(Q - P) / 2          dL/du = Q (a - sum(Q a)), the bracket
//               from the masses where Q > P and Q < P (see kStats)
//   loss = T^2 soft + hard_weight (logsumexp(s) - s_y),  dL/ds = T dL/du + hard_weight (softmax(s) - onehot(y))
// four passes per row: max of s and t; the three sums of exp; the loss and the row sum c (saved
// as per-row stats with the maxima and the log-sums, so that the backward alone is one pass); the
// gradient. Log-probabilities are formed as (s - max) / T - log sum, as log_softmax does.
//
// Rows run in parallel with at::parallel_for; each pass is at::vec over the row, accumulating in
// at::opmath_type (fp32 for bf16/fp16, fp64 for fp64). Deterministic: no cross-row reductions.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "loss_rows.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kStats = kDistillStats;
constexpr auto kForwardKL = DistillKind::kForwardKL;
constexpr auto kReverseKL = DistillKind::kReverseKL;
constexpr auto kJSD = DistillKind::kJSD;
constexpr auto kTVD = DistillKind::kTVD;

template <typename T, DistillKind K>
void distill_row(const DistillParams& p, int64_t i) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  const int64_t cols = p.cols;
  const T* s = static_cast<const T*>(p.student) + i * p.student_row_stride;
  const T* t = static_cast<const T*>(p.teacher) + i * p.teacher_row_stride;
  T* ds = p.dstudent != nullptr ? static_cast<T*>(p.dstudent) + i * p.dstudent_row_stride : nullptr;
  Acc* loss = static_cast<Acc*>(p.loss);
  Acc* stats = static_cast<Acc*>(p.stats) + i * kStats;
  const int64_t y = p.target != nullptr ? p.target[i] : -1;
  if (p.target != nullptr && y == p.ignore_index) {
    if (loss != nullptr) loss[i] = 0;
    if (!p.stats_is_input) std::fill(stats, stats + kStats, Acc(0));
    if (ds != nullptr) zero_row(ds, cols);
    return;
  }
  const Acc T_ = Acc(p.temperature), inv_t = Acc(1) / T_;
  const bool hard = p.hard_weight > 0;
  const Acc beta = Acc(p.beta);
  const Acc log_b = K == kJSD ? std::log(beta) : Acc(0);
  const Acc log_1mb = K == kJSD ? std::log1p(-beta) : Acc(0);
  const Vec vinv_t(inv_t);
  // log M = logaddexp(log beta + log P, log(1 - beta) + log Q)
  auto log_mix = [&](const Vec& lp, const Vec& lq) {
    const Vec a = lp + Vec(log_b), b = lq + Vec(log_1mb);
    const Vec hi = at::vec::maximum(a, b), lo = at::vec::minimum(a, b);
    return hi + (lo - hi).exp().log1p();
  };
  // x * v with 0 where x == 0 exactly: 0 log 0 = 0, so a class whose probability is 0 (a -inf
  // logit, a banned token) counts 0 even though its log-ratio is infinite or NaN. A NaN x is not
  // 0 and still reaches the result.
  auto times_nonzero = [](const Vec& x, const Vec& v) { return Vec::blendv(x * v, Vec(0), x == Vec(0)); };
  auto tvd_grad = [](const Vec& q, const Vec& pt, Acc above, Acc below) {  // Q (a - sum Q a)
    const Vec tie(Acc(0.5) * (below - above));
    return q * Vec::blendv(Vec::blendv(tie, Vec(-above), q < pt), Vec(below), q > pt);
  };

  Acc max_s, max_t, log_su, log_sv, log_sh, c, c2;
  if (p.stats_is_input) {
    max_s = stats[0], max_t = stats[1], log_su = stats[2], log_sv = stats[3], log_sh = stats[4], c = stats[5];
    c2 = stats[6];
  } else {
    Vec ms(-kInf), mt(-kInf);
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t n = std::min(kW, cols - j);
      ms = at::vec::maximum(ms, keep_first(load_acc<T>(s + j, n), n, -kInf));
      mt = at::vec::maximum(mt, keep_first(load_acc<T>(t + j, n), n, -kInf));
    }
    max_s = vmax(ms), max_t = vmax(mt);
    Vec su(0), sv(0), sh(0);
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t n = std::min(kW, cols - j);
      const Vec ds_ = load_acc<T>(s + j, n) - Vec(max_s), dt_ = load_acc<T>(t + j, n) - Vec(max_t);
      su = su + keep_first((ds_ * vinv_t).exp(), n, Acc(0));
      sv = sv + keep_first((dt_ * vinv_t).exp(), n, Acc(0));
      if (hard) sh = sh + keep_first(ds_.exp(), n, Acc(0));
    }
    log_su = std::log(vsum(su));
    log_sv = std::log(vsum(sv));
    log_sh = hard ? std::log(vsum(sh)) : Acc(0);
    // The soft loss, and c, the row sum the gradient needs (KL for reverse_kl, sum g for jsd,
    // sum Q a for tvd).
    Vec soft(0), cv(0), cv2(0);
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t n = std::min(kW, cols - j);
      const Vec lq = (load_acc<T>(s + j, n) - Vec(max_s)) * vinv_t - Vec(log_su);
      const Vec lp = (load_acc<T>(t + j, n) - Vec(max_t)) * vinv_t - Vec(log_sv);
      const Vec q = lq.exp(), pt = lp.exp();
      Vec term, cterm(0), cterm2(0);
      if constexpr (K == kForwardKL) {
        term = times_nonzero(pt, lp - lq);
      } else if constexpr (K == kReverseKL) {
        term = times_nonzero(q, lq - lp);
        cterm = term;
      } else if constexpr (K == kJSD) {
        const Vec lm = log_mix(lp, lq);
        cterm = Vec(Acc(1) - beta) * times_nonzero(q, lq - lm);
        term = Vec(beta) * times_nonzero(pt, lp - lm) + cterm;
      } else {
        term = Vec(Acc(0.5)) * (pt - q).abs();
        cterm = Vec::blendv(Vec(0), q, q > pt);
        cterm2 = Vec::blendv(Vec(0), q, q < pt);
      }
      soft = soft + keep_first(term, n, Acc(0));
      cv = cv + keep_first(cterm, n, Acc(0));
      if constexpr (K == kTVD) cv2 = cv2 + keep_first(cterm2, n, Acc(0));
    }
    c = vsum(cv);
    c2 = vsum(cv2);
    stats[0] = max_s, stats[1] = max_t, stats[2] = log_su, stats[3] = log_sv, stats[4] = log_sh, stats[5] = c;
    stats[6] = c2;
    if (loss != nullptr) {
      Acc value = T_ * T_ * vsum(soft);
      if (hard) value += Acc(p.hard_weight) * ((max_s - to_acc(s[y])) + log_sh);
      loss[i] = value;
    }
  }
  if (ds == nullptr) return;
  const Acc scale = static_cast<const Acc*>(p.grad_scale)[i * p.grad_scale_stride];
  const Vec soft_scale(T_ * scale), hard_scale(Acc(p.hard_weight) * scale);
  const Acc hot = hard ? Acc(p.hard_weight) * scale : Acc(0);
  for (int64_t j = 0; j < cols; j += kW) {
    const int64_t n = std::min(kW, cols - j);
    const Vec ds_ = load_acc<T>(s + j, n) - Vec(max_s);
    const Vec lq = ds_ * vinv_t - Vec(log_su);
    const Vec lp = (load_acc<T>(t + j, n) - Vec(max_t)) * vinv_t - Vec(log_sv);
    const Vec q = lq.exp();
    Vec gu;
    if constexpr (K == kForwardKL) {
      gu = q - lp.exp();
    } else if constexpr (K == kReverseKL) {
      gu = times_nonzero(q, lq - lp - Vec(c));
    } else if constexpr (K == kJSD) {
      gu = times_nonzero(q, Vec(Acc(1) - beta) * (lq - log_mix(lp, lq)) - Vec(c));
    } else {
      gu = tvd_grad(q, lp.exp(), c, c2);
    }
    Vec d = gu * soft_scale;
    if (hard) d = d + (ds_ - Vec(log_sh)).exp() * hard_scale;
    store_acc<T>(ds + j, hard ? sub_at(d, j, y, hot) : d, n);
  }
}

template <typename T, DistillKind K>
void distill_kernel(const DistillParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) distill_row<T, K>(p, i);
  });
}

// The one dispatch point: (dtype, kind) -> template arguments.
void distill(const DistillParams& p) {
  if (p.rows == 0) return;
  visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    switch (p.kind) {
      case DistillKind::kForwardKL: distill_kernel<T, DistillKind::kForwardKL>(p); break;
      case DistillKind::kReverseKL: distill_kernel<T, DistillKind::kReverseKL>(p); break;
      case DistillKind::kJSD: distill_kernel<T, DistillKind::kJSD>(p); break;
      case DistillKind::kTVD: distill_kernel<T, DistillKind::kTVD>(p); break;
    }
  });
}

}  // namespace

SLMFAST_REGISTER_CPU_KERNEL(distill, distill);

}  // namespace slmfast::cpu::CPU_CAPABILITY
