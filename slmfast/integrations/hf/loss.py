"""The causal-LM loss of a Hugging Face model computed without logits.

With labels, the patched forward runs the base model for the final hidden states and computes
the loss with slmfast.functional.linear_cross_entropy against lm_head's weight (and bias, and
Gemma 2's final_logit_softcapping), so the (tokens x vocab) logits and their gradient are never
materialized. The loss is transformers' ForCausalLMLoss: position t predicts labels[t + 1],
-100 is ignored, the mean is over predicted tokens or over `num_items_in_batch` when the
Trainer passes it (gradient accumulation). The output's logits are None; without labels the
original forward runs unchanged.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from slmfast import functional as F

IGNORE_INDEX = -100


def _fused_loss_forward(self, original, *args, **kwargs):
    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    arguments = dict(bound.arguments)
    extra = arguments.pop("kwargs", {}) if "kwargs" in inspect.signature(original).parameters else {}
    labels = arguments.pop("labels", None)
    if labels is None:
        return original(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = extra.pop("num_items_in_batch", None)
    arguments.pop("logits_to_keep", None)
    arguments.pop("return_dict", None)
    base = getattr(self, self.base_model_prefix)
    outputs = base(**arguments, **extra)
    hidden = outputs.last_hidden_state                                 # (B, T, H)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]                                # (B, T)
    head = self.get_output_embeddings()
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = F.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                  targets.reshape(-1).to(hidden.device), bias=head.bias,
                                  ignore_index=IGNORE_INDEX, softcap=softcap, num_items=num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None,
                                  past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))


def patch_loss(model: nn.Module) -> bool:
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        return False
    if not hasattr(model, getattr(model, "base_model_prefix", "")):
        return False
    original = model.forward

    def forward(*args, **kwargs):
        return _fused_loss_forward(model, original, *args, **kwargs)

    # The original signature: transformers.Trainer keeps only the batch columns that forward names.
    forward.__signature__ = inspect.signature(original)
    model._slmfast_original_forward = original
    model.forward = forward
    return True


def unpatch_loss(model: nn.Module) -> None:
    if "_slmfast_original_forward" in model.__dict__:
        del model.forward
        del model._slmfast_original_forward
