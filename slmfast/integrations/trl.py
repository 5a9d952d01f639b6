"""TRL integration: TRL's distillation losses computed by slmfast's fused kernels.

    from slmfast.integrations import trl as slm_trl
    slm_trl.patch()        # trl.DistillationTrainer (and GKDTrainer) now use slmfast's loss
    ...                    # build and train TRL's trainers as usual
    slm_trl.unpatch()      # TRL's own functions are back

What is swapped (TRL >= 1.16):

* `trl.trainer.distillation_trainer._chunked_divergence_loss`, the module-level function through
  which `DistillationTrainer` computes its loss from the student's and teacher's final hidden
  states and LM heads. The replacement, `chunked_divergence_loss`, has its signature and returns
  the same three values (loss, summed student entropy, number of valid positions). It covers what
  TRL's covers: the generalized JSD of Agarwal et al. 2023 ("GKD") with TRL's `beta`
  (0 = KL(teacher || student), 1 = KL(student || teacher), else the mixture M = beta P + (1 - beta) Q,
  which is slmfast's `kind="jsd"` convention exactly), temperature (TRL applies no T^2 factor,
  so slmfast's T^2 is divided out), the completion mask, `num_items_in_batch`, LM-head biases,
  logit scales and Gemma-style final-logit softcapping, and DTensor (FSDP2) heads.
  The rows are handled in token chunks by slmfast's chunk loop (slmfast/ops/_loss_chunks.py): the
  logits of one chunk, the fused row kernel of `distill_loss` (loss and d loss / d logits in
  place), and the parameter gradients by GEMM during the forward, so the backward is a scaling.
  Only masked-in positions are projected (TRL projects every position when Triton is absent).
  The student entropy, which TRL logs, is computed from the same chunk of logits.

* `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss` (when TRL ships it), which takes full
  logits: its replacement calls `slmfast.functional.distill_loss_from_logits` (one fused row
  pass, no log-softmax, mixture or KL tensors of size (tokens, vocab)). GKDTrainer's models still
  produce their logits, so the saving is the loss's own intermediates only; reduction="none"
  (per-element output) is handed back to TRL's own function.

Why the offline teacher cache (`slmfast distill cache-teacher`) is not wired into TRL: TRL's
`DistillationTrainer` distils on the student's own generations (on-policy, it generates the
completions at every step), so the sequences the teacher must score do not exist before training
and cannot be cached; its loss is also the dense divergence over the whole vocabulary, which a
top-k cache does not hold. Off-policy distillation against a cache is what
`slmfast.integrations.hf.DistillationTrainer` does (batches carrying the cached top-k).
"""

from __future__ import annotations

import contextlib

import torch

from slmfast import backends
from slmfast.ops import _loss_chunks as C
from slmfast.ops import _loss_math as M
from slmfast.ops.distill_loss import IMPLEMENTED, distill_loss_from_logits
from slmfast.ops.linear_cross_entropy import prepare_linear, select_backend

__all__ = ["chunked_divergence_loss", "generalized_jsd_loss", "patch", "patched", "unpatch", "is_patched"]

OP = "slmfast.integrations.trl.chunked_divergence_loss"
_ORIGINALS: dict[str, object] = {}


# ---- the DistillationTrainer loss ------------------------------------------------------------

def _kind(beta: float) -> tuple[int, float]:
    """TRL's beta as slmfast's kernel kind: 0 forward KL, 1 reverse KL, else JSD(beta)."""
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"{OP}: beta must be in [0, 1], got {beta}")
    return M.resolve_kind(OP, "jsd", float(beta)), float(beta)


