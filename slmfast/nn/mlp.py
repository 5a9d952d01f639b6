"""SwiGLUMLP and GeGLUMLP: drop-ins for Hugging Face's LlamaMLP and GemmaMLP (gated MLPs,
Shazeer 2020) that store neither act(gate) nor the product act(gate) * up for backward.

Same parameters and state_dict keys as LlamaMLP: gate_proj (H -> I), up_proj (H -> I),
down_proj (I -> H), all with or without bias:
    out = down_proj(act(gate_proj(x)) * up_proj(x))        act = silu (SwiGLU) or gelu (GeGLU)
The down projection is slmfast.functional.glu_linear: its weight gradient recomputes the product
from gate and up in the same backward pass that computes their gradients.

Bytes saved for backward per token (e = bytes per element, H hidden, I intermediate size), plus
the three weights in both:
    SwiGLUMLP / GeGLUMLP              H * e (x, for the gate/up weight gradients) + 2 * I * e (gate, up)
    HF LlamaMLP (eager)               H * e + 4 * I * e (gate, silu(gate), up, the product)
    forward_with_norm(x, norm, r)     H * e (the residual stream h) + 4 (rstd) + 2 * I * e
    eager RMSNorm then LlamaMLP       >= 2 * H * e + 4 * I * e (plus the norm's float32 temporaries)
forward_with_norm fuses the block's post-attention RMSNorm (and its residual add) into gate/up
(slmfast/ops/norm_linear.py), so the normalized activation is not stored either.
"""

from __future__ import annotations

import torch

from slmfast.nn.norm_linear import norm_linear
from slmfast.ops.glu_linear import glu_linear


class _GatedMLP(torch.nn.Module):
    activation = "silu"

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None,
                 dtype=None, *, backend: str | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """down_proj(act(gate) * up) without storing the product (gate, up: (..., I))."""
        return glu_linear(gate, up, self.down_proj.weight, self.down_proj.bias, self.activation,
                          backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_proj(x), self.up_proj(x))

    def forward_with_norm(self, x: torch.Tensor, norm: torch.nn.Module, residual: torch.Tensor | None = None):
        """self(norm(x + residual)) with the norm fused into gate/up: returns out, or (out, h) with
        h = x + residual when residual is given. `norm` is an slmfast.nn.RMSNorm (see norm_linear)."""
        outs = norm_linear(x, norm, [self.gate_proj, self.up_proj], residual, backend=self.backend)
        out = self.down(outs[0], outs[1])
        return out if residual is None else (out, outs[2])

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"act={self.activation}")


class SwiGLUMLP(_GatedMLP):
    """down_proj(silu(gate_proj(x)) * up_proj(x)): Hugging Face's LlamaMLP (Llama, Mistral, Qwen)."""

    activation = "silu"


class GeGLUMLP(_GatedMLP):
    """down_proj(gelu(gate_proj(x)) * up_proj(x)): Hugging Face's GemmaMLP with approximate="tanh"
    (gelu_pytorch_tanh), T5 v1.1's gated-gelu with approximate="none"."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 approximate: str = "tanh", device=None, dtype=None, *, backend: str | None = None):
        if approximate not in ("tanh", "none"):
            raise ValueError(f"GeGLUMLP: approximate must be 'tanh' or 'none', got {approximate!r}")
        super().__init__(hidden_size, intermediate_size, bias, device, dtype, backend=backend)
        self.approximate = approximate
        self.activation = "gelu_tanh" if approximate == "tanh" else "gelu"
