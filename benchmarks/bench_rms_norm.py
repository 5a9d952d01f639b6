"""RMSNorm (+ fused residual add) benchmark: slmfast against torch eager and torch.compile.

Baselines, in the same process on the same inputs, timed in turns (benchmarks/interleaved.py):
  eager     the Hugging Face LlamaRMSNorm computation (upcast, mean of squares, rsqrt, cast,
            weight multiply), with the residual add written as a separate `x + residual`
  compiled  torch.compile of that same eager function
Reports forward, backward and forward+backward times, the ratios ours/baseline (< 1 is faster),
GB/s counting the fewest bytes each pass must move, and the bytes saved for backward.

    python benchmarks/bench_rms_norm.py --table [--device cuda] [--quick]
    pytest benchmarks/bench_rms_norm.py --benchmark-only
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LayerBench  # noqa: E402
from benchmarks.interleaved import lazily_compiled  # noqa: E402
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


compiled_rms_norm = lazily_compiled(eager_rms_norm)


IMPLS = {"slmfast": slmfast_rms_norm, "eager": eager_rms_norm, "compiled": compiled_rms_norm}


def make_inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)   # (rows, H)
    r = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)   # (rows, H)
    w = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=True)  # (H,)
    return x, w, r


def output_grads(inputs):
    x = inputs[0]
    return torch.randn_like(x), torch.randn_like(x)  # dy, dh: (rows, H)


# fwd reads x, r and writes y, h; bwd reads dy, dh, h and writes dx (the residual's gradient is the
# same tensor); weight and rstd are negligible
BENCH = LayerBench(__doc__, IMPLS, SHAPES, DTYPES, make_inputs, output_grads, {"fwd": 4, "bwd": 4})
test_rms_norm_fwd_bwd = BENCH.pytest_benchmark(SHAPES[0])


if __name__ == "__main__":
    BENCH.main()
