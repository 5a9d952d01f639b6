"""Packed documents on the CPU: slmfast's attention against FlexAttention with a document mask.

FlexAttention (torch.nn.attention.flex_attention, compiled, with a causal document block mask) is
torch's own answer to packed sequences; on the CPU it runs the forward only (torch 2.13 raises
"FlexAttention does not support backward on CPU"), so this times the forward, under no_grad, of
one sequence of DOCS documents of DOC_LEN tokens, H heads of D. slmfast gets the same tensors in
its packed layout (cu_seqlens). Both are compiled/warmed first; each is timed in turns with the
other (medians), and the outputs are compared.

    python benchmarks/bench_flex_cpu.py [--docs 8] [--doc-len 256] [--heads 8] [--dim 64] [--reps 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment  # noqa: E402
from slmfast.functional import attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--doc-len", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    print(environment("cpu"))
    T, L = args.docs * args.doc_len, args.doc_len
    doc = torch.arange(T) // L                                                # (T,) document of each token
    mask = create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i), None, None, T, T, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32)
    print(f"{args.docs} documents x {L} tokens, {args.heads} heads of {args.dim}, causal, forward only")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(1, args.heads, T, args.dim, dtype=dtype) for _ in range(3))  # (1, H, T, D)
        packed = [t[0].transpose(0, 1) for t in (q, k, v)]                                   # (T, H, D)
        runs = {"slmfast": lambda p=packed: attention(*p, causal=True, cu_seqlens=cu, max_seqlen=L),
                "flex": lambda t=(q, k, v): flex(*t, block_mask=mask)}
        times = {name: [] for name in runs}
        with torch.no_grad():
            for fn in runs.values():  # compile and warm up
                fn(), fn()
            for _ in range(args.reps):
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            ours, theirs = runs["slmfast"]().transpose(0, 1)[None], runs["flex"]()           # (1, H, T, D)
            diff = (ours.float() - theirs.float()).abs().max().item()
        med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        print(f"{str(dtype)[6:]:9s} slmfast {med['slmfast'] * 1e3:7.2f} ms  flex {med['flex'] * 1e3:7.2f} ms"
              f"  slmfast / flex {med['slmfast'] / med['flex']:.2f}  max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
