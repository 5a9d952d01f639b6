"""Pretraining a Hugging Face model with transformers' Trainer, on slmfast's kernels.

Two lines turn an ordinary Trainer run into a slmfast one: `hf.patch(model)` swaps the model's
attention, norms, MLP and RoPE for slmfast's fused modules and computes the loss without logits,
and `recompute.apply(model, policy)` chooses what each decoder layer keeps for backward. The rest
is plain transformers. Runs offline: a tiny random Llama on synthetic sequences (each row counts up
from a random token, so the loss must fall).

    python examples/hf_pretrain.py --steps 30 --recompute selective
"""

import argparse
import json

import torch
import transformers

import slmfast.recompute as recompute
from slmfast.integrations import hf


def synthetic_rows(vocab: int, rows: int, length: int, seed: int = 0):
    starts = torch.randint(0, vocab, (rows, 1), generator=torch.Generator().manual_seed(seed))
    ids = (starts + torch.arange(length)) % vocab                              # (rows, length)
    return [dict(input_ids=r, attention_mask=torch.ones_like(r), labels=r.clone()) for r in ids]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--recompute", default="selective", choices=recompute.POLICIES)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--out", default="/tmp/slmfast-example-hf-pretrain")
    a = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden,
                                      intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(config)
    hf.patch(model)                                   # slmfast attention, norms, MLP, RoPE, fused loss
    recompute.apply(model, a.recompute)               # what each decoder layer saves for backward

    args = transformers.TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8,
                                          learning_rate=3e-3, warmup_steps=2, logging_steps=1, report_to=[],
                                          save_strategy="no", use_cpu=not torch.cuda.is_available(),
                                          bf16=a.bf16, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=synthetic_rows(a.vocab, 256, 32))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({"losses": losses}))


if __name__ == "__main__":
    main()
