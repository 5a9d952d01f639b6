"""slmfast.nn.LayerNorm as a drop-in for torch.nn.LayerNorm: same constructor, same state_dict,
same outputs and gradients with copied weights."""

import pytest
import torch

from slmfast.nn import LayerNorm
from slmfast.ops.layer_norm import IMPLEMENTED
from tests.helpers import assert_close, backend_params, device_for

BACKENDS = backend_params(IMPLEMENTED)


def _compare(ours, theirs, reference, x):
    results = []
    for module in (ours, theirs, reference):
        xi = x.detach().clone().to(torch.float64 if module is reference else x.dtype).requires_grad_()
        y = module(xi)
        grad = torch.randn(y.shape, dtype=torch.float64, device=x.device,
                           generator=torch.Generator(x.device).manual_seed(7))
        (y.double() * grad).sum().backward()
        results.append([y, xi.grad] + [p.grad for p in module.parameters()])
    assert len(results[0]) == len(results[1])
    for i, (a, b, r) in enumerate(zip(*results)):
        assert_close(f"output {i}", a, b, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_layer_norm(backend, dtype, bias):
    device = device_for(backend)
    theirs = torch.nn.LayerNorm(80, eps=1e-5, bias=bias, device=device, dtype=dtype)
    torch.nn.init.normal_(theirs.weight, 1.0, 0.2)
    if bias:
        torch.nn.init.normal_(theirs.bias, 0.0, 0.2)
    ours = LayerNorm(80, eps=1e-5, bias=bias, device=device, dtype=dtype, backend=backend)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    reference = torch.nn.LayerNorm(80, eps=1e-5, bias=bias, device=device, dtype=torch.float64)
    reference.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, reference, torch.randn(3, 17, 80, device=device, dtype=dtype) * 2 + 1)


def test_multi_dimensional_shape_and_no_affine():
    theirs = torch.nn.LayerNorm((4, 6), eps=1e-6)
    torch.nn.init.normal_(theirs.weight)
    torch.nn.init.normal_(theirs.bias)
    ours = LayerNorm((4, 6), eps=1e-6)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(ours(x), theirs(x))
    plain = LayerNorm(16, elementwise_affine=False)
    assert list(plain.state_dict()) == []
    x = torch.randn(5, 16)
    torch.testing.assert_close(plain(x), torch.nn.functional.layer_norm(x, (16,)))


def test_residual_form_returns_normed_and_stream():
    norm = LayerNorm(32)
    torch.nn.init.normal_(norm.weight)
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y, h = norm(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (32,), norm.weight, norm.bias))


def test_wrong_trailing_shape_is_rejected():
    with pytest.raises(ValueError, match=r"LayerNorm: x must end in \(32,\)"):
        LayerNorm(32)(torch.randn(4, 31))
