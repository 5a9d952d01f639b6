"""Tensor memory of a stretch of eager PyTorch, op by op: what is alive, who made it, the peak.

A TorchDispatchMode sees every op that runs while it is active: the forward, and the backward
that autograd runs on the calling thread (with what checkpointing recomputes there). Each
storage an op returns that did not exist when tracking began gets a record: its bytes, its
device and the phase it was made in (a label the caller moves along: which block, forward or
backward). Frees are seen at the next op: before an op's outputs are counted, the records whose
storage has died (a weak reference) are retired. The log is therefore a sequence of steps, one
per op, each a list of frees and allocations, and the live total after each op is what the
tracked tensors hold at that moment; its maximum over the ops is the peak.

This is the idea of torch's own module-level MemTracker (torch.distributed._tools.mem_tracker,
also used under FakeTensorMode), written here so that every allocation carries the block and
pass it came from, which a recompute planner needs, and so that it runs on the meta device as
well as on real ones (on meta it predicts without computing anything). slmfast's fused losses
are custom ops whose bodies are Python loops over chunks; their bodies run under the tracker,
so their chunk temporaries count. What it cannot see: memory a C++ or Triton kernel allocates
and frees inside itself (a workspace), the allocator's slack and fragmentation, and tensors
made outside the mode. benchmarks/bench_recompute_peak.py
measures how far that leaves the prediction from a process's real peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class Record:
    nbytes: int
    phase: tuple   # the caller's label when the storage was made, e.g. ("forward", 3)
    device: str


class StorageTracker(TorchDispatchMode):
    """Records allocations and frees of storages, op by op (module docstring).

    `phase` is read at each op; set it from hooks. `preexisting` holds storage keys
    (`untyped_storage()._cdata`) that are not tracked: parameters, buffers, inputs."""

    def __init__(self, preexisting: set[int], phase: tuple = ("forward", -1)):
        super().__init__()
        self.preexisting = preexisting
        self.phase = phase
        self.records: list[Record] = []
        self.steps: list[tuple[tuple, list[int], list[int]]] = []  # (phase, freed ids, allocated ids) per op
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}     # storage key -> (weak ref, record id)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = _python_body(func)
        if inside is None:
            out = func(*args, **(kwargs or {}))
        else:  # a Python custom op: run its body tracked, so that its temporaries count
            with self, torch.no_grad():
                out = inside(*args, **(kwargs or {}))
        freed = self._retire_dead()
        allocated = []
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self._live or key in self.preexisting:
                    continue
                rid = len(self.records)
                self.records.append(Record(storage.nbytes(), self.phase, t.device.type))
                self._live[key] = (StorageWeakRef(storage), rid)
                allocated.append(rid)
        self.steps.append((self.phase, freed, allocated))
        return out

    def _retire_dead(self) -> list[int]:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        return [self._live.pop(key)[1] for key in dead]

    def finish(self) -> None:
        """Retire what died after the last op (one more, empty step)."""
        freed = self._retire_dead()
        self.steps.append((self.phase, freed, []))

    def live_ids(self) -> dict[int, int]:
        """Storage key -> record id of the records still alive."""
        return {key: rid for key, (ref, rid) in self._live.items() if not ref.expired()}

    def record_of(self, tensor: torch.Tensor) -> int | None:
        """The record id of a tracked tensor's storage, if it is tracked and alive."""
        entry = self._live.get(tensor.untyped_storage()._cdata)
        return None if entry is None or entry[0].expired() else entry[1]


def _python_body(func):
    """The Python function behind one of slmfast's fused-loss custom ops (torch.library.custom_op),
    or None. Those ops loop over chunks in Python: what they allocate and free inside (a chunk of
    logits, the gradient accumulators) is the largest transient of a step's head, and running
    their body under the tracker shows it."""
    if getattr(func, "namespace", None) != "slmfast_loss":
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:   # an older torch: the op's temporaries stay unseen
        return None
    definition = _maybe_get_opdef(func)
    return getattr(definition, "_init_fn", None)


def storage_keys(tensors) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}
