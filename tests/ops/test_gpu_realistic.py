"""Every op's GPU paths at the sizes a training run uses, and at odd ones, against fp64 (gpu only).

The per-op test files check every backend on small shapes (they must run on a 2-core CPU, the
Triton kernels under the interpreter). This file is what `pytest -m gpu` adds on a GPU machine
(benchmarks/gpu_check.sh): for each op its cuda and triton kernels, and torch's own path where the
GPU dispatch table can choose it ("native": SDPA / varlen_attn, F.rms_norm, F.layer_norm), at
Llama-like sizes (hidden 2048-4096, 8-16k tokens, vocabularies of 32-128k, T = 4096 attention)
and at odd ones (rows and widths that are no power of two, fp16, fp32). Outputs and the gradients
of every floating input follow the tolerance rule (docs/architecture.md §5): err(ours, fp64) <= 2
err(torch in the same dtype, fp64) + a floor, the fp64 reference computed on the GPU from fp64
copies of the inputs.

Every test is marked gpu: without CUDA they are skipped (tests/conftest.py). The check_* functions
take the device, so the same code can be exercised on the CPU with tiny sizes (Triton interpreter).
"""

from __future__ import annotations

import pytest
import torch

from slmfast import backends
from slmfast.functional import (
    attention,
    cross_entropy,
    distill_loss,
    glu_linear,
    layer_norm,
    linear_cross_entropy,
    rms_norm,
    rms_norm_linear,
    rotary,
    swiglu,
)
from slmfast.ops import attention as attention_op
from slmfast.ops import distill_loss as distill_op
from slmfast.ops import glu as glu_op
from slmfast.ops import layer_norm as layer_norm_op
from slmfast.ops.attention import attention_native, attention_reference
from slmfast.ops.cross_entropy import cross_entropy_reference
from slmfast.ops.distill_loss import distill_loss_reference
from slmfast.ops.glu import glu_reference
from slmfast.ops.glu_linear import glu_linear_reference
from slmfast.ops.layer_norm import layer_norm_native, layer_norm_reference
from slmfast.ops.linear_cross_entropy import linear_cross_entropy_reference
from slmfast.ops.norm_linear import rms_norm_linear_reference
from slmfast.ops.rms_norm import rms_norm_native, rms_norm_reference
from slmfast.ops.rotary import rotary_reference
from tests.helpers import assert_close

pytestmark = pytest.mark.gpu
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# The fp64 references of the largest cases take 10-25 GB each: under pytest-xdist
# (--dist loadgroup) each group runs on one worker, so at most three run at once.
BIG_LAYERS = pytest.mark.xdist_group("gpu-realistic-layers")
BIG_LOSSES = pytest.mark.xdist_group("gpu-realistic-losses")
BIG_ATTENTION = pytest.mark.xdist_group("gpu-realistic-attention")


@pytest.fixture(autouse=True)
def _default_triton_attention_configs(monkeypatch):
    """The Triton attention's first config, without autotuning (which compiles every config of
    its list: minutes on a test run); tests/ops/test_attention_triton.py covers the tuned path."""
    monkeypatch.setenv("SLMFAST_TRITON_AUTOTUNE", "0")


def _params(implemented, native: bool = False) -> list:
    """cuda / triton (where the op has them) and native, each skipped where it cannot run."""
    params = []
    for name in ("cuda", "triton"):
        if name in implemented:
            state = backends.status(name)
            marks = [] if state.available else [pytest.mark.skip(reason=f"{name}: {state.reason}")]
            params.append(pytest.param(name, marks=marks, id=name))
    if native:
        params.append(pytest.param("native", id="native"))
    return params


# ---- the comparison --------------------------------------------------------------------------

