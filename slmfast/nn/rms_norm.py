"""RMSNorm: a drop-in for torch.nn.RMSNorm and Hugging Face's LlamaRMSNorm on slmfast's fused op.

Same constructor arguments as torch.nn.RMSNorm (normalized_shape, eps=None, elementwise_affine,
device, dtype; HF's (hidden_size, eps) fit the same positions) and the same state_dict key
(`weight`). forward(x) returns the normalized x; forward(x, residual) fuses the residual add of
a pre-norm block and returns (y, h) with h = x + residual, the stream the next block adds to.
`offset=1.0` stores Gemma-style weights that multiply by (1 + weight).
"""

from __future__ import annotations

import math
import numbers

import torch

from slmfast.ops.rms_norm import rms_norm


class RMSNorm(torch.nn.Module):
    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, offset: float = 0.0, backend: str | None = None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(n) for n in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = float(offset)
        self.backend = backend
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            # y = xhat * (offset + w): start as the identity scale.
            torch.nn.init.constant_(self.weight, 1.0 - self.offset)

    @property
    def variance_epsilon(self) -> float | None:  # the name Hugging Face's RMSNorm modules use
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(f"RMSNorm: x must end in {self.normalized_shape}, got shape {tuple(x.shape)}")
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        width = math.prod(self.normalized_shape)
        lead = x.shape[: x.dim() - n]
        if self.weight is not None:
            weight, offset = self.weight.reshape(width), self.offset
        else:
            weight, offset = x.new_zeros(width), 1.0
        out = rms_norm(x.reshape(*lead, width), weight, eps,
                       residual.reshape(*lead, width) if residual is not None else None,
                       offset, backend=self.backend)
        if residual is None:
            return out.reshape(x.shape)
        y, h = out
        return y.reshape(x.shape), h.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (f", offset={self.offset}" if self.offset else ""))
