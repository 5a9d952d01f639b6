"""The memory-budget planner: a per-block recompute policy that fits a budget at least cost.

Measurement (one real batch, slmfast/recompute/measure.py): for each policy P in
{none, selective, full}, applied to every block, the activation bytes each block keeps
(bytes[b][P]) and the bytes kept outside the blocks; the per-block forward times under "none"
(t[b]); and the step time under each uniform policy. Recomputing block b under P costs
    cost[b][P] = t[b] * (step(P) - step(none)) / sum(t)
i.e. the measured whole-model overhead of P, shared out in proportion to block forward time,
kept in the order none <= selective <= full (selective recomputes a subset of full) with a
1 ns tie-break per step of that order, so equal costs resolve to recomputing less.

Choice (a multiple-choice knapsack): minimize sum_b cost[b][p_b] subject to
sum_b bytes[b][p_b] + outside <= budget. Dynamic programming over the budget in U = 4096 units
of u = budget / U bytes, each block's bytes rounded UP to whole units (so a plan that fits in
units fits in bytes): best[j] = least cost of the blocks so far using at most j units; each
block tries its three policies. O(blocks x 3 x U), exact up to the rounding, which can only
make the plan more conservative by at most blocks x u bytes. A budget below
outside + sum_b bytes[b][full] has no solution: the error names that smallest feasible budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PLANNED_POLICIES = ("none", "selective", "full")
UNITS = 4096


@dataclass(frozen=True)
class MemoryBudget:
    """Activation bytes allowed: an absolute number of bytes (> 1) or a fraction (0 < f <= 1) of
    what the model keeps with no recomputation."""

    value: float

    def __post_init__(self):
        if not (self.value > 0):
            raise ValueError("MemoryBudget must be positive (bytes, or a fraction in (0, 1]), "
                             f"got {self.value}")

    def bytes(self, none_total: int) -> int:
        return int(self.value * none_total) if self.value <= 1 else int(self.value)


@dataclass
class Plan:
    policies: list[str]          # one per block
    predicted_bytes: int         # activation bytes the plan keeps (blocks + outside)
    predicted_cost: float        # extra seconds per step the recomputation costs
    budget: int
    none_bytes: int
    full_bytes: int

    def summary(self) -> str:
        counts = {p: self.policies.count(p) for p in PLANNED_POLICIES if p in self.policies}
        return (f"recompute plan: {', '.join(f'{n} x {p}' for p, n in counts.items())}; activations "
                f"{self.predicted_bytes / 2**20:.1f} MiB of a {self.budget / 2**20:.1f} MiB budget "
                f"(none: {self.none_bytes / 2**20:.1f} MiB, full: {self.full_bytes / 2**20:.1f} MiB), "
                f"+{self.predicted_cost * 1e3:.1f} ms per step")


def solve(bytes_per_block: list[dict[str, int]], cost_per_block: list[dict[str, float]], outside: int,
          budget: int) -> tuple[list[str], int, float]:
    """The knapsack of the module docstring: (policies, bytes, cost) or ValueError if infeasible."""
    smallest = outside + sum(b["full"] for b in bytes_per_block)
    if budget < smallest:
        raise ValueError(f"MemoryBudget of {budget} bytes is below what full recomputation needs; "
                         f"the smallest feasible budget is {smallest} bytes ({smallest / 2**20:.2f} MiB)")
    room = budget - outside
    unit = max(1.0, room / UNITS)
    capacity = int(room // unit)
    inf = math.inf
    best = [0.0] * (capacity + 1)           # least cost with at most j units (no blocks yet)
    choices: list[list[str | None]] = []
    for nbytes, costs in zip(bytes_per_block, cost_per_block):
        new = [inf] * (capacity + 1)
        pick: list[str | None] = [None] * (capacity + 1)
        for policy in PLANNED_POLICIES:
            need = math.ceil(nbytes[policy] / unit)
            for j in range(need, capacity + 1):
                candidate = best[j - need] + costs[policy]
                if candidate < new[j]:
                    new[j], pick[j] = candidate, policy
        best = new
        choices.append(pick)
    if best[capacity] == inf:
        # Rounding up made the tightest feasible budgets look infeasible; full everywhere fits.
        policies = ["full"] * len(bytes_per_block)
    else:
        policies, j = [], capacity
        for nbytes, pick in zip(reversed(bytes_per_block), reversed(choices)):
            policy = pick[j]
            policies.append(policy)
            j -= math.ceil(nbytes[policy] / unit)
        policies.reverse()
    total = outside + sum(b[p] for b, p in zip(bytes_per_block, policies))
    cost = sum(c[p] for c, p in zip(cost_per_block, policies))
    return policies, total, cost
