"""Recomputation policies applied to a model's repeated blocks from outside.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
showed that recomputing only the cheap, memory-heavy parts of a block (norms, activations,
elementwise work) removes most activation memory for a few percent more FLOPs, while
recomputing whole blocks costs ~30%. The policies:

  none       nothing changes
  selective  per block, save the outputs of the matmuls and of attention (its output and
             log-sum-exp), recompute everything else (torch.utils.checkpoint with a selective
             policy, torch >= 2.4). A block class that sets SELECTIVE_IN_KERNELS = True (slmfast's
             own DecoderLayer) runs as it is: its fused kernels already keep only matmul inputs
             and attention's q, k, v, out and lse, and recompute norms, the SwiGLU product and
             RoPE in backward; wrapping it would only add copies (measured: 1.08x the bytes)
  full       checkpoint each block: save its inputs only, recompute the whole block in backward
  offload    like full, and the saved block inputs move to pinned CPU memory during the forward
             (asynchronously on a side stream when on a GPU) and come back for backward; on a
             CPU-only run there is no other memory to move to, so it behaves like full

`apply` replaces each block's `forward` with a wrapper (an instance attribute, so the class and
the state_dict are untouched) and `remove` deletes it again. RNG state is preserved by
checkpoint (preserve_rng_state), so recomputed dropout masks match. A model whose config has
`use_cache` (Hugging Face) gets it turned off while a policy is applied: the KV cache is state
mutated inside the recomputed region, and torch's selective checkpointing then fails in backward
("aten.slice.Tensor invocation ... not found in storage"), as Hugging Face's own gradient
checkpointing avoids by the same switch.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "selective", "full", "offload")
_ORIGINAL_FORWARD = "_slmfast_original_forward"
_POLICY = "_slmfast_recompute_policy"
_SAVED_USE_CACHE = "_slmfast_saved_use_cache"


@functools.cache
def _ops_to_save() -> frozenset:
    """Matmul and attention outputs: what the selective policy keeps."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_flash_attention_forward", "_efficient_attention_forward"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    for namespace in ("slmfast", "slmfast_triton"):
        lib = getattr(torch.ops, namespace)
        for name in ("attention_fwd",):
            try:
                ops.add(getattr(lib, name).default)
            except (AttributeError, RuntimeError):
                pass
    return frozenset(ops)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ops_to_save() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


class _OffloadHooks:
    """saved_tensors_hooks that move accelerator tensors to pinned CPU memory and back."""

    def __init__(self):
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def pack(self, t: torch.Tensor):
        if t.device.type in ("cpu", "meta"):  # nothing to move (meta: shapes only, counted as kept)
            return t
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device="cpu",
                           pin_memory=t.device.type == "cuda")
        if self.stream is not None and t.device.type == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            event = self.stream.record_event()
        else:
            host.copy_(t)
            event = None
        return (t.device, host, event)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, event = packed
        if event is not None:
            event.synchronize()
        return host.to(device, non_blocking=True)


def _wrapped_forward(module: nn.Module, policy: str, *args, **kwargs):
    original = getattr(module, _ORIGINAL_FORWARD)
    if policy == "none" or not torch.is_grad_enabled():
        return original(*args, **kwargs)
    if policy == "selective" and getattr(module, "SELECTIVE_IN_KERNELS", False):
        return original(*args, **kwargs)
    if policy == "selective":
        return checkpoint(original, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
    if policy == "full":
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    if policy == "offload":
        hooks = _OffloadHooks()
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
    raise ValueError(f"unknown recompute policy {policy!r}")


def set_block_policy(block: nn.Module, policy: str) -> None:
    """Give one block a policy (replacing any it had)."""
    if policy not in POLICIES:
        raise ValueError(f"recompute policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not hasattr(block, _ORIGINAL_FORWARD):
        setattr(block, _ORIGINAL_FORWARD, block.forward)
    setattr(block, _POLICY, policy)
    block.forward = functools.partial(_wrapped_forward, block, policy)


def clear_block_policy(block: nn.Module) -> None:
    if hasattr(block, _ORIGINAL_FORWARD):
        del block.forward  # the instance attribute; the class's forward shows through again
        delattr(block, _ORIGINAL_FORWARD)
        delattr(block, _POLICY)


def block_policy(block: nn.Module) -> str:
    return getattr(block, _POLICY, "none")


def disable_kv_cache(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False) and not hasattr(model, _SAVED_USE_CACHE):
        setattr(model, _SAVED_USE_CACHE, config.use_cache)
        config.use_cache = False


def restore_kv_cache(model: nn.Module) -> None:
    if hasattr(model, _SAVED_USE_CACHE):
        model.config.use_cache = getattr(model, _SAVED_USE_CACHE)
        delattr(model, _SAVED_USE_CACHE)
