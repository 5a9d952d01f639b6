"""The activation-memory report: what a training step keeps in memory, block by block.

One forward and backward on one batch is tracked op by op (measure.py step_memory) under the
policies currently applied: per block, the activations its forward saves for backward and the
most the step holds while that block runs (forward or backward: saved activations of the blocks
before it, its own recomputed activations and gradient temporaries), and the step's peak with
the phase it falls in. Parameters, gradients and optimizer state are computed from the
parameters: gradients have the parameters' dtype, AdamW keeps two float32 moments per trainable
parameter (8 bytes). The peak estimate is their sum plus the step's peak; it leaves out what ops
allocate and free inside themselves (kernel workspaces) and the allocator's fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slmfast.recompute.blocks import find_blocks
from slmfast.recompute.measure import phase_name, step_memory
from slmfast.recompute.policies import block_policy

ADAMW_BYTES_PER_PARAM = 8


@dataclass
class Report:
    policies: list[str]
    activation_bytes_per_block: list[int]
    activation_bytes_outside: int
    peak_bytes_per_block: list[int]   # the most the step holds while the block runs, forward or backward
    step_peak_bytes: int              # the most the step holds (above parameters and gradients)
    peak_phase: str                   # where: "forward block 3", "backward head", ...
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
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes + self.step_peak_bytes

    def to_dict(self) -> dict:
        return {
            "policies": self.policies,
            "activation_bytes_per_block": self.activation_bytes_per_block,
            "activation_bytes_outside_blocks": self.activation_bytes_outside,
            "activation_bytes": self.activation_bytes,
            "peak_bytes_per_block": self.peak_bytes_per_block,
            "step_peak_bytes": self.step_peak_bytes,
            "peak_phase": self.peak_phase,
            "offloaded_bytes": self.offloaded_bytes,
            "num_parameters": self.num_parameters,
            "parameter_bytes": self.parameter_bytes,
            "gradient_bytes": self.gradient_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "peak_bytes_estimate": self.peak_bytes,
        }

    def table(self) -> str:
        mib = 2.0 ** 20
        lines = [f"{'block':<8} {'policy':<10} {'saved MiB':>10} {'peak MiB':>10}"]
        for i, (policy, nbytes, peak) in enumerate(zip(self.policies, self.activation_bytes_per_block,
                                                       self.peak_bytes_per_block)):
            lines.append(f"{i:<8} {policy:<10} {nbytes / mib:>10.2f} {peak / mib:>10.2f}")
        lines.append(f"{'other':<8} {'':<10} {self.activation_bytes_outside / mib:>10.2f}")
        lines.append(f"{'total':<8} {'':<10} {self.activation_bytes / mib:>10.2f} "
                     f"{self.step_peak_bytes / mib:>10.2f}  (peak in the {self.peak_phase})")
        if self.offloaded_bytes:
            lines.append(f"offloaded to CPU: {self.offloaded_bytes / mib:.2f} MiB")
        lines += [
            f"parameters: {self.num_parameters / 1e6:.2f} M = {self.parameter_bytes / mib:.1f} MiB, "
            f"gradients {self.gradient_bytes / mib:.1f} MiB, "
            f"AdamW state {self.optimizer_bytes / mib:.1f} MiB",
            f"peak estimate (params + grads + optimizer + the step's peak): {self.peak_bytes / mib:.1f} MiB",
        ]
        return "\n".join(lines)


def report(model: nn.Module, batch, *, layers=None, loss_fn=None) -> Report:
    blocks = find_blocks(model, layers)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            measured = step_memory(model, blocks, batch, loss_fn)
    finally:
        model.train(was_training)
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights count once
    trainable = [p for p in unique if p.requires_grad]
    return Report(
        policies=[block_policy(b) for b in blocks],
        activation_bytes_per_block=measured.saved,
        activation_bytes_outside=measured.saved_outside,
        peak_bytes_per_block=measured.block_peaks,
        step_peak_bytes=measured.peak,
        peak_phase=phase_name(measured.peak_phase, len(blocks)),
        offloaded_bytes=measured.offloaded,
        parameter_bytes=sum(p.numel() * p.element_size() for p in unique),
        gradient_bytes=sum(p.numel() * p.element_size() for p in trainable),
        optimizer_bytes=sum(p.numel() for p in trainable) * ADAMW_BYTES_PER_PARAM,
        num_parameters=sum(p.numel() for p in unique),
    )
