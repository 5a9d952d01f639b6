"""The training loop for distillation and pretraining: one plain function, `train(config)`.

In the gpt-fast / torchtitan spirit, everything is explicit and in order; `train` reads top to
bottom and calls one function per stage:
  set-up   process group -> seeds -> data (tokenized once) -> teacher (frozen) or teacher cache ->
           student (config, teacher layers, or checkpoint) -> recompute policy -> DDP/FSDP ->
           torch.compile -> AdamW -> resume state           (_set_up, on slmfast/distill/setup.py)
  step     lr from the schedule -> the step's micro-batches -> their predicting-token count,
           all-reduced (the loss normalizer) -> per micro-batch: teacher hidden states (or
           cached top-k), forward + loss under autocast, backward (gradient sync on the last
           only) -> global loss all-reduced -> non-finite check -> clip -> AdamW step (_train_step)
  around   evaluation every eval_every steps (_evaluate), JSONL/TensorBoard logs and a tqdm bar on
           rank 0, atomic checkpoints (_save_checkpoint) every ckpt_every steps and at the end, on
           Ctrl-C (SIGINT), and after max_nonfinite non-finite losses in a row (_status_after_step).
What set-up builds is one _Run record and where the run stands one _Progress record; neither has
behaviour of its own.
Schedule: linear warmup to optim.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at
the last step (Loshchilov & Hutter 2017, without restarts).
Exact resume: the data position is a function of the step, the schedule is a function of the
step, and the weights, optimizer and RNG states are restored bit for bit, so on the CPU in fp32
the loss curve after a resume equals the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from slmfast.distill import distributed, setup
from slmfast.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from slmfast.distill.config import ConfigError, DistillConfig
from slmfast.distill.runlog import RunLog, format_table, human, human_bytes, read_log
from slmfast.distill.step import EVAL_FIELDS, StepModule, teacher_stats
from slmfast.io import atomic_write_text


@dataclass
class RunResult:
    out_dir: Path
    status: str                     # completed | interrupted | nonfinite | max_tokens
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    losses: list[float] = field(default_factory=list)       # global loss of every step run here
    evals: list[dict] = field(default_factory=list)         # {"step", "tokens", ...metrics}
    teacher_eval: dict | None = None
    nonfinite: int = 0
    activation_bytes: int | None = None
    num_parameters: int = 0
    checkpoint: Path | None = None
    final_dir: Path | None = None
    data_dir: Path | None = None
    device: str = "cpu"
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def final_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None


def lr_at(step: int, config: DistillConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay."""
    optim, total = config.optim, config.train.steps
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)


