"""Argument checks shared by the op wrappers in slmfast/ops/.

Every check raises ValueError with a message that names the op, the argument, what was expected
and what was given, before any backend runs, so that all four backends refuse the same inputs
with the same words (docs/architecture.md §3). The C++ ops check again (csrc/common/checks.h)
because they can also be called directly through torch.ops.slmfast.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    check_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(_dtype_name(d) for d in FLOAT_DTYPES)
        raise ValueError(f"{op}: {name} must have a floating dtype ({allowed}), got "
                         f"{_dtype_name(t.dtype)}")


def check_same_dtype(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise ValueError(f"{op}: {name} must have the dtype of {like_name} "
                         f"({_dtype_name(like.dtype)}), got {_dtype_name(t.dtype)}")


def check_param_dtype(op: str, name: str, param: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """A weight in the activation's dtype, or float32 master weights for bf16/fp16 activations."""
    if param.dtype == like.dtype or (like.dtype in REDUCED_DTYPES and param.dtype == torch.float32):
        return
    extra = " or float32" if like.dtype in REDUCED_DTYPES else ""
    raise ValueError(f"{op}: {name} must have the dtype of {like_name} ({_dtype_name(like.dtype)})"
                     f"{extra}, got {_dtype_name(param.dtype)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")
    return first.device


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...], why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        reason = f" ({why})" if why else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{reason}, got {tuple(t.shape)}")


def check_residual_and_eps(op: str, residual: torch.Tensor | None, x: torch.Tensor, eps: float) -> None:
    """The last checks of a norm with a fused residual add: residual, when given, a tensor of x's
    shape and dtype; eps >= 0 (NaN refused)."""
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_shape(op, "residual", residual, tuple(x.shape), "the shape of x")
        check_same_dtype(op, "residual", residual, "x", x)
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
