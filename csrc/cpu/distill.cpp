// distill.cpp — the CPU ops slmfast::distill_fwd / distill_bwd / distill_fwd_bwd_ (schemas in
// csrc/slmfast.cpp, contract in slmfast/ops/distill_loss.py): check the arguments, allocate the
// outputs and fill DistillParams (csrc/common/params.h), then run the vectorized kernel of the
// chosen capability (csrc/cpu/kernels/distill.cpp, where the math is, through kernel_table.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../common/cross_entropy_args.h"
#include "kernel_table.h"

namespace slmfast::cpu {
namespace {

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
  SLM_CHECK(op, kind >= 0 && kind <= 3, "kind must be 0 (forward_kl), 1 (reverse_kl), 2 (jsd) "
            "or 3 (tvd), got ", kind);
  SLM_CHECK(op, kind != static_cast<int64_t>(DistillKind::kJSD) || (beta > 0.0 && beta < 1.0),
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
                  const std::optional<at::Tensor>& target, int64_t kind, double beta, double temperature,
                  double hard_weight, int64_t ignore_index) {
  p.kind = static_cast<DistillKind>(kind);
  p.dtype = to_dtype(student.scalar_type());
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

// The forward's outputs, loss (rows,) and stats (rows, kDistillStats) in the accumulation dtype,
// with p pointing at them.
std::tuple<at::Tensor, at::Tensor> distill_fwd_outputs(const at::Tensor& student, DistillParams& p) {
  const auto acc = student.options().dtype(acc_dtype(student.scalar_type()));
  at::Tensor loss = at::empty({student.size(0)}, acc);
  at::Tensor stats = at::empty({student.size(0), kDistillStats}, acc);
  p.loss = loss.data_ptr();
  p.stats = stats.data_ptr();
  return {loss, stats};
}

// The backward's gradient output dstudent (written in place of student by distill_fwd_bwd_) and
// its scale grad_scale: (rows,) or one value for every row.
void set_distill_grad(DistillParams& p, const at::Tensor& dstudent, const at::Tensor& grad_scale) {
  p.dstudent = dstudent.data_ptr();
  p.dstudent_row_stride = dstudent.stride(0);
  p.grad_scale = grad_scale.data_ptr();
  p.grad_scale_stride = grad_scale.numel() == 1 && dstudent.size(0) != 1 ? 0 : 1;
}

std::tuple<at::Tensor, at::Tensor> distill_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target, int64_t kind,
                                                   double beta, double temperature, double hard_weight,
                                                   int64_t ignore_index) {
  check_distill("distill_fwd", student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  DistillParams p{};
  fill_distill(p, student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  auto outputs = distill_fwd_outputs(student, p);
  if (p.rows > 0) kernels().distill(p);
  return outputs;
}

at::Tensor distill_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& target, const at::Tensor& stats, int64_t kind,
                           double beta, double temperature, double hard_weight, int64_t ignore_index) {
  const char* op = "distill_bwd";
  check_distill(op, student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  check_ce_row_vector(op, "grad_loss", grad_loss, student, /*allow_one=*/true);
  SLM_CHECK(op, stats.scalar_type() == acc_dtype(student.scalar_type()) && stats.is_contiguous() &&
                stats.sizes() == at::IntArrayRef({student.size(0), kDistillStats}) && stats.device() == student.device(),
            "stats must be the contiguous (", student.size(0), ", ", kDistillStats, ") ", acc_dtype(student.scalar_type()),
            " tensor from distill_fwd, got sizes ", stats.sizes(), " dtype ", stats.scalar_type());
  at::Tensor dstudent = at::empty(student.sizes(), student.options());
  DistillParams p{};
  fill_distill(p, student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  p.stats = stats.data_ptr();
  p.stats_is_input = true;
  set_distill_grad(p, dstudent, grad_loss);
  if (p.rows > 0) kernels().distill(p);
  return dstudent;
}

at::Tensor distill_fwd_bwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& target, const at::Tensor& grad_scale, int64_t kind,
                               double beta, double temperature, double hard_weight, int64_t ignore_index) {
  const char* op = "distill_fwd_bwd_";
  check_distill(op, student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  check_ce_row_vector(op, "grad_scale", grad_scale, student, /*allow_one=*/true);
  DistillParams p{};
  fill_distill(p, student, teacher, target, kind, beta, temperature, hard_weight, ignore_index);
  auto [loss, stats] = distill_fwd_outputs(student, p);  // stats: scratch for the kernel
  set_distill_grad(p, student, grad_scale);
  if (p.rows > 0) kernels().distill(p);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("distill_fwd", &distill_fwd_cpu);
  m.impl("distill_bwd", &distill_bwd_cpu);
  m.impl("distill_fwd_bwd_", &distill_fwd_bwd_cpu);
}

}  // namespace slmfast::cpu