def autocast_context(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StopFlag:
    """SIGINT sets a flag the loop checks between steps (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.pressed = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:      # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(config: DistillConfig, mode: str = "distill", *, should_stop: Callable[[int], bool] | None = None,
          log: Callable[[str], None] | None = None, measure_activations: bool = False) -> RunResult:
    """Run `config` ("distill" with a teacher or cache, "pretrain" without). `should_stop(step)`
    is polled after every step (as Ctrl-C is): True checkpoints and returns. With
    `measure_activations`, the bytes saved for backward by one micro-batch are reported."""
    config.validate(mode)
    env = distributed.init(config.device)
    try:
        say = (log if log is not None else print) if env.is_main else _say_nothing
        run, progress, resume_path = _set_up(config, mode, env, say)
        settings = config.train
        activation_bytes = _measure_activation_bytes(run, progress) if measure_activations else None
        losses, evals = [], []
        if resume_path is not None and env.is_main:     # the validation curve so far, from the log
            evals = [dict(record["eval"], step=record["step"], tokens=record["tokens"])
                     for record in read_log(run.out_dir) if "eval" in record]
        status, last_checkpoint = "completed", resume_path
        start_step = progress.step
        train_seconds, window_tokens, window_seconds = 0.0, 0, 0.0
        bar = _progress_bar(run, progress)
        if settings.eval_every and progress.step == 0:   # the starting point of the validation curve
            evals.append(_evaluate(run, progress))
        run.model.train()
        with _StopFlag() as ctrl_c:
            while progress.step < settings.steps:
                started = time.perf_counter()
                outcome = _train_step(run, progress, ctrl_c.pressed)
                losses.append(outcome.loss)
                seconds = time.perf_counter() - started
                train_seconds += seconds
                window_seconds += seconds
                window_tokens += run.tokens_per_step
                bar.update(1)
                step = progress.step
                if run.runlog is not None and (step % settings.log_every == 0 or step == settings.steps):
                    tokens_per_s = window_tokens / max(window_seconds, 1e-9)
                    run.runlog.write({"step": step, "tokens": progress.tokens, "loss": outcome.loss,
                                      "lr": outcome.lr, "grad_norm": outcome.grad_norm,
                                      "tokens_per_s": tokens_per_s, "elapsed_s": train_seconds})
                    bar.set_postfix(loss=f"{outcome.loss:.3f}", tok_s=human(tokens_per_s), refresh=False)
                    window_tokens, window_seconds = 0, 0.0
                if settings.eval_every and step % settings.eval_every == 0 and step < settings.steps:
                    evals.append(_evaluate(run, progress))
                stop_asked = outcome.stop_requested or (should_stop is not None and should_stop(step))
                status = _status_after_step(run, progress, stop_asked)
                periodic = settings.ckpt_every and step % settings.ckpt_every == 0 and step < settings.steps
                if status != "completed" or periodic:
                    last_checkpoint = _save_checkpoint(run, progress)
                    if status == "interrupted":
                        say(f"interrupted at step {step}: checkpoint {last_checkpoint}; continue with "
                            "--train.resume true")
                if status != "completed":
                    break
        bar.close()

        final_dir = None
        if status in ("completed", "max_tokens"):
            evals.append(_evaluate(run, progress))
            last_checkpoint = _save_checkpoint(run, progress)
            if settings.save_final:
                final_dir = setup.save_final(run.step_module, run.student, run.optimizer, env,
                                             settings.parallel, run.out_dir / "final", run.tokenizer_json)
        if run.runlog is not None:
            run.runlog.close()
        result = RunResult(
            out_dir=run.out_dir, status=status, steps=progress.step, tokens=progress.tokens,
            train_seconds=train_seconds,
            tokens_per_s=(progress.step - start_step) * run.tokens_per_step / max(train_seconds, 1e-9),
            losses=losses, evals=evals, teacher_eval=run.teacher_on_val.summary, nonfinite=progress.nonfinite,
            activation_bytes=activation_bytes, num_parameters=run.num_parameters, checkpoint=last_checkpoint,
            final_dir=final_dir, data_dir=run.data.data.directory, device=str(env.device),
            model=None if setup.sharded(env, settings.parallel) else run.student)
        say(summary_table(result, mode))
        return result
    finally:
        distributed.shutdown(env)


def _say_nothing(*args, **kwargs) -> None:
    """What `say` is on ranks other than 0: only rank 0 prints."""


@dataclass
class _Progress:
    """Where the run stands after its last step; a checkpoint stores it and a resume restores it."""

    step: int = 0                   # optimizer steps done
    tokens: int = 0                 # tokens trained on (all ranks)
    nonfinite: int = 0              # steps skipped for a non-finite loss or gradient, in all
    nonfinite_streak: int = 0       # the same, in a row up to the last step


@dataclass
class _TeacherOnValidation:
    """The teacher's side of evaluation, which never changes during a run: computed once."""

    batches: dict[int, tuple] = field(default_factory=dict)   # eval batch -> (hidden, argmax, CE sum)
    summary: dict | None = None                               # its val loss and perplexity


@dataclass
class _Run:
    """What the set-up builds and every step uses (no behaviour of its own: the functions below)."""

    config: DistillConfig
    mode: str
    env: distributed.Env
    say: Callable[[str], None]
    out_dir: Path
    data: setup.RunData
    teacher: object | None          # a live teacher (distill/teacher.py) or None
    cache: object | None            # a teacher-logit cache (distill/cache.py) or None
    student: torch.nn.Module
    num_parameters: int
    step_module: StepModule         # student + loss
    sync_target: torch.nn.Module    # step_module under DDP/FSDP (itself on one process)
    model: torch.nn.Module          # sync_target, or its torch.compile
    optimizer: torch.optim.Optimizer
    autocast: Callable              # () -> the context the forward runs under
    runlog: RunLog | None           # rank 0 only
    tokens_per_step: int
    local_batch_size: int           # this rank's share of train.batch_size
    tokenizer_json: str
    teacher_on_val: _TeacherOnValidation = field(default_factory=_TeacherOnValidation)


def _set_up(config: DistillConfig, mode: str, env: distributed.Env,
            say) -> tuple[_Run, _Progress, Path | None]:
    """Everything before the first step, in order: output directory, seeds, data, teacher,
    resume checkpoint, student, recompute policy, DDP/FSDP, torch.compile, optimizer, restored
    state, run log. Returns the run, its progress and the checkpoint it resumes from (or None)."""
    settings = config.train
    if config.threads:
        torch.set_num_threads(config.threads)
    if settings.batch_size % env.world:
        raise ConfigError(f"train.batch_size ({settings.batch_size}) must be a multiple of the number of "
                          f"processes ({env.world})")
    out_dir = Path(config.out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", config.to_toml())
    seed_everything(config.seed)

    data = setup.setup_data(config, env, say)
    teacher, cache = setup.setup_teacher(config, env, data, mode, say)
    resume_path = latest_checkpoint(out_dir) if settings.resume else None
    if settings.resume and resume_path is None:
        say(f"resume: no checkpoint in {out_dir / 'checkpoints'}; starting from scratch")
    resume = load_checkpoint(resume_path) if resume_path is not None else None
    if resume is not None:
        _check_resumable(resume["state"], resume_path, data, env, settings.parallel)
    student = setup.build_student(config, data.data.vocab_size, teacher, resume, say)
    student.to(env.device)
    num_parameters = sum(param.numel() for param in student.parameters())
    say(f"student: {num_parameters:,} parameters ({student.config.num_layers} layers x "
        f"{student.config.hidden_size})")
    setup.apply_recompute(student, settings.recompute)
    step_module = StepModule(student, config.loss)
    sync_target = distributed.wrap(step_module, student.model.layers, env, settings.parallel)
    model = torch.compile(sync_target, backend=settings.compile_backend) if settings.compile else sync_target
    optimizer = setup.build_optimizer(step_module, config, say)

    progress = _Progress()
    if resume is not None:
        setup.load_optimizer(optimizer, step_module, resume["optimizer"], env, settings.parallel)
        set_rng_state(resume["rng"])
        state = resume["state"]
        progress = _Progress(step=state["step"], tokens=state["tokens"], nonfinite=state["nonfinite"],
                             nonfinite_streak=state["nonfinite_streak"])
        say(f"resume: continuing from {resume_path} (step {progress.step}, {progress.tokens:,} tokens)")
    runlog = None
    if env.is_main:
        runlog = RunLog(out_dir, resume_step=progress.step if resume is not None else None, log=say)
    run = _Run(config=config, mode=mode, env=env, say=say, out_dir=out_dir, data=data, teacher=teacher,
               cache=cache, student=student, num_parameters=num_parameters, step_module=step_module,
               sync_target=sync_target, model=model, optimizer=optimizer,
               autocast=autocast_context(settings.precision, env.device), runlog=runlog,
               tokens_per_step=settings.batch_size * settings.grad_accum * config.data.seq_len,
               local_batch_size=settings.batch_size // env.world, tokenizer_json=data.tokenizer.to_str())
    return run, progress, resume_path


def _check_resumable(state: dict, path: Path, data: setup.RunData, env: distributed.Env,
                     parallel: str) -> None:
    """A checkpoint continues exactly only with the same tokenizer, data and parameter layout."""
    layout = "fsdp" if setup.sharded(env, parallel) else "plain"
    for key, ours in (("tokenizer_sha256", data.data.tokenizer_sha256), ("data_id", data.data.data_id),
                      ("parallel_format", layout)):
        if state.get(key) != ours:
            raise ValueError(f"resume: checkpoint {path} was written with a different {key} "
                             f"({state.get(key)!r} vs {ours!r}); cannot continue it exactly")


def _progress_bar(run: _Run, progress: _Progress):
    from tqdm import tqdm

    settings = run.config.train
    shown = run.env.is_main and settings.progress
    return tqdm(total=settings.steps, initial=progress.step, disable=not shown, unit="step",
                dynamic_ncols=True, desc=run.mode)


# ---- batches ------------------------------------------------------------------------------------------

def _this_ranks_share(run: _Run, windows: np.ndarray) -> np.ndarray:
    """This rank's slice of a global batch of window indices."""
    start = run.env.rank * run.local_batch_size
    return windows[start:start + run.local_batch_size]


def _micro_batches(run: _Run, step: int):
    """The grad_accum micro-batches of optimizer step `step` (a function of the step alone)."""
    settings = run.config.train
    for micro in range(settings.grad_accum):
        first = (step * settings.grad_accum + micro) * settings.batch_size
        windows = run.data.sampler.take(first, settings.batch_size)                      # (B,)
        yield run.data.train.batch(_this_ranks_share(run, windows))


def _teacher_inputs(run: _Run, batch) -> dict:
    """The teacher's side of the loss for `batch`: cached top-k or samples, a live teacher's
    hidden states and output layer, or nothing (pretraining)."""
    device = run.env.device
    if run.cache is not None:
        return run.cache.inputs(batch.windows, device)          # top-k or sampled (distill/cache.py)
    if run.teacher is not None:
        hidden = run.teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)   # (N, Ht)
        bias = run.teacher.output_bias
        return {"teacher_hidden": hidden.to(device), "teacher_weight": run.teacher.output_weight.to(device),
                "teacher_bias": bias.to(device) if bias is not None else None}
    return {}


# ---- one optimizer step -------------------------------------------------------------------------------

class _StepOutcome(NamedTuple):
    loss: float                 # the global loss (all ranks, all micro-batches)
    grad_norm: float            # before clipping; nan when the loss was not finite
    lr: float
    stop_requested: bool        # Ctrl-C on any rank


def _train_step(run: _Run, progress: _Progress, stop_requested: bool) -> _StepOutcome:
    """One optimizer step: lr from the schedule, forward and backward of each micro-batch over the
    global token count, the global loss, the non-finite check, clipping, AdamW."""
    from slmfast.models.llama import shift_labels

    env, settings = run.env, run.config.train
    lr = lr_at(progress.step, run.config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = list(_micro_batches(run, progress.step))
    local_targets = sum(batch.num_targets for batch in batches)
    count = torch.tensor([local_targets], dtype=torch.float64, device=env.device)
    num_items = int(distributed.all_reduce_sum(count, env).item())   # the loss normalizer: global tokens
    loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)
    for index, batch in enumerate(batches):
        batch = batch.to(env.device)
        targets = shift_labels(batch.input_ids, batch.cu_seqlens)                         # (N,)
        teacher_inputs = _teacher_inputs(run, batch)
        last = index == len(batches) - 1
        with distributed.grad_sync_context(run.sync_target, env, settings.parallel, sync=last):
            with run.autocast():
                loss = run.model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, targets,
                                 num_items, **teacher_inputs)
            # DDP/FSDP average gradients over ranks; the loss is this rank's share of the global sum.
            (loss * env.world if env.world > 1 else loss).backward()
        loss_sum += loss.detach().float()
    flags = torch.stack([loss_sum, torch.tensor(float(stop_requested), device=env.device)])
    distributed.all_reduce_sum(flags, env)
    global_loss, grad_norm = float(flags[0]), float("nan")
    finite = math.isfinite(global_loss)
    if finite:
        params = [param for param in run.step_module.parameters() if param.grad is not None]
        clip = run.config.optim.grad_clip if run.config.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
        progress.nonfinite_streak = 0
    else:
        progress.nonfinite += 1
        progress.nonfinite_streak += 1
        what = "loss" if not math.isfinite(global_loss) else "gradient"
        run.say(f"step {progress.step + 1}: non-finite {what}; step skipped ({progress.nonfinite_streak} "
                f"in a row, {progress.nonfinite} in all)")
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.tokens += run.tokens_per_step
    return _StepOutcome(global_loss, grad_norm, lr, bool(flags[1].item() > 0))


def _status_after_step(run: _Run, progress: _Progress, stop_asked: bool) -> str:
    """"completed" to go on; else why the run stops now: too many non-finite steps in a row,
    Ctrl-C or should_stop, or train.max_tokens reached."""
    settings = run.config.train
    if progress.nonfinite_streak >= settings.max_nonfinite:
        run.say(f"stopping: {progress.nonfinite_streak} non-finite losses in a row (lower optim.lr, or "
                "check the data); writing a checkpoint of the last good state")
        return "nonfinite"
    if stop_asked:
        return "interrupted"
    if settings.max_tokens and progress.tokens >= settings.max_tokens:
        return "max_tokens"
    return "completed"


# ---- evaluation ---------------------------------------------------------------------------------------

def _evaluate(run: _Run, progress: _Progress) -> dict:
    """Validation loss/perplexity, and against a live teacher KL(t||s) and top-1 agreement, on the
    eval_batches x batch_size validation sequences spread over the split (the same every time)."""
    from slmfast.models.llama import shift_labels

    env, batch_size, teacher = run.env, run.config.train.batch_size, run.teacher
    run.model.eval()
    sums = torch.zeros(len(EVAL_FIELDS), dtype=torch.float64, device=env.device)
    teacher_ce = 0.0
    with torch.no_grad():
        for index in range(run.data.eval_batches):
            windows = run.data.val_windows[index * batch_size:(index + 1) * batch_size]      # (B,)
            batch = run.data.val.batch(_this_ranks_share(run, windows)).to(env.device)
            targets = shift_labels(batch.input_ids, batch.cu_seqlens)                      # (N,)
            teacher_inputs = {}
            if teacher is not None:
                hidden, top1, ce = _teacher_on_val_batch(run, index, batch, targets)
                teacher_ce += ce
                teacher_inputs = {"teacher_hidden": hidden,
                                  "teacher_weight": teacher.output_weight.to(env.device),
                                  "teacher_bias": teacher.output_bias, "teacher_top1": top1}
            with run.autocast():
                sums += run.model(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, targets,
                                  mode="eval", **teacher_inputs)
    sums = torch.cat([sums, torch.tensor([teacher_ce], dtype=torch.float64, device=env.device)])
    distributed.all_reduce_sum(sums, env)
    run.model.train()
    totals = dict(zip(EVAL_FIELDS + ("teacher_ce_sum",), sums.tolist()))
    count = max(totals["count"], 1.0)
    row = {"step": progress.step, "tokens": progress.tokens, "val_loss": totals["ce_sum"] / count,
           "val_ppl": math.exp(min(totals["ce_sum"] / count, 50.0)), "val_tokens": int(totals["count"])}
    if teacher is not None:
        row.update(kl=totals["kl_sum"] / count, top1_agreement=totals["top1_sum"] / count)
        if run.teacher_on_val.summary is None:
            loss = totals["teacher_ce_sum"] / count
            run.teacher_on_val.summary = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
            run.say(f"eval: teacher val loss {loss:.4f} (ppl {run.teacher_on_val.summary['val_ppl']:.2f})")
    if run.runlog is not None:
        metrics = {key: value for key, value in row.items() if key not in ("step", "tokens")}
        run.runlog.write({"step": progress.step, "tokens": progress.tokens, "eval": metrics})
    return row


def _teacher_on_val_batch(run: _Run, index: int, batch, targets: torch.Tensor) -> tuple:
    """(hidden, argmax, CE sum) of the live teacher on validation batch `index`, computed at the
    first evaluation and kept (the teacher's side never changes)."""
    if index not in run.teacher_on_val.batches:
        teacher, device = run.teacher, run.env.device
        hidden = teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen).to(device)   # (N, Ht)
        ce, top1 = teacher_stats(hidden, teacher.output_weight.to(device), teacher.output_bias, targets,
                                 run.data.data.vocab_size)
        run.teacher_on_val.batches[index] = (hidden, top1, ce)
    return run.teacher_on_val.batches[index]


