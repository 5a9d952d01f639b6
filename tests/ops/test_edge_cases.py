"""Shapes nobody writes by hand, for every op on every backend (and every vector path of the cpu
backend): attention rows whose softmax has exactly one visible key, T = S = 1, rows that see no
key at all, and empty batches. Oracle: the float64 references, with the tolerance rule of
tests/helpers.py; NaN and Inf inputs are in tests/ops/test_nonfinite.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from slmfast import backends
from slmfast.functional import (
    attention,
    cross_entropy,
    distill_loss,
    distill_loss_from_logits,
    geglu,
    glu_linear,
    layer_norm,
    linear_cross_entropy,
    rms_norm,
    rms_norm_linear,
    rotary,
    scaled_dot_product_attention,
    swiglu,
    topk_distill_loss,
)
from slmfast.ops import attention as attention_op
from slmfast.ops import distill_loss as distill_op
from slmfast.ops import layer_norm as layer_norm_op
from slmfast.ops.attention import attention_reference
from slmfast.ops.glu import glu_reference
from tests.helpers import assert_close, backend_params, device_for, glu_derivative_terms

INTERPRETED = backends.triton_interpreting() and not torch.cuda.is_available()
ATTENTION = backend_params(attention_op.IMPLEMENTED)


def _dtypes(backend):
    if backend == "triton" and INTERPRETED:
        return [torch.float32, torch.float16]  # bf16 tl.dot is wrong under the interpreter
    return [torch.float32, torch.bfloat16]


def _attention_params(layouts):
    return [pytest.param(b.values[0], dtype, name, marks=b.marks, id=f"{b.id}-{str(dtype)[6:]}-{name}")
            for b in ATTENTION for dtype in _dtypes(b.values[0]) for name in layouts]


def _attention_inputs(layout, dtype, device):
    """(q, k, v, kwargs) for a dense (B, Hq, Hkv, T, S, D) or packed (q lengths, k lengths, Hq,
    Hkv, D) layout."""
    if layout[0] == "packed":
        _, lq, lk, Hq, Hkv, D, kwargs = layout

        def offsets(lengths):
            return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                device=device)

        q = torch.randn(sum(lq), Hq, D).to(dtype=dtype, device=device)
        k = torch.randn(sum(lk), Hkv, D).to(dtype=dtype, device=device)
        v = torch.randn(sum(lk), Hkv, D).to(dtype=dtype, device=device)
        packed = {"cu_seqlens": offsets(lq), "max_seqlen": max(lq)}
        if lk != lq:
            packed.update(cu_seqlens_k=offsets(lk), max_seqlen_k=max(lk))
        return q, k, v, {**kwargs, **packed}
    B, Hq, Hkv, T, S, D, kwargs = layout
    q = torch.randn(B, Hq, T, D).to(dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, D).to(dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, D).to(dtype=dtype, device=device)
    return q, k, v, kwargs


def _grads(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad((out.double() * grad_out).sum(), leaves, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    return [out.detach(), lse.detach(), *grads]


def _reference(kwargs):
    """attention_reference with slmfast's per-document key offsets (cu_seqlens_k) when given."""
    ref_kwargs = {n: kwargs[n] for n in ("causal", "window", "cu_seqlens", "cu_seqlens_k") if n in kwargs}

    def fn(q, k, v):
        return attention_reference(q, k, v, return_lse=True, **ref_kwargs)
    return fn


def _cancellation_bound(k, v, grad_out, scale):
    """The fp32 residue of dq = scale * P (dP - delta) K (and of dk) where the exact value is 0:
    a row whose softmax has one key has P = 1 and dP = delta exactly, but a FlashAttention-2
    backward computes delta = rowsum(dO * O) and dP = dO . V in fp32 in two summation orders, so
    |dP - delta| <= 2 D eps32 max_i sum_d |dO_id V_jd| (a wrong P, delta or mask gives errors of the
    order of the gradients themselves)."""
    if k.numel() == 0:
        return 0.0
    eps32 = torch.finfo(torch.float32).eps
    D = k.shape[-1]
    dv_l1 = grad_out.abs().sum(-1).max().item() * v.abs().max().item()
    return 2.2 * D * eps32 * dv_l1 * scale * k.abs().max().item()


