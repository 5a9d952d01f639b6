"""Saving and loading slmfast models: config.json + model.safetensors in one directory.

Weights are safetensors (no pickle: loading never runs code). A tied LM head is stored once
(under the embedding's name), as Hugging Face does, and re-tied on load. Directories are written
atomically (slmfast/io.py).

Two layers: `write_model_files`/`read_model_files` handle the two files inside a directory that
the caller owns (a training checkpoint adds its own files next to them, slmfast/distill/
checkpoint.py), and `save_model_dir`/`load_model_dir` wrap them for a whole model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slmfast.io import atomic_directory
from slmfast.models.config import LlamaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def weights_for_saving(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached copies of `state`, without the LM head when it is tied to the
    embedding (safetensors refuses two names for one storage)."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        weights.pop(TIED_HEAD, None)
    return weights


def write_model_files(directory: str | Path, state: dict[str, torch.Tensor], config: LlamaConfig) -> None:
    """Write config.json and model.safetensors into an existing directory (not atomic by itself:
    the caller writes into a temporary directory, see slmfast.io.atomic_directory)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config.save(directory / CONFIG_NAME)
    save_file(weights_for_saving(state, config), str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "library": "slmfast"})


def read_model_files(directory: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from config.json and model.safetensors, the LM head re-tied to the
    embedding when the config ties them."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a slmfast model directory: {name} is missing")
    config = LlamaConfig.load(directory / CONFIG_NAME)
    state = load_file(str(directory / WEIGHTS_NAME))
    if config.tie_embeddings:
        state[TIED_HEAD] = state[EMBEDDING]
    return config, state


def save_model_dir(model, directory: str | Path, extra_files: dict[str, str] | None = None) -> None:
    """Write `model` (and `extra_files`, name -> text) as a model directory, atomically."""
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, model.state_dict(), model.config)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def load_model_dir(cls, directory: str | Path, *, device=None, dtype=None):
    """An instance of `cls` (CausalLM) built from the directory's config, with its weights."""
    config, state = read_model_files(directory)
    model = cls(config)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype)
