"""slmfast.integrations.hf.DistillationTrainer against a plain reference from full logits.

The reference (`_reference`) is written here from the definition: both models' logits (float64
copies of the models), the causal shift, log-softmax at temperature T, the divergence per position,
times T^2, plus alpha times the cross-entropy, summed over the positions whose label counts and
divided by their number (or num_items_in_batch). The trainer's loss and every student gradient meet
it under the tolerance rule of tests/helpers.py (the same reference in float32 is the baseline).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from slmfast.integrations.hf import DistillationTrainer  # noqa: E402

V = 96


def _llama(hidden: int, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    for p in model.parameters():                         # norms start at 1: move them so their grads matter
        if p.dim() == 1:
            p.data.add_(torch.randn_like(p) * 0.1)
    return model


def _trainer(tmp_path, student, teacher, **kw):
    steps = kw.pop("max_steps", 1)
    extra = kw.pop("args", {})
    settings = dict(output_dir=str(tmp_path), max_steps=steps, report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, logging_steps=1, seed=5, data_seed=5)
    args = transformers.TrainingArguments(**{**settings, **extra})
    return DistillationTrainer(model=student, args=args, teacher=teacher, **kw)


def _padded_batch(b=3, t=13):
    ids = torch.randint(1, V, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :4] = 0                                      # left padding
    mask[1, -3:] = 0                                     # right padding
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :5] = -100                                 # a prompt that is not trained on
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _reference(student, teacher, batch, kind="forward_kl", beta=0.5, temperature=1.0, alpha=0.0,
               num_items=None):
    """The loss from full logits with autograd; returns (loss, {name: grad})."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    s = student(**inputs).logits[:, :-1]                                                  # (B, T-1, V)
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1]                                              # (B, T-1, V)
    y = batch["labels"][:, 1:]
    valid = (y != -100) & (batch["attention_mask"][:, 1:] != 0)                           # (B, T-1)
    lq = torch.log_softmax(s / temperature, -1)
    lp = torch.log_softmax(t / temperature, -1)
    q, p = lq.exp(), lp.exp()
    if kind == "forward_kl":
        rows = (p * (lp - lq)).sum(-1)
    elif kind == "reverse_kl":
        rows = (q * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
        rows = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    rows = temperature ** 2 * rows
    if alpha:
        ce = torch.nn.functional.cross_entropy(s.reshape(-1, V), y.clamp(min=0).reshape(-1), reduction="none")
        rows = rows + alpha * ce.reshape(rows.shape)
    loss = (rows * valid).sum() / (valid.sum() if num_items is None else num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def _ours(tmp_path, student, teacher, batch, num_items=None, **options):
    trainer = _trainer(tmp_path, student, teacher, **options)
    loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("options", [
    dict(loss="forward_kl"),
    dict(loss="reverse_kl", temperature=2.0, alpha=0.5),
    dict(loss="jsd", beta=0.3, temperature=0.8),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_loss_and_grads_match_the_logits_reference(tmp_path, options):
    student, teacher = _llama(32, seed=1), _llama(48, seed=2)
    batch = _padded_batch()
    kw = dict(kind=options.get("loss"), beta=options.get("beta", 0.5),
              temperature=options.get("temperature", 1.0), alpha=options.get("alpha", 0.0))
    ref = _reference(copy.deepcopy(student).double(), copy.deepcopy(teacher).double(), batch, **kw)
    base = _reference(copy.deepcopy(student), teacher, batch, **kw)
    ours = _ours(tmp_path, student, teacher, batch, **options)
    assert_close("loss", ours[0], base[0], ref[0])
    for name, grad in ours[1].items():
        assert_close(f"grad {name}", grad, base[1][name], ref[1][name])


def test_num_items_sums_micro_batches_to_the_full_batch(tmp_path):
    """Gradient accumulation: two halves, each divided by the full batch's count, add up to the
    full batch's mean (as transformers passes num_items_in_batch)."""
    student, teacher = _llama(32, seed=1), _llama(32, seed=2)
    batch = _padded_batch(b=4)
    n = int(((batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] != 0)).sum())
    trainer = _trainer(tmp_path, student, teacher, loss="jsd", alpha=0.3)
    full = trainer.compute_loss(student, batch)
    halves = [trainer.compute_loss(student, {k: v[i:i + 2] for k, v in batch.items()},
                                   num_items_in_batch=torch.tensor(n)) for i in (0, 2)]
    torch.testing.assert_close(halves[0] + halves[1], full, rtol=1e-6, atol=0)


def test_packed_batch_equals_padded_batch(tmp_path):
    """Two sequences packed in one row (position_ids restart, -100 at the second's start, as
    DataCollatorWithFlattening writes them) give the loss of the same sequences padded."""
    student, teacher = _llama(32, seed=1), _llama(32, seed=2)
    a, b = torch.randint(1, V, (9,)), torch.randint(1, V, (6,))
    padded = dict(input_ids=torch.stack([a, torch.cat([b, torch.zeros(3, dtype=torch.long)])]),
                  attention_mask=torch.tensor([[1] * 9, [1] * 6 + [0] * 3]))
    padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
    packed_labels = torch.cat([a, b])
    packed_labels[9] = -100
    packed = dict(input_ids=torch.cat([a, b])[None], labels=packed_labels[None],
                  position_ids=torch.cat([torch.arange(9), torch.arange(6)])[None])
    trainer = _trainer(tmp_path, student, teacher, loss="reverse_kl", alpha=0.2)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(student, packed),
                                   trainer.compute_loss(student, padded), rtol=1e-5, atol=0)


def _learnable_data(n=64, t=16):
    starts = torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(3))
    ids = (starts + torch.arange(t)) % V                                     # each row counts up: learnable
    return [dict(input_ids=row, attention_mask=torch.ones_like(row), labels=row.clone()) for row in ids]


def test_training_lowers_the_loss_and_leaves_the_teacher_alone(tmp_path):
    student, teacher = _llama(32, seed=1), _llama(48, seed=2)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer = _trainer(tmp_path, student, teacher, loss="forward_kl", alpha=1.0, max_steps=16,
                       train_dataset=_learnable_data(),
                       args=dict(per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                 learning_rate=3e-3, save_strategy="steps", save_steps=16))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 16 and losses[-1] < 0.8 * losses[0], losses
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for n, p in teacher.named_parameters():
        assert torch.equal(p, before[n]), f"the teacher's {n} changed"
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-16")
    assert saved.config.hidden_size == 32                                   # the student, not the teacher
    assert set(saved.state_dict()) == set(student.state_dict())


def test_bf16_mixed_precision_reaches_both_models(tmp_path):
    """TrainingArguments(bf16=True) with float32 weights: Accelerate autocasts the model's forward,
    which the trainer swaps out to compute its loss; the loss must still run under that autocast
    (the models' projections give bfloat16), not silently in float32."""
    student, teacher = _llama(32, seed=1), _llama(48, seed=2)
    seen = {}

    def hook(who):
        def record(module, args, output):
            seen.setdefault(who, output.dtype)
        return record

    for who, model in (("student", student), ("teacher", teacher)):
        model.model.layers[0].self_attn.q_proj.register_forward_hook(hook(who))
    trainer = _trainer(tmp_path, student, teacher, loss="forward_kl", train_dataset=_learnable_data(n=8),
                       args=dict(per_device_train_batch_size=4, bf16=True))
    trainer.train()
    assert seen == {"student": torch.bfloat16, "teacher": torch.bfloat16}
    assert student.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_cached_topk_teacher_with_k_equal_vocab_is_the_dense_loss(tmp_path):
    """Batches carrying the teacher's top-k log-probabilities train without a teacher model; with
    k = V (nothing left out) the loss is the dense one; the columns survive the Trainer's filter."""
    student, teacher = _llama(32, seed=1), _llama(32, seed=2)
    batch = _padded_batch()
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits, -1)   # (B, T, V)
    values, index = logp.sort(-1, descending=True)
    cached = dict(batch, teacher_topk_ids=index, teacher_topk_logprobs=values)
    dense = _trainer(tmp_path, student, teacher, loss="jsd", beta=0.4, temperature=1.5)
    offline = _trainer(tmp_path, student, None, loss="jsd", beta=0.4, temperature=1.5)
    with torch.no_grad():
        torch.testing.assert_close(offline.compute_loss(student, cached), dense.compute_loss(student, batch),
                                   rtol=1e-5, atol=0)
    offline._set_signature_columns_if_needed()
    assert {"teacher_topk_ids", "teacher_topk_logprobs"} <= set(offline._signature_columns)


def test_bad_arguments_are_named(tmp_path):
    student, teacher = _llama(32, seed=1), _llama(32, seed=2)
    with pytest.raises(ValueError, match="loss must be one of"):
        _trainer(tmp_path, student, teacher, loss="kl")
    with pytest.raises(ValueError, match="temperature"):
        _trainer(tmp_path, student, teacher, temperature=0)
    with pytest.raises(ValueError, match="teacher must be"):
        _trainer(tmp_path, student, 3)
    trainer = _trainer(tmp_path, student, None)
    with pytest.raises(ValueError, match="no teacher"):
        trainer.compute_loss(student, _padded_batch())
    capped = _llama(32, seed=3)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        _trainer(tmp_path, student, capped)
