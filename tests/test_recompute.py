"""slmfast.recompute: policies applied from outside, the budget planner and the report."""

import copy

import pytest
import torch
from torch import nn

import slmfast.recompute as rc

transformers = pytest.importorskip("transformers")


def _hf_model(kind: str):
    if kind == "slmfast":
        from slmfast.models import CausalLM, LlamaConfig

        return CausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=4,
                                    num_heads=4, num_kv_heads=2, max_position=128)).eval()
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()


def _batch(vocab=256, batch=2, seq=48):
    ids = torch.randint(0, vocab, (batch, seq))
    return dict(input_ids=ids, labels=ids)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "slmfast"])
@pytest.mark.parametrize("policy", ["selective", "full", "offload"])
def test_gradients_bitwise_identical(kind, policy):
    model = _hf_model(kind).train()
    batch = _batch()
    loss_ref, grads_ref = _grads(model, batch)
    rc.apply(model, policy)
    loss, grads = _grads(model, batch)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_saved_bytes_order(kind):
    model = _hf_model(kind).train()
    batch = _batch()
    totals = {}
    for policy in ("none", "selective", "full", "offload"):
        rc.apply(model, policy)
        totals[policy] = rc.report(model, batch).activation_bytes
    assert totals["selective"] < totals["none"]
    assert totals["full"] < totals["selective"]
    assert totals["offload"] <= totals["full"]  # on the CPU there is nothing to offload to


def test_selective_is_the_kernels_own_on_slmfast_model():
    """slmfast's own blocks already recompute norms, the SwiGLU product and RoPE in their kernels:
    "selective" leaves them as they are (wrapping them only added copies, RESULTS.md), and
    "full" still saves less."""
    model = _hf_model("slmfast").train()
    batch = _batch()
    totals = {}
    for policy in ("none", "selective", "full"):
        rc.apply(model, policy)
        totals[policy] = rc.report(model, batch).activation_bytes_per_block
    assert totals["selective"] == totals["none"]
    assert all(f < n for f, n in zip(totals["full"], totals["none"]))


def test_full_keeps_only_block_inputs():
    model = _hf_model("llama").train()
    batch = _batch(batch=2, seq=48)
    rc.apply(model, "full")
    per_block = rc.report(model, batch).activation_bytes_per_block
    hidden_bytes = 2 * 48 * 64 * 4  # one (B, T, H) fp32 tensor: each block's output
    assert per_block == [hidden_bytes] * 4


def test_apply_remove_round_trip_leaves_model_unchanged():
    model = _hf_model("llama")
    state = copy.deepcopy(model.state_dict())
    assert model.config.use_cache
    rc.apply(model, "selective")
    assert rc.policies_of(model) == ["selective"] * 4
    assert model.config.use_cache is False  # the KV cache breaks recomputation (see policies.py)
    rc.remove(model)
    assert rc.policies_of(model) == ["none"] * 4
    assert model.config.use_cache is True
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(self.drop(torch.relu(self.fc1(self.norm(x)))))


class _Stack(nn.Module):
    def __init__(self, width=32, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_user_module_list_with_dropout_keeps_rng(policy):
    model = _Stack().train()
    x = torch.randn(4, 10, 32)
    torch.manual_seed(123)
    model(x).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rc.apply(model, policy)
    torch.manual_seed(123)
    model(x).square().mean().backward()
    for a, b in zip(ref, model.parameters()):
        assert torch.equal(a, b.grad)


def test_layers_argument_and_errors():
    model = _Stack()
    assert rc.find_blocks(model, layers="blocks") == list(model.blocks)
    with pytest.raises(ValueError, match="has no attribute 'layers'"):
        rc.find_blocks(model, layers="layers")
    with pytest.raises(ValueError, match="could not find the repeated blocks"):
        rc.find_blocks(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="recompute policy must be one of"):
        rc.apply(model, "sometimes")
    with pytest.raises(ValueError, match="3 policies given for 3 blocks|2 policies given for 3 blocks"):
        rc.apply(model, ["full", "none"])
    with pytest.raises(ValueError, match="needs batch="):
        rc.apply(model, rc.MemoryBudget(0.5))


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_planner_meets_saved_budget(fraction):
    model = _hf_model("llama").train()
    batch = _batch(seq=64)
    none_bytes = rc.report(model, batch).activation_bytes
    budget = rc.MemoryBudget(fraction, measure="saved")
    rc.apply(model, budget, batch=batch)
    plan = model._slmfast_recompute_plan
    measured = rc.report(model, batch).activation_bytes
    assert plan.budget == int(fraction * none_bytes) and plan.measure == "saved"
    assert measured <= plan.budget
    assert abs(measured - plan.predicted_bytes) <= 0.05 * plan.predicted_bytes
    _assert_no_policy_can_relax(model, batch, plan, lambda r: r.activation_bytes)


def _assert_no_policy_can_relax(model, batch, plan, figure):
    """The plan uses the memory it is given: no block's policy could be relaxed and still fit."""
    relaxed = {"full": "selective", "selective": "none"}
    for i, policy in enumerate(plan.policies):
        if policy in relaxed:
            trial = list(plan.policies)
            trial[i] = relaxed[policy]
            rc.apply(model, trial)
            if figure(rc.report(model, batch)) <= plan.budget:
                pytest.fail(f"block {i} could use {relaxed[policy]!r} within budget; plan {plan.policies}")


def _deep_llama():
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).train()


