"""slmfast.integrations.trl against TRL's own loss functions and a plain float64 reference.

The reference (`_reference`) is written here from the definition: logits of both heads, TRL's
post-processing (scale, then softcap, then temperature), log-softmax, and the generalized JSD with
TRL's mixture M = beta P + (1 - beta) Q (0 = KL(P || Q), 1 = KL(Q || P)), no T^2 factor. Both
slmfast's replacement and TRL's own function must meet it under the tolerance rule of
tests/helpers.py (the same reference in float32 is the baseline); the patched trainer must log the
losses of the unpatched one.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import assert_close

trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'slmfast[trl]'")
distillation = pytest.importorskip("trl.trainer.distillation_trainer")
slm_trl = pytest.importorskip("slmfast.integrations.trl")

if not hasattr(distillation, "_chunked_divergence_loss"):
    pytest.skip("this TRL has no _chunked_divergence_loss (TRL >= 1.16)", allow_module_level=True)


def _reference(sh, th, sw, tw, mask, beta, num_items=None, sb=None, tb=None, s_scale=1.0, t_scale=1.0,
               s_cap=None, t_cap=None, temperature=1.0):
    """(loss, entropy_sum, n_valid) by plain torch from the full logits."""
    def log_probs(h, w, b, scale, cap):
        z = h.reshape(-1, h.shape[-1]) @ w.t()                            # (N, V)
        if b is not None:
            z = z + b
        z = z * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return torch.log_softmax(z / temperature, -1)

    lq = log_probs(sh, sw, sb, s_scale, s_cap)
    lp = log_probs(th, tw, tb, t_scale, t_cap).detach()
    q, p = lq.exp(), lp.exp()
    if beta == 0:
        rows = (p * (lp - lq)).sum(-1)
    elif beta == 1:
        rows = (q * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
        rows = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    valid = mask.reshape(-1) != 0
    total = (rows * valid).sum()
    count = valid.sum().clamp(min=1) if num_items is None else num_items
    entropy = (-(q * lq).sum(-1) * valid).sum()
    return total / count, entropy.detach(), valid.sum()


def _inputs(dtype, b=3, k=17, hs=40, ht=24, v=70, bias=True):
    g = dict(dtype=dtype)
    sh, th = torch.randn(b, k, hs, **g), torch.randn(b, k, ht, **g)
    sw, tw = torch.randn(v, hs, **g) / hs ** 0.5 * 3, torch.randn(v, ht, **g) / ht ** 0.5 * 3
    sb, tb = (torch.randn(v, **g), torch.randn(v, **g)) if bias else (None, None)
    mask = (torch.rand(b, k) > 0.3).long()
    mask[0] = 0                                                             # one fully masked row
    return sh, th, sw, tw, sb, tb, mask


def _run(fn, sh, th, sw, tw, sb, tb, mask, beta, **kw):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (sh, sw, sb)]
    loss, entropy, n = fn(leaves[0], th, leaves[1], tw, mask, beta, student_lm_head_bias=leaves[2],
                          teacher_lm_head_bias=tb, **kw)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss.detach(), entropy.detach(), n, grads


def _reference_fn(sh, th, sw, tw, mask, beta, num_items_in_batch=None, student_lm_head_bias=None,
                  teacher_lm_head_bias=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
                  student_final_logit_softcapping=None, teacher_final_logit_softcapping=None,
                  temperature=1.0):
    """_reference with TRL's argument names."""
    return _reference(sh, th, sw, tw, mask, beta, num_items_in_batch, student_lm_head_bias,
                      teacher_lm_head_bias, student_logit_scale, teacher_logit_scale,
                      student_final_logit_softcapping, teacher_final_logit_softcapping, temperature)


