"""The pieces a run is set up from, in the order the trainer builds them: data, teacher (live or
cached), student, recompute policy, optimizer; and the (un)sharded state of a student for
checkpoints. Each is a plain function of the config, so other loops can reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmfast import recompute
from slmfast.distill import distributed as D
from slmfast.distill.config import ConfigError, DistillConfig
from slmfast.distill.data import TokenData, Windows, WindowSampler, prepare_data


@dataclass
class RunData:
    data: TokenData
    tokenizer: object               # tokenizers.Tokenizer
    train: Windows
    val: Windows
    sampler: WindowSampler
    eval_batches: int
    val_windows: np.ndarray         # (eval_batches * batch_size,) spread evenly over the validation split


def resolve_tokenizer(config: DistillConfig) -> str:
    """data.tokenizer, else the teacher's (or the teacher cache's) tokenizer.json, else "" (train one)."""
    from slmfast.distill.tokenizer import find_tokenizer_file

    if config.data.tokenizer:
        return config.data.tokenizer
    for directory in (config.teacher.path, config.teacher.cache):
        if directory and (file := find_tokenizer_file(directory)) is not None:
            return str(file)
    return ""


def setup_data(config: DistillConfig, env: D.Env, say) -> RunData:
    """Rank 0 prepares (or finds) the tokenized data; every rank opens it."""
    dc, tr = config.data, config.train
    directory = None
    if env.is_main:
        directory = prepare_data(dc.source, dc.cache_dir or Path(config.out_dir) / "data",
                                 tokenizer_path=resolve_tokenizer(config), vocab_size=dc.vocab_size,
                                 val_fraction=dc.val_fraction, max_documents=dc.max_documents,
                                 text_field=dc.text_field, hf_split=dc.hf_split, pattern=dc.glob, log=say)
    data = TokenData(D.broadcast_object(directory, env))
    train = Windows(data.splits["train"], dc.seq_len, dc.pack)
    val = Windows(data.splits["val"], dc.seq_len, dc.pack)
    eval_batches = min(tr.eval_batches, val.count // tr.batch_size)
    if eval_batches < 1:
        raise ConfigError(f"data: the validation split has {val.count} sequences of {dc.seq_len} tokens, "
                          f"fewer than train.batch_size ({tr.batch_size}); raise data.val_fraction")
    # Evaluation sequences: evenly spaced over the validation split (documents are stored sorted by
    # name, so the first windows would all come from a few packages), the same at every evaluation.
    val_windows = np.linspace(0, val.count - 1, eval_batches * tr.batch_size).round().astype(np.int64)
    return RunData(data, data.tokenizer(), train, val, WindowSampler(train.count, config.seed), eval_batches,
                   val_windows)


def setup_teacher(config: DistillConfig, env: D.Env, run_data: RunData, mode: str, say):
    """(teacher or None, cache or None): the live teacher and/or the offline top-k cache."""
    from slmfast.distill.cache import TeacherCache
    from slmfast.distill.teacher import check_tokenizer, load_teacher, resolve_dtype

    tc, dc, tr = config.teacher, config.data, config.train
    data = run_data.data
    teacher = cache = None
    if mode == "distill" and tc.path:
        device = env.device if tc.device == "auto" else D.resolve_device(tc.device, env.local_rank)
        teacher = load_teacher(tc.path, device=device, dtype_name=tc.dtype)
        say("teacher: " + check_tokenizer(tc.path, run_data.tokenizer, data.vocab_size, teacher.vocab_size,
                                          tc.allow_unverified_tokenizer))
        params = sum(p.numel() for p in teacher.model.parameters())
        if tc.shard and env.distributed:
            teacher.shard()
        say(f"teacher: {tc.path} ({teacher.kind}, {params:,} parameters, {resolve_dtype(tc.dtype, device)}, "
            f"{device}{', sharded' if teacher.sharded is not None else ''})")
    if mode == "distill" and tc.cache:
        lo = config.loss
        cache = TeacherCache(tc.cache, data=data, seq_len=dc.seq_len, pack=dc.pack, k=lo.topk,
                             teacher_id=teacher.id if teacher is not None else None, kind=lo.cache_kind,
                             samples=lo.samples, temperature=lo.temperature)
        cache.check_covers(run_data.sampler.take(0, tr.steps * tr.batch_size * tr.grad_accum))
        what = f"top-{lo.topk}" if lo.cache_kind == "topk" else f"sampled ({lo.samples} draws)"
        say(f"teacher: offline {what} cache {tc.cache} (teacher {cache.manifest['teacher_path']})")
    return teacher, cache


def build_student(config: DistillConfig, vocab_size: int, teacher, resume: dict | None, say):
    """From a checkpoint (resume), from the teacher's layers, or from a named/file config; seeded
    right here, so the initial weights do not depend on what ran before."""
    from slmfast.distill.init import init_from_teacher, student_config
    from slmfast.models import CausalLM

    torch.manual_seed(config.seed)
    if resume is not None:
        student = CausalLM(resume["config"])
        student.load_state_dict(resume["model"], strict=True)
    elif config.student.init_from_teacher != "":
        s = config.student
        student = init_from_teacher(teacher.model, s.init_from_teacher, s.num_layers)
        say(f"student: {student.config.num_layers} layers copied from the teacher "
            f"({student.config.extra['init_from_teacher']['layers']})")
    else:
        student = CausalLM(student_config(config.student, vocab_size, config.data.seq_len))
    if student.config.vocab_size < vocab_size:
        raise ConfigError(f"student vocabulary ({student.config.vocab_size}) is smaller than the data's "
                          f"({vocab_size})")
    return student


def apply_recompute(student, policy: str) -> None:
    """The policy of train.recompute on the student's blocks (slmfast/recompute/policies.py)."""
    if policy != "none":
        recompute.apply(student, policy)


def build_optimizer(model: torch.nn.Module, config: DistillConfig, log=print) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019), weight decay on matrices only (not norms or biases), fused
    when the build has it."""
    o = config.optim
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.fused in ("auto", "true"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            if o.fused == "true":
                raise ConfigError(f"optim.fused: fused AdamW is not available here: {e}") from None
            log(f"optim: fused AdamW unavailable ({e}); using the foreach implementation")
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


# ---- the student's state, sharded or not ------------------------------------------------------------

def sharded(env: D.Env, parallel: str) -> bool:
    return env.distributed and parallel == "fsdp"


def gather_state(step_module, optimizer, env: D.Env, parallel: str):
    """Full (unsharded) model and optimizer state dicts; a collective under FSDP."""
    if sharded(env, parallel):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(step_module, options=opts)
        optim = get_optimizer_state_dict(step_module, optimizer, options=opts)
        return {k.removeprefix("student."): v for k, v in model.items()}, optim
    return step_module.student.state_dict(), optimizer.state_dict()


def load_optimizer(optimizer, step_module, state, env: D.Env, parallel: str) -> None:
    if sharded(env, parallel):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(step_module, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def save_final(step_module, student, optimizer, env: D.Env, parallel: str, directory: Path, tok_json: str):
    """The trained student as a model directory with its tokenizer (rank 0 writes)."""
    from slmfast.models import CausalLM
    from slmfast.models.io import save_model_dir

    model = student
    if sharded(env, parallel):
        state, _ = gather_state(step_module, optimizer, env, parallel)
        if env.is_main:
            model = CausalLM(student.config)
            model.load_state_dict(state, strict=True)
    if env.is_main:
        save_model_dir(model, directory, extra_files={"tokenizer.json": tok_json})
    return directory
