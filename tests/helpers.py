"""Shared test helpers: the tolerance rule of DESIGN.md §3, backend parametrization and the
saved-for-backward byte counter."""

from __future__ import annotations

import pytest
import torch

from slmfast import backends


def max_abs_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value.numel() == 0:
        return 0.0
    return (value.detach().double() - reference.detach().double()).abs().max().item()


def assert_close(name: str, ours: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor,
                 floor_ulps: float = 2.0) -> None:
    """err(ours, fp64 reference) <= 2 * err(torch in the same dtype, reference) + a tiny floor.

    The floor is `floor_ulps` units of the dtype's epsilon at the reference's scale, so that
    exact results (baseline error 0) still allow the last-bit differences of another summation
    order, and nothing more.
    """
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    if torch.isfinite(reference).all():
        assert torch.isfinite(ours).all(), f"{name}: non-finite values where the reference is finite"
    err = max_abs_err(ours, reference)
    base = max_abs_err(baseline, reference)
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    floor = floor_ulps * torch.finfo(ours.dtype).eps * max(scale, 1e-30)
    bound = 2.0 * base + floor
    assert err <= bound, (f"{name}: error {err:.3e} exceeds 2 x baseline error {base:.3e} + floor "
                          f"{floor:.3e} (dtype {ours.dtype}, scale {scale:.3e})")


ALL_BACKENDS = ("torch", "cpu", "triton", "cuda")


def backend_params(implemented=ALL_BACKENDS):
    """pytest params for each backend, skipped (with the reason) where it is unavailable here."""
    params = []
    for name in implemented:
        state = backends.status(name)
        marks = [] if state.available else [pytest.mark.skip(reason=f"{name}: {state.reason}")]
        if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
            marks.append(pytest.mark.gpu)  # what `pytest -m gpu` (gpu_check.sh) runs
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device_for(backend: str) -> torch.device:
    """Where a backend's test inputs live: the GPU for cuda (and triton when there is a GPU)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def saved_tensor_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves for backward while running fn(*args).

    Counts each storage once (a tensor saved twice, or saved and also a view of another, is one
    allocation) and excludes nothing: inputs, parameters and outputs saved for backward count,
    exactly as they are held alive by the graph.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(storages.values()), out


def value_and_grads(fn, *inputs, grad_output: torch.Tensor | None = None):
    """fn(*leaves) and the gradients of (output . grad_output) (of the output itself when it is a
    scalar) w.r.t. every floating input that is not None, each leaf a fresh copy of its input."""
    leaves = [t.detach().clone().requires_grad_(True)
              if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t for t in inputs]
    out = fn(*leaves)
    weighted = out.double() * grad_output if grad_output is not None else out.double()
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(weighted.sum(), wanted)
    return out.detach(), list(grads)


def saved_activation_bytes(fn, *args, params=(), **kwargs) -> tuple[int, object]:
    """saved_tensor_bytes without the storages of `params` (a module's parameters, which the model
    holds whether or not autograd saves them): the activation memory a layer costs for backward."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(storages.values()), out
