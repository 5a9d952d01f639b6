"""Knowledge distillation inside transformers' Trainer, with slmfast's fused losses.

    from slmfast.integrations.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher="path/or/model", args=TrainingArguments(...),
                                  train_dataset=data, loss="forward_kl", temperature=2.0, alpha=0.5)
    trainer.train()

The loss of a batch (Hinton et al. 2015; the kinds are those of slmfast.functional.distill_loss):
    sum over target tokens of  T^2 * D(P_T || Q_T) + alpha * CE(student, label)
divided by the number of target tokens, or by `num_items_in_batch` when the Trainer passes it
(gradient accumulation, and the count over all processes under DDP/FSDP, as transformers does for
its own causal-LM loss). It is computed from the final hidden states of both models and their LM
heads by `distill_loss`, chunk by chunk, so neither model's (tokens x vocab) logits exist. Position
t predicts labels[t + 1] (the causal shift of transformers' ForCausalLMLoss); a position counts
when its label is not -100 and, when an attention_mask is given, the target token is not padding.
Packed batches (transformers' DataCollatorWithFlattening: one row, position_ids restarting per
sequence, -100 at each sequence start) need nothing more: the models see the position_ids.

The teacher is a model or a path (loaded with AutoModelForCausalLM.from_pretrained). It is frozen
(requires_grad False), kept in eval mode, held outside the student (so not in the optimizer, not in
the checkpoints the Trainer writes) and moved to the training device. Under FSDP2 it can be
sharded too (`shard_teacher=True`: torch's fully_shard on each decoder layer and on the model);
otherwise every process holds a replica.

Offline teacher: batches that carry `teacher_topk_ids` and `teacher_topk_logprobs` (B, T, k), the
teacher's top-k log-probabilities per position (as written by `slmfast distill cache-teacher`,
aligned so that position t holds the distribution over the token at t + 1) are trained with
slmfast.functional.topk_distill_loss, and no teacher model is needed (teacher=None).

The student's forward runs through the (DDP/FSDP) wrapper's __call__, with the wrapped module's
forward swapped for one that returns the loss, so that DDP's and FSDP's hooks run as for a normal
forward and the LM head is materialized while the loss reads it (TRL's DistillationTrainer does
the same for the same reason). The swap also removes the autocast that Accelerate wraps around the
forward for bf16=True / fp16=True, so the loss (both models and the fused loss) runs inside
`accelerator.autocast()` instead.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers
from torch import nn

from slmfast import functional as F

__all__ = ["DistillationTrainer", "LOSS_KINDS"]

IGNORE_INDEX = -100
LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs")


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2 (DTensor) parameter gathered into one plain tensor; other tensors as they are."""
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    if t is not None and dtensor is not None and isinstance(t, dtensor):
        return t.full_tensor()
    return t


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head (model.model for Llama, transformer for GPT-2)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or base is model:
        raise ValueError(f"DistillationTrainer: cannot find the backbone of {type(model).__name__} "
                         "(a causal LM with base_model_prefix and get_output_embeddings() is needed)")
    return base


def _call_through(wrapper: nn.Module, module: nn.Module, fn, *args, **kwargs):
    """fn(*args, **kwargs) run as the forward of `wrapper` (DDP, FSDP or the module itself):
    module.forward is swapped for fn for one call of wrapper(), so that every forward hook fires."""
    own = "forward" in module.__dict__          # an instance attribute (hf.patch's loss), or the class's
    original = module.forward

    def restore():
        if own:
            module.forward = original
        else:
            module.__dict__.pop("forward", None)

    def forward(*_args, **_kwargs):
        restore()
        return fn(*args, **kwargs)

    module.forward = forward
    try:
        return wrapper()
    finally:
        restore()


def _model_inputs(model: nn.Module, inputs: dict) -> dict:
    """The batch columns the backbone takes (input_ids, attention_mask, position_ids, ...)."""
    names = inspect.signature(_backbone(model).forward).parameters
    return {k: v for k, v in inputs.items() if k in names and k not in ("labels", *TOPK_KEYS)}


