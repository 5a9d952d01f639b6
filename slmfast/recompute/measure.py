"""Measuring activation memory and block times on one real batch.

Activation memory is counted exactly and machine-independently: during the forward, a
TorchDispatchMode records a weak reference to the storage of every tensor an op creates, with
the index of the block that was running; after the forward, the storages still alive are what
autograd holds for backward (saved tensors, checkpoint inputs, selective-checkpoint caches,
offloaded copies). This sees every policy the same way, which counting with
saved_tensors_hooks alone cannot: checkpointing installs its own hooks and keeps its inputs
outside them. Storages on the CPU are reported apart when the model runs on a GPU (offload).

Block times come from forward hooks (synchronized on a GPU) under the policy in force.

For one op or layer without checkpointing, saved_tensor_bytes counts what autograd's
saved_tensors_hooks see: every storage saved for backward once, inputs and parameters included
unless excluded. It is the count the op tests assert and the layer benchmarks print.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

OUTSIDE = -1  # storages created outside any block (embeddings, final norm, loss)


@dataclass
class ActivationBytes:
    per_block: list[int]   # alive after the forward, attributed to the block that created them
    outside: int           # created outside the blocks (embeddings, final norm, loss)
    offloaded: int         # alive on the CPU while the model runs on another device

    @property
    def total(self) -> int:
        return sum(self.per_block) + self.outside


def saved_tensor_bytes(fn, *args, exclude=(), **kwargs) -> tuple[int, object]:
    """(bytes, fn(*args, **kwargs)): the bytes of the distinct storages autograd saves for backward
    while fn runs, not counting the storages of the tensors in `exclude` (say, the parameters,
    which exist whether or not anything is saved). A tensor saved twice, or saved together with
    a view of it, is one storage. Under checkpointing it undercounts (checkpoint keeps its inputs
    outside these hooks): count a whole model with activation_bytes."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(storages.values()), out


@dataclass
class StepTimes:
    forward_per_block: list[float]  # seconds in each block's forward
    step: float                     # forward + backward seconds


class _StorageRecorder(TorchDispatchMode):
    """Records every storage an op returns, except those that existed before (parameters,
    buffers, inputs: views of them, such as a transposed weight, are not activations)."""

    def __init__(self, current_block, preexisting: set[int]):
        super().__init__()
        self.current_block = current_block
        self.preexisting = preexisting
        self.records: dict[int, tuple[StorageWeakRef, int, int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        block = self.current_block[-1] if self.current_block else OUTSIDE
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.records and key not in self.preexisting:
                    self.records[key] = (StorageWeakRef(storage), storage.nbytes(), block, t.device.type)
        return out


def default_loss(output) -> torch.Tensor:
    """The scalar to backpropagate from a model output: its .loss, else the sum of its first tensor."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    for t in tree_leaves(output if not hasattr(output, "logits") else output.logits):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.float().sum()
    raise ValueError("cannot find a loss in the model output; pass loss_fn=")


def run_model(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


class _BlockTimer:
    """Forward pre/post hooks that keep a stack of running blocks and time each block."""

    def __init__(self, blocks: list[nn.Module], device_type: str, timed: bool):
        self.stack: list[int] = []
        self.seconds = [0.0] * len(blocks)
        self._starts: dict[int, float] = {}
        self._device_type = device_type
        self._timed = timed
        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(i)))
            self._handles.append(block.register_forward_hook(self._post(i)))

    def _pre(self, index):
        def hook(module, args):
            if self._timed:
                _sync(self._device_type)
                self._starts[index] = time.perf_counter()
            self.stack.append(index)
        return hook

    def _post(self, index):
        def hook(module, args, output):
            self.stack.pop()
            if self._timed:
                _sync(self._device_type)
                self.seconds[index] += time.perf_counter() - self._starts.pop(index)
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def activation_bytes(model: nn.Module, blocks: list[nn.Module], batch, loss_fn=None) -> ActivationBytes:
    """Bytes the autograd graph holds after one forward, per block (no backward is run)."""
    loss_fn = loss_fn or default_loss
    device_type = next(model.parameters()).device.type
    timer = _BlockTimer(blocks, device_type, timed=False)
    preexisting = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    preexisting |= {t.untyped_storage()._cdata for t in tree_leaves(batch) if isinstance(t, torch.Tensor)}
    recorder = _StorageRecorder(timer.stack, preexisting)
    try:
        gc.collect()
        with recorder:
            loss = loss_fn(run_model(model, batch))
        gc.collect()
        loss_storage = loss.untyped_storage()._cdata
        per_block, outside, offloaded = [0] * len(blocks), 0, 0
        for key, (ref, nbytes, block, dev) in recorder.records.items():
            if ref.expired() or key == loss_storage:
                continue
            if dev == "cpu" and device_type != "cpu":
                offloaded += nbytes
            elif block == OUTSIDE:
                outside += nbytes
            else:
                per_block[block] += nbytes
    finally:
        timer.remove()
    del loss
    return ActivationBytes(per_block, outside, offloaded)


def step_times(model: nn.Module, blocks: list[nn.Module], batch, loss_fn=None, repeats: int = 2) -> StepTimes:
    """Per-block forward seconds and forward+backward seconds, the fastest of `repeats` steps
    after one warm-up step. Gradients are cleared afterwards."""
    loss_fn = loss_fn or default_loss
    device_type = next(model.parameters()).device.type
    best: StepTimes | None = None
    for attempt in range(repeats + 1):
        timer = _BlockTimer(blocks, device_type, timed=True)
        try:
            _sync(device_type)
            t0 = time.perf_counter()
            loss = loss_fn(run_model(model, batch))
            loss.backward()
            _sync(device_type)
            step = time.perf_counter() - t0
        finally:
            timer.remove()
        model.zero_grad(set_to_none=True)
        if attempt > 0 and (best is None or step < best.step):
            best = StepTimes(list(timer.seconds), step)
    return best
