"""Shared benchmark helpers: wall-clock timing, the environment line, and table printing.

Timing follows DESIGN.md §4: every figure is measured against named baselines in the same
process on the same inputs and reported as a ratio next to the absolute numbers. On a GPU the
timer synchronizes before reading the clock.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup: int = 2, min_time: float = 0.4, max_reps: int = 30) -> float:
    """Median wall time of fn() in seconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def environment(device="cpu") -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return (f"{time.strftime('%Y-%m-%d')}  commit {commit()}  {device_name(device)}  "
            f"torch {torch.__version__}  triton {triton_version}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def layer_table_main(doc: str, run_table) -> None:
    """The command line shared by the layer benchmarks: --table [--device] [--quick] [--reps]."""
    import argparse

    from slmfast import backends

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the comparison table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--reps", type=int, default=15, help="timed reps per implementation and pass")
    args = parser.parse_args()
    print("backends: " + ", ".join(f"{s.name}={'yes' if s.available else 'no'}"
                                   for s in backends.all_status()))
    run_table(args.device, args.quick, args.reps)