def _check(backend, q, k, v, kwargs, zero_grads_exact=()):
    """Every output and gradient against the float64 reference; dq and dk where they are exactly
    0 (one visible key) against the cancellation bound. Returns our results and the reference's."""
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    ours = _grads(lambda *t: attention(*t, return_lse=True, backend=backend, **kwargs), q, k, v, grad_out)
    base = _grads(_reference(kwargs), q, k, v, grad_out)
    ref = _grads(lambda *t: _reference(kwargs)(*(x.double() for x in t)), q, k, v, grad_out)
    assert ours[0].dtype == q.dtype and ours[1].dtype == torch.float32
    for t in ours:
        assert not torch.isnan(t).any(), "NaN in an output or a gradient"
    assert_close("out", ours[0], base[0], ref[0])
    empty = ref[1] == float("-inf")
    assert torch.equal(ours[1] == float("-inf"), empty), "lse: -inf rows differ from the reference"
    assert_close("lse", ours[1][~empty], base[1].float()[~empty], ref[1][~empty])
    scale = kwargs.get("scale") or 1 / math.sqrt(q.shape[-1])
    bound = _cancellation_bound(k.double(), v.double(), grad_out, scale)
    for name, a, b, r in zip(("dq", "dk", "dv"), ours[2:], base[2:], ref[2:]):
        if name in zero_grads_exact:
            assert r.abs().max().item() == 0.0 if r.numel() else True
            err = a.double().abs().max().item() if a.numel() else 0.0
            assert err <= bound, f"{name}: {err:.3e} where the exact gradient is 0 (bound {bound:.2e})"
        else:
            assert_close(name, a, b, r)
    return ours, ref


# ---- rows whose softmax has exactly one key; T = S = 1 ------------------------------------------

ONE_KEY = {  # every row sees exactly one key: out = v_j, lse = its score, dq = dk = 0, dv_j = sum dO
    "window0": (2, 4, 2, 33, 33, 40, {"window": (0, 0)}),
    "causal-window0-T<S": (1, 2, 1, 5, 9, 16, {"causal": True, "window": (0, -1)}),
    "T=S=1-causal": (3, 2, 2, 1, 1, 64, {"causal": True}),
    "T=S=1-gqa": (2, 4, 1, 1, 1, 32, {}),
    "packed-length1": ("packed", [1, 1, 1, 1], [1, 1, 1, 1], 2, 1, 32, {"causal": True}),
    "packed-window0": ("packed", [5, 1, 12], [5, 1, 12], 4, 2, 16, {"window": (0, 0)}),
}


@pytest.mark.parametrize("backend,dtype,layout", _attention_params(ONE_KEY))
def test_attention_one_visible_key(backend, dtype, layout):
    q, k, v, kwargs = _attention_inputs(ONE_KEY[layout], dtype, device_for(backend))
    ours, ref = _check(backend, q, k, v, kwargs, zero_grads_exact=("dq", "dk"))
    # P = 1 exactly: out is the visible value row itself (up to the output's rounding)
    err = (ours[0].double() - ref[0]).abs().max().item()
    assert err <= torch.finfo(dtype).eps * ref[0].abs().max().item()


# ---- rows that see no key -------------------------------------------------------------------------

FULLY_MASKED = {
    "causal-T>S": (1, 2, 1, 12, 5, 16, {"causal": True}),               # rows 0..6 see nothing
    "window-outside": (1, 2, 2, 10, 4, 32, {"window": (0, 0)}),         # rows 0..5 nothing, 6..9 one key
    "left-window-T>S": (2, 4, 2, 20, 6, 16, {"causal": True, "window": (2, -1)}),
    "no-keys": (2, 2, 1, 7, 0, 16, {}),                                  # S = 0
    "packed-doc-without-keys": ("packed", [3, 4, 2], [5, 0, 3], 2, 2, 16, {}),
}


