"""NormLinear and norm_linear: RMSNorm fused into the projection(s) that read it, without storing
the normalized activation (slmfast/ops/norm_linear.py has the math and the bytes).

Two ways to use it:
  * NormLinear(in_features, out_features, bias=False, eps=1e-6, ...) owns its parameters: `norm`
    (an slmfast.nn.RMSNorm: key norm.weight) and `linears` (nn.Linear each: keys linears.0.weight,
    ...). out_features is an int (forward returns one tensor) or a sequence of ints, one per
    projection, e.g. (Hq*D, Hkv*D, Hkv*D) for q/k/v or (I, I) for gate/up (forward returns a tuple).
  * norm_linear(x, norm, linears, residual=None) fuses the RMSNorm and nn.Linear modules a model
    already has (e.g. a Llama layer's input_layernorm and self_attn.q_proj/k_proj/v_proj), so the
    model keeps its own state_dict keys (Hugging Face's, for from_pretrained).
With `residual`, both fuse the pre-norm residual add too and return the stream h = x + residual
as one more, last, output.

Bytes saved for backward per token: H * e + 4 (h and rstd) against eager's >= 2 * H * e (x and the
normalized activation), plus the parameters in both (e = bytes per element of x).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from slmfast.nn.rms_norm import RMSNorm
from slmfast.ops.norm_linear import rms_norm_linear


def norm_linear(x: torch.Tensor, norm: RMSNorm, linears: Sequence[torch.nn.Linear],
                residual: torch.Tensor | None = None, *,
                backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """(linears[0](norm(x)), ..., [h]) computed by rms_norm_linear with the modules' parameters.

    norm is an slmfast.nn.RMSNorm (or any module with `weight`, `eps` or `variance_epsilon`, and
    optionally `offset`, over the last dimension), linears are torch.nn.Linear modules.
    """
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = torch.finfo(x.dtype).eps  # torch.nn.RMSNorm's default
    weight = getattr(norm, "weight", None)
    offset = float(getattr(norm, "offset", 0.0))
    if weight is None:  # no affine weight: y = xhat * (1 + 0)
        weight, offset = x.new_zeros(x.shape[-1]), 1.0
    if backend is None:
        backend = getattr(norm, "backend", None)
    return rms_norm_linear(x, weight.reshape(-1), [m.weight for m in linears], [m.bias for m in linears], eps,
                           residual, offset, backend=backend)


class NormLinear(torch.nn.Module):
    """RMSNorm(in_features) followed by one or more Linear(in_features, out_i) that share its output."""

    def __init__(self, in_features: int, out_features: int | Sequence[int], bias: bool = False,
                 eps: float = 1e-6, device=None, dtype=None, *, offset: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        self.single = isinstance(out_features, numbers.Integral)
        sizes = [int(out_features)] if self.single else [int(n) for n in out_features]
        if not sizes:
            raise ValueError("NormLinear: out_features must name at least one projection")
        self.in_features = int(in_features)
        self.out_features = sizes[0] if self.single else tuple(sizes)
        self.backend = backend
        self.norm = RMSNorm(in_features, eps, device=device, dtype=dtype, offset=offset, backend=backend)
        self.linears = torch.nn.ModuleList(
            torch.nn.Linear(in_features, n, bias=bias, device=device, dtype=dtype) for n in sizes)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        outs = norm_linear(x, self.norm, self.linears, residual, backend=self.backend)
        if self.single:
            return outs[0] if residual is None else (outs[0], outs[1])
        return outs

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