def test_planner_bounds_the_step_peak_and_is_monotonic():
    """The default budget bounds the step's peak (saved activations plus what the backward
    allocates): for each budget the tracked peak of the chosen plan is within the budget and the
    prediction, no block could recompute less and still fit, and a larger budget never gives a
    higher peak or a dearer plan. One measurement serves every budget (rc.plans)."""
    model = _deep_llama()
    batch = _batch(vocab=64, seq=128)
    none_peak = rc.report(model, batch).step_peak_bytes
    fractions = (0.6, 0.7, 0.8, 0.9, 1.0)
    found = rc.plans(model, [rc.MemoryBudget(f) for f in fractions], batch)
    peaks, costs = [], []
    for fraction, plan in zip(fractions, found):
        assert isinstance(plan, rc.Plan), plan
        assert plan.measure == "peak" and abs(plan.none_bytes - none_peak) <= 0.02 * none_peak
        assert plan.budget == int(fraction * plan.none_bytes)
        rc.apply(model, plan.policies)
        measured = rc.report(model, batch).step_peak_bytes
        assert measured <= plan.budget
        assert abs(measured - plan.predicted_bytes) <= 0.05 * plan.predicted_bytes
        if fraction in (0.7, 0.9):
            _assert_no_policy_can_relax(model, batch, plan, lambda r: r.step_peak_bytes)
        peaks.append(measured)
        costs.append(plan.predicted_cost)
    assert all(a <= b for a, b in zip(peaks, peaks[1:])), peaks
    assert all(a >= b - 1e-12 for a, b in zip(costs, costs[1:])), costs


def test_saved_bytes_promise_more_than_the_peak_delivers():
    """Why the default measures the peak: recomputing every block cuts the saved activations far
    more than the step's peak, because the backward regenerates a block's activations and adds
    its gradient temporaries while it runs (deterministic: uniform policies, no timings)."""
    model = _deep_llama()
    batch = _batch(vocab=64, seq=128)
    none = rc.report(model, batch)
    rc.apply(model, "full")
    full = rc.report(model, batch)
    saved_ratio = full.activation_bytes / none.activation_bytes
    peak_ratio = full.step_peak_bytes / none.step_peak_bytes
    assert saved_ratio < 0.5 * peak_ratio, (saved_ratio, peak_ratio)
    # the backward of the last block holds its regenerated activations: at least "none"'s block
    assert max(full.peak_bytes_per_block) >= none.activation_bytes_per_block[-1]


@pytest.mark.parametrize("measure", ["peak", "saved"])
def test_planner_infeasible_budget_names_the_smallest(measure):
    model = _hf_model("llama").train()
    batch = _batch()
    with pytest.raises(ValueError, match=r"smallest feasible budget is \d+ bytes") as error:
        rc.apply(model, rc.MemoryBudget(1000, measure=measure), batch=batch)
    smallest = int(error.value.args[0].split("smallest feasible budget is ")[1].split()[0])
    rc.apply(model, rc.MemoryBudget(smallest, measure=measure), batch=batch)   # that budget is feasible
    with pytest.raises(ValueError, match="smallest feasible budget"):
        rc.apply(model, rc.MemoryBudget(int(smallest * 0.98), measure=measure), batch=batch)