# ---- checkpoints and measurement ----------------------------------------------------------------------

def _save_checkpoint(run: _Run, progress: _Progress) -> Path | None:
    """An atomic checkpoint of the weights, optimizer, RNG and progress (written by rank 0, every
    rank taking part in gathering a sharded state); its path on rank 0, None elsewhere."""
    env, settings = run.env, run.config.train
    model_state, optim_state = setup.gather_state(run.step_module, run.optimizer, env, settings.parallel)
    path = None
    if env.is_main:
        state = {"step": progress.step, "tokens": progress.tokens, "nonfinite": progress.nonfinite,
                 "nonfinite_streak": progress.nonfinite_streak,
                 "samples": progress.step * settings.batch_size * settings.grad_accum,
                 "data_id": run.data.data.data_id, "tokenizer_sha256": run.data.data.tokenizer_sha256,
                 "parallel_format": "fsdp" if setup.sharded(env, settings.parallel) else "plain",
                 "world_size": env.world, "mode": run.mode}
        path = save_checkpoint(run.out_dir, progress.step, model_state=model_state,
                               model_config=run.student.config, optimizer_state=optim_state,
                               trainer_state=state, tokenizer_json=run.tokenizer_json,
                               keep_last=settings.keep_last)
    distributed.barrier(env)
    return path