@pytest.mark.parametrize("backend,dtype,layout", _attention_params(FULLY_MASKED))
def test_attention_fully_masked_rows(backend, dtype, layout):
    """Rows that see no key: out exactly 0, lse exactly -inf, dq exactly 0, never NaN; the other
    rows as the reference (dq/dk of the one-key rows of window-outside cancel to ~0)."""
    q, k, v, kwargs = _attention_inputs(FULLY_MASKED[layout], dtype, device_for(backend))
    one_key = ("dq", "dk") if layout == "window-outside" else ()
    ours, ref = _check(backend, q, k, v, kwargs, zero_grads_exact=one_key)
    empty = ref[1] == float("-inf")  # (B, H, T) or (N, H)
    assert empty.any()
    out, lse, dq = ours[0], ours[1], ours[2]
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))
    assert torch.isneginf(lse[empty]).all()


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.values[0] != "cuda"])
def test_sdpa_one_query_one_key(backend, monkeypatch):
    monkeypatch.setenv(backends.ENV_BACKEND, backend)
    q, k, v = (torch.randn(2, 3, 1, 16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    expected = sdpa(q.double(), k.double(), v.double(), is_causal=True)
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close("out", out, sdpa(q, k, v, is_causal=True), expected)


# ---- empty batches -------------------------------------------------------------------------------

def _empty_cases():
    """op name -> (implemented backends, fn(backend, device) -> (outputs, leaves))."""
    def leaf(*shape, device, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    def norm(kind, residual):
        def run(backend, device):
            x, w, b = leaf(0, 3, 40, device=device), leaf(40, device=device), leaf(40, device=device)
            r = leaf(0, 3, 40, device=device) if residual else None
            if kind == "rms":
                out = rms_norm(x, w, 1e-6, r, backend=backend)
            else:
                out = layer_norm(x, w, b, 1e-5, r, backend=backend)
            leaves = [x, w] + ([b] if kind == "layer" else []) + ([r] if residual else [])
            return (out if residual else (out,)), leaves
        return run

    def glu(fn):
        def run(backend, device):
            g, u = leaf(0, 64, device=device), leaf(0, 64, device=device)
            return (fn(g, u, backend=backend),), [g, u]
        return run

    def rot(shape_q, shape_k, cos_rows):
        def run(backend, device):
            q, k = leaf(*shape_q, device=device), leaf(*shape_k, device=device)
            cos, sin = torch.randn(cos_rows, 16, device=device), torch.randn(cos_rows, 16, device=device)
            return rotary(q, k, cos, sin, backend=backend), [q, k]
        return run

    def ce(reduction):
        def run(backend, device):
            z = leaf(0, 50, device=device)
            return (cross_entropy(z, torch.zeros(0, dtype=torch.long, device=device), reduction=reduction,
                                  backend=backend),), [z]
        return run

    def lce(reduction):
        def run(backend, device):
            h, w, b = leaf(0, 16, device=device), leaf(30, 16, device=device), leaf(30, device=device)
            t = torch.zeros(0, dtype=torch.long, device=device)
            return (linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend),), [h, w, b]
        return run

    def distill_logits(backend, device):
        s, t = leaf(0, 50, device=device), torch.randn(0, 50, device=device)
        return (distill_loss_from_logits(s, t, kind="jsd", backend=backend),), [s]

    def distill_hidden(backend, device):
        sh, sw = leaf(0, 16, device=device), leaf(30, 16, device=device)
        th, tw = torch.randn(0, 24, device=device), torch.randn(30, 24, device=device)
        return (distill_loss(sh, sw, th, tw, kind="reverse_kl", backend=backend),), [sh, sw]

    def topk(backend, device):
        sh, sw = leaf(0, 16, device=device), leaf(30, 16, device=device)
        ids = torch.zeros(0, 4, dtype=torch.long, device=device)
        return (topk_distill_loss(sh, sw, ids, torch.zeros(0, 4, device=device), backend=backend),), [sh, sw]

    def norm_linear(backend, device):
        x, nw, w = leaf(0, 32, device=device), leaf(32, device=device), leaf(8, 32, device=device)
        return rms_norm_linear(x, nw, [w], backend=backend), [x, nw, w]

    def glu_lin(backend, device):
        g, u, w = leaf(0, 32, device=device), leaf(0, 32, device=device), leaf(8, 32, device=device)
        return (glu_linear(g, u, w, backend=backend),), [g, u, w]

    def attn(q_shape, kv_shape, **kwargs):
        def run(backend, device):
            q = leaf(*q_shape, device=device)
            k, v = leaf(*kv_shape, device=device), leaf(*kv_shape, device=device)
            return attention(q, k, v, return_lse=True, backend=backend, **kwargs), [q, k, v]
        return run

    def attn_packed(cu):
        def run(backend, device):
            q, k, v = (leaf(0, 4, 16, device=device) for _ in range(3))
            offsets = torch.tensor(cu, dtype=torch.int32, device=device)
            out = attention(q, k, v, cu_seqlens=offsets, causal=True, return_lse=True, backend=backend)
            return out, [q, k, v]
        return run

    def sdpa(backend, device):
        q, k, v = (leaf(2, 4, 0, 16, device=device) for _ in range(3))
        return (scaled_dot_product_attention(q, k, v, is_causal=True),), [q, k, v]

    every = ("torch", "cpu", "triton", "cuda")
    return {
        "rms_norm": (every, norm("rms", False)), "rms_norm-residual": (every, norm("rms", True)),
        "layer_norm": (layer_norm_op.IMPLEMENTED, norm("layer", False)),
        "layer_norm-residual": (layer_norm_op.IMPLEMENTED, norm("layer", True)),
        "swiglu": (every, glu(swiglu)), "geglu": (every, glu(geglu)),
        "rotary-B0": (every, rot((0, 2, 5, 32), (0, 1, 5, 32), 5)),
        "rotary-T0": (every, rot((2, 2, 0, 32), (2, 1, 0, 32), 0)),
        "rotary-packed-N0": (every, rot((0, 2, 32), (0, 1, 32), 0)),
        "cross_entropy-mean": (every, ce("mean")), "cross_entropy-sum": (every, ce("sum")),
        "cross_entropy-none": (every, ce("none")),
        "linear_cross_entropy-mean": (every, lce("mean")), "linear_cross_entropy-none": (every, lce("none")),
        "distill_from_logits": (distill_op.IMPLEMENTED, distill_logits),
        "distill_loss": (distill_op.IMPLEMENTED, distill_hidden),
        "topk_distill_loss": (distill_op.IMPLEMENTED_TOPK, topk),
        "rms_norm_linear": (every, norm_linear), "glu_linear": (every, glu_lin),
        "attention-B0": (attention_op.IMPLEMENTED, attn((0, 4, 8, 16), (0, 2, 8, 16), causal=True)),
        "attention-T0": (attention_op.IMPLEMENTED, attn((2, 4, 0, 16), (2, 2, 9, 16))),
        "attention-T0-S0": (attention_op.IMPLEMENTED, attn((2, 4, 0, 16), (2, 2, 0, 16), causal=True)),
        "attention-packed-no-docs": (attention_op.IMPLEMENTED, attn_packed([0])),
        "attention-packed-empty-docs": (attention_op.IMPLEMENTED, attn_packed([0, 0, 0])),
        "sdpa-L0": (attention_op.IMPLEMENTED, sdpa),
    }


EMPTY = _empty_cases()


def _empty_params():
    return [pytest.param(name, b.values[0], marks=b.marks, id=f"{name}-{b.id}")
            for name, (implemented, _) in EMPTY.items() for b in backend_params(implemented)]


@pytest.mark.parametrize("op,backend", _empty_params())
def test_empty_batch(op, backend, monkeypatch):
    """No rows at all: outputs of the right (empty) shapes, a reduced loss of 0 (an empty mean is
    0, as an all-ignored batch), gradients of zeros with the inputs' shapes, and no NaN."""
    monkeypatch.setenv(backends.ENV_BACKEND, backend)  # for scaled_dot_product_attention
    outputs, leaves = EMPTY[op][1](backend, device_for(backend))
    total = 0.0
    for out in outputs:
        assert not torch.isnan(out).any(), f"{op}: NaN in an output of shape {tuple(out.shape)}"
        if out.dim() == 0:
            assert out.item() == 0.0, f"{op}: the loss of an empty batch is {out.item()}, not 0"
        if out.requires_grad:
            total = total + out.double().sum()
    if isinstance(total, torch.Tensor):
        total.backward()
    for t in leaves:
        grad = t.grad if t.grad is not None else torch.zeros_like(t)
        assert grad.shape == t.shape
        assert torch.equal(grad, torch.zeros_like(t)), f"{op}: non-zero gradient for an empty batch"


# ---- gated units in the activations' tails, element by element -----------------------------------

GLU = {"swiglu": (swiglu, "silu"), "geglu_tanh": (lambda g, u, **kw: geglu(g, u, "tanh", **kw), "gelu_tanh"),
       "geglu_erf": (lambda g, u, **kw: geglu(g, u, "none", **kw), "gelu")}


def _glu_params():
    params = []
    for b in backend_params(("torch", "cpu", "triton", "cuda")):
        for dtype in _dtypes(b.values[0]):
            for variant in GLU:
                params.append(pytest.param(b.values[0], dtype, variant, marks=b.marks,
                                           id=f"{b.id}-{str(dtype)[6:]}-{variant}"))
    return params


@pytest.mark.parametrize("backend,dtype,variant", _glu_params())
def test_glu_negative_tail(backend, dtype, variant):
    """Gates from -7 to -2 only, where silu and gelu are small (down to 1e-11) and so is the
    output's scale: nothing larger hides an error there. The floor is the rounding of the terms
    the formulas cancel (1 + tanh z with tanh z near -1 in the forward, 1 - tanh^2 in dgate),
    as in test_glu.py: |gate up| for out, |dout up| act-derivative terms for dgate."""
    fn, activation = GLU[variant]
    device = device_for(backend)
    gate = torch.linspace(-7, -2, 1001).to(dtype=dtype, device=device)
    up = (torch.rand(1001) + 0.5).to(dtype=dtype, device=device)
    grad = torch.randn(1001, dtype=torch.float64, device=device)

    def run(f, g, u):
        g, u = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
        out = f(g, u)
        return (out, *torch.autograd.grad((out.double() * grad).sum(), (g, u)))

    ours = run(lambda g, u: fn(g, u, backend=backend), gate, up)
    base = run(lambda g, u: glu_reference(g, u, activation), gate, up)
    ref = run(lambda g, u: glu_reference(g.double(), u.double(), activation), gate, up)
    g64, u64, d64 = gate.double().abs(), up.double().abs(), grad.abs()
    terms = {"out": (g64 * u64).max().item(), "dup": (d64 * g64).max().item(),
             "dgate": (d64 * u64 * glu_derivative_terms(gate, activation)).max().item()}
    for name, a, b, r in zip(("out", "dgate", "dup"), ours, base, ref):
        assert_close(name, a, b, r, terms=terms[name])
