"""In-place module swaps for Hugging Face models: norms, gated MLPs and RoPE.

Each swap keeps the model's parameters (the same Parameter objects move into the new module,
under the same attribute names), so the state_dict, an optimizer built before the patch and
tied weights are untouched; each swap is recorded so that `unpatch` can put the original module
(or function) back.

  norms   *RMSNorm -> slmfast.nn.RMSNorm (Gemma's (1 + w) norms with offset=1.0);
          torch.nn.LayerNorm -> slmfast.nn.LayerNorm (GPT-2)
  mlp     modules with gate_proj/up_proj/down_proj and a SiLU or tanh-GELU act_fn ->
          slmfast.nn.SwiGLUMLP / GeGLUMLP (Llama, Mistral, Qwen2/3, Gemma/Gemma2);
          Phi-3's fused gate_up_proj MLP gets a forward on slmfast.functional.swiglu
  rotary  the modeling module's apply_rotary_pos_emb -> slmfast.functional.rotary (a module-level
          function: every model of that architecture in the process uses it while any patched
          model is alive; unpatching the last one restores it)
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from slmfast import functional as F
from slmfast.nn import GeGLUMLP, LayerNorm, RMSNorm, SwiGLUMLP

GEMMA_STYLE_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


class Swap:
    """One replaced attribute, and how to put it back."""

    def __init__(self, owner, name: str, old, new):
        self.owner, self.name, self.old, self.new = owner, name, old, new

    def undo(self) -> None:
        setattr(self.owner, self.name, self.old)


def _replace_child(parent: nn.Module, name: str, new: nn.Module, swaps: list[Swap]) -> None:
    old = getattr(parent, name)
    swaps.append(Swap(parent, name, old, new))
    setattr(parent, name, new)


def _norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    raise ValueError(f"cannot find the epsilon of {type(module).__name__}")


def _new_rms_norm(old: nn.Module) -> RMSNorm:
    offset = 1.0 if type(old).__name__ in GEMMA_STYLE_NORMS else 0.0
    weight = old.weight
    new = RMSNorm(tuple(weight.shape), eps=_norm_eps(old), offset=offset, device="meta")
    new.weight = weight
    return new


def _new_layer_norm(old: nn.LayerNorm) -> LayerNorm:
    new = LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.weight is not None,
                    bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias
    return new


def patch_norms(model: nn.Module, swaps: list[Swap]) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind.endswith("RMSNorm") and isinstance(getattr(child, "weight", None), nn.Parameter):
                _replace_child(parent, name, _new_rms_norm(child), swaps)
                count += 1
            elif type(child) is nn.LayerNorm:
                _replace_child(parent, name, _new_layer_norm(child), swaps)
                count += 1
    return count


def _activation(act) -> str | None:
    """'silu', 'gelu_tanh', 'gelu' for the activations the fused GLU kernels implement: torch's
    modules and transformers' own (activations.py: SiLUActivation, GELUTanh, NewGELUActivation,
    GELUActivation), recognized by class name so that no transformers version is imported."""
    name = type(act).__name__
    approximate = getattr(act, "approximate", None)
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if name in ("PytorchGELUTanh", "GELUTanh", "NewGELUActivation") or \
            (isinstance(act, nn.GELU) and approximate == "tanh"):
        return "gelu_tanh"
    if (isinstance(act, nn.GELU) and approximate == "none") or name == "GELUActivation":
        return "gelu"
    return None


def _new_gated_mlp(old: nn.Module, activation: str) -> nn.Module:
    hidden, inter = old.gate_proj.in_features, old.gate_proj.out_features
    bias = old.gate_proj.bias is not None
    if activation == "silu":
        new = SwiGLUMLP(hidden, inter, bias=bias, device="meta")
    else:
        new = GeGLUMLP(hidden, inter, bias=bias, approximate="tanh" if activation == "gelu_tanh" else "none",
                       device="meta")
    new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
    return new


def _phi3_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)     # (..., I) each
    return self.down_proj(F.swiglu(gate, up))


def patch_mlps(model: nn.Module, swaps: list[Swap]) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if all(hasattr(child, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                activation = _activation(child.act_fn)
                if activation is not None:
                    _replace_child(parent, name, _new_gated_mlp(child, activation), swaps)
                    count += 1
            elif hasattr(child, "gate_up_proj") and hasattr(child, "down_proj") and \
                    _activation(getattr(child, "activation_fn", None)) == "silu":
                swaps.append(_ForwardSwap(child))
                child.forward = types.MethodType(_phi3_forward, child)
                count += 1
    return count


class _ForwardSwap(Swap):
    """A forward set on the instance; undo deletes it so the class's forward shows again."""

    def __init__(self, module: nn.Module):
        super().__init__(module, "forward", None, None)

    def undo(self) -> None:
        del self.owner.forward


def _fused_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or q.dim() != 4:
            return original(q, k, cos, sin, position_ids, unsqueeze_dim) if position_ids is not None \
                else original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return F.rotary(q, k, cos, sin)  # q (B, Hq, T, D), cos/sin (B, T, rotary_dim)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


_rotary_users: dict[str, int] = {}


def patch_rotary(model: nn.Module, swaps: list[Swap]) -> int:
    module = sys.modules.get(type(model).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None) if module else None
    if original is None:
        return 0
    key = module.__name__
    if _rotary_users.get(key, 0) == 0:
        module.apply_rotary_pos_emb = _fused_rotary(original)
    _rotary_users[key] = _rotary_users.get(key, 0) + 1
    swaps.append(_RotarySwap(module, original))
    return 1


class _RotarySwap(Swap):
    def __init__(self, module, original):
        super().__init__(module, "apply_rotary_pos_emb", original, None)

    def undo(self) -> None:
        key = self.owner.__name__
        _rotary_users[key] -= 1
        if _rotary_users[key] == 0:
            self.owner.apply_rotary_pos_emb = self.old
