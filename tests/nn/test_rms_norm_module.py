"""slmfast.nn.RMSNorm as a drop-in for torch.nn.RMSNorm and Hugging Face's LlamaRMSNorm:
same constructor, same state_dict, same outputs and gradients with copied weights."""

import pytest
import torch

from slmfast import backends
from slmfast.nn import RMSNorm
from tests.helpers import assert_close, backend_params, device_for

BACKENDS = backend_params()


def _compare(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, reference: torch.nn.Module):
    """Outputs and weight grads of ours and theirs against the module run in float64."""
    results = []
    for module in (ours, theirs, reference):
        xi = x.detach().clone().to(torch.float64 if module is reference else x.dtype).requires_grad_()
        y = module(xi)
        grad = torch.randn_like(y, dtype=torch.float64, generator=torch.Generator(x.device).manual_seed(7))
        (y.double() * grad).sum().backward()
        results.append((y, xi.grad, module.weight.grad))
    (y, dx, dw), (ty, tdx, tdw), (ry, rdx, rdw) = results
    assert_close("y", y, ty, ry)
    assert_close("dx", dx, tdx, rdx)
    assert_close("dweight", dw, tdw, rdw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_torch_rmsnorm(backend, dtype):
    device = device_for(backend)
    theirs = torch.nn.RMSNorm(96, eps=1e-5, device=device, dtype=dtype)
    torch.nn.init.normal_(theirs.weight, 1.0, 0.2)
    ours = RMSNorm(96, eps=1e-5, device=device, dtype=dtype, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    reference = torch.nn.RMSNorm(96, eps=1e-5, device=device, dtype=torch.float64)
    reference.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, torch.randn(3, 17, 96, device=device, dtype=dtype), reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hf_llama_rmsnorm(backend):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    device = device_for(backend)
    theirs = llama.LlamaRMSNorm(80, eps=1e-6).to(device)
    torch.nn.init.normal_(theirs.weight, 1.0, 0.2)
    ours = RMSNorm(80, 1e-6, backend=backend).to(device)
    ours.load_state_dict(theirs.state_dict())
    reference = llama.LlamaRMSNorm(80, eps=1e-6).to(device, torch.float64)
    reference.load_state_dict(theirs.state_dict())
    assert ours.variance_epsilon == theirs.variance_epsilon
    _compare(ours, theirs, torch.randn(2, 9, 80, device=device), reference)


def test_default_eps_follows_torch():
    """eps=None means the input dtype's machine epsilon, as in torch.nn.RMSNorm."""
    theirs = torch.nn.RMSNorm(8)
    ours = RMSNorm(8)
    x = torch.randn(4, 8) * 1e-4  # small enough that eps matters
    torch.testing.assert_close(ours(x), theirs(x))


def test_multi_dimensional_normalized_shape():
    theirs = torch.nn.RMSNorm((4, 6), eps=1e-6)
    torch.nn.init.normal_(theirs.weight)
    ours = RMSNorm((4, 6), eps=1e-6)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(ours(x), theirs(x))


def test_without_affine_weight():
    theirs = torch.nn.RMSNorm(16, eps=1e-6, elementwise_affine=False)
    ours = RMSNorm(16, eps=1e-6, elementwise_affine=False)
    assert list(ours.state_dict()) == []
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.skipif(not backends.status("cpu").available, reason="cpu backend not built")
def test_residual_form_returns_normed_and_stream():
    norm = RMSNorm(32, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y, h = norm(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (32,), norm.weight, 1e-6))


def test_wrong_trailing_shape_is_rejected():
    with pytest.raises(ValueError, match=r"RMSNorm: x must end in \(32,\)"):
        RMSNorm(32)(torch.randn(4, 31))
