"""Finding a model's repeated blocks: the unit every recompute policy applies to.

Without `layers=`, the blocks are the longest nn.ModuleList whose children all have one class
(slmfast's model.model.layers, Hugging Face decoder layers, a user's list of blocks). `layers=`
names them when that guess is wrong or impossible: a dotted attribute path ("model.layers"), a
ModuleList, or a list of modules.
"""

from __future__ import annotations

from torch import nn


def find_blocks(model: nn.Module, layers=None) -> list[nn.Module]:
    if layers is not None:
        if isinstance(layers, str):
            target = model
            for part in layers.split("."):
                if not hasattr(target, part):
                    raise ValueError(f"layers={layers!r}: {type(target).__name__} has no attribute {part!r}")
                target = getattr(target, part)
            layers = target
        blocks = list(layers)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise ValueError("layers= must name a non-empty list of modules")
        return blocks
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                best = list(module)
    if not best:
        raise ValueError(f"could not find the repeated blocks of {type(model).__name__} (no nn.ModuleList "
                         "of same-class modules); pass layers= (e.g. layers='model.layers')")
    return best
