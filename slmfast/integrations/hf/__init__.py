"""transformers integration: slmfast's kernels in an existing Hugging Face model, in one line.

    from slmfast.integrations import hf
    model = hf.AutoModelForCausalLM.from_pretrained(path)      # load and patch
    hf.patch(model)                                             # or patch a loaded model
    hf.unpatch(model)                                           # and put everything back

`register()` adds attn_implementation="slmfast" (attention.py); `patch` swaps norms, gated MLPs
and RoPE (modules.py), switches the attention to "slmfast" and computes the causal-LM loss
without logits (loss.py). Architectures with a known layout: Llama, Mistral, Qwen2, Qwen3,
Gemma, Gemma 2, Phi-3, GPT-2; any other model gets the attention only, with a warning that
names what was not patched. The patched model keeps its parameters, state_dict and class.
`DistillationTrainer` (distill.py) is a transformers.Trainer that distils a teacher with the fused
distillation losses.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from slmfast.integrations.hf.attention import NAME, attention_forward, padding_mask, register
from slmfast.integrations.hf.loss import patch_loss, unpatch_loss
from slmfast.integrations.hf.modules import patch_mlps, patch_norms, patch_rotary

__all__ = ["NAME", "AutoModelForCausalLM", "DistillationTrainer", "attention_forward", "padding_mask",
           "patch", "register", "unpatch", "KNOWN_ARCHITECTURES"]

KNOWN_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2")
_STATE = "_slmfast_patch"


def _isolate_config(model: nn.Module) -> None:
    """Give the model its own config object: models built from one config share it, and
    set_attn_implementation on one would switch the other too."""
    old = model.config
    new = copy.deepcopy(old)
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def patch(model: nn.Module, *, attention: bool = True, rms_norm: bool = True, mlp: bool = True,
          rotary: bool = True, loss: bool = True) -> nn.Module:
    """Swap in slmfast's kernels in place; returns the model. Patching twice is an error."""
    if hasattr(model, _STATE):
        raise ValueError("this model is already patched by slmfast; unpatch it first")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = model_type in KNOWN_ARCHITECTURES
    swaps, done = [], []
    state = {"swaps": swaps, "attn_implementation": None, "loss": False, "config": None}
    if known:
        if rms_norm and patch_norms(model, swaps):
            done.append("norms")
        if mlp and patch_mlps(model, swaps):
            done.append("mlp")
        if rotary and patch_rotary(model, swaps):
            done.append("rotary")
        if loss and patch_loss(model):
            state["loss"] = True
            done.append("loss")
    softcap = getattr(getattr(model, "config", None), "attn_logit_softcapping", None)
    if attention and softcap is not None:
        warnings.warn(f"slmfast.integrations.hf.patch: the attention of {model_type} uses logit softcapping "
                      f"({softcap}), which the fused op does not implement; keeping its own attention",
                      stacklevel=2)
        attention = False
    if attention and hasattr(model, "set_attn_implementation"):
        register()
        state["config"] = model.config
        state["attn_implementation"] = model.config._attn_implementation
        _isolate_config(model)
        model.set_attn_implementation(NAME)
        done.append("attention")
    if not known:
        warnings.warn(f"slmfast.integrations.hf.patch: {model_type or type(model).__name__} is not one of "
                      f"{', '.join(KNOWN_ARCHITECTURES)}; patched only: {', '.join(done) or 'nothing'} "
                      "(norms, MLP, RoPE and loss left as they are)", stacklevel=2)
    setattr(model, _STATE, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): original modules, functions, forward, attention and config."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("this model is not patched by slmfast")
    for swap in reversed(state["swaps"]):
        swap.undo()
    if state["loss"]:
        unpatch_loss(model)
    if state["config"] is not None:
        own = model.config
        for module in model.modules():
            if getattr(module, "config", None) is own:
                module.config = state["config"]
        if state["config"]._attn_implementation != state["attn_implementation"]:
            model.set_attn_implementation(state["attn_implementation"])
    delattr(model, _STATE)
    return model


def __getattr__(name: str):
    # DistillationTrainer imports transformers' Trainer (and accelerate): only when asked for.
    if name == "DistillationTrainer":
        from slmfast.integrations.hf.distill import DistillationTrainer
        return DistillationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class AutoModelForCausalLM:
    """transformers.AutoModelForCausalLM.from_pretrained, then patch()."""

    @staticmethod
    def from_pretrained(*args, patch_options: dict | None = None, **kwargs):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(*args, **kwargs)
        return patch(model, **(patch_options or {}))
