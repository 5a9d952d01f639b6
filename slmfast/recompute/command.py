"""`slmfast memory`: the activation-memory report for a model at a batch shape, from the shell.

  slmfast memory --model 125M --batch 8 --seq 1024 --policy selective
  slmfast memory --model path/to/hf-model --batch 4 --seq 2048 --policy all --patch
  slmfast memory --model nano --device cpu --policy budget:0.5

The model is a named slmfast config (slmfast.models.NAMED_CONFIGS), a slmfast model directory or
a local transformers model directory (only its config.json is read: weights are not needed to
count bytes). For each policy it shows, per block, the activations saved for backward and the
most the step holds while the block runs, and the step's peak with the phase it falls in (one
forward and backward tracked op by op: slmfast/recompute/measure.py). slmfast models are built by
default on the meta device, where every op runs its shape-only (fake) kernel: the figures are
exact for slmfast's fused kernels (each backend saves the same tensors, ops/<op>.py) and for
torch's own ops, and a 1B model costs seconds, not gigabytes. transformers models are built on the
CPU by default: their mask code reads tensor values (packed-sequence detection), which meta
tensors do not have. A budget (`budget:0.5` or `budget:2GiB`, of the step's peak) needs real
timings, so it needs a real device.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

POLICY_CHOICES = ("none", "selective", "full", "offload", "all")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"": 1, "b": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "kb": 10 ** 3, "mb": 10 ** 6,
          "gb": 10 ** 9}


def parse_policy(text: str):
    """'none' | 'selective' | 'full' | 'offload' | 'all' | 'budget:<fraction or bytes>'."""
    from slmfast.recompute import MemoryBudget

    if text in POLICY_CHOICES:
        return text
    match = re.fullmatch(r"budget:([0-9.]+)\s*([a-zA-Z]*)", text)
    if match is None:
        raise ValueError(f"--policy must be one of {', '.join(POLICY_CHOICES)} or budget:<fraction|bytes> "
                         f"(e.g. budget:0.5, budget:2GiB), got {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        units = ", ".join(u for u in _UNITS if u)
        raise ValueError(f"--policy budget unit must be one of {units}, got {unit!r}")
    if not unit and number <= 1.0:
        return MemoryBudget(number)
    return MemoryBudget(int(number * _UNITS[unit]))


def _is_transformers_dir(spec: str) -> bool:
    config_file = Path(spec) / "config.json"
    return config_file.is_file() and "model_type" in json.loads(config_file.read_text())


def build_model(spec: str, device: torch.device, dtype: torch.dtype, patch: bool):
    """A model from a named config or a local directory; returns (model, vocab_size, description)."""
    from slmfast.models import CausalLM, LlamaConfig
    from slmfast.models.config import NAMED_CONFIGS

    if spec in NAMED_CONFIGS:
        config = LlamaConfig.named(spec)
        with torch.device(device):
            model = CausalLM(config).to(dtype)
        return model, config.vocab_size, f"slmfast {spec}"
    path = Path(spec)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model must be a named config ({', '.join(NAMED_CONFIGS)}) or a model directory "
                         f"with a config.json; {spec!r} is neither")
    fields = json.loads(config_file.read_text())
    if "model_type" not in fields:  # a slmfast model directory
        config = LlamaConfig.load(config_file)
        with torch.device(device):
            model = CausalLM(config).to(dtype)
        return model, config.vocab_size, f"slmfast model {path}"
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                              torch_dtype=dtype)
    if patch:
        from slmfast.integrations import hf

        hf.patch(model)
    vocab = hf_config.get_text_config().vocab_size
    return model, vocab, f"transformers {hf_config.model_type} from {path}" + (" (patched)" if patch else "")


def run_memory(args: argparse.Namespace) -> int:
    import slmfast.recompute as rc

    policy = parse_policy(args.policy)
    device = torch.device(args.device or ("cpu" if _is_transformers_dir(args.model) else "meta"))
    if isinstance(policy, rc.MemoryBudget) and device.type == "meta":
        raise ValueError("--policy budget:... measures step times, which needs a real device: "
                         "add --device cpu or --device cuda")
    if policy == "offload" and device.type == "meta":
        raise ValueError("--policy offload moves saved tensors to host memory, which the meta device cannot "
                         "show: add --device cuda")
    if args.batch < 1 or args.seq < 1:
        raise ValueError(f"--batch and --seq must be positive, got {args.batch} and {args.seq}")
    model, vocab, description = build_model(args.model, device, DTYPES[args.dtype], args.patch)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)   # (B, T)
    batch = dict(input_ids=ids, labels=ids)
    results = {}
    for name in (("none", "selective", "full") if policy == "all" else (policy,)):
        rc.apply(model, name, batch=batch)
        results[name if isinstance(name, str) else "budget"] = rc.report(model, batch)
        rc.remove(model)
    if args.json:
        print(json.dumps({"model": description, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                          "device": str(device), "reports": {k: r.to_dict() for k, r in results.items()}},
                         indent=2))
        return 0
    print(f"{description}: batch {args.batch} x seq {args.seq}, {args.dtype}, measured on {device}")
    for name, result in results.items():
        print(f"\npolicy: {name}\n{result.table()}")
    if len(results) > 1:
        base = results["none"].activation_bytes
        print("\nactivations vs none: " + ", ".join(
            f"{k} {r.activation_bytes / base:.2f}" for k, r in results.items()))
        base_peak = results["none"].step_peak_bytes
        print("step peak vs none:   " + ", ".join(
            f"{k} {r.step_peak_bytes / base_peak:.2f}" for k, r in results.items()))
    return 0


def add_command(sub) -> None:
    parser = sub.add_parser("memory", help="activation-memory report for a model at a batch shape")
    parser.add_argument("--model", required=True, help="named config (nano ... 1B) or a model directory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--policy", default="none",
                        help="none | selective | full | offload | all | budget:<fraction|bytes>")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--device", default=None,
                        help="meta (shapes only; default for slmfast models), cpu (default for transformers "
                             "models) or cuda")
    parser.add_argument("--patch", action="store_true", help="patch a transformers model with slmfast first")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.set_defaults(func=_guarded_memory)


def _guarded_memory(args: argparse.Namespace) -> int:
    import os
    import sys

    try:
        return run_memory(args)
    except ValueError as e:
        if os.environ.get("SLMFAST_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
