"""The public functional API: one line per op, each implemented in slmfast/ops/<op>.py."""

from slmfast.ops.rms_norm import rms_norm

__all__ = ["rms_norm"]
