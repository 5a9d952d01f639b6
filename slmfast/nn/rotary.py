"""RotaryEmbedding: the cos/sin tables of rotary position embedding (Su et al. 2021, RoFormer), as
Hugging Face's LlamaRotaryEmbedding computes them, for slmfast.functional.rotary.

    rope = RotaryEmbedding(head_dim, base=10000.0, max_position=2048, scaling=None, device=None)
    cos, sin = rope(position_ids)        # (T,) -> (T, head_dim); (B, T) -> (B, T, head_dim); fp32
    q, k = slmfast.functional.rotary(q, k, cos, sin)

theta_i(p) = p * inv_freq_i with inv_freq_i = 1 / base^(2i / d), i < d/2, and cos/sin returned in
HF's half-split layout cat(freqs, freqs), so they also feed HF's apply_rotary_pos_emb. The
arithmetic is HF's, operation for operation in float32, so the tables match bit for bit.
`scaling` is a dict like HF's rope_scaling / rope_parameters:
    None or {"rope_type": "default"}                  plain RoPE
    {"rope_type": "linear", "factor": f}              position interpolation (inv_freq / f)
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}        Llama 3.1's frequency-dependent scaling
("type" is accepted for "rope_type" as in older HF configs; a "rope_theta" entry overrides `base`;
"partial_rotary_factor" f gives tables of int(head_dim * f) columns, for partial rotary.)
`max_position` is the model's max_position_embeddings: llama3 scaling uses it when the dict has no
original_max_position_embeddings. inv_freq is a non-persistent buffer, as in HF (no state_dict).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_TYPES = ("default", "linear", "llama3")


def _inverse_frequencies(dim: int, base: float, device) -> torch.Tensor:
    # HF: 1 / base^(arange(0, dim, 2) / dim), in float32.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponents)


def _llama3(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
            old_context_len: float) -> torch.Tensor:
    # Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between.
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0, max_position: int = 2048,
                 scaling: dict | None = None, device=None):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be a positive even int, got {head_dim!r}")
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"RotaryEmbedding: scaling must be a dict or None, got {type(scaling).__name__}")
        scaling = dict(scaling) if scaling is not None else {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_TYPES:
            raise ValueError(f"RotaryEmbedding: scaling rope_type must be one of {SUPPORTED_TYPES}, "
                             f"got {rope_type!r}")
        base = float(scaling.get("rope_theta", base))
        if not base > 0:
            raise ValueError(f"RotaryEmbedding: base must be > 0, got {base}")
        partial = float(scaling.get("partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * partial)
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"RotaryEmbedding: scaling partial_rotary_factor={partial} gives {rotary_dim} "
                             f"rotary features for head_dim {head_dim}; need an even number in (0, head_dim]")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = base
        self.max_position = max_position
        self.rope_type = rope_type
        self.scaling = scaling
        self.attention_scaling = 1.0  # HF's post-scaling factor, 1 for these rope types

        inv_freq = _inverse_frequencies(rotary_dim, base, device)  # (R/2,)
        if rope_type != "default":
            factor = scaling.get("factor")
            if not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(f"RotaryEmbedding: scaling {rope_type!r} needs a factor > 0, got {factor!r}")
            if rope_type == "linear":
                inv_freq = inv_freq / factor
            else:
                missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in scaling]
                if missing:
                    raise ValueError(f"RotaryEmbedding: scaling 'llama3' needs {missing}")
                if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
                    raise ValueError("RotaryEmbedding: scaling 'llama3' needs high_freq_factor > "
                                     "low_freq_factor")
                old = scaling.get("original_max_position_embeddings", max_position)
                inv_freq = _llama3(inv_freq, factor, scaling["low_freq_factor"], scaling["high_freq_factor"],
                                   old)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (T,) or (B, T) integers. Returns (cos, sin), float32, (..., rotary_dim)."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point \
                or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise ValueError("RotaryEmbedding: position_ids must be an integer tensor, got "
                             f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
        if position_ids.dim() not in (1, 2):
            raise ValueError(f"RotaryEmbedding: position_ids must be (T,) or (B, T), got shape "
                             f"{tuple(position_ids.shape)}")
        inv_freq = self.inv_freq.to(device=position_ids.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq  # (..., T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, R)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"rope_type={self.rope_type}")
