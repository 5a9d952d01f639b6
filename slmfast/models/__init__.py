"""A small-model family built only from slmfast.nn: a Llama-style decoder with named sizes."""

from slmfast.models.config import NAMED_CONFIGS, LlamaConfig
from slmfast.models.llama import CausalLM, CausalLMOutput

__all__ = ["NAMED_CONFIGS", "CausalLM", "CausalLMOutput", "LlamaConfig"]
