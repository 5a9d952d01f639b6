"""slmfast.nn.RotaryEmbedding against Hugging Face's LlamaRotaryEmbedding (rope_theta, linear and
llama3 scaling: bit-identical tables), and the pair RotaryEmbedding + functional.rotary against
HF's apply_rotary_pos_emb, outputs and gradients (tiny configs, no downloads)."""

import pytest
import torch

from slmfast.functional import rotary
from slmfast.nn import RotaryEmbedding
from slmfast.ops.rotary import IMPLEMENTED
from tests.helpers import assert_close, backend_params, device_for

llama = pytest.importorskip("transformers.models.llama.modeling_llama")
from transformers import LlamaConfig  # noqa: E402

BACKENDS = backend_params(IMPLEMENTED)
SCALINGS = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0},
}


def _hf_rope(scaling, head_dim=32, max_position=256):
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=32, num_hidden_layers=1, max_position_embeddings=max_position,
                         rope_parameters=dict(scaling))
    return llama.LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_tables_match_hf_bit_for_bit(kind):
    hf = _hf_rope(SCALINGS[kind])
    ours = RotaryEmbedding(32, max_position=256, scaling=SCALINGS[kind])
    assert torch.equal(ours.inv_freq, hf.inv_freq)
    assert list(ours.state_dict()) == list(hf.state_dict()) == []
    positions = torch.stack([torch.arange(300), torch.arange(300) * 3 + 7])  # (B, T), past max_position
    hf_cos, hf_sin = hf(torch.zeros(1), positions)
    cos, sin = ours(positions)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, 300, 32)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    cos1, sin1 = ours(positions[1])  # (T,) positions give (T, D)
    assert torch.equal(cos1, hf_cos[1]) and torch.equal(sin1, hf_sin[1])


def test_base_argument_and_hf_defaults():
    hf = _hf_rope({"rope_type": "default", "rope_theta": 10000.0})
    assert torch.equal(RotaryEmbedding(32).inv_freq, hf.inv_freq)
    assert torch.equal(RotaryEmbedding(32, base=10000.0, scaling={"type": "linear", "factor": 1.0}).inv_freq,
                       hf.inv_freq)
    partial = RotaryEmbedding(32, scaling={"partial_rotary_factor": 0.5})
    cos, _ = partial(torch.arange(5))
    assert cos.shape == (5, 16) and partial.rotary_dim == 16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_with_rotary_matches_hf_apply_rotary_pos_emb(backend, dtype):
    """Outputs and gradients of q and k: slmfast (fp32 tables, one rounding) against HF (tables cast
    to the activation dtype, as LlamaRotaryEmbedding returns them), both against HF in float64."""
    device = device_for(backend)
    rope = RotaryEmbedding(16, scaling=SCALINGS["llama3"], device=device)
    positions = torch.arange(9, device=device)[None].expand(3, 9)
    cos, sin = rope(positions)  # (B, T, D) float32
    q = torch.randn(3, 4, 9, 16, dtype=dtype, device=device)
    k = torch.randn(3, 2, 9, 16, dtype=dtype, device=device)
    grads = [torch.randn(t.shape, dtype=torch.float64, device=device) for t in (q, k)]

    def run(fn, cast):
        leaves = [t.detach().clone().to(cast).requires_grad_() for t in (q, k)]
        outs = fn(*leaves)
        sum((o.double() * g).sum() for o, g in zip(outs, grads)).backward()
        return [*outs, *(t.grad for t in leaves)]

    got = run(lambda a, b: rotary(a, b, cos, sin, backend=backend), dtype)
    base = run(lambda a, b: llama.apply_rotary_pos_emb(a, b, cos.to(dtype), sin.to(dtype)), dtype)
    ref = run(lambda a, b: llama.apply_rotary_pos_emb(a, b, cos.double(), sin.double()), torch.float64)
    for name, a, b, r in zip(("q_rot", "k_rot", "dq", "dk"), got, base, ref):
        assert_close(name, a, b, r)


class TestBadArguments:
    def test_odd_head_dim(self):
        with pytest.raises(ValueError, match="RotaryEmbedding: head_dim must be a positive even int"):
            RotaryEmbedding(15)

    def test_unknown_rope_type(self):
        with pytest.raises(ValueError, match="RotaryEmbedding: scaling rope_type must be one of"):
            RotaryEmbedding(16, scaling={"rope_type": "yarn", "factor": 2.0})

    def test_missing_factor(self):
        with pytest.raises(ValueError, match="scaling 'linear' needs a factor > 0"):
            RotaryEmbedding(16, scaling={"rope_type": "linear"})

    def test_llama3_keys(self):
        with pytest.raises(ValueError, match=r"scaling 'llama3' needs \['high_freq_factor'\]"):
            RotaryEmbedding(16, scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0})

    def test_float_positions(self):
        with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
            RotaryEmbedding(16)(torch.arange(4.0))

    def test_position_rank(self):
        with pytest.raises(ValueError, match=r"position_ids must be \(T,\) or \(B, T\)"):
            RotaryEmbedding(16)(torch.zeros(1, 2, 3, dtype=torch.long))
