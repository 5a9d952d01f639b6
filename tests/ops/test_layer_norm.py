"""layer_norm on every available backend against the float64 reference (docs/architecture.md §5)."""

import pytest
import torch
import torch.nn.functional as F

from slmfast import backends
from slmfast.functional import layer_norm
from slmfast.ops.layer_norm import IMPLEMENTED, layer_norm_reference
from tests.helpers import assert_close, backend_params, cpu_capability_params, device_for, saved_tensor_bytes

CPU_CAPABILITIES = cpu_capability_params()  # the fp64 / cpu-only tests run on every vector path

BACKENDS = backend_params(IMPLEMENTED)
KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "torch"]
SHAPES = [(3, 17, 80), (1, 1, 4096), (5, 1000), (2, 5120), (7, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")


def _inputs(shape, dtype, device, residual, bias=True, weight_dtype=None):
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    w = (torch.rand(shape[-1], device=device) + 0.5).to(weight_dtype or dtype)
    b = torch.randn(shape[-1], device=device).to(weight_dtype or dtype) if bias else None
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    return x, w, b, r


def _run_with_grads(fn, x, w, b, r, grad_y, grad_h):
    """Forward, then gradients of (y . grad_y + h . grad_h) w.r.t. x, w, b and residual."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, w, b, r)]
    out = fn(*leaves)
    y, h = out if r is not None else (out, None)
    loss = (y.double() * grad_y).sum()
    if h is not None:
        loss = loss + (h.double() * grad_h).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return (y, h), grads


def _by_torch(x, w, b, eps, r):
    """The contract by torch's own F.layer_norm, independent of the op's reference (so that the
    torch backend is checked too): h = x + r in x's dtype, normalized in float32 (float64 for
    float64 inputs) and rounded once to x's dtype. On float64 copies it is the oracle."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x if r is None else x + r
    params = [None if t is None else t.to(acc) for t in (w, b)]
    y = F.layer_norm(h.to(acc), (h.shape[-1],), *params, eps).to(x.dtype)
    return y if r is None else (y, h)


def _compare(backend, x, w, b, r, eps=1e-5):
    device = x.device
    grad_y = torch.randn(x.shape, dtype=torch.float64, device=device)
    grad_h = torch.randn(x.shape, dtype=torch.float64, device=device)

    def ours(x_, w_, b_, r_):
        return layer_norm(x_, w_, b_, eps, r_, backend=backend)

    def same_dtype(x_, w_, b_, r_):
        return _by_torch(x_, w_, b_, eps, r_)

    def fp64(x_, w_, b_, r_):
        return _by_torch(*(t.double() if t is not None else None for t in (x_, w_, b_)), eps,
                         r_.double() if r_ is not None else None)

    outs, grads = _run_with_grads(ours, x, w, b, r, grad_y, grad_h)
    base_outs, base_grads = _run_with_grads(same_dtype, x, w, b, r, grad_y, grad_h)
    ref_outs, ref_grads = _run_with_grads(fp64, x, w, b, r, grad_y, grad_h)
    assert outs[0].dtype == x.dtype
    assert_close("y", outs[0], base_outs[0], ref_outs[0])
    if r is not None:
        assert_close("h", outs[1], base_outs[1], ref_outs[1])
    names = ["dx", "dweight"] + (["dbias"] if b is not None else [])
    names += ["dresidual"] if r is not None else []
    assert len(grads) == len(names)
    terms = _gradient_terms(x, w, r, grad_y, grad_h, eps)
    for name, g, bg, rg in zip(names, grads, base_grads, ref_grads):
        assert g.dtype == bg.dtype, name
        assert_close(name, g, bg, rg, terms=terms[name][0], reduction=terms[name][1])


def _gradient_terms(x, w, r, grad_y, grad_h, eps):
    """(largest sum of |terms|, number of terms) of one entry of each gradient (assert_close's
    `terms` and `reduction`), from the backward's formulas in float64, every term in absolute value:
        dx = r (g - mean(g) - xhat mean(g xhat)) + dh,  g = dy w;  dw = sum_rows dy xhat;  db = sum_rows dy.
    Needed where the sums cancel: with H = 3 (shape (7, 3)) a dx of 3.2 is made of terms up to ~14,
    and dbias 0.34 of 7 terms of ~1, so 2 ulps of the result failed correct kernels on some draws."""
    h = (x.double() + r.double()) if r is not None else x.double()
    mu = h.mean(-1, keepdim=True)
    rstd = torch.rsqrt((h - mu).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (h - mu) * rstd
    g = (grad_y * w.double()).abs()
    dx = rstd * (g + g.mean(-1, keepdim=True) + xhat.abs() * (g * xhat.abs()).mean(-1, keepdim=True))
    dx = dx + (grad_h.abs() if r is not None else 0)
    rows = lambda t: t.reshape(-1, t.shape[-1]).sum(0).max().item()  # noqa: E731
    n_rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
    return {"dx": (dx.max().item(), hidden), "dresidual": (dx.max().item(), hidden),
            "dweight": (rows((grad_y * xhat).abs()), n_rows), "dbias": (rows(grad_y.abs()), n_rows)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_fp64_reference(backend, shape, dtype, residual):
    x, w, b, r = _inputs(shape, dtype, device_for(backend), residual)
    _compare(backend, x, w, b, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_with_fp32_params(backend):
    x, w, b, r = _inputs((2, 9, 96), torch.bfloat16, device_for(backend), True, bias=False,
                         weight_dtype=torch.float32)
    _compare(backend, x, w, None, r)
    x, w, b, r = _inputs((2, 9, 96), torch.float16, device_for(backend), False, weight_dtype=torch.float32)
    _compare(backend, x, w, b, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_affine_matches_torch(backend):
    x = torch.randn(6, 40, device=device_for(backend)) * 3 + 1
    expected = torch.nn.functional.layer_norm(x.double(), (40,), eps=1e-5)
    assert_close("y", layer_norm(x, None, None, backend=backend), torch.nn.functional.layer_norm(x, (40,)),
                 expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_does_not_cancel(backend):
    """A row mean far above its spread: E[h^2] - mean^2 would lose every digit; two passes do not."""
    device = device_for(backend)
    x = torch.randn(8, 256, device=device) + 1000.0
    w, b = torch.rand(256, device=device) + 0.5, torch.randn(256, device=device)
    expected = _by_torch(x.double(), w.double(), b.double(), 1e-5, None)
    # h - mean cancels: its rounding is relative to |mean| ~ 1000 (and the mean is a sum of 256),
    # so y's terms are |mean| * rstd * |w| (the default path's sequential sum for the mean: 1.3e-4
    # against torch's 6.0e-5, beyond 2 ulps of y's scale on some draws)
    x64 = x.double()
    rstd = torch.rsqrt(x64.var(-1, unbiased=False) + 1e-5)
    terms = (x64.mean(-1).abs() * rstd).max().item() * w.abs().max().item()
    assert_close("y", layer_norm(x, w, b, backend=backend), _by_torch(x, w, b, 1e-5, None), expected,
                 terms=terms, reduction=256)


@CPU
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_gradcheck_fp64_cpu(residual, capability):
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) if residual else None

    def fn(x_, w_, b_, *rest):
        return layer_norm(x_, w_, b_, 1e-5, rest[0] if rest else None, backend="cpu")

    assert torch.autograd.gradcheck(fn, (x, w, b, r) if residual else (x, w, b))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_is_deterministic(backend):
    rows = 300 if backend != "triton" else 40  # several row blocks; the interpreter is slow
    x, w, b, r = _inputs((rows, 257), torch.float32, device_for(backend), True)
    grad_y = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    grad_h = torch.randn(x.shape, dtype=torch.float64, device=x.device)

    def fn(a, b_, c, d):
        return layer_norm(a, b_, c, 1e-5, d, backend=backend)

    _, first = _run_with_grads(fn, x, w, b, r, grad_y, grad_h)
    _, second = _run_with_grads(fn, x, w, b, r, grad_y, grad_h)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_rows_give_bias_not_nan(backend):
    device = device_for(backend)
    x = torch.full((4, 64), 3.0, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    y = layer_norm(x, w, b, backend=backend)
    y.sum().backward()
    torch.testing.assert_close(y, b.detach().expand(4, 64))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = device_for(backend)
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    y = layer_norm(x, w, b, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 3, 16)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_is_copied(backend):
    device = device_for(backend)
    x = torch.randn(16, 8, device=device).t()  # (8, 16), strides (1, 8)
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    expected = _by_torch(x.double(), w.double(), b.double(), 1e-5, None)
    assert_close("y", layer_norm(x, w, b, backend=backend), _by_torch(x, w, b, 1e-5, None), expected)


@CPU
def test_saved_bytes_are_stream_weight_mean_and_rstd():
    rows, cols = 24, 320
    x = torch.randn(rows, cols, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(rows, cols, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(cols, dtype=torch.float32, requires_grad=True)
    b = torch.randn(cols, dtype=torch.float32, requires_grad=True)
    saved, (_y, _h) = saved_tensor_bytes(layer_norm, x, w, b, 1e-5, r, backend="cpu")
    # h (bf16, also the block's residual output) + weight (fp32) + mean and rstd (fp32 per row)
    assert saved == rows * cols * 2 + cols * 4 + 2 * rows * 4
    reference_saved, _ = saved_tensor_bytes(layer_norm_reference, x, w, b, 1e-5, r)
    assert reference_saved > saved


# ---- registration: opcheck and torch.compile ----------------------------------------------

def _op_for(backend):
    ns = torch.ops.slmfast_triton if backend == "triton" else torch.ops.slmfast
    return ns.layer_norm_fwd


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(backend, residual):
    x, w, b, r = _inputs((3, 5, 24), torch.float32, device_for(backend), residual)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(),
            r.requires_grad_() if r is not None else None, 1e-5)
    torch.library.opcheck(_op_for(backend), args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiles_fullgraph(backend):
    x, w, b, r = _inputs((2, 7, 48), torch.float32, device_for(backend), True)

    def block(x_, w_, b_, r_):
        y, h = layer_norm(x_, w_, b_, 1e-5, r_, backend=backend)
        return (y * 2).sum() + h.mean()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    compiled(*leaves).backward()
    eager_leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    block(*eager_leaves).backward()
    for a, c in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, c.grad)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def test_integer_x(self, backend):
        with pytest.raises(ValueError, match="x must have a floating dtype"):
            layer_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4), None, backend=backend)

    def test_weight_of_wrong_size(self, backend):
        with pytest.raises(ValueError, match=r"weight must have shape \(16,\).*got \(15,\)"):
            layer_norm(torch.randn(2, 16), torch.randn(15), None, backend=backend)

    def test_bias_of_wrong_size(self, backend):
        with pytest.raises(ValueError, match=r"bias must have shape \(16,\).*got \(17,\)"):
            layer_norm(torch.randn(2, 16), torch.randn(16), torch.randn(17), backend=backend)

    def test_weight_dtype_mix(self, backend):
        with pytest.raises(ValueError, match="weight must have the dtype of x"):
            layer_norm(torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.float16), None,
                       backend=backend)

    def test_bias_dtype_differs_from_weight(self, backend):
        with pytest.raises(ValueError, match="bias must have the dtype of weight"):
            layer_norm(torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(16),
                       torch.randn(16, dtype=torch.bfloat16), backend=backend)

    def test_residual_of_another_shape(self, backend):
        with pytest.raises(ValueError, match=r"residual must have shape \(2, 16\)"):
            layer_norm(torch.randn(2, 16), torch.randn(16), None, residual=torch.randn(3, 16),
                       backend=backend)

    def test_device_mix(self, backend):
        with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
            layer_norm(torch.randn(2, 16), torch.randn(16), torch.randn(16, device="meta"), backend=backend)

    def test_negative_eps(self, backend):
        with pytest.raises(ValueError, match="eps must be >= 0"):
            layer_norm(torch.randn(2, 16), torch.randn(16), None, eps=-1.0, backend=backend)


@CPU
class TestRawOpChecks:
    def test_non_contiguous(self):
        with pytest.raises(RuntimeError, match="layer_norm_fwd: x must be contiguous"):
            torch.ops.slmfast.layer_norm_fwd(torch.randn(16, 8).t(), torch.randn(16), None, None, 1e-5)

    def test_bias_shape(self):
        with pytest.raises(RuntimeError, match="layer_norm_fwd: b must have the shape of weight"):
            torch.ops.slmfast.layer_norm_fwd(torch.randn(4, 8), torch.randn(8), torch.randn(9), None, 1e-5)

    def test_mean_of_wrong_length(self):
        h = torch.randn(4, 8)
        with pytest.raises(RuntimeError, match="layer_norm_bwd: mean must be a contiguous tensor of 4"):
            torch.ops.slmfast.layer_norm_bwd(torch.randn(4, 8), None, h, torch.randn(8), torch.randn(3),
                                             torch.randn(4))