def _transform(z: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | None:
    """z <- softcap * tanh(scale * z / softcap) in place (the logit post-processing TRL applies before
    the temperature); returns tanh(...) when softcapping (the backward needs 1 - tanh^2), else None."""
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return None
    th = torch.tanh(z / softcap)                                           # (C, V)
    z.copy_(th).mul_(softcap)
    return th


class _Divergence(torch.autograd.Function):
    """Sum over rows of the scaled divergence and its student gradients, in one chunked pass."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, factor, entropy, options):
        kind, beta, temperature, s_scale, s_cap, t_scale, t_cap, vocab, chunk, need, backend = options

        def rows_fn(c0, c1, logits, grad_scale):                            # logits: (C, V) student
            with torch.no_grad():
                t = C.logits_of(th[c0:c1], tw, tb, vocab).to(logits.dtype)   # (C, V) teacher
                _transform(t, t_scale, t_cap)
            tanh = _transform(logits, s_scale, s_cap)
            # The student's entropy at temperature T (TRL logs it), before the kernel overwrites logits.
            z = logits.to(M.acc_dtype(logits.dtype)) / temperature           # (C, V)
            lq = torch.log_softmax(z, -1)
            entropy[c0:c1] = -(lq.exp() * lq).sum(-1)
            del z, lq
            rows = C.distill_rows(backend, logits, t, None, grad_scale, kind, beta, temperature, 0.0, -100)
            if grad_scale is not None and tanh is not None:
                logits.mul_(1 - tanh * tanh)                                 # d softcap(y) / d y
            return rows

        # The kernel's gradient is d(T^2 D)/dz; TRL's loss is D / count, and dz/dy = s_scale.
        grad_scale = factor * (s_scale / temperature ** 2) if any(need) else None
        rows, gh, gw, gb = C.chunked(rows_fn, sh, sw, sb, vocab, chunk, grad_scale, need)
        ctx.has_bias, ctx.hidden_shape = sb is not None, sh.shape
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(entropy)
        return rows.sum() * (factor / temperature ** 2)

    @staticmethod
    def backward(ctx, grad_loss):
        gh, gw, gb = C.scale_saved_grads(ctx.saved_tensors, grad_loss)
        if gh is None and ctx.needs_input_grad[0]:   # no row in the loss: (0, H), still a gradient
            gh = grad_loss.new_zeros(ctx.hidden_shape)
        return gh, gw, gb if ctx.has_bias else None, None, None, None, None, None, None


def _full(t):
    """A DTensor (FSDP2 parameter) as one plain tensor, gathered once; others as they are."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if t is not None and dtensor is not None and isinstance(t, dtensor):
        return t.full_tensor()
    return t


def _gather_ctx(*params):
    """DeepSpeed ZeRO-3 keeps LM heads partitioned outside their module's forward: gather them the
    way TRL does (its helper), or do nothing when TRL or DeepSpeed is not in use."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(*params)


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's `_chunked_divergence_loss` on slmfast's fused kernels (same arguments, same results).

    Hidden states (B, K, Hs) and (B, K, Ht), heads (V, Hs) and (V, Ht), completion_mask (B, K)
    (nonzero = in the loss). Returns (loss, entropy_sum, n_valid): the divergence summed over
    masked-in positions divided by num_items_in_batch (or by the number of those positions, at
    least 1), the summed entropy of the student's distribution at `temperature` (no gradient), and
    the number of masked-in positions (a 0-dim int64 tensor).
    """
    kind, beta = _kind(beta)
    if not temperature > 0:
        raise ValueError(f"{OP}: temperature must be > 0, got {temperature}")
    for name, cap in (("student_final_logit_softcapping", student_final_logit_softcapping),
                      ("teacher_final_logit_softcapping", teacher_final_logit_softcapping)):
        if cap is not None and not cap > 0:
            raise ValueError(f"{OP}: {name} must be > 0 or None, got {cap}")
    if tuple(completion_mask.shape) != tuple(student_hidden_states.shape[:-1]):
        raise ValueError(f"{OP}: completion_mask must have shape {tuple(student_hidden_states.shape[:-1])} "
                         f"(student_hidden_states without its last dimension), got "
                         f"{tuple(completion_mask.shape)}")
    if tuple(teacher_hidden_states.shape[:-1]) != tuple(student_hidden_states.shape[:-1]):
        raise ValueError(f"{OP}: teacher_hidden_states must have the leading shape of student_hidden_states "
                         f"{tuple(student_hidden_states.shape[:-1])}, got "
                         f"{tuple(teacher_hidden_states.shape[:-1])}")
    valid = completion_mask.reshape(-1) != 0                                   # (N,)
    n_valid = valid.sum()
    with _gather_ctx(student_lm_head_weight, student_lm_head_bias), \
            _gather_ctx(teacher_lm_head_weight, teacher_lm_head_bias):
        sw, sb = _full(student_lm_head_weight), _full(student_lm_head_bias)
        tw, tb = _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)
        hs = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]   # (n, Hs)
        ht = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]   # (n, Ht)
        need = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hs, sw, sb))
        hs, sw, sb = prepare_linear(OP, hs, sw, sb, "student_hidden_states", "student_lm_head_weight",
                                    "student_lm_head_bias")
        with torch.no_grad():
            ht, tw, tb = prepare_linear(OP, ht.detach(), tw.detach(), tb.detach() if tb is not None else None,
                                        "teacher_hidden_states", "teacher_lm_head_weight",
                                        "teacher_lm_head_bias")
        acc = M.acc_dtype(hs.dtype)
        if num_items_in_batch is None:
            count = n_valid.clamp(min=1).to(acc)
        elif isinstance(num_items_in_batch, torch.Tensor):
            count = num_items_in_batch.reshape(()).to(device=hs.device, dtype=acc)
        else:
            count = torch.tensor(float(num_items_in_batch), dtype=acc, device=hs.device)
        factor = 1.0 / count
        n = hs.shape[0]
        vocab = M.vocab_columns(OP, sw.shape[0], tw.shape[0], None)
        entropy = torch.zeros(n, dtype=acc, device=hs.device)                  # (n,)
        chunk = int(chunk_size) if chunk_size else C.default_chunk_size(n, hs.shape[1], vocab, hs.device,
                                                                        hs.dtype)
        name = select_backend("distill_loss", IMPLEMENTED, hs.device, hs.dtype, backend, any(need))
        s_cap, t_cap = student_final_logit_softcapping, teacher_final_logit_softcapping
        options = (kind, beta, float(temperature), float(student_logit_scale),
                   None if s_cap is None else float(s_cap), float(teacher_logit_scale),
                   None if t_cap is None else float(t_cap), vocab, chunk, need, name)
        loss = _Divergence.apply(hs, sw, sb, ht, tw, tb, factor, entropy, options)
    return loss, entropy.sum(), n_valid


