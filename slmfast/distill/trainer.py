"""The training loop for distillation and pretraining: one plain function, `train(config)`.

In the gpt-fast / torchtitan spirit, everything is explicit and in order:
  set-up   process group -> seeds -> data (tokenized once) -> teacher (frozen) or teacher cache ->
           student (config, teacher layers, or checkpoint) -> recompute policy -> DDP/FSDP ->
           torch.compile -> AdamW -> resume state                       (slmfast/distill/setup.py)
  step     lr from the schedule -> the step's micro-batches -> their predicting-token count,
           all-reduced (the loss normalizer) -> per micro-batch: teacher hidden states (or
           cached top-k), forward + loss under autocast, backward (gradient sync on the last
           only) -> global loss all-reduced -> non-finite check -> clip -> AdamW step
  around   evaluation every eval_every steps, JSONL/TensorBoard logs and a tqdm bar on rank 0,
           atomic checkpoints every ckpt_every steps and at the end, on Ctrl-C (SIGINT), and
           after max_nonfinite non-finite losses in a row.
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

import numpy as np
import torch

from slmfast.distill import distributed as D
from slmfast.distill import setup as S
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
    o, total = config.optim, config.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * cosine)


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
        self.set = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:      # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(config: DistillConfig, mode: str = "distill", *, should_stop: Callable[[int], bool] | None = None,
          log: Callable[[str], None] | None = None, measure_activations: bool = False) -> RunResult:
    """Run `config` ("distill" with a teacher or cache, "pretrain" without). `should_stop(step)`
    is polled after every step (as Ctrl-C is): True checkpoints and returns. With
    `measure_activations`, the bytes saved for backward by one micro-batch are reported."""
    config.validate(mode)
    env = D.init(config.device)
    try:
        run = _Run(config, mode, env, log if log is not None else print)
        return run.loop(should_stop, measure_activations)
    finally:
        D.shutdown(env)


class _Run:
    """One run's set-up and state; `loop` is the loop."""

    def __init__(self, config: DistillConfig, mode: str, env: D.Env, log):
        self.config, self.mode, self.env = config, mode, env
        self.say = log if env.is_main else (lambda *a, **k: None)
        tr = self.tr = config.train
        if config.threads:
            torch.set_num_threads(config.threads)
        if tr.batch_size % env.world:
            raise ConfigError(f"train.batch_size ({tr.batch_size}) must be a multiple of the number of "
                              f"processes ({env.world})")
        self.out = Path(config.out_dir)
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.toml", config.to_toml())
        seed_everything(config.seed)

        self.d = S.setup_data(config, env, self.say)
        self.teacher, self.cache = S.setup_teacher(config, env, self.d, mode, self.say)
        self.resume_path = latest_checkpoint(self.out) if tr.resume else None
        if tr.resume and self.resume_path is None:
            self.say(f"resume: no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
        resume = load_checkpoint(self.resume_path) if self.resume_path is not None else None
        if resume is not None:
            self._check_resumable(resume["state"])
        self.student = S.build_student(config, self.d.data.vocab_size, self.teacher, resume, self.say)
        self.student.to(env.device)
        self.num_params = sum(p.numel() for p in self.student.parameters())
        self.say(f"student: {self.num_params:,} parameters ({self.student.config.num_layers} layers x "
                 f"{self.student.config.hidden_size})")
        S.apply_recompute(self.student, tr.recompute)
        self.step_module = StepModule(self.student, config.loss)
        self.sync_target = D.wrap(self.step_module, self.student.model.layers, env, tr.parallel)
        self.wrapped = self.sync_target
        if tr.compile:
            self.wrapped = torch.compile(self.sync_target, backend=tr.compile_backend)
        self.optimizer = S.build_optimizer(self.step_module, config, self.say)

        self.step, self.tokens, self.nonfinite, self.streak = 0, 0, 0, 0
        if resume is not None:
            S.load_optimizer(self.optimizer, self.step_module, resume["optimizer"], env, tr.parallel)
            set_rng_state(resume["rng"])
            st = resume["state"]
            self.step, self.tokens = st["step"], st["tokens"]
            self.nonfinite, self.streak = st["nonfinite"], st["nonfinite_streak"]
            self.say(f"resume: continuing from {self.resume_path} (step {self.step}, {self.tokens:,} tokens)")
        self.start_step = self.step
        self.autocast = autocast_context(tr.precision, env.device)
        self.runlog = None
        if env.is_main:
            resume_step = self.step if resume is not None else None
            self.runlog = RunLog(self.out, resume_step=resume_step, log=self.say)
        self.tokens_per_step = tr.batch_size * tr.grad_accum * config.data.seq_len
        self.local_b = tr.batch_size // env.world
        self.tok_json = self.d.tokenizer.to_str()
        self.teacher_eval: dict | None = None
        self._val_teacher: dict[int, tuple] = {}       # per eval batch: hidden, argmax, CE sum

    def _check_resumable(self, st: dict) -> None:
        data = self.d.data
        for key, ours in (("tokenizer_sha256", data.tokenizer_sha256), ("data_id", data.data_id),
                          ("parallel_format", "fsdp" if S.sharded(self.env, self.tr.parallel) else "plain")):
            if st.get(key) != ours:
                raise ValueError(f"resume: checkpoint {self.resume_path} was written with a different {key} "
                                 f"({st.get(key)!r} vs {ours!r}); cannot continue it exactly")

    # ---- batches --------------------------------------------------------------------------------------
    def _rank_slice(self, ids: np.ndarray) -> np.ndarray:
        return ids[self.env.rank * self.local_b:(self.env.rank + 1) * self.local_b]

    def micro_batches(self, step: int):
        tr = self.tr
        for m in range(tr.grad_accum):
            ids = self.d.sampler.take((step * tr.grad_accum + m) * tr.batch_size, tr.batch_size)   # (B,)
            yield self.d.train.batch(self._rank_slice(ids))

    def teacher_inputs(self, batch) -> dict:
        device = self.env.device
        if self.cache is not None:
            return self.cache.inputs(batch.windows, device)          # top-k or sampled (distill/cache.py)
        if self.teacher is not None:
            th = self.teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)   # (N, Ht)
            tb = self.teacher.output_bias
            return {"teacher_hidden": th.to(device), "teacher_weight": self.teacher.output_weight.to(device),
                    "teacher_bias": tb.to(device) if tb is not None else None}
        return {}

    # ---- evaluation -----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation loss/perplexity, and against a live teacher KL(t||s) and top-1 agreement, on the
        eval_batches x batch_size validation sequences spread over the split (the same every time)."""
        from slmfast.models.llama import shift_labels

        env, tr, teacher = self.env, self.tr, self.teacher
        self.wrapped.eval()
        sums = torch.zeros(len(EVAL_FIELDS), dtype=torch.float64, device=env.device)
        teacher_ce = 0.0
        with torch.no_grad():
            for i in range(self.d.eval_batches):
                ids = self.d.val_windows[i * tr.batch_size:(i + 1) * tr.batch_size]             # (B,)
                batch = self.d.val.batch(self._rank_slice(ids)).to(env.device)
                targets = shift_labels(batch.input_ids, batch.cu_seqlens)                      # (N,)
                kw = {}
                if teacher is not None:
                    if i not in self._val_teacher:        # the teacher's side never changes: once
                        th = teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)   # (N, Ht)
                        th = th.to(env.device)
                        ce, top1 = teacher_stats(th, teacher.output_weight.to(env.device),
                                                 teacher.output_bias, targets, self.d.data.vocab_size)
                        self._val_teacher[i] = (th, top1, ce)
                    th, top1, ce = self._val_teacher[i]
                    teacher_ce += ce
                    kw = {"teacher_hidden": th, "teacher_weight": teacher.output_weight.to(env.device),
                          "teacher_bias": teacher.output_bias, "teacher_top1": top1}
                with self.autocast():
                    sums += self.wrapped(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, targets,
                                         mode="eval", **kw)
        sums = torch.cat([sums, torch.tensor([teacher_ce], dtype=torch.float64, device=env.device)])
        D.all_reduce_sum(sums, env)
        self.wrapped.train()
        s = dict(zip(EVAL_FIELDS + ("teacher_ce_sum",), sums.tolist()))
        n = max(s["count"], 1.0)
        row = {"step": self.step, "tokens": self.tokens, "val_loss": s["ce_sum"] / n,
               "val_ppl": math.exp(min(s["ce_sum"] / n, 50.0)), "val_tokens": int(s["count"])}
        if teacher is not None:
            row.update(kl=s["kl_sum"] / n, top1_agreement=s["top1_sum"] / n)
            if self.teacher_eval is None:
                loss = s["teacher_ce_sum"] / n
                self.teacher_eval = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
                self.say(f"eval: teacher val loss {loss:.4f} (ppl {self.teacher_eval['val_ppl']:.2f})")
        if self.runlog is not None:
            self.runlog.write({"step": self.step, "tokens": self.tokens,
                               "eval": {k: v for k, v in row.items() if k not in ("step", "tokens")}})
        return row

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        env, tr = self.env, self.tr
        model_state, optim_state = S.gather_state(self.step_module, self.optimizer, env, tr.parallel)
        path = None
        if env.is_main:
            state = {"step": self.step, "tokens": self.tokens, "nonfinite": self.nonfinite,
                     "nonfinite_streak": self.streak, "samples": self.step * tr.batch_size * tr.grad_accum,
                     "data_id": self.d.data.data_id, "tokenizer_sha256": self.d.data.tokenizer_sha256,
                     "parallel_format": "fsdp" if S.sharded(env, tr.parallel) else "plain",
                     "world_size": env.world, "mode": self.mode}
            path = save_checkpoint(self.out, self.step, model_state=model_state,
                                   model_config=self.student.config, optimizer_state=optim_state,
                                   trainer_state=state, tokenizer_json=self.tok_json, keep_last=tr.keep_last)
        D.barrier(env)
        return path

    # ---- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, stop_requested: bool) -> tuple[float, float, float, bool]:
        """(global loss, grad norm, lr, stop requested on any rank) of one optimizer step."""
        from slmfast.models.llama import shift_labels

        env, tr = self.env, self.tr
        lr = lr_at(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = list(self.micro_batches(self.step))
        count = torch.tensor([sum(b.num_targets for b in batches)], dtype=torch.float64, device=env.device)
        num_items = int(D.all_reduce_sum(count, env).item())         # the loss normalizer: global tokens
        loss_sum = torch.zeros((), dtype=torch.float32, device=env.device)
        for m, batch in enumerate(batches):
            batch = batch.to(env.device)
            targets = shift_labels(batch.input_ids, batch.cu_seqlens)                           # (N,)
            kw = self.teacher_inputs(batch)
            with D.grad_sync_context(self.sync_target, env, tr.parallel, sync=(m == len(batches) - 1)):
                with self.autocast():
                    loss = self.wrapped(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, targets,
                                        num_items, **kw)
                # DDP/FSDP average gradients over ranks; the loss is this rank's share of the global sum.
                (loss * env.world if env.world > 1 else loss).backward()
            loss_sum += loss.detach().float()
        flags = torch.stack([loss_sum, torch.tensor(float(stop_requested), device=env.device)])
        D.all_reduce_sum(flags, env)
        global_loss, grad_norm = float(flags[0]), float("nan")
        finite = math.isfinite(global_loss)
        if finite:
            params = [p for p in self.step_module.parameters() if p.grad is not None]
            clip = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.streak = 0
        else:
            self.nonfinite += 1
            self.streak += 1
            what = "loss" if not math.isfinite(global_loss) else "gradient"
            self.say(f"step {self.step + 1}: non-finite {what}; step skipped ({self.streak} in a row, "
                     f"{self.nonfinite} in all)")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        return global_loss, grad_norm, lr, bool(flags[1].item() > 0)

    # ---- the loop ---------------------------------------------------------------------------------------
    def loop(self, should_stop, measure_activations: bool) -> RunResult:
        from tqdm import tqdm

        env, tr = self.env, self.tr
        act_bytes = self.measure_activation_bytes() if measure_activations else None
        losses, evals = [], []
        if self.resume_path is not None and env.is_main:
            evals = [dict(r["eval"], step=r["step"], tokens=r["tokens"])
                     for r in read_log(self.out) if "eval" in r]
        status, last_ckpt = "completed", self.resume_path
        train_time, window_tokens, window_time = 0.0, 0, 0.0
        bar = tqdm(total=tr.steps, initial=self.step, disable=not (env.is_main and tr.progress), unit="step",
                   dynamic_ncols=True, desc=self.mode)
        if tr.eval_every and self.step == 0:          # the starting point of the validation curve
            evals.append(self.evaluate())
        self.wrapped.train()
        with _StopFlag() as stop:
            while self.step < tr.steps:
                t0 = time.perf_counter()
                loss, grad_norm, lr, stop_now = self.train_step(stop.set)
                losses.append(loss)
                dt = time.perf_counter() - t0
                train_time += dt
                window_time += dt
                window_tokens += self.tokens_per_step
                bar.update(1)
                step = self.step
                if self.runlog is not None and (step % tr.log_every == 0 or step == tr.steps):
                    tps = window_tokens / max(window_time, 1e-9)
                    self.runlog.write({"step": step, "tokens": self.tokens, "loss": loss, "lr": lr,
                                       "grad_norm": grad_norm, "tokens_per_s": tps, "elapsed_s": train_time})
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=human(tps), refresh=False)
                    window_tokens, window_time = 0, 0.0
                if tr.eval_every and step % tr.eval_every == 0 and step < tr.steps:
                    evals.append(self.evaluate())
                stop_now = stop_now or (should_stop is not None and should_stop(step))
                if self.streak >= tr.max_nonfinite:
                    status = "nonfinite"
                    self.say(f"stopping: {self.streak} non-finite losses in a row (lower optim.lr, or check "
                             "the data); writing a checkpoint of the last good state")
                elif stop_now:
                    status = "interrupted"
                elif tr.max_tokens and self.tokens >= tr.max_tokens:
                    status = "max_tokens"
                if status != "completed" or (tr.ckpt_every and step % tr.ckpt_every == 0 and step < tr.steps):
                    last_ckpt = self.checkpoint()
                    if status == "interrupted":
                        self.say(f"interrupted at step {step}: checkpoint {last_ckpt}; continue with "
                                 "--train.resume true")
                if status != "completed":
                    break
        bar.close()

        final_dir = None
        if status in ("completed", "max_tokens"):
            evals.append(self.evaluate())
            last_ckpt = self.checkpoint()
            if tr.save_final:
                final_dir = S.save_final(self.step_module, self.student, self.optimizer, env, tr.parallel,
                                         self.out / "final", self.tok_json)
        if self.runlog is not None:
            self.runlog.close()
        result = RunResult(
            out_dir=self.out, status=status, steps=self.step, tokens=self.tokens, train_seconds=train_time,
            tokens_per_s=(self.step - self.start_step) * self.tokens_per_step / max(train_time, 1e-9),
            losses=losses, evals=evals, teacher_eval=self.teacher_eval, nonfinite=self.nonfinite,
            activation_bytes=act_bytes, num_parameters=self.num_params, checkpoint=last_ckpt,
            final_dir=final_dir, data_dir=self.d.data.directory, device=str(env.device),
            model=None if S.sharded(env, tr.parallel) else self.student)
        self.say(summary_table(result, self.mode))
        return result

    def measure_activation_bytes(self) -> int:
        """Bytes the autograd graph of one micro-batch holds for backward (parameters and inputs
        excluded), counted by slmfast.recompute.measure.activation_bytes, which also sees what a
        recompute policy (train.recompute) keeps outside autograd's saved-tensor hooks."""
        from slmfast.models.llama import shift_labels
        from slmfast.recompute.measure import activation_bytes

        batch = next(self.micro_batches(self.step)).to(self.env.device)
        inputs = dict(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                      targets=shift_labels(batch.input_ids, batch.cu_seqlens), num_items=batch.num_targets,
                      **self.teacher_inputs(batch))
        with self.autocast():
            counted = activation_bytes(self.step_module, list(self.student.model.layers), inputs,
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