def _run(fn, inputs, cotangents=None):
    """fn(*leaves) for fresh leaves copied from `inputs`, and the gradients of
    sum(out_i . cotangent_i) (in fp64) w.r.t. every leaf; cotangents are drawn when not given."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if cotangents is None:
        cotangents = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads), cotangents


def compare(ours, same_dtype, fp64, inputs, names=None, floor_ulps: float = 2.0):
    """ours and same_dtype on `inputs`, fp64 on their fp64 copies: outputs and input gradients
    within the tolerance rule. Each fn takes the float inputs positionally."""
    outs, grads, cot = _run(ours, inputs)
    base_outs, base_grads, _ = _run(same_dtype, inputs, cot)
    ref_outs, ref_grads, _ = _run(fp64, [t.double() for t in inputs], cot)
    names = names or [f"input{i}" for i in range(len(inputs))]
    for i, (a, b, r) in enumerate(zip(outs, base_outs, ref_outs)):
        assert a.dtype == b.dtype, f"output {i}: dtype {a.dtype}, torch gives {b.dtype}"
        assert_close(f"output {i}", a, b, r, floor_ulps)
    for name, a, b, r in zip(names, grads, base_grads, ref_grads):
        assert_close(f"d{name}", a, b, r, floor_ulps)
    del ref_outs, ref_grads
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


# ---- norms -----------------------------------------------------------------------------------

NORM_CASES = {
    # name: (shape, dtype, residual, weight dtype)
    "llama-8x2048x4096-bf16-residual": ((8, 2048, 4096), BF16, True, BF16),
    "fp32-weights-4x1031x5120-bf16": ((4, 1031, 5120), BF16, True, FP32),
    "odd-3x777x2560-fp16": ((3, 777, 2560), FP16, False, FP16),
    "16384x1536-fp32": ((16384, 1536), FP32, True, FP32),
    "one-long-row-65536-bf16": ((2, 65536), BF16, False, BF16),
}


def _norm_inputs(shape, dtype, residual, weight_dtype, device, bias=False):
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (torch.rand(shape[-1], device=device) + 0.5).to(weight_dtype)
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    b = torch.randn(shape[-1], device=device).to(weight_dtype) if bias else None
    return x, w, r, b


def check_rms_norm(backend, device, shape, dtype, residual, weight_dtype, offset=0.0):
    x, w, r, _ = _norm_inputs(shape, dtype, residual, weight_dtype, device)
    inputs, names = ([x, w, r], ["x", "weight", "residual"]) if residual else ([x, w], ["x", "weight"])

    def ours(*t):
        if backend == "native":
            return rms_norm_native(t[0], t[1], 1e-6, t[2] if residual else None, offset)
        return rms_norm(t[0], t[1], 1e-6, t[2] if residual else None, offset, backend=backend)

    def ref(*t):
        return rms_norm_reference(t[0], t[1], 1e-6, t[2] if residual else None, offset)

    compare(ours, ref, ref, inputs, names)


@BIG_LAYERS
@pytest.mark.parametrize("backend", _params(("cuda", "triton"), native=True))
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_rms_norm(backend, case):
    check_rms_norm(backend, "cuda", *NORM_CASES[case], offset=1.0 if "odd" in case else 0.0)


def check_layer_norm(backend, device, shape, dtype, residual, weight_dtype):
    x, w, r, b = _norm_inputs(shape, dtype, residual, weight_dtype, device, bias=True)
    inputs = [x, w, b] + ([r] if residual else [])

    def ours(*t):
        res = t[3] if residual else None
        if backend == "native":
            return layer_norm_native(t[0], t[1], t[2], 1e-5, res)
        return layer_norm(t[0], t[1], t[2], 1e-5, res, backend=backend)

    def ref(*t):
        return layer_norm_reference(t[0], t[1], t[2], 1e-5, t[3] if residual else None)

    compare(ours, ref, ref, inputs, ["x", "weight", "bias", "residual"])


@BIG_LAYERS
@pytest.mark.parametrize("backend", _params(layer_norm_op.IMPLEMENTED, native=True))
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_layer_norm(backend, case):
    check_layer_norm(backend, "cuda", *NORM_CASES[case])


# ---- gated MLP products ----------------------------------------------------------------------

GLU_CASES = {
    # name: (shape, dtype, activation)
    "llama-8x2048x11008-bf16-silu": ((8, 2048, 11008), BF16, "silu"),
    "gemma-4x1031x16384-bf16-gelu_tanh": ((4, 1031, 16384), BF16, "gelu_tanh"),
    "odd-3x777x5461-fp16-silu": ((3, 777, 5461), FP16, "silu"),
    "fp32-4096x2816-gelu": ((4096, 2816), FP32, "gelu"),
}


def check_glu(backend, device, shape, dtype, activation):
    gate = torch.randn(shape, device=device).mul(3).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)

    def ours(g, u):
        if activation == "silu":
            return swiglu(g, u, backend=backend)
        return glu_op.glu(g, u, activation, backend=backend, op="geglu")

    def ref(g, u):
        return glu_reference(g, u, activation)

    compare(ours, ref, ref, [gate, up], ["gate", "up"])


@BIG_LAYERS
@pytest.mark.parametrize("backend", _params(glu_op.IMPLEMENTED))
@pytest.mark.parametrize("case", list(GLU_CASES))
def test_swiglu_geglu(backend, case):
    check_glu(backend, "cuda", *GLU_CASES[case])


def check_glu_linear(backend, device, tokens, inter, out, dtype, activation):
    gate = torch.randn(tokens, inter, device=device).mul(2).to(dtype)
    up = torch.randn(tokens, inter, device=device).to(dtype)
    w = (torch.randn(out, inter, device=device) / inter ** 0.5).to(dtype)

    def ours(g, u, w_):
        return glu_linear(g, u, w_, activation=activation, backend=backend)

    def ref(g, u, w_):
        return glu_linear_reference(g, u, w_, activation=activation)

    compare(ours, ref, ref, [gate, up, w], ["gate", "up", "weight"])


@BIG_LAYERS
@pytest.mark.parametrize("backend", _params(glu_op.IMPLEMENTED))
@pytest.mark.parametrize("case", [(8192, 5632, 2048, BF16, "silu"), (1031, 2730, 1000, FP16, "gelu_tanh")],
                         ids=["llama-8192x5632->2048-bf16", "odd-1031x2730->1000-fp16"])
def test_glu_linear(backend, case):
    check_glu_linear(backend, "cuda", *case)


def check_rms_norm_linear(backend, device, tokens, hidden, outs, dtype):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    r = torch.randn(tokens, hidden, device=device).to(dtype)
    nw = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    ws = [(torch.randn(o, hidden, device=device) / hidden ** 0.5).to(dtype) for o in outs]

    def ours(x_, r_, nw_, *ws_):
        return rms_norm_linear(x_, nw_, list(ws_), residual=r_, backend=backend)

    def ref(x_, r_, nw_, *ws_):
        return rms_norm_linear_reference(x_, nw_, list(ws_), residual=r_)

    names = ["x", "residual", "norm_weight"] + [f"w{i}" for i in range(len(ws))]
    compare(ours, ref, ref, [x, r, nw, *ws], names)


@BIG_LAYERS
@pytest.mark.parametrize("backend", _params(("cuda", "triton")))
@pytest.mark.parametrize("case", [(8192, 2048, (2048, 512, 512), BF16), (777, 1000, (1000, 250), FP16)],
                         ids=["qkv-8192x2048-gqa-bf16", "odd-777x1000-fp16"])
def test_rms_norm_linear(backend, case):
    check_rms_norm_linear(backend, "cuda", *case)


# ---- rotary ----------------------------------------------------------------------------------

def _angles(positions, rot, dtype):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float64, device=positions.device) / rot)
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


ROTARY_CASES = {
    # name: (B, Hq, Hkv, T, D, R, dtype, interleaved, packed)
    "llama-4x32x8x4096xD128-bf16": (4, 32, 8, 4096, 128, 128, BF16, False, False),
    "partial-2x12x4x1031xD80R64-fp16-interleaved": (2, 12, 4, 1031, 80, 64, FP16, True, False),
    "packed-16384x16x4xD64-bf16": (1, 16, 4, 16384, 64, 64, BF16, False, True),
    "fp32-2x8x8x513xD96": (2, 8, 8, 513, 96, 96, FP32, False, False),
}


def check_rotary(backend, device, b, hq, hkv, t, d, rot, dtype, interleaved, packed):
    if packed:
        q = torch.randn(t, hq, d, device=device).to(dtype)
        k = torch.randn(t, hkv, d, device=device).to(dtype)
        positions = torch.arange(t, device=device) % 1500  # documents of 1500 tokens
    else:
        q = torch.randn(b, t, hq, d, device=device).to(dtype).transpose(1, 2)  # strided, like a projection
        k = torch.randn(b, hkv, t, d, device=device).to(dtype)
        positions = torch.arange(t, device=device)
    cos, sin = _angles(positions, rot, FP32)

    def ours(q_, k_):
        return rotary(q_, k_, cos, sin, interleaved, backend=backend)

    def ref(q_, k_):
        c, s = (cos, sin) if q_.dtype != torch.float64 else (cos.double(), sin.double())
        return rotary_reference(q_, k_, c, s, interleaved)

    compare(ours, ref, ref, [q, k], ["q", "k"])


@BIG_LAYERS
@pytest.mark.parametrize("backend", _params(("cuda", "triton")))
@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_rotary(backend, case):
    check_rotary(backend, "cuda", *ROTARY_CASES[case])


# ---- losses ----------------------------------------------------------------------------------

CE_CASES = {
    # name: (rows, vocab, dtype, options)
    "8192x32768-bf16": (8192, 32768, BF16, {}),
    "llama3-4096x128256-bf16-smooth-zloss": (4096, 128256, BF16, {"label_smoothing": 0.1, "z_loss": 1e-4}),
    "odd-1031x50257-fp16-sum": (1031, 50257, FP16, {"reduction": "sum"}),
    "fp32-777x151936": (777, 151936, FP32, {}),
}


def check_cross_entropy(backend, device, rows, vocab, dtype, options):
    logits = (torch.randn(rows, vocab, device=device) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device)
    target[::7] = -100

    def ours(z):
        return cross_entropy(z, target, backend=backend, **options)

    def ref(z):
        return cross_entropy_reference(z, target, **options)

    compare(ours, ref, ref, [logits], ["logits"])


@BIG_LOSSES
@pytest.mark.parametrize("backend", _params(("cuda", "triton")))
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy(backend, case):
    check_cross_entropy(backend, "cuda", *CE_CASES[case])


LCE_CASES = {
    # name: (tokens, hidden, vocab, dtype, options)
    "8192x2048x32768-bf16": (8192, 2048, 32768, BF16, {}),
    "llama3-4096x2048x128256-bf16": (4096, 2048, 128256, BF16, {}),
    "gemma-odd-1031x1000x50257-fp16-softcap-smooth": (1031, 1000, 50257, FP16,
                                                      {"softcap": 30.0, "label_smoothing": 0.1}),
    "fp32-2048x768x32000-none": (2048, 768, 32000, FP32, {"reduction": "none"}),
}


def check_linear_cross_entropy(backend, device, tokens, hidden, vocab, dtype, options):
    h = torch.randn(tokens, hidden, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, device=device) * 2 / hidden ** 0.5).to(dtype)
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[::5] = -100

    def ours(h_, w_):
        return linear_cross_entropy(h_, w_, target, backend=backend, **options)

    def ref(h_, w_):
        return linear_cross_entropy_reference(h_, w_, target, **options)

    compare(ours, ref, ref, [h, w], ["hidden", "weight"])


@BIG_LOSSES
@pytest.mark.parametrize("backend", _params(("cuda", "triton")))
@pytest.mark.parametrize("case", list(LCE_CASES))
def test_linear_cross_entropy(backend, case):
    check_linear_cross_entropy(backend, "cuda", *LCE_CASES[case])


DISTILL_CASES = {
    # name: (tokens, student hidden, teacher hidden, student vocab, teacher vocab, dtype, options)
    "4096x1024<-2048x32768-bf16-kl-T2-hard": (4096, 1024, 2048, 32768, 32768, BF16,
                                              {"temperature": 2.0, "hard_weight": 0.5}),
    "qwen-padded-2048x896<-1536x151936-bf16-jsd": (2048, 896, 1536, 151936, 152064, BF16,
                                                   {"kind": "jsd", "beta": 0.3}),
    "odd-1031x768<-768x50257-fp16-reverse": (1031, 768, 768, 50257, 50257, FP16, {"kind": "reverse_kl"}),
    "fp32-777x512<-1024x32000-tvd": (777, 512, 1024, 32000, 32000, FP32, {"kind": "tvd"}),
}


def check_distill_loss(backend, device, tokens, hs, ht, vs, vt, dtype, options):
    sh = torch.randn(tokens, hs, device=device).to(dtype)
    sw = (torch.randn(vs, hs, device=device) * 2 / hs ** 0.5).to(dtype)
    th = torch.randn(tokens, ht, device=device).to(dtype)
    tw = (torch.randn(vt, ht, device=device) * 2 / ht ** 0.5).to(dtype)
    target = torch.randint(0, min(vs, vt), (tokens,), device=device)
    target[::6] = -100

    def ours(h, w):
        return distill_loss(h, w, th, tw, target, backend=backend, **options)

    def ref(h, w):
        t_h, t_w = (th, tw) if h.dtype != torch.float64 else (th.double(), tw.double())
        return distill_loss_reference(h, w, t_h, t_w, target, **options)

    compare(ours, ref, ref, [sh, sw], ["student_hidden", "student_weight"])


@BIG_LOSSES
@pytest.mark.parametrize("backend", _params(distill_op.IMPLEMENTED))
@pytest.mark.parametrize("case", list(DISTILL_CASES))
def test_distill_loss(backend, case):
    check_distill_loss(backend, "cuda", *DISTILL_CASES[case])


# ---- attention -------------------------------------------------------------------------------

ATTENTION_CASES = {
    # name: (B, Hq, Hkv, T, S, D, causal, window, dtype)
    "1x16x4096xD128-causal-bf16": (1, 16, 16, 4096, 4096, 128, True, None, BF16),
    "1x16x4096xD64-full-bf16": (1, 16, 16, 4096, 4096, 64, False, None, BF16),
    "gqa-2x16x4x2048xD128-causal-fp16": (2, 16, 4, 2048, 2048, 128, True, None, FP16),
    "window-2x8x2x2048xD64-left512-bf16": (2, 8, 2, 2048, 2048, 64, True, (512, -1), BF16),
    "odd-3x6x2x1031xD80-full-bf16": (3, 6, 2, 1031, 1031, 80, False, None, BF16),
    "T>S-2x4x4x1100x700xD64-causal-fp16": (2, 4, 4, 1100, 700, 64, True, None, FP16),
}


def check_attention(backend, device, b, hq, hkv, t, s, d, causal, window, dtype):
    q = torch.randn(b, hq, t, d, device=device).to(dtype)
    k = torch.randn(b, hkv, s, d, device=device).to(dtype)
    v = torch.randn(b, hkv, s, d, device=device).to(dtype)
    scale = d ** -0.5
    left, right = window or (-1, -1)
    if backend == "native" and attention_native(q, k, v, causal, scale, left, right) is None:
        pytest.skip("torch's own attention does not take this call (the op runs a slmfast kernel)")

    def ours(q_, k_, v_):
        if backend == "native":
            return attention_native(q_, k_, v_, causal, scale, left, right)
        return attention(q_, k_, v_, causal=causal, scale=scale, window=window, backend=backend)

    def ref(q_, k_, v_):
        return attention_reference(q_, k_, v_, causal=causal, scale=scale, window=window)

    compare(ours, ref, ref, [q, k, v], ["q", "k", "v"])


@BIG_ATTENTION
@pytest.mark.parametrize("backend", _params(attention_op.IMPLEMENTED, native=True))
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention(backend, case):
    check_attention(backend, "cuda", *ATTENTION_CASES[case])


def check_attention_packed(backend, device, lengths, hq, hkv, d, causal, window, dtype):
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    n = int(cu[-1])
    q = torch.randn(n, hq, d, device=device).to(dtype)
    k = torch.randn(n, hkv, d, device=device).to(dtype)
    v = torch.randn(n, hkv, d, device=device).to(dtype)
    scale = d ** -0.5
    left, right = window or (-1, -1)
    longest = max(lengths)
    if backend == "native" and attention_native(q, k, v, causal, scale, left, right, cu, None, longest,
                                                longest) is None:
        pytest.skip("torch's own attention does not take this call (the op runs a slmfast kernel)")

    def ours(q_, k_, v_):
        if backend == "native":
            return attention_native(q_, k_, v_, causal, scale, left, right, cu, None, longest, longest)
        return attention(q_, k_, v_, causal=causal, scale=scale, window=window, cu_seqlens=cu,
                         max_seqlen=longest, backend=backend)

    def ref(q_, k_, v_):
        return attention_reference(q_, k_, v_, causal=causal, scale=scale, window=window, cu_seqlens=cu)

    compare(ours, ref, ref, [q, k, v], ["q", "k", "v"])


PACKED_CASES = {
    # name: (document lengths, Hq, Hkv, D, causal, window, dtype)
    "16-docs-of-1024xD128-causal-bf16": ([1024] * 16, 16, 4, 128, True, None, BF16),
    "unequal-docs-xD64-causal-fp16": ([1, 700, 1, 1500, 333, 1029, 0, 512, 20], 8, 2, 64, True, None, FP16),
    "docs-window-256-xD128-bf16": ([2048, 1000, 3000], 8, 8, 128, True, (256, -1), BF16),
}


@BIG_ATTENTION
@pytest.mark.parametrize("backend", _params(attention_op.IMPLEMENTED, native=True))
@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_attention_packed(backend, case):
    check_attention_packed(backend, "cuda", *PACKED_CASES[case])
