"""Saving and loading slmfast models: config.json + model.safetensors in one directory.

Weights are safetensors (no pickle: loading never runs code). A tied LM head is stored once
(under the embedding's name), as Hugging Face does, and re-tied on load. Directories are written
atomically (slmfast/io.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmfast.io import atomic_directory
from slmfast.models.config import LlamaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def state_dict_for_saving(model) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model_dir(model, directory: str | Path, extra_files: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        model.config.save(tmp / CONFIG_NAME)
        save_file({k: v.cpu() for k, v in state_dict_for_saving(model).items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "library": "slmfast"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def load_model_dir(cls, directory: str | Path, *, device=None, dtype=None):
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a slmfast model directory: {name} is missing")
    config = LlamaConfig.load(directory / CONFIG_NAME)
    model = cls(config)
    state = load_file(str(directory / WEIGHTS_NAME))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype)
