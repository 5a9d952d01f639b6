"""Fused attention benchmark: slmfast against torch SDPA and eager attention, causal, fwd and fwd+bwd.

Baselines, in the same process on the same inputs (docs/architecture.md §6):
  sdpa    torch.nn.functional.scaled_dot_product_attention (on the CPU: its flash kernel)
  eager   the Hugging Face eager computation: q k^T * scale + mask, softmax in float32, cast, @ v
On the GPU (--device cuda) also SDPA with each backend (flash, efficient, cudnn, forced through
torch.nn.attention.sdpa_kernel) and FlexAttention with a causal document mask.
Shapes (B, H, T, D) = (4, 8, 1024, 64) and (1, 16, 4096, 64), bf16 and fp32, plus a packed batch:
8 documents of 256 tokens in T = 2048 (H = 8, D = 64), slmfast's packed layout against SDPA with
the equivalent block-diagonal causal boolean mask. FLOPs (docs/architecture.md §6): 4*B*H*T*S*D
forward, half when causal, 2.5x that for backward; for the packed case the FLOPs of the documents
only. Ratios are slmfast / baseline time: < 1 is faster.

    python benchmarks/bench_attention.py --table [--device cuda] [--quick]
    pytest benchmarks/bench_attention.py --benchmark-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table  # noqa: E402
from benchmarks.interleaved import time_interleaved  # noqa: E402
from slmfast import backends  # noqa: E402
from slmfast.functional import attention  # noqa: E402

SHAPES = [(4, 8, 1024, 64), (1, 16, 4096, 64)]
DTYPES = [torch.bfloat16, torch.float32]
DOCS, DOC_LEN, PACKED_HEADS, PACKED_DIM = 8, 256, 8, 64


def eager_attention(q, k, v, mask):
    """HF's eager_attention_forward with an additive mask (0 visible, dtype min hidden)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def causal_mask(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def document_mask(device) -> torch.Tensor:
    """(T, T) boolean: causal inside each of the DOCS documents, nothing across them."""
    doc = torch.arange(DOCS * DOC_LEN, device=device) // DOC_LEN
    return (doc[:, None] == doc[None, :]) & causal_mask(DOCS * DOC_LEN, device)


def additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def sdpa_backend_impl(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


_flex = {}


def flex_impl(block_mask_fn):
    """FlexAttention (compiled) with a block mask built by block_mask_fn(device)."""
    def run(q, k, v):
        from torch.nn.attention.flex_attention import flex_attention
        if "fn" not in _flex:
            _flex["fn"] = torch.compile(flex_attention, dynamic=False)
        key = (q.shape, q.device)
        if key not in _flex:
            _flex[key] = block_mask_fn(q)
        return _flex["fn"](q, k, v, block_mask=_flex[key])
    return run


def causal_block_mask(q):
    from torch.nn.attention.flex_attention import create_block_mask
    T = q.shape[-2]
    return create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T, device=q.device)


def document_block_mask(q):
    from torch.nn.attention.flex_attention import create_block_mask
    doc = torch.arange(q.shape[-2], device=q.device) // DOC_LEN
    T = q.shape[-2]
    return create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i), None, None, T, T,
                             device=q.device)


