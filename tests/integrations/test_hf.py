"""slmfast.integrations.hf: patched Hugging Face models against the unpatched ones.

Each architecture is built from a tiny random config (no downloads), copied, and the copy is
patched; loss, logits and every parameter's .grad are compared with the unpatched model under
the tolerance rule of docs/architecture.md §5 (the unpatched model in float64 is the oracle, the
unpatched model in the same dtype the baseline).
"""

import copy

import pytest
import torch

from slmfast.integrations import hf
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON)
    if arch == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=8)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=16)
    if arch == "gemma":
        return transformers.GemmaConfig(**COMMON, head_dim=16)
    if arch == "gemma2":
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=8,
                                         final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if arch == "phi3":
        return transformers.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2"]


def _model(arch: str):
    torch.manual_seed(0)
    # Gemma 2's attention softcap has no SDPA path in transformers; patch() keeps its attention too.
    implementation = "eager" if arch == "gemma2" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(_config(arch), attn_implementation=implementation)
    for p in model.parameters():  # norms start at 1 / 0: move them so that their grads mean something
        if p.dim() == 1:
            p.data.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _batch(padding: str | None, batch=3, seq=20):
    ids = torch.randint(1, 256, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "left":
        mask[0, :7] = 0
        mask[2, :3] = 0
    elif padding == "mixed":  # right padding: sequences of different lengths
        mask[1, 12:] = 0
        mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _run(model, batch, dtype):
    model = model.to(dtype)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    with torch.no_grad():
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**no_labels).logits
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), logits, grads


# Gemma 2 runs on transformers' eager attention (softcap): with padding, the unpatched model itself
# gives NaN (padded rows' NaN values leak through masked scores), so there is no oracle to compare to.
CASES = [(arch, padding) for arch in ARCHS for padding in (None, "left", "mixed")
         if not (arch == "gemma2" and padding is not None)]


@pytest.mark.parametrize("arch,padding", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_matches_unpatched(arch, padding, dtype):
    base = _model(arch)
    reference = copy.deepcopy(base)
    patched = hf.patch(copy.deepcopy(base))
    batch = _batch(padding)
    valid = batch["attention_mask"].bool()
    loss, logits, grads = _run(patched, batch, dtype)
    base_loss, base_logits, base_grads = _run(base, batch, dtype)
    ref_loss, ref_logits, ref_grads = _run(reference, batch, torch.float64)
    assert_close("loss", loss.reshape(1), base_loss.reshape(1), ref_loss.reshape(1))
    assert_close("logits", logits[valid], base_logits[valid], ref_logits[valid])  # padded rows: any value
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(name, grads[name], base_grads[name], ref_grads[name])


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_swaps_the_expected_modules(arch):
    """Matching outputs alone would pass if nothing were swapped: check what was."""
    from slmfast import nn as snn

    model = hf.patch(_model(arch))
    layer = model.transformer.h[0] if arch == "gpt2" else model.model.layers[0]
    if arch == "gpt2":
        assert type(layer.ln_1) is snn.LayerNorm
    else:
        assert type(layer.input_layernorm) is snn.RMSNorm
        assert layer.input_layernorm.offset == (1.0 if arch.startswith("gemma") else 0.0)
    if arch == "phi3":
        assert "forward" in vars(layer.mlp)                       # Phi-3's fused gate_up MLP
    elif arch.startswith("gemma"):
        assert type(layer.mlp) is snn.GeGLUMLP
    elif arch != "gpt2":
        assert type(layer.mlp) is snn.SwiGLUMLP
    if arch != "gemma2":  # Gemma 2's attention softcap keeps its own attention
        assert model.config._attn_implementation == "slmfast"


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_everything(arch):
    model = _model(arch)
    before_classes = {n: type(m) for n, m in model.named_modules()}
    before_state = copy.deepcopy(model.state_dict())
    before_impl = model.config._attn_implementation
    hf.patch(model)
    changed = [n for n, m in model.named_modules() if before_classes.get(n) is not type(m)]
    if arch != "gpt2":
        assert changed, "nothing was swapped"
    assert model.state_dict().keys() == before_state.keys()
    hf.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before_classes
    assert model.config._attn_implementation == before_impl
    assert "forward" not in vars(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before_state[k]) for k in before_state)
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)


def test_patching_one_model_leaves_its_twin_alone():
    """Models built from one config object share it: patching one must leave the other's attention
    implementation alone."""
    config = _config("llama")
    a = transformers.LlamaForCausalLM(config)
    b = transformers.LlamaForCausalLM(config)
    hf.patch(a)
    assert a.config._attn_implementation == "slmfast"
    assert b.config._attn_implementation != "slmfast"


def test_unknown_architecture_gets_attention_only():
    config = transformers.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=64)
    model = transformers.OPTForCausalLM(config)
    with pytest.warns(UserWarning, match="opt is not one of .* patched only: attention"):
        hf.patch(model)


def test_attention_name_through_from_pretrained(tmp_path):
    model = _model("llama")
    model.save_pretrained(tmp_path / "tiny")
    hf.register()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny",
                                                               attn_implementation="slmfast")
    assert loaded.config._attn_implementation == "slmfast"
    batch = _batch("left")
    with torch.no_grad():
        ours = loaded(**batch).logits
        theirs = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], theirs[valid], rtol=1e-4, atol=1e-5)


def test_auto_model_loads_and_patches(tmp_path):
    _model("qwen2").save_pretrained(tmp_path / "tiny")
    model = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert model.config._attn_implementation == "slmfast"
    assert type(model.model.norm).__module__.startswith("slmfast")


def test_loss_without_logits_and_num_items():
    model = hf.patch(_model("llama"))
    batch = _batch(None)
    out = model(**batch)
    assert out.logits is None
    n = int((batch["labels"][:, 1:] != -100).sum())
    summed = model(**batch, num_items_in_batch=1).loss
    torch.testing.assert_close(summed / n, out.loss)


def _trainer_losses(model, tmp_path, name):
    # Learnable data: each row counts up from a random start, so the loss must fall.
    starts = torch.randint(0, 256, (80, 1), generator=torch.Generator().manual_seed(3))  # same for both runs
    ids = (starts + torch.arange(24)) % 256                                # (80, 24)
    data = [dict(input_ids=row, attention_mask=torch.ones_like(row), labels=row.clone()) for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / name), max_steps=20,
                                          per_device_train_batch_size=4, learning_rate=2e-3,
                                          logging_steps=1, report_to=[], save_strategy="no", seed=7,
                                          data_seed=7, use_cpu=True, disable_tqdm=True,
                                          gradient_checkpointing=True)
    trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_tracks_unpatched_loss(tmp_path):
    """20 Trainer steps (with HF gradient checkpointing on) on the patched model follow the
    unpatched loss curve: the same losses up to float32 rounding amplified by training."""
    pytest.importorskip("accelerate")
    base = _model("llama")
    patched = hf.patch(copy.deepcopy(base))
    theirs = _trainer_losses(base, tmp_path, "base")
    ours = _trainer_losses(patched, tmp_path, "patched")
    assert len(ours) == len(theirs) == 20
    assert theirs[-1] < theirs[0]  # it trains
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: patched loss {a} vs unpatched {b}"
