"""slmfast's attention under the name "slmfast" in transformers' AttentionInterface.

transformers calls `attention_forward(module, query, key, value, attention_mask, scaling=...,
dropout=..., sliding_window=..., softcap=..., **kwargs)` with query (B, Hq, T, D) and key/value
(B, Hkv, S, D) (not repeated for GQA) and expects (B, T, Hq, D) back. The mask it passes is made
by the mask function registered under the same name in AttentionMaskInterface: without that
registration a custom name receives attention_mask=None and padding is silently ignored (seen
with transformers 5.24: the real tokens of a left-padded batch got logits off by 0.25). Ours
returns what FlashAttention-2's does: None when there is no padding, else the 2-D boolean
padding mask (B, S), which `attention_forward` turns into packed documents
(cu_seqlens) so that padded positions cost nothing and are never attended to.

What the fused op does not cover falls back to transformers' SDPA attention with a one-time
warning (an error under SLMFAST_STRICT=1): attention dropout in training, a 4-D mask made by
someone else. Logit softcapping (Gemma 2) is not attempted: patch() leaves such a model on its
own attention implementation.
"""

from __future__ import annotations

import torch

from slmfast import backends
from slmfast.ops.attention import attention

NAME = "slmfast"


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """Mask function for AttentionMaskInterface: None, or the (B, kv_length) bool padding mask."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def _fallback(module, query, key, value, attention_mask, why, sliding_window=None, **kwargs):
    """transformers' SDPA attention with the full boolean mask (causal, window and padding),
    built here because the mask function registered for "slmfast" hands over only padding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    if backends.strict():
        raise ValueError(f"slmfast attention: {why} is not supported (SLMFAST_STRICT=1 forbids fallbacks)")
    backends.warn_once(f"slmfast attention: {why} is not supported by the fused op; using SDPA for it")
    B, _, T, _ = query.shape
    S = key.shape[2]
    if not getattr(module, "is_causal", True):
        mask_function = bidirectional_mask_function
    elif sliding_window is not None:
        mask_function = sliding_window_causal_mask_function(sliding_window)
    else:
        mask_function = causal_mask_function
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask  # someone else's full mask: use it as it is
    else:
        mask = sdpa_mask(B, T, S, q_offset=S - T, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, device=query.device)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


def _window(sliding_window, causal: bool):
    """transformers' sliding_window W lets a query see the W keys ending at its own position."""
    if sliding_window is None:
        return None
    return (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)


def _packed(query, key, value, mask, causal, scale, window):
    """Attention over the unpadded tokens of each row: (B, T, Hq, D) with zeros at padding."""
    B, Hq, T, D = query.shape
    S = key.shape[2]
    k_valid = mask                                                  # (B, S) bool
    q_valid = mask[:, S - T:] if S >= T else torch.ones(B, T, dtype=torch.bool, device=mask.device)
    q_len, k_len = q_valid.sum(1), k_valid.sum(1)                   # (B,)
    rows = (q_len > 0).nonzero().flatten()                          # rows with anything to compute
    out = query.new_zeros(B, T, Hq, D)
    if rows.numel() == 0:
        return out
    q_valid, k_valid = q_valid[rows], k_valid[rows]
    q = query[rows].transpose(1, 2)[q_valid]                         # (Nq, Hq, D)
    k = key[rows].transpose(1, 2)[k_valid]                           # (Nk, Hkv, D)
    v = value[rows].transpose(1, 2)[k_valid]
    zero = torch.zeros(1, dtype=torch.int32, device=mask.device)
    cu_q = torch.cat([zero, q_len[rows].cumsum(0).to(torch.int32)])
    cu_k = torch.cat([zero, k_len[rows].cumsum(0).to(torch.int32)])
    packed = attention(q, k, v, causal=causal, scale=scale, window=window, cu_seqlens=cu_q,
                       max_seqlen=int(q_len.max()), cu_seqlens_k=cu_k, max_seqlen_k=int(k_len.max()))
    selected = out[rows]                                             # (rows, T, Hq, D)
    selected[q_valid] = packed
    out[rows] = selected
    return out


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, **kwargs):
    causal = bool(getattr(module, "is_causal", True))
    if softcap is not None:  # patch() keeps such models on their own attention; this is the guard
        raise ValueError(f"slmfast attention does not support logit softcapping (softcap={softcap}); "
                         "keep this model's attention implementation")
    if dropout and module.training:
        return _fallback(module, query, key, value, attention_mask, f"attention dropout ({dropout})",
                         sliding_window, dropout=dropout, scaling=scaling)
    if attention_mask is not None and attention_mask.dim() != 2:
        return _fallback(module, query, key, value, attention_mask, "a 4-D attention mask", sliding_window,
                         dropout=dropout, scaling=scaling)
    window = _window(sliding_window, causal)
    if attention_mask is None:
        out = attention(query, key, value, causal=causal, scale=scaling, window=window)  # (B, Hq, T, D)
        return out.transpose(1, 2), None
    return _packed(query, key, value, attention_mask, causal, scaling, window), None


def register() -> None:
    """Make attn_implementation="slmfast" available to every transformers model (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
