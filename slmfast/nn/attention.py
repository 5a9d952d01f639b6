"""Attention and KVCache: a multi-head attention module (GQA/MQA, RoPE hook, packed documents,
sliding windows) on slmfast's fused attention op, and the preallocated cache for generation.

Attention has Hugging Face Llama's projection layout and names (q_proj, k_proj, v_proj, o_proj,
`bias` for all four as `attention_bias` does), so a LlamaAttention state_dict loads as is. The
math is that of LlamaAttention with the eager backend: q, k, v projections, rotary embedding
(position_embeddings = (cos, sin) as HF's rotary embeddings and slmfast.nn.RotaryEmbedding
return them, applied by slmfast.functional.rotary), softmax(q k^T / sqrt(D)) v
with the causal mask, output projection, without materializing the T x S probabilities.

    forward(x, position_embeddings=None, cu_seqlens=None, max_seqlen=None, kv_cache=None)
    forward_with_norm(x, norm, residual=None, ...): the block's RMSNorm (and residual add) fused into
      the q/k/v projections, as SwiGLUMLP.forward_with_norm does for gate/up
      x (B, T, C) dense, or (N, C) packed documents with cu_seqlens (int32, docs + 1) and
      max_seqlen; with a KVCache (dense only) the new keys/values are appended and the T new
      queries attend to everything cached, causal masks aligned bottom-right.
"""

from __future__ import annotations

import torch

from slmfast.nn.norm_linear import norm_linear
from slmfast.ops.attention import attention
from slmfast.ops.rotary import rotary


class KVCache:
    """Preallocated key/value buffers (B, Hkv, max_len, D) for one attention layer.

    update(k, v) appends k, v (B, Hkv, T, D) at the current length and returns views of
    everything cached so far, (B, Hkv, length, D) each; reset() empties it for reuse.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype | None = None, device=None):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, Hkv, max_len, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expected = (*self.k.shape[:2], k.shape[2] if k.dim() == 4 else -1, self.k.shape[3])
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or tuple(t.shape) != expected:
                raise ValueError(f"KVCache.update: {name} must have shape (B, Hkv, T, D) = {expected}, "
                                 f"got {tuple(t.shape)}")
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache.update: {k.shape[2]} new positions after {self.length} exceed "
                             f"max_len {self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0


class Attention(torch.nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, causal: bool = True,
                 window: tuple[int, int] | None = None, backend: str | None = None, *,
                 device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"Attention: hidden_size ({hidden_size}) is not divisible by num_heads "
                                 f"({num_heads}); pass head_dim")
            head_dim = hidden_size // num_heads
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.causal, self.window, self.backend = head_dim, causal, window, backend
        factory = {"device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **factory)

    def _check_input(self, x: torch.Tensor, cu_seqlens, kv_cache) -> None:
        if cu_seqlens is None and x.dim() != 3:
            raise ValueError(f"Attention: x must be (B, T, C) (or (N, C) with cu_seqlens), "
                             f"got {tuple(x.shape)}")
        if cu_seqlens is not None:
            if x.dim() != 2:
                raise ValueError(f"Attention: packed x must be (N, C), got {tuple(x.shape)}")
            if kv_cache is not None:
                raise ValueError("Attention: kv_cache works with dense (B, T, C) inputs, not packed ones")

    def _heads(self, q, k, v):
        """Projections (..., H*D) -> heads: dense (B, H, T, D), packed (N, H, D)."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if q.dim() == 3:
            B, T = q.shape[:2]
            return (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2),
                    v.view(B, T, Hkv, D).transpose(1, 2))
        N = q.shape[0]
        return q.view(N, H, D), k.view(N, Hkv, D), v.view(N, Hkv, D)

    def attend(self, q, k, v, position_embeddings=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """Everything after the q/k/v projections: RoPE, the cache, attention and o_proj.
        q, k, v are the projections' outputs, (B, T, H*D) dense or (N, H*D) packed."""
        q, k, v = self._heads(q, k, v)                            # (B, H, T, D) / (N, H, D)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = rotary(q, k, cos, sin, backend=self.backend)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, Hkv, cached + T, D)
        out = attention(q, k, v, causal=self.causal, window=self.window, cu_seqlens=cu_seqlens,
                        max_seqlen=max_seqlen, backend=self.backend)
        if cu_seqlens is None:
            B, _, T, _ = out.shape
            out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        else:
            out = out.reshape(out.shape[0], -1)           # (N, H*D)
        return self.o_proj(out)

    def forward(self, x: torch.Tensor, position_embeddings=None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        self._check_input(x, cu_seqlens, kv_cache)
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), position_embeddings,
                           cu_seqlens, max_seqlen, kv_cache)

    def forward_with_norm(self, x: torch.Tensor, norm: torch.nn.Module, residual: torch.Tensor | None = None,
                          position_embeddings=None, cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """self(norm(x + residual)) with the RMSNorm fused into q/k/v (slmfast.nn.norm_linear), so
        the normalized activation is not stored: returns out, or (out, h) with h = x + residual."""
        self._check_input(x, cu_seqlens, kv_cache)
        outs = norm_linear(x, norm, [self.q_proj, self.k_proj, self.v_proj], residual, backend=self.backend)
        out = self.attend(outs[0], outs[1], outs[2], position_embeddings, cu_seqlens, max_seqlen, kv_cache)
        return out if residual is None else (out, outs[3])

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, causal={self.causal}"
                + (f", window={self.window}" if self.window is not None else ""))
