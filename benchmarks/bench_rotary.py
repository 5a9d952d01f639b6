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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LayerBench  # noqa: E402
from benchmarks.interleaved import lazily_compiled  # noqa: E402
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
    # q: (B, Hq, T, D), k: (B, Hkv, T, D), views of (B, T, H, D); cos, sin: (1, T, D)
    cos, sin = RotaryEmbedding(head_dim, device=device)(torch.arange(seqlen, device=device)[None])
    return q, k, cos, sin


def output_grads(inputs):
    q, k = inputs[0], inputs[1]
    return torch.randn_like(q), torch.randn_like(k)  # (B, Hq, T, D), (B, Hkv, T, D)


def qk_elements(shape) -> int:
    """Elements of q and k together: the activation-sized tensor the byte counts are in."""
    batch, seqlen, hq, hkv, head_dim = shape
    return batch * seqlen * (hq + hkv) * head_dim


def shape_label(shape) -> str:
    return "B{} T{} H{}/{} D{}".format(*shape)


# fwd reads and writes q and k; bwd reads and writes their gradients (cos and sin are negligible)
BENCH = LayerBench(__doc__, IMPLS, SHAPES, DTYPES, make_inputs, output_grads, {"fwd": 2, "bwd": 2},
                   activation_elements=qk_elements, shape_label=shape_label)
test_rotary_fwd_bwd = BENCH.pytest_benchmark(SHAPES[1])


if __name__ == "__main__":
    BENCH.main()
