"""Which compiler and link flags let a C++ exception from a torch extension reach Python.

On the GPU image a C++ exception thrown by slmfast._C (an argument check) aborted the process
instead of arriving as a RuntimeError; _C built there with /opt/gcc's g++ showed no libstdc++
among its needed libraries (libstdc++ and perhaps libgcc linked statically). GCC's manual says a
library that throws exceptions across shared objects must use the shared libgcc (-shared-libgcc);
a second copy of the unwinder or of libstdc++'s exception state inside the extension is the
usual cause of such an abort.

This builds one tiny extension, two ops registered with TORCH_LIBRARY whose kernels fail a
TORCH_CHECK (one of them inside at::parallel_for), once per C++ compiler found, and links it with
several flag sets; each build is loaded in a fresh process that calls the ops and reports whether
RuntimeErrors arrived, or the
signal that ended the process. It also lists what each build needs (readelf -d) and which
compiler torch's cpp_extension would use. The first flag set that works with the default
compiler is the fix to try for slmfast._C (LDFLAGS for `setup.py build_ext`: only the link step
changes, the objects are kept).

    python tools/abort_probe.py [--json results.json] [--recommend-file PATH]

--json merges {"abort_probe": {...}} into that file; --recommend-file writes the LDFLAGS of the
first working variant (empty when the default link already works or none works).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROBE_SOURCE = r"""
// Kernels that fail a check, as slmfast's C++ ops do on bad input: one before any work, one
// inside at::parallel_for (OpenMP threads; ATen carries the exception out of the region).
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {
at::Tensor probe_fail(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "slmfast_probe: x must have 99 dimensions, got ", x.dim());
  return x;
}

at::Tensor probe_fail_parallel(const at::Tensor& x) {
  at::parallel_for(0, 1024, 1, [&](int64_t begin, int64_t end) {
    TORCH_CHECK(begin < 0, "slmfast_probe: failed inside parallel_for at ", begin, "..", end);
  });
  return x;
}
}  // namespace

TORCH_LIBRARY(slmfast_probe, m) {
  m.def("fail(Tensor x) -> Tensor");
  m.def("fail_parallel(Tensor x) -> Tensor");
  m.impl("fail", c10::DispatchKey::CPU, TORCH_FN(probe_fail));
  m.impl("fail_parallel", c10::DispatchKey::CPU, TORCH_FN(probe_fail_parallel));
}
"""

CALL_PROBE = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
for name in ("fail", "fail_parallel"):
    try:
        getattr(torch.ops.slmfast_probe, name)(torch.zeros(3))
    except RuntimeError as exc:
        print("RAISED", name, str(exc).splitlines()[0][:100], flush=True)
        continue
    print("NO ERROR", name, flush=True)
    sys.exit(3)
"""

# name -> extra link flags. "as torch links" is what setup.py gets today.
VARIANTS = {
    "as torch links": [],
    "-shared-libgcc": ["-shared-libgcc"],
    "-shared-libgcc + dynamic libstdc++ first": ["-shared-libgcc", "-Wl,--no-as-needed,-Bdynamic", "-lstdc++",
                                                 "-Wl,--as-needed"],
    "static libstdc++ and libgcc (control)": ["-static-libstdc++", "-static-libgcc"],
}


