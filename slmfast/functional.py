"""The public functional API: one line per op, each implemented in slmfast/ops/<op>.py."""

from slmfast.ops.attention import attention, scaled_dot_product_attention
from slmfast.ops.cross_entropy import cross_entropy
from slmfast.ops.distill_loss import (
    distill_loss,
    distill_loss_from_logits,
    sampled_distill_loss,
    topk_distill_loss,
)
from slmfast.ops.glu import geglu, swiglu
from slmfast.ops.glu_linear import glu_linear
from slmfast.ops.layer_norm import layer_norm
from slmfast.ops.linear_cross_entropy import linear_cross_entropy
from slmfast.ops.norm_linear import rms_norm_linear
from slmfast.ops.rms_norm import rms_norm
from slmfast.ops.rotary import rotary

__all__ = ["attention", "scaled_dot_product_attention",
           "cross_entropy", "distill_loss", "distill_loss_from_logits", "linear_cross_entropy",
           "topk_distill_loss", "sampled_distill_loss",
           "rms_norm",
           "layer_norm", "swiglu", "geglu", "rotary", "rms_norm_linear", "glu_linear"]
