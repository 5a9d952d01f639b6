"""slmfast.nn.Attention against Hugging Face's LlamaAttention (eager) with the same weights:
outputs, the input gradient and every parameter's .grad; packed documents against running each
document alone; KV-cache generation against full recomputation."""

import copy

import pytest
import torch

from slmfast import backends
from slmfast.nn import Attention, KVCache
from tests.helpers import assert_close, backend_params, device_for

llama = pytest.importorskip("transformers.models.llama.modeling_llama")
from transformers import LlamaConfig  # noqa: E402

BACKENDS = backend_params(("torch", "cpu", "triton", "cuda"))
NOT_TRITON = [b for b in BACKENDS if b.values[0] != "triton"]
INTERPRETED = backends.triton_interpreting() and not torch.cuda.is_available()


def _config(bias: bool, implementation: str = "eager") -> LlamaConfig:
    config = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                         attention_bias=bias, max_position_embeddings=64)
    config._attn_implementation = implementation
    return config


def _rope(config, batch: int, T: int, device):
    """(cos, sin) of positions 0 .. T-1, (B, T, D) float32, from HF's rotary embedding."""
    rope = llama.LlamaRotaryEmbedding(config).to(device)
    pos = torch.arange(T, device=device).expand(batch, T)
    return rope(torch.zeros(1, device=device), pos)


def _causal_mask(T: int, dtype, device):
    """HF's additive 4-D causal mask (1, 1, T, T): 0 where visible, the dtype's minimum elsewhere."""
    visible = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(T, T, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def _run(module, x, grad, call):
    x = x.detach().clone().requires_grad_()
    out = call(module, x)
    (out.double() * grad).sum().backward()
    return out, x.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_hf_llama_attention(backend, dtype, bias):
    if backend == "triton" and INTERPRETED and (dtype == torch.bfloat16 or bias):
        pytest.skip("under the interpreter triton runs one fp32 case (slow; bf16 tl.dot is wrong there)")
    device = device_for(backend)
    B, T = 2, 13
    theirs = llama.LlamaAttention(_config(bias), layer_idx=0).to(device, dtype)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.1)
    reference = llama.LlamaAttention(_config(bias, "sdpa"), layer_idx=0).to(device, torch.float64)
    reference.load_state_dict(theirs.state_dict())  # fp64 SDPA (math) as the oracle
    ours = Attention(96, 6, 2, head_dim=16, bias=bias, backend=backend, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())

    cos, sin = _rope(theirs.config, B, T, device)
    x = torch.randn(B, T, 96, device=device, dtype=dtype)
    grad = torch.randn(B, T, 96, device=device, dtype=torch.float64)

    def hf(module, x_):
        t = x_.dtype
        mask = _causal_mask(T, t, device)
        return module(x_, position_embeddings=(cos.to(t), sin.to(t)), attention_mask=mask)[0]

    def slm(module, x_):
        return module(x_, position_embeddings=(cos.to(x_.dtype), sin.to(x_.dtype)))

    y, dx, grads = _run(ours, x, grad, slm)
    ty, tdx, tgrads = _run(theirs, x, grad, hf)
    ry, rdx, rgrads = _run(reference, x.double(), grad, hf)
    assert_close("out", y, ty, ry)
    assert_close("dx", dx, tdx, rdx)
    for name in grads:
        assert_close(f"{name}.grad", grads[name], tgrads[name], rgrads[name])


@pytest.mark.parametrize("backend", NOT_TRITON)
def test_packed_documents_match_each_document_alone(backend):
    device = device_for(backend)
    torch.manual_seed(0)
    attn = Attention(64, 4, 2, backend=backend, device=device)
    reference = copy.deepcopy(attn).double()
    reference.backend = "torch"
    lengths = [5, 1, 9]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32, device=device)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16)
    cos, sin = _rope(config, 1, 9, device)  # positions restart at 0 in every document
    cos_p = torch.cat([cos[0, :n] for n in lengths])  # (N, D)
    sin_p = torch.cat([sin[0, :n] for n in lengths])
    x = torch.randn(15, 64, device=device)
    grad = torch.randn(15, 64, device=device, dtype=torch.float64)

    def packed(module, x_):
        t = x_.dtype
        return module(x_, position_embeddings=(cos_p.to(t), sin_p.to(t)), cu_seqlens=cu, max_seqlen=9)

    def one_by_one(module, x_):
        t = x_.dtype
        outs = [module(x_[None, a:b], position_embeddings=(cos[:, :b - a].to(t), sin[:, :b - a].to(t)))[0]
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs)

    y, dx, grads = _run(attn, x, grad, packed)
    by, bdx, bgrads = _run(copy.deepcopy(attn), x, grad, one_by_one)
    ry, rdx, rgrads = _run(reference, x.double(), grad, one_by_one)
    assert_close("out", y, by, ry)
    assert_close("dx", dx, bdx, rdx)
    for name in grads:
        assert_close(f"{name}.grad", grads[name], bgrads[name], rgrads[name])


@pytest.mark.parametrize("backend", NOT_TRITON)
@pytest.mark.parametrize("window", [None, (4, -1)], ids=["causal", "window"])
def test_kv_cache_generation_equals_full_recompute(backend, window):
    device = device_for(backend)
    attn = Attention(64, 4, 2, window=window, backend=backend, device=device)
    reference = copy.deepcopy(attn).double()
    reference.backend = "torch"
    B, T, prefill = 2, 12, 5
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16)
    cos, sin = _rope(config, B, T, device)
    x = torch.randn(B, T, 64, device=device)
    with torch.no_grad():
        full = attn(x, position_embeddings=(cos, sin))
        expected = reference(x.double(), position_embeddings=(cos.double(), sin.double()))
        cache = KVCache(B, 2, 16, 16, dtype=x.dtype, device=device)
        steps = [attn(x[:, :prefill], (cos[:, :prefill], sin[:, :prefill]), kv_cache=cache)]
        for t in range(prefill, T):
            steps.append(attn(x[:, t:t + 1], (cos[:, t:t + 1], sin[:, t:t + 1]), kv_cache=cache))
    assert cache.length == T
    assert_close("generated", torch.cat(steps, dim=1), full, expected)


def test_kv_cache_bounds_and_shapes():
    cache = KVCache(1, 2, 4, 8)
    k, v = cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    assert k.shape == (1, 2, 3, 8) and v.shape == (1, 2, 3, 8)
    with pytest.raises(ValueError, match="exceed max_len 4"):
        cache.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"k must have shape \(B, Hkv, T, D\)"):
        cache.update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    cache.reset()
    assert cache.length == 0


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_heads \\(6\\) must be a multiple of num_kv_heads \\(4\\)"):
        Attention(96, 6, 4)
    with pytest.raises(ValueError, match="pass head_dim"):
        Attention(100, 6)
    attn = Attention(96, 6, 2, head_dim=32)
    assert attn.q_proj.weight.shape == (192, 96) and attn.k_proj.weight.shape == (64, 96)
    assert attn.o_proj.weight.shape == (96, 192)
