"""Autocast for the fused linear layers (norm_linear.py, glu_linear.py).

Their forward and backward call matmuls themselves, inside torch.autograd.Function, so they do
by hand what autocast does for F.linear: record the autocast dtype at forward time, cast the
activation and the weight to it for each product, and cast weight gradients back to the
weight's dtype (as the backward of autocast's cast would).
"""

from __future__ import annotations

import torch


def linear_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives F.linear on x's device now, or None when autocast is off."""
    device_type = x.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # meta: no autocast exists
        return None
    return torch.get_autocast_dtype(device_type)


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def promote_residual(x: torch.Tensor, residual: torch.Tensor | None):
    """Under autocast a block's output (autocast dtype) meets a float32 residual stream: the sum
    stays in the wider dtype, as x + residual would. Outside autocast a dtype mix is left to the
    op's checks (an error that names the argument)."""
    if residual is None or residual.dtype == x.dtype or linear_dtype(x) is None:
        return x, residual
    wide = torch.promote_types(x.dtype, residual.dtype)
    return x.to(wide), residual.to(wide)
