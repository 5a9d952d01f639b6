"""LayerNorm (+ fused residual add) benchmark: slmfast against torch eager and torch.compile.

Baselines, in the same process on the same inputs, timed in turns (benchmarks/interleaved.py):
  eager     h = x + residual, then torch.nn.functional.layer_norm(h) (ATen's fused CPU/CUDA kernel)
  compiled  torch.compile of that same function
Forward, backward and forward+backward times, ratios ours/baseline (< 1 is faster), GB/s counting
the fewest bytes each pass must move, and the bytes saved for backward. (The issue sets no speed
target for LayerNorm: eager is already one ATen kernel; the fusion saves the residual pass.)

    python benchmarks/bench_layer_norm.py --table [--device cuda] [--quick]
    pytest benchmarks/bench_layer_norm.py --benchmark-only
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, layer_table_main  # noqa: E402
from benchmarks.interleaved import (  # noqa: E402
    copy_bandwidth,
    lazily_compiled,
    measure_passes,
    print_layer_table,
    ratio_rows,
    saved_row,
)
from slmfast.functional import layer_norm  # noqa: E402

EPS = 1e-5
SHAPES = [(8192, 2048), (8192, 4096)]
DTYPES = [torch.bfloat16, torch.float32]


def eager_layer_norm(x, weight, bias, residual):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, EPS), h


def slmfast_layer_norm(x, weight, bias, residual):
    return layer_norm(x, weight, bias, EPS, residual)


compiled_layer_norm = lazily_compiled(eager_layer_norm)


IMPLS = {"slmfast": slmfast_layer_norm, "eager": eager_layer_norm, "compiled": compiled_layer_norm}


def make_inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    r = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=True)
    return x, w, b, r


def min_bytes(shape, dtype) -> dict:
    """fwd reads x, r and writes y, h; bwd reads dy, dh, h and writes dx."""
    n = shape[0] * shape[1] * torch.finfo(dtype).bits // 8
    return {"fwd": 4 * n, "bwd": 4 * n, "fwd+bwd": 8 * n}


def run_table(device: str, quick: bool, reps: int) -> None:
    print(environment(device))
    print(f"copy bandwidth (read + write): {copy_bandwidth(device) / 1e9:.1f} GB/s")
    rows = []
    for dtype in DTYPES:
        for shape in SHAPES[:1] if quick else SHAPES:
            args = make_inputs(shape, dtype, device)
            grads = (torch.randn_like(args[0]), torch.randn_like(args[0]))
            times, saved = measure_passes(IMPLS, args, grads, device, reps)
            label = {"dtype": str(dtype).replace("torch.", ""), "shape": f"{shape[0]}x{shape[1]}"}
            rows += ratio_rows(label, times, min_bytes(shape, dtype))
            rows.append(saved_row(label, saved))
    print_layer_table(rows)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_fwd_bwd(benchmark, impl, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = make_inputs(SHAPES[0], dtype, device)
    grads = (torch.randn_like(args[0]), torch.randn_like(args[0]))

    def step():
        torch.autograd.backward(IMPLS[impl](*args), grads)
        for t in args:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


def main() -> None:
    layer_table_main(__doc__, run_table)


if __name__ == "__main__":
    main()
