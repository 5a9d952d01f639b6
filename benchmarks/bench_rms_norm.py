"""RMSNorm (+ fused residual add) benchmark: slmfast against torch eager and torch.compile.

Baselines, in the same process on the same inputs:
  eager     the Hugging Face LlamaRMSNorm computation (upcast, mean of squares, rsqrt, cast,
            weight multiply), with the residual add written as a separate `x + residual`
  compiled  torch.compile of that same eager function
Reports forward, backward and forward+backward times, the ratios ours/baseline (< 1 is faster),
GB/s counting the fewest bytes each pass must move, and the bytes saved for backward.

    python benchmarks/bench_rms_norm.py --table [--device cuda] [--quick]
    pytest benchmarks/bench_rms_norm.py --benchmark-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, time_fn  # noqa: E402
from slmfast import backends  # noqa: E402
from slmfast.functional import rms_norm  # noqa: E402

EPS = 1e-6
SHAPES = [(8192, 2048), (8192, 4096)]
DTYPES = [torch.bfloat16, torch.float32]


def eager_rms_norm(x, weight, residual):
    h = x + residual
    hf = h.float()
    variance = hf.pow(2).mean(-1, keepdim=True)
    return weight * (hf * torch.rsqrt(variance + EPS)).to(x.dtype), h


def slmfast_rms_norm(x, weight, residual):
    return rms_norm(x, weight, EPS, residual)


_compiled = {}


def compiled_rms_norm(x, weight, residual):
    if "fn" not in _compiled:
        # The backward-only timing re-runs one graph's backward (retain_graph), which donated
        # buffers forbid; turning them off costs the compiled baseline nothing measurable here.
        torch._functorch.config.donated_buffer = False
        _compiled["fn"] = torch.compile(eager_rms_norm)
    return _compiled["fn"](x, weight, residual)


IMPLS = {"slmfast": slmfast_rms_norm, "eager": eager_rms_norm, "compiled": compiled_rms_norm}


def make_inputs(shape, dtype, device, requires_grad):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    r = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    w = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=requires_grad)
    return x, w, r


def saved_bytes(fn, x, w, r) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w, r)
    return sum(storages.values())


def measure(impl: str, shape, dtype, device) -> dict:
    fn = IMPLS[impl]
    x, w, r = make_inputs(shape, dtype, device, requires_grad=True)
    gy, gh = torch.randn_like(x), torch.randn_like(x)

    def forward():
        with torch.no_grad():
            fn(x, w, r)

    def forward_backward():
        y, h = fn(x, w, r)
        torch.autograd.backward((y, h), (gy, gh))
        x.grad = w.grad = r.grad = None

    y, h = fn(x, w, r)

    def backward():
        torch.autograd.backward((y, h), (gy, gh), retain_graph=True)
        x.grad = w.grad = r.grad = None

    return {"fwd": time_fn(forward, device), "bwd": time_fn(backward, device),
            "fwd+bwd": time_fn(forward_backward, device), "saved": saved_bytes(fn, x, w, r)}


def min_bytes(shape, dtype) -> dict:
    """Fewest bytes each pass must move: fwd reads x, r, writes y, h; bwd reads dy, dh, h,
    writes dx (residual grad is the same tensor); weight and rstd are negligible."""
    n = shape[0] * shape[1] * torch.finfo(dtype).bits // 8
    return {"fwd": 4 * n, "bwd": 4 * n, "fwd+bwd": 8 * n}


def run_table(device: str, quick: bool) -> None:
    print(environment(device))
    shapes = SHAPES[:1] if quick else SHAPES
    rows = []
    for dtype in DTYPES:
        for shape in shapes:
            results = {impl: measure(impl, shape, dtype, device) for impl in IMPLS}
            need = min_bytes(shape, dtype)
            for mode in ("fwd", "bwd", "fwd+bwd"):
                ours = results["slmfast"][mode]
                rows.append({
                    "dtype": str(dtype).replace("torch.", ""), "shape": f"{shape[0]}x{shape[1]}",
                    "pass": mode, "slmfast ms": f"{ours * 1e3:.2f}",
                    "eager ms": f"{results['eager'][mode] * 1e3:.2f}",
                    "compiled ms": f"{results['compiled'][mode] * 1e3:.2f}",
                    "vs eager": f"{ours / results['eager'][mode]:.2f}",
                    "vs compiled": f"{ours / results['compiled'][mode]:.2f}",
                    "GB/s": f"{need[mode] / ours / 1e9:.1f}",
                })
            rows.append({"dtype": str(dtype).replace("torch.", ""), "shape": f"{shape[0]}x{shape[1]}",
                         "pass": "saved MB",
                         "slmfast ms": f"{results['slmfast']['saved'] / 2**20:.1f}",
                         "eager ms": f"{results['eager']['saved'] / 2**20:.1f}",
                         "compiled ms": f"{results['compiled']['saved'] / 2**20:.1f}",
                         "vs eager": f"{results['slmfast']['saved'] / results['eager']['saved']:.2f}"})
    print_table(rows, ["dtype", "shape", "pass", "slmfast ms", "eager ms", "compiled ms", "vs eager",
                       "vs compiled", "GB/s"])
    print("(ratios are slmfast / baseline time: < 1 is faster; 'saved MB' rows compare bytes "
          "saved for backward; the compiled column there counts the eager graph's saves)")


# ---- pytest-benchmark entry points ---------------------------------------------------------

@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_fwd_bwd(benchmark, impl, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, r = make_inputs(SHAPES[0], dtype, device, requires_grad=True)
    gy, gh = torch.randn_like(x), torch.randn_like(x)

    def step():
        y, h = IMPLS[impl](x, w, r)
        torch.autograd.backward((y, h), (gy, gh))
        x.grad = w.grad = r.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the comparison table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    args = parser.parse_args()
    print("backends: " + ", ".join(f"{s.name}={'yes' if s.available else 'no'}"
                                   for s in backends.all_status()))
    run_table(args.device, args.quick)


if __name__ == "__main__":
    main()
