"""Recompute policies on slmfast's model: activation bytes and step time, as ratios to "none".

For each model size, slmfast's CausalLM and the same weights in transformers' LlamaForCausalLM
(SDPA attention, unfused), and each policy (none, selective, full, and the planner at a 50% budget): the
activation bytes held after the forward (measured exactly, slmfast/recompute/measure.py), the
forward+backward step time (median of a few steps), and both as ratios to "none". On a GPU also
torch.cuda.max_memory_allocated for a step.

    python benchmarks/bench_recompute.py --table [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import slmfast.recompute as rc  # noqa: E402
from benchmarks.common import environment, print_table, time_fn  # noqa: E402
from slmfast.models import CausalLM, LlamaConfig  # noqa: E402

SIZES = {
    "12x768": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4),
    "24x1024": dict(hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16, num_kv_heads=8),
}
QUICK_SIZES = {
    "4x256": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2),
}


POLICIES = ("none", "selective", "full", rc.MemoryBudget(0.5))
COLUMNS = ["model", "policy", "activations MiB", "bytes vs none", "step s", "time vs none", "peak MiB"]


def measure_model(name: str, model, data: dict, device: str) -> list[dict]:
    """One row per policy: activation bytes (exact), step time and (on a GPU) the peak."""

    def step():
        model(**data).loss.backward()
        model.zero_grad(set_to_none=True)

    results = {}
    for policy in POLICIES:
        rc.apply(model, policy, batch=data)
        label = policy if isinstance(policy, str) else "budget 50%"
        activations = rc.report(model, data).activation_bytes
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_fn(step, device, warmup=1, min_time=0.0, max_reps=3)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        results[label] = (activations, seconds, peak)
    rc.remove(model)
    base_bytes, base_seconds, _ = results["none"]
    return [{"model": name, "policy": label, "activations MiB": f"{activations / 2**20:.1f}",
             "bytes vs none": f"{activations / base_bytes:.2f}", "step s": f"{seconds:.3f}",
             "time vs none": f"{seconds / base_seconds:.2f}",
             "peak MiB": f"{peak / 2**20:.0f}" if peak else "-"}
            for label, (activations, seconds, peak) in results.items()]


def run(device: str, quick: bool, batch: int, seq: int, vocab: int) -> None:
    print(environment(device))
    rows = []
    for name, shape in (QUICK_SIZES if quick else SIZES).items():
        config = LlamaConfig(vocab_size=vocab, max_position=max(seq, 128), **shape)
        ids = torch.randint(0, vocab, (batch, seq), device=device)             # (B, T)
        data = dict(input_ids=ids, labels=ids)
        rows += measure_model(f"slmfast {name}", CausalLM(config).to(device).train(), data, device)
        hf_model = CausalLM(config).to_hf().to(device).train()   # the same model in transformers
        hf_model.config.use_cache = False
        rows += measure_model(f"HF Llama {name}", hf_model, data, device)
    print(f"batch {batch} x seq {seq}, vocab {vocab}")
    print_table(rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    run(args.device, args.quick, args.batch, args.seq, args.vocab)


if __name__ == "__main__":
    main()
