"""Check that slmfast._C runs on any x86-64 CPU: only the per-capability kernels use AVX.

The extension holds every vectorized CPU kernel once per capability (csrc/cpu/capability.h), in
namespaces slmfast::cpu::AVX2 and slmfast::cpu::AVX512 (at::vec's code in at::vec::AVX2 and
at::vec::AVX512), and chooses one at run time after asking cpuid. Everything else must be
baseline x86-64 (SSE2): code that runs before that check, or on every path, and the inline
functions from headers (ATen, c10, the standard library) that the copies share, where the linker
keeps one definition for all of them (setup.py links the baseline objects first so that it keeps
theirs). This script disassembles the library with objdump and lists every function outside
those namespaces that contains a VEX or EVEX instruction (a mnemonic starting with "v", or a
ymm/zmm/opmask register, or xmm16-31): each would be an illegal instruction on a CPU without AVX.
Only global and weak symbols count: a local symbol (say a compiler clone such as `foo.isra.0`)
can only be called from the object file that made it, so an AVX copy's local clones are reached
from that copy alone.

Usage: python tools/isa_check.py [path/to/_C.so]   (exit 1 and a list when it finds any)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

# A function belongs to a capability's copy when its mangled name names one of the per-ISA
# namespaces anywhere (its own scope, a lambda's enclosing function, a template argument).
PER_ISA = re.compile(r"(?<![0-9])(4AVX2|6AVX512)")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
WIDE_REGISTER = re.compile(r"%(ymm\d+|zmm\d+|k[0-7]\b|xmm(1[6-9]|2\d|3[01])\b)")


def vex_instruction(line: str) -> bool:
    parts = line.split("\t")
    if len(parts) < 2:
        return False
    text = parts[-1].strip()
    mnemonic = text.split(" ", 1)[0]
    return (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or bool(WIDE_REGISTER.search(text))


def shared_functions(library: Path) -> set[str]:
    """Mangled names of the global and weak function symbols of the library."""
    table = subprocess.run(["nm", "--defined-only", str(library)], capture_output=True, text=True,
                           check=True).stdout
    names = set()
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("T", "W", "i"):
            names.add(parts[2])
    return names


def offenders(library: Path) -> dict[str, int]:
    """{mangled function name: number of AVX instructions} for shared functions outside the copies."""
    shared = shared_functions(library)
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True,
                          text=True, check=True).stdout
    found: dict[str, int] = {}
    name = None
    for line in dump.splitlines():
        match = FUNCTION.match(line)
        if match:
            name = match.group(1)
            continue
        if name is not None and name in shared and not PER_ISA.search(name) and vex_instruction(line):
            found[name] = found.get(name, 0) + 1
    return found


def default_library() -> Path:
    root = Path(__file__).resolve().parent.parent
    candidates = sorted((root / "slmfast").glob("_C*.so"))
    if not candidates:
        sys.exit("isa_check: slmfast/_C*.so not found; build it first (make build)")
    return candidates[0]


def main() -> int:
    if shutil.which("objdump") is None or shutil.which("nm") is None:
        print("isa_check: objdump/nm not found (binutils); nothing checked")
        return 0
    library = Path(sys.argv[1]) if len(sys.argv) > 1 else default_library()
    found = offenders(library)
    if not found:
        print(f"isa_check: {library.name}: no AVX instruction outside the per-capability kernels")
        return 0
    names = subprocess.run(["c++filt"], input="\n".join(found), capture_output=True,
                           text=True).stdout.splitlines()
    print(f"isa_check: {len(found)} functions outside the per-capability kernels use AVX instructions:")
    for count, demangled in zip(found.values(), names or list(found)):
        print(f"  {count:6d}  {demangled[:160]}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
