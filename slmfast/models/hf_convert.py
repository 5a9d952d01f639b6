"""Conversion between slmfast's CausalLM and transformers' LlamaForCausalLM.

Both use the same parameter names (model.embed_tokens, model.layers.N.self_attn.q_proj, ...,
lm_head), so the state dict is copied key for key and round-trips exactly. RoPE settings map to
`rope_parameters` (transformers >= 5) or `rope_theta` / `rope_scaling` (4.x).
"""

from __future__ import annotations

import dataclasses

import torch

from slmfast.models.config import LlamaConfig


def _hf_config_fields() -> set[str]:
    import transformers

    cfg_cls = transformers.LlamaConfig
    if dataclasses.is_dataclass(cfg_cls):
        return {f.name for f in dataclasses.fields(cfg_cls)}
    import inspect
    return set(inspect.signature(cfg_cls.__init__).parameters)


def hf_config(config: LlamaConfig):
    import transformers

    if config.sliding_window is not None:
        raise ValueError("to_hf: LlamaForCausalLM has no sliding window; this config sets sliding_window")
    kwargs = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  head_dim=config.head_dim, max_position_embeddings=config.max_position,
                  rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_embeddings,
                  attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
                  initializer_range=config.init_std)
    if "rope_parameters" in _hf_config_fields():
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
        if config.rope_scaling:
            rope.update(config.rope_scaling)
            rope["rope_theta"] = config.rope_theta
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = config.rope_theta
        kwargs["rope_scaling"] = dict(config.rope_scaling) if config.rope_scaling else None
    return transformers.LlamaConfig(**kwargs)


def slmfast_config(hf) -> LlamaConfig:
    rope = getattr(hf, "rope_parameters", None)
    if rope:
        theta = rope.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = None if scaling.get("rope_type", "default") == "default" else scaling
    else:
        theta = getattr(hf, "rope_theta", 10000.0)
        scaling = getattr(hf, "rope_scaling", None)
    return LlamaConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                       intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
                       num_heads=hf.num_attention_heads,
                       num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                       head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                       max_position=hf.max_position_embeddings, rope_theta=float(theta),
                       rope_scaling=scaling, rms_norm_eps=hf.rms_norm_eps,
                       tie_embeddings=bool(hf.tie_word_embeddings),
                       attention_bias=bool(getattr(hf, "attention_bias", False)),
                       mlp_bias=bool(getattr(hf, "mlp_bias", False)))


def to_hf(model):
    import transformers

    hf = transformers.LlamaForCausalLM(hf_config(model.config))
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: state dicts differ: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf


def from_hf(cls, hf_model):
    if hf_model.__class__.__name__ != "LlamaForCausalLM":
        raise ValueError(f"from_hf converts LlamaForCausalLM, got {hf_model.__class__.__name__}; "
                         "use slmfast.integrations.hf.patch to speed up other architectures in place")
    config = slmfast_config(hf_model.config)
    model = cls(config)
    param = next(hf_model.parameters())
    model.to(device=param.device, dtype=param.dtype)
    state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model
