"""Run by torchrun in tests/distill/test_distributed.py: train each TOML config given on the command
line (argv[2:]) in turn, in one process group, and on rank 0 write their losses and evaluations as
JSON to argv[1]. A config given as `path@N` is interrupted after step N (as by Ctrl-C), then
resumed from its checkpoint; its losses are those of both parts."""

import json
import os
import sys

import torch.distributed as dist

from slmfast.distill import DistillConfig, train

dist.init_process_group(backend="gloo")
results = []
for arg in sys.argv[2:]:
    path, _, stop_at = arg.partition("@")
    config = DistillConfig.from_toml(path)
    mode = "distill" if config.teacher.path else "pretrain"
    quiet = dict(log=lambda *a: None)
    if stop_at:
        first = train(config, mode, should_stop=lambda step, n=int(stop_at): step == n, **quiet)
        assert first.status == "interrupted", first.status
        config.train.resume = True
        result = train(config, mode, **quiet)
        result.losses = first.losses + result.losses
    else:
        result = train(config, mode, **quiet)
    results.append({"losses": result.losses, "evals": result.evals, "status": result.status,
                    "checkpoint": str(result.checkpoint)})
if int(os.environ["RANK"]) == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
