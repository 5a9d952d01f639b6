"""Rotary position embedding benchmark: slmfast.functional.rotary against torch eager and
torch.compile of Hugging Face's apply_rotary_pos_emb.

Baselines, in the same process on the same inputs, timed in turns (benchmarks/interleaved.py):
  eager     q * cos + rotate_half(q) * sin (and the same for k), HF's apply_rotary_pos_emb with
            cos/sin cast to the activation dtype as HF's rotary embedding returns them
  compiled  torch.compile of that same function
q (B, Hq, T, D) and k (B, Hkv, T, D) as the transposed views of (B, T, H, D) projection outputs
(what an attention layer passes), cos/sin (1, T, D) float32. Forward, backward, forward+backward
times, ratios ours/baseline (< 1 is faster), GB/s, and the bytes saved for backward.

    python benchmarks/bench_rotary.py --table [--device cuda] [--quick]
    pytest benchmarks/bench_rotary.py --benchmark-only
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
from slmfast.functional import rotary  # noqa: E402
from slmfast.nn import RotaryEmbedding  # noqa: E402

# (B, T, Hq, Hkv, D): 8192 tokens, Llama-3-8B-like heads (GQA 4:1) at D=128, and a small model's.
SHAPES = [(4, 2048, 32, 8, 128), (8, 1024, 16, 4, 64)]
DTYPES = [torch.bfloat16, torch.float32]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rotary(q, k, cos, sin):
    cos, sin = cos.to(q.dtype).unsqueeze(1), sin.to(q.dtype).unsqueeze(1)  # (1, 1, T, D)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


compiled_rotary = lazily_compiled(eager_rotary)


IMPLS = {"slmfast": rotary, "eager": eager_rotary, "compiled": compiled_rotary}


def make_inputs(shape, dtype, device):
    batch, seqlen, hq, hkv, head_dim = shape
    q = torch.randn(batch, seqlen, hq, head_dim, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(batch, seqlen, hkv, head_dim, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    cos, sin = RotaryEmbedding(head_dim, device=device)(torch.arange(seqlen, device=device)[None])
    return q, k, cos, sin


def min_bytes(shape, dtype) -> dict:
    """fwd reads and writes q and k; bwd reads and writes their gradients."""
    batch, seqlen, hq, hkv, head_dim = shape
    n = batch * seqlen * (hq + hkv) * head_dim * torch.finfo(dtype).bits // 8
    return {"fwd": 2 * n, "bwd": 2 * n, "fwd+bwd": 4 * n}


def run_table(device: str, quick: bool, reps: int) -> None:
    print(environment(device))
    print(f"copy bandwidth (read + write): {copy_bandwidth(device) / 1e9:.1f} GB/s")
    rows = []
    for dtype in DTYPES:
        for shape in SHAPES[:1] if quick else SHAPES:
            args = make_inputs(shape, dtype, device)
            grads = (torch.randn_like(args[0]), torch.randn_like(args[1]))
            times, saved = measure_passes(IMPLS, args, grads, device, reps)
            label = {"dtype": str(dtype).replace("torch.", ""), "shape": "B{} T{} H{}/{} D{}".format(*shape)}
            rows += ratio_rows(label, times, min_bytes(shape, dtype))
            rows.append(saved_row(label, saved))
    print_layer_table(rows)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_fwd_bwd(benchmark, impl, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, cos, sin = make_inputs(SHAPES[1], dtype, device)
    grads = (torch.randn_like(q), torch.randn_like(k))

    def step():
        torch.autograd.backward(IMPLS[impl](q, k, cos, sin), grads)
        q.grad = k.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


def main() -> None:
    layer_table_main(__doc__, run_table)


if __name__ == "__main__":
    main()
