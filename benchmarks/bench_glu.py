"""SwiGLU benchmark: slmfast.functional.swiglu against torch eager and torch.compile.

Baselines, in the same process on the same inputs, timed in turns (benchmarks/interleaved.py):
  eager     F.silu(gate) * up (what Hugging Face's LlamaMLP computes between its projections)
  compiled  torch.compile of that same function
Forward, backward and forward+backward times, ratios ours/baseline (< 1 is faster), GB/s counting
the fewest bytes each pass must move, and the bytes saved for backward.

    python benchmarks/bench_glu.py --table [--device cuda] [--quick]
    pytest benchmarks/bench_glu.py --benchmark-only
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
from slmfast.functional import swiglu  # noqa: E402

SHAPES = [(8192, 2048), (8192, 4096)]  # (B*T, width of gate and up)
DTYPES = [torch.bfloat16, torch.float32]


def eager_swiglu(gate, up):
    return F.silu(gate) * up


compiled_swiglu = lazily_compiled(eager_swiglu)


IMPLS = {"slmfast": swiglu, "eager": eager_swiglu, "compiled": compiled_swiglu}


def make_inputs(shape, dtype, device, requires_grad=True):
    gate = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    up = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    return gate, up


def measure(shape, dtype, device, reps) -> tuple[dict, dict]:
    gate, up = make_inputs(shape, dtype, device)
    return measure_passes(IMPLS, (gate, up), torch.randn_like(gate), device, reps)


def min_bytes(shape, dtype) -> dict:
    """fwd reads gate, up and writes out; bwd reads dout, gate, up and writes dgate, dup."""
    n = shape[0] * shape[1] * torch.finfo(dtype).bits // 8
    return {"fwd": 3 * n, "bwd": 5 * n, "fwd+bwd": 8 * n}


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
def test_swiglu_fwd_bwd(benchmark, impl, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gate, up = make_inputs(SHAPES[0], dtype, device)
    dout = torch.randn_like(gate)

    def step():
        torch.autograd.backward(IMPLS[impl](gate, up), dout)
        gate.grad = up.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


def main() -> None:
    layer_table_main(__doc__, run_table)


if __name__ == "__main__":
    main()
