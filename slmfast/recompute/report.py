"""The activation-memory report: what a training step keeps in memory, block by block.

Activation bytes are measured exactly on one batch (measure.py) under the policies currently
applied. Parameters, gradients and optimizer state are computed from the parameters: gradients
have the parameters' dtype, AdamW keeps two float32 moments per trainable parameter (8 bytes).
The peak estimate is their sum, the usual first-order model of a training step's peak (it leaves
out allocator fragmentation and transient workspace).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slmfast.recompute.blocks import find_blocks
from slmfast.recompute.measure import activation_bytes
from slmfast.recompute.policies import block_policy

ADAMW_BYTES_PER_PARAM = 8


@dataclass
class Report:
    policies: list[str]
    activation_bytes_per_block: list[int]
    activation_bytes_outside: int
    offloaded_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    num_parameters: int

    @property
    def activation_bytes(self) -> int:
        return sum(self.activation_bytes_per_block) + self.activation_bytes_outside

    @property
    def peak_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {
            "policies": self.policies,
            "activation_bytes_per_block": self.activation_bytes_per_block,
            "activation_bytes_outside_blocks": self.activation_bytes_outside,
            "activation_bytes": self.activation_bytes,
            "offloaded_bytes": self.offloaded_bytes,
            "num_parameters": self.num_parameters,
            "parameter_bytes": self.parameter_bytes,
            "gradient_bytes": self.gradient_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "peak_bytes_estimate": self.peak_bytes,
        }

    def table(self) -> str:
        mib = 2.0 ** 20
        lines = [f"{'block':<8} {'policy':<10} {'activations MiB':>16}"]
        for i, (policy, nbytes) in enumerate(zip(self.policies, self.activation_bytes_per_block)):
            lines.append(f"{i:<8} {policy:<10} {nbytes / mib:>16.2f}")
        lines.append(f"{'other':<8} {'':<10} {self.activation_bytes_outside / mib:>16.2f}")
        lines.append(f"{'total':<8} {'':<10} {self.activation_bytes / mib:>16.2f}")
        if self.offloaded_bytes:
            lines.append(f"offloaded to CPU: {self.offloaded_bytes / mib:.2f} MiB")
        lines += [
            f"parameters: {self.num_parameters / 1e6:.2f} M = {self.parameter_bytes / mib:.1f} MiB, "
            f"gradients {self.gradient_bytes / mib:.1f} MiB, "
            f"AdamW state {self.optimizer_bytes / mib:.1f} MiB",
            f"peak estimate (params + grads + optimizer + activations): {self.peak_bytes / mib:.1f} MiB",
        ]
        return "\n".join(lines)


def report(model: nn.Module, batch, *, layers=None, loss_fn=None) -> Report:
    blocks = find_blocks(model, layers)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            measured = activation_bytes(model, blocks, batch, loss_fn)
    finally:
        model.train(was_training)
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights count once
    trainable = [p for p in unique if p.requires_grad]
    return Report(
        policies=[block_policy(b) for b in blocks],
        activation_bytes_per_block=measured.per_block,
        activation_bytes_outside=measured.outside,
        offloaded_bytes=measured.offloaded,
        parameter_bytes=sum(p.numel() * p.element_size() for p in unique),
        gradient_bytes=sum(p.numel() * p.element_size() for p in trainable),
        optimizer_bytes=sum(p.numel() for p in trainable) * ADAMW_BYTES_PER_PARAM,
        num_parameters=sum(p.numel() for p in unique),
    )
