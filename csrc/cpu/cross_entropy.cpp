// cross_entropy.cpp — fused row-wise softmax cross-entropy and distillation losses for the CPU:
// loss, log-sum-exp and the gradient of one row of logits at a time, never a softmax tensor.
//
// Cross-entropy (the math is in csrc/common/params.h, CrossEntropyParams): a row is read three
// times, all from cache (a row of 32k fp32 logits is 128 KiB): max, then sum of exp (and the sum
// of the logits for label smoothing), then the gradient softmax - one-hot, written in place of
// the logits when asked (the fused path of the chunked linear cross-entropy, as in Liger Kernel's
// FusedLinearCrossEntropy). The backward alone recomputes softmax from the saved per-row
// (max, log-sum), as flash-attention's cross_entropy does from its lse. Softcap (Gemma 2):
// z = c tanh(a / c), dz/da = 1 - (z/c)^2.
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "../common/cross_entropy_args.h"
#include "vec.h"

namespace slmfast::cpu {
namespace {

// n < width: the first n lanes of v, the rest `fill` (the tail of a row never counts).
template <typename Vec>
inline Vec keep_first(const Vec& v, int64_t n, typename Vec::value_type fill) {
  return n == Vec::size() ? v : Vec::set(Vec(fill), v, n);
}

template <typename Acc>
inline Acc vsum(const at::vec::Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](const auto& a, const auto& b) { return a + b; }, v);
}

template <typename Acc>
inline Acc vmax(const at::vec::Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](const auto& a, const auto& b) { return at::vec::maximum(a, b); }, v);
}

// Subtract `hot` from lane (y - j) of v when y falls in the block [j, j + width).
template <typename Vec>
inline Vec sub_at(const Vec& v, int64_t j, int64_t y, typename Vec::value_type hot) {
  if (y < j || y >= j + Vec::size()) return v;
  typename Vec::value_type buf[Vec::size()];
  v.store(buf);
  buf[y - j] -= hot;
  return Vec::loadu(buf);
}

template <typename T>
void zero_row(T* dst, int64_t cols) {
  using Vec = AccVec<T>;
  for (int64_t j = 0; j < cols; j += Vec::size()) store_acc<T>(dst + j, Vec(0), std::min<int64_t>(Vec::size(), cols - j));
}

// ---- cross-entropy -----------------------------------------------------------------------

