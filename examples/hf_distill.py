"""Distillation with transformers' Trainer: slmfast.integrations.hf.DistillationTrainer.

A Trainer whose loss is T^2 * KL(teacher || student) (or reverse KL, JSD, TVD) + alpha * CE,
computed from both models' hidden states by slmfast's fused loss: neither model's logits are
materialized. The teacher is frozen and stays out of the optimizer and the checkpoints. Runs
offline: a tiny random Llama teacher (made confident by scaling its LM head) distilled into a
smaller student on synthetic sequences.

    python examples/hf_distill.py --steps 30 --loss forward_kl --temperature 2 --alpha 0.5
"""

import argparse
import json

import torch
import transformers

from slmfast.integrations import hf


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    return transformers.AutoModelForCausalLM.from_config(config)


def synthetic_rows(vocab: int, rows: int, length: int, seed: int = 0):
    starts = torch.randint(0, vocab, (rows, 1), generator=torch.Generator().manual_seed(seed))
    ids = (starts + torch.arange(length)) % vocab                              # (rows, length)
    return [dict(input_ids=r, attention_mask=torch.ones_like(r), labels=r.clone()) for r in ids]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=48, help="student hidden size (teacher: twice)")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--loss", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd", "tvd"))
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label cross-entropy")
    parser.add_argument("--teacher", default=None, help="a teacher checkpoint (default: a tiny random one)")
    parser.add_argument("--out", default="/tmp/slmfast-example-hf-distill")
    a = parser.parse_args()

    teacher = a.teacher
    if teacher is None:
        teacher = tiny_llama(a.vocab, 2 * a.hidden, 2, seed=1)
        with torch.no_grad():
            teacher.lm_head.weight.mul_(20)           # a random but confident teacher: something to learn
    student = hf.patch(tiny_llama(a.vocab, a.hidden, 2, seed=0))

    args = transformers.TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=2,
                                          logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = hf.DistillationTrainer(model=student, teacher=teacher, args=args, loss=a.loss,
                                     temperature=a.temperature, alpha=a.alpha,
                                     train_dataset=synthetic_rows(a.vocab, 512, 32))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({"losses": losses}))


if __name__ == "__main__":
    main()
