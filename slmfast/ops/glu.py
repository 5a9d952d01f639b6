"""swiglu / geglu: gated linear units — contract, reference, autograd, dispatch.

Math (Shazeer 2020, "GLU Variants Improve Transformer"):
    swiglu(gate, up) = silu(gate) * up                      Llama, Mistral, Qwen MLPs
    geglu(gate, up)  = gelu(gate) * up                      Gemma (approximate="tanh"), T5 v1.1
gate and up are the two halves of the MLP's input projection (HF's gate_proj(x), up_proj(x)).
Computed in float32 (float64 for fp64) and rounded once to the inputs' dtype.

Shapes: gate and up of one shape (any), contiguous (non-contiguous inputs are copied). Dtypes:
float32, bfloat16, float16, float64, the same for both. approximate: "tanh" or "none" (erf), as
torch.nn.functional.gelu.

Saved for backward: gate and up (which every MLP computes anyway), never act(gate) nor the
product. The backward recomputes act and its derivative in one pass:
    dgate = dout * up * act'(gate);  dup = dout * act(gate)
Bytes saved per element of the product: 2 x elem (gate, up), against 4 x elem for eager
`F.silu(gate) * up` (gate for silu's backward, silu(gate) and up for the product's, and the
product for the next matmul; slmfast.nn.SwiGLUMLP also drops the last, see glu_linear).

Backends: cuda (csrc/cuda/glu.cu), triton (slmfast/triton/glu.py; float32/bf16/fp16),
cpu (csrc/cpu/glu.cpp), torch (glu_reference below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmfast import backends, gpu_table
from slmfast.ops import _checks, _registry

IMPLEMENTED = ("cuda", "triton", "cpu", "torch")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Plain PyTorch, the oracle of the tests when run in float64."""
    acc = _acc(gate.dtype)
    return (_act(gate.to(acc), activation) * up.to(acc)).to(gate.dtype)


def glu_reference_backward(dout, gate, up, activation: str, recompute: bool):
    """The backward formulas in plain PyTorch (for the torch backend of the fused layers)."""
    acc = _acc(gate.dtype)
    g = gate.to(acc).detach().requires_grad_(True)
    with torch.enable_grad():
        f = _act(g, activation)
        (df,) = torch.autograd.grad(f, g, torch.ones_like(f))
    d, u = dout.to(acc), up.to(acc)
    out = (f.detach() * u).to(gate.dtype) if recompute else gate.new_empty(0)
    return (d * u * df).to(gate.dtype), (d * f.detach()).to(up.dtype), out


# ---- autograd wiring, shared by the C++ op (cpu/cuda) and the Triton op ---------------------

def _fake_forward(gate, up, activation):
    return torch.empty_like(gate)


def _fake_backward(dout, gate, up, activation, recompute):
    out = torch.empty_like(gate) if recompute else gate.new_empty(0)
    return torch.empty_like(gate), torch.empty_like(up), out


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate, up)


def _make_backward(backward_op):
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup, _ = backward_op(dout.contiguous(), gate, up, ctx.activation, False)
        return dgate, dup, None

    return backward


_triton_kernels = _registry.triton_module("glu")
_registry.register_forward_backward("glu", _fake_forward, _fake_backward, _setup_context, _make_backward,
                                    _triton_kernels)


# ---- dispatch -----------------------------------------------------------------------------

def check_inputs(op: str, gate, up) -> torch.device:
    _checks.check_float(op, "gate", gate)
    _checks.check_tensor(op, "up", up)
    device = _checks.check_same_device(op, gate=gate, up=up)
    _checks.check_shape(op, "up", up, tuple(gate.shape), "the shape of gate")
    _checks.check_same_dtype(op, "up", up, "gate", gate)
    return device


def select_backend(op: str, dtype: torch.dtype, device: torch.device, backend: str | None,
                   activation: str = "silu", grad: bool = False) -> str:
    """The backend for this call. On CUDA tensors the GPU dispatch table decides, from the swiglu
    rows (silu) or the geglu rows (gelu); where it says native, the plain-PyTorch "torch" backend."""
    kind = (("dtype", dtype), ("grad", bool(grad)))
    table_op = "swiglu" if activation == "silu" else "geglu"
    name = gpu_table.select(op, IMPLEMENTED, device, backend, kind, False, table_op)
    if name == "triton" and dtype == torch.float64:
        name = backends.fallback(op, name, "float64", IMPLEMENTED, device)
    return name


def kernels(name: str):
    """(forward, backward) of a backend without autograd, for fused layers built on this op:
    forward(gate, up, activation) -> out; backward(dout, gate, up, activation, recompute) ->
    (dgate, dup, out or empty)."""
    if name == "torch":
        return glu_reference, glu_reference_backward
    ns = torch.ops.slmfast_triton if name == "triton" else torch.ops.slmfast
    return ns.glu_fwd, ns.glu_bwd


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *, backend: str | None = None,
        op: str = "glu") -> torch.Tensor:
    """act(gate) * up for act in ACTIVATIONS; see the module docstring."""
    device = check_inputs(op, gate, up)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    name = select_backend(op, gate.dtype, device, backend, activation, grad)
    if name == "torch":
        return glu_reference(gate, up, activation)
    forward, _ = kernels(name)
    return forward(gate.contiguous(), up.contiguous(), activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, saving only gate and up for backward."""
    return glu(gate, up, "silu", backend=backend, op="swiglu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *,
          backend: str | None = None) -> torch.Tensor:
    """gelu(gate, approximate) * up, saving only gate and up for backward."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu", backend=backend, op="geglu")
