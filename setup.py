"""Build script for slmfast's extension module slmfast._C.

Always builds the C++ CPU part, with OpenMP when the compiler has it (at::parallel_for is
OpenMP-based and runs serially without it):
  * csrc/slmfast.cpp and csrc/cpu/*.cpp (schemas, argument checks, dispatch) for the baseline ISA
    of the target only (no -m flags), so that the extension imports and runs on any machine of
    its architecture, whatever machine built it;
  * csrc/cpu/kernels/*.cpp (the vectorized kernels) once per CPU capability: DEFAULT (baseline),
    and on x86-64 also AVX2 (-mavx2 -mfma -mf16c) and AVX512 (-mavx512f/bw/vl/dq), each copy with
    -DCPU_CAPABILITY=<name> in its own namespace. The extension picks the best copy the CPU
    supports at run time (csrc/cpu/capability.h; SLMFAST_CPU_CAPABILITY caps it).
  Link order puts the baseline objects first: where the copies share an inline function from a
  header (ATen, c10, the standard library), the linker keeps the first definition it meets, which
  is then the baseline one. tools/isa_check.py verifies the built library.
Builds the CUDA kernels (csrc/cuda/*.cu and csrc/cuda/bindings.cpp) only when torch has CUDA and
nvcc is found.

The C++ compiler must link libstdc++ as a shared library: a C++ exception (every argument check)
thrown by an extension that carries its own static copy of libstdc++ crashes the process instead
of reaching Python (seen on a GPU image whose /opt/gcc g++ always links libstdc++ statically: the
process died with SIGSEGV, while the system g++ built the same extension right). So the build
first links a tiny shared library with $CXX (c++ by default) and, when it does not depend on
libstdc++.so, switches CXX and CC (nvcc's host compiler too) to the first g++/c++ on the PATH
that does, with a message; when none does, it stops with an error that says so.

Environment:
  SLMFAST_BUILD_CUDA=0|1|auto   CUDA part: never, always (error if impossible), when possible (default)
  TORCH_CUDA_ARCH_LIST          overrides the default archs (sm_80 and sm_90a)
  SLMFAST_CPU_CAPABILITIES      comma-separated subset of default,avx2,avx512 to compile (default:
                                every one the compiler accepts; default is always compiled)
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
# The compiler flags of each CPU capability's copy of csrc/cpu/kernels/ (x86-64), matching what
# csrc/cpu/capability.cpp checks with cpuid before it runs a copy (and ATen's own AVX2/AVX512).
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
KERNELS = CSRC / "cpu" / "kernels"


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


def needed_libraries(shared_object: Path) -> list[str] | None:
    """The DT_NEEDED entries of a shared object (objdump -p), or None without binutils."""
    tool = shutil.which("objdump")
    if tool is None:
        return None
    out = subprocess.run([tool, "-p", str(shared_object)], capture_output=True, text=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("NEEDED")]


def links_libstdcxx_shared(cxx: str) -> bool | None:
    """Whether `cxx` links a shared library that uses the C++ runtime against libstdc++.so (or
    libc++.so); None when that cannot be told (no binutils, or the compiler fails)."""
    src = ("#include <stdexcept>\n#include <string>\n"
           "void slmfast_probe(const std::string& s) { throw std::runtime_error(s); }\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.cpp"
        path.write_text(src)
        lib = Path(tmp) / "probe.so"
        result = subprocess.run([*cxx.split(), "-shared", "-fPIC", str(path), "-o", str(lib)],
                                capture_output=True)
        if result.returncode != 0:
            return None
        needed = needed_libraries(lib)
    if needed is None:
        return None
    return any(name.startswith(("libstdc++.so", "libc++.so")) for name in needed)


def use_a_compiler_with_shared_libstdcxx() -> None:
    """Make CXX/CC name a compiler that links libstdc++ dynamically (see the module docstring)."""
    if sys.platform != "linux":
        return
    current = os.environ.get("CXX", "c++")
    if links_libstdcxx_shared(current) is not False:
        return
    seen = {os.path.realpath(shutil.which(current.split()[0]) or current)}
    for name in ("g++", "c++", "clang++"):
        for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
            candidate = Path(directory) / name
            if not candidate.exists() or os.path.realpath(candidate) in seen:
                continue
            seen.add(os.path.realpath(candidate))
            if links_libstdcxx_shared(str(candidate)):
                c_name = {"g++": "gcc", "c++": "cc", "clang++": "clang"}[name]
                os.environ["CXX"] = str(candidate)
                os.environ["CC"] = str(candidate.with_name(c_name))
                print(f"slmfast: {current} links libstdc++ statically into shared libraries, so C++ "
                      f"exceptions from slmfast._C would crash the process; building with "
                      f"CXX={os.environ['CXX']} CC={os.environ['CC']} instead")
                return
    sys.exit(f"slmfast: {current} links libstdc++ statically into shared libraries (C++ exceptions from "
             "slmfast._C would crash the process) and no other g++/c++ on the PATH links it as a shared "
             "library; set CXX (and CC) to one that does")


def cpu_capabilities() -> list[str]:
    """The CPU capabilities to compile csrc/cpu/kernels/ for, DEFAULT first."""
    requested = os.environ.get("SLMFAST_CPU_CAPABILITIES", "default,avx2,avx512")
    names = [n.strip().upper() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in CPU_CAPABILITY_FLAGS]
    if unknown:
        sys.exit(f"SLMFAST_CPU_CAPABILITIES takes default, avx2, avx512; got {', '.join(unknown)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["DEFAULT"]  # at::vec's DEFAULT path (NEON on aarch64 builds of torch) only
    wanted = ["DEFAULT"] + [n for n in ("AVX2", "AVX512") if n in names]
    return [n for n in wanted if n == "DEFAULT" or compiler_accepts(CPU_CAPABILITY_FLAGS[n])]


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

    use_a_compiler_with_shared_libstdcxx()  # before anything reads CXX/CC
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    version = read_version()
    openmp = ["-fopenmp"] if compiler_accepts(["-fopenmp"]) else []
    build_cuda, why_not = want_cuda(torch, CUDA_HOME)
    if not build_cuda:
        print(f"slmfast: building without the CUDA part ({why_not})")

    sources = [str(CSRC / "slmfast.cpp")] + sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
    # Bare tokens, stringified in csrc/slmfast.cpp: quotes do not survive the ninja command line.
    defines = [f"-DSLMFAST_VERSION={version}"]
    cxx_flags = ["-O3", "-std=c++17", "-Wno-unknown-pragmas", *openmp, *defines]
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
        """torch's BuildExtension with
        * one object directory, build/temp.<platform>-<python>, for every way in: `pip install -e .`
          builds in a temporary directory otherwise, and the `setup.py build_ext --inplace` that
          follows (make build) would compile everything again;
        * the kernels of csrc/cpu/kernels/ compiled once per CPU capability, each into its own
          object folder (build/temp.../<CAPABILITY>/), with the extension's flags plus the
          capability's, and linked after the baseline objects (see the module docstring)."""

        def finalize_options(self):
            super().finalize_options()
            tag = f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = str(ROOT / "build" / tag)

        def build_extension(self, ext):
            kernel_sources = sorted(str(p) for p in KERNELS.glob("*.cpp"))
            flags = ext.extra_compile_args
            common = list(flags["cxx"] if isinstance(flags, dict) else flags)
            objects = []
            for name in cpu_capabilities():
                isa = CPU_CAPABILITY_FLAGS[name] + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"]
                objects += self.compiler.compile(
                    kernel_sources, output_dir=str(Path(self.build_temp) / name), macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": common + isa, "nvcc": []})
            ext.extra_objects = objects + [o for o in ext.extra_objects if o not in objects]
            super().build_extension(ext)

    os.chdir(ROOT)
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)},
    )


if __name__ == "__main__":
    main()
