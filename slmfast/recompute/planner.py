"""The memory-budget planner: a per-block recompute policy that fits a budget at least cost.

Measurement (one real batch, slmfast/recompute/measure.py step_memory): for each policy P in
{none, selective, full}, applied to every block, one tracked forward and backward gives per
block b
    S[b][P]  what its forward leaves saved for backward
    F[b][P]  the most the step holds during its forward, minus S of the blocks before it
    R[b][P]  the same during its backward (its saved tensors, what it recomputes, gradient
             temporaries, the gradient flowing through)
and for the rest of the model H (the head's forward and backward: live bytes minus every
block's S), E (the embeddings' forward and backward) and the bytes saved outside the blocks;
plus the per-block forward times under "none" (t[b]) and the step time under each uniform
policy. Recomputing block b under P costs
    cost[b][P] = t[b] * (step(P) - step(none)) / sum(t)
i.e. the measured whole-model overhead of P, shared out in proportion to block forward time,
kept in the order none <= selective <= full (selective recomputes a subset of full) with a
1 ns tie-break per step of that order, so equal costs resolve to recomputing less.

What a plan p (one policy per block) peaks at, with P_b = sum_{i<b} S[i][p_i]:
    peak(p) = max( E,  max_b P_b + F[b][p_b],  P_n + H,  max_b P_b + R[b][p_b] )
(blocks run in order; while block b runs, the blocks before it hold their saved tensors and the
blocks after it hold theirs only in the forward, which P_n + H and F cover). For a uniform plan
this is the measured peak up to storages the forward frees late; the benchmark
(benchmarks/bench_recompute_peak.py) checks it against a process's real peak.
With MemoryBudget(measure="saved") the planner bounds only what the forward leaves saved:
    saved(p) = P_n + (bytes saved outside the blocks)
the earlier, weaker target: it promises more than a shallow model's peak delivers.

Choice: minimize sum_b cost[b][p_b] subject to the bound <= budget. Dynamic programming over
the blocks in order with the prefix P_b as state, in U = 4096 units of u = budget / U bytes,
every figure rounded UP to whole units (a plan that fits in units fits in bytes):
best[j] = least cost of blocks 0..b-1 whose S sum to exactly j units; block b may take policy
P from state j only if j + need[b][P] fits, need = max(F, R) (0 for "saved"), and moves to
j + S[b][P]; at the end j + H must fit (H = the bytes saved outside for "saved"). Exact up to
the rounding, which can only make the plan more conservative by at most blocks x u bytes.
A budget no plan fits is an error that names the smallest budget some plan fits (found by
bisection on the same program).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PLANNED_POLICIES = ("none", "selective", "full")
MEASURES = ("peak", "saved")
UNITS = 4096


@dataclass(frozen=True)
class MemoryBudget:
    """What a training step may hold above its parameters, gradients and optimizer state: an
    absolute number of bytes (> 1) or a fraction (0 < f <= 1) of what it holds with no
    recomputation. measure="peak" (the default) bounds the step's peak, the memory a device
    must have; measure="saved" bounds only the activations the forward leaves for backward."""

    value: float
    measure: str = "peak"

    def __post_init__(self):
        if not (self.value > 0):
            raise ValueError("MemoryBudget must be positive (bytes, or a fraction in (0, 1]), "
                             f"got {self.value}")
        if self.measure not in MEASURES:
            raise ValueError(f"MemoryBudget measure must be one of {', '.join(MEASURES)}, "
                             f"got {self.measure!r}")

    def bytes(self, reference: int) -> int:
        """The budget in bytes; `reference` is the "none" plan's figure for this measure."""
        return int(self.value * reference) if self.value <= 1 else int(self.value)


@dataclass(frozen=True)
class BlockMemory:
    """One block's figures under one policy (bytes; see the module docstring)."""

    saved: int     # S
    forward: int   # F
    backward: int  # R


@dataclass(frozen=True)
class ModelMemory:
    """Per block, per policy figures and the policy-independent rest of the model."""

    blocks: list[dict[str, BlockMemory]]
    head: int            # H
    embed: int           # E
    saved_outside: int   # bytes the forward leaves saved outside the blocks

    def bound(self, policies: list[str], measure: str) -> int:
        """The plan's peak (or saved bytes) as the module docstring predicts it."""
        return self.predict(policies, measure)[0]

    def predict(self, policies: list[str], measure: str) -> tuple[int, str]:
        """(bound, where it falls): 'embeddings', 'head', 'forward block b', 'backward block b', or
        'saved' for measure="saved"."""
        prefix = 0
        candidates = [(self.embed, "embeddings")] if measure == "peak" else []
        for b, policy in enumerate(policies):
            figures = self.blocks[b][policy]
            if measure == "peak":
                candidates += [(prefix + figures.forward, f"forward block {b}"),
                               (prefix + figures.backward, f"backward block {b}")]
            prefix += figures.saved
        tail = self.head if measure == "peak" else self.saved_outside
        candidates.append((prefix + tail, "head" if measure == "peak" else "saved"))
        return max(candidates, key=lambda c: c[0])


