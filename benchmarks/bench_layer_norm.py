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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LayerBench  # noqa: E402
from benchmarks.interleaved import lazily_compiled  # noqa: E402
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
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)   # (rows, H)
    r = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)   # (rows, H)
    w = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=True)  # (H,)
    b = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=True)  # (H,)
    return x, w, b, r


def output_grads(inputs):
    x = inputs[0]
    return torch.randn_like(x), torch.randn_like(x)  # dy, dh: (rows, H)


# fwd reads x, r and writes y, h; bwd reads dy, dh, h and writes dx; parameters and stats are negligible
BENCH = LayerBench(__doc__, IMPLS, SHAPES, DTYPES, make_inputs, output_grads, {"fwd": 4, "bwd": 4})
test_layer_norm_fwd_bwd = BENCH.pytest_benchmark(SHAPES[0])


if __name__ == "__main__":
    BENCH.main()
