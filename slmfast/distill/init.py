"""Students: built from a named or file config, or initialized from the teacher's layers.

Initialization from the teacher follows DistilBERT (Sanh et al. 2019): the student has the
teacher's width and a subset of its layers; embeddings, the final norm, the LM head and the
chosen layers are copied, so the student starts close to the teacher instead of from noise.
Layer choices: "every_other_layer" (0, 2, 4, ... as DistilBERT), "first_n" (layers 0..n-1), or
an explicit list of indices (kept in the given order).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from slmfast.distill.config import ConfigError, StudentConfig
from slmfast.models import CausalLM, LlamaConfig
from slmfast.models.config import NAMED_CONFIGS


def student_config(cfg: StudentConfig, vocab_size: int, seq_len: int) -> LlamaConfig:
    """A named config or a config.json, with the non-zero overrides of `cfg` and the data's vocab."""
    overrides = {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                                               "num_kv_heads") if getattr(cfg, k) > 0}
    if cfg.config in NAMED_CONFIGS:
        base = dict(NAMED_CONFIGS[cfg.config])
    elif Path(cfg.config).is_file():
        try:
            base = LlamaConfig.load(cfg.config).to_dict()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"student.config: {cfg.config} is not a valid model config: {e}") from None
    else:
        raise ConfigError(f"student.config: {cfg.config!r} is neither a named config "
                          f"({', '.join(NAMED_CONFIGS)}) nor a config.json file")
    if "hidden_size" in overrides and "num_heads" not in overrides:
        base["head_dim"] = None
    base.update(overrides)
    base["vocab_size"] = vocab_size
    base["max_position"] = max(base.get("max_position", 2048), seq_len)
    try:
        return LlamaConfig(**base)
    except ValueError as e:
        raise ConfigError(f"student: {e}") from None


def teacher_layer_indices(strategy, teacher_layers: int, num_layers: int = 0) -> list[int]:
    if isinstance(strategy, list):
        bad = [i for i in strategy if not 0 <= i < teacher_layers]
        if bad:
            raise ConfigError(f"student.init_from_teacher: layer indices {bad} out of range for a teacher "
                              f"with {teacher_layers} layers")
        return list(strategy)
    if strategy == "every_other_layer":
        return list(range(0, teacher_layers, 2))
    if strategy == "first_n":
        if not 0 < num_layers <= teacher_layers:
            raise ConfigError(f"student.num_layers: first_n needs 1..{teacher_layers} layers, "
                              f"got {num_layers}")
        return list(range(num_layers))
    raise ConfigError(f"student.init_from_teacher: unknown strategy {strategy!r}")


@torch.no_grad()
def init_from_teacher(teacher: CausalLM, strategy, num_layers: int = 0) -> CausalLM:
    """A student with the teacher's width and the chosen layers, weights copied (fp32)."""
    if not isinstance(teacher, CausalLM):
        raise ConfigError("student.init_from_teacher needs a slmfast (or Llama) teacher to copy layers from")
    indices = teacher_layer_indices(strategy, teacher.config.num_layers, num_layers)
    config = dataclasses.replace(teacher.config, num_layers=len(indices), extra=dict(teacher.config.extra))
    config.extra["init_from_teacher"] = {"layers": indices}
    student = CausalLM(config)
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            state[key] = source[f"model.layers.{indices[int(i)]}.{rest}"]
        else:
            state[key] = source[key]
    student.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=True)
    return student
