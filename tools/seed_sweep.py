"""Rerun tolerance tests under many seeds and report the ones that fail on some draw.

Every test draws its inputs from a seed made of its node id (tests/conftest.py); the environment
variable SLMFAST_TEST_SEED_OFFSET=n mixes n into it, so each offset is a fresh, reproducible draw
of every test. A bound that holds at offset 0 but fails at another is a flaky bound: a test must
pass on every draw (issue: "no flaky tolerance test").

    python tools/seed_sweep.py                       # the tolerance tests, offsets 0..19
    python tools/seed_sweep.py -s 20 tests/ops/test_distill_loss.py -k tvd
    python tools/seed_sweep.py --capability avx2     # under SLMFAST_CPU_CAPABILITY=avx2
    python tools/seed_sweep.py --capability each     # once per vector path this CPU runs

Tests that take a `backend` param already run the cpu backend on every vector path
(tests/helpers.py); --capability also caps the path of the tests that call the cpu backend
without that param (module and model tests). Default targets: every test file with a tolerance
assertion (assert_close from tests/helpers.py or torch.testing). A failing test is printed with
the offsets it failed at, its first error line, and the command that reproduces one of them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = re.compile(r"assert_close\(|assert_allclose|torch\.allclose|rtol=")


def tolerance_files() -> list[str]:
    """Test files with a tolerance assertion (the rule of tests/helpers.py or torch.testing)."""
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if TOLERANCE.search(path.read_text()):
            files.append(str(path.relative_to(ROOT)))
    return files


def capabilities(choice: str | None) -> list[str | None]:
    if choice is None:
        return [None]
    if choice != "each":
        return choice.split(",")
    sys.path.insert(0, str(ROOT))
    from slmfast import backends
    caps = backends.cpu_capabilities()
    return [c for c in caps["compiled"] if c in caps["supported"]] or [None]


def failures(junit: Path) -> dict[str, str]:
    """node id -> first line of the failure message, from a junit XML report."""
    out = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            bad = case.find(tag)
            if bad is not None:
                classname = case.get("classname", "")
                path = case.get("file") or classname.replace(".", "/") + ".py"
                module = path[:-3].replace("/", ".")
                cls = classname[len(module) + 1:] if classname.startswith(module + ".") else ""
                name = f"{path}::{cls + '::' if cls else ''}{case.get('name')}"
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                out[name] = message[0][:200] if message else tag
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*",
                        help="test files or node ids (default: every tolerance test file)")
    parser.add_argument("-s", "--seeds", type=int, default=20,
                        help="number of offsets, 0..SEEDS-1 (default 20)")
    parser.add_argument("--first", type=int, default=0, help="first offset (default 0)")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("-m", default=None, help="pytest -m expression")
    parser.add_argument("-n", "--workers", default="2", help="pytest-xdist workers (default 2; 0: none)")
    parser.add_argument("--capability", default=None,
                        help="SLMFAST_CPU_CAPABILITY for the runs: a name, a comma list, or 'each'")
    args = parser.parse_args(argv)

    targets = args.targets or tolerance_files()
    failed: dict[tuple[str | None, str], dict[int, str]] = defaultdict(dict)
    runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        for cap in capabilities(args.capability):
            for offset in range(args.first, args.first + args.seeds):
                env = dict(os.environ, SLMFAST_TEST_SEED_OFFSET=str(offset))
                if cap is not None:
                    env["SLMFAST_CPU_CAPABILITY"] = cap
                junit = Path(tmp) / f"run-{cap}-{offset}.xml"
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "-o", "junit_family=xunit1", f"--junitxml={junit}", *targets]
                if args.workers not in ("0", ""):
                    cmd += ["-n", args.workers]
                if args.k:
                    cmd += ["-k", args.k]
                if args.m:
                    cmd += ["-m", args.m]
                result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                runs += 1
                found = failures(junit)
                summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
                print(f"capability={cap or 'auto'} offset={offset}: {summary}", flush=True)
                if result.returncode not in (0, 1) and not found:
                    print(result.stdout[-2000:] + result.stderr[-2000:])
                    return 2
                for node, message in found.items():
                    failed[(cap, node)][offset] = message
                    print(f"    FAILED {node}: {message}", flush=True)

    print(f"\n{runs} runs of {len(targets)} target(s)")
    if not failed:
        print("no test failed at any offset")
        return 0
    print(f"{len(failed)} test(s) failed at some offset:")
    for (cap, node), by_offset in sorted(failed.items(), key=lambda kv: (-len(kv[1]), kv[0][1])):
        offsets = sorted(by_offset)
        print(f"\n{node}  [{len(offsets)}/{args.seeds} offsets: {offsets}]"
              + (f" capability={cap}" if cap else ""))
        print(f"    {by_offset[offsets[0]]}")
        prefix = (f"SLMFAST_CPU_CAPABILITY={cap} " if cap else "") + f"SLMFAST_TEST_SEED_OFFSET={offsets[0]}"
        print(f"    reproduce: {prefix} {sys.executable} -m pytest -p no:cacheprovider '{node}'")
    return 1


if __name__ == "__main__":
    sys.exit(main())
