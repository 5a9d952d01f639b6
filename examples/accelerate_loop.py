"""A plain Accelerate training loop on a Hugging Face model patched by slmfast.

Accelerate handles the devices, processes (`accelerate launch`) and mixed precision; slmfast's
`hf.patch` gives the model fused kernels and a loss without logits, and `recompute.apply` the
recompute policy. The loop itself is the usual forward / backward / step. Runs offline: a tiny
random Llama on synthetic sequences.

    python examples/accelerate_loop.py --steps 30
    accelerate launch --num_processes 2 --cpu examples/accelerate_loop.py --steps 30
"""

import argparse
import json

import torch
import transformers
from accelerate import Accelerator
from torch.utils.data import DataLoader

import slmfast.recompute as recompute
from slmfast.integrations import hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--recompute", default="selective", choices=recompute.POLICIES)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    a = parser.parse_args()

    accelerator = Accelerator(mixed_precision=a.mixed_precision, cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden,
                                      intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    model = hf.patch(transformers.AutoModelForCausalLM.from_config(config))
    recompute.apply(model, a.recompute)

    starts = torch.randint(0, a.vocab, (256, 1))
    ids = (starts + torch.arange(32)) % a.vocab                                 # (256, 32): rows count up
    loader = DataLoader(ids, batch_size=8, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses, step = [], 0
    model.train()
    while step < a.steps:
        for batch in loader:                                                    # (B, T)
            loss = model(input_ids=batch, labels=batch).loss                    # fused, no logits
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.reduce(loss.detach(), "mean").item())
            step += 1
            if step == a.steps:
                break
    if accelerator.is_main_process:
        print(json.dumps({"losses": losses}))


if __name__ == "__main__":
    main()