CASES = [
    dict(beta=0.0),
    dict(beta=1.0, temperature=2.5),
    dict(beta=0.4, temperature=0.7),
    dict(beta=0.5, student_logit_scale=0.6, teacher_logit_scale=1.7),
    dict(beta=0.0, student_final_logit_softcapping=4.0, teacher_final_logit_softcapping=3.0, temperature=1.5),
    dict(beta=0.8, student_logit_scale=1.3, student_final_logit_softcapping=5.0, num_items_in_batch=23),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_loss_entropy_and_grads_match_trl_and_reference(case, bias):
    case = dict(case)
    beta = case.pop("beta")
    sh, th, sw, tw, sb, tb, mask = _inputs(torch.float32, bias=bias)
    args64 = [t.double() if t is not None else None for t in (sh, th, sw, tw, sb, tb)]
    if isinstance(case.get("num_items_in_batch"), int):
        case["num_items_in_batch"] = torch.tensor(case["num_items_in_batch"])    # as the Trainer passes it
    ref = _run(_reference_fn, *args64, mask, beta, **case)
    base = _run(_reference_fn, sh, th, sw, tw, sb, tb, mask, beta, **case)
    ours = _run(slm_trl.chunked_divergence_loss, sh, th, sw, tw, sb, tb, mask, beta, **case)
    theirs = _run(distillation._chunked_divergence_loss, sh, th, sw, tw, sb, tb, mask, beta, **case)
    assert_close("loss", ours[0], base[0], ref[0])
    assert_close("entropy", ours[1].float(), base[1], ref[1], floor_ulps=8)
    assert int(ours[2]) == int(ref[2])
    for name, g, gb, gr in zip(("hidden", "weight", "bias"), ours[3], base[3], ref[3]):
        assert_close(f"grad {name}", g, gb, gr)
    # TRL's own function meets the same reference (float32 noise: its accuracy is not ours to bound),
    # which shows that the reference, and so slmfast's replacement, follows TRL's conventions; a
    # wrong beta, temperature, scale or reduction convention would be off by far more than 1e-4.
    assert int(theirs[2]) == int(ref[2])
    for name, got, want in (("loss", theirs[0], ref[0]), ("entropy", theirs[1], ref[1]),
                            *((f"grad {n}", g, r) for n, g, r in zip(("hidden", "weight", "bias"), theirs[3],
                                                                       ref[3]))):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4 * scale,
                                   msg=lambda m, n=name: f"trl {n}: {m}")


def test_float64_matches_reference_tightly():
    """In float64 the fused path is the reference up to summation order (TRL's own stays float32)."""
    sh, th, sw, tw, sb, tb, mask = [t.double() if t.is_floating_point() else t
                                    for t in _inputs(torch.float64)]
    kw = dict(temperature=1.3, student_logit_scale=0.9, student_final_logit_softcapping=6.0)
    for beta in (0.0, 0.35, 1.0):
        ref = _run(_reference_fn, sh, th, sw, tw, sb, tb, mask, beta, **kw)
        ours = _run(slm_trl.chunked_divergence_loss, sh, th, sw, tw, sb, tb, mask, beta, **kw)
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-12, atol=0)
        for g, r in zip(ours[3], ref[3]):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)


def test_small_chunks_and_all_masked():
    sh, th, sw, tw, sb, tb, mask = _inputs(torch.float32, b=2, k=9)
    whole = _run(slm_trl.chunked_divergence_loss, sh, th, sw, tw, sb, tb, mask, 0.3)
    small = _run(lambda *a, **k: slm_trl.chunked_divergence_loss(*a, chunk_size=2, **k),
                 sh, th, sw, tw, sb, tb, mask, 0.3)
    torch.testing.assert_close(small[0], whole[0], rtol=1e-6, atol=0)
    for a, b in zip(small[3], whole[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    zero = _run(slm_trl.chunked_divergence_loss, sh, th, sw, tw, sb, tb, torch.zeros_like(mask), 0.3)
    assert float(zero[0]) == 0.0 and int(zero[2]) == 0
    assert all(bool((g == 0).all()) for g in zero[3])


def test_bad_arguments_are_named():
    sh, th, sw, tw, sb, tb, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="beta"):
        slm_trl.chunked_divergence_loss(sh, th, sw, tw, mask, 1.5)
    with pytest.raises(ValueError, match="completion_mask"):
        slm_trl.chunked_divergence_loss(sh, th, sw, tw, mask[:, 1:], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        slm_trl.chunked_divergence_loss(sh, th, sw, tw, mask, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="student_final_logit_softcapping"):
        slm_trl.chunked_divergence_loss(sh, th, sw, tw, mask, 0.5, student_final_logit_softcapping=-1.0)


# ---- GKDTrainer ---------------------------------------------------------------------------

gkd = None
try:
    from trl.experimental.gkd import GKDTrainer as gkd
except ImportError:
    pass


@pytest.mark.skipif(gkd is None, reason="this TRL has no trl.experimental.gkd.GKDTrainer")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "num_items"])
def test_gkd_jsd_matches_trl(beta, reduction):
    s = torch.randn(3, 11, 50, dtype=torch.float64) * 2
    t = torch.randn(3, 11, 50, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (3, 11))
    labels[torch.rand(3, 11) < 0.3] = -100
    kw = dict(labels=labels, beta=beta, temperature=1.7)
    if reduction == "num_items":
        kw["num_items_in_batch"] = torch.tensor(19)
    else:
        kw["reduction"] = reduction
    original = gkd.generalized_jsd_loss
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    theirs = original(s1, t, **kw)
    ours = slm_trl.generalized_jsd_loss(s2, t, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    (g1,), (g2,) = torch.autograd.grad(theirs, [s1]), torch.autograd.grad(ours, [s2])
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-14)


