"""Run by torchrun in tests/integrations/test_hf_distill_distributed.py (and in-process by it, for
the single-process run): a few DistillationTrainer steps on tiny random Llamas; rank 0 writes the
logged losses as JSON to argv[2]. argv[1]: single | ddp | ddp-sharded-teacher
(the student under DDP, the teacher sharded with FSDP2's fully_shard)."""

import json
import os
import sys

import torch
import transformers

from slmfast.integrations.hf import DistillationTrainer

V = 96


def tiny_llama(hidden, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config)


def data():
    starts = torch.randint(0, V, (32, 1), generator=torch.Generator().manual_seed(3))
    ids = (starts + torch.arange(16)) % V
    rows = []
    for i, row in enumerate(ids):
        mask = torch.ones_like(row)
        mask[: i % 5] = 0                                          # some left padding: uneven counts
        rows.append(dict(input_ids=row, attention_mask=mask, labels=row.masked_fill(mask == 0, -100)))
    return rows


def _sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def run(mode: str, out_dir: str) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=3, per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=5, data_seed=5, ddp_backend="gloo" if world > 1 else None)
    trainer = DistillationTrainer(model=tiny_llama(32, 1), teacher=tiny_llama(48, 2), args=args,
                                  train_dataset=data(), loss="jsd", beta=0.3, temperature=1.5, alpha=0.5,
                                  shard_teacher=mode == "ddp-sharded-teacher")
    trainer.train()
    return {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "student_sharded": _sharded(trainer.model_wrapped), "teacher_sharded": _sharded(trainer.teacher),
            "wrapped": type(trainer.model_wrapped).__name__}


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    result = run(mode, os.path.dirname(out) + f"/{mode}")
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    if torch.distributed.is_initialized():
        # Tear the gloo group down before exit (a process exiting with it alive aborted once in 3 runs).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