def _measure_activation_bytes(run: _Run, progress: _Progress) -> int:
    """Bytes the autograd graph of one micro-batch holds for backward (parameters and inputs
    excluded), counted by slmfast.recompute.measure.activation_bytes, which also sees what a
    recompute policy (train.recompute) keeps outside autograd's saved-tensor hooks."""
    from slmfast.models.llama import shift_labels
    from slmfast.recompute.measure import activation_bytes

    batch = next(_micro_batches(run, progress.step)).to(run.env.device)
    inputs = dict(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                  targets=shift_labels(batch.input_ids, batch.cu_seqlens), num_items=batch.num_targets,
                  **_teacher_inputs(run, batch))
    with run.autocast():
        counted = activation_bytes(run.step_module, list(run.student.model.layers), inputs,
                                   loss_fn=lambda loss: loss)
    return counted.total


def summary_table(result: RunResult, mode: str) -> str:
    final = result.final_eval or {}
    rows = [["status", result.status], ["steps", result.steps], ["tokens", f"{result.tokens:,}"],
            ["train time", f"{result.train_seconds:.1f} s"], ["tokens/s", f"{result.tokens_per_s:,.0f}"],
            ["parameters", f"{result.num_parameters:,}"]]
    if result.losses:
        rows.append(["last train loss", f"{result.losses[-1]:.4f}"])
    if final:
        rows += [["val loss", f"{final['val_loss']:.4f}"], ["val perplexity", f"{final['val_ppl']:.2f}"]]
        if "kl" in final:
            rows += [["KL(teacher||student)", f"{final['kl']:.4f}"],
                     ["top-1 agreement", f"{100 * final['top1_agreement']:.1f}%"]]
    if result.teacher_eval:
        rows += [["teacher val loss", f"{result.teacher_eval['val_loss']:.4f}"]]
    if result.activation_bytes is not None:
        rows.append(["activation bytes / micro-batch", human_bytes(result.activation_bytes)])
    rows.append(["non-finite steps skipped", result.nonfinite])
    if result.checkpoint is not None:
        rows.append(["checkpoint", str(result.checkpoint)])
    return f"\n{mode} summary\n" + format_table(["", "value"], rows, align="lr")


class Trainer:
    """A thin object around `train`: Trainer(config).fit() -> RunResult (train validates the config)."""

    def __init__(self, config: DistillConfig, mode: str = "distill"):
        self.config = config
        self.mode = mode

    def fit(self, **kwargs) -> RunResult:
        return train(self.config, self.mode, **kwargs)
