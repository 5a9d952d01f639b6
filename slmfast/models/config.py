"""LlamaConfig: the configuration of slmfast's Llama-style decoder, with named sizes.

A plain dataclass (torchtitan / gpt-fast style): every field is a number or a string, the whole
config round-trips through JSON, and `LlamaConfig.named("125M", vocab_size=8192)` builds a named
size with overrides. The named sizes follow the shapes of published small Llama-family models
(TinyLlama, SmolLM, Llama-3.2-1B) scaled to the listed parameter counts at a 32k vocabulary; the
count is approximate and depends on the vocabulary, see `num_parameters()`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 4
    head_dim: int | None = None  # default hidden_size // num_heads
    max_position: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style {"rope_type": "linear"|"llama3", "factor": ...}
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # tokens to the left each query sees (None: all)
    # Initialization (slmfast/models/llama.py, `init_weights`): linear weights ~ N(0, init_std);
    # the output projections of each block (o_proj, down_proj) scaled by 1/sqrt(2 * num_layers)
    # (GPT-2's scaled residual init); logits at init have std `init_logit_std`.
    init_std: float = 0.02
    init_logit_std: float = 0.3
    zero_init_residual: bool = False  # start o_proj/down_proj at 0: every block is the identity
    extra: dict = field(default_factory=dict)  # free-form metadata carried through save/load

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(f"LlamaConfig: hidden_size ({self.hidden_size}) is not a multiple of "
                                 f"num_heads ({self.num_heads}); set head_dim")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")

    # ---- named sizes ----------------------------------------------------------------------
    @classmethod
    def named(cls, name: str, **overrides) -> LlamaConfig:
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown model config {name!r}; named configs: {', '.join(NAMED_CONFIGS)}")
        fields = dict(NAMED_CONFIGS[name])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"LlamaConfig has no field(s) {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (tied embeddings counted once)."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"LlamaConfig: unknown key(s) {sorted(unknown)} in config")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# Parameter counts at the listed vocabulary (see tests/models/test_config.py).
NAMED_CONFIGS: dict[str, dict] = {
    "nano": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                 num_kv_heads=2, max_position=1024),                                        # ~1.3M
    "micro": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=8,
                  num_kv_heads=4, max_position=1024),                                       # ~6.8M
    "20M": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                num_kv_heads=2),                                                            # ~21M
    "60M": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=12, num_heads=8,
                num_kv_heads=4),                                                            # ~52M
    "125M": dict(vocab_size=32000, hidden_size=768, intermediate_size=2304, num_layers=12, num_heads=12,
                 num_kv_heads=12),                                                          # ~117M
    "350M": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16,
                 num_kv_heads=8),                                                           # ~316M
    "1B": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, max_position=4096, rope_theta=500000.0),                     # ~1.04B
}
