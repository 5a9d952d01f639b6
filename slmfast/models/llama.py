"""CausalLM: a Llama-style decoder built only from slmfast.nn modules.

The architecture is Llama's (Touvron et al. 2023): pre-norm blocks of RMSNorm -> GQA attention
with RoPE -> residual -> RMSNorm -> SwiGLU MLP -> residual, a final RMSNorm and an LM head tied
to the embeddings or not. Parameter names are Hugging Face's LlamaForCausalLM names, so that
`to_hf` / `from_hf` copy state dicts key for key.

What differs from a plain implementation is where the memory goes:
  * each RMSNorm is fused into the projections that read it (slmfast.nn.norm_linear), and the
    attention's residual add into the post-attention norm (`residual=`): what is saved is the
    residual stream and one rstd per row, never the normalized activation; blocks pass one
    tensor, the stream, so a checkpointed block keeps one tensor;
  * with labels, the loss is slmfast.functional.linear_cross_entropy on the final hidden states:
    the (tokens x vocab) logits are never materialized;
  * packed sequences (`cu_seqlens`) run the packed attention, so documents packed in one row
    never attend to each other, and RoPE positions restart at every document.

Initialization (`init_weights`): linear weights ~ N(0, init_std); o_proj and down_proj scaled by
1/sqrt(2 * num_layers) (GPT-2, Radford et al. 2019) or zero with `zero_init_residual`; the LM
head (the embedding matrix when tied) ~ N(0, init_logit_std / sqrt(hidden_size)), so the
logits at init have std ~init_logit_std and the loss at step 0 is ~ln(vocab) + std^2 / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slmfast import functional as F
from slmfast.models.config import LlamaConfig
from slmfast.nn import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLUMLP

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None        # scalar, mean over predicted tokens (or / num_items)
    logits: torch.Tensor | None = None      # (B, T, V) or (N, V); only without labels
    hidden_states: torch.Tensor | None = None  # final normed hidden states (B, T, H) or (N, H)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token inside its document: (N,) int64, restarting at 0."""
    starts = cu_seqlens[:-1].long()                                   # (docs,)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()               # (docs,)
    doc_start_per_token = torch.repeat_interleave(starts, lengths, output_size=total)  # (N,)
    return torch.arange(total, device=cu_seqlens.device) - doc_start_per_token


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t + 1]; the last position
    of each sequence (and of each packed document) predicts nothing (IGNORE_INDEX)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    if cu_seqlens is not None:
        targets.view(-1)[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return targets


class DecoderLayer(nn.Module):
    # The "selective" recompute policy (slmfast/recompute/policies.py) is what these kernels do
    # already: they save matmul inputs and attention's q, k, v, out, lse, and recompute the norms,
    # the SwiGLU product and RoPE in backward. The policy leaves this block as it is.
    SELECTIVE_IN_KERNELS = True

    def __init__(self, config: LlamaConfig):
        super().__init__()
        window = None if config.sliding_window is None else (config.sliding_window - 1, 0)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads,
                                   head_dim=config.head_dim, bias=config.attention_bias, causal=True,
                                   window=window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, stream, position_embeddings, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """stream: the residual stream (B, T, H) or (N, H). Returns the stream after this block.
        Both RMSNorms are fused into the projections that read them, the attention's residual add
        into the second one, so neither a sum nor a normalized activation is stored for backward."""
        attn = self.self_attn.forward_with_norm(
            stream, self.input_layernorm, position_embeddings=position_embeddings, cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen, kv_cache=kv_cache)
        mlp, stream = self.mlp.forward_with_norm(attn, self.post_attention_layernorm, stream)
        return stream + mlp


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's LlamaModel)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta,
                                          max_position=config.max_position, scaling=config.rope_scaling)

    def forward(self, input_ids, position_ids, cu_seqlens=None, max_seqlen=None, kv_caches=None):
        hidden = self.embed_tokens(input_ids)                       # (B, T, H) or (N, H)
        cos, sin = self.rotary_emb(position_ids)                     # (B, T, D) / (N, D), fp32
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)
        for i, layer in enumerate(self.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            hidden = layer(hidden, (cos, sin), cu_seqlens, max_seqlen, cache)
        return self.norm(hidden)


class CausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    # ---- initialization -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        cfg = self.config
        residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                is_output = name.endswith("o_proj") or name.endswith("down_proj")
                if is_output and cfg.zero_init_residual:
                    module.weight.zero_()
                else:
                    std = residual_std if is_output else cfg.init_std
                    module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        head_std = cfg.init_logit_std / math.sqrt(cfg.hidden_size)
        self.lm_head.weight.normal_(0.0, head_std, generator=generator)
        if not cfg.tie_embeddings:
            self.model.embed_tokens.weight.normal_(0.0, cfg.init_std, generator=generator)

    # ---- forward --------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        """The LM-head weight (V, H): what the fused losses take instead of logits."""
        return self.lm_head.weight

    def _positions(self, input_ids, cu_seqlens, past_length: int) -> torch.Tensor:
        if cu_seqlens is not None:
            return positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0])      # (N,)
        T = input_ids.shape[-1]
        return torch.arange(past_length, past_length + T, device=input_ids.device)  # (T,)

    def hidden_states(self, input_ids, cu_seqlens=None, max_seqlen=None, kv_caches=None):
        """Final normed hidden states: (B, T, H) for dense input, (N, H) for packed input."""
        if cu_seqlens is not None:
            if input_ids.dim() == 2 and input_ids.shape[0] == 1:
                input_ids = input_ids[0]
            if input_ids.dim() != 1:
                raise ValueError("CausalLM: packed input_ids (with cu_seqlens) must have shape (N,) or "
                                 f"(1, N), got {tuple(input_ids.shape)}")
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        elif input_ids.dim() != 2:
            raise ValueError(f"CausalLM: input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        past = kv_caches[0].length if kv_caches is not None else 0
        positions = self._positions(input_ids, cu_seqlens, past)
        return self.model(input_ids, positions, cu_seqlens, max_seqlen, kv_caches)

    def forward(self, input_ids, labels=None, cu_seqlens=None, max_seqlen=None, num_items=None,
                kv_caches=None) -> CausalLMOutput:
        """With labels (same shape as input_ids, HF convention: shifted inside), the loss from the
        fused linear cross-entropy and no logits; without labels, the logits."""
        hidden = self.hidden_states(input_ids, cu_seqlens, max_seqlen, kv_caches)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden), hidden_states=hidden)
        if cu_seqlens is not None and labels.dim() == 2:
            labels = labels[0]
        targets = shift_labels(labels, cu_seqlens)
        loss = F.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.output_weight,
                                      targets.reshape(-1), ignore_index=IGNORE_INDEX, num_items=num_items)
        return CausalLMOutput(loss=loss, hidden_states=hidden)

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample max_new_tokens after the prompt (B, T0) with a KV cache; temperature 0 is greedy.
        Returns (B, T0 + new); after eos, a sequence keeps emitting eos."""
        if input_ids.dim() != 2:
            raise ValueError(f"generate: input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        B, T0 = input_ids.shape
        total = T0 + max_new_tokens
        if total > self.config.max_position:
            raise ValueError(f"generate: prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position ({self.config.max_position})")
        cfg = self.config
        param = self.lm_head.weight
        caches = [KVCache(B, cfg.num_kv_heads, total, cfg.head_dim, dtype=param.dtype, device=param.device)
                  for _ in range(cfg.num_layers)]
        tokens = input_ids
        step_input = input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            hidden = self.hidden_states(step_input, kv_caches=caches)   # (B, t, H)
            logits = self.lm_head(hidden[:, -1]).float()                # (B, V)
            if temperature == 0:
                next_token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
        return tokens

    # ---- save / load ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors (the tied LM head is stored once, as HF does),
        written to a temporary folder and renamed into place."""
        from slmfast.models.io import save_model_dir
        save_model_dir(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device=None, dtype=None) -> CausalLM:
        from slmfast.models.io import load_model_dir
        return load_model_dir(cls, directory, device=device, dtype=dtype)

    def to_hf(self):
        from slmfast.models.hf_convert import to_hf
        return to_hf(self)

    @classmethod
    def from_hf(cls, hf_model) -> CausalLM:
        from slmfast.models.hf_convert import from_hf
        return from_hf(cls, hf_model)
