"""Build script for slmfast's extension module slmfast._C.

Always builds the C++ CPU kernels (csrc/slmfast.cpp, csrc/cpu/*.cpp), with OpenMP when the
compiler has it (at::parallel_for is OpenMP-based and runs serially without it) and with the
widest at::vec ISA this CPU supports. Builds the CUDA kernels (csrc/cuda/*.cu and
csrc/cuda/bindings.cpp) only when torch has CUDA and nvcc is found.

Environment:
  SLMFAST_BUILD_CUDA=0|1|auto   CUDA part: never, always (error if impossible), when possible (default)
  TORCH_CUDA_ARCH_LIST          overrides the default archs (sm_80 and sm_90a)
  SLMFAST_CPU_CAPABILITY=auto|avx512|avx2|default   at::vec ISA for the CPU kernels (default auto)
  MAX_JOBS                      parallel compile jobs (torch's BuildExtension reads it)
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")  # relative: setuptools refuses absolute source paths
DEFAULT_CUDA_GENCODES = (("80", "sm_80"), ("90a", "sm_90a"))
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def read_version() -> str:
    text = (ROOT / "slmfast" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def compiler_accepts(flags: list[str]) -> bool:
    """Whether the C++ compiler builds a trivial OpenMP/ISA test program with these flags."""
    cxx = os.environ.get("CXX", "c++")
    src = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.cpp"
        path.write_text(src if "-fopenmp" in flags else "int main() { return 0; }\n")
        result = subprocess.run([cxx, *flags, str(path), "-o", str(Path(tmp) / "probe")],
                                capture_output=True)
        return result.returncode == 0


def cpu_capability() -> tuple[str, list[str]]:
    """The at::vec ISA to compile for: (name, compiler flags and CPU_CAPABILITY defines)."""
    requested = os.environ.get("SLMFAST_CPU_CAPABILITY", "auto").lower()
    if requested not in ("auto", "avx512", "avx2", "default"):
        sys.exit(f"SLMFAST_CPU_CAPABILITY must be auto, avx512, avx2 or default, got {requested!r}")
    if requested == "auto":
        requested = "default"
        if platform.machine() in ("x86_64", "AMD64") and Path("/proc/cpuinfo").exists():
            flags = set()
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
                requested = "avx512"
            elif {"avx2", "fma"} <= flags:
                requested = "avx2"
    if requested == "avx512" and compiler_accepts(AVX512_FLAGS):
        return "AVX512", AVX512_FLAGS + ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if requested in ("avx512", "avx2") and compiler_accepts(AVX2_FLAGS):
        return "AVX2", AVX2_FLAGS + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def want_cuda(torch_module, cuda_home) -> tuple[bool, str]:
    mode = os.environ.get("SLMFAST_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"SLMFAST_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    reasons = []
    if torch_module.version.cuda is None:
        reasons.append(f"torch {torch_module.__version__} is built without CUDA")
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not nvcc.exists():
        reasons.append("nvcc not found (set CUDA_HOME)")
    if mode == "0":
        return False, "SLMFAST_BUILD_CUDA=0"
    if reasons:
        if mode == "1":
            sys.exit("SLMFAST_BUILD_CUDA=1 but the CUDA part cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, ""


def cuda_arch_flags() -> tuple[list[str], str]:
    """-gencode flags and the arch list reported by build_info()."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch's BuildExtension turns TORCH_CUDA_ARCH_LIST into -gencode flags itself.
        return [], ",".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split())
    flags = []
    for compute, sm in DEFAULT_CUDA_GENCODES:
        flags += ["-gencode", f"arch=compute_{compute},code={sm}"]
    return flags, ",".join(sm for _, sm in DEFAULT_CUDA_GENCODES)


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    version = read_version()
    cap_name, cap_flags = cpu_capability()
    openmp = ["-fopenmp"] if compiler_accepts(["-fopenmp"]) else []
    build_cuda, why_not = want_cuda(torch, CUDA_HOME)
    if not build_cuda:
        print(f"slmfast: building without the CUDA part ({why_not})")

    sources = [str(CSRC / "slmfast.cpp")] + sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
    # Bare tokens, stringified in csrc/slmfast.cpp: quotes do not survive the ninja command line.
    defines = [f"-DSLMFAST_VERSION={version}", f"-DSLMFAST_CPU_CAPABILITY_NAME={cap_name}"]
    cxx_flags = ["-O3", "-std=c++17", "-Wno-unknown-pragmas", *openmp, *cap_flags, *defines]
    link_flags = [*openmp]
    if not build_cuda:
        return [CppExtension("slmfast._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)]

    gencode, arch_names = cuda_arch_flags()
    sources += [str(CSRC / "cuda" / "bindings.cpp")]
    sources += sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
    cuda_define = ["-DSLMFAST_WITH_CUDA", f"-DSLMFAST_CUDA_ARCHS={arch_names}"]
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *gencode,
                  *cuda_define, *defines]
    return [CUDAExtension("slmfast._C", sources,
                          extra_compile_args={"cxx": cxx_flags + cuda_define, "nvcc": nvcc_flags},
                          extra_link_args=link_flags)]


def main():
    import sysconfig

    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """torch's BuildExtension with one object directory, build/temp.<platform>-<python>, for
        every way in: `pip install -e .` builds in a temporary directory otherwise, and the
        `setup.py build_ext --inplace` that follows (make build) would compile everything again."""

        def finalize_options(self):
            super().finalize_options()
            tag = f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = str(ROOT / "build" / tag)

    os.chdir(ROOT)
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)},
    )


if __name__ == "__main__":
    main()
