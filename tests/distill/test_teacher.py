"""Teachers: slmfast directories, local transformers models (Llama converted, others padded), and
the tokenizer compatibility check."""

from __future__ import annotations

import shutil

import pytest
import torch

from slmfast.distill.teacher import check_tokenizer, load_teacher
from slmfast.distill.tokenizer import load_tokenizer, train_bpe

CPU = torch.device("cpu")


def _packed(vocab):
    ids = torch.randint(0, vocab, (40,))                                   # (N,)
    cu = torch.tensor([0, 7, 19, 20, 40], dtype=torch.int32)               # 4 documents, one of length 1
    return ids, cu, 20


def test_slmfast_teacher_is_frozen_and_matches_the_model(tiny_teacher):
    from slmfast.models import CausalLM

    teacher = load_teacher(str(tiny_teacher), device=CPU)
    assert teacher.kind == "slmfast" and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    ids, cu, maxlen = _packed(teacher.vocab_size)
    hidden = teacher.hidden(ids, cu, maxlen)                                   # (N, H)
    assert not hidden.requires_grad
    model = CausalLM.from_pretrained(tiny_teacher)
    assert torch.equal(hidden, model.hidden_states(ids, cu_seqlens=cu, max_seqlen=maxlen).detach())
    bf16 = load_teacher(str(tiny_teacher), device=CPU, dtype_name="bf16")
    assert bf16.output_weight.dtype == torch.bfloat16


def _per_document(decoder, ids, cu):
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out.append(decoder(input_ids=ids[a:b][None], use_cache=False).last_hidden_state[0])
    return torch.cat(out)


def test_hf_llama_teacher_is_converted(tmp_path, tiny_teacher):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    teacher = load_teacher(str(tmp_path / "llama"), device=CPU)
    assert teacher.kind == "slmfast"                                       # runs packed batches natively
    ids, cu, maxlen = _packed(384)
    with torch.no_grad():
        ref = _per_document(hf.get_decoder(), ids, cu)
    torch.testing.assert_close(teacher.hidden(ids, cu, maxlen), ref, rtol=1e-4, atol=1e-5)


def test_hf_other_architecture_runs_padded(tmp_path):
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "qwen")
    teacher = load_teacher(str(tmp_path / "qwen"), device=CPU)
    assert teacher.kind == "hf" and teacher.vocab_size == 384
    ids, cu, maxlen = _packed(384)
    with torch.no_grad():
        ref = _per_document(hf.get_decoder(), ids, cu)
    torch.testing.assert_close(teacher.hidden(ids, cu, maxlen), ref, rtol=1e-4, atol=1e-5)


def test_tokenizer_check(tmp_path, tiny_teacher):
    data_tok = load_tokenizer(tiny_teacher / "tokenizer.json")
    assert "matches" in check_tokenizer(str(tiny_teacher), data_tok, 384, 384, False)
    assert "padded to 512" in check_tokenizer(str(tiny_teacher), data_tok, 384, 512, False)
    with pytest.raises(ValueError, match="smaller than the data tokenizer"):
        check_tokenizer(str(tiny_teacher), data_tok, 384, 300, False)
    other = train_bpe(["completely different text " * 50, "with other merges"], 300)
    with pytest.raises(ValueError, match="differs from the data tokenizer"):
        check_tokenizer(str(tiny_teacher), other, 300, 384, False)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_teacher, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        check_tokenizer(str(bare), data_tok, 384, 384, False)
    assert "NOT verified" in check_tokenizer(str(bare), data_tok, 384, 384, True)


def test_teacher_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_teacher(str(tmp_path / "missing"), device=CPU)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_teacher(str(tmp_path), device=CPU)
