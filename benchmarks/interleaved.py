"""Interleaved timing for the fused-layer benchmarks (bench_rms_norm, bench_layer_norm,
bench_glu, bench_rotary): the implementations under comparison run in turns, rep after rep,
so that load from other processes on a shared machine hits them alike; each figure is the median
of its reps. Also the saved-for-backward bytes of each (slmfast.recompute.measure) and the row
formatting the four share.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import print_table, sync
from slmfast.recompute.measure import saved_tensor_bytes


def time_interleaved(fns: dict, device="cpu", warmup: int = 2, reps: int = 15, min_time: float = 0.0) -> dict:
    """{name: median seconds of fn()} with the fns called round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rep = 0
    while rep < reps or time.perf_counter() - start < min_time:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
        rep += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_passes(impls: dict, args: tuple, grads, device="cpu", reps: int = 15) -> tuple[dict, dict]:
    """Forward (no grad), backward (of one kept graph) and forward+backward times of each fn(*args)
    in `impls`, timed in turns, and the bytes each saves for backward. `grads` are the gradients of
    the outputs (a tensor or a tuple, like the outputs)."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def clear():
        for t in leaves:
            t.grad = None

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(*args)
        return run

    def backward(outputs):
        def run():
            torch.autograd.backward(outputs, grads, retain_graph=True)
            clear()
        return run

    def forward_backward(fn):
        def run():
            torch.autograd.backward(fn(*args), grads)
            clear()
        return run

    graphs = {name: fn(*args) for name, fn in impls.items()}  # kept for the backward-only timing
    times = {name: {} for name in impls}
    for mode, make in (("fwd", lambda n: forward(impls[n])), ("bwd", lambda n: backward(graphs[n])),
                       ("fwd+bwd", lambda n: forward_backward(impls[n]))):
        for name, t in time_interleaved({n: make(n) for n in impls}, device, reps=reps).items():
            times[name][mode] = t
    saved = {name: saved_tensor_bytes(fn, *args)[0] for name, fn in impls.items()}
    return times, saved


def copy_bandwidth(device="cpu", nbytes: int = 256 * 2**20) -> float:
    """Measured copy bandwidth in bytes/s (bytes read + bytes written), between preallocated
    buffers: the yardstick for the GB/s columns (the issue's GPU target is a fraction of it)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_interleaved({"copy": lambda: dst.copy_(src)}, device, reps=10)["copy"]
    return 2 * nbytes / seconds


def ratio_rows(label: dict, times: dict, need_bytes: dict | None = None) -> list[dict]:
    """One table row per pass: slmfast, eager and compiled ms, ratios, GB/s for slmfast."""
    rows = []
    for mode in ("fwd", "bwd", "fwd+bwd"):
        ours, eager, compiled = (times[name][mode] for name in ("slmfast", "eager", "compiled"))
        row = dict(label, **{
            "pass": mode, "slmfast ms": f"{ours * 1e3:.2f}", "eager ms": f"{eager * 1e3:.2f}",
            "compiled ms": f"{compiled * 1e3:.2f}", "vs eager": f"{ours / eager:.2f}",
            "vs compiled": f"{ours / compiled:.2f}"})
        if need_bytes is not None:
            row["GB/s"] = f"{need_bytes[mode] / ours / 1e9:.1f}"
        rows.append(row)
    return rows


def saved_row(label: dict, saved: dict) -> dict:
    return dict(label, **{"pass": "saved MB", "slmfast ms": f"{saved['slmfast'] / 2**20:.1f}",
                          "eager ms": f"{saved['eager'] / 2**20:.1f}",
                          "compiled ms": f"{saved['compiled'] / 2**20:.1f}",
                          "vs eager": f"{saved['slmfast'] / saved['eager']:.2f}"})


def lazily_compiled(eager_fn):
    """torch.compile(eager_fn), compiled at its first call (so that importing a benchmark costs
    nothing): the torch.compile baseline of the layer benchmarks."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            # The backward-only timing re-runs one graph's backward (retain_graph), which donated
            # buffers forbid; turning them off costs the compiled baseline nothing measurable here.
            torch._functorch.config.donated_buffer = False
            compiled = torch.compile(eager_fn)
        return compiled(*args)

    return call


LAYER_COLUMNS = ["dtype", "shape", "pass", "slmfast ms", "eager ms", "compiled ms", "vs eager", "vs compiled",
                 "GB/s"]


def print_layer_table(rows: list[dict]) -> None:
    """The layer benchmarks' table (ratio_rows and saved_row rows) and how to read it."""
    print_table(rows, LAYER_COLUMNS)
    print("(ratios are slmfast / baseline time: < 1 is faster; 'saved MB' rows compare bytes saved for "
          "backward; the compiled column there counts the eager graph's saves)")
