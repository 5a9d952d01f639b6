"""rms_norm_linear (RMSNorm fused into the projections, normalized activation recomputed in
backward) on every backend of rms_norm, against the float64 reference; exact saved bytes."""

import pytest
import torch

from slmfast import backends
from slmfast.functional import rms_norm_linear
from slmfast.ops.norm_linear import rms_norm_linear_reference
from slmfast.ops.rms_norm import IMPLEMENTED
from tests.helpers import assert_close, backend_params, cpu_capability_params, device_for, saved_tensor_bytes

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params(IMPLEMENTED)
KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
# (x shape, projection sizes): q/k/v with GQA on (3, 17, 80); gate/up on hidden 1000
CASES = [((3, 17, 80), (64, 16, 16)), ((5, 1000), (24, 24))]


def _inputs(shape, sizes, dtype, device, residual, bias):
    hidden = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    nw = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    ws = [(torch.randn(n, hidden, device=device) / hidden ** 0.5).to(dtype) for n in sizes]
    bs = [torch.randn(n, device=device).to(dtype) for n in sizes] if bias else None
    return x, r, nw, ws, bs


def _run(fn, x, r, nw, ws, bs, grads, cast=None):
    def leaf(t):
        return t.detach().clone().to(cast or t.dtype).requires_grad_() if t is not None else None

    x, r, nw = leaf(x), leaf(r), leaf(nw)
    ws = [leaf(w) for w in ws]
    bs = [leaf(b) for b in bs] if bs is not None else None
    outs = fn(x, nw, ws, bs, r)
    sum((o.double() * g).sum() for o, g in zip(outs, grads)).backward()
    leaves = [x] + ([r] if r is not None else []) + [nw] + ws + (bs or [])
    return list(outs) + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_fp64_reference(backend, case, dtype, residual):
    shape, sizes = case
    device = device_for(backend)
    x, r, nw, ws, bs = _inputs(shape, sizes, dtype, device, residual, bias=residual)
    grads = [torch.randn(*shape[:-1], n, dtype=torch.float64, device=device) for n in sizes]
    if residual:
        grads.append(torch.randn(shape, dtype=torch.float64, device=device))

    def ours(x_, nw_, ws_, bs_, r_):
        return rms_norm_linear(x_, nw_, ws_, bs_, 1e-5, r_, backend=backend)

    def reference(x_, nw_, ws_, bs_, r_):
        return rms_norm_linear_reference(x_, nw_, ws_, bs_, 1e-5, r_)

    got = _run(ours, x, r, nw, ws, bs, grads)
    base = _run(reference, x, r, nw, ws, bs, grads)
    ref = _run(reference, x, r, nw, ws, bs, grads, cast=torch.float64)
    assert len(got) == len(base) == len(ref)
    for i, (a, b, c) in enumerate(zip(got, base, ref)):
        assert a.dtype == b.dtype, i
        assert_close(f"tensor {i}", a, b, c)


