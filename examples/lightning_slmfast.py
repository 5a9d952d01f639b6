"""A PyTorch Lightning module built from slmfast's modules, with selective recomputation.

The model is slmfast's small Llama-style decoder (slmfast.models.CausalLM, made only of slmfast.nn
modules: fused attention, RMSNorm, SwiGLU MLP, RoPE); its loss is the fused linear cross-entropy
(no logits). `recompute.apply` sets what each decoder layer keeps for backward, from outside the
model, before Lightning takes it over. Runs offline on synthetic sequences.

    python examples/lightning_slmfast.py --steps 30 --recompute selective
"""

import argparse
import json

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import slmfast.recompute as recompute
from slmfast.models import CausalLM, LlamaConfig


class LitCausalLM(pl.LightningModule):
    def __init__(self, config: LlamaConfig, lr: float):
        super().__init__()
        self.model = CausalLM(config)
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch                                                          # (B, T)
        loss = self.model(ids, labels=ids).loss                                 # fused, no logits
        self.losses.append(loss.item())
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--recompute", default="selective", choices=recompute.POLICIES)
    a = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                         num_layers=a.layers, num_heads=4, num_kv_heads=2, max_position=256)
    module = LitCausalLM(config, lr=3e-3)
    recompute.apply(module.model, a.recompute)        # applied to the model from outside

    starts = torch.randint(0, a.vocab, (256, 1))
    ids = (starts + torch.arange(32)) % a.vocab                                 # (256, 32): rows count up
    loader = DataLoader(TensorDataset(ids), batch_size=8, shuffle=True)
    trainer = pl.Trainer(max_steps=a.steps, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    print(json.dumps({"losses": module.losses}))


if __name__ == "__main__":
    main()