def compilers() -> dict[str, str]:
    """Distinct C++ compilers here: torch's choice (CXX or c++) first, then g++ on PATH and the
    usual fixed paths, each resolved to its real file."""
    found: dict[str, str] = {}
    candidates = [os.environ.get("CXX") or "c++", "g++", "/opt/gcc/bin/g++", "/usr/bin/g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            continue
        real = os.path.realpath(path)
        if real not in found.values():
            found[name] = real
    return found


def run(cmd: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def exit_words(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def needed_libraries(path: Path) -> list[str]:
    if shutil.which("readelf") is None:
        return ["(no readelf)"]
    out = run(["readelf", "-d", str(path)]).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def probe(work: Path, cxx_name: str, cxx: str, compile_flags: list[str], link_tail: list[str]) -> list[dict]:
    """Compiles the probe once with `cxx`, links it once per variant, calls each."""
    obj = work / f"probe_{len(cxx_name)}_{abs(hash(cxx)) % 10**6}.o"
    t0 = time.time()
    compiled = run([cxx, *compile_flags, "-c", str(work / "probe.cpp"), "-o", str(obj)])
    compile_s = round(time.time() - t0, 1)
    results = []
    if compiled.returncode != 0:
        return [{"compiler": cxx_name, "path": cxx, "variant": "(compile)", "built": False,
                 "error": compiled.stderr[-1500:], "compile_s": compile_s}]

    def one(item):
        name, flags = item
        so = obj.with_name(f"{obj.stem}_{abs(hash(name)) % 10**6}.so")
        linked = run([cxx, "-shared", str(obj), *flags, *link_tail, "-o", str(so)])
        row = {"compiler": cxx_name, "path": cxx, "variant": name, "ldflags": " ".join(flags),
               "compile_s": compile_s, "built": linked.returncode == 0}
        if not row["built"]:
            row["error"] = linked.stderr[-1500:]
            return row
        row["needed"] = needed_libraries(so)
        called = run([sys.executable, "-c", CALL_PROBE, str(so)], timeout=120)
        row["exit"] = exit_words(called.returncode)
        row["raised"] = called.returncode == 0 and called.stdout.count("RAISED") == 2
        row["output"] = (called.stdout.strip() + " | " + called.stderr.strip()[-400:]).strip(" |")
        return row

    with ThreadPoolExecutor(max_workers=len(VARIANTS)) as pool:
        results.extend(pool.map(one, VARIANTS.items()))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="merge the findings into this JSON file")
    parser.add_argument("--recommend-file", type=Path, help="write the LDFLAGS to try for slmfast._C here")
    args = parser.parse_args()

    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # As setup.py builds slmfast._C's CPU part: C++17, OpenMP (at::parallel_for), torch's ABI.
    compile_flags = ["-O1", "-fPIC", "-std=c++17", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w"]
    compile_flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    lib_dir = cpp_extension.library_paths()[0]
    link_tail = ["-fopenmp", f"-L{lib_dir}", "-lc10", "-ltorch", "-ltorch_cpu", f"-Wl,-rpath,{lib_dir}"]
    found = compilers()
    report = {"torch_cxx": os.environ.get("CXX") or "c++", "compilers": found, "variants": []}
    with tempfile.TemporaryDirectory(prefix="abort_probe_") as tmp:
        work = Path(tmp)
        (work / "probe.cpp").write_text(PROBE_SOURCE)
        with ThreadPoolExecutor(max_workers=max(1, len(found))) as pool:
            for rows in pool.map(lambda item: probe(work, item[0], item[1], compile_flags, link_tail),
                                 found.items()):
                report["variants"].extend(rows)

    default = next(iter(found), None)
    ok_default = [r for r in report["variants"] if r["compiler"] == default and r.get("raised")]
    recommend = ""
    if ok_default and ok_default[0]["variant"] != "as torch links":
        recommend = ok_default[0]["ldflags"]
    report["default_compiler_works_as_linked"] = any(r["variant"] == "as torch links" for r in ok_default)
    report["recommended_ldflags"] = recommend

    print(f"compilers: {found}  (torch's cpp_extension uses {report['torch_cxx']})")
    print(f"{'compiler':<18} {'variant':<44} {'result':<22} needed")
    for r in report["variants"]:
        result = ("RuntimeError" if r.get("raised") else r.get("exit", "not built")) if r.get("built") \
            else "BUILD FAILED"
        print(f"{r['compiler']:<18} {r['variant']:<44} {result:<22} {' '.join(r.get('needed', []))}")
        if not r.get("built"):
            print("    " + r.get("error", "").strip().replace("\n", "\n    ")[-800:])
        elif not r.get("raised"):
            print("    " + r.get("output", "")[-600:])
    print(f"recommended LDFLAGS for slmfast._C: {recommend or '(none needed or none works)'}")
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.exists() else {}
        data["abort_probe"] = report
        args.json.write_text(json.dumps(data, indent=1))
    if args.recommend_file:
        args.recommend_file.write_text(recommend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