@CPU
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(residual, capability):
    x, r, nw, ws, bs = _inputs((2, 3, 6), (4, 5), torch.float64, "cpu", residual, bias=True)
    leaves = [t.requires_grad_() for t in [x, nw, *ws, *bs] + ([r] if residual else [])]

    def fn(x_, nw_, w0, w1, b0, b1, *rest):
        residual = rest[0] if rest else None
        return rms_norm_linear(x_, nw_, [w0, w1], [b0, b1], 1e-6, residual, 0.5, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_saved_bytes_are_stream_and_rstd(backend, residual):
    """Exactly h (or x) + one fp32 rstd per token + the parameters: the normalized activation is
    not stored (the eager reference stores it, and more)."""
    device = device_for(backend)
    tokens, hidden, sizes = 2 * 9, 64, (32, 16, 16)
    x, r, nw, ws, _ = _inputs((2, 9, hidden), sizes, torch.bfloat16, device, residual, bias=False)
    nw = nw.float().requires_grad_()  # fp32 norm weight with bf16 activations
    ws = [w.requires_grad_() for w in ws]
    x.requires_grad_()
    saved, _ = saved_tensor_bytes(rms_norm_linear, x, nw, ws, None, 1e-6, r, backend=backend)
    params = hidden * 4 + sum(n * hidden * 2 for n in sizes)
    assert saved == tokens * (hidden * 2 + 4) + params
    eager, _ = saved_tensor_bytes(rms_norm_linear_reference, x, nw, ws, None, 1e-6, r)
    assert eager >= saved + tokens * hidden * 2  # at least the normalized activation more


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_fullgraph(backend):
    device = device_for(backend)
    x, r, nw, ws, bs = _inputs((2, 7, 48), (16, 8), torch.float32, device, True, bias=True)

    def block(x_, r_, nw_, w0, w1, b0, b1):
        a, b, h = rms_norm_linear(x_, nw_, [w0, w1], [b0, b1], 1e-6, r_, backend=backend)
        return (a * 2).sum() + b.pow(2).sum() + h.mean()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, r, nw, *ws, *bs)]
    compiled(*leaves).backward()
    eager_leaves = [t.clone().requires_grad_() for t in (x, r, nw, *ws, *bs)]
    block(*eager_leaves).backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@CPU
def test_autocast_matches_eager_autocast():
    """Under torch.autocast (bf16 on the CPU) with fp32 parameters and stream: the same as the
    eager norm (fp32) followed by autocast linears, within the tolerance rule."""
    x, r, nw, ws, bs = _inputs((2, 9, 64), (32, 16), torch.float32, "cpu", True, bias=True)
    grads = [torch.randn(2, 9, n, dtype=torch.float64) for n in (32, 16, 64)]

    def ours(x_, nw_, ws_, bs_, r_):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rms_norm_linear(x_, nw_, ws_, bs_, 1e-6, r_, backend="cpu")

    def eager(x_, nw_, ws_, bs_, r_):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rms_norm_linear_reference(x_, nw_, ws_, bs_, 1e-6, r_)

    got = _run(ours, x, r, nw, ws, bs, grads)
    base = _run(eager, x, r, nw, ws, bs, grads)
    ref = _run(lambda x_, nw_, ws_, bs_, r_: rms_norm_linear_reference(x_, nw_, ws_, bs_, 1e-6, r_),
               x, r, nw, ws, bs, grads, cast=torch.float64)
    for i, (a, b, c) in enumerate(zip(got, base, ref)):
        assert a.dtype == b.dtype, i
        assert_close(f"tensor {i}", a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def test_weight_width(self, backend):
        x = torch.randn(2, 16)
        with pytest.raises(ValueError, match=r"rms_norm_linear: weights\[1\] must have shape \(out, 16\)"):
            rms_norm_linear(x, torch.ones(16), [torch.randn(4, 16), torch.randn(4, 15)], backend=backend)

    def test_bias_count(self, backend):
        with pytest.raises(ValueError, match="rms_norm_linear: biases must have one entry per weight"):
            rms_norm_linear(torch.randn(2, 16), torch.ones(16), [torch.randn(4, 16)], [None, None],
                            backend=backend)

    def test_weight_dtype(self, backend):
        with pytest.raises(ValueError, match=r"rms_norm_linear: weights\[0\] must have the dtype of x"):
            rms_norm_linear(torch.randn(2, 16), torch.ones(16), [torch.randn(4, 16, dtype=torch.float64)],
                            backend=backend)

    def test_norm_weight_size(self, backend):
        with pytest.raises(ValueError, match=r"rms_norm_linear: weight must have shape \(16,\)"):
            rms_norm_linear(torch.randn(2, 16), torch.ones(15), [torch.randn(4, 16)], backend=backend)

    def test_no_weights(self, backend):
        with pytest.raises(ValueError, match="rms_norm_linear: weights must hold at least one"):
            rms_norm_linear(torch.randn(2, 16), torch.ones(16), [], backend=backend)
