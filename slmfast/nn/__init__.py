"""Drop-in modules built on slmfast.functional: same constructor arguments and state_dict keys
as the modules they replace."""

from slmfast.nn.rms_norm import RMSNorm

__all__ = ["RMSNorm"]