template <typename T>
void ce_row(const CrossEntropyParams& p, int64_t i) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.logits) + i * p.logits_row_stride;
  T* dx = p.dlogits != nullptr ? static_cast<T*>(p.dlogits) + i * p.dlogits_row_stride : nullptr;
  Acc* loss = static_cast<Acc*>(p.loss);
  Acc* stats = static_cast<Acc*>(p.stats) + 2 * i;  // (m, r)
  const int64_t y = p.target[i];
  if (y == p.ignore_index) {
    if (loss != nullptr) loss[i] = 0;
    if (!p.stats_is_input) stats[0] = stats[1] = 0;
    if (dx != nullptr) zero_row(dx, cols);
    return;
  }
  const bool capped = p.softcap > 0;
  const Acc cap = capped ? Acc(p.softcap) : Acc(1);
  const Acc inv_cap = Acc(1) / cap;
  auto zv = [&](const Vec& a) { return capped ? Vec(cap) * (a * Vec(inv_cap)).tanh() : a; };
  auto zs = [&](Acc a) { return capped ? cap * std::tanh(a * inv_cap) : a; };
  const Acc z_y = zs(to_acc(x[y]));  // read before the row is overwritten
  const Acc eps = Acc(p.label_smoothing);

  Acc m, r;
  if (p.stats_is_input) {
    m = stats[0], r = stats[1];
  } else {
    // max z = cap * tanh(max a / cap): the transform is increasing, so take the max of the raw row.
    Vec mv(-std::numeric_limits<Acc>::infinity());
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t n = std::min(kW, cols - j);
      mv = at::vec::maximum(mv, keep_first(load_acc<T>(x + j, n), n, -std::numeric_limits<Acc>::infinity()));
    }
    m = zs(vmax(mv));
    Vec sum_exp(0), sum_dz(0);
    for (int64_t j = 0; j < cols; j += kW) {
      const int64_t n = std::min(kW, cols - j);
      const Vec dz = zv(load_acc<T>(x + j, n)) - Vec(m);  // z - m <= 0
      sum_exp = sum_exp + keep_first(dz.exp(), n, Acc(0));
      if (eps > 0) sum_dz = sum_dz + keep_first(dz, n, Acc(0));
    }
    r = std::log(vsum(sum_exp));
    stats[0] = m, stats[1] = r;
    if (loss != nullptr) {
      // (1 - eps)(m - z_y) + eps (m - mean z) + r + z_loss lse^2, each part small and exact-ish.
      const Acc lse = m + r;
      const Acc smooth = eps > 0 ? -eps / Acc(cols) * vsum(sum_dz) : Acc(0);
      loss[i] = (Acc(1) - eps) * (m - z_y) + smooth + r + Acc(p.z_loss) * lse * lse;
    }
  }
  if (dx == nullptr) return;
  const Acc scale = static_cast<const Acc*>(p.grad_scale)[i * p.grad_scale_stride];
  const Vec p_factor(scale * (Acc(1) + Acc(2) * Acc(p.z_loss) * (m + r)));
  const Vec offset(scale * eps / Acc(cols));
  const Acc hot = scale * (Acc(1) - eps) * (capped ? Acc(1) - (z_y * inv_cap) * (z_y * inv_cap) : Acc(1));
  const Vec mv(m), rv(r);
  for (int64_t j = 0; j < cols; j += kW) {
    const int64_t n = std::min(kW, cols - j);
    const Vec z = zv(load_acc<T>(x + j, n));
    Vec d = ((z - mv) - rv).exp() * p_factor - offset;
    if (capped) {
      const Vec c = z * Vec(inv_cap);
      d = d * (Vec(1) - c * c);
    }
    store_acc<T>(dx + j, sub_at(d, j, y, hot), n);
  }
}

template <typename T>
void ce_kernel(const CrossEntropyParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) ce_row<T>(p, i);
  });
}

void run_ce(const CrossEntropyParams& p, at::ScalarType dtype) {
  if (p.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "slmfast_cross_entropy",
                                  [&] { ce_kernel<scalar_t>(p); });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double z_loss, double softcap) {
  CrossEntropyParams p{};
  auto out = cross_entropy_fwd_prepare("cross_entropy_fwd", logits, target, ignore_index, label_smoothing,
                                       z_loss, softcap, p);
  run_ce(p, logits.scalar_type());
  return out;
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
                                 double z_loss, double softcap) {
  CrossEntropyParams p{};
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());
  cross_entropy_bwd_prepare("cross_entropy_bwd", grad_loss, logits, target, stats, dlogits, ignore_index,
                            label_smoothing, z_loss, softcap, p);
  run_ce(p, logits.scalar_type());
  return dlogits;
}

void cross_entropy_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
                                   double z_loss, double softcap) {
  CrossEntropyParams p{};
  cross_entropy_bwd_prepare("cross_entropy_bwd_", grad_loss, logits, target, stats, logits, ignore_index,
                            label_smoothing, z_loss, softcap, p);
  run_ce(p, logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                             const at::Tensor& grad_scale, int64_t ignore_index,
                                                             double label_smoothing, double z_loss,
                                                             double softcap) {
  CrossEntropyParams p{};
  auto out = cross_entropy_fwd_bwd_prepare("cross_entropy_fwd_bwd_", logits, target, grad_scale, ignore_index,
                                           label_smoothing, z_loss, softcap, p);
  run_ce(p, logits.scalar_type());
  return out;
}

// ---- distillation ------------------------------------------------------------------------

enum Kind : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3 };
// Per row: max s, max t, log sum exp((s - max s) / T), log sum exp((t - max t) / T),
// log sum exp(s - max s), c, c2. Log-probabilities are formed as (x - max) / T - log sum, never as
// x / T - lse, which would lose the bits of a large lse (as log_softmax avoids). For tvd, c and c2
// are the student mass where Q > P and where Q < P: with sum Q = 1, a - sum(Q a) is c2 where Q > P,
// -c where Q < P and (c2 - c) / 2 at ties, without the cancellation of 1/2 - sum(Q a).
constexpr int64_t kStats = 7;