def test_memory_budget_rejects_bad_arguments():
    with pytest.raises(ValueError, match="MemoryBudget must be positive"):
        rc.MemoryBudget(0)
    with pytest.raises(ValueError, match="MemoryBudget measure must be one of peak, saved, got 'rss'"):
        rc.MemoryBudget(0.5, measure="rss")


def _random_memory(gen, n):
    from slmfast.recompute.planner import BlockMemory, ModelMemory

    blocks, costs = [], []
    for _ in range(n):
        full, sel, none = sorted(torch.randint(1, 1000, (3,), generator=gen).tolist())
        rest = torch.randint(0, 3000, (3, 2), generator=gen).tolist()
        blocks.append({p: BlockMemory(10 * s, 10 * s + f, 10 * s + b)
                       for p, s, (f, b) in zip(("none", "selective", "full"), (none, sel, full), rest)})
        c = sorted(torch.rand(2, generator=gen).tolist())
        costs.append({"none": 0.0, "selective": c[0], "full": c[1]})
    return ModelMemory(blocks, head=int(torch.randint(0, 5000, (1,), generator=gen)),
                       embed=int(torch.randint(0, 5000, (1,), generator=gen)), saved_outside=500), costs


@pytest.mark.parametrize("measure", ["peak", "saved"])
def test_solver_matches_brute_force(measure):
    import itertools

    from slmfast.recompute.planner import PLANNED_POLICIES, solve

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 4
        memory, costs = _random_memory(gen, n)
        combos = list(itertools.product(PLANNED_POLICIES, repeat=n))
        lowest = min(memory.bound(list(c), measure) for c in combos)
        budget = lowest + int(torch.randint(0, 20000, (1,), generator=gen)) + 100
        policies, cost = solve(memory, costs, budget, measure)
        assert memory.bound(policies, measure) <= budget
        assert cost == pytest.approx(sum(c[p] for c, p in zip(costs, policies)))
        best = min(sum(c[p] for c, p in zip(costs, combo)) for combo in combos
                   if memory.bound(list(combo), measure) <= budget)
        # rounding to budget / 4096 units may rule out plans within n units of the budget
        near = min((sum(c[p] for c, p in zip(costs, combo)) for combo in combos
                    if memory.bound(list(combo), measure) <= budget - n * (budget / 4096 + 1)), default=best)
        assert best - 1e-9 <= cost <= near + 1e-9
        with pytest.raises(ValueError, match="smallest feasible budget"):
            solve(memory, costs, lowest - 1, measure)


def test_report_table_and_dict():
    model = _hf_model("llama").train()
    rc.apply(model, "full")
    result = rc.report(model, _batch())
    data = result.to_dict()
    assert data["policies"] == ["full"] * 4
    blocks_total = sum(data["activation_bytes_per_block"])
    assert data["activation_bytes"] == blocks_total + data["activation_bytes_outside_blocks"]
    n = sum(p.numel() for p in model.parameters())
    assert data["num_parameters"] == n and data["optimizer_bytes"] == 8 * n
    assert data["peak_bytes_estimate"] == (data["parameter_bytes"] + data["gradient_bytes"]
                                           + data["optimizer_bytes"] + data["step_peak_bytes"])
    # the peak holds at least the saved activations, and each block's peak at least its own
    assert data["step_peak_bytes"] >= data["activation_bytes"]
    assert all(p >= s for p, s in zip(data["peak_bytes_per_block"], data["activation_bytes_per_block"]))
    assert data["peak_phase"].startswith(("forward", "backward"))
    assert "peak estimate" in result.table() and "peak in the" in result.table()


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_works_under_torch_compile(policy):
    model = _Stack(depth=2).train()
    x = torch.randn(3, 5, 32)
    model.eval()  # no dropout: compare compiled and eager exactly
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rc.apply(model, policy)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    for a, b in zip(ref, model.parameters()):
        torch.testing.assert_close(a, b.grad)


@pytest.mark.gpu
def test_offload_keeps_no_block_input_on_gpu():
    model = _hf_model("llama").cuda().train()
    batch = {k: v.cuda() for k, v in _batch().items()}
    rc.apply(model, "full")
    full = rc.report(model, batch)
    rc.apply(model, "offload")
    offload = rc.report(model, batch)
    assert sum(offload.activation_bytes_per_block) == 0
    assert offload.offloaded_bytes == sum(full.activation_bytes_per_block)
