"""DistillConfig: every setting of a distillation (or pretraining) run, as plain dataclasses.

torchtitan-style configuration: one dataclass per section (data, student, teacher, loss, optim,
train) under a top-level DistillConfig. A run is configured by, in order of precedence:
  1. `--key value` / `--section.key value` on the command line (values parsed as TOML literals,
     so `--optim.betas [0.9,0.95]` and `--train.compile true` work; bare words are strings);
  2. a TOML file (`--config run.toml`, read with tomllib);
  3. the defaults below.
Unknown keys are errors that name the key and the nearest valid one (difflib), so a typo never
silently trains with a default. `validate()` checks every value and names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")
INIT_STRATEGIES = ("every_other_layer", "first_n")
RECOMPUTE_POLICIES = ("none", "selective", "full", "offload")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


@dataclass
class DataConfig:
    # "stdlib" (the running interpreter's standard library sources), a .txt/.py file or a
    # directory of text files, a .jsonl file (field `text_field`), or "hf:<dataset name or path>".
    source: str = "stdlib"
    text_field: str = "text"
    hf_split: str = "train"
    glob: str = "*"                 # for directories: which files (besides *.txt/*.py/*.md/...)
    tokenizer: str = ""             # tokenizer.json; "" = the teacher's, else train a BPE on the data
    vocab_size: int = 8192          # for a tokenizer trained here (byte-level BPE)
    seq_len: int = 256
    pack: bool = True               # documents packed in rows with boundaries (cu_seqlens)
    val_fraction: float = 0.02      # documents held out for validation, chosen by a hash of their name
    max_documents: int = 0          # 0 = all
    cache_dir: str = ""             # tokenized data; "" = <out_dir>/data


@dataclass
class StudentConfig:
    config: str = "micro"           # a named slmfast config or a config.json path
    init_from_teacher: str | list[int] = ""  # "" | "every_other_layer" | "first_n" | [layer indices]
    num_layers: int = 0             # for first_n (and as an override of the named config when > 0)
    hidden_size: int = 0            # overrides of the named config when > 0
    intermediate_size: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0


@dataclass
class TeacherConfig:
    path: str = ""                  # slmfast checkpoint directory or a local transformers model path
    dtype: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"            # auto = the student's device
    cache: str = ""                 # offline top-k cache directory (slmfast distill cache-teacher)
    shard: bool = False             # under torchrun, shard the teacher with FSDP2 (when it does not fit)
    allow_unverified_tokenizer: bool = False  # teacher without a tokenizer file: trust the vocab size


@dataclass
class LossConfig:
    kind: str = "forward_kl"        # forward_kl | reverse_kl | jsd | tvd
    beta: float = 0.5               # JSD mixing weight
    temperature: float = 1.0        # soft loss scaled by T^2 (Hinton et al. 2015)
    alpha: float = 0.0              # weight of the hard-label cross-entropy added to the soft loss
    topk: int = 64                  # k of the offline teacher cache (cache_kind topk)
    cache_kind: str = "topk"        # offline cache: topk (top-k log-probs) | sampled (draws from the teacher)
    samples: int = 12               # draws per position of a sampled cache (<= 255)
    sample_seed: int = 0            # seed of a sampled cache's draws (recorded in its manifest)
    tail: str = "bucket"            # top-k loss: "none" | "bucket" (missing mass as one bucket)
    chunk_size: int = 0             # tokens per chunk in the fused losses (0 = the op's default)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0          # 0 = off
    fused: str = "auto"             # auto | true | false (fused AdamW)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16            # sequences per micro-batch, summed over all ranks
    grad_accum: int = 1             # micro-batches per optimizer step
    precision: str = "auto"         # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (inductor, aot_eager, ...)
    recompute: str = "none"         # none | selective | full | offload (slmfast.recompute)
    parallel: str = "ddp"           # ddp | fsdp (under torchrun)
    eval_every: int = 100           # steps (0 = only at the end)
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 0             # steps (0 = only at the end)
    keep_last: int = 3
    max_nonfinite: int = 5          # non-finite losses in a row before the run stops
    progress: bool = True
    resume: bool = False
    save_final: bool = True         # write <out_dir>/final (model + tokenizer) at the end
    max_tokens: int = 0             # stop after this many training tokens (0 = steps decides)


@dataclass
class DistillConfig:
    out_dir: str = "runs/distill"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    threads: int = 0                # torch.set_num_threads (0 = leave as is)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> DistillConfig:
        return cls.from_dict(tomllib_load(path))

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        config = cls()
        for key, value in _flatten(data):
            config.set(key, value)
        return config

    @classmethod
    def from_args(cls, config_path: str | None = None, overrides: list[str] | None = None,
                  base: DistillConfig | None = None) -> DistillConfig:
        """Defaults (or `base`), then the TOML file, then `--key value` overrides."""
        config = base if base is not None else cls()
        if config_path:
            for key, value in _flatten(tomllib_load(config_path)):
                config.set(key, value)
        apply_overrides(config, overrides or [])
        return config

    # ---- access -----------------------------------------------------------------------------
    def set(self, key: str, value) -> None:
        """Set `section.key` (or a top-level `key`) from a TOML/CLI value, type-checked."""
        target, name, hint = _resolve(self, key)
        setattr(target, name, _coerce(key, value, hint))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML (what a run writes to <out_dir>/config.toml)."""
        top, sections = [], []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                items = dataclasses.asdict(value).items()
                lines = [f"[{f.name}]"] + [f"{k} = {_toml_value(v)}" for k, v in items]
                sections.append("\n".join(lines))
            else:
                top.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"

    # ---- checks -------------------------------------------------------------------------------
    def validate(self, mode: str = "distill") -> DistillConfig:
        """Check every value; `mode` is "distill", "pretrain" or "cache" (what needs a teacher)."""
        d, s, t, lo, o, tr = self.data, self.student, self.teacher, self.loss, self.optim, self.train

        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(f"{key}: {msg} (got {_get(self, key)!r})")

        need(bool(self.out_dir), "out_dir", "must name a directory")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "must be auto, cpu, cuda or cuda:N")
        need(self.threads >= 0, "threads", "must be >= 0")
        need(bool(d.source), "data.source", "must be 'stdlib', a file, a directory or 'hf:<name>'")
        need(d.vocab_size >= 300, "data.vocab_size", "must be >= 300 (256 bytes + merges + specials)")
        need(d.seq_len >= 2, "data.seq_len", "must be >= 2")
        need(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
        need(d.max_documents >= 0, "data.max_documents", "must be >= 0")
        need(bool(s.config), "student.config", "must be a named config or a config.json path")
        for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
            need(getattr(s, k) >= 0, f"student.{k}", "must be >= 0 (0 = from the config)")
        init = s.init_from_teacher
        if isinstance(init, list):
            need(len(init) > 0 and all(isinstance(i, int) and i >= 0 for i in init),
                 "student.init_from_teacher",
                 "a list of layer indices must be non-empty and hold non-negative integers")
            need(len(set(init)) == len(init), "student.init_from_teacher", "layer indices must be distinct")
        else:
            need(init in ("",) + INIT_STRATEGIES, "student.init_from_teacher",
                 f"must be '', {', '.join(INIT_STRATEGIES)} or a list of layer indices")
            if init == "first_n":
                need(s.num_layers > 0, "student.num_layers", "first_n needs student.num_layers > 0")
        need(t.dtype in ("auto", "fp32", "bf16", "fp16"), "teacher.dtype", "must be auto, fp32, bf16 or fp16")
        need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "teacher.device",
             "must be auto, cpu, cuda or cuda:N")
        need(lo.kind in LOSS_KINDS, "loss.kind", f"must be one of {', '.join(LOSS_KINDS)}")
        need(0.0 <= lo.beta <= 1.0, "loss.beta", "must be in [0, 1]")
        need(lo.temperature > 0, "loss.temperature", "must be > 0")
        need(lo.alpha >= 0, "loss.alpha", "must be >= 0")
        need(lo.topk >= 1, "loss.topk", "must be >= 1")
        need(lo.tail in ("none", "bucket"), "loss.tail", "must be none or bucket")
        need(lo.cache_kind in ("topk", "sampled"), "loss.cache_kind", "must be topk or sampled")
        need(1 <= lo.samples <= 255, "loss.samples", "must be in [1, 255] (counts are stored as uint8)")
        need(lo.sample_seed >= 0, "loss.sample_seed", "must be >= 0")
        if lo.cache_kind == "sampled":
            need(lo.kind == "forward_kl", "loss.kind", "a sampled cache estimates forward KL only "
                 "(draws from the teacher); use loss.kind forward_kl")
        need(lo.chunk_size >= 0, "loss.chunk_size", "must be >= 0")
        need(o.lr > 0, "optim.lr", "must be > 0")
        need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas",
             "must be two numbers in [0, 1)")
        need(o.eps > 0, "optim.eps", "must be > 0")
        need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        need(o.fused in ("auto", "true", "false"), "optim.fused", "must be auto, true or false")
        need(tr.steps >= 1, "train.steps", "must be >= 1")
        need(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
        need(tr.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        need(tr.precision in ("auto", "fp32", "bf16"), "train.precision", "must be auto, fp32 or bf16")
        need(tr.recompute in RECOMPUTE_POLICIES, "train.recompute",
             f"must be one of {', '.join(RECOMPUTE_POLICIES)}")
        need(tr.parallel in ("ddp", "fsdp"), "train.parallel", "must be ddp or fsdp")
        for k in ("eval_every", "ckpt_every", "max_tokens"):
            need(getattr(tr, k) >= 0, f"train.{k}", "must be >= 0")
        need(tr.eval_batches >= 1, "train.eval_batches", "must be >= 1")
        need(tr.log_every >= 1, "train.log_every", "must be >= 1")
        need(tr.keep_last >= 1, "train.keep_last", "must be >= 1")
        need(tr.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")

        if mode == "pretrain":
            need(not t.path and not t.cache, "teacher.path",
                 "pretrain trains without a teacher; leave it empty")
            need(init == "", "student.init_from_teacher", "pretrain has no teacher to initialize from")
        elif mode in ("distill", "cache"):
            if mode == "cache" or not t.cache:
                need(bool(t.path), "teacher.path", "distillation needs a teacher (a slmfast checkpoint "
                     "directory or a local transformers model path), or teacher.cache")
            if init != "":
                need(bool(t.path), "teacher.path", "student.init_from_teacher needs the teacher's weights")
        else:
            raise ConfigError(f"validate: unknown mode {mode!r}")
        return self


# ---- helpers ------------------------------------------------------------------------------------

def tomllib_load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, full + ".")
        else:
            yield full, value


def valid_keys(config=None) -> list[str]:
    config = config if config is not None else DistillConfig()
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            keys.append(f.name)
    return keys


def _unknown(key: str, config) -> ConfigError:
    keys = valid_keys(config)
    # Match on the full dotted key, and on the last part alone (`--steps` -> train.steps).
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf[0]]] if leaf else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _resolve(config, key: str):
    parts = key.split(".")
    if len(parts) > 2 or not all(parts):
        raise _unknown(key, config)
    names = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    if len(parts) == 1:
        if parts[0] not in names or dataclasses.is_dataclass(getattr(config, parts[0])):
            raise _unknown(key, config)
        return config, parts[0], hints[parts[0]]
    section, name = parts
    if section not in names or not dataclasses.is_dataclass(getattr(config, section)):
        raise _unknown(key, config)
    target = getattr(config, section)
    if name not in {f.name for f in dataclasses.fields(target)}:
        raise _unknown(key, config)
    return target, name, typing.get_type_hints(type(target))[name]


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(key: str, value, hint):
    """Check/convert a TOML or CLI value to the field's type; the error names the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list like [1, 2], got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        # str | list[int]: a list if a list was given, else a string.
        if isinstance(value, list):
            return _coerce(key, value, next(a for a in args if typing.get_origin(a) is list))
        return _coerce(key, value, str)
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover (a bug here)


def parse_cli_value(text: str):
    """A command-line value as a TOML literal (numbers, booleans, lists, quoted strings), else
    the raw text (so `--student.config micro` needs no quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config, args: list[str]) -> None:
    """Apply `--key value`, `--key=value` and bare `--flag` (true for booleans) in order."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides are --key value or "
                              "--section.key value")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        else:
            key = body
            target, name, hint = _resolve(config, key.replace("-", "_"))
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                if hint is bool:
                    setattr(target, name, True)
                    i += 1
                    continue
                raise ConfigError(f"--{key} needs a value")
            text = args[i + 1]
            i += 2
        config.set(key.replace("-", "_"), parse_cli_value(text))


def _get(config, key: str):
    obj = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
