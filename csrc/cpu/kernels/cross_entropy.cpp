// kernels/cross_entropy.cpp — the vectorized kernel of the CPU fused row-wise softmax cross-entropy:
// loss, log-sum-exp and the gradient of one row of logits at a time, never a softmax tensor.
// Compiled once per capability (csrc/cpu/capability.h); the ops are csrc/cpu/cross_entropy.cpp.
//
// Cross-entropy (the math is in csrc/common/params.h, CrossEntropyParams): a row is read three
// times, all from cache (a row of 32k fp32 logits is 128 KiB): max, then sum of exp (and the sum
// of the logits for label smoothing), then the gradient softmax - one-hot, written in place of
// the logits when asked (the fused path of the chunked linear cross-entropy, as in Liger Kernel's
// FusedLinearCrossEntropy). The backward alone recomputes softmax from the saved per-row
// (max, log-sum), as flash-attention's cross_entropy does from its lse. Softcap (Gemma 2):
// z = c tanh(a / c), dz/da = 1 - (z/c)^2.
//
// Rows run in parallel with at::parallel_for; each pass is at::vec over the row, accumulating in
// at::opmath_type (fp32 for bf16/fp16, fp64 for fp64). Deterministic: no cross-row reductions.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "loss_rows.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {
namespace {

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

void cross_entropy(const CrossEntropyParams& p) {
  if (p.rows == 0) return;
  visit_dtype(p.dtype, [&](auto t) { ce_kernel<decltype(t)>(p); });
}

}  // namespace

SLMFAST_REGISTER_CPU_KERNEL(cross_entropy, cross_entropy);

}  // namespace slmfast::cpu::CPU_CAPABILITY
