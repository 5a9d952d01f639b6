"""Drop-in modules built on slmfast.functional: same constructor arguments and state_dict keys
as the modules they replace."""

from slmfast.nn.attention import Attention, KVCache
from slmfast.nn.layer_norm import LayerNorm
from slmfast.nn.mlp import GeGLUMLP, SwiGLUMLP
from slmfast.nn.norm_linear import NormLinear, norm_linear
from slmfast.nn.rms_norm import RMSNorm
from slmfast.nn.rotary import RotaryEmbedding

__all__ = ["Attention", "KVCache", "RMSNorm",
           "LayerNorm", "SwiGLUMLP", "GeGLUMLP", "NormLinear", "norm_linear", "RotaryEmbedding"]
