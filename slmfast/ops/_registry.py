"""The torch.library registration of an op's forward/backward pair, shared by the op files.

An op whose kernels come as a pair `<stem>_fwd` / `<stem>_bwd` (rms_norm, layer_norm, glu,
attention) has the pair in up to two namespaces: `slmfast`, the C++ schemas of csrc/slmfast.cpp
(CPU and CUDA kernels), and `slmfast_triton`, the Triton launchers wrapped here with
torch.library.custom_op. In each namespace the same three steps make the pair work under
torch.compile(fullgraph=True) and pass torch.library.opcheck (docs/architecture.md §3): a fake
(meta) function for the backward op, one for the forward op, and an autograd formula on the
forward op that calls the backward op of its own namespace. The op file writes the parts that
are its own (the fake functions, what the forward saves, the backward); this file wires them the
same way for every op. Based on the torch.library custom-op API (custom_op, register_fake,
register_autograd).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from slmfast import backends


def triton_module(stem: str) -> ModuleType | None:
    """slmfast/triton/<stem>.py, or None when Triton is not installed."""
    if backends.triton_version() is None:
        return None
    return importlib.import_module(f"slmfast.triton.{stem}")


def register_forward_backward(stem: str, fake_forward: Callable, fake_backward: Callable,
                              setup_context: Callable, make_backward: Callable,
                              triton: ModuleType | tuple[Callable, Callable] | None) -> None:
    """Registers `<stem>_fwd` / `<stem>_bwd` in each namespace that has them.

    fake_forward, fake_backward: the ops' fake functions (output shapes and dtypes, no data).
    setup_context(ctx, inputs, output): what the forward saves for backward.
    make_backward(backward_op) -> backward(ctx, *grads): the autograd formula of the forward,
        built on the backward op of the namespace it is registered in.
    triton: the module slmfast/triton/<stem>.py (its launchers <stem>_fwd and <stem>_bwd), or a
        (forward, backward) pair of launchers, or None without Triton. The launchers' type
        annotations are the ops' schemas; they take the arguments of the C++ ops, in that order.
    The C++ pair is registered when slmfast._C is built (it defines the schemas).
    """
    if backends.extension() is not None:
        _register_pair("slmfast", stem, fake_forward, fake_backward, setup_context, make_backward)
    if triton is None:
        return
    if isinstance(triton, ModuleType):
        triton = getattr(triton, f"{stem}_fwd"), getattr(triton, f"{stem}_bwd")
    forward_launcher, backward_launcher = triton
    torch.library.custom_op(f"slmfast_triton::{stem}_fwd", forward_launcher, mutates_args=())
    torch.library.custom_op(f"slmfast_triton::{stem}_bwd", backward_launcher, mutates_args=())
    _register_pair("slmfast_triton", stem, fake_forward, fake_backward, setup_context, make_backward)


def _register_pair(namespace: str, stem: str, fake_forward: Callable, fake_backward: Callable,
                   setup_context: Callable, make_backward: Callable) -> None:
    forward_name, backward_name = f"{namespace}::{stem}_fwd", f"{namespace}::{stem}_bwd"
    torch.library.register_fake(backward_name)(fake_backward)
    torch.library.register_fake(forward_name)(fake_forward)
    backward_op = getattr(getattr(torch.ops, namespace), f"{stem}_bwd")
    torch.library.register_autograd(forward_name, make_backward(backward_op), setup_context=setup_context)
