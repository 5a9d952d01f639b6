"""slmfast.nn.SwiGLUMLP / GeGLUMLP as drop-ins for Hugging Face's LlamaMLP / GemmaMLP: same
state_dict, same outputs and every gradient with copied weights, and exactly the documented bytes
saved for backward (tiny random configs, no downloads)."""

import copy

import pytest
import torch

from slmfast.nn import GeGLUMLP, RMSNorm, SwiGLUMLP
from slmfast.ops.glu import IMPLEMENTED
from tests.helpers import assert_close, backend_params, device_for, saved_tensor_bytes

llama = pytest.importorskip("transformers.models.llama.modeling_llama")
gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
from transformers import GemmaConfig, LlamaConfig  # noqa: E402

BACKENDS = backend_params(IMPLEMENTED)
HIDDEN, INTERMEDIATE = 64, 176


def _llama_config(bias=False):
    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32, num_hidden_layers=1, mlp_bias=bias)


def _gemma_config():
    return GemmaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=32, num_hidden_layers=1,
                       hidden_activation="gelu_pytorch_tanh")


def _run(module, x, grad):
    xi = x.detach().clone().requires_grad_()
    y = module(xi)
    (y.double() * grad).sum().backward()
    return [y, xi.grad] + [p.grad for p in module.parameters()]


def _compare(ours, theirs, x):
    """ours and theirs (same weights, x's dtype) against theirs in float64: output, dx, every .grad."""
    reference = copy.deepcopy(theirs).double()
    grad = torch.randn(*x.shape[:-1], HIDDEN, dtype=torch.float64, device=x.device)
    got, base, ref = _run(ours, x, grad), _run(theirs, x, grad), _run(reference, x.double(), grad)
    names = ["out", "dx"] + [name for name, _ in ours.named_parameters()]
    assert names[2:] == [name for name, _ in theirs.named_parameters()]
    for name, a, b, r in zip(names, got, base, ref):
        assert_close(name, a, b, r)


def _pair(ours_cls, theirs, device, dtype, backend, **kwargs):
    theirs = theirs.to(device, dtype)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    ours = ours_cls(HIDDEN, INTERMEDIATE, device=device, dtype=dtype, backend=backend, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_matches_llama_mlp(backend, dtype, bias):
    device = device_for(backend)
    ours, theirs = _pair(SwiGLUMLP, llama.LlamaMLP(_llama_config(bias)), device, dtype, backend, bias=bias)
    _compare(ours, theirs, torch.randn(3, 17, HIDDEN, device=device, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_geglu_mlp_matches_gemma_mlp(backend, dtype):
    device = device_for(backend)
    ours, theirs = _pair(GeGLUMLP, gemma.GemmaMLP(_gemma_config()), device, dtype, backend,
                         approximate="tanh")
    _compare(ours, theirs, torch.randn(2, 9, HIDDEN, device=device, dtype=dtype))


def test_geglu_erf_matches_eager():
    mlp = GeGLUMLP(HIDDEN, INTERMEDIATE, approximate="none")
    x = torch.randn(4, HIDDEN)
    expected = mlp.down_proj(torch.nn.functional.gelu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_with_norm_matches_rmsnorm_then_mlp(backend, dtype):
    """The post-attention norm (and its residual add) fused into gate/up: the same output, stream
    and gradients as LlamaRMSNorm(x + residual) -> LlamaMLP."""
    device = device_for(backend)
    ours, theirs = _pair(SwiGLUMLP, llama.LlamaMLP(_llama_config()), device, dtype, backend)
    hf_norm = llama.LlamaRMSNorm(HIDDEN, eps=1e-6).to(device, dtype)
    torch.nn.init.normal_(hf_norm.weight, 1.0, 0.2)
    norm = RMSNorm(HIDDEN, 1e-6, device=device, dtype=dtype, backend=backend)
    norm.load_state_dict(hf_norm.state_dict())
    x, residual = (torch.randn(2, 9, HIDDEN, device=device, dtype=dtype) for _ in range(2))
    grad_out, grad_h = (torch.randn(2, 9, HIDDEN, dtype=torch.float64, device=device) for _ in range(2))

    def run(mlp, rms, fused, cast):
        xi, ri = (t.detach().clone().to(cast).requires_grad_() for t in (x, residual))
        if fused:
            out, h = mlp.forward_with_norm(xi, rms, residual=ri)
        else:
            h = xi + ri
            out = mlp(rms(h))
        ((out.double() * grad_out).sum() + (h.double() * grad_h).sum()).backward()
        params = list(mlp.parameters()) + list(rms.parameters())
        return [out, h, xi.grad, ri.grad] + [p.grad for p in params]

    got = run(ours, norm, True, dtype)
    base = run(theirs, hf_norm, False, dtype)
    ref = run(copy.deepcopy(theirs).double(), copy.deepcopy(hf_norm).double(), False, torch.float64)
    names = ["out", "h", "dx", "dresidual", "gate_proj", "up_proj", "down_proj", "norm"]
    for name, a, b, r in zip(names, got, base, ref):
        assert_close(name, a, b, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_are_as_documented(dtype):
    """SwiGLUMLP: x + gate + up per token (plus the weights); HF LlamaMLP: x + 4 intermediates."""
    tokens, e = 2 * 7, torch.finfo(dtype).bits // 8
    ours = SwiGLUMLP(HIDDEN, INTERMEDIATE, dtype=dtype)
    theirs = llama.LlamaMLP(_llama_config()).to(dtype)
    weights = 3 * HIDDEN * INTERMEDIATE * e
    x = torch.randn(2, 7, HIDDEN, dtype=dtype, requires_grad=True)
    saved, _ = saved_tensor_bytes(ours, x)
    assert saved == tokens * (HIDDEN + 2 * INTERMEDIATE) * e + weights
    hf_saved, _ = saved_tensor_bytes(theirs, x)
    assert hf_saved == tokens * (HIDDEN + 4 * INTERMEDIATE) * e + weights
    # with the norm fused in: the stream h, one fp32 rstd per token, gate and up
    norm = RMSNorm(HIDDEN, 1e-6, dtype=dtype)
    fused_saved, _ = saved_tensor_bytes(ours.forward_with_norm, x, norm, torch.randn_like(x))
    assert fused_saved == tokens * ((HIDDEN + 2 * INTERMEDIATE) * e + 4) + weights + HIDDEN * e


def test_bad_approximate():
    with pytest.raises(ValueError, match="GeGLUMLP: approximate must be 'tanh' or 'none'"):
        GeGLUMLP(8, 16, approximate="erf")