@dataclass
class Plan:
    policies: list[str]          # one per block
    measure: str                 # "peak" or "saved": what the budget bounds
    predicted_bytes: int         # that figure for this plan
    predicted_phase: str         # where the predicted peak falls ("saved" for measure="saved")
    predicted_cost: float        # extra seconds per step the recomputation costs
    budget: int
    none_bytes: int              # the figure with no recomputation
    full_bytes: int              # the figure with every block under "full"

    def summary(self) -> str:
        counts = {p: self.policies.count(p) for p in PLANNED_POLICIES if p in self.policies}
        what = "peak" if self.measure == "peak" else "saved activations"
        where = f" (in the {self.predicted_phase})" if self.measure == "peak" else ""
        return (f"recompute plan: {', '.join(f'{n} x {p}' for p, n in counts.items())}; {what} "
                f"{self.predicted_bytes / 2**20:.1f} MiB{where} of a {self.budget / 2**20:.1f} MiB budget "
                f"(none: {self.none_bytes / 2**20:.1f} MiB, full: {self.full_bytes / 2**20:.1f} MiB), "
                f"+{self.predicted_cost * 1e3:.1f} ms per step")


def solve(memory: ModelMemory, costs: list[dict[str, float]], budget: int,
          measure: str = "peak") -> tuple[list[str], float]:
    """The program of the module docstring: (policies, cost), or ValueError naming the smallest
    feasible budget when none fits."""
    found = _solve_units(memory, costs, budget, measure)
    if found is None:
        smallest = _smallest_feasible(memory, costs, measure)
        raise ValueError(f"MemoryBudget of {budget} bytes ({measure}) is below what any recompute plan "
                         f"needs; the smallest feasible budget is {smallest} bytes "
                         f"({smallest / 2**20:.2f} MiB)")
    return found


def _solve_units(memory: ModelMemory, costs, budget: int, measure: str):
    unit = max(1.0, budget / UNITS)
    capacity = int(budget // unit)

    def units(nbytes: int) -> int:
        return math.ceil(nbytes / unit)

    if measure == "peak" and units(memory.embed) > capacity:
        return None
    best = np.full(capacity + 1, np.inf)   # least cost with the blocks so far saving exactly j units
    best[0] = 0.0
    picks = []
    for figures, block_costs in zip(memory.blocks, costs):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int64)
        for k, policy in enumerate(PLANNED_POLICIES):
            saved = units(figures[policy].saved)
            need = units(max(figures[policy].forward, figures[policy].backward)) if measure == "peak" else 0
            last = capacity - max(need, saved)   # the largest prefix j this policy can follow
            if last < 0:
                continue
            candidate = best[:last + 1] + block_costs[policy]
            target = new[saved:saved + last + 1]
            better = candidate < target
            target[better] = candidate[better]
            pick[saved:saved + last + 1][better] = k
        best = new
        picks.append(pick)
    tail = units(memory.head if measure == "peak" else memory.saved_outside)
    if tail > capacity or not np.isfinite(best[:capacity - tail + 1]).any():
        return None
    j = int(np.argmin(best[:capacity - tail + 1]))
    cost = float(best[j])
    policies = []
    for figures, pick in zip(reversed(memory.blocks), reversed(picks)):
        policy = PLANNED_POLICIES[int(pick[j])]
        policies.append(policy)
        j -= units(figures[policy].saved)
    policies.reverse()
    return policies, cost


def _smallest_feasible(memory: ModelMemory, costs, measure: str) -> int:
    """Bisection on the budget: the program is feasible from some budget on (every plan's bound is
    an upper end; rounding makes the answer exact to a unit of the budget found)."""
    high = min(memory.bound([p] * len(memory.blocks), measure) for p in PLANNED_POLICIES)
    low = 1
    while _solve_units(memory, costs, high, measure) is None:   # rounding up can exceed the exact bound
        high = int(high * 1.01) + 1
    while high - low > max(1, high // (2 * UNITS)):
        middle = (low + high) // 2
        if _solve_units(memory, costs, middle, measure) is None:
            low = middle
        else:
            high = middle
    return high
