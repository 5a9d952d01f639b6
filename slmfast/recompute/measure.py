"""Measuring what a training step holds, and block times, on one real batch.

Memory is counted exactly and machine-independently by following every storage the step's ops
create (tracker.py): step_memory runs one forward and backward under the policies in force and
returns, per block, what its forward leaves saved for backward and the most the step holds
while the block runs forward and backward (saved activations, recomputed activations, gradient
temporaries), plus the step's peak and the phase it falls in. The forward's saved bytes alone
(activation_bytes) are what autograd holds when the backward begins: saved tensors, checkpoint
inputs, selective-checkpoint caches, offloaded copies. This sees every policy the same way,
which counting with saved_tensors_hooks alone cannot: checkpointing installs its own hooks and
keeps its inputs outside them. Storages on the CPU are reported apart when the model runs on a
GPU (offload). On the meta device the same count is a prediction that computes nothing.

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
from torch.utils._pytree import tree_leaves

from slmfast.recompute.tracker import StorageTracker, storage_keys

EMBED = -1  # the phase index of what runs before the first block; the last block's index + 1 is the head


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


@dataclass
class StepMemory:
    """What one training step holds, op by op, split the way the peak planner needs it
    (planner.py). Bytes above the parameters, buffers, inputs and the parameters' gradients,
    which exist before the step. Phases: ("forward" | "backward", block index), with EMBED for
    what runs before the first block (and the backward after it) and HEAD for what runs after the
    last (final norm, LM head, loss, and their backward)."""

    saved: list[int]          # S[b]: what block b's forward made and still holds when backward begins
    saved_outside: int        # what the rest of the forward made and holds then
    offloaded: int            # saved on the CPU while the model runs on another device
    forward_rest: list[int]   # F[b]: max over block b's forward ops of live bytes minus blocks < b's S
    backward_rest: list[int]  # R[b]: the same over block b's backward ops
    head: int                 # H: max over HEAD ops of live bytes minus every block's S
    embed: int                # E: max over EMBED ops of live bytes
    peak: int                 # max live bytes over the whole step
    peak_phase: tuple         # the phase of the op where that max was reached
    block_peaks: list[int]    # max live bytes during each block's forward or backward

    def activation_bytes(self) -> ActivationBytes:
        return ActivationBytes(list(self.saved), self.saved_outside, self.offloaded)


def phase_name(phase: tuple, num_blocks: int) -> str:
    stage, block = phase
    where = "embeddings" if block == EMBED else "head" if block == num_blocks else f"block {block}"
    return f"{stage} {where}"


class _PhaseHooks:
    """Moves the tracker's phase along: forward pre/post hooks on each block, and a tensor hook on
    each block's output (and block 0's input) that fires when the backward reaches it."""

    def __init__(self, blocks: list[nn.Module], tracker: StorageTracker):
        self.tracker, self.num_blocks, self._handles = tracker, len(blocks), []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(i)))
            self._handles.append(block.register_forward_hook(self._post(i)))

    def _set_on_backward(self, tensors, phase) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
                self._handles.append(t.register_hook(lambda grad: self._set(phase)))
                return

    def _set(self, phase):
        self.tracker.phase = phase

    def _pre(self, index):
        def hook(module, args):
            if index == 0:
                self._set_on_backward(args, ("backward", EMBED))
            self.tracker.phase = ("forward", index)
        return hook

    def _post(self, index):
        def hook(module, args, output):
            self._set_on_backward(output, ("backward", index))
            self.tracker.phase = ("forward", self.num_blocks if index == self.num_blocks - 1 else index)
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def step_memory(model: nn.Module, blocks: list[nn.Module], batch, loss_fn=None, *,
                backward: bool = True) -> StepMemory:
    """Track one forward (and backward) on `batch` under the policies in force (tracker.py).

    The parameters' gradients are made to exist (zeros) before the step, as in every training
    step after the first, so that they count as what the step starts from, not as what it
    allocates; the model's own .grad tensors are put back afterwards. With backward=False only
    the saved figures are filled in (the rest stay 0)."""
    loss_fn = loss_fn or default_loss
    device_type = next(model.parameters()).device.type
    trainable = [p for p in model.parameters() if p.requires_grad]
    own_grads = [p.grad for p in trainable]
    if backward:
        for p in trainable:
            p.grad = torch.zeros_like(p)
    known = [*model.parameters(), *model.buffers(), *tree_leaves(batch)]
    known += [p.grad for p in trainable if p.grad is not None]
    tracker = StorageTracker(storage_keys(known), ("forward", EMBED))
    hooks = _PhaseHooks(blocks, tracker)
    gc.collect()
    try:
        with tracker:
            loss = loss_fn(run_model(model, batch))
            gc.collect()
            loss_record = tracker.record_of(loss)
            tracker.finish()               # the frees of the forward's end, before the backward
            backward_begins = len(tracker.steps)
            if backward:
                tracker.phase = ("backward", len(blocks))
                loss.backward()
            del loss
            gc.collect()
        tracker.finish()
    finally:
        hooks.remove()
        for p, grad in zip(trainable, own_grads):
            p.grad = grad
    return _replay(tracker, len(blocks), backward_begins, loss_record, device_type)


def _replay(tracker: StorageTracker, n: int, backward_begins: int, loss_record,
            device_type: str) -> StepMemory:
    """Walk the tracker's log once, keeping the live total and what each block's forward holds."""
    def counted(record):  # a CPU storage of a model on another device is an offloaded copy
        return device_type == "cpu" or record.device != "cpu"

    live, by_block, offloaded_live = 0, [0] * n, 0
    forward_rest, backward_rest, block_peaks = [0] * n, [0] * n, [0] * n
    head = embed = peak = 0
    peak_phase = ("forward", EMBED)
    saved, saved_outside, offloaded = [0] * n, 0, 0
    for index, (phase, freed, allocated) in enumerate(tracker.steps):
        for rids, sign in ((freed, -1), (allocated, 1)):
            for rid in rids:
                record = tracker.records[rid]
                if rid == loss_record:
                    continue
                if not counted(record):
                    offloaded_live += sign * record.nbytes
                    continue
                live += sign * record.nbytes
                stage, block = record.phase
                if stage == "forward" and 0 <= block < n:
                    by_block[block] += sign * record.nbytes
        if index == backward_begins - 1:   # the forward is over: what it holds is saved for backward
            saved, saved_outside, offloaded = list(by_block), live - sum(by_block), offloaded_live
        stage, block = phase
        if 0 <= block < n:
            rest = live - sum(by_block[:block])
            target = forward_rest if stage == "forward" else backward_rest
            target[block] = max(target[block], rest)
            block_peaks[block] = max(block_peaks[block], live)
        elif block == n:
            head = max(head, live - sum(by_block))
        else:
            embed = max(embed, live)
        if live > peak:
            peak, peak_phase = live, phase
    return StepMemory(saved, saved_outside, offloaded, forward_rest, backward_rest, head, embed, peak,
                      peak_phase, block_peaks)


def activation_bytes(model: nn.Module, blocks: list[nn.Module], batch, loss_fn=None) -> ActivationBytes:
    """Bytes the autograd graph holds after one forward, per block (no backward is run)."""
    return step_memory(model, blocks, batch, loss_fn, backward=False).activation_bytes()

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
