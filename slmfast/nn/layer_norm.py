"""LayerNorm: a drop-in for torch.nn.LayerNorm on slmfast's fused layer_norm op.

Same constructor arguments as torch.nn.LayerNorm (normalized_shape, eps=1e-5, elementwise_affine,
bias, device, dtype) and the same state_dict keys (`weight`, `bias`). forward(x) returns the
normalized x; forward(x, residual) fuses the residual add of a pre-norm block and returns (y, h)
with h = x + residual, the stream the next block adds to. Saves h (or x) and two float32 values
per row for backward, never the output (see slmfast/ops/layer_norm.py).
"""

from __future__ import annotations

import math
import numbers

import torch

from slmfast.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.Module):
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str | None = None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(n) for n in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = torch.nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm: x must end in {self.normalized_shape}, got shape {tuple(x.shape)}")
        width = math.prod(self.normalized_shape)
        lead = x.shape[: x.dim() - n]
        weight = self.weight.reshape(width) if self.weight is not None else None
        bias = self.bias.reshape(width) if self.bias is not None else None
        residual = residual.reshape(*lead, width) if residual is not None else None
        out = layer_norm(x.reshape(*lead, width), weight, bias, self.eps, residual, backend=self.backend)
        if residual is None:
            return out.reshape(x.shape)
        y, h = out
        return y.reshape(x.shape), h.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
