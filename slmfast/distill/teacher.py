"""The teacher: a frozen model that gives final hidden states and its LM-head weight.

Distillation here never builds the teacher's (tokens x vocab) logits: the loss
(slmfast.functional.distill_loss) takes the teacher's final normed hidden states and output
weight and works chunk by chunk. So a teacher is anything that yields those two:
  * a slmfast checkpoint directory (config.json + model.safetensors): slmfast's CausalLM, which
    runs packed batches (cu_seqlens) natively;
  * a local transformers model directory (AutoModelForCausalLM; offline, so a path, not a hub
    name): a LlamaForCausalLM is converted to slmfast's CausalLM (same weights, packed
    attention); any other architecture runs as is on a right-padded batch built from the packed
    segments, and its hidden states are gathered back to the packed layout.
The teacher is frozen (requires_grad False), in eval mode and run under no_grad, optionally on
another device or in another dtype. Its tokenizer must be the data's: the same vocabulary, with
extra (padding) rows of the teacher's embedding allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from slmfast.distill.tokenizer import find_tokenizer_file, load_tokenizer, same_vocabulary

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_id(directory: Path) -> str:
    """A fast identity of a model's weights: sha256 over each weight file's name, size, and its
    first and last 8 MiB (retraining changes every byte, so this separates checkpoints without
    reading gigabytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".json")
                   and not p.name.startswith("."))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(8 << 20))
            if size > 16 << 20:
                f.seek(size - (8 << 20))
                digest.update(f.read())
    return digest.hexdigest()


def is_slmfast_dir(path: Path) -> bool:
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return False
    config = json.loads((path / "config.json").read_text())
    return "num_layers" in config and "model_type" not in config


class Teacher:
    """A frozen teacher. `hidden(batch)` -> (N, H) final hidden states of the packed batch;
    `output_weight` (V_t, H) and `output_bias` (V_t,) or None."""

    def __init__(self, model: nn.Module, kind: str, ident: str, path: str):
        self.model, self.kind, self.id, self.path = model, kind, ident, path
        self.sharded: nn.Module | None = None       # the FSDP-wrapped forward, once shard() ran
        self._full_weight: torch.Tensor | None = None
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def shard(self) -> None:
        """FSDP2 over the teacher's layers and the rest (for a teacher too large to replicate):
        each rank keeps 1/world of the weights, gathered layer by layer as the forward runs. The
        LM-head weight, which the loss needs outside any forward, is gathered once and kept."""
        from torch.distributed.fsdp import fully_shard

        if self.kind != "slmfast":
            raise ValueError("teacher.shard supports slmfast (and Llama) teachers")
        self._full_weight = self.model.output_weight.detach().clone()              # (V, H)
        wrapper = _HiddenForward(self.model)
        for layer in self.model.model.layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(wrapper)
        self.sharded = wrapper

    @property
    def device(self) -> torch.device:
        return self.output_weight.device

    @property
    def vocab_size(self) -> int:
        return self.output_weight.shape[0]

    @property
    def output_weight(self) -> torch.Tensor:
        if self._full_weight is not None:
            return self._full_weight
        if self.kind == "hf":
            return self.model.get_output_embeddings().weight
        return self.model.output_weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        if self.kind == "hf":
            return getattr(self.model.get_output_embeddings(), "bias", None)
        return None

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """(N,) packed ids with segment starts cu_seqlens -> (N, H) final normed hidden states."""
        input_ids = input_ids.to(self.device)
        cu_seqlens = cu_seqlens.to(self.device)
        if self.sharded is not None:
            return self.sharded(input_ids, cu_seqlens, max_seqlen)
        if self.kind == "slmfast":
            return self.model.hidden_states(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self._hf_hidden(input_ids, cu_seqlens, max_seqlen)

    def _hf_hidden(self, input_ids, cu_seqlens, max_seqlen):
        # Packed -> right-padded (S, max_len), run the decoder with a padding mask, gather back.
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()                        # (S,)
        S, N = lengths.numel(), input_ids.numel()
        seg = torch.repeat_interleave(torch.arange(S, device=self.device), lengths)  # (N,)
        pos = torch.arange(N, device=self.device) - cu_seqlens[:-1].long()[seg]     # (N,)
        padded = torch.zeros(S, max_seqlen, dtype=input_ids.dtype, device=self.device)
        padded[seg, pos] = input_ids
        mask = torch.zeros(S, max_seqlen, dtype=torch.long, device=self.device)
        mask[seg, pos] = 1
        out = self.model.get_decoder()(input_ids=padded, attention_mask=mask, use_cache=False)
        return out.last_hidden_state[seg, pos]                                      # (N, H)


class _HiddenForward(nn.Module):
    """The teacher's hidden-state pass as a module forward, which is what FSDP hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, cu_seqlens, max_seqlen):
        return self.model.hidden_states(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_teacher(path: str, *, device: torch.device, dtype_name: str = "auto") -> Teacher:
    from slmfast.models import CausalLM

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"teacher.path {path!r} is not a directory; give a slmfast checkpoint directory or a local "
            "transformers model directory (offline: hub names are not downloaded)")
    dtype = resolve_dtype(dtype_name, device)
    ident = weights_id(directory)
    if is_slmfast_dir(directory):
        model = CausalLM.from_pretrained(directory, device=device, dtype=dtype)
        return Teacher(model, "slmfast", ident, str(directory))
    try:
        import transformers
    except ImportError:
        raise ValueError(f"teacher.path {path!r} is not a slmfast checkpoint, and transformers is not "
                         "installed to load it as a Hugging Face model") from None
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"teacher.path {path!r} has no config.json: not a model directory")
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                           **{dtype_kw: dtype})
    if hf.__class__.__name__ == "LlamaForCausalLM":
        model = CausalLM.from_hf(hf).to(device=device, dtype=dtype)
        return Teacher(model, "slmfast", ident, str(directory))
    return Teacher(hf.to(device), "hf", ident, str(directory))


def check_tokenizer(teacher_path: str, data_tokenizer, data_vocab: int, teacher_vocab: int,
                    allow_unverified: bool) -> str:
    """Raise unless the teacher's tokenizer is the data's; returns a line saying what was checked."""
    if teacher_vocab < data_vocab:
        raise ValueError(f"teacher vocabulary ({teacher_vocab}) is smaller than the data tokenizer's "
                         f"({data_vocab}): the teacher was trained with another tokenizer")
    file = find_tokenizer_file(teacher_path)
    if file is None:
        if allow_unverified:
            return (f"teacher tokenizer NOT verified (no tokenizer.json in {teacher_path}); "
                    "trusting teacher.allow_unverified_tokenizer")
        raise ValueError(f"teacher {teacher_path} has no tokenizer.json, so its vocabulary cannot be checked "
                         "against the data's; add it, or set teacher.allow_unverified_tokenizer = true")
    if not same_vocabulary(load_tokenizer(file), data_tokenizer):
        raise ValueError(f"teacher tokenizer ({file}) differs from the data tokenizer: the ids would mean "
                         "different strings; tokenize the data with the teacher's tokenizer (data.tokenizer)")
    padding = f", teacher vocab padded to {teacher_vocab}" if teacher_vocab > data_vocab else ""
    return f"teacher tokenizer matches the data's ({data_vocab} tokens{padding})"
