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

import pytest
import torch

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


def make_inputs(shape, dtype, device, requires_grad):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    r = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    w = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=requires_grad)
    return x, w, r


def measure(shape, dtype, device, reps) -> tuple[dict, dict]:
    x, w, r = make_inputs(shape, dtype, device, requires_grad=True)
    return measure_passes(IMPLS, (x, w, r), (torch.randn_like(x), torch.randn_like(x)), device, reps)


def min_bytes(shape, dtype) -> dict:
    """Fewest bytes each pass must move: fwd reads x, r, writes y, h; bwd reads dy, dh, h,
    writes dx (residual grad is the same tensor); weight and rstd are negligible."""
    n = shape[0] * shape[1] * torch.finfo(dtype).bits // 8
    return {"fwd": 4 * n, "bwd": 4 * n, "fwd+bwd": 8 * n}


def run_table(device: str, quick: bool, reps: int) -> None:
    print(environment(device))
    print(f"copy bandwidth (read + write): {copy_bandwidth(device) / 1e9:.1f} GB/s")
    rows = []
    for dtype in DTYPES:
        for shape in SHAPES[:1] if quick else SHAPES:
            times, saved = measure(shape, dtype, device, reps)
            label = {"dtype": str(dtype).replace("torch.", ""), "shape": f"{shape[0]}x{shape[1]}"}
            rows += ratio_rows(label, times, min_bytes(shape, dtype))
            rows.append(saved_row(label, saved))
    print_layer_table(rows)


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
    layer_table_main(__doc__, run_table)


if __name__ == "__main__":
    main()
