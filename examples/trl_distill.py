"""On-policy distillation with TRL's DistillationTrainer, its loss computed by slmfast.

`slmfast.integrations.trl.patch()` swaps the function through which TRL (>= 1.16) computes the
generalized JSD between student and teacher for slmfast's fused kernels: same arguments (beta,
temperature, masks, logit scales, softcapping), same numbers, less memory and time. Everything
else is TRL: the student generates completions, the teacher scores them, the student moves
towards the teacher. Runs offline: tiny random Llamas and a word-level tokenizer built here.

    python examples/trl_distill.py --steps 8 --beta 0.5
"""

import argparse
import json

import datasets
import torch
import transformers
import trl
from tokenizers import Tokenizer, models, pre_tokenizers

from slmfast.integrations import trl as slmfast_trl


def tiny_tokenizer(words: int):
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def tiny_llama(vocab: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1)
    return transformers.AutoModelForCausalLM.from_config(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32, help="student hidden size (teacher: twice)")
    parser.add_argument("--beta", type=float, default=0.5, help="0: forward KL, 1: reverse KL, else JSD")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-patch", action="store_true", help="TRL's own loss, for comparison")
    parser.add_argument("--out", default="/tmp/slmfast-example-trl")
    a = parser.parse_args()

    if not a.no_patch:
        print("patched:", ", ".join(slmfast_trl.patch()))
    words = 61
    tokenizer = tiny_tokenizer(words)
    vocab = words + 3
    teacher = tiny_llama(vocab, 2 * a.hidden, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)               # a random but confident teacher: something to learn
    prompts = [" ".join(f"w{(i + j) % words}" for j in range(5)) for i in range(64)]
    args = trl.DistillationConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8,
                                  max_completion_length=12, beta=a.beta, temperature=a.temperature,
                                  learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                                  use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
                                  disable_tqdm=True, seed=0)
    data = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = trl.DistillationTrainer(model=tiny_llama(vocab, a.hidden, seed=0), teacher_model=teacher,
                                      args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({"losses": losses}))


if __name__ == "__main__":
    main()
