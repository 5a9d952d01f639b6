"""Distillation and pretraining: config, data, teacher, student init, teacher cache, the loop.

    from slmfast.distill import DistillConfig, Trainer
    config = DistillConfig.from_args("run.toml", ["--train.steps", "200"])
    result = Trainer(config).fit()          # or train(config, "pretrain") for no teacher

The loop is slmfast.distill.trainer.train, a plain function; `slmfast distill` / `slmfast
pretrain` / `slmfast demo` on the command line (slmfast/cli.py) call it.
"""

from slmfast.distill.config import ConfigError, DistillConfig
from slmfast.distill.trainer import RunResult, Trainer, train

__all__ = ["ConfigError", "DistillConfig", "RunResult", "Trainer", "train"]
