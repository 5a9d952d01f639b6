"""Training-step benchmark: transformers models unpatched vs patched by slmfast vs slmfast's model.

For a 125M-class Llama and a Qwen2-style config of the same size (random weights, random tokens):
one forward+backward step with labels (the causal-LM loss), timed as the median of a few steps,
reported as tokens/s, and the activation bytes the step holds for backward (measured exactly,
slmfast/recompute/measure.py). Ratios are against the unpatched transformers model (SDPA
attention) measured in the same run. On a GPU also the peak allocated memory.

    python benchmarks/bench_train.py [--device cuda] [--seq 1024] [--batch 1] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import slmfast.recompute as rc  # noqa: E402
from benchmarks.common import environment, print_table, time_fn  # noqa: E402
from slmfast.integrations import hf  # noqa: E402
from slmfast.models import CausalLM, LlamaConfig  # noqa: E402

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
COLUMNS = ["config", "model", "step s", "tokens/s", "speed vs HF", "activations MiB", "bytes vs HF",
           "peak MiB"]


def hf_model(kind: str):
    import transformers

    config_class = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    config = config_class(**SHAPE, tie_word_embeddings=kind == "qwen2", use_cache=False)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def slmfast_model():
    config = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                         intermediate_size=SHAPE["intermediate_size"], num_layers=SHAPE["num_hidden_layers"],
                         num_heads=SHAPE["num_attention_heads"], num_kv_heads=SHAPE["num_key_value_heads"],
                         max_position=SHAPE["max_position_embeddings"], tie_embeddings=False)
    return CausalLM(config)


def measure(model, data: dict, device: str, dtype: torch.dtype, reps: int) -> dict:
    model = model.to(device).train()
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = model(**data).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_fn(step, device, warmup=1, min_time=0.0, max_reps=reps)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    with autocast:
        activations = rc.report(model, data).activation_bytes
    return dict(seconds=seconds, activations=activations, peak=peak)


def run(device: str, batch: int, seq: int, dtype: torch.dtype, reps: int) -> None:
    print(environment(device))
    rows = []
    for kind in ("llama", "qwen2"):
        torch.manual_seed(0)
        base = hf_model(kind)
        ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), device=device)     # (B, T)
        data = dict(input_ids=ids, labels=ids)
        # The baseline first: patching swaps the architecture's module-level RoPE function while a
        # patched model is alive (slmfast/integrations/hf/modules.py), so unpatch before moving on.
        results = {"HF (SDPA)": measure(base, data, device, dtype, reps)}
        patched = hf.patch(copy.deepcopy(base))
        results["HF patched by slmfast"] = measure(patched, data, device, dtype, reps)
        hf.unpatch(patched)
        del patched, base
        if kind == "llama":
            results["slmfast CausalLM"] = measure(slmfast_model(), data, device, dtype, reps)
        reference = results["HF (SDPA)"]
        for name, r in results.items():
            rows.append({"config": f"{kind} 125M-class", "model": name, "step s": f"{r['seconds']:.3f}",
                         "tokens/s": f"{batch * seq / r['seconds']:.0f}",
                         "speed vs HF": f"{reference['seconds'] / r['seconds']:.2f}",
                         "activations MiB": f"{r['activations'] / 2**20:.1f}",
                         "bytes vs HF": f"{r['activations'] / reference['activations']:.2f}",
                         "peak MiB": f"{r['peak'] / 2**20:.0f}" if r["peak"] else "-"})
    print(f"batch {batch} x seq {seq}, {dtype}, 12 x 768 (GQA 12/4), vocab {SHAPE['vocab_size']}; "
          "speed vs HF = HF step time / this step time (> 1 is faster); bytes vs HF < 1 is less memory")
    print_table(rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per model")
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    run(args.device, args.batch, args.seq, dtype, args.reps)


if __name__ == "__main__":
    main()
