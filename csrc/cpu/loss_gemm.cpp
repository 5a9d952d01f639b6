// loss_gemm.cpp — the LM head's gradient of one chunk of the chunked losses on the CPU,
// grad_W^T += hidden^T @ dlogits, with bf16/fp16 operands and a float32 accumulator.
//
// The chunk loops of slmfast/ops/_loss_chunks.py sum the LM head's gradient over chunks of
// tokens. With bf16 weights torch.mm can only return bf16, so a float32 sum would need a bf16
// product per chunk and an add of the whole (V, H) matrix into the accumulator: ~10 bytes of
// memory traffic per element of W per chunk, which at V = 32768, H = 1024 and 32 chunks cost more
// time than the GEMMs. Here the product accumulates straight into a float32 buffer through
// ATen's batch-reduce GEMM, at::native::cpublas::brgemm (oneDNN's ukernel, AMX tiles for bf16).
// The accumulator is kept transposed, (H, V), so that both operands are cheap to lay out:
//   acc_t (H, V) += A (H, K) B (K, V),   A = hidden^T (a small transpose), B = dlogits
// with B in the VNNI layout brgemm reads for 16-bit types, pairs of K rows interleaved:
//   Bv[k / 2][n][k % 2] = B[k][v0 + n] for a block of kNB columns (K padded to even with zeros)
// Blocks of kNB columns of V run in parallel (at::parallel_for); each thread packs its block of
// dlogits (reading whole rows, writing contiguously) and runs one brgemm per kMB rows of H. The
// caller transposes acc_t once at the end. Without the VNNI ukernel (cpublas::could_pack false:
// no AVX512-BF16/AMX) or for fp32/fp64 it falls back to at::mm / addmm_.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/checks.h"

namespace slmfast::cpu {
namespace {

constexpr int64_t kMB = 128;  // rows of H per brgemm call
constexpr int64_t kNB = 64;   // columns of V per task

template <typename T>
void acc_nn_brgemm(float* acc, int64_t ld_acc, const T* hidden, const T* dlogits, int64_t K, int64_t V,
                   int64_t H) {
  const int64_t Kp = K + (K & 1);
  // A = hidden^T, (H, Kp) row-major, zero column Kp - 1 when K is odd.
  std::vector<T> a(static_cast<size_t>(H) * Kp, T(0));
  at::parallel_for(0, H, 64, [&](int64_t h0, int64_t h1) {
    for (int64_t k = 0; k < K; ++k) {
      const T* src = hidden + k * H;
      for (int64_t h = h0; h < h1; ++h) a[h * Kp + k] = src[h];
    }
  });
  const int64_t nblocks = (V + kNB - 1) / kNB;
  at::parallel_for(0, nblocks, 1, [&](int64_t nb0, int64_t nb1) {
    std::vector<T> bv(static_cast<size_t>(Kp) * kNB);
    std::vector<float> c_buf(static_cast<size_t>(kMB) * kNB);
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t v0 = nb * kNB, width = std::min(kNB, V - v0);
      if (width < kNB || (K & 1)) std::memset(static_cast<void*>(bv.data()), 0, sizeof(T) * Kp * kNB);
      for (int64_t k = 0; k < K; ++k) {
        const T* src = dlogits + k * V + v0;
        T* dst = bv.data() + (k / 2) * kNB * 2 + (k % 2);
        for (int64_t n = 0; n < width; ++n) dst[2 * n] = src[n];
      }
      for (int64_t h0 = 0; h0 < H; h0 += kMB) {
        const int64_t rows = std::min(kMB, H - h0);
        float* c = acc + h0 * ld_acc + v0;
        if (width == kNB) {
          at::native::cpublas::brgemm(rows, kNB, Kp, Kp, kNB, ld_acc, /*add_C=*/true, a.data() + h0 * Kp,
                                      bv.data(), c, /*is_vnni=*/true);
        } else {  // ragged last block: through a full-width scratch tile
          for (int64_t r = 0; r < rows; ++r) std::memcpy(c_buf.data() + r * kNB, c + r * ld_acc, sizeof(float) * width);
          at::native::cpublas::brgemm(rows, kNB, Kp, Kp, kNB, kNB, true, a.data() + h0 * Kp, bv.data(),
                                      c_buf.data(), true);
          for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ld_acc, c_buf.data() + r * kNB, sizeof(float) * width);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// acc_t (H, V) += hidden (K, H)^T @ dlogits (K, V); acc_t float32 for bf16/fp16 operands (else
// their dtype), its rows may be longer than V (a column slice of a wider accumulator).
void loss_grad_weight_acc_cpu(const at::Tensor& acc_t, const at::Tensor& dlogits, const at::Tensor& hidden) {
  const char* op = "loss_grad_weight_acc_";
  SLM_CHECK_FLOATING(op, dlogits);
  SLM_CHECK(op, dlogits.dim() == 2 && hidden.dim() == 2 && acc_t.dim() == 2,
            "acc_t (H, V), dlogits (K, V) and hidden (K, H) must be 2-D, got ", acc_t.sizes(), ", ",
            dlogits.sizes(), ", ", hidden.sizes());
  SLM_CHECK_DTYPE(op, hidden, dlogits.scalar_type());
  SLM_CHECK_CONTIGUOUS(op, dlogits);
  SLM_CHECK_CONTIGUOUS(op, hidden);
  const int64_t K = dlogits.size(0), V = dlogits.size(1), H = hidden.size(1);
  SLM_CHECK(op, hidden.size(0) == K, "hidden must have ", K, " rows like dlogits, got ", hidden.sizes());
  SLM_CHECK(op, acc_t.size(0) == H && acc_t.size(1) == V && acc_t.stride(1) == 1 && acc_t.stride(0) >= V,
            "acc_t must be (", H, ", ", V, ") with a contiguous last dimension, got sizes ", acc_t.sizes(),
            " strides ", acc_t.strides());
  const auto st = dlogits.scalar_type();
  const bool reduced = st == at::kBFloat16 || st == at::kHalf;
  SLM_CHECK(op, acc_t.scalar_type() == (reduced ? at::kFloat : st), "acc_t must have dtype ",
            reduced ? at::kFloat : st, ", got ", acc_t.scalar_type());
  if (K == 0 || V == 0 || H == 0) return;
  at::Tensor out = acc_t;  // written in place (schema: Tensor(a!) acc_t)
  if (!reduced) {
    out.addmm_(hidden.t(), dlogits);
  } else if (!at::native::cpublas::could_pack(st)) {
    out.add_(at::mm(hidden.t(), dlogits));
  } else if (st == at::kBFloat16) {
    acc_nn_brgemm(out.data_ptr<float>(), out.stride(0), hidden.data_ptr<at::BFloat16>(),
                  dlogits.data_ptr<at::BFloat16>(), K, V, H);
  } else {
    acc_nn_brgemm(out.data_ptr<float>(), out.stride(0), hidden.data_ptr<at::Half>(), dlogits.data_ptr<at::Half>(),
                  K, V, H);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) { m.impl("loss_grad_weight_acc_", &loss_grad_weight_acc_cpu); }

}  // namespace slmfast::cpu
