"""glu_linear (the down projection of a gated MLP whose product is recomputed in backward) on every
backend of the glu ops, against the float64 reference; exact saved bytes."""

import pytest
import torch

from slmfast import backends
from slmfast.functional import glu_linear
from slmfast.ops.glu import IMPLEMENTED
from slmfast.ops.glu_linear import glu_linear_reference
from tests.helpers import (
    assert_close,
    backend_params,
    cpu_capability_params,
    device_for,
    glu_derivative_terms,
    saved_tensor_bytes,
)

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params(IMPLEMENTED)
KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "torch"]
CPU = pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")


def _inputs(shape, out, dtype, device, bias):
    gate = torch.randn(shape, dtype=dtype, device=device) * 2
    up = torch.randn(shape, dtype=dtype, device=device)
    w = (torch.randn(out, shape[-1], device=device) / shape[-1] ** 0.5).to(dtype)
    b = torch.randn(out, device=device).to(dtype) if bias else None
    return gate, up, w, b


def _run(fn, tensors, grad, cast=None):
    leaves = [t.detach().clone().to(cast or t.dtype).requires_grad_() if t is not None else None
              for t in tensors]
    out = fn(*leaves)
    (out.double() * grad).sum().backward()
    return [out] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_fp64_reference(backend, dtype, activation, bias):
    device = device_for(backend)
    tensors = _inputs((3, 17, 88), 40, dtype, device, bias)
    grad = torch.randn(3, 17, 40, dtype=torch.float64, device=device)
    got = _run(lambda g, u, w, b: glu_linear(g, u, w, b, activation, backend=backend), tensors, grad)
    base = _run(lambda g, u, w, b: glu_linear_reference(g, u, w, b, activation), tensors, grad)
    ref = _run(lambda g, u, w, b: glu_linear_reference(g, u, w, b, activation), tensors, grad, torch.float64)
    terms = _terms(tensors, grad, activation)
    for name, a, b, c in zip(["out", "dgate", "dup", "dweight", "dbias"], got, base, ref):
        assert a.dtype == b.dtype, name
        assert_close(name, a, b, c, terms=terms[name][0], reduction=terms[name][1])


def _terms(tensors, grad, activation):
    """(largest sum of |terms|, number of terms) per output (assert_close's `terms`): the GEMMs'
    |a| |W|^T, |dout| |W| and |dout|^T |a|, with the activation's own cancelling terms (|gate up|
    for a = act(gate) up, helpers.glu_derivative_terms for dgate). Without them gelu_tanh in
    float32 failed 2 ulps of the result on some draws (triton dgate 3.3e-6 > 2 x 9.3e-7 + 1.3e-6)."""
    gate, up, w = (t.detach().double().abs() for t in tensors[:3])
    g = grad.abs()
    a = gate * up                                                   # (..., I) the product's terms
    da = g @ w                                                      # (..., I) dout W
    rows = grad.numel() // grad.shape[-1]
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    return {"out": ((a @ w.t()).max().item(), w.shape[1]),
            "dgate": ((da * up * glu_derivative_terms(tensors[0], activation)).max().item(), w.shape[0]),
            "dup": ((da * gate).max().item(), w.shape[0]),
            "dweight": ((flat(g).t() @ flat(a)).max().item(), rows),
            "dbias": (flat(g).sum(0).max().item(), rows)}


@CPU
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(capability):
    tensors = [t.requires_grad_() for t in _inputs((2, 3, 6), 5, torch.float64, "cpu", True)]
    assert torch.autograd.gradcheck(lambda g, u, w, b: glu_linear(g, u, w, b, "silu", backend="cpu"),
                                    tuple(tensors))


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_bytes_are_gate_and_up(backend):
    """Exactly gate + up + the weight: neither silu(gate) nor the product is stored."""
    device = device_for(backend)
    gate, up, w, _ = (t.requires_grad_() if t is not None else None
                      for t in _inputs((4, 5, 96), 32, torch.bfloat16, device, False))
    saved, _ = saved_tensor_bytes(glu_linear, gate, up, w, backend=backend)
    assert saved == 2 * 20 * 96 * 2 + 32 * 96 * 2
    def eager_mlp_down(g, u, w_):
        return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w_)

    eager, _ = saved_tensor_bytes(eager_mlp_down, gate, up, w)
    assert eager == 4 * 20 * 96 * 2 + 32 * 96 * 2  # gate, silu(gate), up, the product


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_fullgraph(backend):
    gate, up, w, b = _inputs((2, 7, 48), 16, torch.float32, device_for(backend), True)

    def block(g, u, w_, b_):
        return glu_linear(g, u, w_, b_, backend=backend).pow(2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (gate, up, w, b)]
    compiled(*leaves).backward()
    eager_leaves = [t.clone().requires_grad_() for t in (gate, up, w, b)]
    block(*eager_leaves).backward()
    for a, c in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, c.grad)


@CPU
def test_autocast_matches_eager_autocast():
    tensors = _inputs((2, 9, 64), 32, torch.float32, "cpu", True)
    grad = torch.randn(2, 9, 32, dtype=torch.float64)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)
        return run

    # gate/up arrive in bf16 under autocast (outputs of autocast linears); weight and bias fp32
    tensors = [tensors[0].bfloat16(), tensors[1].bfloat16(), tensors[2], tensors[3]]
    got = _run(under_autocast(lambda g, u, w, b: glu_linear(g, u, w, b, backend="cpu")), tensors, grad)
    base = _run(under_autocast(glu_linear_reference), tensors, grad)
    ref = _run(glu_linear_reference, tensors, grad, torch.float64)
    for name, a, b, c in zip(["out", "dgate", "dup", "dweight", "dbias"], got, base, ref):
        assert a.dtype == b.dtype, name
        assert_close(name, a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def test_weight_width(self, backend):
        with pytest.raises(ValueError, match=r"glu_linear: weight must have shape \(out, 8\)"):
            glu_linear(torch.randn(2, 8), torch.randn(2, 8), torch.randn(4, 7), backend=backend)

    def test_weight_dtype(self, backend):
        with pytest.raises(ValueError, match="glu_linear: weight must have the dtype of gate"):
            glu_linear(torch.randn(2, 8), torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64),
                       backend=backend)

    def test_bias_shape(self, backend):
        with pytest.raises(ValueError, match=r"glu_linear: bias must have shape \(4,\)"):
            glu_linear(torch.randn(2, 8), torch.randn(2, 8), torch.randn(4, 8), torch.randn(5),
                       backend=backend)

    def test_activation(self, backend):
        with pytest.raises(ValueError, match="glu_linear: activation must be one of"):
            glu_linear(torch.randn(2, 8), torch.randn(2, 8), torch.randn(4, 8), activation="relu",
                       backend=backend)

    def test_up_shape(self, backend):
        with pytest.raises(ValueError, match=r"glu_linear: up must have shape \(2, 8\)"):
            glu_linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(4, 8), backend=backend)
