"""slmfast.nn.NormLinear and norm_linear: RMSNorm fused into the projections that read it, against
the same RMSNorm -> nn.Linear modules (torch and Hugging Face), outputs and every .grad."""

import copy

import pytest
import torch

from slmfast.nn import NormLinear, RMSNorm, norm_linear
from slmfast.ops.rms_norm import IMPLEMENTED
from tests.helpers import assert_close, backend_params, device_for, saved_tensor_bytes

BACKENDS = backend_params(IMPLEMENTED)


class _Unfused(torch.nn.Module):
    """What NormLinear replaces: a norm, then the projections, with NormLinear's parameter names."""

    def __init__(self, norm, linears):
        super().__init__()
        self.norm = norm
        self.linears = torch.nn.ModuleList(linears)

    def forward(self, x, residual=None):
        h = x if residual is None else x + residual
        y = self.norm(h)
        outs = tuple(m(y) for m in self.linears)
        return outs if residual is None else (*outs, h)


def _run(module, x, residual, grads, cast):
    xi = x.detach().clone().to(cast).requires_grad_()
    ri = residual.detach().clone().to(cast).requires_grad_() if residual is not None else None
    outs = module(xi, ri) if ri is not None else module(xi)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o.double() * g).sum() for o, g in zip(outs, grads)).backward()
    input_grads = [xi.grad] + ([ri.grad] if ri is not None else [])
    return list(outs) + input_grads + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_norm_linear_matches_rmsnorm_then_linears(backend, dtype, residual):
    device = device_for(backend)
    ours = NormLinear(80, (64, 16, 16), bias=True, eps=1e-5, device=device, dtype=dtype, backend=backend)
    for p in ours.parameters():
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 and p.shape[0] == 80 else 0.0, 0.1)
    theirs = _Unfused(torch.nn.RMSNorm(80, eps=1e-5, device=device, dtype=dtype),
                      [torch.nn.Linear(80, n, device=device, dtype=dtype) for n in (64, 16, 16)])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 17, 80, device=device, dtype=dtype)
    r = torch.randn(3, 17, 80, device=device, dtype=dtype) if residual else None
    grads = [torch.randn(3, 17, n, dtype=torch.float64, device=device) for n in (64, 16, 16, 80)]
    got = _run(ours, x, r, grads, dtype)
    base = _run(theirs, x, r, grads, dtype)
    ref = _run(copy.deepcopy(theirs).double(), x, r, grads, torch.float64)
    assert len(got) == len(base) == len(ref)
    for i, (a, b, c) in enumerate(zip(got, base, ref)):
        assert_close(f"tensor {i}", a, b, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_linear_fuses_hf_modules_in_place(backend):
    """norm_linear over a Llama layer's own LlamaRMSNorm and q/k/v projections: the model keeps
    its modules and state_dict keys, the outputs and gradients are those of the unfused modules."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    device = device_for(backend)
    norm = llama.LlamaRMSNorm(64, eps=1e-6).to(device)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    projs = [torch.nn.Linear(64, n, bias=False, device=device) for n in (64, 32, 32)]
    x = torch.randn(2, 5, 64, device=device)
    grads = [torch.randn(2, 5, n, dtype=torch.float64, device=device) for n in (64, 32, 32)]

    def run(fused, cast):
        modules = [norm, *projs]
        if cast == torch.float64:
            modules = [copy.deepcopy(m).double() for m in modules]
        for m in modules:
            m.zero_grad()
        xi = x.detach().clone().to(cast).requires_grad_()
        if fused:
            outs = norm_linear(xi, modules[0], modules[1:], backend=backend)
        else:
            y = modules[0](xi)
            outs = [m(y) for m in modules[1:]]
        sum((o.double() * g).sum() for o, g in zip(outs, grads)).backward()
        return [*outs, xi.grad] + [p.grad.clone() for m in modules for p in m.parameters()]

    got, base, ref = run(True, torch.float32), run(False, torch.float32), run(False, torch.float64)
    for i, (a, b, c) in enumerate(zip(got, base, ref)):
        assert_close(f"tensor {i}", a, b, c)


def test_single_projection_returns_a_tensor():
    layer = NormLinear(32, 48)
    x = torch.randn(4, 32)
    y = layer(x)
    assert isinstance(y, torch.Tensor) and y.shape == (4, 48)
    y, h = layer(x, torch.randn(4, 32))
    assert y.shape == (4, 48) and h.shape == (4, 32)
    assert list(layer.state_dict()) == ["norm.weight", "linears.0.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_per_token(dtype):
    """h (H x e) + one fp32 rstd per token, plus the parameters; the unfused modules also keep the
    normalized activation (and torch.nn.RMSNorm its own temporaries)."""
    e, hidden, sizes, tokens = torch.finfo(dtype).bits // 8, 64, (64, 16, 16), 2 * 9
    layer = NormLinear(hidden, sizes, dtype=dtype)
    x = torch.randn(2, 9, hidden, dtype=dtype, requires_grad=True)
    params = sum(p.numel() for p in layer.parameters()) * e
    saved, _ = saved_tensor_bytes(layer, x)
    assert saved == tokens * (hidden * e + 4) + params
    linears = [torch.nn.Linear(hidden, n, bias=False, dtype=dtype) for n in sizes]
    unfused = _Unfused(RMSNorm(hidden, 1e-6, dtype=dtype), linears)
    unfused_saved, _ = saved_tensor_bytes(unfused, x)
    assert unfused_saved == saved + tokens * hidden * e  # slmfast's RMSNorm, then Linear: + y exactly


def test_rejects_empty_projection_list():
    with pytest.raises(ValueError, match="NormLinear: out_features must name at least one projection"):
        NormLinear(8, [])
