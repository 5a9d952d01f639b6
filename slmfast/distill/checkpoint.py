"""Training checkpoints: written atomically, keep-last-N, loaded without unpickling code.

A checkpoint is a directory <out_dir>/checkpoints/step-XXXXXXXX/ holding
  config.json, model.safetensors   the student, in slmfast's model format (so a checkpoint is
                                   also a model directory: a teacher, or `from_pretrained`)
  tokenizer.json                   the data tokenizer
  optimizer.pt                     optimizer state_dict (tensors, numbers, lists)
  rng.pt                           torch CPU (+ CUDA) generator states and Python's `random` state
  trainer_state.json               step, tokens, data position, fault counters, run identity
It is built in a hidden temporary sibling and renamed into place (slmfast.io.atomic_directory),
so a crash or `kill -9` at any moment leaves the previous checkpoints intact and no partial
step-* directory. optimizer.pt and rng.pt are read with torch.load(weights_only=True), which
refuses anything but tensors and plain containers; weights are safetensors.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from slmfast.io import atomic_directory

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary/partial directories are hidden names)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor], model_config,
                    optimizer_state: dict, trainer_state: dict, tokenizer_json: str | None = None,
                    keep_last: int = 3) -> Path:
    """Write step-XXXXXXXX atomically, then delete all but the newest `keep_last`."""
    from safetensors.torch import save_file

    target = checkpoint_dir(out_dir) / f"step-{step:08d}"
    with atomic_directory(target) as tmp:
        model_config.save(tmp / "config.json")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
        if model_config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "library": "slmfast"})
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    prune(out_dir, keep_last)
    return target


def prune(out_dir: str | Path, keep_last: int) -> None:
    found = list_checkpoints(out_dir)
    for old in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of writes interrupted by a crash (hidden temporary siblings).
    root = checkpoint_dir(out_dir)
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """{'model': state dict (lm_head re-tied), 'config': LlamaConfig, 'optimizer', 'rng', 'state'}."""
    from safetensors.torch import load_file

    from slmfast.models import LlamaConfig

    path = Path(path)
    for name in ("config.json", "model.safetensors", "optimizer.pt", "rng.pt", STATE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {name} is missing")
    config = LlamaConfig.load(path / "config.json")
    model = load_file(str(path / "model.safetensors"))
    if config.tie_embeddings:
        model["lm_head.weight"] = model["model.embed_tokens.weight"]
    return {
        "model": model,
        "config": config,
        "optimizer": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        "state": json.loads((path / STATE_FILE).read_text()),
    }