# ---- patch / unpatch and a trainer run --------------------------------------------------------

def test_patch_and_unpatch_swap_and_restore():
    original = distillation._chunked_divergence_loss
    original_gkd = gkd.__dict__["generalized_jsd_loss"] if gkd is not None else None
    done = slm_trl.patch()
    try:
        assert distillation._chunked_divergence_loss is slm_trl.chunked_divergence_loss
        assert any("_chunked_divergence_loss" in d for d in done)
        slm_trl.patch()                                                     # twice: a no-op
        if gkd is not None:
            assert gkd.generalized_jsd_loss is slm_trl.generalized_jsd_loss
    finally:
        slm_trl.unpatch()
    assert distillation._chunked_divergence_loss is original
    if gkd is not None:
        assert gkd.__dict__["generalized_jsd_loss"] is original_gkd
    assert not slm_trl.is_patched()


def _tiny_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i + 3 for i in range(61)}
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **words}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left"), list(words)


def _tiny_llama(hidden, seed):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1)
    return transformers.AutoModelForCausalLM.from_config(config)


def _trl_run(tmp_path, name, steps=2):
    datasets = pytest.importorskip("datasets")
    tok, words = _tiny_tokenizer()
    data = datasets.Dataset.from_list([{"prompt": " ".join(words[i:i + 5])} for i in range(40)])
    args = trl.DistillationConfig(output_dir=str(tmp_path / name), max_steps=steps,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                  max_completion_length=8, report_to=[],
                                  use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                                  beta=0.5, temperature=1.5, learning_rate=1e-2, seed=1,
                                  gradient_checkpointing=False)
    trainer = trl.DistillationTrainer(model=_tiny_llama(32, 0), teacher_model=_tiny_llama(48, 1), args=args,
                                      train_dataset=data, processing_class=tok)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return [e["loss"] for e in logs], [e["entropy"] for e in logs]


def test_distillation_trainer_through_the_patch_logs_trls_losses(tmp_path):
    """Two steps (gradient accumulation 2) of TRL's DistillationTrainer on tiny random models, once
    with TRL's loss and once patched, from the same seeds: the same losses and entropies."""
    theirs, theirs_entropy = _trl_run(tmp_path, "trl")
    calls = []
    with slm_trl.patched():
        fused = distillation._chunked_divergence_loss
        assert fused is slm_trl.chunked_divergence_loss
        distillation._chunked_divergence_loss = lambda *a, **k: calls.append(1) or fused(*a, **k)
        try:
            ours, ours_entropy = _trl_run(tmp_path, "slmfast")
        finally:
            distillation._chunked_divergence_loss = fused
    assert len(calls) == 4                                   # 2 steps x 2 micro-batches, all through slmfast
    assert len(ours) == len(theirs) == 2
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(ours_entropy), torch.tensor(theirs_entropy), rtol=1e-5, atol=0)
