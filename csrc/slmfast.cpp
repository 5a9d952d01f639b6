// slmfast.cpp — the extension module slmfast._C.
//
// Two things live here and nowhere else:
//  * TORCH_LIBRARY(slmfast, m): the schema of every C++ op, defined once. Kernels register
//    against these names from csrc/cpu/<op>.cpp (CPU) and csrc/cuda/bindings.cpp (CUDA); the
//    fake (meta) functions and autograd formulas are registered from Python in
//    slmfast/ops/<op>.py, as in PyTorch's "custom C++ and CUDA operators" tutorial.
//  * PYBIND11_MODULE(_C, m): build_info(), what this binary was compiled with. This is the only
//    file that includes <torch/extension.h> (pybind11), because that header alone takes ~30 s
//    to compile (DESIGN.md §5).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

// setup.py passes these as bare tokens (quotes do not survive the ninja command line).
#define SLMFAST_STR(...) #__VA_ARGS__
#define SLMFAST_XSTR(...) SLMFAST_STR(__VA_ARGS__)
#ifndef SLMFAST_VERSION
#define SLMFAST_VERSION unknown
#endif
#ifndef SLMFAST_CPU_CAPABILITY_NAME
#define SLMFAST_CPU_CAPABILITY_NAME DEFAULT
#endif
#ifndef SLMFAST_CUDA_ARCHS
#define SLMFAST_CUDA_ARCHS
#endif

TORCH_LIBRARY(slmfast, m) {
  // rms_norm (slmfast/ops/rms_norm.py): h = x + residual, y = h * rstd * (offset + weight).
  // h is an empty tensor when residual is None; rstd has x's leading shape.
  m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor? residual, float eps, float offset)"
        " -> (Tensor y, Tensor h, Tensor rstd)");
  // Gradients from the saved residual stream h (or x) and rstd; dh is the gradient of the h output.
  m.def("rms_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor rstd, float offset)"
        " -> (Tensor dx, Tensor dweight)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = SLMFAST_XSTR(SLMFAST_VERSION);
#if defined(SLMFAST_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(SLMFAST_XSTR(SLMFAST_CUDA_ARCHS));
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_capability"] = SLMFAST_XSTR(SLMFAST_CPU_CAPABILITY_NAME);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  info["compiler"] = "unknown";
#endif
  info["torch"] = TORCH_VERSION;  // from torch/version.h
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "slmfast C++/CUDA kernels; ops are registered under torch.ops.slmfast";
  m.def("build_info", &build_info,
        "What this extension was compiled with: CUDA archs, OpenMP, CPU vector ISA, compiler, torch.");
}