struct DistillParams {
  const void* student;   // (rows, cols), last dim contiguous
  void* dstudent;        // (rows, cols) or nullptr; may equal student
  const void* teacher;   // (rows, cols), same dtype
  const int64_t* target; // (rows,) or nullptr
  const void* grad_scale;
  void* loss;            // (rows,) or nullptr
  void* stats;           // (rows, kStats): written, or read when stats_is_input
  int64_t rows, cols;
  int64_t student_row_stride, dstudent_row_stride, teacher_row_stride, grad_scale_stride;
  int64_t ignore_index;
  double beta, temperature, hard_weight;
  bool stats_is_input;
};

template <typename T, int64_t K>
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
        term = pt * (lp - lq);
      } else if constexpr (K == kReverseKL) {
        term = q * (lq - lp);
        cterm = term;
      } else if constexpr (K == kJSD) {
        const Vec lm = log_mix(lp, lq);
        cterm = Vec(Acc(1) - beta) * q * (lq - lm);
        term = Vec(beta) * pt * (lp - lm) + cterm;
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
      gu = q * (lq - lp - Vec(c));
    } else if constexpr (K == kJSD) {
      gu = q * (Vec(Acc(1) - beta) * (lq - log_mix(lp, lq)) - Vec(c));
    } else {
      gu = tvd_grad(q, lp.exp(), c, c2);
    }
    Vec d = gu * soft_scale;
    if (hard) d = d + (ds_ - Vec(log_sh)).exp() * hard_scale;
    store_acc<T>(ds + j, hard ? sub_at(d, j, y, hot) : d, n);
  }
}

template <typename T, int64_t K>
void distill_kernel(const DistillParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) distill_row<T, K>(p, i);
  });
}

// The one dispatch point: (dtype, kind) -> template arguments.
void run_distill(const DistillParams& p, at::ScalarType dtype, int64_t kind) {
  if (p.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "slmfast_distill", [&] {
    switch (kind) {
      case kForwardKL: distill_kernel<scalar_t, kForwardKL>(p); break;
      case kReverseKL: distill_kernel<scalar_t, kReverseKL>(p); break;
      case kJSD: distill_kernel<scalar_t, kJSD>(p); break;
      default: distill_kernel<scalar_t, kTVD>(p); break;
    }
  });
}

void check_distill(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                   const std::optional<at::Tensor>& target, int64_t kind, double beta, double temperature,
                   double hard_weight, int64_t ignore_index) {
  SLM_CHECK_FLOATING(op, student);
  SLM_CHECK(op, student.dim() == 2 && student.size(1) > 0 && student.stride(1) == 1,
            "student must be 2-D (rows, vocabulary) with a contiguous last dimension, got sizes ",
            student.sizes(), " strides ", student.strides());
  SLM_CHECK_DEVICE(op, teacher, student.device());
  SLM_CHECK_DTYPE(op, teacher, student.scalar_type());
  SLM_CHECK(op, teacher.sizes() == student.sizes() && teacher.stride(1) == 1,
            "teacher must have the shape of student ", student.sizes(),
            " with a contiguous last dimension, got sizes ", teacher.sizes(), " strides ", teacher.strides());
  SLM_CHECK(op, kind >= kForwardKL && kind <= kTVD, "kind must be 0 (forward_kl), 1 (reverse_kl), 2 (jsd) "
            "or 3 (tvd), got ", kind);
  SLM_CHECK(op, kind != kJSD || (beta > 0.0 && beta < 1.0),
            "beta must be in (0, 1) for jsd (0 and 1 are forward_kl and reverse_kl), got ", beta);
  SLM_CHECK(op, temperature > 0.0, "temperature must be > 0, got ", temperature);
  SLM_CHECK(op, hard_weight >= 0.0, "hard_weight must be >= 0, got ", hard_weight);
  const bool has_target = target.has_value() && target->defined();
  SLM_CHECK(op, has_target || hard_weight == 0.0, "hard_weight > 0 needs a target");
  if (has_target) {
    check_ce_logits_target(op, student, *target);
    check_ce_target_range(op, *target, student.size(1), ignore_index);
  }
}

