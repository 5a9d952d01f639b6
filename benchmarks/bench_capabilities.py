"""Run the CPU benchmarks once per vector ISA of slmfast's CPU kernels, on this machine.

slmfast._C holds every CPU kernel once per capability (default, avx2, avx512) and picks one at run
time; SLMFAST_CPU_CAPABILITY caps the choice. This runs each benchmark in a fresh process per
capability this CPU supports, so an AVX-512 machine also measures the AVX2 and baseline paths, and
prints every table under a line that names the CPU and the capability (benchmarks/common.py's
environment line). Baselines (torch's own ops) run in the same process as the slmfast figures
they are divided into.

--emulate also caps torch itself to the same ISA (ATEN_CPU_CAPABILITY for ATen's kernels,
MKL_ENABLE_INSTRUCTIONS for MKL's GEMMs, ONEDNN_MAX_CPU_ISA for oneDNN/brgemm), which is how an
AVX-512 machine stands in for an AVX2-only one: the whole process then runs AVX2 code (clock
speeds and caches stay those of this machine, so the absolute figures are not those of an AVX2
machine; the ratios are the ones to read).

    python benchmarks/bench_capabilities.py [--caps avx2 avx512] [--emulate] [--quick]
           [--only attention rms_norm swiglu losses]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Caps for torch itself under --emulate, per slmfast capability.
TORCH_CAPS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


def commands(quick: bool) -> dict[str, list[str]]:
    """The benchmark command lines, by name (each prints its own table)."""
    py = sys.executable
    quick_flag = ["--quick"] if quick else []
    return {
        "attention": [py, "benchmarks/bench_attention.py", "--table", "--device", "cpu", *quick_flag,
                      "--reps", "3"],
        "rms_norm": [py, "benchmarks/bench_rms_norm.py", "--table", "--device", "cpu", *quick_flag],
        "swiglu": [py, "benchmarks/bench_glu.py", "--table", "--device", "cpu", *quick_flag],
        "losses": [py, "benchmarks/bench_losses.py", "--table", "--device", "cpu", "--n", "4096",
                   "--hidden", "1024", "--vocab", "32768", "--dtype", "fp32", "--reps", "3"],
    }


def main() -> int:
    from slmfast import backends

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    caps = backends.cpu_capabilities()
    usable = [c for c in caps["compiled"] if c in caps["supported"]]
    parser.add_argument("--caps", nargs="+", default=[c for c in usable if c != "default"],
                        choices=list(backends.CPU_CAPABILITIES))
    parser.add_argument("--emulate", action="store_true", help="cap torch (ATen, MKL, oneDNN) too")
    parser.add_argument("--quick", action="store_true", help="first shape of each benchmark only")
    parser.add_argument("--only", nargs="+", default=None, choices=list(commands(False)))
    args = parser.parse_args()
    missing = [c for c in args.caps if c not in usable]
    if missing:
        parser.error(f"this CPU/build cannot run {', '.join(missing)} (usable here: {', '.join(usable)})")
    failures = 0
    for cap in args.caps:
        env = dict(os.environ, SLMFAST_CPU_CAPABILITY=cap)
        if args.emulate:
            env.update(TORCH_CAPS[cap])
        scope = "slmfast and torch" if args.emulate else "slmfast only"
        for name, cmd in commands(args.quick).items():
            if args.only and name not in args.only:
                continue
            print(f"\n===== {name}, capability {cap} ({scope} capped)", flush=True)
            failures += subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
