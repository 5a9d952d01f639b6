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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LayerBench  # noqa: E402
from benchmarks.interleaved import lazily_compiled  # noqa: E402
from slmfast.functional import swiglu  # noqa: E402

SHAPES = [(8192, 2048), (8192, 4096)]  # (B*T, width of gate and up)
DTYPES = [torch.bfloat16, torch.float32]


def eager_swiglu(gate, up):
    return F.silu(gate) * up


compiled_swiglu = lazily_compiled(eager_swiglu)


IMPLS = {"slmfast": swiglu, "eager": eager_swiglu, "compiled": compiled_swiglu}


def make_inputs(shape, dtype, device):
    gate = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)  # (rows, width)
    up = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)    # (rows, width)
    return gate, up


def output_grads(inputs):
    return torch.randn_like(inputs[0])  # dout: (rows, width)


# fwd reads gate, up and writes out; bwd reads dout, gate, up and writes dgate, dup
BENCH = LayerBench(__doc__, IMPLS, SHAPES, DTYPES, make_inputs, output_grads, {"fwd": 3, "bwd": 5})
test_swiglu_fwd_bwd = BENCH.pytest_benchmark(SHAPES[0])


if __name__ == "__main__":
    BENCH.main()
