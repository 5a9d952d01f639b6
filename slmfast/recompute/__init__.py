"""Selective recomputation for whole models: policies, a memory-budget planner and a report.

    import slmfast.recompute as rc
    rc.apply(model, "selective")                       # or "none" | "full" | "offload"
    rc.apply(model, rc.MemoryBudget(0.5), batch=batch) # the planner: half the step's peak of "none"
    print(rc.report(model, batch).table())
    rc.remove(model)

Policies are applied from outside to the model's repeated blocks (found automatically or named
with `layers=`); the model's class and state_dict are untouched. See policies.py for what each
policy keeps, planner.py for the budget algorithm and measure.py for how bytes are counted.
"""

from __future__ import annotations

import logging

from torch import nn

from slmfast.recompute.blocks import find_blocks
from slmfast.recompute.measure import ActivationBytes, StepMemory, step_memory, step_times
from slmfast.recompute.planner import PLANNED_POLICIES, BlockMemory, MemoryBudget, ModelMemory, Plan, solve
from slmfast.recompute.policies import (
    POLICIES,
    block_policy,
    clear_block_policy,
    disable_kv_cache,
    restore_kv_cache,
    set_block_policy,
)
from slmfast.recompute.report import Report, report

__all__ = ["POLICIES", "ActivationBytes", "MemoryBudget", "Plan", "Report", "StepMemory", "apply",
           "find_blocks", "plan", "plans", "policies_of", "remove", "report", "step_memory"]

logger = logging.getLogger("slmfast.recompute")


def policies_of(model: nn.Module, layers=None) -> list[str]:
    return [block_policy(b) for b in find_blocks(model, layers)]


def plan(model: nn.Module, budget: MemoryBudget, batch, *, layers=None, loss_fn=None) -> Plan:
    """Measure the model on `batch` under each policy and solve for `budget` (planner.py)."""
    found = plans(model, [budget], batch, layers=layers, loss_fn=loss_fn)[0]
    if isinstance(found, ValueError):
        raise found
    return found


def plans(model: nn.Module, budgets: list[MemoryBudget], batch, *, layers=None,
          loss_fn=None) -> list[Plan | ValueError]:
    """One measurement, one plan per budget (or the ValueError of an infeasible budget)."""
    blocks = find_blocks(model, layers)
    previous = [block_policy(b) for b in blocks]
    was_training = model.training
    model.train()
    measured_memory: dict[str, StepMemory] = {}
    measured_steps = {}
    try:
        disable_kv_cache(model)
        for policy in PLANNED_POLICIES:
            for block in blocks:
                set_block_policy(block, policy)
            measured_memory[policy] = step_memory(model, blocks, batch, loss_fn)
            measured_steps[policy] = step_times(model, blocks, batch, loss_fn)
    finally:
        for block, policy in zip(blocks, previous):
            set_block_policy(block, policy) if policy != "none" else clear_block_policy(block)
        model.train(was_training)
    forward = measured_steps["none"].forward_per_block
    total_forward = sum(forward) or 1.0
    # Selective recomputes a subset of what full recomputes: keep the measured overheads in that
    # order (timing noise can invert them), and break ties towards recomputing less.
    overhead = {p: max(0.0, measured_steps[p].step - measured_steps["none"].step) for p in PLANNED_POLICIES}
    overhead["none"] = 0.0
    overhead["full"] = max(overhead["full"], overhead["selective"])
    costs = [{p: seconds * overhead[p] / total_forward + 1e-9 * rank
              for rank, p in enumerate(PLANNED_POLICIES)} for seconds in forward]
    memory = model_memory(measured_memory)
    none = measured_memory["none"]   # what the fraction of a budget is taken of: measured, not predicted
    results: list[Plan | ValueError] = []
    for budget in budgets:
        none_bytes = none.peak if budget.measure == "peak" else sum(none.saved) + none.saved_outside
        budget_bytes = budget.bytes(none_bytes)
        try:
            policies, cost = solve(memory, costs, budget_bytes, budget.measure)
        except ValueError as error:
            results.append(error)
            continue
        predicted, phase = memory.predict(policies, budget.measure)
        results.append(Plan(policies, budget.measure, predicted, phase, cost, budget_bytes, none_bytes,
                            memory.bound(["full"] * len(blocks), budget.measure)))
    return results


def model_memory(measured: dict[str, StepMemory]) -> ModelMemory:
    """The planner's figures from one tracked step per uniform policy. What lies outside the blocks
    should not depend on the blocks' policies; the largest of the measurements is taken."""
    num_blocks = len(next(iter(measured.values())).saved)
    blocks = [{p: BlockMemory(m.saved[b], m.forward_rest[b], m.backward_rest[b]) for p, m in measured.items()}
              for b in range(num_blocks)]
    return ModelMemory(blocks, head=max(m.head for m in measured.values()),
                       embed=max(m.embed for m in measured.values()),
                       saved_outside=max(m.saved_outside for m in measured.values()))


def apply(model: nn.Module, policy, *, layers=None, batch=None, loss_fn=None) -> nn.Module:
    """Apply a recompute policy to every block: a name in POLICIES, a list of names (one per
    block), or a MemoryBudget (then `batch` is required: the planner measures on it)."""
    blocks = find_blocks(model, layers)
    if isinstance(policy, MemoryBudget):
        if batch is None:
            raise ValueError("recompute.apply with a MemoryBudget needs batch= "
                             "(one real batch to measure on)")
        chosen = plan(model, policy, batch, layers=layers, loss_fn=loss_fn)
        logger.info(chosen.summary())
        model._slmfast_recompute_plan = chosen
        policies = chosen.policies
    elif isinstance(policy, str):
        policies = [policy] * len(blocks)
    else:
        policies = list(policy)
        if len(policies) != len(blocks):
            raise ValueError(f"recompute.apply: {len(policies)} policies given for {len(blocks)} blocks")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"recompute policy must be one of {', '.join(POLICIES)} or a MemoryBudget, "
                             f"got {p!r}")
    for block, p in zip(blocks, policies):
        if p == "none":
            clear_block_policy(block)
        else:
            set_block_policy(block, p)
    if any(p != "none" for p in policies):
        disable_kv_cache(model)
    else:
        restore_kv_cache(model)
    return model


def remove(model: nn.Module, *, layers=None) -> nn.Module:
    """Undo apply(): every block gets its own forward back."""
    for block in find_blocks(model, layers):
        clear_block_policy(block)
    restore_kv_cache(model)
    if hasattr(model, "_slmfast_recompute_plan"):
        del model._slmfast_recompute_plan
    return model
