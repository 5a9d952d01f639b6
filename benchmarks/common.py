"""Shared benchmark helpers: wall-clock timing, the environment line, table printing, and what the
fused-layer benchmarks share (LayerBench).

Timing follows docs/architecture.md §6: every figure is measured against named baselines in the same
process on the same inputs and reported as a ratio next to the absolute numbers. On a GPU the
timer synchronizes before reading the clock.
"""

from __future__ import annotations

import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux): VmRSS is the resident set now, VmHWM its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Sets VmHWM back to the current RSS (Linux: writing 5 to /proc/self/clear_refs), so that a
    later status_kib("VmHWM") is the peak since this call."""
    Path("/proc/self/clear_refs").write_text("5")


def step_peak_rss(step: Callable[[], None], model: torch.nn.Module) -> tuple[int, float]:
    """(bytes, seconds) of one training step's real peak: step() runs once to make the gradients,
    which are then zeroed in place; the freed heap is trimmed (malloc_trim) and VmHWM reset; the
    measured step's peak resident set size above the RSS before it, and its wall time. Run the
    process with MALLOC_MMAP_THRESHOLD_ fixed (bench_recompute_peak.py says why)."""
    import ctypes
    import gc

    step()                                   # the gradients exist from here on
    model.zero_grad(set_to_none=False)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base_kib = status_kib("VmRSS")
    reset_peak_rss()                         # VmHWM := VmRSS
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return (status_kib("VmHWM") - base_kib) * 1024, seconds


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name and its matrix/vector extensions that matter here (AMX, AVX512-BF16),
    from /proc/cpuinfo (what `lscpu` prints), e.g. "AMD EPYC (AVX-512, AVX512-BF16, no AMX)"."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    if not flags:
        return model
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extras = [isa] + (["AVX512-BF16"] if "avx512_bf16" in flags else [])
    extras.append("AMX" if "amx_tile" in flags else "no AMX")
    return f"{model} ({', '.join(extras)})"


def device_name(device: torch.device | str = "cpu") -> str:
    """The device a figure was measured on; for the CPU, also the vector ISA slmfast's CPU kernels
    ran with (capped by SLMFAST_CPU_CAPABILITY)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(0)
    from slmfast import backends
    try:
        chosen = backends.cpu_capabilities()["chosen"]
    except RuntimeError as exc:
        chosen = f"unusable: {exc}"
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads, slmfast cpu kernels: {chosen}"


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


@dataclass
class LayerBench:
    """One fused-layer benchmark (bench_rms_norm, bench_layer_norm, bench_glu, bench_rotary): the
    implementations under comparison and how to make their inputs. The four share the rest: the
    comparison table (timed in turns by benchmarks/interleaved.py, ratios ours/baseline, GB/s,
    saved-for-backward bytes), the pytest-benchmark step and the command line."""

    doc: str                        # the benchmark's module docstring; its first line heads --help
    impls: dict[str, Callable]      # name -> fn(*inputs) returning the output(s); "slmfast" first
    shapes: list[tuple]             # --quick runs the first only
    dtypes: list[torch.dtype]
    make_inputs: Callable           # (shape, dtype, device) -> inputs, the differentiable ones with grad
    output_grads: Callable          # inputs -> the gradients of the outputs (a tensor or a tuple)
    tensors_moved: dict[str, int]   # {"fwd": n, "bwd": n}: the fewest activation-sized tensors each
                                    # pass must read and write (the GB/s column counts these bytes)
    activation_elements: Callable = math.prod   # shape -> elements of one activation-sized tensor
    shape_label: Callable = field(default=lambda shape: "x".join(str(n) for n in shape))

    def min_bytes(self, shape: tuple, dtype: torch.dtype) -> dict[str, int]:
        """The bytes each pass must move at least: {"fwd", "bwd", "fwd+bwd"}."""
        size = self.activation_elements(shape) * torch.finfo(dtype).bits // 8
        forward, backward = self.tensors_moved["fwd"] * size, self.tensors_moved["bwd"] * size
        return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}

    def run_table(self, device: str, quick: bool, reps: int) -> None:
        """Prints the environment, the copy bandwidth and the comparison table."""
        from benchmarks import interleaved  # imported here: interleaved.py imports this file

        print(environment(device))
        print(f"copy bandwidth (read + write): {interleaved.copy_bandwidth(device) / 1e9:.1f} GB/s")
        rows = []
        for dtype in self.dtypes:
            for shape in self.shapes[:1] if quick else self.shapes:
                inputs = self.make_inputs(shape, dtype, device)
                grads = self.output_grads(inputs)
                times, saved = interleaved.measure_passes(self.impls, inputs, grads, device, reps)
                label = {"dtype": str(dtype).replace("torch.", ""), "shape": self.shape_label(shape)}
                rows += interleaved.ratio_rows(label, times, self.min_bytes(shape, dtype))
                rows.append(interleaved.saved_row(label, saved))
        interleaved.print_layer_table(rows)

    def forward_backward_step(self, impl: str, dtype: torch.dtype, shape: tuple) -> Callable[[], None]:
        """One forward+backward of `impl` on fresh inputs, for pytest-benchmark's `benchmark(step)`."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        inputs = self.make_inputs(shape, dtype, device)
        grads = self.output_grads(inputs)

        def step() -> None:
            torch.autograd.backward(self.impls[impl](*inputs), grads)
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    t.grad = None
            sync(device)

        return step

    def pytest_benchmark(self, shape: tuple) -> Callable:
        """A pytest-benchmark test of one forward+backward on `shape` for every implementation and
        dtype, to bind at module level: `test_<op>_fwd_bwd = BENCH.pytest_benchmark(SHAPES[0])`
        (run with `pytest benchmarks/bench_<op>.py --benchmark-only`)."""
        import pytest

        @pytest.mark.parametrize("impl", list(self.impls))
        @pytest.mark.parametrize("dtype", self.dtypes, ids=str)
        def test_fwd_bwd(benchmark, impl, dtype):
            benchmark(self.forward_backward_step(impl, dtype, shape))

        return test_fwd_bwd

    def main(self) -> None:
        """The command line: --table [--device] [--quick] [--reps]."""
        import argparse

        from slmfast import backends

        parser = argparse.ArgumentParser(description=self.doc.splitlines()[0])
        parser.add_argument("--table", action="store_true", help="print the comparison table")
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        parser.add_argument("--quick", action="store_true", help="first shape only")
        parser.add_argument("--reps", type=int, default=15, help="timed reps per implementation and pass")
        args = parser.parse_args()
        print("backends: " + ", ".join(f"{s.name}={'yes' if s.available else 'no'}"
                                       for s in backends.all_status()))
        self.run_table(args.device, args.quick, args.reps)