# ---- the GKDTrainer loss -------------------------------------------------------------------

def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """GKDTrainer.generalized_jsd_loss through distill_loss_from_logits: logits (B, T, V), labels
    (B, T) with -100 where a position is not in the loss; TRL's reductions and num_items_in_batch."""
    if reduction not in ("batchmean", "sum", "mean") and num_items_in_batch is None:
        return _ORIGINALS["gkd"](student_logits, teacher_logits, labels=labels, beta=beta,
                                 temperature=temperature, reduction=reduction)
    kind, beta = _kind(beta)
    name = {0: "forward_kl", 1: "reverse_kl"}.get(kind, "jsd")
    target = None
    if labels is not None:
        # Only the mask matters (hard_weight is 0): any in-range id where the label counts.
        target = torch.where(labels != -100, 0, -100).to(student_logits.device)
    total = distill_loss_from_logits(student_logits, teacher_logits, target, kind=name, beta=beta,
                                     temperature=temperature, reduction="sum") / temperature ** 2
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    rows = (labels != -100).sum() if labels is not None else None
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / (rows.clamp_min(1) if rows is not None else max(student_logits.shape[0], 1))
    elements = rows * student_logits.shape[-1] if rows is not None else student_logits.numel()
    return total / elements


# ---- patch / unpatch --------------------------------------------------------------------------

def _targets():
    """(key, owner, attribute, replacement) of every TRL function this module swaps."""
    try:
        import trl.trainer.distillation_trainer as distillation
    except ImportError as e:
        raise ImportError("slmfast.integrations.trl needs TRL >= 1.16 (pip install 'slmfast[trl]'); "
                          f"importing trl.trainer.distillation_trainer failed: {e}") from e
    if not hasattr(distillation, "_chunked_divergence_loss"):
        raise ImportError("slmfast.integrations.trl: this TRL has no trl.trainer.distillation_trainer."
                          "_chunked_divergence_loss (TRL >= 1.16 computes its loss there); nothing to patch")
    targets = [("distillation", distillation, "_chunked_divergence_loss", chunked_divergence_loss)]
    try:
        from trl.experimental.gkd import gkd_trainer
    except ImportError:
        gkd_trainer = None
    if gkd_trainer is not None and hasattr(gkd_trainer.GKDTrainer, "generalized_jsd_loss"):
        targets.append(("gkd", gkd_trainer.GKDTrainer, "generalized_jsd_loss",
                        staticmethod(generalized_jsd_loss)))
    return targets


def is_patched() -> bool:
    return bool(_ORIGINALS)


def patch() -> list[str]:
    """Swap TRL's loss functions for slmfast's; returns what was patched. Patching twice is a no-op."""
    done = []
    for key, owner, attribute, replacement in _targets():
        if key not in _ORIGINALS:
            # GKD's is a staticmethod: keep the function itself, to call and to restore.
            is_class = isinstance(owner, type)
            _ORIGINALS[key] = owner.__dict__[attribute] if is_class else getattr(owner, attribute)
            setattr(owner, attribute, replacement)
        done.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
    backends.extension()   # load the kernels now, not inside the first training step
    return done


def unpatch() -> None:
    """Put TRL's own functions back (nothing happens when not patched)."""
    if not _ORIGINALS:
        return
    for key, owner, attribute, _ in _targets():
        if key in _ORIGINALS:
            setattr(owner, attribute, _ORIGINALS.pop(key))
    _ORIGINALS.clear()


@contextlib.contextmanager
def patched():
    """`with patched(): ...` patches for the block and restores TRL afterwards."""
    already = is_patched()
    patch()
    try:
        yield
    finally:
        if not already:
            unpatch()

