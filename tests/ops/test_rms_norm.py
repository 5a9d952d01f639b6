"""rms_norm on every available backend against the float64 reference (docs/architecture.md §5)."""

import pytest
import torch
import torch.nn.functional as F

from slmfast import backends
from slmfast.functional import rms_norm
from slmfast.ops.rms_norm import rms_norm_reference
from tests.helpers import assert_close, backend_params, cpu_capability_params, device_for, saved_tensor_bytes

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params()
SHAPES = [(3, 17, 80), (1, 1, 4096), (5, 1000), (2, 3, 40), (7, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, device, residual, weight_dtype=None):
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    w = (torch.rand(shape[-1], device=device) + 0.5).to(weight_dtype or dtype)
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    return x, w, r


def _by_torch(x, weight, eps, residual, offset=0.0):
    """The contract by torch's own F.rms_norm, independent of the op's reference (so that the
    torch backend is checked too): h = x + residual in x's dtype, normalized with offset + weight
    in float32 (float64 for float64 inputs) and rounded once to x's dtype. On float64 copies it is
    the oracle."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x if residual is None else x + residual
    y = F.rms_norm(h.to(acc), (h.shape[-1],), offset + weight.to(acc), eps).to(x.dtype)
    return y if residual is None else (y, h)


def _run_with_grads(fn, x, w, r, grad_y, grad_h):
    """Forward, then gradients of (y . grad_y + h . grad_h) w.r.t. x, w and residual."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, w, r)]
    out = fn(*leaves)
    y, h = out if r is not None else (out, None)
    loss = (y.double() * grad_y).sum()
    if h is not None:
        loss = loss + (h.double() * grad_h).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return (y, h), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_fp64_reference(backend, shape, dtype, residual):
    device = device_for(backend)
    x, w, r = _inputs(shape, dtype, device, residual)
    offset = 1.0 if residual else 0.0  # cover Gemma-style weights too
    grad_y = torch.randn(shape, dtype=torch.float64, device=device)
    grad_h = torch.randn(shape, dtype=torch.float64, device=device)

    def ours(x_, w_, r_):
        return rms_norm(x_, w_, 1e-5, r_, offset, backend=backend)

    def same_dtype(x_, w_, r_):
        return _by_torch(x_, w_, 1e-5, r_, offset)

    def fp64(x_, w_, r_):
        return _by_torch(x_.double(), w_.double(), 1e-5, r_.double() if r_ is not None else None, offset)

    outs, grads = _run_with_grads(ours, x, w, r, grad_y, grad_h)
    base_outs, base_grads = _run_with_grads(same_dtype, x, w, r, grad_y, grad_h)
    ref_outs, ref_grads = _run_with_grads(fp64, x, w, r, grad_y, grad_h)
    assert outs[0].dtype == dtype
    assert_close("y", outs[0], base_outs[0], ref_outs[0])
    if residual:
        assert_close("h", outs[1], base_outs[1], ref_outs[1])
    terms = _gradient_terms(x, w, r, grad_y, grad_h, offset, 1e-5)
    for name, g, bg, rg in zip(("dx", "dweight", "dresidual"), grads, base_grads, ref_grads):
        assert_close(name, g, bg, rg, terms=terms[name][0], reduction=terms[name][1])


def _gradient_terms(x, w, r, grad_y, grad_h, offset, eps):
    """(largest sum of |terms|, number of terms) of one entry of each gradient (assert_close's
    `terms` and `reduction`), from the backward's formulas in float64, every term in absolute value:
        dx = rstd (g - xhat mean(g xhat)) + dh,  g = dy (offset + w);  dw = sum_rows dy xhat.
    They cancel at small H: with H = 3, a dx of 2.1 differed by 1.2e-6 between two correct
    kernels (2 ulps of the result and 2x torch's 2.4e-7 failed on some draws)."""
    h = (x.double() + r.double()) if r is not None else x.double()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    xhat = (h * rstd).abs()
    g = (grad_y * (offset + w.double())).abs()
    dx = rstd * (g + xhat * (g * xhat).mean(-1, keepdim=True)) + (grad_h.abs() if r is not None else 0)
    n_rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
    dw = (grad_y.abs() * xhat).reshape(-1, hidden).sum(0).max().item()
    return {"dx": (dx.max().item(), hidden), "dresidual": (dx.max().item(), hidden), "dweight": (dw, n_rows)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_with_bf16_activations(backend):
    device = device_for(backend)
    x, w, r = _inputs((4, 33, 96), torch.bfloat16, device, True, weight_dtype=torch.float32)
    grad_y = torch.randn(x.shape, dtype=torch.float64, device=device)
    grad_h = torch.randn(x.shape, dtype=torch.float64, device=device)
    outs, grads = _run_with_grads(lambda a, b, c: rms_norm(a, b, 1e-6, c, backend=backend),
                                  x, w, r, grad_y, grad_h)
    base_outs, base_grads = _run_with_grads(lambda a, b, c: _by_torch(a, b, 1e-6, c),
                                            x, w, r, grad_y, grad_h)
    ref_outs, ref_grads = _run_with_grads(lambda a, b, c: _by_torch(a.double(), b.double(), 1e-6, c.double()),
                                          x, w, r, grad_y, grad_h)
    assert outs[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    assert_close("y", outs[0], base_outs[0], ref_outs[0])
    for name, g, bg, rg in zip(("dx", "dweight", "dresidual"), grads, base_grads, ref_grads):
        assert_close(name, g, bg, rg)


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(residual, capability):
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) if residual else None

    def fn(x_, w_, *rest):
        out = rms_norm(x_, w_, 1e-6, rest[0] if rest else None, 0.5, backend="cpu")
        return out

    inputs = (x, w, r) if residual else (x, w)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_backward_is_deterministic(backend):
    device = device_for(backend)
    x, w, r = _inputs((300, 257), torch.float32, device, True)
    grad_y = torch.randn(x.shape, dtype=torch.float64, device=device)
    grad_h = torch.randn(x.shape, dtype=torch.float64, device=device)
    fn = lambda a, b, c: rms_norm(a, b, 1e-6, c, backend=backend)  # noqa: E731
    _, first = _run_with_grads(fn, x, w, r, grad_y, grad_h)
    _, second = _run_with_grads(fn, x, w, r, grad_y, grad_h)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_input_gives_zero_not_nan(backend):
    device = device_for(backend)
    x = torch.zeros(4, 64, device=device)
    w = torch.ones(64, device=device, requires_grad=True)
    y = rms_norm(x.requires_grad_(), w, 1e-6, backend=backend)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = device_for(backend)
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    y = rms_norm(x, w, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 3, 16)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_is_copied(backend):
    device = device_for(backend)
    x = torch.randn(16, 8, device=device).t()  # (8, 16), strides (1, 8)
    w = torch.randn(16, device=device)
    expected = _by_torch(x.double(), w.double(), 1e-6, None)
    assert_close("y", rms_norm(x, w, backend=backend), _by_torch(x, w, 1e-6, None), expected)


def test_saved_bytes_are_input_weight_and_one_rstd_per_row():
    if not backends.status("cpu").available:
        pytest.skip("cpu backend not built")
    rows, cols = 24, 320
    x = torch.randn(rows, cols, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(rows, cols, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(cols, dtype=torch.float32, requires_grad=True)
    saved, (_y, h) = saved_tensor_bytes(rms_norm, x, w, 1e-6, r, backend="cpu")
    # h (bf16, also the block's residual output) + weight (fp32 parameter) + rstd (fp32 per row)
    assert saved == rows * cols * 2 + cols * 4 + rows * 4
    reference_saved, _ = saved_tensor_bytes(rms_norm_reference, x, w, 1e-6, r)
    assert reference_saved > saved


# ---- registration: opcheck and torch.compile ----------------------------------------------

def _op_for(backend):
    return torch.ops.slmfast_triton.rms_norm_fwd if backend == "triton" else torch.ops.slmfast.rms_norm_fwd


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(backend, residual):
    device = device_for(backend)
    x, w, r = _inputs((3, 5, 24), torch.float32, device, residual)
    args = (x.requires_grad_(), w.requires_grad_(), r.requires_grad_() if r is not None else None,
            1e-6, 0.0)
    torch.library.opcheck(_op_for(backend), args)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_compiles_fullgraph(backend):
    device = device_for(backend)
    x, w, r = _inputs((2, 7, 48), torch.float32, device, True)

    def block(x_, w_, r_):
        y, h = rms_norm(x_, w_, 1e-6, r_, backend=backend)
        return (y * 2).sum() + h.mean()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    out = compiled(*leaves)
    out.backward()
    eager_leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    expected = block(*eager_leaves)
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def test_integer_x(self, backend):
        with pytest.raises(ValueError, match="x must have a floating dtype"):
            rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4), backend=backend)

    def test_weight_of_wrong_size(self, backend):
        with pytest.raises(ValueError, match=r"weight must have shape \(16,\).*got \(15,\)"):
            rms_norm(torch.randn(2, 16), torch.randn(15), backend=backend)

    def test_weight_dtype_mix(self, backend):
        with pytest.raises(ValueError, match="weight must have the dtype of x"):
            rms_norm(torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.float16),
                     backend=backend)

    def test_residual_of_another_shape(self, backend):
        with pytest.raises(ValueError, match=r"residual must have shape \(2, 16\)"):
            rms_norm(torch.randn(2, 16), torch.randn(16), residual=torch.randn(3, 16), backend=backend)

    def test_residual_dtype(self, backend):
        with pytest.raises(ValueError, match="residual must have the dtype of x"):
            rms_norm(torch.randn(2, 16), torch.randn(16),
                     residual=torch.randn(2, 16, dtype=torch.float64), backend=backend)

    def test_device_mix(self, backend):
        with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
            rms_norm(torch.randn(2, 16), torch.randn(16, device="meta"), backend=backend)

    def test_negative_eps(self, backend):
        with pytest.raises(ValueError, match="eps must be >= 0"):
            rms_norm(torch.randn(2, 16), torch.randn(16), eps=-1.0, backend=backend)


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
class TestRawOpChecks:
    """The registered C++ op checks its arguments itself (it can be called without the wrapper)."""

    def test_non_contiguous(self):
        x = torch.randn(16, 8).t()
        with pytest.raises(RuntimeError, match="rms_norm_fwd: x must be contiguous"):
            torch.ops.slmfast.rms_norm_fwd(x, torch.randn(16), None, 1e-6, 0.0)

    def test_weight_shape(self):
        with pytest.raises(RuntimeError, match=r"rms_norm_fwd: weight must have shape \(8,\)"):
            torch.ops.slmfast.rms_norm_fwd(torch.randn(4, 8), torch.randn(9), None, 1e-6, 0.0)

    def test_residual_dtype(self):
        with pytest.raises(RuntimeError, match="rms_norm_fwd: r must have dtype Float"):
            torch.ops.slmfast.rms_norm_fwd(torch.randn(4, 8), torch.randn(8),
                                           torch.randn(4, 8, dtype=torch.float64), 1e-6, 0.0)

    def test_integer_dtype(self):
        with pytest.raises(RuntimeError, match="rms_norm_fwd: x must be float32"):
            torch.ops.slmfast.rms_norm_fwd(torch.ones(4, 8, dtype=torch.int64), torch.randn(8),
                                           None, 1e-6, 0.0)

    def test_rstd_of_wrong_length(self):
        h = torch.randn(4, 8)
        with pytest.raises(RuntimeError, match="rms_norm_bwd: rstd must be a contiguous tensor of 4"):
            torch.ops.slmfast.rms_norm_bwd(torch.randn(4, 8), None, h, torch.randn(8),
                                           torch.randn(3), 0.0)
