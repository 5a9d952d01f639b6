"""Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a and print the ptxas report.

This is `make cuda-check`: on machines without a GPU (and without a CUDA build of torch) it is
how the CUDA kernels are kept compiling (docs/architecture.md §4.3). The .cu files include only CUDA
headers and csrc/common/*.h, so no torch headers are needed. The flags match what torch's
BuildExtension passes to nvcc in setup.py (the __CUDA_NO_HALF_* defines included).

Prints one row per kernel and arch: registers, spill bytes, shared memory. Exits non-zero when
a file fails to compile; with --no-spills, also when a kernel spills. Without nvcc it says so
and exits 0 (nothing to check), unless --require is given.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (("80", "sm_80"), ("90a", "sm_90a"))
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def parse_ptxas(text: str) -> list[dict]:
    """ptxas -v output -> one dict per compiled function."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return rows


def short(name: str, width: int = 110) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-spills", action="store_true", help="fail when a kernel spills registers")
    parser.add_argument("--require", action="store_true", help="fail when nvcc is absent")
    args = parser.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda-check: nvcc not found (set NVCC or CUDA_HOME); nothing compiled")
        return 1 if args.require else 0
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        print("cuda-check: no csrc/cuda/*.cu files")
        return 1
    failed, all_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
                   "-Xptxas", "-v", "-c", str(src), "-o", str(Path(tmp) / (src.stem + ".o")),
                   "-DSLMFAST_WITH_CUDA", *TORCH_NVCC_DEFINES]
            for compute, sm in ARCHS:
                cmd += ["-gencode", f"arch=compute_{compute},code={sm}"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                failed.append(src.name)
                print(f"cuda-check: {src.relative_to(ROOT)} FAILED to compile:\n{result.stderr}")
                continue
            rows = parse_ptxas(result.stderr)
            for row in rows:
                row["file"] = src.name
            all_rows += rows
            print(f"cuda-check: {src.relative_to(ROOT)} compiled ({len(rows)} kernels)")

    names = demangle([r["kernel"] for r in all_rows])
    print(f"\n{'file':<22} {'arch':<7} {'regs':>5} {'spill':>6} {'smem':>6}  kernel")
    for row, name in zip(all_rows, names):
        print(f"{row['file']:<22} {row['arch']:<7} {row['registers'] or 0:>5} {row['spill']:>6} "
              f"{row['smem']:>6}  {short(name)}")
    spilling = [r for r in all_rows if r["spill"] > 0]
    print(f"\ncuda-check: {len(sources) - len(failed)}/{len(sources)} files compiled, "
          f"{len(all_rows)} kernel instantiations, {len(spilling)} with spills")
    if failed:
        return 1
    if args.no_spills and spilling:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