def _logit_options(model: nn.Module, who: str) -> None:
    """Refuse what the fused loss does not compute (it would give silently wrong numbers)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(f"DistillationTrainer: the {who} ({config.model_type}) applies "
                         f"final_logit_softcapping={cap}, which slmfast's distillation loss does not compute")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"DistillationTrainer: the {who} ({config.model_type}) scales its logits "
                             f"({name}={value}), which slmfast's distillation loss does not compute")


class DistillationTrainer(transformers.Trainer):
    """transformers.Trainer whose loss distils a teacher into the model (see the module docstring).

    Arguments beyond Trainer's: teacher (a model, a path, or None with cached top-k batches),
    loss (one of LOSS_KINDS), beta (for "jsd": 0 = forward KL, 1 = reverse KL), temperature,
    alpha (weight of the hard-label cross-entropy), teacher_kwargs (for from_pretrained),
    shard_teacher (FSDP2: shard the teacher as well), topk_tail ("none" or "bucket", cached
    teacher only), chunk_size (tokens per chunk of the fused loss; None: its default).
    """

    def __init__(self, model=None, args=None, *, teacher=None, loss: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, alpha: float = 0.0, teacher_kwargs: dict | None = None,
                 shard_teacher: bool = False, topk_tail: str = "none", chunk_size: int | None = None,
                 **kwargs):
        if loss not in LOSS_KINDS:
            raise ValueError(f"DistillationTrainer: loss must be one of {', '.join(LOSS_KINDS)}, "
                             f"got {loss!r}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"DistillationTrainer: beta must be in [0, 1], got {beta}")
        if not temperature > 0:
            raise ValueError(f"DistillationTrainer: temperature must be > 0, got {temperature}")
        if not alpha >= 0:
            raise ValueError(f"DistillationTrainer: alpha must be >= 0, got {alpha}")
        if topk_tail not in ("none", "bucket"):
            raise ValueError(f"DistillationTrainer: topk_tail must be 'none' or 'bucket', got {topk_tail!r}")
        super().__init__(model=model, args=args, **kwargs)
        self.distill_options = dict(kind=loss, beta=float(beta), temperature=float(temperature),
                                    hard_weight=float(alpha), chunk_size=chunk_size)
        self.topk_tail = topk_tail
        # The loss is normalized by num_items_in_batch: let the Trainer count target tokens (over the
        # shifted labels, across processes) and not rescale the loss for gradient accumulation.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        _logit_options(self.accelerator.unwrap_model(self.model), "student")
        self.teacher = self._load_teacher(teacher, teacher_kwargs or {}, shard_teacher)

    # ---- the teacher ---------------------------------------------------------------------

    def _load_teacher(self, teacher, teacher_kwargs: dict, shard: bool):
        if teacher is None:
            return None
        if isinstance(teacher, (str, Path)):
            teacher = transformers.AutoModelForCausalLM.from_pretrained(str(teacher), **teacher_kwargs)
        elif not isinstance(teacher, nn.Module):
            raise ValueError(f"DistillationTrainer: teacher must be a model, a path or None, got "
                             f"{type(teacher).__name__}")
        if teacher is self.accelerator.unwrap_model(self.model):
            raise ValueError("DistillationTrainer: teacher is the student model itself")
        _logit_options(teacher, "teacher")
        teacher.requires_grad_(False)
        teacher.eval()
        if hasattr(teacher.config, "use_cache"):
            teacher.config.use_cache = False
        teacher.to(self.args.device)
        if shard:
            teacher = self._shard(teacher)
        return teacher

    def _shard(self, teacher: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        if not torch.distributed.is_initialized():
            raise ValueError("DistillationTrainer: shard_teacher=True needs a distributed run (torchrun / "
                             "accelerate launch) with FSDP")
        layers = set(getattr(teacher, "_no_split_modules", None) or ())    # the decoder layer classes
        for module in teacher.modules():
            if type(module).__name__ in layers:
                fully_shard(module)
        fully_shard(teacher)
        return teacher

    # ---- the loss --------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        # Keep the cached teacher's columns: the Trainer drops what the model's forward does not name.
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(k for k in TOPK_KEYS
                                                               if k not in self._signature_columns)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DistillationTrainer: the batch has no 'labels' (use a collator that sets "
                             "them, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        cached = all(k in inputs for k in TOPK_KEYS)
        if not cached and self.teacher is None:
            raise ValueError("DistillationTrainer: no teacher: pass teacher= or batches with "
                             f"{' and '.join(TOPK_KEYS)} (an offline teacher cache)")
        student = self.accelerator.unwrap_model(model)
        # Accelerate's mixed precision (bf16=True / fp16=True) is an autocast wrapped around the model's
        # forward, which _call_through swaps out for one call: enter the same autocast around it.
        with self.accelerator.autocast():
            loss = _call_through(model, student, self._loss, student, inputs, num_items_in_batch, cached)
        if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                and self.accelerator.num_processes > 1):
            # The count is over every process while DDP/FSDP average the gradients: undo the average.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _targets(self, inputs: dict) -> torch.Tensor:
        labels = inputs["labels"]
        targets = torch.full_like(labels, IGNORE_INDEX)                       # (B, T)
        targets[..., :-1] = labels[..., 1:]
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            padded = torch.zeros_like(targets, dtype=torch.bool)
            padded[..., :-1] = mask[..., 1:] == 0
            targets = targets.masked_fill(padded, IGNORE_INDEX)
        return targets

    def _loss(self, student: nn.Module, inputs: dict, num_items_in_batch, cached: bool) -> torch.Tensor:
        backbone = _backbone(student)
        hidden = backbone(**_model_inputs(student, inputs), use_cache=False).last_hidden_state    # (B, T, H)
        head = student.get_output_embeddings()
        targets = self._targets(inputs).to(hidden.device)                   # (B, T)
        options = dict(self.distill_options)
        chunk_size = options.pop("chunk_size")
        if cached:
            ids = inputs["teacher_topk_ids"].to(hidden.device)                 # (B, T, k)
            logprobs = inputs["teacher_topk_logprobs"].to(hidden.device)       # (B, T, k)
            return F.topk_distill_loss(hidden, head.weight, ids, logprobs, target=targets,
                                       student_bias=head.bias, tail=self.topk_tail,
                                       num_items=num_items_in_batch, chunk_size=chunk_size, **options)
        teacher = self.teacher
        if teacher.training:                                                  # kept in eval mode
            teacher.eval()
        with torch.no_grad():
            teacher_hidden = _call_through(
                teacher, teacher,
                lambda: _backbone(teacher)(**_model_inputs(teacher, inputs),
                                           use_cache=False).last_hidden_state)                # (B, T, Ht)
        teacher_head = teacher.get_output_embeddings()
        return F.distill_loss(hidden, head.weight, teacher_hidden, _full(teacher_head.weight), targets,
                              student_bias=head.bias, teacher_bias=_full(teacher_head.bias),
                              num_items=num_items_in_batch, chunk_size=chunk_size, **options)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the distillation loss (no logits are returned)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
