"""Bridges to other libraries (transformers: slmfast.integrations.hf)."""