def dense_impls(device: str, T: int, dtype, with_eager: bool) -> dict:
    impls = {"slmfast": lambda q, k, v: attention(q, k, v, causal=True),
             "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if with_eager:
        mask = additive(causal_mask(T, device), dtype)
        impls["eager"] = lambda q, k, v: eager_attention(q, k, v, mask)
    if torch.device(device).type == "cuda":
        for name in ("flash", "efficient", "cudnn"):
            impls[f"sdpa-{name}"] = sdpa_backend_impl(name)
        impls["flex"] = flex_impl(causal_block_mask)
    return impls


def packed_impls(device: str, dtype) -> dict:
    T = DOCS * DOC_LEN
    cu = torch.arange(0, T + 1, DOC_LEN, dtype=torch.int32, device=device)
    bool_mask = document_mask(device)

    def ours(q, k, v):  # q (1, H, T, D) -> the packed (T, H, D) layout
        qp, kp, vp = (t[0].transpose(0, 1) for t in (q, k, v))
        return attention(qp, kp, vp, causal=True, cu_seqlens=cu, max_seqlen=DOC_LEN)

    impls = {"slmfast": ours,
             "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)}
    if torch.device(device).type == "cuda":  # the CPU's forward-only Flex: bench_flex_cpu.py
        impls["flex"] = flex_impl(document_block_mask)
    return impls


def measure(impls: dict, shape, dtype, device, reps: int) -> dict:
    """{name: {"fwd": s, "fwd+bwd": s}}: medians of the impls timed in turns on the same inputs
    (benchmarks/interleaved.py), so that load from other processes hits them alike."""
    B, H, T, D = shape
    q, k, v = (torch.randn(B, H, T, D, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D, dtype=dtype, device=device)

    q_, k_, v_ = (t.detach() for t in (q, k, v))  # the forward pass alone: inputs without grad

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(q_, k_, v_)
        return run

    def forward_backward(fn):
        def run():
            out = fn(q, k, v)
            out.backward(grad.view(out.shape))
            q.grad = k.grad = v.grad = None
        return run

    usable, forward_only = {}, {}
    for name, fn in impls.items():  # a baseline that refuses these inputs (say flash with fp32) is left out
        try:
            forward(fn)()
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            print(f"  {name} skipped for {tuple(shape)} {dtype}: {str(exc).splitlines()[0][:100]}")
            continue
        try:
            forward_backward(fn)()
            usable[name] = fn
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # FlexAttention on the CPU
            forward_only[name] = fn
            print(f"  {name}: forward only for {tuple(shape)} {dtype}: {str(exc).splitlines()[0][:100]}")
    fwd = time_interleaved({name: forward(fn) for name, fn in {**usable, **forward_only}.items()}, device,
                           reps=reps)
    both = time_interleaved({name: forward_backward(fn) for name, fn in usable.items()}, device, reps=reps)
    return {name: {"fwd": fwd[name], **({"fwd+bwd": both[name]} if name in both else {})} for name in fwd}


def flops(shape, packed: bool) -> dict:
    B, H, T, D = shape
    keys = DOC_LEN if packed else T  # per query, before the causal halving
    fwd = 4 * B * H * T * keys * D / 2
    return {"fwd": fwd, "fwd+bwd": 3.5 * fwd}


def table_rows(label, shape, dtype, impls, device, reps, packed=False) -> list[dict]:
    results = measure(impls, shape, dtype, device, reps)
    work = flops(shape, packed)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        ours = results["slmfast"][mode]
        row = {"case": label, "dtype": str(dtype).replace("torch.", ""), "pass": mode,
               "slmfast ms": f"{ours * 1e3:.2f}", "GFLOP/s": f"{work[mode] / ours / 1e9:.0f}"}
        for name, res in results.items():
            if name != "slmfast" and mode in res:  # (missing: the baseline was skipped for this case)
                row[f"{name} ms"] = f"{res[mode] * 1e3:.2f}"
                row[f"vs {name}"] = f"{ours / res[mode]:.2f}"
        rows.append(row)
    return rows


def run_table(device: str, quick: bool, reps: int) -> None:
    print(environment(device))
    states = backends.all_status()
    print("backends: " + ", ".join(f"{s.name}={'yes' if s.available else 'no'}" for s in states))
    rows = []
    shapes = SHAPES[:1] if quick else SHAPES
    for dtype in DTYPES:
        for shape in shapes:
            impls = dense_impls(device, shape[2], dtype, with_eager=True)
            rows += table_rows("x".join(map(str, shape)), shape, dtype, impls, device, reps)
        packed_shape = (1, PACKED_HEADS, DOCS * DOC_LEN, PACKED_DIM)
        rows += table_rows(f"packed {DOCS}x{DOC_LEN}", packed_shape, dtype, packed_impls(device, dtype),
                           device, reps, packed=True)
    columns = ["case", "dtype", "pass", "slmfast ms", "GFLOP/s"]
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    print_table(rows, columns)
    print("(vs X = slmfast time / X time: < 1 is faster; GFLOP/s counts causal FLOPs, documents only "
          "for the packed case; causal everywhere)")


# ---- pytest-benchmark entry points ---------------------------------------------------------

@pytest.mark.parametrize("impl", ["slmfast", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_fwd_bwd(benchmark, impl, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES[0]
    fn = dense_impls(device, shape[2], dtype, with_eager=False)[impl]
    q, k, v = (torch.randn(*shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=dtype, device=device)

    def step():
        fn(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.parametrize("impl", ["slmfast", "sdpa"])
def test_attention_packed_fwd_bwd(benchmark, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (1, PACKED_HEADS, DOCS * DOC_LEN, PACKED_DIM)
    fn = packed_impls(device, torch.bfloat16)[impl]
    q, k, v = (torch.randn(*shape, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(3))

    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the comparison table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--reps", type=int, default=7, help="timed turns per implementation (medians)")
    args = parser.parse_args()
    run_table(args.device, args.quick, args.reps)


if __name__ == "__main__":
    main()