void fill_distill(DistillParams& p, const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& target, double beta, double temperature, double hard_weight,
                  int64_t ignore_index) {
  p.student = student.data_ptr();
  p.teacher = teacher.data_ptr();
  p.target = target.has_value() && target->defined() ? target->data_ptr<int64_t>() : nullptr;
  p.rows = student.size(0);
  p.cols = student.size(1);
  p.student_row_stride = student.stride(0);
  p.teacher_row_stride = teacher.stride(0);
  p.ignore_index = ignore_index;
  p.beta = beta;
  p.temperature = temperature;
  p.hard_weight = hard_weight;
}

std::tuple<at::Tensor, at::Tensor> distill_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target, int64_t kind,
                                                   double beta, double temperature, double hard_weight,
                                                   int64_t ignore_index) {
  check_distill("distill_fwd", student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  const auto acc = student.options().dtype(acc_dtype(student.scalar_type()));
  at::Tensor loss = at::empty({student.size(0)}, acc);
  at::Tensor stats = at::empty({student.size(0), kStats}, acc);
  DistillParams p{};
  fill_distill(p, student, teacher, target, beta, temperature, hard_weight, ignore_index);
  p.loss = loss.data_ptr();
  p.stats = stats.data_ptr();
  run_distill(p, student.scalar_type(), kind);
  return {loss, stats};
}

at::Tensor distill_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& target, const at::Tensor& stats, int64_t kind,
                           double beta, double temperature, double hard_weight, int64_t ignore_index) {
  const char* op = "distill_bwd";
  check_distill(op, student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  check_ce_row_vector(op, "grad_loss", grad_loss, student, /*allow_one=*/true);
  SLM_CHECK(op, stats.scalar_type() == acc_dtype(student.scalar_type()) && stats.is_contiguous() &&
                stats.sizes() == at::IntArrayRef({student.size(0), kStats}) && stats.device() == student.device(),
            "stats must be the contiguous (", student.size(0), ", ", kStats, ") ", acc_dtype(student.scalar_type()),
            " tensor from distill_fwd, got sizes ", stats.sizes(), " dtype ", stats.scalar_type());
  at::Tensor dstudent = at::empty(student.sizes(), student.options());
  DistillParams p{};
  fill_distill(p, student, teacher, target, beta, temperature, hard_weight, ignore_index);
  p.stats = stats.data_ptr();
  p.stats_is_input = true;
  p.dstudent = dstudent.data_ptr();
  p.dstudent_row_stride = dstudent.stride(0);
  p.grad_scale = grad_loss.data_ptr();
  p.grad_scale_stride = grad_loss.numel() == 1 && student.size(0) != 1 ? 0 : 1;
  run_distill(p, student.scalar_type(), kind);
  return dstudent;
}

at::Tensor distill_fwd_bwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& target, const at::Tensor& grad_scale, int64_t kind,
                               double beta, double temperature, double hard_weight, int64_t ignore_index) {
  const char* op = "distill_fwd_bwd_";
  check_distill(op, student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  check_ce_row_vector(op, "grad_scale", grad_scale, student, /*allow_one=*/true);
  const auto acc = student.options().dtype(acc_dtype(student.scalar_type()));
  at::Tensor loss = at::empty({student.size(0)}, acc);
  at::Tensor stats = at::empty({student.size(0), kStats}, acc);
  DistillParams p{};
  fill_distill(p, student, teacher, target, beta, temperature, hard_weight, ignore_index);
  p.loss = loss.data_ptr();
  p.stats = stats.data_ptr();
  p.dstudent = student.data_ptr();
  p.dstudent_row_stride = student.stride(0);
  p.grad_scale = grad_scale.data_ptr();
  p.grad_scale_stride = grad_scale.numel() == 1 && student.size(0) != 1 ? 0 : 1;
  run_distill(p, student.scalar_type(), kind);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_inplace_cpu);
  m.impl("cross_entropy_fwd_bwd_", &cross_entropy_fwd_bwd_cpu);
  m.impl("distill_fwd", &distill_fwd_cpu);
  m.impl("distill_bwd", &distill_bwd_cpu);
  m.impl("distill_fwd_bwd_", &distill_fwd_bwd_cpu);
}

}  // namespace slmfast::cpu
